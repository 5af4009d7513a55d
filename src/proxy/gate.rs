//! The connection a stream is proxied over to a plain-HTTP replica: it holds back the
//! replica's `200 text/event-stream` response header until the first piece of the body
//! (the first token) has arrived.
//!
//! vLLM sends a stream's response header as soon as it accepts the request, before the
//! engine has run it. An engine that hangs then leaves the stream with its header and
//! nothing else, and once Pingora has passed that header on to the client, the request can
//! no longer be sent to another replica. Held here, the header has not reached Pingora
//! when the first-byte deadline passes: to Pingora the replica never answered, and the
//! request is retried elsewhere like one that met a replica that accepts and never
//! answers. A client sees the header and the first token together, as before, once
//! there is a first token.
//!
//! Pingora gives a custom connection no descriptor the deadline watchdog could watch
//! (`deadline.rs`), so the gate enforces a stream's deadlines itself, from the
//! configuration when the request is written: the first byte (from the request's head
//! to the first piece of the body) and the gap between two reads that bring data. A
//! passed deadline fails the pending read with an [`io::ErrorKind::TimedOut`] error whose
//! inner error is the [`Expired`] deadline ([`expired_in`] finds it again).
//!
//! A new exchange is told by a write that begins with an HTTP request line: the proxy
//! sends only requests with JSON or form bodies (`{`, whitespace or `--` first), whose
//! head and body are separate writes. Replicas reached over TLS are not gated (the gate
//! would see ciphertext); their streams keep the watchdog, and an engine that hangs after
//! their header cannot be retried.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::l4::stream::Stream;
use pingora::protocols::l4::virt::{VirtualSockOpt, VirtualSocket, VirtualSocketStream};
use pingora::{Error, ErrorType};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::deadline::Expired;
use crate::config::Config;

/// The most response-head bytes held while waiting for the end of the head; a longer head
/// is passed on as it is (vLLM's are a few hundred bytes).
const MAX_HELD_HEAD: usize = 64 * 1024;

/// How a chunked body ends (the last chunk, no trailers), as the last bytes read.
const LAST_CHUNK: &[u8; 7] = b"\r\n0\r\n\r\n";

/// Opens gated connections (Pingora's `custom_l4` for streams to plain-HTTP replicas),
/// reusing idle ones ([`Idle`]).
#[derive(Debug)]
pub struct GateConnector {
    config: Arc<ArcSwap<Config>>,
    idle: Arc<Idle>,
}

impl GateConnector {
    pub fn new(config: Arc<ArcSwap<Config>>) -> GateConnector {
        GateConnector {
            config,
            idle: Arc::new(Idle::default()),
        }
    }
}

/// Gated connections whose last stream ended cleanly, per replica address, newest last.
///
/// Pingora's own pool cannot keep them: it checks a reused connection by its descriptor's
/// peer address, and a custom connection has no descriptor, so every stream would open a
/// new connection (measured: 0.35 ms more to the first token on loopback). A gate that is
/// dropped after a stream it saw end (its last chunk read, nothing after it) gives its
/// socket back here, and the next stream to that replica takes it, if it is younger
/// than `upstream.pool_idle_timeout` (below uvicorn's keep-alive) and still open.
#[derive(Debug, Default)]
pub struct Idle {
    by_addr: parking_lot::Mutex<
        std::collections::HashMap<std::net::SocketAddr, Vec<(TcpStream, Instant)>>,
    >,
}

impl Idle {
    /// The newest open idle connection to `addr` younger than `max_idle`; older ones
    /// are closed.
    fn take(&self, addr: std::net::SocketAddr, max_idle: Duration) -> Option<TcpStream> {
        let mut map = self.by_addr.lock();
        let list = map.get_mut(&addr)?;
        let now = Instant::now();
        list.retain(|(_, since)| now.saturating_duration_since(*since) < max_idle);
        while let Some((tcp, _)) = list.pop() {
            // Open, and nothing unasked for waiting: a read would block.
            let mut probe = [0u8; 1];
            if matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
                return Some(tcp);
            }
        }
        None
    }

    /// Keeps `tcp`, idle `since`, for the next stream to `addr`, up to `max` per replica.
    fn put(&self, addr: std::net::SocketAddr, tcp: TcpStream, since: Instant, max: usize) {
        let mut map = self.by_addr.lock();
        let list = map.entry(addr).or_default();
        if list.len() < max {
            list.push((tcp, since));
        }
    }
}

