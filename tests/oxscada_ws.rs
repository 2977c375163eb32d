//! End to end: a 0xSCADA-like WebSocket server (checks the `Sec-WebSocket-Protocol` auth
//! header, echoes `oxscada.v1`) sends a snapshot and thousands of tag updates, drops the
//! connection twice, then sends an alarm and pings; the worker runs in-process against
//! flux-sim, and flux-sim must end holding the newest value of every tag under the mapped names,
//! for both presets, with every event stamped with the readings' own source timestamps. Before
//! each drop the server changes some tags without sending them (as readings that change while
//! the link breaks), and streams those tags no more: only the snapshot after the reconnect can
//! carry them, so flux-sim holding them proves the snapshot recovers lost readings. Further
//! tests: the tag filter's subscribe message reaches a server that honours it, a silent server
//! is dropped after `idle_timeout` and reconnected, a refused key, an oversized message, and a
//! store that refuses for longer than `idle_timeout` neither drops a healthy connection nor
//! hides its refusals from `flux_outbox_ingest_rejected_total`.
// Configs are built field by field from the defaults on purpose; the handshake callbacks
// return tungstenite's own (large) ErrorResponse type.
#![allow(clippy::field_reassign_with_default, clippy::result_large_err)]

mod harness;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use flux_outbox::config::{Config, Durability, Secret};
use flux_outbox::mapper::Preset;
use flux_outbox::sim::{self, SimHandle};
use flux_outbox::source_ws::OxscadaWsConfig;
use harness::{link_down, start_in_process, start_sim, stop_in_process};

const API_KEY: &str = "s3cr3t/key+?";
const EQUIPMENT: usize = 5;
const SENSORS: usize = 10;
const UPDATES_PER_CONNECTION: usize = 1500;
const CONNECTIONS_DROPPED: usize = 2;
const TS_BASE_MS: u64 = 1_772_366_400_000;
/// Tag indexes (plus 10 per dropped connection) changed silently before each drop.
const SILENT_TAGS: [usize; 2] = [3, 7];

fn tag(i: usize) -> String {
    format!("EQ-{}.S{}", i % EQUIPMENT, (i / EQUIPMENT) % SENSORS)
}

/// 0xSCADA's timestamp format: RFC 3339, milliseconds, `Z`.
fn iso(ms: u64) -> String {
    let full = sim::rfc3339_nanos(UNIX_EPOCH + Duration::from_millis(ms));
    format!("{}Z", &full[..23])
}

#[derive(Default)]
struct FakeScada {
    /// tag -> (value, ts_ms): what a snapshot sends, and the truth at the end.
    current: Mutex<BTreeMap<String, (f64, u64)>>,
    connections: AtomicUsize,
    bad_handshakes: AtomicUsize,
    pongs: AtomicUsize,
    app_pings: AtomicUsize,
    /// Every reading sent: value (its bits; values are unique per reading) -> source ts.
    sent: Mutex<std::collections::HashMap<u64, u64>>,
    /// Readings changed in `current` just before a drop and never sent as an update (tag,
    /// value); those tags are not streamed again, so only a snapshot can deliver them.
    silent: Mutex<Vec<(String, f64)>>,
}

impl FakeScada {
    fn snapshot(&self) -> Message {
        let cur = self.current.lock().unwrap();
        let payload: serde_json::Map<String, Value> = cur
            .iter()
            .map(|(t, (v, ts))| {
                (
                    t.clone(),
                    json!({"tagName": t, "value": v, "quality": "good", "timestamp": iso(*ts)}),
                )
            })
            .collect();
        Message::text(json!({"event": "tag:snapshot", "payload": payload}).to_string())
    }

    /// Tags changed silently before a drop: the stream leaves them alone from then on.
    fn frozen(&self, t: &str) -> bool {
        self.silent.lock().unwrap().iter().any(|(s, _)| s == t)
    }

    /// Changes a tag's current value without sending anything: what the next snapshot must
    /// deliver.
    fn change_silently(&self, t: &str, value: f64, ts: u64) {
        self.current
            .lock()
            .unwrap()
            .insert(t.to_string(), (value, ts));
        // It is sent, in the snapshot: its source time is checked like any reading's.
        self.sent.lock().unwrap().insert(value.to_bits(), ts);
        self.silent.lock().unwrap().push((t.to_string(), value));
    }

