//! Applications, their history and artifact keys.

use sqlx::Row;
use sqlx::any::AnyRow;
use time::OffsetDateTime;

use super::{Store, StoreError, StoreTx};
use crate::clock::{from_rfc3339, to_rfc3339};
use crate::domain::{Application, ApplicationId, ApplicationState, HistoryEntry, Priority};

/// An application as intake creates it.
#[derive(Debug, Clone)]
pub struct NewApplication {
    /// cardpipe's id.
    pub id: ApplicationId,
    /// The registry's id.
    pub registry_id: String,
    /// The batch it came in.
    pub batch_id: Option<String>,
    /// Its first state (normally `received`).
    pub state: ApplicationState,
    /// Urgent or normal.
    pub priority: Priority,
}

fn corrupt(column: &'static str, message: impl ToString) -> StoreError {
    StoreError::Corrupt {
        table: "applications",
        column,
        message: message.to_string(),
    }
}

fn read_time(row: &AnyRow, column: &'static str) -> Result<OffsetDateTime, StoreError> {
    let text: String = row.try_get(column)?;
    from_rfc3339(&text).map_err(|e| corrupt(column, e))
}

fn read_application(row: &AnyRow) -> Result<Application, StoreError> {
    let state: String = row.try_get("state")?;
    let priority: String = row.try_get("priority")?;
    Ok(Application {
        id: ApplicationId(row.try_get("id")?),
        registry_id: row.try_get("registry_id")?,
        batch_id: row.try_get("batch_id")?,
        state: state.parse().map_err(|e| corrupt("state", e))?,
        priority: Priority::parse(&priority),
        version: row.try_get("version")?,
        created_at: read_time(row, "created_at")?,
        updated_at: read_time(row, "updated_at")?,
    })
}

const APPLICATION_COLUMNS: &str =
    "id, registry_id, batch_id, state, priority, version, created_at, updated_at";

/// One state change to record.
#[derive(Debug, Clone)]
pub struct Transition<'a> {
    /// The application.
    pub id: &'a ApplicationId,
    /// The state the caller believes it is in.
    pub from: ApplicationState,
    /// The state to move to (checked by the state machine).
    pub to: ApplicationState,
    /// Stage or action name.
    pub stage: &'a str,
    /// Delivery attempt (0 for actions).
    pub attempt: u32,
    /// `stage:<name>`, `registry:<client>`, `operator:<login>`.
    pub actor: &'a str,
    /// Why, when there is a reason to give.
    pub reason: Option<&'a str>,
    /// When.
    pub at: OffsetDateTime,
}

impl Store {
    /// Inserts a new application and its creation history row.
    pub async fn insert_application(
        tx: &mut StoreTx,
        app: &NewApplication,
        actor: &str,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let now = to_rfc3339(at);
        sqlx::query(
            "INSERT INTO applications (id, registry_id, batch_id, state, priority, version, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, 0, $6, $6)",
        )
        .bind(app.id.as_str())
        .bind(&app.registry_id)
        .bind(app.batch_id.as_deref())
        .bind(app.state.as_str())
        .bind(app.priority.as_str())
        .bind(&now)
        .execute(&mut **tx)
        .await?;
        insert_history(tx, &app.id, None, app.state, "intake", 0, actor, None, &now).await
    }

    /// Moves an application from `from` to `to` if, and only if, it is still
    /// in `from` (compare-and-set) and the state machine allows it; writes
    /// the history row in the same transaction.
    ///
    /// Returns `Ok(false)` when the application was no longer in `from`:
    /// someone else already made this move, so the caller must not repeat its
    /// visible effects.
    pub async fn transition(tx: &mut StoreTx, t: &Transition<'_>) -> Result<bool, StoreError> {
        t.from.transition(t.to)?;
        let now = to_rfc3339(t.at);
        let done = sqlx::query(
            "UPDATE applications SET state = $1, version = version + 1, updated_at = $2
             WHERE id = $3 AND state = $4",
        )
        .bind(t.to.as_str())
        .bind(&now)
        .bind(t.id.as_str())
        .bind(t.from.as_str())
        .execute(&mut **tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        insert_history(
            tx,
            t.id,
            Some(t.from),
            t.to,
            t.stage,
            t.attempt,
            t.actor,
            t.reason,
            &now,
        )
        .await?;
        Ok(true)
    }

    /// Records (or replaces) the object key of an application's artifact.
    pub async fn put_artifact(
        tx: &mut StoreTx,
        id: &ApplicationId,
        kind: &str,
        object_key: &str,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO artifacts (application_id, kind, object_key, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (application_id, kind) DO UPDATE SET object_key = excluded.object_key, created_at = excluded.created_at",
        )
        .bind(id.as_str())
        .bind(kind)
        .bind(object_key)
        .bind(to_rfc3339(at))
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// The object key of an application's artifact.
    pub async fn artifact(
        &self,
        id: &ApplicationId,
        kind: &str,
    ) -> Result<Option<String>, StoreError> {
        let row =
            sqlx::query("SELECT object_key FROM artifacts WHERE application_id = $1 AND kind = $2")
                .bind(id.as_str())
                .bind(kind)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| r.try_get("object_key")).transpose()?)
    }

