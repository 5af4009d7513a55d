//! Traces of requests, exported to an OpenTelemetry collector (`tracing.otlp`).
//!
//! A request gets a span (kind server) from its arrival to its end, with what the access
//! line says of it: model, key name, chosen backend, attempts, queue time, time to first
//! byte, tokens, status. Each attempt at a replica is a child span (kind client), and the
//! request sent to the replica carries that child's W3C `traceparent`, so the spans vLLM
//! exports itself (`--otlp-traces-endpoint`) join the same trace under it. A request that
//! came with a `traceparent` continues its caller's trace.
//!
//! Sampling: a request whose caller sampled (or did not) is followed; a new trace is
//! sampled at `sample_ratio`. Spans go to a bounded queue exported in batches by the
//! SDK's own thread over OTLP/HTTP (protobuf): a slow or absent collector costs dropped
//! spans, never a request's time.

use std::time::{Duration, SystemTime};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, Span, Tracer,
};
use opentelemetry_sdk::Resource;

use crate::config::OtlpSettings;

/// How many finished spans wait for export at most; more are dropped (and counted by
/// the SDK), so a collector that is away costs memory only up to this.
const QUEUE: usize = 4096;
/// How long one export may take before it is given up.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The exporter and the tracer of the gateway's request spans.
#[derive(Debug)]
pub struct Traces {
    provider: SdkTracerProvider,
    tracer: Tracer,
    propagator: TraceContextPropagator,
}

impl Traces {
    /// Starts the exporter (its thread); nothing is sent until a span ends.
    pub fn start(settings: &OtlpSettings) -> Result<Traces, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(settings.endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("tracing.otlp.endpoint `{}`: {e}", settings.endpoint))?;
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(QUEUE)
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                settings.sample_ratio,
            ))))
            .with_resource(
                Resource::builder()
                    .with_service_name("vllm-edge")
                    .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                    .build(),
            )
            .build();
        let tracer = provider.tracer("vllm-edge");
        Ok(Traces {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
        })
    }

    /// A request arrived: its span, continuing the caller's trace when it sent one.
    pub fn request(&self, header: &pingora::http::RequestHeader) -> RequestTrace {
        let parent = self.propagator.extract(&Headers(&header.headers));
        let span = self
            .tracer
            .span_builder(format!("{} {}", header.method, header.uri.path()))
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", header.method.to_string()),
                KeyValue::new("url.path", header.uri.path().to_string()),
            ])
            .start_with_context(&self.tracer, &parent);
        RequestTrace {
            span,
            attempt: None,
        }
    }

    /// Sends what is left in the queue (a graceful end).
    pub fn flush(&self) {
        let _ = self.provider.force_flush();
    }
}

/// The spans of one request.
#[derive(Debug)]
pub struct RequestTrace {
    span: Span,
    attempt: Option<Span>,
}

impl RequestTrace {
    /// An attempt at `backend` begins (the previous one, if any, has ended).
    pub fn attempt(&mut self, traces: &Traces, backend: &str, n: u32) {
        self.end_attempt(None);
        let parent = Context::new().with_remote_span_context(self.span.span_context().clone());
        let span = traces
            .tracer
            .span_builder(format!("attempt {n}"))
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("vllm_edge.backend", backend.to_string()),
                KeyValue::new("vllm_edge.attempt", i64::from(n)),
            ])
            .start_with_context(&traces.tracer, &parent);
        self.attempt = Some(span);
    }

    /// The `traceparent` (and `tracestate`) of the current attempt, for the request to
    /// the replica: vLLM's spans become its children.
    pub fn inject(&self, traces: &Traces, req: &mut pingora::http::RequestHeader) {
        let Some(a) = &self.attempt else { return };
        let cx = Context::new().with_remote_span_context(a.span_context().clone());
        let mut fields = Vec::new();
        traces
            .propagator
            .inject_context(&cx, &mut Fields(&mut fields));
        for (k, v) in fields {
            let _ = req.insert_header(k, v);
        }
    }

    /// The current attempt ended; `error` says how, when it failed.
    pub fn end_attempt(&mut self, error: Option<String>) {
        if let Some(mut a) = self.attempt.take() {
            if let Some(e) = error {
                a.set_status(Status::error(e));
            }
            a.end();
        }
    }

    /// The request ended: what the access line says of it, on its span.
    pub fn finish(mut self, end: Finished<'_>) {
        let attempt_error = (end.status >= 500 || end.error.is_some())
            .then(|| end.error.unwrap_or("failed").to_string());
        self.end_attempt(attempt_error);
        let s = &mut self.span;
        s.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(end.status),
        ));
        s.set_attribute(KeyValue::new("gen_ai.request.model", end.model.to_string()));
        s.set_attribute(KeyValue::new("vllm_edge.key", end.key.to_string()));
        s.set_attribute(KeyValue::new("vllm_edge.backend", end.backend.to_string()));
        s.set_attribute(KeyValue::new("vllm_edge.attempts", i64::from(end.attempts)));
        s.set_attribute(KeyValue::new("vllm_edge.stream", end.stream));
        if let Some(q) = end.queued {
            s.set_attribute(KeyValue::new("vllm_edge.queue_seconds", q.as_secs_f64()));
        }
        if let Some(t) = end.first_byte {
            s.set_attribute(KeyValue::new("vllm_edge.ttfb_seconds", t.as_secs_f64()));
        }
        if let Some((prompt, completion)) = end.tokens {
            s.set_attribute(KeyValue::new("gen_ai.usage.input_tokens", prompt as i64));
            s.set_attribute(KeyValue::new(
                "gen_ai.usage.output_tokens",
                completion as i64,
            ));
        }
        if end.status >= 500 {
            s.set_status(Status::error(end.error.unwrap_or("").to_string()));
        }
        s.end_with_timestamp(SystemTime::now());
    }
}

/// What is known of a request at its end.
pub struct Finished<'a> {
    pub status: u16,
    pub model: &'a str,
    pub key: &'a str,
    pub backend: &'a str,
    pub attempts: u32,
    pub stream: bool,
    pub queued: Option<Duration>,
    pub first_byte: Option<Duration>,
    pub tokens: Option<(u64, u64)>,
    pub error: Option<&'a str>,
}

/// A request's headers, read by the propagator.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The fields the propagator writes.
struct Fields<'a>(&'a mut Vec<(String, String)>);

impl Injector for Fields<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_string(), value));
    }
}
