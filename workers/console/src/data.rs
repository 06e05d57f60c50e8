//! What the console and `cardpipe ops` show: read-only queries over the store, the broker and
//! the encoder farm. No personal data leaves here except the applicant's names (for the
//! operator's eyes) and a masked national code.

use std::collections::BTreeMap;

use cardpipe_common::broker::QueueDepth;
use cardpipe_common::clock::to_rfc3339;
use cardpipe_common::domain::state::ALL_STATES;
use cardpipe_common::domain::{Application, ApplicationId, ApplicationState, HistoryEntry};
use cardpipe_common::records;
use cardpipe_common::runtime::Services;
use cardpipe_common::store::{Dialect, StoreError};
use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;

/// States in which an application is still on the production line (not yet come out at the
/// other end, and not waiting for a person).
pub const IN_PRODUCTION: &[ApplicationState] = &[
    ApplicationState::Received,
    ApplicationState::DedupPending,
    ApplicationState::DedupClear,
    ApplicationState::Cleared,
    ApplicationState::KeysIssued,
    ApplicationState::QcFailed,
    ApplicationState::ReprintRequested,
];

/// The pipeline at a glance.
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    /// Applications per state (every state, zero included), pipeline order.
    pub states: Vec<(ApplicationState, i64)>,
    /// Queue depths per stage, when the broker answers.
    pub queues: Vec<(String, Option<QueueDepth>)>,
    /// State changes in the last hour, per state entered.
    pub throughput_last_hour: Vec<(String, i64)>,
    /// Parked jobs.
    pub parked: i64,
    /// The newest batches.
    pub batches: Vec<BatchProgress>,
}

/// A batch and how far its applications got.
#[derive(Debug, Clone, Serialize)]
pub struct BatchProgress {
    /// Batch id.
    pub id: String,
    /// Registry client.
    pub client: String,
    /// Batch state (receiving, received, scheduled, released, cancelled).
    pub state: String,
    /// Priority.
    pub priority: String,
    /// Records in the file.
    pub records: i64,
    /// Accepted records (applications).
    pub accepted: i64,
    /// Rejected records.
    pub rejected: i64,
    /// When it was received.
    pub created_at: String,
    /// Applications per state.
    pub states: BTreeMap<String, i64>,
}

impl BatchProgress {
    /// Applications of the batch.
    pub fn applications(&self) -> i64 {
        self.states.values().sum()
    }

    /// Applications past the production line (or waiting for a person, or final).
    pub fn done(&self) -> i64 {
        self.states
            .iter()
            .filter(|(s, _)| {
                s.parse::<ApplicationState>()
                    .map(|s| !IN_PRODUCTION.contains(&s))
                    .unwrap_or(true)
            })
            .map(|(_, n)| n)
            .sum()
    }

    /// done / applications, 0..=1.
    pub fn fraction(&self) -> f64 {
        let all = self.applications();
        if all == 0 {
            0.0
        } else {
            self.done() as f64 / all as f64
        }
    }
}

/// Builds the overview; `stages` names the stages whose queues to show.
pub async fn overview(services: &Services, stages: &[String]) -> anyhow::Result<Overview> {
    let counted: BTreeMap<ApplicationState, i64> =
        services.store.count_by_state().await?.into_iter().collect();
    let states = ALL_STATES
        .iter()
        .map(|s| (*s, counted.get(s).copied().unwrap_or(0)))
        .collect();
    let mut queues = Vec::new();
    for stage in stages {
        queues.push((stage.clone(), services.broker.depth(stage).await.ok()));
    }
    let since = to_rfc3339(services.clock.now() - time::Duration::hours(1));
    let rows = sqlx::query(
        "SELECT to_state, COUNT(*) AS n FROM application_history WHERE at >= $1
         GROUP BY to_state ORDER BY to_state",
    )
    .bind(&since)
    .fetch_all(services.store.pool())
    .await?;
    let mut throughput = Vec::new();
    for r in rows {
        throughput.push((r.try_get("to_state")?, r.try_get("n")?));
    }
    let parked: i64 = sqlx::query("SELECT COUNT(*) AS n FROM parked_jobs")
        .fetch_one(services.store.pool())
        .await?
        .try_get("n")?;
    Ok(Overview {
        states,
        queues,
        throughput_last_hour: throughput,
        parked,
        batches: batches(services, 20).await?,
    })
}

