//! The MOSIP ABIS API: cardpipe's matcher as the ABIS of a MOSIP deployment.
//!
//! MOSIP's registration processor drives an ABIS with six JSON messages (ABIS API
//! specification 0.9, messages version 1.1): `mosip.abis.insert`, `identify`, `delete`,
//! `ping`, `pendingJobs`, `referenceCount`. `cardpipe abis serve` answers them
//!
//! * over a queue pair — MOSIP's ActiveMQ queues mapped to two durable RabbitMQ queues
//!   ([`queue`]): requests consumed from `[abis.queue] inbound` one at a time in order
//!   (an identify sees every insert queued before it), each answer published (persistent,
//!   confirmed) to `outbound` before the request is acknowledged;
//! * and over HTTP ([`http`]): `POST /abis/v1/request` with the same message, the answer
//!   in the body (HTTP 200 for functional failures too, as MOSIP's services answer), bearer
//!   token of an `[[abis.clients]]` entry.
//!
//! Tour: [`message`] parses requests (each defect gets the spec's failure reason) and writes
//! responses; [`cbeff`] takes the ISO/IEC 19794-2 finger records out of the CBEFF XML a
//! `referenceURL` serves; [`datashare`] fetches it with MOSIP's AuthN token; this module
//! applies a request to the gallery ([`crate::abis::BuiltinAbis`], MOSIP's reference ids
//! only) and persists it (`abis_references`, `abis_requests`); [`config`] is `[abis]`.
//!
//! Durability: an insert is answered only after its sealed records are committed, with the
//! answer, in one transaction; a delete likewise. The gallery is rebuilt from
//! `abis_references` at start, so a crash between the commit and the in-memory change loses
//! nothing. A redelivered request (same `requestId`, same operation and reference id) gets
//! the recorded answer; the same `requestId` for anything else is refused (failure 4).
//! Transient failures (internal error, data share unreachable) are not recorded: the retry
//! runs again. One `cardpipe abis serve` process holds the gallery (a lease in the store
//! refuses a second one).
//!
//! Privacy: logs and errors carry request and reference ids and failure reasons, never
//! biometric data or the data share URL (it may carry a share token).

pub mod cbeff;
pub mod config;
pub mod datashare;
pub mod http;
pub mod message;
pub mod queue;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use cardpipe_biometrics::matcher::{Gallery, IdentifyOptions, PositionedTemplate, TenPrint};
use cardpipe_common::clock::to_rfc3339;
use cardpipe_common::runtime::Services;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use sqlx::Row;

use crate::abis::{Abis, AbisError, BuiltinAbis, SearchProbe};
use crate::stage::{decode_templates, encode_templates};
use config::AbisConfig;
use datashare::DatashareClient;
use message::{CandidateOut, Failure, FailureReason, Operation, Outcome, Request};

/// Lease name held by the one serving process.
pub const LEASE: &str = "abis-mosip-gallery";

fn templates_context(reference_id: &str) -> String {
    format!("abis-templates:{reference_id}")
}

/// The MOSIP ABIS service: gallery, persistence, data share.
pub struct MosipAbis {
    services: Services,
    config: AbisConfig,
    abis: BuiltinAbis,
    datashare: DatashareClient,
    /// Inserts and deletes one at a time (the persisted and the in-memory gallery change
    /// together); searches run alongside.
    writes: tokio::sync::Mutex<()>,
    /// Inserts, identifies and deletes being worked on, for `pendingJobs`.
    pending: AtomicU64,
    metrics: AbisMetrics,
}

impl std::fmt::Debug for MosipAbis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MosipAbis").finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct RequestLabels {
    operation: &'static str,
    /// `success` or the failure reason code.
    outcome: String,
}

struct AbisMetrics {
    requests: Family<RequestLabels, Counter>,
    references: Gauge,
}

