//! The outbox relay: delivers committed outbox rows.
//!
//! It claims due rows (a lease, so several relays can share the table),
//! hands each to the sink for its topic — the broker for `job` rows, with
//! publisher confirms — and marks it published. A failed delivery is retried
//! with growing delay. A crash after delivering but before marking repeats
//! the delivery; consumers absorb duplicates.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use async_trait::async_trait;
use time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Services;
use super::failpoints::{Crashed, FailPoint, FailPoints};
use crate::broker::{Broker, Job};
use crate::store::{JOB_TOPIC, OutboxRow};

/// Delivers outbox rows of one topic.
#[async_trait]
pub trait OutboxSink: Send + Sync + 'static {
    /// Delivers one row; an error makes the relay retry it later.
    async fn deliver(&self, row: &OutboxRow) -> anyhow::Result<()>;
}

/// Publishes `job` rows to the broker.
pub struct JobSink {
    broker: Arc<dyn Broker>,
}

impl JobSink {
    /// A sink publishing to `broker`.
    pub fn new(broker: Arc<dyn Broker>) -> Self {
        Self { broker }
    }
}

#[async_trait]
impl OutboxSink for JobSink {
    async fn deliver(&self, row: &OutboxRow) -> anyhow::Result<()> {
        let job: Job = serde_json::from_str(&row.payload)?;
        self.broker.publish(&job).await?;
        Ok(())
    }
}

/// How long a claim lasts before another relay may take the row over (after
/// a crash, rows the dead relay had claimed wait this long).
const DEFAULT_CLAIM: Duration = Duration::seconds(30);
/// Rows claimed per round.
const BATCH: i64 = 256;

/// The relay loop.
pub struct Relay {
    services: Services,
    holder: String,
    sinks: HashMap<String, Arc<dyn OutboxSink>>,
    wakeup: Arc<Notify>,
    failpoints: FailPoints,
    poll: StdDuration,
    claim: Duration,
}

impl Relay {
    /// A relay delivering `job` rows to the services' broker.
    pub fn new(services: Services) -> Self {
        let mut sinks: HashMap<String, Arc<dyn OutboxSink>> = HashMap::new();
        sinks.insert(
            JOB_TOPIC.to_owned(),
            Arc::new(JobSink::new(services.broker.clone())),
        );
        Self {
            services,
            holder: format!("relay-{}", uuid::Uuid::new_v4()),
            sinks,
            wakeup: Arc::new(Notify::new()),
            failpoints: FailPoints::none(),
            poll: StdDuration::from_millis(500),
            claim: DEFAULT_CLAIM,
        }
    }

    /// How long this relay's claims last.
    pub fn with_claim(mut self, claim: StdDuration) -> Self {
        self.claim = Duration::try_from(claim).unwrap_or(DEFAULT_CLAIM);
        self
    }

    /// Adds sinks for other topics, as (topic, sink) pairs (e.g. a stage's sinks).
    pub fn with_sinks(
        mut self,
        sinks: impl IntoIterator<Item = (&'static str, Arc<dyn OutboxSink>)>,
    ) -> Self {
        for (topic, sink) in sinks {
            self.sinks.insert(topic.to_owned(), sink);
        }
        self
    }

    /// Adds a sink for another topic (e.g. registry callbacks).
    pub fn with_sink(mut self, topic: &str, sink: Arc<dyn OutboxSink>) -> Self {
        self.sinks.insert(topic.to_owned(), sink);
        self
    }

    /// Arms fail points (tests).
    pub fn with_failpoints(mut self, failpoints: FailPoints) -> Self {
        self.failpoints = failpoints;
        self
    }

    /// Polls at least this often when nobody wakes it.
    pub fn with_poll_interval(mut self, poll: StdDuration) -> Self {
        self.poll = poll;
        self
    }

    /// Notify this to make the relay look at once.
    pub fn wakeup(&self) -> Arc<Notify> {
        self.wakeup.clone()
    }

    /// Claims and delivers one round of due rows; returns how many were
    /// delivered.
    pub async fn drain_once(&self) -> anyhow::Result<usize> {
        let now = self.services.clock.now();
        let topics: Vec<&str> = self.sinks.keys().map(String::as_str).collect();
        let rows = self
            .services
            .store
            .claim_outbox(&topics, &self.holder, now, self.claim, BATCH)
            .await?;
        let mut delivered = 0;
        for row in &rows {
            let sink = &self.sinks[&row.topic];
            match sink.deliver(row).await {
                Ok(()) => {
                    if self.failpoints.fires(FailPoint::RelayPublished) {
                        return Err(Crashed(FailPoint::RelayPublished).into());
                    }
                    let at = self.services.clock.now();
                    self.services
                        .store
                        .mark_outbox_published(row.seq, at)
                        .await?;
                    self.services.metrics.outbox_published(&row.topic);
                    delivered += 1;
                }
                Err(err) => {
                    let backoff = Duration::seconds(1i64 << row.attempts.clamp(0, 9));
                    let retry_at = self.services.clock.now() + backoff;
                    tracing::warn!(topic = %row.topic, subject = %row.subject, error = %err, "outbox delivery failed; will retry");
                    self.services.metrics.outbox_failed(&row.topic);
                    self.services
                        .store
                        .mark_outbox_failed(row.seq, &format!("{err:#}"), retry_at)
                        .await?;
                }
            }
        }
        Ok(delivered)
    }

    /// Delivers until `shutdown`, then flushes what is due (for at most
    /// `flush_for`) and returns.
    pub async fn run(
        self,
        shutdown: CancellationToken,
        flush_for: StdDuration,
    ) -> anyhow::Result<()> {
        let mut last_purge = tokio::time::Instant::now();
        loop {
            let delivered = match self.drain_once().await {
                Ok(n) => n,
                Err(err) if err.is::<Crashed>() => return Err(err),
                Err(err) => {
                    tracing::warn!(error = %err, "outbox relay round failed");
                    0
                }
            };
            if last_purge.elapsed() > StdDuration::from_secs(600) {
                let before = self.services.clock.now() - Duration::days(1);
                if let Err(err) = self.services.store.purge_published_outbox(before).await {
                    tracing::warn!(error = %err, "outbox purge failed");
                }
                last_purge = tokio::time::Instant::now();
            }
            if delivered as i64 >= BATCH {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wakeup.notified() => {}
                _ = tokio::time::sleep(self.poll) => {}
            }
        }
        let deadline = tokio::time::Instant::now() + flush_for;
        while tokio::time::Instant::now() < deadline {
            match self.drain_once().await {
                Ok(0) => break,
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "outbox flush failed");
                    tokio::time::sleep(StdDuration::from_millis(200)).await;
                }
            }
        }
        Ok(())
    }
}
