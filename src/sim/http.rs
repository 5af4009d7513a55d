//! The simulator's HTTP/1.1 server: keep-alive connections, `Content-Length` request
//! bodies, full or chunked (streamed) responses, and the misbehaviours fault injection needs
//! (reset, stall). A client that closes its connection cancels its request: the handler's
//! future or the stream's sender is dropped, which is how the engine sees an abort.

use async_trait::async_trait;
use bytes::{Buf, Bytes, BytesMut};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// Requests larger than this are refused (the gateway's default cap is 32 MiB).
const MAX_BODY: usize = 64 * 1024 * 1024;
const MAX_HEADER: usize = 64 * 1024;

pub struct Request {
    pub method: String,
    /// The path without the query string.
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub enum Reply {
    Full {
        status: u16,
        content_type: &'static str,
        headers: Vec<(&'static str, String)>,
        body: Bytes,
    },
    /// A chunked response; each received item is written and flushed as one chunk. The
    /// stream ends cleanly when the sender is dropped, or abruptly on `StreamItem::Reset`.
    Stream {
        status: u16,
        content_type: &'static str,
        headers: Vec<(&'static str, String)>,
        rx: mpsc::Receiver<StreamItem>,
    },
    /// A header announcing all of `body`, half of it, then the connection closes.
    Cut {
        status: u16,
        content_type: &'static str,
        headers: Vec<(&'static str, String)>,
        body: Bytes,
    },
    /// Close the connection at once with a TCP reset, answering nothing.
    Reset,
    /// Answer nothing and keep the connection open until the client leaves.
    Stall,
}

pub enum StreamItem {
    Data(Bytes),
    /// Abort the connection mid-stream (no terminating chunk).
    Reset,
    /// Stop sending but keep the connection open until the client leaves.
    Hang,
}

impl Reply {
    pub fn json(status: u16, body: impl Into<Bytes>) -> Reply {
        Reply::Full {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body: body.into(),
        }
    }
}

#[async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(&self, req: Request) -> Reply;
    /// Called once per accepted connection.
    fn on_connection(&self) {}
    /// Called when a client closes its connection while its answer is pending.
    fn on_client_gone(&self) {}
}

/// Serves `listener` until `shutdown` turns true; then stops accepting and drops every
/// connection (which is what a killed process does).
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let mut conn_shutdown = shutdown.clone();
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    handler.on_connection();
                    let handler = handler.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = connection(stream, handler) => {}
                            _ = stopped(&mut conn_shutdown) => {}
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "sim accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            },
            _ = stopped(&mut shutdown) => return,
        }
    }
}

/// Resolves once shutdown is signalled (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

fn reset(stream: TcpStream) {
    // SO_LINGER 0: close() sends RST instead of FIN (and does not block).
    if let Err(e) = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO)) {
        tracing::debug!(error = %e, "set_linger");
    }
    drop(stream);
}

/// Reads one request head and body. `Ok(None)` when the client closed between requests.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
) -> std::io::Result<Option<Result<Request, (u16, &'static str)>>> {
    loop {
        if !buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; 96];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let target = req.path.unwrap_or("/");
                    let (path, query) = target.split_once('?').unwrap_or((target, ""));
                    let method = req.method.unwrap_or("GET").to_string();
                    let (path, query) = (path.to_string(), query.to_string());
                    let headers: Vec<(String, String)> = req
                        .headers
                        .iter()
                        .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into()))
                        .collect();
                    buf.advance(n);
                    let chunked = headers.iter().any(|(k, v)| {
                        k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked")
                    });
                    if chunked {
                        return Ok(Some(Err((411, "chunked request bodies are not supported"))));
                    }
                    let len = headers
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                        .map(|(_, v)| v.trim().parse::<usize>());
                    let len = match len {
                        None => 0,
                        Some(Ok(n)) if n <= MAX_BODY => n,
                        Some(Ok(_)) => return Ok(Some(Err((413, "request body too large")))),
                        Some(Err(_)) => return Ok(Some(Err((400, "bad content-length")))),
                    };
                    while buf.len() < len {
                        if stream.read_buf(buf).await? == 0 {
                            return Ok(None);
                        }
                    }
                    let body = buf.split_to(len).freeze();
                    return Ok(Some(Ok(Request {
                        method,
                        path,
                        query,
                        headers,
                        body,
                    })));
                }
                Ok(httparse::Status::Partial) if buf.len() > MAX_HEADER => {
                    return Ok(Some(Err((431, "request header too large"))))
                }
                Ok(httparse::Status::Partial) => {}
                Err(_) => return Ok(Some(Err((400, "malformed request")))),
            }
        }
        if stream.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// Resolves when the client closes its side (or the socket errors). Bytes it sends
/// meanwhile (a pipelined request) are kept in `buf`.
async fn client_gone(read: &mut OwnedReadHalf, buf: &mut BytesMut) {
    loop {
        match read.read_buf(buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) if buf.len() > MAX_HEADER => return,
            Ok(_) => {}
        }
    }
}

