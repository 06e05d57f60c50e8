//! What happens to certificates and keys after issuance, with the database and object store:
//!
//! - [`revoke_application`]: mark a card's certificates revoked with a cause (cancelled,
//!   voided, lost, reprinted); [`RevocationSink`] does it for outbox rows of topic
//!   `revocation` (`{"application_id": "...", "cause": "cancelled"}`).
//! - [`publish_crl`]: sign a CRL over every revoked certificate and publish it as
//!   `crl/issuing-<number>.crl` and `crl/latest.crl` (DER). The number is reserved in its own
//!   committed transaction first (MAX + 1 under a primary key), so numbers strictly increase
//!   and a crash after the reservation leaves a gap, never a reused number.
//!   [`publish_crl_if_due`] is the scheduled form: one publisher per period across replicas
//!   (a lease, plus a `scheduled_runs` row in the reservation transaction).
//! - [`rotate_document_signer`]: roll the Document Signer exactly once across replicas
//!   (a lease, plus the unique `ca_hierarchy.version` row written by the winner).
//! - [`destroy_wrapped_keys`]: crypto-shredding after QC passed — delete every
//!   personalization package of the application and record the destruction.
//! - [`background`]: the loop `cardpipe run` starts (CRL schedule, age-based rotation).

use std::sync::Arc;
use std::time::Duration as StdDuration;

use async_trait::async_trait;
use bytes::Bytes;
use cardpipe_common::audit::{self, AuditEvent};
use cardpipe_common::domain::ApplicationId;
use cardpipe_common::runtime::Services;
use cardpipe_common::runtime::relay::OutboxSink;
use cardpipe_common::store::{OutboxRow, Store, StoreError, StoreTx};

use time::{Duration, OffsetDateTime};
use tokio_util::sync::CancellationToken;

use cardpipe_common::contract::{
    CRL_TOPIC, CrlPublication, KEY_DESTRUCTION_TOPIC, KeyDestruction, REVOCATION_TOPIC,
    RevocationCause, RevocationRequest,
};
use cardpipe_pki::crl::{CrlRequest, generate_crl};
use cardpipe_pki::rotation::{RotationDecision, decide_for};
use cardpipe_pki::settings::Pki;
use cardpipe_pki::store;

/// Object key of the newest CRL.
pub const LATEST_CRL_KEY: &str = "crl/latest.crl";

/// Marks every valid certificate of `app_id` revoked with `cause`, in `tx` when given
/// (so a caller's state change and the revocation commit together), else in its own
/// transaction. Idempotent; returns how many certificates changed. The next CRL lists them.
pub async fn revoke_application(
    services: &Services,
    tx: Option<&mut StoreTx>,
    app_id: &ApplicationId,
    cause: RevocationCause,
) -> Result<u64, StoreError> {
    let now = services.clock.now();
    match tx {
        Some(tx) => {
            let n = store::revoke_tx(tx, app_id, cause, now).await?;
            audit_revocation(tx, app_id, cause, n, now).await?;
            Ok(n)
        }
        None => {
            let mut tx = services.store.begin().await?;
            let n = store::revoke_tx(&mut tx, app_id, cause, now).await?;
            audit_revocation(&mut tx, app_id, cause, n, now).await?;
            tx.commit().await?;
            Ok(n)
        }
    }
}

/// A revocation that changed certificates is its own audit entry, in its transaction.
async fn audit_revocation(
    tx: &mut StoreTx,
    app_id: &ApplicationId,
    cause: RevocationCause,
    certificates: u64,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    if certificates == 0 {
        return Ok(());
    }
    audit::record_in(
        tx,
        now,
        &AuditEvent {
            actor: "system:keys",
            role: "system",
            action: "pki.revoke",
            subject: app_id.as_str(),
            details: serde_json::json!({ "cause": cause.as_str(), "certificates": certificates }),
        },
    )
    .await?;
    Ok(())
}

/// Carries out one revocation request (idempotent: only valid certificates change).
async fn apply(services: &Services, request: &RevocationRequest) -> Result<u64, StoreError> {
    let app = ApplicationId(request.application_id.clone());
    if request.serials.is_empty() {
        return revoke_application(services, None, &app, request.cause).await;
    }
    let now = services.clock.now();
    let mut tx = services.store.begin().await?;
    let n = store::revoke_serials_tx(&mut tx, &app, &request.serials, request.cause, now).await?;
    audit_revocation(&mut tx, &app, request.cause, n, now).await?;
    tx.commit().await?;
    Ok(n)
}

