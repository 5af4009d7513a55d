//! What an engine says about itself: its `/metrics` read into load signals.

pub mod metrics;
