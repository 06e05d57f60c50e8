//! The keys stage: `dedup_clear | cleared | reprint_requested | qc_failed → keys_issued`,
//! then `personalize`. A card QC refused is remade with fresh keys and certificates (one chip
//! per private key); QC revoked the spoiled card's certificates when it spoiled the card.
//!
//! For one application it loads the sealed record and biometrics, issues the credential set
//! ([`CardIssuer::issue`](cardpipe_pki::issue::CardIssuer::issue)), writes the
//! [`CardCredentials`](cardpipe_pki::custody::CardCredentials) package (JSON, sealed under the
//! envelope key as `credentials:<id>`; both private keys also wrapped under the encoder
//! site's transport key, never clear) to `applications/<id>/credentials-<n>-<serial>.sealed`
//! (n: the application's committed packages + 1; see
//! [`credentials_object_key`](cardpipe_common::contract::credentials_object_key) for why the
//! serial is in the name) — and completes with, in ONE transaction: the artifact
//! `credentials`, both certificates in `certificates`, +1 document for the Document Signer
//! in `ds_usage`, the package in `wrapped_key_custody`, and for a reprint the revocation
//! (`reprinted`) of the previous card's certificates.
//!
//! With `[keys] generation = "on_card"` (the default) the package carries the LDS and EF.SOD
//! only ([`CardIssuer::prepare_on_card`](cardpipe_pki::issue::CardIssuer::prepare_on_card)):
//! no key, no certificate, no custody of key material. The chip generates its key pairs in
//! the encoder and personalization has them certified.
//!
//! Before issuing it checks the Document Signer rotation policy and rolls the DS when due
//! (exactly once across replicas, see [`crate::ops::rotate_document_signer`]).

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use cardpipe_common::domain::{Application, ApplicationState};
use cardpipe_common::records::{self, RecordError};
use cardpipe_common::runtime::{Completion, ExtraWrites, JobContext, Permanent, Stage};
use cardpipe_common::store::{StoreError, StoreTx};
use futures::future::BoxFuture;

use crate::ops::{RotationOutcome, rotate_document_signer};
use cardpipe_common::contract::RevocationCause;
use cardpipe_pki::custody::KeyOrigin;
use cardpipe_pki::lds;
use cardpipe_pki::rotation::{RotationDecision, decide_for};
use cardpipe_pki::settings::Pki;
use cardpipe_pki::store;

/// The stage name.
pub const STAGE_NAME: &str = cardpipe_common::contract::stage_names::KEYS;
/// The stage after this one.
pub const NEXT_STAGE: &str = cardpipe_common::contract::stage_names::PERSONALIZE;
/// Artifact kind of the personalization package.
pub const CREDENTIALS_ARTIFACT: &str = cardpipe_common::contract::CREDENTIALS_ARTIFACT;

const ACCEPTS: &[ApplicationState] = &[
    ApplicationState::DedupClear,
    ApplicationState::Cleared,
    ApplicationState::ReprintRequested,
    ApplicationState::QcFailed,
];

/// The keys stage.
#[derive(Debug, Clone)]
pub struct KeysStage {
    pki: Arc<Pki>,
    generation: KeyOrigin,
}

impl KeysStage {
    /// A stage issuing through `pki`, the chips generating their keys (the default).
    pub fn new(pki: Arc<Pki>) -> Self {
        Self {
            pki,
            generation: KeyOrigin::OnCard,
        }
    }

    /// Where card key pairs are generated (`[keys] generation`).
    pub fn with_generation(mut self, generation: KeyOrigin) -> Self {
        self.generation = generation;
        self
    }
}

/// Boxes a completion-transaction closure (pins down its higher-ranked signature).
fn extra_writes<F>(f: F) -> ExtraWrites
where
    F: for<'t> FnOnce(&'t mut StoreTx) -> BoxFuture<'t, Result<(), StoreError>> + Send + 'static,
{
    Box::new(f)
}

fn record_error(e: RecordError) -> anyhow::Error {
    match e {
        RecordError::Missing { .. } | RecordError::Corrupt(_) => Permanent(e.to_string()).into(),
        other => other.into(),
    }
}

