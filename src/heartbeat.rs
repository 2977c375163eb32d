//! The gateway heartbeat: every `heartbeat.interval` the worker writes one entity,
//! `{prefix}gateway/{gateway_id}` (folded in public mode), describing itself, so Flux users see
//! a stale or backlogged gateway centrally.
//!
//! Properties: `gateway_id`, `version`, `pending_keys`, `oldest_pending_age_ms`,
//! `quarantine_keys`, `last_delivery_ms` (epoch ms of the last acknowledged delivery, `null`
//! before the first), `link` (the flush worker's link state) and `heartbeat_ms` (when it was
//! written).
//!
//! Why through the store and not a direct POST: the beat then takes the durable path like any
//! update (validation, newest-wins per key, retries, quarantine), and during an outage the
//! newest beat waits in the outbox, superseding the previous one, so a backlog costs at most
//! one pending entity. The first beat is written one interval after start, so a worker that
//! cannot stay up for an interval shows as stale.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::ingest::AppState;
use crate::model::{now_ms, Update, UpdateOp};
use crate::validate::validate_update;

/// Shortest accepted interval (a beat costs one durable write).
pub const INTERVAL_MIN: Duration = Duration::from_millis(100);
/// Longest accepted interval.
pub const INTERVAL_MAX: Duration = Duration::from_secs(24 * 3600);

/// `[heartbeat]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatConfig {
    pub enabled: bool,
    #[serde(with = "crate::config::duration")]
    pub interval: Duration,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            enabled: true,
            interval: Duration::from_secs(30),
        }
    }
}

pub(crate) fn check_config(c: &HeartbeatConfig) -> Result<(), (&'static str, String)> {
    if c.interval < INTERVAL_MIN || c.interval > INTERVAL_MAX {
        return Err((
            "heartbeat.interval",
            "must be between 100ms and 24h".to_string(),
        ));
    }
    Ok(())
}

/// The heartbeat update as of now.
pub fn beat(state: &AppState, entity: &str) -> Update {
    let stats = state.store.stats();
    let now = now_ms();
    let last = state.metrics.last_delivery_ms.load(Ordering::Relaxed);
    let props: serde_json::Map<String, Value> = json!({
        "gateway_id": state.gateway_id,
        "version": env!("CARGO_PKG_VERSION"),
        "pending_keys": stats.pending_keys,
        "oldest_pending_age_ms": stats.oldest_pending_ms.map(|t| now.saturating_sub(t)).unwrap_or(0),
        "quarantine_keys": stats.quarantine_keys,
        "last_delivery_ms": if last > 0 { Value::from(last) } else { Value::Null },
        "link": state.metrics.link().as_str(),
        "heartbeat_ms": now,
    })
    .as_object()
    .cloned()
    .unwrap_or_default();
    Update {
        entity: entity.to_string(),
        op: UpdateOp::Set(props.into_iter().collect()),
        ts_ms: now,
        stream: None,
        source: None,
    }
}

/// Starts the heartbeat task (`None` when disabled). `entity` comes from
/// [`crate::mapper::Mapper::gateway_entity`].
pub fn spawn(
    cfg: &HeartbeatConfig,
    state: Arc<AppState>,
    entity: String,
    mut stop: watch::Receiver<bool>,
) -> Option<JoinHandle<()>> {
    if !cfg.enabled {
        return None;
    }
    let interval = cfg.interval;
    Some(tokio::spawn(async move {
        tracing::info!(%entity, interval_ms = interval.as_millis() as u64, "heartbeat on");
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = crate::source_ws::stopped(&mut stop) => return,
            }
            if state.shutting_down.load(Ordering::SeqCst) {
                return;
            }
            let st = state.clone();
            let e = entity.clone();
            // stats() reads sled: keep it off the async workers.
            let update = match tokio::task::spawn_blocking(move || beat(&st, &e)).await {
                Ok(u) => u,
                Err(e) => {
                    tracing::warn!(error = %e, "heartbeat: stats task failed");
                    continue;
                }
            };
            if let Err(e) = validate_update(&update, &state.rules) {
                // Only a misconfiguration (e.g. a protected property name) can get here:
                // report it once per beat, never stop the worker.
                tracing::error!(error = %e, "heartbeat update refused by validation");
                continue;
            }
            match state.store.ingest(vec![update]).await {
                Ok(_) => state.compactor.wake(),
                Err(crate::store::StoreError::Closed) => return,
                Err(e) => tracing::warn!(error = %e, "heartbeat not stored; next beat retries"),
            }
        }
    }))
}
