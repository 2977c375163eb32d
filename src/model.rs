//! The data every boundary of flux-outbox shares: an update as ingest accepts it, the
//! version that orders updates of one key, and the limits that apply to all of them.
//!
//! Ordering rule (durability contract 3): per (entity, property) key the newest value wins,
//! newest meaning the larger `Version`, i.e. source timestamp first, ingest sequence second.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The property name Flux treats as "delete this entity" when its value is `true`.
pub const DELETE_PROPERTY: &str = "__deleted__";

/// Flux refuses an event whose serialized form (with its eventId) reaches 1 MiB; stay well under
/// it so the envelope (stream, source, timestamp, eventId, JSON escaping) always fits.
pub const EVENT_BYTES_MAX: usize = 1_000_000;
/// Longest entity id accepted. Flux has no documented cap; ours keeps keys small on disk.
pub const ENTITY_ID_BYTES_MAX: usize = 512;
/// Longest property name accepted.
pub const PROPERTY_NAME_BYTES_MAX: usize = 256;
/// Most properties in one update.
pub const PROPERTIES_PER_UPDATE_MAX: usize = 10_000;

/// What an update does to its entity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum UpdateOp {
    /// Upsert these properties (name -> JSON value). Never empty.
    Set(BTreeMap<String, serde_json::Value>),
    /// Delete the whole entity (delivered as Flux's tombstone `{"__deleted__": true}`).
    Delete,
}

/// One accepted update, before it gets its ingest sequence number.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Update {
    pub entity: String,
    pub op: UpdateOp,
    /// Source (observation) time, epoch milliseconds. Ingest fills in arrival time when absent.
    pub ts_ms: u64,
    /// Flux stream for this update; `None` means the configured default.
    pub stream: Option<String>,
    /// Flux source for this update; `None` means the configured default.
    pub source: Option<String>,
}

impl Update {
    /// Number of (entity, property) keys this update writes (a delete counts as one).
    pub fn key_count(&self) -> usize {
        match &self.op {
            UpdateOp::Set(props) => props.len(),
            UpdateOp::Delete => 1,
        }
    }
}

/// Orders the values of one key: source timestamp, then ingest sequence (unique per store).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    pub ts_ms: u64,
    pub seq: u64,
}

/// An outbox key: one property of one entity. The entity delete is the key
/// `(entity, DELETE_PROPERTY)`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PropKey {
    pub entity: String,
    pub property: String,
}

impl PropKey {
    pub fn new(entity: impl Into<String>, property: impl Into<String>) -> Self {
        PropKey {
            entity: entity.into(),
            property: property.into(),
        }
    }
    pub fn is_delete(&self) -> bool {
        self.property == DELETE_PROPERTY
    }
}

/// Current wall-clock time in epoch milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A stable 64-bit hash of a JSON value (FNV-1a over its canonical serialization: serde_json
/// sorts object keys), used to compare a value with what was delivered without storing it.
pub fn value_hash(value: &serde_json::Value) -> u64 {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}
