//! From a file's text to a validated [`Config`]: the schema read by serde, then one check
//! per section, each applying its defaults (from `defaults`) and naming the key, line and
//! column of what it refuses. Files a config names (certificates, keys) are read here,
//! relative to the config file's directory, and backend host names are resolved.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::auth::{api_keys, shared_limits};
use super::error::{locate_key, plain_words, strip_key_prefix, strip_location, syntax_words};
use super::file::*;
use super::traces::otlp;
use super::{
    affinity, client_limits, defaults, flow, BackendConfig, Config, ConfigError, HealthPolicy,
    Listener, ListenerTls, Policy, Timeouts,
};
use crate::auth::Secret;
use crate::cors::Cors;
use crate::tls::{client_config, BackendTls, TlsFiles, TlsPart};

/// What every section's check needs: where the file is (for the line of a key), and the
/// directory its paths are relative to; and what it found to warn about.
pub(super) struct Check<'a> {
    text: &'a str,
    shown: String,
    base: PathBuf,
    warnings: std::cell::RefCell<Vec<String>>,
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

    /// Something legal but probably not meant: said by `check` and logged at start.
    fn warn(&self, key: &str, message: impl Into<String>) {
        self.warnings
            .borrow_mut()
            .push(self.invalid(key, message).to_string());
    }

    /// A path the file names, relative to the file's directory, made absolute (messages
    /// show where it was looked for).
    pub(super) fn resolve(&self, p: &str) -> PathBuf {
        let joined = self.base.join(p);
        std::path::absolute(&joined).unwrap_or(joined)
    }
}

/// The mistakes found so far, and the keys they are about: a later check of a key whose
/// value was already refused (or a part of it) says nothing more.
struct Found {
    errors: Vec<ConfigError>,
    refused: Vec<String>,
}

impl Found {
    fn take<T>(&mut self, r: Result<T, ConfigError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.add(e);
                None
            }
        }
    }

    /// A value the schema refused: later checks of its key (or a part of it) say nothing.
    fn refuse(&mut self, e: ConfigError) {
        self.refused.extend(e.key().map(str::to_string));
        self.errors.push(e);
    }

    fn add(&mut self, e: ConfigError) {
        let errors = match e {
            ConfigError::Several(all) => all,
            e => vec![e],
        };
        for e in errors {
            let covered = e.key().is_some_and(|k| {
                self.refused
                    .iter()
                    .any(|r| k.starts_with(r.as_str()) || r.starts_with(k))
            });
            if !covered {
                self.errors.push(e);
            }
        }
    }

    fn into_error(self) -> ConfigError {
        ConfigError::all(self.errors)
    }
}

/// `d`, or `default` when the file leaves the key out.
pub(super) fn dur(d: Option<HumanDuration>, default: Duration) -> Duration {
    d.map_or(default, |d| d.0)
}

