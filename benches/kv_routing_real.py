"""Exact prefix routing against two real vLLM 0.32 CPU servers (not CI: it installs
vLLM, about 6 GB). Run through benches/kv-routing-real.sh.

Two servers (one core each) serve the tiny model with the project's tokenizer, prefix
caching and KV events, each with a small KV cache (KR_KV_BYTES, default 12M: 96 blocks of
128 tokens). Tenants' system prompts (450 words of the repository's docs, about 1,350
tokens each, KR_TENANTS of them, default 20) overflow one server's cache and fill both. The same seeded schedule
of single-turn requests (a tenant's system prompt and a fresh question) is sent through
the gateway, concurrency KR_CONCURRENCY (default 4), once per configuration:

- `approximate`: the `vllm` policy with prefix affinity (the default), no events;
- `kv-events`: the same with every backend's kv_events and the model's tokenizer.

Between configurations both engines' caches are emptied (POST /reset_prefix_cache, with
VLLM_SERVER_DEV_MODE=1), which also exercises AllBlocksCleared. Reported per
configuration: requests, errors, the engines' own prefix-cache hit rate (their /metrics,
in tokens), TTFT p50/p90 (streamed), and where the requests went.
"""
import json, os, random, re, signal, subprocess, sys, tempfile, threading, time, urllib.request
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV, MODEL, GATEWAY = sys.argv[1], sys.argv[2], sys.argv[3]
TENANTS = int(os.environ.get("KR_TENANTS", "20"))
REQUESTS = int(os.environ.get("KR_REQUESTS", "240"))
CONCURRENCY = int(os.environ.get("KR_CONCURRENCY", "4"))
KV = os.environ.get("KR_KV_BYTES", "12M")
SEED = int(os.environ.get("KR_SEED", "42"))
CONFIGS = os.environ.get("KR_CONFIGS", "approximate,kv-events").split(",")

def free_port():
    import socket
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def post(url, body, timeout=600):
    r = urllib.request.Request(url, data=json.dumps(body).encode(),
                               headers={"content-type": "application/json"})
    return urllib.request.urlopen(r, timeout=timeout)

def metric(url, name):
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return sum(float(m.group(1)) for m in re.finditer(
        r"^" + re.escape(name) + r"\{[^}]*\} ([0-9.e+]+)$", text, re.M))

def wait_up(url, seconds=240):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return True
        except Exception:
            time.sleep(1)
    return False

