//! A step-level model of vLLM's V1 scheduler, as a pure state machine (no I/O, no clock):
//! continuous batching under `max_num_seqs` and a per-step token budget, chunked prefill,
//! KV blocks allocated per step, preemption by recompute (newest running request first)
//! when blocks run out, head-of-line blocking in `waiting`, and prefix caching by chained
//! block hashes with LRU eviction. [`PerfModel`] turns a step's shape into its duration
//! (docs/simulator.md); [`simulate`] runs a trace on a virtual clock.
//!
//! The real-time engine (`engine.rs`) drives the same [`Scheduler`] step by step.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

/// Step-time coefficients (milliseconds). Defaults: Llama-3-8B, BF16, one H100.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerfModel {
    /// Fixed cost of every step (launch, sampler, sync).
    pub step_overhead_ms: f64,
    /// Memory-bound floor of any step: reading the weights once.
    pub weights_read_ms: f64,
    /// Compute cost per scheduled token (linear layers).
    pub linear_ms_per_token: f64,
    /// Causal attention of prefill chunks, per unit of Σ t·(s + t/2).
    pub attn_prefill_ms_per_unit: f64,
    /// Decode attention: reading the KV of every decoding sequence's context.
    pub kv_read_ms_per_ctx_token: f64,
    /// Per sequence in the batch.
    pub per_seq_ms: f64,
    /// Relative spread of step times (lognormal σ); 0 for exact tests.
    pub jitter_cv: f64,
    /// Per request, before it reaches the engine (tokenization, validation).
    pub api_overhead_ms: f64,
}

impl PerfModel {
    pub const LLAMA3_8B_H100: PerfModel = PerfModel {
        step_overhead_ms: 0.8,
        weights_read_ms: 5.6,
        linear_ms_per_token: 0.025,
        attn_prefill_ms_per_unit: 1.3e-6,
        kv_read_ms_per_ctx_token: 6.5e-5,
        per_seq_ms: 0.005,
        jitter_cv: 0.03,
        api_overhead_ms: 2.0,
    };
    pub const LLAMA3_8B_A100: PerfModel = PerfModel {
        weights_read_ms: 8.6,
        linear_ms_per_token: 0.07,
        kv_read_ms_per_ctx_token: 1.0e-4,
        ..PerfModel::LLAMA3_8B_H100
    };

    /// Duration of one step, without jitter, divided by `speed_factor`.
    pub fn step_ms(&self, shape: &StepShape, speed_factor: f64) -> f64 {
        let n = shape.tokens as f64;
        let gpu = self.weights_read_ms.max(self.linear_ms_per_token * n)
            + self.attn_prefill_ms_per_unit * shape.prefill_attn_units
            + self.kv_read_ms_per_ctx_token * shape.decode_ctx_tokens as f64
            + self.per_seq_ms * shape.seqs as f64;
        self.step_overhead_ms + gpu / speed_factor.max(1e-6)
    }
}

/// What a step's duration depends on.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepShape {
    /// Tokens computed in the step (prefill chunks plus one per decoder).
    pub tokens: usize,
    pub seqs: usize,
    /// Σ t·(s + t/2) over prefill chunks of t new tokens after s computed ones.
    pub prefill_attn_units: f64,
    /// Σ context length over decoding sequences.
    pub decode_ctx_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub block_size: usize,
    /// KV capacity in tokens; `kv_tokens / block_size` blocks, one of them reserved.
    pub kv_tokens: usize,
    pub enable_prefix_caching: bool,
    pub max_model_len: usize,
    pub perf: PerfModel,
    /// Heterogeneous replicas: GPU time is divided by this.
    pub speed_factor: f64,
    /// Most distinct LoRA adapters in one batch (vLLM's `--max-loras`); a waiting request
    /// whose adapter would exceed it is skipped (deferred) until one of the batch's
    /// adapters has no request running. 0: LoRA is off.
    pub max_loras: usize,
}

impl SchedulerConfig {
    /// Blocks requests can use (one is vLLM's reserved null block).
    pub fn usable_blocks(&self) -> usize {
        (self.kv_tokens / self.block_size.max(1))
            .saturating_sub(1)
            .max(1)
    }
    /// The longest prompt + output the engine accepts: a request must fit the KV cache
    /// alone (vLLM refuses to start otherwise).
    pub fn effective_max_model_len(&self) -> usize {
        self.max_model_len
            .min(self.usable_blocks() * self.block_size)
    }
}

pub type SeqId = u64;

/// A request as the engine sees it.
#[derive(Debug, Clone)]
pub struct NewSeq {
    pub id: SeqId,
    pub prompt: Vec<u32>,
    /// Tokens to generate (already capped by `max_tokens` and the model length).
    pub output_tokens: usize,
    /// The LoRA adapter it runs with (vLLM's `lora_int_id`, from 1); 0: the base model.
    pub lora: u32,
}

