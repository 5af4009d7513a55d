//! The gateway's own Prometheus metrics: every name defined here, one prefix
//! (`vllm_edge_`), base units, `_total` counters. Request metrics are recorded in the
//! proxy's `logging` phase; the per-backend state (health, circuit, in-flight, what the
//! engine reported) is read from the fleet snapshot when `/metrics` is rendered, so a
//! backend removed by a reload disappears with it. Labels are bounded: models the fleet
//! serves, configured backend names, fixed sets of kinds and reasons; never request ids
//! or keys.

use prometheus::{
    register_histogram_vec, register_int_counter, register_int_counter_vec, register_int_gauge,
    register_int_gauge_vec, Gauge, GaugeVec, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};
use std::sync::LazyLock;
use std::time::Instant;

use crate::fleet::health::BreakerState;
use crate::fleet::{fresh_since, FleetSnapshot};

/// Request latencies: from a few ms (a cached short answer) to minutes (a long
/// generation).
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "vllm_edge_requests_total",
        "Requests answered, by model, backend and status class.",
        &["model", "backend", "status_class"]
    )
    .expect("metric registers once")
});

pub static REQUEST_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "vllm_edge_request_duration_seconds",
        "Time from request start to the end of the response, by stream mode.",
        &["stream"],
        LATENCY_BUCKETS.to_vec()
    )
    .expect("metric registers once")
});

pub static TIME_TO_FIRST_BYTE: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "vllm_edge_time_to_first_byte_seconds",
        "Time from request start to the first byte of the backend's answer body, by stream \
         mode (for streams: about the time to first token, queueing included).",
        &["stream"],
        LATENCY_BUCKETS.to_vec()
    )
    .expect("metric registers once")
});

pub static SELECTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "vllm_edge_selections_total",
        "Backends picked for an attempt, by policy and reason (only_candidate, rotation, \
         fewest_in_flight, two_choices, lowest_score, local_estimate, open_circuit_fallback, \
         affinity_home, affinity_spill).",
        &["policy", "reason"]
    )
    .expect("metric registers once")
});

pub static SCRAPE_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "vllm_edge_scrape_duration_seconds",
        "Time to fetch and parse a backend's /metrics, failed scrapes included.",
        &["backend"],
        vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]
    )
    .expect("metric registers once")
});

pub static SCRAPE_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "vllm_edge_scrape_errors_total",
        "Scrapes of a backend's /metrics that failed (unreachable, timeout, bad status, \
         unparseable or oversized payload, frozen).",
        &["backend"]
    )
    .expect("metric registers once")
});

pub static TOKENS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "vllm_edge_tokens_total",
        "Tokens reported in responses' usage (every non-streaming answer but the audio \
         endpoints', and streams that asked for stream_options.include_usage or, in an audio \
         form, stream_include_usage), by model and kind (prompt, completion).",
        &["model", "kind"]
    )
    .expect("metric registers once")
});

pub static UPSTREAM_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "vllm_edge_upstream_errors_total",
        "Failed attempts at a backend, by backend and kind (connect, timeout, reset, 5xx before \
         the answer; mid_stream once part of it reached the client).",
        &["backend", "kind"]
    )
    .expect("metric registers once")
});

pub static CONNECTIONS_OPEN: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "vllm_edge_client_connections",
        "Client connections open on the data-plane listeners (limits.max_connections)."
    )
    .expect("metric registers once")
});

pub static AFFINITY_KEYS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "vllm_edge_affinity_keys",
        "Affinity keys in this gateway's last placement plan: long_lived (in use for \
         routing.affinity.long_lived_after), moved (homed off their rendezvous home because \
         it had no room left in its routing.affinity.kv_share of KV cache).",
        &["state"]
    )
    .expect("metric registers once")
});

pub static LIMIT_REFUSALS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "vllm_edge_limit_refusals_total",
        "Connections and requests refused by a client limit (max_connections, \
         header_read_timeout, max_header_size, max_header_count, max_body_size, \
         body_read_timeout, max_json_depth).",
        &["limit"]
    )
    .expect("metric registers once")
});

pub static RETRIES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "vllm_edge_retries_total",
        "Attempts made after a failed one, on another backend."
    )
    .expect("metric registers once")
});

pub static RETRY_BUDGET_EXHAUSTED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "vllm_edge_retry_budget_exhausted_total",
        "Retries refused because retries already reached the budget's share of requests."
    )
    .expect("metric registers once")
});

pub static CONFIG_RELOADS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "vllm_edge_config_reloads_total",
        "Configuration reloads (SIGHUP), by result (ok, error).",
        &["result"]
    )
    .expect("metric registers once")
});

pub static AUTH_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "vllm_edge_auth_refused_total",
        "Requests refused for their API key, by reason (missing, invalid).",
        &["reason"]
    )
    .expect("metric registers once")
});

pub static KEY_TOKENS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "vllm_edge_key_tokens_total",
        "Tokens reported in responses' usage (as vllm_edge_tokens_total counts them), by key \
         name and kind (prompt, completion).",
        &["key", "kind"]
    )
    .expect("metric registers once")
});

pub static KEY_LIMITED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "vllm_edge_key_limited_total",
        "Requests refused (429) by a key's own limits, by key name.",
        &["key"]
    )
    .expect("metric registers once")
});

/// `2xx`, `4xx`, ...; `0xx` for requests that ended without a status (client gone).
pub fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "none",
    }
}

/// A counter's values summed by one of its labels (for `/load-stats` and the
/// dashboard's rates).
pub fn sums_by(counter: &IntCounterVec, label: &str) -> std::collections::HashMap<String, u64> {
    use prometheus::core::Collector;
    let mut out = std::collections::HashMap::new();
    for family in counter.collect() {
        for m in family.get_metric() {
            let key = m
                .get_label()
                .iter()
                .find(|l| l.name() == label)
                .map_or("", |l| l.value());
            *out.entry(key.to_string()).or_insert(0) += m.get_counter().value() as u64;
        }
    }
    out
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
pub fn render(snap: &FleetSnapshot, stale_after: std::time::Duration) -> Vec<u8> {
    use prometheus::Encoder;
    let now = Instant::now();
    let mut families = prometheus::gather();
    families.extend(fleet_registry(snap, fresh_since(now, stale_after), now).gather());
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode(&families, &mut out) {
        tracing::error!(error = %e, "encoding metrics");
    }
    out
}
