//! systemd service notifications (`sd_notify`): `READY=1` once the store is open and the
//! listeners are bound, `WATCHDOG=1` only while the worker is demonstrably alive, `STATUS=` for
//! `systemctl status`, and `STOPPING=1` when a graceful shutdown starts.
//!
//! Everything here is a no-op when `NOTIFY_SOCKET` is unset (run by hand, in tests, under
//! another supervisor), so it is always wired in.
//!
//! ## What "alive" means
//!
//! A watchdog that a timer task pings unconditionally only proves the tokio runtime still runs.
//! The failures that matter on a gateway that runs for years are a flush loop stuck forever
//! (nothing delivered again until someone restarts it) and a store path stuck forever (a writer
//! or lock that never comes back; ingest hangs). So the ping task sends `WATCHDOG=1` every
//! half `WATCHDOG_USEC` (the *period*) only when all three hold:
//!
//! 1. the store's write path is not wedged: the group-commit writer thread is idle, or has been
//!    on its current commit group (gather, apply, `flush()`, fdatasync, answer) for at most one
//!    period ([`Store::writer_busy_for`], an atomic stamp the writer sets per group: no extra
//!    I/O on the hot path). A read cannot see this: the writer fsyncs without the state lock,
//!    so reads keep answering while every ingest request hangs behind a stuck fsync;
//! 2. a cheap store read (`Store::stats`, which takes the store's state lock and reads the
//!    sled tree) returns within half a period;
//! 3. the flush loop has beaten ([`flush_loop_beat`]) within [`flush_stale_after`] — skipped in
//!    offline mode, where there is no flush loop.
//!
//! When any fails the ping is withheld, `STATUS=` says why (`UNHEALTHY, watchdog ping withheld:
//! ...`), and systemd kills and restarts the worker once `WatchdogSec` passes without a ping. With
//! `WatchdogSec=60s` a commit stuck for more than 30 s is a restart within about 90 s.
//! Acknowledged updates are on disk, so a restart loses nothing; the flush loop and store are
//! rebuilt from scratch.
//!
//! The ping task reaches the store and systemd through two small traits ([`StoreProbe`],
//! [`Notifier`]), so its tests drive it with a real store whose writer they wedge
//! ([`Store::hold_writer_gate_for_tests`]) or with a probe that hangs, and record what would
//! have been sent.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio::sync::watch;

use crate::app::Running;
use crate::config::Config;
use crate::metrics::LinkState;
use crate::store::{Stats, Store};

/// Heartbeats of the worker's loops, as monotonic milliseconds since `anchor` (0 = never).
pub struct Liveness {
    anchor: Instant,
    flush_loop_ms: AtomicU64,
}

impl Default for Liveness {
    fn default() -> Self {
        Self::new()
    }
}

impl Liveness {
    pub fn new() -> Self {
        Liveness {
            anchor: Instant::now(),
            flush_loop_ms: AtomicU64::new(0),
        }
    }

    /// The process-wide instance the flusher beats and the watchdog reads. A global keeps the
    /// flusher's side to one line; there is one worker per process in production.
    pub fn global() -> &'static Liveness {
        static GLOBAL: LazyLock<Liveness> = LazyLock::new(Liveness::new);
        &GLOBAL
    }

    fn now_ms(&self) -> u64 {
        // +1 so a beat in the very first millisecond is not mistaken for "never".
        self.anchor.elapsed().as_millis() as u64 + 1
    }

    /// Records that the flush loop went round (cheap: one relaxed store).
    pub fn flush_loop_beat(&self) {
        self.flush_loop_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Time since the last flush-loop beat, or `None` if it never beat.
    pub fn flush_loop_age(&self) -> Option<Duration> {
        match self.flush_loop_ms.load(Ordering::Relaxed) {
            0 => None,
            t => Some(Duration::from_millis(self.now_ms().saturating_sub(t))),
        }
    }
}

