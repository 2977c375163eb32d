//! Disk full, for real: the worker runs on a tmpfs of a few MB that the test mounts (root
//! only; elsewhere the test prints why it is skipped). Ingest must answer 507 clearly once the
//! filesystem is out of space, lose nothing it acknowledged, keep the store openable (a kill
//! and restart while full), and resume by itself once space is freed; after the link returns,
//! Flux holds every acknowledged value.

mod harness;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use flux_outbox::sim::{Faults, SimConfig};
use harness::*;
use serde_json::{json, Value};

/// The small filesystem; unmounted on drop (also when the test fails).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size_mb: u32) -> Result<Tmpfs, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root, cannot mount a tmpfs".into());
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mb}m,mode=0755"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn free_bytes(p: &Path) -> u64 {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs on a valid NUL-terminated path into a zeroed struct we own.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    assert_eq!(rc, 0, "statvfs {}", p.display());
    s.f_bavail as u64 * s.f_frsize as u64
}

/// Fills the filesystem with a ballast file until about `leave` bytes are free.
fn fill(path: &Path, name: &str, leave: u64) -> PathBuf {
    let ballast = path.join(name);
    let free = free_bytes(path);
    let size = free.saturating_sub(leave);
    let chunk = vec![0x5au8; 1 << 20];
    let mut f = std::fs::File::create(&ballast).unwrap();
    let mut written = 0u64;
    while written < size {
        let n = chunk.len().min((size - written) as usize);
        use std::io::Write;
        if f.write_all(&chunk[..n]).is_err() {
            break;
        }
        written += n as u64;
    }
    let _ = f.sync_all();
    ballast
}

/// One NDJSON request of `n` new keys with values of ~`value_bytes`.
fn request(first: u64, n: u64, value_bytes: usize) -> (String, Vec<(String, String, Value)>) {
    let mut body = String::new();
    let mut rows = Vec::new();
    let pad = "x".repeat(value_bytes);
    for i in first..first + n {
        let entity = format!("scada/full/e{}", i / 8);
        let prop = format!("p{}", i % 8);
        let value = json!(format!("{i}-{pad}"));
        body.push_str(
            &json!({"entity": entity, "properties": {prop.clone(): value.clone()}, "ts": 1_000 + i})
                .to_string(),
        );
        body.push('\n');
        rows.push((entity, prop, value));
    }
    (body, rows)
}

/// Posts requests of new keys until the worker answers 507; returns the refusal's text.
async fn fill_until_507(
    w: &Worker,
    fs: &Tmpfs,
    next: &mut u64,
    acked: &mut BTreeMap<(String, String), Value>,
) -> String {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        let (body, rows) = request(*next, 200, 400);
        *next += 200;
        match w
            .try_post("/v1/updates", "application/x-ndjson", body, None)
            .await
        {
            Ok((200, _)) => {
                for (e, p, v) in rows {
                    acked.insert((e, p), v);
                }
            }
            Ok((507, text)) => return text,
            Ok((s, text)) => panic!("unexpected answer {s} while filling the disk: {text}"),
            Err(e) => panic!(
                "the worker stopped answering while the disk filled: {e}; log:\n{}",
                w.log()
            ),
        }
    }
    panic!(
        "no 507 after {} updates; free bytes {}",
        next,
        free_bytes(fs.path())
    );
}

/// Polls until a request of new keys is accepted again; records it.
async fn wait_accepting(
    w: &Worker,
    next: &mut u64,
    acked: &mut BTreeMap<(String, String), Value>,
    what: &str,
) {
    let first = *next;
    *next += 50;
    let rows = poll(Duration::from_secs(90), what, || {
        let (body, rows) = request(first, 50, 400);
        async move {
            match w
                .try_post("/v1/updates", "application/x-ndjson", body, None)
                .await
            {
                Ok((200, _)) => Some(rows),
                _ => None,
            }
        }
    })
    .await;
    for (e, p, v) in rows {
        acked.insert((e, p), v);
    }
}

