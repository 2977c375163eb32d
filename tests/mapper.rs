//! Table-driven tests of every mapping rule: both presets, both id forms, the equipment table,
//! property templates, alarms, config checks, `FLUX_ENTITY_PREFIX`, and ids with odd
//! characters (every mapped id must pass the ingest validation of its mode).
// The rule tables are tuples on purpose: one row per line reads as a table.
#![allow(clippy::type_complexity)]

use std::collections::BTreeMap;

use flux_outbox::config::Config;
use flux_outbox::mapper::{
    AlarmEvent, AlarmLayout, EquipmentEntry, IdForm, MapError, Mapper, MapperConfig, Preset,
    TagLayout, TagReading,
};
use flux_outbox::model::UpdateOp;
use flux_outbox::source_ws::{parse_message, subprotocol_header};
use flux_outbox::validate::{validate_update, Rules};
use serde_json::{json, Value};

fn cfg(preset: Preset) -> MapperConfig {
    MapperConfig {
        preset,
        default_site: Some("site-1".into()),
        ..MapperConfig::default()
    }
}

fn reading(tag: &str, value: Value) -> TagReading {
    TagReading {
        tag: tag.into(),
        value,
        quality: Some(json!("good")),
        source_time: Some("2026-03-01T12:00:00.000Z".into()),
        ts_ms: 1_772_366_400_000,
    }
}

fn props(u: &flux_outbox::model::Update) -> BTreeMap<String, Value> {
    match &u.op {
        UpdateOp::Set(p) => p.clone(),
        UpdateOp::Delete => panic!("unexpected delete"),
    }
}

fn rules(public_mode: bool) -> Rules {
    Rules {
        public_mode,
        protected: vec!["command".into(), "cmd_id".into()],
    }
}

