//! vllm-edge: a vLLM-aware OpenAI gateway on Pingora.
//!
//! A request's path through the modules:
//!
//! ```text
//!  client ──h1/h2c, or TLS (tls) with h2/http1.1 by ALPN──▶ proxy::conn (connection
//!  limits, head deadline) ──▶ proxy::Gateway (Pingora's ProxyHttp), phase by phase:
//!
//!   request_filter  proxy::admission, in order: its id and route (openai::route);
//!                   its head (malformed, over limits); a CORS preflight (cors); its key
//!                   (auth); the gateway's own answers (health, models, version, load);
//!                   for inference: the whole body (proxy::body, capped and replayable),
//!                   then routing::admit (openai::inspect_request, the default model or
//!                   an alias's written in, the affinity key) and routing::refusal (404,
//!                   or 503 while no replica can take it); then, while every replica of
//!                   its model is full, a wait in flow::FlowControl (a fair queue)
//!   upstream_peer   routing::Selector::best(fleet snapshot, request, tried): the
//!                   policy's pick (routing::policy), a fleet::InFlightGuard held
//!   body filter     the full body replayed on every attempt
//!   deadlines       proxy::deadline (a watchdog on the descriptor) or proxy::gate (a
//!                   stream held until its first token, timing its own reads)
//!   failure         proxy::failure: counted against the backend (fleet::health, its
//!                   circuit), retried on another replica while nothing reached the
//!                   client, within max_attempts and the retry budget; else an
//!                   OpenAI-shaped error, or an error event in a stream that began
//!   logging         proxy::outcome: the access line, metrics, tokens charged to the key
//!
//!  beside it:
//!   observe         the scraper (/metrics, models, version, parsed by engine) and the
//!                   health checker (/health, circuit probes) ──▶ fleet (ArcSwap
//!                   snapshot), each backend on its own clock; httpclient underneath
//!   admin           /health /ready /metrics /load-stats /explain (routing::admit, the
//!                   same decision as the request path) /dashboard, LoRA fan-out
//!   server          wiring, SIGHUP reload (config, certificates, keys, DNS), SIGUSR2
//!                   binary upgrade (the sockets handed over), graceful shutdown
//! ```
//!
//! The layers, bottom first; a module uses only the ones below it (checked by
//! `tests/it/house.rs`):
//!
//! 1. leaves: [`spelling`], [`metrics`] (the counted metrics), [`auth`], [`tls`], [`cors`];
//! 2. [`config`]: the file's schema, its checks, every default;
//! 3. facts: [`httpclient`], [`engine`] (what engines report), [`openai`] (the API);
//! 4. [`fleet`]: backends, their health, the snapshot a pick reads;
//! 5. [`routing`]: what is decided about a request, the policies, prefix affinity;
//! 6. [`observe`]: the background services that watch the backends;
//! 7. [`flow`]: flow control, the queues requests wait in while the fleet is full;
//! 8. [`proxy`]: the data plane;
//! 9. [`admin`]: the admin API and dashboard;
//! 10. [`server`]: wiring, reload, upgrade;
//! 11. the programs: [`sim`] (a simulated vLLM server), [`cli`] (`demo`, `top`).

pub mod admin;
pub mod auth;
pub mod cli;
pub mod config;
pub mod cors;
pub mod engine;
pub mod fleet;
pub mod flow;
pub mod httpclient;
pub mod metrics;
pub mod observe;
pub mod openai;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod sim;
pub mod spelling;
pub mod tls;
pub mod tokenize;
