//! Process signals: the first SIGTERM/SIGINT starts a graceful shutdown; a second one exits at
//! once. Exiting at once loses nothing acknowledged: every acknowledged update is already
//! durable (group commit syncs before answering), the rest was never acknowledged.

use tokio::signal::unix::{signal, SignalKind};

/// Resolves on the first SIGTERM or SIGINT and arms the second-signal exit.
pub async fn shutdown_signal() {
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            tracing::error!("cannot install signal handlers; stop the worker with SIGKILL");
            std::future::pending::<()>().await;
            return;
        }
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

/// Tells a supervisor the worker is ready: a line on stderr for people and scripts.
pub fn notify_ready(r: &crate::app::Running) {
    tracing::info!(ingest = %r.ingest_addr, admin = %r.admin_addr, "ready");
}
