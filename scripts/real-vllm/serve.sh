#!/usr/bin/env bash
# Starts one real vLLM 0.32 (CPU build) on the tiny model with prefix caching and KV
# events, for fixtures and benchmarks (not CI). See tests/fixtures/vllm-0.32/README.md.
#   scripts/real-vllm/serve.sh VENV MODEL_DIR CORE HTTP_PORT EVENTS_PORT REPLAY_PORT [KV_BYTES]
set -euo pipefail
venv=$1 model=$2 core=$3 port=$4 events=$5 replay=$6 kv=${7:-64M}
. "$venv/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 VLLM_TARGET_DEVICE=cpu \
  VLLM_HOST_IP=127.0.0.1 VLLM_CPU_OMP_THREADS_BIND=$core
exec taskset -c "$core" vllm serve "$model" --host 127.0.0.1 --port "$port" \
  --served-model-name tiny-llama --dtype bfloat16 --max-model-len 2048 \
  --max-num-seqs 32 --enforce-eager --kv-cache-memory-bytes "$kv" \
  --enable-prefix-caching --prefix-caching-hash-algo sha256_cbor \
  --kv-events-config "{\"enable_kv_cache_events\":true,\"publisher\":\"zmq\",\"endpoint\":\"tcp://*:$events\",\"replay_endpoint\":\"tcp://*:$replay\"}"
