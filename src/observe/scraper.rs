//! The background service that observes every backend and publishes a new
//! [`FleetSnapshot`](crate::fleet::FleetSnapshot). Every `scrape_interval` it reads all backends' `/metrics`
//! concurrently, each with its own timeout; every `models_interval` it also asks for
//! `/v1/models` (unless the config lists the models) and `/version`. Alongside, it runs the
//! [`HealthChecker`] (active `/health` checks and circuit probes, see [`crate::fleet::health`]).

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::services::ServiceReadyNotifier;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::engine::metrics::{self as engine_metrics, EngineLoad, SumCount};
use crate::fleet::{Backend, BackendState, Fleet, FrozenBaseline, Progress};
use crate::httpclient;
use crate::observe::health_check::HealthChecker;
use crate::routing::affinity::Placer;

/// A `/v1/models` answer above this is not a model list.
const MAX_MODELS_BODY: usize = 4 * 1024 * 1024;
/// A real vLLM `/metrics` is about 50–60 KiB; far larger is an error, not data.
pub const MAX_METRICS_BODY: usize = 8 * 1024 * 1024;
/// Requests surely sent after the baseline and answered in full, with the engine's request
/// counter unchanged, after which its `/metrics` is considered frozen (its load stale).
const FROZEN_AFTER_REQUESTS: u64 = 3;
/// How long a `/metrics` may show requests running with neither its token count nor its
/// KV usage moving before it is considered frozen. A working engine moves one of them at
/// every step (a decode step makes tokens, a prefill chunk takes cache blocks); a step
/// takes milliseconds to a few hundred.
const FROZEN_BUSY_AFTER: Duration = Duration::from_secs(3);
/// Weight of the newest scrape window in the smoothed latencies: a step change is mostly
/// reflected after two windows (half a second at the default interval).
const EWMA_NEW: f64 = 0.5;

pub struct Scraper {
    fleet: Arc<Fleet>,
    /// The live config, for the settings a reload may change (affinity placement), and
    /// the placement it plans.
    placement: Option<(Arc<ArcSwap<Config>>, Arc<Placer>)>,
    scrape_interval: Duration,
    scrape_timeout: Duration,
    models_interval: Duration,
    models_timeout: Duration,
    health: HealthChecker,
}

impl Scraper {
    pub fn new(fleet: Arc<Fleet>, config: &Config) -> Scraper {
        Scraper {
            fleet: fleet.clone(),
            placement: None,
            scrape_interval: config.scrape_interval,
            scrape_timeout: config.scrape_timeout,
            models_interval: config.models_interval,
            models_timeout: config.discovery_timeout,
            health: HealthChecker::new(
                fleet.clone(),
                config.health,
                config.timeouts.stream_first_byte,
            ),
        }
    }

    /// Follows `live` for the settings a reload may change, and plans `placer`'s
    /// placement of long-lived affinity keys after each pass.
    pub fn following(mut self, live: Arc<ArcSwap<Config>>, placer: Arc<Placer>) -> Scraper {
        self.placement = Some((live, placer));
        self
    }

    /// Observes every backend once (models too if `with_models`) and publishes the
    /// result.
    pub async fn pass(&self, with_models: bool) {
        let previous = self.fleet.load();
        let observed = futures::future::join_all(previous.backends.iter().map(|e| {
            observe(
                e.backend.clone(),
                e.state.clone(),
                with_models.then_some(self.models_timeout),
                self.scrape_timeout,
            )
        }))
        .await;
        let observed: Vec<_> = previous
            .backends
            .iter()
            .map(|e| e.backend.clone())
            .zip(observed)
            .collect();
        self.fleet.update_states(&observed);
        self.replan();
    }

    /// Plans the placement of long-lived affinity keys again (the placer does it at most
    /// about once a second), when the live config uses affinity.
    fn replan(&self) {
        if let Some((live, placer)) = &self.placement {
            let cfg = live.load();
            if cfg.affinity.used_by(cfg.policy) {
                placer.replan(&self.fleet.load(), cfg.affinity.placement, Instant::now());
            }
        }
    }
}

fn smooth(old: Option<f64>, window: Option<f64>) -> Option<f64> {
    match (old, window) {
        (Some(o), Some(w)) => Some(o * (1.0 - EWMA_NEW) + w * EWMA_NEW),
        (None, w) => w,
        (o, None) => o,
    }
}

