//! Client connection limits that act before Pingora has parsed a request: how many client
//! connections may be open at once (`limits.max_connections`), and how long a request
//! head may take to arrive (`limits.header_read_timeout`, against slowloris clients).
//!
//! Pingora 0.9.1 reads a request head with a timeout per read (60 s), not per head, and
//! offers no hook before the head is parsed. So [`EdgeApp`] wraps the proxy application:
//! it counts connections, and hands Pingora the client's stream wrapped in a
//! [`HeadDeadline`], which fails reads once a request head has taken too long.
//!
//! The same wrapper sees each request line before Pingora does, which is the only place
//! two faults can be told: Pingora percent-escapes a control character in the target
//! (a raw NUL would become `%00`), and refuses a target the `http` crate cannot hold with
//! an empty 400 before any hook runs. Such a line is passed on marked by a
//! [`MALFORMED`] header (cut to [`MAX_REQUEST_LINE`] if it is longer), so the proxy
//! answers it in its turn like any other request.

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Sleep;

use crate::config::Config;
use crate::metrics;

/// A request line (method, target, version) longer than this is cut and marked (or
/// `limits.max_header_size`, if smaller). Twice nginx's 8 KiB line buffer; an
/// OpenAI request's target is a short path. A third of the 65,534 bytes the `http` crate
/// holds, so a target Pingora percent-escapes (one byte to three) still fits.
pub const MAX_REQUEST_LINE: usize = 16 * 1024;

/// The header that marks a request line the gateway must refuse: `control` (a control
/// character in it) or `long N` (it was N bytes, cut). Added by [`HeadDeadline`] after
/// the request line; answered by the proxy before anything else. A client that sends it
/// itself only gets its own request refused.
pub const MALFORMED: &str = "x-vllm-edge-malformed";

/// Answer to a connection over `limits.max_connections`.
fn refusal() -> Vec<u8> {
    let body = r#"{"error":{"message":"The gateway has too many open connections (limits.max_connections); retry shortly.","type":"ServiceUnavailableError","param":null,"code":503}}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The data-plane application, wrapped with the connection limits.
pub struct EdgeApp<A> {
    inner: Arc<A>,
    config: Arc<ArcSwap<Config>>,
    open: AtomicUsize,
}

impl<A> EdgeApp<A> {
    pub fn new(inner: A, config: Arc<ArcSwap<Config>>) -> EdgeApp<A> {
        EdgeApp {
            inner: Arc::new(inner),
            config,
            open: AtomicUsize::new(0),
        }
    }
}

/// One open client connection, counted until dropped.
struct Slot<'a>(&'a AtomicUsize);

impl<'a> Slot<'a> {
    fn take(open: &'a AtomicUsize, max: usize) -> Option<Slot<'a>> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()?;
        metrics::CONNECTIONS_OPEN.inc();
        Some(Slot(open))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        metrics::CONNECTIONS_OPEN.dec();
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for EdgeApp<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let limits = self.config.load().limits;
        let Some(_slot) = Slot::take(&self.open, limits.max_connections) else {
            metrics::LIMIT_REFUSALS
                .with_label_values(&["max_connections"])
                .inc();
            // Boxed: its read buffer would otherwise sit in every connection's future.
            Box::pin(refuse(stream)).await;
            return None;
        };
        let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
        if !h2 {
            let max_line = limits.max_header_bytes.min(MAX_REQUEST_LINE);
            stream = Box::new(HeadDeadline::new(
                stream,
                limits.header_read_timeout,
                max_line,
            ));
        }
        self.inner.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

/// Answers an HTTP/1 client 503 (after reading what it sent, so closing does not reset
/// the answer away); an HTTP/2 client is only closed.
async fn refuse(mut stream: Stream) {
    let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await;
    if !h2 && !buf.starts_with(b"PRI * HTTP/2") {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = stream.write_all(&refusal()).await;
            let _ = stream.flush().await;
        })
        .await;
    }
    Shutdown::shutdown(&mut *stream).await;
}

