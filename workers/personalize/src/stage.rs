//! The personalize stage: `keys_issued → personalized`, then `qc`. (A card QC refused comes
//! back through the keys stage with fresh keys, never to this stage with the old ones.)
//!
//! For one application:
//! 1. resolve leftovers of an earlier delivery: a blank still `in_progress` for this
//!    application (a crash after or while writing it) is recorded spoiled ("interrupted");
//! 2. load the credentials package (artifact `credentials`), unwrap both private keys with
//!    the encoder site's transport key, take the fingerprint reference from the enrolled
//!    templates and the transport PINs from configuration, and build the [`CardImage`];
//! 3. per blank: take an encoder from the [`Farm`], insert a blank, read its chip serial,
//!    record the blank `in_progress` (own transaction, before anything is written), run the
//!    script in the SCP03 channel, eject.
//!    - card fault ([`PersoError::spoils_blank`]): the blank is recorded spoiled with the
//!      reason at once (own transaction) and the application goes to a fresh blank;
//!    - encoder fault or reader vanished mid-card: that blank is spoiled ("encoder: ...",
//!      it may be half written) and the job moves to another encoder;
//!    - after `max_blanks` spoiled blanks the job fails [`Permanent`] (parked for an
//!      operator);
//! 4. complete with, in ONE transaction, the state change and the blank's row set to
//!    `personalized` (refused if the row is no longer `in_progress`).
//!
//! Keys born on the chip (an on-card package, `[keys] generation = "on_card"`): step 2 has
//! no key to unwrap; in step 3 the script has the chip generate both key pairs and prove
//! possession, and this stage's [`Certifier`] — the CA of this process, behind the same
//! keystore or PKCS#11 HSM as the keys stage — checks the proofs, issues both certificates
//! and records them (own transaction, before they reach the card) while the encoder goes on
//! writing the LDS. A blank that fails after its certificates were issued has them revoked
//! (`spoiled`, with a CRL) before the next blank; the completion records the certificates
//! written to the card as the artifact `card_certificates` (what QC checks against) and
//! `key_origin=on_card` in the history.
//!
//! Private keys, PINs and the fingerprint reference live in zeroizing buffers and never
//! reach logs, errors or `Debug`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cardpipe_common::domain::{Application, ApplicationState};
use cardpipe_common::records::{self, RecordError};
use cardpipe_common::runtime::{Completion, JobContext, Permanent, Services, Stage};
use cardpipe_pki::citizen::CardKeyRole;
use cardpipe_pki::custody::{self, CardCredentials, KeyOrigin};
use cardpipe_pki::settings::Pki;
use zeroize::Zeroizing;

use cardpipe_card::config::{EncodersConfig, SiteSecrets};
use cardpipe_card::farm::{Farm, Outcome};
use cardpipe_card::script::{self, CardImage, ImportedKeys, PersoError, ScriptOptions};

use crate::certify::StageCertifier;
use cardpipe_pki::custody::{CARD_CERTIFICATES_ARTIFACT, CardCertificates};

/// The stage name.
pub const STAGE_NAME: &str = cardpipe_common::contract::stage_names::PERSONALIZE;
/// The stage after this one.
pub const NEXT_STAGE: &str = cardpipe_common::contract::stage_names::QC;
/// Artifact kind of the keys stage's package.
pub const CREDENTIALS_ARTIFACT: &str = cardpipe_common::contract::CREDENTIALS_ARTIFACT;

const ACCEPTS: &[ApplicationState] = &[ApplicationState::KeysIssued];

/// The personalize stage.
#[derive(Debug)]
pub struct PersonalizeStage {
    farm: Arc<Farm>,
    secrets: Arc<SiteSecrets>,
    script: ScriptOptions,
    max_blanks: u32,
    in_flight: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    blanks: Option<Arc<dyn cardpipe_card::tray::BlankSource>>,
    ca: Option<Arc<Pki>>,
}

