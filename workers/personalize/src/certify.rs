//! Certification of keys generated on the chip, while the card is in the encoder.
//!
//! [`StageCertifier`] is the personalization script's [`Certifier`]: it hands the chip a
//! [`possession_challenge`] per key, and when both proofs are in it has the CA
//! ([`CardIssuer::certify_on_card`](cardpipe_pki::issue::CardIssuer::certify_on_card)) check
//! them and issue the certificates, then records them in `certificates` in its own
//! transaction before the script writes them to the card — a certificate never exists
//! unrecorded, so one whose card fails is found and revoked ([`revoke_unwritten`]).
//!
//! It runs on the script's helper thread (blocking): the store is reached through the
//! runtime handle captured when the stage built it.

use std::sync::{Arc, Mutex};

use cardpipe_card::cplc::ChipSerial;
use cardpipe_card::script::{Certifier, CertifyError};
use cardpipe_common::contract::{self, RevocationCause};
use cardpipe_common::domain::ApplicationId;
use cardpipe_common::runtime::Services;
use cardpipe_common::store::{Store, StoreError};
use cardpipe_pki::citizen::{CardKeyRole, IssuedCertificate};
use cardpipe_pki::custody::CardCredentials;
use cardpipe_pki::issue::{ChipKeyProof, possession_challenge};
use cardpipe_pki::settings::CurrentCa;
use time::OffsetDateTime;

/// The personalize stage's CA for one card.
pub struct StageCertifier {
    ca: Arc<CurrentCa>,
    services: Services,
    runtime: tokio::runtime::Handle,
    application: ApplicationId,
    dg1: Vec<u8>,
    package_key: String,
    now: OffsetDateTime,
    issued: Mutex<Option<[IssuedCertificate; 2]>>,
}

impl std::fmt::Debug for StageCertifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageCertifier")
            .field("application", &self.application)
            .field("package_key", &self.package_key)
            .finish_non_exhaustive()
    }
}

impl StageCertifier {
    /// A certifier for `application`'s card from `package` (stored at `package_key`). Call
    /// inside the runtime (it keeps its handle for the helper thread).
    pub fn new(
        ca: Arc<CurrentCa>,
        services: Services,
        application: &ApplicationId,
        package: &CardCredentials,
        package_key: &str,
        now: OffsetDateTime,
    ) -> Self {
        Self {
            ca,
            services,
            runtime: tokio::runtime::Handle::current(),
            application: application.clone(),
            dg1: package.dg1.clone(),
            package_key: package_key.to_owned(),
            now,
            issued: Mutex::new(None),
        }
    }

    /// The certificates issued and recorded for this card, once they are.
    pub fn issued(&self) -> Option<[IssuedCertificate; 2]> {
        self.issued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Certifier for StageCertifier {
    fn challenge(&self, role: CardKeyRole, public_key: &[u8]) -> Vec<u8> {
        possession_challenge(self.application.as_str(), role, public_key)
    }

    fn certify(
        &self,
        chip: ChipSerial,
        proofs: [ChipKeyProof; 2],
    ) -> Result<[Vec<u8>; 2], CertifyError> {
        let issued = self.ca.issuer.certify_on_card(
            self.application.as_str(),
            &self.dg1,
            &proofs,
            self.now,
        )?;
        // Recorded before the card carries them (own transaction).
        let services = &self.services;
        let (app, key, now) = (&self.application, &self.package_key, self.now);
        self.runtime
            .block_on(async {
                let mut tx = services.store.begin().await?;
                for cert in &issued {
                    cardpipe_pki::store::insert_certificate(&mut tx, app, cert, key, now).await?;
                }
                tx.commit().await?;
                Ok::<(), StoreError>(())
            })
            .map_err(|e| CertifyError::Ca(format!("recording the certificates: {e}")))?;
        tracing::info!(application = %app, %chip, authentication = %issued[0].serial, signature = %issued[1].serial, "keys generated on the chip certified");
        let ders = [issued[0].der.clone(), issued[1].der.clone()];
        *self.issued.lock().unwrap_or_else(|e| e.into_inner()) = Some(issued);
        Ok(ders)
    }
}

/// Revokes (`spoiled`, with a CRL publication) the still-valid certificates issued under
/// `package_key` for cards that did not become `app`'s card: called before each blank of an
/// on-card application, when every earlier certificate of this package belongs to a failed
/// or interrupted blank. Returns how many were revoked.
pub async fn revoke_unwritten(
    store: &Store,
    app: &ApplicationId,
    package_key: &str,
    at: OffsetDateTime,
) -> Result<u64, StoreError> {
    let serials: Vec<String> = sqlx::query_scalar(
        "SELECT serial FROM certificates WHERE credentials_key = $1 AND status = 'valid'",
    )
    .bind(package_key)
    .fetch_all(store.pool())
    .await?;
    if serials.is_empty() {
        return Ok(0);
    }
    let mut tx = store.begin().await?;
    let n = cardpipe_pki::store::revoke_serials_tx(
        &mut tx,
        app,
        &serials,
        RevocationCause::Spoiled,
        at,
    )
    .await?;
    contract::request_crl_publication(&mut tx, Vec::new(), at).await?;
    tx.commit().await?;
    tracing::warn!(application = %app, revoked = n, "certificates of a blank that did not become the card revoked (spoiled)");
    Ok(n)
}
