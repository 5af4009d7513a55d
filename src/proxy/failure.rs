//! When an attempt fails: whether it counts against its backend (the circuit breaker),
//! whether another replica is tried, and what the client is told.

use pingora::prelude::*;
use pingora::proxy::{FailToProxy, Session};
use pingora::{ErrorSource, ErrorType, RetryType};
use std::time::Instant;

use super::ctx::{RequestCtx, REQUEST_ID};
use super::deadline::Attempt;
use super::respond::respond_json;
use super::{gate, Gateway};
use crate::fleet::health::FailureKind;
use crate::openai::ApiError;

/// A dead pooled connection (the backend closed it while idle) is retried on the same
/// backend at most this many times per request, without counting as a failed attempt.
const MAX_STALE_CONNECTION_RETRIES: u32 = 2;

pub(super) fn is_timeout(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
    ) || gate::expired_in(e).is_some()
}

impl Gateway {
    /// `fail_to_connect`: nothing was sent, so another replica may always be tried.
    pub(super) fn connect_failed(
        &self,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing was sent upstream: always safe to try another replica.
        tracing::warn!(peer = %peer, error = %e, attempt = ctx.attempts, "connect failed");
        self.note_failure(ctx, &e, FailureKind::Connect);
        let retry = self.may_retry(ctx);
        e.set_retry(retry);
        e
    }