impl Config {
    /// Parses and validates `text`; `path` is only used in messages and to find the files
    /// the config names. Every mistake is reported, not only the first.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let c = Check {
            text,
            shown: path.display().to_string(),
            base: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            warnings: Default::default(),
        };
        let (file, mut found) = read(&c)?;
        let Some(file) = file else {
            return Err(found.into_error());
        };
        let listeners = found.take(listeners(&c, file.listeners));
        let admin = found.take(admin(&c, file.admin));
        if let (Some(l), Some((a, _))) = (&listeners, &admin) {
            found.take(separate_addresses(&c, l, *a));
        }
        let api_keys = found.take(api_keys(&c, &file.auth));
        let shared_limits = found.take(shared_limits(&c, &file.auth));
        let otlp = found.take(otlp(&c, &file.tracing));
        let cors = found.take(cors(&c, &file.cors));
        let upstream_ca_file = file.upstream.ca_file.as_deref().map(|p| c.resolve(p));
        let fleet = found.take(backends(&c, file.backends, upstream_ca_file.as_deref()));
        let routing = found.take(routing(&c, &file.routing));
        let upstream = found.take(upstream(&c, &file.upstream));
        let health = found.take(health(&c, &file.health));
        let timeouts = found.take(timeouts(&c, &file.timeouts));
        let discovery = found.take(discovery(&c, &file.discovery));
        let server = found.take(server(&c, &file.server));
        let affinity = found.take(affinity(&file.routing.affinity, &|k, m| c.invalid(k, m)));
        let limits = found.take(client_limits(&file.limits, &|k, m| c.invalid(k, m)));
        let flow = found.take(flow(&file.flow_control, &|k, m| c.invalid(k, m)));
        let (
            Some(listeners),
            Some((admin, admin_token)),
            Some(api_keys),
            Some(shared_limits),
            Some(otlp),
            Some(cors),
            Some(fleet),
            Some(routing),
            Some(upstream),
            Some(health),
            Some((connect_timeout, timeouts)),
            Some(discovery),
            Some(server),
            Some(affinity),
            Some(limits),
            Some(flow),
        ) = (
            listeners,
            admin,
            api_keys,
            shared_limits,
            otlp,
            cors,
            fleet,
            routing,
            upstream,
            health,
            timeouts,
            discovery,
            server,
            affinity,
            limits,
            flow,
        )
        else {
            return Err(found.into_error());
        };
        if !found.errors.is_empty() {
            return Err(found.into_error());
        }
        Ok(Config {
            source: path.to_path_buf(),
            listeners,
            admin,
            admin_token,
            api_keys,
            shared_limits,
            cors,
            backends: fleet.backends,
            groups: fleet.groups,
            unresolved: fleet.unresolved,
            policy: routing.policy,
            default_model: routing.default_model,
            model_aliases: routing.model_aliases,
            tokenizers: routing.tokenizers,
            engine_priority: file.routing.scheduling_policy
                == Some(super::SchedulingPolicy::Priority),
            flow,
            affinity,
            limits,
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
            otlp,
            access_log: file.log.access.unwrap_or(true),
            warnings: c.warnings.into_inner(),
        })
    }
}

/// The file's schema, read by serde. A value serde refuses is reported and then taken out
/// of the way (made empty, or its key removed) so that the rest of the file is read too:
/// every mistyped value and unknown key is reported, not only the first. Text that is not
/// YAML is one error (no parser can say what follows a broken line).
fn read(c: &Check) -> Result<(Option<FileConfig>, Found), ConfigError> {
    let syntax = |e: serde_yaml::Error| {
        let (line, column, message) = syntax_words(c.text, &e);
        ConfigError::Syntax {
            path: c.shown.clone(),
            line,
            column,
            message,
        }
    };
    let mut value: serde_yaml::Value = serde_yaml::from_str(c.text).map_err(syntax)?;
    if value.is_null() {
        // Empty, or only comments: an empty mapping, which then fails with a clear key.
        value = serde_yaml::Value::Mapping(Default::default());
    }
    let mut found = Found {
        errors: Vec::new(),
        refused: Vec::new(),
    };
    let mut tries: Vec<(String, u8)> = Vec::new();
    // Bounded: each round reports or repairs one value, at most twice each.
    for _ in 0..200 {
        let e = match serde_path_to_error::deserialize::<_, FileConfig>(value.clone()) {
            Ok(file) => return Ok((Some(file), found)),
            Err(e) => e,
        };
        let segments: Vec<serde_path_to_error::Segment> = e.path().iter().cloned().collect();
        let key = e.path().to_string();
        let message = plain_words(&strip_key_prefix(
            &strip_location(&e.inner().to_string()),
            &key,
        ));
        if segments.is_empty() || key == "." {
            found.errors.push(ConfigError::Syntax {
                path: c.shown.clone(),
                line: 1,
                column: 1,
                message: format!(
                    "{message}: the file holds sections of `key: value` lines (listeners, \
                     backends, routing, ...)"
                ),
            });
            return Ok((None, found));
        }
        let round = match tries.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                tries.push((key.clone(), 1));
                found.refuse(c.invalid(&key, message.clone()));
                1
            }
        };
        let unknown_key = message.starts_with("unknown key");
        if round > 2 || !repair(&mut value, &segments, round == 1 && !unknown_key) {
            return Ok((None, found));
        }
    }
    Ok((None, found))
}

