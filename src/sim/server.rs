//! HTTP handlers: Flux's API under `/api/`, the sim's control API under `/_sim/`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;

use super::conn::ConnHandle;
use super::util::{now_ms, IdGen};
use super::world::{Auth, Namespace, Prepared, Stats, World};
use super::{Faults, SimConfig};

/// Text of Flux's answer when its event log does not acknowledge a publish.
const PUBLISH_ACK_FAILED: &str = "Failed to await publish ack";
/// Longest a hung request waits before the sim cuts it anyway, so tasks cannot pile up forever.
const HANG_MAX: Duration = Duration::from_secs(600);
/// Most log entries one `GET /_sim/log` returns.
const LOG_PAGE_MAX: usize = 100_000;

pub(crate) struct Shared {
    pub cfg: SimConfig,
    pub faults: RwLock<Faults>,
    pub rng: Mutex<StdRng>,
    pub ids: IdGen,
    pub world: Mutex<World>,
    pub auth: Mutex<Auth>,
    pub stats: Stats,
    pub shutdown: watch::Sender<bool>,
}

/// Poisoning only means another handler panicked mid-update; the maps stay usable for a test sim.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn faults(&self) -> Faults {
        *self.faults.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_faults(&self, f: Faults) {
        lock(&self.world).keep_previous(f.stale_read_rate > 0.0);
        *self.faults.write().unwrap_or_else(|e| e.into_inner()) = f;
    }

    fn roll(&self, p: f64) -> bool {
        // NaN counts as 0; skipping the lock keeps the fault-free path cheap.
        if p.is_nan() || p <= 0.0 {
            false
        } else if p >= 1.0 {
            true
        } else {
            lock(&self.rng).gen_bool(p)
        }
    }

    fn apply_now(&self, events: &mut Vec<Prepared>) {
        if events.is_empty() {
            return;
        }
        let now = SystemTime::now();
        let n = events.len() as u64;
        {
            let mut w = lock(&self.world);
            for ev in events.drain(..) {
                w.apply(ev, false, now);
            }
        }
        Stats::add(&self.stats.events_applied, n);
    }

    /// Real Flux may still apply an event it answered as failed once its log comes back.
    fn maybe_apply_late(self: &Arc<Self>, ev: &Prepared, faults: &Faults) {
        if !self.roll(faults.late_apply_rate) {
            return;
        }
        Stats::add(&self.stats.events_late_scheduled, 1);
        let shared = Arc::clone(self);
        let ev = ev.clone();
        let delay = Duration::from_millis(faults.late_apply_delay_ms);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            lock(&shared.world).apply(ev, true, SystemTime::now());
            Stats::add(&shared.stats.events_applied, 1);
            Stats::add(&shared.stats.events_applied_late, 1);
        });
    }

    pub fn register(&self, name: &str) -> (String, String) {
        let mut auth = lock(&self.auth);
        if let Some(ns) = auth.by_name.get(name) {
            return (ns.id.clone(), ns.token.clone());
        }
        let ns = Namespace {
            id: self.ids.namespace_id(),
            token: self.ids.uuid_v4(),
        };
        let out = (ns.id.clone(), ns.token.clone());
        auth.by_name.insert(name.to_owned(), ns);
        out
    }
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let body_max = shared.cfg.request_body_max;
    Router::new()
        .route("/api/events", post(post_event))
        .route("/api/events/batch", post(post_batch))
        .route("/api/state/entities", get(list_entities))
        .route(
            "/api/state/entities/{id}",
            get(get_entity).delete(delete_entity),
        )
        .route("/api/namespaces", post(register_namespace))
        .route("/_sim/faults", get(get_faults).put(put_faults))
        .route("/_sim/state", get(sim_state))
        .route("/_sim/log", get(sim_log))
        .route("/_sim/stats", get(sim_stats))
        .route("/_sim/namespaces", post(sim_register))
        .layer(middleware::from_fn_with_state(shared.clone(), api_gate))
        // Flux relies on axum's default limit (2 MiB): its 413 is axum's text/plain rejection.
        .layer(DefaultBodyLimit::max(body_max))
        .with_state(shared)
}

