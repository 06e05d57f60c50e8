//! What pickup offices (and the registry) do: acknowledge a box, move a card to another
//! office, hand a card over. Every function checks its preconditions and gives a clear
//! refusal ([`OfficeError`]); every accepted action commits its state changes, rows,
//! registry callback and audit entry in one transaction.

use std::collections::BTreeSet;

use base64::Engine;
use cardpipe_biometrics::iso19794_2;
use cardpipe_biometrics::matcher::{Calibration, PlacementError, Probe, TenPrint, verify};
use cardpipe_common::audit::{self, AuditEvent};
use cardpipe_common::clock::{from_rfc3339, to_rfc3339};
use cardpipe_common::domain::applicant::ApplicantGroup;
use cardpipe_common::domain::fees;
use cardpipe_common::domain::{ApplicationId, ApplicationState};
use cardpipe_common::records;
use cardpipe_common::runtime::Services;
use cardpipe_common::store::{Store, StoreError, Transition};
use cardpipe_registry::callbacks::{CallbackEvent, enqueue_callback};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::Row;
use time::OffsetDateTime;

use crate::clients::Caller;
use crate::{Delivery, offices};

/// Why an office action was refused.
#[derive(Debug, thiserror::Error)]
pub enum OfficeError {
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// Nothing with that id.
    #[error("{0} not found")]
    NotFound(String),
    /// Not in a state that allows it.
    #[error("{0}")]
    Conflict(String),
    /// The holder was not verified.
    #[error("{0}")]
    Forbidden(String),
    /// A rule refused it.
    #[error("{0}")]
    Unprocessable(String),
    /// Store or other failure.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<StoreError> for OfficeError {
    fn from(e: StoreError) -> Self {
        Self::Internal(e.into())
    }
}

impl From<sqlx::Error> for OfficeError {
    fn from(e: sqlx::Error) -> Self {
        Self::Internal(e.into())
    }
}

impl From<records::RecordError> for OfficeError {
    fn from(e: records::RecordError) -> Self {
        Self::Internal(e.into())
    }
}

/// A card's delivery row.
#[derive(Debug, Clone, Serialize)]
pub struct CardDelivery {
    /// Application.
    pub application_id: String,
    /// Box.
    pub box_id: String,
    /// Office the box went to.
    pub packed_office: String,
    /// Office the holder collects from now.
    pub office_code: String,
    /// Issuance (QC pass).
    pub issued_at: String,
    /// Tehran date from which the card is voided.
    pub void_on: String,
    /// When the card became available to the holder at `office_code`.
    pub available_at: Option<String>,
}

/// The delivery row of an application.
pub async fn card(
    services: &Services,
    id: &ApplicationId,
) -> Result<Option<CardDelivery>, StoreError> {
    let row = sqlx::query(
        "SELECT application_id, box_id, packed_office, office_code, issued_at, void_on, available_at
         FROM delivery_cards WHERE application_id = $1",
    )
    .bind(id.as_str())
    .fetch_optional(services.store.pool())
    .await?;
    row.map(|r| {
        Ok(CardDelivery {
            application_id: r.try_get("application_id")?,
            box_id: r.try_get("box_id")?,
            packed_office: r.try_get("packed_office")?,
            office_code: r.try_get("office_code")?,
            issued_at: r.try_get("issued_at")?,
            void_on: r.try_get("void_on")?,
            available_at: r.try_get("available_at")?,
        })
    })
    .transpose()
}

async fn application(
    services: &Services,
    id: &str,
) -> Result<cardpipe_common::domain::Application, OfficeError> {
    // cardpipe's id, the registry's id or the tracking code: whichever the caller knows.
    services
        .store
        .application_by_reference(id)
        .await?
        .ok_or_else(|| OfficeError::NotFound(format!("application {id}")))
}

fn clerk_ok(clerk: &str) -> Result<(), OfficeError> {
    if clerk.is_empty()
        || clerk.len() > 64
        || !clerk
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
    {
        return Err(OfficeError::BadRequest(
            "clerk: must be 1–64 letters, digits, '-', '_', '.' or '@'".into(),
        ));
    }
    Ok(())
}

/// The office a caller acts at: an office client's own office (a different `claimed` one is
/// refused, 403), or the `claimed` office of a centre client.
fn acting_office(by: &Caller, claimed: &str) -> Result<String, OfficeError> {
    let claimed = claimed.trim();
    match by {
        Caller::Office { office, .. } => {
            if !claimed.is_empty() && claimed != office {
                return Err(OfficeError::Forbidden(format!(
                    "this client acts for office {office}, not {claimed}"
                )));
            }
            Ok(office.clone())
        }
        Caller::Centre(_) if claimed.is_empty() => Err(OfficeError::BadRequest(
            "office_code: required for centre clients".into(),
        )),
        Caller::Centre(_) => Ok(claimed.to_owned()),
        Caller::Registry(_) => Err(OfficeError::Forbidden(
            "registry clients cannot act at pickup offices".into(),
        )),
    }
}

