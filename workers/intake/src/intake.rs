//! Batch intake: the NDJSON body is read line by line (never whole), each
//! record validated, and records committed in chunks — one transaction per
//! chunk holding the applications, their sealed records, flags, per-line
//! outcomes and callbacks. The idempotency key names the batch: a
//! resubmission of a finished batch returns its stored report and reads
//! nothing; a resubmission of an interrupted one reads again every line not yet
//! recorded (a chunk's acceptances and rejections commit together), so each line ends
//! accepted or rejected exactly once whatever failed when.

use std::collections::{HashMap, HashSet};

use bytes::{Buf, Bytes, BytesMut};
use cardpipe_common::clock::to_rfc3339;
use cardpipe_common::domain::applicant::{ApplicantRecord, Biometrics};
use cardpipe_common::domain::{ApplicationId, ApplicationState, Priority};
use cardpipe_common::records;
use cardpipe_common::runtime::Services;
use cardpipe_common::store::{NewApplication, Store, StoreError};
use futures::{Stream, StreamExt};
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use sqlx::Row;
use time::{OffsetDateTime, UtcOffset};
use tokio_util::codec::{Decoder, FramedRead};
use tokio_util::io::StreamReader;

use crate::validate::{self, ArtifactRef, FieldError, Flag, PrintRef};
use cardpipe_registry::callbacks::{CallbackEvent, enqueue_callback};
use cardpipe_registry::config::RegistryConfig;

/// Asia/Tehran (UTC+03:30, no daylight saving since 2022).
pub const TEHRAN: UtcOffset = match UtcOffset::from_hms(3, 30, 0) {
    Ok(o) => o,
    Err(_) => panic!("valid offset"),
};

/// Most error and flag rows a batch report lists inline (the rest are paged
/// through the records endpoint).
pub const REPORT_LIMIT: i64 = 10_000;

/// Intake failures (the request fails; committed chunks stay, a resubmission resumes).
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// Store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Record storage failure.
    #[error(transparent)]
    Records(#[from] records::RecordError),
    /// Reading the body failed.
    #[error("reading the batch body: {0}")]
    Body(std::io::Error),
    /// Another request is receiving the same batch right now.
    #[error("this batch is being received by another request")]
    Busy,
    /// Bad request.
    #[error("{0}")]
    BadRequest(String),
    /// Not found.
    #[error("{0} not found")]
    NotFound(String),
    /// Not allowed in the current state.
    #[error("{0}")]
    Conflict(String),
    /// The Idempotency-Key names a batch that was received with other lines: nothing of this
    /// body is recorded.
    #[error(
        "this Idempotency-Key was used for batch {batch_id} with a different body ({detail}); a new batch needs a new key"
    )]
    KeyReused {
        /// The earlier batch.
        batch_id: String,
        /// Where the bodies differ.
        detail: String,
    },
    /// The submission is past a bound of `[registry.intake]` (body bytes, records): what
    /// was committed before stays; the registry splits the batch.
    #[error("{message}")]
    TooLarge {
        /// Which bound: `body_too_large` or `too_many_records` (a metric label).
        reason: &'static str,
        /// The batch, closed with the lines received before the bound.
        batch_id: String,
        /// What was refused and what was kept.
        message: String,
    },
}

/// The body stream passed `max_body_bytes` (carried through the line reader's I/O error).
#[derive(Debug, thiserror::Error)]
#[error("the batch body is larger than {0} bytes (registry.intake.max_body_bytes)")]
struct BodyTooLarge(u64);

impl From<sqlx::Error> for IntakeError {
    fn from(e: sqlx::Error) -> Self {
        IntakeError::Store(StoreError::Database(e))
    }
}

/// One error of one record, as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RecordError {
    /// NDJSON line (1-based).
    pub line: i64,
    /// The registry's application id, when readable.
    pub application_id: Option<String>,
    /// Field.
    pub field: String,
    /// Rule broken.
    pub reason: String,
}

/// One flag of one accepted record, as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RecordFlag {
    /// NDJSON line.
    pub line: i64,
    /// The registry's application id.
    pub application_id: Option<String>,
    /// Flag kind.
    pub flag: String,
    /// Field.
    pub field: String,
    /// Why.
    pub reason: String,
}

/// A batch and its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct BatchReport {
    /// cardpipe's batch id.
    pub batch_id: String,
    /// Registry client that submitted it.
    pub client: String,
    /// Its idempotency key.
    pub idempotency_key: String,
    /// `receiving`, `received`, `scheduled`, `released`, `cancelled`.
    pub state: String,
    /// `normal` or `urgent`.
    pub priority: String,
    /// Release time, when scheduled.
    pub release_at: Option<String>,
    /// Submission time.
    pub created_at: String,
    /// When the whole body was received.
    pub received_at: Option<String>,
    /// When the last application was released.
    pub released_at: Option<String>,
    /// Records (lines) received.
    pub records: i64,
    /// Accepted.
    pub accepted: i64,
    /// Rejected.
    pub rejected: i64,
    /// Accepted but flagged (overcharge).
    pub flagged: i64,
    /// Every problem of every rejected record (first [`REPORT_LIMIT`]).
    pub errors: Vec<RecordError>,
    /// Every flag of every accepted record (first [`REPORT_LIMIT`]).
    pub flags: Vec<RecordFlag>,
    /// More errors or flags than listed: page through the records endpoint.
    pub truncated: bool,
}

