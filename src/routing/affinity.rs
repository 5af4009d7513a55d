//! Prefix-cache affinity without shared state.
//!
//! vLLM reuses the KV cache of a prompt prefix only on the replica that computed it. A
//! router that keeps a table of which replica saw which prefix works for one router
//! process; several gateway replicas each keep their own table and disagree. Here the
//! preference is a pure function of the request and the configured backends, so every
//! gateway replica with the same config prefers the same backend:
//!
//! 1. An affinity **key** from the request itself ([`key_of`]): the client's session id
//!    (the `x-session-id` header, or the body's `user` field) when given; otherwise a
//!    digest of the conversation's leading messages, through its first user turn, capped
//!    at `prefix_bytes` (so every turn of one conversation has the same key, and requests
//!    that share a long system prompt share a key too); for completions, the prompt's
//!    leading `prefix_bytes`.
//! 2. **Rendezvous hashing** (highest random weight, [`rank`]): each backend's rank for a
//!    key is a hash of the key and the backend's name, scaled by its weight; the
//!    preference order is by rank. Removing a backend moves only the keys it ranked
//!    first; adding one takes only the keys it now ranks first (about 1/N of them). Unlike
//!    a ring of virtual nodes there is nothing to build or keep in sync: with tens of
//!    backends, ranking all of them costs less than a microsecond.
//! 3. **Bounded load** ([`bounded`]): the first backend in the key's order whose load is at
//!    most `load_factor` times the mean load of the candidates takes the request, so a hot
//!    key or a slow replica spills to the key's next backend (the same one in every
//!    gateway) instead of piling up.
//! 4. **Placement of long-lived keys** ([`Placer`], [`place`]): a home is not given more
//!    long-lived prefixes than a share of its KV cache holds; the rest are homed on their
//!    next backend with room. The plan depends only on the set of long-lived keys, which
//!    every gateway sees alike, so gateways agree once each has seen them.
//!
//! The digests are SHA-256 (from `ring`), so they are the same in every process, build and
//! version.

use parking_lot::Mutex;
use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::Sticky;
use crate::config::PlacementSettings;
use crate::fleet::FleetSnapshot;
use crate::openai::BodySpans;

/// What the key was made from (the access log's `affinity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The session header.
    Header,
    /// The body's `user` field.
    User,
    /// The leading messages of a chat.
    Conversation,
    /// The leading bytes of a completion prompt.
    Prompt,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Header => "header",
            Source::User => "user",
            Source::Conversation => "conversation",
            Source::Prompt => "prompt",
        }
    }
}

/// A request's affinity key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AffinityKey {
    pub key: u64,
    pub source: Source,
    /// Bytes of prompt a replica that served this conversation (or this shared prefix)
    /// before may still hold in its prefix cache: the messages before the last one, or the
    /// key's leading block of a completion prompt.
    pub reusable_bytes: usize,
}

/// The longest session id taken from a header or the `user` field; longer ones are
/// ignored (the conversation's own key is used instead).
pub const MAX_SESSION_ID: usize = 256;

/// Domain tags, so a session id can never collide with a conversation digest on purpose.
const TAG_SESSION: &[u8] = b"vllm-edge/session\0";
const TAG_CONVERSATION: &[u8] = b"vllm-edge/conversation\0";
const TAG_PROMPT: &[u8] = b"vllm-edge/prompt\0";

/// The first 8 bytes of a SHA-256, as a key.
fn finish64(ctx: ring::digest::Context) -> u64 {
    let d = ctx.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d.as_ref()[..8]);
    u64::from_be_bytes(first)
}

fn digest64(parts: &[&[u8]]) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    finish64(ctx)
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

/// A message's bytes for the key and for the reusable estimate: its role and its content
/// as the client wrote it (JSON text, escapes and all).
fn message_bytes<'a>(m: &'a Message<'a>) -> (&'a [u8], &'a [u8]) {
    (
        m.role.as_deref().unwrap_or("").as_bytes(),
        m.content.map_or(&b"null"[..], |c| c.get().as_bytes()),
    )
}

fn session_id(id: &[u8]) -> Option<&[u8]> {
    let ok = !id.is_empty()
        && id.len() <= MAX_SESSION_ID
        && id.iter().all(|b| b.is_ascii_graphic() || *b == b' ');
    ok.then_some(id)
}