#[async_trait]
impl pingora::connectors::L4Connect for GateConnector {
    async fn connect(&self, addr: &SocketAddr) -> pingora::Result<Stream> {
        let SocketAddr::Inet(inet) = addr else {
            return Error::e_explain(ErrorType::ConnectError, "a gated replica is an IP address");
        };
        let cfg = self.config.load();
        if let Some(tcp) = self.idle.take(*inet, cfg.pool_idle_timeout) {
            let gate = Gate::new(tcp, *inet, self.config.clone(), self.idle.clone());
            return Ok(Stream::from(VirtualSocketStream::new(Box::new(gate))));
        }
        let limit = cfg.connect_timeout;
        let tcp = match tokio::time::timeout(limit, TcpStream::connect(inet)).await {
            Err(_) => {
                return Error::e_explain(
                    ErrorType::ConnectTimedout,
                    format!("timeout {limit:?} connecting to {inet}"),
                )
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                return Error::e_because(
                    ErrorType::ConnectRefused,
                    format!("connecting to {inet}"),
                    e,
                )
            }
            Ok(Err(e)) => {
                return Error::e_because(
                    ErrorType::ConnectError,
                    format!("connecting to {inet}"),
                    e,
                )
            }
            Ok(Ok(tcp)) => tcp,
        };
        let gate = Gate::new(tcp, *inet, self.config.clone(), self.idle.clone());
        Ok(Stream::from(VirtualSocketStream::new(Box::new(gate))))
    }
}

/// The deadline a gated read failed on, if that is why `e` (a proxy error) happened.
pub fn expired_in(e: &Error) -> Option<Expired> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e
        .cause
        .as_deref()
        .map(|c| c as &(dyn std::error::Error + 'static));
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<io::Error>() {
            if let Some(x) = io.get_ref().and_then(|i| i.downcast_ref::<Expired>()) {
                return Some(*x);
            }
        }
        // Pingora nests its errors boxed.
        let nested = c
            .downcast_ref::<Box<Error>>()
            .map(|b| &**b)
            .or_else(|| c.downcast_ref::<Error>());
        if let Some(x) = nested.and_then(expired_in) {
            return Some(x);
        }
        cause = c.source();
    }
    None
}

/// Where the current exchange is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No request written yet: reads pass through (an idle pooled connection).
    Idle,
    /// A request was written; the response head is being read and held.
    Head,
    /// A `200 text/event-stream` head is held until body bytes follow it (`body_at`: where
    /// the body begins in the held bytes).
    Hold { body_at: usize },
    /// Held bytes are handed out, then reads pass through (with the gap deadline).
    Pass,
}

#[derive(Debug)]
struct Gate {
    /// `None` once given back to [`Idle`] (on drop).
    tcp: Option<TcpStream>,
    addr: std::net::SocketAddr,
    config: Arc<ArcSwap<Config>>,
    idle: Arc<Idle>,
    /// The last bytes read (up to [`LAST_CHUNK`]'s length), to see a chunked body end.
    tail: [u8; LAST_CHUNK.len()],
    tail_len: usize,
    /// When the current exchange's answer ended cleanly (its last chunk was the last
    /// thing read), so that the connection may carry another stream.
    ended: Option<Instant>,
    phase: Phase,
    /// Bytes read and not yet handed out (from `given`).
    held: Vec<u8>,
    given: usize,
    /// The deadline of the pending wait.
    deadline: Option<Deadline>,
    /// The stream deadlines of the current exchange.
    first_byte: Duration,
    gap: Duration,
}

impl Gate {
    fn new(
        tcp: TcpStream,
        addr: std::net::SocketAddr,
        config: Arc<ArcSwap<Config>>,
        idle: Arc<Idle>,
    ) -> Gate {
        Gate {
            tcp: Some(tcp),
            addr,
            config,
            idle,
            tail: [0; LAST_CHUNK.len()],
            tail_len: 0,
            ended: None,
            phase: Phase::Idle,
            held: Vec::new(),
            given: 0,
            deadline: None,
            first_byte: Duration::MAX,
            gap: Duration::MAX,
        }
    }

