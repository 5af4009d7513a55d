//! The fleet: each backend's identity, its live state as last observed, and this gateway's
//! own in-flight count per backend.
//!
//! Uses the config, the engine facts and the HTTP client (its kept connections); routing,
//! the observers and the data plane build on it.
//!
//! Background tasks build a new immutable [`FleetSnapshot`] and swap it in through
//! `Fleet::store`; the request path only [`Fleet::load`]s it (wait-free) and touches the
//! per-backend atomics through an RAII [`InFlightGuard`], so counts cannot drift.

pub mod health;
pub mod pick;
pub mod prefix;

use arc_swap::ArcSwap;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::auth::Secret;
use crate::config::BackendConfig;
use crate::engine::metrics::{EngineLoad, LoraFit};
use crate::fleet::health::BackendHealth;
use crate::tls::BackendTls;
use pick::PickInputs;

/// The oldest scrape start still fresh at `now` (`None`: every scrape is, because the
/// process is younger than `stale_after`).
pub fn fresh_since(now: Instant, stale_after: std::time::Duration) -> Option<Instant> {
    now.checked_sub(stale_after)
}

/// Whether a scrape that started at `at` is fresh (see [`fresh_since`]).
pub fn is_fresh(at: Option<Instant>, fresh_since: Option<Instant>) -> bool {
    matches!(at, Some(at) if fresh_since.is_none_or(|f| at >= f))
}

/// A backend's identity, shared by every snapshot that contains it. Its counters live as
/// long as the backend stays in the configuration.
#[derive(Debug)]
pub struct Backend {
    pub name: String,
    /// `name` as the value of the `x-vllm-edge-backend` response header, made once.
    pub name_header: http::HeaderValue,
    /// Its identity for prefix affinity: a digest of `name`, the same in every gateway.
    pub node_id: u64,
    pub url: String,
    pub addr: SocketAddr,
    /// Models from the config file; `None` means discover them from `/v1/models`.
    pub static_models: Option<Vec<String>>,
    /// Relative speed from the config, used until latency has been measured.
    pub weight: f64,
    pub max_concurrent_requests: Option<u32>,
    /// Sent upstream in place of the client's key.
    pub api_key: Option<Secret>,
    /// For `https://` backends.
    pub tls: Option<BackendTls>,
    /// Whether it may be sent requests (checks, circuit breaker, draining).
    pub health: BackendHealth,
    in_flight: AtomicUsize,
    /// Requests ever sent (monotonic): the scraper notes its value when a scrape starts,
    /// so the difference is the work dispatched since the engine's numbers were taken.
    dispatched: AtomicU64,
    /// Requests ever finished (monotonic), noted the same way.
    completed: AtomicU64,
    /// Requests answered in full with a 2xx: finished by the engine, so counted in its
    /// `/metrics` (a request the API server rejected never reached the engine).
    served: AtomicU64,
    /// Prompt tokens of this gateway's streaming requests that have not produced a first
    /// byte yet: prefill work queued on the engine (exact for one gateway).
    pending_prefill: AtomicU64,
    /// The LoRA adapters this gateway sent requests for, each with the `dispatched` count
    /// of its latest: those sent since a scrape began hold a slot the scrape does not
    /// show yet. Touched only by requests for adapters.
    adapters_sent: parking_lot::Mutex<Vec<(String, u64)>>,
    /// Connections kept open for the background requests (scrapes, checks).
    pub kept: crate::httpclient::KeptConnections,
    /// Where its engine publishes KV events, if it does.
    pub kv_events: Option<crate::config::KvEvents>,
    /// What its engine holds in its prefix cache, from those events.
    pub prefix: prefix::PrefixIndex,
}

/// A backend's identity for prefix affinity: a digest of its configured name, so every
/// gateway with the same config gives it the same id.
pub fn node_id(name: &str) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"vllm-edge/node\0");
    ctx.update(name.as_bytes());
    let d = ctx.finish();
    u64::from_be_bytes(d.as_ref()[..8].try_into().expect("a SHA-256 has 8 bytes"))
}

/// Adapters remembered per backend by [`Backend::note_adapter`]: more than any engine
/// has slots (vLLM's `--max-loras` is at most a few dozen).
const ADAPTERS_REMEMBERED: usize = 64;

