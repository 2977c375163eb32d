//! Acceptance tests of `outbox-dump`: a store is filled with known content through the library
//! (pending, quarantined, superseded, late-dropped, a delete, an uncompacted log tail), closed,
//! and the built binary is run against it offline and, with the worker running in-process,
//! live; both must print the same. Corruptions are planted in copies of the store for `verify`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use flux_outbox::app::Running;
use flux_outbox::config::Config;
use flux_outbox::model::{Update, UpdateOp};
use flux_outbox::record::{self, Counters};
use flux_outbox::store::{
    ClaimLimits, LogRow, Outcome, Row, Settlement, Stats, Store, StoreOptions,
};
use serde_json::{json, Value};

/// Source times of the fixture: fixed, so they can be asserted exactly.
const T: u64 = 1_700_000_000_000;

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

fn run(args: &[&str]) -> Output {
    dump_cmd().args(args).output().expect("run outbox-dump")
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
            let _ = done_tx.send(r.map_err(|e| e.to_string()));
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
    assert_eq!(offline(&dir, &["pending", "--older-than", "1h"]), json!([]));

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
        vec!["quarantine"],
        vec!["quarantine", "--entity", "q"],
        vec!["log"],
        vec!["verify"],
    ];
    let live_out: Vec<Value> = commands.iter().map(|c| live(&admin, c)).collect();
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

/// Copies the healthy fixture, lets `tamper` change raw records, and runs verify.
fn verify_tampered(fixture: &Path, name: &str, tamper: impl FnOnce(&sled::Db)) -> (i32, Value) {
    let dir = fixture.parent().expect("parent").join(name);
    copy_dir(fixture, &dir);
    {
        let db = sled::Config::new()
            .path(dir.join("store"))
            .open()
            .expect("open copy");
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
