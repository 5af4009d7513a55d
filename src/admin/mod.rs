//! The admin listener (loopback by default, separate from the data plane): `/health`,
//! `/ready`, `/metrics`, `/load-stats`, `/explain` (a dry run of the selection for a
//! request body), `/dashboard`, and vLLM's `/v1/load_lora_adapter` and
//! `/v1/unload_lora_adapter` for the whole fleet (`crate::admin::lora`). With `admin.token_file` set,
//! everything but `/health`, `/ready` and the dashboard's page requires
//! `Authorization: Bearer TOKEN`. The page holds no data: it asks for the token and sends
//! it with its own `/load-stats` requests.
//!
//! Uses the data plane (its body reading), routing, the observers and the fleet; only the
//! server is above it.

mod explain;
pub mod gauges;
mod history;
mod load_stats;
pub mod lora;

pub use explain::explain;
pub use history::{History, HistorySampler, HISTORY_PERIOD, HISTORY_SAMPLES};
pub use load_stats::{load_stats, placement_stats};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::auth;
use crate::config::Config;
use crate::fleet::Fleet;
use crate::routing;

/// The live dashboard: one self-contained page (no external assets) that polls
/// `/load-stats`.
const DASHBOARD: &str = include_str!("dashboard.html");

pub struct AdminApp {
    pub config: Arc<ArcSwap<Config>>,
    pub fleet: Arc<Fleet>,
    /// Set once every listener accepts connections.
    pub ready: Arc<AtomicBool>,
    pub history: Arc<History>,
    /// The data plane's placement of long-lived affinity keys.
    pub placer: Arc<crate::routing::affinity::Placer>,
    /// The data plane's queues (flow control).
    pub flow: Arc<crate::flow::FlowControl>,
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .expect("static response parts are valid")
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        // The probes tell nothing worth a token, and probes rarely carry one.
        if !matches!(
            path.as_str(),
            "/health" | "/ready" | "/serving" | "/dashboard"
        ) {
            if let Some(token) = &self.config.load().admin_token {
                let presented = session
                    .req_header()
                    .headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| auth::bearer(v.as_bytes()));
                let refused: Option<&[u8]> = match presented {
                    None => Some(
                        b"{\"error\":\"no admin token was sent; the admin API needs it as `Authorization: Bearer TOKEN` (the token is in the file admin.token_file names)\"}",
                    ),
                    Some(p) if !token.matches(p) => Some(
                        b"{\"error\":\"the admin token sent is not the one in admin.token_file\"}",
                    ),
                    Some(_) => None,
                };
                if let Some(body) = refused {
                    let mut r = reply(401, "application/json", body.to_vec());
                    r.headers_mut().insert(
                        http::header::WWW_AUTHENTICATE,
                        http::HeaderValue::from_static("Bearer"),
                    );
                    return r;
                }
            }
        }
        match path.as_str() {
            "/health" => reply(200, "application/json", b"{\"status\":\"ok\"}".to_vec()),
            "/ready" => {
                let healthy = self
                    .fleet
                    .load()
                    .backends
                    .iter()
                    .filter(|b| b.backend.health.routable())
                    .count();
                let ready = self.ready.load(Ordering::Relaxed) && healthy > 0;
                let body = format!("{{\"ready\":{ready},\"healthy_backends\":{healthy}}}");
                reply(
                    if ready { 200 } else { 503 },
                    "application/json",
                    body.into_bytes(),
                )
            }
            // The gateway can answer, whatever its fleet (with OpenAI-style 503s when no
            // replica is healthy): the readiness a Kubernetes Service wants, so that a
            // fleet that is down does not take every gateway out and turn those answers
            // into refused connections.
            "/serving" => {
                let ready = self.ready.load(Ordering::Relaxed);
                reply(
                    if ready { 200 } else { 503 },
                    "application/json",
                    format!("{{\"serving\":{ready}}}").into_bytes(),
                )
            }
            "/dashboard" => reply(
                200,
                "text/html; charset=utf-8",
                DASHBOARD.as_bytes().to_vec(),
            ),
            "/metrics" => reply(
                200,
                "text/plain; version=0.0.4",
                gauges::render(
                    &self.fleet.load(),
                    self.config.load().stale_after(),
                    &self.flow,
                ),
            ),
            "/load-stats" => {
                let mut v = load_stats(&self.config.load(), &self.fleet.load(), Instant::now());
                v["affinity_placement"] = placement_stats(&self.placer.placement());
                v["queue"] = self.flow.stats();
                // The history's newest second of the fleet, without its backends (the
                // dashboard's fleet charts grow by it).
                if let Some(mut latest) = self.history.latest() {
                    latest.backends.clear();
                    v["sample"] = serde_json::to_value(latest).unwrap_or_default();
                }
                let query = session.req_header().uri.query().unwrap_or("");
                if query.split('&').any(|p| p == "history=1") {
                    v["history"] = serde_json::to_value(self.history.samples()).unwrap_or_default();
                }
                reply(
                    200,
                    "application/json",
                    serde_json::to_vec_pretty(&v).unwrap_or_default(),
                )
            }
            "/explain" => self.explain_request(session).await,
            p if crate::admin::lora::Op::of(p).is_some() => {
                let op = crate::admin::lora::Op::of(p).expect("matched");
                self.lora_request(session, op).await
            }
            _ => reply(
                404,
                "application/json",
                b"{\"error\":\"not found\"}".to_vec(),
            ),
        }
    }
}

