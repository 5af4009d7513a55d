//! Flow control on full simulated fleets, every router side by side in one run:
//! vllm-edge with flow control (`flow`), vllm-edge without it (`noflow`: the engines'
//! own first-come queues), and nginx `least_conn`.
//!
//! 1. **Noisy neighbour**: three replicas (A100 profile, 8 sequences each). Key A sends at
//!    twice the fleet's capacity, key B at a fifth of it, for `FC_SECONDS`; B also alone.
//!    Reported: B's TTFT p50/p99 alone and under the flood and its errors, A's completed
//!    requests and sheds (429/503), the fleet's throughput while full (tokens the engines
//!    generated per second from 5 s into the flood to its end), and the mean interval
//!    between slot releases the gateway measured.
//! 2. **Burst**: 10 s at 150% of the same fleet's capacity, one client class: TTFT p99 with
//!    the gateway holding requests until a slot frees (late binding) and without.
//! 3. **Heterogeneous fleet**: two replicas at full speed and one at a third, 8 sequences
//!    each, ~85% load, streaming: TTFT p99 and e2e p99 against nginx `least_conn`.
//!
//! Run: `benches/flow-control.sh` (installs nginx). Environment: `NGINX`, `FC_SECONDS`
//! (flood and heterogeneous arrival window, default 40), `FC_RUNS` (interleaved runs of
//! each scenario, default 2), `FC_ONLY` (`noisy`, `burst`, `hetero`, comma-separated),
//! `FC_ROUTERS` (a subset of the routers, by name).

mod common;

use common::{pct, replica, start_router_with, wait_idle, Router};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use vllm_edge::sim::scheduler::SchedulerConfig;
use vllm_edge::sim::{self, SimHandle};

/// Sequences per replica (vLLM's `--max-num-seqs`).
const SLOTS: usize = 8;

fn sched(speed: f64) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: SLOTS,
        ..common::sched_config(speed)
    }
}

/// Requests a second one replica at `speed` completes when saturated (virtual clock).
fn capacity(speed: f64) -> f64 {
    common::capacity_of(sched(speed))
}

struct Planned {
    at: Duration,
    key: &'static str,
    prompt: String,
    output: usize,
}

/// Poisson arrivals for `key` at `rate` per second over `seconds`.
fn arrivals(key: &'static str, rate: f64, seconds: f64, seed: u64) -> Vec<Planned> {
    common::arrivals(rate, seconds, seed)
        .into_iter()
        .enumerate()
        .map(|(i, (at, p, o))| {
            let mut prompt = format!("{key}{seed}-{i} ");
            for k in 1..p {
                prompt.push_str(["alpha ", "beta ", "gamma ", "delta "][(k + i) % 4]);
            }
            Planned {
                at: Duration::from_secs_f64(at),
                key,
                prompt,
                output: o,
            }
        })
        .collect()
}

fn merged(mut a: Vec<Planned>, b: Vec<Planned>) -> Vec<Planned> {
    a.extend(b);
    a.sort_by_key(|p| p.at);
    a
}

#[derive(Default)]
struct Outcome {
    ttft: Vec<f64>,
    e2e: Vec<f64>,
    ok: usize,
    /// Answers that were not 200, by status (0: no answer).
    refused: BTreeMap<u16, usize>,
    by_replica: BTreeMap<String, usize>,
}

/// Sends `plan` open-loop to `url`, streaming; each request with its key. Returns the
/// outcome per key and the wall time from the first send to the last answer.
async fn drive(url: &str, plan: &[Planned]) -> BTreeMap<&'static str, Outcome> {
    let client = common::client();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(plan.len());
    for p in plan {
        tokio::time::sleep_until((start + p.at).into()).await;
        let body = serde_json::json!({
            "model": "m", "stream": true, "ignore_eos": true, "max_tokens": p.output,
            "messages": [{"role": "user", "content": p.prompt}],
        });
        let req = client
            .post(url)
            .bearer_auth(format!("sk-{}", p.key))
            .json(&body);
        let key = p.key;
        tasks.push(tokio::spawn(async move {
            let r = common::stream_once(req).await;
            let r = r.and_then(|r| match r.ttft.is_finite() {
                true => Ok((r.ttft, r.e2e, r.replica)),
                false => Err(0),
            });
            (key, r)
        }));
    }
    let mut out: BTreeMap<&'static str, Outcome> = BTreeMap::new();
    for t in tasks {
        let (key, r) = t.await.unwrap();
        let o = out.entry(key).or_default();
        match r {
            Ok((ttft, e2e, replica)) => {
                o.ttft.push(ttft);
                o.e2e.push(e2e);
                o.ok += 1;
                *o.by_replica.entry(replica).or_default() += 1;
            }
            Err(status) => *o.refused.entry(status).or_default() += 1,
        }
    }
    out
}

