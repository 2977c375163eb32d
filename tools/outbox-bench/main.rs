//! `outbox-bench`: how well flux-outbox does its job, as ratios to limits measured in the same
//! run (the machines are shared and noisy: absolute times drift, ratios hold).
//!
//! ```text
//! outbox-bench [--quick] [--json] [--worker PATH] [SCENARIO...]
//! ```
//! Scenarios (all by default, in this order):
//! - `ingest`: durable NDJSON ingest (1,000 updates a request, 4 connections) into a worker whose
//!   link is down, against raw sled group commit (`apply_batch` of 1,000 log records of the same
//!   sizes + `flush()` + fdatasync of `db`, same disk, measured before and after); then the
//!   latency of single-update requests at 1,000 requests/s (open loop).
//! - `compaction`: N updates over K keys during an outage, then the link returns: what is sent.
//! - `drain`: a backlog of pending keys drained to flux-sim, read-merge-write and blind, against
//!   flux-sim's own capacity for pre-built batches of the same size and concurrency.
//! - `recovery`: a store with many pending keys, kill -9, restart: time to accept ingest, drain
//!   time, peak RSS, disk with the keys and after the drain.
//! - `steady`: 5,000 updates/s for a minute with the link up: RSS, CPU, oldest pending age.
//!
//! Run only when named:
//! - `layout`: the record layout's cost in sled itself, per key (as the store keeps pending keys
//!   now) against per entity (a design not built): memory of a fresh process opening the store,
//!   disk, and the drain's sled work (see `layout.rs`).
//!
//! The worker is the real `flux-outbox` binary, run as a child process (found next to this
//! executable, or `--worker PATH`) on a temporary directory, talking to flux-sim in this
//! process over loopback. With `--json`, every scenario prints one JSON object on one line on
//! stdout (its figures and `"scenario"`), the tables go to stderr. Exit status 0 when every
//! scenario ran (no threshold is asserted), 1 when one could not run, 2 on bad usage.

mod harness;
mod layout;
mod limits;
mod scenarios;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

const SCENARIOS: [&str; 5] = ["ingest", "compaction", "drain", "recovery", "steady"];
/// Scenarios run only when named.
const SCENARIOS_NAMED: [&str; 1] = ["layout"];

#[derive(Parser)]
#[command(
    name = "outbox-bench",
    version,
    about = "Benchmarks of flux-outbox against limits measured in the same run"
)]
struct Cli {
    /// Small sizes: the whole run takes about a minute (CI smoke test).
    #[arg(long)]
    quick: bool,
    /// One JSON object per scenario on stdout (tables go to stderr).
    #[arg(long)]
    json: bool,
    /// The flux-outbox worker binary (default: `flux-outbox` next to this executable).
    #[arg(long, value_name = "PATH")]
    worker: Option<PathBuf>,
    /// Scenarios to run: ingest, compaction, drain, recovery, steady (default: these five),
    /// layout (only when named).
    #[arg(value_name = "SCENARIO")]
    scenarios: Vec<String>,
    /// Internal: the `layout` scenario's child process; opens the store in DIR and prints its
    /// RSS and peak RSS in bytes.
    #[arg(long, hide = true, value_name = "DIR")]
    layout_open: Option<PathBuf>,
}

/// Sizes of a run.
pub struct Sizes {
    pub ingest_keys: u64,
    pub ingest_updates: u64,
    pub ingest_time: Duration,
    pub raw_updates: u64,
    pub raw_time: Duration,
    pub ack_rate: u64,
    pub ack_time: Duration,
    pub comp_updates: u64,
    pub comp_keys: u64,
    pub drain_keys: u64,
    pub sim_time_min: Duration,
    pub rec_keys: u64,
    pub rotation_wait: Duration,
    pub steady_rate: u64,
    pub steady_time: Duration,
    pub steady_warmup: Duration,
    pub layout_open_keys: u64,
    pub layout_drain_keys: u64,
}

impl Sizes {
    fn full() -> Self {
        Sizes {
            ingest_keys: 100_000,
            ingest_updates: 500_000,
            ingest_time: Duration::from_secs(40),
            raw_updates: 500_000,
            raw_time: Duration::from_secs(10),
            ack_rate: 1_000,
            ack_time: Duration::from_secs(15),
            comp_updates: 1_000_000,
            comp_keys: 10_000,
            drain_keys: 200_000,
            sim_time_min: Duration::from_secs(5),
            rec_keys: 1_000_000,
            rotation_wait: Duration::from_secs(45),
            steady_rate: 5_000,
            steady_time: Duration::from_secs(60),
            steady_warmup: Duration::from_secs(5),
            layout_open_keys: 1_000_000,
            layout_drain_keys: 200_000,
        }
    }
    fn quick() -> Self {
        Sizes {
            ingest_keys: 20_000,
            ingest_updates: 80_000,
            ingest_time: Duration::from_secs(8),
            raw_updates: 40_000,
            raw_time: Duration::from_secs(3),
            ack_rate: 1_000,
            ack_time: Duration::from_secs(5),
            comp_updates: 100_000,
            comp_keys: 2_000,
            drain_keys: 20_000,
            sim_time_min: Duration::from_secs(1),
            rec_keys: 50_000,
            rotation_wait: Duration::from_secs(1),
            steady_rate: 5_000,
            steady_time: Duration::from_secs(10),
            steady_warmup: Duration::from_secs(2),
            layout_open_keys: 50_000,
            layout_drain_keys: 20_000,
        }
    }
}

