//! The background services that watch the backends.

pub mod health_check;
pub mod rounds;
pub mod scraper;
