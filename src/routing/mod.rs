//! Replica selection: a pure function of (snapshot, request, already-tried set, now)
//! that returns candidates in preference order. The proxy takes the first; on a retry it
//! asks again with the failed backend in the tried set.
//!
//! Policies (`routing.policy`):
//! - `round-robin`: in turn, per model;
//! - `least-request`: fewest requests in flight from this gateway;
//! - `power-of-two`: the less busy (in flight) of two random replicas;
//! - `vllm` (default): the lowest [`vllm_score`], an estimate of the time to first token;
//!   with `routing.affinity.enabled` (the default), the request's prefix-affinity home
//!   instead when that is cheap: its estimate is within the load factor of the lowest,
//!   plus the prefill its prefix cache likely saves;
//! - `affinity`: the affinity home unless its load is above the bound (see `affinity.rs`).

pub mod affinity;

use smallvec::SmallVec;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::config::Policy;
use crate::engine::metrics::LoraFit;
use crate::fleet::pick::{count, PickInputs, DEFAULT_OUTPUT_TOKENS};
use crate::fleet::{fresh_since, Backend, FleetSnapshot};
use affinity::AffinityKey;

/// Why no candidate was returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoCandidate {
    /// No backend has ever served this model.
    UnknownModel,
    /// Backends serve it, but none is healthy and untried.
    Unavailable,
}

/// Why a backend was picked: the access log's `chosen_by` and the `reason` label of
/// `vllm_edge_selections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// It was the only healthy, untried backend serving the model.
    OnlyCandidate,
    /// `round-robin`: its turn.
    Rotation,
    /// `least-request`: fewest requests in flight from this gateway.
    FewestInFlight,
    /// `power-of-two`: the less busy of two random picks.
    TwoChoices,
    /// `vllm`: the lowest estimated wait, from a fresh scrape of its engine.
    LowestScore,
    /// `vllm`: the lowest estimate, but its scrape is stale or failing, so the estimate
    /// rests on this gateway's own accounting.
    LocalEstimate,
    /// Every backend's circuit was open: picked anyway rather than refusing.
    OpenCircuitFallback,
    /// The request's prefix-affinity home (the first backend in its key's order).
    AffinityHome,
    /// The affinity home was over the load bound: the next backend in the key's order
    /// that is not.
    AffinitySpill,
}

impl Reason {
    pub const ALL: [Reason; 9] = [
        Reason::OnlyCandidate,
        Reason::Rotation,
        Reason::FewestInFlight,
        Reason::TwoChoices,
        Reason::LowestScore,
        Reason::LocalEstimate,
        Reason::OpenCircuitFallback,
        Reason::AffinityHome,
        Reason::AffinitySpill,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::OnlyCandidate => "only_candidate",
            Reason::Rotation => "rotation",
            Reason::FewestInFlight => "fewest_in_flight",
            Reason::TwoChoices => "two_choices",
            Reason::LowestScore => "lowest_score",
            Reason::LocalEstimate => "local_estimate",
            Reason::OpenCircuitFallback => "open_circuit_fallback",
            Reason::AffinityHome => "affinity_home",
            Reason::AffinitySpill => "affinity_spill",
        }
    }
}

/// The backend [`Selector::best`] picked, and why.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    /// Index in the snapshot.
    pub index: usize,
    pub reason: Reason,
    /// The `vllm` policy's estimate for it, in seconds.
    pub score_s: Option<f64>,
}

/// Whether backend `i` may be picked. Strictly: checks pass, not draining, circuit
/// closed. When no backend of a model is strictly routable, the open circuits are ignored:
/// a fleet-wide slowdown that opened every circuit must degrade service, not stop it.
fn routable(snap: &FleetSnapshot, i: usize, strict: bool) -> bool {
    let h = &snap.pick_inputs[i].backend.health;
    if strict {
        h.routable()
    } else {
        h.routable_ignoring_breaker()
    }
}

/// Whether a request for `model` has a backend to go to now: the answer
/// [`Selector::best`] gives its first attempt when it has none, known before picking (the
/// gateway refuses such a request before proxying; see `proxy`).
pub fn availability(snap: &FleetSnapshot, model: &str) -> Result<(), NoCandidate> {
    let serving = snap.serving(model).ok_or(NoCandidate::UnknownModel)?;
    if serving.iter().any(|&i| routable(snap, i, false)) {
        Ok(())
    } else {
        Err(NoCandidate::Unavailable)
    }
}

/// The model a request (read by [`crate::openai::inspect_request`]) is routed by and sent
/// as under `cfg`: [`crate::openai::route_model`] with the fleet's
/// [`FleetSnapshot::default_model`] and `cfg`'s aliases.
pub fn route_model(
    snap: &FleetSnapshot,
    cfg: &crate::config::Config,
    content_type: Option<&[u8]>,
    body: &[u8],
    info: &crate::openai::RoutingInfo,
) -> Result<Option<crate::openai::Renamed>, crate::openai::ApiError> {
    crate::openai::route_model(
        content_type,
        body,
        info,
        &cfg.model_aliases,
        || snap.default_model(cfg.default_model.as_deref()),
        cfg.limits.max_json_depth,
    )
}

/// What selection knows about a request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub model: &'a str,
    /// Estimated prompt tokens.
    pub prompt_tokens: usize,
    pub max_tokens: Option<u64>,
    /// The request's prefix-affinity key, when the policy uses affinity and the request
    /// has one.
    pub affinity: Option<Sticky>,
}

impl<'a> Request<'a> {
    /// What selection knows of an inspected request under `cfg`. Its affinity `key`
    /// counts only while the policy uses affinity (a reload may have changed the policy
    /// since the key was made), held to the configured load factor and to where the
    /// gateway's placement moved the key.
    pub fn of(
        info: &'a crate::openai::RoutingInfo,
        key: Option<AffinityKey>,
        cfg: &crate::config::Config,
        placer: &affinity::Placer,
    ) -> Request<'a> {
        Request {
            model: &info.model,
            prompt_tokens: info.prompt_bytes / BYTES_PER_TOKEN,
            max_tokens: info.max_tokens,
            affinity: key
                .filter(|_| cfg.affinity.used_by(cfg.policy))
                .map(|key| Sticky {
                    key,
                    load_factor: cfg.affinity.load_factor,
                    placed: placer.moved(key.key),
                }),
        }
    }

    /// Prompt tokens the chosen backend will likely have to prefill for this request:
    /// all of them, except at the key's home, which has likely cached the reusable
    /// prefix. This is what the request adds to the backend's pending prefill. Counting
    /// the whole prompt at the home made the home of a popular prefix look busier the
    /// more of its requests were in flight, and pushed them off it (issue 8: one gateway
    /// kept fewer turns home than three, which each saw a third of the traffic).
    pub fn prefill_tokens(&self, choice: &Choice) -> usize {
        let reused = match (&self.affinity, choice.reason) {
            (Some(s), Reason::AffinityHome) => s.key.reusable_bytes / BYTES_PER_TOKEN,
            _ => 0,
        };
        self.prompt_tokens.saturating_sub(reused)
    }
}

/// A request's affinity key and the load bound it is held to.
#[derive(Debug, Clone, Copy)]
pub struct Sticky {
    pub key: AffinityKey,
    /// `routing.affinity.load_factor`.
    pub load_factor: f64,
    /// The node id of the backend the key is placed on when that is not its rendezvous
    /// home (a long-lived prefix moved off a home whose share of KV cache it would
    /// overfill; see [`crate::routing::affinity::Placer`]): that backend comes first in the key's
    /// order, then the rest in rendezvous order.
    pub placed: Option<u64>,
}

/// Bytes of prompt JSON per token, for estimating prompt tokens without a tokenizer
/// (English text runs about 4 characters per token).
pub const BYTES_PER_TOKEN: usize = 4;

/// Prompt tokens whose prefill costs about as much as one decode step. It varies with
/// the GPU (about 220 on an H100 running Llama-3-8B, 120 on an A100) and cannot be told
/// apart from decode speed in vLLM's metrics; erring low sends long prompts to the
/// replicas with the shortest steps, where their prefill is quickest.
const PREFILL_TOKENS_PER_STEP: f64 = 150.0;
/// A new request waits for the rest of the step in progress: half a step on average.
const RESIDUAL_STEP: f64 = 0.5;
/// Unknown engine state (stale or failing scrape) is assumed this much busier than what
/// this gateway's own accounting shows: such a backend is never mistaken for idle.
const STALE_PENALTY: f64 = 1.5;
/// KV usage is capped here in the pressure term, which would otherwise be infinite.
const MAX_KV_FOR_PRESSURE: f64 = 0.99;

