//! Process-wide counters for `/metrics`, cheap to bump from any thread (plain atomics).
//! The store's own counters (pending, superseded, ...) live in the store and are read from it
//! when metrics are rendered, so they always agree with the contents.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Link state as the flush worker last saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// No Flux URL configured: buffering only.
    Offline,
    /// Nothing sent yet.
    Unknown,
    Up,
    Down,
    /// Flux refuses the token: paused.
    AuthFailed,
    RateLimited,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Offline => "offline",
            LinkState::Unknown => "unknown",
            LinkState::Up => "up",
            LinkState::Down => "down",
            LinkState::AuthFailed => "auth_failed",
            LinkState::RateLimited => "rate_limited",
        }
    }
    fn code(self) -> u64 {
        self as u64
    }
    fn from_code(c: u64) -> Self {
        match c {
            0 => LinkState::Offline,
            2 => LinkState::Up,
            3 => LinkState::Down,
            4 => LinkState::AuthFailed,
            5 => LinkState::RateLimited,
            _ => LinkState::Unknown,
        }
    }
}

/// Upper bounds (seconds) of the flush latency histogram buckets.
pub const FLUSH_BUCKETS_S: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];

#[derive(Default)]
pub struct Metrics {
    pub ingest_requests: AtomicU64,
    pub ingest_updates_accepted: AtomicU64,
    /// Rejected updates (or requests) by reason code.
    pub ingest_rejected: Mutex<BTreeMap<String, u64>>,
    pub batches: Mutex<BTreeMap<String, u64>>,
    pub events: Mutex<BTreeMap<String, u64>>,
    pub noops: AtomicU64,
    pub conflicts: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub reads: AtomicU64,
    pub read_failures: AtomicU64,
    pub convergence_rewrites: AtomicU64,
    pub link: AtomicU64,
    pub last_delivery_ms: AtomicU64,
    flush_buckets: [AtomicU64; 10],
    flush_count: AtomicU64,
    flush_sum_us: AtomicU64,
    /// The 0xSCADA WebSocket source (`[sources.oxscada_ws]`).
    pub oxscada_ws: crate::source_ws::WsStatus,
    /// When this worker started (epoch ms): restarts show as changes of the gauge.
    started_ms: AtomicU64,
    /// Acknowledged updates found missing from the store when it was opened (damage to
    /// sled's own files, see `store::ACKED_SEQ_FILE`); stays until the next start.
    pub store_lost_updates: AtomicU64,
}

