//! The simulator's text: a pseudo tokenizer and chat template (identical text, identical
//! tokens, so prefix caching works as in vLLM), the words it answers with, body digests.

use serde_json::Value;

/// FNV-1a 64: a cheap digest for comparing bodies in tests.
pub fn digest(body: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in body {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{}:{h:016x}", body.len())
}

/// The pseudo tokenizer: one token per word or punctuation mark, with a stable id, so
/// identical text gives identical token ids (and identical prefix-cache blocks).
pub fn tokenize(text: &str) -> Vec<u32> {
    let mut ids = Vec::with_capacity(text.len() / 4);
    let mut word_start: Option<usize> = None;
    let id = |t: &str| {
        let mut h: u32 = 0x811c9dc5;
        for b in t.bytes() {
            h ^= b as u32;
            h = h.wrapping_mul(0x01000193);
        }
        h
    };
    for (i, c) in text.char_indices() {
        if c.is_alphanumeric() {
            if word_start.is_none() {
                word_start = Some(i);
            }
            continue;
        }
        if let Some(st) = word_start.take() {
            ids.push(id(&text[st..i]));
        }
        if !c.is_whitespace() {
            ids.push(id(&text[i..i + c.len_utf8()]));
        }
    }
    if let Some(st) = word_start {
        ids.push(id(&text[st..]));
    }
    ids
}

/// The number of tokens of `text` (see [`tokenize`]).
pub fn count_tokens(text: &str) -> usize {
    let mut n = 0;
    let mut in_word = false;
    for c in text.chars() {
        if c.is_alphanumeric() {
            if !in_word {
                n += 1;
                in_word = true;
            }
        } else {
            in_word = false;
            if !c.is_whitespace() {
                n += 1;
            }
        }
    }
    n
}

/// The pseudo chat template, so identical leading messages give identical leading tokens.
pub(super) fn chat_prompt(messages: &[Value]) -> String {
    let mut out = String::from("<|begin|>");
    for m in messages {
        let role = m["role"].as_str().unwrap_or("user");
        out.push_str(&format!("<|{role}|>\n"));
        match &m["content"] {
            Value::String(s) => out.push_str(s),
            Value::Array(parts) => {
                for p in parts {
                    if let Some(t) = p["text"].as_str() {
                        out.push_str(t);
                    }
                }
            }
            _ => {}
        }
        out.push_str("<|end|>");
    }
    out.push_str("<|assistant|>\n");
    out
}

pub(super) const WORDS: &[&str] = &[
    " the",
    " quick",
    " model",
    " answers",
    " with",
    " simulated",
    " tokens",
    " at",
    " a",
    " steady",
    " pace",
    ",",
    " while",
    " the",
    " gateway",
    " routes",
    " each",
    " request",
    ".",
];
