//! The Flux client: HTTP calls, answer parsing and failure classification.
//!
//! The parsers and classifiers ([`classify_batch_answer`], [`classify_single_answer`],
//! [`parse_entity_answer`], [`parse_list_answer`]) are pure functions of a recorded answer, so
//! they are tested against every case of Flux's recorded transcript. [`FluxClient`] only does the
//! HTTP and feeds them.
//!
//! # Failure taxonomy: what the flush worker does with each outcome
//!
//! Flux's traps (see the shared flux-api notes): batch results are matched by POSITION; a failure
//! answer is not proof of non-delivery; Flux does not deduplicate; arrival order wins.
//!
//! | outcome | meaning | worker action |
//! |---|---|---|
//! | [`EventOutcome::Applied`] | in Flux's event log | **ack** the exact versions carried |
//! | [`EventOutcome::Invalid`] | `validation failed: ...` (bad stream, empty source, ts 0) | **quarantine** the keys with the reason; will never succeed |
//! | [`EventOutcome::AuthFailed`] | `authorization failed: ...` | entity id unusable in public mode ([`EventOutcome::is_permanent`]) → **quarantine**; otherwise token/namespace problem → keep, **pause slowly** (operator must fix config) |
//! | [`EventOutcome::RateLimited`] | `rate limit exceeded` inside a 200 | keep; **back off** (no Retry-After in a batch; the bucket refills at 10,000/min) and lower the send rate |
//! | [`EventOutcome::Unknown`] | `publish failed: ...` or unrecognised | **unknown outcome**: keep, back off with jitter, re-read the entity and resend (the event may still be applied later) |
//! | [`BatchOutcome::WholeBatchRejected`] | 400: one malformed event fails all, nothing published | **split** the batch and resend halves; a single event rejected this way → quarantine |
//! | [`BatchOutcome::TooLarge`] | 413 (JSON or `text/plain`) | **split**; a single event that is too large → quarantine |
//! | [`BatchOutcome::Unauthorized`] | 401/403 for the whole request | keep everything, **pause slowly** and alert: config problem |
//! | [`BatchOutcome::RateLimited`] | 429 | keep, **back off honoring Retry-After** (Flux always says 60) |
//! | [`BatchOutcome::Unknown`] | 500 (`Failed to await publish ack`), other 5xx, unparsable answer, timeout, reset, DNS, TLS | **unknown outcome** for every event: keep, back off with jitter, re-read and resend |
//!
//! Unknown outcomes are normal, not exceptional: a client timeout cancels the request, but
//! events Flux already handed to its log are applied. That is why the worker re-reads before it
//! resends (see `merge`), and why an old value must never be retried after a newer one was
//! acknowledged.
//!
//! Secrets: the bearer token lives in [`Secret`], whose `Debug`/`Display` print `[redacted]`; it
//! is only placed into the `Authorization` header (marked sensitive) and every error string the
//! client builds is passed through a redaction step that removes it, even if a server or proxy
//! echoes it back.

use std::fmt;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::model::{DELETE_PROPERTY, EVENT_BYTES_MAX};

/// Flux refuses a request body past 2 MiB (413, text/plain).
pub const FLUX_REQUEST_BYTES_MAX: usize = 2 * 1024 * 1024;
/// Longest reason text kept from an answer: bounds memory and log lines.
pub const REASON_BYTES_MAX: usize = 512;
/// Most bytes read from a write answer (about 100 bytes per event result).
pub const WRITE_ANSWER_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Most bytes read from a read answer (a prefix list is not paginated by Flux).
pub const READ_ANSWER_BYTES_MAX: usize = 256 * 1024 * 1024;
/// Longest Retry-After honoured; a larger value is clamped (a misbehaving proxy must not stall
/// the worker for days).
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(15 * 60);

// ---------------------------------------------------------------------------------------------
// Secret

/// A bearer token. `Debug` and `Display` print `[redacted]`; read it with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(token: impl Into<String>) -> Self {
        Secret(token.into())
    }
    /// The token itself. Call only to build the Authorization header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration and errors

/// Client settings. `Debug` never shows the token (it is a [`Secret`]).
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `http://host:port` or `https://host:port[/prefix]`; `/api/...` is appended.
    pub base_url: String,
    pub auth_token: Option<Secret>,
    pub connect_timeout: Duration,
    /// Whole request, connect to last body byte. Flux may spend ~5 s per event when its log is
    /// down, so a timeout here is an unknown outcome, not a failure.
    pub request_timeout: Duration,
    /// Longest silence between two reads of the answer.
    pub read_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// Extra CA certificates (PEM, one or more) trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    pub user_agent: String,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            base_url: "http://127.0.0.1:3000".to_string(),
            auth_token: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
            read_timeout: Duration::from_secs(30),
            pool_max_idle_per_host: 8,
            ca_file: None,
            user_agent: concat!("flux-outbox/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

/// Building the client failed: a configuration problem, reported with what, where and why.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid Flux base URL {url:?}: {reason}")]
    InvalidBaseUrl { url: String, reason: String },
    #[error("cannot use CA file {path:?}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("invalid Flux auth token: {reason}")]
    InvalidToken { reason: String },
    #[error("cannot build the HTTP client: {reason}")]
    Build { reason: String },
}

/// A read (`GET`) failed. Transport problems and unexpected answers are retryable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("Flux read transport error: {reason}")]
    Transport { reason: String },
    #[error("Flux read answered {status}: {reason}")]
    Status { status: u16, reason: String },
    #[error("Flux read answer unparsable: {reason}")]
    Parse { reason: String },
}

// ---------------------------------------------------------------------------------------------
// Events

/// One Flux event. Serializes to
/// `{"stream","source","timestamp","payload":{"entity_id","properties"},"eventId"}`.
#[derive(Clone, Debug, PartialEq)]
pub struct FluxEvent {
    pub stream: String,
    pub source: String,
    /// Epoch milliseconds; Flux requires a positive i64.
    pub timestamp_ms: u64,
    pub entity_id: String,
    pub properties: Map<String, Value>,
    /// Sent as `eventId`; `None` lets Flux generate one. Flux does not deduplicate on it.
    pub event_id: Option<String>,
}

#[derive(Serialize)]
struct WireEvent<'a> {
    stream: &'a str,
    source: &'a str,
    timestamp: u64,
    payload: WirePayload<'a>,
    #[serde(rename = "eventId", skip_serializing_if = "Option::is_none")]
    event_id: Option<&'a str>,
}