/// One line's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RecordOutcome {
    /// NDJSON line.
    pub line: i64,
    /// The registry's application id, when readable.
    pub application_id: Option<String>,
    /// cardpipe's id of the application created.
    pub cardpipe_id: Option<String>,
    /// `accepted` or `rejected`.
    pub outcome: String,
    /// Problems (rejected).
    pub errors: Vec<FieldError>,
    /// Flags (accepted).
    pub flags: Vec<Flag>,
}

/// Result of a submission.
#[derive(Debug, Clone)]
pub struct Submission {
    /// The report.
    pub report: BatchReport,
    /// True when the batch had already been received (nothing was read or created).
    pub replayed: bool,
}

/// One item of the NDJSON line splitter ([`Lines`]).
#[derive(Debug, PartialEq, Eq)]
pub enum LineItem {
    /// A line without its `\n` (and without a `\r` before it).
    Line(BytesMut),
    /// A line longer than the limit, skipped.
    TooLong,
}

/// Splits NDJSON into lines of at most `max` bytes; a longer line becomes
/// [`LineItem::TooLong`] and is skipped without being buffered.
///
/// Public for the fuzz targets (`fuzz/fuzz_targets/ndjson_lines.rs`); intake uses it only
/// inside [`submit_batch`].
#[derive(Debug)]
pub struct Lines {
    max: usize,
    scanned: usize,
    discarding: bool,
}

impl Lines {
    /// A splitter for lines of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            scanned: 0,
            discarding: false,
        }
    }
}

impl Decoder for Lines {
    type Item = LineItem;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<LineItem>, std::io::Error> {
        if let Some(pos) = buf[self.scanned..].iter().position(|&b| b == b'\n') {
            let end = self.scanned + pos;
            self.scanned = 0;
            // Over the limit whether or not its end arrived in the same read.
            if self.discarding || end > self.max {
                buf.advance(end + 1);
                self.discarding = false;
                return Ok(Some(LineItem::TooLong));
            }
            let mut line = buf.split_to(end + 1);
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.truncate(end - 1);
            }
            return Ok(Some(LineItem::Line(line)));
        }
        if self.discarding || buf.len() > self.max {
            self.discarding = true;
            buf.clear();
            self.scanned = 0;
        } else {
            self.scanned = buf.len();
        }
        Ok(None)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<LineItem>, std::io::Error> {
        if let Some(item) = self.decode(buf)? {
            return Ok(Some(item));
        }
        self.scanned = 0;
        if self.discarding {
            self.discarding = false;
            return Ok(Some(LineItem::TooLong));
        }
        if buf.is_empty() {
            return Ok(None);
        }
        Ok(Some(LineItem::Line(buf.split())))
    }
}

/// Today's date in Tehran.
pub fn tehran_today(now: OffsetDateTime) -> time::Date {
    now.to_offset(TEHRAN).date()
}

struct Accepted {
    line: i64,
    id: ApplicationId,
    record: ApplicantRecord,
    biometrics: Biometrics,
    priority: Priority,
    flags: Vec<Flag>,
}

struct Rejected {
    line: i64,
    registry_id: Option<String>,
    errors: Vec<FieldError>,
    /// Send a `rejected` callback (validation failures; not refusals of a
    /// record that duplicates one in flight).
    notify: bool,
}

enum Outcome {
    Accepted(Box<Accepted>),
    Rejected(Rejected),
}

async fn fetch_artifact(
    services: &Services,
    cfg: &RegistryConfig,
    r: ArtifactRef,
    field: &str,
    max_bytes: u64,
    errors: &mut Vec<FieldError>,
) -> Option<Vec<u8>> {
    match r {
        ArtifactRef::Inline(b) => Some(b),
        ArtifactRef::Key(key) => {
            if !key.starts_with(&cfg.artifact_prefix) || key.contains("..") {
                errors.push(FieldError::new(
                    field,
                    format!(
                        "object key must start with {:?} (the registry's upload area)",
                        cfg.artifact_prefix
                    ),
                ));
                return None;
            }
            match services.objects.get_bounded(&key, max_bytes).await {
                Ok(Some(b)) => Some(b.to_vec()),
                Err(cardpipe_common::objects::ObjectError::TooLarge { max, .. }) => {
                    errors.push(FieldError::new(
                        field,
                        format!("object is larger than {max} bytes"),
                    ));
                    None
                }
                Ok(None) => {
                    errors.push(FieldError::new(
                        field,
                        "object key not found in the object store",
                    ));
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading a registry artifact failed");
                    errors.push(FieldError::new(
                        field,
                        "object store unavailable while reading the artifact; resubmit the batch",
                    ));
                    None
                }
            }
        }
    }
}

