//! Parked work: jobs that failed every attempt (or failed permanently).
//!
//! The broker's parking queue holds the job; the `parked_jobs` table is the
//! operators' view of it (stage, application, attempts, error, when) and lets
//! recovery skip applications an operator must look at. Operators retry or
//! drop parked work from the console or `cardpipe ops`.

use serde::Serialize;
use sqlx::Row;
use time::OffsetDateTime;

use super::Services;
use crate::broker::Job;
use crate::clock::to_rfc3339;
use crate::store::StoreError;

/// A parked job as operators see it.
#[derive(Debug, Clone, Serialize)]
pub struct ParkedJob {
    /// The job id.
    pub job_id: String,
    /// The stage it failed in.
    pub stage: String,
    /// The application.
    pub subject: String,
    /// Attempts made.
    pub attempt: i64,
    /// The last error.
    pub error: String,
    /// When it was parked.
    pub parked_at: String,
}

/// Records a parked job (idempotent by job id).
pub async fn record(services: &Services, job: &Job, at: OffsetDateTime) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO parked_jobs (job_id, stage, subject, attempt, error, parked_at)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (job_id) DO NOTHING",
    )
    .bind(&job.id)
    .bind(&job.stage)
    .bind(&job.subject)
    .bind(i64::from(job.attempt))
    .bind(job.last_error.as_deref().unwrap_or(""))
    .bind(to_rfc3339(at))
    .execute(services.store.pool())
    .await?;
    Ok(())
}

/// Parked jobs, of one stage or all, oldest first.
pub async fn list(services: &Services, stage: Option<&str>) -> Result<Vec<ParkedJob>, StoreError> {
    let rows = sqlx::query(
        "SELECT job_id, stage, subject, attempt, error, parked_at FROM parked_jobs
         WHERE $1 = '' OR stage = $1 ORDER BY parked_at, job_id",
    )
    .bind(stage.unwrap_or(""))
    .fetch_all(services.store.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ParkedJob {
                job_id: r.try_get("job_id")?,
                stage: r.try_get("stage")?,
                subject: r.try_get("subject")?,
                attempt: r.try_get("attempt")?,
                error: r.try_get("error")?,
                parked_at: r.try_get("parked_at")?,
            })
        })
        .collect()
}

/// Errors of parked-work operations.
#[derive(Debug, thiserror::Error)]
pub enum ParkedError {
    /// No parked job with that id.
    #[error("no parked job {0}")]
    NotFound(String),
    /// Store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Broker failure.
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
}

async fn take(services: &Services, job_id: &str) -> Result<ParkedJob, ParkedError> {
    let parked = list(services, None)
        .await?
        .into_iter()
        .find(|p| p.job_id == job_id)
        .ok_or_else(|| ParkedError::NotFound(job_id.to_owned()))?;
    services.broker.take_parked(&parked.stage, job_id).await?;
    sqlx::query("DELETE FROM parked_jobs WHERE job_id = $1")
        .bind(job_id)
        .execute(services.store.pool())
        .await
        .map_err(StoreError::from)?;
    Ok(parked)
}

/// Sends a parked job back to its stage as a fresh first attempt.
pub async fn retry(services: &Services, job_id: &str) -> Result<Job, ParkedError> {
    let parked = take(services, job_id).await?;
    let job = Job::new(parked.stage, parked.subject);
    services.broker.publish(&job).await?;
    Ok(job)
}

/// Removes a parked job for good (the application stays where it is).
pub async fn drop_job(services: &Services, job_id: &str) -> Result<ParkedJob, ParkedError> {
    take(services, job_id).await
}