/// The affinity key of an inspected request when `cfg`'s policy uses affinity (see
/// [`key_of`]; the session header is the configured one).
pub fn request_key(
    cfg: &crate::config::Config,
    headers: &http::HeaderMap,
    body: &[u8],
    info: &crate::openai::RoutingInfo,
) -> Option<AffinityKey> {
    if !cfg.affinity.used_by(cfg.policy) {
        return None;
    }
    let header = headers
        .get(cfg.affinity.session_header.as_str())
        .map(|v| v.as_bytes());
    key_of(body, &info.spans, header, cfg.affinity.prefix_bytes)
}

/// The affinity key of a request, or `None` when it offers nothing to key on (no session
/// id, no messages or prompt, or fields of an unexpected shape: such a request is simply
/// routed by load).
///
/// `session_header` is the value of the configured session header, if the request has
/// one. `prefix_bytes` caps how much of the conversation makes the key.
pub fn key_of(
    body: &[u8],
    spans: &BodySpans,
    session_header: Option<&[u8]>,
    prefix_bytes: usize,
) -> Option<AffinityKey> {
    let slice = |r: &Option<Range<usize>>| r.clone().and_then(|r| body.get(r));
    let messages: Option<Vec<Message>> =
        slice(&spans.messages).and_then(|m| serde_json::from_slice(m).ok());
    let reusable_bytes = match &messages {
        Some(ms) => ms
            .iter()
            .take(ms.len().saturating_sub(1))
            .map(|m| {
                let (r, c) = message_bytes(m);
                r.len() + c.len()
            })
            .sum(),
        None => 0,
    };

    if let Some(id) = session_header.and_then(session_id) {
        return Some(AffinityKey {
            key: digest64(&[TAG_SESSION, id]),
            source: Source::Header,
            reusable_bytes,
        });
    }
    // `user` must be a JSON string; its text between the quotes is the id.
    let user = slice(&spans.user)
        .filter(|u| u.len() >= 2 && u[0] == b'"' && u[u.len() - 1] == b'"')
        .and_then(|u| session_id(&u[1..u.len() - 1]));
    if let Some(id) = user {
        return Some(AffinityKey {
            key: digest64(&[TAG_SESSION, id]),
            source: Source::User,
            reusable_bytes,
        });
    }

    if let Some(ms) = &messages {
        if ms.is_empty() {
            return None;
        }
        // The leading messages through the first user turn: the same in every later turn.
        let through = ms
            .iter()
            .position(|m| m.role.as_deref() == Some("user"))
            .unwrap_or(ms.len() - 1);
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(TAG_CONVERSATION);
        let mut budget = prefix_bytes;
        for m in &ms[..=through] {
            let (role, content) = message_bytes(m);
            for part in [role, b"\0", content, b"\0"] {
                let take = part.len().min(budget);
                ctx.update(&part[..take]);
                budget -= take;
            }
            if budget == 0 {
                break;
            }
        }
        return Some(AffinityKey {
            key: finish64(ctx),
            source: Source::Conversation,
            reusable_bytes,
        });
    }

    let prompt = slice(&spans.prompt)?;
    let lead = &prompt[..prompt.len().min(prefix_bytes)];
    Some(AffinityKey {
        key: digest64(&[TAG_PROMPT, lead]),
        source: Source::Prompt,
        reusable_bytes: lead.len(),
    })
}

/// splitmix64's finalizer: spreads the bits of `key ^ node` uniformly.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A backend's rank for a key (weighted rendezvous hashing): `weight / −ln(u)` with `u`
/// uniform in (0, 1) from the key and the node. The highest rank is the key's home; a
/// backend of weight 2 is the home of twice as many keys as one of weight 1.
pub fn rank(key: u64, node: u64, weight: f64) -> f64 {
    let u = (uniform_bits(key, node) as f64 + 0.5) / (1u64 << 53) as f64;
    weight.max(f64::MIN_POSITIVE) / -u.ln()
}

/// The 53 bits that make [`rank`]'s `u`.
fn uniform_bits(key: u64, node: u64) -> u64 {
    mix(key ^ node) >> 11
}