/// Validates one line completely (fields, then artifact bytes).
async fn validate_line(
    services: &Services,
    cfg: &RegistryConfig,
    today: time::Date,
    line: i64,
    bytes: &[u8],
) -> Outcome {
    let value: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => {
            return Outcome::Rejected(Rejected {
                line,
                registry_id: None,
                errors: vec![FieldError::new(
                    "(record)",
                    format!("not valid JSON (column {})", e.column()),
                )],
                notify: false,
            });
        }
    };
    let mut checked = validate::check_fields(&value, cfg, today);
    drop(value);
    let mut errors = std::mem::take(&mut checked.errors);
    let photo = match checked.photo.take() {
        Some(r) => {
            let max = cfg.photo_max_bytes as u64;
            fetch_artifact(services, cfg, r, "photo", max, &mut errors).await
        }
        None => None,
    };
    let prints = match checked.prints.take() {
        Some(list) => {
            let mut out = Vec::with_capacity(10);
            let mut ok = true;
            for (i, p) in list.into_iter().enumerate() {
                let pos = (i + 1) as u8;
                match p {
                    PrintRef::Missing(reason) => out.push((pos, None, Some(reason))),
                    PrintRef::Template(r) => {
                        let field = format!("fingerprints.position_{pos}.template");
                        let max = cfg.intake.template_max_bytes;
                        match fetch_artifact(services, cfg, r, &field, max, &mut errors).await {
                            Some(b) => out.push((pos, Some(b), None)),
                            None => ok = false,
                        }
                    }
                }
            }
            ok.then_some(out)
        }
        None => None,
    };
    let (biometrics, mut artifact_errors) = validate::check_artifacts(photo, prints, cfg);
    errors.append(&mut artifact_errors);
    match (checked.record, biometrics) {
        (Some(record), Some(biometrics)) if errors.is_empty() => {
            Outcome::Accepted(Box::new(Accepted {
                line,
                id: ApplicationId::generate(),
                record,
                biometrics,
                priority: checked.priority,
                flags: checked.flags,
            }))
        }
        _ => Outcome::Rejected(Rejected {
            line,
            registry_id: checked.registry_id,
            errors,
            notify: true,
        }),
    }
}

/// Refuses records whose application id, national code or tracking code is
/// already in flight (in the store, or earlier in this chunk).
async fn refuse_in_flight(
    services: &Services,
    outcomes: Vec<Outcome>,
) -> Result<Vec<Outcome>, IntakeError> {
    let mut seen_ids: HashMap<String, i64> = HashMap::new();
    let mut seen_codes: HashMap<String, i64> = HashMap::new();
    let mut seen_tracking: HashMap<String, i64> = HashMap::new();
    let mut out = Vec::with_capacity(outcomes.len());
    for o in outcomes {
        let Outcome::Accepted(mut a) = o else {
            out.push(o);
            continue;
        };
        let mut errors = Vec::new();
        let mut after_voided_card = false;
        let rid = &a.record.registry_id;
        if let Some(line) = seen_ids.get(rid) {
            errors.push(FieldError::new(
                "application_id",
                format!("same application id as line {line} of this batch"),
            ));
        } else if let Some(app) = services.store.application_by_registry_id(rid).await? {
            errors.push(FieldError::new(
                "application_id",
                if app.state.is_final() {
                    "already used by a finished application; the registry must issue a new id"
                } else {
                    "an application with this id is already in flight"
                },
            ));
        }
        if let Some(line) = seen_codes.get(&a.record.national_code) {
            errors.push(FieldError::new(
                "national_code",
                format!("same national code as line {line} of this batch"),
            ));
        } else {
            for id in
                records::find_by_national_code(services, &a.record.national_code, None).await?
            {
                let Some(app) = services.store.application(&id).await? else {
                    continue;
                };
                if app.state == ApplicationState::Voided {
                    after_voided_card = true;
                }
                if !app.state.is_final() {
                    errors.push(FieldError::new(
                        "national_code",
                        "an application for this national code is already in flight",
                    ));
                    break;
                }
            }
        }
        if let Some(line) = seen_tracking.get(&a.record.tracking_code) {
            errors.push(FieldError::new(
                "tracking_code",
                format!("same tracking code as line {line} of this batch"),
            ));
        } else if records::find_by_tracking_code(services, &a.record.tracking_code)
            .await?
            .is_some()
        {
            errors.push(FieldError::new(
                "tracking_code",
                "already used by another application",
            ));
        }
        if after_voided_card {
            // The issuance fee doubles after a voided card: the fee flags follow that rule.
            a.flags.retain(|f| !f.field.starts_with("fees"));
            a.flags.extend(validate::fee_flags(&a.record.fees, true));
        }
        if errors.is_empty() {
            seen_ids.insert(rid.clone(), a.line);
            seen_codes.insert(a.record.national_code.clone(), a.line);
            seen_tracking.insert(a.record.tracking_code.clone(), a.line);
            out.push(Outcome::Accepted(a));
        } else {
            out.push(Outcome::Rejected(Rejected {
                line: a.line,
                registry_id: Some(a.record.registry_id.clone()),
                errors,
                notify: false,
            }));
        }
    }
    Ok(out)
}

struct BatchCtx<'a> {
    services: &'a Services,
    cfg: &'a RegistryConfig,
    batch_id: &'a str,
    client: &'a str,
}

