//! What a pick reads of each backend, resolved once per snapshot ([`PickInputs`]), and
//! the assumptions made where nothing was measured yet.

use std::sync::Arc;
use std::time::Instant;

use super::{is_fresh, Backend, BackendEntry};

/// Inter-token latency assumed for a backend never measured (then divided by its
/// configured weight): a mid-size batch on a current GPU.
pub const DEFAULT_ITL_S: f64 = 0.015;
/// Output length assumed when a request gives no `max_tokens`, for its KV footprint.
pub const DEFAULT_OUTPUT_TOKENS: f64 = 256.0;
/// The lowest ITL among `inputs` (infinite when there are none).
pub fn itl_floor(inputs: &[PickInputs]) -> f64 {
    inputs.iter().map(|p| p.itl).fold(f64::INFINITY, f64::min)
}

/// A counter as a float (through `i64`, which converts in one instruction).
pub(crate) fn count(n: u64) -> f64 {
    n.min(i64::MAX as u64) as i64 as f64
}

/// What a pick reads of one backend that changes only when the snapshot does (a scrape, a
/// health change, a reload): resolved once in [`FleetSnapshot::new`](super::FleetSnapshot::new) and kept in one dense
/// array, so that a pick among many backends reads one small record each, follows no
/// pointer but to the live counters, and divides only by what depends on the request.
/// Unknown values are NaN.
#[derive(Debug, Clone)]
pub struct PickInputs {
    /// The backend's live counters.
    pub(crate) backend: Arc<Backend>,
    /// When the scrape behind `running`, `waiting` and `kv` started (`None`: none yet).
    pub(crate) load_at: Option<Instant>,
    pub(crate) running: f64,
    /// Waiting as scraped, less the requests vLLM defers.
    pub(crate) waiting: f64,
    /// `Backend::dispatched()` and `Backend::completed()` when that scrape started.
    pub(crate) dispatched_at: u64,
    pub(crate) completed_at: u64,
    /// The measured inter-token latency, or the fleet's best divided by the weight.
    pub(crate) itl: f64,
    /// `itl / (running + 1)`: a step's duration per sequence of the scraped batch. Without
    /// a scraped batch: the fleet's default (`default_per_slot / weight`) when the ITL is
    /// not measured either, else the whole ITL (as if measured on an idle engine).
    pub(crate) itl_per_slot: f64,
    /// The batch limit: configured, else learned.
    pub(crate) cap: f64,
    /// The recent end-to-end latency, or `itl` × an assumed output length.
    pub(crate) e2e: f64,
    /// How long each request ahead in the queue adds: `e2e / cap`, or `e2e / running`
    /// without a cap (NaN when neither is known).
    pub(crate) queue_per_ahead: f64,
    pub(crate) kv: f64,
    /// `1 / kv_capacity_tokens`, 0 when unknown.
    pub(crate) inv_kv_capacity: f64,
    /// For rendezvous ranks: the backend's `node_id` and weight.
    pub(crate) node_id: u64,
    pub(crate) weight: f64,
}

impl PickInputs {
    /// `default_itl`: what a backend never measured is assumed to have at weight 1 (the
    /// snapshot's `min_itl_s`, else [`DEFAULT_ITL_S`]).
    ///
    /// `default_cap`: the batch limit assumed for a backend whose limit is neither
    /// configured nor learned yet (the largest any backend of the snapshot has, NaN when
    /// none has one): replicas of a fleet usually run the same `--max-num-seqs`, and one
    /// that never queued would otherwise look able to take any number of requests.
    ///
    /// `default_per_slot`: what a sequence adds to the step of a backend never scraped
    /// (`default_itl` divided by the batch it was measured at plus one), so one whose
    /// `/metrics` fails from the start is scored like the fleet's fastest replica holding
    /// this gateway's requests, rather than like an idle engine with a full one's ITL.
    pub fn of(
        e: &BackendEntry,
        default_itl: f64,
        default_per_slot: f64,
        default_cap: f64,
    ) -> PickInputs {
        let (b, st) = (&e.backend, &e.state);
        let load = st.load.as_ref();
        let running = load.and_then(|l| l.running).unwrap_or(f64::NAN);
        let itl = st.itl_s.unwrap_or(default_itl / b.weight);
        let capacity = load.and_then(|l| l.kv_capacity_tokens).unwrap_or(0);
        let cap = b
            .max_concurrent_requests
            .map(|m| m as f64)
            .or(st.learned_max_running())
            .unwrap_or(default_cap);
        let e2e = st.e2e_s.unwrap_or(itl * DEFAULT_OUTPUT_TOKENS);
        PickInputs {
            backend: b.clone(),
            load_at: st.load_at.filter(|_| load.is_some()),
            running,
            // Requests vLLM defers (a LoRA adapter waiting for a slot, a KV transfer) are
            // passed by the others: they are not a queue ahead of a new request.
            waiting: load.map_or(0.0, |l| {
                (l.waiting.unwrap_or(0.0) - l.waiting_deferred.unwrap_or(0.0)).max(0.0)
            }),
            dispatched_at: st.dispatched_at_scrape,
            completed_at: st.completed_at_scrape,
            itl,
            itl_per_slot: match (running.is_nan(), st.itl_s) {
                (false, _) => itl / (running + 1.0),
                (true, Some(_)) => itl,
                (true, None) => default_per_slot / b.weight,
            },
            cap,
            e2e,
            queue_per_ahead: e2e / if cap.is_nan() { running } else { cap }.max(1.0),
            kv: load.and_then(|l| l.kv_usage).unwrap_or(f64::NAN),
            inv_kv_capacity: if capacity > 0 {
                1.0 / capacity as f64
            } else {
                0.0
            },
            node_id: b.node_id,
            weight: b.weight,
        }
    }

    pub(crate) fn fresh(&self, fresh_since: Option<Instant>) -> bool {
        is_fresh(self.load_at, fresh_since)
    }
}
