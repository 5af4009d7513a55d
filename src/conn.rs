//! Client connection limits that act before Pingora has parsed a request: how many client
//! connections may be open at once (`limits.max_connections`), and how long a request
//! head may take to arrive (`limits.header_read_timeout`, against slowloris clients).
//!
//! Pingora 0.9.1 reads a request head with a timeout per read (60 s), not per head, and
//! offers no hook before the head is parsed. So [`EdgeApp`] wraps the proxy application:
//! it counts connections, and hands Pingora the client's stream wrapped in a
//! [`HeadDeadline`], which fails reads once a request head has taken too long.

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
            refuse(stream).await;
            return None;
        };
        let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
        if !h2 {
            stream = Box::new(HeadDeadline::new(stream, limits.header_read_timeout));
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

/// Where a connection is in its exchange of HTTP/1 request heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Head {
    /// Receiving a head; `newlines` counts the line ends since the last other byte (two
    /// in a row end the head).
    Receiving { newlines: u8 },
    /// The head arrived; the body and the answer follow.
    Received,
    /// An answer was written: the next byte read starts the next head.
    Between,
    /// Not HTTP/1 (an HTTP/2 preface): HTTP/2's own limits apply.
    Off,
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
    /// Bytes read by [`Peek::try_peek`], handed out again by the next reads.
    peeked: Vec<u8>,
}

impl HeadDeadline {
    pub fn new(inner: Stream, limit: Duration) -> HeadDeadline {
        HeadDeadline {
            inner,
            limit,
            head: Head::Receiving { newlines: 0 },
            timer: Some(Box::pin(tokio::time::sleep(limit))),
            start: Some(Vec::new()),
            peeked: Vec::new(),
        }
    }

    /// An answer is being written: the next byte read starts the next head.
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

    fn observe(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
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
        if self.head == Head::Between {
            self.head = Head::Receiving { newlines: 0 };
            self.timer = Some(Box::pin(tokio::time::sleep(self.limit)));
        }
        let Head::Receiving { mut newlines } = self.head else {
            return;
        };
        for &b in data {
            match b {
                b'\n' => {
                    newlines += 1;
                    if newlines == 2 {
                        self.head = Head::Received;
                        self.timer = None;
                        return;
                    }
                }
                b'\r' => {}
                _ => newlines = 0,
            }
        }
        self.head = Head::Receiving { newlines };
    }
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
        let before = buf.filled().len();
        ready!(Pin::new(&mut *this.inner).poll_read(cx, buf))?;
        this.observe(&buf.filled()[before..]);
        Poll::Ready(Ok(()))
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
                self.observe(&chunk[..n]);
                self.peeked.extend_from_slice(&chunk[..n]);
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
/// 5,000 idle connections; see `benches/RESULTS.md`).
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
        (HeadDeadline::new(Box::new(l4), Duration::from_secs(1)), b)
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
    async fn a_head_ends_at_an_empty_line_in_any_chunking() {
        let head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}";
        for chunk in 1..head.len() {
            let mut d = deadline();
            for c in head.chunks(chunk) {
                d.observe(c);
            }
            assert_eq!(d.head, Head::Received, "chunk {chunk}");
            assert!(d.timer.is_none());
        }
        let mut d = deadline();
        d.observe(b"GET / HTTP/1.1\nhost: x\n\n");
        assert_eq!(d.head, Head::Received, "bare line feeds");
        let mut d = deadline();
        d.observe(b"GET / HTTP/1.1\r\nhost: x\r\n");
        assert!(matches!(d.head, Head::Receiving { .. }));
        assert!(d.timer.is_some());
    }

    #[tokio::test]
    async fn the_next_head_is_timed_from_its_first_byte_and_h2_is_left_alone() {
        let mut d = deadline();
        d.observe(b"GET / HTTP/1.1\r\n\r\n");
        d.head = Head::Between;
        assert!(d.timer.is_none());
        d.observe(b"G");
        assert!(matches!(d.head, Head::Receiving { .. }));
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
        assert!(matches!(d.head, Head::Receiving { .. }));
        assert!(d.timer.is_some());
    }
}
