//! The tokens a response used, read from its end as it passes.

use serde::Deserialize;

/// Token counts from a response's `usage` object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

/// How much of a response's end is searched for its `usage`: vLLM writes it last (the
/// final stream event before `[DONE]`, or near the end of the JSON object), followed by a
/// few hundred bytes at most.
const USAGE_TAIL_BYTES: usize = 1024;

/// The last bytes of a response body, from which its `usage` is read at the end. Kept
/// as the response passes, so the body is never buffered whole.
///
/// Chunks are appended, and the buffer is cut back to its last [`USAGE_TAIL_BYTES`] only
/// when it would grow past twice that: a stream's ~250-byte events then cost a copy of
/// themselves and, once per ~1 KiB of them, one move of the kept tail, instead of a move
/// of the whole tail per event (with a thousand streams open, each tail is cold in the
/// cache when its next event comes: that move was 2% of the gateway's CPU per event).
#[derive(Debug, Default)]
pub struct UsageTail {
    buf: Vec<u8>,
}

impl UsageTail {
    pub fn push(&mut self, chunk: &[u8]) {
        if chunk.len() >= USAGE_TAIL_BYTES {
            self.buf.clear();
            self.buf
                .extend_from_slice(&chunk[chunk.len() - USAGE_TAIL_BYTES..]);
            return;
        }
        if self.buf.len() + chunk.len() > 2 * USAGE_TAIL_BYTES {
            self.buf.drain(..self.buf.len() - USAGE_TAIL_BYTES);
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(2 * USAGE_TAIL_BYTES);
        }
        self.buf.extend_from_slice(chunk);
    }

    /// The last `"usage": {...}` object in the tail. Inside JSON strings a quote is
    /// always escaped, so generated text cannot fake the key.
    pub fn usage(&self) -> Option<Usage> {
        const KEY: &[u8] = b"\"usage\"";
        let buf = &self.buf[self.buf.len().saturating_sub(USAGE_TAIL_BYTES)..];
        let mut end = buf.len();
        while let Some(at) = buf[..end].windows(KEY.len()).rposition(|w| w == KEY) {
            end = at;
            let rest = &buf[at + KEY.len()..];
            let Some(colon) = rest.iter().position(|b| !b.is_ascii_whitespace()) else {
                continue;
            };
            if rest[colon] != b':' {
                continue;
            }
            let mut values = serde_json::Deserializer::from_slice(&rest[colon + 1..])
                .into_iter::<Option<Usage>>();
            if let Some(Ok(Some(u))) = values.next() {
                return Some(u);
            }
        }
        None
    }
}
