//! The Flux client against (1) every answer recorded from a real Flux server, fed to the pure
//! classifiers, and (2) tiny local HTTP servers on 127.0.0.1:0 for the HTTP paths: id encoding,
//! timeouts, resets, and the token never leaking.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use flux_outbox::flux_client::{
    classify_batch_answer, classify_single_answer, parse_entity_answer, parse_list_answer,
    parse_retry_after, BatchOutcome, ClientConfig, ClientError, EventOutcome, FluxClient,
    FluxEvent, ReadError, Secret,
};
use serde_json::{json, Value};

// -------------------------------------------------------------------------------------------
// Part 1: the recorded transcript

const TRANSCRIPT: &str = include_str!("data/flux-transcript.json");

/// What the classifier must say for a recorded case.
#[derive(Debug)]
enum Want {
    Write(BatchOutcome),
    Found { id: &'static str, properties: Value },
    NotFound,
    List { ids: &'static [&'static str] },
}

fn applied() -> EventOutcome {
    EventOutcome::Applied {
        event_id: "<uuid>".into(),
    }
}
fn per_event(v: Vec<EventOutcome>) -> Want {
    Want::Write(BatchOutcome::PerEvent(v))
}
fn invalid(reason: &str) -> EventOutcome {
    EventOutcome::Invalid {
        reason: reason.into(),
    }
}
fn auth_failed(reason: &str) -> EventOutcome {
    EventOutcome::AuthFailed {
        reason: reason.into(),
    }
}
fn unknown(reason: &str) -> EventOutcome {
    EventOutcome::Unknown {
        reason: reason.into(),
    }
}

