//! `vllm-edge sim`: a simulated vLLM server with vLLM's endpoints, JSON shapes, SSE format
//! and metric names (those of a real vLLM 0.32 server, `tests/fixtures/vllm-0.32/`), a
//! simulated engine behind them, and fault injection for resilience tests.
//!
//! - [`http`]: the HTTP/1.1 server (keep-alive, streams, reset and stall on demand);
//! - [`scheduler`]: vLLM's V1 scheduler and step-time model, pure (virtual clock);
//! - [`engine`]: that scheduler driven in real (scaled) time, counters and histograms;
//! - [`exposition`]: the `/metrics` text;
//! - this module: flags, the OpenAI routes, faults and the `/sim/*` admin routes.

pub mod engine;
pub mod exposition;
pub mod http;
pub mod scheduler;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};

use engine::{Engine, EngineConfig, Event};
use http::{Reply, Request, StreamItem};
use scheduler::{PerfModel, SchedulerConfig};

/// Hardware profiles; flags override their values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// Llama-3-8B on one H100 (the calibration of research/vllm-sim-spec.md §7.4).
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

/// Body digests kept for `/sim/state` (tests check byte-exact forwarding with them).
const DIGESTS_KEPT: usize = 64;

pub struct Sim {
    args: SimArgs,
    engine: Arc<Engine>,
    faults: Mutex<Faults>,
    /// The `/metrics` text frozen by the `metrics_stale` fault.
    frozen_metrics: Mutex<Option<String>>,
    rng: Mutex<rand::rngs::StdRng>,
    started: Mutex<SystemTime>,
    requests: AtomicU64,
    connections: AtomicU64,
    /// Clients that closed their connection while their answer was pending.
    disconnects: AtomicU64,
    digests: Mutex<VecDeque<String>>,
    /// The `x-forwarded-for` of the last generation request (for `/sim/state`).
    forwarded_for: Mutex<Option<String>>,
    next_id: AtomicU64,
    restart: tokio::sync::Notify,
    restart_down: Mutex<Duration>,
    /// LoRA adapters served: (name, path), from `--lora-modules` and loaded at run time.
    loras: Mutex<Vec<(String, String)>>,
    /// The engine's id of each adapter name ever requested (`lora_int_id` = index + 1),
    /// kept when it is unloaded so ids stay stable.
    lora_ids: Mutex<Vec<String>>,
}

/// A running simulated server.
pub struct SimHandle {
    pub addr: SocketAddr,
    pub sim: Arc<Sim>,
    shutdown: watch::Sender<bool>,
}

impl SimHandle {
    /// Stops listening and drops every connection.
    pub fn stop(&self) {
        let _ = self.shutdown.send(true);
    }
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds and starts a simulated server on the current tokio runtime.
pub async fn spawn(args: SimArgs) -> std::io::Result<SimHandle> {
    let listener = tokio::net::TcpListener::bind((args.host, args.port)).await?;
    let addr = listener.local_addr()?;
    let sim = Arc::new(Sim::new(args));
    let (tx, rx) = watch::channel(false);
    tokio::spawn(serve_with_restarts(listener, addr, sim.clone(), rx));
    Ok(SimHandle {
        addr,
        sim,
        shutdown: tx,
    })
}

/// Serves until shut down. A restart (`POST /sim/restart`) closes the listener and every
/// connection, forgets all requests and counters, stays away for the requested time (the
/// port refuses connections, as vLLM does while loading) and binds the same port again.
async fn serve_with_restarts(
    mut listener: tokio::net::TcpListener,
    addr: SocketAddr,
    sim: Arc<Sim>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stop_tx, stop_rx) = watch::channel(false);
        let serving = tokio::spawn(http::serve(listener, sim.clone(), stop_rx));
        tokio::select! {
            _ = sim.restart.notified() => {}
            _ = shutdown.wait_for(|s| *s) => {
                let _ = stop_tx.send(true);
                return;
            }
        }
        let _ = stop_tx.send(true);
        let _ = serving.await;
        sim.engine.reset();
        sim.reset_counters();
        let down = *sim.restart_down.lock().expect("not poisoned");
        tracing::info!(%addr, ?down, "sim restarting");
        tokio::time::sleep(down).await;
        listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "sim cannot bind again yet");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            if *shutdown.borrow() {
                return;
            }
        };
    }
}