/// Called by the flush loop on every round (and every batch round inside a drain).
pub fn flush_loop_beat() {
    Liveness::global().flush_loop_beat();
}

/// How long the flush loop may legitimately stay silent: a backoff or rate-limit sleep (the
/// flusher caps those at `max(backoff_max, 60s)`) plus one batch round of a drain (the entity
/// reads of read-merge-write, `read_concurrency` at a time, then the batch write), each request
/// bounded by `connect_timeout + request_timeout`. At least five minutes: a slow but alive
/// link must never cause restart loops; a loop that is truly stuck is stuck forever, so a few
/// minutes more before the restart cost little.
pub fn flush_stale_after(cfg: &Config) -> Duration {
    let sleep = cfg.flush.backoff_max.max(Duration::from_secs(60));
    let request = cfg.flux.connect_timeout + cfg.flux.request_timeout;
    let read_rounds = cfg
        .flush
        .batch_events_max
        .div_ceil(cfg.flush.read_concurrency.max(1)) as u32;
    let round = request.saturating_mul(read_rounds.saturating_add(1));
    (sleep + round).max(Duration::from_secs(300))
}

/// Why a watchdog ping was withheld (also shown as `STATUS=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unhealthy {
    FlushLoopSilent(Duration),
    /// The store's writer thread has been on one commit group this long (ingest hangs).
    StoreWriterStuck(Duration),
    StoreProbeTimedOut,
    StoreProbeFailed(String),
}

impl std::fmt::Display for Unhealthy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unhealthy::FlushLoopSilent(d) => {
                write!(f, "flush loop silent for {}s", d.as_secs())
            }
            Unhealthy::StoreWriterStuck(d) => write!(
                f,
                "store writer stuck on one commit for {}ms (ingest hangs)",
                d.as_millis()
            ),
            Unhealthy::StoreProbeTimedOut => write!(f, "store probe did not return in time"),
            Unhealthy::StoreProbeFailed(e) => write!(f, "store probe failed: {e}"),
        }
    }
}

/// What one tick observed, the input of [`verdict`].
#[derive(Debug, Clone)]
pub struct Observation {
    /// Time since the flush loop's last beat; `None` in offline mode (no flush loop to watch).
    pub flush_age: Option<Duration>,
    pub flush_stale_after: Duration,
    /// [`Store::writer_busy_for`]: `None` while the writer is idle.
    pub writer_busy: Option<Duration>,
    pub writer_stuck_after: Duration,
    /// The store read probe's answer.
    pub probe: Result<Stats, Unhealthy>,
}

/// The ping decision, separate from the I/O so it can be tested. Store problems are reported
/// first: they also explain a silent flush loop, not the other way round.
pub fn verdict(o: &Observation) -> Result<(), Unhealthy> {
    if let Some(busy) = o.writer_busy {
        if busy > o.writer_stuck_after {
            return Err(Unhealthy::StoreWriterStuck(busy));
        }
    }
    o.probe.as_ref().map_err(Clone::clone)?;
    if let Some(age) = o.flush_age {
        if age > o.flush_stale_after {
            return Err(Unhealthy::FlushLoopSilent(age));
        }
    }
    Ok(())
}

/// What the ping task asks the store ([`Store`] in production).
pub trait StoreProbe: Clone + Send + Sync + 'static {
    /// A cheap read through the store's lock and tree. May block (run on a blocking thread).
    fn stats(&self) -> Stats;
    /// How long the writer has been on its current commit group; must not block.
    fn writer_busy_for(&self) -> Option<Duration>;
}

impl StoreProbe for Store {
    fn stats(&self) -> Stats {
        Store::stats(self)
    }
    fn writer_busy_for(&self) -> Option<Duration> {
        Store::writer_busy_for(self)
    }
}

/// What one tick sends: `WATCHDOG=1` or not, and a `STATUS=` line when it changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notification {
    pub watchdog: bool,
    pub status: Option<String>,
}

