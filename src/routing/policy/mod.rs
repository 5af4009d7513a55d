//! The policies (`routing.policy`), one file each. Each gives its pick and its order from
//! the same ranking: the pick is the order's first, found in one pass without ordering
//! the rest (what the request path asks for); the order is what `/explain` shows, the
//! pick and then the backends in the order the policy would pick them.

pub(super) mod affinity;
mod least_request;
mod power_of_two;
mod round_robin;
mod vllm;

use std::time::Instant;

use super::Request;
use crate::config::Policy;
use crate::fleet::FleetSnapshot;

/// What a pick reads besides the backends it chooses among.
pub(super) struct Cx<'a> {
    pub snap: &'a FleetSnapshot,
    pub req: &'a Request<'a>,
    /// `fresh_since(now, stale_after)`: scrapes older than this are stale.
    pub fresh: Option<Instant>,
    /// Round-robin's turn (its model's cursor), power-of-two's random draw.
    pub draw: u64,
}

/// A policy's pick.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pick {
    /// Index in the snapshot.
    pub index: usize,
    /// The `vllm` estimate of it, in seconds.
    pub score: Option<f64>,
    /// For a pick by prefix affinity: whether it is the key's home.
    pub home: Option<bool>,
    /// For a pick on KV events: the prompt tokens cached there.
    pub cached: Option<u32>,
}

impl Pick {
    fn plain(index: usize) -> Pick {
        Pick {
            index,
            score: None,
            home: None,
            cached: None,
        }
    }
}

/// `policy`'s pick among `eligible` (indices of `cx.snap`); `None` when it is empty.
pub(super) fn pick(policy: Policy, cx: &Cx, eligible: &[usize]) -> Option<Pick> {
    match policy {
        Policy::RoundRobin => round_robin::pick(cx, eligible),
        Policy::LeastRequest => least_request::pick(cx, eligible),
        Policy::PowerOfTwo => power_of_two::pick(cx, eligible),
        Policy::Vllm => vllm::pick(cx, eligible),
        Policy::Affinity => affinity::pick(cx, eligible),
    }
}

/// `eligible` in `policy`'s order: its pick first.
pub(super) fn order(policy: Policy, cx: &Cx, eligible: &mut [usize]) {
    match policy {
        Policy::RoundRobin => round_robin::order(cx, eligible),
        Policy::LeastRequest => least_request::order(cx, eligible),
        Policy::PowerOfTwo => power_of_two::order(cx, eligible),
        Policy::Vllm => vllm::order(cx, eligible),
        Policy::Affinity => affinity::order(cx, eligible),
    }
}

/// The first of `eligible` with the lowest `key`, and its key: the first of
/// [`by_key`]'s order, in one pass.
fn lowest(eligible: &[usize], key: impl Fn(usize) -> f64) -> Option<(usize, f64)> {
    let mut best: Option<(usize, f64)> = None;
    for &i in eligible {
        let k = key(i);
        if best.is_none_or(|(_, b)| k.total_cmp(&b).is_lt()) {
            best = Some((i, k));
        }
    }
    best
}

/// `eligible` by `key`, lowest first; ties keep their order (configuration order).
fn by_key(eligible: &mut [usize], key: impl Fn(usize) -> f64) {
    let mut keyed: smallvec::SmallVec<[(f64, usize); 64]> =
        eligible.iter().map(|&i| (key(i), i)).collect();
    keyed.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (slot, (_, i)) in eligible.iter_mut().zip(keyed) {
        *slot = i;
    }
}

/// Moves `index` to the front of `eligible`, the others keeping their order.
fn put_first(eligible: &mut [usize], index: usize) {
    if let Some(p) = eligible.iter().position(|&i| i == index) {
        eligible[..=p].rotate_right(1);
    }
}
