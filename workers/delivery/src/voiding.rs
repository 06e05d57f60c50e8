//! Voiding: once a day (at `[delivery] voiding_time`, Tehran), every card still waiting at
//! its office on or after its voiding date (issuance + `void_after_months` calendar months)
//! is voided. In one transaction per chunk: `at_office` → `voided` (compare-and-set), a
//! `card_recalls` row (the card goes back to the centre for destruction), the citizen's SMS
//! (a new application is needed, at double fee), the registry callback, and one request to
//! the keys stage (outbox topic `crl.publish`) to revoke the chunk's certificates (cause
//! `voided`) and publish a CRL at once.
//!
//! Exactly once across replicas: only the `delivery-scheduler` lease holder runs it, the
//! day's run is recorded in `scheduled_runs`, and each card's move is a compare-and-set.

use cardpipe_common::audit::{self, AuditEvent};
use cardpipe_common::clock::to_rfc3339;
use cardpipe_common::contract::{self, RevocationCause, RevocationRequest};
use cardpipe_common::domain::{ApplicationId, ApplicationState};
use cardpipe_common::runtime::Services;
use cardpipe_common::store::{Store, Transition};
use cardpipe_registry::callbacks::{CallbackEvent, enqueue_callback};
use serde_json::json;
use sqlx::Row;
use time::{Date, OffsetDateTime};

use crate::{Delivery, reminders};

/// `scheduled_runs` name of the daily voiding.
pub const RUN_NAME: &str = "delivery-voiding";

/// Whether today's voiding run is due at `now` and not done yet; returns the day.
pub async fn due(
    delivery: &Delivery,
    services: &Services,
    now: OffsetDateTime,
) -> anyhow::Result<Option<Date>> {
    crate::daily_run_due(services, RUN_NAME, delivery.voiding_time(), now).await
}

/// Voids every card due on `day`; returns how many were voided (None: the day's run was
/// already done elsewhere).
pub async fn void_due(
    delivery: &Delivery,
    services: &Services,
    day: Date,
    holder: &str,
) -> anyhow::Result<Option<usize>> {
    let rows = sqlx::query(
        "SELECT c.application_id, c.office_code, c.box_id, c.void_on, a.registry_id
         FROM delivery_cards c JOIN applications a ON a.id = c.application_id
         WHERE a.state = 'at_office' AND c.void_on <= $1 ORDER BY c.application_id",
    )
    .bind(day.to_string())
    .fetch_all(services.store.pool())
    .await?;
    let mut cards = Vec::with_capacity(rows.len());
    for r in &rows {
        cards.push((
            r.try_get::<String, _>("application_id")?,
            r.try_get::<String, _>("office_code")?,
            r.try_get::<String, _>("box_id")?,
            r.try_get::<String, _>("void_on")?,
            r.try_get::<String, _>("registry_id")?,
        ));
    }
    let mut voided = 0usize;
    let chunks: Vec<_> = cards.chunks(100).collect();
    let last = chunks.len().saturating_sub(1);
    if chunks.is_empty() {
        let now = services.clock.now();
        let mut tx = services.store.begin().await?;
        if !Store::record_run(&mut tx, RUN_NAME, &day.to_string(), holder, now).await? {
            tx.rollback().await?;
            return Ok(None);
        }
        tx.commit().await?;
        return Ok(Some(0));
    }
    for (i, chunk) in chunks.into_iter().enumerate() {
        let now = services.clock.now();
        let mut tx = services.store.begin().await?;
        // The day's run is recorded with the last chunk: a crash before it leaves the
        // remaining cards for the next round, the voided ones are not touched again.
        if i == last && !Store::record_run(&mut tx, RUN_NAME, &day.to_string(), holder, now).await?
        {
            tx.rollback().await?;
            return Ok(None);
        }
        let mut in_chunk = 0;
        let mut revoke = Vec::new();
        for (app, office, box_id, void_on, registry_id) in chunk {
            let id = ApplicationId(app.clone());
            let moved = Store::transition(
                &mut tx,
                &Transition {
                    id: &id,
                    from: ApplicationState::AtOffice,
                    to: ApplicationState::Voided,
                    stage: "voiding",
                    attempt: 0,
                    actor: "system:delivery-voiding",
                    reason: Some(&format!("not collected by {void_on}")),
                    at: now,
                },
            )
            .await?;
            if !moved {
                continue;
            }
            revoke.push(RevocationRequest {
                application_id: app.clone(),
                cause: RevocationCause::Voided,
                serials: Vec::new(),
            });
            // Normally destroyed when the card passed QC; requested again so no path leaves
            // a package behind (idempotent).
            cardpipe_common::contract::request_key_destruction(&mut tx, &id, now).await?;
            // Each voided application is its own audit entry (the chunk's entry adds the count).
            audit::record_in(
                &mut tx,
                now,
                &AuditEvent {
                    actor: "system:delivery-voiding",
                    role: "system",
                    action: "delivery.void_application",
                    subject: app,
                    details: json!({ "office": office, "box": box_id, "void_on": void_on }),
                },
            )
            .await?;
            sqlx::query("UPDATE delivery_cards SET voided_at = $1 WHERE application_id = $2")
                .bind(to_rfc3339(now))
                .bind(app)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO card_recalls (application_id, office_code, box_id, reason, recalled_at)
                 VALUES ($1, $2, $3, 'voided', $4) ON CONFLICT (application_id) DO NOTHING",
            )
            .bind(app)
            .bind(office)
            .bind(box_id)
            .bind(to_rfc3339(now))
            .execute(&mut *tx)
            .await?;
            reminders::enqueue(
                &mut tx,
                app,
                reminders::VOIDED,
                office,
                day,
                now,
                delivery.next_sendable(now),
            )
            .await?;
            enqueue_callback(
                &mut tx,
                app,
                CallbackEvent::Voided,
                registry_id,
                Some(ApplicationState::Voided),
                Some("not collected within the collection period"),
                json!({ "void_on": void_on, "new_application_fee": "double" }),
                now,
            )
            .await?;
            in_chunk += 1;
        }
        if in_chunk > 0 {
            // The keys stage revokes the voided cards' certificates and publishes a CRL at
            // once (it holds the CA key); the request commits with the voiding.
            contract::request_crl_publication(&mut tx, revoke, now).await?;
            audit::record_in(
                &mut tx,
                now,
                &AuditEvent {
                    actor: "system:delivery-voiding",
                    role: "system",
                    action: "delivery.void",
                    subject: &day.to_string(),
                    details: json!({ "voided": in_chunk }),
                },
            )
            .await?;
        }
        tx.commit().await?;
        voided += in_chunk;
        delivery.metrics.voided(in_chunk as u64);
    }
    if voided > 0 {
        tracing::info!(
            voided,
            "uncollected cards voided; revocation and a CRL requested"
        );
    }
    Ok(Some(voided))
}