impl Backend {
    /// Where the gateway's own requests to it go (`crate::httpclient`).
    pub fn target(&self) -> crate::httpclient::Target<'_> {
        crate::httpclient::Target {
            addr: self.addr,
            key: self.api_key.as_ref(),
            tls: self.tls.as_ref(),
            kept: Some(&self.kept),
        }
    }

    pub fn new(cfg: &BackendConfig) -> Arc<Backend> {
        let health = BackendHealth::default();
        health.set_draining(cfg.drain);
        Arc::new(Backend {
            health,
            name: cfg.name.clone(),
            // The config checks names are valid header values.
            name_header: http::HeaderValue::from_str(&cfg.name)
                .unwrap_or_else(|_| http::HeaderValue::from_static("-")),
            node_id: node_id(&cfg.name),
            url: cfg.url.clone(),
            addr: cfg.addr,
            static_models: cfg.static_models.clone(),
            weight: cfg.weight,
            max_concurrent_requests: cfg.max_concurrent_requests,
            api_key: cfg.api_key.clone(),
            tls: cfg.tls.clone(),
            in_flight: AtomicUsize::new(0),
            dispatched: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            served: AtomicU64::new(0),
            pending_prefill: AtomicU64::new(0),
            adapters_sent: parking_lot::Mutex::new(Vec::new()),
            kept: Default::default(),
            kv_events: cfg.kv_events.clone(),
            prefix: Default::default(),
        })
    }

    /// Notes that the request just begun here ([`Backend::begin_request`]) is for LoRA
    /// adapter `adapter`.
    pub fn note_adapter(&self, adapter: &str) {
        let seq = self.dispatched();
        let mut sent = self.adapters_sent.lock();
        if let Some(e) = sent.iter_mut().find(|(a, _)| a == adapter) {
            e.1 = seq;
            return;
        }
        if sent.len() == ADAPTERS_REMEMBERED {
            let oldest = (0..sent.len())
                .min_by_key(|&i| sent[i].1)
                .expect("not empty");
            sent.swap_remove(oldest);
        }
        sent.push((adapter.to_string(), seq));
    }

    /// Calls `f` with each adapter this gateway sent a request for after the backend's
    /// `dispatched` count was `since` (a scrape's start).
    pub fn adapters_sent_since(&self, since: u64, mut f: impl FnMut(&str)) {
        let sent = self.adapters_sent.lock();
        for (a, seq) in sent.iter() {
            if *seq > since {
                f(a);
            }
        }
    }

    /// Whether `cfg` describes this backend as it is (the drain flag aside).
    pub fn same_config(&self, cfg: &BackendConfig) -> bool {
        self.name == cfg.name
            && self.url == cfg.url
            && self.addr == cfg.addr
            && self.static_models == cfg.static_models
            && self.weight == cfg.weight
            && self.max_concurrent_requests == cfg.max_concurrent_requests
            && self.api_key == cfg.api_key
            && self.tls == cfg.tls
            && self.kv_events == cfg.kv_events
    }

    /// Requests this gateway has sent to the backend that have not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests ever sent to the backend.
    pub fn dispatched(&self) -> u64 {
        self.dispatched.load(Ordering::Relaxed)
    }

    /// Requests sent to the backend that have finished (however they ended).
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    /// Requests answered in full with a 2xx (see [`InFlightGuard::served`]).
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Prompt tokens sent in streaming requests still waiting for their first byte.
    pub fn pending_prefill(&self) -> u64 {
        self.pending_prefill.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight until the guard is dropped.
    pub fn begin_request(self: &Arc<Self>) -> InFlightGuard {
        self.begin_request_with_prefill(0)
    }

    /// Like [`Backend::begin_request`], also counting `prompt_tokens` of prefill pending
    /// until [`InFlightGuard::first_byte`] (or the end of the request).
    pub fn begin_request_with_prefill(self: &Arc<Self>, prompt_tokens: u64) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.dispatched.fetch_add(1, Ordering::Relaxed);
        self.pending_prefill
            .fetch_add(prompt_tokens, Ordering::Relaxed);
        InFlightGuard {
            backend: self.clone(),
            prefill: prompt_tokens,
            served: false,
        }
    }
}

/// Holds one in-flight count on a backend; dropping it releases the count.
#[derive(Debug)]
pub struct InFlightGuard {
    backend: Arc<Backend>,
    /// Prefill still counted as pending on the backend.
    prefill: u64,
    served: bool,
}

impl InFlightGuard {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// The answer, a 2xx, arrived in full: the engine finished the request.
    pub fn served(&mut self) {
        self.served = true;
    }

