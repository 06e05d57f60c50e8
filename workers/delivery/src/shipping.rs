//! The `shipping` stage: a card that passed QC goes into the open box of its pickup office.
//!
//! The office is read from the applicant record at packing time, so a change of office
//! before packing re-routes the card. Box allocation happens in the completion transaction:
//! the open box of the office gains the card (sealed when it reaches its capacity), or a new
//! box is opened; a unique index allows one open box per office, so two packers racing on one
//! office cannot both open one (the loser's transaction fails and the job is retried).

use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use cardpipe_common::clock::{from_rfc3339, to_rfc3339};
use cardpipe_common::domain::{Application, ApplicationId, ApplicationState};
use cardpipe_common::runtime::{Completion, ExtraWrites, JobContext, Permanent, Stage};
use cardpipe_common::store::{StoreError, StoreTx};
use futures::future::BoxFuture;
use sqlx::Row;
use time::OffsetDateTime;

use crate::{Delivery, offices};

/// The stage name (queue, `[stages.shipping]`, `cardpipe worker shipping`).
pub const STAGE_NAME: &str = cardpipe_common::contract::stage_names::SHIPPING;

/// Packs cards into boxes per pickup office.
#[derive(Debug)]
pub struct ShippingStage {
    delivery: Arc<Delivery>,
}

impl ShippingStage {
    /// A stage packing with `delivery`'s configuration.
    pub fn new(delivery: Arc<Delivery>) -> Self {
        Self { delivery }
    }
}

/// The pickup office recorded for an application (clear column of `applicant_records`).
pub async fn pickup_office(
    services: &cardpipe_common::runtime::Services,
    id: &ApplicationId,
) -> Result<Option<String>, StoreError> {
    let row = sqlx::query("SELECT pickup_office FROM applicant_records WHERE application_id = $1")
        .bind(id.as_str())
        .fetch_optional(services.store.pool())
        .await?;
    Ok(row.map(|r| r.try_get("pickup_office")).transpose()?)
}

/// When the card was issued: its (latest) QC pass.
async fn issued_at(
    services: &cardpipe_common::runtime::Services,
    app: &Application,
) -> anyhow::Result<OffsetDateTime> {
    let row = sqlx::query(
        "SELECT MAX(at) AS at FROM application_history WHERE application_id = $1 AND to_state = 'qc_passed'",
    )
    .bind(app.id.as_str())
    .fetch_one(services.store.pool())
    .await?;
    let at: Option<String> = row.try_get("at")?;
    Ok(match at {
        Some(text) => from_rfc3339(&text).context("application_history.at")?,
        None => app.updated_at,
    })
}

/// Puts `application` in the open box of `office` (or opens one); returns the box id.
pub async fn allocate_box(
    tx: &mut StoreTx,
    office: &str,
    capacity: u32,
    at: OffsetDateTime,
) -> Result<String, StoreError> {
    let now = to_rfc3339(at);
    for _ in 0..3 {
        let open =
            sqlx::query("SELECT id FROM delivery_boxes WHERE office_code = $1 AND state = 'open'")
                .bind(office)
                .fetch_optional(&mut **tx)
                .await?;
        if let Some(row) = open {
            let id: String = row.try_get("id")?;
            let done = sqlx::query(
                "UPDATE delivery_boxes SET card_count = card_count + 1,
                     state = CASE WHEN card_count + 1 >= capacity THEN 'sealed' ELSE 'open' END,
                     sealed_at = CASE WHEN card_count + 1 >= capacity THEN $2 ELSE NULL END
                 WHERE id = $1 AND state = 'open' AND card_count < capacity",
            )
            .bind(&id)
            .bind(&now)
            .execute(&mut **tx)
            .await?;
            if done.rows_affected() == 1 {
                return Ok(id);
            }
            continue;
        }
        let id = format!(
            "BOX-{office}-{}",
            &uuid::Uuid::now_v7().simple().to_string()[20..]
        );
        let full = capacity <= 1;
        sqlx::query(
            "INSERT INTO delivery_boxes (id, office_code, state, capacity, card_count, created_at, sealed_at)
             VALUES ($1, $2, $3, $4, 1, $5, $6)",
        )
        .bind(&id)
        .bind(office)
        .bind(if full { "sealed" } else { "open" })
        .bind(i64::from(capacity))
        .bind(&now)
        .bind(full.then(|| now.clone()))
        .execute(&mut **tx)
        .await?;
        return Ok(id);
    }
    Err(StoreError::NotFound(format!(
        "an open box for office {office} (contended)"
    )))
}

/// Pins the closure's higher-ranked signature.
fn extra_writes<F>(f: F) -> ExtraWrites
where
    F: for<'t> FnOnce(&'t mut StoreTx) -> BoxFuture<'t, Result<(), StoreError>> + Send + 'static,
{
    Box::new(f)
}

#[async_trait]
impl Stage for ShippingStage {
    fn name(&self) -> &'static str {
        STAGE_NAME
    }

    fn accepts(&self) -> &'static [ApplicationState] {
        &[ApplicationState::QcPassed]
    }

    async fn handle(&self, ctx: &JobContext, app: &Application) -> anyhow::Result<Completion> {
        let services = &ctx.services;
        self.delivery.ensure_offices(services).await?;
        let office = pickup_office(services, &app.id)
            .await?
            .ok_or_else(|| Permanent(format!("no applicant record for {}", app.id)))?;
        if offices::get(&services.store, &office).await?.is_none() {
            return Err(Permanent(format!(
                "pickup office {office:?} is not in the offices register"
            ))
            .into());
        }
        let issued = issued_at(services, app).await?;
        let void_on = self.delivery.void_on(issued);
        let now = services.clock.now();
        let capacity = self.delivery.cfg.box_capacity;
        let id = app.id.clone();
        let office_for_tx = office.clone();
        let metrics = self.delivery.metrics.clone();
        Ok(Completion::to(ApplicationState::Packed)
            .because(format!("packed for office {office}"))
            .with_writes(extra_writes(move |tx| {
                Box::pin(async move {
                    let box_id = allocate_box(tx, &office_for_tx, capacity, now).await?;
                    sqlx::query(
                        "INSERT INTO delivery_cards (application_id, box_id, packed_office, office_code, issued_at, void_on, packed_at)
                         VALUES ($1, $2, $3, $3, $4, $5, $6)
                         ON CONFLICT (application_id) DO UPDATE SET box_id = excluded.box_id,
                             packed_office = excluded.packed_office, office_code = excluded.office_code,
                             issued_at = excluded.issued_at, void_on = excluded.void_on, packed_at = excluded.packed_at,
                             shipped_at = NULL, received_at = NULL, available_at = NULL",
                    )
                    .bind(id.as_str())
                    .bind(&box_id)
                    .bind(&office_for_tx)
                    .bind(to_rfc3339(issued))
                    .bind(void_on.to_string())
                    .bind(to_rfc3339(now))
                    .execute(&mut **tx)
                    .await?;
                    metrics.packed(1);
                    Ok(())
                })
            })))
    }
}
