//! The ingest API (axum): where producers hand updates to the outbox.
//!
//! - `POST /v1/updates`: the native shape (JSON object, array, or NDJSON with
//!   `Content-Type: application/x-ndjson`); answers `200 {"accepted": n, "seq": last}`.
//! - `POST /api/events`, `POST /api/events/batch`: Flux's own shapes and answers, so an existing
//!   Flux producer points its `FLUX_URL` at the gateway and gains durability unchanged.
//!
//! Every answer of success is sent only after the updates are durable (group commit in the
//! store). Bad input is refused whole with a 400 that names the item and the reason; nothing of
//! a refused request is stored. Status codes: 401 without the ingest token (when configured),
//! 413 over the body limit, 507 when the outbox is full for new keys or the disk refuses the
//! write, 503 while shutting down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;

use crate::compactor::Waker;
use crate::config::Secret;
use crate::ingest_parse::{self, ParseError};
use crate::metrics::Metrics;
use crate::model::{now_ms, Update};
use crate::store::{Store, StoreError};
use crate::validate::Rules;

/// Shared by the ingest and admin routers.
pub struct AppState {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub rules: Rules,
    pub ingest_token: Option<Secret>,
    pub admin_token: Option<Secret>,
    pub shutting_down: AtomicBool,
    pub compactor: Waker,
    pub default_stream: String,
    /// Flux client for read-your-writes reads (None in offline mode).
    pub flux: Option<crate::flux_client::FluxClient>,
    pub gateway_id: String,
}

pub fn router(state: Arc<AppState>, body_bytes_max: usize) -> Router {
    Router::new()
        .route("/v1/updates", post(post_updates))
        .route("/api/events", post(post_flux_single))
        .route("/api/events/batch", post(post_flux_batch))
        .layer(DefaultBodyLimit::max(body_bytes_max))
        .with_state(state)
}

/// An error answer: status and a JSON body `{"error": "..."}` (Flux's shape, for both APIs).
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// Checks `Authorization: Bearer <token>` when a token is configured.
pub fn authorized(headers: &HeaderMap, token: &Option<Secret>) -> bool {
    let Some(token) = token else { return true };
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| token.matches(given.trim()))
}

fn parse_error(metrics: &Metrics, e: ParseError) -> Response {
    metrics.reject(e.code, 1);
    error(StatusCode::BAD_REQUEST, e.to_string())
}

/// Common path of all three endpoints: checks, durable ingest, error mapping.
async fn accept(
    state: &AppState,
    headers: &HeaderMap,
    parse: impl FnOnce() -> Result<Vec<Update>, ParseError>,
) -> Result<(Vec<Update>, u64), Response> {
    state
        .metrics
        .ingest_requests
        .fetch_add(1, Ordering::Relaxed);
    if state.shutting_down.load(Ordering::SeqCst) {
        state.metrics.reject("shutting_down", 1);
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "flux-outbox is shutting down; retry against the restarted worker",
        ));
    }
    if !authorized(headers, &state.ingest_token) {
        state.metrics.reject("unauthorized", 1);
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong ingest token (Authorization: Bearer <token>)",
        ));
    }
    let updates = parse().map_err(|e| parse_error(&state.metrics, e))?;
    let n = updates.len() as u64;
    match state.store.ingest(updates.clone()).await {
        Ok(ack) => {
            state
                .metrics
                .ingest_updates_accepted
                .fetch_add(n, Ordering::Relaxed);
            state.compactor.wake();
            Ok((updates, ack.seq))
        }
        Err(e) => Err(store_error(&state.metrics, e, n)),
    }
}

pub fn store_error(metrics: &Metrics, e: StoreError, n: u64) -> Response {
    match e {
        StoreError::Full(_) => {
            metrics.reject("outbox_full", n);
            error(StatusCode::INSUFFICIENT_STORAGE, e.to_string())
        }
        StoreError::Storage(_) => {
            metrics.reject("storage_error", n);
            error(
                StatusCode::INSUFFICIENT_STORAGE,
                format!("{e}; nothing of this request was stored"),
            )
        }
        StoreError::Closed => {
            metrics.reject("shutting_down", n);
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        other => {
            metrics.reject("internal", n);
            error(StatusCode::INTERNAL_SERVER_ERROR, other.to_string())
        }
    }
}

async fn post_updates(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let ndjson = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.starts_with("application/x-ndjson") || v.starts_with("application/jsonl")
        });
    match accept(&state, &headers, || {
        ingest_parse::parse_native(&body, ndjson, now_ms(), &state.rules)
    })
    .await
    {
        Ok((updates, seq)) => {
            Json(json!({ "accepted": updates.len(), "seq": seq })).into_response()
        }
        Err(r) => r,
    }
}

fn flux_event_id(seq: u64, gateway: &str) -> String {
    format!("outbox-{gateway}-{seq}")
}

async fn post_flux_single(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match accept(&state, &headers, || {
        ingest_parse::parse_flux_single(&body, &state.rules)
    })
    .await
    {
        Ok((updates, seq)) => {
            let stream = updates
                .first()
                .and_then(|u| u.stream.clone())
                .unwrap_or_else(|| state.default_stream.clone());
            Json(json!({ "eventId": flux_event_id(seq, &state.gateway_id), "stream": stream }))
                .into_response()
        }
        Err(r) => r,
    }
}

async fn post_flux_batch(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match accept(&state, &headers, || {
        ingest_parse::parse_flux_batch(&body, &state.rules)
    })
    .await
    {
        Ok((updates, last_seq)) => {
            let n = updates.len() as u64;
            let first = last_seq + 1 - n;
            let results: Vec<_> = updates
                .iter()
                .enumerate()
                .map(|(i, u)| {
                    json!({
                        "eventId": flux_event_id(first + i as u64, &state.gateway_id),
                        "stream": u.stream.clone().unwrap_or_else(|| state.default_stream.clone()),
                        "error": null,
                    })
                })
                .collect();
            Json(json!({ "successful": n, "failed": 0, "results": results })).into_response()
        }
        Err(r) => r,
    }
}
