//! The dashboard's recent past: a sample of the fleet every second, the last 90 kept.

use arc_swap::ArcSwap;
use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::fleet::{Fleet, FleetSnapshot};
use crate::metrics;

/// Samples kept for the dashboard's sparklines (one a second): a page opened now shows
/// the last minute and a half at once.
pub const HISTORY_SAMPLES: usize = 90;
pub const HISTORY_PERIOD: Duration = Duration::from_secs(1);

/// One second of the fleet, as the dashboard draws it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    /// Unix time, ms.
    pub t_ms: u64,
    pub requests_total: u64,
    pub errors_5xx_total: u64,
    pub backends: Vec<BackendSample>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendSample {
    pub name: String,
    pub running: Option<f64>,
    pub waiting: Option<f64>,
    pub kv_usage: Option<f64>,
    pub in_flight: usize,
    pub requests_total: u64,
}

/// The recent samples, oldest first (`GET /load-stats?history=1`).
#[derive(Debug, Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    pub fn record(&self, config: &Config, snap: &FleetSnapshot) {
        let now = Instant::now();
        let fresh = crate::fleet::fresh_since(now, config.stale_after());
        let answered = metrics::sums_by(&metrics::REQUESTS, "backend");
        let by_class = metrics::sums_by(&metrics::REQUESTS, "status_class");
        let sample = Sample {
            t_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            requests_total: by_class.values().sum(),
            errors_5xx_total: by_class.get("5xx").copied().unwrap_or(0),
            backends: snap
                .backends
                .iter()
                .map(|e| {
                    let l = e.state.fresh_load(fresh);
                    BackendSample {
                        name: e.backend.name.clone(),
                        running: l.and_then(|l| l.running),
                        waiting: l.and_then(|l| l.waiting),
                        kv_usage: l.and_then(|l| l.kv_usage),
                        in_flight: e.backend.in_flight(),
                        requests_total: answered.get(&e.backend.name).copied().unwrap_or(0),
                    }
                })
                .collect(),
        };
        let mut samples = self.samples.lock();
        if samples.len() == HISTORY_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().iter().cloned().collect()
    }
}

/// Records a [`History`] sample every [`HISTORY_PERIOD`].
pub struct HistorySampler {
    pub config: Arc<ArcSwap<Config>>,
    pub fleet: Arc<Fleet>,
    pub history: Arc<History>,
}

#[async_trait]
impl BackgroundService for HistorySampler {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(HISTORY_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() { return; }
                }
                _ = tick.tick() => self.history.record(&self.config.load(), &self.fleet.load()),
            }
        }
    }
}
