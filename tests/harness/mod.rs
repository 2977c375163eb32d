//! Harness shared by the daemon integration tests: flux-sim in the test's own runtime, the real
//! `flux-outbox` binary as a child process on a temporary directory, and polling helpers.
//!
//! Everything waits by polling against generous deadlines rather than sleeping fixed times: the
//! tests share a small, noisy machine, and a deadline only costs time when something is wrong.

#![allow(dead_code)] // Each test crate uses a different subset.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use flux_outbox::app::{self, Running};
use flux_outbox::config::Config;
use flux_outbox::sim::{self, Faults, SimConfig, SimHandle};
use serde_json::Value;

pub const EXE: &str = env!("CARGO_BIN_EXE_flux-outbox");

/// Deadline for anything that should happen "soon" (delivery, readiness, exit).
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Starts flux-sim on a free loopback port inside the calling test's runtime.
pub async fn start_sim(cfg: SimConfig) -> SimHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    sim::start(cfg, listener).await.unwrap()
}

/// Stops a worker started with [`start_in_process`].
pub type StopSwitch = tokio::sync::oneshot::Sender<()>;
/// The task running a worker started with [`start_in_process`].
pub type WorkerTask = tokio::task::JoinHandle<Result<app::Exit, app::StartError>>;

/// Starts the worker in-process (`app::run` in the test's runtime, not the binary) with `cfg` as
/// given (not validated here); returns its addresses, a stop switch and its task.
pub async fn start_in_process(cfg: Config) -> (Running, StopSwitch, WorkerTask) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Running>();
    let task = tokio::spawn(app::run(
        cfg,
        async move {
            let _ = stop_rx.await;
        },
        move |r| {
            let _ = ready_tx.send(r.clone());
        },
    ));
    let running = tokio::time::timeout(DEADLINE, ready_rx)
        .await
        .expect("worker ready in time")
        .expect("worker started");
    (running, stop_tx, task)
}

/// Stops a worker started with [`start_in_process`]: it must stop cleanly within [`DEADLINE`].
pub async fn stop_in_process(stop: StopSwitch, task: WorkerTask) {
    let _ = stop.send(());
    let exit = tokio::time::timeout(DEADLINE, task)
        .await
        .expect("worker stops in time")
        .unwrap()
        .unwrap();
    assert_eq!(exit, app::Exit::Stopped);
}

pub fn link_down() -> Faults {
    Faults {
        link_down: true,
        ..Faults::default()
    }
}

/// A free loopback port. The port is released before the worker binds it, so another process
/// could take it in between; [`Worker::start`] picks new ports when the bind fails.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` every 50 ms until it returns `Some`, panicking with `what` after `limit`.
pub async fn poll<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The worker's configuration as dotted TOML keys at the root (`flush.interval = "100ms"`), so a
/// test overrides any key without redefining a table. Values are TOML literals.
#[derive(Clone, Debug)]
pub struct Settings {
    pub keys: BTreeMap<String, String>,
}

/// A TOML basic string literal.
pub fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

impl Settings {
    /// Fast, test-friendly settings; `flux_url` None = offline mode.
    pub fn new(flux_url: Option<&str>) -> Settings {
        let mut s = Settings {
            keys: BTreeMap::new(),
        };
        s.set("gateway_id", &toml_str("itest"));
        if let Some(url) = flux_url {
            s.set("flux.url", &toml_str(url));
        }
        s.set("flux.request_timeout", "\"2s\"");
        s.set("flux.connect_timeout", "\"1s\"");
        s.set("flux.read_timeout", "\"2s\"");
        s.set("flush.interval", "\"100ms\"");
        s.set("flush.backoff_initial", "\"50ms\"");
        s.set("flush.backoff_max", "\"500ms\"");
        s.set("flush.final_flush_timeout", "\"2s\"");
        s
    }

    pub fn set(&mut self, key: &str, toml_value: &str) -> &mut Self {
        self.keys.insert(key.to_string(), toml_value.to_string());
        self
    }

    pub fn remove(&mut self, key: &str) -> &mut Self {
        self.keys.remove(key);
        self
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.keys {
            out.push_str(&format!("{k} = {v}\n"));
        }
        out
    }
}

/// The real worker binary, run as a child process. Dropping it kills the process, so a failing
/// test never leaves a worker behind.
pub struct Worker {
    pub dir: tempfile::TempDir,
    pub settings: Settings,
    pub env: Vec<(String, String)>,
    /// `text` or `json` (`--log-format`).
    pub log_format: &'static str,
    child: Option<Child>,
    pub ingest: String,
    pub admin: String,
    pub http: reqwest::Client,
    /// Ports chosen by the harness (false: the test set the listen addresses itself).
    auto_ports: bool,
    /// One listener for ingest and admin (`admin.listen = ingest.listen`).
    single_listener: bool,
    /// Sent as the bearer token on admin requests (readiness included).
    pub admin_token: Option<String>,
}

