//! Scatter-gather of a dedup search over the broker (`[dedup] scatter = "broker"`), and the
//! gallery lock that serialises enrolment across processes.
//!
//! ```text
//! dedup job (application X, dedup_pending)
//!   ├─ since = MAX(dedup_enrolled.seq)                          what the shards must have seen
//!   ├─ dedup_scatters row (X, scatter id, since)     committed (or the open one joined)
//!   ├─ publish job "dedup-shard-k" / subject X, k = 0..N-1     message = application id only
//!   │     dedup-shard-k worker: refresh shard k from dedup_enrolled, load X's templates
//!   │     from the object store, search shard k (unthresholded best candidates)
//!   │     └─ Completion::stay(): dedup_shard_answers (scatter, k, size, candidates)
//!   ├─ wait until N answers (or shard_timeout_ms → retry, then park, naming the shards)
//!   ├─ gallery lock (dedup_gallery_lock, holder = X)           one decision + enrolment at a time
//!   ├─ subjects enrolled after `since`, compared 1:1 (DedupEngine::late_enrolments)
//!   └─ scatter::gather (threshold over the summed sizes) → clear / possible duplicate,
//!      committed with the enrolment row, the lock release and the scatter closed
//! ```
//!
//! * **Why the search runs outside the lock**: the lock serialises decisions across every
//!   dedup worker; held over a scatter it serialised the searches too, so shards and
//!   replicas could not search in parallel. The shards search what was enrolled up to the
//!   scatter (everything up to `since` at least: they refresh after the scatter row is
//!   committed, and enrolments commit one at a time under the lock); under the lock only the
//!   subjects enrolled since are compared, so two applications of the same person in one
//!   batch still catch each other. A candidate both ways is merged by
//!   [`cardpipe_biometrics::matcher::merge_candidates`].
//! * **Why the searching job waits** instead of being woken by the answers: the decision is
//!   committed by the runner when the handler returns. Waiting needs no timer for the
//!   timeout.
//! * **Crash safety and redelivery**: the scatter row, with its snapshot `since`, is
//!   committed before the sub-jobs are published; a crash leaves the dedup job
//!   unacknowledged, and its redelivery (or a second delivery running at the same time)
//!   joins the open scatter and asks again only the shards that have not answered. A shard
//!   answer is idempotent per (scatter, shard) (primary key, and
//!   the shard skips a scatter it already answered or that was closed); a sub-job for an
//!   application that has already been decided is skipped by the runner (the application
//!   left dedup_pending). A lock whose holder crashed and was never redelivered is taken
//!   over after `2 × shard_timeout_ms + 5 s` (service clock).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use cardpipe_common::broker::Job;
use cardpipe_common::clock::to_rfc3339;
use cardpipe_common::domain::{Application, ApplicationId, ApplicationState};
use cardpipe_common::runtime::{Completion, JobContext, Permanent, Services, Stage};
use cardpipe_common::store::{StoreError, StoreTx};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use time::OffsetDateTime;

use crate::scatter::ShardAnswer;
use crate::stage::{self, DedupConfig, DedupEngine};
use cardpipe_biometrics::matcher::{Candidate, FusedScore, Probe};

/// Prefix of the shard stages: `dedup-shard-0`, `dedup-shard-1`, ...
pub const SHARD_STAGE_PREFIX: &str = "dedup-shard-";

/// The stage name of shard `k`.
pub fn shard_stage_name(k: u32) -> String {
    format!("{SHARD_STAGE_PREFIX}{k}")
}

/// The shard of a `dedup-shard-<k>` stage name.
pub fn parse_shard_stage(name: &str) -> Option<u32> {
    let k = name.strip_prefix(SHARD_STAGE_PREFIX)?;
    if k.is_empty() || (k.len() > 1 && k.starts_with('0')) {
        return None;
    }
    k.parse().ok()
}

fn unix_ms(at: OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000_000) as i64
}

fn lease_ms(config: &DedupConfig) -> i64 {
    2 * config.shard_timeout_ms as i64 + 5_000
}

/// The gallery lock held for one application's search + enrolment.
#[derive(Debug)]
pub struct GalleryLock {
    holder: String,
    reentered: bool,
}

