//! Whether a backend may be sent requests: the state three sources feed (see
//! `observe::health_check` for the active side):
//! - active checks: `GET /health` every `health.interval`, with hysteresis
//!   (`unhealthy_threshold` consecutive failures take a backend out, `healthy_threshold`
//!   consecutive passes bring it back);
//! - passive outlier detection: a circuit breaker fed by request outcomes. Connect
//!   failures, resets, engine 5xx and timeouts count against a backend, before or after
//!   its answer's head (a body cut short, a stream that stalls); client errors never do,
//!   and only an answer received in full counts for it. `failure_threshold` consecutive
//!   failures open the circuit; after `open_duration` the health task sends one
//!   synthetic probe request (half-open), and its success closes the circuit. A stalled
//!   engine (its `/health` still 200) is thus ejected by its timeouts like a dead one;
//! - draining: a backend marked `drain: true` gets no new requests.
//!
//! The request path reads a few atomics ([`BackendHealth::routable`]); state changes are
//! logged once, when they happen.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use crate::config::HealthPolicy;

/// Why a request's attempt counts against its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Connection refused, unreachable, or not established in time.
    Connect,
    /// The connection broke before the answer was complete.
    Reset,
    /// The engine answered 5xx.
    Status5xx,
    /// No first byte, or no next chunk, within its limit.
    Timeout,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::Reset => "reset",
            FailureKind::Status5xx => "5xx",
            FailureKind::Timeout => "timeout",
        }
    }
}

/// Consecutive-result hysteresis over active check results.
#[derive(Debug, Default, Clone, Copy)]
pub struct Hysteresis {
    up: Option<bool>,
    /// Consecutive results disagreeing with `up`.
    streak: u32,
}

impl Hysteresis {
    /// Feeds one check result; returns the new state when it changed. The first result
    /// decides at once: a gateway starting next to a healthy fleet serves immediately.
    pub fn observe(&mut self, ok: bool, to_down: u32, to_up: u32) -> Option<bool> {
        match self.up {
            None => {
                self.up = Some(ok);
                self.streak = 0;
                Some(ok)
            }
            Some(up) if up == ok => {
                self.streak = 0;
                None
            }
            Some(up) => {
                self.streak += 1;
                let needed = if up { to_down } else { to_up };
                if self.streak >= needed.max(1) {
                    self.up = Some(ok);
                    self.streak = 0;
                    Some(ok)
                } else {
                    None
                }
            }
        }
    }

    pub fn state(&self) -> Option<bool> {
        self.up
    }
}

const CHECKS_UNKNOWN: u8 = 0;
const CHECKS_UP: u8 = 1;
const CHECKS_DOWN: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    /// Failing: no requests until a probe succeeds.
    Open,
    /// A probe is in flight.
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }
}

#[derive(Debug)]
struct Breaker {
    state: BreakerState,
    opened_at: Option<Instant>,
    last_failure: Option<FailureKind>,
    /// Times the circuit opened.
    opens: u64,
}

/// One backend's availability, shared by the health task and the request path.
#[derive(Debug)]
pub struct BackendHealth {
    /// The hysteresis result of the active checks (unknown before the first).
    checks: AtomicU8,
    /// Why the last check failed.
    check_error: Mutex<Option<String>>,
    hysteresis: Mutex<Hysteresis>,
    /// Consecutive failed requests (reset by any success).
    failures: AtomicU32,
    /// Mirrors `breaker.state != Closed`, for the request path.
    open: AtomicBool,
    breaker: Mutex<Breaker>,
    draining: AtomicBool,
}

impl Default for BackendHealth {
    fn default() -> Self {
        BackendHealth {
            checks: AtomicU8::new(CHECKS_UNKNOWN),
            check_error: Mutex::new(Some("not checked yet".into())),
            hysteresis: Mutex::new(Hysteresis::default()),
            failures: AtomicU32::new(0),
            open: AtomicBool::new(false),
            breaker: Mutex::new(Breaker {
                state: BreakerState::Closed,
                opened_at: None,
                last_failure: None,
                opens: 0,
            }),
            draining: AtomicBool::new(false),
        }
    }
}

