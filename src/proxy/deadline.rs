//! Deadlines on one attempt at a backend: time to first byte, gap between stream chunks,
//! and a total for non-streaming answers.
//!
//! Pingora's upstream `read_timeout` applies to every read alike, so it cannot tell the
//! first token of a stream (which may queue for a while) from the gap between two tokens
//! (milliseconds). A [`Watchdog`] task per attempt enforces the deadlines instead: the
//! proxy reports progress (the first byte, each chunk), and when a deadline passes the
//! watchdog shuts the upstream socket down. Pingora's pending read then fails, and the
//! proxy's error hooks see [`Watchdog::fired`] and treat the failure as a timeout (retried
//! if nothing reached the client, counted against the backend either way).
//!
//! Only attempts with a gap deadline (streams) need the watchdog. A non-streaming answer
//! has two deadlines, first byte and total, and Pingora's per-read timeout set to the
//! nearer of them bounds the wait for the header and every stall of the body; the total
//! is also checked as each piece of the body arrives, so an answer that keeps coming is
//! cut there ([`Attempt::Checked`]). That spares every non-streaming request a descriptor
//! duplicate, a task and a timer (issue 10). The price: a body that stalls after part of
//! it arrived is cut one read timeout after its last piece, which may be past the total.
//!
//! The watchdog shuts down a duplicate of the upstream socket's descriptor, owned here,
//! never the raw number Pingora holds: the number could be reused by another connection
//! once Pingora closes it, the duplicate cannot. The duplicate is closed as soon as the
//! attempt ends ([`Watchdog::finish`]), before Pingora can return the connection to its
//! pool, so a pooled connection is never shut down by a late watchdog, and a closed
//! upstream connection is not kept open by it.

use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The limits of one attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// From the attempt's start to its first byte.
    pub first_byte: Duration,
    /// Between two pieces of progress after the first byte.
    pub gap: Option<Duration>,
    /// From the start to the end.
    pub total: Option<Duration>,
}

impl Limits {
    /// The longest a single read may legitimately wait: Pingora's own per-read timeout,
    /// kept as a backstop behind the watchdog. Without a watchdog (no gap deadline) it is
    /// the nearer of the first-byte and total deadlines, which it then enforces.
    pub fn longest_read(&self) -> Duration {
        let Some(g) = self.gap else {
            return self
                .total
                .map_or(self.first_byte, |t| t.min(self.first_byte));
        };
        let d = self.first_byte.max(g);
        self.total.map_or(d, |t| d.min(t.max(self.first_byte)))
    }
}

/// How one attempt's deadlines are enforced.
#[derive(Debug)]
pub enum Attempt {
    /// A gap deadline moves with progress: a watchdog task watches it.
    Watched(Watchdog),
    /// No gap deadline: Pingora's per-read timeout ([`Limits::longest_read`]) and a check
    /// of the total as each piece of the answer arrives.
    Checked {
        started: Instant,
        total: Option<Duration>,
        fired: Option<Expired>,
    },
}

impl Attempt {
    /// Starts enforcing `limits` on the upstream connection `fd` (as given to
    /// `connected_to_upstream`) from `started`. `None` if a watchdog is needed and the
    /// descriptor cannot be duplicated (then only Pingora's per-read timeout applies).
    pub fn start(fd: RawFd, started: Instant, limits: Limits) -> Option<Attempt> {
        if limits.gap.is_some() {
            return Watchdog::start(fd, started, limits).map(Attempt::Watched);
        }
        Some(Attempt::Checked {
            started,
            total: limits.total,
            fired: None,
        })
    }

    /// A piece of the answer arrived. `Err` with the deadline that passed when the
    /// attempt must end now.
    pub fn progress(&mut self) -> Result<(), Expired> {
        match self {
            Attempt::Watched(w) => {
                w.first_byte();
                w.progress();
                Ok(())
            }
            Attempt::Checked {
                started,
                total: Some(total),
                fired,
            } if started.elapsed() > *total => {
                *fired = Some(Expired::Total);
                Err(Expired::Total)
            }
            Attempt::Checked { .. } => Ok(()),
        }
    }

    /// The deadline that ended the attempt, if one did.
    pub fn fired(&self) -> Option<Expired> {
        match self {
            Attempt::Watched(w) => w.fired(),
            Attempt::Checked { fired, .. } => *fired,
        }
    }

