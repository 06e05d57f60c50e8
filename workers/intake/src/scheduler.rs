//! The release scheduler: moves scheduled batches' applications from
//! `received` to `dedup_pending` at their release time, with the `dedup` job
//! in the outbox, one transaction per chunk.
//!
//! * Exactly once across replicas: only the holder of the
//!   `intake-release-scheduler` lease releases, and every move is a
//!   compare-and-set (`Store::transition`) whose job is written only when the
//!   move happened — two replicas that both believe they hold the lease still
//!   release each application once.
//! * Paced by a token bucket: `release_per_minute / 60` tokens a second, holding at most one
//!   poll interval's worth (at least one), so releases follow the rate smoothly instead of
//!   a minute's budget in a burst at each minute boundary. The bucket is the lease holder's;
//!   a takeover starts with one interval's worth.
//! * Urgent batches first, then urgent records, then release time, then line order.

use std::sync::Arc;
use std::time::Duration as StdDuration;

use cardpipe_common::broker::Job;
use cardpipe_common::clock::to_rfc3339;
use cardpipe_common::domain::{ApplicationId, ApplicationState};
use cardpipe_common::runtime::Services;
use cardpipe_common::store::{Store, StoreError, Transition};
use sqlx::Row;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use cardpipe_registry::config::RegistryConfig;

/// The lease naming the replica that releases.
pub const LEASE: &str = "intake-release-scheduler";
/// The stage (job name) released applications go to.
pub const NEXT_STAGE: &str = cardpipe_common::contract::stage_names::DEDUP;

/// The scheduler's state (its token bucket).
#[derive(Debug)]
pub struct Scheduler {
    services: Services,
    cfg: Arc<RegistryConfig>,
    holder: String,
    /// When the bucket was last filled, and the tokens it held then.
    bucket: Option<(OffsetDateTime, f64)>,
}

impl Scheduler {
    /// A scheduler with a fresh holder id.
    pub fn new(services: Services, cfg: Arc<RegistryConfig>) -> Self {
        Self {
            services,
            cfg,
            holder: format!("release-{}", uuid::Uuid::new_v4()),
            bucket: None,
        }
    }

    /// One round: if this replica holds the lease, releases what is due and
    /// allowed by the throttle; returns how many applications it released.
    pub async fn tick(&mut self) -> Result<usize, StoreError> {
        let now = self.services.clock.now();
        if !self
            .services
            .store
            .try_lease(LEASE, &self.holder, now, time::Duration::seconds(30))
            .await?
        {
            self.bucket = None;
            return Ok(0);
        }
        let rate = f64::from(self.cfg.release_per_minute) / 60.0;
        let capacity = (rate * self.cfg.release_poll_ms as f64 / 1000.0).max(1.0);
        let tokens = match self.bucket {
            Some((at, tokens)) => {
                (tokens + (now - at).as_seconds_f64().max(0.0) * rate).min(capacity)
            }
            None => capacity,
        };
        // (A hair over: tokens added a second at a time must reach a whole one on time.)
        let budget = (tokens + 1e-9).floor() as usize;
        let mut released = 0usize;
        let mut left = budget;
        while left > 0 {
            let take = left.min(self.cfg.chunk_size.max(1));
            let ids = due(&self.services, now, take as i64).await?;
            if ids.is_empty() {
                break;
            }
            let n = release_chunk(&self.services, &ids, now).await?;
            released += n;
            left = left.saturating_sub(ids.len());
            if n == 0 {
                break;
            }
        }
        self.bucket = Some((now, tokens - released as f64));
        mark_released(&self.services, now).await?;
        Ok(released)
    }

    /// Ticks every `release_poll_ms` until `shutdown`; gives the lease up on exit.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let poll = StdDuration::from_millis(self.cfg.release_poll_ms.max(10));
        loop {
            match self.tick().await {
                Ok(n) if n > 0 => tracing::info!(released = n, "released applications to dedup"),
                Ok(_) => {}
                Err(err) => tracing::warn!(error = %err, "release round failed; will retry"),
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

/// Applications due for release, in release order, each with whether it is urgent (its
/// batch or the application itself).
async fn due(
    services: &Services,
    now: OffsetDateTime,
    limit: i64,
) -> Result<Vec<(ApplicationId, bool)>, StoreError> {
    let rows = sqlx::query(
        "SELECT a.id, CASE WHEN b.priority = 'urgent' OR a.priority = 'urgent' THEN 1 ELSE 0 END AS urgent
         FROM applications a JOIN batches b ON a.batch_id = b.id
         WHERE b.state = 'scheduled' AND b.release_at <= $1 AND a.state = 'received'
         ORDER BY CASE WHEN b.priority = 'urgent' THEN 0 ELSE 1 END,
                  CASE WHEN a.priority = 'urgent' THEN 0 ELSE 1 END,
                  b.release_at, a.id
         LIMIT $2",
    )
    .bind(to_rfc3339(now))
    .bind(limit)
    .fetch_all(services.store.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                ApplicationId(r.try_get("id")?),
                r.try_get::<i32, _>("urgent")? != 0,
            ))
        })
        .collect()
}

/// Releases `ids` (each with whether it is urgent) in one transaction; returns how many
/// moved (others had moved already, or been cancelled). An urgent application is marked
/// urgent and its dedup job goes to the priority lane; every later stage's job follows
/// the application's priority.
pub async fn release_chunk(
    services: &Services,
    ids: &[(ApplicationId, bool)],
    now: OffsetDateTime,
) -> Result<usize, StoreError> {
    let mut tx = services.store.begin().await?;
    let mut moved = 0;
    for (id, urgent) in ids {
        let done = Store::transition(
            &mut tx,
            &Transition {
                id,
                from: ApplicationState::Received,
                to: ApplicationState::DedupPending,
                stage: "release",
                attempt: 0,
                actor: "stage:intake-release",
                reason: None,
                at: now,
            },
        )
        .await?;
        if done {
            if *urgent {
                sqlx::query("UPDATE applications SET priority = 'urgent' WHERE id = $1")
                    .bind(id.as_str())
                    .execute(&mut *tx)
                    .await?;
            }
            let job = Job::new(NEXT_STAGE, id.as_str()).with_priority(*urgent);
            Store::enqueue_job(&mut tx, &job, now).await?;
            moved += 1;
        }
    }
    tx.commit().await?;
    Ok(moved)
}

/// Marks scheduled batches with nothing left to release as released.
async fn mark_released(services: &Services, now: OffsetDateTime) -> Result<(), StoreError> {
    let now = to_rfc3339(now);
    let done = sqlx::query(
        "UPDATE batches SET state = 'released', released_at = $1, updated_at = $1
         WHERE state = 'scheduled' AND release_at <= $1
           AND NOT EXISTS (SELECT 1 FROM applications a WHERE a.batch_id = batches.id AND a.state = 'received')",
    )
    .bind(&now)
    .execute(services.store.pool())
    .await?;
    services.metrics.batches_released(done.rows_affected());
    Ok(())
}
