//! The physical limits the worker is measured against, in the same run: raw sled group commit
//! on the same disk, and flux-sim's own capacity for pre-built batches.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use flux_outbox::flux_client::FluxEvent;
use flux_outbox::record::{self, LogRecord};
use flux_outbox::sim::SimHandle;
use serde_json::{Map, Value};

use crate::harness::{key_names, now_ms, start_sim, Res, TAGS};

/// What the worker stores for one ingested single-property update: the write-ahead log record,
/// encoded exactly as `Store::ingest` encodes it (envelope + bincode).
pub fn log_record_bytes(key: u64, value: &Value, ts_ms: u64) -> Vec<u8> {
    let (entity, prop) = key_names(key);
    let rec = LogRecord {
        entity,
        delete: false,
        props: vec![(prop, serde_json::to_vec(value).unwrap_or_default())],
        ts_ms,
        stream: None,
        source: None,
        arrived_ms: now_ms(),
    };
    record::encode(&rec)
}

/// Raw sled group commit: `apply_batch` of `batch` log records (keys `L` + seq, as the worker's)
/// plus the `next_seq` meta record, `flush()`, fdatasync of the `db` file; repeated until
/// `updates_max` records or `time_max`. The sled options are the worker's defaults
/// (`store::sled_config`: 4 MiB cache, its flush timer and mode). Returns (records written,
/// elapsed).
pub fn raw_sled(
    dir: &Path,
    values: &[Vec<u8>],
    batch: usize,
    updates_max: u64,
    time_max: Duration,
) -> Res<(u64, Duration)> {
    if values.is_empty() {
        return Err("raw limit: no records".into());
    }
    let path = dir.join("store");
    // The worker's own sled options (cache size, flush timer, mode), default configuration.
    let db = flux_outbox::store::sled_config(&path, &flux_outbox::store::StoreOptions::default())
        .open()
        .map_err(|e| format!("raw limit: cannot open sled in {}: {e}", path.display()))?;
    db.flush()
        .map_err(|e| format!("raw limit: first flush: {e}"))?;
    let db_file = File::open(path.join("db"))
        .map_err(|e| format!("raw limit: cannot open the sled db file: {e}"))?;
    let mut seq: u64 = 1;
    let start = Instant::now();
    let mut written = 0u64;
    while written < updates_max && start.elapsed() < time_max {
        let mut b = sled::Batch::default();
        for _ in 0..batch {
            let mut k = Vec::with_capacity(9);
            k.push(b'L');
            k.extend_from_slice(&seq.to_be_bytes());
            b.insert(k, values[(seq as usize) % values.len()].clone());
            seq += 1;
        }
        b.insert(b"Mnext_seq".to_vec(), seq.to_be_bytes().to_vec());
        db.apply_batch(b)
            .map_err(|e| format!("raw limit: apply_batch: {e}"))?;
        db.flush().map_err(|e| format!("raw limit: flush: {e}"))?;
        db_file
            .sync_data()
            .map_err(|e| format!("raw limit: fdatasync: {e}"))?;
        written += batch as u64;
    }
    Ok((written, start.elapsed()))
}

/// The worker's event for entity number `e` carrying all of its `TAGS.len()` properties, shaped
/// as the flusher builds it (stream, source `outbox-<gateway_id>`, eventId `fo-...`).
pub fn flux_event(e: u64, ts_ms: u64) -> FluxEvent {
    let mut props = Map::new();
    let mut entity = String::new();
    for t in 0..TAGS.len() as u64 {
        let k = e * TAGS.len() as u64 + t;
        let (ent, prop) = key_names(k);
        entity = ent;
        props.insert(prop, crate::harness::value_of(k));
    }
    FluxEvent {
        stream: "scada".into(),
        source: "outbox-bench".into(),
        timestamp_ms: ts_ms,
        event_id: Some(format!(
            "fo-{:016x}-{}-{}",
            e.wrapping_mul(0x9e37_79b9),
            e,
            e + 4
        )),
        entity_id: entity,
        properties: props,
    }
}

