//! The 0xSCADA WebSocket source (`[sources.oxscada_ws]`): subscribes to the live tag stream
//! (`ws://HOST:5000/ws/tags`), maps what it receives with [`crate::mapper::Mapper`], and ingests
//! it durably through the same path as the HTTP API (validation, then `Store::ingest`, then a
//! compactor wake-up).
//!
//! # Protocol (see the 0xSCADA notes)
//! - Auth: `Sec-WebSocket-Protocol: oxscada.v1, oxscada.api-key.<base64url(key)>` (no padding:
//!   `=` is not a token character); the key never goes into the URL, and a configured URL with a
//!   query string is refused. Without a key only `oxscada.v1` is offered.
//! - Consumed: `tag:snapshot` (object of tag name -> reading, or an array), `tag:update` (one
//!   reading), `tag:batch` (array) and `alarm:update`. `connected`, `pong`, `pipeline:health` and
//!   unknown events are counted and ignored.
//! - Sent: `{"type":"subscribe","tags":[...]}` after connecting when `tags` is not empty (the
//!   snapshot may still hold every tag, so the filter is applied locally too), and
//!   `{"type":"ping"}` every `ping_interval`; a connection that received nothing for
//!   `idle_timeout` is dropped and reopened. Time the reader spends waiting for the ingest queue
//!   (backpressure from our own store) does not count as silence: the idle clock restarts when
//!   reading resumes. WebSocket ping frames are answered (pong).
//!
//! # Ordering and reconnects
//! Every update carries the reading's own `timestamp` as its version, so the store's
//! newest-wins rule orders them; the snapshot a fresh connection starts with is ingested as
//! ordinary updates (a value not newer than what is pending or delivered is dropped by the
//! store, a newer one wins). That snapshot is also what recovers readings that were in flight
//! when a connection broke. Reconnects back off exponentially with jitter
//! (`reconnect_initial` .. `reconnect_max`), reset after a connection that delivered messages.
//!
//! # Bounds and failures
//! - A message larger than `message_bytes_max` ends the connection (the WebSocket layer
//!   refuses to buffer it), counted as `too_large`; a reconnect follows.
//! - A message or reading that cannot be parsed or mapped, or a mapped update that fails
//!   validation, is counted by reason (`flux_outbox_source_bad_total`) and logged (throttled);
//!   it never stops the source.
//! - Mapped updates wait in a bounded queue ([`QUEUE_MESSAGES_MAX`] messages); the ingest task
//!   takes at most `updates_per_ingest_max` updates per `Store::ingest` call. When the store
//!   refuses (full, disk error) the batch is retried with back-off and the queue fills, so the
//!   reader stops reading: backpressure, never a silent drop. Each refused attempt is counted
//!   in `flux_outbox_ingest_rejected_total{reason="outbox_full"|"storage_error"}` as the HTTP
//!   path counts its 507s (so the same alert covers both), besides
//!   `flux_outbox_source_bad_total{reason="store_refused"}`.
//!
//! Connection state is in `/metrics` (`flux_outbox_source_*{source="oxscada_ws"}`) and in the
//! `/readyz` body (`sources.oxscada_ws`). It does not make the worker unready: HTTP ingest and
//! delivery keep working while 0xSCADA is away.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::config::Secret;
use crate::flux_client::{parse_rfc3339_ns, Backoff, Jitter};
use crate::ingest::AppState;
use crate::mapper::{AlarmEvent, Mapper, TagReading};
use crate::model::{now_ms, Update};
use crate::store::StoreError;
use crate::validate::validate_update;

/// The source's name in metrics and `/readyz`.
pub const SOURCE_NAME: &str = "oxscada_ws";
/// The subprotocol 0xSCADA speaks (and echoes back when it accepts the connection).
pub const SUBPROTOCOL: &str = "oxscada.v1";
/// Prefix of the subprotocol that carries the API key.
pub const API_KEY_PROTOCOL_PREFIX: &str = "oxscada.api-key.";
/// Mapped messages waiting for the ingest task (backpressure beyond this).
pub const QUEUE_MESSAGES_MAX: usize = 64;
/// Most tags in a subscribe filter.
pub const TAGS_MAX: usize = 100_000;

