//! The simulator's `/metrics` text, with the names, HELP strings, types and labels of a
//! real vLLM 0.32 server (`{engine="0",model_name=...}`), or the legacy dialect
//! (`vllm:gpu_cache_usage_perc`). Families can be left out (the `metrics_drop` fault), as
//! `--disable-log-stats` or an older vLLM would.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use super::engine::{EngineStats, Histogram};
use super::scheduler::SchedulerConfig;
use super::{Faults, Sim};

struct Out<'a> {
    text: String,
    drop: &'a [String],
    labels: String,
}

impl Out<'_> {
    fn keep(&self, name: &str) -> bool {
        !self
            .drop
            .iter()
            .any(|d| !d.is_empty() && name.starts_with(d.as_str()))
    }

    fn family(&mut self, name: &str, kind: &str, help: &str) -> bool {
        if !self.keep(name) {
            return false;
        }
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
        true
    }

    /// A gauge or counter with the standard labels.
    fn value(&mut self, name: &str, kind: &str, help: &str, v: f64) {
        if self.family(name, kind, help) {
            let _ = writeln!(self.text, "{name}{{{}}} {v:?}", self.labels);
        }
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        if !self.family(name, "histogram", help) {
            return;
        }
        let l = &self.labels;
        for (b, c) in h.bounds.iter().zip(&h.counts) {
            let _ = writeln!(
                self.text,
                "{name}_bucket{{{l},le=\"{b:?}\"}} {:?}",
                *c as f64
            );
        }
        let _ = writeln!(
            self.text,
            "{name}_bucket{{{l},le=\"+Inf\"}} {:?}",
            h.count as f64
        );
        let _ = writeln!(self.text, "{name}_count{{{l}}} {:?}", h.count as f64);
        let _ = writeln!(self.text, "{name}_sum{{{l}}} {:?}", h.sum);
    }
}

pub fn render(sim: &Sim, faults: &Faults) -> String {
    let engine = sim.engine();
    let cfg = &engine.cfg.scheduler;
    let st = engine.stats();
    let model = sim.model_name();
    let mut o = Out {
        text: String::with_capacity(12 * 1024),
        drop: &faults.metrics_drop,
        labels: format!("engine=\"0\",model_name=\"{model}\""),
    };
    if o.family(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
    ) {
        let _ = writeln!(
            o.text,
            "process_start_time_seconds {:?}",
            sim.started_unix_f64()
        );
    }
    o.value(
        "vllm:num_requests_running",
        "gauge",
        "Number of requests in model execution batches.",
        st.running as f64,
    );
    o.value(
        "vllm:num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed.",
        st.waiting as f64,
    );
    if o.family(
        "vllm:num_requests_waiting_by_reason",
        "gauge",
        "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",
    ) {
        let l = &o.labels;
        let capacity = st.waiting.saturating_sub(st.deferred) as f64;
        let _ = writeln!(o.text, "vllm:num_requests_waiting_by_reason{{{l},reason=\"capacity\"}} {capacity:?}");
        let _ = writeln!(o.text, "vllm:num_requests_waiting_by_reason{{{l},reason=\"deferred\"}} {:?}", st.deferred as f64);
    }
    // With LoRA on, as vLLM: the adapters of the running and waiting requests in labels,
    // the wall-clock time of the update as the value.
    if cfg.max_loras > 0
        && o.family(
            "vllm:lora_requests_info",
            "gauge",
            "Running stats on lora requests.",
        )
    {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let _ = writeln!(
            o.text,
            "vllm:lora_requests_info{{max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {now:?}",
            cfg.max_loras,
            sim.lora_names(&st.running_loras),
            sim.lora_names(&st.waiting_loras),
        );
    }
    if faults.metrics_legacy {
        o.value(
            "vllm:gpu_cache_usage_perc",
            "gauge",
            "GPU KV-cache usage. 1 means 100 percent usage.",
            st.kv_usage,
        );
    } else {
        o.value(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            st.kv_usage,
        );
    }
    counters(&mut o, &st, model);
    latencies(&mut o, &st);
    cache_config(&mut o, cfg);
    o.text
}

/// The engine's counters: prefix cache, preemptions, tokens, finished requests.
fn counters(o: &mut Out, st: &EngineStats, model: &str) {
    o.value(
        "vllm:prefix_cache_queries_total",
        "counter",
        "Prefix cache queries, in terms of number of queried tokens.",
        st.counters.prefix_queries as f64,
    );
    o.value(
        "vllm:prefix_cache_hits_total",
        "counter",
        "Prefix cache hits, in terms of number of cached tokens.",
        st.counters.prefix_hits as f64,
    );
    o.value(
        "vllm:num_preemptions_total",
        "counter",
        "Cumulative number of preemption from the engine.",
        st.counters.preemptions as f64,
    );
    o.value(
        "vllm:prompt_tokens_total",
        "counter",
        "Number of prefill tokens processed.",
        st.counters.prompt_tokens as f64,
    );
    o.value(
        "vllm:prompt_tokens_cached_total",
        "counter",
        "Number of cached prompt tokens (local + external).",
        st.counters.prompt_tokens_cached as f64,
    );
    o.value(
        "vllm:generation_tokens_total",
        "counter",
        "Number of generation tokens processed.",
        st.counters.generation_tokens as f64,
    );
    if o.family(
        "vllm:request_success_total",
        "counter",
        "Count of successfully processed requests.",
    ) {
        for (reason, n) in [
            ("stop", st.success_stop),
            ("length", st.success_length),
            ("abort", 0),
            ("error", 0),
            ("repetition", 0),
        ] {
            let _ = writeln!(o.text, "vllm:request_success_total{{engine=\"0\",finished_reason=\"{reason}\",model_name=\"{model}\"}} {:?}", n as f64);
        }
    }
}

/// The latency histograms.
fn latencies(o: &mut Out, st: &EngineStats) {
    o.histogram(
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &st.ttft,
    );
    o.histogram(
        "vllm:inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
        &st.itl,
    );
    o.histogram(
        "vllm:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        &st.e2e,
    );
    o.histogram(
        "vllm:request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        &st.queue,
    );
}

/// The cache configuration, in the labels of `vllm:cache_config_info`.
fn cache_config(o: &mut Out, cfg: &SchedulerConfig) {
    if o.family(
        "vllm:cache_config_info",
        "gauge",
        "Information of the LLMEngine CacheConfig",
    ) {
        let blocks = cfg.usable_blocks() + 1;
        let _ = writeln!(
            o.text,
            "vllm:cache_config_info{{block_size=\"{}\",enable_prefix_caching=\"{}\",engine=\"0\",gpu_memory_utilization=\"0.9\",kv_cache_size_tokens=\"{}\",num_gpu_blocks=\"{blocks}\"}} 1.0",
            cfg.block_size,
            if cfg.enable_prefix_caching { "True" } else { "False" },
            blocks * cfg.block_size,
        );
    }
}
