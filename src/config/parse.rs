//! From a file's text to a validated [`Config`]: the schema read by serde, then one check
//! per section, each applying its defaults (from `defaults`) and naming the key, line and
//! column of what it refuses. Files a config names (certificates, keys) are read here,
//! relative to the config file's directory, and backend host names are resolved.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::error::{locate_key, strip_key_prefix, strip_location};
use super::file::*;
use super::{
    affinity, client_limits, defaults, BackendConfig, Config, ConfigError, HealthPolicy, Listener,
    ListenerTls, Policy, Timeouts,
};
use crate::auth::{ApiKeys, Secret};
use crate::cors::Cors;
use crate::tls::{client_config, BackendTls, TlsFiles};

/// What every section's check needs: where the file is (for the line of a key), and the
/// directory its paths are relative to.
pub(super) struct Check<'a> {
    text: &'a str,
    shown: String,
    base: &'a Path,
}

impl Check<'_> {
    /// The error for `key`, located in the file's text.
    pub(super) fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let (line, column) = locate_key(self.text, key);
        ConfigError::Invalid {
            path: self.shown.clone(),
            line,
            column,
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// A path the file names, relative to the file's directory.
    fn resolve(&self, p: &str) -> PathBuf {
        self.base.join(p)
    }
}

/// `d`, or `default` when the file leaves the key out.
fn dur(d: Option<HumanDuration>, default: Duration) -> Duration {
    d.map_or(default, |d| d.0)
}

impl Config {
    /// Parses and validates `text`; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file = read(text, path)?;
        let c = Check {
            text,
            shown: path.display().to_string(),
            base: path.parent().unwrap_or(Path::new(".")),
        };
        let listeners = listeners(&c, file.listeners)?;
        let (admin, admin_token) = admin(&c, file.admin)?;
        separate_addresses(&c, &listeners, admin)?;
        let api_keys = match file.auth.api_keys_file {
            None => None,
            Some(f) => Some(Arc::new(
                ApiKeys::load(&c.resolve(&f)).map_err(|m| c.invalid("auth.api_keys_file", m))?,
            )),
        };
        let cors = match file.cors.allowed_origins.as_slice() {
            [] => None,
            list => Some(
                Cors::new(list)
                    .map_err(|(i, m)| c.invalid(&format!("cors.allowed_origins[{i}]"), m))?,
            ),
        };
        let upstream_ca_file = file.upstream.ca_file.as_deref().map(|p| c.resolve(p));
        let fleet = backends(&c, file.backends, upstream_ca_file.as_deref())?;
        let routing = routing(&c, &file.routing)?;
        let upstream = upstream(&c, &file.upstream)?;
        let health = health(&c, &file.health)?;
        let (connect_timeout, timeouts) = timeouts(&c, &file.timeouts)?;
        let discovery = discovery(&c, &file.discovery)?;
        let server = server(&c, &file.server)?;
        Ok(Config {
            source: path.to_path_buf(),
            listeners,
            admin,
            admin_token,
            api_keys,
            cors,
            backends: fleet.backends,
            groups: fleet.groups,
            unresolved: fleet.unresolved,
            policy: routing.policy,
            default_model: routing.default_model,
            model_aliases: routing.model_aliases,
            affinity: affinity(&file.routing.affinity, &|k, m| c.invalid(k, m))?,
            limits: client_limits(&file.limits, &|k, m| c.invalid(k, m))?,
            connect_timeout,
            timeouts,
            pool_idle_timeout: upstream.pool_idle_timeout,
            max_attempts: upstream.max_attempts,
            retry_budget_ratio: upstream.retry_budget_ratio,
            retry_budget_min: upstream.retry_budget_min,
            health,
            upstream_ca_file,
            keepalive_pool_size: upstream.keepalive_pool_size,
            scrape_interval: discovery.scrape_interval,
            scrape_timeout: discovery.scrape_timeout,
            models_interval: discovery.models_interval,
            discovery_timeout: discovery.timeout,
            dns_interval: discovery.dns_interval,
            threads: server.threads,
            grace_period: server.grace_period,
            graceful_shutdown_timeout: server.graceful_shutdown_timeout,
            upgrade_sock: server.upgrade_sock,
            log_format: file.log.format.unwrap_or_default(),
            access_log: file.log.access.unwrap_or(true),
        })
    }
}

