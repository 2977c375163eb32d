//! Bad input against the real daemon, one test per class: the status, a message that names the
//! item (or NDJSON line) and the reason, the rejected-by-reason counter, and that nothing of the
//! refused request was stored (after a later valid update is delivered and the outbox drained,
//! flux-sim has never seen any entity of the refused request).

mod harness;

use std::io::{Read, Write};

use flux_outbox::sim::{Faults, SimConfig, SimHandle};
use harness::*;
use serde_json::{json, Value};

/// A worker delivering to its own flux-sim.
async fn setup(configure: impl FnOnce(&mut Settings)) -> (SimHandle, Worker) {
    let sim = start_sim(SimConfig::default()).await;
    let mut settings = Settings::new(Some(&sim.url()));
    configure(&mut settings);
    let mut w = Worker::with_settings(settings);
    w.start().await;
    (sim, w)
}

/// Posts a request that must be refused with `status`, counted under `reason`, with a JSON error
/// whose text contains every one of `needles`. Returns the error text.
async fn refused(
    w: &Worker,
    path: &str,
    content_type: &str,
    body: impl Into<String>,
    status: u16,
    reason: &str,
    needles: &[&str],
) -> String {
    let before = rejected(&w.metrics().await, reason);
    let (s, answer) = w.post(path, content_type, body).await;
    assert_eq!(s, status, "{path}: {answer}");
    let text = error_text(&answer);
    for n in needles {
        assert!(
            text.contains(n),
            "{path}: the message must contain {n:?}: {text}"
        );
    }
    let after = rejected(&w.metrics().await, reason);
    assert_eq!(
        after,
        before + 1.0,
        "rejected{{reason={reason:?}}} must count it"
    );
    text
}

/// Proves that nothing of the refused requests was stored: a valid marker update is delivered,
/// the outbox drains, and flux-sim never saw any of `entities`.
async fn nothing_stored(w: &Worker, sim: &SimHandle, entities: &[&str]) {
    let marker = json!({"entity": "scada/marker", "properties": {"m": 1}});
    let (s, body) = w.post_json("/v1/updates", &marker).await;
    assert_eq!(s, 200, "{body}");
    wait_value(sim, "scada/marker", "m", &json!(1)).await;
    w.wait_drained().await;
    let state = sim.entities();
    let log = sim.applied_log();
    for e in entities {
        assert!(
            !state.contains_key(*e),
            "{e} of a refused request reached flux-sim"
        );
        assert!(
            log.iter().all(|ev| ev.entity_id.as_deref() != Some(*e)),
            "{e} of a refused request was sent to flux-sim"
        );
    }
}

/// Posts `body` to `path`, which must be refused with 507 (outbox full) and counted: the
/// `outbox_full` rejections are `counted_total` after. Returns the error answer.
async fn refused_full(w: &Worker, path: &str, body: &Value, counted_total: f64) -> String {
    let (s, answer) = w.post_json(path, body).await;
    assert_eq!(s, 507, "{answer}");
    assert_eq!(rejected(&w.metrics().await, "outbox_full"), counted_total);
    answer
}

