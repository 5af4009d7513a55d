//! Flow control: while every replica that could take a request for a model is full, the
//! request waits here, in that model's queue, instead of in an engine's first-come queue;
//! the moment a replica has room (a request of ours there ends, or a scrape shows room),
//! the next request in fair order is let go and the normal policy picks its replica.
//!
//! - **Full** is what the `vllm` policy's terms already see ([`routing::room`]): each
//!   replica's sequences (its scrape plus what this gateway sent since, at least this
//!   gateway's own requests there) against its batch limit (configured, or learned when
//!   its engine queued). While any replica has a free slot and nobody is queued, a request
//!   passes with one look at the snapshot; a fleet whose batch limit is unknown is never
//!   held.
//! - **Fair**: weighted fair queueing between API keys (`weight=N`), strict priority
//!   between classes (`priority=high|normal|low`, lowered per request by
//!   `x-vllm-edge-priority`); see [`fair`]. Without `auth`, one shared flow.
//! - **Bounded**: `flow_control.max_queued` per model, `max_wait` per class. Past either,
//!   a request is answered 429 when its key holds more than its share of the queue while
//!   other keys wait too (a full queue then makes room by refusing that key's newest,
//!   not the newcomer), else 503; both OpenAI-shaped with `Retry-After` (the queue ahead
//!   times the measured interval between slot releases). A full queue also gives a
//!   higher class's request the place of the lowest class's newest.
//! - A client that disconnects while queued leaves the queue; nothing reaches an engine.
//!   A reload changes the limits of requests already queued. At shutdown, queued
//!   requests keep being let go as slots free for the first three quarters of the grace
//!   period; those still waiting then are answered 503 (`Connection: close`), so a
//!   client retries on the successor of an upgrade.
//!
//! Uses the fleet and routing (what is full); the proxy calls it at the end of admission,
//! the admin API shows it.

pub mod fair;

use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{oneshot, watch};

pub use crate::auth::Priority;
use crate::config::Config;
use crate::fleet::{fresh_since, Fleet};
use crate::routing::{self, Room};
use fair::{FairQueue, Ticket};

/// The request header that lowers a request's class below its key's (never raises it).
pub const PRIORITY_HEADER: &str = "x-vllm-edge-priority";

/// How often queues are looked at for room a scrape shows (replicas freed by other
/// gateways' or clients' requests), while anything is queued. Our own requests' ends let
/// the next one go at once.
const TICK: Duration = Duration::from_millis(20);

/// The class of a request of a key of class `key_class` that asks for `header` (the
/// value of [`PRIORITY_HEADER`], if any): the lower of the two. A value that is not a
/// class is an error, in words for the client.
pub fn class_of(key_class: Priority, header: Option<&[u8]>) -> Result<Priority, String> {
    let Some(v) = header else {
        return Ok(key_class);
    };
    let asked = std::str::from_utf8(v)
        .ok()
        .and_then(Priority::parse)
        .ok_or_else(|| {
            format!(
                "The {PRIORITY_HEADER} header must be high, normal or low, not `{}`.",
                String::from_utf8_lossy(v)
            )
        })?;
    Ok(asked.max(key_class))
}

/// vLLM's `priority` for a class (lower is served earlier; 0 is its default).
pub fn engine_priority(class: Priority) -> i64 {
    match class {
        Priority::High => -10,
        Priority::Normal => 0,
        Priority::Low => 10,
    }
}

/// Who is asking: the flow a request joins and its class.
#[derive(Debug, Clone)]
pub struct Asker {
    /// The key's name; one shared name without `auth`.
    pub key: Arc<str>,
    pub weight: u32,
    pub class: Priority,
    /// Whether requests come with keys (shares between keys mean something).
    pub keyed: bool,
}

impl Asker {
    /// A request without a key (no `auth`).
    pub fn anonymous(class: Priority) -> Asker {
        static ANONYMOUS: std::sync::LazyLock<Arc<str>> =
            std::sync::LazyLock::new(|| Arc::from("-"));
        Asker {
            key: ANONYMOUS.clone(),
            weight: 1,
            class,
            keyed: false,
        }
    }
}

/// Why a request left the queue without reaching a replica (the `reason` label of
/// `vllm_edge_queue_shed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// The queue was full, and no key held more than its share (503).
    QueueFull,
    /// It waited its class's `max_wait` (503).
    MaxWait,
    /// Its key held more than its share of the queue while other keys waited too (429).
    KeyShare,
    /// A full queue gave its place to a request of a higher class (503).
    Displaced,
    /// The gateway is shutting down and no slot freed in time (503).
    Shutdown,
    /// The client went away while it waited (nothing answered).
    ClientGone,
}

