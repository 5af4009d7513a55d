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
//! Only attempts with a gap deadline (streams) need the watchdog, and of those only the
//! ones to replicas over TLS: a stream to a plain-HTTP replica goes over a gated
//! connection that enforces its deadlines itself (`gate.rs`). A non-streaming answer
//! has two deadlines, first byte and total, and Pingora's per-read timeout set to the
//! nearer of them bounds the wait for the header and every stall of the body; the total
//! is also checked as each piece of the body arrives, so an answer that keeps coming is
//! cut there ([`Attempt::Checked`]). That spares every non-streaming request a descriptor
//! duplicate, a task and a timer (issue 10). The price: a body that stalls after part of
//! it arrived is cut one read timeout after its last piece, which may be past the total.
//!
//! The watchdog holds no descriptor of its own while it waits (a held duplicate would
//! cost every open stream a second descriptor: issue 9). It keeps the number Pingora uses
//! and the socket's cookie (`SO_COOKIE`, unique for the life of the system and never
//! reused). When a deadline passes it duplicates whatever the number refers to *now*,
//! and shuts the socket down only if the duplicate's cookie is the one recorded: once
//! Pingora has closed the connection the number may belong to another socket, and that
//! socket is left alone (`Target`). The watch is disarmed as soon as the attempt ends
//! ([`Watchdog::finish`]), before Pingora can return the connection to its pool, so a
//! pooled connection is never shut down by a late watchdog.

use parking_lot::Mutex;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How far Pingora's read timeout stays behind a watchdog's deadlines. Equal to them, it
/// could end a stream first when the watchdog's wake-up was late, and the client would
/// hear of an upstream error instead of a timeout.
pub const BACKSTOP_MARGIN: Duration = Duration::from_secs(1);

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
    /// The longest a single read may legitimately wait: Pingora's own per-read timeout.
    /// With a watchdog (a gap deadline) it is a backstop [`BACKSTOP_MARGIN`] behind the
    /// widest deadline, so the watchdog, which knows which deadline passed, ends the
    /// attempt first. Without one it is the nearer of the first-byte and total deadlines,
    /// which it then enforces.
    pub fn longest_read(&self) -> Duration {
        let Some(g) = self.gap else {
            return self
                .total
                .map_or(self.first_byte, |t| t.min(self.first_byte));
        };
        let d = self.first_byte.max(g);
        self.total.map_or(d, |t| d.min(t.max(self.first_byte))) + BACKSTOP_MARGIN
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
    /// socket's cookie cannot be read (then only Pingora's per-read timeout applies).
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

impl std::fmt::Display for Expired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the {} deadline passed", self.as_str())
    }
}

impl std::error::Error for Expired {}

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
    /// The connection; `None` once the attempt ended.
    target: Mutex<Option<Target>>,
}

/// One upstream socket, named by its descriptor number and its cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Target {
    fd: RawFd,
    cookie: u64,
}

/// The kernel's cookie of the socket behind `fd`.
fn socket_cookie(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `fd` is a live descriptor for the duration of the borrow, and the option
    // writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

impl Target {
    /// Names the socket `fd`, which must be open for the duration of the call.
    fn of(fd: RawFd) -> Option<Target> {
        // SAFETY: the caller's descriptor is live for the duration of this call.
        let cookie = socket_cookie(unsafe { BorrowedFd::borrow_raw(fd) }).ok()?;
        Some(Target { fd, cookie })
    }

    /// Shuts the socket down if the number still refers to it. The number is duplicated
    /// first, so that the check and the shutdown are about the same socket even if the
    /// number is closed and reused meanwhile; a number that is closed or names another
    /// socket is left alone.
    fn shut_down(&self) -> bool {
        // SAFETY: the number may be closed or reused, which is why nothing is done
        // through it but `F_DUPFD_CLOEXEC`: that either fails (closed) or yields a
        // descriptor of our own for whatever the number names now, checked below.
        let Ok(now) = unsafe { BorrowedFd::borrow_raw(self.fd) }.try_clone_to_owned() else {
            return false;
        };
        if socket_cookie(now.as_fd()).ok() != Some(self.cookie) {
            return false;
        }
        socket2::SockRef::from(&now)
            .shutdown(std::net::Shutdown::Both)
            .is_ok()
    }
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
        let target = self.target.lock();
        if let Some(t) = target.as_ref() {
            self.fired.store(why as u8 + 1, Ordering::Release);
            t.shut_down();
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
    /// Starts watching the upstream connection `fd` (as given to `connected_to_upstream`,
    /// which keeps it open for the duration of the call) from `started`. `None` if `fd`
    /// is not a socket whose cookie can be read (then only Pingora's per-read timeout
    /// applies).
    pub fn start(fd: RawFd, started: Instant, limits: Limits) -> Option<Watchdog> {
        let target = Target::of(fd)?;
        let clock = Arc::new(Clock {
            started,
            limits,
            first_byte: AtomicU64::new(NOTHING),
            last_progress: AtomicU64::new(NOTHING),
            fired: AtomicU8::new(0),
            target: Mutex::new(Some(target)),
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
        self.clock.target.lock().take();
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
        // Watched: a backstop behind the widest deadline.
        assert_eq!(
            limits(100, Some(300), None).longest_read(),
            Duration::from_millis(300) + BACKSTOP_MARGIN
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
            Duration::from_millis(400) + BACKSTOP_MARGIN
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
    async fn the_watchdog_holds_no_descriptor_of_the_connection() {
        let (client, mut server) = pair().await;
        let w = Watchdog::start(
            client.as_raw_fd(),
            Instant::now(),
            limits(1000, Some(1000), None),
        )
        .unwrap();
        // Closing the connection's only descriptor closes the connection, watch or not.
        drop(client);
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), server.read(&mut buf))
            .await
            .expect("the peer sees the close at once")
            .unwrap();
        assert_eq!(n, 0);
        w.finish();
    }

    #[tokio::test]
    async fn only_the_socket_named_by_its_cookie_is_shut_down() {
        let (a, _a_server) = pair().await;
        let (mut b, mut b_server) = pair().await;
        let of_a = Target::of(a.as_raw_fd()).unwrap();
        let of_b = Target::of(b.as_raw_fd()).unwrap();
        assert_ne!(of_a.cookie, of_b.cookie);
        // B's number with A's cookie: what the watchdog sees when A was closed and its
        // number went to B. B is left alone and still works both ways.
        let reused = Target {
            fd: b.as_raw_fd(),
            cookie: of_a.cookie,
        };
        assert!(!reused.shut_down());
        use tokio::io::AsyncWriteExt;
        b_server.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 16];
        let n = b.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hi");
        // A closed number is left alone too.
        let closed = Target {
            fd: of_a.fd,
            cookie: of_a.cookie,
        };
        drop(a);
        // (Closed, or reused by a socket of another test: either way not A's.)
        assert!(!closed.shut_down());
        // The socket itself is shut down: its reads end.
        assert!(of_b.shut_down());
        let n = tokio::time::timeout(Duration::from_secs(5), b.read(&mut buf))
            .await
            .expect("the shutdown ended the read")
            .unwrap();
        assert_eq!(n, 0);
        // Not a socket: no cookie, no watch.
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(Target::of(file.as_raw_fd()).is_none());
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