fn expectations() -> BTreeMap<&'static str, Want> {
    let publish_failed = "publish failed: Failed to await publish ack";
    let mut m = BTreeMap::new();
    m.insert("single event accepted", per_event(vec![applied()]));
    m.insert(
        "single: missing timestamp",
        per_event(vec![invalid(
            "missing field `timestamp` at line 1 column 98",
        )]),
    );
    m.insert(
        "single: timestamp 0",
        per_event(vec![invalid("timestamp must be positive, got 0")]),
    );
    m.insert(
        "single: float timestamp",
        per_event(vec![invalid(
            "invalid type: floating point `1.5`, expected i64 at line 1 column 54",
        )]),
    );
    m.insert(
        "single: string timestamp",
        per_event(vec![invalid(
            "invalid type: string \"1767225600000\", expected i64 at line 1 column 66",
        )]),
    );
    m.insert(
        "single: bad stream name",
        per_event(vec![invalid(
            "invalid stream format 'Scada_Tags': must be lowercase with optional dots",
        )]),
    );
    m.insert(
        "single: empty source",
        per_event(vec![invalid("source is required")]),
    );
    m.insert(
        "single: payload null",
        per_event(vec![invalid("payload is required")]),
    );
    m.insert(
        "single: payload is an array",
        per_event(vec![invalid("payload must be a JSON object")]),
    );
    // Flux accepts it and changes nothing: FluxEvent always carries an entity_id, and
    // FluxEvent::validate refuses empty properties, so the worker never sends this.
    m.insert(
        "single: payload without entity_id (accepted, changes nothing)",
        per_event(vec![applied()]),
    );
    m.insert(
        "single: invalid JSON",
        per_event(vec![invalid(
            "EOF while parsing a value at line 1 column 19",
        )]),
    );
    m.insert(
        "batch: two events accepted",
        per_event(vec![applied(), applied()]),
    );
    m.insert(
        "batch: one event fails a rule (per-event error in a 200)",
        per_event(vec![
            applied(),
            invalid(
                "validation failed: invalid stream format 'BAD': must be lowercase with optional dots",
            ),
        ]),
    );
    m.insert(
        "batch: one malformed event fails the whole batch",
        Want::Write(BatchOutcome::WholeBatchRejected {
            reason: "missing field `timestamp` at line 1 column 234".into(),
        }),
    );
    m.insert(
        "batch: empty",
        Want::Write(BatchOutcome::WholeBatchRejected {
            reason: "Batch request must contain at least one event".into(),
        }),
    );
    m.insert(
        "batch: bare array body (what the seed publisher sent)",
        Want::Write(BatchOutcome::WholeBatchRejected {
            reason: "invalid type: map, expected a sequence at line 1 column 1".into(),
        }),
    );
    m.insert(
        "batch: client eventId sent twice (both stored; no dedup)",
        per_event(vec![applied(), applied()]),
    );
    m.insert(
        "read after {a:1,b:2,obj:{x,y}}, then {b:3,obj:{x:9},n:null}, then an OLDER-timestamped {c}",
        Want::Found {
            id: "scada/m",
            properties: json!({"a": 1, "b": 3, "c": "older event sent last", "n": null, "obj": {"x": 9}}),
        },
    );
    m.insert(
        "older timestamp arriving later wins",
        Want::Found {
            id: "scada/order",
            properties: json!({"v": "old"}),
        },
    );
    m.insert("read: unknown entity", Want::NotFound);
    m.insert("read: id with an unencoded slash", Want::NotFound);
    m.insert(
        "list by prefix",
        Want::List {
            ids: &["scada/b1", "scada/b2", "scada/b3"],
        },
    );
    m.insert(
        "tombstone event deletes the entity",
        per_event(vec![applied()]),
    );
    m.insert("read after tombstone", Want::NotFound);
    m.insert(
        "single: body over 1 MiB",
        Want::Write(BatchOutcome::TooLarge),
    );
    m.insert(
        "single: body just under 1 MiB (publish fails inside Flux)",
        Want::Write(BatchOutcome::Unknown {
            reason: "HTTP 500: Failed to await publish ack".into(),
        }),
    );
    m.insert(
        "batch: body over 2 MiB",
        Want::Write(BatchOutcome::TooLarge),
    );
    m.insert(
        "public: register namespace without the admin token",
        Want::Write(BatchOutcome::Unauthorized {
            status: 401,
            reason: "Admin token required".into(),
        }),
    );
    m.insert(
        "public: write with the namespace token",
        per_event(vec![applied()]),
    );
    m.insert(
        "public: write without a token",
        Want::Write(BatchOutcome::Unauthorized {
            status: 401,
            reason: "Authorization token not provided".into(),
        }),
    );
    m.insert(
        "public: write with another namespace's token",
        Want::Write(BatchOutcome::Unauthorized {
            status: 403,
            reason: "Token does not have permission to write to namespace 'scada'".into(),
        }),
    );
    m.insert(
        "public: entity id with two slashes",
        per_event(vec![auth_failed(
            "Failed to parse entity_id 'scada/asset/tr-1': InvalidFormat(\"Entity ID 'scada/asset/tr-1' contains multiple '/' separators (expected at most one)\")",
        )]),
    );
    m.insert(
        "public: entity id without a namespace",
        per_event(vec![auth_failed(
            "Entity ID 'tr-1' missing namespace prefix (expected 'namespace/entity' format)",
        )]),
    );
    m.insert(
        "public: batch without a token (200 with per-event errors)",
        per_event(vec![auth_failed(
            "authorization failed: Invalid token: Authorization token not provided",
        )]),
    );
    m.insert(
        "public: batch mixing an allowed and a foreign id",
        per_event(vec![
            applied(),
            auth_failed("authorization failed: Forbidden: Token does not have permission to write to namespace 'other'"),
            auth_failed("authorization failed: Invalid entity ID: Failed to parse entity_id 'scada/a/b': InvalidFormat(\"Entity ID 'scada/a/b' contains multiple '/' separators (expected at most one)\")"),
        ]),
    );
    m.insert(
        "public: read needs no token",
        Want::Found {
            id: "scada/tr-1",
            properties: json!({"a": 1}),
        },
    );
    m.insert(
        "public: single event over the rate limit",
        Want::Write(BatchOutcome::RateLimited {
            retry_after: Some(Duration::from_secs(60)),
        }),
    );
    m.insert(
        "public: batch over the rate limit",
        per_event(vec![EventOutcome::RateLimited, EventOutcome::RateLimited]),
    );
    m.insert(
        "event log unreachable: single event",
        Want::Write(BatchOutcome::Unknown {
            reason: "HTTP 500: Failed to await publish ack".into(),
        }),
    );
    m.insert(
        "event log unreachable: batch of two",
        per_event(vec![unknown(publish_failed), unknown(publish_failed)]),
    );
    m
}