impl Shed {
    pub fn as_str(self) -> &'static str {
        match self {
            Shed::QueueFull => "queue_full",
            Shed::MaxWait => "max_wait",
            Shed::KeyShare => "key_share",
            Shed::Displaced => "displaced",
            Shed::Shutdown => "shutdown",
            Shed::ClientGone => "client_gone",
        }
    }
}

/// A request refused by flow control: what the client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub why: Shed,
    /// 429 or 503 (0 for a client gone: nobody to answer).
    pub status: u16,
    pub message: String,
    /// Whole seconds.
    pub retry_after: u64,
    /// How long it waited.
    pub waited: Duration,
}

/// A request's reserved slot: held from admission (or from when the queue let it go)
/// until the request is counted in flight at its replica (then dropped), or given back
/// if it never gets there.
#[derive(Debug)]
pub struct Grant {
    flow: Arc<FlowControl>,
    queue: Arc<ModelQueue>,
    armed: bool,
}

impl Drop for Grant {
    fn drop(&mut self) {
        if self.armed {
            let waiting = {
                let mut st = self.queue.state.lock();
                st.granted -= 1;
                !st.fair.is_empty()
            };
            if waiting {
                self.flow.dispatch(&self.queue);
            }
        }
    }
}

/// What [`FlowControl::wait_turn`] admitted.
#[derive(Debug, Default)]
pub struct Admitted {
    /// How long it was queued (`None`: it never was).
    pub queued: Option<Duration>,
    /// Its reserved slot: keep it until the request is in flight at a replica.
    pub grant: Option<Grant>,
}

enum Verdict {
    Go(Grant),
    Shed(Refusal),
}

#[derive(Debug)]
struct Waiter {
    tx: oneshot::Sender<Verdict>,
    since: Instant,
}

impl std::fmt::Debug for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Go(_) => f.write_str("Go"),
            Verdict::Shed(r) => write!(f, "Shed({:?})", r.why),
        }
    }
}

#[derive(Debug, Default)]
struct QueueState {
    fair: FairQueue<Waiter>,
    /// Requests admitted or let go whose replica has not counted them yet.
    granted: usize,
    /// When the last request was let go, and the mean interval between two (an
    /// exponentially weighted mean over intervals while requests were queued): how fast
    /// a full fleet frees slots.
    last_go: Option<Instant>,
    slot_interval_s: Option<f64>,
    /// Requests let go from the queue, and shed, since the start.
    let_go: u64,
    shed: u64,
}

/// One model's queue.
#[derive(Debug)]
pub struct ModelQueue {
    model: String,
    state: Mutex<QueueState>,
}

/// The queues of every model, and what they read: the running configuration and the
/// fleet.
#[derive(Debug)]
pub struct FlowControl {
    config: Arc<ArcSwap<Config>>,
    fleet: Arc<Fleet>,
    queues: Mutex<HashMap<String, Arc<ModelQueue>>>,
    /// Requests queued over every model: while 0, a request's end lets nothing go.
    queued: AtomicUsize,
    /// Bumped by a reload (queued requests look at their limits again) and at shutdown.
    changed: watch::Sender<u64>,
    /// From when queued requests are refused: shutdown's deadline for them.
    closing: Mutex<Option<Instant>>,
}

impl FlowControl {
    pub fn new(config: Arc<ArcSwap<Config>>, fleet: Arc<Fleet>) -> Arc<FlowControl> {
        Arc::new(FlowControl {
            config,
            fleet,
            queues: Mutex::default(),
            queued: AtomicUsize::new(0),
            changed: watch::channel(0).0,
            closing: Mutex::new(None),
        })
    }

    fn queue(&self, model: &str) -> Arc<ModelQueue> {
        let mut queues = self.queues.lock();
        if let Some(q) = queues.get(model) {
            return q.clone();
        }
        // Only models the fleet serves get here (admission refuses the others), so the
        // map is bounded by the fleet's models.
        let q = Arc::new(ModelQueue {
            model: model.to_string(),
            state: Mutex::default(),
        });
        queues.insert(model.to_string(), q.clone());
        q
    }

    /// The room for `model` now, under the running config. (Shutdown changes nothing
    /// here: past its deadline, queued requests are refused, not let go to full engines.)
    fn room(&self, model: &str, cfg: &Config) -> Room {
        if !cfg.flow.enabled {
            return Room::Unbounded;
        }
        let fresh = fresh_since(Instant::now(), cfg.stale_after());
        routing::room(&self.fleet.load(), model, fresh)
    }

