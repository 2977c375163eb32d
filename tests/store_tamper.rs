//! Tamper tests: damage a closed store's records (or files) and assert the exact recovery.
//! A bad record is set aside and counted, everything else stays intact and the engine keeps
//! compacting and claiming; a store sled cannot open is moved aside and replaced.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use flux_outbox::model::PropKey;
use flux_outbox::record::FORMAT_VERSION;
use flux_outbox::store::{
    open_tree_raw, OpenReport, Outcome, Store, StoreError, ACKED_SEQ_FILE, STORE_DIR,
};
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
    let db = open_tree_raw(path).expect("open the raw tree");
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
    drop(open_tree_raw(&store_path).expect("open the raw tree"));
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
    drop(open_tree_raw(&store_path).expect("open the raw tree"));
    assert_eq!(raw_contents(&store_path), before, "records changed");
    assert_eq!(
        dir_entries(dir.path()),
        [ACKED_SEQ_FILE, STORE_DIR],
        "nothing moved aside"
    );
}

/// The names in a data directory, sorted. Besides the store it holds [`ACKED_SEQ_FILE`] (the
/// loss check's record), written at every open.
fn dir_entries(data_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Opens the store in `data_dir`, which must be moved aside: the moved-aside store is
/// `store.corrupt-<epoch ms>` beside the fresh one, named at the time of the open, and exists.
/// Returns the fresh store, the report and where the old store went.
fn open_moved_aside(data_dir: &Path) -> (Store, OpenReport, PathBuf) {
    let before_ms = now_ms();
    let (store, report) = open(data_dir, fast_opts());
    let after_ms = now_ms();
    let aside = report.moved_aside_to.clone().expect("moved aside");
    assert_eq!(aside.parent(), Some(data_dir), "{aside:?}");
    assert!(aside.is_dir(), "{aside:?} missing");
    let name = aside.file_name().unwrap().to_str().unwrap();
    let ms = name
        .strip_prefix(&format!("{STORE_DIR}.corrupt-"))
        .unwrap_or_else(|| panic!("name {name:?}"));
    assert!(ms.bytes().all(|b| b.is_ascii_digit()), "name {name:?}");
    let ms: u64 = ms.parse().unwrap();
    assert!(
        (before_ms..=after_ms).contains(&ms),
        "{ms} not within the open ({before_ms}..={after_ms})"
    );
    (store, report, aside)
}

/// Overwrites the closed store's sled config with `bytes`: sled cannot open the store.
fn spoil_sled_config(data_dir: &Path, bytes: &[u8]) {
    std::fs::write(data_dir.join(STORE_DIR).join("conf"), bytes).unwrap();
}

fn scratch_of(aside: &Path) -> PathBuf {
    let mut name = aside.as_os_str().to_owned();
    name.push(".salvage");
    name.into()
}

/// Names in the data directory that are moved-aside stores.
fn moved_aside(data_dir: &Path) -> Vec<String> {
    std::fs::read_dir(data_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{STORE_DIR}.")))
        .collect()
}

/// Closes the store, writes `f`'s changes straight into its sled tree (as damage would), and
/// waits until sled let go of it.
fn damage_closed(store: Store, dir: &Path, f: impl FnOnce(&sled::Db)) {
    store.close().unwrap();
    drop(store);
    let path = dir.join(STORE_DIR);
    let db = open_tree_raw(&path).expect("open the raw tree");
    f(&db);
    db.flush().unwrap();
    drop(db);
    drop(open_tree_raw(&path).expect("open the raw tree"));
}

#[test]
fn a_store_sled_cannot_open_is_moved_aside_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let store = three_pending(dir.path());
    store.close().unwrap();
    drop(store);
    std::thread::sleep(std::time::Duration::from_millis(100));
    spoil_sled_config(dir.path(), b"this is not a sled config");

    let (store, report, aside) = open_moved_aside(dir.path());
    assert!(report.open_error.is_some());
    // Only the config file was damaged: every record is salvaged into the fresh store.
    // (M format, next_seq, counters; per key P, I, E.)
    assert_eq!(report.salvaged_records, 3 + 3 * 3, "{report:?}");
    assert_eq!(report.salvage_set_aside, 0, "{report:?}");
    assert_eq!(store.stats().pending_keys, 3);
    assert_clean(&store);
    // The moved-aside copy is kept as found, and no scratch copy is left behind.
    assert_eq!(
        std::fs::read(aside.join("conf")).unwrap(),
        b"this is not a sled config"
    );
    let aside_name = aside.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(
        dir_entries(dir.path()),
        [ACKED_SEQ_FILE, STORE_DIR, aside_name.as_str()]
    );
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
    assert_eq!(dir_entries(dir.path()), [ACKED_SEQ_FILE, STORE_DIR]);
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

    let (store, report, aside) = open_moved_aside(dir.path());
    assert!(report.open_error.is_some(), "{report:?}");
    // Neither the store nor a copy without its conf opens: nothing is salvaged, the fresh store
    // starts empty, and the moved-aside files are kept as found for the operator.
    assert_eq!(
        (report.salvaged_records, report.salvage_set_aside),
        (0, 0),
        "{report:?}"
    );
    let s = store.stats();
    assert_eq!(
        (s.pending_keys, s.quarantine_keys, s.corrupt_set_aside),
        (0, 0, 0)
    );
    assert_eq!(std::fs::read(aside.join("db")).unwrap(), garbage);
    assert!(
        !scratch_of(&aside).exists(),
        "salvage scratch copy left behind"
    );
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
        .filter(|n| n != STORE_DIR && n != ACKED_SEQ_FILE)
        .collect();
    assert!(left.is_empty(), "nothing may be moved aside: {left:?}");
    store.close().unwrap();
}

/// A format record that is not 4 bytes is damage, not a newer version: with every other record
/// sound, it is set aside (counted, its bytes kept) and rewritten in place; nothing moves.
/// (It used to read as version u32::MAX: "newer format", the worker refused to start, and
/// systemd restarted it into the same refusal.)
#[test]
fn a_malformed_format_record_of_a_sound_store_is_set_aside_and_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let store = three_pending(dir.path());
    damage_closed(store, dir.path(), |db| {
        db.insert(b"Mformat_version", &[0u8, 0, 1][..]).unwrap();
    });

    let (store, report) = open(dir.path(), fast_opts());
    assert!(report.format_record_repaired, "{report:?}");
    assert!(report.moved_aside_to.is_none(), "{report:?}");
    assert!(moved_aside(dir.path()).is_empty());
    let db = store.raw_db();
    assert_eq!(
        db.get(b"Mformat_version").unwrap().unwrap().as_ref(),
        FORMAT_VERSION.to_be_bytes()
    );
    let x: Vec<_> = db.scan_prefix(b"X").map(|kv| kv.unwrap()).collect();
    assert_eq!(x.len(), 1);
    assert!(x[0].0.ends_with(b"Mformat_version"), "{:?}", x[0].0);
    assert_eq!(x[0].1.as_ref(), [0u8, 0, 1]);
    drop((x, db));
    let s = store.stats();
    assert_eq!(s.corrupt_set_aside, 1);
    assert_eq!((s.pending_keys, s.pending_entities), (3, 3));
    assert_eq!(s.format_version, FORMAT_VERSION);
    assert_clean(&store);

    // Repaired for good: the next open finds nothing to do, and the worker carries on.
    let c = store.claim(ALL).unwrap().unwrap();
    assert_eq!(c.events.len(), 3);
    deliver_all(&store, &c);
    store.close().unwrap();
    drop(store);
    let (store, report) = open(dir.path(), fast_opts());
    assert!(!report.format_record_repaired, "{report:?}");
    let s = store.stats();
    assert_eq!(
        (s.corrupt_set_aside, s.pending_keys, s.delivered),
        (1, 0, 3)
    );
    assert_clean(&store);
}

