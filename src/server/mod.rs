//! Builds and runs the Pingora server from a validated [`Config`]: the data-plane proxy
//! service, the admin service and the background scraper, wired together.
//!
//! Uses every layer below it; only the programs (`cli`) are above.
//!
//! Start-up is a transaction ([`bind`], then [`run`]): every listen address is bound first
//! (`listen`), and a failure ends the start with the address and the reason; every service
//! runs guarded (`guard`), so a part that dies takes the process down instead of leaving
//! it serving nothing. When every listener accepts connections, one JSON line is printed on
//! stdout, always: `{"event":"ready","listeners":["127.0.0.1:PORT"],"admin":"127.0.0.1:PORT",
//! "pid":N}`; tests and scripts wait for that line instead of sleeping, and a port 0 in the
//! config shows there as the port the system picked.

pub mod guard;
pub mod lifecycle;
pub mod listen;
pub mod reload;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::ListenerConfig;
use pingora::prelude::*;
use pingora::protocols::l4::stream::{L4BufferSettings, DEFAULT_L4_WRITE_BUFFER_SIZE};
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
use crate::flow::FlowControl;
use crate::observe::scraper::Scraper;
use crate::proxy::trace::Traces;
use crate::proxy::{Gateway, Traffic};
use crate::routing::affinity::Placer;
use crate::server::reload::Reloader;
use crate::tls::CertResolver;
use guard::{Guarded, Lifetime};
use lifecycle::Handover;
use listen::{BindError, Listening, Role};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
}

/// The gateway's bound sockets, before anything runs.
pub struct Sockets {
    listeners: Vec<Listening>,
    admin: Listening,
    upgrade: bool,
}

impl Sockets {
    /// The data-plane addresses, concrete (a port 0 is the port picked).
    pub fn listeners(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.addr).collect()
    }

    pub fn admin(&self) -> SocketAddr {
        self.admin.addr
    }
}

/// Binds every listen address of `config`, data and admin. With `upgrade`, addresses the
/// running gateway holds are left for it to hand over (see `listen`).
pub fn bind(config: &Config, upgrade: bool) -> Result<Sockets, StartError> {
    let listeners = config
        .listeners
        .iter()
        .map(|l| Listening::bind(l.addr, Role::Data, upgrade))
        .collect::<Result<_, _>>()?;
    let admin = Listening::bind(config.admin, Role::Admin, upgrade)?;
    Ok(Sockets {
        listeners,
        admin,
        upgrade,
    })
}

