//! torture: the durability contract, proven on the whole program.
//!
//! It starts flux-sim in this process and the real `flux-outbox` binary as a child on a
//! temporary data directory, drives a self-checking workload through the ingest API, and
//! SIGKILLs the worker at chosen moments, round after round: while requests are being ingested,
//! while a burst is in group commit, while the compactor has a backlog, while batches are in
//! flight to a slow Flux, and during a graceful shutdown. Between kills it cuts and restores the
//! link and switches flux-sim's fault kinds (500, 429, per-event publish and validation
//! failures, resets, hangs, applied-but-answer-lost, late application of failed events).
//!
//! # The oracle
//!
//! Every update carries a value unique to it (its index in the workload), so any value seen in
//! Flux names exactly one update. Keys are partitioned between feeders and each feeder sends
//! sequentially, so per key the worker's order (source timestamp, then ingest sequence) is the
//! order (timestamp, index) the tool knows. Source timestamps are drawn out of order.
//!
//! - While it runs, a checker reads flux-sim's applied-event log: every property of every event
//!   must be a value sent for exactly that (entity, property) (no foreign or misplaced write),
//!   and no event applied on time may carry a value older than one already applied for its key
//!   (a rollback caused by the worker). Events that flux-sim applied late on purpose (a failed
//!   answer whose events land later, as Flux does) are Flux's own reordering; they move the
//!   high-water mark but are not counted against the worker, which must repair them.
//! - At the end (faults off, outbox drained, graceful stop with exit 0): for every key with an
//!   acknowledged update, Flux holds the newest acknowledged value, or a newer value whose
//!   request was cut off by a kill (it may have been made durable), or quarantine holds such a
//!   value because flux-sim rejected it as invalid. Anything else is lost.
//! - Quarantine holds only values flux-sim rejected as invalid; nothing is left pending or in
//!   the log; no record was set aside as corrupt; the store never had to be moved aside; the
//!   worker never exited by itself.
//!
//! One summary line ends the run; the exit status is 0 only when every check passed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use clap::Parser;
use flux_outbox::child::WorkerChild;
use flux_outbox::sim::{self, AppliedEvent, Faults, SimConfig, SimHandle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// Properties per entity in the workload.
const PROPS_PER_ENTITY: u32 = 8;
/// Concurrent feeders; each owns the keys `k % FEEDERS == its id`.
const FEEDERS: u32 = 3;
/// How far back a source timestamp may be drawn, in ms of workload time.
const TS_JITTER_MS_MAX: u64 = 3_000;
/// Updates sent in total, at most (bounds the tool's own memory: 16 bytes an update).
const UPDATES_MAX: u64 = 20_000_000;
/// The worker must be ready again within this after a (re)start.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The outbox must drain within this once faults are off.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(180);
/// flux-sim applies a late event at most this long after its failed answer; well inside the
/// worker's convergence window (`flush.convergence_window`), so the worker sees and repairs it.
const LATE_APPLY_DELAY_MS: u64 = 300;

#[derive(Parser, Debug)]
#[command(
    name = "torture",
    about = "Kill -9 torture of the real flux-outbox binary against a faulty flux-sim, with an oracle",
    long_about = "Runs flux-sim in-process and flux-outbox as a child, feeds a self-checking workload \
through the ingest API, SIGKILLs and restarts the worker at chosen moments while switching \
Flux faults and link outages, then drains and checks that nothing acknowledged was lost and \
nothing was rolled back. Exit status 0 only when every check passed."
)]
struct Args {
    /// Kill-and-restart rounds.
    #[arg(long, default_value_t = 20)]
    rounds: u64,
    /// Stop starting rounds after this long (e.g. `10m`), even if fewer rounds ran.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Seed for every random choice (kill moments, faults, workload, flux-sim's fault draws).
    /// The same seed makes the same choices; timing still differs between runs.
    #[arg(long)]
    seed: Option<u64>,
    /// Distinct (entity, property) keys in the workload.
    #[arg(long, default_value_t = 4_000)]
    keys: u32,
    /// The flux-outbox binary (default: `flux-outbox` beside this executable).
    #[arg(long)]
    worker: Option<PathBuf>,
    /// Keep the temporary directory (data, config, worker log) even when the run passed.
    #[arg(long)]
    keep: bool,
    /// Print one line per round.
    #[arg(long, short)]
    verbose: bool,
}

