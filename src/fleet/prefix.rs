//! What each engine holds in its prefix cache, exactly, from its KV events
//! ([`crate::engine::kv_events`]): per backend, the blocks it reported stored and not yet
//! removed, keyed by this gateway's own chain key over the blocks' token ids, so the
//! engine's hash function need not be reproduced (a `BlockStored` carries the tokens and
//! its parent's hash; a `BlockRemoved` only hashes, mapped back to keys here).
//!
//! A request's full blocks ([`block_keys`]: its token ids in the engine's block size,
//! the LoRA adapter and `cache_salt` folded in as vLLM folds them) are looked up as the
//! longest run cached from the start ([`PrefixIndex::cached_blocks`]), which is what
//! vLLM's scheduler reuses.
//!
//! The index knows whether it can be trusted ([`Coverage`]): only a stream of events
//! followed from the engine's start (or replayed from it), without a gap, is `Exact`.
//! After a gap that could not be replayed, or when the subscription joined a running
//! engine whose history is gone, it is `Rebuilding` until the engine has stored a full
//! cache's worth of blocks since (by then everything from before has been evicted or
//! re-reported); routing uses the approximate affinity for that replica meanwhile.
//!
//! The chain key is a keyed SipHash with a key drawn once per process: every gateway
//! builds its own index from the same events, so they agree on what each engine holds
//! without sharing the key, and a client cannot aim collisions at another's blocks.

use parking_lot::RwLock;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

use crate::engine::kv_events::{EngineHash, Event, Extra, Stored};

/// This gateway's key of one cached block: its chain of token ids from the prompt's start.
pub type BlockKey = u64;

/// Blocks an index holds at most when the engine's cache size is not known yet (about
/// 60 MiB of index): an engine with more reports its `num_gpu_blocks` first.
pub const MAX_BLOCKS_UNKNOWN_CAPACITY: usize = 1 << 20;

/// Extra keys of a block that no request reproduces (a multimodal identifier).
const UNMATCHABLE: &str = "\0unmatchable";

fn hasher() -> impl Hasher {
    static KEYS: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    KEYS.get_or_init(Default::default).build_hasher()
}

/// The key of a block with `tokens` after the block keyed `parent` (0 for the first),
/// with `extras` (LoRA name, cache salt) folded in.
fn chain<'a>(parent: BlockKey, extras: impl Iterator<Item = &'a str>, tokens: &[u32]) -> BlockKey {
    let mut h = hasher();
    h.write_u64(parent);
    for e in extras {
        h.write_usize(e.len());
        h.write(e.as_bytes());
    }
    h.write_u8(0xff);
    for &t in tokens {
        h.write_u32(t);
    }
    h.finish()
}

/// The keys of a request's full blocks of `block_size` tokens, as the engine keys them:
/// the LoRA adapter's name in every block, the `cache_salt` in the first (vLLM's
/// `generate_block_hash_extra_keys`).
pub fn block_keys(
    tokens: &[u32],
    block_size: usize,
    lora: Option<&str>,
    salt: Option<&str>,
) -> Vec<BlockKey> {
    if block_size == 0 {
        return Vec::new();
    }
    let mut parent = 0;
    tokens
        .chunks_exact(block_size)
        .enumerate()
        .map(|(j, block)| {
            let salt = salt.filter(|_| j == 0);
            parent = chain(parent, lora.into_iter().chain(salt), block);
            parent
        })
        .collect()
}

/// How far an index can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coverage {
    /// No events yet: the subscription has not delivered any (or is not configured).
    Unknown,
    /// Every event since the engine started: the index is what the engine holds.
    Exact,
    /// Events were lost and could not be replayed: exact again once the engine has
    /// stored `until` more blocks.
    Rebuilding { until: u64 },
}

impl Coverage {
    pub fn as_str(self) -> &'static str {
        match self {
            Coverage::Unknown => "unknown",
            Coverage::Exact => "exact",
            Coverage::Rebuilding { .. } => "rebuilding",
        }
    }
}

/// What the next sequence number means for the stream ([`PrefixIndex::check_sequence`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sequence {
    /// The next one: apply it.
    Next,
    /// Seen already (a replay overlapping live events): skip it.
    Seen,
    /// Messages `from..to` were missed: replay them, or rebuild.
    Gap { from: u64, to: u64 },
    /// The engine started again (its sequence is back at 0): its cache is empty.
    Restart,
}

