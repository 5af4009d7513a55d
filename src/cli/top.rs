//! `vllm-edge top`: the fleet in a terminal, refreshed live from the admin listener's
//! `/load-stats` (the operator's `htop` for the fleet). One line per backend: its state,
//! what its engine runs and queues, this gateway's requests in flight, KV-cache usage,
//! request rate, errors, latencies, the `vllm` policy's score, and a sparkline of the
//! last minute and a half. `q` or Ctrl-C quits; `--once` prints one frame and exits.

use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::auth::Secret;
use crate::config::{defaults, Config};
use crate::httpclient::{self, Target};

#[derive(Debug, Clone, clap::Args)]
pub struct TopArgs {
    /// The gateway's admin address (default: the config's with -c, else 127.0.0.1:9090).
    #[arg(long, env = "VLLM_EDGE_ADMIN")]
    pub admin: Option<String>,
    /// Take the admin address and token from this configuration file.
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    /// A file holding the admin token (`admin.token_file` of the gateway).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Refresh period in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// Print one frame (after two samples, so rates are known) and exit.
    #[arg(long)]
    pub once: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error("{0}")]
    Setup(String),
    #[error("GET /load-stats from {addr}: {why}")]
    Fetch { addr: SocketAddr, why: String },
}

/// Rates are taken over this many samples (5 intervals).
const RATE_WINDOW: usize = 6;
/// Samples kept per backend for the sparkline (one per refresh).
const SPARK_SAMPLES: usize = 90;
/// The largest `/load-stats` answer read (a fleet of a few hundred backends with history).
const MAX_STATS_BYTES: usize = 16 << 20;
const SPARK: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// What `top` remembers between refreshes: load history and the previous counters, for
/// sparklines and rates.
#[derive(Debug, Default)]
pub struct View {
    load: HashMap<String, VecDeque<f64>>,
    /// (seconds, fleet total, fleet 5xx, per-backend totals) of the last samples: rates
    /// are taken over this window, so they do not jump with every finished request.
    window: VecDeque<(f64, u64, u64, HashMap<String, u64>)>,
    rps: Option<f64>,
    eps: Option<f64>,
    backend_rps: HashMap<String, f64>,
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn total_5xx(stats: &Value) -> u64 {
    stats["requests"]["by_status_class"]["5xx"]
        .as_u64()
        .unwrap_or(0)
}

impl View {
    /// Takes the gateway's own history (`/load-stats?history=1`), so the first frame has
    /// sparklines and rates.
    pub fn seed(&mut self, history: &[Value]) {
        for s in history {
            let t = s["t_ms"].as_f64().unwrap_or(0.0) / 1000.0;
            let per: HashMap<String, u64> = s["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    let name = b["name"].as_str().unwrap_or("").to_string();
                    let load =
                        num(&b["running"]).unwrap_or(0.0) + num(&b["waiting"]).unwrap_or(0.0);
                    self.push_load(&name, load);
                    (name, b["requests_total"].as_u64().unwrap_or(0))
                })
                .collect();
            self.rates(
                t,
                s["requests_total"].as_u64().unwrap_or(0),
                s["errors_5xx_total"].as_u64().unwrap_or(0),
                per,
            );
        }
    }

    /// Takes one `/load-stats` answer, observed at `t` seconds (any fixed origin).
    pub fn update(&mut self, stats: &Value, t: f64) {
        let mut per = HashMap::new();
        for b in stats["backends"].as_array().into_iter().flatten() {
            let name = b["name"].as_str().unwrap_or("").to_string();
            let load = num(&b["running"]).unwrap_or(0.0) + num(&b["waiting"]).unwrap_or(0.0);
            self.push_load(&name, load);
            per.insert(name, b["requests_total"].as_u64().unwrap_or(0));
        }
        self.load.retain(|name, _| per.contains_key(name));
        let total = stats["requests"]["total"].as_u64().unwrap_or(0);
        self.rates(t, total, total_5xx(stats), per);
    }

    fn push_load(&mut self, name: &str, v: f64) {
        let h = self.load.entry(name.to_string()).or_default();
        if h.len() == SPARK_SAMPLES {
            h.pop_front();
        }
        h.push_back(v);
    }

