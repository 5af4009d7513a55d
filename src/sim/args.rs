//! The simulator's flags (`vllm-edge sim`), its hardware presets, and the faults it can
//! inject.

use serde::{Deserialize, Serialize};

use super::engine::EngineConfig;
use super::scheduler::{PerfModel, SchedulerConfig};

/// Hardware profiles; flags override their values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// Llama-3-8B on one H100 (the calibration in docs/simulator.md).
    #[value(name = "llama3-8b-h100")]
    Llama3H100,
    /// Llama-3-8B on one A100-80GB: slower steps, same KV capacity.
    #[value(name = "llama3-8b-a100")]
    Llama3A100,
    /// A tiny engine that queues, preempts and evicts within seconds, 100× faster than
    /// real time.
    #[value(name = "tiny-test")]
    TinyTest,
}

/// Flags of `vllm-edge sim` (named after vLLM's where vLLM has one).
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Port to listen on (0 picks a free one; the chosen address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Served model name (repeat for aliases).
    #[arg(long = "model", default_value = "sim-llama")]
    pub models: Vec<String>,
    /// The vLLM version `/version` reports.
    #[arg(long, default_value = "0.32.0")]
    pub vllm_version: String,
    /// Serve `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`, as vLLM does
    /// with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` (404 without).
    #[arg(long)]
    pub runtime_lora: bool,
    /// LoRA adapters served from the start, as `NAME=PATH` (vLLM's --lora-modules; give
    /// the flag once per adapter). A request names one as its `model`.
    #[arg(long = "lora-modules", value_parser = parse_lora_module)]
    pub lora_modules: Vec<(String, String)>,
    /// Most distinct LoRA adapters in one batch (vLLM's --max-loras): a request whose
    /// adapter would exceed it waits, deferred, until one of the batch's adapters has no
    /// request running.
    #[arg(long, default_value_t = 1)]
    pub max_loras: usize,
    /// Hardware profile; the flags below override its values.
    #[arg(long, value_enum, default_value_t = Preset::Llama3H100)]
    pub preset: Preset,
    /// Most requests running at once (vLLM's --max-num-seqs).
    #[arg(long)]
    pub max_num_seqs: Option<usize>,
    /// Token budget of one step (vLLM's --max-num-batched-tokens).
    #[arg(long)]
    pub max_num_batched_tokens: Option<usize>,
    /// KV-cache capacity in tokens.
    #[arg(long)]
    pub kv_tokens: Option<usize>,
    /// KV block size in tokens (vLLM's --block-size).
    #[arg(long)]
    pub block_size: Option<usize>,
    /// Longest prompt + output in tokens (vLLM's --max-model-len); capped by the KV size.
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Disable prefix caching (vLLM's --no-enable-prefix-caching).
    #[arg(long)]
    pub no_enable_prefix_caching: bool,
    /// GPU speed relative to the preset (2.0 = twice as fast): for heterogeneous fleets.
    #[arg(long, default_value_t = 1.0)]
    pub speed_factor: f64,
    /// Multiplies every simulated duration: 0.01 runs 100× faster than real time.
    #[arg(long)]
    pub time_scale: Option<f64>,
    /// Relative spread of step times (0 for exact timing).
    #[arg(long)]
    pub jitter: Option<f64>,
    /// Seed of every random choice (output lengths, step jitter).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Median output length when a request does not force one (lognormal, p99 ≈ 6.7×
    /// median; `max_tokens` still caps it). `ignore_eos` or the `x-sim-output-tokens`
    /// header force an exact length.
    #[arg(long, default_value_t = 150)]
    pub output_len_median: usize,
    /// Serve the legacy metric dialect (`vllm:gpu_cache_usage_perc`).
    #[arg(long)]
    pub legacy_metrics: bool,
    /// Add `sim_emitted_us` (wall-clock microseconds) to every streamed event, so tests can
    /// measure what a proxy adds.
    #[arg(long)]
    pub annotate_timing: bool,
    /// Answer every inference request with this HTTP status (a fault; see /sim/faults).
    #[arg(long)]
    pub fail_status: Option<u16>,
    /// Faults active from the start, as the JSON object `POST /sim/faults` takes, e.g.
    /// '{"stall":true}' or '{"stream_reset_after_tokens":5,"metrics_delay_ms":2000}'.
    #[arg(long, value_parser = parse_faults)]
    pub faults: Option<Faults>,
    /// Name reported in the `x-sim-replica` header and /sim/state.
    #[arg(long)]
    pub name: Option<String>,
    /// Require `Authorization: Bearer KEY` on /v1 routes, as `vllm serve --api-key` does.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Publish KV-cache events on a ZMQ PUB socket at this port of `--host` (0: any free
    /// one, logged), as vLLM's `--kv-events-config` does; the replay socket is at
    /// `--kv-events-replay-port`.
    #[arg(long)]
    pub kv_events_port: Option<u16>,
    /// The KV-event replay (ROUTER) socket's port (0 or absent: any free one).
    #[arg(long, default_value_t = 0)]
    pub kv_events_replay_port: u16,
    /// Tokenize with this model directory's tokenizer and chat template (as vLLM loads
    /// them), instead of the built-in word tokenizer: token ids then equal a real
    /// engine's, which exact prefix routing needs.
    #[arg(long)]
    pub tokenizer: Option<std::path::PathBuf>,
}

fn parse_lora_module(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_string(), path.to_string()))
        }
        _ => Err(format!("expected NAME=PATH, got {s:?}")),
    }
}