fn moved_aside(data_dir: &Path) -> Vec<String> {
    std::fs::read_dir(data_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("corrupt"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_refuses_with_507_keeps_everything_and_resumes() {
    let fs = match Tmpfs::mount(48) {
        Ok(fs) => fs,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let sim = start_sim(SimConfig::default()).await;
    sim.set_faults(link_down());
    let mut w = Worker::new(Some(&sim.url()));
    let data_dir = fs.path().join("data");
    w.settings
        .set("data_dir", &toml_str(&data_dir.display().to_string()));
    w.start().await;
    let mut acked: BTreeMap<(String, String), Value> = BTreeMap::new();
    let mut next = 0u64;

    // 1. Out of space while running: a clear 507, the worker stays up.
    let ballast = fill(fs.path(), "ballast-1", 6 << 20);
    let refusal = fill_until_507(&w, &fs, &mut next, &mut acked).await;
    let msg = error_text(&refusal);
    assert!(
        msg.contains("storage") || msg.contains("disk") || msg.contains("space"),
        "507 should say the disk is the problem: {msg}"
    );
    assert!(acked.len() > 1_000, "hardly anything fit: {}", acked.len());
    let (body, _) = request(next, 200, 400);
    let (s, text) = w
        .try_post("/v1/updates", "application/x-ndjson", body, None)
        .await
        .expect("the worker answers while the disk is full");
    assert_eq!(s, 507, "{text}");
    assert!(w.try_wait().is_none(), "the worker exited on a full disk");

    // 2. Space comes back: ingest resumes by itself (the worker reopens its store in place).
    let pid = w.pid();
    std::fs::remove_file(&ballast).unwrap();
    wait_accepting(
        &w,
        &mut next,
        &mut acked,
        "ingest to resume once space is freed",
    )
    .await;
    assert_eq!(w.pid(), pid, "resuming must not need an outside restart");
    assert!(
        w.log().contains("restarting in place"),
        "expected the in-place restart; log:\n{}",
        w.log()
    );

    // 3. Full again, and killed while full. Depending on what sled must write to recover, the
    // restarted worker either opens (and answers 507 while full) or cannot open the store and
    // waits for space. Either way it stays up, the store is never moved aside, and it takes
    // updates again once space is back.
    let ballast = fill(fs.path(), "ballast-2", 6 << 20);
    fill_until_507(&w, &fs, &mut next, &mut acked).await;
    w.sigkill();
    let ballast_rest = fill(fs.path(), "ballast-3", 0);
    w.spawn();
    let log_len = w.log().len();
    let opened = poll(
        DEADLINE,
        "the restarted worker to open or to wait",
        || async {
            if w.log()[log_len..].contains("THE STORE CANNOT BE OPENED NOW") {
                return Some(false);
            }
            let r = w
                .http
                .get(format!("{}/readyz", w.admin))
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(true)
        },
    )
    .await;
    if opened {
        // sled may still write into space its files already hold: whatever it acknowledges is
        // durable and counted; it must run into a 507 again soon.
        fill_until_507(&w, &fs, &mut next, &mut acked).await;
    }
    assert!(
        w.try_wait().is_none(),
        "the worker gave up on a full disk:\n{}",
        w.log()
    );
    assert!(
        moved_aside(&data_dir).is_empty(),
        "a full disk must never move the store aside: {:?}",
        moved_aside(&data_dir)
    );
    std::fs::remove_file(&ballast_rest).unwrap();
    std::fs::remove_file(&ballast).unwrap();
    wait_accepting(
        &w,
        &mut next,
        &mut acked,
        "ingest to resume once space is freed",
    )
    .await;
    assert!(moved_aside(&data_dir).is_empty());

    // 4. The link returns: Flux gets every acknowledged value.
    sim.set_faults(Faults::default());
    poll(Duration::from_secs(120), "the outbox to drain", || async {
        let (pending, log) = w.backlog().await;
        (pending == 0 && log == 0).then_some(())
    })
    .await;
    let state = sim.entities();
    let missing: Vec<_> = acked
        .iter()
        .filter(|((e, p), v)| state.get(e).and_then(|props| props.get(p)) != Some(v))
        .map(|((e, p), _)| format!("{e} {p}"))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged keys missing in Flux, e.g. {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );
    w.stop().await;
}

fn remount(fs: &Tmpfs, opt: &str) {
    let st = Command::new("mount")
        .args(["-o", &format!("remount,{opt}")])
        .arg(fs.path())
        .status()
        .expect("run mount");
    assert!(st.success(), "mount -o remount,{opt} failed");
}

/// A store that cannot be opened for a reason of its surroundings (here a read-only
/// filesystem, which fails sled's open every time) is waited for, never moved aside as
/// corrupt, and opens with everything in it once the filesystem is writable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_store_is_waited_for_never_moved_aside() {
    let fs = match Tmpfs::mount(32) {
        Ok(fs) => fs,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let mut w = Worker::new(None);
    let data_dir = fs.path().join("data");
    w.settings
        .set("data_dir", &toml_str(&data_dir.display().to_string()));
    w.start().await;
    let (body, _) = request(0, 300, 50);
    let (s, text) = w
        .try_post("/v1/updates", "application/x-ndjson", body, None)
        .await
        .unwrap();
    assert_eq!(s, 200, "{text}");
    w.wait_compacted().await;
    w.stop().await;

    remount(&fs, "ro");
    w.spawn();
    poll(
        DEADLINE,
        "the worker to say it cannot open the store now",
        || async {
            w.log()
                .contains("THE STORE CANNOT BE OPENED NOW")
                .then_some(())
        },
    )
    .await;
    // Still waiting a few retries later: alive, not ready, nothing moved.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(w.try_wait().is_none(), "the worker gave up:\n{}", w.log());
    let ready = w
        .http
        .get(format!("{}/readyz", w.admin))
        .send()
        .await
        .map(|r| r.status() == 200)
        .unwrap_or(false);
    assert!(!ready, "ready without a store");
    assert!(
        moved_aside(&data_dir).is_empty(),
        "{:?}",
        moved_aside(&data_dir)
    );

    remount(&fs, "rw");
    poll(
        Duration::from_secs(60),
        "the worker to open the store",
        || async {
            let r = w
                .http
                .get(format!("{}/readyz", w.admin))
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(())
        },
    )
    .await;
    assert_eq!(w.summary().await["pending_keys"], json!(300));
    assert!(moved_aside(&data_dir).is_empty());
    w.stop().await;
}
