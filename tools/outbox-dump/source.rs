//! Where the answers come from: the store on disk (offline) or the worker's admin API (live).
//! Both return the library's own types (`Summary`, `Row`, `LogRow`, `VerifyReport`), so the
//! rendering, and thus the output, is the same either way.

use std::path::{Path, PathBuf};
use std::time::Duration;

use flux_outbox::admin::{rows_to_ndjson, Summary, UNREADABLE_HEADER};
use flux_outbox::config::Config;
use flux_outbox::record::FORMAT_VERSION;
use flux_outbox::store::{
    self, Listing, LogRow, Row, Store, StoreError, StoreOptions, TreeFormat, TreeMeta,
    VerifyReport, STORE_DIR,
};

use crate::{Failure, Global};

/// Answers from the admin API can be large (export of a big backlog); connecting must be quick.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// How long `requeue` waits for this process's own read handle to let go of the store lock.
const RELOCK_WAIT: Duration = Duration::from_secs(3);

pub enum Source {
    Offline(Offline),
    Live(Live),
}

pub struct Offline {
    data_dir: PathBuf,
    store_dir: PathBuf,
    /// `None` once handed over to `Store::open` (requeue).
    db: Option<sled::Db>,
    meta: TreeMeta,
}

pub struct Live {
    base: String,
    token: Option<String>,
    client: reqwest::Client,
    rt: tokio::runtime::Runtime,
    /// Why the tool went live although it was not asked to (shown when the worker does not
    /// answer, so the message tells the whole story).
    why: Option<String>,
}

/// Loads the worker's configuration only when something from it is needed: a broken variable
/// in the environment must not stop an offline look at `--data-dir`.
struct LazyConfig<'a> {
    path: Option<&'a Path>,
    loaded: Option<Config>,
}

impl LazyConfig<'_> {
    fn get(&mut self) -> Result<&Config, Failure> {
        if self.loaded.is_none() {
            let cfg = Config::load(self.path).map_err(|e| match self.path {
                Some(_) => Failure(format!("configuration: {e}")),
                None => Failure(format!(
                    "configuration (worker defaults plus environment, no --config given): {e}"
                )),
            })?;
            self.loaded = Some(cfg);
        }
        // Just filled above; `ok_or` keeps this free of unwrap.
        self.loaded
            .as_ref()
            .ok_or_else(|| Failure("configuration not loaded".into()))
    }
}

impl Source {
    /// Picks offline or live (see the module doc of main.rs). `verify`: the command is verify,
    /// which also opens a store whose format record is malformed (to report it, with everything
    /// else wrong).
    pub fn connect(global: &Global, verify: bool) -> Result<Source, Failure> {
        let mut config = LazyConfig {
            path: global.config.as_deref(),
            loaded: None,
        };
        if let Some(url) = &global.admin {
            let token = match &global.admin_token {
                Some(t) => Some(t.clone()),
                // Only a config file the operator named is read for the token.
                None if global.config.is_some() => config
                    .get()?
                    .admin
                    .token
                    .as_ref()
                    .map(|s| s.expose().to_string()),
                None => None,
            };
            return Ok(Source::Live(Live::new(normalize_url(url)?, token, None)?));
        }
        let data_dir = match &global.data_dir {
            Some(d) => d.clone(),
            None => config.get()?.data_dir.clone(),
        };
        match Offline::open(&data_dir, verify) {
            Ok(o) => Ok(Source::Offline(o)),
            Err(OpenError::Locked(store_dir)) => {
                let cfg = config.get()?;
                let url = admin_url_of(cfg.admin.listen);
                let token = match &global.admin_token {
                    Some(t) => Some(t.clone()),
                    None => cfg.admin.token.as_ref().map(|s| s.expose().to_string()),
                };
                let why = format!(
                    "the store at {} is locked by another process (the worker is running?), \
                     so the tool asked the worker's admin API at {url} (admin.listen{})",
                    store_dir.display(),
                    match &global.config {
                        Some(p) => format!(" of {}", p.display()),
                        None => " default; pass --config or --admin URL".into(),
                    }
                );
                Ok(Source::Live(Live::new(url, token, Some(why))?))
            }
            Err(OpenError::Fail(f)) => Err(f),
        }
    }

    /// `offline DIR` or `live URL`, for the summary.
    pub fn describe(&self) -> (&'static str, String) {
        match self {
            Source::Offline(o) => ("offline", o.data_dir.display().to_string()),
            Source::Live(l) => ("live", l.base.clone()),
        }
    }

