//! What is wrong with a configuration, and where in its file.

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("environment variable {var}: {message}")]
    Env { var: &'static str, message: String },
    #[error("{path}:{line}:{column}: `{key}`: {message}")]
    Invalid {
        path: String,
        line: usize,
        column: usize,
        key: String,
        message: String,
    },
    /// The text is not YAML (or not YAML this file may hold): no key can be named.
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// Every mistake of a file, in the file's order, one per line.
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Several(Vec<ConfigError>),
}

impl ConfigError {
    /// One error for `errors` (at least one), flattened and in the file's order.
    pub(super) fn all(errors: Vec<ConfigError>) -> ConfigError {
        let mut flat = Vec::with_capacity(errors.len());
        for e in errors {
            match e {
                ConfigError::Several(inner) => flat.extend(inner),
                e => flat.push(e),
            }
        }
        flat.sort_by_key(|e| e.position());
        if flat.len() == 1 {
            flat.pop().expect("one error")
        } else {
            ConfigError::Several(flat)
        }
    }

    /// Each mistake, for printing one per line.
    pub fn problems(&self) -> Vec<&ConfigError> {
        match self {
            ConfigError::Several(all) => all.iter().collect(),
            e => vec![e],
        }
    }

    /// Where in the file, for ordering.
    fn position(&self) -> (usize, usize) {
        match self {
            ConfigError::Invalid { line, column, .. }
            | ConfigError::Syntax { line, column, .. } => (*line, *column),
            _ => (0, 0),
        }
    }

