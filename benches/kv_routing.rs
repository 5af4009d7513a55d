//! Exact prefix routing on KV events against approximate affinity, load-only routing, an
//! oracle and vllm-router's `cache_aware`, on a prefix-heavy workload whose prefixes
//! overflow one replica's KV cache (in the spirit of llm-d's precise-prefix benchmark,
//! scaled to this machine):
//!
//! - 4 equal simulated replicas (A100 profile, 32 sequences, 40,000 KV tokens each,
//!   prefix caching on), each publishing vLLM's KV events and tokenizing with the
//!   fixture tokenizer (`tests/fixtures/tiny-tokenizer`), as the gateway does;
//! - `KV_TENANTS` tenants (default 40), each with its own system prompt of about 3,000
//!   tokens (120,000 in all: three replicas' worth, three quarters of the fleet's), and 3
//!   users per tenant holding multi-turn conversations (each turn resends the system
//!   prompt and the history, plus a new question); user sessions start as a Poisson
//!   process at `KV_LOAD` (default 0.7) of the fleet's capacity without any cache, think
//!   0.5 s on average between turns.
//!
//! Routers: vllm-edge `least-request`, `vllm` without affinity, `vllm` with approximate
//! affinity, `vllm` with KV events (`+kv`), vllm-router `cache_aware`, and an oracle: a
//! client-side router that asks each engine, for every request, how much of its prompt
//! it holds at that moment (the simulator's own cache, no lag) and picks the lowest of
//! `uncached prompt + prefill it sent there that has not started + 2,000 per request over
//! the batch limit` (tokens). The oracle sends straight to the replica (no proxy hop).
//! Each through 1 and 3 instances (a user's consecutive turns cross instances).
//!
//! Reported: TTFT p50/p90/p99 (requests sent after `KV_WARMUP` seconds; a fresh fleet must
//! compute every system prompt once whatever the router), the engines' own prefix-cache
//! hit rate (their `/metrics`, in tokens), throughput, errors, and for 3 vllm-edge
//! instances the agreement: every 250 ms the same request is asked of the three
//! (`/explain`) and the share of probes where all three choose the same replica.
//!
//! Run: `benches/kv-routing.sh`. Environment: `KV_SECONDS` (arrival window, default 40),
//! `KV_LOAD`, `KV_TENANTS`, `KV_WARMUP` (default 10), `KV_SEED` (default 42), `KV_ROUTERS`
//! (semicolon-separated labels), `KV_INSTANCES` (comma-separated, default `1,3`),
//! `VLLM_ROUTER` (its binary; skipped when missing), `RQ_BASELINE` (another vllm-edge
//! binary, the `baseline + KV events` router).

mod common;

use common::{
    ask, capacity_no_cache, client, engine_loads, pct, replica, start_router_with, text, wait_idle,
    KV_TOKENS, MAX_NUM_SEQS,
};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vllm_edge::sim::{self, SimHandle};
use vllm_edge::tokenize::{Prompt, Tokenizer};

const REPLICAS: usize = 4;
const MAX_MODEL_LEN: usize = 8192;
const USERS_PER_TENANT: usize = 3;
const TURNS: usize = 4;
const SYSTEM_WORDS: usize = 1500;
const QUESTION_WORDS: usize = 60;
const OUTPUT: usize = 40;
/// Tokens one request over the batch limit costs the oracle (a queue place).
const ORACLE_QUEUE_PLACE: usize = 2000;

fn tokenizer_dir() -> String {
    format!(
        "{}/tests/fixtures/tiny-tokenizer",
        env!("CARGO_MANIFEST_DIR")
    )
}

async fn fleet() -> Vec<SimHandle> {
    let mut sims = Vec::new();
    for i in 0..REPLICAS {
        let mut a = replica(i, MAX_MODEL_LEN);
        a.kv_events_port = Some(0);
        a.tokenizer = Some(tokenizer_dir().into());
        sims.push(sim::spawn(a).await.unwrap());
    }
    sims
}