/// Where a connection is in its exchange of HTTP/1 requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Head {
    /// Receiving a head.
    Receiving(HeadScan),
    /// A head arrived whose body has `Content-Length` bytes: that many bytes are body,
    /// and the byte after them starts the next head (pipelined, or after the answer).
    Body { remaining: u64 },
    /// A head arrived whose body's length this cannot follow (chunked, or a length it
    /// cannot read): the next head is taken to start after an answer was written.
    Received,
    /// Between requests: the next byte read starts the next head.
    Between,
    /// Not HTTP/1 (an HTTP/2 preface): HTTP/2's own limits apply.
    Off,
}

/// What a head says so far, read a byte at a time: where it ends (an empty line), and
/// how long the body after it is (`Content-Length`, or `Transfer-Encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HeadScan {
    /// Line ends since the last other byte; two in a row end the head.
    newlines: u8,
    /// The current line's first bytes, until its colon: a header name.
    name: [u8; 18],
    name_len: u8,
    field: Field,
    content_length: Option<u64>,
    /// The length cannot be followed: a `Transfer-Encoding`, or a `Content-Length` that
    /// is not one number (Pingora refuses that request anyway).
    unknown_length: bool,
    /// Still in the head's first line, the request line: what it holds so far.
    request_line: Option<RequestLine>,
}

impl Default for HeadScan {
    fn default() -> Self {
        HeadScan {
            newlines: 0,
            name: [0; 18],
            name_len: 0,
            field: Field::Name,
            content_length: None,
            unknown_length: false,
            request_line: Some(RequestLine::default()),
        }
    }
}

/// A request line as it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct RequestLine {
    /// Bytes so far (its line end not counted).
    len: usize,
    /// A control character (other than the line's CR) was in it.
    control: bool,
}

/// A change to the bytes a read handed Pingora, at offsets into that read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Edit {
    /// These bytes are left out (the part of a request line past its limit).
    Drop(std::ops::Range<usize>),
    /// These bytes are put in before the byte at this offset.
    Insert(usize, Vec<u8>),
}

