//! Security defaults as tests (the rest live beside the feature they guard; docs/RELIABILITY.md
//! lists them all): the data directory is private, hostile JSON is refused without a memory
//! spike, and the Flux token never shows in outbox-dump's output, live or offline.

mod harness;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use flux_outbox::sim::SimConfig;
use harness::*;
use serde_json::json;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_is_private() {
    // Created by the worker, several levels deep: 0700.
    let mut w = Worker::new(None);
    let data = w.dir.path().join("deep/er/data");
    w.settings
        .set("data_dir", &toml_str(&data.display().to_string()));
    w.start().await;
    assert_eq!(mode(&data), 0o700);
    w.stop().await;

    // Already there and readable by others: tightened to 0700 at start.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    w.start().await;
    assert_eq!(mode(&data), 0o700);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_json_is_refused_without_a_memory_spike() {
    let mut w = Worker::new(None);
    w.start().await;
    let pid = w.pid();
    let before = rss_kib(pid);
    // 4 MiB of nesting: refused by a byte scan before any JSON tree is built.
    let deep = "[".repeat(4 << 20);
    for (ct, body) in [
        (
            "application/json",
            format!("{{\"entity\":\"a/b\",\"properties\":{{\"v\":{deep}}}}}"),
        ),
        ("application/x-ndjson", format!("{deep}\n")),
    ] {
        let (s, text) = w.post("/v1/updates", ct, body).await;
        assert_eq!(s, 400, "{text}");
        assert!(error_text(&text).contains("nested deeper than"), "{text}");
    }
    let (s, text) = w
        .post(
            "/api/events/batch",
            "application/json",
            format!("{{\"events\":{deep}}}"),
        )
        .await;
    assert_eq!(s, 400, "{text}");
    // A million tiny array elements inside the body limit: refused as a value too large for
    // Flux, or parsed and refused; either way no blow-up.
    let wide = format!(
        "{{\"entity\":\"a/b\",\"properties\":{{\"v\":[{}0]}}}}",
        "0,".repeat(1_000_000)
    );
    let (s, _) = w.post("/v1/updates", "application/json", wide).await;
    assert!(s == 400 || s == 413, "{s}");
    // The worker's allocator (jemalloc, src/main.rs) hands freed pages back to the system from
    // a background thread after `dirty_decay_ms` (1 s), not at the free: what is measured is
    // that nothing stays, so allow it a few decay periods.
    let t0 = std::time::Instant::now();
    let mut after = rss_kib(pid);
    while after >= before + 64 * 1024 && t0.elapsed() < std::time::Duration::from_secs(5) {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        after = rss_kib(pid);
    }
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} KiB to {after} KiB on hostile input and stayed there for 5 s"
    );
    assert!(w.try_wait().is_none());
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flux_token_never_reaches_outbox_dump_output() {
    let token = "flux-secret-token-9d1f3b7c";
    let sim = start_sim(SimConfig::default()).await;
    sim.set_faults(link_down());
    let mut w = Worker::new(Some(&sim.url()));
    w.settings.set("flux.auth_token", &toml_str(token));
    w.start().await;
    let (s, _) = w
        .post_json(
            "/v1/updates",
            &json!({"entity": "scada/sec/a", "properties": {"v": 1}}),
        )
        .await;
    assert_eq!(s, 200);
    w.wait_compacted().await;
    let dump = env!("CARGO_BIN_EXE_outbox-dump");
    let run = |args: &[&str]| {
        let mut cmd = Command::new(dump);
        clean_env(&mut cmd);
        let out = cmd.args(args).output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let cfg = w.config_path().display().to_string();
    let mut seen = String::new();
    // Live (the config file holds the token; the tool reads it to find the admin API).
    for cmd in [
        "summary",
        "pending",
        "quarantine",
        "log",
        "verify",
        "export",
    ] {
        for format in ["table", "json"] {
            let out = run(&["--config", &cfg, "--format", format, cmd]);
            assert!(!out.contains("panicked"), "{out}");
            seen.push_str(&out);
        }
    }
    assert!(
        seen.contains("scada/sec/a"),
        "the live dump saw nothing:\n{seen}"
    );
    w.stop().await;
    // Offline, on the same store and config.
    let data = w.dir.path().join("data").display().to_string();
    for cmd in ["summary", "pending", "verify", "export"] {
        seen.push_str(&run(&["--data-dir", &data, "--format", "json", cmd]));
        seen.push_str(&run(&["--config", &cfg, "--format", "json", cmd]));
    }
    assert!(!seen.contains(token), "the Flux token leaked:\n{seen}");
    assert!(
        !seen.contains("9d1f3b7c"),
        "part of the Flux token leaked:\n{seen}"
    );
}
