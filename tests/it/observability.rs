//! Observability: the gateway's metrics asserted as behaviour (counts that match what the
//! clients saw), the exposition's syntax, the request id and the JSON access log, the
//! dashboard and its history, `vllm-edge top`, and that the docs and the Grafana
//! dashboard name exactly the metrics the code defines.

use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use crate::support::*;
use vllm_edge::sim::Faults;

/// A strictly parsed Prometheus text exposition: (name, labels) -> value, and the TYPE of
/// every family.
struct Exposition {
    samples: Vec<(String, HashMap<String, String>, f64)>,
    types: HashMap<String, String>,
}

fn parse_exposition(text: &str) -> Result<Exposition, String> {
    fn valid_name(n: &str) -> bool {
        let mut c = n.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
    }
    let mut out = Exposition {
        samples: Vec::new(),
        types: HashMap::new(),
    };
    let mut helped = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let bad = |why: &str| format!("line {}: {why}: {line}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or("");
            if !valid_name(name) || !helped.insert(name.to_string()) {
                return Err(bad("bad or repeated HELP"));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (name, ty) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty) {
                return Err(bad("unknown type"));
            }
            if out.types.insert(name.to_string(), ty.to_string()).is_some() {
                return Err(bad("repeated TYPE"));
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| bad("no value"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| bad("value is not a number"))?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, HashMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .ok_or_else(|| bad("unclosed labels"))?;
                let mut labels = HashMap::new();
                let mut s = body;
                while !s.is_empty() {
                    let (k, r) = s
                        .split_once("=\"")
                        .ok_or_else(|| bad("label without value"))?;
                    let mut v = String::new();
                    let mut chars = r.char_indices();
                    let end = loop {
                        match chars.next() {
                            Some((_, '\\')) => match chars.next() {
                                Some((_, 'n')) => v.push('\n'),
                                Some((_, c @ ('\\' | '"'))) => v.push(c),
                                _ => return Err(bad("bad escape")),
                            },
                            Some((i, '"')) => break i,
                            Some((_, c)) => v.push(c),
                            None => return Err(bad("unterminated label value")),
                        }
                    };
                    if !valid_name(k) {
                        return Err(bad("bad label name"));
                    }
                    labels.insert(k.to_string(), v);
                    s = r[end + 1..].strip_prefix(',').unwrap_or(&r[end + 1..]);
                }
                (name, labels)
            }
        };
        if !valid_name(name) {
            return Err(bad("bad metric name"));
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| out.types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        if !out.types.contains_key(family) {
            return Err(bad("sample before its TYPE"));
        }
        out.samples.push((name.to_string(), labels, value));
    }
    Ok(out)
}

impl Exposition {
    /// The sum of the samples named `name` whose labels include all of `want`.
    fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
            })
            .map(|(_, _, v)| v)
            .sum::<f64>()
            + 0.0
    }

    fn has(&self, name: &str, want: &[(&str, &str)]) -> bool {
        self.samples.iter().any(|(n, l, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
        })
    }
}