/// `data` with `edits` (in offset order) applied.
fn edited(data: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    let mut at = 0;
    for e in edits {
        match e {
            Edit::Drop(r) => {
                out.extend_from_slice(&data[at..r.start]);
                at = r.end;
            }
            Edit::Insert(i, bytes) => {
                out.extend_from_slice(&data[at..*i]);
                out.extend_from_slice(bytes);
                at = *i;
            }
        }
    }
    out.extend_from_slice(&data[at..]);
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Field {
    /// The line's name (before its colon).
    #[default]
    Name,
    /// In a `Content-Length` value: its digits so far.
    ContentLength(Option<u64>),
    /// In any other line.
    Other,
}

impl HeadScan {
    /// Reads `data` until the head ends: `Some` (bytes taken, what follows) if it ended.
    fn feed(&mut self, data: &[u8]) -> Option<(usize, Head)> {
        let mut i = 0;
        while i < data.len() {
            if self.field == Field::Other {
                // The rest of a line nothing is read from: to its end at once.
                match memchr::memchr(b'\n', &data[i..]) {
                    Some(n) => {
                        if n > 0 {
                            self.newlines = 0;
                        }
                        i += n;
                    }
                    None => {
                        self.newlines = 0;
                        return None;
                    }
                }
            }
            let b = data[i];
            i += 1;
            match b {
                b'\n' => {
                    if let Field::ContentLength(value) = self.field {
                        match (value, self.content_length) {
                            (Some(v), None) => self.content_length = Some(v),
                            (Some(v), Some(before)) if v == before => {}
                            _ => self.unknown_length = true,
                        }
                    }
                    self.field = Field::Name;
                    self.name_len = 0;
                    self.newlines += 1;
                    if self.newlines == 2 {
                        let next = match self.content_length {
                            _ if self.unknown_length => Head::Received,
                            Some(n) if n > 0 => Head::Body { remaining: n },
                            _ => Head::Between,
                        };
                        return Some((i, next));
                    }
                }
                b'\r' => {}
                _ => {
                    self.newlines = 0;
                    match &mut self.field {
                        Field::Name if b == b':' => {
                            let name = &self.name[..self.name_len as usize];
                            self.field = if name.eq_ignore_ascii_case(b"content-length") {
                                Field::ContentLength(None)
                            } else {
                                if name.eq_ignore_ascii_case(b"transfer-encoding") {
                                    self.unknown_length = true;
                                }
                                Field::Other
                            };
                        }
                        Field::Name if (self.name_len as usize) < self.name.len() => {
                            self.name[self.name_len as usize] = b;
                            self.name_len += 1;
                        }
                        // Longer than any name looked for.
                        Field::Name => self.field = Field::Other,
                        Field::ContentLength(value) => match b {
                            b'0'..=b'9' => {
                                let digit = u64::from(b - b'0');
                                match value
                                    .unwrap_or(0)
                                    .checked_mul(10)
                                    .and_then(|v| v.checked_add(digit))
                                {
                                    Some(v) => *value = Some(v),
                                    None => self.unknown_length = true,
                                }
                            }
                            b' ' | b'\t' => {}
                            _ => self.unknown_length = true,
                        },
                        Field::Other => {}
                    }
                }
            }
        }
        None
    }
}

/// A client stream whose HTTP/1 request heads must each arrive within a time limit:
/// the first from the connection's start, each later one from its first byte. A read
/// past the limit fails with `TimedOut`, and Pingora closes the connection.
#[derive(Debug)]
pub struct HeadDeadline {
    inner: Stream,
    limit: Duration,
    head: Head,
    timer: Option<Pin<Box<Sleep>>>,
    /// The connection's first bytes, until they show whether it is an HTTP/2 preface.
    start: Option<Vec<u8>>,
    /// Bytes read by [`Peek::try_peek`] (or left over from an edited read), handed out
    /// again by the next reads.
    peeked: Vec<u8>,
    /// A request line longer than this is cut and marked.
    max_line: usize,
}

impl HeadDeadline {
    pub fn new(inner: Stream, limit: Duration, max_line: usize) -> HeadDeadline {
        HeadDeadline {
            inner,
            limit,
            head: Head::Receiving(HeadScan::default()),
            timer: Some(Box::pin(tokio::time::sleep(limit))),
            start: Some(Vec::new()),
            peeked: Vec::new(),
            max_line,
        }
    }

    /// An answer is being written: after a body whose length is not followed, the next
    /// byte read starts the next head.
    fn wrote(&mut self) {
        if self.head == Head::Received {
            self.head = Head::Between;
        }
    }

    /// The head's deadline passed: counted once, and the error the read gets.
    fn expired(&mut self) -> io::Error {
        self.timer = None;
        self.head = Head::Off;
        metrics::LIMIT_REFUSALS
            .with_label_values(&["header_read_timeout"])
            .inc();
        tracing::debug!("a client did not send its request head in time");
        io::Error::new(
            io::ErrorKind::TimedOut,
            "the request head did not arrive within limits.header_read_timeout",
        )
    }

    /// Follows the bytes a client sent: heads (each timed from its first byte), and the
    /// bodies between them, skipped by their `Content-Length`. Pipelined requests
    /// (several in one read, or a head whose body comes in later reads) are told apart.
    /// Returns the edits a request line needs (see [`MALFORMED`]), usually none.
    fn observe(&mut self, data: &[u8]) -> Vec<Edit> {
        let mut edits = Vec::new();
        self.observe_into(data, &mut edits);
        edits
    }

    fn observe_into(&mut self, mut data: &[u8], edits: &mut Vec<Edit>) {
        if data.is_empty() {
            return;
        }
        let origin = data.as_ptr() as usize;
        if let Some(start) = self.start.as_mut() {
            let want = H2_PREFACE.len() - start.len();
            start.extend_from_slice(&data[..want.min(data.len())]);
            if !H2_PREFACE.starts_with(start) {
                self.start = None;
            } else if start.len() == H2_PREFACE.len() {
                self.start = None;
                self.head = Head::Off;
                self.timer = None;
                return;
            }
        }
        while !data.is_empty() {
            match &mut self.head {
                Head::Off | Head::Received => return,
                Head::Body { remaining } => {
                    let n = (*remaining).min(data.len() as u64);
                    *remaining -= n;
                    data = &data[n as usize..];
                    if *remaining == 0 {
                        self.head = Head::Between;
                    }
                }
                Head::Between => {
                    self.head = Head::Receiving(HeadScan::default());
                    self.timer = Some(Box::pin(tokio::time::sleep(self.limit)));
                }
                Head::Receiving(scan) => {
                    if let Some(line) = scan.request_line.as_mut() {
                        let at = data.as_ptr() as usize - origin;
                        request_line(line, data, at, self.max_line, edits);
                        if memchr::memchr(b'\n', data).is_some() {
                            scan.request_line = None;
                        }
                    }
                    match scan.feed(data) {
                        Some((taken, next)) => {
                            data = &data[taken..];
                            self.head = next;
                            self.timer = None;
                        }
                        None => return,
                    }
                }
            }
        }
    }
}

/// Follows a request line through `data` (which starts inside it, at offset `at` of the
/// read): a control character in it, or bytes past `max` (left out), and at its end the
/// [`MALFORMED`] mark they call for.
fn request_line(line: &mut RequestLine, data: &[u8], at: usize, max: usize, edits: &mut Vec<Edit>) {
    let end = memchr::memchr(b'\n', data);
    let seg = &data[..end.unwrap_or(data.len())];
    line.control |= seg.iter().any(|&b| (b < 0x20 && b != b'\r') || b == 0x7f);
    let before = line.len;
    line.len += seg.len();
    if line.len > max {
        let keep = max.saturating_sub(before).min(seg.len());
        let through = end.map_or(data.len(), |e| e + 1);
        edits.push(Edit::Drop(at + keep..at + through));
    }
    let Some(end) = end else { return };
    let mark = if line.len > max {
        // The cut took the version and the line's end with it.
        format!(" HTTP/1.1\r\n{MALFORMED}: long {}\r\n", line.len)
    } else if line.control {
        format!("{MALFORMED}: control\r\n")
    } else {
        return;
    };
    edits.push(Edit::Insert(at + end + 1, mark.into_bytes()));
}

/// How an HTTP/2 connection without TLS starts (its first line).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";
/// The whole connection preface of HTTP/2 without TLS, which Pingora peeks for.
const H2C_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl AsyncRead for HeadDeadline {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(timer) = this.timer.as_mut() {
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(this.expired()));
            }
        }
        if !this.peeked.is_empty() {
            // Observed when peeked: handed out as they are.
            let n = this.peeked.len().min(buf.remaining());
            buf.put_slice(&this.peeked[..n]);
            this.peeked.drain(..n);
            if this.peeked.is_empty() {
                this.peeked = Vec::new();
            }
            return Poll::Ready(Ok(()));
        }
        loop {
            let before = buf.filled().len();
            ready!(Pin::new(&mut *this.inner).poll_read(cx, buf))?;
            if buf.filled().len() == before {
                return Poll::Ready(Ok(()));
            }
            let edits = this.observe(&buf.filled()[before..]);
            if edits.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let out = edited(&buf.filled()[before..], &edits);
            buf.set_filled(before);
            let n = out.len().min(buf.remaining());
            buf.put_slice(&out[..n]);
            this.peeked.extend_from_slice(&out[n..]);
            if n > 0 {
                return Poll::Ready(Ok(()));
            }
            // Everything read was left out: an empty read would look like the end.
        }
    }
}

