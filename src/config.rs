//! Configuration: one TOML file, then environment overrides, then secret files, then checks.
//!
//! Every key is optional and has a default (see `ops/flux-outbox.toml`, which documents each
//! one); unknown keys are errors so a typo never silently leaves a default in force. Errors name
//! the file, line, column and dotted key. Durations are humantime strings (`"5s"`, `"500ms"`),
//! sizes are strings with a unit (`"64MiB"`, `"1MB"`) or plain integers (bytes).
//!
//! Loading order, as [`Config::load`] runs it:
//! 1. [`Config::from_toml_str`]: parse the file (no file: [`Config::default`]);
//! 2. [`Config::apply_env`]: the 0xSCADA variable names (`FLUX_URL`, ...) override the file, so the
//!    worker drops in where the in-memory publisher ran; an empty variable counts as unset;
//! 3. [`Config::resolve`]: read `*_token_file`s (so a missing file fails at start, not at the first
//!    request) and derive the default `flux.source`;
//! 4. [`Config::validate`]: cross-field rules (a non-loopback listener needs a token, a batch
//!    must fit Flux's 2 MiB request limit, ...).
//!
//! Secrets are held in [`Secret`], whose `Debug`, `Display` and `Serialize` all print
//! `[redacted]`: a logged or rendered config can never leak a token.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::EVENT_BYTES_MAX;
use crate::validate::{is_valid_namespace, is_valid_stream_name, Rules};

/// Flux refuses requests of 2 MiB and more (413).
pub const FLUX_REQUEST_BYTES_MAX: u64 = 2 * 1024 * 1024;
/// Room kept under [`FLUX_REQUEST_BYTES_MAX`] for what the batch size estimate may miss
/// (the `{"events":[...]}` wrapper, eventIds, rounding).
pub const FLUX_REQUEST_HEADROOM_BYTES: u64 = 64 * 1024;
/// Largest allowed `flush.batch_bytes_max`.
pub const BATCH_BYTES_MAX_LIMIT: u64 = FLUX_REQUEST_BYTES_MAX - FLUX_REQUEST_HEADROOM_BYTES;
/// Smallest allowed `flush.batch_bytes_max`: the largest event ingest accepts must fit in a batch
/// of its own, or it could never be delivered.
pub const BATCH_BYTES_MIN_LIMIT: u64 = EVENT_BYTES_MAX as u64 + 16 * 1024;

const REDACTED: &str = "[redacted]";

/// A secret string (bearer token). Prints as `[redacted]` in `Debug`, `Display` and when
/// serialized; [`Secret::expose`] is the only way to the value.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value, for the one place that must send or compare it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares with a presented credential in time independent of where they differ, so a
    /// client cannot guess the token byte by byte from response times.
    pub fn matches(&self, candidate: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), candidate.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

/// How ingest makes an accepted update durable before answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Flush and fdatasync: survives power loss (the default).
    Fsync,
    /// Flush to the OS only: survives kill -9, NOT power loss.
    Flush,
}

/// How a flush avoids overwriting properties other agents wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MergeMode {
    /// Read the entity from Flux before writing (the 0xSCADA design).
    ReadMergeWrite,
    /// Write the pending properties without reading first (Flux upserts per property anyway).
    Blind,
}

/// What to do when Flux holds a value for a key the outbox is about to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConflictPolicy {
    /// The outbox's newest value wins.
    Overwrite,
    /// A value already present in Flux is kept.
    KeepRemote,
}

/// The whole configuration. Field names are the TOML keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Store directory. Env `FLUX_OUTBOX_DATA_DIR`.
    pub data_dir: PathBuf,
    /// This gateway's name (default source is `outbox-<gateway_id>`). Default: host name.
    pub gateway_id: String,
    pub durability: Durability,
    pub ingest: IngestConfig,
    pub flux: FluxConfig,
    pub flush: FlushConfig,
    pub store: StoreConfig,
    pub admin: AdminConfig,
    pub mapper: crate::mapper::MapperConfig,
    pub heartbeat: crate::heartbeat::HeartbeatConfig,
    pub read_through: crate::read_through::ReadThroughConfig,
    pub sources: crate::source_ws::SourcesConfig,
}

/// `[ingest]`: the local API producers post updates to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    pub listen: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    #[serde(with = "size")]
    pub body_bytes_max: u64,
    #[serde(with = "duration")]
    pub group_commit_window: Duration,
    pub protected_properties: Vec<String>,
    pub public_mode: bool,
}

/// `[flux]`: where and how to deliver.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FluxConfig {
    /// Flux base URL; `None` = offline mode (buffer only). Env `FLUX_URL`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Env `FLUX_AUTH_TOKEN`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_token: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_token_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Env `FLUX_STREAM`.
    pub stream: String,
    /// Env `FLUX_SOURCE`. `None` until [`Config::resolve`] derives `outbox-<gateway_id>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Env `FLUX_ENTITY_PREFIX`. Used by mappers that build entity ids.
    pub entity_prefix: String,
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    #[serde(with = "duration")]
    pub read_timeout: Duration,
}

