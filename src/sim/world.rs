//! The simulated state engine: entities, the applied-event log, namespaces and rate buckets.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::util::rfc3339_nanos;

/// One entity as the sim holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct Entity {
    pub id: String,
    pub properties: Map<String, Value>,
    /// Processing time of the last event that changed it (not the event timestamp), as in Flux.
    pub last_updated: SystemTime,
}

impl Entity {
    /// `lastUpdated` as Flux prints it: RFC 3339 with nanoseconds.
    pub fn last_updated_rfc3339(&self) -> String {
        rfc3339_nanos(self.last_updated)
    }

    pub(crate) fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("id".into(), Value::String(self.id.clone()));
        m.insert("properties".into(), Value::Object(self.properties.clone()));
        m.insert(
            "lastUpdated".into(),
            Value::String(self.last_updated_rfc3339()),
        );
        Value::Object(m)
    }
}

/// One event the state engine applied, in application order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppliedEvent {
    /// 0-based position in application order over the sim's lifetime.
    pub index: u64,
    #[serde(rename = "eventId")]
    pub event_id: String,
    pub stream: String,
    pub source: String,
    pub timestamp: i64,
    /// `None` when the payload had no string `entity_id` (accepted, changed nothing).
    pub entity_id: Option<String>,
    /// `payload.properties` as sent (`null` when absent).
    pub properties: Value,
    /// True when applied after its request was answered with a failure (late apply fault).
    pub late: bool,
}

/// One event refused per event for validation (`eventId: null` in a batch answer, 400 for a
/// single POST), kept for test oracles: what a worker should have quarantined.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RejectedEvent {
    /// The `eventId` the client sent, if any.
    #[serde(rename = "eventId")]
    pub event_id: Option<String>,
    /// `payload.entity_id` when it is a string.
    pub entity_id: Option<String>,
    /// `payload.properties` as sent (`null` when absent).
    pub properties: Value,
    /// The validation message Flux (or the fault) gave.
    pub reason: String,
}

/// An event that passed validation and got its id; what the sim "publishes".
#[derive(Clone, Debug)]
pub(crate) struct Prepared {
    pub event_id: String,
    pub stream: String,
    pub source: String,
    pub timestamp: i64,
    pub payload: Value,
}

pub(crate) struct World {
    pub entities: HashMap<String, Entity>,
    pub log: VecDeque<AppliedEvent>,
    pub log_capacity: usize,
    pub applied: u64,
    /// Events refused for validation, newest last, at most `log_capacity`.
    pub rejected: VecDeque<RejectedEvent>,
    /// Per entity, its state before its last applied event (`None`: it did not exist), kept
    /// only while `keep_previous` (the stale-read fault): a clone per event costs memory and
    /// time a benchmark should not pay.
    previous: HashMap<String, Option<Entity>>,
    keep_previous: bool,
}

impl World {
    pub fn new(log_capacity: usize, keep_previous: bool) -> Self {
        World {
            entities: HashMap::new(),
            log: VecDeque::new(),
            log_capacity,
            applied: 0,
            rejected: VecDeque::new(),
            previous: HashMap::new(),
            keep_previous,
        }
    }

    /// Starts or stops remembering earlier states (stopping forgets them).
    pub fn keep_previous(&mut self, on: bool) {
        self.keep_previous = on;
        if !on {
            self.previous = HashMap::new();
        }
    }

    /// An entity as a read shows it; `stale`: as it was before its last applied event, when
    /// that is remembered.
    pub fn read(&self, id: &str, stale: bool) -> Option<Entity> {
        match self.previous.get(id) {
            Some(before) if stale => before.clone(),
            _ => self.entities.get(id).cloned(),
        }
    }