impl GalleryLock {
    /// Takes the lock for `holder` (an application id), waiting up to
    /// `[dedup] lock_wait_ms`. Re-entrant: a redelivered job of the same application gets
    /// it back at once ([`GalleryLock::reentered`]).
    pub async fn acquire(
        services: &Services,
        config: &DedupConfig,
        holder: &str,
    ) -> anyhow::Result<Self> {
        let started = Instant::now();
        let deadline = started + Duration::from_millis(config.lock_wait_ms);
        let mut pause = Duration::from_millis(1);
        loop {
            let now = unix_ms(services.clock.now());
            let renewed = sqlx::query(
                "UPDATE dedup_gallery_lock SET since_ms = $1 WHERE id = 1 AND holder = $2",
            )
            .bind(now)
            .bind(holder)
            .execute(services.store.pool())
            .await
            .context("renewing the dedup gallery lock")?;
            if renewed.rows_affected() == 1 {
                return Ok(GalleryLock {
                    holder: holder.to_owned(),
                    reentered: true,
                });
            }
            let taken = sqlx::query(
                "UPDATE dedup_gallery_lock SET holder = $1, since_ms = $2
                 WHERE id = 1 AND (holder IS NULL OR since_ms < $3)",
            )
            .bind(holder)
            .bind(now)
            .bind(now - lease_ms(config))
            .execute(services.store.pool())
            .await
            .context("taking the dedup gallery lock")?;
            if taken.rows_affected() == 1 {
                return Ok(GalleryLock {
                    holder: holder.to_owned(),
                    reentered: false,
                });
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "dedup gallery lock still held by another enrolment after {} ms \
                     ([dedup] lock_wait_ms)",
                    config.lock_wait_ms
                );
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Whether this holder already had the lock (a redelivered or duplicate job).
    pub fn reentered(&self) -> bool {
        self.reentered
    }

    /// The holder (application id).
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Releases the lock now (after a failure: the decision was not committed).
    pub async fn release(&self, services: &Services) -> Result<(), StoreError> {
        sqlx::query("UPDATE dedup_gallery_lock SET holder = NULL WHERE id = 1 AND holder = $1")
            .bind(&self.holder)
            .execute(services.store.pool())
            .await?;
        Ok(())
    }

    /// Releases the lock in the caller's transaction (the one committing the decision).
    pub async fn release_in(tx: &mut StoreTx, holder: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE dedup_gallery_lock SET holder = NULL WHERE id = 1 AND holder = $1")
            .bind(holder)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// The writes that end a decision: lock released, broker scatter (if any) closed.
pub async fn finish_decision(
    tx: &mut StoreTx,
    holder: &str,
    scatter_id: Option<&str>,
    at: OffsetDateTime,
) -> Result<(), StoreError> {
    GalleryLock::release_in(tx, holder).await?;
    if let Some(scatter) = scatter_id {
        sqlx::query(
            "UPDATE dedup_scatters SET finished_at = $1
             WHERE scatter_id = $2 AND finished_at IS NULL",
        )
        .bind(to_rfc3339(at))
        .bind(scatter)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// A candidate as stored in `dedup_shard_answers` (ids and scores only).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct WireCandidate {
    id: String,
    score: f64,
    fmr: f64,
    fingers: [Option<f32>; 10],
    prefilter: i64,
}

impl From<&Candidate> for WireCandidate {
    fn from(c: &Candidate) -> Self {
        WireCandidate {
            id: c.reference_id.clone(),
            score: c.fused.score,
            fmr: c.fused.fmr,
            fingers: c.fused.fingers,
            prefilter: c.prefilter,
        }
    }
}

impl From<WireCandidate> for Candidate {
    fn from(w: WireCandidate) -> Self {
        Candidate {
            reference_id: w.id,
            fused: FusedScore {
                score: w.score,
                fmr: w.fmr,
                fingers: w.fingers,
            },
            prefilter: w.prefilter,
        }
    }
}

/// The open scatter of an application, if any.
pub async fn open_scatter(services: &Services, id: &str) -> Result<Option<String>, StoreError> {
    let row = sqlx::query(
        "SELECT scatter_id FROM dedup_scatters WHERE application_id = $1 AND finished_at IS NULL",
    )
    .bind(id)
    .fetch_optional(services.store.pool())
    .await?;
    Ok(match row {
        Some(r) => Some(r.try_get("scatter_id")?),
        None => None,
    })
}

/// Opens a scatter for `id` with enrolment snapshot `since` unless one is open; returns the
/// open one and its snapshot (a second delivery of the same job joins the first's scatter).
/// A closed scatter is replaced only while the application is still in `state`: a late
/// delivery must not overwrite the scatter that decided it (`None`: decided meanwhile).
async fn start_scatter(
    services: &Services,
    id: &ApplicationId,
    state: ApplicationState,
    shards: u32,
    since: i64,
) -> anyhow::Result<Option<(String, i64)>> {
    let now = to_rfc3339(services.clock.now());
    for _ in 0..2 {
        sqlx::query(
            "INSERT INTO dedup_scatters (application_id, scatter_id, shards, created_at, since_seq)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (application_id) DO UPDATE
             SET scatter_id = excluded.scatter_id, shards = excluded.shards,
                 created_at = excluded.created_at, since_seq = excluded.since_seq,
                 finished_at = NULL
             WHERE dedup_scatters.finished_at IS NOT NULL
               AND EXISTS (SELECT 1 FROM applications WHERE id = $1 AND state = $6)",
        )
        .bind(id.as_str())
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(shards as i64)
        .bind(&now)
        .bind(since)
        .bind(state.as_str())
        .execute(services.store.pool())
        .await
        .context("opening the dedup scatter")?;
        let row = sqlx::query(
            "SELECT scatter_id, since_seq FROM dedup_scatters
             WHERE application_id = $1 AND finished_at IS NULL",
        )
        .bind(id.as_str())
        .fetch_optional(services.store.pool())
        .await?;
        let Some(row) = row else {
            if !still_in(services, id, state).await? {
                return Ok(None);
            }
            // Closed (timed out) between the two statements: open another.
            continue;
        };
        let scatter_id: String = row.try_get("scatter_id")?;
        match row.try_get::<Option<i64>, _>("since_seq")? {
            Some(open_since) => return Ok(Some((scatter_id, open_since))),
            // Opened before the snapshot was recorded: its answers cannot be joined safely.
            None => close_scatter(services, &scatter_id).await?,
        }
    }
    anyhow::bail!("dedup scatter of {id} closed while opening it; retrying")
}

async fn close_scatter(services: &Services, scatter_id: &str) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE dedup_scatters SET finished_at = $1 WHERE scatter_id = $2 AND finished_at IS NULL",
    )
    .bind(to_rfc3339(services.clock.now()))
    .bind(scatter_id)
    .execute(services.store.pool())
    .await?;
    Ok(())
}

/// The answers stored for a scatter.
pub async fn answers(services: &Services, scatter_id: &str) -> anyhow::Result<Vec<ShardAnswer>> {
    let rows = sqlx::query(
        "SELECT shard, size, candidates FROM dedup_shard_answers WHERE scatter_id = $1 ORDER BY shard",
    )
    .bind(scatter_id)
    .fetch_all(services.store.pool())
    .await
    .context("reading dedup shard answers")?;
    rows.iter()
        .map(|r| {
            let shard: i64 = r.try_get::<i64, _>("shard")?;
            let size: i64 = r.try_get("size")?;
            let text: String = r.try_get("candidates")?;
            let wire: Vec<WireCandidate> = serde_json::from_str(&text)
                .with_context(|| format!("dedup_shard_answers.candidates of shard {shard}"))?;
            Ok(ShardAnswer {
                shard: shard as u32,
                size: size as usize,
                candidates: wire.into_iter().map(Candidate::from).collect(),
            })
        })
        .collect()
}

/// What a broker scatter brought back: every shard's answer, not yet thresholded (the
/// subjects enrolled meanwhile join them under the lock).
#[derive(Debug)]
pub struct Scattered {
    /// One answer per shard.
    pub answers: Vec<ShardAnswer>,
    /// The scatter (closed when the decision commits).
    pub scatter_id: String,
    /// Every subject enrolled up to this `dedup_enrolled.seq` was searched by the shards.
    pub since: i64,
}

/// The last enrolment committed: a broker scatter opened after this read is answered by
/// shards that have seen at least every subject up to it.
pub async fn enrolled_up_to(services: &Services) -> Result<i64, StoreError> {
    let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS seq FROM dedup_enrolled")
        .fetch_one(services.store.pool())
        .await?;
    Ok(row.try_get::<i64, _>("seq")?)
}

/// Whether application `id` is still in `state` (another delivery of its job may have
/// decided it while this one searched).
async fn still_in(
    services: &Services,
    id: &ApplicationId,
    state: ApplicationState,
) -> anyhow::Result<bool> {
    Ok(services
        .store
        .application(id)
        .await?
        .is_some_and(|a| a.state == state))
}

/// Scatters the search of application `id` (delivered in `state`) to every shard stage and
/// waits for every answer. No gallery lock is held: a scatter of `id` left open by another
/// delivery of its job (running, or crashed) is joined with its snapshot, and only the shards
/// that have not answered it are asked. `None` when the application left `state` meanwhile
/// (decided by another delivery of its job): nothing to search for.
pub async fn scatter_gather(
    services: &Services,
    engine: &DedupEngine,
    id: &ApplicationId,
    state: ApplicationState,
) -> anyhow::Result<Option<Scattered>> {
    let config = engine.config();
    let started = Instant::now();
    if !still_in(services, id, state).await? {
        return Ok(None);
    }
    let since = enrolled_up_to(services).await?;
    let Some((scatter_id, since)) =
        start_scatter(services, id, state, config.shards, since).await?
    else {
        return Ok(None);
    };
    let answered: Vec<u32> = answers(services, &scatter_id)
        .await?
        .iter()
        .map(|a| a.shard)
        .collect();
    for k in (0..config.shards).filter(|k| !answered.contains(k)) {
        let name = shard_stage_name(k);
        services
            .broker
            .publish(&Job::new(name.as_str(), id.as_str()))
            .await
            .with_context(|| format!("publishing the dedup sub-job to stage {name}"))?;
    }
    let deadline = started + Duration::from_millis(config.shard_timeout_ms);
    let mut pause = Duration::from_millis(1);
    let mut last_check = Instant::now();
    loop {
        let got: Vec<ShardAnswer> = answers(services, &scatter_id)
            .await?
            .into_iter()
            .filter(|a| a.shard < config.shards)
            .collect();
        if got.len() == config.shards as usize {
            engine
                .metrics
                .search
                .observe(started.elapsed().as_secs_f64());
            return Ok(Some(Scattered {
                answers: got,
                scatter_id,
                since,
            }));
        }
        // Shards skip a decided application's sub-jobs: stop waiting for them.
        if last_check.elapsed() >= Duration::from_millis(250) {
            last_check = Instant::now();
            if !still_in(services, id, state).await? {
                close_scatter(services, &scatter_id).await?;
                return Ok(None);
            }
        }
        if Instant::now() >= deadline {
            let missing: Vec<u32> = (0..config.shards)
                .filter(|k| !got.iter().any(|a| a.shard == *k))
                .collect();
            // A retry starts a fresh scatter.
            close_scatter(services, &scatter_id).await?;
            anyhow::bail!(
                "dedup scatter: shard(s) {missing:?} of {} did not answer within {} ms \
                 ([dedup] shard_timeout_ms); is a dedup-shard-<k> worker running for each?",
                config.shards,
                config.shard_timeout_ms
            );
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// One shard's side of the broker scatter: stage `dedup-shard-<k>`.
#[derive(Debug, Clone)]
pub struct ShardStage {
    engine: Arc<DedupEngine>,
    shard: u32,
    name: &'static str,
}

impl ShardStage {
    /// The stage answering for shard `shard` from `engine` (which must hold that shard).
    pub fn new(engine: Arc<DedupEngine>, shard: u32) -> anyhow::Result<Self> {
        anyhow::ensure!(
            engine.shards().owned().contains(&shard),
            "stage {}: this process does not hold dedup shard {shard} (holds {:?})",
            shard_stage_name(shard),
            engine.shards().owned()
        );
        Ok(ShardStage {
            engine,
            shard,
            // Stage names are `&'static str`; a process builds one stage per shard it
            // holds, once, at start.
            name: Box::leak(shard_stage_name(shard).into_boxed_str()),
        })
    }

    /// Answers the open scatter of `app` for this shard; `None` when there is nothing to
    /// answer (no open scatter, or already answered).
    pub async fn answer(
        &self,
        services: &Services,
        app: &ApplicationId,
    ) -> anyhow::Result<Option<(String, ShardAnswer)>> {
        let engine = &self.engine;
        engine.ready(services).await?;
        let Some(scatter_id) = open_scatter(services, app.as_str()).await? else {
            return Ok(None);
        };
        let exists =
            sqlx::query("SELECT 1 FROM dedup_shard_answers WHERE scatter_id = $1 AND shard = $2")
                .bind(&scatter_id)
                .bind(self.shard as i64)
                .fetch_optional(services.store.pool())
                .await?;
        if exists.is_some() {
            return Ok(None);
        }
        // Enrolments committed before the scatter was opened are in dedup_enrolled now.
        engine.refresh(services).await?;
        let tenprint = stage::probe_of(services, app).await?.tenprint;
        let shards = engine.shard_set();
        let (k, max, own) = (self.shard, engine.config().max_candidates, app.0.clone());
        let answer = tokio::task::spawn_blocking(move || {
            shards.answer(k, &Probe::new(&tenprint), max, Some(&own))
        })
        .await?
        .ok_or_else(|| Permanent(format!("this process does not hold dedup shard {k}")))?;
        Ok(Some((scatter_id, answer)))
    }
}

#[async_trait]
impl Stage for ShardStage {
    fn name(&self) -> &'static str {
        self.name
    }

    fn accepts(&self) -> &'static [ApplicationState] {
        stage::ACCEPTS
    }

    async fn handle(&self, ctx: &JobContext, app: &Application) -> anyhow::Result<Completion> {
        let services = &ctx.services;
        let Some((scatter_id, answer)) = self.answer(services, &app.id).await? else {
            // Late (scatter closed) or repeated (already answered): nothing to add.
            return Ok(Completion::stay());
        };
        self.engine.metrics.shard_answers.inc();
        let wire: Vec<WireCandidate> = answer.candidates.iter().map(WireCandidate::from).collect();
        let candidates = serde_json::to_string(&wire)?;
        let (shard, size) = (answer.shard as i64, answer.size as i64);
        let at = to_rfc3339(services.clock.now());
        Ok(Completion::stay()
            .because(format!("shard {shard} answered ({size} subjects)"))
            .with_writes(Box::new(move |tx| {
                Box::pin(async move {
                    sqlx::query(
                        "INSERT INTO dedup_shard_answers
                         (scatter_id, shard, size, candidates, answered_at)
                         VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (scatter_id, shard) DO NOTHING",
                    )
                    .bind(scatter_id)
                    .bind(shard)
                    .bind(size)
                    .bind(candidates)
                    .bind(at)
                    .execute(&mut **tx)
                    .await?;
                    Ok(())
                })
            })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_stage_names_round_trip() {
        assert_eq!(shard_stage_name(3), "dedup-shard-3");
        assert_eq!(parse_shard_stage("dedup-shard-12"), Some(12));
        assert_eq!(parse_shard_stage("dedup-shard-"), None);
        assert_eq!(parse_shard_stage("dedup-shard-01"), None);
        assert_eq!(parse_shard_stage("dedup"), None);
    }

    #[test]
    fn one_shard_per_worker_needs_the_broker_scatter() {
        let local = DedupConfig {
            shards: 3,
            shard: Some(1),
            ..DedupConfig::default()
        };
        let err = local.validate().unwrap_err().to_string();
        assert!(err.contains("scatter = \"broker\""), "{err}");
        assert!(local.shard_stage_names().is_empty());
        let broker = DedupConfig {
            scatter: crate::stage::ScatterMode::Broker,
            ..local
        };
        broker.validate().expect("valid");
        assert_eq!(
            broker.shard_stage_names(),
            vec!["dedup-shard-0", "dedup-shard-1", "dedup-shard-2"]
        );
        let err = DedupEngine::with_shards(broker.clone(), &[3]).unwrap_err();
        assert!(err.to_string().contains("shard 3 does not exist"), "{err}");
        let timeout = DedupConfig {
            shard_timeout_ms: 0,
            ..broker
        };
        assert!(
            timeout
                .validate()
                .unwrap_err()
                .to_string()
                .contains("shard_timeout_ms")
        );
    }

    /// The shortlist floor must lie between 1 and the configured shortlist; the error names
    /// the key.
    #[test]
    fn min_shortlist_is_checked_against_the_shortlist() {
        DedupConfig::default()
            .validate()
            .expect("defaults are valid");
        for bad in [0, 2001] {
            let config = DedupConfig {
                min_shortlist: bad,
                ..DedupConfig::default()
            };
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains("[dedup] min_shortlist"), "{err}");
        }
    }
}
