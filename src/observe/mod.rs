//! The background services that watch the backends.

pub mod rounds;
pub mod scraper;