/// Validates and records one chunk: its valid lines as applications, its invalid ones and
/// `too_long` (lines over the size limit) as rejections — all in ONE transaction, so a
/// failed commit leaves none of them recorded and a resubmission reads them all again.
async fn commit_chunk(
    ctx: &BatchCtx<'_>,
    lines: Vec<(i64, BytesMut)>,
    too_long: Vec<i64>,
) -> Result<(), IntakeError> {
    let services = ctx.services;
    let today = tehran_today(services.clock.now());
    let mut outcomes = Vec::with_capacity(lines.len());
    for (line, bytes) in lines {
        outcomes.push(validate_line(services, ctx.cfg, today, line, &bytes).await);
    }
    let outcomes = refuse_in_flight(services, outcomes).await?;
    // Biometrics go to the object store (sealed) before the transaction that
    // records their keys; a crash in between leaves only unreferenced objects.
    let mut artifacts: Vec<Option<Vec<(String, String)>>> = Vec::with_capacity(outcomes.len());
    for group in outcomes.chunks(8) {
        let futs: Vec<_> = group.iter().map(|o| put_one(services, o)).collect();
        for r in futures::future::join_all(futs).await {
            artifacts.push(r?);
        }
    }
    let now = services.clock.now();
    let actor = format!("registry:{}", ctx.client);
    let mut tx = services.store.begin().await?;
    if !too_long.is_empty() {
        let errors = serde_json::to_string(&[FieldError::new(
            "(record)",
            format!("line longer than {} bytes", ctx.cfg.max_line_bytes),
        )])
        .expect("serialises");
        for line in too_long {
            sqlx::query(
                "INSERT INTO batch_records (batch_id, line, outcome, errors) VALUES ($1, $2, 'rejected', $3)",
            )
            .bind(ctx.batch_id)
            .bind(line)
            .bind(&errors)
            .execute(&mut *tx)
            .await?;
        }
    }
    for (o, keys) in outcomes.iter().zip(artifacts) {
        match o {
            Outcome::Accepted(a) => {
                Store::insert_application(
                    &mut tx,
                    &NewApplication {
                        id: a.id.clone(),
                        registry_id: a.record.registry_id.clone(),
                        batch_id: Some(ctx.batch_id.to_owned()),
                        state: ApplicationState::Received,
                        priority: a.priority,
                    },
                    &actor,
                    now,
                )
                .await?;
                records::insert_record(
                    &mut tx,
                    services,
                    &a.id,
                    &a.record,
                    keys.as_deref().unwrap_or_default(),
                )
                .await?;
                for f in &a.flags {
                    sqlx::query(
                        "INSERT INTO intake_flags (application_id, flag, field, reason, created_at)
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    )
                    .bind(a.id.as_str())
                    .bind(&f.flag)
                    .bind(&f.field)
                    .bind(&f.reason)
                    .bind(to_rfc3339(now))
                    .execute(&mut *tx)
                    .await?;
                }
                if !a.flags.is_empty() {
                    tracing::warn!(application = %a.id, flags = a.flags.len(), "accepted application flagged for overcharged fees");
                }
                let flags = serde_json::to_string(&a.flags).expect("flags serialise");
                sqlx::query(
                    "INSERT INTO batch_records (batch_id, line, registry_id, application_id, outcome, errors, flags)
                     VALUES ($1, $2, $3, $4, 'accepted', '[]', $5)",
                )
                .bind(ctx.batch_id)
                .bind(a.line)
                .bind(&a.record.registry_id)
                .bind(a.id.as_str())
                .bind(&flags)
                .execute(&mut *tx)
                .await?;
                let detail = if a.flags.is_empty() {
                    Value::Null
                } else {
                    json!({ "flags": a.flags })
                };
                enqueue_callback(
                    &mut tx,
                    a.id.as_str(),
                    CallbackEvent::Accepted,
                    &a.record.registry_id,
                    Some(ApplicationState::Received),
                    None,
                    detail,
                    now,
                )
                .await?;
            }
            Outcome::Rejected(r) => {
                let errors = serde_json::to_string(&r.errors).expect("errors serialise");
                sqlx::query(
                    "INSERT INTO batch_records (batch_id, line, registry_id, application_id, outcome, errors, flags)
                     VALUES ($1, $2, $3, NULL, 'rejected', $4, '[]')",
                )
                .bind(ctx.batch_id)
                .bind(r.line)
                .bind(r.registry_id.as_deref())
                .bind(&errors)
                .execute(&mut *tx)
                .await?;
                if r.notify
                    && let Some(rid) = &r.registry_id
                {
                    enqueue_callback(
                        &mut tx,
                        &format!("registry:{rid}"),
                        CallbackEvent::Rejected,
                        rid,
                        None,
                        Some("rejected at intake"),
                        json!({ "errors": r.errors }),
                        now,
                    )
                    .await?;
                }
            }
        }
    }
    tx.commit().await?;
    Ok(())
}

async fn put_one(
    services: &Services,
    o: &Outcome,
) -> Result<Option<Vec<(String, String)>>, records::RecordError> {
    match o {
        Outcome::Accepted(a) => records::put_biometrics(services, &a.id, &a.biometrics)
            .await
            .map(Some),
        Outcome::Rejected(_) => Ok(None),
    }
}

fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= 128 && key.bytes().all(|b| b.is_ascii_graphic())
}

/// Schedules a received (or already scheduled) batch of `client` for release at `at` with
/// `priority` (`normal` or `urgent`); `false` when the batch is in no state that can be
/// scheduled (receiving, released, cancelled) or is not the client's.
pub async fn schedule_batch(
    services: &Services,
    client: &str,
    batch_id: &str,
    at: OffsetDateTime,
    priority: &str,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE batches SET state = 'scheduled', release_at = $1, priority = $2, updated_at = $3
         WHERE id = $4 AND client = $5 AND state IN ('received', 'scheduled')",
    )
    .bind(to_rfc3339(at))
    .bind(priority)
    .bind(to_rfc3339(services.clock.now()))
    .bind(batch_id)
    .bind(client)
    .execute(services.store.pool())
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Receives a batch from an NDJSON byte stream (see the module docs).
pub async fn submit_batch<S, E>(
    services: &Services,
    cfg: &RegistryConfig,
    client: &str,
    idempotency_key: &str,
    body: S,
) -> Result<Submission, IntakeError>
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if !valid_key(idempotency_key) {
        return Err(IntakeError::BadRequest(
            "Idempotency-Key must be 1–128 visible ASCII characters".into(),
        ));
    }
    let now = services.clock.now();
    sqlx::query(
        "INSERT INTO batches (id, client, idempotency_key, state, priority, created_at, updated_at)
         VALUES ($1, $2, $3, 'receiving', 'normal', $4, $4) ON CONFLICT (client, idempotency_key) DO NOTHING",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(client)
    .bind(idempotency_key)
    .bind(to_rfc3339(now))
    .execute(services.store.pool())
    .await?;
    let row =
        sqlx::query("SELECT id, state FROM batches WHERE client = $1 AND idempotency_key = $2")
            .bind(client)
            .bind(idempotency_key)
            .fetch_one(services.store.pool())
            .await?;
    let batch_id: String = row.try_get("id")?;
    let state: String = row.try_get("state")?;
    if state != "receiving" {
        let (stored, truncated) = stored_digest(services, &batch_id).await?;
        if let Some((lines, digest)) = stored {
            let mut reader = line_reader(body, cfg);
            let mut hasher = BodyDigest::default();
            let mut line_no = 0i64;
            while let Some(item) = reader.next().await {
                let item = match item {
                    Ok(item) => item,
                    // A batch closed at the body bound: the same body resent passes it again.
                    Err(e) if e.get_ref().is_some_and(|e| e.is::<BodyTooLarge>()) => {
                        if truncated && line_no >= lines {
                            break;
                        }
                        return Err(key_reused(&batch_id, "it is longer"));
                    }
                    Err(e) => return Err(IntakeError::Body(e)),
                };
                line_no += 1;
                hasher.add(&item);
                if line_no == lines {
                    if hasher.hex() != digest {
                        return Err(key_reused(
                            &batch_id,
                            &format!("line {line_no} or an earlier one differs"),
                        ));
                    }
                    if truncated {
                        // Lines past the bound were never part of the batch.
                        line_no = lines;
                        break;
                    }
                }
            }
            if line_no != lines {
                return Err(key_reused(
                    &batch_id,
                    &format!("{line_no} lines; the batch received {lines}"),
                ));
            }
        }
        let report = batch_report(services, client, &batch_id)
            .await?
            .ok_or_else(|| IntakeError::NotFound("batch".into()))?;
        return Ok(Submission {
            report,
            replayed: true,
        });
    }
    let lease = format!("intake-batch:{batch_id}");
    let holder = uuid::Uuid::new_v4().to_string();
    let ttl = time::Duration::minutes(5);
    if !services
        .store
        .try_lease(&lease, &holder, services.clock.now(), ttl)
        .await?
    {
        return Err(IntakeError::Busy);
    }
    let result = receive(services, cfg, client, &batch_id, &lease, &holder, body).await;
    let _ = services.store.release_lease(&lease, &holder).await;
    result?;
    let report = batch_report(services, client, &batch_id)
        .await?
        .ok_or_else(|| IntakeError::NotFound("batch".into()))?;
    Ok(Submission {
        report,
        replayed: false,
    })
}

