//! Hot reload (SIGHUP) under load: backends added, removed and drained without a failed
//! request; an invalid file changes nothing and says why.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::resilience::{one, End};
use crate::support::*;

/// The backend names `/load-stats` lists.
async fn backend_names(gw: &Gateway) -> Vec<String> {
    let v = get_json(gw.admin_url("/load-stats")).await;
    v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect()
}

fn with_backends(base: &str, entries: &[String]) -> String {
    // The builder writes `backends:` then one `  - url:` entry per line, then the rest.
    let (head, rest) = base.split_once("backends:\n").expect("a backends section");
    let tail: String = rest
        .lines()
        .skip_while(|l| l.starts_with("  "))
        .map(|l| format!("{l}\n"))
        .collect();
    format!("{head}backends:\n{}{tail}", entries.concat())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reloads_under_load_drop_nothing_and_an_invalid_one_changes_nothing() {
    let sims = [
        sim_with(&["m"], |a| a.time_scale = Some(0.2)).await,
        sim_with(&["m"], |a| a.time_scale = Some(0.2)).await,
        sim_with(&["m"], |a| a.time_scale = Some(0.2)).await,
    ];
    let gw = Gateway::builder(&[&sims[0], &sims[1]]).start().await;
    let base = gw.config_text();
    let entry = |i: usize| format!("  - url: {}\n", sims[i].url());
    let draining = |i: usize| format!("  - url: {}\n    drain: true\n", sims[i].url());
    let name = |i: usize| sims[i].url().trim_start_matches("http://").to_string();

    // Load: 16 clients sending short streams and plain requests until the reloads are done
    // (bounded: at most 3,000 requests each).
    let stop = Arc::new(AtomicBool::new(false));
    let url = gw.url("/v1/chat/completions");
    let workers: Vec<_> = (0..16)
        .map(|w| {
            let (stop, url) = (stop.clone(), url.clone());
            tokio::spawn(async move {
                let client = http1();
                let mut ends = Vec::new();
                for k in 0..3000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    ends.push(one(&client, &url, w * 10_000 + k, 8).await);
                }
                ends
            })
        })
        .collect();

    // Ten reloads, each awaited through /load-stats before the next.
    let plans: Vec<(Vec<String>, Vec<String>)> = vec![
        (
            vec![entry(0), entry(1), entry(2)],
            vec![name(0), name(1), name(2)],
        ),
        (vec![entry(1), entry(2)], vec![name(1), name(2)]),
        (
            vec![entry(0), entry(1), entry(2)],
            vec![name(0), name(1), name(2)],
        ),
        (
            vec![draining(0), entry(1), entry(2)],
            vec![name(0), name(1), name(2)],
        ),
        (vec![entry(0), entry(2)], vec![name(0), name(2)]),
        (vec![entry(2)], vec![name(2)]),
        (vec![entry(0), entry(1)], vec![name(0), name(1)]),
        (vec![entry(1), entry(0)], vec![name(1), name(0)]),
        (
            vec![entry(0), entry(1), entry(2)],
            vec![name(0), name(1), name(2)],
        ),
        (vec![entry(0), entry(2)], vec![name(0), name(2)]),
    ];
    for (entries, want) in &plans {
        gw.reload_with(&with_backends(&base, entries));
        assert!(
            eventually(Duration::from_secs(10), || async {
                &backend_names(&gw).await == want
            })
            .await,
            "reload to {want:?} applied; log:\n{}",
            gw.log()
        );
        // Let the load run against this fleet for a moment.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    // An invalid file: nothing changes, and the log names the file, line and key.
    let good = with_backends(&base, &plans[9].0);
    gw.reload_with(&format!("{good}routing:\n  polcy: vllm\n"));
    assert!(
        eventually(Duration::from_secs(10), || async {
            gw.log().contains("configuration not reloaded")
        })
        .await
    );
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains("configuration not reloaded"))
        .unwrap();
    assert!(
        line.contains("gateway.yaml:") && line.contains("`routing.polcy`"),
        "{line}"
    );
    assert_eq!(backend_names(&gw).await, plans[9].1);

    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut bad = Vec::new();
    for w in workers {
        for (end, why) in w.await.unwrap() {
            total += 1;
            if end != End::Ok {
                bad.push((end, why));
            }
        }
    }
    // Sim 1 was removed by the last reload: it gets nothing new.
    let before = sims[1].sim.state()["requests"].as_u64().unwrap();
    for i in 0..30 {
        assert_eq!(one(&http1(), &url, 900_000 + i, 4).await.0, End::Ok);
    }
    assert_eq!(sims[1].sim.state()["requests"].as_u64().unwrap(), before);

    let metrics = gw.metrics_text().await;
    eprintln!(
        "reloads: 10 applied, 1 invalid rejected, {total} requests under load, {} not ok",
        bad.len()
    );
    assert!(bad.is_empty(), "{bad:?}");
    assert!(total > 200, "the load ran throughout: {total}");
    assert!(
        metrics.contains("vllm_edge_config_reloads_total{result=\"ok\"} 10"),
        "{metrics}"
    );
    assert!(metrics.contains("vllm_edge_config_reloads_total{result=\"error\"} 1"));
}