/// `[flush]`: batching, pacing and retry of deliveries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlushConfig {
    /// Env `FLUX_PUBLISH_INTERVAL_MS`.
    #[serde(with = "duration")]
    pub interval: Duration,
    pub batch_events_max: usize,
    #[serde(with = "size")]
    pub batch_bytes_max: u64,
    pub in_flight_max: usize,
    /// 0 = no cap.
    pub events_per_minute_max: u64,
    pub merge: MergeMode,
    pub conflict_policy: ConflictPolicy,
    pub read_concurrency: usize,
    #[serde(with = "duration")]
    pub backoff_initial: Duration,
    #[serde(with = "duration")]
    pub backoff_max: Duration,
    /// 0 = no final flush at shutdown.
    #[serde(with = "duration")]
    pub final_flush_timeout: Duration,
    /// How long after a write of unknown outcome the entity is still read back and repaired
    /// (Flux may apply such a write late and roll the key back).
    #[serde(with = "duration")]
    pub convergence_window: Duration,
}

/// `[store]`: the on-disk outbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub pending_keys_max: u64,
    #[serde(with = "size")]
    pub disk_bytes_max: u64,
    #[serde(with = "size")]
    pub cache_bytes: u64,
    pub compact_batch_max: usize,
    #[serde(with = "size")]
    pub shrink_when_drained_above: u64,
}

/// `[admin]`: health, metrics, quarantine inspection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// May equal `ingest.listen`: one listener then serves both.
    pub listen: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("/var/lib/flux-outbox"),
            gateway_id: default_gateway_id(),
            durability: Durability::Fsync,
            ingest: IngestConfig::default(),
            flux: FluxConfig::default(),
            flush: FlushConfig::default(),
            store: StoreConfig::default(),
            admin: AdminConfig::default(),
            mapper: Default::default(),
            heartbeat: Default::default(),
            read_through: Default::default(),
            sources: Default::default(),
        }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8650)),
            token: None,
            token_file: None,
            body_bytes_max: 16 * MIB,
            group_commit_window: Duration::from_millis(1),
            protected_properties: vec!["command".into(), "cmd_id".into()],
            public_mode: false,
        }
    }
}

impl Default for FluxConfig {
    fn default() -> Self {
        FluxConfig {
            url: None,
            auth_token: None,
            auth_token_file: None,
            ca_file: None,
            stream: "scada".into(),
            source: None,
            entity_prefix: "scada/".into(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(30),
        }
    }
}

/// Flux spends about 5 s per event while its event log is unreachable, one event after
/// another, and may apply each later anyway: over a 200-event batch that is about 1,000 s
/// between sending and a late application (the worst case its documentation gives). 20 minutes
/// covers it with margin; a shorter window would stop watching a write that can still land.
pub const CONVERGENCE_WINDOW_DEFAULT: Duration = Duration::from_secs(20 * 60);
/// What Flux spends per event while its event log is unreachable.
const FLUX_PUBLISH_FAIL_PER_EVENT: Duration = Duration::from_secs(5);

impl Default for FlushConfig {
    fn default() -> Self {
        FlushConfig {
            interval: Duration::from_secs(5),
            batch_events_max: 200,
            batch_bytes_max: MIB,
            in_flight_max: 2,
            events_per_minute_max: 0,
            merge: MergeMode::ReadMergeWrite,
            conflict_policy: ConflictPolicy::Overwrite,
            read_concurrency: 8,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            final_flush_timeout: Duration::from_secs(10),
            convergence_window: CONVERGENCE_WINDOW_DEFAULT,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            pending_keys_max: 2_000_000,
            disk_bytes_max: 4 * 1024 * MIB,
            cache_bytes: 4 * MIB,
            compact_batch_max: crate::compactor::STEP_RECORDS_MAX,
            shrink_when_drained_above: 64 * MIB,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8651)),
            token: None,
            token_file: None,
        }
    }
}

const MIB: u64 = 1024 * 1024;

/// The host name, or `gateway` when it is unusable (empty or not UTF-8).
fn default_gateway_id() -> String {
    match gethostname::gethostname().into_string() {
        Ok(name) if !name.trim().is_empty() => name.trim().to_string(),
        _ => "gateway".to_string(),
    }
}

