//! Fault tests: a bounded load loop (2,000 requests, 64 at a time, half of them streams)
//! over three simulated replicas while one of them dies, stalls, answers 503 or lies in
//! its `/metrics`. Each prints its figures (`cargo test --test it resilience --
//! --nocapture`); benches/results/HISTORY.md quotes them.

use futures_util::StreamExt;
use serde_json::Value;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vllm_edge::sim::{Faults, SimHandle};

use crate::support::*;

const REQUESTS: usize = 2000;
const CONCURRENCY: usize = 64;

/// How one request ended, as its client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    Ok,
    /// Failed before any of the answer arrived: a lost request.
    Failed,
    /// A stream that began, then ended with an error event and `[DONE]`.
    CutWithErrorEvent,
    /// A stream that began, then stopped without a word.
    CutSilently,
}

#[derive(Debug, Default)]
struct Tally {
    ok: usize,
    failed: usize,
    cut_with_event: usize,
    cut_silently: usize,
    max_latency: Duration,
    first_errors: Vec<String>,
}

impl Tally {
    fn add(&mut self, end: End, latency: Duration, why: Option<String>) {
        match end {
            End::Ok => self.ok += 1,
            End::Failed => self.failed += 1,
            End::CutWithErrorEvent => self.cut_with_event += 1,
            End::CutSilently => self.cut_silently += 1,
        }
        self.max_latency = self.max_latency.max(latency);
        if let Some(w) = why {
            if self.first_errors.len() < 5 {
                self.first_errors.push(w);
            }
        }
    }
}

pub(crate) async fn one(
    client: &reqwest::Client,
    url: &str,
    i: usize,
    max_tokens: u32,
) -> (End, Option<String>) {
    let stream = i.is_multiple_of(2);
    let body = serde_json::json!({
        "model": "m",
        "messages": [{"role": "user", "content": format!("request {i}: tell me something")}],
        "max_tokens": max_tokens,
        "stream": stream,
    });
    let resp = match client.post(url).json(&body).send().await {
        Ok(r) => r,
        Err(e) => return (End::Failed, Some(format!("#{i}: {e}"))),
    };
    let status = resp.status().as_u16();
    if status != 200 {
        let text = resp.text().await.unwrap_or_default();
        return (End::Failed, Some(format!("#{i}: status {status}: {text}")));
    }
    if !stream {
        return match resp.json::<Value>().await {
            Ok(v) if v["choices"][0]["message"]["content"].is_string() => (End::Ok, None),
            Ok(v) => (End::Failed, Some(format!("#{i}: unexpected {v}"))),
            Err(e) => (End::Failed, Some(format!("#{i}: body: {e}"))),
        };
    }
    let (text, broken) = read_stream(resp).await;
    let has_error_event = text.contains("data: {\"error\"");
    let done = text.ends_with("data: [DONE]\n\n");
    match (has_error_event, done, broken) {
        (false, true, None) => (End::Ok, None),
        (true, true, _) => (End::CutWithErrorEvent, None),
        (_, _, b) => (
            End::CutSilently,
            Some(format!(
                "#{i}: stream cut ({b:?}), tail {:?}",
                &text[text.len().saturating_sub(80)..]
            )),
        ),
    }
}

/// A response body as text, read until its end or until the connection broke (then why).
async fn read_stream(resp: reqwest::Response) -> (String, Option<String>) {
    let mut text = String::new();
    let mut chunks = resp.bytes_stream();
    while let Some(c) = chunks.next().await {
        match c {
            Ok(b) => text.push_str(&String::from_utf8_lossy(&b)),
            Err(e) => return (text, Some(e.to_string())),
        }
    }
    (text, None)
}

/// A gateway in front of one replica that resets every stream after three tokens.
async fn cutting_streams_after_three_tokens() -> (SimHandle, Gateway) {
    let resets = sim_with(&["m"], |a| a.time_scale = Some(0.05)).await;
    resets.sim.set_faults(Faults {
        stream_reset_after_tokens: Some(3),
        ..Faults::default()
    });
    let gw = Gateway::builder(&[&resets]).start().await;
    (resets, gw)
}

/// Runs the load loop; `at_quarter` runs (concurrently) once a quarter of the requests
/// have finished.
async fn drive<F>(gw: &Gateway, max_tokens: u32, at_quarter: F) -> (Tally, Duration)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let client = reqwest::Client::builder()
        .http1_only()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .unwrap();
    let url = gw.url("/v1/chat/completions");
    let done = Arc::new(AtomicUsize::new(0));
    let quarter = Arc::new(tokio::sync::Notify::new());
    let fault = {
        let quarter = quarter.clone();
        tokio::spawn(async move {
            quarter.notified().await;
            at_quarter.await;
        })
    };
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut results = futures_util::stream::iter(0..REQUESTS)
        .map(|i| {
            let (client, url, done, quarter) =
                (client.clone(), url.clone(), done.clone(), quarter.clone());
            async move {
                let t = Instant::now();
                let (end, why) = one(&client, &url, i, max_tokens).await;
                if done.fetch_add(1, Ordering::Relaxed) + 1 == REQUESTS / 4 {
                    quarter.notify_one();
                }
                (end, t.elapsed(), why)
            }
        })
        .buffer_unordered(CONCURRENCY);
    while let Some((end, latency, why)) = results.next().await {
        tally.add(end, latency, why);
    }
    let elapsed = started.elapsed();
    fault.await.expect("the fault task ran");
    (tally, elapsed)
}

