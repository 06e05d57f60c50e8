//! Status callbacks to the registry: HMAC-signed webhooks delivered through the
//! outbox (topic [`CALLBACK_TOPIC`], subject = cardpipe application id, so the
//! relay delivers them in order per application, with retry and backoff).
//!
//! Any stage announces a citizen-visible state in its own transaction with
//! [`enqueue_callback`], or, from a [`cardpipe_common::runtime::Completion`],
//! with `.announce(CALLBACK_TOPIC, callback_payload(..))`.
//!
//! Wire format: `POST <url>` with the JSON payload and headers
//! `X-Cardpipe-Delivery` (unique id: the registry de-duplicates on it),
//! `X-Cardpipe-Timestamp` (unix seconds) and
//! `X-Cardpipe-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>`.
//! Payloads carry ids, the event and a reason — never personal data.

use async_trait::async_trait;
use cardpipe_common::domain::ApplicationState;
use cardpipe_common::runtime::relay::{Lane, OutboxSink, PermanentFailure};
use cardpipe_common::store::{OutboxRow, Store, StoreError, StoreTx};
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use time::OffsetDateTime;

use crate::config::CallbackConfig;

/// Outbox topic of registry callbacks.
pub const CALLBACK_TOPIC: &str = "callback";

/// The states a citizen cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CallbackEvent {
    /// Intake accepted the record.
    Accepted,
    /// Intake rejected the record.
    Rejected,
    /// An operator decided a possible duplicate (confirmed or cleared).
    DuplicateDecided,
    /// The card is at the pickup office.
    AtOffice,
    /// The card is on its way to another pickup office (a transfer).
    InTransit,
    /// The citizen collected the card.
    Collected,
    /// The card was voided (not collected within six months).
    Voided,
    /// The application was cancelled (withdrawn).
    Cancelled,
}

impl CallbackEvent {
    /// The event announcing entry into `state`, when citizens care about it.
    pub fn for_state(state: ApplicationState) -> Option<Self> {
        Some(match state {
            ApplicationState::Rejected => Self::Rejected,
            ApplicationState::ConfirmedDuplicate | ApplicationState::Cleared => {
                Self::DuplicateDecided
            }
            ApplicationState::AtOffice => Self::AtOffice,
            ApplicationState::InTransit => Self::InTransit,
            ApplicationState::Collected => Self::Collected,
            ApplicationState::Voided => Self::Voided,
            ApplicationState::Cancelled => Self::Cancelled,
            _ => return None,
        })
    }
}

/// The body of one callback.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CallbackPayload {
    /// Event name.
    pub event: String,
    /// The registry's application id.
    pub registry_application_id: String,
    /// cardpipe's application id (absent for records rejected at intake).
    pub application_id: Option<String>,
    /// The application's state after the event.
    pub state: Option<String>,
    /// Why (rule names and reasons, never values).
    pub reason: Option<String>,
    /// Extra structured detail (e.g. rejection errors, overcharge flags).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
    /// When (RFC 3339 UTC).
    pub at: String,
}

/// Builds a callback payload (JSON text) for `Completion::announce`.
pub fn callback_payload(
    event: CallbackEvent,
    registry_application_id: &str,
    application_id: Option<&str>,
    state: Option<ApplicationState>,
    reason: Option<&str>,
    detail: serde_json::Value,
    at: OffsetDateTime,
) -> String {
    let event = serde_json::to_value(event)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    serde_json::to_string(&CallbackPayload {
        event,
        registry_application_id: registry_application_id.to_owned(),
        application_id: application_id.map(str::to_owned),
        state: state.map(|s| s.as_str().to_owned()),
        reason: reason.map(str::to_owned),
        detail,
        at: cardpipe_common::clock::to_rfc3339(at),
    })
    .expect("payload serialises")
}

/// Enqueues a callback in the caller's transaction. `subject` orders delivery:
/// the cardpipe application id (or `registry:<id>` for records that never
/// became applications).
#[allow(clippy::too_many_arguments)]
pub async fn enqueue_callback(
    tx: &mut StoreTx,
    subject: &str,
    event: CallbackEvent,
    registry_application_id: &str,
    state: Option<ApplicationState>,
    reason: Option<&str>,
    detail: serde_json::Value,
    at: OffsetDateTime,
) -> Result<(), StoreError> {
    let application_id = (!subject.starts_with("registry:")).then_some(subject);
    let payload = callback_payload(
        event,
        registry_application_id,
        application_id,
        state,
        reason,
        detail,
        at,
    );
    Store::enqueue_outbox(
        tx,
        &uuid::Uuid::now_v7().to_string(),
        CALLBACK_TOPIC,
        subject,
        &payload,
        at,
    )
    .await
}

/// Signs a callback body: hex HMAC-SHA256 over `timestamp.body`.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Verifies a signature made by [`sign`] (for the registry's side and tests).
pub fn verify(secret: &str, timestamp: i64, body: &[u8], signature_hex: &str) -> bool {
    let Ok(sig) = hex::decode(signature_hex.trim_start_matches("sha256=")) else {
        return false;
    };
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// Delivers `callback` rows to the registry's webhook.
pub struct WebhookSink {
    client: reqwest::Client,
    config: CallbackConfig,
    clock: std::sync::Arc<dyn cardpipe_common::clock::Clock>,
}

impl std::fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSink")
            .field("config", &self.config)
            .finish()
    }
}

impl WebhookSink {
    /// A sink posting to `config.url` (an empty URL drops callbacks, logged).
    pub fn new(
        config: CallbackConfig,
        clock: std::sync::Arc<dyn cardpipe_common::clock::Clock>,
    ) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(config.timeout_secs.max(1)))
            .build()?;
        Ok(Self {
            client,
            config,
            clock,
        })
    }
}

#[async_trait]
impl OutboxSink for WebhookSink {
    async fn deliver(&self, row: &OutboxRow) -> anyhow::Result<()> {
        if self.config.url.is_empty() {
            tracing::debug!(subject = %row.subject, "registry callbacks disabled (no [registry.callbacks] url); dropped");
            return Ok(());
        }
        let timestamp = self.clock.now().unix_timestamp();
        let body = row.payload.as_bytes().to_vec();
        let signature = sign(&self.config.secret, timestamp, &body);
        let response = self
            .client
            .post(&self.config.url)
            .header("content-type", "application/json")
            .header("x-cardpipe-delivery", &row.id)
            .header("x-cardpipe-timestamp", timestamp.to_string())
            .header("x-cardpipe-signature", format!("sha256={signature}"))
            .body(body)
            .send()
            .await?;
        let status = response.status();
        if !status.is_success() {
            // A malformed-request answer repeats however often it is sent: give the row
            // to an operator (dead letters) instead of retrying it for hours.
            if PERMANENT_STATUSES.contains(&status.as_u16()) {
                return Err(PermanentFailure(format!("registry webhook answered {status}")).into());
            }
            anyhow::bail!("registry webhook answered {status}");
        }
        Ok(())
    }

    /// Another party's latency: the external lane, so a hung webhook never delays
    /// the hand-off between stages.
    fn lane(&self) -> Lane {
        Lane::External
    }
}

/// Webhook answers that say the request itself is wrong (retrying cannot help).
const PERMANENT_STATUSES: [u16; 6] = [400, 404, 410, 413, 415, 422];