/// A backend named by host name is resolved again every `discovery.dns_interval`. While
/// the name still gives its address nothing moves (its counters and checks stay), and
/// reloads still work beside the refreshes. (Where a name moves: `reload.rs` unit tests.)
#[tokio::test]
async fn a_backend_named_by_host_is_resolved_again_without_churn() {
    let s = sim(&["m"]).await;
    let gw = Gateway::builder(&[])
        .backend_url(&format!("http://localhost:{}", s.addr.port()))
        .yaml("discovery:\n  dns_interval: 20ms")
        .start()
        .await;
    let started = std::time::Instant::now();
    let mut sent = 0;
    // Across at least ten refreshes; bounded in count.
    while sent < 400 && (sent < 20 || started.elapsed() < Duration::from_millis(200)) {
        still_serves(&gw, "m").await;
        sent += 1;
    }
    let v = get_json(gw.admin_url("/load-stats")).await;
    let b = &v["backends"][0];
    assert_eq!(b["name"], format!("localhost:{}", s.addr.port()), "{v}");
    assert_eq!(b["address"], s.addr.to_string(), "the address in use: {v}");
    assert!(!gw.log().contains("resolves elsewhere"), "{}", gw.log());
    gw.reload_with(&gw.config_text());
    let reloaded = eventually(Duration::from_secs(5), || async {
        gw.metrics_text()
            .await
            .contains("vllm_edge_config_reloads_total{result=\"ok\"} 1")
    })
    .await;
    assert!(reloaded, "{}", gw.log());
}

/// An entry whose name has no address yet (a headless Service before any replica is
/// ready, a replica's container not started yet) makes no backend: the gateway starts
/// and serves what it can.
#[tokio::test]
async fn a_gateway_starts_with_a_host_name_that_has_no_address_yet() {
    let s = sim(&["m"]).await;
    let gw = Gateway::builder(&[&s])
        .backend_with("http://replicas.invalid:8000", "addresses: all")
        .backend_with(
            "http://llamas.invalid:8000",
            "addresses: all\nmodels: [llama]",
        )
        .backend_with("http://gpu-7.invalid:8000", "models: [qwen]")
        .start()
        .await;
    let v = get_json(gw.url("/v1/models")).await;
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["m"], "{v}");
    still_serves(&gw, "m").await;
    let r = http1()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body("nope", "hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // A model the file promises for a name with no address is on its way: 503, retry.
    for model in ["llama", "qwen"] {
        let r = http1()
            .post(gw.url("/v1/chat/completions"))
            .json(&chat_body(model, "hi", false))
            .send()
            .await
            .unwrap();
        assert!(r.headers().contains_key("retry-after"));
        let (status, v) = error_of(r).await;
        assert_eq!(status, 503, "{model}: {v}");
    }
    let stats = get_json(gw.admin_url("/load-stats")).await;
    assert_eq!(stats["backends"].as_array().unwrap().len(), 1, "{stats}");
    let waiting: Vec<&str> = stats["awaiting_address"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["host"].as_str().unwrap())
        .collect();
    assert_eq!(
        waiting,
        [
            "gpu-7.invalid:8000",
            "replicas.invalid:8000",
            "llamas.invalid:8000"
        ],
        "{stats}"
    );
    assert!(gw.metrics_text().await.contains("vllm_edge_"));
    let page = http1()
        .get(gw.admin_url("/dashboard"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        gw.log_unusual().contains("replicas.invalid"),
        "{}",
        gw.log()
    );
}
