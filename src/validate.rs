//! Validation of one [`Update`] before ingest accepts it.
//!
//! Why here and not at delivery: ingest answers success only once an update is durable, and an
//! update Flux would refuse for good (bad entity id, oversized event, bad stream name) must be
//! refused to its producer *then*, while the producer can still act on the answer. Everything
//! Flux rejects per event (see `flux-api.md`) is checked here, plus the things Flux silently
//! ignores or mishandles (a `__deleted__` property sent by accident, an event too large for its
//! event log) and our own limits from [`crate::model`].
//!
//! Each refusal is an [`Invalid`] with a short, stable machine code (for HTTP answers, metrics
//! and tests) and a human message naming the offending entity, property or value. The codes:
//!
//! | code | meaning |
//! |---|---|
//! | `empty_entity` | entity id is empty |
//! | `entity_too_long` | entity id over [`ENTITY_ID_BYTES_MAX`] bytes |
//! | `entity_bad_char` | entity id contains a control character |
//! | `entity_not_public_form` | public mode: id is not `namespace/rest` (one slash, valid namespace) |
//! | `empty_properties` | a set update without properties |
//! | `too_many_properties` | more than [`PROPERTIES_PER_UPDATE_MAX`] properties |
//! | `empty_property` | a property name is empty |
//! | `property_too_long` | property name over [`PROPERTY_NAME_BYTES_MAX`] bytes |
//! | `property_bad_char` | property name contains a control character |
//! | `reserved_property` | property `__deleted__` (the delete form is a delete update) |
//! | `protected_property` | a property configured as written by other agents only |
//! | `value_too_large` | the Flux event would reach [`EVENT_BYTES_MAX`] |
//! | `bad_timestamp` | timestamp 0 or not before year 10000 |
//! | `bad_stream` | stream name breaks Flux's rule |
//! | `empty_source` | source given but empty |

use std::fmt;
use std::io;

use crate::model::{
    Update, UpdateOp, DELETE_PROPERTY, ENTITY_ID_BYTES_MAX, EVENT_BYTES_MAX,
    PROPERTIES_PER_UPDATE_MAX, PROPERTY_NAME_BYTES_MAX,
};

/// First millisecond of the year 10000 (UTC): timestamps must be below it. Beyond it RFC 3339
/// cannot express the time and the value is certainly a unit mistake (e.g. microseconds).
pub const TS_MS_END: u64 = 253_402_300_800_000;

/// Bytes budgeted for the parts of a Flux event that are not properties or entity id: the JSON
/// keys, the timestamp, the eventId Flux adds, and a default stream and source (whose real
/// values the validator does not know; the configured ones are short).
pub const EVENT_OVERHEAD_BYTES: usize = 1024;

/// What ingest enforces beyond the fixed limits; built from the `[ingest]` configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    /// Flux runs in public mode: entity ids must be `namespace/rest` with exactly one slash.
    pub public_mode: bool,
    /// Property names that other agents own (e.g. `command`, `cmd_id`); the outbox never writes them.
    pub protected: Vec<String>,
}

/// Why an update was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    /// Stable machine code, see the module documentation.
    pub code: &'static str,
    /// Human explanation naming the offending entity, property or value.
    pub message: String,
}

