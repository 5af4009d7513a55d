//! The request filter: the steps every request goes through before a replica is picked,
//! in order (River's request-filter pattern), each passing the request on or answering
//! it: who and what it is, whether its head is acceptable, the connection's settings, a
//! browser's preflight, its API key, the local answers, and for an inference request its
//! body and what routing decides about it (`routing::admit`, shared with `/explain`).

use bytes::Bytes;
use pingora::prelude::*;
use pingora::proxy::Session;
use std::sync::Arc;
use std::time::Instant;

use super::body::{self, BodyError};
use super::ctx::{request_id, RequestCtx, REQUEST_ID};
use super::respond::{
    answer_preflight, respond_error, respond_error_closing, respond_error_with, respond_json,
    respond_key_limited, BEARER_CHALLENGE,
};
use super::Gateway;
use crate::auth::shared::{Refused, SharedLimits, Via};
use crate::auth::{Denied, Identified, Priority};
use crate::cors;
use crate::flow;
use crate::openai::{self, ApiError, Route};
use crate::routing;

/// The request filter's steps, in the order they run.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Its id, its route, its CORS verdict.
    Identify,
    /// A head the gateway refuses: malformed, or over its limits.
    Head,
    /// Keep-alive and pipelining for an HTTP/1.1 client.
    Connection,
    /// A browser's CORS preflight, answered before any key is asked for.
    Preflight,
    /// The client's API key and its limits.
    Key,
    /// Everything but inference: answered by the gateway itself.
    Local,
    /// An inference request: its body, and what routing decides about it.
    Inference,
}

const STEPS: [Step; 7] = [
    Step::Identify,
    Step::Head,
    Step::Connection,
    Step::Preflight,
    Step::Key,
    Step::Local,
    Step::Inference,
];

/// Whether a step answered the request (and the filter ends there).
type Answered = bool;

