//! Hot reload: on SIGHUP (what `systemctl reload` sends) the config file is read again,
//! validated, and swapped in atomically; an invalid file changes nothing and the log says
//! exactly why (file, line, key). Between reloads, backend host names are resolved again
//! every `discovery.dns_interval`, and a backend whose name now gives other addresses
//! moves ([`Reloader::refresh_addresses`]).
//!
//! Applied at once: the backends (added, removed, drained, changed), `routing.policy`,
//! `limits`, `timeouts`, `upstream.max_attempts` and the retry budget, and
//! `health.failure_threshold`. Requests in flight finish on the backend they were sent to,
//! removed or not. Kept until a restart (logged when they differ): listener and admin
//! addresses, `server`, `discovery`, and the other `health` keys, which the running
//! listeners and loops were built from.

use arc_swap::ArcSwap;
use futures::future::BoxFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::HealthPolicy;
use crate::config::{BackendConfig, Config, ConfigError};
use crate::fleet::{Fleet, Reconfigured};
use crate::observe::health_check;
use crate::observe::scraper;
use crate::tls::CertResolver;

/// Resolves a `host:port` to every address it has now.
pub type Resolve =
    Arc<dyn Fn(String) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> + Send + Sync>;

/// The system's resolver (what the config's load used).
fn system_resolver() -> Resolve {
    Arc::new(|hostport| {
        Box::pin(async move { Ok(tokio::net::lookup_host(hostport).await?.collect()) })
    })
}

/// A move of a backend to another address: its name, from, to.
pub type Moved = (String, SocketAddr, SocketAddr);

/// What resolving the backends' host names again changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Refreshed {
    pub moved: Vec<Moved>,
    /// Backends of `addresses: all` entries that joined or left, by name.
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

impl Refreshed {
    pub fn is_empty(&self) -> bool {
        self.moved.is_empty() && self.added.is_empty() && self.removed.is_empty()
    }
}

pub struct Reloader {
    live: Arc<ArcSwap<Config>>,
    fleet: Arc<Fleet>,
    /// The TLS listeners' certificate resolvers, by listener index.
    certs: Vec<Option<Arc<CertResolver>>>,
    /// One change of the backend set at a time: a reload and an address refresh each
    /// plan from the fleet they see, and the second must see the first's.
    changing: tokio::sync::Mutex<()>,
    resolve: Resolve,
}

impl Reloader {
    pub fn new(
        live: Arc<ArcSwap<Config>>,
        fleet: Arc<Fleet>,
        certs: Vec<Option<Arc<CertResolver>>>,
    ) -> Reloader {
        Reloader {
            live,
            fleet,
            certs,
            changing: tokio::sync::Mutex::new(()),
            resolve: system_resolver(),
        }
    }

    /// Resolves backend host names with `resolve` instead of the system's (tests).
    pub fn with_resolver(mut self, resolve: Resolve) -> Reloader {
        self.resolve = resolve;
        self
    }

    /// Reads the running config's file again and applies it (the backends as
    /// `Reloader::apply` does).
    pub async fn reload(&self) -> Result<Reloaded, ConfigError> {
        let _one = self.changing.lock().await;
        let cur = self.live.load_full();
        let mut new = Config::load_with_env(&cur.source)?;
        for w in &new.warnings {
            tracing::warn!("{w}");
        }
        let kept = keep_restart_only(&cur, &mut new);
        let settings = applied_settings(&cur, &new);
        let unanswered = keep_unanswered_names(&cur, &mut new);
        if !unanswered.is_empty() {
            tracing::warn!(backends = %unanswered.join(", "), "these host names did not resolve now; their backends stay at the addresses they had");
        }
        if let (Some(old), Some(shared)) = (&cur.shared_limits, new.shared_limits.as_mut()) {
            // The same Redis: its connection and the leases of running requests are kept.
            if old.settings().same_as(shared.settings()) {
                *shared = old.clone();
            }
        }
        if let (Some(old), Some(keys)) = (&cur.api_keys, new.api_keys.as_mut()) {
            Arc::get_mut(keys)
                .expect("a freshly loaded config is not shared")
                .adopt_counters(old);
        }
        if !kept.is_empty() {
            tracing::warn!(keys = %kept.join(", "), "these settings changed but need a restart; the running values are kept");
        }
        let report = self
            .apply(&new.backends, new.health, new.discovery_timeout)
            .await;
        // Certificates are read again from their files (which may have new paths): the
        // next handshakes use them, open connections keep theirs.
        for (l, resolver) in new.listeners.iter().zip(&self.certs) {
            if let (Some(tls), Some(r)) = (&l.tls, resolver) {
                r.replace(&tls.cert);
            }
        }
        let reread = read_again(&new);
        self.live.store(Arc::new(new));
        Ok(Reloaded {
            backends: report,
            settings,
            reread,
        })
    }

