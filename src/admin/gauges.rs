//! `GET /metrics`: the metrics the gateway counts (`crate::metrics`), and the per-backend
//! gauges, read from the fleet snapshot when rendered.

use prometheus::{Gauge, GaugeVec, IntCounterVec, Opts, Registry};
use std::time::Instant;

use crate::fleet::health::BreakerState;
use crate::fleet::{fresh_since, FleetSnapshot};

/// The queue gauge, read from flow control at render time: a flow that emptied
/// disappears.
fn queue_registry(flow: &crate::flow::FlowControl) -> Registry {
    let registry = Registry::new();
    let g = GaugeVec::new(
        Opts::new(
            "vllm_edge_queue_requests",
            "Requests waiting in the gateway's queue for a free slot (flow control), by \
             model, priority class and key name (`-` without auth).",
        ),
        &["model", "priority", "key"],
    )
    .expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("each name once");
    for (model, class, key, n) in flow.lengths() {
        g.with_label_values(&[&model, class.as_str(), &key])
            .set(n as f64);
    }
    registry
}

/// The per-backend gauges, read from the fleet snapshot at render time.
fn fleet_registry(snap: &FleetSnapshot, fresh_after: Option<Instant>, now: Instant) -> Registry {
    let registry = Registry::new();
    let gauge = |name: &str, help: &str, labels: &[&str]| {
        let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
        registry
            .register(Box::new(g.clone()))
            .expect("each name once");
        g
    };
    let up = gauge(
        "vllm_edge_backend_up",
        "1 when the backend passes its health checks.",
        &["backend"],
    );
    let routable = gauge(
        "vllm_edge_backend_routable",
        "1 when the backend may be picked: checks pass, not draining, circuit closed.",
        &["backend"],
    );
    let draining = gauge(
        "vllm_edge_backend_draining",
        "1 while the backend is drained by configuration.",
        &["backend"],
    );
    let circuit = gauge(
        "vllm_edge_backend_circuit_state",
        "1 for the backend's circuit-breaker state (closed, open, half-open), 0 for the others.",
        &["backend", "state"],
    );
    let opens = IntCounterVec::new(
        Opts::new(
            "vllm_edge_backend_circuit_opens_total",
            "Times the backend's circuit opened since the backend joined the fleet (a reload \
             that replaces the backend starts it again).",
        ),
        &["backend"],
    )
    .expect("valid metric");
    registry
        .register(Box::new(opens.clone()))
        .expect("each name once");
    let in_flight = gauge(
        "vllm_edge_backend_in_flight_requests",
        "Requests this gateway has in flight at the backend.",
        &["backend"],
    );
    let running = gauge(
        "vllm_edge_backend_engine_running_requests",
        "Requests the engine reported running in its batch (fresh scrapes only).",
        &["backend"],
    );
    let waiting = gauge(
        "vllm_edge_backend_engine_waiting_requests",
        "Requests the engine reported waiting in its queue (fresh scrapes only).",
        &["backend"],
    );
    let kv = gauge(
        "vllm_edge_backend_kv_cache_usage_ratio",
        "KV-cache usage the engine reported, 0 to 1 (fresh scrapes only).",
        &["backend"],
    );
    let age = gauge(
        "vllm_edge_backend_scrape_age_seconds",
        "Time since the backend's last successful /metrics scrape.",
        &["backend"],
    );
    let scrape_ok = gauge(
        "vllm_edge_backend_scrape_ok",
        "1 when the backend's last /metrics scrape succeeded.",
        &["backend"],
    );
    for e in &snap.backends {
        let (b, st, h) = (&e.backend, &e.state, &e.backend.health);
        let name = [b.name.as_str()];
        let flag = |v: bool| if v { 1.0 } else { 0.0 };
        up.with_label_values(&name).set(flag(h.checks_up()));
        routable.with_label_values(&name).set(flag(h.routable()));
        draining.with_label_values(&name).set(flag(h.is_draining()));
        let state = h.breaker_state();
        for s in [
            BreakerState::Closed,
            BreakerState::Open,
            BreakerState::HalfOpen,
        ] {
            circuit
                .with_label_values(&[b.name.as_str(), s.as_str()])
                .set(flag(s == state));
        }
        opens.with_label_values(&name).inc_by(h.breaker_opens());
        in_flight.with_label_values(&name).set(b.in_flight() as f64);
        if let Some(l) = st.fresh_load(fresh_after) {
            for (g, v) in [
                (&running, l.running),
                (&waiting, l.waiting),
                (&kv, l.kv_usage),
            ] {
                if let Some(v) = v {
                    g.with_label_values(&name).set(v);
                }
            }
        }
        if let Some(at) = st.load_at {
            age.with_label_values(&name)
                .set(now.saturating_duration_since(at).as_secs_f64());
        }
        scrape_ok
            .with_label_values(&name)
            .set(flag(st.scrape_error.is_none() && st.load_at.is_some()));
    }
    let info = Gauge::with_opts(
        Opts::new("vllm_edge_build_info", "Always 1; the version is a label.")
            .const_label("version", env!("CARGO_PKG_VERSION")),
    )
    .expect("valid metric");
    info.set(1.0);
    registry.register(Box::new(info)).expect("each name once");
    registry
}

/// The text exposition of every metric: the registered ones and the fleet's state.
pub fn render(
    snap: &FleetSnapshot,
    stale_after: std::time::Duration,
    flow: &crate::flow::FlowControl,
) -> Vec<u8> {
    use prometheus::Encoder;
    let now = Instant::now();
    let mut families = prometheus::gather();
    families.extend(fleet_registry(snap, fresh_since(now, stale_after), now).gather());
    families.extend(queue_registry(flow).gather());
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode(&families, &mut out) {
        tracing::error!(error = %e, "encoding metrics");
    }
    out
}
