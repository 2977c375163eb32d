//! Integration tests of the `flux-outbox` daemon: the real binary as a child process, on a
//! temporary directory, delivering to flux-sim running in the test.
//!
//! What is promised and checked here: every update the worker acknowledged reaches Flux, across
//! SIGTERM under load, SIGKILL and link outages, with no manual step after a restart; the
//! operator surfaces (`check-config`, `/healthz`, `/readyz`, `/metrics`) say what they should;
//! and the Flux token never leaks.

mod harness;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flux_outbox::sim::{Faults, SimConfig};
use harness::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_through_both_ingest_apis() {
    let sim = start_sim(SimConfig::default()).await;
    let mut w = Worker::new(Some(&sim.url()));
    w.start().await;

    // Native: one object.
    let (s, body) = w
        .post_json(
            "/v1/updates",
            &json!({"entity": "scada/n/one", "properties": {"temp": 61.5, "state": "OK"}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let ans: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ans["accepted"], 1, "{body}");
    assert!(ans["seq"].as_u64().unwrap() > 0, "{body}");

    // Native: an array, with an explicit RFC 3339 timestamp and a null value (stored as null).
    let (s, body) = w
        .post_json(
            "/v1/updates",
            &json!([
                {"entity": "scada/n/arr-1", "properties": {"v": 1}},
                {"entity": "scada/n/arr-2", "properties": {"v": 2, "gone": null}, "ts": "2026-01-01T00:00:00Z"},
            ]),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["accepted"], 2);

    // Native: NDJSON (a blank line is skipped).
    let ndjson = format!(
        "{}\n\n{}\n",
        json!({"entity": "scada/n/nd-1", "properties": {"v": "a"}}),
        json!({"entity": "scada/n/nd-2", "properties": {"v": [1, 2, {"deep": true}]}}),
    );
    let (s, body) = w.post("/v1/updates", "application/x-ndjson", ndjson).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["accepted"], 2);

    // Flux's single-event API answers in Flux's shape.
    let (s, body) = w
        .post_json(
            "/api/events",
            &flux_event("scada/f/single", json!({"kw": 12.5})),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let ans: Value = serde_json::from_str(&body).unwrap();
    assert!(
        ans["eventId"].as_str().is_some_and(|id| !id.is_empty()),
        "{body}"
    );
    assert_eq!(ans["stream"], "scada", "{body}");
    assert_eq!(
        ans.as_object().unwrap().len(),
        2,
        "Flux answers eventId and stream: {body}"
    );

    // Flux's batch API answers {successful, failed, results[{eventId, stream, error}]}.
    let batch = json!({"events": [
        flux_event("scada/f/b-1", json!({"kw": 1})),
        flux_event("scada/f/b-2", json!({"kw": 2, "mode": "auto"})),
        flux_event("scada/f/b-3", json!({"kw": 3})),
    ]});
    let (s, body) = w.post_json("/api/events/batch", &batch).await;
    assert_eq!(s, 200, "{body}");
    let ans: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ans["successful"], 3, "{body}");
    assert_eq!(ans["failed"], 0, "{body}");
    let results = ans["results"].as_array().unwrap();
    assert_eq!(results.len(), 3, "{body}");
    let mut ids = std::collections::BTreeSet::new();
    for r in results {
        assert!(r["eventId"].is_string(), "{body}");
        assert_eq!(r["stream"], "scada", "{body}");
        assert!(r["error"].is_null(), "{body}");
        ids.insert(r["eventId"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), 3, "eventIds must be distinct: {body}");

    // Everything reaches flux-sim.
    for (entity, prop, value) in [
        ("scada/n/one", "temp", json!(61.5)),
        ("scada/n/one", "state", json!("OK")),
        ("scada/n/arr-1", "v", json!(1)),
        ("scada/n/arr-2", "v", json!(2)),
        ("scada/n/arr-2", "gone", Value::Null),
        ("scada/n/nd-1", "v", json!("a")),
        ("scada/n/nd-2", "v", json!([1, 2, {"deep": true}])),
        ("scada/f/single", "kw", json!(12.5)),
        ("scada/f/b-1", "kw", json!(1)),
        ("scada/f/b-2", "kw", json!(2)),
        ("scada/f/b-2", "mode", json!("auto")),
        ("scada/f/b-3", "kw", json!(3)),
    ] {
        wait_value(&sim, entity, prop, &value).await;
    }

    // A newer value replaces the delivered one.
    let (s, body) = w
        .post_json(
            "/v1/updates",
            &json!({"entity": "scada/n/one", "properties": {"temp": 62.0}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    wait_value(&sim, "scada/n/one", "temp", &json!(62.0)).await;
    assert_eq!(sim.entity("scada/n/one").unwrap().properties["state"], "OK");

    // Entity deletes, both forms, reach flux-sim as the tombstone: the entity is gone.
    let (s, body) = w
        .post_json(
            "/v1/updates",
            &json!({"entity": "scada/n/one", "delete": true}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = w
        .post_json(
            "/api/events",
            &flux_event("scada/f/b-2", json!({"__deleted__": true})),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    wait_gone(&sim, "scada/n/one").await;
    wait_gone(&sim, "scada/f/b-2").await;
    let tombstones: Vec<_> = sim
        .applied_log()
        .into_iter()
        .filter(|e| e.properties == json!({"__deleted__": true}))
        .filter_map(|e| e.entity_id)
        .collect();
    assert!(
        tombstones.contains(&"scada/n/one".to_string()),
        "{tombstones:?}"
    );
    assert!(
        tombstones.contains(&"scada/f/b-2".to_string()),
        "{tombstones:?}"
    );
    // The others are untouched.
    assert!(sim.entity("scada/f/b-1").is_some());

    w.wait_drained().await;
    w.stop().await;
}

/// What the feeder knows of one key: the newest acknowledged value, and values sent later whose
/// answer did not come (the worker may or may not have stored them).
#[derive(Default, Clone, Debug)]
struct KeyTruth {
    acked: Option<Value>,
    unacked_after: Vec<Value>,
}

type Truth = Arc<Mutex<BTreeMap<(String, String), KeyTruth>>>;

#[derive(Debug)]
enum Outcome {
    Acked,
    Refused503,
    ConnError,
}

/// Posts batches of 8 updates over the keys of feeder `id` until `stop`, alternating the native
/// NDJSON and Flux batch APIs. Returns the sequence of outcomes; panics on any other answer.
async fn feeder(
    w: Arc<WorkerUrls>,
    id: usize,
    truth: Truth,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
) -> Vec<Outcome> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut outcomes = Vec::new();
    let mut n: u64 = 0;
    while !stop.load(Ordering::SeqCst) {
        let mut sent = Vec::new();
        let native = outcomes.len() % 2 == 0;
        let mut ndjson = String::new();
        let mut events = Vec::new();
        for _ in 0..8 {
            n += 1;
            let entity = format!("scada/load-{id}/e{}", n % 5);
            let prop = format!("p{}", (n / 5) % 3);
            let value = json!(n);
            if native {
                ndjson.push_str(&json!({"entity": entity, "properties": {&prop: n}}).to_string());
                ndjson.push('\n');
            } else {
                events.push(flux_event(&entity, json!({&prop: n})));
            }
            sent.push(((entity, prop), value));
        }
        let req = if native {
            http.post(format!("{}/v1/updates", w.ingest))
                .header("content-type", "application/x-ndjson")
                .body(ndjson)
        } else {
            http.post(format!("{}/api/events/batch", w.ingest))
                .header("content-type", "application/json")
                .body(json!({ "events": events }).to_string())
        };
        let outcome = match req.send().await {
            Ok(r) if r.status() == 200 => Outcome::Acked,
            Ok(r) if r.status() == 503 => Outcome::Refused503,
            Ok(r) => {
                let status = r.status();
                panic!(
                    "feeder {id}: unexpected answer {status}: {}",
                    r.text().await.unwrap_or_default()
                )
            }
            Err(_) => Outcome::ConnError,
        };
        {
            let mut t = truth.lock().unwrap();
            for (key, value) in sent {
                let k = t.entry(key).or_default();
                match outcome {
                    Outcome::Acked => {
                        k.acked = Some(value);
                        k.unacked_after.clear();
                    }
                    // A 503 is a promise that nothing was stored, but a connection error is not.
                    Outcome::Refused503 => {}
                    Outcome::ConnError => k.unacked_after.push(value),
                }
            }
        }
        let failed = !matches!(outcome, Outcome::Acked);
        if !failed {
            acked.fetch_add(1, Ordering::SeqCst);
        }
        outcomes.push(outcome);
        if failed {
            // The worker is going away; do not spin.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    outcomes
}

struct WorkerUrls {
    ingest: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_nothing() {
    let sim = start_sim(SimConfig::default()).await;
    let mut w = Worker::new(Some(&sim.url()));
    w.start().await;

    let urls = Arc::new(WorkerUrls {
        ingest: w.ingest.clone(),
    });
    let truth: Truth = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let feeders: Vec<_> = (0..3)
        .map(|id| {
            tokio::spawn(feeder(
                urls.clone(),
                id,
                truth.clone(),
                stop.clone(),
                acked.clone(),
            ))
        })
        .collect();

    // Let load build up (and some deliveries happen), then SIGTERM in the middle of it.
    poll(
        DEADLINE,
        "the feeders to get 60 requests acknowledged",
        || async { (acked.load(Ordering::SeqCst) >= 60).then_some(()) },
    )
    .await;
    w.sigterm();
    let status = w.wait_exit(DEADLINE).await;
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM must exit 0; log:\n{}",
        w.log()
    );
    // Keep feeding a moment against the dead worker: those must all fail.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    let mut all = Vec::new();
    for f in feeders {
        all.push(f.await.unwrap());
    }
    for (id, outcomes) in all.iter().enumerate() {
        let count = |f: fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
        eprintln!(
            "feeder {id}: {} acknowledged, {} refused with 503, {} connection errors",
            count(|o| matches!(o, Outcome::Acked)),
            count(|o| matches!(o, Outcome::Refused503)),
            count(|o| matches!(o, Outcome::ConnError)),
        );
        // Once a feeder saw shutdown (503 or connection error), nothing was acknowledged again.
        let first_fail = outcomes
            .iter()
            .position(|o| !matches!(o, Outcome::Acked))
            .unwrap_or_else(|| panic!("feeder {id} never saw the shutdown: {outcomes:?}"));
        assert!(
            outcomes[first_fail..]
                .iter()
                .all(|o| !matches!(o, Outcome::Acked)),
            "feeder {id}: acknowledged after shutdown began: {outcomes:?}"
        );
        assert!(
            matches!(outcomes.last(), Some(Outcome::ConnError)),
            "feeder {id}: requests after exit must fail to connect: {outcomes:?}"
        );
    }
    assert!(
        w.log().contains("shutting down"),
        "graceful path not taken; log:\n{}",
        w.log()
    );

    // Restart: everything acknowledged ends up in flux-sim, nothing stays pending.
    w.start().await;
    w.wait_drained().await;
    let truth = truth.lock().unwrap().clone();
    let mut checked = 0;
    poll(
        DEADLINE,
        "flux-sim to hold every acknowledged value",
        || async {
            let state = sim.entities();
            let wrong: Vec<String> = truth
                .iter()
                .filter_map(|((entity, prop), t)| {
                    let acked = t.acked.as_ref()?;
                    let have = state.get(entity).and_then(|p| p.get(prop));
                    let ok = have == Some(acked) || t.unacked_after.iter().any(|v| have == Some(v));
                    (!ok).then(|| {
                        format!("{entity} {prop}: flux-sim has {have:?}, acknowledged {acked}")
                    })
                })
                .collect();
            if wrong.is_empty() {
                Some(())
            } else {
                eprintln!("not yet: {} wrong, e.g. {}", wrong.len(), wrong[0]);
                None
            }
        },
    )
    .await;
    for t in truth.values() {
        if t.acked.is_some() {
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} keys were acknowledged");
    assert_eq!(w.backlog().await, (0, 0));
    w.stop().await;
}

/// Link down: ingest, stop the worker (`kill` decides how), restore the link, restart: flux-sim
/// gets everything without any manual step.
async fn restart_resumes_delivery(kill: bool) {
    let sim = start_sim(SimConfig::default()).await;
    sim.set_faults(link_down());
    let mut w = Worker::new(Some(&sim.url()));
    w.start().await;

    let tag = if kill { "kill" } else { "term" };
    let e1 = format!("scada/{tag}/native");
    let e2 = format!("scada/{tag}/flux");
    let e3 = format!("scada/{tag}/gone");
    let (s, body) = w
        .post_json(
            "/v1/updates",
            &json!([
                {"entity": e1, "properties": {"a": 1, "b": "x"}},
                {"entity": e3, "properties": {"a": 1}},
            ]),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = w
        .post_json(
            "/api/events/batch",
            &json!({"events": [flux_event(&e2, json!({"kw": 7}))]}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    // A newer value for a pending key, and a delete of a pending entity.
    let (s, body) = w
        .post(
            "/v1/updates",
            "application/x-ndjson",
            format!(
                "{}\n{}\n",
                json!({"entity": e1, "properties": {"a": 2}}),
                json!({"entity": e3, "delete": true}),
            ),
        )
        .await;
    assert_eq!(s, 200, "{body}");

    if kill {
        // Immediately after the acknowledgements: nothing may depend on compaction or shutdown.
        w.sigkill();
    } else {
        // Let the worker try (and fail) to deliver first, so the retry state is exercised.
        poll(DEADLINE, "the link to be seen down", || async {
            let (_, body) = w.admin_get("/readyz").await;
            body.contains("\"down\"").then_some(())
        })
        .await;
        w.stop().await;
    }
    assert!(
        sim.entities().is_empty(),
        "link was down: {:?}",
        sim.entities()
    );

    sim.set_faults(Faults::default());
    w.start().await;
    wait_value(&sim, &e1, "a", &json!(2)).await;
    wait_value(&sim, &e1, "b", &json!("x")).await;
    wait_value(&sim, &e2, "kw", &json!(7)).await;
    w.wait_drained().await;
    assert!(
        sim.entity(&e3).is_none(),
        "{e3} was deleted after its update"
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_sigterm_resumes_delivery() {
    restart_resumes_delivery(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_sigkill_resumes_delivery() {
    restart_resumes_delivery(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_loopback_listener_without_token_refuses_to_start() {
    let mut settings = Settings::new(None);
    let port = free_port();
    settings.set("ingest.listen", &toml_str(&format!("0.0.0.0:{port}")));
    settings.set(
        "admin.listen",
        &toml_str(&format!("127.0.0.1:{}", free_port())),
    );
    let mut w = Worker::with_settings(settings);
    w.spawn();
    let status = w.wait_exit(DEADLINE).await;
    assert!(!status.success(), "must refuse to start; log:\n{}", w.log());
    let log = w.log();
    assert!(
        log.contains("ingest.token") && log.contains("not a loopback address"),
        "the message must say why: {log}"
    );
    assert!(!log.contains("ready"), "{log}");

    // check-config agrees, and a token makes the same listener acceptable.
    let (code, _, stderr) = check_config(&w.config_path());
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("ingest.token"), "{stderr}");
    w.settings
        .set("ingest.token", &toml_str("a-long-ingest-token"));
    w.write_config();
    let (code, stdout, stderr) = check_config(&w.config_path());
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(&format!("0.0.0.0:{port}")), "{stdout}");

    // The admin listener has the same rule.
    w.settings.set(
        "admin.listen",
        &toml_str(&format!("0.0.0.0:{}", free_port())),
    );
    w.spawn();
    let status = w.wait_exit(DEADLINE).await;
    assert!(!status.success());
    assert!(w.log().contains("admin.token"), "{}", w.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_redacts_tokens_and_names_bad_keys() {
    let dir = tempfile::tempdir().unwrap();
    let flux_token = "sekrit-check-config-7f3a";
    let file_token = "sekrit-from-file-19bd";
    let token_file = dir.path().join("ingest.token");
    std::fs::write(&token_file, format!("{file_token}\n")).unwrap();
    let mut s = Settings::new(Some("http://127.0.0.1:9"));
    s.set(
        "data_dir",
        &toml_str(&dir.path().join("data").display().to_string()),
    );
    s.set("flux.auth_token", &toml_str(flux_token));
    s.set(
        "ingest.token_file",
        &toml_str(&token_file.display().to_string()),
    );
    s.set("admin.token", &toml_str("sekrit-admin-55"));
    let path = dir.path().join("ok.toml");
    std::fs::write(&path, s.render()).unwrap();
    let (code, stdout, stderr) = check_config(&path);
    assert_eq!(code, Some(0), "{stderr}");
    for secret in [flux_token, file_token, "sekrit-admin-55"] {
        assert!(!stdout.contains(secret), "{secret} leaked:\n{stdout}");
        assert!(!stderr.contains(secret), "{secret} leaked:\n{stderr}");
    }
    assert!(stdout.contains("[redacted]"), "{stdout}");
    // It is the effective configuration: file values and defaults.
    assert!(stdout.contains("interval = \"100ms\""), "{stdout}");
    assert!(stdout.contains("http://127.0.0.1:9"), "{stdout}");
    assert!(stdout.contains("source = \"outbox-itest\""), "{stdout}");
    assert!(stdout.contains("pending_keys_max = 2000000"), "{stdout}");

    // The token from the environment is redacted too.
    let mut cmd = std::process::Command::new(EXE);
    cmd.arg("check-config").arg("--config").arg(&path);
    clean_env(&mut cmd);
    cmd.env("FLUX_AUTH_TOKEN", "sekrit-from-env-c0de");
    let out = cmd.output().unwrap();
    assert!(out.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains("sekrit-from-env-c0de"), "{all}");

    // Bad configurations exit non-zero and name the key.
    for (text, key) in [
        ("[flush]\ninterval = \"soon\"\n", "flush.interval"),
        ("[flush]\nintervall = \"1s\"\n", "intervall"),
        (
            "[flush]\nbatch_bytes_max = \"4MiB\"\n",
            "flush.batch_bytes_max",
        ),
        ("[store]\npending_keys_max = 0\n", "store.pending_keys_max"),
        ("[flux]\nurl = \"ftp://x\"\n", "flux.url"),
        ("[ingest]\nlisten = \"nowhere\"\n", "ingest.listen"),
    ] {
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, text).unwrap();
        let (code, stdout, stderr) = check_config(&bad);
        assert_eq!(code, Some(2), "{text}: {stdout}{stderr}");
        assert!(
            stderr.contains(key),
            "{text}: the error must name {key}: {stderr}"
        );
    }

    // `run` refuses the same way, before doing anything.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[flush]\ninterval = \"soon\"\n").unwrap();
    let mut cmd = std::process::Command::new(EXE);
    cmd.arg("run").arg("--config").arg(&bad);
    clean_env(&mut cmd);
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("flush.interval"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let sim = start_sim(SimConfig::default()).await;
    let mut w = Worker::new(Some(&sim.url()));
    w.start().await;

    let (s, body) = w.admin_get("/healthz").await;
    assert_eq!((s, body.trim()), (200, "ok"));
    let (s, body) = w.admin_get("/readyz").await;
    assert_eq!(s, 200, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["ready"], true, "{body}");
    assert!(ready["link"].is_string(), "{body}");

    // A delivery brings the link up.
    let (s, _) = w
        .post_json(
            "/v1/updates",
            &json!({"entity": "scada/m/a", "properties": {"v": 1}}),
        )
        .await;
    assert_eq!(s, 200);
    wait_value(&sim, "scada/m/a", "v", &json!(1)).await;
    poll(DEADLINE, "readyz to report the link up", || async {
        let (_, body) = w.admin_get("/readyz").await;
        (serde_json::from_str::<Value>(&body).ok()?["link"] == "up").then_some(())
    })
    .await;
    let m = w.metrics().await;
    assert_eq!(metric(&m, "flux_outbox_link_up"), 1.0, "{m}");
    assert_eq!(
        metric(&m, "flux_outbox_link_state{state=\"up\"}"),
        1.0,
        "{m}"
    );
    assert!(m.contains("# TYPE flux_outbox_pending_keys gauge"), "{m}");
    assert!(
        m.contains("# TYPE flux_outbox_ingest_rejected_total counter"),
        "{m}"
    );
    assert_eq!(metric(&m, "flux_outbox_ingest_accepted_total"), 1.0, "{m}");

    // Rejections are counted by reason.
    let (s, _) = w
        .post_json(
            "/v1/updates",
            &json!({"entity": "scada/m/a", "properties": {"command": "trip"}}),
        )
        .await;
    assert_eq!(s, 400);
    let (s, _) = w.post("/v1/updates", "application/json", "{nope").await;
    assert_eq!(s, 400);
    let (s, _) = w.post("/v1/updates", "application/json", "{nope").await;
    assert_eq!(s, 400);
    let m = w.metrics().await;
    assert_eq!(rejected(&m, "protected_property"), 1.0, "{m}");
    assert_eq!(rejected(&m, "invalid_json"), 2.0, "{m}");

    // Link down: pending keys show up and the link state follows.
    sim.set_faults(link_down());
    let (s, _) = w
        .post_json(
            "/v1/updates",
            &json!({"entity": "scada/m/b", "properties": {"v": 2, "w": 3}}),
        )
        .await;
    assert_eq!(s, 200);
    poll(DEADLINE, "metrics to show the link down", || async {
        let m = w.metrics().await;
        (metric(&m, "flux_outbox_link_up") == 0.0
            && metric(&m, "flux_outbox_link_state{state=\"down\"}") == 1.0
            && metric(&m, "flux_outbox_pending_keys") == 2.0)
            .then_some(())
    })
    .await;
    let (s, body) = w.admin_get("/readyz").await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["link"],
        "down"
    );

    sim.set_faults(Faults::default());
    wait_value(&sim, "scada/m/b", "w", &json!(3)).await;
    w.wait_drained().await;
    // The flusher marks the link up after it has settled the batch: poll, do not race it.
    poll(DEADLINE, "metrics to show the link up again", || async {
        let m = w.metrics().await;
        (metric(&m, "flux_outbox_link_up") == 1.0
            && metric(&m, "flux_outbox_link_state{state=\"up\"}") == 1.0)
            .then_some(())
    })
    .await;
    assert_eq!(metric(&w.metrics().await, "flux_outbox_pending_keys"), 0.0);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flux_token_never_leaks() {
    let token = format!("sekrit-{:016x}", rand_u64());
    let sim = start_sim(SimConfig::default()).await;
    let mut w = Worker::new(Some(&sim.url()));
    w.settings.set("flux.auth_token", &toml_str(&token));
    w.env = vec![("RUST_LOG".into(), "debug".into())];
    w.start().await;

    let mut seen = String::new();
    // Deliveries, then failures of every kind the flusher logs about.
    let (s, _) = w
        .post_json(
            "/v1/updates",
            &json!({"entity": "scada/t/a", "properties": {"v": 1}}),
        )
        .await;
    assert_eq!(s, 200);
    wait_value(&sim, "scada/t/a", "v", &json!(1)).await;
    type Counter = fn(&flux_outbox::sim::SimStats) -> u64;
    let phases: [(Faults, Counter, u64); 3] = [
        (link_down(), |s| s.fault_link_down, 2),
        (
            Faults {
                error_500_rate: 1.0,
                ..Faults::default()
            },
            |s| s.fault_500,
            2,
        ),
        (
            Faults {
                validation_fail_rate: 1.0,
                ..Faults::default()
            },
            |s| s.events_validation_failed,
            1,
        ),
    ];
    for (faults, counter, times) in phases {
        sim.set_faults(faults);
        let before = counter(&sim.stats());
        let (s, _) = w
            .post_json(
                "/v1/updates",
                &json!({"entity": "scada/t/b", "properties": {"v": rand_u64()}}),
            )
            .await;
        assert_eq!(s, 200);
        // The worker met the fault (and retried where it retries), so its error paths logged.
        poll(
            DEADLINE,
            &format!("the worker to hit {faults:?}"),
            || async { (counter(&sim.stats()) >= before + times).then_some(()) },
        )
        .await;
    }
    sim.set_faults(Faults::default());

    // Error answers, including one that presents the Flux token as the ingest credential.
    let (_, body) = w.post("/v1/updates", "application/json", "{bad").await;
    seen.push_str(&body);
    let (_, body) = w
        .post_json(
            "/api/events",
            &flux_event("scada/t/c", json!({"cmd_id": 1})),
        )
        .await;
    seen.push_str(&body);
    for path in [
        "/metrics",
        "/readyz",
        "/v1/outbox/summary",
        "/v1/outbox/pending",
        "/v1/outbox/quarantine",
        "/v1/outbox/log",
        "/v1/outbox/export?quarantine=true",
    ] {
        let (_, body) = w.admin_get(path).await;
        seen.push_str(&body);
    }
    w.stop().await;

    let log = w.log();
    assert!(
        log.contains("DEBUG"),
        "RUST_LOG=debug not in effect:\n{log}"
    );
    assert!(
        !log.contains(&token),
        "the Flux token leaked into the log:\n{log}"
    );
    assert!(
        !seen.contains(&token),
        "the Flux token leaked into an answer:\n{seen}"
    );
    let (code, stdout, stderr) = check_config(&w.config_path());
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stdout.contains(&token) && !stderr.contains(&token));

    // With an ingest token configured, presenting the Flux token is just a wrong token.
    w.settings.set("ingest.token", &toml_str("ingest-tok-abc"));
    w.start().await;
    let (s, body) = w
        .try_post(
            "/v1/updates",
            "application/json",
            json!({"entity": "scada/t/d", "properties": {"v": 1}}).to_string(),
            Some(&token),
        )
        .await
        .unwrap();
    assert_eq!(s, 401, "{body}");
    assert!(!body.contains(&token), "{body}");
    w.stop().await;
    assert!(
        !w.log().contains(&token),
        "the Flux token leaked into the log"
    );
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

/// A worker delivering to a flux-sim that never answers writes (requests time out after 30 s).
async fn worker_against_hanging_flux(final_flush: &str) -> (flux_outbox::sim::SimHandle, Worker) {
    let sim = start_sim(SimConfig::default()).await;
    sim.set_faults(Faults {
        hang_rate: 1.0,
        ..Faults::default()
    });
    let mut w = Worker::new(Some(&sim.url()));
    w.settings.set("flux.request_timeout", "\"30s\"");
    w.settings.set("flux.read_timeout", "\"30s\"");
    w.settings
        .set("flush.final_flush_timeout", &toml_str(final_flush));
    w.start().await;
    let (s, body) = w
        .post_json(
            "/v1/updates",
            &json!({"entity": "scada/hang/a", "properties": {"v": 1}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    poll(DEADLINE, "a write to hang in flux-sim", || async {
        (sim.stats().fault_hang >= 1).then_some(())
    })
    .await;
    (sim, w)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_flux_hanging_stops_within_the_final_flush_bound() {
    let (sim, mut w) = worker_against_hanging_flux("1s").await;
    let t0 = Instant::now();
    w.sigterm();
    // Bound: about twice final_flush_timeout (the batch in flight, then the final flush); far
    // below the 30 s request timeout the hanging batch would otherwise wait for.
    let status = w.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", w.log());
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    sim.set_faults(Faults::default());
    w.start().await;
    wait_value(&sim, "scada/hang/a", "v", &json!(1)).await;
    w.wait_drained().await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_exits_at_once_and_loses_nothing() {
    let (sim, mut w) = worker_against_hanging_flux("60s").await;
    w.sigterm();
    poll(DEADLINE, "the worker to start shutting down", || async {
        w.log().contains("shutting down").then_some(())
    })
    .await;
    assert!(
        w.try_wait().is_none(),
        "the first signal waits for the delivery in flight"
    );
    w.sigterm();
    let status = w.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(130), "log:\n{}", w.log());
    sim.set_faults(Faults::default());
    w.start().await;
    wait_value(&sim, "scada/hang/a", "v", &json!(1)).await;
    w.wait_drained().await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_listener_and_admin_token() {
    let sim = start_sim(SimConfig::default()).await;
    let mut w = Worker::new(Some(&sim.url()));
    w.single_listener();
    w.settings.set("admin.token", &toml_str("admin-tok-9"));
    w.admin_token = Some("admin-tok-9".into());
    w.start().await;
    assert_eq!(w.ingest, w.admin);

    // Ingest and admin routes on the same port; the admin token guards all but /healthz.
    let (s, body) = w
        .post_json(
            "/v1/updates",
            &json!({"entity": "scada/one/a", "properties": {"v": 1}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    wait_value(&sim, "scada/one/a", "v", &json!(1)).await;
    let http = reqwest::Client::new();
    for path in ["/readyz", "/metrics", "/v1/outbox/summary"] {
        let r = http.get(format!("{}{path}", w.admin)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} without the admin token");
        let r = http
            .get(format!("{}{path}", w.admin))
            .bearer_auth("admin-tok-9x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path} with a wrong admin token");
        let (s, body) = w.admin_get(path).await;
        assert_eq!(s, 200, "{path}: {body}");
    }
    let r = http
        .get(format!("{}/healthz", w.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The ingest routes do not need the admin token (no ingest token configured).
    let (s, body) = w
        .post(
            "/v1/updates",
            "Application/X-NDJSON; charset=utf-8",
            format!(
                "{}\n{}\n",
                json!({"entity": "scada/one/b", "properties": {"v": 2}}),
                json!({"entity": "scada/one/c", "properties": {"v": 3}})
            ),
        )
        .await;
    assert_eq!(s, 200, "media types are case-insensitive: {body}");
    wait_value(&sim, "scada/one/c", "v", &json!(3)).await;
    w.wait_drained().await;
    w.stop().await;
}
