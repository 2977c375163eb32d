//! `flux-outbox demo`: the whole mission end to end, on one machine, with nothing installed.
//!
//! It starts flux-sim in this process, the real worker as a child process (this same binary,
//! `run`) on a temporary data directory, and a synthetic SCADA feed (sites, assets, tags) that
//! posts NDJSON to the worker. Part-way it cuts the link to Flux, then kills the worker with
//! SIGKILL and restarts it, then restores the link. At the end it waits for the outbox to drain
//! and checks, key by key, that Flux holds the newest value the worker acknowledged (or a newer
//! one whose answer the kill cut off). Exit status 0 only when every key checks out. Every
//! value the feed sends is unique per key ([`feed_update`]), so a stale value fails the check.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::sim;

const SITES: usize = 3;
const ASSETS_PER_SITE: usize = 4;
const TAGS: [&str; 5] = ["TEMPERATURE", "CURRENT", "VOLTAGE", "LOAD", "STATUS"];
/// Updates per feed request.
const FEED_BATCH: usize = 40;

/// What the feeder knows of one key: the newest acknowledged value and newer values whose
/// answer never came (the worker was killed while they were being made durable).
#[derive(Default, Clone)]
struct KeyTruth {
    acked: Option<(u64, Value)>,
    unacked: Vec<(u64, Value)>,
}

type Truth = Arc<Mutex<BTreeMap<(String, String), KeyTruth>>>;

