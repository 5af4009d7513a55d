#!/usr/bin/env python3
"""The account behind the streaming cost (issue 33): where a relayed event's CPU goes and
what an open stream's memory is made of, vllm-edge against bare Pingora, under the load of
`stream_cost.py`'s `low-1k` phase (1,000 streams at 10 events/s; router on core 0, load
side on core 1).

Run through `benches/stream-account.sh`, which builds both routers with frame pointers
(and without LTO, so that a sample lands in the function it belongs to). Three parts,
chosen by the arguments (all by default):

- `cpu`: `perf record -g` of each router for SA_SECONDS (8) at 1,999 Hz, SA_RUNS times,
  interleaved; every sample is put in one bucket: the kernel (and, of it, waking whoever
  reads a socket the router wrote: `sock_def_readable`), vllm-edge's own functions, memory
  copies, the rest of user space (Pingora, tokio, the allocator). Per relayed event, in µs.
- `wakeups`: context switches per event of the load side and of the router (`perf stat`),
  against nginx too: whether the kernel's cost of waking the reader comes with more
  wake-ups.
- `memory`: uprobes on mimalloc's entry points (`perf probe`) while SA_STREAMS (200)
  streams open and run 2 s; allocations matched with their frees; what is still live is
  summed per allocation site (first frames outside the allocator) and per stream.

Environment: VLLM_EDGE, BARE_PINGORA, STREAM_LOAD (executables), SA_SECONDS, SA_RUNS (3),
SA_STREAMS.
"""

import collections
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overhead as oh  # noqa: E402
import stream_cost as sc  # noqa: E402

SECONDS = float(os.environ.get("SA_SECONDS", "8"))
RUNS = int(os.environ.get("SA_RUNS", "3"))
STREAMS = int(os.environ.get("SA_STREAMS", "200"))
HZ = 1999
ROUTERS = ["vllm-edge vllm", "bare pingora"]
PROBES = [("amal", "mi_malloc_aligned size=%di:u64"), ("azal", "mi_zalloc_aligned size=%di:u64"),
          ("areal", "mi_realloc_aligned old=%di:u64 size=%si:u64"), ("afree", "mi_free ptr=%di:u64")]
RETURNS = ["amal", "azal", "areal"]


class Streams:
    """A router under test in front of the load side, with `n` streams open at `rate`."""

    def __init__(self, name, n, rate=10.0):
        self.load = sc.Load()
        self.router, port = oh.start_router(name, [self.load.port], stream_backend=True)
        self.pids = oh.tree(self.router.pid)
        self.n, self.rate, self.port = n, rate, port

    def open(self):
        r = self.load.ask(op="open", url=f"127.0.0.1:{self.port}", streams=self.n, rate=self.rate)
        if r["open"] < self.n:
            raise RuntimeError(f"only {r['open']} of {self.n} streams opened: {r.get('error')}")

    def measure(self, seconds):
        return self.load.ask(op="measure", seconds=seconds)

    def close(self):
        try:
            self.load.ask(op="close")
            oh.stop(self.router)
        finally:
            self.load.stop()


def script_blocks(data):
    """The call chains of a `perf record -g` file: one list of (symbol, dso) per sample."""
    out = subprocess.run(["perf", "script", "-i", data, "-F", "ip,sym,dso"], capture_output=True,
                         text=True, check=True).stdout
    for block in out.split("\n\n"):
        frames = []
        for line in block.strip().splitlines():
            m = re.match(r"\s*[0-9a-f]+ (.*) \((.*)\)$", line)
            if m:
                frames.append((m.group(1), m.group(2)))
        if frames:
            yield frames


BUCKETS = ["kernel: waking the reader of a socket written",
           "kernel: the rest (system calls, TCP, scheduling)", "user: vllm-edge's own functions",
           "user: memory copies", "user: Pingora, tokio, allocator, std"]


