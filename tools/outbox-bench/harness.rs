//! What every scenario needs: the worker child (config, start, kill, /proc figures), flux-sim
//! in this process, a byte-counting TCP proxy, the update generator and bounded waits.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use flux_outbox::child::WorkerChild;
use flux_outbox::sim::{self, Faults, SimConfig, SimHandle};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

pub type Res<T> = Result<T, String>;

/// Properties per entity in every generated data set (a transformer with five tags).
pub const TAGS: [&str; 5] = ["TEMPERATURE", "CURRENT", "VOLTAGE", "LOAD", "STATUS"];
/// Updates per NDJSON request in the bulk phases (the 1,000 updates a request).
pub const UPDATES_PER_REQUEST: u64 = 1_000;

/// The entity and property of key number `k` (five keys per entity).
pub fn key_names(k: u64) -> (String, String) {
    let e = k / TAGS.len() as u64;
    let tag = TAGS[(k % TAGS.len() as u64) as usize];
    (
        format!("scada/asset/site-{}/tr-{e:07}", e % 16 + 1),
        format!("tag/TR-{e:07}.{tag}"),
    )
}

/// A measured-looking value, e.g. `61.7`.
pub fn value_of(i: u64) -> Value {
    Value::from((i % 100_000) as f64 / 10.0 + 0.1)
}

/// One NDJSON line of the native ingest API.
pub fn push_line(out: &mut String, key: u64, value: &Value, ts_ms: u64) {
    let (entity, prop) = key_names(key);
    out.push_str("{\"entity\":\"");
    out.push_str(&entity);
    out.push_str("\",\"properties\":{\"");
    out.push_str(&prop);
    out.push_str("\":");
    out.push_str(&value.to_string());
    out.push_str("},\"ts\":");
    out.push_str(&ts_ms.to_string());
    out.push_str("}\n");
}

pub fn now_ms() -> u64 {
    flux_outbox::model::now_ms()
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

// ---------------------------------------------------------------------------------------------
// flux-sim and the counting proxy

pub async fn start_sim(log_capacity: usize, link_down: bool) -> Res<SimHandle> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot bind flux-sim on loopback: {e}"))?;
    let cfg = SimConfig {
        log_capacity,
        faults: Faults {
            link_down,
            ..Faults::default()
        },
        ..SimConfig::default()
    };
    sim::start(cfg, listener)
        .await
        .map_err(|e| format!("cannot start flux-sim: {e}"))
}

pub fn set_link(sim: &SimHandle, up: bool) {
    sim.set_faults(Faults {
        link_down: !up,
        ..Faults::default()
    });
}

/// A loopback TCP proxy that counts every payload byte in both directions.
pub struct Proxy {
    pub url: String,
    pub bytes: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start_proxy(target: SocketAddr) -> Res<Proxy> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot bind the counting proxy: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("proxy address: {e}"))?;
    let bytes = Arc::new(AtomicU64::new(0));
    let counter = bytes.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((inbound, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let counter = counter.clone();
            conns.spawn(async move {
                let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                let up = tokio::spawn(pump(ri, wo, counter.clone()));
                let down = tokio::spawn(pump(ro, wi, counter));
                let _ = up.await;
                let _ = down.await;
            });
            // Reap finished connections so the set stays small.
            while conns.try_join_next().is_some() {}
        }
    });
    Ok(Proxy {
        url: format!("http://{addr}"),
        bytes,
        task,
    })
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    counter: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                counter.fetch_add(n as u64, Ordering::Relaxed);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// The worker child

/// How to configure a worker for one scenario.
#[derive(Clone, Debug, Default)]
pub struct WorkerSpec {
    pub flux_url: Option<String>,
    /// `flush.merge = "blind"` instead of the default read-merge-write.
    pub blind: bool,
}

pub struct Worker {
    proc: WorkerChild,
    pub data_dir: PathBuf,
    pub ingest: String,
    pub admin: String,
}

