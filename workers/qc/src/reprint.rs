//! Reprints: an operator or the registry asks for a new card (damaged, lost in transit, data
//! error). In ONE transaction:
//! - the application moves to `reprint_requested` (checked transition, compare-and-set);
//! - the keys stage is asked (outbox topic `revocation`) to revoke every valid certificate
//!   of the old card, named by serial (lost in transit: key compromise; otherwise
//!   superseded) — the next CRL lists them;
//! - the old card row becomes `recalled` (so a new card may be made) and, when the card is
//!   still in the centre (`qc_passed`, `packed`), its serial goes back to the vault as
//!   `returned`, awaiting destruction; a card already shipped is returned to stock when it
//!   physically comes back (`cardpipe stock return`);
//! - the application becomes urgent, a `keys` job is queued (new keys → personalization →
//!   QC), the request is recorded in `reprints` and in the audit log.
//!
//! Stage queues are FIFO: "priority over new work" is the urgent flag (which the release
//! scheduler honours) plus the fact that a reprint enters at `keys`, ahead of every
//! application not yet released.

use cardpipe_common::audit::{self, AuditEvent};
use cardpipe_common::broker::Job;
use cardpipe_common::clock::to_rfc3339;
use cardpipe_common::contract::{self, RevocationCause};
use cardpipe_common::domain::{ApplicationId, ApplicationState};
use cardpipe_common::runtime::Services;
use cardpipe_common::store::{Store, StoreError, StoreTx, Transition};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::stock;

/// Why a reprint is requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReprintReason {
    /// The card was damaged.
    Damaged,
    /// The card was lost on its way to the office.
    LostInTransit,
    /// The printed or chip data is wrong.
    DataError,
}

impl ReprintReason {
    /// The stored code.
    pub fn as_str(self) -> &'static str {
        match self {
            ReprintReason::Damaged => "damaged",
            ReprintReason::LostInTransit => "lost_in_transit",
            ReprintReason::DataError => "data_error",
        }
    }

    /// Parses a code.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "damaged" => Some(Self::Damaged),
            "lost_in_transit" => Some(Self::LostInTransit),
            "data_error" => Some(Self::DataError),
            _ => None,
        }
    }

    fn cause(self) -> RevocationCause {
        match self {
            ReprintReason::LostInTransit => RevocationCause::Lost,
            _ => RevocationCause::Reprinted,
        }
    }
}

/// Who asks.
#[derive(Debug, Clone, Copy)]
pub enum Requester<'a> {
    /// An operator (login).
    Operator(&'a str),
    /// A registry client.
    Registry(&'a str),
}

impl Requester<'_> {
    fn actor(&self) -> String {
        match self {
            Requester::Operator(o) => format!("operator:{o}"),
            Requester::Registry(c) => format!("registry:{c}"),
        }
    }
    fn parts(&self) -> (&str, &'static str) {
        match self {
            Requester::Operator(o) => (o, "operator"),
            Requester::Registry(c) => (c, "registry"),
        }
    }
}

/// Reprint failures.
#[derive(Debug, thiserror::Error)]
pub enum ReprintError {
    /// No such application.
    #[error("application {0} not found")]
    NotFound(String),
    /// The application is not in a state with a card to replace.
    #[error(
        "application {id} is {state}: a reprint needs a card that passed QC (qc_passed, packed, shipped, at_office, in_transit or collected)"
    )]
    NotReprintable {
        /// Application.
        id: String,
        /// Its state.
        state: ApplicationState,
    },
    /// Someone else moved it meanwhile.
    #[error("application {0} changed state meanwhile; try again")]
    Conflict(String),
    /// The requester's name is not acceptable.
    #[error(transparent)]
    Invalid(#[from] stock::StockError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for ReprintError {
    fn from(e: sqlx::Error) -> Self {
        ReprintError::Store(StoreError::Database(e))
    }
}

/// What a reprint request did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReprintOutcome {
    /// Request id.
    pub id: String,
    /// Application.
    pub application_id: String,
    /// Reason code.
    pub reason: ReprintReason,
    /// Certificates revoked.
    pub revoked: u64,
    /// The old card's blank serial.
    pub old_blank_serial: Option<String>,
    /// Whether the old card went back to the vault (`returned`).
    pub returned_to_stock: bool,
}

/// Requests a reprint (see the module docs).
pub async fn request(
    services: &Services,
    app_id: &ApplicationId,
    reason: ReprintReason,
    requester: Requester<'_>,
) -> Result<ReprintOutcome, ReprintError> {
    let mut tx = services.store.begin().await?;
    let out = request_in(&mut tx, services, app_id, reason, requester).await?;
    tx.commit().await?;
    tracing::info!(application = %app_id, reason = reason.as_str(), revoked = out.revoked, "reprint requested");
    Ok(out)
}

/// [`request`] inside the caller's transaction `tx` (for callers that record their own
/// rows with it, like the resolution of a card lost in transit); nothing is committed here.
pub async fn request_in(
    tx: &mut StoreTx,
    services: &Services,
    app_id: &ApplicationId,
    reason: ReprintReason,
    requester: Requester<'_>,
) -> Result<ReprintOutcome, ReprintError> {
    let id = format!("RPR-{}", uuid::Uuid::now_v7().simple());
    request_with_id(tx, services, &id, app_id, reason, requester).await
}

