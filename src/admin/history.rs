//! The dashboard's recent past: a sample of the fleet every second, the last five minutes
//! kept: what the fleet charts draw (requests/s, errors/s, TTFT p50 and p99 as this
//! gateway measures it, the engines' queues) and each backend's sparklines.

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

/// Samples kept (one a second): a page opened now shows the last five minutes at once.
pub const HISTORY_SAMPLES: usize = 300;
/// TTFT percentiles are taken over this many seconds of requests, so a quiet second does
/// not make the line jump to nothing.
const TTFT_WINDOW: usize = 5;
pub const HISTORY_PERIOD: Duration = Duration::from_secs(1);

/// One second of the fleet, as the dashboard draws it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    /// Unix time, ms.
    pub t_ms: u64,
    pub requests_total: u64,
    pub errors_5xx_total: u64,
    /// Attempts at a backend that failed (retried or not).
    pub upstream_errors_total: u64,
    /// The engines' requests running and waiting, summed over fresh scrapes.
    pub running: f64,
    pub waiting: f64,
    /// Time to the first byte of streamed answers (about the time to first token),
    /// as this gateway measured it, over the last few seconds; none without streams.
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
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
    /// The TTFT histogram's cumulative buckets at the last samples, for the window.
    ttft: Mutex<VecDeque<Vec<(f64, u64)>>>,
}

impl History {
    pub fn record(&self, config: &Config, snap: &FleetSnapshot) {
        let now = Instant::now();
        let fresh = crate::fleet::fresh_since(now, config.stale_after());
        let answered = metrics::sums_by(&metrics::REQUESTS, "backend");
        let by_class = metrics::sums_by(&metrics::REQUESTS, "status_class");
        let (ttft_p50_ms, ttft_p99_ms) = self.ttft_percentiles();
        let backends: Vec<BackendSample> = snap
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
            .collect();
        let sum = |f: fn(&BackendSample) -> Option<f64>| backends.iter().filter_map(f).sum();
        let sample = Sample {
            t_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            requests_total: by_class.values().sum(),
            errors_5xx_total: by_class.get("5xx").copied().unwrap_or(0),
            upstream_errors_total: metrics::sums_by(&metrics::UPSTREAM_ERRORS, "backend")
                .values()
                .sum(),
            running: sum(|b| b.running),
            waiting: sum(|b| b.waiting),
            ttft_p50_ms,
            ttft_p99_ms,
            backends,
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

    /// The last sample, if any.
    pub fn latest(&self) -> Option<Sample> {
        self.samples.lock().back().cloned()
    }

    /// TTFT p50 and p99 (ms) of the streams answered over the last [`TTFT_WINDOW`] s.
    fn ttft_percentiles(&self) -> (Option<f64>, Option<f64>) {
        let now = metrics::histogram_buckets(&metrics::TIME_TO_FIRST_BYTE, "stream", "true");
        let mut past = self.ttft.lock();
        let window: Vec<(f64, u64)> = match past.front() {
            Some(then) => now
                .iter()
                .map(|&(le, c)| {
                    let before = then.iter().find(|b| b.0 == le).map_or(0, |b| b.1);
                    (le, c.saturating_sub(before))
                })
                .collect(),
            None => now.clone(),
        };
        if past.len() == TTFT_WINDOW {
            past.pop_front();
        }
        past.push_back(now);
        let ms = |q| quantile(&window, q).map(|s| (s * 1e4).round() / 10.0);
        (ms(0.5), ms(0.99))
    }
}

/// The `q`-quantile of a histogram's cumulative buckets `(upper bound, count)` (the last
/// bound +∞), interpolated within its bucket as Prometheus' `histogram_quantile` does;
/// none when it counts nothing.
fn quantile(buckets: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut lower = (0.0, 0u64);
    for &(le, count) in buckets {
        if count as f64 >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let span = (count - lower.1) as f64;
            let into = if span > 0.0 {
                (rank - lower.1 as f64) / span
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * into);
        }
        lower = (le, count);
    }
    Some(lower.0)
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

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_interpolate_within_their_bucket_like_prometheus() {
        // 10 under 10 ms, 80 between 10 and 25 ms, 10 between 25 and 50 ms.
        let b = [(0.01, 10), (0.025, 90), (0.05, 100), (f64::INFINITY, 100)];
        assert_eq!(quantile(&b, 0.5), Some(0.01 + 0.015 * 40.0 / 80.0));
        let p99 = quantile(&b, 0.99).unwrap();
        assert!((p99 - (0.025 + 0.025 * 9.0 / 10.0)).abs() < 1e-12, "{p99}");
        assert_eq!(quantile(&[(0.01, 0), (f64::INFINITY, 0)], 0.5), None);
        // Past the last finite bound: that bound.
        assert_eq!(quantile(&[(0.01, 0), (f64::INFINITY, 5)], 0.5), Some(0.01));
    }
}
