//! The gateway's `GET /v1/models`.

use bytes::Bytes;

/// The body of `GET /v1/models` for a list of model ids, in vLLM's shape.
pub fn models_body(cards: &[serde_json::Value]) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&serde_json::json!({"object": "list", "data": cards}))
            .expect("serializing a json! value"),
    )
}
