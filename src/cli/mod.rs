//! The command line: `run`, `check`, `sim`, and the two tools besides them, `demo` (a
//! simulated fleet and the gateway in one process) and `top` (the fleet live in a terminal).
//!
//! The top layer: uses the server, the simulator, the config and the HTTP client. The
//! command line is parsed here ([`main`]); `src/main.rs` only calls it.

pub mod demo;
pub mod top;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{Config, LogFormat};
use crate::server::{self, lifecycle};
use crate::sim;

#[derive(Parser)]
#[command(
    name = "vllm-edge",
    version,
    about = "A vLLM-aware OpenAI gateway on Pingora"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway from a configuration file. VLLM_EDGE_LISTEN (comma-separated
    /// addresses) and VLLM_EDGE_ADMIN override the file's listener and admin addresses.
    Run {
        #[arg(short, long, env = "VLLM_EDGE_CONFIG")]
        config: PathBuf,
        /// Take the listening sockets over from a running gateway (see `server.upgrade_sock`;
        /// SIGUSR2 to a running gateway starts its successor this way).
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a configuration file and exit (non-zero with the file, line and key on error).
    Check {
        #[arg(short, long, env = "VLLM_EDGE_CONFIG")]
        config: PathBuf,
    },
    /// Start simulated vLLM replicas and the gateway in front of them, in one process.
    Demo(demo::DemoArgs),
    /// Run one simulated vLLM server.
    Sim(Box<sim::SimArgs>),
    /// Watch a running gateway's fleet live in the terminal (from its admin /load-stats).
    Top(top::TopArgs),
}

/// The log filter: VLLM_EDGE_LOG, else RUST_LOG, else info (Pingora's own at warn); the
/// line format from the config's `log.format`. Panics are logged as one line from here on.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VLLM_EDGE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("info,pingora_core=warn,pingora_proxy=warn")
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
    server::guard::log_panics();
}

/// Runs the command line (`vllm-edge ...`) and says how it ended.
pub fn main() -> ExitCode {
    lifecycle::remember_exe();
    crate::proxy::conn::no_huge_pages();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        init_logging(LogFormat::Text);
    }
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config, upgrade } => {
            let c = match Config::load_with_env(&config) {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            init_logging(c.log_format);
            match server::bind(&c, upgrade) {
                Ok(sockets) => server::run(c, sockets),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo(args) => match demo::run(args) {
            Ok(never) => match never {},
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Top(args) => match top::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Sim(args) => run_sim(*args),
    }
}

/// `vllm-edge check`: the file's mistakes (all of them), or what it configures and what
/// looks unintended in it.
fn check(config: &std::path::Path) -> ExitCode {
    match Config::load_with_env(config) {
        Ok(c) => {
            for w in &c.warnings {
                eprintln!("warning: {w}");
            }
            let waiting = c.unresolved.len();
            let backends = c.backends.len() + waiting;
            println!(
                "{}: ok ({} listener{}, {} backend{}{}, policy {})",
                config.display(),
                c.listeners.len(),
                plural(c.listeners.len()),
                backends,
                plural(backends),
                match waiting {
                    0 => String::new(),
                    n => format!(", {n} of them waiting for their host name to resolve"),
                },
                c.policy
            );
            ExitCode::SUCCESS
        }
        Err(e) => config_error(&e),
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Prints every mistake of a configuration, one `error:` line each; exit status 2.
fn config_error(e: &crate::config::ConfigError) -> ExitCode {
    let problems = e.problems();
    for p in &problems {
        eprintln!("error: {p}");
    }
    if problems.len() > 1 {
        eprintln!("error: {} mistakes in the configuration", problems.len());
    }
    ExitCode::from(2)
}

/// `vllm-edge sim`: one simulated vLLM server, until Ctrl-C.
fn run_sim(args: sim::SimArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let addr = std::net::SocketAddr::new(args.host, args.port);
        let handle = match sim::spawn(args).await {
            Ok(h) => h,
            Err(source) => {
                let role = server::listen::Role::Sim;
                let e = server::listen::BindError { addr, role, source };
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!(
            "{}",
            serde_json::json!({"event": "ready", "listen": handle.addr.to_string()})
        );
        tracing::info!(addr = %handle.addr, "simulated vLLM server ready");
        if let Some(kv) = &handle.sim.kv_events {
            tracing::info!(endpoint = %kv.endpoint, replay = %kv.replay, "publishing KV events");
        }
        match tokio::signal::ctrl_c().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: waiting for Ctrl-C: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
