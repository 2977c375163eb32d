//! The `layout` scenario (run only when named): what the record layout costs in sled, measured
//! on sled directly with the worker's sled options. It measures a design that is NOT built:
//! - `key`: pending keys as the store keeps them now, a `P` record (entity + property, the value)
//!   and an `I` record (delivery order) per key, and a `D` record per delivered key;
//! - `entity`: one `P`, one `I` and one `D` record per entity, carrying all its properties.
//!
//! For each: the memory of a fresh process that opens a store of `layout_open_keys` pending keys
//! (sled 0.34 loads a page-state snapshot that grows with the records), its disk, and the
//! drain's sled work on `layout_drain_keys` keys in settles of 200 entities (the claim's reads,
//! the settle's compare-and-swap reads, one batch removing `P` and `I` and writing `D`).
//! Record sizes follow the bench's keys: entity ids of 33 bytes, 5 properties, values of 110
//! bytes, delivered records of 40 bytes a property. It leaves out the worker's write history
//! (log records written and folded away) and its `E` records. BENCHMARKS.md, suggested fix 1.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::{disk_bytes, mib, proc_status_bytes, tempdir, Res};
use crate::{Ctx, Report};

const PROPS: u64 = 5;
const VALUE_BYTES: usize = 110;
const DELIVERED_BYTES: usize = 40;
const SETTLE_ENTITIES: u64 = 200;
/// Records per load batch.
const LOAD_BATCH_RECORDS: u64 = 2_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    Key,
    Entity,
}

/// The store in `dir`, opened with the worker's sled options (waiting, like the worker, while a
/// handle just closed still holds sled's lock).
fn open_db(dir: &Path) -> Res<sled::Db> {
    let path = dir.join("store");
    flux_outbox::store::open_tree_raw(&path)
        .map_err(|e| format!("layout: cannot open sled in {}: {e}", path.display()))
}

/// `tag` + entity length (u32 BE) + entity + property (as the store's `keyenc`); no property
/// for the per-entity layout.
fn key(tag: u8, e: u64, prop: Option<u64>) -> Vec<u8> {
    let entity = format!("scada/site-{e:06}.feeder-{e:012}");
    let mut k = Vec::with_capacity(1 + 4 + entity.len() + 16);
    k.push(tag);
    k.extend_from_slice(&(entity.len() as u32).to_be_bytes());
    k.extend_from_slice(entity.as_bytes());
    if let Some(p) = prop {
        k.extend_from_slice(format!("TEMPERATURE{p}").as_bytes());
    }
    k
}

fn order_key(seq: u64, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + rest.len());
    k.push(b'I');
    k.extend_from_slice(&seq.to_be_bytes());
    k.extend_from_slice(rest);
    k
}

/// Writes `entities` x `PROPS` pending keys in `layout`, then flushes.
fn load(db: &sled::Db, layout: Layout, entities: u64) -> Res<()> {
    let apply = |b: sled::Batch| db.apply_batch(b).map_err(|e| format!("layout: load: {e}"));
    let mut batch = sled::Batch::default();
    let mut records = 0u64;
    for e in 0..entities {
        match layout {
            Layout::Entity => {
                let k = key(b'P', e, None);
                batch.insert(order_key(e, &k[1..]), Vec::new());
                batch.insert(k, vec![7u8; PROPS as usize * VALUE_BYTES]);
                records += 2;
            }
            Layout::Key => {
                for p in 0..PROPS {
                    let k = key(b'P', e, Some(p));
                    batch.insert(order_key(e * PROPS + p, &k[1..]), Vec::new());
                    batch.insert(k, vec![7u8; VALUE_BYTES]);
                    records += 2;
                }
            }
        }
        if records >= LOAD_BATCH_RECORDS {
            apply(std::mem::take(&mut batch))?;
            records = 0;
        }
    }
    apply(batch)?;
    db.flush().map_err(|e| format!("layout: flush: {e}"))?;
    Ok(())
}

/// Delivers every loaded key: per settle of `SETTLE_ENTITIES` entities, the claim's reads and
/// the settle's reads and one batch, as the worker does them in each layout. Returns the keys
/// delivered and the time taken.
fn drain(db: &sled::Db, layout: Layout, entities: u64) -> Res<(u64, Duration)> {
    let err = |e: sled::Error| format!("layout: drain: {e}");
    let start = Instant::now();
    let mut values = 0u64;
    let mut first = 0;
    while first < entities {
        let last = (first + SETTLE_ENTITIES).min(entities);
        let mut batch = sled::Batch::default();
        for e in first..last {
            match layout {
                Layout::Entity => {
                    let k = key(b'P', e, None);
                    let dk = key(b'D', e, None);
                    // Claim, then the settle's compare-and-swap: the entity's pending and
                    // delivered records, each read twice.
                    values += u64::from(db.get(&k).map_err(err)?.is_some());
                    db.get(&dk).map_err(err)?;
                    db.get(&k).map_err(err)?;
                    db.get(&dk).map_err(err)?;
                    batch.remove(order_key(e, &k[1..]));
                    batch.remove(k);
                    batch.insert(dk, vec![1u8; PROPS as usize * DELIVERED_BYTES]);
                }
                Layout::Key => {
                    // Claim: the entity's pending records by prefix, each key's delivered
                    // record, and the entity's delete record.
                    for item in db.scan_prefix(key(b'P', e, None)) {
                        item.map_err(err)?;
                    }
                    for p in 0..PROPS {
                        db.get(key(b'D', e, Some(p))).map_err(err)?;
                    }
                    db.get(key(b'D', e, Some(u64::MAX))).map_err(err)?;
                    // Settle: per key the pending record (compare-and-swap) and the delivered
                    // one, then remove `P` and `I` and write `D`.
                    for p in 0..PROPS {
                        let k = key(b'P', e, Some(p));
                        values += u64::from(db.get(&k).map_err(err)?.is_some());
                        let dk = key(b'D', e, Some(p));
                        db.get(&dk).map_err(err)?;
                        batch.remove(order_key(e * PROPS + p, &k[1..]));
                        batch.remove(k);
                        batch.insert(dk, vec![1u8; DELIVERED_BYTES]);
                    }
                }
            }
        }
        db.apply_batch(batch).map_err(err)?;
        first = last;
    }
    let took = start.elapsed();
    let expected = match layout {
        Layout::Entity => entities,
        Layout::Key => entities * PROPS,
    };
    if values != expected {
        return Err(format!(
            "layout: the drain found {values} pending records, {expected} were loaded"
        ));
    }
    Ok((entities * PROPS, took))
}

