//! The configuration: what the gateway runs on ([`Config`]), read from its YAML file with
//! precise errors, and the one home of every default ([`defaults`]).
//!
//! The bottom layer: it may use only the leaf modules whose types it holds (`auth`,
//! `tls`, `cors`), never a module above it.
//!
//! - `file`: the file's schema as serde reads it (unknown keys are errors), and the value
//!   types checked while reading (addresses, URLs, sizes, durations), so their errors
//!   carry the exact line and column;
//! - `parse`: one check per section, which applies the defaults and names the key path
//!   and line of what it refuses;
//! - `error`: [`ConfigError`], and where a key is in the file.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::auth::{ApiKeys, Secret};
use crate::cors::Cors;
use crate::tls::{BackendTls, LoadedCert, TlsFiles};

mod auth;
pub mod defaults;
mod error;
mod file;
mod parse;
#[cfg(test)]
mod tests;
mod traces;

pub use error::ConfigError;
pub use file::{parse_duration, parse_size, preferred_address};
use file::{FileAffinity, FileLimits, HumanDuration};

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

/// `tracing.otlp`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpSettings {
    /// Where spans are POSTed (its path is `/v1/traces` unless the file gave another).
    pub endpoint: String,
    pub sample_ratio: f64,
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
    /// Where the keys' limits are counted with other gateways' (`auth.shared`); `None`:
    /// each gateway counts its own.
    pub shared_limits: Option<Arc<crate::auth::shared::SharedLimits>>,
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
    /// How requests wait at the gateway when every replica is full (`flow_control:`).
    pub flow: FlowLimits,
    /// The engines run `--scheduling-policy priority` (`routing.scheduling_policy`):
    /// each request carries its class in vLLM's `priority` field.
    pub engine_priority: bool,
    /// Model → its tokenizer (`routing.tokenizers`): requests for it are tokenized as the
    /// engine will, for exact prefix routing on KV events.
    pub tokenizers: BTreeMap<String, Arc<crate::tokenize::Tokenizer>>,
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
    /// Request spans to an OpenTelemetry collector (`tracing.otlp`); `None`: off.
    pub otlp: Option<OtlpSettings>,
    /// Write one access-log line per request (target `access`).
    pub access_log: bool,
    /// What is legal but probably not meant (a backend URL without a port, a host name
    /// that does not resolve yet), each located like an error: `check` prints them, `run`
    /// and a reload log them.
    pub warnings: Vec<String>,
}

/// What vLLM's scheduler does with waiting requests (`--scheduling-policy`, as
/// `routing.scheduling_policy` tells the gateway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulingPolicy {
    /// First come, first served (vLLM's default): requests carry no priority.
    #[default]
    Fcfs,
    /// By each request's `priority` field, which the gateway sets from its class.
    Priority,
}

/// Flow control (`flow_control:` in the file; see `crate::flow`): the gateway's queue per
/// model, used only while every replica that could take a request is full.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlowLimits {
    /// Off: requests go to the engines' own queues, first come first served.
    pub enabled: bool,
    /// Requests waiting for one model, at most.
    pub max_queued: usize,
    /// The longest a request of each class waits (indexed by `Priority::index`).
    pub max_wait: [Duration; 3],
}

impl Default for FlowLimits {
    fn default() -> Self {
        FlowLimits {
            enabled: defaults::FLOW_ENABLED,
            max_queued: defaults::FLOW_MAX_QUEUED,
            max_wait: [defaults::FLOW_MAX_WAIT; 3],
        }
    }
}

impl FlowLimits {
    pub fn max_wait(&self, class: crate::auth::Priority) -> Duration {
        self.max_wait[class.index()]
    }
}

