//! The flush worker's rules, one test each, against a tiny controllable fake Flux or flux-sim.

mod fake_flux;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_flux::*;
use flux_outbox::flusher::{backoff_delay, FlushOptions, LinkVerdict, MergeMode};
use flux_outbox::flux_client::{Backoff, Jitter};
use flux_outbox::merge::ConflictPolicy;
use flux_outbox::metrics::LinkState;
use flux_outbox::sim::{Faults, SimConfig};
use serde_json::{json, Value};

const TS: u64 = 1_700_000_000_000;

fn props_of(ev: &Value) -> &serde_json::Map<String, Value> {
    ev["payload"]["properties"].as_object().expect("properties")
}

/// [`fast_opts`] in blind mode (no reads before writes).
fn blind_opts() -> FlushOptions {
    FlushOptions {
        merge: MergeMode::Blind,
        ..fast_opts()
    }
}

/// The entities of the quarantined keys (at most 10), sorted.
fn quarantined_entities(rig: &Rig) -> Vec<String> {
    let mut q: Vec<String> = rig
        .store
        .quarantine_rows(None, 10)
        .expect("q")
        .into_iter()
        .map(|r| r.entity)
        .collect();
    q.sort();
    q
}

/// One attempt refused for the token: the verdict is `Auth`, the link reads auth-failed, and
/// nothing is quarantined: all `pending_keys` keys stay pending.
async fn drain_refused_for_auth(rig: &Rig, pending_keys: u64) {
    assert_eq!(rig.flusher.drain_once().await, LinkVerdict::Auth);
    assert_eq!(rig.store.stats().quarantine_keys, 0);
    assert_eq!(rig.store.stats().pending_keys, pending_keys);
    assert_eq!(rig.metrics.link(), LinkState::AuthFailed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_batch_400_splits_and_quarantines_only_the_bad_event() {
    let respond: Responder = Arc::new(|events: &[Value]| {
        if events.iter().any(|e| props_of(e).contains_key("bad")) {
            (
                400,
                "application/json",
                json!({"error": "invalid type: map, expected i64"}).to_string(),
            )
        } else {
            (200, "application/json", all_ok(events))
        }
    });
    let fake = fake_flux(respond, Duration::ZERO).await;
    let rig = Rig::new(
        client(&fake.url, None, Duration::from_secs(5)),
        blind_opts(),
    );
    let mut ups: Vec<_> = (0..9)
        .map(|i| set(&format!("e{i}"), TS, &[("v", json!(i))]))
        .collect();
    ups.push(set("poison", TS, &[("bad", json!(1))]));
    rig.ingest(ups).await;
    assert_eq!(rig.flusher.drain_once().await, LinkVerdict::Ok);
    let q = rig.store.quarantine_rows(None, 100).expect("q");
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(
        (q[0].entity.as_str(), q[0].property.as_str()),
        ("poison", "bad")
    );
    assert_eq!(q[0].http_status, Some(400));
    assert!(q[0]
        .reason
        .as_deref()
        .unwrap_or("")
        .contains("invalid type"));
    assert_eq!(rig.store.stats().pending_keys, 0);
    let delivered: usize = fake
        .batches
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, b)| !b.iter().any(|e| props_of(e).contains_key("bad")))
        .map(|(_, b)| b.len())
        .sum();
    assert_eq!(delivered, 9, "every good event delivered exactly once");
    assert!(
        fake.batches.lock().unwrap().len() <= 1 + 2 * 4,
        "split is logarithmic"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_413_splits_and_quarantines_the_single_too_large_event() {
    let respond: Responder = Arc::new(|events: &[Value]| {
        if events.iter().any(|e| props_of(e).contains_key("huge")) {
            (
                413,
                "text/plain; charset=utf-8",
                "Failed to buffer the request body: length limit exceeded".into(),
            )
        } else {
            (200, "application/json", all_ok(events))
        }
    });
    let fake = fake_flux(respond, Duration::ZERO).await;
    let rig = Rig::new(
        client(&fake.url, None, Duration::from_secs(5)),
        blind_opts(),
    );
    let mut ups: Vec<_> = (0..5)
        .map(|i| set(&format!("e{i}"), TS, &[("v", json!(i))]))
        .collect();
    ups.push(set("big", TS, &[("huge", json!("x"))]));
    rig.ingest(ups).await;
    assert_eq!(rig.flusher.drain_once().await, LinkVerdict::Ok);
    let q = rig.store.quarantine_rows(None, 100).expect("q");
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0].entity, "big");
    assert_eq!(q[0].http_status, Some(413));
    assert_eq!(rig.store.stats().pending_keys, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_over_flux_size_limit_is_split_by_property_or_quarantined_without_sending() {
    let sim = start_sim(SimConfig::default()).await;
    let rig = Rig::on_sim(&sim, None, fast_opts());
    let half = "a".repeat(600_000);
    // Two properties of 600 kB each: one event would be over Flux's 1 MiB (answered `publish
    // failed`, an unknown outcome, forever); split in two events they both fit.
    rig.ingest(vec![set(
        "fat",
        TS,
        &[("a", json!(half)), ("b", json!(half))],
    )])
    .await;
    // One property over the limit on its own: quarantined locally with 413.
    rig.ingest(vec![set(
        "fatter",
        TS,
        &[("c", json!("b".repeat(1_100_000)))],
    )])
    .await;
    assert_eq!(rig.flusher.drain_once().await, LinkVerdict::Ok);
    let fat = sim.entity("fat").expect("fat delivered");
    assert_eq!(fat.properties.len(), 2);
    assert!(sim.entity("fatter").is_none());
    let q = rig.store.quarantine_rows(None, 10).expect("q");
    assert_eq!(q.len(), 1);
    assert_eq!(
        (q[0].entity.as_str(), q[0].http_status),
        ("fatter", Some(413))
    );
    assert_eq!(rig.store.stats().pending_keys, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_request_401_and_403_quarantine_nothing_and_report_auth_failed() {
    for status in [401u16, 403] {
        let respond: Responder = Arc::new(move |_e: &[Value]| {
            (
                status,
                "application/json",
                json!({"error": "Invalid token"}).to_string(),
            )
        });
        let fake = fake_flux(respond, Duration::ZERO).await;
        let rig = Rig::new(
            client(&fake.url, Some("t"), Duration::from_secs(5)),
            blind_opts(),
        );
        rig.ingest(vec![
            set("acme/a", TS, &[("v", json!(1))]),
            set("acme/b", TS, &[("v", json!(2))]),
        ])
        .await;
        drain_refused_for_auth(&rig, 2).await;
        assert_eq!(rig.store.stats().in_flight_entities, 0);
        let mut b = Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(200),
            2.0,
            Jitter::Full,
        );
        assert_eq!(
            backoff_delay(LinkVerdict::Auth, &mut b, &fast_opts()),
            Duration::from_millis(200)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_event_auth_failure_without_success_keeps_keys_with_success_quarantines_only_them() {
    let sim = start_sim(SimConfig {
        public: true,
        ..SimConfig::default()
    })
    .await;
    let acme = sim.register_namespace("acme");
    sim.register_namespace("other");
    // Wrong token for every event (a token of another namespace): nothing succeeds.
    let rig = Rig::on_sim(&sim, Some(&acme), fast_opts());
    rig.ingest(vec![set("other/x", TS, &[("v", json!(1))])])
        .await;
    drain_refused_for_auth(&rig, 1).await;

    // Same token, mixed batch: good ids succeed, an id outside the namespace and one with two
    // slashes are refused per entity and quarantined.
    let rig = Rig::on_sim(&sim, Some(&acme), fast_opts());
    rig.ingest(vec![
        set("acme/ok-1", TS, &[("v", json!(1))]),
        set("acme/ok-2", TS, &[("v", json!(2))]),
        set("other/y", TS, &[("v", json!(3))]),
        set("acme/a/b", TS, &[("v", json!(4))]),
    ])
    .await;
    rig.flusher.drain_once().await;
    assert_eq!(
        quarantined_entities(&rig),
        vec!["acme/a/b".to_string(), "other/y".to_string()]
    );
    assert_eq!(rig.store.stats().pending_keys, 0);
    assert!(sim.entity("acme/ok-1").is_some() && sim.entity("acme/ok-2").is_some());
}

/// A batch holding ONLY ids Flux refuses as ids (`authorization failed: Invalid entity ID`) has
/// no success to prove the token works; those ids can never pass with any token, so they are
/// quarantined anyway and the good entities claimed after them are delivered. A genuine token
/// problem (well-formed ids, every event refused) still quarantines nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_of_only_bad_entity_ids_is_quarantined_and_does_not_block_good_entities() {
    let sim = start_sim(SimConfig {
        public: true,
        ..SimConfig::default()
    })
    .await;
    let acme = sim.register_namespace("acme");
    let opts = FlushOptions {
        batch_events_max: 2,
        in_flight_max: 1,
        ..fast_opts()
    };
    let rig = Rig::on_sim(&sim, Some(&acme), opts.clone());
    // Ingested first, so claimed first, and alone in their batch of two.
    rig.ingest(vec![
        set("acme/a/b", TS, &[("v", json!(1))]),
        set("no-namespace", TS, &[("v", json!(2))]),
    ])
    .await;
    rig.ingest(vec![
        set("acme/ok-1", TS, &[("v", json!(3))]),
        set("acme/ok-2", TS, &[("v", json!(4))]),
    ])
    .await;
    for _ in 0..4 {
        if rig.store.stats().pending_keys == 0 {
            break;
        }
        rig.flusher.drain_once().await;
    }
    assert_eq!(
        quarantined_entities(&rig),
        vec!["acme/a/b".to_string(), "no-namespace".to_string()]
    );
    assert_eq!(rig.store.stats().pending_keys, 0);
    assert_eq!(
        sim.entity("acme/ok-1").expect("ok-1").properties["v"],
        json!(3)
    );
    assert_eq!(
        sim.entity("acme/ok-2").expect("ok-2").properties["v"],
        json!(4)
    );
    assert_ne!(rig.metrics.link(), LinkState::AuthFailed);

    // A wrong token with well-formed ids: every event refused, nothing quarantined.
    let rig = Rig::on_sim(&sim, Some("not-a-token"), opts);
    rig.ingest(vec![
        set("acme/x", TS, &[("v", json!(1))]),
        set("acme/y", TS, &[("v", json!(2))]),
    ])
    .await;
    drain_refused_for_auth(&rig, 2).await;
}

#[test]
fn retry_after_is_honoured_and_bounded() {
    let opts = fast_opts();
    let mut b = Backoff::new(opts.backoff_initial, opts.backoff_max, 2.0, Jitter::Full);
    assert_eq!(
        backoff_delay(
            LinkVerdict::RateLimited(Some(Duration::from_secs(7))),
            &mut b,
            &opts
        ),
        Duration::from_secs(7)
    );
    // Never longer than the larger of the cap and Flux's fixed 60 s.
    assert_eq!(
        backoff_delay(
            LinkVerdict::RateLimited(Some(Duration::from_secs(3600))),
            &mut b,
            &opts
        ),
        Duration::from_secs(60)
    );
    // Without Retry-After (per-event rate limit): the exponential back-off.
    let d = backoff_delay(LinkVerdict::RateLimited(None), &mut b, &opts);
    assert!(d <= opts.backoff_initial);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_429_retry_after_is_waited_before_resending() {
    let sim = start_sim(SimConfig::default()).await;
    sim.set_faults(Faults {
        rate_429_rate: 1.0,
        rate_429_retry_after_s: 1,
        ..Faults::default()
    });
    let mut rig = Rig::on_sim(&sim, None, fast_opts());
    rig.ingest(vec![set("e", TS, &[("v", json!(1))])]).await;
    rig.run();
    rig.wait(Duration::from_secs(5), "first 429", |_| {
        sim.stats().fault_429 >= 1
    })
    .await;
    let t0 = Instant::now();
    sim.set_faults(Faults::default());
    rig.wait_drained(Duration::from_secs(5)).await;
    let waited = t0.elapsed();
    rig.stop().await;
    assert_eq!(sim.stats().fault_429, 1, "nothing sent during Retry-After");
    assert!(
        waited >= Duration::from_millis(800),
        "resent after {waited:?}, before Retry-After"
    );
    assert_eq!(sim.entity("e").expect("e").properties["v"], json!(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_event_rate_limit_keeps_keys_and_retries() {
    let sim = start_sim(SimConfig {
        public: true,
        rate_limit_bucket: 3,
        rate_limit_refill_per_min: 600,
        ..SimConfig::default()
    })
    .await;
    let token = sim.register_namespace("acme");
    let mut rig = Rig::on_sim(&sim, Some(&token), blind_opts());
    let ups: Vec<_> = (0..8)
        .map(|i| set(&format!("acme/e{i}"), TS, &[("v", json!(i))]))
        .collect();
    rig.ingest(ups).await;
    let v = rig.flusher.drain_once().await;
    assert_eq!(v, LinkVerdict::RateLimited(None));
    assert_eq!(rig.store.stats().pending_keys, 5);
    assert_eq!(rig.store.stats().quarantine_keys, 0);
    rig.run();
    rig.wait_drained(Duration::from_secs(10)).await;
    rig.stop().await;
    assert_eq!(sim.entities().len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_outcomes_back_off_exponentially_then_resend_the_newest_after_rereading() {
    // Every batch answers 500 until told otherwise; gaps between attempts follow the seeded
    // back-off sequence exactly (plus request time).
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f2 = fail.clone();
    let respond: Responder = Arc::new(move |events: &[Value]| {
        if f2.load(Ordering::SeqCst) {
            (
                500,
                "application/json",
                json!({"error": "Failed to await publish ack"}).to_string(),
            )
        } else {
            (200, "application/json", all_ok(events))
        }
    });
    let fake = fake_flux(respond, Duration::ZERO).await;
    let opts = FlushOptions {
        backoff_initial: Duration::from_millis(40),
        backoff_max: Duration::from_millis(320),
        backoff_seed: Some(9),
        interval: Duration::from_secs(3600),
        ..fast_opts()
    };
    // A full batch is due at once even with a long interval: batch_events_max = 1.
    let mut rig = Rig::new(
        client(&fake.url, None, Duration::from_secs(5)),
        FlushOptions {
            batch_events_max: 1,
            ..opts.clone()
        },
    );
    rig.ingest(vec![set("e", TS, &[("v", json!(1))])]).await;
    rig.run();
    rig.wait(Duration::from_secs(10), "7 attempts", |_| {
        fake.batches.lock().unwrap().len() >= 7
    })
    .await;
    // A newer value arrives during the outage; the next successful attempt must carry it.
    rig.ingest(vec![set("e", TS + 1, &[("v", json!(2))])]).await;
    fail.store(false, Ordering::SeqCst);
    rig.wait_drained(Duration::from_secs(5)).await;
    rig.stop().await;
    let batches = fake.batches.lock().unwrap().clone();
    let mut expected =
        Backoff::new(opts.backoff_initial, opts.backoff_max, 2.0, Jitter::Full).with_seed(9);
    for w in batches.windows(2).take(6) {
        let gap = w[1].0 - w[0].0;
        let want = expected.next_delay();
        assert!(gap >= want, "gap {gap:?} shorter than back-off {want:?}");
        assert!(
            gap <= want + Duration::from_millis(150),
            "gap {gap:?} much longer than back-off {want:?}"
        );
    }
    let mut base = Backoff::new(opts.backoff_initial, opts.backoff_max, 2.0, Jitter::None);
    let bases: Vec<_> = (0..6).map(|_| base.next_delay().as_millis()).collect();
    assert_eq!(
        bases,
        vec![40, 80, 160, 320, 320, 320],
        "exponential up to the cap"
    );
    let last = &batches.last().expect("batches").1;
    assert_eq!(
        props_of(&last[0])["v"],
        json!(2),
        "the newest value is resent"
    );
    // Re-read before resending: every attempt was preceded by a read (404 here).
    assert!(rig.metrics.reads.load(Ordering::Relaxed) >= batches.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_per_minute_cap_paces_sending() {
    let respond: Responder = Arc::new(|events: &[Value]| (200, "application/json", all_ok(events)));
    let fake = fake_flux(respond, Duration::ZERO).await;
    // 600/min = 10/s, batches of 5: bucket holds one batch, so 30 events take about 2.5 s.
    let opts = FlushOptions {
        events_per_minute_max: 600,
        batch_events_max: 5,
        merge: MergeMode::Blind,
        ..fast_opts()
    };
    let rig = Rig::new(client(&fake.url, None, Duration::from_secs(5)), opts);
    rig.ingest(
        (0..30)
            .map(|i| set(&format!("e{i}"), TS, &[("v", json!(i))]))
            .collect(),
    )
    .await;
    let t0 = Instant::now();
    rig.flusher.drain_once().await;
    let took = t0.elapsed();
    assert_eq!(rig.store.stats().pending_keys, 0);
    assert!(
        took >= Duration::from_millis(2300),
        "30 events at 10/s took only {took:?}"
    );
    let batches = fake.batches.lock().unwrap().clone();
    let first = batches.first().expect("b").0;
    for (t, b) in &batches {
        let sent_by_then: usize = batches
            .iter()
            .filter(|(u, _)| u <= t)
            .map(|(_, b)| b.len())
            .sum();
        let allowed = 5.0 + (*t - first).as_secs_f64() * 10.0 + 1.0;
        assert!(
            (sent_by_then as f64) <= allowed,
            "{sent_by_then} events by {:?}",
            *t - first
        );
        let _ = b;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_two_writes_of_one_entity_in_flight() {
    let respond: Responder = Arc::new(|events: &[Value]| (200, "application/json", all_ok(events)));
    let fake = fake_flux(respond, Duration::from_millis(30)).await;
    let opts = FlushOptions {
        in_flight_max: 4,
        batch_events_max: 3,
        merge: MergeMode::Blind,
        interval: Duration::from_millis(1),
        ..fast_opts()
    };
    let mut rig = Rig::new(client(&fake.url, None, Duration::from_secs(5)), opts);
    rig.run();
    for round in 0..20u64 {
        let ups = (0..12)
            .map(|i| {
                set(
                    &format!("e{}", i % 6),
                    TS + round,
                    &[("v", json!(round * 100 + i))],
                )
            })
            .collect();
        rig.store.ingest(ups).await.expect("ingest");
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    rig.wait_drained(Duration::from_secs(10)).await;
    rig.stop().await;
    assert!(fake.batches.lock().unwrap().len() > 10);
    assert!(
        fake.overlaps.lock().unwrap().is_empty(),
        "overlapping writes: {:?}",
        fake.overlaps.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_drain_releases_its_claims() {
    let respond: Responder = Arc::new(|events: &[Value]| (200, "application/json", all_ok(events)));
    let fake = fake_flux(respond, Duration::from_secs(3)).await;
    let rig = Rig::new(
        client(&fake.url, None, Duration::from_secs(10)),
        blind_opts(),
    );
    rig.ingest(vec![set("e", TS, &[("v", json!(1))])]).await;
    let r = tokio::time::timeout(Duration::from_millis(200), rig.flusher.drain_once()).await;
    assert!(r.is_err(), "drain should still be waiting");
    // The aborted task drops its guard a moment later.
    rig.wait(Duration::from_secs(2), "claim release", |r| {
        r.store.stats().in_flight_entities == 0
    })
    .await;
    assert_eq!(rig.store.stats().pending_keys, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_merge_write_keeps_other_writers_properties_and_merges_objects() {
    let sim = start_sim(SimConfig::default()).await;
    let rig = Rig::on_sim(&sim, None, fast_opts());
    // Another agent's command on the control entity, and a config object with a field of theirs.
    let other = client(&sim.url(), None, Duration::from_secs(5));
    let ev = |props: Value| flux_outbox::flux_client::FluxEvent {
        stream: "ops".into(),
        source: "operator".into(),
        timestamp_ms: 1,
        entity_id: "site/tr-1/control".into(),
        properties: props.as_object().cloned().expect("obj"),
        event_id: None,
    };
    other
        .post_batch(&[ev(
            json!({"command": "open", "cmd_id": "c-7", "cfg": {"theirs": 1, "mode": "a"}}),
        )])
        .await;
    for i in 0..3 {
        rig.ingest(vec![set(
            "site/tr-1/control",
            TS + i,
            &[
                ("state", json!(i)),
                ("cfg", json!({"mode": format!("m{i}"), "gone": null})),
            ],
        )])
        .await;
        assert_eq!(rig.flusher.drain_once().await, LinkVerdict::Ok);
        let e = sim.entity("site/tr-1/control").expect("entity");
        assert_eq!(e.properties["command"], json!("open"));
        assert_eq!(e.properties["cmd_id"], json!("c-7"));
        assert_eq!(e.properties["state"], json!(i));
        assert_eq!(
            e.properties["cfg"],
            json!({"theirs": 1, "mode": format!("m{i}")}),
            "RFC 7386 merge onto Flux's object"
        );
    }
    // A value Flux already holds: nothing sent, settled, counted as a no-op.
    let applied = sim.applied_count();
    rig.ingest(vec![set(
        "site/tr-1/control",
        TS + 10,
        &[("state", json!(2)), ("cfg", json!({"mode": "m2"}))],
    )])
    .await;
    assert_eq!(rig.flusher.drain_once().await, LinkVerdict::Ok);
    assert_eq!(sim.applied_count(), applied, "a no-op must not be sent");
    assert_eq!(rig.store.stats().pending_keys, 0);
    assert_eq!(rig.metrics.noops.load(Ordering::Relaxed), 2);
    // The no-op recorded Flux's (merged) value: another writer touching a different property
    // later must not make our next write of `cfg` look like a conflict.
    other.post_batch(&[ev(json!({"command": "close"}))]).await;
    rig.ingest(vec![set(
        "site/tr-1/control",
        TS + 11,
        &[("cfg", json!({"mode": "m3"}))],
    )])
    .await;
    assert_eq!(rig.flusher.drain_once().await, LinkVerdict::Ok);
    assert_eq!(rig.metrics.conflicts.load(Ordering::Relaxed), 0);
}

async fn conflict_case(policy: ConflictPolicy) -> Value {
    let sim = start_sim(SimConfig::default()).await;
    let rig = Rig::on_sim(
        &sim,
        None,
        FlushOptions {
            conflict_policy: policy,
            ..fast_opts()
        },
    );
    rig.ingest(vec![set("e", TS, &[("sp", json!(10))])]).await;
    rig.flusher.drain_once().await;
    // Flux's lastUpdated has millisecond-or-better resolution; make sure the other write is later.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let other = client(&sim.url(), None, Duration::from_secs(5));
    other
        .post_batch(&[flux_outbox::flux_client::FluxEvent {
            stream: "ops".into(),
            source: "operator".into(),
            timestamp_ms: 1,
            entity_id: "e".into(),
            properties: json!({"sp": 99}).as_object().cloned().expect("obj"),
            event_id: None,
        }])
        .await;
    rig.ingest(vec![set("e", TS + 1, &[("sp", json!(11))])])
        .await;
    assert_eq!(rig.flusher.drain_once().await, LinkVerdict::Ok);
    assert_eq!(rig.store.stats().pending_keys, 0);
    assert_eq!(rig.metrics.conflicts.load(Ordering::Relaxed), 1);
    sim.entity("e").expect("e").properties["sp"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflict_policy_overwrite_sends_ours_keep_remote_keeps_theirs() {
    assert_eq!(conflict_case(ConflictPolicy::Overwrite).await, json!(11));
    assert_eq!(conflict_case(ConflictPolicy::KeepRemote).await, json!(99));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blind_mode_sends_without_reading() {
    let sim = start_sim(SimConfig::default()).await;
    let rig = Rig::on_sim(&sim, None, blind_opts());
    rig.ingest(vec![set("e", TS, &[("v", json!(1))])]).await;
    rig.flusher.drain_once().await;
    rig.ingest(vec![set("e", TS + 1, &[("v", json!(1))])]).await;
    rig.flusher.drain_once().await;
    assert_eq!(sim.stats().requests_read, 0);
    assert_eq!(rig.metrics.reads.load(Ordering::Relaxed), 0);
    assert_eq!(sim.applied_count(), 2, "blind mode cannot skip a no-op");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_shape_one_entity_only_written_properties_newest_timestamp_and_ids() {
    let sim = start_sim(SimConfig::default()).await;
    let rig = Rig::on_sim(
        &sim,
        None,
        FlushOptions {
            stream: "scada.tags".into(),
            source: "outbox-gw17".into(),
            ..fast_opts()
        },
    );
    // `b` already holds its value in Flux (no-op, not sent); `a` and `c` are written, with
    // different source timestamps; `b`'s is the newest of all but must not count.
    sim_write(&sim, "e2", json!({"b": 5, "theirs": true})).await;
    rig.ingest(vec![
        set("e1", TS + 5, &[("a", json!(1))]),
        set("e1", TS + 9, &[("c", json!(3))]),
        set("e1", TS + 2, &[("a", json!(0))]), // older: superseded by ts
        set("e2", TS + 50, &[("b", json!(5))]),
        set("e2", TS + 7, &[("a", json!(2))]),
    ])
    .await;
    rig.flusher.drain_once().await;
    let log: Vec<_> = sim
        .applied_log()
        .into_iter()
        .filter(|e| e.source == "outbox-gw17")
        .collect();
    assert_eq!(log.len(), 2, "{log:?}");
    for ev in &log {
        assert_eq!(ev.stream, "scada.tags");
        assert!(ev.event_id.starts_with("fo-"));
        match ev.entity_id.as_deref() {
            Some("e1") => {
                assert_eq!(ev.properties, json!({"a": 1, "c": 3}));
                assert_eq!(ev.timestamp as u64, TS + 9);
            }
            Some("e2") => {
                assert_eq!(ev.properties, json!({"a": 2}));
                assert_eq!(
                    ev.timestamp as u64,
                    TS + 7,
                    "timestamp of the properties sent only"
                );
            }
            other => panic!("unexpected entity {other:?}"),
        }
    }
    // eventId derived from outbox versions: fo-<entity hash>-<oldest seq>-<newest seq>.
    let e1 = log
        .iter()
        .find(|e| e.entity_id.as_deref() == Some("e1"))
        .expect("e1");
    assert!(e1.event_id.ends_with("-1-2"), "{}", e1.event_id);
}

async fn sim_write(sim: &flux_outbox::sim::SimHandle, id: &str, props: Value) {
    let c = client(&sim.url(), None, Duration::from_secs(5));
    c.post_batch(&[flux_outbox::flux_client::FluxEvent {
        stream: "ops".into(),
        source: "operator".into(),
        timestamp_ms: 1,
        entity_id: id.into(),
        properties: props.as_object().cloned().expect("obj"),
        event_id: None,
    }])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_is_sent_alone_and_before_recreating_properties() {
    let sim = start_sim(SimConfig::default()).await;
    let rig = Rig::on_sim(&sim, None, fast_opts());
    rig.ingest(vec![set("e", TS, &[("old", json!(1)), ("x", json!(1))])])
        .await;
    rig.flusher.drain_once().await;
    rig.ingest(vec![
        delete("e", TS + 10),
        set("e", TS + 20, &[("x", json!(2))]),
        set("e", TS + 5, &[("late", json!(0))]),
    ])
    .await;
    while rig.store.stats().pending_keys > 0 {
        rig.flusher.drain_once().await;
    }
    let log: Vec<_> = sim
        .applied_log()
        .into_iter()
        .filter(|e| e.source == "outbox-test")
        .collect();
    let del = log
        .iter()
        .position(|e| e.properties.get("__deleted__").is_some())
        .expect("delete sent");
    assert_eq!(
        log[del].properties,
        json!({"__deleted__": true}),
        "delete alone"
    );
    assert_eq!(log[del].timestamp as u64, TS + 10);
    let recreate = log
        .iter()
        .position(|e| e.properties.get("x") == Some(&json!(2)))
        .expect("x=2 sent");
    assert!(del < recreate, "delete before re-creating properties");
    let e = sim.entity("e").expect("e");
    assert_eq!(
        Value::Object(e.properties),
        json!({"x": 2}),
        "older-than-delete values never come back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answer_is_resolved_by_reading_back_without_a_second_write() {
    let sim = start_sim(SimConfig::default()).await;
    sim.set_faults(Faults {
        lost_answer_rate: 1.0,
        ..Faults::default()
    });
    let mut rig = Rig::on_sim(&sim, None, fast_opts());
    rig.ingest(vec![set("e", TS, &[("v", json!(1))])]).await;
    rig.run();
    rig.wait(Duration::from_secs(5), "lost answer", |_| {
        sim.stats().fault_lost_answer >= 1
    })
    .await;
    sim.set_faults(Faults::default());
    rig.wait_drained(Duration::from_secs(5)).await;
    rig.stop().await;
    assert_eq!(sim.entity("e").expect("e").properties["v"], json!(1));
    assert!(
        rig.metrics.noops.load(Ordering::Relaxed) >= 1,
        "read-back found it applied"
    );
    let writes = sim
        .applied_log()
        .iter()
        .filter(|e| e.entity_id.as_deref() == Some("e"))
        .count();
    assert_eq!(
        writes, 1,
        "applied once: the retry read it back instead of writing again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_application_of_a_failed_event_is_repaired_by_read_back() {
    let sim = start_sim(SimConfig::default()).await;
    // Every event answered `publish failed` and applied 600 ms later anyway.
    sim.set_faults(Faults {
        publish_fail_rate: 1.0,
        late_apply_rate: 1.0,
        late_apply_delay_ms: 600,
        ..Faults::default()
    });
    let mut rig = Rig::on_sim(&sim, None, fast_opts());
    rig.ingest(vec![
        set("e", TS, &[("v", json!(1))]),
        set("d", TS, &[("v", json!(1))]),
    ])
    .await;
    rig.run();
    rig.wait(Duration::from_secs(5), "publish failure", |_| {
        sim.stats().events_publish_failed >= 2
    })
    .await;
    sim.set_faults(Faults::default());
    // Newer values (and a delete) are delivered before the old events land.
    rig.ingest(vec![
        set("e", TS + 1, &[("v", json!(2))]),
        delete("d", TS + 1),
    ])
    .await;
    rig.wait_drained(Duration::from_secs(5)).await;
    rig.wait(Duration::from_secs(5), "late application", |_| {
        sim.stats().events_applied_late >= 2
    })
    .await;
    // The late events rolled Flux back (e.v = 1, d re-created); the read-back repairs both.
    rig.wait(Duration::from_secs(5), "repair", |_| {
        sim.entity("e")
            .is_some_and(|e| e.properties["v"] == json!(2))
            && sim.entity("d").is_none()
    })
    .await;
    rig.stop().await;
    assert!(rig.metrics.convergence_rewrites.load(Ordering::Relaxed) >= 2);
    let late: Vec<_> = sim.applied_log().into_iter().filter(|e| e.late).collect();
    assert!(late.len() >= 2, "{late:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_writer_is_not_mistaken_for_a_late_write() {
    let sim = start_sim(SimConfig::default()).await;
    sim.set_faults(Faults {
        publish_fail_rate: 1.0,
        ..Faults::default()
    });
    let mut rig = Rig::on_sim(
        &sim,
        None,
        FlushOptions {
            conflict_policy: ConflictPolicy::KeepRemote,
            ..fast_opts()
        },
    );
    rig.ingest(vec![set("e", TS, &[("v", json!(1))])]).await;
    rig.run();
    rig.wait(Duration::from_secs(5), "publish failure", |_| {
        sim.stats().events_publish_failed >= 1
    })
    .await;
    sim.set_faults(Faults::default());
    rig.wait_drained(Duration::from_secs(5)).await;
    sim_write(&sim, "e", json!({"v": 42})).await;
    // Through several read-backs of the suspect entity: the other writer's value stays.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    rig.stop().await;
    assert_eq!(sim.entity("e").expect("e").properties["v"], json!(42));
    assert_eq!(rig.metrics.convergence_rewrites.load(Ordering::Relaxed), 0);
}

/// Two properties of one entity, `new` (TS+20) and `old` (TS), are delivered; then a delete
/// observed at TS+10 arrives late: it removes `old` but not `new`. Returns flux-sim's count of
/// reads after the properties' delivery and at the end.
async fn late_delete_keeps_the_newer_property(opts: FlushOptions) -> (u64, u64) {
    let sim = start_sim(SimConfig::default()).await;
    let rig = Rig::on_sim(&sim, None, opts);
    rig.ingest(vec![
        set("e", TS + 20, &[("new", json!(2))]),
        set("e", TS, &[("old", json!(1))]),
    ])
    .await;
    rig.flusher.drain_once().await;
    let reads_for_properties = sim.stats().requests_read;
    rig.ingest(vec![delete("e", TS + 10)]).await;
    rig.flusher.drain_once().await;
    assert_eq!(rig.store.stats().pending_keys, 0);
    let e = sim
        .entity("e")
        .expect("entity re-created with its newer property");
    assert_eq!(Value::Object(e.properties), json!({"new": 2}));
    (reads_for_properties, sim.stats().requests_read)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_older_than_a_delivered_property_does_not_wipe_it() {
    late_delete_keeps_the_newer_property(fast_opts()).await;
}

/// Flux answers 200 before it applies: a read straight after is sometimes the state before the
/// last event. Such a read must never make the worker count a value as already in Flux: with
/// v=2 just delivered and 1 the next value, a stale read showing the older 1 would otherwise
/// leave 2 in Flux for good; the same after a delivered delete (a stale read still shows the
/// property from before it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_reads_never_make_the_worker_skip_a_needed_write() {
    let sim = start_sim(SimConfig {
        faults: Faults {
            stale_read_rate: 1.0,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let rig = Rig::on_sim(&sim, None, fast_opts());
    for (ts, v) in [(TS, 1), (TS + 1, 2), (TS + 2, 1)] {
        rig.ingest(vec![set("e", ts, &[("v", json!(v))])]).await;
        assert_eq!(rig.flusher.drain_once().await, LinkVerdict::Ok);
    }
    assert_eq!(sim.entity("e").expect("e").properties["v"], json!(1));

    rig.ingest(vec![set("d", TS, &[("p", json!(1))])]).await;
    rig.flusher.drain_once().await;
    rig.ingest(vec![delete("d", TS + 10)]).await;
    rig.flusher.drain_once().await;
    assert!(sim.entity("d").is_none());
    rig.ingest(vec![set("d", TS + 20, &[("p", json!(1))])])
        .await;
    rig.flusher.drain_once().await;
    assert_eq!(
        sim.entity("d").map(|d| d.properties.get("p").cloned()),
        Some(Some(json!(1))),
        "re-created after the delete"
    );
    assert!(sim.stats().fault_stale_read >= 5);
    assert_eq!(rig.store.stats().pending_keys, 0);

    // Many changes flipping between few values, reads stale at random: Flux ends with the
    // newest value of every key.
    sim.set_faults(Faults {
        stale_read_rate: 0.5,
        ..Faults::default()
    });
    let mut newest = std::collections::BTreeMap::new();
    let mut x: u64 = 7;
    for round in 0..40u64 {
        let mut ups = Vec::new();
        for k in 0..4u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if (x >> 33) % 2 == 0 {
                let v = (x >> 40) % 3;
                let id = format!("s{k}");
                ups.push(set(&id, TS + 100 + round, &[("v", json!(v))]));
                newest.insert(id, json!(v));
            }
        }
        rig.ingest(ups).await;
        rig.flusher.drain_once().await;
    }
    assert_eq!(rig.store.stats().pending_keys, 0);
    for (id, v) in &newest {
        assert_eq!(&sim.entity(id).expect("entity").properties["v"], v, "{id}");
    }
}

/// RFC 7386 when Flux holds no object for the property: our object's null members are dropped
/// (Flux would store them as null), and the value recorded as delivered is what Flux holds, so
/// the same value again is a no-op and a later change is not mistaken for a conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_with_null_members_over_no_object_is_stored_as_rfc7386_says() {
    let sim = start_sim(SimConfig::default()).await;
    sim_write(&sim, "e", json!({"cfg": 7})).await;
    let rig = Rig::on_sim(
        &sim,
        None,
        FlushOptions {
            conflict_policy: ConflictPolicy::KeepRemote,
            ..fast_opts()
        },
    );
    let patch = json!({"mode": "auto", "limit": null, "pid": {"p": 1, "i": null}});
    rig.ingest(vec![set(
        "e",
        TS,
        &[("cfg", patch.clone()), ("fresh", patch.clone())],
    )])
    .await;
    rig.flusher.drain_once().await;
    let want = json!({"mode": "auto", "pid": {"p": 1}});
    let e = sim.entity("e").expect("e");
    assert_eq!(e.properties["cfg"], want, "over a non-object");
    assert_eq!(e.properties["fresh"], want, "over an absent property");
    let applied = sim.applied_count();
    // The same value again: Flux holds exactly what was delivered, nothing to send.
    rig.ingest(vec![set("e", TS + 1, &[("cfg", patch.clone())])])
        .await;
    rig.flusher.drain_once().await;
    assert_eq!(sim.applied_count(), applied, "same value again is a no-op");
    // A change of ours is ours, not another writer's: sent even under keep-remote.
    rig.ingest(vec![set(
        "e",
        TS + 2,
        &[("cfg", json!({"mode": "manual"}))],
    )])
    .await;
    rig.flusher.drain_once().await;
    assert_eq!(
        sim.entity("e").expect("e").properties["cfg"],
        json!({"mode": "manual", "pid": {"p": 1}})
    );
    assert_eq!(rig.metrics.conflicts.load(Ordering::Relaxed), 0);
    assert_eq!(rig.store.stats().pending_keys, 0);
}

/// Blind mode skips reads for property writes only: a late delete still reads the entity, so
/// it does not wipe a property delivered with a newer version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blind_mode_delete_older_than_a_delivered_property_does_not_wipe_it() {
    let (reads_for_properties, reads) = late_delete_keeps_the_newer_property(blind_opts()).await;
    assert_eq!(reads_for_properties, 0, "property writes are not read");
    assert_eq!(reads, 1, "one read, for the delete");
}

/// Byte-size trigger: with the interval and the count trigger out of reach, a burst of large
/// values (more than `batch_bytes_max` acknowledged since the last flush) is sent at once.
/// Without the trigger nothing would be sent for an hour and the wait below fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_bytes_reaching_batch_bytes_max_trigger_a_flush() {
    let respond: Responder = Arc::new(|events: &[Value]| (200, "application/json", all_ok(events)));
    let fake = fake_flux(respond, Duration::ZERO).await;
    let mut rig = Rig::new(
        client(&fake.url, None, Duration::from_secs(5)),
        FlushOptions {
            interval: Duration::from_secs(3600),
            batch_events_max: 10_000,
            batch_bytes_max: 64 * 1024,
            merge: MergeMode::Blind,
            ..fast_opts()
        },
    );
    rig.run();
    // 20 values of 4 KB on one entity: 80 kB, one event, far below the count trigger.
    let big = "x".repeat(4000);
    let props: Vec<(String, Value)> = (0..20).map(|i| (format!("p{i}"), json!(big))).collect();
    let refs: Vec<(&str, Value)> = props.iter().map(|(n, v)| (n.as_str(), v.clone())).collect();
    rig.ingest(vec![set("big", TS, &refs)]).await;
    rig.wait_drained(Duration::from_secs(20)).await;
    rig.stop().await;
    let batches = fake.batches.lock().unwrap().clone();
    let sent: usize = batches
        .iter()
        .flat_map(|(_, b)| b.iter())
        .map(|e| props_of(e).len())
        .sum();
    assert_eq!(sent, 20, "every property sent once");
}

/// The count trigger counts EVENTS (one per entity), not keys: many properties of one entity do
/// not make a full batch, `batch_events_max` entities do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_events_reaching_batch_events_max_trigger_a_flush() {
    let respond: Responder = Arc::new(|events: &[Value]| (200, "application/json", all_ok(events)));
    let fake = fake_flux(respond, Duration::ZERO).await;
    let mut rig = Rig::new(
        client(&fake.url, None, Duration::from_secs(5)),
        FlushOptions {
            interval: Duration::from_secs(3600),
            batch_events_max: 3,
            merge: MergeMode::Blind,
            ..fast_opts()
        },
    );
    // Ingested (and compacted) before the loop starts: ten keys of ONE entity.
    let props: Vec<(String, Value)> = (0..10).map(|i| (format!("p{i}"), json!(i))).collect();
    let refs: Vec<(&str, Value)> = props.iter().map(|(n, v)| (n.as_str(), v.clone())).collect();
    rig.ingest(vec![set("one", TS, &refs)]).await;
    rig.run();
    // Two more entities make three events: a full batch.
    rig.ingest(vec![
        set("two", TS, &[("v", json!(2))]),
        set("three", TS, &[("v", json!(3))]),
    ])
    .await;
    rig.wait_drained(Duration::from_secs(20)).await;
    rig.stop().await;
    let batches = fake.batches.lock().unwrap().clone();
    // Counting keys (10 >= 3) would have flushed `one` alone before the others arrived.
    assert_eq!(
        batches.len(),
        1,
        "one full batch of three events: {batches:?}"
    );
    assert_eq!(batches[0].1.len(), 3);
}

/// Measurement behind the read strategy of read-merge-write (see `flusher` module doc and
/// ARCHITECTURE.md): one `?prefix=` list versus one read per entity (concurrency 8, the
/// default `read_concurrency`) for a batch of 200 entities under one prefix, as the prefix
/// holds more and more entities. Asserts that both strategies see the same state (so the
/// comparison is fair) and prints the timings; it decides nothing on the clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measurement_prefix_list_versus_single_reads() {
    use futures_util::stream::{self, StreamExt};
    let sim = start_sim(SimConfig {
        log_capacity: 0,
        ..SimConfig::default()
    })
    .await;
    let c = client(&sim.url(), None, Duration::from_secs(30));
    let http = reqwest::Client::new();
    let mut populated = 0usize;
    for population in [200usize, 2_000, 20_000] {
        while populated < population {
            let events: Vec<Value> = (populated..(populated + 1000).min(population))
                .map(|i| {
                    json!({"stream": "scada", "source": "m", "timestamp": 1,
                        "payload": {"entity_id": format!("site-1/e{i:06}"),
                            "properties": {"a": i, "b": "some text value", "c": {"x": 1.5}}}})
                })
                .collect();
            populated += events.len();
            let r = http
                .post(format!("{}/api/events/batch", sim.url()))
                .header("content-type", "application/json")
                .body(json!({ "events": events }).to_string())
                .send()
                .await
                .expect("populate");
            assert_eq!(r.status(), 200);
        }
        let batch: Vec<String> = (0..200).map(|i| format!("site-1/e{i:06}")).collect();
        let mut single_ms = Vec::new();
        let mut list_ms = Vec::new();
        for _ in 0..3 {
            let t0 = Instant::now();
            let singles: Vec<_> = stream::iter(batch.iter().map(|id| c.get_entity(id)))
                .buffer_unordered(8)
                .collect()
                .await;
            single_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
            let t0 = Instant::now();
            let listed = c.list_prefix("site-1/").await.expect("list");
            list_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(listed.len(), population);
            let found = singles
                .into_iter()
                .filter(|r| matches!(r, Ok(Some(_))))
                .count();
            assert_eq!(found, 200);
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        eprintln!(
            "read strategy: batch 200, prefix holds {population}: 200 single reads {:.1} ms, one prefix list {:.1} ms",
            med(&mut single_ms),
            med(&mut list_ms)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_link_costs_a_few_reads_per_attempt_not_one_per_entity() {
    // Two claimed batches of 100 entities each, the link cut: each batch stops reading at its
    // first failed read, so one attempt sends at most in_flight_max x read_concurrency reads
    // (it used to read all 200 entities before looking at any answer).
    let sim = start_sim(SimConfig {
        faults: Faults {
            link_down: true,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let opts = FlushOptions {
        batch_events_max: 100,
        in_flight_max: 2,
        read_concurrency: 4,
        ..fast_opts()
    };
    let rig = Rig::on_sim(&sim, None, opts);
    rig.ingest(
        (0..200)
            .map(|i| set(&format!("scada/e{i}"), TS, &[("v", json!(i))]))
            .collect(),
    )
    .await;
    let verdict = rig.flusher.drain_once().await;
    assert_eq!(verdict, LinkVerdict::Unknown);
    let cut = sim.stats().fault_link_down;
    assert!(cut >= 1, "no request reached the simulator");
    assert!(
        cut <= 2 * 4,
        "{cut} requests for one attempt over a dead link"
    );
    // Nothing was lost or settled wrongly: every key is still pending and claimable.
    let s = rig.store.stats();
    assert_eq!(s.pending_keys, 200);
    assert_eq!(s.in_flight_entities, 0);
    assert_eq!(sim.stats().events_applied, 0);
}

/// A flush cancelled while its claim runs on the blocking pool (shutdown's abort or timeout)
/// must not leave the claimed entities in flight until a restart: the finished claim is dropped
/// with its guard, the entities are released, and the next flush delivers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_cancelled_during_its_claim_releases_the_entities() {
    let respond: Responder = Arc::new(|events: &[Value]| (200, "application/json", all_ok(events)));
    let fake = fake_flux(respond, Duration::from_millis(1)).await;
    let rig = Rig::new(
        client(&fake.url, None, Duration::from_secs(10)),
        blind_opts(),
    );
    rig.ingest(vec![set("e", TS, &[("v", json!(1))])]).await;
    // Folded first, so the cancelled claim does claim the key.
    rig.wait(
        Duration::from_secs(10),
        "the key folded into pending",
        |r| r.store.stats().pending_keys == 1,
    )
    .await;
    // Polled once (that poll starts the claim on the blocking pool and waits for it), then
    // dropped, as shutdown's abort drops it.
    let cut = futures_util::FutureExt::now_or_never(rig.flusher.drain_once());
    assert!(
        cut.is_none(),
        "the flush finished before it could be cancelled"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        rig.flusher.drain_once().await;
        let s = rig.store.stats();
        if s.pending_keys == 0 {
            assert_eq!(s.in_flight_entities, 0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the entity is still pending after 10 s (in flight: {}): the cancelled claim was never released",
            s.in_flight_entities
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b = fake.batches.lock().unwrap().clone();
    assert_eq!(b.len(), 1, "delivered once, after the cancel: {b:?}");
    assert_eq!(b[0].1[0]["payload"]["properties"]["v"], json!(1));
}
