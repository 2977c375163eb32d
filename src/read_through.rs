//! Read-your-writes for Flux clients on the gateway: Flux's read API served on the ingest
//! listener, answering with Flux's current state overlaid with this gateway's pending values.
//!
//! | route | answer (shapes identical to Flux's) |
//! |---|---|
//! | `GET /api/state/entities/{id}` | `200 {"id","properties","lastUpdated"}`, or `404 {"error":"Entity not found"}` |
//! | `GET /api/state/entities?prefix=P&namespace=N` | `200 [ {"id","properties","lastUpdated"}, ... ]` (sorted by id) |
//!
//! Every answer carries `X-Flux-Outbox-Flux`: `reached` (Flux answered), `unreachable` (Flux
//! did not answer within `read_through.flux_timeout`, or answered with an error: the answer is
//! the pending values alone) or `offline` (no Flux URL configured). `X-Flux-Outbox-Truncated:
//! true` says the overlay hit `read_through.pending_rows_max`. Ids are percent-decoded like
//! Flux's (`%2F` for `/`; an unencoded `/` does not match the route and gives a bodiless 404,
//! as Flux does).
//!
//! Overlay rules, per entity: a pending delete hides Flux's state and every pending value not
//! newer than it (the entity is absent unless newer values are pending); otherwise each pending
//! property replaces Flux's value of that property (it is what the gateway will write).
//! Properties the gateway never wrote (other agents' `command`, ...) come from Flux untouched.
//! Quarantined values are not shown (they will not be delivered). `lastUpdated` is Flux's when
//! nothing is overlaid, else the newest of Flux's and the overlaid values' arrival times.
//!
//! `flush.conflict_policy` and `flush.merge` are not applied to the overlay: a pending value
//! shows as the gateway holds it, which is what it will write under the default `overwrite`
//! policy. Under `keep-remote` a key that someone else changed in Flux after this gateway last
//! delivered it is not written; the overlay still shows the pending value until the flusher's
//! next round settles the key (it then leaves the pending set, and reads show Flux's value). In
//! read-merge-write mode an object value shows as sent by the producer, not merged with the
//! fields others set inside Flux's value. Deciding either needs the delivery record and the
//! merge rules of the flusher per key on every read; a read that mirrors them exactly would
//! still be a prediction (Flux may change before the flusher reads it), so reads stay simple
//! and cheap. During an outage (`unreachable`) neither can be decided anyway.
//!
//! Why the uncompacted log is read too: ingest acknowledges before the compactor folds an update
//! into the pending set, and a client reading straight after its write must see it. The log is
//! read before the pending set, so an update moving from one to the other in between is seen.
//!
//! Cost: the store's pending listing walks the whole pending index (filtered by prefix), so a
//! read costs O(pending keys), bounded by `pending_rows_max` matches; reads need no token unless
//! `read_through.require_token` (Flux's reads need none either).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::flux_client::EntityState;
use crate::ingest::{authorized, error, AppState};
use crate::model::{Version, DELETE_PROPERTY};

/// The header saying whether Flux was reached.
pub const FLUX_HEADER: &str = "x-flux-outbox-flux";
/// The header saying the overlay was cut at `pending_rows_max`.
pub const TRUNCATED_HEADER: &str = "x-flux-outbox-truncated";

/// `[read_through]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReadThroughConfig {
    pub enabled: bool,
    /// Require the ingest token (`Authorization: Bearer`) for reads.
    pub require_token: bool,
    /// How long a read waits for Flux before answering from the outbox alone.
    #[serde(with = "crate::config::duration")]
    pub flux_timeout: Duration,
    /// Most pending (and most uncompacted log) rows one read overlays.
    pub pending_rows_max: usize,
}

impl Default for ReadThroughConfig {
    fn default() -> Self {
        ReadThroughConfig {
            enabled: true,
            require_token: false,
            flux_timeout: Duration::from_secs(2),
            pending_rows_max: 100_000,
        }
    }
}

pub(crate) fn check_config(c: &ReadThroughConfig) -> Result<(), (&'static str, String)> {
    if c.flux_timeout.is_zero() || c.flux_timeout > Duration::from_secs(60) {
        return Err((
            "read_through.flux_timeout",
            "must be between 1ms and 60s".into(),
        ));
    }
    if c.pending_rows_max == 0 || c.pending_rows_max > 10_000_000 {
        return Err((
            "read_through.pending_rows_max",
            "must be between 1 and 10000000".into(),
        ));
    }
    Ok(())
}

/// Whether Flux took part in an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    Reached,
    Unreachable,
    Offline,
}

impl Reach {
    pub fn as_str(self) -> &'static str {
        match self {
            Reach::Reached => "reached",
            Reach::Unreachable => "unreachable",
            Reach::Offline => "offline",
        }
    }
}

