//! Configuration: `pipeline.toml`, layered, validated apart from building.
//!
//! Layers, later wins: the defaults compiled in from the repository's
//! `pipeline.toml` (embedded backends), the file given with `--config` (or
//! `./pipeline.toml` when present), then environment variables
//! `CARDPIPE__<SECTION>__<KEY>` (e.g. `CARDPIPE__BROKER__URL`). Unknown keys
//! are errors. [`LoadedConfig::check`] adds the rules types cannot express;
//! every error names the key and the file or variable it came from. Secrets
//! (URLs with passwords, keys) are `SecretString`: they never print.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::broker::RetryPolicy;
use crate::runtime::StageSettings;
use crate::telemetry::LogFormat;

/// The built-in defaults: the repository's documented `pipeline.toml`.
pub const DEFAULT_PIPELINE_TOML: &str = include_str!("../../pipeline.toml");

/// Top-level keys the common crate owns. Stage crates own further sections
/// (e.g. `[registry]`), read with [`LoadedConfig::section`] and declared to
/// [`LoadedConfig::check`], so an unknown top-level key is still an error.
pub const CORE_SECTIONS: &[&str] = &[
    "data_dir",
    "store",
    "broker",
    "objects",
    "envelope",
    "http",
    "telemetry",
    "runtime",
    "stage_defaults",
    "stages",
];

/// The core configuration (stage crates read their own sections).
#[derive(Debug, Clone, Deserialize)]
pub struct PipelineConfig {
    /// Where runtime files go in embedded mode (SQLite file, objects, keys).
    pub data_dir: PathBuf,
    /// The database.
    pub store: StoreConfig,
    /// The broker.
    pub broker: BrokerConfig,
    /// Artifact storage.
    pub objects: ObjectsConfig,
    /// Master keys sealing personal data at rest.
    pub envelope: EnvelopeConfig,
    /// The HTTP listener (API, console, metrics).
    pub http: HttpConfig,
    /// Logs.
    pub telemetry: TelemetryConfig,
    /// Runtime-wide knobs.
    pub runtime: RuntimeConfig,
    /// Defaults for every stage.
    pub stage_defaults: StageConfig,
    /// Per-stage overrides, by stage name.
    #[serde(default)]
    pub stages: BTreeMap<String, StageOverride>,
}

/// `[store]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite:<path>` or `postgres://user:password@host/db`.
    pub url: SecretString,
    /// Pool size.
    pub max_connections: u32,
    /// PostgreSQL: the database owner's URL, used only by `cardpipe migrate`, which then
    /// grants the role of `url` what it needs (INSERT and SELECT only on the audit log).
    /// Empty: `url` owns the schema.
    #[serde(default)]
    pub owner_url: SecretString,
    /// Apply pending migrations when a process starts (embedded mode). With `false` a process
    /// only checks that the schema is current and tells to run `cardpipe migrate` otherwise
    /// (required when `url`'s role may not change the schema).
    pub migrate_at_start: bool,
}

/// Which broker backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    /// In process (embedded mode).
    Memory,
    /// RabbitMQ.
    Rabbitmq,
}

/// `[broker]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `memory` or `rabbitmq`.
    pub kind: BrokerKind,
    /// AMQP URL (RabbitMQ only).
    pub url: SecretString,
    /// Queue name prefix.
    pub queue_prefix: String,
}

/// Which object store backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectsKind {
    /// Local directory.
    Fs,
    /// S3-compatible server.
    S3,
}

/// `[objects]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectsConfig {
    /// `fs` or `s3`.
    pub kind: ObjectsKind,
    /// Directory for `fs` (relative paths are under `data_dir`).
    pub root: PathBuf,
    /// S3 endpoint URL.
    pub endpoint: String,
    /// S3 region.
    pub region: String,
    /// S3 bucket (created if missing).
    pub bucket: String,
    /// S3 access key id.
    pub access_key: String,
    /// S3 secret key.
    pub secret_key: SecretString,
}

