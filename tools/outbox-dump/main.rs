//! `outbox-dump`: look inside a flux-outbox store. What is stuck, since when, how much, why, and
//! is the store healthy; plus the two repairs an operator needs on a dead link: move quarantined
//! keys back to pending, and carry the backlog off the gateway as NDJSON.
//!
//! ```text
//! outbox-dump summary
//! outbox-dump pending [--entity PREFIX] [--older-than 10m] [--limit N]
//! outbox-dump quarantine [--entity PREFIX] [--older-than 10m] [--limit N]
//! outbox-dump log [--limit N]
//! outbox-dump verify                      # exit 1 when anything is wrong
//! outbox-dump export [--quarantine] > backlog.ndjson
//! outbox-dump requeue (--entity PREFIX | --all)
//! ```
//! Global options: `--data-dir DIR`, `--config FILE`, `--admin URL`, `--admin-token TOKEN`
//! (or `FLUX_OUTBOX_ADMIN_TOKEN`), `--format table|json|ndjson` (default: `table` when stdout is
//! a terminal, `json` otherwise). Export always writes NDJSON in the worker's native ingest
//! format (`POST /v1/updates`), so a backlog can be posted to another worker as is.
//!
//! # Offline and live
//! sled lets one process open a store, so the tool works in one of two ways:
//! - **offline**: the worker is stopped; the tool opens `DIR/store` itself. Every command but
//!   `requeue` is read-only: it never creates a store, never writes the format record, never
//!   compacts (so `log` shows the uncompacted tail as it is on disk, and `export` folds the tail
//!   in memory with the compactor's rules). `requeue` opens the store as the worker does.
//!   sled has no read-only mode: the first open after the worker stopped may let sled write its
//!   own recovery snapshot (`snap.*`) and seal its log; no record of the store changes, and
//!   later reads leave the files byte for byte as they are. While the tool holds the store
//!   (a second or so), a worker starting at that moment is refused and restarts.
//! - **live**: the worker runs and holds the lock; the tool asks the worker's admin API
//!   (`/v1/outbox/*`), with output identical to offline for the same content. The worker's
//!   export folds the tail in memory with the same function, so live export does not compact
//!   either (nor set a corrupt log record aside before `verify` reported it).
//!
//! Which one: `--admin URL` means live. Otherwise the data directory (`--data-dir`, else the
//! config's `data_dir`) is opened offline, and when it is locked by the running worker the tool
//! goes live through the config's `admin.listen`. `--config` takes the worker's config file;
//! without it the worker's defaults and environment apply, as for the worker itself.
//!
//! A record a listing or `export` cannot read (corrupt) is not shown; the tool says how many on
//! stderr (`warning: ...`), offline and live, and `verify` names them.
//!
//! Exit status: 0 done, 1 `verify` found problems, 2 the tool could not do what was asked (the
//! message says what, where and why). Tokens are never printed.

mod render;
mod source;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use flux_outbox::admin::{LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX};

use crate::source::Source;

#[derive(Parser)]
#[command(
    name = "outbox-dump",
    version,
    about = "Inspect a flux-outbox store: summary, pending, quarantine, log, verify, export, requeue",
    long_about = "Inspect a flux-outbox store. Offline (worker stopped) it reads --data-dir \
                  directly and read-only; when the worker runs (store locked) it asks the \
                  worker's admin API (--admin, default from the config's admin.listen)."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone, Debug)]
pub struct Global {
    /// The worker's data directory (holds `store/`). Default: the config's `data_dir`.
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The worker's config file (data_dir, admin.listen, admin.token). Default: the worker's
    /// defaults plus environment overrides.
    #[arg(long, short, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Ask the running worker's admin API at this address (`http://127.0.0.1:8651` or
    /// `127.0.0.1:8651`) instead of opening the store.
    #[arg(long, global = true, value_name = "URL")]
    pub admin: Option<String>,
    /// Admin API token (default: the config's admin.token). Prefer the environment variable:
    /// a command line is visible to other users.
    #[arg(
        long,
        global = true,
        env = "FLUX_OUTBOX_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub admin_token: Option<String>,
    /// Output: aligned tables for people, JSON or NDJSON for scripts. Default: table on a
    /// terminal, json otherwise.
    #[arg(long, global = true, value_enum)]
    pub format: Option<Format>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Ndjson,
}

#[derive(Subcommand)]
enum Command {
    /// Pending keys and entities, oldest pending age, log backlog, quarantine, counters, disk.
    Summary,
    /// Pending keys in delivery order (oldest first), one row per key.
    Pending {
        #[command(flatten)]
        filter: Filter,
    },
    /// Keys Flux rejected for good, with the reason and HTTP status.
    Quarantine {
        #[command(flatten)]
        filter: Filter,
    },
    /// The write-ahead log not yet compacted into the pending set.
    Log {
        /// Most rows shown.
        #[arg(long, default_value_t = LIST_LIMIT_DEFAULT, value_parser = parse_limit)]
        limit: usize,
    },
    /// Decode every record, check checksums, format versions and the engine's invariants.
    /// Exits 1 when anything is wrong.
    Verify,
    /// The pending newest values (or the quarantine) as NDJSON in the native ingest format.
    Export {
        /// Export the quarantine instead of the pending values.
        #[arg(long)]
        quarantine: bool,
    },
    /// Move quarantined keys back to pending (needs --entity or --all).
    Requeue {
        #[command(flatten)]
        target: RequeueTarget,
    },
}

