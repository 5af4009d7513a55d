//! What the fleet benchmarks share: routers in front of a simulated fleet as child
//! processes (vllm-edge with a policy, nginx `least_conn`, vllm-router), percentiles, and
//! waiting for the fleet to drain.

#![allow(dead_code)]

use futures_util::StreamExt;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use vllm_edge::sim::scheduler::{simulate, PerfModel, SchedulerConfig, TraceRequest};
use vllm_edge::sim::{Preset, SimArgs, SimHandle};

/// vLLM's `--max-num-seqs` of the simulated replicas.
pub const MAX_NUM_SEQS: usize = 32;
/// KV-cache tokens of each simulated replica.
pub const KV_TOKENS: usize = 40_000;
/// Tokens per scheduler step (`--max-num-batched-tokens`).
pub const BUDGET: usize = 2048;

/// Simulated replica `i` of a benchmark fleet: model `m`, the A100 profile, the limits
/// above, seeded by its index, named `r{i}`.
pub fn replica(i: usize, max_model_len: usize) -> SimArgs {
    let mut a = SimArgs::defaults();
    a.port = 0;
    a.models = vec!["m".into()];
    a.preset = Preset::Llama3A100;
    a.max_num_seqs = Some(MAX_NUM_SEQS);
    a.kv_tokens = Some(KV_TOKENS);
    a.max_num_batched_tokens = Some(BUDGET);
    a.max_model_len = Some(max_model_len);
    a.seed = i as u64;
    a.name = Some(format!("r{i}"));
    a
}

