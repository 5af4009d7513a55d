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
    let r = http1()
        .post(gw.admin_url("/explain"))
        .json(&ask)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
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