#[test]
fn tag_readings_both_presets_both_forms() {
    // (preset, tags layout, public mode, tag, expected entity, expected properties)
    let rows: Vec<(Preset, TagLayout, bool, &str, &str, Vec<&str>)> = vec![
        (
            Preset::Scaffold,
            TagLayout::AssetProperty,
            false,
            "TR-MAIN-01.TEMPERATURE",
            "scada/asset/site-1/TR-MAIN-01",
            vec![
                "tag/TR-MAIN-01.TEMPERATURE",
                "tag/TR-MAIN-01.TEMPERATURE/quality",
            ],
        ),
        (
            Preset::Scaffold,
            TagLayout::AssetProperty,
            true,
            "TR-MAIN-01.TEMPERATURE",
            "scada/asset.site-1.TR-MAIN-01",
            vec![
                "tag/TR-MAIN-01.TEMPERATURE",
                "tag/TR-MAIN-01.TEMPERATURE/quality",
            ],
        ),
        (
            Preset::Scaffold,
            TagLayout::EntityPerTag,
            false,
            "TR-MAIN-01.TEMPERATURE",
            "scada/asset/site-1/TR-MAIN-01/TEMPERATURE",
            vec!["quality", "value"],
        ),
        (
            Preset::Scaffold,
            TagLayout::EntityPerTag,
            true,
            "TR-MAIN-01.TEMPERATURE",
            "scada/asset.site-1.TR-MAIN-01.TEMPERATURE",
            vec!["quality", "value"],
        ),
        (
            Preset::Adr15,
            TagLayout::AssetProperty,
            false,
            "BK-FEEDER-01.CURRENT",
            "scada/bk-feeder-01",
            vec!["current"],
        ),
        (
            Preset::Adr15,
            TagLayout::AssetProperty,
            true,
            "BK-FEEDER-01.CURRENT",
            "scada/bk-feeder-01",
            vec!["current"],
        ),
        (
            Preset::Adr15,
            TagLayout::EntityPerTag,
            false,
            "BK-FEEDER-01.CURRENT",
            "scada/bk-feeder-01/current",
            vec!["value"],
        ),
        (
            Preset::Adr15,
            TagLayout::EntityPerTag,
            true,
            "BK-FEEDER-01.CURRENT",
            "scada/bk-feeder-01.current",
            vec!["value"],
        ),
        // A tag without a dot is its own equipment and sensor.
        (
            Preset::Scaffold,
            TagLayout::AssetProperty,
            false,
            "PLC7",
            "scada/asset/site-1/PLC7",
            vec!["tag/PLC7", "tag/PLC7/quality"],
        ),
        (
            Preset::Adr15,
            TagLayout::AssetProperty,
            false,
            "PLC7",
            "scada/plc7",
            vec!["plc7"],
        ),
        // Only the first dot splits: the sensor keeps the rest.
        (
            Preset::Adr15,
            TagLayout::AssetProperty,
            false,
            "MCC-2.MOTOR.RPM",
            "scada/mcc-2",
            vec!["motor.rpm"],
        ),
        (
            Preset::Scaffold,
            TagLayout::EntityPerTag,
            true,
            "MCC-2.MOTOR.RPM",
            "scada/asset.site-1.MCC-2.MOTOR%2ERPM",
            vec!["quality", "value"],
        ),
    ];
    for (preset, tags, public, tag, entity, names) in rows {
        let mut c = cfg(preset);
        c.tags = tags;
        let m = Mapper::new(&c, "scada/", public).unwrap();
        assert_eq!(m.folded(), public, "auto id form follows public mode");
        let u = m.map_tag(&reading(tag, json!(66.2))).unwrap();
        let label = format!("{preset:?} {tags:?} public={public} {tag}");
        assert_eq!(u.entity, entity, "{label}");
        let p = props(&u);
        assert_eq!(
            p.keys().map(String::as_str).collect::<Vec<_>>(),
            names,
            "{label}"
        );
        let value_name = names.iter().find(|n| !n.ends_with("quality")).unwrap();
        assert_eq!(p[*value_name], json!(66.2), "{label}");
        assert_eq!(u.ts_ms, 1_772_366_400_000, "source time kept");
        validate_update(&u, &rules(public)).unwrap_or_else(|e| panic!("{label}: {e}"));
    }
}

#[test]
fn sites_assets_alerts_gateway() {
    let scaffold = Mapper::new(&cfg(Preset::Scaffold), "scada/", false).unwrap();
    let folded = Mapper::new(&cfg(Preset::Scaffold), "scada/", true).unwrap();
    let adr = Mapper::new(&cfg(Preset::Adr15), "scada/", false).unwrap();
    let rows: Vec<(&Mapper, Result<String, MapError>, &str)> = vec![
        (
            &scaffold,
            scaffold.site_entity("site-1"),
            "scada/site/site-1",
        ),
        (&folded, folded.site_entity("site-1"), "scada/site.site-1"),
        (&adr, adr.site_entity("site-1"), "scada/site/site-1"),
        (
            &scaffold,
            scaffold.asset_entity("site-1", "TR-MAIN-01"),
            "scada/asset/site-1/TR-MAIN-01",
        ),
        (
            &folded,
            folded.asset_entity("site-1", "TR-MAIN-01"),
            "scada/asset.site-1.TR-MAIN-01",
        ),
        (
            &adr,
            adr.asset_entity("site-1", "BK-FEEDER-01"),
            "scada/bk-feeder-01",
        ),
        (
            &scaffold,
            scaffold.alert_entity("ALM-1"),
            "scada/alert/ALM-1",
        ),
        (&folded, folded.alert_entity("ALM-1"), "scada/alert.ALM-1"),
        (&adr, adr.alert_entity("ALM-1"), "scada/alert/ALM-1"),
        (
            &scaffold,
            scaffold.gateway_entity("gw-17"),
            "scada/gateway/gw-17",
        ),
        (
            &folded,
            folded.gateway_entity("gw.plant.local"),
            "scada/gateway.gw%2Eplant%2Elocal",
        ),
    ];
    for (m, got, want) in rows {
        let got = got.unwrap();
        assert_eq!(got, want);
        flux_outbox::validate::validate_entity_id(&got, m.folded()).unwrap();
    }
    let site = scaffold
        .map_site(
            "site-1",
            BTreeMap::from([("status".to_string(), json!("ONLINE"))]),
            5,
        )
        .unwrap();
    assert_eq!(site.entity, "scada/site/site-1");
    let asset = adr
        .map_asset(
            "site-1",
            "BK-FEEDER-01",
            BTreeMap::from([("critical".to_string(), json!(true))]),
            5,
        )
        .unwrap();
    assert_eq!(asset.entity, "scada/bk-feeder-01");
}

