#!/usr/bin/env python3
"""What relaying one streamed token costs, side by side (issue 33): direct, vllm-edge, bare
Pingora, nginx (`proxy_buffering off`), HAProxy and vllm-router, in one run, interleaved.

Run through `benches/stream-cost.sh`. The router under test is pinned to core 0; the load
side (`benches/stream_load.rs`: a compiled backend streaming vLLM-sized chat chunks, ~250
bytes, at a fixed rate per stream, and a compiled client holding the streams open; one
thread) to core 1.

Per router and run:
- below saturation: 1,000 streams at 10 events/s, and 10,000 (see BIG) at 1 event/s (10,000 events/s
  offered either way): the router's CPU µs per relayed event (utime+stime from /proc over
  the window), each event's transit p50/p99 (send to arrival; the delay a router adds is
  its transit minus direct's), and its resident memory per open stream (RSS with the
  streams open, less RSS idle, per stream);
- at saturation: 1,000 streams at SC_RATE_1K events/s each and 10,000 at SC_RATE_10K (far
  more than any router relays on a core): events/s delivered, and the router's CPU use
  (a router at ~100% of its core is the bottleneck; `direct`, where no router stands
  between, shows what the load side alone delivers);
- requests (non-streaming): the overhead harness's wrk run (`benches/overhead.py`),
  requests/s and CPU µs per request, when SC_REQUESTS is not 0.

Environment: SC_QUICK=1 (one run, 3 s windows: under 10 minutes), SC_RUNS (default 3),
SC_SECONDS (window, default 8), SC_ONLY (configurations, comma-separated), SC_REQUESTS,
SC_RATE_1K, SC_RATE_10K, SC_PHASES (phases to run, comma-separated: low-1k, sat-1k, low-10k,
sat-10k), SC_BASELINE (another vllm-edge binary, e.g. an earlier commit's: adds "baseline
vllm", interleaved with the rest, for a before/after in one run), SC_SYSCALLS (0 skips the
second window of the below-saturation phases in which `perf stat` counts the router's
system calls and context switches per event; kept out of the CPU window, which it would
slow), SC_RESULTS (the Markdown file whose stream-cost section is rewritten; default
benches/RESULTS.md, empty to skip). Prints Markdown tables; the last line
is `stream-cost: vllm-edge/nginx cpu-per-event X.XX, events/s X.XX` (medians, at 1,000
streams; events/s per core: relayed at saturation per second of the router's CPU).
"""

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overhead as oh  # noqa: E402  (routers, /proc readings, the wrk run)

QUICK = os.environ.get("SC_QUICK") == "1"
RUNS = int(os.environ.get("SC_RUNS", "1" if QUICK else "3"))
SECONDS = float(os.environ.get("SC_SECONDS", "3" if QUICK else "8"))
ONLY = [s for s in os.environ.get("SC_ONLY", "").split(",") if s]
REQUESTS = os.environ.get("SC_REQUESTS", "1") != "0"
RATE_1K = float(os.environ.get("SC_RATE_1K", "400"))
RATE_10K = float(os.environ.get("SC_RATE_10K", "40"))
SYSCALLS = os.environ.get("SC_SYSCALLS", "1") != "0" and shutil.which("perf") is not None
LOAD = os.environ["STREAM_LOAD"]
RESULTS = os.environ.get("SC_RESULTS", os.path.join(oh.ROOT, "benches/RESULTS.md"))
EDGE_NAME = "vllm-edge vllm"
if os.environ.get("SC_BASELINE"):
    oh.BASELINE = os.environ["SC_BASELINE"]
CONFIGS = ["direct", EDGE_NAME] + (["baseline vllm"] if oh.BASELINE else []) + ["bare pingora", "nginx round-robin", "haproxy roundrobin",
           "vllm-router round_robin"]