#[derive(Serialize)]
struct WirePayload<'a> {
    entity_id: &'a str,
    properties: &'a Map<String, Value>,
}

impl Serialize for FluxEvent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        WireEvent {
            stream: &self.stream,
            source: &self.source,
            timestamp: self.timestamp_ms,
            payload: WirePayload {
                entity_id: &self.entity_id,
                properties: &self.properties,
            },
            event_id: self.event_id.as_deref(),
        }
        .serialize(s)
    }
}

/// Counts bytes instead of storing them.
struct CountingWriter(usize);

impl std::io::Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Bytes of `{"events":[` plus `]}`.
const BATCH_ENVELOPE_BYTES: usize = r#"{"events":[]}"#.len();
/// Flux adds a generated eventId (`,"eventId":"<36-char uuid>"`) when the event has none.
const GENERATED_EVENT_ID_BYTES: usize = ",\"eventId\":\"\"".len() + 36;

impl FluxEvent {
    /// Exact size of this event's compact JSON, without building it (serializes into a counter).
    pub fn encoded_len(&self) -> usize {
        let mut w = CountingWriter(0);
        // Serializing a Map of Values into a counter cannot fail; 0 would only undercount.
        let _ = serde_json::to_writer(&mut w, self);
        w.0
    }

    /// The size Flux will see for this event once it has added an eventId (when we sent none).
    pub fn flux_encoded_len(&self) -> usize {
        self.encoded_len()
            + if self.event_id.is_none() {
                GENERATED_EVENT_ID_BYTES
            } else {
                0
            }
    }

    /// Local checks of what Flux would reject, refuse silently, or misread. Run before sending:
    /// Flux validates some of these per event, treats a wrong type as a whole-batch 400, and
    /// silently ignores others.
    pub fn validate(&self) -> Result<(), String> {
        if !valid_stream(&self.stream) {
            return Err(format!(
                "invalid stream {:?}: only [a-z0-9.], no leading, trailing or doubled dot",
                truncate(&self.stream)
            ));
        }
        if self.source.is_empty() {
            return Err("source is empty".to_string());
        }
        if self.timestamp_ms == 0 || self.timestamp_ms > i64::MAX as u64 {
            return Err(format!(
                "timestamp {} is not a positive i64",
                self.timestamp_ms
            ));
        }
        if self.entity_id.is_empty() {
            return Err("entity_id is empty".to_string());
        }
        if self.properties.is_empty() {
            return Err("no properties".to_string());
        }
        if let Some(v) = self.properties.get(DELETE_PROPERTY) {
            // The tombstone must be exactly {"__deleted__": true}; anything else is an accident.
            if self.properties.len() != 1 || v != &Value::Bool(true) {
                return Err(format!(
                    "{DELETE_PROPERTY} may only be sent alone with the value true"
                ));
            }
        }
        let len = self.flux_encoded_len();
        if len >= EVENT_BYTES_MAX {
            return Err(format!("event is {len} bytes, limit {EVENT_BYTES_MAX}"));
        }
        Ok(())
    }
}

fn valid_stream(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && !s.ends_with('.')
        && !s.contains("..")
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.')
}

/// Exact size of the batch request body `{"events":[e1,e2,...]}` for events of these sizes.
pub fn batch_body_len(event_lens: impl IntoIterator<Item = usize>) -> usize {
    let mut total = BATCH_ENVELOPE_BYTES;
    let mut n = 0usize;
    for len in event_lens {
        total += len;
        n += 1;
    }
    total + n.saturating_sub(1)
}

fn batch_body(events: &[FluxEvent]) -> Vec<u8> {
    #[derive(Serialize)]
    struct Body<'a> {
        events: &'a [FluxEvent],
    }
    let mut buf = Vec::with_capacity(batch_body_len(events.iter().map(|_| 256)));
    // Cannot fail: FluxEvent's fields are strings, integers and JSON values.
    let _ = serde_json::to_writer(&mut buf, &Body { events });
    buf
}

// ---------------------------------------------------------------------------------------------
// Outcomes

/// What Flux did with one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventOutcome {
    /// In Flux's event log (will be applied).
    Applied { event_id: String },
    /// `validation failed: ...` (or a 400 on the single-event endpoint): never succeeds.
    Invalid { reason: String },
    /// `authorization failed: ...` (batch) or a per-entity 401/403 (single).
    AuthFailed { reason: String },
    /// `rate limit exceeded` inside a 200 batch answer.
    RateLimited,
    /// `publish failed: ...` or anything unrecognised: may or may not be applied.
    Unknown { reason: String },
}

impl EventOutcome {
    /// The event will never be accepted as it is: quarantine its keys.
    /// For `AuthFailed` that is only when the entity id itself is unusable (public mode wants
    /// exactly `namespace/rest`); a missing, wrong or foreign token is fixable by config.
    pub fn is_permanent(&self) -> bool {
        match self {
            EventOutcome::Invalid { .. } => true,
            EventOutcome::AuthFailed { reason } => is_entity_id_auth_problem(reason),
            _ => false,
        }
    }
    /// Keep the keys and try again later (after a back-off, and a re-read for `Unknown`).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, EventOutcome::Applied { .. }) && !self.is_permanent()
    }
}

/// The answer to a batch (or single-event) POST as a whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchOutcome {
    /// 200: one outcome per event sent, in request order.
    PerEvent(Vec<EventOutcome>),
    /// 400 with Flux's JSON error: one malformed event failed the whole batch; nothing published.
    WholeBatchRejected { reason: String },
    /// 413: the request body is too large.
    TooLarge,
    /// 401/403 for the whole request.
    Unauthorized { status: u16, reason: String },
    /// 429.
    RateLimited { retry_after: Option<Duration> },
    /// 500 and other 5xx, unexpected status, unparsable answer, timeout, reset, DNS, TLS.
    Unknown { reason: String },
}

