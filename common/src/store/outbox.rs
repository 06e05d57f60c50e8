//! The transactional outbox.
//!
//! A stage writes "what should be announced" as outbox rows in the same
//! transaction as its state change; the relay (`runtime::relay`) claims due
//! rows, delivers them (publishes a job with confirms, or calls a webhook)
//! and marks them published. A crash between delivery and marking repeats the
//! delivery, never loses it; consumers are idempotent.
//!
//! Claims are leases written with one UPDATE, so any number of relays can share
//! the table; on PostgreSQL the candidate rows are locked `FOR UPDATE SKIP
//! LOCKED`, so concurrent relays take disjoint rows instead of waiting on (and
//! deadlocking over) each other's (SQLite has one writer and needs neither).
//! Rows of one subject and topic are delivered in order: a row is claimable
//! only when every earlier row of its subject and topic is published.
//!
//! Every update after the claim is fenced: it names the holder and changes
//! nothing when the claim was lost (expired and taken by another relay), so a
//! slow relay cannot mark published, reschedule or dead-letter a row another
//! relay now owns. A row that can never be delivered is moved to
//! `outbox_dead_letters` ([`DeadLetter`]), where an operator re-queues or
//! discards it.

use sqlx::Row;
use time::{Duration, OffsetDateTime};

use super::{Dialect, Store, StoreError, StoreTx};
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

/// An outbox row that will not be delivered without an operator. The payload stays
/// in the table (it is what a re-queue sends) and is not shown: a callback or a
/// citizen message may carry personal data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its outbox sequence number (the operator's handle on it).
    pub seq: i64,
    /// Unique message id.
    pub id: String,
    /// What kind of delivery.
    pub topic: String,
    /// What it is about (application id, ...).
    pub subject: String,
    /// When the row was first written.
    pub created_at: String,
    /// Failed deliveries.
    pub attempts: i64,
    /// The last delivery error.
    pub last_error: String,
    /// When it was given up.
    pub dead_at: String,
}

impl DeadLetter {
    fn from_row(r: &sqlx::any::AnyRow) -> Result<Self, StoreError> {
        Ok(Self {
            seq: r.try_get("seq")?,
            id: r.try_get("id")?,
            topic: r.try_get("topic")?,
            subject: r.try_get("subject")?,
            created_at: r.try_get("created_at")?,
            attempts: r.try_get("attempts")?,
            last_error: r.try_get("last_error")?,
            dead_at: r.try_get("dead_at")?,
        })
    }
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
        let sql = claim_outbox_sql(self.dialect, topics);
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

