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
venv=target/bench-venv
if [ ! -x "$venv/bin/vllm-router" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "vllm-router==0.1.17"
fi
cargo build --release --locked
out="benches/overhead-$(date +%F).txt"
VLLM_ROUTER="$PWD/$venv/bin/vllm-router" python3 benches/overhead.py "$@" | tee "$out"
echo "raw output: $out" >&2
