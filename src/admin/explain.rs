//! `POST /explain`: where the gateway would send a request now, and why.

use serde_json::json;
use std::time::Instant;

use super::ms;
use crate::config::Config;
use crate::engine::metrics::LoraFit;
use crate::fleet::FleetSnapshot;
use crate::routing::affinity::Placer;
use crate::routing::{self, Routed};

/// What the gateway would do with a request now, and why (`POST /explain`): a dry run of
/// the selection the request path makes, which changes nothing (no rotation step, no
/// placement record, no counter). `routed` is what the request path decides about the
/// request before picking ([`routing::admit`]).
pub fn explain(
    cfg: &Config,
    snap: &FleetSnapshot,
    placer: &Placer,
    routed: &Routed,
    now: Instant,
) -> serde_json::Value {
    let info = &routed.info;
    let tokens = routed.tokens.as_deref();
    let cached = tokens.map(|t| routing::prefix::cached_prefix(snap, t));
    let req = routing::Request::of(info, routed.affinity, cfg, placer)
        .with_cached(tokens, cached.as_ref());
    let stale_after = cfg.stale_after();
    let scorer = routing::Scorer::new(snap, &req, crate::fleet::fresh_since(now, stale_after));
    // Scratch selectors: the live one's round-robin cursors must not move. (So
    // `round-robin` shows an order, not whose turn it is.)
    let order = routing::Selector::new(stale_after).candidates(cfg.policy, snap, &req, &[], now);
    let choice = routing::Selector::new(stale_after).best(cfg.policy, snap, &req, &[], now);
    let sticky = req.affinity.as_ref();
    let request = json!({
        "model": info.model,
        "model_defaulted": routed.defaulted,
        "model_alias": routed.alias,
        "stream": info.stream,
        "prompt_tokens_estimate": req.prompt_tokens,
        // Counted by the model's own tokenizer (`routing.tokenizers`), or estimated.
        "prompt_tokens_counted": tokens.is_some(),
        "max_tokens": info.max_tokens,
        "affinity_key": sticky.map(|s| json!({
            "source": s.key.source.as_str(),
            "reusable_prefix_tokens": s.key.reusable_bytes / routing::BYTES_PER_TOKEN,
        })),
    });
    let candidate = |i: usize| {
        let e = &snap.backends[i];
        let t = scorer.terms(snap, i);
        json!({
            "backend": e.backend.name,
            "score_ms": ms(Some(t.score)),
            "terms_ms": {
                "step": ms(Some(t.step)),
                "prefill": ms(Some(t.prefill)),
                "queue": ms(Some(t.queue)),
                "kv_pressure": ms(Some(t.pressure)),
                "lora_slot": ms(Some(t.lora)),
                "slow_decode": ms(Some(t.decode)),
            },
            "scrape_fresh": t.fresh,
            // For a LoRA adapter: whether it holds a slot there, would take a free one,
            // or would wait for one.
            "lora": match t.lora_fit {
                LoraFit::Unknown => None,
                LoraFit::Active => Some("holds a slot"),
                LoraFit::Free => Some("free slot"),
                LoraFit::Full => Some("no slot free"),
            },
            "sequences": (t.sequences * 100.0).round() / 100.0,
            // What its engine holds of the prompt, and where that number comes from: its
            // KV events (exact), or the approximate affinity (its home likely holds the
            // reusable prefix), or nothing known.
            "cached_prefix": prefix_json(e, i, cached.as_ref(), sticky, choice.as_ref().ok()),
            "in_flight": e.backend.in_flight(),
        })
    };
    let choice = match &choice {
        Ok(c) => json!({
            "backend": snap.backends[c.index].backend.name,
            "reason": c.reason.as_str(),
            "score_ms": ms(c.score_s),
        }),
        Err(_) => serde_json::Value::Null,
    };
    // What the request path answers instead, when nothing can take the request.
    let why_none = routing::refusal(cfg, snap, &info.model, routed.asked())
        .map(|e| format!("{}: {}", e.status, e.message));
    let candidates: Vec<serde_json::Value> =
        order.iter().flatten().map(|&i| candidate(i)).collect();
    // The model's other backends, and why they are out of rotation.
    let excluded: Vec<serde_json::Value> = snap
        .serving(&info.model)
        .unwrap_or(&[])
        .iter()
        .filter(|i| !order.as_ref().is_ok_and(|o| o.contains(i)))
        .map(|&i| {
            let h = &snap.backends[i].backend.health;
            let why = if !h.checks_up() {
                "health checks failing"
            } else if h.is_draining() {
                "draining"
            } else {
                "circuit open"
            };
            json!({"backend": snap.backends[i].backend.name, "why": why})
        })
        .collect();
    json!({
        "policy": cfg.policy.to_string(),
        "request": request,
        "choice": choice,
        "no_choice": why_none,
        "candidates": candidates,
        "excluded": excluded,
    })
}

/// What backend `e` (index `i`) holds of the request's prompt, and where the number
/// comes from: `kv_events` (its engine's events, exact), `approximate` (the affinity
/// home, which likely holds the reusable prefix), or `none`.
fn prefix_json(
    e: &crate::fleet::BackendEntry,
    i: usize,
    cached: Option<&routing::prefix::CachedPrefix>,
    sticky: Option<&routing::Sticky>,
    choice: Option<&routing::Choice>,
) -> serde_json::Value {
    let index = e
        .backend
        .kv_events
        .as_ref()
        .map(|_| e.backend.prefix.coverage().0.as_str());
    if let Some(tokens) = cached.and_then(|c| c.get(i)) {
        return json!({"tokens": tokens, "source": "kv_events", "index": index});
    }
    let home = choice.is_some_and(|c| c.index == i && c.reason == routing::Reason::AffinityHome);
    match sticky.filter(|_| home) {
        Some(s) => json!({
            "tokens": s.key.reusable_bytes / routing::BYTES_PER_TOKEN,
            "source": "approximate",
            "index": index,
        }),
        None => json!({"tokens": null, "source": "none", "index": index}),
    }
}