/// FNV-1a 64: a cheap digest for comparing bodies in tests.
pub fn digest(body: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in body {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{}:{h:016x}", body.len())
}

/// The pseudo tokenizer: one token per word or punctuation mark, with a stable id, so
/// identical text gives identical token ids (and identical prefix-cache blocks).
pub fn tokenize(text: &str) -> Vec<u32> {
    let mut ids = Vec::with_capacity(text.len() / 4);
    let mut word_start: Option<usize> = None;
    let id = |t: &str| {
        let mut h: u32 = 0x811c9dc5;
        for b in t.bytes() {
            h ^= b as u32;
            h = h.wrapping_mul(0x01000193);
        }
        h
    };
    for (i, c) in text.char_indices() {
        if c.is_alphanumeric() {
            if word_start.is_none() {
                word_start = Some(i);
            }
            continue;
        }
        if let Some(st) = word_start.take() {
            ids.push(id(&text[st..i]));
        }
        if !c.is_whitespace() {
            ids.push(id(&text[i..i + c.len_utf8()]));
        }
    }
    if let Some(st) = word_start {
        ids.push(id(&text[st..]));
    }
    ids
}

/// The number of tokens of `text` (see [`tokenize`]).
pub fn count_tokens(text: &str) -> usize {
    let mut n = 0;
    let mut in_word = false;
    for c in text.chars() {
        if c.is_alphanumeric() {
            if !in_word {
                n += 1;
                in_word = true;
            }
        } else {
            in_word = false;
            if !c.is_whitespace() {
                n += 1;
            }
        }
    }
    n
}

/// The pseudo chat template, so identical leading messages give identical leading tokens.
fn chat_prompt(messages: &[Value]) -> String {
    let mut out = String::from("<|begin|>");
    for m in messages {
        let role = m["role"].as_str().unwrap_or("user");
        out.push_str(&format!("<|{role}|>\n"));
        match &m["content"] {
            Value::String(s) => out.push_str(s),
            Value::Array(parts) => {
                for p in parts {
                    if let Some(t) = p["text"].as_str() {
                        out.push_str(t);
                    }
                }
            }
            _ => {}
        }
        out.push_str("<|end|>");
    }
    out.push_str("<|assistant|>\n");
    out
}

const WORDS: &[&str] = &[
    " the",
    " quick",
    " model",
    " answers",
    " with",
    " simulated",
    " tokens",
    " at",
    " a",
    " steady",
    " pace",
    ",",
    " while",
    " the",
    " gateway",
    " routes",
    " each",
    " request",
    ".",
];

fn vllm_error(status: u16, kind: &str, message: &str, param: Option<&str>) -> Reply {
    Reply::json(
        status,
        json!({"error": {"message": message, "type": kind, "param": param, "code": status}})
            .to_string(),
    )
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn now_micros() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Completion,
    /// `/v1/audio/transcriptions`: a form with an audio file.
    Transcription,
    /// `/v1/audio/translations`: the same, into English.
    Translation,
}

/// Bytes of audio per second the simulator assumes (16 kHz, 16-bit mono PCM).
const AUDIO_BYTES_PER_SECOND: usize = 32_000;
/// Encoder positions per second of audio (Whisper: 1,500 per 30 s window).
const AUDIO_TOKENS_PER_SECOND: usize = 50;

/// What a generation request asks for, read from its JSON body or form.
struct Job {
    model: String,
    prompt_ids: Vec<u32>,
    max_tokens: Option<usize>,
    stream: bool,
    include_usage: bool,
    ignore_eos: bool,
    /// Seconds of audio (the audio endpoints' usage).
    audio_seconds: usize,
}

impl Sim {
    /// Builds the server state and starts its engine (needs a tokio runtime).
    pub fn new(args: SimArgs) -> Sim {
        let loras = args.lora_modules.clone();
        use rand::SeedableRng;
        let engine = Engine::start(args.engine_config());
        let mut faults = args.faults.clone().unwrap_or_default();
        if args.fail_status.is_some() {
            faults.http_error = args.fail_status;
        }
        faults.metrics_legacy |= args.legacy_metrics;
        engine.set_slow_factor(faults.slow_factor.unwrap_or(1.0));
        Sim {
            rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(args.seed ^ 0x5eed)),
            args,
            engine,
            faults: Mutex::new(faults),
            frozen_metrics: Mutex::new(None),
            started: Mutex::new(SystemTime::now()),
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            digests: Mutex::new(VecDeque::new()),
            forwarded_for: Mutex::new(None),
            next_id: AtomicU64::new(1),
            restart: tokio::sync::Notify::new(),
            restart_down: Mutex::new(Duration::ZERO),
            loras: Mutex::new(loras),
            lora_ids: Mutex::new(Vec::new()),
        }
    }

    /// The engine's adapter id of `model`: 0 for a served name, else the LoRA adapter's.
    fn lora_id(&self, model: &str) -> u32 {
        if self.args.models.iter().any(|m| m == model) {
            return 0;
        }
        let mut ids = self.lora_ids.lock().expect("not poisoned");
        let at = match ids.iter().position(|n| n == model) {
            Some(i) => i,
            None => {
                ids.push(model.to_string());
                ids.len() - 1
            }
        };
        at as u32 + 1
    }

    /// The adapter names of engine ids (see [`Sim::lora_id`]), comma-separated as vLLM
    /// writes them in `vllm:lora_requests_info`.
    pub(crate) fn lora_names(&self, ids: &[u32]) -> String {
        let names = self.lora_ids.lock().expect("not poisoned");
        ids.iter()
            .filter_map(|&i| names.get(i.checked_sub(1)? as usize).map(String::as_str))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The model a request is for: the one it names, or with none (absent, `null` or
    /// empty) the first served name, as vLLM's `_get_model_name`.
    fn named_or_first(&self, named: Option<&str>) -> String {
        named
            .filter(|m| !m.is_empty())
            .unwrap_or(self.model_name())
            .to_string()
    }

    /// Whether `model` is served: a served name or a loaded LoRA adapter.
    fn serves(&self, model: &str) -> bool {
        self.args.models.iter().any(|m| m == model)
            || self
                .loras
                .lock()
                .expect("not poisoned")
                .iter()
                .any(|(n, _)| n == model)
    }

    /// `POST /v1/load_lora_adapter` (`load`) or `/v1/unload_lora_adapter`, with vLLM's
    /// answers: plain text on success, its error JSON otherwise.
    fn lora(&self, req: &Request, load: bool) -> Reply {
        let v: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        let Some(name) = v["lora_name"].as_str().filter(|n| !n.is_empty()) else {
            return vllm_error(
                400,
                "BadRequestError",
                "lora_name is required.",
                Some("lora_name"),
            );
        };
        let mut loras = self.loras.lock().expect("not poisoned");
        let at = loras.iter().position(|(n, _)| n == name);
        let text = match (load, at) {
            (true, Some(_)) => {
                let m = format!("The lora adapter '{name}' has already been loaded.");
                return vllm_error(400, "InvalidUserInput", &m, None);
            }
            (true, None) => {
                let Some(path) = v["lora_path"].as_str() else {
                    let m = "Both 'lora_name' and 'lora_path' must be provided.";
                    return vllm_error(400, "InvalidUserInput", m, None);
                };
                loras.push((name.to_string(), path.to_string()));
                format!("Success: LoRA adapter '{name}' added successfully.")
            }
            (false, None) => {
                let m = format!("The lora adapter '{name}' cannot be found.");
                return vllm_error(404, "NotFoundError", &m, None);
            }
            (false, Some(i)) => {
                loras.remove(i);
                format!("Success: LoRA adapter '{name}' removed successfully.")
            }
        };
        Reply::Full {
            status: 200,
            content_type: "text/plain; charset=utf-8",
            headers: Vec::new(),
            body: Bytes::from(text),
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn faults(&self) -> Faults {
        self.faults.lock().expect("not poisoned").clone()
    }

    pub fn set_faults(&self, f: Faults) {
        self.engine.set_slow_factor(f.slow_factor.unwrap_or(1.0));
        let mut frozen = self.frozen_metrics.lock().expect("not poisoned");
        if f.metrics_stale && frozen.is_none() {
            *frozen = Some(exposition::render(self, &f));
        } else if !f.metrics_stale {
            *frozen = None;
        }
        drop(frozen);
        *self.faults.lock().expect("not poisoned") = f;
    }

    /// Stops listening now and comes back after `down` with every counter reset.
    pub fn restart(&self, down: Duration) {
        *self.restart_down.lock().expect("not poisoned") = down;
        self.restart.notify_one();
    }

    fn reset_counters(&self) {
        *self.started.lock().expect("not poisoned") = SystemTime::now();
        self.requests.store(0, Ordering::Relaxed);
        self.connections.store(0, Ordering::Relaxed);
        self.disconnects.store(0, Ordering::Relaxed);
        self.digests.lock().expect("not poisoned").clear();
    }

    fn model_name(&self) -> &str {
        &self.args.models[0]
    }

    fn started_unix(&self) -> u64 {
        self.started
            .lock()
            .expect("not poisoned")
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    /// Ground truth for tests: counters, gauges, recent body digests and faults.
    pub fn state(&self) -> Value {
        let st = self.engine.stats();
        json!({
            "name": self.args.name,
            "models": self.args.models,
            "requests": self.requests.load(Ordering::Relaxed),
            "connections": self.connections.load(Ordering::Relaxed),
            "disconnects": self.disconnects.load(Ordering::Relaxed),
            "running": st.running,
            "waiting": st.waiting,
            "kv_usage": st.kv_usage,
            "aborted": st.aborted,
            "finished": st.success_stop + st.success_length,
            "preemptions": st.counters.preemptions,
            "prefix_cache_hits": st.counters.prefix_hits,
            "generation_tokens": st.counters.generation_tokens,
            "steps": st.steps,
            "body_digests": self.digests.lock().expect("not poisoned").iter().collect::<Vec<_>>(),
            "forwarded_for": *self.forwarded_for.lock().expect("not poisoned"),
            "faults": self.faults(),
        })
    }

    fn models_body(&self) -> String {
        let created = self.started_unix();
        let max_len = self.engine.cfg.scheduler.effective_max_model_len();
        let mut data: Vec<Value> = self
            .args
            .models
            .iter()
            .map(|m| {
                json!({"id": m, "object": "model", "created": created, "owned_by": "vllm",
                       "root": m, "parent": null, "max_model_len": max_len})
            })
            .collect();
        // Loaded adapters, as vLLM lists them: their path as root, the base as parent.
        data.extend(
            self.loras
                .lock()
                .expect("not poisoned")
                .iter()
                .map(|(n, p)| {
                    json!({"id": n, "object": "model", "created": created, "owned_by": "vllm",
                   "root": p, "parent": self.model_name(), "max_model_len": max_len})
                }),
        );
        json!({"object": "list", "data": data}).to_string()
    }

    fn replica_headers(&self, body_digest: &str) -> Vec<(&'static str, String)> {
        let mut h = vec![("x-sim-body-digest", body_digest.to_string())];
        if let Some(n) = &self.args.name {
            h.push(("x-sim-replica", n.clone()));
        }
        h
    }

    /// The natural output length of a request: lognormal around the median.
    fn sample_output_len(&self) -> usize {
        let mut rng = self.rng.lock().expect("not poisoned");
        // σ so that p99 ≈ 6.7 × median (median 150, p99 1000 in the spec).
        let factor = scheduler::jitter(&mut *rng, 0.816);
        ((self.args.output_len_median as f64 * factor).round() as usize).max(1)
    }

    async fn generate(&self, req: &Request, kind: Kind) -> Reply {
        let arrival = Instant::now();
        let body_digest = digest(&req.body);
        {
            let mut d = self.digests.lock().expect("not poisoned");
            if d.len() == DIGESTS_KEPT {
                d.pop_front();
            }
            d.push_back(body_digest.clone());
        }
        *self.forwarded_for.lock().expect("not poisoned") =
            req.header("x-forwarded-for").map(str::to_string);
        self.requests.fetch_add(1, Ordering::Relaxed);
        let faults = self.faults();
        if faults.reset {
            return Reply::Reset;
        }
        if faults.stall {
            return Reply::Stall;
        }
        if let Some(status) = faults.http_error {
            return vllm_error(status, "InternalServerError", "Injected fault.", None);
        }

        let job = match kind {
            Kind::Chat | Kind::Completion => self.json_job(req, kind),
            Kind::Transcription | Kind::Translation => self.form_job(req),
        };
        let Job {
            model,
            mut prompt_ids,
            max_tokens,
            stream,
            include_usage,
            ignore_eos,
            audio_seconds,
        } = match job {
            Ok(job) => job,
            Err(reply) => return reply,
        };
        if !self.serves(&model) {
            return vllm_error(
                404,
                "NotFoundError",
                &format!(
                    "The model `{model}` does not exist. Valid aliases: {}.",
                    self.args.models.join(", ")
                ),
                Some("model"),
            );
        }
        if prompt_ids.is_empty() {
            prompt_ids.push(0);
        }
        let prompt_tokens = prompt_ids.len();
        let max_len = self.engine.cfg.scheduler.effective_max_model_len();
        if prompt_tokens >= max_len {
            return vllm_error(
                400,
                "BadRequestError",
                &format!(
                    "This model's maximum context length is {max_len} tokens. However, your \
                     prompt contains at least {} input tokens, which exceeds this limit even \
                     without any output tokens. Please reduce the length of the input prompt. \
                     (parameter=input_tokens, value={})",
                    prompt_tokens, prompt_tokens
                ),
                Some("input_tokens"),
            );
        }
        if let Some(m) = max_tokens {
            if m > max_len {
                return vllm_error(
                    400,
                    "BadRequestError",
                    &format!(
                        "max_tokens={m} cannot be greater than max_model_len={max_len}. Please \
                         request fewer output tokens. (parameter=max_tokens, value={m})"
                    ),
                    Some("max_tokens"),
                );
            }
        }
        // vLLM clamps max_tokens to what the context has room for.
        let cap = max_tokens
            .unwrap_or(max_len)
            .min(max_len - prompt_tokens)
            .max(1);
        let forced = req
            .header("x-sim-output-tokens")
            .and_then(|s| s.parse::<usize>().ok());
        let natural = match forced {
            Some(n) => n.max(1),
            None if ignore_eos => usize::MAX,
            None => self.sample_output_len(),
        };
        let output_tokens = natural.min(cap);
        // As vLLM does, the client's `X-Request-Id` becomes the base of the request's id.
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let base = req
            .header("x-request-id")
            .map_or_else(|| format!("sim{n:012x}"), str::to_string);
        let id = match kind {
            Kind::Chat => format!("chatcmpl-{base}"),
            Kind::Completion => format!("cmpl-{base}"),
            Kind::Transcription => format!("trsc-{base}"),
            Kind::Translation => format!("trsl-{base}"),
        };
        // Tokenization and validation take time in vLLM too, before the engine sees it.
        let api = self.engine.cfg.scheduler.perf.api_overhead_ms * self.engine.cfg.time_scale;
        tokio::time::sleep(Duration::from_secs_f64(api / 1000.0)).await;
        let lora = self.lora_id(&model);
        let events = self.engine.submit(prompt_ids, output_tokens, lora, arrival);
        let ctx = GenCtx {
            id,
            model,
            created: now_unix(),
            prompt_tokens,
            annotate: self.args.annotate_timing,
            kind,
            natural,
        };
        let headers = self.replica_headers(&body_digest);
        if stream {
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(stream_events(ctx, events, tx, include_usage, faults));
            Reply::Stream {
                status: 200,
                content_type: "text/event-stream; charset=utf-8",
                headers,
                rx,
            }
        } else {
            let mut events = events;
            let mut text = String::new();
            let mut produced = 0;
            let mut reason = "length";
            while let Some(ev) = events.recv().await {
                match ev {
                    Event::Token(i) => {
                        text.push_str(WORDS[i % WORDS.len()]);
                        produced += 1;
                    }
                    Event::Finished(r) => reason = finish_reason(r, produced, natural),
                }
            }
            let usage = json!({"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + produced,
                               "completion_tokens": produced, "prompt_tokens_details": null});
            let body = match ctx.kind {
                Kind::Chat => json!({
                    "id": ctx.id, "object": "chat.completion", "created": ctx.created, "model": ctx.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text,
                                 "refusal": null, "tool_calls": [], "reasoning": null},
                                 "logprobs": null, "finish_reason": reason, "stop_reason": null}],
                    "system_fingerprint": "vllm-0.32.0-sim", "usage": usage,
                    "prompt_logprobs": null, "kv_transfer_params": null,
                }),
                Kind::Completion => json!({
                    "id": ctx.id, "object": "text_completion", "created": ctx.created, "model": ctx.model,
                    "choices": [{"index": 0, "text": text, "logprobs": null,
                                 "finish_reason": reason, "stop_reason": null}],
                    "system_fingerprint": "vllm-0.32.0-sim", "usage": usage,
                }),
                Kind::Transcription => json!({
                    "text": text, "usage": {"type": "duration", "seconds": audio_seconds},
                }),
                Kind::Translation => json!({"text": text}),
            };
            let body = Bytes::from(body.to_string());
            if faults.body_cut {
                return Reply::Cut {
                    status: 200,
                    content_type: "application/json",
                    headers,
                    body,
                };
            }
            Reply::Full {
                status: 200,
                content_type: "application/json",
                headers,
                body,
            }
        }
    }

    /// A chat or completion request's JSON body.
    fn json_job(&self, req: &Request, kind: Kind) -> Result<Job, Reply> {
        let v: Value = match serde_json::from_slice(&req.body) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                return Err(vllm_error(
                    400,
                    "Bad Request",
                    "JSON decode error",
                    Some("body"),
                ))
            }
        };
        let prompt = match kind {
            Kind::Chat => match v["messages"].as_array() {
                Some(m) => chat_prompt(m),
                None => {
                    return Err(vllm_error(
                        400,
                        "Bad Request",
                        "Field required",
                        Some("body.messages"),
                    ))
                }
            },
            _ => match &v["prompt"] {
                Value::String(s) => s.clone(),
                Value::Array(a) => a
                    .iter()
                    .filter_map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join(""),
                _ => {
                    return Err(vllm_error(
                        400,
                        "Bad Request",
                        "Field required",
                        Some("body.prompt"),
                    ))
                }
            },
        };
        Ok(Job {
            model: self.named_or_first(v["model"].as_str()),
            prompt_ids: tokenize(&prompt),
            max_tokens: v["max_completion_tokens"]
                .as_u64()
                .or(v["max_tokens"].as_u64())
                .map(|n| n as usize),
            stream: v["stream"].as_bool().unwrap_or(false),
            include_usage: v["stream_options"]["include_usage"]
                .as_bool()
                .unwrap_or(false),
            ignore_eos: v["ignore_eos"].as_bool().unwrap_or(false),
            audio_seconds: 0,
        })
    }

    /// An audio request's `multipart/form-data` body: the audio file becomes encoder
    /// positions (50 per second of sound, at 16 kHz 16-bit), the text `prompt` tokens.
    fn form_job(&self, req: &Request) -> Result<Job, Reply> {
        let bad = |msg: &str, param: &str| vllm_error(400, "BadRequestError", msg, Some(param));
        let boundary = match req
            .header("content-type")
            .map(|c| crate::openai::form::boundary(c.as_bytes()))
        {
            Some(Some(Ok(b))) => b.into_owned(),
            _ => return Err(bad("Expected a multipart/form-data body.", "body")),
        };
        let parts = crate::openai::form::parts(&req.body, &boundary).map_err(|why| {
            bad(
                &format!("There was an error parsing the body: {why}"),
                "body",
            )
        })?;
        let field = |name: &str| {
            crate::openai::form::field(&parts, name)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let flag = |name: &str| {
            crate::openai::form::field(&parts, name).and_then(crate::openai::form::boolean)
                == Some(true)
        };
        let Some(audio) = parts
            .iter()
            .find(|p| p.is_file && p.name.as_deref() == Some("file"))
        else {
            return Err(bad("Field required", "body.file"));
        };
        if audio.data.is_empty() {
            return Err(bad("The audio file is empty.", "file"));
        }
        let stream = flag("stream");
        if flag("stream_include_usage") && !stream {
            return Err(bad(
                "Stream options can only be defined when `stream=True`.",
                "stream_include_usage",
            ));
        }
        let seconds = audio.data.len().div_ceil(AUDIO_BYTES_PER_SECOND);
        let mut prompt_ids = vec![0; seconds * AUDIO_TOKENS_PER_SECOND];
        prompt_ids.extend(tokenize(&field("prompt").unwrap_or_default()));
        Ok(Job {
            model: self.named_or_first(field("model").as_deref()),
            prompt_ids,
            max_tokens: field("max_completion_tokens").and_then(|v| v.trim().parse().ok()),
            stream,
            include_usage: flag("stream_include_usage"),
            ignore_eos: false,
            audio_seconds: seconds,
        })
    }

    fn embeddings(&self, req: &Request) -> Reply {
        let v: Value = match serde_json::from_slice(&req.body) {
            Ok(v) => v,
            Err(_) => return vllm_error(400, "Bad Request", "JSON decode error", Some("body")),
        };
        let model = self.named_or_first(v["model"].as_str());
        if !self.serves(&model) {
            return vllm_error(
                404,
                "NotFoundError",
                &format!("The model `{model}` does not exist."),
                Some("model"),
            );
        }
        let inputs: Vec<String> = match &v["input"] {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a
                .iter()
                .map(|x| x.as_str().unwrap_or("").to_string())
                .collect(),
            _ => return vllm_error(400, "Bad Request", "Field required", Some("body.input")),
        };
        let mut tokens = 0;
        let data: Vec<Value> = inputs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                tokens += count_tokens(s);
                let d = digest(s.as_bytes());
                let seed = u64::from_str_radix(&d[d.len() - 16..], 16).unwrap_or(1);
                let emb: Vec<f64> = (0..8)
                    .map(|k| ((seed >> (k * 8)) & 0xff) as f64 / 255.0 - 0.5)
                    .collect();
                json!({"index": i, "object": "embedding", "embedding": emb})
            })
            .collect();
        Reply::Full {
            status: 200,
            content_type: "application/json",
            headers: self.replica_headers(&digest(&req.body)),
            body: Bytes::from(
                json!({"id": "embd-sim", "object": "list", "created": now_unix(), "model": model,
                       "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
                .to_string(),
            ),
        }
    }

    fn tokenize(&self, req: &Request) -> Reply {
        let v: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        let text = match (&v["prompt"], v["messages"].as_array()) {
            (Value::String(s), _) => s.clone(),
            (_, Some(m)) => chat_prompt(m),
            _ => return vllm_error(400, "Bad Request", "Field required", Some("body.prompt")),
        };
        let n = count_tokens(&text);
        let tokens: Vec<usize> = (0..n).collect();
        Reply::json(
            200,
            json!({"count": n, "max_model_len": self.args.max_model_len, "tokens": tokens, "token_strs": null})
                .to_string(),
        )
    }
}

/// `stop` when the output ended on its own, `length` when `max_tokens` or the context cut
/// it (the engine only knows whether the model length capped it).
fn finish_reason(engine: &'static str, produced: usize, natural: usize) -> &'static str {
    if engine == "length" || produced < natural {
        "length"
    } else {
        "stop"
    }
}

struct GenCtx {
    id: String,
    model: String,
    created: u64,
    prompt_tokens: usize,
    annotate: bool,
    kind: Kind,
    /// The output length the request would reach if nothing capped it.
    natural: usize,
}

impl GenCtx {
    fn event(&self, mut v: Value) -> StreamItem {
        if self.annotate {
            v["sim_emitted_us"] = json!(now_micros() as u64);
        }
        StreamItem::Data(Bytes::from(format!("data: {v}\n\n")))
    }

    fn object(&self) -> &'static str {
        match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
            Kind::Transcription => "transcription.chunk",
            Kind::Translation => "translation.chunk",
        }
    }

    fn chunk(&self, choice: Value) -> Value {
        json!({"id": self.id, "object": self.object(), "created": self.created,
               "model": self.model, "choices": [choice]})
    }
}