/// flux-sim's own capacity for the drain's workload: batches of `batch_events` events (one
/// entity with all its properties each, `events_total` distinct entities) pre-serialized and
/// posted by `concurrency` connections at once. One pass posts every entity once to a fresh sim,
/// so every event creates its entity, as in the worker's drain into a fresh sim (re-posting the
/// same entities would measure cheaper updates of existing ones); passes repeat, each on a fresh
/// sim, until `time_min` of posting (at most `time_max`). The answers are parsed and checked.
/// Returns (events applied, time spent posting).
pub async fn sim_capacity(
    batch_events: usize,
    concurrency: usize,
    events_total: u64,
    time_min: Duration,
    time_max: Duration,
) -> Res<(u64, Duration)> {
    let mut bodies = Vec::new();
    for events in event_batches(events_total, batch_events) {
        let body = serde_json::to_vec(&serde_json::json!({ "events": events }))
            .map_err(|e| format!("cannot build a batch: {e}"))?;
        bodies.push(Bytes::from(body));
    }
    let bodies = Arc::new(bodies);
    repeat_passes(time_min, time_max, |left| {
        sim_pass(&bodies, concurrency, left)
    })
    .await
}

/// One pass of [`sim_capacity`] on a fresh flux-sim: every body once (or until `time_max`).
async fn sim_pass(
    bodies: &Arc<Vec<Bytes>>,
    concurrency: usize,
    time_max: Duration,
) -> Res<(u64, Duration)> {
    let sim = start_sim(0, false).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .build()
        .map_err(|e| format!("http client: {e}"))?;
    let url = format!("{}/api/events/batch", sim.url());
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (http, url, next, bodies) = (http.clone(), url.clone(), next.clone(), bodies.clone());
        tasks.spawn(async move {
            let mut ok = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= bodies.len() || start.elapsed() >= time_max {
                    return Ok::<u64, String>(ok);
                }
                let r = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(bodies[i].clone())
                    .send()
                    .await
                    .map_err(|e| format!("sim capacity: request failed: {e}"))?;
                let status = r.status();
                let b = r
                    .bytes()
                    .await
                    .map_err(|e| format!("sim capacity: answer failed: {e}"))?;
                if !status.is_success() {
                    return Err(format!("sim capacity: flux-sim answered {status}"));
                }
                let v: Value = serde_json::from_slice(&b)
                    .map_err(|e| format!("sim capacity: answer is not JSON: {e}"))?;
                ok += v["successful"].as_u64().unwrap_or(0);
            }
        });
    }
    finish_pass("sim capacity", sim, tasks, start).await
}

/// A worker without a store: the worker's own Flux client (`FluxClient`, configured as the
/// worker configures it) delivering pre-built events (one entity with all its properties each,
/// `entities` distinct entities) in batches of `batch_events`, `concurrency` batches at once,
/// reading every entity of a batch first with at most `read_concurrency` reads at a time (as the
/// flusher's read-merge-write does) unless `blind`; every answer is classified by the worker's
/// parser and every event must come back applied. One pass sends every entity once to a fresh
/// flux-sim, so every read finds the entity absent, as the worker's drain into a fresh sim does;
/// passes repeat (each on a fresh sim) until `time_min` of sending (at most `time_max`).
/// Returns (events applied, time spent sending).
///
/// Why: this is the drain `ratio` a worker reaches when its store costs nothing. The client
/// shares the machine's cores with flux-sim, as the worker does, and builds each request body and
/// parses each answer, as the worker must; the real worker's claim, decoding, merge planning and
/// settle can only lower it. It splits the drain's gap to flux-sim into the part a client with
/// the flusher's request pattern has and the part the worker's own work adds.
pub async fn client_capacity(
    batch_events: usize,
    concurrency: usize,
    read_concurrency: usize,
    entities: u64,
    blind: bool,
    time_min: Duration,
    time_max: Duration,
) -> Res<(u64, Duration)> {
    let batches = Arc::new(event_batches(entities, batch_events));
    repeat_passes(time_min, time_max, |left| {
        client_pass(&batches, concurrency, read_concurrency, blind, left)
    })
    .await
}