struct Ctx {
    app: Arc<AppState>,
    cfg: ReadThroughConfig,
}

/// The read routes (an empty router when disabled), to merge into the ingest router.
pub fn router(app: Arc<AppState>, cfg: &ReadThroughConfig) -> Router {
    if !cfg.enabled {
        return Router::new();
    }
    let ctx = Arc::new(Ctx {
        app,
        cfg: cfg.clone(),
    });
    Router::new()
        .route("/api/state/entities", get(list))
        .route("/api/state/entities/{id}", get(one))
        .with_state(ctx)
}

/// Pending values of one entity, newest per property, with the newest pending delete.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overlay {
    pub delete: Option<Version>,
    /// property -> (version, value, arrival ms)
    pub props: BTreeMap<String, (Version, Value, u64)>,
}

impl Overlay {
    fn put(&mut self, property: &str, version: Version, value: Value, arrived_ms: u64) {
        if property == DELETE_PROPERTY {
            if self.delete.is_none_or(|d| version > d) {
                self.delete = Some(version);
            }
            return;
        }
        match self.props.get(property) {
            Some((v, _, _)) if *v >= version => {}
            _ => {
                self.props
                    .insert(property.to_string(), (version, value, arrived_ms));
            }
        }
    }
}

/// Flux's entity (if any) with the overlay applied: `None` when the entity does not exist.
/// Returns (properties, lastUpdated in epoch ns).
pub fn merge(
    flux: Option<&EntityState>,
    overlay: Option<&Overlay>,
) -> Option<(Map<String, Value>, Option<u64>)> {
    let deleted = overlay.and_then(|o| o.delete);
    let (mut props, mut last_ns, mut exists) = match (flux, deleted) {
        (Some(e), None) => (e.properties.clone(), e.last_updated_ns, true),
        _ => (Map::new(), None, false),
    };
    if let Some(o) = overlay {
        for (name, (version, value, arrived_ms)) in &o.props {
            if deleted.is_some_and(|d| *version <= d) {
                continue;
            }
            props.insert(name.clone(), value.clone());
            let ns = arrived_ms.saturating_mul(1_000_000);
            last_ns = Some(last_ns.map_or(ns, |l| l.max(ns)));
            exists = true;
        }
    }
    exists.then_some((props, last_ns))
}

fn render_entity(id: &str, props: Map<String, Value>, last_ns: Option<u64>) -> Value {
    let t = UNIX_EPOCH + Duration::from_nanos(last_ns.unwrap_or(0));
    json!({
        "id": id,
        "properties": props,
        "lastUpdated": crate::sim::rfc3339_nanos(if last_ns.is_some() { t } else { SystemTime::now() }),
    })
}

/// Reads the uncompacted log, then the pending set, for entities matching `filter`.
fn collect_overlays(
    app: &AppState,
    scan_prefix: &str,
    filter: &(dyn Fn(&str) -> bool + Send + Sync),
    rows_max: usize,
) -> Result<(BTreeMap<String, Overlay>, bool), crate::store::StoreError> {
    let mut out: BTreeMap<String, Overlay> = BTreeMap::new();
    let mut truncated = false;
    let log = app.store.log_rows(rows_max)?;
    truncated |= log.len() >= rows_max;
    for r in log {
        if !filter(&r.entity) {
            continue;
        }
        let version = Version {
            ts_ms: r.ts_ms,
            seq: r.seq,
        };
        let o = out.entry(r.entity.clone()).or_default();
        if r.delete {
            o.put(DELETE_PROPERTY, version, Value::Bool(true), r.arrived_ms);
        }
        for (name, value) in r.properties {
            o.put(&name, version, value, r.arrived_ms);
        }
    }
    let pending = app.store.pending_rows(Some(scan_prefix), None, rows_max)?;
    truncated |= pending.len() >= rows_max;
    for r in pending {
        if !filter(&r.entity) {
            continue;
        }
        let version = Version {
            ts_ms: r.ts_ms,
            seq: r.seq,
        };
        out.entry(r.entity.clone()).or_default().put(
            &r.property,
            version,
            r.value,
            r.pending_since_ms,
        );
    }
    Ok((out, truncated))
}

// A ready-made error answer is the natural error here, as in `admin::check`.
#[allow(clippy::result_large_err)]
fn check_token(ctx: &Ctx, headers: &HeaderMap) -> Result<(), Response> {
    if ctx.cfg.require_token && !authorized(headers, &ctx.app.ingest_token) {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong ingest token (Authorization: Bearer <token>)",
        ));
    }
    Ok(())
}

