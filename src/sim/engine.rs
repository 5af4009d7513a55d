//! The simulated engine in real (scaled) time: one task per server drives the
//! [`Scheduler`] step by step, sleeping each step's modelled duration × `time_scale`,
//! sends each emitted token to its request's channel, and aborts requests whose channel
//! was dropped (a client that left). After every step it publishes the gauges, counters
//! and histograms that `/metrics` reports.

use parking_lot::Mutex;
use rand::SeedableRng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use super::scheduler::{
    jitter, FinishReason, NewSeq, Scheduler, SchedulerConfig, SchedulerCounters, SeqId,
};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    /// Every modelled duration is multiplied by this: 0.01 runs 100× faster.
    pub time_scale: f64,
    pub seed: u64,
    /// Where the prefix cache's changes go, when KV events are published.
    pub kv_events: Option<super::kv_publish::KvSink>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// The index of an output token (0-based).
    Token(usize),
    Finished(&'static str),
}

/// Histogram with fixed upper bounds, in the exposition's cumulative form.
#[derive(Debug, Clone)]
pub struct Histogram {
    pub bounds: &'static [f64],
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }
    pub fn observe(&mut self, v: f64) {
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

/// vLLM's bucket bounds (from a real 0.32 server's exposition).
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// Used by e2e and queue time.
pub const LONG_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// Everything `/metrics` and `/sim/state` report, as of the last step.
#[derive(Debug, Clone)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    /// Of `waiting`, requests whose LoRA adapter cannot join the batch now.
    pub deferred: usize,
    /// Adapter ids of the running and of the waiting requests.
    pub running_loras: Vec<u32>,
    pub waiting_loras: Vec<u32>,
    pub kv_usage: f64,
    /// The scheduler's cumulative counters (prefix cache, preemptions, tokens).
    pub counters: SchedulerCounters,
    pub success_stop: u64,
    pub success_length: u64,
    pub aborted: u64,
    pub steps: u64,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub queue: Histogram,
}

impl EngineStats {
    fn new() -> EngineStats {
        EngineStats {
            running: 0,
            waiting: 0,
            deferred: 0,
            running_loras: Vec::new(),
            waiting_loras: Vec::new(),
            kv_usage: 0.0,
            counters: SchedulerCounters::default(),
            success_stop: 0,
            success_length: 0,
            aborted: 0,
            steps: 0,
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(LONG_BUCKETS),
            queue: Histogram::new(LONG_BUCKETS),
        }
    }
}

struct Submission {
    id: SeqId,
    prompt: Vec<u32>,
    output_tokens: usize,
    lora: u32,
    arrival: Instant,
    events: mpsc::UnboundedSender<Event>,
}

enum Command {
    Submit(Submission),
    /// Forget every request and counter, as a restarted server would.
    Reset,
    /// How many tokens of a prompt the prefix cache holds now (an oracle's question).
    Probe(Vec<u32>, tokio::sync::oneshot::Sender<usize>),
}

pub struct Engine {
    pub cfg: EngineConfig,
    commands: mpsc::UnboundedSender<Command>,
    stats: Arc<Mutex<EngineStats>>,
    next_id: AtomicU64,
    /// Fault: every step takes this many times longer (f64 bits).
    slow_factor: Arc<AtomicU64>,
}

struct Live {
    events: mpsc::UnboundedSender<Event>,
    arrival: Instant,
    last_token: Option<Instant>,
}

impl Engine {
    /// Starts the engine task on the current tokio runtime.
    pub fn start(cfg: EngineConfig) -> Arc<Engine> {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Mutex::new(EngineStats::new()));
        let slow_factor = Arc::new(AtomicU64::new(1.0f64.to_bits()));
        tokio::spawn(run(cfg.clone(), rx, stats.clone(), slow_factor.clone()));
        Arc::new(Engine {
            cfg,
            commands: tx,
            stats,
            next_id: AtomicU64::new(1),
            slow_factor,
        })
    }

    pub fn stats(&self) -> EngineStats {
        self.stats.lock().clone()
    }

    pub fn set_slow_factor(&self, factor: f64) {
        self.slow_factor
            .store(factor.max(0.0).to_bits(), Ordering::Relaxed);
    }

    /// Drops all requests and zeroes every counter.
    pub fn reset(&self) {
        let _ = self.commands.send(Command::Reset);
    }

    /// How many tokens of `prompt` (base model) its prefix cache holds now: what a router
    /// that knew every engine's cache exactly would know (the benchmarks' oracle).
    pub async fn cached_tokens(&self, prompt: Vec<u32>) -> usize {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = self.commands.send(Command::Probe(prompt, tx));
        rx.await.unwrap_or(0)
    }

    /// Queues a request. Its tokens arrive on the returned channel; dropping the receiver
    /// aborts it (as a client disconnect aborts a request in vLLM).
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        output_tokens: usize,
        lora: u32,
        arrival: Instant,
    ) -> mpsc::UnboundedReceiver<Event> {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let _ = self.commands.send(Command::Submit(Submission {
            id,
            prompt,
            output_tokens,
            lora,
            arrival,
            events: tx,
        }));
        rx
    }
}