#[test]
fn lowercase_ids_reproduce_the_documented_public_example() {
    let mut c = cfg(Preset::Scaffold);
    c.lowercase_ids = true;
    let m = Mapper::new(&c, "scada/", true).unwrap();
    assert_eq!(
        m.asset_entity("site-1", "TR-MAIN-01").unwrap(),
        "scada/asset.site-1.tr-main-01"
    );
    // Property names keep the tag's case.
    let u = m
        .map_tag(&reading("TR-MAIN-01.TEMPERATURE", json!(1)))
        .unwrap();
    assert!(props(&u).contains_key("tag/TR-MAIN-01.TEMPERATURE"));
}

#[test]
fn equipment_table_and_default_site() {
    let mut c = cfg(Preset::Scaffold);
    c.equipment.insert(
        "TR-MAIN-01".into(),
        EquipmentEntry {
            site: Some("plant-b".into()),
            asset: Some("transformer-1".into()),
        },
    );
    c.equipment.insert(
        "BK-2".into(),
        EquipmentEntry {
            site: None,
            asset: Some("breaker-2".into()),
        },
    );
    c.equipment.insert(
        "PUMP-3".into(),
        EquipmentEntry {
            site: Some("site-9".into()),
            asset: None,
        },
    );
    let m = Mapper::new(&c, "scada/", false).unwrap();
    for (tag, entity) in [
        (
            "TR-MAIN-01.TEMPERATURE",
            "scada/asset/plant-b/transformer-1",
        ),
        ("BK-2.CURRENT", "scada/asset/site-1/breaker-2"),
        ("PUMP-3.FLOW", "scada/asset/site-9/PUMP-3"),
        ("OTHER-1.X", "scada/asset/site-1/OTHER-1"),
    ] {
        assert_eq!(
            m.map_tag(&reading(tag, json!(0))).unwrap().entity,
            entity,
            "{tag}"
        );
    }
    // Without a default site, an unlisted tag cannot be placed: a mapping error, not a guess.
    c.default_site = None;
    let m = Mapper::new(&c, "scada/", false).unwrap();
    assert!(matches!(
        m.map_tag(&reading("OTHER-1.X", json!(0))),
        Err(MapError::NoSite { .. })
    ));
    assert_eq!(
        m.map_tag(&reading("PUMP-3.FLOW", json!(0))).unwrap().entity,
        "scada/asset/site-9/PUMP-3"
    );
    // adr15 uses the table's asset name as the (lower-cased) equipment; no site needed.
    let mut c = cfg(Preset::Adr15);
    c.default_site = None;
    c.equipment.insert(
        "BK-2".into(),
        EquipmentEntry {
            site: None,
            asset: Some("Breaker-2".into()),
        },
    );
    let m = Mapper::new(&c, "plant/", false).unwrap();
    assert_eq!(
        m.map_tag(&reading("BK-2.CURRENT", json!(0)))
            .unwrap()
            .entity,
        "plant/breaker-2"
    );
    assert_eq!(
        m.map_tag(&reading("X.Y", json!(0))).unwrap().entity,
        "plant/x"
    );
}

