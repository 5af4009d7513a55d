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

/// The `server:` section of a gateway that can be upgraded: its upgrade socket lives beside
/// its config.
const UPGRADABLE: &str = "server:\n  threads: 2\n  grace_period: 30s\n  graceful_shutdown_timeout: 1s\n  upgrade_sock: upgrade.sock";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_binary_upgrade_under_load_fails_no_request_and_cuts_no_stream() {
    use crate::resilience::{one, End};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let fast = sim_with(&["m"], |a| a.time_scale = Some(0.2)).await;
    // Real speed: the long streams outlive the old process's 5 s handover window.
    let slow = sim_with(&["slow"], |a| a.time_scale = Some(1.0)).await;
    // Stands in for systemd's notification socket.
    let notify_dir = tempfile::tempdir().unwrap();
    let notify_path = notify_dir.path().join("notify.sock");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
    let mut gw = Gateway::builder(&[&fast, &slow])
        .yaml(UPGRADABLE)
        .env("NOTIFY_SOCKET", notify_path.to_str().unwrap())
        .start()
        .await;
    let old_pid = gw.pid().expect("running");

    // Load: 16 keep-alive clients sending short streams and plain requests until told to
    // stop (bounded: at most 5,000 requests each).
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let url = gw.url("/v1/chat/completions");
    let workers: Vec<_> = (0..16)
        .map(|w| {
            let (stop, done, url) = (stop.clone(), done.clone(), url.clone());
            tokio::spawn(async move {
                let client = http1();
                let mut ends = Vec::new();
                for k in 0..5000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    ends.push(one(&client, &url, w * 10_000 + k, 8).await);
                    done.fetch_add(1, Ordering::Relaxed);
                }
                ends
            })
        })
        .collect();
    // Two long streams that begin before the upgrade.
    let long: Vec<_> = (0..2)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let body = serde_json::json!({
                    "model": "slow",
                    "messages": [{"role": "user", "content": format!("long {i}")}],
                    "max_tokens": 1200,
                    "ignore_eos": true,
                    "stream": true,
                });
                let t = Instant::now();
                let resp = http1().post(&url).json(&body).send().await.unwrap();
                assert_eq!(resp.status(), 200);
                let mut text = String::new();
                let mut resp = resp;
                loop {
                    match resp.chunk().await {
                        Ok(Some(c)) => text.push_str(&String::from_utf8_lossy(&c)),
                        Ok(None) => break,
                        Err(e) => {
                            text.push_str(&format!("\n<cut: {e}>"));
                            break;
                        }
                    }
                }
                (text, t.elapsed(), Instant::now())
            })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(20), || async {
            done.load(Ordering::Relaxed) >= 300
        })
        .await
    );

    let t0 = Instant::now();
    gw.signal(nix::sys::signal::SIGUSR2);
    assert!(
        eventually(Duration::from_secs(20), || async {
            gw.ready_pids().len() == 2
        })
        .await,
        "no successor became ready: {}",
        gw.log_unusual()
    );
    let successor_ready = t0.elapsed();
    let successor = gw.ready_pids()[1];
    assert_ne!(successor, old_pid);
    // systemd heard that the old process was ready, then that the successor is the main
    // process now.
    let mut heard = Vec::new();
    let mut buf = [0u8; 256];
    while heard.len() < 2 {
        let n = tokio::time::timeout(Duration::from_secs(10), notify.recv(&mut buf))
            .await
            .expect("a notification")
            .unwrap();
        heard.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    assert_eq!(
        heard,
        vec![
            "READY=1".to_string(),
            format!("MAINPID={successor}\nREADY=1")
        ]
    );
    let at_exit = done.load(Ordering::Relaxed);
    let status = gw
        .exited(Duration::from_secs(40))
        .await
        .expect("the old process exits once its streams are done");
    let old_exit = t0.elapsed();
    assert!(status.success(), "{status:?}: {}", gw.log_unusual());
    // The successor alone serves now: let the load run on it for a while.
    let after = done.load(Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(20), || async {
            done.load(Ordering::Relaxed) >= after + 300
        })
        .await
    );
    stop.store(true, Ordering::Relaxed);

    let mut total = 0;
    let mut failed = Vec::new();
    for w in workers {
        for (end, why) in w.await.unwrap() {
            total += 1;
            if end != End::Ok {
                failed.push(format!("{end:?}: {why:?}"));
            }
        }
    }
    let mut long_runs = Vec::new();
    for l in long {
        let (text, lasted, ended) = l.await.unwrap();
        assert!(
            text.ends_with("data: [DONE]\n\n")
                && !text.contains("\"error\"")
                && !text.contains("<cut"),
            "a long stream was cut: …{}",
            &text[text.len().saturating_sub(300)..]
        );
        // The old process served it to its end (it began before the successor existed,
        // so its connection is the old process's, and it ended with [DONE], uncut),
        // past the moment it stopped accepting (5 s after the handover began). When the
        // client read the end is no measure of when the old process sent it: on a busy
        // machine this task can read it after the test saw the process exit.
        assert!(
            ended.duration_since(t0) > Duration::from_secs(5),
            "the stream ended {:?} after the upgrade began: too short to span the shutdown",
            ended.duration_since(t0)
        );
        long_runs.push(lasted);
    }
    eprintln!(
        "upgrade: {total} requests ({at_exit} before the old process exited), {} failed; successor ready after {successor_ready:?}, old process exited after {old_exit:?}; long streams lasted {long_runs:?}",
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}\n{}", gw.log_unusual());
    // The successor holds the admin socket too, and counts the requests it served.
    let m = gw.metrics_text().await;
    let served: f64 = m
        .lines()
        .filter(|l| l.starts_with("vllm_edge_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(served >= 300.0, "successor served {served}: {m}");
    assert!(gw.log().contains("asked the predecessor for its sockets"));
}

#[tokio::test]
async fn an_upgrade_whose_successor_fails_changes_nothing() {
    let backend = sim(&["m"]).await;
    let gw = Gateway::builder(&[&backend]).yaml(UPGRADABLE).start().await;
    // The successor reads the config file again: make it invalid.
    let good = gw.config_text();
    std::fs::write(gw.path("gateway.yaml"), "routing:\n  polcy: vllm\n").unwrap();
    gw.signal(nix::sys::signal::SIGUSR2);
    assert!(
        eventually(Duration::from_secs(20), || async {
            gw.log().contains("upgrade failed")
        })
        .await,
        "{}",
        gw.log_unusual()
    );
    assert!(gw.log().contains("polcy"), "{}", gw.log_unusual());
    std::fs::write(gw.path("gateway.yaml"), good).unwrap();
    // Still the same process, still serving, still upgradable later.
    assert_eq!(gw.ready_pids().len(), 1);
    let r = http1()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body("m", "still here", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