impl BatchOutcome {
    /// Worth sending again unchanged after a pause (rate limit, unknown outcome).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            BatchOutcome::RateLimited { .. } | BatchOutcome::Unknown { .. }
        )
    }
    /// The batch must be split to find the bad or oversized event.
    pub fn needs_split(&self) -> bool {
        matches!(
            self,
            BatchOutcome::WholeBatchRejected { .. } | BatchOutcome::TooLarge
        )
    }
    /// Some events may have been applied although this answer does not say so.
    pub fn is_unknown(&self) -> bool {
        match self {
            BatchOutcome::Unknown { .. } => true,
            BatchOutcome::PerEvent(v) => {
                v.iter().any(|e| matches!(e, EventOutcome::Unknown { .. }))
            }
            _ => false,
        }
    }
    /// Retry-After to honour, if the server gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            BatchOutcome::RateLimited { retry_after } => *retry_after,
            _ => None,
        }
    }
}

fn is_entity_id_auth_problem(reason: &str) -> bool {
    // Flux: "Failed to parse entity_id '...'", "Entity ID '...' missing namespace prefix",
    // batch: "authorization failed: Invalid entity ID: ...".
    let r = reason.to_ascii_lowercase();
    r.contains("entity_id") || r.contains("entity id")
}

// ---------------------------------------------------------------------------------------------
// Pure classifiers

/// Keep reasons short and on one line.
fn truncate(s: &str) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.len() <= REASON_BYTES_MAX {
        return one_line;
    }
    let mut end = REASON_BYTES_MAX;
    while !one_line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &one_line[..end])
}

/// The `error` string of a Flux JSON error body, if the body is one.
fn flux_error_message(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get("error")?.as_str().map(truncate)
}

/// A short human description of any answer body, for reasons.
fn body_reason(body: &[u8]) -> String {
    if let Some(msg) = flux_error_message(body) {
        return msg;
    }
    if body.is_empty() {
        return "empty body".to_string();
    }
    truncate(&String::from_utf8_lossy(
        &body[..body.len().min(REASON_BYTES_MAX * 2)],
    ))
}

/// Parse a `Retry-After` header: delta-seconds only (Flux sends `60`); HTTP dates give `None`,
/// and the caller falls back to its own back-off. Clamped to [`RETRY_AFTER_MAX`].
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let secs: u64 = value.trim().parse().ok()?;
    Some(Duration::from_secs(secs).min(RETRY_AFTER_MAX))
}

fn classify_event_error(err: &str) -> EventOutcome {
    let reason = truncate(err);
    if err.starts_with("validation failed") {
        EventOutcome::Invalid { reason }
    } else if err.starts_with("authorization failed") {
        EventOutcome::AuthFailed { reason }
    } else if err.starts_with("rate limit exceeded") {
        EventOutcome::RateLimited
    } else {
        // "publish failed: ..." and anything Flux may add later: not proof either way.
        EventOutcome::Unknown { reason }
    }
}

fn classify_batch_result(r: &Value) -> EventOutcome {
    let Some(obj) = r.as_object() else {
        return EventOutcome::Unknown {
            reason: "batch result is not an object".to_string(),
        };
    };
    match (obj.get("error"), obj.get("eventId")) {
        (None | Some(Value::Null), Some(Value::String(id))) => EventOutcome::Applied {
            event_id: id.clone(),
        },
        (Some(Value::String(err)), _) => classify_event_error(err),
        _ => EventOutcome::Unknown {
            reason: truncate(&format!("unrecognised batch result {r}")),
        },
    }
}

/// Classify the answer to `POST /api/events/batch` (see the module doc for what each means).
/// `content_type` is informational: Flux's 413 is `text/plain`, and a JSON body is parsed
/// whatever the header says.
pub fn classify_batch_answer(
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
    retry_after: Option<Duration>,
    events_sent: usize,
) -> BatchOutcome {
    match status {
        200 => {
            let parsed: Result<Value, _> = serde_json::from_slice(body);
            let results = match parsed {
                Ok(v) => match v.get("results").and_then(Value::as_array) {
                    Some(r) => r.clone(),
                    None => {
                        return BatchOutcome::Unknown {
                            reason: "200 batch answer without a results array".to_string(),
                        }
                    }
                },
                Err(e) => {
                    return BatchOutcome::Unknown {
                        reason: format!(
                            "200 batch answer is not JSON ({}): {e}",
                            content_type.unwrap_or("no content type")
                        ),
                    }
                }
            };
            if results.len() != events_sent {
                // Position matching is impossible: nothing can be acked or quarantined safely.
                return BatchOutcome::Unknown {
                    reason: format!(
                        "200 batch answer has {} results for {events_sent} events",
                        results.len()
                    ),
                };
            }
            BatchOutcome::PerEvent(results.iter().map(classify_batch_result).collect())
        }
        400 => match flux_error_message(body) {
            Some(reason) => BatchOutcome::WholeBatchRejected { reason },
            // A 400 that is not Flux's JSON (a proxy, a gateway) is no verdict on our events:
            // treating it as one would quarantine good data.
            None => BatchOutcome::Unknown {
                reason: format!("400 not from Flux: {}", body_reason(body)),
            },
        },
        413 => BatchOutcome::TooLarge,
        401 | 403 => BatchOutcome::Unauthorized {
            status,
            reason: body_reason(body),
        },
        429 => BatchOutcome::RateLimited { retry_after },
        _ => BatchOutcome::Unknown {
            reason: format!("HTTP {status}: {}", body_reason(body)),
        },
    }
}

/// Classify the answer to `POST /api/events` (one event) in the same vocabulary:
/// 200 → `PerEvent([Applied])`; 400 (malformed or rule failure, both final for this event) →
/// `PerEvent([Invalid])`; 401/403 about the entity id → `PerEvent([AuthFailed])`, other 401/403
/// → `Unauthorized`; 413 → `TooLarge`; 429 → `RateLimited`; 500 and the rest → `Unknown`.
pub fn classify_single_answer(
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
    retry_after: Option<Duration>,
) -> BatchOutcome {
    match status {
        200 => {
            let id = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v.get("eventId").and_then(Value::as_str).map(str::to_string));
            match id {
                Some(event_id) => BatchOutcome::PerEvent(vec![EventOutcome::Applied { event_id }]),
                None => BatchOutcome::Unknown {
                    reason: format!(
                        "200 answer without an eventId ({}): {}",
                        content_type.unwrap_or("no content type"),
                        body_reason(body)
                    ),
                },
            }
        }
        400 => match flux_error_message(body) {
            Some(reason) => BatchOutcome::PerEvent(vec![EventOutcome::Invalid { reason }]),
            None => BatchOutcome::Unknown {
                reason: format!("400 not from Flux: {}", body_reason(body)),
            },
        },
        401 | 403 => {
            let reason = body_reason(body);
            if is_entity_id_auth_problem(&reason) {
                BatchOutcome::PerEvent(vec![EventOutcome::AuthFailed { reason }])
            } else {
                BatchOutcome::Unauthorized { status, reason }
            }
        }
        _ => classify_batch_answer(status, content_type, body, retry_after, 1),
    }
}

