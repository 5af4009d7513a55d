//! vLLM-aware selection end to end: the gateway scrapes the engines, reports them on
//! /load-stats, and steers requests away from a replica that queues.

use crate::support::*;
use serde_json::{json, Value};
use std::time::Duration;
use vllm_edge::sim::Preset;

async fn load_stats(gw: &Gateway) -> Value {
    get_json(gw.admin_url("/load-stats")).await
}

fn backend<'a>(stats: &'a Value, addr: &std::net::SocketAddr) -> &'a Value {
    stats["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == addr.to_string())
        .unwrap()
}

#[tokio::test]
async fn requests_avoid_a_replica_whose_engine_queues() {
    // tiny-test engines (8 sequences, 4096 tokens of KV), 20× slower than tiny-test's
    // default so a queue lasts for seconds.
    let tiny = |a: &mut vllm_edge::sim::SimArgs| {
        a.preset = Preset::TinyTest;
        a.time_scale = Some(0.2);
        a.kv_tokens = None;
        a.max_model_len = None;
    };
    let busy = sim_with(&["m"], tiny).await;
    let idle = sim_with(&["m"], tiny).await;
    let gw = Gateway::builder(&[&busy, &idle])
        .yaml("discovery:\n  scrape_interval: 50ms\n  models_interval: 1s")
        .start()
        .await;
    let stats = load_stats(&gw).await;
    assert_eq!(stats["policy"], "vllm");

    // Load the first replica directly, behind the gateway's back.
    let prompt = "tok ".repeat(100);
    let direct: Vec<_> = (0..16)
        .map(|i| {
            let url = format!("{}/v1/chat/completions", busy.url());
            let body = json!({"model": "m", "max_tokens": 300, "ignore_eos": true,
                          "messages": [{"role": "user", "content": format!("{i} {prompt}")}]});
            tokio::spawn(async move {
                http1()
                    .post(url)
                    .json(&body)
                    .send()
                    .await
                    .map(|r| r.status())
            })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(10), || async {
            let s = load_stats(&gw).await;
            let b = backend(&s, &busy.addr);
            b["waiting"].as_f64() > Some(0.0) && b["scrape_fresh"] == true
        })
        .await,
        "the gateway should see the queue: {}",
        load_stats(&gw).await
    );
    let stats = load_stats(&gw).await;
    let b = backend(&stats, &busy.addr);
    assert_eq!(b["running"], 8.0);
    // It ran 8 while requests waited: that is its batch limit, learned.
    assert_eq!(b["capacity"]["max_running_learned"], 8.0, "{stats}");
    assert!(backend(&stats, &idle.addr)["capacity"]["max_running_learned"].is_null());
    assert!(b["kv_usage"].as_f64().unwrap() > 0.0 && b["capacity"]["kv_tokens"] == 4096);
    assert!(
        b["score_ms"].as_f64() > backend(&stats, &idle.addr)["score_ms"].as_f64(),
        "{stats}"
    );
    assert!(stats["fleet"]["waiting"].as_f64() > Some(0.0));

    // `POST /explain` says where a request would go and why, without sending it: the
    // queue on the busy replica decides.
    let ask =
        json!({"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "why?"}]});
    let v = explain(&gw, &ask).await;
    assert_eq!(v["choice"]["backend"], idle.addr.to_string(), "{v}");
    assert_eq!(v["choice"]["reason"], "lowest_score", "{v}");
    let c = v["candidates"].as_array().unwrap();
    let names: Vec<&Value> = c.iter().map(|c| &c["backend"]).collect();
    assert_eq!(
        names,
        [&json!(idle.addr.to_string()), &json!(busy.addr.to_string())]
    );
    assert_eq!(c[0]["score_ms"], v["choice"]["score_ms"], "{v}");
    assert_eq!(c[0]["terms_ms"]["queue"], 0.0, "{v}");
    assert!(
        c[1]["terms_ms"]["queue"].as_f64() > Some(0.0),
        "the busy replica's queue: {v}"
    );
    assert!(c[1]["sequences"].as_f64() > Some(8.0), "{v}");
    assert_eq!(c[1]["scrape_fresh"], true);
    assert_eq!(v["request"]["max_tokens"], 2);

    // Every request through the gateway now goes to the idle replica.
    for i in 0..6 {
        let resp = http1()
            .post(gw.url("/v1/chat/completions"))
            .json(&json!({"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": format!("q{i}")}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["x-vllm-edge-backend"].to_str().unwrap(),
            idle.addr.to_string()
        );
    }

    // A replica whose /metrics turns to garbage goes stale, and says why.
    idle.sim.set_faults(vllm_edge::sim::Faults {
        metrics_garbage: true,
        ..Default::default()
    });
    assert!(
        eventually(Duration::from_secs(5), || async {
            let s = load_stats(&gw).await;
            let b = backend(&s, &idle.addr);
            b["scrape_fresh"] == false
                && b["last_scrape_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("line 1"))
        })
        .await,
        "{}",
        load_stats(&gw).await
    );
    for t in direct {
        assert_eq!(t.await.unwrap().unwrap(), 200);
    }
}

#[tokio::test]
async fn a_lora_adapter_goes_where_it_has_a_slot() {
    // Two engines with one LoRA slot each (vLLM's --max-loras 1), in real time so the
    // requests below hold their slots for seconds.
    let lora = |a: &mut vllm_edge::sim::SimArgs| {
        a.preset = Preset::TinyTest;
        a.time_scale = Some(1.0);
        a.kv_tokens = None;
        a.max_model_len = None;
        a.lora_modules = vec![
            ("a".into(), "/lora/a".into()),
            ("b".into(), "/lora/b".into()),
        ];
        a.max_loras = 1;
    };
    let holds_a = sim_with(&["m"], lora).await;
    // A GPU half as fast: the worse replica for any request that needs no slot.
    let slower = sim_with(&["m"], |a| {
        lora(a);
        a.speed_factor = 0.5;
    })
    .await;
    let gw = Gateway::builder(&[&holds_a, &slower])
        .yaml("discovery:\n  scrape_interval: 50ms\n  models_interval: 1s")
        .start()
        .await;
    // Behind the gateway's back: adapter `a` takes the first engine's slot with one long
    // stream; the slower engine runs base-model streams, no adapter.
    let hold = |sim: &vllm_edge::sim::SimHandle, model: &str, tokens: usize| {
        let url = format!("{}/v1/completions", sim.url());
        let body = json!({"model": model, "prompt": "hold", "max_tokens": tokens,
                          "ignore_eos": true, "stream": true});
        tokio::spawn(async move {
            let r = http1().post(url).json(&body).send().await.unwrap();
            r.bytes().await.map(|b| b.len())
        })
    };
    let held = [
        hold(&holds_a, "a", 2000),
        hold(&slower, "m", 1000),
        hold(&slower, "m", 1000),
        hold(&slower, "m", 1000),
    ];
    assert!(
        eventually(Duration::from_secs(10), || async {
            let s = load_stats(&gw).await;
            let (a, b) = (backend(&s, &holds_a.addr), backend(&s, &slower.addr));
            a["lora"]["running_adapters"] == json!(["a"]) && b["running"] == 3.0
        })
        .await,
        "the gateway should see the slots: {}",
        load_stats(&gw).await
    );
    let stats = load_stats(&gw).await;
    assert_eq!(
        backend(&stats, &slower.addr)["lora"],
        json!({"max_loras": 1, "running_adapters": [], "waiting_adapters": []})
    );

    // Adapter `b` would wait on the faster engine until `a` is done there: it goes to the
    // slower one, which has a slot free, and `/explain` says why.
    let ask = |model: &str| json!({"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]});
    let v = explain(&gw, &ask("b")).await;
    assert_eq!(v["choice"]["backend"], slower.addr.to_string(), "{v}");
    let c = v["candidates"].as_array().unwrap();
    assert_eq!(c[0]["terms_ms"]["lora_slot"], 0.0, "{v}");
    assert_eq!(c[0]["lora"], "free slot", "{v}");
    assert!(c[1]["terms_ms"]["lora_slot"].as_f64() > Some(0.0), "{v}");
    assert_eq!(c[1]["lora"], "no slot free", "{v}");
    let sent_to = |model: &'static str| {
        let (url, body) = (gw.url("/v1/chat/completions"), ask(model));
        async move {
            let r = http1().post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.headers()["x-vllm-edge-backend"]
                .to_str()
                .unwrap()
                .to_string()
        }
    };
    assert_eq!(sent_to("b").await, slower.addr.to_string());
    // Adapter `a` holds its slot there, and the base model needs none: both go to the
    // faster engine.
    assert_eq!(sent_to("a").await, holds_a.addr.to_string());
    assert_eq!(sent_to("m").await, holds_a.addr.to_string());
    for h in held {
        h.abort();
    }
}