/// Why the configuration cannot be used. Every variant names where the problem is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Bad TOML, an unknown key or a bad value; `line`/`column` are 1-based.
    #[error("{origin}{}: {}{message}", position(*line, *column), key.as_deref().map(|k| format!("{k}: ")).unwrap_or_default())]
    Parse {
        origin: String,
        line: Option<usize>,
        column: Option<usize>,
        key: Option<String>,
        message: String,
    },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("{key}: cannot read {path}: {source}")]
    SecretFile {
        key: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A value or combination of values the worker refuses; `key` is the dotted TOML key.
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn position(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

impl Config {
    /// Loads the configuration the worker runs with: the file (none: defaults), the process
    /// environment, secret files, then [`Config::validate`].
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, |name| std::env::var(name).ok())
    }

    /// [`Config::load`] with the environment given as a function (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
                        path: path.to_path_buf(),
                        source,
                    })?;
                Self::from_toml_str(&text, &path.display().to_string())?
            }
            None => Config::default(),
        };
        config.apply_env(env)?;
        config.resolve()?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text; `origin` (usually the file path) prefixes error messages. Does not
    /// apply the environment, read secret files or run [`Config::validate`].
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let (line, column, key) = match e.span() {
                Some(span) => {
                    let (line, column) = line_column(text, span.start);
                    (Some(line), Some(column), key_at(text, span.start))
                }
                None => (None, None, None),
            };
            ConfigError::Parse {
                origin: origin.to_string(),
                line,
                column,
                key,
                message: e.message().trim().to_string(),
            }
        })
    }

    /// Applies the environment overrides (0xSCADA's variable names plus `FLUX_OUTBOX_DATA_DIR`).
    /// An empty value counts as unset. `FLUX_AUTH_TOKEN` replaces `flux.auth_token_file` too.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let get = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let env_err = |var: &str, message: String| ConfigError::Env {
            var: var.to_string(),
            message,
        };

        if let Some(url) = get("FLUX_URL") {
            self.flux.url = Some(normalize_url(&url).map_err(|m| env_err("FLUX_URL", m))?);
        }
        if let Some(token) = get("FLUX_AUTH_TOKEN") {
            self.flux.auth_token = Some(Secret::new(token.trim()));
            self.flux.auth_token_file = None;
        }
        if let Some(ms) = get("FLUX_PUBLISH_INTERVAL_MS") {
            let ms: u64 = ms.trim().parse().map_err(|_| {
                env_err(
                    "FLUX_PUBLISH_INTERVAL_MS",
                    format!("{ms:?} is not a whole number of milliseconds"),
                )
            })?;
            if ms == 0 {
                return Err(env_err(
                    "FLUX_PUBLISH_INTERVAL_MS",
                    "must be greater than 0".into(),
                ));
            }
            self.flush.interval = Duration::from_millis(ms);
        }
        if let Some(prefix) = get("FLUX_ENTITY_PREFIX") {
            check_entity_prefix(&prefix, self.ingest.public_mode)
                .map_err(|m| env_err("FLUX_ENTITY_PREFIX", m))?;
            self.flux.entity_prefix = prefix;
        }
        if let Some(stream) = get("FLUX_STREAM") {
            if !is_valid_stream_name(&stream) {
                return Err(env_err("FLUX_STREAM", format!("{stream:?}: {STREAM_RULE}")));
            }
            self.flux.stream = stream;
        }
        if let Some(source) = get("FLUX_SOURCE") {
            self.flux.source = Some(source);
        }
        if let Some(dir) = get("FLUX_OUTBOX_DATA_DIR") {
            self.data_dir = PathBuf::from(dir);
        }
        Ok(())
    }

    /// Reads `ingest.token_file`, `flux.auth_token_file` and `admin.token_file` into their
    /// token fields (trailing whitespace trimmed) and derives `flux.source` when unset.
    pub fn resolve(&mut self) -> Result<(), ConfigError> {
        resolve_secret(
            "ingest",
            "token",
            &mut self.ingest.token,
            &self.ingest.token_file,
        )?;
        resolve_secret(
            "flux",
            "auth_token",
            &mut self.flux.auth_token,
            &self.flux.auth_token_file,
        )?;
        resolve_secret(
            "admin",
            "token",
            &mut self.admin.token,
            &self.admin.token_file,
        )?;
        if let Some(ca) = &self.flux.ca_file {
            std::fs::File::open(ca).map_err(|source| ConfigError::SecretFile {
                key: "flux.ca_file".into(),
                path: ca.clone(),
                source,
            })?;
        }
        if self.flux.source.is_none() {
            self.flux.source = Some(format!("outbox-{}", self.gateway_id));
        }
        if let Some(url) = &self.flux.url {
            self.flux.url = Some(normalize_url(url).map_err(|m| invalid("flux.url", m))?);
        }
        Ok(())
    }

    /// Cross-field and range checks. Returns the first problem, naming its dotted key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        let gw = &self.gateway_id;
        if gw.is_empty()
            || gw.len() > 253
            || gw.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(invalid(
                "gateway_id",
                format!("{gw:?}: must be 1-253 characters without spaces or control characters"),
            ));
        }

        // Ingest.
        let ingest_token = self.ingest.token.is_some() || self.ingest.token_file.is_some();
        if !self.ingest.listen.ip().is_loopback() && !ingest_token {
            return Err(invalid(
                "ingest.token",
                format!("ingest.listen {} is not a loopback address: set ingest.token or ingest.token_file", self.ingest.listen),
            ));
        }
        check_secret_not_empty("ingest.token", &self.ingest.token)?;
        if self.ingest.body_bytes_max < 1024 || self.ingest.body_bytes_max > 1024 * MIB {
            return Err(invalid(
                "ingest.body_bytes_max",
                "must be between 1KiB and 1GiB",
            ));
        }
        if self.ingest.group_commit_window > Duration::from_secs(1) {
            return Err(invalid(
                "ingest.group_commit_window",
                "must be at most 1s (every ingest answer waits for it)",
            ));
        }
        for name in &self.ingest.protected_properties {
            if name.is_empty() {
                return Err(invalid(
                    "ingest.protected_properties",
                    "names must not be empty",
                ));
            }
        }

        // Flux.
        if let Some(url) = &self.flux.url {
            normalize_url(url).map_err(|m| invalid("flux.url", m))?;
        }
        check_secret_not_empty("flux.auth_token", &self.flux.auth_token)?;
        if !is_valid_stream_name(&self.flux.stream) {
            return Err(invalid(
                "flux.stream",
                format!("{:?}: {STREAM_RULE}", self.flux.stream),
            ));
        }
        if let Some(source) = &self.flux.source {
            if source.trim().is_empty() {
                return Err(invalid("flux.source", "must not be empty"));
            }
        }
        check_entity_prefix(&self.flux.entity_prefix, self.ingest.public_mode)
            .map_err(|m| invalid("flux.entity_prefix", m))?;
        for (key, d) in [
            ("flux.connect_timeout", self.flux.connect_timeout),
            ("flux.request_timeout", self.flux.request_timeout),
            ("flux.read_timeout", self.flux.read_timeout),
            ("flush.interval", self.flush.interval),
            ("flush.backoff_initial", self.flush.backoff_initial),
            ("flush.backoff_max", self.flush.backoff_max),
            ("flush.convergence_window", self.flush.convergence_window),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be greater than 0"));
            }
        }

        // Flush.
        let f = &self.flush;
        if f.batch_bytes_max > BATCH_BYTES_MAX_LIMIT {
            return Err(invalid(
                "flush.batch_bytes_max",
                format!(
                    "{} is too large: Flux refuses requests of 2MiB and more; at most {BATCH_BYTES_MAX_LIMIT} bytes (2MiB minus {}KiB headroom)",
                    size::format(f.batch_bytes_max),
                    FLUX_REQUEST_HEADROOM_BYTES / 1024
                ),
            ));
        }
        if f.batch_bytes_max < BATCH_BYTES_MIN_LIMIT {
            return Err(invalid(
                "flush.batch_bytes_max",
                format!(
                    "{} is too small: the largest accepted event ({EVENT_BYTES_MAX} bytes) must fit in one batch; at least {BATCH_BYTES_MIN_LIMIT} bytes",
                    size::format(f.batch_bytes_max)
                ),
            ));
        }
        for (key, n) in [
            ("flush.batch_events_max", f.batch_events_max),
            ("flush.in_flight_max", f.in_flight_max),
            ("flush.read_concurrency", f.read_concurrency),
            ("store.compact_batch_max", self.store.compact_batch_max),
        ] {
            if n == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if f.batch_events_max > 100_000 {
            return Err(invalid("flush.batch_events_max", "must be at most 100000"));
        }
        if self.store.compact_batch_max > 100_000 {
            // One step is one atomic batch held under the state lock.
            return Err(invalid("store.compact_batch_max", "must be at most 100000"));
        }
        if f.in_flight_max > 64 || f.read_concurrency > 256 {
            let key = if f.in_flight_max > 64 {
                "flush.in_flight_max"
            } else {
                "flush.read_concurrency"
            };
            return Err(invalid(
                key,
                "unreasonably large (limits: in_flight_max 64, read_concurrency 256)",
            ));
        }
        if f.backoff_max < f.backoff_initial {
            return Err(invalid(
                "flush.backoff_max",
                "must not be smaller than flush.backoff_initial",
            ));
        }

        // Store.
        let s = &self.store;
        if s.pending_keys_max == 0 {
            return Err(invalid("store.pending_keys_max", "must be at least 1"));
        }
        for (key, n) in [
            ("store.disk_bytes_max", s.disk_bytes_max),
            ("store.cache_bytes", s.cache_bytes),
        ] {
            if n < MIB {
                return Err(invalid(key, "must be at least 1MiB"));
            }
        }

        // Admin.
        let admin_token = self.admin.token.is_some() || self.admin.token_file.is_some();
        if !self.admin.listen.ip().is_loopback() && !admin_token {
            return Err(invalid(
                "admin.token",
                format!("admin.listen {} is not a loopback address: set admin.token or admin.token_file", self.admin.listen),
            ));
        }
        check_secret_not_empty("admin.token", &self.admin.token)?;
        crate::mapper::check_config(self)?;
        Ok(())
    }

    /// Observations that are allowed but worth telling the operator (for `check-config`).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        match &self.flux.url {
            None => out.push(
                "flux.url is not set: offline mode, updates are buffered but not delivered".into(),
            ),
            Some(url) => {
                if url.starts_with("http://")
                    && self.flux.auth_token.is_some()
                    && !url_host_is_loopback(url)
                {
                    out.push(
                        "flux.auth_token is sent over plain http to a non-loopback host".into(),
                    );
                }
            }
        }
        // A Flux token means a namespaced (public-mode) Flux (the 0xSCADA integration's
        // FLUX_AUTH_TOKEN): it refuses ids that are not `namespace/rest`, so without
        // public_mode mapped ids like scada/asset/site-1/TR-MAIN-01 would be accepted here and
        // quarantined at delivery instead of folded (mapper) or refused at ingest.
        if (self.flux.auth_token.is_some() || self.flux.auth_token_file.is_some())
            && !self.ingest.public_mode
        {
            out.push(
                "flux.auth_token is set but ingest.public_mode is off: a token means a \
                 public-mode Flux, which refuses entity ids with more than one slash \
                 (e.g. scada/asset/site-1/TR-MAIN-01); set ingest.public_mode = true so \
                 mapped ids are folded and other ids are refused at ingest"
                    .into(),
            );
        }
        if self.durability == Durability::Flush {
            out.push(
                "durability = \"flush\": acknowledged updates survive kill -9 but NOT power loss"
                    .into(),
            );
        }
        if self.ingest.public_mode
            && (self.flush.events_per_minute_max == 0 || self.flush.events_per_minute_max > 10_000)
        {
            out.push("public mode: Flux limits each namespace to 10000 events/minute; consider flush.events_per_minute_max".into());
        }
        let worst_late = FLUX_PUBLISH_FAIL_PER_EVENT
            .saturating_mul(self.flush.batch_events_max.min(u32::MAX as usize) as u32);
        if self.flush.convergence_window < worst_late {
            out.push(format!(
                "flush.convergence_window {} is shorter than a batch of {} events can take to land late in Flux (about {} at 5s per event while its log is down); late writes after the window are not repaired",
                humantime::format_duration(self.flush.convergence_window),
                self.flush.batch_events_max,
                humantime::format_duration(worst_late)
            ));
        }
        out
    }

    /// The ingest validation rules this configuration asks for.
    pub fn rules(&self) -> Rules {
        Rules {
            public_mode: self.ingest.public_mode,
            protected: self.ingest.protected_properties.clone(),
        }
    }

    /// The effective source: `flux.source`, else `outbox-<gateway_id>`.
    pub fn flux_source(&self) -> String {
        self.flux
            .source
            .clone()
            .unwrap_or_else(|| format!("outbox-{}", self.gateway_id))
    }

    /// The effective configuration as TOML, every token shown as `[redacted]`.
    pub fn render_effective(&self) -> String {
        let mut effective = self.clone();
        if effective.flux.source.is_none() {
            effective.flux.source = Some(self.flux_source());
        }
        let body = toml::to_string(&effective)
            .unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"));
        let mut out = String::from("# flux-outbox effective configuration (file, environment, defaults); tokens redacted\n");
        if self.flux.url.is_none() {
            out.push_str("# flux.url unset: offline mode (buffer only)\n");
        }
        out.push_str(&body);
        out
    }
}

