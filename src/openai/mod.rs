//! The OpenAI API as vLLM serves it: which routes exist, what the gateway reads from a
//! request body to route it, and the error bodies clients expect.

pub mod form;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// What the gateway does with a (method, path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A POST whose JSON body names a `model`: proxied to a replica serving it.
    Inference,
    /// `GET /v1/models`: the union of the fleet's models, answered locally.
    Models,
    /// `GET /health` (and `/ping`, vLLM's alias of it): answered locally.
    Health,
    /// `GET /version`: the fleet's vLLM version, answered locally.
    Version,
    /// `GET /load`: this gateway's requests in flight, in vLLM's shape, answered locally.
    Load,
    /// A known path with the wrong method.
    MethodNotAllowed(&'static str),
    NotFound,
}

/// POST endpoints of vLLM's server that carry a `model` field (in a JSON body, or in a
/// `multipart/form-data` one for the audio endpoints).
const INFERENCE_PATHS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/chat/completions/render",
    "/v1/completions/render",
    "/tokenize",
    "/detokenize",
    "/pooling",
    "/classify",
    "/score",
    "/v1/score",
    "/rerank",
    "/v1/rerank",
    "/v2/rerank",
    "/inference/v1/generate",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
];

pub fn route(method: &http::Method, path: &str) -> Route {
    // The query string plays no part in routing.
    let path = path.split('?').next().unwrap_or(path);
    let path = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    if INFERENCE_PATHS.contains(&path) {
        return if method == http::Method::POST {
            Route::Inference
        } else {
            Route::MethodNotAllowed("POST")
        };
    }
    match path {
        // vLLM answers `/ping` (SageMaker's health check) as `/health`, to GET and POST.
        "/ping" if method == http::Method::GET || method == http::Method::POST => Route::Health,
        "/ping" => Route::MethodNotAllowed("GET, POST"),
        "/v1/models" | "/health" | "/version" | "/load" => {
            if method == http::Method::GET || method == http::Method::HEAD {
                match path {
                    "/health" => Route::Health,
                    "/version" => Route::Version,
                    "/load" => Route::Load,
                    _ => Route::Models,
                }
            } else {
                Route::MethodNotAllowed("GET")
            }
        }
        _ => Route::NotFound,
    }
}

/// What routing needs from a request body. Parsed without building a JSON tree of the
/// prompt: the prompt fields are only measured, as raw JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingInfo {
    /// The model named; empty when the request names none ([`route_model`]).
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
    pub spans: crate::routing::affinity::BodySpans,
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

/// The `model` a request names (in its JSON `body` or its `form`); empty when it names
/// none (no field, `null` or an empty name), which vLLM serves with its first model: see
/// [`route_model`].
fn named_model(model: Option<&str>) -> String {
    model.unwrap_or_default().to_string()
}

/// A request whose body the gateway rewrote to name the model it is routed by
/// ([`route_model`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renamed {
    pub body: Vec<u8>,
    /// Its routing fields, read again from `body`.
    pub info: RoutingInfo,
    /// It named no model and got the default.
    pub defaulted: bool,
    /// It named this alias (`routing.model_aliases`) of the model it now names.
    pub alias: Option<String>,
}

/// The model a request (read by [`inspect_request`]) is routed by and sent as:
/// - the one it names;
/// - when it names none ([`RoutingInfo::model`] empty), the `default`
///   ([`crate::fleet::FleetSnapshot::default_model`]): vLLM would serve it with its own
///   first model;
/// - for an alias (in `aliases`, the default included), the model it stands for.
///
/// In the last two cases the model is written into the body ([`with_model`]), so that it
/// is the same wherever the request goes and the one it was routed by (also an adapter);
/// `None` when the body stays as it is.
pub fn route_model<'a>(
    content_type: Option<&[u8]>,
    body: &[u8],
    info: &'a RoutingInfo,
    aliases: &'a std::collections::BTreeMap<String, String>,
    default: impl FnOnce() -> Result<&'a str, Vec<&'a str>>,
    max_depth: usize,
) -> Result<Option<Renamed>, ApiError> {
    let defaulted = info.model.is_empty();
    let asked = if defaulted {
        default().map_err(|firsts| ApiError::no_default_model(&firsts))?
    } else {
        info.model.as_str()
    };
    let target = aliases.get(asked);
    if !defaulted && target.is_none() {
        return Ok(None);
    }
    let model = target.map_or(asked, String::as_str);
    let (body, info) = with_model(content_type, body, model, max_depth)?;
    Ok(Some(Renamed {
        body,
        info,
        defaulted,
        alias: target.map(|_| asked.to_string()),
    }))
}

