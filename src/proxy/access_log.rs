//! The access log: one line per request, in the shape of the rest of the log (text, or
//! with `log.format: json` one JSON object with the fields at the top level), target
//! `access`, and subject to the same filter (`VLLM_EDGE_LOG=info,access=off` turns it off).
//!
//! Written here rather than through `tracing`'s formatter, which spent about 6 µs of CPU per
//! request on this line (its visitor per field, its timestamp): at 20k requests a second
//! on one core that was a tenth of the gateway's throughput (`benches/results/HISTORY.md`, "What
//! the access log costs"). The line is built in a buffer the thread keeps and written to
//! stderr with one `write`, as `tracing`'s own lines are.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::LogFormat;

/// What one access line says (docs/observability.md, "Access log").
#[derive(Debug, Clone)]
pub struct Line<'a> {
    pub request_id: &'a str,
    pub client: Option<IpAddr>,
    pub method: &'a str,
    pub path: &'a str,
    pub model: &'a str,
    pub stream: bool,
    pub backend: &'a str,
    pub chosen_by: &'a str,
    pub score_ms: Option<f64>,
    pub key: &'a str,
    pub status: u16,
    pub attempts: u32,
    /// Time waited in the gateway's queue (flow control), when it waited there.
    pub queued_ms: Option<f64>,
    pub ttfb_ms: Option<f64>,
    pub duration_ms: f64,
    pub bytes_in: usize,
    pub bytes_out: u64,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub stream_error_event: bool,
    pub error: &'a str,
}

/// Whether access lines are wanted now (the log filter's verdict for target `access`).
pub fn enabled() -> bool {
    tracing::enabled!(target: "access", tracing::Level::INFO)
}

thread_local! {
    static BUF: RefCell<String> = RefCell::new(String::with_capacity(512));
}

/// Writes `line` to stderr in `format`.
pub fn write(line: &Line, format: LogFormat) {
    BUF.with(|b| {
        let mut b = b.borrow_mut();
        b.clear();
        format_line(&mut b, line, format, SystemTime::now());
        // One write, as `tracing`'s own lines: lines from several threads never mix.
        let _ = std::io::stderr().lock().write_all(b.as_bytes());
    });
}

