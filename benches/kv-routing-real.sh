#!/usr/bin/env bash
# Exact prefix routing against two real vLLM 0.32 CPU servers (benches/kv_routing_real.py):
# approximate affinity vs KV events on the same schedule. Not CI: installs vLLM (6 GB)
# into target/vllm-venv (or KR_VENV) and builds the tiny model under target/.
# Environment: KR_TENANTS, KR_REQUESTS, KR_CONCURRENCY, KR_KV_BYTES, KR_SEED, KR_CONFIGS.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
venv=${KR_VENV:-$PWD/target/vllm-venv}
scripts/real-vllm/install.sh "$venv"
model=$PWD/target/tiny-llama
if [ ! -f "$model/model.safetensors" ]; then
  "$venv/bin/python" scripts/real-vllm/tiny-model.py "$model" --tokenizer-from tests/fixtures/tiny-tokenizer
fi
cargo build --locked --release
python3 benches/kv_routing_real.py "$venv" "$model" "$target_dir/release/vllm-edge"