/// The recorded body as the bytes Flux sent: JSON re-serialized, a text body as is, null empty.
fn response_bytes(body: &Value) -> Vec<u8> {
    match body {
        Value::Null => Vec::new(),
        Value::String(s) => s.as_bytes().to_vec(),
        // `<rfc3339>` marks a per-run value; put a real one back so it parses.
        other => serde_json::to_string(other)
            .unwrap()
            .replace("<rfc3339>", "2026-12-03T18:52:51.963549616+00:00")
            .into_bytes(),
    }
}

#[test]
fn every_transcript_case_is_classified_as_expected() {
    let transcript: Value = serde_json::from_str(TRANSCRIPT).unwrap();
    let cases = transcript["cases"].as_array().unwrap();
    let mut want = expectations();
    assert!(!cases.is_empty());
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let expected = want
            .remove(name)
            .unwrap_or_else(|| panic!("no expectation for transcript case {name:?}"));
        let req = &case["request"];
        let resp = &case["response"];
        let method = req["method"].as_str().unwrap();
        let path = req["path"].as_str().unwrap();
        let status = resp["status"].as_u64().unwrap() as u16;
        let content_type = resp["content_type"].as_str().filter(|s| !s.is_empty());
        let body = response_bytes(&resp["body"]);
        let retry_after = resp["retry_after"].as_str().and_then(parse_retry_after);

        match (method, expected) {
            ("POST", Want::Write(w)) => {
                let got = if path == "/api/events/batch" {
                    let sent = match &req["body"] {
                        Value::Object(o) => o
                            .get("events")
                            .and_then(Value::as_array)
                            .map_or(0, Vec::len),
                        Value::Array(a) => a.len(),
                        _ => 1, // a "<N bytes>" placeholder for an oversized body
                    };
                    classify_batch_answer(status, content_type, &body, retry_after, sent)
                } else {
                    classify_single_answer(status, content_type, &body, retry_after)
                };
                assert_eq!(got, w, "case {name:?}");
            }
            ("GET", Want::List { ids }) => {
                let got =
                    parse_list_answer(status, &body).unwrap_or_else(|e| panic!("{name}: {e}"));
                let mut got_ids: Vec<&str> = got.iter().map(|e| e.id.as_str()).collect();
                got_ids.sort();
                assert_eq!(got_ids, ids, "case {name:?}");
                assert!(
                    got.iter().all(|e| e.last_updated_ns.is_some()),
                    "case {name:?}"
                );
            }
            ("GET", Want::Found { id, properties }) => {
                let got = parse_entity_answer(status, &body)
                    .unwrap_or_else(|e| panic!("{name}: {e}"))
                    .unwrap_or_else(|| panic!("{name}: expected an entity"));
                assert_eq!(got.id, id, "case {name:?}");
                assert_eq!(
                    Value::Object(got.properties.clone()),
                    properties,
                    "case {name:?}"
                );
                assert_eq!(
                    got.last_updated_ns,
                    Some(1_796_323_971_963_549_616),
                    "case {name:?}"
                );
                assert_eq!(
                    got.last_updated_ms(),
                    Some(1_796_323_971_963),
                    "case {name:?}"
                );
            }
            ("GET", Want::NotFound) => {
                assert_eq!(
                    parse_entity_answer(status, &body),
                    Ok(None),
                    "case {name:?}"
                );
            }
            (m, w) => panic!("case {name:?}: method {m} with expectation {w:?}"),
        }
    }
    let missing: Vec<_> = want.keys().collect();
    assert!(
        missing.is_empty(),
        "expectations without a transcript case: {missing:?}"
    );
}