    /// Waits, if the fleet is full for `model`, until a replica has room for this request
    /// and it is its turn; or refuses it. `gone` resolves when the client disconnects.
    /// Every request admitted holds a reserved slot ([`Grant`]) until it is in flight at
    /// a replica, so a burst arriving together is not let through on the same free slot.
    pub async fn wait_turn(
        self: &Arc<Self>,
        model: &str,
        asker: &Asker,
        gone: impl Future<Output = ()>,
    ) -> Result<Admitted, Refusal> {
        let cfg = self.config.load();
        if !cfg.flow.enabled {
            return Ok(Admitted::default());
        }
        let room = self.room(model, &cfg);
        let q = self.queue(model);
        let since = Instant::now();
        let ticket;
        let rx = {
            let mut st = q.state.lock();
            let free = match room {
                Room::Unbounded => usize::MAX,
                Room::Slots(n) => n.saturating_sub(st.granted),
            };
            if st.fair.is_empty() && free > 0 {
                st.granted += 1;
                return Ok(Admitted {
                    queued: None,
                    grant: Some(Grant {
                        flow: self.clone(),
                        queue: q.clone(),
                        armed: true,
                    }),
                });
            }
            if st.fair.len() >= cfg.flow.max_queued {
                self.make_room(&q.model, &mut st, asker, cfg.flow.max_queued)?;
            }
            // Only a request that waits allocates its channel.
            let (tx, rx) = oneshot::channel();
            ticket = st
                .fair
                .push(asker.class, &asker.key, asker.weight, Waiter { tx, since });
            self.queued.fetch_add(1, Ordering::Relaxed);
            rx
        };
        let mut waiting = Waiting {
            flow: self,
            queue: &q,
            ticket: Some(ticket),
        };
        self.dispatch(&q);
        waiting.wait(rx, asker, since, gone).await
    }

    /// A full queue and a new request from `asker`: which request gives way, if any. Its
    /// own key over its share (with other keys waiting): refused. Another key over its
    /// share: that key's newest is refused (429), and the newcomer takes its place.
    /// Otherwise the lowest class's newest, below the newcomer's class (503); or the
    /// newcomer (503).
    fn make_room(
        &self,
        model: &str,
        st: &mut QueueState,
        asker: &Asker,
        max_queued: usize,
    ) -> Result<(), Refusal> {
        let keys = st.fair.keys();
        let others = keys.iter().any(|k| k.key != asker.key);
        if asker.keyed && others {
            let mut total: f64 = keys.iter().map(|k| f64::from(k.weight)).sum();
            if !keys.iter().any(|k| k.key == asker.key) {
                total += f64::from(asker.weight);
            }
            let share = |w: u32| max_queued as f64 * f64::from(w) / total;
            let mine = keys
                .iter()
                .find(|k| k.key == asker.key)
                .map_or(0, |k| k.queued);
            if (mine + 1) as f64 > share(asker.weight) {
                let r = self.refusal(model, st, Shed::KeyShare, Some(asker), Duration::ZERO);
                return Err(r);
            }
            let over = keys
                .iter()
                .filter(|k| k.queued as f64 > share(k.weight))
                .max_by(|a, b| {
                    let ra = a.queued as f64 / share(a.weight);
                    let rb = b.queued as f64 / share(b.weight);
                    ra.total_cmp(&rb)
                });
            if let Some(victim) = over.map(|k| k.key.clone()) {
                if let Some((_, w)) = st.fair.remove_newest_of(&victim) {
                    let who = Asker {
                        key: victim,
                        weight: 1,
                        class: Priority::Normal,
                        keyed: true,
                    };
                    self.shed_waiter(model, st, w, Shed::KeyShare, Some(&who));
                    return Ok(());
                }
            }
        }
        if let Some((_, w)) = st.fair.remove_newest_below(asker.class) {
            self.shed_waiter(model, st, w, Shed::Displaced, None);
            return Ok(());
        }
        Err(self.refusal(model, st, Shed::QueueFull, Some(asker), Duration::ZERO))
    }

    /// Answers a waiter taken out of the queue with a refusal.
    fn shed_waiter(
        &self,
        model: &str,
        st: &mut QueueState,
        w: Waiter,
        why: Shed,
        who: Option<&Asker>,
    ) {
        self.queued.fetch_sub(1, Ordering::Relaxed);
        let r = self.refusal(model, st, why, who, w.since.elapsed());
        let _ = w.tx.send(Verdict::Shed(r));
    }