fn window(new: Option<SumCount>, old: Option<SumCount>) -> Option<f64> {
    new?.mean_since(&old.unwrap_or_default())
}

/// One backend's new state: its models (when due) and its engine load.
async fn observe(
    backend: Arc<Backend>,
    old: BackendState,
    models_timeout: Option<Duration>,
    scrape_timeout: Duration,
) -> BackendState {
    let models = async {
        let Some(t) = models_timeout else {
            return (None, None);
        };
        let models = async {
            match &backend.static_models {
                None => Some(discover_models(&backend, t).await),
                Some(_) => None,
            }
        };
        tokio::join!(models, discover_version(&backend, t))
    };
    let metrics = async {
        // Completions first: a request that finishes between the two reads is then
        // counted as still in the engine, never as gone twice.
        let completed = backend.completed();
        let served = backend.served();
        let dispatched = backend.dispatched();
        let started = Instant::now();
        let result = match httpclient::get(
            backend.target(),
            "/metrics",
            scrape_timeout,
            MAX_METRICS_BODY,
        )
        .await
        {
            Ok(r) if r.status == 200 => {
                engine_metrics::parse(&r.body, MAX_METRICS_BODY).map_err(|e| e.to_string())
            }
            Ok(r) => Err(format!("status {}", r.status)),
            Err(e) => Err(e.to_string()),
        };
        // Every request sent after this point reached the engine after it wrote the text.
        let dispatched_after = backend.dispatched();
        crate::metrics::SCRAPE_DURATION
            .with_label_values(&[&backend.name])
            .observe(started.elapsed().as_secs_f64());
        (
            dispatched,
            completed,
            served,
            started,
            result,
            dispatched_after,
        )
    };
    let ((models, version), (dispatched, completed, served, started, load, dispatched_after)) =
        tokio::join!(models, metrics);

    let mut state = old;
    if let Some(v) = version {
        if state.version.as_ref() != Some(&v) {
            tracing::info!(backend = %backend.name, version = %v, "vLLM version");
        }
        state.version = Some(v);
    }
    if let Some(models) = models {
        state.observed_at = Some(Instant::now());
        match models {
            Ok(cards) => {
                if state.set_models(cards) {
                    tracing::info!(backend = %backend.name, models = %state.models.join(", "), "models discovered");
                }
                state.models_error = None;
            }
            Err(e) => {
                // The last known models are kept: requests for them get 503, not 404.
                if state.models_error.is_none() {
                    tracing::warn!(backend = %backend.name, error = %e, "model discovery failed");
                }
                state.models_error = Some(e);
            }
        }
    }
    let load = load.and_then(|load| match frozen(&state, &load, served, started) {
        Some((why, since)) => {
            // What was accepted since it stopped moving was never news: the load is as
            // old as that, so it is stale now rather than after a few more intervals.
            state.load_at = state.load_at.map(|at| at.min(since));
            Err(why)
        }
        None => Ok(load),
    });
    let was_failing = state.scrape_error.is_some();
    match load {
        Ok(load) => {
            if was_failing {
                tracing::info!(backend = %backend.name, "its /metrics can be used again");
            }
            if !load.anomalies.is_empty() {
                tracing::debug!(backend = %backend.name, anomalies = ?load.anomalies, "dropped metric values");
            }
            accept(
                &mut state,
                load,
                dispatched,
                completed,
                started,
                dispatched_after,
            );
        }
        Err(e) => {
            crate::metrics::SCRAPE_ERRORS
                .with_label_values(&[&backend.name])
                .inc();
            // The last load is kept but ages: once stale it is no longer used.
            if !was_failing {
                tracing::warn!(
                    backend = %backend.name,
                    error = %e,
                    "its /metrics cannot be used; once its last good scrape is stale, the \
                     vllm policy counts it by this gateway's requests in flight there, as \
                     half again busier"
                );
            }
            state.scrape_error = Some(format!("GET /metrics: {e}"));
        }
    }
    state
}

