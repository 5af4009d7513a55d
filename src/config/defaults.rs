//! Every default in one place. The comments say what each prevents.

use std::time::Duration;

use super::Policy;

pub const LISTEN: &str = "127.0.0.1:8080";
pub const ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// Large prompts (long documents, many-shot) routinely exceed a few MiB.
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// A client that trickles its body this long is holding a slot for nothing.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Past `BODY_READ_TIMEOUT`, the slowest average a body may keep to (bytes a second):
/// half a megabit, so a 25 MB audio upload over a slow uplink gets through (in about
/// six minutes) while a body trickled to hold a connection does not.
pub const BODY_MIN_RATE: usize = 64 * 1024;
/// A request head (request line and headers). Real clients send a few hundred bytes;
/// 64 KiB leaves room for long cookies and tracing headers. Pingora's own ceiling is
/// `MAX_HEADER_BYTES_CEILING`.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
pub const MAX_HEADER_BYTES_CEILING: usize = 1_048_575;
/// Header fields in one request (hyper's default; Pingora refuses more than 256).
pub const MAX_HEADERS: usize = 100;
pub const MAX_HEADERS_CEILING: usize = 256;
/// From a connection's first byte (or a kept-alive one's next request's first byte) to
/// the end of the request head. A head is at most 64 KiB: any client sends it within
/// a second; a slowloris client trickling it holds a connection for nothing.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A kept-alive client connection waiting for its next request (Pingora's default).
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Client connections open at once; more are answered 503 and closed. Each costs a
/// descriptor (two while proxied), so the process's descriptor limit is raised to fit.
pub const MAX_CONNECTIONS: usize = 8_192;
/// Concurrent streams on one HTTP/2 connection (nginx's default).
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 128;
/// Nesting of a request body's JSON. Chat requests with tool schemas stay far below;
/// deeper documents are refused before they reach a replica's parser.
/// serde_json refuses more than `MAX_JSON_DEPTH_CEILING` anyway.
pub const MAX_JSON_DEPTH: usize = 64;
pub const MAX_JSON_DEPTH_CEILING: usize = 128;
/// Short, so a dead replica is left quickly for another one.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Streams: the first token, queueing included. vLLM queues rather than refusing, so
/// a loaded fleet legitimately takes a while; a stalled engine takes forever.
pub const STREAM_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(120);
/// Streams: between two chunks. Tokens come every few ms; a long pause (preemption,
/// a huge prefill in the same batch) is seconds, not a minute.
pub const STREAM_CHUNK_GAP_TIMEOUT: Duration = Duration::from_secs(60);
/// Non-streaming requests send nothing until the whole generation is done, so their
/// first byte is also their last.
pub const NON_STREAM_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(600);
pub const NON_STREAM_TOTAL_TIMEOUT: Duration = Duration::from_secs(600);
/// Retries may not exceed this fraction of the requests of the last 10 s...
pub const RETRY_BUDGET_RATIO: f64 = 0.2;
/// ...plus this many, so a quiet gateway can still retry.
pub const RETRY_BUDGET_MIN: u32 = 10;
/// Active checks: `GET /health` this often, each allowed this long.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Consecutive failed checks that take a backend out (one lost packet must not).
pub const UNHEALTHY_THRESHOLD: u32 = 2;
/// Consecutive passed checks that bring it back: a replica still loading or flapping
/// is not sent traffic on its first good answer.
pub const HEALTHY_THRESHOLD: u32 = 2;
/// Consecutive failed requests (connect, reset, 5xx, timeout) that open the circuit.
pub const FAILURE_THRESHOLD: u32 = 3;
/// How long an open circuit stays open before a probe request is sent.
pub const OPEN_DURATION: Duration = Duration::from_secs(5);
/// Below uvicorn's 5 s keep-alive, or pooled connections are closed under us.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Flow control is on: it does nothing until every replica of a model is full, and then
/// it is what keeps one flooding key from taking the whole fleet.
pub const FLOW_ENABLED: bool = true;
/// Requests waiting at the gateway for one model. Each holds a client connection and its
/// body (a few KiB); a queue longer than this waits longer than any client will.
pub const FLOW_MAX_QUEUED: usize = 1024;
/// The longest a request waits at the gateway for a free slot, per class, before it is
/// answered 503 (or 429 when its key sends more than its share): well inside the
/// first-token timeouts clients use (the openai SDK's is 600 s, users' far less).
pub const FLOW_MAX_WAIT: Duration = Duration::from_secs(30);
/// The vLLM-aware policy: the point of this gateway.
pub const POLICY: Policy = Policy::Vllm;
/// A backend's relative speed when the config gives none.
pub const BACKEND_WEIGHT: f64 = 1.0;
/// One first try plus two retries on other replicas; more only hammers a sick fleet.
pub const MAX_ATTEMPTS: u32 = 3;
pub const MODELS_INTERVAL: Duration = Duration::from_secs(5);
/// Load moves within a second on a busy replica; a quarter second keeps the picture
/// current without loading the engine's API server.
pub const SCRAPE_INTERVAL: Duration = Duration::from_millis(250);
/// A `/metrics` answer slower than this is a failed scrape (it must never hold back
/// the next one).
pub const SCRAPE_TIMEOUT: Duration = Duration::from_millis(500);
/// A backend's scrape older than this many intervals is stale: it is then scored from
/// this gateway's own accounting only.
pub const STALE_AFTER_INTERVALS: u32 = 4;
pub const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a backend host name is resolved again: a replica restarted elsewhere (a
/// Kubernetes pod gets a new address) is found without a reload.
pub const DNS_INTERVAL: Duration = Duration::from_secs(10);
/// SIGTERM waits this long for in-flight streams.
pub const GRACE_PERIOD: Duration = Duration::from_secs(30);
pub const GRACEFUL_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Where a running gateway hands its listening sockets to its successor (an upgrade).
pub const UPGRADE_SOCK: &str = "/tmp/vllm-edge-upgrade.sock";
pub const UPSTREAM_KEEPALIVE_POOL: usize = 256;
/// Prefix affinity with the `vllm` policy: a stateless key, preferred when it is cheap.
pub const AFFINITY_ENABLED: bool = true;
/// A key's home takes the request unless its load is above this factor of the mean
/// (the bound of "consistent hashing with bounded loads": 1.25 keeps every backend
/// within a quarter of the average while moving few keys).
pub const AFFINITY_LOAD_FACTOR: f64 = 1.25;
/// Leading bytes of a conversation (through its first user turn) or of a prompt that
/// make its key: about 1,000 tokens. A longer shared system prompt is a key by itself
/// (its requests share the cached prompt); a shorter one is keyed with the first user
/// turn (each conversation keeps its replica).
pub const AFFINITY_PREFIX_BYTES: usize = 4096;
pub const AFFINITY_SESSION_HEADER: &str = "x-session-id";
/// The share of a backend's KV cache that the long-lived prefixes homed on it may
/// fill; the rest is for the running requests' own tokens (see `affinity::Placer`).
pub const AFFINITY_KV_SHARE: f64 = 0.6;
/// A key in use this long is long-lived (a shared system prompt, a long session),
/// unlike a short conversation, whose prefix leaves the cache soon anyway.
pub const AFFINITY_LONG_LIVED_AFTER: Duration = Duration::from_secs(20);
/// An affinity key not seen for this long is forgotten (its prefix has likely left the
/// cache, and it no longer counts against its home's share).
pub const AFFINITY_KEY_IDLE: Duration = Duration::from_secs(60);

/// The longest an admission waits for the Redis that shares key limits (`auth.shared`)
/// before the fallback: Redis answers in well under a millisecond on a LAN.
pub const SHARED_LIMITS_TIMEOUT: Duration = Duration::from_millis(100);

/// The share of new traces sampled when `tracing.otlp` is on (a caller's own decision,
/// in its `traceparent`, is always followed): all, as OpenTelemetry's default sampler.
pub const OTLP_SAMPLE_RATIO: f64 = 1.0;

pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
