//! The OpenAI API as vLLM serves it: which routes exist, what the gateway reads from a
//! request body to route it, and the error bodies clients expect.
//!
//! Uses nothing of the crate but the config's types; the fleet and routing use it.

pub mod error;
pub mod form;
pub mod inspect;
pub mod models;
pub mod rewrite;
#[cfg(test)]
mod tests;
pub mod usage;

pub use error::ApiError;
pub use inspect::{
    inspect, inspect_form, inspect_request, json_depth_exceeds, BodySpans, RoutingInfo,
};
pub use models::models_body;
pub use rewrite::{route_model, with_model, with_priority, Renamed};
pub use usage::{Usage, UsageTail};

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
