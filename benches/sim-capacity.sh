#!/usr/bin/env bash
# How much load one core of simulated vLLM replicas carries (writes a markdown table).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo bench --locked --bench sim_capacity
