//! What an engine says about itself: its `/metrics` read into load signals, its models
//! and its version.

pub mod metrics;
pub mod models;
