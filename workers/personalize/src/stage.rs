//! The personalize stage: `keys_issued | qc_failed → personalized`, then `qc`.
//!
//! For one application:
//! 1. resolve leftovers of an earlier delivery: a blank still `in_progress` for this
//!    application (a crash after or while writing it) is recorded spoiled ("interrupted");
//!    for `qc_failed`, the personalized card QC refused is recorded spoiled ("qc_failed");
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
//! Private keys, PINs and the fingerprint reference live in zeroizing buffers and never
//! reach logs, errors or `Debug`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cardpipe_common::clock::to_rfc3339;
use cardpipe_common::domain::{Application, ApplicationId, ApplicationState};
use cardpipe_common::records::{self, RecordError};
use cardpipe_common::runtime::{Completion, JobContext, Permanent, Services, Stage};
use cardpipe_common::store::{Store, StoreError, StoreTx};
use cardpipe_pki::citizen::CardKeyRole;
use cardpipe_pki::custody::{self, CardCredentials, TransportKey};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sqlx::Row;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use cardpipe_card::card_os::Faults;
use cardpipe_card::farm::{Farm, FarmSettings, InProcessSource, Outcome, PcscSource};
use cardpipe_card::reader::BlankStock;
use cardpipe_card::scp03::MasterKeys;
use cardpipe_card::script::{self, CardImage, PersoError, ScriptOptions};

/// The stage name.
pub const STAGE_NAME: &str = "personalize";
/// The stage after this one.
pub const NEXT_STAGE: &str = "qc";
/// Artifact kind of the keys stage's package.
pub const CREDENTIALS_ARTIFACT: &str = "credentials";
/// The configuration section.
pub const SECTION: &str = "encoders";

const ACCEPTS: &[ApplicationState] = &[ApplicationState::KeysIssued, ApplicationState::QcFailed];

/// Which encoders the farm drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EncoderKind {
    /// The card OS in this process (embedded mode).
    #[default]
    InProcess,
    /// PC/SC readers through pcscd.
    Pcsc,
}

/// `[encoders]` in pipeline.toml.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EncodersConfig {
    /// `in_process` or `pcsc`.
    pub kind: EncoderKind,
    /// In-process encoders to create.
    pub count: usize,
    /// Simulated encode time per card (slow EEPROM), ms; 0 = as fast as the CPU.
    pub encode_time_ms: u64,
    /// In-process blanks: share with a dead chip.
    pub dead_rate: f64,
    /// In-process blanks: share pulled out mid-write.
    pub tear_rate: f64,
    /// In-process blanks: per-write failure probability.
    pub write_failure_rate: f64,
    /// SCP03 master keys enc ‖ mac ‖ dek, hex (3 × 16, 24 or 32 bytes); empty = the
    /// simulator's test keys.
    pub master_keys_hex: SecretString,
    /// Transport key id (must match `[pki] transport_key_id`).
    pub transport_key_id: String,
    /// Transport key, 64 hex digits; empty = `data_dir/pki-transport-<id>.key`.
    pub transport_key_hex: SecretString,
    /// Transport ID PIN.
    pub transport_id_pin: SecretString,
    /// Transport signature PIN.
    pub transport_sign_pin: SecretString,
    /// Transport PUK.
    pub transport_puk: SecretString,
    /// Spoiled blanks per application before it is parked.
    pub max_blanks: u32,
    /// Failures in a row that take an encoder out of service.
    pub max_consecutive_failures: u32,
    /// Reader re-scan period, ms.
    pub rescan_interval_ms: u64,
    /// How long a job waits for a free encoder, ms.
    pub acquire_timeout_ms: u64,
    /// How long a PC/SC insert waits for a card, ms.
    pub insert_timeout_ms: u64,
    /// Extended length APDUs (4 KiB chunks) instead of short ones.
    pub extended_length: bool,
    /// PC/SC readers that are not encoders: names starting with any of these are skipped
    /// (the QC stations of `cardpipe encoders simulate --qc-stations`).
    pub skip_readers: Vec<String>,
}