    /// The attempt ended: from now on nothing touches the connection.
    pub fn finish(&self) {
        if let Attempt::Watched(w) = self {
            w.finish();
        }
    }
}

/// Which deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    FirstByte,
    Gap,
    Total,
}

impl Expired {
    pub fn as_str(self) -> &'static str {
        match self {
            Expired::FirstByte => "first byte",
            Expired::Gap => "gap between chunks",
            Expired::Total => "total",
        }
    }
}

const NOTHING: u64 = 0;

#[derive(Debug)]
struct Clock {
    started: Instant,
    limits: Limits,
    /// Nanoseconds after `started` (plus one; 0 = not yet).
    first_byte: AtomicU64,
    last_progress: AtomicU64,
    /// 0, or 1 + the `Expired` variant index.
    fired: AtomicU8,
    /// The duplicate descriptor; `None` once the attempt ended.
    fd: Mutex<Option<OwnedFd>>,
}

impl Clock {
    fn stamp(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_nanos() as u64 + 1
    }

    fn at(&self, stamp: u64) -> Instant {
        self.started + Duration::from_nanos(stamp - 1)
    }

    /// The next deadline and what it is, given the progress so far.
    fn next_deadline(&self) -> Option<(Instant, Expired)> {
        let total = self
            .limits
            .total
            .map(|t| (self.started + t, Expired::Total));
        let step = match self.first_byte.load(Ordering::Acquire) {
            NOTHING => Some((self.started + self.limits.first_byte, Expired::FirstByte)),
            _ => self.limits.gap.map(|g| {
                let last = self.last_progress.load(Ordering::Acquire);
                (self.at(last) + g, Expired::Gap)
            }),
        };
        match (step, total) {
            (Some(s), Some(t)) => Some(if t.0 < s.0 { t } else { s }),
            (s, t) => s.or(t),
        }
    }

