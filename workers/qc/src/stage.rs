//! The QC stage: `personalized → qc_passed` (then `shipping`) or `→ qc_failed` (back to
//! `keys`: fresh keys and certificates, then a fresh blank).
//!
//! For one application:
//! 1. the personalized card row (blank serial, chip serial, encoder) and the certificates
//!    issued for the card are loaded — from the credentials package (keys generated off the
//!    card) or from the `card_certificates` artifact personalization recorded (keys generated
//!    on the chip); the CA hierarchy is the keys stage's;
//! 2. the card is brought to a QC station ([`crate::station`]): from the in-process farm's
//!    output tray into an in-process reader (the card body serial must be the recorded blank
//!    serial), or by the machine's line controller into a QC station reader reached through
//!    pcscd (located by its recorded chip serial); [`crate::check::inspect`] runs every check
//!    over plain APDUs, with fresh challenges;
//! 3. a QC report (checks, results, timings) is stored as an object (`qc_report` artifact);
//! 4. ONE transaction (the runner's completion): the state, the `qc_reports` row, and
//!    - passed: the blank `at_encoder → consumed` in stock, and an outbox row
//!      ([`KEY_DESTRUCTION_TOPIC`]) whose sink, the keys stage's, destroys the wrapped private keys;
//!    - failed: the card row `spoiled` with `qc_failed:<reason>` (the stock trigger spoils the
//!      serial), the card's two certificates revoked (`spoiled`) with a CRL publication
//!      requested, its wrapped-key package destroyed (outbox), and either a job for `keys`
//!      (the remake gets fresh keys and certificates on a fresh blank: one chip per private
//!      key) or, once `[qc] max_attempts` cards failed, an outbox row ([`PARK_TOPIC`]) that
//!      parks the application's keys job for an operator.
//!
//! A card the station cannot get (the process restarted and the in-memory tray is gone; the
//! card is not on the line's transport) fails with `card_not_found` and is re-made, never
//! passed unchecked.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use cardpipe_card::cards;
use cardpipe_card::config::TransportPins;
use cardpipe_card::tray::OutputTray;
use cardpipe_common::broker::Job;
use cardpipe_common::clock::to_rfc3339;
use cardpipe_common::contract::{self, KEY_DESTRUCTION_TOPIC};
use cardpipe_common::domain::{Application, ApplicationId, ApplicationState};
use cardpipe_common::runtime::relay::OutboxSink;
use cardpipe_common::runtime::{Completion, JobContext, Permanent, Services, Stage};
use cardpipe_common::store::{OutboxRow, StoreError, StoreTx};
use cardpipe_pki::citizen::IssuedCertificate;
use cardpipe_pki::custody::{
    CARD_CERTIFICATES_ARTIFACT, CardCertificates, CardCredentials, KeyOrigin,
};
use cardpipe_pki::settings::Pki;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::check::{self, CheckResult, Expectations, Reason};
use crate::station::{StationKind, Stations, Ticket};
use crate::stock;

/// The stage name.
pub const STAGE_NAME: &str = cardpipe_common::contract::stage_names::QC;
/// Artifact kind of the QC report.
pub const REPORT_ARTIFACT: &str = "qc_report";
/// Artifact kind of the keys stage's package.
pub const CREDENTIALS_ARTIFACT: &str = cardpipe_common::contract::CREDENTIALS_ARTIFACT;
/// Outbox topic: park the application's next job (the remake's `keys` job) for an operator.
pub const PARK_TOPIC: &str = "qc.park";
/// The configuration section.
pub const SECTION: &str = "qc";

const ACCEPTS: &[ApplicationState] = &[ApplicationState::Personalized];

/// `[qc]` in pipeline.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QcConfig {
    /// Cards of one application QC may refuse before it is parked for an operator.
    pub max_attempts: u32,
    /// The stage a passed card goes to.
    pub next_stage: String,
    /// Where cards are read: the in-process tray or a line's QC stations.
    pub station: StationKind,
    /// The line controller (`station = "line"`).
    pub line_controller: String,
    /// How long a line station waits for pcscd to see a loaded card, ms.
    pub station_timeout_ms: u64,
}

impl Default for QcConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            next_stage: "shipping".into(),
            station: StationKind::Tray,
            line_controller: "127.0.0.1:7431".into(),
            station_timeout_ms: 5000,
        }
    }
}

