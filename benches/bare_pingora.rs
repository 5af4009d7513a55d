//! The floor of our framework, for the proxy-overhead benchmark (`benches/overhead.py`):
//! Pingora 0.9.1's HTTP proxy with nothing of ours in it: no body inspection, no
//! selection, no metrics, no deadlines. Round-robin over the given upstreams, pooled
//! keep-alive connections, one worker thread (like vllm-edge with `server.threads: 1`).
//!
//! `cargo bench --bench bare_pingora -- LISTEN UPSTREAM...`, e.g.
//! `-- 127.0.0.1:8080 127.0.0.1:9001 127.0.0.1:9002`.

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Bare {
    upstreams: Vec<SocketAddr>,
    next: AtomicUsize,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.upstreams.len();
        Ok(Box::new(HttpPeer::new(
            self.upstreams[i],
            false,
            String::new(),
        )))
    }
}

fn main() {
    // `cargo bench` passes `--bench` to every bench target: skip flags.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let Some((listen, upstreams)) = args.split_first().filter(|(_, u)| !u.is_empty()) else {
        eprintln!("usage: bare_pingora LISTEN UPSTREAM...");
        return;
    };
    let upstreams: Vec<SocketAddr> = upstreams
        .iter()
        .map(|u| u.parse().expect("an upstream is host:port"))
        .collect();
    let conf = ServerConf {
        threads: 1,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    let mut proxy = http_proxy_service(
        &server.configuration,
        Bare {
            upstreams,
            next: AtomicUsize::new(0),
        },
    );
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever();
}