/// The `vllm` policy's score of one backend for one request: an estimate, in seconds, of
/// the time until the request's first token, from the last scrape of the engine plus
/// what this gateway sent since.
///
/// ```text
/// since   = requests sent to the backend after its last scrape began
/// done    = of those and earlier ones, requests that finished since then
/// in      = running + waiting + since − done    (the engine's sequences now)
/// itl     = measured inter-token latency        (or 15 ms / weight before any)
/// step    = itl × (in + 1) / (running + 1)      step time with our request in the batch
/// cap     = max_concurrent_requests, else once it has queued the largest `running` seen,
///           else the largest cap of any backend in the fleet
/// ahead   = max(in, ours) + 1 − cap  (if positive; without a cap: waiting), where
///           ours = this gateway's requests in flight there
/// queue   = ahead × e2e / cap                   waiting for departures
/// k       = kv_usage + (prompt + max_tokens) / kv_capacity,  at most 0.99
/// pending = prompt tokens of this gateway's streams there still without a first byte
/// prefill = itl × (pending + prompt) / 150
/// lora    = for a request naming a LoRA adapter (vllm:lora_requests_info): 0 where the
///           adapter holds a slot, e2e / cap (one request ahead; 0 without a cap) where
///           it would take a free one, e2e where every slot is held by others
/// score   = 0.5 × step + max(step, prefill) + queue + step × k² / (1 − k) + lora
/// ```
///
/// Why each term:
/// - `step`: vLLM admits a request at the next step while it has room, so the first
///   token comes after the rest of the current step (half of one on average) and the
///   step that carries the request's prefill; a step's duration is what differs between
///   replicas (a slower GPU, a bigger batch). The measured ITL includes the GPU's speed
///   and the current batch; scaling it by the batch growth our request and the
///   dispatched-since-scrape requests cause is pessimistic for small batches (step time
///   has a large fixed part), which steers work to idle replicas without oscillating.
/// - `since` and `done`: requests sent between two scrapes are not in the engine's numbers
///   yet, and requests of ours that finished have left it; counting both keeps a burst
///   from herding onto the replica that looked idle, and keeps the estimate current
///   between scrapes.
/// - `queue`: vLLM runs at most `max_num_seqs` sequences (it does not export the limit:
///   the gateway learns it, as `running` stops growing while requests wait); beyond it a
///   new request waits for departures, which happen at `cap / e2e` per second (Little's
///   law). Queueing dominates TTFT when present. A replica that never queued has taught
///   nothing about its limit; it is assumed to share the fleet's (replicas usually run
///   the same engine flags), so a slower replica is not filled past it unseen.
/// - `ahead` counts at least this gateway's own requests in flight there: one still on
///   its way into the engine when the scrape was taken is in neither the engine's numbers
///   nor `since`, and missing one at a full batch is missing the whole queue term. (Only
///   there: in the step term, requests of ours that the engine has finished and whose
///   answers are still on their way would count as batch growth.)
/// - `k²/(1−k)`: near a full KV cache vLLM preempts running requests (recomputing them)
///   and stops admitting; negligible below half full, dominant near full. The request's
///   own footprint counts, so a long prompt avoids a nearly full replica.
/// - `prefill`: a new request's first token waits for its own prefill and for the
///   prefill queued before it, each chunk of the step budget costing about a decode step
///   at the replica's speed; this is what differs most between replicas when requests
///   arrive fast (the ITL, mostly decode steps, hides it). A short prefill rides in the
///   next step at no extra cost (a step's time is mostly reading the weights), so the
///   estimate is the larger of one step and the prefill, not their sum: adding both
///   counted the prefill step twice and made a replica with a slightly longer step look
///   worse than one whose batch is full (the routing bound, `benches/routing_bound.rs`).
/// - `lora`: vLLM batches at most `--max-loras` adapters at once. A request for another
///   adapter is deferred (it waits while later requests pass it) until one of the
///   batch's adapters has no request running, at least the rest of one request's life
///   and longer while that adapter's requests keep coming; one mean request duration is
///   the estimate. Where no replica has a slot, every one carries the term and the order
///   is the other terms'. Taking a free slot costs one request ahead in the queue: it
///   keeps the slot from adapters that have none, and left free to the first adapter
///   that came, slots fragmented (an adapter held slots on every replica while another
///   waited on all of them; on the LoRA workload of `benches/routing_quality.rs` this
///   cut the TTFT p99 at 90% load from 25 s to 0.3 s). Adapters this gateway sent since
///   the scrape count as holding slots (`Scorer::fit_now`): a burst of new adapters
///   between two scrapes took the same free slot, one after the other.
/// - A stale or failing scrape falls back to this gateway's in-flight count as the batch
///   (`in`), each sequence costing what one cost at its last scrape (`itl / (running +
///   1)`, or the fleet's fastest replica's when it never had one), and multiplies the
///   score by 1.5. The step must grow with those requests: a constant estimate would
///   become the lowest as soon as the fresh replicas' grew, and every request after that
///   would herd onto the replica nothing is known about.
///
/// `fresh_since` is [`fresh_since`]`(now, stale_after)`, computed once per pick. Backend
/// `i` of `snap` is scored from its [`PickInputs`] and its live counters.
pub fn vllm_score(
    snap: &FleetSnapshot,
    i: usize,
    req: &Request,
    fresh_since: Option<Instant>,
) -> f64 {
    Scorer::new(snap, req, fresh_since).score(snap, i)
}

/// [`vllm_score`] for one request: what depends only on the request and the time is
/// computed once per pick, then [`Scorer::score`] scores each backend.
#[derive(Debug, Clone, Copy)]
pub struct Scorer<'a> {
    fresh_since: Option<Instant>,
    /// The request's prompt tokens.
    prompt: f64,
    /// Its KV footprint: prompt plus output tokens.
    own: f64,
    /// When the request names a LoRA adapter, per backend: where it stands as to adapter
    /// slots ([`FleetSnapshot::lora_fit`]).
    lora_fit: Option<&'a [LoraFit]>,
    /// The request's model (its adapter, with `lora_fit`).
    model: &'a str,
}

impl<'a> Scorer<'a> {
    /// For `req` on the backends of `snap` (the snapshot it will score).
    pub fn new(snap: &'a FleetSnapshot, req: &Request<'a>, fresh_since: Option<Instant>) -> Self {
        let prompt = req.prompt_tokens as f64;
        Scorer {
            fresh_since,
            prompt,
            own: prompt + req.max_tokens.map_or(DEFAULT_OUTPUT_TOKENS, |m| m as f64),
            lora_fit: snap.lora_fit(req.model),
            model: req.model,
        }
    }

    /// Backend `i` of `snap`, from its [`PickInputs`] and its live counters.
    #[inline(always)]
    pub fn score(&self, snap: &FleetSnapshot, i: usize) -> f64 {
        self.terms(snap, i).score
    }

    /// [`Scorer::score`] with its terms (what `/explain` shows).
    #[inline(always)]
    pub fn terms(&self, snap: &FleetSnapshot, i: usize) -> Terms {
        let p = &snap.pick_inputs[i];
        let b = &*p.backend;
        let (running, waiting, in_engine, fresh) = engine_now(p, b, self.fresh_since);
        let itl = p.itl;
        // Stale or failing: the batch is this gateway's requests there, each costing what
        // a sequence cost at the last scrape (or at the fleet's fastest replica).
        let step = if !fresh || !p.running.is_nan() {
            p.itl_per_slot * (in_engine + 1.0)
        } else {
            itl * (in_engine + 1.0) / (running + 1.0)
        };

        // The batch limit: configured, else learned from the engine queueing; beyond it a
        // request waits for departures.
        let ahead = if p.cap.is_nan() {
            waiting
        } else {
            // Never fewer sequences than this gateway's own requests there: one on its
            // way into the engine when the scrape was taken is in neither count, and
            // missing it at a full batch misses the whole queue.
            let seqs = in_engine.max(b.in_flight() as f64);
            (seqs + 1.0 - p.cap).max(0.0)
        };
        let queue = if ahead <= 0.0 {
            0.0
        } else if !p.cap.is_nan() || !p.running.is_nan() {
            ahead * p.queue_per_ahead
        } else {
            ahead * p.e2e / running.max(1.0)
        };

        let pressure = if fresh && !p.kv.is_nan() {
            let k = (p.kv + self.own * p.inv_kv_capacity).min(MAX_KV_FOR_PRESSURE);
            if k > 0.0 {
                step * k * k / (1.0 - k)
            } else {
                0.0
            }
        } else {
            0.0
        };
        // Our prompt's prefill waits behind the prefill already queued there by this
        // gateway.
        let prefill_tokens = count(b.pending_prefill()) + self.prompt;
        let prefill = itl * prefill_tokens * (1.0 / PREFILL_TOKENS_PER_STEP);

        // A LoRA adapter that has no slot there waits until one of the batch's adapters
        // has no request left: about one request's life.
        let fit = match self.lora_fit.and_then(|f| f.get(i)) {
            Some(&fit) if fresh => self.fit_now(snap, i, fit),
            _ => LoraFit::Unknown,
        };
        let lora = match fit {
            LoraFit::Full => p.e2e,
            // Taking a free slot keeps it from adapters that have none: it costs what one
            // request ahead in the queue does (`e2e / cap`), so an adapter stays where it
            // runs unless that is a queue place busier. Without a batch limit, configured
            // or learned, there is no queue place to weigh it against: no cost.
            LoraFit::Free if !p.cap.is_nan() => p.queue_per_ahead,
            _ => 0.0,
        };

        // The rest of the step in progress, then the steps that carry the prefill queued
        // ahead and ours: one at least, more when that prefill outweighs a step.
        let score = RESIDUAL_STEP * step + step.max(prefill) + queue + pressure + lora;
        Terms {
            step,
            prefill,
            queue,
            pressure,
            lora,
            lora_fit: fit,
            sequences: in_engine,
            fresh,
            score: if fresh { score } else { score * STALE_PENALTY },
        }
    }
}

impl Scorer<'_> {
    /// `fit`, the request's adapter on backend `i` as of its scrape, updated with the
    /// adapters this gateway sent there since: the request's own now holds a slot, and
    /// others may have taken the free ones (a burst of new adapters between two scrapes
    /// would otherwise all count on the same free slot).
    fn fit_now(&self, snap: &FleetSnapshot, i: usize, fit: LoraFit) -> LoraFit {
        let e = &snap.backends[i];
        let slots = e.state.load.as_ref().and_then(|l| l.lora.as_ref());
        let (LoraFit::Free, Some(slots)) = (fit, slots) else {
            return fit;
        };
        let (mut own, mut taken) = (false, 0);
        let since = snap.pick_inputs[i].dispatched_at;
        e.backend.adapters_sent_since(since, |a| {
            if a == self.model {
                own = true;
            } else if !slots.running.iter().any(|r| r == a) {
                taken += 1;
            }
        });
        if own {
            LoraFit::Active
        } else if slots.running.len() + taken >= slots.max {
            LoraFit::Full
        } else {
            LoraFit::Free
        }
    }
}

/// The parts of one [`vllm_score`], in seconds, before the stale penalty (see the
/// formula there): `score = (0.5 × step + max(step, prefill) + queue + pressure + lora)`,
/// times 1.5 when not `fresh`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Terms {
    /// One engine step with this request in the batch.
    pub step: f64,
    /// This request's prefill and the prefill queued ahead of it by this gateway.
    pub prefill: f64,
    /// Waiting for departures beyond the batch limit.
    pub queue: f64,
    /// KV-cache pressure (`step × k² / (1 − k)`).
    pub pressure: f64,
    /// Waiting for a LoRA adapter slot, or taking a free one.
    pub lora: f64,
    /// Where the request's LoRA adapter stands there ([`LoraFit::Unknown`] for a base
    /// model, or with a stale scrape).
    pub lora_fit: LoraFit,
    /// The engine's sequences now, as estimated (scraped plus sent since, minus done).
    pub sequences: f64,
    /// Whether the backend's scrape is fresh.
    pub fresh: bool,
    pub score: f64,
}