servers = []
procs = []
for core in (0, 1):
    port, ev, rp = free_port(), free_port(), free_port()
    log = open(os.path.join(tempfile.gettempdir(), f"kv-real-vllm{core}.log"), "w")
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
    p = subprocess.Popen([os.path.join(ROOT, "scripts/real-vllm/serve.sh"), VENV, MODEL,
                          str(core), str(port), str(ev), str(rp), KV],
                         stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    procs.append(p)
    servers.append({"url": f"http://127.0.0.1:{port}", "events": ev, "replay": rp})

def stop_all(*_):
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
signal.signal(signal.SIGTERM, stop_all)
try:
    for s in servers:
        if not wait_up(s["url"] + "/health"):
            sys.exit(f"vLLM at {s['url']} did not start; see {tempfile.gettempdir()}/kv-real-vllm*.log")
    # Prose from the repository's own docs: nothing outside the repository is read.
    import glob
    license_words = " ".join(open(f).read() for f in sorted(glob.glob(os.path.join(ROOT, "docs/*.md")))).split()
    def system(t):
        rnd = random.Random(t)
        i = rnd.randrange(len(license_words) - 450)
        return f"Tenant {t}. " + " ".join(license_words[i:i + 450])
    systems = [system(t) for t in range(TENANTS)]
    rnd = random.Random(SEED)
    schedule = [(rnd.randrange(TENANTS), f"Question {i}: which section is about {rnd.random():.4f}?")
                for i in range(REQUESTS)]
    tok = json.load(post(servers[0]["url"] + "/tokenize",
                         {"model": "tiny-llama", "messages": [{"role": "system", "content": systems[0]}]}))
    print(f"Two vLLM 0.32 CPU servers, KV cache {KV} each; {TENANTS} tenants with system prompts "
          f"of about {tok['count']} tokens; {REQUESTS} requests, {CONCURRENCY} at a time, seed {SEED}.\n")
    print("| configuration | requests | errors | prefix-cache hit rate | TTFT p50 (s) | TTFT p90 (s) | requests per server |")
    print("|---|---|---|---|---|---|---|")
    for config in CONFIGS:
        for s in servers:
            post(s["url"] + "/reset_prefix_cache", {}).read()
        gw_port, admin_port = free_port(), free_port()
        lines = [f"listeners:\n  - address: 127.0.0.1:{gw_port}\nadmin:\n  address: 127.0.0.1:{admin_port}\nbackends:\n"]
        for i, s in enumerate(servers):
            lines.append(f"  - name: real{i}\n    url: {s['url']}\n")
            if config == "kv-events":
                lines.append(f"    kv_events: tcp://127.0.0.1:{s['events']}\n    kv_events_replay: tcp://127.0.0.1:{s['replay']}\n")
        if config == "kv-events":
            lines.append(f"routing:\n  tokenizers:\n    tiny-llama: {MODEL}\n")
        conf = os.path.join(tempfile.gettempdir(), f"kv-real-{config}.yaml")
        open(conf, "w").write("".join(lines))
        gw = subprocess.Popen([GATEWAY, "run", "-c", conf], stdout=subprocess.DEVNULL,
                              stderr=open(conf + ".log", "w"), start_new_session=True)
        try:
            if not wait_up(f"http://127.0.0.1:{admin_port}/ready", 60):
                sys.exit(f"the gateway did not start: {conf}.log")
            h0 = sum(metric(s["url"], "vllm:prefix_cache_hits_total") for s in servers)
            q0 = sum(metric(s["url"], "vllm:prefix_cache_queries_total") for s in servers)
            ttfts, errors, where = [], [0], {}
            lock = threading.Lock()
            def one(item):
                t, question = item
                body = {"model": "tiny-llama", "stream": True, "max_tokens": 8, "messages": [
                    {"role": "system", "content": systems[t]},
                    {"role": "user", "content": question}]}
                start = time.time()
                try:
                    resp = post(f"http://127.0.0.1:{gw_port}/v1/chat/completions", body)
                    backend = resp.headers.get("x-vllm-edge-backend", "-")
                    first = None
                    for line in resp:
                        if line.startswith(b"data: ") and first is None and b"content" in line:
                            first = time.time() - start
                    with lock:
                        ttfts.append(first if first is not None else time.time() - start)
                        where[backend] = where.get(backend, 0) + 1
                except Exception:
                    with lock:
                        errors[0] += 1
            with ThreadPoolExecutor(CONCURRENCY) as pool:
                list(pool.map(one, schedule))
            h1 = sum(metric(s["url"], "vllm:prefix_cache_hits_total") for s in servers)
            q1 = sum(metric(s["url"], "vllm:prefix_cache_queries_total") for s in servers)
            ttfts.sort()
            pct = lambda q: ttfts[min(len(ttfts) - 1, int(q * (len(ttfts) - 1) + 0.5))] if ttfts else float("nan")
            print(f"| {config} | {len(ttfts)} | {errors[0]} | {100 * (h1 - h0) / max(q1 - q0, 1):.1f}% | "
                  f"{pct(0.5):.3f} | {pct(0.9):.3f} | {', '.join(f'{k} {v}' for k, v in sorted(where.items()))} |",
                  flush=True)
            if config == "kv-events":
                stats = json.load(urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/load-stats"))
                for b in stats["backends"]:
                    k = b["kv_events"]
                    print(f"  {b['name']}: index {k['index']}, {k['blocks']} blocks, "
                          f"{k['batches_total']} batches, gaps {k['gaps_total']}, routing on {k['routing_on']}")
        finally:
            os.killpg(gw.pid, signal.SIGTERM)
            gw.wait()
finally:
    stop_all()
