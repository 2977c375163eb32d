//! Convergence survives a restart (durability contract 5): a write with an unknown outcome that
//! Flux applies late, after the newer value was delivered AND after the worker was killed, is
//! still repaired by the restarted worker. Found by `tools/torture`: the convergence memory
//! lived only in memory, so the late write left Flux holding the older value for good.

mod harness;

use std::time::Duration;

use flux_outbox::sim::{Faults, SimConfig};
use harness::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_write_landing_after_a_restart_is_repaired() {
    let sim = start_sim(SimConfig::default()).await;
    let mut w = Worker::new(Some(&sim.url()));
    // The convergence window (10 minutes, fixed) outlasts the test.
    w.start().await;
    let (e, p) = ("scada/conv/tr-1", "tag/TR-1.TEMPERATURE");

    // A: answered 500, but flux-sim applies it 8 s later (as Flux does when its log returns).
    sim.set_faults(Faults {
        error_500_rate: 1.0,
        late_apply_rate: 1.0,
        late_apply_delay_ms: 8_000,
        ..Faults::default()
    });
    let (s, body) = w
        .post_json(
            "/v1/updates",
            &json!({"entity": e, "properties": {p: "A"}, "ts": 1_000}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    poll(DEADLINE, "a late application to be scheduled", || async {
        (sim.stats().events_late_scheduled >= 1).then_some(())
    })
    .await;

    // Flux is healthy again: B, newer, is delivered and removed from pending.
    sim.set_faults(Faults::default());
    let (s, body) = w
        .post_json(
            "/v1/updates",
            &json!({"entity": e, "properties": {p: "B"}, "ts": 2_000}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    wait_value(&sim, e, p, &json!("B")).await;
    poll(DEADLINE, "the outbox to drain", || async {
        let (pending, log) = w.backlog().await;
        (pending == 0 && log == 0).then_some(())
    })
    .await;
    // The settle that removed B from pending reaches the disk with sled's next flush (every
    // 500 ms). Killing before it would bring B back as a pending key after the restart, a
    // different path (resend); this test is about a key that is no longer pending.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        sim.stats().events_applied_late,
        0,
        "the late write landed before the kill: the test did not set up its case"
    );

    // Killed before the late write lands: whatever it remembered in memory is gone.
    w.sigkill();
    w.start().await;

    poll(
        Duration::from_secs(30),
        "the late write of A to land",
        || async { (sim.stats().events_applied_late >= 1).then_some(()) },
    )
    .await;
    // The late write rolled Flux back to A; the restarted worker must put B back.
    wait_value(&sim, e, p, &json!("B")).await;
    let log = sim.applied_log();
    let last = log
        .iter()
        .rev()
        .find(|ev| ev.entity_id.as_deref() == Some(e))
        .expect("events of the entity");
    assert_eq!(last.properties[p], json!("B"), "{log:?}");
    assert!(
        !last.late,
        "the last write must be the repair, not the late one"
    );
    w.stop().await;
}
