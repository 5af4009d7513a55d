//! The simulated engine: admits requests up to `max_num_seqs` (the rest wait in FIFO
//! order), "prefills" the prompt at a fixed rate, then emits one token per decode interval,
//! and keeps the counters and gauges that `/metrics` reports.
//!
//! This is the token-clock model of the gateway-core issue: enough to stream at a known
//! rate and to queue under load. The step-level V1 scheduler (batching, KV blocks,
//! preemption, prefix caching) replaces `run_request` behind the same `submit` interface.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    /// KV capacity in tokens (reported through `kv_cache_usage_perc` and
    /// `cache_config_info`).
    pub kv_tokens: usize,
    pub block_size: usize,
    /// Prompt tokens processed per second of (unscaled) time.
    pub prefill_tokens_per_s: f64,
    /// Time between two output tokens of one request.
    pub decode_interval: Duration,
    /// Fixed cost before the first token (API overhead, scheduling).
    pub ttft_base: Duration,
    /// All times are multiplied by this: 0.01 runs 100× faster than real time.
    pub time_scale: f64,
}

#[derive(Debug)]
pub struct GenRequest {
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// `length` if the output is capped by `max_tokens`, else `stop`.
    pub finish_reason: &'static str,
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
pub const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

#[derive(Debug, Clone)]
pub struct Counters {
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub success_stop: u64,
    pub success_length: u64,
    pub aborted: u64,
    pub ttft: Histogram,
    pub e2e: Histogram,
}

pub struct Engine {
    pub cfg: EngineConfig,
    slots: Semaphore,
    running: AtomicUsize,
    waiting: AtomicUsize,
    kv_used: AtomicUsize,
    preemptions: AtomicU64,
    counters: Mutex<Counters>,
}

/// One request's presence in a gauge; released on drop, so an abort at any await point
/// leaves the gauges right.
struct Gauge<'a>(&'a AtomicUsize, usize);
impl<'a> Gauge<'a> {
    fn add(g: &'a AtomicUsize, n: usize) -> Self {
        g.fetch_add(n, Ordering::Relaxed);
        Gauge(g, n)
    }
}
impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::Relaxed);
    }
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Arc<Engine> {
        Arc::new(Engine {
            slots: Semaphore::new(cfg.max_num_seqs.max(1)),
            cfg,
            running: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            kv_used: AtomicUsize::new(0),
            preemptions: AtomicU64::new(0),
            counters: Mutex::new(Counters {
                prompt_tokens: 0,
                generation_tokens: 0,
                success_stop: 0,
                success_length: 0,
                aborted: 0,
                ttft: Histogram::new(TTFT_BUCKETS),
                e2e: Histogram::new(E2E_BUCKETS),
            }),
        })
    }

    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
    /// Fraction of KV capacity held by running requests (0–1).
    pub fn kv_usage(&self) -> f64 {
        (self.kv_used.load(Ordering::Relaxed) as f64 / self.cfg.kv_tokens.max(1) as f64).min(1.0)
    }
    pub fn preemptions(&self) -> u64 {
        self.preemptions.load(Ordering::Relaxed)
    }
    pub fn counters(&self) -> Counters {
        self.counters.lock().expect("not poisoned").clone()
    }

    fn scaled(&self, d: Duration) -> Duration {
        d.mul_f64(self.cfg.time_scale)
    }

    /// Starts a request. Its events arrive on the returned channel; dropping the receiver
    /// aborts it (as a client disconnect aborts a request in vLLM).
    pub fn submit(self: &Arc<Self>, req: GenRequest, arrival: Instant) -> mpsc::Receiver<Event> {
        let (tx, rx) = mpsc::channel(64);
        let engine = self.clone();
        tokio::spawn(async move {
            let aborted = tokio::select! {
                done = engine.run_request(&req, arrival, &tx) => done.is_err(),
                _ = tx.closed() => true,
            };
            if aborted {
                engine.counters.lock().expect("not poisoned").aborted += 1;
            }
        });
        rx
    }

    async fn run_request(
        &self,
        req: &GenRequest,
        arrival: Instant,
        tx: &mpsc::Sender<Event>,
    ) -> Result<(), ()> {
        let permit = {
            let _waiting = Gauge::add(&self.waiting, 1);
            self.slots.acquire().await.map_err(|_| ())?
        };
        let _permit = permit;
        let _running = Gauge::add(&self.running, 1);
        let _kv = Gauge::add(&self.kv_used, req.prompt_tokens + req.output_tokens);
        let prefill = self.cfg.ttft_base
            + Duration::from_secs_f64(req.prompt_tokens as f64 / self.cfg.prefill_tokens_per_s);
        tokio::time::sleep(self.scaled(prefill)).await;
        let ttft = arrival.elapsed().as_secs_f64();
        {
            let mut c = self.counters.lock().expect("not poisoned");
            c.prompt_tokens += req.prompt_tokens as u64;
            c.ttft.observe(ttft);
        }
        let mut next = tokio::time::Instant::now();
        for i in 0..req.output_tokens {
            if i > 0 {
                next += self.scaled(self.cfg.decode_interval);
                tokio::time::sleep_until(next).await;
            }
            tx.send(Event::Token(i)).await.map_err(|_| ())?;
            self.counters
                .lock()
                .expect("not poisoned")
                .generation_tokens += 1;
        }
        {
            let mut c = self.counters.lock().expect("not poisoned");
            match req.finish_reason {
                "length" => c.success_length += 1,
                _ => c.success_stop += 1,
            }
            c.e2e.observe(arrival.elapsed().as_secs_f64());
        }
        tx.send(Event::Finished(req.finish_reason))
            .await
            .map_err(|_| ())
    }
}
