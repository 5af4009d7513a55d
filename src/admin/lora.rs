//! LoRA adapters loaded and unloaded at run time across the fleet: vLLM's
//! `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (servers started with
//! `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`), answered on the admin listener (a change to
//! every replica is an operator's act, not an API client's) by sending the same request
//! to every replica in rotation, or to those serving `?model=BASE`. The replicas that
//! took it (or refused it) have their models read again before the answer, so the
//! adapter is routable as soon as the client hears it was loaded, and a refusal from a
//! replica that already is as asked is told by its models, not by the refusal's text.

use std::sync::Arc;

use crate::config::Config;
use crate::fleet::{Backend, Fleet};
use crate::httpclient;
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

    /// Whether a replica that answered `status` with `body` is as asked: it took it
    /// (200), or it refused (4xx) and is as asked anyway (an earlier, partly failed
    /// request reached it), which `listed` tells (whether its models, read after its
    /// answer, list the adapter). Without that, from vLLM's refusal texts: 400 "has
    /// already been loaded" to a load, 404 "cannot be found" to an unload.
    fn as_asked(self, status: u16, body: &[u8], listed: Option<bool>) -> bool {
        if status == 200 {
            return true;
        }
        if !(400..500).contains(&status) {
            return false;
        }
        if let Some(listed) = listed {
            return listed == (self == Op::Load);
        }
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
            .map(|b| httpclient::post_json(b.target(), op.path(), body, limit, MAX_ANSWER)),
    )
    .await;
    // The replicas that took it or refused: their models now, published before the
    // answer, and whether they list the adapter.
    let answered: Vec<usize> = (0..targets.len())
        .filter(|&i| {
            answers[i]
                .as_ref()
                .is_ok_and(|r| r.status == 200 || (400..500).contains(&r.status))
        })
        .collect();
    let reread =
        futures::future::join_all(answered.iter().map(|&i| {
            crate::observe::scraper::discover_models(&targets[i], cfg.discovery_timeout)
        }))
        .await;
    let mut listed: Vec<Option<bool>> = vec![None; targets.len()];
    for (&i, models) in answered.iter().zip(reread) {
        match models {
            Ok(cards) => {
                listed[i] = Some(
                    cards
                        .iter()
                        .any(|c| crate::engine::models::card_id(c) == Some(name.as_str())),
                );
                fleet.publish_models(&targets[i], cards);
            }
            Err(e) => {
                tracing::warn!(backend = %targets[i].name, error = %e, "models not read again after a LoRA change; the next scrape will")
            }
        }
    }
    let took = answers
        .iter()
        .filter(|a| a.as_ref().is_ok_and(|r| r.status == 200))
        .count();
    let statuses: Vec<Option<u16>> = answers
        .iter()
        .map(|a| a.as_ref().ok().map(|r| r.status))
        .collect();
    tracing::info!(adapter = %name, op = op.done(), replicas = targets.len(), took, "LoRA change sent to the fleet");
    let first = answers.iter().find_map(|a| a.as_ref().ok());
    // Replicas that were already as asked count as done when others took it: a retry
    // after a partial failure then succeeds.
    let done = |i: usize| {
        answers[i]
            .as_ref()
            .is_ok_and(|r| op.as_asked(r.status, &r.body, listed[i]))
    };
    let ok = answers
        .iter()
        .find(|a| a.as_ref().is_ok_and(|r| r.status == 200));
    match (first, statuses.iter().all(|s| *s == statuses[0])) {
        (Some(r), true) => relay(r),
        (_, false) if (0..targets.len()).all(done) => relay(
            ok.and_then(|a| a.as_ref().ok())
                .expect("mixed answers, all done: one took it"),
        ),
        _ => {
            let failed: Vec<String> = (0..targets.len())
                .filter(|&i| !done(i))
                .map(|i| (&targets[i], &answers[i]))
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
            let done_n = (0..targets.len()).filter(|&i| done(i)).count();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_judged_by_the_models_read_after_it() {
        // Whatever the refusal says, the models tell.
        assert!(Op::Load.as_asked(400, b"some future wording", Some(true)));
        assert!(!Op::Load.as_asked(400, b"already been loaded", Some(false)));
        assert!(Op::Unload.as_asked(404, b"{}", Some(false)));
        assert!(!Op::Unload.as_asked(400, b"{}", Some(true)));
        // Without the models, vLLM's texts.
        assert!(Op::Load.as_asked(400, b"The lora adapter 'a' has already been loaded.", None));
        assert!(Op::Unload.as_asked(404, b"The lora adapter 'a' cannot be found.", None));
        assert!(!Op::Load.as_asked(400, b"invalid path", None));
        // A success is one; a server error never is.
        assert!(Op::Unload.as_asked(200, b"", Some(true)));
        assert!(!Op::Load.as_asked(500, b"", Some(true)));
    }
}
