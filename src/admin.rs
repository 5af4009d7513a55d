//! The admin listener (loopback by default, separate from the data plane): `/health`,
//! `/ready` and `/metrics`.

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::fleet::Fleet;
use crate::metrics;

pub struct AdminApp {
    pub fleet: Arc<Fleet>,
    /// Set once every listener accepts connections.
    pub ready: Arc<AtomicBool>,
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
        match path.as_str() {
            "/health" => reply(200, "application/json", b"{\"status\":\"ok\"}".to_vec()),
            "/ready" => {
                let healthy = self
                    .fleet
                    .load()
                    .backends
                    .iter()
                    .filter(|b| b.state.healthy)
                    .count();
                let ready = self.ready.load(Ordering::Relaxed) && healthy > 0;
                let body = format!("{{\"ready\":{ready},\"healthy_backends\":{healthy}}}");
                reply(
                    if ready { 200 } else { 503 },
                    "application/json",
                    body.into_bytes(),
                )
            }
            "/metrics" => reply(200, "text/plain; version=0.0.4", metrics::render()),
            _ => reply(
                404,
                "application/json",
                b"{\"error\":\"not found\"}".to_vec(),
            ),
        }
    }
}
