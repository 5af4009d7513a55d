#!/usr/bin/env bash
# The resilience figures in benches/results/HISTORY.md: runs the fault tests (tests/it/resilience.rs
# tests/it/reload.rs and tests/it/lifecycle.rs; each drives a bounded load loop over simulated replicas on
# loopback) N times (default 3) and prints the line of figures each test reports.
#   N=5 benches/resilience.sh
set -uo pipefail
cd "$(dirname "$0")/.."
N=${N:-3}
for i in $(seq "$N"); do
  echo "## run $i"
  cargo test --locked --test it -- resilience:: reload:: lifecycle:: --nocapture --test-threads=1 2>&1 |
    grep -oE '(killed replica|stalled replica|503 replica|garbage/stale metrics|frozen while busy|hanging /metrics beside|hanging /health beside|retry budget|reloads|upgrade|idle SIGTERM|SIGTERM mid-stream): .*|test result.*|panicked.*'
done