fn batch_from_row(r: &AnyRow) -> Result<BatchProgress, sqlx::Error> {
    Ok(BatchProgress {
        id: r.try_get("id")?,
        client: r.try_get("client")?,
        state: r.try_get("state")?,
        priority: r.try_get("priority")?,
        records: r.try_get("total_records")?,
        accepted: r.try_get("accepted")?,
        rejected: r.try_get("rejected")?,
        created_at: r.try_get("created_at")?,
        states: BTreeMap::new(),
    })
}

async fn batch_states(services: &Services, b: &mut BatchProgress) -> Result<(), StoreError> {
    let rows = sqlx::query(
        "SELECT state, COUNT(*) AS n FROM applications WHERE batch_id = $1 GROUP BY state",
    )
    .bind(&b.id)
    .fetch_all(services.store.pool())
    .await?;
    for r in rows {
        b.states.insert(r.try_get("state")?, r.try_get("n")?);
    }
    Ok(())
}

/// The newest `limit` batches with their progress.
pub async fn batches(services: &Services, limit: i64) -> anyhow::Result<Vec<BatchProgress>> {
    let rows = sqlx::query(
        "SELECT id, client, state, priority, total_records, accepted, rejected, created_at
         FROM batches ORDER BY created_at DESC, id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(services.store.pool())
    .await?;
    let mut out = Vec::new();
    for r in &rows {
        let mut b = batch_from_row(r)?;
        batch_states(services, &mut b).await?;
        out.push(b);
    }
    Ok(out)
}

/// One batch with its progress.
pub async fn batch(services: &Services, id: &str) -> anyhow::Result<Option<BatchProgress>> {
    let row = sqlx::query(
        "SELECT id, client, state, priority, total_records, accepted, rejected, created_at
         FROM batches WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(services.store.pool())
    .await?;
    let Some(row) = row else { return Ok(None) };
    let mut b = batch_from_row(&row)?;
    batch_states(services, &mut b).await?;
    Ok(Some(b))
}

/// Applications of a batch (id, registry id, state, updated), first `limit`.
pub async fn batch_applications(
    services: &Services,
    id: &str,
    limit: i64,
) -> anyhow::Result<Vec<(String, String, String, String)>> {
    let rows = sqlx::query(
        "SELECT id, registry_id, state, updated_at FROM applications WHERE batch_id = $1
         ORDER BY registry_id LIMIT $2",
    )
    .bind(id)
    .bind(limit)
    .fetch_all(services.store.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("id")?,
                r.try_get("registry_id")?,
                r.try_get("state")?,
                r.try_get("updated_at")?,
            ))
        })
        .collect()
}

/// Finds an application by cardpipe id, registry application id or follow-up tracking code.
pub async fn find(services: &Services, query: &str) -> anyhow::Result<Option<ApplicationId>> {
    let q = query.trim();
    if q.is_empty() || q.len() > 128 {
        return Ok(None);
    }
    if let Some(app) = services
        .store
        .application(&ApplicationId(q.to_owned()))
        .await?
    {
        return Ok(Some(app.id));
    }
    if let Some(app) = services.store.application_by_registry_id(q).await? {
        return Ok(Some(app.id));
    }
    Ok(records::find_by_tracking_code(services, q).await?)
}

/// `۱۲۳۴۵۶۷۸۹۰` → `******7890`: all but the last four digits hidden.
pub fn mask_national_code(code: &str) -> String {
    let chars: Vec<char> = code.chars().collect();
    let keep = chars.len().min(4);
    let hidden = chars.len() - keep;
    "*".repeat(hidden) + &chars[hidden..].iter().collect::<String>()
}

/// An application as the console shows it.
#[derive(Debug, Clone)]
pub struct ApplicationView {
    /// The application.
    pub app: Application,
    /// Given name, surname and father's name (Persian), when the record opens.
    pub names: Option<(String, String, String)>,
    /// Masked national code.
    pub national_code: Option<String>,
    /// Follow-up tracking code.
    pub tracking_code: Option<String>,
    /// Pickup office.
    pub pickup_office: Option<String>,
    /// Every transition, oldest first.
    pub history: Vec<HistoryEntry>,
    /// Artifacts (kind, object key).
    pub artifacts: Vec<(String, String)>,
    /// Parked jobs of this application.
    pub parked: Vec<cardpipe_common::runtime::parked::ParkedJob>,
}

