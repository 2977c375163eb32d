//! The entity mapper: turns 0xSCADA objects (sites, assets, historian tag readings, alarms) into
//! Flux entity ids and properties, configured by the `[mapper]` table.
//!
//! # Presets
//!
//! | object | `scaffold` (default) | `adr15` (the current in-memory publisher) |
//! |---|---|---|
//! | site | `{prefix}site/{siteId}` | `{prefix}site/{siteId}` |
//! | asset / equipment | `{prefix}asset/{siteId}/{assetId}` | `{prefix}{equipment lower-cased}` |
//! | tag reading, `tags = "asset-property"` | property `tag/{tag}` (+ `tag/{tag}/quality`) on the asset | property `{sensor}` on the equipment |
//! | tag reading, `tags = "entity-per-tag"` | `{prefix}asset/{siteId}/{assetId}/{sensor}`, property `value` (+ `quality`) | `{prefix}{equipment}/{sensor}`, property `value` |
//! | alarm, `alarms = "entity"` (default) | `{prefix}alert/{alarmId}` | `{prefix}alert/{alarmId}` |
//! | alarm, `alarms = "asset-property"` | property `alarm/{alarmId}` (an object) on the asset | same, on the equipment |
//!
//! A historian tag id is `EQUIPMENT.SENSOR` (split at the first dot; a tag without a dot is its
//! own equipment and sensor). The live stream carries no site, so a tag's site and asset come
//! from `[mapper.equipment."EQUIPMENT"]` when listed there, else the site is `default_site` and
//! the asset id is the equipment part of the tag. adr15 lower-cases equipment and sensor names,
//! as the publisher did (`BK-FEEDER-01.CURRENT` -> entity `scada/bk-feeder-01`, property
//! `current`).
//!
//! # What feeds which mapping
//!
//! The WebSocket source ([`crate::source_ws`]) calls [`Mapper::map_tag`] and
//! [`Mapper::map_alarm`] only: 0xSCADA's live stream carries tag readings (`tag:snapshot`,
//! `tag:update`, `tag:batch`) and alarms (`alarm:update`), no site or asset records (those are
//! rows of 0xSCADA's database). [`Mapper::map_site`] and [`Mapper::map_asset`] are not fed by
//! it, and nothing in the worker calls them; they are for code embedding the crate. Site and
//! asset entities reach Flux when a producer posts them over the HTTP ingest API, with the ids
//! these functions would build. The heartbeat uses [`Mapper::gateway_entity`].
//!
//! # Id forms
//!
//! An id is the entity prefix (`flux.entity_prefix`, env `FLUX_ENTITY_PREFIX`, default
//! `scada/`) followed by path segments. In the `path` form segments are joined with `/`. A
//! public-mode Flux only accepts `namespace/rest` with exactly one slash, so the `folded` form
//! (the default when `ingest.public_mode` is on) joins them with `.` instead:
//! `scada/asset/site-1/TR-MAIN-01` becomes `scada/asset.site-1.TR-MAIN-01`.
//!
//! Every segment is escaped so that no two different objects ever map to the same id and no
//! mapped id is refused for its characters: `%` -> `%25`, `/` -> `%2F`, control characters ->
//! `%XX` per UTF-8 byte, and in the folded form also `.` -> `%2E` (the separator). An empty
//! segment (e.g. an empty site id) is a mapping error, never an id with `//`.
//!
//! Property names are templates with the placeholders `{tag}`, `{equipment}`, `{sensor}` and
//! `{alarm}`; substituted text only has control characters escaped (Flux property names may hold
//! any other character). The mapper does not validate: callers pass every update through
//! [`crate::validate::validate_update`] as the HTTP ingest path does, which also refuses a
//! mapped `__deleted__` or protected property name.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{Config, ConfigError};
use crate::model::{Update, UpdateOp};
use crate::validate::is_valid_namespace;

/// Which naming the mapper produces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// The integration design: `site/{siteId}`, `asset/{siteId}/{assetId}`, `tag/{tag}` properties.
    #[default]
    Scaffold,
    /// The current publisher: `{equipment}`, `{sensor}` properties, `alert/{id}`.
    Adr15,
}

