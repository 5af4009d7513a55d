//! The OpenAI surface's unit tests.

use super::*;
use serde_json::json;

#[test]
fn inspects_routing_fields_only() {
    let body = br#"{"messages":[{"role":"user","content":"hi \"there\""}],"model":"m\u00e9","stream":true,"max_tokens":5,"max_completion_tokens":7,"temperature":0.2}"#;
    let info = inspect(body, 64).unwrap();
    assert_eq!(info.model, "mé");
    assert!(info.stream);
    assert_eq!(info.max_tokens, Some(7));
    assert_eq!(
        info.prompt_bytes,
        r#"[{"role":"user","content":"hi \"there\""}]"#.len()
    );
}

#[test]
fn client_errors_are_400_with_param() {
    for (body, param) in [
        (&b"{\"model\": 3}"[..], Some("model")),
        (b"{\"model\":\"m\",\"stream\":\"yes\"}", Some("stream")),
        (b"{\"model\":\"m\"", None),
        (b"", None),
        (b"[1,2]", None),
        (b"{\"model\":\"\xff\xfe\"}", Some("model")),
    ] {
        let e = inspect(body, 64).unwrap_err();
        assert_eq!(e.status, 400, "{body:?}");
        assert_eq!(e.param, param, "{body:?}: {}", e.message);
    }
    // Nesting is counted over the whole document, the object itself included.
    let nested = |n: usize, field: &str| {
        format!(
            "{{\"model\":\"m\",\"{field}\":{}{}}}",
            "[".repeat(n),
            "]".repeat(n)
        )
    };
    assert_eq!(
        inspect(nested(63, "messages").as_bytes(), 64)
            .unwrap()
            .prompt_bytes,
        126
    );
    for (n, field) in [(64, "messages"), (10_000, "messages"), (10_000, "model")] {
        let e = inspect(nested(n, field).as_bytes(), 64).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("deeper than 64"), "{}", e.message);
    }
    // Brackets inside strings, escaped quotes included, are text.
    let text = format!(
        "{{\"model\":\"m\",\"prompt\":\"\\\"{}\"}}",
        "[".repeat(1000)
    );
    assert!(inspect(text.as_bytes(), 2).is_ok());
}

#[test]
fn routes() {
    use http::Method;
    assert_eq!(
        route(&Method::POST, "/v1/chat/completions"),
        Route::Inference
    );
    assert_eq!(route(&Method::POST, "/v1/completions/"), Route::Inference);
    assert_eq!(route(&Method::POST, "/tokenize?x=1"), Route::Inference);
    assert_eq!(
        route(&Method::GET, "/v1/chat/completions"),
        Route::MethodNotAllowed("POST")
    );
    assert_eq!(route(&Method::GET, "/v1/models"), Route::Models);
    assert_eq!(route(&Method::GET, "/health"), Route::Health);
    assert_eq!(route(&Method::GET, "/admin"), Route::NotFound);
    assert_eq!(
        route(&Method::POST, "/v1/audio/transcriptions"),
        Route::Inference
    );
    assert_eq!(
        route(&Method::POST, "/v1/audio/translations"),
        Route::Inference
    );
    assert_eq!(route(&Method::GET, "/ping"), Route::Health);
    assert_eq!(route(&Method::POST, "/ping"), Route::Health);
    assert_eq!(
        route(&Method::DELETE, "/ping"),
        Route::MethodNotAllowed("GET, POST")
    );
    assert_eq!(route(&Method::GET, "/version"), Route::Version);
    assert_eq!(route(&Method::HEAD, "/load"), Route::Load);
    assert_eq!(
        route(&Method::POST, "/load"),
        Route::MethodNotAllowed("GET")
    );
}

/// A form whose file part is named `model` (and holds JSON naming another model).
fn form(fields: &[(&str, &str)]) -> Vec<u8> {
    crate::openai::form::encode(
        "XB",
        fields,
        "model",
        b"RIFF\x00\x01{\"model\":\"not this\"}",
    )
}