    fn reading(&self, i: usize, value: f64, ts: u64) -> Value {
        let t = tag(i);
        self.current.lock().unwrap().insert(t.clone(), (value, ts));
        self.sent.lock().unwrap().insert(value.to_bits(), ts);
        json!({"tagName": t, "value": value, "quality": "good", "timestamp": iso(ts)})
    }
}

/// A listener for a fake 0xSCADA server, and the URL the worker connects to.
async fn ws_listener() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_url = format!("ws://{}/ws/tags", listener.local_addr().unwrap());
    (listener, ws_url)
}

/// A handshake answer that echoes the `oxscada.v1` subprotocol, as 0xSCADA does.
fn echo_oxscada_protocol(mut resp: Response) -> Response {
    resp.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("oxscada.v1"),
    );
    resp
}

/// Accepts a WebSocket handshake without checking the key (echoing `oxscada.v1`); None when
/// the handshake fails.
async fn accept_any_key(stream: TcpStream) -> Option<WebSocketStream<TcpStream>> {
    let echo = |_: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        Ok(echo_oxscada_protocol(resp))
    };
    tokio_tungstenite::accept_hdr_async(stream, echo).await.ok()
}

/// Reads (and ignores) everything the client sends from now on, keeping the connection open.
fn read_and_ignore(mut ws: WebSocketStream<TcpStream>) {
    tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} });
}

/// A `tag:update` of EQ-0.S0 with value `k`, stamped `k` ms after [`TS_BASE_MS`].
fn eq0_update(k: usize) -> Message {
    let update = json!({"event":"tag:update","payload":{"tagName":"EQ-0.S0","value":k,
        "timestamp": iso(TS_BASE_MS + k as u64)}});
    Message::text(update.to_string())
}

/// Polls `done` every `step` until it holds or `limit` has passed; the caller asserts after.
async fn wait_until(limit: Duration, step: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() && Instant::now() < deadline {
        tokio::time::sleep(step).await;
    }
}

/// GET `url`, the body as text.
async fn get_text(http: &reqwest::Client, url: String) -> String {
    http.get(url).send().await.unwrap().text().await.unwrap()
}