    fn rates(&mut self, t: f64, total: u64, errors: u64, per: HashMap<String, u64>) {
        // A sample from another clock (the gateway's history, then ours) starts anew.
        if self.window.back().is_some_and(|w| w.0 >= t) {
            self.window.clear();
        }
        if self.window.len() == RATE_WINDOW {
            self.window.pop_front();
        }
        if let Some((t0, total0, errors0, per0)) = self.window.front() {
            let dt = t - t0;
            let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
            self.rps = Some(rate(total, *total0));
            self.eps = Some(rate(errors, *errors0));
            self.backend_rps = per
                .iter()
                .map(|(n, v)| (n.clone(), rate(*v, per0.get(n).copied().unwrap_or(*v))))
                .collect();
        }
        self.window.push_back((t, total, errors, per));
    }
}

/// The last `width` values as a sparkline, on a scale whose top is `top` (the same for
/// every backend, so 4 and 8 running do not both show full).
fn sparkline(values: &VecDeque<f64>, width: usize, top: f64) -> String {
    values
        .iter()
        .skip(values.len().saturating_sub(width))
        .map(|&v| {
            if top <= 0.0 {
                SPARK[0]
            } else {
                SPARK[((v / top) * 7.0).round().clamp(0.0, 7.0) as usize]
            }
        })
        .collect()
}

/// `width` columns: a bar of KV-cache usage and its percentage.
fn kv_bar(kv: Option<f64>, width: usize) -> String {
    let bar = width.saturating_sub(5);
    match kv {
        None => format!("{:<bar$} {:>4}", "", "-"),
        Some(k) => {
            let filled = ((k.clamp(0.0, 1.0)) * bar as f64).round() as usize;
            format!(
                "{}{} {:>3.0}%",
                "█".repeat(filled),
                "░".repeat(bar - filled),
                k * 100.0
            )
        }
    }
}

fn opt(v: &Value, decimals: usize, unit: &str) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.decimals$}{unit}"),
        None => "-".into(),
    }
}

fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// A column of the backend table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Col {
    Backend,
    State,
    Run,
    Wait,
    InFlight,
    Kv,
    Rate,
    Errors,
    Ttft,
    Itl,
    Score,
    Spark,
}

impl Col {
    /// Every column, left to right.
    const ALL: [Col; 12] = [
        Col::Backend,
        Col::State,
        Col::Run,
        Col::Wait,
        Col::InFlight,
        Col::Kv,
        Col::Rate,
        Col::Errors,
        Col::Ttft,
        Col::Itl,
        Col::Score,
        Col::Spark,
    ];
    /// The order columns are given up in when the terminal is narrow (the first first).
    const DROPPED_FIRST: [Col; 8] = [
        Col::Spark,
        Col::Score,
        Col::Itl,
        Col::Errors,
        Col::Ttft,
        Col::Rate,
        Col::Kv,
        Col::InFlight,
    ];

    fn title(self) -> &'static str {
        match self {
            Col::Backend => "BACKEND",
            Col::State => "STATE",
            Col::Run => "RUN",
            Col::Wait => "WAIT",
            Col::InFlight => "INFL",
            Col::Kv => "KV CACHE",
            Col::Rate => "REQ/S",
            Col::Errors => "ERR",
            Col::Ttft => "TTFT",
            Col::Itl => "ITL",
            Col::Score => "SCORE",
            Col::Spark => "RUN+WAIT",
        }
    }

    /// Its width (the sparkline's is at least this).
    fn width(self) -> usize {
        match self {
            Col::Backend => 18,
            Col::State => 13,
            Col::Run | Col::Wait | Col::InFlight | Col::Errors => 5,
            Col::Kv => 11,
            Col::Rate | Col::Ttft | Col::Itl | Col::Score => 7,
            Col::Spark => 8,
        }
    }

    fn left_aligned(self) -> bool {
        matches!(self, Col::Backend | Col::State | Col::Kv | Col::Spark)
    }
}

