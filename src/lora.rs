//! LoRA adapters loaded and unloaded at run time across the fleet: vLLM's
//! `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (servers started with
//! `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`), answered on the admin listener (a change to
//! every replica is an operator's act, not an API client's) by sending the same request
//! to every replica in rotation, or to those serving `?model=BASE`. The replicas that
//! took it have their models read again before the answer, so the adapter is routable
//! as soon as the client hears it was loaded.

use std::sync::Arc;

use crate::config::Config;
use crate::fleet::{Backend, Fleet};
use crate::httpclient::{self, Target};
use crate::openai::ApiError;

/// What is asked of the replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Load,
    Unload,
}

impl Op {
    /// The operation a path names.
    pub fn of(path: &str) -> Option<Op> {
        match path {
            "/v1/load_lora_adapter" => Some(Op::Load),
            "/v1/unload_lora_adapter" => Some(Op::Unload),
            _ => None,
        }
    }

    fn path(self) -> &'static str {
        match self {
            Op::Load => "/v1/load_lora_adapter",
            Op::Unload => "/v1/unload_lora_adapter",
        }
    }

    /// Whether a refusal says the replica is already as asked: vLLM's 400 "has already
    /// been loaded" to a load, its 404 "cannot be found" to an unload.
    fn already(self, status: u16, body: &[u8]) -> bool {
        let (want, says): (u16, &[u8]) = match self {
            Op::Load => (400, b"already been loaded"),
            Op::Unload => (404, b"cannot be found"),
        };
        status == want && body.windows(says.len()).any(|w| w == says)
    }

    fn done(self) -> &'static str {
        match self {
            Op::Load => "loaded",
            Op::Unload => "unloaded",
        }
    }
}

/// An answer for the client.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Outcome {
    fn error(e: &ApiError) -> Outcome {
        Outcome {
            status: e.status,
            content_type: "application/json",
            body: e.body().to_vec(),
        }
    }
}

/// A replica's answer is read up to this (vLLM answers a sentence).
const MAX_ANSWER: usize = 64 * 1024;

/// Sends `body` (the client's request, as it came) to the replicas, and answers as one
/// vLLM server would when all agree: the first replica's answer when every one took it,
/// or the common refusal when every one refused alike (an adapter already loaded
/// everywhere: 400; runtime updating off everywhere: 404). When some took it and the
/// others were already as asked, the answer of one that took it. Otherwise 502, naming
/// what each replica that failed said.
pub async fn apply(
    fleet: &Fleet,
    cfg: &Config,
    op: Op,
    body: &[u8],
    base: Option<&str>,
) -> Outcome {
    let named = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("lora_name")?.as_str().map(str::to_string))
        .filter(|n| !n.is_empty());
    let Some(name) = named else {
        return Outcome::error(&ApiError::bad_request(
            "The body must be a JSON object with a non-empty string `lora_name`.",
            Some("lora_name"),
        ));
    };
    let snap = fleet.load();
    if let Some(m) = base {
        if snap.serving(m).is_none() {
            return Outcome::error(&ApiError::model_not_found(m));
        }
    }
    let targets: Vec<Arc<Backend>> = snap
        .backends
        .iter()
        .filter(|e| e.backend.health.routable_ignoring_breaker())
        .filter(|e| base.is_none_or(|m| e.state.models.iter().any(|x| x == m)))
        .map(|e| e.backend.clone())
        .collect();
    if targets.is_empty() {
        return Outcome::error(&ApiError::no_backend(base.unwrap_or("any model")));
    }
    // Loading may fetch the adapter's weights: as long as a non-streaming answer may take.
    let limit = cfg.timeouts.non_stream_total;
    let answers = futures::future::join_all(
        targets
            .iter()
            .map(|b| httpclient::post_json(Target::of(b), op.path(), body, limit, MAX_ANSWER)),
    )
    .await;
    // The replicas that took it: their models now, published before the answer.
    let took: Vec<&Arc<Backend>> = targets
        .iter()
        .zip(&answers)
        .filter(|(_, a)| a.as_ref().is_ok_and(|r| r.status == 200))
        .map(|(b, _)| b)
        .collect();
    let reread = futures::future::join_all(
        took.iter()
            .map(|b| crate::scraper::discover_models(b, cfg.discovery_timeout)),
    )
    .await;
    for (b, models) in took.iter().zip(reread) {
        match models {
            Ok(cards) => fleet.publish_models(b, cards),
            Err(e) => {
                tracing::warn!(backend = %b.name, error = %e, "models not read again after a LoRA change; the next scrape will")
            }
        }
    }
    let statuses: Vec<Option<u16>> = answers
        .iter()
        .map(|a| a.as_ref().ok().map(|r| r.status))
        .collect();
    tracing::info!(adapter = %name, op = op.done(), replicas = targets.len(), took = took.len(), "LoRA change sent to the fleet");
    let first = answers.iter().find_map(|a| a.as_ref().ok());
    // Replicas that were already as asked (an earlier, partly failed request reached
    // them) count as done when others took it: a retry then succeeds.
    let done = |a: &Result<httpclient::Response, _>| {
        a.as_ref()
            .is_ok_and(|r| r.status == 200 || op.already(r.status, &r.body))
    };
    let ok = answers
        .iter()
        .find(|a| a.as_ref().is_ok_and(|r| r.status == 200));
    match (first, statuses.iter().all(|s| *s == statuses[0])) {
        (Some(r), true) => relay(r),
        (_, false) if answers.iter().all(done) => relay(
            ok.and_then(|a| a.as_ref().ok())
                .expect("mixed answers, all done: one took it"),
        ),
        _ => {
            let failed: Vec<String> = targets
                .iter()
                .zip(&answers)
                .filter(|(_, a)| !done(a))
                .map(|(b, a)| match a {
                    Ok(r) => format!(
                        "{}: {} {}",
                        b.name,
                        r.status,
                        String::from_utf8_lossy(&r.body[..r.body.len().min(300)])
                    ),
                    Err(e) => format!("{}: {e}", b.name),
                })
                .collect();
            let done_n = answers.iter().filter(|a| done(a)).count();
            Outcome::error(&ApiError::new(
                502,
                "BadGatewayError",
                format!(
                    "LoRA adapter '{name}' {} on {done_n} of {} replicas; the others: {}",
                    op.done(),
                    targets.len(),
                    failed.join("; ")
                ),
            ))
        }
    }
}

/// A replica's answer, as it gave it.
fn relay(r: &httpclient::Response) -> Outcome {
    Outcome {
        status: r.status,
        content_type: if r.body.starts_with(b"{") {
            "application/json"
        } else {
            "text/plain; charset=utf-8"
        },
        body: r.body.to_vec(),
    }
}