/// `[sources]`: producers the worker pulls from itself.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourcesConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oxscada_ws: Option<OxscadaWsConfig>,
}

/// `[sources.oxscada_ws]`: the 0xSCADA live tag stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OxscadaWsConfig {
    /// `ws://HOST:5000/ws/tags` (no query string; `wss://` is not built in).
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<PathBuf>,
    /// Tags to subscribe to; empty = every tag.
    pub tags: Vec<String>,
    /// Map and ingest `alarm:update` messages.
    pub alarms: bool,
    #[serde(with = "crate::config::size")]
    pub message_bytes_max: u64,
    pub updates_per_ingest_max: usize,
    #[serde(with = "crate::config::duration")]
    pub connect_timeout: Duration,
    #[serde(with = "crate::config::duration")]
    pub reconnect_initial: Duration,
    #[serde(with = "crate::config::duration")]
    pub reconnect_max: Duration,
    #[serde(with = "crate::config::duration")]
    pub ping_interval: Duration,
    #[serde(with = "crate::config::duration")]
    pub idle_timeout: Duration,
}

impl Default for OxscadaWsConfig {
    fn default() -> Self {
        OxscadaWsConfig {
            url: "ws://127.0.0.1:5000/ws/tags".into(),
            api_key: None,
            api_key_file: None,
            tags: Vec::new(),
            alarms: true,
            message_bytes_max: 16 * 1024 * 1024,
            updates_per_ingest_max: 1000,
            connect_timeout: Duration::from_secs(10),
            reconnect_initial: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            ping_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

pub(crate) fn check_config(c: &OxscadaWsConfig) -> Result<(), (&'static str, String)> {
    const K: &str = "sources.oxscada_ws";
    let url = reqwest::Url::parse(c.url.trim()).map_err(|e| {
        (
            "sources.oxscada_ws.url",
            format!("{:?} is not a URL: {e}", c.url),
        )
    })?;
    match url.scheme() {
        "ws" => {}
        "wss" => {
            return Err((
                "sources.oxscada_ws.url",
                "wss:// is not supported by this build; use ws:// on the gateway's local network"
                    .into(),
            ))
        }
        s => {
            return Err((
                "sources.oxscada_ws.url",
                format!("scheme {s:?}: must be ws"),
            ))
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(("sources.oxscada_ws.url", "no host".into()));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err((
            "sources.oxscada_ws.url",
            "must not carry a query, fragment or user info: 0xSCADA refuses a key in the query string; set api_key or api_key_file".into(),
        ));
    }
    if c.api_key.is_some() && c.api_key_file.is_some() {
        return Err((K, "set either api_key or api_key_file, not both".into()));
    }
    if c.api_key
        .as_ref()
        .is_some_and(|k| k.expose().trim().is_empty())
    {
        return Err(("sources.oxscada_ws.api_key", "must not be empty".into()));
    }
    if c.tags.len() > TAGS_MAX || c.tags.iter().any(String::is_empty) {
        return Err((
            "sources.oxscada_ws.tags",
            format!("at most {TAGS_MAX} non-empty tag names"),
        ));
    }
    if c.message_bytes_max < 1024 || c.message_bytes_max > 256 * 1024 * 1024 {
        return Err((
            "sources.oxscada_ws.message_bytes_max",
            "must be between 1KiB and 256MiB".into(),
        ));
    }
    if c.updates_per_ingest_max == 0 || c.updates_per_ingest_max > 50_000 {
        return Err((
            "sources.oxscada_ws.updates_per_ingest_max",
            "must be between 1 and 50000".into(),
        ));
    }
    for (key, d) in [
        ("sources.oxscada_ws.connect_timeout", c.connect_timeout),
        ("sources.oxscada_ws.reconnect_initial", c.reconnect_initial),
        ("sources.oxscada_ws.reconnect_max", c.reconnect_max),
        ("sources.oxscada_ws.ping_interval", c.ping_interval),
        ("sources.oxscada_ws.idle_timeout", c.idle_timeout),
    ] {
        if d.is_zero() {
            return Err((key, "must be greater than 0".into()));
        }
    }
    if c.reconnect_max < c.reconnect_initial {
        return Err((
            "sources.oxscada_ws.reconnect_max",
            "must not be smaller than reconnect_initial".into(),
        ));
    }
    if c.idle_timeout <= c.ping_interval {
        return Err((
            "sources.oxscada_ws.idle_timeout",
            "must be longer than ping_interval (the pong keeps the connection alive)".into(),
        ));
    }
    Ok(())
}

/// The `Sec-WebSocket-Protocol` value 0xSCADA expects.
pub fn subprotocol_header(api_key: Option<&str>) -> String {
    match api_key {
        Some(key) => format!(
            "{SUBPROTOCOL}, {API_KEY_PROTOCOL_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.as_bytes())
        ),
        None => SUBPROTOCOL.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Status (metrics and /readyz)

/// Connection state of the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    Disabled = 0,
    Connecting = 1,
    Connected = 2,
    Disconnected = 3,
}

impl ConnState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Disabled => "disabled",
            ConnState::Connecting => "connecting",
            ConnState::Connected => "connected",
            ConnState::Disconnected => "disconnected",
        }
    }
    fn from_code(c: u8) -> Self {
        match c {
            1 => ConnState::Connecting,
            2 => ConnState::Connected,
            3 => ConnState::Disconnected,
            _ => ConnState::Disabled,
        }
    }
}

/// Counters and state of the source, kept in [`crate::metrics::Metrics`].
#[derive(Default)]
pub struct WsStatus {
    state: AtomicU8,
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    pub messages: AtomicU64,
    pub updates_ingested: AtomicU64,
    pub last_message_ms: AtomicU64,
    /// Bad messages, readings and refused updates, by reason.
    bad: Mutex<BTreeMap<String, u64>>,
    last_error: Mutex<Option<String>>,
    configured: AtomicBool,
}

impl WsStatus {
    pub fn state(&self) -> ConnState {
        ConnState::from_code(self.state.load(Ordering::Relaxed))
    }
    fn set_state(&self, s: ConnState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }
    /// Counts one bad item; returns the new count for that reason (for log throttling).
    pub fn bad(&self, reason: &str) -> u64 {
        let mut m = lock(&self.bad);
        let n = m.entry(reason.to_string()).or_default();
        *n += 1;
        *n
    }
    pub fn bad_count(&self, reason: &str) -> u64 {
        lock(&self.bad).get(reason).copied().unwrap_or(0)
    }
    pub fn bad_total(&self) -> u64 {
        lock(&self.bad).values().sum()
    }
    fn set_error(&self, e: String) {
        *lock(&self.last_error) = Some(e);
    }

    /// Prometheus lines (nothing when the source is not configured).
    pub fn render(&self, out: &mut String) {
        if !self.configured.load(Ordering::Relaxed) {
            return;
        }
        let s = SOURCE_NAME;
        let state = self.state();
        let _ = writeln!(out, "# HELP flux_outbox_source_connected 1 while the source's connection is open.\n# TYPE flux_outbox_source_connected gauge\nflux_outbox_source_connected{{source=\"{s}\"}} {}", u8::from(state == ConnState::Connected));
        let _ = writeln!(out, "# HELP flux_outbox_source_state Source connection state (label), value 1.\n# TYPE flux_outbox_source_state gauge\nflux_outbox_source_state{{source=\"{s}\",state=\"{}\"}} 1", state.as_str());
        for (name, help, v) in [
            (
                "flux_outbox_source_connects_total",
                "Connections opened.",
                &self.connects,
            ),
            (
                "flux_outbox_source_disconnects_total",
                "Connections lost or dropped.",
                &self.disconnects,
            ),
            (
                "flux_outbox_source_messages_total",
                "Messages received.",
                &self.messages,
            ),
            (
                "flux_outbox_source_updates_total",
                "Mapped updates ingested (durable).",
                &self.updates_ingested,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{source=\"{s}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP flux_outbox_source_bad_total Bad messages, readings and refused updates, by reason.\n# TYPE flux_outbox_source_bad_total counter");
        for (reason, n) in lock(&self.bad).iter() {
            let _ = writeln!(
                out,
                "flux_outbox_source_bad_total{{source=\"{s}\",reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# HELP flux_outbox_source_last_message_timestamp_seconds Time of the last message received.\n# TYPE flux_outbox_source_last_message_timestamp_seconds gauge\nflux_outbox_source_last_message_timestamp_seconds{{source=\"{s}\"}} {}", self.last_message_ms.load(Ordering::Relaxed) as f64 / 1000.0);
    }

    /// The `/readyz` view, `None` when the source is not configured.
    pub fn readyz(&self) -> Option<Value> {
        if !self.configured.load(Ordering::Relaxed) {
            return None;
        }
        let last = self.last_message_ms.load(Ordering::Relaxed);
        Some(json!({
            "state": self.state().as_str(),
            "connects": self.connects.load(Ordering::Relaxed),
            "last_message_ms": if last > 0 { Value::from(last) } else { Value::Null },
            "last_error": lock(&self.last_error).clone(),
        }))
    }
}

/// Adds `"sources": {"oxscada_ws": {...}}` to a `/readyz` body when the source is configured.
pub fn extend_readyz(status: &WsStatus, body: &mut Value) {
    if let (Some(v), Some(obj)) = (status.readyz(), body.as_object_mut()) {
        obj.insert("sources".into(), json!({ SOURCE_NAME: v }));
    }
}

/// Resolves once `stop` is true (or its sender is gone). Returns nothing, so no `watch::Ref`
/// (not `Send`) is held across an await inside `select!`.
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Logs the 1st..10th and then every power-of-two-th occurrence, so a flood of bad input is
/// visible without flooding the log.
fn should_log(count: u64) -> bool {
    count <= 10 || count.is_power_of_two()
}

// ---------------------------------------------------------------------------------------------
// Parsing and mapping (pure)

/// What one message became.
#[derive(Debug, Default, PartialEq)]
pub struct Parsed {
    /// The `event` field (`""` when absent).
    pub event: String,
    pub updates: Vec<Update>,
    /// (reason, detail) of every bad part.
    pub bad: Vec<(&'static str, String)>,
}

/// Parses one text message and maps its readings and alarms. `filter`: tags to keep (empty:
/// all); `alarms`: map `alarm:update`; `now` is the arrival time for readings without a
/// timestamp.
pub fn parse_message(
    text: &[u8],
    mapper: &Mapper,
    filter: &HashSet<String>,
    alarms: bool,
    now: u64,
) -> Parsed {
    let mut out = Parsed::default();
    let v: Value = match serde_json::from_slice(text) {
        Ok(v) => v,
        Err(e) => {
            out.bad.push(("invalid_json", e.to_string()));
            return out;
        }
    };
    let Some(event) = v.get("event").and_then(Value::as_str) else {
        out.bad
            .push(("no_event", "message without a string `event`".into()));
        return out;
    };
    out.event = event.to_string();
    let payload = v.get("payload").unwrap_or(&Value::Null);
    let reading =
        |out: &mut Parsed, item: &Value, key: Option<&str>| match parse_reading(item, key, now) {
            Ok(r) => {
                if !filter.is_empty() && !filter.contains(&r.tag) {
                    return;
                }
                match mapper.map_tag(&r) {
                    Ok(u) => out.updates.push(u),
                    Err(e) => out.bad.push(("unmapped", format!("tag {:?}: {e}", r.tag))),
                }
            }
            Err((reason, detail)) => out.bad.push((reason, detail)),
        };
    match event {
        "tag:snapshot" => match payload {
            Value::Object(m) => {
                for (k, item) in m {
                    reading(&mut out, item, Some(k));
                }
            }
            Value::Array(a) => {
                for item in a {
                    reading(&mut out, item, None);
                }
            }
            _ => out.bad.push((
                "bad_payload",
                "tag:snapshot payload is not an object or array".into(),
            )),
        },
        "tag:update" => reading(&mut out, payload, None),
        "tag:batch" => match payload {
            Value::Array(a) => {
                for item in a {
                    reading(&mut out, item, None);
                }
            }
            _ => out
                .bad
                .push(("bad_payload", "tag:batch payload is not an array".into())),
        },
        "alarm:update" if alarms => match parse_alarm(payload, now) {
            Ok(a) => match mapper.map_alarm(&a) {
                Ok(u) => out.updates.push(u),
                Err(e) => out.bad.push(("unmapped", format!("alarm {:?}: {e}", a.id))),
            },
            Err((reason, detail)) => out.bad.push((reason, detail)),
        },
        // connected, pong, pipeline:health, alarm:update without alarms, future events.
        _ => {}
    }
    out
}

type ItemError = (&'static str, String);

/// A `timestamp` field: RFC 3339 text or epoch ms; absent or null: `now`.
fn parse_ts(v: Option<&Value>, now: u64) -> Result<(u64, Option<String>), ItemError> {
    match v {
        None | Some(Value::Null) => Ok((now, None)),
        Some(Value::String(s)) => match parse_rfc3339_ns(s) {
            Some(ns) if ns >= 1_000_000 => Ok((ns / 1_000_000, Some(s.clone()))),
            _ => Err(("bad_timestamp", format!("timestamp {s:?} is not RFC 3339"))),
        },
        Some(Value::Number(n)) => match n.as_u64() {
            Some(ms) if ms > 0 => Ok((ms, Some(ms.to_string()))),
            _ => Err((
                "bad_timestamp",
                format!("timestamp {n} is not positive epoch ms"),
            )),
        },
        Some(other) => Err((
            "bad_timestamp",
            format!("timestamp {other} has the wrong type"),
        )),
    }
}

/// One reading `{"tagName","value","quality","timestamp"}`; `key` is the snapshot map key,
/// used when `tagName` is absent.
fn parse_reading(item: &Value, key: Option<&str>, now: u64) -> Result<TagReading, ItemError> {
    let obj = item
        .as_object()
        .ok_or_else(|| ("bad_reading", "reading is not an object".to_string()))?;
    let tag = match (obj.get("tagName"), key) {
        (Some(Value::String(t)), _) => t.clone(),
        (None, Some(k)) => k.to_string(),
        _ => return Err(("bad_reading", "reading without a string tagName".into())),
    };
    let value = obj
        .get("value")
        .cloned()
        .ok_or_else(|| ("bad_reading", format!("reading of {tag:?} without a value")))?;
    let (ts_ms, source_time) = parse_ts(obj.get("timestamp"), now)?;
    Ok(TagReading {
        tag,
        value,
        quality: obj.get("quality").cloned().filter(|q| !q.is_null()),
        source_time,
        ts_ms,
    })
}

fn parse_alarm(v: &Value, now: u64) -> Result<AlarmEvent, ItemError> {
    let obj = v
        .as_object()
        .ok_or_else(|| ("bad_alarm", "alarm payload is not an object".to_string()))?;
    let s = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_string);
    let id = s("id").ok_or_else(|| ("bad_alarm", "alarm without a string id".to_string()))?;
    let (ts_ms, source_time) = parse_ts(obj.get("timestamp"), now)?;
    Ok(AlarmEvent {
        id,
        name: s("name"),
        tag_id: s("tagId"),
        equipment_id: s("equipmentId").or_else(|| s("assetId")),
        site_id: s("siteId"),
        severity: s("severity"),
        state: s("state"),
        message: s("message"),
        value: obj.get("value").cloned(),
        source_time,
        ts_ms,
    })
}

// ---------------------------------------------------------------------------------------------
// Running

/// Starts the source: a connection task and an ingest task. The handle ends when both have
/// (after `stop`; updates already queued are ingested first).
pub fn spawn(
    cfg: &OxscadaWsConfig,
    mapper: Arc<Mapper>,
    state: Arc<AppState>,
    stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, String> {
    check_config(cfg).map_err(|(k, m)| format!("{k}: {m}"))?;
    let api_key = match (&cfg.api_key, &cfg.api_key_file) {
        (Some(k), _) => Some(k.expose().trim().to_string()),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                format!(
                    "sources.oxscada_ws.api_key_file: cannot read {}: {e}",
                    path.display()
                )
            })?;
            let key = text.trim_end_matches(['\n', '\r', ' ', '\t']).to_string();
            if key.is_empty() {
                return Err(format!(
                    "sources.oxscada_ws.api_key_file: {} is empty",
                    path.display()
                ));
            }
            Some(key)
        }
        (None, None) => None,
    };
    let protocols = HeaderValue::from_str(&subprotocol_header(api_key.as_deref()))
        .map_err(|_| "sources.oxscada_ws.api_key: not usable in an HTTP header".to_string())?;
    let status = &state.metrics.oxscada_ws;
    status.configured.store(true, Ordering::Relaxed);
    status.set_state(ConnState::Connecting);
    let (tx, rx) = mpsc::channel(QUEUE_MESSAGES_MAX);
    let ingest = tokio::spawn(ingest_loop(
        rx,
        state.clone(),
        cfg.updates_per_ingest_max,
        stop.clone(),
    ));
    let conn = tokio::spawn(connect_loop(
        cfg.clone(),
        protocols,
        mapper,
        state,
        tx,
        stop,
    ));
    Ok(tokio::spawn(async move {
        let _ = conn.await;
        let _ = ingest.await;
    }))
}

async fn connect_loop(
    cfg: OxscadaWsConfig,
    mut protocols: HeaderValue,
    mapper: Arc<Mapper>,
    state: Arc<AppState>,
    tx: mpsc::Sender<Vec<Update>>,
    mut stop: watch::Receiver<bool>,
) {
    // Keeps the key out of debug output of the HTTP types.
    protocols.set_sensitive(true);
    let status = &state.metrics.oxscada_ws;
    let filter: HashSet<String> = cfg.tags.iter().cloned().collect();
    let mut backoff = Backoff::new(cfg.reconnect_initial, cfg.reconnect_max, 2.0, Jitter::Equal);
    let url = cfg.url.trim().to_string();
    loop {
        if *stop.borrow() {
            break;
        }
        status.set_state(ConnState::Connecting);
        match connect(&cfg, &url, &protocols).await {
            Ok(ws) => {
                status.connects.fetch_add(1, Ordering::Relaxed);
                status.set_state(ConnState::Connected);
                tracing::info!(url = %url, "0xSCADA tag stream connected");
                let received = session(ws, &cfg, &mapper, &filter, &state, &tx, &mut stop).await;
                status.disconnects.fetch_add(1, Ordering::Relaxed);
                if received {
                    backoff.reset();
                }
            }
            Err(e) => {
                if should_log(u64::from(backoff.attempt()) + 1) {
                    tracing::warn!(url = %url, error = %e, "0xSCADA tag stream: cannot connect");
                }
                status.set_error(e);
            }
        }
        status.set_state(ConnState::Disconnected);
        if *stop.borrow() {
            break;
        }
        let delay = backoff.next_delay();
        tracing::debug!(
            delay_ms = delay.as_millis() as u64,
            "0xSCADA tag stream: reconnecting"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(&mut stop) => break,
        }
    }
    status.set_state(ConnState::Disconnected);
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(cfg: &OxscadaWsConfig, url: &str, protocols: &HeaderValue) -> Result<Ws, String> {
    let mut req = url
        .into_client_request()
        .map_err(|e| format!("bad request for {url}: {e}"))?;
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", protocols.clone());
    let limit = usize::try_from(cfg.message_bytes_max).unwrap_or(usize::MAX);
    let ws_cfg = WebSocketConfig::default()
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    let connecting = tokio_tungstenite::connect_async_with_config(req, Some(ws_cfg), true);
    match tokio::time::timeout(cfg.connect_timeout, connecting).await {
        Err(_) => Err(format!(
            "no connection within {}",
            humantime::format_duration(cfg.connect_timeout)
        )),
        Ok(Err(WsError::Http(resp))) => Err(format!(
            "0xSCADA refused the connection with HTTP {} (wrong or missing API key?)",
            resp.status()
        )),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok((ws, resp))) => {
            let chosen = resp
                .headers()
                .get("Sec-WebSocket-Protocol")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if chosen != SUBPROTOCOL {
                // Without the echo 0xSCADA did not accept our protocol version.
                return Err(format!(
                    "server chose subprotocol {chosen:?}, expected {SUBPROTOCOL:?}"
                ));
            }
            Ok(ws)
        }
    }
}

/// One connection's life. Returns whether any message was received (resets the back-off).
async fn session(
    mut ws: Ws,
    cfg: &OxscadaWsConfig,
    mapper: &Mapper,
    filter: &HashSet<String>,
    state: &AppState,
    tx: &mpsc::Sender<Vec<Update>>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let status = &state.metrics.oxscada_ws;
    let mut received = false;
    if !cfg.tags.is_empty() {
        let sub = json!({"type": "subscribe", "tags": cfg.tags}).to_string();
        if let Err(e) = ws.send(Message::text(sub)).await {
            status.set_error(format!("subscribe failed: {e}"));
            return false;
        }
    }
    let mut ping = tokio::time::interval_at(Instant::now() + cfg.ping_interval, cfg.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_rx = Instant::now();
    loop {
        tokio::select! {
            _ = stopped(stop) => {
                // Bounded: a peer that does not answer the close does not hold up shutdown.
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                return received;
            }
            _ = ping.tick() => {
                if last_rx.elapsed() > cfg.idle_timeout {
                    status.bad("idle_timeout");
                    status.set_error("nothing received within idle_timeout".into());
                    tracing::warn!("0xSCADA tag stream silent for too long; reconnecting");
                    return received;
                }
                if let Err(e) = ws.send(Message::text(r#"{"type":"ping"}"#)).await {
                    status.set_error(format!("ping failed: {e}"));
                    return received;
                }
            }
            msg = ws.next() => {
                let msg = match msg {
                    None => {
                        status.set_error("connection closed".into());
                        return received;
                    }
                    Some(Err(e)) => {
                        let reason = match &e {
                            WsError::Capacity(_) => "too_large",
                            WsError::Utf8(_) => "bad_utf8",
                            _ => "connection_error",
                        };
                        let n = status.bad(reason);
                        if reason != "connection_error" || should_log(n) {
                            tracing::warn!(error = %e, reason, "0xSCADA tag stream: connection ended");
                        }
                        status.set_error(e.to_string());
                        return received;
                    }
                    Some(Ok(m)) => m,
                };
                received = true;
                last_rx = Instant::now();
                let text = match &msg {
                    Message::Text(t) => t.as_bytes(),
                    Message::Binary(b) => b.as_ref(),
                    Message::Ping(_) => {
                        // tungstenite queued the pong; send it now rather than with the next write.
                        let _ = ws.flush().await;
                        continue;
                    }
                    Message::Pong(_) | Message::Frame(_) => continue,
                    Message::Close(_) => {
                        status.set_error("closed by 0xSCADA".into());
                        return received;
                    }
                };
                status.messages.fetch_add(1, Ordering::Relaxed);
                status.last_message_ms.store(now_ms(), Ordering::Relaxed);
                let parsed = parse_message(text, mapper, filter, cfg.alarms, now_ms());
                for (reason, detail) in &parsed.bad {
                    let n = status.bad(reason);
                    if should_log(n) {
                        tracing::warn!(reason, count = n, event = %parsed.event, "0xSCADA message: {detail}");
                    }
                }
                if !parsed.updates.is_empty() {
                    if tx.send(parsed.updates).await.is_err() {
                        return received; // the ingest task is gone: shutting down
                    }
                    // The send waits while the store refuses (backpressure), and meanwhile
                    // nothing is read and no ping goes out: that time is our own stall, not
                    // the server's silence, so the idle clock restarts once reading resumes.
                    // Without this the next ping tick dropped a healthy connection.
                    last_rx = Instant::now();
                }
            }
        }
    }
}

/// Takes mapped updates off the queue, validates them like the HTTP path, and ingests them in
/// chunks of at most `per_call` updates.
async fn ingest_loop(
    mut rx: mpsc::Receiver<Vec<Update>>,
    state: Arc<AppState>,
    per_call: usize,
    stop: watch::Receiver<bool>,
) {
    let status = &state.metrics.oxscada_ws;
    let mut buf: VecDeque<Update> = VecDeque::new();
    let mut backoff = Backoff::new(
        Duration::from_millis(100),
        Duration::from_secs(10),
        2.0,
        Jitter::Equal,
    );
    loop {
        if buf.is_empty() {
            match rx.recv().await {
                Some(v) => buf.extend(v),
                None => return, // the connection task ended and everything queued is done
            }
        }
        while buf.len() < per_call {
            match rx.try_recv() {
                Ok(v) => buf.extend(v),
                Err(_) => break,
            }
        }
        let n = buf.len().min(per_call);
        let mut chunk = Vec::with_capacity(n);
        for u in buf.drain(..n) {
            match validate_update(&u, &state.rules) {
                Ok(()) => chunk.push(u),
                Err(e) => {
                    let c = status.bad(&format!("invalid_{}", e.code));
                    state.metrics.reject(e.code, 1);
                    if should_log(c) {
                        tracing::warn!(code = e.code, count = c, "0xSCADA update refused: {e}");
                    }
                }
            }
        }
        if chunk.is_empty() {
            continue;
        }
        let count = chunk.len() as u64;
        loop {
            match state.store.ingest(chunk.clone()).await {
                Ok(_) => {
                    state.compactor.wake();
                    status.updates_ingested.fetch_add(count, Ordering::Relaxed);
                    state
                        .metrics
                        .ingest_updates_accepted
                        .fetch_add(count, Ordering::Relaxed);
                    backoff.reset();
                    break;
                }
                Err(StoreError::Closed) => {
                    tracing::warn!(updates = count, "store closed: 0xSCADA updates not stored (the next snapshot restores them)");
                    return;
                }
                Err(e) => {
                    // Counted like an HTTP 507, per refused attempt: the refusal is the same
                    // condition whoever produced the updates, and a count that keeps rising
                    // while the store keeps refusing keeps `FluxOutboxIngestRefusedFull` firing
                    // (its `increase(...[10m])` would clear after one count).
                    state
                        .metrics
                        .reject(crate::ingest::store_error_reason(&e), count);
                    let c = status.bad("store_refused");
                    if should_log(c) {
                        tracing::warn!(error = %e, updates = count, "0xSCADA updates not stored yet; retrying");
                    }
                    if *stop.borrow() {
                        tracing::warn!(updates = count, "shutting down: 0xSCADA updates not stored (the next snapshot restores them)");
                        return;
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }
}

/// Starts everything of the 0xSCADA integration that runs on its own: the WebSocket source
/// (when `[sources.oxscada_ws]` is configured) and the heartbeat (when enabled). The handles end
/// after `stop`; `app::run` awaits them before the store closes.
pub fn spawn_integration(
    cfg: &crate::config::Config,
    mapper: Arc<Mapper>,
    state: Arc<AppState>,
    stop: watch::Receiver<bool>,
) -> Result<Vec<JoinHandle<()>>, String> {
    let mut tasks = Vec::new();
    if let Some(ws) = &cfg.sources.oxscada_ws {
        tasks.push(spawn(ws, mapper.clone(), state.clone(), stop.clone())?);
    }
    if cfg.heartbeat.enabled {
        let entity = mapper
            .gateway_entity(&cfg.gateway_id)
            .map_err(|e| format!("heartbeat entity: {e}"))?;
        tasks.extend(crate::heartbeat::spawn(&cfg.heartbeat, state, entity, stop));
    }
    Ok(tasks)
}