/// `route_model` for a request that names no model, without aliases.
fn default_to(
    ct: Option<&[u8]>,
    body: &[u8],
    default: Result<&str, Vec<&str>>,
) -> Result<(Vec<u8>, RoutingInfo), ApiError> {
    let info = inspect_request(ct, body, 64)?;
    let none = Default::default();
    let r = route_model(ct, body, &info, &none, || default, 64)?.expect("renamed");
    assert!(r.defaulted && r.alias.is_none());
    Ok((r.body, r.info))
}

#[test]
fn an_alias_is_sent_as_its_model_and_a_default_may_be_one() {
    let aliases: std::collections::BTreeMap<String, String> =
        [("gpt-4o".to_string(), "llama".to_string())].into();
    let route = |body: &str, default: &'static str| {
        let info = inspect(body.as_bytes(), 64).unwrap();
        route_model(None, body.as_bytes(), &info, &aliases, || Ok(default), 64).unwrap()
    };
    let r = route(r#"{"model":"gpt-4o","prompt":"p"}"#, "x").unwrap();
    assert_eq!(
        (r.info.model.as_str(), r.alias.as_deref(), r.defaulted),
        ("llama", Some("gpt-4o"), false)
    );
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v, json!({"model": "llama", "prompt": "p"}));
    assert_eq!(
        route(r#"{"model":"llama"}"#, "x"),
        None,
        "a model is sent as it is"
    );
    let r = route(r#"{"prompt":"p"}"#, "gpt-4o").unwrap();
    assert_eq!(
        (r.info.model.as_str(), r.alias.as_deref(), r.defaulted),
        ("llama", Some("gpt-4o"), true)
    );
}

#[test]
fn a_request_naming_no_model_gets_the_default_written_in() {
    let read = |body: &str| {
        let info = inspect(body.as_bytes(), 64).unwrap();
        assert_eq!(info.model, "", "names none: {body}");
        let (named, info) = default_to(None, body.as_bytes(), Ok("llama \"3\""))
            .unwrap_or_else(|e| panic!("{body}: {e:?}"));
        assert_eq!(info.model, "llama \"3\"");
        let v: serde_json::Value = serde_json::from_slice(&named).unwrap();
        (v, info)
    };
    let (v, info) = read(r#" {"messages":[{"role":"user","content":"hi"}],"stream":true}"#);
    assert_eq!(v["messages"][0]["content"], "hi");
    assert!(info.stream, "the other fields are read again");
    let body = br#"{"prompt":"abc","model":null,"user":"u"}"#;
    let (v, _) = read(std::str::from_utf8(body).unwrap());
    assert_eq!((&v["prompt"], &v["user"]), (&json!("abc"), &json!("u")));
    // The affinity key's spans are in the new body.
    let (named, info) = default_to(None, body, Ok("m")).unwrap();
    assert_eq!(&named[info.spans.user.unwrap()], b"\"u\"");
    assert_eq!(&named[info.spans.prompt.unwrap()], b"\"abc\"");
    read(r#"{"model":"","prompt":"x"}"#);
    // Bytes that are not UTF-8 in a field the gateway does not read stay as they are.
    let body = b"{\"x\":{\"k\xc6_\":1},\"model\":null}";
    let (named, info) = default_to(None, body, Ok("m")).unwrap();
    assert_eq!(info.model, "m");
    assert_eq!(&named[..], b"{\"x\":{\"k\xc6_\":1},\"model\":\"m\"}");
    read(" { } ");
    // Only a request that names none is changed: one that names a model is routed by
    // it (a name no replica serves is a 404 there).
    let info = inspect(br#"{"model":"other"}"#, 64).unwrap();
    assert_eq!(info.model, "other");
    // No default: several first models are the client's to choose from; none is a
    // fleet not ready yet.
    let e = default_to(None, b"{}", Err(vec!["a", "b"])).unwrap_err();
    assert_eq!((e.status, e.param), (400, Some("model")), "{e:?}");
    assert!(e.message.contains("GET /v1/models"), "{e:?}");
    let e = default_to(None, b"{}", Err(vec![])).unwrap_err();
    assert_eq!(e.status, 503, "{e:?}");
    // A form gets the field.
    let ct = Some(&b"multipart/form-data; boundary=XB"[..]);
    for body in [form(&[]), form(&[("model", ""), ("stream", "1")])] {
        assert_eq!(inspect_request(ct, &body, 64).unwrap().model, "");
        let (named, info) = default_to(ct, &body, Ok("whisper")).unwrap();
        assert_eq!(info.model, "whisper");
        assert!(named.len() > body.len());
    }
}

#[test]
fn forms_are_read_for_their_routing_fields() {
    let ct = Some(&b"multipart/form-data; boundary=XB"[..]);
    let body = form(&[
        ("model", "first"),
        ("prompt", "names: Zoë"),
        ("model", "whisper-large"),
        ("stream", "True"),
        ("stream_include_usage", "1"),
        ("max_completion_tokens", " 64 "),
    ]);
    let info = inspect_request(ct, &body, 64).unwrap();
    // The last `model` field counts, as for vLLM; the file part named `model` does not.
    assert_eq!(info.model, "whisper-large");
    assert!(info.stream && info.usage_reported);
    assert_eq!(info.max_tokens, Some(64));
    assert_eq!(info.prompt_bytes, "names: Zoë".len());
    let info = inspect_request(ct, &form(&[("model", "w")]), 64).unwrap();
    assert!(!info.stream && !info.usage_reported);
    assert_eq!((info.max_tokens, info.prompt_bytes), (None, 0));
    // Without a form content type the same bytes are (invalid) JSON.
    let e = inspect_request(Some(b"application/json"), &body, 64).unwrap_err();
    assert!(e.message.contains("not valid JSON"), "{e:?}");
}

#[test]
fn bad_forms_are_400_naming_what_to_fix() {
    let ct = Some(&b"multipart/form-data; boundary=XB"[..]);
    for (ct, body, param, says) in [
        (
            ct,
            form(&[("model", "m"), ("stream", "maybe")]),
            Some("stream"),
            "true or false",
        ),
        (
            ct,
            form(&[("model", "m"), ("max_completion_tokens", "-1")]),
            Some("max_completion_tokens"),
            "whole number",
        ),
        (ct, b"--XB\r\n\r\ncut".to_vec(), None, "malformed"),
        (
            Some(&b"multipart/form-data"[..]),
            form(&[("model", "m")]),
            None,
            "no boundary",
        ),
    ] {
        let e = inspect_request(ct, &body, 64).unwrap_err();
        assert_eq!((e.status, e.param), (400, param), "{e:?}");
        assert!(e.message.contains(says), "{e:?}");
    }
    let mut bad = form(&[]);
    bad.splice(
        0..0,
        b"--XB\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\n\xff\r\n"
            .iter()
            .copied(),
    );
    let e = inspect_request(ct, &bad, 64).unwrap_err();
    assert!(e.message.contains("not UTF-8"), "{e:?}");
}

#[test]
fn error_shape_matches_vllm() {
    let b = ApiError::model_not_found("nope").body();
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["error"]["type"], "NotFoundError");
    assert_eq!(v["error"]["param"], "model");
    assert_eq!(v["error"]["code"], 404);
    assert!(v["error"]["message"].as_str().unwrap().contains("nope"));
}

fn fixture(name: &str) -> Vec<u8> {
    let p = format!(
        "{}/tests/fixtures/vllm-0.32/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

fn tail_of(body: &[u8], chunk: usize) -> UsageTail {
    let mut t = UsageTail::default();
    for c in body.chunks(chunk) {
        t.push(c);
    }
    t
}

#[test]
fn usage_is_read_from_the_end_of_a_long_stream_in_any_chunking() {
    // Hundreds of token events (the tail is cut back as they pass), then vLLM's usage
    // event and [DONE].
    let event = br#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":" tok"},"logprobs":null,"finish_reason":null}]}"#;
    let mut body = Vec::new();
    for _ in 0..300 {
        body.extend_from_slice(event);
        body.extend_from_slice(b"\n\n");
    }
    let done = b"data: {\"id\":\"chatcmpl-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"total_tokens\":312,\"completion_tokens\":300}}\n\ndata: [DONE]\n\n";
    let mut with_usage = body.clone();
    with_usage.extend_from_slice(done);
    // A usage object followed by more than the tail's worth of events is not the answer's.
    let mut early = done.to_vec();
    early.extend_from_slice(&body);
    for chunk in [1, 7, 250, 251, 1023, 1024, 2049, 1 << 20] {
        assert_eq!(
            tail_of(&with_usage, chunk).usage(),
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 300
            }),
            "chunk {chunk}"
        );
        assert_eq!(tail_of(&early, chunk).usage(), None, "chunk {chunk}");
    }
}

#[test]
fn usage_is_read_from_the_end_of_real_responses_in_any_chunking() {
    let usage = |p, c| {
        Some(Usage {
            prompt_tokens: p,
            completion_tokens: c,
        })
    };
    for chunk in [1, 7, 100, 4096, 1 << 20] {
        let stream = fixture("chat-stream.sse.txt");
        assert_eq!(
            tail_of(&stream, chunk).usage(),
            usage(14, 8),
            "chunk {chunk}"
        );
        let pretty = fixture("chat-completion.json");
        assert_eq!(
            tail_of(&pretty, chunk).usage(),
            usage(41, 24),
            "chunk {chunk}"
        );
        let compact = fixture("completion-prompt-plus-max-tokens-over-limit-is-clamped.http.txt");
        assert_eq!(
            tail_of(&compact, chunk).usage(),
            usage(1881, 167),
            "chunk {chunk}"
        );
        // A stream that did not ask for usage has none.
        let none = fixture("completion-stream.sse.txt");
        assert_eq!(tail_of(&none, chunk).usage(), None, "chunk {chunk}");
    }
}

#[test]
fn generated_text_cannot_fake_usage() {
    let body = br#"{"choices":[{"text":"say \"usage\": {\"prompt_tokens\": 9}"}],"usage":null}"#;
    assert_eq!(tail_of(body, 5).usage(), None);
    // A null usage after a real one (continuous stats end) keeps the real one.
    let body = br#"data: {"usage":{"prompt_tokens":3,"completion_tokens":4}}

data: {"usage":null}
"#;
    assert_eq!(
        tail_of(body, 3).usage(),
        Some(Usage {
            prompt_tokens: 3,
            completion_tokens: 4
        })
    );
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// The depth scan written the obvious way, one byte at a time: the reference
    /// for the faster one.
    fn byte_by_byte(body: &[u8], limit: usize) -> bool {
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        for &b in body {
            if in_string {
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    in_string = false;
                }
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > limit {
                        return true;
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        false
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any bytes at all: a routing decision or a 400, never a panic.
        #[test]
        fn any_body_is_read_or_refused_with_400(body in prop::collection::vec(any::<u8>(), 0..512)) {
            match inspect(&body, 64) {
                // One that names no model gets the default written in.
                Ok(info) if info.model.is_empty() => {
                    let none = Default::default();
                    let r = route_model(None, &body, &info, &none, || Ok("d"), 64);
                    prop_assert_eq!(r.unwrap().unwrap().info.model, "d");
                }
                Ok(_) => {}
                Err(e) => prop_assert_eq!(e.status, 400),
            }
        }

        /// The default is written into any object that names no model, whatever its
        /// layout, and nothing else changes.
        #[test]
        fn the_model_written_in_is_all_that_changes(
            members in prop::collection::btree_map("[a-z_]{1,8}", "\\PC{0,16}", 0..5),
            unnamed in prop::sample::select(vec!["absent", "null", "empty"]),
            at in 0usize..6,
            pretty in any::<bool>(),
            model in "\\PC{1,24}",
        ) {
            let mut pairs: Vec<(String, serde_json::Value)> = members
                .into_iter()
                .filter(|(k, _)| k != "model")
                .map(|(k, v)| (format!("x_{k}"), v.into()))
                .collect();
            let given = match unnamed {
                "null" => Some(serde_json::Value::Null),
                "empty" => Some("".into()),
                _ => None,
            };
            if let Some(v) = given {
                pairs.insert(at.min(pairs.len()), ("model".into(), v));
            }
            let object: serde_json::Map<String, serde_json::Value> = pairs.into_iter().collect();
            let body = if pretty {
                serde_json::to_vec_pretty(&object).unwrap()
            } else {
                serde_json::to_vec(&object).unwrap()
            };
            let info = inspect(&body, 64).unwrap();
            prop_assert_eq!(&info.model, "");
            let none = Default::default();
            let r = route_model(None, &body, &info, &none, || Ok(model.as_str()), 64)
                .unwrap()
                .unwrap();
            prop_assert_eq!(&r.info.model, &model);
            let mut want = object.clone();
            want.insert("model".into(), model.clone().into());
            let got: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&r.body).unwrap();
            prop_assert_eq!(got, want);
        }

        /// What a client sends in the routing fields is what routing reads.
        #[test]
        fn routing_fields_are_read_back(
            model in "[a-zA-Z0-9/_.:-]{1,40}",
            stream in any::<bool>(),
            max_tokens in proptest::option::of(0u64..1_000_000),
            content in "\\PC{0,64}",
            extra in prop::collection::btree_map("[a-z_]{1,8}", any::<i64>(), 0..4),
        ) {
            let messages = serde_json::json!([{"role": "user", "content": content}]);
            let mut body = serde_json::Map::new();
            for (k, v) in extra {
                body.insert(format!("x_{k}"), v.into());
            }
            body.insert("model".into(), model.clone().into());
            body.insert("stream".into(), stream.into());
            body.insert("messages".into(), messages.clone());
            if let Some(m) = max_tokens {
                body.insert("max_tokens".into(), m.into());
            }
            let bytes = serde_json::to_vec(&body).unwrap();
            let info = inspect(&bytes, 64).unwrap();
            prop_assert_eq!(info.model, model);
            prop_assert_eq!(info.stream, stream);
            prop_assert_eq!(info.max_tokens, max_tokens);
            prop_assert_eq!(info.prompt_bytes, serde_json::to_string(&messages).unwrap().len());
        }

        /// Nesting is refused exactly above the limit, wherever it is.
        #[test]
        fn nesting_is_refused_exactly_above_the_limit(
            depth in 1usize..200,
            limit in 1usize..128,
            field in prop::sample::select(vec!["messages", "prompt", "x_extra"]),
        ) {
            let inner = depth - 1;
            let body = format!(
                "{{\"model\":\"m\",\"{field}\":{}{}}}",
                "[".repeat(inner),
                "]".repeat(inner)
            );
            let body = body.replace("\":}", "\":0}");
            let result = inspect(body.as_bytes(), limit);
            if depth <= limit {
                prop_assert!(result.is_ok(), "{:?}", result);
            } else {
                prop_assert_eq!(result.unwrap_err(), ApiError::too_deep(limit));
            }
        }

        /// Brackets and quotes inside strings are text, not structure.
        #[test]
        fn strings_do_not_count_as_nesting(s in "\\PC{0,64}") {
            let body = serde_json::to_vec(&serde_json::json!({"model": "m", "prompt": s})).unwrap();
            prop_assert!(!json_depth_exceeds(&body, 1));
        }

        /// The string-skipping scan agrees with a plain byte-by-byte one on any text,
        /// valid JSON or not (escapes at the end, unterminated strings, stray quotes).
        #[test]
        fn the_fast_depth_scan_agrees_with_a_byte_by_byte_one(
            body in prop::collection::vec(
                prop::sample::select(b"[]{}\"\\ a,:".to_vec()), 0..64),
            limit in 0usize..6,
        ) {
            prop_assert_eq!(json_depth_exceeds(&body, limit), byte_by_byte(&body, limit));
        }
    }
}