impl Invalid {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Invalid {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Invalid {}

/// Checks everything about `update` that Flux or our own limits would refuse.
pub fn validate_update(update: &Update, rules: &Rules) -> Result<(), Invalid> {
    validate_entity_id(&update.entity, rules.public_mode)?;
    match &update.op {
        UpdateOp::Set(props) => {
            if props.is_empty() {
                return Err(Invalid::new(
                    "empty_properties",
                    format!("entity {:?}: properties must not be empty", update.entity),
                ));
            }
            if props.len() > PROPERTIES_PER_UPDATE_MAX {
                return Err(Invalid::new(
                    "too_many_properties",
                    format!(
                        "entity {:?}: {} properties, at most {PROPERTIES_PER_UPDATE_MAX} allowed in one update",
                        update.entity,
                        props.len()
                    ),
                ));
            }
            for name in props.keys() {
                validate_property_name(name, rules)?;
            }
        }
        UpdateOp::Delete => {}
    }
    validate_timestamp(update.ts_ms)?;
    if let Some(stream) = &update.stream {
        validate_stream(stream)?;
    }
    if let Some(source) = &update.source {
        if source.is_empty() {
            return Err(Invalid::new(
                "empty_source",
                "source must not be empty when given",
            ));
        }
    }
    let size = event_size_estimate(update);
    if size >= EVENT_BYTES_MAX {
        let largest = match &update.op {
            UpdateOp::Set(props) => props
                .iter()
                .map(|(name, value)| (name, json_len(value)))
                .max_by_key(|(_, len)| *len)
                .map(|(name, len)| format!(" (largest property {name:?}: {len} bytes)"))
                .unwrap_or_default(),
            UpdateOp::Delete => String::new(),
        };
        return Err(Invalid::new(
            "value_too_large",
            format!(
                "entity {:?}: the Flux event would be about {size} bytes, the limit is {EVENT_BYTES_MAX}{largest}",
                update.entity
            ),
        ));
    }
    Ok(())
}

/// Entity id rules: non-empty, bounded, no control characters; in public mode `namespace/rest`.
pub fn validate_entity_id(id: &str, public_mode: bool) -> Result<(), Invalid> {
    if id.is_empty() {
        return Err(Invalid::new("empty_entity", "entity id must not be empty"));
    }
    if id.len() > ENTITY_ID_BYTES_MAX {
        return Err(Invalid::new(
            "entity_too_long",
            format!(
                "entity id {:?}... is {} bytes, at most {ENTITY_ID_BYTES_MAX} allowed",
                truncate(id, 40),
                id.len()
            ),
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(Invalid::new(
            "entity_bad_char",
            format!("entity id {id:?} contains a control character"),
        ));
    }
    if public_mode {
        let ok = match id.split_once('/') {
            Some((ns, rest)) => is_valid_namespace(ns) && !rest.is_empty() && !rest.contains('/'),
            None => false,
        };
        if !ok {
            return Err(Invalid::new(
                "entity_not_public_form",
                format!(
                    "entity id {id:?} is not `namespace/rest` with exactly one slash and a namespace of 3-32 characters [a-z0-9-_] (Flux public mode)"
                ),
            ));
        }
    }
    Ok(())
}

/// Property name rules: non-empty, bounded, no control characters, not reserved or protected.
pub fn validate_property_name(name: &str, rules: &Rules) -> Result<(), Invalid> {
    if name.is_empty() {
        return Err(Invalid::new(
            "empty_property",
            "property name must not be empty",
        ));
    }
    if name.len() > PROPERTY_NAME_BYTES_MAX {
        return Err(Invalid::new(
            "property_too_long",
            format!(
                "property name {:?}... is {} bytes, at most {PROPERTY_NAME_BYTES_MAX} allowed",
                truncate(name, 40),
                name.len()
            ),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(Invalid::new(
            "property_bad_char",
            format!("property name {name:?} contains a control character"),
        ));
    }
    if name == DELETE_PROPERTY {
        return Err(Invalid::new(
            "reserved_property",
            format!("property {DELETE_PROPERTY:?} is reserved: to delete an entity use \"delete\": true"),
        ));
    }
    if rules.protected.iter().any(|p| p == name) {
        return Err(Invalid::new(
            "protected_property",
            format!("property {name:?} is protected: other agents write it, the outbox never does"),
        ));
    }
    Ok(())
}

/// Timestamp rule: positive epoch milliseconds before the year 10000.
pub fn validate_timestamp(ts_ms: u64) -> Result<(), Invalid> {
    if ts_ms == 0 || ts_ms >= TS_MS_END {
        return Err(Invalid::new(
            "bad_timestamp",
            format!(
                "timestamp {ts_ms} must be epoch milliseconds after 1970 and before the year 10000"
            ),
        ));
    }
    Ok(())
}

/// Flux's stream-name rule as an [`Invalid`].
pub fn validate_stream(stream: &str) -> Result<(), Invalid> {
    if is_valid_stream_name(stream) {
        Ok(())
    } else {
        Err(Invalid::new(
            "bad_stream",
            format!(
                "stream {stream:?} must be [a-z0-9.] without a leading, trailing or doubled dot"
            ),
        ))
    }
}

/// Flux's rule: non-empty, only `[a-z0-9.]`, no leading, trailing or doubled dot.
pub fn is_valid_stream_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.')
        && !s.starts_with('.')
        && !s.ends_with('.')
        && !s.contains("..")
}

/// Flux's namespace rule: 3-32 characters `[a-z0-9-_]`.
pub fn is_valid_namespace(s: &str) -> bool {
    (3..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Upper estimate of the Flux event this update becomes, in bytes: the JSON of its properties
/// (or the tombstone), the JSON-escaped entity id, stream and source, plus
/// [`EVENT_OVERHEAD_BYTES`]. Counted without building the JSON.
pub fn event_size_estimate(update: &Update) -> usize {
    let props = match &update.op {
        UpdateOp::Set(props) => {
            // Braces, commas between entries, and per entry: quoted escaped name, colon, value.
            2 + props.len().saturating_sub(1)
                + props
                    .iter()
                    .map(|(k, v)| str_json_len(k) + 1 + json_len(v))
                    .sum::<usize>()
        }
        UpdateOp::Delete => r#"{"__deleted__":true}"#.len(),
    };
    let opt_len = |s: &Option<String>| s.as_deref().map_or(0, str_json_len);
    props
        + str_json_len(&update.entity)
        + opt_len(&update.stream)
        + opt_len(&update.source)
        + EVENT_OVERHEAD_BYTES
}

/// Serialized (compact) JSON length of a value, without allocating it.
fn json_len(value: &serde_json::Value) -> usize {
    let mut counter = ByteCounter(0);
    // Writing to a counter cannot fail, and serializing a Value cannot either.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

fn str_json_len(s: &str) -> usize {
    let mut counter = ByteCounter(0);
    let _ = serde_json::to_writer(&mut counter, s);
    counter.0
}

struct ByteCounter(usize);

impl io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// At most `max` characters of `s`, for messages about overlong input.
fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn set(entity: &str, props: serde_json::Value) -> Update {
        let map: BTreeMap<String, serde_json::Value> = match props {
            serde_json::Value::Object(m) => m.into_iter().collect(),
            _ => BTreeMap::new(),
        };
        Update {
            entity: entity.into(),
            op: UpdateOp::Set(map),
            ts_ms: 1_767_225_600_000,
            stream: None,
            source: None,
        }
    }

    fn rules() -> Rules {
        Rules {
            public_mode: false,
            protected: vec!["command".into(), "cmd_id".into()],
        }
    }

    fn code(u: &Update, r: &Rules) -> &'static str {
        validate_update(u, r).err().map_or("ok", |e| e.code)
    }

    #[test]
    fn accepts_ordinary_updates() {
        assert_eq!(
            code(
                &set("scada/asset/site-1/tr-1", json!({"temp": 61.5})),
                &rules()
            ),
            "ok"
        );
        let del = Update {
            op: UpdateOp::Delete,
            ..set("scada/x", json!({}))
        };
        assert_eq!(code(&del, &rules()), "ok");
    }

    #[test]
    fn entity_rules() {
        let r = rules();
        assert_eq!(code(&set("", json!({"a": 1})), &r), "empty_entity");
        assert_eq!(
            code(
                &set(&"x".repeat(ENTITY_ID_BYTES_MAX + 1), json!({"a": 1})),
                &r
            ),
            "entity_too_long"
        );
        assert_eq!(
            code(&set(&"x".repeat(ENTITY_ID_BYTES_MAX), json!({"a": 1})), &r),
            "ok"
        );
        assert_eq!(code(&set("a\nb", json!({"a": 1})), &r), "entity_bad_char");
        // Internal mode takes any id, several slashes included.
        assert_eq!(code(&set("scada/asset/tr-1", json!({"a": 1})), &r), "ok");
    }

    #[test]
    fn public_mode_entity_form() {
        let r = Rules {
            public_mode: true,
            ..rules()
        };
        assert_eq!(
            code(&set("scada/asset.site-1.tr-1", json!({"a": 1})), &r),
            "ok"
        );
        for bad in [
            "scada/asset/tr-1",
            "tr-1",
            "ab/x",
            "Scada/x",
            "scada/",
            "/x",
            &format!("{}/x", "a".repeat(33)),
        ] {
            assert_eq!(
                code(&set(bad, json!({"a": 1})), &r),
                "entity_not_public_form",
                "{bad}"
            );
        }
        assert_eq!(code(&set("a_b-9/x", json!({"a": 1})), &r), "ok");
    }

    #[test]
    fn property_rules() {
        let r = rules();
        assert_eq!(code(&set("e", json!({})), &r), "empty_properties");
        assert_eq!(code(&set("e", json!({"": 1})), &r), "empty_property");
        assert_eq!(
            code(
                &set("e", json!({"x".repeat(PROPERTY_NAME_BYTES_MAX + 1): 1})),
                &r
            ),
            "property_too_long"
        );
        assert_eq!(
            code(&set("e", json!({"a\u{7}": 1})), &r),
            "property_bad_char"
        );
        let e = validate_update(&set("e", json!({"__deleted__": true})), &r).unwrap_err();
        assert_eq!(e.code, "reserved_property");
        assert!(e.message.contains("\"delete\": true"), "{e}");
        let e = validate_update(&set("e", json!({"a": 1, "cmd_id": "x"})), &r).unwrap_err();
        assert_eq!(e.code, "protected_property");
        assert!(e.message.contains("cmd_id"), "{e}");
        let many: serde_json::Map<String, serde_json::Value> = (0..=PROPERTIES_PER_UPDATE_MAX)
            .map(|i| (format!("p{i}"), json!(1)))
            .collect();
        assert_eq!(
            code(&set("e", serde_json::Value::Object(many)), &r),
            "too_many_properties"
        );
    }

    #[test]
    fn event_size_limit_names_the_property() {
        let r = rules();
        let big = "x".repeat(EVENT_BYTES_MAX);
        let e = validate_update(&set("e", json!({"small": 1, "blob": big})), &r).unwrap_err();
        assert_eq!(e.code, "value_too_large");
        assert!(e.message.contains("\"blob\""), "{e}");
        // Escaping counts: 300k newlines become 600k bytes of JSON.
        let escaped = "\n".repeat(EVENT_BYTES_MAX / 2 + 1);
        assert_eq!(
            code(&set("e", json!({"s": escaped})), &r),
            "value_too_large"
        );
        let fits = "x".repeat(EVENT_BYTES_MAX - EVENT_OVERHEAD_BYTES - 100);
        assert_eq!(code(&set("e", json!({"s": fits})), &r), "ok");
    }

    #[test]
    fn size_estimate_matches_real_serialization() {
        let u = set(
            "scada/é\"x",
            json!({"a": [1, 2.5, null], "b\\": {"c": "d\u{1}"}}),
        );
        let UpdateOp::Set(props) = &u.op else {
            unreachable!()
        };
        let real =
            serde_json::to_vec(props).unwrap().len() + serde_json::to_vec(&u.entity).unwrap().len();
        assert_eq!(event_size_estimate(&u), real + EVENT_OVERHEAD_BYTES);
    }

    #[test]
    fn timestamp_stream_source() {
        let r = rules();
        let ok = set("e", json!({"a": 1}));
        assert_eq!(
            code(
                &Update {
                    ts_ms: 0,
                    ..ok.clone()
                },
                &r
            ),
            "bad_timestamp"
        );
        assert_eq!(
            code(
                &Update {
                    ts_ms: TS_MS_END,
                    ..ok.clone()
                },
                &r
            ),
            "bad_timestamp"
        );
        assert_eq!(
            code(
                &Update {
                    ts_ms: TS_MS_END - 1,
                    ..ok.clone()
                },
                &r
            ),
            "ok"
        );
        for bad in ["", "Scada", "scada_tags", ".scada", "scada.", "sca..da"] {
            assert_eq!(
                code(
                    &Update {
                        stream: Some(bad.into()),
                        ..ok.clone()
                    },
                    &r
                ),
                "bad_stream",
                "{bad}"
            );
        }
        assert_eq!(
            code(
                &Update {
                    stream: Some("scada.tags2".into()),
                    ..ok.clone()
                },
                &r
            ),
            "ok"
        );
        assert_eq!(
            code(
                &Update {
                    source: Some(String::new()),
                    ..ok.clone()
                },
                &r
            ),
            "empty_source"
        );
    }
}
