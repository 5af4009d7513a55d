//! The data plane: the `ProxyHttp` implementation that answers local routes, reads and
//! inspects the body, picks a replica for the request's model, forwards the body
//! byte-exactly, retries on another replica while nothing has reached the client, and
//! writes OpenAI-shaped errors.

pub mod access_log;
pub mod body;
pub mod conn;
pub mod deadline;
pub mod gate;
pub mod retry_budget;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::HeaderValue;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpUpstreamRequestPolicy;
use pingora::{ErrorSource, ErrorType, RetryType};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::{Denied, Permit};
use crate::config::Config;
use crate::cors;
use crate::fleet::health::FailureKind;
use crate::fleet::{Backend, Fleet, InFlightGuard};
use crate::openai::{self, ApiError, Route, RoutingInfo, UsageTail};
use crate::routing::affinity::{self, AffinityKey};
use crate::routing::{self, NoCandidate, Reason, Selector};
use body::BodyError;
use deadline::{Attempt, Limits};
use retry_budget::RetryBudget;

/// A dead pooled connection (the backend closed it while idle) is retried on the same
/// backend at most this many times per request, without counting as a failed attempt.
const MAX_STALE_CONNECTION_RETRIES: u32 = 2;

/// Sent with a 401, as RFC 6750 asks.
const BEARER_CHALLENGE: (&str, &str) = ("www-authenticate", "Bearer");

/// How long an unwanted request body is drained after an early error answer.
const LINGER_TIME: Duration = Duration::from_secs(5);

/// The header that carries a request's id: taken from the client when it sends a usable
/// one, generated otherwise; forwarded to the backend (vLLM builds its own request id on
/// it) and returned to the client.
const REQUEST_ID: &str = "x-request-id";
/// A client's request id longer than this is replaced (it ends up in every log line).
const MAX_REQUEST_ID_LEN: usize = 128;

