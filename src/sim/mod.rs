//! `vllm-edge sim`: a simulated vLLM server with vLLM's endpoints, JSON shapes, SSE format
//! and metric names (those of a real vLLM 0.32 server, `shared/fixtures/vllm-0.32/`), a
//! simulated engine behind them, and fault injection for resilience tests.
//!
//! - [`http`]: the HTTP/1.1 server (keep-alive, streams, reset and stall on demand);
//! - [`engine`]: admission, prefill and token emission, counters and gauges;
//! - [`exposition`]: the `/metrics` text;
//! - this module: flags, the OpenAI routes, faults and the `/sim/*` admin routes.

pub mod engine;
pub mod exposition;
pub mod http;

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

use engine::{Engine, EngineConfig, Event, GenRequest};
use http::{Reply, Request, StreamItem};

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
    /// Most requests running at once; the rest wait.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// KV-cache capacity in tokens.
    #[arg(long, default_value_t = 450_000)]
    pub kv_tokens: usize,
    /// KV block size in tokens.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Longest prompt + output, in tokens.
    #[arg(long, default_value_t = 131_072)]
    pub max_model_len: usize,
    /// Output tokens per second of one request (decode speed).
    #[arg(long, default_value_t = 100.0)]
    pub tokens_per_s: f64,
    /// Prompt tokens processed per second (prefill speed).
    #[arg(long, default_value_t = 40_000.0)]
    pub prefill_tokens_per_s: f64,
    /// Fixed time before the first token, in milliseconds.
    #[arg(long, default_value_t = 5.0)]
    pub ttft_ms: f64,
    /// Output length when the request does not force one (`max_tokens` still caps it).
    #[arg(long, default_value_t = 64)]
    pub default_output_tokens: usize,
    /// Multiplies every simulated duration: 0.01 runs 100× faster than real time.
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
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
    /// Name reported in the `x-sim-replica` header.
    #[arg(long)]
    pub name: Option<String>,
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
    /// Accept inference requests and never answer.
    pub stall: bool,
    /// Status of `/health` (vLLM answers 503 when its engine died).
    pub health_status: Option<u16>,
    /// Reset the connection after this many streamed tokens.
    pub stream_reset_after_tokens: Option<usize>,
    /// Send a vLLM error event and `[DONE]` after this many streamed tokens.
    pub stream_error_after_tokens: Option<usize>,
    /// Stop sending (connection kept open) after this many streamed tokens.
    pub stream_hang_after_tokens: Option<usize>,
}

/// Body digests kept for `/sim/state` (tests check byte-exact forwarding with them).
const DIGESTS_KEPT: usize = 64;

