//! Read-merge-write rules: what to send to Flux for one entity, given what Flux holds now.
//!
//! Pure functions, no I/O. The flush worker reads the entity (`GET /api/state/entities/{id}`),
//! calls [`plan_entity`], sends what the plan says, and records what it sent.
//!
//! Why this exists: Flux replaces a property value whole (nested objects are not merged), applies
//! events in arrival order, and has no compare-and-set. Other producers (operators, other
//! gateways) may write the same entity. Reading first lets the worker (a) keep fields that others
//! set inside an object value, (b) skip writes that would change nothing, and (c) notice that
//! someone else changed a key after this worker last delivered it.
//!
//! # Rules, per property (first match wins)
//! 1. **Protected** — names in [`MergeOptions::protected`] (default `command`, `cmd_id`) are never
//!    written: they belong to whoever issues commands to the device, and a replayed old value
//!    could re-trigger a command.
//! 2. **Delete marker** — the property [`DELETE_PROPERTY`] is the entity delete: the plan
//!    carries it as [`EntityPlan::tombstone`], always sent as `{"__deleted__": true}` ALONE in
//!    its own event, whatever Flux holds (a read may be stale, and deleting twice is harmless).
//!    It never appears in [`EntityPlan::properties_to_send`].
//! 3. **Blind mode** ([`Remote::Blind`], no read was made) — `Send` `merge_patch({}, ours)`:
//!    no merge with Flux's value (none was read), but an object value loses its `null`
//!    members (recursively), as RFC 7386 gives for any target.
//! 4. **Entity absent** in Flux ([`Remote::Absent`], 404) — `Send` `merge_patch({}, ours)`.
//! 5. Otherwise compute the candidate `merge_patch(flux_value, our_value)`, Flux's value being
//!    `null` when the property is absent (RFC 7386): a non-object value of ours replaces
//!    Flux's whole; an object value of ours is merged onto Flux's object (fields others set
//!    inside survive; a `null` member in our object removes that field), or, when Flux holds
//!    no object, onto `{}` (RFC 7386: `merge_patch(non-object, patch) = merge_patch({}, patch)`,
//!    so our `null` members are dropped, never stored: Flux itself would store them as null).
//! 6. **NoOp** — the candidate equals what Flux already has AND the read can be trusted to
//!    include this worker's last delivery of the key: nothing to send, the key counts as
//!    delivered. Trusted means the worker never delivered the key (`delivered` is `None`), or
//!    Flux's value hashes to exactly what it last delivered. An equal value that is NOT what
//!    we last delivered may come from a stale read (Flux applies asynchronously; a read right
//!    after a 200 is sometimes the state before our write): it is `Send` (never a conflict;
//!    the read shows our own value). An entity delete this worker delivered counts as the
//!    last delivery, of "absent" (hashed as `null`), for every key without a newer one.
//! 7. **Conflict** — this worker delivered the key before (`delivered` is `Some`, a delivered
//!    entity delete included, see 6), Flux's value
//!    (absent counts as a value) does not hash to what was delivered, AND Flux's `lastUpdated` is
//!    after the delivery time. Someone else wrote it since. Under [`ConflictPolicy::Overwrite`]
//!    (default) send the candidate anyway; under [`ConflictPolicy::KeepRemote`] send nothing and
//!    treat the key as settled. A differing value with `lastUpdated` at or before our delivery is
//!    NOT a conflict: that is our own event not applied yet (Flux applies asynchronously), so we
//!    send. Unknown `lastUpdated` is treated the same way (no conflict).
//! 8. Otherwise **Send** the candidate.
//!
//! Properties not in `writes` never appear in the plan: Flux keeps properties it is not sent,
//! so the worker sends only its own keys.
//!
//! What the caller records as delivered: the hash ([`value_hash`]) of the value actually SENT
//! (the merged candidate), or for `NoOp` the value Flux holds (equal to the candidate), with the
//! time of Flux's acknowledgement. Clocks: `delivered_at_ms` is this machine's clock and
//! `lastUpdated` is Flux's; skew between them shifts the conflict window by the skew.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

