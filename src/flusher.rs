//! The flush worker: drains claimed batches from the store to Flux and settles every key by
//! what Flux answered (see `flux_client` for the answer taxonomy).
//!
//! Rules it keeps:
//! - A key is settled `Delivered` only for a per-event success (or when Flux already holds the
//!   value: a no-op, or a conflict kept remote by policy). Everything else keeps it pending.
//! - One poison event never blocks the rest: a whole-batch 400 or a 413 splits the batch until
//!   the bad event stands alone, and only it is quarantined.
//! - Token problems (401/403, `authorization failed` with no success in the same answer) never
//!   quarantine: the worker pauses at the slow backoff and reports the link as `auth_failed`.
//! - An unknown outcome (500, `publish failed`, timeouts, resets) keeps the key, backs off with
//!   jitter, and marks the key suspect: Flux may still apply that write late. After the key is
//!   delivered, the worker reads it back over the convergence window and re-sends the newest
//!   value if a late write rolled Flux back.
//! - At most `in_flight_max` batches are in flight; the store never hands one entity to two.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::flux_client::{
    Backoff, BatchOutcome, EventOutcome, FluxClient, FluxEvent, Jitter, RateLimiter,
};
use crate::merge::{self, ConflictPolicy, Delivered, MergeOptions, PropertyWrite, Remote};
use crate::metrics::{LinkState, Metrics};
use crate::model::{now_ms, value_hash, PropKey, Update, UpdateOp};
use crate::store::{Claim, ClaimLimits, ClaimedEvent, Outcome, Settlement, Store};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeMode {
    ReadMergeWrite,
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
            convergence_window: Duration::from_secs(600),
        }
    }
}

