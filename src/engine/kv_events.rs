//! vLLM's KV-cache events on the wire (`vllm/distributed/kv_events.py`, vLLM 0.32): each
//! ZMQ message is three frames, `[topic, sequence (8 bytes, big-endian), payload]`; the
//! payload is a msgpack `EventBatch`, an array `[ts, [events...], data_parallel_rank]`,
//! and each event a map tagged by `type`:
//! - `BlockStored {block_hashes, parent_block_hash, token_ids, block_size, lora_id,
//!   lora_name, medium, extra_keys, group_idx, kv_cache_spec_kind, ...}`: full blocks
//!   newly cached, as a chain continuing `parent_block_hash` (null: from the start);
//! - `BlockRemoved {block_hashes, medium, group_idx}`: evicted;
//! - `AllBlocksCleared {}`: the cache was reset.
//!
//! A replay (the publisher's ROUTER socket) answers `["", sequence]` with the buffered
//! messages from that sequence on, as `["", topic, sequence, payload]`, then
//! `["", "", -1, ""]` (vLLM 0.32; later versions leave the topic out).
//!
//! Block hashes are integers (64-bit with `--prefix-caching-hash-algo sha256_cbor`) or
//! bytes (other algorithms); both are folded to a `u64` here. Fields this gateway does
//! not use are ignored, and unknown event types are skipped, so a newer vLLM that adds
//! some still decodes. The encoder is the simulator's publisher.

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

/// A payload larger than this is not a batch of events (vLLM's are a few KiB; one
/// carrying a 32k-token prompt's blocks about 150 KiB).
pub const MAX_PAYLOAD: usize = 8 * 1024 * 1024;
/// The sequence number of a replay's end marker (-1 as 8 big-endian bytes).
pub const END_OF_REPLAY: u64 = u64::MAX;

/// A block's hash as the engine names it.
pub type EngineHash = u64;

/// One decoded message: its sequence number and batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub seq: u64,
    pub batch: Batch,
}

/// An `EventBatch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub ts: f64,
    pub events: Vec<Event>,
    #[serde(default)]
    pub data_parallel_rank: Option<i64>,
}

/// One event of a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Event {
    BlockStored(Stored),
    BlockRemoved(Removed),
    AllBlocksCleared {},
    /// A type this gateway does not know (a newer vLLM's).
    #[serde(other)]
    Unknown,
}

/// `BlockStored`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    #[serde(deserialize_with = "hashes")]
    pub block_hashes: Vec<EngineHash>,
    #[serde(default, deserialize_with = "opt_hash")]
    pub parent_block_hash: Option<EngineHash>,
    pub token_ids: Vec<u32>,
    pub block_size: u32,
    #[serde(default)]
    pub lora_name: Option<String>,
    #[serde(default)]
    pub medium: Option<String>,
    /// Per block: what besides its tokens its hash covers (LoRA name, `cache_salt` on the
    /// first block, multimodal identifiers), or null.
    #[serde(default)]
    pub extra_keys: Option<Vec<Option<Vec<Extra>>>>,
    #[serde(default)]
    pub group_idx: Option<i64>,
    #[serde(default)]
    pub kv_cache_spec_kind: Option<String>,
}

/// `BlockRemoved`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Removed {
    #[serde(deserialize_with = "hashes")]
    pub block_hashes: Vec<EngineHash>,
    #[serde(default)]
    pub medium: Option<String>,
    #[serde(default)]
    pub group_idx: Option<i64>,
}

/// One item of a block's extra keys: a string (LoRA name, cache salt), or something
/// else (a multimodal identifier), which no text request reproduces.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Extra {
    Text(String),
    Other,
}

