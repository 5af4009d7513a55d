//! Per-key limits shared by every gateway that points at the same Redis (`auth.shared`).
//!
//! Alone, a gateway counts a key's `max_concurrent`, `rpm` and `tpm` in its own memory;
//! three gateways behind one load balancer would let a key have three times each. With
//! `auth.shared.redis` set, the counts live in Redis and every gateway takes from them:
//!
//! - **Admission is one round trip**: once a request's body is read (its prompt's tokens
//!   estimated), one Lua script, run atomically by Redis, checks the key's concurrency
//!   (a sorted set of leases, each expiring unless renewed), its `tpm` balance and its
//!   `rpm` bucket, and takes a lease, a request and the prompt's tokens at once; two
//!   gateways cannot both take the last unit. Time is Redis's own (`TIME`), so the
//!   gateways' clocks need not agree.
//! - **Settlement is in the background**: a request's end (its lease given back, its
//!   tokens settled against the estimate) is queued and sent in pipelined batches, off
//!   the request path. Leases of requests still running are renewed every
//!   [`RENEW_EVERY`]; a gateway that dies leaves leases that expire after [`LEASE`].
//! - **Redis slow or down**: an admission waits at most `auth.shared.timeout`. Then, and
//!   for [`BACKOFF`] after, requests are admitted by the gateway's own counts
//!   (`on_redis_error: local`, the default) or refused with a 503 (`deny`). The next
//!   admission after the back-off tries Redis again: recovery needs no restart.
//!
//! Redis keys: `vllm-edge:{NAME}:c` (leases), `:r` (the `rpm` bucket), `:t` (the `tpm`
//! balance), where NAME is the key's name in the keys file (never the key itself); the
//! braces keep one key's counts in one Redis Cluster slot. A bucket's Redis key expires
//! when it would have refilled, so an idle key leaves nothing behind.

use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use redis::{Client, Script};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use super::{Denied, Identified, KeyLimits, Permit, Secret};

/// How long a lease holds a concurrency slot unless renewed.
pub const LEASE: Duration = Duration::from_secs(30);
/// How often the leases of running requests are renewed.
pub const RENEW_EVERY: Duration = Duration::from_secs(10);
/// After Redis failed, how long admissions go straight to the fallback.
pub const BACKOFF: Duration = Duration::from_secs(1);
/// The most settlements sent in one pipelined batch.
const BATCH: usize = 256;

/// What a gateway does with a request whose admission Redis could not answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnRedisError {
    /// Admit it by this gateway's own counts of the key (as without `auth.shared`).
    #[default]
    Local,
    /// Refuse it: 503, retry shortly.
    Deny,
}

/// `auth.shared`, checked.
#[derive(Debug, Clone)]
pub struct SharedSettings {
    /// `redis://HOST:PORT[/DB]` or `rediss://` (TLS).
    pub url: String,
    pub password: Option<Secret>,
    /// PEM certificates of the CA that signed a `rediss://` Redis's certificate, when it
    /// is not one the system trusts.
    pub ca: Option<Vec<u8>>,
    pub on_error: OnRedisError,
    /// The longest an admission waits for Redis.
    pub timeout: Duration,
}

impl SharedSettings {
    /// Whether `other` points at the same Redis the same way.
    pub fn same_as(&self, other: &SharedSettings) -> bool {
        self.url == other.url
            && self.password.as_ref().map(Secret::expose)
                == other.password.as_ref().map(Secret::expose)
            && self.ca == other.ca
            && self.on_error == other.on_error
            && self.timeout == other.timeout
    }
}

/// How a request was admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The key has no limit: nothing was asked of Redis.
    Unlimited,
    Redis,
    /// Redis did not answer in time (or is backing off): the gateway's own counts.
    Local,
}

/// Why a shared admission refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// A limit of the key (as counted in Redis, or locally when it fell back).
    Limited(Denied),
    /// Redis did not answer and `on_redis_error` is `deny`.
    Unavailable,
}

/// The counts of every key, in one Redis, for the gateways that share it.
pub struct SharedLimits {
    settings: SharedSettings,
    client: Client,
    /// Connected on first use; it reconnects by itself after that.
    conn: Mutex<Option<ConnectionManager>>,
    /// Until when (ms since `epoch`) admissions skip Redis after a failure; 0 when up.
    down_until: AtomicU64,
    epoch: Instant,
    /// This gateway's lease ids: `GATEWAY:N`.
    gateway: String,
    next_lease: AtomicU64,
    /// Leases of requests still running: lease id → Redis key of its set.
    live: Mutex<HashMap<String, String>>,
    /// Ends of requests, for the settler.
    settle_tx: mpsc::UnboundedSender<Settle>,
    settle_rx: Mutex<Option<mpsc::UnboundedReceiver<Settle>>>,
    started: AtomicBool,
    admit: Script,
    settle: Script,
    renew: Script,
}

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimits")
            .field("url", &redact(&self.settings.url))
            .field("on_error", &self.settings.on_error)
            .finish_non_exhaustive()
    }
}