/// What the workload knows of one update.
#[derive(Clone, Copy)]
struct Sent {
    key: u32,
    ts_ms: u64,
    state: SendState,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SendState {
    /// Request under way.
    InFlight,
    /// Answered 200: durable, a promise was made.
    Acked,
    /// No 200 (killed, refused, timed out): may or may not have been made durable.
    Unknown,
}

/// The workload's truth: every update sent, and the newest acknowledged one per key.
struct Truth {
    sent: Vec<Sent>,
    /// Per key: (ts, index) of the newest acknowledged update.
    acked_max: Vec<Option<(u64, u64)>>,
    acked: u64,
    unknown: u64,
}

impl Truth {
    /// The worker's order for two updates of one key, as the tool knows it.
    fn order(&self, idx: u64) -> (u64, u64) {
        (self.sent[idx as usize].ts_ms, idx)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn entity_of(key: u32) -> String {
    let e = key / PROPS_PER_ENTITY;
    format!("torture/site-{}/e{e}", e % 7)
}

fn property_of(key: u32) -> String {
    format!("p{}", key % PROPS_PER_ENTITY)
}

fn key_of(entity: &str, property: &str) -> Option<u32> {
    let e: u32 = entity.rsplit_once("/e")?.1.parse().ok()?;
    let p: u32 = property.strip_prefix('p')?.parse().ok()?;
    (p < PROPS_PER_ENTITY && entity == entity_of(e * PROPS_PER_ENTITY))
        .then_some(e * PROPS_PER_ENTITY + p)
}

/// Problems found by the checks; any one fails the run.
#[derive(Default)]
struct Findings {
    rolled_back: u64,
    foreign_writes: u64,
    lost: u64,
    notes: Vec<String>,
}

impl Findings {
    fn note(&mut self, s: String) {
        if self.notes.len() < 30 {
            self.notes.push(s);
        }
    }
}

struct Shared {
    truth: Mutex<Truth>,
    findings: Mutex<Findings>,
    /// Feeders send while this is set.
    feeding: AtomicBool,
    /// The worker is believed up: feeders pause while it is not, so the unknown set stays small.
    worker_up: AtomicBool,
    /// Feeders send one large request each when they see this.
    burst: AtomicU64,
    requests_ok: AtomicU64,
    requests_failed: AtomicU64,
}

struct WorkerProc {
    proc: WorkerChild,
    data_dir: PathBuf,
    ingest: String,
}

impl WorkerProc {
    fn spawn(&mut self) -> Result<(), String> {
        self.proc.spawn()
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>, String> {
        self.proc.try_wait()
    }

    fn kill9(&mut self) {
        self.proc.kill9();
    }

    fn sigterm(&self) {
        self.proc.signal(libc::SIGTERM);
    }

    async fn wait_ready(&mut self, http: &reqwest::Client) -> Result<(), String> {
        self.proc.wait_ready(http, READY_TIMEOUT).await
    }

    /// Entries of the data directory other than the live store: a moved-aside store means
    /// the store failed to open after a kill, which the contract says must never happen.
    fn stray_entries(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&self.data_dir) else {
            return vec![];
        };
        rd.filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("corrupt"))
            .collect()
    }
}

async fn get_json(http: &reqwest::Client, url: &str) -> Option<Value> {
    let r = http.get(url).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    serde_json::from_slice(&r.bytes().await.ok()?).ok()
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

fn main() {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("torture: cannot start the runtime: {e}");
            std::process::exit(2);
        }
    };
    match rt.block_on(run(args)) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("torture: {e}");
            std::process::exit(2);
        }
    }
}

fn worker_exe(args: &Args) -> Result<PathBuf, String> {
    match &args.worker {
        Some(p) => Ok(p.clone()),
        None => WorkerChild::sibling_exe(),
    }
}

/// The kinds of moment a round kills the worker at.
#[derive(Clone, Copy, Debug)]
enum KillAt {
    /// Requests being ingested at a steady rate.
    Ingest,
    /// Right after large requests were sent: they are in group commit.
    GroupCommit,
    /// The link is down and a burst left a log backlog: compaction is running.
    Compaction,
    /// A slow Flux: batches are in flight.
    InFlight,
    /// SIGTERM, then SIGKILL part-way through the graceful shutdown.
    Shutdown,
}

