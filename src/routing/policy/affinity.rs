//! `affinity`: the request's prefix-affinity home unless its load is above the bound
//! (consistent hashing with bounded loads), else the next in the key's order that is not;
//! without a key, the least loaded.

use std::time::Instant;

use super::{by_key, lowest, Cx, Pick};
use crate::fleet::FleetSnapshot;
use crate::routing::affinity::{self, affinity_rank};
use crate::routing::score::{engine_now, STALE_PENALTY};
use crate::routing::Sticky;

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
pub(in crate::routing) const AFFINITY_HEADROOM: f64 = 1.0;

/// `(index, value)` pairs sorted into the key's preference order (highest rendezvous rank
/// first; each rank computed once).
pub(in crate::routing) fn affinity_order(
    snap: &FleetSnapshot,
    sticky: &Sticky,
    items: &mut [(usize, f64)],
) {
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
pub(in crate::routing) fn affinity_first(
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

/// The loads of `eligible`, each with its backend.
fn loads(cx: &Cx, eligible: &[usize]) -> smallvec::SmallVec<[(usize, f64); 64]> {
    eligible
        .iter()
        .map(|&i| (i, affinity_load(cx.snap, i, cx.fresh)))
        .collect()
}

pub(super) fn pick(cx: &Cx, eligible: &[usize]) -> Option<Pick> {
    let Some(sticky) = &cx.req.affinity else {
        let (index, _) = lowest(eligible, |i| affinity_load(cx.snap, i, cx.fresh))?;
        return Some(Pick::plain(index));
    };
    let loads = loads(cx, eligible);
    let bound = affinity::load_bound(
        loads.iter().map(|x| x.1),
        sticky.load_factor,
        AFFINITY_HEADROOM,
    )?;
    let ((index, _), home) = affinity_first(cx.snap, sticky, &loads, |_, load| load <= bound)?;
    Some(Pick {
        index,
        score: None,
        home: Some(home),
        cached: None,
    })
}

/// The pick, then the rest in the key's order (without a key: by load).
pub(super) fn order(cx: &Cx, eligible: &mut [usize]) {
    let Some(first) = pick(cx, eligible) else {
        return;
    };
    super::put_first(eligible, first.index);
    let rest = &mut eligible[1..];
    match &cx.req.affinity {
        Some(sticky) => {
            let mut items: smallvec::SmallVec<[(usize, f64); 64]> =
                rest.iter().map(|&i| (i, 0.0)).collect();
            affinity_order(cx.snap, sticky, &mut items);
            for (slot, (i, _)) in rest.iter_mut().zip(items) {
                *slot = i;
            }
        }
        None => by_key(rest, |i| affinity_load(cx.snap, i, cx.fresh)),
    }
}
