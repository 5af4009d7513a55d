//! The simulator's `/metrics` text, with the names, HELP strings, types and labels of a
//! real vLLM 0.32 server (`{engine="0",model_name=...}`), or the legacy dialect
//! (`vllm:gpu_cache_usage_perc`) with `--legacy-metrics`.

use std::fmt::Write;

use super::engine::Histogram;
use super::Sim;

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, help: &str, labels: &str, h: &Histogram) {
    family(out, name, "histogram", help);
    for (b, c) in h.bounds.iter().zip(&h.counts) {
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b:?}\"}} {c}.0");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}.0", h.count);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}.0", h.count);
    let _ = writeln!(out, "{name}_sum{{{labels}}} {:?}", h.sum);
}

pub fn render(sim: &Sim) -> String {
    let engine = sim.engine();
    let cfg = &engine.cfg;
    let c = engine.counters();
    let model = sim.model_name();
    let labels = format!("engine=\"0\",model_name=\"{model}\"");
    let mut out = String::with_capacity(8 * 1024);

    family(
        &mut out,
        "vllm:num_requests_running",
        "gauge",
        "Number of requests in model execution batches.",
    );
    let _ = writeln!(
        out,
        "vllm:num_requests_running{{{labels}}} {:?}",
        engine.running() as f64
    );
    family(
        &mut out,
        "vllm:num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed.",
    );
    let _ = writeln!(
        out,
        "vllm:num_requests_waiting{{{labels}}} {:?}",
        engine.waiting() as f64
    );
    family(&mut out, "vllm:num_requests_waiting_by_reason", "gauge", "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.");
    let _ = writeln!(
        out,
        "vllm:num_requests_waiting_by_reason{{{labels},reason=\"capacity\"}} {:?}",
        engine.waiting() as f64
    );
    let _ = writeln!(
        out,
        "vllm:num_requests_waiting_by_reason{{{labels},reason=\"deferred\"}} 0.0"
    );
    if sim.args.legacy_metrics {
        family(
            &mut out,
            "vllm:gpu_cache_usage_perc",
            "gauge",
            "GPU KV-cache usage. 1 means 100 percent usage.",
        );
        let _ = writeln!(
            out,
            "vllm:gpu_cache_usage_perc{{{labels}}} {:?}",
            engine.kv_usage()
        );
    } else {
        family(
            &mut out,
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
        );
        let _ = writeln!(
            out,
            "vllm:kv_cache_usage_perc{{{labels}}} {:?}",
            engine.kv_usage()
        );
    }
    family(
        &mut out,
        "vllm:prefix_cache_queries_total",
        "counter",
        "Prefix cache queries, in terms of number of queried tokens.",
    );
    let _ = writeln!(
        out,
        "vllm:prefix_cache_queries_total{{{labels}}} {:?}",
        c.prompt_tokens as f64
    );
    family(
        &mut out,
        "vllm:prefix_cache_hits_total",
        "counter",
        "Prefix cache hits, in terms of number of cached tokens.",
    );
    let _ = writeln!(out, "vllm:prefix_cache_hits_total{{{labels}}} 0.0");
    family(
        &mut out,
        "vllm:num_preemptions_total",
        "counter",
        "Cumulative number of preemption from the engine.",
    );
    let _ = writeln!(
        out,
        "vllm:num_preemptions_total{{{labels}}} {:?}",
        engine.preemptions() as f64
    );
    family(
        &mut out,
        "vllm:prompt_tokens_total",
        "counter",
        "Number of prefill tokens processed.",
    );
    let _ = writeln!(
        out,
        "vllm:prompt_tokens_total{{{labels}}} {:?}",
        c.prompt_tokens as f64
    );
    family(
        &mut out,
        "vllm:generation_tokens_total",
        "counter",
        "Number of generation tokens processed.",
    );
    let _ = writeln!(
        out,
        "vllm:generation_tokens_total{{{labels}}} {:?}",
        c.generation_tokens as f64
    );
    family(
        &mut out,
        "vllm:request_success_total",
        "counter",
        "Count of successfully processed requests.",
    );
    for (reason, n) in [
        ("stop", c.success_stop),
        ("length", c.success_length),
        ("abort", 0),
        ("error", 0),
        ("repetition", 0),
    ] {
        let _ = writeln!(out, "vllm:request_success_total{{engine=\"0\",finished_reason=\"{reason}\",model_name=\"{model}\"}} {:?}", n as f64);
    }
    histogram(
        &mut out,
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &labels,
        &c.ttft,
    );
    histogram(
        &mut out,
        "vllm:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        &labels,
        &c.e2e,
    );
    family(
        &mut out,
        "vllm:cache_config_info",
        "gauge",
        "Information of the LLMEngine CacheConfig",
    );
    let _ = writeln!(
        out,
        "vllm:cache_config_info{{block_size=\"{}\",enable_prefix_caching=\"True\",engine=\"0\",gpu_memory_utilization=\"0.9\",kv_cache_size_tokens=\"{}\",num_gpu_blocks=\"{}\"}} 1.0",
        cfg.block_size,
        cfg.kv_tokens,
        cfg.kv_tokens / cfg.block_size.max(1)
    );
    out
}
