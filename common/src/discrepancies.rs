//! Office discrepancies (cards missing from, or extra in, a received box — raised by the
//! delivery stage when an office receives a box) and their resolution by a centre
//! supervisor. A shared operator work list, like [`crate::runtime::parked`]: the stage that
//! raises the items and the console that resolves them both use it.
//!
//! * a **missing** card is `found` (it turned up: the office can then receive it with a
//!   late receipt on the box, `POST /api/v1/delivery/boxes/{box}/receipt` with
//!   `"scanned": [id]`), or `lost` (lost in transit: in the same transaction a reprint with
//!   reason `lost_in_transit` is asked of QC's reprint workflow, outbox topic `qc.reprint`,
//!   which revokes the lost card's certificates and makes a new card);
//! * an **extra** card is `returned` (sent back to the centre or re-routed to its office).
//!
//! Who, when, the outcome and a note are stored on the discrepancy row and in the audit log.
//! The console (`/console/shipments`) and `cardpipe ops discrepancies` /
//! `cardpipe ops discrepancy-resolve` call [`resolve`] after checking the supervisor role.
//! Open discrepancies are counted by `cardpipe_delivery_discrepancies_open`.

use serde::Serialize;
use serde_json::json;
use sqlx::Row;

use crate::audit::{self, AuditEvent};
use crate::clock::to_rfc3339;
use crate::contract::{self, ReprintRequest};
use crate::domain::{ApplicationId, ApplicationState};
use crate::runtime::Services;
use crate::store::StoreError;

/// Why a discrepancy could not be listed or resolved.
#[derive(Debug, thiserror::Error)]
pub enum DiscrepancyError {
    /// The request is malformed (outcome, note).
    #[error("{0}")]
    BadRequest(String),
    /// Nothing with that id.
    #[error("{0} not found")]
    NotFound(String),
    /// Not in a state that allows it.
    #[error("{0}")]
    Conflict(String),
    /// Store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for DiscrepancyError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::from(e))
    }
}

/// How a discrepancy ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// A missing card turned up; the office may receive it.
    Found,
    /// A missing card was lost in transit: revoked and reprinted.
    Lost,
    /// An extra card was sent back to the centre or on to its own office.
    Returned,
}

impl Resolution {
    /// The stored code.
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Found => "found",
            Resolution::Lost => "lost",
            Resolution::Returned => "returned",
        }
    }

    /// Parses a code.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "found" => Some(Self::Found),
            "lost" => Some(Self::Lost),
            "returned" => Some(Self::Returned),
            _ => None,
        }
    }

    /// The outcomes that fit a discrepancy `kind` (`missing`, `extra`).
    pub fn for_kind(kind: &str) -> &'static [Resolution] {
        match kind {
            "missing" => &[Resolution::Found, Resolution::Lost],
            "extra" => &[Resolution::Returned],
            _ => &[],
        }
    }
}

/// A discrepancy row.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Discrepancy {
    /// Id.
    pub id: String,
    /// The box received.
    pub box_id: String,
    /// The office that received it.
    pub office_code: String,
    /// `missing` or `extra`.
    pub kind: String,
    /// The card (application id as scanned).
    pub application_id: String,
    /// Who reported it (`office:<code>:<clerk>`).
    pub reported_by: String,
    /// When.
    pub reported_at: String,
    /// When it was resolved (`None`: open).
    pub resolved_at: Option<String>,
    /// `found`, `lost` or `returned`.
    pub resolution: Option<String>,
    /// The operator who resolved it.
    pub resolved_by: Option<String>,
    /// The operator's note.
    pub resolution_note: Option<String>,
    /// The reprint requested for a lost card.
    pub reprint_id: Option<String>,
}

impl Discrepancy {
    /// Not resolved yet.
    pub fn is_open(&self) -> bool {
        self.resolved_at.is_none()
    }
}

const COLUMNS: &str = "id, box_id, office_code, kind, application_id, reported_by, reported_at,
     resolved_at, resolution, resolved_by, resolution_note, reprint_id";

fn from_row(r: &sqlx::any::AnyRow) -> Result<Discrepancy, sqlx::Error> {
    Ok(Discrepancy {
        id: r.try_get("id")?,
        box_id: r.try_get("box_id")?,
        office_code: r.try_get("office_code")?,
        kind: r.try_get("kind")?,
        application_id: r.try_get("application_id")?,
        reported_by: r.try_get("reported_by")?,
        reported_at: r.try_get("reported_at")?,
        resolved_at: r.try_get("resolved_at")?,
        resolution: r.try_get("resolution")?,
        resolved_by: r.try_get("resolved_by")?,
        resolution_note: r.try_get("resolution_note")?,
        reprint_id: r.try_get("reprint_id")?,
    })
}

/// Discrepancies, open ones first, then newest first (`open_only`: only open ones).
pub async fn list(
    services: &Services,
    open_only: bool,
) -> Result<Vec<Discrepancy>, DiscrepancyError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM delivery_discrepancies {} 
         ORDER BY CASE WHEN resolved_at IS NULL THEN 0 ELSE 1 END, reported_at DESC, id
         LIMIT 1000",
        if open_only {
            "WHERE resolved_at IS NULL"
        } else {
            ""
        }
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(services.store.pool())
        .await?;
    Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
}

