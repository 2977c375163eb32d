//! The key limit: new keys are refused with `StoreError::Full`, updates of pending keys and
//! deletes are still accepted, and nothing accepted is ever dropped.

mod common;

use common::*;
use flux_outbox::store::{ClaimLimits, Outcome, StoreError, StoreOptions};
use serde_json::json;

fn limited(max: u64) -> StoreOptions {
    StoreOptions {
        pending_keys_max: max,
        ..fast_opts()
    }
}

#[test]
fn full_store_refuses_new_keys_but_keeps_accepting_updates_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), limited(4));

    store
        .ingest_blocking(vec![set(
            "e1",
            1,
            &[("a", json!(1)), ("b", json!(1)), ("c", json!(1))],
        )])
        .unwrap();
    // Two new keys would make 5 > 4: the whole request is refused.
    let r = store.ingest_blocking(vec![set("e2", 1, &[("x", json!(1)), ("y", json!(1))])]);
    assert!(matches!(r, Err(StoreError::Full(_))), "{r:?}");
    // Exactly up to the limit is fine.
    store
        .ingest_blocking(vec![set("e1", 1, &[("d", json!(1))])])
        .unwrap();
    let r = store.ingest_blocking(vec![set("e3", 1, &[("z", json!(1))])]);
    assert!(matches!(r, Err(StoreError::Full(_))), "{r:?}");

    store.compact_all().unwrap();
    assert_eq!(store.stats().pending_keys, 4);

    // Updates of keys already pending never grow the store: accepted while full.
    store
        .ingest_blocking(vec![set("e1", 2, &[("a", json!(2)), ("b", json!(2))])])
        .unwrap();
    // A request mixing a pending key with a new one is refused as a whole (all or nothing).
    let r = store.ingest_blocking(vec![
        set("e1", 3, &[("c", json!(3))]),
        set("e4", 3, &[("n", json!(3))]),
    ]);
    assert!(matches!(r, Err(StoreError::Full(_))), "{r:?}");
    store.compact_all().unwrap();
    let p = pending(&store);
    assert_eq!(p[&("e1".into(), "a".into())], (json!(2), 2));
    assert_eq!(p[&("e1".into(), "b".into())], (json!(2), 2));
    // The refused request left no trace.
    assert_eq!(p[&("e1".into(), "c".into())], (json!(1), 1));
    assert!(!p.contains_key(&("e4".into(), "n".into())));

    // A delete is always accepted: it is how a full outbox sheds keys.
    store.ingest_blocking(vec![delete("e1", 10)]).unwrap();
    store.compact_all().unwrap();
    let p = pending(&store);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p.contains_key(&("e1".into(), "__deleted__".into())));
    assert_eq!(
        store.stats().superseded,
        2 + 4,
        "two updates + four keys deleted"
    );

    // Room again: new keys are accepted.
    store
        .ingest_blocking(vec![set("e2", 1, &[("x", json!(1)), ("y", json!(1))])])
        .unwrap();
    store.compact_all().unwrap();
    assert_eq!(store.stats().pending_keys, 3);
    assert_clean(&store);
    store.close().unwrap();
}

#[test]
fn the_limit_counts_uncompacted_keys_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), limited(4));
    // Three keys in ONE log record, left uncompacted across a restart.
    store
        .ingest_blocking(vec![set(
            "e1",
            1,
            &[("a", json!(1)), ("b", json!(1)), ("c", json!(1))],
        )])
        .unwrap();
    store.close().unwrap();
    drop(store);

    let (store, _) = open(dir.path(), limited(4));
    // 3 uncompacted keys + 2 new ones > 4. (Counting log records instead of keys at open
    // saw 1 + 2 and let the store overshoot.)
    let r = store.ingest_blocking(vec![set("e2", 1, &[("x", json!(1)), ("y", json!(1))])]);
    assert!(matches!(r, Err(StoreError::Full(_))), "{r:?}");
    store
        .ingest_blocking(vec![set("e2", 1, &[("x", json!(1))])])
        .unwrap();
    store.compact_all().unwrap();
    assert_eq!(store.stats().pending_keys, 4);
    assert_eq!(pending(&store).len(), 4);
    assert_clean(&store);
    store.close().unwrap();
}