    pub fn summary(&self) -> Result<Summary, Failure> {
        match self {
            Source::Offline(o) => {
                if let Some(e) = &o.meta.counters_error {
                    // The worker recounts on its next start; the totals it cannot recount
                    // (superseded, delivered, ...) read 0 until then.
                    eprintln!(
                        "outbox-dump: warning: the counters record of {} does not decode ({e}); \
                         key counts were recomputed from the contents, totals show 0 (run verify)",
                        o.store_dir.display()
                    );
                }
                Ok(Summary {
                    stats: store::tree_stats(o.db()?, &o.store_dir).map_err(|e| o.err(e))?,
                    link: None,
                    last_delivery_ms: None,
                })
            }
            Source::Live(l) => l.get_json("/v1/outbox/summary", &[]),
        }
    }

    pub fn pending(
        &self,
        entity: Option<&str>,
        older_than_ms: Option<u64>,
        limit: usize,
    ) -> Result<Listing<Row>, Failure> {
        match self {
            Source::Offline(o) => {
                store::tree_pending_listing(o.db()?, entity, older_than_ms, limit)
                    .map_err(|e| o.err(e))
            }
            Source::Live(l) => {
                let mut q = vec![("limit", limit.to_string())];
                if let Some(e) = entity {
                    q.push(("entity", e.to_string()));
                }
                if let Some(ms) = older_than_ms {
                    q.push(("older_than", format!("{ms}ms")));
                }
                l.get_listing("/v1/outbox/pending", &q)
            }
        }
    }

    /// `older_than_ms`: as for pending, the time since the value first became pending (the
    /// AGE column), not since it was quarantined.
    pub fn quarantine(
        &self,
        entity: Option<&str>,
        older_than_ms: Option<u64>,
        limit: usize,
    ) -> Result<Listing<Row>, Failure> {
        match self {
            Source::Offline(o) => {
                store::tree_quarantine_listing(o.db()?, entity, older_than_ms, limit)
                    .map_err(|e| o.err(e))
            }
            Source::Live(l) => {
                let mut q = vec![("limit", limit.to_string())];
                if let Some(e) = entity {
                    q.push(("entity", e.to_string()));
                }
                if let Some(ms) = older_than_ms {
                    q.push(("older_than", format!("{ms}ms")));
                }
                l.get_listing("/v1/outbox/quarantine", &q)
            }
        }
    }

    pub fn log(&self, limit: usize) -> Result<Listing<LogRow>, Failure> {
        match self {
            Source::Offline(o) => store::tree_log_listing(o.db()?, limit).map_err(|e| o.err(e)),
            Source::Live(l) => l.get_listing("/v1/outbox/log", &[("limit", limit.to_string())]),
        }
    }

    pub fn verify(&self) -> Result<VerifyReport, Failure> {
        match self {
            Source::Offline(o) => {
                let mut report = store::verify_tree(o.db()?, &o.meta.counters, o.meta.next_seq);
                if let Some(e) = &o.meta.counters_error {
                    // verify_tree reports the bad record too; this says what the numbers are.
                    report.problems.push(format!(
                        "counters record does not decode ({e}); counts were recomputed from \
                         the contents"
                    ));
                }
                Ok(report)
            }
            Source::Live(l) => l.get_json("/v1/outbox/verify", &[]),
        }
    }

    /// NDJSON in the native ingest format: what `pending` shows after compaction, with the
    /// log tail folded in memory by the same store function offline and live (the worker
    /// calls it on its open store), so that nothing is written and the output, warnings
    /// included, is identical. Also returns how many records could not be read (and are not
    /// exported).
    pub fn export(&self, quarantine: bool) -> Result<(String, u64), Failure> {
        match self {
            Source::Offline(o) => {
                let listing = if quarantine {
                    store::tree_quarantine_listing(o.db()?, None, None, usize::MAX)
                } else {
                    store::tree_folded_pending_listing(o.db()?)
                }
                .map_err(|e| o.err(e))?;
                Ok((rows_to_ndjson(&listing.rows), listing.unreadable))
            }
            Source::Live(l) => {
                let q: Vec<(&str, String)> = if quarantine {
                    vec![("quarantine", "true".into())]
                } else {
                    vec![]
                };
                let (body, unreadable) =
                    l.request(reqwest::Method::GET, "/v1/outbox/export", &q)?;
                Ok((body, unreadable))
            }
        }
    }