/// A stand-in for [`rank`] among backends of equal weight: it orders them the same way
/// (`weight / −ln(u)` grows with `u` for a fixed weight, and this is `u` scaled), without
/// the logarithm, which is most of a rank's cost. Never compare it with a weighted rank.
pub fn unweighted_rank(key: u64, node: u64) -> f64 {
    uniform_bits(key, node) as f64
}

/// A backend's rank for `key` as selection compares ranks: [`unweighted_rank`] when every
/// backend has the same weight (`equal_weights`), else [`rank`].
#[inline]
pub fn preference(key: u64, node: u64, weight: f64, equal_weights: bool) -> f64 {
    if equal_weights {
        unweighted_rank(key, node)
    } else {
        rank(key, node, weight)
    }
}

/// The position, in a key's preference order, of the backend that takes the request: the
/// first whose load is at most `load_factor` × the mean load, plus `headroom` (so that at
/// near-zero loads a difference of one request does not move keys). `loads` are in
/// preference order and non-negative; `load_factor` is at least 1, so the least loaded
/// backend always qualifies. `None` only when `loads` is empty.
pub fn bounded(loads: &[f64], load_factor: f64, headroom: f64) -> Option<usize> {
    let bound = load_bound(loads.iter().copied(), load_factor, headroom)?;
    loads.iter().position(|&l| l <= bound).or(Some(0))
}

/// The load a backend may carry and still take its keys: `load_factor` × the mean of
/// `loads`, plus `headroom` (see [`bounded`]). `None` when `loads` is empty.
pub fn load_bound(
    loads: impl Iterator<Item = f64>,
    load_factor: f64,
    headroom: f64,
) -> Option<f64> {
    let (sum, n) = loads.fold((0.0, 0usize), |(s, n), l| (s + l, n + 1));
    (n > 0).then(|| load_factor.max(1.0) * sum / n as f64 + headroom.max(0.0))
}

// Long-lived prefixes and their homes' KV caches.
//
// Rendezvous hashing spreads keys evenly only on average: 64 system prompts over 4
// backends gave one backend 26 of them in the affinity bench, 31k tokens of prefixes
// against a 40k-token KV cache. That home evicted its own prefixes and missed at home,
// while the load bound saw nothing wrong (no queue, moderate KV usage). So each gateway
// also keeps a ledger of the keys it routes, and places the long-lived ones (keys in use
// for at least `long_lived_after`: shared system prompts, long sessions; not a short
// conversation) so that no backend is home to more prefix tokens than `kv_share` of its
// KV cache. The plan is a pure function of the long-lived keys and the fleet, so gateways
// that see the same keys (every gateway sees every busy prefix) make the same plan.

/// The most keys a ledger tracks; beyond it new keys are not tracked until old ones go
/// idle (about 100 bytes each).
pub const LEDGER_KEYS: usize = 16_384;
/// How often a gateway plans placement (the scraper's passes, at most this often).
pub const PLAN_EVERY: Duration = Duration::from_secs(1);

/// One key in the ledger.
#[derive(Debug, Clone, Copy)]
struct Seen {
    model: u32,
    /// The most reusable bytes a request with this key carried.
    bytes: usize,
    first: Instant,
    last: Instant,
}

#[derive(Debug, Default)]
struct Ledger {
    keys: HashMap<u64, Seen>,
    /// Model names, interned: the ledger stores an index per key.
    models: Vec<Box<str>>,
    last_plan: Option<Instant>,
}

impl Ledger {
    fn model_id(&mut self, model: &str) -> u32 {
        match self.models.iter().position(|m| &**m == model) {
            Some(i) => i as u32,
            None => {
                self.models.push(model.into());
                (self.models.len() - 1) as u32
            }
        }
    }
}

/// Where a long-lived key is placed, when that is not its rendezvous home.
#[derive(Debug, Default, Clone)]
pub struct Placement {
    /// key → node id of the backend it is placed on.
    moved: HashMap<u64, u64>,
    /// Long-lived keys in the last plan.
    pub long_lived: usize,
    /// Per backend name: estimated prefix tokens placed there and its budget
    /// (`kv_share` × KV capacity), for backends whose capacity is known.
    pub homed: Vec<(String, f64, f64)>,
}

impl Placement {
    /// The node id of the backend `key` is placed on, if not its rendezvous home.
    pub fn moved(&self, key: u64) -> Option<u64> {
        if self.moved.is_empty() {
            None
        } else {
            self.moved.get(&key).copied()
        }
    }

