//! The shape of the source tree, checked like behaviour: modules use only the layers
//! below them (no import cycle), no function is longer than a reader holds, no file
//! holds more code than one concept needs.
//!
//! The layers, bottom to top, are `LAYERS`; `lib.rs` draws the request's path through
//! them. Test code (a `tests.rs`, a `#[cfg(test)] mod tests` at a file's end) may use
//! anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Top-level modules of `src/`, bottom first: each may use the ones before it only.
const LAYERS: &[&str] = &[
    // Leaves: names and types anything may use.
    "spelling",
    "metrics",
    "auth",
    "tls",
    "cors",
    // A model's own tokenization (the config loads it, routing and the simulator use it).
    "tokenize",
    // The configuration, the one home of every default.
    "config",
    // Facts: the gateway's HTTP client, what engines say, the OpenAI surface.
    "httpclient",
    "engine",
    "openai",
    // Fleet state, routing on it, and the services that observe it.
    "fleet",
    "routing",
    "observe",
    // Flow control: the queues requests wait in while the fleet is full.
    "flow",
    // The data plane, the admin API, and the server that wires them.
    "proxy",
    "admin",
    "server",
    // The programs.
    "sim",
    "cli",
];

/// A function longer than this many lines is a list of steps that wants names.
const MAX_FN_LINES: usize = 150;
/// Lines of code (not blank, not only a comment) in a file, tests excluded.
const MAX_FILE_CODE_LINES: usize = 900;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `text` with comments and the contents of string and character literals blanked out
/// (line breaks kept, so lines still count), so that neither is read as code.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let keep_lines = |out: &mut String, s: &[u8]| {
        for &c in s {
            out.push(if c == b'\n' { '\n' } else { ' ' });
        }
    };
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                let end = text[i..].find('\n').map_or(b.len(), |n| i + n);
                keep_lines(&mut out, &b[i..end]);
                i = end;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let (mut depth, mut j) = (1, i + 2);
                while j < b.len() && depth > 0 {
                    if b[j] == b'/' && b.get(j + 1) == Some(&b'*') {
                        depth += 1;
                        j += 1;
                    } else if b[j] == b'*' && b.get(j + 1) == Some(&b'/') {
                        depth -= 1;
                        j += 1;
                    }
                    j += 1;
                }
                keep_lines(&mut out, &b[i..j]);
                i = j;
            }
            b'r' if matches!(b.get(i + 1), Some(b'"' | b'#'))
                && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
                if b.get(i + 1 + hashes) != Some(&b'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                let close = format!("\"{}", "#".repeat(hashes));
                let start = i + 2 + hashes;
                let end = text[start..]
                    .find(&close)
                    .map_or(b.len(), |n| start + n + close.len());
                out.push_str("\"\"");
                keep_lines(&mut out, &b[i + 2..end]);
                i = end;
            }
            b'"' => {
                let mut j = i + 1;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                out.push_str("\"\"");
                keep_lines(&mut out, &b[i + 1..(j + 1).min(b.len())]);
                i = j + 1;
            }
            b'\'' => {
                // A character literal ('x', '\n', '\u{..}'), or a lifetime.
                let end = if b.get(i + 1) == Some(&b'\\') {
                    text[i + 2..].find('\'').map(|n| i + 2 + n)
                } else {
                    let c = text[i + 1..].chars().next().map_or(0, char::len_utf8);
                    (b.get(i + 1 + c) == Some(&b'\'')).then_some(i + 1 + c)
                };
                match end {
                    Some(e) => {
                        out.push_str("' '");
                        i = e + 1;
                    }
                    None => {
                        out.push('\'');
                        i += 1;
                    }
                }
            }
            _ => {
                let c = text[i..].chars().next().expect("in bounds");
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    out
}

/// A file's code without its tests: all of a `tests.rs`, else what comes before a
/// `#[cfg(test)]` module at its end.
fn without_tests(path: &Path, code: &str) -> String {
    if path.file_name().is_some_and(|n| n == "tests.rs") {
        return String::new();
    }
    let mut cut = code.len();
    for (at, _) in code.match_indices("#[cfg(test)]") {
        if code[at..]
            .trim_start_matches("#[cfg(test)]")
            .trim_start()
            .starts_with("mod tests")
        {
            cut = at;
            break;
        }
    }
    code[..cut].to_string()
}

/// The top-level module a file under `src/` belongs to (`None` for `lib.rs`, `main.rs`).
fn top_module(src: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(src).expect("under src");
    let first = rel.components().next()?.as_os_str().to_string_lossy();
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib" && name != "main").then_some(name)
}

