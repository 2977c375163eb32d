//! Acceptance tests of `outbox-dump`: a store is filled with known content through the library
//! (pending, quarantined, superseded, late-dropped, a delete, an uncompacted log tail, values
//! that have waited for hours), closed, and the built binary is run against it offline and,
//! with the worker running in-process, live; both must print the same. The damaged variant of
//! the fixture adds corrupted records (a pending value and a log record) and every command is
//! run against it too; more corruptions are planted in copies of the store for `verify`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flux_outbox::app::Running;
use flux_outbox::config::Config;
use flux_outbox::model::{Update, UpdateOp};
use flux_outbox::record::{self, Counters, PendingRecord, QuarantineRecord};
use flux_outbox::store::{
    ClaimLimits, LogRow, Outcome, Row, Settlement, Stats, Store, StoreOptions,
};
use serde_json::{json, Value};

/// Source times of the fixture: fixed, so they can be asserted exactly.
const T: u64 = 1_700_000_000_000;
const HOUR_MS: u64 = 3_600_000;

/// `keyenc` of the store: prefix, entity length (u32 BE), entity, property.
fn key_of(prefix: u8, entity: &str, property: &str) -> Vec<u8> {
    let mut k = vec![prefix];
    k.extend_from_slice(&(entity.len() as u32).to_be_bytes());
    k.extend_from_slice(entity.as_bytes());
    k.extend_from_slice(property.as_bytes());
    k
}

fn log_key(seq: u64) -> Vec<u8> {
    let mut k = vec![b'L'];
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Makes a value look as if it had waited `by_ms` longer (re-encoded, so the record is valid).
fn age_pending(db: &sled::Db, entity: &str, property: &str, by_ms: u64) {
    let k = key_of(b'P', entity, property);
    let raw = db.get(&k).expect("get").expect("pending record");
    let mut p: PendingRecord = record::decode(&raw).expect("decodes");
    p.pending_since_ms -= by_ms;
    db.insert(k, record::encode(&p)).expect("insert");
}

fn age_quarantined(db: &sled::Db, entity: &str, property: &str, by_ms: u64) {
    let k = key_of(b'Q', entity, property);
    let raw = db.get(&k).expect("get").expect("quarantine record");
    let mut q: QuarantineRecord = record::decode(&raw).expect("decodes");
    q.pending.pending_since_ms -= by_ms;
    db.insert(k, record::encode(&q)).expect("insert");
}

fn set(entity: &str, props: Value, ts_ms: u64) -> Update {
    let map = props
        .as_object()
        .expect("test props are an object")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Update {
        entity: entity.into(),
        op: UpdateOp::Set(map),
        ts_ms,
        stream: None,
        source: None,
    }
}

fn delete(entity: &str, ts_ms: u64) -> Update {
    Update {
        entity: entity.into(),
        op: UpdateOp::Delete,
        ts_ms,
        stream: None,
        source: None,
    }
}

/// What the library itself says about the fixture, captured before the store is closed.
struct Fixture {
    pending: Vec<Row>,
    quarantine: Vec<Row>,
    log: Vec<LogRow>,
    stats: Stats,
}

/// Fills `data_dir` with the known content and closes the store.
fn build_fixture(data_dir: &Path) -> Fixture {
    let (store, _) = Store::open(data_dir, StoreOptions::default()).expect("open store");
    let ingest = |u: Vec<Update>| store.ingest_blocking(u).expect("ingest");
    // seq 1, 2
    ingest(vec![
        set("e1", json!({"temp": 20.5, "mode": "auto"}), T + 1000),
        set("e2", json!({"level": 3}), T + 1000),
    ]);
    store.compact_all().expect("compact");
    // seq 3 supersedes e1.temp; seq 4 is older than it: superseded too, and discarded.
    ingest(vec![set("e1", json!({"temp": 21.0}), T + 2000)]);
    ingest(vec![set("e1", json!({"temp": 19.0}), T + 500)]);
    store.compact_all().expect("compact");
    // seq 5, 6: q1 gets quarantined, d1 delivered, e2 fails once.
    ingest(vec![
        set("q1", json!({"x": 1}), T + 1000),
        set("d1", json!({"v": 1}), T),
    ]);
    store.compact_all().expect("compact");
    let claim = store
        .claim(ClaimLimits {
            events_max: 100,
            bytes_max: 1 << 20,
        })
        .expect("claim")
        .expect("something to claim");
    let mut settlements = Vec::new();
    for ev in &claim.events {
        for p in &ev.props {
            let outcome = match ev.entity.as_str() {
                "q1" => Outcome::Quarantine {
                    reason: "rejected: bad value".into(),
                    http_status: Some(400),
                },
                "d1" => Outcome::Delivered {
                    value_hash: flux_outbox::model::value_hash(&p.value),
                },
                "e2" => Outcome::Retry {
                    error: "connection refused".into(),
                },
                _ => continue,
            };
            settlements.push(Settlement {
                key: flux_outbox::model::PropKey::new(ev.entity.clone(), p.name.clone()),
                sent: p.pending.clone(),
                outcome,
            });
        }
    }
    store.settle(settlements).expect("settle");
    store.release(&claim);
    // seq 7: older than what was delivered: late-dropped.
    ingest(vec![set("d1", json!({"v": 0}), T - 1)]);
    // seq 8, 9: a delete supersedes the entity's older property.
    ingest(vec![set("gone", json!({"a": 1}), T + 1000)]);
    ingest(vec![delete("gone", T + 3000)]);
    store.compact_all().expect("compact");
    // seq 10, 11: the uncompacted tail.
    ingest(vec![set("e3", json!({"p": "tail"}), T + 4000)]);
    ingest(vec![set("e1", json!({"mode": "manual"}), T + 5000)]);
    // e1 and e2 have waited 3 hours and q1 2 hours (`--older-than` has something to show and
    // something to leave out); "gone" and the tail are fresh.
    let db = store.raw_db();
    for (e, p) in [("e1", "mode"), ("e1", "temp"), ("e2", "level")] {
        age_pending(&db, e, p, 3 * HOUR_MS);
    }
    age_quarantined(&db, "q1", "x", 2 * HOUR_MS);
    let fixture = Fixture {
        pending: store.pending_rows(None, None, usize::MAX).expect("rows"),
        quarantine: store.quarantine_rows(None, usize::MAX).expect("rows"),
        log: store.log_rows(usize::MAX).expect("rows"),
        stats: store.stats(),
    };
    store.close().expect("close");
    drop(store);
    fixture
}

fn dump_cmd() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-dump"));
    // The tests' own environment must not steer the tool.
    c.env_remove("FLUX_OUTBOX_ADMIN_TOKEN")
        .env_remove("FLUX_OUTBOX_DATA_DIR");
    c
}