const KILL_KINDS: [KillAt; 5] = [
    KillAt::Ingest,
    KillAt::GroupCommit,
    KillAt::Compaction,
    KillAt::InFlight,
    KillAt::Shutdown,
];

/// A random mix of Flux faults for the time between two kills.
fn random_faults(rng: &mut StdRng) -> (Faults, &'static str) {
    let mut f = Faults::default();
    let name = match rng.gen_range(0..9) {
        0 => "healthy",
        1 => {
            f.link_down = true;
            "link down"
        }
        2 => {
            f.error_500_rate = 0.3;
            f.late_apply_rate = 0.5;
            f.late_apply_delay_ms = LATE_APPLY_DELAY_MS;
            "500s, some applied late"
        }
        3 => {
            f.rate_429_rate = 0.3;
            f.rate_429_retry_after_s = 1;
            "429s"
        }
        4 => {
            f.publish_fail_rate = 0.2;
            f.late_apply_rate = 0.5;
            f.late_apply_delay_ms = LATE_APPLY_DELAY_MS;
            "publish failures, some applied late"
        }
        5 => {
            f.lost_answer_rate = 0.3;
            "applied, answer lost"
        }
        6 => {
            f.reset_rate = 0.2;
            f.hang_rate = 0.05;
            "resets and hangs"
        }
        7 => {
            f.validation_fail_rate = 0.01;
            "validation failures"
        }
        _ => {
            f.latency_ms = rng.gen_range(20..200);
            f.error_500_rate = 0.1;
            f.lost_answer_rate = 0.1;
            "slow, 500s, lost answers"
        }
    };
    (f, name)
}