const STREAM_RULE: &str = "a stream name is [a-z0-9.] without a leading, trailing or doubled dot";

fn resolve_secret(
    table: &str,
    name: &str,
    token: &mut Option<Secret>,
    file: &Option<PathBuf>,
) -> Result<(), ConfigError> {
    let Some(path) = file else { return Ok(()) };
    let key = format!("{table}.{name}_file");
    if token.is_some() {
        return Err(invalid(
            &key,
            format!("set either {table}.{name} or {key}, not both"),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
        key: key.clone(),
        path: path.clone(),
        source,
    })?;
    let value = text.trim_end_matches(['\n', '\r', ' ', '\t']);
    if value.is_empty() {
        return Err(invalid(&key, format!("{} is empty", path.display())));
    }
    *token = Some(Secret::new(value));
    Ok(())
}

fn check_secret_not_empty(key: &str, secret: &Option<Secret>) -> Result<(), ConfigError> {
    match secret {
        Some(s) if s.expose().trim().is_empty() => Err(invalid(key, "must not be empty")),
        // A copy of `check-config` output used as a config would otherwise "work" with the
        // placeholder as the token.
        Some(s) if s.expose() == REDACTED => Err(invalid(
            key,
            "is the placeholder \"[redacted]\" (copied from check-config output?): set the real token",
        )),
        _ => Ok(()),
    }
}

/// Checks a Flux base URL and returns it without a trailing slash.
fn normalize_url(url: &str) -> Result<String, String> {
    let url = url.trim();
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("{url:?}: scheme must be http or https"));
    }
    if parsed.host().is_none() {
        return Err(format!("{url:?}: no host"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!("{url:?}: a base URL has no query or fragment"));
    }
    Ok(url.trim_end_matches('/').to_string())
}

