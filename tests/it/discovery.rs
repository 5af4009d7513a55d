//! Model discovery and routing by model: `/v1/models` is the union over healthy backends,
//! and a request only reaches backends serving its model.

use crate::support::*;
use std::collections::BTreeSet;
use std::time::Duration;

#[tokio::test]
async fn models_are_the_union_of_healthy_backends_and_requests_follow_their_model() {
    let a = sim_with(&["m1"], |s| s.name = Some("a".into())).await;
    let b = sim_with(&["m1", "m2"], |s| s.name = Some("b".into())).await;
    let gw = Gateway::builder(&[&a, &b])
        .backend_url("http://127.0.0.1:9")
        .yaml("routing:\n  policy: round-robin")
        .start()
        .await;
    assert_eq!(models(&gw).await, vec!["m1", "m2"]);

    let c = http1();
    let mut served_m1 = BTreeSet::new();
    for i in 0..6 {
        for (model, only) in [("m1", None), ("m2", Some("b"))] {
            let resp = c
                .post(gw.url("/v1/chat/completions"))
                .json(&chat_body(model, &format!("q{i}"), false))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            let replica = resp.headers()["x-sim-replica"]
                .to_str()
                .unwrap()
                .to_string();
            if let Some(only) = only {
                assert_eq!(
                    replica, only,
                    "{model} went to a backend that does not serve it"
                );
            } else {
                served_m1.insert(replica);
            }
            let v: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(v["model"], model);
        }
    }
    assert_eq!(
        served_m1.len(),
        2,
        "round-robin spreads m1 over both backends"
    );

    b.stop();
    assert!(
        eventually(Duration::from_secs(5), || async {
            models(&gw).await == vec!["m1"]
        })
        .await,
        "m2 should disappear with its only backend"
    );
    // The gateway's own health does not depend on the backends.
    assert_eq!(c.get(gw.url("/health")).send().await.unwrap().status(), 200);
    a.stop();
    assert!(
        eventually(Duration::from_secs(5), || async {
            models(&gw).await.is_empty()
        })
        .await
    );
    assert_eq!(c.get(gw.url("/health")).send().await.unwrap().status(), 200);
    assert_eq!(
        c.get(gw.admin_url("/ready")).send().await.unwrap().status(),
        503
    );
}

#[tokio::test]
async fn other_model_endpoints_are_proxied() {
    let a = sim(&["emb"]).await;
    let gw = Gateway::builder(&[&a]).start().await;
    let c = http2();
    let resp = c
        .post(gw.url("/v1/embeddings"))
        .json(&serde_json::json!({"model": "emb", "input": ["a", "b"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    let resp = c
        .post(gw.url("/tokenize"))
        .json(&serde_json::json!({"model": "emb", "prompt": "one two three"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["count"], 3);
    let resp = c
        .post(gw.url("/v1/completions"))
        .json(&serde_json::json!({"model": "emb", "prompt": "x", "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 3);
}

/// `GET /version` and `GET /load`, which vLLM answers too, are answered for the fleet:
/// the oldest version among the replicas in rotation (a rolling upgrade shows the old one
/// until it is done), and this gateway's requests in flight.
#[tokio::test]
async fn version_and_load_are_answered_for_the_fleet() {
    // At the simulator's real speed, so that a stream stays in flight for a while.
    let old = sim_with(&["m"], |s| {
        s.vllm_version = "0.9.2".into();
        s.time_scale = None;
    })
    .await;
    let new = sim_with(&["m"], |s| {
        s.vllm_version = "0.32.0".into();
        s.time_scale = None;
    })
    .await;
    let gw = Gateway::builder(&[&old, &new])
        .yaml("health:\n  interval: 100ms\n  unhealthy_threshold: 1")
        .start()
        .await;
    let version = || async {
        let r = http1().get(gw.url("/version")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.json::<serde_json::Value>().await.unwrap()["version"].clone()
    };
    assert_eq!(version().await, "0.9.2", "the oldest, by number");
    let stats = get_json(gw.admin_url("/load-stats")).await;
    let versions: BTreeSet<&str> = stats["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["vllm_version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, BTreeSet::from(["0.32.0", "0.9.2"]), "{stats}");

    let load = || async {
        let v = get_json(gw.url("/load")).await;
        v["server_load"].as_u64().unwrap()
    };
    assert_eq!(load().await, 0);
    let body = serde_json::json!({"model": "m", "stream": true, "max_tokens": 400, "ignore_eos": true,
        "messages": [{"role": "user", "content": "count"}]});
    let mut stream = http1()
        .post(gw.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert!(
        stream.chunk().await.unwrap().is_some(),
        "the stream started"
    );
    assert_eq!(load().await, 1, "the stream in flight");
    drop(stream);
    assert!(
        eventually(Duration::from_secs(5), || async { load().await == 0 }).await,
        "the client left, and so did the request"
    );

    let r = http1().post(gw.url("/version")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    // The old replica is gone: the fleet is on the new version.
    old.stop();
    assert!(
        eventually(Duration::from_secs(5), || async {
            version().await == "0.32.0"
        })
        .await,
        "{}",
        get_json(gw.admin_url("/load-stats")).await
    );
}

/// `/v1/models` gives each model as a replica described it (vLLM's entries carry
/// `max_model_len`, `root`, `parent`), with the smallest `max_model_len` of the replicas
/// serving it, so a prompt sized to it fits wherever it is routed.
#[tokio::test]
async fn models_are_described_as_the_replicas_describe_them() {
    let long = sim_with(&["m"], |s| s.max_model_len = Some(32_768)).await;
    let short = sim_with(&["m", "other"], |s| s.max_model_len = Some(8_192)).await;
    let gw = Gateway::builder(&[&long, &short])
        .backend_with("http://127.0.0.1:9", "models: [configured]")
        .start()
        .await;
    let v = get_json(gw.url("/v1/models")).await;
    let data = v["data"].as_array().unwrap();
    let card = |id: &str| data.iter().find(|c| c["id"] == id).cloned();
    let m = card("m").unwrap();
    assert_eq!(m["max_model_len"], 8192, "the smallest: {v}");
    assert_eq!(m["root"], "m", "{v}");
    assert!(
        m["parent"].is_null() && m["created"].as_u64() > Some(0),
        "{v}"
    );
    assert_eq!(card("other").unwrap()["max_model_len"], 8192);
    // A backend that is down lends nothing, and only the config names `configured`.
    assert!(card("configured").is_none(), "its backend is down: {v}");
    short.stop();
    assert!(
        eventually(Duration::from_secs(10), || async {
            let v = get_json(gw.url("/v1/models")).await;
            v["data"].as_array().unwrap().len() == 1 && v["data"][0]["max_model_len"] == 32768
        })
        .await,
        "{}",
        get_json(gw.url("/v1/models")).await
    );
}
