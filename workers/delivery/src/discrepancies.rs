//! Office discrepancies (cards missing from, or extra in, a received box — raised by
//! [`crate::office::receive_box`]) and their resolution by a centre supervisor:
//!
//! * a **missing** card is `found` (it turned up: the office can then receive it with a
//!   late receipt on the box, `POST /api/v1/delivery/boxes/{box}/receipt` with
//!   `"scanned": [id]`), or `lost` (lost in transit: in the same transaction the card's
//!   certificates are revoked and a reprint with reason `lost_in_transit` is requested
//!   through [`cardpipe_qc::reprint`]);
//! * an **extra** card is `returned` (sent back to the centre or re-routed to its office).
//!
//! Who, when, the outcome and a note are stored on the discrepancy row and in the audit log.
//! The console (`/console/shipments`) and `cardpipe ops discrepancies` /
//! `cardpipe ops discrepancy-resolve` call [`resolve`] after checking the supervisor role.
//! Open discrepancies are counted by `cardpipe_delivery_discrepancies_open`.

use cardpipe_common::audit::{self, AuditEvent};
use cardpipe_common::clock::to_rfc3339;
use cardpipe_common::domain::{ApplicationId, ApplicationState};
use cardpipe_common::runtime::Services;
use cardpipe_qc::reprint::{self, ReprintError, ReprintOutcome, ReprintReason, Requester};
use serde::Serialize;
use serde_json::json;
use sqlx::Row;

use crate::office::OfficeError;

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
pub async fn list(services: &Services, open_only: bool) -> Result<Vec<Discrepancy>, OfficeError> {
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
pub async fn get(services: &Services, id: &str) -> Result<Option<Discrepancy>, OfficeError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM delivery_discrepancies WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(services.store.pool())
    .await?;
    Ok(row.as_ref().map(from_row).transpose()?)
}

/// Open discrepancies in the store (the `cardpipe_delivery_discrepancies_open` gauge).
pub async fn open_count(services: &Services) -> Result<i64, OfficeError> {
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
    /// The reprint of a lost card.
    pub reprint: Option<ReprintOutcome>,
}

fn reprint_error(e: ReprintError) -> OfficeError {
    match e {
        ReprintError::NotFound(id) => OfficeError::NotFound(format!("application {id}")),
        e @ (ReprintError::NotReprintable { .. } | ReprintError::Conflict(_)) => {
            OfficeError::Conflict(e.to_string())
        }
        ReprintError::Invalid(e) => OfficeError::BadRequest(e.to_string()),
        ReprintError::Store(e) => OfficeError::Internal(e.into()),
    }
}

/// Resolves discrepancy `id` with `outcome` (see the module docs) and a note; `by` = (login,
/// role) of the operator, whose role the caller has checked (supervisors).
pub async fn resolve(
    services: &Services,
    id: &str,
    outcome: &str,
    note: &str,
    by: (&str, &str),
) -> Result<Resolved, OfficeError> {
    let note = note.trim();
    if note.is_empty() || note.chars().count() > 500 {
        return Err(OfficeError::BadRequest(
            "note: 1..=500 characters are required".into(),
        ));
    }
    let d = get(services, id)
        .await?
        .ok_or_else(|| OfficeError::NotFound(format!("discrepancy {id}")))?;
    if !d.is_open() {
        return Err(OfficeError::Conflict(format!(
            "discrepancy {id} was already resolved ({})",
            d.resolution.as_deref().unwrap_or("?")
        )));
    }
    let allowed = Resolution::for_kind(&d.kind);
    let outcome = Resolution::parse(outcome)
        .filter(|o| allowed.contains(o))
        .ok_or_else(|| {
            OfficeError::BadRequest(format!(
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
            return Err(OfficeError::Conflict(format!(
                "the card is {}; only a card still on its way (shipped) can be found",
                state.map_or("unknown", |s| s.as_str())
            )));
        }
    }
    let now = services.clock.now();
    let mut tx = services.store.begin().await?;
    let reprint = if outcome == Resolution::Lost {
        Some(
            reprint::request_in(
                &mut tx,
                services,
                &app_id,
                ReprintReason::LostInTransit,
                Requester::Operator(by.0),
            )
            .await
            .map_err(reprint_error)?,
        )
    } else {
        None
    };
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
        return Err(OfficeError::Conflict(format!(
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
        .ok_or_else(|| OfficeError::NotFound(format!("discrepancy {id}")))?;
    Ok(Resolved {
        discrepancy,
        reprint,
    })
}
