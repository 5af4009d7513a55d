#!/usr/bin/env bash
# Flow control on full simulated fleets (see benches/flow_control.rs): a noisy neighbour,
# a burst with and without late binding, a heterogeneous fleet; vllm-edge with flow
# control, without it, and nginx least_conn, side by side. Installs nginx (apt) when
# missing. Environment: FC_SECONDS, FC_RUNS, FC_ONLY (see the .rs).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
. benches/nginx.sh
out="benches/results/flow-control-$(date +%F-%H%M).txt"
cargo bench --locked --bench flow_control | tee "$out"
echo "raw output: $out" >&2