    /// Every artifact of an application: (kind, object key).
    pub async fn artifacts(&self, id: &ApplicationId) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT kind, object_key FROM artifacts WHERE application_id = $1 ORDER BY kind",
        )
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("kind")?, r.try_get("object_key")?)))
            .collect()
    }

    /// One application.
    pub async fn application(&self, id: &ApplicationId) -> Result<Option<Application>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {APPLICATION_COLUMNS} FROM applications WHERE id = $1"
        )))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(read_application).transpose()
    }

    /// One application by the registry's id.
    pub async fn application_by_registry_id(
        &self,
        registry_id: &str,
    ) -> Result<Option<Application>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {APPLICATION_COLUMNS} FROM applications WHERE registry_id = $1"
        )))
        .bind(registry_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(read_application).transpose()
    }

    /// One application by any of the names the outside world knows it by: cardpipe's id, the
    /// registry's id or the citizen's tracking code (tried in that order; the three are
    /// distinct formats, and each is unique).
    pub async fn application_by_reference(
        &self,
        reference: &str,
    ) -> Result<Option<Application>, StoreError> {
        let reference = reference.trim();
        if reference.is_empty() {
            return Ok(None);
        }
        if let Some(app) = self
            .application(&ApplicationId(reference.to_owned()))
            .await?
        {
            return Ok(Some(app));
        }
        if let Some(app) = self.application_by_registry_id(reference).await? {
            return Ok(Some(app));
        }
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {APPLICATION_COLUMNS} FROM applications
             WHERE id = (SELECT application_id FROM applicant_records WHERE tracking_code = $1)"
        )))
        .bind(reference)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(read_application).transpose()
    }

    /// Ids of applications in `state`, oldest change first.
    pub async fn application_ids_in_state(
        &self,
        state: ApplicationState,
        limit: i64,
    ) -> Result<Vec<ApplicationId>, StoreError> {
        let rows = sqlx::query(
            "SELECT id FROM applications WHERE state = $1 ORDER BY updated_at, id LIMIT $2",
        )
        .bind(state.as_str())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok(ApplicationId(r.try_get("id")?)))
            .collect()
    }

    /// The history of an application, oldest first.
    pub async fn history(&self, id: &ApplicationId) -> Result<Vec<HistoryEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT application_id, from_state, to_state, stage, attempt, actor, reason, at
             FROM application_history WHERE application_id = $1 ORDER BY id",
        )
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let from: Option<String> = row.try_get("from_state")?;
                let to: String = row.try_get("to_state")?;
                let attempt: i64 = row.try_get("attempt")?;
                let at: String = row.try_get("at")?;
                let bad = |c, e: &dyn std::fmt::Display| StoreError::Corrupt {
                    table: "application_history",
                    column: c,
                    message: e.to_string(),
                };
                Ok(HistoryEntry {
                    application_id: ApplicationId(row.try_get("application_id")?),
                    from_state: from
                        .map(|s| s.parse())
                        .transpose()
                        .map_err(|e| bad("from_state", &e))?,
                    to_state: to.parse().map_err(|e| bad("to_state", &e))?,
                    stage: row.try_get("stage")?,
                    attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
                    actor: row.try_get("actor")?,
                    reason: row.try_get("reason")?,
                    at: from_rfc3339(&at).map_err(|e| bad("at", &e))?,
                })
            })
            .collect()
    }

    /// Applications received before `received_before` whose card has not reached a pickup
    /// office (a card transferred on from its first office has) and that are still being worked on (not collected, voided, cancelled,
    /// rejected or a confirmed duplicate): the programme promises a card within a month.
    pub async fn count_overdue(&self, received_before: OffsetDateTime) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM applications
             WHERE created_at < $1 AND state NOT IN
               ('at_office', 'in_transit', 'collected', 'voided', 'cancelled', 'rejected', 'confirmed_duplicate')",
        )
        .bind(to_rfc3339(received_before))
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("n")?)
    }

    /// When the newest CRL was published and its nextUpdate, if any CRL was published.
    pub async fn latest_crl_times(
        &self,
    ) -> Result<Option<(OffsetDateTime, OffsetDateTime)>, StoreError> {
        let row = sqlx::query(
            "SELECT published_at, next_update FROM crl_state ORDER BY number DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let at: String = r.try_get("published_at")?;
            let next: String = r.try_get("next_update")?;
            let bad = |column: &'static str, e: &dyn ToString| StoreError::Corrupt {
                table: "crl_state",
                column,
                message: e.to_string(),
            };
            Ok((
                from_rfc3339(&at).map_err(|e| bad("published_at", &e))?,
                from_rfc3339(&next).map_err(|e| bad("next_update", &e))?,
            ))
        })
        .transpose()
    }

    /// Number of applications in each state (states with none are omitted).
    pub async fn count_by_state(&self) -> Result<Vec<(ApplicationState, i64)>, StoreError> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM applications GROUP BY state")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let state: String = r.try_get("state")?;
                Ok((
                    state.parse().map_err(|e| corrupt("state", e))?,
                    r.try_get("n")?,
                ))
            })
            .collect()
    }
}

#[allow(clippy::too_many_arguments)]
async fn insert_history(
    tx: &mut StoreTx,
    id: &ApplicationId,
    from: Option<ApplicationState>,
    to: ApplicationState,
    stage: &str,
    attempt: u32,
    actor: &str,
    reason: Option<&str>,
    at: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO application_history (application_id, from_state, to_state, stage, attempt, actor, reason, at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(id.as_str())
    .bind(from.map(|s| s.as_str()))
    .bind(to.as_str())
    .bind(stage)
    .bind(i64::from(attempt))
    .bind(actor)
    .bind(reason)
    .bind(at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
