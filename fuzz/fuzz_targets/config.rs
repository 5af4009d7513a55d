//! The config loader: any text gives a configuration or an error naming the file, never
//! a panic. Host names are not resolved here (that would be the network, not the loader).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Only IP literals in URLs: a host name would be looked up in DNS.
    let names_a_host = text
        .match_indices("://")
        .any(|(i, _)| !matches!(text[i + 3..].chars().next(), Some('0'..='9' | '[')));
    if names_a_host {
        return;
    }
    if let Err(e) = vllm_edge::config::Config::parse(text, Path::new("/nonexistent/fuzz.yaml")) {
        assert!(e.to_string().contains("fuzz.yaml"), "{e}");
    }
});