async fn serve_scada(listener: TcpListener, scada: Arc<FakeScada>) {
    let expected = format!(
        "oxscada.v1, oxscada.api-key.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(API_KEY)
    );
    let mut ts = TS_BASE_MS;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let expected = expected.clone();
        let s = scada.clone();
        let check = move |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
            let offered = req
                .headers()
                .get("Sec-WebSocket-Protocol")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if offered != expected || req.uri().query().is_some() || req.uri().path() != "/ws/tags"
            {
                s.bad_handshakes.fetch_add(1, Ordering::SeqCst);
                let mut e = ErrorResponse::new(Some("bad api key".into()));
                *e.status_mut() = StatusCode::UNAUTHORIZED;
                return Err(e);
            }
            Ok(echo_oxscada_protocol(resp))
        };
        let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, check).await else {
            continue;
        };
        let k = scada.connections.fetch_add(1, Ordering::SeqCst);
        // Every connection starts with the snapshot of every current value.
        if ws.send(scada.snapshot()).await.is_err() {
            continue;
        }
        let connected =
            json!({"event":"connected","payload":{"clientId":"c","tagCount":EQUIPMENT*SENSORS}});
        let _ = ws.send(Message::text(connected.to_string())).await;
        let mut i = 0;
        while i < UPDATES_PER_CONNECTION {
            let value = (k * 1_000_000 + i) as f64 + 0.5;
            ts += 1;
            let msg = if i % 10 == 0 {
                // A batch of (up to) 5 readings.
                let items: Vec<Value> = (0..5)
                    .filter(|j| !scada.frozen(&tag(i + j)))
                    .map(|j| {
                        ts += 1;
                        scada.reading(i + j, value + j as f64, ts)
                    })
                    .collect();
                i += 5;
                json!({"event": "tag:batch", "payload": items})
            } else if scada.frozen(&tag(i)) {
                i += 1;
                continue;
            } else {
                let r = scada.reading(i, value, ts);
                i += 1;
                json!({"event": "tag:update", "payload": r})
            };
            if ws.send(Message::text(msg.to_string())).await.is_err() {
                break;
            }
            if i % 97 == 0 {
                // Junk in the stream is counted, never fatal.
                let _ = ws.send(Message::text("{not json")).await;
            }
        }
        if k < CONNECTIONS_DROPPED {
            // Readings that change while the connection breaks: in the server's state, never
            // sent as updates, never streamed again.
            for (j, i) in SILENT_TAGS.iter().enumerate() {
                ts += 1;
                let value = (k * 1_000_000 + 900_000 + j) as f64 + 0.25;
                scada.change_silently(&tag(i + k * 10), value, ts);
            }
            // Drop without a close handshake: the client must reconnect and catch up from the
            // next snapshot.
            drop(ws);
            continue;
        }
        let alarm = json!({"event":"alarm:update","payload":{"id":"ALM-EQ-1-1","name":"EQ-1 TRIP",
            "tagId":"EQ-1.S1","equipmentId":"EQ-1","siteId":"site-1","severity":"critical",
            "state":"active","message":"trip","timestamp": iso(ts),"value":1450}});
        let _ = ws.send(Message::text(alarm.to_string())).await;
        let _ = ws.send(Message::Ping(b"hi".to_vec().into())).await;
        let scada = scada.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = ws.next().await {
                match m {
                    Message::Pong(p) if &p[..] == b"hi" => {
                        scada.pongs.fetch_add(1, Ordering::SeqCst);
                    }
                    Message::Text(t) if t.as_str().contains("\"ping\"") => {
                        scada.app_pings.fetch_add(1, Ordering::SeqCst);
                        let _ = ws.send(Message::text(r#"{"event":"pong"}"#)).await;
                    }
                    _ => {}
                }
            }
        });
    }
}

fn worker_config(dir: &std::path::Path, flux_url: &str, ws_url: &str, preset: Preset) -> Config {
    let mut cfg = Config::default();
    cfg.data_dir = dir.join("data");
    cfg.gateway_id = "gw-test".into();
    cfg.durability = Durability::Flush;
    cfg.ingest.listen = "127.0.0.1:0".parse().unwrap();
    cfg.admin.listen = "127.0.0.1:0".parse().unwrap();
    cfg.flux.url = Some(flux_url.to_string());
    cfg.flux.source = Some("outbox-gw-test".into());
    cfg.flux.request_timeout = Duration::from_secs(5);
    cfg.flush.interval = Duration::from_millis(50);
    cfg.flush.backoff_initial = Duration::from_millis(50);
    cfg.flush.backoff_max = Duration::from_millis(500);
    cfg.flush.final_flush_timeout = Duration::from_secs(2);
    cfg.heartbeat.enabled = false;
    cfg.mapper.preset = preset;
    cfg.mapper.default_site = Some("site-1".into());
    cfg.sources.oxscada_ws = Some(OxscadaWsConfig {
        url: ws_url.to_string(),
        api_key: Some(Secret::new(API_KEY)),
        updates_per_ingest_max: 500,
        reconnect_initial: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(300),
        ping_interval: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(5),
        ..OxscadaWsConfig::default()
    });
    cfg.validate().unwrap();
    cfg
}

/// Where a tag's value must end up in Flux.
fn mapped(preset: Preset, t: &str) -> (String, String) {
    let (eq, sensor) = t.split_once('.').unwrap();
    match preset {
        Preset::Scaffold => (format!("scada/asset/site-1/{eq}"), format!("tag/{t}")),
        Preset::Adr15 => (
            format!("scada/{}", eq.to_lowercase()),
            sensor.to_lowercase(),
        ),
    }
}