/// Takes the value at `path` out of serde's way: `empty` makes it null (an optional value
/// left out); else its key is removed (a defaulted value left out), or a list item made an
/// empty mapping (so the items after it keep their indices). False if there is no such value.
fn repair(
    root: &mut serde_yaml::Value,
    path: &[serde_path_to_error::Segment],
    empty: bool,
) -> bool {
    use serde_path_to_error::Segment;
    use serde_yaml::Value;
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut node = root;
    for seg in parents {
        let next = match (seg, node) {
            (Segment::Seq { index }, Value::Sequence(items)) => items.get_mut(*index),
            (Segment::Map { key }, Value::Mapping(m)) => m.get_mut(key.as_str()),
            _ => None,
        };
        match next {
            Some(n) => node = n,
            None => return false,
        }
    }
    match (last, node) {
        (Segment::Seq { index }, Value::Sequence(items)) => match items.get_mut(*index) {
            Some(item) if empty => *item = Value::Null,
            Some(item) => *item = Value::Mapping(Default::default()),
            None => return false,
        },
        (Segment::Map { key }, Value::Mapping(m)) => {
            if empty {
                match m.get_mut(key.as_str()) {
                    Some(v) => *v = Value::Null,
                    None => return false,
                }
            } else if m.remove(key.as_str()).is_none() {
                return false;
            }
        }
        _ => return false,
    }
    true
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
    let mut found = Vec::new();
    let mut listeners = Vec::with_capacity(file.len());
    for (i, l) in file.into_iter().enumerate() {
        let Some(address) = l.address else {
            found.push(c.invalid(
                &format!("listeners[{i}]"),
                "the key `address` is required (e.g. `address: 0.0.0.0:8080`)",
            ));
            continue;
        };
        let tls = match l.tls {
            None => None,
            Some(t) => match listener_tls(c, i, t) {
                Ok(tls) => Some(tls),
                Err(e) => {
                    found.push(e);
                    continue;
                }
            },
        };
        listeners.push(Listener {
            addr: address.0,
            tls,
        });
    }
    match found.is_empty() {
        true => Ok(listeners),
        false => Err(ConfigError::all(found)),
    }
}

/// `listeners[i].tls`: both files named, read and belonging together; a message names the
/// key of the file at fault and where it was looked for.
fn listener_tls(c: &Check, i: usize, t: FileTls) -> Result<ListenerTls, ConfigError> {
    let key = |k: &str| format!("listeners[{i}].tls.{k}");
    let (Some(cert), Some(key_file)) = (&t.cert, &t.key) else {
        let missing = if t.cert.is_none() { "cert" } else { "key" };
        return Err(c.invalid(
            &format!("listeners[{i}].tls"),
            format!("the key `{missing}` is required: TLS needs a certificate chain (`cert`) and its private key (`key`), PEM files"),
        ));
    };
    let files = TlsFiles {
        cert: c.resolve(cert),
        key: c.resolve(key_file),
    };
    let cert = files.load().map_err(|e| {
        let at = match e.part {
            TlsPart::Cert => key("cert"),
            TlsPart::Key => key("key"),
            TlsPart::Pair => format!("listeners[{i}].tls"),
        };
        c.invalid(&at, e.message)
    })?;
    Ok(ListenerTls { files, cert })
}

/// `admin:`: its address, and the token it requires if a file gives one.
fn admin(c: &Check, file: Option<FileAdmin>) -> Result<(SocketAddr, Option<Secret>), ConfigError> {
    let Some(a) = file else {
        let addr = defaults::ADMIN_LISTEN
            .parse()
            .expect("default admin address");
        return Ok((addr, None));
    };
    let Some(address) = a.address else {
        return Err(c.invalid(
            "admin",
            "the key `address` is required (e.g. `address: 127.0.0.1:9090`)",
        ));
    };
    let token = match a.token_file {
        None => None,
        Some(f) => {
            Some(Secret::read(&c.resolve(&f)).map_err(|m| c.invalid("admin.token_file", m))?)
        }
    };
    Ok((address.0, token))
}

