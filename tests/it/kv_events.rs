//! Exact prefix routing on KV events, end to end: simulated engines that publish vLLM's
//! events (ZMQ PUB + replay ROUTER, real sockets on loopback), a gateway that subscribes,
//! tokenizes with the model's tokenizer and routes to where the prompt is cached; lost
//! events replayed or rebuilt; a restarted engine starts from nothing.

use crate::support::*;
use serde_json::{json, Value};
use std::time::Duration;
use vllm_edge::sim::SimHandle;

fn tokenizer_dir() -> String {
    format!(
        "{}/tests/fixtures/tiny-tokenizer",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// `n` simulated engines that tokenize with the fixture tokenizer and publish KV events.
async fn engines(n: usize) -> Vec<SimHandle> {
    let mut sims = Vec::new();
    for _ in 0..n {
        sims.push(
            // Real time (H100 profile): steps of about a millisecond, so the engines'
            // measured speeds are not scheduling noise on a busy machine.
            sim_with(&["m"], |a| {
                a.time_scale = Some(1.0);
                a.kv_events_port = Some(0);
                a.tokenizer = Some(tokenizer_dir().into());
            })
            .await,
        );
    }
    sims
}

fn kv_entry(s: &SimHandle) -> String {
    let p = s.sim.kv_events.as_ref().unwrap();
    format!(
        "kv_events: tcp://{}\nkv_events_replay: tcp://{}",
        p.endpoint, p.replay
    )
}

async fn gateway(sims: &[SimHandle]) -> Gateway {
    let mut b = Gateway::builder(&[]);
    for s in sims {
        b = b.backend_with(&s.url(), &kv_entry(s));
    }
    b.yaml(&format!(
        "routing:\n  tokenizers:\n    m: {}\n",
        tokenizer_dir()
    ))
    .start()
    .await
}

/// A long, distinct system prompt (about 800 tokens of the fixture tokenizer).
fn prompt(tenant: usize) -> Vec<Value> {
    let text = format!(
        "Tenant {tenant} instructions. You answer questions about the GNU General Public \
         License, quoting sections by number and never inventing text. "
    )
    .repeat(25);
    vec![
        json!({"role": "system", "content": text}),
        json!({"role": "user", "content": "What does section 7 say?"}),
    ]
}

async fn chat_at(url: &str, messages: &[Value]) -> reqwest::Response {
    let resp = http1()
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": "m", "max_tokens": 4, "messages": messages}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp
}

/// The `kv_events` block of backend `name` in `/load-stats`.
async fn index_of(gw: &Gateway, name: &str) -> Value {
    let stats = get_json(gw.admin_url("/load-stats")).await;
    stats["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {stats}"))["kv_events"]
        .clone()
}

/// Waits until the gateway's index of `s` has applied `batches` batches.
async fn indexed(gw: &Gateway, s: &SimHandle, batches: u64) -> Value {
    let name = name_of(s);
    let ok = eventually(Duration::from_secs(10), || async {
        index_of(gw, &name).await["batches_total"]
            .as_u64()
            .unwrap_or(0)
            >= batches
    })
    .await;
    let last = index_of(gw, &name).await;
    assert!(ok, "{name}'s index never reached {batches} batches: {last}");
    last
}

/// One engine behind a gateway, its index holding tenant 0's prompt.
async fn one_warmed_engine() -> (Vec<SimHandle>, Gateway) {
    let sims = engines(1).await;
    let gw = gateway(&sims).await;
    chat_at(&sims[0].url(), &prompt(0)).await;
    let before = indexed(&gw, &sims[0], 1).await;
    assert!(before["blocks"].as_u64().unwrap() > 0, "{before}");
    (sims, gw)
}

fn backend_of(resp: &reqwest::Response) -> String {
    resp.headers()["x-vllm-edge-backend"]
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn a_prompt_goes_where_another_client_cached_it() {
    let sims = engines(3).await;
    let gw = gateway(&sims).await;
    for (i, s) in sims.iter().enumerate() {
        // Each engine warmed directly (not through the gateway) with its own tenant's
        // prompt: nothing the approximate affinity could know.
        chat_at(&s.url(), &prompt(i)).await;
    }
    for s in &sims {
        let ix = indexed(&gw, s, 1).await;
        assert_eq!(ix["index"], "exact", "{ix}");
        assert_eq!(ix["routing_on"], "kv_events", "{ix}");
        assert!(ix["blocks"].as_u64().unwrap() >= 40, "{ix}");
    }
    for round in 0..2 {
        for (i, s) in sims.iter().enumerate() {
            let body = json!({"model": "m", "max_tokens": 4, "messages": prompt(i)});
            let ex = explain(&gw, &body).await;
            assert_eq!(ex["choice"]["backend"], name_of(s), "{ex}");
            assert_eq!(ex["choice"]["reason"], "cached_prefix", "{ex}");
            let at = ex["candidates"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["backend"] == name_of(s))
                .unwrap()
                .clone();
            assert_eq!(at["cached_prefix"]["source"], "kv_events", "{at}");
            assert!(
                at["cached_prefix"]["tokens"].as_u64().unwrap() >= 640,
                "{at}"
            );
            let resp = chat_at(&gw.url(""), &prompt(i)).await;
            assert_eq!(backend_of(&resp), name_of(s), "round {round}, tenant {i}");
        }
    }
}

#[tokio::test]
async fn a_dropped_batch_is_replayed_and_a_lost_one_falls_back_until_rebuilt() {
    let sims = engines(2).await;
    let gw = gateway(&sims).await;
    let s = &sims[0];
    chat_at(&s.url(), &prompt(0)).await;
    indexed(&gw, s, 1).await;

    // Dropped on the way (kept in the replay buffer): the next batch shows the gap, the
    // gateway asks for it, and what it held is indexed.
    let r = http1()
        .post(format!("{}/sim/kv-events", s.url()))
        .json(&json!({"drop": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    chat_at(&s.url(), &prompt(1)).await; // dropped
    chat_at(&s.url(), &prompt(2)).await; // published: reveals the gap
    let ix = indexed(&gw, s, 3).await;
    assert_eq!(ix["gaps_replayed_total"], 1, "{ix}");
    assert_eq!(ix["index"], "exact", "{ix}");
    let ex = explain(
        &gw,
        &json!({"model": "m", "max_tokens": 4, "messages": prompt(1)}),
    )
    .await;
    assert_eq!(
        ex["choice"]["backend"],
        name_of(s),
        "the replayed batch counts: {ex}"
    );

    // Lost for good: the index starts again and routing falls back to the approximate
    // affinity for the whole pick (a guess is never set against another's facts).
    http1()
        .post(format!("{}/sim/kv-events", s.url()))
        .json(&json!({"lose": 1}))
        .send()
        .await
        .unwrap();
    chat_at(&s.url(), &prompt(3)).await; // lost
    chat_at(&s.url(), &prompt(4)).await; // reveals the gap, which no replay can fill
    let ix = indexed(&gw, s, 4).await;
    assert_eq!(ix["index"], "rebuilding", "{ix}");
    assert_eq!(ix["routing_on"], "approximate", "{ix}");
    let ex = explain(
        &gw,
        &json!({"model": "m", "max_tokens": 4, "messages": prompt(4)}),
    )
    .await;
    assert_ne!(ex["choice"]["reason"], "cached_prefix", "{ex}");
    let rebuilding = ex["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["backend"] == name_of(s))
        .unwrap();
    assert_eq!(
        rebuilding["cached_prefix"]["index"], "rebuilding",
        "{rebuilding}"
    );
    assert_ne!(
        rebuilding["cached_prefix"]["source"], "kv_events",
        "{rebuilding}"
    );
    assert!(gw.log().contains("KV events were lost"), "{}", gw.log());
}

#[tokio::test]
async fn a_restarted_engine_starts_with_an_empty_index() {
    let (sims, gw) = one_warmed_engine().await;
    let s = &sims[0];
    s.sim.restart(Duration::from_millis(300));
    let health = || async {
        http1()
            .get(format!("{}/health", s.url()))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    };
    // Down (the engine was reset), then up again.
    assert!(eventually(Duration::from_secs(10), || async { !health().await }).await);
    assert!(
        eventually(Duration::from_secs(10), || async {
            http1()
                .get(format!("{}/health", s.url()))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await
    );
    // Its first batch after the restart is sequence 0 again.
    chat_at(&s.url(), &prompt(1)).await;
    let name = name_of(s);
    let ok = eventually(Duration::from_secs(10), || async {
        index_of(&gw, &name).await["restarts_total"] == 1
    })
    .await;
    let after = index_of(&gw, &name).await;
    assert!(ok, "{after}");
    assert_eq!(after["index"], "exact", "{after}");
    // Once its health checks pass again, it is a candidate holding nothing of before.
    let body = json!({"model": "m", "max_tokens": 4, "messages": prompt(0)});
    assert!(
        eventually(Duration::from_secs(10), || async {
            explain(&gw, &body).await["candidates"]
                .as_array()
                .is_some_and(|c| !c.is_empty())
        })
        .await
    );
    let ex = explain(&gw, &body).await;
    assert_eq!(
        ex["candidates"][0]["cached_prefix"]["tokens"], 0,
        "what the engine held before its restart is gone: {ex}"
    );
}

#[tokio::test]
async fn a_gateway_that_joins_late_replays_the_history() {
    let sims = engines(1).await;
    let s = &sims[0];
    chat_at(&s.url(), &prompt(0)).await;
    chat_at(&s.url(), &prompt(1)).await;
    // Started after both batches were published: it asks the replay socket for the
    // history from sequence 0 when it subscribes.
    let gw = gateway(&sims).await;
    chat_at(&s.url(), &prompt(2)).await;
    let ix = indexed(&gw, s, 3).await;
    assert_eq!(ix["index"], "exact", "{ix}");
    assert_eq!(ix["last_sequence"], 2, "{ix}");
    let ex = explain(
        &gw,
        &json!({"model": "m", "max_tokens": 4, "messages": prompt(0)}),
    )
    .await;
    assert!(
        ex["candidates"][0]["cached_prefix"]["tokens"]
            .as_u64()
            .unwrap()
            >= 640,
        "{ex}"
    );
}

/// An engine restarted while idle publishes nothing that says so; its server's new
/// process start time (scraped) does.
#[tokio::test]
async fn an_engine_restarted_while_idle_is_known_by_its_start_time() {
    let (sims, gw) = one_warmed_engine().await;
    let s = &sims[0];
    let name = name_of(s);
    // The gateway has seen the server's start time before it restarts.
    assert!(
        eventually(Duration::from_secs(10), || async {
            index_of(&gw, &name).await["engine_identity"].is_string()
        })
        .await
    );
    s.sim.restart(Duration::from_millis(300));
    let ok = eventually(Duration::from_secs(10), || async {
        index_of(&gw, &name).await["restarts_total"] == 1
    })
    .await;
    let after = index_of(&gw, &name).await;
    assert!(ok, "{after}");
    assert_eq!(
        (after["blocks"].as_u64(), after["index"].as_str()),
        (Some(0), Some("exact")),
        "{after}"
    );
    assert!(gw.log().contains("server started again"), "{}", gw.log());
}
