//! The `vllm` policy's estimate of a request's time to its first token on each backend:
//! the formula, its terms, and the engine's state as this gateway sees it now.

use std::time::Instant;

use super::Request;
use crate::engine::metrics::LoraFit;
use crate::fleet::pick::{count, PickInputs, DEFAULT_OUTPUT_TOKENS};
use crate::fleet::{Backend, FleetSnapshot};

/// Prompt tokens whose prefill costs about as much as one decode step. It varies with
/// the GPU (about 220 on an H100 running Llama-3-8B, 120 on an A100) and cannot be told
/// apart from decode speed in vLLM's metrics; erring low sends long prompts to the
/// replicas with the shortest steps, where their prefill is quickest.
pub(super) const PREFILL_TOKENS_PER_STEP: f64 = 150.0;
/// A new request waits for the rest of the step in progress: half a step on average.
const RESIDUAL_STEP: f64 = 0.5;
/// Unknown engine state (stale or failing scrape) is assumed this much busier than what
/// this gateway's own accounting shows: such a backend is never mistaken for idle.
pub(super) const STALE_PENALTY: f64 = 1.5;
/// KV usage is capped here in the pressure term, which would otherwise be infinite.
const MAX_KV_FOR_PRESSURE: f64 = 0.99;
/// A fleet whose slowest replica's measured inter-token latency is at least this many times
/// its fastest's has replicas that decode slowly enough for an answer's length to matter
/// in where it goes (the `decode` term). Below it, differences come from batches of
/// different sizes on equal hardware, which change faster than the smoothed ITL follows.
const SLOW_ITL_RATIO: f64 = 1.5;
/// The share of an answer's decode-time difference the `decode` term counts: the whole
/// difference made long answers wait in the fast replicas' queues (`benches/results/HISTORY.md`).
const DECODE_WEIGHT: f64 = 0.5;

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
/// cached  = prompt tokens its engine holds in its prefix cache, known from its KV
///           events (0 without them)
/// prefill = itl × (pending + prompt − cached) / 150
/// lora    = for a request naming a LoRA adapter (vllm:lora_requests_info): 0 where the
///           adapter holds a slot, e2e / cap (one request ahead; 0 without a cap) where
///           it would take a free one, e2e where every slot is held by others
/// decode  = in a fleet whose slowest ITL is ≥ 1.5 × its fastest (measured on healthy
///           backends), for a request with max_tokens = n, where m = the fleet's mean
///           answer in tokens ((e2e − TTFT) / itl + 1, measured):
///             0.5 × (n − m) × (itl − fastest itl)  when n > m,   else 0;
///           at most e2e / cap (one place in that replica's queue)
/// score   = 0.5 × step + max(step, prefill) + queue + step × k² / (1 − k) + lora + decode
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
/// - `decode`: on a replica that decodes markedly slower than the fleet's fastest (an
///   older GPU, a smaller tensor-parallel group), every token of an answer takes longer;
///   on a fleet of replicas at speeds 1, 1 and 1/3 the longest answers set the end-to-end
///   p99 by where they landed (`benches/flow_control.rs`, heterogeneous). An answer
///   longer than the fleet's mean pays, on a slower replica, for its tokens beyond the
///   mean; answers up to the mean go wherever their first token comes soonest, so the
///   slow replica keeps its share of the work and takes the short answers. Pricing every
///   token (no mean subtracted) sent nearly everything to the fast replicas, whose queues
///   then made the TTFT p99 2.2 s against nginx's 1.3 s; also pricing a short answer's
///   use of a fast slot overloaded the slow replica (TTFT p99 2.3 s against 2.0 s). Half
///   the difference is counted: the whole made long answers wait in the fast replicas'
///   queues more than their slower decode would have cost. And at most one place in the
///   replica's queue: uncapped, long answers queued at the fast replicas and the TTFT p99
///   of `benches/routing_quality.rs` at 90% load was 0.36 s against nginx's 0.19 s;
///   capped, 0.21 s against 0.22 s. `max_tokens` is the answer's length only when the engine does not stop it earlier (an upper bound); requests
///   without it have no term. A fleet within 1.5× has none: on equal hardware the
///   smoothed ITL differs with the batches each replica ran lately, and pricing that per
///   token would herd answers onto whichever replica looked fastest at the last scrape.
/// - A stale or failing scrape falls back to this gateway's in-flight count as the batch
///   (`in`), each sequence costing what one cost at its last scrape (`itl / (running +
///   1)`, or the fleet's fastest replica's when it never had one), and multiplies the
///   score by 1.5. The step must grow with those requests: a constant estimate would
///   become the lowest as soon as the fresh replicas' grew, and every request after that
///   would herd onto the replica nothing is known about.
///
/// `fresh_since` is [`fresh_since`](crate::fleet::fresh_since)`(now, stale_after)`, computed once per pick. Backend
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
    pub(super) prompt: f64,
    /// Its KV footprint: prompt plus output tokens.
    own: f64,
    /// Its `max_tokens` less the fleet's mean answer, in tokens (0 without either, or in
    /// a fleet of replicas of about the same speed: no `decode` term).
    answer_over_mean: f64,
    /// The fleet's lowest measured ITL.
    fastest_itl: f64,
    /// When the request names a LoRA adapter, per backend: where it stands as to adapter
    /// slots ([`FleetSnapshot::lora_fit`]).
    lora_fit: Option<&'a [LoraFit]>,
    /// The request's model (its adapter, with `lora_fit`).
    model: &'a str,
    /// Per backend, the prompt tokens its engine has cached, known from its KV events:
    /// only the rest is prefilled there.
    cached: Option<&'a super::prefix::CachedPrefix>,
}

