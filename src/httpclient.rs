//! A minimal HTTP/1.1 client for the gateway's own background requests to backends
//! (`/health`, `/v1/models`, `/metrics`, circuit-breaker probes): a deadline for the whole
//! exchange, and a cap on the response size so a hostile backend cannot exhaust memory.
//!
//! Uses the config's defaults and the types of `auth` and `tls`; nothing above.
//!
//! `GET`s reuse connections: each backend keeps a few open ([`KeptConnections`]), so the
//! scraper and health checker, which visit every backend several times a second, do not
//! open a connection each time (the attack run counted about 1,900 in four minutes to one
//! backend). A kept connection found closed by the backend before it answered is replaced
//! by a new one, once; `POST`s (probes, adapter loads) are not retried and use a
//! connection of their own.

use bytes::{Buf, Bytes, BytesMut};
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::auth::Secret;
use crate::tls::BackendTls;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed response: {0}")]
    Malformed(String),
    #[error("response larger than {0} bytes")]
    TooLarge(usize),
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Bytes,
}

/// Where a request goes: an address, over TLS for `https://` backends, with the backend's
/// key (`Authorization: Bearer`) if it has one, and the connections kept open to it.
#[derive(Clone, Copy)]
pub struct Target<'a> {
    pub addr: SocketAddr,
    pub key: Option<&'a Secret>,
    pub tls: Option<&'a BackendTls>,
    pub kept: Option<&'a KeptConnections>,
}

/// Idle connections to one backend, most recently used last.
#[derive(Debug, Default)]
pub struct KeptConnections {
    idle: Mutex<Vec<(Conn, Instant)>>,
}

impl KeptConnections {
    /// At most this many idle connections are kept: the scraper, the health checker and
    /// model discovery may ask at the same time.
    const MAX_IDLE: usize = 4;
    /// A connection idle longer is closed rather than reused (uvicorn closes idle
    /// connections after 5 s; see `config::defaults::POOL_IDLE_TIMEOUT`).
    const IDLE_FOR: Duration = crate::config::defaults::POOL_IDLE_TIMEOUT;

    /// The most recently used idle connection that is still open, if any.
    fn take(&self, now: Instant) -> Option<Conn> {
        let mut idle = self.idle.lock();
        while let Some((conn, since)) = idle.pop() {
            if now.saturating_duration_since(since) < Self::IDLE_FOR && conn.still_open() {
                return Some(conn);
            }
        }
        None
    }

    fn put(&self, conn: Conn, now: Instant) {
        let mut idle = self.idle.lock();
        if idle.len() == Self::MAX_IDLE {
            idle.remove(0);
        }
        idle.push((conn, now));
    }

    /// Idle connections held now.
    pub fn idle(&self) -> usize {
        self.idle.lock().len()
    }
}

/// A connection to a backend, plain or over TLS.
#[derive(Debug)]
enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Conn {
    /// Whether an idle connection can take a request: nothing has arrived on it (a
    /// backend that closed it sent its end; one that sent bytes unasked is not trusted).
    fn still_open(&self) -> bool {
        let tcp = match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_ref().0,
        };
        matches!(tcp.try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, data),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// `GET path` on `target`, the whole exchange bounded by `timeout`.
pub async fn get(
    target: Target<'_>,
    path: &str,
    timeout: Duration,
    max_body: usize,
) -> Result<Response, FetchError> {
    tokio::time::timeout(timeout, exchange(target, "GET", path, None, max_body))
        .await
        .map_err(|_| FetchError::Timeout(timeout))?
}

/// `POST path` on `target` with a JSON body, the whole exchange bounded by `timeout`.
pub async fn post_json(
    target: Target<'_>,
    path: &str,
    body: &[u8],
    timeout: Duration,
    max_body: usize,
) -> Result<Response, FetchError> {
    tokio::time::timeout(
        timeout,
        exchange(target, "POST", path, Some(body), max_body),
    )
    .await
    .map_err(|_| FetchError::Timeout(timeout))?
}

async fn exchange(
    target: Target<'_>,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    max_body: usize,
) -> Result<Response, FetchError> {
    let kept = target.kept.filter(|_| body.is_none());
    let host = match target.tls {
        None => target.addr.to_string(),
        Some(tls) => format!("{}:{}", tls.sni, target.addr.port()),
    };
    let ask = Ask {
        host: &host,
        key: target.key,
        method,
        path,
        body,
        max_body,
        keep: kept.is_some(),
    };
    if let Some(conn) = kept.and_then(|k| k.take(Instant::now())) {
        match talk(conn, &ask).await {
            Ok((resp, conn)) => {
                if let (Some(k), Some(c)) = (kept, conn) {
                    k.put(c, Instant::now());
                }
                return Ok(resp);
            }
            // Closed by the backend while idle, before it read the request: a new
            // connection, as any client does with a kept-alive one.
            Err(Failure::BeforeAnswer(_)) => {}
            Err(Failure::After(e)) => return Err(e),
        }
    }
    let conn = connect(target).await?;
    match talk(conn, &ask).await {
        Ok((resp, conn)) => {
            if let (Some(k), Some(c)) = (kept, conn) {
                k.put(c, Instant::now());
            }
            Ok(resp)
        }
        Err(Failure::BeforeAnswer(e) | Failure::After(e)) => Err(e),
    }
}

async fn connect(target: Target<'_>) -> Result<Conn, FetchError> {
    let addr = target.addr;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(FetchError::Connect)?;
    tcp.set_nodelay(true)?;
    let Some(tls) = target.tls else {
        return Ok(Conn::Plain(tcp));
    };
    let name = rustls::pki_types::ServerName::try_from(tls.sni.clone())
        .map_err(|e| FetchError::Tls(format!("`{}` is not a server name: {e}", tls.sni)))?;
    let stream = tokio_rustls::TlsConnector::from(tls.client.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| FetchError::Tls(e.to_string()))?;
    Ok(Conn::Tls(Box::new(stream)))
}

/// One request.
struct Ask<'a> {
    host: &'a str,
    key: Option<&'a Secret>,
    method: &'a str,
    path: &'a str,
    body: Option<&'a [u8]>,
    max_body: usize,
    /// Ask the backend to keep the connection open after answering.
    keep: bool,
}