/// Runs the tool. With `--data-dir`, a store the test itself has just closed may still be
/// locked for a moment (sled lets go of its file lock when its last thread ends): retried until
/// the lock is gone.
fn run(args: &[&str]) -> Output {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = dump_cmd().args(args).output().expect("run outbox-dump");
        let locked = stderr(&o).contains("is locked by another process");
        if !(locked && args.contains(&"--data-dir") && Instant::now() < deadline) {
            return o;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = dump_cmd();
    for (k, v) in env {
        c.env(k, v);
    }
    c.args(args).output().expect("run outbox-dump")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs and parses JSON, asserting exit 0.
fn json_of(args: &[&str]) -> Value {
    let o = run(args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}\n{}",
        stderr(&o),
        stdout(&o)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", stdout(&o)))
}

fn offline(dir: &Path, args: &[&str]) -> Value {
    let d = dir.to_string_lossy().into_owned();
    let mut a = vec!["--data-dir", d.as_str(), "--format", "json"];
    a.extend_from_slice(args);
    json_of(&a)
}

fn live(admin: &str, args: &[&str]) -> Value {
    let mut a = vec!["--admin", admin, "--format", "json"];
    a.extend_from_slice(args);
    json_of(&a)
}

/// Drops what depends on the clock, the process or the disk layout rather than the content:
/// top-level fields of the output object, or of each row (never inside a row's values).
fn strip(v: &Value) -> Value {
    const VOLATILE: &[&str] = &[
        "age",
        "age_ms",
        "oldest_pending_age",
        "oldest_pending_age_ms",
        "disk_bytes",
        "mode",
        "source",
        "link",
        "last_delivery_ms",
        "last_delivery",
    ];
    let obj = |v: &Value| match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !VOLATILE.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        other => other.clone(),
    };
    match v {
        Value::Array(a) => Value::Array(a.iter().map(obj).collect()),
        other => obj(other),
    }
}

fn rfc(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn pending_since(f: &Fixture, entity: &str, property: &str) -> u64 {
    f.pending
        .iter()
        .chain(&f.quarantine)
        .find(|r| r.entity == entity && r.property == property)
        .map(|r| r.pending_since_ms)
        .expect("row in fixture")
}

// One argument per column of the row: the call sites read like the expected table.
#[allow(clippy::too_many_arguments)]
fn expected_pending_row(
    f: &Fixture,
    entity: &str,
    property: &str,
    value: Value,
    ts: u64,
    seq: u64,
    attempts: u32,
    last_error: Option<&str>,
) -> Value {
    let since = pending_since(f, entity, property);
    json!({
        "entity": entity, "property": property, "value": value,
        "ts_ms": ts, "ts": rfc(ts), "seq": seq,
        "pending_since_ms": since, "pending_since": rfc(since),
        "attempts": attempts, "last_error": last_error,
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// the worker, in-process

struct Worker {
    rt: tokio::runtime::Runtime,
    running: Running,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<mpsc::Receiver<Result<(), String>>>,
}

fn worker_config(data_dir: &Path, extra: &str) -> Config {
    let text = format!(
        "data_dir = {:?}\ngateway_id = \"test\"\n[ingest]\nlisten = \"127.0.0.1:0\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n{extra}",
        data_dir.to_string_lossy()
    );
    let mut cfg = Config::from_toml_str(&text, "test config").expect("config parses");
    cfg.resolve().expect("config resolves");
    cfg.validate().expect("config valid");
    cfg
}

impl Worker {
    fn start(cfg: Config) -> Worker {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        Self::start_in(rt, cfg)
    }

    fn start_in(rt: tokio::runtime::Runtime, cfg: Config) -> Worker {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel::<Running>();
        let (done_tx, done_rx) = mpsc::channel();
        rt.spawn(async move {
            let r = flux_outbox::app::run(
                cfg,
                async {
                    let _ = stop_rx.await;
                },
                move |r| {
                    let _ = ready_tx.send(r.clone());
                },
            )
            .await;
            let r = r.map_err(|e| e.to_string()).and_then(|exit| match exit {
                flux_outbox::app::Exit::Stopped => Ok(()),
                other => Err(format!("unexpected exit {other:?}")),
            });
            let _ = done_tx.send(r);
        });
        let running = match ready_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(r) => r,
            Err(_) => panic!(
                "worker did not start: {:?}",
                done_rx.recv_timeout(Duration::from_secs(1))
            ),
        };
        Worker {
            rt,
            running,
            stop: Some(stop_tx),
            done: Some(done_rx),
        }
    }

    fn admin(&self) -> String {
        format!("http://{}", self.running.admin_addr)
    }

    fn wait_compacted(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.running.store.stats().log_backlog > 0 {
            assert!(Instant::now() < deadline, "worker did not compact");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take() {
            let r = d
                .recv_timeout(Duration::from_secs(30))
                .expect("worker stops");
            r.expect("worker ran cleanly");
        }
        self.rt.shutdown_timeout(Duration::from_secs(5));
    }
}

// ---------------------------------------------------------------------------------------------
// offline: exact output

#[test]
fn offline_commands_print_the_store_exactly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let f = build_fixture(&dir);

    let summary = offline(&dir, &["summary"]);
    let oldest = f.stats.oldest_pending_ms.expect("something pending");
    assert_eq!(
        strip(&summary),
        json!({
            "pending_keys": 4, "pending_entities": 3,
            "oldest_pending_ms": oldest, "oldest_pending": rfc(oldest),
            "log_backlog": 2, "quarantine_keys": 1,
            "superseded": 3, "late_dropped": 1, "delivered": 1,
            "quarantined_total": 1, "requeued": 0, "corrupt_set_aside": 0,
            "in_flight_entities": 0, "next_seq": 12, "format_version": 1,
        })
    );
    assert_eq!(summary["mode"], "offline");
    assert_eq!(summary["link"], Value::Null);
    assert!(summary["disk_bytes"].as_u64().unwrap_or(0) > 0);
    assert!(summary["oldest_pending_age"].is_string());

    // Delivery order: first arrival of the key (superseding keeps its place).
    let pending = offline(&dir, &["pending"]);
    assert_eq!(
        strip(&pending),
        json!([
            expected_pending_row(&f, "e1", "mode", json!("auto"), T + 1000, 1, 0, None),
            expected_pending_row(&f, "e1", "temp", json!(21.0), T + 2000, 3, 0, None),
            expected_pending_row(
                &f,
                "e2",
                "level",
                json!(3),
                T + 1000,
                2,
                1,
                Some("connection refused")
            ),
            expected_pending_row(&f, "gone", "__deleted__", json!(true), T + 3000, 9, 0, None),
        ])
    );
    assert!(pending[0]["age"].is_string() && pending[0]["age_ms"].is_u64());
    // Filters and limit.
    let e1 = offline(&dir, &["pending", "--entity", "e", "--limit", "2"]);
    assert_eq!(
        strip(&e1),
        json!([
            expected_pending_row(&f, "e1", "mode", json!("auto"), T + 1000, 1, 0, None),
            expected_pending_row(&f, "e1", "temp", json!(21.0), T + 2000, 3, 0, None),
        ])
    );
    // Age: e1 and e2 have waited 3 hours, "gone" is fresh.
    let aged = json!([
        expected_pending_row(&f, "e1", "mode", json!("auto"), T + 1000, 1, 0, None),
        expected_pending_row(&f, "e1", "temp", json!(21.0), T + 2000, 3, 0, None),
        expected_pending_row(
            &f,
            "e2",
            "level",
            json!(3),
            T + 1000,
            2,
            1,
            Some("connection refused")
        ),
    ]);
    assert_eq!(
        strip(&offline(&dir, &["pending", "--older-than", "1h"])),
        aged
    );
    assert_eq!(
        strip(&offline(
            &dir,
            &["pending", "--older-than", "2h 30m", "--entity", "e2"]
        )),
        json!([aged[2]])
    );
    assert_eq!(
        strip(&offline(
            &dir,
            &["pending", "--older-than", "1h", "--limit", "1"]
        )),
        json!([aged[0]])
    );
    assert_eq!(offline(&dir, &["pending", "--older-than", "4h"]), json!([]));

    let q = &f.quarantine[0];
    let at = q.quarantined_at_ms.expect("quarantined at");
    let since = q.pending_since_ms;
    assert_eq!(
        strip(&offline(&dir, &["quarantine"])),
        json!([{
            "entity": "q1", "property": "x", "value": 1,
            "ts_ms": T + 1000, "ts": rfc(T + 1000), "seq": 5,
            "pending_since_ms": since, "pending_since": rfc(since),
            "attempts": 0, "last_error": "rejected: bad value",
            "reason": "rejected: bad value", "http_status": 400,
            "quarantined_at_ms": at, "quarantined_at": rfc(at),
        }])
    );
    assert_eq!(offline(&dir, &["quarantine", "--entity", "zz"]), json!([]));
    // q1 has waited 2 hours since it first became pending.
    assert_eq!(
        strip(&offline(&dir, &["quarantine", "--older-than", "1h"])),
        strip(&offline(&dir, &["quarantine"]))
    );
    assert_eq!(
        offline(&dir, &["quarantine", "--older-than", "3h"]),
        json!([])
    );

    let arrived: Vec<u64> = f.log.iter().map(|r| r.arrived_ms).collect();
    assert_eq!(
        strip(&offline(&dir, &["log"])),
        json!([
            {"seq": 10, "entity": "e3", "delete": false, "properties": {"p": "tail"},
             "ts_ms": T + 4000, "ts": rfc(T + 4000),
             "arrived_ms": arrived[0], "arrived": rfc(arrived[0])},
            {"seq": 11, "entity": "e1", "delete": false, "properties": {"mode": "manual"},
             "ts_ms": T + 5000, "ts": rfc(T + 5000),
             "arrived_ms": arrived[1], "arrived": rfc(arrived[1])},
        ])
    );
    assert_eq!(
        strip(&offline(&dir, &["log", "--limit", "1"]))
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    let verify = offline(&dir, &["verify"]);
    assert_eq!(verify["ok"], true, "{verify}");
    assert_eq!(verify["problems"], json!([]));

    // Export folds the tail in memory: e1.mode is "manual", e3 is there.
    let o = run(&["--data-dir", &dir.to_string_lossy(), "export"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).expect("NDJSON line"))
        .collect();
    assert_eq!(
        lines,
        vec![
            json!({"entity": "e1", "properties": {"temp": 21.0}, "ts": T + 2000}),
            json!({"entity": "e1", "properties": {"mode": "manual"}, "ts": T + 5000}),
            json!({"entity": "e2", "properties": {"level": 3}, "ts": T + 1000}),
            json!({"entity": "e3", "properties": {"p": "tail"}, "ts": T + 4000}),
            json!({"entity": "gone", "delete": true, "ts": T + 3000}),
        ]
    );
    let o = run(&[
        "--data-dir",
        &dir.to_string_lossy(),
        "export",
        "--quarantine",
    ]);
    assert_eq!(
        stdout(&o),
        format!(
            "{}\n",
            json!({"entity": "q1", "properties": {"x": 1}, "ts": T + 1000})
        )
    );

    // NDJSON: one object per line; table: aligned, with ages and RFC 3339.
    let o = run(&[
        "--data-dir",
        &dir.to_string_lossy(),
        "--format",
        "ndjson",
        "pending",
    ]);
    assert_eq!(stdout(&o).lines().count(), 4);
    let o = run(&[
        "--data-dir",
        &dir.to_string_lossy(),
        "--format",
        "table",
        "pending",
    ]);
    let table = stdout(&o);
    assert!(table.starts_with("ENTITY"), "{table}");
    assert!(table.contains(&rfc(T + 2000)) && table.contains("connection refused"));
    assert!(table.contains("4 pending keys"), "{table}");
    let o = run(&[
        "--data-dir",
        &dir.to_string_lossy(),
        "--format",
        "table",
        "summary",
    ]);
    assert!(
        stdout(&o).contains("4 keys in 3 entities"),
        "{}",
        stdout(&o)
    );

    // Nothing above wrote to the store: the tail is still there, uncompacted.
    assert_eq!(offline(&dir, &["summary"])["log_backlog"], 2);
    assert_eq!(strip(&offline(&dir, &["summary"])), strip(&summary));
}

#[test]
fn offline_requeue_moves_quarantine_back_to_pending() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    build_fixture(&dir);
    assert_eq!(
        offline(&dir, &["requeue", "--entity", "nomatch"]),
        json!({"requeued": 0})
    );
    assert_eq!(
        offline(&dir, &["requeue", "--entity", "q"]),
        json!({"requeued": 1})
    );
    assert_eq!(offline(&dir, &["quarantine"]), json!([]));
    let pending = offline(&dir, &["pending", "--entity", "q1"]);
    assert_eq!(pending[0]["property"], "x");
    assert_eq!(pending[0]["value"], 1);
    assert_eq!(pending[0]["attempts"], 0);
    let s = offline(&dir, &["summary"]);
    assert_eq!(
        (s["quarantine_keys"].clone(), s["requeued"].clone()),
        (json!(0), json!(1))
    );
    let o = run(&["--data-dir", &dir.to_string_lossy(), "requeue"]);
    assert!(!o.status.success());
}

// ---------------------------------------------------------------------------------------------
// live: same output as offline

#[test]
fn live_output_equals_offline_output() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    build_fixture(&dir);

    // The running worker compacts the tail; compare with offline output of the same content.
    let worker = Worker::start(worker_config(&dir, ""));
    worker.wait_compacted();
    let admin = worker.admin();
    let commands: Vec<Vec<&str>> = vec![
        vec!["summary"],
        vec!["pending"],
        vec!["pending", "--entity", "e", "--limit", "2"],
        vec!["pending", "--older-than", "1h"],
        vec!["pending", "--older-than", "4h"],
        vec!["quarantine"],
        vec!["quarantine", "--entity", "q"],
        vec!["quarantine", "--older-than", "1h"],
        vec!["quarantine", "--older-than", "3h"],
        vec!["log"],
        vec!["verify"],
    ];
    let live_out: Vec<Value> = commands.iter().map(|c| live(&admin, c)).collect();
    assert_eq!(
        live_out[3].as_array().map(Vec::len),
        Some(3),
        "{}",
        live_out[3]
    );
    assert_eq!(live_out[4], json!([]));
    assert_eq!(
        live_out[7].as_array().map(Vec::len),
        Some(1),
        "{}",
        live_out[7]
    );
    assert_eq!(live_out[8], json!([]));
    let export_live = stdout(&run(&["--admin", &admin, "export"]));
    let export_q_live = stdout(&run(&["--admin", &admin, "export", "--quarantine"]));
    let summary = &live_out[0];
    assert_eq!(summary["mode"], "live");
    assert_eq!(
        summary["link"], "offline",
        "no Flux URL: the worker only buffers"
    );
    assert_eq!(summary["log_backlog"], 0);
    assert_eq!(summary["pending_keys"], 5);

    // Locked store + config naming the admin listener: the tool goes live by itself.
    let cfg_path = tmp.path().join("tool.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "data_dir = {:?}\n[admin]\nlisten = \"{}\"\n",
            dir.to_string_lossy(),
            worker.running.admin_addr
        ),
    )
    .expect("write config");
    let auto = json_of(&[
        "--config",
        &cfg_path.to_string_lossy(),
        "--format",
        "json",
        "pending",
    ]);
    assert_eq!(strip(&auto), strip(&live_out[1]));
    worker.stop();

    let offline_out: Vec<Value> = commands.iter().map(|c| offline(&dir, c)).collect();
    for ((c, l), o) in commands.iter().zip(&live_out).zip(&offline_out) {
        assert_eq!(strip(l), strip(o), "live and offline differ for {c:?}");
    }
    assert_eq!(offline_out[0]["mode"], "offline");
    let d = dir.to_string_lossy().into_owned();
    assert_eq!(stdout(&run(&["--data-dir", &d, "export"])), export_live);
    assert_eq!(
        stdout(&run(&["--data-dir", &d, "export", "--quarantine"])),
        export_q_live
    );
    assert!(export_live.contains("\"manual\""), "{export_live}");
}

#[test]
fn live_requeue_and_admin_token() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    build_fixture(&dir);
    let token = "s3cret-admin-token";
    let worker = Worker::start(worker_config(&dir, &format!("token = {token:?}\n")));
    let admin = worker.admin();
    // Without the token: a clear refusal that does not print any token.
    let o = run(&["--admin", &admin, "summary"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("401"), "{}", stderr(&o));
    let o = run_env(
        &[
            "--admin",
            &admin,
            "--admin-token",
            "not-the-token-XYZ",
            "summary",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("refused"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("not-the-token-XYZ") && !stderr(&o).contains(token));
    // With it, from the environment.
    let env = [("FLUX_OUTBOX_ADMIN_TOKEN", token)];
    let o = run_env(
        &["--admin", &admin, "--format", "json", "requeue", "--all"],
        &env,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        serde_json::from_slice::<Value>(&o.stdout).expect("json"),
        json!({"requeued": 1})
    );
    let o = run_env(&["--admin", &admin, "--format", "json", "quarantine"], &env);
    assert_eq!(
        serde_json::from_slice::<Value>(&o.stdout).expect("json"),
        json!([])
    );
    assert!(!stdout(&o).contains(token) && !stderr(&o).contains(token));
    worker.stop();
    assert_eq!(offline(&dir, &["summary"])["requeued"], 1);
}

/// A store whose keys are all quarantined, under entities that share prefixes in different
/// ways: `site-a/t1` (x, y) and `site-a/t2` (x) start with `site-a`; `site-b/t1` does not, nor
/// does `xsite-a/t1`, which only contains it.
fn build_quarantine_only(data_dir: &Path) {
    let (store, _) = Store::open(data_dir, StoreOptions::default()).expect("open store");
    store
        .ingest_blocking(vec![
            set("site-a/t1", json!({"x": 1, "y": 2}), T + 1000),
            set("site-a/t2", json!({"x": 3}), T + 1000),
            set("site-b/t1", json!({"x": 4}), T + 1000),
            set("xsite-a/t1", json!({"x": 5}), T + 1000),
        ])
        .expect("ingest");
    store.compact_all().expect("compact");
    while let Some(claim) = store
        .claim(ClaimLimits {
            events_max: 100,
            bytes_max: 1 << 20,
        })
        .expect("claim")
    {
        let mut settlements = Vec::new();
        for ev in &claim.events {
            for p in &ev.props {
                settlements.push(Settlement {
                    key: flux_outbox::model::PropKey::new(ev.entity.clone(), p.name.clone()),
                    sent: p.pending.clone(),
                    outcome: Outcome::Quarantine {
                        reason: "rejected: test".into(),
                        http_status: Some(400),
                    },
                });
            }
        }
        store.settle(settlements).expect("settle");
        store.release(&claim);
    }
    assert_eq!(store.stats().quarantine_keys, 5);
    store.close().expect("close");
}

/// (entity, property, value) of each row of a listing, in its order.
fn keys_of(listing: &Value) -> Vec<(String, String, Value)> {
    listing
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r["entity"].as_str().expect("entity").to_string(),
                r["property"].as_str().expect("property").to_string(),
                r["value"].clone(),
            )
        })
        .collect()
}

#[test]
fn live_requeue_by_entity_prefix_moves_exactly_the_matching_keys() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    build_quarantine_only(&dir);
    let worker = Worker::start(worker_config(&dir, ""));
    let admin = worker.admin();
    let k = |e: &str, p: &str, v: i64| (e.to_string(), p.to_string(), json!(v));

    assert_eq!(
        live(&admin, &["requeue", "--entity", "nomatch"]),
        json!({"requeued": 0})
    );
    let o = run(&[
        "--admin", &admin, "--format", "table", "requeue", "--entity", "site-a",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "requeued 3 keys (moved from quarantine back to pending)\n"
    );
    // Moved back: exactly the keys whose entity starts with the prefix, values intact.
    assert_eq!(
        keys_of(&live(&admin, &["pending"])),
        vec![
            k("site-a/t1", "x", 1),
            k("site-a/t1", "y", 2),
            k("site-a/t2", "x", 3)
        ]
    );
    assert_eq!(
        keys_of(&live(&admin, &["quarantine"])),
        vec![k("site-b/t1", "x", 4), k("xsite-a/t1", "x", 5)]
    );
    let s = live(&admin, &["summary"]);
    assert_eq!(
        (&s["pending_keys"], &s["quarantine_keys"], &s["requeued"]),
        (&json!(3), &json!(2), &json!(3))
    );
    // Nothing left under the prefix.
    assert_eq!(
        live(&admin, &["requeue", "--entity", "site-a"]),
        json!({"requeued": 0})
    );
    worker.stop();
    // The move is durable and consistent: the stopped store reads the same.
    assert_eq!(
        keys_of(&offline(&dir, &["quarantine"])),
        vec![k("site-b/t1", "x", 4), k("xsite-a/t1", "x", 5)]
    );
    assert_eq!(offline(&dir, &["verify"])["problems"], json!([]));
}

// ---------------------------------------------------------------------------------------------
// export to another worker

#[test]
fn export_posted_to_a_second_worker_reaches_flux() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    build_fixture(&dir);
    let o = run(&["--data-dir", &dir.to_string_lossy(), "export"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let backlog = o.stdout;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let sim = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        flux_outbox::sim::start(flux_outbox::sim::SimConfig::default(), listener)
            .await
            .expect("sim starts")
    });
    let dir2 = tmp.path().join("data2");
    let cfg = worker_config(
        &dir2,
        &format!(
            "[flux]\nurl = {:?}\n[flush]\ninterval = \"100ms\"\nbackoff_initial = \"50ms\"\n",
            sim.url()
        ),
    );
    let worker = Worker::start_in(rt, cfg);
    let url = format!("http://{}/v1/updates", worker.running.ingest_addr);
    let status = worker.rt.block_on(async {
        let resp = reqwest::Client::new()
            .post(&url)
            .header("content-type", "application/x-ndjson")
            .body(backlog)
            .send()
            .await
            .expect("post backlog");
        let s = resp.status();
        (s, resp.text().await.unwrap_or_default())
    });
    assert!(status.0.is_success(), "{status:?}");

    // The first worker's pending newest values, after its log is folded.
    let mut expected: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
    for (e, p, v) in [
        ("e1", "mode", json!("manual")),
        ("e1", "temp", json!(21.0)),
        ("e2", "level", json!(3)),
        ("e3", "p", json!("tail")),
    ] {
        expected
            .entry(e.to_string())
            .or_default()
            .insert(p.to_string(), v);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = sim.entities();
        let drained = worker.running.store.stats().pending_keys == 0;
        if got == expected && drained {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Flux state {got:?} != {expected:?} (drained: {drained})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    worker.stop();
}

// ---------------------------------------------------------------------------------------------
// verify finds planted corruption

/// Opens a store's sled tree directly, to plant damage. Retries for up to 2 s while sled's
/// background threads of a store this process just closed still hold its lock.
fn open_raw(path: &Path) -> sled::Db {
    flux_outbox::store::open_tree_raw(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Copies the healthy fixture, lets `tamper` change raw records, and runs verify.
fn verify_tampered(fixture: &Path, name: &str, tamper: impl FnOnce(&sled::Db)) -> (i32, Value) {
    let dir = fixture.parent().expect("parent").join(name);
    copy_dir(fixture, &dir);
    {
        let db = open_raw(&dir.join("store"));
        tamper(&db);
        db.flush().expect("flush");
    }
    let d = dir.to_string_lossy().into_owned();
    let o = run(&["--data-dir", &d, "--format", "json", "verify"]);
    let v = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("verify output not JSON ({e}): {}", stderr(&o)));
    (o.status.code().unwrap_or(-1), v)
}

fn first_key(db: &sled::Db, prefix: &[u8]) -> Vec<u8> {
    db.scan_prefix(prefix)
        .keys()
        .next()
        .expect("a record with the prefix")
        .expect("readable")
        .to_vec()
}

fn problems(v: &Value) -> String {
    v["problems"].to_string()
}

#[test]
fn verify_finds_each_planted_corruption() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("healthy");
    build_fixture(&dir);
    let d = dir.to_string_lossy().into_owned();
    let o = run(&["--data-dir", &d, "--format", "json", "verify"]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));

    // A bit flip in a pending value.
    let (code, v) = verify_tampered(&dir, "flip", |db| {
        let k = first_key(db, b"P");
        let mut val = db.get(&k).expect("get").expect("value").to_vec();
        let last = val.len() - 1;
        val[last] ^= 0x01;
        db.insert(k, val).expect("insert");
    });
    assert_eq!(code, 1);
    assert!(problems(&v).contains("checksum mismatch"), "{v}");

    // A truncated value (quarantine record cut to 3 bytes).
    let (code, v) = verify_tampered(&dir, "truncated", |db| {
        let k = first_key(db, b"Q");
        let val = db.get(&k).expect("get").expect("value").to_vec();
        db.insert(k, &val[..3]).expect("insert");
    });
    assert_eq!(code, 1);
    assert!(problems(&v).contains("record too short (3 bytes)"), "{v}");

    // A counter that disagrees with the contents.
    let (code, v) = verify_tampered(&dir, "counter", |db| {
        let raw = db.get(b"Mcounters").expect("get").expect("counters");
        let mut c: Counters = record::decode(&raw).expect("counters decode");
        c.pending_keys += 5;
        db.insert(b"Mcounters", record::encode(&c)).expect("insert");
    });
    assert_eq!(code, 1);
    assert!(
        problems(&v).contains("counter pending_keys = 9 but 4 pending records"),
        "{v}"
    );

    // An index entry without a pending value.
    let (code, v) = verify_tampered(&dir, "index", |db| {
        let mut k = vec![b'I'];
        k.extend_from_slice(&99u64.to_be_bytes());
        k.extend_from_slice(&5u32.to_be_bytes());
        k.extend_from_slice(b"ghostprop");
        db.insert(k, Vec::<u8>::new()).expect("insert");
    });
    assert_eq!(code, 1);
    assert!(
        problems(&v).contains("index entry 99") && problems(&v).contains("without a pending value"),
        "{v}"
    );

    // A pending value missing from the delivery index (it would never be sent).
    let e2 = flux_outbox::model::PropKey::new("e2".to_string(), "level".to_string());
    let (code, v) = verify_tampered(&dir, "unindexed", |db| {
        let mut k = vec![b'I'];
        k.extend_from_slice(&2u64.to_be_bytes());
        k.extend_from_slice(&key_of(b'P', "e2", "level")[1..]);
        assert!(
            db.remove(k).expect("remove").is_some(),
            "e2.level's index entry"
        );
    });
    assert_eq!(code, 1);
    assert_eq!(
        v["problems"],
        json!([format!(
            "pending key {:?} missing from the delivery index",
            Some(&e2)
        )])
    );

    // An entity count that disagrees with the entity's pending keys, and one that is missing.
    let (code, v) = verify_tampered(&dir, "entitycount", |db| {
        db.insert(b"Ee1", &7u64.to_be_bytes()).expect("insert");
    });
    assert_eq!(code, 1);
    assert_eq!(
        v["problems"],
        json!(["entity \"e1\": count says 7 pending keys, found 2"])
    );
    let (code, v) = verify_tampered(&dir, "entitymissing", |db| {
        assert!(db.remove(b"Ee2").expect("remove").is_some(), "e2's count");
    });
    assert_eq!(code, 1);
    assert_eq!(
        v["problems"],
        json!(["entity \"e2\" has pending keys but no count record"])
    );

    // An unknown record version, and an unknown (older) store format version.
    let (code, v) = verify_tampered(&dir, "recversion", |db| {
        let k = first_key(db, b"D");
        let mut val = db.get(&k).expect("get").expect("value").to_vec();
        val[0] = 9;
        db.insert(k, val).expect("insert");
    });
    assert_eq!(code, 1);
    assert!(problems(&v).contains("unknown record version 9"), "{v}");
    let (code, v) = verify_tampered(&dir, "format0", |db| {
        db.insert(b"Mformat_version", &0u32.to_be_bytes())
            .expect("insert");
    });
    assert_eq!(code, 1);
    assert!(problems(&v).contains("format version 0"), "{v}");

    // Each remaining check of verify_tree, one planted corruption each, the whole report.
    let cases: Vec<(&str, Box<dyn FnOnce(&sled::Db)>, Vec<String>)> = vec![
        // A second index entry for e2.level at a seq that is not its first_seq (a key whose
        // entry matches its first_seq twice cannot exist: the seq is part of the sled key).
        (
            "secondindex",
            Box::new(|db: &sled::Db| {
                let mut k = vec![b'I'];
                k.extend_from_slice(&50u64.to_be_bytes());
                k.extend_from_slice(&key_of(b'P', "e2", "level")[1..]);
                db.insert(k, Vec::<u8>::new()).expect("insert");
            }),
            vec![format!(
                "index entry 50 for {:?} but its first_seq is 2",
                Some(&e2)
            )],
        ),
        // The only entry of e2.level moved to a wrong seq: both directions are reported.
        (
            "movedindex",
            Box::new(|db: &sled::Db| {
                let rest = key_of(b'P', "e2", "level")[1..].to_vec();
                let mut old = vec![b'I'];
                old.extend_from_slice(&2u64.to_be_bytes());
                old.extend_from_slice(&rest);
                assert!(
                    db.remove(old).expect("remove").is_some(),
                    "e2.level's entry"
                );
                let mut new = vec![b'I'];
                new.extend_from_slice(&7u64.to_be_bytes());
                new.extend_from_slice(&rest);
                db.insert(new, Vec::<u8>::new()).expect("insert");
            }),
            vec![
                format!("index entry 7 for {:?} but its first_seq is 2", Some(&e2)),
                format!(
                    "pending key {:?} missing from the delivery index",
                    Some(&e2)
                ),
            ],
        ),
        (
            "quarantinecounter",
            Box::new(|db: &sled::Db| {
                let raw = db.get(b"Mcounters").expect("get").expect("counters");
                let mut c: Counters = record::decode(&raw).expect("counters decode");
                c.quarantine_keys += 2;
                db.insert(b"Mcounters", record::encode(&c)).expect("insert");
            }),
            vec!["counter quarantine_keys = 3 but 1 quarantine records".into()],
        ),
        // A record in the set-aside area the counters do not know (the area was edited).
        (
            "setaside",
            Box::new(|db: &sled::Db| {
                let mut k = vec![b'X'];
                k.extend_from_slice(&1u64.to_be_bytes());
                k.extend_from_slice(&log_key(3));
                db.insert(k, b"garbage".to_vec()).expect("insert");
            }),
            vec!["counter corrupt_set_aside = 0 but 1 records set aside".into()],
        ),
        (
            "nextseq",
            Box::new(|db: &sled::Db| {
                db.insert(b"Mnext_seq", b"abc".to_vec()).expect("insert");
            }),
            vec!["next_seq record is malformed".into()],
        ),
        // A malformed entity count reads as 0, which then disagrees with the entity's keys.
        (
            "entitymalformed",
            Box::new(|db: &sled::Db| {
                db.insert(b"Ee1", b"abc".to_vec()).expect("insert");
            }),
            vec![
                "entity count \"Ee1\" is malformed".into(),
                "entity \"e1\": count says 0 pending keys, found 2".into(),
            ],
        ),
        (
            "unknownprefix",
            Box::new(|db: &sled::Db| {
                db.insert(b"Zstray", b"x".to_vec()).expect("insert");
            }),
            vec!["unknown record \"Zstray\"".into()],
        ),
        (
            "unknownmeta",
            Box::new(|db: &sled::Db| {
                db.insert(b"Mstray", b"x".to_vec()).expect("insert");
            }),
            vec!["unknown meta record \"Mstray\"".into()],
        ),
    ];
    for (name, tamper, expected) in cases {
        let (code, v) = verify_tampered(&dir, name, tamper);
        assert_eq!((code, &v["problems"]), (1, &json!(expected)), "{name}");
        assert_eq!(v["ok"], false, "{name}");
    }

    // The healthy original is untouched by all this.
    let o = run(&["--data-dir", &d, "--format", "json", "verify"]);
    assert_eq!(o.status.code(), Some(0));
}

#[test]
fn live_verify_reports_corruption_like_offline() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("healthy");
    build_fixture(&dir);
    let (code, off) = verify_tampered(&dir, "index", |db| {
        let mut k = vec![b'I'];
        k.extend_from_slice(&99u64.to_be_bytes());
        k.extend_from_slice(&5u32.to_be_bytes());
        k.extend_from_slice(b"ghostprop");
        db.insert(k, Vec::<u8>::new()).expect("insert");
    });
    assert_eq!(code, 1);
    let worker = Worker::start(worker_config(&tmp.path().join("index"), ""));
    worker.wait_compacted();
    let o = run(&["--admin", &worker.admin(), "--format", "json", "verify"]);
    assert_eq!(o.status.code(), Some(1));
    let on: Value = serde_json::from_slice(&o.stdout).expect("json");
    worker.stop();
    // The worker compacted the tail meanwhile: compare problems, not record counts.
    assert_eq!(on["problems"], off["problems"]);
}

