//! The files under `ops/` stay true to the code: the example configuration passes
//! `flux-outbox check-config`, every active key in it is documented, the systemd unit keeps the
//! settings the worker relies on (notify, watchdog, state directory, stop timeout above the
//! shutdown bound), and the alert rules only use metrics the worker exports.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use flux_outbox::config::Config;

fn ops(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ops").join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(ops(rel)).unwrap_or_else(|e| panic!("read ops/{rel}: {e}"))
}

#[test]
fn check_config_passes_on_the_example() {
    // No environment overrides: the file alone is checked, as the unit starts it without an
    // environment file.
    let out = Command::new(env!("CARGO_BIN_EXE_flux-outbox"))
        .arg("check-config")
        .arg("--config")
        .arg(ops("flux-outbox.toml"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .expect("run flux-outbox check-config");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "check-config failed ({:?}):\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("data_dir = \"/var/lib/flux-outbox\""),
        "{stdout}"
    );
    assert!(stdout.contains("[flush]"), "{stdout}");
}

#[test]
fn every_active_key_of_the_example_has_a_comment() {
    let text = read("flux-outbox.toml");
    let mut previous = "";
    for line in text.lines() {
        let t = line.trim();
        let is_key = !t.is_empty() && !t.starts_with('#') && !t.starts_with('[');
        if is_key {
            assert!(
                previous.starts_with('#'),
                "ops/flux-outbox.toml: `{t}` has no comment above it"
            );
        }
        if !t.is_empty() {
            previous = t;
        }
    }
}

/// `# name = value`: a key shown commented out (its default, or an example where it has none).
fn commented_out_key(line: &str) -> Option<&str> {
    let rest = line.trim().strip_prefix("# ")?;
    let (name, _) = rest.split_once(" = ")?;
    (!name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_')).then_some(name)
}

/// Whether `text` names `key` as a whole word (`token_file` is not named by `auth_token_file`).
fn names_key(text: &str, key: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(key).any(|(i, _)| {
        !text[..i].chars().next_back().is_some_and(word)
            && !text[i + key.len()..].chars().next().is_some_and(word)
    })
}

#[test]
fn every_commented_out_key_of_the_example_has_a_comment() {
    // A commented-out key shows its default (or an example value where the default is none);
    // it needs its own explanation right above it, or, for keys documented together (token /
    // token_file), to be named in the explanation of its group.
    let text = read("flux-outbox.toml");
    let lines: Vec<&str> = text.lines().collect();
    let mut checked = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(key) = commented_out_key(line) else {
            continue;
        };
        let block: Vec<&str> = lines[..i]
            .iter()
            .rev()
            .map(|l| l.trim())
            .take_while(|l| l.starts_with('#'))
            .collect();
        let prose = |l: &str| commented_out_key(l).is_none() && !l.starts_with("# [");
        let own = block.first().is_some_and(|l| prose(l));
        let in_group = block.iter().any(|l| prose(l) && names_key(l, key));
        assert!(
            own || in_group,
            "ops/flux-outbox.toml: commented-out `{}` has no comment of its own above it",
            line.trim()
        );
        checked.push(key);
    }
    // The test sees the optional keys, including the whole [sources.oxscada_ws] table.
    for key in [
        "gateway_id",
        "url",
        "alarms",
        "reconnect_max",
        "idle_timeout",
    ] {
        assert!(
            checked.contains(&key),
            "{key} not found commented out: {checked:?}"
        );
    }
}

/// `key=value` settings of the unit (later lines win, as in systemd, except list settings
/// that accumulate; those are checked with `all`).
fn unit() -> Vec<(String, String)> {
    read("systemd/flux-outbox.service")
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('[') && !l.is_empty())
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn get(unit: &[(String, String)], key: &str) -> String {
    unit.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("unit lacks {key}="))
}

