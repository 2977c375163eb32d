//! Read-your-writes on the gateway: `GET /api/state/entities/{id}` and `?prefix=` on the ingest
//! listener answer with Flux's state overlaid with pending values, in Flux's shapes, with
//! `X-Flux-Outbox-Flux: reached|unreachable|offline`. Checked during a link outage (flux-sim
//! `link_down`), after it heals, and in offline mode.
// Configs are built field by field from the defaults on purpose: each line is a deliberate
// difference from production settings.
#![allow(clippy::field_reassign_with_default)]

mod harness;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use flux_outbox::config::{Config, Durability};
use flux_outbox::sim::{self, Faults, SimHandle};
use harness::{link_down, start_in_process, start_sim, stop_in_process};

fn config(dir: &std::path::Path, flux_url: Option<String>) -> Config {
    let mut cfg = Config::default();
    cfg.data_dir = dir.join("data");
    cfg.gateway_id = "gw-ryw".into();
    cfg.durability = Durability::Flush;
    cfg.ingest.listen = "127.0.0.1:0".parse().unwrap();
    cfg.admin.listen = "127.0.0.1:0".parse().unwrap();
    cfg.flux.url = flux_url;
    cfg.flux.source = Some("outbox-gw-ryw".into());
    cfg.flux.connect_timeout = Duration::from_millis(500);
    cfg.flux.request_timeout = Duration::from_secs(2);
    cfg.flush.interval = Duration::from_millis(50);
    cfg.flush.backoff_initial = Duration::from_millis(50);
    cfg.flush.backoff_max = Duration::from_millis(200);
    cfg.flush.final_flush_timeout = Duration::from_secs(1);
    cfg.heartbeat.enabled = false;
    cfg.read_through.flux_timeout = Duration::from_millis(500);
    cfg.validate().unwrap();
    cfg
}

struct Answer {
    status: u16,
    flux: String,
    body: Value,
    raw: String,
}

async fn get(http: &reqwest::Client, url: String) -> Answer {
    let r = http.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let flux = r
        .headers()
        .get("x-flux-outbox-flux")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let raw = r.text().await.unwrap();
    let body = serde_json::from_str(&raw).unwrap_or(Value::Null);
    Answer {
        status,
        flux,
        body,
        raw,
    }
}

fn enc(id: &str) -> String {
    id.replace('/', "%2F")
}

