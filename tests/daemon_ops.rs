//! Operations of the `flux-outbox` daemon, against the real binary and flux-sim: every series
//! `/metrics` promises moves when its event happens, the shutdown path (final flush, requests
//! in flight, SIGINT, JSON logs) keeps its promises without a restart, `/readyz` really checks
//! the store, and the configuration defaults and files that only show at run time work.

mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use flux_outbox::sim::{Faults, SimConfig, SimHandle};
use harness::*;
use serde_json::{json, Value};

/// Test settings without the heartbeat (its beats would add keys and deliveries to the counts).
fn settings(flux_url: Option<&str>) -> Settings {
    let mut s = Settings::new(flux_url);
    s.set("heartbeat.enabled", "false");
    s
}

/// Source timestamps well in the past, so "older" and "newer" are explicit.
const TS: u64 = 1_772_366_400_000;

async fn post_ok(w: &Worker, body: Value) {
    let (s, answer) = w.post_json("/v1/updates", &body).await;
    assert_eq!(s, 200, "{body}: {answer}");
}

/// Writes `entity`.`prop` = `value` straight into flux-sim, as another Flux producer would.
async fn other_writer(sim: &SimHandle, entity: &str, prop: &str, value: Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/api/events", sim.url()))
        .header("content-type", "application/json")
        .body(flux_event(entity, json!({ prop: value })).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
}

fn counter(m: &str, series: &str) -> f64 {
    metric(m, series)
}

/// Every series of the flush latency histogram: buckets non-decreasing, `+Inf` equal to the
/// count, a positive sum when something was observed. Returns the count.
fn check_histogram(m: &str) -> f64 {
    let mut last = 0.0;
    for b in flux_outbox::metrics::FLUSH_BUCKETS_S {
        let v = metric(
            m,
            &format!("flux_outbox_flush_seconds_bucket{{le=\"{b}\"}}"),
        );
        assert!(
            v >= last,
            "bucket le={b} ({v}) below the previous ({last}):\n{m}"
        );
        last = v;
    }
    let inf = metric(m, "flux_outbox_flush_seconds_bucket{le=\"+Inf\"}");
    let count = metric(m, "flux_outbox_flush_seconds_count");
    assert!(inf >= last, "+Inf bucket below the last finite one:\n{m}");
    assert_eq!(inf, count, "+Inf bucket must equal the count:\n{m}");
    if count > 0.0 {
        assert!(metric(m, "flux_outbox_flush_seconds_sum") > 0.0, "{m}");
    }
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_every_promised_event() {
    let sim = start_sim(SimConfig::default()).await;
    let mut w = Worker::with_settings(settings(Some(&sim.url())));
    w.start().await;

    // The promised series are all there, with the right type, before anything happened.
    let m = w.metrics().await;
    for (name, kind) in [
        ("flux_outbox_pending_keys", "gauge"),
        ("flux_outbox_pending_entities", "gauge"),
        ("flux_outbox_oldest_pending_age_seconds", "gauge"),
        ("flux_outbox_log_backlog", "gauge"),
        ("flux_outbox_quarantine_keys", "gauge"),
        ("flux_outbox_disk_bytes", "gauge"),
        ("flux_outbox_link_up", "gauge"),
        ("flux_outbox_link_state", "gauge"),
        ("flux_outbox_ingest_accepted_total", "counter"),
        ("flux_outbox_ingest_rejected_total", "counter"),
        ("flux_outbox_superseded_total", "counter"),
        ("flux_outbox_late_dropped_total", "counter"),
        ("flux_outbox_noops_total", "counter"),
        ("flux_outbox_conflicts_total", "counter"),
        ("flux_outbox_batches_total", "counter"),
        ("flux_outbox_events_total", "counter"),
        ("flux_outbox_bytes_sent_total", "counter"),
        ("flux_outbox_delivered_keys_total", "counter"),
        ("flux_outbox_quarantined_total", "counter"),
        ("flux_outbox_flush_seconds", "histogram"),
    ] {
        assert!(
            m.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} ({kind}) missing:\n{m}"
        );
    }
    assert_eq!(check_histogram(&m), 0.0, "nothing flushed yet:\n{m}");
    assert_eq!(counter(&m, "flux_outbox_bytes_sent_total"), 0.0);
    // The store's size on disk is measured (refreshed every second).
    poll(
        DEADLINE,
        "flux_outbox_disk_bytes to be measured",
        || async { (metric(&w.metrics().await, "flux_outbox_disk_bytes") > 0.0).then_some(()) },
    )
    .await;

    // Link down: a key waits, a newer value of it supersedes the first.
    sim.set_faults(link_down());
    post_ok(
        &w,
        json!({"entity": "scada/mx/a", "properties": {"v": 1, "w": 1}, "ts": TS}),
    )
    .await;
    w.wait_compacted().await;
    post_ok(
        &w,
        json!({"entity": "scada/mx/a", "properties": {"v": 2}, "ts": TS + 10}),
    )
    .await;
    w.wait_compacted().await;
    let m = poll(DEADLINE, "the pending value to age", || async {
        let m = w.metrics().await;
        (metric(&m, "flux_outbox_oldest_pending_age_seconds") > 0.0).then_some(m)
    })
    .await;
    assert_eq!(metric(&m, "flux_outbox_pending_keys"), 2.0, "{m}");
    assert_eq!(metric(&m, "flux_outbox_pending_entities"), 1.0, "{m}");
    assert_eq!(
        metric(&m, "flux_outbox_log_backlog"),
        0.0,
        "compacted:\n{m}"
    );
    assert_eq!(metric(&m, "flux_outbox_superseded_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "flux_outbox_ingest_accepted_total"), 2.0, "{m}");
    // The gauges agree with the summary the dump tool shows.
    let s = w.summary().await;
    assert_eq!(s["pending_keys"], 2, "{s}");
    assert_eq!(s["superseded"], 1, "{s}");
    poll(DEADLINE, "the link to be seen down", || async {
        let m = w.metrics().await;
        (metric(&m, "flux_outbox_link_state{state=\"down\"}") == 1.0).then_some(())
    })
    .await;
    let age = metric(&w.metrics().await, "flux_outbox_oldest_pending_age_seconds");
    poll(DEADLINE, "the oldest pending age to grow", || async {
        (metric(&w.metrics().await, "flux_outbox_oldest_pending_age_seconds") > age).then_some(())
    })
    .await;

    // Link back: delivered; batches, events, bytes and latencies are counted.
    sim.set_faults(Faults::default());
    wait_value(&sim, "scada/mx/a", "v", &json!(2)).await;
    w.wait_drained().await;
    let m = w.metrics().await;
    assert_eq!(metric(&m, "flux_outbox_pending_keys"), 0.0, "{m}");
    assert_eq!(
        metric(&m, "flux_outbox_oldest_pending_age_seconds"),
        0.0,
        "{m}"
    );
    assert_eq!(metric(&m, "flux_outbox_delivered_keys_total"), 2.0, "{m}");
    assert!(
        metric(&m, "flux_outbox_batches_total{result=\"ok\"}") >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "flux_outbox_events_total{result=\"applied\"}") >= 1.0,
        "{m}"
    );
    let sent = metric(&m, "flux_outbox_bytes_sent_total");
    assert!(sent > 0.0, "{m}");
    let flushes = check_histogram(&m);
    assert!(flushes >= 1.0, "{m}");

    // Late: older than what Flux got; dropped and counted, Flux keeps the newer value.
    post_ok(
        &w,
        json!({"entity": "scada/mx/a", "properties": {"v": 0}, "ts": TS + 5}),
    )
    .await;
    w.wait_drained().await;
    poll(
        DEADLINE,
        "late_dropped to count the late update",
        || async {
            (metric(&w.metrics().await, "flux_outbox_late_dropped_total") == 1.0).then_some(())
        },
    )
    .await;
    assert_eq!(sim.entity("scada/mx/a").unwrap().properties["v"], json!(2));

    // No-op: a newer update with the value Flux already holds is settled without a write.
    let applied = sim.applied_count();
    post_ok(
        &w,
        json!({"entity": "scada/mx/a", "properties": {"v": 2}, "ts": TS + 20}),
    )
    .await;
    poll(DEADLINE, "the no-op to be counted", || async {
        (metric(&w.metrics().await, "flux_outbox_noops_total") == 1.0).then_some(())
    })
    .await;
    w.wait_drained().await;
    assert_eq!(sim.applied_count(), applied, "a no-op must not be sent");

    // Conflict: another writer changed the key after our delivery; ours (newer) overwrites.
    tokio::time::sleep(Duration::from_millis(20)).await; // Flux's lastUpdated must be later
    other_writer(&sim, "scada/mx/a", "v", json!(99)).await;
    wait_value(&sim, "scada/mx/a", "v", &json!(99)).await;
    post_ok(
        &w,
        json!({"entity": "scada/mx/a", "properties": {"v": 3}, "ts": TS + 30}),
    )
    .await;
    wait_value(&sim, "scada/mx/a", "v", &json!(3)).await;
    w.wait_drained().await;
    let m = w.metrics().await;
    assert_eq!(metric(&m, "flux_outbox_conflicts_total"), 1.0, "{m}");

    // Rejected for good: quarantined, counted as an invalid event.
    sim.set_faults(Faults {
        validation_fail_rate: 1.0,
        ..Faults::default()
    });
    post_ok(&w, json!({"entity": "scada/mx/q", "properties": {"v": 1}})).await;
    let m = poll(DEADLINE, "the rejected key to be quarantined", || async {
        let m = w.metrics().await;
        (metric(&m, "flux_outbox_quarantine_keys") == 1.0).then_some(m)
    })
    .await;
    sim.set_faults(Faults::default());
    assert_eq!(metric(&m, "flux_outbox_quarantined_total"), 1.0, "{m}");
    assert_eq!(
        metric(&m, "flux_outbox_events_total{result=\"invalid\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "flux_outbox_pending_keys"), 0.0, "{m}");
    // Counters only grow.
    assert!(metric(&m, "flux_outbox_bytes_sent_total") > sent, "{m}");
    assert!(check_histogram(&m) > flushes, "{m}");
    assert_eq!(metric(&m, "flux_outbox_superseded_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "flux_outbox_late_dropped_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "flux_outbox_noops_total"), 1.0, "{m}");
    let rows: Value = serde_json::from_str(&w.admin_get("/v1/outbox/quarantine").await.1).unwrap();
    assert_eq!(rows.as_array().map(Vec::len), Some(1), "{rows}");
    w.stop().await;
}

/// Keys pending at SIGTERM that nothing else would send (the flush interval is an hour) reach
/// Flux through the final flush, before the process exits; the settlements are durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_flush_at_sigterm_delivers_before_exit() {
    let sim = start_sim(SimConfig::default()).await;
    let mut s = settings(Some(&sim.url()));
    s.set("flush.interval", "\"1h\"");
    // First without the final flush: shows that in this setup nothing else delivers.
    s.set("flush.final_flush_timeout", "\"0s\"");
    let mut w = Worker::with_settings(s);
    w.start().await;
    post_ok(
        &w,
        json!([
            {"entity": "scada/ff/a", "properties": {"v": 1, "s": "x"}},
            {"entity": "scada/ff/b", "properties": {"v": 2}},
        ]),
    )
    .await;
    let (st, body) = w
        .post_json("/api/events", &flux_event("scada/ff/c", json!({"kw": 3})))
        .await;
    assert_eq!(st, 200, "{body}");
    w.wait_compacted().await;
    assert_eq!(w.backlog().await, (4, 0));
    w.stop().await;
    assert!(sim.entities().is_empty(), "{:?}", sim.entities());
    assert_eq!(sim.applied_count(), 0);

    // With the final flush: delivered before exit, without a restart.
    w.settings.set("flush.final_flush_timeout", "\"5s\"");
    w.start().await;
    assert_eq!(
        w.backlog().await,
        (4, 0),
        "still pending after the first stop"
    );
    assert!(sim.entities().is_empty());
    w.stop().await;
    for (entity, prop, value) in [
        ("scada/ff/a", "v", json!(1)),
        ("scada/ff/a", "s", json!("x")),
        ("scada/ff/b", "v", json!(2)),
        ("scada/ff/c", "kw", json!(3)),
    ] {
        let have = sim
            .entity(entity)
            .and_then(|e| e.properties.get(prop).cloned());
        assert_eq!(have, Some(value), "{entity} {prop} after the final flush");
    }
    assert!(w.log().contains("final flush"), "{}", w.log());
    let applied = sim.applied_count();

    // The deliveries were settled durably: the next start has nothing pending, sends nothing.
    w.start().await;
    assert_eq!(w.backlog().await, (0, 0));
    let m = w.metrics().await;
    assert_eq!(metric(&m, "flux_outbox_pending_keys"), 0.0, "{m}");
    w.stop().await;
    assert_eq!(sim.applied_count(), applied, "nothing was resent");
}

/// One attempt of [`sigterm_finishes_requests_in_flight`]: None when the timing did not put
/// the request in flight at the signal (the attempt proves nothing either way).
async fn in_flight_attempt(attempt: usize) -> Option<()> {
    let sim = start_sim(SimConfig::default()).await;
    let mut s = settings(Some(&sim.url()));
    // Every commit waits 1 s for more requests: a request is admitted, then waits that long
    // for durability, and the signal comes in between. Delivery only by the final flush.
    s.set("ingest.group_commit_window", "\"1s\"");
    s.set("flush.interval", "\"1h\"");
    s.set("flush.final_flush_timeout", "\"5s\"");
    let mut w = Worker::with_settings(s);
    w.start().await;

    let entity = format!("scada/inflight/a{attempt}");
    let body = json!({"entity": entity, "properties": {"v": attempt}}).to_string();
    let url = format!("{}/v1/updates", w.ingest);
    let request = tokio::spawn(async move {
        let r = reqwest::Client::new()
            .post(url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("the request in flight must get an answer, not a cut connection");
        let status = r.status().as_u16();
        (status, r.text().await.unwrap_or_default())
    });
    poll(DEADLINE, "the worker to receive the request", || async {
        let m = w.metrics().await;
        (metric(&m, "flux_outbox_ingest_requests_total") >= 1.0).then_some(())
    })
    .await;
    // Let it pass admission into the group commit (a delay, not an assertion).
    tokio::time::sleep(Duration::from_millis(200)).await;
    if request.is_finished() {
        eprintln!("attempt {attempt}: answered before the signal; again");
        return None;
    }
    let signalled = Instant::now();
    w.sigterm();
    let (status, answer) = request.await.unwrap();
    if status == 503 && answer.contains("retry against the restarted worker") {
        eprintln!("attempt {attempt}: the signal beat admission; again");
        let _ = w.wait_exit(DEADLINE).await;
        return None;
    }
    assert_eq!(
        status, 200,
        "a request admitted before SIGTERM finishes: {answer}"
    );
    let ans: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(ans["accepted"], 1, "{answer}");
    eprintln!(
        "attempt {attempt}: answered 200 {:?} after the signal",
        signalled.elapsed()
    );
    let status = w.wait_exit(DEADLINE).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", w.log());
    // Acknowledged during shutdown and delivered by the final flush, before exit.
    assert_eq!(
        sim.entity(&entity).map(|e| e.properties["v"].clone()),
        Some(json!(attempt)),
        "log:\n{}",
        w.log()
    );
    // And the restarted worker has nothing left of it.
    w.start().await;
    assert_eq!(w.backlog().await, (0, 0));
    w.stop().await;
    Some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_in_flight() {
    for attempt in 1..=5 {
        if in_flight_attempt(attempt).await.is_some() {
            return;
        }
    }
    panic!("could not get a request in flight at SIGTERM in 5 attempts");
}

/// `--log-format json`: every line a log shipper reads is a JSON object; SIGINT takes the same
/// graceful path as SIGTERM (final flush included) and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_and_sigint_shutdown() {
    let sim = start_sim(SimConfig::default()).await;
    let mut s = settings(Some(&sim.url()));
    s.set("flush.interval", "\"1h\"");
    s.set("flush.final_flush_timeout", "\"5s\"");
    let mut w = Worker::with_settings(s);
    w.log_format = "json";
    w.start().await;
    post_ok(&w, json!({"entity": "scada/int/a", "properties": {"v": 7}})).await;
    w.wait_compacted().await;
    assert!(sim.entities().is_empty());
    w.signal(libc::SIGINT);
    let status = w.wait_exit(DEADLINE).await;
    assert_eq!(
        status.code(),
        Some(0),
        "SIGINT must exit 0; log:\n{}",
        w.log()
    );
    assert_eq!(
        sim.entity("scada/int/a").map(|e| e.properties["v"].clone()),
        Some(json!(7)),
        "the final flush runs on SIGINT too"
    );

    let log = w.log();
    let mut messages = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line:?}\n{log}"));
        assert!(v["level"].is_string(), "no level: {line}");
        assert!(v["timestamp"].is_string(), "no timestamp: {line}");
        let msg = v["fields"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fields.message: {line}"));
        messages.push((msg.to_string(), v));
    }
    let find = |prefix: &str| {
        messages
            .iter()
            .find(|(m, _)| m.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in the JSON log:\n{log}"))
            .1
            .clone()
    };
    let ready = find("ready");
    assert_eq!(ready["level"], "INFO", "{ready}");
    assert!(
        ready["fields"]["ingest"]
            .as_str()
            .is_some_and(|a| w.ingest.ends_with(a)),
        "structured fields stay fields: {ready}"
    );
    find("SIGINT received");
    find("shutting down");
    find("final flush");
    find("store closed");
}

#[test]
fn demo_feed_values_are_unique_per_key() {
    let mut seen: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    let mut updates = 0;
    for n in 1..=30_000u64 {
        let (entity, prop, value) = flux_outbox::demo::feed_update(n);
        assert!(
            value.is_number() || value.is_string(),
            "a SCADA tag value: {value}"
        );
        let fresh = seen
            .entry((entity.clone(), prop.clone()))
            .or_default()
            .insert(value.to_string());
        assert!(
            fresh,
            "update {n}: {entity} {prop} = {value} repeats an earlier value"
        );
        // Exact through JSON, as flux-sim will hold it.
        let back: Value = serde_json::from_str(&value.to_string()).unwrap();
        assert_eq!(back, value);
        updates += 1;
    }
    // The property matters: keys recur many times, STATUS keys included.
    assert!(seen.len() >= 20 && seen.len() <= 100, "{} keys", seen.len());
    assert!(seen.values().all(|v| v.len() >= updates / seen.len() / 2));
    assert!(seen.keys().any(|(_, p)| p.ends_with(".STATUS")));
}

#[test]
fn readyz_store_check_reads_the_store() {
    use flux_outbox::admin::store_check;
    use flux_outbox::store::{Store, StoreOptions};
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(&dir.path().join("data"), StoreOptions::default()).unwrap();
    assert_eq!(store_check(&store), Ok(()));
    let db = store.raw_db();
    db.insert(b"Mformat_version", &9u32.to_be_bytes()).unwrap();
    let e = store_check(&store).unwrap_err();
    assert!(e.contains("format version 9"), "{e}");
    db.insert(b"Mformat_version", &b"xy"[..]).unwrap();
    assert!(store_check(&store).unwrap_err().contains("malformed"));
    db.remove(b"Mformat_version").unwrap();
    assert!(store_check(&store).unwrap_err().contains("missing"));
    db.insert(
        b"Mformat_version",
        &flux_outbox::record::FORMAT_VERSION.to_be_bytes(),
    )
    .unwrap();
    assert_eq!(store_check(&store), Ok(()));
    store.close().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_the_store_open() {
    let mut w = Worker::with_settings(settings(None));
    w.start().await;
    let (s, body) = w.admin_get("/readyz").await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], true, "{body}");
    assert_eq!(v["store"], "open", "{body}");
    assert_eq!(v["link"], "offline", "no Flux URL: {body}");
    assert!(v.get("store_error").is_none(), "{body}");
    w.stop().await;
}

/// `flux.auth_token_file`: the token is read from the file (trailing newline trimmed) and sent
/// to Flux; a public-mode flux-sim refuses every write without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flux_auth_token_file_is_read_and_sent() {
    let sim = start_sim(SimConfig {
        public: true,
        ..SimConfig::default()
    })
    .await;
    let token = sim.register_namespace("acme");
    let mut w = Worker::with_settings(settings(Some(&sim.url())));
    let token_file = w.dir.path().join("flux.token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    w.settings.set(
        "flux.auth_token_file",
        &toml_str(&token_file.display().to_string()),
    );
    w.start().await;
    post_ok(&w, json!({"entity": "acme/tr-1", "properties": {"v": 1}})).await;
    wait_value(&sim, "acme/tr-1", "v", &json!(1)).await;
    w.wait_drained().await;
    w.stop().await;
    assert!(!w.log().contains(&token), "the token leaked into the log");
    let (code, stdout, stderr) = check_config(&w.config_path());
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stdout.contains(&token), "{stdout}");

    // The file's content is what counts: a wrong token in it and Flux refuses; nothing is lost.
    std::fs::write(&token_file, "not-the-token\n").unwrap();
    w.start().await;
    post_ok(&w, json!({"entity": "acme/tr-1", "properties": {"v": 2}})).await;
    poll(DEADLINE, "the link to report the refused token", || async {
        let (_, body) = w.admin_get("/readyz").await;
        (serde_json::from_str::<Value>(&body).ok()?["link"] == "auth_failed").then_some(())
    })
    .await;
    assert_eq!(sim.entity("acme/tr-1").unwrap().properties["v"], json!(1));
    assert_eq!(w.backlog().await.0, 1, "kept pending, never quarantined");
    w.stop().await;
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    w.start().await;
    wait_value(&sim, "acme/tr-1", "v", &json!(2)).await;
    w.wait_drained().await;
    w.stop().await;
}

/// Without `gateway_id` the host name is used, and the default source follows it.
#[test]
fn gateway_id_defaults_to_the_host_name() {
    let host = gethostname::gethostname().into_string().unwrap();
    let host = host.trim();
    assert!(!host.is_empty(), "this machine has no host name");
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(None);
    s.remove("gateway_id");
    s.set(
        "data_dir",
        &toml_str(&dir.path().join("data").display().to_string()),
    );
    let path = dir.path().join("c.toml");
    std::fs::write(&path, s.render()).unwrap();
    let (code, stdout, stderr) = check_config(&path);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains(&format!("gateway_id = {}\n", toml_str(host))),
        "gateway_id must default to {host:?}:\n{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "source = {}\n",
            toml_str(&format!("outbox-{host}"))
        )),
        "{stdout}"
    );
    // An explicit value wins.
    s.set("gateway_id", &toml_str("gw-7"));
    std::fs::write(&path, s.render()).unwrap();
    let (code, stdout, stderr) = check_config(&path);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("gateway_id = \"gw-7\"\n"), "{stdout}");
    assert!(stdout.contains("source = \"outbox-gw-7\"\n"), "{stdout}");
}
