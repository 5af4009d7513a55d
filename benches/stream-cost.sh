#!/usr/bin/env bash
# What relaying one streamed token costs (issue 33): vllm-edge vs direct, bare Pingora,
# nginx, HAProxy and vllm-router, side by side; router pinned to core 0, the compiled load
# side (benches/stream_load.rs) to core 1. See benches/stream_cost.py for what is measured.
# Installs nginx, haproxy, wrk (apt) and vllm-router (PyPI venv under target/) when
# missing; builds the release binary and the two bench programs. Rewrites the streaming
# section of benches/RESULTS.md; raw output under benches/results/.
# Environment: SC_QUICK=1 (one short run, under 10 minutes), SC_RUNS, SC_SECONDS, SC_ONLY,
# SC_REQUESTS, SC_RATE_1K, SC_RATE_10K, SC_RESULTS (see the .py).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
. benches/proxies.sh
bare=$(bench_exe bare_pingora)
load=$(bench_exe stream_load)
out="benches/results/stream-cost-$(date +%F-%H%M).txt"
VLLM_EDGE="${VLLM_EDGE:-$target_dir/release/vllm-edge}" BARE_PINGORA="$bare" STREAM_LOAD="$load" \
  VLLM_ROUTER="$VLLM_ROUTER" python3 benches/stream_cost.py "$@" | tee "$out"
echo "raw output: $out" >&2
