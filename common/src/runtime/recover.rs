//! Re-enqueues work an in-process broker lost with its process.
//!
//! The embedded broker keeps nothing on disk, but the store knows every
//! application's state: at start, each application sitting in a stage's input
//! state (and not parked) gets a job. Duplicates are harmless: the runner's
//! compare-and-set lets only one delivery commit.

use sqlx::Row;

use super::{Services, Stage};
use crate::broker::Job;
use crate::store::StoreError;

/// Publishes a job for every non-parked application in `stage`'s input states.
pub async fn requeue_stranded(services: &Services, stage: &dyn Stage) -> anyhow::Result<u64> {
    let mut published = 0;
    for state in stage.accepts() {
        let rows = sqlx::query(
            "SELECT a.id, a.priority FROM applications a WHERE a.state = $1
             AND NOT EXISTS (SELECT 1 FROM parked_jobs p WHERE p.subject = a.id AND p.stage = $2)
             ORDER BY a.updated_at",
        )
        .bind(state.as_str())
        .bind(stage.name())
        .fetch_all(services.store.pool())
        .await
        .map_err(StoreError::from)?;
        for row in rows {
            let id: String = row.try_get("id")?;
            let priority: String = row.try_get("priority")?;
            let job = Job::new(stage.name(), id).with_priority(priority == "urgent");
            services.broker.publish(&job).await?;
            published += 1;
        }
    }
    if published > 0 {
        tracing::info!(
            stage = stage.name(),
            published,
            "re-enqueued stranded applications"
        );
    }
    Ok(published)
}