/// Marks an application as being handled in this process; removed on drop.
/// Kept until the runner has settled the commit (see [`Completion::holding`]).
struct InFlight(
    Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    String,
);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.1);
    }
}

impl PersonalizeStage {
    /// A stage personalizing on `farm`.
    pub fn new(
        farm: Arc<Farm>,
        secrets: SiteSecrets,
        script: ScriptOptions,
        max_blanks: u32,
    ) -> Self {
        Self {
            farm,
            secrets: Arc::new(secrets),
            script,
            max_blanks: max_blanks.max(1),
            in_flight: Default::default(),
            blanks: None,
            ca: None,
        }
    }

    /// Certifies keys generated on the chip with `pki` (needed for on-card packages).
    pub fn with_ca(mut self, pki: Arc<Pki>) -> Self {
        self.ca = Some(pki);
        self
    }

    /// Takes blanks from `source` (the blank-card stock) instead of numbering them itself.
    pub fn with_blank_source(mut self, source: Arc<dyn cardpipe_card::tray::BlankSource>) -> Self {
        self.blanks = Some(source);
        self
    }

    /// From `[encoders]`: builds the farm, registers its metrics.
    pub fn from_config(
        cfg: &EncodersConfig,
        data_dir: &Path,
        services: &Services,
    ) -> anyhow::Result<Self> {
        let farm = cfg.farm()?;
        farm.register_metrics(&services.metrics);
        if tokio::runtime::Handle::try_current().is_ok() {
            farm.spawn_rescan(
                Duration::from_millis(cfg.rescan_interval_ms.max(100)),
                tokio_util::sync::CancellationToken::new(),
            );
        }
        let secrets = SiteSecrets {
            master: Arc::new(cfg.master_keys()?),
            transport: cfg.transport_key(data_dir)?,
            pins: cfg.pins(),
        };
        Ok(Self::new(farm, secrets, cfg.script(), cfg.max_blanks))
    }

    /// The farm (for the console and the rescan loop).
    pub fn farm(&self) -> &Arc<Farm> {
        &self.farm
    }

    /// The card image, the package (for on-card certification) and its object key.
    async fn image(
        &self,
        services: &Services,
        app: &Application,
    ) -> anyhow::Result<(CardImage, CardCredentials, String)> {
        let key = services
            .store
            .artifact(&app.id, CREDENTIALS_ARTIFACT)
            .await?
            .ok_or_else(|| Permanent("no credentials package recorded".into()))?;
        let bytes = cardpipe_common::contract::load_credentials(services, &app.id, &key)
            .await?
            .ok_or_else(|| Permanent(format!("credentials package {key} missing")))?;
        let mut creds: CardCredentials = serde_json::from_slice(&bytes)
            .map_err(|e| Permanent(format!("credentials package {key} unreadable: {e}")))?;
        drop(bytes);
        if creds.card_ref != app.id.as_str() {
            return Err(Permanent("credentials package is for another application".into()).into());
        }
        // An off-card package must carry the certificates recorded with it: a duplicate
        // delivery of a keys job that lost its commit could have rewritten the object
        // afterwards. (An on-card package has none; its certificates are issued here.)
        let imported = match creds.off_card.take() {
            Some(keys) => {
                let mut serials = vec![
                    keys.authentication_certificate.serial.clone(),
                    keys.signature_certificate.serial.clone(),
                ];
                serials.sort();
                if cardpipe_pki::store::package_serials(&services.store, &key).await? != serials {
                    return Err(Permanent(format!(
                        "credentials package {key} does not carry the certificates recorded for it; reprint"
                    ))
                    .into());
                }
                let unwrap = |w, role| {
                    custody::unwrap(&self.secrets.transport, w, &creds.card_ref, role)
                        .map_err(|e| Permanent(format!("unwrapping a card key: {e}")))
                };
                Some(ImportedKeys {
                    auth_key: unwrap(&keys.authentication_key, CardKeyRole::Authentication)?,
                    sign_key: unwrap(&keys.signature_key, CardKeyRole::Signature)?,
                    auth_cert: keys.authentication_certificate.der.clone(),
                    sign_cert: keys.signature_certificate.der.clone(),
                })
            }
            None => None,
        };
        let biometrics = records::load_biometrics(services, &app.id)
            .await
            .map_err(record_error)?;
        let fingerprint_reference = biometrics
            .fingerprints
            .iter()
            .filter_map(|f| f.template.as_ref())
            .find_map(|t| card_reference_template(t))
            .map(Zeroizing::new)
            .ok_or_else(|| Permanent("no usable ISO/IEC 19794-2 fingerprint template".into()))?;
        drop(biometrics);
        let pins = self.secrets.pins.clone();
        let image = CardImage {
            ef_com: creds.ef_com.clone(),
            dg1: creds.dg1.clone(),
            dg2: creds.dg2.clone(),
            dg3: creds.dg3.clone(),
            dg11: creds.dg11.clone(),
            sod: creds.ef_sod.clone(),
            imported,
            id_pin: pins.id_pin,
            sign_pin: pins.sign_pin,
            puk: pins.puk,
            fingerprint_reference,
        };
        image
            .validate()
            .map_err(|e| Permanent(format!("card image: {e}")))?;
        Ok((image, creds, key))
    }
}