async fn run(args: Args) -> Result<bool, String> {
    let started = Instant::now();
    let seed = args.seed.unwrap_or_else(rand::random);
    let keys = args.keys.max(FEEDERS * PROPS_PER_ENTITY);
    let exe = worker_exe(&args)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::Builder::new()
        .prefix("flux-outbox-torture-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary directory: {e}"))?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot bind flux-sim: {e}"))?;
    let flux = sim::start(
        SimConfig {
            seed,
            log_capacity: 1_000_000,
            ..SimConfig::default()
        },
        listener,
    )
    .await
    .map_err(|e| format!("cannot start flux-sim: {e}"))?;

    let data_dir = dir.path().join("data");
    let ingest_port = free_port()?;
    let admin_port = free_port()?;
    let config = dir.path().join("flux-outbox.toml");
    // Short timers so that many rounds fit in a run; batch bounds small enough that several
    // batches are in flight at once.
    let toml = format!(
        "data_dir = {data:?}\ngateway_id = \"torture\"\n\
         [ingest]\nlisten = \"127.0.0.1:{ingest_port}\"\n\
         [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\
         [flux]\nurl = {url:?}\nrequest_timeout = \"2s\"\nconnect_timeout = \"1s\"\nread_timeout = \"2s\"\n\
         [flush]\ninterval = \"100ms\"\nbatch_events_max = 50\nin_flight_max = 2\n\
         backoff_initial = \"50ms\"\nbackoff_max = \"500ms\"\nfinal_flush_timeout = \"2s\"\n",
        data = data_dir.display().to_string(),
        url = flux.url(),
    );
    std::fs::write(&config, toml).map_err(|e| format!("cannot write {}: {e}", config.display()))?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let mut worker = WorkerProc {
        proc: WorkerChild::new(
            &exe,
            &config,
            &dir.path().join("worker.log"),
            format!("http://127.0.0.1:{admin_port}"),
            "info",
        ),
        data_dir,
        ingest: format!("http://127.0.0.1:{ingest_port}"),
    };

    let shared = Arc::new(Shared {
        truth: Mutex::new(Truth {
            sent: Vec::new(),
            acked_max: vec![None; keys as usize],
            acked: 0,
            unknown: 0,
        }),
        findings: Mutex::new(Findings::default()),
        feeding: AtomicBool::new(true),
        worker_up: AtomicBool::new(false),
        burst: AtomicU64::new(0),
        requests_ok: AtomicU64::new(0),
        requests_failed: AtomicU64::new(0),
    });

    println!(
        "torture: seed {seed}, {} rounds{}, {keys} keys, worker {}, dir {}",
        args.rounds,
        args.duration
            .map(|d| format!(" (at most {})", humantime::format_duration(d)))
            .unwrap_or_default(),
        worker.proc.exe.display(),
        dir.path().display()
    );

    worker.spawn()?;
    worker.wait_ready(&http).await?;
    shared.worker_up.store(true, Ordering::SeqCst);

    let checker_stop = Arc::new(AtomicBool::new(false));
    let checker = tokio::spawn(check_applied(
        flux.clone(),
        shared.clone(),
        checker_stop.clone(),
    ));
    let base_ts = flux_outbox::model::now_ms() - 86_400_000;
    let mut feeders = Vec::new();
    for f in 0..FEEDERS {
        feeders.push(tokio::spawn(feed(
            http.clone(),
            worker.ingest.clone(),
            shared.clone(),
            f,
            keys,
            base_ts,
            seed.wrapping_add(u64::from(f) + 1),
        )));
    }

    let mut result: Result<(), String> = Ok(());
    let mut kills = 0u64;
    let mut by_kind: HashMap<&'static str, u64> = HashMap::new();
    let mut rounds_done = 0u64;
    for round in 0..args.rounds {
        if args.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        let (faults, fault_name) = random_faults(&mut rng);
        flux.set_faults(faults);
        let kind = KILL_KINDS[rng.gen_range(0..KILL_KINDS.len())];
        let r = kill_round(&mut worker, &http, &flux, &shared, &mut rng, kind).await;
        if let Err(e) = r {
            result = Err(format!("round {round} ({kind:?}, {fault_name}): {e}"));
            break;
        }
        kills += 1;
        *by_kind.entry(kind_name(kind)).or_default() += 1;
        rounds_done += 1;
        let stray = worker.stray_entries();
        if !stray.is_empty() {
            result = Err(format!(
                "round {round}: the store failed to open after the kill and was moved aside: {stray:?}"
            ));
            break;
        }
        if args.verbose {
            let t = lock(&shared.truth);
            println!(
                "round {round:>4}: killed during {:<12} faults: {fault_name:<36} acked {:>8} unknown {:>6}",
                kind_name(kind),
                t.acked,
                t.unknown
            );
        }
    }

    // Stop the workload, heal Flux, let the worker drain and stop it gracefully.
    shared.feeding.store(false, Ordering::SeqCst);
    for f in feeders {
        let _ = f.await;
    }
    flux.set_faults(Faults::default());
    let mut drained = false;
    let mut final_summary = Value::Null;
    if result.is_ok() {
        match drain(&mut worker, &http, &flux).await {
            Ok(s) => {
                drained = true;
                final_summary = s;
            }
            Err(e) => result = Err(e),
        }
    }
    let quarantine = if result.is_ok() {
        get_json(
            &http,
            &format!("{}/v1/outbox/quarantine?limit=1000000", worker.proc.admin),
        )
        .await
        .unwrap_or(Value::Null)
    } else {
        Value::Null
    };
    if result.is_ok() {
        worker.sigterm();
        let t0 = Instant::now();
        loop {
            match worker.try_wait()? {
                Some(s) if s.success() => break,
                Some(s) => {
                    result = Err(format!("the worker's graceful stop exited with {s}"));
                    break;
                }
                None if t0.elapsed() > Duration::from_secs(30) => {
                    result = Err("the worker did not stop within 30 s of SIGTERM".into());
                    break;
                }
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
    worker.kill9();
    checker_stop.store(true, Ordering::SeqCst);
    let _ = checker.await;
    // Read what was applied after the checker's last pass.
    check_applied_once(&flux, &shared, &mut u64::MAX.clone());

    let mut quarantined = 0u64;
    if result.is_ok() {
        quarantined = final_check(&flux, &shared, &quarantine, &final_summary);
        // The store the worker left behind opens cleanly and passes the fsck.
        match flux_outbox::store::Store::open(&worker.data_dir, Default::default()) {
            Ok((store, report)) => {
                let v = store.verify();
                let mut f = lock(&shared.findings);
                if report.moved_aside_to.is_some() || report.open_error.is_some() {
                    f.note(format!("the final store did not open cleanly: {report:?}"));
                }
                for p in v.problems.iter().take(10) {
                    f.note(format!("verify: {p}"));
                }
                let _ = store.close();
            }
            Err(e) => lock(&shared.findings).note(format!("the final store does not open: {e}")),
        }
    }

    let t = lock(&shared.truth);
    let f = lock(&shared.findings);
    let stats = flux.stats();
    let passed = result.is_ok()
        && drained
        && f.lost == 0
        && f.rolled_back == 0
        && f.foreign_writes == 0
        && f.notes.is_empty();
    for n in &f.notes {
        println!("problem: {n}");
    }
    if let Err(e) = &result {
        println!("problem: {e}");
    }
    let mut kinds: Vec<_> = by_kind.into_iter().collect();
    kinds.sort();
    println!(
        "kills by moment: {}",
        kinds
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "flux-sim: {} events applied ({} late), {} rejected as invalid, {} publish failures, {} 500s, {} 429s, {} resets, {} hangs, {} answers lost, {} link-down refusals",
        stats.events_applied,
        stats.events_applied_late,
        stats.events_validation_failed,
        stats.events_publish_failed,
        stats.fault_500,
        stats.fault_429,
        stats.fault_reset,
        stats.fault_hang,
        stats.fault_lost_answer,
        stats.fault_link_down,
    );
    println!(
        "torture: {} rounds={rounds_done} kills={kills} acknowledged={} unknown={} requests={} lost={} rolled_back={} foreign_writes={} quarantined={quarantined} keys={keys} seed={seed} elapsed={:.1}s",
        if passed { "PASS" } else { "FAIL" },
        t.acked,
        t.unknown,
        shared.requests_ok.load(Ordering::Relaxed) + shared.requests_failed.load(Ordering::Relaxed),
        f.lost,
        f.rolled_back,
        f.foreign_writes,
        started.elapsed().as_secs_f64()
    );
    if !passed || args.keep {
        let kept = dir.keep();
        println!("kept {} (config, data, worker.log)", kept.display());
    }
    Ok(passed)
}

fn kind_name(k: KillAt) -> &'static str {
    match k {
        KillAt::Ingest => "ingest",
        KillAt::GroupCommit => "group-commit",
        KillAt::Compaction => "compaction",
        KillAt::InFlight => "in-flight",
        KillAt::Shutdown => "shutdown",
    }
}

/// One round: bring about the moment, SIGKILL, restart, wait until ready.
async fn kill_round(
    worker: &mut WorkerProc,
    http: &reqwest::Client,
    flux: &SimHandle,
    shared: &Shared,
    rng: &mut StdRng,
    kind: KillAt,
) -> Result<(), String> {
    // Let the workload (and the faults of this round) run a little first.
    tokio::time::sleep(Duration::from_millis(rng.gen_range(100..1_200))).await;
    match kind {
        KillAt::Ingest => {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..300))).await;
        }
        KillAt::GroupCommit => {
            shared.burst.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(rng.gen_range(1..40))).await;
        }
        KillAt::Compaction => {
            let mut f = flux.faults();
            f.link_down = true;
            flux.set_faults(f);
            shared.burst.fetch_add(1, Ordering::SeqCst);
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(2) {
                let s = get_json(http, &format!("{}/v1/outbox/summary", worker.proc.admin)).await;
                if s.and_then(|s| s["log_backlog"].as_u64()).unwrap_or(0) > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        KillAt::InFlight => {
            let mut f = flux.faults();
            f.link_down = false;
            f.latency_ms = f.latency_ms.max(rng.gen_range(100..400));
            flux.set_faults(f);
            let before = flux.stats().requests_batch;
            let t0 = Instant::now();
            while flux.stats().requests_batch == before && t0.elapsed() < Duration::from_secs(3) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..100))).await;
        }
        KillAt::Shutdown => {
            worker.sigterm();
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..300))).await;
        }
    }
    if let Some(s) = worker.try_wait()? {
        // Only a graceful stop we asked for may end the process before the kill.
        if !matches!(kind, KillAt::Shutdown) || !s.success() {
            return Err(format!(
                "the worker exited by itself ({s}); see {}",
                worker.proc.log.display()
            ));
        }
    }
    shared.worker_up.store(false, Ordering::SeqCst);
    worker.kill9();
    worker.spawn()?;
    worker.wait_ready(http).await?;
    shared.worker_up.store(true, Ordering::SeqCst);
    Ok(())
}