    /// How many long-lived keys are placed away from their rendezvous home.
    pub fn moved_keys(&self) -> usize {
        self.moved.len()
    }
}

/// A gateway's ledger of affinity keys and its current placement of the long-lived ones.
#[derive(Debug, Default)]
pub struct Placer {
    ledger: Mutex<Ledger>,
    placement: ArcSwap<Placement>,
}

impl Placer {
    /// Notes that a request for `model` with affinity key `key` and `bytes` of reusable
    /// prefix was routed at `now`.
    pub fn record(&self, model: &str, key: u64, bytes: usize, now: Instant) {
        if bytes == 0 {
            return;
        }
        let mut l = self.ledger.lock();
        let full = l.keys.len() >= LEDGER_KEYS;
        let model = l.model_id(model);
        match l.keys.get_mut(&key) {
            Some(s) => {
                s.last = now;
                s.bytes = s.bytes.max(bytes);
                s.model = model;
            }
            None if !full => {
                l.keys.insert(
                    key,
                    Seen {
                        model,
                        bytes,
                        first: now,
                        last: now,
                    },
                );
            }
            None => {}
        }
    }

    /// The current placement (what the request path reads).
    pub fn placement(&self) -> Arc<Placement> {
        self.placement.load_full()
    }

    /// Where `key` is placed, if not at its rendezvous home.
    pub fn moved(&self, key: u64) -> Option<u64> {
        self.placement.load().moved(key)
    }

    /// Forgets idle keys and plans again from the long-lived ones and `snap`, at most
    /// every [`PLAN_EVERY`].
    pub fn replan(&self, snap: &FleetSnapshot, settings: PlacementSettings, now: Instant) {
        let long_lived: Vec<(String, u64, usize)> = {
            let mut l = self.ledger.lock();
            if l.last_plan
                .is_some_and(|t| now.saturating_duration_since(t) < PLAN_EVERY)
            {
                return;
            }
            l.last_plan = Some(now);
            l.keys.retain(|_, s| {
                now.saturating_duration_since(s.last) <= crate::config::defaults::AFFINITY_KEY_IDLE
            });
            l.keys
                .iter()
                .filter(|(_, s)| {
                    s.last.saturating_duration_since(s.first) >= settings.long_lived_after
                })
                .map(|(&k, s)| (l.models[s.model as usize].to_string(), k, s.bytes))
                .collect()
        };
        let placement = plan(snap, &long_lived, settings.kv_share);
        crate::metrics::AFFINITY_KEYS
            .with_label_values(&["long_lived"])
            .set(placement.long_lived as i64);
        crate::metrics::AFFINITY_KEYS
            .with_label_values(&["moved"])
            .set(placement.moved_keys() as i64);
        self.placement.store(Arc::new(placement));
    }
}

/// One backend as placement sees it.
#[derive(Debug, Clone, Copy)]
pub struct Bin {
    pub node: u64,
    pub weight: f64,
    /// Prefix tokens it may be home to (infinite when its KV capacity is unknown).
    pub budget: f64,
}

/// Places `keys` (key, prefix tokens) on `bins`: first every key that fits at its
/// rendezvous home, in key order; then each key that did not, in key order, on the first
/// backend in its preference order with room left; a key that fits nowhere stays home.
/// Returns the keys placed away from home (key → node id), and the tokens placed on each
/// bin. The result depends only on the set of keys and the bins, never on their order.
pub fn place(
    keys: &[(u64, f64)],
    bins: &[Bin],
    equal_weights: bool,
) -> (HashMap<u64, u64>, Vec<f64>) {
    let mut keys = keys.to_vec();
    keys.sort_by_key(|k| k.0);
    keys.dedup_by_key(|k| k.0);
    let rank_of = |key: u64, b: &Bin| preference(key, b.node, b.weight, equal_weights);
    let mut used = vec![0.0; bins.len()];
    let mut moved = HashMap::new();
    if bins.is_empty() {
        return (moved, used);
    }
    let mut left = Vec::new();
    for &(key, tokens) in &keys {
        let home = (0..bins.len())
            .max_by(|&a, &b| rank_of(key, &bins[a]).total_cmp(&rank_of(key, &bins[b])))
            .expect("not empty");
        if used[home] + tokens <= bins[home].budget {
            used[home] += tokens;
        } else {
            left.push((key, tokens, home));
        }
    }
    for (key, tokens, home) in left {
        let mut order: Vec<(f64, usize)> = (0..bins.len())
            .filter(|&b| b != home)
            .map(|b| (rank_of(key, &bins[b]), b))
            .collect();
        order.sort_by(|a, b| b.0.total_cmp(&a.0));
        match order
            .iter()
            .find(|(_, b)| used[*b] + tokens <= bins[*b].budget)
        {
            Some(&(_, b)) => {
                used[b] += tokens;
                moved.insert(key, bins[b].node);
            }
            None => used[home] += tokens,
        }
    }
    (moved, used)
}