struct Source {
    path: PathBuf,
    text: String,
    code: String,
}

fn sources() -> (PathBuf, Vec<Source>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let sources = files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("a source file");
            let code = without_tests(&path, &code_only(&text));
            Source { path, text, code }
        })
        .collect();
    (src, sources)
}

#[test]
fn modules_use_only_the_layers_below_them() {
    let (src, sources) = sources();
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    let mut wrong: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut modules = std::collections::BTreeSet::new();
    for s in &sources {
        let Some(module) = top_module(&src, &s.path) else {
            continue;
        };
        modules.insert(module.clone());
        let own = rank(&module).unwrap_or_else(|| {
            panic!("`{module}` is not in LAYERS: place it in the layer it belongs to")
        });
        let code = &s.code;
        let mut used: Vec<&str> = Vec::new();
        for (at, _) in code.match_indices("crate::") {
            let name: String = code[at + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            used.extend(LAYERS.iter().copied().filter(|l| *l == name));
        }
        // `use crate::{a, b}` groups.
        for (at, _) in code.match_indices("crate::{") {
            let group = &code[at + 8..at + 8 + code[at + 8..].find('}').unwrap_or(0)];
            for part in group.split(',') {
                let first = part.trim().split("::").next().unwrap_or("");
                used.extend(LAYERS.iter().copied().filter(|l| *l == first));
            }
        }
        for u in used {
            if rank(u).is_some_and(|r| r > own) {
                wrong
                    .entry(format!("{}", s.path.strip_prefix(&src).unwrap().display()))
                    .or_default()
                    .push(u.to_string());
            }
        }
    }
    for layer in LAYERS {
        assert!(
            modules.contains(*layer),
            "LAYERS names `{layer}`, which src/ lacks"
        );
    }
    assert!(
        wrong.is_empty(),
        "modules using a layer above their own (LAYERS, bottom first: {LAYERS:?}): {wrong:#?}"
    );
}

/// Each `fn` of `code` with a body: its name and the lines its whole text spans.
fn functions(code: &str) -> Vec<(String, usize, usize)> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut search = 0;
    while let Some(at) = code[search..].find("fn ") {
        let start = search + at;
        search = start + 3;
        if start > 0 && (b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_') {
            continue;
        }
        let name: String = code[start + 3..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() {
            continue;
        }
        // The body: the first `{` before any `;` (a declaration has none).
        let Some(open) = code[start..].find(['{', ';']).map(|n| start + n) else {
            continue;
        };
        if b[open] == b';' {
            continue;
        }
        let mut depth = 0usize;
        let mut end = open;
        for (j, &c) in b.iter().enumerate().skip(open) {
            match c {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = j;
                        break;
                    }
                }
                _ => {}
            }
        }
        let line = |p: usize| code[..p].matches('\n').count() + 1;
        out.push((name, line(start), line(end) - line(start) + 1));
    }
    out
}

#[test]
fn no_function_is_longer_than_a_reader_holds() {
    let (src, sources) = sources();
    let mut long = Vec::new();
    for s in &sources {
        for (name, line, lines) in functions(&s.code) {
            if lines > MAX_FN_LINES {
                let rel = s.path.strip_prefix(&src).unwrap().display().to_string();
                long.push(format!("{rel}:{line} `{name}`: {lines} lines"));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FN_LINES} lines: {long:#?}"
    );
}

#[test]
fn no_file_holds_more_code_than_one_concept_needs() {
    let (src, sources) = sources();
    let mut big = Vec::new();
    for s in &sources {
        let code_lines = s.code.lines().filter(|l| !l.trim().is_empty()).count();
        if code_lines > MAX_FILE_CODE_LINES {
            let rel = s.path.strip_prefix(&src).unwrap().display().to_string();
            big.push(format!("{rel}: {code_lines} lines of code"));
        }
    }
    assert!(
        big.is_empty(),
        "files over {MAX_FILE_CODE_LINES} lines of code (tests excluded): {big:#?}"
    );
    // Every module opens by saying what it owns.
    let undocumented: Vec<_> = sources
        .iter()
        .filter(|s| !s.path.ends_with("tests.rs") && !s.text.starts_with("//!"))
        .map(|s| s.path.strip_prefix(&src).unwrap().display().to_string())
        .collect();
    assert!(
        undocumented.is_empty(),
        "files that do not open with a `//!` line on what they own: {undocumented:?}"
    );
}