    /// Publishes `backends` as the fleet: those new (or changed) are checked and their
    /// models discovered first, so that they join the fleet ready to serve, and a model
    /// whose backends were all replaced is never unknown for a moment.
    async fn apply(
        &self,
        backends: &[BackendConfig],
        policy: HealthPolicy,
        timeout: Duration,
    ) -> Reconfigured {
        let before = self.fleet.load();
        let (mut entries, report) = self.fleet.plan_reconfigure(backends);
        let fresh: Vec<usize> = (0..entries.len())
            .filter(|&i| {
                !before
                    .backends
                    .iter()
                    .any(|e| Arc::ptr_eq(&e.backend, &entries[i].backend))
            })
            .collect();
        let checks = fresh.iter().map(|&i| {
            let backend = entries[i].backend.clone();
            async move {
                let models = async {
                    match backend.static_models {
                        Some(_) => None,
                        None => Some(scraper::discover_models(&backend, timeout).await),
                    }
                };
                let (models, ()) =
                    tokio::join!(models, health_check::check(backend.clone(), policy));
                models
            }
        });
        let discovered = futures::future::join_all(checks).await;
        for (&i, models) in fresh.iter().zip(discovered) {
            match models {
                Some(Ok(cards)) => {
                    entries[i].state.set_models(cards);
                }
                Some(Err(e)) => entries[i].state.models_error = Some(e),
                None => {}
            }
        }
        self.fleet.replace(entries);
        report
    }

    /// Resolves the backends' host names again. A backend whose address is no longer
    /// one of its name's moves to the first of them; the backends of an `addresses: all`
    /// entry follow its name's addresses, one each. A backend that joins is checked and
    /// its models read first, as one a reload adds; one that leaves (a replica restarted
    /// elsewhere) keeps its requests in flight. A failed or empty answer changes nothing.
    pub async fn refresh_addresses(&self) -> Refreshed {
        let _one = self.changing.lock().await;
        let cur = self.live.load_full();
        let mut names: Vec<&str> = cur
            .backends
            .iter()
            .chain(&cur.groups)
            .chain(&cur.unresolved)
            .filter_map(|b| b.resolve.as_deref())
            .collect();
        names.sort_unstable();
        names.dedup();
        if names.is_empty() {
            return Refreshed::default();
        }
        let limit = cur.discovery_timeout;
        let lookups = names.iter().map(|&n| {
            let lookup = (self.resolve)(n.to_string());
            async move { tokio::time::timeout(limit, lookup).await }
        });
        let answers = futures::future::join_all(lookups).await;
        let mut addrs_of = std::collections::HashMap::new();
        for (n, answer) in names.iter().zip(answers) {
            match answer {
                Ok(Ok(addrs)) if !addrs.is_empty() => {
                    addrs_of.insert(*n, addrs);
                }
                Ok(Ok(_)) => {
                    tracing::debug!(host = n, "a host name has no address now; kept as it was")
                }
                Ok(Err(e)) => {
                    tracing::debug!(host = n, error = %e, "cannot resolve a host name; kept as it was")
                }
                Err(_) => {
                    tracing::debug!(host = n, "resolving a host name timed out; kept as it was")
                }
            }
        }
        let answer = |b: &BackendConfig| b.resolve.as_deref().and_then(|n| addrs_of.get(n));
        let mut out = Refreshed::default();
        // The others in order, then each `addresses: all` entry's (as the config lists them).
        let mut backends: Vec<BackendConfig> = Vec::with_capacity(cur.backends.len());
        for b in cur.backends.iter().filter(|b| b.group.is_none()) {
            let mut b = b.clone();
            if let Some(to) = answer(&b).and_then(|addrs| moved_to(b.addr, addrs)) {
                out.moved.push((b.name.clone(), b.addr, to));
                b.addr = to;
            }
            backends.push(b);
        }
        // Entries whose name had no address: each joins under its own name once it has.
        let mut unresolved = Vec::new();
        for u in &cur.unresolved {
            match answer(u).and_then(|addrs| crate::config::preferred_address(addrs)) {
                Some(addr) => {
                    out.added.push(u.name.clone());
                    backends.push(BackendConfig { addr, ..u.clone() });
                }
                None => unresolved.push(u.clone()),
            }
        }
        for g in &cur.groups {
            let members: Vec<&BackendConfig> = cur
                .backends
                .iter()
                .filter(|b| b.group.as_ref() == Some(&g.name))
                .collect();
            let Some(addrs) = answer(g) else {
                backends.extend(members.into_iter().cloned());
                continue;
            };
            for m in &members {
                if !addrs.contains(&m.addr) {
                    out.removed.push(m.name.clone());
                }
            }
            for &a in addrs {
                match members.iter().find(|m| m.addr == a) {
                    Some(m) => backends.push((*m).clone()),
                    None => {
                        let joined = g.at(a);
                        out.added.push(joined.name.clone());
                        backends.push(joined);
                    }
                }
            }
        }
        if out.is_empty() {
            return out;
        }
        let moved: Vec<String> = out
            .moved
            .iter()
            .map(|(name, from, to)| format!("{name}: {from} → {to}"))
            .collect();
        tracing::warn!(
            moved = %moved.join(", "),
            added = %out.added.join(", "),
            removed = %out.removed.join(", "),
            "backend host names resolve elsewhere now"
        );
        self.apply(&backends, cur.health, cur.discovery_timeout)
            .await;
        let mut next = (*cur).clone();
        next.backends = backends;
        next.unresolved = unresolved;
        self.live.store(Arc::new(next));
        out
    }

