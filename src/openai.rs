//! The OpenAI API as vLLM serves it: which routes exist, what the gateway reads from a
//! request body to route it, and the error bodies clients expect.

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
    /// `GET /health`: answered locally.
    Health,
    /// A known path with the wrong method.
    MethodNotAllowed(&'static str),
    NotFound,
}

/// POST endpoints of vLLM's server that carry a `model` field.
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
        "/v1/models" | "/health" => {
            if method == http::Method::GET || method == http::Method::HEAD {
                if path == "/health" {
                    Route::Health
                } else {
                    Route::Models
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
    pub model: String,
    pub stream: bool,
    /// Bytes of JSON text in the prompt-carrying fields (`messages`, `prompt`, `input`, ...):
    /// a cheap proxy for prompt length.
    pub prompt_bytes: usize,
    /// `max_completion_tokens` if given, else `max_tokens`.
    pub max_tokens: Option<u64>,
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
}

/// Reads the routing fields of a request body. Every failure is a client error with a
/// message that says what to fix.
pub fn inspect(body: &[u8]) -> Result<RoutingInfo, ApiError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::bad_request(
            "The request body is empty; send a JSON object with a `model` field.",
            None,
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let probe: Probe = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        let param = ["model", "stream", "max_tokens", "max_completion_tokens"]
            .into_iter()
            .find(|f| *f == field);
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
    let model = match probe.model {
        Some(m) if !m.is_empty() => m.into_owned(),
        Some(_) => {
            return Err(ApiError::bad_request(
                "`model` must not be empty.",
                Some("model"),
            ))
        }
        None => {
            return Err(ApiError::bad_request(
                "The request body has no `model` field; the gateway routes by model.",
                Some("model"),
            ))
        }
    };
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
    Ok(RoutingInfo {
        model,
        stream: probe.stream.unwrap_or(false),
        prompt_bytes,
        max_tokens: probe.max_completion_tokens.or(probe.max_tokens),
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
    pub fn body_timeout() -> Self {
        Self::new(
            408,
            "RequestTimeoutError",
            "The request body was not received in time.",
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
pub fn models_body(models: &[String]) -> Bytes {
    let data: Vec<_> = models
        .iter()
        .map(|m| serde_json::json!({"id": m, "object": "model", "created": 0, "owned_by": "vllm"}))
        .collect();
    Bytes::from(
        serde_json::to_vec(&serde_json::json!({"object": "list", "data": data}))
            .expect("serializing a json! value"),
    )
}

/// The model ids in a `/v1/models` answer.
pub fn parse_models(body: &[u8]) -> Result<Vec<String>, String> {
    #[derive(Deserialize)]
    struct List {
        data: Vec<Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        id: String,
    }
    let list: List = serde_json::from_slice(body).map_err(|e| format!("bad /v1/models: {e}"))?;
    Ok(list.data.into_iter().map(|e| e.id).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspects_routing_fields_only() {
        let body = br#"{"messages":[{"role":"user","content":"hi \"there\""}],"model":"m\u00e9","stream":true,"max_tokens":5,"max_completion_tokens":7,"temperature":0.2}"#;
        let info = inspect(body).unwrap();
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
            (b"{\"messages\":[]}", Some("model")),
            (b"{\"model\":\"m\"", None),
            (b"", None),
            (b"[1,2]", None),
            (b"{\"model\":\"\xff\xfe\"}", Some("model")),
        ] {
            let e = inspect(body).unwrap_err();
            assert_eq!(e.status, 400, "{body:?}");
            assert_eq!(e.param, param, "{body:?}: {}", e.message);
        }
        // Deep nesting inside a prompt field is only skipped (iteratively, no recursion):
        // measured and forwarded, for vLLM to judge.
        let deep = format!(
            "{{\"model\":\"m\",\"messages\":{}{}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert_eq!(inspect(deep.as_bytes()).unwrap().prompt_bytes, 20_000);
        // In a field we parse, it is a type error.
        let deep_model = format!("{{\"model\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(inspect(deep_model.as_bytes()).unwrap_err().status, 400);
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
            "/../shared/fixtures/vllm-0.32/models.json"
        );
        let text = std::fs::read(p).unwrap_or_else(|e| panic!("{p}: {e}"));
        assert_eq!(parse_models(&text).unwrap(), vec!["tiny-llama".to_string()]);
    }
}
