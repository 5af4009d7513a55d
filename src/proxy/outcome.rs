//! The end of a request: its access line, its metrics, and its tokens charged to its key.

use pingora::prelude::*;
use pingora::proxy::Session;
use std::time::{Duration, Instant};

use super::ctx::RequestCtx;
use super::Gateway;
use crate::openai;
use crate::routing;

impl Gateway {
    /// `logging`: the request is over (answered, failed or abandoned): its access line,
    /// its metrics, its tokens charged to its key; its in-flight count released.
    pub(super) fn record(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let duration = ctx.started.elapsed();
        let model = ctx.info.as_ref().map_or("-", |i| i.model.as_str());
        let usage = ctx.usage_tail.take().and_then(|t| t.usage());
        let cfg = self.config.load();
        // Pingora's error, else why the gateway refused the request itself.
        let error = e.map(|e| e.to_string()).or_else(|| ctx.refused.clone());
        if cfg.access_log && crate::proxy::access_log::enabled() {
            let header = session.req_header();
            let ms = |d: Duration| (d.as_secs_f64() * 1e5).round() / 100.0;
            let line = crate::proxy::access_log::Line {
                request_id: ctx.request_id(),
                client: session
                    .client_addr()
                    .and_then(|a| a.as_inet())
                    .map(|a| a.ip()),
                method: header.method.as_str(),
                path: header.uri.path(),
                model,
                stream: ctx.info.as_ref().is_some_and(|i| i.stream),
                backend: ctx.backend_name(),
                chosen_by: ctx.chosen_by.map_or("-", |(r, _)| r.as_str()),
                score_ms: ctx
                    .chosen_by
                    .and_then(|(_, s)| s)
                    .map(|s| (s * 1e5).round() / 100.0),
                key: ctx.key_name(),
                status: ctx.status,
                attempts: ctx.attempts,
                queued_ms: ctx.queued.map(ms),
                ttfb_ms: ctx.first_byte.map(ms),
                duration_ms: ms(duration),
                bytes_in: ctx.bytes_in,
                bytes_out: ctx.bytes_out,
                prompt_tokens: usage.map(|u| u.prompt_tokens),
                completion_tokens: usage.map(|u| u.completion_tokens),
                stream_error_event: ctx.stream_error_sent,
                error: error.as_deref().unwrap_or(""),
            };
            crate::proxy::access_log::write(&line, cfg.log_format);
        }
        if let Some(t) = ctx.trace.take() {
            (*t).finish(super::trace::Finished {
                status: ctx.status,
                model,
                key: ctx.key_name(),
                backend: ctx.backend_name(),
                attempts: ctx.attempts,
                stream: ctx.info.as_ref().is_some_and(|i| i.stream),
                queued: ctx.queued,
                first_byte: ctx.first_byte,
                tokens: usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
                error: error.as_deref(),
            });
        }
        if let Some(u) = usage {
            crate::metrics::TOKENS
                .with_label_values(&[model, "prompt"])
                .inc_by(u.prompt_tokens);
            crate::metrics::TOKENS
                .with_label_values(&[model, "completion"])
                .inc_by(u.completion_tokens);
        }
        if let (Some(k), Some(info)) = (&ctx.key, &ctx.info) {
            self.charge_key(
                k,
                info,
                usage,
                ctx.status,
                ctx.sse_events,
                ctx.tokens_reserved,
            );
        }
        crate::metrics::REQUESTS
            .with_label_values(&[
                model,
                ctx.backend_name(),
                crate::metrics::status_class(ctx.status),
            ])
            .inc();
        let stream = if ctx.info.as_ref().is_some_and(|i| i.stream) {
            "true"
        } else {
            "false"
        };
        crate::metrics::REQUEST_DURATION
            .with_label_values(&[stream])
            .observe(duration.as_secs_f64());
        if let Some(t) = ctx.first_byte {
            crate::metrics::TIME_TO_FIRST_BYTE
                .with_label_values(&[stream])
                .observe(t.as_secs_f64());
        }
        ctx.deadlines = None;
        ctx.in_flight = None;
    }

    /// Counts a request's tokens against its key: the `usage` the response reported, and
    /// for the key's `tpm` balance, an estimate of an answered request that reported none
    /// (the prompt's estimated tokens, plus one per stream event but `[DONE]`), settled
    /// against the prompt estimate `reserved` before it was sent.
    fn charge_key(
        &self,
        key: &crate::auth::Permit,
        info: &openai::RoutingInfo,
        usage: Option<openai::Usage>,
        status: u16,
        stream_events: u64,
        reserved: u64,
    ) {
        let used = match usage {
            Some(u) => {
                crate::metrics::KEY_TOKENS
                    .with_label_values(&[&key.key, "prompt"])
                    .inc_by(u.prompt_tokens);
                crate::metrics::KEY_TOKENS
                    .with_label_values(&[&key.key, "completion"])
                    .inc_by(u.completion_tokens);
                u.prompt_tokens + u.completion_tokens
            }
            None if (200..300).contains(&status) => {
                (info.prompt_bytes / routing::BYTES_PER_TOKEN) as u64
                    + stream_events.saturating_sub(1)
            }
            None => 0,
        };
        key.settle(used, reserved, Instant::now());
    }
}