/// Outbox sink for topic `revocation`.
#[derive(Debug)]
pub struct RevocationSink {
    services: Services,
}

impl RevocationSink {
    /// A sink revoking through `services`.
    pub fn new(services: Services) -> Self {
        Self { services }
    }
}

#[async_trait]
impl OutboxSink for RevocationSink {
    async fn deliver(&self, row: &OutboxRow) -> anyhow::Result<()> {
        let request: RevocationRequest = serde_json::from_str(&row.payload).map_err(|e| {
            anyhow::anyhow!(
                "revocation outbox row {} is not a revocation request: {e}",
                row.id
            )
        })?;
        let n = apply(&self.services, &request).await?;
        tracing::info!(application = %request.application_id, cause = store::cause_name(request.cause), revoked = n, "certificates revoked");
        Ok(())
    }
}

/// Outbox sink for [`CRL_TOPIC`]: records the listed revocations, then signs and publishes
/// a CRL (`cardpipe run`'s voiding asks for one after each chunk of voided cards).
pub struct CrlSink {
    services: Services,
    pki: Arc<Pki>,
}

impl std::fmt::Debug for CrlSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrlSink").finish_non_exhaustive()
    }
}

impl CrlSink {
    /// A sink signing with `pki`'s issuing CA.
    pub fn new(services: Services, pki: Arc<Pki>) -> Self {
        Self { services, pki }
    }
}

#[async_trait]
impl OutboxSink for CrlSink {
    async fn deliver(&self, row: &OutboxRow) -> anyhow::Result<()> {
        let request: CrlPublication = serde_json::from_str(&row.payload).map_err(|e| {
            anyhow::anyhow!(
                "outbox row {} is not a CRL publication request: {e}",
                row.id
            )
        })?;
        let mut revoked = 0;
        for r in &request.revoke {
            revoked += apply(&self.services, r).await?;
        }
        let crl = publish_crl(&self.services, &self.pki).await?;
        tracing::info!(
            number = crl.number,
            listed = crl.revoked,
            revoked,
            "CRL published on request"
        );
        Ok(())
    }
}

/// Outbox sink for [`KEY_DESTRUCTION_TOPIC`]: destroys the wrapped private keys of cards
/// that passed QC (crypto-shredding).
#[derive(Debug)]
pub struct KeyDestructionSink {
    services: Services,
}

impl KeyDestructionSink {
    /// A sink on `services`.
    pub fn new(services: Services) -> Self {
        Self { services }
    }
}

#[async_trait]
impl OutboxSink for KeyDestructionSink {
    async fn deliver(&self, row: &OutboxRow) -> anyhow::Result<()> {
        let req: KeyDestruction = serde_json::from_str(&row.payload)
            .map_err(|e| anyhow::anyhow!("outbox row {} is not a key destruction: {e}", row.id))?;
        let app = ApplicationId(req.application_id);
        match req.object_key {
            Some(key) => destroy_package(&self.services, &app, &key).await?,
            None => {
                destroy_wrapped_keys(&self.services, &app).await?;
            }
        }
        Ok(())
    }
}

/// The outbox sinks of the keys stage (topic, sink). Revocation and key destruction need
/// only the store; CRL publication needs the CA, so only a process that holds it (`pki`:
/// the keys worker, `cardpipe run` / `serve`) registers that topic — a relay claims only
/// the topics it has sinks for.
pub fn sinks(
    services: &Services,
    pki: Option<Arc<Pki>>,
) -> Vec<(&'static str, Arc<dyn OutboxSink>)> {
    let mut sinks: Vec<(&'static str, Arc<dyn OutboxSink>)> = vec![
        (
            REVOCATION_TOPIC,
            Arc::new(RevocationSink::new(services.clone())),
        ),
        (
            KEY_DESTRUCTION_TOPIC,
            Arc::new(KeyDestructionSink::new(services.clone())),
        ),
    ];
    if let Some(pki) = pki {
        sinks.push((CRL_TOPIC, Arc::new(CrlSink::new(services.clone(), pki))));
    }
    sinks
}

/// A published CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedCrl {
    /// CRL number.
    pub number: u64,
    /// `crl/issuing-<number>.crl`.
    pub object_key: String,
    /// Entries.
    pub revoked: usize,
}

/// Generates and publishes a CRL now (on demand: `cardpipe pki crl`).
pub async fn publish_crl(services: &Services, pki: &Pki) -> anyhow::Result<PublishedCrl> {
    publish(services, pki, None)
        .await?
        .ok_or_else(|| anyhow::anyhow!("CRL publication refused"))
}