    /// Reloads, logging and counting the outcome.
    pub async fn reload_and_log(&self) {
        match self.reload().await {
            Ok(r) => {
                crate::metrics::CONFIG_RELOADS
                    .with_label_values(&["ok"])
                    .inc();
                tracing::info!(changes = %r, "configuration reloaded");
            }
            Err(e) => {
                crate::metrics::CONFIG_RELOADS
                    .with_label_values(&["error"])
                    .inc();
                // One line per mistake, each whole.
                for p in e.problems() {
                    tracing::error!(error = %p, "configuration not reloaded; the running one is kept");
                }
            }
        }
    }

    /// Installs the SIGHUP handler now (Pingora installs none, and the default action
    /// would kill the process) and serves it on a thread of its own.
    pub fn listen_for_sighup(self) -> std::io::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut hup = {
            let _guard = rt.enter();
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?
        };
        crate::server::guard::thread("vllm-edge-reload", move || {
            rt.block_on(async {
                let every = self.live.load().dns_interval;
                let mut dns = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                dns.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        hup_got = hup.recv() => match hup_got {
                            Some(()) => self.reload_and_log().await,
                            None => break,
                        },
                        _ = dns.tick() => {
                            self.refresh_addresses().await;
                        }
                    }
                }
            })
        })?;
        Ok(())
    }
}

/// What a reload did, said in one line: `routing.policy: round-robin → vllm; backend
/// added: gpu3; read again: 3 API keys, 1 certificate`.
#[derive(Debug, Default)]
pub struct Reloaded {
    pub backends: Reconfigured,
    /// Settings applied at once that differ, as `key` or `key: old → new`.
    pub settings: Vec<String>,
    /// The files read again (they may have changed on disk).
    pub reread: Vec<String>,
}

impl std::fmt::Display for Reloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = &self.backends;
        let mut parts: Vec<String> = self.settings.clone();
        for (what, names) in [
            ("added", &b.added),
            ("removed", &b.removed),
            ("changed", &b.changed),
            ("drain changed", &b.drain_changed),
        ] {
            if !names.is_empty() {
                let s = if names.len() == 1 { "" } else { "s" };
                parts.push(format!("backend{s} {what}: {}", names.join(", ")));
            }
        }
        if parts.is_empty() {
            parts.push("no setting changed".into());
        }
        if !self.reread.is_empty() {
            parts.push(format!("read again: {}", self.reread.join(", ")));
        }
        f.write_str(&parts.join("; "))
    }
}