// ---------------------------------------------------------------------------------------------
// Reads

/// One entity as Flux holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct EntityState {
    pub id: String,
    pub properties: Map<String, Value>,
    /// Flux's `lastUpdated` (its processing time), epoch nanoseconds; `None` when absent or
    /// unparsable.
    pub last_updated_ns: Option<u64>,
}

impl EntityState {
    pub fn last_updated_ms(&self) -> Option<u64> {
        self.last_updated_ns.map(|ns| ns / 1_000_000)
    }
    /// The view the merge planner needs.
    pub fn as_remote(&self) -> crate::merge::Remote<'_> {
        crate::merge::Remote::Present {
            properties: &self.properties,
            last_updated_ms: self.last_updated_ms(),
        }
    }
}

fn entity_from_value(v: &Value) -> Result<EntityState, ReadError> {
    let id = v
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| ReadError::Parse {
            reason: "entity without a string id".to_string(),
        })?;
    let properties = match v.get("properties") {
        Some(Value::Object(m)) => m.clone(),
        None | Some(Value::Null) => Map::new(),
        Some(_) => {
            return Err(ReadError::Parse {
                reason: format!("entity {:?}: properties is not an object", truncate(id)),
            })
        }
    };
    let last_updated_ns = v
        .get("lastUpdated")
        .and_then(Value::as_str)
        .and_then(parse_rfc3339_ns);
    Ok(EntityState {
        id: id.to_string(),
        properties,
        last_updated_ns,
    })
}

/// Parse the answer to `GET /api/state/entities/{id}`: 200 → `Some`, 404 → `None`.
pub fn parse_entity_answer(status: u16, body: &[u8]) -> Result<Option<EntityState>, ReadError> {
    match status {
        200 => {
            let v: Value = serde_json::from_slice(body).map_err(|e| ReadError::Parse {
                reason: format!("entity answer: {e}"),
            })?;
            entity_from_value(&v).map(Some)
        }
        // Flux's 404 is `{"error":"Entity not found"}`; an unencoded `/` also gives a (bodiless)
        // 404, which encoding every id prevents.
        404 => Ok(None),
        _ => Err(ReadError::Status {
            status,
            reason: body_reason(body),
        }),
    }
}

/// Parse the answer to `GET /api/state/entities?prefix=P` (unordered, not paginated).
pub fn parse_list_answer(status: u16, body: &[u8]) -> Result<Vec<EntityState>, ReadError> {
    if status != 200 {
        return Err(ReadError::Status {
            status,
            reason: body_reason(body),
        });
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| ReadError::Parse {
        reason: format!("list answer: {e}"),
    })?;
    let arr = v.as_array().ok_or_else(|| ReadError::Parse {
        reason: "list answer is not an array".to_string(),
    })?;
    arr.iter().map(entity_from_value).collect()
}

