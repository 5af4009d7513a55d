//! `GET /load-stats`: the fleet as the gateway sees it, per backend and in sum.

use std::time::Instant;

use super::ms;
use crate::config::Config;
use crate::fleet::FleetSnapshot;
use crate::metrics;
use crate::routing;

/// This gateway's placement of long-lived affinity keys (see `affinity::Placer`): how many
/// it tracks as long-lived, how many it homes away from their rendezvous home, and per
/// backend the prefix tokens homed there against its budget.
pub fn placement_stats(p: &crate::routing::affinity::Placement) -> serde_json::Value {
    let homes: Vec<serde_json::Value> = p
        .homed
        .iter()
        .map(|(name, tokens, budget)| {
            serde_json::json!({"backend": name, "prefix_tokens": tokens.round(), "budget_tokens": budget.round()})
        })
        .collect();
    serde_json::json!({
        "long_lived_keys": p.long_lived,
        "moved_keys": p.moved_keys(),
        "homes": homes,
    })
}

/// The fleet as this gateway sees it: what each engine last reported, what this gateway
/// added since, and how the `vllm` policy scores each backend for a typical request.
pub fn load_stats(config: &Config, snap: &FleetSnapshot, now: Instant) -> serde_json::Value {
    use serde_json::json;
    let stale_after = config.stale_after();
    let typical = routing::Request {
        model: "",
        prompt_tokens: 500,
        max_tokens: Some(256),
        affinity: None,
        cached: None,
    };
    let answered = metrics::sums_by(&metrics::REQUESTS, "backend");
    let failed = metrics::sums_by(&metrics::UPSTREAM_ERRORS, "backend");
    let by_class = metrics::sums_by(&metrics::REQUESTS, "status_class");
    let (mut running, mut waiting, mut in_flight, mut kv_sum, mut kv_n) =
        (0.0, 0.0, 0usize, 0.0, 0usize);
    let (mut healthy, mut routable, mut draining) = (0usize, 0usize, 0usize);
    let backends: Vec<serde_json::Value> = snap
        .backends
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let st = &e.state;
            let b = &e.backend;
            let fresh = st.fresh_load(crate::fleet::fresh_since(now, stale_after));
            let load = st.load.as_ref();
            let h = &b.health;
            // Healthy: its checks pass (a draining replica is healthy, only not sent
            // new requests); routable: in rotation now.
            healthy += usize::from(h.checks_up());
            routable += usize::from(h.routable());
            draining += usize::from(h.is_draining());
            if let Some(l) = fresh {
                running += l.running.unwrap_or(0.0);
                waiting += l.waiting.unwrap_or(0.0);
                if let Some(k) = l.kv_usage {
                    kv_sum += k;
                    kv_n += 1;
                }
            }
            in_flight += b.in_flight();
            let kv = fresh.and_then(|l| l.kv_usage);
            let queue_share = match (fresh, b.max_concurrent_requests) {
                (Some(l), Some(m)) => {
                    Some((l.running.unwrap_or(0.0) + l.waiting.unwrap_or(0.0)) / m as f64)
                }
                _ => None,
            };
            let utilization = match (kv, queue_share) {
                (Some(k), Some(q)) => Some(k.max(q)),
                (k, q) => k.or(q),
            };
            let hit_rate = load.and_then(|l| match (l.prefix_hits, l.prefix_queries) {
                (Some(h), Some(q)) if q > 0.0 => Some(h / q),
                _ => None,
            });
            json!({
                "name": b.name,
                "url": b.url,
                "address": b.addr.to_string(),
                "healthy": h.checks_up(),
                "routable": h.routable(),
                "health_error": h.check_error(),
                "circuit": h.breaker_state().as_str(),
                "circuit_opens_total": h.breaker_opens(),
                "last_failure": h.last_failure().map(|k| k.as_str()),
                "draining": h.is_draining(),
                "models_error": st.models_error,
                "vllm_version": st.version,
                "models": st.models,
                "running": fresh.and_then(|l| l.running),
                "waiting": fresh.and_then(|l| l.waiting),
                "kv_usage": kv,
                // LoRA adapter slots: null unless the engine reports them.
                "lora": fresh.and_then(|l| l.lora.as_ref()).map(|s| json!({
                    "max_loras": s.max,
                    "running_adapters": s.running,
                    "waiting_adapters": s.waiting,
                })),
                "in_flight": b.in_flight(),
                "requests_total": answered.get(&b.name).copied().unwrap_or(0),
                "upstream_errors_total": failed.get(&b.name).copied().unwrap_or(0),
                "dispatched_since_scrape": b.dispatched().saturating_sub(st.dispatched_at_scrape),
                "capacity": {
                    "kv_tokens": load.and_then(|l| l.kv_capacity_tokens),
                    "max_concurrent_requests": b.max_concurrent_requests,
                    // The engine's batch limit as learned; null until it has queued.
                    "max_running_learned": st.learned_max_running(),
                    "weight": b.weight,
                },
                "utilization": utilization,
                "itl_ms": ms(st.itl_s),
                "ttft_ms": ms(st.ttft_s),
                "e2e_ms": ms(st.e2e_s),
                "preemptions_total": load.and_then(|l| l.preemptions),
                "prefix_cache_hit_rate": hit_rate,
                // Its engine's KV events (null when not configured): how far its index
                // can be trusted (`exact`; `rebuilding` or `unknown`: routing uses the
                // approximate affinity for it), what it holds, what was lost.
                "kv_events": b.kv_events.as_ref().map(|k| kv_events_json(b, k)),
                "engines": load.map(|l| l.engines),
                "scrape_fresh": fresh.is_some(),
                "scrape_age_ms": st.load_at.map(|t| now.saturating_duration_since(t).as_millis() as u64),
                "last_scrape_error": st.scrape_error,
                "score_ms": ms(Some(routing::vllm_score(
                    snap,
                    i,
                    &typical,
                    crate::fleet::fresh_since(now, stale_after),
                ))),
            })
        })
        .collect();
    json!({
        "policy": config.policy.to_string(),
        "scrape_interval_ms": config.scrape_interval.as_millis() as u64,
        "requests": {
            "total": by_class.values().sum::<u64>(),
            "by_status_class": by_class,
        },
        "fleet": {
            "backends": snap.backends.len(),
            "healthy": healthy,
            "routable": routable,
            "draining": draining,
            "models": snap.healthy_models(),
            // What a request that names no model is for now, or why there is none.
            "default_model": match snap.default_model(config.default_model.as_deref()) {
                Ok(m) => json!({"model": m, "configured": config.default_model.is_some()}),
                Err(firsts) => json!({"model": null, "replicas_list_first": firsts}),
            },
            "model_aliases": &config.model_aliases,
            "running": running,
            "waiting": waiting,
            "in_flight": in_flight,
            "kv_usage_mean": if kv_n > 0 { Some(kv_sum / kv_n as f64) } else { None },
            "upstream_errors_total": failed.values().sum::<u64>(),
        },
        "backends": backends,
        // Entries whose host name has no address yet: nothing is sent to them.
        "awaiting_address": config
            .without_addresses()
            .map(|g| json!({"name": g.name, "host": g.resolve, "models": g.static_models}))
            .collect::<Vec<_>>(),
    })
}