impl<'a> Scorer<'a> {
    /// For `req` on the backends of `snap` (the snapshot it will score).
    pub fn new(snap: &'a FleetSnapshot, req: &Request<'a>, fresh_since: Option<Instant>) -> Self {
        let prompt = req.prompt_tokens as f64;
        let (fastest_itl, slowest_itl) = match (snap.min_itl_s, snap.max_itl_s) {
            (Some(lo), Some(hi)) => (lo, hi),
            _ => (0.0, 0.0),
        };
        let answer_over_mean = match (req.max_tokens, snap.mean_answer_tokens) {
            (Some(n), Some(mean)) if slowest_itl >= fastest_itl * SLOW_ITL_RATIO => count(n) - mean,
            _ => 0.0,
        };
        Scorer {
            fresh_since,
            prompt,
            own: prompt + req.max_tokens.map_or(DEFAULT_OUTPUT_TOKENS, |m| m as f64),
            answer_over_mean,
            fastest_itl,
            lora_fit: snap.lora_fit(req.model),
            model: req.model,
            cached: req.cached,
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
        let own = match self.cached.and_then(|c| c.get(i)) {
            Some(cached) if cached > 0 => (self.prompt - f64::from(cached)).max(1.0),
            _ => self.prompt,
        };
        let prefill_tokens = count(b.pending_prefill()) + own;
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

        // In a fleet of unequal speeds: a long answer pays for its tokens beyond the mean on
        // a slower replica.
        let n = self.answer_over_mean;
        // At most what one place in its queue costs (when that is known): beyond, the
        // wait for a fast replica's slot would cost the first token more than it saves.
        let decode = if n > 0.0 {
            (DECODE_WEIGHT * n * (itl - self.fastest_itl).max(0.0)).min(p.queue_per_ahead)
        } else {
            0.0
        };

        // The rest of the step in progress, then the steps that carry the prefill queued
        // ahead and ours: one at least, more when that prefill outweighs a step.
        let score = RESIDUAL_STEP * step + step.max(prefill) + queue + pressure + lora + decode;
        Terms {
            step,
            prefill,
            queue,
            pressure,
            lora,
            decode,
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
/// formula there): `score = (0.5 × step + max(step, prefill) + queue + pressure + lora +
/// decode)`,
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
    /// In a fleet of unequal speeds: a long answer's slower decode there (its tokens beyond
    /// the fleet's mean).
    pub decode: f64,
    /// Where the request's LoRA adapter stands there ([`LoraFit::Unknown`] for a base
    /// model, or with a stale scrape).
    pub lora_fit: LoraFit,
    /// The engine's sequences now, as estimated (scraped plus sent since, minus done).
    pub sequences: f64,
    /// Whether the backend's scrape is fresh.
    pub fresh: bool,
    pub score: f64,
}

/// The batch slots backend `i` has free now: its batch limit (configured, learned, or
/// the fleet's) less its sequences as [`Scorer::terms`] counts them, at least this
/// gateway's own requests there; `None` when no batch limit is known anywhere in the
/// fleet (it never queued, none is configured). Flow control holds requests at the
/// gateway while no backend of a model has one (`crate::flow`).
pub fn free_slots(snap: &FleetSnapshot, i: usize, fresh_since: Option<Instant>) -> Option<f64> {
    let p = &snap.pick_inputs[i];
    if p.cap.is_nan() {
        return None;
    }
    let (_, _, in_engine, _) = engine_now(p, &p.backend, fresh_since);
    let seqs = in_engine.max(p.backend.in_flight() as f64);
    Some((p.cap - seqs).max(0.0))
}

/// The engine as this gateway sees it now: `(running, waiting, sequences, fresh)`, where
/// sequences = running + waiting as scraped, plus the requests this gateway sent since the
/// scrape began, minus those of ours that finished since. With a stale or failing scrape
/// (`fresh` false) everything this gateway sent is running, and nothing else is known.
#[inline]
pub(super) fn engine_now(
    p: &PickInputs,
    b: &Backend,
    fresh_since: Option<Instant>,
) -> (f64, f64, f64, bool) {
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