async fn publish(
    services: &Services,
    pki: &Pki,
    period: Option<&str>,
) -> anyhow::Result<Option<PublishedCrl>> {
    let current = pki.current(services).await?;
    let now = services.clock.now().replace_nanosecond(0)?;
    let next_update = now + Duration::hours(pki.config.crl_validity_hours as i64);
    let mut tx = services.store.begin().await?;
    if let Some(period) = period
        && !Store::record_run(&mut tx, "pki-crl", period, pki.holder(), now).await?
    {
        tx.rollback().await?;
        return Ok(None);
    }
    let revoked = store::revoked(&mut tx).await?;
    let (number, previous) =
        store::reserve_crl_number(&mut tx, now, next_update, revoked.len()).await?;
    audit::record_in(
        &mut tx,
        now,
        &AuditEvent {
            actor: "system:keys",
            role: "system",
            action: "pki.crl_publish",
            subject: &format!("crl-{number}"),
            details: serde_json::json!({
                "number": number,
                "revoked": revoked.len(),
                "next_update": cardpipe_common::clock::to_rfc3339(next_update),
            }),
        },
    )
    .await?;
    tx.commit().await?;
    let keystore = pki.keystore().clone();
    let issuing = current.hierarchy.issuing.clone();
    let count = revoked.len();
    let crl = tokio::task::spawn_blocking(move || {
        generate_crl(
            keystore.as_ref(),
            &issuing,
            &revoked,
            CrlRequest {
                number,
                previous_number: previous,
                this_update: now,
                next_update,
            },
        )
    })
    .await??;
    let key = format!("crl/issuing-{number}.crl");
    let bytes = Bytes::from(crl.der);
    services.objects.put(&key, bytes.clone()).await?;
    services.objects.put(LATEST_CRL_KEY, bytes).await?;
    tracing::info!(number, revoked = count, "CRL published");
    Ok(Some(PublishedCrl {
        number,
        object_key: key,
        revoked: count,
    }))
}

/// Scheduled publication: publishes when no CRL was published in the last
/// `crl_interval_seconds`, once per interval period across replicas. `None` when not due
/// or another replica did it.
pub async fn publish_crl_if_due(
    services: &Services,
    pki: &Pki,
) -> anyhow::Result<Option<PublishedCrl>> {
    let now = services.clock.now();
    let interval = pki.config.crl_interval_seconds.max(1) as i64;
    if let Some((_, last)) = store::last_crl(&services.store).await?
        && now - last < Duration::seconds(interval)
    {
        return Ok(None);
    }
    let period = format!("{}", now.unix_timestamp().div_euclid(interval));
    publish(services, pki, Some(&period)).await
}

/// Outcome of [`rotate_document_signer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotationOutcome {
    /// The policy does not call for a rotation (or another replica already rotated).
    NotDue,
    /// Another replica holds the rotation lease.
    Busy,
    /// Another replica stored the new version first (our new key is unused).
    Lost,
    /// This call rotated: new hierarchy version and DS label.
    Rotated {
        /// New `ca_hierarchy.version`.
        version: i64,
        /// Keystore label of the new Document Signer.
        label: String,
    },
}

/// Rolls the Document Signer when the policy says so (or always with `force`), exactly
/// once across replicas: only the holder of lease `pki-ds-rotation` tries, it re-reads the
/// stored hierarchy and usage under the lease, and the new version row is unique, so a
/// second writer (say, after a lease expired mid-rotation) finds it taken and rolls back.
pub async fn rotate_document_signer(
    services: &Services,
    pki: &Pki,
    force: bool,
) -> anyhow::Result<RotationOutcome> {
    let now = services.clock.now();
    if !services
        .store
        .try_lease("pki-ds-rotation", pki.holder(), now, Duration::minutes(5))
        .await?
    {
        return Ok(RotationOutcome::Busy);
    }
    let result = rotate_under_lease(services, pki, force, now).await;
    services
        .store
        .release_lease("pki-ds-rotation", pki.holder())
        .await?;
    result
}

