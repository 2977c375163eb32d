//! kill -9 crash test (after sled's own): the test binary re-executes itself as a child that
//! runs a self-checking workload on a store in the default `Fsync` mode, journaling every
//! acknowledged ingest and every delivery to an fsynced append-only file. The parent kills it
//! with SIGKILL at a random moment, reopens the store and checks it against the journal:
//! the newest acknowledged value of every key is pending or was delivered, no pending value is
//! older than an acknowledged one, none was never ingested, and `verify` is clean.
//!
//! The same store and journal carry over all rounds, so recovery of recovered stores and
//! sequence numbers across many restarts are exercised too.
//! Rounds: `OUTBOX_CRASH_ROUNDS` (default 30).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flux_outbox::compactor;
use flux_outbox::model::{value_hash, PropKey, Update, UpdateOp};
use flux_outbox::store::{ClaimLimits, Outcome, Settlement, Store, StoreError, StoreOptions};
use rand::Rng;
use serde_json::{json, Value};

const TEST_NAME: &str = "kill_9_never_loses_an_acknowledged_update";
const CHILD_DIR_ENV: &str = "OUTBOX_CRASH_CHILD";
const CHILD_ROUND_ENV: &str = "OUTBOX_CRASH_CHILD_ROUND";
const THREADS: usize = 3;
const ENTITIES_PER_THREAD: usize = 3;
const PROPS: [&str; 2] = ["p0", "p1"];
/// Counters are `round * ROUND_SPAN + iteration`: every round's values are newer than the last.
const ROUND_SPAN: u64 = 1_000_000;

fn entity(t: usize, j: usize) -> String {
    format!("t{t}e{j}")
}

fn opts() -> StoreOptions {
    // The default durability (Fsync) is the mode under test.
    StoreOptions::default()
}

struct Journal(Mutex<File>);

impl Journal {
    /// Appends lines with one write (O_APPEND keeps concurrent appends whole) and fsyncs before
    /// returning: a line present after the kill is a fact the child had established.
    fn append(&self, lines: &str) {
        let f = self.0.lock().unwrap();
        (&*f).write_all(lines.as_bytes()).unwrap();
        f.sync_data().unwrap();
    }
}

fn child(dir: PathBuf, round: u64) -> ! {
    let (store, _) = Store::open(&dir.join("data"), opts()).expect("child open");
    let journal = Arc::new(Journal(Mutex::new(
        OpenOptions::new()
            .append(true)
            .create(true)
            .open(dir.join("journal"))
            .unwrap(),
    )));
    // The real background compactor, woken by nobody: its idle tick drives it.
    let compactor = compactor::spawn(store.clone()).unwrap();

    for t in 0..THREADS {
        let store = store.clone();
        let journal = journal.clone();
        std::thread::spawn(move || {
            let mut rng = rand::thread_rng();
            for i in 0..ROUND_SPAN {
                let counter = round * ROUND_SPAN + i;
                let mut updates = Vec::new();
                let mut lines = String::new();
                for j in 0..ENTITIES_PER_THREAD {
                    if !rng.gen_bool(0.6) {
                        continue;
                    }
                    // Now and then a stale value (older timestamp) arrives late: acknowledged,
                    // but it must never replace a newer value.
                    let c = if rng.gen_ratio(1, 8) {
                        counter.saturating_sub(rng.gen_range(1..5))
                    } else {
                        counter
                    };
                    let e = entity(t, j);
                    let mut props = BTreeMap::new();
                    for p in PROPS {
                        if rng.gen_bool(0.7) {
                            props.insert(p.to_string(), json!({"k": format!("{e}/{p}"), "c": c}));
                            lines.push_str(&format!("A {t} {e} {p} {c}\n"));
                        }
                    }
                    if !props.is_empty() {
                        updates.push(Update {
                            entity: e,
                            op: UpdateOp::Set(props),
                            ts_ms: c,
                            stream: None,
                            source: None,
                        });
                    }
                }
                if updates.is_empty() {
                    continue;
                }
                // The attempt is recorded first so the parent knows which values may exist
                // unacknowledged (the kill can land between the commit and the answer).
                journal.append(&format!("S {t} {counter}\n"));
                store.ingest_blocking(updates).expect("ingest");
                journal.append(&lines);
            }
        });
    }

    {
        let store = store.clone();
        let journal = journal.clone();
        std::thread::spawn(move || {
            let mut rng = rand::thread_rng();
            loop {
                let limits = ClaimLimits {
                    events_max: rng.gen_range(1..8),
                    bytes_max: 64 * 1024,
                };
                let Some(claim) = store.claim(limits).expect("claim") else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                let retry = rng.gen_ratio(1, 5);
                let mut lines = String::new();
                let mut settlements = Vec::new();
                for e in &claim.events {
                    for p in &e.props {
                        let c = p.value["c"].as_u64().expect("counter");
                        let outcome = if retry {
                            Outcome::Retry {
                                error: "simulated".into(),
                            }
                        } else {
                            lines.push_str(&format!("D {} {} {c}\n", e.entity, p.name));
                            Outcome::Delivered {
                                value_hash: value_hash(&p.value),
                            }
                        };
                        settlements.push(Settlement {
                            key: PropKey::new(e.entity.clone(), p.name.clone()),
                            sent: p.pending.clone(),
                            outcome,
                        });
                    }
                }
                // Flux has it before the ack is recorded: journal the delivery first.
                if !lines.is_empty() {
                    journal.append(&lines);
                }
                store.settle(settlements).expect("settle");
            }
        });
    }

    std::thread::sleep(Duration::from_secs(20));
    drop(compactor);
    eprintln!("child was not killed");
    std::process::exit(3);
}

