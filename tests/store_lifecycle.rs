//! Acknowledgements racing newer values, and the life of an entity through deletes, late
//! updates, re-creation and requeue.

mod common;

use common::*;
use flux_outbox::model::{PropKey, DELETE_PROPERTY};
use flux_outbox::store::{ClaimLimits, Outcome, Settlement};
use serde_json::json;

fn key(e: &str, p: &str) -> (String, String) {
    (e.to_string(), p.to_string())
}

#[test]
fn an_ack_removes_only_the_version_sent() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), fast_opts());
    store
        .ingest_blocking(vec![set("k", 10, &[("p", json!("v1"))])])
        .unwrap();
    store.compact_all().unwrap();
    let c1 = store.claim(ALL).unwrap().unwrap();
    assert_eq!(c1.events[0].props[0].value, json!("v1"));

    // v2 arrives and is compacted while v1 is in flight.
    store
        .ingest_blocking(vec![set("k", 20, &[("p", json!("v2"))])])
        .unwrap();
    store.compact_all().unwrap();
    // The entity stays claimed until settled: nothing else to claim.
    assert!(store.claim(ALL).unwrap().is_none());

    deliver_all(&store, &c1);
    assert_eq!(pending(&store)[&key("k", "p")], (json!("v2"), 20));
    let d = store.delivered(&PropKey::new("k", "p")).unwrap().unwrap();
    assert_eq!(
        d.ts_ms, 10,
        "the delivered record is the version acknowledged"
    );

    let c2 = store.claim(ALL).unwrap().unwrap();
    assert_eq!(c2.events.len(), 1);
    assert_eq!(c2.events[0].props[0].value, json!("v2"));
    deliver_all(&store, &c2);
    assert!(pending(&store).is_empty());
    assert_eq!(store.stats().delivered, 2);
    assert_clean(&store);
}

#[test]
fn an_ack_racing_an_uncompacted_newer_value_and_an_older_late_one() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), fast_opts());
    store
        .ingest_blocking(vec![set("k", 10, &[("p", json!("v1"))])])
        .unwrap();
    store.compact_all().unwrap();
    let c1 = store.claim(ALL).unwrap().unwrap();
    // v2 still in the log when the ack lands, plus a late value older than v1.
    store
        .ingest_blocking(vec![
            set("k", 20, &[("p", json!("v2"))]),
            set("k", 5, &[("p", json!("v0"))]),
        ])
        .unwrap();
    deliver_all(&store, &c1);
    store.compact_all().unwrap();
    assert_eq!(pending(&store)[&key("k", "p")], (json!("v2"), 20));
    // v0 lost to v2 (superseded); it never rolls Flux back.
    assert_eq!(store.stats().superseded, 1);
    let c2 = store.claim(ALL).unwrap().unwrap();
    assert_eq!(c2.events[0].props[0].value, json!("v2"));
    assert_clean(&store);
}