async fn rotate_under_lease(
    services: &Services,
    pki: &Pki,
    force: bool,
    now: OffsetDateTime,
) -> anyhow::Result<RotationOutcome> {
    let current = pki.current(services).await?;
    let used = store::ds_usage(
        &services.store,
        &current.hierarchy.document_signer.key_label,
    )
    .await?;
    let decision = decide_for(&pki.config.rotation, &current.hierarchy, used, now)?;
    let reason = match decision {
        RotationDecision::Rotate(reason) => serde_json::to_string(&reason)?,
        RotationDecision::Keep if force => "forced".to_owned(),
        RotationDecision::Keep => return Ok(RotationOutcome::NotDue),
    };
    let keystore = pki.keystore().clone();
    let hierarchy = current.hierarchy.clone();
    let next = tokio::task::spawn_blocking(move || {
        cardpipe_pki::rotation::rotate(keystore.as_ref(), &hierarchy, now)
    })
    .await??;
    let version = current.version + 1;
    let mut tx = services.store.begin().await?;
    if !store::insert_hierarchy_tx(&mut tx, version, &next, &format!("rotation {reason}"), now)
        .await?
    {
        tx.rollback().await?;
        return Ok(RotationOutcome::Lost);
    }
    audit::record_in(
        &mut tx,
        now,
        &AuditEvent {
            actor: "system:keys",
            role: "system",
            action: "pki.ds_rotate",
            subject: &next.document_signer.key_label,
            details: serde_json::json!({ "version": version, "reason": reason }),
        },
    )
    .await?;
    tx.commit().await?;
    let label = next.document_signer.key_label.clone();
    tracing::info!(version, label = %label, reason = %reason, "Document Signer rotated");
    pki.current(services).await?;
    Ok(RotationOutcome::Rotated { version, label })
}

/// Crypto-shredding (QC calls it when the card passed): deletes every personalization
/// package object of `app_id` (`applications/<id>/credentials-*`, including those of
/// attempts that never committed) and records the destruction. Idempotent; returns the
/// objects deleted.
pub async fn destroy_wrapped_keys(
    services: &Services,
    app_id: &ApplicationId,
) -> anyhow::Result<usize> {
    let prefix = format!("applications/{app_id}/");
    let keys = services.objects.list(&prefix).await?;
    let mut deleted = 0;
    for key in keys
        .iter()
        .filter(|k| k[prefix.len()..].starts_with("credentials-"))
    {
        services.objects.delete(key).await?;
        deleted += 1;
    }
    let marked = store::mark_destroyed(&services.store, app_id, services.clock.now()).await?;
    // Audited once per destruction that did something (a repeated request finds nothing).
    if deleted > 0 || marked > 0 {
        audit::record(
            &services.store,
            services.clock.as_ref(),
            &AuditEvent {
                actor: "system:keys",
                role: "system",
                action: "keys.destroy_wrapped_keys",
                subject: app_id.as_str(),
                details: serde_json::json!({ "objects": deleted, "packages": marked }),
            },
        )
        .await?;
    }
    tracing::info!(application = %app_id, objects = deleted, "wrapped card keys destroyed");
    Ok(deleted)
}

/// Destroys one personalization package of `app_id` (a card spoiled at QC: its remake has
/// fresh keys, possibly already a package of its own) and records it. Idempotent. A key
/// outside `applications/<id>/credentials-*` is refused: the request names a package, not
/// any object.
pub async fn destroy_package(
    services: &Services,
    app_id: &ApplicationId,
    object_key: &str,
) -> anyhow::Result<()> {
    let prefix = format!("applications/{app_id}/credentials-");
    anyhow::ensure!(
        object_key.starts_with(&prefix) && !object_key.contains(".."),
        "key destruction for application {app_id} names an object that is not its package"
    );
    services.objects.delete(object_key).await?;
    let marked =
        store::mark_package_destroyed(&services.store, app_id, object_key, services.clock.now())
            .await?;
    if marked > 0 {
        audit::record(
            &services.store,
            services.clock.as_ref(),
            &AuditEvent {
                actor: "system:keys",
                role: "system",
                action: "keys.destroy_package",
                subject: app_id.as_str(),
                details: serde_json::json!({ "object_key": object_key }),
            },
        )
        .await?;
    }
    tracing::info!(application = %app_id, "wrapped card keys of a spoiled card destroyed");
    Ok(())
}

/// The keys stage's time-driven loop: every `tick`, publish a CRL when due and roll the
/// Document Signer when it is too old. Runs until `shutdown`.
pub async fn background(
    services: Services,
    pki: Arc<Pki>,
    tick: StdDuration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        if let Err(err) = publish_crl_if_due(&services, &pki).await {
            tracing::warn!(error = %format!("{err:#}"), "scheduled CRL publication failed; retrying next tick");
        }
        if let Err(err) = rotate_document_signer(&services, &pki, false).await {
            tracing::warn!(error = %format!("{err:#}"), "Document Signer rotation check failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(tick) => {}
        }
    }
}
