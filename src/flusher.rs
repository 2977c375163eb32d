//! The flush worker: drains claimed batches from the store to Flux and settles every key by
//! what Flux answered (see `flux_client` for the answer taxonomy).
//!
//! Rules it keeps:
//! - A key is settled `Delivered` only for a per-event success (or when Flux already holds the
//!   value: a no-op, or a conflict kept remote by policy). Everything else keeps it pending. A
//!   no-op needs a read that provably includes this worker's last delivery of the key (`merge`
//!   rule 6; a delivered entity delete counts as delivering "absent"), since a read right after
//!   a 200 may be stale.
//! - One poison event never blocks the rest: a whole-batch 400 or a 413 splits the batch until
//!   the bad event stands alone, and only it is quarantined.
//! - Token problems (401/403, `authorization failed` for a well-formed id with no success in the
//!   same answer) never quarantine: the worker pauses at the slow backoff and reports the link as
//!   `auth_failed`. An `authorization failed` that blames the entity id itself (more than one
//!   slash, no namespace: [`EventOutcome::is_permanent`]) is quarantined whatever else the
//!   answer holds; a well-formed id refused while another event of the same answer succeeded
//!   (an id outside the token's namespace) is quarantined too.
//! - An unknown outcome (500, `publish failed`, timeouts, resets) keeps the key, backs off with
//!   jitter, and marks the ENTITY suspect: Flux may still apply that write late (see
//!   "Convergence" below).
//! - At most `in_flight_max` batches are in flight; the store never hands one entity to two. A
//!   claim is always settled or released, also when the sending task is cancelled or panics
//!   ([`ClaimGuard`]).
//! - An event carries only the properties being written; its `timestamp` is the newest source
//!   timestamp among THOSE properties and its `eventId` names the outbox versions it carries.
//!   An event Flux would refuse for its size is split by property before sending; a single
//!   property too large for Flux is quarantined (413) without sending (Flux would answer
//!   `publish failed`, an unknown outcome, forever).
//!
//! # Read strategy (measured, decided)
//! Flux has no bulk read by ids; the alternative to one read per entity is one
//! `GET /api/state/entities?prefix=P` for a batch whose entities share a prefix. Measured against
//! flux-sim on a 2-core machine (`measurement_prefix_list_versus_single_reads` in
//! tests/flusher_rules.rs, release build, batch of 200 entities, 8 reads in parallel, medians):
//!
//! | entities under the prefix | 200 single reads | one prefix list |
//! |---|---|---|
//! | 200    | 4.6 ms  | 0.9 ms   |
//! | 2,000  | 6.0 ms  | 9.8 ms   |
//! | 20,000 | 10.6 ms | 524.9 ms |
//!
//! The list costs what the PREFIX holds, not what the batch holds, and is unpaginated (its
//! answer, and our memory, grow without bound); a gateway's prefix normally holds every entity
//! it ever wrote, far more than one batch. It wins only when the prefix holds about as many
//! entities as the batch (or over a link with a long round trip, where 200 reads cost
//! 200/8 = 25 round trips), and the worker cannot know the prefix size without listing it.
//! Decision: single reads with bounded concurrency (`read_concurrency`), whose cost is bounded by
//! the batch; the prefix list is not used by the flusher (it stays in `FluxClient` for tools).
//!
//! # Convergence (durability contract 5)
//! A late write is an OLD event that Flux applies after newer ones: it rolls properties back
//! (set event) or wipes newer properties (delete event). For every entity with an unknown
//! outcome the worker remembers, for the convergence window: the hashes of the values it sent
//! with an unknown outcome per property (what a late write can put back), whether a delete had an
//! unknown outcome, and what it delivered since (newest per property; a delivered delete clears
//! older ones). It reads the entity back on a schedule (first soon after, then doubling, and once
//! more at the end of the window) and repairs only what provably is its own late write: a
//! property holding a value this worker sent with an unknown outcome, or a property wiped by its
//! own unknown delete, gets its delivered value re-sent; a property resurrected after a
//! delivered delete gets the delete re-sent followed by everything delivered since. A difference
//! that is not its own late write belongs to another writer and is left to the conflict rules.
//! Repairs are sent directly (never re-ingested with a forged version, which could beat a newer
//! value of the same timestamp and which the conflict rules would mistake for another writer)
//! and only between drains, so they never overlap a claimed write of the same entity; a key with
//! a newer pending value is left to the normal flush. Suspects are kept in memory AND in the
//! store (`S` records, written in the same atomic batch as the settle that changes them), so a
//! worker killed after delivering the newer value still repairs the late write after a restart.
//! Pending keys whose last attempt had an unknown outcome are suspect again after a restart too
//! (covering a record lost with an unflushed write; any difference then counts as a late write).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

// tokio's clock (the same as std's outside tests): the loop's timers and the convergence
// schedule then run under paused test time too.
use tokio::time::Instant;

use futures_util::stream::{self, StreamExt};
use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::flux_client::{
    Backoff, BatchOutcome, EventOutcome, FluxClient, FluxEvent, Jitter, RateLimiter,
};
use crate::merge::{self, ConflictPolicy, Delivered, MergeOptions, PropertyWrite, Remote};
use crate::metrics::{LinkState, Metrics};
use crate::model::{now_ms, value_hash, PropKey, Version, DELETE_PROPERTY, EVENT_BYTES_MAX};
use crate::record::SuspectRecord;
use crate::store::{
    Claim, ClaimLimits, ClaimedEvent, ClaimedProp, Outcome, Settlement, Store, StoreError,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeMode {
    ReadMergeWrite,
    /// No read before a property write (metered links). Entity deletes are still read first:
    /// see `survivors_of_delete`.
    Blind,
}

#[derive(Clone, Debug)]
pub struct FlushOptions {
    pub interval: Duration,
    pub batch_events_max: usize,
    pub batch_bytes_max: usize,
    pub in_flight_max: usize,
    /// 0: no cap.
    pub events_per_minute_max: u32,
    pub merge: MergeMode,
    pub conflict_policy: ConflictPolicy,
    pub protected: Vec<String>,
    pub read_concurrency: usize,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub stream: String,
    pub source: String,
    /// How long after an unknown outcome a delivered key is still read back.
    pub convergence_window: Duration,
    /// First read-back of a suspect entity after this; the interval doubles up to the window.
    pub convergence_check_initial: Duration,
    /// Seed for the back-off jitter (tests); `None`: from entropy.
    pub backoff_seed: Option<u64>,
}

impl Default for FlushOptions {
    fn default() -> Self {
        FlushOptions {
            interval: Duration::from_secs(5),
            batch_events_max: 200,
            batch_bytes_max: 1024 * 1024,
            in_flight_max: 2,
            events_per_minute_max: 0,
            merge: MergeMode::ReadMergeWrite,
            conflict_policy: ConflictPolicy::Overwrite,
            protected: vec!["command".into(), "cmd_id".into()],
            read_concurrency: 8,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            stream: "scada".into(),
            source: "flux-outbox".into(),
            convergence_window: crate::config::CONVERGENCE_WINDOW_DEFAULT,
            convergence_check_initial: Duration::from_millis(250),
            backoff_seed: None,
        }
    }
}

/// What this worker last put into Flux for one property of a suspect entity.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Expected {
    /// The value as sent (merged where read-merge-write merged), or Flux's own value for a no-op.
    value: Value,
    hash: u64,
    version: Version,
    stream: Option<String>,
    source: Option<String>,
}