    pub fn requeue(self, entity_prefix: Option<&str>) -> Result<u64, Failure> {
        match self {
            Source::Offline(mut o) => {
                // Writing goes through the engine itself (same rules and durability as the
                // worker), which needs the lock this read handle holds: let go of it first.
                drop(o.db.take());
                let store = open_store_for_write(&o.data_dir)?;
                let result = store.requeue(entity_prefix);
                let closed = store.close();
                let n = result.map_err(|e| o.err(e))?;
                closed.map_err(|e| o.err(e))?;
                Ok(n)
            }
            Source::Live(l) => {
                let mut q = vec![];
                match entity_prefix {
                    Some(e) => q.push(("entity", e.to_string())),
                    None => q.push(("all", "true".to_string())),
                }
                let v: serde_json::Value = l
                    .request(reqwest::Method::POST, "/v1/outbox/requeue", &q)
                    .and_then(|(body, _)| {
                        serde_json::from_str(&body).map_err(|e| {
                            Failure(format!(
                                "admin API at {}: requeue answer is not JSON: {e}",
                                l.base
                            ))
                        })
                    })?;
                v.get("requeued").and_then(|n| n.as_u64()).ok_or_else(|| {
                    Failure(format!(
                        "admin API at {}: requeue answer has no \"requeued\" count: {v}",
                        l.base
                    ))
                })
            }
        }
    }
}