/// Counts since the gateway started, for `/load-stats` and the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexStats {
    pub batches: u64,
    pub stored: u64,
    pub removed: u64,
    pub gaps: u64,
    pub replayed: u64,
    pub restarts: u64,
    /// Blocks whose parent was unknown (stored before the index began): not indexed.
    pub orphans: u64,
    /// Events or batches that could not be read.
    pub malformed: u64,
}

/// One backend's prefix-cache index.
#[derive(Debug, Default)]
pub struct PrefixIndex {
    inner: RwLock<Inner>,
    /// The backend's count of finished requests when its engine was last heard from
    /// (an event arrived): routing stops trusting an index whose engine went silent.
    heard_at: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct Inner {
    coverage: Coverage,
    block_size: Option<u32>,
    /// The engine's cache in blocks (`num_gpu_blocks`), once known.
    capacity: Option<usize>,
    by_engine: HashMap<EngineHash, BlockKey>,
    /// Each key held, with how many engine blocks hold it.
    keys: HashMap<BlockKey, u32>,
    last_seq: Option<u64>,
    /// The engine's timestamp of the last message applied: a message with a smaller or
    /// equal sequence number and a later time comes from an engine that started again.
    last_ts: Option<f64>,
    /// The engine's identity as last scraped (its version, its process start time), and
    /// the restarts counted when it was seen.
    identity: Option<(String, u64)>,
    restarts_at_identity: u64,
    stats: IndexStats,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            coverage: Coverage::Unknown,
            block_size: None,
            capacity: None,
            by_engine: HashMap::new(),
            keys: HashMap::new(),
            last_seq: None,
            last_ts: None,
            identity: None,
            restarts_at_identity: 0,
            stats: IndexStats::default(),
        }
    }
}

/// An index as `/load-stats` and `/explain` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexView {
    pub coverage: Coverage,
    pub block_size: Option<u32>,
    pub blocks: usize,
    pub last_seq: Option<u64>,
    pub stats: IndexStats,
}

impl PrefixIndex {
    /// Notes that the engine was heard from when the backend had finished `completed`
    /// requests.
    pub fn heard(&self, completed: u64) {
        self.heard_at
            .store(completed, std::sync::atomic::Ordering::Relaxed);
    }