#[test]
fn property_templates_and_companions() {
    // (value, quality, time) config -> expected property names
    let rows: Vec<(Option<&str>, Option<&str>, Option<&str>, Vec<&str>)> = vec![
        (None, None, None, vec!["tag/T-1.S", "tag/T-1.S/quality"]),
        (None, Some(""), None, vec!["tag/T-1.S"]),
        (
            None,
            None,
            Some("tag/{tag}/source_time"),
            vec!["tag/T-1.S", "tag/T-1.S/quality", "tag/T-1.S/source_time"],
        ),
        (
            Some("{equipment}:{sensor}"),
            Some("q/{sensor}"),
            Some(""),
            vec!["T-1:S", "q/S"],
        ),
        // A placeholder inside substituted text stays literal; unknown placeholders stay.
        (
            Some("v/{tag}/{nope}"),
            Some(""),
            None,
            vec!["v/T-1.S/{nope}"],
        ),
    ];
    for (value, quality, time, want) in rows {
        let mut c = cfg(Preset::Scaffold);
        c.value_property = value.map(str::to_string);
        c.quality_property = quality.map(str::to_string);
        c.time_property = time.map(str::to_string);
        let m = Mapper::new(&c, "scada/", false).unwrap();
        let u = m.map_tag(&reading("T-1.S", json!(3))).unwrap();
        let p = props(&u);
        assert_eq!(
            p.keys().map(String::as_str).collect::<Vec<_>>(),
            want,
            "{value:?} {quality:?} {time:?}"
        );
        if let Some(t) = p.get("tag/T-1.S/source_time") {
            assert_eq!(t, &json!("2026-03-01T12:00:00.000Z"));
        }
    }
    // A tag literally containing a placeholder is not re-expanded.
    let m = Mapper::new(&cfg(Preset::Scaffold), "scada/", false).unwrap();
    let u = m.map_tag(&reading("A.{sensor}", json!(1))).unwrap();
    assert!(props(&u).contains_key("tag/A.{sensor}"), "{:?}", props(&u));
    // Readings without quality write no quality property.
    let mut r = reading("T-1.S", json!(1));
    r.quality = None;
    assert_eq!(props(&m.map_tag(&r).unwrap()).len(), 1);
}