/// The columns that fit in `width`, and the sparkline's width if it is one of them.
fn layout(width: usize) -> (Vec<Col>, usize) {
    let mut cols = Col::ALL.to_vec();
    let used = |cols: &[Col]| cols.iter().map(|c| c.width() + 1).sum::<usize>() - 1;
    for drop in Col::DROPPED_FIRST {
        if used(&cols) <= width {
            break;
        }
        cols.retain(|&c| c != drop);
    }
    let spark = if cols.contains(&Col::Spark) {
        (width + Col::Spark.width())
            .saturating_sub(used(&cols))
            .clamp(Col::Spark.width(), SPARK_SAMPLES)
    } else {
        0
    };
    (cols, spark)
}

/// `cells` (one per column of `cols`) as one line, each padded to its column; the state
/// cell painted after padding, so colors never shift the columns.
fn row(
    cols: &[Col],
    cells: &[String],
    spark: usize,
    paint_state: &dyn Fn(String) -> String,
) -> String {
    let mut line = String::new();
    for (i, (&c, text)) in cols.iter().zip(cells).enumerate() {
        if i > 0 {
            line.push(' ');
        }
        let w = if c == Col::Spark { spark } else { c.width() };
        let text = cut(text, w);
        let padded = if c.left_aligned() {
            format!("{text:<w$}")
        } else {
            format!("{text:>w$}")
        };
        line.push_str(&if c == Col::State {
            paint_state(padded)
        } else {
            padded
        });
    }
    line.trim_end().to_string()
}

/// The header's parts (` · ` apart) packed into lines of at most `width` columns: a narrow
/// terminal gets every part, on more lines, rather than a header cut short.
fn header_lines(parts: &[String], width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for p in parts {
        match lines.last_mut() {
            Some(l) if l.chars().count() + 3 + p.chars().count() <= width => {
                l.push_str(" · ");
                l.push_str(p);
            }
            _ => lines.push(cut(p, width)),
        }
    }
    lines
}

/// A backend's state, in words, and its color.
fn state_of(b: &Value) -> (String, &'static str) {
    if b["draining"].as_bool() == Some(true) {
        ("draining".to_string(), "33")
    } else if b["healthy"].as_bool() != Some(true) {
        ("down".to_string(), "31")
    } else if b["circuit"].as_str() != Some("closed") {
        (
            format!("circuit {}", b["circuit"].as_str().unwrap_or("?")),
            "33",
        )
    } else if b["scrape_fresh"].as_bool() != Some(true) {
        ("stale metrics".to_string(), "33")
    } else {
        ("up".to_string(), "32")
    }
}

/// The gateway's queue (flow control) for the header: `queued 12 (high 0, normal 10, low
/// 2) · shed 3`, or `queued 0` while nothing waits; `None` from a gateway without one.
fn queue_part(q: &Value) -> Option<String> {
    let total = q["queued"].as_u64()?;
    let models = q["models"].as_object();
    let sum = |f: &dyn Fn(&Value) -> u64| -> u64 { models.map_or(0, |m| m.values().map(f).sum()) };
    let shed = sum(&|m| m["shed"].as_u64().unwrap_or(0));
    let mut out = format!("queued {total}");
    if total > 0 {
        let class = |c: &str| sum(&|m| m["by_priority"][c].as_u64().unwrap_or(0));
        out.push_str(&format!(
            " (high {}, normal {}, low {})",
            class("high"),
            class("normal"),
            class("low")
        ));
    }
    if shed > 0 {
        out.push_str(&format!(" · shed {shed}"));
    }
    Some(out)
}

