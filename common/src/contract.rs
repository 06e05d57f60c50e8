//! The contract between stages: how one stage asks another for work it owns.
//!
//! A stage crate never calls another stage crate. When work belongs elsewhere — revoking a
//! card's certificates and signing a CRL (the keys stage holds the CA keys), destroying the
//! wrapped private keys after QC, making a reprint, applying an adjudicator's decision — the
//! asking side writes a row in its own transaction, so the request commits or rolls back
//! with the state change that caused it:
//!
//! * an outbox row of one of the topics below; the owning stage registers the
//!   [`OutboxSink`](crate::runtime::relay::OutboxSink) that carries it out, and every relay
//!   delivers it (retried until it succeeds, so sinks are idempotent);
//! * or a job on the owning stage's queue ([`stage_names`]) through
//!   [`Store::enqueue_job`](crate::store::Store::enqueue_job).
//!
//! Payloads carry ids and codes, never personal data.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::domain::ApplicationId;
use crate::runtime::Services;
use crate::store::{Store, StoreError, StoreTx};

/// The stages' queue names (`cardpipe worker <name>`).
pub mod stage_names {
    /// Deduplication.
    pub const DEDUP: &str = "dedup";
    /// Keys and certificates.
    pub const KEYS: &str = "keys";
    /// Chip personalization.
    pub const PERSONALIZE: &str = "personalize";
    /// Quality control.
    pub const QC: &str = "qc";
    /// Boxing per pickup office.
    pub const SHIPPING: &str = "shipping";
}

/// Artifact kind of the card package the keys stage writes and personalization reads
/// (credentials: certificates, wrapped private keys, LDS data groups, EF.SOD).
pub const CREDENTIALS_ARTIFACT: &str = "credentials";

/// Object key of a card package of `app`: `issuance` (1-based: the application's committed
/// packages + 1) and the package's own authentication-certificate serial. Not one name per
/// issuance: two deliveries of the same keys job can run at once (a re-queued stranded job
/// beside the original), and the loser's package would overwrite the winner's after the
/// winner committed. A package of an attempt that never committed is destroyed with the
/// application's others ([`KEY_DESTRUCTION_TOPIC`]: QC pass and every terminal path).
pub fn credentials_object_key(app: &ApplicationId, issuance: i64, serial: &str) -> String {
    format!("applications/{app}/credentials-{issuance}-{serial}.sealed")
}

/// Seals a card package (it holds DG1 name and national code, DG2 photo, DG3 templates,
/// DG11 address): the envelope binds it to `credentials:<application>`.
pub fn seal_credentials(services: &Services, app: &ApplicationId, package: &[u8]) -> Vec<u8> {
    services.sealer.seal(&format!("credentials:{app}"), package)
}

/// Reads and opens the card package at `key` (`None` when the object is absent). Packages
/// written before sealing (`*.json`) are read as they are.
pub async fn load_credentials(
    services: &Services,
    app: &ApplicationId,
    key: &str,
) -> anyhow::Result<Option<zeroize::Zeroizing<Vec<u8>>>> {
    let Some(bytes) = services.objects.get(key).await? else {
        return Ok(None);
    };
    if key.ends_with(".json") {
        return Ok(Some(zeroize::Zeroizing::new(bytes.to_vec())));
    }
    Ok(Some(
        services
            .sealer
            .open(&format!("credentials:{app}"), &bytes)
            .map_err(|e| anyhow::anyhow!("credentials package {key}: {e}"))?,
    ))
}

/// Writes a [`KEY_DESTRUCTION_TOPIC`] request for every package of `app` in the caller's
/// transaction: an application that ends without a passed card (cancelled, force-failed,
/// voided) has its wrapped keys destroyed like one that passed QC. Harmless when the
/// application never had keys.
pub async fn request_key_destruction(
    tx: &mut StoreTx,
    app: &ApplicationId,
    at: OffsetDateTime,
) -> Result<(), StoreError> {
    let id = uuid::Uuid::now_v7().to_string();
    Store::enqueue_outbox(
        tx,
        &id,
        KEY_DESTRUCTION_TOPIC,
        app.as_str(),
        &key_destruction_payload(app),
        at,
    )
    .await
}

/// Why a card's certificates are revoked (pipeline vocabulary; the keys stage maps it to
/// the RFC 5280 reason code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationCause {
    /// Not collected within six months.
    Voided,
    /// Application withdrawn by the registry.
    Cancelled,
    /// Card reported lost.
    Lost,
    /// Replaced by a reprint.
    Reprinted,
    /// The card failed quality control and went to the reject bin; its remake gets fresh
    /// keys and certificates (one chip per private key).
    Spoiled,
}