impl MosipAbis {
    /// Loads the gallery from `abis_references` and registers the metrics.
    pub async fn start(services: Services, config: AbisConfig) -> anyhow::Result<Arc<Self>> {
        let datashare = DatashareClient::new(config.datashare.clone())?;
        let mut gallery = Gallery::new();
        let rows = sqlx::query("SELECT reference_id, sealed_templates FROM abis_references")
            .fetch_all(services.store.pool())
            .await
            .context("reading abis_references")?;
        for row in rows {
            let id: String = row.try_get("reference_id")?;
            let sealed: Vec<u8> = row.try_get("sealed_templates")?;
            let opened = services
                .sealer
                .open(&templates_context(&id), &sealed)
                .with_context(|| format!("opening the templates of reference id {id}"))?;
            let stored = decode_templates(&opened).with_context(|| {
                format!("the stored templates of reference id {id} are corrupt")
            })?;
            let tenprint = stored
                .tenprint()
                .with_context(|| format!("the stored templates of reference id {id}"))?;
            gallery.insert(&id, &tenprint);
        }
        let loaded = gallery.len();
        let abis = BuiltinAbis::new(gallery, IdentifyOptions::default());
        let metrics = AbisMetrics {
            requests: Family::default(),
            references: Gauge::default(),
        };
        metrics.references.set(loaded as i64);
        services.metrics.register(|r| {
            r.register(
                "abis_requests",
                "MOSIP ABIS API requests answered, by operation and outcome (success or the \
                 MOSIP failure reason code)",
                metrics.requests.clone(),
            );
            r.register(
                "abis_references",
                "Reference ids in the MOSIP ABIS gallery",
                metrics.references.clone(),
            );
        });
        tracing::info!(references = loaded, "MOSIP ABIS gallery loaded");
        Ok(Arc::new(MosipAbis {
            services,
            config,
            abis,
            datashare,
            writes: tokio::sync::Mutex::new(()),
            pending: AtomicU64::new(0),
            metrics,
        }))
    }

    /// Reference ids in the gallery.
    pub fn reference_count(&self) -> u64 {
        self.abis.reference_count().unwrap_or(0)
    }

    /// Answers one request message (JSON bytes) with the response message.
    pub async fn handle(&self, body: &[u8]) -> serde_json::Value {
        let request = match message::parse(body) {
            Ok(r) => r,
            Err(refused) => {
                tracing::warn!(
                    request_id = %refused.request_id,
                    failure_reason = refused.failure.reason.code(),
                    detail = %refused.failure.detail,
                    "MOSIP ABIS request refused"
                );
                self.count("invalid", &Outcome::Failed(refused.failure.clone()));
                return message::response(
                    &refused.id,
                    &refused.request_id,
                    &Outcome::Failed(refused.failure),
                    self.services.clock.now(),
                );
            }
        };
        let outcome = match self.apply(&request).await {
            Ok(outcome) => outcome,
            Err(failure) => Outcome::Failed(failure),
        };
        match &outcome {
            Outcome::Failed(f) => tracing::warn!(
                operation = request.operation.name(),
                request_id = %request.request_id,
                reference_id = request.reference_id.as_deref().unwrap_or(""),
                failure_reason = f.reason.code(),
                detail = %f.detail,
                "MOSIP ABIS request failed"
            ),
            _ => tracing::info!(
                operation = request.operation.name(),
                request_id = %request.request_id,
                reference_id = request.reference_id.as_deref().unwrap_or(""),
                "MOSIP ABIS request answered"
            ),
        }
        self.count(request.operation.name(), &outcome);
        self.metrics.references.set(self.reference_count() as i64);
        message::response(
            &request.id,
            &request.request_id,
            &outcome,
            self.services.clock.now(),
        )
    }

    fn count(&self, operation: &'static str, outcome: &Outcome) {
        let outcome = match outcome {
            Outcome::Failed(f) => f.reason.code().to_string(),
            _ => "success".to_owned(),
        };
        self.metrics
            .requests
            .get_or_create(&RequestLabels { operation, outcome })
            .inc();
    }