async fn run_scenario(preset: Preset) {
    let dir = tempfile::tempdir().unwrap();
    let flux = start_sim(sim::SimConfig::default()).await;
    let scada = Arc::new(FakeScada::default());
    let (listener, ws_url) = ws_listener().await;
    let server = tokio::spawn(serve_scada(listener, scada.clone()));

    let cfg = worker_config(dir.path(), &flux.url(), &ws_url, preset);
    let (running, stop, task) = start_in_process(cfg).await;

    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let missing = converged(&flux, &scada, preset);
        let done = scada.connections.load(Ordering::SeqCst) > CONNECTIONS_DROPPED
            && missing.is_empty()
            && scada.pongs.load(Ordering::SeqCst) > 0
            && scada.app_pings.load(Ordering::SeqCst) > 0
            && flux.entity(&alarm_entity()).is_some();
        if done || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(missing.is_empty(), "{preset:?}: not converged: {missing:?}");
    // The readings only a snapshot carried are in Flux: the reconnect recovered them.
    let silent = scada.silent.lock().unwrap().clone();
    assert_eq!(silent.len(), SILENT_TAGS.len() * CONNECTIONS_DROPPED);
    let state = flux.entities();
    for (t, v) in &silent {
        let (entity, prop) = mapped(preset, t);
        assert_eq!(
            state.get(&entity).and_then(|p| p.get(&prop)),
            Some(&json!(v)),
            "{preset:?}: {t}={v}, changed while the link broke, not recovered by the snapshot"
        );
    }
    assert_eq!(scada.bad_handshakes.load(Ordering::SeqCst), 0);
    assert!(scada.connections.load(Ordering::SeqCst) > CONNECTIONS_DROPPED);
    assert!(
        scada.pongs.load(Ordering::SeqCst) > 0,
        "ping frame answered"
    );
    assert!(
        scada.app_pings.load(Ordering::SeqCst) > 0,
        "application-level {{\"type\":\"ping\"}} sent every ping_interval"
    );
    assert_source_timestamps_preserved(&flux, &scada);
    let alarm = flux.entity(&alarm_entity()).expect("alarm entity");
    assert_eq!(alarm.properties["state"], json!("active"));

    // The status is visible in /readyz and /metrics.
    let http = reqwest::Client::new();
    let admin = format!("http://{}", running.admin_addr);
    let ready: Value =
        serde_json::from_str(&get_text(&http, format!("{admin}/readyz")).await).unwrap();
    assert_eq!(
        ready["sources"]["oxscada_ws"]["state"],
        json!("connected"),
        "{ready}"
    );
    let metrics = get_text(&http, format!("{admin}/metrics")).await;
    assert!(metrics.contains("flux_outbox_source_connected{source=\"oxscada_ws\"} 1"));
    assert!(metrics.contains("reason=\"invalid_json\""), "junk counted");
    let connects = running.metrics.oxscada_ws.connects.load(Ordering::Relaxed);
    assert!(connects as usize > CONNECTIONS_DROPPED, "{connects}");
    assert!(running.metrics.oxscada_ws.bad_count("invalid_json") > 0);

    stop_in_process(stop, task).await;
    server.abort();
    flux.shutdown().await;
}

/// Every event flux-sim applied that carries tag readings is stamped with the newest source
/// timestamp among them (the flusher's rule), never with an arrival time; and the event that
/// delivered each tag's final value is at least as new as that reading.
fn assert_source_timestamps_preserved(flux: &SimHandle, scada: &FakeScada) {
    let sent = scada.sent.lock().unwrap().clone();
    let ts_of = |v: &Value| v.as_f64().and_then(|f| sent.get(&f.to_bits()).copied());
    let mut checked = 0;
    for ev in flux.applied_log() {
        let Some(props) = ev.properties.as_object() else {
            continue;
        };
        // Numbers are readings (the alarm entity aside); strings are quality companions.
        let numbers: Vec<&Value> = props.values().filter(|v| v.is_number()).collect();
        let readings: Vec<u64> = numbers.iter().filter_map(|v| ts_of(v)).collect();
        if readings.is_empty() {
            continue;
        }
        assert_eq!(
            readings.len(),
            numbers.len(),
            "a number that is no reading the server sent: {ev:?}"
        );
        let newest = *readings.iter().max().unwrap();
        assert_eq!(
            ev.timestamp as u64, newest,
            "event timestamp is not the readings' source time: {ev:?}"
        );
        checked += 1;
    }
    assert!(checked > 0, "no reading events in flux-sim's applied log");
}

