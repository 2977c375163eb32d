//! Admin endpoints: health, readiness, Prometheus metrics, and the JSON views `outbox-dump`
//! uses on a live gateway (the store is locked by the worker, so the tool asks the worker).
//!
//! | route | answer |
//! |---|---|
//! | `GET /healthz` | 200 `ok` while the process serves requests |
//! | `GET /readyz` | 200 when the store answers a read ([`store_check`]) and the worker is not shutting down (503 otherwise); body: JSON with `store` and `link` |
//! | `GET /metrics` | Prometheus text |
//! | `GET /v1/outbox/summary` | [`Summary`] |
//! | `GET /v1/outbox/pending?entity=P&older_than=10m&limit=N` | `[Row]` |
//! | `GET /v1/outbox/quarantine?entity=P&older_than=10m&limit=N` | `[Row]` |
//! | `GET /v1/outbox/log?limit=N` | `[LogRow]` |
//! | `GET /v1/outbox/verify` | [`crate::store::VerifyReport`] |
//! | `POST /v1/outbox/requeue?entity=P` / `?all=true` | `{"requeued": n}` |
//! | `GET /v1/outbox/export?quarantine=true` | NDJSON in the ingest format |
//!
//! When an admin token is configured every route but `/healthz` requires it.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::ingest::{authorized, error, AppState};
use crate::store::{Listing, Row, Stats, Store, StoreError, TreeFormat};

/// Rows returned when the caller gives no limit.
pub const LIST_LIMIT_DEFAULT: usize = 1_000;
/// Most rows one listing returns.
pub const LIST_LIMIT_MAX: usize = 1_000_000;
/// Response header of `/v1/outbox/pending` and `/v1/outbox/quarantine`: how many records the
/// listing could not read (corrupt, not in the body; `verify` names them).
pub const UNREADABLE_HEADER: &str = "x-flux-outbox-unreadable";
/// Longest `/readyz` waits for the store to answer its probe read.
pub const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What `outbox-dump summary` shows.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    #[serde(flatten)]
    pub stats: Stats,
    /// Link state when live (`null` offline).
    pub link: Option<String>,
    /// Last acknowledged delivery, epoch ms, when live.
    pub last_delivery_ms: Option<u64>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/outbox/summary", get(summary))
        .route("/v1/outbox/pending", get(pending))
        .route("/v1/outbox/quarantine", get(quarantine))
        .route("/v1/outbox/log", get(log))
        .route("/v1/outbox/verify", get(verify))
        .route("/v1/outbox/requeue", post(requeue))
        .route("/v1/outbox/export", get(export))
        .with_state(state)
}

fn check(state: &AppState, headers: &HeaderMap) -> Result<(), Response> {
    if authorized(headers, &state.admin_token) {
        Ok(())
    } else {
        Err(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token (Authorization: Bearer <token>)",
        ))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
        Err(e) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("task failed: {e}"),
        )),
    }
}

/// The store part of readiness: reads the store's format record through sled (a real read of
/// the open tree, not a flag) and checks it is a store of the format this worker writes.
pub fn store_check(store: &Store) -> Result<(), String> {
    let meta = crate::store::read_tree_meta(&store.raw_db()).map_err(|e| e.to_string())?;
    match meta.format {
        TreeFormat::Version(v) if v == crate::record::FORMAT_VERSION => Ok(()),
        TreeFormat::Version(v) => Err(format!(
            "store format version {v}, this worker writes {}",
            crate::record::FORMAT_VERSION
        )),
        TreeFormat::Missing => Err("store format record missing".into()),
        TreeFormat::Malformed => Err("store format record malformed".into()),
    }
}

/// [`store_check`] off the async threads, bounded by [`STORE_PROBE_TIMEOUT`]: a wedged store
/// makes the worker unready instead of hanging the probe.
async fn probe_store(store: Store) -> Result<(), String> {
    let probe = tokio::task::spawn_blocking(move || store_check(&store));
    match tokio::time::timeout(STORE_PROBE_TIMEOUT, probe).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(format!("store probe task failed: {e}")),
        Err(_) => Err(format!(
            "store probe did not answer within {}s",
            STORE_PROBE_TIMEOUT.as_secs()
        )),
    }
}

