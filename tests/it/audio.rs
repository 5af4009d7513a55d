//! The audio endpoints (`/v1/audio/transcriptions`, `/v1/audio/translations`): uploads in
//! `multipart/form-data`, routed by the form's `model` field, forwarded byte-identical,
//! answered or streamed as vLLM does.

use crate::support::*;
use serde_json::Value;
use vllm_edge::sim::digest;

const BOUNDARY: &str = "----vllm-edge-test-7f3a";

/// A form with the audio file first and the fields after it (as `curl -F file=@a.wav -F
/// model=...` sends it), so routing must read past the file. The audio's bytes include
/// CRLFs, quotes and the boundary without its leading CRLF.
fn form(fields: &[(&str, &str)], audio_len: usize) -> Vec<u8> {
    let mut b = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
         Content-Type: audio/wav\r\n\r\n"
    )
    .into_bytes();
    let noise = format!("RIFF\r\n\"model\"--{BOUNDARY}\r\n\r\n\u{0}");
    b.extend(noise.bytes().cycle().take(audio_len));
    for (k, v) in fields {
        b.extend_from_slice(
            format!("\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}")
                .as_bytes(),
        );
    }
    b.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    b
}

async fn post_form(
    client: &reqwest::Client,
    gw: &Gateway,
    path: &str,
    body: Vec<u8>,
) -> reqwest::Response {
    client
        .post(gw.url(path))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(body)
        .send()
        .await
        .expect("request completes")
}

#[tokio::test]
async fn forms_are_routed_by_their_model_field_and_arrive_intact() {
    let chat = sim(&["chat"]).await;
    let whisper = sim(&["whisper"]).await;
    let gw = Gateway::builder(&[&chat, &whisper]).start().await;
    let whisper_name = name_of(&whisper);
    for (proto, client) in [("h1", http1()), ("h2", http2())] {
        for (path, len) in [
            ("/v1/audio/transcriptions", 1000),
            ("/v1/audio/translations", 3 * 1024 * 1024),
        ] {
            let body = form(&[("model", "chat"), ("model", "whisper")], len);
            let want = digest(&body);
            let resp = post_form(&client, &gw, path, body).await;
            assert_eq!(resp.status(), 200, "{proto} {path}: {}", gw.log());
            assert_eq!(
                resp.headers()["x-vllm-edge-backend"],
                whisper_name.as_str(),
                "{proto} {path}: the last `model` field counts"
            );
            assert_eq!(resp.headers()["x-sim-body-digest"], want.as_str());
            let v: Value = resp.json().await.unwrap();
            assert!(v["text"].as_str().is_some_and(|t| !t.is_empty()), "{v}");
            if path.ends_with("transcriptions") {
                assert_eq!(
                    v["usage"],
                    serde_json::json!({"type": "duration", "seconds": 1})
                );
            }
        }
    }
    // Two models and no `routing.default_model`: a form must name one.
    let resp = post_form(&http1(), &gw, "/v1/audio/transcriptions", form(&[], 100)).await;
    let (status, v) = error_of(resp).await;
    assert_eq!(
        (status, &v["error"]["param"]),
        (400, &Value::from("model")),
        "{v}"
    );
}

#[tokio::test]
async fn a_streamed_transcription_passes_through_as_events() {
    let whisper = sim(&["whisper"]).await;
    let gw = Gateway::builder(&[&whisper]).start().await;
    let body = form(
        &[
            ("model", "whisper"),
            ("stream", "true"),
            ("stream_include_usage", "true"),
            ("max_completion_tokens", "5"),
        ],
        64_000,
    );
    let resp = post_form(&http1(), &gw, "/v1/audio/transcriptions", body).await;
    assert_eq!(resp.status(), 200, "{}", gw.log());
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let words = chunks
        .iter()
        .filter(|c| !c["choices"][0]["delta"]["content"].is_null());
    assert_eq!(words.count(), 5, "{text}");
    assert!(chunks.iter().all(|c| c["object"] == "transcription.chunk"));
    // 2 s of audio at 50 positions per second.
    assert_eq!(
        chunks.last().unwrap()["usage"]["prompt_tokens"],
        100,
        "{text}"
    );
    // The gateway read the usage chunk (asked for with the form field).
    let metrics = gw.metrics_text().await;
    assert!(
        metrics.contains("vllm_edge_tokens_total{kind=\"completion\",model=\"whisper\"} 5"),
        "{metrics}"
    );
}

#[tokio::test]
async fn bad_forms_get_a_400_from_the_gateway_and_ping_is_health() {
    let whisper = sim(&["whisper"]).await;
    let gw = Gateway::builder(&[&whisper]).start().await;
    let client = http1();
    for (body, ct, param, says) in [
        (
            form(&[("model", "whisper"), ("stream", "sometimes")], 100),
            None,
            "stream",
            "true or false",
        ),
        (
            form(&[("model", "whisper")], 100)[..150].to_vec(),
            None,
            "",
            "malformed",
        ),
        (
            form(&[("model", "whisper")], 100),
            Some("multipart/form-data"),
            "",
            "no boundary",
        ),
    ] {
        let resp = client
            .post(gw.url("/v1/audio/transcriptions"))
            .header(
                "content-type",
                ct.map_or(
                    format!("multipart/form-data; boundary={BOUNDARY}"),
                    str::to_string,
                ),
            )
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, v) = error_of(resp).await;
        assert_eq!(status, 400, "{says}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(says),
            "{v}"
        );
        let want_param = if param.is_empty() {
            Value::Null
        } else {
            param.into()
        };
        assert_eq!(v["error"]["param"], want_param, "{v}");
    }
    let resp = post_form(
        &client,
        &gw,
        "/v1/audio/translations",
        form(&[("model", "nope")], 10),
    )
    .await;
    assert_eq!(error_of(resp).await.0, 404);
    // Nothing reached the replica.
    let state = get_json(format!("{}/sim/state", whisper.url())).await;
    assert_eq!(state["requests"], 0, "{state}");
    // A form that names no model is for the one model there is, as it would be for vLLM.
    let resp = post_form(&client, &gw, "/v1/audio/transcriptions", form(&[], 100)).await;
    assert_eq!(resp.status(), 200, "{}", gw.log());
    let v: Value = resp.json().await.unwrap();
    assert!(v["text"].as_str().is_some_and(|t| !t.is_empty()), "{v}");

    for method in [reqwest::Method::GET, reqwest::Method::POST] {
        let resp = client
            .request(method.clone(), gw.url("/ping"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{method} /ping");
    }
}
