//! Streams pass through event by event, and a client that leaves closes the upstream
//! connection (which makes vLLM abort the request and free its KV cache).

use crate::support::*;
use futures_util::StreamExt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

#[tokio::test]
async fn sse_events_reach_the_client_as_they_are_emitted() {
    // Steps of ~6.5 ms × 8: one event every ~50 ms.
    let backend = sim_with(&["m"], |s| {
        s.time_scale = Some(8.0);
        s.jitter = Some(0.0);
        s.annotate_timing = true;
    })
    .await;
    let gw = Gateway::builder(&[&backend]).start().await;
    for (proto, client) in [("h1", http1()), ("h2", http2())] {
        let mut body = chat_body("m", "stream please", true);
        body["max_tokens"] = 12.into();
        body["ignore_eos"] = true.into();
        let resp = client
            .post(gw.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let mut stream = resp.bytes_stream();
        let mut buf = String::new();
        let mut lags_us = Vec::new();
        let mut done = false;
        while let Some(chunk) = stream.next().await {
            let arrived = now_us();
            buf.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                let data = event.trim().strip_prefix("data: ").expect("data line");
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(data).unwrap();
                let emitted = v["sim_emitted_us"].as_u64().expect("annotated event");
                lags_us.push(arrived.saturating_sub(emitted));
            }
        }
        assert!(done, "{proto}: stream ended with [DONE]");
        assert_eq!(lags_us.len(), 1 + 12, "{proto}: role event + one per token");
        lags_us.sort_unstable();
        let median = lags_us[lags_us.len() / 2];
        let max = *lags_us.last().unwrap();
        eprintln!("{proto}: per-event delay emission→client: median {median} µs, max {max} µs");
        // Buffering would hold events for tens of ms (they are 50 ms apart); passing through
        // costs well under a few ms even on a loaded 2-core machine.
        assert!(median < 5_000, "{proto}: median delay {median} µs");
        assert!(max < 25_000, "{proto}: max delay {max} µs: {lags_us:?}");
    }
}

async fn disconnect_case(client: reqwest::Client, proto: &str, stream: bool) {
    // Steps of ~6.5 ms × 155: tokens 1 s apart, so a close noticed only when the next
    // token is written would take about a second to reach the backend.
    let backend = sim_with(&["m"], |s| s.time_scale = Some(155.0)).await;
    let gw = Gateway::builder(&[&backend]).start().await;
    let mut body = chat_body("m", "a long answer", stream);
    body["max_tokens"] = 1000.into();
    body["ignore_eos"] = true.into();
    let left;
    if stream && proto == "h1-raw" {
        // A client that closes its socket itself (reqwest only tears a dropped body's
        // connection down when the next chunk arrives).
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let payload = body.to_string();
        let mut sock = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
            payload.len()
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while String::from_utf8_lossy(&got).matches("data: ").count() < 2 {
            let n = sock.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(backend.sim.state()["running"], 1);
        left = Instant::now();
        drop(sock);
    } else if stream {
        let resp = client
            .post(gw.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let mut events = resp.bytes_stream();
        let mut seen = 0;
        // The role event and the first token.
        while seen < 2 {
            let chunk = events.next().await.expect("stream goes on").unwrap();
            seen += String::from_utf8_lossy(&chunk).matches("data: ").count();
        }
        assert_eq!(backend.sim.state()["running"], 1);
        left = Instant::now();
        drop(events);
    } else {
        // The client gives up while the backend is still generating.
        let request = client
            .post(gw.url("/v1/chat/completions"))
            .json(&body)
            .send();
        let task = tokio::spawn(request);
        assert!(
            eventually(Duration::from_secs(10), || async {
                backend.sim.state()["running"] == 1
            })
            .await,
            "the request reached the engine"
        );
        left = Instant::now();
        task.abort();
        let _ = task.await;
    }
    assert_eq!(backend.sim.state()["aborted"], 0);
    drop(client);
    // Tokens are 1 s apart: a close noticed only at the next token would miss this bound.
    let closed = eventually(Duration::from_millis(500), || async {
        backend.sim.state()["disconnects"] == 1
    })
    .await;
    let took = left.elapsed();
    assert!(
        closed,
        "{proto} stream={stream}: backend did not see the client leave within 0.5 s: {}",
        backend.sim.state()
    );
    eprintln!("{proto} stream={stream}: backend saw the disconnect after {took:?}");
    // The engine drops the request at its next step boundary, as vLLM does, and frees
    // its KV blocks.
    assert!(
        eventually(Duration::from_secs(3), || async {
            let st = backend.sim.state();
            st["aborted"] == 1 && st["running"] == 0 && st["kv_usage"] == 0.0
        })
        .await,
        "{}",
        backend.sim.state()
    );
}

#[tokio::test]
async fn client_disconnect_mid_stream_closes_the_upstream_h1() {
    disconnect_case(http1(), "h1", true).await;
}

#[tokio::test]
async fn client_disconnect_mid_stream_closes_the_upstream_raw_socket() {
    disconnect_case(http1(), "h1-raw", true).await;
}

#[tokio::test]
async fn client_disconnect_mid_stream_closes_the_upstream_h2() {
    disconnect_case(http2(), "h2", true).await;
}

#[tokio::test]
async fn client_disconnect_while_generating_closes_the_upstream_h1() {
    disconnect_case(http1(), "h1", false).await;
}

#[tokio::test]
async fn client_disconnect_while_generating_closes_the_upstream_h2() {
    disconnect_case(http2(), "h2", false).await;
}
