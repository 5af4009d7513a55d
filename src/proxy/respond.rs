//! Answers the gateway writes itself: OpenAI-shaped JSON errors and local answers, CORS
//! preflights, and the draining of a body nobody will read.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;
use std::time::Duration;

use super::ctx::{RequestCtx, REQUEST_ID};
use super::Traffic;
use crate::cors;
use crate::openai::{self, ApiError, Route};

/// Sent with a 401, as RFC 6750 asks.
pub(super) const BEARER_CHALLENGE: (&str, &str) = ("www-authenticate", "Bearer");

/// How long an unwanted request body is drained after an early error answer.
const LINGER_TIME: Duration = Duration::from_secs(5);

/// Answers with a JSON body. With `keepalive`, the connection stays open for the
/// client's next request if the client wants that, its request body was read in full
/// (Pingora closes it otherwise: unread body bytes would be taken for the next request)
/// and no successor is taking the sockets over (`traffic`); without, it closes after the
/// answer.
pub(super) async fn respond_json(
    session: &mut Session,
    traffic: &Traffic,
    status: u16,
    body: Bytes,
    keepalive: bool,
    extra: &[(&'static str, &str)],
) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(4))?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    for (k, v) in extra {
        resp.insert_header(*k, *v)?;
    }
    if keepalive {
        if traffic.handing_over() {
            session.set_keepalive(None);
        }
        session.write_response_header(Box::new(resp), false).await?;
        let head = session.req_header().method == http::Method::HEAD;
        session
            .write_response_body(if head { None } else { Some(body) }, true)
            .await?;
        Ok(())
    } else {
        session.write_error_response(resp, body).await
    }
}

pub(super) async fn respond_error(
    session: &mut Session,
    ctx: &mut RequestCtx,
    err: &ApiError,
) -> Result<bool> {
    respond_error_with(session, ctx, err, &[]).await
}

/// [`respond_error`], then the connection closes: after a framing error, what the client
/// sends next cannot be told from the rest of this request (RFC 9112 §6.3, §11.2).
pub(super) async fn respond_error_closing(
    session: &mut Session,
    ctx: &mut RequestCtx,
    err: &ApiError,
) -> Result<bool> {
    session.set_keepalive(None);
    respond_error(session, ctx, err).await
}

/// 429 for a key over one of its own limits (counted by key name).
pub(super) async fn respond_key_limited(
    session: &mut Session,
    ctx: &mut RequestCtx,
    key: &str,
    message: String,
    retry_after: u64,
) -> Result<bool> {
    crate::metrics::KEY_LIMITED.with_label_values(&[key]).inc();
    ctx.refused_key = Some(key.to_string());
    let err = ApiError::rate_limited(message);
    let after = retry_after.to_string();
    respond_error_with(session, ctx, &err, &[("retry-after", &after)]).await
}

/// [`respond_error`] with extra response headers.
pub(super) async fn respond_error_with(
    session: &mut Session,
    ctx: &mut RequestCtx,
    err: &ApiError,
    headers: &[(&'static str, &str)],
) -> Result<bool> {
    ctx.status = err.status;
    ctx.refused = Some(err.message.clone());
    let allow = match ctx.route {
        Route::MethodNotAllowed(allow) => Some(allow),
        _ => None,
    };
    let mut extra: Vec<(&'static str, &str)> = allow.map(|a| ("allow", a)).into_iter().collect();
    extra.extend_from_slice(headers);
    extra.push((REQUEST_ID, ctx.request_id()));
    extra.extend(ctx.cors.headers());
    // A body that has already arrived (a small one usually comes with its head) is read
    // and dropped without waiting, so the connection can stay open for the client's
    // next request: a refused key or a rate limit need not cost a new connection.
    if !session.is_body_done() {
        let _ = tokio::time::timeout(Duration::ZERO, session.drain_request_body()).await;
    }
    respond_json(session, ctx.traffic(), err.status, err.body(), true, &extra).await?;
    linger(session).await;
    Ok(true)
}

/// After an error answered before the request body was read, keep reading (and
/// discarding) the body for a while before the connection closes. Closing a socket with
/// unread data sends a reset, and a client still uploading would see a broken pipe
/// instead of our answer.
async fn linger(session: &mut Session) {
    if session.is_body_done() {
        return;
    }
    if tokio::time::timeout(LINGER_TIME, session.drain_request_body())
        .await
        .is_err()
    {
        tracing::debug!("stopped draining an unwanted request body");
    }
}

/// Answers a browser's preflight for a request to `asked` at the same path: 204 with what
/// the page may send, if its origin is allowed and the gateway serves that method there;
/// else the error that request would get (a browser then stops).
pub(super) async fn answer_preflight(
    session: &mut Session,
    ctx: &mut RequestCtx,
    asked: http::Method,
) -> Result<bool> {
    let path = session.req_header().uri.path().to_string();
    ctx.route = openai::route(&asked, &path);
    if ctx.cors == cors::Verdict::NotAllowed {
        let err = ApiError::new(
            403,
            "PermissionDeniedError",
            "This origin may not call the gateway (cors.allowed_origins).",
        );
        return respond_error(session, ctx, &err).await;
    }
    match ctx.route {
        Route::MethodNotAllowed(allow) => {
            return respond_error(session, ctx, &ApiError::method_not_allowed(allow)).await
        }
        Route::NotFound => {
            return respond_error(session, ctx, &ApiError::not_found_route(&path)).await
        }
        Route::Inference | Route::Models | Route::Health | Route::Version | Route::Load => {}
    }
    ctx.status = 204;
    let mut resp = ResponseHeader::build(204, Some(8))?;
    for (k, v) in ctx.cors.headers() {
        resp.insert_header(k, v)?;
    }
    resp.insert_header("access-control-allow-methods", asked.as_str())?;
    if let Some(h) = session
        .req_header()
        .headers
        .get("access-control-request-headers")
    {
        resp.insert_header("access-control-allow-headers", h.clone())?;
    }
    resp.insert_header("access-control-max-age", cors::MAX_AGE)?;
    resp.insert_header(REQUEST_ID, ctx.request_id.clone())?;
    if ctx.handing_over() {
        session.set_keepalive(None);
    }
    session.write_response_header(Box::new(resp), true).await?;
    Ok(true)
}
