//! The background service that follows every engine's KV events: for each backend with
//! `kv_events`, a ZMQ SUB connection (the engine binds, every gateway connects, so every
//! gateway sees the same events), each message checked for its place in the sequence and
//! applied to the backend's [`PrefixIndex`](crate::fleet::prefix::PrefixIndex).
//!
//! - **History**: on subscribing, the replay socket (`kv_events_replay`) is asked for
//!   everything from sequence 0 (a DEALER sends `["", from]`; vLLM 0.32 answers each
//!   buffered message as `["", topic, seq, payload]`, then `["", "", -1, ""]`): an
//!   engine that has published nothing has an empty cache; one whose buffer still
//!   starts at 0 is known exactly.
//! - **Gaps** (a sequence number skipped) are asked of the replay socket the same way. When
//!   there is no replay socket, or it no longer has `from`, or it does not answer in
//!   [`REPLAY_TIMEOUT`], the index starts again and rebuilds
//!   ([`crate::fleet::prefix::Coverage::Rebuilding`]).
//! - **Restarts**: a sequence number seen before, published later than the last one
//!   applied, is an engine that started again with an empty cache; so is a new server
//!   version or process start time in its scrapes (an engine restarted while idle
//!   publishes nothing to tell).
//! - **Reconnection**: the SUB socket reconnects by itself, with backoff (zeromq's own),
//!   and subscribes again; whatever was published meanwhile shows up as a gap.
//! - The request path never waits for any of this: it reads the index under a read lock
//!   that is only written while one message is applied.
//!
//! Backends come and go with reloads: every [`FOLLOW_INTERVAL`] the service starts a
//! subscription for each backend in the fleet that has none and stops those of backends
//! that left.

use async_trait::async_trait;
use bytes::Bytes;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;
use zeromq::{Socket, SocketRecv, SocketSend};

use crate::config::KvEvents;
use crate::engine::kv_events::{self, Message, END_OF_REPLAY};
use crate::fleet::prefix::Sequence;
use crate::fleet::{Backend, Fleet};

/// How long a replay may take, from the request to the end marker.
pub const REPLAY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the set of subscriptions follows the fleet's backends.
const FOLLOW_INTERVAL: Duration = Duration::from_secs(1);
/// Messages a replay may return at most (vLLM keeps 10,000 by default).
const MAX_REPLAYED: usize = 100_000;

/// The service.
pub struct KvEventsService {
    pub fleet: Arc<Fleet>,
}

#[async_trait]
impl BackgroundService for KvEventsService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut running: HashMap<usize, (Weak<Backend>, tokio::task::JoinHandle<()>)> =
            HashMap::new();
        loop {
            let snap = self.fleet.load();
            for e in &snap.backends {
                let Some(endpoints) = &e.backend.kv_events else {
                    continue;
                };
                // The index is bounded by what the engine can hold; a server that started
                // again (a new version or start time) holds nothing.
                if let Some(load) = &e.state.load {
                    if let (Some(tokens), Some(bs)) = (load.kv_capacity_tokens, load.block_size) {
                        e.backend.prefix.set_capacity((tokens / bs.max(1)) as usize);
                    }
                    let version = e.state.version.as_deref();
                    if e.backend.prefix.engine_identity(version, load.started_at) {
                        tracing::info!(backend = %e.backend.name, "the engine's server started again \
                            (version or start time): its cache is empty");
                    }
                }
                let id = Arc::as_ptr(&e.backend) as usize;
                running.entry(id).or_insert_with(|| {
                    let task = tokio::spawn(follow(Arc::downgrade(&e.backend), endpoints.clone()));
                    (Arc::downgrade(&e.backend), task)
                });
            }
            running.retain(|_, (weak, task)| {
                let kept = weak
                    .upgrade()
                    .is_some_and(|b| snap.backends.iter().any(|e| Arc::ptr_eq(&e.backend, &b)));
                if !kept {
                    task.abort();
                }
                kept
            });
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep(FOLLOW_INTERVAL) => {}
            }
        }
        for (_, (_, task)) in running {
            task.abort();
        }
    }
}

/// Follows one backend's events for as long as it exists.
pub async fn follow(backend: Weak<Backend>, endpoints: KvEvents) {
    let mut options = zeromq::SocketOptions::default();
    // Connect waits (with zeromq's backoff) until the engine binds.
    options.no_connect_timeout();
    let mut sub = zeromq::SubSocket::with_options(options);
    if let Err(e) = sub.connect(&endpoints.endpoint).await {
        let name = backend
            .upgrade()
            .map(|b| b.name.clone())
            .unwrap_or_default();
        tracing::warn!(backend = %name, endpoint = %endpoints.endpoint, error = %e,
            "cannot subscribe to the engine's KV events; its prefix cache is not known");
        return;
    }
    if sub.subscribe("").await.is_err() {
        return;
    }
    // What the engine published before this subscription: its replay buffer from the
    // start (an engine that published nothing yet answers with the end marker alone: its
    // cache is empty). Without a replay socket the first event tells.
    if let (Some(replay), Some(b)) = (&endpoints.replay, backend.upgrade()) {
        match self::replay(replay, 0).await {
            Ok(history) => catch_up(&b, history),
            Err(e) => tracing::debug!(backend = %b.name, error = %e, "no KV-event history yet"),
        }
    }
    loop {
        let Ok(msg) = sub.recv().await else {
            // Closed: the socket reconnects by itself; a closed one means the service ends.
            return;
        };
        let Some(backend) = backend.upgrade() else {
            return;
        };
        on_message(&backend, &endpoints, msg.into_vec()).await;
    }
}

