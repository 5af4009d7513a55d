//! The model a request is routed by and sent as, when it is not the one it names: the
//! default model for a request that names none, the model an alias stands for. The body
//! is rewritten to name it.

use serde::Deserialize;
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
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[open] != b'{' {
        return None;
    }
    let value = serde_json::to_string(model).expect("a string serializes");
    #[derive(Deserialize)]
    struct ModelOnly<'a> {
        #[serde(borrow, default, deserialize_with = "present")]
        model: Option<&'a RawValue>,
    }
    /// The member's raw text, `null` included (an `Option` alone reads it as absent).
    fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
        <&RawValue>::deserialize(d).map(Some)
    }
    // The other members are skipped as `inspect` skips them (strings not checked for
    // UTF-8: vLLM answers for what it cannot decode).
    let found: ModelOnly = serde_json::from_slice(body).ok()?;
    let (at, replaced, member) = match found.model {
        Some(raw) => {
            let start = (raw.get().as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
            (start, raw.get().len(), value)
        }
        None => {
            let empty = body[open + 1..]
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .is_some_and(|&b| b == b'}');
            let sep = if empty { "" } else { "," };
            (open + 1, 0, format!("\"model\":{value}{sep}"))
        }
    };
    let mut out = Vec::with_capacity(body.len() + member.len());
    out.extend_from_slice(&body[..at]);
    out.extend_from_slice(member.as_bytes());
    out.extend_from_slice(body.get(at + replaced..)?);
    Some(out)
}