impl AsyncWrite for HeadDeadline {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut *this.inner).poll_write(cx, data))?;
        this.wrote();
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut *this.inner).poll_write_vectored(cx, bufs))?;
        this.wrote();
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for HeadDeadline {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await
    }
}

impl UniqueID for HeadDeadline {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeadDeadline {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeadDeadline {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeadDeadline {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: pingora::protocols::raw_connect::ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for HeadDeadline {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for HeadDeadline {
    /// Pingora peeks for the HTTP/2 preface before reading anything, and its own peek
    /// waits for as many bytes as the preface has (24). An HTTP/1 request shorter than
    /// that (`OPTIONS / HTTP/1.0` and an empty line, the health check of HAProxy's
    /// `option httpchk`, is 22) would wait for bytes that never come, until the head's
    /// deadline closed it unanswered. So this peek reads only until the bytes can no
    /// longer be the preface (or the client stops sending), and the next reads hand them
    /// out again. A client that sends nothing waits here, so the head's deadline applies.
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let deadline = self.timer.as_ref().map(|t| t.deadline());
        let want = buf.len();
        let fill = async {
            let mut chunk = [0u8; 64];
            while self.peeked.len() < want && H2C_PREFACE.starts_with(&self.peeked) {
                let n = self.inner.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                let edits = self.observe(&chunk[..n]);
                if edits.is_empty() {
                    self.peeked.extend_from_slice(&chunk[..n]);
                } else {
                    let out = edited(&chunk[..n], &edits);
                    self.peeked.extend_from_slice(&out);
                }
            }
            Ok::<_, io::Error>(())
        };
        match deadline {
            None => fill.await?,
            Some(deadline) => match tokio::time::timeout_at(deadline, fill).await {
                Ok(filled) => filled?,
                Err(_) => return Err(self.expired()),
            },
        }
        if self.peeked.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        // What was read is not the preface unless all of it came. Past it, `buf` is left
        // as it was but for one byte made to differ from the preface, so that a short
        // start never compares equal to it.
        let n = self.peeked.len().min(want);
        buf[..n].copy_from_slice(&self.peeked[..n]);
        if n < want {
            buf[n] = !H2C_PREFACE.get(n).copied().unwrap_or(0);
        }
        Ok(true)
    }
}

/// Turns transparent huge pages off for this process. The allocator asks for them, and
/// then the few touched bytes of each connection's buffers keep whole 2 MiB pages
/// resident: 89 KB per idle client connection with them, 27 KB without (measured with
/// 5,000 idle connections; see `benches/results/HISTORY.md`).
pub fn no_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and changes only this process.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::debug!("cannot turn transparent huge pages off");
    }
}

/// Raises the soft limit on open descriptors to the hard limit, so `max_connections`
/// clients (each holding a descriptor, two while proxied) fit. Returns the new limit.
pub fn raise_descriptor_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    Some(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wrapped stream, and the client's end of it.
    fn connected() -> (HeadDeadline, std::os::unix::net::UnixStream) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let l4: pingora::protocols::l4::stream::Stream =
            tokio::net::UnixStream::from_std(a).unwrap().into();
        (
            HeadDeadline::new(Box::new(l4), Duration::from_secs(1), 64),
            b,
        )
    }

