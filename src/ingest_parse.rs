//! Parsers for ingest request bodies: pure functions from bytes to `Vec<Update>`.
//!
//! Two wire shapes are accepted:
//! - the native API (`POST /v1/updates`, [`parse_native`]): one object, an array of objects, or
//!   NDJSON, each `{"entity", "properties" | "delete": true, "ts"?, "stream"?, "source"?}`;
//!   [`to_native_json`] is its inverse (the export format, so a dump can be re-posted);
//! - Flux's own event shape (`POST /api/events`, `POST /api/events/batch`,
//!   [`parse_flux_single`], [`parse_flux_batch`]) so a producer written for Flux can point at
//!   the outbox unchanged.
//!
//! A request is all or nothing: the first bad item fails it with a [`ParseError`] saying where
//! (0-based item, 1-based NDJSON line) and why, and nothing of it is stored. Every update also
//! passes [`validate_update`], so what is accepted is what Flux will take.
//!
//! Resource bounds: at most [`ITEMS_PER_REQUEST_MAX`] items, and JSON nesting of at most
//! [`DEPTH_MAX`] levels, checked by a byte scan BEFORE serde_json builds anything. (serde_json
//! has its own recursion limit of 128 levels, which keeps it from overflowing the stack, but a
//! clear error at a documented limit is friendlier and keeps values Flux and other JSON tools
//! will handle.) The body size limit belongs to the HTTP layer (`ingest.body_bytes_max`).
//!
//! Differences from Flux, all on the strict side: Flux silently accepts a payload without a
//! string `entity_id` or with non-object `properties` and changes nothing; here that is an
//! error. Flux treats `"properties": {"__deleted__": true}` as an entity delete; here that is
//! the only way `__deleted__` may appear. Unknown fields of the Flux shapes are ignored, as Flux
//! does; `eventId`, `key` and `schema` are checked for type and then dropped (the outbox
//! coalesces updates, so a producer's event identity cannot survive).

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value};

use crate::model::{Update, UpdateOp, DELETE_PROPERTY};
use crate::validate::{validate_update, Invalid, Rules};

/// Most updates in one request.
pub const ITEMS_PER_REQUEST_MAX: usize = 100_000;
/// Deepest JSON nesting accepted in a document (an NDJSON line, or the whole body otherwise).
/// The item object is level 1 (level 2 inside an array body), its properties map one more.
pub const DEPTH_MAX: usize = 64;

/// Why a request body was refused; the whole request is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// 0-based index of the offending item (array element, batch event, NDJSON record).
    pub item: Option<usize>,
    /// 1-based NDJSON line.
    pub line: Option<usize>,
    /// Stable machine code: the [`Invalid`] codes of `validate`, or one of `empty_body`,
    /// `invalid_json`, `too_deep`, `too_many_items`, `bad_body`, `empty_batch`, `not_an_object`,
    /// `unknown_field`, `missing_field`, `bad_type`, `properties_not_object`,
    /// `properties_and_delete`, `bad_delete`, `bad_ts`.
    pub code: &'static str,
    pub message: String,
}

impl ParseError {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        ParseError {
            item: None,
            line: None,
            code,
            message: message.into(),
        }
    }

    fn at_item(mut self, item: usize) -> Self {
        self.item = Some(item);
        self
    }
}

impl From<Invalid> for ParseError {
    fn from(e: Invalid) -> Self {
        ParseError::new(e.code, e.message)
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.item) {
            (Some(line), _) => write!(f, "line {line}: {}", self.message),
            (None, Some(item)) => write!(f, "item {item}: {}", self.message),
            (None, None) => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ParseError {}

/// Parses a native `POST /v1/updates` body: a JSON object, a JSON array of objects, or (when
/// `ndjson`) one object per line, blank lines skipped. `ts` defaults to `now_ms`.
pub fn parse_native(
    body: &[u8],
    ndjson: bool,
    now_ms: u64,
    rules: &Rules,
) -> Result<Vec<Update>, ParseError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ParseError::new("empty_body", "the request body is empty"));
    }
    if ndjson {
        return parse_native_ndjson(body, now_ms, rules);
    }
    match parse_document(body)? {
        Value::Object(obj) => Ok(vec![native_item(obj, now_ms, rules)?]),
        Value::Array(items) => {
            if items.is_empty() {
                return Err(ParseError::new("empty_body", "the array holds no updates"));
            }
            check_item_count(items.len())?;
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::Object(obj) => native_item(obj, now_ms, rules).map_err(|e| e.at_item(i)),
                    other => Err(ParseError::new(
                        "not_an_object",
                        format!("an update must be a JSON object, got {}", kind(&other)),
                    )
                    .at_item(i)),
                })
                .collect()
        }
        other => Err(ParseError::new(
            "bad_body",
            format!(
                "the body must be a JSON object, an array of objects, or NDJSON; got {}",
                kind(&other)
            ),
        )),
    }
}