// ---------------------------------------------------------------------------------------------
// Answers

fn json_error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

fn rate_limited() -> Response {
    rate_limited_after(60)
}

/// A 429 with the given Retry-After (Flux always sends 60; the injected fault may send less so
/// tests that honour it do not wait a minute).
fn rate_limited_after(secs: u64) -> Response {
    let mut r = json_error(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// Marks a response that never reaches the client because its connection was cut.
#[derive(Clone, Copy)]
struct Cut;

fn cut(conn: &ConnHandle) -> Response {
    conn.kill();
    let mut r = StatusCode::SERVICE_UNAVAILABLE.into_response();
    r.extensions_mut().insert(Cut);
    r
}

async fn api_gate(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    if !req.uri().path().starts_with("/api/") {
        return next.run(req).await;
    }
    if s.faults().link_down {
        Stats::add(&s.stats.fault_link_down, 1);
        if let Some(ConnectInfo(conn)) = req.extensions().get::<ConnectInfo<ConnHandle>>() {
            return cut(conn);
        }
        // Only reachable when the router is served without connect info.
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let resp = next.run(req).await;
    if resp.extensions().get::<Cut>().is_none() {
        let c = match resp.status().as_u16() {
            200..=299 => &s.stats.answered_2xx,
            400..=499 => &s.stats.answered_4xx,
            _ => &s.stats.answered_5xx,
        };
        Stats::add(c, 1);
    }
    resp
}

// ---------------------------------------------------------------------------------------------
// Request-level faults

struct Gate {
    fail_all: bool,
    lose_answer: bool,
    faults: Faults,
}

async fn write_faults(s: &Arc<Shared>, conn: &ConnHandle) -> Result<Gate, Response> {
    let f = s.faults();
    if f.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(f.latency_ms)).await;
    }
    if s.roll(f.reset_rate) {
        Stats::add(&s.stats.fault_reset, 1);
        return Err(cut(conn));
    }
    if s.roll(f.hang_rate) {
        Stats::add(&s.stats.fault_hang, 1);
        let mut rx = s.shutdown.subscribe();
        tokio::select! {
            _ = rx.wait_for(|down| *down) => {}
            _ = tokio::time::sleep(HANG_MAX) => {}
        }
        return Err(cut(conn));
    }
    if s.roll(f.rate_429_rate) {
        Stats::add(&s.stats.fault_429, 1);
        let secs = if f.rate_429_retry_after_s == 0 {
            60
        } else {
            f.rate_429_retry_after_s
        };
        return Err(rate_limited_after(secs));
    }
    let fail_all = s.roll(f.error_500_rate);
    if fail_all {
        Stats::add(&s.stats.fault_500, 1);
    }
    let lose_answer = s.roll(f.lost_answer_rate);
    Ok(Gate {
        fail_all,
        lose_answer,
        faults: f,
    })
}

// ---------------------------------------------------------------------------------------------
// Event parsing and rules (shaped like Flux's `FluxEvent` so serde produces Flux's error texts)

#[derive(Deserialize)]
struct WireEvent {
    #[serde(rename = "eventId")]
    event_id: Option<String>,
    stream: String,
    source: String,
    timestamp: i64,
    key: Option<String>,
    schema: Option<String>,
    payload: Value,
}

#[derive(Deserialize)]
struct BatchRequest {
    events: Vec<WireEvent>,
}

/// What Flux publishes to its log; used only to measure an event's size.
#[derive(Serialize)]
struct LogMessage<'a> {
    #[serde(rename = "eventId")]
    event_id: &'a str,
    stream: &'a str,
    source: &'a str,
    timestamp: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    schema: Option<&'a str>,
    payload: &'a Value,
}

struct Checked {
    ev: Prepared,
    key: Option<String>,
    schema: Option<String>,
}

fn valid_stream(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && !s.ends_with('.')
        && !s.contains("..")
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.')
}