/// What every scenario gets.
pub struct Ctx {
    pub exe: PathBuf,
    pub sizes: Sizes,
    pub http: reqwest::Client,
    started: Instant,
}

impl Ctx {
    pub fn progress(&self, what: &str) {
        eprintln!("[{:>6.1}s] {what}", self.started.elapsed().as_secs_f64());
    }
}

pub enum Val {
    U(u64),
    F(f64, usize),
}

pub struct Figure {
    pub name: &'static str,
    pub value: Val,
    pub note: String,
}

/// The figures of one scenario, in the order they are printed.
pub struct Report {
    pub scenario: &'static str,
    pub figures: Vec<Figure>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(scenario: &'static str) -> Self {
        Report {
            scenario,
            figures: Vec::new(),
            notes: Vec::new(),
        }
    }
    pub fn f(&mut self, name: &'static str, v: f64, decimals: usize, note: &str) {
        self.figures.push(Figure {
            name,
            value: Val::F(if v.is_finite() { v } else { 0.0 }, decimals),
            note: note.into(),
        });
    }
    pub fn u(&mut self, name: &'static str, v: u64, note: &str) {
        self.figures.push(Figure {
            name,
            value: Val::U(v),
            note: note.into(),
        });
    }
    pub fn note(&mut self, n: String) {
        self.notes.push(n);
    }

    fn value_text(v: &Val) -> String {
        match v {
            Val::U(n) => n.to_string(),
            Val::F(x, d) => format!("{x:.d$}", d = *d),
        }
    }

    pub fn table(&self) -> String {
        let mut out = format!("== {}\n", self.scenario);
        let w = self.figures.iter().map(|f| f.name.len()).max().unwrap_or(8);
        let vw = self
            .figures
            .iter()
            .map(|f| Self::value_text(&f.value).len())
            .max()
            .unwrap_or(8);
        for f in &self.figures {
            out.push_str(&format!(
                "  {:<w$}  {:>vw$}  {}\n",
                f.name,
                Self::value_text(&f.value),
                f.note
            ));
        }
        for n in &self.notes {
            out.push_str(&format!("  NOTE: {n}\n"));
        }
        out
    }

    pub fn json(&self) -> String {
        let mut out = format!("{{\"scenario\":\"{}\"", self.scenario);
        for f in &self.figures {
            out.push_str(&format!(",\"{}\":{}", f.name, Self::value_text(&f.value)));
        }
        out.push('}');
        out
    }
}

fn worker_path(cli: &Cli) -> Result<PathBuf, String> {
    let path = match &cli.worker {
        Some(p) => p.clone(),
        None => {
            let exe = std::env::current_exe()
                .map_err(|e| format!("cannot find this executable's path: {e}"))?;
            let dir = exe
                .parent()
                .ok_or("this executable has no parent directory")?;
            dir.join("flux-outbox")
        }
    };
    if !path.is_file() {
        return Err(format!(
            "the flux-outbox worker binary was not found at {}: build it (cargo build --release --bin flux-outbox) or pass --worker PATH",
            path.display()
        ));
    }
    Ok(path)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(dir) = &cli.layout_open {
        return match layout::open_probe(dir) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("outbox-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let mut chosen = Vec::new();
    for s in &cli.scenarios {
        match SCENARIOS
            .iter()
            .chain(SCENARIOS_NAMED.iter())
            .find(|n| **n == s.as_str())
        {
            Some(n) => chosen.push(*n),
            None => {
                eprintln!(
                    "outbox-bench: unknown scenario {s:?} (known: {}, {})",
                    SCENARIOS.join(", "),
                    SCENARIOS_NAMED.join(", ")
                );
                return ExitCode::from(2);
            }
        }
    }
    if chosen.is_empty() {
        chosen = SCENARIOS.to_vec();
    }
    let exe = match worker_path(&cli) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("outbox-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outbox-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outbox-bench: cannot build the HTTP client: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cx = Ctx {
        exe,
        sizes: if cli.quick {
            Sizes::quick()
        } else {
            Sizes::full()
        },
        http,
        started: Instant::now(),
    };
    cx.progress(&format!(
        "outbox-bench {}: worker {}, scenarios {}",
        if cli.quick { "--quick" } else { "(full)" },
        cx.exe.display(),
        chosen.join(", ")
    ));
    let mut failed = false;
    for name in chosen {
        let result = rt.block_on(async {
            match name {
                "ingest" => scenarios::ingest(&cx).await,
                "compaction" => scenarios::compaction(&cx).await,
                "drain" => scenarios::drain(&cx).await,
                "recovery" => scenarios::recovery(&cx).await,
                "layout" => layout::layout(&cx).await,
                _ => scenarios::steady(&cx).await,
            }
        });
        match result {
            Ok(report) => {
                if cli.json {
                    eprint!("{}", report.table());
                    println!("{}", report.json());
                } else {
                    print!("{}", report.table());
                }
                let _ = std::io::stdout().flush();
            }
            Err(e) => {
                eprintln!("outbox-bench: scenario {name} failed: {e}");
                failed = true;
            }
        }
    }
    cx.progress("done");
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
