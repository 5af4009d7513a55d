//! `multipart/form-data` bodies (RFC 7578 over RFC 2046), as the audio endpoints take
//! them: the boundary named by a `Content-Type`, and the named parts of a body that is
//! already in memory. Used to read a form's routing fields (`openai::inspect_form`) and
//! by the simulator to read its uploads.
//!
//! One pass over the body: each delimiter is found with `memchr::memmem`, and a part's
//! content is never copied.

use memchr::memmem;
use std::borrow::Cow;

/// The longest boundary RFC 2046 allows.
const MAX_BOUNDARY: usize = 70;
/// The most header bytes one part may carry before its content.
const MAX_PART_HEADERS: usize = 8 * 1024;

/// One part of a form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part<'a> {
    /// The `name` of its `Content-Disposition`; `None` if it has none (such a part
    /// belongs to no field).
    pub name: Option<Cow<'a, str>>,
    /// Whether it is a file upload (its `Content-Disposition` names a `filename`).
    pub is_file: bool,
    /// Its content, as sent.
    pub data: &'a [u8],
}

/// The value of the field `name` (not a file): the last one when it comes twice, as
/// vLLM's server (Starlette) reads a form.
pub fn field<'a>(parts: &[Part<'a>], name: &str) -> Option<&'a [u8]> {
    parts
        .iter()
        .rev()
        .find(|p| !p.is_file && p.name.as_deref() == Some(name))
        .map(|p| p.data)
}

/// A boolean form value as vLLM reads one (Pydantic's words, any case, spaces around);
/// `None` for anything else.
pub fn boolean(value: &[u8]) -> Option<bool> {
    let v = value.trim_ascii();
    let is = |words: &[&str]| words.iter().any(|w| v.eq_ignore_ascii_case(w.as_bytes()));
    if is(&["1", "on", "t", "true", "y", "yes"]) {
        Some(true)
    } else if is(&["0", "off", "f", "false", "n", "no"]) {
        Some(false)
    } else {
        None
    }
}

/// Whether a `Content-Type` is a form, and its boundary:
/// - `None`: not `multipart/form-data`;
/// - `Some(Err(why))`: a form whose boundary is missing or not one RFC 2046 allows;
/// - `Some(Ok(boundary))`.
pub fn boundary(content_type: &[u8]) -> Option<Result<Cow<'_, [u8]>, &'static str>> {
    let (kind, rest) = match memchr::memchr(b';', content_type) {
        Some(i) => (&content_type[..i], &content_type[i + 1..]),
        None => (content_type, &[][..]),
    };
    if !kind
        .trim_ascii()
        .eq_ignore_ascii_case(b"multipart/form-data")
    {
        return None;
    }
    let Some(b) = params(rest).find_map(|(k, v)| k.eq_ignore_ascii_case(b"boundary").then_some(v))
    else {
        return Some(Err("the multipart/form-data content type has no boundary"));
    };
    if b.is_empty() || b.len() > MAX_BOUNDARY || b.iter().any(|&c| c == b'\r' || c == b'\n') {
        return Some(Err(
            "the multipart/form-data boundary must be 1 to 70 characters",
        ));
    }
    Some(Ok(b))
}

/// The parts of a form body delimited by `boundary`, in order. The body must end with
/// the closing delimiter: a form cut short is an error, not fewer fields.
pub fn parts<'a>(body: &'a [u8], boundary: &[u8]) -> Result<Vec<Part<'a>>, &'static str> {
    scan(body, boundary).map(|(parts, _)| parts)
}

