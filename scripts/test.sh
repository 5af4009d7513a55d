#!/usr/bin/env bash
# Builds vllm-edge and runs every check: no path outside the repository, formatting and
# clippy, unit and integration tests (cargo), the systemd units, the end-to-end check with
# the official `openai` Python SDK against `vllm-edge demo`, and the dashboard in Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
# The shared-limits tests start a real Redis.
if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing redis-server (the shared-limits tests start one)..." >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi

# The repository needs nothing beside it: no file but the documentation may name a path
# out of it (the recorded vLLM outputs live in tests/fixtures/).
outside=$(grep -rlE '\.\./shared\b|/work/shared' --exclude-dir=target --exclude-dir=.git \
  --exclude='*.md' --exclude=test.sh . || true)
if [ -n "$outside" ]; then
  echo "test.sh: these files read a path outside the repository:" $outside >&2
  exit 1
fi

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked
# The benchmarks are not run here, but they must keep compiling.
cargo build --locked --benches
# Tests that load the machine (10,000 connections) run alone, after the others, so their
# load cannot upset the timing of the rest.
cargo test --locked --test it -- --ignored --test-threads=1

# The systemd units (systemd-analyze verify).
bash scripts/check-systemd.sh "$target_dir/debug/vllm-edge"

# The SDK goes into a venv under target/ (reused between runs).
venv=target/e2e-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import openai" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "openai>=1.40,<3"
fi
"$venv/bin/python" tests/e2e/openai_sdk.py "$target_dir/debug/vllm-edge"

# The live dashboard in headless Chromium against the demo under load (skipped, loudly,
# only where Chromium cannot be installed).
status=0
bash scripts/dashboard-check.sh "$target_dir/debug/vllm-edge" "$target_dir/dashboard.png" || status=$?
case $status in
  0) ;;
  3) echo "test.sh: dashboard check SKIPPED: chromium cannot be installed here" >&2 ;;
  *) exit "$status" ;;
esac