/// Runs the gateway on its bound `sockets` until it is told to stop; never returns. With
/// an upgrade, the listening sockets the running gateway holds are taken over (see
/// `crate::server::lifecycle`).
pub fn run(config: Config, sockets: Sockets) -> ! {
    let config = Arc::new(config);
    check_descriptor_limit(&config);
    let Sockets {
        listeners,
        admin,
        upgrade,
    } = sockets;
    let listen_addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.addr).collect();
    let mut server = pingora_server(&config, upgrade);
    let traffic = Arc::new(Traffic::default());
    if let Err(e) = lifecycle::listen_for_upgrade(Handover {
        config: config.source.clone(),
        listeners: listen_addrs.clone(),
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
    let kv_events = background_service(
        "kv-events",
        crate::observe::kv_events::KvEventsService {
            fleet: fleet.clone(),
        },
    );
    let flow = FlowControl::new(live.clone(), fleet.clone());
    let traces = match config.otlp.as_ref().map(Traces::start) {
        None => None,
        Some(Ok(t)) => Some(Arc::new(t)),
        Some(Err(e)) => {
            tracing::error!(error = %e, "traces are off: the OTLP exporter did not start");
            None
        }
    };
    let gateway = Gateway::new(
        live.clone(),
        fleet.clone(),
        placer.clone(),
        traffic.clone(),
        flow.clone(),
    )
    .with_traces(traces.clone());
    let drainer = background_service(
        "drain",
        Drainer {
            traffic,
            grace_period: config.grace_period,
            flow: flow.clone(),
            traces,
        },
    );
    let queues = background_service("flow", FlowService { flow: flow.clone() });
    let proxy = data_plane(&server, gateway, &live, &listen_addrs, &certs);

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
            flow,
        },
    );
    admin_svc.add_tcp(&admin.addr.to_string());
    let admin_addr = admin.addr;
    let announcer = background_service(
        "ready",
        ReadyAnnouncer {
            listeners: listen_addrs.clone(),
            admin: admin.addr,
            upgrade,
            ready,
        },
    );

    let forever = Lifetime::UntilShutdown;
    let scraper_h = server.add_service(Guarded::background(scraper, forever));
    let proxy_h = server.add_service(Guarded::listening(proxy, listeners));
    proxy_h.add_dependency(&scraper_h);
    let admin_h = server.add_service(Guarded::listening(admin_svc, vec![admin]));
    let announcer_h = server.add_service(Guarded::background(announcer, Lifetime::Once));
    server.add_service(Guarded::background(drainer, forever));
    server.add_service(Guarded::background(queues, forever));
    server.add_service(Guarded::background(kv_events, forever));
    let sampler_h = server.add_service(Guarded::background(sampler, forever));
    sampler_h.add_dependency(&scraper_h);
    announcer_h.add_dependency(&proxy_h);
    announcer_h.add_dependency(&admin_h);

    log_start(&config, &listen_addrs, admin_addr);
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
    listeners: &[SocketAddr],
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
        let read_buffer = if cert.is_some() {
            TLS_CLIENT_READ_BUFFER
        } else {
            0
        };
        let endpoint = ListenerConfig::tcp(l.to_string()).l4_buffer(L4BufferSettings::new(
            read_buffer,
            DEFAULT_L4_WRITE_BUFFER_SIZE,
        ));
        match cert {
            None => proxy.add_listener(endpoint),
            Some(resolver) => {
                // TLS 1.2 and 1.3 only (Pingora's rustls acceptor allows no other), ALPN
                // `h2` then `http/1.1`; the certificate comes from the resolver, which a
                // reload updates.
                let mut tls = TlsSettings::intermediate("", "")
                    .expect("TLS settings without files cannot fail");
                tls.set_cert_resolver(resolver.clone());
                tls.enable_h2();
                proxy.add_listener(endpoint.tls(tls));
            }
        }
    }
    proxy
}

/// The start, in words: `listeners="http://127.0.0.1:8080, https://[::]:8443"`.
fn log_start(config: &Config, listeners: &[SocketAddr], admin: SocketAddr) {
    let urls: Vec<String> = config
        .listeners
        .iter()
        .zip(listeners)
        .map(|(l, a)| format!("{}://{a}", if l.tls.is_some() { "https" } else { "http" }))
        .collect();
    tracing::info!(
        listeners = %urls.join(", "),
        admin = %format!("http://{admin}"),
        backends = config.backends.len(),
        policy = %config.policy,
        "starting vllm-edge"
    );
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
}

/// Ends a graceful shutdown as soon as no request is left. Pingora itself sleeps the
/// whole grace period after SIGTERM, even when idle; this waits for the in-flight requests
/// and streams (at most the grace period), then exits the process.
struct Drainer {
    traffic: Arc<Traffic>,
    grace_period: Duration,
    flow: Arc<FlowControl>,
    /// Its spans still queued are sent before the process exits.
    traces: Option<Arc<Traces>>,
}

/// Lets queued requests go when a scrape shows room (`FlowControl::run`); runs through a
/// shutdown, whose queued requests are let go as slots free.
struct FlowService {
    flow: Arc<FlowControl>,
}