// ---------------------------------------------------------------------------------------------
// clear refusals

fn refused(args: &[&str]) -> String {
    let o = run(args);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stdout(&o));
    let e = stderr(&o);
    assert!(!e.contains("panicked"), "{e}");
    e
}

#[test]
fn refusals_are_clear() {
    let tmp = tempfile::tempdir().expect("tempdir");

    let missing = tmp.path().join("missing");
    let e = refused(&["--data-dir", &missing.to_string_lossy(), "summary"]);
    assert!(e.contains("does not exist"), "{e}");
    assert!(!missing.exists(), "nothing may be created");

    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    for cmd in ["summary", "pending", "verify", "export"] {
        let e = refused(&["--data-dir", &empty.to_string_lossy(), cmd]);
        assert!(e.contains("not a flux-outbox data directory"), "{e}");
    }
    assert_eq!(std::fs::read_dir(&empty).expect("read").count(), 0);

    // A sled database that is not a flux-outbox store.
    let other = tmp.path().join("other");
    drop(sled::open(other.join("store")).expect("sled"));
    let e = refused(&["--data-dir", &other.to_string_lossy(), "pending"]);
    assert!(e.contains("not a flux-outbox store"), "{e}");

    // A newer format.
    let newer = tmp.path().join("newer");
    {
        let (store, _) = Store::open(&newer, StoreOptions::default()).expect("open");
        store
            .raw_db()
            .insert(b"Mformat_version", &2u32.to_be_bytes())
            .expect("insert");
        store.close().expect("close");
    }
    for cmd in ["summary", "verify"] {
        let e = refused(&["--data-dir", &newer.to_string_lossy(), cmd]);
        assert!(
            e.contains("format version 2") && e.contains("upgrade"),
            "{e}"
        );
    }

    // Locked by a running process, and no admin API answering where the config says.
    let locked = tmp.path().join("locked");
    let (store, _) = Store::open(&locked, StoreOptions::default()).expect("open");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let cfg = tmp.path().join("locked.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[admin]\nlisten = \"127.0.0.1:{port}\"\n",
            locked.to_string_lossy()
        ),
    )
    .expect("write config");
    let e = refused(&["--config", &cfg.to_string_lossy(), "summary"]);
    assert!(
        e.contains("locked") && e.contains("does not answer") && e.contains(&port.to_string()),
        "{e}"
    );
    store.close().expect("close");
}

