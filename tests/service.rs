//! Runs the worker binary the way `ops/systemd/flux-outbox.service` does and plays systemd's
//! part, driven by the unit file itself: `ExecStart=` is the command line (the binary and the
//! config path mapped into a scratch root), the example configuration `ops/flux-outbox.toml` is
//! the config (only its data directory, listen addresses and final flush bound changed for the
//! test), `EnvironmentFile=` is parsed the way systemd reads it (`KEY=VALUE` lines, `#`/`;`
//! comments, blank lines, quotes; `-` = optional) into the process environment, which is
//! otherwise empty, `StateDirectory=`/`StateDirectoryMode=` are created under the scratch root
//! and passed as `STATE_DIRECTORY`, `UMask=` is applied, `NOTIFY_SOCKET` points at a datagram
//! socket this test bound, `WATCHDOG_USEC` is small, and the stop is a SIGTERM. The worker
//! must say `READY=1`, keep sending `WATCHDOG=1`, say `STOPPING=1` on SIGTERM and exit 0.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// 0.5 s: the worker pings every 250 ms, so a few seconds show many pings.
const WATCHDOG_USEC: &str = "500000";

const UNIT: &str = include_str!("../ops/systemd/flux-outbox.service");
const EXAMPLE_CONFIG: &str = include_str!("../ops/flux-outbox.toml");
const EXAMPLE_ENV: &str = include_str!("../ops/env.example");

/// The `[Service]` settings of the unit (last assignment wins, as in systemd).
fn unit_setting(key: &str) -> String {
    let mut in_service = false;
    let mut found = None;
    for line in UNIT.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && !line.starts_with('#') {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == key {
                    found = Some(v.trim().to_string());
                }
            }
        }
    }
    found.unwrap_or_else(|| panic!("the unit has no {key}="))
}

/// Reads an environment file as systemd's `EnvironmentFile=` does (the subset a hand-written
/// file uses): blank lines and lines starting with `#` or `;` are ignored; `KEY=VALUE` with
/// whitespace around the key and before the value dropped; a value wholly in double or single
/// quotes loses them (`\"` and `\\` unescaped inside double quotes); an unquoted value loses
/// trailing whitespace; a line ending in `\` continues on the next one.
fn parse_environment_file(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(first) = lines.next() {
        let mut line = first.to_string();
        while line.ends_with('\\') {
            line.pop();
            match lines.next() {
                Some(next) => line.push_str(next),
                None => break,
            }
        }
        let l = line.trim_start();
        if l.is_empty() || l.starts_with('#') || l.starts_with(';') {
            continue;
        }
        let Some((k, v)) = l.split_once('=') else {
            continue; // systemd ignores (and warns about) a line without '='
        };
        let v = v.trim_start();
        let value = if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
            v[1..v.len() - 1]
                .replace("\\\\", "\u{0}")
                .replace("\\\"", "\"")
                .replace('\u{0}', "\\")
        } else if v.len() >= 2 && v.starts_with('\'') && v.ends_with('\'') {
            v[1..v.len() - 1].to_string()
        } else {
            v.trim_end().to_string()
        };
        out.insert(k.trim().to_string(), value);
    }
    out
}

#[test]
fn environment_file_parser_reads_what_systemd_reads() {
    let env = parse_environment_file(
        "# comment\n; also a comment\n\n  FLUX_URL = http://x:1  \nA=\"quoted # not a comment\"\n\
         B='single'\nC=\"esc \\\"q\\\" \\\\ \"\nD=one \\\ntwo\nEMPTY=\nnot a line\n",
    );
    let want: BTreeMap<String, String> = [
        ("FLUX_URL", "http://x:1"),
        ("A", "quoted # not a comment"),
        ("B", "single"),
        ("C", "esc \"q\" \\ "),
        ("D", "one two"),
        ("EMPTY", ""),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(env, want);
    // The shipped example sets nothing until a line is uncommented.
    assert!(parse_environment_file(EXAMPLE_ENV).is_empty());
}

/// Replaces exactly one occurrence (the test breaks loudly when the example changes shape).
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "ops/flux-outbox.toml: expected exactly one {from:?}"
    );
    text.replacen(from, to, 1)
}

/// The scratch root: `/etc/flux-outbox/...` and `/var/lib/...` live under it.
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn path(&self, abs: &str) -> PathBuf {
        self.dir.path().join(abs.trim_start_matches('/'))
    }
}

struct Worker {
    child: Child,
    stderr_path: PathBuf,
    state_dir: PathBuf,
}

