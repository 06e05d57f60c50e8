//! Operator actions, shared by the console and `cardpipe ops`. Each checks the operator's
//! role and appends an audit entry (common::audit) naming who did what to what and why.

use std::sync::Arc;

use cardpipe_common::audit::{self, AuditEvent};
use cardpipe_common::clock::to_rfc3339;
use cardpipe_common::contract::{self, AdjudicationDecision, RevocationCause};
use cardpipe_common::domain::{ApplicationId, ApplicationState};
use cardpipe_common::runtime::Services;
use cardpipe_common::runtime::parked::{self, ParkedError};
use cardpipe_common::store::{Store, Transition};
use serde_json::json;

use crate::auth::{AuthError, Operator};

/// Why an action was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// The role does not allow it, or the input is wrong (the message says which).
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Wrong input (named).
    #[error("{0}")]
    BadInput(String),
    /// Nothing to act on.
    #[error("{0}")]
    NotFound(String),
    /// The thing moved meanwhile.
    #[error("{0}")]
    Conflict(String),
    /// Store, broker or engine failure.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<ParkedError> for ActionError {
    fn from(e: ParkedError) -> Self {
        match e {
            ParkedError::NotFound(id) => ActionError::NotFound(format!("no parked job {id}")),
            other => ActionError::Internal(other.into()),
        }
    }
}

impl From<cardpipe_common::store::StoreError> for ActionError {
    fn from(e: cardpipe_common::store::StoreError) -> Self {
        ActionError::Internal(e.into())
    }
}

fn check_reason(reason: &str) -> Result<&str, ActionError> {
    let reason = reason.trim();
    if reason.is_empty() || reason.chars().count() > 500 {
        return Err(ActionError::BadInput(
            "a reason of 1..=500 characters is required".into(),
        ));
    }
    Ok(reason)
}

/// Takes a parked job off the broker's parking queue (best effort: a process with its own
/// in-memory broker, like `cardpipe ops` beside an embedded `cardpipe run`, has no parking
/// queue of its own; the `parked_jobs` row is what operators act on).
async fn unpark(services: &Services, job: &parked::ParkedJob) {
    if let Err(e) = services.broker.take_parked(&job.stage, &job.job_id).await {
        tracing::debug!(error = %e, job = %job.job_id, "parked job not on this broker's parking queue");
    }
}

/// Removes the `parked_jobs` row in `tx`; false when someone else already did.
async fn delete_parked(
    tx: &mut cardpipe_common::store::StoreTx,
    job_id: &str,
) -> Result<bool, ActionError> {
    let done = sqlx::query("DELETE FROM parked_jobs WHERE job_id = $1")
        .bind(job_id)
        .execute(&mut **tx)
        .await
        .map_err(anyhow::Error::from)?;
    Ok(done.rows_affected() == 1)
}

/// Sends a parked job back to its stage as a fresh first attempt (operator or supervisor).
/// The new job goes through the outbox in the same transaction as the audit entry, so the
/// relay of any running process delivers it.
pub async fn parked_retry(
    services: &Services,
    who: &Operator,
    job_id: &str,
) -> Result<cardpipe_common::broker::Job, ActionError> {
    who.require_act("retrying parked work")?;
    let before = find_parked(services, job_id).await?;
    unpark(services, &before).await;
    let job = cardpipe_common::broker::Job::new(before.stage.clone(), before.subject.clone());
    let now = services.clock.now();
    let mut tx = services.store.begin().await?;
    if !delete_parked(&mut tx, job_id).await? {
        return Err(ActionError::NotFound(format!(
            "no parked job {job_id} (already handled)"
        )));
    }
    Store::enqueue_job(&mut tx, &job, now).await?;
    audit::record_in(
        &mut tx,
        now,
        &AuditEvent {
            actor: &who.login,
            role: who.role.as_str(),
            action: "parked.retry",
            subject: &before.subject,
            details: json!({ "job_id": job_id, "stage": before.stage, "new_job_id": job.id }),
        },
    )
    .await?;
    tx.commit().await.map_err(anyhow::Error::from)?;
    Ok(job)
}