async fn readyz(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(r) = check(&state, &headers) {
        return r;
    }
    let shutting = state.shutting_down.load(Ordering::SeqCst);
    let store = probe_store(state.store.clone()).await;
    let ready = !shutting && store.is_ok();
    let mut body = json!({
        "ready": ready,
        "store": if store.is_ok() { "open" } else { "unavailable" },
        "link": state.metrics.link().as_str(),
        "shutting_down": shutting,
    });
    if let Err(e) = &store {
        body["store_error"] = json!(e);
    }
    crate::source_ws::extend_readyz(&state.metrics.oxscada_ws, &mut body);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

pub fn summary_of(store: &Store, state: Option<&AppState>) -> Summary {
    Summary {
        stats: store.stats(),
        link: state.map(|s| s.metrics.link().as_str().to_string()),
        last_delivery_ms: state
            .map(|s| s.metrics.last_delivery_ms.load(Ordering::Relaxed))
            .filter(|&t| t > 0),
    }
}

async fn summary(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(r) = check(&state, &headers) {
        return r;
    }
    let st = state.clone();
    match blocking(move || Ok(summary_of(&st.store, Some(&st)))).await {
        Ok(s) => Json(s).into_response(),
        Err(r) => r,
    }
}

async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(r) = check(&state, &headers) {
        return r;
    }
    let st = state.clone();
    let stats = match blocking(move || Ok(st.store.stats())).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let mut out = String::with_capacity(4096);
    state.metrics.render(&mut out);
    render_store(&mut out, &stats);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

fn render_store(out: &mut String, s: &Stats) {
    let now = crate::model::now_ms();
    let oldest_age_s = s
        .oldest_pending_ms
        .map(|t| now.saturating_sub(t) as f64 / 1000.0)
        .unwrap_or(0.0);
    let gauges: [(&str, &str, &str, f64); 12] = [
        (
            "flux_outbox_pending_keys",
            "Keys waiting for delivery.",
            "gauge",
            s.pending_keys as f64,
        ),
        (
            "flux_outbox_pending_entities",
            "Entities with keys waiting for delivery.",
            "gauge",
            s.pending_entities as f64,
        ),
        (
            "flux_outbox_oldest_pending_age_seconds",
            "Age of the value that has waited longest.",
            "gauge",
            oldest_age_s,
        ),
        (
            "flux_outbox_log_backlog",
            "Accepted updates not compacted yet.",
            "gauge",
            s.log_backlog as f64,
        ),
        (
            "flux_outbox_quarantine_keys",
            "Keys Flux rejected for good.",
            "gauge",
            s.quarantine_keys as f64,
        ),
        (
            "flux_outbox_superseded_total",
            "Values replaced by a newer value before delivery.",
            "counter",
            s.superseded as f64,
        ),
        (
            "flux_outbox_late_dropped_total",
            "Updates older than what was delivered or deleted.",
            "counter",
            s.late_dropped as f64,
        ),
        (
            "flux_outbox_delivered_keys_total",
            "Keys acknowledged by Flux.",
            "counter",
            s.delivered as f64,
        ),
        (
            "flux_outbox_quarantined_total",
            "Keys ever quarantined.",
            "counter",
            s.quarantined_total as f64,
        ),
        (
            "flux_outbox_corrupt_records_total",
            "Records set aside as corrupt.",
            "counter",
            s.corrupt_set_aside as f64,
        ),
        (
            "flux_outbox_disk_bytes",
            "Bytes the store uses on disk.",
            "gauge",
            s.disk_bytes as f64,
        ),
        (
            "flux_outbox_in_flight_entities",
            "Entities in batches being sent.",
            "gauge",
            s.in_flight_entities as f64,
        ),
    ];
    for (name, help, kind, v) in gauges {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    }
}

#[derive(Deserialize)]
struct ListQuery {
    entity: Option<String>,
    older_than: Option<String>,
    limit: Option<usize>,
}

fn limit_of(q: Option<usize>) -> usize {
    q.unwrap_or(LIST_LIMIT_DEFAULT).min(LIST_LIMIT_MAX)
}

async fn pending(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Err(r) = check(&state, &headers) {
        return r;
    }
    let older = match older_than_of(q.older_than.as_deref()) {
        Ok(o) => o,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let st = state.clone();
    match blocking(move || {
        st.store
            .pending_listing(q.entity.as_deref(), older, limit_of(q.limit))
    })
    .await
    {
        Ok(listing) => listing_response(listing),
        Err(r) => r,
    }
}

async fn quarantine(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Err(r) = check(&state, &headers) {
        return r;
    }
    let older = match older_than_of(q.older_than.as_deref()) {
        Ok(o) => o,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let st = state.clone();
    match blocking(move || {
        st.store
            .quarantine_listing(q.entity.as_deref(), older, limit_of(q.limit))
    })
    .await
    {
        Ok(listing) => listing_response(listing),
        Err(r) => r,
    }
}

/// The `older_than` parameter of the listings (`10m`, `2h 30m`) in ms; the 400 answer's
/// message when it does not parse.
fn older_than_of(q: Option<&str>) -> Result<Option<u64>, String> {
    match q.map(humantime::parse_duration) {
        Some(Err(e)) => Err(format!("older_than: {e}")),
        Some(Ok(d)) => Ok(Some(d.as_millis().min(u128::from(u64::MAX)) as u64)),
        None => Ok(None),
    }
}

/// The rows as a JSON array; records that could not be read are counted in
/// [`UNREADABLE_HEADER`] (the body stays the plain list scripts expect).
fn listing_response(listing: Listing<Row>) -> Response {
    (
        [(UNREADABLE_HEADER, listing.unreadable.to_string())],
        Json::<Vec<Row>>(listing.rows),
    )
        .into_response()
}

async fn log(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Err(r) = check(&state, &headers) {
        return r;
    }
    let st = state.clone();
    match blocking(move || st.store.log_listing(limit_of(q.limit))).await {
        Ok(listing) => (
            [(UNREADABLE_HEADER, listing.unreadable.to_string())],
            Json::<Vec<crate::store::LogRow>>(listing.rows),
        )
            .into_response(),
        Err(r) => r,
    }
}

async fn verify(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(r) = check(&state, &headers) {
        return r;
    }
    let st = state.clone();
    match blocking(move || Ok(st.store.verify())).await {
        Ok(rep) => Json(rep).into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct RequeueQuery {
    entity: Option<String>,
    #[serde(default)]
    all: bool,
}

async fn requeue(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<RequeueQuery>,
) -> Response {
    if let Err(r) = check(&state, &headers) {
        return r;
    }
    if q.entity.is_none() && !q.all {
        return error(
            StatusCode::BAD_REQUEST,
            "requeue needs entity=PREFIX or all=true",
        );
    }
    let st = state.clone();
    match blocking(move || st.store.requeue(q.entity.as_deref())).await {
        Ok(n) => {
            state.compactor.wake();
            Json(json!({ "requeued": n })).into_response()
        }
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct ExportQuery {
    #[serde(default)]
    quarantine: bool,
}

async fn export(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<ExportQuery>,
) -> Response {
    if let Err(r) = check(&state, &headers) {
        return r;
    }
    let st = state.clone();
    match blocking(move || export_counted(&st.store, q.quarantine)).await {
        Ok((body, unreadable)) => (
            [
                (header::CONTENT_TYPE, "application/x-ndjson".to_string()),
                (
                    header::HeaderName::from_static(UNREADABLE_HEADER),
                    unreadable.to_string(),
                ),
            ],
            body,
        )
            .into_response(),
        Err(r) => r,
    }
}

/// [`export_ndjson`] with the count of records that could not be read (and are not in it).
/// The same store functions as the offline export of `outbox-dump`, so that its output is
/// identical live and offline, also on a damaged store; nothing is compacted or written.
fn export_counted(store: &Store, quarantine: bool) -> Result<(String, u64), StoreError> {
    let listing = if quarantine {
        store.quarantine_listing(None, None, usize::MAX)?
    } else {
        store.folded_pending_listing()?
    };
    Ok((rows_to_ndjson(&listing.rows), listing.unreadable))
}

/// The pending newest values, with the uncompacted log folded in (or the quarantine), as
/// NDJSON in the native ingest format, one update per entity and source time, so that
/// posting it to another worker recreates them. Read-only.
pub fn export_ndjson(store: &Store, quarantine: bool) -> Result<String, StoreError> {
    export_counted(store, quarantine).map(|(body, _)| body)
}

/// Groups rows per (entity, ts) into native ingest updates, one JSON object per line.
pub fn rows_to_ndjson(rows: &[Row]) -> String {
    use std::collections::BTreeMap;
    let mut groups: BTreeMap<(String, u64), (bool, serde_json::Map<String, serde_json::Value>)> =
        BTreeMap::new();
    for r in rows {
        let g = groups.entry((r.entity.clone(), r.ts_ms)).or_default();
        if r.property == crate::model::DELETE_PROPERTY {
            g.0 = true;
        } else {
            g.1.insert(r.property.clone(), r.value.clone());
        }
    }
    let mut out = String::new();
    for ((entity, ts), (delete, props)) in groups {
        if delete {
            let _ = writeln!(
                out,
                "{}",
                json!({ "entity": entity, "delete": true, "ts": ts })
            );
        }
        if !props.is_empty() {
            let _ = writeln!(
                out,
                "{}",
                json!({ "entity": entity, "properties": props, "ts": ts })
            );
        }
    }
    out
}
