//! `round-robin`: in turn, per model (`Cx::draw` is the model's turn).

use super::{Cx, Pick};

/// Where the turn starts among `n` backends.
fn start(cx: &Cx, n: usize) -> usize {
    (cx.draw % n as u64) as usize
}

pub(super) fn pick(cx: &Cx, eligible: &[usize]) -> Option<Pick> {
    let n = eligible.len();
    (n > 0).then(|| Pick::plain(eligible[start(cx, n)]))
}

pub(super) fn order(cx: &Cx, eligible: &mut [usize]) {
    let n = eligible.len();
    if n > 0 {
        eligible.rotate_left(start(cx, n));
    }
}