impl Worker {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A failed assertion must not leave a worker behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A port nothing listens on: bound and released (nothing else on this machine reuses it
/// within the test's few seconds, and a refused connection is all the flusher needs to see).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe port");
    l.local_addr().expect("probe port address").port()
}

/// Starts the worker as systemd would from the unit. `env_file`: the environment file's
/// contents, `None` to leave it absent (the unit's `-` makes it optional).
fn start(sock: &Path, env_file: Option<&str>) -> (Root, Worker) {
    let root = Root {
        dir: tempfile::tempdir().expect("tempdir"),
    };
    // StateDirectory=flux-outbox, StateDirectoryMode=0700: systemd creates /var/lib/<name>
    // with that mode and passes it as STATE_DIRECTORY; the config's data_dir is that path.
    let state_name = unit_setting("StateDirectory");
    let state_dir = root.path(&format!("/var/lib/{state_name}"));
    std::fs::create_dir_all(&state_dir).expect("state directory");
    let mode = u32::from_str_radix(&unit_setting("StateDirectoryMode"), 8).expect("mode");
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(mode)).expect("chmod");

    // The example configuration, as the package installs it, with what a test must change.
    let mut config = replace_once(
        EXAMPLE_CONFIG,
        "data_dir = \"/var/lib/flux-outbox\"",
        &format!("data_dir = {:?}", state_dir.display().to_string()),
    );
    // Port 0: parallel tests (and other checkouts on this machine) never collide.
    config = replace_once(
        &config,
        "listen = \"127.0.0.1:8650\"",
        "listen = \"127.0.0.1:0\"",
    );
    config = replace_once(
        &config,
        "listen = \"127.0.0.1:8651\"",
        "listen = \"127.0.0.1:0\"",
    );
    config = replace_once(
        &config,
        "final_flush_timeout = \"10s\"",
        "final_flush_timeout = \"2s\"",
    );
    config = replace_once(
        &config,
        "# gateway_id = \"gw-17\"",
        "gateway_id = \"test-gw\"",
    );