fn record_error(e: RecordError) -> anyhow::Error {
    match e {
        RecordError::Missing { .. } | RecordError::Corrupt(_) => Permanent(e.to_string()).into(),
        other => other.into(),
    }
}

/// Eject, logging a failure (the card is accounted for either way).
async fn eject(lease: &mut cardpipe_card::farm::Lease) {
    match lease.run(|enc| enc.eject()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(encoder = lease.encoder(), error = %e, "eject failed"),
        Err(e) => tracing::warn!(error = %e, "eject failed"),
    }
}

#[async_trait]
impl Stage for PersonalizeStage {
    fn name(&self) -> &'static str {
        STAGE_NAME
    }

    fn accepts(&self) -> &'static [ApplicationState] {
        ACCEPTS
    }

    async fn handle(&self, ctx: &JobContext, app: &Application) -> anyhow::Result<Completion> {
        let services = &ctx.services;
        let store = &services.store;
        let now = || services.clock.now();
        // A second delivery of an application already being personalized here (a duplicate,
        // or a re-queued stranded job) must not spoil the live card as "interrupted": wait
        // for the first to finish - its commit included, as the guard travels in the
        // Completion - then let the retry find the application moved on.
        let key = app.id.as_str().to_owned();
        let mut waited = false;
        let guard = loop {
            if self
                .in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key.clone())
            {
                break InFlight(self.in_flight.clone(), key);
            }
            waited = true;
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let current = store
            .application(&app.id)
            .await?
            .map(|a| (a.state, a.version));
        if waited || current != Some((app.state, app.version)) {
            anyhow::bail!(
                "application {} was handled by another delivery; retrying",
                app.id
            );
        }
        let interrupted =
            cardpipe_card::cards::spoil_in_progress(store, &app.id, "interrupted", now()).await?;
        if interrupted > 0 {
            tracing::warn!(application = %app.id, blanks = interrupted, "blank(s) left in progress by an earlier attempt recorded spoiled");
        }
        let (image, package, package_key) = self.image(services, app).await?;
        let image = Arc::new(image);
        let origin = if image.imported.is_some() {
            KeyOrigin::OffCard
        } else {
            KeyOrigin::OnCard
        };
        let ca = match (origin, &self.ca) {
            (KeyOrigin::OffCard, _) => None,
            (KeyOrigin::OnCard, Some(pki)) => Some(pki.current(services).await?),
            (KeyOrigin::OnCard, None) => anyhow::bail!(
                "an on-card package needs the CA in the personalize process ([keys] generation = \"on_card\"); retrying"
            ),
        };
        let mut encoder_failures = 0u32;
        loop {
            // Certificates issued for a blank that never became this application's card (a
            // failed or interrupted attempt) are revoked before another blank is spent.
            if origin == KeyOrigin::OnCard {
                crate::certify::revoke_unwritten(store, &app.id, &package_key, now()).await?;
            }
            let spoiled = cardpipe_card::cards::counted_spoils(store, &app.id).await?;
            if spoiled >= i64::from(self.max_blanks) {
                return Err(Permanent(format!(
                    "{spoiled} blanks spoiled for this application (budget {}); parked for an operator",
                    self.max_blanks
                ))
                .into());
            }
            let mut lease = self.farm.acquire().await?;
            let encoder = lease.encoder().to_string();
            let blank = match &self.blanks {
                Some(source) => source.take(services, &encoder).await?,
                None => self.farm.next_blank_serial(),
            };
            let inserted = lease
                .run(|enc| {
                    enc.insert()?;
                    script::read_chip_serial(enc)
                })
                .await?;
            let chip = match inserted {
                Ok(chip) => chip.to_string(),
                Err(e) if e.spoils_blank() => {
                    // A blank that left the encoder before anything was written to it (pulled,
                    // jammed, or swapped by the feeder under a stale reader state) is spoiled
                    // for the stock count but is an encoder fault, not the application's: it
                    // does not use up the budget (chaos run: three such in 15 ms after a
                    // restart parked an application).
                    let pulled = matches!(
                        &e,
                        PersoError::Reader(cardpipe_card::reader::ReaderError::RemovedCard(_))
                    );
                    let reason = if pulled {
                        format!("encoder: {e} before writing")
                    } else {
                        e.to_string()
                    };
                    cardpipe_card::cards::insert_spoiled(
                        store,
                        &blank,
                        None,
                        &app.id,
                        &encoder,
                        &reason,
                        now(),
                    )
                    .await?;
                    tracing::warn!(application = %app.id, %encoder, %blank, %reason, "blank spoiled");
                    match &e {
                        PersoError::Reader(r) if pulled => lease.report_reader_error(r),
                        _ => lease.report(Outcome::Spoiled),
                    }
                    eject(&mut lease).await;
                    if pulled {
                        encoder_failures += 1;
                        if encoder_failures > 8 {
                            anyhow::bail!("encoders keep failing: {e}");
                        }
                    }
                    continue;
                }
                Err(e) => {
                    // No blank was taken in (no card, feed or reader problem): try another.
                    if let PersoError::Reader(r) = &e {
                        lease.report_reader_error(r);
                    } else {
                        lease.report(Outcome::EncoderFault);
                    }
                    eject(&mut lease).await;
                    drop(lease);
                    if let Some(source) = &self.blanks {
                        source.put_back(services, &blank, "not fed").await?;
                    }
                    encoder_failures += 1;
                    tracing::warn!(application = %app.id, %encoder, error = %e, "encoder failed before writing");
                    if encoder_failures > 8 {
                        anyhow::bail!("encoders keep failing: {e}");
                    }
                    continue;
                }
            };
            cardpipe_card::cards::insert_in_progress(
                store,
                &blank,
                &chip,
                &app.id,
                &encoder,
                now(),
            )
            .await?;
            let (img, master, opts) = (
                image.clone(),
                self.secrets.master.clone(),
                self.script.clone(),
            );
            let certifier = ca.as_ref().map(|ca| {
                Arc::new(StageCertifier::new(
                    ca.clone(),
                    services.clone(),
                    &app.id,
                    &package,
                    &package_key,
                    now(),
                ))
            });
            let in_script = certifier.clone();
            let result = lease
                .run(move |enc| match &in_script {
                    None => script::personalize(enc, &img, &master, &opts),
                    Some(ca) => {
                        script::personalize_generating_keys(enc, &img, ca.as_ref(), &master, &opts)
                    }
                })
                .await?;
            match result {
                Ok(rec) => {
                    eject(&mut lease).await;
                    // In-process encoders hand the chip over to the output tray for QC.
                    if let Ok(Some(card)) = lease.run(|enc| enc.take_ejected()).await {
                        self.farm.tray().deposit(
                            app.id.as_str(),
                            cardpipe_card::tray::TrayCard {
                                blank_serial: blank.clone(),
                                encoder: encoder.clone(),
                                card,
                            },
                        );
                    }
                    lease.report(Outcome::Personalized);
                    drop(lease);
                    tracing::info!(application = %app.id, %encoder, %blank, chip = %rec.chip_serial, apdus = rec.apdus, elapsed_ms = rec.elapsed.as_millis() as u64, "card personalized");
                    let id = app.id.clone();
                    let at = now();
                    let mut completion = Completion::to(ApplicationState::Personalized)
                        .then(NEXT_STAGE)
                        .holding(guard)
                        .because(format!(
                            "chip {chip} (blank {blank}) on {encoder}; key_origin={origin}"
                        ));
                    if let Some(certifier) = &certifier {
                        let issued = certifier.issued().ok_or_else(|| {
                            anyhow::anyhow!("the card was written without recorded certificates")
                        })?;
                        let record = CardCertificates {
                            key_origin: origin,
                            chip_serial: chip.clone(),
                            blank_serial: blank.clone(),
                            authentication: issued[0].clone(),
                            signature: issued[1].clone(),
                        };
                        let key = format!(
                            "applications/{}/card-certificates-{}.json",
                            app.id, issued[0].serial
                        );
                        services
                            .objects
                            .put(
                                &key,
                                bytes::Bytes::from(serde_json::to_vec_pretty(&record)?),
                            )
                            .await?;
                        completion = completion.artifact(CARD_CERTIFICATES_ARTIFACT, key);
                    }
                    return Ok(completion.with_writes(Box::new(move |tx| {
                        Box::pin(async move {
                            cardpipe_card::cards::mark_personalized(tx, &blank, &id, at).await
                        })
                    })));
                }
                Err(e) => {
                    let card_fault = e.spoils_blank();
                    let reason = if card_fault {
                        e.to_string()
                    } else {
                        format!("encoder: {e}")
                    };
                    cardpipe_card::cards::spoil(store, &blank, &reason, now()).await?;
                    tracing::warn!(application = %app.id, %encoder, %blank, %chip, %reason, "blank spoiled");
                    match &e {
                        PersoError::Certification(_) => {
                            // The CA, not the card or the encoder: the next delivery retries
                            // (with backoff) on a fresh blank.
                            eject(&mut lease).await;
                            return Err(anyhow::anyhow!("{e}; retrying"));
                        }
                        _ if card_fault => lease.report(Outcome::Spoiled),
                        PersoError::Reader(r) => lease.report_reader_error(r),
                        PersoError::Image(_) => {
                            return Err(Permanent(format!("card image: {e}")).into());
                        }
                        _ => lease.report(Outcome::EncoderFault),
                    }
                    eject(&mut lease).await;
                    if !card_fault {
                        encoder_failures += 1;
                        if encoder_failures > 8 {
                            anyhow::bail!("encoders keep failing: {e}");
                        }
                    }
                }
            }
        }
    }
}