def bucket(frames):
    """Which of BUCKETS a sample (its call chain, innermost first) falls in."""
    sym, dso = frames[0]
    if "kallsyms" in dso:
        if any(s in ("sock_def_readable", "ep_poll_callback") for s, _ in frames):
            return BUCKETS[0]
        return BUCKETS[1]
    if "vllm_edge" in sym or (sym.startswith("<tokio::time::sleep::Sleep")
                              and any("vllm_edge" in s for s, _ in frames[:3])):
        return BUCKETS[2]
    if "memmove" in sym or "memcpy" in sym:
        return BUCKETS[3]
    return BUCKETS[4]


def cpu():
    print(f"## CPU per relayed event, by where the samples fall ({HZ} Hz, {SECONDS:.0f} s, "
          f"1,000 streams at 10 events/s; {RUNS} interleaved runs: median (min–max))\n")
    table = collections.defaultdict(lambda: collections.defaultdict(list))
    for _ in range(RUNS):
        for name in ROUTERS:
            s = Streams(name, 1000)
            data = f"/tmp/stream-account-{os.getpid()}.data"
            try:
                s.open()
                time.sleep(1)
                perf = subprocess.Popen(["perf", "record", "-q", "-F", str(HZ), "-g", "-o", data,
                                         "-p", ",".join(map(str, s.pids)), "--", "sleep",
                                         str(SECONDS)], stderr=subprocess.DEVNULL)
                ev = s.measure(SECONDS)["events"]
                perf.wait()
            finally:
                s.close()
            counts = collections.Counter(bucket(f) for f in script_blocks(data))
            os.unlink(data)
            counts["total"] = sum(counts.values())
            for b in BUCKETS + ["total"]:
                table[name][b].append(counts.get(b, 0) / HZ / ev * 1e6)
    print("| µs per event | " + " | ".join(ROUTERS) + " |")
    print("|---|" + "---|" * len(ROUTERS))
    for b in BUCKETS + ["total"]:
        cells = [f"{statistics.median(v):.2f} ({min(v):.2f}–{max(v):.2f})"
                 for v in (table[name][b] for name in ROUTERS)]
        print(f"| {b} | " + " | ".join(cells) + " |")
    print()


def wakeups():
    print("## Context switches per relayed event (perf stat, 5 s, 1,000 streams at 10 events/s)\n")
    print("| router | load side | router | router system calls |")
    print("|---|---|---|---|")
    for name in ROUTERS + ["nginx round-robin"]:
        s = Streams(name, 1000)
        try:
            s.open()
            time.sleep(1)
            stats = [subprocess.Popen(["perf", "stat", "-x", ",", "-e",
                                       "context-switches,raw_syscalls:sys_enter", "-p", pids,
                                       "--", "sleep", "5"], stderr=subprocess.PIPE, text=True)
                     for pids in (str(s.load.p.pid), ",".join(map(str, s.pids)))]
            ev = s.measure(5.0)["events"]
            counts = []
            for p in stats:
                _, err = p.communicate()
                counts.append({ln.split(",")[2]: float(ln.split(",")[0])
                               for ln in err.splitlines() if ln[:1].isdigit()})
        finally:
            s.close()
        load, router = counts
        print(f"| {name} | {load.get('context-switches', 0) / ev:.3f} | "
              f"{router.get('context-switches', 0) / ev:.3f} | "
              f"{router.get('raw_syscalls:sys_enter', 0) / ev:.2f} |")
    print()


def site(frames, depth=3):
    skip = re.compile(r"^(mi_|_mi_|alloc::|<alloc::|__rust|__rdl|core::|<core::|bytes::|<bytes::"
                      r"|hashbrown|<hashbrown|<mimalloc)")
    kept = [s for s, _ in frames if not skip.match(s)]
    return " ← ".join(s[:110] for s in kept[:depth])