/// An entity with at least one write of unknown outcome: Flux may apply that write late.
#[derive(Clone, Debug, Default)]
struct Suspect {
    /// Per property, hashes of values sent with an unknown outcome.
    unknown_hashes: HashMap<String, HashSet<u64>>,
    /// A delete of the entity had an unknown outcome.
    unknown_delete: bool,
    /// Restored after a restart: the sent values are unknown, any difference counts as ours.
    unknown_any: bool,
    /// Delivered since the entity became suspect, newest per property.
    expected: HashMap<String, Expected>,
    /// The newest delete delivered since the entity became suspect.
    deleted: Option<Expected>,
    until: Option<Instant>,
    next_check: Option<Instant>,
    check_every: Duration,
}

/// A [`Suspect`] as the store keeps it (`S` records): everything but the read-back schedule,
/// which restarts at load.
#[derive(serde::Serialize, serde::Deserialize)]
struct SuspectDisk {
    unknown_hashes: HashMap<String, HashSet<u64>>,
    unknown_delete: bool,
    unknown_any: bool,
    expected: HashMap<String, Expected>,
    deleted: Option<Expected>,
}

impl Suspect {
    fn to_record(&self, now: Instant) -> SuspectRecord {
        let left = self
            .until
            .map_or(Duration::ZERO, |u| u.saturating_duration_since(now));
        let disk = SuspectDisk {
            unknown_hashes: self.unknown_hashes.clone(),
            unknown_delete: self.unknown_delete,
            unknown_any: self.unknown_any,
            expected: self.expected.clone(),
            deleted: self.deleted.clone(),
        };
        SuspectRecord {
            until_ms: now_ms().saturating_add(left.as_millis() as u64),
            // Serializing plain maps of strings, numbers and JSON values cannot fail.
            state: serde_json::to_vec(&disk).unwrap_or_default(),
        }
    }

    /// None when the record's state does not parse (then the entity is watched with
    /// `unknown_any`, the restart rule for lost memory).
    fn from_record(r: &SuspectRecord, now: Instant) -> Suspect {
        let left = Duration::from_millis(r.until_ms.saturating_sub(now_ms()));
        let until = Some(now + left);
        match serde_json::from_slice::<SuspectDisk>(&r.state) {
            Ok(d) => Suspect {
                unknown_hashes: d.unknown_hashes,
                unknown_delete: d.unknown_delete,
                unknown_any: d.unknown_any,
                expected: d.expected,
                deleted: d.deleted,
                until,
                ..Suspect::default()
            },
            Err(_) => Suspect {
                unknown_any: true,
                until,
                ..Suspect::default()
            },
        }
    }
}

/// Most suspect entities remembered (bounds memory during a long outage); past it the ones whose
/// window ends first are dropped, loudly.
const SUSPECTS_MAX: usize = 100_000;
/// Most suspect entities read back per pass (bounds the time a pass delays the next drain).
const CONVERGE_READS_PER_PASS: usize = 64;

/// Owns a claim until it is settled: dropping it unsettled (the task was cancelled, e.g. by the
/// final flush timeout, or panicked) releases the entities so they can be claimed again;
/// otherwise they would stay "in flight" until the process restarts.
pub struct ClaimGuard {
    store: Store,
    claim: Option<Claim>,
}

impl ClaimGuard {
    fn new(store: Store, claim: Claim) -> Self {
        ClaimGuard {
            store,
            claim: Some(claim),
        }
    }
    fn claim(&self) -> &Claim {
        // Only `settled` takes the claim, and it consumes the guard.
        self.claim.as_ref().expect("claim present until settled")
    }
    fn settled(mut self) {
        self.claim = None;
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if let Some(claim) = self.claim.take() {
            tracing::warn!(
                events = claim.events.len(),
                "flush cancelled before settling: releasing the claim, keys stay pending"
            );
            self.store.release(&claim);
        }
    }
}

/// What one batch attempt concluded about the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkVerdict {
    Ok,
    /// Back off exponentially (unknown outcome, transport failure).
    Unknown,
    /// Back off at the slow rate (token refused).
    Auth,
    RateLimited(Option<Duration>),
}

pub struct Flusher {
    store: Store,
    client: FluxClient,
    opts: FlushOptions,
    metrics: Arc<Metrics>,
    merge_opts: MergeOptions,
    limiter: Option<RateLimiter>,
    suspects: std::sync::Mutex<HashMap<String, Suspect>>,
}

impl Flusher {
    pub fn new(
        store: Store,
        client: FluxClient,
        opts: FlushOptions,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let merge_opts = MergeOptions {
            policy: opts.conflict_policy,
            protected: opts.protected.iter().cloned().collect(),
        };
        // The bucket holds one batch: the cap paces batches, it does not allow a minute's burst.
        let limiter = (opts.events_per_minute_max > 0).then(|| {
            RateLimiter::per_minute(opts.events_per_minute_max, opts.batch_events_max as u32)
        });
        let flusher = Flusher {
            store,
            client,
            opts,
            metrics,
            merge_opts,
            limiter,
            suspects: Default::default(),
        };
        flusher.restore_suspects();
        Arc::new(flusher)
    }

    /// After a restart the in-memory suspects are gone: reload the convergence records (`S`,
    /// at most `SUSPECTS_MAX`, so this is cheap enough for the start-up path). Pending keys
    /// with an unknown last outcome are restored by [`Flusher::run`].
    fn restore_suspects(&self) {
        let now = Instant::now();
        // What the convergence memory held when the worker stopped (it is written with every
        // settle that changes it): an entity whose newer value was delivered is still watched.
        match self.store.suspects(SUSPECTS_MAX) {
            Ok(recs) => {
                let mut suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
                for (entity, r) in recs {
                    let mut sus = Suspect::from_record(&r, now);
                    // The read-back schedule restarts; an expired window still gets one check.
                    sus.check_every = self.opts.convergence_check_initial;
                    sus.next_check = Some(now + self.opts.convergence_check_initial);
                    if sus.until.is_some_and(|u| u <= now) {
                        sus.until = sus.next_check;
                    }
                    suspects.insert(entity, sus);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the convergence records"),
        }
    }

    /// The second half of the restore, run by [`Flusher::run`] before its first drain and off
    /// the start-up path: it streams over the whole pending set (seconds with a million keys),
    /// and readiness must not wait for that. A pending key whose last attempt had an unknown
    /// outcome says its entity may still get a late write: watch it again.
    async fn restore_pending_suspects(&self) {
        let store = self.store.clone();
        let found = tokio::task::spawn_blocking(move || {
            store.entities_with_error_prefix(SUSPECT_TAG, SUSPECTS_MAX)
        })
        .await;
        let entities = match found {
            Ok(Ok(entities)) => entities,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot list pending keys to restore suspects");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "restoring suspects failed");
                return;
            }
        };
        let now = Instant::now();
        let mut suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
        for entity in entities {
            let s = suspects.entry(entity).or_default();
            s.unknown_any = true;
            if s.until.is_none() {
                self.arm(s, now);
            }
        }
    }

    /// (Re)starts an entity's convergence window and read-back schedule.
    fn arm(&self, s: &mut Suspect, now: Instant) {
        s.until = Some(now + self.opts.convergence_window);
        s.check_every = self.opts.convergence_check_initial;
        s.next_check = Some(now + self.opts.convergence_check_initial);
    }

    /// Runs until `shutdown` turns true, then returns (the caller runs one last bounded
    /// `drain_once`).
    ///
    /// Triggers: a drain starts when `interval` has passed since the last one, when a full batch
    /// of EVENTS is pending (`batch_events_max` entities; one event per entity), when the bytes
    /// acknowledged by ingest since the last drain reach `batch_bytes_max` (a full batch by
    /// size: read from an in-memory counter of the store, no scan), or right after a back-off
    /// delay (the back-off, not the interval, then decides when failed keys are tried again).
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        self.restore_pending_suspects().await;
        let mut pacer = RetryPacer::new(&self.opts);
        let mut last_flush = Instant::now();
        let mut bytes_at_last_flush = self.store.ingested_bytes();
        let mut retry_due = false;
        let poll = Duration::from_millis(50).min(self.opts.interval);
        loop {
            crate::watchdog::flush_loop_beat();
            if *shutdown.borrow() {
                return;
            }
            let stats = self.stats_off_runtime().await;
            let ingested = self.store.ingested_bytes();
            let due = retry_due
                || last_flush.elapsed() >= self.opts.interval
                || flush_due_by_size(
                    &stats,
                    ingested.saturating_sub(bytes_at_last_flush),
                    &self.opts,
                );
            if due && stats.pending_keys > 0 {
                last_flush = Instant::now();
                bytes_at_last_flush = ingested;
                retry_due = false;
                let delivered_before = stats.delivered;
                let verdict = self.drain_once().await;
                // Progress in this drain means the link works: a few unknown events among many
                // delivered ones must not push the worker to the slow cap.
                if verdict == LinkVerdict::Ok
                    || self.stats_off_runtime().await.delivered > delivered_before
                {
                    pacer.reset();
                }
                if verdict != LinkVerdict::Ok {
                    pacer.pause(verdict, &mut shutdown).await;
                    retry_due = true;
                    continue;
                }
            }
            if let Err(e) = self.converge().await {
                tracing::debug!(error = %e, "convergence read-back deferred");
            }
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// The store's counts, read on the blocking pool: `Store::stats` takes the state lock, which
    /// a compaction step holds for the whole step, and this loop polls every 50 ms; on a runtime
    /// worker thread that wait would hold up the ingest handlers served by the same thread.
    async fn stats_off_runtime(&self) -> crate::store::Stats {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.stats()).await {
            Ok(s) => s,
            // A panic inside `stats` ends this loop as it did when `stats` ran here: quietly
            // skipping rounds would stall delivery while the watchdog still saw a live loop.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => {
                // Cancelled: only when the runtime shuts down. No counts, no flush this round.
                tracing::warn!(error = %e, "reading the store's counts was cancelled");
                crate::store::Stats::default()
            }
        }
    }