/// The file's schema, read by serde: a mistyped value or an unknown key is an error at
/// its exact line and column.
fn read(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
    // An empty file is an empty mapping, which then fails validation with a clear key.
    let text = if text.trim().is_empty() { "{}" } else { text };
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let (line, column) = inner.location().map_or((1, 1), |l| (l.line(), l.column()));
        let message = strip_key_prefix(&strip_location(&inner.to_string()), &key);
        ConfigError::Invalid {
            path: path.display().to_string(),
            line,
            column,
            key: if key == "." {
                "(top level)".into()
            } else {
                key
            },
            message,
        }
    })
}

/// `listeners:`, each with its certificate loaded and checked when it terminates TLS.
fn listeners(c: &Check, file: Option<Vec<FileListener>>) -> Result<Vec<Listener>, ConfigError> {
    let Some(file) = file else {
        let addr = defaults::LISTEN.parse().expect("default listen address");
        return Ok(vec![Listener::plain(addr)]);
    };
    if file.is_empty() {
        return Err(c.invalid("listeners", "at least one listener is required"));
    }
    let mut listeners = Vec::with_capacity(file.len());
    for (i, l) in file.into_iter().enumerate() {
        let tls = match l.tls {
            None => None,
            Some(t) => {
                let files = TlsFiles {
                    cert: c.resolve(&t.cert),
                    key: c.resolve(&t.key),
                };
                let cert = files
                    .load()
                    .map_err(|m| c.invalid(&format!("listeners[{i}].tls"), m))?;
                Some(ListenerTls { files, cert })
            }
        };
        listeners.push(Listener {
            addr: l.address.0,
            tls,
        });
    }
    Ok(listeners)
}

/// `admin:`: its address, and the token it requires if a file gives one.
fn admin(c: &Check, file: Option<FileAdmin>) -> Result<(SocketAddr, Option<Secret>), ConfigError> {
    let Some(a) = file else {
        let addr = defaults::ADMIN_LISTEN
            .parse()
            .expect("default admin address");
        return Ok((addr, None));
    };
    let token = match a.token_file {
        None => None,
        Some(f) => {
            Some(Secret::read(&c.resolve(&f)).map_err(|m| c.invalid("admin.token_file", m))?)
        }
    };
    Ok((a.address.0, token))
}

/// No address listened on twice, and the admin API on an address of its own.
fn separate_addresses(
    c: &Check,
    listeners: &[Listener],
    admin: SocketAddr,
) -> Result<(), ConfigError> {
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.addr).collect();
    for (i, l) in addrs.iter().enumerate() {
        if l.port() != 0 && addrs[..i].contains(l) {
            return Err(c.invalid(
                &format!("listeners[{i}].address"),
                format!("{l} is listed twice"),
            ));
        }
        if l.port() != 0 && *l == admin {
            return Err(c.invalid(
                "admin.address",
                format!("{l} is also a data-plane listener; the admin API must be separate"),
            ));
        }
    }
    Ok(())
}

/// The backends a config makes (see [`Config::backends`], `groups`, `unresolved`).
struct Backends {
    backends: Vec<BackendConfig>,
    groups: Vec<BackendConfig>,
    unresolved: Vec<BackendConfig>,
}