    /// The backend's finished requests when the engine was last heard from.
    pub fn heard_at(&self) -> u64 {
        self.heard_at.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The engine's identity as last seen ([`PrefixIndex::engine_identity`]).
    pub fn identity(&self) -> Option<String> {
        self.inner
            .read()
            .identity
            .as_ref()
            .map(|(id, _)| id.clone())
    }

    /// Its coverage and block size: what a lookup needs to know first.
    pub fn coverage(&self) -> (Coverage, Option<u32>) {
        let g = self.inner.read();
        (g.coverage, g.block_size)
    }

    pub fn view(&self) -> IndexView {
        let g = self.inner.read();
        IndexView {
            coverage: g.coverage,
            block_size: g.block_size,
            blocks: g.by_engine.len(),
            last_seq: g.last_seq,
            stats: g.stats,
        }
    }

    /// How many of `keys` (a request's blocks, in order) the engine holds from the start.
    pub fn cached_blocks(&self, keys: &[BlockKey]) -> usize {
        let g = self.inner.read();
        keys.iter().take_while(|k| g.keys.contains_key(k)).count()
    }

    /// The engine's cache size in blocks, from its `/metrics`; an index that has more
    /// missed removals and starts again.
    pub fn set_capacity(&self, blocks: usize) {
        let mut g = self.inner.write();
        g.capacity = Some(blocks.max(1));
        if g.by_engine.len() > blocks.max(1) {
            g.lost(blocks as u64);
        }
    }

    /// What message `seq`, published at the engine's time `ts`, means, given the last
    /// one applied. A number already seen is a duplicate (a replay overlapping the live
    /// stream) unless it was published later than the last one applied: then the engine
    /// started again and counts from 0 anew.
    pub fn check_sequence(&self, seq: u64, ts: f64) -> Sequence {
        let g = self.inner.read();
        match g.last_seq {
            None if seq == 0 => Sequence::Next,
            None => Sequence::Gap { from: 0, to: seq },
            Some(last) if seq == last.wrapping_add(1) => Sequence::Next,
            Some(last) if seq <= last => {
                if g.last_ts.is_some_and(|t| ts > t) {
                    Sequence::Restart
                } else {
                    Sequence::Seen
                }
            }
            Some(last) => Sequence::Gap {
                from: last + 1,
                to: seq,
            },
        }
    }

    /// The engine's identity as its server reports it: its process start time
    /// (`process_start_time_seconds` in `/metrics`), else its `/version`. A new one is a
    /// restarted server, whose cache is empty: the index starts again, unless its events
    /// already told (a restart seen since the last identity), so what it published since
    /// is kept. Returns whether it started again.
    pub fn engine_identity(&self, version: Option<&str>, started_at: Option<f64>) -> bool {
        let id = match (started_at, version) {
            (Some(t), _) => format!("started {t}"),
            (None, Some(v)) => format!("version {v}"),
            (None, None) => return false,
        };
        let mut g = self.inner.write();
        let changed = g.identity.as_ref().is_some_and(|(old, _)| *old != id);
        let told = g.stats.restarts > g.restarts_at_identity;
        let restart = changed && !told;
        if restart {
            g.clear();
            g.coverage = Coverage::Exact;
            g.last_seq = None;
            g.last_ts = None;
            g.stats.restarts += 1;
        }
        g.restarts_at_identity = g.stats.restarts;
        g.identity = Some((id, g.stats.restarts));
        restart
    }

    /// The engine has published nothing yet (its replay buffer is empty): nothing is
    /// cached there.
    pub fn nothing_published(&self) {
        let mut g = self.inner.write();
        if g.coverage == Coverage::Unknown && g.last_seq.is_none() {
            g.coverage = Coverage::Exact;
        }
    }

    /// The engine started again: nothing is cached there; its events from now on are
    /// the whole story.
    pub fn restarted(&self) {
        let mut g = self.inner.write();
        g.clear();
        g.coverage = Coverage::Exact;
        g.last_seq = None;
        g.last_ts = None;
        g.stats.restarts += 1;
    }

    /// Events were lost for good (a gap past the replay buffer, or no replay socket):
    /// start again from nothing and rebuild. `resume_after` is the sequence number the
    /// stream continues after (its next message is `resume_after + 1`).
    pub fn gap_unrecoverable(&self, resume_after: Option<u64>) {
        let mut g = self.inner.write();
        g.stats.gaps += 1;
        let until = g.capacity.unwrap_or(MAX_BLOCKS_UNKNOWN_CAPACITY) as u64;
        g.lost(until);
        g.last_seq = resume_after;
    }

    /// A gap was filled by a replay.
    pub fn gap_replayed(&self) {
        let mut g = self.inner.write();
        g.stats.gaps += 1;
        g.stats.replayed += 1;
    }

    /// A message that could not be read (it still moves the sequence on).
    pub fn malformed(&self, seq: Option<u64>) {
        let mut g = self.inner.write();
        g.stats.malformed += 1;
        if let Some(s) = seq {
            g.last_seq = Some(s);
        }
    }

    /// Applies message `seq`'s events, published at `ts` (after
    /// [`PrefixIndex::check_sequence`] said [`Sequence::Next`]).
    pub fn apply(&self, seq: u64, ts: f64, events: &[Event]) {
        let mut g = self.inner.write();
        if g.coverage == Coverage::Unknown && g.last_seq.is_none() && seq == 0 {
            g.coverage = Coverage::Exact;
        }
        g.last_seq = Some(seq);
        g.last_ts = Some(ts);
        g.stats.batches += 1;
        for e in events {
            match e {
                Event::BlockStored(s) => g.stored(s),
                Event::BlockRemoved(r) if on_gpu(r.medium.as_deref(), r.group_idx) => {
                    for h in &r.block_hashes {
                        g.remove(*h);
                    }
                }
                Event::BlockRemoved(_) => {}
                Event::AllBlocksCleared {} => g.clear(),
                Event::Unknown => {}
            }
        }
    }
}

/// Whether an event is about the engine's own KV cache (not an offloading tier, not a
/// second cache group of a hybrid model).
fn on_gpu(medium: Option<&str>, group: Option<i64>) -> bool {
    medium.is_none_or(|m| m.eq_ignore_ascii_case("GPU")) && group.is_none_or(|g| g == 0)
}

impl Inner {
    fn clear(&mut self) {
        self.by_engine.clear();
        self.keys.clear();
    }

