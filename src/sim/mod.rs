//! `vllm-edge sim`: a simulated vLLM server with vLLM's endpoints, JSON shapes, SSE format
//! and metric names (those of a real vLLM 0.32 server, `tests/fixtures/vllm-0.32/`), a
//! simulated engine behind them, and fault injection for resilience tests.
//!
//! Uses only the OpenAI surface (its form reading): a program of its own beside the
//! gateway.
//!
//! - [`http`]: the HTTP/1.1 server (keep-alive, streams, reset and stall on demand);
//! - [`scheduler`]: vLLM's V1 scheduler and step-time model, pure (virtual clock);
//! - [`engine`]: that scheduler driven in real (scaled) time, counters and histograms;
//! - [`exposition`]: the `/metrics` text;
//! - this module: flags, the OpenAI routes, faults and the `/sim/*` admin routes.

mod args;
pub mod engine;
pub mod exposition;
mod generate;
pub mod http;
pub mod kv_publish;
pub mod scheduler;
mod text;

pub use args::{Faults, Preset, SimArgs};
use generate::Kind;
use text::chat_prompt;
pub use text::{count_tokens, digest, tokenize};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

use engine::Engine;
use http::{Reply, Request};

/// Body digests kept for `/sim/state` (tests check byte-exact forwarding with them).
pub(super) const DIGESTS_KEPT: usize = 64;

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
    /// The W3C `traceparent` of the last generation request (for `/sim/state`): where
    /// vLLM would hang its own spans.
    traceparent: Mutex<Option<String>>,
    next_id: AtomicU64,
    restart: tokio::sync::Notify,
    restart_down: Mutex<Duration>,
    /// LoRA adapters served: (name, path), from `--lora-modules` and loaded at run time.
    loras: Mutex<Vec<(String, String)>>,
    /// The engine's id of each adapter name ever requested (`lora_int_id` = index + 1),
    /// kept when it is unloaded so ids stay stable.
    lora_ids: Arc<Mutex<Vec<String>>>,
    /// `--tokenizer`: the model's own tokenization.
    tokenizer: Option<crate::tokenize::Tokenizer>,
    /// The KV-event publisher (`--kv-events-port`).
    pub kv_events: Option<kv_publish::Publisher>,
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
    let lora_ids = Arc::new(Mutex::new(Vec::new()));
    let kv = match args.kv_events_port {
        None => None,
        Some(port) => Some(
            kv_publish::start(
                args.host,
                port,
                args.kv_events_replay_port,
                args.engine_config().scheduler.block_size,
                lora_ids.clone(),
            )
            .await?,
        ),
    };
    let sim = Arc::new(Sim::build(args, kv, lora_ids).map_err(std::io::Error::other)?);
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
        let down = *sim.restart_down.lock();
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

pub(super) fn vllm_error(status: u16, kind: &str, message: &str, param: Option<&str>) -> Reply {
    Reply::json(
        status,
        json!({"error": {"message": message, "type": kind, "param": param, "code": status}})
            .to_string(),
    )
}

pub(super) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(super) fn now_micros() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

impl Sim {
    /// Builds the server state and starts its engine (needs a tokio runtime).
    pub fn new(args: SimArgs) -> Sim {
        Sim::build(args, None, Default::default()).expect("no tokenizer to load")
    }

    /// [`Sim::new`] with a KV-event publisher and its adapter names, loading
    /// `--tokenizer`.
    fn build(
        args: SimArgs,
        kv: Option<(kv_publish::KvSink, kv_publish::Publisher)>,
        lora_ids: Arc<Mutex<Vec<String>>>,
    ) -> Result<Sim, String> {
        let loras = args.lora_modules.clone();
        use rand::SeedableRng;
        let tokenizer = match &args.tokenizer {
            Some(dir) => Some(crate::tokenize::Tokenizer::load(dir)?),
            None => None,
        };
        let mut engine_config = args.engine_config();
        let (sink, kv_events) = kv.unzip();
        engine_config.kv_events = sink;
        let engine = Engine::start(engine_config);
        let mut faults = args.faults.clone().unwrap_or_default();
        if args.fail_status.is_some() {
            faults.http_error = args.fail_status;
        }
        faults.metrics_legacy |= args.legacy_metrics;
        engine.set_slow_factor(faults.slow_factor.unwrap_or(1.0));
        Ok(Sim {
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
            traceparent: Mutex::new(None),
            next_id: AtomicU64::new(1),
            restart: tokio::sync::Notify::new(),
            restart_down: Mutex::new(Duration::ZERO),
            loras: Mutex::new(loras),
            lora_ids,
            tokenizer,
            kv_events,
        })
    }