/// Drops a parked job for good; the application stays where it is (supervisor).
pub async fn parked_drop(
    services: &Services,
    who: &Operator,
    job_id: &str,
    reason: &str,
) -> Result<parked::ParkedJob, ActionError> {
    who.require_supervisor("dropping parked work")?;
    let reason = check_reason(reason)?;
    let dropped = find_parked(services, job_id).await?;
    unpark(services, &dropped).await;
    let now = services.clock.now();
    let mut tx = services.store.begin().await?;
    if !delete_parked(&mut tx, job_id).await? {
        return Err(ActionError::NotFound(format!(
            "no parked job {job_id} (already handled)"
        )));
    }
    audit::record_in(
        &mut tx,
        now,
        &AuditEvent {
            actor: &who.login,
            role: who.role.as_str(),
            action: "parked.drop",
            subject: &dropped.subject,
            details: json!({ "job_id": job_id, "stage": dropped.stage, "reason": reason }),
        },
    )
    .await?;
    tx.commit().await.map_err(anyhow::Error::from)?;
    Ok(dropped)
}

/// Force-fails parked work: drops the job and ends its application — `rejected` when it
/// was never released, otherwise `cancelled` (which revokes any certificate issued) — with
/// the reason in its history (supervisor).
pub async fn parked_fail(
    services: &Services,
    who: &Operator,
    job_id: &str,
    reason: &str,
) -> Result<ApplicationState, ActionError> {
    who.require_supervisor("force-failing parked work")?;
    let reason = check_reason(reason)?;
    let job = find_parked(services, job_id).await?;
    let app_id = ApplicationId(job.subject.clone());
    let app = services
        .store
        .application(&app_id)
        .await?
        .ok_or_else(|| ActionError::NotFound(format!("no application {}", job.subject)))?;
    let to = if app.state == ApplicationState::Received {
        ApplicationState::Rejected
    } else if app.state.is_cancellable() {
        ApplicationState::Cancelled
    } else {
        return Err(ActionError::Conflict(format!(
            "application {} is in state {}, which cannot be failed; drop the job instead",
            app.id, app.state
        )));
    };
    let now = services.clock.now();
    let history_reason = format!("force-failed by an operator: {reason}");
    let actor = format!("operator:{}", who.login);
    let mut tx = services.store.begin().await?;
    let moved = Store::transition(
        &mut tx,
        &Transition {
            id: &app_id,
            from: app.state,
            to,
            stage: "console",
            attempt: 0,
            actor: &actor,
            reason: Some(&history_reason),
            at: now,
        },
    )
    .await?;
    if !moved {
        tx.rollback().await.map_err(anyhow::Error::from)?;
        return Err(ActionError::Conflict(format!(
            "application {} changed state meanwhile; look again",
            app.id
        )));
    }
    if to == ApplicationState::Cancelled {
        contract::request_revocation(
            &mut tx,
            &app_id,
            RevocationCause::Cancelled,
            Vec::new(),
            now,
        )
        .await?;
        contract::request_key_destruction(&mut tx, &app_id, now).await?;
    }
    delete_parked(&mut tx, job_id).await?;
    audit::record_in(
        &mut tx,
        now,
        &AuditEvent {
            actor: &who.login,
            role: who.role.as_str(),
            action: "parked.fail",
            subject: app_id.as_str(),
            details: json!({
                "job_id": job_id,
                "stage": job.stage,
                "from": app.state.as_str(),
                "to": to.as_str(),
                "reason": reason,
            }),
        },
    )
    .await?;
    tx.commit().await.map_err(anyhow::Error::from)?;
    // The application is final now: take the job off the parking queue too.
    unpark(services, &job).await;
    Ok(to)
}

async fn find_parked(services: &Services, job_id: &str) -> Result<parked::ParkedJob, ActionError> {
    parked::list(services, None)
        .await?
        .into_iter()
        .find(|p| p.job_id == job_id)
        .ok_or_else(|| ActionError::NotFound(format!("no parked job {job_id}")))
}