#[derive(Default)]
struct Facts {
    /// Newest acknowledged counter per key.
    acked: BTreeMap<(String, String), u64>,
    /// Every delivered counter per key.
    delivered: BTreeMap<(String, String), BTreeSet<u64>>,
    /// Counters whose ingest was attempted, per thread.
    attempted: BTreeMap<usize, BTreeSet<u64>>,
}

fn read_journal(path: &Path) -> Facts {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut f = Facts::default();
    for line in text.lines() {
        let w: Vec<&str> = line.split(' ').collect();
        match w.as_slice() {
            ["S", t, c] => {
                f.attempted
                    .entry(t.parse().unwrap())
                    .or_default()
                    .insert(c.parse().unwrap());
            }
            ["A", _, e, p, c] => {
                let n = f.acked.entry((e.to_string(), p.to_string())).or_default();
                *n = (*n).max(c.parse().unwrap());
            }
            ["D", e, p, c] => {
                f.delivered
                    .entry((e.to_string(), p.to_string()))
                    .or_default()
                    .insert(c.parse().unwrap());
            }
            _ => panic!("malformed journal line {line:?}"),
        }
    }
    f
}

/// Could this counter have been ingested for thread `t`? A value is either its attempt's
/// counter or a stale one at most 4 below it.
fn was_attempted(f: &Facts, t: usize, c: u64) -> bool {
    f.attempted
        .get(&t)
        .is_some_and(|s| s.range(c..=c + 4).next().is_some())
}

fn open_after_kill(data: &Path) -> Store {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Store::open(data, opts()) {
            Ok((store, report)) => {
                assert!(
                    report.moved_aside_to.is_none(),
                    "store did not survive kill -9: {report:?}"
                );
                return store;
            }
            // The killed child's lock goes with it; the kernel may take a moment.
            Err(StoreError::Locked(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("store does not open after kill -9: {e}"),
        }
    }
}

fn check(dir: &Path, round: u64) -> usize {
    let store = open_after_kill(&dir.join("data"));
    store.compact_all().unwrap();
    let facts = read_journal(&dir.join("journal"));
    let rows = store.pending_rows(None, None, usize::MAX).unwrap();
    let mut pending: BTreeMap<(String, String), Value> = BTreeMap::new();
    for r in rows {
        pending.insert((r.entity, r.property), r.value);
    }
    for t in 0..THREADS {
        for j in 0..ENTITIES_PER_THREAD {
            for p in PROPS {
                let key = (entity(t, j), p.to_string());
                let acked = facts.acked.get(&key).copied();
                let delivered = facts.delivered.get(&key);
                if let Some(v) = pending.get(&key) {
                    let c = v["c"].as_u64().expect("pending value carries its counter");
                    assert_eq!(
                        v["k"],
                        json!(format!("{}/{}", key.0, key.1)),
                        "round {round}: {key:?} holds another key's value {v}"
                    );
                    assert!(
                        was_attempted(&facts, t, c),
                        "round {round}: {key:?} holds {c}, which was never ingested"
                    );
                    if let Some(n) = acked {
                        assert!(
                            c >= n,
                            "round {round}: {key:?} pending {c} is older than acknowledged {n}"
                        );
                    }
                } else if let Some(n) = acked {
                    let newest = delivered.and_then(|d| d.last()).copied();
                    assert!(
                        newest.is_some_and(|d| d >= n),
                        "round {round}: {key:?} acknowledged {n} is neither pending nor \
                         delivered (newest delivered {newest:?})"
                    );
                }
                // A delivered record is only written after the journal recorded the delivery.
                if let Some(d) = store.delivered(&PropKey::new(&key.0, &key.1)).unwrap() {
                    assert!(
                        delivered.is_some_and(|s| s.contains(&d.ts_ms)),
                        "round {round}: {key:?} delivered record {} never delivered",
                        d.ts_ms
                    );
                }
            }
        }
    }
    let s = store.stats();
    assert_eq!(s.pending_keys, pending.len() as u64, "round {round}");
    assert_eq!(s.log_backlog, 0);
    assert_eq!(s.corrupt_set_aside, 0, "round {round}: records went bad");
    let report = store.verify();
    assert!(
        report.problems.is_empty(),
        "round {round}: {:?}",
        report.problems
    );
    store.close().unwrap();
    facts.acked.len()
}

#[test]
fn kill_9_never_loses_an_acknowledged_update() {
    if let Ok(dir) = std::env::var(CHILD_DIR_ENV) {
        let round = std::env::var(CHILD_ROUND_ENV).unwrap().parse().unwrap();
        child(PathBuf::from(dir), round);
    }
    let rounds: u64 = std::env::var("OUTBOX_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = rand::thread_rng();
    let mut acked_keys = 0;
    for round in 1..=rounds {
        let stderr = File::create(dir.join("child.stderr")).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR_ENV, dir)
            .env(CHILD_ROUND_ENV, round.to_string())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(50..=500)));
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "round {round}: child exited on its own ({status}): {}",
                std::fs::read_to_string(dir.join("child.stderr")).unwrap_or_default()
            );
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        acked_keys = check(dir, round);
    }
    // The workload must have done something for the checks to mean anything.
    let facts = read_journal(&dir.join("journal"));
    assert!(
        acked_keys > 0 && !facts.delivered.is_empty(),
        "no work was acknowledged"
    );
}