/// A backend's KV-event subscription and index, for `/load-stats`.
fn kv_events_json(b: &crate::fleet::Backend, k: &crate::config::KvEvents) -> serde_json::Value {
    let v = b.prefix.view();
    let silent = b.completed().saturating_sub(b.prefix.heard_at());
    let routing_on = match v.coverage {
        crate::fleet::prefix::Coverage::Exact if silent <= routing::prefix::SILENT_AFTER => {
            "kv_events"
        }
        _ => "approximate",
    };
    serde_json::json!({
        "endpoint": k.endpoint,
        "replay": k.replay,
        "index": v.coverage.as_str(),
        "rebuild_blocks_left": match v.coverage {
            crate::fleet::prefix::Coverage::Rebuilding { until } => Some(until),
            _ => None,
        },
        "routing_on": routing_on,
        "requests_since_last_event": silent,
        // The server's process start time (else version) as last scraped: a new one
        // empties the index.
        "engine_identity": b.prefix.identity(),
        "block_size": v.block_size,
        "blocks": v.blocks,
        "last_sequence": v.last_seq,
        "batches_total": v.stats.batches,
        "blocks_stored_total": v.stats.stored,
        "blocks_removed_total": v.stats.removed,
        "gaps_total": v.stats.gaps,
        "gaps_replayed_total": v.stats.replayed,
        "restarts_total": v.stats.restarts,
        "orphan_blocks_total": v.stats.orphans,
        "malformed_total": v.stats.malformed,
    })
}
