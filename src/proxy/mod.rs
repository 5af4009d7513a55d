//! The data plane: the `ProxyHttp` implementation, its phases in the order Pingora runs
//! them. A request is admitted (`admission`: its head, its key, its body and what routing
//! decides), sent to the replica the policy picks with its body replayed byte-exactly on
//! every attempt (`body`), held to its deadlines (`deadline`, `gate`), retried on another
//! replica while nothing has reached the client (`failure`), and recorded at its end
//! (`outcome`). The gateway's own answers are OpenAI-shaped (`respond`).
//!
//! Uses routing, the fleet and the layers below; the admin API and the server are above.
//!
//! Three mechanisms here exist beside Pingora's own, on purpose:
//! - `gate` keeps its own idle connections: a gated connection (a stream's, held until
//!   its first token) has no descriptor Pingora's pool can check, and Pingora's pool checks
//!   a reused connection by its descriptor's peer; without it every stream would open a
//!   new connection.
//! - Stream deadlines are enforced in two places: the `deadline` watchdog shuts down the
//!   descriptor of an ungated attempt (TLS replicas, non-streaming requests), the gate
//!   times its own reads (it has no descriptor to shut down).
//! - `conn` follows the client's bytes before Pingora parses them (a framing state machine,
//!   not a head parser: heads are parsed by `httparse`, in Pingora and in `httpclient`),
//!   because Pingora offers no hook before a head is parsed: the head deadline, and the
//!   request lines it must not escape or refuse silently.

pub mod access_log;
mod admission;
pub mod body;
pub mod conn;
mod ctx;
pub mod deadline;
mod failure;
pub mod gate;
mod outcome;
mod respond;
pub mod retry_budget;
pub mod trace;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::HeaderValue;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpUpstreamRequestPolicy;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::cors;
use crate::fleet::Fleet;
use crate::openai::{ApiError, UsageTail};
use crate::routing::affinity;
use crate::routing::{self, NoCandidate, Selector};
pub use ctx::RequestCtx;
use ctx::REQUEST_ID;
use deadline::{Attempt, Limits};
use retry_budget::RetryBudget;

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
    /// The queues requests wait in while every replica of their model is full.
    flow: Arc<crate::flow::FlowControl>,
    /// Request spans to an OpenTelemetry collector (`tracing.otlp`).
    traces: Option<Arc<trace::Traces>>,
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
    pub(super) active: AtomicUsize,
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

impl Gateway {
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        fleet: Arc<Fleet>,
        placer: Arc<affinity::Placer>,
        traffic: Arc<Traffic>,
        flow: Arc<crate::flow::FlowControl>,
    ) -> Gateway {
        Gateway {
            flow,
            placer,
            traffic,
            selector: Selector::new(config.load().stale_after()),
            budget: RetryBudget::new(),
            gate: Arc::new(gate::GateConnector::new(config.clone())),
            config,
            fleet,
            traces: None,
        }
    }

    /// Requests are traced to this exporter.
    pub fn with_traces(mut self, traces: Option<Arc<trace::Traces>>) -> Gateway {
        self.traces = traces;
        self
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

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(self.traffic.clone())
    }

    /// No downstream modules: the gateway never compresses (answers pass byte for byte),
    /// and Pingora's default compression module, added disabled, would still run its body
    /// filter on every relayed chunk (~1% of the CPU of relaying a stream, issue 33).
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if let Some(t) = &self.traces {
            ctx.trace = Some(Box::new(t.request(session.req_header())));
        }
        self.admit(session, ctx).await
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
        let tokens = ctx.tokens.as_deref();
        let cached = tokens.map(|t| routing::prefix::cached_prefix(&snap, t));
        let request = routing::Request::of(info, ctx.affinity, &cfg, &self.placer)
            .with_cached(tokens, cached.as_ref());
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
        if let (Some(t), Some(rt)) = (&self.traces, ctx.trace.as_mut()) {
            rt.attempt(t, &backend.name, ctx.attempts);
        }
        // Streams tell us when prefill ends (the first chunk); non-streaming answers only
        // come at the end, so their prefill is not tracked.
        let prefill = if info.stream {
            request.prefill_tokens(&chosen) as u64
        } else {
            0
        };
        ctx.in_flight = Some(backend.begin_request_with_prefill(prefill));
        // Counted in flight there now: the slot the queue reserved for it is no longer
        // needed.
        ctx.grant = None;
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
        let gated = info.stream && backend.tls.is_none();
        if gated {
            // Its response header is held until the first token (`gate`), so a replica
            // whose engine hangs before it is retried elsewhere.
            peer.options.custom_l4 = Some(self.gate.clone());
            peer.group_key = GATED_POOL;
        }
        let o = &mut peer.options;
        o.connection_timeout = Some(cfg.connect_timeout);
        o.total_connection_timeout = Some(cfg.connect_timeout);
        // Pingora's timeout applies to every read alike: for a stream over TLS only a
        // backstop behind the attempt's watchdog; otherwise it enforces the nearer of the
        // first-byte and total deadlines (see `deadline`). A gated stream's reads are the
        // gate's, which times each of them itself: a second timer per read (Pingora
        // arms one for every event relayed) would be pure cost.
        o.read_timeout = (!gated).then(|| self.limits(info.stream).longest_read());
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
        if let (Some(t), Some(rt)) = (&self.traces, ctx.trace.as_ref()) {
            // The replica's spans (vLLM's `--otlp-traces-endpoint`) join under this attempt.
            rt.inject(t, req);
        }
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
                // The answer's head has gone to the client: no other attempt can follow,
                // so the replay copy of the prompt (and its tokens) need not live as long
                // as the stream does.
                ctx.body = None;
                ctx.tokens = None;
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
        e: Box<Error>,
    ) -> Box<Error> {
        self.connect_failed(peer, ctx, e)
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        self.proxy_failed(peer, session, e, ctx, client_reused)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        self.answer_failure(session, e, ctx).await
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        self.record(session, e, ctx);
        // Its slot is free: the next queued request for the model may take it.
        ctx.in_flight = None;
        ctx.grant = None;
        if let Some(info) = &ctx.info {
            self.flow.released(&info.model);
        }
    }
}
