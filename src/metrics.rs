//! The gateway's own Prometheus metrics, one prefix (`vllm_edge_`), base units, `_total`
//! counters: those recorded as things happen are defined here (a leaf module: anything
//! may count into them). Request metrics are recorded in the proxy's `logging` phase. The
//! per-backend gauges (health, circuit, in-flight, what the engine reported) are read
//! from the fleet snapshot when `/metrics` is rendered (`admin::gauges`), so a backend
//! removed by a reload disappears with it. Labels are bounded: models the fleet serves,
//! configured backend names, fixed sets of kinds and reasons; never request ids or keys
//! (the queue gauge, rendered by `admin::gauges`, names keys by their names from the keys
//! file, never the keys themselves).
//!
//! Uses nothing of the crate: every layer may count into it.

use prometheus::{
    register_histogram_vec, register_int_counter, register_int_counter_vec, register_int_gauge,
    register_int_gauge_vec, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
};
use std::sync::LazyLock;

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

pub static QUEUE_WAIT: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "vllm_edge_queue_wait_seconds",
        "Time requests let go from the gateway's queue had waited there for a free slot \
         (flow control), by model and priority class.",
        &["model", "priority"],
        LATENCY_BUCKETS.to_vec()
    )
    .expect("metric registers once")
});

pub static QUEUE_SHED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "vllm_edge_queue_shed_total",
        "Requests flow control answered without a replica, by model and reason (queue_full, \
         max_wait and displaced: 503; key_share: 429; shutdown: 503; client_gone: the client \
         left while queued).",
        &["model", "reason"]
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

pub static SHARED_LIMITS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "vllm_edge_shared_limits_admissions_total",
        "Admissions of requests whose key limits are shared through Redis (auth.shared), by \
         how they were decided: redis, or local/deny when Redis did not answer in time.",
        &["via"]
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

/// The cumulative buckets `(upper bound, count)` of the series of `histogram` whose
/// `label` is `value`, summed over its other labels, the last bound +∞.
pub fn histogram_buckets(histogram: &HistogramVec, label: &str, value: &str) -> Vec<(f64, u64)> {
    use prometheus::core::Collector;
    let mut out: Vec<(f64, u64)> = Vec::new();
    let mut total = 0u64;
    for family in histogram.collect() {
        for m in family.get_metric() {
            if !m
                .get_label()
                .iter()
                .any(|l| l.name() == label && l.value() == value)
            {
                continue;
            }
            let h = m.get_histogram();
            total += h.get_sample_count();
            for (i, b) in h.get_bucket().iter().enumerate() {
                match out.get_mut(i) {
                    Some(slot) => slot.1 += b.cumulative_count(),
                    None => out.push((b.upper_bound(), b.cumulative_count())),
                }
            }
        }
    }
    out.push((f64::INFINITY, total));
    out
}
