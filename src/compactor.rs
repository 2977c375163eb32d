//! The background compactor: folds the write-ahead log into the pending set, one atomic step
//! at a time (see `store` for why every step is crash-safe). It runs on its own thread because
//! sled calls block; ingest wakes it after every commit, and a short tick covers missed wakes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::Duration;

use crate::store::Store;

/// Log records folded per atomic step: large enough to amortize the batch, small enough that
/// the state lock is never held for long (claims and acks wait on it).
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
    handle: std::thread::JoinHandle<()>,
}

impl Compactor {
    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    /// Folds what is left of the log, then stops the thread.
    pub fn stop_and_join(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.waker.wake();
        let _ = self.handle.join();
    }
}

/// Starts the compactor thread.
pub fn spawn(store: Store) -> std::io::Result<Compactor> {
    let (tx, rx) = sync_channel(1);
    let stop = Arc::new(AtomicBool::new(false));
    let thread_stop = stop.clone();
    let handle = std::thread::Builder::new()
        .name("outbox-compactor".into())
        .spawn(move || run(store, rx, thread_stop))?;
    Ok(Compactor {
        waker: Waker(tx),
        stop,
        handle,
    })
}

fn run(store: Store, rx: Receiver<()>, stop: Arc<AtomicBool>) {
    let mut error_backoff = Duration::from_millis(100);
    loop {
        match store.compact_step(STEP_RECORDS_MAX) {
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
            Ok(_) => {}
            Err(e) => {
                if stop.load(Ordering::SeqCst) {
                    // Shutting down: what is left stays in the log and is folded at next start.
                    return;
                }
                // A failed step changed nothing (one atomic batch); retry later, never give up:
                // the log keeps the data until a step succeeds.
                tracing::error!(error = %e, "compaction step failed; retrying");
                std::thread::sleep(error_backoff);
                error_backoff = (error_backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