    fn deadline() -> HeadDeadline {
        connected().0
    }

    /// Peeks as Pingora does, then reads everything the client sent.
    async fn peek_then_read(d: &mut HeadDeadline, sent: usize) -> (bool, Vec<u8>) {
        let mut start = [0u8; H2C_PREFACE.len()];
        let peeked = d.try_peek(&mut start).await.expect("peeked");
        assert!(peeked);
        let mut read = Vec::new();
        while read.len() < sent {
            let mut chunk = [0u8; 7];
            let n = d.read(&mut chunk).await.unwrap();
            assert!(n > 0, "ended after {read:?}");
            read.extend_from_slice(&chunk[..n]);
        }
        (start == H2C_PREFACE, read)
    }

    #[tokio::test]
    async fn a_request_shorter_than_the_h2_preface_is_peeked_without_waiting_for_more() {
        use std::io::Write;
        // Pingora's own peek waits for 24 bytes: these would hang until the deadline.
        for head in [
            &b"OPTIONS / HTTP/1.0\r\n\r\n"[..],
            b"GET / HTTP/1.0\r\n\r\n",
            b"G",
        ] {
            let (mut d, mut client) = connected();
            client.write_all(head).unwrap();
            let (h2, read) = tokio::time::timeout(Duration::from_millis(500), async {
                peek_then_read(&mut d, head.len()).await
            })
            .await
            .expect("the peek does not wait for more bytes");
            assert!(!h2);
            assert_eq!(read, head, "every byte is read once, in order");
        }
        // The preface itself, in pieces, is still recognised, and read again after.
        let (mut d, mut client) = connected();
        let wrote = std::thread::spawn(move || {
            for piece in H2C_PREFACE.chunks(5) {
                client.write_all(piece).unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
            client
        });
        let (h2, read) = peek_then_read(&mut d, H2C_PREFACE.len()).await;
        assert!(h2);
        assert_eq!(read, H2C_PREFACE);
        assert_eq!(d.head, Head::Off);
        drop(wrote.join());
        // A prefix of the preface and then the end: not the preface.
        let (mut d, mut client) = connected();
        client.write_all(b"PRI * HT").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let (h2, read) = peek_then_read(&mut d, 8).await;
        assert!(!h2);
        assert_eq!(read, b"PRI * HT");
        // Nothing at all and then the end is an error, as before.
        let (mut d, client) = connected();
        drop(client);
        let mut start = [0u8; H2C_PREFACE.len()];
        assert!(d.try_peek(&mut start).await.is_err());
    }

    #[tokio::test]
    async fn a_head_ends_at_an_empty_line_and_its_body_is_skipped_in_any_chunking() {
        let head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nContent-Length: 2\r\n\r\n{}";
        for chunk in 1..head.len() {
            let mut d = deadline();
            for c in head.chunks(chunk) {
                d.observe(c);
            }
            assert_eq!(d.head, Head::Between, "chunk {chunk}");
            assert!(d.timer.is_none());
        }
        let mut d = deadline();
        d.observe(b"GET / HTTP/1.1\nhost: x\n\n");
        assert_eq!(d.head, Head::Between, "bare line feeds");
        let mut d = deadline();
        d.observe(b"GET / HTTP/1.1\r\nhost: x\r\n");
        assert!(matches!(d.head, Head::Receiving(_)));
        assert!(d.timer.is_some());
    }

    /// Pipelined requests: several in one read, and a head whose body comes in later
    /// reads. The body is not taken for the next head, so a slow body is not cut by the
    /// head's deadline, and the next head is timed from its own first byte.
    #[tokio::test]
    async fn bodies_are_told_from_pipelined_heads() {
        let mut d = deadline();
        d.observe(
            b"POST /a HTTP/1.1\r\ncontent-length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n\r\n\
              POST /c HTTP/1.1\r\ncontent-length:10\r\n\r\n12345",
        );
        assert_eq!(d.head, Head::Body { remaining: 5 });
        assert!(d.timer.is_none(), "a body is not a head");
        // Body bytes that look like a head's end change nothing.
        d.observe(b"\r\n\r\n");
        assert_eq!(d.head, Head::Body { remaining: 1 });
        d.observe(b"xGET");
        assert!(matches!(d.head, Head::Receiving(_)));
        assert!(d.timer.is_some(), "the next head is timed");
        // An answer written while a body is on its way (100 Continue) changes nothing.
        let mut d = deadline();
        d.observe(b"POST / HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 4\r\n\r\n");
        d.wrote();
        assert_eq!(d.head, Head::Body { remaining: 4 });
        d.observe(b"body");
        assert_eq!(d.head, Head::Between);
        assert!(
            d.timer.is_none(),
            "an idle connection is not timed as a head"
        );
        // A one-byte body, and an empty one.
        let mut d = deadline();
        d.observe(b"POST / HTTP/1.1\r\ncontent-length: 1\r\n\r\nx");
        assert_eq!((d.head, d.timer.is_none()), (Head::Between, true));
        d.observe(b"POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\nG");
        assert!(matches!(d.head, Head::Receiving(_)));
    }

    proptest::proptest! {
        /// However the bytes of pipelined requests are split into reads, the state after
        /// them is the same, and every split point inside a body leaves no head timed.
        #[test]
        fn the_state_does_not_depend_on_how_reads_split_the_bytes(
            cuts in proptest::collection::vec(0usize..400, 0..8),
            body in "[a-z\r\n:{}]{0,40}",
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let _guard = rt.enter();
            let bytes = format!(
                "POST /a HTTP/1.1\r\nContent-Length: {}\r\nx-long-header-name: v\r\n\r\n{body}\
                 GET /b HTTP/1.1\r\n\r\nPOST /c HTTP/1.1\r\ncontent-length:3\r\n\r\nab",
                body.len()
            );
            let bytes = bytes.as_bytes();
            let mut whole = deadline();
            whole.observe(bytes);
            proptest::prop_assert_eq!(whole.head, Head::Body { remaining: 1 });
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort_unstable();
            let mut d = deadline();
            let mut at = 0;
            for c in cuts.into_iter().chain([bytes.len()]) {
                d.observe(&bytes[at..c]);
                at = c;
            }
            proptest::prop_assert_eq!(d.head, whole.head);
            proptest::prop_assert!(d.timer.is_none());
        }

        /// What Pingora is handed does not depend on how reads split the bytes either,
        /// whatever the request lines hold.
        #[test]
        fn the_bytes_handed_out_do_not_depend_on_how_reads_split_them(
            cuts in proptest::collection::vec(0usize..300, 0..8),
            target in proptest::collection::vec(proptest::sample::select(&b"ab/?\x00\x7f\r"[..]), 0..120),
            body in "[a-z\r\n]{0,20}",
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let _guard = rt.enter();
            let mut bytes = b"POST /".to_vec();
            bytes.extend_from_slice(&target);
            bytes.extend_from_slice(format!(" HTTP/1.1\r\ncontent-length: {}\r\n\r\n{body}", body.len()).as_bytes());
            bytes.extend_from_slice(&bytes.clone());
            let mut cuts = cuts;
            cuts.sort_unstable();
            proptest::prop_assert_eq!(handed_out(&bytes, &cuts, 64), handed_out(&bytes, &[], 64));
        }
    }

    /// What Pingora is handed for `bytes` read in pieces cut at `cuts`, with request
    /// lines limited to `max`.
    fn handed_out(bytes: &[u8], cuts: &[usize], max: usize) -> Vec<u8> {
        let mut d = deadline();
        d.max_line = max;
        let mut out = Vec::new();
        let mut at = 0;
        for &c in cuts.iter().chain([&bytes.len()]) {
            let c = c.clamp(at, bytes.len());
            let edits = d.observe(&bytes[at..c]);
            out.extend(edited(&bytes[at..c], &edits));
            at = c;
        }
        out
    }

    #[tokio::test]
    async fn a_request_line_with_a_control_character_or_too_long_is_marked() {
        let plain = b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n";
        assert_eq!(
            handed_out(plain, &[], 64),
            plain,
            "a plain line passes as it is"
        );
        assert_eq!(
            handed_out(b"GET /v1/mo\x00dels HTTP/1.1\r\nhost: x\r\n\r\n", &[3], 64),
            b"GET /v1/mo\x00dels HTTP/1.1\r\nx-vllm-edge-malformed: control\r\nhost: x\r\n\r\n"
        );
        let long = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(100));
        let line_len = long.find("\r\n").unwrap() + 1;
        let want = format!(
            "GET /{} HTTP/1.1\r\nx-vllm-edge-malformed: long {line_len}\r\nhost: x\r\n\r\n",
            "a".repeat(59)
        );
        for cuts in [
            vec![],
            vec![10],
            vec![64],
            vec![70, 80, 100],
            (0..long.len()).collect(),
        ] {
            assert_eq!(
                String::from_utf8(handed_out(long.as_bytes(), &cuts, 64)).unwrap(),
                want,
                "cuts {cuts:?}"
            );
        }
        // A body that looks like a request line is a body; the next head is checked.
        let pipelined = b"POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\n\x00\x01\x02\x03\x04GET /\x01 HTTP/1.1\r\n\r\n";
        assert_eq!(
            handed_out(pipelined, &[], 64),
            b"POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\n\x00\x01\x02\x03\x04GET /\x01 HTTP/1.1\r\nx-vllm-edge-malformed: control\r\n\r\n"
        );
    }

