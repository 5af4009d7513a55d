# Sourced by overhead.sh and stream-cost.sh: installs the proxies they compare (nginx,
# HAProxy, wrk, taskset from apt; vllm-router from PyPI), builds the release binary, and
# defines bench_exe NAME: the path of a bench target's executable, built.
missing=()
for tool in nginx haproxy wrk taskset; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  pkgs=$(printf '%s\n' "${missing[@]}" | sed 's/^taskset$/util-linux/' | tr '\n' ' ')
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq $pkgs >/dev/null
fi
. benches/vllm-router.sh
cargo build --release --locked
bench_exe() {
  cargo bench --locked --no-run --bench "$1" --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$1"
}
