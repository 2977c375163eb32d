//! The background compactor: folds the write-ahead log into the pending set, one atomic step
//! at a time (see `store` for why every step is crash-safe). It runs on its own thread because
//! sled calls block; ingest wakes it after every commit, and a short tick covers missed wakes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::Duration;

use crate::store::Store;

/// Log records folded per atomic step by default (`store.compact_batch_max`): large enough to
/// amortize the batch, small enough that the state lock is never held for long (claims and
/// acks wait on it).
pub const STEP_RECORDS_MAX: usize = 2_000;
const IDLE_TICK: Duration = Duration::from_millis(50);

/// Wakes the compactor; cheap and never blocks.
#[derive(Clone)]
pub struct Waker(SyncSender<()>);

impl Waker {
    pub fn wake(&self) {
        let _ = self.0.try_send(());
    }
}

/// The running compactor thread.
pub struct Compactor {
    waker: Waker,
    stop: Arc<AtomicBool>,
    steps: Arc<AtomicU64>,
    handle: std::thread::JoinHandle<()>,
}

impl Compactor {
    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    /// Compaction steps that folded at least one record since the thread started.
    pub fn steps(&self) -> u64 {
        self.steps.load(Ordering::Relaxed)
    }

    /// Folds what is left of the log, then stops the thread.
    pub fn stop_and_join(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.waker.wake();
        let _ = self.handle.join();
    }
}

/// Starts the compactor thread with the default step size.
pub fn spawn(store: Store) -> std::io::Result<Compactor> {
    spawn_with(store, STEP_RECORDS_MAX)
}

/// Starts the compactor thread folding at most `step_records_max` log records per atomic step
/// (`store.compact_batch_max`; at least 1).
pub fn spawn_with(store: Store, step_records_max: usize) -> std::io::Result<Compactor> {
    let (tx, rx) = sync_channel(1);
    let stop = Arc::new(AtomicBool::new(false));
    let steps = Arc::new(AtomicU64::new(0));
    let (thread_stop, thread_steps) = (stop.clone(), steps.clone());
    let step = step_records_max.max(1);
    let handle = std::thread::Builder::new()
        .name("outbox-compactor".into())
        .spawn(move || run(store, step, rx, thread_stop, thread_steps))?;
    Ok(Compactor {
        waker: Waker(tx),
        stop,
        steps,
        handle,
    })
}

fn run(
    store: Store,
    step_records_max: usize,
    rx: Receiver<()>,
    stop: Arc<AtomicBool>,
    steps: Arc<AtomicU64>,
) {
    let mut error_backoff = Duration::from_millis(100);
    loop {
        match store.compact_step(step_records_max) {
            Ok(0) => {
                error_backoff = Duration::from_millis(100);
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                match rx.recv_timeout(IDLE_TICK) {
                    Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            Ok(_) => {
                steps.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                if stop.load(Ordering::SeqCst) {
                    // Shutting down: what is left stays in the log and is folded at next start.
                    return;
                }
                // A failed step changed nothing (one atomic batch); retry later, never give up:
                // the log keeps the data until a step succeeds.
                tracing::error!(error = %e, "compaction step failed; retrying");
                store.note_storage_failure(&e);
                std::thread::sleep(error_backoff);
                error_backoff = (error_backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Update, UpdateOp};
    use crate::store::{Durability, StoreOptions};

    #[test]
    fn the_step_size_bounds_every_compaction_step() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(
            dir.path(),
            StoreOptions {
                durability: Durability::Flush,
                ..StoreOptions::default()
            },
        )
        .expect("open");
        // Ten log records, all written before the compactor starts.
        let ups: Vec<Update> = (0..10u64)
            .map(|i| Update {
                entity: format!("e{i}"),
                op: UpdateOp::Set([("v".to_string(), serde_json::json!(i))].into()),
                ts_ms: 1,
                stream: None,
                source: None,
            })
            .collect();
        store.ingest_blocking(ups).expect("ingest");
        assert_eq!(store.stats().log_backlog, 10);
        let c = spawn_with(store.clone(), 3).expect("spawn");
        let t0 = std::time::Instant::now();
        while store.stats().log_backlog > 0 || c.steps() < 4 {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "compaction stalled: {:?}",
                store.stats()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        c.stop_and_join();
        // 3 + 3 + 3 + 1: the configured bound, not the default 2,000 (one step).
        assert_eq!(store.stats().pending_keys, 10);
        store.close().expect("close");
    }
}