/// A request (read by [`inspect_request`] already) made to name `model`: its body with the
/// model written in, and its routing fields read again. A JSON body's `model` is set (or
/// put first when absent); a form gets a `model` field after its others, which counts.
pub fn with_model(
    content_type: Option<&[u8]>,
    body: &[u8],
    model: &str,
    max_depth: usize,
) -> Result<(Vec<u8>, RoutingInfo), ApiError> {
    let named = match content_type.and_then(crate::openai::form::boundary) {
        Some(Ok(boundary)) => crate::openai::form::with_field(body, &boundary, "model", model)
            .map_err(|why| {
                ApiError::bad_request(format!("The request form is malformed: {why}."), None)
            })?,
        _ => json_with_model(body, model).ok_or_else(|| {
            ApiError::bad_request("The request body must be a JSON object.", None)
        })?,
    };
    let info = inspect_request(content_type, &named, max_depth)?;
    Ok((named, info))
}

/// A JSON object `body` with its `model` member's value replaced by `model`, or the member
/// put first when there is none; `None` if `body` is not an object.
fn json_with_model(body: &[u8], model: &str) -> Option<Vec<u8>> {
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[open] != b'{' {
        return None;
    }
    let value = serde_json::to_string(model).expect("a string serializes");
    #[derive(Deserialize)]
    struct ModelOnly<'a> {
        #[serde(borrow, default, deserialize_with = "present")]
        model: Option<&'a RawValue>,
    }
    /// The member's raw text, `null` included (an `Option` alone reads it as absent).
    fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
        <&RawValue>::deserialize(d).map(Some)
    }
    // The other members are skipped as `inspect` skips them (strings not checked for
    // UTF-8: vLLM answers for what it cannot decode).
    let found: ModelOnly = serde_json::from_slice(body).ok()?;
    let (at, replaced, member) = match found.model {
        Some(raw) => {
            let start = (raw.get().as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
            (start, raw.get().len(), value)
        }
        None => {
            let empty = body[open + 1..]
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .is_some_and(|&b| b == b'}');
            let sep = if empty { "" } else { "," };
            (open + 1, 0, format!("\"model\":{value}{sep}"))
        }
    };
    let mut out = Vec::with_capacity(body.len() + member.len());
    out.extend_from_slice(&body[..at]);
    out.extend_from_slice(member.as_bytes());
    out.extend_from_slice(body.get(at + replaced..)?);
    Some(out)
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
        spans: crate::routing::affinity::BodySpans {
            messages: span(probe.messages),
            prompt: span(probe.prompt),
            user: span(probe.user),
        },
    })
}