/// The placement of `keys` (model, key, reusable bytes) on `snap`'s backends that take
/// requests, model by model.
pub fn plan(snap: &FleetSnapshot, keys: &[(String, u64, usize)], kv_share: f64) -> Placement {
    let mut out = Placement {
        long_lived: keys.len(),
        ..Placement::default()
    };
    if kv_share <= 0.0 || keys.is_empty() {
        return out;
    }
    let mut models: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    models.sort_unstable();
    models.dedup();
    // Prefix tokens backend `i` may be home to, when its KV capacity is known.
    let budget = |i: usize| {
        let load = snap.backends[i].state.load.as_ref();
        load.and_then(|l| l.kv_capacity_tokens)
            .map(|c| c as f64 * kv_share)
    };
    let mut homed: HashMap<usize, f64> = HashMap::new();
    for model in models {
        let Some(serving) = snap.serving(model) else {
            continue;
        };
        let idx: Vec<usize> = serving
            .iter()
            .copied()
            .filter(|&i| snap.backends[i].backend.health.routable())
            .collect();
        let bins: Vec<Bin> = idx
            .iter()
            .map(|&i| Bin {
                node: snap.backends[i].backend.node_id,
                weight: snap.backends[i].backend.weight,
                budget: budget(i).unwrap_or(f64::INFINITY),
            })
            .collect();
        let ks: Vec<(u64, f64)> = keys
            .iter()
            .filter(|k| k.0 == model)
            .map(|k| (k.1, (k.2 / crate::routing::BYTES_PER_TOKEN) as f64))
            .collect();
        let (moved, used) = place(&ks, &bins, snap.equal_weights);
        out.moved.extend(moved);
        for (&i, u) in idx.iter().zip(used) {
            *homed.entry(i).or_default() += u;
        }
    }
    let mut homed: Vec<(usize, f64)> = homed.into_iter().collect();
    homed.sort_by_key(|h| h.0);
    out.homed = homed
        .into_iter()
        .filter_map(|(i, u)| Some((snap.backends[i].backend.name.clone(), u, budget(i)?)))
        .collect();
    out
}