fn parse_faults(s: &str) -> Result<Faults, String> {
    serde_json::from_str(s).map_err(|e| format!("not a faults object: {e}"))
}

impl SimArgs {
    /// The flags' defaults, for building a sim in code.
    pub fn defaults() -> SimArgs {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            args: SimArgs,
        }
        Wrap::parse_from(["sim"]).args
    }

    /// Whether LoRA adapters can be served (vLLM's --enable-lora): some are given, or they
    /// can be loaded at run time.
    pub fn lora_enabled(&self) -> bool {
        self.runtime_lora || !self.lora_modules.is_empty()
    }

    /// The engine configuration: the preset's values, overridden by the flags.
    pub fn engine_config(&self) -> EngineConfig {
        let (seqs, budget, kv, block, len, perf, scale) = match self.preset {
            Preset::Llama3H100 => (
                256,
                8192,
                450_000,
                16,
                131_072,
                PerfModel::LLAMA3_8B_H100,
                1.0,
            ),
            Preset::Llama3A100 => (
                256,
                8192,
                450_000,
                16,
                131_072,
                PerfModel::LLAMA3_8B_A100,
                1.0,
            ),
            Preset::TinyTest => (8, 512, 4096, 16, 4096, PerfModel::LLAMA3_8B_H100, 0.01),
        };
        let mut perf = perf;
        if let Some(j) = self.jitter {
            perf.jitter_cv = j.max(0.0);
        }
        EngineConfig {
            scheduler: SchedulerConfig {
                max_num_seqs: self.max_num_seqs.unwrap_or(seqs).max(1),
                max_num_batched_tokens: self.max_num_batched_tokens.unwrap_or(budget).max(1),
                block_size: self.block_size.unwrap_or(block).max(1),
                kv_tokens: self
                    .kv_tokens
                    .unwrap_or(kv)
                    .max(2 * self.block_size.unwrap_or(block).max(1)),
                enable_prefix_caching: !self.no_enable_prefix_caching,
                max_model_len: self.max_model_len.unwrap_or(len).max(1),
                perf,
                speed_factor: if self.speed_factor > 0.0 {
                    self.speed_factor
                } else {
                    1.0
                },
                max_loras: if self.lora_enabled() {
                    self.max_loras.max(1)
                } else {
                    0
                },
            },
            time_scale: self.time_scale.unwrap_or(scale).max(0.0),
            seed: self.seed,
            kv_events: None,
        }
    }
}

/// Faults, set by flags or at run time with `POST /sim/faults` (a JSON object with any
/// of these keys; `null` clears one).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Answer inference requests with this status and a vLLM error body.
    pub http_error: Option<u16>,
    /// Reset the connection instead of answering inference requests.
    pub reset: bool,
    /// Accept inference requests and never answer (`/health` still answers 200).
    pub stall: bool,
    /// Status of `/health` (vLLM answers 503 when its engine died).
    pub health_status: Option<u16>,
    /// Delay `/health` answers by this many milliseconds.
    pub health_delay_ms: Option<u64>,
    /// Every engine step takes this many times longer.
    pub slow_factor: Option<f64>,
    /// Send a non-streaming answer's header and half its body, then close the connection
    /// (an engine that died while its answer was being written).
    pub body_cut: bool,
    /// Reset the connection after this many streamed tokens.
    pub stream_reset_after_tokens: Option<usize>,
    /// Send a vLLM error event and `[DONE]` after this many streamed tokens.
    pub stream_error_after_tokens: Option<usize>,
    /// Stop sending (connection kept open) after this many streamed tokens (0: right after
    /// the response header, as a hung engine behind a live API server does).
    pub stream_hang_after_tokens: Option<usize>,
    /// Delay `/metrics` answers by this many milliseconds.
    pub metrics_delay_ms: Option<u64>,
    /// Freeze `/metrics` at its value when this was set (the engine goes on).
    pub metrics_stale: bool,
    /// Leave out the metric families whose names start with any of these.
    pub metrics_drop: Vec<String>,
    /// Answer `/metrics` with an HTML error page instead of the exposition.
    pub metrics_garbage: bool,
    /// Serve the legacy dialect (`vllm:gpu_cache_usage_perc`).
    pub metrics_legacy: bool,
}