/// The oracle: per replica, its URL, its engine, and the oracle's own requests there
/// (outstanding, and prompt tokens not yet prefilled).
struct Oracle {
    sims: Vec<(String, Arc<vllm_edge::sim::engine::Engine>)>,
    tokenizer: Tokenizer,
    outstanding: Mutex<Vec<(usize, usize)>>,
}

impl Oracle {
    /// The replica for `messages` and the uncached tokens it will prefill there.
    async fn pick(&self, messages: &[Value]) -> (usize, usize) {
        let ids = self
            .tokenizer
            .tokens(Prompt::Chat(&Value::Array(messages.to_vec())))
            .unwrap_or_default();
        let mut cached = Vec::new();
        for (_, engine) in &self.sims {
            cached.push(engine.cached_tokens(ids.clone()).await);
        }
        let out = self.outstanding.lock();
        let (mut best, mut best_cost) = (0, usize::MAX);
        for (i, c) in cached.iter().enumerate() {
            let (n, pending) = out[i];
            let cost = ids.len().saturating_sub(*c)
                + pending
                + ORACLE_QUEUE_PLACE * (n + 1).saturating_sub(MAX_NUM_SEQS);
            if cost < best_cost {
                (best, best_cost) = (i, cost);
            }
        }
        (best, ids.len().saturating_sub(cached[best]))
    }
}

#[derive(Default)]
struct Outcome {
    ttft: Vec<(f64, f64)>,
    errors: usize,
}

impl Outcome {
    fn ttft(&self, from: f64, q: f64) -> f64 {
        let mut v: Vec<f64> = self
            .ttft
            .iter()
            .filter(|(s, _)| *s >= from)
            .map(|(_, t)| *t)
            .collect();
        pct(&mut v, q)
    }
}

/// Where a request goes: a router instance, or the oracle.
#[derive(Clone)]
enum Target {
    Routers(Vec<String>),
    Oracle(Arc<Oracle>),
}

/// One turn: through the router instance of `(user + turn)`, or the oracle's pick.
async fn send(
    target: &Target,
    client: &reqwest::Client,
    key: usize,
    messages: &[Value],
) -> Option<(f64, String)> {
    match target {
        Target::Routers(urls) => ask(client, &urls[key % urls.len()], messages, OUTPUT)
            .await
            .map(|(t, reply, _)| (t, reply)),
        Target::Oracle(o) => {
            let (i, uncached) = o.pick(messages).await;
            {
                let mut out = o.outstanding.lock();
                out[i].0 += 1;
                out[i].1 += uncached;
            }
            let url = format!("{}/v1/chat/completions", o.sims[i].0);
            // The pending prefill ends with the first token; the request with the answer.
            let r = ask(client, &url, messages, OUTPUT).await;
            let mut out = o.outstanding.lock();
            out[i].0 -= 1;
            out[i].1 -= uncached;
            r.map(|(t, reply, _)| (t, reply))
        }
    }
}

/// The whole workload: user sessions starting at `rate` per second for `seconds`.
async fn run(target: Target, rate: f64, seconds: f64, seed: u64, tenants: usize) -> (Outcome, f64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let client = client();
    let systems: Arc<Vec<String>> = Arc::new(
        (0..tenants)
            .map(|g| text(&format!("tenant{g}"), SYSTEM_WORDS, g))
            .collect(),
    );
    let start = Instant::now();
    let mut tasks = Vec::new();
    let mut t = 0.0;
    let mut session = 0usize;
    while t < seconds {
        t += -rng.gen_range(f64::MIN_POSITIVE..1.0f64).ln() / rate;
        let tenant = rng.gen_range(0..tenants);
        let user = rng.gen_range(0..USERS_PER_TENANT);
        let think: Vec<f64> = (0..TURNS)
            .map(|_| -rng.gen_range(f64::MIN_POSITIVE..1.0f64).ln() * 0.5)
            .collect();
        let (client, target, systems) = (client.clone(), target.clone(), systems.clone());
        let at = start + Duration::from_secs_f64(t);
        let s = session;
        session += 1;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let mut history = vec![json!({"role": "system", "content": systems[tenant]})];
            let mut results = Vec::new();
            for (turn, pause) in think.iter().enumerate() {
                let q = text(&format!("u{tenant}.{user}s{s}t{turn}"), QUESTION_WORDS, s);
                history.push(json!({"role": "user", "content": q}));
                let sent = start.elapsed().as_secs_f64();
                match send(&target, &client, s + turn, &history).await {
                    Some((ttft, reply)) => {
                        results.push(Some((sent, ttft)));
                        history.push(json!({"role": "assistant", "content": reply}));
                    }
                    None => {
                        results.push(None);
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_secs_f64(*pause)).await;
            }
            results
        }));
    }
    let mut out = Outcome::default();
    for task in tasks {
        for r in task.await.unwrap_or_default() {
            match r {
                Some(x) => out.ttft.push(x),
                None => out.errors += 1,
            }
        }
    }
    (out, start.elapsed().as_secs_f64())
}