    /// Marks a row `holder` claimed as delivered. False when the claim was lost
    /// (another relay took the row over, or it was already marked): nothing changes.
    pub async fn mark_outbox_published(
        &self,
        seq: i64,
        holder: &str,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE outbox SET published_at = $1, claimed_by = NULL, claimed_until = NULL
             WHERE seq = $2 AND claimed_by = $3 AND published_at IS NULL",
        )
        .bind(to_rfc3339(at))
        .bind(seq)
        .bind(holder)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records a failed delivery of a row `holder` claimed; the row becomes due again
    /// at `retry_at`. False when the claim was lost: nothing changes.
    pub async fn mark_outbox_failed(
        &self,
        seq: i64,
        holder: &str,
        error: &str,
        retry_at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, last_error = $1, available_at = $2,
                    claimed_by = NULL, claimed_until = NULL
             WHERE seq = $3 AND claimed_by = $4 AND published_at IS NULL",
        )
        .bind(error)
        .bind(to_rfc3339(retry_at))
        .bind(seq)
        .bind(holder)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives back claims `holder` will not use (rows it had no time left to deliver),
    /// so another round or relay takes them at once instead of when the lease ends.
    pub async fn release_outbox_claims(
        &self,
        seqs: &[i64],
        holder: &str,
    ) -> Result<(), StoreError> {
        for seq in seqs {
            sqlx::query(
                "UPDATE outbox SET claimed_by = NULL, claimed_until = NULL
                 WHERE seq = $1 AND claimed_by = $2 AND published_at IS NULL",
            )
            .bind(seq)
            .bind(holder)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    /// Moves a row `holder` claimed to the dead letters (one transaction), counting this
    /// last failed attempt. False when the claim was lost: nothing changes.
    pub async fn dead_letter_outbox(
        &self,
        seq: i64,
        holder: &str,
        error: &str,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let moved = sqlx::query(
            "INSERT INTO outbox_dead_letters
                 (seq, id, topic, subject, payload, created_at, attempts, last_error, dead_at)
             SELECT seq, id, topic, subject, payload, created_at, attempts + 1, $1, $2
             FROM outbox WHERE seq = $3 AND claimed_by = $4 AND published_at IS NULL",
        )
        .bind(error)
        .bind(to_rfc3339(at))
        .bind(seq)
        .bind(holder)
        .execute(&mut *tx)
        .await?;
        if moved.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query("DELETE FROM outbox WHERE seq = $1")
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Dead letters, newest first (at most `limit`).
    pub async fn dead_letters(&self, limit: i64) -> Result<Vec<DeadLetter>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, id, topic, subject, created_at, attempts, last_error, dead_at
             FROM outbox_dead_letters ORDER BY dead_at DESC, seq DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(DeadLetter::from_row).collect()
    }

    /// Number of dead letters.
    pub async fn dead_letter_count(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM outbox_dead_letters")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("n")?)
    }

    /// Puts a dead letter back into the outbox (same message id, due at `at`, no
    /// attempts counted) in the caller's transaction; `None` when there is no such
    /// dead letter. It is delivered after the rows of its subject already waiting.
    pub async fn requeue_dead_letter(
        tx: &mut StoreTx,
        seq: i64,
        at: OffsetDateTime,
    ) -> Result<Option<DeadLetter>, StoreError> {
        let Some(letter) = Self::take_dead_letter(tx, seq).await? else {
            return Ok(None);
        };
        let payload: String =
            sqlx::query_scalar("SELECT payload FROM outbox_dead_letters WHERE seq = $1")
                .bind(seq)
                .fetch_one(&mut **tx)
                .await?;
        sqlx::query("DELETE FROM outbox_dead_letters WHERE seq = $1")
            .bind(seq)
            .execute(&mut **tx)
            .await?;
        let now = to_rfc3339(at);
        sqlx::query(
            "INSERT INTO outbox (id, topic, subject, payload, created_at, available_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&letter.id)
        .bind(&letter.topic)
        .bind(&letter.subject)
        .bind(&payload)
        .bind(&letter.created_at)
        .bind(&now)
        .execute(&mut **tx)
        .await?;
        Ok(Some(letter))
    }

    /// Deletes a dead letter for good in the caller's transaction; `None` when there is
    /// no such dead letter.
    pub async fn discard_dead_letter(
        tx: &mut StoreTx,
        seq: i64,
    ) -> Result<Option<DeadLetter>, StoreError> {
        let Some(letter) = Self::take_dead_letter(tx, seq).await? else {
            return Ok(None);
        };
        sqlx::query("DELETE FROM outbox_dead_letters WHERE seq = $1")
            .bind(seq)
            .execute(&mut **tx)
            .await?;
        Ok(Some(letter))
    }

    async fn take_dead_letter(
        tx: &mut StoreTx,
        seq: i64,
    ) -> Result<Option<DeadLetter>, StoreError> {
        let row = sqlx::query(
            "SELECT seq, id, topic, subject, created_at, attempts, last_error, dead_at
             FROM outbox_dead_letters WHERE seq = $1",
        )
        .bind(seq)
        .fetch_optional(&mut **tx)
        .await?;
        row.as_ref().map(DeadLetter::from_row).transpose()
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

/// The claim statement of [`Store::claim_outbox`] for `topics` (`$1` holder, `$2` claimed
/// until, `$3` now, `$4` limit); public for the query-plan test (`common/tests/store_plans.rs`:
/// the walk in `seq` order reads only undelivered rows, through `outbox_unpublished_by_seq`).
pub fn claim_outbox_sql(dialect: Dialect, topics: &[&str]) -> String {
    let topic_list = topics
        .iter()
        .map(|t| format!("'{}'", t.replace('\'', "")))
        .collect::<Vec<_>>()
        .join(",");
    // PostgreSQL: lock the chosen rows, skipping rows another relay is claiming right
    // now, so concurrent claims never wait on each other (they deadlocked under load).
    // A row is due only when it is the oldest undelivered one of its subject and topic:
    // written as `seq = MIN(...)`, an index lookup per row on `outbox_pending_by_subject`
    // whatever the planner's statistics (an anti-join on a freshly filled, not yet
    // analyzed table was planned as a nested loop over every pair of rows).
    let due = format!(
        "SELECT o.seq FROM outbox o
                 WHERE o.published_at IS NULL AND o.available_at <= $3 AND o.topic IN ({topic_list})
                   AND (o.claimed_until IS NULL OR o.claimed_until < $3)
                   AND o.seq = (SELECT MIN(e.seq) FROM outbox e WHERE e.subject = o.subject
                                AND e.topic = o.topic AND e.published_at IS NULL)
                 ORDER BY o.seq LIMIT $4"
    );
    match dialect {
        // The locking choice is a MATERIALIZED CTE, run once per statement. As an
        // `IN (subquery)` it was planned (on a table not yet analyzed) as a nested-loop
        // semi-join that ran the LIMIT/LockRows subquery again for every undelivered row:
        // quadratic in the backlog, claims of 500 s holding their locks, and a distributed
        // night of 2,000 applications released at once stalled 173 short.
        Dialect::Postgres => format!(
            "WITH due AS MATERIALIZED ({due} FOR UPDATE OF o SKIP LOCKED)
             UPDATE outbox SET claimed_by = $1, claimed_until = $2
             FROM due
             WHERE outbox.seq = due.seq
               AND outbox.published_at IS NULL
               AND (outbox.claimed_until IS NULL OR outbox.claimed_until < $3)
             RETURNING outbox.seq, outbox.id, outbox.topic, outbox.subject, outbox.payload,
                       outbox.attempts, outbox.created_at"
        ),
        // One writer at a time: nothing to lock, and SQLite runs the `IN` list once.
        Dialect::Sqlite => format!(
            "UPDATE outbox SET claimed_by = $1, claimed_until = $2
             WHERE seq IN ({due})
               AND published_at IS NULL AND (claimed_until IS NULL OR claimed_until < $3)
             RETURNING seq, id, topic, subject, payload, attempts, created_at"
        ),
    }
}