    /// Starts again from nothing, exact once `until` blocks have been stored.
    fn lost(&mut self, until: u64) {
        self.clear();
        self.coverage = Coverage::Rebuilding { until };
    }

    fn remove(&mut self, h: EngineHash) {
        if let Some(k) = self.by_engine.remove(&h) {
            if let Some(n) = self.keys.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    self.keys.remove(&k);
                }
            }
            self.stats.removed += 1;
        }
    }

    fn stored(&mut self, s: &Stored) {
        let full = s
            .kv_cache_spec_kind
            .as_deref()
            .is_none_or(|k| k == "full_attention");
        if !full || !on_gpu(s.medium.as_deref(), s.group_idx) || s.block_size == 0 {
            return;
        }
        let bs = s.block_size as usize;
        if s.token_ids.len() < s.block_hashes.len().saturating_mul(bs) {
            self.stats.malformed += 1;
            return;
        }
        self.block_size = Some(s.block_size);
        let mut parent = match s.parent_block_hash {
            None => 0,
            Some(h) => match self.by_engine.get(&h) {
                Some(&k) => k,
                None => {
                    self.stats.orphans += s.block_hashes.len() as u64;
                    return;
                }
            },
        };
        let limit = self.capacity.unwrap_or(MAX_BLOCKS_UNKNOWN_CAPACITY);
        for (j, (&h, block)) in s
            .block_hashes
            .iter()
            .zip(s.token_ids.chunks_exact(bs))
            .enumerate()
        {
            let key = match s.extra_keys.as_ref().map(|e| e.get(j)) {
                // vLLM 0.32: each block's own extras (LoRA name, salt on the first).
                Some(Some(Some(items))) => chain(parent, items.iter().map(extra_text), block),
                Some(_) => chain(parent, std::iter::empty(), block),
                // An older vLLM without extra keys: the adapter is all there is.
                None => chain(parent, s.lora_name.as_deref().into_iter(), block),
            };
            if let Some(old) = self.by_engine.insert(h, key) {
                // Stored again under the same hash: the same content.
                if let Some(n) = self.keys.get_mut(&old) {
                    *n -= 1;
                }
            }
            *self.keys.entry(key).or_insert(0) += 1;
            self.stats.stored += 1;
            parent = key;
        }
        if let Coverage::Rebuilding { until } = &mut self.coverage {
            *until = until.saturating_sub(s.block_hashes.len() as u64);
            if *until == 0 {
                self.coverage = Coverage::Exact;
            }
        }
        if self.by_engine.len() > limit {
            // More than the engine can hold: removals were lost.
            self.lost(limit as u64);
        }
    }
}

