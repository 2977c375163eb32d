//! Damaged stores under the real binary: bit flips, truncation, deleted and garbage files of a
//! stopped worker's store. Whatever the damage, the worker comes up (never exits, never
//! crash-loops: a second start works too) and takes updates; where recovery can be exact it
//! is asserted (a lost snapshot loses nothing; an unreadable `conf` is moved aside and every
//! record salvaged). The record-level recovery (set aside and counted) is in store_tamper.rs.

mod harness;

use std::path::Path;

use harness::*;
use serde_json::{json, Value};

const ENTITIES: u64 = 30;
const PROPS: u64 = 10;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A stopped offline worker's data directory holding ENTITIES x PROPS pending keys.
async fn template() -> (Worker, tempfile::TempDir) {
    let mut w = Worker::new(None);
    w.start().await;
    let mut body = String::new();
    for e in 0..ENTITIES {
        for p in 0..PROPS {
            body.push_str(
                &json!({"entity": format!("scada/dmg/e{e}"), "properties": {format!("p{p}"): e * 100 + p}, "ts": 1_000})
                    .to_string(),
            );
            body.push('\n');
        }
    }
    let (s, text) = w.post("/v1/updates", "application/x-ndjson", body).await;
    assert_eq!(s, 200, "{text}");
    w.wait_compacted().await;
    w.stop().await;
    let keep = tempfile::tempdir().unwrap();
    copy_dir(&w.dir.path().join("data"), &keep.path().join("data"));
    (w, keep)
}

/// Starts a worker on a copy of the template damaged by `damage`, checks it serves, restarts
/// it once more, and returns its summary and log.
async fn run_damaged(template: &Path, damage: impl FnOnce(&Path)) -> (Value, String) {
    let mut w = Worker::new(None);
    let data = w.dir.path().join("data");
    copy_dir(&template.join("data"), &data);
    damage(&data.join("store"));
    // `start` panics if the worker exits or is not ready within the deadline.
    w.start().await;
    let (s, text) = w
        .post_json(
            "/v1/updates",
            &json!({"entity": "scada/dmg/new", "properties": {"v": 1}}),
        )
        .await;
    assert_eq!(s, 200, "a damaged store must not stop ingest: {text}");
    w.wait_compacted().await;
    let mut summary = w.summary().await;
    let lost = metric(&w.metrics().await, "flux_outbox_store_lost_updates");
    summary["lost_updates_metric"] = json!(lost as u64);
    let notes = std::fs::read_dir(&data)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("LOST-UPDATES-"))
        .count();
    summary["lost_notes"] = json!(notes);
    println!(
        "after damage: pending {} corrupt_set_aside {} moved_aside {} lost {lost} notes {notes}",
        summary["pending_keys"],
        summary["corrupt_set_aside"],
        w.log().contains("moved aside")
    );
    w.stop().await;
    // No crash loop: the store it left behind starts again, cleanly.
    let log_before = w.log().len();
    w.start().await;
    let again = w.log()[log_before..].to_string();
    assert!(
        !again.contains("moved aside") && !again.contains("CANNOT BE OPENED"),
        "the second start found the store damaged again:\n{again}"
    );
    w.stop().await;
    (summary, w.log())
}

fn pending(summary: &Value) -> u64 {
    summary["pending_keys"].as_u64().unwrap()
}

/// Keys that went missing were acknowledged updates (one each in the template): the loss
/// must be loud (log, metric, a note in the data directory) and counted exactly.
fn loss_reported(summary: &Value, log: &str, all: u64) {
    let missing = all - pending(summary);
    assert_eq!(summary["lost_updates_metric"], json!(missing), "{summary}");
    if missing > 0 {
        assert!(log.contains("THE STORE LOST ACKNOWLEDGED UPDATES"), "{log}");
        assert_eq!(summary["lost_notes"], json!(1), "{summary}");
    }
}

fn flip(path: &Path, offsets: &[u64]) {
    let mut bytes = std::fs::read(path).unwrap();
    let n = bytes.len() as u64;
    for o in offsets {
        bytes[(o % n) as usize] ^= 0xA5;
    }
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_never_stops_the_worker() {
    let (_w, t) = template().await;
    let all = ENTITIES * PROPS + 1; // + the key each run ingests

    // Snapshot files are an optimisation: without them sled replays its log, nothing is lost.
    let (s, _) = run_damaged(t.path(), |store| {
        for e in std::fs::read_dir(store).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with("snap.") {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
    })
    .await;
    assert_eq!(pending(&s), all, "{s}");
    loss_reported(&s, "", all);

    // An unreadable `conf`: moved aside, every record salvaged into a fresh store.
    let (s, log) = run_damaged(t.path(), |store| {
        std::fs::write(store.join("conf"), b"\xff\xfe not a sled config").unwrap();
    })
    .await;
    assert!(log.contains("moved aside"), "{log}");
    assert_eq!(pending(&s), all, "salvage should keep every record: {s}");

    // A deleted `conf`: sled writes a new one; the data stays.
    let (s, _) = run_damaged(t.path(), |store| {
        std::fs::remove_file(store.join("conf")).unwrap();
    })
    .await;
    assert_eq!(pending(&s), all, "{s}");

    // Damage to the data file itself: what survives depends on where it hits (sled cuts its
    // log at the first bad checksum); the worker must come up and keep working regardless.
    let db_len = std::fs::metadata(t.path().join("data/store/db"))
        .unwrap()
        .len();
    for seed in 1..=6u64 {
        let offsets: Vec<u64> = (0..8).map(|i| seed * 7919 + i * 104_729).collect();
        let (s, log) = run_damaged(t.path(), |store| flip(&store.join("db"), &offsets)).await;
        assert!(pending(&s) >= 1 && pending(&s) <= all, "{s}");
        loss_reported(&s, &log, all);
    }
    for keep in [db_len / 2, 100, 0] {
        let (s, log) = run_damaged(t.path(), |store| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(store.join("db"))
                .unwrap();
            f.set_len(keep).unwrap();
        })
        .await;
        loss_reported(&s, &log, all);
    }
    let (s, log) = run_damaged(t.path(), |store| {
        std::fs::remove_file(store.join("db")).unwrap();
    })
    .await;
    loss_reported(&s, &log, all);

    // The whole store directory replaced by a file: moved aside, a fresh store started.
    let (s, log) = run_damaged(t.path(), |store| {
        std::fs::remove_dir_all(store).unwrap();
        std::fs::write(store, b"not a directory").unwrap();
    })
    .await;
    assert!(log.contains("moved aside"), "{log}");
    loss_reported(&s, &log, all);
    assert_eq!(pending(&s), 1, "{s}");
}