    /// Sets the deadline of the next wait. The timer is made once per connection; it is
    /// moved only when it would fire too late, and a deadline that moved later (each read
    /// that brings data moves the gap's) is checked when it fires ([`Gate::poll_deadline`]).
    fn arm(&mut self, after: Duration, why: Expired) {
        let Some(due) = Instant::now().checked_add(after) else {
            self.deadline = None;
            return;
        };
        match &mut self.deadline {
            Some(d) => {
                if d.sleep.deadline() > due {
                    d.sleep.as_mut().reset(due);
                }
                d.due = due;
                d.why = why;
            }
            None => {
                self.deadline = Some(Deadline {
                    sleep: Box::pin(tokio::time::sleep_until(due)),
                    due,
                    why,
                })
            }
        }
    }

    /// Data came: the gap's deadline moves (checked when the timer fires).
    fn progress(&mut self) {
        if let Some(d) = &mut self.deadline {
            if let Some(due) = Instant::now().checked_add(self.gap) {
                d.due = due;
            }
        }
    }

    /// `data` was read from the replica: whether the answer has ended is seen in the last
    /// bytes read.
    fn note_read(&mut self, data: &[u8]) {
        if data.is_empty() {
            self.ended = None;
            return;
        }
        let n = LAST_CHUNK.len();
        if data.len() >= n {
            self.tail.copy_from_slice(&data[data.len() - n..]);
            self.tail_len = n;
        } else {
            let keep = (n - data.len()).min(self.tail_len);
            self.tail
                .copy_within(self.tail_len - keep..self.tail_len, 0);
            self.tail[keep..keep + data.len()].copy_from_slice(data);
            self.tail_len = keep + data.len();
        }
        let ended = self.phase != Phase::Idle && self.tail[..self.tail_len] == LAST_CHUNK[..];
        self.ended = ended.then(Instant::now);
    }

    fn tcp(&mut self) -> &mut TcpStream {
        self.tcp
            .as_mut()
            .expect("a gate has its socket until it is dropped")
    }

    /// A request is being written: a new exchange begins.
    fn begin(&mut self) {
        let t = self.config.load().timeouts;
        self.first_byte = t.stream_first_byte;
        self.gap = t.stream_chunk_gap;
        self.phase = Phase::Head;
        self.held.clear();
        self.given = 0;
        self.tail_len = 0;
        self.ended = None;
        self.arm(self.first_byte, Expired::FirstByte);
    }

    /// The held bytes go out from now on.
    fn release(&mut self) {
        self.phase = Phase::Pass;
        self.given = 0;
        self.arm(self.gap, Expired::Gap);
    }

    /// After held bytes were read: whether the head is complete, and if it is a stream's,
    /// whether body bytes follow it.
    fn judge(&mut self) {
        match self.phase {
            Phase::Head => match event_stream_head(&self.held) {
                Head::EventStream(body_at) => {
                    self.phase = Phase::Hold { body_at };
                    self.judge();
                }
                Head::Other => self.release(),
                Head::Partial if self.held.len() > MAX_HELD_HEAD => self.release(),
                Head::Partial => {}
            },
            Phase::Hold { body_at } if self.held.len() > body_at => self.release(),
            _ => {}
        }
    }

    /// The deadline of the pending wait has passed: the read fails.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some(d) = &mut self.deadline else {
            return Poll::Pending;
        };
        loop {
            if d.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if d.sleep.deadline() >= d.due {
                break;
            }
            // Progress moved the deadline since the timer was set.
            let due = d.due;
            d.sleep.as_mut().reset(due);
        }
        let why = d.why;
        // Once passed, the connection is done with: Pingora drops it after the error.
        self.deadline = None;
        self.ended = None;
        Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, why))
    }
}

/// A gate's timer, and the deadline it stands for (at or after the timer's).
#[derive(Debug)]
struct Deadline {
    sleep: Pin<Box<Sleep>>,
    due: Instant,
    why: Expired,
}

