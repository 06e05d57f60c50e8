//! Exactly-once coordination between replicas, in the database.
//!
//! * A lease names one holder for a while (time-driven loops: the replica
//!   holding `release-scheduler` runs it; another takes over when it expires).
//! * A scheduled run is recorded with a unique (name, period) row written in
//!   the same transaction as the work, so a daily job runs once per day even
//!   if two replicas both think they hold the lease.

use time::{Duration, OffsetDateTime};

use super::{Store, StoreError, StoreTx};
use crate::clock::to_rfc3339;

impl Store {
    /// Takes or renews lease `name` for `holder` until `now + ttl`; `false`
    /// when another holder has it and it has not expired.
    pub async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now: OffsetDateTime,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
             WHERE leases.holder = $2 OR leases.expires_at < $4",
        )
        .bind(name)
        .bind(holder)
        .bind(to_rfc3339(now + ttl))
        .bind(to_rfc3339(now))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives a lease up early (on shutdown).
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records that run `name` for `period` (e.g. `2026-11-22`) happened, in
    /// the caller's transaction; `false` when it already did (the caller
    /// must roll back its work).
    pub async fn record_run(
        tx: &mut StoreTx,
        name: &str,
        period: &str,
        holder: &str,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO scheduled_runs (name, period, holder, ran_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name, period) DO NOTHING",
        )
        .bind(name)
        .bind(period)
        .bind(holder)
        .bind(to_rfc3339(at))
        .execute(&mut **tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}