/// Parse an RFC 3339 date-time (`2026-12-03T18:52:51.963549616+00:00`, `...Z`) to epoch
/// nanoseconds, keeping up to 9 fraction digits. `None` for malformed or pre-1970 times.
pub fn parse_rfc3339_ns(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(range)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    // Leap second 60 is folded into the next second, as most libraries do.
    if hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos: i64 = 0;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 9 {
                nanos = nanos * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        let digits = i - start;
        if digits == 0 {
            return None;
        }
        for _ in digits..9 {
            nanos *= 10;
        }
    }
    let offset_secs: i64 = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = oh * 3600 + om * 60;
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + min * 60 + sec - offset_secs;
    if secs < 0 {
        return None;
    }
    u64::try_from(secs)
        .ok()?
        .checked_mul(1_000_000_000)?
        .checked_add(nanos as u64)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

// ---------------------------------------------------------------------------------------------
// The HTTP client

/// Percent-encode everything but RFC 3986 unreserved characters; in particular `/` → `%2F`
/// (Flux answers 404 to an unencoded slash in an entity id).
const ID_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The Flux HTTP client. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct FluxClient {
    http: reqwest::Client,
    /// Base URL without a trailing slash.
    base: String,
    auth: Option<HeaderValue>,
    /// Kept only to scrub it from error strings.
    token: Option<Secret>,
}

impl fmt::Debug for FluxClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FluxClient")
            .field("base", &self.base)
            .field("auth", &self.token.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

/// `scheme://host[:port]/path` of a URL, without user info, query or fragment, for messages.
fn describe_url(u: &reqwest::Url) -> String {
    let mut s = format!("{}://{}", u.scheme(), u.host_str().unwrap_or(""));
    if let Some(p) = u.port() {
        s.push_str(&format!(":{p}"));
    }
    s.push_str(u.path());
    s
}

impl FluxClient {
    pub fn new(cfg: ClientConfig) -> Result<FluxClient, ClientError> {
        let parsed =
            reqwest::Url::parse(cfg.base_url.trim()).map_err(|e| ClientError::InvalidBaseUrl {
                url: sanitize_url_text(&cfg.base_url),
                reason: e.to_string(),
            })?;
        let bad = |reason: &str| ClientError::InvalidBaseUrl {
            url: describe_url(&parsed),
            reason: reason.to_string(),
        };
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(bad("scheme must be http or https"));
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(bad("no host"));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(bad("must not have a query or fragment"));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(bad(
                "must not contain user info; use the auth token setting",
            ));
        }
        let base = parsed.as_str().trim_end_matches('/').to_string();

        let auth = match &cfg.auth_token {
            None => None,
            Some(t) if t.expose().is_empty() => {
                return Err(ClientError::InvalidToken {
                    reason: "token is empty".to_string(),
                })
            }
            Some(t) => {
                let mut v =
                    HeaderValue::from_str(&format!("Bearer {}", t.expose())).map_err(|_| {
                        ClientError::InvalidToken {
                            reason: "token contains characters not allowed in an HTTP header"
                                .to_string(),
                        }
                    })?;
                // Keeps it out of hyper's debug output and HPACK tables.
                v.set_sensitive(true);
                Some(v)
            }
        };

        let mut builder = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .timeout(cfg.request_timeout)
            .read_timeout(cfg.read_timeout)
            .tcp_keepalive(Duration::from_secs(30))
            .tcp_nodelay(true)
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            .pool_idle_timeout(Duration::from_secs(60))
            // A redirected POST would turn into a GET or carry the token elsewhere: refuse.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(cfg.user_agent.clone());
        if let Some(path) = &cfg.ca_file {
            let pem = std::fs::read(path).map_err(|e| ClientError::CaFile {
                path: path.clone(),
                reason: format!("cannot read: {e}"),
            })?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ClientError::CaFile {
                    path: path.clone(),
                    reason: format!("not PEM certificates: {e}"),
                })?;
            if certs.is_empty() {
                return Err(ClientError::CaFile {
                    path: path.clone(),
                    reason: "no PEM certificate found in it".to_string(),
                });
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder.build().map_err(|e| ClientError::Build {
            reason: error_chain(&e),
        })?;
        Ok(FluxClient {
            http,
            base,
            auth,
            token: cfg.auth_token,
        })
    }

    /// Remove the token from any text that leaves this client.
    fn redact(&self, s: String) -> String {
        match &self.token {
            Some(t) if !t.expose().is_empty() && s.contains(t.expose()) => {
                s.replace(t.expose(), "[redacted]")
            }
            _ => s,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// `POST /api/events/batch`. Never panics; every failure is an outcome. An empty slice sends
    /// nothing (Flux answers 400 to an empty batch).
    pub async fn post_batch(&self, events: &[FluxEvent]) -> BatchOutcome {
        if events.is_empty() {
            return BatchOutcome::PerEvent(Vec::new());
        }
        let body = batch_body(events);
        let out = match self
            .post(&self.url("/api/events/batch"), body, WRITE_ANSWER_BYTES_MAX)
            .await
        {
            Ok(a) => classify_batch_answer(
                a.status,
                a.content_type.as_deref(),
                &a.body,
                a.retry_after,
                events.len(),
            ),
            Err(reason) => BatchOutcome::Unknown { reason },
        };
        self.redact_outcome(out)
    }

    /// `POST /api/events` with one event.
    pub async fn post_single(&self, event: &FluxEvent) -> BatchOutcome {
        let body = serde_json::to_vec(event).unwrap_or_default();
        let out = match self
            .post(&self.url("/api/events"), body, WRITE_ANSWER_BYTES_MAX)
            .await
        {
            Ok(a) => {
                classify_single_answer(a.status, a.content_type.as_deref(), &a.body, a.retry_after)
            }
            Err(reason) => BatchOutcome::Unknown { reason },
        };
        self.redact_outcome(out)
    }

    /// `GET /api/state/entities/{id}` with the id fully percent-encoded. 404 → `None`.
    pub async fn get_entity(&self, id: &str) -> Result<Option<EntityState>, ReadError> {
        let url = self.url(&format!(
            "/api/state/entities/{}",
            utf8_percent_encode(id, ID_ENCODE)
        ));
        let a = self.get(&url).await?;
        parse_entity_answer(a.status, &a.body).map_err(|e| self.redact_read(e))
    }

    /// `GET /api/state/entities?prefix=P`: every entity whose id starts with `prefix`, unordered.
    pub async fn list_prefix(&self, prefix: &str) -> Result<Vec<EntityState>, ReadError> {
        let url = self.url(&format!(
            "/api/state/entities?prefix={}",
            utf8_percent_encode(prefix, ID_ENCODE)
        ));
        let a = self.get(&url).await?;
        parse_list_answer(a.status, &a.body).map_err(|e| self.redact_read(e))
    }

    async fn get(&self, url: &str) -> Result<RawAnswer, ReadError> {
        // Reads need no token; sending none keeps it off the read path entirely.
        let send = self.http.get(url).send();
        read_answer(send, READ_ANSWER_BYTES_MAX)
            .await
            .map_err(|reason| ReadError::Transport {
                reason: self.redact(reason),
            })
    }

    async fn post(&self, url: &str, body: Vec<u8>, limit: usize) -> Result<RawAnswer, String> {
        tracing::debug!(bytes = body.len(), "flux POST");
        let mut req = self
            .http
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(auth) = &self.auth {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        read_answer(req.send(), limit).await
    }

    fn redact_outcome(&self, out: BatchOutcome) -> BatchOutcome {
        if self.token.is_none() {
            return out;
        }
        let r = |s: String| self.redact(s);
        match out {
            BatchOutcome::PerEvent(v) => BatchOutcome::PerEvent(
                v.into_iter()
                    .map(|e| match e {
                        EventOutcome::Invalid { reason } => {
                            EventOutcome::Invalid { reason: r(reason) }
                        }
                        EventOutcome::AuthFailed { reason } => {
                            EventOutcome::AuthFailed { reason: r(reason) }
                        }
                        EventOutcome::Unknown { reason } => {
                            EventOutcome::Unknown { reason: r(reason) }
                        }
                        other => other,
                    })
                    .collect(),
            ),
            BatchOutcome::WholeBatchRejected { reason } => {
                BatchOutcome::WholeBatchRejected { reason: r(reason) }
            }
            BatchOutcome::Unauthorized { status, reason } => BatchOutcome::Unauthorized {
                status,
                reason: r(reason),
            },
            BatchOutcome::Unknown { reason } => BatchOutcome::Unknown { reason: r(reason) },
            other => other,
        }
    }

    fn redact_read(&self, e: ReadError) -> ReadError {
        match e {
            ReadError::Transport { reason } => ReadError::Transport {
                reason: self.redact(reason),
            },
            ReadError::Status { status, reason } => ReadError::Status {
                status,
                reason: self.redact(reason),
            },
            ReadError::Parse { reason } => ReadError::Parse {
                reason: self.redact(reason),
            },
        }
    }
}

/// A user-typed URL that did not parse: drop anything that looks like user info before showing it.
fn sanitize_url_text(s: &str) -> String {
    let s = truncate(s);
    match (s.find("://"), s.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}[redacted]@{}", &s[..scheme_end + 3], &s[at + 1..])
        }
        _ => s,
    }
}

struct RawAnswer {
    status: u16,
    content_type: Option<String>,
    retry_after: Option<Duration>,
    body: Vec<u8>,
}

async fn read_answer(
    send: impl std::future::Future<Output = reqwest::Result<reqwest::Response>>,
    limit: usize,
) -> Result<RawAnswer, String> {
    let mut resp = send.await.map_err(|e| error_chain(&e))?;
    let status = resp.status().as_u16();
    let header = |name| {
        resp.headers()
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let content_type = header(CONTENT_TYPE).map(str::to_string);
    let retry_after = header(RETRY_AFTER).and_then(parse_retry_after);
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| error_chain(&e))? {
        if body.len() + chunk.len() > limit {
            return Err(format!(
                "HTTP {status} answer body larger than {limit} bytes"
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(RawAnswer {
        status,
        content_type,
        retry_after,
        body,
    })
}

/// "timeout: ...: connection reset" — kind first, then the cause chain, never the URL (it could
/// carry user info) and never headers.
fn error_chain(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect error"
    } else if e.is_body() {
        "body error"
    } else if e.is_decode() {
        "decode error"
    } else if e.is_builder() {
        "request build error"
    } else if e.is_request() {
        "request error"
    } else {
        "transport error"
    };
    let mut out = String::from(kind);
    let mut src = std::error::Error::source(e);
    let mut depth = 0;
    while let Some(s) = src {
        let text = s.to_string();
        // hyper and hyper-util repeat the inner message in the outer one: skip exact repeats.
        if !out.ends_with(&text) {
            let _ = write!(out, ": {text}");
        }
        src = s.source();
        depth += 1;
        if depth > 8 {
            break;
        }
    }
    truncate(&out)
}

// ---------------------------------------------------------------------------------------------
// Back-off

/// How randomness spreads the delays of many retrying workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jitter {
    None,
    /// Uniform in `[0, base]`.
    Full,
    /// `base/2` plus uniform in `[0, base/2]`: never shorter than half the base.
    Equal,
}

/// Exponential back-off with jitter, capped at `max`. Deterministic with [`Backoff::with_seed`].
#[derive(Debug)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    /// Growth per attempt; values below 1 (or NaN) are treated as 1.
    pub multiplier: f64,
    pub jitter: Jitter,
    attempt: u32,
    rng: StdRng,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, multiplier: f64, jitter: Jitter) -> Self {
        Backoff {
            initial,
            max,
            multiplier,
            jitter,
            attempt: 0,
            rng: StdRng::from_entropy(),
        }
    }

    /// Same sequence of delays for the same seed (tests).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = StdRng::seed_from_u64(seed);
        self
    }

    /// Attempts since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The un-jittered delay of the current attempt: `initial * multiplier^attempt`, capped.
    pub fn base_delay(&self) -> Duration {
        let m = if self.multiplier.is_nan() || self.multiplier < 1.0 {
            1.0
        } else {
            self.multiplier
        };
        let exp = i32::try_from(self.attempt).unwrap_or(i32::MAX);
        let secs = self.initial.as_secs_f64() * m.powi(exp);
        // Overflow (inf) and anything past the cap become the cap; Duration::from_secs_f64
        // would panic on inf.
        match Duration::try_from_secs_f64(secs) {
            Ok(d) if d < self.max => d,
            _ => self.max,
        }
    }

    /// The delay before the next try; advances the attempt counter.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.base_delay();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(base.as_nanos()).unwrap_or(u64::MAX);
        match self.jitter {
            Jitter::None => base,
            Jitter::Full => Duration::from_nanos(self.rng.gen_range(0..=nanos)),
            Jitter::Equal => {
                let half = nanos / 2;
                Duration::from_nanos(half + self.rng.gen_range(0..=nanos - half))
            }
        }
    }

    /// The next delay, but at least `floor` (e.g. a server's Retry-After).
    pub fn next_delay_at_least(&mut self, floor: Duration) -> Duration {
        self.next_delay().max(floor)
    }

    /// After a success: start again from `initial`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

// ---------------------------------------------------------------------------------------------
// Rate cap

/// Token bucket capping events sent per minute (Flux's public mode allows 10,000 per minute per
/// namespace, with a 10,000 burst). Uses tokio time, so it works under paused test time.
///
/// Callers reserve tokens in turn: `acquire(n)` takes `n` at once (the balance may go negative,
/// so a request larger than the burst still passes) and sleeps until the balance is back to
/// zero. The long-run rate is therefore exact, and waiters are served in call order.
#[derive(Debug)]
pub struct RateLimiter {
    /// Tokens per second; 0 means unlimited.
    rate_per_sec: f64,
    burst: f64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: tokio::time::Instant,
}

impl RateLimiter {
    /// `events_per_minute == 0` disables the cap. `burst` is the bucket size (at least 1); the
    /// bucket starts full.
    pub fn per_minute(events_per_minute: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        RateLimiter {
            rate_per_sec: f64::from(events_per_minute) / 60.0,
            burst,
            state: Mutex::new(Bucket {
                tokens: burst,
                last: tokio::time::Instant::now(),
            }),
        }
    }

    /// Reserve `n` tokens and return how long the caller must wait before using them.
    pub fn reserve(&self, n: u32) -> Duration {
        if self.rate_per_sec <= 0.0 || n == 0 {
            return Duration::ZERO;
        }
        let now = tokio::time::Instant::now();
        // A poisoned lock only means another task panicked mid-update of two floats; the
        // values are still usable.
        let mut b = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate_per_sec).min(self.burst);
        b.last = now;
        b.tokens -= f64::from(n);
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::try_from_secs_f64(-b.tokens / self.rate_per_sec).unwrap_or(Duration::MAX)
        }
    }

    /// Wait until `n` events may be sent.
    pub async fn acquire(&self, n: u32) {
        let wait = self.reserve(n);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Take `n` tokens only if available now.
    pub fn try_acquire(&self, n: u32) -> bool {
        if self.rate_per_sec <= 0.0 {
            return true;
        }
        let now = tokio::time::Instant::now();
        let mut b = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate_per_sec).min(self.burst);
        b.last = now;
        if b.tokens >= f64::from(n) {
            b.tokens -= f64::from(n);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(props: Value) -> FluxEvent {
        FluxEvent {
            stream: "scada".into(),
            source: "gw-1".into(),
            timestamp_ms: 1_767_225_600_000,
            entity_id: "scada/x".into(),
            properties: match props {
                Value::Object(m) => m,
                _ => Map::new(),
            },
            event_id: None,
        }
    }

    #[test]
    fn event_serializes_to_flux_shape_and_encoded_len_is_exact() {
        let mut e = ev(json!({"temp": 61.5, "s": "ü\"\n"}));
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({"stream":"scada","source":"gw-1","timestamp":1_767_225_600_000u64,
                   "payload":{"entity_id":"scada/x","properties":{"temp":61.5,"s":"ü\"\n"}}})
        );
        assert_eq!(e.encoded_len(), serde_json::to_vec(&e).unwrap().len());
        e.event_id = Some("id-1".into());
        assert_eq!(serde_json::to_value(&e).unwrap()["eventId"], json!("id-1"));
        assert_eq!(e.encoded_len(), serde_json::to_vec(&e).unwrap().len());
        let events = [e.clone(), ev(json!({"a": 1})), ev(json!({"b": [1, 2]}))];
        for n in 1..=events.len() {
            let body = batch_body(&events[..n]);
            assert_eq!(
                batch_body_len(events[..n].iter().map(FluxEvent::encoded_len)),
                body.len()
            );
        }
    }

    #[test]
    fn generated_event_id_allowance_matches_a_uuid() {
        let mut e = ev(json!({"a": 1}));
        let without = e.flux_encoded_len();
        e.event_id = Some("0190e6f2-0000-7000-8000-000000000001".into());
        assert_eq!(e.encoded_len(), without);
    }

    #[test]
    fn validate_rejects_what_flux_would() {
        assert!(ev(json!({"a": 1})).validate().is_ok());
        for stream in ["", "Scada", ".a", "a.", "a..b", "a_b"] {
            let mut e = ev(json!({"a": 1}));
            e.stream = stream.into();
            assert!(e.validate().is_err(), "{stream}");
        }
        let mut e = ev(json!({"a": 1}));
        e.timestamp_ms = 0;
        assert!(e.validate().is_err());
        e.timestamp_ms = u64::MAX;
        assert!(e.validate().is_err());
        assert!(ev(json!({})).validate().is_err());
        assert!(ev(json!({"__deleted__": true})).validate().is_ok());
        assert!(ev(json!({"__deleted__": true, "a": 1})).validate().is_err());
        assert!(ev(json!({"__deleted__": false})).validate().is_err());
        let big = "x".repeat(EVENT_BYTES_MAX);
        assert!(ev(json!({ "a": big })).validate().is_err());
    }

    #[test]
    fn rfc3339_parsing() {
        assert_eq!(parse_rfc3339_ns("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ns("2026-12-03T18:52:51.963549616+00:00"),
            Some(1_796_323_971_963_549_616)
        );
        assert_eq!(
            parse_rfc3339_ns("1970-01-01T01:00:00.5+01:00"),
            Some(500_000_000)
        );
        assert_eq!(
            parse_rfc3339_ns("1970-01-01T00:00:00.1234567891Z"),
            Some(123_456_789)
        );
        for bad in [
            "",
            "2026-12-03",
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-12-03T18:52:51",
            "2026-12-03T18:52:51.Z",
            "1969-12-31T23:59:59Z",
            "2026-12-03T18:52:51+0000",
            "2026-12-03T18:52:51Zjunk",
        ] {
            assert_eq!(parse_rfc3339_ns(bad), None, "{bad}");
        }
        // Cross-check against humantime on many instants.
        let mut t: u64 = 0;
        while t < 4_000_000_000 {
            let st = std::time::UNIX_EPOCH + Duration::from_nanos(t * 1_000_000_007 % u64::MAX);
            let text = humantime::format_rfc3339_nanos(st).to_string();
            let want = st.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
            assert_eq!(parse_rfc3339_ns(&text), Some(want), "{text}");
            t += 7_654_321;
        }
    }

    #[test]
    fn retry_after_parsing() {
        assert_eq!(parse_retry_after("60"), Some(Duration::from_secs(60)));
        assert_eq!(parse_retry_after(" 5 "), Some(Duration::from_secs(5)));
        assert_eq!(parse_retry_after("999999999"), Some(RETRY_AFTER_MAX));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }

    #[test]
    fn batch_classifier_table() {
        let ok2 = br#"{"successful":2,"failed":0,"results":[
            {"eventId":"a","stream":"s","error":null},{"eventId":"b","stream":"s","error":null}]}"#;
        let mixed = br#"{"successful":1,"failed":5,"results":[
            {"eventId":"a","stream":"s","error":null},
            {"eventId":null,"stream":"BAD","error":"validation failed: bad stream"},
            {"eventId":"c","stream":"s","error":"authorization failed: Forbidden: x"},
            {"eventId":"d","stream":"s","error":"rate limit exceeded"},
            {"eventId":"e","stream":"s","error":"publish failed: Failed to await publish ack"},
            {"eventId":"f","stream":"s","error":"something new"}]}"#;
        let ra = Some(Duration::from_secs(60));
        // (status, content type, body, Retry-After, events sent, expected outcome)
        type Case<'a> = (
            u16,
            Option<&'a str>,
            &'a [u8],
            Option<Duration>,
            usize,
            BatchOutcome,
        );
        let cases: Vec<Case> = vec![
            (
                200,
                Some("application/json"),
                ok2,
                None,
                2,
                BatchOutcome::PerEvent(vec![
                    EventOutcome::Applied {
                        event_id: "a".into(),
                    },
                    EventOutcome::Applied {
                        event_id: "b".into(),
                    },
                ]),
            ),
            (
                200,
                Some("application/json"),
                mixed,
                None,
                6,
                BatchOutcome::PerEvent(vec![
                    EventOutcome::Applied {
                        event_id: "a".into(),
                    },
                    EventOutcome::Invalid {
                        reason: "validation failed: bad stream".into(),
                    },
                    EventOutcome::AuthFailed {
                        reason: "authorization failed: Forbidden: x".into(),
                    },
                    EventOutcome::RateLimited,
                    EventOutcome::Unknown {
                        reason: "publish failed: Failed to await publish ack".into(),
                    },
                    EventOutcome::Unknown {
                        reason: "something new".into(),
                    },
                ]),
            ),
            (
                200,
                Some("application/json"),
                ok2,
                None,
                3,
                BatchOutcome::Unknown {
                    reason: "200 batch answer has 2 results for 3 events".into(),
                },
            ),
            (
                400,
                Some("application/json"),
                br#"{"error":"missing field `timestamp`"}"#,
                None,
                2,
                BatchOutcome::WholeBatchRejected {
                    reason: "missing field `timestamp`".into(),
                },
            ),
            (
                413,
                Some("text/plain"),
                b"Failed to buffer the request body: length limit exceeded",
                None,
                2,
                BatchOutcome::TooLarge,
            ),
            (
                413,
                Some("application/json"),
                br#"{"error":"payload too large"}"#,
                None,
                2,
                BatchOutcome::TooLarge,
            ),
            (
                401,
                Some("application/json"),
                br#"{"error":"nope"}"#,
                None,
                1,
                BatchOutcome::Unauthorized {
                    status: 401,
                    reason: "nope".into(),
                },
            ),
            (
                403,
                None,
                b"",
                None,
                1,
                BatchOutcome::Unauthorized {
                    status: 403,
                    reason: "empty body".into(),
                },
            ),
            (
                429,
                Some("application/json"),
                br#"{"error":"rate limit exceeded"}"#,
                ra,
                1,
                BatchOutcome::RateLimited { retry_after: ra },
            ),
            (
                500,
                Some("application/json"),
                br#"{"error":"Failed to await publish ack"}"#,
                None,
                1,
                BatchOutcome::Unknown {
                    reason: "HTTP 500: Failed to await publish ack".into(),
                },
            ),
            (
                502,
                Some("text/html"),
                b"<html>bad gateway</html>",
                None,
                1,
                BatchOutcome::Unknown {
                    reason: "HTTP 502: <html>bad gateway</html>".into(),
                },
            ),
        ];
        for (status, ct, body, ra, n, want) in cases {
            assert_eq!(
                classify_batch_answer(status, ct, body, ra, n),
                want,
                "status {status}"
            );
        }
        // Shapes that must be Unknown, never a panic and never a false ack.
        for (status, body) in [
            (200, &b"not json"[..]),
            (200, b"{}"),
            (200, b"[]"),
            (400, b"<html>proxy</html>"),
            (400, b""),
            (404, b""),
            (302, b""),
            (200, br#"{"results":[{"eventId":null,"error":null}]}"#),
            (200, br#"{"results":[7]}"#),
        ] {
            let out = classify_batch_answer(status, None, body, None, 1);
            assert!(
                out.is_unknown(),
                "{status} {:?} -> {out:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn permanence_and_retryability() {
        let inv = EventOutcome::Invalid {
            reason: "validation failed: x".into(),
        };
        assert!(inv.is_permanent() && !inv.is_retryable());
        let bad_id = EventOutcome::AuthFailed {
            reason: "authorization failed: Invalid entity ID: Failed to parse entity_id 'a/b/c'"
                .into(),
        };
        assert!(bad_id.is_permanent());
        let token = EventOutcome::AuthFailed {
            reason: "authorization failed: Invalid token: Authorization token not provided".into(),
        };
        assert!(!token.is_permanent() && token.is_retryable());
        assert!(EventOutcome::RateLimited.is_retryable());
        assert!(!EventOutcome::Applied {
            event_id: "x".into()
        }
        .is_retryable());
        assert!(BatchOutcome::TooLarge.needs_split());
        assert!(BatchOutcome::WholeBatchRejected {
            reason: String::new()
        }
        .needs_split());
        assert!(BatchOutcome::RateLimited { retry_after: None }.is_retryable());
        assert_eq!(
            BatchOutcome::RateLimited {
                retry_after: Some(Duration::from_secs(60))
            }
            .retry_after(),
            Some(Duration::from_secs(60))
        );
    }

    #[test]
    fn backoff_grows_caps_and_resets() {
        let mut b = Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(2),
            2.0,
            Jitter::None,
        );
        let got: Vec<u128> = (0..7).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 800, 1600, 2000, 2000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
        // Far past overflow: still the cap, no panic.
        for _ in 0..5000 {
            b.next_delay();
        }
        assert_eq!(b.next_delay(), Duration::from_secs(2));
        // Silly multipliers are treated as 1.
        let mut b = Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(2),
            f64::NAN,
            Jitter::None,
        );
        assert_eq!(b.next_delay(), b.next_delay());
    }

    #[test]
    fn backoff_jitter_bounds_and_determinism() {
        let mk = |j| {
            Backoff::new(Duration::from_millis(100), Duration::from_secs(10), 2.0, j).with_seed(7)
        };
        let (mut full, mut equal) = (mk(Jitter::Full), mk(Jitter::Equal));
        for _ in 0..20 {
            let base = full.base_delay();
            assert!(full.next_delay() <= base);
            let base = equal.base_delay();
            let d = equal.next_delay();
            assert!(d >= base / 2 && d <= base, "{d:?} vs {base:?}");
        }
        let a: Vec<Duration> = {
            let mut b = mk(Jitter::Full);
            (0..10).map(|_| b.next_delay()).collect()
        };
        let c: Vec<Duration> = {
            let mut b = mk(Jitter::Full);
            (0..10).map(|_| b.next_delay()).collect()
        };
        assert_eq!(a, c);
        let mut b = mk(Jitter::Full);
        assert!(b.next_delay_at_least(Duration::from_secs(60)) >= Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_holds_the_rate_under_paused_time() {
        let rl = RateLimiter::per_minute(600, 10); // 10/s, burst 10
        let start = tokio::time::Instant::now();
        rl.acquire(10).await; // the burst: immediate
        assert_eq!(start.elapsed(), Duration::ZERO);
        rl.acquire(5).await; // 5 more at 10/s: half a second
        let e = start.elapsed();
        assert!(
            e >= Duration::from_millis(499) && e <= Duration::from_millis(501),
            "{e:?}"
        );
        // Larger than the burst still passes, after the debt is paid.
        rl.acquire(30).await;
        let e = start.elapsed();
        assert!(
            e >= Duration::from_millis(3499) && e <= Duration::from_millis(3501),
            "{e:?}"
        );
        assert!(!rl.try_acquire(1));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(rl.try_acquire(10));
        assert!(!rl.try_acquire(1));
        // Unlimited.
        let free = RateLimiter::per_minute(0, 0);
        free.acquire(1_000_000).await;
        assert!(free.try_acquire(u32::MAX));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_refill_is_capped_at_burst() {
        let rl = RateLimiter::per_minute(60, 5); // 1/s, burst 5
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(rl.try_acquire(5));
        assert!(!rl.try_acquire(1));
    }
}
