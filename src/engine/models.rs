//! What an engine says it serves and is: its `/v1/models` entries and its `/version`.

use serde::Deserialize;

/// The entry of `/v1/models` for a model no replica described (its models are listed in
/// the config).
pub fn model_card(id: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "vllm"})
}

/// The version in a `/version` answer (`{"version":"0.32.0"}`).
pub fn parse_version(body: &[u8]) -> Result<String, String> {
    #[derive(Deserialize)]
    struct Version {
        version: String,
    }
    let v: Version = serde_json::from_slice(body).map_err(|e| format!("bad /version: {e}"))?;
    let ok = !v.version.is_empty()
        && v.version.len() <= 64
        && v.version.bytes().all(|c| c.is_ascii_graphic());
    if ok {
        Ok(v.version)
    } else {
        Err(format!("bad /version: {:?}", v.version))
    }
}

/// The version the fleet as a whole offers: the oldest of `versions` (a client that
/// checks it must not count on what only the newer replicas of a rolling upgrade have).
/// Versions are compared by their leading dotted numbers (`0.32.0`, `0.11.1rc2.dev4`),
/// then as text.
pub fn oldest_version<'a>(versions: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    fn key(v: &str) -> Vec<u64> {
        v.split('.')
            .map_while(|part| {
                let digits =
                    part.len() - part.trim_start_matches(|c: char| c.is_ascii_digit()).len();
                part[..digits].parse().ok()
            })
            .collect()
    }
    versions
        .into_iter()
        .min_by(|a, b| key(a).cmp(&key(b)).then_with(|| a.cmp(b)))
}

/// The entries of a `/v1/models` answer as the server wrote them (vLLM's carry
/// `max_model_len`, `root`, and `parent` for a LoRA adapter), each an object with a string
/// `id`.
pub fn parse_models(body: &[u8]) -> Result<Vec<serde_json::Value>, String> {
    #[derive(Deserialize)]
    struct List {
        data: Vec<serde_json::Value>,
    }
    let list: List = serde_json::from_slice(body).map_err(|e| format!("bad /v1/models: {e}"))?;
    if let Some(bad) = list.data.iter().find(|c| card_id(c).is_none()) {
        return Err(format!(
            "bad /v1/models: an entry without a string `id`: {bad:.80}"
        ));
    }
    Ok(list.data)
}

/// The `id` of a `/v1/models` entry.
pub fn card_id(card: &serde_json::Value) -> Option<&str> {
    card.get("id")?.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_and_the_oldest_is_the_fleets() {
        let fixture = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/vllm-0.32/version.json"
        ))
        .unwrap();
        assert_eq!(parse_version(&fixture).unwrap(), "0.32.0");
        for bad in [
            &b"{}"[..],
            b"{\"version\":\"\"}",
            b"{\"version\":\"0.1 <b>\"}",
            b"not json",
        ] {
            assert!(parse_version(bad).is_err(), "{bad:?}");
        }
        let oldest = |v: &[&'static str]| oldest_version(v.iter().copied());
        assert_eq!(
            oldest(&["0.32.0", "0.9.2", "0.32.1"]),
            Some("0.9.2"),
            "by number, not text"
        );
        assert_eq!(
            oldest(&["0.11.1rc2.dev4+g1", "0.11.2"]),
            Some("0.11.1rc2.dev4+g1")
        );
        assert_eq!(oldest(&["0.32.0"]), Some("0.32.0"));
        assert_eq!(oldest(&[]), None);
    }

    #[test]
    fn parses_the_real_models_fixture() {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/vllm-0.32/models.json"
        );
        let text = std::fs::read(p).unwrap_or_else(|e| panic!("{p}: {e}"));
        let cards = parse_models(&text).unwrap();
        assert_eq!(cards.len(), 1);
        assert_eq!(card_id(&cards[0]), Some("tiny-llama"));
        assert_eq!(
            cards[0]["max_model_len"], 2048,
            "kept as the server wrote it"
        );
        assert_eq!(cards[0]["root"], "/models/tiny-llama");
        for bad in [
            &br#"{"data":[{"object":"model"}]}"#[..],
            br#"{"data":[{"id":3}]}"#,
            b"{}",
        ] {
            assert!(parse_models(bad).is_err(), "{bad:?}");
        }
    }
}