/// Flux's `validate_and_prepare`, in Flux's order, plus the simulated validation fault.
fn validate(s: &Shared, ev: WireEvent, f: &Faults) -> Result<Checked, (String, String)> {
    let rule = if ev.stream.is_empty() {
        Some("stream is required".to_owned())
    } else if ev.source.is_empty() {
        Some("source is required".to_owned())
    } else if ev.payload.is_null() {
        Some("payload is required".to_owned())
    } else if !valid_stream(&ev.stream) {
        Some(format!(
            "invalid stream format '{}': must be lowercase with optional dots",
            ev.stream
        ))
    } else if ev.timestamp <= 0 {
        Some(format!("timestamp must be positive, got {}", ev.timestamp))
    } else if !ev.payload.is_object() {
        Some("payload must be a JSON object".to_owned())
    } else if s.roll(f.validation_fail_rate) {
        Some("simulated validation failure (flux-sim fault)".to_owned())
    } else {
        None
    };
    if let Some(msg) = rule {
        lock(&s.world).reject(ev.event_id.as_deref(), &ev.payload, &msg);
        return Err((msg, ev.stream));
    }
    let event_id = match ev.event_id {
        Some(id) if !id.is_empty() => id,
        _ => s.ids.uuid_v7(),
    };
    Ok(Checked {
        ev: Prepared {
            event_id,
            stream: ev.stream,
            source: ev.source,
            timestamp: ev.timestamp,
            payload: ev.payload,
        },
        key: ev.key,
        schema: ev.schema,
    })
}

struct CountWriter(usize);

impl std::io::Write for CountWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Flux's log refuses messages over its max payload; Flux reports that as a failed ack.
fn too_large_for_log(c: &Checked, max: usize) -> bool {
    let msg = LogMessage {
        event_id: &c.ev.event_id,
        stream: &c.ev.stream,
        source: &c.ev.source,
        timestamp: c.ev.timestamp,
        key: c.key.as_deref(),
        schema: c.schema.as_deref(),
        payload: &c.ev.payload,
    };
    let mut w = CountWriter(0);
    serde_json::to_writer(&mut w, &msg).is_err() || w.0 > max
}

enum Publish {
    Ok,
    /// The log is "down": the event may still be applied later.
    Failed,
    /// Refused for size: never applied.
    TooLarge,
}

fn publish_outcome(
    s: &Shared,
    c: &Checked,
    check_size: bool,
    fail_all: bool,
    f: &Faults,
) -> Publish {
    if check_size && too_large_for_log(c, s.cfg.event_max_bytes) {
        Publish::TooLarge
    } else if fail_all || s.roll(f.publish_fail_rate) {
        Publish::Failed
    } else {
        Publish::Ok
    }
}

// ---------------------------------------------------------------------------------------------
// Auth (public mode), with Flux's exact messages

#[derive(Debug)]
#[allow(clippy::enum_variant_names)]
enum NameError {
    TooShort,
    TooLong,
    InvalidCharacters(String),
}

impl NameError {
    fn message(&self) -> String {
        match self {
            NameError::TooShort => "Namespace name too short (minimum 3 characters)".into(),
            NameError::TooLong => "Namespace name too long (maximum 32 characters)".into(),
            NameError::InvalidCharacters(d) => d.clone(),
        }
    }
}

