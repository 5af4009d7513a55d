//! How much load one core of simulated vLLM replicas carries.
//!
//! A fleet of simulated replicas (Llama-3-8B/H100 preset, real time) runs on one
//! single-threaded runtime pinned to core 0; a load generator pinned to core 1 keeps a
//! fixed number of streaming chat requests open (~200-token prompts, 128 output tokens,
//! one connection per request). Reported: tokens delivered per second, what the step-time
//! model predicts for the same batch (so the simulator is not the bottleneck when the two
//! agree), and the CPU the simulator thread used.
//!
//! Run: `cargo bench --bench sim_capacity` (or `benches/sim-capacity.sh`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vllm_edge::sim::scheduler::{PerfModel, StepShape};
use vllm_edge::sim::{self, SimArgs};

const WARMUP: Duration = Duration::from_secs(3);
const MEASURE: Duration = Duration::from_secs(8);
const OUTPUT_TOKENS: usize = 128;

fn pin(core: usize) {
    use nix::sched::{sched_setaffinity, CpuSet};
    let mut set = CpuSet::new();
    if set.set(core).is_ok() {
        if let Err(e) = sched_setaffinity(nix::unistd::Pid::from_raw(0), &set) {
            eprintln!("cannot pin to core {core}: {e}");
        }
    }
}

/// CPU seconds used by the calling thread (user + system).
fn thread_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted after the command name: indices 11 and 12.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / 100.0 // USER_HZ is 100 on Linux
}

struct Measured {
    tokens_per_s: f64,
    sim_cpu: f64,
    requests: u64,
}

async fn one_stream(
    addr: std::net::SocketAddr,
    body: &str,
    counting: &AtomicBool,
    tokens: &AtomicU64,
) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = vec![0u8; 16 * 1024];
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) | Err(_) => return true,
            Ok(n) => n,
        };
        // Count token events ("delta":{"content":...), across read boundaries.
        tail.extend_from_slice(&buf[..n]);
        let needle = b"\"delta\":{\"content\":\"";
        let mut count = 0;
        let mut i = 0;
        while i + needle.len() <= tail.len() {
            if &tail[i..i + needle.len()] == needle {
                count += 1;
                i += needle.len();
            } else {
                i += 1;
            }
        }
        if counting.load(Ordering::Relaxed) {
            tokens.fetch_add(count, Ordering::Relaxed);
        }
        let keep = tail.len().min(needle.len());
        tail.drain(..tail.len() - keep);
    }
}

fn run(sims: usize, streams: usize) -> Measured {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (start_tx, start_rx) = tokio::sync::oneshot::channel::<()>();
    let sim_thread = std::thread::spawn(move || {
        pin(0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut handles = Vec::new();
            for i in 0..sims {
                let mut a = SimArgs::defaults();
                a.port = 0;
                a.models = vec!["m".into()];
                a.seed = i as u64;
                handles.push(sim::spawn(a).await.unwrap());
            }
            addr_tx
                .send(handles.iter().map(|h| h.addr).collect::<Vec<_>>())
                .unwrap();
            let _ = start_rx.await;
            let cpu0 = thread_cpu_secs();
            let _ = stop_rx.await;
            thread_cpu_secs() - cpu0
        })
    });
    let addrs = addr_rx.recv().unwrap();
    pin(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let counting = Arc::new(AtomicBool::new(false));
    let tokens = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let prompt = "the quick brown fox jumps over the lazy dog ".repeat(22);
    let measured_secs = rt.block_on(async {
        let deadline = Instant::now() + WARMUP + MEASURE;
        let mut tasks = Vec::new();
        for i in 0..streams {
            let addr = addrs[i % addrs.len()];
            let (counting, tokens, requests) = (counting.clone(), tokens.clone(), requests.clone());
            let body = serde_json::json!({
                "model": "m", "stream": true, "ignore_eos": true, "max_tokens": OUTPUT_TOKENS,
                "messages": [{"role": "user", "content": format!("{i} {prompt}")}],
            })
            .to_string();
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    if one_stream(addr, &body, &counting, &tokens).await
                        && counting.load(Ordering::Relaxed)
                    {
                        requests.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        tokio::time::sleep(WARMUP).await;
        counting.store(true, Ordering::Relaxed);
        let _ = start_tx.send(());
        let t0 = Instant::now();
        tokio::time::sleep(MEASURE).await;
        counting.store(false, Ordering::Relaxed);
        let secs = t0.elapsed().as_secs_f64();
        let _ = stop_tx.send(());
        for t in tasks {
            let _ = t.await;
        }
        secs
    });
    let cpu = sim_thread.join().unwrap();
    Measured {
        tokens_per_s: tokens.load(Ordering::Relaxed) as f64 / measured_secs,
        sim_cpu: cpu / measured_secs,
        requests: requests.load(Ordering::Relaxed),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; there is nothing to filter.
    println!("| replicas | concurrent streams | tokens/s delivered | model's decode-only tokens/s | delivered / model | sim thread CPU (one core) | requests finished |");
    println!("|---|---|---|---|---|---|---|");
    for (sims, streams) in [(4, 64), (8, 256), (8, 512), (8, 1024)] {
        let m = run(sims, streams);
        // Decode-only prediction: every replica runs streams/sims decoders at ~270 tokens
        // of context; prefill steps for new requests make the real figure a bit lower.
        let per = (streams / sims) as f64;
        let step = PerfModel::LLAMA3_8B_H100.step_ms(
            &StepShape {
                tokens: per as usize,
                seqs: per as usize,
                prefill_attn_units: 0.0,
                decode_ctx_tokens: (per * 270.0) as usize,
            },
            1.0,
        );
        let model = sims as f64 * per * 1000.0 / step;
        println!(
            "| {sims} | {streams} | {:.0} | {:.0} | {:.2} | {:.0}% | {} |",
            m.tokens_per_s,
            model,
            m.tokens_per_s / model,
            m.sim_cpu * 100.0,
            m.requests
        );
    }
}
