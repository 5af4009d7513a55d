//! Routing quality on a simulated heterogeneous fleet: four replicas, one at half speed,
//! open-loop Poisson arrivals at 70% and 90% of the fleet's capacity, ShareGPT-like
//! prompt and output lengths. Every router sees the same fleet and the same request
//! schedule in the same run: vllm-edge with each policy, nginx `least_conn`, and
//! vllm-project/router (`vllm-router`) with its policies when installed.
//!
//! Run: `benches/routing-quality.sh` (installs nginx and vllm-router, then runs this).
//! Environment: `NGINX` and `VLLM_ROUTER` (paths; a router whose binary is missing is
//! skipped), `RQ_SECONDS` (arrival window per run, default 60), `RQ_LOADS` (default
//! "0.7,0.9"), `RQ_ROUTERS` (comma-separated subset of the names in the table).
//!
//! `RQ_LORA=N` turns it into a LoRA workload: every replica serves adapters `lora0` ..
//! `lora{N-1}` with `RQ_MAX_LORAS` slots (vLLM's `--max-loras`, default 2), and each
//! request names an adapter, drawn with Zipf popularity (the k-th adapter's share ∝
//! 1/k). The router "vllm-edge vllm+noslots" is the `vllm` policy with the replicas'
//! `vllm:lora_requests_info` hidden from it (the simulators leave it out of `/metrics`
//! for that run): the same policy, blind to adapter slots.
//!
//! `RQ_BASELINE=<a vllm-edge binary>` adds the router "baseline vllm": the `vllm` policy
//! of that build, for a before/after in one run.

mod common;

use common::{
    arrivals, engine_loads, fleet_capacity, pct, replica, start_router, wait_idle, KV_TOKENS,
    MAX_NUM_SEQS, SPEEDS,
};
use std::time::{Duration, Instant};
use vllm_edge::sim::{self, SimHandle};

struct Planned {
    at: Duration,
    model: String,
    prompt: String,
    output: usize,
}

/// The schedule at `rate` per second; with `loras` adapters, each request names one of
/// them (Zipf popularity), else the base model `m`.
fn schedule(rate: f64, seconds: f64, seed: u64, loras: usize) -> Vec<Planned> {
    use rand::{Rng, SeedableRng};
    let words = [
        "alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta",
    ];
    // Its own generator: the arrivals and lengths are the same with and without LoRA.
    let mut pick = rand::rngs::StdRng::seed_from_u64(seed ^ 0x10ba);
    let total: f64 = (1..=loras).map(|k| 1.0 / k as f64).sum();
    let mut adapter = move || {
        let mut x = pick.gen_range(0.0..total);
        for k in 1..=loras {
            x -= 1.0 / k as f64;
            if x < 0.0 {
                return format!("lora{}", k - 1);
            }
        }
        format!("lora{}", loras - 1)
    };
    arrivals(rate, seconds, seed)
        .into_iter()
        .enumerate()
        .map(|(i, (at, p, o))| {
            // A unique leading word per request: no accidental prefix sharing.
            let mut prompt = format!("req{i} ");
            for k in 1..p {
                prompt.push_str(words[(k * 7 + i) % words.len()]);
                prompt.push(' ');
            }
            Planned {
                at: Duration::from_secs_f64(at),
                model: if loras > 0 { adapter() } else { "m".into() },
                prompt,
                output: o,
            }
        })
        .collect()
}

#[derive(Default)]
struct Outcome {
    ttft: Vec<f64>,
    e2e: Vec<f64>,
    errors: usize,
    tokens: u64,
    /// TTFTs by the replica that answered (`x-sim-replica`).
    by_replica: std::collections::BTreeMap<String, Vec<f64>>,
}

async fn drive(url: &str, plan: &[Planned]) -> (Outcome, f64) {
    let client = common::client();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(plan.len());
    for p in plan {
        tokio::time::sleep_until((start + p.at).into()).await;
        let body = serde_json::json!({
            "model": p.model, "stream": true, "ignore_eos": true, "max_tokens": p.output,
            "messages": [{"role": "user", "content": p.prompt}],
        });
        let (client, url) = (client.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            let r = common::stream_once(client.post(&url).json(&body))
                .await
                .ok()?;
            Some((r.ttft, r.e2e, r.tokens, r.replica))
        }));
    }
    let mut out = Outcome::default();
    for t in tasks {
        match t.await.ok().flatten() {
            Some((ttft, e2e, tokens, replica)) if ttft.is_finite() => {
                out.by_replica.entry(replica).or_default().push(ttft);
                out.ttft.push(ttft);
                out.e2e.push(e2e);
                out.tokens += tokens;
            }
            _ => out.errors += 1,
        }
    }
    (out, start.elapsed().as_secs_f64())
}

/// First tokens the engines produced more than 100 ms after the request reached them
/// (vLLM's TTFT histogram has a bucket at 0.1 s), over the whole fleet: with the client's
/// own count, this tells the engines' queueing from delay added on the way (the router,
/// the client, a busy machine).
async fn engine_ttft_over_100ms(sims: &[SimHandle]) -> f64 {
    let mut over = 0.0;
    for s in sims {
        let text = String::from_utf8_lossy(&common::metrics_payload(s).await).into_owned();
        let value = |prefix: &str, label: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix) && l.contains(label))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        over += value("vllm:time_to_first_token_seconds_count", "")
            - value("vllm:time_to_first_token_seconds_bucket", "le=\"0.1\"");
    }
    over
}

async fn preemptions(sims: &[SimHandle]) -> f64 {
    engine_loads(sims)
        .await
        .iter()
        .map(|l| l.preemptions.unwrap_or(0.0))
        .sum()
}

