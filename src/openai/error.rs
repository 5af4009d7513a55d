//! Errors in the shape vLLM and OpenAI clients expect.

use bytes::Bytes;

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
