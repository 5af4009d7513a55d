//! Every bad request gets an OpenAI-shaped error with the right status, and the gateway
//! keeps serving normal requests right after.

use crate::support::*;
use std::time::Duration;
use vllm_edge::sim::Faults;

fn assert_openai_error(status: u16, body: &serde_json::Value, want: u16) {
    assert_eq!(status, want, "{body}");
    let e = &body["error"];
    assert!(e["message"].is_string(), "{body}");
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
}

#[tokio::test]
async fn client_errors() {
    let backend = sim(&["m"]).await;
    let gw = Gateway::builder(&[&backend])
        .yaml("limits:\n  max_body_size: 1MiB")
        .start()
        .await;
    let c = http1();
    let post = |body: &'static str| {
        c.post(gw.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for (body, want, param) in [
        ("{\"model\":", 400, Some("model")),
        ("not json", 400, None),
        ("[{\"model\":\"m\"}]", 400, None),
        ("{\"model\":7,\"messages\":[]}", 400, Some("model")),
        ("{\"model\":\"m\",\"stream\":\"yes\"}", 400, Some("stream")),
        ("", 400, None),
    ] {
        let (status, v) = error_of(post(body).await.unwrap()).await;
        assert_openai_error(status, &v, want);
        assert_eq!(v["error"]["param"].as_str(), param, "{body}: {v}");
        still_serves(&gw, "m").await;
    }

    let (status, v) = error_of(
        post("{\"model\":\"secret-internal-model\",\"messages\":[]}")
            .await
            .unwrap(),
    )
    .await;
    assert_openai_error(status, &v, 404);
    assert!(
        !v["error"]["message"].as_str().unwrap().contains("Valid"),
        "{v}"
    );
    assert_eq!(v["error"]["param"], "model");

    let (status, v) = error_of(c.get(gw.url("/v1/unknown")).send().await.unwrap()).await;
    assert_openai_error(status, &v, 404);

    let resp = c.get(gw.url("/v1/chat/completions")).send().await.unwrap();
    assert_eq!(resp.headers()["allow"], "POST");
    let (status, v) = error_of(resp).await;
    assert_openai_error(status, &v, 405);

    // Declared too large: refused before reading.
    let big = vec![b' '; 2 << 20];
    let (status, v) = error_of(
        c.post(gw.url("/v1/chat/completions"))
            .body(big.clone())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_openai_error(status, &v, 413);
    still_serves(&gw, "m").await;

    // Chunked (no length): fine up to 64 KiB, 411 above, 413 above the cap.
    for (size, want) in [(10 * 1024, 200), (300 * 1024, 411), (2 << 20, 413)] {
        let mut body =
            "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"".to_string();
        body.push_str(&"x".repeat(size));
        body.push_str("\"}]}");
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body
            .into_bytes()
            .chunks(8192)
            .map(|c| Ok(c.to_vec()))
            .collect();
        let resp = c
            .post(gw.url("/v1/chat/completions"))
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), want, "chunked {size}");
        if want != 200 {
            let (status, v) = error_of(resp).await;
            assert_openai_error(status, &v, want);
        }
        still_serves(&gw, "m").await;
    }
}

#[tokio::test]
async fn no_backend_can_take_it() {
    // 503: the model's only backend is down.
    let a = sim(&["a"]).await;
    let b = sim(&["b"]).await;
    let gw = Gateway::builder(&[&a, &b]).start().await;
    a.stop();
    assert!(
        eventually(Duration::from_secs(5), || async {
            models(&gw).await.len() == 1
        })
        .await,
        "discovery did not notice the stopped backend"
    );
    let (status, v) = error_of(
        http1()
            .post(gw.url("/v1/chat/completions"))
            .json(&chat_body("a", "hi", false))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_openai_error(status, &v, 503);
    still_serves(&gw, "b").await;
}

#[tokio::test]
async fn failing_backends_give_502_and_stalled_ones_504() {
    let resets = sim(&["r"]).await;
    resets.sim.set_faults(Faults {
        reset: true,
        ..Faults::default()
    });
    let stalls = sim(&["s"]).await;
    stalls.sim.set_faults(Faults {
        stall: true,
        ..Faults::default()
    });
    let unavailable = sim(&["u"]).await;
    unavailable.sim.set_faults(Faults {
        http_error: Some(503),
        ..Faults::default()
    });
    let ok = sim(&["ok"]).await;
    let gw = Gateway::builder(&[&resets, &stalls, &unavailable, &ok])
        .yaml("timeouts:\n  non_stream_first_byte: 300ms")
        .start()
        .await;
    for (model, want) in [("r", 502), ("s", 504), ("u", 503)] {
        let (status, v) = error_of(
            http1()
                .post(gw.url("/v1/chat/completions"))
                .json(&chat_body(model, "hi", false))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_openai_error(status, &v, want);
        still_serves(&gw, "ok").await;
    }
}
