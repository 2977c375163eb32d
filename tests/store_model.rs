//! Model-based test of the outbox engine: random action sequences run against the sled store and
//! against a plain in-memory model of the documented rules, compared after every step.
//!
//! The model is deliberately naive (maps and linear scans) so that it states the rules rather
//! than re-implementing the engine: newest wins per (entity, property) by (ts, seq); a value not
//! newer than the pending one, the last delivered one or the entity's last delete is dropped and
//! counted; a delete supersedes older pending properties of its entity; an ack removes exactly
//! the version sent; quarantine keeps the newest rejected value; requeue goes through the same
//! rules; a restart drops in-flight claims and nothing else.
//!
//! Case count: `OUTBOX_PROPTEST_CASES` (default 64).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use flux_outbox::model::{value_hash, PropKey, Update, UpdateOp, DELETE_PROPERTY};
use flux_outbox::store::{
    Claim, ClaimLimits, Durability, Outcome, Settlement, Store, StoreOptions,
};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde_json::{json, Value};

const ENTITIES: [&str; 4] = ["a", "b", "ab", "a/b"];
// "Z" sorts before "__deleted__" and "x"/"y" after it: a pending delete must hide both kinds.
const PROPS: [&str; 3] = ["x", "y", "Z"];
const PREFIXES: [&str; 3] = ["a", "b", "ab"];

type Ver = (u64, u64);
type Key = (String, String);

#[derive(Clone, Debug)]
struct Upd {
    entity: usize,
    /// None: delete the entity.
    props: Option<Vec<(usize, i64)>>,
    ts: u64,
    alt_source: bool,
}

#[derive(Clone, Debug)]
enum Action {
    Ingest(Vec<Upd>),
    Compact(usize),
    Claim {
        events_max: usize,
        bytes_max: usize,
    },
    /// Settle every key of one outstanding claim (index modulo their number); outcome per key
    /// from the seeds (0 delivered, 1 quarantine, 2 retry).
    Settle {
        claim: usize,
        seeds: Vec<u8>,
    },
    Release {
        claim: usize,
    },
    Requeue(Option<usize>),
    Restart,
}

fn upd() -> impl Strategy<Value = Upd> {
    (
        0..ENTITIES.len(),
        prop_oneof![
            1 => Just(None),
            5 => prop::collection::vec((0..PROPS.len(), 0i64..100), 1..4).prop_map(Some),
        ],
        // A tiny timestamp range makes equal and out-of-order timestamps common.
        1u64..7,
        prop::bool::weighted(0.2),
    )
        .prop_map(|(entity, props, ts, alt_source)| Upd {
            entity,
            props,
            ts,
            alt_source,
        })
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => prop::collection::vec(upd(), 1..4).prop_map(Action::Ingest),
        3 => (1usize..6).prop_map(Action::Compact),
        3 => (1usize..4, prop_oneof![Just(1usize), Just(150), Just(100_000)])
            .prop_map(|(events_max, bytes_max)| Action::Claim { events_max, bytes_max }),
        3 => (0usize..4, prop::collection::vec(0u8..3, 12))
            .prop_map(|(claim, seeds)| Action::Settle { claim, seeds }),
        1 => (0usize..4).prop_map(|claim| Action::Release { claim }),
        1 => prop::option::of(0..PREFIXES.len()).prop_map(Action::Requeue),
        1 => Just(Action::Restart),
    ]
}

#[derive(Clone, Debug, PartialEq)]
struct MVal {
    ver: Ver,
    value: Value,
    source: Option<String>,
    first_seq: u64,
}

/// Byte order of the engine's key encoding (entity length first), used for delivery order.
fn kord(k: &Key) -> (usize, String, String) {
    (k.0.len(), k.0.clone(), k.1.clone())
}

#[derive(Default, Debug)]
struct Model {
    log: VecDeque<(u64, Update)>,
    pending: BTreeMap<Key, MVal>,
    delivered: BTreeMap<Key, Ver>,
    tomb: BTreeMap<String, Ver>,
    quarantine: BTreeMap<Key, MVal>,
    in_flight: BTreeSet<String>,
    last_seq: u64,
    superseded: u64,
    late_dropped: u64,
    delivered_n: u64,
    quarantined_total: u64,
    requeued: u64,
}

