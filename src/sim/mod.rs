//! flux-sim: an in-process, Flux-compatible HTTP server for tests, the demo and benchmarks.
//!
//! # What it simulates
//!
//! Flux's producer-facing API as the worker meets it (see the Flux wire protocol notes shared
//! with this project): `POST /api/events`, `POST /api/events/batch`,
//! `GET /api/state/entities/{id}`, `GET /api/state/entities?prefix=P&namespace=N`,
//! `DELETE /api/state/entities/{id}` and `POST /api/namespaces`, with Flux's status codes,
//! content types and error texts (serde's messages for malformed JSON, per-event
//! `validation failed: ...`, `authorization failed: ...`, `rate limit exceeded` and
//! `publish failed: ...` inside a 200 batch, 413 limits, 401/403 in public mode, the
//! per-namespace token bucket with `Retry-After: 60`). State is folded like Flux's state engine:
//! per-property upsert in arrival order (event timestamps ignored), values replaced whole,
//! `null` stored, `__deleted__: true` deletes the entity, a payload without a string
//! `entity_id` or without an object `properties` is accepted and changes nothing. No
//! deduplication: the same eventId twice is applied twice.
//!
//! Faults ([`Faults`]) are drawn from one RNG seeded by [`SimConfig::seed`], so a run with the
//! same seed and the same request sequence fails the same way. Request-level faults apply to
//! the two write endpoints only, in this order: `latency_ms`, `reset_rate`, `hang_rate`,
//! `rate_429_rate`, `error_500_rate`, `lost_answer_rate`; `link_down` cuts every `/api/*`
//! request. Per-event faults (`validation_fail_rate`, `publish_fail_rate`) are drawn per event.
//! `stale_read_rate` is drawn per entity read.
//!
//! # Control API (same listener)
//!
//! | request | effect |
//! |---|---|
//! | `GET /_sim/faults` | current [`Faults`] as JSON |
//! | `PUT /_sim/faults` | replace them; missing fields mean 0/false; 400 if a rate is outside 0..=1 |
//! | `GET /_sim/state` | every entity: `{id: {"id","properties","lastUpdated"}}` |
//! | `GET /_sim/log?since=N&limit=M` | `{"applied": total, "events": [AppliedEvent...]}` from index N, at most M (≤ 100,000) |
//! | `GET /_sim/stats` | [`SimStats`]: counters of requests and events by outcome |
//! | `POST /_sim/namespaces` `{"name": "acme"}` | registers (or looks up) a namespace, no admin token: `{"name","token"}` |
//!
//! # Bounds
//!
//! Request bodies are capped by [`SimConfig::request_body_max`] (2 MiB, as Flux). The applied
//! log keeps the last [`SimConfig::log_capacity`] events (older ones are dropped, their indices
//! stay); entity state itself is unbounded, like Flux's. A hung request is cut after 10 minutes
//! or at shutdown.
//!
//! # Known differences from real Flux
//!
//! - Application is synchronous: a read right after a 200 always sees the write (Flux is stale
//!   a few times in a hundred for a few milliseconds). `stale_read_rate` simulates the stale
//!   read, harsher than Flux: the state before the entity's last event is served however long
//!   ago that event was applied.
//! - The "event log unreachable" state is `publish_fail_rate = 1.0` (optionally with
//!   `publish_fail_delay_ms = 5000` for Flux's 5 s per event); a single event answers 500, a
//!   batch 200 with per-event `publish failed: ...`, as Flux does.
//! - `error_500_rate` and `rate_429_rate` also hit batches as a whole, which Flux itself does not
//!   do (a fronting proxy could).
//! - The log message size limit is measured on the sim's compact serialization of the event
//!   with its eventId; the boundary can be off from Flux's by a few dozen bytes.
//! - Hangs and resets happen before the events are applied; use `lost_answer_rate` for
//!   "applied but the answer was lost".
//! - No WebSocket (`/api/ws`), no namespace lookup/delete, no admin config API.

mod conn;
mod server;
mod util;
mod world;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};

use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use util::rfc3339_nanos;
pub use world::{AppliedEvent, Entity, RejectedEvent, SimStats};

use conn::{ConnHandle, SimListener};
use server::{lock, Shared};

