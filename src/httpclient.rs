//! A minimal HTTP/1.1 client for the gateway's own background requests to backends
//! (`/health`, `/v1/models`, `/metrics`, circuit-breaker probes): one request per connection, a deadline
//! for the whole exchange, and a cap on the response size so a hostile backend cannot
//! exhaust memory.

use bytes::{Buf, Bytes, BytesMut};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::Secret;
use crate::fleet::Backend;
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
/// key (`Authorization: Bearer`) if it has one.
#[derive(Clone, Copy)]
pub struct Target<'a> {
    pub addr: SocketAddr,
    pub key: Option<&'a Secret>,
    pub tls: Option<&'a BackendTls>,
}

impl<'a> Target<'a> {
    pub fn of(b: &'a Backend) -> Target<'a> {
        Target {
            addr: b.addr,
            key: b.api_key.as_ref(),
            tls: b.tls.as_ref(),
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
    let addr = target.addr;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(FetchError::Connect)?;
    tcp.set_nodelay(true)?;
    let Some(tls) = target.tls else {
        let host = addr.to_string();
        return talk(tcp, &host, target.key, method, path, body, max_body).await;
    };
    let name = rustls::pki_types::ServerName::try_from(tls.sni.clone())
        .map_err(|e| FetchError::Tls(format!("`{}` is not a server name: {e}", tls.sni)))?;
    let stream = tokio_rustls::TlsConnector::from(tls.client.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| FetchError::Tls(e.to_string()))?;
    let host = format!("{}:{}", tls.sni, addr.port());
    talk(stream, &host, target.key, method, path, body, max_body).await
}

/// One request and its response over an open connection.
async fn talk<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    host: &str,
    key: Option<&Secret>,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    max_body: usize,
) -> Result<Response, FetchError> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: vllm-edge\r\nAccept: */*\r\nConnection: close\r\n"
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
    stream.write_all(&req).await?;

    let mut buf = BytesMut::with_capacity(8192);
    // Header.
    let (status, header_len, framing) = loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(FetchError::Malformed(
                "connection closed before the header".into(),
            ));
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => {
                let status = resp.code.unwrap_or(0);
                let framing = framing_of(resp.headers)?;
                break (status, n, framing);
            }
            Ok(httparse::Status::Partial) if buf.len() > 64 * 1024 => {
                return Err(FetchError::Malformed("header larger than 64 KiB".into()))
            }
            Ok(httparse::Status::Partial) => continue,
            Err(e) => return Err(FetchError::Malformed(e.to_string())),
        }
    };
    buf.advance(header_len);

    let body = match framing {
        Framing::Length(n) => {
            if n > max_body {
                return Err(FetchError::TooLarge(max_body));
            }
            while buf.len() < n {
                if stream.read_buf(&mut buf).await? == 0 {
                    return Err(FetchError::Malformed(
                        "body shorter than Content-Length".into(),
                    ));
                }
            }
            buf.truncate(n);
            buf.freeze()
        }
        Framing::Close => {
            while stream.read_buf(&mut buf).await? != 0 {
                if buf.len() > max_body {
                    return Err(FetchError::TooLarge(max_body));
                }
            }
            buf.freeze()
        }
        Framing::Chunked => read_chunked(&mut stream, buf, max_body).await?,
    };
    Ok(Response { status, body })
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
) -> Result<Bytes, FetchError> {
    let mut out = BytesMut::new();
    loop {
        // Chunk size line.
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            if buf.len() > 1024 {
                return Err(FetchError::Malformed("chunk size line too long".into()));
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(FetchError::Malformed("truncated chunked body".into()));
            }
        };
        let line = std::str::from_utf8(&buf[..line_end])
            .map_err(|_| FetchError::Malformed("bad chunk size".into()))?;
        let size_hex = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| FetchError::Malformed(format!("bad chunk size `{size_hex}`")))?;
        buf.advance(line_end + 2);
        if size == 0 {
            return Ok(out.freeze());
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