/// Sends an adjudicator's decision on a possible duplicate to dedup (confirming needs a
/// supervisor; clearing an operator). Checked here (decision, reason, the application still
/// waiting for a decision), then recorded in one transaction with its audit entry as a
/// request the dedup stage applies (outbox topic `dedup.adjudication`): the console never
/// moves an application itself. Returns the state asked for.
pub async fn adjudicate(
    services: &Services,
    who: &Operator,
    application_id: &str,
    decision: &str,
    reason: &str,
) -> Result<ApplicationState, ActionError> {
    let to = match decision {
        "confirmed_duplicate" => {
            who.require_supervisor("confirming a duplicate")?;
            ApplicationState::ConfirmedDuplicate
        }
        "cleared" => {
            who.require_act("adjudicating a possible duplicate")?;
            ApplicationState::Cleared
        }
        _ => {
            return Err(ActionError::BadInput(
                "decision must be \"confirmed_duplicate\" or \"cleared\"".into(),
            ));
        }
    };
    let reason = reason.trim();
    if reason.is_empty() || reason.chars().count() > 2000 {
        return Err(ActionError::BadInput(
            "reason must be 1..=2000 characters".into(),
        ));
    }
    if application_id.is_empty()
        || application_id.len() > 64
        || !application_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(ActionError::BadInput("invalid application id".into()));
    }
    let id = ApplicationId(application_id.to_owned());
    let app = services
        .store
        .application(&id)
        .await
        .map_err(|e| ActionError::Internal(e.into()))?
        .ok_or_else(|| ActionError::NotFound(format!("no application {application_id}")))?;
    if app.state != ApplicationState::PossibleDuplicate {
        return Err(ActionError::Conflict(format!(
            "application {application_id} is {}, not waiting for a decision",
            app.state.as_str()
        )));
    }
    let now = services.clock.now();
    let request = AdjudicationDecision {
        application_id: application_id.to_owned(),
        decision: to.as_str().to_owned(),
        reason: reason.to_owned(),
        operator: who.login.clone(),
        role: who.role.as_str().to_owned(),
    };
    let submitted = async {
        let mut tx = services.store.begin().await?;
        contract::request_adjudication(&mut tx, &request, now).await?;
        audit::record_in(
            &mut tx,
            now,
            &AuditEvent {
                actor: &who.login,
                role: who.role.as_str(),
                action: "console.adjudication_submitted",
                subject: application_id,
                details: json!({ "decision": to.as_str() }),
            },
        )
        .await?;
        tx.commit().await?;
        Ok::<(), cardpipe_common::store::StoreError>(())
    }
    .await;
    submitted.map_err(|e| ActionError::Internal(e.into()))?;
    Ok(to)
}

/// Takes an encoder out of service (or back in): records the decision for every process
/// driving it, applies it at once to `farm` when this process drives it.
pub async fn encoder_service(
    services: &Services,
    farm: Option<&cardpipe_card::farm::Farm>,
    who: &Operator,
    encoder: &str,
    in_service: bool,
    reason: &str,
) -> Result<(), ActionError> {
    who.require_act("changing an encoder's service state")?;
    let reason = check_reason(reason)?;
    if encoder.is_empty() || encoder.len() > 200 || encoder.chars().any(char::is_control) {
        return Err(ActionError::BadInput("invalid encoder name".into()));
    }
    let known = crate::data::encoders(services, farm)
        .await?
        .iter()
        .any(|e| e.name == encoder);
    if !known {
        return Err(ActionError::NotFound(format!("no encoder {encoder:?}")));
    }
    let now = services.clock.now();
    let mut tx = services.store.begin().await?;
    sqlx::query(
        "INSERT INTO encoder_service (encoder, in_service, reason, changed_by, changed_at)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (encoder) DO UPDATE SET in_service = $2, reason = $3, changed_by = $4, changed_at = $5",
    )
    .bind(encoder)
    .bind(i64::from(in_service))
    .bind(reason)
    .bind(&who.login)
    .bind(to_rfc3339(now))
    .execute(&mut *tx)
    .await
    .map_err(anyhow::Error::from)?;
    audit::record_in(
        &mut tx,
        now,
        &AuditEvent {
            actor: &who.login,
            role: who.role.as_str(),
            action: if in_service {
                "encoder.in_service"
            } else {
                "encoder.out_of_service"
            },
            subject: encoder,
            details: json!({ "reason": reason }),
        },
    )
    .await?;
    tx.commit().await.map_err(anyhow::Error::from)?;
    if let Some(farm) = farm {
        farm.set_in_service(encoder, in_service, reason);
    }
    Ok(())
}