#[test]
fn alarms_as_entity_or_asset_property() {
    let alarm = AlarmEvent {
        id: "ALM-BK-FEEDER-01-1772366400000".into(),
        name: Some("BK-FEEDER-01 BREAKER_TRIP".into()),
        tag_id: Some("BK-FEEDER-01.BREAKER_TRIP".into()),
        equipment_id: Some("BK-FEEDER-01".into()),
        site_id: Some("site-2".into()),
        severity: Some("critical".into()),
        state: Some("active".into()),
        message: Some("Overcurrent (Phase A) > 1450A".into()),
        value: Some(json!(1450)),
        source_time: Some("2026-03-01T12:00:00.000Z".into()),
        ts_ms: 1_772_366_400_000,
    };
    // (preset, layout, public, entity, property holding the state)
    let rows = [
        (
            Preset::Scaffold,
            AlarmLayout::Entity,
            false,
            "scada/alert/ALM-BK-FEEDER-01-1772366400000",
            "state",
        ),
        (
            Preset::Scaffold,
            AlarmLayout::Entity,
            true,
            "scada/alert.ALM-BK-FEEDER-01-1772366400000",
            "state",
        ),
        (
            Preset::Adr15,
            AlarmLayout::Entity,
            false,
            "scada/alert/ALM-BK-FEEDER-01-1772366400000",
            "state",
        ),
        (
            Preset::Scaffold,
            AlarmLayout::AssetProperty,
            false,
            "scada/asset/site-2/BK-FEEDER-01",
            "alarm/ALM-BK-FEEDER-01-1772366400000",
        ),
        (
            Preset::Scaffold,
            AlarmLayout::AssetProperty,
            true,
            "scada/asset.site-2.BK-FEEDER-01",
            "alarm/ALM-BK-FEEDER-01-1772366400000",
        ),
        (
            Preset::Adr15,
            AlarmLayout::AssetProperty,
            false,
            "scada/bk-feeder-01",
            "alarm/ALM-BK-FEEDER-01-1772366400000",
        ),
    ];
    for (preset, layout, public, entity, prop) in rows {
        let mut c = cfg(preset);
        c.alarms = layout;
        let m = Mapper::new(&c, "scada/", public).unwrap();
        let u = m.map_alarm(&alarm).unwrap();
        assert_eq!(u.entity, entity, "{preset:?} {layout:?}");
        let p = props(&u);
        match layout {
            AlarmLayout::Entity => {
                assert_eq!(p["state"], json!("active"));
                assert_eq!(p["severity"], json!("critical"));
                assert_eq!(p["value"], json!(1450));
                // The alarm's own siteId places its asset (scaffold).
                let asset = m.asset_entity("site-2", "BK-FEEDER-01").unwrap();
                assert_eq!(p["asset_entity"], json!(asset));
            }
            AlarmLayout::AssetProperty => {
                assert_eq!(p[prop]["state"], json!("active"));
                assert_eq!(p[prop]["message"], json!("Overcurrent (Phase A) > 1450A"));
            }
        }
        assert_eq!(u.ts_ms, alarm.ts_ms);
        validate_update(&u, &rules(public)).unwrap();
    }
    // No equipment and no tag: fine as its own entity, an error on an asset.
    let bare = AlarmEvent {
        id: "A1".into(),
        ts_ms: 5,
        ..AlarmEvent::default()
    };
    let m = Mapper::new(&cfg(Preset::Scaffold), "scada/", false).unwrap();
    assert_eq!(props(&m.map_alarm(&bare).unwrap())["id"], json!("A1"));
    let mut c = cfg(Preset::Scaffold);
    c.alarms = AlarmLayout::AssetProperty;
    let m = Mapper::new(&c, "scada/", false).unwrap();
    assert!(matches!(m.map_alarm(&bare), Err(MapError::NoAsset { .. })));
}

