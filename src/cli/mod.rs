//! The subcommands besides `run`.

pub mod demo;
pub mod top;
