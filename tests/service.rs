//! Runs the worker binary the way `ops/systemd/flux-outbox.service` does and plays systemd's
//! part: the variables of the environment file are passed as environment, the state directory
//! is a temporary directory, `NOTIFY_SOCKET` points at a datagram socket this test bound,
//! `WATCHDOG_USEC` is small, and the stop is a SIGTERM. The worker must say `READY=1`, keep
//! sending `WATCHDOG=1`, say `STOPPING=1` on SIGTERM and exit 0.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// 0.5 s: the worker pings every 250 ms, so a few seconds show many pings.
const WATCHDOG_USEC: &str = "500000";

struct Worker {
    child: Child,
    stderr_path: std::path::PathBuf,
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

fn start(dir: &Path, sock: &Path, env: &[(&str, String)]) -> Worker {
    // Port 0: parallel tests (and other checkouts on this machine) never collide.
    let config = dir.join("flux-outbox.toml");
    std::fs::write(
        &config,
        "gateway_id = \"test-gw\"\n\
         [ingest]\nlisten = \"127.0.0.1:0\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [flush]\nfinal_flush_timeout = \"2s\"\n",
    )
    .expect("write config");
    let stderr_path = dir.join("stderr.log");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flux-outbox"));
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .env("NOTIFY_SOCKET", sock)
        .env("WATCHDOG_USEC", WATCHDOG_USEC)
        // StateDirectory=flux-outbox → a fresh private directory.
        .env("FLUX_OUTBOX_DATA_DIR", dir.join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn flux-outbox");
    Worker { child, stderr_path }
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

fn lifecycle(env: &[(&str, String)]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    let mut w = start(dir.path(), &sock_path, env);

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
    assert!(
        std::fs::metadata(dir.path().join("state/store")).is_ok(),
        "READY before the store exists"
    );

    // Pings keep coming (every 250 ms): the flush loop beats and the store answers.
    let lines = collect(&sock, Duration::from_secs(10), |l| {
        count(l, "WATCHDOG=1") >= 4
    });
    assert!(
        count(&lines, "WATCHDOG=1") >= 4,
        "too few WATCHDOG=1 in 10s: {lines:?}; stderr:\n{}",
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
    assert!(stderr.contains("systemd watchdog enabled"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// With a Flux URL (here: a port nothing listens on, so the link is down): the flush loop runs
/// and must keep beating for the pings to continue.
#[test]
fn notifies_ready_watchdog_and_stopping_with_a_flush_loop() {
    let url = format!("http://127.0.0.1:{}", closed_port());
    lifecycle(&[
        ("FLUX_URL", url),
        // EnvironmentFile=-/etc/flux-outbox/env carries the token this way.
        ("FLUX_AUTH_TOKEN", "test-token-not-secret".to_string()),
    ]);
}

/// Offline mode (no Flux URL, no flush loop): the store probe alone gates the pings.
#[test]
fn notifies_ready_watchdog_and_stopping_offline() {
    lifecycle(&[]);
}

/// The first READY datagram carries a STATUS line with the pending keys and the link state,
/// for `systemctl status`.
#[test]
fn ready_carries_a_status_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    let w = start(dir.path(), &sock_path, &[]);
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