/// Loads `[qc]`.
pub fn load(loaded: &cardpipe_common::config::LoadedConfig) -> anyhow::Result<QcConfig> {
    let cfg: QcConfig = loaded
        .section(SECTION)
        .map_err(|e| anyhow::anyhow!("{}", cardpipe_common::config::describe(&e)))?;
    if cfg.max_attempts == 0 {
        anyhow::bail!("qc.max_attempts must be at least 1");
    }
    if cfg.next_stage.trim().is_empty() {
        anyhow::bail!("qc.next_stage must name a stage");
    }
    if cfg.station == StationKind::Line && cfg.line_controller.trim().is_empty() {
        anyhow::bail!("qc.line_controller must be host:port when qc.station = \"line\"");
    }
    if cfg.station_timeout_ms == 0 {
        anyhow::bail!("qc.station_timeout_ms must be positive");
    }
    Ok(cfg)
}

/// The QC report artifact (JSON).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QcReport {
    /// Application.
    pub application_id: String,
    /// Card body serial recorded at personalization.
    pub blank_serial: String,
    /// Chip serial recorded at personalization.
    pub recorded_chip_serial: Option<String>,
    /// Chip serial read by QC.
    pub chip_serial: Option<String>,
    /// The encoder that personalized the card.
    pub encoder: String,
    /// The QC station.
    pub station: String,
    /// 1 for the application's first QC'd card, +1 per card refused before.
    pub attempt: u32,
    /// `passed` or `failed`.
    pub outcome: String,
    /// The failure's reason code.
    pub reason: Option<Reason>,
    /// Every check.
    pub checks: Vec<CheckResult>,
    /// When QC started (UTC).
    pub started_at: String,
    /// Wall time of the inspection, ms.
    pub elapsed_ms: u64,
    /// Where the card's two key pairs were generated (`on_card` or `off_card`).
    pub key_origin: KeyOrigin,
    /// A failed card: its certificates (serials), revoked as `spoiled` in the transaction
    /// that spoils it; the remake gets fresh keys and certificates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_certificates: Vec<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QcLabels {
    outcome: &'static str,
    reason: &'static str,
}

/// QC metrics: `cardpipe_qc_cards_total{outcome,reason}`, `cardpipe_qc_inspection_seconds`.
#[derive(Clone, Debug)]
pub struct QcMetrics {
    cards: Family<QcLabels, Counter>,
    seconds: Histogram,
}

impl QcMetrics {
    /// Registers the metrics.
    pub fn register(metrics: &cardpipe_common::telemetry::metrics::Metrics) -> Self {
        let m = Self {
            cards: Family::default(),
            seconds: Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
        };
        let c = m.clone();
        metrics.register(move |r| {
            r.register(
                "qc_cards",
                "Cards checked by QC, by outcome and reason code",
                c.cards,
            );
            r.register(
                "qc_inspection_seconds",
                "Time to inspect one card",
                c.seconds,
            );
        });
        m
    }

    fn observe(&self, reason: Option<Reason>, secs: f64) {
        let labels = QcLabels {
            outcome: if reason.is_some() { "failed" } else { "passed" },
            reason: reason.map_or("none", Reason::as_str),
        };
        self.cards.get_or_create(&labels).inc();
        self.seconds.observe(secs);
    }
}