fn is_full(r: &Result<flux_outbox::store::IngestAck, StoreError>, what: &str) -> bool {
    matches!(r, Err(StoreError::Full(why)) if why.contains(what))
}

#[test]
fn disk_cap_refuses_new_keys_but_accepts_updates_of_existing_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), fast_opts());
    store
        .ingest_blocking(vec![set("e1", 1, &[("a", json!(1)), ("b", json!(1))])])
        .unwrap();
    store.compact_all().unwrap();
    store.close().unwrap();
    drop(store);

    // Reopened with a disk cap below what the store already uses (measured at open).
    let capped = StoreOptions {
        disk_bytes_max: 1,
        ..fast_opts()
    };
    let (store, _) = open(dir.path(), capped);
    assert!(store.stats().disk_bytes >= 1);
    let r = store.ingest_blocking(vec![set("e2", 2, &[("x", json!(1))])]);
    assert!(
        is_full(&r, "bytes on disk"),
        "new key at the disk cap: {r:?}"
    );
    // Also a new property of an entity that exists is a new key.
    let r = store.ingest_blocking(vec![set("e1", 2, &[("c", json!(1))])]);
    assert!(is_full(&r, "bytes on disk"), "{r:?}");
    // Updates of keys already there do not grow the store: accepted.
    store
        .ingest_blocking(vec![set("e1", 2, &[("a", json!(2)), ("b", json!(2))])])
        .unwrap();
    store.compact_all().unwrap();
    let p = pending(&store);
    assert_eq!(p.len(), 2, "{p:?}");
    assert_eq!(p[&("e1".into(), "a".into())], (json!(2), 2));
    assert_eq!(p[&("e1".into(), "b".into())], (json!(2), 2));
    assert_clean(&store);
    store.close().unwrap();
    drop(store);

    // Control: the same store under a large cap takes new keys again.
    let (store, _) = open(dir.path(), fast_opts());
    store
        .ingest_blocking(vec![set("e2", 2, &[("x", json!(1))])])
        .unwrap();
    store.close().unwrap();
}

#[test]
fn full_store_accepts_updates_of_keys_still_in_the_log_or_in_quarantine() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), limited(4));
    // Two keys go to quarantine (no compactor thread here: folding is explicit).
    store
        .ingest_blocking(vec![set("q", 1, &[("a", json!(1)), ("b", json!(1))])])
        .unwrap();
    store.compact_all().unwrap();
    let c = store
        .claim(ClaimLimits {
            events_max: 100,
            bytes_max: 1 << 20,
        })
        .unwrap()
        .unwrap();
    settle_all(&store, &c, || {
        Some(Outcome::Quarantine {
            reason: "validation failed: test".into(),
            http_status: None,
        })
    });
    assert_eq!(store.stats().quarantine_keys, 2);
    // Four keys written and NOT compacted: the store is full while they sit in the log.
    store
        .ingest_blocking(vec![set(
            "e1",
            1,
            &[
                ("a", json!(1)),
                ("b", json!(1)),
                ("c", json!(1)),
                ("d", json!(1)),
            ],
        )])
        .unwrap();
    assert!(store.stats().log_backlog > 0);
    let r = store.ingest_blocking(vec![set("new", 1, &[("n", json!(1))])]);
    assert!(is_full(&r, "pending keys"), "a new key: {r:?}");
    // Updates of keys only in the log are not new keys.
    store
        .ingest_blocking(vec![set("e1", 2, &[("a", json!(2)), ("d", json!(2))])])
        .unwrap();
    // Nor is an update of a quarantined key: it becomes pending again, the quarantined
    // value stays inspectable.
    store
        .ingest_blocking(vec![set("q", 2, &[("a", json!(2))])])
        .unwrap();
    // Still refused as a whole when any key is new.
    let r = store.ingest_blocking(vec![set("e1", 3, &[("a", json!(3)), ("zz", json!(3))])]);
    assert!(is_full(&r, "pending keys"), "{r:?}");
    store.compact_all().unwrap();
    let p = pending(&store);
    assert_eq!(p[&("e1".into(), "a".into())], (json!(2), 2));
    assert_eq!(p[&("e1".into(), "d".into())], (json!(2), 2));
    assert_eq!(p[&("q".into(), "a".into())], (json!(2), 2));
    assert!(!p.contains_key(&("new".into(), "n".into())));
    assert!(!p.contains_key(&("e1".into(), "zz".into())));
    assert_eq!(store.stats().quarantine_keys, 2);
    assert_clean(&store);
    store.close().unwrap();
}

