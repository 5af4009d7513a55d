//! Builds and runs the Pingora server from a validated [`Config`]: the data-plane proxy
//! service, the admin service and the background scraper, wired together.
//!
//! Uses every layer below it; only the programs (`cli`) are above.
//!
//! Listen addresses with port 0 get a free port: it is reserved by a socket that binds it
//! with `SO_REUSEPORT` (and never listens), then Pingora binds the same concrete port. When
//! every listener accepts connections, one JSON line is printed on stdout:
//! `{"event":"ready","listeners":["127.0.0.1:PORT"],"admin":"127.0.0.1:PORT"}`; tests and
//! scripts wait for that line instead of sleeping.

pub mod lifecycle;
pub mod reload;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::TcpSocketOptions;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use pingora::server::ShutdownWatch;
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::admin::{AdminApp, History, HistorySampler};
use crate::config::Config;
use crate::fleet::Fleet;
use crate::observe::scraper::Scraper;
use crate::proxy::{Gateway, Traffic};
use crate::routing::affinity::Placer;
use crate::server::reload::Reloader;
use crate::tls::CertResolver;
use lifecycle::Handover;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot reserve a port on {addr}: {source}")]
    Reserve {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A concrete listen address, and the socket holding its port if it was picked for us.
struct Bound {
    addr: SocketAddr,
    reservation: Option<socket2::Socket>,
}

fn resolve_port(addr: SocketAddr) -> Result<Bound, StartError> {
    if addr.port() != 0 {
        return Ok(Bound {
            addr,
            reservation: None,
        });
    }
    let err = |source| StartError::Reserve { addr, source };
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .map_err(err)?;
    sock.set_reuse_port(true).map_err(err)?;
    sock.bind(&addr.into()).map_err(err)?;
    let local = sock
        .local_addr()
        .map_err(err)?
        .as_socket()
        .ok_or_else(|| err(std::io::Error::other("not an inet socket")))?;
    Ok(Bound {
        addr: local,
        reservation: Some(sock),
    })
}

fn socket_options(bound: &Bound) -> TcpSocketOptions {
    let mut opts = TcpSocketOptions::default();
    if bound.reservation.is_some() {
        opts.so_reuseport = Some(true);
    }
    opts
}

/// Runs the gateway until it is told to stop; never returns.
/// With `upgrade`, the listening sockets are taken over from a running gateway (see
/// `crate::server::lifecycle`).
pub fn run(config: Config, upgrade: bool) -> Result<std::convert::Infallible, StartError> {
    let config = Arc::new(config);
    check_descriptor_limit(&config);
    let listeners: Vec<Bound> = config
        .listeners
        .iter()
        .map(|l| resolve_port(l.addr))
        .collect::<Result<_, _>>()?;
    let admin = resolve_port(config.admin)?;
    let mut server = pingora_server(&config, upgrade);
    let traffic = Arc::new(Traffic::default());
    if let Err(e) = lifecycle::listen_for_upgrade(Handover {
        config: config.source.clone(),
        listeners: listeners.iter().map(|b| b.addr).collect(),
        admin: admin.addr,
        traffic: traffic.clone(),
    }) {
        tracing::error!(error = %e, "cannot install the SIGUSR2 handler: upgrades need a restart");
    }

    let fleet = Fleet::new(&config.backends);
    let live = Arc::new(ArcSwap::from(config.clone()));
    let certs: Vec<Option<Arc<CertResolver>>> = config
        .listeners
        .iter()
        .map(|l| l.tls.as_ref().map(|t| CertResolver::new(&t.cert)))
        .collect();
    if let Err(e) = Reloader::new(live.clone(), fleet.clone(), certs.clone()).listen_for_sighup() {
        tracing::error!(error = %e, "cannot install the SIGHUP handler: reload needs a restart");
    }
    let placer = Arc::new(Placer::default());
    let scraper = background_service(
        "scraper",
        Scraper::new(fleet.clone(), &config).following(live.clone(), placer.clone()),
    );
    let gateway = Gateway::new(live.clone(), fleet.clone(), placer.clone(), traffic.clone());
    let drainer = background_service(
        "drain",
        Drainer {
            traffic,
            grace_period: config.grace_period,
        },
    );
    let proxy = data_plane(&server, gateway, &live, &listeners, &certs);

    let ready = Arc::new(AtomicBool::new(false));
    let history = Arc::new(History::default());
    let sampler = background_service(
        "history",
        HistorySampler {
            config: live.clone(),
            fleet: fleet.clone(),
            history: history.clone(),
        },
    );
    let mut admin_svc = Service::new(
        "admin".to_string(),
        AdminApp {
            config: live.clone(),
            fleet: fleet.clone(),
            ready: ready.clone(),
            history: history.clone(),
            placer,
        },
    );
    admin_svc.add_tcp_with_settings(&admin.addr.to_string(), socket_options(&admin));

    let announcer = background_service(
        "ready",
        ReadyAnnouncer {
            listeners: listeners.iter().map(|b| b.addr).collect(),
            admin: admin.addr,
            upgrade,
            ready,
            reservations: Mutex::new(
                listeners
                    .into_iter()
                    .chain(std::iter::once(admin))
                    .filter_map(|b| b.reservation)
                    .collect(),
            ),
        },
    );

    let scraper_h = server.add_service(scraper);
    let proxy_h = server.add_service(proxy);
    proxy_h.add_dependency(&scraper_h);
    let admin_h = server.add_service(admin_svc);
    let announcer_h = server.add_service(announcer);
    server.add_service(drainer);
    let sampler_h = server.add_service(sampler);
    sampler_h.add_dependency(&scraper_h);
    announcer_h.add_dependency(&proxy_h);
    announcer_h.add_dependency(&admin_h);

    log_start(&config);
    server.run_forever()
}

/// Warns when the process may open fewer descriptors than `limits.max_connections`
/// needs, after raising its soft limit as far as it may.
fn check_descriptor_limit(config: &Config) {
    let wanted = config.limits.max_connections as u64 * 2 + 256;
    match crate::proxy::conn::raise_descriptor_limit() {
        Some(n) if n < wanted => tracing::warn!(
            descriptors = n,
            max_connections = config.limits.max_connections,
            "the descriptor limit is below what limits.max_connections needs (two per \
             proxied connection); connections may fail before the limit refuses them"
        ),
        _ => {}
    }
}

/// The Pingora server for `config`, bootstrapped: with `upgrade`, once it has the
/// listening sockets of the process it takes over.
fn pingora_server(config: &Config, upgrade: bool) -> Server {
    let mut conf = ServerConf {
        threads: config.threads,
        grace_period_seconds: Some(config.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(config.graceful_shutdown_timeout.as_secs()),
        upstream_keepalive_pool_size: config.keepalive_pool_size,
        // A fail-safe only: our retry hooks decide, bounded by `max_attempts`.
        max_retries: config.max_attempts as usize + 3,
        upgrade_sock: config.upgrade_sock.to_string_lossy().into_owned(),
        // Pingora's connector trusts these for https:// backends (else the system's roots).
        ca_file: config
            .upstream_ca_file
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned()),
        ..ServerConf::default()
    };
    conf.daemon = false;
    let opt = pingora::server::configuration::Opt {
        upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    if upgrade {
        // The config is valid: ask for the sockets (bootstrap waits for them).
        lifecycle::ask_predecessor_to_hand_over();
    }
    server.bootstrap();
    server
}

/// The data-plane service: the gateway behind the client connection limits, on every
/// listener (TLS ones with their certificate resolvers), HTTP/1.1 and HTTP/2.
fn data_plane(
    server: &Server,
    gateway: Gateway,
    live: &Arc<ArcSwap<Config>>,
    listeners: &[Bound],
    certs: &[Option<Arc<CertResolver>>],
) -> Service<crate::proxy::conn::EdgeApp<pingora::proxy::HttpProxy<Gateway>>> {
    let limits = live.load().limits;
    let mut app = pingora::proxy::http_proxy(&server.configuration, gateway);
    let mut opts = pingora::apps::HttpServerOptions::default();
    // Cleartext HTTP/2 with prior knowledge, next to HTTP/1.1 on the same port.
    opts.h2c = true;
    opts.h2_idle_timeout = Some(limits.keepalive_timeout);
    app.server_options = Some(opts);
    let mut h2 = pingora::protocols::http::v2::server::H2Options::new();
    h2.max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes as u32);
    app.h2_options = Some(h2);
    let mut proxy = Service::new(
        "vllm-edge".to_string(),
        crate::proxy::conn::EdgeApp::new(app, live.clone()),
    );
    for (l, cert) in listeners.iter().zip(certs) {
        match cert {
            None => proxy.add_tcp_with_settings(&l.addr.to_string(), socket_options(l)),
            Some(resolver) => {
                // TLS 1.2 and 1.3 only (Pingora's rustls acceptor allows no other), ALPN
                // `h2` then `http/1.1`; the certificate comes from the resolver, which a
                // reload updates.
                let mut tls = TlsSettings::intermediate("", "")
                    .expect("TLS settings without files cannot fail");
                tls.set_cert_resolver(resolver.clone());
                tls.enable_h2();
                proxy.add_tls_with_settings(&l.addr.to_string(), Some(socket_options(l)), tls);
            }
        }
    }
    proxy
}

fn log_start(config: &Config) {
    tracing::info!(
        listeners = ?config.listeners,
        admin = %config.admin,
        backends = config.backends.len(),
        policy = %config.policy,
        "starting vllm-edge"
    );
    for g in config.without_addresses() {
        tracing::warn!(
            backend = %g.name,
            host = g.resolve.as_deref().unwrap_or(""),
            "its host name has no address yet; it joins the fleet when the name resolves \
             (tried again every discovery.dns_interval)"
        );
    }
}

/// Ends a graceful shutdown as soon as no request is left. Pingora itself sleeps the
/// whole grace period after SIGTERM, even when idle; this waits for the in-flight requests
/// and streams (at most the grace period), then exits the process.
struct Drainer {
    traffic: Arc<Traffic>,
    grace_period: Duration,
}

#[async_trait]
impl BackgroundService for Drainer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        let started = std::time::Instant::now();
        let left = self.traffic.active_requests();
        tracing::info!(in_flight = left, grace_period = ?self.grace_period, "shutting down: waiting for requests in flight");
        // Polled: the count has no waker, and 10 ms is nothing next to a grace period.
        while self.traffic.active_requests() > 0 {
            if started.elapsed() >= self.grace_period {
                // Pingora's own grace period ends now too and stops the runtimes.
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::info!(after = ?started.elapsed(), "no request in flight: exiting");
        std::process::exit(0);
    }
}

/// Ends a readiness probe: says it sends nothing, then waits (at most 2 s) for the
/// gateway to close it. A probe dropped at once would still hold one of
/// `limits.max_connections` for a moment after the ready line, when clients may already
/// have filled the others.
async fn closed_by_peer(mut probe: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = probe.shutdown().await;
    let mut buf = [0u8; 256];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while matches!(probe.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// Waits until every listener accepts connections, then says so once on stdout and in
/// `/ready`.
struct ReadyAnnouncer {
    listeners: Vec<SocketAddr>,
    admin: SocketAddr,
    /// Took the sockets over from a predecessor: tell systemd this is the main process now.
    upgrade: bool,
    ready: Arc<AtomicBool>,
    reservations: Mutex<Vec<socket2::Socket>>,
}

#[async_trait]
impl BackgroundService for ReadyAnnouncer {
    async fn start(&self, _shutdown: ShutdownWatch) {
        // Pingora reports its listening services ready before they bind; probe them.
        // Bounded: 10 s in 5 ms steps.
        for addr in self.listeners.iter().chain(std::iter::once(&self.admin)) {
            let mut ok = false;
            for _ in 0..2000 {
                if let Ok(probe) = tokio::net::TcpStream::connect(addr).await {
                    closed_by_peer(probe).await;
                    ok = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if !ok {
                tracing::error!(%addr, "listener did not come up");
                return;
            }
        }
        // The ports are held by Pingora's listeners now.
        self.reservations.lock().clear();
        self.ready.store(true, Ordering::Relaxed);
        let line = serde_json::json!({
            "event": "ready",
            "listeners": self.listeners.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "admin": self.admin.to_string(),
            "pid": std::process::id(),
        });
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, "{line}").and_then(|_| out.flush()) {
            // Nobody reads our stdout (closed pipe): the log line below still says it.
            tracing::debug!(error = %e, "cannot print the ready line");
        }
        if self.upgrade {
            lifecycle::notify_systemd(&format!("MAINPID={}\nREADY=1", std::process::id()));
        } else {
            lifecycle::notify_systemd("READY=1");
        }
        tracing::info!(listeners = ?self.listeners, admin = %self.admin, "ready");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_readiness_probe_ends_only_when_the_listener_has_closed_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let closed = Arc::new(AtomicBool::new(false));
        let server = {
            let closed = closed.clone();
            tokio::spawn(async move {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 16];
                // The probe says it sends nothing; the server then takes its time.
                assert_eq!(conn.read(&mut buf).await.unwrap(), 0);
                tokio::time::sleep(Duration::from_millis(50)).await;
                closed.store(true, Ordering::SeqCst);
                drop(conn);
            })
        };
        let probe = tokio::net::TcpStream::connect(addr).await.unwrap();
        closed_by_peer(probe).await;
        assert!(closed.load(Ordering::SeqCst), "returned before the close");
        server.await.unwrap();
    }
}
