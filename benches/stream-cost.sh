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
missing=()
for tool in nginx haproxy wrk taskset; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  pkgs=$(printf '%s\n' "${missing[@]}" | sed 's/^taskset$/util-linux/' | tr '\n' ' ')
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq $pkgs >/dev/null
fi
. benches/vllm-router.sh
cargo build --release --locked
# A bench target's executable, built (cargo bench --no-run) and found by name.
bench_exe() {
  cargo bench --locked --no-run --bench "$1" --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$1"
}
bare=$(bench_exe bare_pingora)
load=$(bench_exe stream_load)
out="benches/results/stream-cost-$(date +%F-%H%M).txt"
VLLM_EDGE="${VLLM_EDGE:-$target_dir/release/vllm-edge}" BARE_PINGORA="$bare" STREAM_LOAD="$load" \
  VLLM_ROUTER="$VLLM_ROUTER" python3 benches/stream_cost.py "$@" | tee "$out"
echo "raw output: $out" >&2