/// The match-on-card reference in the card's own format: one ISO/IEC 19794-2:2005 view.
///
/// Intake accepts what dedup accepts (2005 and 2011 records, several views, either reading of
/// 2005 extended data), but the card's applet reads one 2005 view without extended data. The
/// best view (highest quality, then most minutiae) is re-encoded for the card; the record as
/// sent stays in DG3 untouched. `None` when no view can be written in the card's format.
fn card_reference_template(template: &[u8]) -> Option<Vec<u8>> {
    let mut record = cardpipe_biometrics::iso19794_2::parse(template).ok()?;
    let mut best = record
        .views
        .iter()
        .filter(|v| !v.minutiae.is_empty() && v.position <= 10)
        .max_by_key(|v| (v.quality, v.minutiae.len()))?
        .clone();
    if let Some(g) = best.geometry.take() {
        record.width = g.width;
        record.height = g.height;
        record.x_resolution = g.x_resolution;
        record.y_resolution = g.y_resolution;
    }
    // 2011-only impression types (latent, contactless, ...) have no 2005 code; the card does
    // not use the impression type, so such a view is written as "live-scan plain".
    if !matches!(best.impression_type, 0..=3 | 8) {
        best.impression_type = 0;
    }
    best.view_number = 0;
    best.extended_data.clear();
    record.views = vec![best];
    let bytes = record.to_bytes().ok()?;
    cardpipe_card::card_os::bio::parse_iso19794_2(&bytes).map(|_| bytes)
}