    /// The request's first byte arrived: its prefill is done.
    pub fn first_byte(&mut self) {
        let p = std::mem::take(&mut self.prefill);
        if p > 0 {
            self.backend.pending_prefill.fetch_sub(p, Ordering::Relaxed);
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.first_byte();
        self.backend.completed.fetch_add(1, Ordering::Relaxed);
        if self.served {
            self.backend.served.fetch_add(1, Ordering::Relaxed);
        }
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An accepted scrape kept as a reference: when it started, the engine's count of
/// finished requests in it, and `Backend::dispatched()` once its answer had arrived.
#[derive(Debug, Clone, Copy)]
pub struct FrozenBaseline {
    pub at: Instant,
    pub engine_finished: f64,
    pub dispatched_after: u64,
}

/// The first of the accepted scrapes since which the engine has shown the same token count
/// and KV usage, all of them with requests running (`busy`) or not: what a `/metrics`
/// frozen while it looked busy is detected against (see the scraper).
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub at: Instant,
    pub busy: bool,
    pub tokens: Option<f64>,
    pub kv_usage: Option<f64>,
}

/// What was last observed about one backend.
#[derive(Debug, Clone)]
pub struct BackendState {
    /// The models it serves: the last known list, kept while it is unavailable so that a
    /// request for its model gets 503 (temporarily unavailable), not 404.
    pub models: Vec<String>,
    /// Why the last `/v1/models` failed, if it did.
    pub models_error: Option<String>,
    /// The entries of its `/v1/models` as it wrote them (empty for configured models).
    pub cards: Arc<[serde_json::Value]>,
    /// Bumped when the gateway itself changed the models ([`Fleet::publish_models`]): an
    /// observation that began before carries an older number, and its models are stale.
    pub models_gen: u64,
    /// The engine's vLLM version (`/version`, read with the models; kept when it fails).
    pub version: Option<String>,
    pub observed_at: Option<Instant>,
    /// The engine's load at the last successful `/metrics` scrape.
    pub load: Option<EngineLoad>,
    /// When that scrape started; `None` before the first success.
    pub load_at: Option<Instant>,
    /// `Backend::dispatched()` and `Backend::completed()` when that scrape started.
    pub dispatched_at_scrape: u64,
    pub completed_at_scrape: u64,
    /// What frozen `/metrics` are detected against (see the scraper).
    pub frozen_baseline: Option<FrozenBaseline>,
    pub progress: Option<Progress>,
    /// The largest `running` any scrape has shown, queueing or not.
    pub max_running_seen: f64,
    /// Whether a scrape has shown requests waiting while some ran and the KV cache had
    /// room: the engine has a batch limit, and has reached it (see
    /// [`BackendState::learned_max_running`]). Waiting with the cache nearly full is for
    /// cache blocks, and does not count.
    pub queued_seen: bool,
    /// Why the last scrape failed, if it did.
    pub scrape_error: Option<String>,
    /// Recent mean inter-token latency, time to first token and end-to-end latency
    /// (seconds), smoothed over scrape windows.
    pub itl_s: Option<f64>,
    pub ttft_s: Option<f64>,
    pub e2e_s: Option<f64>,
}

impl BackendState {
    /// The models of a `/v1/models` answer (see [`crate::engine::models::parse_models`]); whether
    /// the list of names changed.
    pub fn set_models(&mut self, cards: Vec<serde_json::Value>) -> bool {
        let models: Vec<String> = cards
            .iter()
            .filter_map(|c| crate::engine::models::card_id(c).map(str::to_string))
            .collect();
        let changed = models != self.models;
        self.models = models;
        self.cards = cards.into();
        changed
    }

    /// The scraped load, if its scrape started at or after `fresh_since` (see
    /// [`fresh_since`]).
    pub fn fresh_load(&self, fresh_since: Option<Instant>) -> Option<&EngineLoad> {
        self.load
            .as_ref()
            .filter(|_| is_fresh(self.load_at, fresh_since))
    }

    /// The engine's batch limit (vLLM's `max_num_seqs`, which it does not export): once
    /// it has been seen queueing, the largest `running` ever seen. A scrape can catch a
    /// request between its arrival and the next step, waiting below the limit; the
    /// largest `running` is still a lower bound of the limit, and the closest seen.
    pub fn learned_max_running(&self) -> Option<f64> {
        self.queued_seen.then_some(self.max_running_seen)
    }

    pub fn unknown(backend: &Backend) -> BackendState {
        BackendState {
            models: backend.static_models.clone().unwrap_or_default(),
            cards: Arc::new([]),
            models_gen: 0,
            models_error: None,
            version: None,
            observed_at: None,
            load: None,
            load_at: None,
            dispatched_at_scrape: 0,
            completed_at_scrape: 0,
            frozen_baseline: None,
            progress: None,
            max_running_seen: 0.0,
            queued_seen: false,
            scrape_error: None,
            itl_s: None,
            ttft_s: None,
            e2e_s: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct BackendEntry {
    pub backend: Arc<Backend>,
    pub state: BackendState,
}

/// An immutable view of the whole fleet.
#[derive(Debug, Default)]
pub struct FleetSnapshot {
    pub backends: Vec<BackendEntry>,
    /// model → indices into `backends` of every backend known to serve it (healthy or not).
    by_model: BTreeMap<String, Vec<usize>>,
    /// The lowest inter-token latency measured on a healthy backend: what a backend not
    /// measured yet (probably idle) is assumed to have.
    pub min_itl_s: Option<f64>,
    /// The highest inter-token latency measured on a healthy backend.
    pub max_itl_s: Option<f64>,
    /// The mean answer, in tokens, of the requests the healthy backends finished lately:
    /// per backend (e2e − TTFT) / ITL + 1 from its smoothed latencies, averaged.
    pub mean_answer_tokens: Option<f64>,
    /// Every backend has the same weight: rendezvous ranks can then be compared without
    /// their logarithm (see `routing::affinity`).
    pub equal_weights: bool,
    /// Per backend (same index as `backends`), what a pick reads that changes only with
    /// the snapshot.
    pub(crate) pick_inputs: Vec<PickInputs>,
    /// The lowest inter-token latency any backend is scored with (measured or assumed):
    /// a bound under every `vllm` estimate.
    pub(crate) itl_floor: f64,
    /// Per LoRA adapter that a backend lists (a model whose card has a `parent`) or
    /// reports in its adapter slots, per backend (same index as `backends`): where a
    /// request for it stands there. Empty when no backend reports slots.
    lora_fit: BTreeMap<String, Box<[LoraFit]>>,
}

impl FleetSnapshot {
    pub fn new(backends: Vec<BackendEntry>) -> FleetSnapshot {
        let mut by_model: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, e) in backends.iter().enumerate() {
            for m in &e.state.models {
                let list = by_model.entry(m.clone()).or_default();
                if !list.contains(&i) {
                    list.push(i);
                }
            }
        }
        // Only from scrapes that still succeed: a failing or frozen backend's last
        // measurement is old, and would flatter every backend scored without one. With
        // the ITL, the batch it was measured at (unknown: an idle one).
        let measured = || {
            backends
                .iter()
                .filter(|e| e.backend.health.checks_up() && e.state.scrape_error.is_none())
        };
        let fastest = measured()
            .filter_map(|e| {
                let running = e.state.load.as_ref().and_then(|l| l.running);
                e.state.itl_s.map(|itl| (itl, running.unwrap_or(0.0)))
            })
            .min_by(|a, b| a.0.total_cmp(&b.0));
        let min_itl_s = fastest.map(|f| f.0);
        let max_itl_s = measured().filter_map(|e| e.state.itl_s).reduce(f64::max);
        let answers: Vec<f64> = measured()
            .filter_map(|e| match (e.state.e2e_s, e.state.ttft_s, e.state.itl_s) {
                (Some(e2e), Some(ttft), Some(itl)) if itl > 0.0 && e2e >= ttft => {
                    Some((e2e - ttft) / itl + 1.0)
                }
                _ => None,
            })
            .collect();
        let mean_answer_tokens =
            (!answers.is_empty()).then(|| answers.iter().sum::<f64>() / answers.len() as f64);
        let equal_weights = backends
            .windows(2)
            .all(|w| w[0].backend.weight == w[1].backend.weight);
        let default_itl = min_itl_s.unwrap_or(pick::DEFAULT_ITL_S);
        let default_per_slot = fastest.map_or(default_itl, |(itl, running)| itl / (running + 1.0));
        let default_cap = backends
            .iter()
            .filter_map(|e| {
                e.backend
                    .max_concurrent_requests
                    .map(f64::from)
                    .or(e.state.learned_max_running())
            })
            .fold(f64::NAN, f64::max);
        let pick_inputs: Vec<PickInputs> = backends
            .iter()
            .map(|e| PickInputs::of(e, default_itl, default_per_slot, default_cap))
            .collect();
        let itl_floor = pick::itl_floor(&pick_inputs);
        let lora_fit = lora_fit(&backends);
        FleetSnapshot {
            backends,
            by_model,
            min_itl_s,
            max_itl_s,
            mean_answer_tokens,
            equal_weights,
            pick_inputs,
            itl_floor,
            lora_fit,
        }
    }

    /// For a request of `model`, per backend (same index as `backends`): where it stands
    /// as to LoRA adapter slots; `None` when `model` is not a LoRA adapter of a backend
    /// that reports its slots.
    pub fn lora_fit(&self, model: &str) -> Option<&[LoraFit]> {
        if self.lora_fit.is_empty() {
            return None;
        }
        self.lora_fit.get(model).map(|v| &**v)
    }

    /// Indices of the backends known to serve `model`, healthy or not; `None` when no
    /// backend has ever served it.
    pub fn serving(&self, model: &str) -> Option<&[usize]> {
        self.by_model.get(model).map(|v| v.as_slice())
    }

    /// The model of a request that names none. vLLM serves such a request with the first
    /// model it lists (its first `--served-model-name`), so through the gateway it is
    /// `configured` (`routing.default_model`) if set, else the first base model (not an
    /// adapter) of the backends in rotation, when they all agree on it; backends out of
    /// rotation count only when none is in it. `Err` with the first models they list when
    /// they differ, or none when no backend lists a model.
    pub fn default_model<'a>(
        &'a self,
        configured: Option<&'a str>,
    ) -> Result<&'a str, Vec<&'a str>> {
        if let Some(m) = configured {
            return Ok(m);
        }
        let first = |e: &'a BackendEntry| -> Option<&'a str> {
            let st = &e.state;
            if st.cards.is_empty() {
                return st.models.first().map(String::as_str);
            }
            st.cards
                .iter()
                .filter(|c| c.get("parent").is_none_or(serde_json::Value::is_null))
                .find_map(crate::engine::models::card_id)
        };
        let distinct = |up: bool| {
            let mut firsts: Vec<&str> = self
                .backends
                .iter()
                .filter(|e| !up || e.backend.health.routable_ignoring_breaker())
                .filter_map(first)
                .collect();
            firsts.sort_unstable();
            firsts.dedup();
            firsts
        };
        let mut firsts = distinct(true);
        if firsts.is_empty() {
            firsts = distinct(false);
        }
        match firsts.as_slice() {
            [only] => Ok(only),
            _ => Err(firsts),
        }
    }

    /// The vLLM version the fleet offers (`GET /version`): the oldest that the backends
    /// in rotation report (see [`crate::engine::models::oldest_version`]).
    pub fn version(&self) -> Option<&str> {
        crate::engine::models::oldest_version(
            self.backends
                .iter()
                .filter(|e| e.backend.health.routable_ignoring_breaker())
                .filter_map(|e| e.state.version.as_deref()),
        )
    }

    /// `GET /v1/models`: an entry per model of [`FleetSnapshot::healthy_models`], as the
    /// first backend in rotation that serves it describes it, with the smallest
    /// `max_model_len` those backends report (a prompt sized to it fits wherever it goes);
    /// a minimal entry for a model only the config names. Each of the `aliases` whose
    /// model is listed gets that model's entry under its own name (in place of a model of
    /// the same name, which the alias hides).
    pub fn model_cards(
        &self,
        aliases: &std::collections::BTreeMap<String, String>,
    ) -> Vec<serde_json::Value> {
        let mut cards = self.served_cards();
        let aliased: Vec<serde_json::Value> = aliases
            .iter()
            .filter_map(|(alias, target)| {
                let mut card = cards
                    .iter()
                    .find(|c| crate::engine::models::card_id(c) == Some(target.as_str()))?
                    .clone();
                card["id"] = alias.as_str().into();
                Some(card)
            })
            .collect();
        cards.retain(|c| {
            crate::engine::models::card_id(c).is_none_or(|id| !aliases.contains_key(id))
        });
        cards.extend(aliased);
        cards.sort_by(|a, b| {
            crate::engine::models::card_id(a).cmp(&crate::engine::models::card_id(b))
        });
        cards
    }

    /// [`FleetSnapshot::model_cards`] of the models the backends serve.
    fn served_cards(&self) -> Vec<serde_json::Value> {
        let up = |&&i: &&usize| self.backends[i].backend.health.routable_ignoring_breaker();
        self.by_model
            .iter()
            .filter(|(_, idx)| idx.iter().any(|i| up(&i)))
            .map(|(m, idx)| {
                let cards = idx.iter().filter(up).filter_map(|&i| {
                    let st = &self.backends[i].state;
                    st.cards
                        .iter()
                        .find(|c| crate::engine::models::card_id(c) == Some(m))
                });
                let shortest = cards
                    .clone()
                    .filter_map(|c| c.get("max_model_len")?.as_u64())
                    .min();
                let mut card = cards
                    .clone()
                    .next()
                    .cloned()
                    .unwrap_or_else(|| crate::engine::models::model_card(m));
                if let (Some(n), Some(o)) = (shortest, card.as_object_mut()) {
                    o.insert("max_model_len".into(), n.into());
                }
                card
            })
            .collect()
    }

    /// The union of the models of all backends that take requests (checks passing, not
    /// draining; an open circuit is a passing state), sorted.
    pub fn healthy_models(&self) -> Vec<String> {
        self.by_model
            .iter()
            .filter(|(_, idx)| {
                idx.iter()
                    .any(|&i| self.backends[i].backend.health.routable_ignoring_breaker())
            })
            .map(|(m, _)| m.clone())
            .collect()
    }
}

/// [`FleetSnapshot::lora_fit`] of every adapter the `backends` list or hold.
fn lora_fit(backends: &[BackendEntry]) -> BTreeMap<String, Box<[LoraFit]>> {
    let slots: Vec<Option<&crate::engine::metrics::LoraSlots>> = backends
        .iter()
        .map(|e| e.state.load.as_ref().and_then(|l| l.lora.as_ref()))
        .collect();
    if slots.iter().all(Option::is_none) {
        return BTreeMap::new();
    }
    let mut adapters: std::collections::BTreeSet<&str> = std::collections::BTreeSet::new();
    for (e, s) in backends.iter().zip(&slots) {
        adapters.extend(
            e.state
                .cards
                .iter()
                .filter(|c| c.get("parent").is_some_and(|p| !p.is_null()))
                .filter_map(crate::engine::models::card_id),
        );
        if let Some(s) = s {
            adapters.extend(s.running.iter().chain(&s.waiting).map(String::as_str));
        }
    }
    adapters
        .into_iter()
        .map(|a| {
            let fit = slots
                .iter()
                .map(|s| s.map_or(LoraFit::Unknown, |s| s.fit(a)))
                .collect();
            (a.to_string(), fit)
        })
        .collect()
}

/// The shared handle: the current snapshot, swapped atomically.
#[derive(Debug)]
pub struct Fleet {
    current: ArcSwap<FleetSnapshot>,
}

impl Fleet {
    /// A fleet of the configured backends, none of them checked yet.
    pub fn new(backends: &[BackendConfig]) -> Arc<Fleet> {
        let entries = backends
            .iter()
            .map(|c| {
                let backend = Backend::new(c);
                let state = BackendState::unknown(&backend);
                BackendEntry { backend, state }
            })
            .collect();
        Arc::new(Fleet {
            current: ArcSwap::from_pointee(FleetSnapshot::new(entries)),
        })
    }

    pub fn load(&self) -> Arc<FleetSnapshot> {
        self.current.load_full()
    }

    /// Publishes the backends a reload planned ([`Fleet::plan_reconfigure`]). A backend
    /// kept from before takes the state observed since the plan was made (scrapes go on
    /// while a reload checks its new backends), not the older one the plan copied.
    pub fn replace(&self, planned: Vec<BackendEntry>) {
        self.current.rcu(|cur| {
            let entries = planned
                .iter()
                .map(|p| BackendEntry {
                    backend: p.backend.clone(),
                    state: cur
                        .backends
                        .iter()
                        .find(|e| Arc::ptr_eq(&e.backend, &p.backend))
                        .map_or_else(|| p.state.clone(), |e| e.state.clone()),
                })
                .collect();
            FleetSnapshot::new(entries)
        });
    }

    /// Publishes newly observed states. Backends removed meanwhile (a reload) stay
    /// removed; backends added meanwhile keep theirs.
    pub fn update_states(&self, observed: &[(Arc<Backend>, BackendState)]) {
        self.current.rcu(|cur| {
            let entries = cur
                .backends
                .iter()
                .map(|e| BackendEntry {
                    backend: e.backend.clone(),
                    state: match observed.iter().find(|(b, _)| Arc::ptr_eq(b, &e.backend)) {
                        None => e.state.clone(),
                        Some((_, s)) if s.models_gen < e.state.models_gen => {
                            // Begun before the gateway changed its models: keep those.
                            let mut s = s.clone();
                            s.models.clone_from(&e.state.models);
                            s.cards = e.state.cards.clone();
                            s.models_error.clone_from(&e.state.models_error);
                            s.observed_at = e.state.observed_at;
                            s.models_gen = e.state.models_gen;
                            s
                        }
                        Some((_, s)) => s.clone(),
                    },
                })
                .collect();
            FleetSnapshot::new(entries)
        });
    }

    /// Publishes `backend`'s models as read just now (after the gateway loaded or
    /// unloaded a LoRA adapter there), and has the next scrape read them again.
    pub fn publish_models(&self, backend: &Arc<Backend>, cards: Vec<serde_json::Value>) {
        self.current.rcu(|cur| {
            let entries = cur
                .backends
                .iter()
                .map(|e| {
                    let mut state = e.state.clone();
                    if Arc::ptr_eq(&e.backend, backend) {
                        state.set_models(cards.clone());
                        state.models_error = None;
                        state.observed_at = None;
                        state.models_gen += 1;
                    }
                    BackendEntry {
                        backend: e.backend.clone(),
                        state,
                    }
                })
                .collect();
            FleetSnapshot::new(entries)
        });
    }

    /// Replaces the set of backends with `configs` (a reload). A backend whose name, url
    /// and settings are unchanged keeps its identity: its counters, health, circuit and
    /// observed state; only its drain flag follows the new config. A changed one starts
    /// anew but keeps its health-check verdict, so it is not out of rotation until checked
    /// (unless its address changed: that is another server).
    pub fn reconfigure(&self, configs: &[BackendConfig]) -> Reconfigured {
        let (entries, report) = self.plan_reconfigure(configs);
        self.replace(entries);
        report
    }

    /// The entries [`Fleet::reconfigure`] would publish, and what changed.
    pub fn plan_reconfigure(&self, configs: &[BackendConfig]) -> (Vec<BackendEntry>, Reconfigured) {
        let mut report = Reconfigured::default();
        let cur = self.load();
        let entries: Vec<BackendEntry> = configs
            .iter()
            .map(|c| {
                let old = cur.backends.iter().find(|e| e.backend.name == c.name);
                match old {
                    Some(e) if e.backend.same_config(c) => {
                        if e.backend.health.is_draining() != c.drain {
                            report.drain_changed.push(c.name.clone());
                        }
                        e.backend.health.set_draining(c.drain);
                        e.clone()
                    }
                    Some(e) => {
                        report.changed.push(c.name.clone());
                        let backend = Backend::new(c);
                        // The same server with other settings keeps its verdict; another
                        // server (its name resolves elsewhere now) is judged afresh.
                        if e.backend.addr == c.addr {
                            backend.health.inherit_checks(&e.backend.health);
                        }
                        let mut state = BackendState::unknown(&backend);
                        if c.static_models.is_none() && e.backend.url == c.url {
                            state.models = e.state.models.clone();
                            state.cards = e.state.cards.clone();
                        }
                        BackendEntry { backend, state }
                    }
                    None => {
                        report.added.push(c.name.clone());
                        let backend = Backend::new(c);
                        let state = BackendState::unknown(&backend);
                        BackendEntry { backend, state }
                    }
                }
            })
            .collect();
        report.removed = cur
            .backends
            .iter()
            .filter(|e| !configs.iter().any(|c| c.name == e.backend.name))
            .map(|e| e.backend.name.clone())
            .collect();
        // The scraper merges its observations into whatever is current (`update_states`),
        // so a plain store of these cannot be undone by a pass in progress.
        (entries, report)
    }
}

/// What [`Fleet::reconfigure`] did, by backend name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconfigured {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub drain_changed: Vec<String>,
}

impl Reconfigured {
    pub fn is_empty(&self) -> bool {
        *self == Reconfigured::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(name: &str, models: Option<&[&str]>) -> BackendConfig {
        BackendConfig {
            static_models: models.map(|m| m.iter().map(|s| s.to_string()).collect()),
            ..BackendConfig::new(
                name,
                format!("http://{name}"),
                "127.0.0.1:1".parse().unwrap(),
            )
        }
    }

    #[test]
    fn guard_counts_and_releases() {
        let b = Backend::new(&cfg("a", None));
        let g1 = b.begin_request();
        let g2 = b.begin_request();
        assert_eq!(b.in_flight(), 2);
        drop(g1);
        assert_eq!(b.in_flight(), 1);
        drop(g2);
        assert_eq!(b.in_flight(), 0);
        let mut g = b.begin_request_with_prefill(300);
        let _h = b.begin_request_with_prefill(200);
        assert_eq!(b.pending_prefill(), 500);
        g.first_byte();
        g.first_byte();
        assert_eq!(b.pending_prefill(), 200);
        drop(g);
        assert_eq!(b.pending_prefill(), 200);
        drop(_h);
        assert_eq!(
            (b.pending_prefill(), b.in_flight(), b.completed()),
            (0, 0, 4)
        );
    }

    #[test]
    fn models_index_and_union_of_healthy() {
        let fleet = Fleet::new(&[cfg("a", Some(&["m1", "m2"])), cfg("b", Some(&["m2", "m3"]))]);
        let snap = fleet.load();
        assert_eq!(snap.serving("m2"), Some(&[0usize, 1][..]));
        assert!(snap.healthy_models().is_empty(), "nothing is checked yet");
        snap.backends[1]
            .backend
            .health
            .observe_check(Ok(()), &Default::default());
        assert_eq!(fleet.load().healthy_models(), vec!["m2", "m3"]);
        assert_eq!(fleet.load().serving("m1"), Some(&[0usize][..]));
        assert_eq!(fleet.load().serving("nope"), None);
        // Configured models are described minimally.
        let cards = fleet.load().model_cards(&Default::default());
        let ids: Vec<&serde_json::Value> = cards.iter().map(|c| &c["id"]).collect();
        assert_eq!(ids, ["m2", "m3"]);
        assert_eq!(cards[0], crate::engine::models::model_card("m2"));
    }

    #[test]
    fn the_default_model_is_the_first_base_model_the_replicas_in_rotation_agree_on() {
        let fleet = Fleet::new(&[cfg("a", None), cfg("b", None), cfg("c", Some(&["m", "x"]))]);
        let card = |id: &str, parent: Option<&str>| serde_json::json!({"id": id, "parent": parent});
        let mut entries: Vec<BackendEntry> = fleet.load().backends.clone();
        // An adapter listed first is not a default; the second name of a base is not.
        entries[0].state.set_models(vec![
            card("sql", Some("m")),
            card("m", None),
            card("alias", None),
        ]);
        entries[1].state.set_models(vec![card("m", None)]);
        let states: Vec<_> = entries.into_iter().map(|e| (e.backend, e.state)).collect();
        fleet.update_states(&states);
        let snap = fleet.load();
        // None in rotation: every backend counts, and the configured `c` lists `m` first.
        assert_eq!(snap.default_model(None), Ok("m"));
        assert_eq!(snap.default_model(Some("sql")), Ok("sql"), "configured");
        let up = |i: usize| {
            snap.backends[i]
                .backend
                .health
                .observe_check(Ok(()), &Default::default())
        };
        up(1);
        assert_eq!(fleet.load().default_model(None), Ok("m"));
        // A backend in rotation whose first model differs makes it ambiguous.
        let other = Fleet::new(&[cfg("a", Some(&["m"])), cfg("b", Some(&["n", "m"]))]);
        assert_eq!(other.load().default_model(None), Err(vec!["m", "n"]));
        other.load().backends[1]
            .backend
            .health
            .observe_check(Ok(()), &Default::default());
        assert_eq!(
            other.load().default_model(None),
            Ok("n"),
            "only b is in rotation"
        );
        let empty = Fleet::new(&[cfg("a", None)]);
        assert_eq!(empty.load().default_model(None), Err(vec![]));
    }

    #[test]
    fn models_the_gateway_published_outlive_a_scrape_begun_before() {
        let fleet = Fleet::new(&[cfg("a", None)]);
        let card = |id: &str| serde_json::json!({"id": id});
        let backend = fleet.load().backends[0].backend.clone();
        let mut before = fleet.load().backends[0].state.clone();
        // A scrape begins; meanwhile an adapter is loaded and published.
        fleet.publish_models(&backend, vec![card("base"), card("sql")]);
        assert!(
            fleet.load().backends[0].state.observed_at.is_none(),
            "read again next"
        );
        before.set_models(vec![card("base")]);
        before.scrape_error = Some("seen by the scrape".into());
        fleet.update_states(&[(backend.clone(), before)]);
        let st = fleet.load().backends[0].state.clone();
        assert_eq!(st.models, ["base", "sql"], "the published models stay");
        assert_eq!(
            st.scrape_error.as_deref(),
            Some("seen by the scrape"),
            "the rest lands"
        );
        // A scrape begun after sees what the replica says now.
        let mut after = st.clone();
        after.set_models(vec![card("base")]);
        fleet.update_states(&[(backend, after)]);
        assert_eq!(fleet.load().backends[0].state.models, ["base"]);
    }

    #[test]
    fn model_cards_are_the_replicas_own_with_the_shortest_length() {
        let fleet = Fleet::new(&[cfg("a", None), cfg("b", None), cfg("c", None)]);
        let mut entries: Vec<BackendEntry> = fleet.load().backends.clone();
        let card = |len: u64, root: &str| serde_json::json!({"id": "m", "object": "model", "root": root, "max_model_len": len});
        entries[0].state.set_models(vec![card(4096, "/a")]);
        entries[1].state.set_models(vec![card(2048, "/b")]);
        assert!(entries[2].state.set_models(vec![card(1024, "/c")]));
        assert!(
            !entries[2].state.set_models(vec![card(1024, "/c")]),
            "same names"
        );
        let states: Vec<_> = entries.into_iter().map(|e| (e.backend, e.state)).collect();
        fleet.update_states(&states);
        let snap = fleet.load();
        for i in [0, 1] {
            snap.backends[i]
                .backend
                .health
                .observe_check(Ok(()), &Default::default());
        }
        // `c` is not in rotation: its shorter length does not count.
        let cards = fleet.load().model_cards(&Default::default());
        assert_eq!(
            cards,
            [card(2048, "/a")],
            "the first one's, with the shortest length"
        );
        // An alias of a listed model has its entry under its own name; an alias hides a
        // model of its name; an alias of a model not listed is not listed.
        let aliases: std::collections::BTreeMap<String, String> =
            [("gpt", "m"), ("m", "m2"), ("old", "gone")]
                .map(|(a, t)| (a.to_string(), t.to_string()))
                .into();
        let cards = fleet.load().model_cards(&aliases);
        let mut want = card(2048, "/a");
        want["id"] = "gpt".into();
        assert_eq!(cards, [want]);
    }
}