/// A field's value, in the text shape (`tracing`'s: strings quoted as Rust debug-prints
/// them, numbers and booleans bare) or as JSON.
enum Value<'a> {
    Str(&'a str),
    /// Text that needs no escaping (an IP address), quoted like a string.
    Quoted(&'a dyn std::fmt::Display),
    /// A token (the HTTP method): bare in the text shape, a string in JSON.
    Token(&'a str),
    Bare(&'a dyn std::fmt::Display),
    F64(f64),
}

fn format_line(out: &mut String, l: &Line, format: LogFormat, now: SystemTime) {
    let json = format == LogFormat::Json;
    if json {
        out.push_str("{\"timestamp\":\"");
        rfc3339_micros(out, now);
        out.push_str("\",\"level\":\"INFO\"");
    } else {
        rfc3339_micros(out, now);
        out.push_str("  INFO access:");
    }
    let client = match &l.client {
        Some(ip) => Value::Quoted(ip),
        None => Value::Str("-"),
    };
    let fields: [(&str, Option<Value>); 21] = [
        ("request_id", Some(Value::Str(l.request_id))),
        ("client", Some(client)),
        ("method", Some(Value::Token(l.method))),
        ("path", Some(Value::Str(l.path))),
        ("model", Some(Value::Str(l.model))),
        ("stream", Some(Value::Bare(&l.stream))),
        ("backend", Some(Value::Str(l.backend))),
        ("chosen_by", Some(Value::Str(l.chosen_by))),
        ("score_ms", l.score_ms.map(Value::F64)),
        ("key", Some(Value::Str(l.key))),
        ("status", Some(Value::Bare(&l.status))),
        ("attempts", Some(Value::Bare(&l.attempts))),
        ("queued_ms", l.queued_ms.map(Value::F64)),
        ("ttfb_ms", l.ttfb_ms.map(Value::F64)),
        ("duration_ms", Some(Value::F64(l.duration_ms))),
        ("bytes_in", Some(Value::Bare(&l.bytes_in))),
        ("bytes_out", Some(Value::Bare(&l.bytes_out))),
        (
            "prompt_tokens",
            l.prompt_tokens.as_ref().map(|n| Value::Bare(n)),
        ),
        (
            "completion_tokens",
            l.completion_tokens.as_ref().map(|n| Value::Bare(n)),
        ),
        (
            "stream_error_event",
            Some(Value::Bare(&l.stream_error_event)),
        ),
        ("error", Some(Value::Str(l.error))),
    ];
    for (name, value) in fields {
        // An absent value is left out, as `tracing` leaves out a `None`.
        let Some(value) = value else { continue };
        if json {
            let _ = write!(out, ",\"{name}\":");
            match value {
                Value::Str(s) => json_string(out, s),
                Value::Quoted(v) => {
                    let _ = write!(out, "\"{v}\"");
                }
                Value::Token(t) => json_string(out, t),
                Value::Bare(v) => {
                    let _ = write!(out, "{v}");
                }
                Value::F64(v) => json_f64(out, v),
            }
        } else {
            let _ = write!(out, " {name}=");
            let _ = match value {
                Value::Str(s) if plain(s) => {
                    out.push('"');
                    out.push_str(s);
                    out.push('"');
                    Ok(())
                }
                Value::Str(s) => write!(out, "{s:?}"),
                Value::Quoted(v) => write!(out, "\"{v}\""),
                Value::Token(t) => {
                    out.push_str(t);
                    Ok(())
                }
                Value::Bare(v) => write!(out, "{v}"),
                Value::F64(v) => write!(out, "{v:?}"),
            };
        }
    }
    if json {
        out.push_str(",\"target\":\"access\"}\n");
    } else {
        out.push('\n');
    }
}

/// Printable ASCII but `"` and `\`: quoted as it is, in either shape (most values).
fn plain(s: &str) -> bool {
    s.bytes()
        .all(|c| (0x20..0x7f).contains(&c) && c != b'"' && c != b'\\')
}

fn json_string(out: &mut String, s: &str) {
    // serde_json's escaping, which the rest of the JSON log uses; most values need none.
    if plain(s) {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(s).expect("a string serializes"));
    }
}

fn json_f64(out: &mut String, v: f64) {
    match serde_json::Number::from_f64(v) {
        Some(n) => {
            let _ = write!(out, "{n}");
        }
        None => out.push_str("null"),
    }
}

/// `2026-11-22T09:52:37.608343Z`: UTC, microseconds, as `tracing`'s timestamps.
fn rfc3339_micros(out: &mut String, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn line() -> Line<'static> {
        Line {
            request_id: "7f3e9c2a-checkout",
            client: Some("10.0.3.17".parse().unwrap()),
            method: "POST",
            path: "/v1/chat/completions",
            model: "sim \"llama\"\n",
            stream: true,
            backend: "gpu-0",
            chosen_by: "only_candidate",
            score_ms: Some(23.3),
            key: "-",
            status: 200,
            attempts: 1,
            queued_ms: None,
            ttfb_ms: Some(19.85),
            duration_ms: 110.0,
            bytes_in: 138,
            bytes_out: 3743,
            prompt_tokens: Some(21),
            completion_tokens: None,
            stream_error_event: false,
            error: "",
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let mut s = String::new();
        let t = UNIX_EPOCH + Duration::new(1_795_305_600 + 3_723, 608_343_999);
        rfc3339_micros(&mut s, t);
        assert_eq!(s, "2026-11-22T01:02:03.608343Z");
        for (secs, want) in [
            (0, "1970-01-01T00:00:00.000000Z"),
            (951_782_400, "2000-02-29T00:00:00.000000Z"),
            (4_107_542_399, "2100-02-28T23:59:59.000000Z"),
        ] {
            s.clear();
            rfc3339_micros(&mut s, UNIX_EPOCH + Duration::from_secs(secs));
            assert_eq!(s, want);
        }
    }

    #[test]
    fn the_text_line_has_tracings_shape() {
        let mut s = String::new();
        let t = UNIX_EPOCH + Duration::from_secs(1_795_305_600);
        format_line(&mut s, &line(), LogFormat::Text, t);
        assert_eq!(
            s,
            "2026-11-22T00:00:00.000000Z  INFO access: request_id=\"7f3e9c2a-checkout\" \
             client=\"10.0.3.17\" method=POST path=\"/v1/chat/completions\" \
             model=\"sim \\\"llama\\\"\\n\" stream=true backend=\"gpu-0\" \
             chosen_by=\"only_candidate\" score_ms=23.3 key=\"-\" status=200 attempts=1 \
             ttfb_ms=19.85 duration_ms=110.0 bytes_in=138 bytes_out=3743 prompt_tokens=21 \
             stream_error_event=false error=\"\"\n"
        );
    }

    #[test]
    fn the_json_line_is_one_object_with_the_fields_at_the_top() {
        let mut s = String::new();
        format_line(&mut s, &line(), LogFormat::Json, SystemTime::now());
        assert!(s.ends_with('\n') && s.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "access");
        assert_eq!(v["method"], "POST");
        assert_eq!(v["model"], "sim \"llama\"\n");
        assert_eq!(v["stream"], true);
        assert_eq!(v["status"], 200);
        assert_eq!(v["score_ms"], 23.3);
        assert_eq!(v["duration_ms"], 110.0);
        assert_eq!(v["prompt_tokens"], 21);
        assert!(
            v.get("completion_tokens").is_none(),
            "absent, not null: {v}"
        );
        assert_eq!(v["error"], "");
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        assert_eq!(keys.len(), 22, "{keys:?}");
    }
}
