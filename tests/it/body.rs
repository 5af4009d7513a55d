//! Routing on the body: bodies of every size reach the backend byte-identical, over
//! HTTP/1.1 and HTTP/2, on the first attempt and after a retry on another replica.

use crate::support::*;
use std::time::Duration;
use vllm_edge::sim::{digest, Faults};

const SIZES: [usize; 3] = [1024, 200 * 1024, 5 * 1024 * 1024];

/// A chat body of exactly `size` bytes with `model` last (as the OpenAI SDK writes it) and
/// content that varies along its length, so a dropped or reordered piece shows.
fn payload(size: usize, model: &str) -> Vec<u8> {
    let head = br#"{"messages":[{"role":"user","content":""#;
    let tail = format!(r#""}}],"max_tokens":2,"model":"{model}"}}"#);
    let fill = size - head.len() - tail.len();
    let mut v = Vec::with_capacity(size);
    v.extend_from_slice(head);
    v.extend((0..fill).map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789 "[(i * 7 + i / 1000) % 37]));
    v.extend_from_slice(tail.as_bytes());
    assert_eq!(v.len(), size);
    v
}

async fn post(client: &reqwest::Client, gw: &Gateway, body: Vec<u8>) -> reqwest::Response {
    client
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request completes")
}

fn served_digest(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("x-sim-body-digest")
        .expect("answered by a sim")
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn bodies_arrive_byte_identical_over_h1_and_h2() {
    let backend = sim(&["m"]).await;
    let gw = Gateway::builder(&[&backend]).start().await;
    for (proto, client) in [("h1", http1()), ("h2", http2())] {
        for size in SIZES {
            let body = payload(size, "m");
            let want = digest(&body);
            let resp = post(&client, &gw, body).await;
            assert_eq!(resp.status(), 200, "{proto} {size}: {}", gw.log());
            if proto == "h2" {
                assert_eq!(resp.version(), reqwest::Version::HTTP_2);
            }
            assert_eq!(served_digest(&resp), want, "{proto} {size}");
        }
    }
}

/// Every request goes to the failing backend first (least-request keeps configuration
/// order on ties), fails there, and must reach the second one intact.
async fn retry_case(
    first: &vllm_edge::sim::SimHandle,
    second: &vllm_edge::sim::SimHandle,
    gw: &Gateway,
    check_first_saw_body: bool,
) {
    for (proto, client) in [("h1", http1()), ("h2", http2())] {
        for size in SIZES {
            let body = payload(size, "m");
            let want = digest(&body);
            let resp = post(&client, gw, body).await;
            assert_eq!(resp.status(), 200, "{proto} {size}: {}", gw.log());
            assert_eq!(
                served_digest(&resp),
                want,
                "{proto} {size}: retried body differs"
            );
            assert_eq!(
                resp.headers()["x-vllm-edge-backend"].to_str().unwrap(),
                second.addr.to_string()
            );
            if check_first_saw_body {
                let seen = first.sim.state()["body_digests"].to_string();
                assert!(
                    seen.contains(&want),
                    "{proto} {size}: the first backend was not tried with the full body"
                );
            }
        }
    }
}

/// The first backend fails every request with `faults`; the second answers.
async fn retry_after_fault(faults: Faults) {
    let failing = sim(&["m"]).await;
    failing.sim.set_faults(faults);
    let ok = sim(&["m"]).await;
    let gw = Gateway::builder(&[&failing, &ok])
        .yaml("routing:\n  policy: least-request")
        .start()
        .await;
    retry_case(&failing, &ok, &gw, true).await;
}

#[tokio::test]
async fn body_is_replayed_after_a_reset_before_the_answer() {
    retry_after_fault(Faults {
        reset: true,
        ..Faults::default()
    })
    .await;
}

#[tokio::test]
async fn body_is_replayed_after_an_engine_503() {
    retry_after_fault(Faults {
        http_error: Some(503),
        ..Faults::default()
    })
    .await;
}

#[tokio::test]
async fn body_is_replayed_after_a_refused_connection() {
    let gone = sim(&["m"]).await;
    let ok = sim(&["m"]).await;
    // Discovery runs once at start (both up), then not again during the test: the gateway
    // still believes the first backend is up when it stops listening.
    let gw = Gateway::builder(&[&gone, &ok])
        .yaml("routing:\n  policy: least-request\ndiscovery:\n  models_interval: 1h")
        .start()
        .await;
    gone.stop();
    // Wait until the port really refuses.
    assert!(
        eventually(Duration::from_secs(5), || async {
            tokio::net::TcpStream::connect(gone.addr).await.is_err()
        })
        .await
    );
    retry_case(&gone, &ok, &gw, false).await;
}

#[tokio::test]
async fn expect_100_continue_is_answered_and_not_forwarded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = sim(&["m"]).await;
    let gw = Gateway::builder(&[&backend]).start().await;
    let body = payload(100 * 1024, "m");
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    // A strict client waits for the 100 before sending the body.
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("100 Continue arrives without the body being sent")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    s.write_all(&body).await.unwrap();
    let mut resp = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&resp).contains("\r\n\r\n{") {
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed early");
        resp.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&resp);
    assert!(text.contains("HTTP/1.1 200"), "{text}");
    assert_eq!(
        text.matches("100 Continue").count(),
        0,
        "no second 100 from upstream: {text}"
    );
    assert!(text.contains(&digest(&body)), "{text}");
}

#[tokio::test]
async fn upstream_connections_are_pooled() {
    let backend = sim(&["m"]).await;
    // No discovery during the test: its requests would open connections of their own.
    let gw = Gateway::builder(&[&backend])
        .yaml("discovery:\n  models_interval: 1h")
        .start()
        .await;
    let before = backend.sim.state()["connections"].as_u64().unwrap();
    let client = http1();
    for _ in 0..20 {
        let resp = client
            .post(gw.url("/v1/chat/completions"))
            .json(&chat_body("m", "hi", false))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
    }
    let used = backend.sim.state()["connections"].as_u64().unwrap() - before;
    // The gateway's threads each keep their own pool; 20 requests over 2 threads need at
    // most a couple of connections.
    assert!(
        used <= 2,
        "20 sequential requests used {used} upstream connections"
    );
}