/// `[envelope]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeConfig {
    /// Id of the current master key (recorded in every sealed blob).
    pub key_id: String,
    /// The current master key, 64 hex digits. Empty: embedded mode keeps a
    /// generated key in `data_dir/envelope-<key_id>.key`.
    pub master_key: SecretString,
    /// Older master keys that can still open data sealed under them, by id.
    #[serde(default)]
    pub previous_keys: BTreeMap<String, SecretString>,
    /// Id of the current lookup-digest key (recorded beside every national-code digest).
    #[serde(default)]
    pub lookup_key_id: String,
    /// A dedicated lookup-digest key, 64 hex digits. Empty: derived from the master key.
    #[serde(default = "empty_secret")]
    pub lookup_key: SecretString,
    /// Older lookup-digest keys whose digests are still found, by id.
    #[serde(default)]
    pub previous_lookup_keys: BTreeMap<String, SecretString>,
}

fn empty_secret() -> SecretString {
    SecretString::from(String::new())
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address.
    pub listen: SocketAddr,
}

/// `[telemetry]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `human` or `json`.
    pub log_format: LogFormat,
    /// Log filter (`RUST_LOG` syntax); `RUST_LOG` wins when set.
    pub log_filter: String,
}

/// `[runtime]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// On SIGTERM / ctrl-c: how long in-flight work and the outbox flush may take.
    pub shutdown_grace_seconds: u64,
    /// How often the outbox relay polls when nothing wakes it.
    pub relay_poll_ms: u64,
    /// Longest one delivery of the internal relay lane (job hand-off to the broker,
    /// requests between stages) may take before it counts as failed.
    pub relay_internal_timeout_seconds: u64,
    /// Longest one delivery of the external relay lane (registry webhooks, SMS
    /// gateway) may take before it counts as failed.
    pub relay_external_timeout_seconds: u64,
    /// Failed deliveries after which an outbox row goes to the dead letters.
    pub relay_max_attempts: u32,
    /// How often the API process signs a checkpoint of the audit chain (and once at shutdown).
    pub audit_checkpoint_seconds: u64,
    /// How long a long-running process waits at start-up for a backend that is not reachable
    /// yet ([`crate::backends::connect_waiting`]); 0: no waiting.
    pub startup_wait_seconds: u64,
}

/// `[stage_defaults]`: knobs every stage has.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Jobs handled at once per process.
    pub concurrency: usize,
    /// Unacknowledged deliveries per consumer.
    pub prefetch: u16,
    /// Attempts before a job is parked.
    pub max_attempts: u32,
    /// Retry delays in seconds, one per retry (the last repeats).
    pub retry_delays_seconds: Vec<f64>,
}

/// `[stages.<name>]`: any subset of [`StageConfig`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageOverride {
    /// See [`StageConfig::concurrency`].
    pub concurrency: Option<usize>,
    /// See [`StageConfig::prefetch`].
    pub prefetch: Option<u16>,
    /// See [`StageConfig::max_attempts`].
    pub max_attempts: Option<u32>,
    /// See [`StageConfig::retry_delays_seconds`].
    pub retry_delays_seconds: Option<Vec<f64>>,
}

/// A configuration problem, naming the key and where its value came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key} (from {origin}): {message}")]
pub struct ConfigError {
    /// Dotted key, e.g. `broker.url`.
    pub key: String,
    /// The file or environment variable that set it.
    pub origin: String,
    /// What is wrong.
    pub message: String,
}

/// A parsed configuration with the layers it came from.
#[derive(Debug)]
pub struct LoadedConfig {
    /// The values.
    pub config: PipelineConfig,
    figment: Figment,
    /// The file given with `--config`, read again by [`LoadedConfig::reload`].
    file: Option<std::path::PathBuf>,
}

fn figment_for(file: Option<&Path>) -> Figment {
    let mut figment = Figment::from(Toml::string(DEFAULT_PIPELINE_TOML));
    let file = file.map(Path::to_path_buf).or_else(|| {
        let local = PathBuf::from("pipeline.toml");
        local.exists().then_some(local)
    });
    if let Some(file) = file {
        figment = figment.merge(Toml::file_exact(file));
    }
    figment.merge(TextSafeEnv(Env::prefixed("CARDPIPE__").split("__")))
}

