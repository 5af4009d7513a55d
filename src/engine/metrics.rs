//! Reading an engine's `/metrics`: a strict parser of the Prometheus text exposition,
//! reduced to the load signals routing needs ([`EngineLoad`]).
//!
//! vLLM's names (current and legacy) are the only place engine metric names appear in the
//! gateway. A server with data parallelism reports several `engine` label values: counts
//! are summed, KV usage averaged, capacities summed. A metric that is absent is unknown
//! (`None`), never zero (`--disable-log-stats` removes them all). A payload that is not a
//! valid exposition (HTML, binary, truncated lines) is an error for that backend, and so
//! is one with a value no engine can report (NaN, an infinity, a negative count, KV usage
//! above 1, a count past [`MAX_REQUESTS`] or [`MAX_COUNTER`]): an exporter that says that
//! cannot be trusted for its other values either, so the backend is scored as unknown
//! (from this gateway's own accounting), never as idle.

use std::collections::BTreeMap;

/// The load signals of one backend, as last scraped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineLoad {
    pub running: Option<f64>,
    pub waiting: Option<f64>,
    /// Of `waiting`, the requests deferred by a transient constraint rather than waiting
    /// for a slot (`vllm:num_requests_waiting_by_reason{reason="deferred"}`, newer vLLM):
    /// a LoRA adapter waiting for an adapter slot, a KV transfer.
    pub waiting_deferred: Option<f64>,
    /// 0–1, averaged over engines.
    pub kv_usage: Option<f64>,
    /// KV capacity in tokens, summed over engines.
    pub kv_capacity_tokens: Option<u64>,
    pub block_size: Option<u64>,
    /// Cumulative prefix-cache queries and hits, in tokens.
    pub prefix_queries: Option<f64>,
    pub prefix_hits: Option<f64>,
    pub preemptions: Option<f64>,
    /// Cumulative prompt plus generated tokens. vLLM counts a prompt's tokens when its
    /// prefill is done, and output tokens as they are made: with requests running, it
    /// moves within a few steps (a frozen exporter is caught by it staying put).
    pub tokens: Option<f64>,
    /// Cumulative sums and counts of the latency histograms (seconds): the scraper turns
    /// their deltas between two scrapes into recent means.
    pub itl: Option<SumCount>,
    pub ttft: Option<SumCount>,
    pub e2e: Option<SumCount>,
    /// LoRA adapter slots, from `vllm:lora_requests_info` (served with LoRA enabled).
    pub lora: Option<LoraSlots>,
    /// Distinct `engine` label values seen (1 when there is no such label).
    pub engines: usize,
    /// When the server process started (`process_start_time_seconds`, Unix seconds): a
    /// new value is a restarted server.
    pub started_at: Option<f64>,
    /// Series that could not be read and were left out (a LoRA series without
    /// `max_lora`), for the logs.
    pub anomalies: Vec<String>,
}

/// The LoRA adapters an engine holds: vLLM exports them as the labels of
/// `vllm:lora_requests_info`, whose value is the wall-clock time they were true. Older
/// label sets stay in the exposition (a gauge never forgets a label set), so the series
/// with the latest time is the current one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraSlots {
    /// Most adapters in one batch (`max_lora`, vLLM's `--max-loras`).
    pub max: usize,
    /// Adapters of running requests: they hold a slot.
    pub running: Vec<String>,
    /// Adapters of waiting requests.
    pub waiting: Vec<String>,
}

/// Where a request for a LoRA adapter stands on one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFit {
    /// The engine reports no adapter slots.
    Unknown,
    /// The adapter holds a slot: its requests run with the batch's.
    Active,
    /// The adapter would take a free slot.
    Free,
    /// Every slot is held by another adapter: the request would wait for one.
    Full,
}

impl LoraSlots {
    /// Where a request for `adapter` stands here.
    pub fn fit(&self, adapter: &str) -> LoraFit {
        if self.running.iter().any(|a| a == adapter) {
            LoraFit::Active
        } else if self.running.len() < self.max {
            LoraFit::Free
        } else {
            LoraFit::Full
        }
    }

