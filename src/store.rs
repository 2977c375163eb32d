//! The outbox engine: a durable write-ahead outbox in one sled tree.
//!
//! # Invariants
//! 1. `ingest` answers only after its updates are in the log AND the log is durable: one atomic
//!    sled batch per commit group, then `flush()` and (in `Durability::Fsync`) fdatasync of the
//!    store file and of any new blob file (group commit: one sync for every caller in the group).
//! 2. The compactor folds log records into the pending set in sequence order, one atomic batch per
//!    step: the records it folds are removed in the same batch that applies them, so a crash at
//!    any point either redoes a step or finds it done. It never lets an older value win.
//! 3. Per key, the pending value is the newest by `Version` (source ts, then seq). A value not
//!    newer than the pending one, the last delivered one or the entity's last delete is counted
//!    (superseded / late-dropped) and discarded; nothing else is ever discarded.
//! 4. A pending value is removed only by `settle` with `Outcome::Delivered` for exactly its
//!    version (compare-and-swap under the state lock), or moved to quarantine with its reason.
//! 5. An entity is in at most one claimed (in-flight) batch at a time; claims live in memory and
//!    are released on restart, so a crash can only cause a resend, never a loss.
//! 6. The counters in `M counters` are written in the same batch as the change they count.
//! 7. A record that fails its checksum or decoding is moved to the `X` area and counted; it never
//!    stops progress. A store sled cannot open is moved aside and a fresh one started, loudly.
//!    A malformed format record is damage, not a newer version (see Recovery).
//!
//! # On-disk layout (one sled tree; key prefix byte, then the rest)
//! | prefix | key                         | value                          |
//! |--------|-----------------------------|--------------------------------|
//! | `M`    | name                        | meta (`format_version` raw u32 BE, `next_seq` u64 BE, `counters`; `rebuild_derived` empty, only while a salvage is unfinished) |
//! | `L`    | seq u64 BE                  | [`LogRecord`]: the write-ahead log, not yet compacted |
//! | `P`    | keyenc(entity, property)    | [`PendingRecord`]: newest pending value per key |
//! | `I`    | first_seq u64 BE + keyenc   | empty: delivery order (oldest pending first) |
//! | `E`    | entity                      | u64 BE: pending keys of the entity |
//! | `D`    | keyenc                      | [`DeliveredRecord`]: last delivered version and value hash |
//! | `T`    | entity                      | [`TombstoneRecord`]: newest delete version of the entity |
//! | `Q`    | keyenc                      | [`QuarantineRecord`]: rejected for good, with the reason |
//! | `S`    | entity                      | [`SuspectRecord`]: the flusher's convergence memory (unknown outcomes) |
//! | `X`    | ordinal u64 BE + original key | raw bytes of a record set aside as corrupt |
//!
//! `keyenc(e, p)` = entity length (u32 BE) + entity bytes + property bytes: unambiguous for any
//! strings, and all keys of one entity share the prefix `len + entity`.
//! An entity delete is the pending key `(entity, "__deleted__")` with the value `true`.
//!
//! # Limits (`admit`)
//! When accepting a request would take pending + uncompacted keys above `pending_keys_max`, or
//! the store is at `disk_bytes_max` (measured at open and refreshed periodically), a request is
//! accepted only if every key it sets is already held: pending, quarantined, in the uncompacted
//! log (a full store folds the log first to see it), or set by a request earlier in the same
//! commit group. The uncompacted keys count every key of every log record, rewrites of pending
//! keys included, so the fold also corrects that over-count: when the store is below its limits
//! after the fold, the request is accepted. Deletes are always accepted. Otherwise
//! `StoreError::Full` (HTTP 507); nothing already accepted is ever dropped to make room.
//! Below the limits, `admit` reads the counts without the state lock (a compaction step holds
//! it for the whole step); that view can only read high, and a store that looks full is judged
//! again on the exact counts under the lock (`Store::seen_keys`).
//!
//! # Space: what a drained store keeps (decided, measured)
//! `shrink_if_drained` rotates a drained store to a fresh one holding only `M`, `D`, `T`, `Q`
//! and `X`. `D` and `T` are NOT dropped at rotation, nor after any horizon (only a delivered
//! delete replaces an entity's older `D` records by its `T` record): a late update older than the
//! delivered value (or the entity's delete) is recognised only by them, and conflict detection
//! needs the delivered hash; dropping them after a horizon would let a long-offline producer
//! roll Flux back. Their cost is bounded by the distinct keys ever delivered (the gateway's tag
//! set), not by traffic: measured 1,000,000 delivered keys (entity ids of 32 bytes, property
//! names of 26) = 258 MB after rotation, about 260 bytes per key
//! (so about 3 MB for 10,000 keys, by that rate).
//!
//! # Recovery when sled cannot open the store (what is salvaged, exactly)
//! The directory is renamed to `store.corrupt-<epoch ms>` and a fresh store is created. Salvage
//! then opens the moved-aside store as it is, or else a scratch copy of it without sled's `conf`
//! file (a damaged `conf` alone makes sled refuse intact data). If one of them opens, every
//! record sled can iterate is read, in key order, up to the first read error: a record that
//! passes this build's checks (envelope version, CRC, payload, key shape) is copied raw and
//! counted in `OpenReport::salvaged_records`; one that fails them is set aside in the fresh
//! store's `X` area (counted in `corrupt_set_aside` and `OpenReport::salvage_set_aside`).
//! Then the derived records (`I`, `E`) are rebuilt from the copied `P` records and the content
//! counters (pending keys and entities, quarantine, set-aside) are recounted, so a salvage cut
//! short leaves a store that `verify` finds consistent; the history counters (superseded,
//! delivered, ...) are kept as copied. The fresh store carries the `Mrebuild_derived` mark from
//! the start of the salvage until that rebuild is done, so a crash in between redoes it at the
//! next open. If neither opens (damage in the `db` file itself that sled refuses), nothing is
//! salvaged: the count is 0, the fresh store starts empty, and the moved-aside directory is
//! kept untouched for the operator (never deleted automatically).
//!
//! A format record that is not 4 bytes is damage (this and newer builds write 4 bytes). When
//! every other record passes this build's checks, the data is of this version: the bad record
//! is set aside in `X` (counted) and rewritten with this build's version in one batch, the
//! store opens in place and `OpenReport::format_record_repaired` says so. When any other record
//! fails the checks as well, the version of the data is not known: the store is moved aside and
//! salvaged as above (only what passes the checks becomes live).
//!
//! A store whose (well-formed) format version is NEWER than this build's is never moved aside
//! or salvaged: `open` fails with `StoreError::NewerFormat` and the worker exits (systemd's start
//! limit ends the restarts). This is deliberate: data of a format this build does not know is
//! never touched. (A moved-aside store found to be of a newer format is copied as it is,
//! unchecked, and then refused the same way.)

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::model::{now_ms, PropKey, Update, UpdateOp, Version, DELETE_PROPERTY};
use crate::record::{
    self, Counters, DecodeError, DeliveredRecord, LogRecord, PendingRecord, QuarantineRecord,
    SuspectRecord, TombstoneRecord, FORMAT_VERSION,
};

const META_FORMAT: &[u8] = b"Mformat_version";
const META_NEXT_SEQ: &[u8] = b"Mnext_seq";
const META_COUNTERS: &[u8] = b"Mcounters";
/// Present while a salvage into this (fresh) store is unfinished: the next open rebuilds the
/// derived records (`I`, `E`) from `P` and recounts the counters before anything else.
const META_REBUILD: &[u8] = b"Mrebuild_derived";
/// The name of the sled directory inside the data directory.
pub const STORE_DIR: &str = "store";
/// Most updates gathered into one commit group (bounds the batch and the time callers wait).
const GROUP_UPDATES_MAX: usize = 50_000;
/// Most ingest requests waiting for the writer thread (backpressure beyond this).
const INGEST_QUEUE_MAX: usize = 1024;

/// How durable an acknowledged ingest is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// flush + fdatasync: survives kill -9 and power loss.
    Fsync,
    /// flush only: survives kill -9, not power loss (operator's explicit choice).
    Flush,
}

#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub durability: Durability,
    pub cache_bytes: u64,
    /// New keys are refused (updates of pending keys and deletes still accepted) when accepting
    /// them would take pending + uncompacted log keys above this.
    pub pending_keys_max: u64,
    /// New keys are refused (existing keys still accepted) at or above this many bytes on disk.
    pub disk_bytes_max: u64,
    /// Extra wait for more callers before a commit (0: commit what is queued right away).
    pub group_commit_window: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            durability: Durability::Fsync,
            cache_bytes: 4 * 1024 * 1024,
            pending_keys_max: 2_000_000,
            disk_bytes_max: 4 * 1024 * 1024 * 1024,
            group_commit_window: Duration::ZERO,
        }
    }
}

/// Errors of the engine, grouped by how callers handle them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The outbox is at its key or disk limit and the request would add new keys (HTTP 507).
    #[error("outbox full: {0}; updates of keys already pending are still accepted")]
    Full(String),
    /// The store is closing (HTTP 503).
    #[error("outbox is shutting down")]
    Closed,
    /// The disk refused the write (HTTP 507); nothing of the request was acknowledged.
    #[error("storage write failed: {0}")]
    Storage(String),
    /// The store cannot be opened for a reason of its surroundings, not of its contents (the
    /// disk is full, a quota, permissions, a read-only filesystem): it is left exactly as it
    /// is; the caller waits and tries again.
    #[error("store at {path} cannot be opened now: {reason}; it is left untouched, nothing was moved or lost")]
    Unavailable { path: PathBuf, reason: String },
    /// Another process holds the store (the worker is running): use the admin API.
    #[error("store at {0} is locked by another process (is the worker running?)")]
    Locked(PathBuf),
    /// The store was written by a newer flux-outbox; refusing to touch it.
    #[error("store at {path} has format version {found}, this build reads up to {supported}; upgrade flux-outbox")]
    NewerFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{0}")]
    Other(String),
}

impl StoreError {
    fn storage(e: impl std::fmt::Display) -> Self {
        StoreError::Storage(e.to_string())
    }
}

/// What opening a store found and did (logged loudly by the caller when not clean).
#[derive(Clone, Debug, Default, Serialize)]
pub struct OpenReport {
    pub created: bool,
    /// The previous store could not be opened and was moved here.
    pub moved_aside_to: Option<PathBuf>,
    pub salvaged_records: u64,
    /// Records read from the moved-aside store that failed this build's checks: set aside in
    /// the fresh store's `X` area (also counted in `corrupt_set_aside`), not copied as live.
    pub salvage_set_aside: u64,
    /// The format version record was malformed (not 4 bytes) while every other record passed
    /// this build's checks: its bytes were set aside in `X` (counted) and it was rewritten
    /// with this build's version.
    pub format_record_repaired: bool,
    pub open_error: Option<String>,
    /// Acknowledged updates the store no longer holds: sequence numbers from the first to the
    /// last missing (see [`ACKED_SEQ_FILE`]). Damage to sled's own files makes sled drop
    /// everything after it; this is how that loss is noticed, since sled reports none.
    pub lost_seqs: Option<(u64, u64)>,
}

/// File beside the store (in the data directory) holding the last acknowledged sequence
/// number: 8 bytes BE + CRC32 LE, rewritten in place after every successful group commit (no
/// extra sync: it is written after the commit's own sync, so it never runs ahead of what is
/// durable in `fsync` mode). A store that opens with a lower sequence lost acknowledged data.
pub const ACKED_SEQ_FILE: &str = "acked.seq";

fn read_acked_seq(data_dir: &Path) -> Option<u64> {
    let b = std::fs::read(data_dir.join(ACKED_SEQ_FILE)).ok()?;
    if b.is_empty() {
        return None; // created, nothing acknowledged yet
    }
    if b.len() != 12 || crc32fast::hash(&b[..8]).to_le_bytes() != b[8..12] {
        tracing::warn!("{ACKED_SEQ_FILE} is damaged; the loss check is skipped this time");
        return None;
    }
    u64_of(&b[..8])
}

fn acked_seq_bytes(seq: u64) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&seq.to_be_bytes());
    let crc = crc32fast::hash(&b[..8]).to_le_bytes();
    b[8..].copy_from_slice(&crc);
    b
}

/// The result of a successful ingest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct IngestAck {
    pub accepted: usize,
    /// Sequence of the last accepted update (0 when nothing was accepted).
    pub seq: u64,
}

/// Cheap statistics.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    pub pending_keys: u64,
    pub pending_entities: u64,
    pub oldest_pending_ms: Option<u64>,
    pub log_backlog: u64,
    pub quarantine_keys: u64,
    pub superseded: u64,
    pub late_dropped: u64,
    pub delivered: u64,
    pub quarantined_total: u64,
    pub requeued: u64,
    pub corrupt_set_aside: u64,
    pub in_flight_entities: u64,
    pub disk_bytes: u64,
    pub next_seq: u64,
    pub format_version: u32,
}

/// One property of a claimed event.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimedProp {
    pub name: String,
    pub value: serde_json::Value,
    pub version: Version,
    pub delivered: Option<DeliveredRecord>,
    pub attempts: u32,
    pub pending: PendingRecord,
}

/// One entity's worth of a claim: becomes one Flux event.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimedEvent {
    pub entity: String,
    /// This event is the entity delete (`props` holds the single `__deleted__` key).
    pub delete: bool,
    pub props: Vec<ClaimedProp>,
    pub stream: Option<String>,
    pub source: Option<String>,
    /// The entity delete this worker delivered last, if any (its `D` record survives the
    /// property records it cleared): a property's last delivery is the newer of the two.
    /// Read once per entity at claim; only a settle of this (claimed) entity writes it.
    pub delivered_delete: Option<DeliveredRecord>,
}

impl ClaimedEvent {
    /// The newest source timestamp among the event's properties (the Flux event timestamp).
    pub fn ts_ms(&self) -> u64 {
        self.props
            .iter()
            .map(|p| p.version.ts_ms)
            .max()
            .unwrap_or(0)
    }
    /// Rough size of the event's properties on the wire.
    pub fn approx_bytes(&self) -> usize {
        self.entity.len()
            + 96
            + self
                .props
                .iter()
                .map(|p| p.name.len() + p.pending.value.len() + 4)
                .sum::<usize>()
    }
}

/// A batch taken by the flush worker. Every entity in it must be settled (or the claim
/// dropped via `release_all`) before it can be claimed again.
#[derive(Clone, Debug, Default)]
pub struct Claim {
    pub events: Vec<ClaimedEvent>,
}

#[derive(Clone, Copy, Debug)]
pub struct ClaimLimits {
    pub events_max: usize,
    pub bytes_max: usize,
}

/// What became of one claimed key.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Flux acknowledged (or already held) exactly this version.
    Delivered { value_hash: u64 },
    /// Flux rejected it for good.
    Quarantine {
        reason: String,
        http_status: Option<u16>,
    },
    /// Not delivered (or unknown): keep it pending.
    Retry { error: String },
}

#[derive(Clone, Debug)]
pub struct Settlement {
    pub key: PropKey,
    pub sent: PendingRecord,
    pub outcome: Outcome,
}

/// A row of the pending or quarantine listings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Row {
    pub entity: String,
    pub property: String,
    pub value: serde_json::Value,
    pub ts_ms: u64,
    pub seq: u64,
    pub pending_since_ms: u64,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub reason: Option<String>,
    pub http_status: Option<u16>,
    pub quarantined_at_ms: Option<u64>,
}