/// `backends:`. An entry whose host name has no address yet makes no backend until it
/// has (see `server::reload`): a replica that is not up yet must not keep the gateway
/// from starting, nor a reload from applying.
fn backends(
    c: &Check,
    file: Vec<FileBackend>,
    ca_file: Option<&Path>,
) -> Result<Backends, ConfigError> {
    if file.is_empty() {
        return Err(c.invalid(
            "backends",
            "at least one backend is required (e.g. `- url: http://127.0.0.1:8000`)",
        ));
    }
    if let Some(p) = ca_file {
        // Checked even with no https:// backend yet: a reload may add one.
        client_config(Some(p), true).map_err(|m| c.invalid("upstream.ca_file", m))?;
    }
    let mut tls = TlsClients {
        ca_file,
        made: [None, None],
    };
    let mut out = Backends {
        backends: Vec::with_capacity(file.len()),
        groups: Vec::new(),
        unresolved: Vec::new(),
    };
    // The backends of `addresses: all` entries: after the others, as a refresh lists them.
    let mut grouped: Vec<BackendConfig> = Vec::new();
    for (i, b) in file.into_iter().enumerate() {
        let addrs = match &b.url.addrs {
            Ok(a) => a.clone(),
            Err(_) => Vec::new(),
        };
        let addresses = b.addresses;
        let entry = backend(c, i, b, &mut tls)?;
        if out
            .backends
            .iter()
            .chain(&out.unresolved)
            .any(|o| o.name == entry.name)
        {
            return Err(c.invalid(
                &format!("backends[{i}]"),
                format!(
                    "backend `{}` is listed twice (give each a distinct url or name)",
                    entry.name
                ),
            ));
        }
        match addresses {
            Addresses::First if addrs.is_empty() => out.unresolved.push(entry),
            Addresses::First => out.backends.push(entry),
            Addresses::All if entry.resolve.is_none() => {
                return Err(c.invalid(
                    &format!("backends[{i}].addresses"),
                    "`all` is for a URL whose host is a name with several addresses; \
                     this one is an address",
                ))
            }
            Addresses::All => {
                if out.groups.iter().any(|g| g.name == entry.name) {
                    return Err(c.invalid(
                        &format!("backends[{i}]"),
                        format!("backend `{}` is listed twice", entry.name),
                    ));
                }
                grouped.extend(addrs.iter().map(|&a| entry.at(a)));
                out.groups.push(entry);
            }
        }
    }
    out.backends.append(&mut grouped);
    Ok(out)
}

/// The TLS client settings of `https://` backends: made once per config, one verifying
/// certificates and one not, and only if some backend needs it.
struct TlsClients<'a> {
    ca_file: Option<&'a Path>,
    made: [Option<Arc<rustls::ClientConfig>>; 2],
}

impl TlsClients<'_> {
    fn get(&mut self, c: &Check, verify: bool) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
        let slot = &mut self.made[usize::from(verify)];
        if let Some(made) = slot {
            return Ok(made.clone());
        }
        let made =
            client_config(self.ca_file, verify).map_err(|m| c.invalid("upstream.ca_file", m))?;
        *slot = Some(made.clone());
        Ok(made)
    }
}

/// One `backends[i]` entry. By default a backend is named after its URL's `host:port` (a
/// host name stays the name when its address moves), the address for an address.
fn backend(
    c: &Check,
    i: usize,
    b: FileBackend,
    tls_clients: &mut TlsClients,
) -> Result<BackendConfig, ConfigError> {
    let key = |k: &str| format!("backends[{i}].{k}");
    let addr = match &b.url.addrs {
        Ok(a) => preferred_address(a).expect("never empty"),
        Err(_) if b.url.name.is_some() => SocketAddr::from(([0, 0, 0, 0], b.url.port)),
        Err(m) => return Err(c.invalid(&key("url"), m.clone())),
    };
    let name = b
        .name
        .or_else(|| b.url.name.clone())
        .unwrap_or_else(|| addr.to_string());
    if name.is_empty() || !name.bytes().all(|ch| ch.is_ascii_graphic() || ch == b' ') {
        return Err(c.invalid(
            &key("name"),
            format!(
                "`{name}` cannot be a backend name: it is sent in the x-vllm-edge-backend \
                 response header, so use visible ASCII characters (letters, digits, \
                 punctuation, spaces)"
            ),
        ));
    }
    if let Some(models) = &b.models {
        if models.is_empty() || models.iter().any(|m| m.is_empty()) {
            return Err(c.invalid(
                &key("models"),
                "list at least one non-empty model name, or omit the key to discover models \
                 from /v1/models",
            ));
        }
    }
    let weight = b.weight.unwrap_or(defaults::BACKEND_WEIGHT);
    if !(weight.is_finite() && weight > 0.0) {
        return Err(c.invalid(
            &key("weight"),
            format!("must be a positive number, got {weight}"),
        ));
    }
    if b.max_concurrent_requests == Some(0) {
        return Err(c.invalid(&key("max_concurrent_requests"), "must be at least 1"));
    }
    let api_key = match &b.api_key_file {
        None => None,
        Some(f) => {
            Some(Secret::read(&c.resolve(f)).map_err(|m| c.invalid(&key("api_key_file"), m))?)
        }
    };
    let tls = match &b.url.tls_host {
        None if b.tls_verify.is_some() => {
            return Err(c.invalid(&key("tls_verify"), "only https:// backends speak TLS"))
        }
        None => None,
        Some(host) => {
            let verify = b.tls_verify.unwrap_or(true);
            Some(BackendTls {
                sni: host.clone(),
                verify,
                client: tls_clients.get(c, verify)?,
            })
        }
    };
    Ok(BackendConfig {
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
    })
}