#[async_trait]
impl BackgroundService for FlowService {
    async fn start(&self, _shutdown: ShutdownWatch) {
        self.flow.clone().run(std::future::pending()).await
    }
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
        // Queued requests still get slots as they free, for most of the grace period;
        // the rest are refused in time for their clients to retry elsewhere.
        self.flow.close(started + self.grace_period.mul_f64(0.75));
        let left = self.traffic.active_requests();
        tracing::info!(
            in_flight = left,
            grace_period_s = self.grace_period.as_secs_f64(),
            "shutting down: waiting for requests in flight"
        );
        // Polled: the count has no waker, and 10 ms is nothing next to a grace period.
        while self.traffic.active_requests() > 0 {
            if started.elapsed() >= self.grace_period {
                // Pingora's own grace period ends now too and stops the runtimes.
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::info!(
            after_ms = started.elapsed().as_millis() as u64,
            "no request in flight: exiting"
        );
        if let Some(t) = self.traces.clone() {
            let _ = tokio::task::spawn_blocking(move || t.flush()).await;
        }
        std::process::exit(0);
    }
}

/// Ends a readiness probe: says it sends nothing, then waits (at most `within`) for the
/// gateway to close it; true if it did. The connection itself always succeeds (the socket
/// was bound and listening before Pingora started): only a close shows that the
/// gateway's accept loop runs. A probe dropped at once would also still hold one of
/// `limits.max_connections` for a moment after the ready line.
async fn closed_by_peer(mut probe: tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = probe.shutdown().await;
    let mut buf = [0u8; 256];
    tokio::time::timeout(within, async {
        while matches!(probe.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await
    .is_ok()
}

/// The read buffer under TLS of a client connection (Pingora's default is 64 KiB, held
/// for as long as the connection is open, a stream's whole answer): a TLS record is at
/// most 16 KiB, read a header and a record at a time, so 16 KiB spares those reads a
/// system call each. A plain-HTTP connection has none: Pingora reads a request head into
/// a buffer of its own and a body straight into the body's, so a buffer beneath them only
/// added a copy and the pages a read touched (4-5 KiB per open stream, measured with
/// `benches/stream-cost.sh`).
const TLS_CLIENT_READ_BUFFER: usize = 16 * 1024;

/// How long a listener may take, once its service started, to accept a first connection.
const ACCEPTS_WITHIN: Duration = Duration::from_secs(10);

/// Waits until every listener accepts connections, then says so once: on stdout (the JSON
/// ready line), to systemd, in `/ready` and in the log. A listener that accepts nothing
/// within [`ACCEPTS_WITHIN`] ends the process: it never says ready.
struct ReadyAnnouncer {
    listeners: Vec<SocketAddr>,
    admin: SocketAddr,
    /// Took the sockets over from a predecessor: tell systemd this is the main process now.
    upgrade: bool,
    ready: Arc<AtomicBool>,
}

#[async_trait]
impl BackgroundService for ReadyAnnouncer {
    async fn start(&self, _shutdown: ShutdownWatch) {
        // Pingora reports its listening services ready before their accept loops run.
        let admin = std::iter::once((self.admin, Role::Admin));
        for (addr, role) in self.listeners.iter().map(|&a| (a, Role::Data)).chain(admin) {
            let accepted = match tokio::net::TcpStream::connect(addr).await {
                Ok(probe) => closed_by_peer(probe, ACCEPTS_WITHIN).await,
                Err(_) => false,
            };
            if !accepted {
                guard::fatal(&format!(
                    "the {role} on {addr} accepts no connection {}s after start",
                    ACCEPTS_WITHIN.as_secs()
                ));
            }
        }
        self.ready.store(true, Ordering::Relaxed);
        let listeners: Vec<String> = self.listeners.iter().map(|a| a.to_string()).collect();
        let line = serde_json::json!({
            "event": "ready",
            "listeners": listeners,
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
        tracing::info!(
            listeners = %listeners.join(", "),
            admin = %self.admin,
            "ready"
        );
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
        assert!(closed_by_peer(probe, Duration::from_secs(10)).await);
        assert!(closed.load(Ordering::SeqCst), "returned before the close");
        server.await.unwrap();
    }
}
