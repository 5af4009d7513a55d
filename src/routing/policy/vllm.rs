//! `vllm` (the default): the lowest estimate of the time to the request's first token
//! ([`crate::routing::vllm_score`]). When every candidate's prefix cache is known from
//! its KV events, each estimate counts only the prefill its engine still has to do, and
//! among those within the load factor of the lowest, the one holding the most of the
//! prompt wins. Otherwise, for a request with a prefix-affinity key, its home
//! instead when that is cheap: its estimate within the load factor of the lowest, plus
//! the prefill its prefix cache likely saves.

use smallvec::SmallVec;
use std::time::Instant;

use super::{by_key, lowest, Cx, Pick};
use crate::fleet::FleetSnapshot;
use crate::routing::affinity::affinity_rank;
use crate::routing::score::{Scorer, PREFILL_TOKENS_PER_STEP};
use crate::routing::{Request, Sticky, BYTES_PER_TOKEN};

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

/// Whether the request's key weighs in: it has one, with a prefix worth reusing.
fn keyed<'a>(cx: &Cx<'a>) -> Option<&'a Sticky> {
    cx.req
        .affinity
        .as_ref()
        .filter(|a| a.key.reusable_bytes > 0)
}

/// Whether the pick is made on KV events: every candidate's engine cache is known
/// exactly. (Where one is not, the approximate affinity decides for all, as it would
/// without events: a replica whose events stopped or gapped is never judged on a guess
/// set against others' facts.)
fn exact<'a>(cx: &Cx<'a>, eligible: &[usize]) -> Option<&'a crate::routing::prefix::CachedPrefix> {
    cx.req.cached.filter(|c| c.covers(eligible))
}

/// The pick on KV events: among the backends whose estimate (each counting only the
/// prefill its engine still has to do) is within the load factor of the lowest, the one
/// holding the most of the prompt; on equal holdings, the first in the key's rendezvous
/// order (without a key: the lowest estimate). The holdings come from the engines'
/// events, which every gateway sees alike, and the order is fixed: gateways that differ
/// only in their own load accounting still agree inside the band.
fn on_events(
    cx: &Cx,
    eligible: &[usize],
    cached: &crate::routing::prefix::CachedPrefix,
) -> Option<Pick> {
    let scorer = Scorer::new(cx.snap, cx.req, cx.fresh);
    let scores: SmallVec<[(usize, f64); 64]> = eligible
        .iter()
        .map(|&i| (i, scorer.score(cx.snap, i)))
        .collect();
    let low = scores.iter().map(|s| s.1).fold(f64::INFINITY, f64::min);
    let sticky = cx.req.affinity.as_ref();
    let band = low * sticky.map_or(1.0, |s| s.load_factor);
    let tiebreak = |i: usize, s: f64| match sticky {
        Some(st) => affinity_rank(cx.snap, st, i),
        None => -s,
    };
    let mut best: Option<(u32, f64, usize, f64)> = None;
    for &(i, s) in &scores {
        if s > band {
            continue;
        }
        let held = cached.get(i).unwrap_or(0);
        let t = tiebreak(i, s);
        if best.is_none_or(|(h, bt, _, _)| held > h || (held == h && t > bt)) {
            best = Some((held, t, i, s));
        }
    }
    let (held, _, index, score) = best?;
    Some(Pick {
        index,
        score: Some(score),
        home: None,
        cached: Some(held),
    })
}

pub(super) fn pick(cx: &Cx, eligible: &[usize]) -> Option<Pick> {
    if let Some(cached) = exact(cx, eligible) {
        return on_events(cx, eligible, cached);
    }
    if let Some(sticky) = keyed(cx) {
        let (index, score, _, home) = keyed_vllm(cx.snap, cx.req, sticky, cx.fresh, || {
            eligible.iter().copied()
        })?;
        return Some(Pick {
            index,
            score: Some(score),
            home: Some(home),
            cached: None,
        });
    }
    let scorer = Scorer::new(cx.snap, cx.req, cx.fresh);
    let (index, score) = lowest(eligible, |i| scorer.score(cx.snap, i))?;
    Some(Pick {
        index,
        score: Some(score),
        home: None,
        cached: None,
    })
}

/// By estimate, lowest first; for a keyed request, its pick first.
pub(super) fn order(cx: &Cx, eligible: &mut [usize]) {
    let scorer = Scorer::new(cx.snap, cx.req, cx.fresh);
    if let Some(cached) = exact(cx, eligible) {
        // The pick first, then by estimate.
        let first = on_events(cx, eligible, cached);
        by_key(eligible, |i| scorer.score(cx.snap, i));
        if let Some(first) = first {
            super::put_first(eligible, first.index);
        }
        return;
    }
    let rest = match keyed(cx).and_then(|_| pick(cx, eligible)) {
        Some(first) => {
            super::put_first(eligible, first.index);
            &mut eligible[1..]
        }
        None => eligible,
    };
    by_key(rest, |i| scorer.score(cx.snap, i));
}
