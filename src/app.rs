//! Wiring: `run(config, shutdown)` opens the store, starts the compactor, the flush worker and
//! the HTTP listeners, and on shutdown stops accepting (503), finishes in-flight requests, runs
//! one last bounded flush, and makes the store durable before returning.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{self, Config};
use crate::flusher::{FlushOptions, Flusher, MergeMode};
use crate::flux_client::{ClientConfig, FluxClient};
use crate::ingest::AppState;
use crate::merge::ConflictPolicy;
use crate::metrics::Metrics;
use crate::store::{Durability, Store, StoreOptions};

/// Longest the worker waits at shutdown for requests in flight to finish.
const SERVER_DRAIN_MAX: Duration = Duration::from_secs(10);

/// Why the worker could not start (the process exits non-zero with this message).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("flux client: {0}")]
    Client(#[from] crate::flux_client::ClientError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// What the running worker exposes to callers that embed it (tests, the demo).
#[derive(Clone)]
pub struct Running {
    pub ingest_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub store: Store,
    pub metrics: Arc<Metrics>,
}

pub fn store_options(cfg: &Config) -> StoreOptions {
    StoreOptions {
        durability: match cfg.durability {
            config::Durability::Fsync => Durability::Fsync,
            config::Durability::Flush => Durability::Flush,
        },
        cache_bytes: cfg.store.cache_bytes,
        pending_keys_max: cfg.store.pending_keys_max,
        disk_bytes_max: cfg.store.disk_bytes_max,
        group_commit_window: cfg.ingest.group_commit_window,
    }
}

pub fn flush_options(cfg: &Config) -> FlushOptions {
    FlushOptions {
        interval: cfg.flush.interval,
        batch_events_max: cfg.flush.batch_events_max,
        batch_bytes_max: cfg.flush.batch_bytes_max as usize,
        in_flight_max: cfg.flush.in_flight_max,
        events_per_minute_max: cfg.flush.events_per_minute_max.min(u64::from(u32::MAX)) as u32,
        merge: match cfg.flush.merge {
            config::MergeMode::ReadMergeWrite => MergeMode::ReadMergeWrite,
            config::MergeMode::Blind => MergeMode::Blind,
        },
        conflict_policy: match cfg.flush.conflict_policy {
            config::ConflictPolicy::Overwrite => ConflictPolicy::Overwrite,
            config::ConflictPolicy::KeepRemote => ConflictPolicy::KeepRemote,
        },
        protected: cfg.ingest.protected_properties.clone(),
        read_concurrency: cfg.flush.read_concurrency,
        backoff_initial: cfg.flush.backoff_initial,
        backoff_max: cfg.flush.backoff_max,
        convergence_window: cfg.flush.convergence_window,
        stream: cfg.flux.stream.clone(),
        source: cfg.flux_source(),
        ..FlushOptions::default()
    }
}

pub fn client_config(cfg: &Config, url: &str) -> ClientConfig {
    ClientConfig {
        base_url: url.to_string(),
        auth_token: cfg
            .flux
            .auth_token
            .as_ref()
            .map(|t| crate::flux_client::Secret::new(t.expose())),
        connect_timeout: cfg.flux.connect_timeout,
        request_timeout: cfg.flux.request_timeout,
        read_timeout: cfg.flux.read_timeout,
        pool_max_idle_per_host: cfg.flush.in_flight_max + cfg.flush.read_concurrency,
        ca_file: cfg.flux.ca_file.clone(),
        ..ClientConfig::default()
    }
}

/// How [`run`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Exit {
    /// Stopped because `shutdown` resolved.
    Stopped,
    /// A storage write failed and its cause (usually a full disk) is gone, but sled keeps an
    /// I/O error for the rest of a handle's life: the caller starts the worker again in this
    /// process (`flux-outbox run` re-executes itself) so the store is reopened. Everything
    /// acknowledged is on disk already.
    Restart,
}

