//! Several gateways sharing one key's limits through a real Redis (`auth.shared`),
//! started here on a free loopback port; and what they do when it goes away.

use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::*;
use vllm_edge::sim::SimHandle;

/// A `redis-server` of this test's own: no persistence, loopback only.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    /// Starts one on a free port (asked of the kernel, then given to Redis; another
    /// process may take it in between, so a start that cannot bind tries another).
    async fn start() -> Redis {
        Redis::start_with(&[]).await
    }

    /// Starts one with more `redis-server` arguments.
    async fn start_with(extra: &[&str]) -> Redis {
        Redis::start_args(|port| {
            let mut a = vec!["--port".to_string(), port.to_string()];
            a.extend(extra.iter().map(|s| s.to_string()));
            a
        })
        .await
    }

    /// Starts one on a free port with the arguments `args(port)` (its port options).
    async fn start_args(args: impl Fn(u16) -> Vec<String>) -> Redis {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if let Some(r) = Redis::start_on(port, args(port)).await {
                return r;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// Starts one on `port` (`args` say how it listens there); `None` when it cannot bind it.
    async fn start_on(port: u16, args: Vec<String>) -> Option<Redis> {
        let mut child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--logfile", ""])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server (Debian package redis-server; scripts/test.sh installs it)");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(Some(l)) = lines.next_line().await {
                if l.contains("Ready to accept connections") {
                    return true;
                }
            }
            false
        })
        .await;
        if ready != Ok(true) {
            let _ = child.kill().await;
            return None;
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Some(Redis { child, port })
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn kill(&mut self) {
        self.child.kill().await.unwrap();
    }
}

/// Gateways with the same keys and the same shared-limits settings.
async fn gateways(n: usize, backend: &SimHandle, keys: &str, shared: &str) -> Vec<Gateway> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            Gateway::builder(&[backend])
                .file("keys.txt", keys)
                .yaml(&format!(
                    "auth:\n  api_keys_file: keys.txt\n  shared:\n    {}",
                    shared.replace('\n', "\n    ")
                ))
                .start()
                .await,
        );
    }
    out
}

fn chat(gw: &Gateway, key: &str, max_tokens: u32, stream: bool) -> reqwest::RequestBuilder {
    http1()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .json(&serde_json::json!({
            "model": "m", "max_tokens": max_tokens, "ignore_eos": true, "stream": stream,
            "messages": [{"role": "user", "content": "hello"}],
        }))
}

async fn status_of(req: reqwest::RequestBuilder) -> u16 {
    let r = req.send().await.unwrap();
    let s = r.status().as_u16();
    r.bytes().await.unwrap();
    s
}

