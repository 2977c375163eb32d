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
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
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

/// `ingest.body_bytes_max`, for the 413 answer's message.
#[derive(Clone, Copy)]
struct BodyLimit(usize);

pub fn router(state: Arc<AppState>, body_bytes_max: usize) -> Router {
    Router::new()
        .route("/v1/updates", post(post_updates))
        .route("/api/events", post(post_flux_single))
        .route("/api/events/batch", post(post_flux_batch))
        .layer(DefaultBodyLimit::max(body_bytes_max))
        .layer(Extension(BodyLimit(body_bytes_max)))
        // Outermost: runs before the body is read, so an unauthenticated client (or any client
        // while shutting down) cannot make the worker buffer up to `body_bytes_max`, and is
        // told 401/503 rather than 413.
        .layer(middleware::from_fn_with_state(state.clone(), gate))
        .with_state(state)
}

/// Counts the request and refuses it before its body is read when shutting down or when the
/// ingest token is missing or wrong.
async fn gate(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    state
        .metrics
        .ingest_requests
        .fetch_add(1, Ordering::Relaxed);
    if let Err(r) = admission(&state, req.headers()) {
        return r;
    }
    next.run(req).await
}

/// The checks that do not need the body: shutting down (503), ingest token (401).
fn admission(state: &AppState, headers: &HeaderMap) -> Result<(), Response> {
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
    Ok(())
}

/// The body, or the answer for a body that could not be read: axum's own rejection is
/// text/plain and uncounted, while both APIs promise `{"error": ...}` and every refusal is
/// counted by reason.
fn body_or_error(
    state: &AppState,
    limit: BodyLimit,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, Response> {
    match body {
        Ok(b) => Ok(b),
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            state.metrics.reject("body_too_large", 1);
            Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is over the limit of {} bytes (ingest.body_bytes_max); split it into smaller requests; nothing of it was stored",
                    limit.0
                ),
            ))
        }
        Err(e) => {
            state.metrics.reject("bad_body", 1);
            Err(error(
                e.status(),
                format!("cannot read the request body: {}", e.body_text()),
            ))
        }
    }
}

/// An error answer: status and a JSON body `{"error": "..."}` (Flux's shape, for both APIs).
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// Checks `Authorization: Bearer <token>` when a token is configured. The scheme name is
/// case-insensitive (RFC 9110 section 11.1): clients that send `bearer` are not refused.
pub fn authorized(headers: &HeaderMap, token: &Option<Secret>) -> bool {
    let Some(token) = token else { return true };
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim_start().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .is_some_and(|(_, given)| token.matches(given.trim()))
}

fn parse_error(metrics: &Metrics, e: ParseError) -> Response {
    metrics.reject(e.code, 1);
    error(StatusCode::BAD_REQUEST, e.to_string())
}

/// What a success answer needs of the accepted updates (their streams, in order), kept so the
/// updates themselves can move into the store without a copy.
type Accepted = Vec<Option<String>>;

/// Common path of all three endpoints: checks, durable ingest, error mapping. Returns the
/// stream of each accepted update and the sequence number of the last one.
async fn accept(
    state: &AppState,
    headers: &HeaderMap,
    limit: BodyLimit,
    body: Result<Bytes, BytesRejection>,
    parse: impl FnOnce(&[u8]) -> Result<Vec<Update>, ParseError>,
) -> Result<(Accepted, u64), Response> {
    // Checked again after the body arrived: shutdown may have begun while it was uploading,
    // and an update must not be acknowledged once the worker has started to stop.
    admission(state, headers)?;
    let body = body_or_error(state, limit, body)?;
    let updates = parse(&body).map_err(|e| parse_error(&state.metrics, e))?;
    drop(body);
    let n = updates.len() as u64;
    let streams: Accepted = updates.iter().map(|u| u.stream.clone()).collect();
    match state.store.ingest(updates).await {
        Ok(ack) => {
            state
                .metrics
                .ingest_updates_accepted
                .fetch_add(n, Ordering::Relaxed);
            state.compactor.wake();
            Ok((streams, ack.seq))
        }
        Err(e) => Err(store_error(&state.metrics, e, n)),
    }
}