/// `routing:` but its affinity: the policy, the default model and the aliases.
struct Routing {
    policy: Policy,
    default_model: Option<String>,
    model_aliases: std::collections::BTreeMap<String, String>,
}

fn routing(c: &Check, r: &FileRouting) -> Result<Routing, ConfigError> {
    // Model names are written into request bodies and forms as they are.
    let model_name = |m: &str| !m.is_empty() && !m.chars().any(char::is_control);
    const NOT_A_NAME: &str = "must be a model name: not empty, no control characters";
    if r.default_model.as_deref().is_some_and(|m| !model_name(m)) {
        return Err(c.invalid("routing.default_model", NOT_A_NAME));
    }
    for (alias, target) in &r.model_aliases {
        let key = format!("routing.model_aliases.{alias}");
        if !model_name(alias) || !model_name(target) {
            return Err(c.invalid(&key, NOT_A_NAME));
        }
        if r.model_aliases.contains_key(target) {
            return Err(c.invalid(
                &key,
                format!("`{target}` is an alias itself; name the model it stands for"),
            ));
        }
    }
    Ok(Routing {
        policy: r.policy.unwrap_or(defaults::POLICY),
        default_model: r.default_model.clone(),
        model_aliases: r.model_aliases.clone(),
    })
}

/// `upstream:` but its CA file (read with the backends).
struct Upstream {
    pool_idle_timeout: Duration,
    max_attempts: u32,
    retry_budget_ratio: f64,
    retry_budget_min: u32,
    keepalive_pool_size: usize,
}

fn upstream(c: &Check, u: &FileUpstream) -> Result<Upstream, ConfigError> {
    let max_attempts = u.max_attempts.unwrap_or(defaults::MAX_ATTEMPTS);
    if !(1..=10).contains(&max_attempts) {
        return Err(c.invalid(
            "upstream.max_attempts",
            format!("must be between 1 and 10, got {max_attempts}"),
        ));
    }
    let retry_budget_ratio = u.retry_budget.unwrap_or(defaults::RETRY_BUDGET_RATIO);
    if !(0.0..=1.0).contains(&retry_budget_ratio) {
        return Err(c.invalid(
            "upstream.retry_budget",
            format!("must be a fraction between 0 and 1, got {retry_budget_ratio}"),
        ));
    }
    Ok(Upstream {
        pool_idle_timeout: dur(u.pool_idle_timeout, defaults::POOL_IDLE_TIMEOUT),
        max_attempts,
        retry_budget_ratio,
        retry_budget_min: u.retry_budget_min.unwrap_or(defaults::RETRY_BUDGET_MIN),
        keepalive_pool_size: u
            .keepalive_pool_size
            .unwrap_or(defaults::UPSTREAM_KEEPALIVE_POOL),
    })
}

fn health(c: &Check, h: &FileHealth) -> Result<HealthPolicy, ConfigError> {
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
            return Err(c.invalid(key, "must be at least 1"));
        }
    }
    if health.interval < Duration::from_millis(10) {
        return Err(c.invalid("health.interval", "must be at least 10ms"));
    }
    above_zero(c, &[("health.timeout", health.timeout)])?;
    Ok(health)
}