    fn of(sample: &Sample) -> Option<LoraSlots> {
        let list = |k: &str| -> Vec<String> {
            sample
                .label(k)
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(str::to_string)
                .collect()
        };
        Some(LoraSlots {
            max: sample.label("max_lora")?.trim().parse().ok()?,
            running: list("running_lora_adapters"),
            waiting: list("waiting_lora_adapters"),
        })
    }
}

/// A histogram's cumulative `_sum` and `_count`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SumCount {
    pub sum: f64,
    pub count: f64,
}

impl SumCount {
    /// The mean of the observations made between `earlier` and `self`; `None` without
    /// new observations or after a counter reset (a restarted engine).
    pub fn mean_since(&self, earlier: &SumCount) -> Option<f64> {
        let n = self.count - earlier.count;
        let s = self.sum - earlier.sum;
        (n > 0.0 && s >= 0.0).then(|| s / n)
    }
}

/// Most requests an engine can hold running or waiting: far past any real batch and
/// queue (vLLM's `--max-num-seqs` is hundreds), so a larger value is a broken exporter.
pub const MAX_REQUESTS: f64 = 1e6;
/// Most a cumulative counter can read: 2^53, past which an `f64` cannot count by ones.
pub const MAX_COUNTER: f64 = 9_007_199_254_740_992.0;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics payload larger than {0} bytes")]
    TooLarge(usize),
    #[error("metrics payload is not UTF-8 text")]
    NotText,
    #[error("line {line}: {reason}")]
    Malformed { line: usize, reason: &'static str },
    #[error("line {line}: {metric} = {value:?} cannot be true (expected {expected})")]
    Impossible {
        line: usize,
        metric: String,
        value: f64,
        expected: &'static str,
    },
}

/// Which values a family can take.
#[derive(Clone, Copy)]
enum Range {
    /// Requests now: 0 to [`MAX_REQUESTS`].
    Requests,
    /// A fraction: 0 to 1.
    Fraction,
    /// A cumulative count or sum: 0 to [`MAX_COUNTER`].
    Counter,
}

impl Range {
    fn holds(self, v: f64) -> bool {
        let max = match self {
            Range::Requests => MAX_REQUESTS,
            Range::Fraction => 1.0,
            Range::Counter => MAX_COUNTER,
        };
        (0.0..=max).contains(&v)
    }

    fn expected(self) -> &'static str {
        match self {
            Range::Requests => "a request count from 0 to 1e6",
            Range::Fraction => "a fraction from 0 to 1",
            Range::Counter => "a count from 0 to 2^53",
        }
    }
}

/// One sample line: metric name, labels, value.
#[derive(Debug, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    pub labels: Vec<(&'a str, String)>,
    pub value: f64,
}

impl Sample<'_> {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn is_name_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}
fn is_name_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}