    /// Folds one event into state exactly like Flux's `process_event`.
    pub fn apply(&mut self, ev: Prepared, late: bool, now: SystemTime) {
        let Prepared {
            event_id,
            stream,
            source,
            timestamp,
            mut payload,
        } = ev;
        let entity_id = payload
            .get("entity_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let properties = payload
            .get_mut("properties")
            .map(Value::take)
            .unwrap_or(Value::Null);
        if let (Some(id), Some(props)) = (&entity_id, properties.as_object()) {
            if self.keep_previous && !props.is_empty() {
                self.previous
                    .insert(id.clone(), self.entities.get(id).cloned());
            }
            if props.get(crate::model::DELETE_PROPERTY) == Some(&Value::Bool(true)) {
                self.entities.remove(id);
            } else if !props.is_empty() {
                // Flux creates the entity lazily on its first property, so `{}` creates nothing.
                let e = self.entities.entry(id.clone()).or_insert_with(|| Entity {
                    id: id.clone(),
                    properties: Map::new(),
                    last_updated: now,
                });
                for (k, v) in props {
                    e.properties.insert(k.clone(), v.clone());
                }
                e.last_updated = now;
            }
        }
        let index = self.applied;
        self.applied += 1;
        if self.log_capacity > 0 {
            if self.log.len() >= self.log_capacity {
                self.log.pop_front();
            }
            self.log.push_back(AppliedEvent {
                index,
                event_id,
                stream,
                source,
                timestamp,
                entity_id,
                properties,
                late,
            });
        }
    }

    /// Remembers an event refused for validation (bounded like the applied log).
    pub fn reject(&mut self, event_id: Option<&str>, payload: &Value, reason: &str) {
        if self.log_capacity == 0 {
            return;
        }
        if self.rejected.len() >= self.log_capacity {
            self.rejected.pop_front();
        }
        self.rejected.push_back(RejectedEvent {
            event_id: event_id.map(str::to_owned),
            entity_id: payload
                .get("entity_id")
                .and_then(Value::as_str)
                .map(str::to_owned),
            properties: payload.get("properties").cloned().unwrap_or(Value::Null),
            reason: reason.to_owned(),
        });
    }

    /// Retained log entries with `index >= since`.
    pub fn log_since(&self, since: u64, limit: usize) -> Vec<AppliedEvent> {
        let first = self.log.front().map(|e| e.index).unwrap_or(self.applied);
        let skip = since.saturating_sub(first) as usize;
        self.log.iter().skip(skip).take(limit).cloned().collect()
    }
}

pub(crate) struct Namespace {
    pub id: String,
    pub token: String,
}

/// Namespaces and their token buckets (public mode).
pub(crate) struct Auth {
    pub by_name: HashMap<String, Namespace>,
    pub buckets: HashMap<String, Bucket>,
}

pub(crate) struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Auth {
    pub fn new() -> Self {
        Auth {
            by_name: HashMap::new(),
            buckets: HashMap::new(),
        }
    }

    /// Flux's token bucket: starts full, refills continuously, one token per event.
    pub fn take_token(&mut self, key: &str, capacity: u64, refill_per_min: u64) -> bool {
        let now = Instant::now();
        let b = self
            .buckets
            .entry(key.to_owned())
            .or_insert_with(|| Bucket {
                tokens: capacity as f64,
                last: now,
            });
        let elapsed = now.duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * refill_per_min as f64 / 60.0).min(capacity as f64);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

macro_rules! stats {
    ($($name:ident),* $(,)?) => {
        /// Counters by outcome, readable at `GET /_sim/stats`.
        #[derive(Default)]
        pub(crate) struct Stats { $(pub $name: AtomicU64,)* }

        /// A snapshot of the sim's counters.
        #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct SimStats { $(pub $name: u64,)* }

        impl Stats {
            pub fn snapshot(&self) -> SimStats {
                SimStats { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

stats! {
    // requests
    requests_single, requests_batch, requests_read, answered_2xx, answered_4xx, answered_5xx,
    // request-level faults
    fault_link_down, fault_reset, fault_hang, fault_429, fault_500, fault_lost_answer,
    fault_stale_read,
    // events
    events_received, events_applied, events_applied_late, events_validation_failed,
    events_auth_failed, events_rate_limited, events_publish_failed, events_late_scheduled,
}

impl Stats {
    pub fn add(c: &AtomicU64, n: u64) {
        if n > 0 {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }
}