/// Loads an application's view.
pub async fn application(
    services: &Services,
    id: &ApplicationId,
) -> anyhow::Result<Option<ApplicationView>> {
    let Some(app) = services.store.application(id).await? else {
        return Ok(None);
    };
    let record = records::load_record(services, id).await.ok();
    let history = services.store.history(id).await?;
    let artifacts = services.store.artifacts(id).await?;
    let parked = cardpipe_common::runtime::parked::list(services, None)
        .await?
        .into_iter()
        .filter(|p| p.subject == id.as_str())
        .collect();
    Ok(Some(ApplicationView {
        app,
        names: record.as_ref().map(|r| {
            (
                r.first_name.clone(),
                r.last_name.clone(),
                r.father_name.clone(),
            )
        }),
        national_code: record
            .as_ref()
            .map(|r| mask_national_code(&r.national_code)),
        tracking_code: record.as_ref().map(|r| r.tracking_code.clone()),
        pickup_office: record.as_ref().map(|r| r.pickup_office.clone()),
        history,
        artifacts,
        parked,
    }))
}

/// A possible duplicate waiting for an operator.
#[derive(Debug, Clone, Serialize)]
pub struct PendingAdjudication {
    /// The application.
    pub application_id: String,
    /// The registry's id.
    pub registry_id: String,
    /// When it was flagged.
    pub flagged_at: String,
    /// Candidates found.
    pub candidates: i64,
    /// Best fused score.
    pub best_score: f64,
}

/// Possible duplicates, oldest first.
pub async fn adjudications(services: &Services) -> anyhow::Result<Vec<PendingAdjudication>> {
    let rows = sqlx::query(
        "SELECT a.id, a.registry_id, a.updated_at, COUNT(c.rank) AS candidates, MAX(c.score) AS best
         FROM applications a JOIN dedup_candidates c ON c.application_id = a.id
         WHERE a.state = $1 GROUP BY a.id, a.registry_id, a.updated_at
         ORDER BY a.updated_at, a.id LIMIT 1000",
    )
    .bind(ApplicationState::PossibleDuplicate.as_str())
    .fetch_all(services.store.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(PendingAdjudication {
                application_id: r.try_get("id")?,
                registry_id: r.try_get("registry_id")?,
                flagged_at: r.try_get("updated_at")?,
                candidates: r.try_get("candidates")?,
                best_score: r.try_get("best")?,
            })
        })
        .collect()
}

/// One encoder: the farm's live view when this process drives it, and its record from the
/// cards table.
#[derive(Debug, Clone, Serialize)]
pub struct EncoderView {
    /// Reader name.
    pub name: String,
    /// Present and driven by this process (None: not driven here).
    pub present: Option<bool>,
    /// In service (from the farm, else the last operator decision, else true).
    pub in_service: bool,
    /// Why it is out of service.
    pub reason: Option<String>,
    /// Busy now (farm only).
    pub busy: Option<bool>,
    /// Cards personalized (cards table).
    pub personalized: i64,
    /// Blanks spoiled (cards table).
    pub spoiled: i64,
    /// Cards personalized in the last hour (cards table).
    pub last_hour: i64,
}

impl EncoderView {
    /// personalized / (personalized + spoiled); None before any card.
    pub fn yield_ratio(&self) -> Option<f64> {
        let all = self.personalized + self.spoiled;
        (all > 0).then(|| self.personalized as f64 / all as f64)
    }
}