fn parse_native_ndjson(body: &[u8], now_ms: u64, rules: &Rules) -> Result<Vec<Update>, ParseError> {
    let mut out = Vec::new();
    for (index, raw) in body.split(|&b| b == b'\n').enumerate() {
        let line = index + 1;
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let item = out.len();
        let at = |e: ParseError| ParseError {
            item: Some(item),
            line: Some(line),
            ..e
        };
        if item >= ITEMS_PER_REQUEST_MAX {
            return Err(at(too_many_items()));
        }
        check_depth(raw).map_err(at)?;
        let value: Value = serde_json::from_slice(raw).map_err(|e| at(json_error(&e, true)))?;
        let Value::Object(obj) = value else {
            return Err(at(ParseError::new(
                "not_an_object",
                format!(
                    "each NDJSON line must be one JSON object, got {}",
                    kind(&value)
                ),
            )));
        };
        out.push(native_item(obj, now_ms, rules).map_err(at)?);
    }
    if out.is_empty() {
        return Err(ParseError::new(
            "empty_body",
            "the request body holds no updates",
        ));
    }
    Ok(out)
}

const NATIVE_FIELDS: &[&str] = &["entity", "properties", "delete", "ts", "stream", "source"];

/// One native item. `null` counts as absent for the optional fields.
fn native_item(
    mut obj: Map<String, Value>,
    now_ms: u64,
    rules: &Rules,
) -> Result<Update, ParseError> {
    if let Some(unknown) = obj.keys().find(|k| !NATIVE_FIELDS.contains(&k.as_str())) {
        return Err(ParseError::new(
            "unknown_field",
            format!("unknown field {unknown:?} (allowed: entity, properties, delete, ts, stream, source)"),
        ));
    }
    let entity = match obj.remove("entity") {
        Some(Value::String(s)) => s,
        None | Some(Value::Null) => {
            return Err(ParseError::new("missing_field", "\"entity\" is required"))
        }
        Some(other) => return Err(bad_type("entity", "a string", &other)),
    };
    let properties = obj.remove("properties").filter(|v| !v.is_null());
    let delete = obj.remove("delete").filter(|v| !v.is_null());
    let op = match (properties, delete) {
        (Some(_), Some(_)) => {
            return Err(ParseError::new(
                "properties_and_delete",
                format!("entity {entity:?}: give either \"properties\" or \"delete\": true, not both"),
            ))
        }
        (None, None) => {
            return Err(ParseError::new(
                "missing_field",
                format!("entity {entity:?}: \"properties\" (an object) or \"delete\": true is required"),
            ))
        }
        (None, Some(Value::Bool(true))) => UpdateOp::Delete,
        (None, Some(other)) => {
            return Err(ParseError::new(
                "bad_delete",
                format!("entity {entity:?}: \"delete\" must be true (got {other}); omit it to update properties"),
            ))
        }
        (Some(Value::Object(props)), None) => UpdateOp::Set(props.into_iter().collect::<BTreeMap<_, _>>()),
        (Some(other), None) => {
            return Err(ParseError::new(
                "properties_not_object",
                format!("entity {entity:?}: properties must be a JSON object, got {}", kind(&other)),
            ))
        }
    };
    let ts_ms = match obj.remove("ts") {
        None | Some(Value::Null) => now_ms,
        Some(v) => native_ts(&v)?,
    };
    let stream = optional_string(&mut obj, "stream")?;
    let source = optional_string(&mut obj, "source")?;
    let update = Update {
        entity,
        op,
        ts_ms,
        stream,
        source,
    };
    validate_update(&update, rules)?;
    Ok(update)
}

/// `ts`: a positive integer of epoch milliseconds, or an RFC 3339 string.
fn native_ts(v: &Value) -> Result<u64, ParseError> {
    let bad = |why: String| {
        ParseError::new(
            "bad_ts",
            format!("ts {why}; use epoch milliseconds (integer) or an RFC 3339 string"),
        )
    };
    match v {
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(ms), _) => Ok(ms),
            (None, Some(neg)) => Err(bad(format!("{neg} is negative"))),
            _ => Err(bad(format!("{n} is not an integer"))),
        },
        Value::String(s) => parse_rfc3339_ms(s)
            .ok_or_else(|| bad(format!("{s:?} is not an RFC 3339 date-time after 1970"))),
        other => Err(bad(format!("must not be {}", kind(other)))),
    }
}