struct Worker {
    child: Child,
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn spawn_worker(config: &Path, log: &Path) -> Result<Worker, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let child = Command::new(exe)
        .arg("run")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .env_remove("FLUX_URL")
        .env_remove("FLUX_AUTH_TOKEN")
        .env_remove("FLUX_OUTBOX_DATA_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file))
        .spawn()
        .map_err(|e| format!("cannot start the worker: {e}"))?;
    Ok(Worker { child })
}

async fn wait_ready(http: &reqwest::Client, admin: &str, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(r) = http.get(format!("{admin}/readyz")).send().await {
            if r.status().is_success() {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn summary(http: &reqwest::Client, admin: &str) -> Option<Value> {
    let bytes = http
        .get(format!("{admin}/v1/outbox/summary"))
        .send()
        .await
        .ok()?
        .bytes()
        .await
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Runs the demo; Ok(true) when the verification passed.
pub fn run(duration: Duration, plain: bool) -> Result<bool, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(run_async(duration, plain))
}

async fn run_async(duration: Duration, plain: bool) -> Result<bool, String> {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("flux-outbox-demo-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot bind flux-sim: {e}"))?;
    let flux = sim::start(sim::SimConfig::default(), listener)
        .await
        .map_err(|e| format!("cannot start flux-sim: {e}"))?;
    let ingest_port = free_port().map_err(|e| e.to_string())?;
    let admin_port = free_port().map_err(|e| e.to_string())?;
    let config = dir.path().join("flux-outbox.toml");
    let log = dir.path().join("worker.log");
    let data_dir = dir.path().join("data");
    let toml = format!(
        "data_dir = {data:?}\ngateway_id = \"demo\"\n[ingest]\nlisten = \"127.0.0.1:{ingest_port}\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n[flux]\nurl = {url:?}\nrequest_timeout = \"3s\"\nconnect_timeout = \"1s\"\nread_timeout = \"3s\"\n[flush]\ninterval = \"200ms\"\nbackoff_initial = \"100ms\"\nbackoff_max = \"1s\"\nfinal_flush_timeout = \"5s\"\n",
        data = data_dir.display().to_string(),
        url = flux.url(),
    );
    std::fs::write(&config, toml).map_err(|e| format!("cannot write {}: {e}", config.display()))?;
    let ingest = format!("http://127.0.0.1:{ingest_port}");
    let admin = format!("http://127.0.0.1:{admin_port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;

    println!(
        "flux-outbox demo: flux-sim at {}, worker data in {}",
        flux.url(),
        data_dir.display()
    );
    println!("feed: {SITES} sites x {ASSETS_PER_SITE} assets x {} tags, {}s; link cut at 25%, worker killed (SIGKILL) at 50%, link back at 70%", TAGS.len(), duration.as_secs());
    let mut worker = spawn_worker(&config, &log)?;
    if !wait_ready(&http, &admin, Duration::from_secs(30)).await {
        let _ = worker.child.kill();
        return Err(format!(
            "the worker did not become ready; its log: {}",
            log.display()
        ));
    }

    let truth: Truth = Arc::new(Mutex::new(BTreeMap::new()));
    let acked = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let feeding = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let feeder = tokio::spawn(feed(
        http.clone(),
        ingest.clone(),
        truth.clone(),
        acked.clone(),
        refused.clone(),
        feeding.clone(),
    ));

    let mut phase = 0;
    let mut kills = 0;
    let t0 = Instant::now();
    while t0.elapsed() < duration {
        let frac = t0.elapsed().as_secs_f64() / duration.as_secs_f64();
        if phase == 0 && frac >= 0.25 {
            flux.set_faults(sim::Faults {
                link_down: true,
                ..Default::default()
            });
            println!("\n>>> link to Flux cut");
            phase = 1;
        }
        if phase == 1 && frac >= 0.5 {
            let _ = worker.child.kill(); // SIGKILL: no shutdown code runs.
            let _ = worker.child.wait();
            kills += 1;
            println!("\n>>> worker killed with SIGKILL; restarting");
            worker = spawn_worker(&config, &log)?;
            if !wait_ready(&http, &admin, Duration::from_secs(30)).await {
                return Err(format!(
                    "the worker did not come back after the kill; its log: {}",
                    log.display()
                ));
            }
            println!(">>> worker back");
            phase = 2;
        }
        if phase == 2 && frac >= 0.7 {
            flux.set_faults(sim::Faults::default());
            println!("\n>>> link to Flux restored");
            phase = 3;
        }
        progress(&http, &admin, &acked, &refused, plain).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    feeding.store(false, Ordering::SeqCst);
    let _ = feeder.await;
    flux.set_faults(sim::Faults::default());
    println!("\n>>> feed stopped; waiting for the outbox to drain");

    let drain_start = Instant::now();
    let mut drained = false;
    while drain_start.elapsed() < Duration::from_secs(60) {
        progress(&http, &admin, &acked, &refused, plain).await;
        if let Some(s) = summary(&http, &admin).await {
            if s["pending_keys"].as_u64() == Some(0) && s["log_backlog"].as_u64() == Some(0) {
                drained = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    println!();

    // Graceful stop: SIGTERM, expect exit 0.
    let pid = worker.child.id() as i32;
    // SAFETY: kill(2) with a pid we own and a valid signal number.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let status = worker.child.wait().map_err(|e| e.to_string())?;

    let state = flux.entities();
    let truth = truth
        .lock()
        .map_err(|_| "feeder state poisoned".to_string())?
        .clone();
    let mut wrong = Vec::new();
    for ((entity, prop), t) in &truth {
        let have = state.get(entity).and_then(|props| props.get(prop));
        let Some((acked_ts, acked_value)) = &t.acked else {
            continue; // never acknowledged: no promise was made
        };
        let ok = have == Some(acked_value)
            || t.unacked
                .iter()
                .any(|(ts, v)| ts > acked_ts && have == Some(v));
        if !ok {
            wrong.push(format!(
                "{entity} {prop}: Flux has {:?}, newest acknowledged is {acked_value}",
                have
            ));
        }
    }
    let keys = truth.values().filter(|t| t.acked.is_some()).count();
    println!(
        "summary: {} updates acknowledged, {} refused while the worker was down, {} keys, {kills} kill(s), drained: {drained}, worker exit: {status}, {:.1}s",
        acked.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        keys,
        started.elapsed().as_secs_f64()
    );
    let ok = drained && wrong.is_empty() && status.success() && keys > 0;
    if ok {
        println!("VERIFIED: every one of {keys} keys in Flux holds its newest acknowledged value; nothing lost.");
    } else {
        for w in wrong.iter().take(20) {
            println!("WRONG: {w}");
        }
        println!("FAILED: {} of {keys} keys wrong, drained: {drained}, worker exit: {status}; worker log: {}", wrong.len(), log.display());
        // Keep the directory for inspection.
        let kept = dir.keep();
        println!("kept {}", kept.display());
    }
    Ok(ok)
}

async fn progress(
    http: &reqwest::Client,
    admin: &str,
    acked: &AtomicU64,
    refused: &AtomicU64,
    plain: bool,
) {
    let line = match summary(http, admin).await {
        Some(s) => format!(
            "ingested {:>7}  pending {:>4}  delivered {:>7}  superseded {:>7}  refused {:>4}  link {}",
            acked.load(Ordering::Relaxed),
            s["pending_keys"].as_u64().unwrap_or(0) + s["log_backlog"].as_u64().unwrap_or(0),
            s["delivered"].as_u64().unwrap_or(0),
            s["superseded"].as_u64().unwrap_or(0),
            refused.load(Ordering::Relaxed),
            s["link"].as_str().unwrap_or("?"),
        ),
        None => format!("ingested {:>7}  (worker not answering)", acked.load(Ordering::Relaxed)),
    };
    if plain {
        println!("{line}");
    } else {
        print!("\r{line}   ");
        let _ = std::io::stdout().flush();
    }
}

/// The `n`-th update of the synthetic feed: (entity, property, value). Keys cycle through the
/// sites, assets and tags; every value carries the feed counter `n`, so no two updates of a key
/// ever have the same value and the final check cannot mistake a stale value for the newest.
pub fn feed_update(n: u64) -> (String, String, Value) {
    let site = (n as usize) % SITES + 1;
    let asset = (n as usize / SITES) % ASSETS_PER_SITE + 1;
    let tag_index = (n as usize / (SITES * ASSETS_PER_SITE)) % TAGS.len();
    let tag = TAGS[tag_index];
    let entity = format!("scada/asset/site-{site}/tr-{asset:02}");
    let prop = format!("tag/TR-{asset:02}.{tag}");
    let value = if tag == "STATUS" {
        let state = ["OK", "WARNING", "CRITICAL"][((n / 7) % 3) as usize];
        json!(format!("{state} #{n}"))
    } else {
        // A nominal raw count per tag plus n: strictly increasing, so unique per update. An
        // integer on purpose: a decimal fraction may not survive a JSON round trip bit for bit
        // (serde_json parses floats to within one ulp), and the check compares exactly.
        let nominal: u64 = [600, 4_000, 110_000, 500][tag_index];
        json!(nominal + n)
    };
    (entity, prop, value)
}

async fn feed(
    http: reqwest::Client,
    ingest: String,
    truth: Truth,
    acked: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    feeding: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut n: u64 = 0;
    let base_ts = crate::model::now_ms();
    let mut ts = base_ts;
    while feeding.load(Ordering::SeqCst) {
        let mut lines = String::new();
        let mut sent = Vec::new();
        for _ in 0..FEED_BATCH {
            n += 1;
            ts += 1;
            let (entity, prop, value) = feed_update(n);
            lines.push_str(
                &json!({"entity": entity, "properties": {prop.clone(): value.clone()}, "ts": ts})
                    .to_string(),
            );
            lines.push('\n');
            sent.push(((entity, prop), ts, value));
        }
        let result = http
            .post(format!("{ingest}/v1/updates"))
            .header("content-type", "application/x-ndjson")
            .body(lines)
            .send()
            .await;
        let ok = matches!(&result, Ok(r) if r.status().is_success());
        if let Ok(mut t) = truth.lock() {
            for (key, ts, value) in sent {
                let e = t.entry(key).or_default();
                if ok {
                    e.acked = Some((ts, value));
                    e.unacked.clear();
                } else {
                    e.unacked.push((ts, value));
                }
            }
        }
        if ok {
            acked.fetch_add(FEED_BATCH as u64, Ordering::Relaxed);
        } else {
            refused.fetch_add(FEED_BATCH as u64, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
