//! API keys for the data plane, the admin token, and per-key limits. Uses nothing of the
//! crate (a leaf: the config holds its types).
//!
//! The keys file (`auth.api_keys_file`) holds one key per line; `#` starts a comment:
//!
//! ```text
//! # [NAME] KEY-or-sha256:HEX [max_concurrent=N] [rpm=N] [tpm=N] [weight=N] [priority=P]
//! sk-team-a-0f3c9e                          # a key, named by its short hash
//! search-bot sk-search-77d1 rpm=600         # a named key, 600 requests a minute
//! team-b sk-team-b-41aa tpm=200000          # 200,000 tokens a minute
//! batch sha256:9f86d081884c7d65...0f00a08 priority=low   # only the key's SHA-256
//! chat sk-chat-5e21 weight=4 priority=high  # 4 shares of a full fleet, served first
//! ```
//!
//! `weight` and `priority` say how a key's requests wait when the whole fleet is full
//! (`crate::flow`): each key gets a share of the fleet in proportion to its weight
//! (default 1), and a higher priority class (`high`, `normal` by default, `low`) is
//! served before a lower one.
//!
//! A presented key is hashed (SHA-256) and compared with every entry's hash in constant time,
//! so neither the comparison nor the position of a match leaks through timing. Logs and
//! metrics only ever see a key's name (by default `key:` and 8 hex digits of its hash).
//!
//! Limits are counted per key and survive a reload for a key that is still listed
//! ([`ApiKeys::adopt_counters`]). With `auth.shared`, every gateway pointing at the same
//! Redis counts them together ([`shared`]).

pub mod shared;

use parking_lot::Mutex;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use subtle::{ConditionallySelectable, ConstantTimeEq};

pub type Digest = [u8; 32];