/// Faults to inject. All zero/false by default (a healthy Flux). Rates are probabilities 0..=1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Whole request answers `500 {"error":"Failed to await publish ack"}`; nothing applied now.
    pub error_500_rate: f64,
    /// Whole request answers `429 {"error":"rate limit exceeded"}` with `Retry-After: 60`.
    pub rate_429_rate: f64,
    /// Retry-After (seconds) of the injected 429; 0 means Flux's fixed 60.
    pub rate_429_retry_after_s: u64,
    /// Per event: `publish failed: Failed to await publish ack` in a batch, 500 for a single event.
    pub publish_fail_rate: f64,
    /// Per event: `validation failed: ...` in a batch (eventId null), 400 for a single event.
    pub validation_fail_rate: f64,
    /// Added before every write request is processed.
    pub latency_ms: u64,
    /// Added after each publish failure, one after another (Flux spends about 5,000 ms).
    pub publish_fail_delay_ms: u64,
    /// Request never answered: the sim holds it until the client gives up (or shutdown).
    pub hang_rate: f64,
    /// Connection dropped (RST) without an answer; nothing applied.
    pub reset_rate: f64,
    /// Events applied, then the connection dropped: "applied but the answer was lost".
    pub lost_answer_rate: f64,
    /// An event answered with a failure (500 or `publish failed`) is still applied later.
    pub late_apply_rate: f64,
    /// Delay before such a late application.
    pub late_apply_delay_ms: u64,
    /// Every `/api/*` request is cut immediately; `/_sim/*` keeps working.
    pub link_down: bool,
    /// An entity read (`GET /api/state/entities/{id}`) shows the entity as it was before its
    /// last applied event (404 if that event created it): Flux applies asynchronously, so a read
    /// right after a 200 is sometimes stale. Only events applied while the rate is above 0 are
    /// remembered (the sim keeps one earlier state per entity only then).
    pub stale_read_rate: f64,
}

impl Faults {
    /// Checks that every rate is a probability.
    pub fn check(&self) -> Result<(), String> {
        let rates = [
            ("error_500_rate", self.error_500_rate),
            ("rate_429_rate", self.rate_429_rate),
            ("publish_fail_rate", self.publish_fail_rate),
            ("validation_fail_rate", self.validation_fail_rate),
            ("hang_rate", self.hang_rate),
            ("reset_rate", self.reset_rate),
            ("lost_answer_rate", self.lost_answer_rate),
            ("late_apply_rate", self.late_apply_rate),
            ("stale_read_rate", self.stale_read_rate),
        ];
        for (name, v) in rates {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name} must be within 0..=1, got {v}"));
            }
        }
        Ok(())
    }
}

/// How the sim behaves. `Default` is Flux's internal mode with Flux's limits.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Public mode: namespaces, bearer tokens and rate limits. Off = internal mode, no auth.
    pub public: bool,
    /// Token required to register namespaces over HTTP (public mode). `None`: anyone may.
    pub admin_token: Option<String>,
    /// Token bucket size per namespace (Flux: 10,000).
    pub rate_limit_bucket: u64,
    /// Refill per minute, continuous (Flux: 10,000).
    pub rate_limit_refill_per_min: u64,
    /// Whole request body; past it axum's `413 text/plain` (Flux: 2 MiB).
    pub request_body_max: usize,
    /// `POST /api/events` body; past it `413 {"error":"payload too large"}` (Flux: 1 MiB).
    pub single_body_max: usize,
    /// `POST /api/events/batch` body; past it a JSON 413 (Flux: 10 MiB, so the 2 MiB limit wins).
    pub batch_body_max: usize,
    /// Largest event the simulated log accepts, serialized with its eventId (NATS: 1 MiB).
    pub event_max_bytes: usize,
    /// Applied events kept for [`SimHandle::applied_log`] (default 250,000, a few hundred bytes
    /// each); older ones are dropped. 0 keeps none: use it for long benchmarks.
    pub log_capacity: usize,
    /// Seed for fault draws and generated ids.
    pub seed: u64,
    /// Faults active from the start.
    pub faults: Faults,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            public: false,
            admin_token: None,
            rate_limit_bucket: 10_000,
            rate_limit_refill_per_min: 10_000,
            request_body_max: 2 * 1024 * 1024,
            single_body_max: 1024 * 1024,
            batch_body_max: 10 * 1024 * 1024,
            event_max_bytes: 1024 * 1024,
            log_capacity: 250_000,
            seed: 0,
            faults: Faults::default(),
        }
    }
}

struct Owner {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        // Stops accepting, closes idle connections and releases hung requests.
        self.shared.shutdown.send_replace(true);
    }
}