fn free_port() -> Res<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free loopback port: {e}"))
}

impl Worker {
    /// Writes the config into `dir` (data in `dir/data`) and starts the worker; waits until ready.
    pub async fn start(
        exe: &Path,
        dir: &Path,
        spec: &WorkerSpec,
        http: &reqwest::Client,
    ) -> Res<Worker> {
        let ingest_port = free_port()?;
        let admin_port = free_port()?;
        let data_dir = dir.join("data");
        let mut toml = format!(
            "data_dir = {data:?}\ngateway_id = \"bench\"\n[ingest]\nlisten = \"127.0.0.1:{ingest_port}\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n",
            data = data_dir.display().to_string(),
        );
        if let Some(url) = &spec.flux_url {
            toml.push_str(&format!(
                "[flux]\nurl = {url:?}\nconnect_timeout = \"1s\"\nrequest_timeout = \"10s\"\nread_timeout = \"10s\"\n"
            ));
        }
        // Link-return is noticed within a second (the default back-off cap is 60 s).
        // The heartbeat entity would add keys and events of its own to every count.
        toml.push_str("[heartbeat]\nenabled = false\n");
        toml.push_str("[flush]\nbackoff_initial = \"100ms\"\nbackoff_max = \"1s\"\nfinal_flush_timeout = \"1s\"\n");
        if spec.blind {
            toml.push_str("merge = \"blind\"\n");
        }
        let config = dir.join("flux-outbox.toml");
        std::fs::write(&config, toml)
            .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
        let admin = format!("http://127.0.0.1:{admin_port}");
        let mut w = Worker {
            proc: WorkerChild::new(exe, &config, &dir.join("worker.log"), admin.clone(), "warn"),
            data_dir,
            ingest: format!("http://127.0.0.1:{ingest_port}"),
            admin,
        };
        w.spawn()?;
        w.wait_ready(http, Duration::from_secs(60)).await?;
        Ok(w)
    }

    /// Starts the process (again) with the same config; does not wait.
    pub fn spawn(&mut self) -> Res<()> {
        self.proc.spawn()
    }

    pub fn pid(&self) -> Res<u32> {
        self.proc
            .pid()
            .ok_or_else(|| "the worker is not running".to_string())
    }

