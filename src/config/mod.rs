//! The configuration file: its YAML schema, parsing with precise errors, validation,
//! and the one home of every default.
//!
//! `FileConfig` mirrors the file (unknown keys are errors); `Config` is the validated form
//! the rest of the gateway runs on. Values that can be checked on their own (addresses,
//! URLs, sizes, durations) are checked while deserializing, so their errors carry the exact
//! line and column; checks that need several keys name the key path and its line.

use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::auth::{ApiKeys, Secret};
use crate::cors::Cors;
use crate::fleet::health::HealthPolicy;
use crate::tls::{client_config, BackendTls, LoadedCert, TlsFiles};

/// Every default in one place. The comments say what each prevents.
pub mod defaults {
    use std::time::Duration;

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

    pub fn threads() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

// ---------------------------------------------------------------------------------------
// File schema
// ---------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    listeners: Option<Vec<FileListener>>,
    #[serde(default)]
    admin: Option<FileAdmin>,
    #[serde(default)]
    backends: Vec<FileBackend>,
    #[serde(default)]
    routing: FileRouting,
    #[serde(default)]
    limits: FileLimits,
    #[serde(default)]
    timeouts: FileTimeouts,
    #[serde(default)]
    upstream: FileUpstream,
    #[serde(default)]
    discovery: FileDiscovery,
    #[serde(default)]
    health: FileHealth,
    #[serde(default)]
    server: FileServer,
    #[serde(default)]
    auth: FileAuth,
    #[serde(default)]
    cors: FileCors,
    #[serde(default)]
    log: FileLog,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCors {
    /// Origins whose pages may call the gateway (`*` for any); none: CORS is off.
    #[serde(default)]
    allowed_origins: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLog {
    #[serde(default)]
    format: Option<LogFormat>,
    #[serde(default)]
    access: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileListener {
    address: ListenAddr,
    /// Terminate TLS here with this certificate chain and key (PEM files).
    #[serde(default)]
    tls: Option<FileTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert: String,
    key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    address: ListenAddr,
    /// A file holding the token the admin API requires (`Authorization: Bearer`).
    #[serde(default)]
    token_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAuth {
    /// Clients must present one of the keys in this file.
    #[serde(default)]
    api_keys_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackend {
    url: BackendUrl,
    #[serde(default)]
    name: Option<String>,
    /// Models this backend serves. When set, discovery through `/v1/models` is skipped.
    #[serde(default)]
    models: Option<Vec<String>>,
    /// Relative speed, used until the backend's own latency has been measured.
    #[serde(default)]
    weight: Option<f64>,
    /// Requests above which the backend counts as saturated.
    #[serde(default)]
    max_concurrent_requests: Option<u32>,
    /// No new requests; in-flight ones finish.
    #[serde(default)]
    drain: bool,
    /// A file holding the key this backend requires (`vllm serve --api-key`).
    #[serde(default)]
    api_key_file: Option<String>,
    /// `https://` backends: verify the certificate (default true).
    #[serde(default)]
    tls_verify: Option<bool>,
    /// A host name's addresses: the first is the backend (`first`), or each is one
    /// (`all`: a Kubernetes headless Service, one address per replica).
    #[serde(default)]
    addresses: Addresses,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Addresses {
    #[default]
    First,
    All,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRouting {
    #[serde(default)]
    policy: Option<Policy>,
    #[serde(default)]
    default_model: Option<String>,
    #[serde(default)]
    model_aliases: BTreeMap<String, String>,
    #[serde(default)]
    affinity: FileAffinity,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAffinity {
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    load_factor: Option<f64>,
    #[serde(default)]
    prefix_bytes: Option<ByteSize>,
    #[serde(default)]
    session_header: Option<String>,
    #[serde(default)]
    kv_share: Option<f64>,
    #[serde(default)]
    long_lived_after: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    #[serde(default)]
    max_body_size: Option<ByteSize>,
    #[serde(default)]
    body_read_timeout: Option<HumanDuration>,
    #[serde(default)]
    body_min_rate: Option<ByteSize>,
    #[serde(default)]
    max_header_size: Option<ByteSize>,
    #[serde(default)]
    max_header_count: Option<usize>,
    #[serde(default)]
    header_read_timeout: Option<HumanDuration>,
    #[serde(default)]
    keepalive_timeout: Option<HumanDuration>,
    #[serde(default)]
    max_connections: Option<usize>,
    #[serde(default)]
    h2_max_concurrent_streams: Option<u32>,
    #[serde(default)]
    max_json_depth: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTimeouts {
    #[serde(default)]
    connect: Option<HumanDuration>,
    #[serde(default)]
    stream_first_byte: Option<HumanDuration>,
    #[serde(default)]
    stream_chunk_gap: Option<HumanDuration>,
    #[serde(default)]
    non_stream_first_byte: Option<HumanDuration>,
    #[serde(default)]
    non_stream_total: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstream {
    #[serde(default)]
    pool_idle_timeout: Option<HumanDuration>,
    #[serde(default)]
    max_attempts: Option<u32>,
    #[serde(default)]
    keepalive_pool_size: Option<usize>,
    #[serde(default)]
    retry_budget: Option<f64>,
    #[serde(default)]
    retry_budget_min: Option<u32>,
    /// CA certificates (PEM) that `https://` backends' certificates are checked against.
    #[serde(default)]
    ca_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHealth {
    #[serde(default)]
    interval: Option<HumanDuration>,
    #[serde(default)]
    timeout: Option<HumanDuration>,
    #[serde(default)]
    unhealthy_threshold: Option<u32>,
    #[serde(default)]
    healthy_threshold: Option<u32>,
    #[serde(default)]
    failure_threshold: Option<u32>,
    #[serde(default)]
    open_duration: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDiscovery {
    #[serde(default)]
    scrape_interval: Option<HumanDuration>,
    #[serde(default)]
    scrape_timeout: Option<HumanDuration>,
    #[serde(default)]
    models_interval: Option<HumanDuration>,
    #[serde(default)]
    timeout: Option<HumanDuration>,
    #[serde(default)]
    dns_interval: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    #[serde(default)]
    threads: Option<usize>,
    #[serde(default)]
    grace_period: Option<HumanDuration>,
    #[serde(default)]
    graceful_shutdown_timeout: Option<HumanDuration>,
    #[serde(default)]
    upgrade_sock: Option<String>,
}

// ---------------------------------------------------------------------------------------
// Validated configuration
// ---------------------------------------------------------------------------------------

/// Selection policy names as written in `routing.policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    RoundRobin,
    LeastRequest,
    PowerOfTwo,
    Vllm,
    /// Prefix affinity alone: the key's home unless overloaded (for comparison with
    /// `vllm`, which combines the two).
    Affinity,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round-robin",
            Policy::LeastRequest => "least-request",
            Policy::PowerOfTwo => "power-of-two",
            Policy::Vllm => "vllm",
            Policy::Affinity => "affinity",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How log lines are written (`log.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, fields at the top level (for log shippers).
    Json,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Where the file came from, for messages.
    pub source: PathBuf,
    pub listeners: Vec<Listener>,
    pub admin: SocketAddr,
    /// The admin API's token; without one, the admin API is open to whoever reaches it.
    pub admin_token: Option<Secret>,
    /// The keys clients must present; `None` means no authentication.
    pub api_keys: Option<Arc<ApiKeys>>,
    /// Cross-origin requests from web pages; `None`: off (see `cors.rs`).
    pub cors: Option<Cors>,
    pub backends: Vec<BackendConfig>,
    /// The `addresses: all` entries, each the model of its backends (see
    /// [`BackendConfig::at`]); they may have none at a time.
    pub groups: Vec<BackendConfig>,
    /// The other entries whose host name had no address when the file was read (a
    /// replica not up yet, a DNS record not published yet): each becomes a backend under
    /// its own name once its name resolves (`crate::server::reload`). Until then `addr` is
    /// unspecified and nothing is sent to it.
    pub unresolved: Vec<BackendConfig>,
    pub policy: Policy,
    /// The model of a request that names none (`routing.default_model`); `None`: the
    /// one model every replica in rotation serves first
    /// ([`crate::fleet::FleetSnapshot::default_model`]).
    pub default_model: Option<String>,
    /// Model names clients may use for another (`routing.model_aliases`): alias → the
    /// model requests for it are routed to and sent as.
    pub model_aliases: BTreeMap<String, String>,
    pub affinity: Affinity,
    pub limits: ClientLimits,
    pub connect_timeout: Duration,
    pub timeouts: Timeouts,
    pub pool_idle_timeout: Duration,
    pub max_attempts: u32,
    pub retry_budget_ratio: f64,
    pub retry_budget_min: u32,
    pub keepalive_pool_size: usize,
    /// CA certificates for `https://` backends; `None`: the system's.
    pub upstream_ca_file: Option<PathBuf>,
    pub health: HealthPolicy,
    pub scrape_interval: Duration,
    pub scrape_timeout: Duration,
    pub models_interval: Duration,
    pub discovery_timeout: Duration,
    /// How often backend host names are resolved again.
    pub dns_interval: Duration,
    pub threads: usize,
    pub grace_period: Duration,
    pub graceful_shutdown_timeout: Duration,
    pub upgrade_sock: PathBuf,
    pub log_format: LogFormat,
    /// Write one access-log line per request (target `access`).
    pub access_log: bool,
}

/// Prefix affinity (`routing.affinity:` in the file; see `affinity.rs`).
#[derive(Debug, Clone, PartialEq)]
pub struct Affinity {
    /// With `policy: vllm`; `policy: affinity` always uses it.
    pub enabled: bool,
    pub load_factor: f64,
    pub prefix_bytes: usize,
    /// Lower-case header name carrying a client's session id.
    pub session_header: String,
    /// Placement of long-lived prefixes against their homes' KV caches.
    pub placement: crate::routing::affinity::PlacementSettings,
}

impl Default for Affinity {
    fn default() -> Self {
        Affinity {
            enabled: defaults::AFFINITY_ENABLED,
            load_factor: defaults::AFFINITY_LOAD_FACTOR,
            prefix_bytes: defaults::AFFINITY_PREFIX_BYTES,
            session_header: defaults::AFFINITY_SESSION_HEADER.to_string(),
            placement: crate::routing::affinity::PlacementSettings {
                kv_share: defaults::AFFINITY_KV_SHARE,
                long_lived_after: defaults::AFFINITY_LONG_LIVED_AFTER,
            },
        }
    }
}

impl Affinity {
    /// Whether `policy` uses affinity keys under this setting.
    pub fn used_by(&self, policy: Policy) -> bool {
        policy == Policy::Affinity || (policy == Policy::Vllm && self.enabled)
    }
}

fn affinity(
    a: &FileAffinity,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Affinity, ConfigError> {
    let d = Affinity::default();
    let out = Affinity {
        enabled: a.enabled.unwrap_or(d.enabled),
        load_factor: a.load_factor.unwrap_or(d.load_factor),
        prefix_bytes: a.prefix_bytes.map_or(d.prefix_bytes, |b| b.0),
        session_header: a
            .session_header
            .clone()
            .unwrap_or(d.session_header)
            .to_ascii_lowercase(),
        placement: crate::routing::affinity::PlacementSettings {
            kv_share: a.kv_share.unwrap_or(d.placement.kv_share),
            long_lived_after: a
                .long_lived_after
                .map_or(d.placement.long_lived_after, |v| v.0),
        },
    };
    if !(out.placement.kv_share.is_finite() && (0.0..=1.0).contains(&out.placement.kv_share)) {
        return Err(invalid(
            "routing.affinity.kv_share",
            format!(
                "must be between 0 and 1 (0.6: the long-lived prefixes homed on a backend may \
                 fill 60% of its KV cache; 0 turns this off), got {}",
                out.placement.kv_share
            ),
        ));
    }
    if out.placement.long_lived_after > Duration::from_secs(600) {
        return Err(invalid(
            "routing.affinity.long_lived_after",
            format!(
                "must be at most 10m (keys idle for {}s are forgotten), got {:?}",
                crate::routing::affinity::LEDGER_IDLE.as_secs(),
                out.placement.long_lived_after
            ),
        ));
    }
    if !(out.load_factor.is_finite() && (1.0..=100.0).contains(&out.load_factor)) {
        return Err(invalid(
            "routing.affinity.load_factor",
            format!(
                "must be between 1 and 100 (1.25: a key's replica keeps its requests while it is \
                 at most 25% above the best estimate or the mean load), got {}",
                out.load_factor
            ),
        ));
    }
    if !(64..=1 << 20).contains(&out.prefix_bytes) {
        return Err(invalid(
            "routing.affinity.prefix_bytes",
            format!("must be between 64 and 1MiB, got {}", out.prefix_bytes),
        ));
    }
    if http::HeaderName::from_bytes(out.session_header.as_bytes()).is_err() {
        return Err(invalid(
            "routing.affinity.session_header",
            format!("`{}` is not a valid header name", out.session_header),
        ));
    }
    Ok(out)
}

/// What one client may send and hold (`limits:` in the file).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientLimits {
    pub max_body_bytes: usize,
    /// A body gets this long, plus a second per `body_min_rate` bytes received; and no
    /// two of its pieces may be further apart (see `proxy::body`).
    pub body_read_timeout: Duration,
    /// Bytes a second.
    pub body_min_rate: usize,
    /// The request line plus every header field, counted as `name: value\r\n`.
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub max_connections: usize,
    /// Restart-only: HTTP/2 settings are fixed when the listeners start.
    pub h2_max_concurrent_streams: u32,
    pub max_json_depth: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            max_body_bytes: defaults::MAX_BODY_BYTES,
            body_read_timeout: defaults::BODY_READ_TIMEOUT,
            body_min_rate: defaults::BODY_MIN_RATE,
            max_header_bytes: defaults::MAX_HEADER_BYTES,
            max_headers: defaults::MAX_HEADERS,
            header_read_timeout: defaults::HEADER_READ_TIMEOUT,
            keepalive_timeout: defaults::KEEPALIVE_TIMEOUT,
            max_connections: defaults::MAX_CONNECTIONS,
            h2_max_concurrent_streams: defaults::H2_MAX_CONCURRENT_STREAMS,
            max_json_depth: defaults::MAX_JSON_DEPTH,
        }
    }
}

fn client_limits(
    l: &FileLimits,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<ClientLimits, ConfigError> {
    let d = ClientLimits::default();
    let dur = |v: Option<HumanDuration>, default: Duration| v.map_or(default, |v| v.0);
    let limits = ClientLimits {
        max_body_bytes: l.max_body_size.map_or(d.max_body_bytes, |s| s.0),
        body_read_timeout: dur(l.body_read_timeout, d.body_read_timeout),
        body_min_rate: l.body_min_rate.map_or(d.body_min_rate, |s| s.0),
        max_header_bytes: l.max_header_size.map_or(d.max_header_bytes, |s| s.0),
        max_headers: l.max_header_count.unwrap_or(d.max_headers),
        header_read_timeout: dur(l.header_read_timeout, d.header_read_timeout),
        keepalive_timeout: dur(l.keepalive_timeout, d.keepalive_timeout),
        max_connections: l.max_connections.unwrap_or(d.max_connections),
        h2_max_concurrent_streams: l
            .h2_max_concurrent_streams
            .unwrap_or(d.h2_max_concurrent_streams),
        max_json_depth: l.max_json_depth.unwrap_or(d.max_json_depth),
    };
    let range = |key: &str, v: usize, lo: usize, hi: usize| {
        if (lo..=hi).contains(&v) {
            Ok(())
        } else {
            Err(invalid(
                key,
                format!("must be between {lo} and {hi}, got {v}"),
            ))
        }
    };
    if limits.max_body_bytes == 0 {
        return Err(invalid("limits.max_body_size", "must be above zero".into()));
    }
    if limits.body_min_rate == 0 {
        return Err(invalid(
            "limits.body_min_rate",
            "must be above zero (bytes a second, e.g. 64KiB)".into(),
        ));
    }
    range(
        "limits.max_header_size",
        limits.max_header_bytes,
        1024,
        defaults::MAX_HEADER_BYTES_CEILING,
    )?;
    range(
        "limits.max_header_count",
        limits.max_headers,
        1,
        defaults::MAX_HEADERS_CEILING,
    )?;
    range(
        "limits.max_json_depth",
        limits.max_json_depth,
        1,
        defaults::MAX_JSON_DEPTH_CEILING,
    )?;
    range("limits.max_connections", limits.max_connections, 1, 1 << 20)?;
    range(
        "limits.h2_max_concurrent_streams",
        limits.h2_max_concurrent_streams as usize,
        1,
        65_536,
    )?;
    for (key, v) in [
        ("limits.body_read_timeout", limits.body_read_timeout),
        ("limits.header_read_timeout", limits.header_read_timeout),
    ] {
        if v.is_zero() {
            return Err(invalid(key, "must be above zero".into()));
        }
    }
    // Pingora counts keep-alive in whole seconds.
    if limits.keepalive_timeout < Duration::from_secs(1) {
        return Err(invalid(
            "limits.keepalive_timeout",
            "must be at least 1s".into(),
        ));
    }
    Ok(limits)
}

/// A data-plane listen address, and its TLS certificate if it terminates TLS.
#[derive(Debug, Clone)]
pub struct Listener {
    pub addr: SocketAddr,
    pub tls: Option<ListenerTls>,
}

#[derive(Debug, Clone)]
pub struct ListenerTls {
    pub files: TlsFiles,
    /// Loaded and checked when the config was read.
    pub cert: LoadedCert,
}

/// Two listeners are the same socket when their address and whether they speak TLS agree;
/// a certificate can change on a reload, the socket cannot.
impl PartialEq for Listener {
    fn eq(&self, other: &Listener) -> bool {
        self.addr == other.addr && self.tls.is_some() == other.tls.is_some()
    }
}

impl Listener {
    pub fn plain(addr: SocketAddr) -> Listener {
        Listener { addr, tls: None }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    /// A stable, human name: the configured one, or `host:port` of the URL.
    pub name: String,
    pub url: String,
    pub addr: SocketAddr,
    /// `host:port` of a URL whose host is a name, resolved again in the background
    /// (`crate::server::reload`); `None` for an address.
    pub resolve: Option<String>,
    /// For one of the backends an `addresses: all` entry makes, one per address of its
    /// host name: the entry's name. The backend's own is `{group}@{ip}`.
    pub group: Option<String>,
    pub static_models: Option<Vec<String>>,
    pub weight: f64,
    pub max_concurrent_requests: Option<u32>,
    pub drain: bool,
    /// Sent upstream as `Authorization: Bearer`, in place of the client's key.
    pub api_key: Option<Secret>,
    /// For `https://` backends.
    pub tls: Option<BackendTls>,
}

/// A backend's relative speed when the config gives none.
const DEFAULT_WEIGHT: f64 = 1.0;

impl BackendConfig {
    /// A plain-HTTP backend as the config file's defaults make it: weight 1, no
    /// configured limit, models discovered, not draining, no key. (Programs that build a
    /// fleet without a file: the benchmarks, the tests.)
    pub fn new(name: impl Into<String>, url: impl Into<String>, addr: SocketAddr) -> Self {
        BackendConfig {
            name: name.into(),
            url: url.into(),
            addr,
            resolve: None,
            group: None,
            static_models: None,
            weight: DEFAULT_WEIGHT,
            max_concurrent_requests: None,
            drain: false,
            api_key: None,
            tls: None,
        }
    }

    /// The backend of its group (see [`BackendConfig::group`]) at `addr`.
    pub fn at(&self, addr: SocketAddr) -> BackendConfig {
        let group = self.group.as_deref().unwrap_or(&self.name);
        BackendConfig {
            name: format!("{group}@{}", addr.ip()),
            addr,
            group: Some(group.to_string()),
            ..self.clone()
        }
    }
}

/// Limits on one attempt at a backend, besides `connect`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    /// Streams: until the first body chunk (the first token).
    pub stream_first_byte: Duration,
    /// Streams: between two body chunks.
    pub stream_chunk_gap: Duration,
    /// Non-streaming: until the response header (vLLM sends it with the answer).
    pub non_stream_first_byte: Duration,
    /// Non-streaming: the whole answer.
    pub non_stream_total: Duration,
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("environment variable {var}: {message}")]
    Env { var: &'static str, message: String },
    #[error("{path}:{line}:{column}: `{key}`: {message}")]
    Invalid {
        path: String,
        line: usize,
        column: usize,
        key: String,
        message: String,
    },
}

// ---------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------

/// Environment variables that override the file (see [`Config::with_env_overrides`]).
pub const ENV_LISTEN: &str = "VLLM_EDGE_LISTEN";
pub const ENV_ADMIN: &str = "VLLM_EDGE_ADMIN";

impl Config {
    /// A backend's scrape older than this is stale.
    pub fn stale_after(&self) -> Duration {
        self.scrape_interval * defaults::STALE_AFTER_INTERVALS
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// [`Config::load`], then the environment's overrides (see
    /// [`Config::with_env_overrides`]).
    pub fn load_with_env(path: &Path) -> Result<Config, ConfigError> {
        Self::load(path)?.with_env_overrides(|k| std::env::var(k).ok())
    }

    /// Applies the values people set per deployment from the environment:
    /// `VLLM_EDGE_LISTEN` (comma-separated listen addresses) replaces `listeners`,
    /// `VLLM_EDGE_ADMIN` replaces `admin.address`.
    pub fn with_env_overrides(
        mut self,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let parse = |var: &'static str, s: &str| {
            s.trim()
                .parse::<SocketAddr>()
                .map_err(|e| ConfigError::Env {
                    var,
                    message: format!("`{s}` is not an address like 0.0.0.0:8080: {e}"),
                })
        };
        if let Some(v) = get(ENV_LISTEN).filter(|v| !v.trim().is_empty()) {
            let addrs: Vec<SocketAddr> = v
                .split(',')
                .map(|a| parse(ENV_LISTEN, a))
                .collect::<Result<_, _>>()?;
            let tls = self.listeners.iter().filter(|l| l.tls.is_some()).count();
            if tls > 0 && addrs.len() != self.listeners.len() {
                return Err(ConfigError::Env {
                    var: ENV_LISTEN,
                    message: format!(
                        "the file's {} listeners include TLS ones; give exactly {} addresses, \
                         which replace theirs in order and keep their TLS settings",
                        self.listeners.len(),
                        self.listeners.len()
                    ),
                });
            }
            if tls > 0 {
                for (l, a) in self.listeners.iter_mut().zip(addrs) {
                    l.addr = a;
                }
            } else {
                self.listeners = addrs.into_iter().map(Listener::plain).collect();
            }
        }
        if let Some(v) = get(ENV_ADMIN).filter(|v| !v.trim().is_empty()) {
            self.admin = parse(ENV_ADMIN, &v)?;
        }
        if self.admin.port() != 0 && self.listeners.iter().any(|l| l.addr == self.admin) {
            return Err(ConfigError::Env {
                var: ENV_ADMIN,
                message: format!("{} is also a data-plane listener", self.admin),
            });
        }
        Ok(self)
    }

    /// Parses and validates `text`; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        // An empty file is an empty mapping, which then fails validation with a clear key.
        let text_or_empty = if text.trim().is_empty() { "{}" } else { text };
        let de = serde_yaml::Deserializer::from_str(text_or_empty);
        let file: FileConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let (line, column) = inner.location().map_or((1, 1), |l| (l.line(), l.column()));
            let message = strip_key_prefix(&strip_location(&inner.to_string()), &key);
            ConfigError::Invalid {
                path: shown.clone(),
                line,
                column,
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                message,
            }
        })?;
        let invalid = |key: &str, message: String| {
            let (line, column) = locate_key(text, key);
            ConfigError::Invalid {
                path: shown.clone(),
                line,
                column,
                key: key.to_string(),
                message,
            }
        };

        // Files named in the config are relative to the config file's directory.
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &str| base.join(p);

        let mut listeners: Vec<Listener> = Vec::new();
        match file.listeners {
            None => listeners.push(Listener::plain(
                defaults::LISTEN.parse().expect("default listen address"),
            )),
            Some(l) if l.is_empty() => {
                return Err(invalid(
                    "listeners",
                    "at least one listener is required".into(),
                ))
            }
            Some(l) => {
                for (i, l) in l.into_iter().enumerate() {
                    let tls = match l.tls {
                        None => None,
                        Some(t) => {
                            let files = TlsFiles {
                                cert: resolve(&t.cert),
                                key: resolve(&t.key),
                            };
                            let cert = files
                                .load()
                                .map_err(|m| invalid(&format!("listeners[{i}].tls"), m))?;
                            Some(ListenerTls { files, cert })
                        }
                    };
                    listeners.push(Listener {
                        addr: l.address.0,
                        tls,
                    });
                }
            }
        }
        let (admin, admin_token) = match file.admin {
            None => (
                defaults::ADMIN_LISTEN
                    .parse()
                    .expect("default admin address"),
                None,
            ),
            Some(a) => {
                let token = match a.token_file {
                    None => None,
                    Some(f) => Some(
                        Secret::read(&resolve(&f)).map_err(|m| invalid("admin.token_file", m))?,
                    ),
                };
                (a.address.0, token)
            }
        };
        let api_keys = match file.auth.api_keys_file {
            None => None,
            Some(f) => Some(Arc::new(
                ApiKeys::load(&resolve(&f)).map_err(|m| invalid("auth.api_keys_file", m))?,
            )),
        };
        let cors = match file.cors.allowed_origins.as_slice() {
            [] => None,
            list => Some(
                Cors::new(list)
                    .map_err(|(i, m)| invalid(&format!("cors.allowed_origins[{i}]"), m))?,
            ),
        };
        let listener_addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.addr).collect();
        for (i, l) in listener_addrs.iter().enumerate() {
            if l.port() != 0 && listener_addrs[..i].contains(l) {
                return Err(invalid(
                    &format!("listeners[{i}].address"),
                    format!("{l} is listed twice"),
                ));
            }
            if l.port() != 0 && *l == admin {
                return Err(invalid(
                    "admin.address",
                    format!("{l} is also a data-plane listener; the admin API must be separate"),
                ));
            }
        }

        if file.backends.is_empty() {
            return Err(invalid(
                "backends",
                "at least one backend is required (e.g. `- url: http://127.0.0.1:8000`)".into(),
            ));
        }
        let upstream_ca_file = file.upstream.ca_file.as_deref().map(resolve);
        if let Some(p) = &upstream_ca_file {
            // Checked even with no https:// backend yet: a reload may add one.
            client_config(Some(p), true).map_err(|m| invalid("upstream.ca_file", m))?;
        }
        // Built once per config, and only if some backend speaks TLS.
        let mut tls_clients: [Option<Arc<rustls::ClientConfig>>; 2] = [None, None];
        let mut backends: Vec<BackendConfig> = Vec::with_capacity(file.backends.len());
        // `addresses: all` entries, and the backends they make.
        let mut groups: Vec<BackendConfig> = Vec::new();
        let mut grouped: Vec<BackendConfig> = Vec::new();
        let mut unresolved: Vec<BackendConfig> = Vec::new();
        for (i, b) in file.backends.into_iter().enumerate() {
            // By default a backend is named after its URL's `host:port` (a host name
            // stays the name when its address moves), the address for an address.
            // An entry whose host name has no address yet makes no backend until it has
            // (see `crate::server::reload`): a replica that is not up yet must not keep the
            // gateway from starting, nor a reload from applying.
            let (addr, addrs) = match &b.url.addrs {
                Ok(a) => (preferred_address(a).expect("never empty"), a.clone()),
                Err(_) if b.url.name.is_some() => {
                    (SocketAddr::from(([0, 0, 0, 0], b.url.port)), Vec::new())
                }
                Err(m) => return Err(invalid(&format!("backends[{i}].url"), m.clone())),
            };
            let name = b
                .name
                .or_else(|| b.url.name.clone())
                .unwrap_or_else(|| addr.to_string());
            if name.is_empty() || !name.bytes().all(|c| c.is_ascii_graphic() || c == b' ') {
                return Err(invalid(
                    &format!("backends[{i}].name"),
                    format!(
                        "`{name}` cannot be a backend name: it is sent in the \
                         x-vllm-edge-backend response header, so use visible ASCII \
                         characters (letters, digits, punctuation, spaces)"
                    ),
                ));
            }
            if backends.iter().chain(&unresolved).any(|o| o.name == name) {
                return Err(invalid(
                    &format!("backends[{i}]"),
                    format!("backend `{name}` is listed twice (give each a distinct url or name)"),
                ));
            }
            if let Some(models) = &b.models {
                if models.is_empty() || models.iter().any(|m| m.is_empty()) {
                    return Err(invalid(
                        &format!("backends[{i}].models"),
                        "list at least one non-empty model name, or omit the key to discover \
                         models from /v1/models"
                            .into(),
                    ));
                }
            }
            let weight = b.weight.unwrap_or(DEFAULT_WEIGHT);
            if !(weight.is_finite() && weight > 0.0) {
                return Err(invalid(
                    &format!("backends[{i}].weight"),
                    format!("must be a positive number, got {weight}"),
                ));
            }
            if b.max_concurrent_requests == Some(0) {
                return Err(invalid(
                    &format!("backends[{i}].max_concurrent_requests"),
                    "must be at least 1".into(),
                ));
            }
            let api_key = match &b.api_key_file {
                None => None,
                Some(f) => Some(
                    Secret::read(&resolve(f))
                        .map_err(|m| invalid(&format!("backends[{i}].api_key_file"), m))?,
                ),
            };
            let tls = match &b.url.tls_host {
                None => {
                    if b.tls_verify.is_some() {
                        return Err(invalid(
                            &format!("backends[{i}].tls_verify"),
                            "only https:// backends speak TLS".into(),
                        ));
                    }
                    None
                }
                Some(host) => {
                    let verify = b.tls_verify.unwrap_or(true);
                    let slot = &mut tls_clients[usize::from(verify)];
                    let client = match slot {
                        Some(c) => c.clone(),
                        None => {
                            let c = client_config(upstream_ca_file.as_deref(), verify)
                                .map_err(|m| invalid("upstream.ca_file", m))?;
                            *slot = Some(c.clone());
                            c
                        }
                    };
                    Some(BackendTls {
                        sni: host.clone(),
                        verify,
                        client,
                    })
                }
            };
            let entry = BackendConfig {
                tls,
                api_key,
                name,
                url: b.url.url,
                addr,
                resolve: b.url.name,
                group: None,
                static_models: b.models,
                weight,
                max_concurrent_requests: b.max_concurrent_requests,
                drain: b.drain,
            };
            match b.addresses {
                Addresses::First if addrs.is_empty() => unresolved.push(entry),
                Addresses::First => backends.push(entry),
                Addresses::All if entry.resolve.is_none() => {
                    return Err(invalid(
                        &format!("backends[{i}].addresses"),
                        "`all` is for a URL whose host is a name with several addresses; \
                         this one is an address"
                            .into(),
                    ))
                }
                Addresses::All => {
                    if groups.iter().any(|g: &BackendConfig| g.name == entry.name) {
                        return Err(invalid(
                            &format!("backends[{i}]"),
                            format!("backend `{}` is listed twice", entry.name),
                        ));
                    }
                    grouped.extend(addrs.iter().map(|&a| entry.at(a)));
                    groups.push(entry);
                }
            }
        }
        // The backends of `addresses: all` entries come after the others, as a refresh
        // lists them.
        backends.append(&mut grouped);

        let max_attempts = file.upstream.max_attempts.unwrap_or(defaults::MAX_ATTEMPTS);
        if !(1..=10).contains(&max_attempts) {
            return Err(invalid(
                "upstream.max_attempts",
                format!("must be between 1 and 10, got {max_attempts}"),
            ));
        }
        let threads = file.server.threads.unwrap_or_else(defaults::threads);
        if threads == 0 {
            return Err(invalid("server.threads", "must be at least 1".into()));
        }
        let dur = |d: Option<HumanDuration>, default: Duration| d.map_or(default, |d| d.0);
        let limits = client_limits(&file.limits, &invalid)?;
        let affinity = affinity(&file.routing.affinity, &invalid)?;
        // Model names are written into request bodies and forms as they are.
        let model_name = |m: &str| !m.is_empty() && !m.chars().any(char::is_control);
        const NOT_A_NAME: &str = "must be a model name: not empty, no control characters";
        let default_model = file.routing.default_model.clone();
        if default_model.as_deref().is_some_and(|m| !model_name(m)) {
            return Err(invalid("routing.default_model", NOT_A_NAME.into()));
        }
        let model_aliases = file.routing.model_aliases.clone();
        for (alias, target) in &model_aliases {
            let key = format!("routing.model_aliases.{alias}");
            if !model_name(alias) || !model_name(target) {
                return Err(invalid(&key, NOT_A_NAME.into()));
            }
            if model_aliases.contains_key(target) {
                return Err(invalid(
                    &key,
                    format!("`{target}` is an alias itself; name the model it stands for"),
                ));
            }
        }
        let retry_budget_ratio = file
            .upstream
            .retry_budget
            .unwrap_or(defaults::RETRY_BUDGET_RATIO);
        if !(0.0..=1.0).contains(&retry_budget_ratio) {
            return Err(invalid(
                "upstream.retry_budget",
                format!("must be a fraction between 0 and 1, got {retry_budget_ratio}"),
            ));
        }
        let h = &file.health;
        let health = HealthPolicy {
            interval: dur(h.interval, defaults::HEALTH_INTERVAL),
            timeout: dur(h.timeout, defaults::HEALTH_TIMEOUT),
            unhealthy_threshold: h
                .unhealthy_threshold
                .unwrap_or(defaults::UNHEALTHY_THRESHOLD),
            healthy_threshold: h.healthy_threshold.unwrap_or(defaults::HEALTHY_THRESHOLD),
            failure_threshold: h.failure_threshold.unwrap_or(defaults::FAILURE_THRESHOLD),
            open_duration: dur(h.open_duration, defaults::OPEN_DURATION),
        };
        for (key, v) in [
            ("health.unhealthy_threshold", health.unhealthy_threshold),
            ("health.healthy_threshold", health.healthy_threshold),
            ("health.failure_threshold", health.failure_threshold),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1".into()));
            }
        }
        if health.interval < Duration::from_millis(10) {
            return Err(invalid("health.interval", "must be at least 10ms".into()));
        }
        let t = &file.timeouts;
        let timeouts = Timeouts {
            stream_first_byte: dur(t.stream_first_byte, defaults::STREAM_FIRST_BYTE_TIMEOUT),
            stream_chunk_gap: dur(t.stream_chunk_gap, defaults::STREAM_CHUNK_GAP_TIMEOUT),
            non_stream_first_byte: dur(
                t.non_stream_first_byte,
                defaults::NON_STREAM_FIRST_BYTE_TIMEOUT,
            ),
            non_stream_total: dur(t.non_stream_total, defaults::NON_STREAM_TOTAL_TIMEOUT),
        };
        let connect_timeout = dur(file.timeouts.connect, defaults::CONNECT_TIMEOUT);
        let scrape_timeout = dur(file.discovery.scrape_timeout, defaults::SCRAPE_TIMEOUT);
        let discovery_timeout = dur(file.discovery.timeout, defaults::DISCOVERY_TIMEOUT);
        // A zero timeout fails every attempt: every request, check or scrape.
        for (key, v) in [
            ("timeouts.connect", connect_timeout),
            ("health.timeout", health.timeout),
            ("discovery.scrape_timeout", scrape_timeout),
            ("discovery.timeout", discovery_timeout),
            ("timeouts.stream_first_byte", timeouts.stream_first_byte),
            ("timeouts.stream_chunk_gap", timeouts.stream_chunk_gap),
            (
                "timeouts.non_stream_first_byte",
                timeouts.non_stream_first_byte,
            ),
            ("timeouts.non_stream_total", timeouts.non_stream_total),
        ] {
            if v.is_zero() {
                return Err(invalid(key, "must be above zero".into()));
            }
        }
        let scrape_interval = dur(file.discovery.scrape_interval, defaults::SCRAPE_INTERVAL);
        let models_interval = dur(file.discovery.models_interval, defaults::MODELS_INTERVAL);
        let dns_interval = dur(file.discovery.dns_interval, defaults::DNS_INTERVAL);
        for (key, v) in [
            ("discovery.scrape_interval", scrape_interval),
            ("discovery.models_interval", models_interval),
            ("discovery.dns_interval", dns_interval),
        ] {
            if v < Duration::from_millis(10) {
                return Err(invalid(key, "must be at least 10ms".into()));
            }
        }

        Ok(Config {
            source: path.to_path_buf(),
            listeners,
            admin,
            admin_token,
            api_keys,
            cors,
            backends,
            groups,
            unresolved,
            policy: file.routing.policy.unwrap_or(Policy::Vllm),
            default_model,
            model_aliases,
            affinity,
            limits,
            connect_timeout,
            timeouts,
            pool_idle_timeout: dur(file.upstream.pool_idle_timeout, defaults::POOL_IDLE_TIMEOUT),
            max_attempts,
            retry_budget_ratio,
            retry_budget_min: file
                .upstream
                .retry_budget_min
                .unwrap_or(defaults::RETRY_BUDGET_MIN),
            health,
            upstream_ca_file,
            keepalive_pool_size: file
                .upstream
                .keepalive_pool_size
                .unwrap_or(defaults::UPSTREAM_KEEPALIVE_POOL),
            scrape_interval,
            scrape_timeout,
            models_interval,
            discovery_timeout,
            dns_interval,
            threads,
            grace_period: dur(file.server.grace_period, defaults::GRACE_PERIOD),
            graceful_shutdown_timeout: dur(
                file.server.graceful_shutdown_timeout,
                defaults::GRACEFUL_SHUTDOWN_TIMEOUT,
            ),
            upgrade_sock: file
                .server
                .upgrade_sock
                .as_deref()
                .map_or_else(|| PathBuf::from(defaults::UPGRADE_SOCK), resolve),
            log_format: file.log.format.unwrap_or_default(),
            access_log: file.log.access.unwrap_or(true),
        })
    }

    /// The entries whose host name has no address yet, so no backend: the
    /// [`Config::unresolved`] ones, and the `addresses: all` ones without a backend.
    pub fn without_addresses(&self) -> impl Iterator<Item = &BackendConfig> {
        self.unresolved.iter().chain(self.groups.iter().filter(|g| {
            !self
                .backends
                .iter()
                .any(|b| b.group.as_ref() == Some(&g.name))
        }))
    }

    /// Whether `model` is promised by an entry that has no address at the moment (its
    /// `models:` list names it): a model that is coming back, not an unknown one. Models
    /// only discovered from replicas cannot be promised.
    pub fn awaits(&self, model: &str) -> bool {
        self.without_addresses().any(|g| {
            g.static_models
                .as_ref()
                .is_some_and(|m| m.iter().any(|x| x == model))
        })
    }

    /// A configuration for `demo` and tests: the given backends, everything else default.
    pub fn with_backends(listen: SocketAddr, admin: SocketAddr, urls: &[String]) -> Config {
        let backends = urls
            .iter()
            .map(|u| format!("  - url: {u}\n"))
            .collect::<String>();
        let text = format!(
            "listeners:\n  - address: {listen}\nadmin:\n  address: {admin}\nbackends:\n{backends}"
        );
        Config::parse(&text, Path::new("<built-in>")).expect("built-in config is valid")
    }
}

/// serde_yaml starts some messages with the key path (or its parent), which we already
/// show.
fn strip_key_prefix(msg: &str, key: &str) -> String {
    match msg.split_once(": ") {
        Some((head, rest)) if !head.is_empty() && key.starts_with(head) => rest.to_string(),
        _ => msg.to_string(),
    }
}

/// serde_yaml appends " at line L column C" to its messages; we print the location first.
fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// Best-effort line and column of a key path like `backends[1].url` for checks made after
/// parsing (serde_yaml keeps no spans): follows the path's names and indices through the
/// indentation of the text, stopping at the deepest part it can find.
fn locate_key(text: &str, key: &str) -> (usize, usize) {
    let lines: Vec<&str> = text.lines().collect();
    let mut from = 0usize;
    let mut min_indent = 0usize;
    let mut found = (1usize, 1usize);
    for part in key.split('.') {
        let (name, index) = match part.find('[') {
            Some(i) => (
                &part[..i],
                part[i + 1..part.len() - 1].parse::<usize>().ok(),
            ),
            None => (part, None),
        };
        let needle = format!("{name}:");
        let Some(pos) = (from..lines.len()).find(|&i| {
            let l = lines[i];
            let indent = l.len() - l.trim_start().len();
            let t = l.trim_start().trim_start_matches("- ");
            indent >= min_indent && t.starts_with(&needle)
        }) else {
            break;
        };
        let indent = lines[pos].len() - lines[pos].trim_start().len();
        found = (pos + 1, indent + 1);
        from = pos + 1;
        min_indent = indent;
        if let Some(index) = index {
            // The index-th "- " item after the key.
            let items: Vec<usize> = (from..lines.len())
                .filter(|&i| lines[i].trim_start().starts_with("- "))
                .collect();
            if let Some(&item) = items.get(index) {
                let ind = lines[item].len() - lines[item].trim_start().len();
                found = (item + 1, ind + 1);
                from = item;
                min_indent = ind;
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------------------
// Value types checked while deserializing
// ---------------------------------------------------------------------------------------

/// A listen address: `IP:PORT` (port 0 picks a free port, for tests).
#[derive(Debug)]
struct ListenAddr(SocketAddr);

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<SocketAddr>().map(ListenAddr).map_err(|_| {
            serde::de::Error::custom(format!(
                "`{s}` is not an IP:PORT address (e.g. 127.0.0.1:8080 or [::]:8080)"
            ))
        })
    }
}

/// The address a host name's backend uses: its first IPv4 address if it has one, else its
/// first. vLLM listens on IPv4 unless told otherwise, and `localhost` often resolves to
/// `::1` first.
pub fn preferred_address(addrs: &[SocketAddr]) -> Option<SocketAddr> {
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
}

/// A backend URL `http://HOST:PORT` or `https://HOST:PORT` with an optional trailing `/`.
/// A host name is resolved at load time, and again in the background (never on the
/// request path).
#[derive(Debug)]
struct BackendUrl {
    url: String,
    port: u16,
    /// Every address of the host, without repeats (never empty), or why there is none.
    addrs: Result<Vec<SocketAddr>, String>,
    /// `host:port` when the host is a name, not an address.
    name: Option<String>,
    /// For `https://`: the host name (SNI, certificate check).
    tls_host: Option<String>,
}

impl<'de> Deserialize<'de> for BackendUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_backend_url(&s).map_err(serde::de::Error::custom)
    }
}

fn parse_backend_url(s: &str) -> Result<BackendUrl, String> {
    let (scheme, rest, default_port) = if let Some(rest) = s.strip_prefix("http://") {
        ("http", rest, 80)
    } else if let Some(rest) = s.strip_prefix("https://") {
        ("https", rest, 443)
    } else {
        return Err(format!(
            "`{s}` must start with http:// or https:// (e.g. http://127.0.0.1:8000)"
        ));
    };
    let hostport = rest.trim_end_matches('/');
    if hostport.is_empty() || hostport.contains('/') || hostport.contains('?') {
        return Err(format!(
            "`{s}`: give only scheme, host and port (vLLM serves at the root; no path)"
        ));
    }
    let with_port = if hostport
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !hostport.ends_with(']')
    {
        hostport.to_string()
    } else {
        format!("{hostport}:{default_port}")
    };
    let port = with_port
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(default_port);
    let host = with_port
        .rsplit_once(':')
        .map_or(with_port.as_str(), |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let is_name = host.parse::<std::net::IpAddr>().is_err();
    if is_name && !is_host_name(&host) {
        return Err(format!(
            "`{s}`: `{host}` is neither an IP address nor a host name (IPv6 addresses go \
             in brackets: http://[::1]:8000)"
        ));
    }
    // A name that does not resolve now is not a mistake in the file: the replica may not
    // be up yet (see `Config::unresolved`).
    let addrs = match with_port.to_socket_addrs() {
        Err(e) => Err(format!("`{s}`: cannot resolve `{hostport}`: {e}")),
        Ok(found) => {
            let mut addrs: Vec<SocketAddr> = Vec::new();
            for a in found {
                if !addrs.contains(&a) {
                    addrs.push(a);
                }
            }
            if addrs.is_empty() {
                Err(format!("`{s}`: `{hostport}` resolves to no address"))
            } else {
                Ok(addrs)
            }
        }
    };
    Ok(BackendUrl {
        url: format!("{scheme}://{hostport}"),
        port,
        addrs,
        name: is_name.then(|| with_port.clone()),
        tls_host: (scheme == "https").then_some(host),
    })
}

/// Whether `host` is spelled as a DNS host name: dot-separated labels of letters, digits,
/// `-` and `_` (a trailing dot allowed), at most 253 bytes.
fn is_host_name(host: &str) -> bool {
    let h = host.strip_suffix('.').unwrap_or(host);
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        })
}

/// A size: an integer number of bytes, or a string with a unit (`64KiB`, `32MiB`, `1GiB`,
/// `500kB`, `2MB`).
#[derive(Debug, Clone, Copy)]
struct ByteSize(usize);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n as usize)),
            Raw::S(s) => parse_size(&s)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 32MiB, 512KiB or a number of bytes)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        u => {
            return Err(format!(
                "`{s}`: unknown size unit `{u}` (use B, KiB, MiB, GiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .map(|v| v as usize)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// A duration: `250ms`, `2s`, `5m`, `1h`, or a bare number of seconds.
#[derive(Debug, Clone, Copy)]
struct HumanDuration(Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(f64),
            S(String),
        }
        let d = match Raw::deserialize(d)? {
            Raw::N(n) if n.is_finite() && n >= 0.0 => Duration::from_secs_f64(n),
            Raw::N(n) => return Err(serde::de::Error::custom(format!("{n} is not a duration"))),
            Raw::S(s) => parse_duration(&s).map_err(serde::de::Error::custom)?,
        };
        Ok(HumanDuration(d))
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 250ms, 2s, 5m)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        u => {
            return Err(format!(
                "`{s}`: unknown duration unit `{u}` (use ms, s, m, h)"
            ))
        }
    };
    if !secs.is_finite() || secs > 1e9 {
        return Err(format!("`{s}` is too large"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.yaml"))
    }

    const MINIMAL: &str = "listeners:\n  - address: 127.0.0.1:8080\nadmin:\n  address: 127.0.0.1:9090\nbackends:\n  - url: http://127.0.0.1:8001\n  - url: http://127.0.0.1:8002\nrouting:\n  policy: round-robin\n";

    #[test]
    fn the_issue_example_parses_with_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(
            c.listeners,
            vec![Listener::plain("127.0.0.1:8080".parse().unwrap())]
        );
        assert_eq!(c.backends.len(), 2);
        assert_eq!(c.backends[1].name, "127.0.0.1:8002");
        assert_eq!(c.policy, Policy::RoundRobin);
        let text = MINIMAL.replace("routing:\n  policy: round-robin\n", "");
        assert_eq!(
            parse(&text).unwrap().policy,
            Policy::Vllm,
            "the default policy"
        );
        assert_eq!(c.limits, ClientLimits::default());
        assert!(c.pool_idle_timeout < Duration::from_secs(5));
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = MINIMAL.replace(
            "  - url: http://127.0.0.1:8002",
            "  - urll: http://127.0.0.1:8002",
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.starts_with("test.yaml:7:"), "{e}");
        assert!(e.contains("backends[1]"), "{e}");
        assert!(e.contains("unknown field `urll`"), "{e}");
    }

    #[test]
    fn affinity_settings_are_read_and_bad_ones_located() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.affinity, Affinity::default());
        assert!(c.affinity.used_by(Policy::Affinity) && !c.affinity.used_by(Policy::RoundRobin));
        let text = MINIMAL.replace(
            "  policy: round-robin\n",
            "  policy: affinity\n  affinity:\n    enabled: false\n    load_factor: 2\n    \
             prefix_bytes: 1KiB\n    session_header: X-Conversation\n    kv_share: 0.4\n    \
             long_lived_after: 45s\n",
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.policy, Policy::Affinity);
        assert_eq!(
            c.affinity,
            Affinity {
                enabled: false,
                load_factor: 2.0,
                prefix_bytes: 1024,
                session_header: "x-conversation".into(),
                placement: crate::routing::affinity::PlacementSettings {
                    kv_share: 0.4,
                    long_lived_after: Duration::from_secs(45),
                },
            }
        );
        // Off, but `policy: affinity` uses it anyway; `vllm` does not.
        assert!(c.affinity.used_by(Policy::Affinity) && !c.affinity.used_by(Policy::Vllm));
        for (bad, key) in [
            ("    load_factor: 0.5\n", "routing.affinity.load_factor"),
            ("    prefix_bytes: 10\n", "routing.affinity.prefix_bytes"),
            ("    kv_share: 1.5\n", "routing.affinity.kv_share"),
            ("    kv_share: -0.1\n", "routing.affinity.kv_share"),
            (
                "    long_lived_after: 1h\n",
                "routing.affinity.long_lived_after",
            ),
            (
                "    session_header: \"not a header\"\n",
                "routing.affinity.session_header",
            ),
            ("    sticky: yes\n", "sticky"),
        ] {
            let text = MINIMAL.replace(
                "  policy: round-robin\n",
                &format!("  policy: round-robin\n  affinity:\n{bad}"),
            );
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.starts_with("test.yaml:"), "{e}");
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn the_default_model_and_aliases_are_model_names() {
        let with = |v: &str| {
            MINIMAL.replace(
                "  policy: round-robin\n",
                &format!("  policy: round-robin\n  default_model: {v}\n"),
            )
        };
        assert_eq!(parse(MINIMAL).unwrap().default_model, None);
        assert_eq!(
            parse(&with("llama-3-8b")).unwrap().default_model.as_deref(),
            Some("llama-3-8b")
        );
        for bad in ["\"\"", "\"a\\nb\""] {
            let e = parse(&with(bad)).unwrap_err().to_string();
            assert!(
                e.starts_with("test.yaml:") && e.contains("routing.default_model"),
                "{e}"
            );
        }
        let aliases = |v: &str| {
            MINIMAL.replace(
                "  policy: round-robin\n",
                &format!("  policy: round-robin\n  model_aliases:\n{v}"),
            )
        };
        let c = parse(&aliases("    gpt-4o: llama\n    \"o1\": sql-lora\n")).unwrap();
        assert_eq!(c.model_aliases.len(), 2);
        assert_eq!(c.model_aliases["o1"], "sql-lora");
        for (bad, says) in [
            ("    a: b\n    b: c\n", "is an alias itself"),
            ("    a: \"\"\n", "not empty"),
        ] {
            let e = parse(&aliases(bad)).unwrap_err().to_string();
            assert!(e.starts_with("test.yaml:11:"), "{e}");
            assert!(
                e.contains("routing.model_aliases.a") && e.contains(says),
                "{e}"
            );
        }
    }

    #[test]
    fn bad_values_are_located() {
        let e = parse(&MINIMAL.replace("127.0.0.1:9090", "localhost-ish"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("test.yaml:4:"), "{e}");
        assert!(e.contains("admin.address"), "{e}");
        let e = parse(&MINIMAL.replace("round-robin", "fastest"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("test.yaml:9:"), "{e}");
        assert!(e.contains("routing.policy"), "{e}");
        let e = parse(&format!("{MINIMAL}limits:\n  max_body_size: 12 parsecs\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("test.yaml:11:") && e.contains("limits.max_body_size"),
            "{e}"
        );
    }

    #[test]
    fn semantic_errors_name_the_key_and_its_line() {
        let e = parse("listeners:\n  - address: 127.0.0.1:8080\nbackends: []\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("test.yaml:3:1: `backends`"), "{e}");
        let dup = MINIMAL.replace("8002", "8001");
        let e = parse(&dup).unwrap_err().to_string();
        assert!(
            e.contains("`backends[1]`") && e.contains("test.yaml:7:"),
            "{e}"
        );
        // A name goes into a response header: one that cannot is refused at load, not
        // on every request.
        for bad in ["\"gpu\\u00e9\"", "\"a\\tb\"", "\"\""] {
            let text = MINIMAL.replace(
                "  - url: http://127.0.0.1:8002\n",
                &format!("  - url: http://127.0.0.1:8002\n    name: {bad}\n"),
            );
            let e = parse(&text).unwrap_err().to_string();
            assert!(
                e.contains("`backends[1].name`") && e.contains("test.yaml:8:"),
                "{bad}: {e}"
            );
        }
        let ok = MINIMAL.replace(
            "  - url: http://127.0.0.1:8002\n",
            "  - url: http://127.0.0.1:8002\n    name: gpu 2 (spare)\n",
        );
        assert_eq!(parse(&ok).unwrap().backends[1].name, "gpu 2 (spare)");
    }

    #[test]
    fn an_all_addresses_entry_makes_one_backend_per_address_of_a_name() {
        let c =
            parse("backends:\n  - url: http://localhost:8000\n    addresses: all\n    weight: 2\n")
                .unwrap();
        let names: Vec<&str> = c.backends.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["localhost:8000@127.0.0.1"]);
        let b = &c.backends[0];
        assert_eq!(b.group.as_deref(), Some("localhost:8000"));
        assert_eq!(b.resolve.as_deref(), Some("localhost:8000"));
        assert_eq!(b.weight, 2.0, "the entry's settings");
        let e = parse("backends:\n  - url: http://127.0.0.1:8000\n    addresses: all\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`backends[0].addresses`"), "{e}");
        // A name with no address yet: no backend until it has (`.invalid` never resolves).
        let c = parse("backends:\n  - url: http://replicas.invalid:8000\n    addresses: all\n")
            .unwrap();
        assert!(c.backends.is_empty());
        assert_eq!(c.groups.len(), 1);
        assert_eq!(
            c.groups[0].resolve.as_deref(),
            Some("replicas.invalid:8000")
        );
        // Nor does a single backend's: it waits under its own name.
        let c = parse("backends:\n  - url: http://gpu-0.invalid:8000\n    models: [m]\n").unwrap();
        assert!(c.backends.is_empty());
        assert_eq!(c.unresolved.len(), 1);
        assert_eq!(c.unresolved[0].name, "gpu-0.invalid:8000");
        assert_eq!(
            c.unresolved[0].resolve.as_deref(),
            Some("gpu-0.invalid:8000")
        );
        assert!(c.awaits("m") && !c.awaits("other"));
        let e = parse("backends:\n  - url: http://a.invalid:8000\n    name: x\n  - url: http://b.invalid:8000\n    name: x\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`backends[1]`") && e.contains("listed twice"),
            "{e}"
        );
        // A host that is not spelled as a name is a mistake in the file, not a name
        // waiting for its address.
        for bad in [
            "http://gpu 0:8000",
            "http://gpu..lan:8000",
            "http://gpu!:8000",
            "http://gpu:80x",
        ] {
            let e = parse(&format!("backends:\n  - url: {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("test.yaml:2:") && e.contains("`backends[0].url`"),
                "{bad}: {e}"
            );
        }
        let e = parse("backends:\n  - url: http://localhost:8000\n    addresses: some\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("backends[0].addresses"), "{e}");
    }

    #[test]
    fn cors_origins_are_read_and_a_bad_one_located() {
        assert_eq!(parse(MINIMAL).unwrap().cors, None, "off by default");
        let c = parse(&format!(
            "{MINIMAL}cors:\n  allowed_origins:\n    - https://app.example.com\n    - app.example.com\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            c.starts_with("test.yaml:13:") && c.contains("`cors.allowed_origins[1]`"),
            "{c}"
        );
        let ok = parse(&format!("{MINIMAL}cors:\n  allowed_origins: [\"*\"]\n")).unwrap();
        assert!(ok.cors.is_some());
    }

    #[test]
    fn a_duration_that_would_fail_every_attempt_or_spin_is_refused() {
        for (section, key, value, message) in [
            ("timeouts", "connect", "0s", "must be above zero"),
            ("health", "timeout", "0ms", "must be above zero"),
            ("discovery", "timeout", "0s", "must be above zero"),
            ("discovery", "scrape_timeout", "0s", "must be above zero"),
            (
                "discovery",
                "models_interval",
                "0s",
                "must be at least 10ms",
            ),
            (
                "discovery",
                "scrape_interval",
                "5ms",
                "must be at least 10ms",
            ),
        ] {
            let e = parse(&format!("{MINIMAL}{section}:\n  {key}: {value}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!("test.yaml:11:3: `{section}.{key}`: {message}")),
                "{e}"
            );
            let ok = parse(&format!("{MINIMAL}{section}:\n  {key}: 20ms\n"));
            assert!(ok.is_ok(), "{section}.{key}: 20ms: {ok:?}");
        }
    }

    #[test]
    fn urls_sizes_and_durations() {
        assert!(parse_backend_url("http://127.0.0.1:8000/").is_ok());
        assert_eq!(
            parse_backend_url("http://127.0.0.1")
                .unwrap()
                .addrs
                .unwrap()[0]
                .port(),
            80
        );
        assert!(parse_backend_url("127.0.0.1:8000").is_err());
        assert!(parse_backend_url("http://127.0.0.1:8000/v1").is_err());
        let https = parse_backend_url("https://localhost").unwrap();
        assert_eq!(https.port, 443);
        assert_eq!(https.addrs.as_ref().unwrap()[0].port(), 443);
        assert_eq!(https.tls_host.as_deref(), Some("localhost"));
        assert_eq!(https.url, "https://localhost");
        let v6 = parse_backend_url("https://[::1]:8443").unwrap();
        assert_eq!(v6.tls_host.as_deref(), Some("::1"));
        assert_eq!(
            parse_backend_url("http://127.0.0.1:1").unwrap().tls_host,
            None
        );
        let e = parse("backends:\n  - url: http://127.0.0.1:1\n    tls_verify: false\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("backends[0].tls_verify") && e.contains("https"),
            "{e}"
        );
        assert_eq!(parse_size("32MiB").unwrap(), 32 << 20);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("-1").is_err());
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("2 fortnights").is_err());
    }

    #[test]
    fn shipped_configs_are_valid() {
        for f in ["conf/vllm-edge.yaml", "conf/minimal.yaml"] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
            Config::load(&p).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Any text: a configuration or an error, never a panic.
            #[test]
            fn any_text_is_loaded_or_refused(text in "\\PC{0,200}") {
                let _ = parse(&text);
            }

            /// Any value under any limit: accepted, or refused with the file, the line and
            /// the key.
            #[test]
            fn a_refused_limit_names_file_line_and_key(
                key in prop::sample::select(vec![
                    "max_body_size", "body_read_timeout", "body_min_rate", "max_header_size",
                    "max_header_count", "header_read_timeout", "keepalive_timeout",
                    "max_connections", "h2_max_concurrent_streams", "max_json_depth",
                ]),
                value in prop::sample::select(vec![
                    "-1", "0", "1", "1.5", "abc", "[1, 2]", "{a: 1}", "''", "null", "true",
                    "99999999999999999999", "1GiB", "10s", "0s", "1ms", "64KiB", "200",
                ]),
            ) {
                let text = format!("{MINIMAL}limits:\n  {key}: {value}\n");
                if let Err(e) = parse(&text) {
                    let e = e.to_string();
                    prop_assert!(e.contains("test.yaml:11:"), "{}", e);
                    prop_assert!(e.contains(&format!("limits.{key}")), "{}", e);
                }
            }
        }
    }
}