fn url_host_is_loopback(url: &str) -> bool {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return false;
    };
    match parsed.host_str() {
        Some("localhost") => true,
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

/// An entity prefix must not contain control characters; in public mode it must not put a
/// second slash into ids, and text before its slash must be a valid namespace.
fn check_entity_prefix(prefix: &str, public_mode: bool) -> Result<(), String> {
    if prefix.chars().any(char::is_control) {
        return Err(format!("{prefix:?} contains a control character"));
    }
    if prefix.len() > 128 {
        return Err(format!("{prefix:?} is longer than 128 bytes"));
    }
    if public_mode {
        let slashes = prefix.matches('/').count();
        let ok = match prefix.split_once('/') {
            Some((ns, _)) => slashes == 1 && is_valid_namespace(ns),
            None => true,
        };
        if !ok {
            return Err(format!(
                "{prefix:?}: in public mode entity ids are `namespace/rest` with one slash and a namespace of 3-32 [a-z0-9-_]"
            ));
        }
    }
    Ok(())
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Best-effort dotted key for the error at `offset`: the key on that line, prefixed with the
/// nearest table header above. `None` when the line holds no `key =` (e.g. a continued array).
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = text[line_start..line_end].trim();
    let header = |l: &str| -> Option<String> {
        let l = l.trim();
        let inner = l.strip_prefix('[')?.split(']').next()?;
        Some(inner.trim().trim_matches('[').to_string())
    };
    if line.starts_with('[') {
        return header(line);
    }
    // A value continued over several lines (an array) belongs to the nearest `key =` above.
    let statement = std::iter::once(line)
        .chain(text[..line_start].lines().rev().map(str::trim))
        .take_while(|l| !l.starts_with('['))
        .find(|l| l.contains('=') && !l.starts_with('#'))?;
    let key = statement.split('=').next()?.trim().trim_matches('"');
    let table = text[..line_start].lines().rev().find_map(header);
    Some(match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key.to_string(),
    })
}

/// Serde for durations as humantime strings (`"5s"`, `"500ms"`, `"1m 30s"`).
pub(crate) mod duration {
    use serde::de::{self, Visitor};
    use std::fmt;
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"5s\", \"500ms\" or \"2m\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                humantime::parse_duration(v.trim()).map_err(|e| {
                    E::custom(format!(
                        "invalid duration {v:?}: {e} (write e.g. \"5s\", \"500ms\", \"2m\")"
                    ))
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// Serde for byte sizes: `"64MiB"`, `"1 MB"`, `"512KiB"` or a plain integer of bytes.
///
/// Own parser rather than bytesize's: bytesize 1.x accepts fractions and guesses units
/// case-insensitively; here only whole numbers with a known unit pass, so `"64mb"` vs
/// `"64MiB"` is never a silent 5% surprise and nonsense fails with the list of units.
pub mod size {
    use serde::de::{self, Visitor};
    use std::fmt;

