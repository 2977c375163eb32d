//! The documented example configuration (`ops/flux-outbox.toml`) stays true: it parses, it
//! configures exactly the defaults (it deliberately differs in nothing; keys whose default is
//! computed or absent are commented out there), every key of the defaults appears in it, and
//! the effective rendering never shows a token.

use std::path::Path;

use flux_outbox::config::{Config, Secret};
use flux_outbox::source_ws::OxscadaWsConfig;

const EXAMPLE: &str = include_str!("../ops/flux-outbox.toml");

#[test]
fn example_parses_and_equals_the_defaults() {
    let parsed = Config::from_toml_str(EXAMPLE, "ops/flux-outbox.toml").unwrap();
    assert_eq!(parsed, Config::default());
    parsed.validate().unwrap();
}

#[test]
fn example_loads_from_disk_without_env() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/flux-outbox.toml");
    let loaded = Config::load_with_env(Some(&path), |_| None).unwrap();
    let mut expected = Config::default();
    expected.flux.source = Some(format!("outbox-{}", expected.gateway_id));
    assert_eq!(loaded, expected);
}

#[test]
fn example_mentions_every_key() {
    // Every key of the rendered defaults (including the optional ones filled in) appears in the
    // example, active or commented out.
    let mut full = Config::default();
    full.ingest.token = Some(Secret::new("t"));
    full.ingest.token_file = Some("f".into());
    full.flux.url = Some("http://h".into());
    full.flux.auth_token = Some(Secret::new("t"));
    full.flux.auth_token_file = Some("f".into());
    full.flux.ca_file = Some("f".into());
    full.flux.source = Some("s".into());
    full.admin.token = Some(Secret::new("t"));
    full.admin.token_file = Some("f".into());
    // [sources] defaults to no source at all: fill in the WebSocket source so its keys are
    // checked too (they appear commented out in the example).
    full.sources.oxscada_ws = Some(OxscadaWsConfig {
        api_key: Some(Secret::new("t")),
        api_key_file: Some("f".into()),
        ..OxscadaWsConfig::default()
    });
    let rendered = full.render_effective();
    assert!(rendered.contains("[sources.oxscada_ws]"), "{rendered}");
    let mut table = String::new();
    for line in rendered
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        if line.starts_with('[') {
            table = line.to_string();
            assert!(EXAMPLE.contains(line), "example lacks table {line}");
            continue;
        }
        let key = line.split('=').next().unwrap().trim();
        let active = format!("\n{key} = ");
        let commented = format!("\n# {key} = ");
        assert!(
            EXAMPLE.contains(&active) || EXAMPLE.contains(&commented),
            "example lacks {table} {key}"
        );
    }
}

#[test]
fn commented_out_source_table_shows_the_defaults() {
    // Uncommenting [sources.oxscada_ws] as shipped (without the key, which has no default)
    // configures exactly the source's defaults: the values the example shows are true.
    let start = EXAMPLE
        .find("# [sources.oxscada_ws]")
        .expect("example has a commented-out [sources.oxscada_ws]");
    let mut text = EXAMPLE[..start].to_string();
    let mut keys = 0;
    for line in EXAMPLE[start..].lines() {
        let Some(rest) = line.strip_prefix("# ") else {
            continue;
        };
        let is_key = rest.starts_with('[')
            || rest
                .split_once(" = ")
                .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
        if is_key && !rest.starts_with("api_key") {
            text.push_str(rest);
            text.push('\n');
            keys += usize::from(!rest.starts_with('['));
        }
    }
    assert_eq!(keys, 10, "source keys shown (all but the key):\n{text}");
    let parsed = Config::from_toml_str(&text, "example, source uncommented").unwrap();
    assert_eq!(parsed.sources.oxscada_ws, Some(OxscadaWsConfig::default()));
    parsed.validate().unwrap();
}

#[test]
fn rendering_never_shows_a_token() {
    let text = format!("{EXAMPLE}\n",)
        .replace("# token = \"change-me\"", "token = \"ingest-secret-1\"")
        .replace(
            "# auth_token = \"change-me\"",
            "auth_token = \"flux-secret-2\"",
        );
    let mut config = Config::from_toml_str(&text, "edited example").unwrap();
    config
        .apply_env(|name| (name == "FLUX_AUTH_TOKEN").then(|| "env-secret-3".to_string()))
        .unwrap();
    config.resolve().unwrap();
    config.validate().unwrap();
    let rendered = config.render_effective();
    let debug = format!("{config:?}");
    for secret in ["ingest-secret-1", "flux-secret-2", "env-secret-3"] {
        assert!(
            !rendered.contains(secret),
            "{secret} in rendering:\n{rendered}"
        );
        assert!(!debug.contains(secret), "{secret} in Debug output");
    }
    assert!(rendered.contains("token = \"[redacted]\""), "{rendered}");
    assert!(
        rendered.contains("auth_token = \"[redacted]\""),
        "{rendered}"
    );
}
