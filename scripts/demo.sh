#!/usr/bin/env bash
# Builds vllm-edge and runs `vllm-edge demo`: three simulated vLLM replicas behind the
# gateway on 127.0.0.1:8080 (admin on 127.0.0.1:9090). Extra arguments go to `demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --release --locked
exec "$target_dir/release/vllm-edge" demo "$@"