    /// Claims and sends batches, up to `in_flight_max` at once, until nothing is claimable or a
    /// batch reports a link problem.
    pub async fn drain_once(self: &Arc<Self>) -> LinkVerdict {
        let limits = ClaimLimits {
            events_max: self.opts.batch_events_max,
            bytes_max: self.opts.batch_bytes_max,
        };
        let mut tasks = tokio::task::JoinSet::new();
        let mut verdict = LinkVerdict::Ok;
        loop {
            crate::watchdog::flush_loop_beat();
            while tasks.len() < self.opts.in_flight_max.max(1) && verdict == LinkVerdict::Ok {
                // sled calls block: off the runtime's worker threads, which also serve ingest.
                // The guard is made on the blocking thread: should this future be dropped while
                // the claim runs (shutdown), the finished claim is dropped with its guard and
                // its entities are released, not left claimed until a restart.
                let store = self.store.clone();
                let claimed = tokio::task::spawn_blocking(move || {
                    let claim = store.claim(limits)?;
                    Ok(claim.map(|c| ClaimGuard::new(store, c)))
                })
                .await
                .unwrap_or_else(|e| Err(StoreError::Other(format!("claim task: {e}"))));
                let guard = match claimed {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "claim failed");
                        verdict = LinkVerdict::Unknown;
                        break;
                    }
                };
                let me = self.clone();
                tasks.spawn(async move { me.send_claim(guard).await });
            }
            match tasks.join_next().await {
                Some(Ok(v)) => {
                    if v != LinkVerdict::Ok && verdict == LinkVerdict::Ok {
                        verdict = v;
                    }
                }
                Some(Err(e)) => {
                    tracing::error!(error = %e, "flush task failed");
                    verdict = LinkVerdict::Unknown;
                }
                None => return verdict,
            }
        }
    }

    /// Sends one claim and settles every key in it. Never returns with keys unsettled; if the
    /// task is cancelled or panics, the guard releases the claim.
    async fn send_claim(self: Arc<Self>, guard: ClaimGuard) -> LinkVerdict {
        let started = Instant::now();
        let mut settlements = Vec::new();
        let mut sent = HashMap::new();
        let events = &guard.claim().events;
        let verdict = self.process(events, &mut settlements, &mut sent).await;
        self.metrics.observe_flush(started.elapsed().as_secs_f64());
        let delivered_any = settlements
            .iter()
            .any(|s| matches!(s.outcome, Outcome::Delivered { .. }));
        let suspect_writes = self.track_suspects(&settlements, &sent);
        // Every claimed key gets a settlement; anything the code above missed is retried.
        let settled: HashSet<PropKey> = settlements.iter().map(|s| s.key.clone()).collect();
        for ev in events {
            for p in &ev.props {
                let key = PropKey::new(ev.entity.clone(), p.name.clone());
                if !settled.contains(&key) {
                    tracing::error!(entity = %ev.entity, property = %p.name, "claimed key got no settlement: kept pending");
                    settlements.push(Settlement {
                        key,
                        sent: p.pending.clone(),
                        outcome: Outcome::Retry {
                            error: "not attempted".into(),
                        },
                    });
                }
            }
        }
        // Off the runtime's worker threads (sled calls block). The guard goes with the settle:
        // should this task be cancelled meanwhile (the final flush timeout), the entities are
        // released only once the settle is done, never claimed again while it runs.
        let store = self.store.clone();
        let settled = tokio::task::spawn_blocking(move || {
            let r = store.settle_noting(settlements, suspect_writes);
            if r.is_ok() {
                guard.settled();
            }
            // On an error, dropping the guard releases the claim: the batch will be resent.
            r
        })
        .await
        .unwrap_or_else(|e| Err(StoreError::Other(format!("settle task: {e}"))));
        if let Err(e) = settled {
            tracing::error!(error = %e, "settle failed; the batch will be resent");
            self.store.note_storage_failure(&e);
        }
        if delivered_any {
            self.metrics
                .last_delivery_ms
                .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
        }
        match verdict {
            LinkVerdict::Ok => self.metrics.set_link(LinkState::Up),
            LinkVerdict::Unknown => self.metrics.set_link(LinkState::Down),
            LinkVerdict::Auth => self.metrics.set_link(LinkState::AuthFailed),
            LinkVerdict::RateLimited(_) => self.metrics.set_link(LinkState::RateLimited),
        }
        verdict
    }

    /// Plans (read-merge-write), sends, and splits on whole-batch rejections.
    /// `sent` receives, per key, the value Flux holds if the key's write succeeds (the value
    /// sent, or Flux's own value when nothing is sent): what convergence compares against.
    async fn process(
        &self,
        events: &[ClaimedEvent],
        out: &mut Vec<Settlement>,
        sent: &mut HashMap<PropKey, Value>,
    ) -> LinkVerdict {
        // 1. Read Flux's current state of every entity (bounded concurrency). Blind mode reads
        // only the entities of delete events: a late delete must not wipe properties delivered
        // with newer versions (`survivors_of_delete`), and only a read tells which of them Flux
        // holds. Deletes are rare, so a metered link still pays almost nothing for it.
        let ids: Vec<String> = events
            .iter()
            .filter(|e| self.opts.merge == MergeMode::ReadMergeWrite || e.delete)
            .map(|e| e.entity.clone())
            .collect();
        let remote: HashMap<String, Option<crate::flux_client::EntityState>> = if !ids.is_empty() {
            // Results are looked at as they arrive: the first failure ends the batch's
            // reads (dropping the stream cancels the reads in flight and starts no more),
            // so a dead link costs at most `read_concurrency` requests per attempt, not one
            // per entity of every claimed batch.
            let mut reads = stream::iter(ids.into_iter().map(|id| async move {
                let r = self.client.get_entity(&id).await;
                (id, r)
            }))
            .buffer_unordered(self.opts.read_concurrency.max(1));
            let mut map = HashMap::new();
            while let Some((id, r)) = reads.next().await {
                self.metrics
                    .reads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match r {
                    Ok(state) => {
                        map.insert(id, state);
                    }
                    Err(e) => {
                        self.metrics
                            .read_failures
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let error = format!("read before write failed: {e}");
                        retry_all(events, &error, out);
                        return LinkVerdict::Unknown;
                    }
                }
            }
            map
        } else {
            HashMap::new()
        };

        // 2. Plan each event.
        let mut planned: Vec<(FluxEvent, &ClaimedEvent, Map<String, Value>)> = Vec::new();
        for ev in events {
            let deleted = if ev.delete || self.opts.merge == MergeMode::Blind {
                None
            } else {
                ev.delivered_delete
            };
            let writes: Vec<PropertyWrite<'_>> = ev
                .props
                .iter()
                .map(|p| PropertyWrite {
                    name: &p.name,
                    value: &p.value,
                    delivered: last_delivery(p, deleted.as_ref()),
                })
                .collect();
            let state = remote.get(&ev.entity);
            let remote_view = match (self.opts.merge, state) {
                (MergeMode::Blind, _) | (_, None) => Remote::Blind,
                (_, Some(None)) => Remote::Absent,
                (_, Some(Some(s))) => s.as_remote(),
            };
            let plan = merge::plan_entity(remote_view, &writes, &self.merge_opts);
            let props = if ev.delete {
                merge::tombstone_properties()
            } else {
                for (name, d) in &plan.decisions {
                    let Some(p) = ev.props.iter().find(|p| &p.name == name) else {
                        continue;
                    };
                    let key = PropKey::new(ev.entity.clone(), name.clone());
                    match d {
                        merge::Decision::NoOp => {
                            self.metrics
                                .noops
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            // Record what Flux holds (the merged candidate), not our raw value:
                            // for an object patch they differ, and a wrong hash would make the
                            // next write of this key look like a conflict with another writer.
                            let held = state
                                .and_then(|s| s.as_ref())
                                .and_then(|s| s.properties.get(name))
                                .cloned()
                                .unwrap_or_else(|| p.value.clone());
                            out.push(Settlement {
                                key: key.clone(),
                                sent: p.pending.clone(),
                                outcome: Outcome::Delivered {
                                    value_hash: value_hash(&held),
                                },
                            });
                            sent.insert(key, held);
                        }
                        merge::Decision::Conflict { resolution } => {
                            self.metrics
                                .conflicts
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tracing::warn!(entity = %ev.entity, property = %name, ?resolution, "conflict: Flux changed this key after our last delivery");
                            if matches!(resolution, merge::Resolution::KeepRemote) {
                                // Absent hashes as null, as the planner compares it.
                                let remote = state
                                    .and_then(|s| s.as_ref())
                                    .and_then(|s| s.properties.get(name))
                                    .cloned()
                                    .unwrap_or(Value::Null);
                                out.push(Settlement {
                                    key: key.clone(),
                                    sent: p.pending.clone(),
                                    outcome: Outcome::Delivered {
                                        value_hash: value_hash(&remote),
                                    },
                                });
                                sent.insert(key, remote);
                            }
                        }
                        merge::Decision::Protected => {
                            out.push(Settlement {
                                key,
                                sent: p.pending.clone(),
                                outcome: Outcome::Quarantine {
                                    reason: format!(
                                        "property {name:?} is protected and never written"
                                    ),
                                    http_status: None,
                                },
                            });
                        }
                        merge::Decision::Send(_) => {}
                    }
                }
                plan.properties_to_send()
            };
            if props.is_empty() {
                continue;
            }
            for (name, v) in &props {
                sent.insert(PropKey::new(ev.entity.clone(), name.clone()), v.clone());
            }
            let (survivors, survivors_ts) = if ev.delete {
                self.survivors_of_delete(ev, state.and_then(|s| s.as_ref()))
            } else {
                (Map::new(), 0)
            };
            for props in self.split_for_size(ev, props) {
                let event = self.make_event(ev, props.clone());
                match event.validate() {
                    Ok(()) => planned.push((event, ev, props)),
                    Err(reason) => {
                        // Flux would refuse it whatever we do; an oversized event would even be
                        // answered `publish failed` (unknown) and retried forever.
                        let status = (event.flux_encoded_len() >= EVENT_BYTES_MAX).then_some(413);
                        self.metrics.events("invalid_local", 1);
                        tracing::warn!(entity = %ev.entity, %reason, "event cannot be sent to Flux: quarantined");
                        quarantine_event(ev, &props, &reason, status, out);
                    }
                }
            }
            if !survivors.is_empty() {
                // Right after the delete in the same batch (Flux applies a batch in order; a
                // split keeps the order). It carries no claimed key, so it settles nothing;
                // convergence checks that the survivors made it.
                let mut event = self.make_event(ev, survivors.clone());
                event.timestamp_ms = survivors_ts.max(1);
                event.event_id = event.event_id.map(|id| format!("{id}-survivors"));
                planned.push((event, ev, survivors));
            }
        }
        if planned.is_empty() {
            return LinkVerdict::Ok;
        }
        self.send_planned(&planned, out).await
    }

    /// Properties that an entity delete must not wipe: Flux deletes the whole entity, but a
    /// property this worker delivered with a NEWER version than the delete (the delete's source
    /// timestamp is older; it arrived late) must survive it (newest wins per key). Those still
    /// holding exactly what was delivered are re-sent right after the delete, and the entity is
    /// watched by convergence in case only the delete lands.
    fn survivors_of_delete(
        &self,
        ev: &ClaimedEvent,
        state: Option<&crate::flux_client::EntityState>,
    ) -> (Map<String, Value>, u64) {
        let (Some(state), Some(del)) = (state, ev.props.first()) else {
            return (Map::new(), 0);
        };
        let mut out = Map::new();
        let mut expected = HashMap::new();
        for (name, value) in &state.properties {
            let key = PropKey::new(ev.entity.clone(), name.clone());
            let Ok(Some(d)) = self.store.delivered(&key) else {
                continue;
            };
            let version = Version {
                ts_ms: d.ts_ms,
                seq: d.seq,
            };
            if version > del.version && d.value_hash == value_hash(value) {
                out.insert(name.clone(), value.clone());
                expected.insert(
                    name.clone(),
                    Expected {
                        value: value.clone(),
                        hash: d.value_hash,
                        version,
                        stream: None,
                        source: None,
                    },
                );
            }
        }
        let ts = expected
            .values()
            .map(|e| e.version.ts_ms)
            .max()
            .unwrap_or(0);
        if !expected.is_empty() {
            tracing::info!(entity = %ev.entity, properties = expected.len(),
                "delete is older than delivered properties: re-sending them after it");
            let mut suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
            let sus = suspects.entry(ev.entity.clone()).or_default();
            self.arm(sus, Instant::now());
            sus.unknown_delete = true;
            sus.expected.extend(expected);
        }
        (out, ts)
    }

    /// The Flux event for some properties of a claimed event: `timestamp` is the newest source
    /// timestamp among the properties SENT (not among every claimed one), and the `eventId`
    /// names the outbox versions it carries.
    fn make_event(&self, ev: &ClaimedEvent, props: Map<String, Value>) -> FluxEvent {
        let carried: Vec<&ClaimedProp> = ev
            .props
            .iter()
            .filter(|p| props.contains_key(&p.name))
            .collect();
        FluxEvent {
            stream: ev
                .stream
                .clone()
                .unwrap_or_else(|| self.opts.stream.clone()),
            source: ev
                .source
                .clone()
                .unwrap_or_else(|| self.opts.source.clone()),
            timestamp_ms: carried
                .iter()
                .map(|p| p.version.ts_ms)
                .max()
                .unwrap_or(0)
                .max(1),
            entity_id: ev.entity.clone(),
            properties: props,
            event_id: Some(event_id(&ev.entity, &carried)),
        }
    }

    /// Splits an entity's properties into events each under Flux's per-event size limit (the
    /// store groups every pending property of an entity into one event, whatever their sizes).
    /// A single property over the limit stays alone; `validate` then refuses it.
    fn split_for_size(
        &self,
        ev: &ClaimedEvent,
        props: Map<String, Value>,
    ) -> Vec<Map<String, Value>> {
        if props.len() < 2 || self.make_event(ev, props.clone()).validate().is_ok() {
            return vec![props];
        }
        let envelope = self.make_event(ev, Map::new()).encoded_len();
        // Margin for JSON punctuation and escaping differences between our and Flux's encoding.
        let budget = EVENT_BYTES_MAX.saturating_sub(envelope + 1024);
        let mut parts: Vec<Map<String, Value>> = Vec::new();
        let mut current = Map::new();
        let mut current_bytes = 0usize;
        for (name, value) in props {
            let bytes = name.len() + serde_json::to_vec(&value).map(|v| v.len()).unwrap_or(0) + 8;
            if !current.is_empty() && current_bytes + bytes > budget {
                parts.push(std::mem::take(&mut current));
                current_bytes = 0;
            }
            current_bytes += bytes;
            current.insert(name, value);
        }
        if !current.is_empty() {
            parts.push(current);
        }
        parts
    }

    /// Sends planned events; splits on whole-batch 400 and 413 (iteratively, no recursion).
    async fn send_planned(
        &self,
        planned: &[(FluxEvent, &ClaimedEvent, Map<String, Value>)],
        out: &mut Vec<Settlement>,
    ) -> LinkVerdict {
        let mut work: Vec<std::ops::Range<usize>> = vec![0..planned.len()];
        let mut verdict = LinkVerdict::Ok;
        while let Some(range) = work.pop() {
            let part = &planned[range.clone()];
            if verdict != LinkVerdict::Ok {
                for (_, ev, props) in part {
                    retry_event(
                        ev,
                        props,
                        "not sent: link problem earlier in this batch",
                        out,
                    );
                }
                continue;
            }
            if let Some(limiter) = &self.limiter {
                limiter.acquire(part.len() as u32).await;
            }
            let events: Vec<FluxEvent> = part.iter().map(|(e, _, _)| e.clone()).collect();
            let bytes: usize = events.iter().map(|e| e.encoded_len()).sum();
            self.metrics
                .bytes_sent
                .fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
            let outcome = self.client.post_batch(&events).await;
            match outcome {
                BatchOutcome::PerEvent(results) => {
                    self.metrics.batch("ok");
                    let any_applied = results
                        .iter()
                        .any(|r| matches!(r, EventOutcome::Applied { .. }));
                    for ((_, ev, props), r) in part.iter().zip(results.iter()) {
                        match r {
                            EventOutcome::Applied { .. } => {
                                self.metrics.events("applied", 1);
                                deliver_event(ev, props, out);
                            }
                            EventOutcome::Invalid { reason } => {
                                self.metrics.events("invalid", 1);
                                tracing::warn!(entity = %ev.entity, %reason, "Flux rejected an event: quarantined");
                                quarantine_event(ev, props, reason, Some(200), out);
                            }
                            // The id itself is unusable (public mode wants exactly
                            // `namespace/rest`): no token can ever make it pass, so it must not
                            // hold the link paused, even when nothing else in the answer
                            // succeeded (a batch of only such ids would otherwise block every
                            // entity claimed after it, forever).
                            EventOutcome::AuthFailed { reason } if r.is_permanent() => {
                                self.metrics.events("auth_failed_entity", 1);
                                tracing::warn!(entity = %ev.entity, %reason, "Flux refused this entity id: quarantined");
                                quarantine_event(ev, props, reason, Some(200), out);
                            }
                            // A well-formed id refused (e.g. outside the token's namespace) looks
                            // exactly like a wrong token; only a success with the same token in
                            // the same answer proves the failure belongs to the entity.
                            EventOutcome::AuthFailed { reason } if any_applied => {
                                self.metrics.events("auth_failed_entity", 1);
                                tracing::warn!(entity = %ev.entity, %reason, "Flux refused this entity with a token that works for others: quarantined");
                                quarantine_event(ev, props, reason, Some(200), out);
                            }
                            EventOutcome::AuthFailed { reason } => {
                                self.metrics.events("auth_failed", 1);
                                tracing::error!(%reason, "Flux refused the token: pausing");
                                retry_event(ev, props, reason, out);
                                verdict = LinkVerdict::Auth;
                            }
                            EventOutcome::RateLimited => {
                                self.metrics.events("rate_limited", 1);
                                retry_event(ev, props, "rate limit exceeded", out);
                                if verdict == LinkVerdict::Ok {
                                    verdict = LinkVerdict::RateLimited(None);
                                }
                            }
                            EventOutcome::Unknown { reason } => {
                                self.metrics.events("unknown", 1);
                                retry_event_suspect(ev, props, reason, out);
                                if verdict == LinkVerdict::Ok {
                                    verdict = LinkVerdict::Unknown;
                                }
                            }
                        }
                    }
                    // A results list shorter than the batch: the rest has an unknown outcome.
                    for (_, ev, props) in part.iter().skip(results.len()) {
                        retry_event_suspect(ev, props, "no result for this event", out);
                        verdict = LinkVerdict::Unknown;
                    }
                }
                BatchOutcome::WholeBatchRejected { .. } | BatchOutcome::TooLarge
                    if part.len() > 1 =>
                {
                    self.metrics.batch("split");
                    tracing::info!(
                        events = part.len(),
                        "batch refused whole: splitting to isolate the bad event"
                    );
                    let mid = range.start + part.len() / 2;
                    work.push(mid..range.end);
                    work.push(range.start..mid);
                }
                BatchOutcome::WholeBatchRejected { reason } => {
                    self.metrics.batch("rejected");
                    let (_, ev, props) = &part[0];
                    self.metrics.events("invalid", 1);
                    tracing::warn!(entity = %ev.entity, %reason, "Flux rejected an event: quarantined");
                    quarantine_event(ev, props, &reason, Some(400), out);
                }
                BatchOutcome::TooLarge => {
                    self.metrics.batch("too_large");
                    let (_, ev, props) = &part[0];
                    self.metrics.events("too_large", 1);
                    quarantine_event(ev, props, "event too large for Flux (413)", Some(413), out);
                }
                BatchOutcome::Unauthorized { status, reason } => {
                    self.metrics.batch("unauthorized");
                    tracing::error!(status, %reason, "Flux refused the token: pausing, nothing quarantined");
                    for (_, ev, props) in part {
                        retry_event(ev, props, &format!("{status}: {reason}"), out);
                    }
                    verdict = LinkVerdict::Auth;
                }
                BatchOutcome::RateLimited { retry_after } => {
                    self.metrics.batch("rate_limited");
                    for (_, ev, props) in part {
                        retry_event(ev, props, "429 rate limit exceeded", out);
                    }
                    verdict = LinkVerdict::RateLimited(retry_after);
                }
                BatchOutcome::Unknown { reason } => {
                    self.metrics.batch("unknown");
                    tracing::warn!(%reason, "batch outcome unknown: keeping, will re-read and resend");
                    for (_, ev, props) in part {
                        retry_event_suspect(ev, props, &reason, out);
                    }
                    verdict = LinkVerdict::Unknown;
                }
            }
        }
        verdict
    }

    /// Records unknown outcomes (the entity becomes suspect) and, for suspect entities, what
    /// was delivered since. `sent` holds the value Flux holds after each key's success.
    /// Returns the convergence records to write with the settle (durable memory, so that a
    /// restart still repairs a late write).
    fn track_suspects(
        &self,
        settlements: &[Settlement],
        sent: &HashMap<PropKey, Value>,
    ) -> Vec<(String, Option<SuspectRecord>)> {
        let mut suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let mut changed: HashSet<String> = HashSet::new();
        for s in settlements {
            let entity = &s.key.entity;
            match &s.outcome {
                Outcome::Retry { error } if error.starts_with(SUSPECT_TAG) => {
                    changed.insert(entity.clone());
                    let sus = suspects.entry(entity.clone()).or_default();
                    self.arm(sus, now);
                    if s.key.is_delete() {
                        sus.unknown_delete = true;
                    } else if let Some(v) = sent.get(&s.key) {
                        sus.unknown_hashes
                            .entry(s.key.property.clone())
                            .or_default()
                            .insert(value_hash(v));
                    } else {
                        sus.unknown_any = true;
                    }
                }
                Outcome::Delivered { value_hash: hash } => {
                    let Some(sus) = suspects.get_mut(entity) else {
                        continue;
                    };
                    changed.insert(entity.clone());
                    let version = s.sent.version();
                    if sus.deleted.as_ref().is_some_and(|d| d.version >= version) {
                        continue;
                    }
                    let value = sent.get(&s.key).cloned().unwrap_or_else(|| {
                        serde_json::from_slice(&s.sent.value).unwrap_or(Value::Null)
                    });
                    let exp = Expected {
                        value,
                        hash: *hash,
                        version,
                        stream: s.sent.stream.clone(),
                        source: s.sent.source.clone(),
                    };
                    if s.key.is_delete() {
                        sus.expected.retain(|_, e| e.version > version);
                        sus.deleted = Some(exp);
                    } else if sus
                        .expected
                        .get(&s.key.property)
                        .is_none_or(|e| e.version <= version)
                    {
                        sus.expected.insert(s.key.property.clone(), exp);
                    }
                }
                _ => {}
            }
        }
        if suspects.len() > SUSPECTS_MAX {
            // Keep the windows that end last; the dropped entities lose their read-back.
            let mut ends: Vec<(Instant, String)> = suspects
                .iter()
                .map(|(e, s)| (s.until.unwrap_or(now), e.clone()))
                .collect();
            ends.sort();
            let excess = suspects.len() - SUSPECTS_MAX;
            tracing::warn!(
                dropped = excess,
                "too many suspect entities: dropping the oldest read-backs"
            );
            for (_, e) in ends.into_iter().take(excess) {
                suspects.remove(&e);
                changed.insert(e);
            }
        }
        changed
            .into_iter()
            .map(|e| {
                let rec = suspects.get(&e).map(|s| s.to_record(now));
                (e, rec)
            })
            .collect()
    }

    /// Writes one entity's convergence record as it now stands in memory (removed if gone).
    fn persist_suspect(&self, entity: &str) {
        let rec = {
            let suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
            suspects.get(entity).map(|s| s.to_record(Instant::now()))
        };
        if let Err(e) = self.store.note_suspects(vec![(entity.to_string(), rec)]) {
            tracing::warn!(entity, error = %e, "cannot write the convergence record");
        }
    }

    /// Whether a newer value of the key is waiting in the outbox (the normal flush sends it).
    fn is_pending(&self, entity: &str, property: &str) -> bool {
        // No per-key lookup exists on `Store`; the pending record's key is read directly.
        self.store
            .raw_db()
            .contains_key(crate::store::keyenc(b'P', entity, property))
            .unwrap_or(true)
    }

    /// Reads back the suspect entities whose check is due and repairs this worker's own late
    /// writes (see the module doc). Runs only between drains, so a repair never overlaps a
    /// claimed write of the same entity.
    async fn converge(&self) -> Result<(), String> {
        let now = Instant::now();
        let due: Vec<(String, Suspect)> = {
            let suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
            let mut due: Vec<(Instant, &String)> = suspects
                .iter()
                .filter_map(|(e, s)| s.next_check.filter(|t| *t <= now).map(|t| (t, e)))
                .collect();
            due.sort();
            due.into_iter()
                .take(CONVERGE_READS_PER_PASS)
                .map(|(_, e)| (e.clone(), suspects[e].clone()))
                .collect()
        };
        for (entity, sus) in due {
            let needs_read = !sus.expected.is_empty() || sus.deleted.is_some();
            let mut repaired = true;
            if needs_read {
                self.metrics
                    .reads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let state = self.client.get_entity(&entity).await.map_err(|e| {
                    self.metrics
                        .read_failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    e.to_string()
                })?;
                let (delete, props) = self.plan_repair(&entity, &sus, state.as_ref());
                if delete.is_some() || !props.is_empty() {
                    repaired = self.send_repair(&entity, delete, props).await;
                }
            }
            let mut suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
            let Some(s) = suspects.get_mut(&entity) else {
                continue;
            };
            let now = Instant::now();
            let until = s.until.unwrap_or(now);
            if !repaired {
                s.next_check = Some(now + self.opts.convergence_check_initial);
            } else if s.next_check.is_some_and(|t| t >= until) && now >= until {
                // That was the check at the end of the window (and no new unknown outcome
                // re-armed it meanwhile): the entity is no longer suspect.
                suspects.remove(&entity);
                drop(suspects);
                self.persist_suspect(&entity);
            } else {
                s.check_every = (s.check_every * 2).max(Duration::from_millis(1));
                s.next_check = Some((now + s.check_every).min(until));
            }
        }
        Ok(())
    }

    /// What to re-send for a suspect entity given Flux's state: the delete to re-send (if a late
    /// write resurrected properties after our delivered delete) and the properties to re-send.
    fn plan_repair(
        &self,
        entity: &str,
        sus: &Suspect,
        state: Option<&crate::flux_client::EntityState>,
    ) -> (Option<Expected>, Vec<(String, Expected)>) {
        let held = state.map(|s| &s.properties);
        let ours = |name: &str, v: &Value| {
            sus.unknown_any
                || sus
                    .unknown_hashes
                    .get(name)
                    .is_some_and(|h| h.contains(&value_hash(v)))
        };
        if let (Some(d), Some(props)) = (&sus.deleted, held) {
            let resurrected = props
                .iter()
                .any(|(name, v)| !sus.expected.contains_key(name) && ours(name, v));
            if resurrected && !self.is_pending(entity, DELETE_PROPERTY) {
                // Flux cannot remove one property: delete again, then re-send everything
                // delivered after the delete (all of it is in `expected`).
                let props = sus
                    .expected
                    .iter()
                    .filter(|(name, _)| !self.is_pending(entity, name))
                    .map(|(n, e)| (n.clone(), e.clone()))
                    .collect();
                return (Some(d.clone()), props);
            }
        }
        let mut out = Vec::new();
        for (name, exp) in &sus.expected {
            let cur = held.and_then(|p| p.get(name));
            let late = match cur {
                Some(v) if value_hash(v) == exp.hash => false,
                Some(v) => ours(name, v),
                // Wiped: only our own unknown delete can do that to a delivered property.
                None => sus.unknown_delete || sus.unknown_any,
            };
            if late && !self.is_pending(entity, name) {
                out.push((name.clone(), exp.clone()));
            }
        }
        (None, out)
    }

    /// Sends a repair as one batch (delete first, Flux applies a batch in order). Returns
    /// whether Flux acknowledged all of it; an unknown outcome is remembered like any other.
    async fn send_repair(
        &self,
        entity: &str,
        delete: Option<Expected>,
        props: Vec<(String, Expected)>,
    ) -> bool {
        let mut events = Vec::new();
        let mut keys: Vec<Vec<(String, u64)>> = Vec::new();
        let make = |props: Map<String, Value>, newest: &Expected, oldest_seq: u64| FluxEvent {
            stream: newest
                .stream
                .clone()
                .unwrap_or_else(|| self.opts.stream.clone()),
            source: newest
                .source
                .clone()
                .unwrap_or_else(|| self.opts.source.clone()),
            timestamp_ms: newest.version.ts_ms.max(1),
            entity_id: entity.to_string(),
            properties: props,
            event_id: Some(format!(
                "fo-{:016x}-{oldest_seq}-{}-repair",
                value_hash(&Value::String(entity.to_string())),
                newest.version.seq
            )),
        };
        if let Some(d) = &delete {
            events.push(make(merge::tombstone_properties(), d, d.version.seq));
            keys.push(vec![(DELETE_PROPERTY.to_string(), d.hash)]);
        }
        // One event per property: they may differ in stream and source, and each stays small.
        for (name, exp) in &props {
            let mut m = Map::new();
            m.insert(name.clone(), exp.value.clone());
            events.push(make(m, exp, exp.version.seq));
            keys.push(vec![(name.clone(), exp.hash)]);
        }
        tracing::warn!(
            entity,
            properties = props.len(),
            delete = delete.is_some(),
            "read-back found a late write of an older value in Flux: re-sending the newest"
        );
        self.metrics.convergence_rewrites.fetch_add(
            (props.len() + usize::from(delete.is_some())) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        if let Some(limiter) = &self.limiter {
            limiter.acquire(events.len() as u32).await;
        }
        let outcome = self.client.post_batch(&events).await;
        let results = match outcome {
            BatchOutcome::PerEvent(r) => r,
            other => {
                let unknown = other.is_unknown();
                if unknown {
                    self.note_unknown(entity, &keys);
                }
                return false;
            }
        };
        let mut all = true;
        for (r, k) in results.iter().zip(&keys) {
            match r {
                EventOutcome::Applied { .. } => {}
                EventOutcome::Unknown { .. } => {
                    all = false;
                    self.note_unknown(entity, std::slice::from_ref(k));
                }
                _ => all = false,
            }
        }
        all
    }

    /// A repair write had an unknown outcome: it too may be applied late (harmless, it carries
    /// the newest value, but remember its hash so the comparison stays exact) and re-arms the
    /// entity's window.
    fn note_unknown(&self, entity: &str, keys: &[Vec<(String, u64)>]) {
        {
            let mut suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
            let sus = suspects.entry(entity.to_string()).or_default();
            self.arm(sus, Instant::now());
            for (name, hash) in keys.iter().flatten() {
                if name == DELETE_PROPERTY {
                    sus.unknown_delete = true;
                } else {
                    sus.unknown_hashes
                        .entry(name.clone())
                        .or_default()
                        .insert(*hash);
                }
            }
        }
        self.persist_suspect(entity);
    }
}

