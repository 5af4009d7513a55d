//! The request-body inspector: any bytes give routing fields or a 400, never a panic,
//! and whatever it accepts as JSON nests no deeper than the limit. The same bytes are
//! read as a `multipart/form-data` body (boundary `B`) and as a `Content-Type`. A body
//! that names no model gets a default written in, and reads back naming it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vllm_edge::openai::{
    inspect, inspect_form, inspect_request, json_depth_exceeds, route_model, RoutingInfo,
};

/// A body read as naming no model, given the default `d`.
fn defaulted(content_type: Option<&[u8]>, body: &[u8], info: &RoutingInfo) {
    if !info.model.is_empty() {
        return;
    }
    let none = Default::default();
    let r = route_model(content_type, body, info, &none, || Ok("d"), 64)
        .expect("what reads can name a model")
        .expect("it is rewritten");
    assert_eq!(r.info.model, "d");
}

fuzz_target!(|body: &[u8]| {
    let limit = 64;
    match inspect(body, limit) {
        Ok(info) => {
            assert!(info.prompt_bytes <= body.len());
            assert!(!json_depth_exceeds(body, limit));
            defaulted(None, body, &info);
        }
        Err(e) => assert_eq!(e.status, 400),
    }
    match inspect_form(body, b"B") {
        Ok(info) => {
            assert!(info.prompt_bytes <= body.len());
            defaulted(Some(b"multipart/form-data; boundary=B"), body, &info);
        }
        Err(e) => assert_eq!(e.status, 400),
    }
    if let Err(e) = inspect_request(Some(body), b"{\"model\":\"m\"}", limit) {
        assert_eq!(e.status, 400);
    }
    // The usage reader sees replicas' answers: any bytes, any split.
    let mut tail = vllm_edge::openai::UsageTail::default();
    let (a, b) = body.split_at(body.len() / 2);
    tail.push(a);
    tail.push(b);
    let _ = tail.usage();
});
