//! Exact prefix routing, the request's side: its token ids as the engine will see them
//! ([`prompt_tokens`], with the model's tokenizer from `routing.tokenizers`), and per
//! backend the prompt tokens its engine holds in its prefix cache ([`cached_prefix`],
//! from the KV-event index of [`crate::fleet::prefix`]).
//!
//! A backend's number is only given where its index is exact: its events followed
//! without a gap, and not silent (an engine that finished [`SILENT_AFTER`] requests of
//! this gateway with no event at all has stopped publishing, or the subscription has
//! lost it). The `vllm` policy decides on these numbers only when every candidate has
//! one; otherwise the approximate affinity decides, as it would without events.

use serde::Deserialize;
use serde_json::Value;
use smallvec::SmallVec;

use crate::config::Config;
use crate::fleet::prefix::{block_keys, BlockKey, Coverage};
use crate::fleet::FleetSnapshot;
use crate::openai::RoutingInfo;
use crate::tokenize::Prompt;

/// Requests this gateway saw finish at a backend with no KV event from its engine, after
/// which its index is no longer trusted. A busy engine stores new blocks for nearly
/// every request; one whose every prompt is already cached publishes nothing, and is
/// then routed by approximate affinity until it next does (a safe mistake).
pub const SILENT_AFTER: u64 = 256;

/// Bodies above this are tokenized on tokio's blocking pool ([`tokens_of`]): the
/// tokenizer takes about half a microsecond per token (`benches/RESULTS.md`), 2 ms for a
/// 16 KiB prompt, which must not stall the other connections of the worker thread.
pub const INLINE_TOKENIZE_BYTES: usize = 16 * 1024;

/// [`prompt_tokens`] of a routed request, on the blocking pool when its body is longer
/// than [`INLINE_TOKENIZE_BYTES`]; `None` at once for a model without a tokenizer.
pub async fn tokens_of(
    cfg: std::sync::Arc<Config>,
    snap: std::sync::Arc<FleetSnapshot>,
    routed: &super::Routed,
) -> Option<std::sync::Arc<PromptTokens>> {
    if !cfg.tokenizers.contains_key(&routed.info.model) {
        return None;
    }
    if routed.body.len() <= INLINE_TOKENIZE_BYTES {
        return prompt_tokens(&cfg, &snap, &routed.body, &routed.info).map(std::sync::Arc::new);
    }
    let (body, info) = (routed.body.clone(), routed.info.clone());
    tokio::task::spawn_blocking(move || prompt_tokens(&cfg, &snap, &body, &info))
        .await
        .ok()
        .flatten()
        .map(std::sync::Arc::new)
}

/// A request's token ids and what else vLLM keys its blocks by.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptTokens {
    pub ids: Vec<u32>,
    /// The LoRA adapter it runs with.
    pub lora: Option<String>,
    /// Its `cache_salt`.
    pub salt: Option<String>,
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(default)]
    messages: Option<Value>,
    #[serde(default)]
    prompt: Option<Value>,
    #[serde(borrow, default)]
    cache_salt: Option<std::borrow::Cow<'a, str>>,
}

/// The token ids of a request for `info.model`, when `cfg` has its tokenizer and the
/// request is a shape it reproduces (a chat, or a completion of one text or one list of
/// ids); `None` otherwise, and then routing works as without events.
pub fn prompt_tokens(
    cfg: &Config,
    snap: &FleetSnapshot,
    body: &[u8],
    info: &RoutingInfo,
) -> Option<PromptTokens> {
    let tokenizer = cfg.tokenizers.get(&info.model)?;
    let fields: Fields = serde_json::from_slice(body).ok()?;
    let prompt = match (&fields.messages, &fields.prompt) {
        (Some(m), None) => Prompt::Chat(m),
        (None, Some(p)) => Prompt::Completion(p),
        _ => return None,
    };
    let ids = match tokenizer.tokens(prompt) {
        Ok(ids) => ids,
        Err(why) => {
            tracing::debug!(model = %info.model, %why, "not tokenized: routed without KV events");
            return None;
        }
    };
    Some(PromptTokens {
        ids,
        lora: snap.lora_fit(&info.model).map(|_| info.model.clone()),
        salt: fields.cache_salt.map(|s| s.into_owned()),
    })
}

/// Per backend of a snapshot (by index): the prompt tokens its engine has cached, where
/// that is known exactly.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CachedPrefix {
    per_backend: SmallVec<[Option<u32>; 16]>,
}

impl CachedPrefix {
    /// From each backend's number (by snapshot index).
    pub fn new(per_backend: impl IntoIterator<Item = Option<u32>>) -> CachedPrefix {
        CachedPrefix {
            per_backend: per_backend.into_iter().collect(),
        }
    }

    /// Backend `i`'s cached prompt tokens; `None` where its index is not exact.
    pub fn get(&self, i: usize) -> Option<u32> {
        self.per_backend.get(i).copied().flatten()
    }

    /// Whether every one of `eligible` is known exactly.
    pub fn covers(&self, eligible: &[usize]) -> bool {
        eligible.iter().all(|&i| self.get(i).is_some())
    }
}

/// What each backend of `snap` serving the request holds of `tokens`' prefix.
pub fn cached_prefix(snap: &FleetSnapshot, tokens: &PromptTokens) -> CachedPrefix {
    // The request's block keys, per block size (one in a uniform fleet).
    let mut keys: SmallVec<[(u32, Vec<BlockKey>); 2]> = SmallVec::new();
    let per_backend = snap
        .backends
        .iter()
        .map(|e| {
            let b = &e.backend;
            b.kv_events.as_ref()?;
            let (coverage, block_size) = b.prefix.coverage();
            if coverage != Coverage::Exact
                || b.completed().saturating_sub(b.prefix.heard_at()) > SILENT_AFTER
            {
                return None;
            }
            // Exact and nothing stored yet: nothing cached.
            let Some(bs) = block_size.filter(|&bs| bs > 0) else {
                return Some(0);
            };
            let at = match keys.iter().position(|(s, _)| *s == bs) {
                Some(p) => p,
                None => {
                    let k = block_keys(
                        &tokens.ids,
                        bs as usize,
                        tokens.lora.as_deref(),
                        tokens.salt.as_deref(),
                    );
                    keys.push((bs, k));
                    keys.len() - 1
                }
            };
            // As vLLM, at least the prompt's last token is computed.
            let usable = tokens.ids.len().saturating_sub(1) / bs as usize;
            let keys = &keys[at].1[..usable.min(keys[at].1.len())];
            Some(b.prefix.cached_blocks(keys) as u32 * bs)
        })
        .collect();
    CachedPrefix { per_backend }
}