/// The form `body` with one more field, `name` = `value`, after its other parts: as the
/// last of its name, it is the one that counts ([`field`]). `value` must not break a line.
pub fn with_field(
    body: &[u8],
    boundary: &[u8],
    name: &str,
    value: &str,
) -> Result<Vec<u8>, &'static str> {
    if value.contains(['\r', '\n']) || name.contains(['\r', '\n', '"']) {
        return Err("a form field added by the gateway must fit on one line");
    }
    let (_, close) = scan(body, boundary)?;
    let part = format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}");
    let mut out = Vec::with_capacity(body.len() + part.len() + boundary.len() + 8);
    out.extend_from_slice(&body[..close]);
    if body[close..].starts_with(b"\r\n") {
        // `CRLF--boundary--` closes the last part: the new one goes before it.
        out.extend_from_slice(b"\r\n--");
        out.extend_from_slice(boundary);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(part.as_bytes());
    } else {
        // A form of no parts, `--boundary--` at its start.
        out.extend_from_slice(b"--");
        out.extend_from_slice(boundary);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(part.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(&body[close..]);
    Ok(out)
}

/// The parts of a form body, and where its closing delimiter begins (at the line break
/// before it, or at 0 when it opens the body).
fn scan<'a>(body: &'a [u8], boundary: &[u8]) -> Result<(Vec<Part<'a>>, usize), &'static str> {
    let mut delimiter = Vec::with_capacity(boundary.len() + 4);
    delimiter.extend_from_slice(b"\r\n--");
    delimiter.extend_from_slice(boundary);
    let next = memmem::Finder::new(&delimiter);
    // The first delimiter may open the body (no CRLF before it) or follow a preamble.
    let mut at = if body.starts_with(&delimiter[2..]) {
        delimiter.len() - 2
    } else {
        match next.find(body) {
            Some(i) => i + delimiter.len(),
            None => return Err("the form body has no part delimited by its boundary"),
        }
    };
    let mut parts = Vec::new();
    loop {
        let rest = &body[at..];
        if rest.starts_with(b"--") {
            // The closing delimiter; what follows it (the epilogue) is ignored.
            return Ok((parts, at.saturating_sub(delimiter.len())));
        }
        // Transport padding, then the line break that ends the delimiter line.
        let pad = rest
            .iter()
            .take_while(|&&c| c == b' ' || c == b'\t')
            .count();
        let Some(rest) = rest[pad..].strip_prefix(b"\r\n") else {
            return Err("a form delimiter is not followed by a line break");
        };
        let start = body.len() - rest.len();
        // The part's headers end at an empty line (at once if it has none).
        let (headers, content_at) = if rest.starts_with(b"\r\n") {
            (&rest[..0], start + 2)
        } else {
            let window = &rest[..rest.len().min(MAX_PART_HEADERS + 4)];
            match memmem::find(window, b"\r\n\r\n") {
                Some(i) => (&rest[..i], start + i + 4),
                None if window.len() < rest.len() => {
                    return Err("a form part's headers are too long")
                }
                None => return Err("a form part's headers do not end"),
            }
        };
        let Some(len) = next.find(&body[content_at..]) else {
            return Err("the form body ends before its closing boundary");
        };
        let (name, is_file) = disposition(headers);
        parts.push(Part {
            name,
            is_file,
            data: &body[content_at..content_at + len],
        });
        at = content_at + len + delimiter.len();
    }
}

/// The `name` and whether there is a `filename` in a part's `Content-Disposition`.
fn disposition(headers: &[u8]) -> (Option<Cow<'_, str>>, bool) {
    for line in headers.split(|&c| c == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = memchr::memchr(b':', line) else {
            continue;
        };
        if !line[..colon]
            .trim_ascii()
            .eq_ignore_ascii_case(b"content-disposition")
        {
            continue;
        }
        let value = &line[colon + 1..];
        let (kind, rest) = match memchr::memchr(b';', value) {
            Some(i) => (&value[..i], &value[i + 1..]),
            None => (value, &[][..]),
        };
        if !kind.trim_ascii().eq_ignore_ascii_case(b"form-data") {
            return (None, false);
        }
        let mut name = None;
        let mut is_file = false;
        for (k, v) in params(rest) {
            if k.eq_ignore_ascii_case(b"name") && name.is_none() {
                name = match v {
                    Cow::Borrowed(b) => std::str::from_utf8(b).ok().map(Cow::Borrowed),
                    Cow::Owned(b) => String::from_utf8(b).ok().map(Cow::Owned),
                };
            } else if k.eq_ignore_ascii_case(b"filename") || k.eq_ignore_ascii_case(b"filename*") {
                is_file = true;
            }
        }
        return (name, is_file);
    }
    (None, false)
}

/// The `key=value` parameters after a header value's first `;`: values are tokens or
/// quoted strings (whose backslash escapes are undone). Malformed pieces are skipped.
fn params(mut s: &[u8]) -> impl Iterator<Item = (&[u8], Cow<'_, [u8]>)> {
    std::iter::from_fn(move || loop {
        s = s.trim_ascii_start();
        if s.is_empty() {
            return None;
        }
        let Some(eq) = s.iter().position(|&c| c == b'=' || c == b';') else {
            s = &[];
            return None;
        };
        if s[eq] == b';' {
            s = &s[eq + 1..];
            continue;
        }
        let key = s[..eq].trim_ascii();
        let after = s[eq + 1..].trim_ascii_start();
        let (value, rest) = if let Some(q) = after.strip_prefix(b"\"") {
            let mut owned: Option<Vec<u8>> = None;
            let mut i = 0;
            let mut end = None;
            while i < q.len() {
                match q[i] {
                    b'"' => {
                        end = Some(i);
                        break;
                    }
                    b'\\' if i + 1 < q.len() => {
                        let o = owned.get_or_insert_with(|| q[..i].to_vec());
                        o.push(q[i + 1]);
                        i += 2;
                        continue;
                    }
                    c => {
                        if let Some(o) = owned.as_mut() {
                            o.push(c);
                        }
                    }
                }
                i += 1;
            }
            let end = end.unwrap_or(q.len());
            let value = match owned {
                Some(o) => Cow::Owned(o),
                None => Cow::Borrowed(&q[..end]),
            };
            let rest = &q[(end + 1).min(q.len())..];
            let rest = match memchr::memchr(b';', rest) {
                Some(i) => &rest[i + 1..],
                None => &[][..],
            };
            (value, rest)
        } else {
            match memchr::memchr(b';', after) {
                Some(i) => (Cow::Borrowed(after[..i].trim_ascii()), &after[i + 1..]),
                None => (Cow::Borrowed(after.trim_ascii()), &[][..]),
            }
        };
        s = rest;
        return Some((key, value));
    })
}

/// A form as the OpenAI SDK sends one: the fields, then a file part named `file_field`
/// holding `file`. For tests.
#[cfg(test)]
pub(crate) fn encode(b: &str, fields: &[(&str, &str)], file_field: &str, file: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in fields {
        out.extend_from_slice(
            format!("--{b}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n")
                .as_bytes(),
        );
    }
    out.extend_from_slice(
        format!(
            "--{b}\r\nContent-Disposition: form-data; name=\"{file_field}\"; filename=\"a.wav\"\r\n\
             Content-Type: audio/wav\r\n\r\n"
        )
        .as_bytes(),
    );
    out.extend_from_slice(file);
    out.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn body(b: &str, fields: &[(&str, &str)], file: &[u8]) -> Vec<u8> {
        encode(b, fields, "file", file)
    }

    #[test]
    fn the_boundary_comes_from_the_content_type() {
        let ok = |ct: &str| boundary(ct.as_bytes()).map(|r| r.map(|b| b.into_owned()));
        assert_eq!(
            ok("multipart/form-data; boundary=abc"),
            Some(Ok(b"abc".to_vec()))
        );
        assert_eq!(
            ok("Multipart/Form-Data;charset=utf-8; BOUNDARY=\"a b;c\""),
            Some(Ok(b"a b;c".to_vec()))
        );
        assert_eq!(ok("application/json"), None);
        assert_eq!(ok("multipart/mixed; boundary=x"), None);
        assert!(matches!(ok("multipart/form-data"), Some(Err(_))));
        assert!(matches!(ok("multipart/form-data; boundary="), Some(Err(_))));
        assert!(matches!(
            ok(&format!("multipart/form-data; boundary={}", "x".repeat(71))),
            Some(Err(_))
        ));
    }

    #[test]
    fn a_field_added_comes_last_and_counts() {
        let b = body("B", &[("model", ""), ("stream", "true")], b"RIFF\r\n-B");
        let out = with_field(&b, b"B", "model", "m 1").unwrap();
        let p = parts(&out, b"B").unwrap();
        assert_eq!(p.len(), 4);
        assert_eq!(field(&p, "model"), Some(&b"m 1"[..]));
        assert_eq!(p[2].data, b"RIFF\r\n-B", "the file is intact");
        assert!(out.ends_with(b"\r\n--B--\r\n"), "the epilogue stays");
        // A preamble and an epilogue, and a form of no parts.
        for b in [&b"preamble\r\n--B\r\n\r\nx\r\n--B--tail"[..], b"--B--\r\n"] {
            let out = with_field(b, b"B", "model", "m").unwrap();
            let p = parts(&out, b"B").unwrap();
            assert_eq!(
                field(&p, "model"),
                Some(&b"m"[..]),
                "{}",
                String::from_utf8_lossy(&out)
            );
        }
        assert!(with_field(&b, b"B", "model", "a\r\nb").is_err());
        assert!(with_field(b"--B\r\n\r\ncut", b"B", "model", "m").is_err());
    }

    #[test]
    fn the_last_field_of_a_name_counts_and_booleans_are_pydantic_words() {
        let b = body("B", &[("stream", "no"), ("stream", " TRUE ")], b"x");
        let p = parts(&b, b"B").unwrap();
        assert_eq!(field(&p, "stream"), Some(&b" TRUE "[..]));
        assert_eq!(field(&p, "file"), None, "a file is not a field");
        assert_eq!(boolean(b" TRUE "), Some(true));
        assert_eq!(boolean(b"Off"), Some(false));
        assert_eq!(boolean(b"maybe"), None);
        assert_eq!(boolean(b""), None);
    }

    #[test]
    fn fields_and_files_are_read_in_order_without_copying() {
        // The file holds the boundary without the CRLF that makes it a delimiter, and CRLFs.
        let file = b"RIFF--xyz not the end\r\n\r\n\x00\xff\r\n-";
        let b = body("xyz", &[("model", "whisper"), ("stream", "true")], file);
        let p = parts(&b, b"xyz").unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].name.as_deref(), Some("model"));
        assert_eq!(p[0].data, b"whisper");
        assert!(!p[0].is_file);
        assert_eq!(p[1].data, b"true");
        assert_eq!(p[2].name.as_deref(), Some("file"));
        assert!(p[2].is_file);
        assert_eq!(p[2].data, &file[..]);
        // Borrowed from the body.
        assert!(b.as_ptr_range().contains(&p[2].data.as_ptr()));
    }

    #[test]
    fn preamble_padding_headerless_parts_and_epilogue() {
        let b = b"preamble\r\n--B  \r\ncontent-disposition:FORM-DATA;name=model\r\n\r\nm1\r\n\
                  --B\r\n\r\nno headers\r\n--B\r\nContent-Disposition: form-data; \
                  name=\"q\\\"x\"\r\n\r\n\r\n--B--epilogue";
        let p = parts(b, b"B").unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].name.as_deref(), Some("model"));
        assert_eq!(p[0].data, b"m1");
        assert_eq!(p[1].name, None);
        assert_eq!(p[1].data, b"no headers");
        assert_eq!(p[2].name.as_deref(), Some("q\"x"));
        assert_eq!(p[2].data, b"");
    }

    #[test]
    fn forms_cut_short_or_malformed_are_errors() {
        let whole = body("B", &[("model", "m")], b"data");
        // Every prefix that lacks the closing delimiter is refused.
        let closing = whole.len() - b"\r\n".len();
        for cut in 0..closing {
            assert!(parts(&whole[..cut], b"B").is_err(), "cut at {cut}");
        }
        assert!(parts(&whole[..closing], b"B").is_ok());
        assert!(parts(b"--Bjunk\r\n\r\nx\r\n--B--", b"B").is_err());
        assert!(parts(b"no delimiter at all", b"B").is_err());
        let long = format!(
            "--B\r\nX: {}\r\n\r\nv\r\n--B--",
            "y".repeat(MAX_PART_HEADERS)
        );
        assert_eq!(
            parts(long.as_bytes(), b"B"),
            Err("a form part's headers are too long")
        );
    }

    proptest! {
        /// Any bytes with any boundary: parts or an error, never a panic, and every
        /// part's content lies inside the body.
        #[test]
        fn any_bytes_give_parts_or_an_error(body in proptest::collection::vec(
            prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'-'), Just(b'B'), Just(b'"'),
                        Just(b';'), Just(b'='), any::<u8>()], 0..300)) {
            if let Ok(p) = parts(&body, b"B") {
                for part in &p {
                    prop_assert!(body.as_ptr_range().contains(&part.data.as_ptr())
                        || part.data.is_empty());
                }
                // A field added to any form that reads is read back last, after the
                // same parts.
                let out = with_field(&body, b"B", "model", "m").unwrap();
                let q = parts(&out, b"B").unwrap();
                prop_assert_eq!(q.len(), p.len() + 1);
                prop_assert_eq!(&q[..p.len()], &p[..]);
                prop_assert_eq!(field(&q, "model"), Some(&b"m"[..]));
            } else {
                prop_assert!(with_field(&body, b"B", "model", "m").is_err());
            }
            let _ = boundary(&body);
        }

        /// What `body` writes, `parts` reads back.
        #[test]
        fn written_forms_read_back(model in "[a-zA-Z0-9/._-]{1,40}",
                                   file in proptest::collection::vec(any::<u8>(), 0..200)) {
            let b = body("----b0undary", &[("model", &model)], &file);
            let p = parts(&b, b"----b0undary").unwrap();
            prop_assert_eq!(p.len(), 2);
            prop_assert_eq!(p[0].data, model.as_bytes());
            prop_assert_eq!(p[1].data, &file[..]);
            let out = with_field(&b, b"----b0undary", "model", "other").unwrap();
            let q = parts(&out, b"----b0undary").unwrap();
            prop_assert_eq!(&q[..2], &p[..]);
            prop_assert_eq!(field(&q, "model"), Some(&b"other"[..]));
        }
    }
}