/// The QC stage.
pub struct QcStage {
    stations: Stations,
    pki: Arc<Pki>,
    pins: TransportPins,
    config: QcConfig,
    metrics: QcMetrics,
    next_declared: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for QcStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QcStage")
            .field("stations", &self.stations)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl QcStage {
    /// A QC stage taking cards from `tray` (see [`Self::with_stations`] for a line).
    pub fn new(
        tray: Arc<OutputTray>,
        pki: Arc<Pki>,
        pins: TransportPins,
        config: QcConfig,
        services: &Services,
    ) -> Self {
        Self {
            stations: Stations::Tray(tray),
            pki,
            pins,
            config,
            metrics: QcMetrics::register(&services.metrics),
            next_declared: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Reads cards at other stations (the QC readers of a machine's line).
    pub fn with_stations(mut self, stations: Stations) -> Self {
        self.stations = stations;
        self
    }

    /// The in-process broker refuses jobs for a queue nobody declared, and a refused job row
    /// would hold back every later job of the application in the outbox. When no stage of
    /// this process consumes the next stage (shipping is not built yet), declare its queue so
    /// the jobs wait there for it. RabbitMQ deployments declare queues from their definitions.
    async fn declare_next(&self, services: &Services) -> anyhow::Result<()> {
        use std::sync::atomic::Ordering;
        if services.broker.kind() != "memory" || self.next_declared.load(Ordering::Relaxed) {
            return Ok(());
        }
        if services
            .broker
            .depth(&self.config.next_stage)
            .await
            .is_err()
        {
            services
                .broker
                .declare_stage(
                    &self.config.next_stage,
                    &cardpipe_common::broker::RetryPolicy::default(),
                )
                .await?;
            tracing::info!(stage = %self.config.next_stage, "declared the queue of the stage after QC (no consumer in this process yet)");
        }
        self.next_declared.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The certificates issued for the card (authentication, signature): the package's
    /// (off-card keys) or those personalization recorded for the chip's own keys.
    async fn issued_certificates(
        &self,
        services: &Services,
        app: &Application,
        creds: CardCredentials,
    ) -> anyhow::Result<[IssuedCertificate; 2]> {
        if let Some(keys) = creds.off_card {
            return Ok([keys.authentication_certificate, keys.signature_certificate]);
        }
        let key = services
            .store
            .artifact(&app.id, CARD_CERTIFICATES_ARTIFACT)
            .await?
            .ok_or_else(|| {
                Permanent("no certificates recorded for the card's on-chip keys".into())
            })?;
        let bytes = services
            .objects
            .get(&key)
            .await?
            .ok_or_else(|| Permanent(format!("card certificates {key} missing")))?;
        let written: CardCertificates = serde_json::from_slice(&bytes)
            .map_err(|e| Permanent(format!("card certificates {key} unreadable: {e}")))?;
        Ok([written.authentication, written.signature])
    }

    async fn credentials(
        &self,
        services: &Services,
        app: &Application,
    ) -> anyhow::Result<(String, CardCredentials)> {
        let key = services
            .store
            .artifact(&app.id, CREDENTIALS_ARTIFACT)
            .await?
            .ok_or_else(|| Permanent("no credentials package recorded".into()))?;
        let bytes = cardpipe_common::contract::load_credentials(services, &app.id, &key)
            .await?
            .ok_or_else(|| Permanent(format!("credentials package {key} missing")))?;
        let creds: CardCredentials = serde_json::from_slice(&bytes)
            .map_err(|e| Permanent(format!("credentials package {key} unreadable: {e}")))?;
        drop(bytes);
        if creds.card_ref != app.id.as_str() {
            return Err(Permanent("credentials package is for another application".into()).into());
        }
        Ok((key, creds))
    }
}

/// QC failures recorded for an application so far.
pub async fn failures(services: &Services, app: &ApplicationId) -> Result<i64, StoreError> {
    let row = sqlx::query(
        "SELECT COUNT(*) AS n FROM qc_reports WHERE application_id = $1 AND outcome = 'failed'",
    )
    .bind(app.as_str())
    .fetch_one(services.store.pool())
    .await?;
    Ok(row.try_get("n")?)
}

#[async_trait]
impl Stage for QcStage {
    fn name(&self) -> &'static str {
        STAGE_NAME
    }

    fn accepts(&self) -> &'static [ApplicationState] {
        ACCEPTS
    }

    async fn handle(&self, ctx: &JobContext, app: &Application) -> anyhow::Result<Completion> {
        let services = &ctx.services;
        self.declare_next(services).await?;
        let started_at = services.clock.now();
        let rows = cards::for_application(&services.store, &app.id).await?;
        let card = rows
            .iter()
            .rev()
            .find(|r| r.state == "personalized")
            .cloned()
            .ok_or_else(|| Permanent("no personalized card recorded for the application".into()))?;
        let (package_key, creds) = self.credentials(services, app).await?;
        let ca = self.pki.current(services).await?;
        let previous = failures(services, &app.id).await?;
        let attempt = u32::try_from(previous)
            .unwrap_or(u32::MAX)
            .saturating_add(1);

        let clock = Instant::now();
        let ticket = Ticket {
            application_id: app.id.to_string(),
            blank_serial: card.blank_serial.clone(),
            chip_serial: card.chip_serial.clone(),
        };
        let hierarchy = ca.hierarchy.clone();
        let key_origin = creds.key_origin();
        let [issued_auth, issued_sign] = self.issued_certificates(services, app, creds).await?;
        let (auth, sign) = (issued_auth.der.clone(), issued_sign.der.clone());
        let pins = self.pins.clone();
        let recorded = card.chip_serial.clone();
        let stations = self.stations.clone();
        let inspected = tokio::task::spawn_blocking(move || {
            stations.inspect(
                &ticket,
                Box::new(move |channel| {
                    check::inspect(
                        channel,
                        &Expectations {
                            chip_serial: recorded.as_deref(),
                            auth_cert: &auth,
                            sign_cert: &sign,
                            hierarchy: &hierarchy,
                            id_pin: &pins.id_pin,
                            sign_pin: &pins.sign_pin,
                        },
                    )
                }),
            )
        })
        .await?;
        // No station could take the card: it was not read, so it is not spoiled; the job is
        // retried with backoff (and parked for an operator once its attempts are spent).
        let (inspection, station) = inspected.map_err(|e| anyhow::anyhow!("{e}; retrying"))?;
        let elapsed = clock.elapsed();
        let verdict = inspection.verdict();
        self.metrics.observe(verdict, elapsed.as_secs_f64());

        let report = QcReport {
            application_id: app.id.to_string(),
            blank_serial: card.blank_serial.clone(),
            recorded_chip_serial: card.chip_serial.clone(),
            chip_serial: inspection.chip_serial.clone(),
            encoder: card.encoder.clone(),
            station,
            attempt,
            outcome: if verdict.is_some() {
                "failed"
            } else {
                "passed"
            }
            .into(),
            reason: verdict,
            checks: inspection.checks.clone(),
            started_at: to_rfc3339(started_at),
            elapsed_ms: elapsed.as_millis() as u64,
            key_origin,
            revoked_certificates: if verdict.is_some() {
                vec![issued_auth.serial.clone(), issued_sign.serial.clone()]
            } else {
                Vec::new()
            },
        };
        let report_id = uuid::Uuid::now_v7().to_string();
        let key = format!("applications/{}/qc-{report_id}.json", app.id);
        services
            .objects
            .put(&key, Bytes::from(serde_json::to_vec_pretty(&report)?))
            .await?;

        let id = app.id.clone();
        let blank = card.blank_serial.clone();
        let chip = inspection.chip_serial.clone();
        let at = services.clock.now();
        let row = QcRow {
            id: report_id,
            application_id: app.id.to_string(),
            blank_serial: blank.clone(),
            chip_serial: chip.clone(),
            outcome: report.outcome.clone(),
            reason: verdict.map(|r| r.as_str().to_owned()),
            object_key: key.clone(),
            elapsed_ms: report.elapsed_ms as i64,
            checked_at: to_rfc3339(at),
        };

        match verdict {
            None => {
                tracing::info!(application = %app.id, blank = %card.blank_serial, elapsed_ms = report.elapsed_ms, "card passed QC");
                let payload = contract::key_destruction_payload(&app.id);
                Ok(Completion::to(ApplicationState::QcPassed)
                    .then(self.config.next_stage.clone())
                    .artifact(REPORT_ARTIFACT, key)
                    .announce(KEY_DESTRUCTION_TOPIC, payload)
                    .because(format!(
                        "QC passed: chip {} (blank {})",
                        chip.unwrap_or_default(),
                        card.blank_serial
                    ))
                    .with_writes(Box::new(move |tx| {
                        Box::pin(async move {
                            insert_qc_row(tx, &row).await?;
                            stock::move_serial(
                                tx,
                                &blank,
                                &["at_encoder"],
                                "consumed",
                                "stage:qc",
                                Some("qc_passed"),
                                None,
                                at,
                            )
                            .await?;
                            Ok(())
                        })
                    })))
            }
            Some(reason) => {
                let failed = previous + 1;
                let exhausted = failed >= i64::from(self.config.max_attempts);
                let detail = inspection
                    .first_failure()
                    .map(|c| c.detail.clone())
                    .unwrap_or_default();
                tracing::warn!(application = %app.id, blank = %card.blank_serial, %reason, failed, exhausted, "card failed QC");
                let spoil = format!("qc_failed:{}", reason.as_str());
                let serials = report.revoked_certificates.clone();
                let mut completion = Completion::to(ApplicationState::QcFailed)
                    .artifact(REPORT_ARTIFACT, key)
                    .announce(
                        KEY_DESTRUCTION_TOPIC,
                        contract::package_destruction_payload(&app.id, &package_key),
                    )
                    .because(format!(
                        "QC failed ({reason}): {detail}; the card's certificates {} revoked \
                         (spoiled), the remake gets fresh keys",
                        serials.join(", ")
                    ));
                if exhausted {
                    let park = ParkRequest {
                        job_id: uuid::Uuid::now_v7().to_string(),
                        stage: cardpipe_common::contract::stage_names::KEYS.to_owned(),
                        application_id: app.id.to_string(),
                        error: format!(
                            "{failed} cards refused by QC (budget {}; last: {reason}); parked for an operator",
                            self.config.max_attempts
                        ),
                    };
                    completion = completion.announce(PARK_TOPIC, serde_json::to_string(&park)?);
                } else {
                    completion = completion.then(cardpipe_common::contract::stage_names::KEYS);
                }
                Ok(completion.with_writes(Box::new(move |tx| {
                    Box::pin(async move {
                        insert_qc_row(tx, &row).await?;
                        let r = sqlx::query(
                            "UPDATE cards SET state = 'spoiled', spoil_reason = $1, updated_at = $2
                             WHERE blank_serial = $3 AND application_id = $4 AND state = 'personalized'",
                        )
                        .bind(&spoil)
                        .bind(to_rfc3339(at))
                        .bind(&blank)
                        .bind(id.as_str())
                        .execute(&mut **tx)
                        .await?;
                        if r.rows_affected() != 1 {
                            return Err(StoreError::Corrupt {
                                table: "cards",
                                column: "state",
                                message: format!("blank {blank} is no longer personalized"),
                            });
                        }
                        // One chip per private key: the spoiled card's certificates die
                        // with it, and relying parties learn it from a fresh CRL.
                        cardpipe_pki::store::revoke_serials_tx(
                            tx,
                            &id,
                            &serials,
                            contract::RevocationCause::Spoiled,
                            at,
                        )
                        .await?;
                        contract::request_crl_publication(tx, Vec::new(), at).await?;
                        Ok(())
                    })
                })))
            }
        }
    }
}

/// One `qc_reports` row.
#[derive(Debug, Clone)]
struct QcRow {
    id: String,
    application_id: String,
    blank_serial: String,
    chip_serial: Option<String>,
    outcome: String,
    reason: Option<String>,
    object_key: String,
    elapsed_ms: i64,
    checked_at: String,
}

async fn insert_qc_row(tx: &mut StoreTx, r: &QcRow) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO qc_reports (id, application_id, blank_serial, chip_serial, outcome, reason, object_key, elapsed_ms, checked_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&r.id)
    .bind(&r.application_id)
    .bind(&r.blank_serial)
    .bind(&r.chip_serial)
    .bind(&r.outcome)
    .bind(&r.reason)
    .bind(&r.object_key)
    .bind(r.elapsed_ms)
    .bind(&r.checked_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Payload of [`PARK_TOPIC`] rows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ParkRequest {
    /// The parked job's id (stable across redeliveries of the row).
    pub job_id: String,
    /// The stage it is parked in.
    pub stage: String,
    /// The application.
    pub application_id: String,
    /// Why.
    pub error: String,
}

/// Parks an application's job for an operator (broker parking queue + `parked_jobs`);
/// idempotent by job id.
#[derive(Debug)]
pub struct ParkSink {
    services: Services,
}

impl ParkSink {
    /// A sink on `services`.
    pub fn new(services: Services) -> Self {
        Self { services }
    }
}

#[async_trait]
impl OutboxSink for ParkSink {
    async fn deliver(&self, row: &OutboxRow) -> anyhow::Result<()> {
        let req: ParkRequest = serde_json::from_str(&row.payload)
            .map_err(|e| anyhow::anyhow!("outbox row {} is not a park request: {e}", row.id))?;
        let already = cardpipe_common::runtime::parked::list(&self.services, Some(&req.stage))
            .await?
            .iter()
            .any(|p| p.job_id == req.job_id);
        if already {
            return Ok(());
        }
        let job = Job {
            id: req.job_id.clone(),
            stage: req.stage.clone(),
            subject: req.application_id.clone(),
            attempt: 1,
            last_error: Some(req.error.clone()),
            priority: false,
        };
        self.services.broker.publish_parked(&job).await?;
        cardpipe_common::runtime::parked::record(&self.services, &job, self.services.clock.now())
            .await?;
        tracing::warn!(application = %req.application_id, stage = %req.stage, "application parked for an operator after repeated QC failures");
        Ok(())
    }
}
