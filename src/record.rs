//! The on-disk record codec: every value flux-outbox stores in sled is
//!
//! ```text
//! +---------+----------------+-------------------------------+
//! | version | crc32 (LE, 4B) | bincode 1.3 payload           |
//! |   1 B   | of the payload | (varint, size-limited decode) |
//! +---------+----------------+-------------------------------+
//! ```
//!
//! JSON values inside records are kept as JSON bytes (bincode is not self-describing and cannot
//! round-trip `serde_json::Value`). WARNING: the structs below are the on-disk format. Do not
//! reorder, remove or retype fields; add a new record version instead and keep decoding the old.

use bincode::Options;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::model::Version;

/// The record envelope version written by this build.
pub const RECORD_VERSION: u8 = 1;
/// The store layout version (meta key `format_version`) written by this build.
pub const FORMAT_VERSION: u32 = 1;
/// No stored record may decode to more than this (defends against a corrupted length field).
pub const RECORD_BYTES_MAX: u64 = 8 * 1024 * 1024;

/// Why a stored value could not be decoded. Every such record is set aside, never fatal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record too short ({0} bytes)")]
    Truncated(usize),
    #[error("unknown record version {0} (this build reads {RECORD_VERSION})")]
    UnknownVersion(u8),
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("payload does not decode: {0}")]
    Payload(String),
}

fn options() -> impl Options {
    bincode::DefaultOptions::new().with_limit(RECORD_BYTES_MAX)
}

/// Encodes a record with its envelope.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own plain structs into a Vec cannot fail except past the size limit,
    // which ingest validation (EVENT_BYTES_MAX) keeps us far below.
    let payload = options().serialize(value).unwrap_or_default();
    let mut out = Vec::with_capacity(payload.len() + 5);
    out.push(RECORD_VERSION);
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes a record, checking version and checksum first.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() < 5 {
        return Err(DecodeError::Truncated(bytes.len()));
    }
    if bytes[0] != RECORD_VERSION {
        return Err(DecodeError::UnknownVersion(bytes[0]));
    }
    let stored = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let payload = &bytes[5..];
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(DecodeError::Checksum { stored, computed });
    }
    options()
        .deserialize(payload)
        .map_err(|e| DecodeError::Payload(e.to_string()))
}

/// One accepted update in the write-ahead log (key: `L` + seq).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    pub entity: String,
    /// true: delete the entity (props is empty).
    pub delete: bool,
    /// (property name, JSON bytes of the value).
    pub props: Vec<(String, Vec<u8>)>,
    pub ts_ms: u64,
    pub stream: Option<String>,
    pub source: Option<String>,
    pub arrived_ms: u64,
}

/// The newest pending value of one key (key: `P` + key).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PendingRecord {
    pub ts_ms: u64,
    pub seq: u64,
    /// JSON bytes of the value.
    pub value: Vec<u8>,
    pub stream: Option<String>,
    pub source: Option<String>,
    /// Sequence of the value that first made this key pending: its place in the delivery
    /// order (index key `I` + first_seq + key). Superseding keeps it, so a hot key never starves.
    pub first_seq: u64,
    pub pending_since_ms: u64,
    pub attempts: u32,
    pub last_error: Option<String>,
}

impl PendingRecord {
    pub fn version(&self) -> Version {
        Version {
            ts_ms: self.ts_ms,
            seq: self.seq,
        }
    }
}

/// What was last delivered for a key (key: `D` + key): enough to drop late updates and to detect
/// that another writer changed the value since, without keeping the value itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveredRecord {
    pub ts_ms: u64,
    pub seq: u64,
    pub value_hash: u64,
    pub delivered_at_ms: u64,
}

impl DeliveredRecord {
    pub fn version(&self) -> Version {
        Version {
            ts_ms: self.ts_ms,
            seq: self.seq,
        }
    }
}

/// A value Flux rejected for good (key: `Q` + key).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuarantineRecord {
    pub pending: PendingRecord,
    pub reason: String,
    pub http_status: Option<u16>,
    pub quarantined_at_ms: u64,
}

/// The newest delete version of an entity (key: `T` + entity), pending or delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TombstoneRecord {
    pub ts_ms: u64,
    pub seq: u64,
}

impl TombstoneRecord {
    pub fn version(&self) -> Version {
        Version {
            ts_ms: self.ts_ms,
            seq: self.seq,
        }
    }
}

/// The flush worker's convergence memory of one entity (key: `S` + entity): an entity with a
/// write of unknown outcome that Flux may still apply late. Durable so that a restart still
/// repairs such a late write after the newer value was delivered (and deleted from pending).
/// `state` is the flusher's own JSON encoding (it holds JSON values, which bincode cannot).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuspectRecord {
    /// End of the convergence window, epoch ms.
    pub until_ms: u64,
    pub state: Vec<u8>,
}

/// Counters kept in the store (meta key `counters`), written in the same atomic batch as the
/// changes they count, so they agree with the contents after any crash.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub pending_keys: u64,
    pub pending_entities: u64,
    pub quarantine_keys: u64,
    pub superseded: u64,
    pub late_dropped: u64,
    pub delivered: u64,
    pub quarantined_total: u64,
    pub requeued: u64,
    pub corrupt_set_aside: u64,
    pub compacted_records: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PendingRecord {
        PendingRecord {
            ts_ms: 1,
            seq: 2,
            value: b"42".to_vec(),
            stream: None,
            source: Some("s".into()),
            first_seq: 2,
            pending_since_ms: 3,
            attempts: 0,
            last_error: None,
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&sample());
        assert_eq!(decode::<PendingRecord>(&bytes), Ok(sample()));
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let bytes = encode(&sample());
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(
                    decode::<PendingRecord>(&b).is_err(),
                    "flip at byte {i} bit {bit}"
                );
            }
        }
    }

    #[test]
    fn truncation_and_unknown_version_are_errors() {
        let bytes = encode(&sample());
        for len in 0..bytes.len() {
            assert!(decode::<PendingRecord>(&bytes[..len]).is_err());
        }
        let mut b = bytes.clone();
        b[0] = 9;
        assert_eq!(
            decode::<PendingRecord>(&b),
            Err(DecodeError::UnknownVersion(9))
        );
    }

    #[test]
    fn a_huge_length_prefix_is_refused_without_allocating_it() {
        // A vec length of u64::MAX, correctly checksummed: the decoder must refuse, not allocate.
        let payload = [0xffu8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        let mut b = vec![RECORD_VERSION];
        b.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        b.extend_from_slice(&payload);
        assert!(decode::<LogRecord>(&b).is_err());
    }
}