/// Every encoder known to the farm, the cards table or an operator decision.
pub async fn encoders(
    services: &Services,
    farm: Option<&cardpipe_card::farm::Farm>,
) -> anyhow::Result<Vec<EncoderView>> {
    let mut out: BTreeMap<String, EncoderView> = BTreeMap::new();
    let blank = |name: &str| EncoderView {
        name: name.to_owned(),
        present: None,
        in_service: true,
        reason: None,
        busy: None,
        personalized: 0,
        spoiled: 0,
        last_hour: 0,
    };
    let since = to_rfc3339(services.clock.now() - time::Duration::hours(1));
    let rows = sqlx::query(
        "SELECT encoder,
                SUM(CASE WHEN state = 'spoiled' THEN 0 ELSE 1 END) AS good,
                SUM(CASE WHEN state = 'spoiled' THEN 1 ELSE 0 END) AS bad,
                SUM(CASE WHEN state <> 'spoiled' AND updated_at >= $1 THEN 1 ELSE 0 END) AS recent
         FROM cards GROUP BY encoder",
    )
    .bind(&since)
    .fetch_all(services.store.pool())
    .await?;
    for r in rows {
        let name: String = r.try_get("encoder")?;
        let e = out.entry(name.clone()).or_insert_with(|| blank(&name));
        e.personalized = r.try_get("good")?;
        e.spoiled = r.try_get("bad")?;
        e.last_hour = r.try_get("recent")?;
    }
    let rows = sqlx::query("SELECT encoder, in_service, reason FROM encoder_service")
        .fetch_all(services.store.pool())
        .await?;
    for r in rows {
        let name: String = r.try_get("encoder")?;
        let e = out.entry(name.clone()).or_insert_with(|| blank(&name));
        e.in_service = r.try_get::<i64, _>("in_service")? != 0;
        let reason: String = r.try_get("reason")?;
        e.reason = (!e.in_service).then_some(reason);
    }
    if let Some(farm) = farm {
        for s in farm.status() {
            let e = out.entry(s.name.clone()).or_insert_with(|| blank(&s.name));
            e.present = Some(s.present);
            e.in_service = s.in_service;
            e.reason = s.out_of_service_reason.clone();
            e.busy = Some(s.busy);
        }
    }
    Ok(out.into_values().collect())
}

/// Does `table` exist in the store?
pub async fn table_exists(services: &Services, table: &str) -> anyhow::Result<bool> {
    Ok(!tables_like(services, table).await?.is_empty())
}

/// Tables whose name is `pattern` or, with a trailing `%`, starts with it.
pub async fn tables_like(services: &Services, pattern: &str) -> anyhow::Result<Vec<String>> {
    let sql = match services.store.dialect() {
        Dialect::Postgres => {
            "SELECT CAST(table_name AS TEXT) AS name FROM information_schema.tables
             WHERE table_schema = current_schema() AND table_name LIKE $1 ORDER BY table_name"
        }
        Dialect::Sqlite => {
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE $1 ORDER BY name"
        }
    };
    let rows = sqlx::query(sql)
        .bind(pattern)
        .fetch_all(services.store.pool())
        .await?;
    rows.iter()
        .map(|r| Ok(r.try_get::<String, _>("name")?))
        .collect()
}

/// Columns never shown from a generic table (personal data or secrets).
fn hidden_column(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "national",
        "sealed",
        "pin",
        "secret",
        "key",
        "template",
        "photo",
        "mobile",
        "address",
        "phone",
        "birth",
        "first_name",
        "last_name",
        "father",
        "token",
        "sha256",
    ]
    .iter()
    .any(|w| n.contains(w))
}

/// The QC reports of an application (checked at, outcome, reason, blank serial, chip serial,
/// elapsed ms, report object key), oldest first.
pub async fn qc_reports(
    services: &Services,
    id: &ApplicationId,
) -> anyhow::Result<Vec<Vec<String>>> {
    let rows = sqlx::query(
        "SELECT checked_at, outcome, reason, blank_serial, chip_serial, elapsed_ms, object_key
         FROM qc_reports WHERE application_id = $1 ORDER BY checked_at, id",
    )
    .bind(id.as_str())
    .fetch_all(services.store.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(vec![
                r.try_get::<String, _>("checked_at")?,
                r.try_get::<String, _>("outcome")?,
                r.try_get::<Option<String>, _>("reason")?
                    .unwrap_or_default(),
                r.try_get::<String, _>("blank_serial")?,
                r.try_get::<Option<String>, _>("chip_serial")?
                    .unwrap_or_default(),
                r.try_get::<i64, _>("elapsed_ms")?.to_string(),
                r.try_get::<String, _>("object_key")?,
            ])
        })
        .collect()
}

