//! The background services that watch the backends: the scraper (`/metrics`, models,
//! version), the health checker (`/health`, circuit probes), each backend on its own
//! clock (`rounds`); the KV-event subscriptions that keep each engine's prefix-cache
//! index (`kv_events`).
//!
//! Uses the fleet (whose snapshots it publishes), routing (the placement it replans), the
//! engine facts and the HTTP client.

pub mod health_check;
pub mod kv_events;
pub mod rounds;
pub mod scraper;
