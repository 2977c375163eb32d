//! The fuzz targets' properties (`flux_outbox::fuzzing`) in `cargo test`: every crash input
//! a fuzz run found (kept in `tests/data/fuzz-regressions/<target>/`), then proptest cases:
//! arbitrary bytes, and JSON-shaped bodies that reach deeper into the parsers.

use std::path::Path;

use flux_outbox::fuzzing;
use proptest::prelude::*;

fn regressions(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fuzz-regressions")
        .join(target);
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.file_name().is_some_and(|n| n == "README") {
            continue;
        }
        check(&std::fs::read(&p).unwrap());
        n += 1;
    }
    println!("{target}: {n} regression inputs");
}

#[test]
fn fuzz_regressions_ingest_native() {
    regressions("ingest_native", fuzzing::ingest_native);
}

#[test]
fn fuzz_regressions_ingest_flux() {
    regressions("ingest_flux", fuzzing::ingest_flux);
}

#[test]
fn fuzz_regressions_record_decode() {
    regressions("record_decode", fuzzing::record_decode);
}

/// A JSON value of bounded depth, with the strings and numbers that trip parsers.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| serde_json::json!(f)),
        "[a-z_/.%\u{0}-\u{7f}\u{e9}\u{1f600}]{0,12}".prop_map(serde_json::Value::String),
        Just(serde_json::json!("__deleted__")),
        Just(serde_json::json!(true)),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("entity".to_string()),
                    Just("properties".to_string()),
                    Just("ts".to_string()),
                    Just("delete".to_string()),
                    Just("__deleted__".to_string()),
                    Just("payload".to_string()),
                    Just("entity_id".to_string()),
                    Just("stream".to_string()),
                    Just("source".to_string()),
                    Just("timestamp".to_string()),
                    Just("events".to_string()),
                    "[a-z]{0,6}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Well-formed native updates with odd content, as one body.
fn native_body() -> impl Strategy<Value = Vec<u8>> {
    let update = (
        "[a-z]{1,4}(/[a-zA-Z0-9.%_-]{0,6}){0,3}",
        prop::collection::btree_map("[a-z/_.]{0,5}", json_value(), 0..4),
        prop_oneof![
            Just(None),
            any::<u64>().prop_map(|t| Some(serde_json::json!(t))),
            Just(Some(serde_json::json!("2026-03-01T12:00:00Z"))),
            Just(Some(serde_json::json!("not a time"))),
        ],
    )
        .prop_map(|(entity, props, ts)| {
            let mut o = serde_json::json!({"entity": entity, "properties": props});
            if let Some(ts) = ts {
                o["ts"] = ts;
            }
            o
        });
    (any::<u8>(), prop::collection::vec(update, 1..5)).prop_map(|(mode, ups)| {
        let mut out = vec![mode];
        if mode & 1 != 0 {
            for u in ups {
                out.extend_from_slice(u.to_string().as_bytes());
                out.push(b'\n');
            }
        } else {
            out.extend_from_slice(serde_json::Value::Array(ups).to_string().as_bytes());
        }
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn native_parser_on_bytes(data in prop::collection::vec(any::<u8>(), 0..256)) {
        fuzzing::ingest_native(&data);
    }

    #[test]
    fn native_parser_on_json(v in json_value(), mode in any::<u8>()) {
        let mut data = vec![mode];
        data.extend_from_slice(v.to_string().as_bytes());
        fuzzing::ingest_native(&data);
    }

    #[test]
    fn native_parser_on_updates(data in native_body()) {
        fuzzing::ingest_native(&data);
    }

    #[test]
    fn flux_parsers_on_json(v in json_value(), mode in any::<u8>()) {
        let mut data = vec![mode];
        data.extend_from_slice(v.to_string().as_bytes());
        fuzzing::ingest_flux(&data);
    }

    #[test]
    fn flux_parsers_on_events(
        entity in "[a-z]{1,4}(/[a-z0-9.]{0,6}){0,2}",
        props in prop::collection::btree_map("[a-z_]{0,5}", json_value(), 0..4),
        ts in any::<i64>(),
        stream in "[a-z.]{0,6}",
        mode in any::<u8>(),
    ) {
        let ev = serde_json::json!({"stream": stream, "source": "s", "timestamp": ts,
            "payload": {"entity_id": entity, "properties": props}});
        let body = if mode & 1 != 0 { serde_json::json!({"events": [ev]}) } else { ev };
        let mut data = vec![mode];
        data.extend_from_slice(body.to_string().as_bytes());
        fuzzing::ingest_flux(&data);
    }

    #[test]
    fn record_decoder_on_bytes(data in prop::collection::vec(any::<u8>(), 0..512)) {
        fuzzing::record_decode(&data);
    }
}