pub use crate::model::value_hash;
use crate::model::DELETE_PROPERTY;

/// RFC 7386 JSON Merge Patch: apply `patch` to `target` and return the result.
///
/// A non-object patch replaces the target whole; an object patch merges member by member, a
/// `null` member removing that member from the target.
pub fn merge_patch(target: &Value, patch: &Value) -> Value {
    let Value::Object(patch_map) = patch else {
        return patch.clone();
    };
    let mut result = match target {
        Value::Object(t) => t.clone(),
        _ => Map::new(),
    };
    for (name, patch_value) in patch_map {
        if patch_value.is_null() {
            result.remove(name);
        } else {
            let merged = merge_patch(result.get(name).unwrap_or(&Value::Null), patch_value);
            result.insert(name.clone(), merged);
        }
    }
    Value::Object(result)
}

/// What this worker last delivered for one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivered {
    /// [`value_hash`] of the value Flux acknowledged.
    pub value_hash: u64,
    /// When Flux acknowledged it, epoch milliseconds (this machine's clock).
    pub delivered_at_ms: u64,
}

/// What Flux holds for the entity, as far as the planner knows.
#[derive(Clone, Copy, Debug)]
pub enum Remote<'a> {
    /// No read was made (blind mode): send everything as is.
    Blind,
    /// Flux answered 404: the entity does not exist.
    Absent,
    /// Flux's current state.
    Present {
        properties: &'a Map<String, Value>,
        /// Flux's `lastUpdated` (processing time of the last applied event), epoch ms.
        last_updated_ms: Option<u64>,
    },
}

/// One property this worker wants to write.
#[derive(Clone, Copy, Debug)]
pub struct PropertyWrite<'a> {
    pub name: &'a str,
    pub value: &'a Value,
    pub delivered: Option<Delivered>,
}

/// What to do when someone else changed a key after this worker delivered it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConflictPolicy {
    /// The gateway is the source of truth: send ours.
    #[default]
    Overwrite,
    /// The other writer wins: do not send, treat the key as settled.
    KeepRemote,
}

/// Planner settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergeOptions {
    pub policy: ConflictPolicy,
    /// Property names never written.
    pub protected: BTreeSet<String>,
}

/// Property names protected by default.
pub const DEFAULT_PROTECTED: [&str; 2] = ["command", "cmd_id"];

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            policy: ConflictPolicy::Overwrite,
            protected: DEFAULT_PROTECTED.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// How a conflict was resolved.
#[derive(Clone, Debug, PartialEq)]
pub enum Resolution {
    Send(Value),
    KeepRemote,
}

/// The plan for one property.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Send this value (already merged where rule 5 applies).
    Send(Value),
    /// Flux already holds exactly this: nothing to send, the key counts as delivered.
    NoOp,
    /// Someone else changed the key after our last delivery.
    Conflict { resolution: Resolution },
    /// Never written.
    Protected,
}

impl Decision {
    /// The value to send, if any.
    pub fn value_to_send(&self) -> Option<&Value> {
        match self {
            Decision::Send(v)
            | Decision::Conflict {
                resolution: Resolution::Send(v),
            } => Some(v),
            _ => None,
        }
    }
}

/// The plan for one entity.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct EntityPlan {
    /// Per property written, its decision. Does not contain the delete marker.
    pub decisions: BTreeMap<String, Decision>,
    /// The entity delete is to be sent, as `{"__deleted__": true}` alone in its own event. The
    /// caller orders it against `properties_to_send` by version (the planner does not see
    /// versions).
    pub tombstone: bool,
}

impl EntityPlan {
    /// The properties for the (non-delete) event: every `Send` and `Conflict`-resolved-to-send.
    /// Empty when nothing needs sending. Never contains [`DELETE_PROPERTY`].
    pub fn properties_to_send(&self) -> Map<String, Value> {
        self.decisions
            .iter()
            .filter_map(|(name, d)| d.value_to_send().map(|v| (name.clone(), v.clone())))
            .collect()
    }