impl AdminApp {
    /// `POST /explain`: the body is an inference request as a client would send it (JSON,
    /// or an audio form with its `Content-Type`; the session header counts too); the
    /// answer is [`explain`]'s. The request is not sent anywhere.
    /// The body of a `POST` to the admin API, held to the data plane's limits and pace
    /// (`proxy::body`); or the answer refusing it (another method, too large, too slow).
    async fn post_body(
        session: &mut ServerSession,
        cfg: &Config,
        what: &str,
    ) -> Result<Vec<u8>, Response<Vec<u8>>> {
        let refuse =
            |e: crate::openai::ApiError| reply(e.status, "application/json", e.body().to_vec());
        if session.req_header().method != http::Method::POST {
            let body = serde_json::json!({ "error": format!("POST {what}") });
            let mut r = reply(405, "application/json", body.to_string().into_bytes());
            r.headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
            return Err(r);
        }
        let (limit, pace) = (
            cfg.limits.max_body_bytes,
            crate::proxy::body::BodyPace::of(&cfg.limits),
        );
        let started = Instant::now();
        let mut body = Vec::new();
        loop {
            let by = pace.deadline(started, body.len(), Instant::now());
            match tokio::time::timeout_at(by.into(), session.read_request_body()).await {
                Err(_) => return Err(refuse(crate::openai::ApiError::body_timeout())),
                Ok(Err(_)) => {
                    return Err(refuse(crate::openai::ApiError::bad_request(
                        "The request body could not be read.",
                        None,
                    )))
                }
                Ok(Ok(None)) => return Ok(body),
                Ok(Ok(Some(chunk))) if body.len() + chunk.len() > limit => {
                    return Err(refuse(crate::openai::ApiError::body_too_large(limit)))
                }
                Ok(Ok(Some(chunk))) => body.extend_from_slice(&chunk),
            }
        }
    }

    /// `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (`?model=BASE` to
    /// reach only the replicas serving it): see [`crate::admin::lora`].
    async fn lora_request(
        &self,
        session: &mut ServerSession,
        op: crate::admin::lora::Op,
    ) -> Response<Vec<u8>> {
        let cfg = self.config.load();
        let body = match Self::post_body(session, &cfg, "vLLM's LoRA request body").await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let query = session.req_header().uri.query().unwrap_or("");
        let base = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "model")
            .map(|(_, v)| v.into_owned());
        let out = crate::admin::lora::apply(&self.fleet, &cfg, op, &body, base.as_deref()).await;
        reply(out.status, out.content_type, out.body)
    }

    async fn explain_request(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let cfg = self.config.load();
        let what = "the request body to explain, as a client would send it";
        let body = match Self::post_body(session, &cfg, what).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        // Explained as the request path decides about it: the same reading, the same
        // default model or alias's model written in, the same affinity key.
        let snap = self.fleet.load();
        let headers = &session.req_header().headers;
        let mut routed = match routing::admit(&cfg, &snap, headers, body.into()) {
            Ok(r) => r,
            Err(e) => return reply(e.status, "application/json", e.body().to_vec()),
        };
        routed.tokens =
            routing::prefix::tokens_of(self.config.load_full(), snap.clone(), &routed).await;
        let v = explain(&cfg, &snap, &self.placer, &routed, Instant::now());
        reply(
            200,
            "application/json",
            serde_json::to_vec_pretty(&v).unwrap_or_default(),
        )
    }
}

pub(super) fn ms(s: Option<f64>) -> serde_json::Value {
    s.map_or(serde_json::Value::Null, |s| {
        serde_json::json!((s * 1e5).round() / 100.0)
    })
}