/// One screen, `width` columns wide: no line is longer. `color` adds ANSI colors.
pub fn render(stats: &Value, view: &View, source: &str, width: usize, color: bool) -> String {
    let paint = |s: String, code: &str| {
        if color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s
        }
    };
    let f = &stats["fleet"];
    let mut out = String::new();
    let rate = |r: Option<f64>, d: usize| r.map_or("-".to_string(), |r| format!("{r:.d$}"));
    let healthy = f["healthy"].as_u64().unwrap_or(0);
    let routable = f["routable"].as_u64().unwrap_or(healthy);
    let mut health = format!("{healthy}/{} healthy", f["backends"].as_u64().unwrap_or(0));
    if routable < healthy {
        health.push_str(&format!(" ({routable} in rotation)"));
    }
    let mut parts = vec![
        format!("vllm-edge top · {source}"),
        stats["policy"].as_str().unwrap_or("?").to_string(),
        health,
        format!("{} req/s", rate(view.rps, 1)),
        format!("{} 5xx/s", rate(view.eps, 2)),
        format!("in flight {}", f["in_flight"].as_u64().unwrap_or(0)),
        format!("run {}", opt(&f["running"], 0, "")),
        format!("wait {}", opt(&f["waiting"], 0, "")),
        format!(
            "KV {}",
            f["kv_usage_mean"]
                .as_f64()
                .map_or("-".into(), |k| format!("{:.1}%", k * 100.0))
        ),
    ];
    if let Some(q) = queue_part(&stats["queue"]) {
        parts.push(q);
    }
    for l in header_lines(&parts, width) {
        out.push_str(&paint(l, "1"));
        out.push('\n');
    }
    let (cols, spark_w) = layout(width);
    let titles: Vec<String> = cols.iter().map(|c| c.title().to_string()).collect();
    out.push_str(&paint(row(&cols, &titles, spark_w, &|s| s), "7"));
    out.push('\n');
    let backends: Vec<&Value> = stats["backends"].as_array().into_iter().flatten().collect();
    // One scale for every sparkline: the fleet's busiest moment on screen.
    let spark_top = backends
        .iter()
        .filter_map(|b| view.load.get(b["name"].as_str().unwrap_or("")))
        .flat_map(|h| h.iter().skip(h.len().saturating_sub(spark_w)))
        .copied()
        .fold(0.0f64, f64::max);
    let empty = VecDeque::new();
    for b in backends {
        let name = b["name"].as_str().unwrap_or("?");
        let (state, code) = state_of(b);
        let cells: Vec<String> = cols
            .iter()
            .map(|c| match c {
                Col::Backend => name.to_string(),
                Col::State => state.clone(),
                Col::Run => opt(&b["running"], 0, ""),
                Col::Wait => opt(&b["waiting"], 0, ""),
                Col::InFlight => b["in_flight"].as_u64().unwrap_or(0).to_string(),
                Col::Kv => kv_bar(b["kv_usage"].as_f64(), Col::Kv.width()),
                Col::Rate => view
                    .backend_rps
                    .get(name)
                    .map_or("-".into(), |r| format!("{r:.1}")),
                Col::Errors => b["upstream_errors_total"].as_u64().unwrap_or(0).to_string(),
                Col::Ttft => opt(&b["ttft_ms"], 0, "ms"),
                Col::Itl => opt(&b["itl_ms"], 1, "ms"),
                Col::Score => opt(&b["score_ms"], 0, "ms"),
                Col::Spark => sparkline(view.load.get(name).unwrap_or(&empty), spark_w, spark_top),
            })
            .collect();
        out.push_str(&row(&cols, &cells, spark_w, &|s| paint(s, code)));
        out.push('\n');
        let problem = [
            &b["health_error"],
            &b["last_scrape_error"],
            &b["models_error"],
        ]
        .into_iter()
        .find_map(|v| v.as_str());
        if let Some(p) = problem {
            out.push_str(&paint(
                format!("  └ {}", cut(p, width.saturating_sub(4))),
                "31",
            ));
            out.push('\n');
        }
    }
    // Entries whose host name has no address yet: no backend, nothing sent there.
    for a in stats["awaiting_address"].as_array().into_iter().flatten() {
        let name = cut(a["name"].as_str().unwrap_or("?"), Col::Backend.width());
        let host = a["host"].as_str().unwrap_or("");
        let line = format!("{name:<18} {:<13} {host}", "no address");
        let line = cut(&line, width);
        // Painted after the cut: the state's columns are the same on every line.
        let (head, rest) =
            line.split_at(line.char_indices().nth(19).map_or(line.len(), |(i, _)| i));
        let (state, tail) =
            rest.split_at(rest.char_indices().nth(13).map_or(rest.len(), |(i, _)| i));
        out.push_str(&format!("{head}{}{tail}\n", paint(state.to_string(), "33")));
    }
    out
}

