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
    // It still answers (with OpenAI-style errors): a Service keeps it.
    let serving = c.get(gw.admin_url("/serving")).send().await.unwrap();
    assert_eq!(serving.status(), 200);
    assert_eq!(serving.text().await.unwrap(), r#"{"serving":true}"#);
}

#[tokio::test]
async fn a_request_that_names_no_model_gets_the_fleets_default_as_from_vllm() {
    use serde_json::json;
    let a = sim_with(&["m1"], |s| s.name = Some("a".into())).await;
    let b = sim_with(&["m1"], |s| s.name = Some("b".into())).await;
    let c = http1();
    let post = |gw: &Gateway, body: serde_json::Value| {
        c.post(gw.url("/v1/chat/completions")).json(&body).send()
    };
    let hi = json!([{"role": "user", "content": "hi"}]);
    // One model everywhere: it is the default, as vLLM's own.
    let gw = Gateway::builder(&[&a, &b]).start().await;
    for body in [
        json!({"messages": hi}),
        json!({"messages": hi, "model": null}),
        json!({"messages": hi, "model": ""}),
    ] {
        let resp = post(&gw, body.clone()).await.unwrap();
        assert_eq!(resp.status(), 200, "{body}");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["model"], "m1", "{body}: {v}");
    }
    let resp = post(&gw, json!({"messages": hi, "stream": true}))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("\"model\":\"m1\"") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    // The access log names the model (its line is written once the answer is out).
    assert!(
        eventually(Duration::from_secs(5), || async {
            gw.log()
                .lines()
                .filter(|l| l.contains(" access: ") && l.contains("model=\"m1\""))
                .count()
                == 4
        })
        .await,
        "{}",
        gw.log()
    );
    let stats = get_json(gw.admin_url("/load-stats")).await;
    assert_eq!(
        stats["fleet"]["default_model"],
        json!({"model": "m1", "configured": false})
    );
    drop(gw);

    // Two models, no default: the client must choose.
    let other = sim_with(&["m2"], |s| s.name = Some("other".into())).await;
    let gw = Gateway::builder(&[&a, &other]).start().await;
    let stats = get_json(gw.admin_url("/load-stats")).await;
    assert_eq!(
        stats["fleet"]["default_model"],
        json!({"model": null, "replicas_list_first": ["m1", "m2"]})
    );
    let (status, v) = error_of(post(&gw, json!({"messages": hi})).await.unwrap()).await;
    assert_eq!(
        (status, &v["error"]["param"]),
        (400, &json!("model")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("GET /v1/models"),
        "{v}"
    );
    still_serves(&gw, "m2").await;
    drop(gw);

    // A configured default, here a LoRA adapter of one replica: the name is written into
    // the body (the replica would otherwise answer with its base model).
    let lora = sim_with(&["m3"], |s| {
        s.name = Some("lora".into());
        s.lora_modules = vec![("sql".into(), "/lora/sql".into())];
    })
    .await;
    let gw = Gateway::builder(&[&a, &lora])
        .yaml("routing:\n  default_model: sql")
        .start()
        .await;
    for _ in 0..3 {
        let resp = post(&gw, json!({"messages": hi})).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-sim-replica"], "lora");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["model"], "sql", "{v}");
    }
    let e = explain(&gw, &json!({"messages": hi})).await;
    assert_eq!(e["request"]["model"], "sql", "{e}");
    assert_eq!(e["request"]["model_defaulted"], true, "{e}");
    assert_eq!(e["choice"]["backend"], name_of(&lora), "{e}");
}