/// One pass of [`client_capacity`] on a fresh flux-sim: every batch once (or until `time_max`).
async fn client_pass(
    batches: &Arc<Vec<Vec<FluxEvent>>>,
    concurrency: usize,
    read_concurrency: usize,
    blind: bool,
    time_max: Duration,
) -> Res<(u64, Duration)> {
    use flux_outbox::flux_client::{BatchOutcome, ClientConfig, EventOutcome, FluxClient};
    use futures_util::stream::{self, StreamExt};

    let sim = start_sim(0, false).await?;
    let client = FluxClient::new(ClientConfig {
        base_url: sim.url(),
        pool_max_idle_per_host: concurrency + read_concurrency,
        ..ClientConfig::default()
    })
    .map_err(|e| format!("client capacity: cannot build the Flux client: {e}"))?;
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (client, next, batches) = (client.clone(), next.clone(), batches.clone());
        tasks.spawn(async move {
            let mut ok = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= batches.len() || start.elapsed() >= time_max {
                    return Ok::<u64, String>(ok);
                }
                let events = &batches[i];
                if !blind {
                    // Owned ids and client handles, collected first: a stream holding the
                    // mapping closure cannot be proven `Send` for every lifetime in a task.
                    let reads: Vec<_> = events
                        .iter()
                        .map(|e| {
                            let (client, id) = (client.clone(), e.entity_id.clone());
                            async move { client.get_entity(&id).await }
                        })
                        .collect();
                    let mut reads = stream::iter(reads).buffer_unordered(read_concurrency.max(1));
                    while let Some(r) = reads.next().await {
                        r.map_err(|e| format!("client capacity: read failed: {e}"))?;
                    }
                }
                match client.post_batch(events).await {
                    BatchOutcome::PerEvent(outcomes) => {
                        for o in outcomes {
                            match o {
                                EventOutcome::Applied { .. } => ok += 1,
                                other => {
                                    return Err(format!(
                                        "client capacity: an event was not applied: {other:?}"
                                    ))
                                }
                            }
                        }
                    }
                    other => {
                        return Err(format!(
                            "client capacity: flux-sim refused a batch: {other:?}"
                        ))
                    }
                }
            }
        });
    }
    finish_pass("client capacity", sim, tasks, start).await
}

/// Events for `entities` distinct entities (numbered from 0, one event each, shaped by
/// [`flux_event`]) in batches of `batch_events`.
fn event_batches(entities: u64, batch_events: usize) -> Vec<Vec<FluxEvent>> {
    let ts = now_ms();
    let per = batch_events.max(1) as u64;
    (0..entities.div_ceil(per).max(1))
        .map(|b| {
            (b * per..(b + 1) * per)
                .map(|e| flux_event(e, ts))
                .collect()
        })
        .collect()
}

/// Runs `pass` (each on a fresh sim, given the time left) until `time_min` of sending, at most
/// `time_max`. Returns (events applied, time spent sending) over all passes.
async fn repeat_passes<F, Fut>(
    time_min: Duration,
    time_max: Duration,
    mut pass: F,
) -> Res<(u64, Duration)>
where
    F: FnMut(Duration) -> Fut,
    Fut: std::future::Future<Output = Res<(u64, Duration)>>,
{
    let (mut applied, mut sending) = (0u64, Duration::ZERO);
    loop {
        let (n, t) = pass(time_max.saturating_sub(sending)).await?;
        applied += n;
        sending += t;
        if sending >= time_min || sending >= time_max {
            return Ok((applied, sending));
        }
    }
}

/// Waits for a pass's sending tasks, checks that the sim applied exactly the events they were
/// told were applied, and shuts the sim down. Returns (events applied, time since `start`).
async fn finish_pass(
    what: &str,
    sim: SimHandle,
    mut tasks: tokio::task::JoinSet<Res<u64>>,
    start: Instant,
) -> Res<(u64, Duration)> {
    let mut applied = 0;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(n)) => applied += n,
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(format!("{what} task failed: {e}")),
        }
    }
    let elapsed = start.elapsed();
    let counted = sim.stats().events_applied;
    if counted != applied {
        return Err(format!(
            "{what}: {applied} events answered as applied but the sim counted {counted}"
        ));
    }
    sim.shutdown().await;
    Ok((applied, elapsed))
}