impl Default for EncodersConfig {
    fn default() -> Self {
        Self {
            kind: EncoderKind::InProcess,
            count: 4,
            encode_time_ms: 0,
            dead_rate: 0.0,
            tear_rate: 0.0,
            write_failure_rate: 0.0,
            master_keys_hex: SecretString::from(""),
            transport_key_id: "encoder-site-01".into(),
            transport_key_hex: SecretString::from(""),
            transport_id_pin: SecretString::from("123456"),
            transport_sign_pin: SecretString::from("654321"),
            transport_puk: SecretString::from("12345678"),
            max_blanks: 3,
            max_consecutive_failures: 5,
            rescan_interval_ms: 2000,
            acquire_timeout_ms: 30_000,
            insert_timeout_ms: 5000,
            extended_length: true,
            skip_readers: vec!["QC Station".into()],
        }
    }
}

impl std::fmt::Debug for EncodersConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncodersConfig")
            .field("kind", &self.kind)
            .field("count", &self.count)
            .field("encode_time_ms", &self.encode_time_ms)
            .field("transport_key_id", &self.transport_key_id)
            .field("max_blanks", &self.max_blanks)
            .finish_non_exhaustive()
    }
}

impl EncodersConfig {
    /// The SCP03 master keys.
    pub fn master_keys(&self) -> anyhow::Result<MasterKeys> {
        let hex_keys = self.master_keys_hex.expose_secret().trim();
        if hex_keys.is_empty() {
            return Ok(MasterKeys::test_keys());
        }
        let raw = Zeroizing::new(
            hex::decode(hex_keys)
                .map_err(|_| anyhow::anyhow!("encoders.master_keys_hex is not hex"))?,
        );
        let n = raw.len() / 3;
        if raw.len() % 3 != 0 || ![16, 24, 32].contains(&n) {
            anyhow::bail!("encoders.master_keys_hex must be 3 × 16, 24 or 32 bytes");
        }
        MasterKeys::new(&raw[..n], &raw[n..2 * n], &raw[2 * n..])
            .map_err(|e| anyhow::anyhow!("encoders.master_keys_hex: {e}"))
    }

    /// The transport key (from the config, or the embedded-mode file shared with `[pki]`).
    pub fn transport_key(&self, data_dir: &Path) -> anyhow::Result<TransportKey> {
        let pki = cardpipe_pki::settings::PkiConfig {
            transport_key_id: self.transport_key_id.clone(),
            transport_key_hex: self.transport_key_hex.clone(),
            ..Default::default()
        };
        pki.transport_key(data_dir)
    }

    /// The transport PINs.
    pub fn pins(&self) -> TransportPins {
        let z = |s: &SecretString| Zeroizing::new(s.expose_secret().as_bytes().to_vec());
        TransportPins {
            id_pin: z(&self.transport_id_pin),
            sign_pin: z(&self.transport_sign_pin),
            puk: z(&self.transport_puk),
        }
    }

    /// Script options.
    pub fn script(&self) -> ScriptOptions {
        if self.extended_length {
            ScriptOptions::extended()
        } else {
            ScriptOptions::default()
        }
    }

    /// Farm settings.
    pub fn farm_settings(&self) -> FarmSettings {
        FarmSettings {
            max_consecutive_failures: self.max_consecutive_failures.max(1),
            acquire_timeout: Duration::from_millis(self.acquire_timeout_ms),
        }
    }

    /// The blank stock of in-process encoders: fault rates and the slow-EEPROM latency
    /// (encode time spread over the APDUs of a typical card).
    pub fn blank_stock(&self, master: &MasterKeys) -> Arc<BlankStock> {
        let latency = if self.encode_time_ms == 0 {
            Duration::ZERO
        } else {
            let apdus = cardpipe_card::bench::apdus_per_card(
                &script::sample_image(20_000, 0),
                master,
                &self.script(),
            )
            .map(|(a, _)| a.max(1))
            .unwrap_or(60);
            Duration::from_millis(self.encode_time_ms) / apdus as u32
        };
        let (dead, tear, wfr) = (self.dead_rate, self.tear_rate, self.write_failure_rate);
        let seed: u64 = rand::random();
        Arc::new(BlankStock::new(master.clone(), rand::random(), move |n| {
            let u = |salt: u64| unit(seed ^ salt, n);
            Faults {
                dead: u(1) < dead,
                write_failure_rate: wfr,
                seed: seed ^ u64::from(n),
                tear_at_write: (u(2) < tear).then_some(3 + (u(3) * 8.0) as u32),
                apdu_latency: latency,
            }
        }))
    }

