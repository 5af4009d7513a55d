//! Micro-benchmarks of the request path's decisions: one pick among 4, 64 and 1024
//! backends for each policy (and with a prefix-affinity key), reading a chat body's
//! routing fields and its affinity key, parsing a real vLLM `/metrics` payload, and exact
//! prefix routing's request side (a chat of 1k, 8k and 32k tokens rendered with its chat
//! template and tokenized with the fixture tokenizer, cut into block keys and looked up
//! in an index holding all of it).
//!
//! Run: `cargo bench --bench selection`.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use std::time::{Duration, Instant};
use vllm_edge::config::{BackendConfig, Policy};
use vllm_edge::engine::metrics::{self as engine_metrics, EngineLoad};
use vllm_edge::fleet::{BackendEntry, Fleet, FleetSnapshot};
use vllm_edge::openai;
use vllm_edge::routing::affinity;
use vllm_edge::routing::{Request, Selector, Sticky};

/// A fleet of `n` backends, each at its own load and speed.
fn fleet(n: usize, now: Instant) -> FleetSnapshot {
    fleet_with(n, now, |i| (i * 7 % 200, i % 5, i % 10, i % 13))
}

/// The same fleet at one load and speed: a key's home is within the band of the lowest.
fn fleet_even(n: usize, now: Instant) -> FleetSnapshot {
    fleet_with(n, now, |_| (20, 0, 3, 2))
}

/// `load(i)`: running, waiting, KV usage in tenths, ITL above 10 ms in ms.
fn fleet_with(
    n: usize,
    now: Instant,
    load: impl Fn(usize) -> (usize, usize, usize, usize),
) -> FleetSnapshot {
    let cfgs: Vec<BackendConfig> = (0..n)
        .map(|i| BackendConfig {
            static_models: Some(vec!["m".into()]),
            ..BackendConfig::new(
                format!("b{i}"),
                format!("http://10.0.{}.{}:8000", i / 250, i % 250),
                format!("127.0.0.1:{}", 10_000 + i).parse().unwrap(),
            )
        })
        .collect();
    let entries = Fleet::new(&cfgs)
        .load()
        .backends
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let mut state = e.state.clone();
            e.backend.health.observe_check(Ok(()), &Default::default());
            let (running, waiting, kv, itl) = load(i);
            state.load = Some(EngineLoad {
                running: Some(running as f64),
                waiting: Some(waiting as f64),
                kv_usage: Some(kv as f64 / 10.0),
                kv_capacity_tokens: Some(450_000),
                engines: 1,
                ..EngineLoad::default()
            });
            state.load_at = Some(now);
            state.itl_s = Some(0.01 + itl as f64 / 1000.0);
            state.e2e_s = Some(2.0);
            BackendEntry {
                backend: e.backend.clone(),
                state,
            }
        })
        .collect();
    FleetSnapshot::new(entries)
}