#[async_trait]
impl Stage for KeysStage {
    fn name(&self) -> &'static str {
        STAGE_NAME
    }

    fn accepts(&self) -> &'static [ApplicationState] {
        ACCEPTS
    }

    async fn handle(&self, ctx: &JobContext, app: &Application) -> anyhow::Result<Completion> {
        let services = &ctx.services;
        let now = services.clock.now();
        let mut current = self.pki.current(services).await?;
        let used = store::ds_usage(
            &services.store,
            &current.hierarchy.document_signer.key_label,
        )
        .await?;
        if let RotationDecision::Rotate(_) =
            decide_for(&self.pki.config.rotation, &current.hierarchy, used, now)?
        {
            match rotate_document_signer(services, &self.pki, false).await? {
                RotationOutcome::Busy => {
                    anyhow::bail!("Document Signer rotation in progress elsewhere; retrying")
                }
                _ => current = self.pki.current(services).await?,
            }
        }

        let record = records::load_record(services, &app.id)
            .await
            .map_err(record_error)?;
        let biometrics = records::load_biometrics(services, &app.id)
            .await
            .map_err(record_error)?;
        let chip = lds::chip_input(&record, &biometrics);
        drop(record);
        drop(biometrics);

        let pki = self.pki.clone();
        let card_ref = app.id.to_string();
        let issuing = current.clone();
        let generation = self.generation;
        let credentials = tokio::task::spawn_blocking(move || match generation {
            KeyOrigin::OffCard => issuing
                .issuer
                .issue(&card_ref, &chip, pki.transport_key(), now),
            KeyOrigin::OnCard => issuing.issuer.prepare_on_card(&card_ref, &chip),
        })
        .await?
        .map_err(|e| match e {
            cardpipe_pki::KeysError::Lds(_) | cardpipe_pki::KeysError::Invalid(_) => {
                anyhow::Error::from(Permanent(format!("chip data: {e}")))
            }
            other => other.into(),
        })?;

        // Sealed: the package holds DG1, DG2, DG3 and DG11.
        let issuance = store::committed_packages(&services.store, &app.id).await? + 1;
        // Named after the package's authentication certificate, or (on-card: no certificate
        // yet) a fresh id, so two deliveries of one job never write the same object.
        let distinct = match &credentials.off_card {
            Some(keys) => keys.authentication_certificate.serial.clone(),
            None => format!("oncard{}", uuid::Uuid::now_v7().simple()),
        };
        let key = cardpipe_common::contract::credentials_object_key(&app.id, issuance, &distinct);
        let json = zeroize::Zeroizing::new(serde_json::to_vec(&credentials)?);
        let sealed = cardpipe_common::contract::seal_credentials(services, &app.id, &json);
        drop(json);
        services.objects.put(&key, Bytes::from(sealed)).await?;

        let id = app.id.clone();
        // Certificates still valid from the previous card: a reprint's (revoked here) or,
        // defensively, a spoiled card's (QC revokes them as it spoils the card).
        let previous_cause = match app.state {
            ApplicationState::ReprintRequested => Some(RevocationCause::Reprinted),
            ApplicationState::QcFailed => Some(RevocationCause::Spoiled),
            _ => None,
        };
        let certs: Vec<_> = credentials
            .off_card
            .iter()
            .flat_map(|k| {
                [
                    k.authentication_certificate.clone(),
                    k.signature_certificate.clone(),
                ]
            })
            .collect();
        let ds_label = credentials.document_signer_label.clone();
        // The custody row records the package object (destroyed after QC like any other);
        // an on-card package wraps nothing under a transport key.
        let transport_key_id = match &credentials.off_card {
            Some(keys) => keys.authentication_key.key_id.clone(),
            None => String::new(),
        };
        let key_origin = credentials.key_origin();
        let object_key = key.clone();
        drop(credentials);
        Ok(Completion::to(ApplicationState::KeysIssued)
            .then(NEXT_STAGE)
            .because(format!("key_origin={key_origin}"))
            .artifact(CREDENTIALS_ARTIFACT, key)
            .with_writes(extra_writes(move |tx| {
                Box::pin(async move {
                    if let Some(cause) = previous_cause {
                        store::revoke_tx(tx, &id, cause, now).await?;
                    }
                    for cert in &certs {
                        store::insert_certificate(tx, &id, cert, &object_key, now).await?;
                    }
                    store::count_ds_usage(tx, &ds_label, now).await?;
                    store::insert_custody(tx, &id, &object_key, &transport_key_id, now).await?;
                    Ok(())
                })
            })))
    }
}
