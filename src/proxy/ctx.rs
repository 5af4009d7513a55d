//! A request's state across all its attempts ([`RequestCtx`]), and its id.

use bytes::Bytes;
use http::HeaderValue;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::deadline::Attempt;
use super::Traffic;
use crate::auth::Permit;
use crate::cors;
use crate::fleet::{Backend, InFlightGuard};
use crate::openai::{ApiError, Route, RoutingInfo, UsageTail};
use crate::routing::affinity::AffinityKey;
use crate::routing::Reason;

/// The header that carries a request's id: taken from the client when it sends a usable
/// one, generated otherwise; forwarded to the backend (vLLM builds its own request id on
/// it) and returned to the client.
pub(super) const REQUEST_ID: &str = "x-request-id";
/// A client's request id longer than this is replaced (it ends up in every log line).
const MAX_REQUEST_ID_LEN: usize = 128;

/// The client's `x-request-id` if it is short and plain (visible ASCII), else a new one:
/// 32 random hex digits. Kept as a header value: it is sent upstream and back to the
/// client, and a clone shares its bytes.
pub(super) fn request_id(header: &pingora::http::RequestHeader) -> HeaderValue {
    if let Some(v) = header.headers.get(REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= MAX_REQUEST_ID_LEN && b.iter().all(|c| c.is_ascii_graphic())
        {
            return v.clone();
        }
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = rand::random::<u128>();
    let mut id = [0u8; 32];
    for d in id.iter_mut().rev() {
        *d = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    HeaderValue::from_bytes(&id).expect("hex digits are a valid header value")
}

/// Counts one request in [`Traffic::active_requests`] while it lives.
struct Active(Arc<Traffic>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Per-request state; one lives across all attempts of a request.
pub struct RequestCtx {
    _active: Active,
    pub(super) started: Instant,
    pub(super) route: Route,
    /// The full request body: the replay source for every attempt, dropped (with
    /// `tokens`) once the answer's first body byte is relayed, when no attempt can follow.
    pub(super) body: Option<Bytes>,
    /// The request body's length as sent to replicas.
    pub(super) bytes_in: usize,
    pub(super) info: Option<RoutingInfo>,
    /// The request's prefix-affinity key, when the policy uses affinity.
    pub(super) affinity: Option<AffinityKey>,
    /// Its token ids, when its model has a tokenizer (exact prefix routing).
    pub(super) tokens: Option<std::sync::Arc<crate::routing::prefix::PromptTokens>>,
    /// Backends that failed this request, not to be picked again.
    pub(super) tried: Vec<Arc<Backend>>,
    /// Counts the current attempt's in-flight request on its backend.
    pub(super) in_flight: Option<InFlightGuard>,
    /// Enforces the current attempt's deadlines.
    pub(super) deadlines: Option<Attempt>,
    /// The current attempt's first body byte arrived.
    pub(super) got_body: bool,
    /// The response being relayed is an event stream (for the mid-stream error event).
    pub(super) sse: bool,
    pub(super) attempts: u32,
    pub(super) stale_retries: u32,
    /// The error to answer with if the request fails before any response byte.
    pub(super) error: Option<ApiError>,
    /// Why the gateway answered this request with an error of its own (for the access
    /// line), and the name of the key it was refused for when the key is known (a limit).
    pub(super) refused: Option<String>,
    pub(super) refused_key: Option<String>,
    /// The last attempt ended by one of its deadlines.
    pub(super) timed_out: bool,
    /// A stream was ended with an error event.
    pub(super) stream_error_sent: bool,
    pub(super) status: u16,
    /// The client's API key (when keys are required): its name, and its concurrency slot.
    pub(super) key: Option<Permit>,
    /// With `auth.shared`: the request's key, to be counted once its prompt is known.
    pub(super) pending_key: Option<crate::auth::Identified>,
    /// Its spans, when requests are traced (boxed: over 500 bytes that every open stream
    /// would carry, traced or not).
    pub(super) trace: Option<Box<super::trace::RequestTrace>>,
    /// Visible ASCII (see [`request_id`]).
    pub(super) request_id: HeaderValue,
    /// Whether, and how, its answers are marked for a web page of another origin.
    pub(super) cors: cors::Verdict,
    /// Why the current attempt's backend was picked, and its `vllm` score in seconds.
    pub(super) chosen_by: Option<(Reason, Option<f64>)>,
    /// When the first body byte of the answer arrived, since `started`.
    pub(super) first_byte: Option<Duration>,
    /// Body bytes relayed from the backend to the client.
    pub(super) bytes_out: u64,
    /// The end of a response that reports `usage`, to count its tokens.
    pub(super) usage_tail: Option<UsageTail>,
    /// Stream events relayed, counted only for a key with a `tpm` limit: what a stream that
    /// reports no usage (or was cut before it) is charged.
    pub(super) sse_events: u64,
    /// Prompt tokens taken from the key's `tpm` balance before sending (see `Permit::reserve`).
    pub(super) tokens_reserved: u64,
    /// Its class when the fleet is full (`flow`).
    pub(super) class: crate::auth::Priority,
    /// How long it waited in the gateway's queue, when it did.
    pub(super) queued: Option<Duration>,
    /// The slot the queue let it go to, held until it is in flight at a replica.
    pub(super) grant: Option<crate::flow::Grant>,
}

impl RequestCtx {
    /// A request's state, counted in `traffic` while it lives.
    pub(super) fn new(traffic: Arc<Traffic>) -> RequestCtx {
        traffic.active.fetch_add(1, Ordering::Relaxed);
        RequestCtx {
            _active: Active(traffic),
            started: Instant::now(),
            route: Route::NotFound,
            body: None,
            bytes_in: 0,
            info: None,
            affinity: None,
            tokens: None,
            tried: Vec::new(),
            in_flight: None,
            deadlines: None,
            got_body: false,
            sse: false,
            attempts: 0,
            stale_retries: 0,
            error: None,
            refused: None,
            refused_key: None,
            timed_out: false,
            stream_error_sent: false,
            status: 0,
            key: None,
            request_id: HeaderValue::from_static(""),
            cors: cors::Verdict::Off,
            chosen_by: None,
            first_byte: None,
            bytes_out: 0,
            usage_tail: None,
            pending_key: None,
            trace: None,
            sse_events: 0,
            tokens_reserved: 0,
            class: crate::auth::Priority::Normal,
            queued: None,
            grant: None,
        }
    }

    pub(super) fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or("-")
    }

    pub(super) fn backend_name(&self) -> &str {
        self.in_flight
            .as_ref()
            .map_or("-", |g| g.backend().name.as_str())
    }

    /// The name of its key (admitted, or the one a limit refused), `-` without one.
    pub(super) fn key_name(&self) -> &str {
        self.key
            .as_ref()
            .map(|k| &*k.key)
            .or(self.refused_key.as_deref())
            .unwrap_or("-")
    }
}

impl RequestCtx {
    /// Whether a successor is taking the listening sockets over (answers then close).
    pub(super) fn handing_over(&self) -> bool {
        self._active.0.handing_over()
    }

    /// The process's traffic this request counts in.
    pub(super) fn traffic(&self) -> &Traffic {
        &self._active.0
    }
}

#[cfg(test)]
mod tests {
    /// A request's context lives in Pingora's connection future for as long as the
    /// request's stream is open: its size is paid by every open stream (it was 1,392
    /// bytes before the trace was boxed).
    #[test]
    fn the_context_stays_small() {
        let size = std::mem::size_of::<super::RequestCtx>();
        assert!(size <= 900, "RequestCtx is {size} bytes");
    }
}
