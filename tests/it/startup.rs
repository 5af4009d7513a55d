//! Start-up is a transaction: every listener is bound before anything says ready, and a
//! port that cannot be had ends the start at once, naming the address, with no ready line,
//! no panic and no backtrace.

use std::net::{SocketAddr, TcpListener};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

use crate::support::*;

/// What a command that should refuse to start printed, once it exited (within 20 s).
struct Refused {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn refused(args: &[&str], dir: &std::path::Path) -> Refused {
    refused_with(args, dir, &[]).await
}

/// [`refused`] with more environment variables.
async fn refused_with(args: &[&str], dir: &std::path::Path, env: &[(&str, &str)]) -> Refused {
    let child = Command::new(env!("CARGO_BIN_EXE_vllm-edge"))
        .args(args)
        .current_dir(dir)
        .envs(env.iter().copied())
        .env_remove("VLLM_EDGE_LISTEN")
        .env_remove("VLLM_EDGE_ADMIN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("`vllm-edge {}` still runs after 20 s", args.join(" ")))
        .unwrap();
    Refused {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

impl Refused {
    fn assert_names(&self, addr: SocketAddr, role: &str) {
        let all = format!("stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        assert_eq!(self.code, Some(1), "{all}");
        assert!(!self.stdout.contains("\"ready\""), "said ready: {all}");
        assert!(
            self.stderr.contains(&format!(
                "error: cannot listen on {addr} (the {role}): address already in use"
            )),
            "{all}"
        );
        assert!(
            !self.stderr.contains("panicked") && !self.stderr.contains("backtrace"),
            "{all}"
        );
    }
}

/// A port some other program listens on.
fn taken() -> (TcpListener, SocketAddr) {
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap();
    (holder, addr)
}

fn config(dir: &std::path::Path, listen: SocketAddr, admin: SocketAddr) -> String {
    let p = dir.join("gateway.yaml");
    std::fs::write(
        &p,
        format!(
            "listeners:\n  - address: {listen}\nadmin:\n  address: {admin}\n\
             backends:\n  - url: http://127.0.0.1:9\n    models: [m]\n"
        ),
    )
    .unwrap();
    p.to_string_lossy().into_owned()
}

#[tokio::test]
async fn a_taken_data_port_ends_the_start_at_once_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_holder, addr) = taken();
    let conf = config(dir.path(), addr, "127.0.0.1:0".parse().unwrap());
    refused(&["run", "-c", &conf], dir.path())
        .await
        .assert_names(addr, "listener");
    let listen = addr.to_string();
    refused(
        &["demo", "--listen", &listen, "--admin", "127.0.0.1:0"],
        dir.path(),
    )
    .await
    .assert_names(addr, "listener");
}

#[tokio::test]
async fn a_taken_admin_port_ends_the_start_at_once_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_holder, addr) = taken();
    let conf = config(dir.path(), "127.0.0.1:0".parse().unwrap(), addr);
    refused(&["run", "-c", &conf], dir.path())
        .await
        .assert_names(addr, "admin listener");
    let admin = addr.to_string();
    refused(
        &["demo", "--listen", "127.0.0.1:0", "--admin", &admin],
        dir.path(),
    )
    .await
    .assert_names(addr, "admin listener");
}

#[tokio::test]
async fn a_simulated_server_on_a_taken_port_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_holder, addr) = taken();
    let port = addr.port().to_string();
    refused(&["sim", "--host", "127.0.0.1", "--port", &port], dir.path())
        .await
        .assert_names(addr, "simulated server");
}

/// A successor (`run --upgrade`) that cannot have one of its addresses fails before it
/// asks for the running gateway's sockets: the running gateway never hands them over and
/// keeps serving.
#[tokio::test]
async fn a_successor_that_cannot_listen_leaves_the_running_gateway_serving() {
    let backend = sim(&["m"]).await;
    let gw = Gateway::builder(&[&backend])
        .yaml("server:\n  threads: 1\n  grace_period: 0s\n  graceful_shutdown_timeout: 1s\n  upgrade_sock: upgrade.sock")
        .start()
        .await;
    // Its own addresses (in use: left to the hand-over), and one no interface has.
    let nowhere: SocketAddr = "192.0.2.1:0".parse().unwrap();
    let conf = gw.path("successor.yaml");
    std::fs::write(
        &conf,
        format!(
            "listeners:\n  - address: {}\n  - address: {nowhere}\nadmin:\n  address: {}\n\
             server:\n  upgrade_sock: upgrade.sock\nbackends:\n  - url: {}\n",
            gw.addr,
            gw.admin,
            backend.url()
        ),
    )
    .unwrap();
    let pid = gw.pid().unwrap().to_string();
    let conf = conf.to_string_lossy().into_owned();
    let out = refused_with(
        &["run", "--upgrade", "-c", &conf],
        &gw.path("."),
        &[("VLLM_EDGE_UPGRADE_FROM", &pid)],
    )
    .await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("cannot listen on 192.0.2.1:0 (the listener)"),
        "{}",
        out.stderr
    );
    // The running gateway was never asked, and serves as before.
    let r = http1()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body("m", "still here", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        !gw.log().contains("handing the listening sockets over"),
        "{}",
        gw.log_unusual()
    );
    assert_eq!(gw.ready_pids().len(), 1);
}
