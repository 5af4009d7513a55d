//! How low can TTFT p99 go on the routing-quality workload, whatever the router?
//!
//! `routing_quality` measures real routers in front of real (simulated) replicas in real
//! time. This runs the same fleet and the same arrivals on the scheduler's virtual clock,
//! in one process, with routers that a live gateway cannot be:
//! - `least-request`: fewest requests in flight (what `least-request` and nginx
//!   `least_conn` do), as a check that the virtual fleet behaves like the live one;
//! - `oracle`: for every arrival, runs a copy of each replica forward (its scheduler, its
//!   step in progress, the requests on their way to it) and sends the request where its
//!   first token comes soonest. It knows every replica's exact state and step times, but
//!   not the future arrivals: the best a router that reads the engines perfectly can do,
//!   one request at a time.
//!
//! - `vllm`: vllm-edge's `vllm` policy itself, fed virtual scrapes (see [`Policy::Vllm`]).
//!
//! Two more, run only when named in `RB_ROUTERS`, test whether a router that is not
//! greedy for the request in hand could do better than `oracle`:
//! - `social`: the oracle minimising the request's first-token time plus the delay it
//!   adds to the first tokens of the requests already at the replica;
//! - `shaped`: the oracle plus a price (`RB_PRICE`, seconds per slot-second, default
//!   0.001) on the batch slot-time the request will hold there (its output tokens at the
//!   replica's speed), which keeps long outputs off the slow replica.
//!
//! The virtual replicas are the simulator's scheduler, so the absolute figures are a few
//! milliseconds below the live ones (no HTTP, no event loop), and each run takes well
//! under a second: many seeds can be compared, where the live benchmark runs one.
//!
//! Run: `cargo bench --bench routing_bound` (about a minute). Environment: `RB_SECONDS`
//! (default 60), `RB_LOADS` (default "0.7,0.9"), `RB_SEEDS` (default 42 to 57),
//! `RB_ROUTERS` (default "least-request,vllm,oracle"; also `social`, `shaped`),
//! `RB_SCRAPE` (seconds between the emulated gateway's scrapes, default 0.25),
//! `RB_CAP` (tell the emulated gateway the batch limit, as `max_concurrent_requests`),
//! `RB_HOLD` (every router holds requests in the gateway while every replica's batch is
//! full, and sends the oldest when one has room: late binding), `RB_DIAG` (print the
//! slowest first tokens and what the emulated gateway learned).

mod common;

use common::{arrivals, fleet_capacity, pct, sched_config, SPEEDS};
use rand::SeedableRng;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use vllm_edge::config::{BackendConfig, Policy as EdgePolicy};
use vllm_edge::engine::metrics::{EngineLoad, SumCount};
use vllm_edge::fleet::{BackendEntry, Fleet, FleetSnapshot, InFlightGuard};
use vllm_edge::routing::{Request, Selector};
use vllm_edge::sim::scheduler::{jitter, Batch, NewSeq, Scheduler, SeqId};

/// Seconds between two scrapes of the emulated gateway: its default, or `RB_SCRAPE`.
fn scrape_s() -> f64 {
    env_list("RB_SCRAPE", "0.25")[0]
}

/// Seconds a request spends before it reaches the engine (the A100 profile's).
fn api_s() -> f64 {
    sched_config(1.0).perf.api_overhead_ms / 1000.0
}

#[derive(Clone)]
struct Replica {
    sched: Scheduler,
    /// Requests on their way to the engine: (when they reach it, the request).
    inbox: Vec<(f64, NewSeq)>,
    /// The step in progress: when it ends, and its work.
    step: Option<(f64, Batch)>,
    /// Requests sent here and not finished.
    in_flight: usize,
    /// (request, when the engine first scheduled it), for diagnostics.
    admitted: Vec<(SeqId, f64)>,
}

impl Replica {
    fn new(speed: f64) -> Replica {
        Replica {
            sched: Scheduler::new(sched_config(speed)),
            inbox: Vec::new(),
            step: None,
            in_flight: 0,
            admitted: Vec::new(),
        }
    }

    /// When this replica next has something to do (infinite when idle).
    fn next_event(&self) -> f64 {
        match &self.step {
            Some((end, _)) => *end,
            None => self
                .inbox
                .iter()
                .map(|(t, _)| *t)
                .fold(f64::INFINITY, f64::min),
        }
    }