/// A request's end, to be told to Redis.
#[derive(Debug)]
pub(super) struct Settle {
    pub(super) name: Arc<str>,
    pub(super) lease: Option<String>,
    pub(super) tpm: u32,
    /// Tokens to take (used less reserved; negative gives back).
    pub(super) delta: i64,
}

/// A shared permit's hold: where its end is sent.
#[derive(Debug)]
pub(super) struct Hold {
    pub(super) limits: Arc<SharedLimits>,
    pub(super) lease: Option<String>,
    /// Tokens to settle when it ends (used less reserved), once known.
    pub(super) delta: AtomicI64,
}

impl SharedLimits {
    /// Checks the URL (nothing is connected until the first admission).
    pub fn new(settings: SharedSettings) -> Result<Arc<SharedLimits>, String> {
        let mut info = redis::IntoConnectionInfo::into_connection_info(settings.url.as_str())
            .map_err(|e| {
                format!(
                    "`{}` is not a Redis URL (redis://HOST:PORT or rediss://HOST:PORT): {e}",
                    redact(&settings.url)
                )
            })?;
        if let Some(p) = &settings.password {
            let with_password = info.redis_settings().clone().set_password(p.expose());
            info = info.set_redis_settings(with_password);
        }
        let client = match &settings.ca {
            None => Client::open(info),
            Some(pem) => Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            ),
        }
        .map_err(|e| format!("{}: {e}", redact(&settings.url)))?;
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        Ok(Arc::new(SharedLimits {
            settings,
            client,
            conn: Mutex::new(None),
            down_until: AtomicU64::new(0),
            epoch: Instant::now(),
            gateway: format!("{:016x}", rand::random::<u64>()),
            next_lease: AtomicU64::new(0),
            live: Mutex::new(HashMap::new()),
            settle_tx,
            settle_rx: Mutex::new(Some(settle_rx)),
            started: AtomicBool::new(false),
            admit: Script::new(ADMIT),
            settle: Script::new(SETTLE),
            renew: Script::new(RENEW),
        }))
    }

    pub fn settings(&self) -> &SharedSettings {
        &self.settings
    }

    /// Admits a request of `key` whose prompt is about `prompt` tokens: one round trip to
    /// Redis, or the fallback when it does not answer within the timeout.
    pub async fn admit(
        self: &Arc<Self>,
        key: &Identified,
        prompt: u64,
    ) -> (Result<Permit, Refused>, Via) {
        self.start();
        let l = key.limits;
        if l.max_concurrent.is_none()
            && l.requests_per_minute.is_none()
            && l.tokens_per_minute.is_none()
        {
            // Nothing to count: no round trip.
            return (Ok(self.permit(key, None)), Via::Unlimited);
        }
        if self.backing_off() {
            return (self.fallback(key, prompt), Via::Local);
        }
        let lease = l.max_concurrent.map(|_| {
            format!(
                "{}:{}",
                self.gateway,
                self.next_lease.fetch_add(1, Ordering::Relaxed)
            )
        });
        let verdict = tokio::time::timeout(
            self.settings.timeout,
            self.run_admit(&key.name, &l, lease.as_deref(), prompt),
        )
        .await;
        match verdict {
            Ok(Ok((0, _))) => {
                if let Some(id) = &lease {
                    self.live
                        .lock()
                        .insert(id.clone(), redis_key(&key.name, 'c'));
                }
                (Ok(self.permit(key, lease)), Via::Redis)
            }
            Ok(Ok((which, wait_ms))) => {
                let retry_after = (wait_ms.max(1) as u64).div_ceil(1000);
                (
                    Err(Refused::Limited(refusal(key, which, retry_after))),
                    Via::Redis,
                )
            }
            Ok(Err(e)) => {
                self.went_down(&e.to_string());
                (self.fallback(key, prompt), Via::Local)
            }
            Err(_) => {
                self.went_down(&format!(
                    "no answer within auth.shared.timeout ({:?})",
                    self.settings.timeout
                ));
                (self.fallback(key, prompt), Via::Local)
            }
        }
    }

    fn permit(self: &Arc<Self>, key: &Identified, lease: Option<String>) -> Permit {
        Permit::shared(
            key,
            Hold {
                limits: self.clone(),
                lease,
                delta: AtomicI64::new(0),
            },
        )
    }

    /// Redis did not answer: the gateway's own counts, or a refusal.
    fn fallback(&self, key: &Identified, prompt: u64) -> Result<Permit, Refused> {
        if self.settings.on_error == OnRedisError::Deny {
            return Err(Refused::Unavailable);
        }
        let now = Instant::now();
        let permit = key.admit_local(now).map_err(Refused::Limited)?;
        permit.reserve(prompt, now).map_err(Refused::Limited)?;
        Ok(permit)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn backing_off(&self) -> bool {
        self.now_ms() < self.down_until.load(Ordering::Relaxed)
    }

    fn went_down(&self, why: &str) {
        let was_up = self.down_until.swap(
            self.now_ms() + BACKOFF.as_millis() as u64,
            Ordering::Relaxed,
        ) == 0;
        if was_up {
            tracing::warn!(
                redis = %redact(&self.settings.url),
                on_redis_error = ?self.settings.on_error,
                "shared limits: Redis failed ({why}); admitting by this gateway's own counts \
                 until it answers again"
            );
        }
    }

    fn came_back(&self) {
        if self.down_until.swap(0, Ordering::Relaxed) != 0 {
            tracing::info!(redis = %redact(&self.settings.url), "shared limits: Redis answers again");
        }
    }

    /// The connection: made on first use (it connects with the first command, within the
    /// caller's timeout), and from then on reconnecting by itself.
    fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        let mut conn = self.conn.lock();
        if let Some(c) = conn.as_ref() {
            return Ok(c.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.settings.timeout))
            .set_response_timeout(Some(self.settings.timeout.max(Duration::from_secs(1))))
            .set_number_of_retries(1);
        let c = ConnectionManager::new_lazy_with_config(self.client.clone(), config)?;
        *conn = Some(c.clone());
        Ok(c)
    }

    async fn run_admit(
        &self,
        name: &str,
        l: &KeyLimits,
        lease: Option<&str>,
        prompt: u64,
    ) -> redis::RedisResult<(i64, i64)> {
        let mut conn = self.connection()?;
        let r: (i64, i64) = self
            .admit
            .key(redis_key(name, 'c'))
            .key(redis_key(name, 'r'))
            .key(redis_key(name, 't'))
            .arg(l.max_concurrent.unwrap_or(0))
            .arg(l.requests_per_minute.unwrap_or(0))
            .arg(l.tokens_per_minute.unwrap_or(0))
            .arg(lease.unwrap_or(""))
            .arg(LEASE.as_millis() as u64)
            .arg(prompt)
            .invoke_async(&mut conn)
            .await?;
        self.came_back();
        Ok(r)
    }

    /// A request ended: its lease and its tokens go to the settler.
    pub(super) fn end(&self, s: Settle) {
        if let Some(id) = &s.lease {
            self.live.lock().remove(id);
        }
        if s.lease.is_some() || (s.tpm > 0 && s.delta != 0) {
            let _ = self.settle_tx.send(s);
        }
    }

    /// Starts the settler and the renewer, once, on the first admission (inside the
    /// runtime). Both end when the last holder of these limits is gone (a reload that
    /// replaced them, once its requests ended).
    fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(mut rx) = self.settle_rx.lock().take() else {
            return;
        };
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            while rx.recv_many(&mut batch, BATCH).await > 0 {
                let Some(me) = weak.upgrade() else { return };
                me.send_settlements(&batch).await;
                batch.clear();
            }
        });
        let weak: Weak<SharedLimits> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RENEW_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { return };
                me.renew_leases().await;
            }
        });
    }

    async fn send_settlements(&self, batch: &[Settle]) {
        let mut pipe = redis::pipe();
        // A pipeline does not load a script Redis lacks (after a restart): load it first.
        pipe.load_script(&self.settle).ignore();
        for s in batch {
            pipe.invoke_script(
                self.settle
                    .key(redis_key(&s.name, 'c'))
                    .key(redis_key(&s.name, 't'))
                    .arg(s.lease.as_deref().unwrap_or(""))
                    .arg(s.tpm)
                    .arg(s.delta),
            )
            .ignore();
        }
        let limit = self.settings.timeout.max(Duration::from_secs(1));
        let sent = tokio::time::timeout(limit, async {
            let mut conn = self.connection()?;
            pipe.query_async::<()>(&mut conn).await
        })
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            // The leases expire on their own; the tokens are lost to the shared balance.
            tracing::debug!(
                n = batch.len(),
                "shared limits: settlements not sent (Redis did not answer)"
            );
        }
    }

    async fn renew_leases(&self) {
        let mut by_set: HashMap<String, Vec<String>> = HashMap::new();
        for (id, set) in self.live.lock().iter() {
            by_set.entry(set.clone()).or_default().push(id.clone());
        }
        if by_set.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        pipe.load_script(&self.renew).ignore();
        for (set, ids) in &by_set {
            let mut inv = self.renew.key(set);
            inv.arg(LEASE.as_millis() as u64);
            for id in ids {
                inv.arg(id);
            }
            pipe.invoke_script(&inv).ignore();
        }
        let limit = self.settings.timeout.max(Duration::from_secs(1));
        let _ = tokio::time::timeout(limit, async {
            let mut conn = self.connection()?;
            pipe.query_async::<()>(&mut conn).await
        })
        .await;
    }
}

