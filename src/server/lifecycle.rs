//! Zero-downtime binary upgrade, and telling systemd where the process stands.
//!
//! An upgrade hands the listening sockets from the running process to a new one through
//! Pingora's upgrade socket (`server.upgrade_sock`), so no connection attempt is ever
//! refused:
//!
//! 1. `SIGUSR2` to the running gateway (`systemctl kill -s USR2 --kill-whom=main vllm-edge`)
//!    makes it start its own binary again (the file at the path it was started from, so a
//!    newly installed binary) as `run --upgrade`, with the same config file and environment,
//!    its exact listen addresses in `VLLM_EDGE_LISTEN`/`VLLM_EDGE_ADMIN` and its pid in
//!    `VLLM_EDGE_UPGRADE_FROM`.
//! 2. The successor loads and validates the config. Only then does it send `SIGQUIT` to its
//!    predecessor and wait on the upgrade socket. A successor that fails before that point
//!    changes nothing: the running gateway logs why and keeps serving.
//! 3. On `SIGQUIT`, Pingora sends the listening sockets over the upgrade socket. Both processes
//!    accept for a few seconds. During that time the old process answers HTTP/1.1 requests
//!    with `Connection: close`, so keep-alive clients move over between two requests rather
//!    than finding their idle connection closed. Then the old process stops accepting,
//!    finishes its in-flight requests and streams (up to `server.grace_period`) and exits.
//! 4. The successor tells systemd `MAINPID=<its pid>` and `READY=1` (`Type=notify`,
//!    `NotifyAccess=all`), so the unit follows it.
//!
//! By hand, without `SIGUSR2`: start `vllm-edge run --upgrade -c FILE` with the same
//! listen addresses, then send `SIGQUIT` to the old process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};

use crate::config::{ENV_ADMIN, ENV_LISTEN};
use crate::proxy::Traffic;

/// The pid of the process a successor takes over from.
pub const ENV_UPGRADE_FROM: &str = "VLLM_EDGE_UPGRADE_FROM";

static EXE: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Remembers the binary's path while it is still the file this process runs from: an
/// upgrade replaces the file, after which `/proc/self/exe` names a deleted inode.
pub fn remember_exe() {
    EXE.get_or_init(|| std::env::current_exe().ok());
}

/// What a successor needs to take this process's place.
#[derive(Debug, Clone)]
pub struct Handover {
    pub config: PathBuf,
    pub listeners: Vec<SocketAddr>,
    pub admin: SocketAddr,
    /// The data plane's: told when a successor takes the sockets (between `SIGQUIT` and
    /// exit, this process is handing them over).
    pub traffic: Arc<Traffic>,
}

/// Serves `SIGUSR2` (start a successor) and `SIGQUIT` (a successor takes over: note it) on a
/// thread of its own. Pingora handles `SIGQUIT` itself as well; both see it.
pub fn listen_for_upgrade(handover: Handover) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut usr2, mut quit) = {
        let _guard = rt.enter();
        (
            signal(SignalKind::user_defined2())?,
            signal(SignalKind::quit())?,
        )
    };
    crate::server::guard::thread("vllm-edge-upgrade", move || {
        rt.block_on(async {
            loop {
                tokio::select! {
                    Some(()) = usr2.recv() => start_successor(&handover),
                    Some(()) = quit.recv() => {
                        handover.traffic.begin_handover();
                        tracing::info!("handing the listening sockets over to a successor; \
                            finishing the requests in flight");
                    }
                    else => break,
                }
            }
        })
    })?;
    Ok(())
}

fn start_successor(h: &Handover) {
    if h.traffic.handing_over() {
        tracing::warn!("an upgrade is already under way; SIGUSR2 ignored");
        return;
    }
    let Some(exe) = EXE.get().cloned().flatten() else {
        tracing::error!("upgrade: the binary's path is unknown; cannot start a successor");
        return;
    };
    let listen: Vec<String> = h.listeners.iter().map(|a| a.to_string()).collect();
    let spawned = Command::new(&exe)
        .arg("run")
        .arg("--upgrade")
        .arg("-c")
        .arg(&h.config)
        .env(ENV_LISTEN, listen.join(","))
        .env(ENV_ADMIN, h.admin.to_string())
        .env(ENV_UPGRADE_FROM, std::process::id().to_string())
        .stdin(Stdio::null())
        .spawn();
    match spawned {
        Ok(mut child) => {
            let pid = child.id();
            let traffic = h.traffic.clone();
            tracing::info!(successor = pid, exe = %exe.display(), "upgrade: successor started");
            // Reap it, and say so if it gave up before taking over.
            let _ = std::thread::Builder::new()
                .name("vllm-edge-successor".into())
                .spawn(move || match child.wait() {
                    Ok(s) if !traffic.handing_over() => tracing::error!(
                        successor = pid,
                        status = %s,
                        "upgrade failed: the successor exited before taking over; this process keeps serving"
                    ),
                    _ => {}
                });
        }
        Err(e) => {
            tracing::error!(exe = %exe.display(), error = %e, "upgrade: cannot start a successor")
        }
    }
}

/// In a successor (`run --upgrade`) whose config is valid: asks the predecessor named by
/// `VLLM_EDGE_UPGRADE_FROM` to hand over its sockets.
pub fn ask_predecessor_to_hand_over() {
    let Some(pid) = std::env::var(ENV_UPGRADE_FROM)
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
        .filter(|&p| p > 1)
    else {
        tracing::info!(
            "upgrade: waiting for the running process's sockets (send it SIGQUIT to hand them over)"
        );
        return;
    };
    // SAFETY: kill(2) with a pid and a signal number has no memory-safety preconditions.
    let r = unsafe { libc::kill(pid, libc::SIGQUIT) };
    if r != 0 {
        tracing::error!(predecessor = pid, error = %std::io::Error::last_os_error(), "upgrade: cannot signal the predecessor");
    } else {
        tracing::info!(
            predecessor = pid,
            "upgrade: asked the predecessor for its sockets"
        );
    }
}

/// Sends `state` to systemd's notification socket, if the process runs under systemd
/// (`NOTIFY_SOCKET` set); does nothing otherwise.
pub fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        use std::os::unix::net::UnixDatagram;
        let sock = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}