    const UNITS: &[(&str, u64)] = &[
        ("B", 1),
        ("KB", 1_000),
        ("MB", 1_000_000),
        ("GB", 1_000_000_000),
        ("TB", 1_000_000_000_000),
        ("KiB", 1 << 10),
        ("MiB", 1 << 20),
        ("GiB", 1 << 30),
        ("TiB", 1 << 40),
    ];

    /// Parses `"<integer>[ ]<unit>"` (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB; exact case,
    /// except that `kB` is accepted) or a bare integer (bytes).
    pub fn parse(text: &str) -> Result<u64, String> {
        let t = text.trim();
        let digits_end = t
            .find(|c: char| !c.is_ascii_digit() && c != '_')
            .unwrap_or(t.len());
        let (number, unit) = t.split_at(digits_end);
        let number: String = number.chars().filter(|&c| c != '_').collect();
        if number.is_empty() {
            return Err(format!(
                "invalid size {text:?}: expected a whole number with a unit, e.g. \"64MiB\""
            ));
        }
        let n: u64 = number
            .parse()
            .map_err(|_| format!("invalid size {text:?}: number too large"))?;
        let unit = unit.trim_start();
        if unit.starts_with('.') {
            return Err(format!(
                "invalid size {text:?}: fractions are not accepted, use a smaller unit (e.g. \"1536MiB\")"
            ));
        }
        let unit = if unit == "kB" { "KB" } else { unit };
        let factor = if unit.is_empty() {
            1
        } else {
            UNITS.iter().find(|(u, _)| *u == unit).map(|(_, f)| *f).ok_or_else(|| {
                format!("invalid size {text:?}: unknown unit {unit:?} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB; no fractions)")
            })?
        };
        n.checked_mul(factor)
            .ok_or_else(|| format!("invalid size {text:?}: too large"))
    }

    /// The largest binary unit that divides `bytes` exactly (parseable by [`parse`]).
    pub fn format(bytes: u64) -> String {
        for (unit, factor) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if bytes >= factor && bytes % factor == 0 {
                return format!("{}{unit}", bytes / factor);
            }
        }
        format!("{bytes}B")
    }