async fn receive<S, E>(
    services: &Services,
    cfg: &RegistryConfig,
    client: &str,
    batch_id: &str,
    lease: &str,
    holder: &str,
    body: S,
) -> Result<(), IntakeError>
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Lines an interrupted earlier submission recorded are skipped — by line number, not
    // "everything up to the highest line": whatever failed when, each line is recorded
    // exactly once (a chunk and its rejections commit in one transaction, and a line that
    // was not recorded is read again).
    let recorded: HashSet<i64> = sqlx::query("SELECT line FROM batch_records WHERE batch_id = $1")
        .bind(batch_id)
        .fetch_all(services.store.pool())
        .await?
        .iter()
        .map(|r| r.try_get::<i64, _>("line"))
        .collect::<Result<_, _>>()?;
    let (stored, _) = stored_digest(services, batch_id).await?;
    let mut lines = line_reader(body, cfg);
    let mut digest = BodyDigest::default();
    // Pickup offices: the configured list, else the register delivery loaded at start, so an
    // unknown office is refused here and no card is made for an office that does not exist.
    let with_register;
    let cfg = if cfg.offices.is_empty() {
        let codes = cardpipe_common::contract::pickup_office_codes(&services.store).await?;
        if codes.is_empty() {
            cfg
        } else {
            with_register = RegistryConfig {
                offices: codes,
                ..cfg.clone()
            };
            &with_register
        }
    } else {
        cfg
    };
    let ctx = BatchCtx {
        services,
        cfg,
        batch_id,
        client,
    };
    let chunk_size = cfg.chunk_size.max(1);
    let chunk_bytes = cfg.intake.chunk_bytes.max(1);
    let max_records = i64::try_from(cfg.intake.max_records).unwrap_or(i64::MAX);
    let mut chunk: Vec<(i64, BytesMut)> = Vec::with_capacity(chunk_size);
    let mut buffered: usize = 0;
    let mut too_long: Vec<i64> = Vec::new();
    let mut line_no: i64 = 0;
    while let Some(item) = lines.next().await {
        let item = match item {
            Ok(_) if line_no >= max_records => {
                let why = format!(
                    "the batch has more than {max_records} lines (registry.intake.max_records)"
                );
                let reason = "too_many_records";
                record_digest(services, batch_id, line_no, &digest, stored.as_ref()).await?;
                mark_truncated(services, batch_id).await?;
                return Err(truncate(&ctx, &mut chunk, &mut too_long, line_no, reason, why).await);
            }
            Ok(item) => item,
            Err(e) => match e.get_ref().and_then(|e| e.downcast_ref::<BodyTooLarge>()) {
                Some(too_large) => {
                    let why = too_large.to_string();
                    let reason = "body_too_large";
                    record_digest(services, batch_id, line_no, &digest, stored.as_ref()).await?;
                    mark_truncated(services, batch_id).await?;
                    return Err(
                        truncate(&ctx, &mut chunk, &mut too_long, line_no, reason, why).await,
                    );
                }
                None => return Err(IntakeError::Body(e)),
            },
        };
        line_no += 1;
        digest.add(&item);
        if let Some((stored_lines, stored_digest)) = &stored
            && *stored_lines == line_no
            && digest.hex() != *stored_digest
        {
            return Err(key_reused(
                batch_id,
                &format!("line {line_no} or an earlier one differs"),
            ));
        }
        if recorded.contains(&line_no) {
            continue;
        }
        match item {
            LineItem::TooLong => too_long.push(line_no),
            LineItem::Line(b) if b.iter().all(u8::is_ascii_whitespace) => {}
            LineItem::Line(b) => {
                buffered += b.len();
                chunk.push((line_no, b));
            }
        }
        if chunk.len() + too_long.len() >= chunk_size || buffered >= chunk_bytes {
            buffered = 0;
            flush(&ctx, &mut chunk, &mut too_long).await?;
            record_digest(services, batch_id, line_no, &digest, stored.as_ref()).await?;
            services
                .store
                .try_lease(
                    lease,
                    holder,
                    services.clock.now(),
                    time::Duration::minutes(5),
                )
                .await?;
        }
    }
    if let Some((stored_lines, _)) = &stored
        && *stored_lines > line_no
    {
        return Err(key_reused(
            batch_id,
            &format!("{line_no} lines; {stored_lines} were received before"),
        ));
    }
    flush(&ctx, &mut chunk, &mut too_long).await?;
    record_digest(services, batch_id, line_no, &digest, stored.as_ref()).await?;
    finish(services, batch_id).await
}

/// The body as lines of at most `max_line_bytes`, failing past `max_body_bytes`.
fn line_reader<S, E>(
    body: S,
    cfg: &RegistryConfig,
) -> impl Stream<Item = Result<LineItem, std::io::Error>> + Send + Unpin
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let max_body = cfg.intake.max_body_bytes;
    let mut body_bytes: u64 = 0;
    let body = body.map(move |part| {
        let part = part.map_err(std::io::Error::other)?;
        body_bytes = body_bytes.saturating_add(part.len() as u64);
        if body_bytes > max_body {
            return Err(std::io::Error::other(BodyTooLarge(max_body)));
        }
        Ok(part)
    });
    let reader = StreamReader::new(body);
    FramedRead::with_capacity(reader, Lines::new(cfg.max_line_bytes), 64 * 1024)
}

/// SHA-256 over the lines read so far: what an Idempotency-Key stands for.
#[derive(Default, Clone)]
struct BodyDigest(Sha256);

impl BodyDigest {
    fn add(&mut self, item: &LineItem) {
        match item {
            LineItem::Line(b) => {
                self.0.update(b);
                self.0.update(b"\n");
            }
            // The line's bytes were skipped unread; a marker keeps the count in the digest.
            LineItem::TooLong => self.0.update(b"\0too-long\n"),
        }
    }

    fn hex(&self) -> String {
        hex::encode(self.0.clone().finalize())
    }
}

fn key_reused(batch_id: &str, detail: &str) -> IntakeError {
    IntakeError::KeyReused {
        batch_id: batch_id.to_owned(),
        detail: detail.to_owned(),
    }
}