/// The `CARDPIPE__*` variables, with secrets and codes kept as the text written. figment's
/// `Env` reads every value as TOML-ish data, so `CARDPIPE__ENCODERS__TRANSPORT_ID_PIN=012345`
/// became the integer 12345 (refused as "expected a string", and a leading zero lost); keys
/// whose names say they hold a PIN, key, password, token, secret, URL or id are text.
struct TextSafeEnv(Env);

/// Whether the key (its last dotted segment) names a value that is always text.
fn is_text_key(key: &str) -> bool {
    let last = key.rsplit('.').next().unwrap_or(key).to_ascii_lowercase();
    [
        "pin",
        "puk",
        "hex",
        "key",
        "password",
        "passphrase",
        "secret",
        "token",
        "url",
        "id",
    ]
    .iter()
    .any(|suffix| last == *suffix || last.ends_with(&format!("_{suffix}")))
}

impl figment::Provider for TextSafeEnv {
    fn metadata(&self) -> figment::Metadata {
        self.0.metadata()
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        use figment::value::{Dict, Value};
        let mut dict = Dict::new();
        for (key, raw) in self.0.iter() {
            let value = if is_text_key(key.as_str()) {
                Value::from(raw)
            } else {
                raw.parse().expect("infallible")
            };
            let nested = figment::util::nest(key.as_str(), value)
                .into_dict()
                .expect("a non-empty key nests into a dict");
            merge_dicts(&mut dict, nested);
        }
        Ok(figment::Profile::Default.collect(dict))
    }
}