/// Waits until nothing is pending, in the log or in flight, and every late application
/// flux-sim scheduled has landed and been repaired. Returns the last summary.
async fn drain(
    worker: &mut WorkerProc,
    http: &reqwest::Client,
    flux: &SimHandle,
) -> Result<Value, String> {
    let t0 = Instant::now();
    let mut quiet_since: Option<Instant> = None;
    while t0.elapsed() < DRAIN_TIMEOUT {
        if let Some(s) = worker.try_wait()? {
            return Err(format!(
                "the worker exited by itself while draining ({s}); see {}",
                worker.proc.log.display()
            ));
        }
        let s = get_json(http, &format!("{}/v1/outbox/summary", worker.proc.admin)).await;
        let st = flux.stats();
        let empty = s.as_ref().is_some_and(|s| {
            s["pending_keys"].as_u64() == Some(0)
                && s["log_backlog"].as_u64() == Some(0)
                && s["in_flight_entities"].as_u64().unwrap_or(0) == 0
        }) && st.events_applied_late >= st.events_late_scheduled;
        if empty {
            // Stay empty for a while: read-backs after unknown outcomes may still re-send.
            let q = *quiet_since.get_or_insert_with(Instant::now);
            if q.elapsed() > Duration::from_secs(3) {
                return Ok(s.unwrap_or(Value::Null));
            }
        } else {
            quiet_since = None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "the outbox did not drain within {DRAIN_TIMEOUT:?} after faults stopped"
    ))
}