impl Gateway {
    /// `request_filter`: runs [`STEPS`] until one answers; `Ok(false)` sends the request
    /// on to a replica.
    pub(super) async fn admit(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        for step in STEPS {
            let answered = match step {
                Step::Identify => self.identify(session, ctx),
                Step::Head => self.check_head(session, ctx).await?,
                Step::Connection => self.connection(session),
                Step::Preflight => preflight(session, ctx).await?,
                Step::Key => self.check_key(session, ctx).await?,
                Step::Local => self.answer_locally(session, ctx).await?,
                Step::Inference => self.inference(session, ctx).await?,
            };
            if answered {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn identify(&self, session: &mut Session, ctx: &mut RequestCtx) -> Answered {
        let header = session.req_header();
        ctx.request_id = request_id(header);
        ctx.route = openai::route(&header.method, header.uri.path());
        if let Some(c) = &self.config.load().cors {
            ctx.cors = c.verdict(&header.headers);
        }
        false
    }

    async fn check_head(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<Answered> {
        let limits = self.config.load().limits;
        let header = session.req_header();
        if let Some((limit, err)) = malformed_head(header, &limits) {
            if let Some(limit) = limit {
                crate::metrics::LIMIT_REFUSALS
                    .with_label_values(&[limit])
                    .inc();
            }
            return respond_error_closing(session, ctx, &err).await;
        }
        if let Some((limit, err)) = head_refusal(header, &limits) {
            crate::metrics::LIMIT_REFUSALS
                .with_label_values(&[limit])
                .inc();
            return respond_error(session, ctx, &err).await;
        }
        Ok(false)
    }

    fn connection(&self, session: &mut Session) -> Answered {
        if session.get_keepalive().is_some() {
            // Pingora keeps an HTTP/1.1 client's connection open forever by default.
            let idle = self.config.load().limits.keepalive_timeout;
            session.set_keepalive(Some(idle.as_secs()));
            // Requests a client sends before the answers to earlier ones are served in
            // turn (RFC 9112 §9.3.2), as nginx does; Pingora otherwise closes the
            // connection after the first answer and drops the rest.
            session.as_downstream_mut().set_pipelining_enabled(true);
        }
        false
    }

    async fn check_key(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<Answered> {
        let cfg = self.config.load();
        let Some(keys) = cfg.api_keys.clone() else {
            return Ok(false);
        };
        if ctx.route == Route::Health {
            return Ok(false);
        }
        let presented = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        let admitted = match &cfg.shared_limits {
            None => keys.admit(presented, Instant::now()),
            Some(shared) => match keys.identify(presented) {
                // Counted in one round trip with its prompt's tokens, once they are known.
                Ok(id) if ctx.route == Route::Inference => {
                    ctx.pending_key = Some(id);
                    return Ok(false);
                }
                Ok(id) => return self.admit_shared(session, ctx, shared, &id, 0).await,
                Err(denied) => Err(denied),
            },
        };
        match admitted {
            Ok(permit) => {
                ctx.key = Some(permit);
                Ok(false)
            }
            Err(denied) => respond_denied(session, ctx, denied).await,
        }
    }

    /// Counts a request of key `id` whose prompt is about `prompt` tokens against the
    /// limits shared through Redis; `Ok(true)` when it was refused (answered).
    async fn admit_shared(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        shared: &Arc<SharedLimits>,
        id: &Identified,
        prompt: u64,
    ) -> Result<Answered> {
        let (verdict, via) = shared.admit(id, prompt).await;
        let label = match (via, &verdict) {
            (Via::Unlimited, _) => None,
            (Via::Redis, _) => Some("redis"),
            (Via::Local, Err(Refused::Unavailable)) => Some("deny"),
            (Via::Local, _) => Some("local"),
        };
        if let Some(label) = label {
            crate::metrics::SHARED_LIMITS
                .with_label_values(&[label])
                .inc();
        }
        match verdict {
            Ok(permit) => {
                ctx.key = Some(permit);
                Ok(false)
            }
            Err(Refused::Limited(denied)) => respond_denied(session, ctx, denied).await,
            Err(Refused::Unavailable) => {
                let err = ApiError::new(
                    503,
                    "ServiceUnavailableError",
                    "The gateway cannot reach the store its API keys' limits are shared \
                     through; retry shortly.",
                );
                respond_error_with(session, ctx, &err, &[("retry-after", "1")]).await
            }
        }
    }

    /// The routes the gateway answers itself: health, the fleet's models, its version and
    /// load, and the errors for a wrong method or an unknown path.
    async fn answer_locally(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Answered> {
        let snap = self.fleet.load();
        let body = match ctx.route {
            Route::Inference => return Ok(false),
            Route::MethodNotAllowed(allow) => {
                return respond_error(session, ctx, &ApiError::method_not_allowed(allow)).await
            }
            Route::NotFound => {
                let path = session.req_header().uri.path().to_string();
                return respond_error(session, ctx, &ApiError::not_found_route(&path)).await;
            }
            Route::Health => Bytes::from_static(b"{\"status\":\"ok\"}"),
            Route::Models => {
                openai::models_body(&snap.model_cards(&self.config.load().model_aliases))
            }
            Route::Load => {
                let n: usize = snap.backends.iter().map(|e| e.backend.in_flight()).sum();
                Bytes::from(format!("{{\"server_load\":{n}}}"))
            }
            Route::Version => match snap.version() {
                Some(v) => Bytes::from(serde_json::json!({ "version": v }).to_string()),
                None => {
                    let err = ApiError::new(
                        503,
                        "ServiceUnavailableError",
                        "No replica in rotation has reported its vLLM version yet.",
                    );
                    return respond_error(session, ctx, &err).await;
                }
            },
        };
        ctx.status = 200;
        let mut extra = vec![(REQUEST_ID, ctx.request_id())];
        extra.extend(ctx.cors.headers());
        respond_json(session, &self.traffic, 200, body, true, &extra).await?;
        Ok(true)
    }

    /// An inference request: its whole body, what routing decides about it, its key's
    /// token budget; refused here, when no replica can take it, rather than after
    /// `upstream_peer` finds nothing (an answer after a failed proxy closes the client's
    /// connection, see `fail_to_proxy`).
    async fn inference(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<Answered> {
        let cfg = self.config.load();
        let pace = body::BodyPace::of(&cfg.limits);
        let body = match body::read_full_body(session, cfg.limits.max_body_bytes, pace).await {
            Ok(b) => b,
            Err(BodyError::Reply(err)) => {
                let limit = match err.status {
                    413 => Some("max_body_size"),
                    408 => Some("body_read_timeout"),
                    _ => None,
                };
                if let Some(limit) = limit {
                    crate::metrics::LIMIT_REFUSALS
                        .with_label_values(&[limit])
                        .inc();
                }
                return respond_error(session, ctx, &err).await;
            }
            Err(BodyError::Framing(err)) => return respond_error_closing(session, ctx, &err).await,
            Err(BodyError::ClientGone(e)) => return Err(e),
        };
        let snap = self.fleet.load();
        let mut routed = match routing::admit(&cfg, &snap, &session.req_header().headers, body) {
            Ok(r) => r,
            Err(err) => {
                if err == ApiError::too_deep(cfg.limits.max_json_depth) {
                    crate::metrics::LIMIT_REFUSALS
                        .with_label_values(&["max_json_depth"])
                        .inc();
                }
                return self.refuse(session, ctx, &err).await;
            }
        };
        if let Some(err) = routing::refusal(&cfg, &snap, &routed.info.model, routed.asked()) {
            return self.refuse(session, ctx, &err).await;
        }
        routed.tokens =
            routing::prefix::tokens_of(self.config.load_full(), snap.clone(), &routed).await;
        // Counted when the model has a tokenizer, else estimated from its bytes.
        let prompt = routed
            .tokens
            .as_ref()
            .map_or(routed.info.prompt_bytes / routing::BYTES_PER_TOKEN, |t| {
                t.ids.len()
            }) as u64;
        if let Some(id) = ctx.pending_key.take() {
            let answered = match cfg.shared_limits.clone() {
                Some(shared) => {
                    self.admit_shared(session, ctx, &shared, &id, prompt)
                        .await?
                }
                // A reload turned sharing off meanwhile: counted here, as it now is.
                None => match id.admit_local(Instant::now()) {
                    Ok(permit) => {
                        ctx.key = Some(permit);
                        false
                    }
                    Err(denied) => respond_denied(session, ctx, denied).await?,
                },
            };
            if answered {
                return Ok(true);
            }
        }
        if let Some(k) = ctx.key.as_ref().filter(|k| k.counts_tokens()) {
            if let Err(Denied::Limited {
                key,
                message,
                retry_after,
            }) = k.reserve(prompt, Instant::now())
            {
                return respond_key_limited(session, ctx, &key, message, retry_after).await;
            }
            ctx.tokens_reserved = prompt;
        }
        if let Some(k) = &routed.affinity {
            self.placer
                .record(&routed.info.model, k.key, k.reusable_bytes, Instant::now());
        }
        let class = match self.class_of(session, ctx) {
            Ok(c) => c,
            Err(err) => return respond_error(session, ctx, &err).await,
        };
        let mut body = routed.body;
        if cfg.engine_priority {
            if let Some(b) = openai::with_priority(&body, crate::flow::engine_priority(class)) {
                body = Bytes::from(b);
            }
        }
        ctx.affinity = routed.affinity;
        ctx.tokens = routed.tokens;
        ctx.bytes_in = body.len();
        ctx.body = Some(body);
        ctx.class = class;
        let turn = self.wait_turn(session, ctx, &routed.info.model).await;
        ctx.info = Some(routed.info);
        if self.take_turn(session, ctx, turn).await? {
            return Ok(true);
        }
        self.budget.record_request(Instant::now());
        Ok(false)
    }

    /// The request's class when the fleet is full: its key's, lowered by the
    /// `x-vllm-edge-priority` header.
    fn class_of(&self, session: &Session, ctx: &RequestCtx) -> Result<Priority, ApiError> {
        let key_class = ctx.key.as_ref().map_or(Priority::Normal, |k| k.priority);
        let header = session.req_header().headers.get(flow::PRIORITY_HEADER);
        flow::class_of(key_class, header.map(|v| v.as_bytes()))
            .map_err(|m| ApiError::bad_request(m, None))
    }

    /// Waits in the model's queue while every replica of it is full (`flow`), or not at
    /// all while one has room.
    async fn wait_turn(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        model: &str,
    ) -> Result<flow::Admitted, flow::Refusal> {
        let asker = match &ctx.key {
            Some(k) => flow::Asker {
                key: k.key.clone(),
                weight: k.weight,
                class: ctx.class,
                keyed: true,
            },
            None => flow::Asker::anonymous(ctx.class),
        };
        let downstream = session.as_downstream_mut();
        let gone = async {
            // The body is read: this returns only when the client closes (or resets its
            // HTTP/2 stream); bytes of a pipelined next request are kept for later.
            if downstream.read_body_or_idle(true).await.is_ok() {
                std::future::pending::<()>().await;
            }
        };
        self.flow.wait_turn(model, &asker, gone).await
    }

    /// What flow control decided: the request goes on (holding its reserved slot), or
    /// is answered (429, 503), or its client left.
    async fn take_turn(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        turn: Result<flow::Admitted, flow::Refusal>,
    ) -> Result<Answered> {
        let r = match turn {
            Ok(admitted) => {
                ctx.queued = admitted.queued;
                ctx.grant = admitted.grant;
                return Ok(false);
            }
            Err(r) => r,
        };
        ctx.queued = Some(r.waited);
        if r.why == flow::Shed::ClientGone {
            ctx.refused = Some("the client left while its request was queued".into());
            return Error::e_explain(
                ErrorType::ConnectionClosed,
                "the client left while its request was queued",
            );
        }
        let err = match r.status {
            429 => ApiError::rate_limited(r.message),
            s => ApiError::new(s, "ServiceUnavailableError", r.message),
        };
        if r.status == 429 {
            ctx.refused_key = ctx.key.as_ref().map(|k| k.key.to_string());
        }
        if r.why == flow::Shed::Shutdown {
            session.set_keepalive(None);
        }
        let after = r.retry_after.to_string();
        respond_error_with(session, ctx, &err, &[("retry-after", &after)]).await
    }

    /// Answers `err`; a 503 (nothing can serve the request now) says when to retry.
    async fn refuse(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        err: &ApiError,
    ) -> Result<Answered> {
        if err.status == 503 {
            let after = self.retry_after();
            return respond_error_with(session, ctx, err, &[("retry-after", &after)]).await;
        }
        respond_error(session, ctx, err).await
    }
}

/// A browser's CORS preflight (when CORS is on): answered before the key check, since a
/// browser never sends a key with it.
async fn preflight(session: &mut Session, ctx: &mut RequestCtx) -> Result<Answered> {
    if ctx.cors == cors::Verdict::Off {
        return Ok(false);
    }
    let header = session.req_header();
    match cors::preflight_method(&header.method, &header.headers) {
        Some(asked) => answer_preflight(session, ctx, asked).await,
        None => Ok(false),
    }
}

/// The answer to a request its key does not admit: 401 without a valid key, 429 over a
/// limit.
async fn respond_denied(
    session: &mut Session,
    ctx: &mut RequestCtx,
    denied: Denied,
) -> Result<Answered> {
    let (why, err) = match denied {
        Denied::Limited {
            key,
            message,
            retry_after,
        } => return respond_key_limited(session, ctx, &key, message, retry_after).await,
        Denied::Missing => ("missing", ApiError::missing_api_key()),
        Denied::Invalid => ("invalid", ApiError::invalid_api_key()),
    };
    crate::metrics::AUTH_REFUSED.with_label_values(&[why]).inc();
    respond_error_with(session, ctx, &err, &[BEARER_CHALLENGE]).await
}

/// A request head the gateway refuses before reading the body: too large or too many
/// fields. Returns the limit's name (for metrics) and the answer. (A head with both
/// `Content-Length` and `Transfer-Encoding` never gets here as such: Pingora drops the
/// length, reads the body as chunked and closes the connection after the answer, so a
/// request smuggled behind the body is never read.)
fn head_refusal(
    header: &pingora::http::RequestHeader,
    limits: &crate::config::ClientLimits,
) -> Option<(&'static str, ApiError)> {
    let fields = header.headers.len();
    if fields > limits.max_headers {
        return Some((
            "max_header_count",
            ApiError::header_too_large(format!(
                "The request has {fields} header fields; the limit is {} \
                 (limits.max_header_count).",
                limits.max_headers
            )),
        ));
    }
    let request_line = header.method.as_str().len() + header.raw_path().len() + 12;
    let bytes = request_line
        + header
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if bytes > limits.max_header_bytes {
        return Some((
            "max_header_size",
            ApiError::header_too_large(format!(
                "The request head is {bytes} bytes; the limit is {} (limits.max_header_size).",
                limits.max_header_bytes
            )),
        ));
    }
    None
}

/// A request head whose framing or target the gateway will not guess at: a transfer
/// coding it cannot decode, an HTTP/1.1 request without `Host`, or a request line the
/// client connection marked (see `conn::MALFORMED`): a control character in it, or a
/// line too long to pass on.
/// Answered, then the connection closes. A limit's name comes with its answer.
fn malformed_head(
    header: &pingora::http::RequestHeader,
    limits: &crate::config::ClientLimits,
) -> Option<(Option<&'static str>, ApiError)> {
    if let Some(mark) = header.headers.get(super::conn::MALFORMED) {
        let mark = mark.to_str().unwrap_or("");
        if let Some(n) = mark.strip_prefix("long ") {
            let line: usize = n.parse().unwrap_or(usize::MAX);
            let fields: usize = header
                .headers
                .iter()
                .filter(|(k, _)| k.as_str() != super::conn::MALFORMED)
                .map(|(k, v)| k.as_str().len() + v.len() + 4)
                .sum();
            let bytes = line.saturating_add(fields);
            if bytes > limits.max_header_bytes {
                let err = ApiError::header_too_large(format!(
                    "The request head is {bytes} bytes; the limit is {} \
                     (limits.max_header_size).",
                    limits.max_header_bytes
                ));
                return Some((Some("max_header_size"), err));
            }
            let err = ApiError::new(
                414,
                "URITooLongError",
                format!(
                    "The request line is {line} bytes; the gateway takes at most {}.",
                    crate::proxy::conn::MAX_REQUEST_LINE
                ),
            );
            return Some((None, err));
        }
        let err = ApiError::bad_request("The request line contains a control character.", None);
        return Some((None, err));
    }
    if let Err(BodyError::Framing(err) | BodyError::Reply(err)) =
        body::transfer_coding(&header.headers)
    {
        return Some((None, err));
    }
    if header.version == http::Version::HTTP_11 && !header.headers.contains_key(http::header::HOST)
    {
        let err = ApiError::bad_request(
            "An HTTP/1.1 request must carry a Host header (RFC 9112 §3.2).",
            None,
        );
        return Some((None, err));
    }
    None
}