async fn connection<H: Handler>(stream: TcpStream, handler: Arc<H>) {
    let _ = stream.set_nodelay(true);
    let mut stream = stream;
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        let req = match read_request(&mut stream, &mut buf).await {
            Ok(Some(Ok(req))) => req,
            Ok(Some(Err((status, msg)))) => {
                let body = format!("{{\"error\":{{\"message\":\"{msg}\",\"type\":\"BadRequestError\",\"param\":null,\"code\":{status}}}}}");
                let head = format!(
                    "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    reason(status),
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
                return;
            }
            Ok(None) | Err(_) => return,
        };
        let close_after = req
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let head_only = req.method == "HEAD";
        // As vLLM's server with its default `--allowed-origins '["*"]'`.
        let cors = if req.header("origin").is_some() {
            "vary: Origin\r\naccess-control-allow-origin: *\r\n"
        } else {
            "vary: Origin\r\n"
        };

        let (mut read, mut write) = stream.into_split();
        // The handler runs until it answers or the client leaves (which drops it: abort).
        let reply = tokio::select! {
            reply = handler.handle(req) => reply,
            _ = client_gone(&mut read, &mut buf) => {
                handler.on_client_gone();
                return;
            }
        };
        let mut conn = Conn {
            read: &mut read,
            write: &mut write,
            buf: &mut buf,
            handler: &*handler,
        };
        match conn.send(reply, cors, head_only).await {
            After::Keep if !close_after => {}
            After::Keep | After::Close => return,
            After::Reset => {
                if let Ok(s) = read.reunite(write) {
                    reset(s);
                }
                return;
            }
        }
        stream = match read.reunite(write) {
            Ok(s) => s,
            Err(_) => return,
        };
    }
}

/// How writing an answer left its connection.
enum After {
    /// Ready for the next request.
    Keep,
    /// To be closed.
    Close,
    /// To be reset (no orderly end).
    Reset,
}

/// A connection between two requests, split for writing an answer while watching the
/// client.
struct Conn<'a, H> {
    read: &'a mut OwnedReadHalf,
    write: &'a mut tokio::net::tcp::OwnedWriteHalf,
    /// What the client sent past its request (a pipelined one).
    buf: &'a mut BytesMut,
    handler: &'a H,
}

/// A response head: status line, our server name, `framing` (a length or chunked), the
/// CORS fields, then the reply's own.
fn head(
    status: u16,
    content_type: &str,
    framing: &str,
    cors: &str,
    headers: Vec<(&'static str, String)>,
) -> BytesMut {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nserver: vllm-edge-sim\r\ncontent-type: {content_type}\r\n{framing}\r\n{cors}",
        reason(status)
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    BytesMut::from(head.as_bytes())
}

impl<H: Handler> Conn<'_, H> {
    async fn send(&mut self, reply: Reply, cors: &str, head_only: bool) -> After {
        match reply {
            Reply::Cut {
                status,
                content_type,
                headers,
                body,
            } => {
                let framing = format!("content-length: {}", body.len());
                let mut out = head(status, content_type, &framing, "", headers);
                out.extend_from_slice(&body[..body.len() / 2]);
                let _ = self.write.write_all(&out).await;
                After::Close
            }
            Reply::Full {
                status,
                content_type,
                headers,
                body,
            } => {
                let framing = format!("content-length: {}", body.len());
                let mut out = head(status, content_type, &framing, cors, headers);
                if !head_only {
                    out.extend_from_slice(&body);
                }
                match self.write.write_all(&out).await {
                    Ok(()) => After::Keep,
                    Err(_) => After::Close,
                }
            }
            Reply::Stream {
                status,
                content_type,
                headers,
                rx,
            } => {
                let out = head(
                    status,
                    content_type,
                    "transfer-encoding: chunked",
                    cors,
                    headers,
                );
                if self.write.write_all(&out).await.is_err() {
                    return After::Close;
                }
                self.stream(rx).await
            }
            Reply::Reset => After::Reset,
            Reply::Stall => {
                client_gone(self.read, self.buf).await;
                After::Close
            }
        }
    }

    /// A chunked body, a chunk per item, until the sender ends it (or a fault does).
    async fn stream(&mut self, mut rx: mpsc::Receiver<StreamItem>) -> After {
        loop {
            let item = tokio::select! {
                item = rx.recv() => item,
                _ = client_gone(self.read, self.buf) => {
                    self.handler.on_client_gone();
                    return After::Close;
                }
            };
            match item {
                Some(StreamItem::Data(data)) => {
                    if data.is_empty() {
                        continue;
                    }
                    let mut chunk = BytesMut::with_capacity(data.len() + 16);
                    chunk.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                    chunk.extend_from_slice(&data);
                    chunk.extend_from_slice(b"\r\n");
                    if self.write.write_all(&chunk).await.is_err() {
                        return After::Close;
                    }
                }
                Some(StreamItem::Reset) => return After::Reset,
                Some(StreamItem::Hang) => {
                    client_gone(self.read, self.buf).await;
                    return After::Close;
                }
                None => break,
            }
        }
        match self.write.write_all(b"0\r\n\r\n").await {
            Ok(()) => After::Keep,
            Err(_) => After::Close,
        }
    }
}
