//! The gateway heartbeat reaches Flux through the outbox: `{prefix}gateway/{gateway_id}` with
//! version, backlog and delivery facts; folded into `namespace/rest` for a public-mode Flux; and
//! off when disabled; and during an outage it carries the real backlog (values, not just types).
// Configs are built field by field from the defaults on purpose: each line is a deliberate
// difference from production settings.
#![allow(clippy::field_reassign_with_default)]

mod harness;

use std::time::{Duration, Instant};

use serde_json::json;

use flux_outbox::app::Running;
use flux_outbox::config::{Config, Durability, Secret};
use flux_outbox::sim::{self, SimHandle};
use harness::{link_down, start_in_process, start_sim, stop_in_process, StopSwitch, WorkerTask};

fn config(dir: &std::path::Path, flux: &SimHandle) -> Config {
    let mut cfg = Config::default();
    cfg.data_dir = dir.join("data");
    cfg.gateway_id = "gw-hb".into();
    cfg.durability = Durability::Flush;
    cfg.ingest.listen = "127.0.0.1:0".parse().unwrap();
    cfg.admin.listen = "127.0.0.1:0".parse().unwrap();
    cfg.flux.url = Some(flux.url());
    cfg.flux.source = Some("outbox-gw-hb".into());
    cfg.flush.interval = Duration::from_millis(50);
    cfg.flush.backoff_initial = Duration::from_millis(50);
    cfg.flush.backoff_max = Duration::from_millis(200);
    cfg.flush.final_flush_timeout = Duration::from_secs(1);
    cfg.heartbeat.interval = Duration::from_millis(150);
    cfg
}

/// Validates `cfg` (tests change it after [`config`]) and starts the worker in-process.
async fn start_worker(cfg: Config) -> (Running, StopSwitch, WorkerTask) {
    cfg.validate().unwrap();
    start_in_process(cfg).await
}

