//! Fixtures: simulated backends in-process on port 0, the gateway binary as a child
//! process on port 0 (its chosen ports come from its "ready" line), and HTTP clients.

use serde_json::Value;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use vllm_edge::sim::{self, SimArgs, SimHandle};

/// A simulated vLLM backend serving `models`, tweaked by `f`.
pub async fn sim_with(models: &[&str], f: impl FnOnce(&mut SimArgs)) -> SimHandle {
    let mut a = SimArgs::defaults();
    a.port = 0;
    a.models = models.iter().map(|m| m.to_string()).collect();
    // 100× faster than an H100: a short request takes well under a millisecond.
    a.time_scale = Some(0.01);
    // Room for the 5 MiB test prompts (the sim rejects longer prompts as vLLM does).
    a.kv_tokens = Some(10_000_000);
    a.max_model_len = Some(10_000_000);
    f(&mut a);
    sim::spawn(a).await.expect("sim binds a port")
}

/// The name the gateway gives a backend configured by its URL only (`host:port`).
pub fn name_of(s: &SimHandle) -> String {
    s.url().trim_start_matches("http://").to_string()
}

pub async fn sim(models: &[&str]) -> SimHandle {
    sim_with(models, |_| {}).await
}

pub struct Gateway {
    child: Child,
    /// The first listener.
    pub addr: SocketAddr,
    /// Every listener, in the config's order.
    pub listeners: Vec<SocketAddr>,
    pub admin: SocketAddr,
    dir: tempfile::TempDir,
    /// Every line the gateway (and any successor it started) printed on stdout.
    stdout: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

pub struct GatewayBuilder {
    backends: Vec<String>,
    extra: String,
    listeners: Option<String>,
    files: Vec<(String, Vec<u8>)>,
    env: Vec<(String, String)>,
}

impl Gateway {
    pub fn builder(backends: &[&SimHandle]) -> GatewayBuilder {
        GatewayBuilder {
            backends: backends
                .iter()
                .map(|s| format!("  - url: {}\n", s.url()))
                .collect(),
            extra: String::new(),
            listeners: None,
            files: Vec::new(),
            env: Vec::new(),
        }
    }

    /// A file beside the config (config paths are relative to its directory).
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The gateway's Prometheus exposition (admin `/metrics`).
    pub async fn metrics_text(&self) -> String {
        http1()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The configuration file the gateway runs from.
    pub fn config_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.yaml")).expect("config file")
    }

    /// Replaces the configuration file and sends SIGHUP (a reload).
    pub fn reload_with(&self, text: &str) {
        std::fs::write(self.dir.path().join("gateway.yaml"), text).expect("write config");
        self.signal(nix::sys::signal::SIGHUP);
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = self.child.id().expect("the gateway runs") as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("send a signal");
    }

    /// Waits up to `within` for the process to exit.
    pub async fn exited(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(within, self.child.wait())
            .await
            .ok()
            .map(|r| r.expect("wait for the gateway"))
    }

    /// The gateway's log without the access lines of successful requests (for assertion
    /// messages).
    pub fn log_unusual(&self) -> String {
        self.log()
            .lines()
            .filter(|l| {
                !(l.contains(" access: ") && l.contains("status=200") && l.contains("error=\"\""))
            })
            .map(|l| format!("{l}\n"))
            .collect()
    }

    /// The pids of the "ready" lines printed so far: the gateway's, then its successors'.
    pub fn ready_pids(&self) -> Vec<u32> {
        self.stdout
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event"] == "ready")
            .filter_map(|v| v["pid"].as_u64().map(|p| p as u32))
            .collect()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The gateway's log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        // Successors (upgrades) are not our children: kill them by pid.
        for pid in self.ready_pids() {
            if Some(pid) != self.child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::SIGKILL,
                );
            }
        }
    }
}

impl GatewayBuilder {
    pub fn backend_url(mut self, url: &str) -> Self {
        self.backends.push(format!("  - url: {url}\n"));
        self
    }

    /// A backend entry with more keys: `extra` lines go under its `url`.
    pub fn backend_with(mut self, url: &str, extra: &str) -> Self {
        self.backends.push(format!(
            "  - url: {url}\n    {}\n",
            extra.replace('\n', "\n    ")
        ));
        self
    }

    /// The `listeners:` section (default: one plain listener on port 0 of a
    /// [`private_loopback`] address).
    pub fn listeners(mut self, yaml: &str) -> Self {
        self.listeners = Some(yaml.to_string());
        self
    }

    /// An environment variable of the gateway process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// A file written beside the config before the gateway starts.
    pub fn file(mut self, name: &str, contents: impl Into<Vec<u8>>) -> Self {
        self.files.push((name.to_string(), contents.into()));
        self
    }

    /// Extra top-level YAML sections (routing, limits, timeouts, upstream, discovery).
    pub fn yaml(mut self, extra: &str) -> Self {
        self.extra.push_str(extra);
        self.extra.push('\n');
        self
    }