/// The digest stored for a batch — lines covered and their SHA-256 (`None` before any chunk,
/// and for batches received before digests were kept) — and whether the batch was closed at
/// a bound of `[registry.intake]`.
async fn stored_digest(
    services: &Services,
    batch_id: &str,
) -> Result<(Option<(i64, String)>, bool), IntakeError> {
    let row =
        sqlx::query("SELECT body_lines, body_sha256, body_truncated FROM batches WHERE id = $1")
            .bind(batch_id)
            .fetch_one(services.store.pool())
            .await?;
    let lines: Option<i64> = row.try_get("body_lines")?;
    let digest: Option<String> = row.try_get("body_sha256")?;
    let truncated: i64 = row.try_get("body_truncated")?;
    Ok((lines.zip(digest), truncated != 0))
}

async fn mark_truncated(services: &Services, batch_id: &str) -> Result<(), IntakeError> {
    sqlx::query("UPDATE batches SET body_truncated = 1 WHERE id = $1")
        .bind(batch_id)
        .execute(services.store.pool())
        .await?;
    Ok(())
}

/// Stores the digest of lines 1..=`lines` once they are committed (never moving it back: a
/// resubmission recomputes the same prefix).
async fn record_digest(
    services: &Services,
    batch_id: &str,
    lines: i64,
    digest: &BodyDigest,
    stored: Option<&(i64, String)>,
) -> Result<(), IntakeError> {
    if stored.is_some_and(|(n, _)| *n >= lines) {
        return Ok(());
    }
    sqlx::query("UPDATE batches SET body_lines = $1, body_sha256 = $2 WHERE id = $3")
        .bind(lines)
        .bind(digest.hex())
        .bind(batch_id)
        .execute(services.store.pool())
        .await?;
    Ok(())
}

/// A submission past a bound of `[registry.intake]`: the whole lines read so far are
/// committed and the batch is closed with them (nothing accepted is lost, and its report
/// lists them); the answer names the bound and the last line received, so the registry sends
/// the rest as a new batch.
async fn truncate(
    ctx: &BatchCtx<'_>,
    chunk: &mut Vec<(i64, BytesMut)>,
    too_long: &mut Vec<i64>,
    last_line: i64,
    reason: &'static str,
    why: String,
) -> IntakeError {
    if let Err(e) = flush(ctx, chunk, too_long).await {
        return e;
    }
    if let Err(e) = finish(ctx.services, ctx.batch_id).await {
        return e;
    }
    IntakeError::TooLarge {
        reason,
        batch_id: ctx.batch_id.to_owned(),
        message: format!(
            "{why}: lines 1 to {last_line} were received as batch {}; send the rest as a new batch",
            ctx.batch_id
        ),
    }
}

async fn flush(
    ctx: &BatchCtx<'_>,
    chunk: &mut Vec<(i64, BytesMut)>,
    too_long: &mut Vec<i64>,
) -> Result<(), IntakeError> {
    if !chunk.is_empty() || !too_long.is_empty() {
        commit_chunk(ctx, std::mem::take(chunk), std::mem::take(too_long)).await?;
    }
    Ok(())
}

async fn finish(services: &Services, batch_id: &str) -> Result<(), IntakeError> {
    let rows = sqlx::query(
        "SELECT outcome, COUNT(*) AS n, SUM(CASE WHEN flags <> '[]' THEN 1 ELSE 0 END) AS f
         FROM batch_records WHERE batch_id = $1 GROUP BY outcome",
    )
    .bind(batch_id)
    .fetch_all(services.store.pool())
    .await?;
    let (mut accepted, mut rejected, mut flagged) = (0i64, 0i64, 0i64);
    for r in rows {
        let outcome: String = r.try_get("outcome")?;
        let n: i64 = r.try_get("n")?;
        let f: Option<i64> = r.try_get("f").ok();
        if outcome == "accepted" {
            accepted = n;
            flagged = f.unwrap_or(0);
        } else {
            rejected = n;
        }
    }
    let now = to_rfc3339(services.clock.now());
    let done = sqlx::query(
        "UPDATE batches SET state = 'received', total_records = $1, accepted = $2, rejected = $3,
                flagged = $4, received_at = $5, updated_at = $5
         WHERE id = $6 AND state = 'receiving'",
    )
    .bind(accepted + rejected)
    .bind(accepted)
    .bind(rejected)
    .bind(flagged)
    .bind(&now)
    .bind(batch_id)
    .execute(services.store.pool())
    .await?;
    // Counted once, by the submission that completed the batch (not by a resubmission).
    if done.rows_affected() == 1 {
        services
            .metrics
            .intake_records("accepted", accepted.max(0) as u64);
        services
            .metrics
            .intake_records("rejected", rejected.max(0) as u64);
    }
    Ok(())
}

const BATCH_COLUMNS: &str = "id, client, idempotency_key, state, priority, release_at, created_at, received_at, released_at, total_records, accepted, rejected, flagged";

