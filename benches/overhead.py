#!/usr/bin/env python3
"""Proxy overhead, side by side: vllm-edge against nginx, HAProxy and vllm-router, and
direct to the backend, on the same machine in the same run (issue 10).

Run through `benches/overhead.sh`, which installs what this needs. The router under test
is pinned to core 0; the load generator and the fake backends to core 1.

- Requests: wrk, 64 keep-alive connections posting a ~1 KB chat body to a fake backend
  (nginx answering a canned chat completion, two "replicas"): requests/s, p50/p99/p99.9
  latency, and the router's CPU seconds per 1,000 requests (utime+stime of its processes
  from /proc).
- Streams: 32 concurrent streams of 16 events 20 ms apart from a small asyncio backend that
  stamps each event with CLOCK_MONOTONIC (shared by all processes): time to first byte,
  and each event's transit time; the delay an event gains is its transit through the
  router minus the direct transit.
- Memory (vllm-edge only): resident memory idle, and with 1,000 and 10,000 open streams.

Each configuration runs OH_RUNS times (default 2), interleaved, every other run in reverse
order; the report gives medians and the spread (min-max). Environment: OH_SECONDS (per wrk run, default 10), OH_RUNS,
OH_ONLY (comma-separated configuration names), OH_MEMORY (0 to skip), OH_STREAMS_ROUNDS,
OH_KEEP (1 keeps the temporary directory of logs),
OH_ONLY may also name "vllm-edge POLICY cap" and "vllm-edge POLICY cap noflow" (the
backends' batch limit configured, flow control on and off: what flow control costs a fleet
that is not full),
OH_BASELINE (another vllm-edge binary, e.g. an earlier commit's: adds "baseline round-robin"
and "baseline vllm", run interleaved with the rest, for a before/after in one run).
"""

import asyncio
import atexit
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDGE = os.environ.get("VLLM_EDGE", os.path.join(ROOT, "target/release/vllm-edge"))
# Pingora's proxy with nothing of ours in it (benches/bare_pingora.rs; overhead.sh builds it).
BARE = os.environ.get("BARE_PINGORA", "")
BASELINE = os.environ.get("OH_BASELINE", "")
VLLM_ROUTER = os.environ.get("VLLM_ROUTER", os.path.join(ROOT, "target/bench-venv/bin/vllm-router"))
SECONDS = int(os.environ.get("OH_SECONDS", "10"))
RUNS = int(os.environ.get("OH_RUNS", "2"))
ONLY = [s for s in os.environ.get("OH_ONLY", "").split(",") if s]
MEMORY = os.environ.get("OH_MEMORY", "1") != "0"
STREAM_ROUNDS = int(os.environ.get("OH_STREAMS_ROUNDS", "3"))
ROUTER_CORE, LOAD_CORE = "0", "1"
WORK = tempfile.mkdtemp(prefix="vllm-edge-overhead-")
# nginx's workers (user nobody when started as root) must read the canned /metrics file
# in there; a 403 would leave the `vllm` policy without engine metrics.
os.chmod(WORK, 0o755)
# The routers' logs and the backends' files go when the run ends (OH_KEEP=1 keeps them
# for a look at a failed run).
if os.environ.get("OH_KEEP") != "1":
    atexit.register(shutil.rmtree, WORK, True)

CHAT_BODY = json.dumps({
    "model": "m",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant. " * 8},
        {"role": "user", "content": "Summarise the following text in one sentence: " + "lorem ipsum dolor sit amet " * 26},
    ],
    "max_tokens": 64,
    "temperature": 0.2,
})
CANNED = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1795322698, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "A short canned answer."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 250, "completion_tokens": 6, "total_tokens": 256},
})
METRICS = open(os.path.join(ROOT, "tests/fixtures/vllm-0.32/metrics-idle.txt")).read()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def spawn(args, core, name, env=None):
    log = open(os.path.join(WORK, name + ".log"), "w")
    return subprocess.Popen(["taskset", "-c", core] + args, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)


def stop(p):
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=5)
    except Exception:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except Exception:
            pass


def tree(pid):
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            kids = open(f"/proc/{p}/task/{p}/children").read().split()
        except OSError:
            kids = []
        todo.extend(int(k) for k in kids)
    return out


def cpu_seconds(pid):
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in tree(pid):
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / tick


