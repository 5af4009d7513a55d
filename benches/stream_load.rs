//! The streaming benchmark's load side (`benches/stream-cost.sh` drives it): a backend
//! that streams vLLM-sized chat chunks at a fixed rate per stream, and a client that holds
//! N streams open through a router and counts what arrives. One process on one thread
//! (the driver pins it to the load core): backend and client share one event loop, and
//! neither is Python, which could not keep a router busy (see the driver's `direct` row:
//! the load side alone relays several times what any router does).
//!
//! Each event is one HTTP chunk of a `data:` line shaped like vLLM 0.32's chat chunks
//! (~250 bytes; its `id` carries the send time, so the client measures each event's
//! transit). The backend answers every other path with a model list (or, for `/metrics`,
//! an idle vLLM's metrics, from the test fixtures), so every router's probes pass.
//!
//! Protocol, one JSON object per line. At start it prints `{"backend": PORT}`. Then, on
//! stdin:
//! - `{"op": "open", "url": "HOST:PORT", "streams": N, "rate": R}` opens N streams (each
//!   sent R events per second, phases spread), waits for each one's first event, answers
//!   `{"open": n, "failed": f, "error": "..."}`;
//! - `{"op": "measure", "seconds": T}` counts the events that arrive in T seconds and
//!   their transit (send to arrival), answers `{"events", "seconds", "p50_us", "p99_us",
//!   "open"}`;
//! - `{"op": "close"}` closes every stream, answers `{"closed": n}`.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const METRICS: &str = include_str!("../tests/fixtures/vllm-0.32/metrics-idle.txt");
const MODELS: &str = r#"{"object":"list","data":[{"id":"m","object":"model","owned_by":"vllm"}]}"#;
/// Transit histogram: 10 µs buckets up to 500 ms, then one overflow bucket.
const BUCKET_US: u64 = 10;
const BUCKETS: usize = 50_000;

/// Process-wide clock: backend and client are one process, so the send time in an event
/// and the arrival time are on the same clock.
fn now_ns(base: Instant) -> u64 {
    base.elapsed().as_nanos() as u64
}

/// One event as vLLM 0.32 sends a chat chunk, framed as one HTTP/1.1 chunk; its `id`
/// holds the send time in ns (32 digits where vLLM has 32 hex digits), written over the
/// zeros of [`Event::template`], so an event costs the load side a copy, not a format.
struct Event {
    template: Vec<u8>,
    /// Where the 32 digits start.
    at: usize,
}

impl Event {
    fn new() -> Event {
        let data = format!(
            "data: {{\"id\":\"chatcmpl-{:032}\",\"object\":\"chat.completion.chunk\",\"created\":1764806400,\"model\":\"meta-llama/Llama-3.1-8B-Instruct\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" token\"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n",
            0
        );
        let template = format!("{:x}\r\n{data}\r\n", data.len()).into_bytes();
        let at = memchr::memmem::find(&template, b"chatcmpl-").unwrap() + 9;
        Event { template, at }
    }

    fn write(&self, buf: &mut Vec<u8>, mut sent_ns: u64) {
        buf.clear();
        buf.extend_from_slice(&self.template);
        for d in buf[self.at..self.at + 32].iter_mut().rev() {
            *d = b'0' + (sent_ns % 10) as u8;
            sent_ns /= 10;
        }
    }
}

struct Stats {
    events: u64,
    hist: Vec<u64>,
    counting: bool,
}

impl Stats {
    fn record(&mut self, transit_ns: u64) {
        if self.counting {
            self.events += 1;
            let b = ((transit_ns / 1000) / BUCKET_US) as usize;
            self.hist[b.min(BUCKETS)] += 1;
        }
    }

    fn percentile(&self, q: f64) -> Option<u64> {
        let total: u64 = self.hist.iter().sum();
        if total == 0 {
            return None;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.hist.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Some(i as u64 * BUCKET_US + BUCKET_US / 2);
            }
        }
        None
    }
}

