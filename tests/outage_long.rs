//! A long outage, compressed: the link is down while a steady feed rewrites a fixed set of keys
//! many times over (what days of telemetry do to a gateway). The outbox must stay bounded by
//! the number of distinct keys (compaction), its disk use must stop growing once the key set
//! is written, and when the link returns the backlog drains at the configured rate cap with
//! bounded memory, ending with Flux holding the newest value of every key.

mod harness;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flux_outbox::sim::{Faults, SimConfig};
use harness::*;
use serde_json::{json, Value};

const ENTITIES: u64 = 500;
const PROPS: u64 = 8;
const KEYS: u64 = ENTITIES * PROPS;
/// Passes over the whole key set during the outage (each rewrites every key); more with
/// `OUTAGE_PASSES` for a long run (see docs/RELIABILITY.md).
const PASSES_DEFAULT: u64 = 12;
/// Rate cap while draining: 6,000 events a minute (100/s). The worker's bucket holds one batch
/// (`flush.batch_events_max`, 200 events), so the 500-event backlog takes a few seconds.
const EVENTS_PER_MINUTE: u64 = 6_000;
const BURST: u64 = 200;

/// Bytes the files under `dir` take on disk (allocated blocks, as `du` counts).
fn du_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += du_bytes(&e.path()),
                Ok(m) => total += m.blocks() * 512,
                Err(_) => {}
            }
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_stays_bounded_and_drains_at_the_rate_cap() {
    let sim = start_sim(SimConfig {
        log_capacity: 0,
        ..SimConfig::default()
    })
    .await;
    sim.set_faults(Faults {
        link_down: true,
        ..Faults::default()
    });
    let mut w = Worker::new(Some(&sim.url()));
    w.settings.set(
        "flush.events_per_minute_max",
        &EVENTS_PER_MINUTE.to_string(),
    );
    // The heartbeat entity would add its own keys to the counts asserted exactly below once a
    // long run (OUTAGE_PASSES) outlasts its interval.
    w.settings.set("heartbeat.enabled", "false");
    w.start().await;
    let pid = w.pid();
    let passes: u64 = std::env::var("OUTAGE_PASSES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(PASSES_DEFAULT)
        .max(6);

    let mut newest: BTreeMap<(String, String), Value> = BTreeMap::new();
    let mut disk_after_pass = Vec::new();
    let mut rss_max_kib = 0;
    let mut n = 0u64;
    for pass in 0..passes {
        // One pass: every key once, in requests of 1,000 lines, source times increasing.
        let mut body = String::new();
        for k in 0..KEYS {
            n += 1;
            let (e, p) = (
                format!("scada/outage/e{}", k / PROPS),
                format!("p{}", k % PROPS),
            );
            let v = json!(n);
            body.push_str(
                &json!({"entity": e, "properties": {p.clone(): v.clone()}, "ts": 1_000 + n})
                    .to_string(),
            );
            body.push('\n');
            newest.insert((e, p), v);
            if body.len() > 60_000 || k + 1 == KEYS {
                let (s, text) = w
                    .post(
                        "/v1/updates",
                        "application/x-ndjson",
                        std::mem::take(&mut body),
                    )
                    .await;
                assert_eq!(s, 200, "{text}");
            }
        }
        w.wait_compacted().await;
        let s = w.summary().await;
        // Bounded by the distinct keys, however many times they were rewritten.
        assert_eq!(s["pending_keys"], json!(KEYS), "after pass {pass}: {s}");
        assert_eq!(s["pending_entities"], json!(ENTITIES), "{s}");
        disk_after_pass.push(du_bytes(&w.dir.path().join("data")));
        rss_max_kib = rss_max_kib.max(rss_kib(pid));
    }
    let s = w.summary().await;
    assert_eq!(
        s["superseded"].as_u64().unwrap(),
        KEYS * (passes - 1),
        "every rewrite of a pending key is counted as superseded: {s}"
    );
    // Disk: once the key set is written, more passes must not keep growing the store. sled
    // reuses the space of superseded values; the last passes may not add more than half of
    // what the first pass took.
    let first = disk_after_pass[0];
    let later_growth = disk_after_pass[passes as usize - 1].saturating_sub(disk_after_pass[4]);
    assert!(
        later_growth <= first / 2,
        "disk keeps growing with rewrites: {disk_after_pass:?}"
    );

    // The link returns: the backlog drains, no faster than the cap allows.
    sim.set_faults(Faults::default());
    let t0 = Instant::now();
    loop {
        rss_max_kib = rss_max_kib.max(rss_kib(pid));
        let (pending, log) = w.backlog().await;
        if pending == 0 && log == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the backlog did not drain: {pending} pending"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = t0.elapsed();
    let events = sim.stats().events_received;
    // A token bucket of BURST events refilled at the cap; one batch may overdraw it. The
    // worker sends one event per entity: the backlog is ENTITIES events (and heartbeats).
    let allowed = 2 * BURST + (EVENTS_PER_MINUTE as f64 * elapsed.as_secs_f64() / 60.0) as u64;
    assert!(
        events <= allowed,
        "{events} events in {elapsed:?}, cap allows {allowed}"
    );
    assert!(
        events >= ENTITIES,
        "{events} events for {ENTITIES} entities"
    );
    assert!(
        rss_max_kib < 150 * 1024,
        "worker RSS reached {} MiB",
        rss_max_kib / 1024
    );
    let state = sim.entities();
    let wrong = newest
        .iter()
        .filter(|((e, p), v)| state.get(e).and_then(|m| m.get(p)) != Some(v))
        .count();
    assert_eq!(
        wrong, 0,
        "{wrong} of {KEYS} keys do not hold their newest value"
    );
    println!(
        "outage: {} updates over {KEYS} keys, disk after each pass {disk_after_pass:?}, drained {events} events in {elapsed:?}, RSS max {} MiB",
        n,
        rss_max_kib / 1024
    );
    w.stop().await;
}