fn alarm_entity() -> String {
    "scada/alert/ALM-EQ-1-1".to_string()
}

/// Tags whose newest value is not (yet) in Flux under its mapped name.
fn converged(flux: &SimHandle, scada: &FakeScada, preset: Preset) -> Vec<String> {
    let state = flux.entities();
    let cur = scada.current.lock().unwrap().clone();
    if cur.len() < EQUIPMENT * SENSORS {
        return vec!["(server not done)".into()];
    }
    cur.iter()
        .filter(|(t, (v, _))| {
            let (entity, prop) = mapped(preset, t);
            state.get(&entity).and_then(|p| p.get(&prop)) != Some(&json!(v))
        })
        .map(|(t, (v, _))| format!("{t}={v}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaffold_preset_converges_across_drops() {
    run_scenario(Preset::Scaffold).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adr15_preset_converges_across_drops() {
    run_scenario(Preset::Adr15).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_is_refused_and_reported() {
    // A server that refuses every handshake: the source keeps retrying, reports
    // `disconnected` with the reason, and the worker stays up.
    let dir = tempfile::tempdir().unwrap();
    let (listener, ws_url) = ws_listener().await;
    let attempts = Arc::new(AtomicUsize::new(0));
    let a = attempts.clone();
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            let refuse = |_: &Request, _: Response| -> Result<Response, ErrorResponse> {
                let mut e = ErrorResponse::new(Some("unauthorized".into()));
                *e.status_mut() = StatusCode::UNAUTHORIZED;
                Err(e)
            };
            let _ = tokio_tungstenite::accept_hdr_async(stream, refuse).await;
        }
    });
    let mut cfg = worker_config(dir.path(), "http://127.0.0.1:9", &ws_url, Preset::Scaffold);
    cfg.flux.url = None;
    let (running, stop, task) = start_in_process(cfg).await;
    wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        attempts.load(Ordering::SeqCst) >= 3
    })
    .await;
    assert!(
        attempts.load(Ordering::SeqCst) >= 3,
        "reconnects with back-off"
    );
    let ready = running.metrics.oxscada_ws.readyz().unwrap();
    assert_ne!(ready["state"], json!("connected"));
    let err = ready["last_error"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("401"), "{err}");
    stop_in_process(stop, task).await;
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_ends_the_connection_not_the_source() {
    // message_bytes_max bounds what the WebSocket layer buffers: a larger message is counted
    // as `too_large`, the connection is reopened, and the stream goes on.
    let dir = tempfile::tempdir().unwrap();
    let (listener, ws_url) = ws_listener().await;
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let Some(mut ws) = accept_any_key(stream).await else {
                continue;
            };
            let k = c.fetch_add(1, Ordering::SeqCst);
            let _ = ws.send(eq0_update(k)).await;
            if k == 0 {
                let huge = format!(
                    "{{\"event\":\"tag:update\",\"pad\":\"{}\"}}",
                    "x".repeat(64 * 1024)
                );
                let _ = ws.send(Message::text(huge)).await;
            }
            read_and_ignore(ws);
        }
    });
    let mut cfg = worker_config(dir.path(), "http://127.0.0.1:9", &ws_url, Preset::Scaffold);
    cfg.flux.url = None;
    if let Some(ws) = cfg.sources.oxscada_ws.as_mut() {
        ws.message_bytes_max = 16 * 1024;
        ws.api_key = None;
    }
    let (running, stop, task) = start_in_process(cfg).await;
    let status = &running.metrics.oxscada_ws;
    wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        status.updates_ingested.load(Ordering::Relaxed) >= 2 && status.bad_count("too_large") > 0
    })
    .await;
    assert_eq!(status.bad_count("too_large"), 1);
    assert!(conns.load(Ordering::SeqCst) >= 2, "reconnected");
    assert!(
        status.updates_ingested.load(Ordering::Relaxed) >= 2,
        "the stream goes on"
    );
    stop_in_process(stop, task).await;
    server.abort();
}