fn read_batch(r: &sqlx::any::AnyRow) -> Result<BatchReport, sqlx::Error> {
    Ok(BatchReport {
        batch_id: r.try_get("id")?,
        client: r.try_get("client")?,
        idempotency_key: r.try_get("idempotency_key")?,
        state: r.try_get("state")?,
        priority: r.try_get("priority")?,
        release_at: r.try_get("release_at")?,
        created_at: r.try_get("created_at")?,
        received_at: r.try_get("received_at")?,
        released_at: r.try_get("released_at")?,
        records: r.try_get("total_records")?,
        accepted: r.try_get("accepted")?,
        rejected: r.try_get("rejected")?,
        flagged: r.try_get("flagged")?,
        errors: Vec::new(),
        flags: Vec::new(),
        truncated: false,
    })
}

/// The batches of `client`, newest first (summaries without errors and flags).
pub async fn list_batches(
    services: &Services,
    client: &str,
    limit: i64,
) -> Result<Vec<BatchReport>, IntakeError> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {BATCH_COLUMNS} FROM batches WHERE client = $1 ORDER BY created_at DESC, id DESC LIMIT $2"
    )))
    .bind(client)
    .bind(limit)
    .fetch_all(services.store.pool())
    .await?;
    Ok(rows.iter().map(read_batch).collect::<Result<_, _>>()?)
}

/// The batch a client received under `idempotency_key`, if it was received completely: what
/// a sender regenerating its body (the demo, whose dates follow the day) resumes without
/// sending it again.
pub async fn received_batch(
    services: &Services,
    client: &str,
    idempotency_key: &str,
) -> Result<Option<BatchReport>, IntakeError> {
    let row = sqlx::query(
        "SELECT id FROM batches WHERE client = $1 AND idempotency_key = $2 AND state <> 'receiving'",
    )
    .bind(client)
    .bind(idempotency_key)
    .fetch_optional(services.store.pool())
    .await?;
    match row {
        Some(row) => {
            let id: String = row.try_get("id")?;
            Ok(batch_report(services, client, &id).await?)
        }
        None => Ok(None),
    }
}

/// The full report of one of `client`'s batches.
pub async fn batch_report(
    services: &Services,
    client: &str,
    batch_id: &str,
) -> Result<Option<BatchReport>, IntakeError> {
    let Some(row) = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1 AND client = $2"
    )))
    .bind(batch_id)
    .bind(client)
    .fetch_optional(services.store.pool())
    .await?
    else {
        return Ok(None);
    };
    let mut report = read_batch(&row)?;
    let rows = sqlx::query(
        "SELECT line, registry_id, errors FROM batch_records WHERE batch_id = $1 AND outcome = 'rejected'
         ORDER BY line LIMIT $2",
    )
    .bind(batch_id)
    .bind(REPORT_LIMIT + 1)
    .fetch_all(services.store.pool())
    .await?;
    for r in &rows {
        let errors: Vec<FieldError> =
            serde_json::from_str(&r.try_get::<String, _>("errors")?).unwrap_or_default();
        for e in errors {
            report.errors.push(RecordError {
                line: r.try_get("line")?,
                application_id: r.try_get("registry_id")?,
                field: e.field,
                reason: e.reason,
            });
        }
    }
    let rows = sqlx::query(
        "SELECT line, registry_id, flags FROM batch_records WHERE batch_id = $1 AND outcome = 'accepted'
         AND flags <> '[]' ORDER BY line LIMIT $2",
    )
    .bind(batch_id)
    .bind(REPORT_LIMIT + 1)
    .fetch_all(services.store.pool())
    .await?;
    for r in &rows {
        let flags: Vec<Flag> =
            serde_json::from_str(&r.try_get::<String, _>("flags")?).unwrap_or_default();
        for f in flags {
            report.flags.push(RecordFlag {
                line: r.try_get("line")?,
                application_id: r.try_get("registry_id")?,
                flag: f.flag,
                field: f.field,
                reason: f.reason,
            });
        }
    }
    report.truncated =
        report.errors.len() as i64 > REPORT_LIMIT || report.flags.len() as i64 > REPORT_LIMIT;
    report.errors.truncate(REPORT_LIMIT as usize);
    report.flags.truncate(REPORT_LIMIT as usize);
    Ok(Some(report))
}

/// Per-line outcomes of a batch, after line `after`, optionally of one outcome.
pub async fn batch_records(
    services: &Services,
    batch_id: &str,
    outcome: Option<&str>,
    after: i64,
    limit: i64,
) -> Result<Vec<RecordOutcome>, IntakeError> {
    let rows = sqlx::query(
        "SELECT line, registry_id, application_id, outcome, errors, flags FROM batch_records
         WHERE batch_id = $1 AND line > $2 AND ($3 = '' OR outcome = $3) ORDER BY line LIMIT $4",
    )
    .bind(batch_id)
    .bind(after)
    .bind(outcome.unwrap_or(""))
    .bind(limit)
    .fetch_all(services.store.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(RecordOutcome {
                line: r.try_get("line")?,
                application_id: r.try_get("registry_id")?,
                cardpipe_id: r.try_get("application_id")?,
                outcome: r.try_get("outcome")?,
                errors: serde_json::from_str(&r.try_get::<String, _>("errors")?)
                    .unwrap_or_default(),
                flags: serde_json::from_str(&r.try_get::<String, _>("flags")?).unwrap_or_default(),
            })
        })
        .collect()
}