/// Where the admin API is and its token: flags, else the config file, else defaults.
fn target(args: &TopArgs) -> Result<(SocketAddr, Option<Secret>), TopError> {
    let config = match &args.config {
        Some(p) => Some(Config::load_with_env(p).map_err(|e| TopError::Setup(e.to_string()))?),
        None => None,
    };
    let addr = match (&args.admin, &config) {
        (Some(a), _) => a
            .to_socket_addrs()
            .ok()
            .and_then(|mut it| it.next())
            .ok_or_else(|| TopError::Setup(format!("--admin {a}: not a host:port address")))?,
        (None, Some(c)) => c.admin,
        (None, None) => defaults::ADMIN_LISTEN
            .parse()
            .expect("the default admin address is valid"),
    };
    let token = match (&args.token_file, config) {
        (Some(p), _) => Some(Secret::read(p).map_err(TopError::Setup)?),
        (None, Some(c)) => c.admin_token,
        (None, None) => None,
    };
    Ok((addr, token))
}

async fn fetch(addr: SocketAddr, token: Option<&Secret>, history: bool) -> Result<Value, TopError> {
    let t = Target {
        addr,
        key: token,
        tls: None,
        kept: None,
    };
    let path = if history {
        "/load-stats?history=1"
    } else {
        "/load-stats"
    };
    let fail = |why: String| TopError::Fetch { addr, why };
    let r = httpclient::get(t, path, Duration::from_secs(3), MAX_STATS_BYTES)
        .await
        .map_err(|e| fail(e.to_string()))?;
    match r.status {
        200 => serde_json::from_slice(&r.body).map_err(|e| fail(format!("not JSON: {e}"))),
        401 => Err(fail(
            "401: the admin API needs its token (--token-file, or -c with admin.token_file)".into(),
        )),
        s => Err(fail(format!("status {s}"))),
    }
}

/// The terminal's width: the tty's, else `COLUMNS`, else 120.
fn width() -> usize {
    // SAFETY: TIOCGWINSZ only writes a winsize struct we own.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    if unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_col > 0
    {
        return ws.ws_col as usize;
    }
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(120)
}

/// Keys without Enter and without echo while `top` runs (Ctrl-C still signals); the
/// terminal's settings come back on drop.
struct RawKeys(Option<libc::termios>);

impl RawKeys {
    fn enable() -> RawKeys {
        // SAFETY: tcgetattr/tcsetattr on stdin with a termios struct we own.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::isatty(libc::STDIN_FILENO) != 1
                || libc::tcgetattr(libc::STDIN_FILENO, &mut t) != 0
            {
                return RawKeys(None);
            }
            let saved = t;
            t.c_lflag &= !(libc::ICANON | libc::ECHO);
            t.c_cc[libc::VMIN] = 1;
            t.c_cc[libc::VTIME] = 0;
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t);
            RawKeys(Some(saved))
        }
    }
}

impl Drop for RawKeys {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            // SAFETY: restores the settings read in `enable`.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, t) };
        }
    }
}

/// `top` into a pipe or a file: a frame per refresh, a blank line between, until Ctrl-C.
async fn plain_frames(
    first: Value,
    view: &mut View,
    addr: SocketAddr,
    token: Option<&Secret>,
    source: &str,
    period: Duration,
    started: Instant,
) -> Result<(), TopError> {
    let mut stats = first;
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    loop {
        println!("{}", render(&stats, view, source, width(), false));
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        stats = fetch(addr, token, false).await?;
        view.update(&stats, started.elapsed().as_secs_f64());
    }
}