/// Waits until the heartbeat entity shows a delivery time (so at least two beats went out).
async fn wait_for_beat(flux: &SimHandle, id: &str) -> serde_json::Map<String, serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(e) = flux.entity(id) {
            if e.properties
                .get("last_delivery_ms")
                .is_some_and(|v| v.is_u64())
            {
                return e.properties;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no heartbeat {id} in Flux: {:?}",
            flux.entities().keys().collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_is_visible_in_flux() {
    let dir = tempfile::tempdir().unwrap();
    let flux = start_sim(sim::SimConfig::default()).await;
    let (_running, stop, task) = start_worker(config(dir.path(), &flux)).await;
    let p = wait_for_beat(&flux, "scada/gateway/gw-hb").await;
    assert_eq!(p["gateway_id"], json!("gw-hb"));
    assert_eq!(p["version"], json!(env!("CARGO_PKG_VERSION")));
    for key in [
        "pending_keys",
        "oldest_pending_age_ms",
        "quarantine_keys",
        "heartbeat_ms",
        "last_delivery_ms",
    ] {
        assert!(p[key].is_u64(), "{key}: {:?}", p.get(key));
    }
    assert_eq!(p["link"], json!("up"));
    // The beat is fresh: written within the last few seconds.
    let age = flux_outbox::model::now_ms().saturating_sub(p["heartbeat_ms"].as_u64().unwrap());
    assert!(age < 10_000, "{age}");
    stop_in_process(stop, task).await;
    flux.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_is_folded_for_a_public_mode_flux() {
    let dir = tempfile::tempdir().unwrap();
    let flux = start_sim(sim::SimConfig {
        public: true,
        ..sim::SimConfig::default()
    })
    .await;
    let token = flux.register_namespace("scada");
    let mut cfg = config(dir.path(), &flux);
    cfg.ingest.public_mode = true;
    cfg.flux.auth_token = Some(Secret::new(token));
    cfg.gateway_id = "gw.plant-7".into();
    let (_running, stop, task) = start_worker(cfg).await;
    let p = wait_for_beat(&flux, "scada/gateway.gw%2Eplant-7").await;
    assert_eq!(p["gateway_id"], json!("gw.plant-7"));
    stop_in_process(stop, task).await;
    flux.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_can_be_disabled() {
    let dir = tempfile::tempdir().unwrap();
    let flux = start_sim(sim::SimConfig::default()).await;
    let mut cfg = config(dir.path(), &flux);
    cfg.heartbeat.enabled = false;
    let (running, stop, task) = start_worker(cfg).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(flux.entities().is_empty());
    let stats = running.store.stats();
    assert_eq!(
        (stats.pending_keys, stats.log_backlog, stats.delivered),
        (0, 0, 0),
        "nothing ingested"
    );
    stop_in_process(stop, task).await;
    flux.shutdown().await;
}

/// The heartbeat reports a real backlog with its values, not just well-typed fields. During an
/// outage three keys are posted and left pending; the beat that reaches Flux first when the
/// link returns was written during the outage (the newest beat waits in the outbox like any
/// update), so it must say: those keys pending, pending for at least as long as they had been
/// when it was written, link down, and a last delivery from before the outage. Once the
/// backlog is delivered, later beats say link up with a fresh delivery time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_reports_the_backlog_of_an_outage() {
    use flux_outbox::model::now_ms;
    use flux_outbox::sim::Faults;
    const ID: &str = "scada/gateway/gw-hb";
    let dir = tempfile::tempdir().unwrap();
    let flux = start_sim(sim::SimConfig::default()).await;
    let (running, stop, task) = start_worker(config(dir.path(), &flux)).await;
    let before = wait_for_beat(&flux, ID).await;
    let hb_props = before.len() as u64;

    // The outage, and a backlog of three keys.
    flux.set_faults(link_down());
    let outage_start = now_ms();
    let since = flux.applied_count();
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/updates", running.ingest_addr))
        .header("content-type", "application/json")
        .body(json!({"entity": "scada/pump-1", "properties": {"a": 1, "b": 2, "c": 3}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let posted = now_ms();
    // Several beats (interval 150ms) while the keys wait.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        flux.entity("scada/pump-1").is_none(),
        "delivered during the outage"
    );
    let restored = now_ms();
    flux.set_faults(Faults::default());

    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        let beat = flux
            .applied_since(since)
            .into_iter()
            .find(|e| e.entity_id.as_deref() == Some(ID));
        if let Some(b) = beat {
            // Flux's state right after that event: the flusher sends only the properties that
            // changed (an unchanged quarantine_keys 0 is not re-sent).
            let mut state = before.clone();
            if let Some(changed) = b.properties.as_object() {
                state.extend(changed.clone());
            }
            break serde_json::Value::Object(state);
        }
        assert!(Instant::now() < deadline, "no heartbeat after the outage");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let num = |k: &str| {
        first[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k}: {:?}", first.get(k)))
    };
    let written = num("heartbeat_ms");
    assert!(
        (posted..=restored + 1000).contains(&written),
        "the first beat after the outage was written during it: {first}"
    );
    // The three posted keys, plus at most the previous beat's own keys.
    let pending = num("pending_keys");
    assert!(
        (3..=3 + hb_props).contains(&pending),
        "pending_keys {pending}: {first}"
    );
    let age = num("oldest_pending_age_ms");
    assert!(
        age > 0 && age >= written - posted,
        "oldest_pending_age_ms {age}, but a key had waited {} ms: {first}",
        written - posted
    );
    assert_eq!(first["link"], json!("down"), "{first}");
    let last = num("last_delivery_ms");
    assert!(
        last <= outage_start,
        "last delivery {last} is from before the outage ({outage_start}): {first}"
    );
    assert_eq!(num("quarantine_keys"), 0);

    // Delivered, and the beats catch up.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let p = flux.entity(ID).map(|e| e.properties).unwrap_or_default();
        let fresh = p
            .get("last_delivery_ms")
            .and_then(|v| v.as_u64())
            .is_some_and(|t| t >= restored);
        if fresh && p.get("link") == Some(&json!("up")) && flux.entity("scada/pump-1").is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no fresh beat after the outage: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_in_process(stop, task).await;
    flux.shutdown().await;
}