pub struct Sim {
    args: SimArgs,
    engine: Arc<Engine>,
    faults: Mutex<Faults>,
    started: SystemTime,
    requests: AtomicU64,
    connections: AtomicU64,
    digests: Mutex<VecDeque<String>>,
    next_id: AtomicU64,
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
    tokio::spawn(http::serve(listener, sim.clone(), rx));
    Ok(SimHandle {
        addr,
        sim,
        shutdown: tx,
    })
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

/// The pseudo tokenizer: one token per word or punctuation mark.
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

enum Kind {
    Chat,
    Completion,
}

impl Sim {
    pub fn new(args: SimArgs) -> Sim {
        let engine = Engine::new(EngineConfig {
            max_num_seqs: args.max_num_seqs,
            kv_tokens: args.kv_tokens,
            block_size: args.block_size,
            prefill_tokens_per_s: args.prefill_tokens_per_s.max(1.0),
            decode_interval: Duration::from_secs_f64(1.0 / args.tokens_per_s.max(0.001)),
            ttft_base: Duration::from_secs_f64(args.ttft_ms.max(0.0) / 1000.0),
            time_scale: args.time_scale.max(0.0),
        });
        let faults = Faults {
            http_error: args.fail_status,
            ..Faults::default()
        };
        Sim {
            args,
            engine,
            faults: Mutex::new(faults),
            started: SystemTime::now(),
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            digests: Mutex::new(VecDeque::new()),
            next_id: AtomicU64::new(1),
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn faults(&self) -> Faults {
        self.faults.lock().expect("not poisoned").clone()
    }

    pub fn set_faults(&self, f: Faults) {
        *self.faults.lock().expect("not poisoned") = f;
    }

    fn model_name(&self) -> &str {
        &self.args.models[0]
    }

    /// Ground truth for tests: counters, gauges, recent body digests and faults.
    pub fn state(&self) -> Value {
        let c = self.engine.counters();
        json!({
            "name": self.args.name,
            "models": self.args.models,
            "requests": self.requests.load(Ordering::Relaxed),
            "connections": self.connections.load(Ordering::Relaxed),
            "running": self.engine.running(),
            "waiting": self.engine.waiting(),
            "kv_usage": self.engine.kv_usage(),
            "aborted": c.aborted,
            "finished": c.success_stop + c.success_length,
            "generation_tokens": c.generation_tokens,
            "body_digests": self.digests.lock().expect("not poisoned").iter().collect::<Vec<_>>(),
            "faults": self.faults(),
        })
    }

    fn models_body(&self) -> String {
        let created = self
            .started
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let data: Vec<Value> = self
            .args
            .models
            .iter()
            .map(|m| {
                json!({"id": m, "object": "model", "created": created, "owned_by": "vllm",
                       "root": m, "parent": null, "max_model_len": self.args.max_model_len})
            })
            .collect();
        json!({"object": "list", "data": data}).to_string()
    }

    fn replica_headers(&self, body_digest: &str) -> Vec<(&'static str, String)> {
        let mut h = vec![("x-sim-body-digest", body_digest.to_string())];
        if let Some(n) = &self.args.name {
            h.push(("x-sim-replica", n.clone()));
        }
        h
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

        let v: Value = match serde_json::from_slice(&req.body) {
            Ok(v @ Value::Object(_)) => v,
            _ => return vllm_error(400, "Bad Request", "JSON decode error", Some("body")),
        };
        let model = v["model"].as_str().unwrap_or(self.model_name()).to_string();
        if !self.args.models.contains(&model) {
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
        let prompt = match kind {
            Kind::Chat => match v["messages"].as_array() {
                Some(m) => chat_prompt(m),
                None => {
                    return vllm_error(400, "Bad Request", "Field required", Some("body.messages"))
                }
            },
            Kind::Completion => match &v["prompt"] {
                Value::String(s) => s.clone(),
                Value::Array(a) => a
                    .iter()
                    .filter_map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join(""),
                _ => return vllm_error(400, "Bad Request", "Field required", Some("body.prompt")),
            },
        };
        let prompt_tokens = count_tokens(&prompt).max(1);
        if prompt_tokens > self.args.max_model_len {
            return vllm_error(
                400,
                "BadRequestError",
                &format!(
                    "This model's maximum context length is {} tokens. However, your prompt \
                     contains at least {} input tokens, which exceeds this limit even without \
                     any output tokens. Please reduce the length of the input prompt.",
                    self.args.max_model_len, prompt_tokens
                ),
                Some("input_tokens"),
            );
        }
        let room = self.args.max_model_len - prompt_tokens;
        let max_tokens = v["max_completion_tokens"]
            .as_u64()
            .or(v["max_tokens"].as_u64())
            .map(|n| n as usize);
        if let Some(m) = max_tokens {
            if m > self.args.max_model_len {
                return vllm_error(
                    400,
                    "BadRequestError",
                    &format!(
                        "max_tokens={m} cannot be greater than max_model_len={}. Please \
                         request fewer output tokens.",
                        self.args.max_model_len
                    ),
                    Some("max_tokens"),
                );
            }
        }
        let cap = max_tokens.unwrap_or(room).min(room);
        let forced = req
            .header("x-sim-output-tokens")
            .and_then(|s| s.parse::<usize>().ok());
        let ignore_eos = v["ignore_eos"].as_bool().unwrap_or(false);
        let natural = forced.unwrap_or(if ignore_eos {
            usize::MAX
        } else {
            self.args.default_output_tokens
        });
        let output_tokens = natural.min(cap).max(1);
        let finish_reason = if output_tokens >= cap && natural >= cap {
            "length"
        } else {
            "stop"
        };
        let stream = v["stream"].as_bool().unwrap_or(false);
        let include_usage = v["stream_options"]["include_usage"]
            .as_bool()
            .unwrap_or(false);
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let id = match kind {
            Kind::Chat => format!("chatcmpl-sim{n:012x}"),
            Kind::Completion => format!("cmpl-sim{n:012x}"),
        };
        let events = self.engine.submit(
            GenRequest {
                prompt_tokens,
                output_tokens,
                finish_reason,
            },
            arrival,
        );
        let ctx = GenCtx {
            id,
            model,
            created: now_unix(),
            prompt_tokens,
            annotate: self.args.annotate_timing,
        };
        let headers = self.replica_headers(&body_digest);
        if stream {
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(stream_events(ctx, kind, events, tx, include_usage, faults));
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
            let mut reason = finish_reason;
            while let Some(ev) = events.recv().await {
                match ev {
                    Event::Token(i) => {
                        text.push_str(WORDS[i % WORDS.len()]);
                        produced += 1;
                    }
                    Event::Finished(r) => reason = r,
                }
            }
            let usage = json!({"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + produced,
                               "completion_tokens": produced, "prompt_tokens_details": null});
            let body = match kind {
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
            };
            Reply::Full {
                status: 200,
                content_type: "application/json",
                headers,
                body: Bytes::from(body.to_string()),
            }
        }
    }

    fn embeddings(&self, req: &Request) -> Reply {
        let v: Value = match serde_json::from_slice(&req.body) {
            Ok(v) => v,
            Err(_) => return vllm_error(400, "Bad Request", "JSON decode error", Some("body")),
        };
        let model = v["model"].as_str().unwrap_or(self.model_name()).to_string();
        if !self.args.models.contains(&model) {
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

struct GenCtx {
    id: String,
    model: String,
    created: u64,
    prompt_tokens: usize,
    annotate: bool,
}

impl GenCtx {
    fn event(&self, mut v: Value) -> StreamItem {
        if self.annotate {
            v["sim_emitted_us"] = json!(now_micros() as u64);
        }
        StreamItem::Data(Bytes::from(format!("data: {v}\n\n")))
    }
}

async fn stream_events(
    ctx: GenCtx,
    kind: Kind,
    mut events: mpsc::Receiver<Event>,
    tx: mpsc::Sender<StreamItem>,
    include_usage: bool,
    faults: Faults,
) {
    let chunk = |choice: Value| match kind {
        Kind::Chat => {
            json!({"id": ctx.id, "object": "chat.completion.chunk", "created": ctx.created,
                             "model": ctx.model, "choices": [choice]})
        }
        Kind::Completion => {
            json!({"id": ctx.id, "object": "text_completion", "created": ctx.created,
                                   "model": ctx.model, "choices": [choice]})
        }
    };
    if let Kind::Chat = kind {
        let first = chunk(
            json!({"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": null, "finish_reason": null}),
        );
        if tx.send(ctx.event(first)).await.is_err() {
            return;
        }
    }
    let mut produced = 0usize;
    let mut pending: Option<usize> = None;
    let mut finish = "stop";
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
            if let Some(Event::Finished(r)) = ev {
                finish = r;
            }
            let word = WORDS[i % WORDS.len()];
            let reason = if last { json!(finish) } else { Value::Null };
            let choice = match kind {
                Kind::Chat => json!({"index": 0, "delta": {"content": word}, "logprobs": null,
                                     "finish_reason": reason}),
                Kind::Completion => json!({"index": 0, "text": word, "logprobs": null,
                                           "finish_reason": reason, "stop_reason": null}),
            };
            if tx.send(ctx.event(chunk(choice))).await.is_err() {
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
                let err = json!({"error": {"message": "EngineCore encountered an issue.",
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
        let usage = json!({"id": ctx.id,
            "object": match kind { Kind::Chat => "chat.completion.chunk", Kind::Completion => "text_completion" },
            "created": ctx.created, "model": ctx.model, "choices": [],
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

#[async_trait]
impl http::Handler for Sim {
    fn on_connection(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    async fn handle(&self, req: Request) -> Reply {
        let method = req.method.as_str();
        let path = req.path.trim_end_matches('/');
        let path = if path.is_empty() { "/" } else { path };
        match (method, path) {
            ("GET" | "HEAD", "/health") => {
                let status = self.faults().health_status.unwrap_or(200);
                Reply::Full {
                    status,
                    content_type: "application/json",
                    headers: Vec::new(),
                    body: Bytes::new(),
                }
            }
            ("GET" | "POST", "/ping") => Reply::json(200, "{}"),
            ("GET", "/version") => Reply::json(200, "{\"version\":\"0.32.0\"}"),
            ("GET", "/v1/models") => Reply::json(200, self.models_body()),
            ("GET", "/load") => Reply::json(200, "{\"server_load\":0}"),
            ("GET", "/metrics") => Reply::Full {
                status: 200,
                content_type: "text/plain; version=1.0.0; charset=utf-8",
                headers: Vec::new(),
                body: Bytes::from(exposition::render(self)),
            },
            ("POST", "/v1/chat/completions") => self.generate(&req, Kind::Chat).await,
            ("POST", "/v1/completions") => self.generate(&req, Kind::Completion).await,
            ("POST", "/v1/embeddings") => self.embeddings(&req),
            ("POST", "/tokenize") => self.tokenize(&req),
            ("GET", "/sim/state") => Reply::json(200, self.state().to_string()),
            ("GET", "/sim/faults") => Reply::json(200, json!(self.faults()).to_string()),
            ("POST", "/sim/faults") => match serde_json::from_slice::<Faults>(&req.body) {
                Ok(f) => {
                    self.set_faults(f);
                    Reply::json(200, json!(self.faults()).to_string())
                }
                Err(e) => vllm_error(400, "BadRequestError", &e.to_string(), Some("body")),
            },
            (_, "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" | "/tokenize") => {
                Reply::Full {
                    status: 405,
                    content_type: "application/json",
                    headers: vec![("allow", "POST".into())],
                    body: Bytes::from_static(b"{\"detail\":\"Method Not Allowed\"}"),
                }
            }
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
