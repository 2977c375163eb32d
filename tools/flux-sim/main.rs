//! flux-sim: a Flux-compatible HTTP server for tests, demos and benchmarks.
//! See `flux_outbox::sim` for the behaviour, the `/_sim/` control API and known differences.

use std::io::Write;
use std::net::SocketAddr;

use clap::Parser;
use flux_outbox::sim::{self, Faults, SimConfig};

#[derive(Parser, Debug)]
#[command(
    name = "flux-sim",
    about = "Flux-compatible HTTP server with fault injection"
)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Public mode: namespaces, bearer tokens, rate limits.
    #[arg(long)]
    public: bool,
    /// Admin token for POST /api/namespaces (public mode).
    #[arg(long)]
    admin_token: Option<String>,
    /// Namespaces to create at start (public mode); their tokens go to stderr as `token NAME TOKEN`.
    #[arg(long = "namespace")]
    namespaces: Vec<String>,
    /// Seed for fault draws and ids.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Rate limit bucket size per namespace.
    #[arg(long, default_value_t = 10_000)]
    rate_limit_bucket: u64,
    /// Rate limit refill per minute per namespace.
    #[arg(long, default_value_t = 10_000)]
    rate_limit_refill_per_min: u64,
    /// Applied events kept for /_sim/log.
    #[arg(long, default_value_t = 250_000)]
    log_capacity: usize,
    #[arg(long, default_value_t = 0.0)]
    error_500_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    rate_429_rate: f64,
    /// Retry-After (seconds) of the injected 429s; 0 means Flux's fixed 60.
    #[arg(long = "rate-429-retry-after-s", default_value_t = 0)]
    rate_429_retry_after_s: u64,
    #[arg(long, default_value_t = 0.0)]
    publish_fail_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    validation_fail_rate: f64,
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    #[arg(long, default_value_t = 0)]
    publish_fail_delay_ms: u64,
    #[arg(long, default_value_t = 0.0)]
    hang_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    reset_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    lost_answer_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    late_apply_rate: f64,
    #[arg(long, default_value_t = 0)]
    late_apply_delay_ms: u64,
    #[arg(long)]
    link_down: bool,
    /// Entity reads that show the entity as it was before its last applied event.
    #[arg(long, default_value_t = 0.0)]
    stale_read_rate: f64,
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Args::parse()).await {
        eprintln!("flux-sim: {e}");
        std::process::exit(1);
    }
}

async fn run(a: Args) -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let faults = Faults {
        error_500_rate: a.error_500_rate,
        rate_429_rate: a.rate_429_rate,
        rate_429_retry_after_s: a.rate_429_retry_after_s,
        publish_fail_rate: a.publish_fail_rate,
        validation_fail_rate: a.validation_fail_rate,
        latency_ms: a.latency_ms,
        publish_fail_delay_ms: a.publish_fail_delay_ms,
        hang_rate: a.hang_rate,
        reset_rate: a.reset_rate,
        lost_answer_rate: a.lost_answer_rate,
        late_apply_rate: a.late_apply_rate,
        late_apply_delay_ms: a.late_apply_delay_ms,
        link_down: a.link_down,
        stale_read_rate: a.stale_read_rate,
    };
    faults.check()?;
    let cfg = SimConfig {
        public: a.public,
        admin_token: a.admin_token,
        rate_limit_bucket: a.rate_limit_bucket,
        rate_limit_refill_per_min: a.rate_limit_refill_per_min,
        log_capacity: a.log_capacity,
        seed: a.seed,
        faults,
        ..SimConfig::default()
    };
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", a.listen))?;
    let handle = sim::start(cfg, listener).await?;
    for ns in &a.namespaces {
        eprintln!("token {ns} {}", handle.register_namespace(ns));
    }
    {
        // Scripts wait for this one stdout line; flush so a pipe sees it at once.
        let mut out = std::io::stdout().lock();
        writeln!(out, "flux-sim listening on {}", handle.url())?;
        out.flush()?;
    }
    wait_for_signal().await?;
    handle.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}