fn optional_string(
    obj: &mut Map<String, Value>,
    field: &str,
) -> Result<Option<String>, ParseError> {
    match obj.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(bad_type(field, "a string", &other)),
    }
}

/// Parses `POST /api/events`: one Flux event.
pub fn parse_flux_single(body: &[u8], rules: &Rules) -> Result<Vec<Update>, ParseError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ParseError::new("empty_body", "the request body is empty"));
    }
    match parse_document(body)? {
        Value::Object(obj) => Ok(vec![flux_event(obj, rules)?]),
        other => Err(ParseError::new(
            "bad_body",
            format!(
                "the body must be one Flux event object, got {}",
                kind(&other)
            ),
        )),
    }
}

/// Parses `POST /api/events/batch`: `{"events": [ ... ]}` of Flux events.
pub fn parse_flux_batch(body: &[u8], rules: &Rules) -> Result<Vec<Update>, ParseError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ParseError::new("empty_body", "the request body is empty"));
    }
    let events = match parse_document(body)? {
        Value::Object(mut obj) => match obj.remove("events") {
            Some(Value::Array(events)) => events,
            None => return Err(ParseError::new("missing_field", "a batch is {\"events\": [ ... ]}; \"events\" is missing")),
            Some(other) => return Err(bad_type("events", "an array", &other)),
        },
        Value::Array(_) => {
            return Err(ParseError::new(
                "bad_body",
                "a batch is {\"events\": [ ... ]}, not a bare array (Flux answers 400 to a bare array too)",
            ))
        }
        other => return Err(ParseError::new("bad_body", format!("a batch is {{\"events\": [ ... ]}}, got {}", kind(&other)))),
    };
    if events.is_empty() {
        return Err(ParseError::new(
            "empty_batch",
            "a batch must contain at least one event",
        ));
    }
    check_item_count(events.len())?;
    events
        .into_iter()
        .enumerate()
        .map(|(i, event)| match event {
            Value::Object(obj) => flux_event(obj, rules).map_err(|e| e.at_item(i)),
            other => Err(ParseError::new(
                "not_an_object",
                format!("an event must be a JSON object, got {}", kind(&other)),
            )
            .at_item(i)),
        })
        .collect()
}

/// One Flux event, with Flux's rules plus the ones Flux silently skips.
fn flux_event(mut obj: Map<String, Value>, rules: &Rules) -> Result<Update, ParseError> {
    let stream = required_string(&mut obj, "stream")?;
    let source = required_string(&mut obj, "source")?;
    let ts_ms = match obj.remove("timestamp") {
        None => {
            return Err(ParseError::new(
                "missing_field",
                "\"timestamp\" is required",
            ))
        }
        Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
            (Some(ms), _) if ms > 0 => ms,
            (Some(_), _) | (None, Some(_)) => {
                return Err(ParseError::new(
                    "bad_ts",
                    format!("timestamp must be positive, got {n}"),
                ))
            }
            _ => {
                return Err(ParseError::new(
                    "bad_ts",
                    format!("timestamp must be an integer (epoch milliseconds), got {n}"),
                ))
            }
        },
        Some(other) => {
            return Err(bad_type(
                "timestamp",
                "an integer (epoch milliseconds)",
                &other,
            ))
        }
    };
    for optional in ["eventId", "key", "schema"] {
        optional_string(&mut obj, optional)?;
    }
    let mut payload = match obj.remove("payload") {
        None | Some(Value::Null) => {
            return Err(ParseError::new("missing_field", "\"payload\" is required"))
        }
        Some(Value::Object(p)) => p,
        Some(other) => return Err(bad_type("payload", "a JSON object", &other)),
    };
    let entity =
        match payload.remove("entity_id") {
            Some(Value::String(s)) => s,
            None | Some(Value::Null) => return Err(ParseError::new(
                "missing_field",
                "payload.entity_id is required (Flux would accept the event and change nothing)",
            )),
            Some(other) => return Err(bad_type("payload.entity_id", "a string", &other)),
        };
    let props = match payload.remove("properties") {
        Some(Value::Object(p)) => p,
        None | Some(Value::Null) => {
            return Err(ParseError::new(
                "missing_field",
                format!("entity {entity:?}: payload.properties is required (Flux would accept the event and change nothing)"),
            ))
        }
        Some(other) => {
            return Err(ParseError::new(
                "properties_not_object",
                format!("entity {entity:?}: payload.properties must be a JSON object, got {}", kind(&other)),
            ))
        }
    };
    let op = match props.get(DELETE_PROPERTY) {
        Some(Value::Bool(true)) if props.len() == 1 => UpdateOp::Delete,
        Some(_) => {
            return Err(ParseError::new(
                "reserved_property",
                format!(
                    "entity {entity:?}: {DELETE_PROPERTY:?} may only appear alone with the value true (it deletes the entity)"
                ),
            ))
        }
        None => UpdateOp::Set(props.into_iter().collect()),
    };
    let update = Update {
        entity,
        op,
        ts_ms,
        stream: Some(stream),
        source: Some(source),
    };
    validate_update(&update, rules)?;
    Ok(update)
}