const SUSPECT_TAG: &str = "unknown outcome: ";

/// Whether enough is pending for a full batch without waiting for the interval: a full batch of
/// events (one event per pending entity) or, by size, `ingested_since` bytes acknowledged by
/// ingest since the last drain reaching `batch_bytes_max`.
pub fn flush_due_by_size(
    stats: &crate::store::Stats,
    ingested_since: u64,
    opts: &FlushOptions,
) -> bool {
    stats.pending_entities >= opts.batch_events_max.max(1) as u64
        || ingested_since >= opts.batch_bytes_max.max(1) as u64
}

/// The flush loop's pause between failed drains: owns the back-off state and does the sleeping
/// on tokio's clock (so the schedule is tested under paused time). Exponential from
/// `backoff_initial`, doubling per failed drain, capped at `backoff_max`, full jitter (uniform
/// in `[0, base]`); a 429's Retry-After is waited exactly (bounded, see [`backoff_delay`]); a
/// refused token waits the cap. A shutdown ends the pause early.
pub struct RetryPacer {
    backoff: Backoff,
    opts: FlushOptions,
}

impl RetryPacer {
    pub fn new(opts: &FlushOptions) -> Self {
        let mut backoff = Backoff::new(opts.backoff_initial, opts.backoff_max, 2.0, Jitter::Full);
        if let Some(seed) = opts.backoff_seed {
            backoff = backoff.with_seed(seed);
        }
        RetryPacer {
            backoff,
            opts: opts.clone(),
        }
    }