fn counter(metrics: &str, line_start: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

#[tokio::test]
async fn three_gateways_give_a_key_its_rpm_once_not_three_times() {
    let redis = Redis::start().await;
    let backend = sim(&["m"]).await;
    let gws = gateways(
        3,
        &backend,
        "team sk-team rpm=6\n",
        &format!("redis: {}", redis.url()),
    )
    .await;
    // Nine requests, three through each gateway: alone each would admit its three.
    let mut statuses = Vec::new();
    for i in 0..9 {
        statuses.push(status_of(chat(&gws[i % 3], "sk-team", 1, false)).await);
    }
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!((ok, limited), (6, 3), "{statuses:?}");
    // Every admission went through Redis.
    let through: u64 = futures::future::join_all(gws.iter().map(|g| g.metrics_text()))
        .await
        .iter()
        .map(|m| counter(m, "vllm_edge_shared_limits_admissions_total{via=\"redis\"}"))
        .sum();
    assert_eq!(through, 9);
}

#[tokio::test]
async fn max_concurrent_holds_across_gateways_and_frees_when_a_stream_ends() {
    let redis = Redis::start().await;
    // At real speed 400 tokens take seconds: the streams are open while we look.
    let backend = sim_with(&["m"], |a| a.time_scale = Some(1.0)).await;
    let gws = gateways(
        3,
        &backend,
        "solo sk-solo max_concurrent=2\n",
        &format!("redis: {}", redis.url()),
    )
    .await;
    let mut streams = Vec::new();
    for gw in &gws[..2] {
        let r = chat(gw, "sk-solo", 400, true).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let mut s = r.bytes_stream();
        s.next().await.expect("a first event").unwrap();
        streams.push(s);
    }
    // The third gateway has nothing of its own in flight, and still refuses.
    let r = chat(&gws[2], "sk-solo", 1, false).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let (_, body) = error_of(r).await;
    assert_eq!(body["error"]["type"], "RateLimitError");
    // One stream ends (the client goes): its lease is given back, and the third gateway
    // admits (the release is sent in the background: a few refusals may come first).
    drop(streams.pop());
    assert!(
        eventually(Duration::from_secs(10), || async {
            status_of(chat(&gws[2], "sk-solo", 1, false)).await == 200
        })
        .await,
        "the slot came back: {}",
        gws[1].log_unusual()
    );
}

#[tokio::test]
async fn a_tpm_balance_used_through_one_gateway_is_used_for_all() {
    let redis = Redis::start().await;
    let backend = sim(&["m"]).await;
    let gws = gateways(
        2,
        &backend,
        "tok sk-tok tpm=300\n",
        &format!("redis: {}", redis.url()),
    )
    .await;
    // 400 tokens through the first gateway: settled when it ends, the shared balance is
    // in debt (300 - 400 - the prompt).
    assert_eq!(status_of(chat(&gws[0], "sk-tok", 400, false)).await, 200);
    // The second gateway never served this key, and refuses once the settlement is in.
    // Asked with `GET /v1/models`, which is admitted by the balance and costs nothing:
    // only the first gateway's tokens can put it in debt.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let r = http1()
                .get(gws[1].url("/v1/models"))
                .header("authorization", "Bearer sk-tok")
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            if s == 429 {
                let (_, body) = error_of(r).await;
                assert!(
                    body["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("300 tokens per minute"),
                    "{body}"
                );
            }
            s == 429
        })
        .await,
        "the second gateway saw the first's tokens: {}",
        gws[1].log_unusual()
    );
}

#[tokio::test]
async fn redis_gone_mid_load_falls_back_within_its_timeout_and_recovers() {
    let mut redis = Redis::start().await;
    let port = redis.port;
    let backend = sim(&["m"]).await;
    let keys = "team sk-team rpm=100000\n";
    let local = gateways(
        1,
        &backend,
        keys,
        &format!("redis: {}\ntimeout: 200ms", redis.url()),
    )
    .await
    .remove(0);
    let deny = gateways(
        1,
        &backend,
        keys,
        &format!(
            "redis: {}\ntimeout: 200ms\non_redis_error: deny",
            redis.url()
        ),
    )
    .await
    .remove(0);
    assert_eq!(status_of(chat(&local, "sk-team", 1, false)).await, 200);
    assert_eq!(status_of(chat(&deny, "sk-team", 1, false)).await, 200);

    redis.kill().await;
    // Load goes on: every request is answered, none waits much past the timeout.
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(status_of(chat(&local, "sk-team", 1, false)).await, 200);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
    let t = Instant::now();
    let r = chat(&deny, "sk-team", 1, false).send().await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(r.headers()["retry-after"], "1");
    let (status, body) = error_of(r).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["type"], "ServiceUnavailableError");
    let m = local.metrics_text().await;
    assert!(
        counter(
            &m,
            "vllm_edge_shared_limits_admissions_total{via=\"local\"}"
        ) >= 20,
        "{m}"
    );
    assert!(
        local.log().contains("shared limits: Redis failed"),
        "{}",
        local.log()
    );

    // Redis is back on its port: admissions go through it again, without a restart.
    let _redis = Redis::start_on(port, vec!["--port".into(), port.to_string()])
        .await
        .expect("redis-server restarts on its port");
    let before = counter(
        &local.metrics_text().await,
        "vllm_edge_shared_limits_admissions_total{via=\"redis\"}",
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            status_of(chat(&local, "sk-team", 1, false)).await;
            counter(
                &local.metrics_text().await,
                "vllm_edge_shared_limits_admissions_total{via=\"redis\"}",
            ) > before
        })
        .await,
        "admissions went back to Redis: {}",
        local.log()
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            status_of(chat(&deny, "sk-team", 1, false)).await == 200
        })
        .await
    );
    assert!(local.log().contains("shared limits: Redis answers again"));
}

