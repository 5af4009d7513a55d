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
//!
//! The digests are SHA-256 (from `ring`), so they are the same in every process, build and
//! version.

use std::borrow::Cow;
use std::ops::Range;

use serde::Deserialize;
use serde_json::value::RawValue;

/// Where the affinity-relevant fields are in a request body (byte ranges of their JSON
/// text), found while the body is inspected; the key is computed from them only when
/// affinity is in use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodySpans {
    pub messages: Option<Range<usize>>,
    pub prompt: Option<Range<usize>>,
    pub user: Option<Range<usize>>,
}

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

/// A backend's identity on the hash: a digest of its configured name, so every gateway
/// with the same config gives it the same id.
pub fn node_id(name: &str) -> u64 {
    digest64(&[b"vllm-edge/node\0", name.as_bytes()])
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