/// A malformed format record beside another record that fails this build's checks: the data's
/// version is unknown, so the store is kept as found (moved aside) and only what passes the
/// checks becomes live in the fresh store; the bad records are set aside there, counted.
#[test]
fn a_malformed_format_record_beside_a_bad_record_moves_the_store_aside_and_salvages() {
    let dir = tempfile::tempdir().unwrap();
    let store = three_pending(dir.path());
    let bad_p = pkey(b'P', "e2", "p");
    damage_closed(store, dir.path(), |db| {
        db.insert(b"Mformat_version", &[0u8, 0, 0, 1, 0][..])
            .unwrap();
        let mut v = db.get(&bad_p).unwrap().unwrap().to_vec();
        v[0] = 9; // an envelope version this build does not read
        db.insert(&bad_p, v).unwrap();
    });

    let (store, report, aside) = open_moved_aside(dir.path());
    assert!(
        report.open_error.as_deref().unwrap().contains("format"),
        "{report:?}"
    );
    assert!(!report.format_record_repaired);
    // Of 12 records (M format, next_seq, counters; P, I, E per key) the format record and
    // e2's P are set aside; the other 10 are copied.
    assert_eq!(
        (report.salvaged_records, report.salvage_set_aside),
        (10, 2),
        "{report:?}"
    );
    let s = store.stats();
    assert_eq!(s.corrupt_set_aside, 2);
    assert_eq!(x_records(&store), 2);
    // e2's index entry and entity count described the value set aside: rebuilt without it.
    assert_eq!((s.pending_keys, s.pending_entities), (2, 2));
    let p = pending(&store);
    assert_eq!(
        p.keys().map(|k| k.0.as_str()).collect::<Vec<_>>(),
        ["e1", "e3"]
    );
    assert_eq!(
        store
            .raw_db()
            .get(b"Mformat_version")
            .unwrap()
            .unwrap()
            .as_ref(),
        FORMAT_VERSION.to_be_bytes()
    );
    assert_clean(&store);
    assert!(!scratch_of(&aside).exists());
    store.close().unwrap();
    drop(store);
    // The moved-aside store is kept exactly as found.
    let old = raw_contents(&aside);
    assert_eq!(old[b"Mformat_version".as_slice()], [0u8, 0, 0, 1, 0]);
    assert_eq!(old[&bad_p][0], 9);
    assert_eq!(old.len(), 12);
}

