//! Shared rig for the flush worker tests: a store on a temp dir with its compactor, flux-sim
//! (or any Flux-like server) on 127.0.0.1:0, a client and a running `Flusher`.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use flux_outbox::compactor::{self, Compactor};
use flux_outbox::flusher::{FlushOptions, Flusher};
use flux_outbox::flux_client::{ClientConfig, FluxClient, Secret};
use flux_outbox::metrics::Metrics;
use flux_outbox::sim::{self, SimConfig, SimHandle};
use flux_outbox::store::{Durability, Store, StoreOptions};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub async fn start_sim(cfg: SimConfig) -> SimHandle {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind sim");
    sim::start(cfg, l).await.expect("start sim")
}

/// Fast settings for tests: short interval and back-off, short convergence window.
pub fn fast_opts() -> FlushOptions {
    FlushOptions {
        interval: Duration::from_millis(20),
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        convergence_window: Duration::from_secs(3),
        convergence_check_initial: Duration::from_millis(100),
        stream: "scada".into(),
        source: "outbox-test".into(),
        ..FlushOptions::default()
    }
}

pub fn client(url: &str, token: Option<&str>, timeout: Duration) -> FluxClient {
    FluxClient::new(ClientConfig {
        base_url: url.to_string(),
        auth_token: token.map(Secret::new),
        request_timeout: timeout,
        read_timeout: timeout,
        connect_timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    })
    .expect("client")
}

pub struct Rig {
    pub _dir: tempfile::TempDir,
    pub store: Store,
    pub compactor: Option<Compactor>,
    pub flusher: Arc<Flusher>,
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Rig {
    /// Store + compactor + flusher; the flusher runs only after `run()`.
    pub fn new(client: FluxClient, opts: FlushOptions) -> Rig {
        // RUST_LOG=flux_outbox=debug shows the worker's decisions when a test fails.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(
            dir.path(),
            StoreOptions {
                durability: Durability::Flush,
                ..StoreOptions::default()
            },
        )
        .expect("open store");
        let compactor = compactor::spawn(store.clone()).expect("compactor");
        let metrics = Arc::new(Metrics::new(false));
        let flusher = Flusher::new(store.clone(), client, opts, metrics.clone());
        let (stop, _) = watch::channel(false);
        Rig {
            _dir: dir,
            store,
            compactor: Some(compactor),
            flusher,
            metrics,
            stop,
            task: None,
        }
    }

    /// [`Rig::new`] with a client of `sim` (`token`, 5 s timeout).
    pub fn on_sim(sim: &SimHandle, token: Option<&str>, opts: FlushOptions) -> Rig {
        Rig::new(client(&sim.url(), token, Duration::from_secs(5)), opts)
    }

    pub fn run(&mut self) {
        let f = self.flusher.clone();
        self.task = Some(tokio::spawn(f.run(self.stop.subscribe())));
    }