fn redis_key(name: &str, what: char) -> String {
    format!("vllm-edge:{{{name}}}:{what}")
}

/// A Redis URL without its password, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// The refusal of the admit script's verdict `which` (1 concurrency, 2 rpm, 3 tpm).
fn refusal(key: &Identified, which: i64, retry_after: u64) -> Denied {
    let l = key.limits;
    let message = match which {
        1 => format!(
            "This key already has {} requests in progress, its limit; retry when one finishes.",
            l.max_concurrent.unwrap_or(0)
        ),
        2 => format!(
            "This key is limited to {} requests per minute; retry later.",
            l.requests_per_minute.unwrap_or(0)
        ),
        _ => format!(
            "This key is limited to {} tokens per minute and has used them; retry later.",
            l.tokens_per_minute.unwrap_or(0)
        ),
    };
    Denied::Limited {
        key: key.name.to_string(),
        message,
        retry_after: retry_after.max(1),
    }
}

/// The start of the admit and settle scripts: a bucket's level (`rpm` tokens, or the `tpm`
/// balance) at `now`, full when absent, refilled at its capacity a minute and never above
/// it; storing one, with an expiry when it would be full again; and Redis's time in ms.
macro_rules! lua_buckets {
    () => {
        r#"
local function level(key, cap, now)
  local v = redis.call('HMGET', key, 'level', 'at')
  if not v[1] then return cap end
  local l = tonumber(v[1]) + (now - tonumber(v[2])) * cap / 60000
  if l > cap then l = cap end
  return l
end
local function store(key, cap, l, now)
  redis.call('HSET', key, 'level', tostring(l), 'at', now)
  redis.call('PEXPIRE', key, math.ceil((cap - l) * 60000 / cap) + 1000)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"#
    };
}