#[tokio::test]
async fn an_alias_is_routed_and_sent_as_the_model_it_stands_for() {
    use serde_json::json;
    let a = sim_with(&["llama"], |s| s.name = Some("a".into())).await;
    let lora = sim_with(&["base"], |s| {
        s.name = Some("lora".into());
        s.lora_modules = vec![("sql".into(), "/lora/sql".into())];
    })
    .await;
    let gw = Gateway::builder(&[&a, &lora])
        .yaml("routing:\n  model_aliases:\n    gpt-4o: llama\n    cheap: sql\n    base: llama\n    ghost: nowhere\n")
        .start()
        .await;
    let c = http1();
    let hi = json!([{"role": "user", "content": "hi"}]);
    // `base` is an alias too: it hides the model of that name.
    for (asked, replica, model) in [
        ("gpt-4o", "a", "llama"),
        ("cheap", "lora", "sql"),
        ("base", "a", "llama"),
        ("llama", "a", "llama"),
    ] {
        let resp = c
            .post(gw.url("/v1/chat/completions"))
            .json(&json!({"model": asked, "messages": hi}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{asked}");
        assert_eq!(resp.headers()["x-sim-replica"], replica, "{asked}");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["model"], model, "{asked}: {v}");
    }
    // An alias of a model no replica serves is unknown, by the name asked for.
    let (status, v) = error_of(
        c.post(gw.url("/v1/chat/completions"))
            .json(&json!({"model": "ghost", "messages": hi}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let says = v["error"]["message"].as_str().unwrap();
    assert_eq!(status, 404, "{v}");
    assert!(says.contains("`ghost`") && !says.contains("nowhere"), "{v}");
    // Listed under their own names, with their model's entry (`base` with llama's); not
    // `ghost`.
    assert_eq!(
        models(&gw).await,
        ["base", "cheap", "gpt-4o", "llama", "sql"]
    );
    let cards = get_json(gw.url("/v1/models")).await;
    let cheap = cards["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "cheap")
        .unwrap()
        .clone();
    assert_eq!(cheap["parent"], "base", "{cheap}");
    let card = |id: &str| {
        let mut c = cards["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .unwrap()
            .clone();
        c["id"] = "-".into();
        c
    };
    assert_eq!(
        card("base"),
        card("llama"),
        "llama's entry under another name"
    );
    let stats = get_json(gw.admin_url("/load-stats")).await;
    assert_eq!(stats["fleet"]["model_aliases"]["gpt-4o"], "llama");
    let e = explain(&gw, &json!({"model": "gpt-4o", "prompt": "x"})).await;
    assert_eq!(e["request"]["model"], "llama", "{e}");
    assert_eq!(e["request"]["model_alias"], "gpt-4o", "{e}");
    assert_eq!(e["choice"]["backend"], name_of(&a), "{e}");
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

/// vLLM's runtime LoRA endpoints on the admin listener reach the whole fleet (or the
/// replicas of `?model=BASE`), and an adapter is routable as soon as the answer says it
/// was loaded, while scrapes that began before keep coming in.
#[tokio::test]
async fn lora_adapters_are_loaded_across_the_fleet_and_routable_at_once() {
    let lora = |s: &mut vllm_edge::sim::SimArgs| s.runtime_lora = true;
    let (a, b) = (
        sim_with(&["base"], lora).await,
        sim_with(&["base"], lora).await,
    );
    let other = sim(&["other"]).await;
    let gw = Gateway::builder(&[&a, &b, &other])
        .yaml("discovery:\n  scrape_interval: 20ms\n  models_interval: 30ms")
        .start()
        .await;
    let post = |path: &str, body: serde_json::Value| {
        let url = gw.admin_url(path);
        async move {
            let r = http1().post(url).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let sql = serde_json::json!({"lora_name": "sql", "lora_path": "/adapters/sql"});
    let (status, text) = post("/v1/load_lora_adapter?model=base", sql.clone()).await;
    assert_eq!(
        (status, text.as_str()),
        (200, "Success: LoRA adapter 'sql' added successfully.")
    );
    // Routable at once, and it stays so while the scrapes go on.
    for _ in 0..20 {
        let v = get_json(gw.url("/v1/models")).await;
        let card = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == "sql")
            .cloned();
        assert_eq!(
            card.as_ref().map(|c| &c["parent"]),
            Some(&serde_json::json!("base")),
            "{v}"
        );
        let r = http1()
            .post(gw.url("/v1/chat/completions"))
            .json(&chat_body("sql", "select", false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // Again: every replica refuses alike, and so does the gateway.
    let (status, text) = post("/v1/load_lora_adapter?model=base", sql.clone()).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("already been loaded"), "{text}");
    // One replica already has it (an earlier request that reached only some): the others
    // take it, and the fleet has it, so that is a success. A retry is safe.
    let y = serde_json::json!({"lora_name": "y", "lora_path": "/y"});
    let r = http1()
        .post(format!("{}/v1/load_lora_adapter", a.url()))
        .json(&y)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, text) = post("/v1/load_lora_adapter?model=base", y.clone()).await;
    assert_eq!(
        (status, text.as_str()),
        (200, "Success: LoRA adapter 'y' added successfully.")
    );
    assert!(models(&gw).await.contains(&"y".to_string()));
    // The whole fleet: the replica without runtime updating refuses (404), the others
    // take it; the answer says so.
    let (status, text) = post(
        "/v1/load_lora_adapter",
        serde_json::json!({"lora_name": "x", "lora_path": "/x"}),
    )
    .await;
    assert_eq!(status, 502, "{text}");
    assert!(
        text.contains("loaded on 2 of 3 replicas") && text.contains(&name_of(&other)),
        "{text}"
    );
    // Unloaded: gone from the models, and unknown again.
    let (status, text) = post(
        "/v1/unload_lora_adapter?model=base",
        serde_json::json!({"lora_name": "sql"}),
    )
    .await;
    assert_eq!(
        (status, text.as_str()),
        (200, "Success: LoRA adapter 'sql' removed successfully.")
    );
    assert!(!models(&gw).await.contains(&"sql".to_string()));
    let r = http1()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body("sql", "select", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Refused before reaching anyone.
    let (status, text) = post(
        "/v1/load_lora_adapter",
        serde_json::json!({"lora_path": "/x"}),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    let (status, _) = post("/v1/load_lora_adapter?model=nope", sql.clone()).await;
    assert_eq!(status, 404);
    let r = http1()
        .get(gw.admin_url("/v1/load_lora_adapter"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    // Not on the data plane.
    let r = http1()
        .post(gw.url("/v1/load_lora_adapter"))
        .json(&sql)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}