fn required_string(obj: &mut Map<String, Value>, field: &str) -> Result<String, ParseError> {
    match obj.remove(field) {
        None => Err(ParseError::new(
            "missing_field",
            format!("{field:?} is required"),
        )),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(bad_type(field, "a string", &other)),
    }
}

/// The native JSON form of an update (the export format): `parse_native` reads it back.
pub fn to_native_json(update: &Update) -> Value {
    let mut obj = Map::new();
    obj.insert("entity".into(), Value::String(update.entity.clone()));
    match &update.op {
        UpdateOp::Set(props) => {
            let props: Map<String, Value> =
                props.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            obj.insert("properties".into(), Value::Object(props));
        }
        UpdateOp::Delete => {
            obj.insert("delete".into(), Value::Bool(true));
        }
    }
    obj.insert("ts".into(), Value::from(update.ts_ms));
    if let Some(stream) = &update.stream {
        obj.insert("stream".into(), Value::String(stream.clone()));
    }
    if let Some(source) = &update.source {
        obj.insert("source".into(), Value::String(source.clone()));
    }
    Value::Object(obj)
}

/// Depth check, then JSON parse of a whole document.
fn parse_document(body: &[u8]) -> Result<Value, ParseError> {
    check_depth(body)?;
    serde_json::from_slice(body).map_err(|e| json_error(&e, false))
}

fn check_item_count(n: usize) -> Result<(), ParseError> {
    if n > ITEMS_PER_REQUEST_MAX {
        return Err(ParseError::new(
            "too_many_items",
            format!("{n} items in one request, at most {ITEMS_PER_REQUEST_MAX} allowed"),
        ));
    }
    Ok(())
}

fn too_many_items() -> ParseError {
    ParseError::new(
        "too_many_items",
        format!("more than {ITEMS_PER_REQUEST_MAX} items in one request"),
    )
}