    /// The key it is about, if any.
    pub(super) fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// serde_yaml starts some messages with the key path (or its parent), which we already
/// show.
pub(super) fn strip_key_prefix(msg: &str, key: &str) -> String {
    match msg.split_once(": ") {
        Some((head, rest)) if !head.is_empty() && key.starts_with(head) => rest.to_string(),
        _ => msg.to_string(),
    }
}

/// serde_yaml appends " at line L column C" (and what it was parsing) to its messages;
/// we print the location first.
pub(super) fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// serde's message about a value, in the words a person uses: `invalid type: string
/// "heavy", expected f64` is "expected a number, found the text "heavy"".
pub(super) fn plain_words(msg: &str) -> String {
    if let Some(rest) = msg
        .strip_prefix("invalid type: ")
        .or_else(|| msg.strip_prefix("invalid value: "))
    {
        if let Some((found, expected)) = rest.rsplit_once(", expected ") {
            return format!(
                "expected {}, found {}",
                expected_words(expected),
                found_words(found)
            );
        }
    }
    if let Some(rest) = msg.strip_prefix("unknown field ") {
        return unknown("key", rest);
    }
    if let Some(rest) = msg.strip_prefix("unknown variant ") {
        return unknown("value", rest);
    }
    if let Some(rest) = msg.strip_prefix("missing field ") {
        return format!("the key {rest} is required here");
    }
    if let Some(rest) = msg.strip_prefix("duplicate field ") {
        return format!("{rest} is given twice; give each key once");
    }
    msg.to_string()
}

/// serde's `unknown field `polcy`, expected one of `policy`, `default_model``: the word,
/// what it was probably meant to be, and the choices.
fn unknown(what: &str, rest: &str) -> String {
    let (word, choices) = match rest.split_once(", expected ") {
        Some((w, c)) => (w, c.strip_prefix("one of ").unwrap_or(c)),
        None => (rest.split(',').next().unwrap_or(rest), ""),
    };
    let bare = word.trim_matches('`');
    let options: Vec<&str> = choices
        .split(", ")
        .map(|c| c.trim_matches('`'))
        .filter(|c| !c.is_empty())
        .collect();
    let mut out = format!("unknown {what} {word}");
    if let Some(near) = crate::spelling::nearest(bare, &options) {
        out.push_str(&format!(" (did you mean `{near}`?)"));
    }
    match options.len() {
        0 => out.push_str(if what == "key" {
            "; this section has no keys"
        } else {
            ""
        }),
        _ => out.push_str(&format!("; expected one of {choices}")),
    }
    out
}

/// What serde expected (a Rust type or its own phrase), in words.
fn expected_words(e: &str) -> String {
    match e {
        "f32" | "f64" => "a number".into(),
        "u8" => "a whole number from 0 to 255".into(),
        "u16" => "a whole number from 0 to 65535".into(),
        "u32" => "a whole number from 0 to 4294967295".into(),
        "u64" | "usize" => "a whole number, 0 or more".into(),
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number".into(),
        "a boolean" => "true or false".into(),
        "a string" => "text".into(),
        "a sequence" => "a list (`- item` lines, or `[a, b]`)".into(),
        "a map" => "`key: value` lines".into(),
        s if s.starts_with("struct ") => "`key: value` lines".into(),
        s => s.to_string(),
    }
}

/// What serde found, in words.
fn found_words(f: &str) -> String {
    let inner = |p: &str| f.strip_prefix(p).map(|v| v.trim_matches('`').to_string());
    if let Some(v) = f.strip_prefix("string ") {
        format!("the text {v}")
    } else if let Some(v) = inner("integer ").or_else(|| inner("floating point ")) {
        format!("the number {v}")
    } else if let Some(v) = inner("boolean ") {
        v
    } else {
        match f {
            "sequence" => "a list".into(),
            "map" => "`key: value` lines".into(),
            "unit value" => "nothing (an empty value)".into(),
            f => f.to_string(),
        }
    }
}

/// A YAML syntax error where it is, in words: (line, column, message).
pub(super) fn syntax_words(text: &str, e: &serde_yaml::Error) -> (usize, usize, String) {
    let (line, column) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
    let raw = e.to_string();
    let at = text
        .lines()
        .nth(line.saturating_sub(1))
        .and_then(|l| l.chars().nth(column.saturating_sub(1)));
    let words =
        if at == Some('\t') || (raw.contains("cannot start any token") && tab_near(text, line)) {
            "a tab character: YAML indents with spaces, never tabs".to_string()
        } else if let Some(key) = raw
            .strip_prefix("duplicate entry with key ")
            .map(|k| k.split(" at line ").next().unwrap_or(k).trim_matches('"'))
        {
            let indent = column.saturating_sub(1);
            let twice: Vec<usize> = text
                .lines()
                .enumerate()
                .skip(line.saturating_sub(1))
                .filter(|(_, l)| {
                    l.len() - l.trim_start().len() == indent
                        && l.trim_start()
                            .trim_start_matches("- ")
                            .starts_with(&format!("{key}:"))
                })
                .map(|(i, _)| i + 1)
                .collect();
            if let [first, second, ..] = twice[..] {
                return (
                    second,
                    indent + 1,
                    format!("`{key}` is given twice (first on line {first}); give each key once"),
                );
            }
            format!("`{key}` is given twice; give each key once")
        } else if raw.contains("did not find expected '-' indicator")
            || raw.contains("while parsing a block collection")
        {
            "this line is indented differently from the list items above it (the items of a \
         list start with `- ` at the same column)"
                .into()
        } else if raw.contains("did not find expected key")
            || raw.contains("while parsing a block mapping")
        {
            "this line is indented differently from the keys above it (the keys of one section \
         start at the same column)"
                .into()
        } else if raw.contains("mapping values are not allowed") {
            "a `key: value` where none can be: this line is indented deeper than the key above \
         it, or a value holds `: ` (put such a value in quotes)"
                .into()
        } else if raw.contains("while parsing a flow sequence") {
            "a `[` list that is not closed with `]`".into()
        } else if raw.contains("while parsing a flow mapping") {
            "a `{` that is not closed with `}`".into()
        } else if raw.contains("while scanning a quoted scalar") {
            "a quoted value whose closing quote is missing".into()
        } else {
            strip_location(&raw)
        };
    (line, column, words)
}

/// Whether line `line` (1-based) or the one before it holds a tab in its indentation.
fn tab_near(text: &str, line: usize) -> bool {
    text.lines().skip(line.saturating_sub(2)).take(2).any(|l| {
        l.chars()
            .take_while(|c| c.is_whitespace())
            .any(|c| c == '\t')
    })
}

/// Best-effort line and column of a key path like `backends[1].url` for checks made after
/// parsing (serde_yaml keeps no spans): follows the path's names and indices through the
/// indentation of the text, stopping at the deepest part it can find.
pub(super) fn locate_key(text: &str, key: &str) -> (usize, usize) {
    let lines: Vec<&str> = text.lines().collect();
    let mut from = 0usize;
    let mut min_indent = 0usize;
    let mut found = (1usize, 1usize);
    for part in key.split('.') {
        // `name[3]`: a list item; any other text (an unknown key may hold anything) is a name.
        let indexed = part
            .strip_suffix(']')
            .and_then(|p| p.rsplit_once('['))
            .and_then(|(n, i)| Some((n, i.parse::<usize>().ok()?)));
        let (name, index) = match indexed {
            Some((n, i)) => (n, Some(i)),
            None => (part, None),
        };
        let needle = format!("{name}:");
        let Some(pos) = (from..lines.len()).find(|&i| {
            let l = lines[i];
            let indent = l.len() - l.trim_start().len();
            let t = l.trim_start().trim_start_matches("- ");
            indent >= min_indent && t.starts_with(&needle)
        }) else {
            break;
        };
        let indent = lines[pos].len() - lines[pos].trim_start().len();
        found = (pos + 1, indent + 1);
        from = pos + 1;
        min_indent = indent;
        if let Some(index) = index {
            // The index-th "- " item after the key.
            let items: Vec<usize> = (from..lines.len())
                .filter(|&i| lines[i].trim_start().starts_with("- "))
                .collect();
            if let Some(&item) = items.get(index) {
                let ind = lines[item].len() - lines[item].trim_start().len();
                found = (item + 1, ind + 1);
                from = item;
                min_indent = ind;
            }
        }
    }
    found
}
