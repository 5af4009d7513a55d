#!/usr/bin/env bash
# Verifies the systemd units with `systemd-analyze verify` (installs systemd if absent).
# The units name their installed paths (/usr/local/bin/vllm-edge); verify needs the
# executables to exist, so it checks a copy pointing at the freshly built binary (the
# argument; default: the debug build).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v systemd-analyze >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi
bin=$(realpath -m "${1:-${CARGO_TARGET_DIR:-target}/debug/vllm-edge}")
[ -x "$bin" ] || cargo build --locked
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
sed "s#/usr/local/bin/vllm-edge#$bin#g" systemd/vllm-edge.service >"$dir/vllm-edge.service"
cp systemd/vllm@.service "$dir/vllm@.service"
ln -s vllm@.service "$dir/vllm@gpu0.service"
out=$(cd "$dir" && SYSTEMD_LOG_LEVEL=warning systemd-analyze verify --man=no \
  ./vllm-edge.service ./vllm@gpu0.service 2>&1) || { echo "$out"; exit 1; }
# verify exits 0 on some warnings: fail on any line about our units.
if echo "$out" | grep -E "vllm(-edge|@)" ; then
  echo "systemd-analyze verify: warnings above" >&2
  exit 1
fi
echo "systemd units: verified"
