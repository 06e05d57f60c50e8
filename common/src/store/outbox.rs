//! The transactional outbox.
//!
//! A stage writes "what should be announced" as outbox rows in the same
//! transaction as its state change; the relay (`runtime::relay`) claims due
//! rows, delivers them (publishes a job with confirms, or calls a webhook)
//! and marks them published. A crash between delivery and marking repeats the
//! delivery, never loses it; consumers are idempotent.
//!
//! Claims are leases written with one UPDATE, so any number of relays (and
//! SQLite, which has no `SKIP LOCKED`) can share the table. Rows of one
//! subject and topic are delivered in order: a row is claimable only when
//! every earlier row of its subject and topic is published.

use sqlx::Row;
use time::{Duration, OffsetDateTime};

use super::{Store, StoreError, StoreTx};
use crate::broker::Job;
use crate::clock::to_rfc3339;

/// The topic of rows that publish a [`Job`] to the broker.
pub const JOB_TOPIC: &str = "job";

/// A claimed outbox row.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Insertion order.
    pub seq: i64,
    /// Unique message id.
    pub id: String,
    /// What kind of delivery (`job`, `callback`, ...).
    pub topic: String,
    /// What it is about (application id, ...); orders delivery.
    pub subject: String,
    /// The message (JSON).
    pub payload: String,
    /// Failed deliveries so far.
    pub attempts: i64,
    /// When the row was written.
    pub created_at: String,
}

impl Store {
    /// Adds an outbox row in the caller's transaction.
    pub async fn enqueue_outbox(
        tx: &mut StoreTx,
        id: &str,
        topic: &str,
        subject: &str,
        payload: &str,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let now = to_rfc3339(at);
        sqlx::query(
            "INSERT INTO outbox (id, topic, subject, payload, created_at, available_at)
             VALUES ($1, $2, $3, $4, $5, $5)",
        )
        .bind(id)
        .bind(topic)
        .bind(subject)
        .bind(payload)
        .bind(&now)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Adds a row that publishes `job` once the transaction commits.
    pub async fn enqueue_job(
        tx: &mut StoreTx,
        job: &Job,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let payload = serde_json::to_string(job).expect("a job always serialises");
        Self::enqueue_outbox(tx, &job.id, JOB_TOPIC, &job.subject, &payload, at).await
    }

    /// Claims up to `limit` due rows of the given topics for `holder` for
    /// `lease`, oldest first.
    pub async fn claim_outbox(
        &self,
        topics: &[&str],
        holder: &str,
        now: OffsetDateTime,
        lease: Duration,
        limit: i64,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let now_text = to_rfc3339(now);
        let until = to_rfc3339(now + lease);
        let topic_list = topics
            .iter()
            .map(|t| format!("'{}'", t.replace('\'', "")))
            .collect::<Vec<_>>()
            .join(",");
        let sql = format!(
            "UPDATE outbox SET claimed_by = $1, claimed_until = $2
             WHERE seq IN (
                 SELECT o.seq FROM outbox o
                 WHERE o.published_at IS NULL AND o.available_at <= $3 AND o.topic IN ({topic_list})
                   AND (o.claimed_until IS NULL OR o.claimed_until < $3)
                   AND NOT EXISTS (SELECT 1 FROM outbox e WHERE e.subject = o.subject AND e.topic = o.topic
                                   AND e.seq < o.seq AND e.published_at IS NULL)
                 ORDER BY o.seq LIMIT $4)
               AND published_at IS NULL AND (claimed_until IS NULL OR claimed_until < $3)
             RETURNING seq, id, topic, subject, payload, attempts, created_at"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(holder)
            .bind(&until)
            .bind(&now_text)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        let mut claimed = rows
            .iter()
            .map(|r| {
                Ok(OutboxRow {
                    seq: r.try_get("seq")?,
                    id: r.try_get("id")?,
                    topic: r.try_get("topic")?,
                    subject: r.try_get("subject")?,
                    payload: r.try_get("payload")?,
                    attempts: r.try_get("attempts")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        claimed.sort_by_key(|r| r.seq);
        Ok(claimed)
    }

    /// Marks a claimed row delivered.
    pub async fn mark_outbox_published(
        &self,
        seq: i64,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE outbox SET published_at = $1, claimed_by = NULL, claimed_until = NULL WHERE seq = $2",
        )
        .bind(to_rfc3339(at))
        .bind(seq)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a failed delivery; the row becomes due again at `retry_at`.
    pub async fn mark_outbox_failed(
        &self,
        seq: i64,
        error: &str,
        retry_at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, last_error = $1, available_at = $2,
                    claimed_by = NULL, claimed_until = NULL WHERE seq = $3",
        )
        .bind(error)
        .bind(to_rfc3339(retry_at))
        .bind(seq)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Unpublished rows and the creation time of the oldest (outbox lag).
    pub async fn outbox_backlog(&self) -> Result<(i64, Option<String>), StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM outbox WHERE published_at IS NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((row.try_get("n")?, row.try_get("oldest")?))
    }

    /// Deletes rows published before `before`.
    pub async fn purge_published_outbox(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let done =
            sqlx::query("DELETE FROM outbox WHERE published_at IS NOT NULL AND published_at < $1")
                .bind(to_rfc3339(before))
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected())
    }
}