fn extra_text(e: &Extra) -> &str {
    match e {
        Extra::Text(s) => s,
        Extra::Other => UNMATCHABLE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kv_events::{decode, Removed};

    fn stored(hashes: &[u64], parent: Option<u64>, tokens: Vec<u32>, bs: u32) -> Event {
        Event::BlockStored(Stored {
            block_hashes: hashes.to_vec(),
            parent_block_hash: parent,
            token_ids: tokens,
            block_size: bs,
            lora_name: None,
            medium: Some("GPU".into()),
            extra_keys: None,
            group_idx: Some(0),
            kv_cache_spec_kind: Some("full_attention".into()),
        })
    }

    fn removed(hashes: &[u64]) -> Event {
        Event::BlockRemoved(Removed {
            block_hashes: hashes.to_vec(),
            medium: Some("GPU".into()),
            group_idx: Some(0),
        })
    }

    /// The real recording, replayed into an index: the first chat's blocks are found by
    /// their tokens, the salted copy only with its salt, and the overflow evicts them.
    #[test]
    fn real_events_index_by_tokens_salt_and_eviction() {
        let index = PrefixIndex::default();
        let messages: Vec<_> = crate::engine::kv_events::fixtures::recorded("overflow-salt.jsonl")
            .into_iter()
            .map(|(frames, _)| {
                let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
                decode(&refs).unwrap()
            })
            .collect();
        let first = match &messages[0].batch.events[0] {
            Event::BlockStored(s) => s.token_ids.clone(),
            _ => panic!(),
        };
        for m in &messages[..2] {
            assert_eq!(index.check_sequence(m.seq, m.batch.ts), Sequence::Next);
            index.apply(m.seq, m.batch.ts, &m.batch.events);
        }
        assert_eq!(index.coverage(), (Coverage::Exact, Some(128)));
        let keys = block_keys(&first, 128, None, None);
        assert_eq!(index.cached_blocks(&keys), 2);
        assert_eq!(
            index.cached_blocks(&block_keys(&first, 128, None, Some("tenant-7"))),
            2
        );
        assert_eq!(
            index.cached_blocks(&block_keys(&first, 128, None, Some("other"))),
            0
        );
        assert_eq!(
            index.cached_blocks(&block_keys(&first, 128, Some("sql"), None)),
            0
        );
        for m in &messages[2..] {
            assert_eq!(index.check_sequence(m.seq, m.batch.ts), Sequence::Next);
            index.apply(m.seq, m.batch.ts, &m.batch.events);
        }
        assert_eq!(index.cached_blocks(&keys), 0, "evicted by the overflow");
        let v = index.view();
        assert!(v.blocks <= 32, "{v:?}");
        assert_eq!(v.stats.stored, 2 + 2 + 5 + 6 * 12);
    }

    #[test]
    fn a_continuation_chains_on_its_parent_and_removal_breaks_the_run() {
        let index = PrefixIndex::default();
        let tokens: Vec<u32> = (0..64).collect();
        index.apply(
            0,
            0.0,
            &[stored(&[10, 11], None, tokens[..32].to_vec(), 16)],
        );
        index.apply(
            1,
            1.0,
            &[stored(&[12, 13], Some(11), tokens[32..].to_vec(), 16)],
        );
        let keys = block_keys(&tokens, 16, None, None);
        assert_eq!(index.cached_blocks(&keys), 4);
        index.apply(2, 2.0, &[removed(&[11])]);
        assert_eq!(
            index.cached_blocks(&keys),
            1,
            "the run from the start stops at a hole"
        );
        // A continuation of a parent never seen is not indexed (no guessing).
        index.apply(
            3,
            3.0,
            &[stored(&[20], Some(99), tokens[..16].to_vec(), 16)],
        );
        assert_eq!(index.view().stats.orphans, 1);
    }

    #[test]
    fn lora_blocks_match_only_the_same_adapter() {
        let index = PrefixIndex::default();
        let tokens: Vec<u32> = (0..32).collect();
        let mut e = stored(&[1, 2], None, tokens.clone(), 16);
        if let Event::BlockStored(s) = &mut e {
            s.lora_name = Some("sql".into());
            s.extra_keys = Some(vec![
                Some(vec![Extra::Text("sql".into())]),
                Some(vec![Extra::Text("sql".into())]),
            ]);
        }
        index.apply(0, 0.0, &[e]);
        assert_eq!(
            index.cached_blocks(&block_keys(&tokens, 16, Some("sql"), None)),
            2
        );
        assert_eq!(index.cached_blocks(&block_keys(&tokens, 16, None, None)), 0);
        assert_eq!(
            index.cached_blocks(&block_keys(&tokens, 16, Some("chat"), None)),
            0
        );
    }

    #[test]
    fn sequence_gaps_restarts_and_duplicates() {
        let index = PrefixIndex::default();
        assert_eq!(
            index.check_sequence(5, 5.0),
            Sequence::Gap { from: 0, to: 5 }
        );
        index.apply(0, 0.0, &[]);
        assert_eq!(index.coverage().0, Coverage::Exact);
        assert_eq!(index.check_sequence(1, 1.0), Sequence::Next);
        index.apply(1, 1.0, &[stored(&[1], None, vec![7; 16], 16)]);
        assert_eq!(index.check_sequence(1, 1.0), Sequence::Seen);
        assert_eq!(
            index.check_sequence(4, 4.0),
            Sequence::Gap { from: 2, to: 4 }
        );
        // A duplicate of 0 (published then), and a new 0 (published later).
        assert_eq!(index.check_sequence(0, 0.0), Sequence::Seen);
        assert_eq!(index.check_sequence(0, 9.0), Sequence::Restart);
        // A restarted engine first heard at 3: a restart, then the gap from 0.
        assert_eq!(index.check_sequence(1, 9.0), Sequence::Restart);
        index.restarted();
        assert_eq!(
            index.cached_blocks(&block_keys(&[7; 16], 16, None, None)),
            0
        );
        assert_eq!(index.check_sequence(0, 0.0), Sequence::Next);
    }

    #[test]
    fn a_new_server_identity_empties_the_index_unless_its_events_told_first() {
        let index = PrefixIndex::default();
        assert!(!index.engine_identity(None, None), "nothing to compare");
        assert!(!index.engine_identity(Some("0.32.0"), Some(100.0)));
        index.apply(0, 0.0, &[stored(&[1], None, vec![1; 16], 16)]);
        assert!(
            !index.engine_identity(Some("0.32.0"), Some(100.0)),
            "the same server"
        );
        // Restarted while idle: no event says so, its start time does.
        assert!(index.engine_identity(Some("0.32.0"), Some(200.0)));
        assert_eq!(index.view().blocks, 0);
        assert_eq!(index.coverage().0, Coverage::Exact);
        // Restarted, and its first events arrived before the scrape: they stay.
        index.apply(0, 1.0, &[stored(&[2], None, vec![2; 16], 16)]);
        index.apply(1, 2.0, &[]);
        assert_eq!(index.check_sequence(0, 9.0), Sequence::Restart);
        index.restarted();
        index.apply(0, 9.0, &[stored(&[3], None, vec![3; 16], 16)]);
        assert!(!index.engine_identity(Some("0.33.0"), Some(300.0)));
        assert_eq!(index.view().blocks, 1);
        // An upgrade's new version, read after its start time: the same server still.
        assert!(!index.engine_identity(Some("0.34.0"), Some(300.0)));
        assert_eq!(index.view().blocks, 1);
    }

    #[test]
    fn an_unrecoverable_gap_rebuilds_over_a_cache_turnover() {
        let index = PrefixIndex::default();
        index.set_capacity(4);
        index.apply(0, 0.0, &[stored(&[1], None, vec![1; 16], 16)]);
        index.gap_unrecoverable(Some(9));
        assert_eq!(index.coverage().0, Coverage::Rebuilding { until: 4 });
        assert_eq!(index.view().blocks, 0);
        assert_eq!(index.check_sequence(10, 10.0), Sequence::Next);
        index.apply(10, 10.0, &[stored(&[2, 3, 4], None, vec![2; 48], 16)]);
        assert_eq!(index.coverage().0, Coverage::Rebuilding { until: 1 });
        index.apply(11, 11.0, &[stored(&[5], None, vec![3; 16], 16)]);
        assert_eq!(index.coverage().0, Coverage::Exact);
    }

    #[test]
    fn more_blocks_than_the_engine_holds_means_lost_removals() {
        let index = PrefixIndex::default();
        index.set_capacity(2);
        index.apply(0, 0.0, &[stored(&[1, 2, 3], None, vec![1; 48], 16)]);
        assert!(matches!(index.coverage().0, Coverage::Rebuilding { .. }));
        assert_eq!(index.view().blocks, 0);
    }

    #[test]
    fn other_tiers_groups_and_short_token_lists_are_not_indexed() {
        let index = PrefixIndex::default();
        let mut cpu = stored(&[1], None, vec![1; 16], 16);
        if let Event::BlockStored(s) = &mut cpu {
            s.medium = Some("CPU".into());
        }
        let mut swa = stored(&[2], None, vec![1; 16], 16);
        if let Event::BlockStored(s) = &mut swa {
            s.group_idx = Some(1);
        }
        let short = stored(&[3, 4], None, vec![1; 16], 16);
        index.apply(0, 0.0, &[cpu, swa, short, Event::AllBlocksCleared {}]);
        let v = index.view();
        assert_eq!((v.blocks, v.stats.malformed), (0, 1));
    }
}