    pub async fn start(self) -> Gateway {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, contents) in &self.files {
            std::fs::write(dir.path().join(name), contents).expect("write a file");
        }
        let mut yaml = self
            .listeners
            .clone()
            .unwrap_or_else(|| format!("listeners:\n  - address: {}:0\n", private_loopback()));
        if !self.extra.contains("admin:") {
            yaml.push_str("admin:\n  address: 127.0.0.1:0\n");
        }
        if !self.extra.contains("server:") {
            yaml.push_str(
                "server:\n  threads: 2\n  grace_period: 0s\n  graceful_shutdown_timeout: 1s\n",
            );
        }
        yaml.push_str("backends:\n");
        for b in &self.backends {
            yaml.push_str(b);
        }
        if !self.extra.contains("discovery:") {
            yaml.push_str("discovery:\n  models_interval: 100ms\n  timeout: 500ms\n");
        }
        if !self.extra.contains("health:") {
            yaml.push_str("health:\n  interval: 100ms\n  timeout: 500ms\n");
        }
        yaml.push_str(&self.extra);
        let conf = dir.path().join("gateway.yaml");
        std::fs::write(&conf, yaml).expect("write config");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_vllm-edge"))
            .arg("run")
            .arg("-c")
            .arg(&conf)
            .env("RUST_LOG", "info,pingora_core=warn,pingora_proxy=warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn vllm-edge");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if v["event"] == "ready" {
                        return Some(v);
                    }
                }
            }
            None
        })
        .await;
        let log = || std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
        let v = match ready {
            Ok(Some(v)) => v,
            _ => panic!("gateway did not become ready; its log:\n{}", log()),
        };
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(vec![v.to_string()]));
        // Keep draining stdout so the child never blocks on a full pipe.
        let kept = stdout.clone();
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                kept.lock().unwrap().push(l);
            }
        });
        let listeners: Vec<SocketAddr> = v["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().parse().unwrap())
            .collect();
        Gateway {
            child,
            addr: listeners[0],
            listeners,
            admin: v["admin"].as_str().unwrap().parse().unwrap(),
            dir,
            stdout,
        }
    }
}

/// A loopback address of this test's own (127.x.y.z, chosen at random), where test
/// gateways listen. Other tests run in parallel processes and bind
/// 127.0.0.1:0; when one of their replicas dies, its gateway keeps probing the freed port,
/// and a listener of ours that got that port would count those probes as clients.
pub fn private_loopback() -> std::net::Ipv4Addr {
    use std::hash::BuildHasher;
    let r = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
    let [a, b, c, ..] = r.to_le_bytes();
    // 127.0.0.0/16 is left to everyone else; .0 and .255 are avoided as host bytes.
    std::net::Ipv4Addr::new(127, a % 254 + 1, b, c % 254 + 1)
}

pub fn http1() -> reqwest::Client {
    reqwest::Client::builder()
        .http1_only()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

pub fn http2() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

pub fn chat_body(model: &str, content: &str, stream: bool) -> Value {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
        "stream": stream,
    })
}

/// Polls `cond` every 10 ms until it holds or `within` passes; returns whether it held.
/// For conditions only observable from outside (another process's periodic work).
pub async fn eventually<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("error body is JSON");
    (status, body)
}

/// `GET url` answered with JSON.
pub async fn get_json(url: impl reqwest::IntoUrl) -> Value {
    http1().get(url).send().await.unwrap().json().await.unwrap()
}

/// The gateway's `POST /explain` of request `body`: where it would route it, and why.
pub async fn explain(gw: &Gateway, body: &Value) -> Value {
    let r = http1()
        .post(gw.admin_url("/explain"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// The model ids the gateway's `/v1/models` lists.
pub async fn models(gw: &Gateway) -> Vec<String> {
    let v = get_json(gw.url("/v1/models")).await;
    assert_eq!(v["object"], "list");
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// A normal chat request for `model` succeeds (after a case that must not have hurt the
/// gateway).
pub async fn still_serves(gw: &Gateway, model: &str) {
    let resp = http1()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body(model, "still there?", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", gw.log_unusual());
}

/// A test CA and certificates it signs, made at test time.
pub struct Pki {
    pub ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

/// A certificate and its key, as PEM.
pub struct Leaf {
    pub cert: String,
    pub key: String,
    pub der: Vec<u8>,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        let ca = p.self_signed(&ca_key).unwrap();
        Pki { ca, ca_key }
    }

    pub fn leaf(&self, names: &[&str], expired: bool) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    pub fn client(&self, http1_only: bool) -> reqwest::Client {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca.pem().as_bytes()).unwrap())
            .tls_info(true)
            .timeout(Duration::from_secs(30));
        if http1_only {
            b = b.http1_only();
        }
        b.build().unwrap()
    }
}