/// Refuses nesting deeper than [`DEPTH_MAX`] in one linear pass with O(1) memory, skipping
/// string contents. Malformed JSON is left for serde_json to report.
fn check_depth(bytes: &[u8]) -> Result<(), ParseError> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > DEPTH_MAX {
                    return Err(ParseError::new(
                        "too_deep",
                        format!("JSON nested deeper than {DEPTH_MAX} levels"),
                    ));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// serde_json's message with its position rephrased: in NDJSON the line is ours, so only the
/// column is kept.
fn json_error(e: &serde_json::Error, ndjson: bool) -> ParseError {
    let full = e.to_string();
    let what = full
        .rfind(" at line ")
        .map_or(full.as_str(), |i| &full[..i]);
    let mut message = if ndjson {
        format!("invalid JSON at column {}: {what}", e.column())
    } else {
        format!(
            "invalid JSON at line {} column {}: {what}",
            e.line(),
            e.column()
        )
    };
    if !ndjson && what.contains("trailing characters") {
        message.push_str(
            " (several JSON documents: for NDJSON send Content-Type: application/x-ndjson)",
        );
    }
    ParseError::new("invalid_json", message)
}

fn bad_type(field: &str, expected: &str, got: &Value) -> ParseError {
    ParseError::new(
        "bad_type",
        format!("{field:?} must be {expected}, got {}", kind(got)),
    )
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses an RFC 3339 date-time (`2026-03-01T12:00:00.123Z`, `...+02:00`; `t`, `z` and a space
/// separator accepted) to epoch milliseconds, truncating sub-millisecond digits. `None` if
/// malformed or before 1970. A leap second `:60` is taken as the next minute's first second.
pub fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut i = 19;
    let mut millis = 0i64;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        for k in 0..3 {
            millis = millis * 10
                + if start + k < i {
                    i64::from(b[start + k] - b'0')
                } else {
                    0
                };
        }
    }
    let offset_min = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let m = oh * 60 + om;
            if *sign == b'-' {
                -m
            } else {
                m
            }
        }
        _ => return None,
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days_in_month = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month[(month - 1) as usize]
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_min * 60;
    let ms = secs.checked_mul(1000)?.checked_add(millis)?;
    u64::try_from(ms).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: u64 = 1_767_225_600_000;

    fn rules() -> Rules {
        Rules {
            public_mode: false,
            protected: vec!["command".into(), "cmd_id".into()],
        }
    }

    fn native(body: &str) -> Result<Vec<Update>, ParseError> {
        parse_native(body.as_bytes(), false, NOW, &rules())
    }

    fn ndjson(body: &str) -> Result<Vec<Update>, ParseError> {
        parse_native(body.as_bytes(), true, NOW, &rules())
    }

    fn err(r: Result<Vec<Update>, ParseError>) -> ParseError {
        match r {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => e,
        }
    }

    fn props(v: Value) -> UpdateOp {
        UpdateOp::Set(v.as_object().unwrap().clone().into_iter().collect())
    }

    #[test]
    fn native_forms() {
        let one =
            native(r#"{"entity":"scada/a","properties":{"t":1.5,"s":"OK"},"ts":1767225600123}"#)
                .unwrap();
        assert_eq!(
            one,
            vec![Update {
                entity: "scada/a".into(),
                op: props(json!({"t":1.5,"s":"OK"})),
                ts_ms: 1_767_225_600_123,
                stream: None,
                source: None
            }]
        );
        let arr = native(r#"[{"entity":"a","delete":true},{"entity":"b","properties":{"x":null},"stream":"s.t","source":"me","ts":"2026-01-01T00:00:00Z"}]"#).unwrap();
        assert_eq!(arr[0].op, UpdateOp::Delete);
        assert_eq!(arr[0].ts_ms, NOW, "ts defaults to now");
        assert_eq!(arr[1].ts_ms, 1_767_225_600_000);
        assert_eq!(arr[1].stream.as_deref(), Some("s.t"));
        assert_eq!(arr[1].source.as_deref(), Some("me"));
        let lines = ndjson("{\"entity\":\"a\",\"properties\":{\"x\":1}}\r\n\n  \n{\"entity\":\"b\",\"delete\":true}").unwrap();
        assert_eq!(lines.len(), 2);
    }

    #[test]
    fn native_errors_say_where_and_why() {
        let cases: &[(&str, &str, &str)] = &[
            ("", "empty_body", "empty"),
            ("[]", "empty_body", "no updates"),
            ("42", "bad_body", "a number"),
            ("{\"entity\":", "invalid_json", "invalid JSON at line 1"),
            (
                r#"{"properties":{"a":1}}"#,
                "missing_field",
                "\"entity\" is required",
            ),
            (
                r#"{"entity":5,"properties":{"a":1}}"#,
                "bad_type",
                "\"entity\" must be a string",
            ),
            (
                r#"{"entity":"a","properties":[1]}"#,
                "properties_not_object",
                "properties must be a JSON object",
            ),
            (
                r#"{"entity":"a","properties":{"":1}}"#,
                "empty_property",
                "empty",
            ),
            (
                r#"{"entity":"a","properties":{"__deleted__":true}}"#,
                "reserved_property",
                "\"delete\": true",
            ),
            (
                r#"{"entity":"a","properties":{"command":"x"}}"#,
                "protected_property",
                "\"command\"",
            ),
            (
                r#"{"entity":"","properties":{"a":1}}"#,
                "empty_entity",
                "empty",
            ),
            (
                r#"{"entity":"a","properties":{"a":1},"delete":true}"#,
                "properties_and_delete",
                "not both",
            ),
            (
                r#"{"entity":"a","delete":false}"#,
                "bad_delete",
                "must be true",
            ),
            (
                r#"{"entity":"a","delete":"yes"}"#,
                "bad_delete",
                "must be true",
            ),
            (r#"{"entity":"a"}"#, "missing_field", "\"properties\""),
            (
                r#"{"entity":"a","properties":{"a":1},"ts":-5}"#,
                "bad_ts",
                "negative",
            ),
            (
                r#"{"entity":"a","properties":{"a":1},"ts":1.5}"#,
                "bad_ts",
                "not an integer",
            ),
            (
                r#"{"entity":"a","properties":{"a":1},"ts":1e12}"#,
                "bad_ts",
                "not an integer",
            ),
            (
                r#"{"entity":"a","properties":{"a":1},"ts":"yesterday"}"#,
                "bad_ts",
                "RFC 3339",
            ),
            (
                r#"{"entity":"a","properties":{"a":1},"ts":0}"#,
                "bad_timestamp",
                "1970",
            ),
            (
                r#"{"entity":"a","properties":{"a":1},"stream":"BAD"}"#,
                "bad_stream",
                "BAD",
            ),
            (
                r#"{"entity":"a","properties":{"a":1},"extra":1}"#,
                "unknown_field",
                "\"extra\"",
            ),
            (
                "{\"entity\":\"a\",\"delete\":true}\n{\"entity\":\"b\",\"delete\":true}",
                "invalid_json",
                "NDJSON",
            ),
        ];
        for (body, code, needle) in cases {
            let e = err(native(body));
            assert_eq!(e.code, *code, "{body}: {e}");
            assert!(e.to_string().contains(needle), "{body}: {e}");
        }
    }

    #[test]
    fn errors_name_the_item_and_line() {
        let body = r#"[{"entity":"a","delete":true},{"entity":"b","delete":true},{"entity":"c","delete":true},{"entity":"d","properties":3}]"#;
        let e = err(native(body));
        assert_eq!((e.item, e.line), (Some(3), None));
        assert_eq!(
            e.to_string(),
            "item 3: entity \"d\": properties must be a JSON object, got a number"
        );
        let e = err(native("[1]"));
        assert_eq!(
            e.to_string(),
            "item 0: an update must be a JSON object, got a number"
        );

        let body = "{\"entity\":\"a\",\"delete\":true}\n\n{\"entity\":\"b\",\"delete\":true}\n\n\n\n{\"entity\":\"c\",\"delete\n";
        let e = err(ndjson(body));
        assert_eq!((e.item, e.line, e.code), (Some(2), Some(7), "invalid_json"));
        assert!(
            e.to_string().starts_with("line 7: invalid JSON at column "),
            "{e}"
        );
        let e = err(ndjson("[{\"entity\":\"a\",\"delete\":true}]"));
        assert_eq!(e.code, "not_an_object");
        assert_eq!(err(ndjson("\n \n")).code, "empty_body");
    }

    #[test]
    fn entity_ids_flux_would_refuse() {
        let public = Rules {
            public_mode: true,
            ..rules()
        };
        let body = br#"{"entity":"scada/asset/tr-1","properties":{"a":1}}"#;
        assert!(parse_native(body, false, NOW, &rules()).is_ok());
        assert_eq!(
            parse_native(body, false, NOW, &public).unwrap_err().code,
            "entity_not_public_form"
        );
        let body = br#"{"entity":"scada/asset.tr-1","properties":{"a":1}}"#;
        assert!(parse_native(body, false, NOW, &public).is_ok());
    }

    #[test]
    fn value_over_event_limit() {
        let big = "x".repeat(crate::model::EVENT_BYTES_MAX);
        let body = json!({"entity": "a", "properties": {"blob": big}}).to_string();
        let e = err(native(&body));
        assert_eq!(e.code, "value_too_large");
        assert!(e.message.contains("\"blob\""));
    }

    #[test]
    fn limits_nesting_without_stack_or_memory_blowup() {
        let deep = format!("{}{}", "[".repeat(1_000_000), "]".repeat(1_000_000));
        assert_eq!(err(native(&deep)).code, "too_deep");
        assert_eq!(err(ndjson(&deep)).code, "too_deep");
        assert_eq!(
            parse_flux_single(deep.as_bytes(), &rules())
                .unwrap_err()
                .code,
            "too_deep"
        );
        // Brackets inside strings do not count.
        let body = json!({"entity": "a", "properties": {"s": "[".repeat(1000)}}).to_string();
        assert!(native(&body).is_ok());
        // Exactly at the limit passes: item object (1) + properties (2) + 62 nested arrays.
        let nested = format!(
            "{}1{}",
            "[".repeat(DEPTH_MAX - 2),
            "]".repeat(DEPTH_MAX - 2)
        );
        let body = format!("{{\"entity\":\"a\",\"properties\":{{\"v\":{nested}}}}}");
        assert!(native(&body).is_ok());
        let nested = format!("[{nested}]");
        let body = format!("{{\"entity\":\"a\",\"properties\":{{\"v\":{nested}}}}}");
        assert_eq!(err(native(&body)).code, "too_deep");
    }

    #[test]
    fn limits_items() {
        let mut body = String::from("[");
        for i in 0..=ITEMS_PER_REQUEST_MAX {
            if i > 0 {
                body.push(',');
            }
            body.push_str("{\"entity\":\"a\",\"delete\":true}");
        }
        body.push(']');
        assert_eq!(err(native(&body)).code, "too_many_items");
        let lines = "{\"entity\":\"a\",\"delete\":true}\n".repeat(ITEMS_PER_REQUEST_MAX + 1);
        let e = err(ndjson(&lines));
        assert_eq!(
            (e.code, e.item),
            ("too_many_items", Some(ITEMS_PER_REQUEST_MAX))
        );
    }

    fn flux_event_json(props: Value) -> Value {
        json!({"stream":"scada","source":"gw-1","timestamp":1767225600000_u64,
               "payload":{"entity_id":"scada/x","properties":props}})
    }

    #[test]
    fn flux_single_and_batch() {
        let r = rules();
        let one =
            parse_flux_single(flux_event_json(json!({"a":1})).to_string().as_bytes(), &r).unwrap();
        assert_eq!(
            one,
            vec![Update {
                entity: "scada/x".into(),
                op: props(json!({"a":1})),
                ts_ms: 1_767_225_600_000,
                stream: Some("scada".into()),
                source: Some("gw-1".into())
            }]
        );
        let tomb = parse_flux_single(
            flux_event_json(json!({"__deleted__":true}))
                .to_string()
                .as_bytes(),
            &r,
        )
        .unwrap();
        assert_eq!(tomb[0].op, UpdateOp::Delete);
        let mut with_extras = flux_event_json(json!({"a":1}));
        with_extras["eventId"] = json!("0190e6f2-0000-7000-8000-000000000001");
        with_extras["key"] = json!("k");
        with_extras["somethingElse"] = json!({"ignored": true});
        let batch = json!({"events": [flux_event_json(json!({"a":1})), with_extras]}).to_string();
        assert_eq!(parse_flux_batch(batch.as_bytes(), &r).unwrap().len(), 2);
    }

    #[test]
    fn flux_errors() {
        let r = rules();
        let single = |v: Value| parse_flux_single(v.to_string().as_bytes(), &r).unwrap_err();
        let mut e = flux_event_json(json!({"a":1}));
        e.as_object_mut().unwrap().remove("timestamp");
        assert_eq!(single(e).code, "missing_field");
        for (ts, code) in [
            (json!(0), "bad_ts"),
            (json!(-1), "bad_ts"),
            (json!(1.5), "bad_ts"),
            (json!("1767225600000"), "bad_type"),
        ] {
            let mut e = flux_event_json(json!({"a":1}));
            e["timestamp"] = ts.clone();
            assert_eq!(single(e).code, code, "{ts}");
        }
        let mut e = flux_event_json(json!({"a":1}));
        e["stream"] = json!("Scada_Tags");
        assert_eq!(single(e).code, "bad_stream");
        let mut e = flux_event_json(json!({"a":1}));
        e["source"] = json!("");
        assert_eq!(single(e).code, "empty_source");
        for payload in [json!(null), json!([1])] {
            let mut e = flux_event_json(json!({"a":1}));
            e["payload"] = payload;
            assert!(matches!(single(e).code, "missing_field" | "bad_type"));
        }
        let mut e = flux_event_json(json!({"a":1}));
        e["payload"] = json!({"properties": {"a": 1}});
        assert!(single(e).message.contains("entity_id"));
        let mut e = flux_event_json(json!({"a":1}));
        e["payload"]["properties"] = json!("a=1");
        assert_eq!(single(e).code, "properties_not_object");
        assert_eq!(
            single(flux_event_json(json!({"__deleted__":true,"a":1}))).code,
            "reserved_property"
        );
        assert_eq!(
            single(flux_event_json(json!({"__deleted__":false}))).code,
            "reserved_property"
        );
        assert_eq!(
            single(flux_event_json(json!({"cmd_id":"1"}))).code,
            "protected_property"
        );
        let mut e = flux_event_json(json!({"a":1}));
        e["eventId"] = json!(7);
        assert_eq!(single(e).code, "bad_type");
        assert_eq!(
            parse_flux_single(b"{\"stream\": \"scada\",", &r)
                .unwrap_err()
                .code,
            "invalid_json"
        );
        assert_eq!(parse_flux_single(b"[]", &r).unwrap_err().code, "bad_body");

        let batch = |s: String| parse_flux_batch(s.as_bytes(), &r).unwrap_err();
        assert_eq!(batch(json!({"events": []}).to_string()).code, "empty_batch");
        let bare = batch(json!([flux_event_json(json!({"a":1}))]).to_string());
        assert_eq!(bare.code, "bad_body");
        assert!(bare.message.contains("bare array"));
        assert_eq!(batch(json!({}).to_string()).code, "missing_field");
        let mut bad = flux_event_json(json!({"a":1}));
        bad["stream"] = json!("BAD");
        let e = batch(json!({"events": [flux_event_json(json!({"a":1})), bad]}).to_string());
        assert_eq!((e.item, e.code), (Some(1), "bad_stream"));
        assert!(e.to_string().starts_with("item 1: "));
    }

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2026-03-01T12:00:00.000Z"),
            Some(1_772_366_400_000)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-03-01T14:00:00.5+02:00"),
            Some(1_772_366_400_500)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-03-01t11:30:00.123456789-00:30"),
            Some(1_772_366_400_123)
        );
        assert_eq!(
            parse_rfc3339_ms("2024-02-29 00:00:00z"),
            Some(1_709_164_800_000)
        );
        for bad in [
            "",
            "2026-03-01",
            "2026-03-01T12:00:00",
            "2026-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-03-01T24:00:00Z",
            "2026-03-01T12:00:00.Z",
            "2026-03-01T12:00:00+2:00",
            "1969-12-31T23:59:59Z",
            "2026-03-01T12:00:00Zjunk",
            "+026-03-01T12:00:00Z",
            "2026-03-01T12:00:00+24:00",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn native_export_round_trips() {
        let u = Update {
            entity: "scada/x".into(),
            op: props(json!({"a": [1, {"b": null}], "c": "d"})),
            ts_ms: 42,
            stream: Some("scada".into()),
            source: None,
        };
        let body = to_native_json(&u).to_string();
        assert_eq!(native(&body).unwrap(), vec![u]);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                // Dyadic fractions print and parse back exactly.
                (any::<i32>(), 0..10u32)
                    .prop_map(|(m, e)| Value::from(f64::from(m) / f64::from(1u32 << e))),
                ".{0,12}".prop_map(Value::String),
            ];
            leaf.prop_recursive(4, 32, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::btree_map(".{0,8}", inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        fn valid_update() -> impl Strategy<Value = Update> {
            let op = prop_oneof![
                1 => Just(UpdateOp::Delete),
                4 => prop::collection::btree_map("[a-zA-Z0-9_./ -]{1,16}", json_value(), 1..8)
                    .prop_filter("not reserved or protected", |m| {
                        !m.contains_key(DELETE_PROPERTY) && !m.contains_key("command") && !m.contains_key("cmd_id")
                    })
                    .prop_map(UpdateOp::Set),
            ];
            (
                "[a-z0-9_-]{3,10}/[^\\p{Cc}/]{1,30}",
                op,
                1..crate::validate::TS_MS_END,
                prop::option::of("[a-z0-9]{1,5}(\\.[a-z0-9]{1,5}){0,2}"),
                prop::option::of("[^\\p{Cc}]{1,12}"),
            )
                .prop_map(|(entity, op, ts_ms, stream, source)| Update {
                    entity,
                    op,
                    ts_ms,
                    stream,
                    source,
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            #[test]
            fn never_panics_on_bytes(body in prop::collection::vec(any::<u8>(), 0..512)) {
                let r = Rules { public_mode: true, protected: vec!["command".into()] };
                let _ = parse_native(&body, false, NOW, &r);
                let _ = parse_native(&body, true, NOW, &r);
                let _ = parse_flux_single(&body, &r);
                let _ = parse_flux_batch(&body, &r);
            }

            #[test]
            fn never_panics_on_json(v in json_value()) {
                let r = rules();
                let body = v.to_string();
                let _ = parse_native(body.as_bytes(), false, NOW, &r);
                let _ = parse_native(body.as_bytes(), true, NOW, &r);
                let _ = parse_flux_single(body.as_bytes(), &r);
                let _ = parse_flux_batch(body.as_bytes(), &r);
                let wrapped = json!({"events": [v]}).to_string();
                let _ = parse_flux_batch(wrapped.as_bytes(), &r);
            }

            #[test]
            fn native_round_trip(updates in prop::collection::vec(valid_update(), 1..4), as_ndjson in any::<bool>()) {
                let r = Rules { public_mode: true, protected: vec!["command".into(), "cmd_id".into()] };
                let body = if as_ndjson {
                    updates.iter().map(|u| to_native_json(u).to_string() + "\n").collect::<String>()
                } else {
                    Value::Array(updates.iter().map(to_native_json).collect()).to_string()
                };
                let back = parse_native(body.as_bytes(), as_ndjson, NOW, &r);
                prop_assert_eq!(back, Ok(updates));
            }
        }
    }
}