/// What another agent writes straight to Flux.
async fn post_to_flux(http: &reqwest::Client, flux: &SimHandle, entity: &str, props: Value) {
    let ev = json!({"stream":"scada","source":"other-agent","timestamp":1,
        "payload":{"entity_id": entity, "properties": props}});
    let r = http
        .post(format!("{}/api/events", flux.url()))
        .header("content-type", "application/json")
        .body(ev.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

fn keys(v: &Value) -> Vec<String> {
    v.as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_values_show_during_an_outage_and_merge_after() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let flux = start_sim(sim::SimConfig::default()).await;
    // Other agents' state in Flux: a command on the control entity, and two more entities.
    let control = "scada/pump-1/control";
    post_to_flux(
        &http,
        &flux,
        control,
        json!({"command": "start", "cmd_id": "c1"}),
    )
    .await;
    post_to_flux(&http, &flux, "scada/pump-2", json!({"a": 1})).await;
    post_to_flux(&http, &flux, "scada/pump-3", json!({"x": 1})).await;

    let (running, stop, task) = start_in_process(config(dir.path(), Some(flux.url()))).await;
    let base = format!("http://{}", running.ingest_addr);

    // Link up: the gateway relays Flux's state unchanged.
    let a = get(&http, format!("{base}/api/state/entities/{}", enc(control))).await;
    assert_eq!((a.status, a.flux.as_str()), (200, "reached"), "{}", a.raw);
    assert_eq!(a.body["id"], json!(control));
    assert_eq!(
        a.body["properties"],
        json!({"command": "start", "cmd_id": "c1"})
    );
    let direct = flux.entity(control).unwrap();
    assert_eq!(
        a.body["lastUpdated"],
        json!(sim::rfc3339_nanos(direct.last_updated))
    );

    // The outage.
    flux.set_faults(link_down());
    let updates = json!([
        {"entity": control, "properties": {"cmd_ack": "c1", "cmd_status": "accepted"}},
        {"entity": "scada/pump-3", "delete": true},
        {"entity": "scada/new-1", "properties": {"v": 5}},
    ]);
    let r = http
        .post(format!("{base}/v1/updates"))
        .header("content-type", "application/json")
        .body(updates.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // Read straight after the write: the pending values, Flux unreachable.
    let a = get(&http, format!("{base}/api/state/entities/{}", enc(control))).await;
    assert_eq!(
        (a.status, a.flux.as_str()),
        (200, "unreachable"),
        "{}",
        a.raw
    );
    assert_eq!(keys(&a.body), ["id", "lastUpdated", "properties"]);
    assert_eq!(
        a.body["properties"],
        json!({"cmd_ack": "c1", "cmd_status": "accepted"})
    );
    assert!(
        flux_outbox::flux_client::parse_rfc3339_ns(a.body["lastUpdated"].as_str().unwrap())
            .is_some()
    );
    // A pending delete hides the entity; Flux's 404 shape.
    let a = get(
        &http,
        format!("{base}/api/state/entities/{}", enc("scada/pump-3")),
    )
    .await;
    assert_eq!((a.status, a.flux.as_str()), (404, "unreachable"));
    assert_eq!(a.body, json!({"error": "Entity not found"}));
    // Unknown and never written.
    let a = get(
        &http,
        format!("{base}/api/state/entities/{}", enc("scada/none")),
    )
    .await;
    assert_eq!((a.status, a.flux.as_str()), (404, "unreachable"));
    assert_eq!(a.body, json!({"error": "Entity not found"}));
    // The listing shows only what the gateway holds.
    let a = get(&http, format!("{base}/api/state/entities?prefix=scada/")).await;
    assert_eq!((a.status, a.flux.as_str()), (200, "unreachable"));
    let ids: Vec<&str> = a
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["scada/new-1", control]);
    assert!(flux.entity("scada/new-1").is_none(), "nothing reached Flux");

    // Link back: Flux's state merged with the pending values, before and after delivery.
    flux.set_faults(Faults::default());
    let a = get(&http, format!("{base}/api/state/entities/{}", enc(control))).await;
    assert_eq!((a.status, a.flux.as_str()), (200, "reached"), "{}", a.raw);
    assert_eq!(
        a.body["properties"],
        json!({"command": "start", "cmd_id": "c1", "cmd_ack": "c1", "cmd_status": "accepted"})
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while (running.store.stats().pending_keys > 0
        || flux.entity("scada/new-1").is_none()
        || flux.entity("scada/pump-3").is_some())
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(running.store.stats().pending_keys, 0, "delivered");
    let a = get(&http, format!("{base}/api/state/entities/{}", enc(control))).await;
    assert_eq!((a.status, a.flux.as_str()), (200, "reached"));
    assert_eq!(
        a.body["properties"],
        json!({"command": "start", "cmd_id": "c1", "cmd_ack": "c1", "cmd_status": "accepted"})
    );
    let a = get(
        &http,
        format!("{base}/api/state/entities?prefix=scada/pump"),
    )
    .await;
    assert_eq!((a.status, a.flux.as_str()), (200, "reached"));
    let ids: Vec<&str> = a
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["scada/pump-1/control", "scada/pump-2"]);
    let a = get(&http, format!("{base}/api/state/entities?namespace=scada")).await;
    assert_eq!(a.body.as_array().unwrap().len(), 3, "{}", a.raw);
    // An unencoded slash does not match the route (Flux: 404 with an empty body).
    let a = get(&http, format!("{base}/api/state/entities/scada/pump-2")).await;
    assert_eq!(a.status, 404);
    assert!(a.raw.is_empty());

    stop_in_process(stop, task).await;
    flux.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_mode_answers_from_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let (running, stop, task) = start_in_process(config(dir.path(), None)).await;
    let base = format!("http://{}", running.ingest_addr);
    let id = "scada/asset/site 1/TR-MAIN-01";
    let r = http
        .post(format!("{base}/v1/updates"))
        .header("content-type", "application/json")
        .body(
            json!({"entity": id, "properties": {"tag/TR-MAIN-01.TEMPERATURE": 66.2}, "ts": 1000})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Newer and older values of the same key: the newest by source time shows.
    for (v, ts) in [(70.0, 3000), (50.0, 2000)] {
        let r = http
            .post(format!("{base}/v1/updates"))
            .header("content-type", "application/json")
            .body(
                json!({"entity": id, "properties": {"tag/TR-MAIN-01.TEMPERATURE": v}, "ts": ts})
                    .to_string(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    let a = get(
        &http,
        format!("{base}/api/state/entities/scada%2Fasset%2Fsite%201%2FTR-MAIN-01"),
    )
    .await;
    assert_eq!((a.status, a.flux.as_str()), (200, "offline"), "{}", a.raw);
    assert_eq!(a.body["id"], json!(id));
    assert_eq!(
        a.body["properties"],
        json!({"tag/TR-MAIN-01.TEMPERATURE": 70.0})
    );
    let a = get(
        &http,
        format!("{base}/api/state/entities?prefix=scada%2Fasset"),
    )
    .await;
    assert_eq!((a.status, a.flux.as_str()), (200, "offline"));
    assert_eq!(a.body.as_array().unwrap().len(), 1);
    stop_in_process(stop, task).await;
}

#[test]
fn overlay_rules() {
    use flux_outbox::flux_client::EntityState;
    use flux_outbox::model::Version;
    use flux_outbox::read_through::{merge, Overlay};
    let v = |ts_ms, seq| Version { ts_ms, seq };
    let flux = EntityState {
        id: "e".into(),
        properties: json!({"a": 1, "b": 2}).as_object().unwrap().clone(),
        last_updated_ns: Some(5_000_000_000),
    };
    let mut o = Overlay::default();
    assert_eq!(merge(None, None), None);
    assert_eq!(
        merge(None, Some(&o)),
        None,
        "an empty overlay creates nothing"
    );
    let (p, last) = merge(Some(&flux), None).unwrap();
    assert_eq!(
        (Value::Object(p), last),
        (json!({"a": 1, "b": 2}), Some(5_000_000_000))
    );
    // A pending value replaces Flux's; lastUpdated is the newest of both.
    o.props.insert("b".into(), (v(10, 1), json!(3), 9_000));
    let (p, last) = merge(Some(&flux), Some(&o)).unwrap();
    assert_eq!(
        (Value::Object(p), last),
        (json!({"a": 1, "b": 3}), Some(9_000_000_000))
    );
    // A pending delete hides Flux's state and pending values not newer than it...
    o.delete = Some(v(20, 2));
    assert_eq!(merge(Some(&flux), Some(&o)), None);
    // ...but values written after the delete make the entity exist again with only them.
    o.props.insert("c".into(), (v(30, 3), json!("new"), 1_000));
    let (p, _) = merge(Some(&flux), Some(&o)).unwrap();
    assert_eq!(Value::Object(p), json!({"c": "new"}));
}

async fn post_update(
    http: &reqwest::Client,
    base: &str,
    token: Option<&str>,
    entity: &str,
    ts: u64,
) -> u16 {
    let mut req = http
        .post(format!("{base}/v1/updates"))
        .header("content-type", "application/json")
        .body(json!({"entity": entity, "properties": {"tag/T": ts}, "ts": ts}).to_string());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap().status().as_u16()
}

/// `read_through.require_token`: reads answer 401 without the ingest token (or with a wrong
/// one) when it is set, and need none when it is not (like Flux's reads) while writes still do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_need_the_ingest_token_only_when_required() {
    const TOKEN: &str = "ingest-token-for-tests";
    let http = reqwest::Client::new();
    let id = "scada/asset/site-1/TR-1";
    let url = |base: &str| format!("{base}/api/state/entities/{}", enc(id));
    for require in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), None);
        cfg.ingest.token = Some(flux_outbox::config::Secret::new(TOKEN));
        cfg.read_through.require_token = require;
        cfg.validate().unwrap();
        let (running, stop, task) = start_in_process(cfg).await;
        let base = format!("http://{}", running.ingest_addr);
        assert_eq!(post_update(&http, &base, None, id, 1000).await, 401);
        assert_eq!(post_update(&http, &base, Some(TOKEN), id, 1000).await, 200);

        let status = |r: reqwest::Response| r.status().as_u16();
        let anonymous = status(http.get(url(&base)).send().await.unwrap());
        let wrong = status(
            http.get(url(&base))
                .bearer_auth("wrong")
                .send()
                .await
                .unwrap(),
        );
        let right = http
            .get(url(&base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(right.status().as_u16(), 200, "require_token = {require}");
        let body: Value = serde_json::from_str(&right.text().await.unwrap()).unwrap();
        assert_eq!(body["properties"], json!({"tag/T": 1000}));
        let list = status(
            http.get(format!("{base}/api/state/entities?prefix=scada"))
                .send()
                .await
                .unwrap(),
        );
        if require {
            assert_eq!((anonymous, wrong, list), (401, 401, 401));
        } else {
            assert_eq!((anonymous, wrong, list), (200, 200, 200));
        }
        stop_in_process(stop, task).await;
    }
}

/// `read_through.pending_rows_max` bounds the overlay; an answer that hit it says so with
/// `X-Flux-Outbox-Truncated: true`, one below it carries no such header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_cut_at_pending_rows_max_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let mut cfg = config(dir.path(), None);
    cfg.read_through.pending_rows_max = 3;
    cfg.validate().unwrap();
    let (running, stop, task) = start_in_process(cfg).await;
    let base = format!("http://{}", running.ingest_addr);
    let list = || async {
        let r = http
            .get(format!("{base}/api/state/entities?prefix=scada%2Fasset"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let truncated = r
            .headers()
            .get("x-flux-outbox-truncated")
            .map(|v| v.to_str().unwrap().to_string());
        let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        (truncated, body.as_array().unwrap().len())
    };
    for i in 0..2 {
        let e = format!("scada/asset/site-1/TR-{i}");
        assert_eq!(post_update(&http, &base, None, &e, 1000 + i).await, 200);
    }
    assert_eq!(
        list().await,
        (None, 2),
        "below the bound: complete, no header"
    );
    for i in 2..6 {
        let e = format!("scada/asset/site-1/TR-{i}");
        assert_eq!(post_update(&http, &base, None, &e, 1000 + i).await, 200);
    }
    // Once compacted, all six are in the pending set, of which one read takes three.
    let deadline = Instant::now() + Duration::from_secs(30);
    while running.store.stats().log_backlog > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(running.store.stats().log_backlog, 0, "compacted");
    assert_eq!(running.store.stats().pending_keys, 6);
    assert_eq!(list().await, (Some("true".to_string()), 3));
    stop_in_process(stop, task).await;
}