async fn exposition(gw: &Gateway) -> Exposition {
    let text = gw.metrics_text().await;
    parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

#[test]
fn the_exposition_parser_rejects_what_prometheus_would() {
    for bad in [
        "vllm_edge_x 1",                                    // no TYPE
        "# TYPE vllm_edge_x counter\nvllm_edge_x{a=\"1} 1", // unterminated
        "# TYPE vllm_edge_x counter\nvllm_edge_x one",      // not a number
        "# TYPE vllm_edge_x counter\n# TYPE vllm_edge_x counter",
        "# TYPE vllm_edge_x counter\n9x 1",
    ] {
        assert!(parse_exposition(bad).is_err(), "{bad}");
    }
    let ok = parse_exposition(
        "# HELP h a\n# TYPE h histogram\nh_bucket{le=\"+Inf\",m=\"a\\\"b\"} 2\nh_sum 1.5\nh_count 2\n",
    )
    .unwrap();
    assert_eq!(ok.sum("h_bucket", &[("m", "a\"b")]), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_metrics_match_what_the_clients_saw() {
    let (a, b) = (sim(&["m"]).await, sim(&["m"]).await);
    let gw = Gateway::builder(&[&a, &b])
        .yaml("routing:\n  policy: round-robin\n")
        .start()
        .await;
    let client = http1();
    let mut by_backend: HashMap<String, u64> = HashMap::new();
    let (mut prompt, mut completion) = (0, 0);
    for i in 0..10 {
        let r = client
            .post(gw.url("/v1/chat/completions"))
            .json(&chat_body("m", &format!("hello {i}"), false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let backend = r.headers()["x-vllm-edge-backend"]
            .to_str()
            .unwrap()
            .to_string();
        *by_backend.entry(backend).or_default() += 1;
        let v: Value = r.json().await.unwrap();
        prompt += v["usage"]["prompt_tokens"].as_u64().unwrap();
        completion += v["usage"]["completion_tokens"].as_u64().unwrap();
    }
    for i in 0..4 {
        let mut body = chat_body("m", &format!("stream {i}"), true);
        // Half the streams ask for usage: only those are counted.
        if i % 2 == 0 {
            body["stream_options"] = json!({"include_usage": true});
        }
        let r = client
            .post(gw.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let backend = r.headers()["x-vllm-edge-backend"]
            .to_str()
            .unwrap()
            .to_string();
        *by_backend.entry(backend).or_default() += 1;
        let text = r.text().await.unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        let usage: Vec<Value> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter(|v| v["usage"].is_object())
            .collect();
        assert_eq!(usage.len(), usize::from(i % 2 == 0), "{text}");
        for u in usage {
            prompt += u["usage"]["prompt_tokens"].as_u64().unwrap();
            completion += u["usage"]["completion_tokens"].as_u64().unwrap();
        }
    }
    let unknown = client
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body("nope", "x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    // Metrics are recorded in the logging phase, just after the client has its answer.
    let settled = eventually(Duration::from_secs(5), || async {
        exposition(&gw)
            .await
            .sum("vllm_edge_request_duration_seconds_count", &[])
            == 15.0
    })
    .await;
    let m = exposition(&gw).await;
    assert!(settled, "15 requests recorded\n{}", gw.metrics_text().await);
    for s in [&a, &b] {
        let name = name_of(s);
        let want = *by_backend.get(&name).unwrap_or(&0) as f64;
        assert_eq!(
            want, 7.0,
            "round-robin split 14 requests evenly: {by_backend:?}"
        );
        assert_eq!(
            m.sum(
                "vllm_edge_requests_total",
                &[("backend", &name), ("model", "m"), ("status_class", "2xx")]
            ),
            want,
            "{name}"
        );
        assert_eq!(m.sum("vllm_edge_backend_up", &[("backend", &name)]), 1.0);
        assert_eq!(
            m.sum("vllm_edge_backend_routable", &[("backend", &name)]),
            1.0
        );
        assert_eq!(
            m.sum(
                "vllm_edge_backend_in_flight_requests",
                &[("backend", &name)]
            ),
            0.0
        );
        assert_eq!(
            m.sum(
                "vllm_edge_backend_circuit_state",
                &[("backend", &name), ("state", "closed")]
            ),
            1.0
        );
        assert!(m.has(
            "vllm_edge_backend_engine_running_requests",
            &[("backend", &name)]
        ));
        assert!(m.has(
            "vllm_edge_backend_kv_cache_usage_ratio",
            &[("backend", &name)]
        ));
        assert!(
            m.sum(
                "vllm_edge_scrape_duration_seconds_count",
                &[("backend", &name)]
            ) >= 1.0
        );
    }
    assert_eq!(
        m.sum(
            "vllm_edge_requests_total",
            &[("backend", "-"), ("model", "-"), ("status_class", "4xx")]
        ),
        1.0,
        "the unknown model"
    );
    assert_eq!(
        m.sum(
            "vllm_edge_time_to_first_byte_seconds_count",
            &[("stream", "true")]
        ),
        4.0
    );
    assert_eq!(
        m.sum(
            "vllm_edge_time_to_first_byte_seconds_count",
            &[("stream", "false")]
        ),
        10.0
    );
    assert_eq!(
        m.sum(
            "vllm_edge_selections_total",
            &[("policy", "round-robin"), ("reason", "rotation")]
        ),
        14.0
    );
    assert_eq!(
        m.sum(
            "vllm_edge_tokens_total",
            &[("model", "m"), ("kind", "prompt")]
        ),
        prompt as f64
    );
    assert_eq!(
        m.sum(
            "vllm_edge_tokens_total",
            &[("model", "m"), ("kind", "completion")]
        ),
        completion as f64
    );
    assert!(completion > 0);
    assert_eq!(m.sum("vllm_edge_upstream_errors_total", &[]), 0.0);
    assert!(m.has(
        "vllm_edge_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))]
    ));
    // Everything is ours, in base units, counters end in _total.
    for (name, ty) in &m.types {
        assert!(name.starts_with("vllm_edge_"), "{name}");
        assert!(!name.contains("_ms") && !name.contains("milli"), "{name}");
        if ty == "counter" {
            assert!(name.ends_with("_total"), "{name}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_counted_by_kind() {
    // connect: a backend that stopped listening after the gateway checked it.
    let (victim, good) = (sim(&["m"]).await, sim(&["m"]).await);
    let gw = Gateway::builder(&[&victim, &good])
        .yaml("routing:\n  policy: round-robin\nhealth:\n  interval: 60s\n  timeout: 1s\n")
        .start()
        .await;
    victim.stop();
    // Wait until it refuses connections (the sim closes its listener asynchronously).
    assert!(
        eventually(Duration::from_secs(5), || async {
            tokio::net::TcpStream::connect(victim.addr).await.is_err()
        })
        .await
    );
    for i in 0..4 {
        let r = http1()
            .post(gw.url("/v1/chat/completions"))
            .json(&chat_body("m", &format!("x{i}"), false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "retried on the good replica");
    }
    let m = exposition(&gw).await;
    let connect = m.sum(
        "vllm_edge_upstream_errors_total",
        &[("backend", &name_of(&victim)), ("kind", "connect")],
    );
    assert!(connect >= 1.0, "{}", gw.metrics_text().await);
    assert_eq!(connect, m.sum("vllm_edge_upstream_errors_total", &[]));
    assert_eq!(
        connect,
        m.sum("vllm_edge_retries_total", &[]),
        "each was retried"
    );

    // 5xx before the answer, and a stream cut after it began.
    let (failing, cutting) = (sim(&["m"]).await, sim(&["c"]).await);
    failing.sim.set_faults(Faults {
        http_error: Some(500),
        ..Faults::default()
    });
    cutting.sim.set_faults(Faults {
        stream_reset_after_tokens: Some(2),
        ..Faults::default()
    });
    let gw = Gateway::builder(&[&failing, &good, &cutting])
        .yaml("routing:\n  policy: round-robin\n")
        .start()
        .await;
    for i in 0..4 {
        let r = http1()
            .post(gw.url("/v1/chat/completions"))
            .json(&chat_body("m", &format!("y{i}"), false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let mut body = chat_body("c", "cut me", true);
    body["max_tokens"] = json!(50);
    let r = http1()
        .post(gw.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.text().await; // ends with an error event, or broken off
    let counted = eventually(Duration::from_secs(5), || async {
        exposition(&gw).await.sum(
            "vllm_edge_upstream_errors_total",
            &[("backend", &name_of(&cutting)), ("kind", "mid_stream")],
        ) == 1.0
    })
    .await;
    let m = exposition(&gw).await;
    assert!(counted, "{}", gw.metrics_text().await);
    let fivexx = m.sum(
        "vllm_edge_upstream_errors_total",
        &[("backend", &name_of(&failing)), ("kind", "5xx")],
    );
    assert!(fivexx >= 1.0, "{}", gw.metrics_text().await);
    assert_eq!(fivexx, m.sum("vllm_edge_retries_total", &[]));
    assert_eq!(m.sum("vllm_edge_upstream_errors_total", &[]), fivexx + 1.0);
    // The reload counter (ok and error) is asserted in the reload tests.
}

/// The access log as JSON objects, one per line (`log.format: json`).
fn access_lines(gw: &Gateway) -> Vec<Value> {
    gw.log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "access")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_id_is_kept_forwarded_returned_and_logged_as_json() {
    let s = sim(&["m"]).await;
    let gw = Gateway::builder(&[&s])
        .yaml("log:\n  format: json\n")
        .start()
        .await;
    // Every line of the log is JSON, not only the access lines.
    let log = gw.log();
    assert!(
        log.lines()
            .all(|l| serde_json::from_str::<Value>(l).is_ok()),
        "{log}"
    );

    let r = http1()
        .post(gw.url("/v1/chat/completions"))
        .header("x-request-id", "trace-abc-123")
        .header("x-forwarded-for", "203.0.113.7")
        .json(&chat_body("m", "hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-abc-123");
    // The chain a proxy in front started is kept, and the address we saw appended.
    let chain = s.sim.state()["forwarded_for"].as_str().unwrap().to_string();
    let seen = chain
        .strip_prefix("203.0.113.7, ")
        .unwrap_or_else(|| panic!("{chain}"));
    let seen: std::net::IpAddr = seen.parse().unwrap_or_else(|_| panic!("{chain}"));
    assert!(seen.is_loopback(), "{chain}");
    let v: Value = r.json().await.unwrap();
    // vLLM (and the sim) build their request id on the header: it was forwarded.
    assert_eq!(v["id"], "chatcmpl-trace-abc-123");
    let usage = v["usage"].clone();

    // No id, or an unusable one (too long, spaces): a fresh one is made and used upstream.
    let mut made = std::collections::HashSet::new();
    for sent in [
        None,
        Some("has spaces in it".to_string()),
        Some("x".repeat(200)),
    ] {
        let mut req = http1()
            .post(gw.url("/v1/chat/completions"))
            .json(&chat_body("m", "hi", false));
        if let Some(id) = &sent {
            req = req.header("x-request-id", id);
        }
        let r = req.send().await.unwrap();
        let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        assert!(
            id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "{sent:?} -> {id}"
        );
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["id"], format!("chatcmpl-{id}"));
        made.insert(id);
    }
    assert_eq!(made.len(), 3, "every made id is new: {made:?}");

    // Errors the gateway answers itself carry the id too.
    let r = http1()
        .post(gw.url("/v1/nothing-here"))
        .header("x-request-id", "lost-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-request-id"], "lost-1");

    let logged = eventually(Duration::from_secs(5), || async {
        access_lines(&gw)
            .iter()
            .any(|l| l["request_id"] == "lost-1")
    })
    .await;
    assert!(logged, "{}", gw.log());
    let lines = access_lines(&gw);
    let line = lines
        .iter()
        .find(|l| l["request_id"] == "trace-abc-123")
        .unwrap_or_else(|| panic!("{}", gw.log()));
    assert_eq!(line["model"], "m");
    assert_eq!(line["client"], seen.to_string(), "{line}");
    assert_eq!(line["backend"], name_of(&s));
    assert_eq!(line["status"], 200);
    assert_eq!(line["attempts"], 1);
    assert_eq!(line["chosen_by"], "only_candidate");
    assert!(line["score_ms"].as_f64().is_some(), "{line}");
    assert!(line["ttfb_ms"].as_f64().is_some_and(|t| t > 0.0), "{line}");
    assert!(line["duration_ms"].as_f64().unwrap() >= line["ttfb_ms"].as_f64().unwrap());
    assert!(line["bytes_in"].as_u64().unwrap() > 0);
    assert!(line["bytes_out"].as_u64().unwrap() > 0);
    assert_eq!(line["prompt_tokens"], usage["prompt_tokens"]);
    assert_eq!(line["completion_tokens"], usage["completion_tokens"]);
    let lost = lines.iter().find(|l| l["request_id"] == "lost-1").unwrap();
    assert_eq!(lost["status"], 404);
    assert_eq!(lost["backend"], "-");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_self_contained_and_its_history_fills() {
    let (a, b) = (sim(&["m"]).await, sim(&["m"]).await);
    let gw = Gateway::builder(&[&a, &b])
        .file("admin.token", "s3cret-admin\n")
        .yaml("admin:\n  address: 127.0.0.1:0\n  token_file: admin.token\n")
        .start()
        .await;
    // The page itself holds no data and is served without the token...
    let r = http1()
        .get(gw.admin_url("/dashboard"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let page = r.text().await.unwrap();
    assert!(page.contains("load-stats"), "it polls /load-stats");
    for external in [
        "<script src",
        "<link",
        "@import",
        "url(",
        "https://",
        "//cdn",
    ] {
        assert!(!page.contains(external), "external asset: {external}");
    }
    // ...its data is not.
    let r = http1()
        .get(gw.admin_url("/load-stats?history=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let stats = || async {
        http1()
            .get(gw.admin_url("/load-stats?history=1"))
            .bearer_auth("s3cret-admin")
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let filled = eventually(Duration::from_secs(10), || async {
        stats().await["history"]
            .as_array()
            .is_some_and(|h| h.len() >= 2)
    })
    .await;
    assert!(filled, "{}", stats().await);
    let v = stats().await;
    let h = v["history"].as_array().unwrap();
    let (t0, t1) = (
        h[0]["t_ms"].as_u64().unwrap(),
        h[1]["t_ms"].as_u64().unwrap(),
    );
    assert!(
        (500..=2000).contains(&(t1 - t0)),
        "a sample a second: {t0} {t1}"
    );
    let names: BTreeSet<&str> = h[1]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    let want: BTreeSet<String> = [name_of(&a), name_of(&b)].into();
    assert_eq!(names, want.iter().map(String::as_str).collect());
    // Without `history=1`, none (the dashboard asks once).
    let plain: Value = http1()
        .get(gw.admin_url("/load-stats"))
        .bearer_auth("s3cret-admin")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(plain.get("history").is_none());
    assert_eq!(plain["requests"]["total"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_the_fleet_and_asks_for_the_token() {
    let (a, b) = (sim(&["m"]).await, sim(&["m"]).await);
    let gw = Gateway::builder(&[&a, &b])
        .file("admin.token", "top-token\n")
        .yaml("admin:\n  address: 127.0.0.1:0\n  token_file: admin.token\n")
        .start()
        .await;
    for i in 0..3 {
        let r = http1()
            .post(gw.url("/v1/chat/completions"))
            .json(&chat_body("m", &format!("t{i}"), false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // `env_admin`: the address as VLLM_EDGE_ADMIN gives it (as under systemd).
    let top = |args: Vec<String>, env_admin: Option<String>| async move {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_vllm-edge"));
        match env_admin {
            Some(a) => cmd.env("VLLM_EDGE_ADMIN", a),
            None => cmd.env_remove("VLLM_EDGE_ADMIN"),
        };
        cmd.arg("top")
            .args(args)
            .env("COLUMNS", "150")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .unwrap()
    };
    let admin = gw.admin.to_string();
    let denied = top(vec!["--admin".into(), admin.clone(), "--once".into()], None).await;
    assert!(!denied.status.success());
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(err.contains("401") && err.contains("token"), "{err}");

    let token = gw.path("admin.token").display().to_string();
    let out = top(
        vec![
            "--admin".into(),
            admin,
            "--token-file".into(),
            token,
            "--once".into(),
        ],
        None,
    )
    .await;
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{screen}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(screen.contains("2/2 healthy"), "{screen}");
    assert!(
        !screen.contains('\x1b'),
        "no colors when not a terminal: {screen}"
    );
    for s in [&a, &b] {
        let line = screen
            .lines()
            .find(|l| l.starts_with(&name_of(s)))
            .unwrap_or_else(|| panic!("{} missing:\n{screen}", name_of(s)));
        assert!(line.contains(" up "), "{line}");
    }
    // -c: the token from the gateway's own config (whose address says port 0: the real
    // one comes from the environment).
    let conf = gw.path("gateway.yaml").display().to_string();
    let out = top(
        vec!["-c".into(), conf, "--once".into()],
        Some(gw.admin.to_string()),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("2/2 healthy"));
}

#[tokio::test]
async fn top_once_at_80_columns_wraps_nothing_and_counts_a_draining_replica_healthy() {
    let (a, b) = (sim(&["m"]).await, sim(&["m"]).await);
    let gw = Gateway::builder(&[&a])
        .backend_with(&b.url(), "drain: true")
        .start()
        .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            get_json(gw.admin_url("/load-stats")).await["fleet"]["healthy"] == 2
        })
        .await,
        "{}",
        gw.log_unusual()
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_vllm-edge"))
        .args(["top", "--once", "--admin"])
        .arg(gw.admin.to_string())
        .env("COLUMNS", "80")
        .env_remove("VLLM_EDGE_ADMIN")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for l in screen.lines() {
        assert!(
            l.chars().count() <= 80,
            "{} columns: {l:?}\n{screen}",
            l.chars().count()
        );
    }
    assert!(!screen.contains('\x1b'), "{screen}");
    // The whole header, wrapped rather than cut.
    assert!(!screen.contains('…'), "{screen}");
    for part in [
        "vllm-edge top",
        "vllm",
        "2/2 healthy (1 in rotation)",
        "req/s",
        "in flight",
        "KV",
    ] {
        assert!(screen.contains(part), "{part}:\n{screen}");
    }
    for (s, state) in [(&a, "up"), (&b, "draining")] {
        let line = screen
            .lines()
            .find(|l| l.starts_with(&name_of(s)))
            .unwrap_or_else(|| panic!("{} missing:\n{screen}", name_of(s)));
        assert!(line.contains(state), "{line}");
    }
}

/// Every `vllm_edge_*` name the code defines: the counted ones in `metrics.rs`, the
/// per-backend gauges in `admin/gauges.rs`.
fn defined_metrics() -> BTreeSet<String> {
    let src = [
        include_str!("../../src/metrics.rs"),
        include_str!("../../src/admin/gauges.rs"),
    ]
    .concat();
    let mut names = BTreeSet::new();
    for part in src.split('"').skip(1).step_by(2) {
        if part.starts_with("vllm_edge_")
            && part.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        {
            names.insert(part.to_string());
        }
    }
    names
}

/// The `vllm_edge_*` names in `text`, histogram suffixes removed when the base is defined.
fn mentioned(text: &str, defined: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("vllm_edge_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        if bytes.get(end) == Some(&b'*') {
            // A family written with a wildcard (`vllm_edge_backend_*`), not a name.
            i = end;
            continue;
        }
        let mut name = text[start..end].trim_end_matches('_').to_string();
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if defined.contains(base) {
                    name = base.to_string();
                }
            }
        }
        out.insert(name);
        i = end;
    }
    out
}

#[test]
fn the_docs_and_the_grafana_dashboard_name_exactly_the_defined_metrics() {
    let defined = defined_metrics();
    assert!(defined.len() >= 25, "{defined:?}");
    let doc = include_str!("../../docs/observability.md");
    let section = doc
        .split("\n## Metrics")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("docs/observability.md has a ## Metrics section");
    let listed = mentioned(section, &defined);
    assert_eq!(
        listed, defined,
        "docs/observability.md's metric list vs the defined metrics"
    );
    let grafana = include_str!("../../conf/grafana/vllm-edge.json");
    let dash: Value = serde_json::from_str(grafana).expect("the Grafana dashboard is JSON");
    assert!(dash["panels"].as_array().is_some_and(|p| p.len() >= 8));
    let used = mentioned(grafana, &defined);
    let unknown: Vec<_> = used.difference(&defined).collect();
    assert!(
        unknown.is_empty(),
        "Grafana uses undefined metrics: {unknown:?}"
    );
    assert!(
        used.len() >= 15,
        "the dashboard covers most metrics: {used:?}"
    );
}

/// `POST /explain` on the admin listener: a dry run of the selection for a request body,
/// with the gateway's own answers for what it would refuse.
#[tokio::test]
async fn explain_is_a_dry_run_of_the_selection() {
    let (a, b) = (sim(&["m"]).await, sim(&["m"]).await);
    let gw = Gateway::builder(&[&a, &b])
        .backend_with("http://gpu-9.invalid:8000", "models: [later]")
        .start()
        .await;
    let explain = |body: serde_json::Value| {
        let url = gw.admin_url("/explain");
        async move {
            let r = http1().post(url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    // A conversation: its earlier turns make an affinity key, and its home takes it.
    let turns = serde_json::json!({"model": "m", "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and now?"}]});
    let (status, v) = explain(turns.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["policy"], "vllm");
    assert_eq!(
        v["request"]["affinity_key"]["source"], "conversation",
        "{v}"
    );
    assert_eq!(v["choice"]["reason"], "affinity_home", "{v}");
    assert_eq!(v["candidates"].as_array().unwrap().len(), 2);
    assert_eq!(v["candidates"][0]["backend"], v["choice"]["backend"]);
    // The same request, sent: it goes where the dry run said.
    let r = http1()
        .post(gw.url("/v1/chat/completions"))
        .json(&turns)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-vllm-edge-backend"].to_str().unwrap(),
        v["choice"]["backend"].as_str().unwrap()
    );
    // Nothing the gateway would answer itself is sent anywhere either.
    let (status, v) = explain(serde_json::json!({"model": "nope", "prompt": "x"})).await;
    assert_eq!(status, 200);
    assert!(v["choice"].is_null(), "{v}");
    assert!(v["no_choice"].as_str().unwrap().starts_with("404"), "{v}");
    let (_, v) = explain(serde_json::json!({"model": "later", "prompt": "x"})).await;
    assert!(v["no_choice"].as_str().unwrap().starts_with("503"), "{v}");
    let (status, v) = explain(serde_json::json!({"model": 7, "prompt": "x"})).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "model", "{v}");
    let r = http1().get(gw.admin_url("/explain")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    let m = gw.metrics_text().await;
    assert!(
        m.lines()
            .filter(|l| l.starts_with("vllm_edge_requests_total{"))
            .all(|l| l.ends_with(" 1")),
        "only the one request sent was counted: {m}"
    );
}