#[tokio::test]
async fn a_redis_with_a_password_is_shared_with_the_password_file_and_not_without() {
    let redis = Redis::start_with(&["--requirepass", "s3cret-pw"]).await;
    let backend = sim(&["m"]).await;
    let shared = |pw: bool| {
        let mut b = Gateway::builder(&[&backend])
            .file("keys.txt", "team sk-team rpm=2\n")
            .file("redis.pw", "s3cret-pw\n");
        let pw_line = if pw {
            "\n    password_file: redis.pw"
        } else {
            ""
        };
        b = b.yaml(&format!(
            "auth:\n  api_keys_file: keys.txt\n  shared:\n    redis: {}{pw_line}",
            redis.url()
        ));
        b.start()
    };
    let (a, b) = (shared(true).await, shared(true).await);
    let statuses = [
        status_of(chat(&a, "sk-team", 1, false)).await,
        status_of(chat(&b, "sk-team", 1, false)).await,
        status_of(chat(&a, "sk-team", 1, false)).await,
    ];
    assert_eq!(statuses, [200, 200, 429]);
    // Without the password Redis refuses the gateway: it counts alone, and says why.
    let c = shared(false).await;
    assert_eq!(status_of(chat(&c, "sk-team", 1, false)).await, 200);
    let m = c.metrics_text().await;
    assert_eq!(
        counter(
            &m,
            "vllm_edge_shared_limits_admissions_total{via=\"local\"}"
        ),
        1,
        "{m}"
    );
    assert!(
        c.log().contains("shared limits: Redis failed"),
        "{}",
        c.log()
    );
}

#[tokio::test]
async fn a_redis_over_tls_is_shared_when_its_ca_is_given() {
    let pki = Pki::new("redis");
    let leaf = pki.leaf(&["127.0.0.1", "localhost"], false);
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let (cert, key, ca) = (
        file("redis.crt", &leaf.cert),
        file("redis.key", &leaf.key),
        file("ca.crt", &pki.ca.pem()),
    );
    let redis = Redis::start_args(|port| {
        let mut a: Vec<String> = vec!["--port".into(), "0".into(), "--tls-port".into()];
        a.push(port.to_string());
        for (k, v) in [
            ("--tls-cert-file", &cert),
            ("--tls-key-file", &key),
            ("--tls-ca-cert-file", &ca),
        ] {
            a.push(k.into());
            a.push(v.clone());
        }
        a.extend(["--tls-auth-clients".into(), "no".into()]);
        a
    })
    .await;
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let backend = sim(&["m"]).await;
    let gws = gateways(
        2,
        &backend,
        "team sk-team rpm=2\n",
        &format!("redis: {url}\nca_file: {ca}"),
    )
    .await;
    let statuses = [
        status_of(chat(&gws[0], "sk-team", 1, false)).await,
        status_of(chat(&gws[1], "sk-team", 1, false)).await,
        status_of(chat(&gws[0], "sk-team", 1, false)).await,
    ];
    assert_eq!(statuses, [200, 200, 429], "{}", gws[0].log_unusual());
    let m = gws[1].metrics_text().await;
    assert_eq!(
        counter(
            &m,
            "vllm_edge_shared_limits_admissions_total{via=\"redis\"}"
        ),
        1,
        "{m}"
    );
    // Without the CA the certificate is not trusted: the gateway counts alone.
    let alone = gateways(
        1,
        &backend,
        "team sk-team rpm=2\n",
        &format!("redis: {url}"),
    )
    .await
    .remove(0);
    assert_eq!(status_of(chat(&alone, "sk-team", 1, false)).await, 200);
    assert!(
        alone.log().contains("shared limits: Redis failed"),
        "{}",
        alone.log()
    );
}
