#!/usr/bin/env bash
# Routing quality of every policy, nginx least_conn and vllm-router on one simulated
# fleet (see benches/routing_quality.rs). Installs nginx (apt) and vllm-router (PyPI venv
# under target/) when missing. Environment: RQ_SECONDS, RQ_LOADS, RQ_ROUTERS, and
# RQ_LORA / RQ_MAX_LORAS for the LoRA workload (see benches/routing_quality.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
. benches/nginx.sh
. benches/vllm-router.sh
cargo bench --locked --bench routing_quality