#[test]
fn full_store_accepts_an_update_of_a_key_added_earlier_in_the_same_commit_group() {
    // A long group-commit window gathers both requests into one commit group: the second
    // updates a key that only the first (not yet in sled) adds, and must not count as new.
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(
        dir.path(),
        StoreOptions {
            group_commit_window: std::time::Duration::from_millis(500),
            ..limited(3)
        },
    );
    store
        .ingest_blocking(vec![set("e", 1, &[("a", json!(0)), ("b", json!(0))])])
        .unwrap();
    let s1 = store.clone();
    let first =
        std::thread::spawn(move || s1.ingest_blocking(vec![set("e", 2, &[("c", json!(2))])]));
    std::thread::sleep(std::time::Duration::from_millis(50));
    let s2 = store.clone();
    let second =
        std::thread::spawn(move || s2.ingest_blocking(vec![set("e", 3, &[("c", json!(3))])]));
    let (a, b) = (first.join().unwrap(), second.join().unwrap());
    assert!(a.is_ok(), "{a:?}");
    assert!(
        b.is_ok(),
        "an update of a key added earlier in the group: {b:?}"
    );
    let r = store.ingest_blocking(vec![set("n", 4, &[("x", json!(1))])]);
    assert!(matches!(r, Err(StoreError::Full(_))), "{r:?}");
    store.compact_all().unwrap();
    let p = pending(&store);
    assert_eq!(p.len(), 3, "{p:?}");
    assert_eq!(p[&("e".into(), "c".into())], (json!(3), 3));
    assert_clean(&store);
    store.close().unwrap();
}

/// Rewrites of pending keys sit in the uncompacted log and count against the limit until they
/// are folded (the log's keys are not known without reading it). A new key arriving then must
/// be judged on the count AFTER the fold: before, it got a false "full" (HTTP 507) from a
/// store one key below its limit.
#[test]
fn a_new_key_is_accepted_after_the_fold_shows_room_and_refused_when_there_is_none() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), limited(4));
    // Three keys pending (compacted): one below the limit.
    store
        .ingest_blocking(vec![set(
            "e1",
            1,
            &[("a", json!(0)), ("b", json!(0)), ("c", json!(0))],
        )])
        .unwrap();
    store.compact_all().unwrap();
    assert_eq!(store.stats().pending_keys, 3);
    // Many rewrites of the pending keys, left in the log (no compactor thread in these tests:
    // folding happens only when a test or `admit` asks for it). Each is accepted: the keys
    // are held.
    for ts in 2..=21u64 {
        store
            .ingest_blocking(vec![set("e1", ts, &[("a", json!(ts)), ("b", json!(ts))])])
            .unwrap();
    }
    assert_eq!(store.stats().log_backlog, 20);
    // 3 pending + 40 log keys looks full; after the fold it is 3 + 1 <= 4: accepted.
    store
        .ingest_blocking(vec![set("e2", 30, &[("n", json!("new"))])])
        .unwrap();

    // Now at the limit, with rewrites in the log again: a new key is still refused after the
    // fold (4 + 1 > 4), and the rewrites stay accepted.
    for ts in 40..=49u64 {
        store
            .ingest_blocking(vec![set("e1", ts, &[("c", json!(ts))])])
            .unwrap();
    }
    let r = store.ingest_blocking(vec![set("e3", 50, &[("m", json!(1))])]);
    assert!(is_full(&r, "pending keys"), "a new key at the limit: {r:?}");
    store.compact_all().unwrap();
    let p = pending(&store);
    assert_eq!(p.len(), 4, "{p:?}");
    // Nothing accepted was dropped: the newest of every key.
    assert_eq!(p[&("e1".into(), "a".into())], (json!(21), 21));
    assert_eq!(p[&("e1".into(), "b".into())], (json!(21), 21));
    assert_eq!(p[&("e1".into(), "c".into())], (json!(49), 49));
    assert_eq!(p[&("e2".into(), "n".into())], (json!("new"), 30));
    assert!(!p.contains_key(&("e3".into(), "m".into())));
    let s = store.stats();
    assert_eq!(
        s.superseded,
        2 * 20 + 10,
        "every rewrite superseded one value"
    );
    assert_clean(&store);
    store.close().unwrap();
}