#[derive(Debug, Clone)]
struct Seq {
    tokens: Vec<u32>,
    prompt_len: usize,
    output_target: usize,
    generated: usize,
    num_computed: usize,
    blocks: Vec<u32>,
    /// Chained hashes of the full blocks computed so far.
    hashes: Vec<u64>,
    preemptions: u32,
    /// Prompt tokens found in the prefix cache at first admission.
    cached_tokens: Option<usize>,
    lora: u32,
}

impl Seq {
    fn num_tokens(&self) -> usize {
        self.tokens.len()
    }
}

/// One scheduled piece of work in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    pub id: SeqId,
    /// Tokens computed for it in this step.
    pub tokens: usize,
    /// Tokens already computed before the step.
    pub computed_before: usize,
    pub decode: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    pub items: Vec<Scheduled>,
    /// Requests admitted from `waiting` in this step (their queueing ends now).
    pub admitted: Vec<SeqId>,
    pub preempted: Vec<SeqId>,
    pub shape: StepShape,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The output reached its natural end.
    Stop,
    /// The output was capped (`max_tokens` or the model length).
    Length,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutcome {
    /// (request, index of the token emitted; 0 is the first token).
    pub emitted: Vec<(SeqId, usize)>,
    pub finished: Vec<(SeqId, FinishReason)>,
}

/// Cumulative counters, as vLLM exports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerCounters {
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    pub preemptions: u64,
    pub prompt_tokens: u64,
    pub prompt_tokens_cached: u64,
    pub generation_tokens: u64,
}

// -----------------------------------------------------------------------------------------
// Block pool
// -----------------------------------------------------------------------------------------

const NONE: u32 = u32::MAX;

/// KV blocks with reference counts, an LRU free queue (a doubly linked list over block
/// indices, so a cache hit can take a block out of the middle), and the prefix cache's
/// hash → block map. Free blocks that hold a cached prefix stay reusable by hash until
/// they are popped for a new allocation (eviction).
#[derive(Debug, Clone)]
struct BlockPool {
    ref_cnt: Vec<u32>,
    hash: Vec<Option<u64>>,
    prev: Vec<u32>,
    next: Vec<u32>,
    in_free: Vec<bool>,
    head: u32,
    tail: u32,
    num_free: usize,
    cached: HashMap<u64, u32>,
    /// The prefix cache's changes since they were last taken, when they are recorded
    /// (the KV events the simulator publishes).
    log: Option<Vec<CacheEvent>>,
}

/// A change of the prefix cache, as vLLM reports it in its KV events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheEvent {
    /// A full block newly cached: its hash, its parent's (`None` for a prompt's first
    /// block), its tokens and the adapter it was computed with.
    Stored {
        hash: u64,
        parent: Option<u64>,
        tokens: Vec<u32>,
        lora: u32,
    },
    /// A cached block evicted.
    Removed(u64),
}

impl BlockPool {
    fn new(blocks: usize) -> BlockPool {
        let mut pool = BlockPool {
            ref_cnt: vec![0; blocks],
            hash: vec![None; blocks],
            prev: vec![NONE; blocks],
            next: vec![NONE; blocks],
            in_free: vec![false; blocks],
            head: NONE,
            tail: NONE,
            num_free: 0,
            cached: HashMap::new(),
            log: None,
        };
        for b in 0..blocks as u32 {
            pool.push_back(b);
        }
        pool
    }

    fn total(&self) -> usize {
        self.ref_cnt.len()
    }

    fn push_back(&mut self, b: u32) {
        let i = b as usize;
        self.prev[i] = self.tail;
        self.next[i] = NONE;
        if self.tail != NONE {
            self.next[self.tail as usize] = b;
        } else {
            self.head = b;
        }
        self.tail = b;
        self.in_free[i] = true;
        self.num_free += 1;
    }

    fn push_front(&mut self, b: u32) {
        let i = b as usize;
        self.next[i] = self.head;
        self.prev[i] = NONE;
        if self.head != NONE {
            self.prev[self.head as usize] = b;
        } else {
            self.tail = b;
        }
        self.head = b;
        self.in_free[i] = true;
        self.num_free += 1;
    }

    fn remove(&mut self, b: u32) {
        let i = b as usize;
        debug_assert!(self.in_free[i]);
        let (p, n) = (self.prev[i], self.next[i]);
        if p != NONE {
            self.next[p as usize] = n;
        } else {
            self.head = n;
        }
        if n != NONE {
            self.prev[n as usize] = p;
        } else {
            self.tail = p;
        }
        self.in_free[i] = false;
        self.num_free -= 1;
    }

    /// Takes the least recently freed block, evicting the prefix it caches.
    fn pop_front(&mut self) -> Option<u32> {
        let b = self.head;
        if b == NONE {
            return None;
        }
        self.remove(b);
        if let Some(h) = self.hash[b as usize].take() {
            if self.cached.get(&h) == Some(&b) {
                self.cached.remove(&h);
                if let Some(log) = &mut self.log {
                    log.push(CacheEvent::Removed(h));
                }
            }
        }
        self.ref_cnt[b as usize] = 1;
        Some(b)
    }