/// How ids are joined.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdForm {
    /// `folded` when `ingest.public_mode` is on, else `path`.
    #[default]
    Auto,
    /// Segments joined with `/` (internal-mode Flux accepts any number of slashes).
    Path,
    /// Segments joined with `.`, so the id keeps the prefix's one slash (public-mode Flux).
    Folded,
}

/// Where tag readings go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TagLayout {
    /// One property per tag on the asset (equipment) entity.
    #[default]
    AssetProperty,
    /// One entity per tag, below the asset (equipment) id.
    EntityPerTag,
}

/// Where alarm state goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlarmLayout {
    /// Its own entity `{prefix}alert/{alarmId}`.
    #[default]
    Entity,
    /// One property (an object) per alarm on the asset (equipment) entity.
    AssetProperty,
}

/// `[mapper.equipment."TAG"]`: where an equipment tag lives.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EquipmentEntry {
    /// Site id; absent: `mapper.default_site` (scaffold) or the alarm's own `siteId`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Asset id (adr15: the equipment name); absent: the equipment tag itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asset: Option<String>,
}

/// `[mapper]`: how 0xSCADA objects become Flux entities.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MapperConfig {
    pub preset: Preset,
    pub id_form: IdForm,
    /// Lower-case every id segment (adr15 always lower-cases equipment and sensor names).
    pub lowercase_ids: bool,
    /// Site of tags not listed in `[mapper.equipment]` (scaffold; the tag stream has no site).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_site: Option<String>,
    pub tags: TagLayout,
    /// Property of a reading's value; absent: the preset's (see the module docs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_property: Option<String>,
    /// Property of a reading's quality; absent: the preset's; `""`: not written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quality_property: Option<String>,
    /// Property of a reading's source time (as 0xSCADA sent it); absent or `""`: not written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_property: Option<String>,
    pub alarms: AlarmLayout,
    /// Property of an alarm in `alarms = "asset-property"`.
    pub alarm_property: String,
    /// Equipment tag -> site and asset id.
    pub equipment: BTreeMap<String, EquipmentEntry>,
}

impl Default for MapperConfig {
    fn default() -> Self {
        MapperConfig {
            preset: Preset::Scaffold,
            id_form: IdForm::Auto,
            lowercase_ids: false,
            default_site: None,
            tags: TagLayout::AssetProperty,
            value_property: None,
            quality_property: None,
            time_property: None,
            alarms: AlarmLayout::Entity,
            alarm_property: "alarm/{alarm}".into(),
            equipment: BTreeMap::new(),
        }
    }
}

/// Why an object could not be mapped (the object is counted and skipped, never fatal).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("tag {tag:?} has no site: list its equipment {equipment:?} in [mapper.equipment] or set mapper.default_site")]
    NoSite { tag: String, equipment: String },
    #[error("alarm {alarm:?} names no equipment or tag, so it has no asset entity to go on")]
    NoAsset { alarm: String },
}

/// A mapper that cannot be built from its configuration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct MapperConfigError {
    pub key: &'static str,
    pub message: String,
}

/// One historian reading as the tag stream delivers it.
#[derive(Clone, Debug, PartialEq)]
pub struct TagReading {
    /// `EQUIPMENT.SENSOR`.
    pub tag: String,
    pub value: Value,
    /// `"good"`, `192`, ...; written as given.
    pub quality: Option<Value>,
    /// The source time as sent (for the optional time property).
    pub source_time: Option<String>,
    /// Source time, epoch ms (the update's version).
    pub ts_ms: u64,
}

/// One alarm state change (`alarm:update`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AlarmEvent {
    pub id: String,
    pub name: Option<String>,
    pub tag_id: Option<String>,
    pub equipment_id: Option<String>,
    pub site_id: Option<String>,
    pub severity: Option<String>,
    pub state: Option<String>,
    pub message: Option<String>,
    pub value: Option<Value>,
    pub source_time: Option<String>,
    pub ts_ms: u64,
}