// ---------------------------------------------------------------------------------------------
// exact tables

/// The tool's age format, restated: the two largest units, zero units left out, "0s" under a
/// second.
fn age_text(ms: u64) -> String {
    let s = ms / 1000;
    let units = [
        (s / 86_400, "d"),
        (s / 3_600 % 24, "h"),
        (s / 60 % 60, "m"),
        (s % 60, "s"),
    ];
    let parts: Vec<String> = units
        .iter()
        .skip_while(|(n, _)| *n == 0)
        .take(2)
        .filter(|(n, _)| *n > 0)
        .map(|(n, u)| format!("{n}{u}"))
        .collect();
    if parts.is_empty() {
        "0s".into()
    } else {
        parts.join(" ")
    }
}

/// An aligned table as the tool prints it: every column but the last padded to its widest
/// cell plus two spaces, no trailing spaces.
fn table_text(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len() - 1;
        let mut l = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            l.push_str(c);
            if i < last {
                l.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        format!("{}\n", l.trim_end())
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// Runs the tool (exit 0) and asserts that its stdout is exactly `expected(now)` for some
/// `now` (epoch ms) within the run: ages depend on the tool's clock, nothing else does.
fn assert_output_at_run_time(args: &[&str], expected: impl Fn(u64) -> String) -> Output {
    let before = flux_outbox::model::now_ms();
    let o = run(args);
    let after = flux_outbox::model::now_ms();
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    let got = stdout(&o);
    if !(before..=after).any(|now| expected(now) == got) {
        panic!(
            "{args:?} printed\n{got}\nexpected (at the start of the run)\n{}",
            expected(before)
        );
    }
    o
}

fn pending_table(f: &Fixture, now: u64) -> String {
    let cells = |e: &str, p: &str, v: &str, ts: u64, attempts: u32, err: &str| {
        let since = pending_since(f, e, p);
        vec![
            e.to_string(),
            p.to_string(),
            v.to_string(),
            rfc(ts),
            rfc(since),
            age_text(now - since),
            attempts.to_string(),
            err.to_string(),
        ]
    };
    let rows = vec![
        cells("e1", "mode", "auto", T + 1000, 0, ""),
        cells("e1", "temp", "21.0", T + 2000, 0, ""),
        cells("e2", "level", "3", T + 1000, 1, "connection refused"),
        cells("gone", "__deleted__", "true", T + 3000, 0, ""),
    ];
    let header = [
        "ENTITY",
        "PROPERTY",
        "VALUE",
        "SOURCE TIME",
        "PENDING SINCE",
        "AGE",
        "ATTEMPTS",
        "LAST ERROR",
    ];
    table_text(&header, &rows) + "4 pending keys\n"
}

fn quarantine_table(f: &Fixture, now: u64) -> String {
    let q = &f.quarantine[0];
    let at = q.quarantined_at_ms.expect("quarantined at");
    let rows = vec![vec![
        "q1".to_string(),
        "x".into(),
        "1".into(),
        rfc(T + 1000),
        rfc(q.pending_since_ms),
        age_text(now - q.pending_since_ms),
        "0".into(),
        // The rejection is the key's last error too (settle records it there).
        "rejected: bad value".into(),
        rfc(at),
        "400".into(),
        "rejected: bad value".into(),
    ]];
    let header = [
        "ENTITY",
        "PROPERTY",
        "VALUE",
        "SOURCE TIME",
        "PENDING SINCE",
        "AGE",
        "ATTEMPTS",
        "LAST ERROR",
        "QUARANTINED",
        "HTTP",
        "REASON",
    ];
    table_text(&header, &rows) + "1 quarantined keys\n"
}

fn log_table(f: &Fixture, now: u64) -> String {
    let row = |i: usize, seq: u64, entity: &str, update: &str, ts: u64| {
        let arrived = f.log[i].arrived_ms;
        vec![
            seq.to_string(),
            entity.to_string(),
            update.to_string(),
            rfc(ts),
            rfc(arrived),
            age_text(now - arrived),
        ]
    };
    let rows = vec![
        row(0, 10, "e3", r#"{"p":"tail"}"#, T + 4000),
        row(1, 11, "e1", r#"{"mode":"manual"}"#, T + 5000),
    ];
    let header = ["SEQ", "ENTITY", "UPDATE", "SOURCE TIME", "ARRIVED", "AGE"];
    table_text(&header, &rows) + "2 uncompacted log records\n"
}

/// The JSON of `log` for the fixture's uncompacted tail.
fn expected_log(f: &Fixture) -> Value {
    let arrived: Vec<u64> = f.log.iter().map(|r| r.arrived_ms).collect();
    json!([
        {"seq": 10, "entity": "e3", "delete": false, "properties": {"p": "tail"},
         "ts_ms": T + 4000, "ts": rfc(T + 4000),
         "arrived_ms": arrived[0], "arrived": rfc(arrived[0])},
        {"seq": 11, "entity": "e1", "delete": false, "properties": {"mode": "manual"},
         "ts_ms": T + 5000, "ts": rfc(T + 5000),
         "arrived_ms": arrived[1], "arrived": rfc(arrived[1])},
    ])
}

fn ndjson_lines(args: &[&str]) -> Vec<Value> {
    let o = run(args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{args:?}: {e}: {l}")))
        .collect()
}

#[test]
fn tables_and_ndjson_are_exact_for_every_listing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let f = build_fixture(&dir);
    let d = dir.to_string_lossy().into_owned();
    fn table<'a>(d: &'a str, cmd: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["--data-dir", d, "--format", "table"];
        a.extend_from_slice(cmd);
        a
    }

    assert_output_at_run_time(&table(&d, &["pending"]), |now| pending_table(&f, now));
    assert_output_at_run_time(&table(&d, &["quarantine"]), |now| quarantine_table(&f, now));
    assert_output_at_run_time(&table(&d, &["log"]), |now| log_table(&f, now));
    // Empty listings and the limit say so.
    assert_eq!(
        stdout(&run(&table(&d, &["quarantine", "--older-than", "3h"]))),
        "no quarantined keys\n"
    );
    let o = stdout(&run(&table(&d, &["log", "--limit", "2"])));
    assert!(
        o.ends_with("\n2 uncompacted log records shown: the limit; --limit N shows more\n"),
        "{o}"
    );
    let records = offline(&dir, &["verify"])["records"]
        .as_u64()
        .expect("records");
    assert_eq!(
        stdout(&run(&table(&d, &["verify"]))),
        format!("ok: {records} records checked, no problems\n")
    );

    // The summary table, line for line (disk usage depends on sled's files, not the content:
    // its line is checked for its shape).
    let oldest = f.stats.oldest_pending_ms.expect("oldest");
    let before = flux_outbox::model::now_ms();
    let o = run(&table(&d, &["summary"]));
    let after = flux_outbox::model::now_ms();
    let got = stdout(&o);
    let disk = got
        .lines()
        .find(|l| l.starts_with("disk "))
        .unwrap_or_else(|| panic!("no disk line: {got}"))
        .to_string();
    let bytes = disk
        .rsplit_once(" (")
        .and_then(|(_, b)| b.strip_suffix(" bytes)"))
        .and_then(|b| b.parse::<u64>().ok());
    assert!(bytes.is_some_and(|b| b > 0), "{disk}");
    let expected = |now: u64| {
        let lines = [
            ("source", format!("offline {d}")),
            ("pending", "4 keys in 3 entities".into()),
            (
                "oldest pending",
                format!("{} ago ({})", age_text(now - oldest), rfc(oldest)),
            ),
            ("log backlog", "2 updates not yet compacted".into()),
            (
                "quarantine",
                "1 keys (ever quarantined 1, requeued 0)".into(),
            ),
            ("superseded", "3".into()),
            ("late dropped", "1".into()),
            ("delivered", "1 keys".into()),
            ("corrupt set aside", "0".into()),
            ("in flight", "0 entities".into()),
            ("disk", String::new()),
            ("format version", "1".into()),
            ("next seq", "12".into()),
            ("link", "- (offline: the worker is not running)".into()),
            ("last delivery", "- (offline)".into()),
        ];
        lines
            .iter()
            .map(|(k, v)| match *k {
                "disk" => format!("{disk}\n"),
                _ => format!("{k:<17}  {v}\n"),
            })
            .collect::<String>()
    };
    assert!(
        (before..=after).any(|now| expected(now) == got),
        "summary table\n{got}\nexpected\n{}",
        expected(before)
    );
    assert!(disk.starts_with(&format!("{:<17}  ", "disk")), "{disk}");

    // NDJSON: the JSON output, one element per line.
    for cmd in [
        vec!["pending"],
        vec!["quarantine"],
        vec!["log"],
        vec!["pending", "--older-than", "1h"],
    ] {
        let mut a = vec!["--data-dir", d.as_str(), "--format", "ndjson"];
        a.extend_from_slice(&cmd);
        let lines: Vec<Value> = ndjson_lines(&a).iter().map(strip).collect();
        let json = strip(&offline(&dir, &cmd));
        assert_eq!(Some(&lines), json.as_array(), "{cmd:?}");
        assert!(!lines.is_empty(), "{cmd:?}");
    }
    for cmd in ["summary", "verify"] {
        let lines = ndjson_lines(&["--data-dir", &d, "--format", "ndjson", cmd]);
        assert_eq!(lines.len(), 1, "{cmd}: one object on one line");
        assert_eq!(strip(&lines[0]), strip(&offline(&dir, &[cmd])), "{cmd}");
    }
    assert_eq!(
        ndjson_lines(&["--data-dir", &d, "--format", "ndjson", "log"])
            .iter()
            .map(strip)
            .collect::<Vec<_>>(),
        strip(&expected_log(&f))
            .as_array()
            .cloned()
            .unwrap_or_default()
    );
}

// ---------------------------------------------------------------------------------------------
// the admin API over a store nothing compacts

/// The worker's admin API (`admin::router`) serving a store opened in-process with no compactor
/// and no flusher: the live view of a store whose log tail stays uncompacted, as the running
/// worker's compactor would otherwise fold it within milliseconds.
struct AdminOnly {
    rt: tokio::runtime::Runtime,
    store: Store,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    /// `AppState` needs a compactor's waker: this one compacts a scratch store.
    scratch: Option<(flux_outbox::compactor::Compactor, Store, tempfile::TempDir)>,
}

impl AdminOnly {
    fn start(data_dir: &Path) -> AdminOnly {
        let (store, _) = Store::open(data_dir, StoreOptions::default()).expect("open store");
        let scratch_dir = tempfile::tempdir().expect("tempdir");
        let (scratch, _) =
            Store::open(scratch_dir.path(), StoreOptions::default()).expect("open scratch");
        let compactor = flux_outbox::compactor::spawn(scratch.clone()).expect("compactor");
        let cfg = worker_config(data_dir, "");
        let state = Arc::new(flux_outbox::ingest::AppState {
            store: store.clone(),
            metrics: Arc::new(flux_outbox::metrics::Metrics::new(true)),
            rules: cfg.rules(),
            ingest_token: None,
            admin_token: None,
            shutting_down: Default::default(),
            compactor: compactor.waker(),
            default_stream: cfg.flux.stream.clone(),
            flux: None,
            gateway_id: "test".into(),
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = rt.spawn(async move {
            let _ = axum::serve(listener, flux_outbox::admin::router(state))
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        AdminOnly {
            rt,
            store,
            addr,
            stop: Some(tx),
            server: Some(server),
            scratch: Some((compactor, scratch, scratch_dir)),
        }
    }

    fn admin(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.server.take() {
            self.rt.block_on(h).expect("admin server ends");
        }
        self.store.close().expect("close");
        if let Some((compactor, scratch, _dir)) = self.scratch.take() {
            compactor.stop_and_join();
            scratch.close().expect("close scratch");
        }
    }
}

#[test]
fn live_output_of_an_uncompacted_tail_equals_offline() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let live_dir = tmp.path().join("live");
    let f = build_fixture(&live_dir);
    // Offline reads an identical copy: the live store stays open meanwhile.
    let off_dir = tmp.path().join("offline");
    copy_dir(&live_dir, &off_dir);
    let server = AdminOnly::start(&live_dir);
    let admin = server.admin();

    // The tail is there, live, exactly.
    assert_eq!(strip(&live(&admin, &["log"])), strip(&expected_log(&f)));
    let commands: Vec<Vec<&str>> = vec![
        vec!["summary"],
        vec!["pending"],
        vec!["pending", "--older-than", "1h"],
        vec!["quarantine"],
        vec!["quarantine", "--older-than", "1h"],
        vec!["log"],
        vec!["log", "--limit", "1"],
        vec!["verify"],
    ];
    for c in &commands {
        let (l, o) = (live(&admin, c), offline(&off_dir, c));
        assert_eq!(strip(&l), strip(&o), "live and offline differ for {c:?}");
    }
    let summary = live(&admin, &["summary"]);
    assert_eq!(
        (&summary["mode"], &summary["log_backlog"]),
        (&json!("live"), &json!(2))
    );
    // Tables too: the same text, ages aside.
    let a = admin.as_str();
    assert_output_at_run_time(&["--admin", a, "--format", "table", "log"], |now| {
        log_table(&f, now)
    });
    assert_output_at_run_time(&["--admin", a, "--format", "table", "quarantine"], |now| {
        quarantine_table(&f, now)
    });
    assert_output_at_run_time(&["--admin", a, "--format", "table", "pending"], |now| {
        pending_table(&f, now)
    });

    // Export: live and offline fold the tail in memory alike; same NDJSON, and the tail
    // (e1.mode = manual) is in it without having been compacted.
    let od = off_dir.to_string_lossy().into_owned();
    let export_off = stdout(&run(&["--data-dir", &od, "export"]));
    assert_eq!(stdout(&run(&["--admin", a, "export"])), export_off);
    assert!(export_off.contains("\"manual\""), "{export_off}");
    assert_eq!(
        strip(&live(&admin, &["log"])),
        strip(&expected_log(&f)),
        "export changed the log"
    );
    server.stop();
}

#[test]
fn live_verify_checks_records_beyond_the_writers_next_seq() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    build_fixture(&dir);
    let server = AdminOnly::start(&dir);
    let verify = |server: &AdminOnly| {
        let o = run(&["--admin", &server.admin(), "--format", "json", "verify"]);
        let v: Value = serde_json::from_slice(&o.stdout).expect("json");
        (o.status.code(), v)
    };
    assert_eq!(verify(&server).0, Some(0));
    // Offline a stopped store's next_seq is derived from its log, so only the writer of a
    // running store can be behind what is on disk: written behind its back here.
    let db = server.store.raw_db();
    let rec = db.get(log_key(10)).expect("get").expect("log record 10");
    db.insert(log_key(500), rec).expect("insert");
    db.insert(b"Mnext_seq", &99u64.to_be_bytes())
        .expect("insert");
    let (code, v) = verify(&server);
    assert_eq!(code, Some(1));
    let l500 = String::from_utf8_lossy(&log_key(500)).into_owned();
    assert_eq!(
        v["problems"],
        json!([
            format!("log record {l500:?} at or beyond next_seq 12"),
            "next_seq 99 ahead of the writer's 12",
        ])
    );
    server.stop();
}

// ---------------------------------------------------------------------------------------------
// a damaged store: every command

/// Flips the last bit of a stored record, as a failing disk would.
fn flip_last_bit(db: &sled::Db, key: &[u8]) -> String {
    let mut v = db.get(key).expect("get").expect("record").to_vec();
    let last = v.len() - 1;
    v[last] ^= 0x01;
    db.insert(key, v.clone()).expect("insert");
    let e = match key[0] {
        b'L' => record::decode::<record::LogRecord>(&v).map(|_| ()),
        _ => record::decode::<PendingRecord>(&v).map(|_| ()),
    }
    .expect_err("the flip is detected");
    // What verify says about it.
    format!("record {:?}: {e}", String::from_utf8_lossy(key))
}

/// The fixture with two records damaged on disk: e2.level's pending value and log record 10
/// (the tail's e3 update). Returns the fixture and what verify must report, in its order: the
/// two records, then what the unreadable value leaves inconsistent (its index entry, its
/// entity's count, the counters that count it).
fn build_damaged_fixture(dir: &Path) -> (Fixture, Vec<String>) {
    let f = build_fixture(dir);
    let db = open_raw(&dir.join("store"));
    let e2 = flux_outbox::model::PropKey::new("e2".to_string(), "level".to_string());
    let problems = vec![
        flip_last_bit(&db, &log_key(10)),
        flip_last_bit(&db, &key_of(b'P', "e2", "level")),
        format!("index entry 2 for {:?} without a pending value", Some(e2)),
        "entity \"e2\": count says 1 pending keys, found 0".into(),
        "counter pending_keys = 4 but 3 pending records".into(),
        "counter pending_entities = 3 but 2 entities pending".into(),
    ];
    db.flush().expect("flush");
    (f, problems)
}

const WARN_PENDING: &str = "outbox-dump: warning: 1 pending record could not be read (corrupt) \
                            and is not shown; `outbox-dump verify` names them\n";
const WARN_LOG: &str = "outbox-dump: warning: 1 log record could not be read (corrupt) and is \
                        not shown; `outbox-dump verify` names them\n";
const WARN_EXPORT: &str = "outbox-dump: warning: 2 records could not be read (corrupt) and are \
                           not exported; `outbox-dump verify` names them\n";

/// Runs with `--format json`; returns the parsed output and stderr, asserting exit `code`.
fn json_and_stderr(base: &[&str], args: &[&str], code: i32) -> (Value, String) {
    let mut a = base.to_vec();
    a.extend_from_slice(&["--format", "json"]);
    a.extend_from_slice(args);
    let o = run(&a);
    assert_eq!(o.status.code(), Some(code), "{a:?}: {}", stderr(&o));
    let v = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{a:?}: not JSON ({e}): {}", stdout(&o)));
    (v, stderr(&o))
}

#[test]
fn damaged_store_every_command_reports_what_it_cannot_read() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("damaged");
    let (f, problems) = build_damaged_fixture(&dir);
    for name in ["live", "worker"] {
        copy_dir(&dir, &tmp.path().join(name));
    }
    let d = dir.to_string_lossy().into_owned();
    let base = ["--data-dir", d.as_str()];

    // summary: what the counters say; nothing has been set aside yet.
    let (summary, err) = json_and_stderr(&base, &["summary"], 0);
    assert_eq!(err, "");
    let oldest = f.stats.oldest_pending_ms.expect("oldest");
    assert_eq!(
        strip(&summary),
        json!({
            "pending_keys": 4, "pending_entities": 3,
            "oldest_pending_ms": oldest, "oldest_pending": rfc(oldest),
            "log_backlog": 2, "quarantine_keys": 1,
            "superseded": 3, "late_dropped": 1, "delivered": 1,
            "quarantined_total": 1, "requeued": 0, "corrupt_set_aside": 0,
            "in_flight_entities": 0, "next_seq": 12, "format_version": 1,
        })
    );
    // pending: the unreadable value is left out, and the tool says so.
    let row = |e: &str, p: &str, v: Value, ts: u64, seq: u64| {
        expected_pending_row(&f, e, p, v, ts, seq, 0, None)
    };
    let (pending, err) = json_and_stderr(&base, &["pending"], 0);
    assert_eq!(
        strip(&pending),
        json!([
            row("e1", "mode", json!("auto"), T + 1000, 1),
            row("e1", "temp", json!(21.0), T + 2000, 3),
            row("gone", "__deleted__", json!(true), T + 3000, 9),
        ])
    );
    assert_eq!(err, WARN_PENDING);
    let (older, err) = json_and_stderr(&base, &["pending", "--older-than", "1h"], 0);
    assert_eq!(
        strip(&older),
        json!([
            row("e1", "mode", json!("auto"), T + 1000, 1),
            row("e1", "temp", json!(21.0), T + 2000, 3),
        ])
    );
    assert_eq!(err, WARN_PENDING);
    // Another entity's listing does not read the damaged record: no warning.
    let (gone, err) = json_and_stderr(&base, &["pending", "--entity", "gone"], 0);
    assert_eq!(
        strip(&gone),
        json!([row("gone", "__deleted__", json!(true), T + 3000, 9)])
    );
    assert_eq!(err, "");
    // The table shows the same rows; the warning goes to stderr in every format.
    let o = run(&["--data-dir", &d, "--format", "table", "pending"]);
    assert_eq!(stderr(&o), WARN_PENDING);
    assert!(stdout(&o).ends_with("\n3 pending keys\n"), "{}", stdout(&o));
    // quarantine: intact.
    let (q, err) = json_and_stderr(&base, &["quarantine"], 0);
    assert_eq!(q.as_array().map(Vec::len), Some(1));
    assert_eq!((q[0]["entity"].as_str(), err.as_str()), (Some("q1"), ""));
    // log: record 10 is unreadable.
    let (log, err) = json_and_stderr(&base, &["log"], 0);
    assert_eq!(
        strip(&log),
        json!([strip(&expected_log(&f)).as_array().expect("rows")[1].clone()])
    );
    assert_eq!(err, WARN_LOG);
    // export: neither e3 (its log record) nor e2 (its value) can be carried off.
    let o = run(&["--data-dir", &d, "export"]);
    assert!(o.status.success());
    assert_eq!(
        stdout(&o),
        [
            json!({"entity": "e1", "properties": {"temp": 21.0}, "ts": T + 2000}),
            json!({"entity": "e1", "properties": {"mode": "manual"}, "ts": T + 5000}),
            json!({"entity": "gone", "delete": true, "ts": T + 3000}),
        ]
        .iter()
        .map(|l| format!("{l}\n"))
        .collect::<String>()
    );
    assert_eq!(stderr(&o), WARN_EXPORT);
    // verify: both, exactly, exit 1; the table lists them.
    let (v, _) = json_and_stderr(&base, &["verify"], 1);
    assert_eq!(v["problems"], json!(problems));
    assert_eq!(v["ok"], false);
    let records = v["records"].as_u64().expect("records");
    let o = run(&["--data-dir", &d, "--format", "table", "verify"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stdout(&o),
        format!("6 problems found in {records} records:\n")
            + &problems
                .iter()
                .map(|p| format!("  - {p}\n"))
                .collect::<String>()
    );
    // Nothing above repaired or changed the store.
    let (again, _) = json_and_stderr(&base, &["verify"], 1);
    assert_eq!(again, v);

    // Live, through the admin API over the same damaged content (nothing compacts it): the
    // same output and the same warnings.
    let server = AdminOnly::start(&tmp.path().join("live"));
    let admin = server.admin();
    let lbase = ["--admin", admin.as_str()];
    for (cmd, warning) in [
        (vec!["pending"], WARN_PENDING),
        (vec!["pending", "--older-than", "1h"], WARN_PENDING),
        (vec!["pending", "--entity", "gone"], ""),
        (vec!["quarantine"], ""),
        (vec!["summary"], ""),
    ] {
        let (off, _) = json_and_stderr(&base, &cmd, 0);
        let (on, err) = json_and_stderr(&lbase, &cmd, 0);
        assert_eq!(strip(&on), strip(&off), "{cmd:?}");
        assert_eq!(err, warning, "{cmd:?}");
    }
    let (log_live, err) = json_and_stderr(&lbase, &["log"], 0);
    assert_eq!(strip(&log_live), strip(&log));
    assert_eq!(err, WARN_LOG);
    let (v_live, _) = json_and_stderr(&lbase, &["verify"], 1);
    assert_eq!(v_live, v);
    // Export folds the tail in memory live as offline: the same NDJSON and the same warning
    // (both damaged records), and the store is left as it was.
    let off = run(&["--data-dir", &d, "export"]);
    let on = run(&["--admin", admin.as_str(), "export"]);
    assert!(on.status.success(), "{}", stderr(&on));
    assert_eq!(stdout(&on), stdout(&off));
    assert_eq!(stderr(&on), stderr(&off));
    assert_eq!(stderr(&on), WARN_EXPORT);
    let (log_after, err) = json_and_stderr(&lbase, &["log"], 0);
    assert_eq!(
        (strip(&log_after), err.as_str()),
        (strip(&log), WARN_LOG),
        "live export changed the log"
    );
    let (v_after, _) = json_and_stderr(&lbase, &["verify"], 1);
    assert_eq!(v_after, v, "live export changed the store");
    server.stop();

    // The worker itself sets the unreadable log record aside when it compacts; the damaged
    // value stays (nothing touches e2 without a Flux link) and is still reported.
    let wdir = tmp.path().join("worker");
    let worker = Worker::start(worker_config(&wdir, ""));
    worker.wait_compacted();
    let admin = worker.admin();
    let lbase = ["--admin", admin.as_str()];
    let (s, _) = json_and_stderr(&lbase, &["summary"], 0);
    assert_eq!(
        (
            &s["corrupt_set_aside"],
            &s["log_backlog"],
            &s["pending_keys"]
        ),
        (&json!(1), &json!(0), &json!(4))
    );
    let (p, err) = json_and_stderr(&lbase, &["pending"], 0);
    assert_eq!(err, WARN_PENDING);
    assert_eq!(
        p.as_array()
            .map(|a| a.iter().map(|r| r["entity"].clone()).collect::<Vec<_>>()),
        Some(vec![json!("e1"), json!("e1"), json!("gone")])
    );
    worker.stop();
    let wd = wdir.to_string_lossy().into_owned();
    let wbase = ["--data-dir", wd.as_str()];
    let (s, _) = json_and_stderr(&wbase, &["summary"], 0);
    assert_eq!(s["corrupt_set_aside"], 1);
    let (v, _) = json_and_stderr(&wbase, &["verify"], 1);
    assert_eq!(v["problems"], json!(problems[1..]));
}

// ---------------------------------------------------------------------------------------------
// live summary with a link

#[test]
fn live_summary_shows_the_link_up_and_the_last_delivery() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    build_fixture(&dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let sim = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        flux_outbox::sim::start(flux_outbox::sim::SimConfig::default(), listener)
            .await
            .expect("sim starts")
    });
    let started = flux_outbox::model::now_ms();
    let cfg = worker_config(
        &dir,
        &format!(
            "[flux]\nurl = {:?}\n[flush]\ninterval = \"100ms\"\nbackoff_initial = \"50ms\"\n",
            sim.url()
        ),
    );
    let worker = Worker::start_in(rt, cfg);
    let admin = worker.admin();
    let deadline = Instant::now() + Duration::from_secs(60);
    let summary = loop {
        let s = live(&admin, &["summary"]);
        if s["pending_keys"] == 0 && s["link"] == "up" && s["last_delivery_ms"].is_u64() {
            break s;
        }
        assert!(Instant::now() < deadline, "never delivered: {s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let at = summary["last_delivery_ms"].as_u64().expect("ms");
    assert!(
        (started..=flux_outbox::model::now_ms()).contains(&at),
        "{at}"
    );
    assert_eq!(summary["last_delivery"], rfc(at));
    assert_eq!(summary["mode"], "live");
    assert_eq!(summary["quarantine_keys"], 1, "q1 stays quarantined");
    assert_eq!(summary["oldest_pending"], Value::Null);
    let o = run(&["--admin", &admin, "--format", "table", "summary"]);
    let table = stdout(&o);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines.contains(&"link               up"), "{table}");
    let last = lines
        .iter()
        .find(|l| l.starts_with("last delivery  "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        last.starts_with("last delivery      ") && last.ends_with(&format!(" ago ({})", rfc(at))),
        "{table}"
    );
    worker.stop();
}

// ---------------------------------------------------------------------------------------------
// offline requeue --all

#[test]
fn offline_requeue_all_moves_every_quarantined_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    build_fixture(&dir);
    let d = dir.to_string_lossy().into_owned();
    let o = run(&["--data-dir", &d, "--format", "table", "requeue", "--all"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "requeued 1 keys (moved from quarantine back to pending)\n"
    );
    assert_eq!(offline(&dir, &["quarantine"]), json!([]));
    let q1 = strip(&offline(&dir, &["pending", "--entity", "q1"]));
    let row = &q1[0];
    assert_eq!(q1.as_array().map(Vec::len), Some(1));
    assert_eq!(
        (
            &row["property"],
            &row["value"],
            &row["ts_ms"],
            &row["seq"],
            &row["attempts"],
            &row["last_error"]
        ),
        (
            &json!("x"),
            &json!(1),
            &json!(T + 1000),
            &json!(5),
            &json!(0),
            &Value::Null
        )
    );
    let s = offline(&dir, &["summary"]);
    assert_eq!(
        (&s["quarantine_keys"], &s["requeued"], &s["pending_keys"]),
        (&json!(0), &json!(1), &json!(5))
    );
    assert_eq!(
        offline(&dir, &["requeue", "--all"]),
        json!({"requeued": 0}),
        "nothing left"
    );
    assert_eq!(offline(&dir, &["verify"])["problems"], json!([]));
}