    /// Takes a reference on a cached block (a prefix-cache hit).
    fn touch(&mut self, b: u32) {
        if self.ref_cnt[b as usize] == 0 {
            self.remove(b);
        }
        self.ref_cnt[b as usize] += 1;
    }

    /// Releases a sequence's blocks, last block first, so its tail is evicted before its
    /// (more shareable) head. Blocks holding nothing cached are reused first.
    fn release(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            let i = b as usize;
            self.ref_cnt[i] -= 1;
            if self.ref_cnt[i] == 0 {
                if self.hash[i].is_some() {
                    self.push_back(b);
                } else {
                    self.push_front(b);
                }
            }
        }
    }

    fn used(&self) -> usize {
        self.total() - self.num_free
    }
}

fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// A generated token's id: unique per request and position, so outputs of different
/// requests never share cache blocks.
fn generated_token(id: SeqId, index: usize) -> u32 {
    (block_hash(id, &[index as u32]) as u32) | 1
}

// -----------------------------------------------------------------------------------------
// Scheduler
// -----------------------------------------------------------------------------------------

/// Cloneable, so that a what-if (the routing bound in `benches/routing_bound.rs`) can run a
/// copy forward.
#[derive(Clone)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    pool: BlockPool,
    seqs: HashMap<SeqId, Seq>,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    counters: SchedulerCounters,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Scheduler {
        let pool = BlockPool::new(cfg.usable_blocks());
        Scheduler {
            cfg,
            pool,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            counters: SchedulerCounters::default(),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }
    /// Records the prefix cache's changes from now on ([`Scheduler::take_cache_events`]).
    pub fn record_cache_events(&mut self) {
        self.pool.log.get_or_insert_with(Vec::new);
    }
    /// The prefix cache's changes since the last call, in order.
    pub fn take_cache_events(&mut self) -> Vec<CacheEvent> {
        self.pool
            .log
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }
    pub fn counters(&self) -> SchedulerCounters {
        self.counters
    }
    /// Fraction of KV blocks referenced by requests (cached free blocks count as free).
    pub fn kv_usage(&self) -> f64 {
        self.pool.used() as f64 / self.pool.total() as f64
    }
    /// Prompt tokens of `id` served from the prefix cache when it was first admitted.
    pub fn cached_tokens(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).and_then(|s| s.cached_tokens)
    }
    pub fn preemptions_of(&self, id: SeqId) -> u32 {
        self.seqs.get(&id).map_or(0, |s| s.preemptions)
    }

    /// The distinct LoRA adapters of the running requests.
    pub fn running_loras(&self) -> Vec<u32> {
        self.distinct_loras(&self.running)
    }

    /// The distinct LoRA adapters of the waiting requests.
    pub fn waiting_loras(&self) -> Vec<u32> {
        self.distinct_loras(&self.waiting)
    }

    fn distinct_loras<'a>(&self, ids: impl IntoIterator<Item = &'a SeqId>) -> Vec<u32> {
        let mut out = Vec::new();
        for id in ids {
            let l = self.seqs[id].lora;
            if l != 0 && !out.contains(&l) {
                out.push(l);
            }
        }
        out
    }

    /// Waiting requests whose adapter cannot join the batch now (vLLM's
    /// `num_requests_waiting_by_reason{reason="deferred"}`).
    pub fn num_deferred(&self) -> usize {
        let loras = self.running_loras();
        self.waiting
            .iter()
            .filter(|id| !self.lora_fits(&loras, self.seqs[id].lora))
            .count()
    }

    /// Whether a request of adapter `lora` can join a batch running `loras`.
    fn lora_fits(&self, loras: &[u32], lora: u32) -> bool {
        lora == 0
            || self.cfg.max_loras == 0
            || loras.contains(&lora)
            || loras.len() < self.cfg.max_loras
    }

    /// Queues a request. The caller keeps prompt + output within
    /// `effective_max_model_len`.
    pub fn add(&mut self, req: NewSeq) {
        let prompt_len = req.prompt.len();
        let mut tokens = req.prompt;
        tokens.reserve(req.output_tokens);
        self.seqs.insert(
            req.id,
            Seq {
                tokens,
                prompt_len,
                output_target: req.output_tokens.max(1),
                generated: 0,
                num_computed: 0,
                blocks: Vec::new(),
                hashes: Vec::new(),
                preemptions: 0,
                cached_tokens: None,
                lora: req.lora,
            },
        );
        self.waiting.push_back(req.id);
    }

    /// Removes a request wherever it is (a client that left), freeing its blocks.
    pub fn abort(&mut self, id: SeqId) -> bool {
        let Some(seq) = self.seqs.remove(&id) else {
            return false;
        };
        self.pool.release(&seq.blocks);
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&r| r != id);
        true
    }

    /// Forgets a finished request's bookkeeping (called after its outcome was read).
    pub fn forget(&mut self, id: SeqId) {
        if !self.running.contains(&id) && !self.waiting.contains(&id) {
            self.seqs.remove(&id);
        }
    }

    fn allocate(&mut self, id: SeqId, upto_tokens: usize) -> bool {
        let bs = self.cfg.block_size;
        let seq = self.seqs.get_mut(&id).expect("scheduled seq exists");
        let need = upto_tokens.div_ceil(bs).saturating_sub(seq.blocks.len());
        if need > self.pool.num_free {
            return false;
        }
        for _ in 0..need {
            let b = self.pool.pop_front().expect("counted free block");
            seq.blocks.push(b);
        }
        true
    }

    fn preempt(&mut self, id: SeqId) {
        let seq = self.seqs.get_mut(&id).expect("running seq exists");
        let blocks = std::mem::take(&mut seq.blocks);
        seq.num_computed = 0;
        seq.hashes.clear();
        seq.preemptions += 1;
        self.pool.release(&blocks);
        self.waiting.push_front(id);
        self.counters.preemptions += 1;
    }

    /// Prompt tokens of `prompt` (run with adapter `lora`) that the prefix cache holds
    /// now, as an admission would find them: what an oracle router knows.
    pub fn cached_prefix(&self, prompt: &[u32], lora: u32) -> usize {
        let bs = self.cfg.block_size;
        let mut parent = u64::from(lora);
        let mut n = 0;
        for block in prompt[..prompt.len().saturating_sub(1)].chunks_exact(bs) {
            let h = block_hash(parent, block);
            if !self.pool.cached.contains_key(&h) {
                break;
            }
            n += bs;
            parent = h;
        }
        n
    }

    /// Blocks of `id`'s leading full blocks found in the prefix cache, capped so that at
    /// least the last token is computed (it produces the logits).
    fn lookup(&self, id: SeqId) -> Vec<u32> {
        let seq = &self.seqs[&id];
        let bs = self.cfg.block_size;
        let max_blocks = (seq.num_tokens().saturating_sub(1)) / bs;
        let mut hits = Vec::new();
        // As vLLM does, the adapter is part of the first block's hash: requests of
        // different adapters never share KV.
        let mut parent = u64::from(seq.lora);
        for k in 0..max_blocks {
            let h = block_hash(parent, &seq.tokens[k * bs..(k + 1) * bs]);
            match self.pool.cached.get(&h) {
                Some(&b) => hits.push(b),
                None => break,
            }
            parent = h;
        }
        hits
    }

    /// Chooses the work of the next step; `None` when there is nothing to run.
    pub fn schedule(&mut self) -> Option<Batch> {
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut batch = Batch::default();

        // 1. Running requests, in order; preempt the newest when blocks run out.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let seq = &self.seqs[&id];
            let before = seq.num_computed;
            let n = (seq.num_tokens() - before).min(budget);
            let decode = seq.generated > 0 && n == 1 && before + 1 == seq.num_tokens();
            loop {
                if self.allocate(id, before + n) {
                    batch.items.push(Scheduled {
                        id,
                        tokens: n,
                        computed_before: before,
                        decode,
                    });
                    budget -= n;
                    i += 1;
                    break;
                }
                let victim = self.running.pop().expect("running is not empty");
                self.preempt(victim);
                batch.preempted.push(victim);
                if victim == id {
                    break;
                }
            }
        }

        // 2. Waiting requests, only if nothing was preempted; the head blocks the rest,
        // except a request whose LoRA adapter cannot join the batch: it is skipped and
        // keeps its place (vLLM's deferred requests).
        if batch.preempted.is_empty() {
            let mut loras = self.running_loras();
            let mut at = 0;
            while budget > 0
                && self.running.len() < self.cfg.max_num_seqs
                && at < self.waiting.len()
            {
                let id = self.waiting[at];
                let lora = self.seqs[&id].lora;
                if !self.lora_fits(&loras, lora) {
                    at += 1;
                    continue;
                }
                let hits = if self.cfg.enable_prefix_caching {
                    self.lookup(id)
                } else {
                    Vec::new()
                };
                let bs = self.cfg.block_size;
                let cached = hits.len() * bs;
                let num_tokens = self.seqs[&id].num_tokens();
                let n = (num_tokens - cached).min(budget);
                // Hits on blocks nobody references take them out of the free queue too.
                let idle_hits = hits
                    .iter()
                    .filter(|&&b| self.pool.ref_cnt[b as usize] == 0)
                    .count();
                let need = (cached + n).div_ceil(bs) - hits.len();
                if need + idle_hits > self.pool.num_free {
                    break;
                }
                for &b in &hits {
                    self.pool.touch(b);
                }
                let seq = self.seqs.get_mut(&id).expect("waiting seq exists");
                seq.blocks = hits;
                seq.num_computed = cached;
                if seq.cached_tokens.is_none() {
                    seq.cached_tokens = Some(cached);
                }
                self.counters.prefix_queries += num_tokens as u64;
                self.counters.prefix_hits += cached as u64;
                let allocated = self.allocate(id, cached + n);
                debug_assert!(allocated, "capacity was checked");
                self.waiting.remove(at);
                if lora != 0 && !loras.contains(&lora) {
                    loras.push(lora);
                }
                self.running.push(id);
                batch.admitted.push(id);
                batch.items.push(Scheduled {
                    id,
                    tokens: n,
                    computed_before: cached,
                    decode: false,
                });
                budget -= n;
            }
        }

        if batch.items.is_empty() {
            return None;
        }
        for it in &batch.items {
            batch.shape.tokens += it.tokens;
            batch.shape.seqs += 1;
            if it.decode {
                batch.shape.decode_ctx_tokens += it.computed_before;
            } else {
                let (t, s) = (it.tokens as f64, it.computed_before as f64);
                batch.shape.prefill_attn_units += t * (s + t / 2.0);
            }
        }
        Some(batch)
    }

    /// Duration of `batch` in milliseconds, without jitter.
    pub fn step_ms(&self, batch: &Batch) -> f64 {
        self.cfg.perf.step_ms(&batch.shape, self.cfg.speed_factor)
    }

    /// Applies a scheduled step: advances computed tokens, caches full blocks, emits a
    /// token for every request whose tokens are all computed, finishes requests.
    pub fn complete(&mut self, batch: &Batch) -> StepOutcome {
        let mut out = StepOutcome::default();
        let bs = self.cfg.block_size;
        let max_len = self.cfg.effective_max_model_len();
        for it in &batch.items {
            let Some(seq) = self.seqs.get_mut(&it.id) else {
                continue; // aborted meanwhile
            };
            seq.num_computed += it.tokens;
            if self.cfg.enable_prefix_caching {
                let full = seq.num_computed / bs;
                while seq.hashes.len() < full {
                    let k = seq.hashes.len();
                    let parent = if k == 0 {
                        u64::from(seq.lora)
                    } else {
                        seq.hashes[k - 1]
                    };
                    let h = block_hash(parent, &seq.tokens[k * bs..(k + 1) * bs]);
                    seq.hashes.push(h);
                    let b = seq.blocks[k];
                    if self.pool.hash[b as usize].is_none() && !self.pool.cached.contains_key(&h) {
                        self.pool.hash[b as usize] = Some(h);
                        self.pool.cached.insert(h, b);
                        if let Some(log) = &mut self.pool.log {
                            log.push(CacheEvent::Stored {
                                hash: h,
                                parent: (k > 0).then_some(parent),
                                tokens: seq.tokens[k * bs..(k + 1) * bs].to_vec(),
                                lora: seq.lora,
                            });
                        }
                    }
                }
            }
            if seq.num_computed < seq.num_tokens() {
                continue; // prefill continues next step
            }
            let index = seq.generated;
            seq.generated += 1;
            seq.tokens.push(generated_token(it.id, index));
            out.emitted.push((it.id, index));
            self.counters.generation_tokens += 1;
            if index == 0 {
                self.counters.prompt_tokens += seq.prompt_len as u64;
                self.counters.prompt_tokens_cached += seq.cached_tokens.unwrap_or(0) as u64;
            }
            let capped = seq.num_tokens() >= max_len;
            if seq.generated >= seq.output_target || capped {
                let blocks = std::mem::take(&mut seq.blocks);
                self.pool.release(&blocks);
                self.running.retain(|&r| r != it.id);
                out.finished.push((
                    it.id,
                    if capped {
                        FinishReason::Length
                    } else {
                        FinishReason::Stop
                    },
                ));
            }
        }
        out
    }
}