    /// Processes the event at `now`: ends the step in progress, hands the engine what
    /// reached it, starts the next step. Returns the first tokens and finishes.
    fn advance(
        &mut self,
        now: f64,
        jitter_rng: Option<&mut rand::rngs::StdRng>,
    ) -> (Vec<SeqId>, Vec<SeqId>) {
        let (mut first, mut done) = (Vec::new(), Vec::new());
        if let Some((_, batch)) = self.step.take() {
            let out = self.sched.complete(&batch);
            first.extend(out.emitted.iter().filter(|e| e.1 == 0).map(|e| e.0));
            for (id, _) in out.finished {
                self.sched.forget(id);
                self.in_flight -= 1;
                done.push(id);
            }
        }
        let mut k = 0;
        while k < self.inbox.len() {
            if self.inbox[k].0 <= now {
                let (_, seq) = self.inbox.remove(k);
                self.sched.add(seq);
            } else {
                k += 1;
            }
        }
        if let Some(batch) = self.sched.schedule() {
            for &id in &batch.admitted {
                self.admitted.push((id, now));
            }
            let mut ms = self.sched.step_ms(&batch);
            if let Some(rng) = jitter_rng {
                ms *= jitter(rng, self.sched.config().perf.jitter_cv);
            }
            self.step = Some((now + ms / 1000.0, batch));
        }
        (first, done)
    }

    /// Seconds from `now` to `id`'s first token if it reaches this engine at `ready`
    /// and nothing else arrives: a copy run forward without jitter.
    fn what_if(&self, now: f64, ready: f64, seq: NewSeq) -> f64 {
        let id = seq.id;
        let mut copy = self.clone();
        copy.inbox.push((ready, seq));
        for _ in 0..100_000 {
            let t = copy.next_event();
            if !t.is_finite() {
                break;
            }
            let (first, _) = copy.advance(t, None);
            if first.contains(&id) {
                return t - now;
            }
        }
        f64::INFINITY
    }

    /// First tokens (request, seconds from `now`) of a copy run forward `horizon`
    /// seconds without jitter, with `seq` reaching the engine at `ready` if given.
    fn first_tokens(
        &self,
        now: f64,
        horizon: f64,
        add: Option<(f64, NewSeq)>,
    ) -> HashMap<SeqId, f64> {
        let mut copy = self.clone();
        if let Some(x) = add {
            copy.inbox.push(x);
        }
        let mut out = HashMap::new();
        for _ in 0..100_000 {
            let t = copy.next_event();
            if !t.is_finite() || t > now + horizon {
                break;
            }
            let (first, _) = copy.advance(t, None);
            for id in first {
                out.insert(id, t - now);
            }
        }
        out
    }