/// An error in the shape vLLM and OpenAI clients expect:
/// `{"error":{"message","type","param","code"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
        }
    }
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            param,
            ..Self::new(400, "BadRequestError", message)
        }
    }
    pub fn model_not_found(model: &str) -> Self {
        ApiError {
            param: Some("model"),
            ..Self::new(
                404,
                "NotFoundError",
                // The requested name is echoed (the client sent it); the fleet's models are
                // not listed: GET /v1/models is where a client learns them.
                format!(
                    "The model `{}` does not exist on this gateway; GET /v1/models lists the \
                     available models.",
                    truncate(model, 200)
                ),
            )
        }
    }
    pub fn not_found_route(path: &str) -> Self {
        Self::new(
            404,
            "NotFoundError",
            format!("No route for `{}`.", truncate(path, 200)),
        )
    }
    pub fn method_not_allowed(allow: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowedError",
            format!("Method not allowed; this route accepts {allow}."),
        )
    }
    pub fn body_too_large(limit: usize) -> Self {
        Self::new(
            413,
            "RequestEntityTooLargeError",
            format!("The request body exceeds the gateway's limit of {limit} bytes."),
        )
    }
    pub fn length_required(limit: usize) -> Self {
        Self::new(
            411,
            "LengthRequiredError",
            format!(
                "Request bodies over {limit} bytes need a Content-Length header \
                 (chunked uploads can only be replayed to another replica up to that size)."
            ),
        )
    }
    pub fn too_deep(max_depth: usize) -> Self {
        ApiError::bad_request(
            format!(
                "The request body's JSON nests deeper than {max_depth} levels \
                 (limits.max_json_depth)."
            ),
            None,
        )
    }

    pub fn header_too_large(message: String) -> Self {
        ApiError::new(431, "RequestHeaderFieldsTooLargeError", message)
    }

    pub fn body_timeout() -> Self {
        Self::new(
            408,
            "RequestTimeoutError",
            "The request body was not received in time: it stalled, or came too slowly.",
        )
    }
    pub fn no_backend(model: &str) -> Self {
        Self::new(
            503,
            "ServiceUnavailableError",
            format!(
                "No healthy replica can serve `{}` right now; retry later.",
                truncate(model, 200)
            ),
        )
    }
    /// A request that names no model when the gateway has no default for it: the
    /// replicas in rotation serve different models first (`firsts`), or none lists a model.
    pub fn no_default_model(firsts: &[&str]) -> Self {
        if firsts.is_empty() {
            return Self::new(
                503,
                "ServiceUnavailableError",
                "The request names no `model`, and no replica lists a model yet; retry later.",
            );
        }
        ApiError {
            param: Some("model"),
            ..Self::bad_request(
                "The request names no `model`, and this gateway serves more than one; name \
                 one (GET /v1/models lists them).",
                None,
            )
        }
    }
    pub fn missing_api_key() -> Self {
        Self::new(
            401,
            "AuthenticationError",
            "No API key was provided; send it as `Authorization: Bearer KEY`.",
        )
    }
    pub fn invalid_api_key() -> Self {
        Self::new(401, "AuthenticationError", "The API key is not valid.")
    }
    pub fn rate_limited(message: impl Into<String>) -> Self {
        Self::new(429, "RateLimitError", message)
    }
    pub fn upstream(status: u16) -> Self {
        let (kind, msg) = match status {
            504 => ("GatewayTimeoutError", "The replica did not answer in time."),
            503 => (
                "ServiceUnavailableError",
                "No replica could take the request; retry later.",
            ),
            _ => ("BadGatewayError", "The replica failed before answering."),
        };
        Self::new(status, kind, msg)
    }

    /// For a stream cut by its replica after the response began.
    pub fn mid_stream(timed_out: bool) -> Self {
        if timed_out {
            Self::new(
                504,
                "GatewayTimeoutError",
                "The replica stopped sending tokens; the stream was ended.",
            )
        } else {
            Self::new(
                502,
                "BadGatewayError",
                "The replica failed in the middle of the stream.",
            )
        }
    }

    /// The error as the end of an event stream, the way vLLM reports mid-stream failures:
    /// an error event, then `[DONE]`.
    pub fn stream_event(&self) -> Bytes {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&self.body());
        out.extend_from_slice(b"\n\ndata: [DONE]\n\n");
        Bytes::from(out)
    }

    pub fn body(&self) -> Bytes {
        let v = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.status,
            }
        });
        Bytes::from(serde_json::to_vec(&v).expect("serializing a json! value"))
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The body of `GET /v1/models` for a list of model ids, in vLLM's shape.
pub fn models_body(cards: &[serde_json::Value]) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&serde_json::json!({"object": "list", "data": cards}))
            .expect("serializing a json! value"),
    )
}

/// The entry of `/v1/models` for a model no replica described (its models are listed in
/// the config).
pub fn model_card(id: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "vllm"})
}

/// The version in a `/version` answer (`{"version":"0.32.0"}`).
pub fn parse_version(body: &[u8]) -> Result<String, String> {
    #[derive(Deserialize)]
    struct Version {
        version: String,
    }
    let v: Version = serde_json::from_slice(body).map_err(|e| format!("bad /version: {e}"))?;
    let ok = !v.version.is_empty()
        && v.version.len() <= 64
        && v.version.bytes().all(|c| c.is_ascii_graphic());
    if ok {
        Ok(v.version)
    } else {
        Err(format!("bad /version: {:?}", v.version))
    }
}

/// The version the fleet as a whole offers: the oldest of `versions` (a client that
/// checks it must not count on what only the newer replicas of a rolling upgrade have).
/// Versions are compared by their leading dotted numbers (`0.32.0`, `0.11.1rc2.dev4`),
/// then as text.
pub fn oldest_version<'a>(versions: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    fn key(v: &str) -> Vec<u64> {
        v.split('.')
            .map_while(|part| {
                let digits =
                    part.len() - part.trim_start_matches(|c: char| c.is_ascii_digit()).len();
                part[..digits].parse().ok()
            })
            .collect()
    }
    versions
        .into_iter()
        .min_by(|a, b| key(a).cmp(&key(b)).then_with(|| a.cmp(b)))
}

/// The entries of a `/v1/models` answer as the server wrote them (vLLM's carry
/// `max_model_len`, `root`, and `parent` for a LoRA adapter), each an object with a string
/// `id`.
pub fn parse_models(body: &[u8]) -> Result<Vec<serde_json::Value>, String> {
    #[derive(Deserialize)]
    struct List {
        data: Vec<serde_json::Value>,
    }
    let list: List = serde_json::from_slice(body).map_err(|e| format!("bad /v1/models: {e}"))?;
    if let Some(bad) = list.data.iter().find(|c| card_id(c).is_none()) {
        return Err(format!(
            "bad /v1/models: an entry without a string `id`: {bad:.80}"
        ));
    }
    Ok(list.data)
}

