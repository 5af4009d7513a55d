//! The `vllm-edge` binary: its allocator, and the command line (`vllm_edge::cli`).

use std::process::ExitCode;

/// The request path allocates and frees many small buffers (see benches/results/HISTORY.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    vllm_edge::cli::main()
}
