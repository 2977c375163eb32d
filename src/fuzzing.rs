//! Properties checked on arbitrary input by the fuzz targets (`tools/fuzz`, cargo-fuzz) and by
//! their proptest versions and crash regressions in `cargo test` (`tests/fuzz_props.rs`). Each
//! function panics when a property fails; it never panics on input that merely is bad.
//!
//! - The ingest parsers (native JSON / NDJSON, Flux's single and batch shapes): any input gives
//!   updates or a clear error; accepted updates read back identically from their export form
//!   (what `outbox-dump export` writes and another worker ingests).
//! - The record decoder: any bytes, with or without a valid envelope (version byte + CRC32),
//!   decode to a record or an error, within the decode size limit; a decoded record
//!   re-encodes to bytes that decode to the same record.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::ingest_parse::{parse_flux_batch, parse_flux_single, parse_native, to_native_json};
use crate::model::Update;
use crate::record::{
    self, Counters, DeliveredRecord, LogRecord, PendingRecord, QuarantineRecord, SuspectRecord,
    TombstoneRecord, RECORD_VERSION,
};
use crate::validate::Rules;

/// Fixed arrival time, so a run is reproducible.
const NOW_MS: u64 = 1_772_366_400_000;

fn rules(public_mode: bool) -> Rules {
    Rules {
        public_mode,
        protected: vec!["command".into(), "cmd_id".into()],
    }
}

/// The first byte picks the mode (bit 0: NDJSON, bit 1: public mode); the rest is the body.
pub fn ingest_native(data: &[u8]) {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let public = mode & 2 != 0;
    if let Ok(updates) = parse_native(body, mode & 1 != 0, NOW_MS, &rules(public)) {
        reads_back(&updates, public);
    }
}

/// The first byte picks the shape (bit 0: batch, else single) and bit 1 public mode.
pub fn ingest_flux(data: &[u8]) {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let public = mode & 2 != 0;
    let parsed = if mode & 1 != 0 {
        parse_flux_batch(body, &rules(public))
    } else {
        parse_flux_single(body, &rules(public))
    };
    if let Ok(updates) = parsed {
        reads_back(&updates, public);
    }
}

/// Accepted updates, written in the native export form, parse back to the same updates.
fn reads_back(updates: &[Update], public: bool) {
    assert!(
        !updates.is_empty(),
        "a parser accepted a request with no update"
    );
    let mut ndjson = String::new();
    for u in updates {
        ndjson.push_str(&to_native_json(u).to_string());
        ndjson.push('\n');
    }
    let again =
        parse_native(ndjson.as_bytes(), true, NOW_MS + 1, &rules(public)).unwrap_or_else(|e| {
            panic!("the export form of accepted updates is refused: {e}\n{ndjson}")
        });
    assert_eq!(again.len(), updates.len(), "{ndjson}");
    for (a, b) in updates.iter().zip(&again) {
        assert_eq!(
            (&a.entity, &a.op, a.ts_ms),
            (&b.entity, &b.op, b.ts_ms),
            "an update changed on its way through the export form"
        );
    }
}

/// Every record type, on the bytes as given and on them wrapped in a valid envelope (so the
/// fuzzer reaches the payload decoder past the checksum).
pub fn record_decode(data: &[u8]) {
    all_records(data);
    let mut enveloped = Vec::with_capacity(data.len() + 5);
    enveloped.push(RECORD_VERSION);
    enveloped.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    enveloped.extend_from_slice(data);
    all_records(&enveloped);
}

fn all_records(bytes: &[u8]) {
    stable::<LogRecord>(bytes);
    stable::<PendingRecord>(bytes);
    stable::<DeliveredRecord>(bytes);
    stable::<QuarantineRecord>(bytes);
    stable::<TombstoneRecord>(bytes);
    stable::<SuspectRecord>(bytes);
    stable::<Counters>(bytes);
}

fn stable<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(bytes: &[u8]) {
    if let Ok(v) = record::decode::<T>(bytes) {
        let again: T = record::decode(&record::encode(&v))
            .unwrap_or_else(|e| panic!("a decoded record does not decode after re-encoding: {e}"));
        assert_eq!(v, again, "a record changed through encode/decode");
    }
}