#[derive(Debug, PartialEq)]
struct MEvent {
    entity: String,
    delete: bool,
    source: Option<String>,
    props: Vec<(String, Value, Ver)>,
}

impl Model {
    fn fold_set(&mut self, key: Key, new: MVal) {
        if self.tomb.get(&key.0).is_some_and(|t| new.ver <= *t) {
            self.late_dropped += 1;
            return;
        }
        if let Some(old) = self.pending.get_mut(&key) {
            self.superseded += 1;
            if new.ver > old.ver {
                *old = MVal {
                    first_seq: old.first_seq,
                    ..new
                };
            }
            return;
        }
        if self.delivered.get(&key).is_some_and(|d| new.ver <= *d) {
            self.late_dropped += 1;
            return;
        }
        self.pending.insert(key, new);
    }

    fn fold_delete(&mut self, entity: &str, new: MVal, requeued: bool) {
        let tomb = self.tomb.get(entity).copied();
        let dkey = (entity.to_string(), DELETE_PROPERTY.to_string());
        let late = if requeued {
            // The requeued delete is itself the entity's last delete unless a newer one exists.
            tomb.is_some_and(|t| new.ver < t)
                || self.delivered.get(&dkey).is_some_and(|d| new.ver <= *d)
        } else {
            tomb.is_some_and(|t| new.ver <= t)
        };
        if late {
            self.late_dropped += 1;
            return;
        }
        if tomb.is_none_or(|t| t < new.ver) {
            self.tomb.insert(entity.to_string(), new.ver);
        }
        let older: Vec<Key> = self
            .pending
            .iter()
            .filter(|(k, v)| k.0 == entity && k.1 != DELETE_PROPERTY && v.ver < new.ver)
            .map(|(k, _)| k.clone())
            .collect();
        for k in older {
            self.superseded += 1;
            self.pending.remove(&k);
        }
        match self.pending.get_mut(&dkey) {
            Some(old) => {
                self.superseded += 1;
                if new.ver > old.ver {
                    *old = MVal {
                        first_seq: old.first_seq,
                        ..new
                    };
                }
            }
            None => {
                self.pending.insert(dkey, new);
            }
        }
    }

    fn compact(&mut self, n: usize) {
        for _ in 0..n {
            let Some((seq, u)) = self.log.pop_front() else {
                return;
            };
            match &u.op {
                UpdateOp::Delete => {
                    let v = MVal {
                        ver: (u.ts_ms, seq),
                        value: json!(true),
                        source: u.source.clone(),
                        first_seq: seq,
                    };
                    self.fold_delete(&u.entity, v, false);
                }
                UpdateOp::Set(props) => {
                    for (name, value) in props {
                        let v = MVal {
                            ver: (u.ts_ms, seq),
                            value: value.clone(),
                            source: u.source.clone(),
                            first_seq: seq,
                        };
                        self.fold_set((u.entity.clone(), name.clone()), v);
                    }
                }
            }
        }
    }

    /// The events of one entity as the engine must offer them: the delete alone when one is
    /// pending, otherwise its properties grouped by source.
    fn entity_events(&self, entity: &str) -> Vec<MEvent> {
        let dkey = (entity.to_string(), DELETE_PROPERTY.to_string());
        if let Some(d) = self.pending.get(&dkey) {
            return vec![MEvent {
                entity: entity.to_string(),
                delete: true,
                source: d.source.clone(),
                props: vec![(DELETE_PROPERTY.to_string(), d.value.clone(), d.ver)],
            }];
        }
        let mut groups: BTreeMap<Option<String>, Vec<(String, Value, Ver)>> = BTreeMap::new();
        for (k, v) in self.pending.iter().filter(|(k, _)| k.0 == entity) {
            groups
                .entry(v.source.clone())
                .or_default()
                .push((k.1.clone(), v.value.clone(), v.ver));
        }
        groups
            .into_iter()
            .map(|(source, props)| MEvent {
                entity: entity.to_string(),
                delete: false,
                source,
                props,
            })
            .collect()
    }