    async fn apply(&self, request: &Request) -> Result<Outcome, Failure> {
        match request.operation {
            Operation::Ping => self
                .abis
                .ping()
                .map(|()| Outcome::Done)
                .map_err(|e| abis_failure(&e)),
            Operation::PendingJobs => Ok(Outcome::JobsCount(
                self.pending.load(Ordering::Relaxed) as usize
            )),
            Operation::ReferenceCount => Ok(Outcome::Count(self.reference_count())),
            Operation::Insert | Operation::Identify | Operation::Delete => {
                let _pending = Pending::begin(&self.pending);
                if let Some(recorded) = self.recall(request).await? {
                    return Ok(recorded);
                }
                let outcome = match request.operation {
                    Operation::Insert => self.insert(request).await,
                    Operation::Identify => self.identify(request).await,
                    _ => self.delete(request).await,
                };
                match outcome {
                    Err(f) if f.reason.is_transient() => Err(f),
                    Err(f) => {
                        let failed = Outcome::Failed(f);
                        self.record_only(request, &failed).await?;
                        Ok(failed)
                    }
                    Ok(done) => Ok(done),
                }
            }
        }
    }

    /// The recorded answer of this request id, if any (a redelivery).
    async fn recall(&self, request: &Request) -> Result<Option<Outcome>, Failure> {
        let row = sqlx::query(
            "SELECT operation, reference_id, response FROM abis_requests WHERE request_id = $1",
        )
        .bind(&request.request_id)
        .fetch_optional(self.services.store.pool())
        .await
        .map_err(store_failure)?;
        let Some(row) = row else { return Ok(None) };
        let operation: String = row.try_get("operation").map_err(store_failure)?;
        let reference_id: String = row.try_get("reference_id").map_err(store_failure)?;
        if operation != request.operation.name()
            || reference_id != request.reference_id.as_deref().unwrap_or("")
        {
            return Err(Failure::new(
                FailureReason::InvalidRequestStructure,
                format!(
                    "requestId {} was already used for another request ({operation} of {reference_id:?})",
                    request.request_id
                ),
            ));
        }
        let response: String = row.try_get("response").map_err(store_failure)?;
        let value: serde_json::Value = serde_json::from_str(&response).map_err(|_| {
            Failure::new(FailureReason::InternalError, "a recorded answer is corrupt")
        })?;
        Ok(Some(recorded_outcome(&value)))
    }

    async fn record_in(
        &self,
        tx: &mut cardpipe_common::store::StoreTx,
        request: &Request,
        outcome: &Outcome,
    ) -> Result<(), Failure> {
        let now = self.services.clock.now();
        let response = message::response(&request.id, &request.request_id, outcome, now);
        sqlx::query(
            "INSERT INTO abis_requests (request_id, operation, reference_id, response, answered_at)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (request_id) DO NOTHING",
        )
        .bind(&request.request_id)
        .bind(request.operation.name())
        .bind(request.reference_id.as_deref().unwrap_or(""))
        .bind(response.to_string())
        .bind(to_rfc3339(now))
        .execute(&mut **tx)
        .await
        .map_err(store_failure)?;
        Ok(())
    }

    async fn record_only(&self, request: &Request, outcome: &Outcome) -> Result<(), Failure> {
        let mut tx = self.services.store.begin().await.map_err(store_failure)?;
        self.record_in(&mut tx, request, outcome).await?;
        tx.commit().await.map_err(store_failure)
    }