/// Three replicas of model `m`, the first one `victim`; each step costs `time_scale` of
/// an H100's.
async fn fleet(time_scale: f64) -> (SimHandle, SimHandle, SimHandle) {
    let mk = || {
        sim_with(&["m"], move |a| {
            a.time_scale = Some(time_scale);
        })
    };
    (mk().await, mk().await, mk().await)
}

async fn backend_stats(gw: &Gateway, name: &str) -> Value {
    let v = get_json(gw.admin_url("/load-stats")).await;
    v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} in /load-stats: {v}"))
}

async fn circuit_is(admin: &str, name: &str, want: &str) -> bool {
    let v = get_json(admin).await;
    v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b["name"] == name && b["circuit"] == want)
}

fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        + 0.0 // an empty sum is -0.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_replica_loses_no_request_and_returns_within_two_health_intervals() {
    let (victim, b, c) = fleet(0.5).await;
    let gw = Gateway::builder(&[&victim, &b, &c])
        .yaml("health:\n  interval: 200ms\n  timeout: 200ms\nrouting:\n  policy: round-robin")
        .start()
        .await;
    let victim_sim = victim.sim.clone();
    let victim_addr = victim.addr;
    let down = Duration::from_millis(600);
    // Filled in by the fault task: when the replica came back, and when the gateway
    // routed to it again.
    let back = Arc::new(std::sync::Mutex::new(None::<(Instant, Instant)>));
    let admin = gw.admin_url("/load-stats");
    let victim_name = name_of(&victim);
    let back2 = back.clone();
    let (tally, elapsed) = drive(&gw, 32, async move {
        let killed = Instant::now();
        victim_sim.restart(down);
        // Wait for the port to refuse (the restart happened), then to accept again.
        assert!(
            eventually(Duration::from_secs(5), || async {
                tokio::net::TcpStream::connect(victim_addr).await.is_err()
            })
            .await
        );
        assert!(
            eventually(Duration::from_secs(10), || async {
                tokio::net::TcpStream::connect(victim_addr).await.is_ok()
            })
            .await
        );
        let came_back = Instant::now();
        eprintln!("killed replica: {:?} down", came_back - killed);
        let routable = || async {
            let v = get_json(&admin).await;
            v["backends"]
                .as_array()
                .unwrap()
                .iter()
                .any(|b| b["name"] == victim_name.as_str() && b["routable"] == true)
        };
        assert!(eventually(Duration::from_secs(10), routable).await);
        *back2.lock().unwrap() = Some((came_back, Instant::now()));
    })
    .await;
    let (came_back, routable_again) = back.lock().unwrap().expect("the fault task finished");
    let recovery = routable_again - came_back;
    let metrics = gw.metrics_text().await;
    let retries = metric(&metrics, "vllm_edge_retries_total", "");
    let served_after = victim.sim.state()["requests"].as_u64().unwrap();
    eprintln!(
        "killed replica: {REQUESTS} requests in {elapsed:?}: ok {}, failed {}, streams cut with error event {}, cut silently {}, retries {retries}, back in rotation {recovery:?} after it listened again (health interval 200ms), requests it served after returning {served_after}",
        tally.ok, tally.failed, tally.cut_with_event, tally.cut_silently
    );
    assert_eq!(
        tally.failed,
        0,
        "lost requests: {:?}\n{}",
        tally.first_errors,
        gw.log_unusual()
    );
    assert_eq!(tally.cut_silently, 0, "{:?}", tally.first_errors);
    assert_eq!(
        tally.ok + tally.cut_with_event,
        REQUESTS,
        "every request is accounted for"
    );
    assert!(
        recovery <= Duration::from_millis(2 * 200 + 150),
        "back in rotation after {recovery:?}"
    );
    assert!(served_after > 0, "the returned replica takes traffic again");
    assert!(
        gw.log().contains("backend is down") && gw.log().contains("backend is up"),
        "flips are logged: {}",
        gw.log_unusual()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_replica_with_healthy_health_is_ejected_and_nobody_waits_past_the_limit() {
    let (victim, b, c) = fleet(0.1).await;
    let limit = Duration::from_millis(400);
    let gw = Gateway::builder(&[&victim, &b, &c])
        .yaml(
            "timeouts:\n  stream_first_byte: 400ms\n  non_stream_first_byte: 400ms\nhealth:\n  interval: 100ms\n  timeout: 500ms\n  open_duration: 60s",
        )
        .start()
        .await;
    let victim_sim = victim.sim.clone();
    let to_eject = Arc::new(std::sync::Mutex::new(None::<Duration>));
    let to_eject2 = to_eject.clone();
    let admin = gw.admin_url("/load-stats");
    let victim_name = name_of(&victim);
    let (tally, elapsed) = drive(&gw, 16, async move {
        victim_sim.set_faults(Faults {
            stall: true,
            ..Faults::default()
        });
        let t = Instant::now();
        assert!(
            eventually(Duration::from_secs(10), || circuit_is(
                &admin,
                &victim_name,
                "open"
            ))
            .await
        );
        *to_eject2.lock().unwrap() = Some(t.elapsed());
    })
    .await;
    let to_eject = to_eject.lock().unwrap().expect("the fault task finished");
    let st = backend_stats(&gw, &name_of(&victim)).await;
    let stalled_requests = victim.sim.state()["requests"].as_u64().unwrap();
    eprintln!(
        "stalled replica: {REQUESTS} requests in {elapsed:?}: ok {}, failed {}, cut with event {}, cut silently {}, slowest request {:?} (first-byte limit {limit:?}), circuit {} with /health {}, ejected {to_eject:?} after it stalled; {} requests reached it in total",
        tally.ok, tally.failed, tally.cut_with_event, tally.cut_silently, tally.max_latency, st["circuit"], st["healthy"], stalled_requests
    );
    assert_eq!(
        tally.failed + tally.cut_silently + tally.cut_with_event,
        0,
        "{:?}\n{}",
        tally.first_errors,
        gw.log_unusual()
    );
    assert_eq!(st["healthy"], true, "its /health still answers 200");
    assert_eq!(st["circuit"], "open", "ejected by its timeouts: {st}");
    assert_eq!(st["last_failure"], "timeout");
    // One wait for the limit, then a normal answer elsewhere.
    assert!(
        tally.max_latency < limit + Duration::from_secs(2),
        "slowest {:?}",
        tally.max_latency
    );
    assert!(
        gw.log().contains("circuit opened"),
        "the ejection is logged: {}",
        gw.log_unusual()
    );
}

/// A replica whose answers fail after their head reached the client (a body cut short, a
/// stream cut or stalled after its first event) cannot be retried, but it must leave
/// rotation like one that fails before: only the first few requests sent to it fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_fails_after_its_answers_head_leaves_rotation_within_a_few_failures() {
    const SENT: usize = 60;
    const AT_ONCE: usize = 4;
    let cases = [
        (
            "body cut",
            false,
            Faults {
                body_cut: true,
                ..Faults::default()
            },
        ),
        (
            "stream cut after its first event",
            true,
            Faults {
                stream_reset_after_tokens: Some(1),
                ..Faults::default()
            },
        ),
        (
            "stream stalled after its first event",
            true,
            Faults {
                stream_hang_after_tokens: Some(1),
                ..Faults::default()
            },
        ),
    ];
    for (case, stream, faults) in cases {
        let (victim, b, c) = fleet(0.05).await;
        victim.sim.set_faults(faults);
        // Round-robin sends the victim every third request, as in the attack run; the
        // circuit stays open for the whole run once it opens.
        let gw = Gateway::builder(&[&victim, &b, &c])
            .yaml(
                "routing:\n  policy: round-robin\ntimeouts:\n  stream_chunk_gap: 300ms\n\
                 health:\n  interval: 100ms\n  timeout: 500ms\n  open_duration: 60s",
            )
            .start()
            .await;
        let client = http1();
        let url = gw.url("/v1/chat/completions");
        // `one` streams even-numbered requests.
        let ends: Vec<(End, Option<String>)> = futures_util::stream::iter(0..SENT)
            .map(|i| {
                let (client, url) = (client.clone(), url.clone());
                async move { one(&client, &url, 2 * i + usize::from(!stream), 8).await }
            })
            .buffer_unordered(AT_ONCE)
            .collect()
            .await;
        let failed = ends.iter().filter(|(e, _)| *e != End::Ok).count();
        let st = backend_stats(&gw, &name_of(&victim)).await;
        let reached = victim.sim.state()["requests"].as_u64().unwrap();
        eprintln!(
            "{case}: {failed} of {SENT} requests failed; {reached} reached the replica; circuit {}",
            st["circuit"]
        );
        assert_eq!(st["circuit"], "open", "{case}: {st}\n{}", gw.log_unusual());
        // The failures that open the circuit, plus those already on their way to it.
        let threshold = 3;
        assert!(
            failed <= threshold + AT_ONCE,
            "{case}: {failed} failed: {:?}",
            ends.iter()
                .filter_map(|(_, w)| w.as_ref())
                .take(5)
                .collect::<Vec<_>>()
        );
        assert!(failed >= threshold, "{case}: the fault was exercised");
        let text = gw.metrics_text().await;
        assert_eq!(
            metric(
                &text,
                "vllm_edge_upstream_errors_total",
                "kind=\"mid_stream\""
            ),
            failed as f64,
            "{case}: each counted once: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_answering_503_is_never_seen_by_clients() {
    let (victim, b, c) = fleet(0.05).await;
    let gw = Gateway::builder(&[&victim, &b, &c]).start().await;
    let victim_sim = victim.sim.clone();
    let (tally, elapsed) = drive(&gw, 8, async move {
        victim_sim.set_faults(Faults {
            http_error: Some(503),
            ..Faults::default()
        });
    })
    .await;
    let st = backend_stats(&gw, &name_of(&victim)).await;
    let metrics = gw.metrics_text().await;
    let errors_5xx = metric(&metrics, "vllm_edge_upstream_errors_total", "kind=\"5xx\"");
    eprintln!(
        "503 replica: {REQUESTS} requests in {elapsed:?}: ok {}, failed {}, 5xx absorbed {errors_5xx}, circuit {}",
        tally.ok, tally.failed, st["circuit"]
    );
    assert_eq!(tally.ok, REQUESTS, "{:?}", tally.first_errors);
    assert!(
        errors_5xx >= 3.0,
        "the 503s were seen and retried: {errors_5xx}"
    );
    assert_ne!(
        st["circuit"], "closed",
        "consecutive 503s open the circuit: {st}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_or_stale_metrics_degrade_to_local_accounting_without_herding() {
    let (garbage, stale, good) = fleet(0.2).await;
    garbage.sim.set_faults(Faults {
        metrics_garbage: true,
        ..Faults::default()
    });
    let gw = Gateway::builder(&[&garbage, &stale, &good])
        .yaml("discovery:\n  models_interval: 100ms\n  scrape_interval: 50ms\n  timeout: 500ms")
        .start()
        .await;
    let stale_sim = stale.sim.clone();
    let (tally, elapsed) = drive(&gw, 16, async move {
        // Frozen while idle-looking: a gateway that trusted it would herd onto it.
        stale_sim.set_faults(Faults {
            metrics_stale: true,
            ..Faults::default()
        });
    })
    .await;
    let shares: Vec<f64> = [&garbage, &stale, &good]
        .iter()
        .map(|s| s.sim.state()["requests"].as_u64().unwrap() as f64 / REQUESTS as f64)
        .collect();
    let st = backend_stats(&gw, &name_of(&garbage)).await;
    eprintln!(
        "garbage/stale metrics: {REQUESTS} requests in {elapsed:?}: ok {}, failed {}; shares garbage {:.2}, stale {:.2}, good {:.2}; garbage scrape error {}",
        tally.ok, tally.failed, shares[0], shares[1], shares[2], st["last_scrape_error"]
    );
    assert_eq!(tally.ok, REQUESTS, "{:?}", tally.first_errors);
    assert!(st["last_scrape_error"].is_string(), "{st}");
    assert_eq!(st["scrape_fresh"], false);
    // The frozen one answers its scrapes, but they stopped moving: detected from the
    // requests that finished there without its counter moving, so only when it got some
    // (frozen while it looked busy, it is caught by its counters standing still for
    // 3 s instead: see the next test).
    let frozen = backend_stats(&gw, &name_of(&stale)).await;
    if shares[1] >= 0.02 {
        assert!(
            frozen["last_scrape_error"]
                .as_str()
                .is_some_and(|e| e.contains("frozen")),
            "{frozen}"
        );
        assert_eq!(frozen["scrape_fresh"], false, "{frozen}");
    }
    let fine = backend_stats(&gw, &name_of(&good)).await;
    assert!(
        fine["last_scrape_error"].is_null(),
        "no false alarm: {fine}"
    );
    let all = get_json(gw.admin_url("/load-stats")).await;
    // The replicas nothing is known about are not herded onto, nor treated as dead. The
    // good one takes more than a third: the others count 1.5 times busier than this
    // gateway's accounting (0.49 to 0.65 of the requests in 12 runs, alone, beside the
    // other tests and CPU-starved; the frozen one 0.14 to 0.32).
    for s in &shares[..2] {
        assert!(
            (0.05..=0.45).contains(s),
            "no broken replica is starved or herded onto: {shares:?}\n{all:#}"
        );
    }
    assert!(
        shares[2] <= 0.75,
        "the broken replicas still serve: {shares:?}\n{all:#}"
    );
    assert!(
        shares[0] < shares[2],
        "an equal replica never scraped counts busier than a good one: {shares:?}\n{all:#}"
    );
}

/// Frozen while it showed requests running, a replica is not caught by the finished-request
/// rule (the gateway sends it little); its token count and KV usage standing still are.
/// The other replica, busy and moving all along, is never flagged.
#[tokio::test]
async fn metrics_frozen_while_busy_are_caught_by_their_still_counters() {
    let (victim, other) = (sim(&["m"]).await, sim(&["m"]).await);
    let gw = Gateway::builder(&[&victim, &other])
        .yaml("discovery:\n  scrape_interval: 50ms")
        .start()
        .await;
    // Endless streams from clients of their own keep both engines busy.
    let mut held = Vec::new();
    for s in [&victim, &victim, &other] {
        let mut body = chat_body("m", "hi", true);
        body["ignore_eos"] = true.into();
        body.as_object_mut().unwrap().remove("max_tokens");
        let resp = http1()
            .post(format!("{}/v1/chat/completions", s.url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut chunks = resp.bytes_stream();
        chunks.next().await.unwrap().unwrap();
        held.push(chunks);
    }
    let (name, other_name) = (name_of(&victim), name_of(&other));
    let seen_busy = eventually(Duration::from_secs(5), || async {
        let st = backend_stats(&gw, &name).await;
        st["running"].as_f64() == Some(2.0) && st["scrape_fresh"] == true
    })
    .await;
    assert!(seen_busy, "{}", backend_stats(&gw, &name).await);
    victim.sim.set_faults(Faults {
        metrics_stale: true,
        ..Faults::default()
    });
    let t = Instant::now();
    let caught = eventually(Duration::from_secs(10), || async {
        backend_stats(&gw, &name).await["last_scrape_error"]
            .as_str()
            .is_some_and(|e| e.contains("frozen") && e.contains("2 requests running"))
    })
    .await;
    let took = t.elapsed();
    let st = backend_stats(&gw, &name).await;
    eprintln!(
        "frozen while busy: caught after {took:?}: {}",
        st["last_scrape_error"]
    );
    assert!(caught, "{st}");
    assert_eq!(
        st["scrape_fresh"], false,
        "scored from local accounting: {st}"
    );
    // Three seconds of standing still, give or take the scrapes around them.
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(5),
        "caught after {took:?}"
    );
    let fine = backend_stats(&gw, &other_name).await;
    assert!(
        fine["last_scrape_error"].is_null(),
        "no false alarm: {fine}"
    );
    assert!(fine["running"].as_f64() >= Some(1.0), "{fine}");
    drop(held);
}

/// A replica whose `/metrics` hangs until the scrape times out (1 s, ten intervals) holds
/// back only its own observations: the other replica's load stays fresh. (Scraped in one
/// round that waited for every backend, it was a second old at best, and stale.)
#[tokio::test]
async fn a_hanging_metrics_endpoint_leaves_the_others_fresh() {
    let (slow, fine) = (sim(&["m"]).await, sim(&["m"]).await);
    let gw = Gateway::builder(&[&slow, &fine])
        .yaml("discovery:\n  scrape_interval: 100ms\n  scrape_timeout: 1s")
        .start()
        .await;
    slow.sim.set_faults(Faults {
        metrics_delay_ms: Some(60_000),
        ..Faults::default()
    });
    let name = name_of(&slow);
    let timed_out = eventually(Duration::from_secs(10), || async {
        backend_stats(&gw, &name).await["last_scrape_error"]
            .as_str()
            .is_some_and(|e| e.contains("timed out"))
    })
    .await;
    assert!(timed_out, "{}", backend_stats(&gw, &name).await);
    // Right after a hanging scrape gave up, and on the slow one's next attempt too.
    for _ in 0..2 {
        let st = backend_stats(&gw, &name_of(&fine)).await;
        eprintln!(
            "hanging /metrics beside: the other's load is {}ms old",
            st["scrape_age_ms"]
        );
        assert_eq!(st["scrape_fresh"], true, "{st}");
        assert!(st["last_scrape_error"].is_null(), "{st}");
        let before = scrape_errors(&gw.metrics_text().await, &name);
        let next = eventually(Duration::from_secs(5), || async {
            scrape_errors(&gw.metrics_text().await, &name) > before
        })
        .await;
        assert!(next, "the slow one is tried again");
    }
}

/// A replica whose `/health` hangs until the check times out (1 s, ten intervals) does not
/// slow the checks of the others: one that starts failing is out within a few intervals.
/// (Checked in one round that waited for every backend, it took two such timeouts.)
#[tokio::test]
async fn a_hanging_health_endpoint_does_not_slow_the_others_checks() {
    let (hangs, fails) = (sim(&["m"]).await, sim(&["m"]).await);
    let gw = Gateway::builder(&[&hangs, &fails])
        .yaml("health:\n  interval: 100ms\n  timeout: 1s")
        .start()
        .await;
    hangs.sim.set_faults(Faults {
        health_delay_ms: Some(60_000),
        ..Faults::default()
    });
    fails.sim.set_faults(Faults {
        health_status: Some(503),
        ..Faults::default()
    });
    let t = Instant::now();
    let name = name_of(&fails);
    let down = eventually(Duration::from_secs(10), || async {
        backend_stats(&gw, &name).await["healthy"] == false
    })
    .await;
    let took = t.elapsed();
    eprintln!("hanging /health beside: the failing one was out after {took:?}");
    assert!(down, "{}", backend_stats(&gw, &name).await);
    assert!(took < Duration::from_millis(900), "out after {took:?}");
}

/// The scraper and health checker visit each backend several times a second over
/// connections they keep open, not a new connection each time.
#[tokio::test]
async fn scrapes_and_checks_reuse_their_connections() {
    let s = sim(&["m"]).await;
    let gw = Gateway::builder(&[&s])
        .yaml("discovery:\n  scrape_interval: 20ms\n  models_interval: 100ms\nhealth:\n  interval: 20ms\n  timeout: 500ms")
        .start()
        .await;
    let name = name_of(&s);
    let scrapes = || async {
        metric(
            &gw.metrics_text().await,
            "vllm_edge_scrape_duration_seconds_count",
            &format!("backend=\"{name}\""),
        )
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            scrapes().await >= 50.0
        })
        .await,
        "{}",
        gw.log_unusual()
    );
    let connections = s.sim.state()["connections"].as_u64().unwrap();
    eprintln!(
        "{} scrapes (and as many checks) over {connections} connections",
        scrapes().await
    );
    // Scrapes, checks and model discovery (models and version) may overlap: a few
    // connections (at most 4 at once), not one per visit (over 100 here).
    assert!(connections <= 8, "{connections} connections");
}

fn scrape_errors(text: &str, backend: &str) -> f64 {
    metric(
        text,
        "vllm_edge_scrape_errors_total",
        &format!("backend=\"{backend}\""),
    )
}

#[tokio::test]
async fn a_stream_cut_mid_way_ends_with_an_error_event_and_is_counted() {
    let (_resets, gw) = cutting_streams_after_three_tokens().await;
    let (end, why) = one(&http1(), &gw.url("/v1/chat/completions"), 0, 16).await;
    assert_eq!(end, End::CutWithErrorEvent, "{why:?}");
    let text = gw.metrics_text().await;
    assert_eq!(
        metric(
            &text,
            "vllm_edge_upstream_errors_total",
            "kind=\"mid_stream\""
        ),
        1.0,
        "a reset after the stream began: {text}"
    );
    assert_eq!(
        metric(&text, "vllm_edge_upstream_errors_total", ""),
        1.0,
        "{text}"
    );
}

#[tokio::test]
async fn a_stream_whose_engine_hangs_is_ended_by_its_deadlines() {
    // Hangs after two tokens (the gap deadline); over HTTP/1.1 (the body is left
    // unfinished, see the proxy) and HTTP/2 (a clean end).
    for (want, h2) in [("gap", false), ("gap h2", true)] {
        let hangs = sim_with(&["m"], |a| a.time_scale = Some(0.05)).await;
        hangs.sim.set_faults(Faults {
            stream_hang_after_tokens: Some(2),
            ..Faults::default()
        });
        let gw = Gateway::builder(&[&hangs])
            .yaml("timeouts:\n  stream_first_byte: 300ms\n  stream_chunk_gap: 200ms")
            .start()
            .await;
        let t = Instant::now();
        let client = if h2 { http2() } else { http1() };
        let resp = client
            .post(gw.url("/v1/chat/completions"))
            .json(&chat_body("m", "hi", true))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let (text, broken) = read_stream(resp).await;
        assert_eq!(broken.is_none(), h2, "{want}: a clean end only over HTTP/2");
        let took = t.elapsed();
        assert!(
            text.contains("GatewayTimeoutError") && text.ends_with("data: [DONE]\n\n"),
            "{want}: {text}\nafter {:?}; the gateway's log:\n{}",
            t.elapsed(),
            gw.log_unusual()
        );
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_millis(200 + 1500),
            "{want}: ended after {took:?}"
        );
    }
}

/// A gated stream's gap deadline moves with each token: a stream that lasts many gaps,
/// its tokens closer together than one, is not cut.
#[tokio::test]
async fn a_stream_longer_than_its_gap_deadline_is_not_cut() {
    // Real time: tokens about 10-30 ms apart, 60 of them.
    let s = sim_with(&["m"], |a| a.time_scale = Some(1.0)).await;
    let gw = Gateway::builder(&[&s])
        .yaml("timeouts:\n  stream_first_byte: 2s\n  stream_chunk_gap: 150ms")
        .start()
        .await;
    let t = Instant::now();
    let resp = http1()
        .post(gw.url("/v1/chat/completions"))
        .json(
            &serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 60, "ignore_eos": true, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    let (text, broken) = read_stream(resp).await;
    let took = t.elapsed();
    assert!(broken.is_none() && !text.contains("error"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(
        took > Duration::from_millis(300),
        "it lasted two gaps or more: {took:?}"
    );
}

/// Streams go over gated connections, which Pingora's pool cannot keep: the gate keeps
/// them itself, so one stream after another reuses one connection.
#[tokio::test]
async fn streams_one_after_another_reuse_one_connection() {
    let s = sim(&["m"]).await;
    let gw = Gateway::builder(&[&s])
        .yaml(
            "discovery:\n  scrape_interval: 10s\n  models_interval: 10s\nhealth:\n  interval: 10s\n\
             timeouts:\n  stream_chunk_gap: 200ms",
        )
        .start()
        .await;
    let stream = || async {
        let resp = http1()
            .post(gw.url("/v1/chat/completions"))
            .json(&chat_body("m", "hi", true))
            .send()
            .await
            .unwrap();
        let (text, broken) = read_stream(resp).await;
        assert!(
            broken.is_none() && text.ends_with("data: [DONE]\n\n"),
            "{text}"
        );
    };
    stream().await;
    let before = s.sim.state()["connections"].as_u64().unwrap();
    for _ in 0..10 {
        stream().await;
    }
    let opened = s.sim.state()["connections"].as_u64().unwrap() - before;
    assert!(opened <= 1, "{opened} connections opened for 10 streams");
    // Idle longer than the gap deadline (which is for streams, not idle connections), and
    // within the pool's idle timeout: still reused.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stream().await;
    let opened = s.sim.state()["connections"].as_u64().unwrap() - before;
    assert!(opened <= 1, "{opened} connections opened for 11 streams");
}

/// An engine that hangs right after vLLM sent the stream's response header (a live API
/// server in front of a stuck engine): the header is held until the first token, so the
/// request goes to another replica when the first-byte deadline passes, and the client
/// never sees the hung attempt.
#[tokio::test]
async fn a_stream_whose_engine_hangs_before_its_first_token_is_retried_elsewhere() {
    let hang = |name: &'static str| async move {
        let s = sim_with(&["m"], |a| a.name = Some(name.into())).await;
        s.sim.set_faults(Faults {
            stream_hang_after_tokens: Some(0),
            ..Faults::default()
        });
        s
    };
    let (hangs, ok) = (
        hang("hangs").await,
        sim_with(&["m"], |a| a.name = Some("ok".into())).await,
    );
    let gw = Gateway::builder(&[&hangs, &ok])
        .yaml("timeouts:\n  stream_first_byte: 300ms\n  stream_chunk_gap: 200ms\nrouting:\n  policy: round-robin")
        .start()
        .await;
    for (i, client) in [http1(), http2(), http1(), http2()].into_iter().enumerate() {
        let t = Instant::now();
        let resp = client
            .post(gw.url("/v1/chat/completions"))
            .json(&chat_body("m", &format!("q{i}"), true))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-sim-replica"], "ok", "request {i}");
        let (text, broken) = read_stream(resp).await;
        assert!(broken.is_none(), "request {i}: {broken:?}");
        assert!(
            !text.contains("error") && text.ends_with("data: [DONE]\n\n"),
            "request {i}: {text}\n{}",
            gw.log_unusual()
        );
        assert!(
            t.elapsed() < Duration::from_millis(300 + 1500),
            "request {i}: {:?}",
            t.elapsed()
        );
    }
    // Round-robin sent some of them to the hung engine first: those were retried.
    let metrics = gw.metrics_text().await;
    let retries = metric(&metrics, "vllm_edge_retries_total", "");
    assert!(retries >= 1.0, "{metrics}");
    assert!(hangs.sim.state()["requests"].as_u64().unwrap() >= 1);

    // With no other replica, the client gets a timeout, not a stream that never starts.
    let gw = Gateway::builder(&[&hangs])
        .yaml("timeouts:\n  stream_first_byte: 300ms\n  stream_chunk_gap: 200ms")
        .start()
        .await;
    let t = Instant::now();
    let resp = http1()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body("m", "hi", true))
        .send()
        .await
        .unwrap();
    let (status, v) = error_of(resp).await;
    assert_eq!(status, 504, "{v}");
    assert_eq!(v["error"]["type"], "GatewayTimeoutError", "{v}");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(300 + 1500),
        "ended after {took:?}"
    );
}

#[tokio::test]
async fn no_healthy_replica_is_a_fast_503_with_retry_after() {
    let down = sim(&["m"]).await;
    down.sim.set_faults(Faults {
        health_status: Some(503),
        ..Faults::default()
    });
    let gw = Gateway::builder(&[&down]).start().await;
    let t = Instant::now();
    let resp = http1()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body("m", "hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let (_, v) = error_of(resp).await;
    assert_eq!(v["error"]["type"], "ServiceUnavailableError");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(down.sim.state()["requests"], 0, "nothing was sent to it");
}

#[tokio::test]
async fn a_draining_replica_gets_no_new_requests() {
    let draining = sim(&["m"]).await;
    let other = sim(&["m"]).await;
    let gw = Gateway::builder(&[])
        .backend_with(&draining.url(), "drain: true")
        .backend_url(&other.url())
        .start()
        .await;
    for _ in 0..20 {
        let resp = http1()
            .post(gw.url("/v1/chat/completions"))
            .json(&chat_body("m", "hi", false))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(draining.sim.state()["requests"], 0);
    assert_eq!(other.sim.state()["requests"], 20);
    let st = backend_stats(&gw, &name_of(&draining)).await;
    assert_eq!(
        (st["draining"].clone(), st["routable"].clone()),
        (true.into(), false.into())
    );
}

/// Sends `n` plain requests one after another; returns the statuses.
async fn sequential(gw: &Gateway, n: usize) -> Vec<u16> {
    let client = http1();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let r = client
            .post(gw.url("/v1/chat/completions"))
            .json(&chat_body("m", "hi", false))
            .send()
            .await
            .unwrap();
        out.push(r.status().as_u16());
    }
    out
}

#[tokio::test]
async fn client_errors_never_count_against_a_replica() {
    let picky = sim(&["m"]).await;
    picky.sim.set_faults(Faults {
        http_error: Some(400),
        ..Faults::default()
    });
    let gw = Gateway::builder(&[&picky]).start().await;
    let statuses = sequential(&gw, 20).await;
    assert!(statuses.iter().all(|&s| s == 400), "{statuses:?}");
    assert_eq!(
        picky.sim.state()["requests"],
        20,
        "each sent once, not retried"
    );
    let st = backend_stats(&gw, &name_of(&picky)).await;
    assert_eq!(st["circuit"], "closed", "{st}");
    // Nor against its `/metrics`: rejected requests never reached the engine, so its
    // counters rightly stood still while they finished. Judged at the first scrape after.
    let name = name_of(&picky);
    let judged = eventually(Duration::from_secs(5), || async {
        let st = backend_stats(&gw, &name).await;
        st["dispatched_since_scrape"] == 0 || !st["last_scrape_error"].is_null()
    })
    .await;
    let st = backend_stats(&gw, &name).await;
    assert!(judged, "{st}");
    assert!(st["last_scrape_error"].is_null(), "{st}");
}

#[tokio::test]
async fn the_retry_budget_keeps_a_failing_fleet_from_being_hammered() {
    let sims = [sim(&["m"]).await, sim(&["m"]).await, sim(&["m"]).await];
    for s in &sims {
        s.sim.set_faults(Faults {
            http_error: Some(503),
            ..Faults::default()
        });
    }
    let gw = Gateway::builder(&[&sims[0], &sims[1], &sims[2]])
        .yaml("upstream:\n  max_attempts: 3\n  retry_budget: 0.2\n  retry_budget_min: 5\nhealth:\n  interval: 100ms\n  open_duration: 60s")
        .start()
        .await;
    let n = 200;
    let statuses = sequential(&gw, n).await;
    assert!(statuses.iter().all(|&s| s == 503), "{statuses:?}");
    let attempts: u64 = sims
        .iter()
        .map(|s| s.sim.state()["requests"].as_u64().unwrap())
        .sum();
    eprintln!("retry budget: {n} requests to a fleet answering 503 made {attempts} attempts (without a budget: {})", n * 3);
    // Each request once, plus at most 20% of them and the minimum, plus nothing else.
    assert!(
        attempts as usize <= n + n / 5 + 5,
        "{attempts} attempts for {n} requests"
    );
    assert!(attempts as usize >= n, "every request was tried once");
}

#[tokio::test]
async fn an_open_circuit_is_closed_by_a_successful_probe() {
    let flaky = sim(&["m"]).await;
    let other = sim(&["m"]).await;
    flaky.sim.set_faults(Faults {
        http_error: Some(500),
        ..Faults::default()
    });
    let gw = Gateway::builder(&[&flaky, &other])
        .yaml("routing:\n  policy: round-robin\nhealth:\n  interval: 50ms\n  open_duration: 300ms")
        .start()
        .await;
    let statuses = sequential(&gw, 12).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let admin = gw.admin_url("/load-stats");
    let name = name_of(&flaky);
    assert!(
        circuit_is(&admin, &name, "open").await,
        "{}",
        gw.log_unusual()
    );
    flaky.sim.set_faults(Faults::default());
    assert!(
        eventually(Duration::from_secs(5), || circuit_is(
            &admin, &name, "closed"
        ))
        .await,
        "{}",
        gw.log_unusual()
    );
    assert!(gw.log().contains("probe succeeded"));
    let before = flaky.sim.state()["requests"].as_u64().unwrap();
    sequential(&gw, 10).await;
    assert!(
        flaky.sim.state()["requests"].as_u64().unwrap() >= before + 4,
        "back in rotation"
    );
}

#[tokio::test]
async fn a_cut_h1_stream_ends_with_the_error_event_then_closes_its_connection() {
    use tokio::io::AsyncReadExt;
    use tokio::io::AsyncWriteExt;
    let (_resets, gw) = cutting_streams_after_three_tokens().await;
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let body = serde_json::to_vec(&chat_body("m", "hi", true)).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&body).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut got))
        .await
        .expect("the gateway closes the connection")
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    // The error event and [DONE] arrive; the chunked body is left unfinished, so that no
    // client reuses a connection the gateway is closing.
    assert!(
        text.contains("data: {\"error\"") && text.contains("data: [DONE]\n\n"),
        "{text}"
    );
    assert!(!text.ends_with("0\r\n\r\n"), "{text}");
}