fn ndjson(lines: &[Value]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

const NDJSON: &str = "application/x-ndjson";
const JSON: &str = "application/json";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_json() {
    let (sim, mut w) = setup(|_| {}).await;
    let body = r#"[{"entity": "scada/bj/a", "properties": {"v": 1}}, {"entity": "scada/bj/b", "properties": {"v": "#;
    refused(
        &w,
        "/v1/updates",
        JSON,
        body,
        400,
        "invalid_json",
        &["invalid JSON", "line 1 column"],
    )
    .await;
    let body = format!(
        "{}\n{{\"entity\": \"scada/bj/d\", \"properties\": {{\"v\": }}}}\n",
        json!({"entity": "scada/bj/c", "properties": {"v": 1}})
    );
    refused(
        &w,
        "/v1/updates",
        NDJSON,
        body,
        400,
        "invalid_json",
        &["line 2", "invalid JSON"],
    )
    .await;
    // Two documents without the NDJSON content type: the answer says what to do.
    let body = ndjson(&[
        json!({"entity": "scada/bj/e", "properties": {"v": 1}}),
        json!({"entity": "scada/bj/f", "properties": {"v": 1}}),
    ]);
    refused(
        &w,
        "/v1/updates",
        JSON,
        body,
        400,
        "invalid_json",
        &["application/x-ndjson"],
    )
    .await;
    let body = format!(
        "{{\"events\": [{}, {{\"stream\": ",
        flux_event("scada/bj/g", json!({"v": 1}))
    );
    refused(
        &w,
        "/api/events/batch",
        JSON,
        body,
        400,
        "invalid_json",
        &["invalid JSON"],
    )
    .await;
    refused(
        &w,
        "/api/events",
        JSON,
        "{",
        400,
        "invalid_json",
        &["invalid JSON"],
    )
    .await;
    nothing_stored(
        &w,
        &sim,
        &[
            "scada/bj/a",
            "scada/bj/b",
            "scada/bj/c",
            "scada/bj/d",
            "scada/bj/e",
            "scada/bj/g",
        ],
    )
    .await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_entity() {
    let (sim, mut w) = setup(|_| {}).await;
    let body = json!([
        {"entity": "scada/me/a", "properties": {"v": 1}},
        {"properties": {"v": 2}},
    ]);
    refused(
        &w,
        "/v1/updates",
        JSON,
        body.to_string(),
        400,
        "missing_field",
        &["item 1", "\"entity\" is required"],
    )
    .await;
    let mut no_id = flux_event("x", json!({"v": 2}));
    no_id["payload"]
        .as_object_mut()
        .unwrap()
        .remove("entity_id");
    let body = json!({"events": [flux_event("scada/me/b", json!({"v": 1})), no_id]});
    refused(
        &w,
        "/api/events/batch",
        JSON,
        body.to_string(),
        400,
        "missing_field",
        &["item 1", "entity_id"],
    )
    .await;
    nothing_stored(&w, &sim, &["scada/me/a", "scada/me/b"]).await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_not_an_object() {
    let (sim, mut w) = setup(|_| {}).await;
    let body = json!([
        {"entity": "scada/po/a", "properties": {"v": 1}},
        {"entity": "scada/po/b", "properties": [1, 2]},
    ]);
    refused(
        &w,
        "/v1/updates",
        JSON,
        body.to_string(),
        400,
        "properties_not_object",
        &["item 1", "properties must be a JSON object", "an array"],
    )
    .await;
    let body = ndjson(&[
        json!({"entity": "scada/po/c", "properties": {"v": 1}}),
        json!({"entity": "scada/po/d", "properties": "v=1"}),
    ]);
    refused(
        &w,
        "/v1/updates",
        NDJSON,
        body,
        400,
        "properties_not_object",
        &["line 2", "properties must be a JSON object"],
    )
    .await;
    let body = json!({"events": [flux_event("scada/po/e", json!({"v": 1})), flux_event("scada/po/f", json!(5))]});
    refused(
        &w,
        "/api/events/batch",
        JSON,
        body.to_string(),
        400,
        "properties_not_object",
        &["item 1", "must be a JSON object"],
    )
    .await;
    nothing_stored(
        &w,
        &sim,
        &["scada/po/a", "scada/po/b", "scada/po/c", "scada/po/e"],
    )
    .await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_property_name() {
    let (sim, mut w) = setup(|_| {}).await;
    // Line 2 is blank: the line number counts it, the item index does not.
    let body = format!(
        "{}\n\n{}\n",
        json!({"entity": "scada/ep/a", "properties": {"v": 1}}),
        json!({"entity": "scada/ep/b", "properties": {"": 1}}),
    );
    refused(
        &w,
        "/v1/updates",
        NDJSON,
        body,
        400,
        "empty_property",
        &["line 3", "property name must not be empty"],
    )
    .await;
    let body = json!({"events": [flux_event("scada/ep/c", json!({"v": 1})), flux_event("scada/ep/d", json!({"": 1}))]});
    refused(
        &w,
        "/api/events/batch",
        JSON,
        body.to_string(),
        400,
        "empty_property",
        &["item 1", "must not be empty"],
    )
    .await;
    nothing_stored(&w, &sim, &["scada/ep/a", "scada/ep/b", "scada/ep/c"]).await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_marker_as_property() {
    let (sim, mut w) = setup(|_| {}).await;
    let body = json!([
        {"entity": "scada/dm/a", "properties": {"v": 1}},
        {"entity": "scada/dm/b", "properties": {"__deleted__": true}},
    ]);
    refused(
        &w,
        "/v1/updates",
        JSON,
        body.to_string(),
        400,
        "reserved_property",
        &["item 1", "__deleted__", "\"delete\": true"],
    )
    .await;
    // Flux's shape: alone and true it is a delete; mixed with other properties it is refused.
    let body = json!({"events": [
        flux_event("scada/dm/c", json!({"v": 1})),
        flux_event("scada/dm/d", json!({"__deleted__": true, "v": 2})),
    ]});
    refused(
        &w,
        "/api/events/batch",
        JSON,
        body.to_string(),
        400,
        "reserved_property",
        &["item 1", "__deleted__", "alone"],
    )
    .await;
    let body = flux_event("scada/dm/e", json!({"__deleted__": false}));
    refused(
        &w,
        "/api/events",
        JSON,
        body.to_string(),
        400,
        "reserved_property",
        &["__deleted__"],
    )
    .await;
    nothing_stored(
        &w,
        &sim,
        &[
            "scada/dm/a",
            "scada/dm/b",
            "scada/dm/c",
            "scada/dm/d",
            "scada/dm/e",
        ],
    )
    .await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_property() {
    let (sim, mut w) = setup(|_| {}).await;
    let body = json!([
        {"entity": "scada/pp/a", "properties": {"v": 1}},
        {"entity": "scada/pp/b", "properties": {"v": 1, "command": "open"}},
    ]);
    refused(
        &w,
        "/v1/updates",
        JSON,
        body.to_string(),
        400,
        "protected_property",
        &["item 1", "\"command\"", "protected"],
    )
    .await;
    let body = json!({"events": [flux_event("scada/pp/c", json!({"v": 1})), flux_event("scada/pp/d", json!({"cmd_id": "c-1"}))]});
    refused(
        &w,
        "/api/events/batch",
        JSON,
        body.to_string(),
        400,
        "protected_property",
        &["item 1", "\"cmd_id\"", "protected"],
    )
    .await;
    nothing_stored(
        &w,
        &sim,
        &["scada/pp/a", "scada/pp/b", "scada/pp/c", "scada/pp/d"],
    )
    .await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entity_id_flux_would_refuse() {
    let (sim, mut w) = setup(|s| {
        s.set("ingest.public_mode", "true");
    })
    .await;
    let body = json!([
        {"entity": "scada/ok-1", "properties": {"v": 1}},
        {"entity": "scada/asset/tr-1", "properties": {"v": 1}},
    ]);
    refused(
        &w,
        "/v1/updates",
        JSON,
        body.to_string(),
        400,
        "entity_not_public_form",
        &["item 1", "scada/asset/tr-1", "one slash"],
    )
    .await;
    let body = ndjson(&[
        json!({"entity": "scada/ok-2", "properties": {"v": 1}}),
        json!({"entity": "scada/tr\u{7}1", "properties": {"v": 1}}),
    ]);
    refused(
        &w,
        "/v1/updates",
        NDJSON,
        body,
        400,
        "entity_bad_char",
        &["line 2", "control character"],
    )
    .await;
    let body = json!({"events": [flux_event("scada/ok-3", json!({"v": 1})), flux_event("no-namespace", json!({"v": 1}))]});
    refused(
        &w,
        "/api/events/batch",
        JSON,
        body.to_string(),
        400,
        "entity_not_public_form",
        &["item 1", "no-namespace"],
    )
    .await;
    nothing_stored(&w, &sim, &["scada/ok-1", "scada/ok-2", "scada/ok-3"]).await;
    w.stop().await;
}

/// Without public mode Flux still refuses an empty id, an id over 512 bytes and an id with a
/// control character (validate.rs): refused at ingest on every API; the public-mode form rule
/// (`namespace/rest`) does not apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entity_id_flux_would_refuse_without_public_mode() {
    let (sim, mut w) = setup(|_| {}).await;
    let long = format!("scada/{}", "x".repeat(507));
    assert_eq!(long.len(), 513);
    // (path, content type, body, reason, what the message must contain), all refused with 400.
    let cases = [
        (
            "/v1/updates",
            JSON,
            json!([
                {"entity": "scada/np/a", "properties": {"v": 1}},
                {"entity": "", "properties": {"v": 1}},
            ])
            .to_string(),
            "empty_entity",
            &["item 1: entity id must not be empty"][..],
        ),
        (
            "/v1/updates",
            NDJSON,
            ndjson(&[
                json!({"entity": "scada/np/b", "properties": {"v": 1}}),
                json!({"entity": long, "properties": {"v": 1}}),
            ]),
            "entity_too_long",
            &["line 2: entity id ", "is 513 bytes, at most 512 allowed"][..],
        ),
        (
            "/api/events/batch",
            JSON,
            json!({"events": [
                flux_event("scada/np/c", json!({"v": 1})),
                flux_event("scada/np\td", json!({"v": 1})),
            ]})
            .to_string(),
            "entity_bad_char",
            &["item 1: entity id \"scada/np\\td\" contains a control character"][..],
        ),
        (
            "/api/events",
            JSON,
            flux_event("", json!({"v": 1})).to_string(),
            "empty_entity",
            &["entity id must not be empty"][..],
        ),
    ];
    for (path, content_type, body, reason, needles) in cases {
        refused(&w, path, content_type, body, 400, reason, needles).await;
    }
    // Exactly 512 bytes and ids public mode would refuse are accepted and delivered.
    let longest = format!("scada/{}", "y".repeat(506));
    for id in [longest.as_str(), "no-slash", "scada/two/slashes"] {
        let (s, body) = w
            .post_json(
                "/v1/updates",
                &json!({"entity": id, "properties": {"v": 2}}),
            )
            .await;
        assert_eq!(s, 200, "{id}: {body}");
        wait_value(&sim, id, "v", &json!(2)).await;
    }
    nothing_stored(&w, &sim, &["", "scada/np/a", "scada/np/b", "scada/np/c"]).await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn value_over_flux_event_limit() {
    let (sim, mut w) = setup(|_| {}).await;
    let blob = "x".repeat(1_000_000);
    let body = json!([
        {"entity": "scada/vl/a", "properties": {"v": 1}},
        {"entity": "scada/vl/b", "properties": {"small": 1, "blob": blob}},
    ]);
    refused(
        &w,
        "/v1/updates",
        JSON,
        body.to_string(),
        400,
        "value_too_large",
        &["item 1", "scada/vl/b", "\"blob\"", "limit"],
    )
    .await;
    let body = flux_event("scada/vl/c", json!({ "blob": blob }));
    refused(
        &w,
        "/api/events",
        JSON,
        body.to_string(),
        400,
        "value_too_large",
        &["\"blob\""],
    )
    .await;
    // Well under the limit is fine (and delivered).
    let ok = "y".repeat(900_000);
    let (s, body) = w
        .post_json(
            "/v1/updates",
            &json!({"entity": "scada/vl/ok", "properties": {"blob": ok}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    wait_value(&sim, "scada/vl/ok", "blob", &json!(ok)).await;
    nothing_stored(&w, &sim, &["scada/vl/a", "scada/vl/b", "scada/vl/c"]).await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_limit_is_413() {
    let (sim, mut w) = setup(|s| {
        s.set("ingest.body_bytes_max", "\"4KiB\"");
    })
    .await;
    let lines: Vec<Value> = (0..100)
        .map(|i| json!({"entity": format!("scada/bl/e{i}"), "properties": {"v": i}}))
        .collect();
    let big = ndjson(&lines);
    assert!(big.len() > 4096);
    let text = refused(
        &w,
        "/v1/updates",
        NDJSON,
        big,
        413,
        "body_too_large",
        &["4096"],
    )
    .await;
    assert!(text.contains("limit"), "{text}");
    let events: Vec<Value> = (0..60)
        .map(|i| flux_event(&format!("scada/bl/f{i}"), json!({"v": i})))
        .collect();
    refused(
        &w,
        "/api/events/batch",
        JSON,
        json!({ "events": events }).to_string(),
        413,
        "body_too_large",
        &["4096"],
    )
    .await;
    // Just under the limit is accepted.
    let small = ndjson(&lines[..20]);
    assert!(small.len() < 4096);
    let (s, body) = w.post("/v1/updates", NDJSON, small).await;
    assert_eq!(s, 200, "{body}");
    wait_value(&sim, "scada/bl/e19", "v", &json!(19)).await;
    w.wait_drained().await;
    let state = sim.entities();
    assert_eq!(
        state.len(),
        20,
        "only the accepted request was delivered: {:?}",
        state.keys()
    );
    assert!(sim.applied_log().iter().all(|e| !e
        .entity_id
        .as_deref()
        .unwrap_or("")
        .starts_with("scada/bl/f")));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_token_required_when_configured() {
    let (sim, mut w) = setup(|s| {
        s.set("ingest.token", &toml_str("ingest-tok-1"));
    })
    .await;
    let update = json!({"entity": "scada/it/a", "properties": {"v": 1}}).to_string();
    for token in [None, Some("wrong"), Some("ingest-tok-1x"), Some("")] {
        let before = rejected(&w.metrics().await, "unauthorized");
        let (s, body) = w
            .try_post("/v1/updates", JSON, update.clone(), token)
            .await
            .unwrap();
        assert_eq!(s, 401, "token {token:?}: {body}");
        assert!(error_text(&body).contains("ingest token"), "{body}");
        assert!(!body.contains("ingest-tok-1"), "{body}");
        assert_eq!(rejected(&w.metrics().await, "unauthorized"), before + 1.0);
    }
    let event = flux_event("scada/it/b", json!({"v": 1})).to_string();
    let (s, body) = w
        .try_post("/api/events", JSON, event.clone(), None)
        .await
        .unwrap();
    assert_eq!(s, 401, "{body}");
    let batch = json!({ "events": [flux_event("scada/it/b", json!({"v": 1}))] }).to_string();
    let (s, body) = w
        .try_post("/api/events/batch", JSON, batch, Some("nope"))
        .await
        .unwrap();
    assert_eq!(s, 401, "{body}");
    nothing_stored_with_token(&w, &sim, "ingest-tok-1", &["scada/it/a", "scada/it/b"]).await;

    // With the token: accepted and delivered.
    let (s, body) = w
        .try_post("/v1/updates", JSON, update, Some("ingest-tok-1"))
        .await
        .unwrap();
    assert_eq!(s, 200, "{body}");
    let (s, body) = w
        .try_post("/api/events", JSON, event, Some("ingest-tok-1"))
        .await
        .unwrap();
    assert_eq!(s, 200, "{body}");
    // The scheme name is case-insensitive.
    let r = w
        .http
        .post(format!("{}/v1/updates", w.ingest))
        .header("authorization", "bearer ingest-tok-1")
        .header("content-type", JSON)
        .body(json!({"entity": "scada/it/c", "properties": {"v": 3}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A missing token is refused before the body is read: 401, not 413, for a huge body.
    let huge = "x".repeat(20 * 1024 * 1024);
    let m = w.metrics().await;
    let (before, before_401) = (rejected(&m, "body_too_large"), rejected(&m, "unauthorized"));
    match w.try_post("/v1/updates", JSON, huge, None).await {
        Ok((s, body)) => assert_eq!(s, 401, "{body}"),
        // The worker may answer and close before taking the whole body.
        Err(e) => eprintln!("huge unauthenticated body: {e}"),
    }
    let m = w.metrics().await;
    assert_eq!(rejected(&m, "body_too_large"), before);
    assert_eq!(rejected(&m, "unauthorized"), before_401 + 1.0);
    wait_value(&sim, "scada/it/a", "v", &json!(1)).await;
    wait_value(&sim, "scada/it/b", "v", &json!(1)).await;
    wait_value(&sim, "scada/it/c", "v", &json!(3)).await;
    w.stop().await;
}

async fn nothing_stored_with_token(w: &Worker, sim: &SimHandle, token: &str, entities: &[&str]) {
    let marker = json!({"entity": "scada/marker", "properties": {"m": 1}}).to_string();
    let (s, body) = w
        .try_post("/v1/updates", JSON, marker, Some(token))
        .await
        .unwrap();
    assert_eq!(s, 200, "{body}");
    wait_value(sim, "scada/marker", "m", &json!(1)).await;
    w.wait_drained().await;
    for e in entities {
        assert!(
            sim.entity(e).is_none(),
            "{e} of a refused request reached flux-sim"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_full_refuses_new_keys_only() {
    let (sim, mut w) = setup(|s| {
        s.set("store.pending_keys_max", "2");
    })
    .await;
    sim.set_faults(link_down());
    let (s, body) = w
        .post_json(
            "/v1/updates",
            &json!({"entity": "scada/of/a", "properties": {"p1": 1, "p2": 2}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    w.wait_compacted().await;
    assert_eq!(w.backlog().await, (2, 0));

    let before = rejected(&w.metrics().await, "outbox_full");
    let body = json!([
        {"entity": "scada/of/a", "properties": {"p1": 5}},
        {"entity": "scada/of/b", "properties": {"q": 1}},
    ]);
    let answer = refused_full(&w, "/v1/updates", &body, before + 2.0).await;
    // Flux's error shape on both APIs, the same words: what is full, the limit, what still goes.
    let full = json!({"error": "outbox full: 2 pending keys (limit 2); updates of keys already pending are still accepted"});
    assert_eq!(
        serde_json::from_str::<Value>(&answer).ok(),
        Some(full.clone())
    );
    let body = flux_event("scada/of/c", json!({"q": 1}));
    let answer = refused_full(&w, "/api/events", &body, before + 3.0).await;
    assert_eq!(serde_json::from_str::<Value>(&answer).ok(), Some(full));
    assert_eq!(
        w.backlog().await,
        (2, 0),
        "nothing of a refused request is stored"
    );

    // Updates to keys already pending still go in: they cannot grow the outbox.
    let (s, body) = w
        .post_json(
            "/v1/updates",
            &json!({"entity": "scada/of/a", "properties": {"p1": 10}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = w
        .post_json("/api/events", &flux_event("scada/of/a", json!({"p2": 20})))
        .await;
    assert_eq!(s, 200, "{body}");
    w.wait_compacted().await;
    assert_eq!(w.backlog().await, (2, 0));

    // The accepted updates are delivered once the link is back; the refused ones never are.
    sim.set_faults(Faults::default());
    wait_value(&sim, "scada/of/a", "p1", &json!(10)).await;
    wait_value(&sim, "scada/of/a", "p2", &json!(20)).await;
    w.wait_drained().await;
    assert!(sim.entity("scada/of/b").is_none());
    assert!(sim.entity("scada/of/c").is_none());
    // Drained, there is room again, in the same running worker (no restart).
    let (s, body) = w
        .post_json(
            "/v1/updates",
            &json!({"entity": "scada/of/b", "properties": {"q": 2}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    wait_value(&sim, "scada/of/b", "q", &json!(2)).await;
    w.stop().await;
}

/// Regression (the store's admission count once kept phantom keys when the compactor folded a
/// group commit before the writer counted it): a running worker at its key limit accepts new
/// keys again every time the outbox drains, over many rounds of concurrent requests, while the
/// limit itself still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_worker_accepts_new_keys_after_draining() {
    const LIMIT: usize = 4;
    let (sim, w) = setup(|s| {
        s.set("store.pending_keys_max", &LIMIT.to_string());
        s.set("heartbeat.enabled", "false");
    })
    .await;
    let http = reqwest::Client::new();
    for round in 0..12 {
        // LIMIT new keys at once, in separate requests (one commit group or several).
        let posts: Vec<_> = (0..LIMIT)
            .map(|i| {
                let req = http
                    .post(format!("{}/v1/updates", w.ingest))
                    .header("content-type", JSON)
                    .body(
                        json!({"entity": format!("scada/rd/r{round}-{i}"), "properties": {"v": round}})
                            .to_string(),
                    );
                tokio::spawn(async move {
                    let r = req.send().await.unwrap();
                    (r.status().as_u16(), r.text().await.unwrap())
                })
            })
            .collect();
        for p in posts {
            let (s, body) = p.await.unwrap();
            assert_eq!(
                s, 200,
                "round {round}: new keys refused on a drained outbox: {body}"
            );
        }
        for i in 0..LIMIT {
            wait_value(&sim, &format!("scada/rd/r{round}-{i}"), "v", &json!(round)).await;
        }
        w.wait_drained().await;
    }
    // The limit still holds: with the link down, LIMIT keys fill it and one more is refused.
    sim.set_faults(link_down());
    let fill: Vec<Value> = (0..LIMIT)
        .map(|i| json!({"entity": format!("scada/rd/full-{i}"), "properties": {"v": 1}}))
        .collect();
    let (s, body) = w.post_json("/v1/updates", &Value::Array(fill)).await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = w
        .post_json(
            "/v1/updates",
            &json!({"entity": "scada/rd/one-more", "properties": {"v": 1}}),
        )
        .await;
    assert_eq!(s, 507, "{body}");
    sim.set_faults(Faults::default());
    w.wait_drained().await;
    let (s, body) = w
        .post_json(
            "/v1/updates",
            &json!({"entity": "scada/rd/one-more", "properties": {"v": 2}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    wait_value(&sim, "scada/rd/one-more", "v", &json!(2)).await;
    let mut w = w;
    w.stop().await;
}

/// `store.disk_bytes_max`: once the store uses that much disk, new keys get 507 naming the
/// disk limit (counted as outbox_full) and nothing of the request is stored; updates of keys
/// already pending still go in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_limit_refuses_new_keys_with_507() {
    let (sim, mut w) = setup(|s| {
        s.set("store.disk_bytes_max", "\"1MiB\"");
        s.set("heartbeat.enabled", "false");
    })
    .await;
    sim.set_faults(link_down());
    // Grow the store past 1 MiB with one pending key (values of about 200 KB, each replacing
    // the previous one), unless it is that big already.
    let big = "x".repeat(200_000);
    let mut i = 0;
    poll(DEADLINE, "the store to use 1 MiB of disk", || {
        i += 1;
        let body = json!({"entity": "scada/dl/a", "properties": {"blob": format!("{i}{big}")}});
        let w = &w;
        async move {
            let m = w.metrics().await;
            if metric(&m, "flux_outbox_disk_bytes") >= 1_048_576.0 {
                return Some(());
            }
            let (s, answer) = w.post_json("/v1/updates", &body).await;
            // A key already pending is accepted even over the limit.
            assert_eq!(s, 200, "{answer}");
            None
        }
    })
    .await;
    w.wait_compacted().await;
    assert_eq!(w.backlog().await, (1, 0));

    let before = rejected(&w.metrics().await, "outbox_full");
    let body = json!([
        {"entity": "scada/dl/a", "properties": {"blob": "small"}},
        {"entity": "scada/dl/b", "properties": {"v": 1}},
    ]);
    let text = error_text(&refused_full(&w, "/v1/updates", &body, before + 2.0).await);
    assert!(
        text.contains("bytes on disk") && text.contains("limit 1048576"),
        "{text}"
    );
    let body = flux_event("scada/dl/c", json!({"v": 1}));
    let text = error_text(&refused_full(&w, "/api/events", &body, before + 3.0).await);
    assert!(
        text.starts_with("outbox full: ")
            && text.ends_with(
                " bytes on disk (limit 1048576); updates of keys already pending are still accepted"
            ),
        "{text}"
    );
    w.wait_compacted().await;
    assert_eq!(
        w.backlog().await,
        (1, 0),
        "nothing of a refused request is stored"
    );
    // An update of the pending key is still accepted.
    let (s, body) = w
        .post_json(
            "/v1/updates",
            &json!({"entity": "scada/dl/a", "properties": {"blob": "last"}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");

    // Proof on the Flux side, with room again: the refused entities never arrive.
    w.stop().await;
    w.settings.set("store.disk_bytes_max", "\"4GiB\"");
    sim.set_faults(Faults::default());
    w.start().await;
    wait_value(&sim, "scada/dl/a", "blob", &json!("last")).await;
    nothing_stored(&w, &sim, &["scada/dl/b", "scada/dl/c"]).await;
    w.stop().await;
}

/// A request whose body is still arriving when SIGTERM comes is answered 503 (not stored), and
/// the worker still exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_down_is_503() {
    let (sim, mut w) = setup(|_| {}).await;
    let body = json!({"entity": "scada/sd/a", "properties": {"v": 1}}).to_string();
    let addr = w.ingest.trim_start_matches("http://").to_string();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.set_read_timeout(Some(DEADLINE)).unwrap();
    let head = format!(
        "POST /v1/updates HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (first, rest) = body.split_at(10);
    conn.write_all(head.as_bytes()).unwrap();
    conn.write_all(first.as_bytes()).unwrap();
    conn.flush().unwrap();
    // The worker must be reading this request before the signal comes (a connection not yet
    // accepted would just be closed): the request counter moves once its headers are in.
    poll(
        DEADLINE,
        "the worker to read the request headers",
        || async {
            let m = w.metrics().await;
            (metric(&m, "flux_outbox_ingest_requests_total") >= 1.0).then_some(())
        },
    )
    .await;
    let before = rejected(&w.metrics().await, "shutting_down");
    assert_eq!(before, 0.0);
    w.sigterm();
    // The worker sets its shutting-down flag before it logs this line: no wait is needed.
    poll(DEADLINE, "the worker to start shutting down", || async {
        w.log().contains("shutting down").then_some(())
    })
    .await;
    conn.write_all(rest.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let json_body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    assert_eq!(
        error_text(json_body),
        "flux-outbox is shutting down; retry against the restarted worker",
        "{answer}"
    );
    let status = w.wait_exit(DEADLINE).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", w.log());
    // /metrics closes with the listeners, so the worker logs the final value of
    // flux_outbox_ingest_rejected_total{reason="shutting_down"}: this one refusal.
    assert!(
        w.log()
            .contains("listeners closed rejected_shutting_down=1"),
        "log:\n{}",
        w.log()
    );
    // New connections after exit fail: nothing can be acknowledged by a stopped worker.
    assert!(w
        .try_post("/v1/updates", JSON, body.clone(), None)
        .await
        .is_err());

    w.start().await;
    nothing_stored(&w, &sim, &["scada/sd/a"]).await;
    w.stop().await;
}
