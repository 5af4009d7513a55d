//! What an engine says about itself: its `/metrics` read into load signals, its models
//! and its version.
//!
//! Uses nothing of the crate: engine facts are parsed from bytes alone.

pub mod kv_events;
pub mod metrics;
pub mod models;