def memory():
    exe = os.environ["VLLM_EDGE"]
    subprocess.run(["perf", "probe", "-q", "-d", "probe_vllm:*"], stderr=subprocess.DEVNULL)
    for name, spec in PROBES:
        subprocess.run(["perf", "probe", "-q", "-x", exe, "-a", f"{name}={spec}"], check=True)
    for name in RETURNS:
        subprocess.run(["perf", "probe", "-q", "-x", exe, "-a",
                        f"{name}={PROBES[[p for p, _ in PROBES].index(name)][1].split()[0]}"
                        "%return ptr=$retval"], check=True)
    events = [f"probe_vllm:{n}" for n, _ in PROBES] + [f"probe_vllm:{n}__return" for n in RETURNS]
    data = f"/tmp/stream-account-mem-{os.getpid()}.data"
    s = Streams("vllm-edge vllm", STREAMS)
    try:
        args = ["perf", "record", "-q", "-g", "-o", data, "-p", str(s.pids[-1])]
        for e in events:
            args += ["-e", e]
        perf = subprocess.Popen(args, stderr=subprocess.DEVNULL)
        time.sleep(1.5)
        s.open()
        time.sleep(2)
        rss = oh.rss_kib(s.pids[-1])
        perf.send_signal(2)
        perf.wait()
    finally:
        s.close()
        subprocess.run(["perf", "probe", "-q", "-d", "probe_vllm:*"], stderr=subprocess.DEVNULL)
    out = subprocess.run(["perf", "script", "-i", data, "-F", "tid,event,trace,ip,sym"],
                         capture_output=True, text=True, check=True).stdout
    os.unlink(data)
    pending, live = {}, {}
    for block in out.split("\n\n"):
        lines = block.strip().splitlines()
        m = lines and re.match(r"\s*(\d+)\s+probe_vllm:(\w+):(.*)", lines[0])
        if not m:
            continue
        tid, ev, args = m.groups()
        frames = [((ln.strip().split(None, 1) + ["?"])[1], "") for ln in lines[1:]]
        num = dict((k, int(v, 0)) for k, v in re.findall(r"(\w+)=(0x[0-9a-f]+|\d+)", args))
        if ev in ("amal", "azal", "areal"):
            pending[tid] = (num["size"], frames, num.get("old"))
        elif ev.endswith("__return") and tid in pending:
            size, fr, old = pending.pop(tid)
            live.pop(old, None)
            live[num["ptr"]] = (size, fr)
        elif ev == "afree":
            live.pop(num["ptr"], None)
    sites = collections.defaultdict(lambda: [0, 0, collections.Counter()])
    for size, fr in live.values():
        k = sites[site(fr)]
        k[0] += size
        k[1] += 1
        k[2][size] += 1
    total = sum(v[0] for v in sites.values())
    print(f"## Live allocations per open stream ({STREAMS} streams opened and run for 2 s)\n")
    print(f"Allocated in the window and still live: {total / STREAMS / 1024:.1f} KiB per stream "
          f"(capacity, touched or not); RSS of the process at the end {rss} KiB.\n")
    print("| KiB per stream | allocations per stream (sizes) | site |")
    print("|---|---|---|")
    for where, (b, c, sizes) in sorted(sites.items(), key=lambda kv: -kv[1][0])[:20]:
        largest = sorted(sizes.items(), key=lambda kv: -kv[0] * kv[1])[:3]
        common = ", ".join(f"{sz} B×{n / STREAMS:g}" for sz, n in largest)
        print(f"| {b / STREAMS / 1024:.2f} | {c / STREAMS:.1f} ({common}) | {where} |")
    print()


if __name__ == "__main__":
    parts = sys.argv[1:] or ["cpu", "wakeups", "memory"]
    print(f"# stream account {time.strftime('%Y-%m-%d %H:%M')}: {', '.join(parts)}\n")
    for part in parts:
        {"cpu": cpu, "wakeups": wakeups, "memory": memory}[part]()