    // ExecStart=/usr/bin/flux-outbox run --config /etc/flux-outbox/flux-outbox.toml
    let exec: Vec<String> = unit_setting("ExecStart")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(exec[0], "/usr/bin/flux-outbox", "ExecStart: {exec:?}");
    let config_arg = exec
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| exec.get(i + 1))
        .expect("ExecStart passes --config");
    let config_path = root.path(config_arg);
    std::fs::create_dir_all(config_path.parent().unwrap()).expect("config dir");
    std::fs::write(&config_path, config).expect("write config");
    let args: Vec<PathBuf> = exec[1..]
        .iter()
        .map(|a| {
            if a.starts_with('/') {
                root.path(a)
            } else {
                PathBuf::from(a)
            }
        })
        .collect();

    // EnvironmentFile=-/etc/flux-outbox/env
    let env_setting = unit_setting("EnvironmentFile");
    let (optional, env_path) = match env_setting.strip_prefix('-') {
        Some(p) => (true, p.to_string()),
        None => (false, env_setting.clone()),
    };
    let env_path = root.path(&env_path);
    let env = match env_file {
        Some(text) => {
            std::fs::write(&env_path, text).expect("write environment file");
            parse_environment_file(&std::fs::read_to_string(&env_path).expect("read env file"))
        }
        None => {
            assert!(optional, "the unit requires {env_setting}");
            BTreeMap::new()
        }
    };

    let umask = u32::from_str_radix(&unit_setting("UMask"), 8).expect("UMask") as libc::mode_t;
    let stderr_path = root.dir.path().join("stderr.log");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flux-outbox"));
    cmd.args(&args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("STATE_DIRECTORY", &state_dir)
        .env("NOTIFY_SOCKET", sock)
        .env("WATCHDOG_USEC", WATCHDOG_USEC)
        .envs(&env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr));
    // SAFETY: umask(2) only, between fork and exec; it allocates nothing and cannot fail.
    unsafe {
        cmd.pre_exec(move || {
            libc::umask(umask);
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn flux-outbox");
    (
        root,
        Worker {
            child,
            stderr_path,
            state_dir,
        },
    )
}

/// Receives notification datagrams until `until` says stop or `timeout` passes; returns every
/// line seen (each datagram is one or more `KEY=value` lines).
fn collect(
    sock: &UnixDatagram,
    timeout: Duration,
    mut until: impl FnMut(&[String]) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut lines = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && !until(&lines) {
        let left = deadline.saturating_duration_since(Instant::now());
        sock.set_read_timeout(Some(left.max(Duration::from_millis(10))))
            .expect("set timeout");
        match sock.recv(&mut buf) {
            Ok(n) => lines.extend(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .map(str::to_string),
            ),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("recv on notify socket: {e}"),
        }
    }
    lines
}

fn count(lines: &[String], what: &str) -> usize {
    lines.iter().filter(|l| l.as_str() == what).count()
}

fn wait_exit(w: &mut Worker, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = w.child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "worker did not exit within {timeout:?} of SIGTERM; stderr:\n{}",
            w.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `want_link`: the link state the STATUS line must reach (proves the environment file's
/// FLUX_URL, or its absence, took effect).
fn lifecycle(env_file: &str, want_link: &str) {
    let sock_dir = tempfile::tempdir().expect("tempdir");
    let sock_path = sock_dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    let (_root, mut w) = start(&sock_path, Some(env_file));

    // READY=1 once the store is open and the listeners are bound.
    let lines = collect(&sock, Duration::from_secs(60), |l| {
        l.iter().any(|x| x == "READY=1")
    });
    assert!(
        lines.iter().any(|x| x == "READY=1"),
        "no READY=1; got {lines:?}; stderr:\n{}",
        w.stderr()
    );
    let ready_at = lines.iter().position(|x| x == "READY=1").unwrap_or(0);
    assert_eq!(
        count(&lines[..ready_at], "WATCHDOG=1"),
        0,
        "watchdog ping before READY: {lines:?}"
    );
    // The store lives in the state directory, which keeps its mode; UMask=0077 keeps the
    // worker's files private too.
    let store = w.state_dir.join("store");
    assert!(
        store.is_dir(),
        "READY before the store exists in the state directory"
    );
    let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(&w.state_dir), 0o700);
    for entry in std::fs::read_dir(&store).expect("store dir").flatten() {
        assert_eq!(
            mode(&entry.path()) & 0o077,
            0,
            "{} readable by others",
            entry.path().display()
        );
    }

    // Pings keep coming (every 250 ms): the flush loop beats and the store answers; the
    // status line shows the link state the environment file configured.
    let want_status = format!("link {want_link}");
    let lines = collect(&sock, Duration::from_secs(30), |l| {
        count(l, "WATCHDOG=1") >= 4 && l.iter().any(|x| x.contains(&want_status))
    });
    assert!(
        count(&lines, "WATCHDOG=1") >= 4,
        "too few WATCHDOG=1: {lines:?}; stderr:\n{}",
        w.stderr()
    );
    assert!(
        lines
            .iter()
            .any(|x| x.starts_with("STATUS=") && x.contains(&want_status)),
        "no STATUS with {want_status:?}: {lines:?}; stderr:\n{}",
        w.stderr()
    );

    // SIGTERM: STOPPING=1, then a clean exit.
    let pid = w.child.id() as libc::pid_t;
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "kill");
    let lines = collect(&sock, Duration::from_secs(30), |l| {
        l.iter().any(|x| x == "STOPPING=1")
    });
    assert!(
        lines.iter().any(|x| x == "STOPPING=1"),
        "no STOPPING=1 after SIGTERM: {lines:?}; stderr:\n{}",
        w.stderr()
    );
    let status = wait_exit(&mut w, Duration::from_secs(30));
    assert!(status.success(), "exit {status:?}; stderr:\n{}", w.stderr());
    let stderr = w.stderr();
    // RUST_LOG=info came from the environment file (the default level would not show this).
    assert!(stderr.contains("systemd watchdog enabled"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !stderr.contains(TOKEN),
        "the token reached the log: {stderr}"
    );
}

const TOKEN: &str = "test-token-not-secret";

/// The shipped example with its lines filled in the way an operator edits it.
fn env_file(flux_url: Option<&str>) -> String {
    let mut text = EXAMPLE_ENV.replace("#RUST_LOG=info", "RUST_LOG=info");
    if let Some(url) = flux_url {
        text = text
            .replace("#FLUX_AUTH_TOKEN=", &format!("FLUX_AUTH_TOKEN=\"{TOKEN}\""))
            .replace(
                "#FLUX_URL=https://flux.example.net",
                &format!("; set by the operator\nFLUX_URL = {url}  "),
            );
    }
    text
}

/// With a Flux URL from the environment file (here: a port nothing listens on): the flush loop
/// runs and must keep beating for the pings to continue.
#[test]
fn notifies_ready_watchdog_and_stopping_with_a_flush_loop() {
    let url = format!("http://127.0.0.1:{}", closed_port());
    let text = env_file(Some(&url));
    let env = parse_environment_file(&text);
    assert_eq!(env.get("FLUX_URL"), Some(&url), "{text}");
    assert_eq!(env.get("FLUX_AUTH_TOKEN").map(String::as_str), Some(TOKEN));
    // Nothing is pending, so the flusher has not tried Flux yet: "unknown", not "offline".
    lifecycle(&text, "unknown");
}

/// Offline mode (the environment file sets no Flux URL, so no flush loop): the store checks
/// alone gate the pings.
#[test]
fn notifies_ready_watchdog_and_stopping_offline() {
    lifecycle(&env_file(None), "offline");
}

/// Without the (optional) environment file the worker starts too; the first READY datagram
/// carries a STATUS line with the pending keys and the link state, for `systemctl status`.
#[test]
fn ready_carries_a_status_line_without_an_environment_file() {
    let sock_dir = tempfile::tempdir().expect("tempdir");
    let sock_path = sock_dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    let (_root, w) = start(&sock_path, None);
    let lines = collect(&sock, Duration::from_secs(60), |l| {
        l.iter().any(|x| x.starts_with("STATUS="))
    });
    assert!(
        lines
            .iter()
            .any(|x| x == "STATUS=0 pending keys, link offline"),
        "{lines:?}; stderr:\n{}",
        w.stderr()
    );
}
