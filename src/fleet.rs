//! The fleet: each backend's identity, its live state as last observed, and this gateway's
//! own in-flight count per backend.
//!
//! Background tasks build a new immutable [`FleetSnapshot`] and swap it in through
//! [`Fleet::store`]; the request path only [`Fleet::load`]s it (wait-free) and touches the
//! per-backend atomics through an RAII [`InFlightGuard`], so counts cannot drift.

use arc_swap::ArcSwap;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::config::BackendConfig;

/// A backend's identity, shared by every snapshot that contains it. Its counters live as
/// long as the backend stays in the configuration.
#[derive(Debug)]
pub struct Backend {
    pub name: String,
    pub url: String,
    pub addr: SocketAddr,
    /// Models from the config file; `None` means discover them from `/v1/models`.
    pub static_models: Option<Vec<String>>,
    in_flight: AtomicUsize,
}

impl Backend {
    pub fn new(cfg: &BackendConfig) -> Arc<Backend> {
        Arc::new(Backend {
            name: cfg.name.clone(),
            url: cfg.url.clone(),
            addr: cfg.addr,
            static_models: cfg.static_models.clone(),
            in_flight: AtomicUsize::new(0),
        })
    }

    /// Requests this gateway has sent to the backend that have not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight until the guard is dropped.
    pub fn begin_request(self: &Arc<Self>) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(self.clone())
    }
}

/// Holds one in-flight count on a backend; dropping it releases the count.
#[derive(Debug)]
pub struct InFlightGuard(Arc<Backend>);

impl InFlightGuard {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What was last observed about one backend.
#[derive(Debug, Clone)]
pub struct BackendState {
    pub healthy: bool,
    /// The models it serves: the last known list, kept while it is unhealthy so that a
    /// request for its model gets 503 (temporarily unavailable), not 404.
    pub models: Vec<String>,
    pub last_error: Option<String>,
    pub observed_at: Option<Instant>,
}

impl BackendState {
    pub fn unknown(backend: &Backend) -> BackendState {
        BackendState {
            healthy: false,
            models: backend.static_models.clone().unwrap_or_default(),
            last_error: Some("not checked yet".into()),
            observed_at: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct BackendEntry {
    pub backend: Arc<Backend>,
    pub state: BackendState,
}

/// An immutable view of the whole fleet.
#[derive(Debug, Default)]
pub struct FleetSnapshot {
    pub backends: Vec<BackendEntry>,
    /// model → indices into `backends` of every backend known to serve it (healthy or not).
    by_model: BTreeMap<String, Vec<usize>>,
}

impl FleetSnapshot {
    pub fn new(backends: Vec<BackendEntry>) -> FleetSnapshot {
        let mut by_model: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, e) in backends.iter().enumerate() {
            for m in &e.state.models {
                let list = by_model.entry(m.clone()).or_default();
                if !list.contains(&i) {
                    list.push(i);
                }
            }
        }
        FleetSnapshot { backends, by_model }
    }

    /// Indices of the backends known to serve `model`, healthy or not; `None` when no
    /// backend has ever served it.
    pub fn serving(&self, model: &str) -> Option<&[usize]> {
        self.by_model.get(model).map(|v| v.as_slice())
    }

    /// The union of the models of all healthy backends, sorted.
    pub fn healthy_models(&self) -> Vec<String> {
        self.by_model
            .iter()
            .filter(|(_, idx)| idx.iter().any(|&i| self.backends[i].state.healthy))
            .map(|(m, _)| m.clone())
            .collect()
    }
}

/// The shared handle: the current snapshot, swapped atomically.
#[derive(Debug)]
pub struct Fleet {
    current: ArcSwap<FleetSnapshot>,
}

impl Fleet {
    /// A fleet of the configured backends, none of them checked yet.
    pub fn new(backends: &[BackendConfig]) -> Arc<Fleet> {
        let entries = backends
            .iter()
            .map(|c| {
                let backend = Backend::new(c);
                let state = BackendState::unknown(&backend);
                BackendEntry { backend, state }
            })
            .collect();
        Arc::new(Fleet {
            current: ArcSwap::from_pointee(FleetSnapshot::new(entries)),
        })
    }

    pub fn load(&self) -> Arc<FleetSnapshot> {
        self.current.load_full()
    }

    pub fn store(&self, snapshot: FleetSnapshot) {
        self.current.store(Arc::new(snapshot));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(name: &str, models: Option<&[&str]>) -> BackendConfig {
        BackendConfig {
            name: name.into(),
            url: format!("http://{name}"),
            addr: "127.0.0.1:1".parse().unwrap(),
            static_models: models.map(|m| m.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn guard_counts_and_releases() {
        let b = Backend::new(&cfg("a", None));
        let g1 = b.begin_request();
        let g2 = b.begin_request();
        assert_eq!(b.in_flight(), 2);
        drop(g1);
        assert_eq!(b.in_flight(), 1);
        drop(g2);
        assert_eq!(b.in_flight(), 0);
    }

    #[test]
    fn models_index_and_union_of_healthy() {
        let fleet = Fleet::new(&[cfg("a", Some(&["m1", "m2"])), cfg("b", Some(&["m2", "m3"]))]);
        let snap = fleet.load();
        assert_eq!(snap.serving("m2"), Some(&[0usize, 1][..]));
        assert!(snap.healthy_models().is_empty(), "nothing is checked yet");
        let mut entries = snap.backends.clone();
        entries[1].state.healthy = true;
        fleet.store(FleetSnapshot::new(entries));
        assert_eq!(fleet.load().healthy_models(), vec!["m2", "m3"]);
        assert_eq!(fleet.load().serving("m1"), Some(&[0usize][..]));
        assert_eq!(fleet.load().serving("nope"), None);
    }
}
