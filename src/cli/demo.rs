//! `vllm-edge demo`: starts a few simulated vLLM replicas and the gateway in front of them,
//! in one process, and prints what to try.

use std::net::SocketAddr;

use crate::config::Config;
use crate::sim::{self, SimArgs};

/// The LoRA adapters every demo replica serves.
const ADAPTERS: [&str; 2] = ["sql-lora", "chat-lora"];

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Data-plane address of the gateway.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Admin address of the gateway.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub admin: SocketAddr,
    /// Number of simulated replicas (each on a free loopback port).
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// Model the replicas serve.
    #[arg(long, default_value = "sim-llama")]
    pub model: String,
    /// Hardware profile of the simulated replicas.
    #[arg(long, value_enum, default_value_t = sim::Preset::Llama3H100)]
    pub preset: sim::Preset,
    /// Multiplies every simulated duration (2.0 = half speed, easier to watch).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("--replicas must be between 1 and 64")]
    Replicas,
    #[error("starting the simulated replicas: {0}")]
    Sim(std::io::Error),
    #[error(transparent)]
    Start(#[from] crate::server::StartError),
}

/// The small tokenizer the tests use (`tests/fixtures/tiny-tokenizer`), carried in the
/// binary so the demo's replicas publish KV events the gateway can route on without a
/// model download.
const TINY_TOKENIZER: [(&str, &[u8]); 3] = [
    (
        "tokenizer.json",
        include_bytes!("../../tests/fixtures/tiny-tokenizer/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../../tests/fixtures/tiny-tokenizer/tokenizer_config.json"),
    ),
    (
        "chat_template.jinja",
        include_bytes!("../../tests/fixtures/tiny-tokenizer/chat_template.jinja"),
    ),
];

/// Writes the tiny tokenizer into a directory of its own under the temporary directory.
fn tiny_tokenizer() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("vllm-edge-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for (name, bytes) in TINY_TOKENIZER {
        std::fs::write(dir.join(name), bytes)?;
    }
    Ok(dir)
}

pub fn run(args: DemoArgs) -> Result<std::convert::Infallible, DemoError> {
    if !(1..=64).contains(&args.replicas) {
        return Err(DemoError::Replicas);
    }
    // The replicas publish vLLM's KV events and tokenize as the gateway does: exact
    // prefix routing is on.
    let tokenizer = tiny_tokenizer().map_err(DemoError::Sim)?;
    let sim_tokenizer = tokenizer.clone();
    // The replicas get their own runtime on a background thread; Pingora owns the main one.
    let (tx, rx) = std::sync::mpsc::channel();
    let replicas = args.replicas;
    let model = args.model.clone();
    let (preset, time_scale) = (args.preset, args.time_scale);
    std::thread::Builder::new()
        .name("sim-fleet".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let mut handles = Vec::new();
                for i in 0..replicas {
                    let mut a = SimArgs::defaults();
                    a.port = 0;
                    a.models = vec![model.clone()];
                    a.preset = preset;
                    a.time_scale = Some(time_scale);
                    a.seed = i as u64;
                    a.name = Some(format!("replica-{i}"));
                    // Two LoRA adapters, one slot each (vLLM's default --max-loras): the
                    // gateway sends an adapter where it holds a slot or one is free.
                    a.lora_modules = ADAPTERS
                        .iter()
                        .map(|n| (n.to_string(), format!("/adapters/{n}")))
                        .collect();
                    a.max_loras = 1;
                    a.kv_events_port = Some(0);
                    a.tokenizer = Some(sim_tokenizer.clone());
                    match sim::spawn(a).await {
                        Ok(h) => handles.push(h),
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                }
                let fleet: Vec<(String, Option<crate::config::KvEvents>)> = handles
                    .iter()
                    .map(|h| {
                        let kv = h.sim.kv_events.as_ref().map(|p| crate::config::KvEvents {
                            endpoint: format!("tcp://{}", p.endpoint),
                            replay: Some(format!("tcp://{}", p.replay)),
                        });
                        (h.url(), kv)
                    })
                    .collect();
                let _ = tx.send(Ok(fleet));
                std::future::pending::<()>().await;
            });
        })
        .map_err(DemoError::Sim)?;
    let fleet = rx
        .recv()
        .map_err(|_| DemoError::Sim(std::io::Error::other("sim thread exited")))?
        .map_err(DemoError::Sim)?;
    let urls: Vec<String> = fleet.iter().map(|(u, _)| u.clone()).collect();

    let mut config = Config::with_backends(args.listen, args.admin, &urls);
    for (b, (_, kv)) in config.backends.iter_mut().zip(fleet) {
        b.kv_events = kv;
    }
    let tok = crate::tokenize::Tokenizer::load(&tokenizer)
        .map_err(|e| DemoError::Sim(std::io::Error::other(e)))?;
    config
        .tokenizers
        .insert(args.model.clone(), std::sync::Arc::new(tok));
    // Every port is bound before the demo says what to try.
    let sockets = crate::server::bind(&config, false)?;
    let (listen, admin) = (sockets.listeners()[0], sockets.admin());
    println!(
        "vllm-edge demo: {} simulated replicas of `{}` with LoRA adapters {} ({}), publishing \
         their KV-cache events (exact prefix routing)\n\
         gateway on http://{} (admin http://{})\n\n\
         Try:\n\
         \x20 curl -s http://{listen}/v1/models\n\
         \x20 curl -s http://{listen}/v1/chat/completions -H 'content-type: application/json' \\\n\
         \x20      -d '{{\"model\":\"{model}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}],\"max_tokens\":16}}'\n\
         \x20 curl -sN http://{listen}/v1/chat/completions -H 'content-type: application/json' \\\n\
         \x20      -d '{{\"model\":\"{model}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}],\"max_tokens\":16,\"stream\":true}}'\n\
         \x20 curl -s http://{listen}/v1/completions -d '{{\"model\":\"sql-lora\",\"prompt\":\"SELECT\",\"max_tokens\":16}}'   # a LoRA adapter\n\
         \x20 curl -s http://{admin}/metrics\n\
         \x20 curl -s http://{admin}/explain -d '{{\"model\":\"{model}\",\"prompt\":\"Hello\"}}'   # where it would go, and why\n\
         \x20 open http://{admin}/dashboard, or run: vllm-edge top --admin {admin}\n\n\
         Ctrl-C stops everything.",
        urls.len(),
        args.model,
        ADAPTERS.join(", "),
        urls.join(", "),
        listen,
        admin,
        listen = listen,
        admin = admin,
        model = args.model,
    );
    crate::server::run(config, sockets)
}