/// Turns engine events into vLLM's SSE chunks: the role chunk with the first token (chat),
/// one chunk per token, `finish_reason` on the last, the optional usage chunk, `[DONE]`.
async fn stream_events(
    ctx: GenCtx,
    mut events: mpsc::UnboundedReceiver<Event>,
    tx: mpsc::Sender<StreamItem>,
    include_usage: bool,
    faults: Faults,
) {
    let mut produced = 0usize;
    let mut pending: Option<usize> = None;
    if faults.stream_hang_after_tokens == Some(0) {
        // The header is out; the engine never produces a token (a hung engine core).
        let _ = tx.send(StreamItem::Hang).await;
        return;
    }
    // A token's chunk is sent when the next event arrives, so the last one can carry
    // `finish_reason` as vLLM's does.
    loop {
        // A client that leaves must abort the request at once, not at the next token.
        let ev = tokio::select! {
            ev = events.recv() => ev,
            _ = tx.closed() => return,
        };
        if let Some(i) = pending.take() {
            let last = !matches!(ev, Some(Event::Token(_)));
            let reason = match ev {
                Some(Event::Finished(r)) => json!(finish_reason(r, produced + 1, ctx.natural)),
                None => json!("length"),
                Some(Event::Token(_)) => Value::Null,
            };
            if i == 0 {
                if let Kind::Chat = ctx.kind {
                    let role = ctx.chunk(
                        json!({"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": null, "finish_reason": null}),
                    );
                    if tx.send(ctx.event(role)).await.is_err() {
                        return;
                    }
                }
            }
            let word = WORDS[i % WORDS.len()];
            let reason = if last { reason } else { Value::Null };
            let choice = match ctx.kind {
                Kind::Chat => json!({"index": 0, "delta": {"content": word}, "logprobs": null,
                                     "finish_reason": reason}),
                Kind::Completion => json!({"index": 0, "text": word, "logprobs": null,
                                           "finish_reason": reason, "stop_reason": null}),
                Kind::Transcription | Kind::Translation => json!({"delta": {"content": word},
                                           "finish_reason": reason, "stop_reason": null}),
            };
            if tx.send(ctx.event(ctx.chunk(choice))).await.is_err() {
                return;
            }
            produced += 1;
            if faults.stream_reset_after_tokens == Some(produced) {
                let _ = tx.send(StreamItem::Reset).await;
                return;
            }
            if faults.stream_hang_after_tokens == Some(produced) {
                let _ = tx.send(StreamItem::Hang).await;
                return;
            }
            if faults.stream_error_after_tokens == Some(produced) {
                let err = json!({"error": {"message": "EngineCore encountered an issue. See stack trace (above) for the root cause.",
                                           "type": "InternalServerError", "param": null, "code": 500}});
                let _ = tx.send(ctx.event(err)).await;
                let _ = tx
                    .send(StreamItem::Data(Bytes::from_static(b"data: [DONE]\n\n")))
                    .await;
                return;
            }
        }
        match ev {
            Some(Event::Token(i)) => pending = Some(i),
            Some(Event::Finished(_)) | None => break,
        }
    }
    if include_usage {
        let usage = json!({"id": ctx.id, "object": ctx.object(), "created": ctx.created,
            "model": ctx.model, "choices": [],
            "usage": {"prompt_tokens": ctx.prompt_tokens, "total_tokens": ctx.prompt_tokens + produced,
                      "completion_tokens": produced}});
        if tx.send(ctx.event(usage)).await.is_err() {
            return;
        }
    }
    let _ = tx
        .send(StreamItem::Data(Bytes::from_static(b"data: [DONE]\n\n")))
        .await;
}

