//! The documented example configuration (`ops/flux-outbox.toml`) stays true: it parses, it
//! configures exactly the defaults (it deliberately differs in nothing; keys whose default is
//! computed or absent are commented out there), every key of the defaults appears in it, and
//! the effective rendering never shows a token.

use std::path::Path;

use flux_outbox::config::{Config, Secret};

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
    let rendered = full.render_effective();
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