/// `cors:`.
fn cors(c: &Check, cors: &FileCors) -> Result<Option<Cors>, ConfigError> {
    match cors.allowed_origins.as_slice() {
        [] => Ok(None),
        list => Cors::new(list)
            .map(Some)
            .map_err(|(i, m)| c.invalid(&format!("cors.allowed_origins[{i}]"), m)),
    }
}

/// No address listened on twice, and the admin API on an address of its own.
fn separate_addresses(
    c: &Check,
    listeners: &[Listener],
    admin: SocketAddr,
) -> Result<(), ConfigError> {
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.addr).collect();
    let mut found = Vec::new();
    for (i, l) in addrs.iter().enumerate() {
        if l.port() != 0 && addrs[..i].contains(l) {
            found.push(c.invalid(
                &format!("listeners[{i}].address"),
                format!("{l} is listed twice"),
            ));
        }
        if l.port() != 0 && *l == admin {
            found.push(c.invalid(
                "admin.address",
                format!("{l} is also a data-plane listener; the admin API must be separate"),
            ));
        }
    }
    match found.is_empty() {
        true => Ok(()),
        false => Err(ConfigError::all(found)),
    }
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
    let mut found = Vec::new();
    if let Some(p) = ca_file {
        // Checked even with no https:// backend yet: a reload may add one.
        if let Err(m) = client_config(Some(p), true) {
            found.push(c.invalid("upstream.ca_file", m));
        }
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
        let Some(url) = &b.url else {
            found.push(c.invalid(
                &format!("backends[{i}]"),
                "the key `url` is required (e.g. `url: http://127.0.0.1:8000`)",
            ));
            continue;
        };
        let addrs = url.addrs.clone().unwrap_or_default();
        let addresses = b.addresses;
        let entry = match backend(c, i, b, &mut tls) {
            Ok(entry) => entry,
            Err(e) => {
                found.push(e);
                continue;
            }
        };
        let twice = |c: &Check| {
            c.invalid(
                &format!("backends[{i}]"),
                format!(
                    "backend `{}` is listed twice (give each a distinct url or name)",
                    entry.name
                ),
            )
        };
        if out
            .backends
            .iter()
            .chain(&out.unresolved)
            .chain(&out.groups)
            .any(|o| o.name == entry.name)
        {
            found.push(twice(c));
            continue;
        }
        match addresses {
            Addresses::First if addrs.is_empty() => out.unresolved.push(entry),
            Addresses::First => out.backends.push(entry),
            Addresses::All if entry.resolve.is_none() => found.push(c.invalid(
                &format!("backends[{i}].addresses"),
                "`all` is for a URL whose host is a name with several addresses; \
                 this one is an address",
            )),
            Addresses::All => {
                grouped.extend(addrs.iter().map(|&a| entry.at(a)));
                out.groups.push(entry);
            }
        }
    }
    if !found.is_empty() {
        return Err(ConfigError::all(found));
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
    let Some(url) = b.url else {
        return Err(c.invalid(&format!("backends[{i}]"), "the key `url` is required"));
    };
    let mut found = Vec::new();
    let addr = match &url.addrs {
        Ok(a) => preferred_address(a).expect("never empty"),
        Err(m) if url.name.is_some() => {
            c.warn(
                &key("url"),
                format!(
                    "{m}: the gateway starts without this backend and adds it when the name \
                     resolves (tried again every discovery.dns_interval)"
                ),
            );
            SocketAddr::from(([0, 0, 0, 0], url.port))
        }
        Err(m) => return Err(c.invalid(&key("url"), m.clone())),
    };
    if !url.port_given && url.tls_host.is_none() {
        c.warn(
            &key("url"),
            format!(
                "`{}` names no port, so port 80 is used; vLLM listens on 8000 unless told \
                 otherwise (write the port, even 80, to say which)",
                url.url
            ),
        );
    }
    let name = b
        .name
        .or_else(|| url.name.clone())
        .unwrap_or_else(|| addr.to_string());
    if name.is_empty() || !name.bytes().all(|ch| ch.is_ascii_graphic() || ch == b' ') {
        found.push(c.invalid(
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
            found.push(c.invalid(
                &key("models"),
                "list at least one non-empty model name, or omit the key to discover models \
                 from /v1/models",
            ));
        }
    }
    let weight = b.weight.unwrap_or(defaults::BACKEND_WEIGHT);
    if !(weight.is_finite() && weight > 0.0) {
        found.push(c.invalid(
            &key("weight"),
            format!("must be a positive number, got {weight}"),
        ));
    }
    if b.max_concurrent_requests == Some(0) {
        found.push(c.invalid(&key("max_concurrent_requests"), "must be at least 1"));
    }
    let api_key = match &b.api_key_file {
        None => None,
        Some(f) => match Secret::read(&c.resolve(f)) {
            Ok(s) => Some(s),
            Err(m) => {
                found.push(c.invalid(&key("api_key_file"), m));
                None
            }
        },
    };
    let tls = match &url.tls_host {
        None if b.tls_verify.is_some() => {
            found.push(c.invalid(&key("tls_verify"), "only https:// backends speak TLS"));
            None
        }
        None => None,
        Some(host) => {
            let verify = b.tls_verify.unwrap_or(true);
            match tls_clients.get(c, verify) {
                Ok(client) => Some(BackendTls {
                    sni: host.clone(),
                    verify,
                    client,
                }),
                Err(e) => {
                    found.push(e);
                    None
                }
            }
        }
    };
    let kv_events = match (&b.kv_events, &b.kv_events_replay) {
        (None, None) => None,
        (None, Some(_)) => {
            found.push(c.invalid(
                &key("kv_events_replay"),
                "a replay socket needs its publisher: set `kv_events` too",
            ));
            None
        }
        (Some(e), replay) => {
            let endpoint = zmq_endpoint(e).map_err(|m| found.push(c.invalid(&key("kv_events"), m)));
            let replay = replay.as_deref().map(|r| {
                zmq_endpoint(r).map_err(|m| found.push(c.invalid(&key("kv_events_replay"), m)))
            });
            match (endpoint, replay.transpose()) {
                (Ok(endpoint), Ok(replay)) => Some(super::KvEvents { endpoint, replay }),
                _ => None,
            }
        }
    };
    if !found.is_empty() {
        return Err(ConfigError::all(found));
    }
    Ok(BackendConfig {
        kv_events,
        tls,
        api_key,
        name,
        url: url.url,
        addr,
        resolve: url.name,
        group: None,
        static_models: b.models,
        weight,
        max_concurrent_requests: b.max_concurrent_requests,
        drain: b.drain,
    })
}

/// A ZMQ endpoint the gateway connects to: `tcp://HOST:PORT`.
fn zmq_endpoint(s: &str) -> Result<String, String> {
    let example = "e.g. tcp://10.0.0.5:5557, the host of the engine and the port of its \
                   --kv-events-config endpoint";
    let Some(hostport) = s.strip_prefix("tcp://") else {
        return Err(format!("`{s}` must be tcp://HOST:PORT ({example})"));
    };
    let port = hostport
        .rsplit_once(':')
        .map(|(h, p)| (h, p.parse::<u16>()));
    match port {
        Some((host, Ok(p))) if p > 0 && !host.is_empty() && !host.contains(['*', '/']) => {
            Ok(s.to_string())
        }
        Some((host, _)) if host.contains('*') => Err(format!(
            "`{s}` is where the engine binds; give the address the gateway connects to \
             ({example})"
        )),
        _ => Err(format!(
            "`{s}` must be tcp://HOST:PORT with a port 1–65535 ({example})"
        )),
    }
}

/// `routing:` but its affinity: the policy, the default model, the aliases and the
/// tokenizers.
struct Routing {
    policy: Policy,
    default_model: Option<String>,
    model_aliases: std::collections::BTreeMap<String, String>,
    tokenizers: std::collections::BTreeMap<String, Arc<crate::tokenize::Tokenizer>>,
}

fn routing(c: &Check, r: &FileRouting) -> Result<Routing, ConfigError> {
    // Model names are written into request bodies and forms as they are.
    let model_name = |m: &str| !m.is_empty() && !m.chars().any(char::is_control);
    const NOT_A_NAME: &str = "must be a model name: not empty, no control characters";
    let mut found = Vec::new();
    if r.default_model.as_deref().is_some_and(|m| !model_name(m)) {
        found.push(c.invalid("routing.default_model", NOT_A_NAME));
    }
    for (alias, target) in &r.model_aliases {
        let key = format!("routing.model_aliases.{alias}");
        if !model_name(alias) || !model_name(target) {
            found.push(c.invalid(&key, NOT_A_NAME));
        } else if r.model_aliases.contains_key(target) {
            found.push(c.invalid(
                &key,
                format!("`{target}` is an alias itself; name the model it stands for"),
            ));
        }
    }
    let mut tokenizers = std::collections::BTreeMap::new();
    for (model, dir) in &r.tokenizers {
        let key = format!("routing.tokenizers.{model}");
        if !model_name(model) {
            found.push(c.invalid(&key, NOT_A_NAME));
            continue;
        }
        match crate::tokenize::Tokenizer::load(&c.resolve(dir)) {
            Ok(t) => {
                tokenizers.insert(model.clone(), Arc::new(t));
            }
            Err(m) => found.push(c.invalid(
                &key,
                format!("{m} (give the model's directory as vLLM loads it)"),
            )),
        }
    }
    if !found.is_empty() {
        return Err(ConfigError::all(found));
    }
    Ok(Routing {
        policy: r.policy.unwrap_or(defaults::POLICY),
        default_model: r.default_model.clone(),
        model_aliases: r.model_aliases.clone(),
        tokenizers,
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
    let mut found = Vec::new();
    let max_attempts = u.max_attempts.unwrap_or(defaults::MAX_ATTEMPTS);
    if !(1..=10).contains(&max_attempts) {
        found.push(c.invalid(
            "upstream.max_attempts",
            format!("must be between 1 and 10, got {max_attempts}"),
        ));
    }
    let retry_budget_ratio = u.retry_budget.unwrap_or(defaults::RETRY_BUDGET_RATIO);
    if !(0.0..=1.0).contains(&retry_budget_ratio) {
        found.push(c.invalid(
            "upstream.retry_budget",
            format!("must be a fraction between 0 and 1, got {retry_budget_ratio}"),
        ));
    }
    if !found.is_empty() {
        return Err(ConfigError::all(found));
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
    let mut found = above_zero(c, &[("health.timeout", health.timeout)]);
    for (key, v) in [
        ("health.unhealthy_threshold", health.unhealthy_threshold),
        ("health.healthy_threshold", health.healthy_threshold),
        ("health.failure_threshold", health.failure_threshold),
    ] {
        if v == 0 {
            found.push(c.invalid(key, "must be at least 1"));
        }
    }
    if health.interval < Duration::from_millis(10) {
        found.push(c.invalid("health.interval", "must be at least 10ms"));
    }
    match found.is_empty() {
        true => Ok(health),
        false => Err(ConfigError::all(found)),
    }
}

/// A zero timeout fails every attempt: every request, check or scrape.
fn above_zero(c: &Check, values: &[(&str, Duration)]) -> Vec<ConfigError> {
    values
        .iter()
        .filter(|(_, v)| v.is_zero())
        .map(|(key, _)| c.invalid(key, "must be above zero"))
        .collect()
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
    let found = above_zero(
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
    );
    match found.is_empty() {
        true => Ok((connect, timeouts)),
        false => Err(ConfigError::all(found)),
    }
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
    let mut found = above_zero(
        c,
        &[
            ("discovery.scrape_timeout", out.scrape_timeout),
            ("discovery.timeout", out.timeout),
        ],
    );
    for (key, v) in [
        ("discovery.scrape_interval", out.scrape_interval),
        ("discovery.models_interval", out.models_interval),
        ("discovery.dns_interval", out.dns_interval),
    ] {
        if v < Duration::from_millis(10) {
            found.push(c.invalid(key, "must be at least 10ms"));
        }
    }
    match found.is_empty() {
        true => Ok(out),
        false => Err(ConfigError::all(found)),
    }
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