/// Applies the operators' recorded encoder decisions to a farm this process drives (at start
/// and then every `every`, so a decision made in another process reaches this one).
pub async fn follow_encoder_decisions(
    services: Services,
    farm: Arc<cardpipe_card::farm::Farm>,
    every: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    use sqlx::Row;
    let mut applied: std::collections::HashMap<String, (bool, String)> = Default::default();
    loop {
        let rows =
            sqlx::query("SELECT encoder, in_service, reason, changed_at FROM encoder_service")
                .fetch_all(services.store.pool())
                .await;
        if let Ok(rows) = rows {
            for r in rows {
                let (Ok(name), Ok(flag), Ok(reason), Ok(at)) = (
                    r.try_get::<String, _>("encoder"),
                    r.try_get::<i64, _>("in_service"),
                    r.try_get::<String, _>("reason"),
                    r.try_get::<String, _>("changed_at"),
                ) else {
                    continue;
                };
                let stamp = (flag != 0, at);
                if applied.get(&name) != Some(&stamp) {
                    farm.set_in_service(&name, flag != 0, &reason);
                    applied.insert(name, stamp);
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Resolves an office discrepancy (supervisor): a missing card `found` or `lost` (revoked and
/// reprinted, reason lost in transit), an extra card `returned`; audited by
/// [`cardpipe_common::discrepancies::resolve`].
pub async fn resolve_discrepancy(
    services: &Services,
    who: &Operator,
    id: &str,
    outcome: &str,
    note: &str,
) -> Result<cardpipe_common::discrepancies::Resolved, ActionError> {
    use cardpipe_common::discrepancies::DiscrepancyError;
    who.require_supervisor("resolving office discrepancies")?;
    cardpipe_common::discrepancies::resolve(
        services,
        id,
        outcome,
        note,
        (&who.login, who.role.as_str()),
    )
    .await
    .map_err(|e| match e {
        DiscrepancyError::BadRequest(m) => ActionError::BadInput(m),
        DiscrepancyError::NotFound(m) => ActionError::NotFound(format!("{m} not found")),
        DiscrepancyError::Conflict(m) => ActionError::Conflict(m),
        DiscrepancyError::Store(e) => ActionError::Internal(e.into()),
    })
}

impl From<cardpipe_common::dead_letters::DeadLetterError> for ActionError {
    fn from(e: cardpipe_common::dead_letters::DeadLetterError) -> Self {
        use cardpipe_common::dead_letters::DeadLetterError;
        match e {
            e @ DeadLetterError::NotFound(_) => ActionError::NotFound(e.to_string()),
            DeadLetterError::Store(e) => ActionError::Internal(e.into()),
        }
    }
}

/// Puts an outbox dead letter back into the outbox (supervisor; audited).
pub async fn dead_letter_requeue(
    services: &Services,
    who: &Operator,
    seq: i64,
) -> Result<cardpipe_common::store::DeadLetter, ActionError> {
    who.require_supervisor("re-queueing a dead letter")?;
    Ok(
        cardpipe_common::dead_letters::requeue(services, seq, (&who.login, who.role.as_str()))
            .await?,
    )
}

/// Deletes an outbox dead letter for good (supervisor; audited with the reason).
pub async fn dead_letter_discard(
    services: &Services,
    who: &Operator,
    seq: i64,
    reason: &str,
) -> Result<cardpipe_common::store::DeadLetter, ActionError> {
    who.require_supervisor("discarding a dead letter")?;
    let reason = reason.trim();
    if reason.is_empty() {
        return Err(ActionError::BadInput(
            "a reason is required to discard a dead letter".into(),
        ));
    }
    Ok(cardpipe_common::dead_letters::discard(
        services,
        seq,
        (&who.login, who.role.as_str()),
        reason,
    )
    .await?)
}