/// The `flux_outbox_ingest_rejected_total` reason of a store refusal. Shared with the
/// WebSocket source so one alert (`FluxOutboxIngestRefusedFull`) sees every producer.
pub fn store_error_reason(e: &StoreError) -> &'static str {
    match e {
        StoreError::Full(_) => "outbox_full",
        StoreError::Storage(_) => "storage_error",
        StoreError::Closed => "shutting_down",
        _ => "internal",
    }
}

pub fn store_error(metrics: &Metrics, e: StoreError, n: u64) -> Response {
    metrics.reject(store_error_reason(&e), n);
    match e {
        StoreError::Full(_) => error(StatusCode::INSUFFICIENT_STORAGE, e.to_string()),
        StoreError::Storage(_) => {
            // The write may have reached sled and only the sync failed: then the updates can
            // still be delivered later. Promise only what is true: not acknowledged.
            error(
                StatusCode::INSUFFICIENT_STORAGE,
                format!(
                    "{e}; the request was NOT acknowledged: it may or may not have been stored \
                     (it may still be delivered); retry it, newest-wins makes a retry safe"
                ),
            )
        }
        StoreError::Closed => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        other => error(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    }
}

async fn post_updates(
    State(state): State<Arc<AppState>>,
    Extension(limit): Extension<BodyLimit>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let ndjson = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim_start().to_ascii_lowercase())
        // Media types are case-insensitive; parameters (charset) may follow.
        .is_some_and(|v| {
            v.starts_with("application/x-ndjson") || v.starts_with("application/jsonl")
        });
    match accept(&state, &headers, limit, body, |b| {
        ingest_parse::parse_native(b, ndjson, now_ms(), &state.rules)
    })
    .await
    {
        Ok((streams, seq)) => {
            Json(json!({ "accepted": streams.len(), "seq": seq })).into_response()
        }
        Err(r) => r,
    }
}

fn flux_event_id(seq: u64, gateway: &str) -> String {
    format!("outbox-{gateway}-{seq}")
}

async fn post_flux_single(
    State(state): State<Arc<AppState>>,
    Extension(limit): Extension<BodyLimit>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match accept(&state, &headers, limit, body, |b| {
        ingest_parse::parse_flux_single(b, &state.rules)
    })
    .await
    {
        Ok((streams, seq)) => {
            let stream = streams
                .into_iter()
                .next()
                .flatten()
                .unwrap_or_else(|| state.default_stream.clone());
            Json(json!({ "eventId": flux_event_id(seq, &state.gateway_id), "stream": stream }))
                .into_response()
        }
        Err(r) => r,
    }
}

async fn post_flux_batch(
    State(state): State<Arc<AppState>>,
    Extension(limit): Extension<BodyLimit>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match accept(&state, &headers, limit, body, |b| {
        ingest_parse::parse_flux_batch(b, &state.rules)
    })
    .await
    {
        Ok((streams, last_seq)) => {
            let n = streams.len() as u64;
            // The store numbers the updates of one request consecutively, ending at last_seq.
            let first = (last_seq + 1).saturating_sub(n);
            let results: Vec<_> = streams
                .into_iter()
                .enumerate()
                .map(|(i, stream)| {
                    json!({
                        "eventId": flux_event_id(first + i as u64, &state.gateway_id),
                        "stream": stream.unwrap_or_else(|| state.default_stream.clone()),
                        "error": null,
                    })
                })
                .collect();
            Json(json!({ "successful": n, "failed": 0, "results": results })).into_response()
        }
        Err(r) => r,
    }
}

#[cfg(test)]
mod storage_error_message_tests {
    use super::*;

    #[tokio::test]
    async fn a_storage_error_never_claims_that_nothing_was_stored() {
        let metrics = Metrics::new(false);
        let r = store_error(&metrics, StoreError::Storage("fdatasync: EIO".into()), 3);
        assert_eq!(r.status(), StatusCode::INSUFFICIENT_STORAGE);
        let body = axum::body::to_bytes(r.into_body(), 1 << 16)
            .await
            .expect("body");
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("NOT acknowledged"), "{text}");
        assert!(text.contains("may or may not have been stored"), "{text}");
        assert!(
            !text.contains("nothing of this request was stored"),
            "{text}"
        );
    }
}
