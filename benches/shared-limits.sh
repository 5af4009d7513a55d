#!/usr/bin/env bash
# What sharing key limits through Redis costs a request (issue 34): vllm-edge without
# keys, with a key counted locally, and with the key counted in a real Redis, side by
# side. Installs nginx, haproxy, wrk and redis-server (apt) when missing; builds the
# release binary. Rewrites the "Shared limits" section of benches/RESULTS.md; raw output
# under benches/results/. Environment: SL_RUNS, OH_SECONDS, SL_RESULTS (see the .py).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
. benches/proxies.sh
if ! command -v redis-server >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi
out="benches/results/shared-limits-$(date +%F-%H%M).txt"
VLLM_EDGE="${VLLM_EDGE:-$target_dir/release/vllm-edge}" python3 benches/shared_limits.py "$@" | tee "$out"
echo "raw output: $out" >&2
