//! A model's own tokenization, as vLLM does it: the Hugging Face tokenizer of the model's
//! directory (`tokenizer.json`) and its chat template (`chat_template.jinja`, else the
//! `chat_template` of `tokenizer_config.json`) rendered the way `transformers` renders
//! it (Jinja with `trim_blocks` and `lstrip_blocks`, Python's string methods, the special
//! tokens of `tokenizer_config.json` as variables). Exact prefix routing keys the KV
//! blocks an engine reports by their token ids, so a request must be turned into the same
//! ids the engine will see (`tests/fixtures/vllm-0.32/kv-events/tokenize.json` holds a
//! real vLLM's `/tokenize` answers to check against).
//!
//! A leaf: nothing of the gateway's; the config loads tokenizers through it (so a bad
//! directory is a config error naming the key), routing and the simulator use them.

use serde_json::Value;
use std::path::{Path, PathBuf};

/// Template instructions one rendering may spend (minijinja's fuel): far above any real
/// chat template over a long conversation, and a bound on a template that loops.
const TEMPLATE_FUEL: u64 = 5_000_000;
/// Pieces of chat text (between special tokens) at least this long are remembered with
/// their token ids: a system prompt repeats across requests, and tokenizing costs about
/// half a microsecond per token.
const CACHED_PIECE_BYTES: usize = 256;
/// Pieces remembered at most (then forgotten all at once): with 8 KiB system prompts,
/// about 100 MiB of ids at the very most, usually far less.
const CACHED_PIECES: usize = 4096;

/// Token ids of chat pieces, by (digest, length) of their text.
type PieceCache = std::collections::HashMap<(u64, usize), std::sync::Arc<[u32]>>;

/// One model's tokenizer and chat template.
pub struct Tokenizer {
    tokenizer: tokenizers::Tokenizer,
    /// The chat template, compiled; `None` when the model has none (chat requests are
    /// then not tokenized).
    chat: Option<minijinja::Environment<'static>>,
    /// `bos_token`, `eos_token`, `unk_token`, `pad_token` as the template sees them.
    specials: Vec<(&'static str, String)>,
    /// The special tokens, to cut chat text into pieces that tokenize independently;
    /// `None` when the tokenizer has added tokens this cannot reproduce (stripping
    /// whitespace around them, matched after normalization, not special).
    pieces: Option<Pieces>,
    /// Token ids of long pieces seen before, by a digest of their text.
    cache: parking_lot::Mutex<PieceCache>,
    /// Where it was loaded from (messages).
    pub dir: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("dir", &self.dir).finish()
    }
}