impl Sim {
    async fn metrics(&self) -> Reply {
        let faults = self.faults();
        if let Some(ms) = faults.metrics_delay_ms {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if faults.metrics_garbage {
            return Reply::Full {
                status: 200,
                content_type: "text/html",
                headers: Vec::new(),
                body: Bytes::from_static(b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
            };
        }
        let frozen = self.frozen_metrics.lock().expect("not poisoned").clone();
        let text = frozen.unwrap_or_else(|| exposition::render(self, &faults));
        Reply::Full {
            status: 200,
            content_type: "text/plain; version=1.0.0; charset=utf-8",
            headers: Vec::new(),
            body: Bytes::from(text),
        }
    }
}

#[derive(Deserialize)]
struct RestartRequest {
    /// How long the port refuses connections.
    #[serde(default)]
    down_ms: u64,
}

#[async_trait]
impl http::Handler for Sim {
    fn on_connection(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    fn on_client_gone(&self) {
        self.disconnects.fetch_add(1, Ordering::Relaxed);
    }

    async fn handle(&self, req: Request) -> Reply {
        let method = req.method.as_str();
        let path = req.path.trim_end_matches('/');
        let path = if path.is_empty() { "/" } else { path };
        if let Some(key) = &self.args.api_key {
            let ok = req
                .header("authorization")
                .is_some_and(|v| v == format!("Bearer {key}"));
            if path.starts_with("/v1") && !ok {
                // vLLM's answer, word for word.
                return Reply::json(401, "{\"error\":\"Unauthorized\"}");
            }
        }
        match (method, path) {
            ("GET" | "HEAD", "/health") => {
                let faults = self.faults();
                if let Some(ms) = faults.health_delay_ms {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                Reply::Full {
                    status: faults.health_status.unwrap_or(200),
                    content_type: "application/json",
                    headers: Vec::new(),
                    body: Bytes::new(),
                }
            }
            ("GET" | "POST", "/ping") => Reply::json(200, "{}"),
            ("GET", "/version") => Reply::json(
                200,
                serde_json::json!({ "version": self.args.vllm_version }).to_string(),
            ),
            ("GET", "/v1/models") => Reply::json(200, self.models_body()),
            ("GET", "/load") => Reply::json(200, "{\"server_load\":0}"),
            ("GET", "/metrics") => self.metrics().await,
            ("POST", "/v1/chat/completions") => self.generate(&req, Kind::Chat).await,
            ("POST", "/v1/completions") => self.generate(&req, Kind::Completion).await,
            ("POST", "/v1/embeddings") => self.embeddings(&req),
            ("POST", "/tokenize") => self.tokenize(&req),
            ("POST", "/v1/audio/transcriptions") => self.generate(&req, Kind::Transcription).await,
            ("POST", "/v1/audio/translations") => self.generate(&req, Kind::Translation).await,
            ("POST", "/v1/load_lora_adapter") if self.args.runtime_lora => self.lora(&req, true),
            ("POST", "/v1/unload_lora_adapter") if self.args.runtime_lora => self.lora(&req, false),
            ("GET", "/sim/state") => Reply::json(200, self.state().to_string()),
            ("GET", "/sim/faults") => Reply::json(200, json!(self.faults()).to_string()),
            ("POST", "/sim/faults") => match serde_json::from_slice::<Faults>(&req.body) {
                Ok(f) => {
                    self.set_faults(f);
                    Reply::json(200, json!(self.faults()).to_string())
                }
                Err(e) => vllm_error(400, "BadRequestError", &e.to_string(), Some("body")),
            },
            ("POST", "/sim/restart") => {
                let body: &[u8] = if req.body.is_empty() {
                    b"{}"
                } else {
                    &req.body
                };
                match serde_json::from_slice::<RestartRequest>(body) {
                    Ok(r) => {
                        self.restart(Duration::from_millis(r.down_ms));
                        Reply::json(200, "{\"restarting\":true}")
                    }
                    Err(e) => vllm_error(400, "BadRequestError", &e.to_string(), Some("body")),
                }
            }
            (
                _,
                "/v1/chat/completions"
                | "/v1/completions"
                | "/v1/embeddings"
                | "/tokenize"
                | "/v1/audio/transcriptions"
                | "/v1/audio/translations",
            ) => Reply::Full {
                status: 405,
                content_type: "application/json",
                headers: vec![("allow", "POST".into())],
                body: Bytes::from_static(b"{\"detail\":\"Method Not Allowed\"}"),
            },
            _ => Reply::json(404, "{\"detail\":\"Not Found\"}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudo_tokenizer_counts_words_and_punctuation() {
        assert_eq!(count_tokens("Hello, world!"), 4);
        assert_eq!(count_tokens(""), 0);
        let a = chat_prompt(&[
            json!({"role":"system","content":"Be brief."}),
            json!({"role":"user","content":"A"}),
        ]);
        let b = chat_prompt(&[
            json!({"role":"system","content":"Be brief."}),
            json!({"role":"user","content":"B"}),
        ]);
        let common = a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
        assert!(common > "<|begin|><|system|>\nBe brief.<|end|>".len());
    }

    #[test]
    fn digest_distinguishes_bodies() {
        assert_ne!(digest(b"ab"), digest(b"ba"));
        assert!(digest(b"abc").starts_with("3:"));
    }
}
