#!/usr/bin/env bash
# Exact prefix routing on KV events (benches/kv_routing.rs): least-request, vllm without
# and with approximate affinity, vllm on KV events, an oracle and vllm-router cache_aware,
# through one and three router instances, on a simulated fleet whose prefixes overflow a
# replica's KV cache. Installs vllm-router (PyPI venv under target/) when missing.
# Environment: KV_SECONDS, KV_LOAD, KV_TENANTS, KV_WARMUP, KV_SEED, KV_ROUTERS, KV_INSTANCES.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
. benches/vllm-router.sh
cargo bench --locked --bench kv_routing