#[test]
fn odd_characters_never_produce_refused_or_colliding_ids() {
    // (site, asset) -> (path id, folded id)
    let rows = [
        (
            "site 1",
            "TR MAIN",
            "scada/asset/site 1/TR MAIN",
            "scada/asset.site 1.TR MAIN",
        ),
        ("a/b", "c", "scada/asset/a%2Fb/c", "scada/asset.a%2Fb.c"),
        ("a", "b/c", "scada/asset/a/b%2Fc", "scada/asset.a.b%2Fc"),
        ("a.b", "c", "scada/asset/a.b/c", "scada/asset.a%2Eb.c"),
        ("a", "b.c", "scada/asset/a/b.c", "scada/asset.a.b%2Ec"),
        ("100%", "x", "scada/asset/100%25/x", "scada/asset.100%25.x"),
        (
            "tab\there",
            "nl\n",
            "scada/asset/tab%09here/nl%0A",
            "scada/asset.tab%09here.nl%0A",
        ),
        (
            "Zürich",
            "Ünit-ß",
            "scada/asset/Zürich/Ünit-ß",
            "scada/asset.Zürich.Ünit-ß",
        ),
        (
            "s",
            "__deleted__",
            "scada/asset/s/__deleted__",
            "scada/asset.s.__deleted__",
        ),
    ];
    let path = Mapper::new(&cfg(Preset::Scaffold), "scada/", false).unwrap();
    let folded = Mapper::new(&cfg(Preset::Scaffold), "scada/", true).unwrap();
    let mut seen_path = std::collections::HashSet::new();
    let mut seen_folded = std::collections::HashSet::new();
    for (site, asset, want_path, want_folded) in rows {
        let p = path.asset_entity(site, asset).unwrap();
        let f = folded.asset_entity(site, asset).unwrap();
        assert_eq!(p, want_path);
        assert_eq!(f, want_folded);
        flux_outbox::validate::validate_entity_id(&p, false).unwrap();
        flux_outbox::validate::validate_entity_id(&f, true).unwrap();
        assert!(seen_path.insert(p), "path collision for {site:?}/{asset:?}");
        assert!(
            seen_folded.insert(f),
            "folded collision for {site:?}/{asset:?}"
        );
    }
    // Empty parts are mapping errors, never `//` ids.
    assert!(matches!(
        path.asset_entity("", "x"),
        Err(MapError::Empty { .. })
    ));
    assert!(matches!(
        path.asset_entity("s", ""),
        Err(MapError::Empty { .. })
    ));
    assert!(path.map_tag(&reading("", json!(1))).is_err());
    assert!(path.map_tag(&reading(".S", json!(1))).is_err());
    assert!(path.map_tag(&reading("EQ.", json!(1))).is_err());
    // A control character in a tag is escaped in the property name, so validation passes.
    let u = path.map_tag(&reading("EQ.S\u{7}", json!(1))).unwrap();
    assert!(props(&u).contains_key("tag/EQ.S%07"));
    validate_update(&u, &rules(false)).unwrap();
    // adr15: a sensor named like a reserved or protected property maps, and validation refuses it
    // (so the source counts it instead of writing it).
    let adr = Mapper::new(&cfg(Preset::Adr15), "scada/", false).unwrap();
    for tag in ["EQ.__DELETED__", "EQ.COMMAND"] {
        let u = adr.map_tag(&reading(tag, json!(1))).unwrap();
        assert!(validate_update(&u, &rules(false)).is_err(), "{tag}");
    }
}

#[test]
fn config_checks() {
    let ok =
        |c: &MapperConfig, prefix: &str, public: bool| Mapper::new(c, prefix, public).map(|_| ());
    let base = cfg(Preset::Scaffold);
    // Path ids in public mode would be refused by Flux.
    let mut c = base.clone();
    c.id_form = IdForm::Path;
    assert_eq!(ok(&c, "scada/", true).unwrap_err().key, "mapper.id_form");
    ok(&c, "scada/", false).unwrap();
    // Folding needs a `namespace/` prefix.
    c.id_form = IdForm::Folded;
    ok(&c, "scada/", false).unwrap();
    ok(&c, "scada/plant-a.", false).unwrap();
    for bad in ["scada.", "Scada/", "sc/", "scada/a/"] {
        assert_eq!(
            ok(&c, bad, false).unwrap_err().key,
            "flux.entity_prefix",
            "{bad}"
        );
    }
    let mut c = base.clone();
    c.default_site = Some(String::new());
    assert_eq!(
        ok(&c, "scada/", false).unwrap_err().key,
        "mapper.default_site"
    );
    let mut c = base.clone();
    c.quality_property = Some("tag/{tag}".into());
    assert!(
        ok(&c, "scada/", false).is_err(),
        "value and quality names must differ"
    );
    let mut c = base.clone();
    c.equipment.insert(
        "X".into(),
        EquipmentEntry {
            site: Some(String::new()),
            asset: None,
        },
    );
    assert_eq!(ok(&c, "scada/", false).unwrap_err().key, "mapper.equipment");
}

