#!/usr/bin/env bash
# Opens the live dashboard (`/dashboard` on the admin listener) in headless Chromium
# against `vllm-edge demo` while a load loop runs, saves a screenshot, and fails unless the
# page shows every one of the demo's replicas, each with non-zero load.
#
#   scripts/dashboard-check.sh [BINARY] [SCREENSHOT]     (defaults: target/debug/vllm-edge,
#                                                         target/dashboard.png)
# Exit 0: checked. Exit 1: the page is wrong. Exit 3: Chromium cannot be installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/vllm-edge}
shot=${2:-target/dashboard.png}
replicas=3

if ! command -v chromium >/dev/null; then
  echo "dashboard-check: installing chromium" >&2
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
     || ! command -v chromium >/dev/null; then
    echo "dashboard-check: chromium cannot be installed here; not checked" >&2
    exit 3
  fi
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The demo on free ports; its ready line (JSON on stdout) gives the addresses.
"$bin" demo --listen 127.0.0.1:0 --admin 127.0.0.1:0 --replicas "$replicas" --time-scale 2 \
  >"$work/demo.out" 2>"$work/demo.err" &
pids+=($!)
for _ in $(seq 1 300); do
  grep -q '"event":"ready"' "$work/demo.out" 2>/dev/null && break
  kill -0 "${pids[0]}" 2>/dev/null || { cat "$work/demo.err" >&2; exit 1; }
  sleep 0.1
done
ready=$(grep '"event":"ready"' "$work/demo.out") || { echo "demo never became ready" >&2; cat "$work/demo.err" >&2; exit 1; }
listen=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["listeners"][0])' "$ready")
admin=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["admin"])' "$ready")

# The load: 6 streams per replica at all times, of random lengths; bounded to 120 s.
python3 - "$listen" "$((replicas * 6))" >"$work/load.log" 2>&1 <<'EOF' &
import http.client, json, random, sys, threading, time
addr, n = sys.argv[1], int(sys.argv[2])
host, port = addr.rsplit(":", 1)
deadline = time.time() + 120
def worker():
    while time.time() < deadline:
        body = json.dumps({"model": "sim-llama", "stream": True, "ignore_eos": True,
                           "max_tokens": random.randint(20, 400),
                           "messages": [{"role": "user", "content": "Tell me a story. " * random.randint(1, 200)}]})
        try:
            c = http.client.HTTPConnection(host, int(port), timeout=30)
            c.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
            r = c.getresponse()
            while r.read(4096):
                pass
            c.close()
        except OSError as e:
            print("load:", e, flush=True)
            time.sleep(0.2)
for _ in range(n):
    threading.Thread(target=worker, daemon=True).start()
time.sleep(max(0, deadline - time.time()))
EOF
pids+=($!)

# Wait (bounded) until the gateway itself sees load on every replica.
for _ in $(seq 1 100); do
  busy=$(curl -fsS "http://$admin/load-stats" | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(sum(1 for b in s["backends"] if (b["running"] or 0) + (b["in_flight"] or 0) > 0))')
  [ "$busy" -ge "$replicas" ] && break
  sleep 0.1
done

# A dozen seconds of history for the sparklines (the gateway samples once a second).
for _ in $(seq 1 300); do
  n=$(curl -fsS "http://$admin/load-stats?history=1" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["history"]))')
  [ "$n" -ge 12 ] && break
  sleep 0.1
done

chrome=(chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run
        --disable-background-networking --disable-component-update --disable-sync
        --hide-scrollbars --window-size=1400,820 --virtual-time-budget=6000)
mkdir -p "$(dirname "$shot")"
"${chrome[@]}" --user-data-dir="$work/profile1" --screenshot="$shot" "http://$admin/dashboard" \
  >"$work/chrome1.log" 2>&1 || { cat "$work/chrome1.log" >&2; exit 1; }
"${chrome[@]}" --user-data-dir="$work/profile2" --dump-dom "http://$admin/dashboard" \
  >"$work/dom.html" 2>"$work/chrome2.log" || { cat "$work/chrome2.log" >&2; exit 1; }

python3 - "$work/dom.html" "$replicas" <<'EOF'
import re, sys
dom, want = open(sys.argv[1]).read(), int(sys.argv[2])
body = re.search(r'<body[^>]*data-backends="(\d+)"[^>]*data-busy="(\d+)"', dom)
cards = re.findall(r'<section class="card[^"]*" data-backend="([^"]+)" data-load="([^"]+)"', dom)
print(f"dashboard-check: page shows {len(cards)} backend(s): "
      + ", ".join(f"{n} (load {l})" for n, l in cards))
if not body or not cards:
    sys.exit("dashboard-check: the page shows no backends")
if int(body.group(1)) != want or len(cards) != want:
    sys.exit(f"dashboard-check: expected {want} backends")
idle = [n for n, l in cards if float(l) <= 0]
if idle:
    sys.exit(f"dashboard-check: no load shown for {idle}")
# The fleet charts: drawn over the history the gateway kept (a dozen seconds or more),
# each with something to show under this load.
charts = dict((t, (int(n), float(top))) for t, n, top in re.findall(
    r'data-chart="([^"]+)".*?<svg[^>]*data-points="(\d+)"[^>]*data-top="([^"]+)"', dom, re.S))
print("dashboard-check: fleet charts: " + ", ".join(f"{t} ({n} points, max {top:.3g})" for t, (n, top) in charts.items()))
for t in ["requests/s", "TTFT, streams", "engine queues", "errors/s"]:
    if t not in charts:
        sys.exit(f"dashboard-check: no `{t}` chart")
    if charts[t][0] < 12:
        sys.exit(f"dashboard-check: `{t}` has {charts[t][0]} points, not the history")
for t in ["requests/s", "TTFT, streams", "engine queues"]:
    if charts[t][1] <= 1e-6:
        sys.exit(f"dashboard-check: `{t}` shows nothing under load")
# Each card's sparklines span their width: drawn over the samples there are.
sparks = [int(n) for n in re.findall(r'<div class="spark">.*?data-points="(\d+)"', dom, re.S)]
if len(sparks) != want or min(sparks) < 12:
    sys.exit(f"dashboard-check: card sparklines over {sparks} samples")
EOF
echo "dashboard-check: ok; screenshot in $shot"
