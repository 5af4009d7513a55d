//! Prefix-cache affinity on a simulated fleet of 4 equal replicas (prefix caching on),
//! driven through one router and through three router instances (requests spread across
//! them, so consecutive turns of a conversation cross instances):
//!
//! - multi-turn chat: conversations start as a Poisson process; each has 5 turns, every
//!   turn resending the whole history (a short shared system prompt, earlier questions and
//!   answers) plus a new question, after the previous answer;
//! - shared system prompt (`generated-shared-prefix`-like): 64 groups, each with its own
//!   system prompt of 1,200 tokens, and unique 60-token questions; Poisson arrivals. The
//!   64 prompts (77k tokens) do not fit in one replica's KV cache (40k), a quarter of
//!   them do.
//!
//! Reported per configuration: the replicas' prefix-cache hit rate (from their
//! `/metrics`, in tokens), TTFT p50/p99 and throughput. Each run gets a fresh fleet (empty
//! caches) and the same schedule. TTFT p50/p99 is also given for the requests sent after
//! a warm-up (`AF_WARMUP` seconds): a fresh fleet must compute every system prompt once
//! whatever the policy, and in the shared-prefix workload those first requests (64 cold
//! 1,200-token prefills, about a tenth of a 30 s run) set the p99 of every configuration.
//!
//! Run: `benches/affinity.sh` (installs vllm-router, then runs this). Environment:
//! `VLLM_ROUTER` (path; skipped when missing), `AF_SECONDS` (arrival window, default 30),
//! `AF_LOAD` (fraction of the no-cache capacity, default 0.7), `AF_ROUTERS`
//! (semicolon-separated subset of the router names: some names have commas), `AF_WORKLOADS` (`chat`, `shared`),
//! `AF_SEED` (the arrival schedule's seed, default 42), `AF_WARMUP` (seconds, default 15),
//! `AF_TRACE` (a file to append one line per answered request to: workload, router,
//! instances, sent, TTFT, group, turn, backend).

mod common;

use common::{
    ask, capacity_no_cache, client, engine_loads, pct, replica, start_router, text, wait_idle,
    KV_TOKENS, MAX_NUM_SEQS,
};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::time::{Duration, Instant};
use vllm_edge::sim::{self, SimHandle};

const REPLICAS: usize = 4;
const MAX_MODEL_LEN: usize = 8192;

const TURNS: usize = 5;
const QUESTION_WORDS: usize = 120;
const CHAT_OUTPUT: usize = 80;
const GROUPS: usize = 64;
const SYSTEM_WORDS: usize = 1200;
const SHARED_QUESTION_WORDS: usize = 60;
const SHARED_OUTPUT: usize = 80;

async fn fleet() -> Vec<SimHandle> {
    let mut sims = Vec::new();
    for i in 0..REPLICAS {
        let a = replica(i, MAX_MODEL_LEN);
        sims.push(sim::spawn(a).await.unwrap());
    }
    sims
}

