//! Tamper tests: damage a closed store's records (or files) and assert the exact recovery.
//! A bad record is set aside and counted, everything else stays intact and the engine keeps
//! compacting and claiming; a store sled cannot open is moved aside and replaced.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use flux_outbox::model::PropKey;
use flux_outbox::record::FORMAT_VERSION;
use flux_outbox::store::{Outcome, Store, StoreError, STORE_DIR};
use serde_json::json;

/// The `P` key of (entity, property), as the store's module doc lays it out.
fn pkey(prefix: u8, entity: &str, property: &str) -> Vec<u8> {
    let mut k = vec![prefix];
    k.extend_from_slice(&(entity.len() as u32).to_be_bytes());
    k.extend_from_slice(entity.as_bytes());
    k.extend_from_slice(property.as_bytes());
    k
}

fn lkey(seq: u64) -> Vec<u8> {
    let mut k = vec![b'L'];
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Closes the store and reopens it, so that tampering done through `raw_db` is on disk and the
/// engine starts from it like after a restart.
fn restart(store: Store, dir: &Path) -> Store {
    store.close().unwrap();
    drop(store);
    open(dir, fast_opts()).0
}

fn tamper(store: &Store, key: &[u8], f: impl FnOnce(&mut Vec<u8>)) {
    let db = store.raw_db();
    let mut v = db
        .get(key)
        .unwrap()
        .expect("record to tamper with")
        .to_vec();
    f(&mut v);
    db.insert(key, v).unwrap();
    db.flush().unwrap();
}

fn flip_last_byte(v: &mut Vec<u8>) {
    let n = v.len() - 1;
    v[n] ^= 0x40;
}

fn x_records(store: &Store) -> usize {
    store.raw_db().scan_prefix(b"X").count()
}

/// Three entities with one pending key each, compacted.
fn three_pending(dir: &Path) -> Store {
    let (store, _) = open(dir, fast_opts());
    for e in ["e1", "e2", "e3"] {
        store
            .ingest_blocking(vec![set(e, 10, &[("p", json!(e))])])
            .unwrap();
    }
    store.compact_all().unwrap();
    store
}

#[test]
fn a_flipped_pending_value_is_set_aside_when_claimed() {
    let dir = tempfile::tempdir().unwrap();
    let store = three_pending(dir.path());
    tamper(&store, &pkey(b'P', "e2", "p"), flip_last_byte);
    let store = restart(store, dir.path());

    let c = store.claim(ALL).unwrap().unwrap();
    let entities: Vec<&str> = c.events.iter().map(|e| e.entity.as_str()).collect();
    assert_eq!(entities, ["e1", "e3"]);
    let s = store.stats();
    assert_eq!(s.corrupt_set_aside, 1);
    assert_eq!((s.pending_keys, s.pending_entities), (2, 2));
    assert_eq!(x_records(&store), 1);
    // No stale index entry, entity count or counter is left behind.
    assert_clean(&store);

    // The worker carries on: delivery, and a new value for the damaged key.
    deliver_all(&store, &c);
    store
        .ingest_blocking(vec![set("e2", 20, &[("p", json!("again"))])])
        .unwrap();
    store.compact_all().unwrap();
    let c = store.claim(ALL).unwrap().unwrap();
    assert_eq!(c.events[0].entity, "e2");
    assert_eq!(c.events[0].props[0].value, json!("again"));
    assert_eq!(store.stats().pending_keys, 1);
    assert_clean(&store);
}

#[test]
fn a_truncated_pending_value_is_set_aside_when_a_new_value_folds_over_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = three_pending(dir.path());
    tamper(&store, &pkey(b'P', "e2", "p"), |v| v.truncate(3));
    let store = restart(store, dir.path());

    store
        .ingest_blocking(vec![set("e2", 20, &[("p", json!("new"))])])
        .unwrap();
    store.compact_all().unwrap();
    let s = store.stats();
    assert_eq!(s.corrupt_set_aside, 1);
    // The new value replaces the damaged one: counted once, not twice.
    assert_eq!((s.pending_keys, s.pending_entities), (3, 3));
    assert_eq!(
        pending(&store)[&("e2".into(), "p".into())],
        (json!("new"), 20)
    );
    assert_clean(&store);
    // The set-aside bytes are kept for inspection.
    let (_, raw) = store.raw_db().scan_prefix(b"X").next().unwrap().unwrap();
    assert_eq!(raw.len(), 3);
}