#[test]
fn transcript_auth_failures_split_into_permanent_and_fixable() {
    let two_slashes = classify_single_answer(
        401,
        Some("application/json"),
        br#"{"error":"Failed to parse entity_id 'scada/asset/tr-1': InvalidFormat(\"x\")"}"#,
        None,
    );
    match two_slashes {
        BatchOutcome::PerEvent(v) => assert!(v[0].is_permanent()),
        other => panic!("{other:?}"),
    }
    let foreign = auth_failed("authorization failed: Forbidden: Token does not have permission to write to namespace 'other'");
    assert!(!foreign.is_permanent() && foreign.is_retryable());
    let no_token =
        auth_failed("authorization failed: Invalid token: Authorization token not provided");
    assert!(!no_token.is_permanent());
    let bad_id = auth_failed(
        "authorization failed: Invalid entity ID: Failed to parse entity_id 'scada/a/b'",
    );
    assert!(bad_id.is_permanent());
    assert!(invalid("validation failed: x").is_permanent());
    assert!(unknown("publish failed: x").is_retryable());
}

// -------------------------------------------------------------------------------------------
// Part 2: HTTP against local servers

const TOKEN: &str = "SEKRET-tok-6f1c2b";

#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    /// Path and query exactly as they arrived (still percent-encoded).
    raw: String,
    auth: Option<String>,
    body: Vec<u8>,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// Serve `router` on 127.0.0.1:0 and return its base URL.
async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    format!("http://{addr}")
}

/// A fake Flux answering reads, writes and echoing the Authorization header into error texts
/// (as a badly behaved proxy might) so the redaction is exercised.
fn fake_flux(log: Log) -> Router {
    Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
        let log = log.clone();
        async move {
            let auth = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let raw = uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_default();
            log.lock().unwrap().push(Seen {
                method: method.clone(),
                raw: raw.clone(),
                auth: auth.clone(),
                body: body.to_vec(),
            });
            let echo = auth.clone().unwrap_or_default();
            match (method.as_str(), uri.path()) {
                ("GET", "/api/state/entities/scada%2Fm%20x%3Fy") => json_answer(
                    200,
                    json!({"id": "scada/m x?y", "properties": {"a": 1},
                           "lastUpdated": "2026-12-03T18:52:51.963549616+00:00"}),
                ),
                ("GET", "/api/state/entities") => json_answer(
                    200,
                    json!([{"id": "scada/b1", "properties": {"a": 1}, "lastUpdated": "2026-12-03T18:52:51Z"},
                           {"id": "scada/b2", "properties": {}, "lastUpdated": "2026-12-03T18:52:52Z"}]),
                ),
                ("GET", "/api/state/entities/scada%2Fboom") => {
                    json_answer(500, json!({"error": format!("internal: {echo}")}))
                }
                ("GET", _) => json_answer(404, json!({"error": "Entity not found"})),
                ("POST", "/api/events/batch") => {
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let events = v["events"].as_array().cloned().unwrap_or_default();
                    let results: Vec<Value> = events
                        .iter()
                        .map(|e| match e["payload"]["entity_id"].as_str() {
                            Some("scada/echo") => json!({"eventId": "x", "stream": "scada",
                                "error": format!("authorization failed: bad token {echo}")}),
                            _ => json!({"eventId": "id-ok", "stream": "scada", "error": null}),
                        })
                        .collect();
                    json_answer(200, json!({"successful": results.len(), "failed": 0, "results": results}))
                }
                ("POST", "/api/events") => {
                    json_answer(401, json!({"error": format!("Invalid token {echo}")}))
                }
                _ => json_answer(500, json!({"error": format!("Failed: {echo}")})),
            }
        }
    })
}

fn json_answer(status: u16, v: Value) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn config(base: &str) -> ClientConfig {
    ClientConfig {
        base_url: base.to_string(),
        auth_token: Some(Secret::new(TOKEN)),
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(5),
        ..ClientConfig::default()
    }
}

fn event(entity: &str, props: Value) -> FluxEvent {
    FluxEvent {
        stream: "scada".into(),
        source: "gw-1".into(),
        timestamp_ms: 1_767_225_600_000,
        entity_id: entity.into(),
        properties: props.as_object().cloned().unwrap_or_default(),
        event_id: Some("0190e6f2-0000-7000-8000-000000000001".into()),
    }
}

