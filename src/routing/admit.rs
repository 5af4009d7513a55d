//! What the gateway decides about an inference request before it picks a replica, the
//! same for the request path and for `/explain`: what it reads of the request, the model
//! it routes it by (the default, an alias's model), its affinity key, and whether a
//! replica could take it now.

use bytes::Bytes;

use super::affinity::{self, AffinityKey};
use super::{availability, NoCandidate};
use crate::config::Config;
use crate::fleet::FleetSnapshot;
use crate::openai::{self, ApiError, RoutingInfo};

/// An inference request as the gateway routes it.
#[derive(Debug, Clone)]
pub struct Routed {
    /// Its body as it will be sent: naming the model it is routed by.
    pub body: Bytes,
    pub info: RoutingInfo,
    /// It named this alias (`routing.model_aliases`) of the model it now names.
    pub alias: Option<String>,
    /// It named no model and got the default.
    pub defaulted: bool,
    /// Its prefix-affinity key, when the config uses affinity.
    pub affinity: Option<AffinityKey>,
    /// Its token ids, when the model has a tokenizer (`routing.tokenizers`): exact prefix
    /// routing on KV events.
    pub tokens: Option<std::sync::Arc<super::prefix::PromptTokens>>,
}

impl Routed {
    /// The model name the client used: the alias, if it named one.
    pub fn asked(&self) -> &str {
        self.alias.as_deref().unwrap_or(&self.info.model)
    }
}

/// Reads an inference request (its `headers` and whole `body`) as the gateway routes it,
/// or the error it is answered with: a body that cannot be read, a default model that
/// cannot be told.
pub fn admit(
    cfg: &Config,
    snap: &FleetSnapshot,
    headers: &http::HeaderMap,
    body: Bytes,
) -> Result<Routed, ApiError> {
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.as_bytes());
    let info = openai::inspect_request(content_type, &body, cfg.limits.max_json_depth)?;
    let (body, info, alias, defaulted) = match route_model(snap, cfg, content_type, &body, &info)? {
        None => (body, info, None, false),
        Some(r) => (Bytes::from(r.body), r.info, r.alias, r.defaulted),
    };
    let affinity = affinity::request_key(cfg, headers, &body, &info);
    Ok(Routed {
        body,
        info,
        alias,
        defaulted,
        affinity,
        // Counted next, off the async worker when long (`prefix::tokens_of`).
        tokens: None,
    })
}

/// The answer to a request for `model` (asked for as `asked`, an alias perhaps) when no
/// replica can take it now: 404 for a model no backend serves, 503 while its replicas are
/// all out of rotation or its host name has no address yet (a Kubernetes Service during
/// a rollout: clients retry a 503); `None` when one can.
pub fn refusal(cfg: &Config, snap: &FleetSnapshot, model: &str, asked: &str) -> Option<ApiError> {
    match availability(snap, model) {
        Ok(()) => None,
        Err(NoCandidate::UnknownModel) if !cfg.awaits(model) => {
            Some(ApiError::model_not_found(asked))
        }
        Err(NoCandidate::Unavailable | NoCandidate::UnknownModel) => {
            Some(ApiError::no_backend(model))
        }
    }
}

/// The model a request (read by [`crate::openai::inspect_request`]) is routed by and sent
/// as under `cfg`: [`crate::openai::route_model`] with the fleet's
/// [`FleetSnapshot::default_model`] and `cfg`'s aliases.
pub fn route_model(
    snap: &FleetSnapshot,
    cfg: &crate::config::Config,
    content_type: Option<&[u8]>,
    body: &[u8],
    info: &crate::openai::RoutingInfo,
) -> Result<Option<crate::openai::Renamed>, crate::openai::ApiError> {
    crate::openai::route_model(
        content_type,
        body,
        info,
        &cfg.model_aliases,
        || snap.default_model(cfg.default_model.as_deref()),
        cfg.limits.max_json_depth,
    )
}
