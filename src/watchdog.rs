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
//! half `WATCHDOG_USEC` only when both hold:
//!
//! 1. the flush loop has beaten ([`flush_loop_beat`]) within [`flush_stale_after`] — skipped in
//!    offline mode, where there is no flush loop;
//! 2. a cheap store read (`Store::stats`, which takes the store's state lock and reads the
//!    sled tree) returns within a quarter of the watchdog interval.
//!
//! When either fails the ping is withheld, `STATUS=` says why, and systemd kills and restarts
//! the worker once `WatchdogSec` passes without a ping. Acknowledged updates are on disk, so a
//! restart loses nothing; the flush loop and store are rebuilt from scratch.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio::sync::watch;

use crate::app::Running;
use crate::config::Config;
use crate::metrics::{LinkState, Metrics};
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
    StoreProbeTimedOut,
    StoreProbeFailed(String),
}

impl std::fmt::Display for Unhealthy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unhealthy::FlushLoopSilent(d) => {
                write!(f, "flush loop silent for {}s", d.as_secs())
            }
            Unhealthy::StoreProbeTimedOut => write!(f, "store probe did not return in time"),
            Unhealthy::StoreProbeFailed(e) => write!(f, "store probe failed: {e}"),
        }
    }
}

/// The ping decision, separate from the I/O so it can be tested. `flush_age` is `None` in
/// offline mode (no flush loop to watch).
pub fn verdict(
    flush_age: Option<Duration>,
    stale_after: Duration,
    probe: &Result<Stats, Unhealthy>,
) -> Result<(), Unhealthy> {
    if let Some(age) = flush_age {
        if age > stale_after {
            return Err(Unhealthy::FlushLoopSilent(age));
        }
    }
    probe.as_ref().map(|_| ()).map_err(Clone::clone)
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
        let task = PingTask {
            store: r.store.clone(),
            metrics: r.metrics.clone(),
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

struct PingTask {
    store: Store,
    metrics: Arc<Metrics>,
    liveness: &'static Liveness,
    flusher_expected: bool,
    flush_stale_after: Duration,
    started: Instant,
}

/// Period of `STATUS=` updates when systemd enables no watchdog.
const STATUS_PERIOD: Duration = Duration::from_secs(10);

impl PingTask {
    async fn run(self, watchdog: Option<Duration>, mut stop: watch::Receiver<bool>) {
        // sd_watchdog_enabled(3) advises pinging at half the interval.
        let period = watchdog.map(|w| w / 2).unwrap_or(STATUS_PERIOD);
        let probe_timeout = period / 2;
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
                    let s = self.store.clone();
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
            let verdict = verdict(flush_age, self.flush_stale_after, &result);
            let status = match (&verdict, &result) {
                (Ok(()), Ok(stats)) => status_line(stats, self.metrics.link()),
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
            let mut states = Vec::with_capacity(2);
            if verdict.is_ok() && watchdog.is_some() {
                states.push(NotifyState::Watchdog);
            }
            // Status only when it changed: the journal of a years-long run stays readable.
            if status != last_status {
                states.push(NotifyState::Status(&status));
            }
            if !states.is_empty() {
                send(&states);
            }
            last_status = status;
        }
    }
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

    fn stats() -> Stats {
        Stats {
            pending_keys: 7,
            ..Stats::default()
        }
    }

    #[test]
    fn ping_needs_a_recent_flush_beat_and_a_store_answer() {
        let stale = Duration::from_secs(300);
        let ok = Ok(stats());
        assert_eq!(verdict(Some(Duration::from_secs(1)), stale, &ok), Ok(()));
        assert_eq!(
            verdict(Some(Duration::from_secs(301)), stale, &ok),
            Err(Unhealthy::FlushLoopSilent(Duration::from_secs(301)))
        );
        // Offline mode: no flush loop to watch.
        assert_eq!(verdict(None, stale, &ok), Ok(()));
        let timed_out = Err(Unhealthy::StoreProbeTimedOut);
        assert_eq!(
            verdict(None, stale, &timed_out),
            Err(Unhealthy::StoreProbeTimedOut)
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
}