/// What the bytes held so far begin with.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// Not a whole response head yet.
    Partial,
    /// A `200` with a `text/event-stream` body, which starts at this offset.
    EventStream(usize),
    /// Any other answer (or bytes that are no response head): passed on as they are, for
    /// Pingora to judge.
    Other,
}

/// Reads a response head at the start of `held` (with `httparse`, as Pingora does).
fn event_stream_head(held: &[u8]) -> Head {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut fields);
    match resp.parse(held) {
        Ok(httparse::Status::Partial) => Head::Partial,
        Ok(httparse::Status::Complete(body_at)) => {
            let sse = resp.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("content-type")
                    && h.value
                        .get(..17)
                        .is_some_and(|v| v.eq_ignore_ascii_case(b"text/event-stream"))
            });
            if resp.code == Some(200) && sse {
                Head::EventStream(body_at)
            } else {
                Head::Other
            }
        }
        // Too many fields for this array, or not HTTP: not ours to hold.
        Err(_) => Head::Other,
    }
}

/// Whether a write begins an HTTP/1 request: a method token, a space, a target, and
/// ` HTTP/1.` on its first line.
fn starts_request(buf: &[u8]) -> bool {
    let method = buf.iter().take_while(|c| c.is_ascii_uppercase()).count();
    if method == 0 || buf.get(method) != Some(&b' ') {
        return false;
    }
    let line = &buf[..memchr::memchr(b'\n', buf).unwrap_or(buf.len())];
    memchr::memmem::find(line, b" HTTP/1.").is_some()
}

impl AsyncRead for Gate {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match this.phase {
                Phase::Idle => {
                    let before = buf.filled().len();
                    let r = Pin::new(this.tcp()).poll_read(cx, buf);
                    if matches!(r, Poll::Ready(Ok(()))) {
                        this.note_read(&buf.filled()[before..]);
                    }
                    return r;
                }
                Phase::Pass if this.given < this.held.len() => {
                    let n = buf.remaining().min(this.held.len() - this.given);
                    buf.put_slice(&this.held[this.given..this.given + n]);
                    this.given += n;
                    if this.given == this.held.len() {
                        this.held = Vec::new();
                        this.given = 0;
                    }
                    return Poll::Ready(Ok(()));
                }
                Phase::Pass => {
                    let before = buf.filled().len();
                    match Pin::new(this.tcp()).poll_read(cx, buf) {
                        Poll::Ready(Ok(())) => {
                            if buf.filled().len() > before {
                                this.progress();
                            }
                            this.note_read(&buf.filled()[before..]);
                            return Poll::Ready(Ok(()));
                        }
                        Poll::Ready(Err(e)) => {
                            this.ended = None;
                            return Poll::Ready(Err(e));
                        }
                        // An answer that ended has no gap: the connection is idle (in
                        // Pingora's pool, whose own idle timeout applies).
                        Poll::Pending if this.ended.is_some() => return Poll::Pending,
                        Poll::Pending => {
                            return match this.poll_deadline(cx) {
                                Poll::Ready(e) => Poll::Ready(Err(e)),
                                Poll::Pending => Poll::Pending,
                            }
                        }
                    }
                }
                Phase::Head | Phase::Hold { .. } => {
                    let mut chunk = [0u8; 8192];
                    let mut rb = ReadBuf::new(&mut chunk);
                    let r = Pin::new(this.tcp()).poll_read(cx, &mut rb);
                    if matches!(r, Poll::Ready(Ok(()))) {
                        this.note_read(rb.filled());
                    }
                    match r {
                        Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                            // The replica closed: what it sent goes on, and Pingora
                            // judges the cut answer.
                            this.release();
                        }
                        Poll::Ready(Ok(())) => {
                            this.held.extend_from_slice(rb.filled());
                            this.judge();
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {
                            return match this.poll_deadline(cx) {
                                Poll::Ready(e) => Poll::Ready(Err(e)),
                                Poll::Pending => Poll::Pending,
                            }
                        }
                    }
                }
            }
        }
    }
}

