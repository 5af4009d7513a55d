//! The simulator's KV events, published as vLLM 0.32 publishes them
//! ([`crate::engine::kv_events`]): a PUB socket sending `[topic, sequence, batch]` for
//! every engine step that changed the prefix cache, and a ROUTER socket that replays the
//! last [`REPLAY_BUFFER`] batches from a requested sequence number. An engine restart
//! (`POST /sim/restart`) starts the sequence again at 0 with an empty buffer.
//!
//! Loss on demand, for tests (`POST /sim/kv-events`): `drop` publishes the next N
//! batches nowhere but keeps them for replay (a subscriber's queue overflowed); `lose`
//! neither publishes nor keeps them (past the replay buffer).

use bytes::Bytes;
use parking_lot::Mutex;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;
use zeromq::{Socket, SocketRecv, SocketSend};

use super::scheduler::CacheEvent;
use crate::engine::kv_events::{encode_batch, Batch, Event, Extra, Stored, END_OF_REPLAY};

/// Batches kept for replays (vLLM's `buffer_steps` default).
pub const REPLAY_BUFFER: usize = 10_000;

/// What the engine hands the publisher.
#[derive(Debug)]
pub enum Publish {
    /// The cache changes of one step.
    Changes(Vec<CacheEvent>),
    /// The engine started again.
    Restart,
}

/// The engine's end of the publisher.
#[derive(Debug, Clone)]
pub struct KvSink {
    pub tx: mpsc::UnboundedSender<Publish>,
}

/// Loss injected on demand.
#[derive(Debug, Default)]
pub struct Loss {
    pub drop: AtomicU64,
    pub lose: AtomicU64,
}

/// A running publisher: where it listens, and its loss switches.
#[derive(Debug)]
pub struct Publisher {
    pub endpoint: SocketAddr,
    pub replay: SocketAddr,
    pub loss: Arc<Loss>,
}

fn tcp(addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V6(ip) => format!("tcp://[{ip}]:{}", addr.port()),
        ip => format!("tcp://{ip}:{}", addr.port()),
    }
}

fn bound(e: zeromq::Endpoint) -> std::io::Result<SocketAddr> {
    match e {
        zeromq::Endpoint::Tcp(zeromq::Host::Ipv4(ip), port) => Ok(SocketAddr::new(ip.into(), port)),
        zeromq::Endpoint::Tcp(zeromq::Host::Ipv6(ip), port) => Ok(SocketAddr::new(ip.into(), port)),
        other => Err(std::io::Error::other(format!("bound to {other}"))),
    }
}

/// Binds the PUB and ROUTER sockets on `host` (port 0: any free one) and starts
/// publishing what the returned sink is sent. `lora_names[i]` is adapter `i + 1`'s name.
pub async fn start(
    host: IpAddr,
    port: u16,
    replay_port: u16,
    block_size: usize,
    lora_names: Arc<Mutex<Vec<String>>>,
) -> std::io::Result<(KvSink, Publisher)> {
    let err = |e: zeromq::ZmqError| std::io::Error::other(e.to_string());
    let mut publisher = zeromq::PubSocket::new();
    let endpoint = bound(
        publisher
            .bind(&tcp(SocketAddr::new(host, port)))
            .await
            .map_err(err)?,
    )?;
    let mut router = zeromq::RouterSocket::new();
    let replay = bound(
        router
            .bind(&tcp(SocketAddr::new(host, replay_port)))
            .await
            .map_err(err)?,
    )?;
    let (tx, rx) = mpsc::unbounded_channel();
    let loss = Arc::new(Loss::default());
    tokio::spawn(run(
        publisher,
        router,
        rx,
        loss.clone(),
        block_size,
        lora_names,
    ));
    Ok((
        KvSink { tx },
        Publisher {
            endpoint,
            replay,
            loss,
        },
    ))
}