#[derive(Args, Clone, Debug)]
#[group(required = true, multiple = false)]
struct RequeueTarget {
    /// Entities whose id starts with this.
    #[arg(long, value_name = "PREFIX")]
    entity: Option<String>,
    /// Every quarantined key.
    #[arg(long)]
    all: bool,
}

#[derive(Args, Clone, Debug)]
struct Filter {
    /// Only entities whose id starts with this.
    #[arg(long, value_name = "PREFIX")]
    entity: Option<String>,
    /// Only keys whose value has waited at least this long since it first became pending
    /// (the AGE column; `10m`, `2h 30m`).
    #[arg(long, value_name = "AGE", value_parser = humantime::parse_duration)]
    older_than: Option<Duration>,
    /// Most rows shown.
    #[arg(long, default_value_t = LIST_LIMIT_DEFAULT, value_parser = parse_limit)]
    limit: usize,
}

impl Filter {
    fn older_than_ms(&self) -> Option<u64> {
        self.older_than
            .map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64)
    }
}

/// Says on stderr how many records a listing or export could not read (stdout stays the
/// plain listing). `what`: "pending ", "log ", ... or "" for records of any kind.
fn warn_unreadable(n: u64, what: &str, not_done: &str) {
    if n > 0 {
        let (records, verb) = if n == 1 {
            ("record", "is")
        } else {
            ("records", "are")
        };
        eprintln!(
            "outbox-dump: warning: {n} {what}{records} could not be read (corrupt) and {verb} \
             not {not_done}; `outbox-dump verify` names them"
        );
    }
}

fn parse_limit(s: &str) -> Result<usize, String> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number"))?;
    if n == 0 || n > LIST_LIMIT_MAX {
        return Err(format!("must be within 1..={LIST_LIMIT_MAX}"));
    }
    Ok(n)
}

/// Why the tool stops; printed as `outbox-dump: <message>`, exit 2.
#[derive(Debug)]
pub struct Failure(pub String);

impl<T: std::fmt::Display> From<T> for Failure {
    fn from(e: T) -> Self {
        Failure(e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli
        .global
        .format
        .unwrap_or(if std::io::stdout().is_terminal() {
            Format::Table
        } else {
            Format::Json
        });
    match run(&cli, format) {
        Ok((text, code)) => {
            // Written in one go and without println!: a closed pipe (`| head`) must not panic.
            let mut out = std::io::stdout().lock();
            match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
                Ok(()) => ExitCode::from(code),
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::from(code),
                Err(e) => {
                    eprintln!("outbox-dump: cannot write the output: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Err(Failure(message)) => {
            eprintln!("outbox-dump: {message}");
            ExitCode::from(2)
        }
    }
}

/// Runs the command; returns the whole output and the exit code.
fn run(cli: &Cli, format: Format) -> Result<(String, u8), Failure> {
    let verify = matches!(cli.command, Command::Verify);
    let source = Source::connect(&cli.global, verify)?;
    let now = flux_outbox::model::now_ms();
    match &cli.command {
        Command::Summary => {
            let summary = source.summary()?;
            Ok((render::summary(&summary, &source, now, format), 0))
        }
        Command::Pending { filter } => {
            let listing = source.pending(
                filter.entity.as_deref(),
                filter.older_than_ms(),
                filter.limit,
            )?;
            warn_unreadable(listing.unreadable, "pending ", "shown");
            Ok((
                render::rows(
                    &listing.rows,
                    render::RowKind::Pending,
                    filter.limit,
                    now,
                    format,
                ),
                0,
            ))
        }
        Command::Quarantine { filter } => {
            let listing = source.quarantine(
                filter.entity.as_deref(),
                filter.older_than_ms(),
                filter.limit,
            )?;
            warn_unreadable(listing.unreadable, "quarantine ", "shown");
            Ok((
                render::rows(
                    &listing.rows,
                    render::RowKind::Quarantine,
                    filter.limit,
                    now,
                    format,
                ),
                0,
            ))
        }
        Command::Log { limit } => {
            let listing = source.log(*limit)?;
            warn_unreadable(listing.unreadable, "log ", "shown");
            Ok((render::log(&listing.rows, *limit, now, format), 0))
        }
        Command::Verify => {
            let report = source.verify()?;
            let code = if report.problems.is_empty() { 0 } else { 1 };
            Ok((render::verify(&report, format), code))
        }
        Command::Export { quarantine } => {
            let (ndjson, unreadable) = source.export(*quarantine)?;
            // Pending export folds the log: its unreadable records are log or pending ones.
            let what = if *quarantine { "quarantine " } else { "" };
            warn_unreadable(unreadable, what, "exported");
            Ok((ndjson, 0))
        }
        Command::Requeue { target } => {
            // clap requires exactly one of the two; `--all` means no prefix.
            let prefix = if target.all {
                None
            } else {
                target.entity.as_deref()
            };
            let n = source.requeue(prefix)?;
            Ok((render::requeued(n, format), 0))
        }
    }
}