# 10,000 streams, or as many as the descriptor limit lets the load side hold: it holds two
# per stream (the client's and the backend's), and so does a router. The hard limit cannot
# be raised here without privileges a container may lack (20,000 on the development VM:
# 9,000 streams).
_, _HARD = resource.getrlimit(resource.RLIMIT_NOFILE)
NOFILE = 65536 if _HARD == resource.RLIM_INFINITY else min(65536, _HARD)
BIG = min(10000, (NOFILE - 500) // 2 // 1000 * 1000)
# (phase, streams, events/s per stream)
PHASES = [("low-1k", 1000, 10.0), ("sat-1k", 1000, RATE_1K), ("low-10k", BIG, 10000.0 / BIG),
          ("sat-10k", BIG, RATE_10K)]
_ASKED = [s for s in os.environ.get("SC_PHASES", "").split(",") if s]
PHASES = [p for p in PHASES if not _ASKED or p[0] in _ASKED]


class Load:
    """The load process: backend and client, pinned to the load core."""

    def __init__(self):
        self.p = subprocess.Popen(["taskset", "-c", oh.LOAD_CORE, LOAD], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.port = json.loads(self.p.stdout.readline())["backend"]

    def ask(self, **cmd):
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError("the load process ended")
        return json.loads(line)

    def stop(self):
        oh.stop(self.p)


def phase(load, name, port, pid, streams, rate):
    """Opens `streams` at `rate` through the router on `port`, measures one window."""
    r = load.ask(op="open", url=f"127.0.0.1:{port}", streams=streams, rate=rate)
    out = {"phase": name, "streams": streams, "rate": rate, "open": r["open"]}
    if r["open"] < streams:
        out["failed"] = r["failed"]
        out["error"] = r.get("error", "")[:200]
    if r["open"] == 0:
        load.ask(op="close")
        return out
    # Let the streams reach their rate before the window.
    time.sleep(1.0)
    (u0, s0), t0 = cpu_split(pid), time.monotonic()
    m = load.ask(op="measure", seconds=SECONDS)
    (u1, s1), t1 = cpu_split(pid), time.monotonic()
    cpu0, cpu1 = u0 + s0, u1 + s1
    rss = oh.rss_kib(pid) if pid else None
    counts = syscalls(load, pid) if SYSCALLS and pid and name.startswith("low") else {}
    load.ask(op="close")
    ev = m["events"]
    out.update(counts)
    out.update({
        "events_per_s": ev / m["seconds"],
        "cpu_us_per_event": (cpu1 - cpu0) / ev * 1e6 if pid and ev else None,
        "cpu_util": (cpu1 - cpu0) / (t1 - t0) if pid else None,
        "user_share": (u1 - u0) / (cpu1 - cpu0) if pid and cpu1 > cpu0 else None,
        "p50_ms": m["p50_us"] / 1000 if m["p50_us"] is not None else None,
        "p99_ms": m["p99_us"] / 1000 if m["p99_us"] is not None else None,
        "rss_kib": rss,
    })
    return out


def cpu_split(pid):
    """(user, system) CPU seconds of the process tree of `pid` (0, 0 for none)."""
    if not pid:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for p in oh.tree(pid):
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            user, system = user + int(fields[11]), system + int(fields[12])
        except OSError:
            pass
    return user / tick, system / tick


def syscalls(load, pid):
    """A second window with `perf stat` on the router: its system calls and context
    switches per relayed event."""
    perf = subprocess.Popen(["perf", "stat", "-x", ",", "-e", "raw_syscalls:sys_enter,context-switches",
                             "-p", ",".join(str(p) for p in oh.tree(pid)), "--", "sleep", str(SECONDS)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    m = load.ask(op="measure", seconds=SECONDS)
    _, err = perf.communicate()
    counts = {}
    for line in err.splitlines():
        f = line.split(",")
        if len(f) > 2 and f[0].strip().isdigit():
            counts[f[2]] = int(f[0])
    ev = m["events"]
    if not ev or "raw_syscalls:sys_enter" not in counts:
        return {}
    return {"syscalls_per_event": counts["raw_syscalls:sys_enter"] / ev,
            "switches_per_event": counts.get("context-switches", 0) / ev}


def med(values):
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


def main():
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, _HARD))
    configs = [c for c in CONFIGS if not ONLY or c in ONLY]
    if not os.path.exists(oh.BARE):
        configs = [c for c in configs if c != "bare pingora"]
    if not os.path.exists(oh.VLLM_ROUTER):
        configs = [c for c in configs if not c.startswith("vllm-router")]
    machine = subprocess.run(["bash", "-c", "lscpu | grep 'Model name' | sed 's/.*: *//'; nproc"],
                             capture_output=True, text=True).stdout.split("\n")
    started = time.strftime("%Y-%m-%d %H:%M")
    print(f"# stream cost {started} on {machine[0]}, {machine[1]} cores; {RUNS} run(s), "
          f"{SECONDS:g} s windows{' (SC_QUICK)' if QUICK else ''}; router on core {oh.ROUTER_CORE}, "
          f"load on core {oh.LOAD_CORE}", flush=True)
    results = {c: [] for c in configs}
    requests = {c: [] for c in configs}
    load = Load()
    try:
        for run in range(RUNS):
            for c in (configs if run % 2 == 0 else configs[::-1]):
                try:
                    p, port = oh.start_router(c, [load.port], stream_backend=True)
                except RuntimeError as e:
                    print(f"run {run + 1} {c}: FAILED to start: {e}", flush=True)
                    continue
                pid = p.pid if p else None
                try:
                    time.sleep(0.5)
                    idle = oh.rss_kib(pid) if pid else None
                    row = {"idle_rss_kib": idle}
                    for name, n, rate in PHASES:
                        r = phase(load, name, port, pid, n, rate)
                        row[name] = r
                        print(f"run {run + 1} {c} {name}: {json.dumps(r)}", flush=True)
                finally:
                    if p:
                        oh.stop(p)
                results[c].append(row)
        if REQUESTS:
            backend, ports = oh.start_fake_backends()
            try:
                for run in range(RUNS):
                    for c in (configs if run % 2 == 0 else configs[::-1]):
                        try:
                            p, port = oh.start_router(c, ports)
                        except RuntimeError as e:
                            print(f"requests run {run + 1} {c}: FAILED: {e}", flush=True)
                            continue
                        try:
                            r = oh.wrk_run(port, p.pid if p else None)
                        finally:
                            if p:
                                oh.stop(p)
                        requests[c].append(r)
                        print(f"requests run {run + 1} {c}: {json.dumps(r)}", flush=True)
            finally:
                oh.stop(backend)
    finally:
        load.stop()
    report(configs, results, requests, started)


def get(rows, phase_name, key):
    return [r[phase_name].get(key) for r in rows if phase_name in r]


def per_stream(rows, phase_name):
    out = []
    for r in rows:
        ph = r.get(phase_name, {})
        if r.get("idle_rss_kib") is not None and ph.get("rss_kib") is not None and ph.get("open"):
            out.append((ph["rss_kib"] - r["idle_rss_kib"]) / ph["open"])
    return out


def per_cpu_second(rows):
    """Events relayed at saturation (1,000 streams) per second of the router's CPU."""
    return [r["sat-1k"]["events_per_s"] / r["sat-1k"]["cpu_util"] for r in rows
            if r.get("sat-1k", {}).get("cpu_util")]


def report(configs, results, requests, started):
    lines = []
    say = lines.append
    direct = results.get("direct", [])
    d50 = {ph: med(get(direct, ph, "p50_ms")) for ph, _, _ in PHASES}
    d99 = {ph: med(get(direct, ph, "p99_ms")) for ph, _, _ in PHASES}
    ng = results.get("nginx round-robin", [])
    ed = results.get(EDGE_NAME, [])

    def ratio(a, b):
        return f"{a / b:.2f}" if a is not None and b else "-"

    say(f"Measured {started}{' (SC_QUICK)' if QUICK else ''}, {RUNS} interleaved run(s), "
        f"{SECONDS:g} s windows; medians (min–max). Router on one core, load on the other.")
    say("")
    big = f"{BIG:,}"
    say(f"| router | CPU µs per event, 1,000 streams | same, {big} | system calls per event, 1,000 / {big} | "
        f"user-space share of that CPU (1,000) | "
        f"events/s at saturation, 1,000 streams | same, {big} | router CPU at saturation (1,000) | "
        f"events per router CPU-second at saturation (1,000) | added transit p50 / p99 ms (1,000) | "
        f"KiB per open stream, 1,000 / {big} |")
    say("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in configs:
        rows = results[c]
        if not rows:
            say(f"| {c} | failed | | | | | | | | | |")
            continue
        p50, p99 = med(get(rows, "low-1k", "p50_ms")), med(get(rows, "low-1k", "p99_ms"))
        added = "-" if c == "direct" or p50 is None or d50.get("low-1k") is None else \
            f"{p50 - d50['low-1k']:.2f} / {p99 - d99['low-1k']:.2f}"
        util = med(get(rows, "sat-1k", "cpu_util"))
        ps1, ps10 = per_stream(rows, "low-1k"), per_stream(rows, "low-10k")
        per_cpu = per_cpu_second(rows)
        say(f"| {c} | {oh.fmt(get(rows, 'low-1k', 'cpu_us_per_event'), 2)} | "
            f"{oh.fmt(get(rows, 'low-10k', 'cpu_us_per_event'), 2)} | "
            f"{oh.fmt(get(rows, 'low-1k', 'syscalls_per_event'), 2)} / {oh.fmt(get(rows, 'low-10k', 'syscalls_per_event'), 2)} | "
            f"{oh.fmt(get(rows, 'low-1k', 'user_share'), 0, 100)}% | "
            f"{oh.fmt(get(rows, 'sat-1k', 'events_per_s'), 0)} | {oh.fmt(get(rows, 'sat-10k', 'events_per_s'), 0)} | "
            f"{'-' if util is None else f'{100 * util:.0f}%'} | {oh.fmt(per_cpu, 0)} | {added} | "
            f"{oh.fmt(ps1, 1)} / {oh.fmt(ps10, 1)} |")
    say("")
    say("Transit (send to arrival, load side's clock) below saturation, p50 / p99 ms: " + "; ".join(
        f"{c} {med(get(results[c], 'low-1k', 'p50_ms')) or 0:.2f} / {med(get(results[c], 'low-1k', 'p99_ms')) or 0:.2f}"
        for c in configs if results[c]) + ".")
    opened = [f"{c} {r[ph]['open']}/{r[ph]['streams']} ({ph})" for c in configs for r in results[c]
              for ph, _, _ in PHASES if ph in r and r[ph]["open"] < r[ph]["streams"]]
    if opened:
        say("Streams that did not open: " + ", ".join(opened) + ".")
    if any(requests.values()):
        ref = med([r["rps"] for r in requests.get("nginx round-robin", [])])
        say("")
        say("| router | requests/s (wrk, 64 connections, ~1 KB chat bodies) | vs nginx | CPU µs per request |")
        say("|---|---|---|---|")
        for c in configs:
            rs = requests[c]
            if rs:
                say(f"| {c} | {oh.fmt([r['rps'] for r in rs], 0)} | {ratio(med([r['rps'] for r in rs]), ref)} | "
                    f"{oh.fmt([r['cpu_s_per_1k'] * 1000 if r['cpu_s_per_1k'] else None for r in rs], 1)} |")
    cpu_ratio = ratio(med(get(ed, "low-1k", "cpu_us_per_event")), med(get(ng, "low-1k", "cpu_us_per_event")))
    # Events/s per core: at saturation both the router's core and the load side's are
    # busy (the load side alone relays about as much), so what separates the routers is
    # how many events they relay per second of their own CPU.
    eps_ratio = ratio(med(per_cpu_second(ed)), med(per_cpu_second(ng)))
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    oh.rewrite_section(RESULTS, "stream-cost", "Streaming cost",
                       f"{text}\n\n`stream-cost: vllm-edge/nginx cpu-per-event {cpu_ratio}, events/s {eps_ratio}`")
    print(f"stream-cost: vllm-edge/nginx cpu-per-event {cpu_ratio}, events/s {eps_ratio}", flush=True)


if __name__ == "__main__":
    main()