fn merge_dicts(into: &mut figment::value::Dict, from: figment::value::Dict) {
    use figment::value::Value;
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(Value::Dict(_, inner)), Value::Dict(_, more)) => merge_dicts(inner, more),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// Where a key's value came from, for error messages.
/// Configuration errors as one line (`key (from origin): message; ...`), for the stage
/// crates that report a section's problems through `anyhow`.
pub fn describe(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The full dotted key of an error inside section `section`. figment reports the path of
/// an `extract_inner` error with the section name last (`shards.dedup` for `dedup.shards`);
/// operators need the key as they would write it.
fn section_error_path(section: &str, path: &[String]) -> String {
    let inner: Vec<&str> = match path.split_last() {
        Some((last, rest)) if last == section => rest.iter().map(String::as_str).collect(),
        _ => path.iter().map(String::as_str).collect(),
    };
    if inner.first() == Some(&section) {
        inner.join(".")
    } else if inner.is_empty() {
        section.to_owned()
    } else {
        format!("{section}.{}", inner.join("."))
    }
}

fn origin_of(figment: &Figment, key: &str) -> String {
    match figment.find_metadata(key) {
        Some(meta) => match &meta.source {
            Some(figment::Source::File(path)) => path.display().to_string(),
            _ if meta.name.contains("environment") => {
                format!(
                    "environment variable CARDPIPE__{}",
                    key.to_uppercase().replace('.', "__")
                )
            }
            _ => "built-in defaults (pipeline.toml)".to_owned(),
        },
        None => "built-in defaults (pipeline.toml)".to_owned(),
    }
}

impl LoadedConfig {
    /// Reads and parses every layer. A parse error names the key and its source.
    pub fn load(file: Option<&Path>) -> Result<Self, Vec<ConfigError>> {
        if let Some(file) = file
            && !file.exists()
        {
            return Err(vec![ConfigError {
                key: "--config".into(),
                origin: "command line".into(),
                message: format!("file {} does not exist", file.display()),
            }]);
        }
        let figment = figment_for(file);
        match figment.extract::<PipelineConfig>() {
            Ok(config) => Ok(Self {
                config,
                figment,
                file: file.map(Path::to_path_buf),
            }),
            Err(errors) => Err(errors
                .into_iter()
                .map(|e| {
                    let key = if e.path.is_empty() {
                        "(root)".to_owned()
                    } else {
                        e.path.join(".")
                    };
                    let origin = e
                        .metadata
                        .as_ref()
                        .map(|m| match &m.source {
                            Some(figment::Source::File(p)) => p.display().to_string(),
                            _ if m.name.contains("environment") => format!(
                                "environment variable CARDPIPE__{}",
                                key.to_uppercase().replace('.', "__")
                            ),
                            _ => "built-in defaults (pipeline.toml)".to_owned(),
                        })
                        .unwrap_or_else(|| origin_of(&figment, &key));
                    ConfigError {
                        key,
                        origin,
                        message: e.kind.to_string(),
                    }
                })
                .collect()),
        }
    }

    /// Reads every layer again (the same `--config` file, `./pipeline.toml`, the
    /// environment): what a running process takes on SIGHUP.
    pub fn reload(&self) -> Result<Self, Vec<ConfigError>> {
        Self::load(self.file.as_deref())
    }

    /// Sets the text at the dotted `key` to `value` where every layer leaves it empty: the
    /// demo's own defaults (e.g. its SMS outbox file), which a configured value overrides.
    pub fn default_if_empty(&mut self, key: &str, value: &str) {
        let current = self
            .figment
            .extract_inner::<String>(key)
            .unwrap_or_default();
        if current.is_empty() {
            self.figment = std::mem::replace(&mut self.figment, Figment::new())
                .merge(figment::providers::Serialized::default(key, value));
        }
    }

    /// Reads a stage crate's own section (`[registry]`, `[dedup]`, ...);
    /// errors name the key and its source like every other.
    pub fn section<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<T, Vec<ConfigError>> {
        self.figment.extract_inner::<T>(key).map_err(|errors| {
            errors
                .into_iter()
                .map(|e| {
                    let path = section_error_path(key, &e.path);
                    ConfigError {
                        origin: origin_of(&self.figment, &path),
                        key: path,
                        message: e.kind.to_string(),
                    }
                })
                .collect()
        })
    }

    /// Rules beyond the types; `known_stages` are the stages this binary has
    /// and `known_sections` the extra top-level sections its crates read.
    pub fn check(&self, known_stages: &[&str], known_sections: &[&str]) -> Vec<ConfigError> {
        let c = &self.config;
        let mut errors = Vec::new();
        let mut err = |key: &str, message: String| {
            errors.push(ConfigError {
                key: key.to_owned(),
                origin: origin_of(&self.figment, key),
                message,
            })
        };
        if let Ok(top) = self.figment.extract::<figment::value::Dict>() {
            for key in top.keys() {
                if !CORE_SECTIONS.contains(&key.as_str()) && !known_sections.contains(&key.as_str())
                {
                    err(key, "unknown configuration key".into());
                }
            }
        }
        let store_url = c.store.url.expose_secret();
        if !(store_url.starts_with("sqlite:")
            || store_url.starts_with("postgres://")
            || store_url.starts_with("postgresql://"))
        {
            err("store.url", "must start with sqlite: or postgres://".into());
        }
        if c.store.max_connections == 0 {
            err("store.max_connections", "must be at least 1".into());
        }
        let owner_url = c.store.owner_url.expose_secret();
        if !(owner_url.is_empty()
            || owner_url.starts_with("postgres://")
            || owner_url.starts_with("postgresql://"))
        {
            err(
                "store.owner_url",
                "must be a postgres:// URL (roles exist on PostgreSQL only) or empty".into(),
            );
        }
        if c.broker.kind == BrokerKind::Rabbitmq {
            let url = c.broker.url.expose_secret();
            if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                err(
                    "broker.url",
                    "must be an amqp:// or amqps:// URL when broker.kind = \"rabbitmq\"".into(),
                );
            }
        }
        if c.broker.queue_prefix.is_empty()
            || !c
                .broker
                .queue_prefix
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
        {
            err(
                "broker.queue_prefix",
                "must be non-empty letters, digits, '-', '_' or '.'".into(),
            );
        }
        if c.objects.kind == ObjectsKind::S3 {
            if !(c.objects.endpoint.starts_with("http://")
                || c.objects.endpoint.starts_with("https://"))
            {
                err(
                    "objects.endpoint",
                    "must be an http(s):// URL when objects.kind = \"s3\"".into(),
                );
            }
            if c.objects.bucket.len() < 3 {
                err(
                    "objects.bucket",
                    "must name a bucket (3+ characters)".into(),
                );
            }
            if c.objects.access_key.is_empty() {
                err(
                    "objects.access_key",
                    "must be set when objects.kind = \"s3\"".into(),
                );
            }
            if c.objects.secret_key.expose_secret().is_empty() {
                err(
                    "objects.secret_key",
                    "must be set when objects.kind = \"s3\"".into(),
                );
            }
        }
        let master_key = c.envelope.master_key.expose_secret();
        if !master_key.is_empty()
            && (master_key.len() != 64 || !master_key.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            err(
                "envelope.master_key",
                "must be 64 hex digits (32 bytes)".into(),
            );
        }
        if master_key.is_empty() && c.broker.kind == BrokerKind::Rabbitmq {
            err(
                "envelope.master_key",
                "must be set in distributed mode: every replica needs the same key".into(),
            );
        }
        let lookup_key = c.envelope.lookup_key.expose_secret();
        if !lookup_key.is_empty() {
            if lookup_key.len() != 64 || !lookup_key.bytes().all(|b| b.is_ascii_hexdigit()) {
                err(
                    "envelope.lookup_key",
                    "must be 64 hex digits (32 bytes)".into(),
                );
            }
            if c.envelope.lookup_key_id.is_empty()
                || c.envelope.lookup_key_id.len() > 64
                || c.envelope.lookup_key_id.starts_with("derived:")
            {
                err(
                    "envelope.lookup_key_id",
                    "must be 1..=64 characters, not starting with \"derived:\", when lookup_key is set".into(),
                );
            }
        }
        for (id, key) in &c.envelope.previous_lookup_keys {
            let key = key.expose_secret();
            if key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
                err(
                    &format!("envelope.previous_lookup_keys.{id}"),
                    "must be 64 hex digits (32 bytes)".into(),
                );
            }
        }
        if c.envelope.key_id.is_empty() || c.envelope.key_id.len() > 64 {
            err("envelope.key_id", "must be 1..=64 characters".into());
        }
        if c.runtime.relay_poll_ms == 0 {
            err("runtime.relay_poll_ms", "must be at least 1".into());
        }
        if c.runtime.startup_wait_seconds > 3_600 {
            err(
                "runtime.startup_wait_seconds",
                format!(
                    "must be at most 3600 (an hour), not {}",
                    c.runtime.startup_wait_seconds
                ),
            );
        }
        if !(1..=86_400).contains(&c.runtime.audit_checkpoint_seconds) {
            err(
                "runtime.audit_checkpoint_seconds",
                "must be 1..=86400 (a day)".into(),
            );
        }
        for (key, value) in [
            (
                "runtime.relay_internal_timeout_seconds",
                c.runtime.relay_internal_timeout_seconds,
            ),
            (
                "runtime.relay_external_timeout_seconds",
                c.runtime.relay_external_timeout_seconds,
            ),
        ] {
            if !(1..=600).contains(&value) {
                err(
                    key,
                    format!("must be between 1 and 600 seconds, not {value}"),
                );
            }
        }
        if c.runtime.relay_max_attempts == 0 {
            err("runtime.relay_max_attempts", "must be at least 1".into());
        }
        let mut stage_checks = vec![("stage_defaults".to_owned(), c.stage_defaults.clone())];
        for name in c.stages.keys() {
            if known_stages.contains(&name.as_str()) {
                stage_checks.push((format!("stages.{name}"), c.stage_config(name)));
            } else {
                err(
                    &format!("stages.{name}"),
                    format!(
                        "unknown stage {name:?}; known stages: {}",
                        known_stages.join(", ")
                    ),
                );
            }
        }
        for (prefix, s) in &stage_checks {
            if s.concurrency == 0 {
                err(
                    &format!("{prefix}.concurrency"),
                    "must be at least 1".into(),
                );
            }
            if s.prefetch == 0 {
                err(&format!("{prefix}.prefetch"), "must be at least 1".into());
            }
            if s.max_attempts == 0 {
                err(
                    &format!("{prefix}.max_attempts"),
                    "must be at least 1".into(),
                );
            }
            if s.retry_delays_seconds.is_empty() {
                err(
                    &format!("{prefix}.retry_delays_seconds"),
                    "must list at least one delay".into(),
                );
            }
            if s.retry_delays_seconds
                .iter()
                .any(|d| !d.is_finite() || *d < 0.0)
            {
                err(
                    &format!("{prefix}.retry_delays_seconds"),
                    "delays must be finite and >= 0".into(),
                );
            }
        }
        errors
    }
}

