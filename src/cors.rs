//! Requests from web pages of other origins (`cors:` in the config).
//!
//! Uses nothing of the crate (a leaf: the config holds its types).
//!
//! vLLM's own server lets any origin call it by default. A page that called vLLM directly
//! and now calls the gateway sends its preflight (`OPTIONS` with `Origin` and
//! `Access-Control-Request-Method`, and never an API key) to the gateway, which answers it
//! itself for the origins in `cors.allowed_origins`, and marks every answer to those
//! origins, its own errors included, so the page can read it. With `cors:` set, the
//! gateway decides alone: the replicas' own `Access-Control-*` headers are dropped.
//! Without it, nothing is added or dropped.

use http::header::{HeaderMap, HeaderValue, ORIGIN};
use http::Method;

/// How long a browser may reuse a preflight's answer (seconds).
pub const MAX_AGE: &str = "600";

/// Answer headers a page's script may read besides the always-readable ones.
pub const EXPOSED: &str = "x-request-id, x-vllm-edge-backend, retry-after";

/// A replica's own CORS headers, dropped from its answers when the gateway decides.
pub const REPLICA_HEADERS: &[&str] = &[
    "access-control-allow-origin",
    "access-control-allow-credentials",
    "access-control-expose-headers",
    "access-control-allow-methods",
    "access-control-allow-headers",
    "access-control-max-age",
];

/// The origins allowed to call the gateway (`cors.allowed_origins`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cors {
    any: bool,
    /// Lowercase, as browsers send them.
    origins: Vec<String>,
}

/// What CORS means for one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Verdict {
    /// No `cors:` in the config: answers are left as they are.
    #[default]
    Off,
    /// Configured, and the request has no `Origin` or one not allowed: no CORS headers.
    NotAllowed,
    /// The `Access-Control-Allow-Origin` value for this request's answers.
    Allowed(HeaderValue),
}

impl Cors {
    /// From the configured list: `*`, or origins such as `https://app.example.com` and
    /// `http://localhost:3000`. An entry that is neither is refused, with its index.
    pub fn new(list: &[String]) -> Result<Cors, (usize, String)> {
        let mut origins = Vec::with_capacity(list.len());
        let mut any = false;
        for (i, o) in list.iter().enumerate() {
            let lower = o.to_ascii_lowercase();
            if lower == "*" {
                any = true;
            } else if is_origin(&lower) {
                origins.push(lower);
            } else {
                return Err((
                    i,
                    format!(
                        "`{o}` is not an origin: `*`, or scheme://host[:port] with no path \
                         (e.g. https://app.example.com)"
                    ),
                ));
            }
        }
        Ok(Cors { any, origins })
    }

    /// The verdict for a request with these headers.
    pub fn verdict(&self, headers: &HeaderMap) -> Verdict {
        let Some(origin) = headers.get(ORIGIN) else {
            return Verdict::NotAllowed;
        };
        if self.any {
            return Verdict::Allowed(HeaderValue::from_static("*"));
        }
        let allowed = self
            .origins
            .iter()
            .any(|o| o.as_bytes().eq_ignore_ascii_case(origin.as_bytes()));
        if allowed {
            Verdict::Allowed(origin.clone())
        } else {
            Verdict::NotAllowed
        }
    }
}

impl Verdict {
    /// The headers that go on an answer (empty unless allowed).
    pub fn headers(&self) -> Vec<(&'static str, &str)> {
        match self {
            Verdict::Allowed(v) => vec![
                ("access-control-allow-origin", v.to_str().unwrap_or("null")),
                ("access-control-expose-headers", EXPOSED),
                ("vary", "origin"),
            ],
            _ => Vec::new(),
        }
    }
}

/// The method a preflight asks about: `Some` for an `OPTIONS` request with `Origin` and
/// `Access-Control-Request-Method`, which is the browser asking, not the page.
pub fn preflight_method(method: &Method, headers: &HeaderMap) -> Option<Method> {
    if method != Method::OPTIONS || !headers.contains_key(ORIGIN) {
        return None;
    }
    let asked = headers.get("access-control-request-method")?;
    Method::from_bytes(asked.as_bytes()).ok()
}

/// Whether `s` is an origin as a browser serializes it: `http` or `https`, `://`, a host
/// (name, IPv4, or bracketed IPv6) and an optional port; nothing after.
fn is_origin(s: &str) -> bool {
    let Some(rest) = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
    else {
        return false;
    };
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && (!h.contains(':') || h.ends_with(']')) => (h, Some(p)),
        _ => (rest, None),
    };
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.parse::<u16>().is_ok());
    host_ok && port_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn origins_are_checked_when_loaded() {
        for ok in [
            "https://app.example.com",
            "http://localhost:3000",
            "http://127.0.0.1:8080",
            "https://[::1]:8443",
            "HTTPS://App.Example.com",
        ] {
            assert!(Cors::new(&[ok.to_string()]).is_ok(), "{ok}");
        }
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://app.example.com/path",
            "ftp://x",
            "https://",
            "https://host:",
            "https://host:99999",
            "https://[::1",
            "https://*.example.com",
        ] {
            let e = Cors::new(&["*".into(), bad.to_string()]).unwrap_err();
            assert_eq!(e.0, 1, "{bad}");
            assert!(e.1.contains(bad), "{bad}: {}", e.1);
        }
    }

    #[test]
    fn only_listed_origins_are_allowed_and_echoed() {
        let cors = Cors::new(&["https://app.example.com".into()]).unwrap();
        let v = cors.verdict(&headers(&[("origin", "https://app.example.com")]));
        assert_eq!(
            v,
            Verdict::Allowed(HeaderValue::from_static("https://app.example.com"))
        );
        assert_eq!(
            v.headers()[0],
            ("access-control-allow-origin", "https://app.example.com")
        );
        for other in ["https://evil.example.com", "http://app.example.com", "null"] {
            let v = cors.verdict(&headers(&[("origin", other)]));
            assert_eq!(v, Verdict::NotAllowed, "{other}");
            assert!(v.headers().is_empty());
        }
        assert_eq!(cors.verdict(&HeaderMap::new()), Verdict::NotAllowed);
        let any = Cors::new(&["*".into()]).unwrap();
        assert_eq!(
            any.verdict(&headers(&[("origin", "https://x.example")])),
            Verdict::Allowed(HeaderValue::from_static("*"))
        );
    }

    #[test]
    fn a_preflight_is_options_with_origin_and_a_requested_method() {
        let full = headers(&[
            ("origin", "https://app.example.com"),
            ("access-control-request-method", "POST"),
        ]);
        assert_eq!(
            preflight_method(&Method::OPTIONS, &full),
            Some(Method::POST)
        );
        assert_eq!(preflight_method(&Method::POST, &full), None);
        let no_origin = headers(&[("access-control-request-method", "POST")]);
        assert_eq!(preflight_method(&Method::OPTIONS, &no_origin), None);
        let no_method = headers(&[("origin", "https://app.example.com")]);
        assert_eq!(preflight_method(&Method::OPTIONS, &no_method), None);
    }
}