/// Tokens the engines have generated so far.
fn generated(sims: &[SimHandle]) -> f64 {
    sims.iter()
        .map(|s| s.sim.state()["generation_tokens"].as_f64().unwrap_or(0.0))
        .sum()
}

/// The keys file every gateway run reads, and its path.
fn keys_file(dir: &std::path::Path) -> String {
    let path = dir.join("keys");
    std::fs::write(&path, "a sk-a\nb sk-b\nanon sk-anon\n").unwrap();
    path.display().to_string()
}

/// `router` in front of `sims`: "vllm-edge flow" and "vllm-edge noflow" with the keys
/// file and the replicas' batch limit configured ("... learned": not configured);
/// nginx as it is.
async fn start(router: &str, sims: &[SimHandle], keys: &str) -> Option<Router> {
    let backends: Vec<String> = sims.iter().map(|s| s.url()).collect();
    if router.starts_with("nginx") {
        return start_router_with(router, &backends, &[], "").await;
    }
    let learned = router.ends_with("learned");
    let cap = if learned {
        String::new()
    } else {
        format!("    max_concurrent_requests: {SLOTS}\n")
    };
    let extra: Vec<String> = sims.iter().map(|_| cap.clone()).collect();
    let flow = if router.contains("noflow") {
        "flow_control:\n  enabled: false\n"
    } else {
        "flow_control:\n  enabled: true\n"
    };
    let top = format!("auth:\n  api_keys_file: {keys}\n{flow}");
    start_router_with("vllm-edge vllm", &backends, &extra, &top).await
}

fn refused(o: &Outcome) -> String {
    if o.refused.is_empty() {
        return "0".into();
    }
    o.refused
        .iter()
        .map(|(s, n)| format!("{n}×{s}"))
        .collect::<Vec<_>>()
        .join(" ")
}

async fn fleet(speeds: &[f64]) -> Vec<SimHandle> {
    let mut sims = Vec::new();
    for (i, &speed) in speeds.iter().enumerate() {
        let mut a = replica(i, 4096);
        a.max_num_seqs = Some(SLOTS);
        a.speed_factor = speed;
        a.name = Some(format!("r{i}{}", if speed < 1.0 { "-slow" } else { "" }));
        sims.push(sim::spawn(a).await.unwrap());
    }
    sims
}

/// The gateway's measured interval between slot releases (ms), if it queued.
async fn slot_interval(r: &Router) -> Option<f64> {
    let admin = r.admin.as_ref()?;
    let v: serde_json::Value = reqwest::get(format!("http://{admin}/load-stats"))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    v["queue"]["models"]["m"]["slot_interval_ms"].as_f64()
}

async fn noisy(routers: &[&str], seconds: f64, runs: usize, keys: &str) {
    let sims = fleet(&[1.0; 3]).await;
    let cap = 3.0 * capacity(1.0);
    println!("\n## Noisy neighbour\n\nFleet: 3 simulated replicas (A100 profile, {SLOTS} sequences each), capacity {cap:.1} requests/s; key A at 2× capacity, key B at 0.2×, {seconds} s of Poisson arrivals; streams. One slot frees every {:.0} ms on average when the fleet is full (1 / capacity).\n", 1000.0 / cap);
    println!("| run | router | B alone: TTFT p50 / p99 (s) | B under flood: TTFT p50 / p99 (s) | B errors | A completed | A refused | fleet tokens/s while full | slot interval (ms, measured) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for run in 0..runs {
        let seed = 11 + run as u64;
        let b_alone = arrivals("b", 0.2 * cap, seconds, seed);
        for name in routers {
            wait_idle(&sims).await;
            let Some(mut r) = start(name, &sims, keys).await else {
                eprintln!("skipping {name}");
                continue;
            };
            let alone = drive(&r.url, &b_alone).await;
            wait_idle(&sims).await;
            let url = r.url.clone();
            let flood = merged(
                arrivals("a", 2.0 * cap, seconds, seed + 100),
                arrivals("b", 0.2 * cap, seconds, seed),
            );
            let run_flood = tokio::spawn(async move { drive(&url, &flood).await });
            tokio::time::sleep(Duration::from_secs(5)).await;
            let (g5, at5) = (generated(&sims), Instant::now());
            tokio::time::sleep(Duration::from_secs_f64(seconds - 5.0)).await;
            let rate = (generated(&sims) - g5) / at5.elapsed().as_secs_f64();
            let out = run_flood.await.unwrap();
            let interval = slot_interval(&r).await;
            let _ = r.child.kill().await;
            let mut ba = alone.get("b").map(|o| (o.ttft.clone(), o)).unwrap();
            let b = &out["b"];
            let a = &out["a"];
            let mut bt = b.ttft.clone();
            println!(
                "| {} | {name} | {:.3} / {:.3} | {:.3} / {:.3} | {} | {} | {} | {:.0} | {} |",
                run + 1,
                pct(&mut ba.0, 0.5),
                pct(&mut ba.0, 0.99),
                pct(&mut bt, 0.5),
                pct(&mut bt, 0.99),
                refused(b),
                a.ok,
                refused(a),
                rate,
                interval.map_or("-".into(), |i| format!("{i:.0}")),
            );
        }
    }
}