/// Parses one sample line of the text format.
pub fn parse_sample(line: &str) -> Result<Sample<'_>, &'static str> {
    let b = line.as_bytes();
    if b.is_empty() || !is_name_start(b[0]) {
        return Err("not a metric name");
    }
    let mut i = 1;
    while i < b.len() && is_name_char(b[i]) {
        i += 1;
    }
    let name = &line[..i];
    let mut labels = Vec::new();
    if i < b.len() && b[i] == b'{' {
        i += 1;
        loop {
            while i < b.len() && (b[i] == b' ' || b[i] == b',') {
                i += 1;
            }
            if i >= b.len() {
                return Err("unterminated labels");
            }
            if b[i] == b'}' {
                i += 1;
                break;
            }
            let start = i;
            if !is_name_start(b[i]) {
                return Err("bad label name");
            }
            while i < b.len() && is_name_char(b[i]) {
                i += 1;
            }
            let key = &line[start..i];
            if i + 1 >= b.len() || b[i] != b'=' || b[i + 1] != b'"' {
                return Err("expected =\" after a label name");
            }
            i += 2;
            let mut value = String::new();
            loop {
                match b.get(i) {
                    None => return Err("unterminated label value"),
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') => {
                        match b.get(i + 1) {
                            Some(b'n') => value.push('\n'),
                            Some(b'\\') => value.push('\\'),
                            Some(b'"') => value.push('"'),
                            _ => return Err("bad escape in a label value"),
                        }
                        i += 2;
                    }
                    Some(_) => {
                        // Copy a run of plain characters (keeps multi-byte UTF-8 intact).
                        let start = i;
                        while i < b.len() && b[i] != b'"' && b[i] != b'\\' {
                            i += 1;
                        }
                        value.push_str(&line[start..i]);
                    }
                }
            }
            labels.push((key, value));
        }
    }
    let rest = line[i..].trim_start();
    if rest.len() == line[i..].len() {
        return Err("expected a space before the value");
    }
    let mut parts = rest.split_ascii_whitespace();
    let value = parts.next().ok_or("missing value")?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse::<f64>().map_err(|_| "value is not a number")?,
    };
    if let Some(ts) = parts.next() {
        ts.parse::<i64>().map_err(|_| "bad timestamp")?;
    }
    if parts.next().is_some() {
        return Err("trailing text after the sample");
    }
    Ok(Sample {
        name,
        labels,
        value,
    })
}

#[derive(Default)]
struct PerEngine {
    running: Option<f64>,
    waiting: Option<f64>,
    waiting_deferred: Option<f64>,
    kv_usage: Option<f64>,
    kv_capacity_tokens: Option<u64>,
    block_size: Option<u64>,
    prefix_queries: Option<f64>,
    prefix_hits: Option<f64>,
    preemptions: Option<f64>,
    tokens: Option<f64>,
    itl: Option<SumCount>,
    ttft: Option<SumCount>,
    e2e: Option<SumCount>,
}

fn add(slot: &mut Option<f64>, v: f64) {
    *slot = Some(slot.unwrap_or(0.0) + v);
}

/// Parses a `/metrics` payload of at most `max_bytes`.
pub fn parse(payload: &[u8], max_bytes: usize) -> Result<EngineLoad, MetricsError> {
    if payload.len() > max_bytes {
        return Err(MetricsError::TooLarge(max_bytes));
    }
    let text = std::str::from_utf8(payload).map_err(|_| MetricsError::NotText)?;
    let mut read = Read::default();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim_end_matches('\r');
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let sample = parse_sample(line).map_err(|reason| MetricsError::Malformed {
            line: n + 1,
            reason,
        })?;
        if let Some(range) = range_of(sample.name).filter(|r| !r.holds(sample.value)) {
            return Err(MetricsError::Impossible {
                line: n + 1,
                metric: sample.name.to_string(),
                value: sample.value,
                expected: range.expected(),
            });
        }
        read.take(&sample, n + 1);
    }
    Ok(read.load())
}

/// The values a family the gateway reads can take; `None` for one it does not read.
fn range_of(name: &str) -> Option<Range> {
    match name {
        "vllm:num_requests_running"
        | "vllm:num_requests_waiting"
        | "vllm:num_requests_waiting_by_reason" => Some(Range::Requests),
        "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => Some(Range::Fraction),
        "vllm:prefix_cache_queries_total"
        | "vllm:prefix_cache_hits_total"
        | "vllm:num_preemptions_total"
        | "vllm:prompt_tokens_total"
        | "vllm:generation_tokens_total"
        | "vllm:inter_token_latency_seconds_sum"
        | "vllm:inter_token_latency_seconds_count"
        | "vllm:time_to_first_token_seconds_sum"
        | "vllm:time_to_first_token_seconds_count"
        | "vllm:e2e_request_latency_seconds_sum"
        | "vllm:e2e_request_latency_seconds_count" => Some(Range::Counter),
        _ => None,
    }
}

/// What a payload's samples said so far, per engine.
#[derive(Default)]
struct Read {
    engines: BTreeMap<String, PerEngine>,
    anomalies: Vec<String>,
    /// The latest `vllm:lora_requests_info` series: (its time, its slots).
    lora: Option<(f64, LoraSlots)>,
    started_at: Option<f64>,
}