/// KEYS: leases, rpm bucket, tpm balance. ARGV: max_concurrent, rpm, tpm (0: none),
/// lease id, lease ms, prompt tokens. Returns {0, 0} when admitted, else {1 (busy) | 2
/// (rpm) | 3 (tpm), ms until it may succeed}. Checks before takes: a refused request
/// costs the key nothing.
const ADMIT: &str = concat!(
    lua_buckets!(),
    r#"
local max, rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ttl, prompt = tonumber(ARGV[5]), tonumber(ARGV[6])
if max > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= max then return {1, 1000} end
end
local balance = 0
if tpm > 0 then
  balance = level(KEYS[3], tpm, now)
  if balance <= 0 then return {3, math.ceil(-balance * 60000 / tpm) + 1} end
end
if rpm > 0 then
  local tokens = level(KEYS[2], rpm, now)
  if tokens < 1 then return {2, math.ceil((1 - tokens) * 60000 / rpm)} end
  store(KEYS[2], rpm, tokens - 1, now)
end
if tpm > 0 then store(KEYS[3], tpm, balance - prompt, now) end
if max > 0 then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ttl * 2)
end
return {0, 0}
"#
);

/// KEYS: leases, tpm balance. ARGV: lease id (or empty), tpm (0: none), tokens to take.
const SETTLE: &str = concat!(
    lua_buckets!(),
    r#"
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[1], ARGV[1]) end
local tpm, delta = tonumber(ARGV[2]), tonumber(ARGV[3])
if tpm > 0 and delta ~= 0 then store(KEYS[2], tpm, level(KEYS[2], tpm, now) - delta, now) end
return 0
"#
);

/// KEYS: leases. ARGV: lease ms, lease ids. Only leases still there are renewed (one
/// that expired while Redis was away is not brought back: it could be one that ended).
const RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return 0
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_a_log_line() {
        assert_eq!(
            redact("redis://:hunter2@10.0.0.5:6379/0"),
            "redis://***@10.0.0.5:6379/0"
        );
        assert_eq!(
            redact("rediss://user:pw@redis.internal:6380"),
            "rediss://***@redis.internal:6380"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    #[test]
    fn one_key_keeps_its_counts_in_one_cluster_slot() {
        assert_eq!(redis_key("team-a", 'c'), "vllm-edge:{team-a}:c");
        assert_eq!(redis_key("team-a", 't'), "vllm-edge:{team-a}:t");
    }
}