fn pick(c: &mut Criterion) {
    let now = Instant::now();
    let req = Request {
        model: "m",
        prompt_tokens: 800,
        max_tokens: Some(256),
        affinity: None,
        cached: None,
    };
    let mut group = c.benchmark_group("pick");
    for n in [4usize, 64, 1024] {
        let snap = fleet(n, now);
        let sel = Selector::new(Duration::from_secs(1));
        for policy in [
            Policy::Vllm,
            Policy::LeastRequest,
            Policy::PowerOfTwo,
            Policy::RoundRobin,
        ] {
            group.bench_with_input(BenchmarkId::new(policy.to_string(), n), &n, |b, _| {
                b.iter(|| {
                    sel.best(policy, black_box(&snap), black_box(&req), &[], now)
                        .unwrap()
                })
            });
        }
    }
    group.finish();
    // A keyed request (a conversation's later turn): the key's rendezvous order, then the
    // load bound.
    let body = chat_body();
    let info = openai::inspect(&body, 128).unwrap();
    let key = affinity::key_of(&body, &info.spans, None, 4096).expect("a keyed chat");
    let keyed = Request {
        affinity: Some(Sticky {
            key,
            load_factor: 1.25,
            placed: None,
        }),
        ..req
    };
    let mut group = c.benchmark_group("keyed pick");
    for n in [4usize, 64, 1024] {
        let snap = fleet(n, now);
        let sel = Selector::new(Duration::from_secs(1));
        for policy in [Policy::Vllm, Policy::Affinity] {
            group.bench_with_input(BenchmarkId::new(policy.to_string(), n), &n, |b, _| {
                b.iter(|| {
                    sel.best(policy, black_box(&snap), black_box(&keyed), &[], now)
                        .unwrap()
                })
            });
        }
    }
    group.finish();
    // The same, on an evenly loaded fleet: the home is cheap, which is the common case.
    let mut group = c.benchmark_group("keyed pick, even load");
    for n in [4usize, 64, 1024] {
        let snap = fleet_even(n, now);
        let sel = Selector::new(Duration::from_secs(1));
        group.bench_with_input(BenchmarkId::new("vllm", n), &n, |b, _| {
            b.iter(|| {
                sel.best(Policy::Vllm, black_box(&snap), black_box(&keyed), &[], now)
                    .unwrap()
            })
        });
    }
    group.finish();
    let snap = fleet(64, now);
    let sel = Selector::new(Duration::from_secs(1));
    c.bench_function("all candidates in order/vllm/64", |b| {
        b.iter(|| {
            sel.candidates(Policy::Vllm, black_box(&snap), black_box(&req), &[], now)
                .unwrap()
        })
    });
}

/// The overhead benchmark's body (benches/overhead.py): 1.1 KB, a system prompt, a user
/// turn, an earlier answer and the next turn.
fn chat_body() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": "m",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. ".repeat(8)},
            {"role": "user", "content": format!("Summarise the following text in one sentence: {}", "lorem ipsum dolor sit amet ".repeat(20))},
            {"role": "assistant", "content": "Lorem ipsum is placeholder text."},
            {"role": "user", "content": "Shorter, please."},
        ],
        "max_tokens": 64,
        "temperature": 0.2,
    }))
    .unwrap()
}

fn read_body(c: &mut Criterion) {
    let body = chat_body();
    c.bench_function("inspect a 1.1 KB chat body", |b| {
        b.iter(|| openai::inspect(black_box(&body), 128).unwrap())
    });
    let info = openai::inspect(&body, 128).unwrap();
    c.bench_function("affinity key of a 1.1 KB chat body", |b| {
        b.iter(|| affinity::key_of(black_box(&body), &info.spans, None, 4096).unwrap())
    });
}

/// A placement plan (the scraper's, about once a second): long-lived keys of 1,200 tokens
/// over 64 backends of 450k KV tokens (a 60% share holds 225 keys each).
fn placement(c: &mut Criterion) {
    let now = Instant::now();
    let snap = fleet(64, now);
    let mut group = c.benchmark_group("placement plan, 64 backends");
    for n in [1024u64, 16_384] {
        let keys: Vec<(String, u64, usize)> = (0..n)
            .map(|i| ("m".to_string(), i.wrapping_mul(0x9e37_79b9_7f4a_7c15), 4800))
            .collect();
        group.bench_with_input(BenchmarkId::new("keys", n), &n, |b, _| {
            b.iter(|| affinity::plan(black_box(&snap), &keys, 0.6))
        });
    }
    group.finish();
}

fn parse_metrics(c: &mut Criterion) {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/vllm-0.32/metrics-busy-48x512-queued.txt"
    );
    let payload = std::fs::read(p).expect("the vLLM fixture");
    c.bench_function("parse vLLM /metrics (53 KB fixture)", |b| {
        b.iter(|| engine_metrics::parse(black_box(&payload), 8 << 20).unwrap())
    });
}

