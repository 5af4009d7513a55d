#!/usr/bin/env bash
# Proxy overhead, side by side (issue 10): vllm-edge vs nginx vs HAProxy vs vllm-router vs
# direct, router pinned to core 0, load generator and fake backends on core 1. See
# benches/overhead.py for what is measured. Installs nginx, haproxy, wrk (apt) and
# vllm-router (PyPI venv under target/) when missing; builds the release binary.
# Environment: OH_SECONDS, OH_RUNS, OH_ONLY, OH_MEMORY, OH_STREAMS_ROUNDS (see the .py).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
. benches/proxies.sh
# Pingora alone, the floor of our framework (benches/bare_pingora.rs).
bare=$(bench_exe bare_pingora)
out="benches/results/overhead-$(date +%F-%H%M).txt"
VLLM_EDGE="${VLLM_EDGE:-$target_dir/release/vllm-edge}" BARE_PINGORA="$bare" VLLM_ROUTER="$VLLM_ROUTER" python3 benches/overhead.py "$@" | tee "$out"
echo "raw output: $out" >&2