async fn request_with_id(
    tx: &mut StoreTx,
    services: &Services,
    id: &str,
    app_id: &ApplicationId,
    reason: ReprintReason,
    requester: Requester<'_>,
) -> Result<ReprintOutcome, ReprintError> {
    let (who, role) = requester.parts();
    stock::check_operator(who)?;
    let app = services
        .store
        .application(app_id)
        .await?
        .ok_or_else(|| ReprintError::NotFound(app_id.to_string()))?;
    if app
        .state
        .transition(ApplicationState::ReprintRequested)
        .is_err()
    {
        return Err(ReprintError::NotReprintable {
            id: app_id.to_string(),
            state: app.state,
        });
    }
    let now = services.clock.now();
    let actor = requester.actor();
    let moved = Store::transition(
        tx,
        &Transition {
            id: app_id,
            from: app.state,
            to: ApplicationState::ReprintRequested,
            stage: "reprint",
            attempt: 0,
            actor: &actor,
            reason: Some(reason.as_str()),
            at: now,
        },
    )
    .await?;
    if !moved {
        return Err(ReprintError::Conflict(app_id.to_string()));
    }
    // The keys stage revokes (it owns the certificates); the request names the old card's
    // serials so that, applied after the reprint's new certificates exist, it cannot reach them.
    let serials = cardpipe_pki::store::valid_serials_tx(tx, app_id).await?;
    let revoked = serials.len() as u64;
    contract::request_revocation(tx, app_id, reason.cause(), serials, now).await?;
    let old = sqlx::query(
        "SELECT blank_serial FROM cards WHERE application_id = $1 AND state = 'personalized'",
    )
    .bind(app_id.as_str())
    .fetch_optional(&mut **tx)
    .await?
    .map(|r| r.try_get::<String, _>("blank_serial"))
    .transpose()?;
    let mut returned = false;
    if let Some(serial) = &old {
        sqlx::query(
            "UPDATE cards SET state = 'recalled', spoil_reason = $1, updated_at = $2
             WHERE blank_serial = $3 AND state = 'personalized'",
        )
        .bind(format!("reprint:{}", reason.as_str()))
        .bind(to_rfc3339(now))
        .bind(serial)
        .execute(&mut **tx)
        .await?;
        if matches!(
            app.state,
            ApplicationState::QcPassed | ApplicationState::Packed
        ) {
            returned = stock::move_serial(
                tx,
                serial,
                &["consumed"],
                "returned",
                &actor,
                Some(&format!("recalled for reprint: {}", reason.as_str())),
                None,
                now,
            )
            .await?;
        }
    }
    sqlx::query("UPDATE applications SET priority = 'urgent' WHERE id = $1")
        .bind(app_id.as_str())
        .execute(&mut **tx)
        .await?;
    sqlx::query(
        "INSERT INTO reprints (id, application_id, reason, requested_by, old_blank_serial, revoked, requested_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(app_id.as_str())
    .bind(reason.as_str())
    .bind(&actor)
    .bind(&old)
    .bind(revoked as i64)
    .bind(to_rfc3339(now))
    .execute(&mut **tx)
    .await?;
    Store::enqueue_job(
        tx,
        &Job::new(contract::stage_names::KEYS, app_id.as_str()).with_priority(true),
        now,
    )
    .await?;
    audit::record_in(
        tx,
        now,
        &AuditEvent {
            actor: who,
            role,
            action: "reprint.request",
            subject: app_id.as_str(),
            details: serde_json::json!({
                "reason": reason.as_str(), "revoked": revoked,
                "old_blank_serial": old, "returned_to_stock": returned,
            }),
        },
    )
    .await?;
    Ok(ReprintOutcome {
        id: id.to_owned(),
        application_id: app_id.to_string(),
        reason,
        revoked,
        old_blank_serial: old,
        returned_to_stock: returned,
    })
}

/// Outbox sink for [`REPRINT_TOPIC`](cardpipe_common::contract::REPRINT_TOPIC): reprints
/// other components ask for (delivery, for a card lost in transit). Applying a request
/// twice makes one reprint (its id is the request's); a request the application no longer
/// admits is logged and dropped, a store failure retried.
#[derive(Debug)]
pub struct ReprintSink {
    services: Services,
}

impl ReprintSink {
    /// A sink on `services`.
    pub fn new(services: Services) -> Self {
        Self { services }
    }
}

#[async_trait::async_trait]
impl cardpipe_common::runtime::relay::OutboxSink for ReprintSink {
    async fn deliver(&self, row: &cardpipe_common::store::OutboxRow) -> anyhow::Result<()> {
        let r: contract::ReprintRequest = serde_json::from_str(&row.payload)
            .map_err(|e| anyhow::anyhow!("outbox row {} is not a reprint request: {e}", row.id))?;
        let Some(reason) = ReprintReason::parse(&r.reason) else {
            tracing::warn!(application = %r.application_id, reason = %r.reason, "reprint request with an unknown reason dropped");
            return Ok(());
        };
        let already = sqlx::query("SELECT 1 AS one FROM reprints WHERE id = $1")
            .bind(&r.id)
            .fetch_optional(self.services.store.pool())
            .await
            .map_err(StoreError::from)?;
        if already.is_some() {
            return Ok(());
        }
        let app_id = ApplicationId(r.application_id.clone());
        let mut tx = self.services.store.begin().await?;
        match request_with_id(
            &mut tx,
            &self.services,
            &r.id,
            &app_id,
            reason,
            Requester::Operator(&r.operator),
        )
        .await
        {
            Ok(out) => {
                tx.commit().await?;
                tracing::info!(application = %app_id, reprint = %out.id, reason = reason.as_str(), "reprint requested");
                Ok(())
            }
            Err(ReprintError::Store(e)) => Err(e.into()),
            Err(refused) => {
                tracing::warn!(application = %app_id, reprint = %r.id, error = %refused, "reprint request not applied");
                Ok(())
            }
        }
    }
}