/// Every 250 ms until `stop`, the same request asked of every admin API (`/explain`):
/// the share of probes where all chose the same replica.
async fn agreement(
    admins: Vec<String>,
    tenants: usize,
    stop: Arc<tokio::sync::Notify>,
) -> (usize, usize) {
    let client = reqwest::Client::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (mut same, mut probes) = (0, 0);
    loop {
        tokio::select! {
            _ = stop.notified() => return (same, probes),
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let g = rng.gen_range(0..tenants);
        let body = json!({"model": "m", "max_tokens": OUTPUT, "messages": [
            {"role": "system", "content": text(&format!("tenant{g}"), SYSTEM_WORDS, g)},
            {"role": "user", "content": text("probe", QUESTION_WORDS, g)}]});
        let mut chosen = Vec::new();
        for a in &admins {
            let v: Option<Value> = match client
                .post(format!("http://{a}/explain"))
                .json(&body)
                .send()
                .await
            {
                Ok(r) => r.json().await.ok(),
                Err(_) => None,
            };
            chosen.push(v.map(|v| v["choice"]["backend"].clone()));
        }
        probes += 1;
        if chosen.iter().all(|c| c.is_some() && *c == chosen[0]) {
            same += 1;
        }
    }
}

async fn hits(sims: &[SimHandle]) -> (f64, f64) {
    engine_loads(sims)
        .await
        .iter()
        .fold((0.0, 0.0), |(h, q), l| {
            (
                h + l.prefix_hits.unwrap_or(0.0),
                q + l.prefix_queries.unwrap_or(0.0),
            )
        })
}

#[tokio::main]
async fn main() {
    let env = |k: &str| std::env::var(k).ok();
    let num = |k: &str, d: f64| env(k).and_then(|s| s.parse().ok()).unwrap_or(d);
    let seconds = num("KV_SECONDS", 40.0);
    let load = num("KV_LOAD", 0.7);
    let warmup = num("KV_WARMUP", 10.0);
    let seed = num("KV_SEED", 42.0) as u64;
    let tenants = num("KV_TENANTS", 40.0) as usize;
    let instances: Vec<usize> = env("KV_INSTANCES")
        .unwrap_or_else(|| "1,3".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let all = [
        ("least-request", "vllm-edge least-request"),
        ("vllm, no affinity", "vllm-edge vllm+noaffinity"),
        ("vllm + approximate affinity", "vllm-edge vllm"),
        ("vllm + KV events", "vllm-edge vllm+kv"),
        // Another build's KV-event routing, for a before/after in one run ($RQ_BASELINE).
        ("baseline + KV events", "baseline vllm+kv"),
        ("oracle", "oracle"),
        ("vllm-router cache_aware", "vllm-router cache_aware"),
    ];
    let only = env("KV_ROUTERS");
    let routers: Vec<(&str, &str)> = all
        .iter()
        .copied()
        .filter(|(l, _)| {
            only.as_ref()
                .is_none_or(|o| o.split(';').any(|x| x.trim() == *l))
        })
        .collect();

    // Load as a fraction of the fleet's capacity without a prefix cache, in the
    // tokenizer's tokens.
    let tok = Tokenizer::load(std::path::Path::new(&tokenizer_dir())).unwrap();
    let per_word = tok.encode(&text("tenant0", 1000, 0), false).unwrap().len() as f64 / 1000.0;
    let prompt = ((SYSTEM_WORDS + (TURNS / 2) * (QUESTION_WORDS + OUTPUT) + QUESTION_WORDS) as f64
        * per_word) as usize;
    let rate =
        load * REPLICAS as f64 * capacity_no_cache(prompt, OUTPUT, MAX_MODEL_LEN) / TURNS as f64;
    println!(
        "Fleet: {REPLICAS} simulated replicas (A100 profile, {MAX_NUM_SEQS} sequences, \
         {KV_TOKENS} KV tokens each, prefix caching on, KV events published); {tenants} \
         tenants with {:.0}-token system prompts ({:.0} tokens in all), {USERS_PER_TENANT} users \
         each, {TURNS}-turn sessions starting at {rate:.2}/s for {seconds} s ({:.0}% of the \
         no-cache capacity; a mean prompt of {prompt} tokens).\n",
        SYSTEM_WORDS as f64 * per_word,
        tenants as f64 * SYSTEM_WORDS as f64 * per_word,
        load * 100.0
    );
    println!("| router | instances | requests | errors | prefix-cache hit rate | TTFT p50 (s) | TTFT p90 (s) | TTFT p99 (s) | throughput (req/s) | gateways agree |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &n in &instances {
        for (label, name) in &routers {
            if *name == "oracle" && n > 1 {
                continue;
            }
            let sims = fleet().await;
            let backends: Vec<String> = sims.iter().map(|s| s.url()).collect();
            let kv: Vec<String> = sims
                .iter()
                .map(|s| {
                    let p = s.sim.kv_events.as_ref().unwrap();
                    format!(
                        "    kv_events: tcp://{}\n    kv_events_replay: tcp://{}\n",
                        p.endpoint, p.replay
                    )
                })
                .collect();
            let (extra, routing) = if name.ends_with("+kv") {
                (kv, format!("  tokenizers:\n    m: {}\n", tokenizer_dir()))
            } else {
                (Vec::new(), String::new())
            };
            let mut started = Vec::new();
            let target = if *name == "oracle" {
                Target::Oracle(Arc::new(Oracle {
                    sims: sims
                        .iter()
                        .map(|s| (s.url(), s.sim.engine().clone()))
                        .collect(),
                    tokenizer: Tokenizer::load(std::path::Path::new(&tokenizer_dir())).unwrap(),
                    outstanding: Mutex::new(vec![(0, 0); REPLICAS]),
                }))
            } else {
                for _ in 0..n {
                    if let Some(r) = start_router_with(name, &backends, &extra, &routing).await {
                        started.push(r);
                    }
                }
                if started.len() < n {
                    eprintln!("skipping {label}");
                    continue;
                }
                Target::Routers(started.iter().map(|r| r.url.clone()).collect())
            };
            wait_idle(&sims).await;
            let (h0, q0) = hits(&sims).await;
            let admins: Vec<String> = started.iter().filter_map(|r| r.admin.clone()).collect();
            let stop = Arc::new(tokio::sync::Notify::new());
            let probe = (n > 1 && admins.len() == n)
                .then(|| tokio::spawn(agreement(admins, tenants, stop.clone())));
            let (out, wall) = run(target, rate, seconds, seed, tenants).await;
            stop.notify_one();
            let agree = match probe {
                Some(p) => p
                    .await
                    .ok()
                    .map(|(s, p)| format!("{:.0}% of {p}", 100.0 * s as f64 / p.max(1) as f64)),
                None => None,
            };
            let (h1, q1) = hits(&sims).await;
            for mut r in started {
                let _ = r.child.kill().await;
            }
            for s in &sims {
                s.stop();
            }
            println!(
                "| {label} | {n} | {} | {} | {:.1}% | {:.3} | {:.3} | {:.3} | {:.2} | {} |",
                out.ttft.iter().filter(|(s, _)| *s >= warmup).count(),
                out.errors,
                100.0 * (h1 - h0) / (q1 - q0).max(1.0),
                out.ttft(warmup, 0.5),
                out.ttft(warmup, 0.9),
                out.ttft(warmup, 0.99),
                out.ttft.len() as f64 / wall,
                agree.unwrap_or_else(|| "-".into()),
            );
        }
    }
}