/// The engine as this gateway sees it now: `(running, waiting, sequences, fresh)`, where
/// sequences = running + waiting as scraped, plus the requests this gateway sent since the
/// scrape began, minus those of ours that finished since. With a stale or failing scrape
/// (`fresh` false) everything this gateway sent is running, and nothing else is known.
#[inline]
fn engine_now(p: &PickInputs, b: &Backend, fresh_since: Option<Instant>) -> (f64, f64, f64, bool) {
    if p.fresh(fresh_since) {
        let running = if p.running.is_nan() {
            b.in_flight() as f64
        } else {
            p.running
        };
        let since = count(b.dispatched().saturating_sub(p.dispatched_at));
        let done = count(b.completed().saturating_sub(p.completed_at));
        (
            running,
            p.waiting,
            (running + p.waiting + since - done).max(0.0),
            true,
        )
    } else {
        let n = b.in_flight() as f64;
        (n, 0.0, n, false)
    }
}

/// The `affinity` policy's load of backend `i`: sequences in its engine (with this
/// request) per unit of weight; a stale scrape counts [`STALE_PENALTY`] times this
/// gateway's own.
fn affinity_load(snap: &FleetSnapshot, i: usize, fresh_since: Option<Instant>) -> f64 {
    let p = &snap.pick_inputs[i];
    let (_, _, sequences, fresh) = engine_now(p, &p.backend, fresh_since);
    let stale = if fresh { 1.0 } else { STALE_PENALTY };
    (sequences * stale + 1.0) / p.weight.max(f64::MIN_POSITIVE)
}

/// Headroom of the `affinity` policy's load bound, in sequences: vLLM batches dozens of
/// sequences at nearly the same step time, so one request more than an idle fleet's
/// average (often one that finished between two scrapes) is not a reason to move a key.
const AFFINITY_HEADROOM: f64 = 1.0;

/// Backend `i`'s rendezvous rank for the request's key.
fn affinity_rank(snap: &FleetSnapshot, sticky: &Sticky, i: usize) -> f64 {
    let p = &snap.pick_inputs[i];
    if sticky.placed == Some(p.node_id) {
        f64::INFINITY
    } else {
        affinity::preference(sticky.key.key, p.node_id, p.weight, snap.equal_weights)
    }
}

/// `(index, value)` pairs sorted into the key's preference order (highest rendezvous rank
/// first; each rank computed once).
fn affinity_order(snap: &FleetSnapshot, sticky: &Sticky, items: &mut [(usize, f64)]) {
    let mut ranked: Vec<(f64, (usize, f64))> = items
        .iter()
        .map(|&x| (affinity_rank(snap, sticky, x.0), x))
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (slot, (_, x)) in items.iter_mut().zip(ranked) {
        *slot = x;
    }
}

/// The first of `items` in the key's preference order that `qualifies`, or the key's home
/// (its first of all) when none does; and whether that is the home. The same choice as
/// [`affinity_order`] then a search, in one pass and without sorting.
fn affinity_first(
    snap: &FleetSnapshot,
    sticky: &Sticky,
    items: &[(usize, f64)],
    qualifies: impl Fn(usize, f64) -> bool,
) -> Option<((usize, f64), bool)> {
    // (rank, position) of the home and of the best that qualifies; on equal ranks the
    // earlier item wins, as in the stable sort.
    let mut home: Option<(f64, usize)> = None;
    let mut pick: Option<(f64, usize)> = None;
    for (pos, &(i, v)) in items.iter().enumerate() {
        let r = affinity_rank(snap, sticky, i);
        if home.is_none_or(|(best, _)| r > best) {
            home = Some((r, pos));
        }
        if qualifies(i, v) && pick.is_none_or(|(best, _)| r > best) {
            pick = Some((r, pos));
        }
    }
    let (_, home) = home?;
    let pos = pick.map_or(home, |(_, p)| p);
    Some((items[pos], pos == home))
}

/// The `vllm` policy's pick for a request with an affinity key: affinity when it is cheap,
/// that is the first backend in the key's order whose estimate is within the load factor
/// of the lowest, plus what its prefix cache likely saves (the prefill of the reusable
/// part of the prompt, at its speed). The lowest itself always qualifies. Returns `(index,
/// score, how many were eligible, whether it is the key's home)`; `None` when nothing is
/// eligible.
///
/// Most keyed requests go home, so the home is tried first against a bound rather than
/// the lowest estimate: no estimate is below [`FleetSnapshot::itl_floor`] × prompt / 150
/// (every estimate includes the request's own prefill, at no less than the fleet's
/// lowest ITL), so a home within the band of that bound is within the band of the
/// lowest, and is the same pick. That costs one estimate instead of one per backend.
fn keyed_vllm<I: Iterator<Item = usize>>(
    snap: &FleetSnapshot,
    req: &Request,
    sticky: &Sticky,
    fresh: Option<Instant>,
    eligible: impl Fn() -> I,
) -> Option<(usize, f64, usize, bool)> {
    let scorer = Scorer::new(snap, req, fresh);
    let reusable_steps =
        (sticky.key.reusable_bytes / BYTES_PER_TOKEN) as f64 / PREFILL_TOKENS_PER_STEP;
    // What backend `i`'s prefix cache likely saves it.
    let gain = |i: usize| snap.pick_inputs[i].itl * reusable_steps;

    // Each eligible backend's rank, and the home (the highest; on equal ranks the
    // earlier, as in `affinity_first`), tried against the bound.
    // (index, rank), on the stack for fleets of up to 64 backends: no allocation per pick.
    let mut ranked: SmallVec<[(usize, f64); 64]> = SmallVec::new();
    let mut home: Option<(f64, usize)> = None;
    for i in eligible() {
        let r = affinity_rank(snap, sticky, i);
        if home.is_none_or(|(best, _)| r > best) {
            home = Some((r, i));
        }
        ranked.push((i, r));
    }
    let (_, h) = home?;
    let n = ranked.len();
    let s = scorer.score(snap, h);
    let floor = snap.itl_floor * scorer.prompt * (1.0 / PREFILL_TOKENS_PER_STEP);
    if s <= floor * sticky.load_factor + gain(h) {
        return Some((h, s, n, true));
    }

    // Every estimate, then the highest-ranked within the band of the lowest, or the home.
    let mut scores: SmallVec<[f64; 64]> = SmallVec::with_capacity(n);
    let mut low = f64::INFINITY;
    for &(i, _) in &ranked {
        let x = scorer.score(snap, i);
        low = low.min(x);
        scores.push(x);
    }
    let band = low * sticky.load_factor;
    let mut pick: Option<(f64, usize, f64)> = None;
    for (&(i, r), &s) in ranked.iter().zip(&scores) {
        if s <= band + gain(i) && pick.is_none_or(|(best, _, _)| r > best) {
            pick = Some((r, i, s));
        }
    }
    let (i, s) = pick.map_or((h, s), |(_, i, s)| (i, s));
    Some((i, s, n, i == h))
}

/// Per-gateway selection state: a round-robin cursor per model (so requests for other
/// models in between do not skew one model's rotation) and a random stream.
#[derive(Debug)]
pub struct Selector {
    cursors: RwLock<HashMap<String, Arc<AtomicUsize>>>,
    rng: AtomicU64,
    stale_after: Duration,
}

impl Selector {
    pub fn new(stale_after: Duration) -> Selector {
        Selector {
            cursors: RwLock::new(HashMap::new()),
            rng: AtomicU64::new(0x853c_49e6_748f_ea9b),
            stale_after,
        }
    }

    /// Healthy, untried backends serving the request's model, best first. `tried` holds
    /// backend indices of this snapshot.
    pub fn candidates(
        &self,
        policy: Policy,
        snap: &FleetSnapshot,
        req: &Request,
        tried: &[usize],
        now: Instant,
    ) -> Result<Vec<usize>, NoCandidate> {
        let serving = snap.serving(req.model).ok_or(NoCandidate::UnknownModel)?;
        let mut eligible: Vec<usize> = Vec::new();
        for strict in [true, false] {
            eligible.extend(
                serving
                    .iter()
                    .copied()
                    .filter(|&i| routable(snap, i, strict) && !tried.contains(&i)),
            );
            if !eligible.is_empty() {
                break;
            }
        }
        if eligible.is_empty() {
            return Err(NoCandidate::Unavailable);
        }
        if policy == Policy::Affinity
            || (policy == Policy::Vllm && req.affinity.is_some_and(|a| a.key.reusable_bytes > 0))
        {
            // The pick first, then the rest.
            let first = self.best(policy, snap, req, tried, now)?.index;
            let fresh = fresh_since(now, self.stale_after);
            let scorer = Scorer::new(snap, req, fresh);
            let mut rest: Vec<(usize, f64)> = eligible
                .iter()
                .filter(|&&i| i != first)
                .map(|&i| {
                    let load = match policy {
                        Policy::Affinity => affinity_load(snap, i, fresh),
                        _ => scorer.score(snap, i),
                    };
                    (i, load)
                })
                .collect();
            // The rest: in the key's order (`affinity`), else by score or load.
            match (policy, &req.affinity) {
                (Policy::Affinity, Some(sticky)) => affinity_order(snap, sticky, &mut rest),
                _ => rest.sort_by(|a, b| a.1.total_cmp(&b.1)),
            }
            return Ok(std::iter::once(first)
                .chain(rest.into_iter().map(|x| x.0))
                .collect());
        }
        match policy {
            Policy::RoundRobin => {
                // One cursor step per request (not per retry).
                let cursor = self.cursor(req.model);
                let start = if tried.is_empty() {
                    cursor.fetch_add(1, Ordering::Relaxed)
                } else {
                    cursor.load(Ordering::Relaxed)
                };
                let n = eligible.len();
                eligible.rotate_left(start % n);
            }
            Policy::LeastRequest => {
                // Stable sort: ties keep configuration order.
                eligible.sort_by_key(|&i| snap.pick_inputs[i].backend.in_flight());
            }
            Policy::PowerOfTwo => {
                let n = eligible.len();
                if n >= 2 {
                    let r = self.random();
                    let a = (r % n as u64) as usize;
                    let mut b = ((r >> 32) % (n as u64 - 1)) as usize;
                    if b >= a {
                        b += 1;
                    }
                    let load = |i: usize| snap.pick_inputs[eligible[i]].backend.in_flight();
                    let (first, second) = if load(b) < load(a) { (b, a) } else { (a, b) };
                    let (x, y) = (eligible[first], eligible[second]);
                    eligible.retain(|&i| i != x && i != y);
                    eligible.insert(0, y);
                    eligible.insert(0, x);
                }
            }
            // (`affinity` returned above.)
            Policy::Vllm | Policy::Affinity => {
                let scorer = Scorer::new(snap, req, fresh_since(now, self.stale_after));
                let mut scored: Vec<(f64, usize)> = eligible
                    .iter()
                    .map(|&i| (scorer.score(snap, i), i))
                    .collect();
                // Stable: equal scores keep configuration order.
                scored.sort_by(|a, b| a.0.total_cmp(&b.0));
                return Ok(scored.into_iter().map(|(_, i)| i).collect());
            }
        }
        Ok(eligible)
    }