/// The mapper; cheap to share (`Arc`), immutable after construction.
#[derive(Clone, Debug)]
pub struct Mapper {
    cfg: MapperConfig,
    prefix: String,
    folded: bool,
    value_tpl: String,
    quality_tpl: Option<String>,
    time_tpl: Option<String>,
}

impl Mapper {
    /// Builds the mapper for `prefix` (`flux.entity_prefix`); `public_mode` is
    /// `ingest.public_mode`. Refuses combinations that would produce ids a public-mode Flux
    /// refuses.
    pub fn new(
        cfg: &MapperConfig,
        prefix: &str,
        public_mode: bool,
    ) -> Result<Mapper, MapperConfigError> {
        let folded = match cfg.id_form {
            IdForm::Auto => public_mode,
            IdForm::Path => false,
            IdForm::Folded => true,
        };
        if public_mode && !folded {
            return Err(MapperConfigError {
                key: "mapper.id_form",
                message: "\"path\" ids have several slashes, which a public-mode Flux refuses: use \"auto\" or \"folded\"".into(),
            });
        }
        if folded {
            let ok = match prefix.split_once('/') {
                Some((ns, rest)) => is_valid_namespace(ns) && !rest.contains('/'),
                None => false,
            };
            if !ok {
                return Err(MapperConfigError {
                    key: "flux.entity_prefix",
                    message: format!(
                        "{prefix:?}: folded ids need a prefix `namespace/` or `namespace/text` with exactly one slash and a namespace of 3-32 [a-z0-9-_]"
                    ),
                });
            }
        }
        if let Some(site) = &cfg.default_site {
            if site.is_empty() {
                return Err(MapperConfigError {
                    key: "mapper.default_site",
                    message: "must not be empty (leave it out instead)".into(),
                });
            }
        }
        for (equipment, entry) in &cfg.equipment {
            let empty = equipment.is_empty()
                || entry.site.as_deref() == Some("")
                || entry.asset.as_deref() == Some("");
            if empty {
                return Err(MapperConfigError {
                    key: "mapper.equipment",
                    message: format!("{equipment:?}: equipment, site and asset must not be empty"),
                });
            }
        }
        if cfg.alarm_property.is_empty() {
            return Err(MapperConfigError {
                key: "mapper.alarm_property",
                message: "must not be empty".into(),
            });
        }
        if cfg.value_property.as_deref() == Some("") {
            return Err(MapperConfigError {
                key: "mapper.value_property",
                message: "must not be empty (leave it out for the preset's name)".into(),
            });
        }
        let per_tag = cfg.tags == TagLayout::EntityPerTag;
        let value_tpl = cfg.value_property.clone().unwrap_or_else(|| {
            match (cfg.preset, per_tag) {
                (_, true) => "value",
                (Preset::Scaffold, false) => "tag/{tag}",
                (Preset::Adr15, false) => "{sensor}",
            }
            .to_string()
        });
        let quality_tpl = match &cfg.quality_property {
            Some(s) if s.is_empty() => None,
            Some(s) => Some(s.clone()),
            None => match (cfg.preset, per_tag) {
                (Preset::Scaffold, true) => Some("quality".to_string()),
                (Preset::Scaffold, false) => Some("tag/{tag}/quality".to_string()),
                // The publisher sent bare values; keep its shape.
                (Preset::Adr15, _) => None,
            },
        };
        let time_tpl = cfg.time_property.clone().filter(|s| !s.is_empty());
        // A constant name for two different pieces of data would make one overwrite the other.
        let mut names = vec![value_tpl.as_str()];
        names.extend(quality_tpl.as_deref());
        names.extend(time_tpl.as_deref());
        for (i, a) in names.iter().enumerate() {
            if names[i + 1..].contains(a) {
                return Err(MapperConfigError {
                    key: "mapper.value_property",
                    message: format!(
                        "value, quality and time properties must differ ({a:?} twice)"
                    ),
                });
            }
        }
        Ok(Mapper {
            cfg: cfg.clone(),
            prefix: prefix.to_string(),
            folded,
            value_tpl,
            quality_tpl,
            time_tpl,
        })
    }