fn validate_namespace_name(name: &str) -> Result<(), NameError> {
    if name.len() < 3 {
        return Err(NameError::TooShort);
    }
    if name.len() > 32 {
        return Err(NameError::TooLong);
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
    {
        return Err(NameError::InvalidCharacters(format!(
            "Invalid character '{c}' (must be [a-z0-9-_])"
        )));
    }
    Ok(())
}

// Variant names and Debug output must match Flux's `ParseError`: Flux prints it with `{:?}`,
// which is the only reader of the fields.
#[derive(Debug)]
#[allow(dead_code)]
enum ParseError {
    Empty,
    InvalidFormat(String),
    InvalidNamespace(String),
}

/// Returns the namespace, `None` for an id without a slash.
fn parse_entity_id(id: &str) -> Result<Option<&str>, ParseError> {
    if id.is_empty() {
        return Err(ParseError::Empty);
    }
    let parts: Vec<&str> = id.split('/').collect();
    match parts.as_slice() {
        [_] => Ok(None),
        [ns, entity] => {
            if ns.is_empty() {
                return Err(ParseError::InvalidFormat(
                    "Namespace part cannot be empty".into(),
                ));
            }
            if entity.is_empty() {
                return Err(ParseError::InvalidFormat(
                    "Entity part cannot be empty".into(),
                ));
            }
            validate_namespace_name(ns).map_err(|e| {
                ParseError::InvalidNamespace(format!("Invalid namespace '{ns}': {e:?}"))
            })?;
            Ok(Some(ns))
        }
        _ => Err(ParseError::InvalidFormat(format!(
            "Entity ID '{id}' contains multiple '/' separators (expected at most one)"
        ))),
    }
}

fn bearer_token(headers: &HeaderMap) -> Result<String, &'static str> {
    let v = headers
        .get(header::AUTHORIZATION)
        .ok_or("Authorization token not provided")?;
    let v = v
        .to_str()
        .map_err(|_| "Invalid authorization token format")?;
    let (scheme, token) = v
        .split_once(' ')
        .ok_or("Invalid authorization token format")?;
    if scheme.to_lowercase() != "bearer" {
        return Err("Invalid authorization token format");
    }
    let token = token.trim();
    if token.is_empty() {
        return Err("Authorization token is empty");
    }
    Ok(token.to_owned())
}

enum AuthError {
    InvalidToken(String),
    InvalidEntityId(String),
    NamespaceNotFound(String),
    Forbidden(String),
}

impl AuthError {
    /// Batch form: `authorization failed: <Display>`.
    fn batch_text(&self) -> String {
        let d = match self {
            AuthError::InvalidToken(m) => format!("Invalid token: {m}"),
            AuthError::InvalidEntityId(m) => format!("Invalid entity ID: {m}"),
            AuthError::NamespaceNotFound(m) => format!("Namespace not found: {m}"),
            AuthError::Forbidden(m) => format!("Forbidden: {m}"),
        };
        format!("authorization failed: {d}")
    }

    /// Single-event form: the bare message, 401 or 403.
    fn single_response(self) -> Response {
        match self {
            AuthError::Forbidden(m) => json_error(StatusCode::FORBIDDEN, m),
            AuthError::InvalidToken(m)
            | AuthError::InvalidEntityId(m)
            | AuthError::NamespaceNotFound(m) => json_error(StatusCode::UNAUTHORIZED, m),
        }
    }
}

/// Authorizes one event and returns the rate-limit bucket key (its namespace).
fn authorize(s: &Shared, headers: &HeaderMap, ev: &Prepared) -> Result<String, AuthError> {
    let token = bearer_token(headers).map_err(|m| AuthError::InvalidToken(m.to_owned()))?;
    let id = ev
        .payload
        .get("entity_id")
        .and_then(Value::as_str)
        .ok_or_else(|| AuthError::InvalidEntityId("Missing 'entity_id' field in payload".into()))?;
    let ns = parse_entity_id(id)
        .map_err(|e| {
            AuthError::InvalidEntityId(format!("Failed to parse entity_id '{id}': {e:?}"))
        })?
        .ok_or_else(|| {
            AuthError::InvalidEntityId(format!(
                "Entity ID '{id}' missing namespace prefix (expected 'namespace/entity' format)"
            ))
        })?;
    let auth = lock(&s.auth);
    match auth.by_name.get(ns) {
        None => Err(AuthError::NamespaceNotFound(format!(
            "Namespace '{ns}' not found. Get a namespace at flux-universe.com"
        ))),
        Some(n) if n.token != token => Err(AuthError::Forbidden(format!(
            "Token does not have permission to write to namespace '{ns}'"
        ))),
        Some(_) => Ok(ns.to_owned()),
    }
}

fn take_rate_token(s: &Shared, key: &str) -> bool {
    lock(&s.auth).take_token(
        key,
        s.cfg.rate_limit_bucket,
        s.cfg.rate_limit_refill_per_min,
    )
}

// ---------------------------------------------------------------------------------------------
// POST /api/events

#[derive(Serialize)]
struct EventAnswer<'a> {
    #[serde(rename = "eventId")]
    event_id: &'a str,
    stream: &'a str,
}