    /// The refusal for `why`, counted: its status, words and `Retry-After`.
    fn refusal(
        &self,
        model: &str,
        st: &mut QueueState,
        why: Shed,
        who: Option<&Asker>,
        waited: Duration,
    ) -> Refusal {
        st.shed += 1;
        crate::metrics::QUEUE_SHED
            .with_label_values(&[model, why.as_str()])
            .inc();
        let interval = st.slot_interval_s.unwrap_or(1.0);
        let ahead = st.fair.len() as f64;
        let (status, message, wait_s) = match why {
            Shed::KeyShare => {
                let key = who.map_or("-", |a| &*a.key);
                let keys = st.fair.keys();
                let total: f64 = keys
                    .iter()
                    .map(|k| f64::from(k.weight))
                    .sum::<f64>()
                    .max(1.0);
                let (mine, weight) = keys
                    .iter()
                    .find(|k| *k.key == *key)
                    .map_or((1, 1), |k| (k.queued.max(1), k.weight));
                (
                    429,
                    format!(
                        "Every replica serving `{model}` is busy and this key ({key}) already \
                         has {mine} requests waiting, more than its share; retry later."
                    ),
                    mine as f64 * interval * total / f64::from(weight),
                )
            }
            Shed::QueueFull => (
                503,
                format!(
                    "Every replica serving `{model}` is busy and {} requests are already \
                     waiting (flow_control.max_queued); retry later.",
                    st.fair.len()
                ),
                ahead * interval,
            ),
            Shed::MaxWait => (
                503,
                format!(
                    "Every replica serving `{model}` stayed busy for {:.0} s while this request \
                     waited (flow_control.max_wait); retry later.",
                    waited.as_secs_f64()
                ),
                ahead * interval,
            ),
            Shed::Displaced => (
                503,
                format!(
                    "Every replica serving `{model}` is busy and requests of a higher priority \
                     took this request's place in the queue; retry later."
                ),
                ahead * interval,
            ),
            Shed::Shutdown => (
                503,
                "The gateway is shutting down and no replica freed up in time; retry.".into(),
                0.0,
            ),
            Shed::ClientGone => (0, String::new(), 0.0),
        };
        Refusal {
            why,
            status,
            message,
            retry_after: wait_s.ceil().clamp(1.0, 60.0) as u64,
            waited,
        }
    }

    /// Lets queued requests for `q`'s model go while its replicas have room.
    fn dispatch(self: &Arc<Self>, q: &Arc<ModelQueue>) {
        if q.state.lock().fair.is_empty() {
            return;
        }
        let cfg = self.config.load();
        let room = self.room(&q.model, &cfg);
        let now = Instant::now();
        let mut st = q.state.lock();
        let mut free = match room {
            Room::Unbounded => usize::MAX,
            Room::Slots(n) => n.saturating_sub(st.granted),
        };
        while free > 0 {
            let Some((ticket, _, w)) = st.fair.pop() else {
                break;
            };
            self.queued.fetch_sub(1, Ordering::Relaxed);
            st.granted += 1;
            let grant = Grant {
                flow: self.clone(),
                queue: q.clone(),
                armed: true,
            };
            match w.tx.send(Verdict::Go(grant)) {
                Ok(()) => {
                    free -= 1;
                    st.let_go += 1;
                    crate::metrics::QUEUE_WAIT
                        .with_label_values(&[&q.model, ticket.class.as_str()])
                        .observe(now.saturating_duration_since(w.since).as_secs_f64());
                    if let Some(last) = st.last_go {
                        let dt = now.saturating_duration_since(last).as_secs_f64();
                        st.slot_interval_s =
                            Some(st.slot_interval_s.map_or(dt, |m| 0.9 * m + 0.1 * dt));
                    }
                    st.last_go = (!st.fair.is_empty()).then_some(now);
                }
                Err(Verdict::Go(mut g)) => {
                    // Its client left as it was let go: the slot is the next one's.
                    g.armed = false;
                    st.granted -= 1;
                }
                Err(Verdict::Shed(_)) => unreachable!("a grant was sent"),
            }
        }
        if st.fair.is_empty() {
            st.last_go = None;
        }
    }

    /// A request for `model` ended (or left its replica): the next queued one may go.
    pub fn released(self: &Arc<Self>, model: &str) {
        if self.queued.load(Ordering::Relaxed) == 0 {
            return;
        }
        let q = self.queues.lock().get(model).cloned();
        if let Some(q) = q {
            self.dispatch(&q);
        }
    }