    /// A drain made progress: the next failure starts again from `backoff_initial`.
    pub fn reset(&mut self) {
        self.backoff.reset();
    }

    /// Failed drains since the last reset.
    pub fn attempt(&self) -> u32 {
        self.backoff.attempt()
    }

    /// Sleeps the pause that follows a drain ending with `verdict` (not `Ok`); returns the delay
    /// chosen. Returns early when `shutdown` changes.
    pub async fn pause(
        &mut self,
        verdict: LinkVerdict,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Duration {
        let delay = backoff_delay(verdict, &mut self.backoff, &self.opts);
        tracing::warn!(
            delay_ms = delay.as_millis() as u64,
            ?verdict,
            "flush backing off"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => {}
        }
        delay
    }
}

/// The pause after a drain that ended with `verdict` (not `Ok`): a refused token waits the slow
/// cap; a 429's Retry-After is honoured (bounded by the larger of the cap and 60 s, Flux's
/// fixed value); everything else follows the exponential back-off with jitter.
pub fn backoff_delay(verdict: LinkVerdict, backoff: &mut Backoff, opts: &FlushOptions) -> Duration {
    match verdict {
        LinkVerdict::Auth => opts.backoff_max,
        LinkVerdict::RateLimited(Some(d)) => d.min(opts.backoff_max.max(Duration::from_secs(60))),
        _ => backoff.next_delay(),
    }
}

/// `fo-<entity hash>-<oldest seq>-<newest seq>` of the outbox versions the event carries:
/// traceable to the outbox (the same versions resent keep the same id; Flux does not dedupe).
fn event_id(entity: &str, carried: &[&ClaimedProp]) -> String {
    let newest = carried.iter().map(|p| p.version.seq).max().unwrap_or(0);
    let oldest = carried.iter().map(|p| p.version.seq).min().unwrap_or(0);
    format!(
        "fo-{:016x}-{oldest}-{newest}",
        value_hash(&Value::String(entity.to_string()))
    )
}

/// What the planner is told this worker last delivered for a key. A delivered entity delete
/// newer than the key's own record (the store clears older property records when it settles
/// the delete) was the last delivery, of "absent", hashed as `null` like the planner hashes an
/// absent property: without it, a read still showing the property from before the delete (a
/// stale read) would look like a no-op for a key that Flux no longer holds.
fn last_delivery(
    p: &ClaimedProp,
    deleted: Option<&crate::record::DeliveredRecord>,
) -> Option<Delivered> {
    let own = p
        .delivered
        .map(|d| (d.version(), d.value_hash, d.delivered_at_ms));
    let del = deleted.map(|d| (d.version(), value_hash(&Value::Null), d.delivered_at_ms));
    let newest = match (own, del) {
        (Some(o), Some(d)) if d.0 > o.0 => Some(d),
        (Some(o), _) => Some(o),
        (None, d) => d,
    };
    newest.map(|(_, value_hash, delivered_at_ms)| Delivered {
        value_hash,
        delivered_at_ms,
    })
}

fn sent_props<'a>(
    ev: &'a ClaimedEvent,
    props: &'a Map<String, Value>,
) -> impl Iterator<Item = (&'a crate::store::ClaimedProp, &'a Value)> {
    ev.props
        .iter()
        .filter_map(move |p| props.get(&p.name).map(|v| (p, v)))
}

