//! Request spans exported over OTLP/HTTP (`tracing.otlp`) to a receiver of the test's own,
//! decoded with OpenTelemetry's protobuf definitions; the replica gets the attempt's
//! `traceparent`.

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::support::*;

/// An OTLP/HTTP receiver on a free loopback port: every span it is sent.
async fn receiver() -> (String, mpsc::UnboundedReceiver<Span>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // One request: its head, then `content-length` bytes of protobuf.
                    let head_end = loop {
                        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break at + 4;
                        }
                        let mut chunk = [0u8; 8192];
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    assert!(head.starts_with("post /v1/traces "), "{head}");
                    assert!(
                        head.contains("content-type: application/x-protobuf"),
                        "{head}"
                    );
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse().unwrap())
                        .expect("a content-length");
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 8192];
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: Vec<u8> = buf.drain(..head_end + len).skip(head_end).collect();
                    let req = ExportTraceServiceRequest::decode(&body[..]).expect("OTLP protobuf");
                    for rs in req.resource_spans {
                        let service = rs.resource.as_ref().and_then(|r| {
                            r.attributes
                                .iter()
                                .find(|a| a.key == "service.name")
                                .and_then(|a| a.value.as_ref()?.value.clone())
                        });
                        assert_eq!(service, Some(AnyValue::StringValue("vllm-edge".into())));
                        for ss in rs.scope_spans {
                            for s in ss.spans {
                                let _ = tx.send(s);
                            }
                        }
                    }
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if conn.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, rx)
}

fn attr(s: &Span, key: &str) -> Option<AnyValue> {
    s.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.clone())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A chat completion through `gw` with these extra headers, answered 200 in full.
async fn chat_ok(gw: &Gateway, headers: &[(&str, &str)]) {
    let mut req = http1().post(gw.url("/v1/chat/completions"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req
        .json(&chat_body("m", "hello", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
}

/// Spans received until `n` arrived (or the time ran out).
async fn spans(rx: &mut mpsc::UnboundedReceiver<Span>, n: usize) -> Vec<Span> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while out.len() < n {
            match rx.recv().await {
                Some(s) => out.push(s),
                None => return,
            }
        }
    })
    .await;
    out
}

#[tokio::test]
async fn a_request_span_continues_the_callers_trace_and_parents_the_replicas_request() {
    let (collector, mut rx) = receiver().await;
    let backend = sim(&["m"]).await;
    let gw = Gateway::builder(&[&backend])
        .file("keys.txt", "team-a sk-a\n")
        .yaml(&format!(
            "auth:\n  api_keys_file: keys.txt\ntracing:\n  otlp:\n    endpoint: {collector}\n    sample_ratio: 0"
        ))
        // Exported every 100 ms rather than every 5 s.
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start()
        .await;
    // The caller's trace, sampled: followed although new traces are sampled at 0.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let parent = format!("00-{trace_id}-{caller_span}-01");
    chat_ok(
        &gw,
        &[("authorization", "Bearer sk-a"), ("traceparent", &parent)],
    )
    .await;

    let got = spans(&mut rx, 2).await;
    assert_eq!(got.len(), 2, "{got:?}\n{}", gw.log_unusual());
    let request = got
        .iter()
        .find(|s| s.kind == 2) // SPAN_KIND_SERVER
        .expect("the request's span");
    let attempt = got
        .iter()
        .find(|s| s.kind == 3) // SPAN_KIND_CLIENT
        .expect("the attempt's span");
    // The request span is the caller's child; the attempt is the request's.
    assert_eq!(hex(&request.trace_id), trace_id);
    assert_eq!(hex(&request.parent_span_id), caller_span);
    assert_eq!(hex(&attempt.trace_id), trace_id);
    assert_eq!(attempt.parent_span_id, request.span_id);
    assert_eq!(request.name, "POST /v1/chat/completions");
    assert_eq!(
        attr(request, "gen_ai.request.model"),
        Some(AnyValue::StringValue("m".into()))
    );
    assert_eq!(
        attr(request, "vllm_edge.key"),
        Some(AnyValue::StringValue("team-a".into()))
    );
    assert_eq!(
        attr(request, "vllm_edge.attempts"),
        Some(AnyValue::IntValue(1))
    );
    assert_eq!(
        attr(request, "http.response.status_code"),
        Some(AnyValue::IntValue(200))
    );
    assert!(matches!(
        attr(request, "gen_ai.usage.output_tokens"),
        Some(AnyValue::IntValue(n)) if n > 0
    ));
    assert!(attr(request, "vllm_edge.ttfb_seconds").is_some());
    let backend_name = attr(attempt, "vllm_edge.backend");
    assert_eq!(backend_name, attr(request, "vllm_edge.backend"));
    assert!(backend_name.is_some());
    // The replica was sent the attempt's context: its own spans would be the attempt's
    // children, in the caller's trace.
    let sent = backend.sim.state()["traceparent"]
        .as_str()
        .expect("a traceparent reached the replica")
        .to_string();
    assert_eq!(
        sent,
        format!("00-{trace_id}-{}-01", hex(&attempt.span_id)),
        "{sent}"
    );
}

#[tokio::test]
async fn unsampled_requests_cost_no_span_and_send_their_decision_on() {
    let (collector, mut rx) = receiver().await;
    let backend = sim(&["m"]).await;
    let gw = Gateway::builder(&[&backend])
        .yaml(&format!(
            "tracing:\n  otlp:\n    endpoint: {collector}/\n    sample_ratio: 0"
        ))
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start()
        .await;
    // A new trace at ratio 0: not sampled, and the replica is told so (flag 00).
    chat_ok(&gw, &[]).await;
    let sent = backend.sim.state()["traceparent"]
        .as_str()
        .expect("a traceparent reached the replica")
        .to_string();
    assert!(sent.starts_with("00-") && sent.ends_with("-00"), "{sent}");
    // Then a sampled caller's request: its spans are the only ones exported.
    chat_ok(
        &gw,
        &[(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )],
    )
    .await;
    // Had the first request been exported, its spans (ended first) would be among the
    // first two.
    let got = spans(&mut rx, 2).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got
        .iter()
        .all(|s| hex(&s.trace_id) == "0af7651916cd43dd8448eb211c80319c"));
}
