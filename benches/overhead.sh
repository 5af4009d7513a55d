#!/usr/bin/env bash
# Proxy overhead, side by side (issue 10): vllm-edge vs nginx vs HAProxy vs vllm-router vs
# direct, router pinned to core 0, load generator and fake backends on core 1. See
# benches/overhead.py for what is measured. Installs nginx, haproxy, wrk (apt) and
# vllm-router (PyPI venv under target/) when missing; builds the release binary.
# Environment: OH_SECONDS, OH_RUNS, OH_ONLY, OH_MEMORY, OH_STREAMS_ROUNDS (see the .py).
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
# Pingora alone, the floor of our framework (benches/bare_pingora.rs).
bare=$(cargo bench --locked --no-run --bench bare_pingora --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "bare_pingora" and m.get("executable"):
        print(m["executable"])')
out="benches/results/overhead-$(date +%F-%H%M).txt"
VLLM_EDGE="${VLLM_EDGE:-$target_dir/release/vllm-edge}" BARE_PINGORA="$bare" VLLM_ROUTER="$VLLM_ROUTER" python3 benches/overhead.py "$@" | tee "$out"
echo "raw output: $out" >&2
