#!/usr/bin/env python3
"""Instructions per request through the gateway, counted by valgrind's callgrind: the
same for the same binary and inputs whatever else the machine is doing, so a before and
after that requests/s cannot tell apart on a noisy 2-core machine can be told apart here.

    python3 benches/instructions.py BINARY [BINARY...]

For each binary: a simulated replica (`vllm-edge sim`, outside valgrind), the gateway
under callgrind in front of it (round-robin, background checks and scrapes slowed to one
a minute so that they do not count), N keep-alive requests (a ~1 KB chat body, the one
`benches/overhead.py` sends) sent one after another, then SIGTERM. Instructions per
request = (total with N requests − total with none) / N. Environment: IR_REQUESTS (N,
default 2000), IR_POLICY (default round-robin), IR_STREAM (1: streams of 16 tokens),
IR_CAP (the replica's max_concurrent_requests), IR_EXTRA (YAML appended to the config;
`\n` for a line break).
"""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

N = int(os.environ.get("IR_REQUESTS", "2000"))
POLICY = os.environ.get("IR_POLICY", "round-robin")
STREAM = os.environ.get("IR_STREAM", "0") == "1"
# YAML appended to the gateway's config (e.g. "flow_control:\n  enabled: false\n"), and
# the backend's batch limit (max_concurrent_requests) when set.
EXTRA = os.environ.get("IR_EXTRA", "").replace("\\n", "\n")
CAP = os.environ.get("IR_CAP", "")
BODY = json.dumps({
    "model": "m",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant. " * 8},
        {"role": "user", "content": "Summarise the following text in one sentence: " + "lorem ipsum dolor sit amet " * 26},
    ],
    "max_tokens": 16,
    "stream": STREAM,
})


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, within=120):
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


def run(binary, sim_binary, requests):
    work = tempfile.mkdtemp(prefix="vllm-edge-ir-")
    sim_port, port, admin = free_port(), free_port(), free_port()
    sim = subprocess.Popen(
        [sim_binary, "sim", "--port", str(sim_port), "--model", "m", "--time-scale", "0.001"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(sim_port)
    conf = os.path.join(work, "gateway.yaml")
    with open(conf, "w") as f:
        f.write(f"""listeners:
  - address: 127.0.0.1:{port}
admin:
  address: 127.0.0.1:{admin}
backends:
  - url: http://127.0.0.1:{sim_port}
    models: [m]
{f"    max_concurrent_requests: {CAP}" + chr(10) if CAP else ""}routing:
  policy: {POLICY}
discovery:
  scrape_interval: 60s
  models_interval: 60s
health:
  interval: 60s
server:
  threads: 1
  grace_period: 0s
  graceful_shutdown_timeout: 1s
log:
  access: false
{EXTRA}""")
    out = os.path.join(work, "callgrind.out")
    gw = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", binary, "run", "-c", conf],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "VLLM_EDGE_LOG": "error"})
    wait_port(port)
    # Until the health check let the replica in (the first check decides).
    deadline = time.time() + 120
    while True:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request("POST", "/v1/chat/completions", BODY, {"content-type": "application/json"})
        r = c.getresponse()
        r.read()
        c.close()
        if r.status == 200 or time.time() > deadline:
            break
        time.sleep(0.5)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for _ in range(requests):
        conn.request("POST", "/v1/chat/completions", BODY, {"content-type": "application/json"})
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise SystemExit(f"status {r.status}")
    conn.close()
    gw.send_signal(signal.SIGTERM)
    gw.wait(timeout=300)
    sim.terminate()
    sim.wait()
    with open(out) as f:
        for line in f:
            m = re.match(r"(summary|totals): (\d+)", line)
            if m:
                return int(m.group(2))
    raise SystemExit("no totals in the callgrind output")


def main():
    binaries = sys.argv[1:]
    if not binaries:
        raise SystemExit(__doc__)
    sim_binary = binaries[0]
    print(f"# instructions per request: {N} requests, policy {POLICY}, stream {STREAM}")
    print("| binary | instructions, no request | with the requests | per request |")
    print("|---|---|---|---|")
    for b in binaries:
        idle = run(b, sim_binary, 0)
        busy = run(b, sim_binary, N)
        print(f"| {b} | {idle} | {busy} | {(busy - idle) / N:.0f} |", flush=True)


if __name__ == "__main__":
    main()