    /// Pending keys in delivery order: oldest first_seq first.
    fn delivery_order(&self) -> Vec<Key> {
        let mut keys: Vec<(u64, (usize, String, String), Key)> = self
            .pending
            .iter()
            .map(|(k, v)| (v.first_seq, kord(k), k.clone()))
            .collect();
        keys.sort();
        keys.into_iter().map(|(_, _, k)| k).collect()
    }

    /// The claim the rules call for: whole entities oldest first, skipping in-flight ones, up to
    /// `events_max` events and `bytes_max` bytes (at least one event).
    fn expected_claim(&self, events_max: usize, bytes_max: usize) -> Vec<MEvent> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut seen = BTreeSet::new();
        for k in self.delivery_order() {
            if self.in_flight.contains(&k.0) || !seen.insert(k.0.clone()) {
                continue;
            }
            for ev in self.entity_events(&k.0) {
                let b = ev.entity.len()
                    + 96
                    + ev.props
                        .iter()
                        .map(|(n, v, _)| n.len() + serde_json::to_vec(v).unwrap().len() + 4)
                        .sum::<usize>();
                if !out.is_empty() && bytes + b > bytes_max {
                    return out;
                }
                bytes += b;
                out.push(ev);
                if out.len() >= events_max.max(1) {
                    return out;
                }
            }
        }
        out
    }

    fn settle(&mut self, key: Key, sent: MVal, outcome: u8) {
        let same = self.pending.get(&key).is_some_and(|p| p.ver == sent.ver);
        match outcome {
            0 => {
                self.delivered_n += 1;
                if same {
                    self.pending.remove(&key);
                }
                let d = self.delivered.entry(key.clone()).or_insert(sent.ver);
                *d = (*d).max(sent.ver);
                if key.1 == DELETE_PROPERTY {
                    self.delivered
                        .retain(|k, v| k.0 != key.0 || k.1 == DELETE_PROPERTY || *v >= sent.ver);
                }
            }
            1 => {
                self.quarantined_total += 1;
                if same {
                    self.pending.remove(&key);
                }
                match self.quarantine.get_mut(&key) {
                    None => {
                        self.quarantine.insert(key, sent);
                    }
                    Some(q) => {
                        // Quarantine keeps the newest rejected value; the other one is a discard.
                        self.superseded += 1;
                        if sent.ver > q.ver {
                            *q = sent;
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn requeue(&mut self, prefix: Option<&str>) {
        let mut keys: Vec<Key> = self
            .quarantine
            .keys()
            .filter(|k| prefix.is_none_or(|p| k.0.starts_with(p)))
            .cloned()
            .collect();
        keys.sort_by_key(kord);
        for k in keys {
            let q = self.quarantine.remove(&k).unwrap();
            self.requeued += 1;
            let v = MVal {
                first_seq: q.ver.1,
                ..q
            };
            if k.1 == DELETE_PROPERTY {
                self.fold_delete(&k.0, v, true);
            } else {
                self.fold_set(k, v);
            }
        }
    }
}

fn opts() -> StoreOptions {
    StoreOptions {
        // Durability is the crash test's subject; here fdatasync would only slow the search.
        durability: Durability::Flush,
        cache_bytes: 1024 * 1024,
        group_commit_window: Duration::ZERO,
        ..StoreOptions::default()
    }
}

/// Reopens a store just closed by this process. sled releases its file lock only when its
/// background threads have let go of the file, a moment after the last handle is dropped, so a
/// `Locked` answer is retried briefly (a separate process restarting never sees this).
fn reopen(path: &std::path::Path) -> Store {
    for _ in 0..200 {
        match Store::open(path, opts()) {
            Ok((s, report)) => {
                assert!(report.moved_aside_to.is_none(), "{report:?}");
                return s;
            }
            Err(flux_outbox::store::StoreError::Locked(_)) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("reopen failed: {e}"),
        }
    }
    panic!("store still locked 2 s after close");
}

fn to_update(u: &Upd) -> Update {
    Update {
        entity: ENTITIES[u.entity].to_string(),
        op: match &u.props {
            None => UpdateOp::Delete,
            Some(ps) => UpdateOp::Set(
                ps.iter()
                    .map(|(p, v)| (PROPS[*p].to_string(), json!(v)))
                    .collect(),
            ),
        },
        ts_ms: u.ts,
        stream: None,
        source: u.alt_source.then(|| "alt".to_string()),
    }
}

fn compare(store: &Store, m: &Model) -> Result<(), TestCaseError> {
    let report = store.verify();
    prop_assert!(report.problems.is_empty(), "verify: {:?}", report.problems);

    let rows = store.pending_rows(None, None, usize::MAX).unwrap();
    let got: Vec<(Key, Value, Ver)> = rows
        .iter()
        .map(|r| {
            (
                (r.entity.clone(), r.property.clone()),
                r.value.clone(),
                (r.ts_ms, r.seq),
            )
        })
        .collect();
    // Same keys, values and versions, in the same delivery order (checks first_seq too).
    let want: Vec<(Key, Value, Ver)> = m
        .delivery_order()
        .into_iter()
        .map(|k| {
            let v = &m.pending[&k];
            (k, v.value.clone(), v.ver)
        })
        .collect();
    prop_assert_eq!(got, want, "pending set");

    let q: BTreeMap<Key, (Value, Ver)> = store
        .quarantine_rows(None, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|r| ((r.entity, r.property), (r.value, (r.ts_ms, r.seq))))
        .collect();
    let qm: BTreeMap<Key, (Value, Ver)> = m
        .quarantine
        .iter()
        .map(|(k, v)| (k.clone(), (v.value.clone(), v.ver)))
        .collect();
    prop_assert_eq!(q, qm, "quarantine");

    let log: Vec<u64> = store
        .log_rows(usize::MAX)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    let logm: Vec<u64> = m.log.iter().map(|(s, _)| *s).collect();
    prop_assert_eq!(log, logm, "uncompacted log");

    for e in ENTITIES {
        for p in PROPS.iter().chain([&DELETE_PROPERTY]) {
            let key = PropKey::new(e, *p);
            let d = store.delivered(&key).unwrap().map(|d| (d.ts_ms, d.seq));
            let dm = m.delivered.get(&(e.to_string(), p.to_string())).copied();
            prop_assert_eq!(d, dm, "delivered record of {:?}", key);
        }
    }

    let s = store.stats();
    let entities: BTreeSet<&String> = m.pending.keys().map(|k| &k.0).collect();
    prop_assert_eq!(s.pending_keys, m.pending.len() as u64, "pending_keys");
    prop_assert_eq!(
        s.pending_entities,
        entities.len() as u64,
        "pending_entities"
    );
    prop_assert_eq!(
        s.quarantine_keys,
        m.quarantine.len() as u64,
        "quarantine_keys"
    );
    prop_assert_eq!(s.superseded, m.superseded, "superseded");
    prop_assert_eq!(s.late_dropped, m.late_dropped, "late_dropped");
    prop_assert_eq!(s.delivered, m.delivered_n, "delivered");
    prop_assert_eq!(
        s.quarantined_total,
        m.quarantined_total,
        "quarantined_total"
    );
    prop_assert_eq!(s.requeued, m.requeued, "requeued");
    prop_assert_eq!(s.corrupt_set_aside, 0, "corrupt_set_aside");
    prop_assert_eq!(s.in_flight_entities, m.in_flight.len() as u64, "in flight");
    Ok(())
}

fn claim_events(c: &Claim) -> Vec<MEvent> {
    c.events
        .iter()
        .map(|e| MEvent {
            entity: e.entity.clone(),
            delete: e.delete,
            source: e.source.clone(),
            props: e
                .props
                .iter()
                .map(|p| {
                    (
                        p.name.clone(),
                        p.value.clone(),
                        (p.version.ts_ms, p.version.seq),
                    )
                })
                .collect(),
        })
        .collect()
}

fn run(actions: Vec<Action>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = Store::open(dir.path(), opts()).unwrap();
    let mut m = Model::default();
    let mut claims: Vec<Claim> = Vec::new();
    for (step, a) in actions.into_iter().enumerate() {
        match &a {
            Action::Ingest(us) => {
                let updates: Vec<Update> = us.iter().map(to_update).collect();
                let ack = store.ingest_blocking(updates.clone()).unwrap();
                prop_assert_eq!(ack.accepted, updates.len());
                // Sequence numbers are unique and increasing for the store's whole life,
                // restarts included: they order equal timestamps and key the log.
                let first = ack.seq + 1 - updates.len() as u64;
                prop_assert!(
                    first > m.last_seq,
                    "seq {first} reused (last {})",
                    m.last_seq
                );
                m.last_seq = ack.seq;
                for (i, u) in updates.into_iter().enumerate() {
                    m.log.push_back((first + i as u64, u));
                }
            }
            Action::Compact(n) => {
                let folded = store.compact_step(*n).unwrap();
                prop_assert_eq!(folded, (*n).min(m.log.len()));
                m.compact(*n);
            }
            Action::Claim {
                events_max,
                bytes_max,
            } => {
                let got = store
                    .claim(ClaimLimits {
                        events_max: *events_max,
                        bytes_max: *bytes_max,
                    })
                    .unwrap();
                let want = m.expected_claim(*events_max, *bytes_max);
                match got {
                    None => prop_assert!(want.is_empty(), "no claim, expected {want:?}"),
                    Some(c) => {
                        prop_assert_eq!(claim_events(&c), want);
                        for e in &c.events {
                            m.in_flight.insert(e.entity.clone());
                        }
                        claims.push(c);
                    }
                }
            }
            Action::Settle { claim, seeds } => {
                if claims.is_empty() {
                    continue;
                }
                let c = claims.remove(claim % claims.len());
                let mut settlements = Vec::new();
                let mut i = 0;
                for e in &c.events {
                    m.in_flight.remove(&e.entity);
                    for p in &e.props {
                        let seed = seeds[i % seeds.len()];
                        i += 1;
                        let key = PropKey::new(e.entity.clone(), p.name.clone());
                        let outcome = match seed {
                            0 => Outcome::Delivered {
                                value_hash: value_hash(&p.value),
                            },
                            1 => Outcome::Quarantine {
                                reason: "rejected".into(),
                                http_status: Some(400),
                            },
                            _ => Outcome::Retry {
                                error: "timeout".into(),
                            },
                        };
                        m.settle(
                            (key.entity.clone(), key.property.clone()),
                            MVal {
                                ver: (p.version.ts_ms, p.version.seq),
                                value: p.value.clone(),
                                source: p.pending.source.clone(),
                                first_seq: p.pending.first_seq,
                            },
                            seed,
                        );
                        settlements.push(Settlement {
                            key,
                            sent: p.pending.clone(),
                            outcome,
                        });
                    }
                }
                store.settle(settlements).unwrap();
            }
            Action::Release { claim } => {
                if claims.is_empty() {
                    continue;
                }
                let c = claims.remove(claim % claims.len());
                for e in &c.events {
                    m.in_flight.remove(&e.entity);
                }
                store.release(&c);
            }
            Action::Requeue(p) => {
                let prefix = p.map(|i| PREFIXES[i]);
                let want = m
                    .quarantine
                    .keys()
                    .filter(|k| prefix.is_none_or(|p| k.0.starts_with(p)))
                    .count() as u64;
                prop_assert_eq!(store.requeue(prefix).unwrap(), want);
                m.requeue(prefix);
            }
            Action::Restart => {
                store.close().unwrap();
                drop(store);
                store = reopen(dir.path());
                // Claims live in memory only: a restart releases them (a resend, never a loss).
                claims.clear();
                m.in_flight.clear();
            }
        }
        compare(&store, &m)
            .map_err(|e| TestCaseError::fail(format!("after step {step} {a:?}: {e}")))?;
    }
    // Draining everything must leave exactly the model's newest values.
    store.compact_all().unwrap();
    m.compact(usize::MAX);
    compare(&store, &m)?;
    store.close().unwrap();
    Ok(())
}

fn cases() -> u32 {
    std::env::var("OUTBOX_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 2000,
        // Integration tests have no lib.rs beside them, so the default location cannot be
        // resolved; cargo runs tests from the package root, where this path is committed.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/store_model.txt"
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn store_matches_model(actions in prop::collection::vec(action(), 1..60)) {
        run(actions)?;
    }
}
