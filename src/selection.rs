//! Replica selection: a pure function of (snapshot, request, already-tried set) that
//! returns candidates in preference order. The proxy takes the first; on a retry it asks
//! again with the failed backend in the tried set.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::config::Policy;
use crate::fleet::FleetSnapshot;

/// Why no candidate was returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoCandidate {
    /// No backend has ever served this model.
    UnknownModel,
    /// Backends serve it, but none is healthy and untried.
    Unavailable,
}

/// Per-gateway selection state: a round-robin cursor per model, so that requests for
/// other models in between do not skew one model's rotation.
#[derive(Debug, Default)]
pub struct Selector {
    cursors: RwLock<HashMap<String, Arc<AtomicUsize>>>,
}

impl Selector {
    /// Healthy, untried backends serving `model`, best first. `tried` holds backend
    /// indices of this snapshot.
    pub fn candidates(
        &self,
        policy: Policy,
        snap: &FleetSnapshot,
        model: &str,
        tried: &[usize],
    ) -> Result<Vec<usize>, NoCandidate> {
        let serving = snap.serving(model).ok_or(NoCandidate::UnknownModel)?;
        let mut eligible: Vec<usize> = serving
            .iter()
            .copied()
            .filter(|&i| snap.backends[i].state.healthy && !tried.contains(&i))
            .collect();
        if eligible.is_empty() {
            return Err(NoCandidate::Unavailable);
        }
        match policy {
            Policy::RoundRobin => {
                // One cursor step per request (not per retry), so retries do not skew the
                // rotation.
                let cursor = self.cursor(model);
                let start = if tried.is_empty() {
                    cursor.fetch_add(1, Ordering::Relaxed)
                } else {
                    cursor.load(Ordering::Relaxed)
                };
                let n = eligible.len();
                eligible.rotate_left(start % n);
            }
            Policy::LeastRequest => {
                // Stable sort: ties keep configuration order.
                eligible.sort_by_key(|&i| snap.backends[i].backend.in_flight());
            }
        }
        Ok(eligible)
    }

    /// The model's cursor. Only models the fleet serves get here, so the map is bounded
    /// by the fleet's models; the write lock is taken once per model.
    fn cursor(&self, model: &str) -> Arc<AtomicUsize> {
        if let Some(c) = self.cursors.read().expect("not poisoned").get(model) {
            return c.clone();
        }
        self.cursors
            .write()
            .expect("not poisoned")
            .entry(model.to_string())
            .or_default()
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendConfig;
    use crate::fleet::{BackendEntry, BackendState, Fleet};

    fn snapshot(healthy: &[bool]) -> FleetSnapshot {
        let cfgs: Vec<BackendConfig> = (0..healthy.len())
            .map(|i| BackendConfig {
                name: format!("b{i}"),
                url: format!("http://b{i}"),
                addr: "127.0.0.1:1".parse().unwrap(),
                static_models: Some(vec!["m".into()]),
            })
            .collect();
        let fleet = Fleet::new(&cfgs);
        let entries = fleet
            .load()
            .backends
            .iter()
            .zip(healthy)
            .map(|(e, &h)| BackendEntry {
                backend: e.backend.clone(),
                state: BackendState {
                    healthy: h,
                    ..e.state.clone()
                },
            })
            .collect();
        FleetSnapshot::new(entries)
    }

    #[test]
    fn round_robin_rotates_over_healthy_backends() {
        let snap = snapshot(&[true, false, true]);
        let sel = Selector::default();
        let firsts: Vec<usize> = (0..4)
            .map(|_| sel.candidates(Policy::RoundRobin, &snap, "m", &[]).unwrap()[0])
            .collect();
        assert_eq!(firsts, vec![0, 2, 0, 2]);
    }

    #[test]
    fn round_robin_rotates_per_model() {
        let snap = snapshot(&[true, true]);
        let sel = Selector::default();
        let mut firsts = Vec::new();
        for _ in 0..4 {
            firsts.push(sel.candidates(Policy::RoundRobin, &snap, "m", &[]).unwrap()[0]);
            // A request for another model in between must not skew the rotation of "m".
            let _ = sel.candidates(Policy::RoundRobin, &snap, "other", &[]);
        }
        assert_eq!(firsts, vec![0, 1, 0, 1]);
    }

    #[test]
    fn tried_backends_are_skipped_and_errors_are_distinct() {
        let snap = snapshot(&[true, true]);
        let sel = Selector::default();
        assert_eq!(
            sel.candidates(Policy::RoundRobin, &snap, "m", &[0])
                .unwrap(),
            vec![1]
        );
        assert_eq!(
            sel.candidates(Policy::RoundRobin, &snap, "m", &[0, 1]),
            Err(NoCandidate::Unavailable)
        );
        assert_eq!(
            sel.candidates(Policy::RoundRobin, &snap, "x", &[]),
            Err(NoCandidate::UnknownModel)
        );
    }

    #[test]
    fn least_request_prefers_fewest_in_flight() {
        let snap = snapshot(&[true, true, true]);
        let _a = snap.backends[0].backend.begin_request();
        let _b = snap.backends[1].backend.begin_request();
        let _c = snap.backends[1].backend.begin_request();
        let sel = Selector::default();
        assert_eq!(
            sel.candidates(Policy::LeastRequest, &snap, "m", &[])
                .unwrap(),
            vec![2, 0, 1]
        );
    }
}
