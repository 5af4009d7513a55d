//! The model a request is routed by and sent as, when it is not the one it names: the
//! default model for a request that names none, the model an alias stands for. The body
//! is rewritten to name it.

use serde_json::value::RawValue;

use super::{inspect_request, ApiError, RoutingInfo};

/// A request whose body the gateway rewrote to name the model it is routed by
/// ([`route_model`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renamed {
    pub body: Vec<u8>,
    /// Its routing fields, read again from `body`.
    pub info: RoutingInfo,
    /// It named no model and got the default.
    pub defaulted: bool,
    /// It named this alias (`routing.model_aliases`) of the model it now names.
    pub alias: Option<String>,
}

/// The model a request (read by [`inspect_request`]) is routed by and sent as:
/// - the one it names;
/// - when it names none ([`RoutingInfo::model`] empty), the `default`
///   (the fleet's default model, or `routing.default_model`): vLLM would serve it with
///   its own first model;
/// - for an alias (in `aliases`, the default included), the model it stands for.
///
/// In the last two cases the model is written into the body ([`with_model`]), so that it
/// is the same wherever the request goes and the one it was routed by (also an adapter);
/// `None` when the body stays as it is.
pub fn route_model<'a>(
    content_type: Option<&[u8]>,
    body: &[u8],
    info: &'a RoutingInfo,
    aliases: &'a std::collections::BTreeMap<String, String>,
    default: impl FnOnce() -> Result<&'a str, Vec<&'a str>>,
    max_depth: usize,
) -> Result<Option<Renamed>, ApiError> {
    let defaulted = info.model.is_empty();
    let asked = if defaulted {
        default().map_err(|firsts| ApiError::no_default_model(&firsts))?
    } else {
        info.model.as_str()
    };
    let target = aliases.get(asked);
    if !defaulted && target.is_none() {
        return Ok(None);
    }
    let model = target.map_or(asked, String::as_str);
    let (body, info) = with_model(content_type, body, model, max_depth)?;
    Ok(Some(Renamed {
        body,
        info,
        defaulted,
        alias: target.map(|_| asked.to_string()),
    }))
}

/// A request (read by [`inspect_request`] already) made to name `model`: its body with the
/// model written in, and its routing fields read again. A JSON body's `model` is set (or
/// put first when absent); a form gets a `model` field after its others, which counts.
pub fn with_model(
    content_type: Option<&[u8]>,
    body: &[u8],
    model: &str,
    max_depth: usize,
) -> Result<(Vec<u8>, RoutingInfo), ApiError> {
    let named = match content_type.and_then(crate::openai::form::boundary) {
        Some(Ok(boundary)) => crate::openai::form::with_field(body, &boundary, "model", model)
            .map_err(|why| {
                ApiError::bad_request(format!("The request form is malformed: {why}."), None)
            })?,
        _ => json_with_model(body, model).ok_or_else(|| {
            ApiError::bad_request("The request body must be a JSON object.", None)
        })?,
    };
    let info = inspect_request(content_type, &named, max_depth)?;
    Ok((named, info))
}

/// A JSON object `body` with its `model` member's value replaced by `model`, or the member
/// put first when there is none; `None` if `body` is not an object.
fn json_with_model(body: &[u8], model: &str) -> Option<Vec<u8>> {
    let value = serde_json::to_string(model).expect("a string serializes");
    json_with_member(body, "model", |_| Some(value))
}

/// A chat or completion request (`body`, a JSON object) carrying vLLM's `priority`
/// field: `priority`, or the client's own when that is larger (lower in vLLM's order:
/// a client may lower its request, never raise it); `None` when `body` is not a JSON
/// object, or already says so.
pub fn with_priority(body: &[u8], priority: i64) -> Option<Vec<u8>> {
    json_with_member(body, "priority", |given| match given {
        Some(raw) => match raw.trim().parse::<i64>() {
            Ok(p) if p >= priority => None,
            _ => Some(priority.to_string()),
        },
        None => Some(priority.to_string()),
    })
}

/// A JSON object `body` with its top-level member `name` set to the JSON text `value`
/// returns for the member's raw text (`None` when absent), or put first when there is
/// none; `None` if `body` is not an object, or `value` leaves it as it is.
fn json_with_member(
    body: &[u8],
    name: &str,
    value: impl FnOnce(Option<&str>) -> Option<String>,
) -> Option<Vec<u8>> {
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[open] != b'{' {
        return None;
    }
    // The other members are skipped as `inspect` skips them (strings not checked for
    // UTF-8: vLLM answers for what it cannot decode).
    struct Member<'a>(Option<&'a RawValue>);
    struct Seek<'n>(&'n str);
    impl<'de, 'n> serde::de::DeserializeSeed<'de> for Seek<'n> {
        type Value = Member<'de>;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Member<'de>, D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de, 'n> serde::de::Visitor<'de> for Seek<'n> {
        type Value = Member<'de>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut m: A,
        ) -> Result<Member<'de>, A::Error> {
            let mut found = None;
            while let Some(k) = m.next_key::<std::borrow::Cow<'de, str>>()? {
                if k == self.0 {
                    if found.is_some() {
                        return Err(serde::de::Error::duplicate_field("member"));
                    }
                    found = Some(m.next_value::<&'de RawValue>()?);
                } else {
                    m.next_value::<serde::de::IgnoredAny>()?;
                }
            }
            Ok(Member(found))
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let found = serde::de::DeserializeSeed::deserialize(Seek(name), &mut de).ok()?;
    de.end().ok()?;
    let raw = found.0;
    let text = value(raw.map(|r| r.get()))?;
    let (at, replaced, member) = match raw {
        Some(raw) => {
            let start = (raw.get().as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
            (start, raw.get().len(), text)
        }
        None => {
            let empty = body[open + 1..]
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .is_some_and(|&b| b == b'}');
            let sep = if empty { "" } else { "," };
            let key = serde_json::to_string(name).expect("a string serializes");
            (open + 1, 0, format!("{key}:{text}{sep}"))
        }
    };
    let mut out = Vec::with_capacity(body.len() + member.len());
    out.extend_from_slice(&body[..at]);
    out.extend_from_slice(member.as_bytes());
    out.extend_from_slice(body.get(at + replaced..)?);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_is_set_and_a_client_may_only_lower_it() {
        let set =
            |b: &str, p| with_priority(b.as_bytes(), p).map(|v| String::from_utf8(v).unwrap());
        assert_eq!(
            set(r#"{"model":"m","messages":[]}"#, 10).as_deref(),
            Some(r#"{"priority":10,"model":"m","messages":[]}"#)
        );
        assert_eq!(set("{}", -10).as_deref(), Some(r#"{"priority":-10}"#));
        // The client's own priority is kept when it is lower (a larger number)...
        assert_eq!(set(r#"{"priority": 20, "model":"m"}"#, 0), None);
        // ...and replaced when it would raise the request.
        assert_eq!(
            set(r#"{"priority": -50, "model":"m"}"#, 0).as_deref(),
            Some(r#"{"priority": 0, "model":"m"}"#)
        );
        assert_eq!(
            set(r#"{"priority":"x"}"#, 0).as_deref(),
            Some(r#"{"priority":0}"#)
        );
        // Not an object, or a member twice: left to the engine to refuse.
        assert_eq!(set("[1]", 0), None);
        assert_eq!(set(r#"{"priority":1,"priority":2}"#, 0), None);
    }
}