async fn serve(mut s: TcpStream, base: Instant, rate: Rc<RefCell<f64>>) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::with_capacity(4096);
    let mut tmp = [0u8; 4096];
    loop {
        // One request head (and its body, by Content-Length).
        let head_end = loop {
            if let Some(i) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        }
        buf.drain(..head_end + len);
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        if !path.starts_with("/v1/chat/completions") {
            let (ctype, body) = if path.starts_with("/metrics") {
                ("text/plain; version=0.0.4", METRICS)
            } else {
                ("application/json", MODELS)
            };
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if s.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
            continue;
        }
        // A stream that lasts until the client goes: R events a second, starting at a
        // random phase so that streams opened together do not tick together.
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";
        if s.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let period = Duration::from_secs_f64(1.0 / rate.borrow().max(0.001));
        let phase = period.mul_f64(rand::random::<f64>());
        let mut tick = tokio::time::interval_at((Instant::now() + phase).into(), period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ev = Event::new();
        let mut out = Vec::with_capacity(ev.template.len());
        // The first event at once: the client waits for it to count the stream open.
        let mut first = true;
        loop {
            if !first {
                tick.tick().await;
            }
            first = false;
            ev.write(&mut out, now_ns(base));
            if s.write_all(&out).await.is_err() {
                return;
            }
        }
    }
}

/// One client stream: sends the request, then counts events until `stop`.
async fn client(
    mut s: TcpStream,
    host: String,
    base: Instant,
    stats: Rc<RefCell<Stats>>,
    first: tokio::sync::mpsc::Sender<Result<(), String>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let _ = s.set_nodelay(true);
    // With `include_usage`, as vLLM's own benchmark client sends it: the gateway then
    // keeps each stream's tail to read the usage from its last event.
    let body = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"max_tokens":100000,"messages":[{"role":"user","content":"Tell me a long story."}]}"#;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\naccept: text/event-stream\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = s.write_all(req.as_bytes()).await {
        let _ = first.send(Err(e.to_string())).await;
        return;
    }
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut got_first = false;
    let mut head_done = false;
    let needle = memchr::memmem::Finder::new(b"chatcmpl-");
    loop {
        let n = tokio::select! {
            _ = stop.changed() => return,
            r = s.read_buf(&mut buf) => r,
        };
        let n = match n {
            Ok(0) | Err(_) => {
                if !got_first {
                    let why = String::from_utf8_lossy(&buf[..buf.len().min(200)]).to_string();
                    let _ = first
                        .send(Err(format!("closed before an event: {why}")))
                        .await;
                }
                return;
            }
            Ok(n) => n,
        };
        let _ = n;
        if !head_done {
            let Some(i) = memchr::memmem::find(&buf, b"\r\n\r\n") else {
                continue;
            };
            if !buf.starts_with(b"HTTP/1.1 200") {
                let why = String::from_utf8_lossy(&buf[..i]).to_string();
                let _ = first.send(Err(why)).await;
                return;
            }
            head_done = true;
            buf.drain(..i + 4);
        }
        // Complete events only: up to the last blank line.
        let Some(end) = memchr::memmem::rfind(&buf, b"\n\n") else {
            continue;
        };
        let now = now_ns(base);
        {
            let mut st = stats.borrow_mut();
            for at in needle.find_iter(&buf[..end]) {
                let digits = &buf[at + 9..(at + 9 + 32).min(end)];
                let sent = digits
                    .iter()
                    .take_while(|c| c.is_ascii_digit())
                    .fold(0u64, |a, &c| a * 10 + u64::from(c - b'0'));
                st.record(now.saturating_sub(sent));
            }
        }
        buf.drain(..end + 2);
        if !got_first {
            got_first = true;
            let _ = first.send(Ok(())).await;
        }
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, run());
}