#[tokio::test]
async fn reads_percent_encode_ids_and_prefixes_and_send_no_token() {
    let log: Log = Arc::default();
    let base = serve(fake_flux(log.clone())).await;
    let client = FluxClient::new(config(&base)).unwrap();

    let e = client
        .get_entity("scada/m x?y")
        .await
        .unwrap()
        .expect("entity");
    assert_eq!(e.id, "scada/m x?y");
    assert_eq!(e.last_updated_ms(), Some(1_796_323_971_963));
    assert_eq!(client.get_entity("scada/nope").await, Ok(None));
    let list = client.list_prefix("scada/b").await.unwrap();
    assert_eq!(list.len(), 2);
    let err = client.get_entity("scada/boom").await.unwrap_err();
    assert!(
        matches!(err, ReadError::Status { status: 500, .. }),
        "{err:?}"
    );

    let seen = log.lock().unwrap().clone();
    let raws: Vec<&str> = seen.iter().map(|s| s.raw.as_str()).collect();
    assert_eq!(
        raws,
        vec![
            "/api/state/entities/scada%2Fm%20x%3Fy",
            "/api/state/entities/scada%2Fnope",
            "/api/state/entities?prefix=scada%2Fb",
            "/api/state/entities/scada%2Fboom",
        ]
    );
    // Reads need no token, so none is sent.
    assert!(seen
        .iter()
        .all(|s| s.auth.is_none() && s.method == Method::GET));
}

#[tokio::test]
async fn post_batch_sends_flux_shape_with_token_and_matches_by_position() {
    let log: Log = Arc::default();
    let base = serve(fake_flux(log.clone())).await;
    // A trailing slash in the base URL must not double the slash.
    let client = FluxClient::new(config(&format!("{base}/"))).unwrap();
    let events = vec![
        event("scada/a", json!({"t": 1.5})),
        event("scada/b", json!({"s": "x"})),
    ];
    let out = client.post_batch(&events).await;
    assert_eq!(
        out,
        BatchOutcome::PerEvent(vec![
            EventOutcome::Applied {
                event_id: "id-ok".into()
            },
            EventOutcome::Applied {
                event_id: "id-ok".into()
            },
        ])
    );
    // Nothing is sent for an empty batch (Flux answers 400 to one).
    assert_eq!(client.post_batch(&[]).await, BatchOutcome::PerEvent(vec![]));

    let seen = log.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].raw, "/api/events/batch");
    assert_eq!(
        seen[0].auth.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    let body: Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(
        body["events"][0],
        json!({"stream": "scada", "source": "gw-1", "timestamp": 1_767_225_600_000u64,
               "payload": {"entity_id": "scada/a", "properties": {"t": 1.5}},
               "eventId": "0190e6f2-0000-7000-8000-000000000001"})
    );
    assert_eq!(
        seen[0].body.len(),
        flux_outbox::flux_client::batch_body_len(events.iter().map(FluxEvent::encoded_len))
    );
}

#[tokio::test]
async fn token_never_appears_in_debug_or_errors() {
    let log: Log = Arc::default();
    let base = serve(fake_flux(log.clone())).await;
    let cfg = config(&base);
    assert!(!format!("{cfg:?}").contains(TOKEN));
    assert_eq!(format!("{}", Secret::new(TOKEN)), "[redacted]");
    let client = FluxClient::new(cfg.clone()).unwrap();
    assert!(!format!("{client:?}").contains(TOKEN));

    // The server echoes the Authorization header into every error text.
    let mut texts = vec![
        format!(
            "{:?}",
            client
                .post_batch(&[event("scada/echo", json!({"a": 1}))])
                .await
        ),
        format!(
            "{:?}",
            client.post_single(&event("scada/x", json!({"a": 1}))).await
        ),
        format!("{:?}", client.get_entity("scada/boom").await),
    ];
    // Transport failures: refused connection, unreadable CA, bad URLs.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let dead_client = FluxClient::new(config(&dead)).unwrap();
    texts.push(format!(
        "{:?}",
        dead_client
            .post_batch(&[event("scada/a", json!({"a": 1}))])
            .await
    ));
    texts.push(format!(
        "{}",
        dead_client.get_entity("scada/a").await.unwrap_err()
    ));
    for url in [
        format!("http://user:{TOKEN}@127.0.0.1:1"),
        format!("http://user:{TOKEN}@[bad"),
        format!("ftp://user:{TOKEN}@host"),
    ] {
        let err = FluxClient::new(ClientConfig {
            base_url: url,
            ..cfg.clone()
        })
        .unwrap_err();
        assert!(matches!(err, ClientError::InvalidBaseUrl { .. }), "{err:?}");
        texts.push(format!("{err} {err:?}"));
    }
    let bad_token = FluxClient::new(ClientConfig {
        auth_token: Some(Secret::new(format!("{TOKEN}\n"))),
        ..cfg.clone()
    })
    .unwrap_err();
    texts.push(format!("{bad_token} {bad_token:?}"));

    for t in &texts {
        assert!(!t.contains(TOKEN), "token leaked: {t}");
    }
    // The redacted texts still say what went wrong.
    assert!(
        texts[0].contains("AuthFailed") && texts[0].contains("[redacted]"),
        "{}",
        texts[0]
    );
    assert!(texts[1].contains("Unauthorized"), "{}", texts[1]);
    assert!(
        texts[3].contains("Unknown") && texts[3].contains("connect"),
        "{}",
        texts[3]
    );
}