impl Worker {
    /// A worker (not started) with [`Settings::new`], a fresh data directory and free ports.
    pub fn new(flux_url: Option<&str>) -> Worker {
        Worker::with_settings(Settings::new(flux_url))
    }

    pub fn with_settings(settings: Settings) -> Worker {
        let dir = tempfile::Builder::new()
            .prefix("flux-outbox-itest-")
            .tempdir()
            .unwrap();
        let mut w = Worker {
            dir,
            settings,
            env: vec![("RUST_LOG".into(), "info".into())],
            log_format: "text",
            child: None,
            ingest: String::new(),
            admin: String::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            auto_ports: true,
            single_listener: false,
            admin_token: None,
        };
        let data = w.dir.path().join("data");
        w.settings
            .set("data_dir", &toml_str(&data.display().to_string()));
        if w.settings.keys.contains_key("ingest.listen") {
            w.auto_ports = false;
        } else {
            w.pick_ports();
        }
        w
    }

    /// Serve ingest and admin on one listener.
    pub fn single_listener(&mut self) {
        self.single_listener = true;
        self.pick_ports();
    }

    fn pick_ports(&mut self) {
        let i = free_port();
        let a = if self.single_listener { i } else { free_port() };
        self.settings
            .set("ingest.listen", &toml_str(&format!("127.0.0.1:{i}")));
        self.settings
            .set("admin.listen", &toml_str(&format!("127.0.0.1:{a}")));
        self.ingest = format!("http://127.0.0.1:{i}");
        self.admin = format!("http://127.0.0.1:{a}");
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("flux-outbox.toml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("worker.log")
    }

    /// Everything the worker wrote to stderr, over all its runs.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn write_config(&self) {
        std::fs::write(self.config_path(), self.settings.render()).unwrap();
    }