/// Most time between two attempts to open a store that cannot be opened now (disk full, ...).
const OPEN_RETRY_MAX: Duration = Duration::from_secs(30);
/// A failed storage write is retried by a restart in place no sooner than this after it ...
const RESTART_AFTER_FAILURE: Duration = Duration::from_secs(10);
/// ... and only once the filesystem of the data directory has this much free again.
const RESTART_FREE_BYTES_MIN: u64 = 16 * 1024 * 1024;

/// Free bytes for an unprivileged writer on the filesystem holding `path`.
fn free_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs reads a NUL-terminated path and writes into a struct we own.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| (st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Opens the store, waiting (loudly, with back-off) while it cannot be opened for a reason of
/// its surroundings: a full disk must never make the worker give up or move the store aside.
/// None when `shutdown` resolved while waiting.
async fn open_store(
    cfg: &Config,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<Option<(Store, crate::store::OpenReport)>, StartError> {
    let mut delay = Duration::from_millis(500);
    loop {
        let data_dir = cfg.data_dir.clone();
        let opts = store_options(cfg);
        let opened = tokio::task::spawn_blocking(move || Store::open(&data_dir, opts))
            .await
            .map_err(|e| StartError::Other(format!("store open task failed: {e}")))?;
        match opened {
            Ok(x) => return Ok(Some(x)),
            Err(
                e @ (crate::store::StoreError::Unavailable { .. }
                | crate::store::StoreError::Storage(_)),
            ) => {
                tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64,
                    "THE STORE CANNOT BE OPENED NOW: waiting for its surroundings to recover (free disk space, permissions); nothing is accepted meanwhile");
                crate::watchdog::still_starting(delay * 3, &e.to_string());
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.as_mut() => return Ok(None),
                }
                delay = (delay * 2).min(OPEN_RETRY_MAX);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Runs the worker until `shutdown` resolves (or a restart in place is due, see [`Exit`]).
/// `on_ready` is called once the store is open and the listeners are bound (systemd
/// readiness, tests).
pub async fn run(
    cfg: Config,
    shutdown: impl Future<Output = ()>,
    on_ready: impl FnOnce(&Running),
) -> Result<Exit, StartError> {
    let mapper = Arc::new(
        crate::mapper::Mapper::from_config(&cfg).map_err(|e| StartError::Other(e.to_string()))?,
    );
    let mut shutdown = std::pin::pin!(shutdown);
    let Some((store, report)) = open_store(&cfg, &mut shutdown).await? else {
        tracing::info!("stopped while waiting for the store");
        return Ok(Exit::Stopped);
    };
    if let Some(aside) = &report.moved_aside_to {
        tracing::error!(aside = %aside.display(), salvaged = report.salvaged_records,
            set_aside = report.salvage_set_aside, error = ?report.open_error,
            "THE STORE COULD NOT BE OPENED: it was moved aside and a fresh store started; inspect the old one with outbox-dump");
    }
    if report.format_record_repaired {
        tracing::error!("THE STORE'S FORMAT RECORD WAS MALFORMED: every other record is of this version, so it was set aside (see outbox-dump corrupt records) and rewritten");
    }
    let stats = store.stats();
    tracing::info!(dir = %store.dir().display(), pending_keys = stats.pending_keys, log_backlog = stats.log_backlog,
        quarantine = stats.quarantine_keys, created = report.created, "store open");

    let compactor = crate::compactor::spawn_with(store.clone(), cfg.store.compact_batch_max)
        .map_err(|e| StartError::Other(format!("cannot start compactor: {e}")))?;
    let client = match &cfg.flux.url {
        Some(url) => Some(FluxClient::new(client_config(&cfg, url))?),
        None => {
            tracing::warn!("no Flux URL configured: offline mode, updates are buffered only");
            None
        }
    };
    let metrics = Arc::new(Metrics::new(client.is_none()));
    if let Some((first, last)) = report.lost_seqs {
        let lost = last - first + 1;
        metrics.store_lost_updates.store(lost, Ordering::Relaxed);
        // A note an operator finds in the data directory even without the logs.
        let note = cfg
            .data_dir
            .join(format!("LOST-UPDATES-{}.txt", crate::model::now_ms()));
        let text = format!(
            "flux-outbox found its store holding fewer updates than it had acknowledged:\n\
             sequence numbers {first} to {last} ({lost} updates) are gone. This happens when the\n\
             store's files were damaged (sled drops the rest of its log at the first bad\n\
             checksum) or, with durability = \"flush\", after a power loss. They cannot be\n\
             recovered from this store; if a copy or a backup exists, export it with outbox-dump.\n"
        );
        if let Err(e) = std::fs::write(&note, text) {
            tracing::error!(error = %e, note = %note.display(), "cannot write the lost-updates note");
        }
    }
    let state = Arc::new(AppState {
        store: store.clone(),
        metrics: metrics.clone(),
        rules: cfg.rules(),
        ingest_token: cfg.ingest.token.clone(),
        admin_token: cfg.admin.token.clone(),
        shutting_down: Default::default(),
        compactor: compactor.waker(),
        default_stream: cfg.flux.stream.clone(),
        flux: client.clone(),
        gateway_id: cfg.gateway_id.clone(),
    });

    let ingest_router =
        crate::ingest::router(state.clone(), cfg.ingest.body_bytes_max as usize).merge(
            crate::read_through::router(state.clone(), &cfg.read_through),
        );
    let admin_router = crate::admin::router(state.clone());
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    let ingest_listener = bind(cfg.ingest.listen).await?;
    let ingest_addr = ingest_listener
        .local_addr()
        .map_err(|e| StartError::Other(e.to_string()))?;
    let admin_addr;
    if cfg.admin.listen == cfg.ingest.listen {
        admin_addr = ingest_addr;
        servers.spawn(serve(
            ingest_listener,
            ingest_router.merge(admin_router),
            stop_rx.clone(),
        ));
    } else {
        let admin_listener = bind(cfg.admin.listen).await?;
        admin_addr = admin_listener
            .local_addr()
            .map_err(|e| StartError::Other(e.to_string()))?;
        servers.spawn(serve(ingest_listener, ingest_router, stop_rx.clone()));
        servers.spawn(serve(admin_listener, admin_router, stop_rx.clone()));
    }
    tracing::info!(%ingest_addr, %admin_addr, "listening");

    let flusher =
        client.map(|c| Flusher::new(store.clone(), c, flush_options(&cfg), metrics.clone()));
    let flush_task = flusher
        .clone()
        .map(|f| tokio::spawn(f.run(stop_rx.clone())));

    // Disk usage feeds the disk limit and /metrics; directory walks stay off the hot path.
    let disk_store = store.clone();
    let mut disk_stop = stop_rx.clone();
    let shrink_above = cfg.store.shrink_when_drained_above;
    let (restart_tx, mut restart_rx) = watch::channel(false);
    let data_dir = cfg.data_dir.clone();
    let disk_task = tokio::spawn(async move {
        let mut tick: u64 = 0;
        loop {
            let s = disk_store.clone();
            let _ = tokio::task::spawn_blocking(move || s.refresh_disk_bytes()).await;
            tick += 1;
            // sled fails every write of a handle after one I/O error: once the cause looks
            // gone (space is free again), restart in place to reopen the store.
            if let Some((at_ms, error)) = disk_store.storage_failed() {
                let since = Duration::from_millis(crate::model::now_ms().saturating_sub(at_ms));
                let free = free_bytes(&data_dir).unwrap_or(0);
                if tick % 10 == 0 {
                    tracing::error!(%error, free_bytes = free, "STORAGE WRITES FAIL: new updates get 507 until the store is reopened");
                }
                if since >= RESTART_AFTER_FAILURE && free >= RESTART_FREE_BYTES_MIN {
                    tracing::error!(%error, free_bytes = free,
                        "storage writes failed and space is available again: restarting in place to reopen the store");
                    let _ = restart_tx.send(true);
                    return;
                }
            }
            // A drained store rotates to a fresh one so disk use returns to a few MB; checked
            // every 30 s (cheap: it returns at once while anything is pending).
            if tick % 30 == 0 {
                let s = disk_store.clone();
                match tokio::task::spawn_blocking(move || s.shrink_if_drained(shrink_above)).await {
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "store rotation failed; the old store stays in use")
                    }
                    Err(e) => tracing::error!(error = %e, "store rotation task failed"),
                    Ok(Ok(_)) => {}
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = disk_stop.changed() => return,
            }
        }
    });

    let scada_tasks =
        crate::source_ws::spawn_integration(&cfg, mapper, state.clone(), stop_rx.clone())
            .map_err(StartError::Other)?;

    on_ready(&Running {
        ingest_addr,
        admin_addr,
        store: store.clone(),
        metrics: metrics.clone(),
    });
    let exit = tokio::select! {
        _ = shutdown.as_mut() => Exit::Stopped,
        _ = restart_rx.wait_for(|r| *r) => Exit::Restart,
    };

    // The flag first, the log line after: once "shutting down" is logged, every request whose
    // admission check runs from then on is refused with 503 (tests and operators rely on it).
    state.shutting_down.store(true, Ordering::SeqCst);
    tracing::info!(
        ?exit,
        "shutting down: refusing new updates, finishing requests in flight"
    );
    let _ = stop_tx.send(true);
    // Graceful shutdown waits for every open connection; a producer that never finishes its
    // request body (or a stuck admin scrape) must not keep the worker from stopping. Requests
    // cut here were not acknowledged, so cutting them loses nothing that was promised.
    let drained = tokio::time::timeout(SERVER_DRAIN_MAX, async {
        while servers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            timeout_s = SERVER_DRAIN_MAX.as_secs(),
            "requests still open at shutdown were cut (not acknowledged)"
        );
        servers.abort_all();
        while servers.join_next().await.is_some() {}
    }
    // /metrics is gone with the listeners: the count of updates refused while stopping (the
    // same counter as flux_outbox_ingest_rejected_total{reason="shutting_down"}) goes to the
    // log, so a producer's 503s at shutdown can be matched with the worker's side.
    tracing::info!(
        rejected_shutting_down = metrics.rejected("shutting_down"),
        "listeners closed"
    );
    for t in scada_tasks {
        let _ = t.await;
    }
    if let Some(mut t) = flush_task {
        // The flush loop stops between batches, but a batch in flight waits for Flux up to
        // `flux.request_timeout` (30 s by default) per request; a hung Flux must not hold the
        // stop beyond the time the operator allowed for delivery at shutdown. Cutting a batch
        // is safe: its keys stay pending on disk and are resent after the restart.
        let bound = cfg.flush.final_flush_timeout.max(Duration::from_secs(1));
        if tokio::time::timeout(bound, &mut t).await.is_err() {
            tracing::warn!(
                timeout_ms = bound.as_millis() as u64,
                "delivery in flight did not finish in time; cut (it stays pending on disk)"
            );
            t.abort();
            let _ = t.await;
        }
    }
    let _ = disk_task.await;
    let _ = tokio::task::spawn_blocking(move || compactor.stop_and_join()).await;
    if let Some(f) = flusher {
        let bound = cfg.flush.final_flush_timeout;
        if !bound.is_zero() && store.stats().pending_keys > 0 {
            tracing::info!(timeout_ms = bound.as_millis() as u64, "final flush");
            if tokio::time::timeout(bound, f.drain_once()).await.is_err() {
                tracing::warn!(
                    "final flush did not finish in time; the rest stays pending on disk"
                );
            }
        }
    }
    let s = store.clone();
    let closed = tokio::task::spawn_blocking(move || s.close())
        .await
        .map_err(|e| StartError::Other(format!("close task failed: {e}")))?;
    match (closed, exit) {
        // The handle is the broken one being replaced: acknowledged data is already durable.
        (Err(e), Exit::Restart) => tracing::warn!(error = %e, "closing the failed store handle"),
        (r, _) => r?,
    }
    let stats = store.stats();
    tracing::info!(pending_keys = stats.pending_keys, ?exit, "store closed");
    Ok(exit)
}

async fn serve(listener: TcpListener, router: axum::Router, mut stop: watch::Receiver<bool>) {
    let result = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "listener failed");
    }
}