/// Runs `plan` (one key) through each router on `sims`, one table row per router:
/// requests, errors, TTFT p50/p99, e2e p99, and each replica's share of the answers.
async fn one_key(routers: &[&str], sims: &[SimHandle], plan: &[Planned], run: usize, keys: &str) {
    for name in routers {
        wait_idle(sims).await;
        let Some(mut r) = start(name, sims, keys).await else {
            continue;
        };
        let mut out = drive(&r.url, plan).await;
        let _ = r.child.kill().await;
        let o = out.get_mut("anon").unwrap();
        let shares: Vec<String> = o
            .by_replica
            .iter()
            .map(|(r, n)| format!("{r} {:.0}%", 100.0 * *n as f64 / o.ok.max(1) as f64))
            .collect();
        println!(
            "| {} | {name} | {} | {} | {:.3} | {:.3} | {:.2} | {} |",
            run + 1,
            plan.len(),
            refused(o),
            pct(&mut o.ttft, 0.5),
            pct(&mut o.ttft, 0.99),
            pct(&mut o.e2e, 0.99),
            shares.join(", "),
        );
    }
}

const ONE_KEY_TABLE: &str = "| run | router | requests | errors | TTFT p50 (s) | TTFT p99 (s) | e2e p99 (s) | answers per replica |\n|---|---|---|---|---|---|---|---|";

async fn burst(routers: &[&str], runs: usize, keys: &str) {
    let sims = fleet(&[1.0; 3]).await;
    let cap = 3.0 * capacity(1.0);
    println!("\n## Burst\n\nThe same fleet; 10 s of Poisson arrivals at 150% of its capacity ({:.1} requests/s), one key; streams; TTFT over every request.\n", 1.5 * cap);
    println!("{ONE_KEY_TABLE}");
    for run in 0..runs {
        let plan = arrivals("anon", 1.5 * cap, 10.0, 21 + run as u64);
        one_key(routers, &sims, &plan, run, keys).await;
    }
}

async fn hetero(routers: &[&str], seconds: f64, runs: usize, keys: &str) {
    let speeds = [1.0, 1.0, 1.0 / 3.0];
    let sims = fleet(&speeds).await;
    let cap: f64 = speeds.iter().map(|&s| capacity(s)).sum();
    println!("\n## Heterogeneous fleet\n\n3 simulated replicas (A100 profile, {SLOTS} sequences each) at speeds 1, 1 and 1/3, capacity {cap:.1} requests/s; {seconds} s of Poisson arrivals at 85% of it ({:.1} requests/s); streams, one key.\n", 0.85 * cap);
    println!("{ONE_KEY_TABLE}");
    for run in 0..runs {
        let plan = arrivals("anon", 0.85 * cap, seconds, 31 + run as u64);
        one_key(routers, &sims, &plan, run, keys).await;
    }
}

#[tokio::main]
async fn main() {
    let env = |k: &str| std::env::var(k).ok();
    let seconds: f64 = env("FC_SECONDS")
        .and_then(|s| s.parse().ok())
        .unwrap_or(40.0);
    let runs: usize = env("FC_RUNS").and_then(|s| s.parse().ok()).unwrap_or(2);
    let only = env("FC_ONLY").unwrap_or_else(|| "noisy,burst,hetero".into());
    let dir = tempfile::tempdir().unwrap();
    let keys = keys_file(dir.path());
    println!(
        "# Flow control, {} (FC_SECONDS={seconds}, FC_RUNS={runs})",
        chrono_free_date()
    );
    // FC_ROUTERS: a subset of the routers, by name.
    let pick = env("FC_ROUTERS");
    let wanted = |r: &&str| {
        pick.as_ref()
            .is_none_or(|p| p.split(',').any(|x| x.trim() == *r))
    };
    let routers: Vec<&str> = ["vllm-edge flow", "vllm-edge noflow", "nginx least_conn"]
        .into_iter()
        .filter(wanted)
        .collect();
    for part in only.split(',') {
        match part.trim() {
            "noisy" => noisy(&routers, seconds, runs, &keys).await,
            "burst" => burst(&routers, runs.max(3), &keys).await,
            "hetero" => {
                let with_learned: Vec<&str> = [
                    "vllm-edge flow",
                    "vllm-edge noflow",
                    "vllm-edge flow learned",
                    "nginx least_conn",
                ]
                .into_iter()
                .filter(wanted)
                .collect();
                hetero(&with_learned, seconds, runs, &keys).await
            }
            other => eprintln!("unknown part {other}"),
        }
    }
}

/// Today's date from `date` (no date crate for one line).
fn chrono_free_date() -> String {
    std::process::Command::new("date")
        .arg("+%F %H:%M")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