    /// The first of [`Selector::candidates`], without ordering the rest: one pass, no
    /// allocation. This is what the request path uses (a retry asks again, with fresher
    /// state).
    pub fn best(
        &self,
        policy: Policy,
        snap: &FleetSnapshot,
        req: &Request,
        tried: &[usize],
        now: Instant,
    ) -> Result<Choice, NoCandidate> {
        let serving = snap.serving(req.model).ok_or(NoCandidate::UnknownModel)?;
        let strict = serving
            .iter()
            .any(|&i| routable(snap, i, true) && !tried.contains(&i));
        let eligible = serving
            .iter()
            .copied()
            .filter(|&i| routable(snap, i, strict) && !tried.contains(&i));
        let fresh = fresh_since(now, self.stale_after);
        // (best index, its score, how many were eligible, whether it is the key's home if
        // affinity picked it)
        let (index, score, n, affine) = match policy {
            Policy::Vllm if req.affinity.is_some_and(|a| a.key.reusable_bytes > 0) => {
                let sticky = req.affinity.as_ref().expect("matched");
                let eligible = || {
                    serving
                        .iter()
                        .copied()
                        .filter(|&i| routable(snap, i, strict) && !tried.contains(&i))
                };
                let (i, s, n, home) = keyed_vllm(snap, req, sticky, fresh, eligible)
                    .ok_or(NoCandidate::Unavailable)?;
                (i, Some(s), n, Some(home))
            }
            Policy::Affinity => {
                let loads: Vec<(usize, f64)> = eligible
                    .map(|i| (i, affinity_load(snap, i, fresh)))
                    .collect();
                let n = loads.len();
                match &req.affinity {
                    _ if n == 0 => return Err(NoCandidate::Unavailable),
                    Some(sticky) => {
                        let bound = affinity::load_bound(
                            loads.iter().map(|x| x.1),
                            sticky.load_factor,
                            AFFINITY_HEADROOM,
                        )
                        .expect("not empty");
                        let ((i, _), home) =
                            affinity_first(snap, sticky, &loads, |_, load| load <= bound)
                                .expect("not empty");
                        (i, None, n, Some(home))
                    }
                    // No key: the least loaded.
                    None => {
                        let (i, _) = loads
                            .into_iter()
                            .reduce(|a, b| if b.1 < a.1 { b } else { a })
                            .expect("not empty");
                        (i, None, n, None)
                    }
                }
            }
            Policy::Vllm => {
                let scorer = Scorer::new(snap, req, fresh);
                // Strictly lower wins: ties keep configuration order, as in `candidates`.
                let (best, n) = eligible.map(|i| (scorer.score(snap, i), i)).fold(
                    (None, 0),
                    |(best, n): (Option<(f64, usize)>, usize), (s, i)| {
                        let best = match best {
                            Some((b, _)) if b <= s => best,
                            _ => Some((s, i)),
                        };
                        (best, n + 1)
                    },
                );
                let (s, i) = best.ok_or(NoCandidate::Unavailable)?;
                (i, Some(s), n, None)
            }
            Policy::LeastRequest => {
                let (best, n) = eligible
                    .map(|i| (snap.pick_inputs[i].backend.in_flight(), i))
                    .fold(
                        (None, 0),
                        |(best, n): (Option<(usize, usize)>, usize), (l, i)| {
                            let best = match best {
                                Some((b, _)) if b <= l => best,
                                _ => Some((l, i)),
                            };
                            (best, n + 1)
                        },
                    );
                (best.ok_or(NoCandidate::Unavailable)?.1, None, n, None)
            }
            Policy::RoundRobin | Policy::PowerOfTwo => {
                let c = self.candidates(policy, snap, req, tried, now)?;
                (c[0], None, c.len(), None)
            }
        };
        let reason = if !strict {
            Reason::OpenCircuitFallback
        } else if n == 1 {
            Reason::OnlyCandidate
        } else if let Some(home) = affine {
            if home {
                Reason::AffinityHome
            } else {
                Reason::AffinitySpill
            }
        } else {
            match policy {
                Policy::RoundRobin => Reason::Rotation,
                Policy::LeastRequest | Policy::Affinity => Reason::FewestInFlight,
                Policy::PowerOfTwo => Reason::TwoChoices,
                Policy::Vllm if snap.backends[index].state.fresh_load(fresh).is_some() => {
                    Reason::LowestScore
                }
                Policy::Vllm => Reason::LocalEstimate,
            }
        };
        Ok(Choice {
            index,
            reason,
            score_s: score,
        })
    }

    fn cursor(&self, model: &str) -> Arc<AtomicUsize> {
        // Only models the fleet serves get here, so the map is bounded by the fleet's
        // models; the write lock is taken once per model.
        if let Some(c) = self.cursors.read().expect("not poisoned").get(model) {
            return c.clone();
        }
        self.cursors
            .write()
            .expect("not poisoned")
            .entry(model.to_string())
            .or_default()
            .clone()
    }

    /// splitmix64 over an atomic counter: lock-free, good enough to pick replicas.
    fn random(&self) -> u64 {
        let mut z = self
            .rng
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendConfig;
    use crate::engine::metrics::EngineLoad;
    use crate::fleet::BackendEntry;
    use crate::fleet::Fleet;

    const STALE: Duration = Duration::from_secs(1);

    fn req() -> Request<'static> {
        Request {
            model: "m",
            prompt_tokens: 200,
            max_tokens: Some(100),
            affinity: None,
        }
    }

