//! What the gateway reads of a request body to route it, without building a JSON tree of
//! the prompt: the model, whether it streams, how long its prompt is, where the fields
//! prefix affinity keys on are.

use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::ops::Range;

use super::ApiError;

/// What routing needs from a request body. Parsed without building a JSON tree of the
/// prompt: the prompt fields are only measured, as raw JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingInfo {
    /// The model named; empty when the request names none ([`route_model`](super::route_model)).
    pub model: String,
    pub stream: bool,
    /// Bytes of JSON text in the prompt-carrying fields (`messages`, `prompt`, `input`, ...):
    /// a cheap proxy for prompt length.
    pub prompt_bytes: usize,
    /// `max_completion_tokens` if given, else `max_tokens`.
    pub max_tokens: Option<u64>,
    /// The response will carry a `usage` object: every non-streaming answer, and streams
    /// that asked for it (`stream_options.include_usage`).
    pub usage_reported: bool,
    /// Where the fields prefix affinity keys on are in the body.
    pub spans: BodySpans,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(borrow, default)]
    text: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    user: Option<&'a RawValue>,
}

/// How deeply arrays and objects nest in a JSON text, counted up to `limit + 1` (strings
/// and their escapes skipped; the text need not be valid JSON). One pass, no recursion.
/// Most of a request body is string content (the prompt), which is skipped with `memchr`
/// up to the next quote or backslash rather than byte by byte.
pub fn json_depth_exceeds(body: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' => {
                // Skip the string: to its closing quote, stepping over escapes.
                i += 1;
                loop {
                    match memchr::memchr2(b'"', b'\\', &body[i..]) {
                        // An unterminated string: nothing after it counts.
                        None => return false,
                        Some(n) if body[i + n] == b'\\' => i += n + 2,
                        Some(n) => {
                            i += n;
                            break;
                        }
                    }
                    if i >= body.len() {
                        return false;
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    false
}

/// Reads the routing fields of a request body as its `Content-Type` says it is written:
/// a `multipart/form-data` form (the audio endpoints), else JSON (see [`inspect`]).
pub fn inspect_request(
    content_type: Option<&[u8]>,
    body: &[u8],
    max_depth: usize,
) -> Result<RoutingInfo, ApiError> {
    match content_type.and_then(crate::openai::form::boundary) {
        None => inspect(body, max_depth),
        Some(Ok(boundary)) => inspect_form(body, &boundary),
        Some(Err(why)) => Err(ApiError::bad_request(format!("{why}."), None)),
    }
}

/// Reads the routing fields of a `multipart/form-data` body, as vLLM's audio endpoints
/// take it: `model`, `stream`, `stream_include_usage`, `max_completion_tokens` and the
/// text `prompt` are fields (the last counts when one comes twice, as for vLLM); the
/// audio is a file part, which is not read.
pub fn inspect_form(body: &[u8], boundary: &[u8]) -> Result<RoutingInfo, ApiError> {
    let parts = crate::openai::form::parts(body, boundary).map_err(|why| {
        ApiError::bad_request(format!("The request form is malformed: {why}."), None)
    })?;
    let field = |name: &str| crate::openai::form::field(&parts, name);
    let text = |name: &'static str| -> Result<Option<&str>, ApiError> {
        field(name)
            .map(|v| {
                std::str::from_utf8(v).map_err(|_| {
                    ApiError::bad_request(
                        format!("The form field `{name}` is not UTF-8."),
                        Some(name),
                    )
                })
            })
            .transpose()
    };
    let flag = |name: &'static str| -> Result<bool, ApiError> {
        field(name).map_or(Ok(false), |v| {
            crate::openai::form::boolean(v).ok_or_else(|| {
                ApiError::bad_request(
                    format!("The form field `{name}` must be true or false."),
                    Some(name),
                )
            })
        })
    };
    let model = named_model(text("model")?);
    let stream = flag("stream")?;
    let include_usage = flag("stream_include_usage")?;
    let max_tokens = match text("max_completion_tokens")? {
        None => None,
        Some(v) => Some(v.trim().parse::<u64>().map_err(|_| {
            ApiError::bad_request(
                "The form field `max_completion_tokens` must be a whole number.",
                Some("max_completion_tokens"),
            )
        })?),
    };
    Ok(RoutingInfo {
        model,
        stream,
        // The text prompt only: audio becomes a fixed number of encoder tokens per
        // second of sound, which its bytes do not tell (the encoding varies).
        prompt_bytes: field("prompt").map_or(0, <[u8]>::len),
        max_tokens,
        // A transcription's usage counts seconds of audio, not tokens; a stream's final
        // chunk counts tokens when asked.
        usage_reported: stream && include_usage,
        spans: Default::default(),
    })
}

