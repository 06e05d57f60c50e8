//! Runs one stage: consumes its queue and applies its decisions.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::failpoints::{Crashed, FailPoint, FailPoints};
use super::{Completion, JobContext, Permanent, Services, Stage};
use crate::broker::{Delivery, Job, RetryPolicy};
use crate::domain::{Application, ApplicationId};
use crate::store::{Store, StoreError, Transition};
use crate::telemetry::metrics::JobOutcome;

/// Per-stage knobs from `pipeline.toml` (`[stages.<name>]`).
#[derive(Debug, Clone)]
pub struct StageSettings {
    /// Jobs handled at once by this runner.
    pub concurrency: usize,
    /// Unacknowledged deliveries the broker may hand this runner.
    pub prefetch: u16,
    /// Retry delays and the attempt after which a job is parked.
    pub retry: RetryPolicy,
}

impl Default for StageSettings {
    fn default() -> Self {
        Self {
            concurrency: 4,
            prefetch: 8,
            retry: RetryPolicy::default(),
        }
    }
}

/// Consumes one stage's queue until shutdown.
pub struct StageRunner {
    services: Services,
    stage: Arc<dyn Stage>,
    settings: StageSettings,
    failpoints: FailPoints,
    relay_wakeup: Option<Arc<Notify>>,
}

impl StageRunner {
    /// A runner for `stage`.
    pub fn new(services: Services, stage: Arc<dyn Stage>, settings: StageSettings) -> Self {
        Self {
            services,
            stage,
            settings,
            failpoints: FailPoints::none(),
            relay_wakeup: None,
        }
    }

    /// Arms fail points (tests).
    pub fn with_failpoints(mut self, failpoints: FailPoints) -> Self {
        self.failpoints = failpoints;
        self
    }

    /// Wakes the relay after each commit, so hand-over does not wait for its poll.
    pub fn with_relay_wakeup(mut self, notify: Arc<Notify>) -> Self {
        self.relay_wakeup = Some(notify);
        self
    }

    /// Consumes until `shutdown` is cancelled, then stops taking work, lets
    /// in-flight jobs finish and returns. Returns `Err` when a fail point
    /// simulated a crash (in-flight work is abandoned unacknowledged).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let name = self.stage.name();
        self.services
            .broker
            .declare_stage(name, &self.settings.retry)
            .await?;
        let mut stream = self
            .services
            .broker
            .consume(name, self.settings.prefetch)
            .await?;
        let slots = Arc::new(Semaphore::new(self.settings.concurrency.max(1)));
        let crash = CancellationToken::new();
        let shared = Arc::new(JobProcessor {
            services: self.services.clone(),
            stage: self.stage.clone(),
            retry: self.settings.retry.clone(),
            failpoints: self.failpoints.clone(),
            relay_wakeup: self.relay_wakeup.clone(),
            crash: crash.clone(),
        });
        let mut tasks = JoinSet::new();
        tracing::info!(stage = name, "stage runner started");
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = crash.cancelled() => break,
                permit = slots.clone().acquire_owned() => permit?,
            };
            // Reap finished tasks so the set does not grow without bound.
            while tasks.try_join_next().is_some() {}
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = crash.cancelled() => break,
                next = stream.next() => next,
            };
            match next {
                None => break,
                Some(Err(err)) => {
                    tracing::warn!(stage = name, error = %err, "consumer error; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Some(Ok(delivery)) => {
                    let shared = shared.clone();
                    tasks.spawn(async move {
                        shared.process(delivery).await;
                        drop(permit);
                    });
                }
            }
        }
        if crash.is_cancelled() {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            drop(stream);
            return Err(Crashed(FailPoint::Received).into());
        }
        tracing::info!(
            stage = name,
            in_flight = tasks.len(),
            "stage runner draining"
        );
        while tasks.join_next().await.is_some() {}
        drop(stream);
        if crash.is_cancelled() {
            return Err(anyhow::anyhow!("simulated crash while draining"));
        }
        tracing::info!(stage = name, "stage runner stopped");
        Ok(())
    }
}

struct JobProcessor {
    services: Services,
    stage: Arc<dyn Stage>,
    retry: RetryPolicy,
    failpoints: FailPoints,
    relay_wakeup: Option<Arc<Notify>>,
    crash: CancellationToken,
}

enum Failure {
    Retryable(String),
    Permanent(String),
}

impl JobProcessor {
    fn crashed(&self, point: FailPoint) -> bool {
        if self.failpoints.fires(point) {
            tracing::warn!(?point, "fail point fired: simulating a crash");
            self.crash.cancel();
            true
        } else {
            false
        }
    }

    async fn process(&self, delivery: Delivery) {
        let job = delivery.job.clone();
        let name = self.stage.name();
        let span = tracing::info_span!(
            "job",
            stage = name,
            application_id = %job.subject,
            attempt = job.attempt,
            job_id = %job.id,
        );
        async {
            let metrics = &self.services.metrics;
            let _in_flight = metrics.job_started(name);
            let started = Instant::now();
            let outcome = self.process_inner(delivery).await;
            if let Some(outcome) = outcome {
                metrics.job_finished(name, outcome, started.elapsed());
                tracing::debug!(outcome = outcome.as_str(), "job finished");
            }
        }
        .instrument(span)
        .await
    }

