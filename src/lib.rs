//! vllm-edge: a vLLM-aware OpenAI gateway on Pingora.
//!
//! ```text
//!  client ──h1/h2c, or TLS (tls::CertResolver) with h2/http1.1 by ALPN──▶
//!                     proxy::Gateway (Pingora ProxyHttp)
//!                       request_filter: openai::route; auth::ApiKeys::admit (401/429)
//!                                       → local answers (/health, /v1/models)
//!                                       or proxy::body::read_full_body (capped, replayable)
//!                                       → openai::inspect_request → RoutingInfo {model, stream, ...}
//!                       upstream_peer:  selection::Selector::best(fleet.load(), request,
//!                                       tried) → HttpPeer (pooled) + fleet::InFlightGuard
//!                       request_body_filter: replay the full body on every attempt
//!                       connected_to_upstream: proxy::deadline::Watchdog (first byte, chunk
//!                                       gap, total)
//!                       fail_to_connect / error_while_proxy: count the failure against the
//!                                       backend (health: circuit breaker); retry on
//!                                       another replica while nothing has reached the
//!                                       client, within max_attempts and the retry budget
//!                       fail_to_proxy:  OpenAI-shaped JSON error, or an SSE error event
//!                                       for a stream that already began
//!  background: scraper::Scraper ── /metrics (every 250 ms) and /v1/models of every
//!              backend, parsed by engine_metrics ──▶ Fleet (ArcSwap snapshot)
//!              health::HealthChecker ── /health of every backend (hysteresis), probes
//!              of open circuits ──▶ Backend::health (atomics)
//!  SIGHUP: reload::Reloader ── config file, certificates, keys ──▶ live Config
//!          (ArcSwap) + Fleet backends + listeners' certificates
//!  SIGUSR2: lifecycle ── starts the new binary, which takes the listening sockets over
//!           Pingora's upgrade socket (SIGQUIT to the old process)
//!  admin listener: admin::AdminApp (/health /ready /metrics /load-stats /dashboard),
//!                  admin::HistorySampler (the dashboard's last 90 s)
//! ```
//!
//! Modules, one concept each:
//! - [`config`]: the YAML schema, precise errors, validation, every default;
//! - [`openai`]: routes, request inspection, error bodies;
//! - [`form`]: `multipart/form-data` bodies (the audio endpoints' uploads);
//! - [`fleet`]: backend identity, live state snapshot, in-flight counting;
//! - [`selection`]: replica selection policies (pure);
//! - [`scraper`]: the background service that observes backends;
//! - [`health`]: whether a backend takes requests (checks, circuit breaker, draining),
//!   and the retry budget;
//! - [`engine_metrics`]: parsing an engine's `/metrics` into load signals;
//! - [`httpclient`]: the small HTTP client the background services use;
//! - [`rounds`]: their periodic visits, each backend on its own clock;
//! - [`proxy`]: the data plane;
//! - [`admin`], [`metrics`]: the admin listener and the gateway's metrics;
//! - [`reload`]: SIGHUP re-reads and swaps the configuration;
//! - [`auth`]: API keys, per-key limits, secrets (admin token, backend keys);
//! - [`tls`]: listener certificates, replaced on reload;
//! - [`lifecycle`]: zero-downtime binary upgrade, systemd notifications;
//! - [`server`]: wiring the Pingora server from a `Config`;
//! - [`sim`]: the simulated vLLM server;
//! - [`demo`]: a simulated fleet plus the gateway in one process;
//! - [`top`]: `vllm-edge top`, the fleet live in a terminal.

pub mod admin;
pub mod auth;
pub mod cli;
pub mod config;
pub mod cors;
pub mod engine;
pub mod fleet;
pub mod httpclient;
pub mod metrics;
pub mod observe;
pub mod openai;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod sim;
pub mod tls;