/// Reads the routing fields of a request body whose arrays and objects nest at most
/// `max_depth` deep. Every failure is a client error with a message that says what to
/// fix.
pub fn inspect(body: &[u8], max_depth: usize) -> Result<RoutingInfo, ApiError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::bad_request(
            "The request body is empty; send a JSON object with a `model` field.",
            None,
        ));
    }
    if json_depth_exceeds(body, max_depth) {
        return Err(ApiError::too_deep(max_depth));
    }

    // The common case, a valid body, is read without tracking the path; a failure is read
    // again with it, for a message that names the field.
    if let Ok(probe) = serde_json::from_slice::<Probe>(body) {
        return routing_info(body, probe);
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let probe: Probe = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        let param = [
            "model",
            "stream",
            "max_tokens",
            "max_completion_tokens",
            "stream_options",
        ]
        .into_iter()
        .find(|f| field.split(['.', '[']).next() == Some(*f));
        let inner = e.into_inner();
        let what = if inner.is_data() {
            "The request body has a field of the wrong type"
        } else {
            "The request body is not valid JSON"
        };
        let at = if param.is_some() {
            format!(" (`{field}`)")
        } else {
            String::new()
        };
        ApiError::bad_request(format!("{what}{at}: {inner}."), param)
    })?;
    de.end().map_err(|e| {
        ApiError::bad_request(format!("The request body is not valid JSON: {e}."), None)
    })?;
    routing_info(body, probe)
}

/// Where the affinity-relevant fields are in a request body (byte ranges of their JSON
/// text), found while the body is inspected; the key is computed from them only when
/// affinity is in use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodySpans {
    pub messages: Option<Range<usize>>,
    pub prompt: Option<Range<usize>>,
    pub user: Option<Range<usize>>,
}

/// The `model` a request names (in its JSON `body` or its `form`); empty when it names
/// none (no field, `null` or an empty name), which vLLM serves with its first model: see
/// [`route_model`].
fn named_model(model: Option<&str>) -> String {
    model.unwrap_or_default().to_string()
}

/// The routing fields of a well-formed body's `probe`.
fn routing_info<'a>(body: &'a [u8], probe: Probe<'a>) -> Result<RoutingInfo, ApiError> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        // Serde reads an array as the fields in order.
        return Err(ApiError::bad_request(
            "The request body must be a JSON object.",
            None,
        ));
    }
    let model = named_model(probe.model.as_deref());
    let prompt_bytes = [
        probe.messages,
        probe.prompt,
        probe.input,
        probe.text,
        probe.tokens,
    ]
    .iter()
    .flatten()
    .map(|r| r.get().len())
    .sum();
    let stream = probe.stream.unwrap_or(false);
    let include_usage = probe
        .stream_options
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    // The fields' JSON text lies inside `body`: their offsets locate them.
    let span = |r: Option<&RawValue>| {
        let r = r?;
        let start = (r.get().as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
        let end = start + r.get().len();
        (end <= body.len()).then_some(start..end)
    };
    Ok(RoutingInfo {
        model,
        stream,
        prompt_bytes,
        max_tokens: probe.max_completion_tokens.or(probe.max_tokens),
        usage_reported: !stream || include_usage,
        spans: BodySpans {
            messages: span(probe.messages),
            prompt: span(probe.prompt),
            user: span(probe.user),
        },
    })
}