    /// Builds the mapper the configuration asks for.
    pub fn from_config(cfg: &Config) -> Result<Mapper, MapperConfigError> {
        Mapper::new(&cfg.mapper, &cfg.flux.entity_prefix, cfg.ingest.public_mode)
    }

    /// Ids are folded into `namespace/rest`.
    pub fn folded(&self) -> bool {
        self.folded
    }

    pub fn preset(&self) -> Preset {
        self.cfg.preset
    }

    /// `{prefix}` + escaped segments joined by `/` (path) or `.` (folded).
    pub fn entity_id(&self, segments: &[&str]) -> Result<String, MapError> {
        let mut id = self.prefix.clone();
        for (i, seg) in segments.iter().enumerate() {
            if seg.is_empty() {
                return Err(MapError::Empty { what: "id segment" });
            }
            if i > 0 {
                id.push(if self.folded { '.' } else { '/' });
            }
            let lowered;
            let seg = if self.cfg.lowercase_ids {
                lowered = seg.to_lowercase();
                lowered.as_str()
            } else {
                seg
            };
            escape_segment(seg, self.folded, &mut id);
        }
        Ok(id)
    }

    /// `{prefix}site/{siteId}`.
    pub fn site_entity(&self, site: &str) -> Result<String, MapError> {
        non_empty(site, "site id")?;
        self.entity_id(&["site", site])
    }

    /// The asset (equipment) entity: scaffold `{prefix}asset/{site}/{asset}`, adr15
    /// `{prefix}{asset lower-cased}` (no site in the id).
    pub fn asset_entity(&self, site: &str, asset: &str) -> Result<String, MapError> {
        non_empty(asset, "asset id")?;
        match self.cfg.preset {
            Preset::Scaffold => {
                non_empty(site, "site id")?;
                self.entity_id(&["asset", site, asset])
            }
            Preset::Adr15 => self.entity_id(&[&asset.to_lowercase()]),
        }
    }

    /// `{prefix}alert/{alarmId}`.
    pub fn alert_entity(&self, alarm: &str) -> Result<String, MapError> {
        non_empty(alarm, "alarm id")?;
        self.entity_id(&["alert", alarm])
    }

    /// `{prefix}gateway/{gatewayId}` (the heartbeat entity).
    pub fn gateway_entity(&self, gateway: &str) -> Result<String, MapError> {
        non_empty(gateway, "gateway id")?;
        self.entity_id(&["gateway", gateway])
    }

    /// Site and asset id of an equipment tag: the `[mapper.equipment]` entry, else
    /// (`fallback_site` or `default_site`, the equipment itself).
    pub fn locate(&self, equipment: &str, fallback_site: Option<&str>) -> (Option<String>, String) {
        let entry = self.cfg.equipment.get(equipment);
        let site = entry
            .and_then(|e| e.site.clone())
            .or_else(|| fallback_site.filter(|s| !s.is_empty()).map(str::to_string))
            .or_else(|| self.cfg.default_site.clone());
        let asset = entry
            .and_then(|e| e.asset.clone())
            .unwrap_or_else(|| equipment.to_string());
        (site, asset)
    }

    /// The entity a reading's equipment maps to, with the equipment and sensor names used in
    /// templates.
    fn equipment_entity(
        &self,
        equipment: &str,
        site_hint: Option<&str>,
        tag: &str,
    ) -> Result<String, MapError> {
        let (site, asset) = self.locate(equipment, site_hint);
        match self.cfg.preset {
            Preset::Scaffold => {
                let site = site.ok_or_else(|| MapError::NoSite {
                    tag: tag.to_string(),
                    equipment: equipment.to_string(),
                })?;
                self.asset_entity(&site, &asset)
            }
            Preset::Adr15 => self.asset_entity("", &asset),
        }
    }