/// Salvage reads in key order up to the first read error, so one cut short copies the entity
/// counts, index entries and counters (E, I, M sort before P) of pending values it never
/// reached. The moved-aside store here holds exactly that state (e2's and e3's P records are
/// gone); the fresh store must describe what it holds, not what the copied counters say.
#[test]
fn a_salvage_cut_short_is_recounted_and_reindexed_from_what_it_copied() {
    let dir = tempfile::tempdir().unwrap();
    let store = three_pending(dir.path());
    // History counters, which a recount must keep.
    let c = store.claim(ALL).unwrap().unwrap();
    let e1 = c.events.iter().find(|e| e.entity == "e1").unwrap().clone();
    settle_all(
        &store,
        &flux_outbox::store::Claim { events: vec![e1] },
        || None,
    );
    store.release(&c);
    store
        .ingest_blocking(vec![set("e1", 20, &[("p", json!("again"))])])
        .unwrap();
    store
        .ingest_blocking(vec![set("e1", 21, &[("p", json!("newest"))])])
        .unwrap();
    store.compact_all().unwrap();
    let s = store.stats();
    assert_eq!((s.pending_keys, s.delivered, s.superseded), (3, 1, 1));
    damage_closed(store, dir.path(), |db| {
        db.remove(pkey(b'P', "e2", "p")).unwrap();
        db.remove(pkey(b'P', "e3", "p")).unwrap();
    });
    spoil_sled_config(dir.path(), b"not a sled config");

    let (store, report) = open(dir.path(), fast_opts());
    assert!(report.moved_aside_to.is_some(), "{report:?}");
    // M format, next_seq, counters; D e1; E, I for e1, e2, e3; P e1.
    assert_eq!(
        (report.salvaged_records, report.salvage_set_aside),
        (3 + 1 + 3 + 3 + 1, 0),
        "{report:?}"
    );
    let s = store.stats();
    assert_eq!((s.pending_keys, s.pending_entities), (1, 1));
    assert_eq!((s.quarantine_keys, s.corrupt_set_aside), (0, 0));
    assert_eq!((s.delivered, s.superseded), (1, 1), "history kept");
    assert_clean(&store);
    assert!(store.raw_db().get(b"Mrebuild_derived").unwrap().is_none());
    let c = store.claim(ALL).unwrap().unwrap();
    assert_eq!(c.events.len(), 1);
    assert_eq!(c.events[0].entity, "e1");
    assert_eq!(c.events[0].props[0].value, json!("newest"));
    deliver_all(&store, &c);
    let store = restart(store, dir.path());
    let s = store.stats();
    assert_eq!((s.pending_keys, s.pending_entities, s.delivered), (0, 0, 2));
    assert_clean(&store);
}

/// A record failing its checks in a store sled cannot open is set aside by the salvage (not
/// copied as live), counted, and its index entry and entity count do not survive it.
#[test]
fn salvage_sets_aside_a_record_that_fails_its_checks() {
    let dir = tempfile::tempdir().unwrap();
    let store = three_pending(dir.path());
    let bad = pkey(b'P', "e3", "p");
    damage_closed(store, dir.path(), |db| {
        let mut v = db.get(&bad).unwrap().unwrap().to_vec();
        flip_last_byte(&mut v);
        db.insert(&bad, v).unwrap();
    });
    spoil_sled_config(dir.path(), b"not a sled config");

    let (store, report) = open(dir.path(), fast_opts());
    assert!(report.moved_aside_to.is_some(), "{report:?}");
    assert_eq!(
        (report.salvaged_records, report.salvage_set_aside),
        (11, 1),
        "{report:?}"
    );
    let s = store.stats();
    assert_eq!(
        (s.pending_keys, s.pending_entities, s.corrupt_set_aside),
        (2, 2, 1)
    );
    let (k, _) = store.raw_db().scan_prefix(b"X").next().unwrap().unwrap();
    assert!(k.ends_with(&bad), "{k:?}");
    assert_clean(&store);
}
