//! The gateway's own Prometheus metrics: every name defined here, one prefix
//! (`vllm_edge_`), base units, `_total` counters. Recorded in the proxy's `logging` phase and
//! served by the admin listener.

use prometheus::{
    register_histogram_vec, register_int_counter, register_int_counter_vec, HistogramVec,
    IntCounter, IntCounterVec,
};
use std::sync::LazyLock;

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
        vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0
        ]
    )
    .expect("metric registers once")
});

pub static UPSTREAM_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "vllm_edge_upstream_errors_total",
        "Failed attempts at a backend, by backend and kind (connect, reset, 5xx, timeout).",
        &["backend", "kind"]
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

/// The text exposition of every registered metric.
pub fn render() -> Vec<u8> {
    use prometheus::Encoder;
    let mut out = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode(&prometheus::gather(), &mut out) {
        tracing::error!(error = %e, "encoding metrics");
    }
    out
}