impl<'de> Deserialize<'de> for Extra {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Extra;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an extra key")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Extra, E> {
                Ok(Extra::Text(s.to_string()))
            }
            fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Extra, E> {
                Ok(Extra::Other)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Extra, E> {
                Ok(Extra::Other)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Extra, E> {
                Ok(Extra::Other)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Extra, E> {
                Ok(Extra::Other)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Extra, E> {
                Ok(Extra::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Extra, E> {
                Ok(Extra::Other)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut s: A) -> Result<Extra, A::Error> {
                while s.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(Extra::Other)
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut m: A) -> Result<Extra, A::Error> {
                while m.next_entry::<de::IgnoredAny, de::IgnoredAny>()?.is_some() {}
                Ok(Extra::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// A block hash: an integer as it is (signed ones as their two's complement), bytes
/// folded to their first 8 bytes' big-endian value mixed with the rest.
struct Hash(EngineHash);

impl<'de> Deserialize<'de> for Hash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Hash;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a block hash (an integer or bytes)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Hash, E> {
                Ok(Hash(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Hash, E> {
                Ok(Hash(v as u64))
            }
            fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<Hash, E> {
                Ok(Hash(fold(b)))
            }
        }
        d.deserialize_any(V)
    }
}

/// Bytes as a 64-bit hash: FNV-1a over all of them (the engine's hash is already
/// uniform; this only has to be the same for the same bytes).
fn fold(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn hashes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<EngineHash>, D::Error> {
    Ok(Vec::<Hash>::deserialize(d)?
        .into_iter()
        .map(|h| h.0)
        .collect())
}

fn opt_hash<'de, D: Deserializer<'de>>(d: D) -> Result<Option<EngineHash>, D::Error> {
    Ok(Option::<Hash>::deserialize(d)?.map(|h| h.0))
}

/// Why a message was not a batch of events.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("{0} frames, not 3 (topic, sequence, payload)")]
    Frames(usize),
    #[error("the sequence frame has {0} bytes, not 8")]
    Sequence(usize),
    #[error("the payload has {0} bytes, more than the {MAX_PAYLOAD} a batch may have")]
    TooLarge(usize),
    #[error("the payload is not an EventBatch: {0}")]
    Payload(String),
}

/// A message's sequence number, from its 8-byte frame.
pub fn sequence(frame: &[u8]) -> Result<u64, DecodeError> {
    let bytes: [u8; 8] = frame
        .try_into()
        .map_err(|_| DecodeError::Sequence(frame.len()))?;
    Ok(u64::from_be_bytes(bytes))
}

/// Decodes one published message (or a replayed one: `["", sequence, payload]`).
pub fn decode(frames: &[&[u8]]) -> Result<Message, DecodeError> {
    let [_, seq, payload] = frames else {
        return Err(DecodeError::Frames(frames.len()));
    };
    Ok(Message {
        seq: sequence(seq)?,
        batch: decode_batch(payload)?,
    })
}

/// Decodes one msgpack `EventBatch`.
pub fn decode_batch(payload: &[u8]) -> Result<Batch, DecodeError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(DecodeError::TooLarge(payload.len()));
    }
    rmp_serde::from_slice(payload).map_err(|e| DecodeError::Payload(e.to_string()))
}

/// `batch` as vLLM encodes it: the batch an array, each event a map with its `type`.
pub fn encode_batch(batch: &Batch) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let mut ser = rmp_serde::Serializer::new(&mut out).with_struct_map();
    // The batch is an array (msgspec's array_like), its events maps.
    (batch.ts, &batch.events, batch.data_parallel_rank)
        .serialize(&mut ser)
        .expect("writing to a Vec cannot fail");
    out
}

/// The recorded real batches (`tests/fixtures/vllm-0.32/kv-events/`), for tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use serde_json::Value;

    /// Each recorded message of a real vLLM 0.32: its frames and msgspec's decoding.
    pub fn recorded(name: &str) -> Vec<(Vec<Vec<u8>>, Value)> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/vllm-0.32/kv-events")
            .join(name);
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                let frames = v["frames"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| unhex(f.as_str().unwrap()))
                    .collect();
                (frames, v["decoded"].clone())
            })
            .collect()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::fixtures::recorded;

    fn refs(frames: &[Vec<u8>]) -> Vec<&[u8]> {
        frames.iter().map(Vec::as_slice).collect()
    }

    /// Every recorded batch decodes to what vLLM's own decoder read from it.
    #[test]
    fn real_batches_decode_as_vllm_reads_them() {
        let mut seen = (0, 0);
        for file in ["overflow-salt.jsonl", "multi-turn.jsonl"] {
            for (frames, want) in recorded(file) {
                let m = decode(&refs(&frames)).unwrap();
                // serde_json's float parsing may be one ulp off the exact value.
                assert!((m.batch.ts - want[0].as_f64().unwrap()).abs() < 1e-6);
                assert_eq!(m.batch.data_parallel_rank, want[2].as_i64());
                let events = want[1].as_array().unwrap();
                assert_eq!(m.batch.events.len(), events.len());
                for (got, want) in m.batch.events.iter().zip(events) {
                    let hashes: Vec<u64> = want["block_hashes"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|h| h.as_u64().unwrap())
                        .collect();
                    match got {
                        Event::BlockStored(s) => {
                            seen.0 += 1;
                            assert_eq!(want["type"], "BlockStored");
                            assert_eq!(s.block_hashes, hashes);
                            assert_eq!(s.parent_block_hash, want["parent_block_hash"].as_u64());
                            assert_eq!(s.token_ids.len(), s.block_hashes.len() * 128);
                            let ids: Vec<u32> =
                                serde_json::from_value(want["token_ids"].clone()).unwrap();
                            assert_eq!(s.token_ids, ids);
                            assert_eq!(s.block_size, 128);
                            assert_eq!(s.medium.as_deref(), Some("GPU"));
                        }
                        Event::BlockRemoved(r) => {
                            seen.1 += 1;
                            assert_eq!(want["type"], "BlockRemoved");
                            assert_eq!(r.block_hashes, hashes);
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
        }
        assert_eq!(seen, (17, 56));
    }

    #[test]
    fn the_salt_is_the_first_blocks_extra_key() {
        let batches = recorded("overflow-salt.jsonl");
        let m = decode(&refs(&batches[1].0)).unwrap();
        let Event::BlockStored(s) = &m.batch.events[0] else {
            panic!()
        };
        assert_eq!(
            s.extra_keys,
            Some(vec![Some(vec![Extra::Text("tenant-7".into())]), None])
        );
    }

    #[test]
    fn what_the_simulator_encodes_decodes_the_same() {
        let batch = Batch {
            ts: 1.5,
            events: vec![
                Event::BlockStored(Stored {
                    block_hashes: vec![u64::MAX, 1],
                    parent_block_hash: Some(7),
                    token_ids: (0..32).collect(),
                    block_size: 16,
                    lora_name: Some("sql".into()),
                    medium: Some("GPU".into()),
                    extra_keys: Some(vec![Some(vec![Extra::Text("sql".into())]), None]),
                    group_idx: Some(0),
                    kv_cache_spec_kind: Some("full_attention".into()),
                }),
                Event::BlockRemoved(Removed {
                    block_hashes: vec![3],
                    medium: None,
                    group_idx: None,
                }),
                Event::AllBlocksCleared {},
            ],
            data_parallel_rank: Some(0),
        };
        let bytes = encode_batch(&batch);
        assert_eq!(bytes[0], 0x93, "an array of three, as msgspec's array_like");
        assert_eq!(decode_batch(&bytes).unwrap(), batch);
    }

    #[test]
    fn unknown_events_and_fields_are_skipped_and_bytes_hashes_fold() {
        // [2, [{type: SomethingNew, something: 1},
        //      {type: BlockRemoved, block_hashes: [32 bytes], new_field: true}]]
        fn s(out: &mut Vec<u8>, text: &str) {
            out.push(0xa0 | text.len() as u8);
            out.extend_from_slice(text.as_bytes());
        }
        let mut b = vec![0x92, 0x02, 0x92, 0x82];
        s(&mut b, "type");
        s(&mut b, "SomethingNew");
        s(&mut b, "something");
        b.extend([0x01, 0x83]);
        s(&mut b, "type");
        s(&mut b, "BlockRemoved");
        s(&mut b, "block_hashes");
        b.extend([0x91, 0xc4, 32]);
        b.extend([1u8; 32]);
        s(&mut b, "new_field");
        b.push(0xc3);
        let batch = decode_batch(&b).unwrap();
        assert_eq!(batch.data_parallel_rank, None);
        assert_eq!(batch.events[0], Event::Unknown);
        let Event::BlockRemoved(r) = &batch.events[1] else {
            panic!("{batch:?}")
        };
        assert_eq!(r.block_hashes, vec![fold(&[1; 32])]);
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert_eq!(decode(&[b"", b"x"]), Err(DecodeError::Frames(2)));
        assert_eq!(decode(&[b"", b"123", b""]), Err(DecodeError::Sequence(3)));
        assert!(matches!(
            decode(&[b"", &[0; 8], &[0xc1]]),
            Err(DecodeError::Payload(_))
        ));
        let huge = vec![0u8; MAX_PAYLOAD + 1];
        assert_eq!(
            decode_batch(&huge),
            Err(DecodeError::TooLarge(MAX_PAYLOAD + 1))
        );
        // An array that claims four billion events, with none there.
        assert!(decode_batch(&[0x93, 0x01, 0xdd, 0xff, 0xff, 0xff, 0xff]).is_err());
        // Nesting a thousand deep.
        let deep: Vec<u8> = std::iter::repeat_n(0x91, 100_000).collect();
        assert!(decode_batch(&deep).is_err());
    }

    proptest::proptest! {
        /// Whatever the bytes, decoding returns (no panic, no hang).
        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode_batch(&bytes);
        }

        /// A real batch with any bytes changed decodes or fails cleanly.
        #[test]
        fn mutated_real_batches_decode_or_fail_cleanly(
            at in proptest::collection::vec((0usize..4096, proptest::num::u8::ANY), 1..16),
        ) {
            let batches = recorded("multi-turn.jsonl");
            let mut payload = batches[1].0[2].clone();
            for (i, b) in at {
                let n = payload.len();
                payload[i % n] = b;
            }
            let _ = decode_batch(&payload);
        }
    }
}
