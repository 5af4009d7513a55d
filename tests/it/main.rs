//! Integration tests: real sockets on loopback, port 0 everywhere, the gateway binary in
//! front of in-process simulated vLLM servers.

mod adversarial;
mod affinity;
mod audio;
mod body;
mod cli;
mod discovery;
mod edge;
mod errors;
mod flow;
mod house;
mod kv_events;
mod lifecycle;
mod observability;
mod reload;
mod resilience;
mod selection;
mod shared_limits;
mod sim;
mod startup;
mod streams;
mod support;
mod traces;
