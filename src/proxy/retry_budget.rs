//! The retry budget: retries are a bounded fraction of recent requests, so a failing fleet
//! gets each request about once, not `max_attempts` times.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Retries may not exceed `ratio` of the requests seen in the last [`RetryBudget::WINDOW`]
/// (plus `min` retries, so a quiet gateway can still retry). A fleet that fails most
/// requests then gets each request about once, not `max_attempts` times.
///
/// Lock-free: every request touches it. Concurrent retries may overshoot the budget by
/// the few that check it at the same instant.
#[derive(Debug)]
pub struct RetryBudget {
    /// Per-second counts, ring-indexed by the second since `origin`.
    slots: [Slot; SLOTS],
    origin: Instant,
}

#[derive(Debug, Default)]
struct Slot {
    /// 1 + the second this slot counts (0: never used).
    sec: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

const SLOTS: usize = 10;

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new()
    }
}

impl RetryBudget {
    pub const WINDOW: Duration = Duration::from_secs(SLOTS as u64);

    pub fn new() -> RetryBudget {
        RetryBudget {
            slots: Default::default(),
            origin: Instant::now(),
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs() + 1
    }

    /// The slot of `now`'s second, emptied first if it held an older second.
    fn slot(&self, now: Instant) -> &Slot {
        let sec = self.second(now);
        let slot = &self.slots[(sec % SLOTS as u64) as usize];
        let tag = slot.sec.load(Ordering::Acquire);
        if tag != sec
            && slot
                .sec
                .compare_exchange(tag, sec, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.requests.store(0, Ordering::Relaxed);
            slot.retries.store(0, Ordering::Relaxed);
        }
        slot
    }

    /// Counts a new request.
    pub fn record_request(&self, now: Instant) {
        self.slot(now).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Asks to spend one retry; counts it if allowed (`ratio` and `min` come from the
    /// running config).
    pub fn try_retry(&self, now: Instant, ratio: f64, min: u32) -> bool {
        let current = self.slot(now);
        let sec = self.second(now);
        let (requests, retries) = self
            .slots
            .iter()
            .filter(|s| {
                let t = s.sec.load(Ordering::Acquire);
                t != 0 && t + (SLOTS as u64) > sec
            })
            .fold((0u64, 0u64), |(a, b), s| {
                (
                    a + s.requests.load(Ordering::Relaxed),
                    b + s.retries.load(Ordering::Relaxed),
                )
            });
        let allowed = min as u64 + (ratio * requests as f64) as u64;
        if retries < allowed {
            current.retries.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_budget_is_a_fraction_of_recent_requests() {
        let b = RetryBudget::new();
        let t = Instant::now();
        let try_retry = |at| b.try_retry(at, 0.2, 2);
        assert!(try_retry(t) && try_retry(t), "the minimum");
        assert!(!try_retry(t));
        for _ in 0..50 {
            b.record_request(t);
        }
        let granted = (0..100).filter(|_| try_retry(t)).count();
        assert_eq!(granted, 10, "2 + 20% of 50, minus the 2 already spent");
        // After the window, old requests and retries no longer count.
        let later = t + RetryBudget::WINDOW + Duration::from_secs(1);
        assert!(try_retry(later) && try_retry(later));
        assert!(!try_retry(later));
    }
}