pub fn pct(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub async fn wait_port(addr: SocketAddr) -> bool {
    for _ in 0..600 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A router in front of the fleet, as a child process; `url` is its chat endpoint.
pub struct Router {
    pub child: Child,
    pub url: String,
    /// vllm-edge's admin address (`/load-stats`), from its ready line.
    pub admin: Option<String>,
    _dir: tempfile::TempDir,
}

pub async fn start_router(name: &str, backends: &[String]) -> Option<Router> {
    start_router_with(name, backends, &[], "").await
}

/// [`start_router`], for vllm-edge with more YAML: `backend_extra[i]` under backend `i`
/// (indented lines, e.g. its `kv_events`), `routing_extra` under `routing:`.
pub async fn start_router_with(
    name: &str,
    backends: &[String],
    backend_extra: &[String],
    routing_extra: &str,
) -> Option<Router> {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut admin = None;
    // "baseline POLICY": the vllm-edge binary at $RQ_BASELINE (another build, for a
    // before/after in one run), else this build.
    let (bin, gateway) = match name.strip_prefix("baseline ") {
        Some(policy) => (std::env::var("RQ_BASELINE").ok()?, Some(policy)),
        None => (
            env!("CARGO_BIN_EXE_vllm-edge").to_string(),
            name.strip_prefix("vllm-edge "),
        ),
    };
    let child = if let Some(policy) = gateway {
        // "vllm-edge vllm+cap": the operator told the gateway vLLM's --max-num-seqs;
        // "+noaffinity": prefix affinity off; "+noplacement": affinity without placing
        // long-lived prefixes against their homes' KV caches.
        let policy = policy.strip_suffix("+kv").unwrap_or(policy);
        let (policy, affinity) = match (
            policy.strip_suffix("+noaffinity"),
            policy.strip_suffix("+noplacement"),
        ) {
            (Some(p), _) => (p, "  affinity:\n    enabled: false\n"),
            (_, Some(p)) => (p, "  affinity:\n    kv_share: 0\n"),
            _ => (policy, ""),
        };
        let (policy, cap) = match policy.strip_suffix("+cap") {
            Some(p) => (p, format!("    max_concurrent_requests: {MAX_NUM_SEQS}\n")),
            None => (policy, String::new()),
        };
        let mut yaml = format!(
            "listeners:\n  - address: 127.0.0.1:{port}\nadmin:\n  address: 127.0.0.1:0\nrouting:\n  policy: {policy}\n{affinity}{routing_extra}server:\n  threads: 1\n  grace_period: 0s\nbackends:\n"
        );
        // Named as the replicas name themselves: a backend's name is its identity for
        // prefix affinity, so every run and every gateway splits keys the same way (by
        // default the name is host:port, and the ports change from run to run).
        for (i, b) in backends.iter().enumerate() {
            yaml.push_str(&format!("  - name: r{i}\n    url: {b}\n{cap}"));
            if let Some(extra) = backend_extra.get(i) {
                yaml.push_str(extra);
            }
        }
        let conf = dir.path().join("gw.yaml");
        std::fs::write(&conf, yaml).unwrap();
        let mut child = Command::new(&bin)
            .args(["run", "-c"])
            .arg(&conf)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .ok()?;
        let mut lines = BufReader::new(child.stdout.take()?).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            if l.contains("\"ready\"") {
                admin = serde_json::from_str::<serde_json::Value>(&l)
                    .ok()
                    .and_then(|v| v["admin"].as_str().map(str::to_string));
                break;
            }
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        child
    } else if name == "nginx least_conn" {
        let nginx = std::env::var("NGINX").unwrap_or_else(|_| "/usr/sbin/nginx".into());
        if !PathBuf::from(&nginx).exists() {
            return None;
        }
        let servers: String = backends
            .iter()
            .map(|b| format!("server {};", b.trim_start_matches("http://")))
            .collect();
        let conf = format!(
            "worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/error.log;\n\
             events {{ worker_connections 8192; }}\n\
             http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d};\n\
               upstream fleet {{ least_conn; {servers} keepalive 256; }}\n\
               server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://fleet; proxy_http_version 1.1;\n\
                 proxy_set_header Connection \"\"; proxy_buffering off; proxy_read_timeout 600s; }} }} }}\n",
            d = dir.path().display()
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        Command::new(nginx)
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .ok()?
    } else if let Some(policy) = name.strip_prefix("vllm-router ") {
        let bin = std::env::var("VLLM_ROUTER").ok()?;
        if !PathBuf::from(&bin).exists() {
            return None;
        }
        Command::new(bin)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--policy",
                policy,
                "--log-level",
                "warning",
                // Its metrics port defaults to a fixed 29000: one per instance.
                "--prometheus-port",
                &free_port().to_string(),
                "--worker-urls",
            ])
            .args(backends)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .ok()?
    } else {
        return None;
    };
    if !wait_port(addr).await {
        eprintln!("{name}: did not start");
        return None;
    }
    // Ready when a request goes through.
    let url = format!("http://{addr}/v1/chat/completions");
    let probe = serde_json::json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]});
    // A gateway that checks keys (the benches' keys files list `sk-anon`).
    let key = if routing_extra.contains("api_keys_file") {
        "Bearer sk-anon"
    } else {
        ""
    };
    for _ in 0..200 {
        let mut req = reqwest::Client::new().post(&url).json(&probe);
        if !key.is_empty() {
            req = req.header("authorization", key);
        }
        if let Ok(r) = req.send().await {
            if r.status().is_success() {
                return Some(Router {
                    child,
                    url,
                    admin,
                    _dir: dir,
                });
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("{name}: never answered");
    None
}

pub async fn wait_idle(sims: &[SimHandle]) {
    for _ in 0..1200 {
        if sims.iter().all(|s| {
            let st = s.sim.state();
            st["running"] == 0 && st["waiting"] == 0
        }) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A replica's `/metrics` payload.
pub async fn metrics_payload(sim: &SimHandle) -> Vec<u8> {
    let resp = reqwest::get(format!("{}/metrics", sim.url()))
        .await
        .unwrap();
    resp.bytes().await.unwrap().to_vec()
}

/// Every replica's `/metrics`, parsed as the gateway parses it.
pub async fn engine_loads(sims: &[SimHandle]) -> Vec<vllm_edge::engine::metrics::EngineLoad> {
    let mut out = Vec::new();
    for s in sims {
        let body = metrics_payload(s).await;
        out.push(vllm_edge::engine::metrics::parse(&body, 8 << 20).unwrap());
    }
    out
}

// -----------------------------------------------------------------------------------------
// The routing workload (routing_quality, routing_bound)
// -----------------------------------------------------------------------------------------

/// Speed factors of the heterogeneous fleet: three replicas at full speed, one at half.
pub const SPEEDS: [f64; 4] = [1.0, 1.0, 1.0, 0.5];

/// The scheduler of a routing-workload replica at `speed` (what [`replica`] runs).
pub fn sched_config(speed: f64) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: MAX_NUM_SEQS,
        max_num_batched_tokens: BUDGET,
        block_size: 16,
        kv_tokens: KV_TOKENS,
        enable_prefix_caching: true,
        max_model_len: 4096,
        perf: PerfModel::LLAMA3_8B_A100,
        speed_factor: speed,
        max_loras: 0,
    }
}

/// ShareGPT-like lengths (docs/simulator.md, workloads): lognormal, input median 100
/// and p99 ~1000, output median 150 and p99 ~1000; 4..1024 each, at most 2048 together.
pub fn lengths(rng: &mut impl Rng) -> (usize, usize) {
    let mut lognormal = |median: f64, p99: f64| {
        let sigma = (p99 / median).ln() / 2.326;
        median * vllm_edge::sim::scheduler::jitter(rng, sigma)
    };
    let p = (lognormal(100.0, 1000.0) as usize).clamp(4, 1024);
    let o = (lognormal(150.0, 1000.0) as usize)
        .clamp(4, 1024)
        .min(2048 - p);
    (p, o)
}

/// Requests per second one replica completes when saturated with this workload,
/// measured on the scheduler's virtual clock.
pub fn capacity(speed: f64) -> f64 {
    capacity_of(sched_config(speed))
}

/// [`capacity`] of a replica scheduled by `cfg`.
pub fn capacity_of(cfg: SchedulerConfig) -> f64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let trace: Vec<TraceRequest> = (0..3000)
        .map(|i| {
            let (p, o) = lengths(&mut rng);
            TraceRequest {
                arrival_s: 0.0,
                prompt: (0..p as u32).map(|t| t ^ (i << 12)).collect(),
                output_tokens: o,
            }
        })
        .collect();
    let r = simulate(cfg, &trace, 1);
    trace.len() as f64 / r.duration_s
}

/// Capacity of the whole [`SPEEDS`] fleet, in requests per second.
pub fn fleet_capacity() -> f64 {
    SPEEDS.iter().map(|&s| capacity(s)).sum()
}

/// Open-loop Poisson arrivals at `rate` per second for `seconds`: (arrival in seconds,
/// prompt tokens, output tokens), the same for a given seed.
pub fn arrivals(rate: f64, seconds: f64, seed: u64) -> Vec<(f64, usize, usize)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = 0.0;
    let mut out = Vec::new();
    while t < seconds {
        t += -rng.gen_range(f64::MIN_POSITIVE..1.0f64).ln() / rate;
        let (p, o) = lengths(&mut rng);
        out.push((t, p, o));
    }
    out
}