    /// Every queue with requests, looked at for room.
    pub fn dispatch_all(self: &Arc<Self>) {
        if self.queued.load(Ordering::Relaxed) == 0 {
            return;
        }
        let queues: Vec<Arc<ModelQueue>> = self.queues.lock().values().cloned().collect();
        for q in &queues {
            self.dispatch(q);
        }
    }

    /// The configuration changed: queued requests look at their limits again, and the
    /// queues at the fleet (flow control turned off lets everything go).
    pub fn reconfigured(self: &Arc<Self>) {
        self.changed.send_modify(|g| *g += 1);
        self.dispatch_all();
    }

    /// Shutdown began: queued requests keep being let go as slots free until `deadline`,
    /// then are refused.
    pub fn close(self: &Arc<Self>, deadline: Instant) {
        *self.closing.lock() = Some(deadline);
        self.changed.send_modify(|g| *g += 1);
    }

    /// Runs until `stop` resolves: lets queued requests go when a scrape shows room, and
    /// tells them when a reload changed the configuration.
    pub async fn run(self: Arc<Self>, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen = self.config.load_full();
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => {
                    let now = self.config.load_full();
                    if !Arc::ptr_eq(&now, &seen) {
                        seen = now;
                        self.reconfigured();
                    } else {
                        self.dispatch_all();
                    }
                }
            }
        }
    }

    /// Requests queued now, over every model.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// What `/load-stats` shows of each model's queue.
    pub fn stats(&self) -> serde_json::Value {
        let queues: Vec<Arc<ModelQueue>> = self.queues.lock().values().cloned().collect();
        let mut models = serde_json::Map::new();
        for q in queues {
            let st = q.state.lock();
            let by_class: serde_json::Map<String, serde_json::Value> = Priority::ALL
                .iter()
                .map(|c| (c.as_str().to_string(), st.fair.class_len(*c).into()))
                .collect();
            let by_key: Vec<serde_json::Value> = st
                .fair
                .by_class_and_key()
                .into_iter()
                .map(|(c, k, n)| serde_json::json!({"key": &*k, "priority": c.as_str(), "queued": n}))
                .collect();
            let oldest = st.fair_oldest();
            models.insert(
                q.model.clone(),
                serde_json::json!({
                    "queued": st.fair.len(),
                    "by_priority": by_class,
                    "by_key": by_key,
                    "oldest_wait_ms": oldest.map(|t| (t.elapsed().as_secs_f64() * 1e3).round()),
                    "let_go": st.let_go,
                    "shed": st.shed,
                    "slot_interval_ms": st.slot_interval_s.map(|s| (s * 1e4).round() / 10.0),
                }),
            );
        }
        let cfg = self.config.load();
        serde_json::json!({
            "enabled": cfg.flow.enabled,
            "queued": self.queued(),
            "max_queued": cfg.flow.max_queued,
            "models": models,
        })
    }

    /// `(model, class, key, queued)` for each flow with requests (the queue gauge).
    pub fn lengths(&self) -> Vec<(String, Priority, Arc<str>, usize)> {
        let queues: Vec<Arc<ModelQueue>> = self.queues.lock().values().cloned().collect();
        let mut out = Vec::new();
        for q in queues {
            for (c, k, n) in q.state.lock().fair.by_class_and_key() {
                out.push((q.model.clone(), c, k, n));
            }
        }
        out
    }
}

impl QueueState {
    /// When the longest-waiting request was queued.
    fn fair_oldest(&self) -> Option<Instant> {
        self.fair.oldest(|w| w.since)
    }
}

/// A request in a queue: takes it out again if it leaves without being let go (its
/// client gone, the future dropped).
struct Waiting<'a> {
    flow: &'a Arc<FlowControl>,
    queue: &'a Arc<ModelQueue>,
    ticket: Option<Ticket>,
}

