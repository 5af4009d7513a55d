//! Process lifecycle: SIGTERM drains in-flight streams and exits as soon as none is left.

use std::time::{Duration, Instant};

use crate::support::*;

const SERVER: &str = "server:\n  threads: 2\n  grace_period: 30s\n  graceful_shutdown_timeout: 1s";

#[tokio::test]
async fn sigterm_on_an_idle_gateway_exits_at_once_despite_a_long_grace_period() {
    let backend = sim(&["m"]).await;
    let mut gw = Gateway::builder(&[&backend]).yaml(SERVER).start().await;
    let t = Instant::now();
    gw.signal(nix::sys::signal::SIGTERM);
    let status = gw
        .exited(Duration::from_secs(10))
        .await
        .expect("exits well before the 30 s grace period");
    eprintln!("idle SIGTERM: exited in {:?}", t.elapsed());
    assert!(status.success(), "{status:?}\n{}", gw.log());
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[tokio::test]
async fn sigterm_lets_a_stream_in_flight_finish_then_exits() {
    // About 60 tokens at ~25 ms each: the stream lasts over a second.
    let backend = sim_with(&["m"], |a| a.time_scale = Some(3.0)).await;
    let mut gw = Gateway::builder(&[&backend]).yaml(SERVER).start().await;
    let body = serde_json::json!({
        "model": "m",
        "messages": [{"role": "user", "content": "a long story"}],
        "max_tokens": 60,
        "min_tokens": 60,
        "stream": true,
    });
    let mut resp = http1()
        .post(gw.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.unwrap().expect("a first chunk");
    let t = Instant::now();
    gw.signal(nix::sys::signal::SIGTERM);
    let mut text = String::from_utf8_lossy(&first).to_string();
    while let Some(c) = resp.chunk().await.expect("the stream is not cut") {
        text.push_str(&String::from_utf8_lossy(&c));
    }
    let streamed_after = t.elapsed();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!text.contains("\"error\""), "{text}");
    let status = gw
        .exited(Duration::from_secs(10))
        .await
        .expect("exits after the stream");
    eprintln!(
        "SIGTERM mid-stream: the stream went on {streamed_after:?} to its end, the process exited {:?} after the signal",
        t.elapsed()
    );
    assert!(status.success());
    assert!(
        streamed_after > Duration::from_millis(300),
        "the stream was still running: {streamed_after:?}"
    );
    assert!(t.elapsed() < streamed_after + Duration::from_secs(2));
    // New connections are refused once shutdown began.
    assert!(tokio::net::TcpStream::connect(gw.addr).await.is_err());
}