async fn post_event(
    State(s): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<ConnHandle>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    Stats::add(&s.stats.requests_single, 1);
    let gate = match write_faults(&s, &conn).await {
        Ok(g) => g,
        Err(r) => return r,
    };
    if body.len() > s.cfg.single_body_max {
        return json_error(StatusCode::PAYLOAD_TOO_LARGE, "payload too large");
    }
    let wire: WireEvent = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    Stats::add(&s.stats.events_received, 1);
    let checked = match validate(&s, wire, &gate.faults) {
        Ok(c) => c,
        Err((msg, _)) => {
            Stats::add(&s.stats.events_validation_failed, 1);
            return json_error(StatusCode::BAD_REQUEST, msg);
        }
    };
    if s.cfg.public {
        let key = match authorize(&s, &headers, &checked.ev) {
            Ok(k) => k,
            Err(e) => {
                Stats::add(&s.stats.events_auth_failed, 1);
                return e.single_response();
            }
        };
        if !take_rate_token(&s, &key) {
            Stats::add(&s.stats.events_rate_limited, 1);
            return rate_limited();
        }
    }
    let check_size = body.len() > s.cfg.event_max_bytes / 2;
    match publish_outcome(&s, &checked, check_size, gate.fail_all, &gate.faults) {
        Publish::Ok => {
            let answer = serde_json::to_vec(&EventAnswer {
                event_id: &checked.ev.event_id,
                stream: &checked.ev.stream,
            });
            s.apply_now(&mut vec![checked.ev]);
            if gate.lose_answer {
                Stats::add(&s.stats.fault_lost_answer, 1);
                return cut(&conn);
            }
            match answer {
                Ok(bytes) => ([(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
                Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        outcome => {
            Stats::add(&s.stats.events_publish_failed, 1);
            if matches!(outcome, Publish::Failed) {
                s.maybe_apply_late(&checked.ev, &gate.faults);
            }
            publish_fail_delay(&gate.faults).await;
            json_error(StatusCode::INTERNAL_SERVER_ERROR, PUBLISH_ACK_FAILED)
        }
    }
}

async fn publish_fail_delay(f: &Faults) {
    if f.publish_fail_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(f.publish_fail_delay_ms)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// POST /api/events/batch

#[derive(Serialize)]
struct BatchResult {
    #[serde(rename = "eventId")]
    event_id: Option<String>,
    stream: Option<String>,
    error: Option<String>,
}

#[derive(Serialize)]
struct BatchAnswer {
    successful: usize,
    failed: usize,
    results: Vec<BatchResult>,
}

async fn post_batch(
    State(s): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<ConnHandle>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    Stats::add(&s.stats.requests_batch, 1);
    let gate = match write_faults(&s, &conn).await {
        Ok(g) => g,
        Err(r) => return r,
    };
    if body.len() > s.cfg.batch_body_max {
        return json_error(StatusCode::PAYLOAD_TOO_LARGE, "payload too large");
    }
    let req: BatchRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if req.events.is_empty() {
        return json_error(
            StatusCode::BAD_REQUEST,
            "Batch request must contain at least one event",
        );
    }
    let f = gate.faults;
    Stats::add(&s.stats.events_received, req.events.len() as u64);
    let check_size = body.len() > s.cfg.event_max_bytes / 2;
    let mut results = Vec::with_capacity(req.events.len());
    let mut pending: Vec<Prepared> = Vec::with_capacity(req.events.len());
    let (mut ok, mut failed) = (0usize, 0usize);
    let (mut n_invalid, mut n_auth, mut n_rate, mut n_pub) = (0u64, 0u64, 0u64, 0u64);
    for wire in req.events {
        let checked = match validate(&s, wire, &f) {
            Ok(c) => c,
            Err((msg, stream)) => {
                n_invalid += 1;
                failed += 1;
                results.push(BatchResult {
                    event_id: None,
                    stream: Some(stream),
                    error: Some(format!("validation failed: {msg}")),
                });
                continue;
            }
        };
        if s.cfg.public {
            let refusal = match authorize(&s, &headers, &checked.ev) {
                Err(e) => {
                    n_auth += 1;
                    Some(e.batch_text())
                }
                Ok(key) if !take_rate_token(&s, &key) => {
                    n_rate += 1;
                    Some("rate limit exceeded".to_owned())
                }
                Ok(_) => None,
            };
            if let Some(error) = refusal {
                failed += 1;
                results.push(BatchResult {
                    event_id: Some(checked.ev.event_id),
                    stream: Some(checked.ev.stream),
                    error: Some(error),
                });
                continue;
            }
        }
        match publish_outcome(&s, &checked, check_size, gate.fail_all, &f) {
            Publish::Ok => {
                ok += 1;
                results.push(BatchResult {
                    event_id: Some(checked.ev.event_id.clone()),
                    stream: Some(checked.ev.stream.clone()),
                    error: None,
                });
                pending.push(checked.ev);
            }
            outcome => {
                n_pub += 1;
                failed += 1;
                if matches!(outcome, Publish::Failed) {
                    s.maybe_apply_late(&checked.ev, &f);
                }
                results.push(BatchResult {
                    event_id: Some(checked.ev.event_id),
                    stream: Some(checked.ev.stream),
                    error: Some(format!("publish failed: {PUBLISH_ACK_FAILED}")),
                });
                if f.publish_fail_delay_ms > 0 {
                    // Flux publishes one by one: what went before is in the log even if the
                    // client gives up during this wait.
                    s.apply_now(&mut pending);
                    publish_fail_delay(&f).await;
                }
            }
        }
    }
    s.apply_now(&mut pending);
    Stats::add(&s.stats.events_validation_failed, n_invalid);
    Stats::add(&s.stats.events_auth_failed, n_auth);
    Stats::add(&s.stats.events_rate_limited, n_rate);
    Stats::add(&s.stats.events_publish_failed, n_pub);
    if gate.fail_all {
        return json_error(StatusCode::INTERNAL_SERVER_ERROR, PUBLISH_ACK_FAILED);
    }
    if gate.lose_answer {
        Stats::add(&s.stats.fault_lost_answer, 1);
        return cut(&conn);
    }
    Json(BatchAnswer {
        successful: ok,
        failed,
        results,
    })
    .into_response()
}

// ---------------------------------------------------------------------------------------------
// Reads and DELETE

async fn get_entity(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    Stats::add(&s.stats.requests_read, 1);
    let stale = s.roll(s.faults().stale_read_rate);
    if stale {
        Stats::add(&s.stats.fault_stale_read, 1);
    }
    let e = lock(&s.world).read(&id, stale);
    match e {
        Some(e) => Json(e.to_json()).into_response(),
        None => json_error(StatusCode::NOT_FOUND, "Entity not found"),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    prefix: Option<String>,
    namespace: Option<String>,
}

async fn list_entities(State(s): State<Arc<Shared>>, Query(q): Query<ListQuery>) -> Response {
    Stats::add(&s.stats.requests_read, 1);
    let picked: Vec<_> = {
        let w = lock(&s.world);
        w.entities
            .values()
            .filter(|e| q.prefix.as_deref().is_none_or(|p| e.id.starts_with(p)))
            .filter(|e| {
                q.namespace
                    .as_deref()
                    .is_none_or(|n| e.id.split_once('/').is_some_and(|(ns, _)| ns == n))
            })
            .cloned()
            .collect()
    };
    Json(Value::Array(picked.iter().map(|e| e.to_json()).collect())).into_response()
}

/// Flux publishes a tombstone event for DELETE; authorization texts differ from event writes.
async fn delete_entity(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if s.cfg.public {
        let token = match headers.get(header::AUTHORIZATION).map(|v| v.to_str()) {
            None => return json_error(StatusCode::UNAUTHORIZED, "Missing Authorization header"),
            Some(Err(_)) => {
                return json_error(StatusCode::UNAUTHORIZED, "Invalid Authorization header")
            }
            Some(Ok(v)) => match v.strip_prefix("Bearer ") {
                Some(t) => t.to_owned(),
                None => {
                    return json_error(StatusCode::UNAUTHORIZED, "Invalid Authorization format")
                }
            },
        };
        let ns = match parse_entity_id(&id) {
            Err(e) => return json_error(StatusCode::BAD_REQUEST, format!("{e:?}")),
            Ok(None) => return json_error(StatusCode::UNAUTHORIZED, "Entity has no namespace"),
            Ok(Some(ns)) => ns.to_owned(),
        };
        let owns = lock(&s.auth)
            .by_name
            .get(&ns)
            .is_some_and(|n| n.token == token);
        if !owns {
            return json_error(StatusCode::FORBIDDEN, "Token does not own namespace");
        }
    }
    let f = s.faults();
    let now = now_ms() as i64;
    let checked = Checked {
        ev: Prepared {
            event_id: s.ids.uuid_v7(),
            stream: "flux.deletions".into(),
            source: "api".into(),
            timestamp: now,
            payload: json!({ "entity_id": id, "properties": { "__deleted__": true, "__deleted_at__": now } }),
        },
        key: Some(id.clone()),
        schema: None,
    };
    match publish_outcome(&s, &checked, false, false, &f) {
        Publish::Ok => {
            let event_id = checked.ev.event_id.clone();
            s.apply_now(&mut vec![checked.ev]);
            Json(json!({ "entity_id": id, "eventId": event_id })).into_response()
        }
        _ => {
            s.maybe_apply_late(&checked.ev, &f);
            json_error(StatusCode::INTERNAL_SERVER_ERROR, PUBLISH_ACK_FAILED)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Namespaces

#[derive(Deserialize)]
struct RegisterRequest {
    name: String,
}

async fn register_namespace(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(req): Json<RegisterRequest>,
) -> Response {
    if !s.cfg.public {
        return json_error(
            StatusCode::NOT_FOUND,
            "Namespace registration not available (auth disabled)",
        );
    }
    if let Some(expected) = &s.cfg.admin_token {
        let provided = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if provided != Some(expected.as_str()) {
            return json_error(StatusCode::UNAUTHORIZED, "Admin token required");
        }
    }
    if let Err(e) = validate_namespace_name(&req.name) {
        return json_error(StatusCode::BAD_REQUEST, e.message());
    }
    if lock(&s.auth).by_name.contains_key(&req.name) {
        return json_error(StatusCode::CONFLICT, "Namespace name already exists");
    }
    let (id, token) = s.register(&req.name);
    Json(json!({ "namespaceId": id, "name": req.name, "token": token })).into_response()
}

// ---------------------------------------------------------------------------------------------
// Control API

async fn get_faults(State(s): State<Arc<Shared>>) -> Json<Faults> {
    Json(s.faults())
}

async fn put_faults(State(s): State<Arc<Shared>>, Json(f): Json<Faults>) -> Response {
    if let Err(msg) = f.check() {
        return json_error(StatusCode::BAD_REQUEST, msg);
    }
    s.set_faults(f);
    Json(f).into_response()
}

async fn sim_state(State(s): State<Arc<Shared>>) -> Response {
    let all: BTreeMap<String, Value> = {
        let w = lock(&s.world);
        w.entities
            .iter()
            .map(|(id, e)| (id.clone(), e.to_json()))
            .collect()
    };
    Json(all).into_response()
}

#[derive(Deserialize)]
struct LogQuery {
    since: Option<u64>,
    limit: Option<usize>,
}

async fn sim_log(State(s): State<Arc<Shared>>, Query(q): Query<LogQuery>) -> Response {
    let limit = q.limit.unwrap_or(LOG_PAGE_MAX).min(LOG_PAGE_MAX);
    let (applied, events) = {
        let w = lock(&s.world);
        (w.applied, w.log_since(q.since.unwrap_or(0), limit))
    };
    Json(json!({ "applied": applied, "events": events })).into_response()
}

async fn sim_stats(State(s): State<Arc<Shared>>) -> Response {
    Json(s.stats.snapshot()).into_response()
}

async fn sim_register(State(s): State<Arc<Shared>>, Json(req): Json<RegisterRequest>) -> Response {
    if let Err(e) = validate_namespace_name(&req.name) {
        return json_error(StatusCode::BAD_REQUEST, e.message());
    }
    let (_, token) = s.register(&req.name);
    Json(json!({ "name": req.name, "token": token })).into_response()
}
