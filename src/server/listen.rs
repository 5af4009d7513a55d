//! The listening sockets: every address, data and admin, is bound before anything says the
//! gateway is ready, and a bind that fails ends the start with the address and the
//! system's reason, in milliseconds.
//!
//! Pingora binds its listeners itself, in each service's thread, after the process has
//! started: a taken port made it retry for about 30 s and then panic in that thread while
//! the rest of the process lived on. So the sockets are bound here, first, and handed to
//! Pingora through the table it keeps of listening descriptors (the one a binary upgrade
//! fills from the predecessor): a listener whose address is in the table takes that
//! descriptor instead of binding.
//!
//! In a successor (`run --upgrade`), an address the predecessor listens on is in use until
//! the predecessor hands its socket over: it is left to the hand-over. Any other failure
//! ends the successor before it asks for the sockets, so the running gateway keeps serving.

use pingora::server::ListenFds;
use std::net::SocketAddr;
use std::os::fd::IntoRawFd;

/// Connections the kernel queues on a socket before the gateway accepts them (Pingora
/// sets its own, larger, backlog when it takes the socket).
const BACKLOG: i32 = 1024;

/// Which of the gateway's listeners an address is, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Data,
    Admin,
    /// `vllm-edge sim`'s port.
    Sim,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Data => "listener",
            Role::Admin => "admin listener",
            Role::Sim => "simulated server",
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot listen on {addr} (the {role}): {}{}",
    plain_reason(source),
    hint(source)
)]
pub struct BindError {
    pub addr: SocketAddr,
    pub role: Role,
    pub source: std::io::Error,
}

/// The system's reason without Rust's "(os error N)".
fn plain_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_lowercase(),
        None => s,
    }
}

/// What the person starting the gateway can do about the common cases.
fn hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (another process listens there: stop it, or choose another port)"
        }
        std::io::ErrorKind::PermissionDenied => {
            " (ports below 1024 need root or the CAP_NET_BIND_SERVICE capability)"
        }
        std::io::ErrorKind::AddrNotAvailable => {
            " (no network interface of this machine has that address)"
        }
        _ => "",
    }
}

/// One listen address and, unless a predecessor is to hand it over, its bound socket.
#[derive(Debug)]
pub struct Listening {
    /// The concrete address (a port 0 in the config is the port the system picked).
    pub addr: SocketAddr,
    pub role: Role,
    socket: Option<socket2::Socket>,
}

impl Listening {
    /// Binds `addr` and listens on it. With `upgrade`, an address in use is left for the
    /// predecessor to hand over.
    pub fn bind(addr: SocketAddr, role: Role, upgrade: bool) -> Result<Listening, BindError> {
        let err = |source| BindError { addr, role, source };
        match bind_socket(addr) {
            Ok(socket) => {
                let local = socket
                    .local_addr()
                    .map_err(err)?
                    .as_socket()
                    .ok_or_else(|| err(std::io::Error::other("not an internet socket")))?;
                Ok(Listening {
                    addr: local,
                    role,
                    socket: Some(socket),
                })
            }
            Err(e) if upgrade && e.kind() == std::io::ErrorKind::AddrInUse && addr.port() != 0 => {
                Ok(Listening {
                    addr,
                    role,
                    socket: None,
                })
            }
            Err(e) => Err(err(e)),
        }
    }

    /// Puts the socket in Pingora's table of listening descriptors, where the listener for
    /// this address takes it. An address already there came from a predecessor; one that
    /// is in neither place was in use and not handed over.
    pub fn hand_to(&mut self, fds: Option<&ListenFds>) -> Result<(), BindError> {
        let key = self.addr.to_string();
        let Some(fds) = fds else {
            return Err(self.not_handed_over());
        };
        let mut table = fds.lock();
        if table.get(&key).is_some() {
            // The predecessor's socket: ours (if any) is not needed.
            self.socket = None;
            return Ok(());
        }
        match self.socket.take() {
            Some(s) => {
                table.add(key, s.into_raw_fd());
                Ok(())
            }
            None => Err(self.not_handed_over()),
        }
    }

    fn not_handed_over(&self) -> BindError {
        BindError {
            addr: self.addr,
            role: self.role,
            source: std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "address in use, and the gateway being upgraded did not hand it over",
            ),
        }
    }
}

/// A listening TCP socket on `addr`, bound as Pingora would bind it (`SO_REUSEADDR`, so a
/// restart is not refused by connections of the previous process in TIME_WAIT; never
/// `SO_REUSEPORT`, so no other process can share the port unnoticed).
fn bind_socket(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    sock.set_cloexec(true)?;
    // Pingora's listener takes it as it is, and accepts on the runtime's threads.
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(BACKLOG)?;
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_address_is_named_with_the_systems_reason() {
        let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = holder.local_addr().unwrap();
        let e = Listening::bind(addr, Role::Admin, false).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!(
                "cannot listen on {addr} (the admin listener): address already in use"
            )),
            "{msg}"
        );
        assert!(!msg.contains("os error"), "{msg}");
    }

    #[test]
    fn port_zero_gets_a_concrete_port_and_a_successor_leaves_a_taken_one_to_the_hand_over() {
        let l = Listening::bind("127.0.0.1:0".parse().unwrap(), Role::Data, false).unwrap();
        assert_ne!(l.addr.port(), 0);
        let waiting = Listening::bind(l.addr, Role::Data, true).unwrap();
        assert!(waiting.socket.is_none());
        // Not handed over: an error naming the address.
        let mut waiting = waiting;
        let e = waiting
            .hand_to(Some(&std::sync::Arc::new(parking_lot::Mutex::new(
                pingora::server::Fds::new(),
            ))))
            .unwrap_err();
        assert!(e.to_string().contains(&l.addr.to_string()), "{e}");
    }
}
