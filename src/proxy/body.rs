//! Reading a whole request body before choosing the upstream, in a way Pingora 0.9.1 can
//! forward byte-exactly on the first attempt and on every retry.
//!
//! Pingora forwards a body that was already read only from its retry buffer, which holds
//! at most 64 KiB (`BODY_BUF_LIMIT`); past that it is marked truncated and nothing is sent.
//! So we keep the full body ourselves and turn the retry buffer on only once at most
//! 64 KiB remain to be read: the buffer then ends up holding exactly the tail, Pingora
//! calls `request_body_filter` once per attempt with that tail and `end_of_stream`, and the
//! filter substitutes the full body (docs/architecture.md tells why).
//!
//! A body without a length (HTTP/1.1 chunked, HTTP/2 without `content-length`) can only be
//! buffered from its first byte, so it is accepted up to 64 KiB and answered 411 above.

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;
use std::time::{Duration, Instant};

use crate::openai::ApiError;

/// Pingora's fixed retry-buffer size (`BODY_BUF_LIMIT` in pingora-core 0.9.1).
pub const RETRY_BUFFER_LIMIT: usize = 64 * 1024;

#[derive(Debug)]
pub enum BodyError {
    /// Answer the client with this error (the connection stays open only if the body was
    /// read in full).
    Reply(ApiError),
    /// The body's framing is broken (a malformed or repeated `Content-Length`, invalid
    /// chunked encoding): answer with this error and close the connection, since where
    /// this request ends and the next begins cannot be told (RFC 9112 §6.3).
    Framing(ApiError),
    /// The client went away or broke the protocol; there is nobody to answer.
    ClientGone(Box<pingora::Error>),
}

/// How long a body may take: `timeout`, plus a second per `min_rate` bytes received so
/// far; and no piece may come more than `timeout` after the one before. A body that keeps
/// coming at `min_rate` or faster is never cut (a large upload over a slow link), one
/// trickled to hold the connection is (a byte every few seconds gains milliseconds).
#[derive(Debug, Clone, Copy)]
pub struct BodyPace {
    pub timeout: Duration,
    /// Bytes a second.
    pub min_rate: usize,
}

impl BodyPace {
    pub fn of(limits: &crate::config::ClientLimits) -> BodyPace {
        BodyPace {
            timeout: limits.body_read_timeout,
            min_rate: limits.body_min_rate,
        }
    }

    /// When the next piece must have come by, for a body started at `started` with
    /// `received` bytes so far, asked at `now`.
    pub fn deadline(&self, started: Instant, received: usize, now: Instant) -> Instant {
        let earned = Duration::from_secs_f64(received as f64 / self.min_rate.max(1) as f64);
        (started + self.timeout + earned).min(now + self.timeout)
    }
}

/// Reads the whole body of the request, at most `max_bytes`, at the `pace`.
pub async fn read_full_body(
    session: &mut Session,
    max_bytes: usize,
    pace: BodyPace,
) -> Result<Bytes, BodyError> {
    let declared = content_length(session)?;
    if let Some(n) = declared {
        if n > max_bytes {
            return Err(BodyError::Reply(ApiError::body_too_large(max_bytes)));
        }
    }
    if expects_continue(session) {
        // Pingora only answers `Expect: 100-continue` itself when it reads the body; we
        // read early, so a strict client would wait for this.
        session
            .write_continue_response()
            .await
            .map_err(BodyError::ClientGone)?;
    }
    if declared.is_none_or(|n| n <= RETRY_BUFFER_LIMIT) {
        session.enable_retry_buffering();
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(8 * 1024).min(max_bytes));
    let started = Instant::now();
    let read_all = async {
        loop {
            if let Some(n) = declared {
                if n.saturating_sub(body.len()) <= RETRY_BUFFER_LIMIT {
                    session.enable_retry_buffering();
                }
            }
            // HTTP/2 body reads have no timeout of their own in Pingora 0.9.1.
            let by = pace.deadline(started, body.len(), Instant::now());
            let piece = tokio::time::timeout_at(by.into(), session.read_request_body()).await;
            let Ok(piece) = piece else {
                return Err(BodyError::Reply(ApiError::body_timeout()));
            };
            match piece {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > max_bytes {
                        return Err(BodyError::Reply(ApiError::body_too_large(max_bytes)));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(()),
                // Pingora's names for a chunked body it cannot parse (`v1/body.rs`).
                Err(e) if matches!(e.etype().as_str(), "InvalidChunk" | "InvalidTrailerEnd") => {
                    return Err(BodyError::Framing(ApiError::bad_request(
                        "The request body's chunked encoding is invalid.",
                        None,
                    )))
                }
                Err(e) => return Err(BodyError::ClientGone(e)),
            }
        }
    };
    read_all.await?;
    let body = body.freeze();
    if body.is_empty() {
        return Ok(body);
    }
    // The replay depends on the retry buffer holding exactly the tail of what we read.
    match session.get_retry_buffer() {
        Some(tail) if !tail.is_empty() && body.ends_with(&tail) => Ok(body),
        _ if declared.is_none() => Err(BodyError::Reply(ApiError::length_required(
            RETRY_BUFFER_LIMIT,
        ))),
        _ => {
            tracing::error!(
                len = body.len(),
                "request body could not be kept for replay; refusing rather than forwarding a \
                 truncated body"
            );
            Err(BodyError::Reply(ApiError::new(
                500,
                "InternalServerError",
                "The gateway could not buffer the request body for forwarding.",
            )))
        }
    }
}

/// The declared body length, if any. Conflicting or malformed values are a client error.
fn content_length(session: &Session) -> Result<Option<usize>, BodyError> {
    let mut values = session
        .req_header()
        .headers
        .get_all(http::header::CONTENT_LENGTH)
        .iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    let bad = || {
        BodyError::Framing(ApiError::bad_request(
            "The Content-Length header is malformed or repeated.",
            None,
        ))
    };
    if values.next().is_some() {
        return Err(bad());
    }
    let n = first
        .to_str()
        .ok()
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<usize>().ok())
        .ok_or_else(bad)?;
    Ok(Some(n))
}

/// Refuses a `Transfer-Encoding` other than a plain `chunked`: a coding the gateway
/// cannot decode is 501 (RFC 9112 §6.1; `gzip, chunked` would otherwise reach the replica
/// still compressed), a malformed list is 400. Both close the connection.
pub fn transfer_coding(headers: &http::HeaderMap) -> Result<(), BodyError> {
    let mut values = headers.get_all(http::header::TRANSFER_ENCODING).iter();
    let Some(first) = values.next() else {
        return Ok(());
    };
    let single = values.next().is_none();
    let codings: Vec<&[u8]> = first
        .as_bytes()
        .split(|&b| b == b',')
        .map(|c| c.trim_ascii())
        .collect();
    if single && codings.len() == 1 && codings[0].eq_ignore_ascii_case(b"chunked") {
        return Ok(());
    }
    let known = |c: &&[u8]| !c.is_empty() && c.iter().all(|b| b.is_ascii_graphic());
    if !single || !codings.iter().all(known) {
        return Err(BodyError::Framing(ApiError::bad_request(
            "The Transfer-Encoding header is malformed or repeated.",
            None,
        )));
    }
    let listed = String::from_utf8_lossy(first.as_bytes()).into_owned();
    Err(BodyError::Framing(ApiError::new(
        501,
        "NotImplementedError",
        format!(
            "Transfer-Encoding `{listed}` is not supported: request bodies may only be sent \
             with a Content-Length or as plain `chunked`."
        ),
    )))
}

fn expects_continue(session: &Session) -> bool {
    session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}
