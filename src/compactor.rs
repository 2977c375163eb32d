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

/// Starts the compactor thread. It stops when every `Waker` is dropped and the log is empty.
pub fn spawn(store: Store) -> std::io::Result<(Waker, std::thread::JoinHandle<()>)> {
    let (tx, rx) = sync_channel(1);
    let handle = std::thread::Builder::new()
        .name("outbox-compactor".into())
        .spawn(move || run(store, rx))?;
    Ok((Waker(tx), handle))
}

fn run(store: Store, rx: Receiver<()>) {
    let mut error_backoff = Duration::from_millis(100);
    loop {
        match store.compact_step(STEP_RECORDS_MAX) {
            Ok(0) => {
                error_backoff = Duration::from_millis(100);
                match rx.recv_timeout(IDLE_TICK) {
                    Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => {
                        let _ = store.compact_all();
                        return;
                    }
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