/// The settings a reload applies at once that `new` changes.
fn applied_settings(cur: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if cur.policy != new.policy {
        out.push(format!("routing.policy: {} → {}", cur.policy, new.policy));
    }
    if cur.max_attempts != new.max_attempts {
        out.push(format!(
            "upstream.max_attempts: {} → {}",
            cur.max_attempts, new.max_attempts
        ));
    }
    if cur.health.failure_threshold != new.health.failure_threshold {
        out.push(format!(
            "health.failure_threshold: {} → {}",
            cur.health.failure_threshold, new.health.failure_threshold
        ));
    }
    for (differs, key) in [
        (cur.limits != new.limits, "limits"),
        (
            cur.timeouts != new.timeouts || cur.connect_timeout != new.connect_timeout,
            "timeouts",
        ),
        (
            cur.retry_budget_ratio != new.retry_budget_ratio
                || cur.retry_budget_min != new.retry_budget_min,
            "upstream.retry_budget",
        ),
        (
            cur.default_model != new.default_model,
            "routing.default_model",
        ),
        (
            cur.model_aliases != new.model_aliases,
            "routing.model_aliases",
        ),
        (cur.affinity != new.affinity, "routing.affinity"),
        (cur.cors != new.cors, "cors"),
        (cur.access_log != new.access_log, "log.access"),
    ] {
        if differs {
            out.push(key.to_string());
        }
    }
    out
}

/// The files a reload read again: keys, tokens, certificates.
fn read_again(new: &Config) -> Vec<String> {
    let count = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    let mut out = Vec::new();
    if let Some(keys) = &new.api_keys {
        out.push(count(keys.len(), "API key"));
    }
    if new.admin_token.is_some() {
        out.push("the admin token".into());
    }
    let backend_keys = new.backends.iter().filter(|b| b.api_key.is_some()).count();
    if backend_keys > 0 {
        out.push(count(backend_keys, "backend key"));
    }
    let certs = new.listeners.iter().filter(|l| l.tls.is_some()).count();
    if certs > 0 {
        out.push(count(certs, "certificate"));
    }
    out
}

/// Where a backend at `cur` goes when its name resolves to `addrs`: nowhere while `cur` is
/// still one of them (answers in another order must not move it), nor when there is
/// none; else to the one a backend of that name would use at load.
fn moved_to(cur: SocketAddr, addrs: &[SocketAddr]) -> Option<SocketAddr> {
    if addrs.contains(&cur) {
        return None;
    }
    crate::config::preferred_address(addrs)
}

/// A reload resolves the file's host names anew; a name that gives no address at that
/// moment (a DNS server's hiccup) must not take its running backends out of the fleet.
/// Each entry of `new` without an address whose backends run in `cur` (same name, same
/// `host:port`) keeps them at their addresses, with the entry's new settings; the next
/// refresh moves them if the name then answers elsewhere. Returns their names.
fn keep_unanswered_names(cur: &Config, new: &mut Config) -> Vec<String> {
    let same = |a: &BackendConfig, b: &BackendConfig| a.name == b.name && a.resolve == b.resolve;
    let mut kept = Vec::new();
    let mut plain = Vec::new();
    new.unresolved.retain(|u| {
        let running = cur
            .backends
            .iter()
            .find(|b| b.group.is_none() && same(b, u));
        if let Some(b) = running {
            kept.push(u.name.clone());
            plain.push(BackendConfig {
                addr: b.addr,
                ..u.clone()
            });
        }
        running.is_none()
    });
    let mut grouped = Vec::new();
    for g in &new.groups {
        let has_members = new
            .backends
            .iter()
            .any(|b| b.group.as_ref() == Some(&g.name));
        if has_members || !cur.groups.iter().any(|c| same(c, g)) {
            continue;
        }
        for m in cur
            .backends
            .iter()
            .filter(|b| b.group.as_ref() == Some(&g.name))
        {
            kept.push(m.name.clone());
            grouped.push(g.at(m.addr));
        }
    }
    // The plain backends before the groups' ones, as a load lists them.
    let at = new
        .backends
        .iter()
        .position(|b| b.group.is_some())
        .unwrap_or(new.backends.len());
    new.backends.splice(at..at, plain);
    new.backends.extend(grouped);
    kept
}

