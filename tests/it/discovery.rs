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