fn with_headers(mut r: Response, reach: Reach, truncated: bool) -> Response {
    let h = r.headers_mut();
    h.insert(
        HeaderName::from_static(FLUX_HEADER),
        HeaderValue::from_static(reach.as_str()),
    );
    if truncated {
        h.insert(
            HeaderName::from_static(TRUNCATED_HEADER),
            HeaderValue::from_static("true"),
        );
    }
    r
}

/// Runs a Flux read within the configured timeout.
async fn ask_flux<T>(
    ctx: &Ctx,
    read: impl std::future::Future<Output = Result<T, crate::flux_client::ReadError>>,
) -> (Reach, Option<T>) {
    match tokio::time::timeout(ctx.cfg.flux_timeout, read).await {
        Ok(Ok(v)) => (Reach::Reached, Some(v)),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "read-through: Flux read failed; answering from the outbox");
            (Reach::Unreachable, None)
        }
        Err(_) => {
            tracing::debug!("read-through: Flux read timed out; answering from the outbox");
            (Reach::Unreachable, None)
        }
    }
}

async fn overlays(
    ctx: &Arc<Ctx>,
    scan_prefix: String,
    filter: Box<dyn Fn(&str) -> bool + Send + Sync>,
) -> Result<(BTreeMap<String, Overlay>, bool), Response> {
    let c = ctx.clone();
    let max = ctx.cfg.pending_rows_max;
    match tokio::task::spawn_blocking(move || collect_overlays(&c.app, &scan_prefix, &*filter, max))
        .await
    {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
        Err(e) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("task failed: {e}"),
        )),
    }
}

async fn one(State(ctx): State<Arc<Ctx>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(r) = check_token(&ctx, &headers) {
        return r;
    }
    // Flux and the store are read concurrently; neither waits for the other.
    let flux_read = async {
        match &ctx.app.flux {
            None => (Reach::Offline, None),
            Some(client) => {
                let (reach, v) = ask_flux(&ctx, client.get_entity(&id)).await;
                (reach, v.flatten())
            }
        }
    };
    let want = id.clone();
    let local = overlays(&ctx, id.clone(), Box::new(move |e| e == want));
    let ((reach, remote), local) = tokio::join!(flux_read, local);
    let (mut ov, truncated) = match local {
        Ok(v) => v,
        Err(r) => return with_headers(r, reach, false),
    };
    let answer = match merge(remote.as_ref(), ov.remove(&id).as_ref()) {
        Some((props, last)) => Json(render_entity(&id, props, last)).into_response(),
        None => error(StatusCode::NOT_FOUND, "Entity not found"),
    };
    with_headers(answer, reach, truncated)
}

#[derive(Deserialize)]
struct ListQuery {
    prefix: Option<String>,
    namespace: Option<String>,
}

/// Flux's namespace of an id: the text before its first `/` (the whole id when it has none).
fn namespace_of(id: &str) -> &str {
    id.split_once('/').map_or(id, |(ns, _)| ns)
}

async fn list(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Err(r) = check_token(&ctx, &headers) {
        return r;
    }
    let prefix = q.prefix.unwrap_or_default();
    let namespace = q.namespace;
    let matches = {
        let (prefix, namespace) = (prefix.clone(), namespace.clone());
        move |id: &str| {
            id.starts_with(&prefix) && namespace.as_deref().is_none_or(|n| namespace_of(id) == n)
        }
    };
    // A namespace narrows the scan as a prefix too (a superset, filtered exactly above).
    let scan = match &namespace {
        Some(n) if n.starts_with(&prefix) => n.clone(),
        _ => prefix.clone(),
    };
    let flux_read = async {
        match &ctx.app.flux {
            None => (Reach::Offline, None),
            Some(client) => ask_flux(&ctx, client.list_prefix(&scan)).await,
        }
    };
    let local = overlays(&ctx, scan.clone(), Box::new(matches.clone()));
    let ((reach, remote), local) = tokio::join!(flux_read, local);
    let (mut ov, truncated) = match local {
        Ok(v) => v,
        Err(r) => return with_headers(r, reach, false),
    };
    let mut out: BTreeMap<String, Value> = BTreeMap::new();
    for e in remote.unwrap_or_default() {
        if !matches(&e.id) {
            continue;
        }
        let o = ov.remove(&e.id);
        if let Some((props, last)) = merge(Some(&e), o.as_ref()) {
            out.insert(e.id.clone(), render_entity(&e.id, props, last));
        }
    }
    for (id, o) in ov {
        if let Some((props, last)) = merge(None, Some(&o)) {
            out.insert(id.clone(), render_entity(&id, props, last));
        }
    }
    let list: Vec<Value> = out.into_values().collect();
    with_headers(Json(list).into_response(), reach, truncated)
}