/// A key whose write had an unknown outcome: Flux may apply that older write later.
#[derive(Clone, Debug)]
struct Suspect {
    /// The newest value delivered for the key since (what Flux must end up holding).
    delivered: Option<(Value, u64, u64)>, // (value, ts_ms, seq)
    until: Instant,
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
    suspects: std::sync::Mutex<HashMap<PropKey, Suspect>>,
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
        Arc::new(Flusher {
            store,
            client,
            opts,
            metrics,
            merge_opts,
            limiter,
            suspects: Default::default(),
        })
    }

    /// Runs until `shutdown` turns true, then makes one last bounded pass (the caller bounds it
    /// with a timeout) and returns.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(
            self.opts.backoff_initial,
            self.opts.backoff_max,
            2.0,
            Jitter::Full,
        );
        let mut last_flush = Instant::now();
        let poll = Duration::from_millis(50).min(self.opts.interval);
        loop {
            crate::watchdog::flush_loop_beat();
            if *shutdown.borrow() {
                return;
            }
            let stats = self.store.stats();
            let due = last_flush.elapsed() >= self.opts.interval
                || stats.pending_keys >= self.opts.batch_events_max as u64;
            if due && stats.pending_keys > 0 {
                last_flush = Instant::now();
                match self.drain_once().await {
                    LinkVerdict::Ok => backoff.reset(),
                    verdict => {
                        let delay = match verdict {
                            LinkVerdict::Auth => self.opts.backoff_max,
                            LinkVerdict::RateLimited(Some(d)) => {
                                d.min(self.opts.backoff_max.max(Duration::from_secs(60)))
                            }
                            _ => backoff.next_delay(),
                        };
                        tracing::warn!(
                            delay_ms = delay.as_millis() as u64,
                            ?verdict,
                            "flush backing off"
                        );
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = shutdown.changed() => {}
                        }
                        continue;
                    }
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
                let claim = match self.store.claim(limits) {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "claim failed");
                        verdict = LinkVerdict::Unknown;
                        break;
                    }
                };
                let me = self.clone();
                tasks.spawn(async move { me.send_claim(claim).await });
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

    /// Sends one claim and settles every key in it. Never returns with keys unsettled.
    async fn send_claim(self: Arc<Self>, claim: Claim) -> LinkVerdict {
        let started = Instant::now();
        let mut settlements = Vec::new();
        let verdict = self.process(&claim.events, &mut settlements).await;
        self.metrics.observe_flush(started.elapsed().as_secs_f64());
        let delivered_any = settlements
            .iter()
            .any(|s| matches!(s.outcome, Outcome::Delivered { .. }));
        self.track_suspects(&settlements);
        // Every claimed key gets a settlement; anything the code above missed is retried.
        let settled: std::collections::HashSet<PropKey> =
            settlements.iter().map(|s| s.key.clone()).collect();
        for ev in &claim.events {
            for p in &ev.props {
                let key = PropKey::new(ev.entity.clone(), p.name.clone());
                if !settled.contains(&key) {
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
        if let Err(e) = self.store.settle(settlements) {
            tracing::error!(error = %e, "settle failed; the batch will be resent");
            self.store.release(&claim);
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
    async fn process(&self, events: &[ClaimedEvent], out: &mut Vec<Settlement>) -> LinkVerdict {
        // 1. Read Flux's current state of every entity (bounded concurrency).
        let remote: HashMap<String, Option<crate::flux_client::EntityState>> =
            if self.opts.merge == MergeMode::ReadMergeWrite {
                let ids: Vec<String> = events
                    .iter()
                    .filter(|e| !e.delete)
                    .map(|e| e.entity.clone())
                    .collect();
                let reads = stream::iter(ids.into_iter().map(|id| async move {
                    let r = self.client.get_entity(&id).await;
                    (id, r)
                }))
                .buffer_unordered(self.opts.read_concurrency.max(1))
                .collect::<Vec<_>>()
                .await;
                let mut map = HashMap::new();
                for (id, r) in reads {
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
            let writes: Vec<PropertyWrite<'_>> = ev
                .props
                .iter()
                .map(|p| PropertyWrite {
                    name: &p.name,
                    value: &p.value,
                    delivered: p.delivered.map(|d| Delivered {
                        value_hash: d.value_hash,
                        delivered_at_ms: d.delivered_at_ms,
                    }),
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
                            out.push(Settlement {
                                key,
                                sent: p.pending.clone(),
                                outcome: Outcome::Delivered {
                                    value_hash: value_hash(&p.value),
                                },
                            });
                        }
                        merge::Decision::Conflict { resolution } => {
                            self.metrics
                                .conflicts
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tracing::warn!(entity = %ev.entity, property = %name, ?resolution, "conflict: Flux changed this key after our last delivery");
                            if matches!(resolution, merge::Resolution::KeepRemote) {
                                let remote_hash = state
                                    .and_then(|s| s.as_ref())
                                    .and_then(|s| s.properties.get(name))
                                    .map(value_hash)
                                    .unwrap_or(0);
                                out.push(Settlement {
                                    key,
                                    sent: p.pending.clone(),
                                    outcome: Outcome::Delivered {
                                        value_hash: remote_hash,
                                    },
                                });
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
            let event = FluxEvent {
                stream: ev
                    .stream
                    .clone()
                    .unwrap_or_else(|| self.opts.stream.clone()),
                source: ev
                    .source
                    .clone()
                    .unwrap_or_else(|| self.opts.source.clone()),
                timestamp_ms: ev.ts_ms().max(1),
                entity_id: ev.entity.clone(),
                properties: props.clone(),
                event_id: Some(event_id(ev)),
            };
            planned.push((event, ev, props));
        }
        if planned.is_empty() {
            return LinkVerdict::Ok;
        }
        self.send_planned(&planned, out).await
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

    fn track_suspects(&self, settlements: &[Settlement]) {
        let mut suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
        let until = Instant::now() + self.opts.convergence_window;
        for s in settlements {
            match &s.outcome {
                Outcome::Retry { error } if error.starts_with(SUSPECT_TAG) => {
                    suspects
                        .entry(s.key.clone())
                        .or_insert(Suspect {
                            delivered: None,
                            until,
                        })
                        .until = until;
                }
                Outcome::Delivered { .. } => {
                    if let Some(sus) = suspects.get_mut(&s.key) {
                        let value = serde_json::from_slice(&s.sent.value).unwrap_or(Value::Null);
                        sus.delivered = Some((value, s.sent.ts_ms, s.sent.seq));
                    }
                }
                _ => {}
            }
        }
        // Bounded: a suspect set larger than this is trimmed of the oldest windows.
        const SUSPECTS_MAX: usize = 100_000;
        if suspects.len() > SUSPECTS_MAX {
            let now = Instant::now();
            suspects.retain(|_, s| s.until > now);
        }
    }

    /// Reads back delivered suspect keys; a key whose Flux value is not what was delivered last
    /// (a late write landed after ours) is re-ingested with its delivered value, unless a newer
    /// value is already pending.
    async fn converge(&self) -> Result<(), String> {
        let due: Vec<(PropKey, Suspect)> = {
            let mut suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            suspects.retain(|_, s| s.until > now);
            suspects
                .iter()
                .filter(|(_, s)| s.delivered.is_some())
                .take(256)
                .map(|(k, s)| (k.clone(), s.clone()))
                .collect()
        };
        if due.is_empty() {
            return Ok(());
        }
        let mut by_entity: HashMap<String, Vec<(PropKey, Suspect)>> = HashMap::new();
        for (k, s) in due {
            by_entity.entry(k.entity.clone()).or_default().push((k, s));
        }
        let mut rewrites = Vec::new();
        for (entity, keys) in by_entity {
            self.metrics
                .reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let state = self.client.get_entity(&entity).await.map_err(|e| {
                self.metrics
                    .read_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                e.to_string()
            })?;
            for (key, sus) in keys {
                let Some((value, ts_ms, _seq)) = sus.delivered else {
                    continue;
                };
                let ok = if key.is_delete() {
                    state.is_none()
                } else {
                    state.as_ref().and_then(|s| s.properties.get(&key.property)) == Some(&value)
                };
                if ok {
                    continue;
                }
                let pending_newer = self
                    .store
                    .pending_rows(Some(&key.entity), None, usize::MAX)
                    .map_err(|e| e.to_string())?
                    .iter()
                    .any(|r| r.entity == key.entity && r.property == key.property);
                if pending_newer {
                    continue;
                }
                tracing::warn!(entity = %key.entity, property = %key.property, "read-back found an older value in Flux (late write): re-sending the newest");
                self.metrics
                    .convergence_rewrites
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let op = if key.is_delete() {
                    UpdateOp::Delete
                } else {
                    UpdateOp::Set(std::iter::once((key.property.clone(), value)).collect())
                };
                rewrites.push(Update {
                    entity: key.entity.clone(),
                    op,
                    ts_ms,
                    stream: None,
                    source: None,
                });
            }
        }
        if !rewrites.is_empty() {
            self.store
                .ingest(rewrites)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

const SUSPECT_TAG: &str = "unknown outcome: ";

/// `fo-<entity hash>-<seq of the newest version it carries>`: traceable to outbox versions.
fn event_id(ev: &ClaimedEvent) -> String {
    let newest = ev.props.iter().map(|p| p.version.seq).max().unwrap_or(0);
    let oldest = ev.props.iter().map(|p| p.version.seq).min().unwrap_or(0);
    format!(
        "fo-{:016x}-{oldest}-{newest}",
        value_hash(&Value::String(ev.entity.clone()))
    )
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