def rss_kib(pid):
    total = 0
    for p in tree(pid):
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


# ---------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------

def start_fake_backends(n=2):
    """nginx with n server blocks: canned chat completion, /health, /v1/models, /metrics."""
    ports = [free_port() for _ in range(n)]
    d = os.path.join(WORK, "backend")
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, "metrics.txt"), "w").write(METRICS)
    canned = CANNED.replace("\\", "\\\\").replace("'", "\\'")
    models = json.dumps({"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "vllm"}]})
    servers = "".join(f"""
      server {{ listen 127.0.0.1:{p} reuseport backlog=4096; keepalive_requests 1000000;
        location = /health {{ return 200 ''; }}
        location = /v1/models {{ default_type application/json; return 200 '{models}'; }}
        location = /metrics {{ default_type text/plain; alias {d}/metrics.txt; }}
        location / {{ default_type application/json; return 200 '{canned}'; }} }}""" for p in ports)
    conf = f"""worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/error.log;
      events {{ worker_connections 16384; }}
      http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d};
        client_body_buffer_size 64k; {servers} }}"""
    path = os.path.join(d, "nginx.conf")
    open(path, "w").write(conf)
    p = spawn(["nginx", "-c", path], LOAD_CORE, "backend-nginx")
    for port in ports:
        assert wait_port(port), "the fake backend did not start"
    return p, ports


SSE_BACKEND = r'''
import asyncio, json, sys, time
port, gap, events, hold = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "hold"
models = json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode()
async def handle(r, w):
    try:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0].decode()
            method, path = line.split()[:2]
            n = 0
            for h in head.split(b"\r\n"):
                if h.lower().startswith(b"content-length:"):
                    n = int(h.split(b":")[1])
            if n:
                await r.readexactly(n)
            if path != "/v1/chat/completions":
                body = models if path == "/v1/models" else b""
                w.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await w.drain()
                continue
            w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            i = 0
            while hold or i < events:
                ev = b'data: {"i":%d,"t":%d,"choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n' % (i, time.monotonic_ns())
                w.write(b"%x\r\n%s\r\n" % (len(ev), ev))
                await w.drain()
                i += 1
                await asyncio.sleep(gap)
            ev = b"data: [DONE]\n\n"
            w.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(ev), ev))
            await w.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        w.close()
async def main():
    s = await asyncio.start_server(handle, "127.0.0.1", port, backlog=8192, reuse_address=True)
    async with s:
        await s.serve_forever()
asyncio.run(main())
'''


def start_sse_backend(gap=0.02, events=16, hold=False):
    port = free_port()
    path = os.path.join(WORK, "sse_backend.py")
    open(path, "w").write(SSE_BACKEND)
    p = spawn([sys.executable, path, str(port), str(gap), str(events), "hold" if hold else "once"],
              LOAD_CORE, f"sse-backend-{port}")
    assert wait_port(port), "the SSE backend did not start"
    return p, port


# ---------------------------------------------------------------------------------------
# Routers
# ---------------------------------------------------------------------------------------

def start_router(name, backend_ports, stream_backend=False):
    """Returns (process or None for direct, port)."""
    if name == "direct":
        return None, backend_ports[0]
    port = free_port()
    d = os.path.join(WORK, name.replace(" ", "_"))
    os.makedirs(d, exist_ok=True)
    urls = [f"http://127.0.0.1:{p}" for p in backend_ports]
    if name.startswith("vllm-edge") or name.startswith("baseline"):
        policy = name.split()[1]
        words = name.split()[2:]
        # "... cap": the backends' batch limit configured (far above the load), so flow
        # control counts free slots on every request; "... noflow": flow control off.
        cap = "    max_concurrent_requests: 100000\n" if "cap" in words else ""
        flow = "flow_control:\n  enabled: false\n" if "noflow" in words else ""
        # "... keys": one API key with all three limits (far above the load), so every
        # request is counted; "... keys shared": counted in the Redis at OH_REDIS_URL.
        auth = ""
        if "keys" in words:
            open(os.path.join(d, "keys.txt"), "w").write(
                f"bench {BENCH_KEY} max_concurrent=1000000 rpm=1000000000 tpm=2000000000\n")
            auth = f"auth:\n  api_keys_file: {d}/keys.txt\n"
            if "shared" in words:
                auth += f"  shared:\n    redis: {os.environ['OH_REDIS_URL']}\n"
        backends = "".join(f"  - url: {u}\n    models: [m]\n{cap}" for u in urls)
        conf = (f"listeners:\n  - address: 127.0.0.1:{port}\nadmin:\n  address: 127.0.0.1:{free_port()}\n"
                f"backends:\n{backends}{flow}{auth}routing:\n  policy: {policy}\n"
                f"server:\n  threads: 1\n  upgrade_sock: {d}/upgrade.sock\n"
                f"timeouts:\n  stream_first_byte: 10m\n  stream_chunk_gap: 10m\n"
                # Room for the memory phase's streams (nginx gets 30,000 connections).
                f"limits:\n  max_connections: 20000\n")
        path = os.path.join(d, "gateway.yaml")
        open(path, "w").write(conf)
        # "... access-log": the access log on, as shipped (one line per request, to the
        # router's log file here, to journald under systemd); else off, like nginx's.
        level = "info" if name.endswith("access-log") else os.environ.get("OH_EDGE_LOG", "warn")
        env = dict(os.environ, VLLM_EDGE_LOG=level)
        binary = BASELINE if name.startswith("baseline") else EDGE
        p = spawn([binary, "run", "-c", path], ROUTER_CORE, name.replace(" ", "_"), env)
    elif name == "bare pingora":
        p = spawn([BARE, f"127.0.0.1:{port}"] + [f"127.0.0.1:{bp}" for bp in backend_ports],
                  ROUTER_CORE, "bare_pingora")
    elif name.startswith("nginx"):
        balance = "least_conn;" if "least_conn" in name else ""
        servers = "".join(f"server 127.0.0.1:{bp};" for bp in backend_ports)
        conf = f"""worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/error.log;
          worker_rlimit_nofile 65536;
          events {{ worker_connections 30000; }}
          http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d};
            upstream fleet {{ {balance} {servers} keepalive 256; }}
            server {{ listen 127.0.0.1:{port} backlog=4096; keepalive_requests 1000000;
              location / {{ proxy_pass http://fleet; proxy_http_version 1.1;
                proxy_set_header Connection ""; proxy_buffering off; proxy_request_buffering off;
                proxy_read_timeout 600s; }} }} }}"""
        path = os.path.join(d, "nginx.conf")
        open(path, "w").write(conf)
        p = spawn(["nginx", "-c", path], ROUTER_CORE, name.replace(" ", "_"))
    elif name.startswith("haproxy"):
        balance = "leastconn" if "leastconn" in name else "roundrobin"
        servers = "".join(f"  server b{i} 127.0.0.1:{bp}\n" for i, bp in enumerate(backend_ports))
        conf = f"""global
  nbthread 1
  maxconn 9500
defaults
  mode http
  timeout connect 5s
  timeout client 600s
  timeout server 600s
  option http-no-delay
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  balance {balance}
  http-reuse always
{servers}"""
        path = os.path.join(d, "haproxy.cfg")
        open(path, "w").write(conf)
        p = spawn(["haproxy", "-f", path], ROUTER_CORE, name.replace(" ", "_"))
    elif name.startswith("vllm-router"):
        policy = name.split()[1]
        p = spawn([VLLM_ROUTER, "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
                   "--log-level", "warning", "--worker-urls"] + urls, ROUTER_CORE, name.replace(" ", "_"))
    else:
        raise ValueError(name)
    if not wait_port(port, 30):
        raise RuntimeError(f"{name} did not start; see {d}")
    # Ready when a request goes through.
    for _ in range(300):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                body = CHAT_BODY.encode() if not stream_backend else json.dumps({"model": "m", "messages": [], "stream": True}).encode()
                key = b"authorization: Bearer %s\r\n" % BENCH_KEY.encode() if " keys" in name else b""
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                          b"%scontent-length: %d\r\nconnection: close\r\n\r\n%s" % (key, len(body), body))
                if s.recv(12).startswith(b"HTTP/1.1 200"):
                    return p, port
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{name} never answered 200")


# ---------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------

WRK_LUA = r'''
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.body = io.open(os.getenv("OH_BODY_FILE")):read("*a")
if os.getenv("OH_AUTH") then wrk.headers["authorization"] = os.getenv("OH_AUTH") end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d %d %d\n", summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
'''


# The API key of the "... keys" configurations.
BENCH_KEY = "sk-bench-0123456789"


def wrk_run(port, pid, key=None):
    lua = os.path.join(WORK, "post.lua")
    open(lua, "w").write(WRK_LUA)
    body = os.path.join(WORK, "body.json")
    open(body, "w").write(CHAT_BODY)
    # Warm-up (pools, caches), then the measured run.
    env = dict(os.environ, OH_BODY_FILE=body)
    if key:
        env["OH_AUTH"] = f"Bearer {key}"
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    subprocess.run(["taskset", "-c", LOAD_CORE, "wrk", "-t1", "-c64", "-d2s", "-s", lua, url],
                   env=env, capture_output=True)
    cpu0 = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(["taskset", "-c", LOAD_CORE, "wrk", "-t1", "-c64", f"-d{SECONDS}s", "-s", lua, url],
                         env=env, capture_output=True, text=True).stdout
    cpu1 = cpu_seconds(pid) if pid else 0.0
    m = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    if not m:
        raise RuntimeError("wrk printed no result:\n" + out)
    reqs, dur_us, errs, status_errs, p50, p99, p999 = map(int, m.groups())
    return {
        "rps": reqs / (dur_us / 1e6),
        "errors": errs + status_errs,
        "p50_ms": p50 / 1000, "p99_ms": p99 / 1000, "p999_ms": p999 / 1000,
        "cpu_s_per_1k": (cpu1 - cpu0) / reqs * 1000 if pid and reqs else None,
    }


async def one_stream(port, results):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    sent = time.monotonic_ns()
    w.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
    await w.drain()
    first, first_event, transit, buf = None, None, [], b""
    while True:
        chunk = await r.read(65536)
        now = time.monotonic_ns()
        if not chunk:
            break
        if first is None:
            first = now - sent
        buf += chunk
        for m in re.finditer(rb'"t":(\d+)', buf):
            transit.append((now - int(m.group(1))) / 1e6)
            if first_event is None:
                first_event = now - sent
        buf = buf[buf.rfind(b"\n") + 1:] if b'"t":' in buf else buf[-64:]
        if b"[DONE]" in chunk:
            break
    w.close()
    results.append((first / 1e6 if first else None, transit,
                    first_event / 1e6 if first_event else None))


async def streams_run(port, concurrency=32):
    results = []
    for _ in range(STREAM_ROUNDS):
        await asyncio.gather(*(one_stream(port, results) for _ in range(concurrency)))
    ttfb = sorted(t for t, _, _ in results if t is not None)
    # The first event at the client: the first token, whether or not the response head
    # came before it.
    ttfe = sorted(t for _, _, t in results if t is not None)
    transit = sorted(x for _, ts, _ in results for x in ts)
    events = sum(len(ts) for _, ts, _ in results)
    q = lambda v, p: v[min(len(v) - 1, int(p * len(v)))] if v else None
    return {"ttfb_p50_ms": q(ttfb, 0.5), "ttfb_p99_ms": q(ttfb, 0.99),
            "ttfe_p50_ms": q(ttfe, 0.5), "ttfe_p99_ms": q(ttfe, 0.99),
            "transit_p50_ms": q(transit, 0.5), "transit_p99_ms": q(transit, 0.99),
            "events": events, "streams": len(results)}


async def hold_streams(port, n, pid):
    """Opens n streams through the router, waits for each one's first event, reads the
    router's RSS, then closes them."""
    conns = []
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
           b"content-length: %d\r\n\r\n%s" % (len(body), body))
    sem = asyncio.Semaphore(200)

    failed = []

    async def open_one():
        async with sem:
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(req)
                await w.drain()
                await asyncio.wait_for(r.readuntil(b"data:"), 60)
                conns.append((r, w))
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
                failed.append(repr(e)[:200])
    await asyncio.gather(*(open_one() for _ in range(n)))
    if failed:
        print(f"memory: {len(failed)} of {n} streams did not open, e.g. {failed[0]}", flush=True)
    await asyncio.sleep(1.0)  # let allocations settle
    rss = rss_kib(pid)
    for _, w in conns:
        w.close()
    return rss, len(conns)


