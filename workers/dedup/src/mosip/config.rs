//! The `[abis]` section of pipeline.toml: the MOSIP ABIS API served by `cardpipe abis serve`.

use std::net::SocketAddr;

use cardpipe_common::config::LoadedConfig;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// `[abis]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AbisConfig {
    /// Where the HTTP form of the API listens (`POST /abis/v1/request`).
    pub listen: SocketAddr,
    /// Clients allowed on the HTTP form: name and hex SHA-256 of the bearer token. None:
    /// every HTTP request is refused (the queue form needs no token: the broker's own
    /// credentials guard it).
    pub clients: Vec<AbisClient>,
    /// The queue form: MOSIP's inbound / outbound queue pair on RabbitMQ.
    pub queue: AbisQueueConfig,
    /// Candidates returned by an identify that names no `maxResults` flag.
    pub max_results: usize,
    /// False positive identification rate of an identify that names no `targetFPIR` flag.
    pub target_fpir: f64,
    /// Fetching biometrics by `referenceURL` (MOSIP's data share).
    pub datashare: DatashareConfig,
}

/// One HTTP client of the ABIS API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AbisClient {
    /// Who it is (logged with each request).
    pub name: String,
    /// Hex SHA-256 of its bearer token.
    pub token_sha256: String,
}

/// `[abis.queue]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AbisQueueConfig {
    /// Consume the inbound queue (needs a RabbitMQ URL).
    pub enabled: bool,
    /// AMQP URL; empty = `[broker] url` when the broker is RabbitMQ.
    pub url: SecretString,
    /// Requests from MOSIP (MOSIP's `outboundQueueName` for this ABIS).
    pub inbound: String,
    /// Responses to MOSIP (MOSIP's `inboundQueueName` for this ABIS).
    pub outbound: String,
    /// Publish responses as text (`content_type` text/plain); false = bytes
    /// (application/json). MOSIP's `registration-processor-abis.json` `typeOfMessage`.
    pub text_messages: bool,
}

/// `[abis.datashare]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatashareConfig {
    /// MOSIP AuthN URL (`.../v1/authmanager/authenticate/clientidsecretkey`); empty = the
    /// data share needs no token.
    pub auth_url: String,
    /// Client id, secret key and app id given by the system integrator.
    pub client_id: String,
    pub secret_key: SecretString,
    pub app_id: String,
    /// Per fetch (connect + read), seconds.
    pub timeout_seconds: u64,
    /// Largest CBEFF document read, bytes.
    pub max_bytes: usize,
}

impl Default for AbisConfig {
    fn default() -> Self {
        AbisConfig {
            listen: "127.0.0.1:8091".parse().expect("a valid address"),
            clients: Vec::new(),
            queue: AbisQueueConfig::default(),
            max_results: 10,
            target_fpir: 1e-3,
            datashare: DatashareConfig::default(),
        }
    }
}

impl Default for AbisQueueConfig {
    fn default() -> Self {
        AbisQueueConfig {
            enabled: false,
            url: SecretString::from(String::new()),
            inbound: "cardpipe-abis-inbound".into(),
            outbound: "cardpipe-abis-outbound".into(),
            text_messages: true,
        }
    }
}

impl Default for DatashareConfig {
    fn default() -> Self {
        DatashareConfig {
            auth_url: String::new(),
            client_id: String::new(),
            secret_key: SecretString::from(String::new()),
            app_id: "regproc".into(),
            timeout_seconds: 30,
            max_bytes: 8 * 1024 * 1024,
        }
    }
}

impl AbisConfig {
    /// Reads `[abis]` (defaults when absent) and checks it.
    pub fn from_loaded(loaded: &LoadedConfig) -> anyhow::Result<Self> {
        let mut config = match loaded.section::<AbisConfig>("abis") {
            Ok(c) => c,
            Err(errors)
                if errors
                    .iter()
                    .all(|e| e.message.contains("missing field `abis`")) =>
            {
                AbisConfig::default()
            }
            Err(errors) => anyhow::bail!(
                "[abis] configuration: {}",
                cardpipe_common::config::describe(&errors)
            ),
        };
        if config.queue.enabled && config.queue.url.expose_secret().is_empty() {
            let broker = &loaded.config.broker;
            anyhow::ensure!(
                broker.kind == cardpipe_common::config::BrokerKind::Rabbitmq,
                "[abis.queue] enabled needs a RabbitMQ URL: set [abis.queue] url or use \
                 [broker] kind = \"rabbitmq\""
            );
            config.queue.url = broker.url.clone();
        }
        config.validate()?;
        Ok(config)
    }

    /// Rules beyond the types.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=1000).contains(&self.max_results),
            "[abis] max_results must be 1..=1000"
        );
        anyhow::ensure!(
            self.target_fpir > 0.0 && self.target_fpir <= 1.0,
            "[abis] target_fpir must be in (0, 1]"
        );
        for c in &self.clients {
            anyhow::ensure!(
                c.token_sha256.len() == 64 && c.token_sha256.bytes().all(|b| b.is_ascii_hexdigit()),
                "[abis] clients: token_sha256 of {:?} must be 64 hex digits",
                c.name
            );
        }
        if self.queue.enabled {
            anyhow::ensure!(
                !self.queue.inbound.is_empty()
                    && !self.queue.outbound.is_empty()
                    && self.queue.inbound != self.queue.outbound,
                "[abis.queue] inbound and outbound must be two different queue names"
            );
        }
        let d = &self.datashare;
        anyhow::ensure!(
            (1..=600).contains(&d.timeout_seconds),
            "[abis.datashare] timeout_seconds must be 1..=600"
        );
        anyhow::ensure!(
            d.max_bytes >= 1024,
            "[abis.datashare] max_bytes must be at least 1024"
        );
        if !d.auth_url.is_empty() {
            anyhow::ensure!(
                !d.client_id.is_empty() && !d.secret_key.expose_secret().is_empty(),
                "[abis.datashare] auth_url needs client_id and secret_key"
            );
        }
        Ok(())
    }

    /// The client a bearer token belongs to (constant-time comparison of digests).
    pub fn client_for_token(&self, token: &str) -> Option<&str> {
        use subtle::ConstantTimeEq;
        let digest = cardpipe_registry::config::hash_token(token);
        let mut found = None;
        for client in &self.clients {
            let stored = client.token_sha256.to_ascii_lowercase();
            if bool::from(stored.as_bytes().ct_eq(digest.as_bytes())) {
                found = Some(client.name.as_str());
            }
        }
        found
    }
}