/// How an exchange failed: before any byte of the answer (on a kept connection, the
/// backend may have closed it while idle), or after.
enum Failure {
    BeforeAnswer(FetchError),
    After(FetchError),
}

/// One request and its response over an open connection; the connection comes back when
/// it can take another request.
async fn talk(mut conn: Conn, ask: &Ask<'_>) -> Result<(Response, Option<Conn>), Failure> {
    let Ask {
        host,
        key,
        method,
        path,
        body,
        max_body,
        keep,
    } = *ask;
    let connection = if keep { "keep-alive" } else { "close" };
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: vllm-edge\r\nAccept: */*\r\nConnection: {connection}\r\n"
    )
    .into_bytes();
    if let Some(k) = key {
        req.extend_from_slice(format!("Authorization: Bearer {}\r\n", k.expose()).as_bytes());
    }
    if let Some(b) = body {
        req.extend_from_slice(
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            )
            .as_bytes(),
        );
    }
    req.extend_from_slice(b"\r\n");
    if let Some(b) = body {
        req.extend_from_slice(b);
    }
    conn.write_all(&req)
        .await
        .map_err(|e| Failure::BeforeAnswer(e.into()))?;

    let mut buf = BytesMut::with_capacity(8192);
    // Header.
    let (status, header_len, framing, close) = loop {
        match conn.read_buf(&mut buf).await {
            Ok(0) if buf.is_empty() => {
                return Err(Failure::BeforeAnswer(FetchError::Malformed(
                    "connection closed before the header".into(),
                )))
            }
            Err(e) if buf.is_empty() => return Err(Failure::BeforeAnswer(e.into())),
            Ok(0) => {
                return Err(Failure::After(FetchError::Malformed(
                    "connection closed in the header".into(),
                )))
            }
            Err(e) => return Err(Failure::After(e.into())),
            Ok(_) => {}
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => {
                let status = resp.code.unwrap_or(0);
                let framing = framing_of(resp.headers).map_err(Failure::After)?;
                let close = resp.version == Some(0)
                    || resp.headers.iter().any(|h| {
                        h.name.eq_ignore_ascii_case("connection")
                            && h.value.eq_ignore_ascii_case(b"close")
                    });
                break (status, n, framing, close);
            }
            Ok(httparse::Status::Partial) if buf.len() > 64 * 1024 => {
                return Err(Failure::After(FetchError::Malformed(
                    "header larger than 64 KiB".into(),
                )))
            }
            Ok(httparse::Status::Partial) => continue,
            Err(e) => return Err(Failure::After(FetchError::Malformed(e.to_string()))),
        }
    };
    buf.advance(header_len);
    let reusable = keep && !close && !matches!(framing, Framing::Close);
    let (body, clean) = read_body(&mut conn, buf, framing, max_body)
        .await
        .map_err(Failure::After)?;
    Ok((
        Response { status, body },
        (reusable && clean).then_some(conn),
    ))
}

/// The body after the header (`buf` holds what was read past it), and whether the
/// connection ended cleanly with it: no bytes past it, so it can take another request.
async fn read_body(
    conn: &mut Conn,
    mut buf: BytesMut,
    framing: Framing,
    max_body: usize,
) -> Result<(Bytes, bool), FetchError> {
    Ok(match framing {
        Framing::Length(n) => {
            if n > max_body {
                return Err(FetchError::TooLarge(max_body));
            }
            while buf.len() < n {
                if conn.read_buf(&mut buf).await? == 0 {
                    return Err(FetchError::Malformed(
                        "body shorter than Content-Length".into(),
                    ));
                }
            }
            let clean = buf.len() == n;
            buf.truncate(n);
            (buf.freeze(), clean)
        }
        Framing::Close => {
            while conn.read_buf(&mut buf).await? != 0 {
                if buf.len() > max_body {
                    return Err(FetchError::TooLarge(max_body));
                }
            }
            (buf.freeze(), false)
        }
        Framing::Chunked => read_chunked(conn, buf, max_body).await?,
    })
}

enum Framing {
    Length(usize),
    Chunked,
    Close,
}

fn framing_of(headers: &[httparse::Header]) -> Result<Framing, FetchError> {
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding")
            && String::from_utf8_lossy(h.value)
                .to_ascii_lowercase()
                .contains("chunked")
        {
            return Ok(Framing::Chunked);
        }
    }
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| FetchError::Malformed("bad Content-Length".into()))?;
            return Ok(Framing::Length(n));
        }
    }
    Ok(Framing::Close)
}

async fn read_chunked<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    mut buf: BytesMut,
    max_body: usize,
) -> Result<(Bytes, bool), FetchError> {
    let mut out = BytesMut::new();
    loop {
        let line = read_line(stream, &mut buf).await?;
        let line = std::str::from_utf8(&line)
            .map_err(|_| FetchError::Malformed("bad chunk size".into()))?;
        let size_hex = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| FetchError::Malformed(format!("bad chunk size `{size_hex}`")))?;
        if size == 0 {
            // Trailer fields, if any, up to the empty line that ends the body.
            while !read_line(stream, &mut buf).await?.is_empty() {}
            return Ok((out.freeze(), buf.is_empty()));
        }
        if out.len() + size > max_body {
            return Err(FetchError::TooLarge(max_body));
        }
        while buf.len() < size + 2 {
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(FetchError::Malformed("truncated chunk".into()));
            }
        }
        out.extend_from_slice(&buf[..size]);
        buf.advance(size + 2);
    }
}

/// The next CRLF-ended line of a chunked body (without its CRLF), taken from `buf`,
/// reading more as needed.
async fn read_line<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<Bytes, FetchError> {
    loop {
        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = buf.split_to(i).freeze();
            buf.advance(2);
            return Ok(line);
        }
        if buf.len() > 1024 {
            return Err(FetchError::Malformed("chunk size line too long".into()));
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(FetchError::Malformed("truncated chunked body".into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::net::TcpListener;

    fn target(addr: SocketAddr, kept: &KeptConnections) -> Target<'_> {
        Target {
            addr,
            key: None,
            tls: None,
            kept: Some(kept),
        }
    }

    /// A server that answers each connection's first request (`Connection: keep-alive`)
    /// and closes the connection when a second one comes, unanswered: the backend that
    /// closed a kept connection just as it was reused. Counts connections.
    async fn answers_once_per_connection() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = conn.read(&mut buf).await;
                    let _ = conn
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    let _ = conn.read(&mut buf).await;
                });
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn gets_reuse_one_connection() {
        let mut args = crate::sim::SimArgs::defaults();
        args.port = 0;
        let sim = crate::sim::spawn(args).await.unwrap();
        let kept = KeptConnections::default();
        for _ in 0..10 {
            let r = get(
                target(sim.addr, &kept),
                "/health",
                Duration::from_secs(2),
                1024,
            )
            .await
            .unwrap();
            assert_eq!(r.status, 200);
            let r = get(
                target(sim.addr, &kept),
                "/metrics",
                Duration::from_secs(2),
                1 << 20,
            )
            .await
            .unwrap();
            assert!(r.body.starts_with(b"#"), "{:?}", r.body);
        }
        assert_eq!(sim.sim.state()["connections"], 1);
        assert_eq!(kept.idle(), 1);
        // A POST is not sent on a kept connection, and its own is not kept.
        let r = post_json(
            target(sim.addr, &kept),
            "/v1/completions",
            br#"{"model":"sim-llama","prompt":"x","max_tokens":1}"#,
            Duration::from_secs(5),
            1 << 20,
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(sim.sim.state()["connections"], 2);
        assert_eq!(kept.idle(), 1);
    }

    #[tokio::test]
    async fn a_kept_connection_closed_by_the_backend_is_replaced() {
        let (addr, accepted) = answers_once_per_connection().await;
        let kept = KeptConnections::default();
        for n in 1..=3 {
            let r = get(target(addr, &kept), "/health", Duration::from_secs(2), 1024)
                .await
                .unwrap_or_else(|e| panic!("request {n}: {e}"));
            assert_eq!(&r.body[..], b"ok");
        }
        // Each reuse found the connection closed unanswered, and took a new one.
        assert_eq!(accepted.load(Ordering::Relaxed), 3);
    }
}
