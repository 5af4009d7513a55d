//! Flow control: a full fleet's requests wait at the gateway, fairly across keys and by
//! priority, within bounds; a client that leaves while queued reaches no engine; a reload
//! and a shutdown keep what is queued.
//!
//! The fleet is one simulated replica whose batch holds `CAP` requests (configured, so
//! the gateway knows it from the start). Requests then run one batch at a time, and the
//! order in which they finish is the order the queue let them go.

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use vllm_edge::sim::SimHandle;

use crate::support::{error_of, eventually, get_json, http1, sim_with, Gateway};

/// A replica at the speed of an H100 whose batch holds `cap` requests.
async fn replica(cap: usize) -> SimHandle {
    sim_with(&["m"], |a| {
        a.time_scale = Some(1.0);
        a.max_num_seqs = Some(cap);
    })
    .await
}

/// The gateway in front of `s`, which it knows holds `cap` requests, with these keys and
/// extra YAML.
async fn gateway(s: &SimHandle, cap: usize, keys: &str, yaml: &str) -> Gateway {
    let mut b = Gateway::builder(&[])
        .backend_with(&s.url(), &format!("max_concurrent_requests: {cap}"))
        .yaml(yaml);
    if !keys.is_empty() {
        b = b.file("keys", keys).yaml("auth:\n  api_keys_file: keys\n");
    }
    b.start().await
}

/// What a request came back with, and when it ended.
#[derive(Debug)]
struct Done {
    tag: String,
    status: u16,
    body: Value,
    retry_after: Option<String>,
    connection: Option<String>,
    at: Instant,
}

