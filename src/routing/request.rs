//! What selection knows about a request: its model, its size, its affinity key.

use super::affinity::{AffinityKey, Placer};
use super::{Choice, Reason};

/// What selection knows about a request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub model: &'a str,
    /// Estimated prompt tokens.
    pub prompt_tokens: usize,
    pub max_tokens: Option<u64>,
    /// The request's prefix-affinity key, when the policy uses affinity and the request
    /// has one.
    pub affinity: Option<Sticky>,
    /// The prompt tokens each backend's engine holds, where its KV events say so
    /// exactly ([`super::prefix::cached_prefix`]).
    pub cached: Option<&'a super::prefix::CachedPrefix>,
}

impl<'a> Request<'a> {
    /// What selection knows of an inspected request under `cfg`. Its affinity `key`
    /// counts only while the policy uses affinity (a reload may have changed the policy
    /// since the key was made), held to the configured load factor and to where the
    /// gateway's placement moved the key.
    pub fn of(
        info: &'a crate::openai::RoutingInfo,
        key: Option<AffinityKey>,
        cfg: &crate::config::Config,
        placer: &Placer,
    ) -> Request<'a> {
        Request {
            model: &info.model,
            prompt_tokens: info.prompt_bytes / BYTES_PER_TOKEN,
            max_tokens: info.max_tokens,
            affinity: key
                .filter(|_| cfg.affinity.used_by(cfg.policy))
                .map(|key| Sticky {
                    key,
                    load_factor: cfg.affinity.load_factor,
                    placed: placer.moved(key.key),
                }),
            cached: None,
        }
    }

    /// With the request's exact token count and, per backend, what its engine has
    /// cached of them.
    pub fn with_cached(
        mut self,
        tokens: Option<&super::prefix::PromptTokens>,
        cached: Option<&'a super::prefix::CachedPrefix>,
    ) -> Request<'a> {
        if let Some(t) = tokens {
            self.prompt_tokens = t.ids.len();
        }
        self.cached = cached;
        self
    }

    /// Prompt tokens the chosen backend will likely have to prefill for this request:
    /// all of them, except at the key's home, which has likely cached the reusable
    /// prefix. This is what the request adds to the backend's pending prefill. Counting
    /// the whole prompt at the home made the home of a popular prefix look busier the
    /// more of its requests were in flight, and pushed them off it (issue 8: one gateway
    /// kept fewer turns home than three, which each saw a third of the traffic).
    pub fn prefill_tokens(&self, choice: &Choice) -> usize {
        let reused = match (&self.affinity, choice.reason) {
            _ if choice.cached_tokens.is_some() => choice.cached_tokens.unwrap_or(0) as usize,
            (Some(s), Reason::AffinityHome) => s.key.reusable_bytes / BYTES_PER_TOKEN,
            _ => 0,
        };
        self.prompt_tokens.saturating_sub(reused)
    }
}

/// A request's affinity key and the load bound it is held to.
#[derive(Debug, Clone, Copy)]
pub struct Sticky {
    pub key: AffinityKey,
    /// `routing.affinity.load_factor`.
    pub load_factor: f64,
    /// The node id of the backend the key is placed on when that is not its rendezvous
    /// home (a long-lived prefix moved off a home whose share of KV cache it would
    /// overfill; see [`crate::routing::affinity::Placer`]): that backend comes first in the key's
    /// order, then the rest in rendezvous order.
    pub placed: Option<u64>,
}

/// Bytes of prompt JSON per token, for estimating prompt tokens without a tokenizer
/// (English text runs about 4 characters per token).
pub const BYTES_PER_TOKEN: usize = 4;
