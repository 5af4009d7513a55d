//! The background services that watch the backends: the scraper (`/metrics`, models,
//! version), the health checker (`/health`, circuit probes), each backend on its own
//! clock (`rounds`).
//!
//! Uses the fleet (whose snapshots it publishes), routing (the placement it replans), the
//! engine facts and the HTTP client.

pub mod health_check;
pub mod rounds;
pub mod scraper;