/// Prefix-cache (hits, queries) in tokens, summed over the fleet.
async fn prefix_cache(sims: &[SimHandle]) -> (f64, f64) {
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

#[derive(Default)]
struct Outcome {
    /// (sent, seconds after the run's start; TTFT)
    ttft: Vec<(f64, f64)>,
    errors: usize,
    /// One line per answered request for `AF_TRACE`: sent, TTFT, the prompt's group (the
    /// system prompt's, or the conversation's), the turn, and the backend that served it
    /// (vllm-edge's `x-vllm-edge-backend`; `-` for other routers).
    trace: Vec<String>,
}

impl Outcome {
    /// TTFT quantile `q` of the requests sent at or after `from` seconds.
    fn ttft(&self, from: f64, q: f64) -> f64 {
        let mut v: Vec<f64> = self
            .ttft
            .iter()
            .filter(|(sent, _)| *sent >= from)
            .map(|(_, t)| *t)
            .collect();
        pct(&mut v, q)
    }
}

/// Multi-turn chat: conversations arrive at `rate` per second for `seconds`; turn `t` of
/// conversation `c` goes to router instance `(c + t) % urls.len()`.
async fn chat(urls: &[String], rate: f64, seconds: f64, seed: u64) -> (Outcome, usize, f64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let client = client();
    let system = "You are a helpful assistant. Answer briefly and to the point.";
    let start = Instant::now();
    let mut tasks = Vec::new();
    let (mut t, mut c) = (0.0, 0usize);
    while t < seconds {
        t += -rng.gen_range(f64::MIN_POSITIVE..1.0f64).ln() / rate;
        let think: Vec<f64> = (0..TURNS)
            .map(|_| -rng.gen_range(f64::MIN_POSITIVE..1.0f64).ln() * 0.5)
            .collect();
        let (client, urls) = (client.clone(), urls.to_vec());
        let at = start + Duration::from_secs_f64(t);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let mut history = vec![json!({"role": "system", "content": system})];
            let mut results = Vec::new();
            for (turn, pause) in think.iter().enumerate() {
                let question = text(&format!("conversation{c}turn{turn}"), QUESTION_WORDS, c);
                history.push(json!({"role": "user", "content": question}));
                let url = &urls[(c + turn) % urls.len()];
                let sent = start.elapsed().as_secs_f64();
                match ask(&client, url, &history, CHAT_OUTPUT).await {
                    Some((ttft, reply, backend)) => {
                        results.push(Some((
                            sent,
                            ttft,
                            format!("{sent:.3} {ttft:.4} c{c} {turn} {backend}"),
                        )));
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
        c += 1;
    }
    let mut out = Outcome::default();
    let mut n = 0;
    for task in tasks {
        for r in task.await.unwrap_or_default() {
            n += 1;
            match r {
                Some((sent, ttft, line)) => {
                    out.ttft.push((sent, ttft));
                    out.trace.push(line);
                }
                None => out.errors += 1,
            }
        }
    }
    (out, n, start.elapsed().as_secs_f64())
}

/// Shared system prompts: requests arrive at `rate` per second; request `i` goes to router
/// instance `i % urls.len()`.
async fn shared(urls: &[String], rate: f64, seconds: f64, seed: u64) -> (Outcome, usize, f64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let client = client();
    let systems: Vec<String> = (0..GROUPS)
        .map(|g| text(&format!("group{g}"), SYSTEM_WORDS, g))
        .collect();
    let start = Instant::now();
    let mut tasks = Vec::new();
    let mut t = 0.0;
    while t < seconds {
        t += -rng.gen_range(f64::MIN_POSITIVE..1.0f64).ln() / rate;
        let i = tasks.len();
        let g = rng.gen_range(0..GROUPS);
        let messages = vec![
            json!({"role": "system", "content": systems[g]}),
            json!({"role": "user", "content": text(&format!("question{i}"), SHARED_QUESTION_WORDS, i)}),
        ];
        let (client, url) = (client.clone(), urls[i % urls.len()].clone());
        let at = start + Duration::from_secs_f64(t);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let sent = start.elapsed().as_secs_f64();
            ask(&client, &url, &messages, SHARED_OUTPUT)
                .await
                .map(|(ttft, _, backend)| {
                    (sent, ttft, format!("{sent:.3} {ttft:.4} g{g} 0 {backend}"))
                })
        }));
    }
    let mut out = Outcome::default();
    let n = tasks.len();
    for task in tasks {
        match task.await.ok().flatten() {
            Some((sent, ttft, line)) => {
                out.ttft.push((sent, ttft));
                out.trace.push(line);
            }
            None => out.errors += 1,
        }
    }
    (out, n, start.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() {
    let env = |k: &str| std::env::var(k).ok();
    let seconds: f64 = env("AF_SECONDS")
        .and_then(|s| s.parse().ok())
        .unwrap_or(30.0);
    let load: f64 = env("AF_LOAD").and_then(|s| s.parse().ok()).unwrap_or(0.7);
    let seed: u64 = env("AF_SEED").and_then(|s| s.parse().ok()).unwrap_or(42);
    let warmup: f64 = env("AF_WARMUP")
        .and_then(|s| s.parse().ok())
        .unwrap_or(15.0);
    let all = [
        ("round-robin", "vllm-edge round-robin"),
        ("vllm, no affinity", "vllm-edge vllm+noaffinity"),
        ("vllm + affinity", "vllm-edge vllm"),
        (
            "vllm + affinity, no placement",
            "vllm-edge vllm+noplacement",
        ),
        ("affinity", "vllm-edge affinity"),
        ("vllm-router cache_aware", "vllm-router cache_aware"),
    ];
    let only = env("AF_ROUTERS");
    let routers: Vec<(&str, &str)> = all
        .iter()
        .copied()
        .filter(|(label, _)| {
            only.as_ref()
                .is_none_or(|o| o.split(';').any(|x| x.trim() == *label))
        })
        .collect();
    let workloads: Vec<String> = env("AF_WORKLOADS")
        .unwrap_or_else(|| "chat,shared".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();

    // Load as a fraction of what the fleet completes without any prefix cache.
    let chat_prompt = 15 + (TURNS / 2) * (QUESTION_WORDS + CHAT_OUTPUT) + QUESTION_WORDS;
    let chat_rate =
        load * REPLICAS as f64 * capacity_no_cache(chat_prompt, CHAT_OUTPUT, MAX_MODEL_LEN)
            / TURNS as f64;
    let shared_rate = load
        * REPLICAS as f64
        * capacity_no_cache(
            SYSTEM_WORDS + SHARED_QUESTION_WORDS,
            SHARED_OUTPUT,
            MAX_MODEL_LEN,
        );
    println!(
        "Fleet: {REPLICAS} equal simulated replicas (A100 profile, {MAX_NUM_SEQS} sequences, \
         {KV_TOKENS} KV tokens, prefix caching on); {seconds} s of arrivals per run at {:.0}% \
         of the no-cache capacity: chat {chat_rate:.2} conversations/s ({TURNS} turns), \
         shared prefix {shared_rate:.1} requests/s ({GROUPS} groups, {SYSTEM_WORDS}-token \
         system prompts).\n",
        load * 100.0
    );
    println!("| workload | router | instances | requests | errors | prefix-cache hit rate | TTFT p50 (s) | TTFT p99 (s) | after {warmup} s: requests | TTFT p50 (s) | TTFT p99 (s) | throughput (req/s) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for workload in &workloads {
        for instances in [1usize, 3] {
            for (label, name) in &routers {
                let sims = fleet().await;
                let backends: Vec<String> = sims.iter().map(|s| s.url()).collect();
                let mut started = Vec::new();
                for _ in 0..instances {
                    if let Some(r) = start_router(name, &backends).await {
                        started.push(r);
                    }
                }
                if started.len() < instances {
                    eprintln!("skipping {label}");
                    continue;
                }
                wait_idle(&sims).await;
                let (h0, q0) = prefix_cache(&sims).await;
                let urls: Vec<String> = started.iter().map(|r| r.url.clone()).collect();
                let (out, n, wall) = match workload.as_str() {
                    "chat" => chat(&urls, chat_rate, seconds, seed).await,
                    _ => shared(&urls, shared_rate, seconds, seed).await,
                };
                let (h1, q1) = prefix_cache(&sims).await;
                if let Some(path) = env("AF_TRACE") {
                    use std::io::Write;
                    let mut f = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .expect("AF_TRACE is writable");
                    for line in &out.trace {
                        writeln!(
                            f,
                            "{workload} {} {instances} {line}",
                            name.replace(' ', "_")
                        )
                        .expect("written");
                    }
                }
                for mut r in started {
                    let _ = r.child.kill().await;
                }
                for s in &sims {
                    s.stop();
                }
                println!(
                    "| {workload} | {label} | {instances} | {n} | {} | {:.1}% | {:.3} | {:.3} | {} | {:.3} | {:.3} | {:.2} |",
                    out.errors,
                    100.0 * (h1 - h0) / (q1 - q0).max(1.0),
                    out.ttft(0.0, 0.5),
                    out.ttft(0.0, 0.99),
                    out.ttft.iter().filter(|(sent, _)| *sent >= warmup).count(),
                    out.ttft(warmup, 0.5),
                    out.ttft(warmup, 0.99),
                    out.ttft.len() as f64 / wall,
                );
            }
        }
    }
}
