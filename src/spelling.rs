//! "Did you mean": the option nearest a mistyped word, for messages about config keys,
//! values and keys-file limits. A leaf: uses nothing of the crate.

/// The option closest to `word` (by edit distance, `strsim`), if it is close enough to be
/// a typo of it: at most two edits, or a third of the word's length for long words.
pub fn nearest<'a>(word: &str, options: &[&'a str]) -> Option<&'a str> {
    let (best, d) = options
        .iter()
        .map(|o| (*o, strsim::levenshtein(word, o)))
        .min_by_key(|(_, d)| *d)?;
    (d > 0 && d <= 2.max(word.len() / 3)).then_some(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typo_finds_its_word_and_a_stranger_nothing() {
        let keys = ["policy", "default_model", "model_aliases"];
        assert_eq!(nearest("polcy", &keys), Some("policy"));
        assert_eq!(nearest("defualt_model", &keys), Some("default_model"));
        assert_eq!(nearest("weight", &keys), None);
        assert_eq!(nearest("policy", &keys), None, "the word itself is no typo");
    }
}