    /// One historian reading -> one update (the value, plus quality and time when configured).
    pub fn map_tag(&self, r: &TagReading) -> Result<Update, MapError> {
        non_empty(&r.tag, "tag name")?;
        let (equipment, sensor) = split_tag(&r.tag);
        non_empty(equipment, "equipment part of the tag")?;
        non_empty(sensor, "sensor part of the tag")?;
        let (equipment_name, sensor_name) = match self.cfg.preset {
            Preset::Scaffold => (equipment.to_string(), sensor.to_string()),
            Preset::Adr15 => (equipment.to_lowercase(), sensor.to_lowercase()),
        };
        let vars = Vars {
            tag: &r.tag,
            equipment: &equipment_name,
            sensor: &sensor_name,
            alarm: "",
        };
        let mut entity = self.equipment_entity(equipment, None, &r.tag)?;
        if self.cfg.tags == TagLayout::EntityPerTag {
            // Below the equipment entity: one more segment (escaped like the others).
            entity.push(if self.folded { '.' } else { '/' });
            let lowered = sensor_name.to_lowercase();
            let seg = if self.cfg.lowercase_ids {
                &lowered
            } else {
                &sensor_name
            };
            escape_segment(seg, self.folded, &mut entity);
        }
        let mut props = BTreeMap::new();
        props.insert(render(&self.value_tpl, &vars), r.value.clone());
        if let (Some(tpl), Some(q)) = (&self.quality_tpl, &r.quality) {
            props.insert(render(tpl, &vars), q.clone());
        }
        if let (Some(tpl), Some(t)) = (&self.time_tpl, &r.source_time) {
            props.insert(render(tpl, &vars), Value::String(t.clone()));
        }
        Ok(Update {
            entity,
            op: UpdateOp::Set(props),
            ts_ms: r.ts_ms,
            stream: None,
            source: None,
        })
    }

    /// One alarm state change -> one update: its own entity, or one property on the asset.
    pub fn map_alarm(&self, a: &AlarmEvent) -> Result<Update, MapError> {
        non_empty(&a.id, "alarm id")?;
        let mut fields = Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                fields.insert(k.to_string(), v);
            }
        };
        let s = |v: &Option<String>| v.clone().map(Value::String);
        put("name", s(&a.name));
        put("state", s(&a.state));
        put("severity", s(&a.severity));
        put("message", s(&a.message));
        put("value", a.value.clone());
        put("tag_id", s(&a.tag_id));
        put("equipment_id", s(&a.equipment_id));
        put("site_id", s(&a.site_id));
        put("timestamp", s(&a.source_time));
        // The equipment is named directly, or is the equipment part of the alarm's tag.
        let equipment = a
            .equipment_id
            .as_deref()
            .filter(|e| !e.is_empty())
            .or_else(|| {
                a.tag_id
                    .as_deref()
                    .map(|t| split_tag(t).0)
                    .filter(|e| !e.is_empty())
            });
        let (entity, props) = match self.cfg.alarms {
            AlarmLayout::Entity => {
                // The asset's entity id lets a dashboard join alert and asset.
                if let Some(eq) = equipment {
                    if let Ok(asset) = self.equipment_entity(
                        eq,
                        a.site_id.as_deref(),
                        a.tag_id.as_deref().unwrap_or(eq),
                    ) {
                        fields.insert("asset_entity".into(), Value::String(asset));
                    }
                }
                let props: BTreeMap<String, Value> = fields.into_iter().collect();
                (self.alert_entity(&a.id)?, props)
            }
            AlarmLayout::AssetProperty => {
                let eq = equipment.ok_or_else(|| MapError::NoAsset {
                    alarm: a.id.clone(),
                })?;
                let entity = self.equipment_entity(
                    eq,
                    a.site_id.as_deref(),
                    a.tag_id.as_deref().unwrap_or(eq),
                )?;
                let vars = Vars {
                    tag: a.tag_id.as_deref().unwrap_or(""),
                    equipment: eq,
                    sensor: "",
                    alarm: &a.id,
                };
                let mut props = BTreeMap::new();
                props.insert(
                    render(&self.cfg.alarm_property, &vars),
                    Value::Object(fields),
                );
                (entity, props)
            }
        };
        let props = if props.is_empty() {
            // An alarm with nothing but its id still records that it exists.
            BTreeMap::from([("id".to_string(), Value::String(a.id.clone()))])
        } else {
            props
        };
        Ok(Update {
            entity,
            op: UpdateOp::Set(props),
            ts_ms: a.ts_ms,
            stream: None,
            source: None,
        })
    }

    /// A site record (`sites` table columns as properties) -> an update of its site entity.
    pub fn map_site(
        &self,
        site: &str,
        properties: BTreeMap<String, Value>,
        ts_ms: u64,
    ) -> Result<Update, MapError> {
        Ok(Update {
            entity: self.site_entity(site)?,
            op: UpdateOp::Set(properties),
            ts_ms,
            stream: None,
            source: None,
        })
    }

    /// An asset record -> an update of its asset (equipment) entity.
    pub fn map_asset(
        &self,
        site: &str,
        asset: &str,
        properties: BTreeMap<String, Value>,
        ts_ms: u64,
    ) -> Result<Update, MapError> {
        Ok(Update {
            entity: self.asset_entity(site, asset)?,
            op: UpdateOp::Set(properties),
            ts_ms,
            stream: None,
            source: None,
        })
    }
}