#[test]
fn entity_lifecycle_delete_late_update_recreate() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), fast_opts());
    // "A" sorts before "__deleted__", "x" after it.
    store
        .ingest_blocking(vec![set("e", 10, &[("A", json!(1)), ("x", json!(1))])])
        .unwrap();
    store.compact_all().unwrap();
    store.ingest_blocking(vec![delete("e", 20)]).unwrap();
    // Pending after e's delete: delivered after it (oldest first).
    store
        .ingest_blocking(vec![set("other", 11, &[("x", json!(1))])])
        .unwrap();
    store.compact_all().unwrap();
    let p = pending(&store);
    assert!(!p.contains_key(&key("e", "A")) && !p.contains_key(&key("e", "x")));
    assert_eq!(p[&key("e", DELETE_PROPERTY)], (json!(true), 20));
    assert_eq!(
        store.stats().superseded,
        2,
        "both older properties superseded"
    );

    // Older than the delete: dropped and counted, whether or not something is pending.
    store
        .ingest_blocking(vec![set("e", 15, &[("x", json!(5))])])
        .unwrap();
    store.compact_all().unwrap();
    assert_eq!(store.stats().late_dropped, 1);
    assert!(!pending(&store).contains_key(&key("e", "x")));

    // Newer than the delete: re-creates the entity.
    store
        .ingest_blocking(vec![set("e", 30, &[("A", json!(7)), ("x", json!(7))])])
        .unwrap();
    store.compact_all().unwrap();
    let p = pending(&store);
    assert_eq!(p[&key("e", "A")], (json!(7), 30));
    assert_eq!(p[&key("e", "x")], (json!(7), 30));
    assert_eq!(store.stats().pending_entities, 2);

    // The delete is claimed alone, even though newer properties are pending.
    let one = ClaimLimits {
        events_max: 1,
        bytes_max: 1 << 20,
    };
    let c = store.claim(one).unwrap().unwrap();
    assert_eq!(c.events.len(), 1);
    assert_eq!(c.events[0].entity, "e");
    assert!(c.events[0].delete);
    assert_eq!(c.events[0].props.len(), 1);
    assert_eq!(c.events[0].props[0].name, DELETE_PROPERTY);
    // The entity is in flight: the next claim moves on to the other entity only.
    let c_other = store.claim(ALL).unwrap().unwrap();
    assert_eq!(c_other.events.len(), 1);
    assert_eq!(c_other.events[0].entity, "other");
    deliver_all(&store, &c_other);

    deliver_all(&store, &c);
    // Now the re-created entity's properties are claimed, after the delete was settled.
    let c = store.claim(one).unwrap().unwrap();
    assert_eq!(c.events[0].entity, "e");
    assert!(!c.events[0].delete);
    let names: Vec<&str> = c.events[0].props.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["A", "x"]);
    deliver_all(&store, &c);

    // The tombstone outlives the delivery and a restart: a late update older than the delete
    // still never reaches Flux.
    store.close().unwrap();
    drop(store);
    let (store, _) = open(dir.path(), fast_opts());
    store
        .ingest_blocking(vec![set("e", 18, &[("y", json!(1))])])
        .unwrap();
    store.compact_all().unwrap();
    assert_eq!(store.stats().late_dropped, 2);
    assert!(!pending(&store).contains_key(&key("e", "y")));
    assert_clean(&store);
}

#[test]
fn a_requeued_old_delete_never_follows_a_newer_one() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), fast_opts());
    store.ingest_blocking(vec![delete("e", 10)]).unwrap();
    store.compact_all().unwrap();
    let c = store.claim(ALL).unwrap().unwrap();
    settle_all(&store, &c, || {
        Some(Outcome::Quarantine {
            reason: "rejected".into(),
            http_status: Some(403),
        })
    });
    // A newer delete and a re-creation are delivered meanwhile.
    store.ingest_blocking(vec![delete("e", 20)]).unwrap();
    store.compact_all().unwrap();
    deliver_all(&store, &store.claim(ALL).unwrap().unwrap());
    store
        .ingest_blocking(vec![set("e", 30, &[("x", json!(1))])])
        .unwrap();
    store.compact_all().unwrap();
    deliver_all(&store, &store.claim(ALL).unwrap().unwrap());

    // Flux applies in arrival order: resending the old delete would wipe x. It is dropped.
    assert_eq!(store.requeue(None).unwrap(), 1);
    assert!(pending(&store).is_empty(), "{:?}", pending(&store));
    let s = store.stats();
    assert_eq!((s.late_dropped, s.quarantine_keys, s.requeued), (1, 0, 1));
    assert_clean(&store);
}

#[test]
fn a_requeued_delete_that_is_still_the_newest_is_resent() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), fast_opts());
    store
        .ingest_blocking(vec![set("e", 5, &[("x", json!(1))])])
        .unwrap();
    store.ingest_blocking(vec![delete("e", 10)]).unwrap();
    store.compact_all().unwrap();
    let c = store.claim(ALL).unwrap().unwrap();
    settle_all(&store, &c, || {
        Some(Outcome::Quarantine {
            reason: "rejected".into(),
            http_status: Some(403),
        })
    });
    assert_eq!(store.requeue(Some("e")).unwrap(), 1);
    let c = store.claim(ALL).unwrap().unwrap();
    assert!(c.events[0].delete);
    assert_eq!(c.events[0].props[0].version.ts_ms, 10);
    assert_clean(&store);
}

