//! Output: aligned tables for people, JSON / NDJSON for scripts. Every time is given as epoch
//! ms (as stored), RFC 3339 and, where it says how long something has waited, as an age.
//! JSON field names are the library's (`Row`, `LogRow`, `Summary`, `VerifyReport`) plus the
//! derived `*_at`/`ts`/`age` fields, so scripts can rely on them.

use std::fmt::Write as _;

use flux_outbox::admin::Summary;
use flux_outbox::store::{LogRow, Row, VerifyReport};
use serde_json::{json, Map, Value};

use crate::source::Source;
use crate::Format;

/// Longest value shown in a table cell; the JSON output has it whole.
const VALUE_CHARS_MAX: usize = 40;
const ERROR_CHARS_MAX: usize = 60;
/// humantime cannot show times past year 9999 (a corrupt or bogus timestamp).
const RFC3339_MS_MAX: u64 = 253_402_300_800_000;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum RowKind {
    Pending,
    Quarantine,
}

/// RFC 3339 in UTC with milliseconds, or a note for a time humantime cannot show.
pub fn rfc3339(ms: u64) -> String {
    if ms >= RFC3339_MS_MAX {
        return format!("(out of range: {ms} ms)");
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// An age in its two largest units: "3h 12m", "2d 4h", "45s"; "0s" under a second.
pub fn age(ms: u64) -> String {
    let s = ms / 1000;
    let units = [
        (s / 86_400, "d"),
        (s / 3_600 % 24, "h"),
        (s / 60 % 60, "m"),
        (s % 60, "s"),
    ];
    let parts: Vec<String> = units
        .iter()
        .skip_while(|(n, _)| *n == 0)
        .take(2)
        .filter(|(n, _)| *n > 0)
        .map(|(n, u)| format!("{n}{u}"))
        .collect();
    if parts.is_empty() {
        "0s".into()
    } else {
        parts.join(" ")
    }
}

fn shorten(s: &str, max: usize) -> String {
    // Control characters (a newline in a value or an error) would break the table's lines.
    let clean: String = s
        .chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    if clean.chars().count() <= max {
        clean
    } else {
        let mut t: String = clean.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Columns padded to the widest cell; the last column is not padded.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            if i + 1 == n {
                out.push_str(c);
            } else {
                let pad = widths[i].saturating_sub(c.chars().count());
                out.push_str(c);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        // Trailing spaces of an empty last cell are noise.
        let trimmed = out.trim_end_matches(' ').len();
        out.truncate(trimmed);
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn json_text(v: &Value, format: Format) -> String {
    match format {
        Format::Ndjson => {
            let mut out = String::new();
            match v {
                Value::Array(items) => {
                    for i in items {
                        let _ = writeln!(out, "{i}");
                    }
                }
                other => {
                    let _ = writeln!(out, "{other}");
                }
            }
            out
        }
        // Pretty for json: it is also what people get when piping into a pager.
        _ => {
            let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
            s.push('\n');
            s
        }
    }
}

fn object(v: impl serde::Serialize) -> Map<String, Value> {
    match serde_json::to_value(v) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

fn opt_time(ms: Option<u64>) -> Value {
    ms.map(|t| Value::String(rfc3339(t))).unwrap_or(Value::Null)
}

/// One row as JSON: the stored fields, plus the times in RFC 3339 and the age.
pub fn row_json(r: &Row, kind: RowKind, now: u64) -> Value {
    let mut m = object(r);
    if kind == RowKind::Pending {
        // Always null for a pending key: noise in a script's view.
        m.remove("reason");
        m.remove("http_status");
        m.remove("quarantined_at_ms");
    } else {
        m.insert("quarantined_at".into(), opt_time(r.quarantined_at_ms));
    }
    m.insert("ts".into(), Value::String(rfc3339(r.ts_ms)));
    m.insert(
        "pending_since".into(),
        Value::String(rfc3339(r.pending_since_ms)),
    );
    let a = now.saturating_sub(r.pending_since_ms);
    m.insert("age_ms".into(), json!(a));
    m.insert("age".into(), Value::String(age(a)));
    Value::Object(m)
}

fn value_text(v: &Value) -> String {
    // Strings unquoted (what people expect to read), everything else as JSON.
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn footer(out: &mut String, shown: usize, limit: usize, what: &str) {
    if shown == 0 {
        let _ = writeln!(out, "no {what}");
    } else if shown >= limit {
        let _ = writeln!(out, "{shown} {what} shown: the limit; --limit N shows more");
    } else {
        let _ = writeln!(out, "{shown} {what}");
    }
}

pub fn rows(rows: &[Row], kind: RowKind, limit: usize, now: u64, format: Format) -> String {
    if format != Format::Table {
        let items: Vec<Value> = rows.iter().map(|r| row_json(r, kind, now)).collect();
        return json_text(&Value::Array(items), format);
    }
    let mut header = vec![
        "ENTITY",
        "PROPERTY",
        "VALUE",
        "SOURCE TIME",
        "PENDING SINCE",
        "AGE",
        "ATTEMPTS",
        "LAST ERROR",
    ];
    // Issue 5: quarantine shows what pending shows plus when, the HTTP status and the reason
    // (last, as the longest cell).
    if kind == RowKind::Quarantine {
        header.extend(["QUARANTINED", "HTTP", "REASON"]);
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut c = vec![
                shorten(&r.entity, 60),
                shorten(&r.property, 40),
                shorten(&value_text(&r.value), VALUE_CHARS_MAX),
                rfc3339(r.ts_ms),
                rfc3339(r.pending_since_ms),
                age(now.saturating_sub(r.pending_since_ms)),
                r.attempts.to_string(),
                shorten(r.last_error.as_deref().unwrap_or(""), ERROR_CHARS_MAX),
            ];
            if kind == RowKind::Quarantine {
                c.push(r.quarantined_at_ms.map(rfc3339).unwrap_or_default());
                c.push(r.http_status.map(|s| s.to_string()).unwrap_or("-".into()));
                c.push(shorten(r.reason.as_deref().unwrap_or(""), ERROR_CHARS_MAX));
            }
            c
        })
        .collect();
    let mut out = if rows.is_empty() {
        String::new()
    } else {
        table(&header, &cells)
    };
    let what = match kind {
        RowKind::Pending => "pending keys",
        RowKind::Quarantine => "quarantined keys",
    };
    footer(&mut out, rows.len(), limit, what);
    out
}

pub fn log_json(r: &LogRow, now: u64) -> Value {
    let mut m = object(r);
    m.insert("ts".into(), Value::String(rfc3339(r.ts_ms)));
    m.insert("arrived".into(), Value::String(rfc3339(r.arrived_ms)));
    let a = now.saturating_sub(r.arrived_ms);
    m.insert("age_ms".into(), json!(a));
    m.insert("age".into(), Value::String(age(a)));
    Value::Object(m)
}

pub fn log(rows: &[LogRow], limit: usize, now: u64, format: Format) -> String {
    if format != Format::Table {
        let items: Vec<Value> = rows.iter().map(|r| log_json(r, now)).collect();
        return json_text(&Value::Array(items), format);
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let props = if r.delete {
                "(delete entity)".to_string()
            } else {
                serde_json::to_string(&r.properties).unwrap_or_default()
            };
            vec![
                r.seq.to_string(),
                shorten(&r.entity, 60),
                shorten(&props, 2 * VALUE_CHARS_MAX),
                rfc3339(r.ts_ms),
                rfc3339(r.arrived_ms),
                age(now.saturating_sub(r.arrived_ms)),
            ]
        })
        .collect();
    let mut out = if rows.is_empty() {
        String::new()
    } else {
        table(
            &["SEQ", "ENTITY", "UPDATE", "SOURCE TIME", "ARRIVED", "AGE"],
            &cells,
        )
    };
    footer(&mut out, rows.len(), limit, "uncompacted log records");
    out
}

pub fn summary_json(s: &Summary, source: &Source, now: u64) -> Value {
    let mut m = object(s);
    let (mode, from) = source.describe();
    m.insert("mode".into(), json!(mode));
    m.insert("source".into(), json!(from));
    m.insert("oldest_pending".into(), opt_time(s.stats.oldest_pending_ms));
    let oldest_age = s.stats.oldest_pending_ms.map(|t| now.saturating_sub(t));
    m.insert("oldest_pending_age_ms".into(), json!(oldest_age));
    m.insert("oldest_pending_age".into(), json!(oldest_age.map(age)));
    m.insert("last_delivery".into(), opt_time(s.last_delivery_ms));
    Value::Object(m)
}

pub fn summary(s: &Summary, source: &Source, now: u64, format: Format) -> String {
    if format != Format::Table {
        return json_text(&summary_json(s, source, now), format);
    }
    let st = &s.stats;
    let (mode, from) = source.describe();
    let when = |ms: Option<u64>, none: &str| match ms {
        Some(t) => format!("{} ago ({})", age(now.saturating_sub(t)), rfc3339(t)),
        None => none.to_string(),
    };
    let lines: Vec<(&str, String)> = vec![
        ("source", format!("{mode} {from}")),
        (
            "pending",
            format!(
                "{} keys in {} entities",
                st.pending_keys, st.pending_entities
            ),
        ),
        ("oldest pending", when(st.oldest_pending_ms, "-")),
        (
            "log backlog",
            format!("{} updates not yet compacted", st.log_backlog),
        ),
        (
            "quarantine",
            format!(
                "{} keys (ever quarantined {}, requeued {})",
                st.quarantine_keys, st.quarantined_total, st.requeued
            ),
        ),
        ("superseded", st.superseded.to_string()),
        ("late dropped", st.late_dropped.to_string()),
        ("delivered", format!("{} keys", st.delivered)),
        ("corrupt set aside", st.corrupt_set_aside.to_string()),
        ("in flight", format!("{} entities", st.in_flight_entities)),
        (
            "disk",
            format!(
                "{} ({} bytes)",
                bytesize::ByteSize(st.disk_bytes).to_string_as(true),
                st.disk_bytes
            ),
        ),
        ("format version", st.format_version.to_string()),
        ("next seq", st.next_seq.to_string()),
        (
            "link",
            s.link
                .clone()
                .unwrap_or_else(|| "- (offline: the worker is not running)".into()),
        ),
        (
            "last delivery",
            match mode {
                "live" => when(s.last_delivery_ms, "none since the worker started"),
                _ => "- (offline)".into(),
            },
        ),
    ];
    let w = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in lines {
        let _ = writeln!(out, "{k:<w$}  {v}");
    }
    out
}

pub fn verify(r: &VerifyReport, format: Format) -> String {
    if format != Format::Table {
        let mut m = object(r);
        m.insert("ok".into(), json!(r.problems.is_empty()));
        return json_text(&Value::Object(m), format);
    }
    let mut out = String::new();
    if r.problems.is_empty() {
        let _ = writeln!(out, "ok: {} records checked, no problems", r.records);
    } else {
        let _ = writeln!(
            out,
            "{} problems found in {} records:",
            r.problems.len(),
            r.records
        );
        for p in &r.problems {
            let _ = writeln!(out, "  - {}", shorten(p, 400));
        }
    }
    out
}

pub fn requeued(n: u64, format: Format) -> String {
    match format {
        Format::Table => format!("requeued {n} keys (moved from quarantine back to pending)\n"),
        f => json_text(&json!({ "requeued": n }), f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_show_two_units() {
        assert_eq!(age(0), "0s");
        assert_eq!(age(999), "0s");
        assert_eq!(age(45_000), "45s");
        assert_eq!(age((3 * 3600 + 12 * 60 + 5) * 1000), "3h 12m");
        assert_eq!(age((2 * 86_400 + 4 * 3600) * 1000), "2d 4h");
        assert_eq!(age(3600 * 1000), "1h");
        assert_eq!(age((86_400 + 30) * 1000), "1d");
    }

    #[test]
    fn times_out_of_range_do_not_panic() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert!(rfc3339(u64::MAX).starts_with("(out of range"));
    }

    /// Quarantine shows every pending column, LAST ERROR included, then when, the HTTP
    /// status and the reason; the two texts are distinct here so a swap would show.
    #[test]
    fn quarantine_table_keeps_the_last_error_and_adds_its_own_columns() {
        let row = Row {
            entity: "q1".into(),
            property: "x".into(),
            value: json!(1),
            ts_ms: 1_000,
            seq: 5,
            pending_since_ms: 0,
            attempts: 2,
            last_error: Some("timeout".into()),
            reason: Some("rejected: bad value".into()),
            http_status: Some(400),
            quarantined_at_ms: Some(2_000),
        };
        let t = |ms| rfc3339(ms);
        let header =
            "ENTITY  PROPERTY  VALUE  SOURCE TIME               PENDING SINCE             \
                      AGE  ATTEMPTS  LAST ERROR  QUARANTINED               HTTP  REASON";
        let line = format!(
            "q1      x         1      {}  {}  3s   2         timeout     {}  400   \
             rejected: bad value",
            t(1_000),
            t(0),
            t(2_000)
        );
        assert_eq!(
            rows(
                &[row.clone()],
                RowKind::Quarantine,
                10,
                3_000,
                Format::Table
            ),
            format!("{header}\n{line}\n1 quarantined keys\n")
        );
        // Pending has the same first columns and stops at LAST ERROR.
        let pending = rows(&[row], RowKind::Pending, 10, 3_000, Format::Table);
        assert!(
            pending.starts_with(
                "ENTITY  PROPERTY  VALUE  SOURCE TIME               PENDING SINCE             \
                 AGE  ATTEMPTS  LAST ERROR\n"
            ),
            "{pending}"
        );
    }

    #[test]
    fn shorten_escapes_and_cuts() {
        assert_eq!(shorten("a\nb", 10), "a\\nb");
        assert_eq!(shorten("abcdef", 4), "abc…");
    }
}