/// A box receipt: the office scans the box id, and optionally every card it finds inside.
#[derive(Debug, Clone, Deserialize)]
pub struct BoxReceipt {
    /// The office acknowledging (optional for office clients: their own office).
    #[serde(default)]
    pub office_code: String,
    /// The clerk's login.
    pub clerk: String,
    /// Application ids of the cards found in the box; absent: all cards as listed.
    #[serde(default)]
    pub scanned: Option<Vec<String>>,
}

/// What a receipt recorded.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReceiptOutcome {
    /// The box.
    pub box_id: String,
    /// Cards now at the office.
    pub received: Vec<String>,
    /// Listed but not found (discrepancies).
    pub missing: Vec<String>,
    /// Found but not listed (discrepancies).
    pub extra: Vec<String>,
}

/// The office acknowledges box `box_id`: listed cards found move `shipped` → `at_office`;
/// missing and extra cards are recorded as discrepancies for the centre. `by` must act for
/// the box's office (403 otherwise). A box already received accepts, later, the missing
/// cards that an operator resolved as `found` ([`cardpipe_common::discrepancies`]).
pub async fn receive_box(
    delivery: &Delivery,
    services: &Services,
    box_id: &str,
    receipt: &BoxReceipt,
    by: &Caller,
) -> Result<ReceiptOutcome, OfficeError> {
    clerk_ok(&receipt.clerk)?;
    let office_code = acting_office(by, &receipt.office_code)?;
    let row = sqlx::query("SELECT office_code, state FROM delivery_boxes WHERE id = $1")
        .bind(box_id)
        .fetch_optional(services.store.pool())
        .await?
        .ok_or_else(|| OfficeError::NotFound(format!("box {box_id}")))?;
    let office: String = row.try_get("office_code")?;
    let state: String = row.try_get("state")?;
    by.require_office(&office)?;
    if office != office_code {
        return Err(OfficeError::Conflict(format!(
            "box {box_id} is addressed to office {office}, not {office_code}"
        )));
    }
    match state.as_str() {
        "shipped" => {}
        "received" => {
            return receive_found(delivery, services, box_id, &office, receipt, by).await;
        }
        other => {
            return Err(OfficeError::Conflict(format!(
                "box {box_id} has not been dispatched (state {other})"
            )));
        }
    }
    let listed: BTreeSet<String> =
        sqlx::query("SELECT application_id FROM delivery_cards WHERE box_id = $1")
            .bind(box_id)
            .fetch_all(services.store.pool())
            .await?
            .iter()
            .map(|r| r.try_get::<String, _>("application_id"))
            .collect::<Result<_, _>>()?;
    let scanned: BTreeSet<String> = match &receipt.scanned {
        Some(list) => list
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect(),
        None => listed.clone(),
    };
    let missing: Vec<String> = listed.difference(&scanned).cloned().collect();
    let extra: Vec<String> = scanned.difference(&listed).cloned().collect();
    let found: Vec<String> = listed.intersection(&scanned).cloned().collect();
    let now = services.clock.now();
    let now_text = to_rfc3339(now);
    let actor = format!("office:{}:{}", office, receipt.clerk);
    let mut tx = services.store.begin().await?;
    let claimed = sqlx::query(
        "UPDATE delivery_boxes SET state = 'received', received_at = $1, received_by = $2 WHERE id = $3 AND state = 'shipped'",
    )
    .bind(&now_text)
    .bind(&actor)
    .bind(box_id)
    .execute(&mut *tx)
    .await?;
    if claimed.rows_affected() == 0 {
        return Err(OfficeError::Conflict(format!(
            "box {box_id} was already received"
        )));
    }
    let mut received = Vec::new();
    for app in &found {
        if receive_card(&mut tx, app, box_id, &office, &actor, now).await? {
            received.push(app.clone());
        }
    }
    for (kind, list) in [("missing", &missing), ("extra", &extra)] {
        for app in list {
            sqlx::query(
                "INSERT INTO delivery_discrepancies (id, box_id, office_code, kind, application_id, reported_by, reported_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(box_id)
            .bind(&office)
            .bind(kind)
            .bind(app)
            .bind(&actor)
            .bind(&now_text)
            .execute(&mut *tx)
            .await?;
        }
    }
    let client = by.label();
    audit::record_in(
        &mut tx,
        now,
        &AuditEvent {
            actor: &client,
            role: by.role(),
            action: "delivery.box_receipt",
            subject: box_id,
            details: json!({
                "office": office, "clerk": receipt.clerk,
                "received": received.len(), "missing": missing, "extra": extra,
            }),
        },
    )
    .await?;
    tx.commit().await?;
    delivery.metrics.received(received.len() as u64);
    for _ in &missing {
        delivery.metrics.discrepancy("missing");
    }
    for _ in &extra {
        delivery.metrics.discrepancy("extra");
    }
    if !missing.is_empty() || !extra.is_empty() {
        tracing::warn!(
            box_id,
            missing = missing.len(),
            extra = extra.len(),
            "box receipt discrepancy raised"
        );
    }
    Ok(ReceiptOutcome {
        box_id: box_id.to_owned(),
        received,
        missing,
        extra,
    })
}

/// One listed card of a box reaches its office: `shipped` → `at_office` and available, or
/// `shipped` → `in_transit` when a transfer to another office was asked for meanwhile (it is
/// forwarded from here); registry callback. False when it was not `shipped`.
async fn receive_card(
    tx: &mut cardpipe_common::store::StoreTx,
    app: &str,
    box_id: &str,
    office: &str,
    actor: &str,
    now: OffsetDateTime,
) -> Result<bool, OfficeError> {
    let id = ApplicationId(app.to_owned());
    let destination: String =
        sqlx::query_scalar("SELECT office_code FROM delivery_cards WHERE application_id = $1")
            .bind(app)
            .fetch_one(&mut **tx)
            .await?;
    let forwarded = destination != office;
    let to = if forwarded {
        ApplicationState::InTransit
    } else {
        ApplicationState::AtOffice
    };
    let moved = Store::transition(
        tx,
        &Transition {
            id: &id,
            from: ApplicationState::Shipped,
            to,
            stage: "office-receipt",
            attempt: 0,
            actor,
            reason: Some(&format!("box {box_id}")),
            at: now,
        },
    )
    .await?;
    if !moved {
        return Ok(false);
    }
    let now_text = to_rfc3339(now);
    sqlx::query(
        "UPDATE delivery_cards SET received_at = $1,
             available_at = CASE WHEN office_code = $2 THEN $1 ELSE NULL END
         WHERE application_id = $3",
    )
    .bind(&now_text)
    .bind(office)
    .bind(app)
    .execute(&mut **tx)
    .await?;
    let registry_id = registry_id(tx, &id).await?;
    let (event, detail) = if forwarded {
        (
            CallbackEvent::InTransit,
            json!({ "office": office, "to_office": destination }),
        )
    } else {
        (CallbackEvent::AtOffice, json!({ "office": office }))
    };
    enqueue_callback(tx, app, event, &registry_id, Some(to), None, detail, now).await?;
    Ok(true)
}

/// Moves a card between `at_office` and `in_transit` inside `tx` (compare-and-set: a card
/// that changed state meanwhile fails the whole transaction) and tells the registry.
async fn move_card(
    tx: &mut cardpipe_common::store::StoreTx,
    id: &ApplicationId,
    (from, to): (ApplicationState, ApplicationState),
    actor: &str,
    detail: serde_json::Value,
    now: OffsetDateTime,
) -> Result<(), OfficeError> {
    let moved = Store::transition(
        tx,
        &Transition {
            id,
            from,
            to,
            stage: "office-transfer",
            attempt: 0,
            actor,
            reason: None,
            at: now,
        },
    )
    .await?;
    if !moved {
        return Err(OfficeError::Conflict(format!(
            "the application is no longer {from}; retry"
        )));
    }
    let registry_id = registry_id(tx, id).await?;
    let event = CallbackEvent::for_state(to)
        .ok_or_else(|| OfficeError::Internal(anyhow::anyhow!("no callback for state {to}")))?;
    enqueue_callback(
        tx,
        id.as_str(),
        event,
        &registry_id,
        Some(to),
        None,
        detail,
        now,
    )
    .await?;
    Ok(())
}

/// A late receipt on a box already received: only missing cards an operator resolved as
/// `found` and still `shipped` may be scanned.
async fn receive_found(
    delivery: &Delivery,
    services: &Services,
    box_id: &str,
    office: &str,
    receipt: &BoxReceipt,
    by: &Caller,
) -> Result<ReceiptOutcome, OfficeError> {
    let already = || OfficeError::Conflict(format!("box {box_id} was already received"));
    let scanned: BTreeSet<String> = receipt
        .scanned
        .iter()
        .flatten()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    if scanned.is_empty() {
        return Err(already());
    }
    let found: BTreeSet<String> = sqlx::query(
        "SELECT d.application_id FROM delivery_discrepancies d
         JOIN applications a ON a.id = d.application_id
         WHERE d.box_id = $1 AND d.kind = 'missing' AND d.resolution = 'found' AND a.state = 'shipped'",
    )
    .bind(box_id)
    .fetch_all(services.store.pool())
    .await?
    .iter()
    .map(|r| r.try_get::<String, _>("application_id"))
    .collect::<Result<_, _>>()?;
    if !scanned.is_subset(&found) {
        return Err(OfficeError::Conflict(format!(
            "box {box_id} was already received; only cards resolved as found may be received later"
        )));
    }
    let now = services.clock.now();
    let actor = format!("office:{}:{}", office, receipt.clerk);
    let mut tx = services.store.begin().await?;
    let mut received = Vec::new();
    for app in &scanned {
        if receive_card(&mut tx, app, box_id, office, &actor, now).await? {
            received.push(app.clone());
        }
    }
    if received.len() != scanned.len() {
        return Err(OfficeError::Conflict(
            "a card changed state meanwhile; retry".into(),
        ));
    }
    let client = by.label();
    audit::record_in(
        &mut tx,
        now,
        &AuditEvent {
            actor: &client,
            role: by.role(),
            action: "delivery.late_receipt",
            subject: box_id,
            details: json!({ "office": office, "clerk": receipt.clerk, "received": received }),
        },
    )
    .await?;
    tx.commit().await?;
    delivery.metrics.received(received.len() as u64);
    Ok(ReceiptOutcome {
        box_id: box_id.to_owned(),
        received,
        missing: Vec::new(),
        extra: Vec::new(),
    })
}

async fn registry_id(
    tx: &mut cardpipe_common::store::StoreTx,
    id: &ApplicationId,
) -> Result<String, StoreError> {
    let row = sqlx::query("SELECT registry_id FROM applications WHERE id = $1")
        .bind(id.as_str())
        .fetch_one(&mut **tx)
        .await?;
    Ok(row.try_get("registry_id")?)
}

/// What a change of pickup office did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum OfficeChange {
    /// Not packed yet: the card will be packed for the new office.
    Rerouted {
        /// New office.
        office_code: String,
    },
    /// Already dispatched: a transfer between offices.
    Transfer {
        /// Transfer id (the new office acknowledges it).
        transfer_id: String,
        /// From.
        from_office: String,
        /// To.
        to_office: String,
    },
}