fn reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// If the engine falls this far behind its modelled clock (a busy machine), it stops
/// trying to catch up, so it never runs a burst of zero-length steps.
const MAX_LAG: Duration = Duration::from_millis(50);

async fn run(
    cfg: EngineConfig,
    mut commands: mpsc::UnboundedReceiver<Command>,
    stats: Arc<Mutex<EngineStats>>,
    slow_factor: Arc<AtomicU64>,
) {
    let new_scheduler = || {
        let mut s = Scheduler::new(cfg.scheduler.clone());
        if cfg.kv_events.is_some() {
            s.record_cache_events();
        }
        s
    };
    let mut sched = new_scheduler();
    let mut live: HashMap<SeqId, Live> = HashMap::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let mut clock = tokio::time::Instant::now();
    let jitter_cv = cfg.scheduler.perf.jitter_cv;
    let mut pending: Option<Command> = None;
    loop {
        // Intake: wait when idle, otherwise take whatever arrived.
        let mut next = match pending.take() {
            Some(c) => Some(c),
            None if sched.is_idle() => match commands.recv().await {
                Some(c) => Some(c),
                None => return,
            },
            None => None,
        };
        loop {
            let cmd = match next.take() {
                Some(c) => c,
                None => match commands.try_recv() {
                    Ok(c) => c,
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                },
            };
            match cmd {
                Command::Submit(s) => {
                    sched.add(NewSeq {
                        id: s.id,
                        prompt: s.prompt,
                        output_tokens: s.output_tokens,
                        lora: s.lora,
                    });
                    live.insert(
                        s.id,
                        Live {
                            events: s.events,
                            arrival: s.arrival,
                            last_token: None,
                        },
                    );
                }
                Command::Probe(prompt, answer) => {
                    let _ = answer.send(sched.cached_prefix(&prompt, 0));
                }
                Command::Reset => {
                    sched = new_scheduler();
                    if let Some(k) = &cfg.kv_events {
                        let _ = k.tx.send(super::kv_publish::Publish::Restart);
                    }
                    live.clear();
                    *stats.lock() = EngineStats::new();
                }
            }
        }
        // Clients that left.
        let gone: Vec<SeqId> = live
            .iter()
            .filter(|(_, l)| l.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in &gone {
            sched.abort(*id);
            live.remove(id);
        }
        if !gone.is_empty() {
            stats.lock().aborted += gone.len() as u64;
        }
        let Some(batch) = sched.schedule() else {
            // Requests wait but none can run (one larger than the whole cache): wait for
            // news instead of spinning.
            publish(&sched, &stats);
            match tokio::time::timeout(Duration::from_millis(10), commands.recv()).await {
                Ok(Some(c)) => pending = Some(c),
                Ok(None) => return,
                Err(_) => {}
            }
            continue;
        };
        let slow = f64::from_bits(slow_factor.load(Ordering::Relaxed));
        let step = sched.step_ms(&batch) * jitter(&mut rng, jitter_cv) * slow * cfg.time_scale;
        let now = tokio::time::Instant::now();
        if clock + MAX_LAG < now {
            clock = now;
        }
        clock += Duration::from_secs_f64(step.max(0.0) / 1000.0);
        tokio::time::sleep_until(clock).await;
        let outcome = sched.complete(&batch);
        if let Some(k) = &cfg.kv_events {
            let changes = sched.take_cache_events();
            if !changes.is_empty() {
                let _ = k.tx.send(super::kv_publish::Publish::Changes(changes));
            }
        }
        let now = Instant::now();
        let mut st = stats.lock();
        st.steps += 1;
        for id in &batch.admitted {
            if let Some(l) = live.get(id) {
                if sched.preemptions_of(*id) == 0 {
                    st.queue
                        .observe(now.duration_since(l.arrival).as_secs_f64());
                }
            }
        }
        for (id, index) in outcome.emitted {
            if let Some(l) = live.get_mut(&id) {
                match l.last_token {
                    None => st.ttft.observe(now.duration_since(l.arrival).as_secs_f64()),
                    Some(t) => st.itl.observe(now.duration_since(t).as_secs_f64()),
                }
                l.last_token = Some(now);
                // A send error means the client left: the abort happens next step.
                let _ = l.events.send(Event::Token(index));
            }
        }
        for (id, r) in outcome.finished {
            if let Some(l) = live.remove(&id) {
                st.e2e.observe(now.duration_since(l.arrival).as_secs_f64());
                let _ = l.events.send(Event::Finished(reason(r)));
            }
            match r {
                FinishReason::Stop => st.success_stop += 1,
                FinishReason::Length => st.success_length += 1,
            }
            sched.forget(id);
        }
        drop(st);
        publish(&sched, &stats);
    }
}

fn publish(sched: &Scheduler, stats: &Mutex<EngineStats>) {
    let mut st = stats.lock();
    st.running = sched.num_running();
    st.waiting = sched.num_waiting();
    if sched.config().max_loras > 0 {
        st.deferred = sched.num_deferred();
        st.running_loras = sched.running_loras();
        st.waiting_loras = sched.waiting_loras();
    }
    st.kv_usage = sched.kv_usage();
    st.counters = sched.counters();
}
