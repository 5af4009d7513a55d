# Sourced by the benchmark scripts: installs vllm-router (the peer router, from PyPI) into
# a venv under target/ when missing, and exports VLLM_ROUTER, its binary.
venv=target/bench-venv
if [ ! -x "$venv/bin/vllm-router" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "vllm-router==0.1.17"
fi
export VLLM_ROUTER="$PWD/$venv/bin/vllm-router"
