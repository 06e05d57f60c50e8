//! The `[registry]` configuration section.

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// One registry client allowed to call the API.
#[derive(Clone, Deserialize)]
pub struct ClientConfig {
    /// Client name (recorded on batches and in history as `registry:<name>`).
    pub name: String,
    /// Hex SHA-256 of the client's bearer token (the token itself is never stored).
    pub token_sha256: String,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Callback (webhook) settings.
#[derive(Clone, Deserialize, Default)]
#[serde(default)]
pub struct CallbackConfig {
    /// Where callbacks are POSTed; empty: callbacks are recorded and dropped.
    pub url: String,
    /// HMAC-SHA256 key for the `X-Cardpipe-Signature` header.
    pub secret: String,
    /// Per-request timeout in seconds.
    pub timeout_secs: u64,
}

impl std::fmt::Debug for CallbackConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackConfig")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// `[registry.intake]`: what one batch submission may cost the process. A submission past a
/// bound is refused with 413 (body bytes, records) or 429 (concurrent submissions, with
/// `Retry-After`); what it had committed stays, and a resubmission resumes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IntakeLimits {
    /// Largest request body of one batch submission (bytes).
    pub max_body_bytes: u64,
    /// Most NDJSON lines (records, rejected ones included) in one batch.
    pub max_records: u64,
    /// Batch submissions received at once by this process; more get 429.
    pub max_concurrent_submissions: usize,
    /// `Retry-After` of a 429 (seconds).
    pub retry_after_secs: u64,
    /// A chunk is committed once its buffered lines reach this many bytes, even before
    /// `chunk_size` records: bounds the memory of one submission to about twice this.
    pub chunk_bytes: usize,
    /// Largest fingerprint template accepted by object key (bytes); photos by key are
    /// bounded by `photo_max_bytes`.
    pub template_max_bytes: u64,
}

impl Default for IntakeLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 8 * 1024 * 1024 * 1024,
            max_records: 250_000,
            max_concurrent_submissions: 4,
            retry_after_secs: 30,
            chunk_bytes: 16 * 1024 * 1024,
            template_max_bytes: 64 * 1024,
        }
    }
}

/// `[registry]`: the registry interface, intake rules and the release scheduler.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Clients and their hashed tokens.
    pub clients: Vec<ClientConfig>,
    /// Webhook.
    pub callbacks: CallbackConfig,
    /// Applications released to dedup per minute (all batches together).
    pub release_per_minute: u32,
    /// How often the release scheduler looks for due batches (milliseconds).
    pub release_poll_ms: u64,
    /// Records validated and inserted per transaction.
    pub chunk_size: usize,
    /// Longest accepted NDJSON line (bytes); longer lines are rejected, the batch goes on.
    pub max_line_bytes: usize,
    /// Photo size bounds (bytes).
    pub photo_min_bytes: usize,
    /// Photo size bounds (bytes).
    pub photo_max_bytes: usize,
    /// Photo dimension bounds (pixels, each side).
    pub photo_min_side: u16,
    /// Photo dimension bounds (pixels, each side).
    pub photo_max_side: u16,
    /// Object keys the registry may reference for artifacts must start with this.
    pub artifact_prefix: String,
    /// Known pickup office codes; empty: the offices register delivery loads at start (any
    /// well-formed code only when no register is loaded).
    pub offices: Vec<String>,
    /// Minimum age in full years on the application date.
    pub minimum_age: i32,
    /// What one submission may cost (`[registry.intake]`).
    pub intake: IntakeLimits,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            clients: Vec::new(),
            callbacks: CallbackConfig {
                url: String::new(),
                secret: String::new(),
                timeout_secs: 10,
            },
            release_per_minute: 2000,
            release_poll_ms: 1000,
            chunk_size: 200,
            max_line_bytes: 4 * 1024 * 1024,
            photo_min_bytes: 1024,
            photo_max_bytes: 512 * 1024,
            photo_min_side: 120,
            photo_max_side: 2000,
            artifact_prefix: "registry/".into(),
            offices: Vec::new(),
            minimum_age: 15,
            intake: IntakeLimits::default(),
        }
    }
}

/// Hex SHA-256 of a token, as stored in `token_sha256`.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl RegistryConfig {
    /// The client a bearer token belongs to (constant-time comparison of digests).
    pub fn client_for_token(&self, token: &str) -> Option<&str> {
        let digest = hash_token(token);
        let mut found = None;
        for client in &self.clients {
            let stored = client.token_sha256.to_ascii_lowercase();
            if bool::from(subtle::ConstantTimeEq::ct_eq(
                stored.as_bytes(),
                digest.as_bytes(),
            )) {
                found = Some(client.name.as_str());
            }
        }
        found
    }
}

/// Reads `[registry]` (defaults when the section is absent).
pub fn load(config: &cardpipe_common::config::LoadedConfig) -> anyhow::Result<RegistryConfig> {
    match config.section::<RegistryConfig>("registry") {
        Ok(c) => Ok(c),
        Err(errors)
            if errors
                .iter()
                .all(|e| e.key == "registry" && e.message.contains("missing")) =>
        {
            Ok(RegistryConfig::default())
        }
        Err(errors) => anyhow::bail!("{}", cardpipe_common::config::describe(&errors)),
    }
}
