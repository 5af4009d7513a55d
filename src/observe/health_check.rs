//! The active side of a backend's health (see `fleet::health` for the state it feeds):
//! `GET /health` of every backend every `health.interval`, each on its own clock, and the
//! probe of each open circuit that is due.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::HealthPolicy;
use crate::fleet::health::CheckFlip;
use crate::fleet::{Backend, BackendEntry, Fleet};
use crate::httpclient;

/// The active side: checks every backend's `/health` every `interval`, and sends the
/// probe of each open circuit that is due.
pub struct HealthChecker {
    fleet: Arc<Fleet>,
    policy: HealthPolicy,
    /// How long a probe request may take (the limit on a stream's first token).
    probe_timeout: Duration,
}

/// The synthetic request that probes an open circuit: one token of one model it serves.
fn probe_body(model: &str) -> Vec<u8> {
    serde_json::json!({"model": model, "prompt": "ping", "max_tokens": 1})
        .to_string()
        .into_bytes()
}

impl HealthChecker {
    pub fn new(fleet: Arc<Fleet>, policy: HealthPolicy, probe_timeout: Duration) -> Self {
        HealthChecker {
            fleet,
            policy,
            probe_timeout,
        }
    }

    /// Checks every backend once, concurrently, and starts the probes that are due.
    pub async fn pass(&self) {
        let snap = self.fleet.load();
        futures::future::join_all(snap.backends.iter().map(|e| self.visit(e))).await;
    }

    /// Starts `e`'s probe if one is due, and checks its `/health`.
    fn visit(&self, e: &BackendEntry) -> impl std::future::Future<Output = ()> + 'static {
        if e.backend
            .health
            .begin_probe(Instant::now(), self.policy.open_duration)
        {
            let model = e.state.models.first().cloned();
            tokio::spawn(probe(e.backend.clone(), model, self.probe_timeout));
        }
        check(e.backend.clone(), self.policy)
    }

    /// Visits every backend each interval until `stop` says so, each on its own clock
    /// (see `rounds`): one whose `/health` hangs until its timeout delays only itself.
    pub async fn run(&self, stop: tokio::sync::watch::Receiver<bool>) {
        crate::observe::rounds::run(
            &self.fleet,
            self.policy.interval,
            stop,
            |e| Some(self.visit(e)),
            |_| {},
        )
        .await;
    }
}

/// Checks one backend's `/health` and feeds the result to its hysteresis.
pub async fn check(backend: Arc<Backend>, policy: HealthPolicy) {
    let result = match httpclient::get(backend.target(), "/health", policy.timeout, 64 * 1024).await
    {
        Ok(r) if r.status == 200 => Ok(()),
        Ok(r) => Err(format!("GET /health: status {}", r.status)),
        Err(e) => Err(format!("GET /health: {e}")),
    };
    let error = result.as_ref().err().cloned();
    match backend.health.observe_check(result, &policy) {
        Some(CheckFlip::Up) => tracing::info!(backend = %backend.name, "backend is up"),
        Some(CheckFlip::Down) => tracing::warn!(
            backend = %backend.name,
            error = error.as_deref().unwrap_or(""),
            "backend is down"
        ),
        None => {}
    }
}

async fn probe(backend: Arc<Backend>, model: Option<String>, timeout: Duration) {
    let Some(model) = model else {
        // Nothing to ask for: the active checks decide alone.
        backend.health.end_probe(true, Instant::now());
        return;
    };
    let result = httpclient::post_json(
        backend.target(),
        "/v1/completions",
        &probe_body(&model),
        timeout,
        1024 * 1024,
    )
    .await;
    let ok = matches!(&result, Ok(r) if r.status < 500);
    backend.health.end_probe(ok, Instant::now());
    if ok {
        tracing::info!(backend = %backend.name, "probe succeeded: circuit closed");
    } else {
        let why = match result {
            Ok(r) => format!("status {}", r.status),
            Err(e) => e.to_string(),
        };
        tracing::warn!(backend = %backend.name, error = %why, "probe failed: circuit stays open");
    }
}
