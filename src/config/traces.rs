//! The `tracing:` section: request spans to an OpenTelemetry collector.

use super::defaults;
use super::error::ConfigError;
use super::file::FileTracing;
use super::parse::Check;
use super::OtlpSettings;

/// `tracing.otlp`: a collector's OTLP/HTTP URL (its path `/v1/traces` when it has none)
/// and the share of new traces sampled.
pub(super) fn otlp(c: &Check, t: &FileTracing) -> Result<Option<OtlpSettings>, ConfigError> {
    let Some(o) = &t.otlp else {
        return Ok(None);
    };
    let Some(endpoint) = &o.endpoint else {
        return Err(c.invalid(
            "tracing.otlp",
            "`endpoint` is missing: the collector's OTLP/HTTP URL, e.g. \
             `endpoint: http://otel-collector:4318`",
        ));
    };
    let uri: http::Uri = endpoint.parse().map_err(|e| {
        c.invalid(
            "tracing.otlp.endpoint",
            format!("`{endpoint}` is not a URL: {e}"),
        )
    })?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(c.invalid(
            "tracing.otlp.endpoint",
            format!(
                "`{endpoint}` must be an http:// or https:// URL with a host (OTLP over \
                 HTTP, port 4318 by convention)"
            ),
        ));
    }
    let endpoint = match uri.path() {
        "" | "/" => format!("{}/v1/traces", endpoint.trim_end_matches('/')),
        _ => endpoint.clone(),
    };
    let sample_ratio = o.sample_ratio.unwrap_or(defaults::OTLP_SAMPLE_RATIO);
    if !(0.0..=1.0).contains(&sample_ratio) {
        return Err(c.invalid(
            "tracing.otlp.sample_ratio",
            format!("must be between 0 and 1 (the share of new traces kept), not {sample_ratio}"),
        ));
    }
    Ok(Some(OtlpSettings {
        endpoint,
        sample_ratio,
    }))
}