// -----------------------------------------------------------------------------------------
// Virtual clock
// -----------------------------------------------------------------------------------------

/// A request of a trace for [`simulate`].
#[derive(Debug, Clone)]
pub struct TraceRequest {
    /// Seconds from the start of the trace.
    pub arrival_s: f64,
    pub prompt: Vec<u32>,
    pub output_tokens: usize,
}

/// What happened to one request of a trace (seconds).
#[derive(Debug, Clone, PartialEq)]
pub struct RequestTiming {
    pub ttft_s: f64,
    pub e2e_s: f64,
    /// Arrival (plus API overhead) to first scheduled.
    pub queue_s: f64,
    /// Longest gap between two consecutive tokens.
    pub max_itl_s: f64,
    /// Median gap between two consecutive tokens.
    pub median_itl_s: f64,
    pub cached_tokens: usize,
    pub preemptions: u32,
}

#[derive(Debug, Clone)]
pub struct SimulationResult {
    pub requests: Vec<RequestTiming>,
    pub counters: SchedulerCounters,
    pub steps: u64,
    pub duration_s: f64,
}

/// A multiplicative lognormal factor with median 1 and spread `cv` (Box–Muller).
pub fn jitter<R: rand::Rng>(rng: &mut R, cv: f64) -> f64 {
    if cv <= 0.0 {
        return 1.0;
    }
    let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.gen();
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    (cv * z).exp()
}