/// The child side (`outbox-bench --layout-open DIR`): opens the store in DIR and prints its
/// VmRSS and VmHWM in bytes.
pub fn open_probe(dir: &Path) -> Res<String> {
    let db = open_db(dir)?;
    let me = std::process::id();
    let field = |name: &str| {
        proc_status_bytes(me, name).ok_or_else(|| format!("layout: no {name} in /proc/{me}/status"))
    };
    let out = format!("{} {}", field("VmRSS:")?, field("VmHWM:")?);
    drop(db);
    Ok(out)
}

/// Runs the probe in a fresh process of this executable: (RSS, peak RSS) in bytes.
fn open_in_child(dir: &Path) -> Res<(u64, u64)> {
    let exe = std::env::current_exe().map_err(|e| format!("layout: own executable: {e}"))?;
    let out = std::process::Command::new(exe)
        .arg("--layout-open")
        .arg(dir)
        .output()
        .map_err(|e| format!("layout: cannot run the open probe: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "layout: the open probe failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let mut it = text.split_whitespace().map(|n| n.parse::<u64>().ok());
    match (it.next().flatten(), it.next().flatten()) {
        (Some(rss), Some(hwm)) => Ok((rss, hwm)),
        _ => Err(format!("layout: the open probe printed {text:?}")),
    }
}

struct Measured {
    open_rss: u64,
    open_hwm: u64,
    disk: u64,
    keys_per_s: f64,
}

fn measure(cx: &Ctx, layout: Layout, name: &str) -> Res<Measured> {
    let s = &cx.sizes;
    let root = tempdir("outbox-bench-layout-")?;
    let open_dir = root.path().join("open");
    cx.progress(&format!(
        "layout {name}: {} pending keys, open in a fresh process",
        s.layout_open_keys
    ));
    {
        let db = open_db(&open_dir)?;
        load(&db, layout, s.layout_open_keys / PROPS)?;
    }
    let disk = disk_bytes(&open_dir);
    let (open_rss, open_hwm) = open_in_child(&open_dir)?;
    let _ = std::fs::remove_dir_all(&open_dir);
    cx.progress(&format!(
        "layout {name}: the drain's sled work on {} keys",
        s.layout_drain_keys
    ));
    let drain_dir = root.path().join("drain");
    let db = open_db(&drain_dir)?;
    load(&db, layout, s.layout_drain_keys / PROPS)?;
    let (keys, took) = drain(&db, layout, s.layout_drain_keys / PROPS)?;
    Ok(Measured {
        open_rss,
        open_hwm,
        disk,
        keys_per_s: keys as f64 / took.as_secs_f64().max(1e-9),
    })
}

pub async fn layout(cx: &Ctx) -> Res<Report> {
    // Blocking sled work; the runtime has nothing else to do meanwhile.
    let key = tokio::task::block_in_place(|| measure(cx, Layout::Key, "per key"))?;
    let entity = tokio::task::block_in_place(|| measure(cx, Layout::Entity, "per entity"))?;
    let mut r = Report::new("layout");
    r.u(
        "keys",
        cx.sizes.layout_open_keys,
        "pending keys in the opened store",
    );
    r.f(
        "key_open_rss_mb",
        mib(key.open_rss),
        1,
        "MiB, per key (as now), after open",
    );
    r.f(
        "entity_open_rss_mb",
        mib(entity.open_rss),
        1,
        "MiB, per entity, after open",
    );
    r.f("key_open_peak_mb", mib(key.open_hwm), 1, "");
    r.f("entity_open_peak_mb", mib(entity.open_hwm), 1, "");
    r.f("key_disk_mb", mib(key.disk), 1, "MiB on disk");
    r.f("entity_disk_mb", mib(entity.disk), 1, "");
    r.u(
        "drain_keys",
        cx.sizes.layout_drain_keys,
        "delivered in settles of 200 entities",
    );
    r.f(
        "key_drain_keys_per_s",
        key.keys_per_s,
        0,
        "the drain's sled work, per key",
    );
    r.f(
        "entity_drain_keys_per_s",
        entity.keys_per_s,
        0,
        "the same, per entity",
    );
    r.f(
        "drain_speedup",
        entity.keys_per_s / key.keys_per_s.max(1e-9),
        2,
        "entity_drain_keys_per_s / key_drain_keys_per_s",
    );
    Ok(r)
}