    fn fire(&self, why: Expired) {
        let fd = self.fd.lock().expect("not poisoned");
        if let Some(fd) = fd.as_ref() {
            self.fired.store(why as u8 + 1, Ordering::Release);
            let _ = socket2::SockRef::from(fd).shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Watches one attempt; dropping it ends the watch.
#[derive(Debug)]
pub struct Watchdog {
    clock: Arc<Clock>,
    task: tokio::task::JoinHandle<()>,
}

impl Watchdog {
    /// Starts watching the upstream connection `fd` (as given to `connected_to_upstream`)
    /// from `started`. `None` if the descriptor cannot be duplicated (then only Pingora's
    /// per-read timeout applies).
    pub fn start(fd: RawFd, started: Instant, limits: Limits) -> Option<Watchdog> {
        // SAFETY: Pingora hands us the descriptor of the live upstream connection for the
        // duration of the hook; it is only borrowed here to duplicate it.
        let dup = unsafe { BorrowedFd::borrow_raw(fd) }
            .try_clone_to_owned()
            .ok()?;
        let clock = Arc::new(Clock {
            started,
            limits,
            first_byte: AtomicU64::new(NOTHING),
            last_progress: AtomicU64::new(NOTHING),
            fired: AtomicU8::new(0),
            fd: Mutex::new(Some(dup)),
        });
        let c = clock.clone();
        let task = tokio::spawn(async move {
            // Progress moves the deadline while we sleep: look again after each wake-up.
            while let Some((deadline, why)) = c.next_deadline() {
                if deadline <= Instant::now() {
                    c.fire(why);
                    return;
                }
                tokio::time::sleep_until(deadline.into()).await;
            }
        });
        Some(Watchdog { clock, task })
    }

    /// The first byte arrived (for a stream, the first chunk; otherwise the header).
    pub fn first_byte(&self) {
        let now = self.clock.stamp(Instant::now());
        let _ = self.clock.first_byte.compare_exchange(
            NOTHING,
            now,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.clock.last_progress.store(now, Ordering::Release);
    }

    /// A chunk arrived.
    pub fn progress(&self) {
        if self.clock.first_byte.load(Ordering::Acquire) == NOTHING {
            return;
        }
        self.clock
            .last_progress
            .store(self.clock.stamp(Instant::now()), Ordering::Release);
    }

    /// The deadline that ended the attempt, if one did.
    pub fn fired(&self) -> Option<Expired> {
        match self.clock.fired.load(Ordering::Acquire) {
            0 => None,
            1 => Some(Expired::FirstByte),
            2 => Some(Expired::Gap),
            _ => Some(Expired::Total),
        }
    }

    /// The attempt ended: from now on the watchdog never touches the connection.
    pub fn finish(&self) {
        self.clock.fd.lock().expect("not poisoned").take();
        self.task.abort();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    fn limits(first_ms: u64, gap_ms: Option<u64>, total_ms: Option<u64>) -> Limits {
        Limits {
            first_byte: Duration::from_millis(first_ms),
            gap: gap_ms.map(Duration::from_millis),
            total: total_ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn longest_read_is_the_widest_single_wait() {
        assert_eq!(
            limits(100, Some(300), None).longest_read(),
            Duration::from_millis(300)
        );
        // Unwatched: it enforces the nearer of first byte and total.
        assert_eq!(
            limits(500, None, Some(400)).longest_read(),
            Duration::from_millis(400)
        );
        assert_eq!(
            limits(300, None, Some(400)).longest_read(),
            Duration::from_millis(300)
        );
        assert_eq!(
            limits(100, Some(900), Some(400)).longest_read(),
            Duration::from_millis(400)
        );
    }

    #[tokio::test]
    async fn only_a_gap_deadline_needs_a_watchdog_and_a_checked_total_fires() {
        let (client, _server) = pair().await;
        let fd = client.as_raw_fd();
        let stream = Attempt::start(fd, Instant::now(), limits(50, Some(50), None)).unwrap();
        assert!(matches!(stream, Attempt::Watched(_)));
        let mut a = Attempt::start(fd, Instant::now(), limits(1000, None, Some(30))).unwrap();
        assert!(matches!(a, Attempt::Checked { .. }));
        assert_eq!((a.progress(), a.fired()), (Ok(()), None));
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(a.progress(), Err(Expired::Total));
        assert_eq!(a.fired(), Some(Expired::Total));
        // Without a total, pieces may keep coming (the per-read timeout bounds a stall).
        let mut open = Attempt::start(fd, Instant::now(), limits(10, None, None)).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!((open.progress(), open.fired()), (Ok(()), None));
    }

    #[tokio::test]
    async fn no_first_byte_shuts_the_connection_down() {
        let (mut client, _server) = pair().await;
        let w =
            Watchdog::start(client.as_raw_fd(), Instant::now(), limits(50, None, None)).unwrap();
        let mut buf = [0u8; 16];
        // The read would wait forever: the watchdog's shutdown ends it with EOF.
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("the watchdog ended the read")
            .unwrap();
        assert_eq!(n, 0);
        assert_eq!(w.fired(), Some(Expired::FirstByte));
    }

    #[tokio::test]
    async fn progress_moves_the_gap_deadline() {
        let (mut client, _server) = pair().await;
        let started = Instant::now();
        let w = Watchdog::start(client.as_raw_fd(), started, limits(1000, Some(80), None)).unwrap();
        w.first_byte();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(40)).await;
            w.progress();
        }
        assert_eq!(
            w.fired(),
            None,
            "progress every 40 ms keeps an 80 ms gap open"
        );
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("the watchdog ended the read")
            .unwrap();
        assert_eq!(n, 0);
        assert_eq!(w.fired(), Some(Expired::Gap));
        assert!(started.elapsed() >= Duration::from_millis(280));
    }

    #[tokio::test]
    async fn total_bounds_a_slow_answer_and_finish_disarms() {
        let (mut client, _server) = pair().await;
        let w = Watchdog::start(
            client.as_raw_fd(),
            Instant::now(),
            limits(1000, None, Some(60)),
        )
        .unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((n, w.fired()), (0, Some(Expired::Total)));

        let (mut client, mut server) = pair().await;
        let w =
            Watchdog::start(client.as_raw_fd(), Instant::now(), limits(30, None, None)).unwrap();
        w.finish();
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(w.fired(), None);
        // The connection still works both ways.
        use tokio::io::AsyncWriteExt;
        server.write_all(b"hi").await.unwrap();
        let n = client.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hi");
    }
}