async fn run() {
    let base = Instant::now();
    let rate = Rc::new(RefCell::new(1.0f64));
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_reuse_address(true).unwrap();
    sock.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    sock.listen(16384).unwrap();
    sock.set_nonblocking(true).unwrap();
    let listener = TcpListener::from_std(sock.into()).unwrap();
    let port = listener.local_addr().unwrap().port();
    {
        let rate = rate.clone();
        tokio::task::spawn_local(async move {
            loop {
                match listener.accept().await {
                    Ok((s, _)) => {
                        tokio::task::spawn_local(serve(s, base, rate.clone()));
                    }
                    // A refused or aborted connection, or descriptors running out for a
                    // moment: the listener stays.
                    Err(e) => {
                        eprintln!("stream_load: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
    }
    println!("{}", serde_json::json!({ "backend": port }));
    let stats = Rc::new(RefCell::new(Stats {
        events: 0,
        hist: vec![0; BUCKETS + 1],
        counting: false,
    }));
    let (stop_tx, _) = tokio::sync::watch::channel(false);
    let mut stop_tx = stop_tx;
    let mut open = 0usize;
    let mut clients: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(cmd) = serde_json::from_str::<serde_json::Value>(&line) else {
            println!(
                "{}",
                serde_json::json!({"error": format!("not JSON: {line}")})
            );
            continue;
        };
        let reply = match cmd["op"].as_str() {
            Some("open") => {
                let url = cmd["url"].as_str().unwrap_or_default().to_string();
                let n = cmd["streams"].as_u64().unwrap_or(1) as usize;
                *rate.borrow_mut() = cmd["rate"].as_f64().unwrap_or(1.0);
                let (first_tx, mut first_rx) = tokio::sync::mpsc::channel(1024);
                // At most 256 connecting at once.
                let (mut ok, mut failed, mut error) = (0usize, 0usize, String::new());
                let mut pending = 0usize;
                let mut started = 0usize;
                let deadline = Instant::now() + Duration::from_secs(120);
                while ok + failed < n && Instant::now() < deadline {
                    while started < n && pending < 256 {
                        started += 1;
                        pending += 1;
                        let (url, stats, tx, stop) = (
                            url.clone(),
                            stats.clone(),
                            first_tx.clone(),
                            stop_tx.subscribe(),
                        );
                        clients.push(tokio::task::spawn_local(async move {
                            match TcpStream::connect(&url).await {
                                Ok(s) => client(s, url, base, stats, tx, stop).await,
                                Err(e) => {
                                    let _ = tx.send(Err(e.to_string())).await;
                                }
                            }
                        }));
                    }
                    match tokio::time::timeout(Duration::from_secs(30), first_rx.recv()).await {
                        Ok(Some(Ok(()))) => ok += 1,
                        Ok(Some(Err(e))) => {
                            failed += 1;
                            error = e;
                        }
                        _ => break,
                    }
                    pending -= 1;
                }
                open += ok;
                serde_json::json!({"open": ok, "failed": failed + (n - ok - failed), "error": error})
            }
            Some("measure") => {
                let secs = cmd["seconds"].as_f64().unwrap_or(5.0);
                {
                    let mut st = stats.borrow_mut();
                    st.events = 0;
                    st.hist.iter_mut().for_each(|b| *b = 0);
                    st.counting = true;
                }
                let t0 = Instant::now();
                tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                let took = t0.elapsed().as_secs_f64();
                let mut st = stats.borrow_mut();
                st.counting = false;
                serde_json::json!({
                    "events": st.events, "seconds": took, "open": open,
                    "p50_us": st.percentile(0.5), "p99_us": st.percentile(0.99),
                })
            }
            Some("close") => {
                let _ = stop_tx.send(true);
                let (tx, _) = tokio::sync::watch::channel(false);
                stop_tx = tx;
                let closed = open;
                open = 0;
                // Answered once every stream is closed.
                for c in clients.drain(..) {
                    let _ = c.await;
                }
                serde_json::json!({ "closed": closed })
            }
            _ => serde_json::json!({"error": format!("unknown op in {line}")}),
        };
        println!("{reply}");
    }
}