/// Why a `/metrics` that parsed is nonetheless frozen (a stopped exporter, a cache in
/// front of it), judged against `state`, and since when it surely has been; `None` when it
/// is not. `served`: this gateway's `Backend::served()` when the scrape started at
/// `started`.
///
/// - Requests this gateway sent after a baseline scrape was written, and saw answered in
///   full (a 2xx) before this one began, must show in the engine's request counter. At
///   least `served − baseline.dispatched_after` such requests exist (all the others may
///   be older ones, counted before the baseline). The baseline is the first scrape that
///   showed the engine's current count, so a frozen `/metrics` is caught as soon as a few
///   requests sent after it are answered. Frozen while it looked idle, a
///   busy engine would otherwise draw every request.
/// - That needs requests of ours to finish there, and a replica frozen while it looked
///   busy gets few. Its own numbers give it away: requests running, yet neither tokens
///   made nor cache blocks taken for [`FROZEN_BUSY_AFTER`].
fn frozen(
    state: &BackendState,
    load: &EngineLoad,
    served: u64,
    started: Instant,
) -> Option<(String, Instant)> {
    if let (Some(b), Some(now)) = (state.frozen_baseline, load.e2e) {
        let surely_new = served.saturating_sub(b.dispatched_after);
        if now.count == b.engine_finished && surely_new >= FROZEN_AFTER_REQUESTS {
            let why = format!(
                "frozen: {surely_new} requests sent since {:.1}s ago were answered, the engine's \
                 request counter did not move",
                started.saturating_duration_since(b.at).as_secs_f64()
            );
            return Some((why, b.at));
        }
    }
    let (Some(p), Some(running)) = (state.progress, load.running) else {
        return None;
    };
    let still = started.saturating_duration_since(p.at);
    (p.busy
        && running > 0.0
        && (load.tokens.is_some() || load.kv_usage.is_some())
        && (load.tokens, load.kv_usage) == (p.tokens, p.kv_usage)
        && still >= FROZEN_BUSY_AFTER)
        .then(|| {
            let why = format!(
                "frozen: {running} requests running, but neither the token count nor the KV \
                 usage moved in {:.1}s (a stopped exporter, or a stuck engine)",
                still.as_secs_f64()
            );
            (why, p.at)
        })
}

/// At or above this KV-cache usage, requests waiting are taken to wait for cache blocks
/// rather than for a batch slot (see [`accept`]). vLLM admits a waiting request when its
/// next prefill chunk fits in the free blocks; a chunk is a few percent of a cache.
pub const KV_BOUND_QUEUE: f64 = 0.9;

/// Takes a scraped load into `state`: recent latencies (smoothed), the learned batch limit,
/// and the gateway's counters when the scrape started (`dispatched`, `completed`), against
/// which the work sent since is counted. `dispatched_after`: `Backend::dispatched()` once
/// the answer had arrived. Public for what-if runs of the policy (`benches/routing_bound`).
pub fn accept(
    state: &mut BackendState,
    load: EngineLoad,
    dispatched: u64,
    completed: u64,
    started: Instant,
    dispatched_after: u64,
) {
    let prev = state.load.take();
    let p = prev.as_ref();
    state.itl_s = smooth(state.itl_s, window(load.itl, p.and_then(|l| l.itl)));
    state.ttft_s = smooth(state.ttft_s, window(load.ttft, p.and_then(|l| l.ttft)));
    state.e2e_s = smooth(state.e2e_s, window(load.e2e, p.and_then(|l| l.e2e)));
    if let Some(r) = load.running {
        state.max_running_seen = state.max_running_seen.max(r);
    }
    // Requests waiting while the cache is nearly full wait for cache blocks, or were
    // preempted: that is the KV pressure term's to price, and says nothing of the batch
    // limit (vLLM 0.32 fixture `metrics-busy-16x512-kv4M-preempt.txt`: 15 running and one
    // waiting at 97% usage, with `--max-num-seqs 32`).
    // Nor do requests deferred for a LoRA adapter slot or a KV transfer.
    let waiting_for_a_slot = load
        .waiting
        .map(|w| w - load.waiting_deferred.unwrap_or(0.0));
    state.queued_seen |= matches!((load.running, waiting_for_a_slot), (Some(r), Some(w)) if w > 0.0 && r > 0.0)
        && load.kv_usage.is_none_or(|k| k < KV_BOUND_QUEUE);
    let busy = load.running.is_some_and(|r| r > 0.0);
    let still = state
        .progress
        .is_some_and(|p| p.busy && busy && (load.tokens, load.kv_usage) == (p.tokens, p.kv_usage));
    if !still {
        state.progress = Some(Progress {
            at: started,
            busy,
            tokens: load.tokens,
            kv_usage: load.kv_usage,
        });
    }
    let e2e_now = load.e2e;
    state.load = Some(load);
    state.load_at = Some(started);
    state.dispatched_at_scrape = dispatched;
    state.completed_at_scrape = completed;
    if let Some(e2e) = e2e_now {
        // The first scrape that showed this count: frozen, the count stays, and every
        // request sent since it was written counts against it.
        let renew = state
            .frozen_baseline
            .is_none_or(|b| e2e.count != b.engine_finished);
        if renew {
            state.frozen_baseline = Some(FrozenBaseline {
                at: started,
                engine_finished: e2e.count,
                dispatched_after,
            });
        }
    }
    state.scrape_error = None;
}