/// A row of the uncompacted log listing.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LogRow {
    pub seq: u64,
    pub entity: String,
    pub delete: bool,
    pub properties: BTreeMap<String, serde_json::Value>,
    pub ts_ms: u64,
    pub arrived_ms: u64,
}

/// What `verify` found.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct VerifyReport {
    pub records: u64,
    pub problems: Vec<String>,
}

struct IngestReq {
    updates: Vec<Update>,
    reply: oneshot::Sender<Result<IngestAck, StoreError>>,
}

/// Mutable engine state guarded by one lock: every read-modify-write of P/I/E/D/T/Q/M counters
/// happens under it, which makes compare-and-swap trivially correct.
struct State {
    counters: Counters,
    in_flight: HashSet<String>,
}

struct SyncFiles {
    db_file: Option<File>,
    blobs_synced_upto: u64,
}

struct Inner {
    dir: PathBuf,
    /// Swapped only by `shrink_if_drained` (rotation to a fresh store), under `writer_gate`
    /// and the state lock; everyone else takes a cheap clone per operation.
    db: std::sync::RwLock<sled::Db>,
    /// Held by the writer thread for a whole commit group and by rotation, so a rotation never
    /// races a commit. Lock order: writer_gate, then state.
    writer_gate: Mutex<()>,
    opts: StoreOptions,
    state: Mutex<State>,
    sync: Mutex<SyncFiles>,
    ingest_tx: Mutex<Option<mpsc::Sender<IngestReq>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    next_seq: AtomicU64,
    /// [`ACKED_SEQ_FILE`], kept open; written after each successful commit.
    acked_seq_file: Mutex<Option<File>>,
    /// Keys written to the log and not compacted yet: counted against the key limit so a burst
    /// of new keys cannot overshoot it by more than what is in flight.
    log_keys: AtomicU64,
    /// `counters.pending_keys` as last published under the state lock: `admit` reads it
    /// (with `log_keys`) without waiting for the lock, which a compaction step holds for the
    /// whole step. See [`Store::publish_counters`] for why the pair never reads low.
    pending_keys_seen: AtomicU64,
    /// Encoded log bytes acknowledged since this process opened the store (monotonic, in
    /// memory): the flush worker's byte-size trigger compares it with its value at the last
    /// flush, so a burst of large values is sent without waiting for the interval.
    ingested_bytes: AtomicU64,
    disk_bytes: AtomicU64,
    /// Bytes on disk right after the last rotation: the live size. Another rotation only pays
    /// when the store has grown well past it (otherwise a large delivered-record set would
    /// rotate again and again).
    rotated_bytes: AtomicU64,
    closed: AtomicBool,
    /// Writer liveness for the watchdog: [`writer_clock_ms`] when the writer took the commit
    /// group it is working on off the queue; 0 while it waits for work. Two relaxed stores
    /// per group, no extra I/O.
    writer_busy_since: AtomicU64,
    /// [`now_ms`] of the first storage write failure since open (0: none). sled keeps an I/O
    /// error for the rest of the handle's life, so the worker reopens the store (a restart in
    /// place) once the cause is gone; see [`Store::storage_failed`].
    storage_failed_ms: AtomicU64,
    storage_error: Mutex<Option<String>>,
}

/// Handle to the outbox engine; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

// ---------------------------------------------------------------------------------------------
// key encoding

pub(crate) fn keyenc(prefix: u8, entity: &str, property: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + entity.len() + property.len());
    k.push(prefix);
    k.extend_from_slice(&(entity.len() as u32).to_be_bytes());
    k.extend_from_slice(entity.as_bytes());
    k.extend_from_slice(property.as_bytes());
    k
}

fn entity_prefix(prefix: u8, entity: &str) -> Vec<u8> {
    keyenc(prefix, entity, "")
}

/// Decodes `keyenc` without its prefix byte.
pub(crate) fn keydec(rest: &[u8]) -> Option<PropKey> {
    if rest.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let entity = rest.get(4..4 + len)?;
    let property = rest.get(4 + len..)?;
    Some(PropKey {
        entity: String::from_utf8(entity.to_vec()).ok()?,
        property: String::from_utf8(property.to_vec()).ok()?,
    })
}