#[test]
fn a_flipped_log_record_is_set_aside_and_the_rest_compacts() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), fast_opts());
    let mut seqs = Vec::new();
    for e in ["e1", "e2", "e3"] {
        let ack = store
            .ingest_blocking(vec![set(e, 10, &[("p", json!(e)), ("q", json!(1))])])
            .unwrap();
        seqs.push(ack.seq);
    }
    tamper(&store, &lkey(seqs[1]), flip_last_byte);
    let store = restart(store, dir.path());

    assert_eq!(store.compact_all().unwrap(), 3);
    let s = store.stats();
    assert_eq!(s.corrupt_set_aside, 1);
    assert_eq!(s.log_backlog, 0);
    assert_eq!((s.pending_keys, s.pending_entities), (4, 2));
    let p = pending(&store);
    assert!(
        p.contains_key(&("e1".into(), "q".into())) && p.contains_key(&("e3".into(), "p".into()))
    );
    assert!(!p.keys().any(|k| k.0 == "e2"));
    assert_clean(&store);
    // Later ingest and compaction are unaffected, and sequence numbers move on.
    let ack = store
        .ingest_blocking(vec![set("e2", 11, &[("p", json!(2))])])
        .unwrap();
    assert!(ack.seq > seqs[2]);
    store.compact_all().unwrap();
    assert_eq!(store.stats().pending_keys, 5);
    assert_clean(&store);
}

#[test]
fn a_damaged_quarantine_record_is_set_aside_by_requeue() {
    let dir = tempfile::tempdir().unwrap();
    let store = three_pending(dir.path());
    let c = store.claim(ALL).unwrap().unwrap();
    settle_all(&store, &c, || {
        Some(Outcome::Quarantine {
            reason: "schema".into(),
            http_status: Some(400),
        })
    });
    assert_eq!(store.stats().quarantine_keys, 3);
    tamper(&store, &pkey(b'Q', "e1", "p"), |v| v.truncate(v.len() / 2));
    let store = restart(store, dir.path());

    // The damaged record cannot be requeued; the two good ones are.
    assert_eq!(store.requeue(None).unwrap(), 2);
    let s = store.stats();
    assert_eq!(s.corrupt_set_aside, 1);
    assert_eq!((s.quarantine_keys, s.pending_keys), (0, 2));
    assert_clean(&store);
}

#[test]
fn the_same_key_damaged_twice_keeps_both_copies() {
    let dir = tempfile::tempdir().unwrap();
    let store = three_pending(dir.path());
    for round in 1..=2u64 {
        tamper(&store, &pkey(b'P', "e1", "p"), flip_last_byte);
        // The claim path finds it and sets it aside; a newer value makes the key pending again.
        let c = store.claim(ALL).unwrap().unwrap();
        assert!(c.events.iter().all(|e| e.entity != "e1"));
        store.release(&c);
        store
            .ingest_blocking(vec![set("e1", 10 + round, &[("p", json!(round))])])
            .unwrap();
        store.compact_all().unwrap();
        assert_eq!(store.stats().corrupt_set_aside, round);
        assert_eq!(x_records(&store) as u64, round);
        assert_clean(&store);
    }
}

#[test]
fn a_damaged_counters_record_is_recounted_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = three_pending(dir.path());
    tamper(&store, b"Mcounters", flip_last_byte);
    let store = restart(store, dir.path());
    let s = store.stats();
    assert_eq!((s.pending_keys, s.pending_entities), (3, 3));
    assert_clean(&store);
    assert!(store.claim(ALL).unwrap().is_some());
}

#[test]
fn a_malformed_entity_count_is_recounted() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), fast_opts());
    store
        .ingest_blocking(vec![set("e1", 10, &[("a", json!(1)), ("b", json!(1))])])
        .unwrap();
    store.compact_all().unwrap();
    tamper(&store, b"Ee1", |v| v.truncate(5));
    let store = restart(store, dir.path());
    store
        .ingest_blocking(vec![set("e1", 11, &[("c", json!(1))])])
        .unwrap();
    store.compact_all().unwrap();
    let s = store.stats();
    assert_eq!((s.pending_keys, s.pending_entities), (3, 1));
    assert_eq!(s.corrupt_set_aside, 1);
    assert_clean(&store);
}

/// Every record of a sled directory, read with sled directly.
fn raw_contents(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let db = sled::open(path).unwrap();
    let out = db
        .iter()
        .map(|kv| {
            let (k, v) = kv.unwrap();
            (k.to_vec(), v.to_vec())
        })
        .collect();
    drop(db);
    out
}

#[test]
fn a_newer_format_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let store = three_pending(dir.path());
    store
        .raw_db()
        .insert(b"Mformat_version", &(FORMAT_VERSION + 1).to_be_bytes())
        .unwrap();
    store.close().unwrap();
    drop(store);
    let store_path = dir.path().join(STORE_DIR);
    // Wait for sled to let go of the lock before reading it raw.
    drop(open_raw_retry(&store_path));
    let before = raw_contents(&store_path);

    let mut result = Store::open(dir.path(), fast_opts());
    for _ in 0..200 {
        if !matches!(result, Err(StoreError::Locked(_))) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        result = Store::open(dir.path(), fast_opts());
    }
    match result {
        Err(StoreError::NewerFormat {
            found, supported, ..
        }) => assert_eq!((found, supported), (FORMAT_VERSION + 1, FORMAT_VERSION)),
        Err(e) => panic!("expected NewerFormat, got {e}"),
        Ok(_) => panic!("expected NewerFormat, the store opened"),
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    drop(open_raw_retry(&store_path));
    assert_eq!(raw_contents(&store_path), before, "records changed");
    let entries: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries, [STORE_DIR], "nothing moved aside");
}