/// Where the ping task's notifications go (systemd's socket in production). Called once per
/// tick, also when there is nothing to send.
pub trait Notifier: Send + Sync + 'static {
    fn notify(&self, n: &Notification);
}

/// The production [`Notifier`]: one datagram to `NOTIFY_SOCKET`, none when there is nothing to say.
struct Systemd;

impl Notifier for Systemd {
    fn notify(&self, n: &Notification) {
        let mut states = Vec::with_capacity(2);
        if n.watchdog {
            states.push(NotifyState::Watchdog);
        }
        if let Some(s) = &n.status {
            states.push(NotifyState::Status(s));
        }
        if !states.is_empty() {
            send(&states);
        }
    }
}

/// One-line service status for `systemctl status`.
pub fn status_line(stats: &Stats, link: LinkState) -> String {
    let mut s = format!(
        "{} pending keys, link {}",
        stats.pending_keys,
        link.as_str()
    );
    if stats.quarantine_keys > 0 {
        s.push_str(&format!(", {} quarantined", stats.quarantine_keys));
    }
    s
}

/// The systemd side of one worker process. Cheap to clone.
#[derive(Clone)]
pub struct Watchdog {
    flush_stale_after: Duration,
    /// Whether a flush loop runs (a Flux URL is configured); offline mode skips condition 1.
    flusher_expected: bool,
    stop: Arc<watch::Sender<bool>>,
    stopping_sent: Arc<AtomicBool>,
}

impl Watchdog {
    pub fn new(cfg: &Config) -> Self {
        let (stop, _) = watch::channel(false);
        Watchdog {
            flush_stale_after: flush_stale_after(cfg),
            flusher_expected: cfg.flux.url.is_some(),
            stop: Arc::new(stop),
            stopping_sent: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The `on_ready` hook: sends `READY=1` and starts the ping/status task. Call it from inside
    /// the tokio runtime (`app::run` does).
    pub fn ready(&self, r: &Running) {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return;
        }
        let status = status_line(&r.store.stats(), r.metrics.link());
        send(&[NotifyState::Ready, NotifyState::Status(&status)]);
        // Only the parent's WATCHDOG_USEC counts (WATCHDOG_PID is checked by the crate), so a
        // child that inherited the variables never pings for us.
        let watchdog = sd_notify::watchdog_enabled();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("no tokio runtime: systemd watchdog and status updates disabled");
            return;
        };
        let metrics = r.metrics.clone();
        let task = PingTask {
            probe: r.store.clone(),
            notifier: Systemd,
            link: Box::new(move || metrics.link()),
            liveness: Liveness::global(),
            flusher_expected: self.flusher_expected,
            flush_stale_after: self.flush_stale_after,
            started: Instant::now(),
        };
        match watchdog {
            Some(usec) => tracing::info!(
                watchdog_ms = usec.as_millis() as u64,
                flush_stale_after_s = self.flush_stale_after.as_secs(),
                "systemd watchdog enabled"
            ),
            None => tracing::debug!("systemd watchdog not enabled; sending status only"),
        }
        rt.spawn(task.run(watchdog, self.stop.subscribe()));
    }

    /// Resolves when `shutdown` does, after sending `STOPPING=1`. Wrap the shutdown future
    /// passed to `app::run` with it, so systemd knows the stop is deliberate and in progress.
    pub fn stop_on<F: Future<Output = ()>>(&self, shutdown: F) -> impl Future<Output = ()> {
        let me = self.clone();
        async move {
            shutdown.await;
            me.stopping();
        }
    }

    /// Sends `STOPPING=1` (once) and ends the ping task: past this point the final flush may
    /// legitimately stop the flush loop, and `TimeoutStopSec` bounds the stop instead.
    pub fn stopping(&self) {
        let _ = self.stop.send(true);
        if self.stopping_sent.swap(true, Ordering::SeqCst) {
            return;
        }
        send(&[
            NotifyState::Stopping,
            NotifyState::Status("shutting down: finishing requests, final flush"),
        ]);
    }
}