/// The tag filter end to end: after connecting (and after every reconnect) the worker sends
/// `{"type":"subscribe","tags":[...]}`; this server honours it (after the opening snapshot of
/// every tag, which 0xSCADA always sends, it streams only subscribed tags). Flux ends with the
/// subscribed tags' newest values and nothing of the others (the snapshot's unsubscribed tags
/// are filtered locally).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_filter_reaches_the_server_and_is_honoured() {
    const WANTED: [&str; 2] = ["EQ-0.S0", "EQ-1.S0"];
    const OTHER: &str = "EQ-0.S1";
    let dir = tempfile::tempdir().unwrap();
    let flux = start_sim(sim::SimConfig::default()).await;
    let (listener, ws_url) = ws_listener().await;
    // Per connection, the tags the client subscribed to (None: it never did).
    let subscriptions: Arc<Mutex<Vec<Option<Vec<String>>>>> = Arc::default();
    let withheld = Arc::new(AtomicUsize::new(0));
    let (subs, held) = (subscriptions.clone(), withheld.clone());
    let server = tokio::spawn(async move {
        let mut k = 0u64;
        while let Ok((stream, _)) = listener.accept().await {
            let Some(mut ws) = accept_any_key(stream).await else {
                continue;
            };
            k += 1;
            let reading = |t: &str, v: f64, ts: u64| json!({"tagName": t, "value": v, "quality": "good", "timestamp": iso(ts)});
            // The opening snapshot holds every tag, subscribed or not.
            let snapshot: serde_json::Map<String, Value> = WANTED
                .iter()
                .chain([&OTHER])
                .map(|t| (t.to_string(), reading(t, -1.0, TS_BASE_MS)))
                .collect();
            let snap = json!({"event": "tag:snapshot", "payload": snapshot});
            if ws.send(Message::text(snap.to_string())).await.is_err() {
                continue;
            }
            // Wait for the client's subscribe (a generous bound; a client that never sends
            // one gets every tag, as from 0xSCADA).
            let mut subscribed: Option<Vec<String>> = None;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while subscribed.is_none() {
                let Ok(Some(Ok(Message::Text(t)))) =
                    tokio::time::timeout_at(deadline, ws.next()).await
                else {
                    break;
                };
                let m: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                if m["type"] == "subscribe" {
                    subscribed = serde_json::from_value(m["tags"].clone()).ok();
                }
            }
            subs.lock().unwrap().push(subscribed.clone());
            for round in 0..20u64 {
                for (j, t) in WANTED.iter().chain([&OTHER]).enumerate() {
                    if subscribed
                        .as_ref()
                        .is_some_and(|s| !s.iter().any(|x| x == t))
                    {
                        held.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                    let v = (k * 1000 + round * 10 + j as u64) as f64;
                    let ts = TS_BASE_MS + k * 1000 + round + 1;
                    let msg = json!({"event": "tag:update", "payload": reading(t, v, ts)});
                    let _ = ws.send(Message::text(msg.to_string())).await;
                }
            }
            if k == 1 {
                drop(ws); // one reconnect: the subscribe must be sent again
                continue;
            }
            read_and_ignore(ws);
        }
    });
    let mut cfg = worker_config(dir.path(), &flux.url(), &ws_url, Preset::Scaffold);
    if let Some(ws) = cfg.sources.oxscada_ws.as_mut() {
        ws.api_key = None;
        ws.tags = WANTED.iter().map(|t| t.to_string()).collect();
    }
    let (_running, stop, task) = start_in_process(cfg).await;
    // The last connection's last round: k = 2, round 19.
    let want = |j: u64| json!((2 * 1000 + 19 * 10 + j) as f64);
    wait_until(Duration::from_secs(60), Duration::from_millis(50), || {
        let e0 = flux.entity("scada/asset/site-1/EQ-0");
        let e1 = flux.entity("scada/asset/site-1/EQ-1");
        e0.is_some_and(|e| e.properties.get("tag/EQ-0.S0") == Some(&want(0)))
            && e1.is_some_and(|e| e.properties.get("tag/EQ-1.S0") == Some(&want(1)))
    })
    .await;
    let subs = subscriptions.lock().unwrap().clone();
    let wanted: Vec<String> = WANTED.iter().map(|t| t.to_string()).collect();
    assert!(subs.len() >= 2, "reconnected: {subs:?}");
    assert!(
        subs.iter().all(|s| s.as_ref() == Some(&wanted)),
        "every connection subscribes to exactly the configured tags: {subs:?}"
    );
    assert!(withheld.load(Ordering::SeqCst) > 0, "the server filtered");
    let state = flux.entities();
    let eq0 = state.get("scada/asset/site-1/EQ-0").expect("EQ-0 in Flux");
    assert_eq!(eq0.get("tag/EQ-0.S0"), Some(&want(0)), "{state:?}");
    assert_eq!(
        state
            .get("scada/asset/site-1/EQ-1")
            .and_then(|p| p.get("tag/EQ-1.S0")),
        Some(&want(1)),
        "{state:?}"
    );
    assert!(
        !eq0.contains_key("tag/EQ-0.S1"),
        "an unsubscribed tag reached Flux: {state:?}"
    );
    stop_in_process(stop, task).await;
    server.abort();
    flux.shutdown().await;
}