    /// Spawns `flux-outbox run` without waiting for readiness.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "worker already running");
        self.write_config();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = Command::new(EXE);
        cmd.arg("--log-format")
            .arg(self.log_format)
            .arg("run")
            .arg("--config")
            .arg(self.config_path());
        clean_env(&mut cmd);
        cmd.env("NO_COLOR", "1");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Spawns the worker and waits until `/readyz` answers 200. Retries with new ports when a
    /// port picked by [`free_port`] was taken by someone else in the meantime.
    pub async fn start(&mut self) {
        for _attempt in 0..5 {
            let log_before = self.log().len();
            self.spawn();
            let start = Instant::now();
            loop {
                if let Some(status) = self.try_wait() {
                    let log = self.log();
                    let new_log = &log[log_before.min(log.len())..];
                    if self.auto_ports && new_log.contains("cannot listen on") {
                        self.pick_ports();
                        break;
                    }
                    panic!("worker exited before ready ({status}); its log:\n{log}");
                }
                if let Ok(r) = self.admin_request("/readyz").send().await {
                    if r.status() == 200 {
                        return;
                    }
                }
                if start.elapsed() > DEADLINE {
                    panic!(
                        "worker not ready after {DEADLINE:?}; its log:\n{}",
                        self.log()
                    );
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        }
        panic!("could not find free ports for the worker");
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("worker not running").id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed", self.pid());
    }

    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// SIGKILL and reap: no shutdown code runs in the worker.
    pub fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Some(status) once the child has exited (and forgets it), None while it runs.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let c = self.child.as_mut()?;
        match c.try_wait().unwrap() {
            Some(status) => {
                self.child = None;
                Some(status)
            }
            None => None,
        }
    }

    /// Waits for the child to exit (panics after `limit`).
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.try_wait() {
                return s;
            }
            if start.elapsed() > limit {
                panic!(
                    "worker still running {limit:?} after being asked to stop; its log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }

    /// SIGTERM, expect a clean exit 0.
    pub async fn stop(&mut self) {
        self.sigterm();
        let status = self.wait_exit(DEADLINE).await;
        assert_eq!(
            status.code(),
            Some(0),
            "graceful stop should exit 0 (got {status}); log:\n{}",
            self.log()
        );
    }

    /// POST to the ingest listener: (status, body text). Panics on a transport error.
    pub async fn post(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<String>,
    ) -> (u16, String) {
        self.try_post(path, content_type, body, None)
            .await
            .unwrap_or_else(|e| panic!("POST {path} failed: {e}"))
    }

    /// POST with an optional bearer token; a transport error is returned, not a panic.
    pub async fn try_post(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<String>,
        token: Option<&str>,
    ) -> Result<(u16, String), reqwest::Error> {
        let mut req = self
            .http
            .post(format!("{}{path}", self.ingest))
            .header("content-type", content_type)
            .body(body.into());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        Ok((status, r.text().await?))
    }

    /// POST a JSON value to `path` (`application/json`).
    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, String) {
        self.post(path, "application/json", body.to_string()).await
    }

    fn admin_request(&self, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.get(format!("{}{path}", self.admin));
        match &self.admin_token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// GET on the admin listener (with the admin token if set): (status, body text).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let r = self
            .admin_request(path)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path} failed: {e}"));
        let status = r.status().as_u16();
        (status, r.text().await.unwrap())
    }

    pub async fn summary(&self) -> Value {
        let (status, body) = self.admin_get("/v1/outbox/summary").await;
        assert_eq!(status, 200, "summary: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// (pending_keys, log_backlog) from `/v1/outbox/summary`.
    pub async fn backlog(&self) -> (u64, u64) {
        let s = self.summary().await;
        (
            s["pending_keys"].as_u64().unwrap(),
            s["log_backlog"].as_u64().unwrap(),
        )
    }

    /// Waits until nothing is pending and the log is compacted.
    pub async fn wait_drained(&self) {
        poll(DEADLINE, "the outbox to drain", || async {
            (self.backlog().await == (0, 0)).then_some(())
        })
        .await;
    }

    /// Waits until the log is compacted (every accepted update is a pending key).
    pub async fn wait_compacted(&self) {
        poll(DEADLINE, "the log to be compacted", || async {
            (self.backlog().await.1 == 0).then_some(())
        })
        .await;
    }

    pub async fn metrics(&self) -> String {
        let (status, body) = self.admin_get("/metrics").await;
        assert_eq!(status, 200, "metrics: {body}");
        body
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            // Keep the evidence in the test output.
            eprintln!("---- worker log ----\n{}", self.log());
        }
    }
}

/// Removes the environment overrides the worker honours, so the developer's shell cannot
/// change what a test configures.
pub fn clean_env(cmd: &mut Command) {
    for var in [
        "FLUX_URL",
        "FLUX_AUTH_TOKEN",
        "FLUX_PUBLISH_INTERVAL_MS",
        "FLUX_ENTITY_PREFIX",
        "FLUX_STREAM",
        "FLUX_SOURCE",
        "FLUX_OUTBOX_DATA_DIR",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
}

/// Runs `flux-outbox check-config --config <path>`: (exit code, stdout, stderr).
pub fn check_config(path: &Path) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(EXE);
    cmd.arg("check-config").arg("--config").arg(path);
    clean_env(&mut cmd);
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The value of a Prometheus sample line `name{labels} value` (exact `series` text before the
/// space), or 0 when the series is absent (counters start absent).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse::<f64>().ok())?
        })
        .unwrap_or(0.0)
}

pub fn rejected(text: &str, reason: &str) -> f64 {
    metric(
        text,
        &format!("flux_outbox_ingest_rejected_total{{reason=\"{reason}\"}}"),
    )
}

/// The `error` text of a JSON error answer (panics if the body is not `{"error": "..."}`).
pub fn error_text(body: &str) -> String {
    let v: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("error answer is not JSON ({e}): {body:?}"));
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("error answer has no \"error\" string: {body}"))
        .to_string()
}

/// Waits until flux-sim holds `value` for `entity`.`prop`.
pub async fn wait_value(sim: &SimHandle, entity: &str, prop: &str, value: &Value) {
    poll(
        DEADLINE,
        &format!("flux-sim to hold {entity} {prop} = {value}"),
        || async {
            let e = sim.entity(entity)?;
            (e.properties.get(prop) == Some(value)).then_some(())
        },
    )
    .await;
}

/// Waits until flux-sim no longer has `entity`.
pub async fn wait_gone(sim: &SimHandle, entity: &str) {
    poll(
        DEADLINE,
        &format!("{entity} to be deleted in flux-sim"),
        || async { sim.entity(entity).is_none().then_some(()) },
    )
    .await;
}

/// A Flux-shaped event for `/api/events` and `/api/events/batch`.
pub fn flux_event(entity: &str, properties: Value) -> Value {
    serde_json::json!({
        "stream": "scada",
        "source": "itest-producer",
        "timestamp": flux_outbox::model::now_ms(),
        "payload": {"entity_id": entity, "properties": properties},
    })
}

/// Resident memory of a process in KiB (`VmRSS` of /proc), 0 when it cannot be read.
pub fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