#[tokio::main]
async fn main() {
    let seconds: f64 = std::env::var("RQ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60.0);
    let loads: Vec<f64> = std::env::var("RQ_LOADS")
        .unwrap_or_else(|_| "0.7,0.9".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let all = [
        "vllm-edge round-robin",
        "vllm-edge least-request",
        "vllm-edge power-of-two",
        "vllm-edge vllm",
        "vllm-edge vllm+cap",
        "vllm-edge vllm+noslots",
        "baseline vllm",
        "nginx least_conn",
        "vllm-router round_robin",
        "vllm-router power_of_two",
        "vllm-router cache_aware",
    ];
    let env_usize = |k: &str, default: usize| {
        std::env::var(k)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let loras = env_usize("RQ_LORA", 0);
    let max_loras = env_usize("RQ_MAX_LORAS", 2);
    let only = std::env::var("RQ_ROUTERS").ok();
    let routers: Vec<&str> = all
        .iter()
        .copied()
        .filter(|r| {
            only.as_ref()
                .is_none_or(|o| o.split(',').any(|x| x.trim() == *r))
        })
        // Hiding the adapter slots means something only with adapters.
        .filter(|r| loras > 0 || !r.ends_with("+noslots"))
        // The same policy in another build, when one is given.
        .filter(|r| !r.starts_with("baseline ") || std::env::var_os("RQ_BASELINE").is_some())
        .collect();

    let fleet_capacity = fleet_capacity();
    eprintln!("fleet capacity (virtual clock, saturated): {fleet_capacity:.1} requests/s");

    let mut sims = Vec::new();
    for (i, &speed) in SPEEDS.iter().enumerate() {
        let mut a = replica(i, 4096);
        a.speed_factor = speed;
        a.name = Some(format!("r{i}{}", if speed < 1.0 { "-slow" } else { "" }));
        a.lora_modules = (0..loras)
            .map(|k| (format!("lora{k}"), format!("/adapters/lora{k}")))
            .collect();
        a.max_loras = max_loras;
        sims.push(sim::spawn(a).await.unwrap());
    }
    let backends: Vec<String> = sims.iter().map(|s| s.url()).collect();

    println!("Fleet: 4 simulated replicas (A100 profile, {MAX_NUM_SEQS} sequences, {KV_TOKENS} KV tokens, speeds {SPEEDS:?}); capacity {fleet_capacity:.1} req/s; {seconds} s of Poisson arrivals per run.\n");
    if loras > 0 {
        println!("LoRA: {loras} adapters on every replica, {max_loras} slots each (--max-loras); requests name an adapter, Zipf popularity.\n");
    }
    println!("| load | router | requests | errors | TTFT p50 (s) | TTFT p99 (s) | e2e p99 (s) | throughput (req/s) | tokens/s | preemptions | TTFT over 100 ms: client / engine | share / TTFT p99 per replica |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &load in &loads {
        let plan = schedule(load * fleet_capacity, seconds, 42, loras);
        for name in &routers {
            wait_idle(&sims).await;
            let hidden = name.strip_suffix("+noslots");
            let drop: &[&str] = if hidden.is_some() {
                &["vllm:lora_requests_info"]
            } else {
                &[]
            };
            for s in &sims {
                let faults = serde_json::json!({ "metrics_drop": drop });
                let r = reqwest::Client::new()
                    .post(format!("{}/sim/faults", s.url()))
                    .json(&faults)
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "{}", r.text().await.unwrap());
            }
            let Some(mut router) = start_router(hidden.unwrap_or(name), &backends).await else {
                eprintln!("skipping {name}");
                continue;
            };
            let p0 = preemptions(&sims).await;
            let slow0 = engine_ttft_over_100ms(&sims).await;
            let (mut out, wall) = drive(&router.url, &plan).await;
            let p1 = preemptions(&sims).await;
            let slow_engine = engine_ttft_over_100ms(&sims).await - slow0;
            let slow_client = out.ttft.iter().filter(|&&t| t > 0.1).count();
            if let Some(admin) = &router.admin {
                // What the gateway learned of each engine's batch limit.
                let stats: serde_json::Value = reqwest::get(format!("http://{admin}/load-stats"))
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let limits: Vec<String> = stats["backends"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|b| format!("{} {}", b["name"], b["capacity"]["max_running_learned"]))
                    .collect();
                // Scrapes refused (failing, or judged frozen): a working fleet has none.
                let text = reqwest::get(format!("http://{admin}/metrics"))
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                let refused: f64 = text
                    .lines()
                    .filter(|l| l.starts_with("vllm_edge_scrape_errors_total{"))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .fold(0.0, |a, b| a + b);
                eprintln!(
                    "{name}: learned batch limits: {}; scrapes refused: {refused}",
                    limits.join(", ")
                );
            }
            let _ = router.child.kill().await;
            let n = out.ttft.len();
            let per_replica: Vec<String> = out
                .by_replica
                .iter_mut()
                .map(|(r, v)| {
                    format!(
                        "{r} {:.0}% {:.2}s",
                        100.0 * v.len() as f64 / n.max(1) as f64,
                        pct(v, 0.99)
                    )
                })
                .collect();
            println!(
                "| {:.0}% | {name} | {} | {} | {:.3} | {:.3} | {:.2} | {:.1} | {:.0} | {:.0} | {slow_client} / {slow_engine:.0} | {} |",
                load * 100.0,
                n,
                out.errors,
                pct(&mut out.ttft, 0.5),
                pct(&mut out.ttft, 0.99),
                pct(&mut out.e2e, 0.99),
                n as f64 / wall,
                out.tokens as f64 / wall,
                p1 - p0,
                per_replica.join(", "),
            );
        }
    }
}