#[cfg(test)]
mod card_reference_tests {
    use super::card_reference_template;
    use cardpipe_card::card_os::bio;

    #[test]
    fn a_2005_record_stays_readable_by_the_card() {
        let rec = bio::example_record();
        let converted = card_reference_template(&rec).expect("2005 record converts");
        // Minutiae have no Debug (biometric data is never printed): compare without it.
        assert!(
            bio::parse_iso19794_2(&converted) == bio::parse_iso19794_2(&rec),
            "same minutiae for the card"
        );
    }

    /// Minutiae as (x, y, angle).
    type Minutiae = Vec<(u16, u16, u8)>;

    /// A 2011 record, written field by field (ISO/IEC 19794-2:2011): one representation per
    /// (quality, minutiae).
    fn record_2011(reps: &[(u8, Minutiae)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (number, (quality, minutiae)) in reps.iter().enumerate() {
            let mut rep = vec![0; 4];
            rep.extend_from_slice(&[0x07, 0xEA, 12, 4, 9, 30, 0, 0xFF, 0xFF]); // capture time
            rep.push(14); // capture technology
            rep.extend_from_slice(&[0x12, 0x34, 0x00, 0x07]); // vendor, device type
            rep.push(1); // one quality block
            rep.extend_from_slice(&[*quality, 0x00, 0x0F, 0x00, 0x01]);
            rep.extend_from_slice(&[0, number as u8]); // position unknown, representation no.
            rep.extend_from_slice(&197u16.to_be_bytes());
            rep.extend_from_slice(&197u16.to_be_bytes());
            rep.push(24); // contactless: no 2005 code
            rep.extend_from_slice(&400u16.to_be_bytes());
            rep.extend_from_slice(&500u16.to_be_bytes());
            rep.push(0x61); // 6-byte minutiae
            rep.push(minutiae.len() as u8);
            for &(x, y, angle) in minutiae {
                rep.extend_from_slice(&((1u16 << 14) | x).to_be_bytes());
                rep.extend_from_slice(&y.to_be_bytes());
                rep.extend_from_slice(&[angle, 254]);
            }
            rep.extend_from_slice(&0u16.to_be_bytes());
            let len = rep.len() as u32;
            rep[..4].copy_from_slice(&len.to_be_bytes());
            body.extend_from_slice(&rep);
        }
        let mut out = b"FMR\x00030\x00".to_vec();
        out.extend_from_slice(&((15 + body.len()) as u32).to_be_bytes());
        out.extend_from_slice(&(reps.len() as u16).to_be_bytes());
        out.push(0);
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn a_2011_record_with_two_views_becomes_one_2005_view_for_the_card() {
        let minutiae = |n: u16| -> Minutiae {
            (0..n)
                .map(|i| (40 + 9 * i, 60 + (i * 37) % 380, (i * 23 % 256) as u8))
                .collect()
        };
        let v2011 = record_2011(&[(20, minutiae(14)), (70, minutiae(30))]);
        cardpipe_biometrics::iso19794_2::parse(&v2011).expect("a valid 2011 record");
        assert!(
            bio::parse_iso19794_2(&v2011).is_none(),
            "the card cannot read 2011"
        );
        let converted = card_reference_template(&v2011).expect("2011 record converts");
        let read = bio::parse_iso19794_2(&converted).expect("card reads the conversion");
        assert_eq!(read.len(), 30, "the better-quality view, alone");
    }

    #[test]
    fn garbage_is_no_reference() {
        assert!(card_reference_template(b"not a record").is_none());
    }
}