/// One feeder: sequential NDJSON requests over its own keys, out-of-order timestamps, bursts.
async fn feed(
    http: reqwest::Client,
    ingest: String,
    shared: Arc<Shared>,
    id: u32,
    keys: u32,
    base_ts: u64,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let my_keys: Vec<u32> = (0..keys).filter(|k| k % FEEDERS == id).collect();
    let mut bursts_seen = shared.burst.load(Ordering::SeqCst);
    let url = format!("{ingest}/v1/updates");
    while shared.feeding.load(Ordering::SeqCst) {
        if !shared.worker_up.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let burst_now = shared.burst.load(Ordering::SeqCst);
        let n = if burst_now != bursts_seen {
            bursts_seen = burst_now;
            rng.gen_range(2_000..6_000)
        } else {
            rng.gen_range(1..120)
        };
        // A hot set: part of the time, a request hammers a few keys many times over.
        let hot = rng.gen_bool(0.2);
        let Some((first, body)) = prepare(&shared, &mut rng, &my_keys, n, hot, base_ts) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let r = http
            .post(&url)
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await;
        let status = r.as_ref().map(|r| r.status().as_u16()).ok();
        let ok = status == Some(200);
        if let Some(s) = status {
            if !ok && s != 503 && s != 507 {
                let text = match r {
                    Ok(r) => r.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                lock(&shared.findings).note(format!(
                    "ingest answered {s} to a valid request: {}",
                    text.chars().take(300).collect::<String>()
                ));
            }
        }
        {
            let mut t = lock(&shared.truth);
            for idx in first..first + n as u64 {
                let s = t.sent[idx as usize];
                if ok {
                    t.sent[idx as usize].state = SendState::Acked;
                    let slot = &mut t.acked_max[s.key as usize];
                    if slot.is_none_or(|m| (s.ts_ms, idx) > m) {
                        *slot = Some((s.ts_ms, idx));
                    }
                } else {
                    t.sent[idx as usize].state = SendState::Unknown;
                }
            }
            if ok {
                t.acked += n as u64;
            } else {
                t.unknown += n as u64;
            }
        }
        if ok {
            shared.requests_ok.fetch_add(1, Ordering::Relaxed);
        } else {
            shared.requests_failed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..15))).await;
    }
}