    /// The finger records behind a `referenceURL`, and their ten-print.
    async fn fetch_tenprint(
        &self,
        url: &str,
    ) -> Result<(TenPrint, Vec<PositionedTemplate>), Failure> {
        let xml = self
            .datashare
            .fetch(url)
            .await
            .map_err(|e| Failure::new(e.reason(), e.to_string()))?;
        let (templates, skipped) = cbeff::finger_templates(&xml).map_err(|e| {
            let reason = match e {
                cbeff::CbeffError::NoFingerData => FailureReason::CbeffHasNoData,
                _ => FailureReason::InvalidCbeffFormat,
            };
            Failure::new(reason, e.to_string())
        })?;
        if skipped != cbeff::Skipped::default() {
            tracing::debug!(
                finger_images = skipped.finger_images,
                other_modalities = skipped.other_modalities,
                exception_fingers = skipped.empty,
                "CBEFF BIRs not matched"
            );
        }
        let (tenprint, _views) =
            TenPrint::from_templates(&templates).map_err(|e| abis_failure(&AbisError::from(e)))?;
        Ok((tenprint, templates))
    }

    async fn insert(&self, request: &Request) -> Result<Outcome, Failure> {
        let reference_id = request.reference_id.as_deref().expect("checked by parse");
        if self
            .abis
            .contains(reference_id)
            .map_err(|e| abis_failure(&e))?
        {
            return Err(exists(reference_id));
        }
        let url = request.reference_url.as_deref().expect("checked by parse");
        let (tenprint, templates) = self.fetch_tenprint(url).await?;
        let sealed = self.services.sealer.seal(
            &templates_context(reference_id),
            &encode_templates(&templates),
        );
        let _write = self.writes.lock().await;
        let mut tx = self.services.store.begin().await.map_err(store_failure)?;
        let inserted = sqlx::query(
            "INSERT INTO abis_references (reference_id, sealed_templates, inserted_at)
             VALUES ($1, $2, $3) ON CONFLICT (reference_id) DO NOTHING",
        )
        .bind(reference_id)
        .bind(sealed)
        .bind(to_rfc3339(self.services.clock.now()))
        .execute(&mut *tx)
        .await
        .map_err(store_failure)?
        .rows_affected();
        if inserted == 0 {
            drop(tx);
            return Err(exists(reference_id));
        }
        self.record_in(&mut tx, request, &Outcome::Done).await?;
        tx.commit().await.map_err(store_failure)?;
        self.abis
            .enrol(reference_id, &tenprint)
            .map_err(|e| abis_failure(&e))?;
        Ok(Outcome::Done)
    }

    async fn identify(&self, request: &Request) -> Result<Outcome, Failure> {
        let fresh;
        let probe = match (&request.reference_id, &request.reference_url) {
            (Some(id), _) => SearchProbe::Enrolled(id),
            (None, Some(url)) => {
                fresh = self.fetch_tenprint(url).await?.0;
                SearchProbe::Fresh(&fresh)
            }
            (None, None) => unreachable!("checked by parse"),
        };
        let found = self
            .abis
            .search(
                probe,
                request.gallery.as_deref(),
                request.max_results.unwrap_or(self.config.max_results),
                Some(request.target_fpir.unwrap_or(self.config.target_fpir)),
            )
            .map_err(|e| abis_failure(&e))?;
        let outcome = Outcome::Candidates(
            found
                .into_iter()
                .map(|c| CandidateOut {
                    reference_id: c.reference_id,
                    score: c.scores.score,
                    fmr: c.scores.fmr,
                    fingers: c.scores.fingers.iter().flatten().count(),
                })
                .collect(),
        );
        self.record_only(request, &outcome).await?;
        Ok(outcome)
    }

    async fn delete(&self, request: &Request) -> Result<Outcome, Failure> {
        let reference_id = request.reference_id.as_deref().expect("checked by parse");
        let _write = self.writes.lock().await;
        let mut tx = self.services.store.begin().await.map_err(store_failure)?;
        let deleted = sqlx::query("DELETE FROM abis_references WHERE reference_id = $1")
            .bind(reference_id)
            .execute(&mut *tx)
            .await
            .map_err(store_failure)?
            .rows_affected();
        if deleted == 0 {
            drop(tx);
            return Err(not_found(reference_id));
        }
        self.record_in(&mut tx, request, &Outcome::Done).await?;
        tx.commit().await.map_err(store_failure)?;
        self.abis
            .remove(reference_id)
            .map_err(|e| abis_failure(&e))?;
        Ok(Outcome::Done)
    }
}