    /// Builds the farm this configuration describes.
    pub fn farm(&self) -> anyhow::Result<Arc<Farm>> {
        Ok(match self.kind {
            EncoderKind::InProcess => {
                let stock = self.blank_stock(&self.master_keys()?);
                Farm::new(
                    Box::new(InProcessSource::new(self.count.max(1), stock)),
                    self.farm_settings(),
                )
            }
            EncoderKind::Pcsc => {
                // pcsc-lite is loaded at run time: a machine without it refuses here, with
                // what to install, rather than logging failed reader scans forever.
                cardpipe_card::pcsc::library()
                    .map_err(|e| anyhow::anyhow!("[encoders] kind = \"pcsc\": {e}"))?;
                Farm::new(
                    Box::new(PcscSource {
                        insert_timeout: Duration::from_millis(self.insert_timeout_ms),
                        skip_readers: self.skip_readers.clone(),
                    }),
                    self.farm_settings(),
                )
            }
        })
    }
}

/// A deterministic value in [0, 1) for blank `n`.
fn unit(seed: u64, n: u32) -> f64 {
    let mut x = seed ^ (u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    x = x.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    x ^= x >> 33;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// The transport PINs written to every card. `Debug` is redacted.
#[derive(Clone)]
pub struct TransportPins {
    /// ID PIN.
    pub id_pin: Zeroizing<Vec<u8>>,
    /// Signature PIN.
    pub sign_pin: Zeroizing<Vec<u8>>,
    /// PUK.
    pub puk: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for TransportPins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TransportPins(redacted)")
    }
}

/// The secrets of an encoder site. `Debug` shows the transport key id only.
pub struct SiteSecrets {
    /// SCP03 master keys.
    pub master: Arc<MasterKeys>,
    /// The transport key that unwraps the citizen keys.
    pub transport: TransportKey,
    /// Transport PINs.
    pub pins: TransportPins,
}

impl std::fmt::Debug for SiteSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteSecrets")
            .field("transport_key_id", &self.transport.key_id())
            .finish_non_exhaustive()
    }
}