/// Records `n` new updates in the truth and renders them as NDJSON; None at [`UPDATES_MAX`].
fn prepare(
    shared: &Shared,
    rng: &mut StdRng,
    my_keys: &[u32],
    n: usize,
    hot: bool,
    base_ts: u64,
) -> Option<(u64, String)> {
    let mut body = String::with_capacity(n * 80);
    let mut t = lock(&shared.truth);
    if t.sent.len() as u64 + n as u64 > UPDATES_MAX {
        return None;
    }
    let first = t.sent.len() as u64;
    for i in 0..n as u64 {
        let idx = first + i;
        let key = if hot {
            my_keys[rng.gen_range(0..my_keys.len().min(8))]
        } else {
            my_keys[rng.gen_range(0..my_keys.len())]
        };
        // Workload time advances with the index; each update's source time is drawn up to
        // TS_JITTER_MS_MAX behind it, so updates of one key arrive out of order.
        let ts_ms = base_ts + idx / 4 + TS_JITTER_MS_MAX - rng.gen_range(0..TS_JITTER_MS_MAX);
        t.sent.push(Sent {
            key,
            ts_ms,
            state: SendState::InFlight,
        });
        body.push_str(&format!(
            "{{\"entity\":\"{}\",\"properties\":{{\"{}\":{idx}}},\"ts\":{ts_ms}}}\n",
            entity_of(key),
            property_of(key)
        ));
    }
    Some((first, body))
}

