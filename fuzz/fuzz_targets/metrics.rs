//! The `/metrics` parser: any payload gives a reading or an error, never a panic, and a
//! reading holds no negative or non-finite load.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vllm_edge::engine::metrics::parse;

fuzz_target!(|payload: &[u8]| {
    if let Ok(load) = parse(payload, 8 << 20) {
        for v in [load.running, load.waiting, load.kv_usage]
            .into_iter()
            .flatten()
        {
            assert!(v.is_finite() && v >= 0.0, "{load:?}");
        }
    }
});