/// What a request asks the model to read, in the two shapes vLLM tokenizes.
#[derive(Debug, Clone, Copy)]
pub enum Prompt<'a> {
    /// A chat: the `messages` array (rendered by the chat template, generation prompt
    /// added, then tokenized without adding special tokens, as vLLM does).
    Chat(&'a Value),
    /// A completion's `prompt`: a string (tokenized with the special tokens the tokenizer
    /// adds) or an array of token ids (taken as they are).
    Completion(&'a Value),
}

impl Tokenizer {
    /// Loads the model directory `dir` as vLLM would: `tokenizer.json`, and the chat
    /// template from `chat_template.jinja` or `tokenizer_config.json`.
    pub fn load(dir: &Path) -> Result<Tokenizer, String> {
        let file = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| format!("cannot load {}: {e}", file.display()))?;
        let config_file = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read(&config_file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("{} is not JSON: {e}", config_file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Value::Null,
            Err(e) => return Err(format!("cannot read {}: {e}", config_file.display())),
        };
        let template_file = dir.join("chat_template.jinja");
        let template = match std::fs::read_to_string(&template_file) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => template_of(&config),
            Err(e) => return Err(format!("cannot read {}: {e}", template_file.display())),
        };
        let chat = match template {
            None => None,
            Some(t) => Some(environment(t).map_err(|e| {
                format!(
                    "the chat template of {} does not compile: {e}",
                    dir.display()
                )
            })?),
        };
        let specials = ["bos_token", "eos_token", "unk_token", "pad_token"]
            .into_iter()
            .filter_map(|k| special(&config, k).map(|v| (k, v)))
            .collect();
        let pieces = Pieces::of(&tokenizer);
        Ok(Tokenizer {
            tokenizer,
            chat,
            specials,
            pieces,
            cache: Default::default(),
            dir: dir.to_path_buf(),
        })
    }

    /// Whether chat requests can be tokenized (the model has a chat template).
    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    /// The token ids the engine will see for `prompt`, or why they cannot be told (a
    /// shape vLLM would tokenize otherwise, such as images, is not guessed at).
    pub fn tokens(&self, prompt: Prompt) -> Result<Vec<u32>, String> {
        match prompt {
            Prompt::Chat(messages) => {
                let text = self.render_chat(messages)?;
                self.encode_chat(&text)
            }
            Prompt::Completion(Value::String(s)) => self.encode(s, true),
            Prompt::Completion(Value::Array(ids)) => ids
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| "a prompt array that is not one list of token ids".into())
                })
                .collect(),
            Prompt::Completion(_) => Err("a prompt that is neither text nor token ids".into()),
        }
    }

    /// `text` as token ids.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        self.tokenizer
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| format!("tokenizer: {e}"))
    }

    /// Rendered chat text as token ids, as [`Tokenizer::encode`] without special tokens
    /// gives them: the tokenizer splits text at its special tokens first and tokenizes
    /// the pieces between them independently, so each piece's ids can be remembered (a
    /// system prompt is one piece, repeated across requests).
    pub fn encode_chat(&self, text: &str) -> Result<Vec<u32>, String> {
        let Some(pieces) = &self.pieces else {
            return self.encode(text, false);
        };
        let mut out = Vec::with_capacity(text.len() / 3);
        let mut at = 0;
        for m in pieces.finder.find_iter(text) {
            self.piece(&text[at..m.start()], &mut out)?;
            out.push(pieces.ids[m.pattern().as_usize()]);
            at = m.end();
        }
        self.piece(&text[at..], &mut out)?;
        Ok(out)
    }

    /// Appends the ids of `text`, a piece without special tokens.
    fn piece(&self, text: &str, out: &mut Vec<u32>) -> Result<(), String> {
        if text.len() < CACHED_PIECE_BYTES {
            if !text.is_empty() {
                out.extend(self.encode(text, false)?);
            }
            return Ok(());
        }
        use std::hash::{BuildHasher, Hasher};
        static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
            std::sync::OnceLock::new();
        let mut h = KEYS.get_or_init(Default::default).build_hasher();
        h.write(text.as_bytes());
        let key = (h.finish(), text.len());
        if let Some(ids) = self.cache.lock().get(&key) {
            out.extend_from_slice(ids);
            return Ok(());
        }
        let ids: std::sync::Arc<[u32]> = self.encode(text, false)?.into();
        out.extend_from_slice(&ids);
        let mut cache = self.cache.lock();
        if cache.len() >= CACHED_PIECES {
            cache.clear();
        }
        cache.insert(key, ids);
        Ok(())
    }

    /// The chat `messages` rendered by the template, with the generation prompt.
    pub fn render_chat(&self, messages: &Value) -> Result<String, String> {
        let env = self.chat.as_ref().ok_or("the model has no chat template")?;
        let messages = normalized(messages)?;
        let mut ctx = serde_json::Map::new();
        ctx.insert("messages".into(), messages);
        ctx.insert("add_generation_prompt".into(), Value::Bool(true));
        for (k, v) in &self.specials {
            ctx.insert((*k).into(), Value::String(v.clone()));
        }
        let template = env.get_template("chat").map_err(|e| e.to_string())?;
        template
            .render(minijinja::value::Serde(&ctx))
            .map_err(|e| format!("chat template: {e}"))
    }
}

/// A tokenizer's special tokens, found in text leftmost-longest as the tokenizer finds
/// them.
struct Pieces {
    finder: aho_corasick::AhoCorasick,
    /// The id of each pattern of `finder`.
    ids: Vec<u32>,
}

impl Pieces {
    /// `None` unless every added token is a plain special token (no whitespace
    /// stripping, not single-word, matched before normalization): then the text between
    /// them tokenizes independently.
    fn of(tokenizer: &tokenizers::Tokenizer) -> Option<Pieces> {
        let added = tokenizer.get_added_tokens_decoder();
        if added.is_empty()
            || added
                .values()
                .any(|t| !t.special || t.lstrip || t.rstrip || t.single_word || t.normalized)
        {
            return None;
        }
        let (ids, contents): (Vec<u32>, Vec<String>) =
            added.into_iter().map(|(id, t)| (id, t.content)).unzip();
        let finder = aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(&contents)
            .ok()?;
        Some(Pieces { finder, ids })
    }
}