fn deliver_event(ev: &ClaimedEvent, props: &Map<String, Value>, out: &mut Vec<Settlement>) {
    for (p, sent) in sent_props(ev, props) {
        out.push(Settlement {
            key: PropKey::new(ev.entity.clone(), p.name.clone()),
            sent: p.pending.clone(),
            outcome: Outcome::Delivered {
                value_hash: value_hash(sent),
            },
        });
    }
}

fn quarantine_event(
    ev: &ClaimedEvent,
    props: &Map<String, Value>,
    reason: &str,
    status: Option<u16>,
    out: &mut Vec<Settlement>,
) {
    for (p, _) in sent_props(ev, props) {
        out.push(Settlement {
            key: PropKey::new(ev.entity.clone(), p.name.clone()),
            sent: p.pending.clone(),
            outcome: Outcome::Quarantine {
                reason: reason.to_string(),
                http_status: status,
            },
        });
    }
}

fn retry_event(
    ev: &ClaimedEvent,
    props: &Map<String, Value>,
    error: &str,
    out: &mut Vec<Settlement>,
) {
    for (p, _) in sent_props(ev, props) {
        out.push(Settlement {
            key: PropKey::new(ev.entity.clone(), p.name.clone()),
            sent: p.pending.clone(),
            outcome: Outcome::Retry {
                error: error.to_string(),
            },
        });
    }
}

