//! The configuration file's schema as serde reads it (an unknown key is an error), and
//! the value types checked while it is read (addresses, URLs, sizes, durations), so their
//! errors carry the exact line and column. Nothing here applies a default: `parse` does,
//! from `defaults`.

use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use super::{LogFormat, Policy};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    #[serde(default)]
    pub(super) listeners: Option<Vec<FileListener>>,
    #[serde(default)]
    pub(super) admin: Option<FileAdmin>,
    #[serde(default)]
    pub(super) backends: Vec<FileBackend>,
    #[serde(default)]
    pub(super) routing: FileRouting,
    #[serde(default)]
    pub(super) limits: FileLimits,
    #[serde(default)]
    pub(super) timeouts: FileTimeouts,
    #[serde(default)]
    pub(super) upstream: FileUpstream,
    #[serde(default)]
    pub(super) discovery: FileDiscovery,
    #[serde(default)]
    pub(super) health: FileHealth,
    #[serde(default)]
    pub(super) server: FileServer,
    #[serde(default)]
    pub(super) auth: FileAuth,
    #[serde(default)]
    pub(super) cors: FileCors,
    #[serde(default)]
    pub(super) flow_control: FileFlow,
    #[serde(default)]
    pub(super) log: FileLog,
    #[serde(default)]
    pub(super) tracing: FileTracing,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTracing {
    /// Request spans exported to an OpenTelemetry collector.
    #[serde(default)]
    pub(super) otlp: Option<FileOtlp>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileOtlp {
    /// The collector's OTLP/HTTP URL (`http://HOST:4318`, or its `/v1/traces`).
    #[serde(default)]
    pub(super) endpoint: Option<String>,
    /// The share of new traces sampled (0 to 1); a caller's decision is followed.
    #[serde(default)]
    pub(super) sample_ratio: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCors {
    /// Origins whose pages may call the gateway (`*` for any); none: CORS is off.
    #[serde(default)]
    pub(super) allowed_origins: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileFlow {
    #[serde(default)]
    pub(super) enabled: Option<bool>,
    #[serde(default)]
    pub(super) max_queued: Option<usize>,
    #[serde(default)]
    pub(super) max_wait: FileClassWait,
}

/// A duration per priority class.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileClassWait {
    #[serde(default)]
    pub(super) high: Option<HumanDuration>,
    #[serde(default)]
    pub(super) normal: Option<HumanDuration>,
    #[serde(default)]
    pub(super) low: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLog {
    #[serde(default)]
    pub(super) format: Option<LogFormat>,
    #[serde(default)]
    pub(super) access: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileListener {
    /// Required: `parse` says so by name when it is missing.
    #[serde(default)]
    pub(super) address: Option<ListenAddr>,
    /// Terminate TLS here with this certificate chain and key (PEM files).
    #[serde(default)]
    pub(super) tls: Option<FileTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTls {
    #[serde(default)]
    pub(super) cert: Option<String>,
    #[serde(default)]
    pub(super) key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAdmin {
    #[serde(default)]
    pub(super) address: Option<ListenAddr>,
    /// A file holding the token the admin API requires (`Authorization: Bearer`).
    #[serde(default)]
    pub(super) token_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAuth {
    /// Clients must present one of the keys in this file.
    #[serde(default)]
    pub(super) api_keys_file: Option<String>,
    /// The keys' limits counted together with every gateway using the same Redis.
    #[serde(default)]
    pub(super) shared: Option<FileShared>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileShared {
    /// `redis://HOST:PORT[/DB]`, or `rediss://` for TLS.
    #[serde(default)]
    pub(super) redis: Option<String>,
    /// A file holding Redis's password (kept out of the URL and this file).
    #[serde(default)]
    pub(super) password_file: Option<String>,
    /// PEM CA certificates a `rediss://` Redis's certificate is checked against (default:
    /// the system's).
    #[serde(default)]
    pub(super) ca_file: Option<String>,
    #[serde(default)]
    pub(super) on_redis_error: Option<OnRedisError>,
    #[serde(default)]
    pub(super) timeout: Option<HumanDuration>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum OnRedisError {
    Local,
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileBackend {
    /// Required: `parse` says so by name when it is missing.
    #[serde(default)]
    pub(super) url: Option<BackendUrl>,
    #[serde(default)]
    pub(super) name: Option<String>,
    /// Models this backend serves. When set, discovery through `/v1/models` is skipped.
    #[serde(default)]
    pub(super) models: Option<Vec<String>>,
    /// Relative speed, used until the backend's own latency has been measured.
    #[serde(default)]
    pub(super) weight: Option<f64>,
    /// Requests above which the backend counts as saturated.
    #[serde(default)]
    pub(super) max_concurrent_requests: Option<u32>,
    /// No new requests; in-flight ones finish.
    #[serde(default)]
    pub(super) drain: bool,
    /// A file holding the key this backend requires (`vllm serve --api-key`).
    #[serde(default)]
    pub(super) api_key_file: Option<String>,
    /// `https://` backends: verify the certificate (default true).
    #[serde(default)]
    pub(super) tls_verify: Option<bool>,
    /// A host name's addresses: the first is the backend (`first`), or each is one
    /// (`all`: a Kubernetes headless Service, one address per replica).
    #[serde(default)]
    pub(super) addresses: Addresses,
    /// `tcp://HOST:PORT`: the engine's KV-event publisher (`--kv-events-config`'s
    /// `endpoint`), for exact prefix routing.
    #[serde(default)]
    pub(super) kv_events: Option<String>,
    /// `tcp://HOST:PORT`: its replay socket (`replay_endpoint`), to recover lost events.
    #[serde(default)]
    pub(super) kv_events_replay: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Addresses {
    #[default]
    First,
    All,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRouting {
    #[serde(default)]
    pub(super) policy: Option<Policy>,
    #[serde(default)]
    pub(super) default_model: Option<String>,
    #[serde(default)]
    pub(super) model_aliases: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) affinity: FileAffinity,
    /// Model → its directory as vLLM loads it (`tokenizer.json`, the chat template).
    #[serde(default)]
    pub(super) tokenizers: BTreeMap<String, String>,
    /// The engines' `--scheduling-policy`.
    #[serde(default)]
    pub(super) scheduling_policy: Option<super::SchedulingPolicy>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAffinity {
    #[serde(default)]
    pub(super) enabled: Option<bool>,
    #[serde(default)]
    pub(super) load_factor: Option<f64>,
    #[serde(default)]
    pub(super) prefix_bytes: Option<ByteSize>,
    #[serde(default)]
    pub(super) session_header: Option<String>,
    #[serde(default)]
    pub(super) kv_share: Option<f64>,
    #[serde(default)]
    pub(super) long_lived_after: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLimits {
    #[serde(default)]
    pub(super) max_body_size: Option<ByteSize>,
    #[serde(default)]
    pub(super) body_read_timeout: Option<HumanDuration>,
    #[serde(default)]
    pub(super) body_min_rate: Option<ByteSize>,
    #[serde(default)]
    pub(super) max_header_size: Option<ByteSize>,
    #[serde(default)]
    pub(super) max_header_count: Option<usize>,
    #[serde(default)]
    pub(super) header_read_timeout: Option<HumanDuration>,
    #[serde(default)]
    pub(super) keepalive_timeout: Option<HumanDuration>,
    #[serde(default)]
    pub(super) max_connections: Option<usize>,
    #[serde(default)]
    pub(super) h2_max_concurrent_streams: Option<u32>,
    #[serde(default)]
    pub(super) max_json_depth: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTimeouts {
    #[serde(default)]
    pub(super) connect: Option<HumanDuration>,
    #[serde(default)]
    pub(super) stream_first_byte: Option<HumanDuration>,
    #[serde(default)]
    pub(super) stream_chunk_gap: Option<HumanDuration>,
    #[serde(default)]
    pub(super) non_stream_first_byte: Option<HumanDuration>,
    #[serde(default)]
    pub(super) non_stream_total: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileUpstream {
    #[serde(default)]
    pub(super) pool_idle_timeout: Option<HumanDuration>,
    #[serde(default)]
    pub(super) max_attempts: Option<u32>,
    #[serde(default)]
    pub(super) keepalive_pool_size: Option<usize>,
    #[serde(default)]
    pub(super) retry_budget: Option<f64>,
    #[serde(default)]
    pub(super) retry_budget_min: Option<u32>,
    /// CA certificates (PEM) that `https://` backends' certificates are checked against.
    #[serde(default)]
    pub(super) ca_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileHealth {
    #[serde(default)]
    pub(super) interval: Option<HumanDuration>,
    #[serde(default)]
    pub(super) timeout: Option<HumanDuration>,
    #[serde(default)]
    pub(super) unhealthy_threshold: Option<u32>,
    #[serde(default)]
    pub(super) healthy_threshold: Option<u32>,
    #[serde(default)]
    pub(super) failure_threshold: Option<u32>,
    #[serde(default)]
    pub(super) open_duration: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileDiscovery {
    #[serde(default)]
    pub(super) scrape_interval: Option<HumanDuration>,
    #[serde(default)]
    pub(super) scrape_timeout: Option<HumanDuration>,
    #[serde(default)]
    pub(super) models_interval: Option<HumanDuration>,
    #[serde(default)]
    pub(super) timeout: Option<HumanDuration>,
    #[serde(default)]
    pub(super) dns_interval: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileServer {
    #[serde(default)]
    pub(super) threads: Option<usize>,
    #[serde(default)]
    pub(super) grace_period: Option<HumanDuration>,
    #[serde(default)]
    pub(super) graceful_shutdown_timeout: Option<HumanDuration>,
    #[serde(default)]
    pub(super) upgrade_sock: Option<String>,
}

// ---------------------------------------------------------------------------------------
// Value types checked while deserializing
// ---------------------------------------------------------------------------------------

/// A listen address: `IP:PORT` (port 0 picks a free port, for tests).
#[derive(Debug)]
pub(super) struct ListenAddr(pub(super) SocketAddr);

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<SocketAddr>().map(ListenAddr).map_err(|_| {
            let message = match port_out_of_range(&s) {
                Some(p) => {
                    format!("`{s}`: the port {p} is out of range: {PORTS}, or 0 for any free port")
                }
                None => {
                    format!("`{s}` is not an IP:PORT address (e.g. 127.0.0.1:8080 or [::]:8080)")
                }
            };
            serde::de::Error::custom(message)
        })
    }
}

/// What a port may be.
const PORTS: &str = "a port is a number from 1 to 65535";

/// The port of `host:port` when it is a number a port cannot be.
fn port_out_of_range(s: &str) -> Option<&str> {
    let (host, port) = s.rsplit_once(':')?;
    let numeric = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
    (numeric && port.parse::<u16>().is_err() && !host.is_empty() && !host.ends_with(':'))
        .then_some(port)
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
pub(super) struct BackendUrl {
    pub(super) url: String,
    pub(super) port: u16,
    /// Whether the URL wrote its port (else the scheme's: 80 or 443).
    pub(super) port_given: bool,
    /// Every address of the host, without repeats (never empty), or why there is none.
    pub(super) addrs: Result<Vec<SocketAddr>, String>,
    /// `host:port` when the host is a name, not an address.
    pub(super) name: Option<String>,
    /// For `https://`: the host name (SNI, certificate check).
    pub(super) tls_host: Option<String>,
}

impl<'de> Deserialize<'de> for BackendUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_backend_url(&s).map_err(serde::de::Error::custom)
    }
}

pub(super) fn parse_backend_url(s: &str) -> Result<BackendUrl, String> {
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
    if let Some(p) = port_out_of_range(hostport) {
        return Err(format!("`{s}`: the port {p} is out of range: {PORTS}"));
    }
    let port_given = hostport
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !hostport.ends_with(']');
    let with_port = if port_given {
        hostport.to_string()
    } else {
        format!("{hostport}:{default_port}")
    };
    let port = with_port
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(default_port);
    if port == 0 {
        return Err(format!(
            "`{s}`: port 0 is not a port a server listens on ({PORTS})"
        ));
    }
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
        port_given,
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
pub(super) struct ByteSize(pub(super) usize);

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
pub(super) struct HumanDuration(pub(super) Duration);

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
