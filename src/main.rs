//! `flux-outbox`: parses the command line and hands over to the library (`app::run`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use flux_outbox::config::Config;

#[derive(Parser)]
#[command(name = "flux-outbox", version, about = "Durable write-ahead outbox: buffers entity updates on disk and delivers them to Flux", long_about = None)]
struct Cli {
    /// Log format: human-readable text, or JSON lines for log shippers. Filter with RUST_LOG.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker: accept updates, store them durably, deliver them to Flux.
    Run {
        /// Configuration file (TOML). Without it: defaults plus environment overrides.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate the configuration and print the effective values (tokens redacted).
    CheckConfig {
        /// Configuration file (TOML) to check. Without it: defaults plus environment overrides.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// The whole mission end to end on this machine: a simulated Flux, the worker, a SCADA feed,
    /// a link outage and a worker crash; ends with a verification line.
    Demo {
        /// How long to feed updates (the outage and the crash happen inside this time).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Print progress as plain lines instead of redrawing one status line.
        #[arg(long)]
        plain: bool,
    },
}

fn init_logs(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Re-executes this program with its arguments; returns only if that failed.
fn restart_in_place() -> ExitCode {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| "flux-outbox".into());
    tracing::warn!("restarting in place");
    // /proc/self/exe is this very binary even if the file was replaced since it started.
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(argv0)
        .args(args)
        .exec();
    eprintln!("flux-outbox: cannot restart in place: {err}");
    ExitCode::FAILURE
}

/// jemalloc instead of glibc's malloc: glibc gives threads that allocate at the same time arenas
/// of their own and gives little back, so under a mass drain (sled freeing nodes on other
/// threads than those that allocated them) RSS grew far past the live heap. Measured on a
/// 1M-key drain (`outbox-bench recovery`): glibc 456 MiB peak, drain 60 s; jemalloc with the
/// options below 205 MiB, 43 s.
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read by jemalloc itself before `main` (the `malloc_conf` symbol under
/// tikv-jemalloc-sys's `_rjem_` prefix; a C `const char *`, which a `&[u8; N]` is in memory).
/// Two arenas: the worker has few busy threads, and each arena keeps its own free memory.
/// A background thread returns unused pages to the system after a second (`dirty_decay_ms`)
/// instead of on some later allocation. `_RJEM_MALLOC_CONF` in the environment still wins.
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[export_name = "_rjem_malloc_conf"]
pub static JEMALLOC_CONF: &[u8; 70] =
    b"narenas:2,background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match Config::load(config.as_deref()) {
            Ok(cfg) => {
                print!("{}", cfg.render_effective());
                for w in cfg.warnings() {
                    eprintln!("warning: {w}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("flux-outbox: configuration error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            init_logs(cli.log_format, "info");
            let cfg = match Config::load(config.as_deref()) {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("flux-outbox: configuration error: {e}");
                    return ExitCode::from(2);
                }
            };
            for w in cfg.warnings() {
                tracing::warn!("{w}");
            }
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("flux-outbox: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            // systemd: READY=1, WATCHDOG=1, STATUS=, STOPPING=1 (no-ops without NOTIFY_SOCKET).
            let watchdog = flux_outbox::watchdog::Watchdog::new(&cfg);
            // Signal handlers go in before anything else runs, so a SIGTERM during start-up
            // is a graceful shutdown, not an abrupt death (see `shutdown_signal`).
            let shutdown = {
                let _in_runtime = rt.enter();
                flux_outbox::signals::shutdown_signal()
            };
            let result = rt.block_on(flux_outbox::app::run(
                cfg,
                watchdog.stop_on(shutdown),
                |r| {
                    flux_outbox::signals::notify_ready(r);
                    watchdog.ready(r);
                },
            ));
            match result {
                Ok(flux_outbox::app::Exit::Stopped) => ExitCode::SUCCESS,
                Ok(flux_outbox::app::Exit::Restart) => {
                    // A fresh process image reopens the store (sled's I/O errors are sticky
                    // for a handle's life); same pid, arguments and environment, so systemd
                    // keeps supervising it as the same service.
                    rt.shutdown_timeout(std::time::Duration::from_secs(5));
                    restart_in_place()
                }
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("flux-outbox: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo { duration, plain } => {
            init_logs(cli.log_format, "warn");
            match flux_outbox::demo::run(duration, plain) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("flux-outbox demo: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