/// Backend `i`'s rendezvous rank for the request's key.
pub(super) fn affinity_rank(snap: &FleetSnapshot, sticky: &Sticky, i: usize) -> f64 {
    let p = &snap.pick_inputs[i];
    if sticky.placed == Some(p.node_id) {
        f64::INFINITY
    } else {
        preference(sticky.key.key, p.node_id, p.weight, snap.equal_weights)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::node_id;

    /// The spans of a JSON body, as `openai::inspect` finds them.
    fn spans(body: &str) -> BodySpans {
        crate::openai::inspect(body.as_bytes(), 64).unwrap().spans
    }

    fn key(body: &str, header: Option<&str>) -> Option<AffinityKey> {
        key_of(
            body.as_bytes(),
            &spans(body),
            header.map(str::as_bytes),
            4096,
        )
    }

    fn chat(messages: &[(&str, &str)]) -> String {
        let ms: Vec<serde_json::Value> = messages
            .iter()
            .map(|(r, c)| serde_json::json!({"role": r, "content": c}))
            .collect();
        serde_json::json!({"model": "m", "messages": ms}).to_string()
    }

    #[test]
    fn every_turn_of_a_conversation_has_the_same_key() {
        let t1 = chat(&[("system", "be brief"), ("user", "hello")]);
        let t2 = chat(&[
            ("system", "be brief"),
            ("user", "hello"),
            ("assistant", "hi"),
            ("user", "how are you?"),
        ]);
        let other = chat(&[("system", "be brief"), ("user", "goodbye")]);
        let (k1, k2, k3) = (
            key(&t1, None).unwrap(),
            key(&t2, None).unwrap(),
            key(&other, None).unwrap(),
        );
        assert_eq!(k1.key, k2.key);
        assert_ne!(k1.key, k3.key);
        assert_eq!(k1.source, Source::Conversation);
        // Turn 1 can reuse its system prompt; turn 2 everything before its last message.
        assert_eq!(k1.reusable_bytes, "system".len() + "\"be brief\"".len());
        assert_eq!(
            k2.reusable_bytes,
            "system\"be brief\"user\"hello\"assistant\"hi\"".len()
        );
    }

    #[test]
    fn a_long_shared_system_prompt_is_the_key_by_itself() {
        let system = "rules ".repeat(1000);
        let a = chat(&[("system", &system), ("user", "question one")]);
        let b = chat(&[("system", &system), ("user", "question two")]);
        assert_eq!(key(&a, None).unwrap().key, key(&b, None).unwrap().key);
        // With a short one, the first user turn tells conversations apart.
        let a = chat(&[("system", "rules"), ("user", "question one")]);
        let b = chat(&[("system", "rules"), ("user", "question two")]);
        assert_ne!(key(&a, None).unwrap().key, key(&b, None).unwrap().key);
    }

    #[test]
    fn a_session_id_wins_over_the_conversation() {
        let a = chat(&[("user", "one")]);
        let b = chat(&[("user", "two")]);
        let (ka, kb) = (key(&a, Some("s-1")).unwrap(), key(&b, Some("s-1")).unwrap());
        assert_eq!(ka.key, kb.key);
        assert_eq!(ka.source, Source::Header);
        let user = r#"{"model":"m","user":"s-1","messages":[{"role":"user","content":"x"}]}"#;
        let ku = key(user, None).unwrap();
        assert_eq!((ku.key, ku.source), (ka.key, Source::User));
        // The header wins over `user`; unusable ids are ignored.
        assert_eq!(key(user, Some("s-2")).unwrap().source, Source::Header);
        let long = "x".repeat(MAX_SESSION_ID + 1);
        assert_eq!(key(&a, Some(&long)).unwrap().source, Source::Conversation);
        assert_eq!(
            key(&a, Some("bad\u{1}id")).unwrap().source,
            Source::Conversation
        );
        let not_a_string = r#"{"model":"m","user":42,"messages":[{"role":"user","content":"x"}]}"#;
        assert_eq!(
            key(not_a_string, None).unwrap().source,
            Source::Conversation
        );
    }

    #[test]
    fn completions_key_on_the_leading_block_and_odd_shapes_have_no_key() {
        let lead = "p".repeat(5000);
        let a = format!(r#"{{"model":"m","prompt":"{lead} tail one"}}"#);
        let b = format!(r#"{{"model":"m","prompt":"{lead} tail two"}}"#);
        let (ka, kb) = (key(&a, None).unwrap(), key(&b, None).unwrap());
        assert_eq!((ka.key, ka.source), (kb.key, Source::Prompt));
        assert_eq!(ka.reusable_bytes, 4096);
        assert_eq!(key(r#"{"model":"m","input":"embed me"}"#, None), None);
        assert_eq!(key(r#"{"model":"m","messages":[]}"#, None), None);
        assert_eq!(key(r#"{"model":"m","messages":"not a list"}"#, None), None);
        assert_eq!(key(r#"{"model":"m","messages":[1,2]}"#, None), None);
    }

    #[test]
    fn keys_are_fixed_digests_the_same_in_every_process() {
        // Pinned values: a change here would make gateways of two versions disagree.
        assert_eq!(node_id("gpu-0"), node_id("gpu-0"));
        assert_ne!(node_id("gpu-0"), node_id("gpu-1"));
        let k = key(&chat(&[("user", "hello")]), None).unwrap().key;
        assert_eq!(k, digest64(&[TAG_CONVERSATION, b"user\0\"hello\"\0"]));
        assert_eq!(format!("{:016x}", digest64(&[b"abc"])), "ba7816bf8f01cfea");
    }

    /// The key's home among `nodes` (by rank).
    fn home(key: u64, nodes: &[(u64, f64)]) -> usize {
        (0..nodes.len())
            .max_by(|&a, &b| {
                rank(key, nodes[a].0, nodes[a].1).total_cmp(&rank(key, nodes[b].0, nodes[b].1))
            })
            .unwrap()
    }

    #[test]
    fn removing_a_backend_moves_only_its_keys_and_adding_one_takes_a_fair_share() {
        let names: Vec<String> = (0..8).map(|i| format!("backend-{i}")).collect();
        let all: Vec<(u64, f64)> = names.iter().map(|n| (node_id(n), 1.0)).collect();
        let keys: Vec<u64> = (0..20_000u64)
            .map(|i| digest64(&[&i.to_be_bytes()]))
            .collect();
        let before: Vec<usize> = keys.iter().map(|&k| home(k, &all)).collect();
        // Shares are even: each of 8 backends is home to 1/8 of the keys, within 10%.
        for b in 0..8 {
            let share = before.iter().filter(|&&h| h == b).count() as f64 / keys.len() as f64;
            assert!((share - 0.125).abs() < 0.0125, "backend {b}: {share}");
        }
        // Remove backend 3: exactly its keys move.
        let without: Vec<(u64, f64)> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 3)
            .map(|(_, n)| *n)
            .collect();
        let mut moved = 0;
        for (k, &h) in keys.iter().zip(&before) {
            let after = home(*k, &without);
            let after = if after >= 3 { after + 1 } else { after };
            if h == 3 {
                moved += 1;
            } else {
                assert_eq!(after, h, "a key that backend 3 did not own moved");
            }
        }
        let fraction = moved as f64 / keys.len() as f64;
        eprintln!(
            "removing 1 of 8 backends moved {:.2}% of keys",
            fraction * 100.0
        );
        assert!((fraction - 0.125).abs() < 0.0125);
        // Add a 9th: it takes only keys (about 1/9), none move between the others.
        let mut more = all.clone();
        more.push((node_id("backend-8"), 1.0));
        let mut taken = 0;
        for (k, &h) in keys.iter().zip(&before) {
            match home(*k, &more) {
                8 => taken += 1,
                a => assert_eq!(a, h),
            }
        }
        let share = taken as f64 / keys.len() as f64;
        assert!((share - 1.0 / 9.0).abs() < 0.0125, "{share}");
    }

    #[test]
    fn without_weights_the_rank_needs_no_logarithm_and_orders_the_same() {
        let nodes: Vec<u64> = (0..64).map(|i| node_id(&format!("backend-{i}"))).collect();
        for k in 0..2_000u64 {
            let key = digest64(&[&k.to_be_bytes()]);
            let mut by_rank: Vec<usize> = (0..nodes.len()).collect();
            let mut by_bits = by_rank.clone();
            by_rank.sort_by(|&a, &b| rank(key, nodes[b], 2.5).total_cmp(&rank(key, nodes[a], 2.5)));
            by_bits.sort_by(|&a, &b| {
                unweighted_rank(key, nodes[b]).total_cmp(&unweighted_rank(key, nodes[a]))
            });
            assert_eq!(by_rank, by_bits, "key {k}");
        }
    }

    #[test]
    fn weights_scale_the_share_of_keys() {
        let nodes = [(node_id("a"), 1.0), (node_id("b"), 3.0)];
        let n = 20_000u64;
        let b = (0..n)
            .filter(|i| home(digest64(&[&i.to_be_bytes()]), &nodes) == 1)
            .count() as f64
            / n as f64;
        assert!((b - 0.75).abs() < 0.02, "{b}");
    }

    #[test]
    fn bounded_load_skips_an_overloaded_home() {
        // The home (first) is within 1.25 × mean: it takes the request.
        assert_eq!(bounded(&[1.1, 1.0, 0.9], 1.25, 0.0), Some(0));
        // Overloaded home: the next within the bound.
        assert_eq!(bounded(&[10.0, 1.0, 1.0], 1.25, 0.0), Some(1));
        assert_eq!(bounded(&[10.0, 9.0, 1.0, 1.0], 1.25, 0.0), Some(2));
        // Equal loads (including none at all): the home.
        assert_eq!(bounded(&[0.0, 0.0], 1.25, 0.0), Some(0));
        assert_eq!(bounded(&[], 1.25, 0.0), None);
        // A factor below 1 is treated as 1: someone always qualifies.
        assert_eq!(bounded(&[3.0, 1.0, 2.0], 0.5, 0.0), Some(1));
        // Headroom: one request ahead of an idle fleet is not overloaded...
        assert_eq!(bounded(&[2.0, 1.0, 1.0, 1.0], 1.25, 1.0), Some(0));
        // ...but it is negligible under real load.
        assert_eq!(bounded(&[80.0, 40.0, 40.0, 40.0], 1.25, 1.0), Some(1));
    }

    fn bins(n: usize, budget: f64) -> Vec<Bin> {
        (0..n)
            .map(|i| Bin {
                node: node_id(&format!("b{i}")),
                weight: 1.0,
                budget,
            })
            .collect()
    }

    /// Bin positions in `key`'s rendezvous order.
    fn order(key: u64, bins: &[Bin]) -> Vec<usize> {
        let mut o: Vec<usize> = (0..bins.len()).collect();
        o.sort_by(|&a, &b| {
            unweighted_rank(key, bins[b].node).total_cmp(&unweighted_rank(key, bins[a].node))
        });
        o
    }

    #[test]
    fn long_lived_keys_stay_home_while_it_has_room_and_overflow_to_their_next_with_room() {
        let keys: Vec<(u64, f64)> = (0..64u64)
            .map(|i| (digest64(&[b"k", &i.to_be_bytes()]), 100.0))
            .collect();
        // Room for all: nothing moves.
        let (moved, used) = place(&keys, &bins(4, f64::INFINITY), true);
        assert!(moved.is_empty());
        assert_eq!(used.iter().sum::<f64>(), 6400.0);
        let node_pos = |bins: &[Bin], node: u64| bins.iter().position(|b| b.node == node).unwrap();

        // Room for 18 keys per backend (72 in all): the keys beyond 18 at their home, in
        // key order, move to the first backend of their order with room at their turn.
        let b = bins(4, 1800.0);
        let (moved, used) = place(&keys, &b, true);
        let mut sorted = keys.clone();
        sorted.sort_by_key(|k| k.0);
        let mut at_home = [0usize; 4];
        let mut room = [18usize; 4];
        let mut overflow = Vec::new();
        for &(k, _) in &sorted {
            let home = order(k, &b)[0];
            if at_home[home] < 18 {
                at_home[home] += 1;
                room[home] -= 1;
                assert!(!moved.contains_key(&k), "a key that fits at home moved");
            } else {
                overflow.push(k);
            }
        }
        assert!(
            !overflow.is_empty(),
            "the split of 64 keys over 4 is uneven: {at_home:?}"
        );
        assert_eq!(moved.len(), overflow.len());
        for k in overflow {
            let want = order(k, &b)[1..]
                .iter()
                .copied()
                .find(|&x| room[x] > 0)
                .unwrap();
            room[want] -= 1;
            assert_eq!(node_pos(&b, moved[&k]), want, "key {k:x}");
        }
        assert!(used.iter().all(|&u| u <= 1800.0), "{used:?}");

        // A key larger than every budget stays home.
        let (moved, _) = place(&[(7, 5000.0)], &b, true);
        assert!(moved.is_empty());
        // No backends: nothing to place.
        assert!(place(&keys, &[], true).0.is_empty());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// The plan is a function of the set of keys: every gateway that sees the same
            /// long-lived keys, in whatever order, makes the same plan; no backend is
            /// filled past its budget by keys moved to it.
            #[test]
            fn placement_depends_on_the_set_of_keys_only(
                keys in prop::collection::vec((any::<u64>(), 1.0f64..500.0), 0..80),
                budget in 100.0f64..4000.0,
                n in 1usize..6,
                rotate in any::<usize>(),
            ) {
                let b = bins(n, budget);
                let (moved, used) = place(&keys, &b, true);
                let mut other = keys.clone();
                other.reverse();
                if !other.is_empty() {
                    let len = other.len();
                    other.rotate_left(rotate % len);
                }
                let (again, used_again) = place(&other, &b, true);
                prop_assert_eq!(&moved, &again);
                prop_assert_eq!(used, used_again);
                for (k, node) in &moved {
                    prop_assert_ne!(b[order(*k, &b)[0]].node, *node);
                }
            }
        }
    }
}