/// `EQUIPMENT.SENSOR` split at the first dot; a tag without a dot is both.
pub fn split_tag(tag: &str) -> (&str, &str) {
    match tag.split_once('.') {
        Some((equipment, sensor)) => (equipment, sensor),
        None => (tag, tag),
    }
}

fn non_empty(s: &str, what: &'static str) -> Result<(), MapError> {
    if s.is_empty() {
        Err(MapError::Empty { what })
    } else {
        Ok(())
    }
}

/// Appends `seg` escaped: `%`, `/`, control characters, and (folded) `.` become `%XX`.
fn escape_segment(seg: &str, folded: bool, out: &mut String) {
    for c in seg.chars() {
        let escape = c == '%' || c == '/' || c.is_control() || (folded && c == '.');
        if escape {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(out, "%{b:02X}");
            }
        } else {
            out.push(c);
        }
    }
}

struct Vars<'a> {
    tag: &'a str,
    equipment: &'a str,
    sensor: &'a str,
    alarm: &'a str,
}

/// Substitutes `{tag}`, `{equipment}`, `{sensor}`, `{alarm}` in one pass (substituted text is
/// never re-scanned, so a tag containing `{sensor}` stays literal). Control characters in the
/// substituted text are escaped as `%XX`; unknown `{...}` stays as written.
fn render(tpl: &str, v: &Vars<'_>) -> String {
    let mut out = String::with_capacity(tpl.len() + v.tag.len());
    let mut rest = tpl;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        let hit = [
            ("{tag}", v.tag),
            ("{equipment}", v.equipment),
            ("{sensor}", v.sensor),
            ("{alarm}", v.alarm),
        ]
        .into_iter()
        .find(|(name, _)| after.starts_with(name));
        match hit {
            Some((name, value)) => {
                for c in value.chars() {
                    if c.is_control() {
                        let mut buf = [0u8; 4];
                        for b in c.encode_utf8(&mut buf).bytes() {
                            let _ = write!(out, "%{b:02X}");
                        }
                    } else {
                        out.push(c);
                    }
                }
                rest = &after[name.len()..];
            }
            None => {
                out.push('{');
                rest = &after[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Checks of every table this integration adds (`[mapper]`, `[heartbeat]`, `[read_through]`,
/// `[sources.oxscada_ws]`), run by [`Config::validate`].
pub fn check_config(cfg: &Config) -> Result<(), ConfigError> {
    let invalid = |key: &str, message: String| ConfigError::Invalid {
        key: key.to_string(),
        message,
    };
    Mapper::from_config(cfg).map_err(|e| invalid(e.key, e.message))?;
    crate::heartbeat::check_config(&cfg.heartbeat).map_err(|(k, m)| invalid(k, m))?;
    crate::read_through::check_config(&cfg.read_through).map_err(|(k, m)| invalid(k, m))?;
    if let Some(ws) = &cfg.sources.oxscada_ws {
        crate::source_ws::check_config(ws).map_err(|(k, m)| invalid(k, m))?;
    }
    Ok(())
}