fn open_raw_retry(path: &Path) -> sled::Db {
    for _ in 0..200 {
        match sled::open(path) {
            Ok(db) => return db,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
    sled::open(path).unwrap()
}

#[test]
fn a_store_sled_cannot_open_is_moved_aside_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let store = three_pending(dir.path());
    store.close().unwrap();
    drop(store);
    std::thread::sleep(std::time::Duration::from_millis(100));
    let store_path = dir.path().join(STORE_DIR);
    std::fs::write(store_path.join("conf"), b"this is not a sled config").unwrap();

    let (store, report) = open(dir.path(), fast_opts());
    let aside = report.moved_aside_to.clone().expect("moved aside");
    assert!(aside.starts_with(dir.path()) && aside.exists());
    assert!(report.open_error.is_some());
    // Only the config file was damaged: every record is salvaged into the fresh store.
    // (M format, next_seq, counters; per key P, I, E.)
    assert_eq!(report.salvaged_records, 3 + 3 * 3, "{report:?}");
    assert_eq!(store.stats().pending_keys, 3);
    assert_clean(&store);
    // The moved-aside copy is kept as found, and no scratch copy is left behind.
    assert_eq!(
        std::fs::read(aside.join("conf")).unwrap(),
        b"this is not a sled config"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    // A working store: the worker keeps going.
    store
        .ingest_blocking(vec![set("n", 1, &[("p", json!(1))])])
        .unwrap();
    store.compact_all().unwrap();
    let c = store.claim(ALL).unwrap().unwrap();
    assert_eq!(c.events.len(), 4);
    deliver_all(&store, &c);
    assert_clean(&store);
    let restarted = restart(store, dir.path());
    assert_eq!(
        restarted
            .delivered(&PropKey::new("n", "p"))
            .unwrap()
            .map(|d| d.ts_ms),
        Some(1)
    );
}

#[test]
fn a_running_store_is_reported_locked_not_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let store = three_pending(dir.path());
    match Store::open(dir.path(), fast_opts()) {
        Err(StoreError::Locked(_)) => {}
        Err(e) => panic!("expected Locked, got {e}"),
        Ok((_, r)) => panic!("second open succeeded: {r:?}"),
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    assert_eq!(store.stats().pending_keys, 3);
}

#[test]
fn a_store_with_garbage_files_is_moved_aside_and_a_fresh_one_works() {
    let dir = tempfile::tempdir().unwrap();
    let store = three_pending(dir.path());
    store.close().unwrap();
    drop(store);
    std::thread::sleep(std::time::Duration::from_millis(100));
    let store_path = dir.path().join(STORE_DIR);
    let garbage: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(store_path.join("conf"), &garbage[..100]).unwrap();
    std::fs::write(store_path.join("db"), &garbage).unwrap();

    let (store, report) = open(dir.path(), fast_opts());
    assert!(report.moved_aside_to.is_some(), "{report:?}");
    store
        .ingest_blocking(vec![set("n", 1, &[("p", json!(1))])])
        .unwrap();
    store.compact_all().unwrap();
    let c = store.claim(ALL).unwrap().unwrap();
    assert!(c.events.iter().any(|e| e.entity == "n"));
    deliver_all(&store, &c);
    assert_clean(&store);
}

/// sled 0.34 takes a `snap.*.generating` file (a snapshot write cut short, e.g. by a full disk
/// during an earlier open) as its newest snapshot and then reports the whole store corrupt.
/// The store removes such a torn file before opening, so nothing is moved aside or lost; a
/// complete `.generating` file (valid CRC) is left for sled.
#[test]
fn a_torn_snapshot_file_does_not_make_the_store_look_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let store = three_pending(dir.path());
    store.close().unwrap();
    drop(store);
    let store_dir = dir.path().join(STORE_DIR);
    let torn = [
        store_dir.join("snap.7FFFFFFFFFFFFFFF.generating"),
        store_dir.join("snap.7FFFFFFFFFFFFFFE.generating"),
    ];
    std::fs::write(&torn[0], b"").unwrap();
    std::fs::write(&torn[1], [7u8; 40]).unwrap(); // long enough, CRC wrong

    let (store, report) = open(dir.path(), fast_opts());
    assert!(report.moved_aside_to.is_none(), "{report:?}");
    assert!(report.open_error.is_none(), "{report:?}");
    assert_eq!(store.stats().pending_keys, 3);
    assert!(
        torn.iter().all(|p| !p.exists()),
        "torn snapshots left behind"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != STORE_DIR)
        .collect();
    assert!(left.is_empty(), "nothing may be moved aside: {left:?}");
    store.close().unwrap();
}