/// A server that accepts, sends one update and then goes silent (it ignores the client's
/// `{"type":"ping"}`): the client gives up after `idle_timeout`, counts it, and reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_server_is_dropped_after_idle_timeout_and_reconnected() {
    let dir = tempfile::tempdir().unwrap();
    let (listener, ws_url) = ws_listener().await;
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let Some(mut ws) = accept_any_key(stream).await else {
                continue;
            };
            let k = c.fetch_add(1, Ordering::SeqCst);
            let _ = ws.send(eq0_update(k)).await;
            // Read (and ignore) everything; never answer; keep the TCP connection open.
            read_and_ignore(ws);
        }
    });
    let mut cfg = worker_config(dir.path(), "http://127.0.0.1:9", &ws_url, Preset::Scaffold);
    cfg.flux.url = None;
    if let Some(ws) = cfg.sources.oxscada_ws.as_mut() {
        ws.api_key = None;
        ws.ping_interval = Duration::from_millis(100);
        ws.idle_timeout = Duration::from_millis(400);
    }
    let (running, stop, task) = start_in_process(cfg).await;
    let status = &running.metrics.oxscada_ws;
    wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
        conns.load(Ordering::SeqCst) >= 3 && status.bad_count("idle_timeout") >= 2
    })
    .await;
    assert!(
        status.bad_count("idle_timeout") >= 2,
        "idle connections dropped: {}",
        status.bad_count("idle_timeout")
    );
    assert!(conns.load(Ordering::SeqCst) >= 3, "and reopened");
    assert!(status.updates_ingested.load(Ordering::Relaxed) >= 2);
    stop_in_process(stop, task).await;
    server.abort();
}