    /// The last lines of the worker's log, for error messages.
    pub fn log_tail(&self) -> String {
        self.proc.log_tail()
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> Res<()> {
        if self.proc.pid().is_none() {
            return Err("the worker is not running".into());
        }
        match self.proc.try_wait()? {
            None => Ok(()),
            Some(s) => Err(format!("the worker exited ({s}); {}", self.log_tail())),
        }
    }

    pub async fn wait_ready(&mut self, http: &reqwest::Client, limit: Duration) -> Res<()> {
        self.proc.wait_ready(http, limit).await
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) -> Res<()> {
        self.proc.kill9();
        Ok(())
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        let _ = self.proc.stop(grace).await;
    }

    pub async fn summary(&self, http: &reqwest::Client) -> Res<Value> {
        let r = http
            .get(format!("{}/v1/outbox/summary", self.admin))
            .send()
            .await
            .map_err(|e| format!("summary request failed: {e}"))?;
        let b = r
            .bytes()
            .await
            .map_err(|e| format!("summary answer failed: {e}"))?;
        serde_json::from_slice(&b).map_err(|e| format!("summary is not JSON: {e}"))
    }

    /// Polls the summary until `done` holds, at most `limit`.
    pub async fn wait_summary(
        &mut self,
        http: &reqwest::Client,
        what: &str,
        limit: Duration,
        poll: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Res<Value> {
        let start = Instant::now();
        let mut last = Value::Null;
        while start.elapsed() < limit {
            self.check_alive()?;
            if let Ok(s) = self.summary(http).await {
                if done(&s) {
                    return Ok(s);
                }
                last = s;
            }
            tokio::time::sleep(poll).await;
        }
        Err(format!(
            "timed out after {}s waiting for {what}; last summary: {last}",
            limit.as_secs()
        ))
    }
}

pub fn field(s: &Value, name: &str) -> u64 {
    s[name].as_u64().unwrap_or(0)
}

/// Nothing pending and nothing left in the log.
pub fn drained(s: &Value) -> bool {
    s["pending_keys"].as_u64() == Some(0) && s["log_backlog"].as_u64() == Some(0)
}

// ---------------------------------------------------------------------------------------------
// /proc and the disk

/// A `kB` field of /proc/<pid>/status (VmRSS, VmHWM), in bytes.
pub fn proc_status_bytes(pid: u32, name: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// utime + stime of /proc/<pid>/stat, in clock ticks.
pub fn proc_cpu_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields after the closing parenthesis.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

pub fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Bytes allocated on disk under `dir` (st_blocks), recursively; bounded depth.
pub fn disk_bytes(dir: &Path) -> u64 {
    fn walk(dir: &Path, depth: u32) -> u64 {
        use std::os::unix::fs::MetadataExt;
        if depth > 8 {
            return 0;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut total = 0;
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                total += walk(&e.path(), depth + 1);
            } else {
                total += m.blocks() * 512;
            }
        }
        total
    }
    walk(dir, 0)
}

// ---------------------------------------------------------------------------------------------
// Bulk HTTP ingest

/// Makes the body of request number `i`.
pub type BodyGen = Arc<dyn Fn(u64) -> Bytes + Send + Sync>;

/// Posts `requests` NDJSON bodies over `conns` concurrent connections; stops early at `deadline`.
/// Returns the number of requests acknowledged and the time it took.
pub async fn post_bulk(
    http: &reqwest::Client,
    url: &str,
    conns: usize,
    requests: u64,
    deadline: Duration,
    gen: BodyGen,
) -> Res<(u64, Duration)> {
    let next = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conns.max(1) {
        let (http, url, next, acked, gen) = (
            http.clone(),
            format!("{url}/v1/updates"),
            next.clone(),
            acked.clone(),
            gen.clone(),
        );
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests || start.elapsed() >= deadline {
                    return Ok::<(), String>(());
                }
                let body = gen(i);
                let r = http
                    .post(&url)
                    .header("content-type", "application/x-ndjson")
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| format!("ingest request failed: {e}"))?;
                let status = r.status();
                if !status.is_success() {
                    let text = r.text().await.unwrap_or_default();
                    return Err(format!("ingest answered {status}: {text}"));
                }
                acked.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(format!("ingest task failed: {e}")),
        }
    }
    Ok((acked.load(Ordering::Relaxed), start.elapsed()))
}

/// Bulk-loads keys `0..keys` (one update each, the value of `value_of(key)`) into the worker.
pub async fn load_keys(http: &reqwest::Client, w: &Worker, keys: u64, conns: usize) -> Res<()> {
    let ts = now_ms();
    let per = UPDATES_PER_REQUEST;
    let requests = keys.div_ceil(per);
    let gen: BodyGen = Arc::new(move |i| {
        let mut s = String::with_capacity(per as usize * 110);
        for k in i * per..((i + 1) * per).min(keys) {
            push_line(&mut s, k, &value_of(k), ts);
        }
        Bytes::from(s)
    });
    let (acked, _) = post_bulk(
        http,
        &w.ingest,
        conns,
        requests,
        Duration::from_secs(900),
        gen,
    )
    .await?;
    if acked != requests {
        return Err(format!(
            "only {acked} of {requests} load requests were acknowledged"
        ));
    }
    Ok(())
}

/// A tempdir under the system temporary directory.
pub fn tempdir(prefix: &str) -> Res<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|e| format!("cannot create a temporary directory: {e}"))
}

/// Percentile (0..=100) of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}