    pub async fn stop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            t.await.expect("flusher task");
        }
    }

    /// Stops the flusher and starts a new one on the same store and metrics with `client` and
    /// `opts`, e.g. a client with a longer timeout for a phase that must see every answer. The
    /// flusher's convergence memory is in the store, so the new one carries it on.
    pub async fn replace_flusher(&mut self, client: FluxClient, opts: FlushOptions) {
        self.stop().await;
        let (stop, _) = watch::channel(false);
        self.stop = stop;
        self.flusher = Flusher::new(self.store.clone(), client, opts, self.metrics.clone());
        self.run();
    }

    /// Ingests and waits until the log is folded into the pending set.
    pub async fn ingest(&self, updates: Vec<flux_outbox::model::Update>) {
        self.store.ingest(updates).await.expect("ingest");
        self.wait(Duration::from_secs(10), "compaction", |r| {
            r.store.stats().log_backlog == 0
        })
        .await;
    }

    pub async fn wait(&self, limit: Duration, what: &str, mut cond: impl FnMut(&Rig) -> bool) {
        let t0 = Instant::now();
        while !cond(self) {
            if t0.elapsed() >= limit {
                let rows = self.store.pending_rows(None, None, 5).unwrap_or_default();
                panic!(
                    "timed out waiting for {what}: {:?}\nfirst pending: {rows:?}",
                    self.store.stats()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn wait_drained(&self, limit: Duration) {
        self.wait(limit, "pending to drain", |r| {
            let s = r.store.stats();
            s.pending_keys == 0 && s.log_backlog == 0 && s.in_flight_entities == 0
        })
        .await;
    }
}

pub fn set(
    entity: &str,
    ts_ms: u64,
    props: &[(&str, serde_json::Value)],
) -> flux_outbox::model::Update {
    flux_outbox::model::Update {
        entity: entity.to_string(),
        op: flux_outbox::model::UpdateOp::Set(
            props
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        ),
        ts_ms,
        stream: None,
        source: None,
    }
}

pub fn delete(entity: &str, ts_ms: u64) -> flux_outbox::model::Update {
    flux_outbox::model::Update {
        entity: entity.to_string(),
        op: flux_outbox::model::UpdateOp::Delete,
        ts_ms,
        stream: None,
        source: None,
    }
}

/// A tiny controllable Flux: `respond` decides the answer to each batch POST from its events;
/// reads answer 404 (entity absent) unless `state` holds the entity. Records every batch with
/// its arrival time and the number of batches in flight when it arrived.
#[derive(Clone)]
pub struct FakeFlux {
    pub url: String,
    pub batches: Arc<std::sync::Mutex<Vec<(Instant, Vec<serde_json::Value>)>>>,
    pub in_flight: Arc<std::sync::Mutex<Vec<String>>>,
    pub overlaps: Arc<std::sync::Mutex<Vec<String>>>,
    pub state: Arc<std::sync::Mutex<std::collections::HashMap<String, serde_json::Value>>>,
}

pub type Responder = Arc<dyn Fn(&[serde_json::Value]) -> (u16, &'static str, String) + Send + Sync>;

pub async fn fake_flux(respond: Responder, latency: Duration) -> FakeFlux {
    use axum::extract::{Path, State};
    use axum::response::IntoResponse;
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind fake");
    let fake = FakeFlux {
        url: format!("http://{}", l.local_addr().expect("addr")),
        batches: Default::default(),
        in_flight: Default::default(),
        overlaps: Default::default(),
        state: Default::default(),
    };
    let f2 = fake.clone();
    let post = move |State((fake, respond)): State<(FakeFlux, Responder)>,
                     body: axum::body::Bytes| async move {
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let events = v["events"].as_array().cloned().unwrap_or_default();
        let ids: Vec<String> = events
            .iter()
            .filter_map(|e| e["payload"]["entity_id"].as_str().map(str::to_string))
            .collect();
        {
            let mut inf = fake.in_flight.lock().unwrap();
            for id in &ids {
                if inf.contains(id) {
                    fake.overlaps.lock().unwrap().push(id.clone());
                }
            }
            inf.extend(ids.iter().cloned());
            fake.batches
                .lock()
                .unwrap()
                .push((Instant::now(), events.clone()));
        }
        tokio::time::sleep(latency).await;
        let (status, ctype, body) = respond(&events);
        {
            let mut inf = fake.in_flight.lock().unwrap();
            for id in &ids {
                if let Some(i) = inf.iter().position(|x| x == id) {
                    inf.remove(i);
                }
            }
        }
        (
            axum::http::StatusCode::from_u16(status).expect("status"),
            [(axum::http::header::CONTENT_TYPE, ctype)],
            body,
        )
            .into_response()
    };
    let get = |State((fake, _)): State<(FakeFlux, Responder)>, Path(id): Path<String>| async move {
        match fake.state.lock().unwrap().get(&id) {
            Some(props) => (
                axum::http::StatusCode::OK,
                axum::Json(serde_json::json!({"id": id, "properties": props, "lastUpdated": "2026-01-01T00:00:00.000000000+00:00"})),
            )
                .into_response(),
            None => (
                axum::http::StatusCode::NOT_FOUND,
                axum::Json(serde_json::json!({"error": "Entity not found"})),
            )
                .into_response(),
        }
    };
    let app = axum::Router::new()
        .route("/api/events/batch", axum::routing::post(post))
        .route("/api/state/entities/{id}", axum::routing::get(get))
        .with_state((f2, respond));
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    fake
}

/// A 200 batch answer with every event applied.
pub fn all_ok(events: &[serde_json::Value]) -> String {
    let results: Vec<_> = events
        .iter()
        .map(|_| serde_json::json!({"eventId": "x", "stream": "scada", "error": null}))
        .collect();
    serde_json::json!({"successful": events.len(), "failed": 0, "results": results}).to_string()
}