#[tokio::test]
async fn client_config_errors_say_what_where_why() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-ca.pem");
    let err = FluxClient::new(ClientConfig {
        ca_file: Some(missing.clone()),
        ..config("http://127.0.0.1:1")
    })
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("CA file") && text.contains("no-such-ca.pem") && text.contains("cannot read"),
        "{text}"
    );

    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, b"this is not a certificate").unwrap();
    let err = FluxClient::new(ClientConfig {
        ca_file: Some(garbage),
        ..config("http://127.0.0.1:1")
    })
    .unwrap_err();
    assert!(matches!(err, ClientError::CaFile { .. }), "{err:?}");

    let err = FluxClient::new(config("not a url")).unwrap_err();
    assert!(
        err.to_string()
            .contains("invalid Flux base URL \"not a url\""),
        "{err}"
    );
    let err = FluxClient::new(config("http://127.0.0.1:1/x?y=1")).unwrap_err();
    assert!(err.to_string().contains("query"), "{err}");
}

#[tokio::test]
async fn a_hanging_server_is_unknown_within_the_total_timeout() {
    let router = Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        "too late"
    });
    let base = serve(router).await;
    let client = FluxClient::new(ClientConfig {
        request_timeout: Duration::from_millis(300),
        ..config(&base)
    })
    .unwrap();
    let t0 = Instant::now();
    let out = client
        .post_batch(&[event("scada/a", json!({"a": 1}))])
        .await;
    let took = t0.elapsed();
    assert!(
        matches!(&out, BatchOutcome::Unknown { reason } if reason.contains("timeout")),
        "{out:?}"
    );
    assert!(took < Duration::from_millis(1500), "{took:?}");
    let t0 = Instant::now();
    let err = client.get_entity("scada/a").await.unwrap_err();
    assert!(
        matches!(&err, ReadError::Transport { reason } if reason.contains("timeout")),
        "{err:?}"
    );
    assert!(t0.elapsed() < Duration::from_millis(1500));
}

#[tokio::test]
async fn a_stalled_body_is_unknown_within_the_read_timeout() {
    // Headers arrive at once, then the body never does.
    let router = Router::new().fallback(|| async {
        let stream = futures_util::stream::pending::<Result<Bytes, std::io::Error>>();
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Body::from_stream(stream))
            .unwrap()
    });
    let base = serve(router).await;
    let client = FluxClient::new(ClientConfig {
        read_timeout: Duration::from_millis(300),
        request_timeout: Duration::from_secs(20),
        ..config(&base)
    })
    .unwrap();
    let t0 = Instant::now();
    let out = client
        .post_batch(&[event("scada/a", json!({"a": 1}))])
        .await;
    assert!(
        matches!(&out, BatchOutcome::Unknown { reason } if reason.contains("timeout")),
        "{out:?}"
    );
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn a_connection_reset_is_unknown() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        // Read the request, then reset the connection instead of answering.
        for _ in 0..4 {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let mut buf = vec![0u8; 4096];
            let _ = tokio::io::AsyncReadExt::read(&mut sock, &mut buf).await;
            let _ = sock.set_zero_linger();
            drop(sock);
        }
    });
    let client = FluxClient::new(config(&format!("http://{addr}"))).unwrap();
    let out = client
        .post_batch(&[event("scada/a", json!({"a": 1}))])
        .await;
    assert!(matches!(out, BatchOutcome::Unknown { .. }), "{out:?}");
    let err = client.get_entity("scada/a").await.unwrap_err();
    assert!(matches!(err, ReadError::Transport { .. }), "{err:?}");
}