/// Runs a trace through the scheduler on a virtual clock: deterministic for a given
/// `seed`, and as fast as the scheduler itself.
pub fn simulate(cfg: SchedulerConfig, trace: &[TraceRequest], seed: u64) -> SimulationResult {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let api = cfg.perf.api_overhead_ms / 1000.0;
    let jitter_cv = cfg.perf.jitter_cv;
    let mut sched = Scheduler::new(cfg);
    let mut order: Vec<usize> = (0..trace.len()).collect();
    order.sort_by(|&a, &b| trace[a].arrival_s.total_cmp(&trace[b].arrival_s));
    let mut next = 0;
    let mut now = 0.0f64;
    let mut first_scheduled = vec![f64::NAN; trace.len()];
    let mut first_token = vec![f64::NAN; trace.len()];
    let mut last_token = vec![f64::NAN; trace.len()];
    let mut itls: Vec<Vec<f64>> = vec![Vec::new(); trace.len()];
    let mut finished = vec![f64::NAN; trace.len()];
    let mut cached = vec![0usize; trace.len()];
    let mut preemptions = vec![0u32; trace.len()];
    let mut steps = 0u64;
    let mut done = 0;
    while done < trace.len() {
        // Admit every request that has reached the engine by now.
        while next < order.len() && trace[order[next]].arrival_s + api <= now {
            let i = order[next];
            sched.add(NewSeq {
                id: i as SeqId,
                prompt: trace[i].prompt.clone(),
                output_tokens: trace[i].output_tokens,
                lora: 0,
            });
            next += 1;
        }
        let Some(batch) = sched.schedule() else {
            match order.get(next) {
                Some(&i) => {
                    now = now.max(trace[i].arrival_s + api);
                    continue;
                }
                None => break, // nothing can ever run (a request larger than the cache)
            }
        };
        now += sched.step_ms(&batch) * jitter(&mut rng, jitter_cv) / 1000.0;
        steps += 1;
        for &id in &batch.admitted {
            let i = id as usize;
            if first_scheduled[i].is_nan() {
                first_scheduled[i] = now - sched.step_ms(&batch) / 1000.0;
            }
        }
        let outcome = sched.complete(&batch);
        for (id, index) in outcome.emitted {
            let i = id as usize;
            if index == 0 {
                first_token[i] = now;
                cached[i] = sched.cached_tokens(id).unwrap_or(0);
            } else {
                itls[i].push(now - last_token[i]);
            }
            last_token[i] = now;
        }
        for (id, _) in outcome.finished {
            let i = id as usize;
            finished[i] = now;
            preemptions[i] = sched.preemptions_of(id);
            sched.forget(id);
            done += 1;
        }
    }
    let requests = (0..trace.len())
        .map(|i| {
            let gaps = &mut itls[i];
            gaps.sort_by(f64::total_cmp);
            (
                i,
                gaps.last().copied().unwrap_or(0.0),
                gaps.get(gaps.len() / 2).copied().unwrap_or(0.0),
            )
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|(i, max_itl, median_itl)| RequestTiming {
            ttft_s: first_token[i] - trace[i].arrival_s,
            e2e_s: finished[i] - trace[i].arrival_s,
            queue_s: first_scheduled[i] - trace[i].arrival_s - api,
            max_itl_s: max_itl,
            median_itl_s: median_itl,
            cached_tokens: cached[i],
            preemptions: preemptions[i],
        })
        .collect();
    SimulationResult {
        requests,
        counters: sched.counters(),
        steps,
        duration_s: now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h100() -> SchedulerConfig {
        SchedulerConfig {
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            block_size: 16,
            kv_tokens: 450_000,
            enable_prefix_caching: true,
            max_model_len: 131_072,
            perf: PerfModel {
                jitter_cv: 0.0,
                ..PerfModel::LLAMA3_8B_H100
            },
            speed_factor: 1.0,
            max_loras: 0,
        }
    }

    /// Distinct token ids per `salt`, so prompts share nothing unless asked to.
    fn prompt(salt: u32, len: usize) -> Vec<u32> {
        (0..len as u32)
            .map(|i| salt.wrapping_mul(1_000_003) ^ (i + 1))
            .collect()
    }

    fn within(actual: f64, expected: f64, what: &str) {
        let err = (actual - expected).abs() / expected;
        assert!(err <= 0.15, "{what}: {actual:.2} vs {expected:.2} (±15%)");
    }

    #[test]
    fn idle_ttft_matches_the_calibration_table() {
        let api_ms = PerfModel::LLAMA3_8B_H100.api_overhead_ms;
        for (len, expected_ms) in [
            (256, 7.0),
            (1024, 27.0),
            (2048, 55.0),
            (4096, 114.0),
            (8192, 249.0),
        ] {
            let r = simulate(
                h100(),
                &[TraceRequest {
                    arrival_s: 0.0,
                    prompt: prompt(1, len),
                    output_tokens: 1,
                }],
                1,
            );
            within(
                r.requests[0].ttft_s * 1000.0 - api_ms,
                expected_ms,
                &format!("TTFT of {len} tokens"),
            );
        }
    }

    #[test]
    fn decode_step_time_matches_the_calibration_table() {
        let perf = PerfModel::LLAMA3_8B_H100;
        for (batch, expected_ms) in [
            (1, 6.5),
            (8, 7.0),
            (32, 8.7),
            (64, 11.0),
            (128, 15.6),
            (256, 25.5),
        ] {
            let shape = StepShape {
                tokens: batch,
                seqs: batch,
                prefill_attn_units: 0.0,
                decode_ctx_tokens: batch * 1024,
            };
            within(
                perf.step_ms(&shape, 1.0),
                expected_ms,
                &format!("decode step, batch {batch}"),
            );
        }
        // And inside a full simulation: the typical gap between tokens of 64 requests with
        // ~1k contexts (prefill steps are the rare outliers).
        let trace: Vec<TraceRequest> = (0..64)
            .map(|i| TraceRequest {
                arrival_s: 0.0,
                prompt: prompt(i, 1000),
                output_tokens: 100,
            })
            .collect();
        let r = simulate(h100(), &trace, 1);
        let mut medians: Vec<f64> = r.requests.iter().map(|t| t.median_itl_s * 1000.0).collect();
        medians.sort_by(f64::total_cmp);
        within(medians[32], 11.0, "median ITL at batch 64");
    }

    #[test]
    fn mixed_step_matches_the_calibration_table() {
        let perf = PerfModel::LLAMA3_8B_H100;
        let shape = |chunk: usize| StepShape {
            tokens: 64 + chunk,
            seqs: 65,
            prefill_attn_units: chunk as f64 * (chunk as f64 / 2.0),
            decode_ctx_tokens: 64 * 1024,
        };
        within(
            perf.step_ms(&shape(2048), 1.0),
            61.0,
            "64 decoders + 2048-token chunk",
        );
        within(
            perf.step_ms(&shape(8128), 1.0),
            253.0,
            "64 decoders + 8128-token chunk",
        );
    }

    #[test]
    fn full_kv_preempts_and_preempted_requests_still_complete() {
        // 4096 tokens of KV; 8 requests of 300 + 400 tokens need 5600.
        let cfg = SchedulerConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: 512,
            kv_tokens: 4096,
            ..h100()
        };
        let trace: Vec<TraceRequest> = (0..8)
            .map(|i| TraceRequest {
                arrival_s: 0.0,
                prompt: prompt(i, 300),
                output_tokens: 400,
            })
            .collect();
        let r = simulate(cfg, &trace, 1);
        assert!(
            r.counters.preemptions > 0,
            "no preemption: {:?}",
            r.counters
        );
        assert!(
            r.requests.iter().all(|t| t.e2e_s.is_finite()),
            "every request completes"
        );
        assert_eq!(r.counters.generation_tokens, 8 * 400);
        let victim = r
            .requests
            .iter()
            .find(|t| t.preemptions > 0)
            .expect("a preempted request");
        let spared = r
            .requests
            .iter()
            .filter(|t| t.preemptions == 0)
            .map(|t| t.max_itl_s)
            .fold(0.0, f64::max);
        // A preempted request waits for its recompute: a gap no unpreempted one sees.
        assert!(victim.max_itl_s > spared, "{victim:?} vs {spared}");
    }

    #[test]
    fn shared_prefix_hits_the_cache_and_cuts_ttft() {
        let p = prompt(7, 2048);
        let trace = [
            TraceRequest {
                arrival_s: 0.0,
                prompt: p.clone(),
                output_tokens: 4,
            },
            TraceRequest {
                arrival_s: 1.0,
                prompt: p,
                output_tokens: 4,
            },
        ];
        let r = simulate(h100(), &trace, 1);
        assert_eq!(r.requests[0].cached_tokens, 0);
        assert_eq!(r.requests[1].cached_tokens, 2032, "floor(2047/16)*16");
        assert_eq!(r.counters.prefix_hits, 2032);
        assert_eq!(r.counters.prefix_queries, 2 * 2048);
        let api = PerfModel::LLAMA3_8B_H100.api_overhead_ms / 1000.0;
        let (cold, warm) = (r.requests[0].ttft_s - api, r.requests[1].ttft_s - api);
        within(warm * 1000.0, 6.7, "TTFT with 2032 of 2048 tokens cached");
        assert!(cold > 6.0 * warm, "cold {cold} vs warm {warm}");
    }

    #[test]
    fn ttft_grows_with_the_queue() {
        let cfg = SchedulerConfig {
            max_num_seqs: 4,
            ..h100()
        };
        let trace: Vec<TraceRequest> = (0..16)
            .map(|i| TraceRequest {
                arrival_s: 0.0,
                prompt: prompt(i, 512),
                output_tokens: 50,
            })
            .collect();
        let r = simulate(cfg, &trace, 1);
        for wave in 1..4 {
            let before = r.requests[(wave - 1) * 4].ttft_s;
            let after = r.requests[wave * 4].ttft_s;
            assert!(after > before + 0.2, "wave {wave}: {after} vs {before}");
            assert!(r.requests[wave * 4].queue_s > 0.2);
        }
    }

    #[test]
    fn distinct_prefixes_evict_the_oldest() {
        // 64 blocks of cache: the first prefix is evicted by the later ones.
        let cfg = SchedulerConfig {
            kv_tokens: 65 * 16,
            max_num_batched_tokens: 2048,
            ..h100()
        };
        let mut trace: Vec<TraceRequest> = (0..6)
            .map(|i| TraceRequest {
                arrival_s: i as f64,
                prompt: prompt(i, 320),
                output_tokens: 2,
            })
            .collect();
        trace.push(TraceRequest {
            arrival_s: 10.0,
            prompt: prompt(5, 320),
            output_tokens: 2,
        });
        trace.push(TraceRequest {
            arrival_s: 11.0,
            prompt: prompt(0, 320),
            output_tokens: 2,
        });
        let r = simulate(cfg, &trace, 1);
        assert_eq!(
            r.requests[6].cached_tokens, 304,
            "the newest prefix is still cached"
        );
        assert_eq!(
            r.requests[7].cached_tokens, 0,
            "the oldest prefix was evicted"
        );
    }

    #[test]
    fn kv_usage_returns_to_zero_but_hits_remain_possible() {
        let mut s = Scheduler::new(h100());
        s.add(NewSeq {
            id: 1,
            prompt: prompt(3, 1000),
            output_tokens: 3,
            lora: 0,
        });
        while let Some(b) = s.schedule() {
            assert!(s.kv_usage() > 0.0);
            s.complete(&b);
        }
        assert_eq!(s.kv_usage(), 0.0);
        s.add(NewSeq {
            id: 2,
            prompt: prompt(3, 1000),
            output_tokens: 1,
            lora: 0,
        });
        let b = s.schedule().unwrap();
        assert_eq!(b.items[0].computed_before, 992);
    }

    #[test]
    fn a_lora_request_over_max_loras_is_deferred_and_later_ones_pass_it() {
        let mut s = Scheduler::new(SchedulerConfig {
            max_loras: 1,
            ..h100()
        });
        let seq = |id: SeqId, lora: u32, output_tokens: usize| NewSeq {
            id,
            prompt: prompt(id as u32, 64),
            output_tokens,
            lora,
        };
        s.add(seq(1, 1, 4));
        s.add(seq(2, 2, 1));
        s.add(seq(3, 1, 1));
        s.add(seq(4, 0, 1));
        let b = s.schedule().unwrap();
        // Adapter 2 cannot join a batch running adapter 1; the base model always can.
        assert_eq!(b.admitted, vec![1, 3, 4]);
        assert_eq!(s.running_loras(), vec![1]);
        assert_eq!(s.waiting_loras(), vec![2]);
        assert_eq!(s.num_deferred(), 1);
        s.complete(&b);
        // Request 1 still runs adapter 1: request 2 keeps waiting.
        let b = s.schedule().unwrap();
        assert!(b.admitted.is_empty());
        s.complete(&b);
        while s.running_loras() == vec![1] {
            let b = s.schedule().unwrap();
            s.complete(&b);
        }
        // Adapter 1 left the batch: adapter 2 takes its slot.
        let b = s.schedule().unwrap();
        assert_eq!(b.admitted, vec![2]);
        assert_eq!(s.num_deferred(), 0);

        // Without LoRA limits (max_loras 0) nothing is deferred.
        let mut s = Scheduler::new(h100());
        s.add(seq(1, 1, 4));
        s.add(seq(2, 2, 1));
        assert_eq!(s.schedule().unwrap().admitted, vec![1, 2]);
    }

    #[test]
    fn adapters_do_not_share_prefix_cache_blocks() {
        let mut s = Scheduler::new(h100());
        for (id, lora) in [(1, 1), (2, 2), (3, 1)] {
            s.add(NewSeq {
                id,
                prompt: prompt(9, 320),
                output_tokens: 1,
                lora,
            });
            while let Some(b) = s.schedule() {
                s.complete(&b);
            }
        }
        assert_eq!(s.cached_tokens(2), Some(0), "another adapter's KV");
        assert_eq!(s.cached_tokens(3), Some(304), "the same adapter's KV");
    }

    #[test]
    fn aborting_frees_blocks() {
        let mut s = Scheduler::new(h100());
        s.add(NewSeq {
            id: 1,
            prompt: prompt(3, 1000),
            output_tokens: 100,
            lora: 0,
        });
        let b = s.schedule().unwrap();
        s.complete(&b);
        assert!(s.kv_usage() > 0.0);
        assert!(s.abort(1));
        assert_eq!(s.kv_usage(), 0.0);
        assert!(s.is_idle());
    }

    #[test]
    fn runs_are_reproducible_under_a_seed() {
        let cfg = SchedulerConfig {
            perf: PerfModel::LLAMA3_8B_H100,
            ..h100()
        };
        let trace: Vec<TraceRequest> = (0..20)
            .map(|i| TraceRequest {
                arrival_s: i as f64 * 0.01,
                prompt: prompt(i, 300),
                output_tokens: 30,
            })
            .collect();
        let a = simulate(cfg.clone(), &trace, 42);
        let b = simulate(cfg.clone(), &trace, 42);
        let c = simulate(cfg, &trace, 43);
        assert_eq!(a.requests, b.requests);
        assert_ne!(a.requests, c.requests);
    }
}
