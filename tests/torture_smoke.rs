//! A short run of `tools/torture` in `cargo test`: the real worker binary, SIGKILLed and
//! restarted at every kind of moment against a faulty flux-sim, then the oracle (nothing
//! acknowledged lost, nothing rolled back, quarantine only what flux-sim rejected, the store
//! verifies). Long runs are commands in docs/RELIABILITY.md; `TORTURE_ROUNDS` and `TORTURE_SEED`
//! lengthen or reproduce this one.

use std::process::Command;

#[test]
fn torture_rounds_lose_nothing_and_roll_nothing_back() {
    let rounds = std::env::var("TORTURE_ROUNDS").unwrap_or_else(|_| "8".into());
    // A new seed every run widens what CI covers; the seed is printed for reproduction.
    let seed = std::env::var("TORTURE_SEED").unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000)
            .unwrap_or(1)
            .to_string()
    });
    let out = Command::new(env!("CARGO_BIN_EXE_torture"))
        .args(["--rounds", &rounds, "--seed", &seed, "--verbose"])
        .arg("--worker")
        .arg(env!("CARGO_BIN_EXE_flux-outbox"))
        .output()
        .expect("run torture");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}{stderr}");
    assert!(
        out.status.success(),
        "torture failed (seed {seed}, rounds {rounds}): {}\n{stdout}\n{stderr}",
        out.status
    );
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("torture: PASS"))
        .unwrap_or_else(|| panic!("no PASS summary line:\n{stdout}"));
    for want in [
        format!("rounds={rounds} "),
        format!("kills={rounds} "),
        " lost=0 ".to_string(),
        " rolled_back=0 ".to_string(),
        " foreign_writes=0 ".to_string(),
    ] {
        assert!(summary.contains(&want), "{want:?} not in {summary}");
    }
    let acked: u64 = summary
        .split_whitespace()
        .find_map(|w| w.strip_prefix("acknowledged="))
        .and_then(|n| n.parse().ok())
        .expect("acknowledged count");
    assert!(acked > 1_000, "the workload hardly ran: {summary}");
}