#[test]
fn unit_keeps_what_the_worker_relies_on() {
    let u = unit();
    let expect = [
        ("Type", "notify"),
        ("Restart", "always"),
        ("User", "flux-outbox"),
        ("StateDirectory", "flux-outbox"),
        ("StateDirectoryMode", "0700"),
        ("EnvironmentFile", "-/etc/flux-outbox/env"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ];
    for (k, v) in expect {
        assert_eq!(get(&u, k), v, "{k}=");
    }
    assert!(u
        .iter()
        .any(|(k, v)| k == "SystemCallFilter" && v == "@system-service"));
    assert!(u.iter().any(|(k, _)| k == "MemoryMax"));

    // The unit starts the packaged binary with the packaged configuration, whose data_dir is
    // the state directory (ProtectSystem=strict leaves nothing else writable).
    let exec = get(&u, "ExecStart");
    assert_eq!(
        exec,
        "/usr/bin/flux-outbox run --config /etc/flux-outbox/flux-outbox.toml"
    );
    let cfg = Config::load_with_env(Some(&ops("flux-outbox.toml")), |_| None).expect("example");
    assert_eq!(
        cfg.data_dir,
        PathBuf::from("/var/lib").join(get(&u, "StateDirectory"))
    );

    // A graceful stop: the flush task's batch in flight (connect + request timeout), then the
    // final flush. The stop timeout must leave room for both, or systemd SIGKILLs a clean stop.
    let parse =
        |k: &str| humantime::parse_duration(&get(&u, k)).unwrap_or_else(|e| panic!("{k}: {e}"));
    let stop_bound =
        cfg.flux.connect_timeout + cfg.flux.request_timeout + cfg.flush.final_flush_timeout;
    assert!(
        parse("TimeoutStopSec") > stop_bound + Duration::from_secs(10),
        "TimeoutStopSec must exceed {stop_bound:?} with margin"
    );
    // The worker pings at half WatchdogSec; the watchdog must not fire during a restart delay.
    let watchdog = parse("WatchdogSec");
    assert!(watchdog >= Duration::from_secs(10), "{watchdog:?}");
    assert!(parse("RestartSec") >= Duration::from_secs(1));
}

#[test]
fn alerts_use_metrics_the_worker_exports() {
    let alerts = read("prometheus/alerts.yml");
    let exported = format!(
        "{}{}{}",
        include_str!("../src/metrics.rs"),
        include_str!("../src/admin.rs"),
        // The WebSocket source renders its own flux_outbox_source_* lines.
        include_str!("../src/source_ws.rs")
    );
    let mut names: Vec<&str> = alerts
        .match_indices("flux_outbox_")
        .map(|(i, _)| {
            let rest = &alerts[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() >= 6, "{names:?}");
    for name in names {
        // The whole name, not a prefix of a longer one.
        let whole = exported.match_indices(name).any(|(i, _)| {
            exported[i + name.len()..]
                .chars()
                .next()
                .is_some_and(|c| !(c.is_ascii_alphanumeric() || c == '_'))
        });
        assert!(
            whole,
            "alerts.yml uses {name}, which /metrics does not export"
        );
    }
}

#[test]
fn maintainer_scripts_create_the_user_before_the_unit_starts() {
    let postinst = read("debian/postinst");
    let user = postinst
        .find("useradd --system")
        .expect("useradd in postinst");
    let debhelper = postinst.find("#DEBHELPER#").expect("#DEBHELPER# token");
    assert!(
        user < debhelper,
        "the generated start must come after useradd"
    );
    assert!(postinst.contains("--shell /usr/sbin/nologin"));
    for script in [
        "debian/postinst",
        "debian/postrm",
        "ci-package.sh",
        "ci-promtool.sh",
    ] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(ops(script))
            .expect("script")
            .permissions()
            .mode();
        assert!(mode & 0o111 != 0, "ops/{script} is not executable");
    }
}

#[test]
fn ops_files_name_no_path_of_a_build_machine() {
    for rel in [
        "flux-outbox.toml",
        "systemd/flux-outbox.service",
        "prometheus/alerts.yml",
        "RUNBOOK.md",
        "debian/postinst",
        "ci-package.sh",
    ] {
        let text = read(rel);
        // This checkout's own location, and home directories, never belong in shipped files.
        for bad in [env!("CARGO_MANIFEST_DIR"), "/home/", "/root/"] {
            assert!(!text.contains(bad), "ops/{rel} contains {bad}");
        }
    }
}