    /// The engine's adapter id of `model`: 0 for a served name, else the LoRA adapter's.
    fn lora_id(&self, model: &str) -> u32 {
        if self.args.models.iter().any(|m| m == model) {
            return 0;
        }
        let mut ids = self.lora_ids.lock();
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
        let names = self.lora_ids.lock();
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
            || self.loras.lock().iter().any(|(n, _)| n == model)
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
        let mut loras = self.loras.lock();
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
        self.faults.lock().clone()
    }

    pub fn set_faults(&self, f: Faults) {
        self.engine.set_slow_factor(f.slow_factor.unwrap_or(1.0));
        let mut frozen = self.frozen_metrics.lock();
        if f.metrics_stale && frozen.is_none() {
            *frozen = Some(exposition::render(self, &f));
        } else if !f.metrics_stale {
            *frozen = None;
        }
        drop(frozen);
        *self.faults.lock() = f;
    }

    /// Stops listening now and comes back after `down` with every counter reset.
    pub fn restart(&self, down: Duration) {
        *self.restart_down.lock() = down;
        self.restart.notify_one();
    }

    /// `POST /sim/kv-events {"drop": N, "lose": N}`: the next N batches are published
    /// nowhere but kept for replay (`drop`), or neither (`lose`).
    fn kv_loss(&self, body: &[u8]) -> Reply {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Loss {
            #[serde(default)]
            drop: u64,
            #[serde(default)]
            lose: u64,
        }
        let Some(p) = &self.kv_events else {
            return vllm_error(
                404,
                "NotFound",
                "KV events are off (--kv-events-port)",
                None,
            );
        };
        match serde_json::from_slice::<Loss>(body) {
            Ok(l) => {
                p.loss.drop.store(l.drop, Ordering::Relaxed);
                p.loss.lose.store(l.lose, Ordering::Relaxed);
                Reply::json(200, "{}")
            }
            Err(e) => vllm_error(400, "BadRequestError", &e.to_string(), Some("body")),
        }
    }

    fn reset_counters(&self) {
        *self.started.lock() = SystemTime::now();
        self.requests.store(0, Ordering::Relaxed);
        self.connections.store(0, Ordering::Relaxed);
        self.disconnects.store(0, Ordering::Relaxed);
        self.digests.lock().clear();
    }

    fn model_name(&self) -> &str {
        &self.args.models[0]
    }

    /// When it (last) started, in Unix seconds with their fraction, as a process's
    /// `process_start_time_seconds` says.
    pub(super) fn started_unix_f64(&self) -> f64 {
        self.started
            .lock()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| (d.as_secs_f64() * 100.0).round() / 100.0)
    }

    fn started_unix(&self) -> u64 {
        self.started
            .lock()
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
            "body_digests": self.digests.lock().iter().collect::<Vec<_>>(),
            "forwarded_for": *self.forwarded_for.lock(),
            "traceparent": *self.traceparent.lock(),
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
        data.extend(self.loras.lock().iter().map(|(n, p)| {
            json!({"id": n, "object": "model", "created": created, "owned_by": "vllm",
                   "root": p, "parent": self.model_name(), "max_model_len": max_len})
        }));
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
        let mut rng = self.rng.lock();
        // σ so that p99 ≈ 6.7 × median (median 150, p99 1000 in the spec).
        let factor = scheduler::jitter(&mut *rng, 0.816);
        ((self.args.output_len_median as f64 * factor).round() as usize).max(1)
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
        let frozen = self.frozen_metrics.lock().clone();
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
            ("POST", "/sim/kv-events") => self.kv_loss(&req.body),
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