/// Sends a chat request generating `tokens` tokens with `key` (and the priority header,
/// if any), in the background.
fn send(
    gw: &Gateway,
    tag: &str,
    key: &str,
    tokens: u32,
    priority: Option<&str>,
) -> tokio::task::JoinHandle<Done> {
    let mut req = http1().post(gw.url("/v1/chat/completions")).json(&json!({
        "model": "m", "max_tokens": tokens, "ignore_eos": true,
        "messages": [{"role": "user", "content": format!("{tag} hello")}],
    }));
    if !key.is_empty() {
        req = req.bearer_auth(key);
    }
    if let Some(p) = priority {
        req = req.header("x-vllm-edge-priority", p);
    }
    let tag = tag.to_string();
    tokio::spawn(async move {
        let Ok(resp) = req.send().await else {
            return Done {
                tag,
                status: 0,
                body: Value::Null,
                retry_after: None,
                connection: None,
                at: Instant::now(),
            };
        };
        let status = resp.status().as_u16();
        let header = |n: &str| {
            resp.headers()
                .get(n)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let (retry_after, connection) = (header("retry-after"), header("connection"));
        let body = resp.json().await.unwrap_or(Value::Null);
        Done {
            tag,
            status,
            body,
            retry_after,
            connection,
            at: Instant::now(),
        }
    })
}

/// The gateway's queue as `/load-stats` shows it.
async fn queued(gw: &Gateway) -> u64 {
    get_json(gw.admin_url("/load-stats")).await["queue"]["queued"]
        .as_u64()
        .unwrap()
}

/// Waits until `n` requests are queued at the gateway.
async fn until_queued(gw: &Gateway, n: u64) {
    assert!(
        eventually(Duration::from_secs(10), || async { queued(gw).await == n }).await,
        "never {n} queued: {}",
        get_json(gw.admin_url("/load-stats")).await["queue"]
    );
}

/// Waits until the replica runs `n` requests.
async fn until_running(s: &SimHandle, n: u64) {
    assert!(
        eventually(Duration::from_secs(10), || async {
            s.sim.state()["running"] == n
        })
        .await,
        "the replica never ran {n}: {}",
        s.sim.state()
    );
}

async fn finish(tasks: Vec<tokio::task::JoinHandle<Done>>) -> Vec<Done> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// The tags of the successful requests, in the order they finished.
fn finish_order(done: &[Done]) -> Vec<&str> {
    let mut ok: Vec<&Done> = done.iter().filter(|d| d.status == 200).collect();
    ok.sort_by_key(|d| d.at);
    ok.iter().map(|d| d.tag.as_str()).collect()
}

#[tokio::test]
async fn a_full_fleet_is_shared_fairly_between_keys_whatever_each_sends() {
    let s = replica(1).await;
    let gw = gateway(&s, 1, "a sk-a\nb sk-b\nc sk-c weight=3\n", "").await;
    // Key A fills the replica, then queues 20 behind it: ten times what B sends.
    let mut tasks = vec![send(&gw, "a-run", "sk-a", 150, None)];
    until_running(&s, 1).await;
    for i in 0..20 {
        tasks.push(send(&gw, &format!("a{i}"), "sk-a", 8, None));
    }
    until_queued(&gw, 20).await;
    for i in 0..2 {
        tasks.push(send(&gw, &format!("b{i}"), "sk-b", 8, None));
    }
    until_queued(&gw, 22).await;
    // C, at weight 3, queues 8 after both.
    for i in 0..8 {
        tasks.push(send(&gw, &format!("c{i}"), "sk-c", 8, None));
    }
    until_queued(&gw, 30).await;
    let done = finish(tasks).await;
    assert!(done.iter().all(|d| d.status == 200), "{done:?}");
    let order = finish_order(&done);
    let pos = |tag: &str| order.iter().position(|t| *t == tag).unwrap();
    // B's two arrived behind 20 of A's and are among the first let go: its share of the
    // replica does not depend on how much A sends (an engine's queue, first come first
    // served, would run them 21st and 22nd).
    assert!(pos("b1") <= 10, "{order:?}");
    // While A and C both wait, C (weight 3) gets three slots for each of A's.
    let first: Vec<&str> = order[1..13].to_vec();
    let count = |p: char| first.iter().filter(|t| t.starts_with(p)).count();
    assert!(count('c') >= 7 && count('a') <= 3, "{first:?}");
    // The queue's time is counted, by class.
    let metrics = gw.metrics_text().await;
    assert!(
        metrics.contains("vllm_edge_queue_wait_seconds_count{model=\"m\",priority=\"normal\"} 30"),
        "{metrics}"
    );
    assert_eq!(queued(&gw).await, 0);
}

#[tokio::test]
async fn a_higher_class_goes_first_and_the_header_only_lowers_a_class() {
    let s = replica(1).await;
    let keys = "bulk sk-bulk priority=low\napp sk-app\nvip sk-vip priority=high\n";
    let gw = gateway(&s, 1, keys, "").await;
    let mut tasks = vec![send(&gw, "bulk-run", "sk-bulk", 150, None)];
    until_running(&s, 1).await;
    for i in 0..3 {
        tasks.push(send(&gw, &format!("bulk{i}"), "sk-bulk", 8, None));
    }
    until_queued(&gw, 3).await;
    // App asks for `high`: its key is normal, so it waits as normal.
    tasks.push(send(&gw, "app-asks-high", "sk-app", 8, Some("high")));
    until_queued(&gw, 4).await;
    // VIP asks to be `low` for this one, then sends one at its own class.
    tasks.push(send(&gw, "vip-asks-low", "sk-vip", 8, Some("low")));
    until_queued(&gw, 5).await;
    tasks.push(send(&gw, "vip", "sk-vip", 8, None));
    until_queued(&gw, 6).await;
    let stats = get_json(gw.admin_url("/load-stats")).await;
    let by = &stats["queue"]["models"]["m"]["by_priority"];
    assert_eq!(
        (
            by["high"].as_u64(),
            by["normal"].as_u64(),
            by["low"].as_u64()
        ),
        (Some(1), Some(1), Some(4)),
        "{by}"
    );
    // A class that is none is refused at once.
    let bad = send(&gw, "bad", "sk-app", 8, Some("urgent")).await.unwrap();
    assert_eq!(bad.status, 400, "{:?}", bad.body);
    assert!(
        bad.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("x-vllm-edge-priority"),
        "{:?}",
        bad.body
    );
    let done = finish(tasks).await;
    let order = finish_order(&done);
    // High, then normal, then low; within low, fair between the two keys: VIP's one
    // request goes before bulk's backlog of three at the same turn.
    assert_eq!(
        order[..4],
        ["bulk-run", "vip", "app-asks-high", "vip-asks-low"],
        "{order:?}"
    );
    assert_eq!(order.len(), 7, "{done:?}");
    let metrics = gw.metrics_text().await;
    assert!(metrics.contains("priority=\"high\""), "{metrics}");
}

#[tokio::test]
async fn past_its_bounds_the_queue_answers_429_or_503_with_retry_after() {
    let s = replica(1).await;
    let gw = gateway(
        &s,
        1,
        "a sk-a\nb sk-b\nc sk-c priority=low\n",
        "flow_control:\n  max_queued: 3\n  max_wait:\n    low: 300ms\n",
    )
    .await;
    // A long request fills the replica; A queues 3: the queue is full.
    let mut tasks = vec![send(&gw, "a-run", "sk-a", 300, None)];
    until_running(&s, 1).await;
    for i in 0..3 {
        // One at a time: which one is A's newest is known.
        tasks.push(send(&gw, &format!("a{i}"), "sk-a", 4, None));
        until_queued(&gw, i + 1).await;
    }
    // Only A waits: the fleet is what is full (503).
    let full = send(&gw, "a-more", "sk-a", 4, None).await.unwrap();
    assert_eq!(full.status, 503, "{full:?}");
    assert_eq!(full.body["error"]["type"], "ServiceUnavailableError");
    assert!(
        full.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("flow_control.max_queued"),
        "{full:?}"
    );
    assert!(full.retry_after.is_some(), "{full:?}");
    // B comes: A holds more than its share, so A's newest gives B its place (429).
    tasks.push(send(&gw, "b0", "sk-b", 4, None));
    let done = eventually(Duration::from_secs(5), || async { tasks[3].is_finished() }).await;
    assert!(done, "A's newest was not refused");
    let evicted = tasks.remove(3).await.unwrap();
    assert_eq!(
        (evicted.tag.as_str(), evicted.status),
        ("a2", 429),
        "{evicted:?}"
    );
    assert!(
        evicted.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("(a)"),
        "{evicted:?}"
    );
    assert!(evicted.retry_after.is_some());
    until_queued(&gw, 3).await;
    // C (low, 300 ms at most) takes A's next place, and waits no longer than its class may.
    let sent = Instant::now();
    let c = send(&gw, "c0", "sk-c", 4, None).await.unwrap();
    let waited = sent.elapsed();
    assert_eq!(c.status, 503, "{c:?}");
    assert!(
        c.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("flow_control.max_wait"),
        "{c:?}"
    );
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(c.retry_after.is_some());
    // What stayed queued is served.
    let done = finish(tasks).await;
    let statuses: Vec<(&str, u16)> = done.iter().map(|d| (d.tag.as_str(), d.status)).collect();
    assert_eq!(
        statuses,
        [("a-run", 200), ("a0", 200), ("a1", 429), ("b0", 200)],
        "{done:?}"
    );
    let metrics = gw.metrics_text().await;
    for (reason, n) in [("queue_full", 1), ("key_share", 2), ("max_wait", 1)] {
        let line = format!("vllm_edge_queue_shed_total{{model=\"m\",reason=\"{reason}\"}} {n}");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
}

#[tokio::test]
async fn a_stream_waits_before_its_header_and_a_client_that_leaves_reaches_no_engine() {
    use tokio::io::AsyncWriteExt;
    let s = replica(1).await;
    let gw = gateway(&s, 1, "", "").await;
    let running = send(&gw, "run", "", 100, None);
    until_running(&s, 1).await;
    // A stream: it waits before its response header, as in an engine's queue.
    let body = json!({"model": "m", "max_tokens": 4, "stream": true,
        "messages": [{"role": "user", "content": "leaving"}]})
    .to_string();
    let mut c = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    c.write_all(req.as_bytes()).await.unwrap();
    until_queued(&gw, 1).await;
    let mut head = [0u8; 64];
    let read = c.try_read(&mut head);
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a queued stream got bytes: {read:?}"
    );
    drop(c);
    until_queued(&gw, 0).await;
    let d = running.await.unwrap();
    assert_eq!(d.status, 200);
    // The replica got only the first request, also once its slot was free.
    let ready = send(&gw, "after", "", 1, None).await.unwrap();
    assert_eq!(ready.status, 200);
    assert_eq!(s.sim.state()["requests"], 2, "{}", s.sim.state());
    let metrics = gw.metrics_text().await;
    assert!(
        metrics.contains("vllm_edge_queue_shed_total{model=\"m\",reason=\"client_gone\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_reload_changes_the_limits_of_requests_already_queued() {
    let s = replica(1).await;
    let before = "flow_control:\n  max_queued: 10\n  max_wait:\n    normal: 1500ms\n";
    let gw = gateway(&s, 1, "", before).await;
    let running = send(&gw, "run", "", 400, None);
    until_running(&s, 1).await;
    let queued_one = send(&gw, "queued", "", 2, None);
    until_queued(&gw, 1).await;
    let text = gw
        .config_text()
        .replace("max_queued: 10", "max_queued: 11")
        .replace("normal: 1500ms", "normal: 60s");
    gw.reload_with(&text);
    assert!(
        eventually(Duration::from_secs(5), || async {
            get_json(gw.admin_url("/load-stats")).await["queue"]["max_queued"] == 11
        })
        .await
    );
    // It had waited past its old limit when the replica freed up, and was served.
    let run = running.await.unwrap();
    let q = queued_one.await.unwrap();
    assert_eq!((run.status, q.status), (200, 200), "{q:?}");
    assert!(q.at >= run.at, "it waited for the slot");
}

#[tokio::test]
async fn at_shutdown_queued_requests_are_served_in_the_grace_period_or_told_to_retry() {
    // A grace period long enough: the queued request gets the slot and finishes.
    let s = replica(1).await;
    let server = "server:\n  threads: 2\n  grace_period: 10s\n  graceful_shutdown_timeout: 1s\n";
    let mut gw = gateway(&s, 1, "", server).await;
    let running = send(&gw, "run", "", 100, None);
    until_running(&s, 1).await;
    let queued_one = send(&gw, "queued", "", 4, None);
    until_queued(&gw, 1).await;
    gw.signal(nix::sys::signal::SIGTERM);
    let (run, q) = (running.await.unwrap(), queued_one.await.unwrap());
    assert_eq!((run.status, q.status), (200, 200), "{q:?}");
    assert!(
        gw.exited(Duration::from_secs(10)).await.is_some(),
        "it exits once done"
    );

    // One too short: the queued request is told to retry elsewhere before the end.
    let s = replica(1).await;
    let server = "server:\n  threads: 2\n  grace_period: 2s\n  graceful_shutdown_timeout: 1s\n";
    let mut gw = gateway(&s, 1, "", server).await;
    let _running = send(&gw, "run", "", 2000, None);
    until_running(&s, 1).await;
    let queued_one = send(&gw, "queued", "", 4, None);
    until_queued(&gw, 1).await;
    let sigterm = Instant::now();
    gw.signal(nix::sys::signal::SIGTERM);
    let q = queued_one.await.unwrap();
    assert_eq!(q.status, 503, "{q:?}\n{}", gw.log());
    assert!(
        q.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shutting down"),
        "{q:?}"
    );
    assert_eq!(q.connection.as_deref(), Some("close"), "{q:?}");
    assert!(q.retry_after.is_some());
    assert!(
        sigterm.elapsed() < Duration::from_secs(2),
        "{:?}",
        sigterm.elapsed()
    );
    assert!(gw.exited(Duration::from_secs(10)).await.is_some());
}

#[tokio::test]
async fn while_the_fleet_has_room_nothing_waits_and_errors_are_clear() {
    let s = replica(4).await;
    let gw = gateway(&s, 4, "", "").await;
    let done = finish(
        (0..4)
            .map(|i| send(&gw, &format!("r{i}"), "", 4, None))
            .collect(),
    )
    .await;
    assert!(done.iter().all(|d| d.status == 200), "{done:?}");
    let stats = get_json(gw.admin_url("/load-stats")).await;
    assert_eq!(
        stats["queue"]["models"]["m"]["let_go"], 0,
        "{}",
        stats["queue"]
    );
    let metrics = gw.metrics_text().await;
    assert!(
        !metrics.contains("vllm_edge_queue_wait_seconds_count{"),
        "{metrics}"
    );
    let (status, err) = error_of(
        http1()
            .post(gw.url("/v1/chat/completions"))
            .header("x-vllm-edge-priority", "soon")
            .json(&json!({"model": "m", "messages": []}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400, "{err}");
}

#[tokio::test]
async fn engines_on_priority_scheduling_get_each_requests_class() {
    let s = replica(4).await;
    let keys = "bulk sk-bulk priority=low\nvip sk-vip priority=high\napp sk-app\n";
    let gw = gateway(&s, 4, keys, "routing:\n  scheduling_policy: priority\n").await;
    let body = r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"hi"}]}"#;
    let sent = |key: &'static str, header: Option<&'static str>, body: &'static str| {
        let mut r = http1()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body);
        if let Some(h) = header {
            r = r.header("x-vllm-edge-priority", h);
        }
        async move {
            let resp = r.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.headers()["x-sim-body-digest"]
                .to_str()
                .unwrap()
                .to_string()
        }
    };
    let with =
        |p: i64| vllm_edge::sim::digest(format!("{{\"priority\":{p},{}", &body[1..]).as_bytes());
    assert_eq!(sent("sk-bulk", None, body).await, with(10));
    assert_eq!(sent("sk-vip", None, body).await, with(-10));
    assert_eq!(sent("sk-vip", Some("normal"), body).await, with(0));
    assert_eq!(sent("sk-app", None, body).await, with(0));
    // A client's own priority may lower its request, never raise it.
    let lower = r#"{"priority":50,"model":"m","max_tokens":1,"messages":[]}"#;
    assert_eq!(
        sent("sk-app", None, lower).await,
        vllm_edge::sim::digest(lower.as_bytes())
    );
    let higher = r#"{"priority":-50,"model":"m","max_tokens":1,"messages":[]}"#;
    let capped = r#"{"priority":0,"model":"m","max_tokens":1,"messages":[]}"#;
    assert_eq!(
        sent("sk-app", None, higher).await,
        vllm_edge::sim::digest(capped.as_bytes())
    );
}