/// The client's `x-request-id` if it is short and plain (visible ASCII), else a new one:
/// 32 random hex digits. Kept as a header value: it is sent upstream and back to the
/// client, and a clone shares its bytes.
fn request_id(header: &pingora::http::RequestHeader) -> HeaderValue {
    if let Some(v) = header.headers.get(REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= MAX_REQUEST_ID_LEN && b.iter().all(|c| c.is_ascii_graphic())
        {
            return v.clone();
        }
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = rand::random::<u128>();
    let mut id = [0u8; 32];
    for d in id.iter_mut().rev() {
        *d = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    HeaderValue::from_bytes(&id).expect("hex digits are a valid header value")
}

pub struct Gateway {
    /// The running configuration; a reload swaps it (see `server::reload`).
    config: Arc<ArcSwap<Config>>,
    fleet: Arc<Fleet>,
    selector: Selector,
    budget: RetryBudget,
    /// Requests being handled, and whether a successor is taking the sockets over.
    traffic: Arc<Traffic>,
    /// Opens the connections streams go over to plain-HTTP replicas (`gate`).
    gate: Arc<gate::GateConnector>,
    /// This gateway's ledger of affinity keys and its placement of the long-lived ones.
    placer: Arc<affinity::Placer>,
}

/// The connection-pool group of gated connections (`HttpPeer::group_key`): a stream's
/// attempt never reuses an ungated connection, nor a plain request a gated one.
const GATED_POOL: u64 = 1;

/// What the data plane shares with the server about the process: the requests being
/// handled (any route: a graceful shutdown ends when none is left), and whether a
/// successor is taking the listening sockets over (`server::lifecycle`; HTTP/1.1 clients
/// are then told to reconnect, which reaches the successor).
#[derive(Debug, Default)]
pub struct Traffic {
    active: AtomicUsize,
    handing_over: AtomicBool,
}

impl Traffic {
    pub fn active_requests(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    pub fn handing_over(&self) -> bool {
        self.handing_over.load(Ordering::Relaxed)
    }

    /// A successor has the listening sockets: from now on, answers close their
    /// connection.
    pub fn begin_handover(&self) {
        self.handing_over.store(true, Ordering::Relaxed);
    }
}

/// Counts one request in [`Traffic::active_requests`] while it lives.
struct Active(Arc<Traffic>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Gateway {
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        fleet: Arc<Fleet>,
        placer: Arc<affinity::Placer>,
        traffic: Arc<Traffic>,
    ) -> Gateway {
        Gateway {
            placer,
            traffic,
            selector: Selector::new(config.load().stale_after()),
            budget: RetryBudget::new(),
            gate: Arc::new(gate::GateConnector::new(config.clone())),
            config,
            fleet,
        }
    }

    /// The deadlines of one attempt for this kind of request.
    fn limits(&self, stream: bool) -> Limits {
        let t = self.config.load().timeouts;
        if stream {
            Limits {
                first_byte: t.stream_first_byte,
                gap: Some(t.stream_chunk_gap),
                total: None,
            }
        } else {
            Limits {
                first_byte: t.non_stream_first_byte,
                gap: None,
                total: Some(t.non_stream_total),
            }
        }
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

    /// Seconds a client is told to wait (`Retry-After`) when no replica can take it: about
    /// when the health checks may have brought one back.
    fn retry_after(&self) -> String {
        self.config
            .load()
            .health
            .interval
            .as_secs()
            .max(1)
            .to_string()
    }
}

/// Per-request state; one lives across all attempts of a request.
pub struct RequestCtx {
    _active: Active,
    started: Instant,
    route: Route,
    /// The full request body: the replay source for every attempt.
    body: Option<Bytes>,
    info: Option<RoutingInfo>,
    /// The request's prefix-affinity key, when the policy uses affinity.
    affinity: Option<AffinityKey>,
    /// Backends that failed this request, not to be picked again.
    tried: Vec<Arc<Backend>>,
    /// Counts the current attempt's in-flight request on its backend.
    in_flight: Option<InFlightGuard>,
    /// Enforces the current attempt's deadlines.
    deadlines: Option<Attempt>,
    /// The current attempt's first body byte arrived.
    got_body: bool,
    /// The response being relayed is an event stream (for the mid-stream error event).
    sse: bool,
    attempts: u32,
    stale_retries: u32,
    /// The error to answer with if the request fails before any response byte.
    error: Option<ApiError>,
    /// The last attempt ended by one of its deadlines.
    timed_out: bool,
    /// A stream was ended with an error event.
    stream_error_sent: bool,
    status: u16,
    /// The client's API key (when keys are required): its name, and its concurrency slot.
    key: Option<Permit>,
    /// Visible ASCII (see [`request_id`]).
    request_id: HeaderValue,
    /// Whether, and how, its answers are marked for a web page of another origin.
    cors: cors::Verdict,
    /// Why the current attempt's backend was picked, and its `vllm` score in seconds.
    chosen_by: Option<(Reason, Option<f64>)>,
    /// When the first body byte of the answer arrived, since `started`.
    first_byte: Option<Duration>,
    /// Body bytes relayed from the backend to the client.
    bytes_out: u64,
    /// The end of a response that reports `usage`, to count its tokens.
    usage_tail: Option<UsageTail>,
    /// Stream events relayed, counted only for a key with a `tpm` limit: what a stream that
    /// reports no usage (or was cut before it) is charged.
    sse_events: u64,
    /// Prompt tokens taken from the key's `tpm` balance before sending (see `Permit::reserve`).
    tokens_reserved: u64,
}

impl RequestCtx {
    fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or("-")
    }

    fn backend_name(&self) -> &str {
        self.in_flight
            .as_ref()
            .map_or("-", |g| g.backend().name.as_str())
    }
}

/// Writes a complete JSON response.
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
    if let Some(mark) = header.headers.get(crate::proxy::conn::MALFORMED) {
        let mark = mark.to_str().unwrap_or("");
        if let Some(n) = mark.strip_prefix("long ") {
            let line: usize = n.parse().unwrap_or(usize::MAX);
            let fields: usize = header
                .headers
                .iter()
                .filter(|(k, _)| k.as_str() != crate::proxy::conn::MALFORMED)
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

/// Answers with a JSON body. With `keepalive`, the connection stays open for the
/// client's next request if the client wants that, its request body was read in full
/// (Pingora closes it otherwise: unread body bytes would be taken for the next request)
/// and no successor is taking the sockets over (`traffic`); without, it closes after the
/// answer.
async fn respond_json(
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

async fn respond_error(
    session: &mut Session,
    ctx: &mut RequestCtx,
    err: &ApiError,
) -> Result<bool> {
    respond_error_with(session, ctx, err, &[]).await
}

/// [`respond_error`], then the connection closes: after a framing error, what the client
/// sends next cannot be told from the rest of this request (RFC 9112 §6.3, §11.2).
async fn respond_error_closing(
    session: &mut Session,
    ctx: &mut RequestCtx,
    err: &ApiError,
) -> Result<bool> {
    session.set_keepalive(None);
    respond_error(session, ctx, err).await
}

/// 429 for a key over one of its own limits (counted by key name).
async fn respond_key_limited(
    session: &mut Session,
    ctx: &mut RequestCtx,
    key: &str,
    message: String,
    retry_after: u64,
) -> Result<bool> {
    crate::metrics::KEY_LIMITED.with_label_values(&[key]).inc();
    let err = ApiError::rate_limited(message);
    let after = retry_after.to_string();
    respond_error_with(session, ctx, &err, &[("retry-after", &after)]).await
}

/// [`respond_error`] with extra response headers.
async fn respond_error_with(
    session: &mut Session,
    ctx: &mut RequestCtx,
    err: &ApiError,
    headers: &[(&'static str, &str)],
) -> Result<bool> {
    ctx.status = err.status;
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
    respond_json(
        session,
        &ctx._active.0,
        err.status,
        err.body(),
        true,
        &extra,
    )
    .await?;
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
async fn answer_preflight(
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
    if ctx._active.0.handing_over() {
        session.set_keepalive(None);
    }
    session.write_response_header(Box::new(resp), true).await?;
    Ok(true)
}

fn is_timeout(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
    ) || gate::expired_in(e).is_some()
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        self.traffic.active.fetch_add(1, Ordering::Relaxed);
        RequestCtx {
            _active: Active(self.traffic.clone()),
            started: Instant::now(),
            route: Route::NotFound,
            body: None,
            info: None,
            affinity: None,
            tried: Vec::new(),
            in_flight: None,
            deadlines: None,
            got_body: false,
            sse: false,
            attempts: 0,
            stale_retries: 0,
            error: None,
            timed_out: false,
            stream_error_sent: false,
            status: 0,
            key: None,
            request_id: HeaderValue::from_static(""),
            cors: cors::Verdict::Off,
            chosen_by: None,
            first_byte: None,
            bytes_out: 0,
            usage_tail: None,
            sse_events: 0,
            tokens_reserved: 0,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let header = session.req_header();
        ctx.request_id = request_id(header);
        ctx.route = openai::route(&header.method, header.uri.path());
        if let Some(c) = &self.config.load().cors {
            ctx.cors = c.verdict(&header.headers);
        }
        let limits = self.config.load().limits;
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
        if session.get_keepalive().is_some() {
            // Pingora keeps an HTTP/1.1 client's connection open forever by default.
            session.set_keepalive(Some(limits.keepalive_timeout.as_secs()));
            // Requests a client sends before the answers to earlier ones are served in
            // turn (RFC 9112 §9.3.2), as nginx does; Pingora otherwise closes the
            // connection after the first answer and drops the rest.
            session.as_downstream_mut().set_pipelining_enabled(true);
        }
        let header = session.req_header();
        if ctx.cors != cors::Verdict::Off {
            // Answered before the key check: a browser never sends a key with it.
            if let Some(asked) = cors::preflight_method(&header.method, &header.headers) {
                return answer_preflight(session, ctx, asked).await;
            }
        }
        if ctx.route != Route::Health {
            if let Some(keys) = &self.config.load().api_keys {
                let presented = header
                    .headers
                    .get(http::header::AUTHORIZATION)
                    .map(|v| v.as_bytes());
                match keys.admit(presented, Instant::now()) {
                    Ok(permit) => ctx.key = Some(permit),
                    Err(Denied::Missing) => {
                        crate::metrics::AUTH_REFUSED
                            .with_label_values(&["missing"])
                            .inc();
                        let err = ApiError::missing_api_key();
                        return respond_error_with(session, ctx, &err, &[BEARER_CHALLENGE]).await;
                    }
                    Err(Denied::Invalid) => {
                        crate::metrics::AUTH_REFUSED
                            .with_label_values(&["invalid"])
                            .inc();
                        let err = ApiError::invalid_api_key();
                        return respond_error_with(session, ctx, &err, &[BEARER_CHALLENGE]).await;
                    }
                    Err(Denied::Limited {
                        key,
                        message,
                        retry_after,
                    }) => {
                        return respond_key_limited(session, ctx, &key, message, retry_after).await;
                    }
                }
            }
        }
        match ctx.route {
            Route::Health | Route::Models | Route::Version | Route::Load => {
                let snap = self.fleet.load();
                let body = match ctx.route {
                    Route::Health => Bytes::from_static(b"{\"status\":\"ok\"}"),
                    Route::Models => {
                        openai::models_body(&snap.model_cards(&self.config.load().model_aliases))
                    }
                    Route::Load => {
                        let n: usize = snap.backends.iter().map(|e| e.backend.in_flight()).sum();
                        Bytes::from(format!("{{\"server_load\":{n}}}"))
                    }
                    _ => match snap.version() {
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
            Route::MethodNotAllowed(allow) => {
                respond_error(session, ctx, &ApiError::method_not_allowed(allow)).await
            }
            Route::NotFound => {
                let path = session.req_header().uri.path().to_string();
                respond_error(session, ctx, &ApiError::not_found_route(&path)).await
            }
            Route::Inference => {
                let cfg = self.config.load();
                let pace = body::BodyPace::of(&cfg.limits);
                let body =
                    match body::read_full_body(session, cfg.limits.max_body_bytes, pace).await {
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
                        Err(BodyError::Framing(err)) => {
                            return respond_error_closing(session, ctx, &err).await
                        }
                        Err(BodyError::ClientGone(e)) => return Err(e),
                    };
                let content_type = session
                    .req_header()
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .map(|v| v.as_bytes());
                let info =
                    match openai::inspect_request(content_type, &body, cfg.limits.max_json_depth) {
                        Ok(info) => info,
                        Err(err) => {
                            if err == ApiError::too_deep(cfg.limits.max_json_depth) {
                                crate::metrics::LIMIT_REFUSALS
                                    .with_label_values(&["max_json_depth"])
                                    .inc();
                            }
                            return respond_error(session, ctx, &err).await;
                        }
                    };
                // No model named (the default), or an alias: the body is sent naming the
                // model it is routed by.
                let renamed =
                    routing::route_model(&self.fleet.load(), &cfg, content_type, &body, &info);
                let (body, info, alias) = match renamed {
                    Ok(None) => (body, info, None),
                    Ok(Some(r)) => (Bytes::from(r.body), r.info, r.alias),
                    Err(err) if err.status == 503 => {
                        let after = self.retry_after();
                        return respond_error_with(session, ctx, &err, &[("retry-after", &after)])
                            .await;
                    }
                    Err(err) => return respond_error(session, ctx, &err).await,
                };
                // Refused here rather than after `upstream_peer` finds nothing: an answer
                // after a failed proxy closes the client's connection (see `fail_to_proxy`).
                match routing::availability(&self.fleet.load(), &info.model) {
                    Ok(()) => {}
                    Err(NoCandidate::UnknownModel) if !cfg.awaits(&info.model) => {
                        // The name the client asked for, an alias's too.
                        let asked = alias.as_deref().unwrap_or(&info.model);
                        let err = ApiError::model_not_found(asked);
                        return respond_error(session, ctx, &err).await;
                    }
                    // Its replicas are all down, or its host name has no address yet
                    // (a Kubernetes Service during a rollout): clients retry a 503.
                    Err(NoCandidate::Unavailable | NoCandidate::UnknownModel) => {
                        let after = self.retry_after();
                        let err = ApiError::no_backend(&info.model);
                        return respond_error_with(session, ctx, &err, &[("retry-after", &after)])
                            .await;
                    }
                }
                if let Some(k) = ctx.key.as_ref().filter(|k| k.counts_tokens()) {
                    let prompt = (info.prompt_bytes / routing::BYTES_PER_TOKEN) as u64;
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
                ctx.affinity =
                    affinity::request_key(&cfg, &session.req_header().headers, &body, &info);
                if let Some(k) = &ctx.affinity {
                    self.placer
                        .record(&info.model, k.key, k.reusable_bytes, Instant::now());
                }
                ctx.body = Some(body);
                ctx.info = Some(info);
                self.budget.record_request(Instant::now());
                Ok(false)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let info = ctx
            .info
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no routing info"))?;
        let snap = self.fleet.load();
        let cfg = self.config.load();
        let tried: Vec<usize> = snap
            .backends
            .iter()
            .enumerate()
            .filter(|(_, e)| ctx.tried.iter().any(|t| Arc::ptr_eq(t, &e.backend)))
            .map(|(i, _)| i)
            .collect();
        let request = routing::Request::of(info, ctx.affinity, &cfg, &self.placer);
        let chosen = match self
            .selector
            .best(cfg.policy, &snap, &request, &tried, Instant::now())
        {
            Ok(c) => c,
            Err(why) => {
                // After a failed attempt, the client hears about that failure (kept in
                // ctx.error); before any, that nothing can serve the model.
                if ctx.error.is_none() {
                    ctx.error = Some(match why {
                        NoCandidate::UnknownModel => ApiError::model_not_found(&info.model),
                        NoCandidate::Unavailable => ApiError::no_backend(&info.model),
                    });
                }
                let status = ctx.error.as_ref().map_or(503, |e| e.status);
                return Err(Error::explain(
                    ErrorType::HTTPStatus(status),
                    "no backend available for the request",
                ));
            }
        };
        crate::metrics::SELECTIONS
            .with_label_values(&[cfg.policy.as_str(), chosen.reason.as_str()])
            .inc();
        ctx.chosen_by = Some((chosen.reason, chosen.score_s));
        let backend = &snap.backends[chosen.index].backend;
        ctx.attempts += 1;
        // Streams tell us when prefill ends (the first chunk); non-streaming answers only
        // come at the end, so their prefill is not tracked.
        let prefill = if info.stream {
            request.prefill_tokens(&chosen) as u64
        } else {
            0
        };
        ctx.in_flight = Some(backend.begin_request_with_prefill(prefill));
        if snap.lora_fit(&info.model).is_some() {
            backend.note_adapter(&info.model);
        }
        ctx.deadlines = None;
        ctx.got_body = false;

        let mut peer = match &backend.tls {
            None => HttpPeer::new(backend.addr, false, String::new()),
            Some(tls) => {
                let mut p = HttpPeer::new(backend.addr, true, tls.sni.clone());
                p.options.verify_cert = tls.verify;
                p.options.verify_hostname = tls.verify;
                p
            }
        };
        if info.stream && backend.tls.is_none() {
            // Its response header is held until the first token (`gate`), so a replica
            // whose engine hangs before it is retried elsewhere.
            peer.options.custom_l4 = Some(self.gate.clone());
            peer.group_key = GATED_POOL;
        }
        let o = &mut peer.options;
        o.connection_timeout = Some(cfg.connect_timeout);
        o.total_connection_timeout = Some(cfg.connect_timeout);
        // Pingora's timeout applies to every read alike: for a stream only a backstop
        // behind the attempt's watchdog; otherwise it enforces the nearer of the
        // first-byte and total deadlines (see `deadline`).
        o.read_timeout = Some(self.limits(info.stream).longest_read());
        o.write_timeout = Some(cfg.connect_timeout.max(Duration::from_secs(10)));
        o.idle_timeout = Some(cfg.pool_idle_timeout);
        // The gateway never switches protocols: a client's `Upgrade` is not forwarded
        // (RFC 9110 §7.8 lets a server ignore it; the request is served as HTTP/1.1), so
        // a replica's `101` is a mismatch Pingora refuses (a 502) rather than a tunnel
        // that would carry the client's next requests past every check.
        o.http_upstream_request_policy = HttpUpstreamRequestPolicy::deny_upgrades();
        Ok(Box::new(peer))
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        fd: std::os::unix::io::RawFd,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if fd < 0 {
            // A gated connection (no descriptor): it enforces its deadlines itself.
            ctx.deadlines = None;
            return Ok(());
        }
        let stream = ctx.info.as_ref().is_some_and(|i| i.stream);
        ctx.deadlines = Attempt::start(fd, Instant::now(), self.limits(stream));
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        req: &mut pingora::http::RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // We answered `Expect` ourselves; a forwarded one would get a second 100.
        req.remove_header(&http::header::EXPECT);
        if let Some(body) = &ctx.body {
            // We hold the whole body: always send it with its length (also avoids Pingora's
            // h2→h1 double chunk terminator, pingora#935).
            req.remove_header(&http::header::TRANSFER_ENCODING);
            req.insert_header(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()))?;
        }
        if let Some(addr) = session.client_addr().and_then(|a| a.as_inet()) {
            // Appended to the chain a proxy in front of us started, as nginx's
            // `$proxy_add_x_forwarded_for` does; the last entry is the one we saw.
            let mut chain = String::new();
            for v in req.headers.get_all("x-forwarded-for") {
                if let Ok(v) = v.to_str() {
                    chain.push_str(v.trim());
                    chain.push_str(", ");
                }
            }
            let _ = std::fmt::Write::write_fmt(&mut chain, format_args!("{}", addr.ip()));
            req.insert_header("x-forwarded-for", chain)?;
        }
        req.insert_header(REQUEST_ID, ctx.request_id.clone())?;
        // The client's key is ours to check, never the replica's to see; a backend that
        // wants a key gets its own.
        let backend_key = ctx
            .in_flight
            .as_ref()
            .and_then(|g| g.backend().api_key.as_ref());
        if let Some(k) = backend_key {
            req.insert_header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", k.expose()),
            )?;
        } else if ctx.key.is_some() {
            req.remove_header(&http::header::AUTHORIZATION);
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // Called once per attempt with the tail kept in the retry buffer (see `body`).
        if end_of_stream {
            if let Some(full) = &ctx.body {
                *body = Some(full.clone());
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // vLLM answers 503 when its engine is dead, 500 when it failed: another replica
        // may serve the request, and nothing has reached the client yet.
        let status = resp.status.as_u16();
        if status == 101 {
            // No request of ours asks to switch protocols (see `upstream_peer`); Pingora
            // refuses a 101 only when the client asked for an upgrade.
            return Err(Error::explain(
                ErrorType::InvalidHTTPHeader,
                format!(
                    "backend {} switched protocols unasked (101)",
                    ctx.backend_name()
                ),
            )
            .into_up());
        }
        if status >= 500 && session.response_written().is_none() {
            return Err(Error::explain(
                ErrorType::HTTPStatus(status),
                format!("backend {} answered {status}", ctx.backend_name()),
            ));
        }
        ctx.sse = resp
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        ctx.status = status;
        let usage = status == 200 && ctx.info.as_ref().is_some_and(|i| i.usage_reported);
        ctx.usage_tail = usage.then(UsageTail::default);
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if self.traffic.handing_over() {
            // A successor has the listening sockets: send HTTP/1.1 clients there for
            // their next request.
            session.set_keepalive(None);
        }
        if let Some(g) = &ctx.in_flight {
            resp.insert_header("x-vllm-edge-backend", g.backend().name_header.clone())?;
        }
        resp.insert_header(REQUEST_ID, ctx.request_id.clone())?;
        if ctx.cors != cors::Verdict::Off {
            // The gateway decides alone (a replica's `*` must not reach other origins).
            for h in cors::REPLICA_HEADERS {
                resp.remove_header(*h);
            }
            for (k, v) in ctx.cors.headers() {
                if k == "vary" {
                    resp.append_header(k, v)?;
                } else {
                    resp.insert_header(k, v)?;
                }
            }
        }
        if ctx.in_flight.is_some()
            && !resp.headers.contains_key(http::header::CONTENT_LENGTH)
            && !resp.headers.contains_key(http::header::TRANSFER_ENCODING)
            && session.req_header().version == http::Version::HTTP_11
        {
            // A body that ends when the replica's connection closes would reach an
            // HTTP/1.1 client the same way, and a cut answer would look complete. Chunked,
            // it needs its last chunk, which a cut never sends.
            resp.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
        }
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let Some(b) = body.as_ref().filter(|b| !b.is_empty()) {
            ctx.bytes_out += b.len() as u64;
            if let Some(t) = ctx.usage_tail.as_mut() {
                t.push(b);
            }
            if ctx.sse && ctx.key.as_ref().is_some_and(|k| k.counts_tokens()) {
                ctx.sse_events += memchr::memmem::find_iter(b, b"data:").count() as u64;
            }
            if let Some(Err(why)) = ctx.deadlines.as_mut().map(Attempt::progress) {
                // The error hooks read which deadline from `deadlines`.
                return Error::e_explain(
                    ErrorType::ReadTimedout,
                    format!("the {} deadline passed while the answer came", why.as_str()),
                );
            }
            if !ctx.got_body {
                ctx.got_body = true;
                ctx.first_byte.get_or_insert_with(|| ctx.started.elapsed());
                if let Some(g) = ctx.in_flight.as_mut() {
                    g.first_byte();
                }
            }
        }
        if end_of_stream {
            if ctx.deadlines.as_ref().and_then(Attempt::fired).is_some() {
                // A body that ends when the replica's connection closes "ended" because a
                // deadline shut that connection down: it was cut, and must fail as such
                // (the error hooks read which deadline from `deadlines`).
                return Error::e_explain(
                    ErrorType::ReadTimedout,
                    "a deadline cut a body that ends with its connection",
                );
            }
            // Before Pingora may pool the connection: the watchdog must not touch it.
            if let Some(d) = ctx.deadlines.take() {
                d.finish();
            }
            if let Some(g) = ctx.in_flight.as_mut() {
                // Only a whole answer counts for the backend: one that fails after its
                // head (a cut body, a stream that stalls) counts against it, and a
                // success recorded at the first byte would reset its failures each time.
                g.backend().health.record_success();
                if (200..300).contains(&ctx.status) {
                    g.served();
                }
            }
        }
        Ok(None)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
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

    fn error_while_proxy(
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

    async fn fail_to_proxy(
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

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let duration = ctx.started.elapsed();
        let model = ctx.info.as_ref().map_or("-", |i| i.model.as_str());
        let usage = ctx.usage_tail.take().and_then(|t| t.usage());
        let cfg = self.config.load();
        if cfg.access_log && crate::proxy::access_log::enabled() {
            let header = session.req_header();
            let ms = |d: Duration| (d.as_secs_f64() * 1e5).round() / 100.0;
            let error = e.map(|e| e.to_string());
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
                key: ctx.key.as_ref().map_or("-", |k| &*k.key),
                status: ctx.status,
                attempts: ctx.attempts,
                ttfb_ms: ctx.first_byte.map(ms),
                duration_ms: ms(duration),
                bytes_in: ctx.body.as_ref().map_or(0, |b| b.len()),
                bytes_out: ctx.bytes_out,
                prompt_tokens: usage.map(|u| u.prompt_tokens),
                completion_tokens: usage.map(|u| u.completion_tokens),
                stream_error_event: ctx.stream_error_sent,
                error: error.as_deref().unwrap_or(""),
            };
            crate::proxy::access_log::write(&line, cfg.log_format);
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
}

impl Gateway {
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
