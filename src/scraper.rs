//! The background service that observes every backend and publishes a new
//! [`FleetSnapshot`]: each pass asks all backends concurrently, each with its own timeout,
//! for `/v1/models` (or `/health` when the config lists the models), and logs a backend
//! only when its health flips.

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::services::ServiceReadyNotifier;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::fleet::{Backend, BackendEntry, BackendState, Fleet, FleetSnapshot};
use crate::httpclient;
use crate::openai;

/// A `/v1/models` answer above this is not a model list.
const MAX_MODELS_BODY: usize = 4 * 1024 * 1024;

pub struct Scraper {
    fleet: Arc<Fleet>,
    interval: Duration,
    timeout: Duration,
}

impl Scraper {
    pub fn new(fleet: Arc<Fleet>, interval: Duration, timeout: Duration) -> Scraper {
        Scraper {
            fleet,
            interval,
            timeout,
        }
    }

    /// Observes every backend once and publishes the result.
    pub async fn pass(&self) {
        let previous = self.fleet.load();
        let observed = futures::future::join_all(
            previous
                .backends
                .iter()
                .map(|e| observe(e.backend.clone(), self.timeout)),
        )
        .await;
        let entries = previous
            .backends
            .iter()
            .zip(observed)
            .map(|(old, result)| {
                let state = match result {
                    Ok(models) => BackendState {
                        healthy: true,
                        models,
                        last_error: None,
                        observed_at: Some(Instant::now()),
                    },
                    Err(err) => BackendState {
                        healthy: false,
                        models: old.state.models.clone(),
                        last_error: Some(err),
                        observed_at: Some(Instant::now()),
                    },
                };
                log_flip(&old.backend, &old.state, &state);
                BackendEntry {
                    backend: old.backend.clone(),
                    state,
                }
            })
            .collect();
        self.fleet.store(FleetSnapshot::new(entries));
    }
}

fn log_flip(backend: &Backend, old: &BackendState, new: &BackendState) {
    let first = old.observed_at.is_none();
    match (old.healthy, new.healthy) {
        (false, true) => {
            tracing::info!(backend = %backend.name, models = ?new.models, "backend is up")
        }
        (true, false) | (false, false) if first || old.healthy => tracing::warn!(
            backend = %backend.name,
            error = new.last_error.as_deref().unwrap_or(""),
            "backend is down"
        ),
        _ => {}
    }
}

/// The models a backend serves, or why it is considered down.
async fn observe(backend: Arc<Backend>, timeout: Duration) -> Result<Vec<String>, String> {
    if let Some(models) = &backend.static_models {
        let resp = httpclient::get(backend.addr, "/health", timeout, 64 * 1024)
            .await
            .map_err(|e| format!("GET /health: {e}"))?;
        return if resp.status == 200 {
            Ok(models.clone())
        } else {
            Err(format!("GET /health: status {}", resp.status))
        };
    }
    let resp = httpclient::get(backend.addr, "/v1/models", timeout, MAX_MODELS_BODY)
        .await
        .map_err(|e| format!("GET /v1/models: {e}"))?;
    if resp.status != 200 {
        return Err(format!("GET /v1/models: status {}", resp.status));
    }
    let models = openai::parse_models(&resp.body)?;
    if models.is_empty() {
        return Err("GET /v1/models: no models".into());
    }
    Ok(models)
}

#[async_trait]
impl BackgroundService for Scraper {
    /// Reports ready after the first pass, so the proxy never starts on a fleet that has
    /// not been looked at.
    async fn start_with_ready_notifier(
        &self,
        mut shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        self.pass().await;
        ready.notify_ready();
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    if *shutdown.borrow() { return; }
                }
                _ = tick.tick() => self.pass().await,
            }
        }
    }
}