    /// `error_while_proxy`: count the failure against its backend (before or after the
    /// answer's head), and retry on another replica while nothing reached the client.
    pub(super) fn proxy_failed(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("peer: {peer}"));
        let nothing_sent_down = session.response_written().is_none();
        let expired = ctx
            .deadlines
            .as_ref()
            .and_then(Attempt::fired)
            .or_else(|| gate::expired_in(&e));
        if let Some(d) = ctx.deadlines.take() {
            d.finish();
        }
        let upstream_side = matches!(e.esource(), ErrorSource::Upstream)
            || matches!(e.etype(), ErrorType::HTTPStatus(_))
            || expired.is_some();
        let kind = match (expired, e.etype()) {
            (Some(_), _) => FailureKind::Timeout,
            (None, ErrorType::HTTPStatus(_)) => FailureKind::Status5xx,
            (None, _) if is_timeout(&e) => FailureKind::Timeout,
            _ => FailureKind::Reset,
        };
        if let Some(why) = expired {
            e = e.more_context(format!("{} deadline passed", why.as_str()));
        }
        // Pingora's own read timeout (a stream's backstop, a non-streaming answer's
        // deadline) is a timeout too.
        ctx.timed_out = expired.is_some() || is_timeout(&e);
        if !upstream_side {
            // The client went away or sent garbage: not the backend's fault.
            e.set_retry(false);
            return e;
        }
        if !(nothing_sent_down && ctx.body.is_some()) {
            // Part of the answer reached the client: no retry, but the backend failed.
            tracing::warn!(peer = %peer, error = %e, "upstream failed mid-response");
            self.note_failure_as(ctx, &e, kind, "mid_stream");
            e.set_retry(false);
            return e;
        }
        // A pooled connection that the backend had closed while idle: the backend itself
        // is fine, try it again.
        let stale = matches!(e.retry, RetryType::ReusedOnly) && client_reused && expired.is_none();
        if stale && ctx.stale_retries < MAX_STALE_CONNECTION_RETRIES {
            ctx.stale_retries += 1;
            ctx.attempts -= 1;
            e.set_retry(true);
            return e;
        }
        tracing::warn!(peer = %peer, error = %e, attempt = ctx.attempts, "upstream failed before answering");
        self.note_failure(ctx, &e, kind);
        let retry = self.may_retry(ctx);
        e.set_retry(retry);
        e
    }

    /// `fail_to_proxy`: the client's answer when the request failed: an OpenAI-shaped
    /// error, or an error event for a stream that already began.
    pub(super) async fn answer_failure(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        if session.response_written().is_some() {
            // Part of the answer already reached the client. A stream gets an error
            // event and `[DONE]`, as vLLM itself reports mid-stream failures, rather than
            // being cut silently. Over HTTP/2 the stream then ends cleanly. Over HTTP/1.1
            // the body's final chunk is not sent: Pingora closes the client connection
            // after a failed proxy whatever we answer here, and a client that saw a
            // well-ended response would put the connection back in its pool and could
            // send its next request into the closing socket. An unfinished body tells it
            // not to reuse the connection; SDKs stop at the error event anyway.
            if ctx.sse && ctx.status == 200 && matches!(e.esource(), ErrorSource::Upstream) {
                let event = ApiError::mid_stream(ctx.timed_out).stream_event();
                let end = session.as_downstream().is_http2();
                match session.write_response_body(Some(event), end).await {
                    Ok(()) => ctx.stream_error_sent = true,
                    Err(write_err) => {
                        tracing::debug!(error = %write_err, "could not end the stream with an error event")
                    }
                }
            }
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        let err = match ctx.error.take() {
            Some(err) => err,
            None => match (e.esource(), e.etype()) {
                (_, ErrorType::HTTPStatus(code)) => ApiError::upstream(*code),
                (ErrorSource::Upstream, _) if is_timeout(e) => ApiError::upstream(504),
                (ErrorSource::Upstream, _) => ApiError::upstream(502),
                (
                    ErrorSource::Downstream,
                    ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed,
                ) => {
                    return FailToProxy {
                        error_code: 0,
                        can_reuse_downstream: false,
                    }
                }
                (ErrorSource::Downstream, _) => {
                    ApiError::bad_request("The request could not be read.", None)
                }
                _ => ApiError::new(500, "InternalServerError", "Internal gateway error."),
            },
        };
        ctx.status = err.status;
        let retry_after = self.retry_after();
        let mut extra = vec![(REQUEST_ID, ctx.request_id())];
        if err.status == 503 {
            extra.push(("retry-after", retry_after.as_str()));
        }
        extra.extend(ctx.cors.headers());
        // The answer says the connection closes: after a failed proxy, Pingora keeps the
        // client connection only if the last upstream attempt left it reusable, whatever
        // `can_reuse_downstream` says, and an answer promising keep-alive on a connection
        // then closed would have the client's next request reset.
        if let Err(write_err) = respond_json(
            session,
            &self.traffic,
            err.status,
            err.body(),
            false,
            &extra,
        )
        .await
        {
            tracing::debug!(error = %write_err, "could not write the error response");
        }
        FailToProxy {
            error_code: err.status,
            can_reuse_downstream: false,
        }
    }

    /// Remembers a failed attempt: it counts against its backend (circuit breaker), the
    /// backend is not tried again for this request, and the client is told about the
    /// failure if no other replica succeeds.
    fn note_failure(&self, ctx: &mut RequestCtx, e: &Error, kind: FailureKind) {
        self.note_failure_as(ctx, e, kind, kind.as_str());
    }

    /// [`Gateway::note_failure`], counted in `vllm_edge_upstream_errors_total` under
    /// `metric_kind`.
    fn note_failure_as(
        &self,
        ctx: &mut RequestCtx,
        e: &Error,
        kind: FailureKind,
        metric_kind: &str,
    ) {
        crate::metrics::UPSTREAM_ERRORS
            .with_label_values(&[ctx.backend_name(), metric_kind])
            .inc();
        if let Some(t) = ctx.trace.as_mut() {
            t.end_attempt(Some(format!("{metric_kind}: {e}")));
        }
        if let Some(guard) = ctx.in_flight.take() {
            let b = guard.backend();
            if b.health.record_failure(
                kind,
                self.config.load().health.failure_threshold,
                Instant::now(),
            ) {
                tracing::warn!(backend = %b.name, last_failure = kind.as_str(), "circuit opened: backend ejected");
            }
            ctx.tried.push(b.clone());
        }
        let status = match (kind, e.etype()) {
            (_, ErrorType::HTTPStatus(code)) => *code,
            (FailureKind::Timeout, _) => 504,
            _ => 502,
        };
        ctx.error = Some(ApiError::upstream(status));
    }

    /// Whether a failed attempt may be followed by another: attempts left, and the retry
    /// budget allows it.
    fn may_retry(&self, ctx: &mut RequestCtx) -> bool {
        let cfg = self.config.load();
        if ctx.attempts >= cfg.max_attempts {
            return false;
        }
        if !self
            .budget
            .try_retry(Instant::now(), cfg.retry_budget_ratio, cfg.retry_budget_min)
        {
            crate::metrics::RETRY_BUDGET_EXHAUSTED.inc();
            tracing::warn!("retry budget exhausted: not retrying");
            return false;
        }
        crate::metrics::RETRIES.inc();
        true
    }
}