    /// A request line cut in a read of its own: the read that is left out entirely is not
    /// handed out as an empty read (which Pingora would take for the client's end).
    #[tokio::test]
    async fn a_read_left_out_entirely_is_not_an_end() {
        use std::io::Write;
        let (mut d, mut client) = connected();
        d.max_line = 16;
        let wrote = std::thread::spawn(move || {
            client.write_all(b"GET /aaaaaaaaaaaa").unwrap();
            std::thread::sleep(Duration::from_millis(20));
            client.write_all(b"aaaaaaaaaaaaaaaaaa").unwrap();
            std::thread::sleep(Duration::from_millis(20));
            client.write_all(b" HTTP/1.1\r\n\r\n").unwrap();
            client
        });
        let mut got = Vec::new();
        while !got.ends_with(b"\r\n\r\n") {
            let mut chunk = [0u8; 64];
            let n = d.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "ended early after {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(
            String::from_utf8(got).unwrap(),
            "GET /aaaaaaaaaaa HTTP/1.1\r\nx-vllm-edge-malformed: long 45\r\n\r\n"
        );
        drop(wrote.join());
    }

    #[tokio::test]
    async fn a_length_it_cannot_follow_waits_for_the_answer_as_before() {
        for head in [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\ncontent-length: 1, 2\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 99999999999999999999\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
        ] {
            let mut d = deadline();
            d.observe(head);
            assert_eq!(d.head, Head::Received, "{}", String::from_utf8_lossy(head));
            d.observe(b"1\r\nx\r\n0\r\n\r\n");
            assert_eq!(d.head, Head::Received, "the body is not a head");
            d.wrote();
            assert_eq!(d.head, Head::Between);
        }
        // The same length twice is one length; a long name is not a length.
        let mut d = deadline();
        d.observe(b"POST / HTTP/1.1\r\nContent-Length: 2\r\ncontent-length:2 \r\n\r\n");
        assert_eq!(d.head, Head::Body { remaining: 2 });
        let mut d = deadline();
        d.observe(b"POST / HTTP/1.1\r\nx-content-length-of-it: 2\r\n\r\n");
        assert_eq!(d.head, Head::Between);
    }

    #[tokio::test]
    async fn the_next_head_is_timed_from_its_first_byte_and_h2_is_left_alone() {
        let mut d = deadline();
        d.observe(b"GET / HTTP/1.1\r\n\r\n");
        d.head = Head::Between;
        assert!(d.timer.is_none());
        d.observe(b"G");
        assert!(matches!(d.head, Head::Receiving(_)));
        assert!(d.timer.is_some());

        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        for chunk in [1, 2, 5, preface.len()] {
            let mut d = deadline();
            for c in preface.chunks(chunk) {
                d.observe(c);
            }
            assert_eq!(d.head, Head::Off, "chunk {chunk}");
            assert!(d.timer.is_none());
        }
        // A slow client cannot turn the deadline off by starting like a preface.
        let mut d = deadline();
        for c in [&b"P"[..], b"R", b"I", b" GET"] {
            d.observe(c);
        }
        assert!(matches!(d.head, Head::Receiving(_)));
        assert!(d.timer.is_some());
    }
}
