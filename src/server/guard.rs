//! No half-dead gateway: every Pingora service runs under a [`Guarded`] wrapper, and a
//! service that panics, or stops while the server is not shutting down, ends the process
//! with a one-line error and exit status 1.
//!
//! Why exit rather than only turning `/ready` false: a process that lives on without its
//! data plane, admin API or scraper serves nothing (or routes blind) and nobody restarts
//! it; systemd (`Restart=on-failure`) and Kubernetes restart a process that exits, and a
//! load balancer probing `/ready` sees the port close at once.
//!
//! The listening services' sockets ([`Listening`]) are handed to Pingora here, as the
//! service starts, because that is where Pingora gives a service its descriptor table.

use async_trait::async_trait;
use futures::FutureExt;
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::{ServiceReadyNotifier, ServiceWithDependents};
use std::panic::AssertUnwindSafe;

use crate::server::listen::Listening;

/// Whether a service's work may be over while the server still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Runs until shutdown (listeners, the scraper, samplers).
    UntilShutdown,
    /// Does its work once and ends (the ready announcer).
    Once,
}

/// A Pingora service that takes the process down with it.
pub struct Guarded<S> {
    inner: S,
    sockets: Vec<Listening>,
    lifetime: Lifetime,
}

impl<S: ServiceWithDependents> Guarded<S> {
    /// A listening service, with the sockets bound for its addresses.
    pub fn listening(inner: S, sockets: Vec<Listening>) -> Self {
        Guarded {
            inner,
            sockets,
            lifetime: Lifetime::UntilShutdown,
        }
    }

    /// A background service.
    pub fn background(inner: S, lifetime: Lifetime) -> Self {
        Guarded {
            inner,
            sockets: Vec::new(),
            lifetime,
        }
    }
}

/// Ends the process: the reason on one error line, exit status 1.
pub fn fatal(what: &str) -> ! {
    tracing::error!("{what}; exiting");
    eprintln!("error: {what}");
    std::process::exit(1)
}

/// The text of a panic's payload.
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Panics are logged as one error line, with where they happened (and the backtrace only
/// when `RUST_BACKTRACE` asks for it), instead of Rust's multi-line report on stderr.
pub fn log_panics() {
    let wants_backtrace = std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0");
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if wants_backtrace {
            default(info);
            return;
        }
        let thread = std::thread::current();
        tracing::error!(
            thread = thread.name().unwrap_or("unnamed"),
            at = %info.location().map(|l| l.to_string()).unwrap_or_default(),
            "internal error (a bug, please report it): {}",
            panic_text(info.payload())
        );
    }));
}

/// Starts a thread whose end, by panic or otherwise, ends the process: for threads the
/// gateway cannot run without (reload, upgrade signals, the demo's replicas).
pub fn thread<F>(name: &str, f: F) -> std::io::Result<()>
where
    F: FnOnce() + Send + 'static,
{
    let label = name.to_string();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(
            move || match std::panic::catch_unwind(AssertUnwindSafe(f)) {
                Ok(()) => fatal(&format!("the {label} thread stopped")),
                Err(p) => fatal(&format!("the {label} thread failed: {}", panic_text(&*p))),
            },
        )
        .map(|_| ())
}

#[async_trait]
impl<S: ServiceWithDependents + 'static> ServiceWithDependents for Guarded<S> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
        ready_notifier: ServiceReadyNotifier,
    ) {
        for s in &mut self.sockets {
            if let Err(e) = s.hand_to(fds.as_ref()) {
                fatal(&e.to_string());
            }
        }
        // Pingora names background services "BG <name>".
        let name = self.inner.name().trim_start_matches("BG ").to_string();
        let stopping = shutdown.clone();
        let ran = AssertUnwindSafe(self.inner.start_service(
            fds,
            shutdown,
            listeners_per_fd,
            ready_notifier,
        ))
        .catch_unwind()
        .await;
        match ran {
            Err(p) => fatal(&format!("the {name} service failed: {}", panic_text(&*p))),
            Ok(()) if self.lifetime == Lifetime::UntilShutdown && !*stopping.borrow() => {
                fatal(&format!("the {name} service stopped"))
            }
            Ok(()) => {}
        }
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }

    fn runtime_opts_override(
        &self,
        global: &pingora::server::RuntimeOpts,
    ) -> Option<pingora::server::RuntimeOpts> {
        self.inner.runtime_opts_override(global)
    }

    fn on_startup_delay(&self, time_waited: std::time::Duration) {
        self.inner.on_startup_delay(time_waited)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.inner.listen_addresses()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::services::background::{background_service, BackgroundService};

    /// A background service that panics, returns, or returns once its work is done.
    struct Ends(&'static str);

    #[async_trait]
    impl BackgroundService for Ends {
        async fn start(&self, _shutdown: ShutdownWatch) {
            if self.0 == "panics" {
                panic!("it broke");
            }
        }
    }

    /// In a child process (this test binary again, `GUARD_CHILD` naming the case): runs
    /// the case's service under the guard as the server would.
    fn child_case() -> Option<()> {
        let case = std::env::var("GUARD_CHILD").ok()?;
        let lifetime = match case.as_str() {
            "once" => Lifetime::Once,
            _ => Lifetime::UntilShutdown,
        };
        let case: &'static str = Box::leak(case.into_boxed_str());
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut g = Guarded::background(background_service(case, Ends(case)), lifetime);
            let (_stop, shutdown) = tokio::sync::watch::channel(false);
            let (ready, _) = tokio::sync::watch::channel(false);
            g.start_service(None, shutdown, 1, ServiceReadyNotifier::new(ready))
                .await;
        });
        Some(())
    }

    fn run_child(case: &str) -> (Option<i32>, String) {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "server::guard::tests::a_service_that_fails_or_stops_ends_the_process",
                "--nocapture",
            ])
            .env("GUARD_CHILD", case)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    #[test]
    fn a_service_that_fails_or_stops_ends_the_process() {
        if child_case().is_some() {
            return;
        }
        let (code, err) = run_child("panics");
        assert_eq!(code, Some(1), "{err}");
        assert!(
            err.contains("error: the panics service failed: it broke"),
            "{err}"
        );
        let (code, err) = run_child("returns");
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("error: the returns service stopped"), "{err}");
        // A service whose work is done once may end.
        let (code, err) = run_child("once");
        assert_eq!(code, Some(0), "{err}");
    }
}