    /// What sending `seq` here costs in first-token time: its own, plus the delay it
    /// adds to the first tokens of the requests already here (within `horizon`; a first
    /// token pushed past the horizon counts up to it).
    fn marginal(&self, now: f64, ready: f64, seq: NewSeq, horizon: f64) -> f64 {
        let id = seq.id;
        let without = self.first_tokens(now, horizon, None);
        let with = self.first_tokens(now, horizon, Some((ready, seq)));
        let own = with.get(&id).copied().unwrap_or(horizon);
        let others: f64 = without
            .iter()
            .map(|(k, t0)| with.get(k).copied().unwrap_or(horizon) - t0)
            .sum();
        own + others
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Policy {
    LeastRequest,
    Oracle,
    /// The oracle minimising its own first-token time plus the delay it adds to the
    /// first tokens of requests already at the replica (an experiment).
    Social,
    /// The oracle plus a price on the batch slot-time a request holds (its output
    /// length over the replica's speed), `RB_PRICE` seconds per slot-second (an
    /// experiment: keeps long outputs off the slow replica).
    Shaped,
    /// vllm-edge's `vllm` policy itself (`Selector::best`), fed scrapes of the virtual
    /// engines every 250 ms (through `scraper::accept`, as the scraper takes them in) and
    /// this gateway's own counters. Requests of one message have no reusable prefix, so
    /// prefix affinity does not apply (as in routing_quality).
    Vllm,
}

/// The emulated gateway: its view of the fleet, and the guards of requests in flight.
struct Gateway {
    entries: Vec<BackendEntry>,
    snap: Arc<FleetSnapshot>,
    selector: Selector,
    guards: HashMap<SeqId, InFlightGuard>,
    /// Per replica: cumulative ITL, TTFT and e2e (sum, count), as the engine exports.
    itl: Vec<SumCount>,
    ttft: Vec<SumCount>,
    e2e: Vec<SumCount>,
    next_scrape: f64,
}

impl Gateway {
    fn new(n: usize) -> Gateway {
        let cfgs: Vec<BackendConfig> = (0..n)
            .map(|i| {
                let addr = format!("127.0.0.1:{}", 10_000 + i);
                BackendConfig {
                    static_models: Some(vec!["m".into()]),
                    max_concurrent_requests: std::env::var("RB_CAP")
                        .ok()
                        .and_then(|c| c.parse().ok()),
                    ..BackendConfig::new(
                        format!("r{i}"),
                        format!("http://{addr}"),
                        addr.parse().unwrap(),
                    )
                }
            })
            .collect();
        let entries: Vec<BackendEntry> = Fleet::new(&cfgs).load().backends.clone();
        for e in &entries {
            e.backend.health.observe_check(Ok(()), &Default::default());
        }
        Gateway {
            snap: Arc::new(FleetSnapshot::new(entries.clone())),
            entries,
            selector: Selector::new(std::time::Duration::from_secs(3600)),
            guards: HashMap::new(),
            itl: vec![SumCount::default(); n],
            ttft: vec![SumCount::default(); n],
            e2e: vec![SumCount::default(); n],
            next_scrape: 0.0,
        }
    }

    /// A scrape of every replica, as the scraper takes it in.
    fn scrape(&mut self, fleet: &[Replica]) {
        let now = Instant::now();
        for (k, e) in self.entries.iter_mut().enumerate() {
            let s = &fleet[k].sched;
            let load = EngineLoad {
                running: Some(s.num_running() as f64),
                waiting: Some(s.num_waiting() as f64),
                kv_usage: Some(s.kv_usage()),
                kv_capacity_tokens: Some(s.config().kv_tokens as u64),
                itl: Some(self.itl[k]),
                ttft: Some(self.ttft[k]),
                e2e: Some(self.e2e[k]),
                engines: 1,
                ..EngineLoad::default()
            };
            let (d, c) = (e.backend.dispatched(), e.backend.completed());
            vllm_edge::observe::scraper::accept(&mut e.state, load, d, c, now, d);
        }
        self.snap = Arc::new(FleetSnapshot::new(self.entries.clone()));
    }

    fn pick(&self, prompt: usize, output: usize) -> usize {
        let req = Request {
            model: "m",
            prompt_tokens: prompt,
            max_tokens: Some(output as u64),
            affinity: None,
            cached: None,
        };
        self.selector
            .best(EdgePolicy::Vllm, &self.snap, &req, &[], Instant::now())
            .unwrap()
            .index
    }
}

struct Outcome {
    ttft: Vec<f64>,
    e2e: Vec<f64>,
    share: Vec<usize>,
    throughput: f64,
}

fn run(policy: Policy, rate: f64, seconds: f64, seed: u64) -> Outcome {
    let plan = arrivals(rate, seconds, seed);
    let api = api_s();
    let mut fleet: Vec<Replica> = SPEEDS.iter().map(|&s| Replica::new(s)).collect();
    let mut rngs: Vec<rand::rngs::StdRng> = (0..fleet.len())
        .map(|i| rand::rngs::StdRng::seed_from_u64(seed * 31 + i as u64))
        .collect();
    let n = plan.len();
    let (mut first, mut end) = (vec![f64::NAN; n], vec![f64::NAN; n]);
    let mut share = vec![0usize; fleet.len()];
    let mut sent_to = vec![0usize; n];
    let mut next = 0;
    let mut rotation = 0usize;
    let mut gw = Gateway::new(fleet.len());
    let mut last_token = vec![f64::NAN; n];
    let mut finished = 0;
    let mut now = 0.0;
    let hold = std::env::var("RB_HOLD").is_ok();
    let price: f64 = env_list("RB_PRICE", "0.001")[0];
    let scrape = scrape_s();
    let mut last_caps: Vec<String> = Vec::new();
    let mut held = std::collections::VecDeque::new();
    while finished < n {
        let (r, t_replica) = fleet
            .iter()
            .enumerate()
            .map(|(r, x)| (r, x.next_event()))
            .fold((0, f64::INFINITY), |a, b| if b.1 < a.1 { b } else { a });
        if policy == Policy::Vllm
            && gw.next_scrape <= t_replica
            && (next >= n || gw.next_scrape <= plan[next].0)
        {
            now = gw.next_scrape;
            gw.scrape(&fleet);
            gw.next_scrape += scrape;
            if std::env::var("RB_DIAG").is_ok() {
                let caps: Vec<String> = gw
                    .entries
                    .iter()
                    .map(|e| format!("{:?}", e.state.learned_max_running()))
                    .collect();
                if caps != last_caps {
                    eprintln!("  t={now:.2} learned caps {}", caps.join(" "));
                    last_caps = caps;
                }
            }
            continue;
        }
        if next < n && plan[next].0 <= t_replica {
            now = plan[next].0;
            held.push_back(next);
            next += 1;
        } else {
            now = t_replica;
            let emitted = fleet[r].step.as_ref().map(|(_, b)| b.items.clone());
            let (f, d) = fleet[r].advance(now, Some(&mut rngs[r]));
            // Every decode item of the step emitted a token: its gap feeds the ITL histogram.
            for it in emitted.into_iter().flatten() {
                let i = it.id as usize;
                if it.decode && last_token[i].is_finite() {
                    gw.itl[r].sum += now - last_token[i];
                    gw.itl[r].count += 1.0;
                    last_token[i] = now;
                }
            }
            for id in f {
                let i = id as usize;
                first[i] = now;
                last_token[i] = now;
                gw.ttft[r].sum += now - plan[i].0;
                gw.ttft[r].count += 1.0;
                if let Some(g) = gw.guards.get_mut(&id) {
                    g.first_byte();
                }
            }
            for id in d {
                let i = id as usize;
                end[i] = now;
                gw.e2e[r].sum += now - plan[i].0;
                gw.e2e[r].count += 1.0;
                gw.guards.remove(&id);
                finished += 1;
            }
        }
        // Dispatch what the gateway holds: all of it, unless it holds requests while
        // every replica is at its batch limit.
        while let Some(&k) = held.front() {
            let cap = fleet[0].sched.config().max_num_seqs;
            if hold && fleet.iter().all(|x| x.in_flight >= cap) {
                break;
            }
            held.pop_front();
            let (at, p, o) = plan[k];
            let at = at.max(now);
            let next = k;
            let id = next as SeqId;
            let seq = NewSeq {
                id,
                // Unique tokens per request: no prefix sharing, as in routing_quality.
                prompt: (0..p as u32).map(|t| t ^ ((next as u32) << 12)).collect(),
                output_tokens: o,
                lora: 0,
            };
            let pick = match policy {
                Policy::LeastRequest => {
                    let len = fleet.len();
                    rotation += 1;
                    (0..len)
                        .map(|k| (rotation + k) % len)
                        .min_by_key(|&r| fleet[r].in_flight)
                        .unwrap()
                }
                Policy::Vllm => gw.pick(p, o),
                Policy::Oracle => {
                    lowest((0..fleet.len()).map(|r| fleet[r].what_if(at, at + api, seq.clone())))
                }
                Policy::Social => lowest(
                    (0..fleet.len()).map(|r| fleet[r].marginal(at, at + api, seq.clone(), 2.0)),
                ),
                // Slot-seconds at a replica: output tokens at ~20 ms per decode step at
                // full speed.
                Policy::Shaped => lowest((0..fleet.len()).map(|r| {
                    let hold = o as f64 * 0.02 / SPEEDS[r];
                    fleet[r].what_if(at, at + api, seq.clone()) + price * hold
                })),
            };
            fleet[pick].inbox.push((at + api, seq));
            fleet[pick].in_flight += 1;
            sent_to[next] = pick;
            if policy == Policy::Vllm {
                let g = gw.entries[pick]
                    .backend
                    .begin_request_with_prefill(p as u64);
                gw.guards.insert(id, g);
            }
            share[pick] += 1;
        }
        continue;
    }
    let ttft: Vec<f64> = (0..n).map(|i| first[i] - plan[i].0).collect();
    if std::env::var("RB_DIAG").is_ok() {
        let mut admit = vec![f64::NAN; n];
        for x in &fleet {
            for &(id, t) in &x.admitted {
                if admit[id as usize].is_nan() {
                    admit[id as usize] = t;
                }
            }
        }
        let mut slow: Vec<usize> = (0..n).filter(|&i| ttft[i] > 0.08).collect();
        slow.sort_by(|&a, &b| ttft[b].total_cmp(&ttft[a]));
        for &i in slow.iter().take(8) {
            eprintln!(
                "  slow: r{} prompt {:4} queue {:.3} ttft {:.3}",
                sent_to[i],
                plan[i].1,
                admit[i] - plan[i].0 - api,
                ttft[i]
            );
        }
    }
    let e2e = (0..n).map(|i| end[i] - plan[i].0).collect();
    Outcome {
        ttft,
        e2e,
        share,
        throughput: n as f64 / (now - plan[0].0),
    }
}

/// The position of the lowest of `costs` (the first on ties).
fn lowest(costs: impl Iterator<Item = f64>) -> usize {
    costs
        .enumerate()
        .fold((0, f64::INFINITY), |a, b| if b.1 < a.1 { b } else { a })
        .0
}

fn env_list<T: std::str::FromStr>(name: &str, default: &str) -> Vec<T> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// A load and a router, and per seed its (TTFT p99, e2e p99, throughput).
type Summary = (f64, &'static str, Vec<(f64, f64, f64)>);

fn main() {
    let seconds: f64 = env_list("RB_SECONDS", "60")[0];
    let loads: Vec<f64> = env_list("RB_LOADS", "0.7,0.9");
    let seeds: Vec<u64> = env_list(
        "RB_SEEDS",
        "42,43,44,45,46,47,48,49,50,51,52,53,54,55,56,57",
    );
    let all = [
        ("least-request", Policy::LeastRequest),
        ("vllm", Policy::Vllm),
        ("oracle", Policy::Oracle),
        ("social", Policy::Social),
        ("shaped", Policy::Shaped),
    ];
    // `RB_ROUTERS` (comma-separated names) picks routers; least-request always runs.
    let wanted: Vec<String> = env_list("RB_ROUTERS", "least-request,vllm,oracle");
    let routers: Vec<(&'static str, Policy)> = all
        .into_iter()
        .filter(|(n, _)| *n == "least-request" || wanted.iter().any(|w| w == n))
        .collect();
    let capacity = fleet_capacity();
    println!("Virtual fleet: speeds {SPEEDS:?}, capacity {capacity:.1} req/s, {seconds} s of arrivals per run.\n");
    println!("| load | seed | router | TTFT p50 (s) | TTFT p99 (s) | e2e p99 (s) | throughput (req/s) | share per replica |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut summary: Vec<Summary> = Vec::new();
    for &load in &loads {
        for &(name, _) in &routers {
            summary.push((load, name, Vec::new()));
        }
        for &seed in &seeds {
            for &(name, policy) in &routers {
                let mut o = run(policy, load * capacity, seconds, seed);
                let total: usize = o.share.iter().sum();
                let share: Vec<String> = o
                    .share
                    .iter()
                    .map(|&s| format!("{:.0}%", 100.0 * s as f64 / total as f64))
                    .collect();
                let (p99, e2e) = (pct(&mut o.ttft, 0.99), pct(&mut o.e2e, 0.99));
                println!(
                    "| {:.0}% | {seed} | {name} | {:.3} | {p99:.3} | {e2e:.2} | {:.1} | {} |",
                    load * 100.0,
                    pct(&mut o.ttft, 0.5),
                    o.throughput,
                    share.join(" "),
                );
                let row = summary
                    .iter_mut()
                    .find(|r| r.0 == load && r.1 == name)
                    .expect("added above");
                row.2.push((p99, e2e, o.throughput));
            }
        }
    }
    println!(
        "\nOver {} seeds: medians, and per seed the ratio to least-request's.\n",
        seeds.len()
    );
    println!("| load | router | TTFT p99 median (min–max) | TTFT p99 / least-request's, median (min–max) | e2e p99 median | throughput median |");
    println!("|---|---|---|---|---|---|");
    for (load, name, runs) in &summary {
        let base = &summary
            .iter()
            .find(|r| r.0 == *load && r.1 == "least-request")
            .expect("always run")
            .2;
        let mut p99: Vec<f64> = runs.iter().map(|r| r.0).collect();
        let mut ratio: Vec<f64> = runs.iter().zip(base).map(|(r, b)| r.0 / b.0).collect();
        let mut e2e: Vec<f64> = runs.iter().map(|r| r.1).collect();
        let mut thr: Vec<f64> = runs.iter().map(|r| r.2).collect();
        println!(
            "| {:.0}% | {name} | {:.3} ({:.3}–{:.3}) | {:.2} ({:.2}–{:.2}) | {:.2} | {:.1} |",
            load * 100.0,
            pct(&mut p99, 0.5),
            pct(&mut p99, 0.0),
            pct(&mut p99, 1.0),
            pct(&mut ratio, 0.5),
            pct(&mut ratio, 0.0),
            pct(&mut ratio, 1.0),
            pct(&mut e2e, 0.5),
            pct(&mut thr, 0.5),
        );
    }
}
