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
}

/// serde_yaml starts some messages with the key path (or its parent), which we already
/// show.
pub(super) fn strip_key_prefix(msg: &str, key: &str) -> String {
    match msg.split_once(": ") {
        Some((head, rest)) if !head.is_empty() && key.starts_with(head) => rest.to_string(),
        _ => msg.to_string(),
    }
}

/// serde_yaml appends " at line L column C" to its messages; we print the location first.
pub(super) fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
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
        let (name, index) = match part.find('[') {
            Some(i) => (
                &part[..i],
                part[i + 1..part.len() - 1].parse::<usize>().ok(),
            ),
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