impl Read {
    /// Takes one sample (on line `line`) of a family the gateway reads.
    fn take(&mut self, sample: &Sample, line: usize) {
        let (engines, v, n) = (&mut self.engines, sample.value, line - 1);
        let (lora, anomalies) = (&mut self.lora, &mut self.anomalies);
        if sample.name == "process_start_time_seconds" && v.is_finite() {
            self.started_at = Some(v);
            return;
        }
        let engine = sample.label("engine").unwrap_or("").to_string();
        match sample.name {
            "vllm:num_requests_running" | "vllm:num_requests_waiting" => {
                let e = engines.entry(engine).or_default();
                if sample.name.ends_with("running") {
                    add(&mut e.running, v);
                } else {
                    add(&mut e.waiting, v);
                }
            }
            "vllm:num_requests_waiting_by_reason" if sample.label("reason") == Some("deferred") => {
                add(&mut engines.entry(engine).or_default().waiting_deferred, v);
            }
            "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => {
                // Current and legacy names may both be present (0.10): same value.
                engines.entry(engine).or_default().kv_usage = Some(v);
            }
            "vllm:prefix_cache_queries_total" | "vllm:prefix_cache_hits_total" => {
                let e = engines.entry(engine).or_default();
                if sample.name.contains("queries") {
                    add(&mut e.prefix_queries, v);
                } else {
                    add(&mut e.prefix_hits, v);
                }
            }
            "vllm:num_preemptions_total" => {
                add(&mut engines.entry(engine).or_default().preemptions, v);
            }
            "vllm:prompt_tokens_total" | "vllm:generation_tokens_total" => {
                add(&mut engines.entry(engine).or_default().tokens, v);
            }
            "vllm:inter_token_latency_seconds_sum"
            | "vllm:inter_token_latency_seconds_count"
            | "vllm:time_to_first_token_seconds_sum"
            | "vllm:time_to_first_token_seconds_count"
            | "vllm:e2e_request_latency_seconds_sum"
            | "vllm:e2e_request_latency_seconds_count" => {
                let e = engines.entry(engine).or_default();
                let slot = if sample.name.starts_with("vllm:inter") {
                    &mut e.itl
                } else if sample.name.starts_with("vllm:time_to") {
                    &mut e.ttft
                } else {
                    &mut e.e2e
                };
                let sc = slot.get_or_insert_with(SumCount::default);
                if sample.name.ends_with("_sum") {
                    sc.sum += v;
                } else {
                    sc.count += v;
                }
            }
            "vllm:lora_requests_info" => match LoraSlots::of(sample) {
                Some(slots) if v.is_finite() => {
                    if lora.as_ref().is_none_or(|(at, _)| v >= *at) {
                        *lora = Some((v, slots));
                    }
                }
                _ => anomalies.push(format!("{}={v} (line {})", sample.name, n + 1)),
            },
            "vllm:cache_config_info" => {
                let num = |k: &str| sample.label(k).and_then(|s| s.parse::<u64>().ok());
                let block = num("block_size");
                let tokens =
                    num("kv_cache_size_tokens").or_else(|| Some(num("num_gpu_blocks")? * block?));
                let e = engines.entry(engine).or_default();
                e.block_size = block.or(e.block_size);
                e.kv_capacity_tokens = tokens.or(e.kv_capacity_tokens);
            }
            _ => {}
        }
    }

    /// The load of all engines: counts summed, KV usage averaged, capacities summed.
    fn load(self) -> EngineLoad {
        let Read {
            engines,
            anomalies,
            lora,
            started_at,
        } = self;
        let mut load = EngineLoad {
            engines: engines.len().max(1),
            lora: lora.map(|(_, slots)| slots),
            started_at,
            anomalies,
            ..EngineLoad::default()
        };
        let mut kv_sum = 0.0;
        let mut kv_n = 0usize;
        for e in engines.values() {
            if let Some(v) = e.running {
                add(&mut load.running, v);
            }
            if let Some(v) = e.waiting {
                add(&mut load.waiting, v);
            }
            if let Some(v) = e.waiting_deferred {
                add(&mut load.waiting_deferred, v);
            }
            if let Some(v) = e.kv_usage {
                kv_sum += v;
                kv_n += 1;
            }
            if let Some(v) = e.prefix_queries {
                add(&mut load.prefix_queries, v);
            }
            if let Some(v) = e.prefix_hits {
                add(&mut load.prefix_hits, v);
            }
            if let Some(v) = e.preemptions {
                add(&mut load.preemptions, v);
            }
            if let Some(v) = e.tokens {
                add(&mut load.tokens, v);
            }
            if let Some(t) = e.kv_capacity_tokens {
                load.kv_capacity_tokens = Some(load.kv_capacity_tokens.unwrap_or(0) + t);
            }
            load.block_size = load.block_size.or(e.block_size);
            for (slot, v) in [
                (&mut load.itl, e.itl),
                (&mut load.ttft, e.ttft),
                (&mut load.e2e, e.e2e),
            ] {
                if let Some(v) = v {
                    let acc = slot.get_or_insert_with(SumCount::default);
                    acc.sum += v.sum;
                    acc.count += v.count;
                }
            }
        }
        if kv_n > 0 {
            load.kv_usage = Some(kv_sum / kv_n as f64);
        }
        load
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_process_start_time_is_read() {
        let payload = include_bytes!("../../tests/fixtures/vllm-0.32/metrics-idle.txt");
        assert_eq!(
            parse(payload, 8 << 20).unwrap().started_at,
            Some(1.79532323827e9)
        );
    }

    use super::*;

    const MAX: usize = 8 << 20;

    fn fixture(name: &str) -> Vec<u8> {
        let p = format!(
            "{}/tests/fixtures/vllm-0.32/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
    }

    #[test]
    fn reads_every_real_vllm_fixture() {
        let dir = format!("{}/tests/fixtures/vllm-0.32", env!("CARGO_MANIFEST_DIR"));
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if !(name.starts_with("metrics-") && name.ends_with(".txt")) {
                continue;
            }
            let load = parse(&fixture(&name), MAX).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(load.running.is_some() && load.waiting.is_some(), "{name}");
            assert!(
                load.kv_usage.is_some_and(|k| (0.0..=1.0).contains(&k)),
                "{name}"
            );
            assert!(
                load.kv_capacity_tokens.is_some() && load.block_size == Some(128),
                "{name}"
            );
            assert!(load.anomalies.is_empty(), "{name}: {:?}", load.anomalies);
            assert_eq!(load.engines, 1);
            seen += 1;
        }
        assert!(seen >= 10, "found {seen} metrics fixtures");
    }

    #[test]
    fn busy_and_queued_values_are_read_exactly() {
        let load = parse(&fixture("metrics-busy-48x512-queued.txt"), MAX).unwrap();
        assert_eq!(load.running, Some(32.0));
        assert_eq!(load.waiting, Some(16.0));
        assert_eq!(load.kv_usage, Some(0.12524461839530332));
        assert_eq!(load.kv_capacity_tokens, Some(65536));
        assert_eq!(load.prefix_queries, Some(838.0));
        assert_eq!(load.tokens, Some(838.0 + 18085.0), "prompt plus generated");
        let idle = parse(&fixture("metrics-idle.txt"), MAX).unwrap();
        assert_eq!(idle.running, Some(0.0));
        let preempt = parse(&fixture("metrics-idle-after-16x512-kv4M-preempt.txt"), MAX).unwrap();
        assert!(preempt.preemptions.unwrap() > 0.0, "{preempt:?}");
        // Histogram sums and counts, and their mean between two scrapes.
        let fresh = parse(&fixture("metrics-fresh-before-any-request.txt"), MAX).unwrap();
        let after = parse(&fixture("metrics-idle-after-load.txt"), MAX).unwrap();
        assert_eq!(fresh.itl.unwrap().count, 0.0);
        let itl = after.itl.unwrap().mean_since(&fresh.itl.unwrap()).unwrap();
        assert!(itl > 0.0 && itl < 10.0, "{itl}");
        assert_eq!(after.itl.unwrap().mean_since(&after.itl.unwrap()), None);
        assert_eq!(
            fresh.itl.unwrap().mean_since(&after.itl.unwrap()),
            None,
            "a reset"
        );
    }

    #[test]
    fn several_engines_sum_counts_and_average_kv() {
        let text = r#"vllm:num_requests_running{engine="0",model_name="m"} 3
vllm:num_requests_running{engine="1",model_name="m"} 5
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.6
"#;
        let load = parse(text.as_bytes(), MAX).unwrap();
        assert_eq!(load.running, Some(8.0));
        assert!((load.kv_usage.unwrap() - 0.4).abs() < 1e-12);
        assert_eq!(load.engines, 2);
        assert_eq!(load.waiting, None, "missing is unknown, not zero");
    }

    #[test]
    fn lora_slots_are_the_latest_series() {
        // vLLM leaves earlier label sets in place; the value is when each was set.
        let text = r#"# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",waiting_lora_adapters="c"} 1.7e9
vllm:lora_requests_info{max_lora="2",running_lora_adapters="b",waiting_lora_adapters=""} 1.70000001e9
vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 1.6e9
"#;
        let slots = parse(text.as_bytes(), MAX).unwrap().lora.unwrap();
        assert_eq!(
            slots,
            LoraSlots {
                max: 2,
                running: vec!["b".into()],
                waiting: vec![],
            }
        );
        assert_eq!(slots.fit("b"), LoraFit::Active);
        assert_eq!(slots.fit("a"), LoraFit::Free);
        let full = LoraSlots {
            max: 1,
            running: vec!["a".into()],
            waiting: vec!["b".into()],
        };
        assert_eq!(
            (full.fit("a"), full.fit("b")),
            (LoraFit::Active, LoraFit::Full)
        );
        // Without the family LoRA is unknown; without max_lora the series is dropped.
        assert_eq!(parse(&fixture("metrics-idle.txt"), MAX).unwrap().lora, None);
        let bad = parse(
            br#"vllm:lora_requests_info{running_lora_adapters="a"} 1.7e9"#,
            MAX,
        )
        .unwrap();
        assert_eq!(bad.lora, None);
        assert_eq!(bad.anomalies.len(), 1);
    }

    #[test]
    fn legacy_dialect_and_missing_metrics() {
        let load = parse(br#"vllm:gpu_cache_usage_perc{model_name="m"} 0.5"#, MAX).unwrap();
        assert_eq!(load.kv_usage, Some(0.5));
        assert_eq!(load.running, None);
        let none = parse(b"# only comments\nprocess_open_fds 12\n", MAX).unwrap();
        assert_eq!(
            none,
            EngineLoad {
                engines: 1,
                ..EngineLoad::default()
            }
        );
    }

    #[test]
    fn garbage_and_values_no_engine_can_report_are_errors() {
        for bad in [
            &b"<html><body>502 Bad Gateway</body></html>"[..],
            br#"vllm:num_requests_running{engine="0" 3"#,
            b"vllm:num_requests_running 3 4 5\n",
            br#"vllm:num_requests_running{engine="0"} three"#,
            b"\xff\xfe\x00garbage",
        ] {
            assert!(
                parse(bad, MAX).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(parse(&[b'#'; 100], 10), Err(MetricsError::TooLarge(10)));
        // The attack run's values: a replica reporting NaN running took every request.
        for (line, metric) in [
            ("vllm:num_requests_running NaN", "vllm:num_requests_running"),
            (
                "vllm:num_requests_waiting +Inf",
                "vllm:num_requests_waiting",
            ),
            ("vllm:num_requests_running -2", "vllm:num_requests_running"),
            (
                "vllm:num_requests_running 1e308",
                "vllm:num_requests_running",
            ),
            ("vllm:num_requests_running 2e6", "vllm:num_requests_running"),
            (
                r#"vllm:num_requests_waiting_by_reason{reason="capacity"} -1"#,
                "vllm:num_requests_waiting_by_reason",
            ),
            ("vllm:kv_cache_usage_perc -0.1", "vllm:kv_cache_usage_perc"),
            ("vllm:kv_cache_usage_perc 1.7", "vllm:kv_cache_usage_perc"),
            ("vllm:gpu_cache_usage_perc NaN", "vllm:gpu_cache_usage_perc"),
            (
                "vllm:generation_tokens_total 1e308",
                "vllm:generation_tokens_total",
            ),
            (
                "vllm:prefix_cache_hits_total -Inf",
                "vllm:prefix_cache_hits_total",
            ),
            (
                "vllm:e2e_request_latency_seconds_sum -3",
                "vllm:e2e_request_latency_seconds_sum",
            ),
        ] {
            let text = format!("vllm:num_requests_running 1\n{line}\n");
            match parse(text.as_bytes(), MAX) {
                Err(MetricsError::Impossible {
                    line: 2, metric: m, ..
                }) => assert_eq!(m, metric),
                other => panic!("{line}: {other:?}"),
            }
        }
        // The edges are values an engine can report.
        let load = parse(
            b"vllm:kv_cache_usage_perc 1\nvllm:num_requests_running 0\nvllm:num_requests_waiting 1e6\n",
            MAX,
        )
        .unwrap();
        assert_eq!(
            (load.kv_usage, load.running, load.waiting),
            (Some(1.0), Some(0.0), Some(1e6))
        );
        // Families routing does not read are not judged.
        assert!(parse(b"process_open_fds NaN\nvllm:foo -1\n", MAX).is_ok());
    }

    #[test]
    fn label_values_with_escapes_and_utf8() {
        let s = parse_sample(r#"x{a="q\"uo\\te",b="héllo\n"} 1.5e3 1700000000000"#).unwrap();
        assert_eq!(s.label("a"), Some("q\"uo\\te"));
        assert_eq!(s.label("b"), Some("héllo\n"));
        assert_eq!(s.value, 1500.0);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Any bytes: a reading or an error, never a panic.
            #[test]
            fn any_payload_is_read_or_refused(payload in prop::collection::vec(any::<u8>(), 0..1024)) {
                let _ = parse(&payload, MAX);
            }

            /// Lines made of the exposition's own characters, in any order.
            #[test]
            fn exposition_like_lines_never_panic(
                lines in prop::collection::vec("[a-z_:{}=\",. 0-9e+#\\\\-]{0,60}", 0..20),
            ) {
                let _ = parse(lines.join("\n").as_bytes(), MAX);
            }

            /// Several engines' queues add up, and the engines are counted.
            #[test]
            fn engines_are_summed(values in prop::collection::vec((0u32..1000, 0u32..1000), 1..6)) {
                let mut text = String::new();
                for (i, (r, w)) in values.iter().enumerate() {
                    text.push_str(&format!(
                        "vllm:num_requests_running{{engine=\"{i}\",model_name=\"m\"}} {r}.0\n\
                         vllm:num_requests_waiting{{engine=\"{i}\",model_name=\"m\"}} {w}.0\n"
                    ));
                }
                let load = parse(text.as_bytes(), MAX).unwrap();
                let running: u32 = values.iter().map(|v| v.0).sum();
                let waiting: u32 = values.iter().map(|v| v.1).sum();
                prop_assert_eq!(load.running, Some(f64::from(running)));
                prop_assert_eq!(load.waiting, Some(f64::from(waiting)));
                prop_assert_eq!(load.engines, values.len());
            }

            /// A payload over the limit is refused before it is read.
            #[test]
            fn oversized_payloads_are_refused(limit in 0usize..256, extra in 1usize..64) {
                let payload = vec![b'#'; limit + extra];
                prop_assert!(matches!(parse(&payload, limit), Err(MetricsError::TooLarge(_))));
            }
        }
    }
}