/// Changes the pickup office of an application: before packing the card is re-routed;
/// after dispatch the card is transferred (the new office acknowledges its arrival).
/// Registry clients (their own applications only) and centre clients; office clients: 403.
pub async fn change_office(
    delivery: &Delivery,
    services: &Services,
    application_id: &str,
    new_office: &str,
    by: &Caller,
) -> Result<OfficeChange, OfficeError> {
    by.require_registry_or_centre()?;
    let actor_label = by.label();
    let actor = actor_label.as_str();
    delivery.ensure_offices(services).await?;
    if offices::get(&services.store, new_office).await?.is_none() {
        return Err(OfficeError::BadRequest(format!(
            "pickup_office: {new_office:?} is not in the offices register"
        )));
    }
    let app = application(services, application_id).await?;
    if let Caller::Registry(client) = by {
        // A registry client sees only the applications of its own batches.
        let owner: Option<String> = match &app.batch_id {
            Some(b) => sqlx::query("SELECT client FROM batches WHERE id = $1")
                .bind(b)
                .fetch_optional(services.store.pool())
                .await?
                .map(|r| r.try_get("client"))
                .transpose()?,
            None => None,
        };
        if owner.as_deref() != Some(client.as_str()) {
            return Err(OfficeError::NotFound(format!(
                "application {application_id}"
            )));
        }
    }
    let now = services.clock.now();
    let mut record = records::load_record(services, &app.id).await?;
    let mut tx = services.store.begin().await?;
    // Holds the application row and re-checks its state for the transaction.
    let still =
        sqlx::query("UPDATE applications SET updated_at = updated_at WHERE id = $1 AND state = $2")
            .bind(app.id.as_str())
            .bind(app.state.as_str())
            .execute(&mut *tx)
            .await?;
    if still.rows_affected() == 0 {
        return Err(OfficeError::Conflict(
            "the application changed state meanwhile; retry".into(),
        ));
    }
    let outcome = match app.state {
        s if s.is_final() || s == ApplicationState::Collected => {
            return Err(OfficeError::Conflict(format!(
                "the pickup office cannot change in state {s}"
            )));
        }
        ApplicationState::Packed => {
            return Err(OfficeError::Conflict(
                "the card is packed in a sealed box for today's dispatch; change the office after dispatch (a transfer)".into(),
            ));
        }
        ApplicationState::Shipped | ApplicationState::AtOffice | ApplicationState::InTransit => {
            let current = card(services, &app.id).await?.ok_or_else(|| {
                OfficeError::Internal(anyhow::anyhow!("no delivery row for {}", app.id))
            })?;
            if current.office_code == new_office {
                return Err(OfficeError::Conflict(format!(
                    "the card already goes to {new_office}"
                )));
            }
            // An earlier transfer still under way is superseded by this one.
            sqlx::query(
                "DELETE FROM delivery_transfers WHERE application_id = $1 AND state = 'in_transit'",
            )
            .bind(app.id.as_str())
            .execute(&mut *tx)
            .await?;
            let transfer_id = format!("TRF-{}", uuid::Uuid::now_v7().simple());
            // The card physically is where its box went, or where the last transfer took it.
            let from = if current.available_at.is_some() {
                current.office_code.clone()
            } else {
                current.packed_office.clone()
            };
            if from == new_office {
                // Back to where the card already is: nothing travels.
                sqlx::query(
                    "UPDATE delivery_cards SET office_code = $1,
                         available_at = CASE WHEN received_at IS NOT NULL THEN $2 ELSE NULL END
                     WHERE application_id = $3",
                )
                .bind(new_office)
                .bind(to_rfc3339(now))
                .bind(app.id.as_str())
                .execute(&mut *tx)
                .await?;
                if app.state == ApplicationState::InTransit {
                    // It never left: available here again.
                    move_card(
                        &mut tx,
                        &app.id,
                        (ApplicationState::InTransit, ApplicationState::AtOffice),
                        actor,
                        json!({ "office": new_office }),
                        now,
                    )
                    .await?;
                }
                record.pickup_office = new_office.to_owned();
                records::update_record(&mut tx, services, &app.id, &record).await?;
                let outcome = OfficeChange::Rerouted {
                    office_code: new_office.to_owned(),
                };
                audit::record_in(
                    &mut tx,
                    now,
                    &AuditEvent {
                        actor,
                        role: by.role(),
                        action: "delivery.change_office",
                        subject: app.id.as_str(),
                        details: serde_json::to_value(&outcome).unwrap_or_default(),
                    },
                )
                .await?;
                tx.commit().await?;
                return Ok(outcome);
            }
            sqlx::query(
                "INSERT INTO delivery_transfers (id, application_id, from_office, to_office, state, requested_by, requested_at)
                 VALUES ($1, $2, $3, $4, 'in_transit', $5, $6)",
            )
            .bind(&transfer_id)
            .bind(app.id.as_str())
            .bind(&from)
            .bind(new_office)
            .bind(actor)
            .bind(to_rfc3339(now))
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE delivery_cards SET office_code = $1, available_at = NULL WHERE application_id = $2")
                .bind(new_office)
                .bind(app.id.as_str())
                .execute(&mut *tx)
                .await?;
            if app.state == ApplicationState::AtOffice {
                // No longer available here: in transit until the new office receives it.
                move_card(
                    &mut tx,
                    &app.id,
                    (ApplicationState::AtOffice, ApplicationState::InTransit),
                    actor,
                    json!({ "office": from, "to_office": new_office }),
                    now,
                )
                .await?;
            }
            OfficeChange::Transfer {
                transfer_id,
                from_office: from,
                to_office: new_office.to_owned(),
            }
        }
        _ => OfficeChange::Rerouted {
            office_code: new_office.to_owned(),
        },
    };
    record.pickup_office = new_office.to_owned();
    records::update_record(&mut tx, services, &app.id, &record).await?;
    audit::record_in(
        &mut tx,
        now,
        &AuditEvent {
            actor,
            role: by.role(),
            action: "delivery.change_office",
            subject: app.id.as_str(),
            details: serde_json::to_value(&outcome).unwrap_or_default(),
        },
    )
    .await?;
    tx.commit().await?;
    if matches!(outcome, OfficeChange::Transfer { .. }) {
        delivery.metrics.transfer();
    }
    Ok(outcome)
}

