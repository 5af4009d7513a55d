//! The subcommands besides `run`: `demo` (a simulated fleet and the gateway in one
//! process) and `top` (the fleet live in a terminal).
//!
//! The top layer: uses the server, the simulator, the config and the HTTP client.

pub mod demo;
pub mod top;