/// One streamed chat request: its TTFT, the reply's text and the backend that served it.
pub async fn ask(
    client: &reqwest::Client,
    url: &str,
    messages: &[Value],
    max_tokens: usize,
) -> Option<(f64, String, String)> {
    let body = json!({"model": "m", "stream": true, "ignore_eos": true,
                      "max_tokens": max_tokens, "messages": messages});
    let r = stream_once(client.post(url).json(&body)).await.ok()?;
    r.ttft.is_finite().then_some((r.ttft, r.reply, r.backend))
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap()
}

// -----------------------------------------------------------------------------------------
// Prefix workloads (affinity, kv_routing)
// -----------------------------------------------------------------------------------------

/// Three-letter words: with the space, 4 bytes per (simulated) token, the density of
/// English text that the gateway assumes when it estimates tokens from bytes.
pub const WORDS: [&str; 12] = [
    "ant", "bee", "cat", "dog", "elk", "fox", "gnu", "hen", "owl", "pig", "rat", "yak",
];

/// `n` words, distinct for each `tag` (its first word), so unrelated texts share no prefix.
pub fn text(tag: &str, n: usize, salt: usize) -> String {
    let mut s = format!("{tag} ");
    for k in 1..n {
        s.push_str(WORDS[(k * 7 + salt * 13 + k / 5) % WORDS.len()]);
        s.push(' ');
    }
    s
}