impl Metrics {
    pub fn new(offline: bool) -> Self {
        let m = Metrics::default();
        m.started_ms
            .store(crate::model::now_ms(), Ordering::Relaxed);
        m.set_link(if offline {
            LinkState::Offline
        } else {
            LinkState::Unknown
        });
        m
    }
    pub fn set_link(&self, s: LinkState) {
        self.link.store(s.code(), Ordering::Relaxed);
    }
    pub fn link(&self) -> LinkState {
        LinkState::from_code(self.link.load(Ordering::Relaxed))
    }
    pub fn reject(&self, reason: &str, n: u64) {
        *lock(&self.ingest_rejected)
            .entry(reason.to_string())
            .or_default() += n;
    }
    /// The value of `flux_outbox_ingest_rejected_total{reason="..."}`.
    pub fn rejected(&self, reason: &str) -> u64 {
        lock(&self.ingest_rejected)
            .get(reason)
            .copied()
            .unwrap_or(0)
    }
    pub fn batch(&self, result: &str) {
        *lock(&self.batches).entry(result.to_string()).or_default() += 1;
    }
    pub fn events(&self, result: &str, n: u64) {
        if n > 0 {
            *lock(&self.events).entry(result.to_string()).or_default() += n;
        }
    }
    pub fn events_count(&self, result: &str) -> u64 {
        lock(&self.events).get(result).copied().unwrap_or(0)
    }
    pub fn observe_flush(&self, seconds: f64) {
        for (i, b) in FLUSH_BUCKETS_S.iter().enumerate() {
            if seconds <= *b {
                self.flush_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.flush_count.fetch_add(1, Ordering::Relaxed);
        self.flush_sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// Prometheus text exposition of these counters (the caller appends the store gauges).
    pub fn render(&self, out: &mut String) {
        let g = |out: &mut String, name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        g(
            out,
            "flux_outbox_store_lost_updates",
            "Acknowledged updates missing from the store when it was opened (damaged store files); not 0 needs an operator.",
            "gauge",
            self.store_lost_updates.load(Ordering::Relaxed),
        );
        g(
            out,
            "flux_outbox_ingest_requests_total",
            "Ingest requests received.",
            "counter",
            self.ingest_requests.load(Ordering::Relaxed),
        );
        g(
            out,
            "flux_outbox_ingest_accepted_total",
            "Updates accepted (durable).",
            "counter",
            self.ingest_updates_accepted.load(Ordering::Relaxed),
        );
        labeled(
            out,
            "flux_outbox_ingest_rejected_total",
            "Updates or requests rejected, by reason.",
            "reason",
            &lock(&self.ingest_rejected),
        );
        labeled(
            out,
            "flux_outbox_batches_total",
            "Batches sent to Flux, by result.",
            "result",
            &lock(&self.batches),
        );
        labeled(
            out,
            "flux_outbox_events_total",
            "Events by result.",
            "result",
            &lock(&self.events),
        );
        g(
            out,
            "flux_outbox_noops_total",
            "Keys Flux already held (nothing sent).",
            "counter",
            self.noops.load(Ordering::Relaxed),
        );
        g(
            out,
            "flux_outbox_conflicts_total",
            "Keys changed by another writer since our delivery.",
            "counter",
            self.conflicts.load(Ordering::Relaxed),
        );
        g(
            out,
            "flux_outbox_bytes_sent_total",
            "Request body bytes sent to Flux.",
            "counter",
            self.bytes_sent.load(Ordering::Relaxed),
        );
        g(
            out,
            "flux_outbox_reads_total",
            "Entity reads from Flux (read-merge-write, convergence).",
            "counter",
            self.reads.load(Ordering::Relaxed),
        );
        g(
            out,
            "flux_outbox_read_failures_total",
            "Entity reads that failed.",
            "counter",
            self.read_failures.load(Ordering::Relaxed),
        );
        g(
            out,
            "flux_outbox_convergence_rewrites_total",
            "Keys re-sent after a read-back found an older value.",
            "counter",
            self.convergence_rewrites.load(Ordering::Relaxed),
        );
        let link = self.link();
        let _ = writeln!(out, "# HELP flux_outbox_link_up 1 when the last Flux write succeeded.\n# TYPE flux_outbox_link_up gauge\nflux_outbox_link_up {}", u64::from(link == LinkState::Up));
        let _ = writeln!(out, "# HELP flux_outbox_link_state Link state (label), value 1.\n# TYPE flux_outbox_link_state gauge\nflux_outbox_link_state{{state=\"{}\"}} 1", link.as_str());
        let _ = writeln!(out, "# HELP flux_outbox_start_time_seconds Start time of this worker process.\n# TYPE flux_outbox_start_time_seconds gauge\nflux_outbox_start_time_seconds {}", self.started_ms.load(Ordering::Relaxed) as f64 / 1000.0);
        let last = self.last_delivery_ms.load(Ordering::Relaxed);
        let _ = writeln!(out, "# HELP flux_outbox_last_delivery_timestamp_seconds Time of the last acknowledged delivery.\n# TYPE flux_outbox_last_delivery_timestamp_seconds gauge\nflux_outbox_last_delivery_timestamp_seconds {}", last as f64 / 1000.0);
        let _ = writeln!(out, "# HELP flux_outbox_flush_seconds Latency of one batch write to Flux.\n# TYPE flux_outbox_flush_seconds histogram");
        for (i, b) in FLUSH_BUCKETS_S.iter().enumerate() {
            let _ = writeln!(
                out,
                "flux_outbox_flush_seconds_bucket{{le=\"{b}\"}} {}",
                self.flush_buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.flush_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "flux_outbox_flush_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "flux_outbox_flush_seconds_sum {}",
            self.flush_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "flux_outbox_flush_seconds_count {count}");
        self.oxscada_ws.render(out);
    }
}

fn labeled(out: &mut String, name: &str, help: &str, label: &str, values: &BTreeMap<String, u64>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (k, v) in values {
        let k = k.replace('\\', "\\\\").replace('"', "\\\"");
        let _ = writeln!(out, "{name}{{{label}=\"{k}\"}} {v}");
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `rejected` is the value the Prometheus series shows (the shutdown log line relies on it).
    #[test]
    fn rejected_reads_the_labeled_counter() {
        let m = Metrics::new(true);
        assert_eq!(m.rejected("shutting_down"), 0);
        m.reject("shutting_down", 2);
        m.reject("bad_json", 1);
        assert_eq!(m.rejected("shutting_down"), 2);
        let mut out = String::new();
        m.render(&mut out);
        assert!(
            out.contains("\nflux_outbox_ingest_rejected_total{reason=\"shutting_down\"} 2\n"),
            "{out}"
        );
    }
}