/// The messages as vLLM hands them to a "string"-content template: a content made of
/// text parts becomes their texts joined by newlines; other parts (images, audio) make
/// the prompt something this gateway does not reproduce.
fn normalized(messages: &Value) -> Result<Value, String> {
    let list = messages.as_array().ok_or("`messages` is not an array")?;
    let mut out = Vec::with_capacity(list.len());
    for m in list {
        let mut m = m.as_object().ok_or("a message is not an object")?.clone();
        if let Some(Value::Array(parts)) = m.get("content") {
            let mut texts = Vec::with_capacity(parts.len());
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => texts.push(t.as_str()),
                    _ => return Err("a message part that is not text".into()),
                }
            }
            m.insert("content".into(), Value::String(texts.join("\n")));
        }
        out.push(Value::Object(m));
    }
    Ok(Value::Array(out))
}

/// The chat template of a `tokenizer_config.json`: a string, or the `default` of a list
/// of named templates.
fn template_of(config: &Value) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

/// A special token of a `tokenizer_config.json`: a string, or an added-token object.
fn special(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// A Jinja environment that renders `template` (named `chat`) as `transformers` does.
fn environment(template: String) -> Result<minijinja::Environment<'static>, minijinja::Error> {
    let mut env = minijinja::Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()?,
    );
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<(), minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template_owned("chat", template)?;
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> Tokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-tokenizer");
        Tokenizer::load(&dir).unwrap()
    }

    /// Every recorded `/tokenize` answer of a real vLLM 0.32, token for token.
    #[test]
    fn tokens_equal_a_real_vllm_tokenize() {
        let tok = fixture();
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/vllm-0.32/kv-events/tokenize.json");
        let cases: Vec<Value> = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        assert!(cases.len() >= 7);
        for case in &cases {
            let req = &case["request"];
            let prompt = match req.get("messages") {
                Some(m) => Prompt::Chat(m),
                None => Prompt::Completion(&req["prompt"]),
            };
            let want: Vec<u32> = serde_json::from_value(case["tokens"].clone()).unwrap();
            assert_eq!(tok.tokens(prompt).unwrap(), want, "{req}");
        }
    }

    /// Chat text cut at the special tokens, its long pieces remembered, tokenizes exactly
    /// as the whole text does, the second time from the cache.
    #[test]
    fn pieces_between_special_tokens_tokenize_as_the_whole() {
        let tok = fixture();
        assert!(tok.pieces.is_some());
        let long = "The licensee may convey verbatim copies. ".repeat(20);
        for text in [
            format!("<s><|system|>\n{long}<|end|>\n<|user|>\n hi <|end|>\n<|assistant|>\n"),
            format!("{long}<|user|><|user|>  trailing {long}"),
            "no special tokens at all".to_string(),
            "<|end|>".to_string(),
            String::new(),
        ] {
            let whole = tok.encode(&text, false).unwrap();
            assert_eq!(tok.encode_chat(&text).unwrap(), whole, "{text}");
            assert_eq!(tok.encode_chat(&text).unwrap(), whole, "cached: {text}");
        }
        assert!(!tok.cache.lock().is_empty());
    }

    #[test]
    fn shapes_it_does_not_reproduce_are_refused_not_guessed() {
        let tok = fixture();
        let image = serde_json::json!([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]);
        assert!(tok.tokens(Prompt::Chat(&image)).is_err());
        let batch = serde_json::json!(["a", "b"]);
        assert!(tok.tokens(Prompt::Completion(&batch)).is_err());
        let ids = serde_json::json!([1, 2, 3]);
        assert_eq!(tok.tokens(Prompt::Completion(&ids)).unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn a_looping_template_runs_out_of_fuel() {
        let env = environment(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
                .into(),
        )
        .unwrap();
        assert!(env.get_template("chat").unwrap().render(()).is_err());
    }

    #[test]
    fn a_missing_directory_says_which_file() {
        let e = Tokenizer::load(Path::new("/nonexistent/model")).unwrap_err();
        assert!(e.contains("/nonexistent/model/tokenizer.json"), "{e}");
    }
}