fn retry_event_suspect(
    ev: &ClaimedEvent,
    props: &Map<String, Value>,
    error: &str,
    out: &mut Vec<Settlement>,
) {
    retry_event(ev, props, &format!("{SUSPECT_TAG}{error}"), out);
}

fn retry_all(events: &[ClaimedEvent], error: &str, out: &mut Vec<Settlement>) {
    for ev in events {
        for p in &ev.props {
            out.push(Settlement {
                key: PropKey::new(ev.entity.clone(), p.name.clone()),
                sent: p.pending.clone(),
                outcome: Outcome::Retry {
                    error: error.to_string(),
                },
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(seed: u64) -> FlushOptions {
        FlushOptions {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(1600),
            backoff_seed: Some(seed),
            ..FlushOptions::default()
        }
    }

    fn base(attempt: u32) -> Duration {
        (Duration::from_millis(100) * 2u32.pow(attempt.min(16))).min(Duration::from_millis(1600))
    }

    /// The loop's pause sleeps exactly the delay it chose, on tokio's clock.
    async fn timed_pause(
        p: &mut RetryPacer,
        v: LinkVerdict,
        rx: &mut watch::Receiver<bool>,
    ) -> Duration {
        let t0 = Instant::now();
        let d = p.pause(v, rx).await;
        // tokio's timer wheel rounds a deadline up to the next millisecond.
        let slept = t0.elapsed();
        assert!(
            slept >= d && slept <= d + Duration::from_millis(1),
            "slept {slept:?} for a delay of {d:?}"
        );
        d
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_is_exponential_with_full_jitter_up_to_the_cap_under_paused_time() {
        let (_tx, mut rx) = watch::channel(false);
        // Many seeded workers: per attempt, every delay is within [0, base] and the largest one
        // comes close to the base, so the base really doubles up to the cap.
        const WORKERS: u64 = 40;
        const ATTEMPTS: u32 = 8;
        let mut max = vec![Duration::ZERO; ATTEMPTS as usize];
        let mut min = vec![Duration::MAX; ATTEMPTS as usize];
        for seed in 0..WORKERS {
            let mut p = RetryPacer::new(&opts(seed));
            for a in 0..ATTEMPTS {
                assert_eq!(p.attempt(), a);
                let d = timed_pause(&mut p, LinkVerdict::Unknown, &mut rx).await;
                assert!(d <= base(a), "attempt {a}: {d:?} over base {:?}", base(a));
                max[a as usize] = max[a as usize].max(d);
                min[a as usize] = min[a as usize].min(d);
            }
        }
        for a in 0..ATTEMPTS {
            let b = base(a);
            assert!(
                max[a as usize] >= b * 8 / 10,
                "attempt {a}: max {:?}",
                max[a as usize]
            );
            // Jitter: the workers do not retry in lock-step.
            assert!(
                min[a as usize] <= b * 3 / 10,
                "attempt {a}: min {:?}",
                min[a as usize]
            );
        }
        assert_eq!(
            base(4),
            Duration::from_millis(1600),
            "capped from attempt 4 on"
        );
        // Same seed, same schedule (tests can predict it).
        let mut a = RetryPacer::new(&opts(5));
        let mut b = RetryPacer::new(&opts(5));
        for _ in 0..6 {
            assert_eq!(
                timed_pause(&mut a, LinkVerdict::Unknown, &mut rx).await,
                timed_pause(&mut b, LinkVerdict::Unknown, &mut rx).await
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn progress_resets_the_backoff_under_paused_time() {
        let (_tx, mut rx) = watch::channel(false);
        let mut p = RetryPacer::new(&opts(1));
        for _ in 0..6 {
            timed_pause(&mut p, LinkVerdict::Unknown, &mut rx).await;
        }
        p.reset();
        assert_eq!(p.attempt(), 0);
        let d = timed_pause(&mut p, LinkVerdict::Unknown, &mut rx).await;
        assert!(d <= Duration::from_millis(100), "{d:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_and_auth_pauses_under_paused_time() {
        let (_tx, mut rx) = watch::channel(false);
        let mut p = RetryPacer::new(&opts(2));
        // 429 with Retry-After: exactly that long, even far above the exponential schedule.
        let d = timed_pause(
            &mut p,
            LinkVerdict::RateLimited(Some(Duration::from_secs(7))),
            &mut rx,
        )
        .await;
        assert_eq!(d, Duration::from_secs(7));
        // Bounded by the larger of the cap and Flux's fixed 60 s.
        let d = timed_pause(
            &mut p,
            LinkVerdict::RateLimited(Some(Duration::from_secs(3600))),
            &mut rx,
        )
        .await;
        assert_eq!(d, Duration::from_secs(60));
        // Per-event rate limit (no Retry-After): the exponential back-off.
        let mut p = RetryPacer::new(&opts(2));
        let d = timed_pause(&mut p, LinkVerdict::RateLimited(None), &mut rx).await;
        assert!(d <= Duration::from_millis(100), "{d:?}");
        // A refused token: the slow cap, every time.
        for _ in 0..3 {
            let d = timed_pause(&mut p, LinkVerdict::Auth, &mut rx).await;
            assert_eq!(d, Duration::from_millis(1600));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_a_pause_early() {
        let (tx, mut rx) = watch::channel(false);
        let mut p = RetryPacer::new(&opts(3));
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let _ = tx.send(true);
            // Keep the sender alive until the pause saw the change.
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        let t0 = Instant::now();
        let d = p.pause(LinkVerdict::Auth, &mut rx).await;
        assert_eq!(d, Duration::from_millis(1600));
        assert_eq!(t0.elapsed(), Duration::from_millis(10));
    }

    #[test]
    fn size_triggers_count_events_and_bytes() {
        let o = FlushOptions {
            batch_events_max: 3,
            batch_bytes_max: 1000,
            ..FlushOptions::default()
        };
        let st = |keys, entities| crate::store::Stats {
            pending_keys: keys,
            pending_entities: entities,
            ..Default::default()
        };
        // Many keys of one entity are one event: not a full batch by count.
        assert!(!flush_due_by_size(&st(50, 1), 0, &o));
        assert!(flush_due_by_size(&st(3, 3), 0, &o));
        assert!(!flush_due_by_size(&st(1, 1), 999, &o));
        assert!(flush_due_by_size(&st(1, 1), 1000, &o));
    }
}