#[test]
fn a_background_fold_never_makes_a_store_below_its_limit_refuse_a_new_key() {
    // The compactor moves keys from the log count to the pending count; if a reader could see
    // them in both at once, a store holding fewer keys than its limit refused a new one. Many
    // rounds of concurrent new keys against a running compactor, drained between rounds.
    const LIMIT: u64 = 4;
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), limited(LIMIT));
    let compactor = flux_outbox::compactor::spawn(store.clone()).unwrap();
    for round in 0..600 {
        let posts: Vec<_> = (0..LIMIT)
            .map(|i| {
                let s = store.clone();
                std::thread::spawn(move || {
                    s.ingest_blocking(vec![set(&format!("r{round}-{i}"), 1, &[("v", json!(i))])])
                })
            })
            .collect();
        for p in posts {
            let r = p.join().unwrap();
            assert!(
                r.is_ok(),
                "round {round}: a new key refused below the limit: {r:?}"
            );
        }
        store.compact_all().unwrap();
        while let Some(c) = store.claim(ALL).unwrap() {
            deliver_all(&store, &c);
        }
        assert_eq!(store.stats().pending_keys, 0);
    }
    // The limit itself still holds.
    for i in 0..LIMIT {
        store
            .ingest_blocking(vec![set(&format!("full-{i}"), 1, &[("v", json!(1))])])
            .unwrap();
    }
    let r = store.ingest_blocking(vec![set("one-more", 1, &[("v", json!(1))])]);
    assert!(matches!(r, Err(StoreError::Full(_))), "{r:?}");
    drop(compactor);
    assert_clean(&store);
}

#[test]
fn a_background_fold_never_lets_the_store_take_more_keys_than_its_limit() {
    // `admit` reads the pending and uncompacted counts without the engine lock while the
    // compactor moves keys from one to the other. End to end: rounds of more new keys than the
    // limit, posted at once, against a running compactor, never end above the limit (this
    // fails when the uncompacted keys are not counted at all). A wrong order of the two count
    // updates opens a window of nanoseconds that this rarely hits; the unit test
    // `the_lock_free_key_count_never_reads_low_inside_a_fold_step` (src/store.rs) reads the
    // count inside that window on purpose.
    const LIMIT: u64 = 6;
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), limited(LIMIT));
    let compactor = flux_outbox::compactor::spawn(store.clone()).unwrap();
    for round in 0..300 {
        let posts: Vec<_> = (0..2 * LIMIT)
            .map(|i| {
                let s = store.clone();
                std::thread::spawn(move || {
                    s.ingest_blocking(vec![set(&format!("r{round}-{i}"), 1, &[("v", json!(i))])])
                })
            })
            .collect();
        let accepted = posts
            .into_iter()
            .map(|p| p.join().unwrap())
            .filter(|r| r.is_ok())
            .count() as u64;
        store.compact_all().unwrap();
        let pending = store.stats().pending_keys;
        assert_eq!(
            pending, accepted,
            "round {round}: accepted keys not pending"
        );
        assert!(
            pending <= LIMIT,
            "round {round}: {pending} keys accepted, limit {LIMIT}"
        );
        while let Some(c) = store.claim(ALL).unwrap() {
            deliver_all(&store, &c);
        }
    }
    drop(compactor);
    assert_clean(&store);
}