struct PingTask<P: StoreProbe, N: Notifier> {
    probe: P,
    notifier: N,
    link: Box<dyn Fn() -> LinkState + Send + Sync>,
    liveness: &'static Liveness,
    flusher_expected: bool,
    flush_stale_after: Duration,
    started: Instant,
}

/// Period of `STATUS=` updates when systemd enables no watchdog.
const STATUS_PERIOD: Duration = Duration::from_secs(10);

impl<P: StoreProbe, N: Notifier> PingTask<P, N> {
    async fn run(self, watchdog: Option<Duration>, mut stop: watch::Receiver<bool>) {
        // sd_watchdog_enabled(3) advises pinging at half the interval.
        let period = watchdog.map(|w| w / 2).unwrap_or(STATUS_PERIOD);
        let probe_timeout = period / 2;
        // A commit group busy for longer than a whole period is wedged: no legitimate commit
        // (one batch, one flush, one fdatasync) comes near it with WatchdogSec=60s.
        let writer_stuck_after = period;
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A probe that timed out is waited for again on the next tick instead of starting
        // another: a wedged store must not pile up blocked threads, one per tick.
        let mut probe: Option<tokio::task::JoinHandle<Stats>> = None;
        let mut last_status = String::new();
        let mut was_healthy = true;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let mut handle = match probe.take() {
                Some(h) => h,
                None => {
                    let s = self.probe.clone();
                    tokio::task::spawn_blocking(move || s.stats())
                }
            };
            let result = match tokio::time::timeout(probe_timeout, &mut handle).await {
                Ok(Ok(stats)) => Ok(stats),
                Ok(Err(e)) => Err(Unhealthy::StoreProbeFailed(e.to_string())),
                Err(_) => {
                    probe = Some(handle);
                    Err(Unhealthy::StoreProbeTimedOut)
                }
            };
            if *stop.borrow() {
                return;
            }
            let flush_age = self.flusher_expected.then(|| {
                // Before the first beat, count from the watchdog's start (grace for startup).
                self.liveness
                    .flush_loop_age()
                    .unwrap_or_else(|| self.started.elapsed())
            });
            let observed = Observation {
                flush_age,
                flush_stale_after: self.flush_stale_after,
                writer_busy: self.probe.writer_busy_for(),
                writer_stuck_after,
                probe: result,
            };
            let verdict = verdict(&observed);
            let status = match (&verdict, &observed.probe) {
                (Ok(()), Ok(stats)) => status_line(stats, (self.link)()),
                (Err(why), _) => format!("UNHEALTHY, watchdog ping withheld: {why}"),
                (Ok(()), Err(why)) => format!("UNHEALTHY: {why}"),
            };
            match &verdict {
                Ok(()) if !was_healthy => tracing::info!("watchdog: healthy again"),
                Err(why) if was_healthy => tracing::error!(
                    reason = %why,
                    "watchdog: worker looks wedged; withholding the systemd watchdog ping \
                     (systemd restarts the worker if this lasts WatchdogSec)"
                ),
                _ => {}
            }
            was_healthy = verdict.is_ok();
            // Status only when it changed: the journal of a years-long run stays readable.
            let n = Notification {
                watchdog: verdict.is_ok() && watchdog.is_some(),
                status: (status != last_status).then(|| status.clone()),
            };
            self.notifier.notify(&n);
            last_status = status;
        }
    }
}

/// Tells systemd that start-up is still under way (the store cannot be opened yet, e.g. the disk
/// is full) so it does not kill and restart the worker for taking long: `EXTEND_TIMEOUT_USEC`
/// plus the reason as STATUS. A no-op without `NOTIFY_SOCKET`.
pub fn still_starting(extend: Duration, why: &str) {
    let usec = u32::try_from(extend.as_micros()).unwrap_or(u32::MAX);
    send(&[
        NotifyState::ExtendTimeoutUsec(usec),
        NotifyState::Status(&format!("starting: {why}")),
    ]);
}

