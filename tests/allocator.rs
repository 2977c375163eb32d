//! The worker binary runs on jemalloc with the options baked into it (`src/main.rs`): a mass
//! drain's memory depends on them (BENCHMARKS.md, recovery). jemalloc prints its effective
//! options at exit when asked through the environment.

#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[test]
fn the_worker_runs_on_jemalloc_with_its_baked_in_options() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flux-outbox"))
        .arg("check-config")
        .env("_RJEM_MALLOC_CONF", "stats_print:true")
        .env_remove("FLUX_URL")
        .env_remove("FLUX_AUTH_TOKEN")
        .env_remove("FLUX_OUTBOX_DATA_DIR")
        .output()
        .expect("run flux-outbox");
    assert!(out.status.success(), "{out:?}");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "opt.narenas: 2\n",
        "opt.background_thread: true",
        "opt.dirty_decay_ms: 1000",
        "opt.muzzy_decay_ms: 0",
    ] {
        assert!(
            text.contains(want),
            "{want:?} not in jemalloc's statistics:\n{}",
            &text[..text.len().min(4000)]
        );
    }
}