/// The personalize stage.
#[derive(Debug)]
pub struct PersonalizeStage {
    farm: Arc<Farm>,
    secrets: Arc<SiteSecrets>,
    script: ScriptOptions,
    max_blanks: u32,
    in_flight: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    blanks: Option<Arc<dyn cardpipe_card::tray::BlankSource>>,
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
        }
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

    async fn image(&self, services: &Services, app: &Application) -> anyhow::Result<CardImage> {
        let key = services
            .store
            .artifact(&app.id, CREDENTIALS_ARTIFACT)
            .await?
            .ok_or_else(|| Permanent("no credentials package recorded".into()))?;
        let bytes = services
            .objects
            .get(&key)
            .await?
            .ok_or_else(|| Permanent(format!("credentials package {key} missing")))?;
        let creds: CardCredentials = serde_json::from_slice(&bytes)
            .map_err(|e| Permanent(format!("credentials package {key} unreadable: {e}")))?;
        if creds.card_ref != app.id.as_str() {
            return Err(Permanent("credentials package is for another application".into()).into());
        }
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
        let unwrap = |w, role| {
            custody::unwrap(&self.secrets.transport, w, &creds.card_ref, role)
                .map_err(|e| Permanent(format!("unwrapping a card key: {e}")))
        };
        let auth_key = unwrap(&creds.authentication_key, CardKeyRole::Authentication)?;
        let sign_key = unwrap(&creds.signature_key, CardKeyRole::Signature)?;
        let pins = self.secrets.pins.clone();
        let image = CardImage {
            ef_com: creds.ef_com.clone(),
            dg1: creds.dg1.clone(),
            dg2: creds.dg2.clone(),
            dg3: creds.dg3.clone(),
            dg11: creds.dg11.clone(),
            sod: creds.ef_sod.clone(),
            auth_key,
            sign_key,
            auth_cert: creds.authentication_certificate.der.clone(),
            sign_cert: creds.signature_certificate.der.clone(),
            id_pin: pins.id_pin,
            sign_pin: pins.sign_pin,
            puk: pins.puk,
            fingerprint_reference,
        };
        image
            .validate()
            .map_err(|e| Permanent(format!("card image: {e}")))?;
        Ok(image)
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
        let interrupted = cards::spoil_in_progress(store, &app.id, "interrupted", now()).await?;
        if interrupted > 0 {
            tracing::warn!(application = %app.id, blanks = interrupted, "blank(s) left in progress by an earlier attempt recorded spoiled");
        }
        if app.state == ApplicationState::QcFailed {
            cards::spoil_personalized(store, &app.id, "qc_failed", now()).await?;
        }
        let image = Arc::new(self.image(services, app).await?);
        let mut encoder_failures = 0u32;
        loop {
            let spoiled = cards::counted_spoils(store, &app.id).await?;
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
                    cards::insert_spoiled(
                        store,
                        &blank,
                        None,
                        &app.id,
                        &encoder,
                        &e.to_string(),
                        now(),
                    )
                    .await?;
                    tracing::warn!(application = %app.id, %encoder, %blank, reason = %e, "blank spoiled");
                    lease.report(Outcome::Spoiled);
                    eject(&mut lease).await;
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
            cards::insert_in_progress(store, &blank, &chip, &app.id, &encoder, now()).await?;
            let (img, master, opts) = (
                image.clone(),
                self.secrets.master.clone(),
                self.script.clone(),
            );
            let result = lease
                .run(move |enc| script::personalize(enc, &img, &master, &opts))
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
                    return Ok(Completion::to(ApplicationState::Personalized)
                        .then(NEXT_STAGE)
                        .holding(guard)
                        .because(format!("chip {chip} (blank {blank}) on {encoder}"))
                        .with_writes(Box::new(move |tx| {
                            Box::pin(
                                async move { cards::mark_personalized(tx, &blank, &id, at).await },
                            )
                        })));
                }
                Err(e) => {
                    let card_fault = e.spoils_blank();
                    let reason = if card_fault {
                        e.to_string()
                    } else {
                        format!("encoder: {e}")
                    };
                    cards::spoil(store, &blank, &reason, now()).await?;
                    tracing::warn!(application = %app.id, %encoder, %blank, %chip, %reason, "blank spoiled");
                    match &e {
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

/// The `cards` table (migrations `0005_cards.sql`).
pub mod cards {
    use super::*;

    /// One row of `cards`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct CardRow {
        /// Blank card body serial.
        pub blank_serial: String,
        /// Chip serial (CPLC), when the chip answered.
        pub chip_serial: Option<String>,
        /// Application.
        pub application_id: String,
        /// Encoder.
        pub encoder: String,
        /// in_progress | personalized | spoiled | ...
        pub state: String,
        /// Why it was spoiled.
        pub spoil_reason: Option<String>,
        /// 1 for the application's first blank, +1 for each further one.
        pub attempt: i64,
    }

    async fn next_attempt(store: &Store, app: &ApplicationId) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM cards WHERE application_id = $1")
            .bind(app.as_str())
            .fetch_one(store.pool())
            .await?;
        Ok(row.try_get::<i64, _>("n")? + 1)
    }

    #[allow(clippy::too_many_arguments)]
    async fn insert(
        store: &Store,
        blank: &str,
        chip: Option<&str>,
        app: &ApplicationId,
        encoder: &str,
        state: &str,
        reason: Option<&str>,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let attempt = next_attempt(store, app).await?;
        let mut tx = store.begin().await?;
        sqlx::query(
            "INSERT INTO cards (blank_serial, chip_serial, application_id, encoder, state, spoil_reason, attempt, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
        )
        .bind(blank)
        .bind(chip)
        .bind(app.as_str())
        .bind(encoder)
        .bind(state)
        .bind(reason)
        .bind(attempt)
        .bind(to_rfc3339(at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records a blank before anything is written to it. Fails (unique index) when the
    /// application already has a blank in progress or a personalized card.
    pub async fn insert_in_progress(
        store: &Store,
        blank: &str,
        chip: &str,
        app: &ApplicationId,
        encoder: &str,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        insert(
            store,
            blank,
            Some(chip),
            app,
            encoder,
            "in_progress",
            None,
            at,
        )
        .await
    }

    /// Records a blank spoiled before it was in progress (dead chip).
    pub async fn insert_spoiled(
        store: &Store,
        blank: &str,
        chip: Option<&str>,
        app: &ApplicationId,
        encoder: &str,
        reason: &str,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        insert(
            store,
            blank,
            chip,
            app,
            encoder,
            "spoiled",
            Some(reason),
            at,
        )
        .await
    }

    /// Spoils one blank that is in progress.
    pub async fn spoil(
        store: &Store,
        blank: &str,
        reason: &str,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE cards SET state = 'spoiled', spoil_reason = $2, updated_at = $3
             WHERE blank_serial = $1 AND state = 'in_progress'",
        )
        .bind(blank)
        .bind(reason)
        .bind(to_rfc3339(at))
        .execute(store.pool())
        .await?;
        Ok(())
    }

    async fn spoil_where(
        store: &Store,
        app: &ApplicationId,
        state: &str,
        reason: &str,
        at: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        let r = sqlx::query(
            "UPDATE cards SET state = 'spoiled', spoil_reason = $3, updated_at = $4
             WHERE application_id = $1 AND state = $2",
        )
        .bind(app.as_str())
        .bind(state)
        .bind(reason)
        .bind(to_rfc3339(at))
        .execute(store.pool())
        .await?;
        Ok(r.rows_affected())
    }

    /// Spoils every blank of the application still in progress (a crash left it).
    pub async fn spoil_in_progress(
        store: &Store,
        app: &ApplicationId,
        reason: &str,
        at: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        spoil_where(store, app, "in_progress", reason, at).await
    }

    /// Spoils the application's personalized card (QC refused it).
    pub async fn spoil_personalized(
        store: &Store,
        app: &ApplicationId,
        reason: &str,
        at: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        spoil_where(store, app, "personalized", reason, at).await
    }

    /// Spoiled blanks that count against the application's budget (card faults and
    /// interruptions; not encoder faults or QC refusals: `qc_failed` or `qc_failed:<reason>`,
    /// which QC bounds itself).
    pub async fn counted_spoils(store: &Store, app: &ApplicationId) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM cards WHERE application_id = $1 AND state = 'spoiled'
             AND spoil_reason NOT LIKE 'encoder:%' AND spoil_reason NOT LIKE 'qc_failed%'",
        )
        .bind(app.as_str())
        .fetch_one(store.pool())
        .await?;
        row.try_get("n").map_err(Into::into)
    }

    /// In the completion transaction: the blank becomes the application's card. Refused
    /// (the whole completion rolls back) unless it is still in progress for `app`.
    pub async fn mark_personalized(
        tx: &mut StoreTx,
        blank: &str,
        app: &ApplicationId,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let r = sqlx::query(
            "UPDATE cards SET state = 'personalized', updated_at = $3
             WHERE blank_serial = $1 AND application_id = $2 AND state = 'in_progress'",
        )
        .bind(blank)
        .bind(app.as_str())
        .bind(to_rfc3339(at))
        .execute(&mut **tx)
        .await?;
        if r.rows_affected() != 1 {
            return Err(StoreError::Corrupt {
                table: "cards",
                column: "state",
                message: format!("blank {blank} is no longer in progress"),
            });
        }
        Ok(())
    }

    /// Every card row of an application, oldest first.
    pub async fn for_application(
        store: &Store,
        app: &ApplicationId,
    ) -> Result<Vec<CardRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT blank_serial, chip_serial, application_id, encoder, state, spoil_reason, attempt
             FROM cards WHERE application_id = $1 ORDER BY attempt",
        )
        .bind(app.as_str())
        .fetch_all(store.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(CardRow {
                    blank_serial: r.try_get("blank_serial")?,
                    chip_serial: r.try_get("chip_serial")?,
                    application_id: r.try_get("application_id")?,
                    encoder: r.try_get("encoder")?,
                    state: r.try_get("state")?,
                    spoil_reason: r.try_get("spoil_reason")?,
                    attempt: r.try_get("attempt")?,
                })
            })
            .collect()
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
