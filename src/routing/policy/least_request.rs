//! `least-request`: the fewest requests in flight from this gateway.

use super::{by_key, lowest, Cx, Pick};

/// What the policy ranks by: requests in flight there.
fn load(cx: &Cx, i: usize) -> f64 {
    cx.snap.pick_inputs[i].backend.in_flight() as f64
}

pub(super) fn pick(cx: &Cx, eligible: &[usize]) -> Option<Pick> {
    lowest(eligible, |i| load(cx, i)).map(|(i, _)| Pick::plain(i))
}

pub(super) fn order(cx: &Cx, eligible: &mut [usize]) {
    by_key(eligible, |i| load(cx, i));
}