impl PipelineConfig {
    /// The effective knobs of one stage (defaults + its overrides).
    pub fn stage_config(&self, stage: &str) -> StageConfig {
        let mut s = self.stage_defaults.clone();
        if let Some(o) = self.stages.get(stage) {
            s.concurrency = o.concurrency.unwrap_or(s.concurrency);
            s.prefetch = o.prefetch.unwrap_or(s.prefetch);
            s.max_attempts = o.max_attempts.unwrap_or(s.max_attempts);
            if let Some(d) = &o.retry_delays_seconds {
                s.retry_delays_seconds = d.clone();
            }
        }
        s
    }

    /// Runner settings of one stage.
    pub fn stage_settings(&self, stage: &str) -> StageSettings {
        let s = self.stage_config(stage);
        StageSettings {
            concurrency: s.concurrency,
            prefetch: s.prefetch,
            retry: RetryPolicy {
                delays: s
                    .retry_delays_seconds
                    .iter()
                    .map(|d| Duration::from_secs_f64(d.max(0.0)))
                    .collect(),
                max_attempts: s.max_attempts,
            },
        }
    }

    /// A path under `data_dir` unless absolute.
    pub fn data_path(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.data_dir.join(path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_codes_from_the_environment_stay_text() {
        for key in [
            "encoders.transport_id_pin",
            "encoders.transport_puk",
            "encoders.master_keys_hex",
            "envelope.master_key",
            "pki.passphrase",
            "store.url",
            "envelope.key_id",
            "registry.callbacks.secret",
        ] {
            assert!(is_text_key(key), "{key}");
        }
        for key in [
            "store.max_connections",
            "dedup.shards",
            "encoders.kind",
            "runtime.relay_poll_ms",
            "encoders.allow_test_secrets",
        ] {
            assert!(!is_text_key(key), "{key}");
        }
    }

    #[test]
    fn section_errors_name_the_key_as_written_and_its_file() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Section {
            shards: u32,
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pipeline.toml");
        std::fs::write(&file, "[dedup]\nshards = \"two\"\n").unwrap();
        let loaded = LoadedConfig::load(Some(&file)).unwrap();
        let errors = loaded.section::<Section>("dedup").unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].key, "dedup.shards");
        assert_eq!(errors[0].origin, file.display().to_string());
        assert!(errors[0].message.contains("u32"), "{}", errors[0].message);
    }

    #[test]
    fn unknown_top_level_keys_and_bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pipeline.toml");
        std::fs::write(&file, "[brokr]\nkind = \"memory\"\n").unwrap();
        let loaded = LoadedConfig::load(Some(&file)).unwrap();
        let errors = loaded.check(&[], &[]);
        assert!(
            errors
                .iter()
                .any(|e| e.key == "brokr" && e.message.contains("unknown")),
            "{errors:?}"
        );
        std::fs::write(&file, "[broker]\nkind = \"rabbit\"\n").unwrap();
        let errors = LoadedConfig::load(Some(&file)).unwrap_err();
        assert_eq!(errors[0].key, "broker.kind");
        assert!(
            errors[0].message.contains("rabbitmq"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn section_paths_are_rebuilt_in_reading_order() {
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            section_error_path("dedup", &p(&["shards", "dedup"])),
            "dedup.shards"
        );
        assert_eq!(section_error_path("pki", &p(&["a", "b", "pki"])), "pki.a.b");
        assert_eq!(section_error_path("pki", &p(&["pki", "a"])), "pki.a");
        assert_eq!(section_error_path("pki", &p(&[])), "pki");
    }
}