/// Reads flux-sim's applied log as it grows and checks every applied event.
async fn check_applied(flux: SimHandle, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    let mut cursor = 0u64;
    while !stop.load(Ordering::SeqCst) {
        check_applied_once(&flux, &shared, &mut cursor);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check_applied_once(&flux, &shared, &mut cursor);
}

thread_local! {
    /// Per key: the (ts, index) order of the newest value applied so far.
    static APPLIED_MAX: std::cell::RefCell<HashMap<u32, (u64, u64)>> = Default::default();
}

fn check_applied_once(flux: &SimHandle, shared: &Shared, cursor: &mut u64) {
    if *cursor == u64::MAX {
        return; // the final call after the checker stopped: it already read everything
    }
    let events: Vec<AppliedEvent> = flux.applied_since(*cursor);
    if events.is_empty() {
        return;
    }
    if events[0].index != *cursor {
        lock(&shared.findings).note(format!(
            "flux-sim's applied log dropped events {}..{} before they were checked",
            *cursor, events[0].index
        ));
    }
    let truth = lock(&shared.truth);
    let mut findings = lock(&shared.findings);
    APPLIED_MAX.with(|m| {
        let mut max = m.borrow_mut();
        for ev in &events {
            *cursor = ev.index + 1;
            let Some(entity) = &ev.entity_id else {
                findings.foreign_writes += 1;
                findings.note(format!("event {} has no entity id", ev.event_id));
                continue;
            };
            let Some(props) = ev.properties.as_object() else {
                findings.foreign_writes += 1;
                findings.note(format!("event {} has no properties object", ev.event_id));
                continue;
            };
            for (name, value) in props {
                let key = key_of(entity, name);
                let idx = value.as_u64();
                let ok = match (key, idx) {
                    (Some(k), Some(i)) => {
                        (i as usize) < truth.sent.len() && truth.sent[i as usize].key == k
                    }
                    _ => false,
                };
                let (Some(k), Some(i), true) = (key, idx, ok) else {
                    findings.foreign_writes += 1;
                    findings.note(format!(
                        "event {} wrote {entity} {name} = {value}: not a value sent for that key",
                        ev.event_id
                    ));
                    continue;
                };
                let order = truth.order(i);
                let prev = max.get(&k).copied();
                if let Some(p) = prev {
                    if order < p && !ev.late {
                        findings.rolled_back += 1;
                        findings.note(format!(
                            "rollback: event {} (applied #{}) wrote {entity} {name} = update {i} (ts {}), older than update {} (ts {}) applied before",
                            ev.event_id, ev.index, order.0, p.1, p.0
                        ));
                    }
                }
                if prev.is_none_or(|p| order > p) {
                    max.insert(k, order);
                }
            }
        }
    });
}

/// Flux against the truth, key by key, and quarantine against what flux-sim rejected.
/// Returns the number of quarantined keys.
fn final_check(flux: &SimHandle, shared: &Shared, quarantine: &Value, summary: &Value) -> u64 {
    let truth = lock(&shared.truth);
    let mut f = lock(&shared.findings);
    let state = flux.entities();

    // Quarantine: only values flux-sim rejected as invalid, each a value sent for its key.
    let mut quarantined: HashMap<u32, u64> = HashMap::new();
    let rows = quarantine.as_array().cloned().unwrap_or_default();
    if quarantine.is_null() {
        f.note("could not read the quarantine listing".into());
    }
    for r in &rows {
        let entity = r["entity"].as_str().unwrap_or_default();
        let prop = r["property"].as_str().unwrap_or_default();
        let reason = r["reason"].as_str().unwrap_or_default();
        let idx = r["value"].as_u64();
        let key = key_of(entity, prop);
        match (key, idx) {
            (Some(k), Some(i))
                if (i as usize) < truth.sent.len() && truth.sent[i as usize].key == k =>
            {
                quarantined.insert(k, i);
            }
            _ => f.note(format!(
                "quarantine holds {entity} {prop} = {}: not a value sent for that key",
                r["value"]
            )),
        }
        if !reason.contains("simulated validation failure") {
            f.note(format!(
                "quarantine holds {entity} {prop} for a reason flux-sim never gave: {reason}"
            ));
        }
    }
    // A rejected event carries one entity (and up to PROPS_PER_ENTITY of its keys).
    let entities: std::collections::HashSet<&str> =
        rows.iter().filter_map(|r| r["entity"].as_str()).collect();
    if entities.len() as u64 > flux.stats().events_validation_failed {
        f.note(format!(
            "quarantine holds {} entities but flux-sim rejected only {} events as invalid",
            entities.len(),
            flux.stats().events_validation_failed
        ));
    }
    for (name, want) in [
        ("pending_keys", 0),
        ("log_backlog", 0),
        ("corrupt_set_aside", 0),
    ] {
        if summary[name].as_u64() != Some(want) {
            f.note(format!(
                "final summary: {name} = {}, expected {want}",
                summary[name]
            ));
        }
    }

    // Every key with an acknowledged update.
    let mut lost = 0u64;
    for (k, slot) in truth.acked_max.iter().enumerate() {
        let Some(acked) = *slot else { continue };
        let k = k as u32;
        let have = state
            .get(&entity_of(k))
            .and_then(|p| p.get(&property_of(k)))
            .and_then(Value::as_u64);
        let newer_unknown = |i: u64| {
            (i as usize) < truth.sent.len()
                && truth.sent[i as usize].key == k
                && (i == acked.1
                    || (truth.order(i) > acked
                        && truth.sent[i as usize].state == SendState::Unknown))
        };
        if have.is_some_and(newer_unknown) {
            continue;
        }
        if quarantined.get(&k).is_some_and(|&i| newer_unknown(i)) {
            continue;
        }
        lost += 1;
        if lost <= 5 {
            history(flux, &truth, &mut f, k);
        }
        f.note(format!(
            "lost: {} {}: Flux holds {:?}, newest acknowledged is update {} (ts {})",
            entity_of(k),
            property_of(k),
            have,
            acked.1,
            acked.0
        ));
    }
    f.lost = lost;
    rows.len() as u64
}

/// Notes the applied history of one key (for a lost key: how Flux came to hold what it holds).
fn history(flux: &SimHandle, truth: &Truth, f: &mut Findings, k: u32) {
    let (entity, prop) = (entity_of(k), property_of(k));
    let mut lines = Vec::new();
    for ev in flux.applied_log() {
        if ev.entity_id.as_deref() != Some(entity.as_str()) {
            continue;
        }
        if let Some(i) = ev.properties.get(&prop).and_then(Value::as_u64) {
            let s = truth.sent.get(i as usize);
            lines.push(format!(
                "#{} update {i} ts {} {:?}{}",
                ev.index,
                s.map_or(0, |s| s.ts_ms),
                s.map(|s| s.state),
                if ev.late { " LATE" } else { "" }
            ));
        }
    }
    let tail = lines.len().saturating_sub(8);
    f.note(format!(
        "history of {entity} {prop}: {}",
        lines[tail..].join("; ")
    ));
}
