//! The production edge: TLS termination (HTTP/1.1 and HTTP/2 over ALPN, certificate
//! reload), API keys with per-key limits, the backend's own key, and the admin token.

use crate::support::*;
use futures_util::StreamExt;
use std::time::Duration;

fn tls_listener(cert: &str, key: &str) -> String {
    format!("  - address: 127.0.0.1:0\n    tls:\n      cert: {cert}\n      key: {key}\n")
}

fn peer_cert(resp: &reqwest::Response) -> Vec<u8> {
    resp.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|t| t.peer_certificate())
        .expect("a TLS response carries the peer certificate")
        .to_vec()
}

/// The whole chain of an error, for matching on the TLS reason.
fn chain(e: &reqwest::Error) -> String {
    let mut out = format!("{e:?}");
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = src {
        out.push_str(&format!(" / {s}"));
        src = s.source();
    }
    out
}

#[tokio::test]
async fn https_serves_http1_and_http2_and_streams_over_h2() {
    let backend = sim(&["m"]).await;
    let pki = Pki::new("main");
    let leaf = pki.leaf(&["127.0.0.1", "localhost"], false);
    let gw = Gateway::builder(&[&backend])
        .file("cert.pem", leaf.cert.clone())
        .file("key.pem", leaf.key.clone())
        // A plain listener beside the TLS one.
        .listeners(&format!(
            "listeners:\n{}  - address: 127.0.0.1:0\n",
            tls_listener("cert.pem", "key.pem")
        ))
        .start()
        .await;
    let url = |p: &str| format!("https://{}{p}", gw.listeners[0]);

    // HTTP/1.1, by ALPN, and the certificate served is ours.
    let r = pki
        .client(true)
        .post(url("/v1/chat/completions"))
        .json(&chat_body("m", "hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.status(), 200, "{}", gw.log_unusual());
    assert_eq!(peer_cert(&r), leaf.der);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");

    // HTTP/2, negotiated by ALPN, with a stream relayed event by event.
    let h2 = pki.client(false);
    let r = h2
        .post(url("/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": "m",
            "messages": [{"role": "user", "content": "count"}],
            "max_tokens": 8,
            "ignore_eos": true,
            "stream": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut body = String::new();
    let mut chunks = r.bytes_stream();
    while let Some(c) = chunks.next().await {
        body.push_str(std::str::from_utf8(&c.unwrap()).unwrap());
    }
    let events: Vec<&str> = body
        .split("\n\n")
        .filter(|e| e.starts_with("data: "))
        .collect();
    // A role event, 8 tokens, a final event, [DONE].
    assert!(events.len() >= 10, "{body}");
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let content: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(&e[6..]).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert!(!content.is_empty(), "{body}");

    // Several requests multiplexed on one HTTP/2 connection.
    let many = (0..8).map(|i| {
        h2.post(url("/v1/completions"))
            .json(&serde_json::json!({"model": "m", "prompt": format!("p{i}"), "max_tokens": 2}))
            .send()
    });
    for r in futures::future::join_all(many).await {
        let r = r.unwrap();
        assert_eq!(
            (r.version(), r.status().as_u16()),
            (reqwest::Version::HTTP_2, 200)
        );
    }

    // The plain listener beside it still speaks cleartext.
    let r = http1()
        .get(format!("http://{}/v1/models", gw.listeners[1]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // And the TLS port does not.
    assert!(http1()
        .get(format!("http://{}/v1/models", gw.listeners[0]))
        .send()
        .await
        .is_err());

    // A client that sends garbage instead of a ClientHello is dropped, and nobody else
    // notices.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut raw = tokio::net::TcpStream::connect(gw.listeners[0])
        .await
        .unwrap();
    raw.write_all(b"\x16\x03\x01\xff\xffGARBAGE GARBAGE GARBAGE\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(10), raw.read(&mut buf))
        .await
        .expect("the gateway answers garbage promptly")
        .unwrap_or(0);
    // Either an alert record (0x15) or a plain close; never an HTTP answer.
    assert!(n == 0 || buf[0] == 0x15, "{:?}", &buf[..n]);
    let r = pki
        .client(true)
        .get(url("/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn clients_reject_expired_misnamed_and_unknown_certificates() {
    let backend = sim(&["m"]).await;
    let pki = Pki::new("main");
    let expired = pki.leaf(&["127.0.0.1"], true);
    let misnamed = pki.leaf(&["example.com"], false);
    let good = pki.leaf(&["127.0.0.1"], false);
    let gw = Gateway::builder(&[&backend])
        .file("expired.pem", expired.cert)
        .file("expired.key", expired.key)
        .file("misnamed.pem", misnamed.cert)
        .file("misnamed.key", misnamed.key)
        .file("good.pem", good.cert)
        .file("good.key", good.key)
        .listeners(&format!(
            "listeners:\n{}{}{}",
            tls_listener("expired.pem", "expired.key"),
            tls_listener("misnamed.pem", "misnamed.key"),
            tls_listener("good.pem", "good.key"),
        ))
        .start()
        .await;
    let get = |client: reqwest::Client, i: usize| {
        let url = format!("https://{}/v1/models", gw.listeners[i]);
        async move { client.get(url).send().await }
    };
    let e = get(pki.client(true), 0).await.unwrap_err();
    assert!(
        chain(&e).to_lowercase().contains("expired"),
        "{}",
        chain(&e)
    );
    let e = get(pki.client(true), 1).await.unwrap_err();
    assert!(
        chain(&e).contains("NotValidForName") || chain(&e).contains("not valid for name"),
        "{}",
        chain(&e)
    );
    let e = get(Pki::new("other").client(true), 2).await.unwrap_err();
    assert!(chain(&e).contains("UnknownIssuer"), "{}", chain(&e));
    // The good one works, so the failures above are the certificates' doing.
    let r = get(pki.client(true), 2).await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn certificates_reload_on_sighup_without_dropping_connections() {
    let backend = sim(&["m"]).await;
    let pki = Pki::new("main");
    let first = pki.leaf(&["127.0.0.1"], false);
    let gw = Gateway::builder(&[&backend])
        .file("cert.pem", first.cert.clone())
        .file("key.pem", first.key.clone())
        .listeners(&format!(
            "listeners:\n{}",
            tls_listener("cert.pem", "key.pem")
        ))
        .start()
        .await;
    let url = format!("https://{}/v1/models", gw.addr);
    let kept = pki.client(true);
    let r = kept.get(&url).send().await.unwrap();
    assert_eq!(peer_cert(&r), first.der);
    r.bytes().await.unwrap();

    let second = pki.leaf(&["127.0.0.1"], false);
    std::fs::write(gw.path("cert.pem"), &second.cert).unwrap();
    std::fs::write(gw.path("key.pem"), &second.key).unwrap();
    gw.signal(nix::sys::signal::SIGHUP);
    let served = || async {
        let r = pki.client(true).get(&url).send().await.unwrap();
        peer_cert(&r)
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            served().await == second.der
        })
        .await,
        "{}",
        gw.log_unusual()
    );
    // The connection opened before the reload is still the same one: it still shows the
    // certificate its handshake got.
    let r = kept.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(peer_cert(&r), first.der);

    // A broken certificate file is refused by the reload; the running one stays.
    std::fs::write(gw.path("cert.pem"), "not a certificate").unwrap();
    gw.signal(nix::sys::signal::SIGHUP);
    assert!(
        eventually(Duration::from_secs(10), || async {
            gw.log().contains("configuration not reloaded")
        })
        .await
    );
    assert!(gw.log().contains("cert.pem"), "{}", gw.log_unusual());
    assert_eq!(served().await, second.der);
}

fn sha256_hex(s: &str) -> String {
    vllm_edge::auth::sha256(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn api_keys_are_required_checked_and_never_forwarded_or_logged() {
    // The replica wants its own key, which only the gateway knows.
    let backend = sim_with(&["m"], |a| a.api_key = Some("backend-secret".into())).await;
    let keys = format!(
        "# team keys\nalice sk-alice-secret\nbot sha256:{}  # stored hashed\n",
        sha256_hex("sk-bot-secret")
    );
    let gw = Gateway::builder(&[])
        .backend_with(&backend.url(), "api_key_file: backend.key")
        .file("backend.key", "# the replica's key\nbackend-secret\n")
        .file("keys.txt", keys)
        .yaml("auth:\n  api_keys_file: keys.txt")
        .start()
        .await;
    let post = |key: Option<&str>| {
        let mut r = http1()
            .post(gw.url("/v1/chat/completions"))
            .json(&chat_body("m", "hi", false));
        if let Some(k) = key {
            r = r.header("authorization", k);
        }
        r.send()
    };

    let r = post(None).await.unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let (status, body) = error_of(r).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["type"], "AuthenticationError");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Bearer"));

    // The access line says which: no key, or a key that is not valid.
    let line = eventually_line(&gw, "status=401").await;
    assert!(
        line.contains("key=\"-\"") && line.contains("error=\"No API key was provided"),
        "{line}"
    );
    for wrong in [
        "Bearer sk-alice-secreT",
        "Bearer sk-alice",
        "sk-alice-secret",
        "Basic abc",
    ] {
        let (status, body) = error_of(post(Some(wrong)).await.unwrap()).await;
        assert_eq!(status, 401, "{wrong}");
        assert_eq!(body["error"]["message"], "The API key is not valid.");
    }
    let invalid = || {
        gw.log()
            .lines()
            .filter(|l| l.contains("status=401") && l.contains("error=\"The API key is not valid."))
            .count()
    };
    assert!(
        eventually(Duration::from_secs(10), || async { invalid() >= 4 }).await,
        "{}",
        gw.log_unusual()
    );
    // The hash in the file is not itself a key.
    let h = format!("Bearer sha256:{}", sha256_hex("sk-bot-secret"));
    assert_eq!(post(Some(&h)).await.unwrap().status(), 401);

    // Good keys, plain and hashed, get through, with the backend's key in place of theirs.
    for good in ["Bearer sk-alice-secret", "Bearer sk-bot-secret"] {
        let r = post(Some(good)).await.unwrap();
        assert_eq!(r.status(), 200, "{good}: {}", gw.log_unusual());
    }
    // /v1/models needs a key too; /health does not.
    assert_eq!(
        http1()
            .get(gw.url("/v1/models"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        http1()
            .get(gw.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let m = gw.metrics_text().await;
    assert!(
        m.contains("vllm_edge_auth_refused_total{reason=\"missing\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("vllm_edge_auth_refused_total{reason=\"invalid\"} 5"),
        "{m}"
    );
    // Neither keys nor their hashes reach the log or the metrics; names do.
    let log = gw.log();
    for secret in [
        "sk-alice-secret",
        "sk-bot-secret",
        "backend-secret",
        &sha256_hex("sk-bot-secret"),
    ] {
        assert!(!log.contains(secret), "{secret} leaked into the log");
        assert!(!m.contains(secret), "{secret} leaked into the metrics");
    }
    assert!(
        log.contains("key=\"alice\"") || log.contains("key=alice"),
        "{log}"
    );
}

#[tokio::test]
async fn the_clients_key_is_not_what_the_backend_sees() {
    // The replica happens to require the very key the client holds: had the gateway
    // forwarded the client's header, the replica would accept it.
    let backend = sim_with(&["m"], |a| a.api_key = Some("sk-shared".into())).await;
    let gw = Gateway::builder(&[])
        .backend_with(&backend.url(), "models: [m]")
        .file("keys.txt", "sk-shared\n")
        .yaml("auth:\n  api_keys_file: keys.txt")
        .start()
        .await;
    let r = http1()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer sk-shared")
        .json(&chat_body("m", "hi", false))
        .send()
        .await
        .unwrap();
    // Admitted by the gateway, refused by the replica, which got no key.
    let status = r.status().as_u16();
    let body = r.text().await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (401, "{\"error\":\"Unauthorized\"}")
    );
}

#[tokio::test]
async fn per_key_limits_answer_429_with_retry_after() {
    let backend = sim_with(&["m"], |a| a.time_scale = Some(1.0)).await;
    let gw = Gateway::builder(&[&backend])
        .file(
            "keys.txt",
            "limited sk-rpm rpm=2\nsolo sk-solo max_concurrent=1\nfree sk-free\n",
        )
        .yaml("auth:\n  api_keys_file: keys.txt")
        .start()
        .await;
    let post = |key: &str, max_tokens: u32| {
        http1()
            .post(gw.url("/v1/completions"))
            .header("authorization", format!("Bearer {key}"))
            .json(&serde_json::json!({
                "model": "m", "prompt": "x", "max_tokens": max_tokens,
                "ignore_eos": true, "stream": true,
            }))
            .send()
    };
    for _ in 0..2 {
        let r = post("sk-rpm", 1).await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let r = post("sk-rpm", 1).await.unwrap();
    let after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&after), "{after}");
    let (status, body) = error_of(r).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["type"], "RateLimitError");
    // Its access line names the key and the reason.
    let line = eventually_line(&gw, "status=429").await;
    assert!(
        line.contains("key=\"limited\"")
            && line.contains("error=\"This key is limited to 2 requests per minute"),
        "{line}"
    );
    // Another key is not affected.
    assert_eq!(post("sk-free", 1).await.unwrap().status(), 200);

    // One stream at a time for `solo`: a second is refused while the first runs (at real
    // speed, 400 tokens take seconds), and accepted once it ended.
    let first = post("sk-solo", 400).await.unwrap();
    assert_eq!(first.status(), 200);
    let mut first = first.bytes_stream();
    first.next().await.expect("the first event").unwrap();
    let r = post("sk-solo", 1).await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    drop(first);
    // The slot comes back once the gateway has seen the client go; until then, more 429s.
    let refused = std::sync::atomic::AtomicUsize::new(1);
    assert!(
        eventually(Duration::from_secs(10), || async {
            match post("sk-solo", 1).await.unwrap().status().as_u16() {
                200 => true,
                429 => {
                    refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    false
                }
                s => panic!("status {s}"),
            }
        })
        .await,
        "the slot came back after the stream ended: {}",
        gw.log_unusual()
    );
    let m = gw.metrics_text().await;
    assert!(
        m.contains("vllm_edge_key_limited_total{key=\"limited\"} 1"),
        "{m}"
    );
    let solo = format!(
        "vllm_edge_key_limited_total{{key=\"solo\"}} {}",
        refused.into_inner()
    );
    assert!(m.contains(&solo), "{solo}: {m}");
}

/// The status of `GET /v1/models` with `key`: whether the key is admitted, at no cost in
/// tokens.
async fn models_status(gw: &Gateway, key: &str) -> u16 {
    http1()
        .get(gw.url("/v1/models"))
        .header("authorization", format!("Bearer {key}"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// `tpm=N`: a key is admitted while its token balance is positive and charged what each
/// request used, from the response's `usage`, or estimated for a stream that reports none
/// (one token per event).
#[tokio::test]
async fn a_keys_tokens_per_minute_are_charged_what_its_requests_used() {
    let backend = sim(&["m"]).await;
    let gw = Gateway::builder(&[&backend])
        .file(
            "keys.txt",
            "counted sk-tpm tpm=100\nstreamer sk-stream tpm=60\n",
        )
        .yaml("auth:\n  api_keys_file: keys.txt")
        .start()
        .await;
    let post = |key: &str, max_tokens: u32, stream: bool| {
        http1()
            .post(gw.url("/v1/completions"))
            .header("authorization", format!("Bearer {key}"))
            .json(&serde_json::json!({
                "model": "m", "prompt": "x", "max_tokens": max_tokens,
                "ignore_eos": true, "stream": stream,
            }))
            .send()
    };
    // 150 completion tokens of a 100-token budget: this one is served, the next is not.
    let r = post("sk-tpm", 150, false).await.unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    let used = v["usage"]["total_tokens"].as_u64().unwrap();
    assert!(used > 150, "{v}");
    // A request is charged when it ends, just after its answer has gone out. (Asked with
    // `/v1/models`, which the key's limits admit but which uses no tokens.)
    let models = |key: &'static str| models_status(&gw, key);
    assert!(
        eventually(Duration::from_secs(5), || async {
            models("sk-tpm").await == 429
        })
        .await,
        "the request's tokens were charged"
    );
    let r = post("sk-tpm", 1, false).await.unwrap();
    let after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // The debt (used − 100) is paid back at 100/60 tokens a second.
    let expected = ((used - 100) as f64 * 0.6).ceil() as u64;
    assert!(after.abs_diff(expected) <= 1, "{after} vs {expected}");
    let (status, body) = error_of(r).await;
    assert_eq!(status, 429);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("100 tokens per minute"),
        "{body}"
    );
    // A stream without usage is charged one token per event: 80 events of 60.
    let r = post("sk-stream", 80, true).await.unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            models("sk-stream").await == 429
        })
        .await,
        "the stream's tokens were charged"
    );
    let m = gw.metrics_text().await;
    assert!(
        m.contains("vllm_edge_key_tokens_total{key=\"counted\",kind=\"completion\"} 150"),
        "{m}"
    );
    // The polls' 429s and the request's.
    let limited = m
        .lines()
        .find_map(|l| l.strip_prefix("vllm_edge_key_limited_total{key=\"counted\"} "))
        .and_then(|n| n.parse::<u64>().ok());
    assert!(limited >= Some(2), "{m}");
}

/// Requests admitted together (a burst) do not all get through on one positive balance:
/// each takes its prompt's estimate from it once its body is read, and one that finds it
/// used up is refused before it is sent.
#[tokio::test]
async fn a_burst_admitted_together_is_held_to_the_token_budget() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // At real speed, so the first request is still in flight when the second goes.
    let backend = sim_with(&["m"], |a| a.time_scale = None).await;
    let gw = Gateway::builder(&[&backend])
        .file("keys.txt", "burst sk-burst tpm=100\n")
        .yaml("auth:\n  api_keys_file: keys.txt")
        .start()
        .await;
    // The second request's head: admitted now, with 100 tokens in the balance.
    let body = br#"{"model":"m","prompt":"x","max_tokens":1}"#;
    let mut second = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-burst\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    second.write_all(head.as_bytes()).await.unwrap();
    // The first: a prompt of about 500 tokens (2,000 bytes), streaming for seconds.
    let first = http1()
        .post(gw.url("/v1/completions"))
        .header("authorization", "Bearer sk-burst")
        .json(
            &serde_json::json!({"model": "m", "prompt": "word ".repeat(400), "max_tokens": 300,
                                  "ignore_eos": true, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let mut first = first.bytes_stream();
    first.next().await.expect("the first event").unwrap();
    // Now the second's body: its prompt finds the balance taken.
    second.write_all(body).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), second.read(&mut buf))
            .await
            .expect("answered")
            .unwrap();
        assert!(n > 0, "closed without an answer");
        answer.extend_from_slice(&buf[..n]);
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after:"),
        "{answer}"
    );
    drop(first);
}

#[tokio::test]
async fn keys_reload_on_sighup() {
    let backend = sim(&["m"]).await;
    let gw = Gateway::builder(&[&backend])
        .file("keys.txt", "old sk-old\n")
        .yaml("auth:\n  api_keys_file: keys.txt")
        .start()
        .await;
    let status = |key: &'static str| models_status(&gw, key);
    assert_eq!((status("sk-old").await, status("sk-new").await), (200, 401));
    std::fs::write(gw.path("keys.txt"), "new sk-new\n").unwrap();
    gw.signal(nix::sys::signal::SIGHUP);
    assert!(
        eventually(Duration::from_secs(10), || async {
            status("sk-new").await == 200
        })
        .await
    );
    assert_eq!(status("sk-old").await, 401);
    // A keys file with a mistake is refused whole, naming its line.
    std::fs::write(gw.path("keys.txt"), "new sk-new\nbroken a b c\n").unwrap();
    gw.signal(nix::sys::signal::SIGHUP);
    assert!(
        eventually(Duration::from_secs(10), || async {
            gw.log().contains("keys.txt:2:")
        })
        .await,
        "{}",
        gw.log_unusual()
    );
    assert_eq!(status("sk-new").await, 200);
}

#[tokio::test]
async fn admin_api_is_separate_and_token_protected() {
    let backend = sim(&["m"]).await;
    let gw = Gateway::builder(&[&backend])
        .file("admin.token", "admin-secret\n")
        .yaml("admin:\n  address: 127.0.0.1:0\n  token_file: admin.token")
        .start()
        .await;
    // Not on the data plane.
    for path in ["/metrics", "/load-stats", "/ready"] {
        let r = http1().get(gw.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    let get = |path: &str, token: Option<&str>| {
        let mut r = http1().get(gw.admin_url(path));
        if let Some(t) = token {
            r = r.header("authorization", format!("Bearer {t}"));
        }
        r.send()
    };
    for path in ["/metrics", "/load-stats"] {
        let missing = get(path, None).await.unwrap();
        assert_eq!(missing.status(), 401, "{path}");
        let missing = missing.text().await.unwrap();
        assert!(missing.contains("no admin token was sent"), "{missing}");
        let wrong = get(path, Some("admin-secreT")).await.unwrap();
        assert_eq!(wrong.status(), 401);
        let wrong = wrong.text().await.unwrap();
        assert!(
            wrong.contains("is not the one in admin.token_file"),
            "{wrong}"
        );
        let r = get(path, Some("admin-secret")).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    // Probes need no token.
    for path in ["/health", "/ready", "/serving"] {
        assert_eq!(get(path, None).await.unwrap().status(), 200, "{path}");
    }
    assert!(!gw.log().contains("admin-secret"));
}

#[tokio::test]
async fn check_names_the_file_and_key_of_bad_tls_and_auth_settings() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let pki = Pki::new("check");
    let leaf = pki.leaf(&["127.0.0.1"], false);
    let other = pki.leaf(&["127.0.0.1"], false);
    write("cert.pem", &leaf.cert);
    write("other.key", &other.key);
    write("bad-keys.txt", "a b c d\n");
    let missing_pem = format!("{}: cannot read", dir.path().join("missing.pem").display());
    let cases = [
        (
            "listeners:\n  - address: 127.0.0.1:0\n    tls:\n      cert: missing.pem\n      key: other.key\n",
            "listeners[0].tls.cert",
            // The key, and where the file was looked for.
            missing_pem.as_str(),
        ),
        (
            "listeners:\n  - address: 127.0.0.1:0\n    tls:\n      cert: cert.pem\n      key: other.key\n",
            "listeners[0].tls",
            "do not belong together",
        ),
        (
            "auth:\n  api_keys_file: bad-keys.txt\n",
            "auth.api_keys_file",
            "bad-keys.txt:1:",
        ),
        (
            "admin:\n  address: 127.0.0.1:0\n  token_file: nope\n",
            "admin.token_file",
            "cannot read",
        ),
    ];
    for (i, (yaml, key, needle)) in cases.iter().enumerate() {
        let conf = write(
            &format!("c{i}.yaml"),
            &format!("{yaml}backends:\n  - url: http://127.0.0.1:1\n"),
        );
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vllm-edge"))
            .args(["check", "-c"])
            .arg(&conf)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{yaml}");
        assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
        assert!(err.contains(needle), "{needle}: {err}");
        assert!(err.contains(&format!("c{i}.yaml:")), "{err}");
    }
}

#[tokio::test]
async fn https_backends_are_verified_against_the_configured_ca() {
    // The "replica" speaking TLS: a gateway with a TLS listener in front of a sim.
    let backend = sim(&["m"]).await;
    let pki = Pki::new("upstream");
    let leaf = pki.leaf(&["127.0.0.1"], false);
    let front = Gateway::builder(&[&backend])
        .file("cert.pem", leaf.cert)
        .file("key.pem", leaf.key)
        .listeners(&format!(
            "listeners:\n{}",
            tls_listener("cert.pem", "key.pem")
        ))
        .start()
        .await;
    let https = format!("https://{}", front.addr);

    // Trusting the CA: models are discovered and requests proxied, both over TLS.
    let gw = Gateway::builder(&[])
        .backend_url(&https)
        .file("ca.pem", pki.ca.pem())
        .yaml("upstream:\n  ca_file: ca.pem")
        .start()
        .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            models(&gw).await == vec!["m".to_string()]
        })
        .await,
        "{}",
        gw.log_unusual()
    );
    let r = http1()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body("m", "over tls", true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", gw.log_unusual());
    assert!(r.text().await.unwrap().ends_with("data: [DONE]\n\n"));

    // Trusting another CA: the certificate is refused (the health checks take the backend
    // out at once), no request gets through, and a backend without verification
    // (`tls_verify: false`) works.
    let other = Pki::new("other");
    let strict = Gateway::builder(&[])
        .backend_with(&https, "models: [m]\nname: verified")
        .backend_with(
            &https.replace("127.0.0.1", "localhost"),
            "models: [n]\nname: unverified\ntls_verify: false",
        )
        .file("ca.pem", other.ca.pem())
        .yaml("upstream:\n  ca_file: ca.pem")
        .start()
        .await;
    let (status, _) = error_of(
        http1()
            .post(strict.url("/v1/chat/completions"))
            .json(&chat_body("m", "hi", false))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(status == 502 || status == 503, "{status}");
    assert!(
        strict.log().contains("UnknownIssuer") || strict.log().contains("invalid peer certificate"),
        "{}",
        strict.log_unusual()
    );
    // `n` is not served by the front gateway, so the replica's own 404 proves the request
    // went through TLS to it.
    let r = http1()
        .post(strict.url("/v1/chat/completions"))
        .json(&chat_body("n", "hi", false))
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(r).await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("`n`"),
        "{body}"
    );
}

/// The values of header `name` in an answer.
fn values(r: &reqwest::Response, name: &str) -> Vec<String> {
    r.headers()
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn cors_preflights_are_answered_and_answers_marked_for_allowed_origins_only() {
    // The sim, like vLLM by default, allows any origin (`access-control-allow-origin: *`).
    let backend = sim(&["m"]).await;
    let gw = Gateway::builder(&[&backend])
        .file("keys.txt", "alice sk-a\n")
        .yaml("auth:\n  api_keys_file: keys.txt\ncors:\n  allowed_origins: [\"https://app.example.com\"]")
        .start()
        .await;
    let app = "https://app.example.com";
    let preflight = |origin: &str, method: &str, path: &str| {
        http1()
            .request(reqwest::Method::OPTIONS, gw.url(path))
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
    };
    // The browser's preflight carries no key: the gateway answers it.
    let r = preflight(app, "POST", "/v1/chat/completions")
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(values(&r, "access-control-allow-origin"), [app]);
    assert_eq!(values(&r, "access-control-allow-methods"), ["POST"]);
    assert_eq!(
        values(&r, "access-control-allow-headers"),
        ["authorization, content-type"]
    );
    assert_eq!(values(&r, "access-control-max-age"), ["600"]);
    let r = preflight(app, "GET", "/v1/models").await.unwrap();
    assert_eq!(r.status(), 204);
    // A method the route does not take, a path it does not have, an origin not allowed.
    let r = preflight(app, "GET", "/v1/chat/completions").await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(values(&r, "access-control-allow-origin"), [app]);
    let r = preflight(app, "POST", "/v1/nothing").await.unwrap();
    assert_eq!(r.status(), 404);
    let r = preflight("https://evil.example.com", "POST", "/v1/chat/completions")
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(values(&r, "access-control-allow-origin").is_empty());
    assert_eq!(
        backend.sim.state()["requests"],
        0,
        "no preflight was proxied"
    );

    let chat = |origin: &str, key: Option<&str>| {
        let mut r = http1()
            .post(gw.url("/v1/chat/completions"))
            .header("origin", origin)
            .json(&chat_body("m", "hi", false));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    // Proxied: the replica's `*` is replaced by the origin, and our headers are exposed.
    let r = chat(app, Some("sk-a")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(values(&r, "access-control-allow-origin"), [app]);
    assert!(values(&r, "access-control-expose-headers")[0].contains("x-request-id"));
    assert!(values(&r, "vary")
        .iter()
        .any(|v| v.eq_ignore_ascii_case("origin")));
    // The gateway's own errors are marked too, so the page can read them.
    let r = chat(app, None).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(values(&r, "access-control-allow-origin"), [app]);
    // Another origin's page gets nothing to read: the replica's `*` is dropped.
    let r = chat("https://evil.example.com", Some("sk-a"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(values(&r, "access-control-allow-origin").is_empty());

    // Without `cors:`, nothing changes: preflights are refused, the replica's own pass.
    let plain = Gateway::builder(&[&backend]).start().await;
    let r = http1()
        .request(reqwest::Method::OPTIONS, plain.url("/v1/chat/completions"))
        .header("origin", app)
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let r = http1()
        .post(plain.url("/v1/chat/completions"))
        .header("origin", app)
        .json(&chat_body("m", "hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(values(&r, "access-control-allow-origin"), ["*"]);
}

/// The first access line of `gw` holding `needle`, once it is written (within 10 s).
async fn eventually_line(gw: &Gateway, needle: &str) -> String {
    let find = || {
        gw.log()
            .lines()
            .find(|l| l.contains(" access: ") && l.contains(needle))
            .map(str::to_string)
    };
    assert!(
        eventually(Duration::from_secs(10), || async { find().is_some() }).await,
        "no access line with {needle}:\n{}",
        gw.log_unusual()
    );
    find().unwrap()
}
