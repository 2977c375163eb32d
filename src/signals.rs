//! Process signals: the first SIGTERM/SIGINT starts a graceful shutdown; a second one exits at
//! once. Exiting at once loses nothing acknowledged: every acknowledged update is already
//! durable (group commit syncs before answering), the rest was never acknowledged.

use std::future::Future;

use tokio::signal::unix::{signal, SignalKind};

/// Installs the SIGTERM/SIGINT handlers NOW and returns a future that resolves on the first
/// signal (and arms the second-signal exit). Must be called inside a tokio runtime.
///
/// The handlers are installed before the future is first polled on purpose: the worker polls it
/// only once it is ready, and a signal arriving earlier (during a long store recovery, or just
/// after `/readyz` first answered) would otherwise meet the default disposition and kill the
/// process uncleanly instead of shutting it down. An early signal is remembered by tokio and
/// resolves the future at its first poll.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    let streams = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => Some((t, i)),
        _ => None,
    };
    async move {
        let Some((mut term, mut int)) = streams else {
            tracing::error!("cannot install signal handlers; stop the worker with SIGKILL");
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!("second signal: exiting now (acknowledged updates are already on disk)");
            std::process::exit(130);
        });
    }
}

/// Tells a supervisor the worker is ready: a line on stderr for people and scripts.
pub fn notify_ready(r: &crate::app::Running) {
    tracing::info!(ingest = %r.ingest_addr, admin = %r.admin_addr, "ready");
}
