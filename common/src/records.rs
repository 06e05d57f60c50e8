//! Where the personal record and biometrics of an application live.
//!
//! The record is sealed in the `applicant_records` table; photo and
//! fingerprints are sealed objects in the object store, their keys recorded
//! as artifacts `photo` and `fingerprints`. Look-ups by national code use a
//! keyed digest, never the clear value. Intake saves; any stage loads.

use bytes::Bytes;
use sqlx::Row;
use time::Date;

use crate::domain::ApplicationId;
use crate::domain::applicant::{ApplicantRecord, Biometrics, FingerprintEntry};
use crate::envelope::EnvelopeError;
use crate::objects::ObjectError;
use crate::runtime::Services;
use crate::store::{Store, StoreError, StoreTx};

/// Artifact kind of the sealed photo.
pub const PHOTO_ARTIFACT: &str = "photo";
/// Artifact kind of the sealed fingerprint set.
pub const FINGERPRINTS_ARTIFACT: &str = "fingerprints";

/// Record storage failures (no personal data in the text).
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Object store failure.
    #[error(transparent)]
    Objects(#[from] ObjectError),
    /// Sealing failure.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// Nothing stored for the application.
    #[error("no {what} stored for application {id}")]
    Missing {
        /// What is missing.
        what: &'static str,
        /// The application.
        id: String,
    },
    /// Stored data did not decode.
    #[error("stored {0} does not decode")]
    Corrupt(&'static str),
}

impl From<sqlx::Error> for RecordError {
    fn from(e: sqlx::Error) -> Self {
        RecordError::Store(StoreError::Database(e))
    }
}

fn digest_national_code(services: &Services, national_code: &str) -> String {
    services
        .sealer
        .lookup_digest("national_code", national_code)
}

/// Seals and stores biometrics as objects (before the transaction that
/// records them), returning the (kind, key) artifacts to record.
pub async fn put_biometrics(
    services: &Services,
    id: &ApplicationId,
    biometrics: &Biometrics,
) -> Result<Vec<(String, String)>, RecordError> {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let photo_key = format!("applications/{id}/photo-{suffix}.sealed");
    let sealed_photo = services
        .sealer
        .seal(&format!("photo:{id}"), &biometrics.photo_jpeg);
    services
        .objects
        .put(&photo_key, Bytes::from(sealed_photo))
        .await?;
    let prints = serde_json::to_vec(&biometrics.fingerprints).expect("fingerprints serialise");
    let prints_key = format!("applications/{id}/fingerprints-{suffix}.sealed");
    let sealed_prints = services.sealer.seal(&format!("fingerprints:{id}"), &prints);
    services
        .objects
        .put(&prints_key, Bytes::from(sealed_prints))
        .await?;
    Ok(vec![
        (PHOTO_ARTIFACT.to_owned(), photo_key),
        (FINGERPRINTS_ARTIFACT.to_owned(), prints_key),
    ])
}

/// Stores the sealed record (and the biometrics' artifact keys from
/// [`put_biometrics`]) in the caller's transaction.
pub async fn insert_record(
    tx: &mut StoreTx,
    services: &Services,
    id: &ApplicationId,
    record: &ApplicantRecord,
    biometric_artifacts: &[(String, String)],
) -> Result<(), RecordError> {
    let sealed = services.sealer.seal(
        &format!("record:{id}"),
        &serde_json::to_vec(record).expect("records serialise"),
    );
    sqlx::query(
        "INSERT INTO applicant_records (application_id, tracking_code, national_code_digest, birth_date, pickup_office, sealed_record, lookup_key_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id.as_str())
    .bind(&record.tracking_code)
    .bind(digest_national_code(services, &record.national_code))
    .bind(record.birth_date.to_string())
    .bind(&record.pickup_office)
    .bind(sealed)
    .bind(services.sealer.lookup_key_id())
    .execute(&mut **tx)
    .await?;
    let now = services.clock.now();
    for (kind, key) in biometric_artifacts {
        Store::put_artifact(tx, id, kind, key, now).await?;
    }
    Ok(())
}

/// Replaces the stored record (e.g. a new pickup office) in the caller's transaction.
pub async fn update_record(
    tx: &mut StoreTx,
    services: &Services,
    id: &ApplicationId,
    record: &ApplicantRecord,
) -> Result<(), RecordError> {
    let sealed = services.sealer.seal(
        &format!("record:{id}"),
        &serde_json::to_vec(record).expect("records serialise"),
    );
    let done = sqlx::query(
        "UPDATE applicant_records SET sealed_record = $1, pickup_office = $2 WHERE application_id = $3",
    )
    .bind(sealed)
    .bind(&record.pickup_office)
    .bind(id.as_str())
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() == 0 {
        return Err(RecordError::Missing {
            what: "record",
            id: id.to_string(),
        });
    }
    Ok(())
}

/// The personal record of an application.
pub async fn load_record(
    services: &Services,
    id: &ApplicationId,
) -> Result<ApplicantRecord, RecordError> {
    let row = sqlx::query("SELECT sealed_record FROM applicant_records WHERE application_id = $1")
        .bind(id.as_str())
        .fetch_optional(services.store.pool())
        .await?
        .ok_or_else(|| RecordError::Missing {
            what: "record",
            id: id.to_string(),
        })?;
    let sealed: Vec<u8> = row.try_get("sealed_record")?;
    let plain = services.sealer.open(&format!("record:{id}"), &sealed)?;
    serde_json::from_slice(&plain).map_err(|_| RecordError::Corrupt("record"))
}

async fn load_sealed_object(
    services: &Services,
    id: &ApplicationId,
    kind: &'static str,
) -> Result<zeroize::Zeroizing<Vec<u8>>, RecordError> {
    let key = services
        .store
        .artifact(id, kind)
        .await?
        .ok_or(RecordError::Missing {
            what: kind,
            id: id.to_string(),
        })?;
    let blob = services
        .objects
        .get(&key)
        .await?
        .ok_or(RecordError::Missing {
            what: kind,
            id: id.to_string(),
        })?;
    Ok(services.sealer.open(&format!("{kind}:{id}"), &blob)?)
}

/// The photo and fingerprints of an application.
pub async fn load_biometrics(
    services: &Services,
    id: &ApplicationId,
) -> Result<Biometrics, RecordError> {
    let photo = load_sealed_object(services, id, PHOTO_ARTIFACT).await?;
    let prints = load_sealed_object(services, id, FINGERPRINTS_ARTIFACT).await?;
    let fingerprints: Vec<FingerprintEntry> =
        serde_json::from_slice(&prints).map_err(|_| RecordError::Corrupt("fingerprints"))?;
    Ok(Biometrics {
        photo_jpeg: photo.to_vec(),
        fingerprints,
    })
}

/// The application with this follow-up tracking code.
pub async fn find_by_tracking_code(
    services: &Services,
    tracking_code: &str,
) -> Result<Option<ApplicationId>, RecordError> {
    let row = sqlx::query("SELECT application_id FROM applicant_records WHERE tracking_code = $1")
        .bind(tracking_code)
        .fetch_optional(services.store.pool())
        .await?;
    Ok(row
        .map(|r| r.try_get("application_id").map(ApplicationId))
        .transpose()?)
}

/// Applications of a national code (optionally with this birth date),
/// newest first — for tracking-code recovery and the "already in flight" rule. Every known
/// lookup key is searched, so digests not yet moved to the current key are found.
pub async fn find_by_national_code(
    services: &Services,
    national_code: &str,
    birth_date: Option<Date>,
) -> Result<Vec<ApplicationId>, RecordError> {
    let mut ids = Vec::new();
    for digest in services
        .sealer
        .lookup_digests("national_code", national_code)
    {
        let rows = sqlx::query(
            "SELECT application_id FROM applicant_records WHERE national_code_digest = $1
             AND ($2 = '' OR birth_date = $2)",
        )
        .bind(digest)
        .bind(birth_date.map(|d| d.to_string()).unwrap_or_default())
        .fetch_all(services.store.pool())
        .await?;
        for r in rows {
            ids.push(ApplicationId(r.try_get("application_id")?));
        }
    }
    ids.sort_by(|a, b| b.as_str().cmp(a.as_str()));
    ids.dedup();
    Ok(ids)
}

/// Records whose national-code digest is not under the current lookup key.
pub async fn stale_digests(services: &Services) -> Result<i64, RecordError> {
    Ok(
        sqlx::query("SELECT COUNT(*) FROM applicant_records WHERE lookup_key_id <> $1")
            .bind(services.sealer.lookup_key_id())
            .fetch_one(services.store.pool())
            .await?
            .try_get(0)?,
    )
}

/// Moves up to `limit` national-code digests to the current lookup key (opening each sealed
/// record for its national code); returns how many moved. Each row is updated only if its
/// digest is still the one read (another replica may have moved it). A record that cannot
/// be opened (its master key no longer configured) is left as it is and counted as stale.
pub async fn redigest(services: &Services, limit: i64) -> Result<u64, RecordError> {
    Ok(redigest_after(services, "", limit).await?.0)
}

/// [`redigest`] of the stale records after application `after` (in id order): returns the
/// rows moved and the last id looked at (`None` when fewer than `limit` were left), so a
/// caller walks past records it cannot open instead of meeting them first on every pass.
pub async fn redigest_after(
    services: &Services,
    after: &str,
    limit: i64,
) -> Result<(u64, Option<String>), RecordError> {
    let current = services.sealer.lookup_key_id().to_owned();
    let rows = sqlx::query(
        "SELECT application_id, national_code_digest, sealed_record FROM applicant_records
         WHERE lookup_key_id <> $1 AND application_id > $2 ORDER BY application_id LIMIT $3",
    )
    .bind(&current)
    .bind(after)
    .bind(limit)
    .fetch_all(services.store.pool())
    .await?;
    let full = i64::try_from(rows.len()).unwrap_or(i64::MAX) >= limit;
    let mut last = None;
    let mut moved = 0;
    for row in rows {
        let id: String = row.try_get("application_id")?;
        last = Some(id.clone());
        let old: String = row.try_get("national_code_digest")?;
        let sealed: Vec<u8> = row.try_get("sealed_record")?;
        let Ok(plain) = services.sealer.open(&format!("record:{id}"), &sealed) else {
            tracing::warn!(application = %id, "a sealed record cannot be opened with the configured master keys; its lookup digest stays under its old key");
            continue;
        };
        let Ok(record) = serde_json::from_slice::<ApplicantRecord>(&plain) else {
            continue;
        };
        let done = sqlx::query(
            "UPDATE applicant_records SET national_code_digest = $1, lookup_key_id = $2
             WHERE application_id = $3 AND national_code_digest = $4",
        )
        .bind(digest_national_code(services, &record.national_code))
        .bind(&current)
        .bind(&id)
        .bind(&old)
        .execute(services.store.pool())
        .await?;
        moved += done.rows_affected();
    }
    Ok((moved, if full { last } else { None }))
}

/// Moves national-code digests to the current lookup key every `every` (a walk over the
/// stale records, 1,000 per query) and keeps `cardpipe_lookup_digests_stale` current, until
/// `shutdown`. Safe on several replicas at once (each row's update is compare-and-set).
pub async fn redigest_background(
    services: Services,
    every: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let stale = prometheus_client::metrics::gauge::Gauge::<i64>::default();
    services.metrics.register(|r| {
        r.register(
            "lookup_digests_stale",
            "Applicant records whose national-code digest is not yet under the current lookup key",
            stale.clone(),
        )
    });
    loop {
        // One walk over the stale records per period, 1,000 per query.
        let mut after = String::new();
        loop {
            match redigest_after(&services, &after, 1000).await {
                Ok((moved, next)) => {
                    if moved > 0 {
                        tracing::info!(
                            moved,
                            "national-code digests moved to the current lookup key"
                        );
                    }
                    match next {
                        Some(next) => after = next,
                        None => break,
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "re-digesting national codes failed; retrying later");
                    break;
                }
            }
            if shutdown.is_cancelled() {
                return Ok(());
            }
        }
        if let Ok(n) = stale_digests(&services).await {
            stale.set(n);
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(every) => {}
        }
    }
}
