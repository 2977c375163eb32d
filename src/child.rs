//! The real worker as a child process (`flux-outbox run --config FILE`), for the tools that
//! drive the binary end to end: the demo, `torture` and `outbox-bench`. The environment
//! variables that would override the generated config are removed; stderr goes to a log file.
//! Dropping a [`WorkerChild`] kills the process, so a failing tool never leaves one behind.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Environment variables the worker reads as overrides of its config file.
const OVERRIDES: [&str; 8] = [
    "FLUX_URL",
    "FLUX_AUTH_TOKEN",
    "FLUX_OUTBOX_DATA_DIR",
    "FLUX_PUBLISH_INTERVAL_MS",
    "FLUX_ENTITY_PREFIX",
    "FLUX_STREAM",
    "FLUX_SOURCE",
    // A tool run under systemd must not have its child talk to systemd.
    "NOTIFY_SOCKET",
];

pub struct WorkerChild {
    pub exe: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    /// Base URL of the worker's admin listener (`http://127.0.0.1:PORT`).
    pub admin: String,
    /// `RUST_LOG` for the child.
    pub rust_log: String,
    child: Option<Child>,
}

impl WorkerChild {
    pub fn new(exe: &Path, config: &Path, log: &Path, admin: String, rust_log: &str) -> Self {
        WorkerChild {
            exe: exe.to_path_buf(),
            config: config.to_path_buf(),
            log: log.to_path_buf(),
            admin,
            rust_log: rust_log.to_string(),
            child: None,
        }
    }

    /// `flux-outbox` beside the running executable (the tools are built with it).
    pub fn sibling_exe() -> Result<PathBuf, String> {
        let me =
            std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
        let exe = me
            .parent()
            .map(|d| d.join("flux-outbox"))
            .ok_or("this executable has no directory")?;
        if !exe.exists() {
            return Err(format!(
                "{} not found; build it (cargo build --bin flux-outbox) or name it with --worker",
                exe.display()
            ));
        }
        Ok(exe)
    }

    /// Starts the process (again, if it ran before); does not wait for readiness.
    pub fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("cannot open {}: {e}", self.log.display()))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("run").arg("--config").arg(&self.config);
        for var in OVERRIDES {
            cmd.env_remove(var);
        }
        let child = cmd
            .env("RUST_LOG", &self.rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("cannot start the worker {}: {e}", self.exe.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` once the process has exited (then it is forgotten), `None` while it runs
    /// or when none was started.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, String> {
        let Some(c) = self.child.as_mut() else {
            return Ok(None);
        };
        match c.try_wait() {
            Ok(Some(s)) => {
                self.child = None;
                Ok(Some(s))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(format!("cannot query the worker: {e}")),
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process, if it runs.
    pub fn signal(&self, signal: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid with a valid signal number.
            unsafe {
                libc::kill(c.id() as i32, signal);
            }
        }
    }

    /// SIGKILL and reap: no shutdown code runs in the worker.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; waits up to `grace` for the exit, then SIGKILL. The exit status, if it exited.
    pub async fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < grace {
            match self.try_wait() {
                Ok(Some(s)) => return Some(s),
                Ok(None) if self.child.is_some() => {}
                _ => return None,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill9();
        None
    }

    /// Polls `/readyz` until it answers 200; fails when the process exits first or `limit`
    /// passes (with the end of the log in the message).
    pub async fn wait_ready(
        &mut self,
        http: &reqwest::Client,
        limit: Duration,
    ) -> Result<(), String> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(s) = self.try_wait()? {
                return Err(format!("the worker exited ({s}); {}", self.log_tail()));
            }
            if let Ok(r) = http.get(format!("{}/readyz", self.admin)).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!(
            "the worker was not ready within {limit:?}; {}",
            self.log_tail()
        ))
    }

    /// The last lines of the worker's log, for error messages.
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(4000)));
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(15)..];
        if tail.is_empty() {
            format!("worker log {} is empty", self.log.display())
        } else {
            format!(
                "worker log {} (last lines):\n{}",
                self.log.display(),
                tail.join("\n")
            )
        }
    }
}

impl Drop for WorkerChild {
    fn drop(&mut self) {
        self.kill9();
    }
}