async fn run(
    mut publisher: zeromq::PubSocket,
    mut router: zeromq::RouterSocket,
    mut rx: mpsc::UnboundedReceiver<Publish>,
    loss: Arc<Loss>,
    block_size: usize,
    lora_names: Arc<Mutex<Vec<String>>>,
) {
    let mut seq: u64 = 0;
    let mut buffer: std::collections::VecDeque<(u64, Bytes)> = Default::default();
    let take = |n: &AtomicU64| {
        n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1))
            .is_ok()
    };
    loop {
        tokio::select! {
            got = rx.recv() => match got {
                None => return,
                Some(Publish::Restart) => {
                    seq = 0;
                    buffer.clear();
                }
                Some(Publish::Changes(changes)) => {
                    let events = events(changes, block_size, &lora_names.lock());
                    let ts = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0.0, |d| d.as_secs_f64());
                    let payload = Bytes::from(encode_batch(&Batch {
                        ts,
                        events,
                        data_parallel_rank: Some(0),
                    }));
                    let this = seq;
                    seq += 1;
                    if take(&loss.lose) {
                        continue;
                    }
                    buffer.push_back((this, payload.clone()));
                    if buffer.len() > REPLAY_BUFFER {
                        buffer.pop_front();
                    }
                    if take(&loss.drop) {
                        continue;
                    }
                    let msg = vec![Bytes::new(), Bytes::copy_from_slice(&this.to_be_bytes()), payload];
                    if let Ok(m) = zeromq::ZmqMessage::try_from(msg) {
                        let _ = publisher.send(m).await;
                    }
                }
            },
            req = router.recv() => {
                let Ok(req) = req else { return };
                serve_replay(&mut router, req.into_vec(), &buffer).await;
            }
        }
    }
}

/// Answers one replay request `[identity, "", from]` with the buffered batches from
/// `from` on, then the end marker, framed as vLLM 0.32 frames them.
async fn serve_replay(
    router: &mut zeromq::RouterSocket,
    req: Vec<Bytes>,
    buffer: &std::collections::VecDeque<(u64, Bytes)>,
) {
    let [id, _, from] = req.as_slice() else {
        return;
    };
    let Ok(from) = crate::engine::kv_events::sequence(from) else {
        return;
    };
    // As vLLM 0.32: `[identity, "", topic, seq, payload]`.
    let reply = |seq: u64, payload: Bytes| {
        zeromq::ZmqMessage::try_from(vec![
            id.clone(),
            Bytes::new(),
            Bytes::new(),
            Bytes::copy_from_slice(&seq.to_be_bytes()),
            payload,
        ])
    };
    for (s, payload) in buffer.iter().filter(|(s, _)| *s >= from) {
        if let Ok(m) = reply(*s, payload.clone()) {
            if router.send(m).await.is_err() {
                return;
            }
        }
    }
    if let Ok(m) = reply(END_OF_REPLAY, Bytes::new()) {
        let _ = router.send(m).await;
    }
}

/// The cache changes of a step as vLLM's events: consecutive stores of one chain (each
/// block's parent the one before) are one `BlockStored`, as vLLM reports a request's new
/// blocks together; every removal is a `BlockRemoved` of its own.
fn events(changes: Vec<CacheEvent>, block_size: usize, lora_names: &[String]) -> Vec<Event> {
    let mut out: Vec<Event> = Vec::new();
    for c in changes {
        match c {
            CacheEvent::Removed(h) => {
                out.push(Event::BlockRemoved(crate::engine::kv_events::Removed {
                    block_hashes: vec![h],
                    medium: Some("GPU".into()),
                    group_idx: Some(0),
                }))
            }
            CacheEvent::Stored {
                hash,
                parent,
                tokens,
                lora,
            } => {
                let name = (lora > 0)
                    .then(|| lora_names.get(lora as usize - 1).cloned())
                    .flatten();
                let extra = name.clone().map(|n| vec![Extra::Text(n)]);
                if let Some(Event::BlockStored(s)) = out.last_mut() {
                    if parent.is_some()
                        && s.block_hashes.last() == parent.as_ref()
                        && s.lora_name == name
                    {
                        s.block_hashes.push(hash);
                        s.token_ids.extend_from_slice(&tokens);
                        if let Some(e) = &mut s.extra_keys {
                            e.push(extra);
                        }
                        continue;
                    }
                }
                out.push(Event::BlockStored(Stored {
                    block_hashes: vec![hash],
                    parent_block_hash: parent,
                    token_ids: tokens,
                    block_size: block_size as u32,
                    lora_name: name,
                    medium: Some("GPU".into()),
                    extra_keys: Some(vec![extra]),
                    group_idx: Some(0),
                    kv_cache_spec_kind: Some("full_attention".into()),
                }));
            }
        }
    }
    out
}