    /// Returns `None` when a simulated crash abandoned the job.
    async fn process_inner(&self, delivery: Delivery) -> Option<JobOutcome> {
        if self.crashed(FailPoint::Received) {
            return None;
        }
        let id = ApplicationId(delivery.job.subject.clone());
        let app = match self.services.store.application(&id).await {
            Ok(Some(app)) => app,
            Ok(None) => {
                let failure = Failure::Permanent("application not found".into());
                return Some(self.settle_failure(delivery, failure).await);
            }
            Err(err) => {
                let failure = Failure::Retryable(format!("loading application: {err}"));
                return Some(self.settle_failure(delivery, failure).await);
            }
        };
        if !self.stage.accepts().contains(&app.state) {
            tracing::debug!(state = %app.state, "application not in an input state: duplicate delivery");
            self.ack(delivery).await;
            return Some(JobOutcome::Skipped);
        }
        if self.crashed(FailPoint::Loaded) {
            return None;
        }
        let ctx = JobContext {
            job: delivery.job.clone(),
            services: self.services.clone(),
        };
        let handled = AssertUnwindSafe(self.stage.handle(&ctx, &app))
            .catch_unwind()
            .await;
        let completion = match handled {
            Ok(Ok(completion)) => completion,
            Ok(Err(err)) => {
                let failure = if let Some(p) = err.downcast_ref::<Permanent>() {
                    Failure::Permanent(p.0.clone())
                } else {
                    Failure::Retryable(format!("{err:#}"))
                };
                return Some(self.settle_failure(delivery, failure).await);
            }
            Err(_panic) => {
                let failure = Failure::Retryable("stage handler panicked".into());
                return Some(self.settle_failure(delivery, failure).await);
            }
        };
        if self.crashed(FailPoint::Handled) {
            return None;
        }
        let committed = self.commit(&app, delivery.job.attempt, completion).await;
        match committed {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!("application moved meanwhile: another delivery won");
                self.ack(delivery).await;
                return Some(JobOutcome::Skipped);
            }
            Err(err) => {
                let failure = match err {
                    StoreError::IllegalTransition(e) => Failure::Permanent(e.to_string()),
                    other => Failure::Retryable(format!("committing: {other}")),
                };
                return Some(self.settle_failure(delivery, failure).await);
            }
        }
        if self.crashed(FailPoint::Committed) {
            return None;
        }
        if let Some(wakeup) = &self.relay_wakeup {
            wakeup.notify_one();
        }
        self.ack(delivery).await;
        Some(JobOutcome::Done)
    }

    /// Applies a completion in one transaction. `Ok(false)`: the application
    /// had already left the state the handler saw.
    async fn commit(
        &self,
        app: &Application,
        attempt: u32,
        c: Completion,
    ) -> Result<bool, StoreError> {
        let name = self.stage.name();
        let now = self.services.clock.now();
        let actor = format!("stage:{name}");
        let mut tx = self.services.store.begin().await?;
        let transition = Transition {
            id: &app.id,
            from: app.state,
            to: c.to,
            stage: name,
            attempt,
            actor: &actor,
            reason: c.reason.as_deref(),
            at: now,
        };
        let applied = if c.stays {
            // Compare-and-set without a change: locks the row and checks the state.
            sqlx::query("UPDATE applications SET version = version WHERE id = $1 AND state = $2")
                .bind(app.id.as_str())
                .bind(app.state.as_str())
                .execute(&mut *tx)
                .await?
                .rows_affected()
                == 1
        } else {
            Store::transition(&mut tx, &transition).await?
        };
        if !applied {
            tx.rollback().await?;
            return Ok(false);
        }
        for (kind, key) in &c.artifacts {
            Store::put_artifact(&mut tx, &app.id, kind, key, now).await?;
        }
        if let Some(next) = &c.next_stage {
            let job = Job::new(next.clone(), app.id.as_str())
                .with_priority(app.priority == crate::domain::Priority::Urgent);
            Store::enqueue_job(&mut tx, &job, now).await?;
        }
        for (topic, payload) in &c.outbox {
            let id = uuid::Uuid::now_v7().to_string();
            Store::enqueue_outbox(&mut tx, &id, topic, app.id.as_str(), payload, now).await?;
        }
        if let Some(extra) = c.extra {
            extra(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn ack(&self, delivery: Delivery) {
        match delivery.ack().await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!("ack not delivered (channel lost); the broker will redeliver")
            }
            Err(err) => tracing::warn!(error = %err, "ack failed; the broker will redeliver"),
        }
    }

    /// Retries with growing delay, or parks after the last attempt (or at
    /// once for a permanent failure).
    async fn settle_failure(&self, delivery: Delivery, failure: Failure) -> JobOutcome {
        let (text, permanent) = match failure {
            Failure::Retryable(text) => (text, false),
            Failure::Permanent(text) => (text, true),
        };
        let text: String = text.chars().take(500).collect();
        let mut job = delivery.job.clone();
        job.last_error = Some(text.clone());
        let broker = &self.services.broker;
        let (outcome, published) = if permanent || job.attempt >= self.retry.max_attempts {
            tracing::error!(error = %text, "job parked for an operator");
            let parked =
                super::parked::record(&self.services, &job, self.services.clock.now()).await;
            let published = match parked {
                Ok(()) => broker.publish_parked(&job).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            (JobOutcome::Parked, published)
        } else {
            tracing::warn!(error = %text, "job failed; will retry");
            let step = self.retry.step_for(job.attempt);
            job.attempt += 1;
            (
                JobOutcome::Retried,
                broker
                    .publish_retry(&job, step)
                    .await
                    .map_err(|e| e.to_string()),
            )
        };
        match published {
            Ok(()) => self.ack(delivery).await,
            Err(err) => {
                // Could not hand it on: give it back for redelivery instead.
                tracing::warn!(error = %err, "could not retry or park; requeueing");
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = delivery.requeue().await;
            }
        }
        outcome
    }
}