/// The new office acknowledges a transferred card: it becomes available there.
/// `by` must act for the transfer's destination office (403 otherwise).
pub async fn receive_transfer(
    services: &Services,
    transfer_id: &str,
    office_code: &str,
    clerk: &str,
    by: &Caller,
) -> Result<String, OfficeError> {
    clerk_ok(clerk)?;
    let office_code = acting_office(by, office_code)?;
    let office_code = office_code.as_str();
    let row = sqlx::query(
        "SELECT application_id, to_office, state FROM delivery_transfers WHERE id = $1",
    )
    .bind(transfer_id)
    .fetch_optional(services.store.pool())
    .await?
    .ok_or_else(|| OfficeError::NotFound(format!("transfer {transfer_id}")))?;
    let app_id: String = row.try_get("application_id")?;
    let to: String = row.try_get("to_office")?;
    let state: String = row.try_get("state")?;
    by.require_office(&to)?;
    if to != office_code {
        return Err(OfficeError::Conflict(format!(
            "transfer {transfer_id} goes to office {to}, not {office_code}"
        )));
    }
    if state != "in_transit" {
        return Err(OfficeError::Conflict(format!(
            "transfer {transfer_id} was already received"
        )));
    }
    let app = application(services, &app_id).await?;
    if app.state != ApplicationState::InTransit {
        return Err(OfficeError::Conflict(format!(
            "the card is not in transit (state {}){}",
            app.state,
            if app.state == ApplicationState::Shipped {
                ": it has not reached its first office yet; receive its box there first"
            } else {
                ""
            }
        )));
    }
    let now = services.clock.now();
    let actor = format!("office:{office_code}:{clerk}");
    let client = by.label();
    let mut tx = services.store.begin().await?;
    let done = sqlx::query(
        "UPDATE delivery_transfers SET state = 'received', received_at = $1 WHERE id = $2 AND state = 'in_transit'",
    )
    .bind(to_rfc3339(now))
    .bind(transfer_id)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        return Err(OfficeError::Conflict(format!(
            "transfer {transfer_id} was already received"
        )));
    }
    sqlx::query("UPDATE delivery_cards SET available_at = $1 WHERE application_id = $2 AND office_code = $3")
        .bind(to_rfc3339(now))
        .bind(&app_id)
        .bind(office_code)
        .execute(&mut *tx)
        .await?;
    move_card(
        &mut tx,
        &app.id,
        (ApplicationState::InTransit, ApplicationState::AtOffice),
        &actor,
        json!({ "office": office_code, "transfer": transfer_id }),
        now,
    )
    .await?;
    audit::record_in(
        &mut tx,
        now,
        &AuditEvent {
            actor: &client,
            role: by.role(),
            action: "delivery.transfer_receipt",
            subject: &app_id,
            details: json!({ "transfer": transfer_id, "office": office_code, "clerk": clerk, "history_actor": actor }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(app_id)
}

/// A handover at the office.
#[derive(Clone, Deserialize)]
pub struct Handover {
    /// cardpipe's application id (scanned from the card carrier).
    pub application_id: String,
    /// The office handing over (optional for office clients: their own office).
    #[serde(default)]
    pub office_code: String,
    /// The clerk's login.
    pub clerk: String,
    /// The live fingerprint: an ISO/IEC 19794-2 record (base64) captured at the counter.
    pub fingerprint: String,
    /// The finger the live print is of (1–10). Authoritative when given (the record's header
    /// position must then be 0 or agree); required when the header position is 0 (unknown).
    #[serde(default)]
    pub finger_position: Option<u8>,
    /// The holder presented the previous national card (required for groups 3 and 4).
    pub previous_card_presented: bool,
    /// The holder set the ID PIN, signature PIN and PUK on the card.
    pub pins_set: bool,
    /// Delivery fee collected (rial).
    pub fee_rial: i64,
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover")
            .field("application_id", &self.application_id)
            .field("office_code", &self.office_code)
            .field("fingerprint", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A completed handover.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HandoverOutcome {
    /// Application.
    pub application_id: String,
    /// Fee recorded (rial).
    pub fee_rial: i64,
    /// Whether an earlier card of the holder was voided uncollected (the issuance fee of this
    /// application was double; the delivery fee is not).
    pub double_fee: bool,
    /// Fused fingerprint score (−log10 FMR).
    pub match_score: f64,
}

/// What the office collects at handover from the holder of `id` (the fee model,
/// [`cardpipe_common::domain::fees`]): the delivery fee minus what was prepaid with the
/// enrolment. Also whether an earlier card of the same person was voided uncollected (its
/// issuance fee was then double, paid before enrolment; nothing doubles at handover).
pub async fn fee_due(services: &Services, id: &ApplicationId) -> Result<(i64, bool), OfficeError> {
    let record = records::load_record(services, id).await?;
    let others = records::find_by_national_code(services, &record.national_code, None).await?;
    let mut after_voided_card = false;
    for other in others.iter().filter(|o| *o != id) {
        if let Some(app) = services.store.application(other).await?
            && app.state == ApplicationState::Voided
        {
            after_voided_card = true;
        }
    }
    Ok((fees::due_at_handover(&record.fees), after_voided_card))
}

/// Reserves one fingerprint attempt of today (Tehran) for `app`; `false` when `max` are used.
async fn reserve_attempt(
    services: &Services,
    app: &ApplicationId,
    max: u32,
    now: OffsetDateTime,
) -> Result<bool, OfficeError> {
    let day = crate::tehran_date(now).to_string();
    let mut tx = services.store.begin().await?;
    sqlx::query(
        "INSERT INTO delivery_handover_attempts (application_id, day, attempts) VALUES ($1, $2, 0)
         ON CONFLICT (application_id, day) DO NOTHING",
    )
    .bind(app.as_str())
    .bind(&day)
    .execute(&mut *tx)
    .await?;
    let reserved = sqlx::query(
        "UPDATE delivery_handover_attempts SET attempts = attempts + 1
         WHERE application_id = $1 AND day = $2 AND attempts < $3",
    )
    .bind(app.as_str())
    .bind(&day)
    .bind(i64::from(max))
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    tx.commit().await?;
    Ok(reserved)
}

/// A centre supervisor gives a card whose fingerprint attempts of today are used up a new
/// day's worth (`by` = login, role; the caller has checked the role). Audited.
pub async fn unlock_handover(
    services: &Services,
    application_id: &str,
    by: (&str, &str),
) -> Result<u64, OfficeError> {
    let now = services.clock.now();
    let day = crate::tehran_date(now).to_string();
    let mut tx = services.store.begin().await?;
    let cleared = sqlx::query(
        "DELETE FROM delivery_handover_attempts WHERE application_id = $1 AND day = $2",
    )
    .bind(application_id)
    .bind(&day)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if cleared == 0 {
        return Err(OfficeError::NotFound(format!(
            "fingerprint attempts of today for application {application_id}"
        )));
    }
    audit::record_in(
        &mut tx,
        now,
        &AuditEvent {
            actor: by.0,
            role: by.1,
            action: "delivery.handover_unlock",
            subject: application_id,
            details: json!({ "day": day }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(cleared)
}

/// Hands a card over after verifying the holder: 1:1 fingerprint match against the enrolled
/// templates, previous card, PINs set, fee. → `collected`, registry callback, audit entry.
/// `by` must act for the office the holder collects from (403 otherwise).
pub async fn handover(
    delivery: &Delivery,
    services: &Services,
    req: &Handover,
    by: &Caller,
) -> Result<HandoverOutcome, OfficeError> {
    clerk_ok(&req.clerk)?;
    let office_code = acting_office(by, &req.office_code)?;
    let actor = format!("office:{}:{}", office_code, req.clerk);
    let client = by.label();
    let app = application(services, &req.application_id).await?;
    if let Some(current) = card(services, &app.id).await? {
        by.require_office(&current.office_code)?;
    }
    if app.state == ApplicationState::InTransit {
        delivery.metrics.handover("refused");
        return Err(OfficeError::Conflict(
            "the card is still being transferred to this office (in_transit)".into(),
        ));
    }
    if app.state != ApplicationState::AtOffice {
        delivery.metrics.handover("refused");
        return Err(OfficeError::Conflict(format!(
            "the card cannot be handed over in state {}",
            app.state
        )));
    }
    let current = card(services, &app.id)
        .await?
        .ok_or_else(|| OfficeError::Internal(anyhow::anyhow!("no delivery row for {}", app.id)))?;
    if current.office_code != office_code {
        delivery.metrics.handover("refused");
        return Err(OfficeError::Conflict(format!(
            "the holder collects at office {}, not {}",
            current.office_code, office_code
        )));
    }
    if current.available_at.is_none() {
        delivery.metrics.handover("refused");
        return Err(OfficeError::Conflict(
            "the card is still being transferred to this office".into(),
        ));
    }
    let record = records::load_record(services, &app.id).await?;
    if matches!(
        record.applicant_group,
        ApplicantGroup::Replace13801389 | ApplicantGroup::Voluntary13901396
    ) && !req.previous_card_presented
    {
        delivery.metrics.handover("refused");
        return Err(OfficeError::Unprocessable(
            "previous_card_presented: the holder must hand in the previous national card".into(),
        ));
    }
    if !req.pins_set {
        delivery.metrics.handover("refused");
        return Err(OfficeError::Unprocessable(
            "pins_set: the holder must set the ID PIN, signature PIN and PUK before handover"
                .into(),
        ));
    }
    let live = base64::engine::general_purpose::STANDARD
        .decode(req.fingerprint.trim())
        .map_err(|_| OfficeError::BadRequest("fingerprint: not valid base64".into()))?;
    let live_position = match req.finger_position {
        Some(p) => p,
        None => match iso19794_2::parse(&live) {
            Ok(rec) => rec
                .views
                .iter()
                .map(|v| v.position)
                .find(|p| (1..=10).contains(p))
                .ok_or_else(|| {
                    OfficeError::BadRequest(
                        "finger_position: required, the live record's finger position is 0 (unknown)"
                            .into(),
                    )
                })?,
            Err(e) => {
                return Err(OfficeError::BadRequest(format!(
                    "fingerprint: {}",
                    PlacementError::Iso(e)
                )));
            }
        },
    };
    // The same placement rule as at enrolment (cardpipe_biometrics::matcher::place_finger).
    let (probe_tp, _) = TenPrint::from_placed(&[(live_position, live)])
        .map_err(|e| OfficeError::BadRequest(format!("fingerprint: {e}")))?;
    let position = probe_tp
        .fingers
        .iter()
        .position(Option::is_some)
        .map_or(0, |p| p as i64 + 1);
    let enrolled = records::load_biometrics(services, &app.id).await?;
    let templates: Vec<(u8, Vec<u8>)> = enrolled
        .fingerprints
        .into_iter()
        .filter_map(|f| f.template.map(|t| (f.position, t)))
        .collect();
    let (reference, _) = TenPrint::from_placed(&templates).map_err(|e| {
        OfficeError::Internal(anyhow::anyhow!("enrolled templates of {}: {e}", app.id))
    })?;
    // One of the card's attempts of the day is reserved before the check (atomically, so
    // parallel tries cannot exceed the limit); used up, the card waits for a supervisor.
    let now = services.clock.now();
    if !reserve_attempt(
        services,
        &app.id,
        delivery.cfg.handover_attempts_per_day,
        now,
    )
    .await?
    {
        delivery.metrics.handover("attempts_exhausted");
        audit::record(
            &services.store,
            services.clock.as_ref(),
            &AuditEvent {
                actor: &client,
                role: by.role(),
                action: "delivery.handover_refused",
                subject: app.id.as_str(),
                details: json!({
                    "reason": "attempts_exhausted", "office": office_code, "clerk": req.clerk,
                    "attempts_per_day": delivery.cfg.handover_attempts_per_day,
                }),
            },
        )
        .await?;
        return Err(OfficeError::Forbidden(format!(
            "fingerprint: the {} attempts of today for this card are used up; a centre supervisor can unlock it",
            delivery.cfg.handover_attempts_per_day
        )));
    }
    let verdict = verify(
        &Probe::new(&probe_tp),
        &reference,
        delivery.cfg.handover_fmr,
        Calibration::fvc2002(),
    );
    if !verdict.is_match {
        delivery.metrics.handover("fingerprint_mismatch");
        audit::record(
            &services.store,
            services.clock.as_ref(),
            &AuditEvent {
                actor: &client,
                role: by.role(),
                action: "delivery.handover_refused",
                subject: app.id.as_str(),
                details: json!({
                    "reason": "fingerprint_mismatch", "score": verdict.fused.score,
                    "office": office_code, "clerk": req.clerk,
                }),
            },
        )
        .await?;
        return Err(OfficeError::Forbidden(
            "fingerprint: the live fingerprint does not match the enrolled template".into(),
        ));
    }
    let (fee, double) = fee_due(services, &app.id).await?;
    if req.fee_rial != fee {
        delivery.metrics.handover("refused");
        return Err(OfficeError::Unprocessable(format!(
            "fee_rial: {fee} rial is due at handover (the delivery fee of {} rial, less {} rial prepaid at enrolment)",
            fees::DELIVERY_RIAL,
            fees::DELIVERY_RIAL - fee
        )));
    }
    let mut tx = services.store.begin().await?;
    let moved = Store::transition(
        &mut tx,
        &Transition {
            id: &app.id,
            from: ApplicationState::AtOffice,
            to: ApplicationState::Collected,
            stage: "handover",
            attempt: 0,
            actor: &actor,
            reason: Some("holder verified by fingerprint"),
            at: now,
        },
    )
    .await?;
    if !moved {
        return Err(OfficeError::Conflict(
            "the card was handed over or voided meanwhile".into(),
        ));
    }
    sqlx::query(
        "INSERT INTO delivery_handovers (application_id, office_code, clerk, finger_position, match_score,
             previous_card_presented, pins_set, fee_rial, double_fee, collected_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(app.id.as_str())
    .bind(&office_code)
    .bind(&req.clerk)
    .bind(position)
    .bind(verdict.fused.score)
    .bind(i64::from(req.previous_card_presented))
    .bind(i64::from(req.pins_set))
    .bind(fee)
    .bind(i64::from(double))
    .bind(to_rfc3339(now))
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE delivery_cards SET collected_at = $1 WHERE application_id = $2")
        .bind(to_rfc3339(now))
        .bind(app.id.as_str())
        .execute(&mut *tx)
        .await?;
    enqueue_callback(
        &mut tx,
        app.id.as_str(),
        CallbackEvent::Collected,
        &app.registry_id,
        Some(ApplicationState::Collected),
        None,
        json!({ "office": office_code, "fee_rial": fee, "double_fee": double }),
        now,
    )
    .await?;
    audit::record_in(
        &mut tx,
        now,
        &AuditEvent {
            actor: &client,
            role: by.role(),
            action: "delivery.handover",
            subject: app.id.as_str(),
            details: json!({
                "office": office_code,
                "clerk": req.clerk,
                "fee_rial": fee,
                "double_fee": double,
                "previous_card_presented": req.previous_card_presented,
                "score": verdict.fused.score,
            }),
        },
    )
    .await?;
    tx.commit().await?;
    delivery.metrics.handover("collected");
    Ok(HandoverOutcome {
        application_id: app.id.to_string(),
        fee_rial: fee,
        double_fee: double,
        match_score: verdict.fused.score,
    })
}

/// Parses a stored instant (for callers reading delivery rows).
pub fn parse_time(text: &str) -> anyhow::Result<OffsetDateTime> {
    Ok(from_rfc3339(text)?)
}