#[test]
fn toml_and_flux_entity_prefix() {
    let text = r#"
[ingest]
public_mode = true
[mapper]
preset = "adr15"
tags = "entity-per-tag"
alarms = "asset-property"
default_site = "site-1"
quality_property = "q"
[mapper.equipment."TR-MAIN-01"]
site = "site-2"
asset = "tr-1"
[heartbeat]
interval = "5s"
[sources.oxscada_ws]
url = "ws://10.0.0.5:5000/ws/tags"
api_key = "k"
tags = ["TR-MAIN-01.TEMPERATURE"]
"#;
    let mut c = Config::from_toml_str(text, "t.toml").unwrap();
    c.apply_env(|k| (k == "FLUX_ENTITY_PREFIX").then(|| "plant/".to_string()))
        .unwrap();
    c.resolve().unwrap();
    c.validate().unwrap();
    assert_eq!(c.mapper.preset, Preset::Adr15);
    assert_eq!(
        c.mapper.equipment["TR-MAIN-01"].asset.as_deref(),
        Some("tr-1")
    );
    let m = Mapper::from_config(&c).unwrap();
    let u = m
        .map_tag(&reading("TR-MAIN-01.TEMPERATURE", json!(70)))
        .unwrap();
    assert_eq!(u.entity, "plant/tr-1.temperature");
    assert_eq!(props(&u).keys().collect::<Vec<_>>(), ["q", "value"]);
    // The rendered configuration parses back to the same thing, the key redacted.
    let rendered = c.render_effective();
    assert!(!rendered.contains("api_key = \"k\""));
    let back = Config::from_toml_str(&rendered, "r.toml").unwrap();
    assert_eq!(back.mapper, c.mapper);
    // Unknown keys are refused with their table.
    let e = Config::from_toml_str("[mapper]\npreset = \"scaffold\"\nfold = true\n", "t.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("mapper.fold"), "{e}");
    // Bad source settings are named by key.
    for (text, key) in [
        (
            "[sources.oxscada_ws]\nurl = \"ws://h:5000/ws/tags?apiKey=x\"\n",
            "sources.oxscada_ws.url",
        ),
        (
            "[sources.oxscada_ws]\nurl = \"wss://h:5000/ws/tags\"\n",
            "sources.oxscada_ws.url",
        ),
        (
            "[sources.oxscada_ws]\nurl = \"http://h:5000/ws/tags\"\n",
            "sources.oxscada_ws.url",
        ),
        (
            "[sources.oxscada_ws]\nupdates_per_ingest_max = 0\n",
            "sources.oxscada_ws.updates_per_ingest_max",
        ),
        (
            "[sources.oxscada_ws]\nping_interval = \"2m\"\n",
            "sources.oxscada_ws.idle_timeout",
        ),
        ("[heartbeat]\ninterval = \"1ms\"\n", "heartbeat.interval"),
        (
            "[read_through]\nflux_timeout = \"0s\"\n",
            "read_through.flux_timeout",
        ),
        (
            "[ingest]\npublic_mode = true\n[mapper]\nid_form = \"path\"\n",
            "mapper.id_form",
        ),
    ] {
        let e = Config::from_toml_str(text, "t.toml")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(&format!("{key}:")), "{text} -> {e}");
    }
}

#[test]
fn api_key_header_is_base64url_without_padding() {
    assert_eq!(subprotocol_header(None), "oxscada.v1");
    // "k?>" in standard base64 is "az8+" ; base64url uses '-' and '_' and no '='.
    assert_eq!(
        subprotocol_header(Some("k?>")),
        "oxscada.v1, oxscada.api-key.az8-"
    );
    assert_eq!(
        subprotocol_header(Some("ab")),
        "oxscada.v1, oxscada.api-key.YWI"
    );
    assert_eq!(
        subprotocol_header(Some("\u{ff}\u{ff}")),
        "oxscada.v1, oxscada.api-key.w7_Dvw"
    );
}

