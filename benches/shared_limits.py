#!/usr/bin/env python3
"""What sharing key limits through Redis costs a request (issue 34), side by side in one
run, interleaved: vllm-edge without keys, with one API key counted in its own memory
(`max_concurrent`, `rpm` and `tpm` all set, far above the load), and the same key counted
in a real Redis (`auth.shared`). Same harness as benches/overhead.py: the gateway pinned
to core 0; wrk (64 connections, ~1 KB chat bodies), the fake backends (nginx, canned
completion with `usage`) and redis-server on core 1.

Run through `benches/shared-limits.sh`. Environment: SL_RUNS (default 3), OH_SECONDS
(window, default 10), SL_RESULTS (the Markdown file whose "Shared limits" section is
rewritten; default benches/RESULTS.md, empty to skip).
"""

import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overhead as oh  # noqa: E402

RUNS = int(os.environ.get("SL_RUNS", "3"))
RESULTS = os.environ.get("SL_RESULTS", os.path.join(oh.ROOT, "benches/RESULTS.md"))
CONFIGS = ["vllm-edge round-robin", "vllm-edge round-robin keys", "vllm-edge round-robin keys shared"]


def start_redis():
    port = oh.free_port()
    p = subprocess.Popen(["taskset", "-c", oh.LOAD_CORE, "redis-server", "--port", str(port),
                          "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    if not oh.wait_port(port, 10):
        raise RuntimeError("redis-server did not start")
    return p, port


def redis_ops(port):
    out = subprocess.run(["redis-cli", "-p", str(port), "info", "stats"], capture_output=True,
                         text=True).stdout
    m = re.search(r"total_commands_processed:(\d+)", out)
    return int(m.group(1)) if m else 0


def main():
    started = time.strftime("%Y-%m-%d %H:%M")
    print(f"# shared limits {started}; {RUNS} interleaved run(s), {oh.SECONDS} s windows", flush=True)
    redis, rport = start_redis()
    os.environ["OH_REDIS_URL"] = f"redis://127.0.0.1:{rport}"
    backend, ports = oh.start_fake_backends()
    results = {c: [] for c in CONFIGS}
    try:
        for run in range(RUNS):
            for c in (CONFIGS if run % 2 == 0 else CONFIGS[::-1]):
                p, port = oh.start_router(c, ports)
                try:
                    ops0 = redis_ops(rport)
                    r = oh.wrk_run(port, p.pid, key=oh.BENCH_KEY if " keys" in c else None)
                    r["redis_ops_per_request"] = (redis_ops(rport) - ops0) / max(1, r["rps"] * (oh.SECONDS + 2))
                finally:
                    oh.stop(p)
                results[c].append(r)
                print(f"run {run + 1} {c}: {r}", flush=True)
    finally:
        oh.stop(backend)
        oh.stop(redis)
    lines = [f"Measured {started}, {RUNS} interleaved runs of {oh.SECONDS} s (wrk -c64, ~1 KB chat "
             f"bodies, fake backends answering at once); medians (min–max). Gateway on core 0; wrk, "
             f"the backends and redis-server on core 1.", "",
             "| gateway | requests/s | vs no keys | p50 ms | p99 ms | CPU µs per request | Redis commands per request (a script's own calls included) |",
             "|---|---|---|---|---|---|---|"]
    base = oh.median_spread([r["rps"] for r in results[CONFIGS[0]]])
    for c in CONFIGS:
        rs = results[c]
        ms = oh.median_spread([r["rps"] for r in rs])
        ratio = f"{ms[0] / base[0]:.2f}" if ms != "-" and base != "-" else "-"
        label = {"vllm-edge round-robin": "no API keys",
                 "vllm-edge round-robin keys": "one key, limits counted locally",
                 "vllm-edge round-robin keys shared": "one key, limits shared through Redis"}[c]
        lines.append(f"| {label} | {oh.fmt([r['rps'] for r in rs], 0)} | {ratio} | {oh.fmt([r['p50_ms'] for r in rs], 2)} | "
                     f"{oh.fmt([r['p99_ms'] for r in rs], 2)} | "
                     f"{oh.fmt([r['cpu_s_per_1k'] * 1000 if r['cpu_s_per_1k'] else None for r in rs], 1)} | "
                     f"{oh.fmt([r['redis_ops_per_request'] for r in rs], 2) if 'shared' in c else '-'} |")
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    oh.rewrite_section(RESULTS, "shared-limits", "Shared limits", text)


if __name__ == "__main__":
    main()