fn seq_key(prefix: u8, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(prefix);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn index_key(first_seq: u64, key: &PropKey) -> Vec<u8> {
    let mut k = seq_key(b'I', first_seq);
    k.extend_from_slice(&keyenc(b'I', &key.entity, &key.property)[1..]);
    k
}

/// Key of a record set aside as corrupt: `X` + ordinal (u64 BE) + the original key.
fn corrupt_key(ordinal: u64, original: &[u8]) -> Vec<u8> {
    let mut k = seq_key(b'X', ordinal);
    k.extend_from_slice(original);
    k
}

/// Whether a sled error comes from the store's surroundings (full disk, quota, permissions,
/// read-only filesystem, no memory or file handles) rather than from damaged contents: such a
/// store must never be moved aside as corrupt, only retried once the surroundings recover.
pub fn is_environmental(e: &sled::Error) -> bool {
    let sled::Error::Io(io) = e else {
        return false;
    };
    use std::io::ErrorKind as K;
    matches!(
        io.kind(),
        K::StorageFull
            | K::QuotaExceeded
            | K::PermissionDenied
            | K::ReadOnlyFilesystem
            | K::OutOfMemory
    ) || matches!(
        io.raw_os_error(),
        Some(
            libc::ENOSPC
                | libc::EDQUOT
                | libc::EACCES
                | libc::EPERM
                | libc::EROFS
                | libc::ENOMEM
                | libc::EMFILE
                | libc::ENFILE
        )
    )
}

fn simple_key(prefix: u8, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(prefix);
    k.extend_from_slice(name.as_bytes());
    k
}

fn u64_of(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

fn json_of(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or(serde_json::Value::Null)
}

// ---------------------------------------------------------------------------------------------
// A read-your-writes overlay over the tree, committed as one atomic batch.

struct Txn<'a> {
    tree: &'a sled::Db,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    corrupt: Vec<(Vec<u8>, Vec<u8>)>,
}

impl<'a> Txn<'a> {
    fn new(tree: &'a sled::Db) -> Self {
        Txn {
            tree,
            writes: BTreeMap::new(),
            corrupt: Vec::new(),
        }
    }

    fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.writes.get(key) {
            return Ok(v.clone());
        }
        Ok(self
            .tree
            .get(key)
            .map_err(StoreError::storage)?
            .map(|v| v.to_vec()))
    }

    /// Reads and decodes a record; a corrupt one is scheduled to be set aside and reads as absent.
    fn get<T: serde::de::DeserializeOwned>(&mut self, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.get_raw(key)? {
            None => Ok(None),
            Some(bytes) => match record::decode::<T>(&bytes) {
                Ok(v) => Ok(Some(v)),
                Err(e) => {
                    tracing::error!(key = %String::from_utf8_lossy(key), error = %e, "corrupt record set aside");
                    self.corrupt.push((key.to_vec(), bytes));
                    self.writes.insert(key.to_vec(), None);
                    Ok(None)
                }
            },
        }
    }

    fn put<T: Serialize>(&mut self, key: Vec<u8>, value: &T) {
        self.writes.insert(key, Some(record::encode(value)));
    }

    fn put_raw(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert(key, Some(value));
    }

    fn remove(&mut self, key: Vec<u8>) {
        self.writes.insert(key, None);
    }

    /// Keys under a prefix as the transaction sees them (tree merged with the overlay).
    fn keys_with_prefix(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut keys: std::collections::BTreeSet<Vec<u8>> = std::collections::BTreeSet::new();
        for item in self.tree.scan_prefix(prefix).keys() {
            keys.insert(item.map_err(StoreError::storage)?.to_vec());
        }
        for (k, v) in self.writes.range(prefix.to_vec()..) {
            if !k.starts_with(prefix) {
                break;
            }
            if v.is_some() {
                keys.insert(k.clone());
            } else {
                keys.remove(k);
            }
        }
        Ok(keys.into_iter().collect())
    }

    /// Applies the overlay, the set-aside records and `counters` (updated with the set-aside
    /// count) in one atomic batch. `counters` is the caller's copy: it holds the stored values
    /// afterwards, so the in-memory counters can never differ from what was written.
    fn commit(self, counters: &mut Counters) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let mut next = counters.clone();
        for (k, v) in self.corrupt {
            // The ordinal makes every set-aside key unique: the same key can go bad twice
            // (e.g. a rewritten pending value), and `X` + key alone would overwrite the first
            // copy, losing it and leaving `corrupt_set_aside` larger than the area.
            batch.insert(corrupt_key(next.corrupt_set_aside, &k), v);
            next.corrupt_set_aside += 1;
        }
        for (k, v) in self.writes {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        batch.insert(META_COUNTERS, record::encode(&next));
        self.tree.apply_batch(batch).map_err(StoreError::storage)?;
        *counters = next;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------

/// Opens the sled tree of a store directory as it is (no checks, no repair, no salvage),
/// waiting like [`open_when_unlocked`] while a handle this process just closed still holds its
/// lock. For tests and tools that read or tamper with raw records of a stopped store.
pub fn open_tree_raw(path: &Path) -> sled::Result<sled::Db> {
    open_when_unlocked(path, &StoreOptions::default())
}

/// Opens a sled tree this process has just closed, retrying for up to
/// `REOPEN_LOCK_WAIT_MS_MAX` while the closed handle's threads still hold its lock.
fn open_when_unlocked(path: &Path, opts: &StoreOptions) -> sled::Result<sled::Db> {
    const REOPEN_LOCK_WAIT_MS_MAX: u64 = 5_000;
    let start = std::time::Instant::now();
    loop {
        match sled_config(path, opts).open() {
            Err(e)
                if is_lock_error(&e)
                    && start.elapsed() < Duration::from_millis(REOPEN_LOCK_WAIT_MS_MAX) =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

fn is_lock_error(e: &sled::Error) -> bool {
    match e {
        sled::Error::Io(io) => {
            io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock")
        }
        _ => false,
    }
}

/// Removes unusable leftovers of an interrupted sled snapshot write before sled opens `path`.
///
/// sled 0.34 writes a snapshot as `snap.<lsn>.generating` and renames it when complete, but
/// when it looks for the newest snapshot at open it does not skip `.generating` files: one cut
/// short (by a full disk during a previous open, or a crash) is taken as the newest snapshot,
/// fails its own length/CRC check, and sled reports the whole store as corrupt. Such a file
/// holds nothing sled could use (the log is the source of truth; the snapshot only speeds up
/// recovery), so it is removed. A complete one (valid CRC) is left for sled to use.
fn remove_torn_snapshots(path: &Path) {
    let Ok(entries) = std::fs::read_dir(path) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with("snap.") && name.ends_with(".generating")) {
            continue;
        }
        let p = entry.path();
        let valid = std::fs::read(&p).is_ok_and(|buf| {
            // sled's layout: body, u64 length, u32 CRC32 of the body.
            buf.len() > 12 && {
                let (body, tail) = buf.split_at(buf.len() - 12);
                let crc = u32::from_le_bytes([tail[8], tail[9], tail[10], tail[11]]);
                crc32fast::hash(body) == crc
            }
        });
        if !valid {
            match std::fs::remove_file(&p) {
                Ok(()) => {
                    tracing::warn!(file = %p.display(), "removed a torn sled snapshot left by an interrupted write")
                }
                Err(e) => {
                    tracing::warn!(file = %p.display(), error = %e, "cannot remove a torn sled snapshot")
                }
            }
        }
    }
}

/// The sled configuration of a store at `path` (public so the benchmark's raw limit writes
/// with exactly the worker's options).
pub fn sled_config(path: &Path, opts: &StoreOptions) -> sled::Config {
    sled::Config::new()
        .path(path)
        .cache_capacity(opts.cache_bytes)
        // We flush explicitly at every commit group; sled's own timer adds a safety net for
        // settle/compaction batches, which only ever cause resends if lost.
        .flush_every_ms(Some(500))
        .mode(sled::Mode::LowSpace)
}

/// Creates a directory (and parents) private to this user (0700) and fsyncs its parent so the
/// new entry survives power loss.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !path.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)?;
        if let Some(parent) = path.parent() {
            if let Ok(d) = File::open(parent) {
                let _ = d.sync_all();
            }
        }
    }
    let meta = std::fs::metadata(path)?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

impl Store {
    /// Opens (or creates) the store in `data_dir/store`. A store sled cannot open is moved aside
    /// (`store.corrupt-<epoch ms>`) and a fresh one is started; whatever can be read of the old
    /// one is salvaged into it. A locked store or one of a newer format is an error, untouched.
    pub fn open(data_dir: &Path, opts: StoreOptions) -> Result<(Store, OpenReport), StoreError> {
        create_private_dir(data_dir).map_err(|e| {
            StoreError::Other(format!(
                "cannot create data directory {}: {e}",
                data_dir.display()
            ))
        })?;
        let path = data_dir.join(STORE_DIR);
        recover_rotation(data_dir)?;
        let mut report = OpenReport {
            created: !path.exists(),
            ..Default::default()
        };
        remove_torn_snapshots(&path);
        let db = match sled_config(&path, &opts).open() {
            Ok(db) => match unsound_beside_malformed_format(&db)? {
                None => db,
                Some(why) => {
                    // A malformed format record is damage, not a newer version (a newer build
                    // writes 4 bytes). With other records failing this build's checks too,
                    // the version of the data is unknown: keep the store as found, aside, and
                    // salvage only what passes the checks.
                    drop(db);
                    let e = format!("format version record malformed and {why}");
                    Self::move_aside_and_salvage(data_dir, &opts, e, &mut report)?
                }
            },
            Err(e) if is_lock_error(&e) => return Err(StoreError::Locked(path)),
            Err(e) if is_environmental(&e) => {
                return Err(StoreError::Unavailable {
                    path,
                    reason: e.to_string(),
                })
            }
            Err(e) => Self::move_aside_and_salvage(data_dir, &opts, e.to_string(), &mut report)?,
        };
        Self::from_db(data_dir, db, opts, report)
    }

    /// Renames the store to `store.corrupt-<epoch ms>`, creates a fresh one in its place and
    /// salvages into it what can be read of the old one (see the module doc, Recovery).
    fn move_aside_and_salvage(
        data_dir: &Path,
        opts: &StoreOptions,
        error: String,
        report: &mut OpenReport,
    ) -> Result<sled::Db, StoreError> {
        let path = data_dir.join(STORE_DIR);
        let aside = data_dir.join(format!("{STORE_DIR}.corrupt-{}", now_ms()));
        tracing::error!(store = %path.display(), error = %error, aside = %aside.display(),
            "STORE CANNOT BE OPENED: moving it aside and starting a fresh store");
        std::fs::rename(&path, &aside).map_err(|re| {
            StoreError::Other(format!(
                "store {} cannot be opened ({error}) and cannot be moved aside ({re})",
                path.display()
            ))
        })?;
        report.moved_aside_to = Some(aside.clone());
        report.open_error = Some(error);
        let db = sled_config(&path, opts)
            .open()
            .map_err(StoreError::storage)?;
        let salvage = salvage_into(&aside, &db)?;
        report.salvaged_records = salvage.copied;
        report.salvage_set_aside = salvage.set_aside;
        tracing::error!(
            salvaged = salvage.copied,
            set_aside = salvage.set_aside,
            "salvage finished"
        );
        Ok(db)
    }

    fn from_db(
        data_dir: &Path,
        db: sled::Db,
        opts: StoreOptions,
        report: OpenReport,
    ) -> Result<(Store, OpenReport), StoreError> {
        let path = data_dir.join(STORE_DIR);
        let mut report = report;
        let mut counters_corrupt = false;
        let mut counters = match db.get(META_COUNTERS).map_err(StoreError::storage)? {
            None => Counters::default(),
            Some(v) => match record::decode::<Counters>(&v) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "counters record corrupt: recounting from contents");
                    counters_corrupt = true;
                    Counters::default()
                }
            },
        };
        match db.get(META_FORMAT).map_err(StoreError::storage)? {
            None => {
                db.insert(META_FORMAT, &FORMAT_VERSION.to_be_bytes())
                    .map_err(StoreError::storage)?;
            }
            Some(v) => match <[u8; 4]>::try_from(v.as_ref()).map(u32::from_be_bytes) {
                Ok(found) if found > FORMAT_VERSION => {
                    return Err(StoreError::NewerFormat {
                        path,
                        found,
                        supported: FORMAT_VERSION,
                    });
                }
                Ok(_) => {}
                Err(_) => {
                    // Damage, not a newer version: `open` has checked that every other record
                    // passes this build's checks (otherwise the store was moved aside), so the
                    // data is of this version. The bad bytes are kept in `X` and counted, in
                    // the same batch as the rewritten record.
                    let ordinal = next_corrupt_ordinal(&db)?.max(counters.corrupt_set_aside);
                    let mut next = counters.clone();
                    next.corrupt_set_aside += 1;
                    let mut batch = sled::Batch::default();
                    batch.insert(corrupt_key(ordinal, META_FORMAT), v.to_vec());
                    batch.insert(META_FORMAT, &FORMAT_VERSION.to_be_bytes());
                    if !counters_corrupt {
                        // A corrupt counters record is recounted below, X area included.
                        batch.insert(META_COUNTERS, record::encode(&next));
                    }
                    db.apply_batch(batch).map_err(StoreError::storage)?;
                    counters = next;
                    report.format_record_repaired = true;
                    tracing::error!(
                        malformed = ?v.as_ref(),
                        version = FORMAT_VERSION,
                        "STORE FORMAT RECORD MALFORMED: every other record passes this build's checks; set the bad record aside and rewrote it"
                    );
                }
            },
        }
        if db.contains_key(META_REBUILD).map_err(StoreError::storage)? {
            // A salvage (this open's or one a crash cut short) left derived records and
            // counters that may not match what it copied.
            counters = rebuild_derived(&db, counters)?;
            counters_corrupt = false;
        }
        let stored_next = db
            .get(META_NEXT_SEQ)
            .map_err(StoreError::storage)?
            .and_then(|v| u64_of(&v))
            .unwrap_or(1);
        // The log's last key bounds next_seq from below even if the meta key were lost.
        let last_log = db
            .scan_prefix(b"L")
            .keys()
            .next_back()
            .and_then(|k| k.ok())
            .and_then(|k| u64_of(&k[1..]));
        let mut next_seq = stored_next.max(last_log.map(|s| s + 1).unwrap_or(1)).max(1);
        if let Some(acked) = read_acked_seq(data_dir) {
            if acked >= next_seq {
                report.lost_seqs = Some((next_seq, acked));
                tracing::error!(
                    first_lost_seq = next_seq,
                    last_lost_seq = acked,
                    lost = acked - next_seq + 1,
                    durability = ?opts.durability,
                    "THE STORE LOST ACKNOWLEDGED UPDATES: it holds fewer than were acknowledged (sled drops the rest of its log after damage to its files; in `flush` durability a power loss can do it too). They cannot be recovered from this store."
                );
                // Sequence numbers stay unique across the loss.
                next_seq = acked + 1;
            }
        }
        let acked_seq_file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(data_dir.join(ACKED_SEQ_FILE))
            .map_err(|e| tracing::warn!(error = %e, "cannot open {ACKED_SEQ_FILE}; the loss check is off"))
            .ok();
        // Keys (not records) in the uncompacted tail, the unit ingest and compaction count in:
        // counting records here under-counted multi-property updates after every restart and
        // let a burst of new keys overshoot `pending_keys_max`. Bounded by the log tail only.
        let log_keys: u64 = db
            .scan_prefix(b"L")
            .values()
            .map(|v| {
                v.ok()
                    .and_then(|v| record::decode::<LogRecord>(&v).ok())
                    .map(|r| if r.delete { 1 } else { r.props.len() as u64 })
                    .unwrap_or(1)
            })
            .sum();
        let db_file = File::open(path.join("db")).ok();
        let pending_keys_seen = AtomicU64::new(counters.pending_keys);
        let inner = Arc::new(Inner {
            dir: path.clone(),
            db: std::sync::RwLock::new(db),
            writer_gate: Mutex::new(()),
            opts,
            state: Mutex::new(State {
                counters,
                in_flight: HashSet::new(),
            }),
            sync: Mutex::new(SyncFiles {
                db_file,
                blobs_synced_upto: 0,
            }),
            ingest_tx: Mutex::new(None),
            writer: Mutex::new(None),
            next_seq: AtomicU64::new(next_seq),
            acked_seq_file: Mutex::new(acked_seq_file),
            log_keys: AtomicU64::new(log_keys),
            pending_keys_seen,
            ingested_bytes: AtomicU64::new(0),
            disk_bytes: AtomicU64::new(0),
            rotated_bytes: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            writer_busy_since: AtomicU64::new(0),
            storage_failed_ms: AtomicU64::new(0),
            storage_error: Mutex::new(None),
        });
        let store = Store { inner };
        if counters_corrupt {
            store.recount()?;
        }
        store.refresh_disk_bytes();
        store.sync_durable().map_err(StoreError::storage)?;
        if let Some(parent) = path.parent() {
            if let Ok(d) = File::open(parent) {
                let _ = d.sync_all();
            }
        }
        let (tx, rx) = mpsc::channel(INGEST_QUEUE_MAX);
        *lock(&store.inner.ingest_tx) = Some(tx);
        let writer_store = store.clone();
        let handle = std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || writer_store.writer_loop(rx))
            .map_err(|e| StoreError::Other(format!("cannot start writer thread: {e}")))?;
        *lock(&store.inner.writer) = Some(handle);
        Ok((store, report))
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The current sled handle (a cheap clone; rotation may replace it between operations).
    fn db(&self) -> sled::Db {
        self.inner
            .db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn options(&self) -> &StoreOptions {
        &self.inner.opts
    }

    // -----------------------------------------------------------------------------------------
    // ingest (group commit)

    /// Appends updates to the log; answers once they are durable. All or nothing per call.
    /// The caller validates updates first (see `validate`).
    pub async fn ingest(&self, updates: Vec<Update>) -> Result<IngestAck, StoreError> {
        if updates.is_empty() {
            return Ok(IngestAck {
                accepted: 0,
                seq: 0,
            });
        }
        let tx = lock(&self.inner.ingest_tx)
            .clone()
            .ok_or(StoreError::Closed)?;
        let (reply, rx) = oneshot::channel();
        tx.send(IngestReq { updates, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Blocking form of [`Store::ingest`] for threads outside the runtime (tests, tools).
    pub fn ingest_blocking(&self, updates: Vec<Update>) -> Result<IngestAck, StoreError> {
        if updates.is_empty() {
            return Ok(IngestAck {
                accepted: 0,
                seq: 0,
            });
        }
        let tx = lock(&self.inner.ingest_tx)
            .clone()
            .ok_or(StoreError::Closed)?;
        let (reply, rx) = oneshot::channel();
        tx.blocking_send(IngestReq { updates, reply })
            .map_err(|_| StoreError::Closed)?;
        rx.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    fn writer_loop(&self, mut rx: mpsc::Receiver<IngestReq>) {
        while let Some(first) = rx.blocking_recv() {
            self.inner
                .writer_busy_since
                .store(writer_clock_ms(), Ordering::Relaxed);
            let mut group = vec![first];
            let mut count = group[0].updates.len();
            if !self.inner.opts.group_commit_window.is_zero() {
                std::thread::sleep(self.inner.opts.group_commit_window);
            }
            while count < GROUP_UPDATES_MAX {
                match rx.try_recv() {
                    Ok(req) => {
                        count += req.updates.len();
                        group.push(req);
                    }
                    Err(_) => break,
                }
            }
            self.commit_group(group);
            // Not reached when the commit panics: the writer then stays "busy" for good, which
            // is what it is for ingest (every request waits forever or fails).
            self.inner.writer_busy_since.store(0, Ordering::Relaxed);
        }
    }
    /// Records a failed storage write (ingest commit, settle, compaction). Only the first
    /// failure since open is kept: sled fails every later write of this handle the same way.
    pub fn note_storage_failure(&self, e: &StoreError) {
        if !matches!(e, StoreError::Storage(_)) {
            return;
        }
        if self
            .inner
            .storage_failed_ms
            .compare_exchange(0, now_ms().max(1), Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            *lock(&self.inner.storage_error) = Some(e.to_string());
        }
    }

    /// The first storage write failure since open, if any: (epoch ms, error). A store handle
    /// that failed a write keeps failing (sled's I/O errors are sticky), so the worker restarts
    /// in place to reopen it once the cause (usually a full disk) is gone.
    pub fn storage_failed(&self) -> Option<(u64, String)> {
        let at = self.inner.storage_failed_ms.load(Ordering::SeqCst);
        (at != 0).then(|| {
            let e = lock(&self.inner.storage_error).clone().unwrap_or_default();
            (at, e)
        })
    }

    /// How long the writer thread has been on its current commit group (gathering, admitting,
    /// applying, syncing, answering, or waiting for the writer gate a rotation holds), or `None`
    /// while it waits for work. One atomic load: the watchdog reads it to tell a wedged write
    /// path (an fsync that never returns) from an idle one, which a store read cannot see.
    pub fn writer_busy_for(&self) -> Option<Duration> {
        match self.inner.writer_busy_since.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_millis(
                writer_clock_ms().saturating_sub(since),
            )),
        }
    }

    /// Test hook, not an API: holds the writer gate until the guard is dropped, so the next
    /// commit group waits as it would behind an fsync that never returns (reads keep
    /// answering). Only Rust code can call it; nothing in the configuration or environment
    /// reaches it.
    #[doc(hidden)]
    pub fn hold_writer_gate_for_tests(&self) -> MutexGuard<'_, ()> {
        lock(&self.inner.writer_gate)
    }

    /// Whether a request may be accepted under the limits: when full, only if every key it
    /// writes is already held (so it cannot grow the store): pending, in quarantine (an update of
    /// a quarantined key becomes pending again; the limit may be passed by at most the
    /// quarantined keys, which are bounded by it too), in the uncompacted log, or written by a
    /// request accepted earlier in the same commit group (`earlier`). Deletes are always
    /// accepted: they shed keys.
    ///
    /// To see the log, a full store folds it first (the compactor's own step, one atomic batch
    /// per step; the state lock serialises it with the compactor thread). This happens only when
    /// full and only for a key found nowhere else, so the common path costs nothing extra.
    fn admit(
        &self,
        updates: &[Update],
        extra_keys: u64,
        earlier: &[(IngestReq, u64, u64)],
    ) -> Result<(), StoreError> {
        // Count the request's own keys: checking only the keys already there let one request
        // just under the limit add any number of new keys (up to 10,000 per update).
        let req_keys: u64 = updates.iter().map(|u| u.key_count() as u64).sum();
        // Why the store is full right now, or None. `log_keys` counts every key of every
        // uncompacted record, rewrites of pending keys included (which key a record holds is
        // not known without reading it), so it over-counts until the log is folded: it is
        // evaluated again after a fold.
        let full_now = || -> Option<String> {
            // Without the state lock first: a compaction step holds it for the whole step, and
            // every commit group waited behind one (measured: the writer's cycle was several
            // times its own work). This view can read high, never low (`publish_counters`).
            let keys = self.seen_keys() + extra_keys;
            let keys = if keys + req_keys > self.inner.opts.pending_keys_max {
                // Looks full: judge on the exact view. The compactor moves keys from the log
                // count to the pending count under the state lock.
                let state = lock(&self.inner.state);
                state.counters.pending_keys
                    + self.inner.log_keys.load(Ordering::SeqCst)
                    + extra_keys
            } else {
                keys
            };
            let disk = self.inner.disk_bytes.load(Ordering::Relaxed);
            if keys + req_keys > self.inner.opts.pending_keys_max {
                Some(format!(
                    "{keys} pending keys (limit {})",
                    self.inner.opts.pending_keys_max
                ))
            } else if disk >= self.inner.opts.disk_bytes_max {
                Some(format!(
                    "{disk} bytes on disk (limit {})",
                    self.inner.opts.disk_bytes_max
                ))
            } else {
                None
            }
        };
        let Some(mut why) = full_now() else {
            return Ok(());
        };
        let db = self.db();
        let held = |entity: &str, name: &str| -> Result<bool, StoreError> {
            Ok(db
                .contains_key(keyenc(b'P', entity, name))
                .map_err(StoreError::storage)?
                || db
                    .contains_key(keyenc(b'Q', entity, name))
                    .map_err(StoreError::storage)?)
        };
        let in_group = |entity: &str, name: &str| {
            earlier.iter().any(|(req, _, _)| {
                req.updates.iter().any(|u| {
                    u.entity == entity && matches!(&u.op, UpdateOp::Set(p) if p.contains_key(name))
                })
            })
        };
        let mut folded = false;
        for u in updates {
            if let UpdateOp::Set(props) = &u.op {
                for name in props.keys() {
                    if held(&u.entity, name)? || in_group(&u.entity, name) {
                        continue;
                    }
                    if !folded && self.inner.log_keys.load(Ordering::Relaxed) > 0 {
                        // The key may be waiting in the log: fold it, then look again.
                        folded = true;
                        self.compact_all()?;
                        // The fold replaced the log's over-count by the real pending count:
                        // with room now, the whole request fits (its keys were counted as
                        // new), and judging it on the count from before the fold refused
                        // new keys of a store below its limit.
                        match full_now() {
                            None => return Ok(()),
                            Some(now) => why = now,
                        }
                        if held(&u.entity, name)? {
                            continue;
                        }
                    }
                    return Err(StoreError::Full(why));
                }
            }
        }
        Ok(())
    }

    fn commit_group(&self, group: Vec<IngestReq>) {
        let _gate = lock(&self.inner.writer_gate);
        let mut batch = sled::Batch::default();
        let mut accepted: Vec<(IngestReq, u64, u64)> = Vec::with_capacity(group.len());
        let mut seq = self.inner.next_seq.load(Ordering::SeqCst);
        let start_seq = seq;
        let arrived_ms = now_ms();
        let mut added_keys = 0u64;
        let mut added_bytes = 0u64;
        for req in group {
            if self.inner.closed.load(Ordering::SeqCst) {
                let _ = req.reply.send(Err(StoreError::Closed));
                continue;
            }
            if let Err(e) = self.admit(&req.updates, added_keys, &accepted) {
                let _ = req.reply.send(Err(e));
                continue;
            }
            let keys: u64 = req.updates.iter().map(|u| u.key_count() as u64).sum();
            for u in &req.updates {
                let rec = LogRecord {
                    entity: u.entity.clone(),
                    delete: matches!(u.op, UpdateOp::Delete),
                    props: match &u.op {
                        UpdateOp::Set(p) => p
                            .iter()
                            .map(|(k, v)| (k.clone(), serde_json::to_vec(v).unwrap_or_default()))
                            .collect(),
                        UpdateOp::Delete => Vec::new(),
                    },
                    ts_ms: u.ts_ms,
                    stream: u.stream.clone(),
                    source: u.source.clone(),
                    arrived_ms,
                };
                let encoded = record::encode(&rec);
                added_bytes += encoded.len() as u64;
                batch.insert(seq_key(b'L', seq), encoded);
                seq += 1;
            }
            added_keys += keys;
            accepted.push((req, seq - 1, keys));
        }
        if accepted.is_empty() {
            return;
        }
        batch.insert(META_NEXT_SEQ, &seq.to_be_bytes());
        // Counted before the records become visible: the compactor may fold them (and subtract
        // them) while this thread still waits for the sync; adding afterwards would leave
        // phantom keys that make `admit` refuse new keys on an empty outbox.
        self.inner.log_keys.fetch_add(added_keys, Ordering::SeqCst);
        let applied = self.db().apply_batch(batch).map_err(StoreError::storage);
        if applied.is_err() {
            let _ = self
                .inner
                .log_keys
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_sub(added_keys))
                });
        }
        let result = applied.and_then(|_| self.sync_durable().map_err(StoreError::storage));
        match result {
            Ok(()) => {
                self.inner.next_seq.store(seq, Ordering::SeqCst);
                if let Some(f) = lock(&self.inner.acked_seq_file).as_ref() {
                    use std::os::unix::fs::FileExt;
                    let _ = f.write_all_at(&acked_seq_bytes(seq - 1), 0);
                }
                self.inner
                    .ingested_bytes
                    .fetch_add(added_bytes, Ordering::Relaxed);
                for (req, last, _) in accepted {
                    let _ = req.reply.send(Ok(IngestAck {
                        accepted: req.updates.len(),
                        seq: last,
                    }));
                }
            }
            Err(e) => {
                // Nothing is acknowledged. The batch may or may not be in sled's memory; the
                // sequence numbers are not reused either way, so a later success never collides.
                let _ = start_seq;
                self.inner.next_seq.store(seq, Ordering::SeqCst);
                tracing::error!(error = %e, "group commit failed; requests answered with an error");
                self.note_storage_failure(&e);
                for (req, _, _) in accepted {
                    let _ = req.reply.send(Err(StoreError::Storage(e.to_string())));
                }
            }
        }
    }

    /// Makes everything written so far durable according to the configured mode.
    pub fn sync_durable(&self) -> std::io::Result<()> {
        self.db()
            .flush()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        if self.inner.opts.durability == Durability::Flush {
            return Ok(());
        }
        let mut sync = lock(&self.inner.sync);
        if sync.db_file.is_none() {
            sync.db_file = File::open(self.inner.dir.join("db")).ok();
        }
        if let Some(f) = &sync.db_file {
            f.sync_data()?;
        }
        // sled writes values too large for a log segment as separate blob files, without fsync.
        // Their names are increasing log sequence numbers: sync every one newer than last time.
        let blobs = self.inner.dir.join("blobs");
        let mut newest = sync.blobs_synced_upto;
        if let Ok(entries) = std::fs::read_dir(&blobs) {
            let mut any = false;
            for entry in entries.flatten() {
                let id = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0);
                if id > sync.blobs_synced_upto {
                    File::open(entry.path())?.sync_data()?;
                    newest = newest.max(id);
                    any = true;
                }
            }
            if any {
                File::open(&blobs)?.sync_all()?;
            }
        }
        sync.blobs_synced_upto = newest;
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // compaction

    /// Folds up to `records_max` log records into the pending set in one atomic step.
    /// Returns how many log records were folded (0: the log is empty).
    pub fn compact_step(&self, records_max: usize) -> Result<usize, StoreError> {
        let mut state = lock(&self.inner.state);
        let db = self.db();
        let mut txn = Txn::new(&db);
        let mut counters = state.counters.clone();
        let mut folded = 0usize;
        let mut keys_folded = 0u64;
        for item in self.db().scan_prefix(b"L").take(records_max) {
            let (k, v) = item.map_err(StoreError::storage)?;
            let seq = u64_of(&k[1..]).unwrap_or(0);
            folded += 1;
            txn.remove(k.to_vec());
            let rec: LogRecord = match record::decode(&v) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(seq, error = %e, "corrupt log record set aside");
                    txn.corrupt.push((k.to_vec(), v.to_vec()));
                    // Its key count is unreadable; it held at least one (open counts it as one).
                    keys_folded += 1;
                    continue;
                }
            };
            let version = Version {
                ts_ms: rec.ts_ms,
                seq,
            };
            if rec.delete {
                keys_folded += 1;
                fold_delete(&mut txn, &mut counters, &rec, version)?;
            } else {
                keys_folded += rec.props.len() as u64;
                for (name, value) in &rec.props {
                    let p = PendingRecord {
                        ts_ms: rec.ts_ms,
                        seq,
                        value: value.clone(),
                        stream: rec.stream.clone(),
                        source: rec.source.clone(),
                        first_seq: seq,
                        pending_since_ms: rec.arrived_ms,
                        attempts: 0,
                        last_error: None,
                    };
                    fold_set(
                        &mut txn,
                        &mut counters,
                        &PropKey::new(rec.entity.clone(), name.clone()),
                        p,
                    )?;
                }
            }
        }
        if folded == 0 {
            return Ok(0);
        }
        counters.compacted_records += folded as u64;
        txn.commit(&mut counters)?;
        self.publish_counters(&mut state, counters);
        #[cfg(test)]
        tests::FOLD_WINDOW_HOOK.with(|h| {
            if let Some(f) = h.borrow_mut().as_mut() {
                f()
            }
        });
        // Under the state lock, together with the pending count and AFTER publishing it:
        // `admit` judges a full store on both read under the lock (a moment where the folded
        // keys counted as pending AND still as log keys made it refuse a new key on a store
        // below its limit), and reads them without the lock in the order `seen_keys` relies on.
        let _ = self
            .inner
            .log_keys
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                Some(v.saturating_sub(keys_folded))
            });
        drop(state);
        Ok(folded)
    }

    /// Installs `c` as the engine's counters (under the state lock) and publishes its pending
    /// count for [`Store::seen_keys`].
    fn publish_counters(&self, state: &mut MutexGuard<'_, State>, c: Counters) {
        self.inner
            .pending_keys_seen
            .store(c.pending_keys, Ordering::SeqCst);
        state.counters = c;
    }

    /// Pending plus uncompacted keys, read without the state lock. Never lower than the exact
    /// count at some moment during the call: every change of the pair is made under the
    /// state lock, and a compaction step publishes its higher pending count BEFORE it takes
    /// the folded keys off `log_keys`; this reads `log_keys` first. A reader that sees the
    /// lowered log count therefore also sees the raised pending count (SeqCst), and one that
    /// sees the old log count adds the folded keys twice, which only reads high (the caller
    /// then checks under the lock).
    fn seen_keys(&self) -> u64 {
        let log_keys = self.inner.log_keys.load(Ordering::SeqCst);
        let pending = self.inner.pending_keys_seen.load(Ordering::SeqCst);
        pending + log_keys
    }

    /// Compacts until the log is empty.
    pub fn compact_all(&self) -> Result<usize, StoreError> {
        let mut total = 0;
        loop {
            let n = self.compact_step(10_000)?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    }

    // -----------------------------------------------------------------------------------------
    // claim / settle

    /// Takes a batch of pending keys, grouped by entity, oldest pending first. Entities already
    /// in flight are skipped. Returns `None` when nothing can be claimed.
    pub fn claim(&self, limits: ClaimLimits) -> Result<Option<Claim>, StoreError> {
        let events_max = limits.events_max.max(1);
        let mut state = lock(&self.inner.state);
        let mut claim = Claim::default();
        let mut bytes = 0usize;
        let mut taken: HashSet<String> = HashSet::new();
        let mut corrupt = Vec::new();
        'index: for item in self.db().scan_prefix(b"I").keys() {
            let ik = item.map_err(StoreError::storage)?;
            let Some(key) = ik.get(9..).and_then(keydec) else {
                corrupt.push(ik.to_vec());
                continue;
            };
            if state.in_flight.contains(&key.entity) || taken.contains(&key.entity) {
                continue;
            }
            let events = self.entity_events(&key.entity, &mut corrupt)?;
            if events.is_empty() {
                continue;
            }
            taken.insert(key.entity.clone());
            for ev in events {
                let b = ev.approx_bytes();
                if !claim.events.is_empty() && bytes + b > limits.bytes_max {
                    break 'index;
                }
                bytes += b;
                claim.events.push(ev);
                if claim.events.len() >= events_max {
                    break 'index;
                }
            }
        }
        if !corrupt.is_empty() {
            self.set_aside_locked(&mut state, corrupt)?;
        }
        if claim.events.is_empty() {
            return Ok(None);
        }
        for ev in &claim.events {
            state.in_flight.insert(ev.entity.clone());
        }
        Ok(Some(claim))
    }

    /// The events one entity would send now: its delete alone if one is pending, otherwise its
    /// pending properties grouped by (stream, source).
    fn entity_events(
        &self,
        entity: &str,
        corrupt: &mut Vec<Vec<u8>>,
    ) -> Result<Vec<ClaimedEvent>, StoreError> {
        let prefix = entity_prefix(b'P', entity);
        let mut groups: BTreeMap<(Option<String>, Option<String>), Vec<ClaimedProp>> =
            BTreeMap::new();
        for item in self.db().scan_prefix(&prefix) {
            let (k, v) = item.map_err(StoreError::storage)?;
            let Some(key) = keydec(&k[1..]) else {
                corrupt.push(k.to_vec());
                continue;
            };
            let p: PendingRecord = match record::decode(&v) {
                Ok(p) => p,
                Err(_) => {
                    corrupt.push(k.to_vec());
                    continue;
                }
            };
            let delivered = self.delivered(&key)?;
            let prop = ClaimedProp {
                name: key.property.clone(),
                value: json_of(&p.value),
                version: p.version(),
                delivered,
                attempts: p.attempts,
                pending: p.clone(),
            };
            if key.is_delete() {
                return Ok(vec![ClaimedEvent {
                    entity: entity.to_string(),
                    delete: true,
                    delivered_delete: prop.delivered.clone(),
                    props: vec![prop],
                    stream: p.stream,
                    source: p.source,
                }]);
            }
            groups
                .entry((p.stream.clone(), p.source.clone()))
                .or_default()
                .push(prop);
        }
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let delivered_delete = self.delivered(&PropKey::new(entity, DELETE_PROPERTY))?;
        Ok(groups
            .into_iter()
            .map(|((stream, source), props)| ClaimedEvent {
                entity: entity.to_string(),
                delete: false,
                props,
                stream,
                source,
                delivered_delete: delivered_delete.clone(),
            })
            .collect())
    }

    /// The last delivered record of a key, if any.
    pub fn delivered(&self, key: &PropKey) -> Result<Option<DeliveredRecord>, StoreError> {
        let k = keyenc(b'D', &key.entity, &key.property);
        Ok(self
            .db()
            .get(k)
            .map_err(StoreError::storage)?
            .and_then(|v| record::decode(&v).ok()))
    }

    /// Records what became of claimed keys and releases their entities. Compare-and-swap: a
    /// pending value newer than the one sent is kept.
    pub fn settle(&self, settlements: Vec<Settlement>) -> Result<(), StoreError> {
        self.settle_noting(settlements, Vec::new())
    }

    /// [`Store::settle`], with the flusher's convergence records of the entities involved
    /// (`None` removes one) in the same atomic batch: a crash can never leave a delivered
    /// value deleted from pending while its entity's record does not know of it.
    pub fn settle_noting(
        &self,
        settlements: Vec<Settlement>,
        suspects: Vec<(String, Option<SuspectRecord>)>,
    ) -> Result<(), StoreError> {
        let mut state = lock(&self.inner.state);
        let db = self.db();
        let mut txn = Txn::new(&db);
        for (entity, rec) in suspects {
            match rec {
                Some(r) => txn.put(simple_key(b'S', &entity), &r),
                None => txn.remove(simple_key(b'S', &entity)),
            }
        }
        let mut counters = state.counters.clone();
        let now = now_ms();
        let mut entities = HashSet::new();
        for s in &settlements {
            entities.insert(s.key.entity.clone());
            let pk = keyenc(b'P', &s.key.entity, &s.key.property);
            let current = get_pending(&mut txn, &mut counters, &s.key)?;
            // When `same`, the record removed is the stored one: its index entry is at the
            // stored first_seq, which a requeue may have changed since `sent` was read.
            let same = current
                .as_ref()
                .filter(|c| c.version() == s.sent.version())
                .cloned();
            match &s.outcome {
                Outcome::Delivered { value_hash } => {
                    counters.delivered += 1;
                    if let Some(c) = &same {
                        remove_pending(&mut txn, &mut counters, &s.key, c)?;
                    }
                    let dk = keyenc(b'D', &s.key.entity, &s.key.property);
                    let old: Option<DeliveredRecord> = txn.get(&dk)?;
                    if old.is_none_or(|d| d.version() < s.sent.version()) {
                        let rec = DeliveredRecord {
                            ts_ms: s.sent.ts_ms,
                            seq: s.sent.seq,
                            value_hash: *value_hash,
                            delivered_at_ms: now,
                        };
                        txn.put(dk, &rec);
                    }
                    if s.key.is_delete() {
                        // The entity is gone in Flux: what was delivered before the delete no
                        // longer describes Flux; the tombstone record keeps late updates out.
                        for dk in txn.keys_with_prefix(&entity_prefix(b'D', &s.key.entity))? {
                            if dk.len() > 0 && keydec(&dk[1..]).is_some_and(|k| !k.is_delete()) {
                                let d: Option<DeliveredRecord> = txn.get(&dk)?;
                                if d.is_some_and(|d| d.version() < s.sent.version()) {
                                    txn.remove(dk);
                                }
                            }
                        }
                    }
                }
                Outcome::Quarantine {
                    reason,
                    http_status,
                } => {
                    if let Some(c) = &same {
                        remove_pending(&mut txn, &mut counters, &s.key, c)?;
                    }
                    let qk = keyenc(b'Q', &s.key.entity, &s.key.property);
                    counters.quarantined_total += 1;
                    match get_quarantine(&mut txn, &mut counters, &qk)? {
                        None => counters.quarantine_keys += 1,
                        Some(old) => {
                            // One quarantined value per key: the older one is a discard and is
                            // counted. Never let an older rejected value replace a newer one
                            // (a requeue would otherwise resend the older value).
                            counters.superseded += 1;
                            if old.pending.version() >= s.sent.version() {
                                continue;
                            }
                        }
                    }
                    let mut sent = s.sent.clone();
                    sent.last_error = Some(reason.clone());
                    txn.put(
                        qk,
                        &QuarantineRecord {
                            pending: sent,
                            reason: reason.clone(),
                            http_status: *http_status,
                            quarantined_at_ms: now,
                        },
                    );
                }
                Outcome::Retry { error } => {
                    if let Some(mut c) = current {
                        c.attempts = c.attempts.saturating_add(1);
                        c.last_error = Some(error.clone());
                        txn.put(pk, &c);
                    }
                }
            }
        }
        txn.commit(&mut counters)?;
        self.publish_counters(&mut state, counters);
        for e in entities {
            state.in_flight.remove(&e);
        }
        Ok(())
    }

    /// Writes (`Some`) or removes (`None`) the flusher's convergence records of entities.
    pub fn note_suspects(
        &self,
        suspects: Vec<(String, Option<SuspectRecord>)>,
    ) -> Result<(), StoreError> {
        self.settle_noting(Vec::new(), suspects)
    }

    /// Every convergence record (at most `limit`); one that does not decode is set aside.
    pub fn suspects(&self, limit: usize) -> Result<Vec<(String, SuspectRecord)>, StoreError> {
        let mut state = lock(&self.inner.state);
        let db = self.db();
        let mut txn = Txn::new(&db);
        let mut counters = state.counters.clone();
        let mut out = Vec::new();
        for k in txn.keys_with_prefix(b"S")? {
            if out.len() >= limit {
                break;
            }
            let entity = String::from_utf8_lossy(&k[1..]).into_owned();
            if let Some(r) = txn.get::<SuspectRecord>(&k)? {
                out.push((entity, r));
            }
        }
        txn.commit(&mut counters)?;
        self.publish_counters(&mut state, counters);
        Ok(out)
    }

    /// Releases entities of a claim without recording anything (e.g. the flush was cancelled).
    pub fn release(&self, claim: &Claim) {
        let mut state = lock(&self.inner.state);
        for ev in &claim.events {
            state.in_flight.remove(&ev.entity);
        }
    }

    /// Moves quarantined keys (all, or those whose entity starts with `entity_prefix`) back to
    /// pending, through the same newest-wins rules as new updates. Durable when it returns.
    pub fn requeue(&self, entity_prefix: Option<&str>) -> Result<u64, StoreError> {
        let mut state = lock(&self.inner.state);
        let db = self.db();
        let mut txn = Txn::new(&db);
        let mut counters = state.counters.clone();
        let mut moved = 0u64;
        let keys = txn.keys_with_prefix(b"Q")?;
        for qk in keys {
            let Some(key) = keydec(&qk[1..]) else {
                continue;
            };
            if entity_prefix.is_some_and(|p| !key.entity.starts_with(p)) {
                continue;
            }
            let Some(q) = get_quarantine(&mut txn, &mut counters, &qk)? else {
                continue;
            };
            txn.remove(qk);
            counters.quarantine_keys = counters.quarantine_keys.saturating_sub(1);
            counters.requeued += 1;
            moved += 1;
            let mut p = q.pending;
            p.attempts = 0;
            p.last_error = None;
            p.first_seq = p.seq;
            p.pending_since_ms = now_ms();
            if key.is_delete() {
                let rec = LogRecord {
                    entity: key.entity.clone(),
                    delete: true,
                    props: vec![],
                    ts_ms: p.ts_ms,
                    stream: p.stream,
                    source: p.source,
                    arrived_ms: p.pending_since_ms,
                };
                let v = Version {
                    ts_ms: p.ts_ms,
                    seq: p.seq,
                };
                // The same rules as new updates: this delete was the entity's newest when it
                // was quarantined; if a newer delete came since (pending or delivered), or this
                // one was delivered after all, resending it would make Flux apply an old delete
                // after newer values (Flux applies in arrival order) and wipe them.
                let tomb: Option<TombstoneRecord> = txn.get(&simple_key(b'T', &key.entity))?;
                let delivered: Option<DeliveredRecord> =
                    txn.get(&keyenc(b'D', &key.entity, &key.property))?;
                if tomb.is_some_and(|t| v < t.version())
                    || delivered.is_some_and(|d| v <= d.version())
                {
                    counters.late_dropped += 1;
                    continue;
                }
                fold_delete_requeue(&mut txn, &mut counters, &rec, v)?;
            } else {
                fold_set(&mut txn, &mut counters, &key, p)?;
            }
        }
        txn.commit(&mut counters)?;
        self.publish_counters(&mut state, counters);
        drop(state);
        self.sync_durable().map_err(StoreError::storage)?;
        Ok(moved)
    }

    fn set_aside_locked(
        &self,
        state: &mut MutexGuard<'_, State>,
        keys: Vec<Vec<u8>>,
    ) -> Result<(), StoreError> {
        let db = self.db();
        let mut txn = Txn::new(&db);
        let mut counters = state.counters.clone();
        for k in keys {
            // A pending record is set aside with its index entry, entity count and counter,
            // so the counters keep agreeing with the contents and no stale index entry is left.
            if k.first() == Some(&b'P') {
                if let Some(key) = keydec(&k[1..]) {
                    get_pending(&mut txn, &mut counters, &key)?;
                    continue;
                }
            }
            if let Some(v) = txn.get_raw(&k)? {
                txn.corrupt.push((k.clone(), v));
                txn.remove(k);
            }
        }
        txn.commit(&mut counters)?;
        self.publish_counters(state, counters);
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // stats, listings, verify

    pub fn refresh_disk_bytes(&self) -> u64 {
        let bytes = dir_bytes(&self.inner.dir);
        self.inner.disk_bytes.store(bytes, Ordering::Relaxed);
        bytes
    }

    /// Encoded bytes of every update acknowledged since the store was opened (monotonic; read
    /// by the flush worker's byte-size trigger).
    pub fn ingested_bytes(&self) -> u64 {
        self.inner.ingested_bytes.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> Stats {
        let state = lock(&self.inner.state);
        let c = state.counters.clone();
        let in_flight = state.in_flight.len() as u64;
        drop(state);
        let db = self.db();
        let next_seq = self.inner.next_seq.load(Ordering::SeqCst);
        Stats {
            pending_keys: c.pending_keys,
            pending_entities: c.pending_entities,
            oldest_pending_ms: oldest_pending_in(&db),
            log_backlog: first_log_seq(&db)
                .map(|f| next_seq.saturating_sub(f))
                .unwrap_or(0),
            quarantine_keys: c.quarantine_keys,
            superseded: c.superseded,
            late_dropped: c.late_dropped,
            delivered: c.delivered,
            quarantined_total: c.quarantined_total,
            requeued: c.requeued,
            corrupt_set_aside: c.corrupt_set_aside,
            in_flight_entities: in_flight,
            disk_bytes: self.inner.disk_bytes.load(Ordering::Relaxed),
            next_seq,
            format_version: FORMAT_VERSION,
        }
    }

    /// Pending keys in delivery order, optionally filtered.
    pub fn pending_rows(
        &self,
        entity_prefix: Option<&str>,
        older_than_ms: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Row>, StoreError> {
        tree_pending_rows(&self.db(), entity_prefix, older_than_ms, limit)
    }

    /// Entities with a pending key whose last error starts with `error_prefix`, at most
    /// `limit`. Streams over the pending set holding only the matching entity ids (a listing of
    /// rows would hold every pending value in memory at once: tens of MB with a large backlog,
    /// right at start-up). Unreadable records are skipped (the compactor and `verify` report
    /// them).
    pub fn entities_with_error_prefix(
        &self,
        error_prefix: &str,
        limit: usize,
    ) -> Result<HashSet<String>, StoreError> {
        let mut out = HashSet::new();
        for item in self.db().scan_prefix(b"P") {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(StoreError::storage)?;
            let Ok(p) = record::decode::<PendingRecord>(&v) else {
                continue;
            };
            if !p
                .last_error
                .as_deref()
                .is_some_and(|e| e.starts_with(error_prefix))
            {
                continue;
            }
            if let Some(key) = k.get(1..).and_then(keydec) {
                out.insert(key.entity);
            }
        }
        Ok(out)
    }

    /// [`Store::pending_rows`] plus how many records the listing could not read.
    pub fn pending_listing(
        &self,
        entity_prefix: Option<&str>,
        older_than_ms: Option<u64>,
        limit: usize,
    ) -> Result<Listing<Row>, StoreError> {
        tree_pending_listing(&self.db(), entity_prefix, older_than_ms, limit)
    }

    /// Quarantined keys, optionally filtered.
    pub fn quarantine_rows(
        &self,
        entity_prefix: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Row>, StoreError> {
        tree_quarantine_rows(&self.db(), entity_prefix, limit)
    }

    /// [`Store::quarantine_rows`], also filtered by age (`older_than_ms`: the value has waited
    /// at least this long since it first became pending), plus the unreadable count.
    pub fn quarantine_listing(
        &self,
        entity_prefix: Option<&str>,
        older_than_ms: Option<u64>,
        limit: usize,
    ) -> Result<Listing<Row>, StoreError> {
        tree_quarantine_listing(&self.db(), entity_prefix, older_than_ms, limit)
    }

    /// The pending rows the store would hold once its log is compacted, with the log folded
    /// in memory by [`tree_folded_pending_listing`] (the function `outbox-dump export` uses on
    /// a stopped store, so live and offline exports are the same) and nothing written: a read
    /// command must not change the store, nor set a corrupt record aside before `verify` saw it.
    /// The state lock is held meanwhile so that compaction, claims and settlements do not
    /// move records between the log and the pending set under the fold (which would see a
    /// record twice or not at all); ingest may still append to the log's end.
    pub fn folded_pending_listing(&self) -> Result<Listing<Row>, StoreError> {
        let _state = lock(&self.inner.state);
        tree_folded_pending_listing(&self.db())
    }

    /// The uncompacted tail of the log.
    pub fn log_rows(&self, limit: usize) -> Result<Vec<LogRow>, StoreError> {
        tree_log_rows(&self.db(), limit)
    }

    /// [`Store::log_rows`] with the count of records that could not be read.
    pub fn log_listing(&self, limit: usize) -> Result<Listing<LogRow>, StoreError> {
        tree_log_listing(&self.db(), limit)
    }

    /// Checks every record and the engine's invariants. Read-only.
    pub fn verify(&self) -> VerifyReport {
        let state = lock(&self.inner.state);
        let counters = state.counters.clone();
        drop(state);
        verify_tree(
            &self.db(),
            &counters,
            self.inner.next_seq.load(Ordering::SeqCst),
        )
    }

    /// Recomputes the counters that describe contents (after a corrupt counters record).
    fn recount(&self) -> Result<(), StoreError> {
        let mut state = lock(&self.inner.state);
        let mut c = state.counters.clone();
        c.pending_keys = self.db().scan_prefix(b"P").count() as u64;
        c.pending_entities = self.db().scan_prefix(b"E").count() as u64;
        c.quarantine_keys = self.db().scan_prefix(b"Q").count() as u64;
        c.corrupt_set_aside = self.db().scan_prefix(b"X").count() as u64;
        self.db()
            .insert(META_COUNTERS, record::encode(&c))
            .map_err(StoreError::storage)?;
        self.publish_counters(&mut state, c);
        Ok(())
    }

    /// When the outbox has drained (nothing in the log, pending or in flight) and the store
    /// takes more than `threshold_bytes` on disk (and more than twice its size right after the
    /// last rotation), rotates to a fresh store holding only what must be kept: delivered
    /// records, tombstones, quarantine, set-aside records and meta. sled never returns freed
    /// space to the filesystem; this is how a drained outbox shrinks back.
    ///
    /// Crash-safe at every step (see `recover_rotation`): the fresh copy is complete and synced
    /// as `store.new` before the old store is renamed away. Ingest waits while the copy runs.
    /// Returns the bytes on disk before and after, or `None` when no rotation was due.
    pub fn shrink_if_drained(
        &self,
        threshold_bytes: u64,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let _gate = lock(&self.inner.writer_gate);
        let state = lock(&self.inner.state);
        if state.counters.pending_keys != 0 || !state.in_flight.is_empty() {
            return Ok(None);
        }
        let db = self.db();
        if db.scan_prefix(b"L").next().is_some() || db.scan_prefix(b"P").next().is_some() {
            return Ok(None);
        }
        let before = dir_bytes(&self.inner.dir);
        let floor = threshold_bytes.max(2 * self.inner.rotated_bytes.load(Ordering::Relaxed));
        if before <= floor {
            return Ok(None);
        }
        let data_dir = self
            .inner
            .dir
            .parent()
            .ok_or_else(|| StoreError::Other("store directory has no parent".into()))?
            .to_path_buf();
        let next = data_dir.join(format!("{STORE_DIR}.next"));
        let new = data_dir.join(format!("{STORE_DIR}.new"));
        let old = data_dir.join(format!("{STORE_DIR}.old"));
        for leftover in [&next, &new, &old] {
            if leftover.exists() {
                std::fs::remove_dir_all(leftover).map_err(StoreError::storage)?;
            }
        }
        let copied = {
            let fresh = sled_config(&next, &self.inner.opts)
                .open()
                .map_err(StoreError::storage)?;
            let mut batch = sled::Batch::default();
            let mut in_batch = 0usize;
            let mut copied = 0u64;
            for item in db.iter() {
                let (k, v) = item.map_err(StoreError::storage)?;
                batch.insert(k, v);
                in_batch += 1;
                copied += 1;
                if in_batch == 10_000 {
                    fresh
                        .apply_batch(std::mem::take(&mut batch))
                        .map_err(StoreError::storage)?;
                    in_batch = 0;
                }
            }
            fresh.apply_batch(batch).map_err(StoreError::storage)?;
            fresh.flush().map_err(StoreError::storage)?;
            sync_tree_files(&next).map_err(StoreError::storage)?;
            copied
        };
        sync_dir(&data_dir).map_err(StoreError::storage)?;
        std::fs::rename(&next, &new).map_err(StoreError::storage)?;
        sync_dir(&data_dir).map_err(StoreError::storage)?;
        // From here the fresh copy is authoritative if we crash: recover_rotation finishes.
        db.flush().map_err(StoreError::storage)?;
        std::fs::rename(&self.inner.dir, &old).map_err(StoreError::storage)?;
        // Any failure from here puts the live store back under its name before returning, so
        // the handle in use and the directory a restart opens stay the same store.
        let roll_back = |e: String| {
            if !self.inner.dir.exists() || std::fs::rename(&self.inner.dir, &new).is_ok() {
                let _ = std::fs::rename(&old, &self.inner.dir);
            }
            let _ = sync_dir(&data_dir);
            StoreError::Storage(format!("store rotation failed, old store kept: {e}"))
        };
        if let Err(e) = std::fs::rename(&new, &self.inner.dir) {
            return Err(roll_back(e.to_string()));
        }
        sync_dir(&data_dir).map_err(|e| roll_back(e.to_string()))?;
        // The fresh copy was written through its own sled handle, dropped above; sled's
        // background threads release that handle's file lock a moment later, and the lock
        // follows the file through the renames: wait for it (bounded) instead of giving up the
        // rotation.
        let reopened = open_when_unlocked(&self.inner.dir, &self.inner.opts)
            .map_err(|e| roll_back(e.to_string()))?;
        *self.inner.db.write().unwrap_or_else(|p| p.into_inner()) = reopened;
        {
            let mut sync = lock(&self.inner.sync);
            sync.db_file = File::open(self.inner.dir.join("db")).ok();
            sync.blobs_synced_upto = 0;
        }
        drop(state);
        drop(db);
        if let Err(e) = std::fs::remove_dir_all(&old) {
            tracing::warn!(error = %e, dir = %old.display(), "old store not removed after rotation");
        }
        let after = self.refresh_disk_bytes();
        self.inner.rotated_bytes.store(after, Ordering::Relaxed);
        tracing::info!(
            before,
            after,
            records = copied,
            "drained store rotated to a fresh one"
        );
        Ok(Some((before, after)))
    }

    /// Stops accepting ingest, waits for the writer to finish its group, and makes the store
    /// durable. Further ingest answers `Closed`.
    pub fn close(&self) -> Result<(), StoreError> {
        self.inner.closed.store(true, Ordering::SeqCst);
        lock(&self.inner.ingest_tx).take();
        if let Some(h) = lock(&self.inner.writer).take() {
            let _ = h.join();
        }
        self.sync_durable().map_err(StoreError::storage)
    }

    /// Direct access for tools and tests that need to tamper or inspect raw records.
    pub fn raw_db(&self) -> sled::Db {
        self.db()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(db) = self.db.read() {
            let _ = db.flush();
        }
    }
}

/// Monotonic milliseconds since the first call in this process, +1 so that 0 means "idle".
fn writer_clock_ms() -> u64 {
    static ANCHOR: std::sync::LazyLock<std::time::Instant> =
        std::sync::LazyLock::new(std::time::Instant::now);
    ANCHOR.elapsed().as_millis() as u64 + 1
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock would have left state consistent with sled (every change
    // is written in one batch before the in-memory copy is replaced), so poisoning is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_bytes(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

// ---------------------------------------------------------------------------------------------
// folding rules (all under the state lock, inside one Txn)

fn entity_count_add(
    txn: &mut Txn<'_>,
    counters: &mut Counters,
    entity: &str,
    delta: i64,
) -> Result<(), StoreError> {
    let ek = simple_key(b'E', entity);
    let raw = txn.get_raw(&ek)?;
    let (n, m) = match raw.as_deref().map(u64_of) {
        None => (0, delta.max(0) as u64),
        Some(Some(n)) => (
            n,
            if delta < 0 {
                n.saturating_sub(delta.unsigned_abs())
            } else {
                n + delta as u64
            },
        ),
        Some(None) => {
            // A malformed count (it has no checksum) must not turn into 0: the entity would be
            // counted in `pending_entities` a second time. Callers apply `delta` to P first, so
            // the entity's pending keys as the transaction sees them are the new count. The
            // entity was counted when its record was created.
            let bytes = raw.unwrap_or_default();
            tracing::error!(entity, "malformed entity count set aside; recounted");
            txn.corrupt.push((ek.clone(), bytes));
            let m = txn.keys_with_prefix(&entity_prefix(b'P', entity))?.len() as u64;
            (1, m)
        }
    };
    if m == 0 {
        if n != 0 {
            counters.pending_entities = counters.pending_entities.saturating_sub(1);
        }
        txn.remove(ek);
    } else {
        if n == 0 {
            counters.pending_entities += 1;
        }
        txn.put_raw(ek, m.to_be_bytes().to_vec());
    }
    Ok(())
}

/// Reads a key's pending record. A corrupt one is set aside together with everything that
/// describes it (index entry, entity count, `pending_keys`): otherwise the index would keep a
/// stale entry and the counters would count a key that no longer exists, and a new value for
/// the key would be counted twice.
fn get_pending(
    txn: &mut Txn<'_>,
    counters: &mut Counters,
    key: &PropKey,
) -> Result<Option<PendingRecord>, StoreError> {
    let pk = keyenc(b'P', &key.entity, &key.property);
    let Some(bytes) = txn.get_raw(&pk)? else {
        return Ok(None);
    };
    match record::decode::<PendingRecord>(&bytes) {
        Ok(p) => Ok(Some(p)),
        Err(e) => {
            tracing::error!(entity = %key.entity, property = %key.property, error = %e,
                "corrupt pending record set aside");
            txn.corrupt.push((pk.clone(), bytes));
            txn.remove(pk);
            // Its first_seq is unreadable: find the index entry by key. Corruption is rare,
            // so a scan of the index is acceptable here.
            let rest = &keyenc(b'I', &key.entity, &key.property)[1..];
            for ik in txn.keys_with_prefix(b"I")? {
                if ik.get(9..) == Some(rest) {
                    txn.remove(ik);
                }
            }
            counters.pending_keys = counters.pending_keys.saturating_sub(1);
            entity_count_add(txn, counters, &key.entity, -1)?;
            Ok(None)
        }
    }
}

/// Reads a quarantine record; a corrupt one is set aside and uncounted from `quarantine_keys`.
fn get_quarantine(
    txn: &mut Txn<'_>,
    counters: &mut Counters,
    qk: &[u8],
) -> Result<Option<QuarantineRecord>, StoreError> {
    let existed = txn.get_raw(qk)?.is_some();
    let q = txn.get::<QuarantineRecord>(qk)?;
    if existed && q.is_none() {
        counters.quarantine_keys = counters.quarantine_keys.saturating_sub(1);
    }
    Ok(q)
}

fn remove_pending(
    txn: &mut Txn<'_>,
    counters: &mut Counters,
    key: &PropKey,
    p: &PendingRecord,
) -> Result<(), StoreError> {
    txn.remove(keyenc(b'P', &key.entity, &key.property));
    txn.remove(index_key(p.first_seq, key));
    counters.pending_keys = counters.pending_keys.saturating_sub(1);
    entity_count_add(txn, counters, &key.entity, -1)
}

fn insert_new_pending(
    txn: &mut Txn<'_>,
    counters: &mut Counters,
    key: &PropKey,
    p: &PendingRecord,
) -> Result<(), StoreError> {
    txn.put(keyenc(b'P', &key.entity, &key.property), p);
    txn.put_raw(index_key(p.first_seq, key), Vec::new());
    counters.pending_keys += 1;
    entity_count_add(txn, counters, &key.entity, 1)
}

fn fold_set(
    txn: &mut Txn<'_>,
    counters: &mut Counters,
    key: &PropKey,
    new: PendingRecord,
) -> Result<(), StoreError> {
    let v = new.version();
    let tomb: Option<TombstoneRecord> = txn.get(&simple_key(b'T', &key.entity))?;
    if tomb.is_some_and(|t| v <= t.version()) {
        counters.late_dropped += 1;
        return Ok(());
    }
    let pk = keyenc(b'P', &key.entity, &key.property);
    match get_pending(txn, counters, key)? {
        Some(old) => {
            counters.superseded += 1;
            if v > old.version() {
                let rec = PendingRecord {
                    first_seq: old.first_seq,
                    pending_since_ms: old.pending_since_ms,
                    attempts: old.attempts,
                    last_error: old.last_error,
                    ..new
                };
                txn.put(pk, &rec);
            }
        }
        None => {
            let delivered: Option<DeliveredRecord> =
                txn.get(&keyenc(b'D', &key.entity, &key.property))?;
            if delivered.is_some_and(|d| v <= d.version()) {
                counters.late_dropped += 1;
                return Ok(());
            }
            insert_new_pending(txn, counters, key, &new)?;
        }
    }
    Ok(())
}

fn fold_delete(
    txn: &mut Txn<'_>,
    counters: &mut Counters,
    rec: &LogRecord,
    v: Version,
) -> Result<(), StoreError> {
    let tk = simple_key(b'T', &rec.entity);
    let tomb: Option<TombstoneRecord> = txn.get(&tk)?;
    if tomb.is_some_and(|t| v <= t.version()) {
        counters.late_dropped += 1;
        return Ok(());
    }
    fold_delete_requeue(txn, counters, rec, v)
}

/// Applies a delete at version `v`: every older pending property of the entity is superseded,
/// the delete becomes (or replaces) the entity's pending `__deleted__` key, and the tombstone
/// keeps later-arriving older updates out.
fn fold_delete_requeue(
    txn: &mut Txn<'_>,
    counters: &mut Counters,
    rec: &LogRecord,
    v: Version,
) -> Result<(), StoreError> {
    // A delete older than a property Flux already holds from us would wipe that newer value
    // too (Flux applies in arrival order); the flusher reads such entities before sending the
    // delete and re-sends the newer delivered properties right after it (see flusher.rs).
    let tk = simple_key(b'T', &rec.entity);
    let tomb: Option<TombstoneRecord> = txn.get(&tk)?;
    if tomb.is_none_or(|t| t.version() < v) {
        txn.put(
            tk,
            &TombstoneRecord {
                ts_ms: v.ts_ms,
                seq: v.seq,
            },
        );
    }
    for pk in txn.keys_with_prefix(&entity_prefix(b'P', &rec.entity))? {
        let Some(key) = keydec(&pk[1..]) else {
            continue;
        };
        if key.is_delete() {
            continue;
        }
        if let Some(p) = get_pending(txn, counters, &key)? {
            if p.version() < v {
                counters.superseded += 1;
                remove_pending(txn, counters, &key, &p)?;
            }
        }
    }
    let new = PendingRecord {
        ts_ms: v.ts_ms,
        seq: v.seq,
        value: b"true".to_vec(),
        stream: rec.stream.clone(),
        source: rec.source.clone(),
        first_seq: v.seq,
        pending_since_ms: rec.arrived_ms,
        attempts: 0,
        last_error: None,
    };
    fold_set_unchecked_tomb(
        txn,
        counters,
        &PropKey::new(rec.entity.clone(), DELETE_PROPERTY),
        new,
    )
}

/// Like `fold_set` without the tombstone check (the delete key IS the tombstone's value).
fn fold_set_unchecked_tomb(
    txn: &mut Txn<'_>,
    counters: &mut Counters,
    key: &PropKey,
    new: PendingRecord,
) -> Result<(), StoreError> {
    let pk = keyenc(b'P', &key.entity, &key.property);
    match get_pending(txn, counters, key)? {
        Some(old) => {
            counters.superseded += 1;
            if new.version() > old.version() {
                let rec = PendingRecord {
                    first_seq: old.first_seq,
                    pending_since_ms: old.pending_since_ms,
                    ..new
                };
                txn.put(pk, &rec);
            }
        }
        None => insert_new_pending(txn, counters, key, &new)?,
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// verify and salvage (also used by outbox-dump on a stopped store)

/// Checks every record of a tree and the engine's invariants.
pub fn verify_tree(db: &sled::Db, counters: &Counters, next_seq: u64) -> VerifyReport {
    let mut report = VerifyReport::default();
    let mut problems = Vec::new();
    let mut pending: HashMap<Vec<u8>, PendingRecord> = HashMap::new();
    let mut index: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut entity_counts: HashMap<String, u64> = HashMap::new();
    let mut quarantine = 0u64;
    let mut corrupt_area = 0u64;
    let mut format_seen = false;
    for item in db.iter() {
        let (k, v) = match item {
            Ok(kv) => kv,
            Err(e) => {
                problems.push(format!("store read error: {e}"));
                break;
            }
        };
        report.records += 1;
        let show = String::from_utf8_lossy(&k).into_owned();
        let check = |r: Result<(), DecodeError>, problems: &mut Vec<String>| {
            if let Err(e) = r {
                problems.push(format!("record {show:?}: {e}"));
            }
        };
        match k.first() {
            Some(b'M') => {
                if k.as_ref() == META_FORMAT {
                    format_seen = true;
                    match <[u8; 4]>::try_from(v.as_ref()).map(u32::from_be_bytes) {
                        Ok(f) if f == FORMAT_VERSION => {}
                        Ok(f) => problems.push(format!(
                            "format version {f}, this build reads {FORMAT_VERSION}"
                        )),
                        Err(_) => problems.push("format version record is malformed".into()),
                    }
                } else if k.as_ref() == META_COUNTERS {
                    check(record::decode::<Counters>(&v).map(|_| ()), &mut problems);
                } else if k.as_ref() == META_NEXT_SEQ {
                    match u64_of(&v) {
                        Some(s) if s <= next_seq => {}
                        Some(s) => {
                            problems.push(format!("next_seq {s} ahead of the writer's {next_seq}"))
                        }
                        None => problems.push("next_seq record is malformed".into()),
                    }
                } else if k.as_ref() == META_REBUILD {
                    problems.push(
                        "a salvage into this store is unfinished: the worker rebuilds its \
                         index, entity counts and counters at the next open"
                            .into(),
                    );
                } else {
                    problems.push(format!("unknown meta record {show:?}"));
                }
            }
            Some(b'L') => {
                check(record::decode::<LogRecord>(&v).map(|_| ()), &mut problems);
                if u64_of(&k[1..]).is_some_and(|s| s >= next_seq) {
                    problems.push(format!(
                        "log record {show:?} at or beyond next_seq {next_seq}"
                    ));
                }
            }
            Some(b'P') => match (keydec(&k[1..]), record::decode::<PendingRecord>(&v)) {
                (Some(key), Ok(p)) => {
                    *entity_counts.entry(key.entity.clone()).or_default() += 1;
                    pending.insert(k[1..].to_vec(), p);
                }
                (None, _) => problems.push(format!("pending key {show:?} does not decode")),
                (_, Err(e)) => problems.push(format!("record {show:?}: {e}")),
            },
            Some(b'I') => match (k.get(1..9).and_then(u64_of), k.get(9..)) {
                (Some(seq), Some(rest)) if keydec(rest).is_some() => {
                    index.push((seq, rest.to_vec()))
                }
                _ => problems.push(format!("index key {show:?} does not decode")),
            },
            Some(b'E') => {
                if u64_of(&v).is_none() {
                    problems.push(format!("entity count {show:?} is malformed"));
                }
            }
            Some(b'D') => check(
                record::decode::<DeliveredRecord>(&v).map(|_| ()),
                &mut problems,
            ),
            Some(b'T') => check(
                record::decode::<TombstoneRecord>(&v).map(|_| ()),
                &mut problems,
            ),
            Some(b'S') => check(
                record::decode::<SuspectRecord>(&v).map(|_| ()),
                &mut problems,
            ),
            Some(b'Q') => {
                quarantine += 1;
                check(
                    record::decode::<QuarantineRecord>(&v).map(|_| ()),
                    &mut problems,
                );
            }
            Some(b'X') => corrupt_area += 1,
            _ => problems.push(format!("unknown record {show:?}")),
        }
    }
    if !format_seen && report.records > 0 {
        problems.push("no format version record: not a flux-outbox store?".into());
    }
    // Every pending key has exactly one index entry at its first_seq, and vice versa. An index
    // key is `I` + seq + key, and sled keys are unique: a key can match its first_seq at most
    // once, so a second entry for it necessarily has another seq and is reported below.
    let mut indexed: HashSet<Vec<u8>> = HashSet::new();
    for (seq, rest) in &index {
        match pending.get(rest) {
            Some(p) if p.first_seq == *seq => {
                indexed.insert(rest.clone());
            }
            Some(p) => problems.push(format!(
                "index entry {seq} for {:?} but its first_seq is {}",
                keydec(rest),
                p.first_seq
            )),
            None => problems.push(format!(
                "index entry {seq} for {:?} without a pending value",
                keydec(rest)
            )),
        }
    }
    for rest in pending.keys() {
        if !indexed.contains(rest) {
            problems.push(format!(
                "pending key {:?} missing from the delivery index",
                keydec(rest)
            ));
        }
    }
    for item in db.scan_prefix(b"E") {
        let Ok((k, v)) = item else { continue };
        let entity = String::from_utf8_lossy(&k[1..]).into_owned();
        let stored = u64_of(&v).unwrap_or(0);
        let actual = entity_counts.get(&entity).copied().unwrap_or(0);
        if stored != actual {
            problems.push(format!(
                "entity {entity:?}: count says {stored} pending keys, found {actual}"
            ));
        }
    }
    // The other direction: an entity with pending keys but no count record.
    for entity in entity_counts.keys() {
        if !db.contains_key(simple_key(b'E', entity)).unwrap_or(false) {
            problems.push(format!(
                "entity {entity:?} has pending keys but no count record"
            ));
        }
    }
    if counters.pending_keys != pending.len() as u64 {
        problems.push(format!(
            "counter pending_keys = {} but {} pending records",
            counters.pending_keys,
            pending.len()
        ));
    }
    if counters.pending_entities != entity_counts.len() as u64 {
        problems.push(format!(
            "counter pending_entities = {} but {} entities pending",
            counters.pending_entities,
            entity_counts.len()
        ));
    }
    if counters.quarantine_keys != quarantine {
        problems.push(format!(
            "counter quarantine_keys = {} but {} quarantine records",
            counters.quarantine_keys, quarantine
        ));
    }
    if counters.corrupt_set_aside != corrupt_area {
        // Set-aside records are counted when set aside; a mismatch means the area was edited.
        problems.push(format!(
            "counter corrupt_set_aside = {} but {} records set aside",
            counters.corrupt_set_aside, corrupt_area
        ));
    }
    report.problems = problems;
    report
}

/// Why one record fails this build's checks (envelope version, CRC, payload, key shape), or
/// `None` when it passes. The same checks as [`verify_tree`], one record at a time; `X` holds
/// raw bytes by design and always passes.
fn record_problem(k: &[u8], v: &[u8]) -> Option<String> {
    let show = || String::from_utf8_lossy(k).into_owned();
    let decodes = |r: Result<(), DecodeError>| r.err().map(|e| format!("record {:?}: {e}", show()));
    let key_ok = |ok: bool| (!ok).then(|| format!("key {:?} does not decode", show()));
    match k.first() {
        Some(b'M') => match k {
            META_FORMAT => (v.len() != 4).then(|| "format version record is malformed".into()),
            META_COUNTERS => decodes(record::decode::<Counters>(v).map(|_| ())),
            META_NEXT_SEQ => (u64_of(v).is_none()).then(|| "next_seq record is malformed".into()),
            META_REBUILD => None,
            _ => Some(format!("unknown meta record {:?}", show())),
        },
        Some(b'L') => key_ok(u64_of(&k[1..]).is_some())
            .or_else(|| decodes(record::decode::<LogRecord>(v).map(|_| ()))),
        Some(b'P') => key_ok(keydec(&k[1..]).is_some())
            .or_else(|| decodes(record::decode::<PendingRecord>(v).map(|_| ()))),
        Some(b'I') => {
            key_ok(k.get(1..9).and_then(u64_of).is_some() && k.get(9..).and_then(keydec).is_some())
        }
        Some(b'E') => {
            (u64_of(v).is_none()).then(|| format!("entity count {:?} is malformed", show()))
        }
        Some(b'D') => key_ok(keydec(&k[1..]).is_some())
            .or_else(|| decodes(record::decode::<DeliveredRecord>(v).map(|_| ()))),
        Some(b'T') => decodes(record::decode::<TombstoneRecord>(v).map(|_| ())),
        Some(b'S') => decodes(record::decode::<SuspectRecord>(v).map(|_| ())),
        Some(b'Q') => key_ok(keydec(&k[1..]).is_some())
            .or_else(|| decodes(record::decode::<QuarantineRecord>(v).map(|_| ()))),
        Some(b'X') => None,
        _ => Some(format!("unknown record {:?}", show())),
    }
}

/// When the format record is malformed (not 4 bytes): `Some(why)` if another record fails
/// this build's checks too, i.e. the data may not be of this version and the store must be
/// moved aside; `None` when the format record is well formed or absent, or when everything
/// else is sound (then `from_db` repairs the format record in place). Reads every record, but
/// only on this damage path: a well-formed store costs one `get`.
fn unsound_beside_malformed_format(db: &sled::Db) -> Result<Option<String>, StoreError> {
    match db.get(META_FORMAT).map_err(StoreError::storage)? {
        Some(v) if v.len() != 4 => {}
        _ => return Ok(None),
    }
    for item in db.iter() {
        let (k, v) = match item {
            Ok(kv) => kv,
            Err(e) => return Ok(Some(format!("a read failed: {e}"))),
        };
        if k.as_ref() == META_FORMAT {
            continue;
        }
        if let Some(why) = record_problem(&k, &v) {
            return Ok(Some(why));
        }
    }
    Ok(None)
}

/// The ordinal after the highest one in the `X` area (0 when empty).
fn next_corrupt_ordinal(db: &sled::Db) -> Result<u64, StoreError> {
    Ok(match db.scan_prefix(b"X").keys().next_back() {
        None => 0,
        Some(k) => {
            let k = k.map_err(StoreError::storage)?;
            k.get(1..9)
                .and_then(u64_of)
                .map_or(0, |o| o.saturating_add(1))
        }
    })
}

/// Rebuilds the records derived from `P` (the delivery index `I`, the entity counts `E`) and
/// recounts the counters that describe contents, then removes [`META_REBUILD`]. A salvage cut
/// short (a read error ends it; records are copied in key order, so `E` and `I` come before
/// the `P` records they describe) or a crash during it leaves them not matching what was
/// copied. Idempotent: a crash during the rebuild redoes it at the next open. Returns the
/// counters as written; the history counters (superseded, delivered, ...) are kept.
fn rebuild_derived(db: &sled::Db, counters: Counters) -> Result<Counters, StoreError> {
    const BATCH_MAX: usize = 10_000;
    let mut batch = sled::Batch::default();
    let mut in_batch = 0usize;
    let push = |batch: &mut sled::Batch, in_batch: &mut usize| -> Result<(), StoreError> {
        *in_batch += 1;
        if *in_batch >= BATCH_MAX {
            db.apply_batch(std::mem::take(batch))
                .map_err(StoreError::storage)?;
            *in_batch = 0;
        }
        Ok(())
    };
    for prefix in [b"I", b"E"] {
        for k in db.scan_prefix(prefix).keys() {
            batch.remove(k.map_err(StoreError::storage)?);
            push(&mut batch, &mut in_batch)?;
        }
    }
    db.apply_batch(std::mem::take(&mut batch))
        .map_err(StoreError::storage)?;
    in_batch = 0;
    // `P` keys of one entity are adjacent (keyenc starts with the entity), so the counts need
    // no map: one entity at a time.
    let mut bad: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut pending_keys = 0u64;
    let mut entities = 0u64;
    let mut current: Option<(String, u64)> = None;
    for item in db.scan_prefix(b"P") {
        let (k, v) = item.map_err(StoreError::storage)?;
        let (Some(key), Ok(p)) = (keydec(&k[1..]), record::decode::<PendingRecord>(&v)) else {
            bad.push((k.to_vec(), v.to_vec()));
            continue;
        };
        pending_keys += 1;
        batch.insert(index_key(p.first_seq, &key), &[] as &[u8]);
        push(&mut batch, &mut in_batch)?;
        match &mut current {
            Some((e, n)) if *e == key.entity => *n += 1,
            _ => {
                if let Some((e, n)) = current.take() {
                    batch.insert(simple_key(b'E', &e), &n.to_be_bytes());
                    push(&mut batch, &mut in_batch)?;
                }
                entities += 1;
                current = Some((key.entity.clone(), 1));
            }
        }
    }
    if let Some((e, n)) = current.take() {
        batch.insert(simple_key(b'E', &e), &n.to_be_bytes());
    }
    db.apply_batch(std::mem::take(&mut batch))
        .map_err(StoreError::storage)?;
    let mut c = counters;
    let mut ordinal = next_corrupt_ordinal(db)?;
    let newly_set_aside = bad.len() as u64;
    let mut last = sled::Batch::default();
    for (k, v) in bad {
        tracing::error!(key = %String::from_utf8_lossy(&k), "corrupt pending record set aside while rebuilding");
        last.remove(k.clone());
        last.insert(corrupt_key(ordinal, &k), v);
        ordinal += 1;
    }
    c.pending_keys = pending_keys;
    c.pending_entities = entities;
    c.quarantine_keys = db.scan_prefix(b"Q").count() as u64;
    // The `X` area after this batch: what is there plus what this batch sets aside.
    c.corrupt_set_aside = db.scan_prefix(b"X").count() as u64 + newly_set_aside;
    last.insert(META_COUNTERS, record::encode(&c));
    last.remove(META_REBUILD);
    db.apply_batch(last).map_err(StoreError::storage)?;
    tracing::warn!(
        pending_keys = c.pending_keys,
        pending_entities = c.pending_entities,
        quarantine_keys = c.quarantine_keys,
        corrupt_set_aside = c.corrupt_set_aside,
        "derived records rebuilt and counters recounted from the salvaged contents"
    );
    Ok(c)
}

/// What a salvage did.
struct Salvage {
    /// Records copied as they were.
    copied: u64,
    /// Records that failed this build's checks, put in the `X` area instead.
    set_aside: u64,
}

/// Copies every readable record of a store sled could not open into `db` (a fresh store),
/// best effort: up to the first read error, in key order. Records failing this build's checks
/// are set aside in `X` (the format record too when malformed: the fresh store gets this
/// build's); a source whose well-formed format record names a NEWER version is copied as it is
/// without checks (that data is never interpreted; `from_db` then refuses the store). The
/// fresh store is marked with [`META_REBUILD`] first, so its derived records and counters are
/// rebuilt from what was copied (by `from_db`, also after a crash here).
fn salvage_into(aside: &Path, db: &sled::Db) -> Result<Salvage, StoreError> {
    let mut salvage = Salvage {
        copied: 0,
        set_aside: 0,
    };
    let Some(old) = open_for_salvage(aside) else {
        return Ok(salvage);
    };
    let newer = old.get(META_FORMAT).ok().flatten().is_some_and(|v| {
        <[u8; 4]>::try_from(v.as_ref()).is_ok_and(|b| u32::from_be_bytes(b) > FORMAT_VERSION)
    });
    if !newer {
        db.insert(META_REBUILD, &[] as &[u8])
            .map_err(StoreError::storage)?;
    }
    let mut bad: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for item in old.iter() {
        let (k, v) = match item {
            Ok(kv) => kv,
            Err(e) => {
                tracing::error!(error = %e, "salvage cut short by a read error");
                break;
            }
        };
        if k.as_ref() == META_REBUILD {
            // The old store's own unfinished rebuild: this salvage marks the fresh store.
            continue;
        }
        if !newer {
            if let Some(why) = record_problem(&k, &v) {
                tracing::error!(problem = %why, "salvage: record failing checks set aside");
                bad.push((k.to_vec(), v.to_vec()));
                continue;
            }
        }
        db.insert(k, v).map_err(StoreError::storage)?;
        salvage.copied += 1;
    }
    // After the copy: copied `X` records keep their ordinals, these follow them.
    let mut ordinal = next_corrupt_ordinal(db)?;
    for (k, v) in bad {
        db.insert(corrupt_key(ordinal, &k), v)
            .map_err(StoreError::storage)?;
        ordinal += 1;
        salvage.set_aside += 1;
    }
    db.flush().map_err(StoreError::storage)?;
    drop(old);
    let scratch = salvage_scratch(aside);
    if scratch.exists() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    Ok(salvage)
}

/// Opens the moved-aside store for reading: as it is (retrying while sled threads of a handle
/// this process just dropped still hold its lock), else a copy without its `conf` file.
fn open_for_salvage(aside: &Path) -> Option<sled::Db> {
    let mut tries = 0;
    let e = loop {
        match sled::Config::new().path(aside).open() {
            Ok(old) => return Some(old),
            Err(e) if is_lock_error(&e) && tries < 200 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => break e,
        }
    };
    // A damaged `conf` file alone makes sled refuse a store whose data is intact; the settings
    // it records are sled's defaults, which we never change. Reading a copy without it
    // recovers everything and leaves the moved-aside store as it was found.
    let old = open_without_conf(aside);
    if old.is_none() {
        tracing::error!(error = %e, "moved-aside store cannot be read: nothing salvaged");
    }
    old
}

fn salvage_scratch(aside: &Path) -> PathBuf {
    let mut name = aside.as_os_str().to_owned();
    name.push(".salvage");
    PathBuf::from(name)
}

/// Opens a copy of `aside` without its `conf` file (sled writes a fresh one with its defaults).
fn open_without_conf(aside: &Path) -> Option<sled::Db> {
    let scratch = salvage_scratch(aside);
    let _ = std::fs::remove_dir_all(&scratch);
    copy_dir(aside, &scratch).ok()?;
    let _ = std::fs::remove_file(scratch.join("conf"));
    match sled::Config::new().path(&scratch).open() {
        Ok(db) => Some(db),
        Err(e) => {
            tracing::error!(error = %e, "moved-aside store unreadable even without its conf file");
            let _ = std::fs::remove_dir_all(&scratch);
            None
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), target)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Read-only access to a stopped store (outbox-dump). sled has no read-only mode and
// `Store::open` writes (format record, recount, writer thread), so the tool opens the sled tree
// itself and reads it only through these functions, none of which writes. They mirror the
// `Store` listings exactly (the tool's tests compare offline with live output).

/// What the format record of a tree says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TreeFormat {
    /// No format record: not a flux-outbox store (or one that never finished opening).
    Missing,
    /// The record is not 4 bytes.
    Malformed,
    Version(u32),
}

/// The meta records of a tree.
#[derive(Clone, Debug)]
pub struct TreeMeta {
    pub format: TreeFormat,
    /// What the writer would continue with: stored `next_seq`, raised past the last log record.
    pub next_seq: u64,
    pub counters: Counters,
    /// Why the counters record does not decode; `counters` were then recounted from the
    /// contents, as `Store::open` does.
    pub counters_error: Option<String>,
}

/// Reads format version, next sequence and counters without writing.
pub fn read_tree_meta(db: &sled::Db) -> Result<TreeMeta, StoreError> {
    let format = match db.get(META_FORMAT).map_err(StoreError::storage)? {
        None => TreeFormat::Missing,
        Some(v) => match <[u8; 4]>::try_from(v.as_ref()) {
            Ok(b) => TreeFormat::Version(u32::from_be_bytes(b)),
            Err(_) => TreeFormat::Malformed,
        },
    };
    let (counters, counters_error) = match db.get(META_COUNTERS).map_err(StoreError::storage)? {
        None => (Counters::default(), None),
        Some(v) => match record::decode::<Counters>(&v) {
            Ok(c) => (c, None),
            Err(e) => {
                let c = Counters {
                    pending_keys: db.scan_prefix(b"P").count() as u64,
                    pending_entities: db.scan_prefix(b"E").count() as u64,
                    quarantine_keys: db.scan_prefix(b"Q").count() as u64,
                    corrupt_set_aside: db.scan_prefix(b"X").count() as u64,
                    ..Counters::default()
                };
                (c, Some(e.to_string()))
            }
        },
    };
    let stored_next = db
        .get(META_NEXT_SEQ)
        .map_err(StoreError::storage)?
        .and_then(|v| u64_of(&v))
        .unwrap_or(1);
    let last_log = db
        .scan_prefix(b"L")
        .keys()
        .next_back()
        .and_then(|k| k.ok())
        .and_then(|k| u64_of(&k[1..]));
    let next_seq = stored_next.max(last_log.map(|s| s + 1).unwrap_or(1)).max(1);
    Ok(TreeMeta {
        format,
        next_seq,
        counters,
        counters_error,
    })
}

/// [`Store::stats`] of a stopped store (`store_dir` is the sled directory, for disk usage).
pub fn tree_stats(db: &sled::Db, store_dir: &Path) -> Result<Stats, StoreError> {
    let meta = read_tree_meta(db)?;
    let c = meta.counters;
    let first_log = first_log_seq(db);
    let oldest = oldest_pending_in(db);
    Ok(Stats {
        pending_keys: c.pending_keys,
        pending_entities: c.pending_entities,
        oldest_pending_ms: oldest,
        log_backlog: first_log
            .map(|f| meta.next_seq.saturating_sub(f))
            .unwrap_or(0),
        quarantine_keys: c.quarantine_keys,
        superseded: c.superseded,
        late_dropped: c.late_dropped,
        delivered: c.delivered,
        quarantined_total: c.quarantined_total,
        requeued: c.requeued,
        corrupt_set_aside: c.corrupt_set_aside,
        in_flight_entities: 0,
        disk_bytes: dir_bytes(store_dir),
        next_seq: meta.next_seq,
        format_version: match meta.format {
            TreeFormat::Version(v) => v,
            _ => FORMAT_VERSION,
        },
    })
}

fn pending_row(key: PropKey, p: PendingRecord) -> Row {
    Row {
        entity: key.entity,
        property: key.property,
        value: json_of(&p.value),
        ts_ms: p.ts_ms,
        seq: p.seq,
        pending_since_ms: p.pending_since_ms,
        attempts: p.attempts,
        last_error: p.last_error,
        reason: None,
        http_status: None,
        quarantined_at_ms: None,
    }
}

/// A listing, and how many of the records it looked at could not be read (corrupt). Those are
/// not in `rows`; `verify` names them, and the worker sets each aside when it next touches it.
#[derive(Clone, Debug, PartialEq)]
pub struct Listing<T> {
    pub rows: Vec<T>,
    pub unreadable: u64,
}

impl<T> Default for Listing<T> {
    fn default() -> Self {
        Listing {
            rows: Vec::new(),
            unreadable: 0,
        }
    }
}

/// [`Store::pending_rows`] of a stopped store.
pub fn tree_pending_rows(
    db: &sled::Db,
    entity_prefix: Option<&str>,
    older_than_ms: Option<u64>,
    limit: usize,
) -> Result<Vec<Row>, StoreError> {
    tree_pending_listing(db, entity_prefix, older_than_ms, limit).map(|l| l.rows)
}

/// [`Store::pending_listing`] of a stopped store.
pub fn tree_pending_listing(
    db: &sled::Db,
    entity_prefix: Option<&str>,
    older_than_ms: Option<u64>,
    limit: usize,
) -> Result<Listing<Row>, StoreError> {
    let now = now_ms();
    let mut out = Listing::default();
    for item in db.scan_prefix(b"I").keys() {
        if out.rows.len() >= limit {
            break;
        }
        let ik = item.map_err(StoreError::storage)?;
        let Some(key) = ik.get(9..).and_then(keydec) else {
            out.unreadable += 1;
            continue;
        };
        if entity_prefix.is_some_and(|p| !key.entity.starts_with(p)) {
            continue;
        }
        // Absent: delivered between reading the index and the value (live), not corruption.
        let Some(v) = db
            .get(keyenc(b'P', &key.entity, &key.property))
            .map_err(StoreError::storage)?
        else {
            continue;
        };
        let Ok(p) = record::decode::<PendingRecord>(&v) else {
            out.unreadable += 1;
            continue;
        };
        if older_than_ms.is_some_and(|age| now.saturating_sub(p.pending_since_ms) < age) {
            continue;
        }
        out.rows.push(pending_row(key, p));
    }
    Ok(out)
}

/// [`Store::quarantine_rows`] of a stopped store.
pub fn tree_quarantine_rows(
    db: &sled::Db,
    entity_prefix: Option<&str>,
    limit: usize,
) -> Result<Vec<Row>, StoreError> {
    tree_quarantine_listing(db, entity_prefix, None, limit).map(|l| l.rows)
}

/// [`Store::quarantine_listing`] of a stopped store.
pub fn tree_quarantine_listing(
    db: &sled::Db,
    entity_prefix: Option<&str>,
    older_than_ms: Option<u64>,
    limit: usize,
) -> Result<Listing<Row>, StoreError> {
    let now = now_ms();
    let mut out = Listing::default();
    for item in db.scan_prefix(b"Q") {
        if out.rows.len() >= limit {
            break;
        }
        let (k, v) = item.map_err(StoreError::storage)?;
        let Some(key) = keydec(&k[1..]) else {
            out.unreadable += 1;
            continue;
        };
        if entity_prefix.is_some_and(|p| !key.entity.starts_with(p)) {
            continue;
        }
        let Ok(q) = record::decode::<QuarantineRecord>(&v) else {
            out.unreadable += 1;
            continue;
        };
        if older_than_ms.is_some_and(|age| now.saturating_sub(q.pending.pending_since_ms) < age) {
            continue;
        }
        out.rows.push(Row {
            reason: Some(q.reason),
            http_status: q.http_status,
            quarantined_at_ms: Some(q.quarantined_at_ms),
            ..pending_row(key, q.pending)
        });
    }
    Ok(out)
}

/// [`Store::log_rows`] of a stopped store.
pub fn tree_log_rows(db: &sled::Db, limit: usize) -> Result<Vec<LogRow>, StoreError> {
    tree_log_listing(db, limit).map(|l| l.rows)
}

/// [`tree_log_rows`] plus how many log records could not be read.
pub fn tree_log_listing(db: &sled::Db, limit: usize) -> Result<Listing<LogRow>, StoreError> {
    let mut out = Listing::default();
    for item in db.scan_prefix(b"L") {
        if out.rows.len() >= limit {
            break;
        }
        let (k, v) = item.map_err(StoreError::storage)?;
        let Ok(r) = record::decode::<LogRecord>(&v) else {
            out.unreadable += 1;
            continue;
        };
        out.rows.push(LogRow {
            seq: u64_of(&k[1..]).unwrap_or(0),
            entity: r.entity,
            delete: r.delete,
            properties: r
                .props
                .iter()
                .map(|(n, v)| (n.clone(), json_of(v)))
                .collect(),
            ts_ms: r.ts_ms,
            arrived_ms: r.arrived_ms,
        });
    }
    Ok(out)
}

/// The pending rows the store would hold once its log is compacted (what `compact_all` then
/// `pending_rows` gives on a running store, for export), computed in memory: the log is folded
/// with the compactor's own rules into a transaction that is never committed.
pub fn tree_folded_pending_rows(db: &sled::Db) -> Result<Vec<Row>, StoreError> {
    tree_folded_pending_listing(db).map(|l| l.rows)
}

/// [`tree_folded_pending_rows`] plus how many records (log or pending set) could not be read.
pub fn tree_folded_pending_listing(db: &sled::Db) -> Result<Listing<Row>, StoreError> {
    let mut txn = Txn::new(db);
    let mut counters = read_tree_meta(db)?.counters;
    let mut unreadable = 0u64;
    for item in db.scan_prefix(b"L") {
        let (k, v) = item.map_err(StoreError::storage)?;
        let seq = u64_of(&k[1..]).unwrap_or(0);
        // A corrupt log record is skipped, as the compactor sets it aside.
        let Ok(rec) = record::decode::<LogRecord>(&v) else {
            unreadable += 1;
            continue;
        };
        let version = Version {
            ts_ms: rec.ts_ms,
            seq,
        };
        if rec.delete {
            fold_delete(&mut txn, &mut counters, &rec, version)?;
        } else {
            for (name, value) in &rec.props {
                let p = PendingRecord {
                    ts_ms: rec.ts_ms,
                    seq,
                    value: value.clone(),
                    stream: rec.stream.clone(),
                    source: rec.source.clone(),
                    first_seq: seq,
                    pending_since_ms: rec.arrived_ms,
                    attempts: 0,
                    last_error: None,
                };
                fold_set(
                    &mut txn,
                    &mut counters,
                    &PropKey::new(rec.entity.clone(), name.clone()),
                    p,
                )?;
            }
        }
    }
    let mut rows = Vec::new();
    for ik in txn.keys_with_prefix(b"I")? {
        let Some(key) = ik.get(9..).and_then(keydec) else {
            unreadable += 1;
            continue;
        };
        if let Some(p) = txn.get::<PendingRecord>(&keyenc(b'P', &key.entity, &key.property))? {
            rows.push(pending_row(key, p));
        }
    }
    // Every record the fold found corrupt (each read once: it then reads as absent).
    unreadable += txn.corrupt.len() as u64;
    Ok(Listing { rows, unreadable })
}

/// Sequence of the oldest uncompacted log record.
fn first_log_seq(db: &sled::Db) -> Option<u64> {
    db.scan_prefix(b"L")
        .keys()
        .next()
        .and_then(|k| k.ok())
        .and_then(|k| u64_of(&k[1..]))
}

/// Arrival time of the value that has waited longest (epoch ms), from the log or pending set.
fn oldest_pending_in(db: &sled::Db) -> Option<u64> {
    let from_index = db
        .scan_prefix(b"I")
        .keys()
        .next()
        .and_then(|k| k.ok())
        .and_then(|ik| ik.get(9..).and_then(keydec))
        .and_then(|key| {
            db.get(keyenc(b'P', &key.entity, &key.property))
                .ok()
                .flatten()
        })
        .and_then(|v| record::decode::<PendingRecord>(&v).ok())
        .map(|p| p.pending_since_ms);
    let from_log = db
        .scan_prefix(b"L")
        .values()
        .next()
        .and_then(|v| v.ok())
        .and_then(|v| record::decode::<LogRecord>(&v).ok())
        .map(|r| r.arrived_ms);
    match (from_index, from_log) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// fsyncs every file of a sled directory (after its own flush) and the directory itself.
fn sync_tree_files(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_tree_files(&entry.path())?;
        } else {
            File::open(entry.path())?.sync_all()?;
        }
    }
    sync_dir(dir)
}

/// Finishes or undoes a rotation a crash interrupted (see `Store::shrink_if_drained`):
/// - `store` present: it is authoritative; leftovers of a rotation are removed.
/// - `store` missing, `store.new` present: the crash fell between the two renames; the fresh
///   copy (complete and synced before it got its name) becomes `store`.
/// - `store` missing, only `store.old`: put it back.
fn recover_rotation(data_dir: &Path) -> Result<(), StoreError> {
    let store = data_dir.join(STORE_DIR);
    let next = data_dir.join(format!("{STORE_DIR}.next"));
    let new = data_dir.join(format!("{STORE_DIR}.new"));
    let old = data_dir.join(format!("{STORE_DIR}.old"));
    let fail = |what: &str, e: std::io::Error| {
        StoreError::Other(format!(
            "cannot finish an interrupted store rotation in {} ({what}): {e}",
            data_dir.display()
        ))
    };
    if !store.exists() {
        if new.exists() {
            tracing::warn!("finishing a store rotation interrupted by a crash");
            std::fs::rename(&new, &store).map_err(|e| fail("rename store.new", e))?;
        } else if old.exists() {
            tracing::warn!("undoing a store rotation interrupted by a crash");
            std::fs::rename(&old, &store).map_err(|e| fail("rename store.old", e))?;
        }
    }
    for leftover in [&next, &new, &old] {
        if leftover.exists() {
            std::fs::remove_dir_all(leftover).map_err(|e| fail("remove leftover", e))?;
        }
    }
    let _ = sync_dir(data_dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Update, UpdateOp};

    thread_local! {
        /// Runs inside `compact_step`, on the compacting thread, between the step's two count
        /// updates (pending published, log keys not yet lowered), with the state lock held.
        pub(super) static FOLD_WINDOW_HOOK: std::cell::RefCell<Option<Box<dyn FnMut()>>> =
            const { std::cell::RefCell::new(None) };
    }

    fn open_flush(dir: &Path, pending_keys_max: u64) -> Store {
        let (store, _) = Store::open(
            dir,
            StoreOptions {
                durability: Durability::Flush,
                pending_keys_max,
                ..StoreOptions::default()
            },
        )
        .expect("open");
        store
    }

    fn set_update(entity: &str) -> Update {
        Update {
            entity: entity.into(),
            op: UpdateOp::Set([("v".to_string(), serde_json::json!(1))].into()),
            ts_ms: 1,
            stream: None,
            source: None,
        }
    }

    #[test]
    fn the_lock_free_key_count_never_reads_low_inside_a_fold_step() {
        // `admit` trusts `seen_keys` below the limits. A fold step moves keys from the log count
        // to the pending count; if it lowered the log count before publishing the pending one,
        // a reader in between would see the folded keys in neither and admit beyond the limit.
        const KEYS: u64 = 50;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_flush(dir.path(), StoreOptions::default().pending_keys_max);
        for i in 0..KEYS {
            store
                .ingest_blocking(vec![set_update(&format!("e{i}"))])
                .expect("ingest");
        }
        assert_eq!(store.seen_keys(), KEYS, "all in the log, none pending yet");
        let (inside_tx, inside_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let s = store.clone();
        let step = std::thread::spawn(move || {
            FOLD_WINDOW_HOOK.with(|h| {
                *h.borrow_mut() = Some(Box::new(move || {
                    let _ = inside_tx.send(());
                    let _ = go_rx.recv_timeout(Duration::from_secs(60));
                }))
            });
            s.compact_step(10_000)
        });
        inside_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the fold step reached the window between its two count updates");
        let seen_inside = store.seen_keys();
        let _ = go_tx.send(());
        let folded = step.join().expect("fold thread").expect("fold step");
        assert_eq!(folded as u64, KEYS);
        assert!(
            seen_inside >= KEYS,
            "inside the fold step the lock-free count read {seen_inside}, below the {KEYS} keys held"
        );
        assert_eq!(
            store.seen_keys(),
            KEYS,
            "after the step: all pending, none in the log"
        );
        assert_eq!(store.stats().pending_keys, KEYS);
        store.close().expect("close");
    }

    #[test]
    fn ingest_below_the_limit_never_waits_for_the_engine_lock() {
        // A compaction step holds the state lock for the whole step; a commit group that
        // waited for it to admit a request made every ingest wait behind compaction.
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_flush(dir.path(), 1_000);
        let held = lock(&store.inner.state);
        let (tx, rx) = std::sync::mpsc::channel();
        let s = store.clone();
        std::thread::spawn(move || {
            let _ = tx.send(s.ingest_blocking(vec![set_update("e")]));
        });
        // Generous: the ingest needs no lock at all, so only a stalled machine comes near this.
        let r = rx.recv_timeout(Duration::from_secs(60));
        drop(held);
        let ack = r
            .expect("ingest waited for the engine lock")
            .expect("ingest");
        assert_eq!(ack.accepted, 1);
        store.close().expect("close");
    }
}
