//! The delivery loop `cardpipe run` starts: under the `delivery-scheduler` lease, each tick
//! dispatches the day's boxes after the cut-off, creates the reminders due, and voids the
//! cards due after the voiding time. Every piece is also exactly-once on its own (run rows,
//! unique reminder rows, compare-and-set moves), so a lease taken over mid-round repeats
//! nothing.

use std::sync::Arc;
use std::time::Duration as StdDuration;

use cardpipe_common::runtime::Services;
use tokio_util::sync::CancellationToken;

use crate::{Delivery, dispatch, reminders, voiding};

/// The lease naming the replica that runs delivery's time-driven work.
pub const LEASE: &str = "delivery-scheduler";

/// What one tick did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TickReport {
    /// Whether this replica held the lease.
    pub leader: bool,
    /// Cards dispatched.
    pub dispatched: usize,
    /// Reminders created.
    pub reminders: usize,
    /// Cards voided.
    pub voided: usize,
}

/// The delivery scheduler of one replica.
#[derive(Debug)]
pub struct Scheduler {
    delivery: Arc<Delivery>,
    services: Services,
    holder: String,
}

impl Scheduler {
    /// A scheduler with a fresh holder id.
    pub fn new(delivery: Arc<Delivery>, services: Services) -> Self {
        Self {
            delivery,
            services,
            holder: format!("delivery-{}", uuid::Uuid::new_v4()),
        }
    }

    /// One round (only the lease holder works).
    pub async fn tick(&self) -> anyhow::Result<TickReport> {
        let now = self.services.clock.now();
        let ttl = time::Duration::milliseconds((self.delivery.cfg.tick_ms as i64 * 10).max(30_000));
        if !self
            .services
            .store
            .try_lease(LEASE, &self.holder, now, ttl)
            .await?
        {
            return Ok(TickReport::default());
        }
        self.delivery.ensure_offices(&self.services).await?;
        let mut report = TickReport {
            leader: true,
            ..TickReport::default()
        };
        if let Some(day) = dispatch::due(&self.delivery, &self.services, now).await?
            && let Some(d) =
                dispatch::dispatch(&self.delivery, &self.services, day, &self.holder).await?
        {
            report.dispatched = d.cards;
        }
        if let Some(day) = voiding::due(&self.delivery, &self.services, now).await?
            && let Some(n) =
                voiding::void_due(&self.delivery, &self.services, day, &self.holder).await?
        {
            report.voided = n;
        }
        report.reminders =
            reminders::schedule(&self.delivery, &self.services, self.services.clock.now()).await?;
        // Messages recorded while no gateway was configured go out now that one is.
        let requeued = reminders::requeue_unsent(
            &self.delivery,
            &self.services,
            self.services.clock.now(),
            500,
        )
        .await?;
        if requeued > 0 {
            tracing::info!(
                requeued,
                "unsent messages re-queued: an SMS gateway is configured"
            );
        }
        let horizon = crate::tehran_date(now) + time::Duration::days(30);
        let near: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM delivery_cards c JOIN applications a ON a.id = c.application_id
             WHERE a.state = 'at_office' AND c.void_on <= $1",
        )
        .bind(horizon.to_string())
        .fetch_one(self.services.store.pool())
        .await
        .and_then(|r| sqlx::Row::try_get(&r, "n"))?;
        self.delivery.metrics.set_near_voiding(near);
        let open = cardpipe_common::discrepancies::open_count(&self.services)
            .await
            .map_err(|e| anyhow::anyhow!("counting open discrepancies: {e}"))?;
        self.delivery.metrics.set_discrepancies_open(open);
        Ok(report)
    }

    /// Ticks every `tick_ms` until `shutdown`; gives the lease up on exit.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let poll = StdDuration::from_millis(self.delivery.cfg.tick_ms.max(10));
        loop {
            match self.tick().await {
                Ok(r) if r.dispatched + r.reminders + r.voided > 0 => {
                    tracing::info!(
                        dispatched = r.dispatched,
                        reminders = r.reminders,
                        voided = r.voided,
                        "delivery round"
                    );
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(error = %format!("{err:#}"), "delivery round failed; will retry")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(poll) => {}
            }
        }
        let _ = self.services.store.release_lease(LEASE, &self.holder).await;
        Ok(())
    }
}