/// Puts back into `new` the settings a reload cannot change; returns their keys where
/// they differed.
fn keep_restart_only(cur: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut kept = Vec::new();
    macro_rules! keep {
        ($($field:ident).+, $key:expr) => {
            if cur.$($field).+ != new.$($field).+ {
                kept.push($key);
                new.$($field).+ = cur.$($field).+.clone();
            }
        };
    }
    keep!(listeners, "listeners");
    keep!(admin, "admin.address");
    keep!(threads, "server.threads");
    keep!(
        limits.h2_max_concurrent_streams,
        "limits.h2_max_concurrent_streams"
    );
    keep!(grace_period, "server.grace_period");
    keep!(
        graceful_shutdown_timeout,
        "server.graceful_shutdown_timeout"
    );
    keep!(upgrade_sock, "server.upgrade_sock");
    keep!(log_format, "log.format");
    keep!(otlp, "tracing.otlp");
    keep!(upstream_ca_file, "upstream.ca_file");
    keep!(keepalive_pool_size, "upstream.keepalive_pool_size");
    keep!(scrape_interval, "discovery.scrape_interval");
    keep!(scrape_timeout, "discovery.scrape_timeout");
    keep!(models_interval, "discovery.models_interval");
    keep!(discovery_timeout, "discovery.timeout");
    keep!(dns_interval, "discovery.dns_interval");
    keep!(health.interval, "health.interval");
    keep!(health.timeout, "health.timeout");
    keep!(health.unhealthy_threshold, "health.unhealthy_threshold");
    keep!(health.healthy_threshold, "health.healthy_threshold");
    keep!(health.open_duration, "health.open_duration");
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(text: &str) -> Config {
        Config::parse(text, Path::new("t.yaml")).unwrap()
    }

    #[test]
    fn restart_only_settings_are_kept_and_named() {
        let cur = cfg("backends:\n  - url: http://127.0.0.1:1\n");
        let mut new = cfg(
            "listeners:\n  - address: 127.0.0.1:7000\nbackends:\n  - url: http://127.0.0.1:1\nrouting:\n  policy: round-robin\nhealth:\n  interval: 5s\n  failure_threshold: 9\n",
        );
        let kept = keep_restart_only(&cur, &mut new);
        assert_eq!(kept, vec!["listeners", "health.interval"]);
        assert_eq!(new.listeners, cur.listeners);
        assert_eq!(new.health.interval, cur.health.interval);
        assert_eq!(new.policy, crate::config::Policy::RoundRobin, "applied");
        assert_eq!(new.health.failure_threshold, 9, "applied");
    }

    #[test]
    fn a_reload_says_which_settings_changed_and_what_it_read_again() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("keys.txt"), "a sk-a\nb sk-b\n").unwrap();
        let at = dir.path().join("g.yaml");
        let parse = |t: &str| Config::parse(t, &at).unwrap();
        let cur =
            parse("backends:\n  - url: http://127.0.0.1:1\nrouting:\n  policy: round-robin\n");
        let new = parse(
            "backends:\n  - url: http://127.0.0.1:1\nrouting:\n  policy: vllm\nauth:\n  api_keys_file: keys.txt\nlimits:\n  max_connections: 10\n",
        );
        let r = Reloaded {
            backends: Reconfigured {
                added: vec!["gpu3".into()],
                ..Default::default()
            },
            settings: applied_settings(&cur, &new),
            reread: read_again(&new),
        };
        assert_eq!(
            r.to_string(),
            "routing.policy: round-robin → vllm; limits; backend added: gpu3; read again: 2 API keys"
        );
        let same = Reloaded {
            reread: read_again(&cur),
            ..Default::default()
        };
        assert_eq!(same.to_string(), "no setting changed");
    }

    #[test]
    fn reconfigure_keeps_unchanged_backends_and_reports_the_rest() {
        let a = cfg("backends:\n  - url: http://127.0.0.1:1\n  - url: http://127.0.0.1:2\n  - url: http://127.0.0.1:3\n    weight: 2\n");
        let fleet = Fleet::new(&a.backends);
        let before = fleet.load();
        let kept = before.backends[0].backend.clone();
        let _guard = kept.begin_request();
        let b = cfg("backends:\n  - url: http://127.0.0.1:1\n    drain: true\n  - url: http://127.0.0.1:3\n    weight: 3\n  - url: http://127.0.0.1:4\n");
        let r = fleet.reconfigure(&b.backends);
        assert_eq!(r.added, vec!["127.0.0.1:4"]);
        assert_eq!(r.removed, vec!["127.0.0.1:2"]);
        assert_eq!(r.changed, vec!["127.0.0.1:3"]);
        assert_eq!(r.drain_changed, vec!["127.0.0.1:1"]);
        let after = fleet.load();
        assert!(
            Arc::ptr_eq(&after.backends[0].backend, &kept),
            "same identity"
        );
        assert_eq!(
            after.backends[0].backend.in_flight(),
            1,
            "its counters survive"
        );
        assert!(after.backends[0].backend.health.is_draining());
        assert_eq!(after.backends[1].backend.weight, 3.0);
        assert!(fleet.reconfigure(&b.backends).is_empty(), "idempotent");
    }

    #[test]
    fn a_backend_moves_only_when_its_address_is_gone_from_its_names_answer() {
        assert_eq!(
            crate::config::preferred_address(&[
                "[::1]:1".parse().unwrap(),
                "127.0.0.1:1".parse().unwrap()
            ]),
            Some("127.0.0.1:1".parse().unwrap()),
            "`localhost` as some systems answer it"
        );
        let a: SocketAddr = "10.0.0.1:8000".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:8000".parse().unwrap();
        assert_eq!(moved_to(a, &[a]), None);
        assert_eq!(moved_to(a, &[b, a]), None, "another order");
        assert_eq!(moved_to(a, &[b]), Some(b));
        assert_eq!(moved_to(a, &[]), None, "no answer keeps it");
        // IPv4 first (vLLM listens on IPv4 unless told otherwise).
        let v6: SocketAddr = "[fd00::2]:8000".parse().unwrap();
        assert_eq!(moved_to(a, &[v6, b]), Some(b));
        assert_eq!(moved_to(a, &[v6]), Some(v6), "IPv6 alone");
    }

    /// A simulated replica serving `m` on `host`.
    async fn replica(host: &str) -> crate::sim::SimHandle {
        let mut a = crate::sim::SimArgs::defaults();
        a.host = host.parse().unwrap();
        a.port = 0;
        a.models = vec!["m".into()];
        crate::sim::spawn(a).await.unwrap()
    }

    /// What the test resolver answers (`None`: the lookup fails), and the resolver.
    type Answer = Arc<std::sync::Mutex<Option<Vec<SocketAddr>>>>;
    fn test_resolver(first: Option<Vec<SocketAddr>>) -> (Answer, Resolve) {
        let answer: Answer = Arc::new(std::sync::Mutex::new(first));
        let a = answer.clone();
        let resolve: Resolve = Arc::new(move |_| {
            let v = a.lock().unwrap().clone();
            Box::pin(async move { v.ok_or_else(|| std::io::Error::other("no such host")) })
        });
        (answer, resolve)
    }

    #[tokio::test]
    async fn a_backend_whose_name_resolves_elsewhere_moves_there_checked() {
        let (old, new) = (replica("127.0.0.1").await, replica("127.0.0.1").await);
        // `localhost` is the one name every machine resolves; the test's resolver then
        // says where it is.
        let port = old.addr.port();
        let config = cfg(&format!("backends:\n  - url: http://localhost:{port}\n"));
        assert_eq!(
            config.backends[0].resolve,
            Some(format!("localhost:{port}"))
        );
        let (answer, resolve) = test_resolver(Some(vec![old.addr]));
        let fleet = Fleet::new(&config.backends);
        let live = Arc::new(ArcSwap::from_pointee(config));
        let r = Reloader::new(live.clone(), fleet.clone(), vec![]).with_resolver(resolve);
        let before = fleet.load().backends[0].backend.clone();
        assert!(r.refresh_addresses().await.is_empty(), "still there");
        *answer.lock().unwrap() = None;
        assert!(
            r.refresh_addresses().await.is_empty(),
            "a failed lookup moves nothing"
        );
        assert!(Arc::ptr_eq(&fleet.load().backends[0].backend, &before));

        // The replica at the old address died (the checks took it out), and came back
        // at the new one.
        old.stop();
        let policy = live.load().health;
        for _ in 0..policy.unhealthy_threshold {
            health_check::check(before.clone(), policy).await;
        }
        assert!(!before.health.routable());
        *answer.lock().unwrap() = Some(vec![new.addr]);
        let moves = r.refresh_addresses().await;
        assert_eq!(moves.moved, vec![(before.name.clone(), old.addr, new.addr)]);
        assert!(moves.added.is_empty() && moves.removed.is_empty());
        let after = fleet.load();
        assert_eq!(after.backends.len(), 1);
        assert_eq!(after.backends[0].backend.addr, new.addr);
        assert_eq!(after.backends[0].backend.name, before.name, "the same name");
        assert!(
            after.backends[0].backend.health.routable(),
            "checked before it joined"
        );
        assert_eq!(after.backends[0].state.models, vec!["m".to_string()]);
        assert_eq!(live.load().backends[0].addr, new.addr, "the config follows");
        assert!(r.refresh_addresses().await.is_empty(), "settled");
    }

    #[tokio::test]
    async fn an_all_addresses_entry_follows_its_names_addresses() {
        let (a, b, c) = (
            replica("127.0.0.1").await,
            replica("127.0.0.2").await,
            replica("127.0.0.3").await,
        );
        let port = a.addr.port();
        let config = cfg(&format!(
            "backends:\n  - url: http://127.0.0.9:1\n  - url: http://localhost:{port}\n    name: pool\n    addresses: all\n"
        ));
        let names = |f: &Fleet| -> Vec<String> {
            f.load()
                .backends
                .iter()
                .map(|e| e.backend.name.clone())
                .collect()
        };
        let (answer, resolve) = test_resolver(None);
        let fleet = Fleet::new(&config.backends);
        assert_eq!(names(&fleet), ["127.0.0.9:1", "pool@127.0.0.1"]);
        let live = Arc::new(ArcSwap::from_pointee(config));
        let r = Reloader::new(live.clone(), fleet.clone(), vec![]).with_resolver(resolve);
        let first = fleet.load().backends[1].backend.clone();
        // Scaled up: two more replicas join, checked; the first keeps its identity.
        *answer.lock().unwrap() = Some(vec![a.addr, b.addr, c.addr]);
        let got = r.refresh_addresses().await;
        assert_eq!(got.added, ["pool@127.0.0.2", "pool@127.0.0.3"]);
        assert!(got.removed.is_empty() && got.moved.is_empty());
        assert_eq!(
            names(&fleet),
            [
                "127.0.0.9:1",
                "pool@127.0.0.1",
                "pool@127.0.0.2",
                "pool@127.0.0.3"
            ]
        );
        let snap = fleet.load();
        assert!(Arc::ptr_eq(&snap.backends[1].backend, &first));
        assert!(snap.backends[3].backend.health.routable());
        assert_eq!(snap.backends[3].backend.addr, c.addr);
        // A failed or empty answer changes nothing; the same answer in another order
        // neither.
        for v in [None, Some(vec![]), Some(vec![c.addr, a.addr, b.addr])] {
            *answer.lock().unwrap() = v;
            assert!(r.refresh_addresses().await.is_empty());
        }
        // Scaled down: one leaves.
        *answer.lock().unwrap() = Some(vec![a.addr, c.addr]);
        let got = r.refresh_addresses().await;
        assert_eq!(got.removed, ["pool@127.0.0.2"]);
        assert_eq!(
            names(&fleet),
            ["127.0.0.9:1", "pool@127.0.0.1", "pool@127.0.0.3"]
        );
        assert_eq!(live.load().backends.len(), 3, "the config follows");
    }

    #[tokio::test]
    async fn an_all_addresses_entry_without_addresses_yet_fills_when_they_come() {
        let a = replica("127.0.0.1").await;
        let config = cfg(&format!(
            "backends:\n  - url: http://replicas.invalid:{}\n    name: pool\n    addresses: all\n",
            a.addr.port()
        ));
        let fleet = Fleet::new(&config.backends);
        assert!(fleet.load().backends.is_empty());
        let live = Arc::new(ArcSwap::from_pointee(config));
        let (answer, resolve) = test_resolver(None);
        let r = Reloader::new(live.clone(), fleet.clone(), vec![]).with_resolver(resolve);
        assert!(r.refresh_addresses().await.is_empty());
        *answer.lock().unwrap() = Some(vec![a.addr]);
        assert_eq!(r.refresh_addresses().await.added, ["pool@127.0.0.1"]);
        let snap = fleet.load();
        assert_eq!(snap.backends.len(), 1);
        assert!(snap.backends[0].backend.health.routable());
        assert_eq!(snap.serving("m"), Some(&[0][..]));
    }

    #[tokio::test]
    async fn a_backend_whose_name_has_no_address_yet_joins_under_its_own_name() {
        let a = replica("127.0.0.1").await;
        let port = a.addr.port();
        let text = format!(
            "backends:\n  - url: http://127.0.0.9:1\n  - url: http://gpu-1.invalid:{port}\n    weight: 3\n"
        );
        let config = cfg(&text);
        assert_eq!(config.backends.len(), 1);
        assert_eq!(config.unresolved[0].name, format!("gpu-1.invalid:{port}"));
        let fleet = Fleet::new(&config.backends);
        let live = Arc::new(ArcSwap::from_pointee(config));
        let (answer, resolve) = test_resolver(None);
        let r = Reloader::new(live.clone(), fleet.clone(), vec![]).with_resolver(resolve);
        assert!(r.refresh_addresses().await.is_empty(), "still no address");
        assert_eq!(live.load().unresolved.len(), 1);
        *answer.lock().unwrap() = Some(vec![a.addr]);
        let got = r.refresh_addresses().await;
        assert_eq!(got.added, [format!("gpu-1.invalid:{port}")]);
        let snap = fleet.load();
        assert_eq!(snap.backends.len(), 2);
        let joined = &snap.backends[1];
        assert_eq!(
            joined.backend.name,
            format!("gpu-1.invalid:{port}"),
            "its own name"
        );
        assert_eq!(joined.backend.addr, a.addr);
        assert_eq!(joined.backend.weight, 3.0, "its settings");
        assert!(joined.backend.health.routable(), "checked before it joined");
        assert_eq!(snap.serving("m"), Some(&[1][..]));
        let now = live.load();
        assert!(now.unresolved.is_empty(), "the config follows");
        assert_eq!(
            now.backends[1].group, None,
            "a plain backend: it moves, not multiplies"
        );
        assert!(r.refresh_addresses().await.is_empty(), "settled");
        // A reload resolves the file's names with the system's resolver, for which
        // `.invalid` never answers: the running backend stays where it is.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vllm-edge.yaml");
        std::fs::write(&file, &text).unwrap();
        let mut with_file = (*live.load_full()).clone();
        with_file.source = file;
        live.store(Arc::new(with_file));
        let report = r.reload().await.unwrap();
        assert!(report.backends.removed.is_empty(), "{report:?}");
        let after = fleet.load();
        assert!(
            Arc::ptr_eq(&after.backends[1].backend, &joined.backend),
            "untouched"
        );
        assert!(live.load().unresolved.is_empty());
    }

    #[test]
    fn a_reload_keeps_running_backends_whose_name_does_not_answer_now() {
        let text = "backends:\n  - url: http://gpu.invalid:8000\n  - url: http://pool.invalid:8000\n    addresses: all\n";
        // What runs: both names resolved since the start.
        let mut cur = cfg(text);
        let a: SocketAddr = "10.0.0.1:8000".parse().unwrap();
        let (b, c): (SocketAddr, SocketAddr) = (
            "10.0.0.2:8000".parse().unwrap(),
            "10.0.0.3:8000".parse().unwrap(),
        );
        let gpu = BackendConfig {
            addr: a,
            ..cur.unresolved.remove(0)
        };
        cur.backends = vec![gpu, cur.groups[0].at(b), cur.groups[0].at(c)];
        // The reloaded file changes a setting; the names do not answer at this moment.
        let mut new = cfg(&text.replace("addresses: all\n", "addresses: all\n    weight: 2\n"));
        assert!(new.backends.is_empty());
        let kept = keep_unanswered_names(&cur, &mut new);
        assert_eq!(
            kept,
            [
                "gpu.invalid:8000",
                "pool.invalid:8000@10.0.0.2",
                "pool.invalid:8000@10.0.0.3"
            ]
        );
        let got: Vec<(&str, SocketAddr, f64)> = new
            .backends
            .iter()
            .map(|b| (b.name.as_str(), b.addr, b.weight))
            .collect();
        assert_eq!(
            got,
            [
                ("gpu.invalid:8000", a, 1.0),
                ("pool.invalid:8000@10.0.0.2", b, 2.0),
                ("pool.invalid:8000@10.0.0.3", c, 2.0)
            ],
            "at their addresses, with the new settings"
        );
        assert!(new.unresolved.is_empty() && new.without_addresses().next().is_none());
        // A name the running config does not have, or an entry that now names another
        // port, waits for its own answer.
        let mut other =
            cfg("backends:\n  - url: http://gpu.invalid:8001\n  - url: http://new.invalid:8000\n");
        assert!(keep_unanswered_names(&cur, &mut other).is_empty());
        assert!(other.backends.is_empty());
        assert_eq!(other.unresolved.len(), 2);
    }

    #[test]
    fn a_scrape_published_while_a_reload_checks_its_new_backends_is_kept() {
        let a = cfg("backends:\n  - url: http://127.0.0.1:1\n");
        let fleet = Fleet::new(&a.backends);
        let kept = fleet.load().backends[0].backend.clone();
        let b = cfg("backends:\n  - url: http://127.0.0.1:1\n  - url: http://127.0.0.1:2\n");
        let (entries, _) = fleet.plan_reconfigure(&b.backends);
        // The reload awaits its new backend's checks; meanwhile a scrape is published.
        let mut scraped = fleet.load().backends[0].state.clone();
        scraped.models = vec!["scraped".into()];
        scraped.observed_at = Some(std::time::Instant::now());
        fleet.update_states(&[(kept.clone(), scraped)]);
        fleet.replace(entries);
        let after = fleet.load();
        assert_eq!(after.backends.len(), 2);
        assert!(Arc::ptr_eq(&after.backends[0].backend, &kept));
        assert_eq!(after.backends[0].state.models, vec!["scraped".to_string()]);
        assert!(after.backends[0].state.observed_at.is_some());
    }
}