#[test]
fn a_stale_settlement_after_requeue_leaves_no_orphan_index_entry() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), fast_opts());
    // Two values so the pending record's first_seq (1) differs from its seq (2).
    store
        .ingest_blocking(vec![set("k", 1, &[("p", json!(1))])])
        .unwrap();
    store
        .ingest_blocking(vec![set("k", 2, &[("p", json!(2))])])
        .unwrap();
    store.compact_all().unwrap();
    let c = store.claim(ALL).unwrap().unwrap();
    let sent = c.events[0].props[0].pending.clone();
    assert_ne!(sent.first_seq, sent.seq);
    settle_all(&store, &c, || {
        Some(Outcome::Quarantine {
            reason: "rejected".into(),
            http_status: Some(400),
        })
    });
    // Requeue re-indexes the same version at its own seq.
    store.requeue(None).unwrap();
    // A duplicate, stale answer for the first send (e.g. a retried request that did land).
    store
        .settle(vec![Settlement {
            key: PropKey::new("k", "p"),
            sent,
            outcome: Outcome::Delivered { value_hash: 0 },
        }])
        .unwrap();
    assert!(pending(&store).is_empty());
    assert_eq!(store.stats().pending_keys, 0);
    assert_clean(&store);
}

#[test]
fn quarantine_keeps_the_newest_rejected_value() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), fast_opts());
    store
        .ingest_blocking(vec![set("k", 2, &[("p", json!("new"))])])
        .unwrap();
    store.compact_all().unwrap();
    let new = store.claim(ALL).unwrap().unwrap();
    let q = || {
        Some(Outcome::Quarantine {
            reason: "rejected".into(),
            http_status: Some(400),
        })
    };
    settle_all(&store, &new, q);
    // An older value of the same key rejected afterwards (a late answer to an earlier send).
    store
        .ingest_blocking(vec![set("k", 1, &[("p", json!("old"))])])
        .unwrap();
    store.compact_all().unwrap();
    let old = store.claim(ALL).unwrap().unwrap();
    settle_all(&store, &old, q);
    let rows = store.quarantine_rows(None, 10).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].value, json!("new"));
    assert_eq!(store.stats().quarantine_keys, 1);
    assert_eq!(
        store.stats().superseded,
        1,
        "the discarded rejected value is counted"
    );
    assert_clean(&store);
}

#[test]
fn a_drained_store_rotates_to_a_small_fresh_one_and_keeps_what_it_must() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), fast_opts());
    // Churn: many values of many keys, all delivered.
    for round in 0..4u64 {
        let updates: Vec<_> = (0..2_000)
            .map(|i| {
                set(
                    &format!("e{i}"),
                    10 + round,
                    &[("p", json!("x".repeat(200)))],
                )
            })
            .collect();
        store.ingest_blocking(updates).unwrap();
        store.compact_all().unwrap();
        while let Some(c) = store.claim(ALL).unwrap() {
            deliver_all(&store, &c);
        }
    }
    // Not drained: no rotation.
    store
        .ingest_blocking(vec![set("busy", 1, &[("p", json!(1))])])
        .unwrap();
    store.compact_all().unwrap();
    assert_eq!(store.shrink_if_drained(0).unwrap(), None);
    let c = store.claim(ALL).unwrap().unwrap();
    deliver_all(&store, &c);

    let before_stats = store.stats();
    let (before, after) = store
        .shrink_if_drained(0)
        .unwrap()
        .expect("a drained store rotates");
    assert!(after < before, "rotation must shrink: {before} -> {after}");
    // Counters and delivered records survive; late updates are still recognised.
    let s = store.stats();
    assert_eq!(
        (s.delivered, s.superseded),
        (before_stats.delivered, before_stats.superseded)
    );
    assert_eq!(s.next_seq, before_stats.next_seq);
    assert!(store.delivered(&PropKey::new("e7", "p")).unwrap().is_some());
    store
        .ingest_blocking(vec![set("e7", 5, &[("p", json!("late"))])])
        .unwrap();
    store.compact_all().unwrap();
    assert_eq!(store.stats().late_dropped, before_stats.late_dropped + 1);
    // Right after a rotation, another one is not due.
    assert_eq!(store.shrink_if_drained(0).unwrap(), None);
    // The fresh store works and survives a reopen.
    store
        .ingest_blocking(vec![set("after", 100, &[("p", json!("v"))])])
        .unwrap();
    store.compact_all().unwrap();
    assert_clean(&store);
    store.close().unwrap();
    drop(store);
    let (store, _) = open(dir.path(), fast_opts());
    assert_eq!(pending(&store)[&key("after", "p")], (json!("v"), 100));
    assert_clean(&store);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("store."))
        .collect();
    assert!(leftovers.is_empty(), "rotation leftovers: {leftovers:?}");
}

