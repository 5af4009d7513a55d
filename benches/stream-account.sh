#!/usr/bin/env bash
# The account behind the streaming cost (issue 33): where a relayed event's CPU goes and
# what an open stream's memory is made of, vllm-edge against bare Pingora (see
# benches/stream_account.py). Builds both with frame pointers and without LTO, in a target
# directory of their own (target/frame-pointers), so that the profile's call chains are
# whole; the figures are for reading shares, not for comparing with stream-cost.sh's.
# Needs perf (installed when missing). Output under benches/results/.
# Usage: benches/stream-account.sh [cpu] [wakeups] [memory]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
if ! command -v perf >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq linux-perf >/dev/null
fi
. benches/proxies.sh
export CARGO_TARGET_DIR="$target_dir/frame-pointers" RUSTFLAGS="-C force-frame-pointers=yes"
export CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
export CARGO_PROFILE_RELEASE_DEBUG=line-tables-only
cargo build --release --locked
bare=$(bench_exe bare_pingora)
load=$(bench_exe stream_load)
out="benches/results/stream-account-$(date +%F-%H%M).txt"
VLLM_EDGE="$CARGO_TARGET_DIR/release/vllm-edge" BARE_PINGORA="$bare" STREAM_LOAD="$load" \
  VLLM_ROUTER="$VLLM_ROUTER" python3 benches/stream_account.py "$@" | tee "$out"
echo "raw output: $out" >&2