impl AsyncWrite for Gate {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if matches!(this.phase, Phase::Idle | Phase::Pass) && starts_request(buf) {
            this.begin();
        }
        Pin::new(this.tcp()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let first = bufs.iter().find(|b| !b.is_empty());
        if matches!(this.phase, Phase::Idle | Phase::Pass)
            && first.is_some_and(|b| starts_request(b))
        {
            this.begin();
        }
        Pin::new(this.tcp()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        // As a plain TCP connection: Pingora then writes a head and a body in one call.
        self.tcp.as_ref().is_some_and(TcpStream::is_write_vectored)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().tcp()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.ended = None;
        Pin::new(this.tcp()).poll_shutdown(cx)
    }
}

impl VirtualSocket for Gate {
    fn set_socket_option(&self, opt: VirtualSockOpt) -> io::Result<()> {
        match opt {
            VirtualSockOpt::NoDelay => match &self.tcp {
                Some(tcp) => tcp.set_nodelay(true),
                None => Ok(()),
            },
            // The proxy sets no keep-alive probes on replica connections.
            _ => Ok(()),
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        // Pingora drops a gated connection when it would pool it (it cannot: see
        // [`Idle`]) or when the exchange failed; only the first kind ended cleanly, with
        // everything it read handed out.
        let clean = self.phase == Phase::Pass && self.given >= self.held.len();
        if let (Some(ended), true) = (self.ended, clean) {
            if let Some(tcp) = self.tcp.take() {
                let cfg = self.config.load();
                if ended.elapsed() < cfg.pool_idle_timeout {
                    self.idle
                        .put(self.addr, tcp, ended, cfg.keepalive_pool_size);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_is_found_in_pingoras_nested_errors() {
        let io = io::Error::new(io::ErrorKind::TimedOut, Expired::FirstByte);
        let inner = Error::because(ErrorType::ReadError, "while reading", io);
        assert_eq!(expired_in(&inner), Some(Expired::FirstByte));
        let outer = Error::because(ErrorType::ReadError, "peer", inner);
        assert_eq!(expired_in(&outer), Some(Expired::FirstByte));
        let other = Error::because(ErrorType::ReadError, "peer", io::Error::other("reset"));
        assert_eq!(expired_in(&other), None);
    }

    #[tokio::test]
    async fn the_end_of_a_chunked_answer_is_seen_however_it_is_split() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let config = Arc::new(ArcSwap::from_pointee(Config::with_backends(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
            &["http://127.0.0.1:9".to_string()],
        )));
        let mut g = Gate::new(tcp, addr, config, Arc::new(Idle::default()));
        g.begin();
        g.phase = Phase::Pass;
        let body: &[u8] = b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n";
        for split in 0..body.len() {
            g.tail_len = 0;
            g.note_read(&body[..split]);
            g.note_read(&body[split..]);
            assert!(g.ended.is_some(), "split at {split}");
        }
        for (a, b) in [(&b"x\r\n0\r\n"[..], &b"\r\nmore"[..]), (b"abc", b"")] {
            g.note_read(a);
            g.note_read(b);
            assert!(g.ended.is_none(), "{a:?} {b:?}");
        }
    }

    #[test]
    fn heads_and_requests_are_told_apart() {
        let sse = b"HTTP/1.1 200 OK\r\ndate: x\r\nContent-Type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n5\r\n";
        assert_eq!(event_stream_head(sse), Head::EventStream(sse.len() - 3));
        assert_eq!(event_stream_head(&sse[..40]), Head::Partial);
        assert_eq!(
            event_stream_head(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n"),
            Head::Other
        );
        assert_eq!(
            event_stream_head(
                b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/event-stream\r\n\r\n"
            ),
            Head::Other
        );
        assert_eq!(
            event_stream_head(b"HTTP/1.1 200\r\ncontent-type:text/event-stream\r\n\r\n"),
            Head::EventStream(48)
        );
        assert_eq!(event_stream_head(b"\x00garbage\r\n\r\n"), Head::Other);
        assert!(starts_request(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n\r\n"
        ));
        assert!(!starts_request(b"{\"model\":\"POST / HTTP/1.1\"}"));
        assert!(!starts_request(b"--boundary\r\n"));
        assert!(!starts_request(b"POST"));
    }
}
