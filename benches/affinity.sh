#!/usr/bin/env bash
# Prefix-cache affinity benchmark (see benches/affinity.rs): round-robin, vllm with and
# without affinity, affinity alone, and vllm-router cache_aware, through one and three
# router instances. Installs vllm-router (PyPI venv under target/) when missing.
# Environment: AF_SECONDS, AF_LOAD, AF_ROUTERS, AF_WORKLOADS, AF_SEED, AF_WARMUP.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
. benches/vllm-router.sh
cargo bench --locked --bench affinity
