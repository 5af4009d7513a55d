//! `power-of-two`: the less busy (in flight from this gateway) of two random backends.

use super::{Cx, Pick};

/// Positions in `eligible` of the two random picks (`Cx::draw`), the less busy first.
fn two(cx: &Cx, eligible: &[usize]) -> Option<(usize, usize)> {
    let n = eligible.len();
    if n < 2 {
        return (n == 1).then_some((0, 0));
    }
    let r = cx.draw;
    let a = (r % n as u64) as usize;
    let mut b = ((r >> 32) % (n as u64 - 1)) as usize;
    if b >= a {
        b += 1;
    }
    debug_assert!(a != b && a < n && b < n);
    let load = |p: usize| cx.snap.pick_inputs[eligible[p]].backend.in_flight();
    Some(if load(b) < load(a) { (b, a) } else { (a, b) })
}

pub(super) fn pick(cx: &Cx, eligible: &[usize]) -> Option<Pick> {
    two(cx, eligible).map(|(first, _)| Pick::plain(eligible[first]))
}

/// The two picks, the less busy first, then the rest in configuration order.
pub(super) fn order(cx: &Cx, eligible: &mut [usize]) {
    let Some((first, second)) = two(cx, eligible) else {
        return;
    };
    if first == second {
        return;
    }
    let (x, y) = (eligible[first], eligible[second]);
    let rest: smallvec::SmallVec<[usize; 64]> = eligible
        .iter()
        .copied()
        .filter(|&i| i != x && i != y)
        .collect();
    eligible[0] = x;
    eligible[1] = y;
    eligible[2..].copy_from_slice(&rest);
}