    /// The tombstone event's properties, when the plan deletes the entity.
    pub fn tombstone_properties(&self) -> Option<Map<String, Value>> {
        self.tombstone.then(tombstone_properties)
    }

    /// Keys settled without sending (NoOp, conflict kept remote): the caller marks them delivered.
    pub fn settled_without_send(&self) -> impl Iterator<Item = &str> {
        self.decisions.iter().filter_map(|(name, d)| match d {
            Decision::NoOp
            | Decision::Conflict {
                resolution: Resolution::KeepRemote,
            } => Some(name.as_str()),
            _ => None,
        })
    }
}

/// `{"__deleted__": true}`: the only properties an entity-delete event carries.
pub fn tombstone_properties() -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(DELETE_PROPERTY.to_string(), Value::Bool(true));
    m
}

/// Plan the writes for one entity (see the module doc for the rules). When `writes` names a
/// property twice, the later entry wins.
pub fn plan_entity(
    remote: Remote<'_>,
    writes: &[PropertyWrite<'_>],
    opts: &MergeOptions,
) -> EntityPlan {
    let mut plan = EntityPlan::default();
    for w in writes {
        if w.name == DELETE_PROPERTY {
            plan.tombstone = true;
            continue;
        }
        let decision = if opts.protected.contains(w.name) {
            Decision::Protected
        } else {
            decide(remote, w, opts.policy)
        };
        plan.decisions.insert(w.name.to_string(), decision);
    }
    plan
}

fn decide(remote: Remote<'_>, w: &PropertyWrite<'_>, policy: ConflictPolicy) -> Decision {
    // Flux replaces a value whole, so what we send is what Flux will hold: send the RFC 7386
    // result, never the raw patch (whose `null` members Flux would store instead of removing).
    // The caller records the hash of exactly this value as delivered.
    let (properties, last_updated_ms) = match remote {
        Remote::Blind | Remote::Absent => {
            return Decision::Send(merge_patch(&Value::Null, w.value));
        }
        Remote::Present {
            properties,
            last_updated_ms,
        } => (properties, last_updated_ms),
    };
    let current = properties.get(w.name);
    let candidate = merge_patch(current.unwrap_or(&Value::Null), w.value);
    if current == Some(&candidate) {
        // Skipping the write is safe only if this read includes our last delivery of the key:
        // Flux answers 200 before it applies, and a read straight after is sometimes stale. If
        // v=2 was just delivered and the next value is 1 again, a stale read showing the older
        // 1 must not settle the key, or Flux keeps 2 for good. `lastUpdated` cannot tell:
        // it is Flux's processing time on Flux's clock, and an event logged before ours may
        // be processed after our acknowledgement, so a stale state can carry a `lastUpdated`
        // later than our delivery. The value itself can: if Flux shows exactly what we last
        // delivered, our delivery is in the read (or the read misses only someone else's
        // later write, which no read can rule out). Otherwise send: a redundant write of an
        // equal value is harmless, a skipped one is a lost update. A key never delivered has
        // nothing of ours to miss; an unknown outcome (no record) is re-checked by the
        // flusher's convergence read-back.
        let includes_our_last_delivery = w
            .delivered
            .is_none_or(|d| value_hash(&candidate) == d.value_hash);
        return if includes_our_last_delivery {
            Decision::NoOp
        } else {
            Decision::Send(candidate)
        };
    }
    if let (Some(d), Some(updated)) = (w.delivered, last_updated_ms) {
        // An absent property hashes as null: Flux cannot remove one property, so absence after
        // our delivery means the entity was deleted and re-created by someone else.
        let remote_hash = value_hash(current.unwrap_or(&Value::Null));
        if remote_hash != d.value_hash && updated > d.delivered_at_ms {
            let resolution = match policy {
                ConflictPolicy::Overwrite => Resolution::Send(candidate),
                ConflictPolicy::KeepRemote => Resolution::KeepRemote,
            };
            return Decision::Conflict { resolution };
        }
    }
    Decision::Send(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("test fixture is not an object"),
        }
    }

    /// RFC 7386 Appendix A, every example.
    #[test]
    fn merge_patch_rfc7386_appendix_a() {
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (target, patch, want) in cases {
            assert_eq!(
                merge_patch(&target, &patch),
                want,
                "target {target} patch {patch}"
            );
        }
    }

    /// RFC 7386 section 3's larger example.
    #[test]
    fn merge_patch_rfc7386_section_3_example() {
        let target = json!({
            "title": "Goodbye!",
            "author": {"givenName": "John", "familyName": "Doe"},
            "tags": ["example", "sample"],
            "content": "This will be unchanged"
        });
        let patch = json!({
            "title": "Hello!",
            "phoneNumber": "+01-123-456-7890",
            "author": {"familyName": null},
            "tags": ["example"]
        });
        let want = json!({
            "title": "Hello!",
            "author": {"givenName": "John"},
            "tags": ["example"],
            "content": "This will be unchanged",
            "phoneNumber": "+01-123-456-7890"
        });
        assert_eq!(merge_patch(&target, &patch), want);
    }

    fn present(props: &Map<String, Value>, last_updated_ms: u64) -> Remote<'_> {
        Remote::Present {
            properties: props,
            last_updated_ms: Some(last_updated_ms),
        }
    }

    fn w<'a>(name: &'a str, value: &'a Value, delivered: Option<Delivered>) -> PropertyWrite<'a> {
        PropertyWrite {
            name,
            value,
            delivered,
        }
    }

    /// The decision for a single property `obj` holding `value` (never delivered before), with
    /// the default options.
    fn decide_obj(remote: Remote<'_>, value: &Value) -> Decision {
        let plan = plan_entity(remote, &[w("obj", value, None)], &MergeOptions::default());
        plan.decisions["obj"].clone()
    }

    #[test]
    fn entity_absent_sends_values_with_object_null_members_dropped() {
        let v1 = json!({"x": 1, "y": null, "z": {"a": null, "b": 2}});
        let v2 = json!(5);
        let v3 = json!(null);
        let plan = plan_entity(
            Remote::Absent,
            &[w("obj", &v1, None), w("n", &v2, None), w("nul", &v3, None)],
            &MergeOptions::default(),
        );
        // RFC 7386 against no target: merge_patch({}, patch) drops null members, recursively.
        assert_eq!(
            plan.decisions["obj"],
            Decision::Send(json!({"x": 1, "z": {"b": 2}}))
        );
        assert_eq!(plan.decisions["n"], Decision::Send(v2.clone()));
        // A null VALUE (not a member of an object) replaces whole: Flux stores null.
        assert_eq!(plan.decisions["nul"], Decision::Send(Value::Null));
        assert!(!plan.tombstone);
    }

    #[test]
    fn blind_mode_sends_as_is_without_merge() {
        let v = json!({"x": 1});
        assert_eq!(decide_obj(Remote::Blind, &v), Decision::Send(v.clone()));
        // Nothing was read: RFC 7386 against `{}`, so null members are still never stored.
        let v = json!({"x": 1, "y": null});
        assert_eq!(
            decide_obj(Remote::Blind, &v),
            Decision::Send(json!({"x": 1}))
        );
    }

    #[test]
    fn object_value_is_merged_into_flux_object_so_others_fields_survive() {
        let remote = obj(json!({"obj": {"x": 1, "set_by_other": "keep"}}));
        let ours = json!({"x": 2});
        assert_eq!(
            decide_obj(present(&remote, 10), &ours),
            Decision::Send(json!({"x": 2, "set_by_other": "keep"}))
        );
    }

    /// RFC 7386: merge_patch(non-object target, patch) = merge_patch({}, patch). Over a
    /// non-object, or a property Flux does not have, our null members are dropped (recursively)
    /// instead of being stored as null.
    #[test]
    fn object_over_non_object_or_absent_property_follows_rfc7386() {
        let ours = json!({"x": null, "y": 1, "z": {"a": null, "b": {"c": null}}});
        let want = json!({"y": 1, "z": {"b": {}}});
        for remote in [
            obj(json!({"obj": 7})),
            obj(json!({"obj": [1, 2]})),
            obj(json!({"obj": null})),
            obj(json!({"other": 1})),
        ] {
            let decision = decide_obj(present(&remote, 10), &ours);
            assert_eq!(decision, Decision::Send(want.clone()), "remote {remote:?}");
            assert_eq!(decision, Decision::Send(merge_patch(&json!({}), &ours)));
        }
        // Flux already holds the RFC result: nothing to send.
        let remote = obj(json!({"obj": {"y": 1, "z": {"b": {}}}}));
        assert_eq!(decide_obj(present(&remote, 10), &ours), Decision::NoOp);
    }

    #[test]
    fn equal_value_is_noop_and_settled() {
        let remote = obj(json!({"a": 1, "obj": {"x": 1, "y": 2}}));
        let a = json!(1);
        let o = json!({"x": 1});
        let plan = plan_entity(
            present(&remote, 10),
            &[w("a", &a, None), w("obj", &o, None)],
            &MergeOptions::default(),
        );
        assert_eq!(plan.decisions["a"], Decision::NoOp);
        assert_eq!(plan.decisions["obj"], Decision::NoOp);
        assert!(plan.properties_to_send().is_empty());
        assert_eq!(
            plan.settled_without_send().collect::<Vec<_>>(),
            vec!["a", "obj"]
        );
    }

    fn delivered(v: &Value, at: u64) -> Option<Delivered> {
        Some(Delivered {
            value_hash: value_hash(v),
            delivered_at_ms: at,
        })
    }

    /// v=2 was delivered, the next value is 1 again, and a stale read still shows the older 1
    /// (lastUpdated before our delivery, or even after it): not a no-op, send.
    #[test]
    fn equal_value_not_matching_our_last_delivery_is_sent_not_noop() {
        let remote = obj(json!({"a": 1, "o": {"x": 1}}));
        let one = json!(1);
        let two = json!(2);
        let o = json!({"x": 1});
        let o_prev = json!({"x": 2});
        for policy in [ConflictPolicy::Overwrite, ConflictPolicy::KeepRemote] {
            let opts = MergeOptions {
                policy,
                ..MergeOptions::default()
            };
            for updated in [500, 1_000, 5_000] {
                let plan = plan_entity(
                    present(&remote, updated),
                    &[
                        w("a", &one, delivered(&two, 1_000)),
                        w("o", &o, delivered(&o_prev, 1_000)),
                    ],
                    &opts,
                );
                assert_eq!(
                    plan.decisions["a"],
                    Decision::Send(one.clone()),
                    "{policy:?}"
                );
                assert_eq!(plan.decisions["o"], Decision::Send(o.clone()), "{policy:?}");
                assert_eq!(plan.settled_without_send().count(), 0);
            }
        }
        // Flux shows exactly our last delivery: the read includes it, a true no-op.
        let plan = plan_entity(
            present(&remote, 5_000),
            &[w("a", &one, delivered(&one, 1_000))],
            &MergeOptions::default(),
        );
        assert_eq!(plan.decisions["a"], Decision::NoOp);
    }

    #[test]
    fn conflict_overwrite_sends_ours() {
        let remote = obj(json!({"a": "operator set this"}));
        let ours = json!("gateway value");
        let prev = json!("what we sent before");
        let plan = plan_entity(
            present(&remote, 2_000),
            &[w("a", &ours, delivered(&prev, 1_000))],
            &MergeOptions::default(),
        );
        assert_eq!(
            plan.decisions["a"],
            Decision::Conflict {
                resolution: Resolution::Send(ours.clone())
            }
        );
        assert_eq!(plan.properties_to_send().get("a"), Some(&ours));
    }

    #[test]
    fn conflict_keep_remote_sends_nothing_and_settles() {
        let remote = obj(json!({"a": "operator set this"}));
        let ours = json!("gateway value");
        let prev = json!("what we sent before");
        let opts = MergeOptions {
            policy: ConflictPolicy::KeepRemote,
            ..MergeOptions::default()
        };
        let plan = plan_entity(
            present(&remote, 2_000),
            &[w("a", &ours, delivered(&prev, 1_000))],
            &opts,
        );
        assert_eq!(
            plan.decisions["a"],
            Decision::Conflict {
                resolution: Resolution::KeepRemote
            }
        );
        assert!(plan.properties_to_send().is_empty());
        assert_eq!(plan.settled_without_send().collect::<Vec<_>>(), vec!["a"]);
    }

    #[test]
    fn conflict_when_property_vanished_after_our_delivery() {
        let remote = obj(json!({"other": 1}));
        let ours = json!(3);
        let prev = json!(2);
        let opts = MergeOptions {
            policy: ConflictPolicy::KeepRemote,
            ..MergeOptions::default()
        };
        let plan = plan_entity(
            present(&remote, 2_000),
            &[w("a", &ours, delivered(&prev, 1_000))],
            &opts,
        );
        assert_eq!(
            plan.decisions["a"],
            Decision::Conflict {
                resolution: Resolution::KeepRemote
            }
        );
    }

    #[test]
    fn differing_value_not_updated_after_delivery_is_not_a_conflict() {
        // Flux still shows an older value and lastUpdated is before our delivery: our event is
        // not applied yet (asynchronous apply), or the read is stale. Send, even under KeepRemote.
        let remote = obj(json!({"a": "older"}));
        let ours = json!("new");
        let prev = json!("what we sent before");
        let opts = MergeOptions {
            policy: ConflictPolicy::KeepRemote,
            ..MergeOptions::default()
        };
        let plan = plan_entity(
            present(&remote, 1_000),
            &[w("a", &ours, delivered(&prev, 1_000))],
            &opts,
        );
        assert_eq!(plan.decisions["a"], Decision::Send(ours.clone()));
    }

    #[test]
    fn remote_equal_to_our_last_delivery_is_not_a_conflict() {
        let remote = obj(json!({"a": 1}));
        let ours = json!(2);
        let prev = json!(1);
        let opts = MergeOptions {
            policy: ConflictPolicy::KeepRemote,
            ..MergeOptions::default()
        };
        let plan = plan_entity(
            present(&remote, 9_000),
            &[w("a", &ours, delivered(&prev, 1_000))],
            &opts,
        );
        assert_eq!(plan.decisions["a"], Decision::Send(ours.clone()));
    }

    #[test]
    fn unknown_last_updated_is_not_a_conflict() {
        let remote = obj(json!({"a": "x"}));
        let ours = json!("y");
        let prev = json!("z");
        let opts = MergeOptions {
            policy: ConflictPolicy::KeepRemote,
            ..MergeOptions::default()
        };
        let r = Remote::Present {
            properties: &remote,
            last_updated_ms: None,
        };
        let plan = plan_entity(r, &[w("a", &ours, delivered(&prev, 1_000))], &opts);
        assert_eq!(plan.decisions["a"], Decision::Send(ours.clone()));
    }

    #[test]
    fn no_delivery_record_is_never_a_conflict() {
        let remote = obj(json!({"a": "x"}));
        let ours = json!("y");
        let opts = MergeOptions {
            policy: ConflictPolicy::KeepRemote,
            ..MergeOptions::default()
        };
        let plan = plan_entity(present(&remote, 9_000), &[w("a", &ours, None)], &opts);
        assert_eq!(plan.decisions["a"], Decision::Send(ours.clone()));
    }

    #[test]
    fn protected_properties_are_never_written_in_any_mode() {
        let remote = obj(json!({}));
        let v = json!("reboot");
        for r in [Remote::Blind, Remote::Absent, present(&remote, 1)] {
            let plan = plan_entity(
                r,
                &[
                    w("command", &v, None),
                    w("cmd_id", &v, None),
                    w("ok", &v, None),
                ],
                &MergeOptions::default(),
            );
            assert_eq!(plan.decisions["command"], Decision::Protected);
            assert_eq!(plan.decisions["cmd_id"], Decision::Protected);
            let sent = plan.properties_to_send();
            assert_eq!(sent.keys().collect::<Vec<_>>(), vec!["ok"]);
        }
        // Custom list replaces the default one.
        let opts = MergeOptions {
            protected: ["secret".to_string()].into(),
            ..Default::default()
        };
        let plan = plan_entity(
            Remote::Blind,
            &[w("command", &v, None), w("secret", &v, None)],
            &opts,
        );
        assert_eq!(plan.decisions["command"], Decision::Send(v.clone()));
        assert_eq!(plan.decisions["secret"], Decision::Protected);
    }

    #[test]
    fn delete_marker_is_a_tombstone_alone() {
        let remote = obj(json!({"a": 1}));
        let any = json!("whatever value the caller passed");
        let other = json!(2);
        for r in [Remote::Blind, Remote::Absent, present(&remote, 1)] {
            let plan = plan_entity(
                r,
                &[w(DELETE_PROPERTY, &any, None), w("b", &other, None)],
                &MergeOptions::default(),
            );
            assert!(plan.tombstone);
            assert_eq!(
                plan.tombstone_properties(),
                Some(obj(json!({"__deleted__": true})))
            );
            assert!(!plan.properties_to_send().contains_key(DELETE_PROPERTY));
            assert!(!plan.decisions.contains_key(DELETE_PROPERTY));
        }
        let plan = plan_entity(
            Remote::Blind,
            &[w("b", &other, None)],
            &MergeOptions::default(),
        );
        assert_eq!(plan.tombstone_properties(), None);
    }

    #[test]
    fn only_written_properties_appear_in_the_output() {
        let remote = obj(json!({"a": 1, "b": 2, "c": {"x": 1}, "command": "stop"}));
        let ours = json!(5);
        let plan = plan_entity(
            present(&remote, 1),
            &[w("b", &ours, None)],
            &MergeOptions::default(),
        );
        assert_eq!(plan.decisions.keys().collect::<Vec<_>>(), vec!["b"]);
        assert_eq!(plan.properties_to_send(), obj(json!({"b": 5})));
    }

    #[test]
    fn later_duplicate_write_wins() {
        let v1 = json!(1);
        let v2 = json!(2);
        let plan = plan_entity(
            Remote::Blind,
            &[w("a", &v1, None), w("a", &v2, None)],
            &MergeOptions::default(),
        );
        assert_eq!(plan.decisions["a"], Decision::Send(v2.clone()));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn arb_json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i32>().prop_map(|n| json!(n)),
                "[a-c]{0,3}".prop_map(Value::String),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                    prop::collection::btree_map("[a-d]", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        fn strip_nulls(v: &Value) -> Value {
            match v {
                Value::Object(m) => Value::Object(
                    m.iter()
                        .filter(|(_, v)| !v.is_null())
                        .map(|(k, v)| (k.clone(), strip_nulls(v)))
                        .collect(),
                ),
                other => other.clone(),
            }
        }

        proptest! {
            // Applying a patch twice is the same as applying it once (RFC 7386 is idempotent).
            #[test]
            fn merge_patch_is_idempotent(t in arb_json(), p in arb_json()) {
                let once = merge_patch(&t, &p);
                prop_assert_eq!(merge_patch(&once, &p), once);
            }

            // Patching anything with a null-free object-less value gives the patch itself, and
            // patching with the target's own null-free form changes nothing.
            #[test]
            fn merge_patch_with_self_is_identity(t in arb_json()) {
                let clean = strip_nulls(&t);
                prop_assert_eq!(merge_patch(&clean, &clean), clean);
            }
        }
    }
}