#[test]
fn stream_messages_parse_and_map() {
    let m = Mapper::new(&cfg(Preset::Scaffold), "scada/", false).unwrap();
    let none = std::collections::HashSet::new();
    let now = 1_000;
    let snapshot = br#"{"event":"tag:snapshot","payload":{
        "TR-MAIN-01.TEMPERATURE":{"tagName":"TR-MAIN-01.TEMPERATURE","value":66.2,"quality":"good","timestamp":"2026-03-01T12:00:00.000Z"},
        "BK-FEEDER-01.CURRENT":{"value":611.4,"quality":192}}}"#;
    let p = parse_message(snapshot, &m, &none, true, now);
    assert_eq!(p.event, "tag:snapshot");
    assert!(p.bad.is_empty(), "{:?}", p.bad);
    assert_eq!(p.updates.len(), 2);
    let tr = p
        .updates
        .iter()
        .find(|u| u.entity.ends_with("TR-MAIN-01"))
        .unwrap();
    assert_eq!(tr.ts_ms, 1_772_366_400_000);
    let bk = p
        .updates
        .iter()
        .find(|u| u.entity.ends_with("BK-FEEDER-01"))
        .unwrap();
    assert_eq!(bk.ts_ms, now, "no timestamp: arrival time");
    assert_eq!(props(bk)["tag/BK-FEEDER-01.CURRENT/quality"], json!(192));

    let batch = br#"{"event":"tag:batch","payload":[
        {"tagName":"A.X","value":1,"timestamp":1772366400123},
        {"tagName":"A.Y"},
        {"value":3},
        "nope",
        {"tagName":"A.Z","value":null,"timestamp":"yesterday"},
        {"tagName":"A.W","value":"on","timestamp":"2026-03-01T12:00:02Z"}]}"#;
    let p = parse_message(batch, &m, &none, true, now);
    assert_eq!(p.updates.len(), 2);
    assert_eq!(p.updates[0].ts_ms, 1_772_366_400_123);
    assert_eq!(p.updates[1].ts_ms, 1_772_366_402_000);
    let reasons: Vec<_> = p.bad.iter().map(|(r, _)| *r).collect();
    assert_eq!(
        reasons,
        ["bad_reading", "bad_reading", "bad_reading", "bad_timestamp"]
    );

    // Filter keeps only subscribed tags.
    let filter = ["A.X".to_string()].into_iter().collect();
    let p = parse_message(batch, &m, &filter, true, now);
    assert_eq!(p.updates.len(), 1);

    let alarm = br#"{"event":"alarm:update","payload":{"id":"ALM-1","name":"n","tagId":"BK-FEEDER-01.BREAKER_TRIP","equipmentId":"BK-FEEDER-01","siteId":"site-1","severity":"critical","state":"active","message":"m","timestamp":"2026-03-01T12:00:00.000Z","value":1450}}"#;
    let p = parse_message(alarm, &m, &none, true, now);
    assert_eq!(p.updates.len(), 1);
    assert_eq!(p.updates[0].entity, "scada/alert/ALM-1");
    assert!(
        parse_message(alarm, &m, &none, false, now)
            .updates
            .is_empty(),
        "alarms off"
    );

    for (msg, reason) in [
        (&b"not json"[..], "invalid_json"),
        (br#"{"payload":{}}"#, "no_event"),
        (br#"{"event":"tag:batch","payload":{}}"#, "bad_payload"),
        (
            br#"{"event":"tag:update","payload":{"tagName":".X","value":1}}"#,
            "unmapped",
        ),
        (
            br#"{"event":"alarm:update","payload":{"name":"x"}}"#,
            "bad_alarm",
        ),
    ] {
        let p = parse_message(msg, &m, &none, true, now);
        assert_eq!(
            p.bad.first().map(|b| b.0),
            Some(reason),
            "{}",
            String::from_utf8_lossy(msg)
        );
        assert!(p.updates.is_empty());
    }
    for ignored in [
        &br#"{"event":"connected","payload":{"clientId":"x","tagCount":9}}"#[..],
        br#"{"event":"pong"}"#,
        br#"{"event":"pipeline:health","payload":{"status":"ok"}}"#,
    ] {
        let p = parse_message(ignored, &m, &none, true, now);
        assert!(p.bad.is_empty() && p.updates.is_empty());
    }
}