/// The certificates issued for an application (serial, key role, issued at, status,
/// revocation cause, revoked at), oldest first: a card refused by QC shows its two revoked
/// `spoiled`, the remake its fresh pair.
pub async fn certificates(
    services: &Services,
    id: &ApplicationId,
) -> anyhow::Result<Vec<Vec<String>>> {
    let rows = sqlx::query(
        "SELECT serial, key_role, issued_at, status, revocation_cause, revoked_at
         FROM certificates WHERE application_id = $1 ORDER BY issued_at, serial",
    )
    .bind(id.as_str())
    .fetch_all(services.store.pool())
    .await?;
    rows.iter()
        .map(|r| {
            let text = |c: &str| -> anyhow::Result<String> {
                Ok(r.try_get::<Option<String>, _>(c)?.unwrap_or_default())
            };
            Ok(vec![
                text("serial")?,
                text("key_role")?,
                text("issued_at")?,
                text("status")?,
                text("revocation_cause")?,
                text("revoked_at")?,
            ])
        })
        .collect()
}

/// A table read generically: column names and up to `limit` rows as text.
#[derive(Debug, Clone, Serialize)]
pub struct GenericTable {
    /// Table name.
    pub name: String,
    /// Shown columns.
    pub columns: Vec<String>,
    /// Rows.
    pub rows: Vec<Vec<String>>,
    /// Rows in the table.
    pub total: i64,
}

fn cell(row: &AnyRow, i: usize) -> String {
    if let Ok(v) = row.try_get::<Option<String>, _>(i) {
        return v.unwrap_or_default();
    }
    if let Ok(v) = row.try_get::<Option<i64>, _>(i) {
        return v.map(|v| v.to_string()).unwrap_or_default();
    }
    if let Ok(v) = row.try_get::<Option<f64>, _>(i) {
        return v.map(|v| format!("{v:.3}")).unwrap_or_default();
    }
    if let Ok(v) = row.try_get::<Option<bool>, _>(i) {
        return v.map(|v| v.to_string()).unwrap_or_default();
    }
    "…".to_owned()
}

/// Reads a table generically (names checked against the catalogue first, so no injection).
pub async fn read_table(
    services: &Services,
    table: &str,
    limit: i64,
) -> anyhow::Result<GenericTable> {
    if !table
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        || !table_exists(services, table).await?
    {
        anyhow::bail!("no table {table:?}");
    }
    let total: i64 = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*) AS n FROM {table}"
    )))
    .fetch_one(services.store.pool())
    .await?
    .try_get("n")?;
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT * FROM {table} LIMIT {}",
        limit.clamp(1, 1000)
    )))
    .fetch_all(services.store.pool())
    .await?;
    let mut columns = Vec::new();
    let mut shown = Vec::new();
    if let Some(first) = rows.first() {
        use sqlx::Column;
        for (i, c) in first.columns().iter().enumerate() {
            if !hidden_column(c.name()) {
                columns.push(c.name().to_owned());
                shown.push(i);
            }
        }
    }
    let rows = rows
        .iter()
        .map(|r| shown.iter().map(|i| cell(r, *i)).collect())
        .collect();
    Ok(GenericTable {
        name: table.to_owned(),
        columns,
        rows,
        total,
    })
}

/// The tables of an area that exist (`stock`: blank-card lots and stock; `shipments`: boxes,
/// shipments, offices and discrepancies), read generically.
pub async fn area_tables(services: &Services, area: &str) -> anyhow::Result<Vec<GenericTable>> {
    let patterns: &[&str] = match area {
        "stock" => &["stock%", "blank%", "lot%", "qc%"],
        "shipments" => &[
            "shipment%",
            "box%",
            "office%",
            "deliver%",
            "pickup%",
            "reminder%",
            "sms%",
        ],
        _ => &[],
    };
    let mut names = Vec::new();
    for p in patterns {
        for t in tables_like(services, p).await? {
            if !names.contains(&t) {
                names.push(t);
            }
        }
    }
    let mut out = Vec::new();
    for t in names {
        // A table whose column types the generic reader cannot decode is listed, not fatal.
        match read_table(services, &t, 200).await {
            Ok(table) => out.push(table),
            Err(e) => {
                tracing::warn!(table = %t, error = %e, "console cannot show this table generically");
                out.push(GenericTable {
                    name: t,
                    columns: vec!["note".into()],
                    rows: vec![vec![format!("cannot be shown generically: {e}")]],
                    total: 0,
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn national_codes_are_masked_to_the_last_four() {
        assert_eq!(mask_national_code("0012345679"), "******5679");
        assert_eq!(mask_national_code("123"), "123");
        assert!(hidden_column("national_code_digest"));
        assert!(!hidden_column("box_id"));
        assert!(hidden_column("token_sha256"));
    }
}