/// A zero timeout fails every attempt: every request, check or scrape.
fn above_zero(c: &Check, values: &[(&str, Duration)]) -> Result<(), ConfigError> {
    match values.iter().find(|(_, v)| v.is_zero()) {
        Some((key, _)) => Err(c.invalid(key, "must be above zero")),
        None => Ok(()),
    }
}

/// `timeouts:`: the connect timeout, and the deadlines of an attempt.
fn timeouts(c: &Check, t: &FileTimeouts) -> Result<(Duration, Timeouts), ConfigError> {
    let connect = dur(t.connect, defaults::CONNECT_TIMEOUT);
    let timeouts = Timeouts {
        stream_first_byte: dur(t.stream_first_byte, defaults::STREAM_FIRST_BYTE_TIMEOUT),
        stream_chunk_gap: dur(t.stream_chunk_gap, defaults::STREAM_CHUNK_GAP_TIMEOUT),
        non_stream_first_byte: dur(
            t.non_stream_first_byte,
            defaults::NON_STREAM_FIRST_BYTE_TIMEOUT,
        ),
        non_stream_total: dur(t.non_stream_total, defaults::NON_STREAM_TOTAL_TIMEOUT),
    };
    above_zero(
        c,
        &[
            ("timeouts.connect", connect),
            ("timeouts.stream_first_byte", timeouts.stream_first_byte),
            ("timeouts.stream_chunk_gap", timeouts.stream_chunk_gap),
            (
                "timeouts.non_stream_first_byte",
                timeouts.non_stream_first_byte,
            ),
            ("timeouts.non_stream_total", timeouts.non_stream_total),
        ],
    )?;
    Ok((connect, timeouts))
}

/// `discovery:`.
struct Discovery {
    scrape_interval: Duration,
    scrape_timeout: Duration,
    models_interval: Duration,
    timeout: Duration,
    dns_interval: Duration,
}

fn discovery(c: &Check, d: &FileDiscovery) -> Result<Discovery, ConfigError> {
    let out = Discovery {
        scrape_interval: dur(d.scrape_interval, defaults::SCRAPE_INTERVAL),
        scrape_timeout: dur(d.scrape_timeout, defaults::SCRAPE_TIMEOUT),
        models_interval: dur(d.models_interval, defaults::MODELS_INTERVAL),
        timeout: dur(d.timeout, defaults::DISCOVERY_TIMEOUT),
        dns_interval: dur(d.dns_interval, defaults::DNS_INTERVAL),
    };
    above_zero(
        c,
        &[
            ("discovery.scrape_timeout", out.scrape_timeout),
            ("discovery.timeout", out.timeout),
        ],
    )?;
    for (key, v) in [
        ("discovery.scrape_interval", out.scrape_interval),
        ("discovery.models_interval", out.models_interval),
        ("discovery.dns_interval", out.dns_interval),
    ] {
        if v < Duration::from_millis(10) {
            return Err(c.invalid(key, "must be at least 10ms"));
        }
    }
    Ok(out)
}

/// `server:`.
struct Server {
    threads: usize,
    grace_period: Duration,
    graceful_shutdown_timeout: Duration,
    upgrade_sock: PathBuf,
}

fn server(c: &Check, s: &FileServer) -> Result<Server, ConfigError> {
    let threads = s.threads.unwrap_or_else(defaults::threads);
    if threads == 0 {
        return Err(c.invalid("server.threads", "must be at least 1"));
    }
    Ok(Server {
        threads,
        grace_period: dur(s.grace_period, defaults::GRACE_PERIOD),
        graceful_shutdown_timeout: dur(
            s.graceful_shutdown_timeout,
            defaults::GRACEFUL_SHUTDOWN_TIMEOUT,
        ),
        upgrade_sock: s
            .upgrade_sock
            .as_deref()
            .map_or_else(|| PathBuf::from(defaults::UPGRADE_SOCK), |p| c.resolve(p)),
    })
}