impl RevocationCause {
    /// The stored code.
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationCause::Voided => "voided",
            RevocationCause::Cancelled => "cancelled",
            RevocationCause::Lost => "lost",
            RevocationCause::Reprinted => "reprinted",
            RevocationCause::Spoiled => "spoiled",
        }
    }
}

/// Outbox topic: revoke every valid certificate of one application (keys stage).
pub const REVOCATION_TOPIC: &str = "revocation";

/// Payload of [`REVOCATION_TOPIC`] rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationRequest {
    /// The application whose certificates to revoke.
    pub application_id: String,
    /// Why.
    pub cause: RevocationCause,
    /// The certificates meant (serials); empty: every valid certificate of the
    /// application. A request about a card that is being replaced names its serials, so it
    /// cannot reach the replacement's certificates if it is applied late.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub serials: Vec<String>,
}

/// Outbox topic: revoke the listed applications' certificates, then sign and publish a
/// fresh CRL at once instead of waiting for the schedule (keys stage).
pub const CRL_TOPIC: &str = "crl.publish";

/// Payload of [`CRL_TOPIC`] rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrlPublication {
    /// Revocations to record before signing (may be empty).
    pub revoke: Vec<RevocationRequest>,
}

/// Outbox topic: destroy an application's wrapped private keys (crypto-shredding after QC
/// passed; keys stage).
pub const KEY_DESTRUCTION_TOPIC: &str = "qc.destroy_keys";

/// Payload of [`KEY_DESTRUCTION_TOPIC`] rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyDestruction {
    /// The application whose wrapped keys to destroy.
    pub application_id: String,
    /// Only this package (a spoiled card's, while its remake's package may already exist);
    /// absent: every package of the application (after the card passed QC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_key: Option<String>,
}

/// Outbox topic: apply an adjudicator's decision on a possible duplicate (dedup stage).
pub const ADJUDICATION_TOPIC: &str = "dedup.adjudication";

/// Payload of [`ADJUDICATION_TOPIC`] rows: a decision an authenticated operator took in the
/// console. Dedup applies it (compare-and-set from `possible_duplicate`, registry callback,
/// gallery enrolment of a cleared application, audit) or, when the application has moved
/// on meanwhile, logs the refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdjudicationDecision {
    /// The application in `possible_duplicate`.
    pub application_id: String,
    /// `confirmed_duplicate` or `cleared`.
    pub decision: String,
    /// The operator's reason (shown in history and to the registry).
    pub reason: String,
    /// The operator's login.
    pub operator: String,
    /// The operator's role.
    pub role: String,
}

/// Asks the dedup stage, in `tx`, to apply `decision`.
pub async fn request_adjudication(
    tx: &mut StoreTx,
    decision: &AdjudicationDecision,
    at: OffsetDateTime,
) -> Result<(), StoreError> {
    let id = uuid::Uuid::now_v7().to_string();
    let subject = decision.application_id.clone();
    Store::enqueue_outbox(
        tx,
        &id,
        ADJUDICATION_TOPIC,
        &subject,
        &payload(decision),
        at,
    )
    .await
}

/// Outbox topic: make a new card for an application whose card is lost or unusable (the
/// reprint workflow the QC crate owns: revocation, recall, a `keys` job).
pub const REPRINT_TOPIC: &str = "qc.reprint";

/// Payload of [`REPRINT_TOPIC`] rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReprintRequest {
    /// The reprint's id, chosen by the asking side so it can refer to it at once
    /// (`RPR-<uuid>`); applying the same request twice makes one reprint.
    pub id: String,
    /// The application.
    pub application_id: String,
    /// `damaged`, `lost_in_transit` or `data_error`.
    pub reason: String,
    /// The operator's login.
    pub operator: String,
}

impl ReprintRequest {
    /// A request with a fresh id.
    pub fn new(app: &ApplicationId, reason: &str, operator: &str) -> Self {
        Self {
            id: format!("RPR-{}", uuid::Uuid::now_v7().simple()),
            application_id: app.as_str().to_owned(),
            reason: reason.to_owned(),
            operator: operator.to_owned(),
        }
    }
}

/// Asks for `request`, in `tx`.
pub async fn request_reprint(
    tx: &mut StoreTx,
    request: &ReprintRequest,
    at: OffsetDateTime,
) -> Result<(), StoreError> {
    let id = uuid::Uuid::now_v7().to_string();
    let subject = request.application_id.clone();
    Store::enqueue_outbox(tx, &id, REPRINT_TOPIC, &subject, &payload(request), at).await
}