/// Requests per second one replica (A100 profile, the benches' batch limits) completes,
/// saturated, with prompts of `prompt` tokens and `output` tokens out, and no prefix
/// cache (the scheduler's virtual clock).
pub fn capacity_no_cache(prompt: usize, output: usize, max_model_len: usize) -> f64 {
    let cfg = SchedulerConfig {
        max_num_seqs: MAX_NUM_SEQS,
        max_num_batched_tokens: BUDGET,
        block_size: 16,
        kv_tokens: KV_TOKENS,
        enable_prefix_caching: false,
        max_model_len,
        perf: PerfModel::LLAMA3_8B_A100,
        speed_factor: 1.0,
        max_loras: 0,
    };
    let trace: Vec<TraceRequest> = (0..2000u32)
        .map(|i| TraceRequest {
            arrival_s: 0.0,
            prompt: (0..prompt as u32).map(|t| t ^ (i << 13)).collect(),
            output_tokens: output,
        })
        .collect();
    trace.len() as f64 / simulate(cfg, &trace, 1).duration_s
}

/// A streamed chat answer as the benchmark clients read it.
pub struct Streamed {
    /// To the first event with content (NaN when none came).
    pub ttft: f64,
    /// To the end of the stream.
    pub e2e: f64,
    /// Events with content (one token each from vLLM and the simulator).
    pub tokens: u64,
    /// The reply's text.
    pub reply: String,
    /// `x-sim-replica` of the answer (`?` without), and `x-vllm-edge-backend` (`-`).
    pub replica: String,
    pub backend: String,
}

/// Sends `req` (a streaming request) and reads its answer event by event to the end:
/// `Err(status)` for an answer other than 200 (0: no answer, or a stream cut before
/// `[DONE]`).
pub async fn stream_once(req: reqwest::RequestBuilder) -> Result<Streamed, u16> {
    let sent = Instant::now();
    let resp = req.send().await.map_err(|_| 0u16)?;
    if resp.status() != 200 {
        return Err(resp.status().as_u16());
    }
    let header = |name: &str, absent: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(absent)
            .to_string()
    };
    let (replica, backend) = (
        header("x-sim-replica", "?"),
        header("x-vllm-edge-backend", "-"),
    );
    let (mut ttft, mut tokens, mut reply, mut done) = (None, 0u64, String::new(), false);
    let mut pending = String::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        pending.push_str(&String::from_utf8_lossy(&chunk.map_err(|_| 0u16)?));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(data).map_err(|_| 0u16)?;
            if let Some(piece) = v["choices"][0]["delta"]["content"].as_str() {
                if !piece.is_empty() {
                    ttft.get_or_insert_with(|| sent.elapsed().as_secs_f64());
                    tokens += 1;
                }
                reply.push_str(piece);
            }
        }
    }
    if !done {
        return Err(0);
    }
    Ok(Streamed {
        ttft: ttft.unwrap_or(f64::NAN),
        e2e: sent.elapsed().as_secs_f64(),
        tokens,
        reply,
        replica,
        backend,
    })
}
