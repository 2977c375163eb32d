//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use flux_outbox::model::{value_hash, PropKey, Update, UpdateOp};
use flux_outbox::store::{
    Claim, ClaimLimits, Durability, Outcome, Settlement, Store, StoreError, StoreOptions,
};
use serde_json::Value;

pub fn fast_opts() -> StoreOptions {
    StoreOptions {
        // These tests are about rules, not power loss; the crash test covers Fsync.
        durability: Durability::Flush,
        cache_bytes: 1024 * 1024,
        group_commit_window: Duration::ZERO,
        ..StoreOptions::default()
    }
}

pub fn set(entity: &str, ts_ms: u64, props: &[(&str, Value)]) -> Update {
    Update {
        entity: entity.into(),
        op: UpdateOp::Set(
            props
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
        ),
        ts_ms,
        stream: None,
        source: None,
    }
}

pub fn delete(entity: &str, ts_ms: u64) -> Update {
    Update {
        entity: entity.into(),
        op: UpdateOp::Delete,
        ts_ms,
        stream: None,
        source: None,
    }
}

pub const ALL: ClaimLimits = ClaimLimits {
    events_max: 1000,
    bytes_max: 1 << 20,
};

/// (entity, property) -> (value, ts) of every pending key.
pub fn pending(store: &Store) -> BTreeMap<(String, String), (Value, u64)> {
    store
        .pending_rows(None, None, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|r| ((r.entity, r.property), (r.value, r.ts_ms)))
        .collect()
}

/// Settles every key of a claim with the same outcome.
pub fn settle_all(store: &Store, claim: &Claim, outcome: impl Fn() -> Option<Outcome>) {
    let mut out = Vec::new();
    for e in &claim.events {
        for p in &e.props {
            out.push(Settlement {
                key: PropKey::new(e.entity.clone(), p.name.clone()),
                sent: p.pending.clone(),
                outcome: outcome().unwrap_or(Outcome::Delivered {
                    value_hash: value_hash(&p.value),
                }),
            });
        }
    }
    store.settle(out).unwrap();
}

pub fn deliver_all(store: &Store, claim: &Claim) {
    settle_all(store, claim, || None);
}

pub fn assert_clean(store: &Store) {
    let r = store.verify();
    assert!(r.problems.is_empty(), "verify: {:?}", r.problems);
}

/// Opens a store, retrying briefly while sled's background threads still hold the lock of a
/// store this process just closed.
pub fn open(path: &Path, opts: StoreOptions) -> (Store, flux_outbox::store::OpenReport) {
    for _ in 0..200 {
        match Store::open(path, opts.clone()) {
            Err(StoreError::Locked(_)) => std::thread::sleep(Duration::from_millis(10)),
            r => return r.unwrap(),
        }
    }
    panic!("store still locked 2 s after close");
}