#[test]
fn a_rotation_interrupted_between_its_renames_is_finished_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(dir.path(), fast_opts());
        store
            .ingest_blocking(vec![set("k", 10, &[("p", json!("v"))])])
            .unwrap();
        store.compact_all().unwrap();
        store.close().unwrap();
    }
    // The state a crash leaves after `store -> store.old` and before `store.new -> store`:
    // the complete copy under store.new, the old one under store.old.
    let d = dir.path();
    std::fs::rename(d.join("store"), d.join("store.old")).unwrap();
    copy_tree(&d.join("store.old"), &d.join("store.new"));
    let (store, _) = open(d, fast_opts());
    assert_eq!(pending(&store)[&key("k", "p")], (json!("v"), 10));
    assert!(!d.join("store.old").exists() && !d.join("store.new").exists());
    assert_clean(&store);
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn entities_whose_last_attempt_had_an_unknown_outcome_are_found_across_a_reopen() {
    // The flusher restores its convergence watch from these after a restart; the scan streams
    // over every pending key (no listing cap), so an entity far down a large backlog is found.
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(dir.path(), fast_opts());
        let mut updates = Vec::new();
        for i in 0..300 {
            updates.push(set(
                &format!("e{i:03}"),
                10,
                &[("p", json!(i)), ("q", json!(i))],
            ));
        }
        store.ingest_blocking(updates).unwrap();
        store.compact_all().unwrap();
        store.close().unwrap();
    }
    let (store, _) = open(dir.path(), fast_opts());
    // Settle every entity: e007 and e299 with an unknown outcome on one key, e150 with another
    // error, the rest left untouched.
    let c = store
        .claim(ClaimLimits {
            events_max: 1000,
            bytes_max: usize::MAX,
        })
        .unwrap()
        .unwrap();
    let mut settlements = Vec::new();
    for ev in &c.events {
        for p in &ev.props {
            let error = match (ev.entity.as_str(), p.name.as_str()) {
                ("e007", "q") | ("e299", "p") => "unknown outcome: connection reset",
                ("e150", _) => "rate limited",
                _ => continue,
            };
            settlements.push(Settlement {
                key: PropKey::new(ev.entity.clone(), p.name.clone()),
                sent: p.pending.clone(),
                outcome: Outcome::Retry {
                    error: error.into(),
                },
            });
        }
    }
    store.settle(settlements).unwrap();
    store.release(&c);
    store.close().unwrap();
    drop(store);
    let (store, _) = open(dir.path(), fast_opts());
    let found = store
        .entities_with_error_prefix("unknown outcome: ", 100)
        .unwrap();
    let mut found: Vec<String> = found.into_iter().collect();
    found.sort();
    assert_eq!(found, vec!["e007".to_string(), "e299".to_string()]);
    // The limit bounds the answer.
    assert_eq!(
        store
            .entities_with_error_prefix("unknown outcome: ", 1)
            .unwrap()
            .len(),
        1
    );
    assert_eq!(store.stats().pending_keys, 600);
}