/// What [`BackendHealth::observe_check`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckFlip {
    Up,
    Down,
}

impl BackendHealth {
    /// May new requests go there? Active checks pass, not draining, circuit closed.
    pub fn routable(&self) -> bool {
        self.checks_up() && !self.is_draining() && !self.open.load(Ordering::Relaxed)
    }

    /// Routable but for an open circuit: the fallback when every backend of a model has
    /// its circuit open (a fleet-wide slowdown must not become a total outage).
    pub fn routable_ignoring_breaker(&self) -> bool {
        self.checks_up() && !self.is_draining()
    }

    pub fn checks_up(&self) -> bool {
        self.checks.load(Ordering::Relaxed) == CHECKS_UP
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn set_draining(&self, drain: bool) {
        self.draining.store(drain, Ordering::Relaxed);
    }

    /// Takes over another's active-check verdict (a backend re-created by a reload).
    pub fn inherit_checks(&self, other: &BackendHealth) {
        self.checks
            .store(other.checks.load(Ordering::Relaxed), Ordering::Relaxed);
        *self.hysteresis.lock() = *other.hysteresis.lock();
        *self.check_error.lock() = other.check_error();
    }

    pub fn check_error(&self) -> Option<String> {
        self.check_error.lock().clone()
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.lock().state
    }

    pub fn breaker_opens(&self) -> u64 {
        self.breaker.lock().opens
    }

    pub fn last_failure(&self) -> Option<FailureKind> {
        self.breaker.lock().last_failure
    }

    /// Feeds an active check result. Returns the flip, if the hysteresis flipped. A
    /// backend coming back up also gets its circuit closed: passing checks after being
    /// down is the proof a probe would give.
    pub fn observe_check(&self, result: Result<(), String>, p: &HealthPolicy) -> Option<CheckFlip> {
        let ok = result.is_ok();
        *self.check_error.lock() = result.err();
        let flipped =
            self.hysteresis
                .lock()
                .observe(ok, p.unhealthy_threshold, p.healthy_threshold)?;
        self.checks.store(
            if flipped { CHECKS_UP } else { CHECKS_DOWN },
            Ordering::Relaxed,
        );
        if flipped {
            self.close();
            Some(CheckFlip::Up)
        } else {
            Some(CheckFlip::Down)
        }
    }

    /// A request got a good answer (any status below 500), in full.
    pub fn record_success(&self) {
        // The common case is a plain load: no write on a healthy backend's hot path.
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// A request's attempt failed because of the backend. Returns true when this opened
    /// the circuit.
    pub fn record_failure(&self, kind: FailureKind, threshold: u32, now: Instant) -> bool {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let mut b = self.breaker.lock();
        b.last_failure = Some(kind);
        if b.state == BreakerState::Closed && n >= threshold.max(1) {
            b.state = BreakerState::Open;
            b.opened_at = Some(now);
            b.opens += 1;
            self.open.store(true, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Whether a probe is due: the circuit has been open for `open_duration`. Moves it to
    /// half-open, so only one probe runs at a time.
    pub fn begin_probe(&self, now: Instant, open_duration: Duration) -> bool {
        let mut b = self.breaker.lock();
        let due = b.state == BreakerState::Open
            && b.opened_at
                .is_none_or(|t| now.saturating_duration_since(t) >= open_duration);
        if due {
            b.state = BreakerState::HalfOpen;
        }
        due
    }

    /// The probe's result: success closes the circuit, failure opens it again.
    pub fn end_probe(&self, ok: bool, now: Instant) {
        if ok {
            self.close();
        } else {
            let mut b = self.breaker.lock();
            if b.state == BreakerState::HalfOpen {
                b.state = BreakerState::Open;
                b.opened_at = Some(now);
            }
        }
    }

    fn close(&self) {
        let mut b = self.breaker.lock();
        b.state = BreakerState::Closed;
        b.opened_at = None;
        self.failures.store(0, Ordering::Relaxed);
        self.open.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> HealthPolicy {
        HealthPolicy {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            unhealthy_threshold: 2,
            healthy_threshold: 3,
            failure_threshold: 3,
            open_duration: Duration::from_secs(5),
        }
    }

    #[test]
    fn hysteresis_needs_consecutive_results() {
        let mut h = Hysteresis::default();
        assert_eq!(h.observe(true, 2, 3), Some(true), "first result decides");
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(
            h.observe(true, 2, 3),
            None,
            "a pass resets the failure streak"
        );
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(false, 2, 3), Some(false));
        assert_eq!(h.observe(true, 2, 3), None);
        assert_eq!(h.observe(true, 2, 3), None);
        assert_eq!(h.observe(true, 2, 3), Some(true));
        assert_eq!(h.state(), Some(true));
    }

    #[test]
    fn checks_decide_routability_and_a_return_closes_the_circuit() {
        let h = BackendHealth::default();
        let p = policy();
        assert!(!h.routable(), "unknown until checked");
        assert_eq!(h.observe_check(Ok(()), &p), Some(CheckFlip::Up));
        assert!(h.routable());
        let t = Instant::now();
        for _ in 0..3 {
            h.record_failure(FailureKind::Connect, p.failure_threshold, t);
        }
        assert!(!h.routable());
        assert!(h.routable_ignoring_breaker());
        assert_eq!(h.observe_check(Err("refused".into()), &p), None);
        assert_eq!(
            h.observe_check(Err("refused".into()), &p),
            Some(CheckFlip::Down)
        );
        assert!(!h.routable_ignoring_breaker());
        assert_eq!(h.check_error().as_deref(), Some("refused"));
        for _ in 0..2 {
            assert_eq!(h.observe_check(Ok(()), &p), None);
        }
        assert_eq!(h.observe_check(Ok(()), &p), Some(CheckFlip::Up));
        assert!(h.routable(), "back up: circuit closed too");
        assert_eq!(h.breaker_state(), BreakerState::Closed);
        h.set_draining(true);
        assert!(!h.routable() && !h.routable_ignoring_breaker());
    }

    #[test]
    fn breaker_opens_on_consecutive_failures_and_probes_once() {
        let h = BackendHealth::default();
        let p = policy();
        h.observe_check(Ok(()), &p);
        let t0 = Instant::now();
        assert!(!h.record_failure(FailureKind::Timeout, 3, t0));
        assert!(!h.record_failure(FailureKind::Timeout, 3, t0));
        h.record_success();
        assert!(!h.record_failure(FailureKind::Timeout, 3, t0));
        assert!(!h.record_failure(FailureKind::Timeout, 3, t0));
        assert!(h.routable(), "a success in between resets the count");
        assert!(
            h.record_failure(FailureKind::Reset, 3, t0),
            "third in a row opens"
        );
        assert!(!h.record_failure(FailureKind::Reset, 3, t0), "already open");
        assert_eq!(h.breaker_state(), BreakerState::Open);
        assert_eq!(h.last_failure(), Some(FailureKind::Reset));
        assert!(!h.begin_probe(t0 + Duration::from_secs(4), p.open_duration));
        let t1 = t0 + Duration::from_secs(5);
        assert!(h.begin_probe(t1, p.open_duration));
        assert!(!h.begin_probe(t1, p.open_duration), "one probe at a time");
        assert_eq!(h.breaker_state(), BreakerState::HalfOpen);
        assert!(!h.routable());
        h.end_probe(false, t1);
        assert_eq!(h.breaker_state(), BreakerState::Open);
        assert!(!h.begin_probe(t1 + Duration::from_secs(1), p.open_duration));
        assert!(h.begin_probe(t1 + Duration::from_secs(5), p.open_duration));
        h.end_probe(true, t1);
        assert!(h.routable());
        assert_eq!(h.breaker_opens(), 1);
    }
}
