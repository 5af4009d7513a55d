//! Replica selection: a pure function of (snapshot, request, already-tried set, now)
//! that returns candidates in preference order. The proxy takes the first; on a retry it
//! asks again with the failed backend in the tried set. Also here, what the gateway
//! decides about a request before selection ([`admit`], [`refusal`]), shared by the
//! request path and `/explain`.
//!
//! Uses the fleet's snapshot, the OpenAI surface's request fields, the engine's facts and
//! the config; nothing above them.
//!
//! Policies (`routing.policy`, one file each under `policy/`):
//! - `round-robin`: in turn, per model;
//! - `least-request`: fewest requests in flight from this gateway;
//! - `power-of-two`: the less busy (in flight) of two random replicas;
//! - `vllm` (default): the lowest [`vllm_score`], an estimate of the time to first token;
//!   with `routing.affinity.enabled` (the default), the request's prefix-affinity home
//!   instead when that is cheap: its estimate is within the load factor of the lowest,
//!   plus the prefill its prefix cache likely saves;
//! - `affinity`: the affinity home unless its load is above the bound (see [`affinity`]).

mod admit;
pub mod affinity;
mod policy;
pub mod prefix;
mod request;
mod score;
#[cfg(test)]
mod tests;

use parking_lot::RwLock;
use smallvec::SmallVec;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Policy;
use crate::fleet::{fresh_since, FleetSnapshot};
pub use admit::{admit, refusal, route_model, Routed};
pub use request::{Request, Sticky, BYTES_PER_TOKEN};
pub use score::{free_slots, vllm_score, Scorer, Terms};

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
    /// `vllm` on KV events: the lowest estimate, its engine holding part of the prompt
    /// in its prefix cache.
    CachedPrefix,
}

impl Reason {
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
            Reason::CachedPrefix => "cached_prefix",
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
    /// When it was picked on its engine's KV events: the prompt tokens cached there.
    pub cached_tokens: Option<u32>,
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

/// What the replicas of a model can take now ([`room`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// No batch limit is known (none configured, no engine queued yet), or every replica
    /// is out of rotation but picked anyway: nothing to wait for.
    Unbounded,
    /// Requests the replicas in rotation can start now, summed over them: 0 when every
    /// one's batch is full.
    Slots(usize),
}

/// The room for requests for `model` on its replicas in rotation ([`free_slots`]).
/// Unbounded when one of them has no known batch limit, or none is strictly routable
/// (the open-circuit fallback: requests are not held for a fleet that is failing).
pub fn room(snap: &FleetSnapshot, model: &str, fresh_since: Option<Instant>) -> Room {
    let Some(serving) = snap.serving(model) else {
        return Room::Unbounded;
    };
    let mut slots = 0.0;
    let mut any = false;
    for &i in serving.iter() {
        if !routable(snap, i, true) {
            continue;
        }
        any = true;
        match free_slots(snap, i, fresh_since) {
            Some(n) => slots += n.floor(),
            None => return Room::Unbounded,
        }
    }
    if any {
        Room::Slots(slots as usize)
    } else {
        Room::Unbounded
    }
}

/// The backends a pick chooses among (indices of the snapshot): on the stack for fleets
/// of up to 64.
type Eligible = SmallVec<[usize; 64]>;

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

    /// The healthy, untried backends serving the request's model (`tried` holds indices
    /// of this snapshot), and whether they are strictly routable: when none is, those
    /// with an open circuit are used rather than none (see [`routable`]).
    fn eligible(
        &self,
        snap: &FleetSnapshot,
        req: &Request,
        tried: &[usize],
    ) -> Result<(Eligible, bool), NoCandidate> {
        let serving = snap.serving(req.model).ok_or(NoCandidate::UnknownModel)?;
        for strict in [true, false] {
            let eligible: Eligible = serving
                .iter()
                .copied()
                .filter(|&i| routable(snap, i, strict) && !tried.contains(&i))
                .collect();
            if !eligible.is_empty() {
                return Ok((eligible, strict));
            }
        }
        Err(NoCandidate::Unavailable)
    }

    /// What `policy` reads besides the backends: round-robin's turn (one cursor step per
    /// request, not per retry) and power-of-two's random draw.
    fn context<'a>(
        &self,
        policy: Policy,
        snap: &'a FleetSnapshot,
        req: &'a Request<'a>,
        first_attempt: bool,
        now: Instant,
    ) -> policy::Cx<'a> {
        let draw = match policy {
            Policy::RoundRobin => {
                let cursor = self.cursor(req.model);
                let turn = if first_attempt {
                    cursor.fetch_add(1, Ordering::Relaxed)
                } else {
                    cursor.load(Ordering::Relaxed)
                };
                turn as u64
            }
            Policy::PowerOfTwo => self.random(),
            _ => 0,
        };
        policy::Cx {
            snap,
            req,
            fresh: fresh_since(now, self.stale_after),
            draw,
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
        let (mut eligible, _) = self.eligible(snap, req, tried)?;
        let cx = self.context(policy, snap, req, tried.is_empty(), now);
        policy::order(policy, &cx, &mut eligible);
        Ok(eligible.into_vec())
    }

    /// The first of [`Selector::candidates`], without ordering the rest, and why it was
    /// picked. This is what the request path uses (a retry asks again, with fresher
    /// state).
    pub fn best(
        &self,
        policy: Policy,
        snap: &FleetSnapshot,
        req: &Request,
        tried: &[usize],
        now: Instant,
    ) -> Result<Choice, NoCandidate> {
        let (eligible, strict) = self.eligible(snap, req, tried)?;
        let cx = self.context(policy, snap, req, tried.is_empty(), now);
        let pick = policy::pick(policy, &cx, &eligible).ok_or(NoCandidate::Unavailable)?;
        let reason = if !strict {
            Reason::OpenCircuitFallback
        } else if eligible.len() == 1 {
            Reason::OnlyCandidate
        } else if pick.cached.is_some_and(|c| c > 0) {
            Reason::CachedPrefix
        } else if let Some(home) = pick.home {
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
                Policy::Vllm
                    if snap.backends[pick.index]
                        .state
                        .fresh_load(cx.fresh)
                        .is_some() =>
                {
                    Reason::LowestScore
                }
                Policy::Vllm => Reason::LocalEstimate,
            }
        };
        Ok(Choice {
            index: pick.index,
            reason,
            score_s: pick.score,
            cached_tokens: pick.cached,
        })
    }

    fn cursor(&self, model: &str) -> Arc<AtomicUsize> {
        // Only models the fleet serves get here, so the map is bounded by the fleet's
        // models; the write lock is taken once per model.
        if let Some(c) = self.cursors.read().get(model) {
            return c.clone();
        }
        self.cursors
            .write()
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