/// Applies one published message to `backend`'s index, filling a gap before it first.
pub async fn on_message(backend: &Backend, endpoints: &KvEvents, frames: Vec<Bytes>) {
    let index = &backend.prefix;
    index.heard(backend.completed());
    let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_ref()).collect();
    let m = match kv_events::decode(&refs) {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(backend = %backend.name, error = %e, "a KV-event message that is not a batch");
            // A readable sequence number still moves the stream on.
            index.malformed(refs.get(1).and_then(|f| kv_events::sequence(f).ok()));
            return;
        }
    };
    let mut check = index.check_sequence(m.seq, m.batch.ts);
    if check == Sequence::Restart {
        tracing::info!(backend = %backend.name, "the engine's KV events started again: its cache is empty");
        index.restarted();
        check = index.check_sequence(m.seq, m.batch.ts);
    }
    match check {
        Sequence::Seen | Sequence::Restart => return,
        Sequence::Next => {}
        Sequence::Gap { from, to } => {
            fill_gap(backend, endpoints, from, to).await;
            if index.check_sequence(m.seq, m.batch.ts) != Sequence::Next {
                return;
            }
        }
    }
    index.apply(m.seq, m.batch.ts, &m.batch.events);
}

/// Asks the replay socket for messages `from..to` and applies them; when that cannot be
/// done, the index starts again and rebuilds, continuing after `to - 1`.
async fn fill_gap(backend: &Backend, endpoints: &KvEvents, from: u64, to: u64) {
    let index = &backend.prefix;
    let replayed = match &endpoints.replay {
        Some(replay) => self::replay(replay, from).await,
        None => Err("no kv_events_replay socket".to_string()),
    };
    match replayed {
        Ok(messages) if messages.first().is_some_and(|m| m.seq == from) => {
            for m in messages.iter().filter(|m| m.seq < to) {
                if index.check_sequence(m.seq, m.batch.ts) == Sequence::Next {
                    index.apply(m.seq, m.batch.ts, &m.batch.events);
                }
            }
            index.gap_replayed();
        }
        other => {
            let why = match other {
                Ok(m) => format!(
                    "the replay buffer starts at {}",
                    m.first().map_or("nothing".into(), |m| m.seq.to_string())
                ),
                Err(e) => e,
            };
            tracing::warn!(backend = %backend.name, missed_from = from, missed_to = to,
                reason = %why, "KV events were lost; its prefix cache is rebuilt from \
                new events (approximate affinity for it meanwhile)");
            index.gap_unrecoverable(to.checked_sub(1));
        }
    }
}

/// Applies an engine's history from its replay buffer, asked for when subscribing.
fn catch_up(backend: &Backend, history: Vec<Message>) {
    let index = &backend.prefix;
    match history.first() {
        None => index.nothing_published(),
        Some(m) if m.seq != 0 => index.gap_unrecoverable(Some(m.seq - 1)),
        Some(_) => {}
    }
    for m in &history {
        if index.check_sequence(m.seq, m.batch.ts) == Sequence::Next {
            index.apply(m.seq, m.batch.ts, &m.batch.events);
        }
    }
}

/// Asks the replay socket at `endpoint` for the messages from `from` on.
pub async fn replay(endpoint: &str, from: u64) -> Result<Vec<Message>, String> {
    let work = async {
        let mut dealer = zeromq::DealerSocket::new();
        dealer
            .connect(endpoint)
            .await
            .map_err(|e| format!("cannot connect to the replay socket: {e}"))?;
        let request = zeromq::ZmqMessage::try_from(vec![
            Bytes::new(),
            Bytes::copy_from_slice(&from.to_be_bytes()),
        ])
        .map_err(|e| e.to_string())?;
        dealer.send(request).await.map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        loop {
            let reply = dealer.recv().await.map_err(|e| e.to_string())?.into_vec();
            // vLLM 0.32 answers `["", topic, seq, payload]` (newer ones drop the topic):
            // past the empty delimiter, the published message's frames.
            let frames = match reply.as_slice() {
                [delimiter, rest @ ..] if rest.len() == 3 && delimiter.is_empty() => rest,
                all => all,
            };
            let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_ref()).collect();
            if refs.len() == 3 && kv_events::sequence(refs[1]) == Ok(END_OF_REPLAY) {
                return Ok(out);
            }
            out.push(kv_events::decode(&refs).map_err(|e| format!("a replayed message: {e}"))?);
            if out.len() > MAX_REPLAYED {
                return Err("the replay did not end".into());
            }
        }
    };
    tokio::time::timeout(REPLAY_TIMEOUT, work)
        .await
        .map_err(|_| format!("the replay did not finish within {REPLAY_TIMEOUT:?}"))?
}
