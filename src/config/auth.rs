//! The `auth:` section: the API keys file, and where the keys' limits are shared.

use std::sync::Arc;

use super::defaults;
use super::error::ConfigError;
use super::file::{FileAuth, OnRedisError};
use super::parse::{dur, Check};
use crate::auth::shared::{self, SharedLimits, SharedSettings};
use crate::auth::{ApiKeys, Secret};

/// `auth:`: the API keys file, read and checked (every mistake in it, by line).
pub(super) fn api_keys(c: &Check, auth: &FileAuth) -> Result<Option<Arc<ApiKeys>>, ConfigError> {
    match &auth.api_keys_file {
        None => Ok(None),
        Some(f) => ApiKeys::load(&c.resolve(f))
            .map(|k| Some(Arc::new(k)))
            .map_err(|all| {
                ConfigError::all(
                    all.into_iter()
                        .map(|m| c.invalid("auth.api_keys_file", m))
                        .collect(),
                )
            }),
    }
}

/// `auth.shared`: where the keys' limits are counted with other gateways'.
pub(super) fn shared_limits(
    c: &Check,
    auth: &FileAuth,
) -> Result<Option<Arc<SharedLimits>>, ConfigError> {
    let Some(sh) = &auth.shared else {
        return Ok(None);
    };
    let Some(url) = &sh.redis else {
        return Err(c.invalid(
            "auth.shared",
            "`redis` is missing: the Redis the gateways share limits through, e.g. \
             `redis: redis://10.0.0.5:6379`",
        ));
    };
    if auth.api_keys_file.is_none() {
        return Err(c.invalid(
            "auth.shared",
            "the limits it shares are the API keys' (`auth.api_keys_file`), and there is none",
        ));
    }
    let password = match &sh.password_file {
        None => None,
        Some(f) => Some(
            Secret::read(&c.resolve(f)).map_err(|m| c.invalid("auth.shared.password_file", m))?,
        ),
    };
    let ca = match &sh.ca_file {
        None => None,
        Some(f) if !url.starts_with("rediss://") => {
            return Err(c.invalid(
                "auth.shared.ca_file",
                format!("`{f}` is for a Redis reached over TLS (`rediss://`), and `redis` is not"),
            ))
        }
        Some(f) => Some(
            std::fs::read(c.resolve(f))
                .map_err(|e| c.invalid("auth.shared.ca_file", format!("cannot read `{f}`: {e}")))?,
        ),
    };
    let timeout = dur(sh.timeout, defaults::SHARED_LIMITS_TIMEOUT);
    if timeout.is_zero() {
        return Err(c.invalid("auth.shared.timeout", "must be above 0"));
    }
    SharedLimits::new(SharedSettings {
        url: url.clone(),
        password,
        ca,
        on_error: match sh.on_redis_error {
            None | Some(OnRedisError::Local) => shared::OnRedisError::Local,
            Some(OnRedisError::Deny) => shared::OnRedisError::Deny,
        },
        timeout,
    })
    .map(Some)
    .map_err(|m| c.invalid("auth.shared.redis", m))
}
