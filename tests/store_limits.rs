//! The key limit: new keys are refused with `StoreError::Full`, updates of pending keys and
//! deletes are still accepted, and nothing accepted is ever dropped.

mod common;

use common::*;
use flux_outbox::store::{StoreError, StoreOptions};
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