fn open_store_for_write(data_dir: &Path) -> Result<Store, Failure> {
    let deadline = std::time::Instant::now() + RELOCK_WAIT;
    loop {
        match Store::open(data_dir, StoreOptions::default()) {
            Ok((store, _report)) => return Ok(store),
            // sled releases its file lock when its last thread lets go of the file; give our
            // own just-dropped handle a moment before concluding that someone else holds it.
            Err(StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(StoreError::Locked(p)) => {
                return Err(Failure(format!(
                    "the store at {} became locked (the worker started?); run requeue again, \
                     it will go through the worker's admin API",
                    p.display()
                )))
            }
            Err(e) => return Err(Failure(format!("cannot open the store for requeue: {e}"))),
        }
    }
}

enum OpenError {
    Locked(PathBuf),
    Fail(Failure),
}

impl From<Failure> for OpenError {
    fn from(f: Failure) -> Self {
        OpenError::Fail(f)
    }
}

impl Offline {
    /// Opens `data_dir/store` for reading without creating or changing anything.
    fn open(data_dir: &Path, verify: bool) -> Result<Offline, OpenError> {
        let fail = |m: String| OpenError::Fail(Failure(m));
        match std::fs::metadata(data_dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(fail(format!(
                    "{} is not a directory (--data-dir takes the worker's data directory, \
                     the one that holds store/)",
                    data_dir.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(fail(format!(
                    "data directory {} does not exist (pass --data-dir DIR or --config FILE \
                     of the worker; nothing was created)",
                    data_dir.display()
                )))
            }
            Err(e) => {
                return Err(fail(format!(
                    "cannot read data directory {}: {e}",
                    data_dir.display()
                )))
            }
        }
        let store_dir = data_dir.join(STORE_DIR);
        // sled creates a database wherever it is pointed: check it is one before opening.
        if !store_dir.join("db").is_file() || !store_dir.join("conf").is_file() {
            let hint = if data_dir.join("db").is_file() && data_dir.join("conf").is_file() {
                format!(
                    "; this looks like the store directory itself: pass its parent {}",
                    data_dir.parent().unwrap_or(data_dir).display()
                )
            } else {
                String::new()
            };
            return Err(fail(format!(
                "{} is not a flux-outbox data directory: it has no store ({} with sled's db \
                 and conf files){hint}",
                data_dir.display(),
                store_dir.display()
            )));
        }
        let db = match sled::Config::new()
            .path(&store_dir)
            // No background flusher: this handle never writes, so there is nothing to flush.
            .flush_every_ms(None)
            .open()
        {
            Ok(db) => db,
            Err(e) if is_lock_error(&e) => return Err(OpenError::Locked(store_dir)),
            Err(sled::Error::Io(io)) if io.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(fail(format!(
                    "cannot open the store at {}: permission denied (run as the worker's user)",
                    store_dir.display()
                )))
            }
            Err(e) => {
                return Err(fail(format!(
                    "sled cannot open the store at {}: {e} (the worker would move it aside and \
                     start a fresh one; keep a copy of it before starting the worker)",
                    store_dir.display()
                )))
            }
        };
        let meta = store::read_tree_meta(&db).map_err(|e| {
            fail(format!(
                "cannot read the store at {}: {e}",
                store_dir.display()
            ))
        })?;
        match meta.format {
            TreeFormat::Version(v) if v <= FORMAT_VERSION => {}
            TreeFormat::Version(found) => {
                return Err(fail(
                    StoreError::NewerFormat {
                        path: store_dir,
                        found,
                        supported: FORMAT_VERSION,
                    }
                    .to_string(),
                ))
            }
            TreeFormat::Missing => {
                return Err(fail(format!(
                    "{} is a sled database but not a flux-outbox store: it has no format \
                     version record",
                    store_dir.display()
                )))
            }
            TreeFormat::Malformed if verify => {}
            TreeFormat::Malformed => {
                return Err(fail(format!(
                    "the format version record of the store at {} is malformed; run \
                     `outbox-dump verify` for a full check",
                    store_dir.display()
                )))
            }
        }
        Ok(Offline {
            data_dir: data_dir.to_path_buf(),
            store_dir,
            db: Some(db),
            meta,
        })
    }

    fn db(&self) -> Result<&sled::Db, Failure> {
        self.db
            .as_ref()
            .ok_or_else(|| Failure("the store was already handed over".into()))
    }

    fn err(&self, e: StoreError) -> Failure {
        Failure(format!("store at {}: {e}", self.store_dir.display()))
    }
}

/// Same test as the engine's: sled reports a held lock as an I/O error mentioning the lock.
fn is_lock_error(e: &sled::Error) -> bool {
    match e {
        sled::Error::Io(io) => {
            io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock")
        }
        _ => false,
    }
}

/// The URL to reach a listener: a wildcard listen address is reached on loopback.
fn admin_url_of(listen: std::net::SocketAddr) -> String {
    let ip = match listen.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => {
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
        }
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => {
            std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
        }
        ip => ip,
    };
    format!("http://{}", std::net::SocketAddr::new(ip, listen.port()))
}

fn normalize_url(url: &str) -> Result<String, Failure> {
    let url = url.trim().trim_end_matches('/');
    let full = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    match reqwest::Url::parse(&full) {
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => Ok(full),
        Ok(u) => Err(Failure(format!(
            "--admin {url}: scheme {} is not http or https",
            u.scheme()
        ))),
        Err(e) => Err(Failure(format!("--admin {url:?} is not a URL: {e}"))),
    }
}

/// The error and its causes on one line: reqwest's top-level message alone ("error sending
/// request") does not say that the connection was refused.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

impl Live {
    fn new(base: String, token: Option<String>, why: Option<String>) -> Result<Live, Failure> {
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| Failure(format!("cannot set up the HTTP client: {}", chain(&e))))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Failure(format!("cannot start the runtime: {e}")))?;
        Ok(Live {
            base,
            token,
            client,
            rt,
            why,
        })
    }

    /// The answer's body and its unreadable-records count ([`UNREADABLE_HEADER`], 0 when the
    /// worker does not send it).
    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<(String, u64), Failure> {
        let url = format!("{}{path}", self.base);
        let mut req = self.client.request(method, &url).query(query);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let result = self.rt.block_on(async {
            let resp = req.send().await?;
            let status = resp.status();
            let unreadable = resp
                .headers()
                .get(UNREADABLE_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
            let body = resp.text().await?;
            Ok::<_, reqwest::Error>((status, body, unreadable))
        });
        let (status, body, unreadable) = match result {
            Ok(sb) => sb,
            Err(e) if e.is_connect() || e.is_timeout() => {
                let what = format!(
                    "the admin API at {} does not answer: {}",
                    self.base,
                    chain(&e)
                );
                return Err(Failure(match &self.why {
                    Some(why) => format!(
                        "{why}, but {what}. Pass --admin URL (and the token) of the running \
                         worker, or stop it to read the store offline"
                    ),
                    None => what,
                }));
            }
            Err(e) => {
                return Err(Failure(format!(
                    "admin API at {}: {path}: {}",
                    self.base,
                    chain(&e)
                )))
            }
        };
        if status.is_success() {
            return Ok((body, unreadable));
        }
        // The worker answers errors as {"error": "..."}; show that, not the raw JSON.
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|m| m.as_str()).map(str::to_string))
            .unwrap_or_else(|| body.trim().chars().take(300).collect());
        let hint = if status == reqwest::StatusCode::UNAUTHORIZED {
            if self.token.is_some() {
                " (the admin token given was refused)"
            } else {
                " (set FLUX_OUTBOX_ADMIN_TOKEN, --admin-token, or --config with admin.token)"
            }
        } else {
            ""
        };
        Err(Failure(format!(
            "admin API at {} answered {status} to {path}: {message}{hint}",
            self.base
        )))
    }

    fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, Failure> {
        Ok(self.get_json_counted(path, query)?.0)
    }

    /// A listing: the rows and the count of records the worker could not read.
    fn get_listing<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<Listing<T>, Failure> {
        let (rows, unreadable) = self.get_json_counted(path, query)?;
        Ok(Listing { rows, unreadable })
    }

    fn get_json_counted<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<(T, u64), Failure> {
        let (body, unreadable) = self.request(reqwest::Method::GET, path, query)?;
        let value = serde_json::from_str(&body).map_err(|e| {
            Failure(format!(
                "admin API at {}: the answer to {path} does not decode ({e}); is this a \
                 flux-outbox worker of the same version?",
                self.base
            ))
        })?;
        Ok((value, unreadable))
    }
}