/// The backend's vLLM version (from `/version`), or `None` when it does not say (an older
/// server, another engine, a failure: the last known one is kept).
pub async fn discover_version(backend: &Backend, timeout: Duration) -> Option<String> {
    let resp = httpclient::get(backend.target(), "/version", timeout, MAX_MODELS_BODY)
        .await
        .ok()?;
    (resp.status == 200)
        .then(|| crate::engine::models::parse_version(&resp.body).ok())
        .flatten()
}

/// The models a backend serves (from `/v1/models`), as its entries there.
pub async fn discover_models(
    backend: &Backend,
    timeout: Duration,
) -> Result<Vec<serde_json::Value>, String> {
    let resp = httpclient::get(backend.target(), "/v1/models", timeout, MAX_MODELS_BODY)
        .await
        .map_err(|e| format!("GET /v1/models: {e}"))?;
    if resp.status != 200 {
        return Err(format!("GET /v1/models: status {}", resp.status));
    }
    let models = crate::engine::models::parse_models(&resp.body)?;
    if models.is_empty() {
        return Err("GET /v1/models: no models".into());
    }
    Ok(models)
}

#[async_trait]
impl BackgroundService for Scraper {
    /// Reports ready after the first pass (models, metrics and health), so the proxy
    /// never starts on a fleet that has not been looked at.
    async fn start_with_ready_notifier(
        &self,
        shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        tokio::join!(self.pass(true), self.health.pass());
        ready.notify_ready();
        let health = self.health.run(shutdown.clone());
        // Each backend on its own clock (see `rounds`): one whose `/metrics` or
        // `/v1/models` hangs until its timeout delays only its own observations.
        let scrape = crate::observe::rounds::run(
            &self.fleet,
            self.scrape_interval,
            shutdown,
            |e| {
                let models_due = e
                    .state
                    .observed_at
                    .is_none_or(|t| t.elapsed() >= self.models_interval);
                Some(observe(
                    e.backend.clone(),
                    e.state.clone(),
                    models_due.then_some(self.models_timeout),
                    self.scrape_timeout,
                ))
            },
            |observed| {
                self.fleet.update_states(&observed);
                self.replan();
            },
        );
        tokio::join!(health, scrape);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendConfig;

    #[test]
    fn the_batch_limit_is_the_largest_running_seen_once_requests_have_waited() {
        let mut state = fresh_state();
        let mut scrape = |running: f64, waiting: f64| {
            let load = EngineLoad {
                running: Some(running),
                waiting: Some(waiting),
                ..EngineLoad::default()
            };
            accept(&mut state, load, 0, 0, Instant::now(), 0);
            state.learned_max_running()
        };
        // Nothing waited yet: no limit is known, however many run.
        assert_eq!(scrape(20.0, 0.0), None);
        assert_eq!(scrape(32.0, 0.0), None);
        // A request caught between its arrival and the next step, at 12 running: a limit
        // exists, and it is at least the 32 seen before.
        assert_eq!(scrape(12.0, 1.0), Some(32.0));
        // More running later, without queueing: the limit was higher.
        assert_eq!(scrape(40.0, 0.0), Some(40.0));
        assert_eq!(scrape(5.0, 0.0), Some(40.0));
    }

    /// The state of a backend never scraped.
    fn fresh_state() -> BackendState {
        let cfg = BackendConfig::new("b", "http://b", "127.0.0.1:1".parse().unwrap());
        BackendState::unknown(&Backend::new(&cfg))
    }

    fn fixture_load(name: &str) -> EngineLoad {
        let p = format!(
            "{}/tests/fixtures/vllm-0.32/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read(&p).unwrap_or_else(|e| panic!("{p}: {e}"));
        crate::engine::metrics::parse(&text, 8 << 20).unwrap()
    }

    /// A `/metrics` frozen while it showed requests running is caught by its token count
    /// and KV usage staying put; an idle engine, or one that moves, never is.
    #[test]
    fn a_metrics_frozen_while_busy_is_caught_by_its_still_counters() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let busy = fixture_load("metrics-busy-16x256.txt");
        let moved = fixture_load("metrics-busy-16x512-stream.txt");
        let idle = fixture_load("metrics-idle.txt");
        assert!(busy.running > Some(0.0) && moved.running > Some(0.0));
        assert!(busy.tokens.is_some() && busy.tokens != moved.tokens);

        let mut state = fresh_state();
        accept(&mut state, busy.clone(), 0, 0, at(0), 0);
        // The same numbers a few steps later: nothing to say yet.
        assert_eq!(frozen(&state, &busy, 0, at(1000)), None);
        accept(&mut state, busy.clone(), 0, 0, at(1000), 0);
        let (why, since) = frozen(&state, &busy, 0, at(3000)).expect("frozen after 3 s");
        assert_eq!(since, at(0), "still since the first of the same scrapes");
        assert!(why.contains("16 requests running"), "{why}");
        // It moved: fine, and the wait starts again.
        assert_eq!(frozen(&state, &moved, 0, at(3000)), None);
        accept(&mut state, moved.clone(), 0, 0, at(3000), 0);
        assert_eq!(frozen(&state, &moved, 0, at(5900)), None);
        assert!(frozen(&state, &moved, 0, at(6000)).is_some());

        // Idle for a long time, then a request arrives: its first scrapes may show the
        // idle engine's counters with one running; the wait starts at the first of them.
        let mut state = fresh_state();
        accept(&mut state, idle.clone(), 0, 0, at(0), 0);
        accept(&mut state, idle.clone(), 0, 0, at(60_000), 0);
        assert_eq!(
            frozen(&state, &idle, 0, at(120_000)),
            None,
            "idle is not frozen"
        );
        let arrived = EngineLoad {
            running: Some(1.0),
            ..idle.clone()
        };
        assert_eq!(frozen(&state, &arrived, 0, at(120_000)), None);
        accept(&mut state, arrived.clone(), 0, 0, at(120_000), 0);
        assert_eq!(frozen(&state, &arrived, 0, at(122_000)), None);
        assert!(frozen(&state, &arrived, 0, at(123_000)).is_some());
    }

    /// Real vLLM 0.32 scrapes of an engine started with `--max-num-seqs 32`.
    #[test]
    fn queueing_for_cache_blocks_teaches_no_batch_limit() {
        let mut state = fresh_state();
        // Its KV cache (4 MiB) full: 15 running, one waiting for blocks. The limit is 32,
        // not 15.
        let full = fixture_load("metrics-busy-16x512-kv4M-preempt.txt");
        assert!(full.waiting > Some(0.0) && full.kv_usage > Some(KV_BOUND_QUEUE));
        accept(&mut state, full, 0, 0, Instant::now(), 0);
        assert_eq!(state.learned_max_running(), None);
        // Requests deferred (a LoRA adapter waiting for an adapter slot) are not waiting
        // for a batch slot either.
        let mut deferred = fixture_load("metrics-busy-48x512-queued.txt");
        deferred.running = Some(6.0);
        deferred.waiting_deferred = deferred.waiting;
        accept(&mut state, deferred, 0, 0, Instant::now(), 0);
        assert_eq!(state.learned_max_running(), None);
        // 48 requests sent: 32 run and 16 wait for a slot, the cache an eighth full.
        let queued = fixture_load("metrics-busy-48x512-queued.txt");
        assert_eq!(queued.waiting_deferred, Some(0.0), "vLLM 0.32 reports it");
        accept(&mut state, queued, 0, 0, Instant::now(), 0);
        assert_eq!(state.learned_max_running(), Some(32.0));
    }
}