/// The `id` of a `/v1/models` entry.
pub fn card_id(card: &serde_json::Value) -> Option<&str> {
    card.get("id")?.as_str()
}

/// Token counts from a response's `usage` object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

/// How much of a response's end is kept to find its `usage`: vLLM writes it last (the
/// final stream event before `[DONE]`, or near the end of the JSON object), followed by a
/// few hundred bytes at most.
const USAGE_TAIL_BYTES: usize = 2048;

/// The last bytes of a response body, from which its `usage` is read at the end. Kept
/// as the response passes, so the body is never buffered whole.
#[derive(Debug, Default)]
pub struct UsageTail {
    buf: Vec<u8>,
}

impl UsageTail {
    pub fn push(&mut self, chunk: &[u8]) {
        if chunk.len() >= USAGE_TAIL_BYTES {
            self.buf.clear();
            self.buf
                .extend_from_slice(&chunk[chunk.len() - USAGE_TAIL_BYTES..]);
            return;
        }
        let excess = (self.buf.len() + chunk.len()).saturating_sub(USAGE_TAIL_BYTES);
        self.buf.drain(..excess);
        self.buf.extend_from_slice(chunk);
    }

    /// The last `"usage": {...}` object in the tail. Inside JSON strings a quote is
    /// always escaped, so generated text cannot fake the key.
    pub fn usage(&self) -> Option<Usage> {
        const KEY: &[u8] = b"\"usage\"";
        let buf = &self.buf[..];
        let mut end = buf.len();
        while let Some(at) = buf[..end].windows(KEY.len()).rposition(|w| w == KEY) {
            end = at;
            let rest = &buf[at + KEY.len()..];
            let Some(colon) = rest.iter().position(|b| !b.is_ascii_whitespace()) else {
                continue;
            };
            if rest[colon] != b':' {
                continue;
            }
            let mut values = serde_json::Deserializer::from_slice(&rest[colon + 1..])
                .into_iter::<Option<Usage>>();
            if let Some(Ok(Some(u))) = values.next() {
                return Some(u);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn inspects_routing_fields_only() {
        let body = br#"{"messages":[{"role":"user","content":"hi \"there\""}],"model":"m\u00e9","stream":true,"max_tokens":5,"max_completion_tokens":7,"temperature":0.2}"#;
        let info = inspect(body, 64).unwrap();
        assert_eq!(info.model, "mé");
        assert!(info.stream);
        assert_eq!(info.max_tokens, Some(7));
        assert_eq!(
            info.prompt_bytes,
            r#"[{"role":"user","content":"hi \"there\""}]"#.len()
        );
    }

    #[test]
    fn client_errors_are_400_with_param() {
        for (body, param) in [
            (&b"{\"model\": 3}"[..], Some("model")),
            (b"{\"model\":\"m\",\"stream\":\"yes\"}", Some("stream")),
            (b"{\"model\":\"m\"", None),
            (b"", None),
            (b"[1,2]", None),
            (b"{\"model\":\"\xff\xfe\"}", Some("model")),
        ] {
            let e = inspect(body, 64).unwrap_err();
            assert_eq!(e.status, 400, "{body:?}");
            assert_eq!(e.param, param, "{body:?}: {}", e.message);
        }
        // Nesting is counted over the whole document, the object itself included.
        let nested = |n: usize, field: &str| {
            format!(
                "{{\"model\":\"m\",\"{field}\":{}{}}}",
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        assert_eq!(
            inspect(nested(63, "messages").as_bytes(), 64)
                .unwrap()
                .prompt_bytes,
            126
        );
        for (n, field) in [(64, "messages"), (10_000, "messages"), (10_000, "model")] {
            let e = inspect(nested(n, field).as_bytes(), 64).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.contains("deeper than 64"), "{}", e.message);
        }
        // Brackets inside strings, escaped quotes included, are text.
        let text = format!(
            "{{\"model\":\"m\",\"prompt\":\"\\\"{}\"}}",
            "[".repeat(1000)
        );
        assert!(inspect(text.as_bytes(), 2).is_ok());
    }

    #[test]
    fn routes() {
        use http::Method;
        assert_eq!(
            route(&Method::POST, "/v1/chat/completions"),
            Route::Inference
        );
        assert_eq!(route(&Method::POST, "/v1/completions/"), Route::Inference);
        assert_eq!(route(&Method::POST, "/tokenize?x=1"), Route::Inference);
        assert_eq!(
            route(&Method::GET, "/v1/chat/completions"),
            Route::MethodNotAllowed("POST")
        );
        assert_eq!(route(&Method::GET, "/v1/models"), Route::Models);
        assert_eq!(route(&Method::GET, "/health"), Route::Health);
        assert_eq!(route(&Method::GET, "/admin"), Route::NotFound);
        assert_eq!(
            route(&Method::POST, "/v1/audio/transcriptions"),
            Route::Inference
        );
        assert_eq!(
            route(&Method::POST, "/v1/audio/translations"),
            Route::Inference
        );
        assert_eq!(route(&Method::GET, "/ping"), Route::Health);
        assert_eq!(route(&Method::POST, "/ping"), Route::Health);
        assert_eq!(
            route(&Method::DELETE, "/ping"),
            Route::MethodNotAllowed("GET, POST")
        );
        assert_eq!(route(&Method::GET, "/version"), Route::Version);
        assert_eq!(route(&Method::HEAD, "/load"), Route::Load);
        assert_eq!(
            route(&Method::POST, "/load"),
            Route::MethodNotAllowed("GET")
        );
    }

    #[test]
    fn versions_are_read_and_the_oldest_is_the_fleets() {
        let fixture = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/vllm-0.32/version.json"
        ))
        .unwrap();
        assert_eq!(parse_version(&fixture).unwrap(), "0.32.0");
        for bad in [
            &b"{}"[..],
            b"{\"version\":\"\"}",
            b"{\"version\":\"0.1 <b>\"}",
            b"not json",
        ] {
            assert!(parse_version(bad).is_err(), "{bad:?}");
        }
        let oldest = |v: &[&'static str]| oldest_version(v.iter().copied());
        assert_eq!(
            oldest(&["0.32.0", "0.9.2", "0.32.1"]),
            Some("0.9.2"),
            "by number, not text"
        );
        assert_eq!(
            oldest(&["0.11.1rc2.dev4+g1", "0.11.2"]),
            Some("0.11.1rc2.dev4+g1")
        );
        assert_eq!(oldest(&["0.32.0"]), Some("0.32.0"));
        assert_eq!(oldest(&[]), None);
    }

    /// A form whose file part is named `model` (and holds JSON naming another model).
    fn form(fields: &[(&str, &str)]) -> Vec<u8> {
        crate::openai::form::encode(
            "XB",
            fields,
            "model",
            b"RIFF\x00\x01{\"model\":\"not this\"}",
        )
    }

    /// `route_model` for a request that names no model, without aliases.
    fn default_to(
        ct: Option<&[u8]>,
        body: &[u8],
        default: Result<&str, Vec<&str>>,
    ) -> Result<(Vec<u8>, RoutingInfo), ApiError> {
        let info = inspect_request(ct, body, 64)?;
        let none = Default::default();
        let r = route_model(ct, body, &info, &none, || default, 64)?.expect("renamed");
        assert!(r.defaulted && r.alias.is_none());
        Ok((r.body, r.info))
    }

    #[test]
    fn an_alias_is_sent_as_its_model_and_a_default_may_be_one() {
        let aliases: std::collections::BTreeMap<String, String> =
            [("gpt-4o".to_string(), "llama".to_string())].into();
        let route = |body: &str, default: &'static str| {
            let info = inspect(body.as_bytes(), 64).unwrap();
            route_model(None, body.as_bytes(), &info, &aliases, || Ok(default), 64).unwrap()
        };
        let r = route(r#"{"model":"gpt-4o","prompt":"p"}"#, "x").unwrap();
        assert_eq!(
            (r.info.model.as_str(), r.alias.as_deref(), r.defaulted),
            ("llama", Some("gpt-4o"), false)
        );
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v, json!({"model": "llama", "prompt": "p"}));
        assert_eq!(
            route(r#"{"model":"llama"}"#, "x"),
            None,
            "a model is sent as it is"
        );
        let r = route(r#"{"prompt":"p"}"#, "gpt-4o").unwrap();
        assert_eq!(
            (r.info.model.as_str(), r.alias.as_deref(), r.defaulted),
            ("llama", Some("gpt-4o"), true)
        );
    }

    #[test]
    fn a_request_naming_no_model_gets_the_default_written_in() {
        let read = |body: &str| {
            let info = inspect(body.as_bytes(), 64).unwrap();
            assert_eq!(info.model, "", "names none: {body}");
            let (named, info) = default_to(None, body.as_bytes(), Ok("llama \"3\""))
                .unwrap_or_else(|e| panic!("{body}: {e:?}"));
            assert_eq!(info.model, "llama \"3\"");
            let v: serde_json::Value = serde_json::from_slice(&named).unwrap();
            (v, info)
        };
        let (v, info) = read(r#" {"messages":[{"role":"user","content":"hi"}],"stream":true}"#);
        assert_eq!(v["messages"][0]["content"], "hi");
        assert!(info.stream, "the other fields are read again");
        let body = br#"{"prompt":"abc","model":null,"user":"u"}"#;
        let (v, _) = read(std::str::from_utf8(body).unwrap());
        assert_eq!((&v["prompt"], &v["user"]), (&json!("abc"), &json!("u")));
        // The affinity key's spans are in the new body.
        let (named, info) = default_to(None, body, Ok("m")).unwrap();
        assert_eq!(&named[info.spans.user.unwrap()], b"\"u\"");
        assert_eq!(&named[info.spans.prompt.unwrap()], b"\"abc\"");
        read(r#"{"model":"","prompt":"x"}"#);
        // Bytes that are not UTF-8 in a field the gateway does not read stay as they are.
        let body = b"{\"x\":{\"k\xc6_\":1},\"model\":null}";
        let (named, info) = default_to(None, body, Ok("m")).unwrap();
        assert_eq!(info.model, "m");
        assert_eq!(&named[..], b"{\"x\":{\"k\xc6_\":1},\"model\":\"m\"}");
        read(" { } ");
        // Only a request that names none is changed: one that names a model is routed by
        // it (a name no replica serves is a 404 there).
        let info = inspect(br#"{"model":"other"}"#, 64).unwrap();
        assert_eq!(info.model, "other");
        // No default: several first models are the client's to choose from; none is a
        // fleet not ready yet.
        let e = default_to(None, b"{}", Err(vec!["a", "b"])).unwrap_err();
        assert_eq!((e.status, e.param), (400, Some("model")), "{e:?}");
        assert!(e.message.contains("GET /v1/models"), "{e:?}");
        let e = default_to(None, b"{}", Err(vec![])).unwrap_err();
        assert_eq!(e.status, 503, "{e:?}");
        // A form gets the field.
        let ct = Some(&b"multipart/form-data; boundary=XB"[..]);
        for body in [form(&[]), form(&[("model", ""), ("stream", "1")])] {
            assert_eq!(inspect_request(ct, &body, 64).unwrap().model, "");
            let (named, info) = default_to(ct, &body, Ok("whisper")).unwrap();
            assert_eq!(info.model, "whisper");
            assert!(named.len() > body.len());
        }
    }

    #[test]
    fn forms_are_read_for_their_routing_fields() {
        let ct = Some(&b"multipart/form-data; boundary=XB"[..]);
        let body = form(&[
            ("model", "first"),
            ("prompt", "names: Zoë"),
            ("model", "whisper-large"),
            ("stream", "True"),
            ("stream_include_usage", "1"),
            ("max_completion_tokens", " 64 "),
        ]);
        let info = inspect_request(ct, &body, 64).unwrap();
        // The last `model` field counts, as for vLLM; the file part named `model` does not.
        assert_eq!(info.model, "whisper-large");
        assert!(info.stream && info.usage_reported);
        assert_eq!(info.max_tokens, Some(64));
        assert_eq!(info.prompt_bytes, "names: Zoë".len());
        let info = inspect_request(ct, &form(&[("model", "w")]), 64).unwrap();
        assert!(!info.stream && !info.usage_reported);
        assert_eq!((info.max_tokens, info.prompt_bytes), (None, 0));
        // Without a form content type the same bytes are (invalid) JSON.
        let e = inspect_request(Some(b"application/json"), &body, 64).unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{e:?}");
    }

    #[test]
    fn bad_forms_are_400_naming_what_to_fix() {
        let ct = Some(&b"multipart/form-data; boundary=XB"[..]);
        for (ct, body, param, says) in [
            (
                ct,
                form(&[("model", "m"), ("stream", "maybe")]),
                Some("stream"),
                "true or false",
            ),
            (
                ct,
                form(&[("model", "m"), ("max_completion_tokens", "-1")]),
                Some("max_completion_tokens"),
                "whole number",
            ),
            (ct, b"--XB\r\n\r\ncut".to_vec(), None, "malformed"),
            (
                Some(&b"multipart/form-data"[..]),
                form(&[("model", "m")]),
                None,
                "no boundary",
            ),
        ] {
            let e = inspect_request(ct, &body, 64).unwrap_err();
            assert_eq!((e.status, e.param), (400, param), "{e:?}");
            assert!(e.message.contains(says), "{e:?}");
        }
        let mut bad = form(&[]);
        bad.splice(
            0..0,
            b"--XB\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\n\xff\r\n"
                .iter()
                .copied(),
        );
        let e = inspect_request(ct, &bad, 64).unwrap_err();
        assert!(e.message.contains("not UTF-8"), "{e:?}");
    }

    #[test]
    fn error_shape_matches_vllm() {
        let b = ApiError::model_not_found("nope").body();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["error"]["type"], "NotFoundError");
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(v["error"]["code"], 404);
        assert!(v["error"]["message"].as_str().unwrap().contains("nope"));
    }

    #[test]
    fn parses_the_real_models_fixture() {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/vllm-0.32/models.json"
        );
        let text = std::fs::read(p).unwrap_or_else(|e| panic!("{p}: {e}"));
        let cards = parse_models(&text).unwrap();
        assert_eq!(cards.len(), 1);
        assert_eq!(card_id(&cards[0]), Some("tiny-llama"));
        assert_eq!(
            cards[0]["max_model_len"], 2048,
            "kept as the server wrote it"
        );
        assert_eq!(cards[0]["root"], "/models/tiny-llama");
        for bad in [
            &br#"{"data":[{"object":"model"}]}"#[..],
            br#"{"data":[{"id":3}]}"#,
            b"{}",
        ] {
            assert!(parse_models(bad).is_err(), "{bad:?}");
        }
    }

    fn fixture(name: &str) -> Vec<u8> {
        let p = format!(
            "{}/tests/fixtures/vllm-0.32/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
    }

    fn tail_of(body: &[u8], chunk: usize) -> UsageTail {
        let mut t = UsageTail::default();
        for c in body.chunks(chunk) {
            t.push(c);
        }
        t
    }

    #[test]
    fn usage_is_read_from_the_end_of_real_responses_in_any_chunking() {
        let usage = |p, c| {
            Some(Usage {
                prompt_tokens: p,
                completion_tokens: c,
            })
        };
        for chunk in [1, 7, 100, 4096, 1 << 20] {
            let stream = fixture("chat-stream.sse.txt");
            assert_eq!(
                tail_of(&stream, chunk).usage(),
                usage(14, 8),
                "chunk {chunk}"
            );
            let pretty = fixture("chat-completion.json");
            assert_eq!(
                tail_of(&pretty, chunk).usage(),
                usage(41, 24),
                "chunk {chunk}"
            );
            let compact =
                fixture("completion-prompt-plus-max-tokens-over-limit-is-clamped.http.txt");
            assert_eq!(
                tail_of(&compact, chunk).usage(),
                usage(1881, 167),
                "chunk {chunk}"
            );
            // A stream that did not ask for usage has none.
            let none = fixture("completion-stream.sse.txt");
            assert_eq!(tail_of(&none, chunk).usage(), None, "chunk {chunk}");
        }
    }

    #[test]
    fn generated_text_cannot_fake_usage() {
        let body =
            br#"{"choices":[{"text":"say \"usage\": {\"prompt_tokens\": 9}"}],"usage":null}"#;
        assert_eq!(tail_of(body, 5).usage(), None);
        // A null usage after a real one (continuous stats end) keeps the real one.
        let body = br#"data: {"usage":{"prompt_tokens":3,"completion_tokens":4}}

data: {"usage":null}
"#;
        assert_eq!(
            tail_of(body, 3).usage(),
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 4
            })
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// The depth scan written the obvious way, one byte at a time: the reference
        /// for the faster one.
        fn byte_by_byte(body: &[u8], limit: usize) -> bool {
            let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
            for &b in body {
                if in_string {
                    if escaped {
                        escaped = false;
                    } else if b == b'\\' {
                        escaped = true;
                    } else if b == b'"' {
                        in_string = false;
                    }
                    continue;
                }
                match b {
                    b'"' => in_string = true,
                    b'[' | b'{' => {
                        depth += 1;
                        if depth > limit {
                            return true;
                        }
                    }
                    b']' | b'}' => depth = depth.saturating_sub(1),
                    _ => {}
                }
            }
            false
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Any bytes at all: a routing decision or a 400, never a panic.
            #[test]
            fn any_body_is_read_or_refused_with_400(body in prop::collection::vec(any::<u8>(), 0..512)) {
                match inspect(&body, 64) {
                    // One that names no model gets the default written in.
                    Ok(info) if info.model.is_empty() => {
                        let none = Default::default();
                        let r = route_model(None, &body, &info, &none, || Ok("d"), 64);
                        prop_assert_eq!(r.unwrap().unwrap().info.model, "d");
                    }
                    Ok(_) => {}
                    Err(e) => prop_assert_eq!(e.status, 400),
                }
            }

            /// The default is written into any object that names no model, whatever its
            /// layout, and nothing else changes.
            #[test]
            fn the_model_written_in_is_all_that_changes(
                members in prop::collection::btree_map("[a-z_]{1,8}", "\\PC{0,16}", 0..5),
                unnamed in prop::sample::select(vec!["absent", "null", "empty"]),
                at in 0usize..6,
                pretty in any::<bool>(),
                model in "\\PC{1,24}",
            ) {
                let mut pairs: Vec<(String, serde_json::Value)> = members
                    .into_iter()
                    .filter(|(k, _)| k != "model")
                    .map(|(k, v)| (format!("x_{k}"), v.into()))
                    .collect();
                let given = match unnamed {
                    "null" => Some(serde_json::Value::Null),
                    "empty" => Some("".into()),
                    _ => None,
                };
                if let Some(v) = given {
                    pairs.insert(at.min(pairs.len()), ("model".into(), v));
                }
                let object: serde_json::Map<String, serde_json::Value> = pairs.into_iter().collect();
                let body = if pretty {
                    serde_json::to_vec_pretty(&object).unwrap()
                } else {
                    serde_json::to_vec(&object).unwrap()
                };
                let info = inspect(&body, 64).unwrap();
                prop_assert_eq!(&info.model, "");
                let none = Default::default();
                let r = route_model(None, &body, &info, &none, || Ok(model.as_str()), 64)
                    .unwrap()
                    .unwrap();
                prop_assert_eq!(&r.info.model, &model);
                let mut want = object.clone();
                want.insert("model".into(), model.clone().into());
                let got: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_slice(&r.body).unwrap();
                prop_assert_eq!(got, want);
            }

            /// What a client sends in the routing fields is what routing reads.
            #[test]
            fn routing_fields_are_read_back(
                model in "[a-zA-Z0-9/_.:-]{1,40}",
                stream in any::<bool>(),
                max_tokens in proptest::option::of(0u64..1_000_000),
                content in "\\PC{0,64}",
                extra in prop::collection::btree_map("[a-z_]{1,8}", any::<i64>(), 0..4),
            ) {
                let messages = serde_json::json!([{"role": "user", "content": content}]);
                let mut body = serde_json::Map::new();
                for (k, v) in extra {
                    body.insert(format!("x_{k}"), v.into());
                }
                body.insert("model".into(), model.clone().into());
                body.insert("stream".into(), stream.into());
                body.insert("messages".into(), messages.clone());
                if let Some(m) = max_tokens {
                    body.insert("max_tokens".into(), m.into());
                }
                let bytes = serde_json::to_vec(&body).unwrap();
                let info = inspect(&bytes, 64).unwrap();
                prop_assert_eq!(info.model, model);
                prop_assert_eq!(info.stream, stream);
                prop_assert_eq!(info.max_tokens, max_tokens);
                prop_assert_eq!(info.prompt_bytes, serde_json::to_string(&messages).unwrap().len());
            }

            /// Nesting is refused exactly above the limit, wherever it is.
            #[test]
            fn nesting_is_refused_exactly_above_the_limit(
                depth in 1usize..200,
                limit in 1usize..128,
                field in prop::sample::select(vec!["messages", "prompt", "x_extra"]),
            ) {
                let inner = depth - 1;
                let body = format!(
                    "{{\"model\":\"m\",\"{field}\":{}{}}}",
                    "[".repeat(inner),
                    "]".repeat(inner)
                );
                let body = body.replace("\":}", "\":0}");
                let result = inspect(body.as_bytes(), limit);
                if depth <= limit {
                    prop_assert!(result.is_ok(), "{:?}", result);
                } else {
                    prop_assert_eq!(result.unwrap_err(), ApiError::too_deep(limit));
                }
            }

            /// Brackets and quotes inside strings are text, not structure.
            #[test]
            fn strings_do_not_count_as_nesting(s in "\\PC{0,64}") {
                let body = serde_json::to_vec(&serde_json::json!({"model": "m", "prompt": s})).unwrap();
                prop_assert!(!json_depth_exceeds(&body, 1));
            }

            /// The string-skipping scan agrees with a plain byte-by-byte one on any text,
            /// valid JSON or not (escapes at the end, unterminated strings, stray quotes).
            #[test]
            fn the_fast_depth_scan_agrees_with_a_byte_by_byte_one(
                body in prop::collection::vec(
                    prop::sample::select(b"[]{}\"\\ a,:".to_vec()), 0..64),
                limit in 0usize..6,
            ) {
                prop_assert_eq!(json_depth_exceeds(&body, limit), byte_by_byte(&body, limit));
            }
        }
    }
}