    pub fn serialize<S: serde::Serializer>(bytes: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*bytes))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = u64;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"64MiB\" or a whole number of bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
                parse(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("invalid size {v}: must not be negative")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
                Ok(v)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, "test.toml")
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn empty_file_is_defaults_and_valid() {
        let c = parse("").unwrap();
        assert_eq!(c, Config::default());
        let mut c = c;
        c.resolve().unwrap();
        c.validate().unwrap();
        assert_eq!(c.flux.source, Some(format!("outbox-{}", c.gateway_id)));
    }

    #[test]
    fn warns_about_a_flux_token_without_public_mode() {
        let warned = |c: &Config| {
            c.warnings()
                .iter()
                .any(|w| w.contains("flux.auth_token") && w.contains("ingest.public_mode"))
        };
        let with = |text: &str, env: &[(&str, &str)]| {
            let mut c = parse(text).unwrap();
            c.apply_env(env_of(env)).unwrap();
            c
        };
        // A token in the file, from the environment, or as a file; public mode off: warned.
        assert!(warned(&with(
            "[flux]\nurl = \"http://127.0.0.1:3000\"\nauth_token = \"t\"\n",
            &[]
        )));
        assert!(warned(&with(
            "[flux]\nurl = \"http://127.0.0.1:3000\"\n",
            &[("FLUX_AUTH_TOKEN", "t")]
        )));
        assert!(warned(&with(
            "[flux]\nauth_token_file = \"/run/credentials/x/flux\"\n",
            &[]
        )));
        // Public mode on, or no token: not warned.
        assert!(!warned(&with(
            "[ingest]\npublic_mode = true\n[flux]\nurl = \"http://127.0.0.1:3000\"\nauth_token = \"t\"\n",
            &[]
        )));
        assert!(!warned(&with(
            "[flux]\nurl = \"http://127.0.0.1:3000\"\n",
            &[]
        )));
    }

    #[test]
    fn compact_batch_max_is_read_and_bounded() {
        assert_eq!(
            Config::default().store.compact_batch_max,
            crate::compactor::STEP_RECORDS_MAX
        );
        let mut c = parse("[store]\ncompact_batch_max = 500\n").unwrap();
        assert_eq!(c.store.compact_batch_max, 500);
        c.resolve().unwrap();
        c.validate().unwrap();
        for bad in ["0", "100001"] {
            let mut c = parse(&format!("[store]\ncompact_batch_max = {bad}\n")).unwrap();
            c.resolve().unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("store.compact_batch_max"), "{e}");
        }
    }

    #[test]
    fn unknown_key_is_named_with_line() {
        let e =
            parse("data_dir = \"/x\"\n[flush]\ninterval = \"5s\"\nbatch_size = 3\n").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("test.toml:4:1: flush.batch_size: unknown field `batch_size`"),
            "{msg}"
        );
        let e = parse("[fluxx]\nurl = \"http://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("fluxx") && e.contains("test.toml:1"), "{e}");
    }

    #[test]
    fn bad_duration_and_size_are_named() {
        let e = parse("[flush]\ninterval = \"5\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("test.toml:2:")
                && e.contains("flush.interval")
                && e.contains("invalid duration \"5\""),
            "{e}"
        );
        let e = parse("[flush]\ninterval = 5\n").unwrap_err().to_string();
        assert!(
            e.contains("flush.interval") && e.contains("duration string"),
            "{e}"
        );
        let e = parse("[store]\ncache_bytes = \"16 megs\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("store.cache_bytes") && e.contains("unknown unit"),
            "{e}"
        );
        let e = parse("[store]\ncache_bytes = \"1.5GiB\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("store.cache_bytes") && e.contains("fractions"),
            "{e}"
        );
        let e = parse("[ingest]\nprotected_properties = [\n  \"a\",\n  3,\n]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("test.toml:4:3: ingest.protected_properties: invalid type"),
            "{e}"
        );
        let e = parse("[store]\ncache_bytes = -5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("negative"), "{e}");
        let e = parse("durability = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("durability") && e.contains("fsync"), "{e}");
        let e = parse("[ingest]\nlisten = \"localhost\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ingest.listen"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(size::parse("64MiB"), Ok(64 << 20));
        assert_eq!(size::parse("64 MiB"), Ok(64 << 20));
        assert_eq!(size::parse("1MB"), Ok(1_000_000));
        assert_eq!(size::parse("10kB"), Ok(10_000));
        assert_eq!(size::parse("4096"), Ok(4096));
        assert_eq!(size::parse("1_000B"), Ok(1000));
        for bad in [
            "",
            "MiB",
            "64mib",
            "64 Mi",
            "1.5GiB",
            "-1",
            "99999999999TiB",
            "64MiBs",
        ] {
            assert!(size::parse(bad).is_err(), "{bad}");
        }
        for n in [0, 1, 1000, 1024, 3 << 20, 4 << 30, (1 << 20) + 1] {
            assert_eq!(size::parse(&size::format(n)), Ok(n));
        }
        let c = parse("[store]\ncache_bytes = 2097152\n").unwrap();
        assert_eq!(c.store.cache_bytes, 2 << 20);
    }

    #[test]
    fn env_overrides() {
        let mut c =
            parse("[flux]\nurl = \"http://file:1\"\nauth_token_file = \"/nonexistent\"\n").unwrap();
        c.apply_env(env_of(&[
            ("FLUX_URL", "https://flux.example:8443/"),
            ("FLUX_AUTH_TOKEN", "s3cret"),
            ("FLUX_PUBLISH_INTERVAL_MS", "10000"),
            ("FLUX_ENTITY_PREFIX", "plant/"),
            ("FLUX_STREAM", "scada.tags"),
            ("FLUX_SOURCE", "0xscada-gw1"),
            ("FLUX_OUTBOX_DATA_DIR", "/srv/outbox"),
        ]))
        .unwrap();
        assert_eq!(c.flux.url.as_deref(), Some("https://flux.example:8443"));
        assert_eq!(
            c.flux.auth_token.as_ref().map(Secret::expose),
            Some("s3cret")
        );
        assert_eq!(
            c.flux.auth_token_file, None,
            "the env token replaces the file"
        );
        assert_eq!(c.flush.interval, Duration::from_secs(10));
        assert_eq!(c.flux.entity_prefix, "plant/");
        assert_eq!(c.flux.stream, "scada.tags");
        assert_eq!(c.flux.source.as_deref(), Some("0xscada-gw1"));
        assert_eq!(c.data_dir, PathBuf::from("/srv/outbox"));
        c.resolve().unwrap();
        c.validate().unwrap();

        // Empty means unset.
        let mut c = Config::default();
        c.apply_env(env_of(&[("FLUX_URL", ""), ("FLUX_STREAM", "")]))
            .unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn bad_env_values_name_the_variable() {
        for (var, value) in [
            ("FLUX_PUBLISH_INTERVAL_MS", "5s"),
            ("FLUX_PUBLISH_INTERVAL_MS", "0"),
            ("FLUX_PUBLISH_INTERVAL_MS", "-5"),
            ("FLUX_URL", "flux:3000"),
            ("FLUX_URL", "ftp://x"),
            ("FLUX_STREAM", "Scada"),
        ] {
            let e = Config::default()
                .apply_env(env_of(&[(var, value)]))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!("environment variable {var}:")),
                "{e}"
            );
        }
    }

    #[test]
    fn non_loopback_listen_needs_a_token() {
        let c = parse("[ingest]\nlisten = \"0.0.0.0:8650\"\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.starts_with("ingest.token:") && e.contains("0.0.0.0:8650"),
            "{e}"
        );
        let c = parse("[ingest]\nlisten = \"0.0.0.0:8650\"\ntoken = \"t\"\n").unwrap();
        c.validate().unwrap();
        let c = parse("[admin]\nlisten = \"[::]:8651\"\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("admin.token:"));
        let c =
            parse("[ingest]\nlisten = \"[::1]:8650\"\n[admin]\nlisten = \"[::1]:8650\"\n").unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn convergence_window_parses_defaults_and_warns_when_too_short() {
        // The default covers Flux's documented worst late application (about 1,000 s).
        let d = Config::default();
        assert_eq!(d.flush.convergence_window, Duration::from_secs(1200));
        assert!(d.flush.convergence_window >= Duration::from_secs(1000));
        assert!(
            !d.warnings()
                .iter()
                .any(|w| w.contains("convergence_window")),
            "{:?}",
            d.warnings()
        );
        let c = parse("[flush]\nconvergence_window = \"1h 30m\"\n").unwrap();
        assert_eq!(c.flush.convergence_window, Duration::from_secs(5400));
        c.validate().unwrap();
        assert_eq!(
            crate::app::flush_options(&c).convergence_window,
            Duration::from_secs(5400)
        );
        let e = parse("[flush]\nconvergence_window = \"20\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("flush.convergence_window"), "{e}");
        let e = parse("[flush]\nconvergence_window = 20\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("flush.convergence_window") && e.contains("duration string"),
            "{e}"
        );
        // Allowed but shorter than a full batch can take to land late: told at check-config.
        let short = parse("[flush]\nconvergence_window = \"10m\"\n").unwrap();
        short.validate().unwrap();
        assert!(
            short
                .warnings()
                .iter()
                .any(|w| w.contains("flush.convergence_window")),
            "{:?}",
            short.warnings()
        );
    }

    #[test]
    fn cross_field_rules() {
        let bad = [
            (
                "[flush]\nbatch_bytes_max = \"2MiB\"\n",
                "flush.batch_bytes_max",
            ),
            (
                "[flush]\nbatch_bytes_max = \"512KiB\"\n",
                "flush.batch_bytes_max",
            ),
            ("[flush]\ninterval = \"0s\"\n", "flush.interval"),
            ("[flush]\nbackoff_initial = \"2m\"\n", "flush.backoff_max"),
            ("[flush]\nin_flight_max = 0\n", "flush.in_flight_max"),
            (
                "[flush]\nconvergence_window = \"0s\"\n",
                "flush.convergence_window",
            ),
            ("[flux]\nstream = \"scada..x\"\n", "flux.stream"),
            ("[flux]\nstream = \"\"\n", "flux.stream"),
            ("[flux]\nsource = \" \"\n", "flux.source"),
            ("[flux]\nurl = \"not a url\"\n", "flux.url"),
            ("[flux]\nrequest_timeout = \"0s\"\n", "flux.request_timeout"),
            (
                "[ingest]\npublic_mode = true\n[flux]\nentity_prefix = \"scada/asset/\"\n",
                "flux.entity_prefix",
            ),
            ("[ingest]\ntoken = \"\"\n", "ingest.token"),
            ("gateway_id = \"gw 1\"\n", "gateway_id"),
        ];
        for (text, key) in bad {
            let e = parse(text).unwrap().validate().unwrap_err().to_string();
            assert!(e.starts_with(&format!("{key}:")), "{text} -> {e}");
        }
        parse("[flush]\nbatch_bytes_max = \"1900KiB\"\n")
            .unwrap()
            .validate()
            .unwrap();
        parse("[ingest]\npublic_mode = true\n[flux]\nentity_prefix = \"scada/asset.\"\n")
            .unwrap()
            .validate()
            .unwrap();
    }

    #[test]
    fn token_files_are_read_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let token_path = dir.path().join("ingest.token");
        std::fs::write(&token_path, "from-file\n").unwrap();
        let cfg_path = dir.path().join("c.toml");
        let text = format!(
            "[ingest]\nlisten = \"0.0.0.0:8650\"\ntoken_file = {:?}\n",
            token_path.to_str().unwrap()
        );
        std::fs::write(&cfg_path, &text).unwrap();
        let c = Config::load_with_env(Some(&cfg_path), no_env).unwrap();
        assert_eq!(
            c.ingest.token.as_ref().map(Secret::expose),
            Some("from-file")
        );
        assert!(!c.render_effective().contains("from-file"));

        std::fs::remove_file(&token_path).unwrap();
        let e = Config::load_with_env(Some(&cfg_path), no_env)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("ingest.token_file: cannot read"), "{e}");

        let both = "[ingest]\ntoken = \"a\"\ntoken_file = \"/x\"\n";
        std::fs::write(&cfg_path, both).unwrap();
        let e = Config::load_with_env(Some(&cfg_path), no_env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not both"), "{e}");

        let e = Config::load_with_env(Some(&dir.path().join("missing.toml")), no_env).unwrap_err();
        assert!(matches!(e, ConfigError::ReadFile { .. }));
    }

    #[test]
    fn secrets_are_redacted_everywhere() {
        let mut c = parse(
            "[ingest]\ntoken = \"ingest-secret\"\n[flux]\nauth_token = \"flux-secret\"\n[admin]\ntoken = \"admin-secret\"\n",
        )
        .unwrap();
        c.resolve().unwrap();
        let debug = format!("{c:?}");
        let rendered = c.render_effective();
        for text in [&debug, &rendered] {
            for secret in ["ingest-secret", "flux-secret", "admin-secret"] {
                assert!(!text.contains(secret), "{secret} leaked: {text}");
            }
            assert!(text.contains("[redacted]"));
        }
        assert_eq!(
            c.flux.auth_token.as_ref().map(Secret::expose),
            Some("flux-secret")
        );
        // The rendering parses back, but its placeholder tokens are refused.
        let back = parse(&rendered).unwrap();
        assert_eq!(back.flush, c.flush);
        assert_eq!(back.store, c.store);
        let e = back.validate().unwrap_err().to_string();
        assert!(e.starts_with("ingest.token: is the placeholder"), "{e}");
    }

    #[test]
    fn secret_matches() {
        let s = Secret::new("abc");
        assert!(s.matches("abc"));
        assert!(!s.matches("abd") && !s.matches("ab") && !s.matches("abcd"));
        assert_eq!(format!("{s} {s:?}"), "[redacted] [redacted]");
    }

    #[test]
    fn render_round_trips_defaults() {
        let mut c = Config::default();
        c.resolve().unwrap();
        let back = parse(&c.render_effective()).unwrap();
        assert_eq!(back, c);
    }
}