#[tokio::test]
async fn answers_that_are_not_flux_json_are_unknown() {
    let router = Router::new().fallback(|uri: Uri| async move {
        match uri.path() {
            "/api/events/batch" => (StatusCode::OK, "<html>captive portal</html>").into_response(),
            _ => (StatusCode::BAD_REQUEST, "<html>proxy says no</html>").into_response(),
        }
    });
    let base = serve(router).await;
    let client = FluxClient::new(config(&base)).unwrap();
    let out = client
        .post_batch(&[event("scada/a", json!({"a": 1}))])
        .await;
    assert!(matches!(out, BatchOutcome::Unknown { .. }), "{out:?}");
    let out = client.post_single(&event("scada/a", json!({"a": 1}))).await;
    assert!(matches!(out, BatchOutcome::Unknown { .. }), "{out:?}");
}

// -------------------------------------------------------------------------------------------
// https with an extra CA file: a TLS terminator (tokio-rustls) in front of flux-sim, with a
// server certificate for 127.0.0.1 signed by a test CA (tests/data/tls; 100-year validity, the
// CA's private key was discarded after signing).

async fn tls_front_of_sim() -> (String, flux_outbox::sim::SimHandle) {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tls");
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(data.join("server.pem"))
            .expect("server.pem")
            .collect::<Result<_, _>>()
            .expect("certs");
    let key = PrivateKeyDer::from_pem_file(data.join("server.key")).expect("server.key");
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocols")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let sim_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = flux_outbox::sim::start(flux_outbox::sim::SimConfig::default(), sim_listener)
        .await
        .expect("sim");
    let sim_addr = sim.addr();
    let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", front.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = front.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return; // a client that does not trust us aborts the handshake
                };
                let Ok(mut up) = tokio::net::TcpStream::connect(sim_addr).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    (url, sim)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_an_extra_ca_file_writes_and_reads_and_without_it_is_refused() {
    let (url, sim) = tls_front_of_sim().await;
    let ca = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tls/ca.pem");
    let client = FluxClient::new(ClientConfig {
        ca_file: Some(ca),
        ..config(&url)
    })
    .expect("client with CA file");
    let mut props = serde_json::Map::new();
    props.insert("v".into(), json!(42));
    let ev = FluxEvent {
        stream: "scada".into(),
        source: "tls-test".into(),
        timestamp_ms: 1,
        entity_id: "site/tls-1".into(),
        properties: props,
        event_id: Some("fo-tls".into()),
    };
    match client.post_batch(std::slice::from_ref(&ev)).await {
        BatchOutcome::PerEvent(r) => {
            assert!(matches!(r[..], [EventOutcome::Applied { .. }]), "{r:?}")
        }
        other => panic!("batch over https: {other:?}"),
    }
    let state = client
        .get_entity("site/tls-1")
        .await
        .expect("read over https")
        .expect("entity");
    assert_eq!(state.properties["v"], json!(42));
    assert_eq!(
        sim.entity("site/tls-1").expect("in sim").properties["v"],
        json!(42)
    );

    // Control: the same server without the extra CA is not trusted (system roots only): a
    // transport error, an unknown outcome, nothing applied.
    let untrusting = FluxClient::new(config(&url)).expect("client");
    let r = untrusting.get_entity("site/tls-1").await;
    assert!(matches!(r, Err(ReadError::Transport { .. })), "{r:?}");
    let before = sim.stats().events_applied;
    let out = untrusting.post_batch(std::slice::from_ref(&ev)).await;
    assert!(out.is_unknown(), "{out:?}");
    assert_eq!(sim.stats().events_applied, before);
}
