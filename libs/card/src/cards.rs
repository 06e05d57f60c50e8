//! The `cards` table (migrations `0005_cards.sql`): one row per blank card body fed to an
//! encoder — `in_progress` while it is written, then `personalized` or `spoiled` with the
//! reason. The personalize stage writes it; QC and the stock reconciliation read and update
//! it.

use cardpipe_common::clock::to_rfc3339;
use cardpipe_common::domain::ApplicationId;
use cardpipe_common::store::{Store, StoreError, StoreTx};
use sqlx::Row;
use time::OffsetDateTime;

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