fn flow(
    f: &file::FileFlow,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<FlowLimits, ConfigError> {
    let d = FlowLimits::default();
    let w = &f.max_wait;
    let wait = |v: Option<HumanDuration>, d: Duration| v.map_or(d, |v| v.0);
    let out = FlowLimits {
        enabled: f.enabled.unwrap_or(d.enabled),
        max_queued: f.max_queued.unwrap_or(d.max_queued),
        max_wait: [
            wait(w.high, d.max_wait[0]),
            wait(w.normal, d.max_wait[1]),
            wait(w.low, d.max_wait[2]),
        ],
    };
    let mut found = Vec::new();
    if out.max_queued == 0 {
        found.push(invalid(
            "flow_control.max_queued",
            "must be at least 1 (to queue nothing, set flow_control.enabled: false)".into(),
        ));
    }
    for (class, wait) in ["high", "normal", "low"].iter().zip(out.max_wait) {
        if wait < Duration::from_millis(1) {
            found.push(invalid(
                &format!("flow_control.max_wait.{class}"),
                "must be at least 1ms".into(),
            ));
        }
    }
    match found.is_empty() {
        true => Ok(out),
        false => Err(ConfigError::all(found)),
    }
}

/// Thresholds, from the `health` section of the config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthPolicy {
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    pub failure_threshold: u32,
    pub open_duration: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            interval: defaults::HEALTH_INTERVAL,
            timeout: defaults::HEALTH_TIMEOUT,
            unhealthy_threshold: defaults::UNHEALTHY_THRESHOLD,
            healthy_threshold: defaults::HEALTHY_THRESHOLD,
            failure_threshold: defaults::FAILURE_THRESHOLD,
            open_duration: defaults::OPEN_DURATION,
        }
    }
}

/// Placement settings (`routing.affinity` in the config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlacementSettings {
    /// The share of a backend's KV cache the long-lived prefixes homed on it may fill; 0
    /// turns placement off.
    pub kv_share: f64,
    /// How long a key must have been in use to count as long-lived.
    pub long_lived_after: Duration,
}

/// Prefix affinity (`routing.affinity:` in the file; see `routing::affinity`).
#[derive(Debug, Clone, PartialEq)]
pub struct Affinity {
    /// With `policy: vllm`; `policy: affinity` always uses it.
    pub enabled: bool,
    pub load_factor: f64,
    pub prefix_bytes: usize,
    /// Lower-case header name carrying a client's session id.
    pub session_header: String,
    /// Placement of long-lived prefixes against their homes' KV caches.
    pub placement: PlacementSettings,
}

impl Default for Affinity {
    fn default() -> Self {
        Affinity {
            enabled: defaults::AFFINITY_ENABLED,
            load_factor: defaults::AFFINITY_LOAD_FACTOR,
            prefix_bytes: defaults::AFFINITY_PREFIX_BYTES,
            session_header: defaults::AFFINITY_SESSION_HEADER.to_string(),
            placement: PlacementSettings {
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
        placement: PlacementSettings {
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
                defaults::AFFINITY_KEY_IDLE.as_secs(),
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
    /// Its engine's KV events, for exact prefix routing.
    pub kv_events: Option<KvEvents>,
}

/// Where an engine publishes its KV events (`backends[].kv_events`, `kv_events_replay`):
/// ZMQ endpoints, `tcp://HOST:PORT`.
#[derive(Debug, Clone, PartialEq)]
pub struct KvEvents {
    pub endpoint: String,
    pub replay: Option<String>,
}

impl KvEvents {
    /// The same ports at another host (a member of an `addresses: all` group).
    fn at(&self, host: &str) -> KvEvents {
        let moved = |e: &str| match e.rsplit_once(':') {
            Some((_, port)) => format!("tcp://{host}:{port}"),
            None => e.to_string(),
        };
        KvEvents {
            endpoint: moved(&self.endpoint),
            replay: self.replay.as_deref().map(moved),
        }
    }
}

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
            weight: defaults::BACKEND_WEIGHT,
            max_concurrent_requests: None,
            drain: false,
            api_key: None,
            tls: None,
            kv_events: None,
        }
    }

    /// The backend of its group (see [`BackendConfig::group`]) at `addr`.
    pub fn at(&self, addr: SocketAddr) -> BackendConfig {
        let group = self.group.as_deref().unwrap_or(&self.name);
        BackendConfig {
            name: format!("{group}@{}", addr.ip()),
            addr,
            group: Some(group.to_string()),
            // Each replica behind the name publishes its own events.
            kv_events: self.kv_events.as_ref().map(|k| match addr.ip() {
                std::net::IpAddr::V6(ip) => k.at(&format!("[{ip}]")),
                ip => k.at(&ip.to_string()),
            }),
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