/// Backpressure from our own store is not silence from 0xSCADA. The outbox is full (Flux
/// down, a prefilled backlog at `store.pending_keys_max`), so the source's updates are refused
/// and the reader blocks on its full queue for several `idle_timeout`s while the server, which
/// answers every ping, waits. Every refusal is counted in
/// `flux_outbox_ingest_rejected_total{reason="outbox_full"}`, as for an HTTP producer. When
/// Flux returns and the backlog drains, the same connection goes on: no idle-timeout drop, no
/// reconnect, and every blocked reading is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_backpressure_keeps_the_connection_and_counts_refusals() {
    use flux_outbox::source_ws::QUEUE_MESSAGES_MAX;
    // One message the ingest task holds (updates_per_ingest_max = 1), a full queue, and one
    // the reader is blocked sending: the reader has then read everything the server sent, so
    // nothing is buffered that could look like traffic when it resumes.
    const MESSAGES: usize = QUEUE_MESSAGES_MAX + 2;
    let dir = tempfile::tempdir().unwrap();
    let flux = start_sim(sim::SimConfig::default()).await;
    flux.set_faults(link_down());
    let (listener, ws_url) = ws_listener().await;
    let conns = Arc::new(AtomicUsize::new(0));
    let pings = Arc::new(AtomicUsize::new(0));
    let go = Arc::new(tokio::sync::Notify::new());
    let (c, p, g) = (conns.clone(), pings.clone(), go.clone());
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let Some(mut ws) = accept_any_key(stream).await else {
                continue;
            };
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                // Only once the backlog fills the outbox.
                g.notified().await;
                for n in 1..=MESSAGES {
                    let update = json!({"event":"tag:update","payload":{"tagName":"EQ-0.S0",
                        "value": n, "quality": "good", "timestamp": iso(TS_BASE_MS + n as u64)}});
                    if ws.send(Message::text(update.to_string())).await.is_err() {
                        break;
                    }
                }
            }
            // Healthy from here on: every ping is answered.
            let p = p.clone();
            tokio::spawn(async move {
                while let Some(Ok(m)) = ws.next().await {
                    if matches!(&m, Message::Text(t) if t.as_str().contains("\"ping\"")) {
                        p.fetch_add(1, Ordering::SeqCst);
                        let _ = ws.send(Message::text(r#"{"event":"pong"}"#)).await;
                    }
                }
            });
        }
    });
    let mut cfg = worker_config(dir.path(), &flux.url(), &ws_url, Preset::Scaffold);
    cfg.store.pending_keys_max = 4;
    if let Some(ws) = cfg.sources.oxscada_ws.as_mut() {
        ws.api_key = None;
        ws.updates_per_ingest_max = 1;
        ws.ping_interval = Duration::from_millis(100);
        ws.idle_timeout = Duration::from_millis(400);
    }
    cfg.validate().unwrap();
    let (running, stop, task) = start_in_process(cfg).await;
    let status = &running.metrics.oxscada_ws;

    // The backlog: exactly pending_keys_max keys, so any new key is refused.
    let http = reqwest::Client::new();
    let r = http
        .post(format!("http://{}/v1/updates", running.ingest_addr))
        .header("content-type", "application/json")
        .body(
            json!({"entity": "scada/backlog", "properties": {"a": 1, "b": 2, "c": 3, "d": 4}})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    go.notify_one();

    let refused = || {
        running
            .metrics
            .ingest_rejected
            .lock()
            .unwrap()
            .get("outbox_full")
            .copied()
            .unwrap_or(0)
    };
    wait_until(Duration::from_secs(20), Duration::from_millis(20), || {
        refused() > 0 && status.messages.load(Ordering::Relaxed) >= MESSAGES as u64
    })
    .await;
    assert_eq!(
        status.messages.load(Ordering::Relaxed),
        MESSAGES as u64,
        "the reader read all and blocked on the last"
    );
    // Blocked for three idle timeouts, with nothing to read.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(status.updates_ingested.load(Ordering::Relaxed), 0);
    assert!(status.bad_count("store_refused") > 0);
    let metrics = get_text(&http, format!("http://{}/metrics", running.admin_addr)).await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("flux_outbox_ingest_rejected_total{reason=\"outbox_full\"}"))
        .unwrap_or_else(|| {
            panic!("the source's refusals are not in the rejected metric:\n{metrics}")
        });
    let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n > 0, "{line}");

    // Flux returns, the backlog drains, the blocked readings go in.
    let pings_before = pings.load(Ordering::SeqCst);
    flux.set_faults(sim::Faults::default());
    let want = json!(MESSAGES);
    let eq0 = || {
        flux.entity("scada/asset/site-1/EQ-0")
            .and_then(|e| e.properties.get("tag/EQ-0.S0").cloned())
    };
    wait_until(Duration::from_secs(30), Duration::from_millis(20), || {
        eq0() == Some(want.clone())
    })
    .await;
    // A few idle timeouts more, with the pings answered.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(eq0(), Some(want), "the newest blocked reading reached Flux");
    assert_eq!(
        status.updates_ingested.load(Ordering::Relaxed),
        MESSAGES as u64,
        "every blocked reading was ingested"
    );
    assert_eq!(
        status.bad_count("idle_timeout"),
        0,
        "a healthy connection was dropped for time spent blocked on our own store"
    );
    assert_eq!(conns.load(Ordering::SeqCst), 1, "no reconnect");
    assert!(
        pings.load(Ordering::SeqCst) > pings_before,
        "pings go out again after the stall"
    );
    stop_in_process(stop, task).await;
    server.abort();
    flux.shutdown().await;
}
