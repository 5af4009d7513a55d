//! The simulator over HTTP: vLLM's shapes, its metrics read by the gateway's own parser,
//! prefix caching through the chat template, and every fault it can inject.

use crate::support::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use vllm_edge::engine::metrics::{self as engine_metrics, EngineLoad, MetricsError};
use vllm_edge::sim::{Faults, Preset, SimHandle};

async fn metrics(s: &SimHandle) -> Result<EngineLoad, MetricsError> {
    let body = http1()
        .get(format!("{}/metrics", s.url()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    engine_metrics::parse(&body, 8 << 20)
}

async fn set_faults(s: &SimHandle, f: Value) {
    let resp = http1()
        .post(format!("{}/sim/faults", s.url()))
        .json(&f)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
}

fn chat(content: &str, tokens: usize, stream: bool) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": content}],
           "max_tokens": tokens, "ignore_eos": true, "stream": stream})
}

async fn post(s: &SimHandle, body: &Value) -> reqwest::Response {
    http1()
        .post(format!("{}/v1/chat/completions", s.url()))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The SSE text of a stream, up to its end or `within`.
async fn sse(resp: reqwest::Response, within: Duration) -> (String, bool) {
    let mut text = String::new();
    let mut body = resp.bytes_stream();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(Ok(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(Some(Err(_))) => return (text, false), // broken connection
            Ok(None) => return (text, true),          // clean end
            Err(_) => return (text, false),           // still open
        }
    }
}

#[tokio::test]
async fn vllm_shapes_and_errors() {
    let s = sim_with(&["m"], |a| a.max_model_len = Some(100)).await;
    let c = http1();
    assert_eq!(
        c.get(format!("{}/health", s.url()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let v = get_json(format!("{}/version", s.url())).await;
    assert!(v["version"].is_string());
    let v = get_json(format!("{}/v1/models", s.url())).await;
    assert_eq!(v["data"][0]["id"], "m");
    assert_eq!(v["data"][0]["max_model_len"], 100);

    let v: Value = post(&s, &chat("hello there", 5, false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    let long = "word ".repeat(200);
    let resp = post(&s, &chat(&long, 5, false)).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["param"], "input_tokens");
    let resp = post(&s, &json!({"model": "other", "messages": []})).await;
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`other` does not exist"));

    let mut streamed = chat("a b", 3, true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (text, clean) = sse(post(&s, &streamed).await, Duration::from_secs(5)).await;
    assert!(
        text.starts_with("data: {") && text.contains("\"role\":\"assistant\""),
        "{text}"
    );
    assert!(
        text.contains("\"finish_reason\":\"length\"") && text.contains("\"completion_tokens\":3"),
        "{text}"
    );
    let resp2 = c.post(format!("{}/v1/completions", s.url()))
        .json(&json!({"model": "m", "prompt": "a b", "max_tokens": 3, "ignore_eos": true, "stream": true,
                      "stream_options": {"include_usage": true}}))
        .send().await.unwrap();
    let (ctext, cclean) = sse(resp2, Duration::from_secs(5)).await;
    assert!(clean && cclean);
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(
        ctext.contains("\"object\":\"text_completion\"")
            && ctext.contains("\"completion_tokens\":3"),
        "{ctext}"
    );
}

#[tokio::test]
async fn metrics_under_load_read_by_the_gateway_parser() {
    // tiny-test: 4096 tokens of KV, 8 sequences, 512-token steps, 100× real time.
    let s = sim_with(&["m"], |a| {
        a.preset = Preset::TinyTest;
        a.time_scale = Some(0.05);
        a.kv_tokens = None;
        a.max_model_len = None;
    })
    .await;
    let idle = metrics(&s).await.unwrap();
    assert_eq!(
        (idle.running, idle.waiting, idle.kv_usage),
        (Some(0.0), Some(0.0), Some(0.0))
    );
    assert_eq!(idle.kv_capacity_tokens, Some(4096));
    let prompt = "tok ".repeat(300);
    let load: Vec<_> = (0..24)
        .map(|i| {
            let url = format!("{}/v1/chat/completions", s.url());
            let body = chat(&format!("{i} {prompt}"), 400, false);
            tokio::spawn(
                async move { http1().post(url).json(&body).send().await.unwrap().status() },
            )
        })
        .collect();
    let peak = std::sync::Mutex::new(EngineLoad::default());
    assert!(
        eventually(Duration::from_secs(20), || async {
            let m = metrics(&s).await.unwrap();
            let loaded = m.waiting > Some(0.0)
                && m.running == Some(8.0)
                && m.kv_usage > Some(0.5)
                && m.preemptions > Some(0.0);
            if loaded {
                *peak.lock().unwrap() = m;
            }
            loaded
        })
        .await,
        "never saw queueing, a full batch, KV pressure and preemption"
    );
    let peak = peak.into_inner().unwrap();
    eprintln!("tiny-test under load: {peak:?}");
    for t in load {
        assert_eq!(t.await.unwrap(), 200, "preempted requests still complete");
    }
    let after = metrics(&s).await.unwrap();
    assert_eq!(
        (after.running, after.waiting, after.kv_usage),
        (Some(0.0), Some(0.0), Some(0.0))
    );
}

#[tokio::test]
async fn identical_system_prompts_hit_the_prefix_cache() {
    let s = sim(&["m"]).await;
    let system = "You are a careful assistant. ".repeat(40);
    let ask = |q: &str| {
        json!({"model": "m", "max_tokens": 2, "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": q}]})
    };
    post(&s, &ask("first question"))
        .await
        .bytes()
        .await
        .unwrap();
    let before = metrics(&s).await.unwrap().prefix_hits.unwrap();
    post(&s, &ask("a different question"))
        .await
        .bytes()
        .await
        .unwrap();
    let after = metrics(&s).await.unwrap().prefix_hits.unwrap();
    // The system prompt is ~240 tokens: all its full 16-token blocks are reused.
    assert!(after - before >= 224.0, "hits {before} → {after}");
}

#[tokio::test]
async fn faults_in_answers() {
    let s = sim(&["m"]).await;
    let c = http1();

    set_faults(&s, json!({"http_error": 500})).await;
    let resp = post(&s, &chat("x", 2, false)).await;
    assert_eq!(resp.status(), 500);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], 500);

    set_faults(&s, json!({"reset": true})).await;
    assert!(c
        .post(format!("{}/v1/chat/completions", s.url()))
        .json(&chat("x", 2, false))
        .send()
        .await
        .is_err());

    // Stalled: accepts and never answers, while /health still says 200.
    set_faults(&s, json!({"stall": true})).await;
    let stalled =
        tokio::time::timeout(Duration::from_millis(300), post(&s, &chat("x", 2, false))).await;
    assert!(stalled.is_err(), "a stalled server answered");
    assert_eq!(
        c.get(format!("{}/health", s.url()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    set_faults(&s, json!({"health_status": 503})).await;
    assert_eq!(
        c.get(format!("{}/health", s.url()))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );

    set_faults(&s, json!({"stream_error_after_tokens": 2})).await;
    let (text, clean) = sse(post(&s, &chat("x", 10, true)).await, Duration::from_secs(5)).await;
    assert!(clean, "{text}");
    assert!(
        text.contains("data: {\"error\":") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    assert_eq!(
        text.matches("\"delta\":{\"content\"").count(),
        3,
        "role + 2 tokens: {text}"
    );

    set_faults(&s, json!({"stream_reset_after_tokens": 2})).await;
    let (text, clean) = sse(post(&s, &chat("x", 10, true)).await, Duration::from_secs(5)).await;
    assert!(!clean && !text.contains("[DONE]"), "{text}");

    set_faults(&s, json!({"stream_hang_after_tokens": 2})).await;
    let (text, clean) = sse(
        post(&s, &chat("x", 10, true)).await,
        Duration::from_millis(500),
    )
    .await;
    assert!(
        !clean && !text.contains("[DONE]") && text.contains("data: "),
        "{text}"
    );

    set_faults(&s, json!({})).await;
    assert_eq!(post(&s, &chat("x", 2, false)).await.status(), 200);
}

#[tokio::test]
async fn slow_factor_stretches_every_step() {
    let s = sim_with(&["m"], |a| {
        a.time_scale = Some(1.0);
        a.jitter = Some(0.0);
    })
    .await;
    let timed = |s: &SimHandle| {
        let url = format!("{}/v1/chat/completions", s.url());
        async move {
            let t = Instant::now();
            http1()
                .post(url)
                .json(&chat("x", 20, false))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            t.elapsed()
        }
    };
    let normal = timed(&s).await;
    set_faults(&s, json!({"slow_factor": 5.0})).await;
    let slow = timed(&s).await;
    // 21 steps of ~6.5 ms, then ×5.
    assert!(slow > normal * 3, "normal {normal:?}, slow {slow:?}");
}

#[tokio::test]
async fn restart_refuses_connections_then_comes_back_with_counters_reset() {
    let s = sim(&["m"]).await;
    post(&s, &chat("x", 5, false)).await.bytes().await.unwrap();
    let before = metrics(&s).await.unwrap();
    assert!(before.prefix_queries > Some(0.0));
    let resp = http1()
        .post(format!("{}/sim/restart", s.url()))
        .json(&json!({"down_ms": 400}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        eventually(Duration::from_secs(2), || async {
            tokio::net::TcpStream::connect(s.addr).await.is_err()
        })
        .await,
        "the port should refuse connections while the server is down"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            tokio::net::TcpStream::connect(s.addr).await.is_ok()
        })
        .await,
        "the server should come back on the same port"
    );
    let after = metrics(&s).await.unwrap();
    assert_eq!(after.prefix_queries, Some(0.0), "counters reset: {after:?}");
    assert_eq!(post(&s, &chat("x", 2, false)).await.status(), 200);
}

#[tokio::test]
async fn faults_in_metrics() {
    let s = sim(&["m"]).await;
    let c = http1();
    let url = format!("{}/metrics", s.url());

    set_faults(&s, json!({"metrics_delay_ms": 300})).await;
    let t = Instant::now();
    c.get(&url).send().await.unwrap().bytes().await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(300));

    set_faults(&s, json!({"metrics_drop": ["vllm:kv_cache_usage_perc"]})).await;
    let m = metrics(&s).await.unwrap();
    assert_eq!(m.kv_usage, None, "a missing metric is unknown");
    assert!(m.running.is_some());
    set_faults(&s, json!({"metrics_drop": ["vllm:"]})).await;
    let m = metrics(&s).await.unwrap();
    assert_eq!((m.running, m.waiting, m.kv_usage), (None, None, None));

    set_faults(&s, json!({"metrics_garbage": true})).await;
    assert!(metrics(&s).await.is_err());

    set_faults(&s, json!({"metrics_legacy": true})).await;
    let text = c.get(&url).send().await.unwrap().text().await.unwrap();
    assert!(
        text.contains("vllm:gpu_cache_usage_perc") && !text.contains("vllm:kv_cache_usage_perc")
    );
    assert!(metrics(&s).await.unwrap().kv_usage.is_some());

    // Stale: frozen while the engine keeps working.
    set_faults(&s, json!({"metrics_stale": true})).await;
    let frozen = c.get(&url).send().await.unwrap().text().await.unwrap();
    post(&s, &chat("x", 5, false)).await.bytes().await.unwrap();
    assert_eq!(
        c.get(&url).send().await.unwrap().text().await.unwrap(),
        frozen
    );
    set_faults(&s, json!({})).await;
    assert_ne!(
        c.get(&url).send().await.unwrap().text().await.unwrap(),
        frozen
    );
}

#[tokio::test]
async fn a_bad_fault_request_is_rejected() {
    let s = sim(&["m"]).await;
    let resp = http1()
        .post(format!("{}/sim/faults", s.url()))
        .json(&json!({"no_such_fault": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let _ = Faults::default();
}

#[tokio::test]
async fn faults_can_be_set_from_the_command_line() {
    use std::process::Stdio;
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_vllm-edge"))
        .args([
            "sim",
            "--port",
            "0",
            "--model",
            "m",
            "--faults",
            r#"{"health_status":503,"http_error":429}"#,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let ready: Value = serde_json::from_str(&line).unwrap();
    let base = format!("http://{}", ready["listen"].as_str().unwrap());
    assert_eq!(
        http1()
            .get(format!("{base}/health"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    let resp = http1()
        .post(format!("{base}/v1/chat/completions"))
        .json(&chat("x", 2, false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);

    let bad = tokio::process::Command::new(env!("CARGO_BIN_EXE_vllm-edge"))
        .args(["sim", "--port", "0", "--faults", r#"{"stal":true}"#])
        .output()
        .await
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown field `stal`"));
}