pub fn run(args: TopArgs) -> Result<(), TopError> {
    let (addr, token) = target(&args)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| TopError::Setup(format!("tokio runtime: {e}")))?;
    let period = Duration::from_millis(args.interval_ms.max(100));
    let source = addr.to_string();
    let started = Instant::now();
    let mut view = View::default();
    rt.block_on(async {
        let first = fetch(addr, token.as_ref(), true).await?;
        if let Some(h) = first["history"].as_array() {
            view.seed(h);
        }
        view.update(&first, started.elapsed().as_secs_f64());
        // Not a terminal (a pipe, a file): plain frames, no escape codes.
        let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
        if args.once {
            print!("{}", render(&first, &view, &source, width(), tty));
            return Ok(());
        }
        if !tty {
            return plain_frames(
                first,
                &mut view,
                addr,
                token.as_ref(),
                &source,
                period,
                started,
            )
            .await;
        }
        let _raw = RawKeys::enable();
        let (quit_tx, mut quit_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut byte = [0u8; 1];
            while std::io::stdin().read(&mut byte).is_ok_and(|n| n == 1) {
                if matches!(byte[0], b'q' | b'Q') {
                    let _ = quit_tx.send(());
                    return;
                }
            }
        });
        let mut stdout = std::io::stdout();
        let _ = write!(stdout, "\x1b[?1049h\x1b[?25l");
        let mut stats = Ok(first);
        let mut tick = tokio::time::interval(period);
        tick.tick().await;
        loop {
            let screen = match &stats {
                Ok(s) => render(s, &view, &source, width(), true),
                Err(e) => format!("vllm-edge top · {source}\n\n\x1b[31m{e}\x1b[0m (retrying)\n"),
            };
            let screen = screen.replace('\n', "\x1b[K\n");
            let _ = write!(stdout, "\x1b[H{screen}\x1b[J");
            let _ = stdout.flush();
            tokio::select! {
                _ = tick.tick() => {}
                _ = quit_rx.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
            stats = fetch(addr, token.as_ref(), false).await;
            if let Ok(s) = &stats {
                view.update(s, started.elapsed().as_secs_f64());
            }
        }
        let _ = write!(stdout, "\x1b[?25h\x1b[?1049l");
        let _ = stdout.flush();
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stats(total: u64, b0_requests: u64, running: f64) -> Value {
        json!({
            "policy": "vllm",
            "requests": {"total": total, "by_status_class": {"2xx": total}},
            "fleet": {"backends": 2, "healthy": 1, "running": running, "waiting": 0.0,
                      "in_flight": 3, "kv_usage_mean": 0.25},
            "backends": [
                {"name": "gpu-0", "healthy": true, "circuit": "closed", "draining": false,
                 "scrape_fresh": true, "running": running, "waiting": 0.0, "in_flight": 3,
                 "kv_usage": 0.5, "requests_total": b0_requests, "upstream_errors_total": 0,
                 "ttft_ms": 41.0, "itl_ms": 12.5, "score_ms": 80.0},
                {"name": "gpu-1", "healthy": false, "circuit": "open", "draining": false,
                 "scrape_fresh": false, "running": null, "waiting": null, "in_flight": 0,
                 "kv_usage": null, "requests_total": 0, "upstream_errors_total": 7,
                 "health_error": "GET /health: connect: Connection refused"}
            ],
            "awaiting_address": [{"name": "gpu-7", "host": "gpu-7.lan:8000", "models": null}]
        })
    }

    #[test]
    fn a_frame_shows_every_backend_its_state_and_rates() {
        let mut view = View::default();
        view.update(&stats(100, 100, 4.0), 0.0);
        view.update(&stats(120, 120, 8.0), 2.0);
        let text = render(&stats(120, 120, 8.0), &view, "127.0.0.1:9090", 140, false);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].contains("1/2 healthy") && lines[0].contains("10.0 req/s"),
            "{text}"
        );
        let gpu0 = lines.iter().find(|l| l.starts_with("gpu-0")).expect(&text);
        assert!(gpu0.contains(" up "), "{gpu0}");
        assert!(gpu0.contains("███░░░  50%"), "KV bar at 50%: {gpu0}");
        assert!(gpu0.contains("10.0"), "backend rate: {gpu0}");
        assert!(gpu0.ends_with("▅█"), "sparkline 4 then 8: {gpu0}");
        let gpu1 = lines.iter().find(|l| l.starts_with("gpu-1")).expect(&text);
        assert!(gpu1.contains("down"), "{gpu1}");
        let gpu7 = lines.iter().find(|l| l.starts_with("gpu-7")).expect(&text);
        assert!(
            gpu7.contains("no address") && gpu7.ends_with("gpu-7.lan:8000"),
            "{gpu7}"
        );
        assert!(
            text.contains("└ GET /health: connect: Connection refused"),
            "{text}"
        );
        assert!(lines.iter().all(|l| l.chars().count() <= 140), "{text}");
    }

    #[test]
    fn at_80_columns_no_line_wraps_and_the_header_is_whole() {
        let mut view = View::default();
        view.update(&stats(100, 100, 4.0), 0.0);
        view.update(&stats(120, 120, 8.0), 2.0);
        for width in [80, 60, 100, 200] {
            let text = render(&stats(120, 120, 8.0), &view, "127.0.0.1:9090", width, false);
            for l in text.lines() {
                assert!(l.chars().count() <= width, "{width}: {l:?}\n{text}");
            }
            // Every part of the header, on as many lines as it takes.
            for part in [
                "vllm",
                "1/2 healthy",
                "10.0 req/s",
                "5xx/s",
                "in flight 3",
                "KV 25.0%",
            ] {
                assert!(text.contains(part), "{width}: {part}\n{text}");
            }
            // The table's title and rows line up: STATE starts at the same column.
            let title = text
                .lines()
                .find(|l| l.starts_with("BACKEND"))
                .expect(&text);
            let gpu0 = text.lines().find(|l| l.starts_with("gpu-0")).expect(&text);
            assert_eq!(title.find("STATE"), gpu0.find("up"), "{text}");
            assert!(!text.contains('\x1b'), "no escape codes without color");
        }
    }

    #[test]
    fn the_header_shows_the_queue_by_class() {
        let mut s = stats(1, 1, 1.0);
        s["queue"] = json!({"queued": 12, "models": {"m": {"shed": 3,
            "by_priority": {"high": 0, "normal": 10, "low": 2}}}});
        let text = render(&s, &View::default(), "x", 200, false);
        assert!(
            text.contains("queued 12 (high 0, normal 10, low 2) · shed 3"),
            "{text}"
        );
        s["queue"] = json!({"queued": 0, "models": {}});
        let text = render(&s, &View::default(), "x", 200, false);
        assert!(text.contains("queued 0"), "{text}");
    }

    #[test]
    fn a_draining_replica_is_healthy_but_out_of_rotation() {
        let mut s = stats(1, 1, 1.0);
        s["fleet"]["healthy"] = json!(2);
        s["fleet"]["routable"] = json!(1);
        s["backends"][1]["healthy"] = json!(true);
        s["backends"][1]["draining"] = json!(true);
        let text = render(&s, &View::default(), "x", 120, false);
        assert!(text.contains("2/2 healthy (1 in rotation)"), "{text}");
        let gpu1 = text.lines().find(|l| l.starts_with("gpu-1")).expect(&text);
        assert!(gpu1.contains("draining"), "{gpu1}");
    }

    #[test]
    fn the_gateways_history_seeds_sparklines_and_rates() {
        let sample = |t: u64, total: u64, running: f64| {
            json!({"t_ms": t, "requests_total": total, "errors_5xx_total": 0, "backends": [
                {"name": "gpu-0", "running": running, "waiting": 1.0, "in_flight": 0,
                 "requests_total": total}]})
        };
        let mut view = View::default();
        view.seed(&[
            sample(1000, 10, 0.0),
            sample(2000, 15, 3.0),
            sample(3000, 25, 7.0),
        ]);
        assert_eq!(view.rps, Some(7.5), "15 requests over the 2 s window");
        assert_eq!(view.load["gpu-0"], [1.0, 4.0, 8.0]);
        assert_eq!(sparkline(&view.load["gpu-0"], 8, 8.0), "▂▅█");
        // One scale: a backend at half the fleet's top shows half, not full.
        assert_eq!(sparkline(&VecDeque::from([4.0]), 8, 8.0), "▅");
    }
}