/// A running flux-sim. Cloning is cheap; the server stops when the last clone is dropped or on
/// [`SimHandle::shutdown`].
#[derive(Clone)]
pub struct SimHandle {
    owner: Arc<Owner>,
}

/// Starts flux-sim on `listener` inside the current tokio runtime.
pub async fn start(cfg: SimConfig, listener: TcpListener) -> std::io::Result<SimHandle> {
    cfg.faults
        .check()
        .map_err(|m| std::io::Error::new(std::io::ErrorKind::InvalidInput, m))?;
    let addr = listener.local_addr()?;
    let (shutdown, mut shutdown_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        faults: RwLock::new(cfg.faults),
        rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(cfg.seed)),
        ids: util::IdGen::new(cfg.seed),
        world: Mutex::new(world::World::new(
            cfg.log_capacity,
            cfg.faults.stale_read_rate > 0.0,
        )),
        auth: Mutex::new(world::Auth::new()),
        stats: Default::default(),
        shutdown,
        cfg,
    });
    let app = server::router(shared.clone()).into_make_service_with_connect_info::<ConnHandle>();
    let task = tokio::spawn(async move {
        let serve =
            axum::serve(SimListener::new(listener), app).with_graceful_shutdown(async move {
                let _ = shutdown_rx.wait_for(|down| *down).await;
            });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "flux-sim server stopped");
        }
    });
    Ok(SimHandle {
        owner: Arc::new(Owner {
            shared,
            addr,
            task: Mutex::new(Some(task)),
        }),
    })
}

impl SimHandle {
    fn shared(&self) -> &Shared {
        &self.owner.shared
    }

    pub fn addr(&self) -> SocketAddr {
        self.owner.addr
    }

    /// `http://IP:PORT`, the base URL to give a client.
    pub fn url(&self) -> String {
        format!("http://{}", self.owner.addr)
    }

    pub fn faults(&self) -> Faults {
        self.shared().faults()
    }

    /// Replaces the active faults. Rates outside 0..=1 are clamped.
    pub fn set_faults(&self, mut f: Faults) {
        for r in [
            &mut f.error_500_rate,
            &mut f.rate_429_rate,
            &mut f.publish_fail_rate,
            &mut f.validation_fail_rate,
            &mut f.hang_rate,
            &mut f.reset_rate,
            &mut f.lost_answer_rate,
            &mut f.late_apply_rate,
            &mut f.stale_read_rate,
        ] {
            *r = if r.is_nan() { 0.0 } else { r.clamp(0.0, 1.0) };
        }
        self.shared().set_faults(f);
    }

    pub fn entity(&self, id: &str) -> Option<Entity> {
        lock(&self.shared().world).entities.get(id).cloned()
    }

    /// Full state: entity id -> properties.
    pub fn entities(&self) -> BTreeMap<String, serde_json::Map<String, serde_json::Value>> {
        let w = lock(&self.shared().world);
        w.entities
            .iter()
            .map(|(id, e)| (id.clone(), e.properties.clone()))
            .collect()
    }

    /// The retained applied events, in application order.
    pub fn applied_log(&self) -> Vec<AppliedEvent> {
        lock(&self.shared().world).log.iter().cloned().collect()
    }

    /// The retained events refused for validation (per event), in arrival order: an oracle of
    /// what a worker must quarantine.
    pub fn rejected_log(&self) -> Vec<RejectedEvent> {
        lock(&self.shared().world)
            .rejected
            .iter()
            .cloned()
            .collect()
    }

    /// Retained applied events with `index >= since` (cheaper than the whole log when polling).
    pub fn applied_since(&self, since: u64) -> Vec<AppliedEvent> {
        lock(&self.shared().world).log_since(since, usize::MAX)
    }

    /// Number of events applied since start (including ones dropped from the retained log).
    pub fn applied_count(&self) -> u64 {
        lock(&self.shared().world).applied
    }

    /// Registers a namespace and returns its token; an existing name returns its token. Trusted
    /// path: no admin token and no name validation (an invalid name simply never authorizes).
    pub fn register_namespace(&self, name: &str) -> String {
        self.shared().register(name).1
    }

    pub fn stats(&self) -> SimStats {
        self.shared().stats.snapshot()
    }

    /// Stops accepting, lets in-flight answers finish, cuts hung requests, and waits.
    pub async fn shutdown(&self) {
        self.shared().shutdown.send_replace(true);
        let task = lock(&self.owner.task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}