/// Counts a request as pending while it lives.
struct Pending<'a>(&'a AtomicU64);
impl<'a> Pending<'a> {
    fn begin(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Pending(counter)
    }
}
impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn exists(reference_id: &str) -> Failure {
    Failure::new(
        FailureReason::ReferenceIdExists,
        format!("referenceId {reference_id} is already in the ABIS"),
    )
}

fn not_found(reference_id: &str) -> Failure {
    Failure::new(
        FailureReason::ReferenceIdNotFound,
        format!("referenceId {reference_id} is not in the ABIS"),
    )
}

fn abis_failure(e: &AbisError) -> Failure {
    let reason = match e {
        AbisError::UnknownReference(_) => FailureReason::ReferenceIdNotFound,
        AbisError::InvalidId { .. } | AbisError::RequestIdConflict(_) => {
            FailureReason::InvalidRequestStructure
        }
        AbisError::BadBiometrics(cardpipe_biometrics::matcher::TenPrintError::Empty) => {
            FailureReason::QualityCheckFailed
        }
        AbisError::BadBiometrics(_) => FailureReason::InvalidCbeffFormat,
        AbisError::Internal(_) => FailureReason::InternalError,
    };
    Failure::new(reason, e.to_string())
}

fn store_failure(e: impl std::fmt::Display) -> Failure {
    tracing::error!(error = %e, "MOSIP ABIS: store error");
    Failure::new(FailureReason::InternalError, "store error")
}

/// The outcome a recorded response stands for.
fn recorded_outcome(v: &serde_json::Value) -> Outcome {
    let text = |field: &str| v.get(field).and_then(|x| x.as_str()).unwrap_or("");
    if text("returnValue") == "2" {
        let code: u8 = text("failureReason").parse().unwrap_or(1);
        let reason = ALL_REASONS
            .into_iter()
            .find(|r| r.code() == code)
            .unwrap_or(FailureReason::InternalError);
        return Outcome::Failed(Failure::new(reason, "recorded answer"));
    }
    match v.get("candidateList") {
        Some(list) => Outcome::Candidates(
            list.get("candidates")
                .and_then(|c| c.as_array())
                .map(|cs| {
                    cs.iter()
                        .map(|c| {
                            let a = &c["analytics"];
                            let num = |k: &str| {
                                a.get(k)
                                    .and_then(|x| x.as_str())
                                    .and_then(|s| s.parse::<f64>().ok())
                                    .unwrap_or(0.0)
                            };
                            CandidateOut {
                                reference_id: c["referenceId"].as_str().unwrap_or("").to_owned(),
                                score: num("internalScore"),
                                fmr: num("fmr"),
                                fingers: num("fingersCompared") as usize,
                            }
                        })
                        .collect()
                })
                .unwrap_or_default(),
        ),
        None => Outcome::Done,
    }
}

const ALL_REASONS: [FailureReason; 18] = [
    FailureReason::InternalError,
    FailureReason::Aborted,
    FailureReason::UnexpectedError,
    FailureReason::InvalidRequestStructure,
    FailureReason::MissingReferenceId,
    FailureReason::MissingRequestId,
    FailureReason::UnableToFetchBiometrics,
    FailureReason::MissingReferenceUrl,
    FailureReason::MissingRequesttime,
    FailureReason::ReferenceIdExists,
    FailureReason::CbeffHasNoData,
    FailureReason::ReferenceIdNotFound,
    FailureReason::InvalidVersion,
    FailureReason::InvalidId,
    FailureReason::InvalidRequesttime,
    FailureReason::InvalidCbeffFormat,
    FailureReason::DataShareExpired,
    FailureReason::QualityCheckFailed,
];