/// One candidate of a possible duplicate as dedup stored it (table `dedup_candidates`; rank
/// 1 = best): what the console shows an adjudicator.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredCandidate {
    /// 1 = best.
    pub rank: i64,
    /// The enrolled application it matched.
    pub candidate_id: String,
    /// Fused score (−log10 FMR).
    pub score: f64,
    /// Estimated false match rate.
    pub fmr: f64,
    /// Per finger position 1..=10 (index 0 = position 1).
    pub finger_scores: Vec<Option<f64>>,
}

/// The stored candidates of `id`, best first.
pub async fn candidates(
    store: &Store,
    id: &ApplicationId,
) -> Result<Vec<StoredCandidate>, StoreError> {
    use sqlx::Row;
    let rows = sqlx::query(
        "SELECT rank, candidate_id, score, fmr, finger_scores FROM dedup_candidates
         WHERE application_id = $1 ORDER BY rank",
    )
    .bind(id.as_str())
    .fetch_all(store.pool())
    .await?;
    rows.iter()
        .map(|r| {
            let fingers: String = r.try_get("finger_scores")?;
            Ok(StoredCandidate {
                rank: r.try_get::<i64, _>("rank")?,
                candidate_id: r.try_get("candidate_id")?,
                score: r.try_get("score")?,
                fmr: r.try_get("fmr")?,
                finger_scores: serde_json::from_str(&fingers).map_err(|e| StoreError::Corrupt {
                    table: "dedup_candidates",
                    column: "finger_scores",
                    message: e.to_string(),
                })?,
            })
        })
        .collect()
}

/// The pickup office codes of the register delivery loads at start (table
/// `delivery_offices`): what intake checks a record's `pickup_office` against. Empty when no
/// register was loaded.
pub async fn pickup_office_codes(store: &Store) -> Result<Vec<String>, StoreError> {
    use sqlx::Row;
    sqlx::query("SELECT code FROM delivery_offices ORDER BY code")
        .fetch_all(store.pool())
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>("code").map_err(StoreError::from))
        .collect()
}

fn payload(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("contract payloads serialise")
}

/// Asks the keys stage, in `tx`, to revoke `app`'s certificates: those in `serials`, or
/// every valid one when `serials` is empty.
pub async fn request_revocation(
    tx: &mut StoreTx,
    app: &ApplicationId,
    cause: RevocationCause,
    serials: Vec<String>,
    at: OffsetDateTime,
) -> Result<(), StoreError> {
    let body = payload(&RevocationRequest {
        application_id: app.as_str().to_owned(),
        cause,
        serials,
    });
    let id = uuid::Uuid::now_v7().to_string();
    Store::enqueue_outbox(tx, &id, REVOCATION_TOPIC, app.as_str(), &body, at).await
}

/// Asks the keys stage, in `tx`, to record `revoke` and publish a CRL.
pub async fn request_crl_publication(
    tx: &mut StoreTx,
    revoke: Vec<RevocationRequest>,
    at: OffsetDateTime,
) -> Result<(), StoreError> {
    let body = payload(&CrlPublication { revoke });
    let id = uuid::Uuid::now_v7().to_string();
    Store::enqueue_outbox(tx, &id, CRL_TOPIC, "crl", &body, at).await
}

/// The [`KEY_DESTRUCTION_TOPIC`] payload for `app` (for `Completion::announce`).
pub fn key_destruction_payload(app: &ApplicationId) -> String {
    payload(&KeyDestruction {
        application_id: app.as_str().to_owned(),
        object_key: None,
    })
}

/// The [`KEY_DESTRUCTION_TOPIC`] payload for one package of `app` (a spoiled card's).
pub fn package_destruction_payload(app: &ApplicationId, object_key: &str) -> String {
    payload(&KeyDestruction {
        application_id: app.as_str().to_owned(),
        object_key: Some(object_key.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_keep_their_wire_form() {
        let r = RevocationRequest {
            application_id: "a1".into(),
            cause: RevocationCause::Reprinted,
            serials: Vec::new(),
        };
        assert_eq!(
            payload(&r),
            r#"{"application_id":"a1","cause":"reprinted"}"#
        );
        let named: RevocationRequest =
            serde_json::from_str(r#"{"application_id":"a1","cause":"lost","serials":["0A"]}"#)
                .unwrap();
        assert_eq!(named.serials, vec!["0A".to_string()]);
        let c: CrlPublication = serde_json::from_str(&payload(&CrlPublication {
            revoke: vec![r.clone()],
        }))
        .unwrap();
        assert_eq!(c.revoke, vec![r]);
        for cause in [
            RevocationCause::Voided,
            RevocationCause::Cancelled,
            RevocationCause::Lost,
            RevocationCause::Reprinted,
        ] {
            assert_eq!(
                serde_json::to_value(cause).unwrap(),
                serde_json::Value::from(cause.as_str())
            );
        }
    }
}