/// One discrepancy.
pub async fn get(services: &Services, id: &str) -> Result<Option<Discrepancy>, DiscrepancyError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM delivery_discrepancies WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(services.store.pool())
    .await?;
    Ok(row.as_ref().map(from_row).transpose()?)
}

/// Open discrepancies in the store (the `cardpipe_delivery_discrepancies_open` gauge).
pub async fn open_count(services: &Services) -> Result<i64, DiscrepancyError> {
    Ok(
        sqlx::query("SELECT COUNT(*) AS n FROM delivery_discrepancies WHERE resolved_at IS NULL")
            .fetch_one(services.store.pool())
            .await?
            .try_get("n")?,
    )
}

/// What a resolution did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Resolved {
    /// The discrepancy as now stored.
    pub discrepancy: Discrepancy,
    /// The reprint asked for a lost card (its id; QC makes it).
    pub reprint_id: Option<String>,
}

/// Resolves discrepancy `id` with `outcome` (see the module docs) and a note; `by` = (login,
/// role) of the operator, whose role the caller has checked (supervisors).
pub async fn resolve(
    services: &Services,
    id: &str,
    outcome: &str,
    note: &str,
    by: (&str, &str),
) -> Result<Resolved, DiscrepancyError> {
    let note = note.trim();
    if note.is_empty() || note.chars().count() > 500 {
        return Err(DiscrepancyError::BadRequest(
            "note: 1..=500 characters are required".into(),
        ));
    }
    let d = get(services, id)
        .await?
        .ok_or_else(|| DiscrepancyError::NotFound(format!("discrepancy {id}")))?;
    if !d.is_open() {
        return Err(DiscrepancyError::Conflict(format!(
            "discrepancy {id} was already resolved ({})",
            d.resolution.as_deref().unwrap_or("?")
        )));
    }
    let allowed = Resolution::for_kind(&d.kind);
    let outcome = Resolution::parse(outcome)
        .filter(|o| allowed.contains(o))
        .ok_or_else(|| {
            DiscrepancyError::BadRequest(format!(
                "outcome: a {} card is resolved as {}",
                d.kind,
                allowed
                    .iter()
                    .map(|o| o.as_str())
                    .collect::<Vec<_>>()
                    .join(" or ")
            ))
        })?;
    let app_id = ApplicationId(d.application_id.clone());
    if outcome == Resolution::Found {
        let state = services.store.application(&app_id).await?.map(|a| a.state);
        if state != Some(ApplicationState::Shipped) {
            return Err(DiscrepancyError::Conflict(format!(
                "the card is {}; only a card still on its way (shipped) can be found",
                state.map_or("unknown", |s| s.as_str())
            )));
        }
    }
    if outcome == Resolution::Lost {
        let state = services.store.application(&app_id).await?.map(|a| a.state);
        if state != Some(ApplicationState::Shipped) {
            return Err(DiscrepancyError::Conflict(format!(
                "the card is {}; only a card still on its way (shipped) can be lost in transit",
                state.map_or("unknown", |s| s.as_str())
            )));
        }
    }
    let now = services.clock.now();
    let mut tx = services.store.begin().await?;
    // A card lost in transit is replaced: QC's reprint workflow (revocation of the lost
    // card's certificates, a new card) is asked for in this transaction.
    let reprint = (outcome == Resolution::Lost)
        .then(|| ReprintRequest::new(&app_id, "lost_in_transit", by.0));
    if let Some(r) = &reprint {
        contract::request_reprint(&mut tx, r, now).await?;
    }
    let reprint_id = reprint.as_ref().map(|r| r.id.clone());
    let done = sqlx::query(
        "UPDATE delivery_discrepancies SET resolved_at = $1, resolution = $2, resolved_by = $3,
             resolution_note = $4, reprint_id = $5
         WHERE id = $6 AND resolved_at IS NULL",
    )
    .bind(to_rfc3339(now))
    .bind(outcome.as_str())
    .bind(by.0)
    .bind(note)
    .bind(&reprint_id)
    .bind(id)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        return Err(DiscrepancyError::Conflict(format!(
            "discrepancy {id} was resolved meanwhile"
        )));
    }
    audit::record_in(
        &mut tx,
        now,
        &AuditEvent {
            actor: by.0,
            role: by.1,
            action: "delivery.discrepancy_resolve",
            subject: id,
            details: json!({
                "box": d.box_id, "office": d.office_code, "kind": d.kind,
                "application_id": d.application_id, "outcome": outcome.as_str(),
                "note": note, "reprint": reprint_id,
            }),
        },
    )
    .await?;
    tx.commit().await?;
    tracing::info!(
        discrepancy = id,
        outcome = outcome.as_str(),
        "office discrepancy resolved"
    );
    let discrepancy = get(services, id)
        .await?
        .ok_or_else(|| DiscrepancyError::NotFound(format!("discrepancy {id}")))?;
    Ok(Resolved {
        discrepancy,
        reprint_id,
    })
}