impl Waiting<'_> {
    async fn wait(
        &mut self,
        mut rx: oneshot::Receiver<Verdict>,
        asker: &Asker,
        since: Instant,
        gone: impl Future<Output = ()>,
    ) -> Result<Admitted, Refusal> {
        tokio::pin!(gone);
        let mut changed = self.flow.changed.subscribe();
        loop {
            let cfg = self.flow.config.load();
            let mut until = since + cfg.flow.max_wait(asker.class);
            let closing = *self.flow.closing.lock();
            if let Some(c) = closing {
                until = until.min(c);
            }
            let verdict = tokio::select! {
                biased;
                v = &mut rx => v,
                _ = tokio::time::sleep_until(until.into()) => {
                    match self.expire(asker, since, closing.is_some_and(|c| c <= until)) {
                        Some(r) => return Err(r),
                        // Let go as its time ran out: the verdict is on its way.
                        None => (&mut rx).await,
                    }
                }
                _ = changed.changed() => continue,
                _ = &mut gone => {
                    if self.leave() {
                        let mut st = self.queue.state.lock();
                        let r = self.flow.refusal(&self.queue.model, &mut st, Shed::ClientGone, Some(asker), since.elapsed());
                        return Err(r);
                    }
                    (&mut rx).await
                }
            };
            self.ticket = None;
            return match verdict {
                Ok(Verdict::Go(grant)) => Ok(Admitted {
                    queued: Some(since.elapsed()),
                    grant: Some(grant),
                }),
                Ok(Verdict::Shed(r)) => Err(r),
                // Never sent: the queue let it go without a slot.
                Err(_) => Ok(Admitted {
                    queued: Some(since.elapsed()),
                    grant: None,
                }),
            };
        }
    }

    /// Takes the request out of its queue; false if it was let go (or shed) already.
    fn leave(&mut self) -> bool {
        let Some(t) = self.ticket.take() else {
            return false;
        };
        let removed = self.queue.state.lock().fair.remove(t).is_some();
        if removed {
            self.flow.queued.fetch_sub(1, Ordering::Relaxed);
        }
        removed
    }

    /// Its wait is over: the refusal, unless it was let go meanwhile. A key over its share
    /// of the queue (with other keys waiting) hears 429, others 503.
    fn expire(&mut self, asker: &Asker, since: Instant, shutdown: bool) -> Option<Refusal> {
        if !self.leave() {
            return None;
        }
        let mut st = self.queue.state.lock();
        let why = if shutdown {
            Shed::Shutdown
        } else if asker.keyed && over_share(&st.fair.keys(), &asker.key, st.fair.len() + 1) {
            Shed::KeyShare
        } else {
            Shed::MaxWait
        };
        Some(self.flow.refusal(
            &self.queue.model,
            &mut st,
            why,
            Some(asker),
            since.elapsed(),
        ))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Whether `key` holds more than its weighted share of `len` queued requests while
/// other keys wait too (counting the request asking as one of `key`'s).
fn over_share(keys: &[fair::KeyLoad], key: &str, len: usize) -> bool {
    if !keys.iter().any(|k| &*k.key != key) {
        return false;
    }
    let total: f64 = keys.iter().map(|k| f64::from(k.weight)).sum();
    keys.iter()
        .find(|k| &*k.key == key)
        .is_some_and(|k| (k.queued + 1) as f64 > len as f64 * f64::from(k.weight) / total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_lowers_a_class_and_never_raises_it() {
        assert_eq!(class_of(Priority::High, None), Ok(Priority::High));
        assert_eq!(class_of(Priority::High, Some(b"low")), Ok(Priority::Low));
        assert_eq!(
            class_of(Priority::Normal, Some(b" High")),
            Ok(Priority::Normal)
        );
        assert_eq!(class_of(Priority::Low, Some(b"normal")), Ok(Priority::Low));
        let e = class_of(Priority::Normal, Some(b"urgent")).unwrap_err();
        assert!(
            e.contains("x-vllm-edge-priority") && e.contains("`urgent`"),
            "{e}"
        );
        assert!(engine_priority(Priority::High) < engine_priority(Priority::Normal));
        assert!(engine_priority(Priority::Normal) < engine_priority(Priority::Low));
    }

    #[test]
    fn a_share_counts_the_asking_request_and_needs_other_keys() {
        let k = |key: &str, queued, weight| fair::KeyLoad {
            key: Arc::from(key),
            queued,
            weight,
        };
        // Alone, a key is never over its share: the fleet is what is full.
        assert!(!over_share(&[k("a", 10, 1)], "a", 11));
        // 8 of 10 with equal weights: over; 4 of 10: not.
        assert!(over_share(&[k("a", 8, 1), k("b", 2, 1)], "a", 10));
        assert!(!over_share(&[k("a", 4, 1), k("b", 6, 1)], "a", 10));
        // Weight 4 of 5: a share of 8 in 10.
        assert!(!over_share(&[k("a", 7, 4), k("b", 3, 1)], "a", 10));
    }
}