# ---------------------------------------------------------------------------------------

def median_spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    med = statistics.median(values)
    return med, min(values), max(values)


def rewrite_section(path, name, heading, text):
    """Replaces the text between `<!-- NAME: rewritten ... -->` and `<!-- /NAME -->` in the
    Markdown file `path` (a benchmark's own section of RESULTS.md), or appends it under
    `## HEADING` the first time. Nothing when `path` is empty or absent."""
    if not path or not os.path.exists(path):
        return
    section = f"<!-- {name}: rewritten by benches/{name}.sh -->\n{text}\n<!-- /{name} -->"
    doc = open(path).read()
    pattern = re.compile(rf"<!-- {re.escape(name)}: rewritten.*?<!-- /{re.escape(name)} -->", re.S)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: section, doc)
    else:
        doc = doc.rstrip("\n") + f"\n\n## {heading}\n\n" + section + "\n"
    open(path, "w").write(doc)
    print(f"(figures written to {path})", flush=True)


def fmt(values, digits=1, scale=1.0):
    ms = median_spread([v * scale if v is not None else None for v in values])
    if ms == "-":
        return "-"
    m, lo, hi = ms
    return f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})" if len(values) > 1 else f"{m:.{digits}f}"


def main():
    configs = ["direct", "vllm-edge round-robin", "vllm-edge vllm", "bare pingora", "nginx round-robin",
               "nginx least_conn", "haproxy roundrobin", "haproxy leastconn",
               "vllm-router round_robin", "vllm-router power_of_two"]
    if BASELINE:
        configs[3:3] = ["baseline round-robin", "baseline vllm"]
    # Only when asked for by name (OH_ONLY): the access log on; flow control with the
    # backends' batch limit known (it counts free slots on every request) and off.
    with_log = ["vllm-edge round-robin access-log", "vllm-edge vllm cap", "vllm-edge vllm cap noflow",
                "vllm-edge round-robin cap", "vllm-edge round-robin cap noflow"]
    if BASELINE:
        with_log.append("baseline round-robin access-log")
    configs[2:2] = with_log
    if ONLY:
        configs = [c for c in configs if c in ONLY]
    else:
        configs = [c for c in configs if c not in with_log]
    if not os.path.exists(BARE):
        configs = [c for c in configs if c != "bare pingora"]
    if not os.path.exists(VLLM_ROUTER):
        configs = [c for c in configs if not c.startswith("vllm-router")]
    machine = subprocess.run(["bash", "-c", "lscpu | grep 'Model name' | sed 's/.*: *//'; nproc; "
                              "free -g | awk '/Mem:/{print $2\" GiB\"}'; uname -r"],
                             capture_output=True, text=True).stdout.split("\n")
    print(f"# overhead run {time.strftime('%Y-%m-%d %H:%M')} on {machine[0]}, {machine[1]} cores, "
          f"{machine[2]}, kernel {machine[3]}; {RUNS} runs of {SECONDS}s per configuration, interleaved",
          flush=True)

    # Requests.
    backend, ports = start_fake_backends()
    req = {c: [] for c in configs}
    try:
        for run in range(RUNS):
            # Every other run in reverse order: no configuration always runs first (the
            # first of a round measured slower, whatever it was).
            for c in (configs if run % 2 == 0 else configs[::-1]):
                try:
                    p, port = start_router(c, ports)
                except RuntimeError as e:
                    print(f"requests run {run + 1} {c}: FAILED: {e}", flush=True)
                    continue
                try:
                    r = wrk_run(port, p.pid if p else None)
                finally:
                    if p:
                        stop(p)
                req[c].append(r)
                print(f"requests run {run + 1} {c}: {json.dumps(r)}", flush=True)
    finally:
        stop(backend)

    # Streams.
    # Two stream backends, as two replicas (vllm-router's power_of_two wants two).
    sse = [start_sse_backend() for _ in range(2)]
    st = {c: [] for c in configs}
    try:
        for run in range(RUNS):
            # Every other run in reverse order: no configuration always runs first (the
            # first of a round measured slower, whatever it was).
            for c in (configs if run % 2 == 0 else configs[::-1]):
                try:
                    p, port = start_router(c, [port for _, port in sse], stream_backend=True)
                except RuntimeError as e:
                    print(f"streams run {run + 1} {c}: FAILED: {e}", flush=True)
                    continue
                try:
                    r = asyncio.run(streams_run(port))
                finally:
                    if p:
                        stop(p)
                st[c].append(r)
                print(f"streams run {run + 1} {c}: {json.dumps(r)}", flush=True)
    finally:
        for p, _ in sse:
            stop(p)

    # Memory.
    mem = {}
    if MEMORY and any(c.startswith("vllm-edge") for c in configs):
        import resource
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        # Each open HTTP/1.1 stream holds two descriptors in the router: the client's and
        # the backend's (the stream watchdog holds none).
        sizes = [n for n in (1000, 10000) if 2 * n + 200 <= limit] or [1000]
        if 10000 not in sizes:
            sizes.append((limit - 200) // 2 // 100 * 100)
            print(f"memory: descriptor limit {limit}: measuring {sizes[-1]} streams, not 10000", flush=True)
        holder, hport = start_sse_backend(gap=2.0, hold=True)
        try:
            p, port = start_router("vllm-edge round-robin", [hport], stream_backend=False)
            try:
                time.sleep(1.0)
                mem["idle"] = rss_kib(p.pid)
                print(f"memory: idle RSS {mem['idle']} KiB", flush=True)
                for n in sizes:
                    rss, opened = asyncio.run(hold_streams(port, n, p.pid))
                    mem[n] = (rss, opened)
                    print(f"memory: {opened} open streams: RSS {rss} KiB", flush=True)
                    time.sleep(2.0)
            finally:
                stop(p)
        finally:
            stop(holder)
        print(f"memory: idle RSS {mem['idle']} KiB", flush=True)

    # Report (Markdown).
    nginx = [r["rps"] for r in req.get("nginx round-robin", [])]
    ref = statistics.median(nginx) if nginx else None
    print("\n| configuration | req/s | vs nginx rr | p50 ms | p99 ms | p99.9 ms | router CPU µs/request | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for c in configs:
        rs = req[c]
        if not rs:
            print(f"| {c} | failed to start | | | | | | |")
            continue
        vs = f"{statistics.median([r['rps'] for r in rs]) / ref:.2f}" if ref else "-"
        print(f"| {c} | {fmt([r['rps'] for r in rs], 0)} | {vs} | {fmt([r['p50_ms'] for r in rs], 2)} | "
              f"{fmt([r['p99_ms'] for r in rs], 2)} | {fmt([r['p999_ms'] for r in rs], 2)} | "
              f"{fmt([r['cpu_s_per_1k'] for r in rs], 0, 1000.0)} | {sum(r['errors'] for r in rs)} |")
    direct = st.get("direct")
    d50 = statistics.median([r["transit_p50_ms"] for r in direct]) if direct else 0.0
    d99 = statistics.median([r["transit_p99_ms"] for r in direct]) if direct else 0.0
    print("\n| configuration | TTFB p50 ms | TTFB p99 ms | first event p50 ms | p99 ms | event transit p50 ms | p99 ms | gained vs direct p50 / p99 ms | events |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in configs:
        rs = st[c]
        if not rs:
            print(f"| {c} | failed to start | | | | | | | |")
            continue
        g50 = statistics.median([r["transit_p50_ms"] for r in rs]) - d50
        g99 = statistics.median([r["transit_p99_ms"] for r in rs]) - d99
        print(f"| {c} | {fmt([r['ttfb_p50_ms'] for r in rs], 2)} | {fmt([r['ttfb_p99_ms'] for r in rs], 2)} | "
              f"{fmt([r['ttfe_p50_ms'] for r in rs], 2)} | {fmt([r['ttfe_p99_ms'] for r in rs], 2)} | "
              f"{fmt([r['transit_p50_ms'] for r in rs], 2)} | {fmt([r['transit_p99_ms'] for r in rs], 2)} | "
              f"{g50:.2f} / {g99:.2f} | {sum(r['events'] for r in rs)} |")
    if mem:
        idle = mem["idle"]
        print("\n| vllm-edge open streams | RSS MiB | per stream KiB (over idle) |")
        print("|---|---|---|")
        print(f"| 0 | {idle / 1024:.1f} | - |")
        for n in [k for k in mem if k != "idle"]:
            rss, opened = mem[n]
            print(f"| {opened} | {rss / 1024:.1f} | {(rss - idle) / max(1, opened):.1f} |")


if __name__ == "__main__":
    main()