    fn keyed(key: u64, reusable_bytes: usize) -> Request<'static> {
        Request {
            affinity: Some(Sticky {
                key: AffinityKey {
                    key,
                    source: affinity::Source::Conversation,
                    reusable_bytes,
                },
                load_factor: 1.25,
                placed: None,
            }),
            ..req()
        }
    }

    /// Backend indices of `snap` in `key`'s rendezvous order.
    fn rank_order(snap: &FleetSnapshot, key: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..snap.backends.len()).collect();
        let rank = |i: usize| {
            let b = &snap.backends[i].backend;
            affinity::rank(key, b.node_id, b.weight)
        };
        order.sort_by(|&a, &b| rank(b).total_cmp(&rank(a)));
        order
    }

    #[test]
    fn a_placed_key_goes_first_to_its_placement_then_in_rendezvous_order() {
        let now = Instant::now();
        let sel = Selector::new(STALE);
        let mut snap = snapshot(&[true, true, true, true]);
        for i in 0..4 {
            snap = scraped(snap, i, 2.0, 0.0, 0.1, 0.02, now);
        }
        let key = 0x5eed;
        let order = rank_order(&snap, key);
        let mut req = keyed(key, 8000);
        // Not placed: its rendezvous home.
        for policy in [Policy::Vllm, Policy::Affinity] {
            let c = sel.best(policy, &snap, &req, &[], now).unwrap();
            assert_eq!(
                (c.index, c.reason),
                (order[0], Reason::AffinityHome),
                "{policy}"
            );
        }
        // Placed on its third: that one is its home now, and its old home comes next.
        let placed = order[2];
        if let Some(s) = req.affinity.as_mut() {
            s.placed = Some(snap.backends[placed].backend.node_id);
        }
        for policy in [Policy::Vllm, Policy::Affinity] {
            let c = sel.best(policy, &snap, &req, &[], now).unwrap();
            assert_eq!(
                (c.index, c.reason),
                (placed, Reason::AffinityHome),
                "{policy}"
            );
            let c = sel.best(policy, &snap, &req, &[placed], now).unwrap();
            assert_eq!(c.index, order[0], "{policy}");
        }
        let all = sel
            .candidates(Policy::Affinity, &snap, &req, &[], now)
            .unwrap();
        assert_eq!(all, vec![order[2], order[0], order[1], order[3]]);
    }

    #[test]
    fn the_placer_moves_long_lived_keys_off_a_home_past_its_share_of_kv() {
        use crate::config::PlacementSettings;
        use crate::routing::affinity::Placer;
        let t0 = Instant::now();
        let mut snap = snapshot(&[true, true, true, true]);
        for i in 0..4 {
            // 450,000 tokens of KV each: a share of 1% is 4,500 tokens, four keys of 1,000.
            snap = scraped(snap, i, 2.0, 0.0, 0.1, 0.02, t0);
        }
        let settings = PlacementSettings {
            kv_share: 0.01,
            long_lived_after: Duration::from_secs(20),
        };
        // Twelve keys, six of them homed on one backend (room for four there).
        let (mut keys, mut on_first) = (Vec::new(), 0);
        for i in 0..1000u64 {
            let k = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let first = rank_order(&snap, k)[0] == 0;
            if (first && on_first < 6) || (!first && keys.len() - on_first < 6) {
                on_first += first as usize;
                keys.push(k);
            }
        }
        assert_eq!(keys.len(), 12);
        let bytes = 1000 * BYTES_PER_TOKEN;
        let homes = |snap: &FleetSnapshot, placer: &Placer| -> Vec<usize> {
            let p = placer.placement();
            keys.iter()
                .map(|&k| match p.moved(k) {
                    Some(node) => snap
                        .pick_inputs
                        .iter()
                        .position(|x| x.node_id == node)
                        .unwrap(),
                    None => rank_order(snap, k)[0],
                })
                .collect()
        };
        // Two gateways see the same keys, in other orders and at other times.
        let (a, b) = (Placer::default(), Placer::default());
        for (n, &k) in keys.iter().enumerate() {
            a.record("m", k, bytes, t0);
            b.record(
                "m",
                keys[keys.len() - 1 - n],
                bytes,
                t0 + Duration::from_secs(2),
            );
        }
        // Seen once: not long-lived, nothing placed.
        a.replan(&snap, settings, t0 + Duration::from_secs(21));
        assert_eq!(a.placement().long_lived, 0);
        for (n, &k) in keys.iter().enumerate() {
            a.record("m", k, bytes, t0 + Duration::from_secs(25 + n as u64 % 3));
            b.record("m", k, bytes, t0 + Duration::from_secs(30));
        }
        let t = t0 + Duration::from_secs(30);
        a.replan(&snap, settings, t);
        b.replan(&snap, settings, t);
        let (pa, pb) = (a.placement(), b.placement());
        assert_eq!(pa.long_lived, 12);
        let ha = homes(&snap, &a);
        assert_eq!(
            ha,
            homes(&snap, &b),
            "two gateways placed the keys differently"
        );
        let unplaced: Vec<usize> = keys.iter().map(|&k| rank_order(&snap, k)[0]).collect();
        let per = |h: &[usize]| {
            (0..4)
                .map(|i| h.iter().filter(|&&x| x == i).count())
                .collect::<Vec<_>>()
        };
        assert!(
            per(&unplaced).iter().any(|&n| n > 4),
            "the test needs an uneven split: {:?}",
            per(&unplaced)
        );
        assert!(
            per(&ha).iter().all(|&n| n <= 4),
            "{:?} -> {:?}",
            per(&unplaced),
            per(&ha)
        );
        assert!(pa.moved_keys() > 0 && pa.moved_keys() == pb.moved_keys());
        assert!(
            pa.homed.iter().all(|(_, used, budget)| used <= budget),
            "{:?}",
            pa.homed
        );
        // The plan is followed.
        let sel = Selector::new(STALE);
        for (n, &k) in keys.iter().enumerate() {
            let mut req = keyed(k, bytes);
            if let Some(s) = req.affinity.as_mut() {
                s.placed = a.moved(k);
            }
            let c = sel.best(Policy::Affinity, &snap, &req, &[], t).unwrap();
            assert_eq!(c.index, ha[n]);
        }
        // Off: nothing moves.
        let off = PlacementSettings {
            kv_share: 0.0,
            ..settings
        };
        a.replan(&snap, off, t + Duration::from_secs(2));
        assert_eq!(a.placement().moved_keys(), 0);
        // Keys idle for a minute are forgotten.
        a.replan(&snap, settings, t + Duration::from_secs(4));
        assert_eq!(a.placement().long_lived, 12);
        a.replan(
            &snap,
            settings,
            t + crate::config::defaults::AFFINITY_KEY_IDLE + Duration::from_secs(1),
        );
        assert_eq!(
            (a.placement().long_lived, a.placement().moved_keys()),
            (0, 0)
        );
    }

    #[test]
    fn affinity_sends_a_key_home_and_spills_to_its_next_when_the_home_is_overloaded() {
        let now = Instant::now();
        let sel = Selector::new(STALE);
        let mut snap = snapshot(&[true; 4]);
        for i in 0..4 {
            snap = scraped(snap, i, 10.0, 0.0, 0.2, 0.01, now);
        }
        let mut homes = std::collections::HashSet::new();
        for key in 0..64u64 {
            let order = rank_order(&snap, key);
            for policy in [Policy::Affinity, Policy::Vllm] {
                let c = sel.best(policy, &snap, &keyed(key, 400), &[], now).unwrap();
                assert_eq!(
                    (c.index, c.reason),
                    (order[0], Reason::AffinityHome),
                    "{policy}"
                );
            }
            homes.insert(order[0]);
            // A tried home: the next in the key's order.
            let c = sel
                .best(Policy::Affinity, &snap, &keyed(key, 400), &[order[0]], now)
                .unwrap();
            assert_eq!((c.index, c.reason), (order[1], Reason::AffinityHome));
        }
        assert_eq!(homes.len(), 4, "keys spread over every backend");

        // Overload the home of key 7: its requests go to the key's next backend (the same
        // in every gateway), not to whichever is least loaded.
        let key = 7;
        let order = rank_order(&snap, key);
        let mut busy = scraped(
            FleetSnapshot::new(snap.backends.clone()),
            order[0],
            60.0,
            20.0,
            0.6,
            0.01,
            now,
        );
        busy = scraped(busy, order[2], 2.0, 0.0, 0.1, 0.01, now);
        for policy in [Policy::Affinity, Policy::Vllm] {
            let c = sel.best(policy, &busy, &keyed(key, 400), &[], now).unwrap();
            assert_eq!(
                (c.index, c.reason),
                (order[1], Reason::AffinitySpill),
                "{policy}"
            );
        }
        // Candidates: the pick first, every other eligible backend after it.
        let all = sel
            .candidates(Policy::Affinity, &busy, &keyed(key, 400), &[], now)
            .unwrap();
        assert_eq!(all[0], order[1]);
        assert_eq!(all.len(), 4);
    }

    #[test]
    fn a_request_sent_home_adds_only_its_uncached_prompt_to_the_pending_prefill() {
        let shared = Request {
            prompt_tokens: 1260,
            ..keyed(3, 1200 * BYTES_PER_TOKEN)
        };
        let choice = |reason| Choice {
            index: 0,
            reason,
            score_s: None,
        };
        assert_eq!(shared.prefill_tokens(&choice(Reason::AffinityHome)), 60);
        assert_eq!(shared.prefill_tokens(&choice(Reason::AffinitySpill)), 1260);
        assert_eq!(shared.prefill_tokens(&choice(Reason::LowestScore)), 1260);
        let unkeyed = Request {
            prompt_tokens: 1260,
            ..req()
        };
        assert_eq!(unkeyed.prefill_tokens(&choice(Reason::AffinityHome)), 1260);
        let all_reused = Request {
            prompt_tokens: 10,
            ..keyed(3, 400)
        };
        assert_eq!(all_reused.prefill_tokens(&choice(Reason::AffinityHome)), 0);
    }

    /// One gateway sending a burst of requests that share a long prefix, between two
    /// scrapes of equal replicas: they all stay home, because each counts only its
    /// uncached part as pending prefill there (counting whole prompts pushed the later
    /// ones off their home).
    #[test]
    fn a_burst_on_one_prefix_stays_home_under_the_vllm_policy() {
        let now = Instant::now();
        let sel = Selector::new(STALE);
        let mut snap = snapshot(&[true; 4]);
        for i in 0..4 {
            snap = scraped(snap, i, 8.0, 0.0, 0.2, 0.02, now);
        }
        let key = 21;
        let home = rank_order(&snap, key)[0];
        let r = Request {
            prompt_tokens: 1260,
            ..keyed(key, 1200 * BYTES_PER_TOKEN)
        };
        let mut guards = Vec::new();
        for n in 0..12 {
            let c = sel.best(Policy::Vllm, &snap, &r, &[], now).unwrap();
            assert_eq!(
                (c.index, c.reason),
                (home, Reason::AffinityHome),
                "request {n} of the burst"
            );
            let b = &snap.backends[c.index].backend;
            guards.push(b.begin_request_with_prefill(r.prefill_tokens(&c) as u64));
        }
    }

    #[test]
    fn vllm_goes_home_only_when_it_is_cheap() {
        let now = Instant::now();
        let sel = Selector::new(STALE);
        let key = 11;
        let mut snap = snapshot(&[true; 3]);
        for i in 0..3 {
            snap = scraped(snap, i, 20.0, 0.0, 0.2, 0.01, now);
        }
        let home = rank_order(&snap, key)[0];
        // The home a little slower (within the load factor): still home.
        let a_bit = scraped(
            FleetSnapshot::new(snap.backends.clone()),
            home,
            20.0,
            0.0,
            0.2,
            0.011,
            now,
        );
        let c = sel
            .best(Policy::Vllm, &a_bit, &keyed(key, 4), &[], now)
            .unwrap();
        assert_eq!((c.index, c.reason), (home, Reason::AffinityHome));
        // A third slower: within the load bound (1.25 × the mean), but beyond the band
        // (1.25 × the lowest): the lowest score, unless a long reusable prefix pays for it.
        let much = scraped(
            FleetSnapshot::new(snap.backends.clone()),
            home,
            20.0,
            0.0,
            0.2,
            0.0135,
            now,
        );
        let c = sel
            .best(Policy::Vllm, &much, &keyed(key, 4), &[], now)
            .unwrap();
        assert_ne!(c.index, home);
        assert_eq!(c.reason, Reason::AffinitySpill);
        let c = sel
            .best(Policy::Vllm, &much, &keyed(key, 40_000), &[], now)
            .unwrap();
        assert_eq!((c.index, c.reason), (home, Reason::AffinityHome));
        // Without a key, or with nothing to reuse yet (a first message): the lowest
        // score, as always.
        for r in [req(), keyed(key, 0)] {
            let c = sel.best(Policy::Vllm, &a_bit, &r, &[], now).unwrap();
            assert_ne!(c.index, home);
            assert_eq!(c.reason, Reason::LowestScore);
        }
    }

    fn snapshot(healthy: &[bool]) -> FleetSnapshot {
        snapshot_weighted(healthy, |_| 1.0)
    }

    fn snapshot_weighted(healthy: &[bool], weight: impl Fn(usize) -> f64) -> FleetSnapshot {
        let cfgs: Vec<BackendConfig> = (0..healthy.len())
            .map(|i| BackendConfig {
                static_models: Some(vec!["m".into()]),
                weight: weight(i),
                ..BackendConfig::new(
                    format!("b{i}"),
                    format!("http://b{i}"),
                    "127.0.0.1:1".parse().unwrap(),
                )
            })
            .collect();
        let fleet = Fleet::new(&cfgs);
        let entries: Vec<BackendEntry> = fleet.load().backends.clone();
        for (e, &h) in entries.iter().zip(healthy) {
            let result = if h { Ok(()) } else { Err("down".into()) };
            e.backend.health.observe_check(result, &Default::default());
        }
        FleetSnapshot::new(entries)
    }

    /// Sets a fresh scrape on backend `i`.
    fn scraped(
        snap: FleetSnapshot,
        i: usize,
        running: f64,
        waiting: f64,
        kv: f64,
        itl: f64,
        now: Instant,
    ) -> FleetSnapshot {
        let mut entries = snap.backends.clone();
        let e = &mut entries[i];
        e.state.load = Some(EngineLoad {
            running: Some(running),
            waiting: Some(waiting),
            kv_usage: Some(kv),
            kv_capacity_tokens: Some(450_000),
            engines: 1,
            ..EngineLoad::default()
        });
        e.state.load_at = Some(now);
        e.state.dispatched_at_scrape = e.backend.dispatched();
        e.state.itl_s = Some(itl);
        e.state.e2e_s = Some(itl * 200.0);
        FleetSnapshot::new(entries)
    }

    #[test]
    fn the_reason_says_why_a_backend_was_picked() {
        let now = Instant::now();
        let sel = Selector::new(STALE);
        let mut snap = snapshot(&[true, true, true]);
        snap = scraped(snap, 0, 250.0, 80.0, 0.97, 0.05, now);
        snap = scraped(snap, 1, 200.0, 40.0, 0.95, 0.05, now);
        snap = scraped(snap, 2, 0.0, 0.0, 0.0, 0.02, now - 10 * STALE);
        let reason = |snap: &FleetSnapshot, p: Policy, tried: &[usize]| {
            sel.best(p, snap, &req(), tried, now).unwrap()
        };
        let c = reason(&snap, Policy::Vllm, &[2]);
        assert_eq!((c.index, c.reason), (1, Reason::LowestScore));
        assert!(c.score_s.is_some_and(|s| s > 0.0));
        // The idle-looking backend 2 is stale: if it wins, the log must say so.
        let c = reason(&snap, Policy::Vllm, &[]);
        assert_eq!((c.index, c.reason), (2, Reason::LocalEstimate));
        assert_eq!(
            reason(&snap, Policy::Vllm, &[0, 2]).reason,
            Reason::OnlyCandidate
        );
        assert_eq!(
            reason(&snap, Policy::RoundRobin, &[]).reason,
            Reason::Rotation
        );
        assert_eq!(
            reason(&snap, Policy::LeastRequest, &[]).reason,
            Reason::FewestInFlight
        );
        assert_eq!(
            reason(&snap, Policy::PowerOfTwo, &[]).reason,
            Reason::TwoChoices
        );
        for e in &snap.backends {
            for _ in 0..3 {
                e.backend
                    .health
                    .record_failure(crate::fleet::health::FailureKind::Connect, 3, now);
            }
        }
        let c = reason(&snap, Policy::LeastRequest, &[]);
        assert_eq!(c.reason, Reason::OpenCircuitFallback);
        assert_eq!(c.score_s, None);
    }

    #[test]
    fn round_robin_rotates_over_healthy_backends_per_model() {
        let snap = snapshot(&[true, false, true]);
        let sel = Selector::new(STALE);
        let now = Instant::now();
        let mut firsts = Vec::new();
        for _ in 0..4 {
            firsts.push(
                sel.candidates(Policy::RoundRobin, &snap, &req(), &[], now)
                    .unwrap()[0],
            );
            let other = Request {
                model: "other",
                ..req()
            };
            let _ = sel.candidates(Policy::RoundRobin, &snap, &other, &[], now);
        }
        assert_eq!(firsts, vec![0, 2, 0, 2]);
    }

    #[test]
    fn tried_backends_are_skipped_and_errors_are_distinct() {
        let snap = snapshot(&[true, true]);
        let sel = Selector::new(STALE);
        let now = Instant::now();
        for policy in [
            Policy::RoundRobin,
            Policy::LeastRequest,
            Policy::PowerOfTwo,
            Policy::Vllm,
        ] {
            assert_eq!(
                sel.candidates(policy, &snap, &req(), &[0], now).unwrap(),
                vec![1]
            );
            assert_eq!(
                sel.candidates(policy, &snap, &req(), &[0, 1], now),
                Err(NoCandidate::Unavailable)
            );
            let unknown = Request {
                model: "x",
                ..req()
            };
            assert_eq!(
                sel.candidates(policy, &snap, &unknown, &[], now),
                Err(NoCandidate::UnknownModel)
            );
        }
    }

    #[test]
    fn least_request_prefers_fewest_in_flight() {
        let snap = snapshot(&[true, true, true]);
        let _a = snap.backends[0].backend.begin_request();
        let _b = snap.backends[1].backend.begin_request();
        let _c = snap.backends[1].backend.begin_request();
        let sel = Selector::new(STALE);
        let got = sel
            .candidates(Policy::LeastRequest, &snap, &req(), &[], Instant::now())
            .unwrap();
        assert_eq!(got, vec![2, 0, 1]);
    }

    #[test]
    fn power_of_two_prefers_the_less_busy_of_its_pair() {
        let snap = snapshot(&[true, true]);
        let _g: Vec<_> = (0..5)
            .map(|_| snap.backends[0].backend.begin_request())
            .collect();
        let sel = Selector::new(STALE);
        for _ in 0..20 {
            let got = sel
                .candidates(Policy::PowerOfTwo, &snap, &req(), &[], Instant::now())
                .unwrap();
            assert_eq!(got, vec![1, 0]);
        }
    }

    #[test]
    fn vllm_prefers_the_faster_replica_until_its_steps_grow() {
        let now = Instant::now();
        // b0: busy fast replica (ITL 15 ms at 100 running); b1: slow replica, idle-ish,
        // ITL 12 ms at 2 running.
        let snap = scraped(snapshot(&[true, true]), 0, 100.0, 0.0, 0.3, 0.015, now);
        let snap = scraped(snap, 1, 2.0, 0.0, 0.01, 0.012, now);
        let sel = Selector::new(STALE);
        assert_eq!(
            sel.candidates(Policy::Vllm, &snap, &req(), &[], now)
                .unwrap()[0],
            1
        );
        // The same slow replica at 20 running (ITL 30 ms) loses.
        let snap = scraped(snap, 1, 20.0, 0.0, 0.1, 0.030, now);
        assert_eq!(
            sel.candidates(Policy::Vllm, &snap, &req(), &[], now)
                .unwrap()[0],
            0
        );
    }

    #[test]
    fn vllm_sends_a_lora_adapter_where_it_has_a_slot() {
        use crate::engine::metrics::LoraSlots;
        let now = Instant::now();
        let sel = Selector::new(STALE);
        // Backend 0 is the less busy, but its one adapter slot is held by `a`; backend 1
        // has its slot free.
        let snap = scraped(snapshot(&[true, true]), 0, 4.0, 1.0, 0.1, 0.02, now);
        let snap = scraped(snap, 1, 12.0, 0.0, 0.1, 0.02, now);
        let slots = |running: &[&str], waiting: &[&str]| LoraSlots {
            max: 1,
            running: running.iter().map(|a| a.to_string()).collect(),
            waiting: waiting.iter().map(|a| a.to_string()).collect(),
        };
        let mut entries = snap.backends.clone();
        for (e, s) in entries
            .iter_mut()
            .zip([slots(&["a"], &["b"]), slots(&[], &[])])
        {
            e.state.models = vec!["m".into(), "a".into(), "b".into()];
            let load = e.state.load.as_mut().unwrap();
            load.waiting_deferred = Some(s.waiting.len() as f64);
            load.lora = Some(s);
        }
        let snap = FleetSnapshot::new(entries);
        let first = |model: &str| {
            let r = Request { model, ..req() };
            sel.best(Policy::Vllm, &snap, &r, &[], now).unwrap().index
        };
        assert_eq!(first("b"), 1, "b would wait for a slot on backend 0");
        assert_eq!(first("a"), 0, "a holds its slot on backend 0");
        assert_eq!(first("m"), 0, "the base model needs no slot");
        let scorer = Scorer::new(
            &snap,
            &Request {
                model: "b",
                ..req()
            },
            fresh_since(now, STALE),
        );
        // Waiting for a slot costs a request's life; taking a free one, nothing while the
        // batch limit is unknown, else one queue place.
        assert!(scorer.terms(&snap, 0).lora > 0.0);
        assert_eq!(scorer.terms(&snap, 1).lora, 0.0);
        let capped = FleetSnapshot::new(snap.backends.clone());
        let capped = with_cap(with_cap(capped, 0, 32.0), 1, 32.0);
        let b = Request {
            model: "b",
            ..req()
        };
        let scorer = Scorer::new(&capped, &b, fresh_since(now, STALE));
        let (full, free) = (scorer.terms(&capped, 0).lora, scorer.terms(&capped, 1).lora);
        assert!(free > 0.0 && full > 10.0 * free, "{full} {free}");
        // A stale scrape tells nothing of the slots.
        let stale = now + 10 * STALE;
        let scorer = Scorer::new(
            &snap,
            &Request {
                model: "b",
                ..req()
            },
            fresh_since(stale, STALE),
        );
        assert_eq!(scorer.terms(&snap, 0).lora, 0.0);
    }

    #[test]
    fn a_lora_adapter_stays_where_it_holds_a_slot_unless_that_is_a_queue_busier() {
        use crate::engine::metrics::LoraSlots;
        let now = Instant::now();
        let sel = Selector::new(STALE);
        // `x` holds a slot on backend 0, a little slower than backend 1, which has both of
        // its slots free.
        let with_slots = |snap: FleetSnapshot| {
            let mut entries = snap.backends.clone();
            for (e, running) in entries.iter_mut().zip([vec!["x".to_string()], vec![]]) {
                e.state.models = vec!["m".into(), "x".into()];
                e.state.load.as_mut().unwrap().lora = Some(LoraSlots {
                    max: 2,
                    running,
                    waiting: vec![],
                });
            }
            FleetSnapshot::new(entries)
        };
        let x = Request {
            model: "x",
            ..req()
        };
        // Both engines learned their batch limit, 32: a free slot costs a queue place.
        let snap = scraped(snapshot(&[true, true]), 0, 4.0, 0.0, 0.1, 0.021, now);
        let snap = with_slots(scraped(snap, 1, 3.0, 0.0, 0.1, 0.020, now));
        let snap = with_cap(with_cap(snap, 0, 32.0), 1, 32.0);
        assert_eq!(
            sel.best(Policy::Vllm, &snap, &x, &[], now).unwrap().index,
            0
        );
        assert_eq!(
            sel.best(Policy::Vllm, &snap, &req(), &[], now)
                .unwrap()
                .index,
            1,
            "the base model takes the faster replica"
        );
        // Requests waiting for room there outweigh keeping the slot free.
        let snap = scraped(snapshot(&[true, true]), 0, 32.0, 3.0, 0.1, 0.021, now);
        let snap = with_slots(scraped(snap, 1, 3.0, 0.0, 0.1, 0.020, now));
        let snap = with_cap(with_cap(snap, 0, 32.0), 1, 32.0);
        assert_eq!(
            sel.best(Policy::Vllm, &snap, &x, &[], now).unwrap().index,
            1
        );
        // Without a batch limit there is no queue place to weigh a slot against.
        let snap = scraped(snapshot(&[true, true]), 0, 4.0, 0.0, 0.1, 0.021, now);
        let snap = with_slots(scraped(snap, 1, 3.0, 0.0, 0.1, 0.020, now));
        assert_eq!(
            sel.best(Policy::Vllm, &snap, &x, &[], now).unwrap().index,
            1
        );
    }

    #[test]
    fn an_adapter_sent_since_the_scrape_holds_its_slot() {
        use crate::engine::metrics::LoraSlots;
        let now = Instant::now();
        let sel = Selector::new(STALE);
        // One free slot on each; backend 0 is the faster.
        let snap = scraped(snapshot(&[true, true]), 0, 2.0, 0.0, 0.1, 0.02, now);
        let snap = scraped(snap, 1, 2.0, 0.0, 0.1, 0.03, now);
        let mut entries = snap.backends.clone();
        for e in entries.iter_mut() {
            e.state.models = vec!["m".into(), "x".into(), "y".into()];
            e.state.load.as_mut().unwrap().lora = Some(LoraSlots {
                max: 1,
                running: vec![],
                waiting: vec!["x".into(), "y".into()],
            });
        }
        let snap = FleetSnapshot::new(entries);
        let first = |model: &str| {
            let r = Request { model, ..req() };
            sel.best(Policy::Vllm, &snap, &r, &[], now).unwrap().index
        };
        assert_eq!((first("x"), first("y")), (0, 0));
        // `x` is sent to backend 0 before the next scrape: it takes the slot there, so `y`
        // would wait on backend 0, and a second `x` joins the first.
        let b0 = snap.backends[0].backend.clone();
        let _x = b0.begin_request();
        b0.note_adapter("x");
        assert_eq!(first("y"), 1);
        assert_eq!(first("x"), 0);
        // An adapter noted before the scrape began is in the scrape's own numbers.
        let rescraped = scraped(
            FleetSnapshot::new(snap.backends.clone()),
            0,
            2.0,
            0.0,
            0.1,
            0.02,
            now,
        );
        let r = Request {
            model: "y",
            ..req()
        };
        assert_eq!(
            Scorer::new(&rescraped, &r, fresh_since(now, STALE))
                .terms(&rescraped, 0)
                .lora,
            0.0
        );
    }

    #[test]
    fn vllm_avoids_queues_and_full_kv() {
        let now = Instant::now();
        let base = scraped(snapshot(&[true, true]), 0, 50.0, 0.0, 0.5, 0.02, now);
        let sel = Selector::new(STALE);
        let queued = scraped(base, 1, 40.0, 5.0, 0.5, 0.015, now);
        assert_eq!(
            sel.candidates(Policy::Vllm, &queued, &req(), &[], now)
                .unwrap()[0],
            0
        );
        let base = scraped(snapshot(&[true, true]), 0, 50.0, 0.0, 0.5, 0.02, now);
        let full = scraped(base, 1, 40.0, 0.0, 0.97, 0.015, now);
        assert_eq!(
            sel.candidates(Policy::Vllm, &full, &req(), &[], now)
                .unwrap()[0],
            0
        );
    }

    /// Sets the batch limit the scraper learned on backend `i`.
    fn with_cap(snap: FleetSnapshot, i: usize, cap: f64) -> FleetSnapshot {
        let mut entries = snap.backends.clone();
        entries[i].state.max_running_seen = cap;
        entries[i].state.queued_seen = true;
        FleetSnapshot::new(entries)
    }

    #[test]
    fn vllm_sees_a_full_batch_the_scrape_missed_and_assumes_the_fleet_s_limit() {
        let now = Instant::now();
        let sel = Selector::new(STALE);
        let pick = |snap: &FleetSnapshot| sel.best(Policy::Vllm, snap, &req(), &[], now).unwrap();
        // b0 is fast, b1 a third slower with room: both run at most 32 sequences.
        let fleet = || {
            let snap = scraped(snapshot(&[true, true]), 1, 20.0, 0.0, 0.1, 0.016, now);
            with_cap(snap, 1, 32.0)
        };

        // b0 scraped at 31 running, with `ours` requests of this gateway in flight there
        // (sent before the scrape); the guards are returned to keep them in flight.
        let b0_with = |ours: usize| {
            let snap = fleet();
            let guards: Vec<_> = (0..ours)
                .map(|_| snap.backends[0].backend.begin_request())
                .collect();
            let snap = with_cap(scraped(snap, 0, 31.0, 0.0, 0.1, 0.010, now), 0, 32.0);
            (snap, guards)
        };
        // 32 of ours, but the scrape shows 31: one was still on its way into the engine.
        // b0's batch is full: our request would queue.
        let (snap, _ours) = b0_with(32);
        assert_eq!(pick(&snap).index, 1);
        // With one request fewer of ours there, b0 has room, and its speed wins.
        let (snap, _ours) = b0_with(31);
        assert_eq!(pick(&snap).index, 0);

        // b0 never queued, so its own limit is unknown: it is assumed to be the fleet's,
        // and at 32 running it is full.
        let snap = scraped(fleet(), 0, 32.0, 0.0, 0.1, 0.010, now);
        assert_eq!(pick(&snap).index, 1);
        // With no limit known anywhere, nothing is assumed: b0 is faster.
        let mut entries = snap.backends.clone();
        entries[1].state.queued_seen = false;
        assert_eq!(pick(&FleetSnapshot::new(entries)).index, 0);
    }

    #[test]
    fn a_short_prefill_rides_in_the_next_step() {
        let now = Instant::now();
        let snap = snapshot(&[true, true]);
        // 100 prompt tokens of ours are waiting for their first token on b0.
        let _pending = snap.backends[0].backend.begin_request_with_prefill(100);
        let mut snap = scraped(snap, 0, 10.0, 0.0, 0.1, 0.015, now);
        snap = scraped(snap, 1, 10.0, 0.0, 0.1, 0.015, now);
        let fresh = fresh_since(now, STALE);
        let with_prompt = |tokens| Request {
            prompt_tokens: tokens,
            ..req()
        };
        // 100 + 40 tokens fit in one step's worth of prefill (150): b0's first token
        // comes as soon as b1's.
        let short = with_prompt(40);
        let (s0, s1) = (
            vllm_score(&snap, 0, &short, fresh),
            vllm_score(&snap, 1, &short, fresh),
        );
        assert!((s0 - s1).abs() < 1e-12, "{s0} vs {s1}");
        // 100 + 100 do not: b0 is later by the prefill beyond one step.
        let long = with_prompt(100);
        let (s0, s1) = (
            vllm_score(&snap, 0, &long, fresh),
            vllm_score(&snap, 1, &long, fresh),
        );
        let beyond = 0.015 * (200.0 / PREFILL_TOKENS_PER_STEP - 1.0);
        assert!((s0 - s1 - beyond).abs() < 1e-9, "{s0} vs {s1}");
    }

    #[test]
    fn stale_backends_are_never_taken_for_idle() {
        let now = Instant::now();
        let snap = scraped(snapshot(&[true, true]), 0, 10.0, 0.0, 0.2, 0.012, now);
        // b1's last scrape (idle) is old: it is scored from local accounting, with a penalty.
        let mut snap = scraped(snap, 1, 0.0, 0.0, 0.0, 0.012, now - 10 * STALE);
        let _g: Vec<_> = (0..10)
            .map(|_| snap.backends[1].backend.begin_request())
            .collect();
        snap = FleetSnapshot::new(snap.backends.clone());
        let sel = Selector::new(STALE);
        let fresh = fresh_since(now, STALE);
        assert!(vllm_score(&snap, 1, &req(), fresh) > vllm_score(&snap, 0, &req(), fresh));
        assert_eq!(
            sel.candidates(Policy::Vllm, &snap, &req(), &[], now)
                .unwrap()[0],
            0
        );
    }

    /// Where a burst of `k` requests between two scrapes goes under `vllm`: the first
    /// candidate of each pick, counted per backend, all of them still in flight meanwhile.
    fn burst(snap: &FleetSnapshot, k: usize, now: Instant) -> Vec<usize> {
        let sel = Selector::new(STALE);
        let mut guards = Vec::new();
        let mut got = vec![0usize; snap.backends.len()];
        for _ in 0..k {
            let first = sel
                .candidates(Policy::Vllm, snap, &req(), &[], now)
                .unwrap()[0];
            got[first] += 1;
            guards.push(snap.backends[first].backend.begin_request());
        }
        got
    }

    /// A backend whose scrape is stale, or failing from the start, must not become a sink
    /// once the fresh replicas' estimates grow: its estimate grows with this gateway's
    /// requests there too, so a burst spreads, with fewer on it than on a fresh one.
    #[test]
    fn herding_onto_a_stale_or_failing_backend_is_bounded() {
        let now = Instant::now();
        let (n, k) = (3usize, 60usize);
        for (running, never_scraped) in [(0.0, false), (0.0, true), (40.0, false), (40.0, true)] {
            let mut snap = snapshot(&vec![true; n]);
            for i in 0..n {
                let at = if i == 2 { now - 10 * STALE } else { now };
                snap = scraped(snap, i, running, 0.0, 0.1, 0.02, at);
            }
            if never_scraped {
                let mut entries = snap.backends.clone();
                entries[2].state.load = None;
                entries[2].state.load_at = None;
                entries[2].state.itl_s = None;
                entries[2].state.scrape_error = Some("line 1: not a metric name".into());
                snap = FleetSnapshot::new(entries);
            }
            let got = burst(&snap, k, now);
            let case = format!("running {running}, never scraped {never_scraped}: {got:?}");
            assert!(got[2] <= got[0].min(got[1]), "{case}");
            assert!(got[2] >= k / (2 * n), "not starved either: {case}");
        }
    }

    /// A backend whose `/metrics` answers without vLLM's numbers (another server, or
    /// vLLM with its stats off) is fresh but knows nothing: counted from this gateway's
    /// requests there, a burst still spreads.
    #[test]
    fn herding_is_bounded_on_backends_without_vllm_metrics() {
        let now = Instant::now();
        for (n, k) in [(3usize, 30usize), (4, 20), (2, 9)] {
            let mut entries = snapshot(&vec![true; n]).backends;
            for e in &mut entries {
                e.state.load = Some(EngineLoad::default());
                e.state.load_at = Some(now);
            }
            let got = burst(&FleetSnapshot::new(entries), k, now);
            assert!(
                got.iter().all(|&g| g <= k.div_ceil(n) + 1),
                "n={n} k={k}: {got:?}"
            );
        }
    }

    #[test]
    fn herding_is_bounded_between_scrapes() {
        let now = Instant::now();
        for (n, k) in [(4usize, 20usize), (3, 10), (8, 100), (5, 7)] {
            let mut snap = snapshot(&vec![true; n]);
            for i in 0..n {
                snap = scraped(snap, i, 10.0, 0.0, 0.2, 0.01, now);
            }
            let got = burst(&snap, k, now);
            let bound = k.div_ceil(n) + 1;
            assert!(got.iter().all(|&g| g <= bound), "n={n} k={k}: {got:?}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever the fleet looks like, a policy returns exactly the healthy, untried
            /// backends, each once.
            #[test]
            fn candidates_are_exactly_the_healthy_untried(
                healthy in prop::collection::vec(any::<bool>(), 1..12),
                loads in prop::collection::vec((0.0f64..300.0, 0.0f64..50.0, 0.0f64..1.0, 0.001f64..0.2, any::<bool>()), 12),
                tried_mask in prop::collection::vec(any::<bool>(), 12),
                in_flight in prop::collection::vec(0usize..20, 12),
                policy in prop::sample::select(vec![Policy::RoundRobin, Policy::LeastRequest, Policy::PowerOfTwo, Policy::Vllm, Policy::Affinity]),
                key in prop::option::of((any::<u64>(), 0usize..100_000)),
            ) {
                let now = Instant::now();
                let n = healthy.len();
                let mut snap = snapshot(&healthy);
                for (i, &(r, w, kv, itl, fresh)) in loads.iter().enumerate().take(n) {
                    let at = if fresh { now } else { now - 10 * STALE };
                    snap = scraped(snap, i, r, w, kv, itl, at);
                }
                let _guards: Vec<_> = (0..n)
                    .flat_map(|i| (0..in_flight[i]).map(move |_| i))
                    .map(|i| snap.backends[i].backend.begin_request())
                    .collect();
                let tried: Vec<usize> = (0..n).filter(|&i| tried_mask[i]).collect();
                let want: Vec<usize> = (0..n).filter(|&i| healthy[i] && !tried_mask[i]).collect();
                let sel = Selector::new(STALE);
                let req = match key {
                    Some((k, reusable)) => keyed(k, reusable),
                    None => req(),
                };
                let best = sel.best(policy, &snap, &req, &tried, now).map(|c| c.index);
                let first = sel.best(policy, &snap, &req, &[], now).map(|_| ());
                prop_assert_eq!(availability(&snap, req.model), first, "as a first attempt");
                match sel.candidates(policy, &snap, &req, &tried, now) {
                    Ok(mut got) => {
                        if matches!(policy, Policy::Vllm | Policy::LeastRequest | Policy::Affinity) {
                            prop_assert_eq!(best, Ok(got[0]), "best() is the first candidate");
                        }
                        got.sort_unstable();
                        prop_assert_eq!(got, want);
                    }
                    Err(e) => {
                        prop_assert!(want.is_empty());
                        prop_assert_eq!(e, NoCandidate::Unavailable);
                        prop_assert_eq!(best, Err(NoCandidate::Unavailable));
                    }
                }
            }

            /// The one-pass keyed pick is the first backend that qualifies in the key's
            /// sorted order (the home when none does), as the reference definition says;
            /// and that order is the weighted rendezvous order, with equal weights too
            /// (where the ranks skip their logarithm).
            #[test]
            fn affinity_first_is_the_first_that_qualifies_in_key_order(
                n in 1usize..12,
                loads in prop::collection::vec(0.0f64..50.0, 12),
                key in any::<u64>(),
                factor in 1.0f64..3.0,
                weighted in any::<bool>(),
            ) {
                let snap = snapshot_weighted(&vec![true; n], |i| {
                    if weighted { 1.0 + (i % 3) as f64 } else { 2.0 }
                });
                prop_assert_eq!(snap.equal_weights, !weighted || n < 2);
                let sticky = match keyed(key, 1000).affinity {
                    Some(s) => s,
                    None => unreachable!("keyed() gives a key"),
                };
                let items: Vec<(usize, f64)> = (0..n).map(|i| (i, loads[i])).collect();
                let mut sorted = items.clone();
                affinity_order(&snap, &sticky, &mut sorted);
                let order: Vec<usize> = sorted.iter().map(|x| x.0).collect();
                prop_assert_eq!(order, rank_order(&snap, key));
                let only: Vec<f64> = sorted.iter().map(|x| x.1).collect();
                let want = affinity::bounded(&only, factor, AFFINITY_HEADROOM).unwrap();
                let bound = affinity::load_bound(only.iter().copied(), factor, AFFINITY_HEADROOM).unwrap();
                let got = affinity_first(&snap, &sticky, &items, |_, l| l <= bound).unwrap();
                prop_assert_eq!(got, (sorted[want], want == 0));
                // Nothing qualifies: the home.
                let none = affinity_first(&snap, &sticky, &items, |_, _| false).unwrap();
                prop_assert_eq!(none, (sorted[0], true));
            }

            /// The keyed `vllm` pick, with its shortcut through the home, is what the
            /// definition gives: every estimate, then the first backend in the key's order
            /// within the band of the lowest (the home when none is). Fleets of mixed speed
            /// and load, some stale, some with prefill pending from this gateway.
            #[test]
            fn keyed_vllm_pick_is_the_first_within_the_band_of_the_lowest(
                n in 1usize..10,
                loads in prop::collection::vec(
                    (0.0f64..64.0, 0.0f64..8.0, 0.0f64..0.98, 0.005f64..0.06, 0u64..3000, any::<bool>()),
                    10,
                ),
                key in any::<u64>(),
                prompt in 1usize..4000,
                reused in 0.0f64..1.0,
                factor in 1.0f64..3.0,
            ) {
                let now = Instant::now();
                let mut snap = snapshot(&vec![true; n]);
                let mut guards = Vec::new();
                for (i, &(running, waiting, kv, itl, pending, stale)) in loads.iter().take(n).enumerate() {
                    let at = if stale { now - 10 * STALE } else { now };
                    snap = scraped(snap, i, running, waiting, kv, itl, at);
                    guards.push(snap.backends[i].backend.begin_request_with_prefill(pending));
                }
                let reusable_bytes = ((prompt as f64 * reused) as usize).max(1) * BYTES_PER_TOKEN;
                let mut r = keyed(key, reusable_bytes);
                r.prompt_tokens = prompt;
                let sticky = r.affinity.as_mut().expect("keyed");
                sticky.load_factor = factor;
                let sticky = *sticky;

                let fresh = fresh_since(now, STALE);
                let scored: Vec<(usize, f64)> =
                    (0..n).map(|i| (i, vllm_score(&snap, i, &r, fresh))).collect();
                let low = scored.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
                let gain = |i: usize| {
                    snap.pick_inputs[i].itl * (reusable_bytes / BYTES_PER_TOKEN) as f64
                        / PREFILL_TOKENS_PER_STEP
                };
                let mut sorted = scored.clone();
                affinity_order(&snap, &sticky, &mut sorted);
                let want = sorted
                    .iter()
                    .position(|&(i, s)| s <= low * factor + gain(i))
                    .unwrap_or(0);
                let got = Selector::new(STALE).best(Policy::Vllm, &snap, &r, &[], now).unwrap();
                prop_assert_eq!(got.index, sorted[want].0);
                if n > 1 {
                    let reason = if want == 0 { Reason::AffinityHome } else { Reason::AffinitySpill };
                    prop_assert_eq!(got.reason, reason);
                }
            }

            /// Equal replicas under any load: a burst of k picks between two scrapes puts at
            /// most ceil(k/n)+1 on any one.
            #[test]
            fn herding_bound_holds_for_any_equal_load(
                n in 2usize..10, k in 1usize..200,
                running in 0.0f64..300.0, waiting in 0.0f64..20.0, kv in 0.0f64..0.98, itl in 0.001f64..0.2,
            ) {
                let now = Instant::now();
                let mut snap = snapshot(&vec![true; n]);
                for i in 0..n {
                    snap = scraped(snap, i, running, waiting, kv, itl, now);
                }
                let got = burst(&snap, k, now);
                prop_assert!(got.iter().all(|&g| g <= k.div_ceil(n) + 1), "{:?}", got);
            }
        }
    }
}