pub fn sha256(bytes: &[u8]) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn short_hash(d: &Digest) -> String {
    d[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// A secret read from a file (a backend's key, the admin token). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The first non-empty, non-comment line of `path`, trimmed.
    pub fn read(path: &Path) -> Result<Secret, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        text.lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| Secret(l.to_string()))
            .ok_or_else(|| format!("{}: the file holds no secret (it is empty)", path.display()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` equals this secret, in time independent of where they differ.
    pub fn matches(&self, presented: &str) -> bool {
        sha256(presented.as_bytes())
            .ct_eq(&sha256(self.0.as_bytes()))
            .into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// The token of an `Authorization: Bearer TOKEN` header value.
pub fn bearer(value: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = s.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// A request's class when the fleet is full: higher classes are served first
/// (`crate::flow`). Ordered from the highest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    /// `high`, `normal` or `low` (any case).
    pub fn parse(s: &str) -> Option<Priority> {
        Priority::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s.trim()))
    }

    /// 0 for the highest class.
    pub fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyLimits {
    pub max_concurrent: Option<u32>,
    pub requests_per_minute: Option<u32>,
    /// Prompt plus completion tokens a minute: a request is admitted while the key's
    /// balance is positive, reserves its prompt's estimate once its body is read, and is
    /// settled to what it used when it ends (see [`Permit::reserve`], [`Permit::settle`]).
    pub tokens_per_minute: Option<u32>,
    /// Its share of a full fleet against other keys' (default 1).
    pub weight: Option<u32>,
    /// Its class when the fleet is full (default normal).
    pub priority: Priority,
}

/// What a key has used; shared across reloads while the key stays listed.
#[derive(Debug, Default)]
pub struct KeyCounters {
    in_flight: AtomicU32,
    /// Token bucket for the per-minute limit: (tokens, when last refilled).
    bucket: Mutex<Option<(f64, Instant)>>,
    /// The `tpm` balance, which a request's charge may take below zero (a debt the
    /// refill pays back before the key is admitted again).
    tokens: Mutex<Option<(f64, Instant)>>,
}

#[derive(Debug)]
pub struct KeyEntry {
    pub name: Arc<str>,
    digest: Digest,
    pub limits: KeyLimits,
    counters: Arc<KeyCounters>,
}

/// The keys of one keys file.
#[derive(Debug, Default)]
pub struct ApiKeys {
    entries: Vec<KeyEntry>,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    Missing,
    Invalid,
    /// A limit of the named key; `retry_after` in whole seconds.
    Limited {
        key: String,
        message: String,
        retry_after: u64,
    },
}

/// A request whose key is known, not yet counted against its limits.
#[derive(Debug, Clone)]
pub struct Identified {
    pub name: Arc<str>,
    pub limits: KeyLimits,
    counters: Arc<KeyCounters>,
}

impl Identified {
    /// Counts the request against its key's limits in this gateway's memory.
    pub fn admit_local(&self, now: Instant) -> Result<Permit, Denied> {
        let c = &self.counters;
        let limits = &self.limits;
        if let Some(max) = limits.max_concurrent {
            if c.in_flight.fetch_add(1, Ordering::Relaxed) >= max {
                c.in_flight.fetch_sub(1, Ordering::Relaxed);
                return Err(Denied::Limited {
                    key: self.name.to_string(),
                    message: format!(
                        "This key already has {max} requests in progress, its limit; retry when \
                         one finishes."
                    ),
                    retry_after: 1,
                });
            }
        } else {
            c.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        // From here the slot is held; the permit gives it back on every path.
        let permit = Permit {
            key: self.name.clone(),
            counters: c.clone(),
            tokens_per_minute: limits.tokens_per_minute,
            weight: limits.weight.unwrap_or(1),
            priority: limits.priority,
            hold: Hold::Local,
        };
        // Before `rpm`, which takes a request's token: a refused request costs nothing.
        if let Some(tpm) = limits.tokens_per_minute {
            let balance = refill(&c.tokens.lock(), f64::from(tpm), now);
            if balance <= 0.0 {
                return Err(out_of_tokens(&self.name, tpm, balance));
            }
        }
        if let Some(rpm) = limits.requests_per_minute {
            if let Err(wait) = take_token(c, rpm, now) {
                return Err(Denied::Limited {
                    key: self.name.to_string(),
                    message: format!(
                        "This key is limited to {rpm} requests per minute; retry later."
                    ),
                    retry_after: wait.as_secs_f64().ceil().max(1.0) as u64,
                });
            }
        }
        Ok(permit)
    }
}

/// Where an admitted request's counts are held.
#[derive(Debug)]
enum Hold {
    /// In this gateway's [`KeyCounters`].
    Local,
    /// In Redis ([`shared`]): its lease, and its tokens, settled there when it ends.
    Shared(shared::Hold),
}

/// An admitted request's hold on its key's concurrency slot.
#[derive(Debug)]
pub struct Permit {
    /// The key's name (shared, so admitting a request allocates nothing).
    pub key: Arc<str>,
    counters: Arc<KeyCounters>,
    tokens_per_minute: Option<u32>,
    /// The key's share of a full fleet (`weight=`, at least 1).
    pub weight: u32,
    /// The key's class when the fleet is full (`priority=`).
    pub priority: Priority,
    hold: Hold,
}

impl Permit {
    /// A permit counted in Redis: the prompt's tokens were taken there at admission.
    fn shared(key: &Identified, hold: shared::Hold) -> Permit {
        Permit {
            key: key.name.clone(),
            counters: key.counters.clone(),
            tokens_per_minute: key.limits.tokens_per_minute,
            weight: key.limits.weight.unwrap_or(1),
            priority: key.limits.priority,
            hold: Hold::Shared(hold),
        }
    }

    /// Whether its counts are in Redis (its tokens already reserved at admission).
    pub fn is_shared(&self) -> bool {
        matches!(self.hold, Hold::Shared(_))
    }

    /// Whether the key has a `tpm` limit, so that its requests' tokens must be charged.
    pub fn counts_tokens(&self) -> bool {
        self.tokens_per_minute.is_some()
    }

    /// Takes a request's estimated prompt `tokens` from the key's `tpm` balance once its
    /// body is read, before it is sent: refused, as admission would be, when requests
    /// admitted with it (a burst) have used the balance up meanwhile.
    pub fn reserve(&self, tokens: u64, now: Instant) -> Result<(), Denied> {
        let Some(tpm) = self.tokens_per_minute.filter(|_| !self.is_shared()) else {
            return Ok(());
        };
        let mut b = self.counters.tokens.lock();
        let balance = refill(&b, f64::from(tpm), now);
        if balance <= 0.0 {
            *b = Some((balance, now));
            return Err(out_of_tokens(&self.key, tpm, balance));
        }
        *b = Some((balance - tokens as f64, now));
        Ok(())
    }

    /// Settles a request that `used` tokens against the `reserved` ones: the difference
    /// is taken, or given back (a request that failed used none).
    pub fn settle(&self, used: u64, reserved: u64, now: Instant) {
        if let Hold::Shared(h) = &self.hold {
            // Sent with the lease's release when the permit is dropped.
            h.delta
                .store(used as i64 - reserved as i64, Ordering::Relaxed);
            return;
        }
        if let Some(tpm) = self.tokens_per_minute {
            let mut b = self.counters.tokens.lock();
            let balance = refill(&b, f64::from(tpm), now);
            *b = Some((balance - used as f64 + reserved as f64, now));
        }
    }
}

/// The refusal of a key whose `tpm` balance is `balance` (not positive).
fn out_of_tokens(key: &str, tpm: u32, balance: f64) -> Denied {
    let per_sec = f64::from(tpm) / 60.0;
    Denied::Limited {
        key: key.to_string(),
        message: format!(
            "This key is limited to {tpm} tokens per minute and has used them; retry later."
        ),
        retry_after: (-balance / per_sec).ceil().max(1.0) as u64,
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        match &mut self.hold {
            Hold::Local => {
                self.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
            }
            Hold::Shared(h) => h.limits.end(shared::Settle {
                name: self.key.clone(),
                lease: h.lease.take(),
                tpm: self.tokens_per_minute.unwrap_or(0),
                delta: h.delta.load(Ordering::Relaxed),
            }),
        }
    }
}

impl ApiKeys {
    /// Reads a keys file; every mistake in it, each as `FILE:LINE: message`.
    pub fn load(path: &Path) -> Result<ApiKeys, Vec<String>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![format!("{}: cannot read: {e}", path.display())])?;
        Self::parse(&text).map_err(|all| {
            all.into_iter()
                .map(|(line, msg)| format!("{}:{line}: {msg}", path.display()))
                .collect()
        })
    }

    /// Parses a keys file; every mistake, each with its 1-based line.
    pub fn parse(text: &str) -> Result<ApiKeys, Vec<(usize, String)>> {
        let mut entries: Vec<KeyEntry> = Vec::new();
        let mut lines_of: Vec<usize> = Vec::new();
        let mut found = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = match raw.find(" #").or_else(|| raw.find("\t#")) {
                Some(at) => &raw[..at],
                None => raw,
            }
            .trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, digest, limits) = match parse_key_line(line) {
                Ok(parsed) => parsed,
                Err(m) => {
                    found.push((line_no, m));
                    continue;
                }
            };
            let name = name.unwrap_or_else(|| format!("key:{}", short_hash(&digest)));
            if let Some(j) = entries.iter().position(|e| e.digest == digest) {
                found.push((
                    line_no,
                    format!("the same key is already on line {}", lines_of[j]),
                ));
                continue;
            }
            if let Some(j) = entries.iter().position(|e| *e.name == *name) {
                found.push((
                    line_no,
                    format!("the name `{name}` is already used on line {}", lines_of[j]),
                ));
                continue;
            }
            entries.push(KeyEntry {
                name: name.into(),
                digest,
                limits,
                counters: Arc::default(),
            });
            lines_of.push(line_no);
        }
        if !found.is_empty() {
            return Err(found);
        }
        if entries.is_empty() {
            return Err(vec![(
                1,
                "the file lists no key, so every request would be refused".into(),
            )]);
        }
        Ok(ApiKeys { entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Carries the usage of keys still listed over from the keys being replaced.
    pub fn adopt_counters(&mut self, old: &ApiKeys) {
        for e in &mut self.entries {
            if let Some(o) = old.entries.iter().find(|o| o.digest == e.digest) {
                e.counters = o.counters.clone();
            }
        }
    }

    /// The entry whose key is `presented`. Every entry is compared, in constant time.
    fn find(&self, presented: &str) -> Option<&KeyEntry> {
        let d = sha256(presented.as_bytes());
        let mut hit = u32::MAX;
        for (i, e) in self.entries.iter().enumerate() {
            hit = u32::conditional_select(&hit, &(i as u32), e.digest.ct_eq(&d));
        }
        self.entries.get(hit as usize)
    }

    /// The key a request carries in `authorization` (the header's value, if any), not yet
    /// counted against its limits.
    pub fn identify(&self, authorization: Option<&[u8]>) -> Result<Identified, Denied> {
        let token = match authorization {
            None => return Err(Denied::Missing),
            Some(v) => bearer(v).ok_or(Denied::Invalid)?,
        };
        let e = self.find(token).ok_or(Denied::Invalid)?;
        Ok(Identified {
            name: e.name.clone(),
            limits: e.limits,
            counters: e.counters.clone(),
        })
    }

    /// Admits a request carrying `authorization` (the header's value, if any), counting it
    /// against its key's limits in this gateway's memory.
    pub fn admit(&self, authorization: Option<&[u8]>, now: Instant) -> Result<Permit, Denied> {
        self.identify(authorization)?.admit_local(now)
    }
}

/// A bucket holding at most `per_minute`, refilled at that rate: its content at `now`
/// (full when never used).
fn refill(b: &Option<(f64, Instant)>, per_minute: f64, now: Instant) -> f64 {
    let (content, at) = b.unwrap_or((per_minute, now));
    let elapsed = now.saturating_duration_since(at).as_secs_f64();
    (content + elapsed * per_minute / 60.0).min(per_minute)
}

/// Takes one token from the key's bucket (`rpm` tokens at most, refilled at `rpm` a
/// minute), or says how long until one is there.
fn take_token(c: &KeyCounters, rpm: u32, now: Instant) -> Result<(), Duration> {
    let cap = f64::from(rpm);
    let per_sec = cap / 60.0;
    let mut b = c.bucket.lock();
    let tokens = refill(&b, cap, now);
    if tokens >= 1.0 {
        *b = Some((tokens - 1.0, now));
        Ok(())
    } else {
        *b = Some((tokens, now));
        Err(Duration::from_secs_f64((1.0 - tokens) / per_sec))
    }
}

/// The settings a keys-file line may hold.
const LIMITS: [&str; 5] = ["max_concurrent", "rpm", "tpm", "weight", "priority"];

/// The largest `weight=`: shares are computed in fixed point (`crate::flow`).
pub const MAX_WEIGHT: u32 = 1000;

/// One keys-file line: `[NAME] KEY [max_concurrent=N] [rpm=N] [tpm=N] [weight=N]
/// [priority=high|normal|low]`.
fn parse_key_line(line: &str) -> Result<(Option<String>, Digest, KeyLimits), String> {
    let mut limits = KeyLimits::default();
    let mut words = Vec::new();
    for w in line.split_whitespace() {
        // A limit's name, or `name=digits`: a limit (perhaps misspelt). A key may hold `=`
        // (base64), but not in that shape.
        let limit = w.split_once('=').filter(|(n, v)| {
            LIMITS.contains(n)
                || (!n.is_empty()
                    && n.bytes().all(|c| c.is_ascii_lowercase() || c == b'_')
                    && !v.is_empty()
                    && v.bytes()
                        .all(|c| c.is_ascii_digit() || c == b'-' || c == b'.'))
        });
        let Some((name, v)) = limit else {
            words.push(w);
            continue;
        };
        if name == "priority" {
            limits.priority = Priority::parse(v)
                .ok_or_else(|| format!("`priority` must be high, normal or low, not `{v}`"))?;
            continue;
        }
        let n = v
            .parse::<u32>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("`{name}` must be a whole number above 0, not `{v}`"))?;
        match name {
            "max_concurrent" => limits.max_concurrent = Some(n),
            "rpm" => limits.requests_per_minute = Some(n),
            "tpm" => limits.tokens_per_minute = Some(n),
            "weight" if n > MAX_WEIGHT => {
                return Err(format!("`weight` must be at most {MAX_WEIGHT}, not {n}"))
            }
            "weight" => limits.weight = Some(n),
            other => {
                let hint = crate::spelling::nearest(other, &LIMITS)
                    .map(|n| format!(" (did you mean `{n}`?)"))
                    .unwrap_or_default();
                return Err(format!(
                    "unknown limit `{other}`{hint}; the settings are max_concurrent=N, rpm=N \
                     (requests per minute), tpm=N (tokens per minute), weight=N and \
                     priority=high|normal|low"
                ));
            }
        }
    }
    let (name, key) = match words[..] {
        [key] => (None, key),
        [name, key] => (Some(name.to_string()), key),
        _ => {
            return Err(format!(
                "expected `[NAME] KEY [max_concurrent=N] [rpm=N] [tpm=N] [weight=N] \
                 [priority=P]`, found {} words besides the settings",
                words.len()
            ))
        }
    };
    let digest = match key.strip_prefix("sha256:") {
        Some(hex) => parse_hex_digest(hex).ok_or_else(|| {
            "`sha256:` must be followed by the 64 hex digits of the key's SHA-256 \
             (e.g. `printf %s KEY | sha256sum`)"
                .to_string()
        })?,
        None => sha256(key.as_bytes()),
    };
    Ok((name, digest, limits))
}

fn parse_hex_digest(hex: &str) -> Option<Digest> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(d: &Digest) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn plain_named_and_hashed_keys_are_accepted() {
        let text = format!(
            "# comment\n\nsk-one\nbot sk-two rpm=5  # trailing comment\nbatch sha256:{} max_concurrent=2\n",
            hex(&sha256(b"sk-three"))
        );
        let keys = ApiKeys::parse(&text).unwrap();
        assert_eq!(keys.len(), 3);
        let now = Instant::now();
        let p = keys.admit(Some(b"Bearer sk-one"), now).unwrap();
        assert_eq!(&*p.key, format!("key:{}", short_hash(&sha256(b"sk-one"))));
        assert_eq!(
            &*keys.admit(Some(b"bearer  sk-two "), now).unwrap().key,
            "bot"
        );
        assert_eq!(
            &*keys.admit(Some(b"Bearer sk-three"), now).unwrap().key,
            "batch"
        );
        assert_eq!(
            keys.admit(Some(b"Bearer sk-four"), now).unwrap_err(),
            Denied::Invalid
        );
        assert_eq!(
            keys.admit(Some(b"sk-one"), now).unwrap_err(),
            Denied::Invalid
        );
        assert_eq!(
            keys.admit(Some(b"Basic c2stb25l"), now).unwrap_err(),
            Denied::Invalid
        );
        assert_eq!(keys.admit(None, now).unwrap_err(), Denied::Missing);
        // The hash itself is not a key.
        let h = format!("Bearer sha256:{}", hex(&sha256(b"sk-three")));
        assert_eq!(
            keys.admit(Some(h.as_bytes()), now).unwrap_err(),
            Denied::Invalid
        );
    }

    #[test]
    fn bad_lines_name_their_line() {
        let err = |t: &str| ApiKeys::parse(t).unwrap_err().remove(0);
        assert_eq!(err("a\nb c d\n").0, 2);
        assert!(err("a\nb c d\n").1.contains("found 3 words"));
        assert_eq!(err("k rpm=0\n").0, 1);
        assert_eq!(err("k max_concurrent=x\n").0, 1);
        assert_eq!(err("x sha256:12\n").0, 1);
        let dup = err("a k1\nb k1\n");
        assert_eq!(dup.0, 2);
        assert!(dup.1.contains("line 1"), "{}", dup.1);
        assert!(err("a k1\na k2\n").1.contains("`a`"));
        assert!(err("# nothing\n").1.contains("no key"));
        let typo = err("y sk-y rmp=5\n");
        assert!(
            typo.1
                .starts_with("unknown limit `rmp` (did you mean `rpm`?)"),
            "{}",
            typo.1
        );
        // A key may end in `=` (base64) and is no limit.
        assert!(ApiKeys::parse("a c2stYQ==\n").is_ok());
        // Every mistake, not only the first.
        let all = ApiKeys::parse("a b c\nk rpm=0\nok-key\nz tmp=3\n").unwrap_err();
        assert_eq!(all.iter().map(|e| e.0).collect::<Vec<_>>(), [1, 2, 4]);
    }

    #[test]
    fn weight_and_priority_are_read_and_checked() {
        let keys = ApiKeys::parse(
            "chat sk-c weight=4 priority=high\nbulk sk-b priority=LOW rpm=9\nplain sk-p\n",
        )
        .unwrap();
        let now = Instant::now();
        let p = keys.admit(Some(b"Bearer sk-c"), now).unwrap();
        assert_eq!((p.weight, p.priority), (4, Priority::High));
        let p = keys.admit(Some(b"Bearer sk-b"), now).unwrap();
        assert_eq!((p.weight, p.priority), (1, Priority::Low));
        let p = keys.admit(Some(b"Bearer sk-p"), now).unwrap();
        assert_eq!((p.weight, p.priority), (1, Priority::Normal));
        let err = |t: &str| ApiKeys::parse(t).unwrap_err().remove(0).1;
        assert!(err("k sk priority=urgent\n").contains("high, normal or low"));
        assert!(err("k sk weight=0\n").contains("above 0"));
        assert!(err("k sk weight=1001\n").contains("at most 1000"));
        assert!(err("k sk wieght=2\n").contains("did you mean `weight`"));
    }

    #[test]
    fn concurrency_limit_frees_slots_when_permits_drop() {
        let keys = ApiKeys::parse("k max_concurrent=2\n").unwrap();
        let now = Instant::now();
        let a = keys.admit(Some(b"Bearer k"), now).unwrap();
        let _b = keys.admit(Some(b"Bearer k"), now).unwrap();
        match keys.admit(Some(b"Bearer k"), now).unwrap_err() {
            Denied::Limited { retry_after, .. } => assert_eq!(retry_after, 1),
            d => panic!("{d:?}"),
        }
        drop(a);
        keys.admit(Some(b"Bearer k"), now).unwrap();
    }

    #[test]
    fn rate_limit_refills_over_time_and_survives_reload() {
        let mut keys = ApiKeys::parse("k rpm=2\n").unwrap();
        let t0 = Instant::now();
        keys.admit(Some(b"Bearer k"), t0).unwrap();
        keys.admit(Some(b"Bearer k"), t0).unwrap();
        match keys.admit(Some(b"Bearer k"), t0).unwrap_err() {
            Denied::Limited { retry_after, .. } => assert_eq!(retry_after, 30),
            d => panic!("{d:?}"),
        }
        // A reload keeps the spent budget of a key still listed.
        let mut reloaded = ApiKeys::parse("k rpm=2\nother\n").unwrap();
        reloaded.adopt_counters(&keys);
        keys = reloaded;
        assert!(keys.admit(Some(b"Bearer k"), t0).is_err());
        // 30 s later one request is allowed again, not two.
        let t1 = t0 + Duration::from_secs(30);
        keys.admit(Some(b"Bearer k"), t1).unwrap();
        assert!(keys.admit(Some(b"Bearer k"), t1).is_err());
        // A refused request holds no concurrency slot.
        assert_eq!(
            keys.entries[0].counters.in_flight.load(Ordering::Relaxed),
            0
        );
    }

    #[test]
    fn a_token_budget_admits_while_positive_and_charges_what_was_used() {
        let keys = ApiKeys::parse("k tpm=600 rpm=100\nfree\n").unwrap();
        let t0 = Instant::now();
        let p = keys.admit(Some(b"Bearer k"), t0).unwrap();
        assert!(p.counts_tokens());
        assert!(!keys
            .admit(Some(b"Bearer free"), t0)
            .unwrap()
            .counts_tokens());
        // A request that used more than the balance leaves a debt: 900 tokens of 600
        // leave -300, paid back at 10 tokens a second.
        p.reserve(100, t0).unwrap();
        p.settle(900, 100, t0);
        drop(p);
        match keys.admit(Some(b"Bearer k"), t0).unwrap_err() {
            Denied::Limited {
                retry_after,
                message,
                ..
            } => {
                assert_eq!(retry_after, 30);
                assert!(message.contains("600 tokens per minute"), "{message}");
            }
            d => panic!("{d:?}"),
        }
        // The refusal took nothing from the request budget: 1 of 100 used.
        let left = refill(&keys.entries[0].counters.bucket.lock(), 100.0, t0);
        assert_eq!(left, 99.0);
        let t1 = t0 + Duration::from_secs(29);
        assert!(keys.admit(Some(b"Bearer k"), t1).is_err(), "still in debt");
        let t2 = t0 + Duration::from_secs(31);
        let p = keys.admit(Some(b"Bearer k"), t2).unwrap();
        // 10 tokens are back by now. Two admitted together: the second's prompt finds
        // the balance used up by the first's, and is refused before it is sent.
        let q = keys.admit(Some(b"Bearer k"), t2).unwrap();
        p.reserve(400, t2).unwrap();
        assert!(matches!(q.reserve(5, t2), Err(Denied::Limited { .. })));
        assert!(keys.admit(Some(b"Bearer k"), t2).is_err());
        // A request that failed gives its reservation back.
        p.settle(0, 400, t2);
        assert!(keys.admit(Some(b"Bearer k"), t2).is_ok());
        // The balance never grows past one minute's worth.
        let later = t2 + Duration::from_secs(3600);
        assert_eq!(
            refill(&keys.entries[0].counters.tokens.lock(), 600.0, later),
            600.0
        );
        assert_eq!(ApiKeys::parse("k tpm=0\n").unwrap_err()[0].0, 1);
    }

    #[test]
    fn secrets_compare_and_never_print() {
        let s = Secret("tok".into());
        assert!(s.matches("tok"));
        assert!(!s.matches("tok2"));
        assert_eq!(format!("{s:?}"), "Secret(…)");
        assert_eq!(bearer(b"Bearer  abc "), Some("abc"));
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Token abc"), None);
    }
}