/// Sends one datagram to systemd; failures are logged, never fatal (the worker is more useful
/// running unsupervised than not running).
fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use crate::model::{Update, UpdateOp};
    use crate::store::StoreOptions;

    fn stats() -> Stats {
        Stats {
            pending_keys: 7,
            ..Stats::default()
        }
    }

    fn observation() -> Observation {
        Observation {
            flush_age: Some(Duration::from_secs(1)),
            flush_stale_after: Duration::from_secs(300),
            writer_busy: None,
            writer_stuck_after: Duration::from_secs(30),
            probe: Ok(stats()),
        }
    }

    #[test]
    fn ping_needs_a_recent_flush_beat_a_moving_writer_and_a_store_answer() {
        assert_eq!(verdict(&observation()), Ok(()));
        let silent = Observation {
            flush_age: Some(Duration::from_secs(301)),
            ..observation()
        };
        assert_eq!(
            verdict(&silent),
            Err(Unhealthy::FlushLoopSilent(Duration::from_secs(301)))
        );
        // Offline mode: no flush loop to watch.
        let offline = Observation {
            flush_age: None,
            ..silent.clone()
        };
        assert_eq!(verdict(&offline), Ok(()));
        let timed_out = Observation {
            probe: Err(Unhealthy::StoreProbeTimedOut),
            ..offline.clone()
        };
        assert_eq!(verdict(&timed_out), Err(Unhealthy::StoreProbeTimedOut));
        // A commit in progress is fine up to the bound, a wedge past it, even while reads answer.
        let committing = Observation {
            writer_busy: Some(Duration::from_secs(30)),
            ..observation()
        };
        assert_eq!(verdict(&committing), Ok(()));
        let wedged = Observation {
            writer_busy: Some(Duration::from_secs(31)),
            ..silent
        };
        assert_eq!(
            verdict(&wedged),
            Err(Unhealthy::StoreWriterStuck(Duration::from_secs(31)))
        );
    }

    #[test]
    fn liveness_ages() {
        let l = Liveness::new();
        assert_eq!(l.flush_loop_age(), None);
        l.flush_loop_beat();
        assert!(l
            .flush_loop_age()
            .is_some_and(|a| a < Duration::from_secs(5)));
    }

    #[test]
    fn stale_bound_is_generous_with_defaults() {
        let cfg = Config::default();
        let d = flush_stale_after(&cfg);
        assert!(d >= Duration::from_secs(300), "{d:?}");
        assert!(d <= Duration::from_secs(3600), "{d:?}");
    }

    #[test]
    fn status_mentions_pending_link_and_quarantine() {
        let mut s = stats();
        assert_eq!(status_line(&s, LinkState::Up), "7 pending keys, link up");
        s.quarantine_keys = 2;
        assert_eq!(
            status_line(&s, LinkState::Down),
            "7 pending keys, link down, 2 quarantined"
        );
    }

    /// Records every tick's notification instead of sending it.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Notification>>>);

    impl Notifier for Recorder {
        fn notify(&self, n: &Notification) {
            self.0.lock().unwrap().push(n.clone());
        }
    }

    impl Recorder {
        fn ticks(&self) -> Vec<Notification> {
            self.0.lock().unwrap().clone()
        }
        /// Polls (generous deadline, no timing assertion) until `cond` holds for the ticks
        /// recorded so far; returns them.
        async fn wait_for(
            &self,
            what: &str,
            cond: impl Fn(&[Notification]) -> bool,
        ) -> Vec<Notification> {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let t = self.ticks();
                if cond(&t) {
                    return t;
                }
                assert!(
                    Instant::now() < deadline,
                    "waited in vain for {what}: {t:?}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    /// Holds a lock on a thread of its own (a guard must not live across the test's awaits)
    /// until the returned release function is called.
    fn hold<G: 'static>(take: impl FnOnce() -> G + Send + 'static) -> impl FnOnce() {
        let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let _guard = take();
            held_tx.send(()).unwrap();
            let _ = release_rx.recv();
        });
        held_rx.recv().unwrap();
        move || {
            drop(release_tx);
            holder.join().unwrap();
        }
    }

    fn last_status(t: &[Notification]) -> Option<&str> {
        t.iter().rev().find_map(|n| n.status.as_deref())
    }

    /// 200 ms: a tick every 100 ms, a 50 ms probe timeout, a writer bound of 100 ms.
    const WATCHDOG: Duration = Duration::from_millis(200);

    fn start<P: StoreProbe>(
        probe: P,
        liveness: &'static Liveness,
        flusher_expected: bool,
        flush_stale_after: Duration,
    ) -> (Recorder, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let rec = Recorder::default();
        let task = PingTask {
            probe,
            notifier: rec.clone(),
            link: Box::new(|| LinkState::Offline),
            liveness,
            flusher_expected,
            flush_stale_after,
            started: Instant::now(),
        };
        let (stop, stop_rx) = watch::channel(false);
        let h = tokio::spawn(task.run(Some(WATCHDOG), stop_rx));
        (rec, stop, h)
    }

    fn update(value: i64) -> Vec<Update> {
        vec![Update {
            entity: "scada/asset/site-1/tr-1".into(),
            op: UpdateOp::Set([("tag/T".to_string(), serde_json::json!(value))].into()),
            ts_ms: 1_772_366_400_000 + value as u64,
            stream: None,
            source: None,
        }]
    }

    /// Gap 1 and 2 of issue 9: a commit that never finishes (here: the writer waits for the
    /// writer gate this test holds, as it would behind an fsync that never returns) stops the
    /// pings and says why in STATUS, although store reads keep answering; releasing it brings
    /// the pings back. Runs the real ping task against a real store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pings_stop_and_status_says_why_while_the_store_writer_is_wedged() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("data"), StoreOptions::default()).unwrap();
        let liveness: &'static Liveness = Box::leak(Box::new(Liveness::new()));
        let (rec, stop, task) = start(store.clone(), liveness, false, Duration::from_secs(300));

        // Healthy: pings, and a write goes through.
        store.ingest(update(1)).await.unwrap();
        let t = rec
            .wait_for("a ping after a write", |t| {
                t.iter().filter(|n| n.watchdog).count() >= 2
            })
            .await;
        assert_eq!(last_status(&t), Some("0 pending keys, link offline"));

        // Wedge the write path: the next commit group waits forever.
        let s = store.clone();
        let release = hold(move || {
            // The guard borrows the store it came from: keep both on the holder thread.
            let s = Box::leak(Box::new(s));
            s.hold_writer_gate_for_tests()
        });
        let s = store.clone();
        let stuck = tokio::spawn(async move { s.ingest(update(2)).await });
        let t = rec
            .wait_for("STATUS naming the stuck writer", |t| {
                last_status(t).is_some_and(|s| s.contains("store writer stuck"))
            })
            .await;
        let wedged_at = t.len();
        let status = last_status(&t).unwrap().to_string();
        assert!(
            status
                .starts_with("UNHEALTHY, watchdog ping withheld: store writer stuck on one commit"),
            "{status}"
        );
        assert!(!t[wedged_at - 1].watchdog, "pinged with {status}");
        // What the old read-only probe saw: reads still answer.
        assert_eq!(store.stats().pending_keys, 0);
        // No ping on any later tick while the wedge lasts (counted in ticks, not time).
        let t = rec
            .wait_for("five more ticks", |t| t.len() >= wedged_at + 5)
            .await;
        let pinged: Vec<_> = t[wedged_at..].iter().filter(|n| n.watchdog).collect();
        assert!(pinged.is_empty(), "pinged while wedged: {t:?}");
        assert!(!stuck.is_finished(), "the wedge did not hold the commit");

        // Unwedged: the commit completes and the pings come back with a normal status.
        release();
        stuck.await.unwrap().unwrap();
        let t = rec
            .wait_for("a ping after the wedge", |t| {
                t.len() > wedged_at + 5 && t.last().is_some_and(|n| n.watchdog)
            })
            .await;
        assert!(
            !last_status(&t).unwrap().contains("UNHEALTHY"),
            "{:?}",
            last_status(&t)
        );
        let _ = stop.send(true);
        task.await.unwrap();
        store.close().unwrap();
    }

    /// A read probe that hangs while `gate` is held; counts how often it was started.
    #[derive(Clone, Default)]
    struct HangingProbe {
        gate: Arc<Mutex<()>>,
        calls: Arc<AtomicU64>,
    }

    impl StoreProbe for HangingProbe {
        fn stats(&self) -> Stats {
            self.calls.fetch_add(1, Ordering::SeqCst);
            drop(self.gate.lock().unwrap());
            stats()
        }
        fn writer_busy_for(&self) -> Option<Duration> {
            None
        }
    }

    /// A store read that never returns (a lock held forever) withholds the pings, and the ping
    /// task waits for the one blocked probe instead of starting a new one on every tick.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pings_stop_while_the_store_read_probe_hangs() {
        let probe = HangingProbe::default();
        let liveness: &'static Liveness = Box::leak(Box::new(Liveness::new()));
        let (rec, stop, task) = start(probe.clone(), liveness, false, Duration::from_secs(300));
        rec.wait_for("a ping", |t| t.iter().any(|n| n.watchdog))
            .await;
        let g = probe.gate.clone();
        let release = hold(move || {
            let g = Box::leak(Box::new(g));
            g.lock().unwrap()
        });
        let t = rec
            .wait_for("STATUS naming the probe", |t| {
                last_status(t).is_some_and(|s| s.contains("store probe did not return"))
            })
            .await;
        let wedged_at = t.len();
        let calls = probe.calls.load(Ordering::SeqCst);
        let t = rec
            .wait_for("five more ticks", |t| t.len() >= wedged_at + 5)
            .await;
        assert!(
            t[wedged_at - 1..].iter().all(|n| !n.watchdog),
            "pinged while the probe hung: {t:?}"
        );
        assert_eq!(probe.calls.load(Ordering::SeqCst), calls, "probes piled up");
        release();
        rec.wait_for("a ping after the hang", |t| {
            t.len() > wedged_at + 5 && t.last().is_some_and(|n| n.watchdog)
        })
        .await;
        let _ = stop.send(true);
        task.await.unwrap();
    }

    /// A flush loop that stops beating withholds the pings; beating again brings them back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pings_stop_while_the_flush_loop_is_silent() {
        let liveness: &'static Liveness = Box::leak(Box::new(Liveness::new()));
        liveness.flush_loop_beat();
        let (rec, stop, task) = start(
            HangingProbe::default(),
            liveness,
            true,
            Duration::from_millis(300),
        );
        let t = rec
            .wait_for("STATUS naming the flush loop", |t| {
                last_status(t).is_some_and(|s| s.contains("flush loop silent"))
            })
            .await;
        let wedged_at = t.len();
        assert!(!t[wedged_at - 1].watchdog);
        let t = rec
            .wait_for("three more ticks", |t| t.len() >= wedged_at + 3)
            .await;
        assert!(t[wedged_at..].iter().all(|n| !n.watchdog), "{t:?}");
        let beating = Arc::new(AtomicBool::new(true));
        let b = beating.clone();
        let beater = std::thread::spawn(move || {
            while b.load(Ordering::SeqCst) {
                liveness.flush_loop_beat();
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        rec.wait_for("a ping after beats resume", |t| {
            t.len() > wedged_at + 3 && t.last().is_some_and(|n| n.watchdog)
        })
        .await;
        beating.store(false, Ordering::SeqCst);
        beater.join().unwrap();
        let _ = stop.send(true);
        task.await.unwrap();
    }
}