/// Exact prefix routing's cost per request: tokenizing (chat template, then the
/// tokenizer), then the block keys and the index lookup, for prompts of 1k, 8k and 32k
/// tokens.
fn prefix_tokens(c: &mut Criterion) {
    use vllm_edge::engine::kv_events::{Event, Stored};
    use vllm_edge::fleet::prefix::{block_keys, PrefixIndex};
    use vllm_edge::tokenize::{Prompt, Tokenizer};
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-tokenizer");
    let tok = Tokenizer::load(std::path::Path::new(dir)).unwrap();
    let sentence = "The licensee may convey verbatim copies of the program's source code as \
                    received, in any medium, provided that each copy carries a notice. ";
    let per_sentence = tok.encode(sentence, false).unwrap().len();
    let mut group = c.benchmark_group("exact prefix, per request");
    for tokens in [1_000usize, 8_000, 32_000] {
        let messages = serde_json::json!([
            {"role": "system", "content": sentence.repeat(tokens / per_sentence)},
            {"role": "user", "content": "Which section covers this?"}]);
        let ids = tok.tokens(Prompt::Chat(&messages)).unwrap();
        let index = PrefixIndex::default();
        let hashes: Vec<u64> = (0..(ids.len() / 16) as u64).collect();
        index.apply(
            0,
            0.0,
            &[Event::BlockStored(Stored {
                block_hashes: hashes.clone(),
                parent_block_hash: None,
                token_ids: ids[..hashes.len() * 16].to_vec(),
                block_size: 16,
                lora_name: None,
                medium: None,
                extra_keys: None,
                group_idx: None,
                kv_cache_spec_kind: None,
            })],
        );
        // The first time a system prompt is seen (its whole text tokenized), then again
        // (its ids remembered: only the template's short pieces are tokenized).
        let text = tok.render_chat(&messages).unwrap();
        group.bench_with_input(
            BenchmarkId::new("tokenize chat, first time", ids.len()),
            &text,
            |b, t| b.iter(|| tok.encode(black_box(t), false).unwrap()),
        );
        group.bench_with_input(
            BenchmarkId::new("tokenize chat, prompt seen before", ids.len()),
            &messages,
            |b, m| b.iter(|| tok.tokens(Prompt::Chat(black_box(m))).unwrap()),
        );
        group.bench_with_input(
            BenchmarkId::new("block keys + lookup", ids.len()),
            &ids,
            |b, ids| b.iter(|| index.cached_blocks(&block_keys(black_box(ids), 16, None, None))),
        );
    }
}

/// Flow control's part of a request whose fleet has room: the room counted, a slot
/// reserved, then given back once the request is in flight.
fn flow_fast_path(c: &mut Criterion) {
    let now = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("flow control");
    for n in [4usize, 64] {
        let snap = fleet(n, now);
        let cfgs: Vec<BackendConfig> = snap
            .backends
            .iter()
            .map(|e| BackendConfig {
                static_models: Some(vec!["m".into()]),
                max_concurrent_requests: Some(100_000),
                ..BackendConfig::new(
                    e.backend.name.clone(),
                    "http://10.0.0.1:8000",
                    e.backend.addr,
                )
            })
            .collect();
        let fleet = Fleet::new(&cfgs);
        let entries = fleet_with_configs(&fleet, &snap);
        fleet.replace(entries);
        let urls: Vec<String> = (0..n)
            .map(|i| format!("http://127.0.0.1:{}", 10_000 + i))
            .collect();
        let cfg = vllm_edge::config::Config::with_backends(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
            &urls,
        );
        let live = std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(cfg));
        let flow = vllm_edge::flow::FlowControl::new(live, fleet);
        let asker = vllm_edge::flow::Asker::anonymous(vllm_edge::flow::Priority::Normal);
        group.bench_with_input(BenchmarkId::new("wait_turn with room", n), &n, |b, _| {
            b.iter(|| {
                rt.block_on(async {
                    let a = flow
                        .wait_turn("m", &asker, std::future::pending())
                        .await
                        .unwrap();
                    black_box(a)
                })
            })
        });
    }
    group.finish();
}

/// The entries of `snap` on the backends of `fleet` (same order).
fn fleet_with_configs(fleet: &Fleet, snap: &FleetSnapshot) -> Vec<BackendEntry> {
    fleet
        .load()
        .backends
        .iter()
        .zip(&snap.backends)
        .map(|(e, s)| {
            e.backend.health.observe_check(Ok(()), &Default::default());
            BackendEntry {
                backend: e.backend.clone(),
                state: s.state.clone(),
            }
        })
        .collect()
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = pick, read_body, placement, parse_metrics, prefix_tokens, flow_fast_path
}
criterion_main!(benches);
