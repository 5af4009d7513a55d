//! Periodic work on every backend, each backend on its own: a slow or hanging one delays
//! only itself.
//!
//! The scraper and the health checker visit every backend each interval. Waiting for the
//! whole round before the next would let one backend whose `/metrics` or `/v1/models`
//! hangs until its timeout hold back every other backend's observations, and with a
//! timeout longer than four scrape intervals make the whole fleet's load stale.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::watch;

use crate::fleet::{Backend, BackendEntry, Fleet};

/// How long a finished job's result may wait for others before `done` gets it, at most:
/// each call of `done` may publish a new fleet snapshot, whose cost grows with the fleet,
/// so results that come close together are handed over together.
const GATHER: Duration = Duration::from_millis(20);

/// Every `interval` (the first time after one interval), starts `start(entry)` for each
/// backend of the fleet whose previous job has finished and been handed over (a backend
/// whose job is still running is skipped this time; `start` may also return `None` to
/// skip one), and hands
/// results to `done` in batches: when no job is left running, or `GATHER` (at most half
/// an interval) after the first result of a batch. Returns when `stop` turns true or its
/// sender is gone.
pub async fn run<T, Fut>(
    fleet: &Fleet,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
    mut start: impl FnMut(&BackendEntry) -> Option<Fut>,
    mut done: impl FnMut(Vec<(Arc<Backend>, T)>),
) where
    Fut: Future<Output = T>,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let gather = GATHER.min(interval / 2);
    let mut running = FuturesUnordered::new();
    let mut busy: Vec<Arc<Backend>> = Vec::new();
    let mut batch: Vec<(Arc<Backend>, T)> = Vec::new();
    let mut flush_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    return;
                }
            }
            _ = tick.tick() => {
                let snap = fleet.load();
                for e in &snap.backends {
                    if busy.iter().any(|b| Arc::ptr_eq(b, &e.backend)) {
                        continue;
                    }
                    if let Some(job) = start(e) {
                        let b = e.backend.clone();
                        busy.push(b.clone());
                        running.push(async move { (b, job.await) });
                    }
                }
            }
            Some(result) = running.next(), if !running.is_empty() => {
                batch.push(result);
                if running.is_empty() {
                    flush_at = None;
                    hand_over(&mut batch, &mut busy, &mut done);
                } else if flush_at.is_none() {
                    flush_at = Some(tokio::time::Instant::now() + gather);
                }
            }
            _ = sleep_until_some(flush_at) => {
                flush_at = None;
                hand_over(&mut batch, &mut busy, &mut done);
            }
        }
    }
}

/// Gives `batch` to `done`, and only then takes its backends off `busy`: a job started
/// before its backend's last result is handed over would start from the state before it,
/// and its own result would undo that one.
fn hand_over<T>(
    batch: &mut Vec<(Arc<Backend>, T)>,
    busy: &mut Vec<Arc<Backend>>,
    done: &mut impl FnMut(Vec<(Arc<Backend>, T)>),
) {
    let batch = std::mem::take(batch);
    busy.retain(|b| !batch.iter().any(|(d, _)| Arc::ptr_eq(b, d)));
    done(batch);
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendConfig;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn fleet_of(n: usize) -> Arc<Fleet> {
        let cfgs: Vec<BackendConfig> = (0..n)
            .map(|i| {
                BackendConfig::new(
                    format!("b{i}"),
                    format!("http://b{i}"),
                    "127.0.0.1:1".parse().unwrap(),
                )
            })
            .collect();
        Fleet::new(&cfgs)
    }

    fn index_of(fleet: &Fleet, b: &Arc<Backend>) -> usize {
        fleet
            .load()
            .backends
            .iter()
            .position(|e| Arc::ptr_eq(&e.backend, b))
            .unwrap()
    }

    /// Backend 0's job never ends; another's takes `ms`, and yields its index.
    async fn job(i: usize, ms: u64) -> usize {
        if i == 0 {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(Duration::from_millis(ms)).await;
        i
    }

    /// Stops the rounds `ms` into the (paused) test clock.
    async fn stop_at(ms: u64, tx: watch::Sender<bool>) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        tx.send(true).unwrap();
    }

    /// One backend's job never ends; the other's keeps coming round, and no backend ever
    /// has two jobs at once.
    #[tokio::test(start_paused = true)]
    async fn a_hanging_backend_holds_back_only_itself() {
        let fleet = fleet_of(2);
        let started = [AtomicUsize::new(0), AtomicUsize::new(0)];
        let (mut finished, mut batches) = (0usize, 0usize);
        let (tx, rx) = watch::channel(false);
        let rounds = run(
            &fleet,
            Duration::from_millis(100),
            rx,
            |e| {
                let i = index_of(&fleet, &e.backend);
                started[i].fetch_add(1, Ordering::Relaxed);
                Some(job(i, 30))
            },
            |batch| {
                assert!(
                    batch.iter().all(|(_, i)| *i == 1),
                    "the hanging one never ends"
                );
                finished += batch.len();
                batches += 1;
            },
        );
        tokio::join!(rounds, stop_at(1080, tx));
        assert_eq!(started[0].load(Ordering::Relaxed), 1, "one job at a time");
        assert_eq!(started[1].load(Ordering::Relaxed), 10, "every interval");
        assert_eq!((finished, batches), (10, 10));
    }

    /// A backend's next job starts only once its last result was handed over, even when
    /// that result waited past a tick for others to join it.
    #[tokio::test(start_paused = true)]
    async fn no_job_starts_before_its_backend_s_last_result_is_handed_over() {
        let fleet = fleet_of(2);
        let started = [AtomicUsize::new(0), AtomicUsize::new(0)];
        let handed = [AtomicUsize::new(0), AtomicUsize::new(0)];
        let (tx, rx) = watch::channel(false);
        let rounds = run(
            &fleet,
            Duration::from_millis(100),
            rx,
            |e| {
                let i = index_of(&fleet, &e.backend);
                assert_eq!(
                    started[i].load(Ordering::Relaxed),
                    handed[i].load(Ordering::Relaxed),
                    "backend {i} started again before its result was handed over"
                );
                started[i].fetch_add(1, Ordering::Relaxed);
                // Done 10 ms before the next tick; handed over 10 ms after it.
                Some(job(i, 90))
            },
            |batch| {
                for (_, i) in batch {
                    handed[i].fetch_add(1, Ordering::Relaxed);
                }
            },
        );
        tokio::join!(rounds, stop_at(1050, tx));
        assert_eq!(started[1].load(Ordering::Relaxed), 5, "every other tick");
    }

    /// Results that come within [`GATHER`] of each other are handed over together, and a
    /// round's last result at once.
    #[tokio::test(start_paused = true)]
    async fn results_close_together_make_one_batch() {
        let fleet = fleet_of(8);
        let mut sizes = Vec::new();
        let (tx, rx) = watch::channel(false);
        let rounds = run(
            &fleet,
            Duration::from_millis(250),
            rx,
            |e| {
                // 1 ms apart, the last one 100 ms late.
                let i = index_of(&fleet, &e.backend) as u64;
                let ms = if i == 7 { 100 } else { i + 1 };
                Some(tokio::time::sleep(Duration::from_millis(ms)))
            },
            |batch| sizes.push(batch.len()),
        );
        tokio::join!(rounds, stop_at(400, tx));
        assert_eq!(sizes, vec![7, 1]);
    }
}
