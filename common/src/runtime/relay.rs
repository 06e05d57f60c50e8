//! The outbox relay: delivers committed outbox rows.
//!
//! It claims due rows (a lease, so several relays can share the table),
//! hands each to the sink for its topic — the broker for `job` rows, with
//! publisher confirms — and marks it published. A failed delivery is retried
//! with growing delay. A crash after delivering but before marking repeats the
//! delivery; consumers absorb duplicates.
//!
//! Sinks run in two [`Lane`]s, each its own loop with its own claim, batch and
//! delivery timeout: `internal` (job hand-off to the broker and this system's
//! own requests — fast, inside the centre) and `external` (registry webhooks,
//! SMS gateways — another party's latency). A hung webhook therefore delays
//! only other callbacks, never the hand-off between stages.
//!
//! Every delivery runs under the lane's timeout and only while the claim has
//! time left for it (rows it cannot finish in time are given back), and every
//! update after it is fenced by the claim ([`Store::mark_outbox_published`] and
//! friends change nothing once another relay took the row over). A row whose
//! sink says it can never be delivered ([`PermanentFailure`]) or that failed
//! `max_attempts` times goes to the dead letters, where an operator re-queues
//! or discards it (`cardpipe ops dead-letters`, the console).
//!
//! [`Store::mark_outbox_published`]: crate::store::Store::mark_outbox_published

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

/// Which relay loop delivers a sink's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// The broker and this system's own requests (CRL, revocation, reprints...).
    Internal,
    /// Other parties: registry webhooks, SMS gateways.
    External,
}

impl Lane {
    /// `internal` or `external` (logs, holder names).
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Internal => "internal",
            Lane::External => "external",
        }
    }
}

/// Delivers outbox rows of one topic.
#[async_trait]
pub trait OutboxSink: Send + Sync + 'static {
    /// Delivers one row; an error makes the relay retry it later, unless it is
    /// (or wraps) a [`PermanentFailure`].
    async fn deliver(&self, row: &OutboxRow) -> anyhow::Result<()>;

    /// The lane that delivers this sink's rows ([`Lane::Internal`] unless the
    /// sink talks to another party).
    fn lane(&self) -> Lane {
        Lane::Internal
    }
}

/// A delivery that can never succeed however often it is tried (a payload that
/// does not parse, a request the receiver refuses as malformed): the row goes to
/// the dead letters at once instead of being retried.
#[derive(Debug, thiserror::Error)]
#[error("permanent delivery failure: {0}")]
pub struct PermanentFailure(pub String);

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
        let job: Job = serde_json::from_str(&row.payload)
            .map_err(|e| PermanentFailure(format!("the job row does not parse: {e}")))?;
        self.broker.publish(&job).await?;
        Ok(())
    }
}

/// The claim, batch and delivery timeout of one lane.
#[derive(Debug, Clone, Copy)]
pub struct LaneSettings {
    /// How long a claim lasts before another relay may take the row over (after a
    /// crash, rows the dead relay had claimed wait this long).
    pub claim: StdDuration,
    /// Rows claimed per round.
    pub batch: i64,
    /// Longest a single delivery may take; then it counts as failed.
    pub timeout: StdDuration,
}

impl LaneSettings {
    /// Defaults of the internal lane: 30 s claims of 256 rows, 10 s per delivery.
    pub const INTERNAL: LaneSettings = LaneSettings {
        claim: StdDuration::from_secs(30),
        batch: 256,
        timeout: StdDuration::from_secs(10),
    };
    /// Defaults of the external lane: 60 s claims of 32 rows, 10 s per delivery.
    pub const EXTERNAL: LaneSettings = LaneSettings {
        claim: StdDuration::from_secs(60),
        batch: 32,
        timeout: StdDuration::from_secs(10),
    };

    /// These settings with another delivery timeout; the claim grows to hold at
    /// least three deliveries, so a long timeout does not end every claim early.
    pub fn with_timeout(self, timeout: StdDuration) -> Self {
        LaneSettings {
            timeout,
            claim: self.claim.max(timeout * 3 + CLAIM_MARGIN),
            ..self
        }
    }
}

/// Failed deliveries after which a row is given up (dead-lettered) by default: with
/// the backoff doubling from 2 s to 512 s, about 4 hours of trying.
pub const DEFAULT_MAX_ATTEMPTS: i64 = 36;

/// Time kept in hand at the end of a claim to record the outcome of a delivery
/// (at most a quarter of the claim).
const CLAIM_MARGIN: StdDuration = StdDuration::from_secs(2);
/// A delivery is started only with at least this much (or the lane's timeout, if
/// shorter) of its claim left; the rest of the round is given back.
const MIN_DELIVERY_TIME: StdDuration = StdDuration::from_secs(1);

/// The relay loops.
pub struct Relay {
    services: Services,
    holder: String,
    sinks: HashMap<String, Arc<dyn OutboxSink>>,
    wakeup: Arc<Notify>,
    external_wakeup: Arc<Notify>,
    failpoints: FailPoints,
    poll: StdDuration,
    lanes: HashMap<Lane, LaneSettings>,
    max_attempts: i64,
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
            external_wakeup: Arc::new(Notify::new()),
            failpoints: FailPoints::none(),
            poll: StdDuration::from_millis(500),
            lanes: HashMap::from([
                (Lane::Internal, LaneSettings::INTERNAL),
                (Lane::External, LaneSettings::EXTERNAL),
            ]),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
        }
    }

    /// How long the claims of every lane last (tests shorten it to see take-overs).
    pub fn with_claim(mut self, claim: StdDuration) -> Self {
        for settings in self.lanes.values_mut() {
            settings.claim = claim;
        }
        self
    }

    /// Claim, batch and delivery timeout of one lane.
    pub fn with_lane(mut self, lane: Lane, settings: LaneSettings) -> Self {
        self.lanes.insert(lane, settings);
        self
    }

    /// Failed deliveries after which a row goes to the dead letters (at least 1).
    pub fn with_max_attempts(mut self, max_attempts: i64) -> Self {
        self.max_attempts = max_attempts.max(1);
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

    /// The topics a lane delivers.
    fn topics(&self, lane: Lane) -> Vec<&str> {
        let mut topics: Vec<&str> = self
            .sinks
            .iter()
            .filter(|(_, sink)| sink.lane() == lane)
            .map(|(topic, _)| topic.as_str())
            .collect();
        topics.sort_unstable();
        topics
    }

    /// Claims and delivers one round of due rows of every lane, one lane after the
    /// other; returns how many were delivered.
    pub async fn drain_once(&self) -> anyhow::Result<usize> {
        let internal = self.drain_lane(Lane::Internal).await?;
        let external = self.drain_lane(Lane::External).await?;
        Ok(internal + external)
    }

    /// Claims and delivers one round of due rows of `lane`; returns how many were
    /// delivered.
    pub async fn drain_lane(&self, lane: Lane) -> anyhow::Result<usize> {
        let topics = self.topics(lane);
        if topics.is_empty() {
            return Ok(0);
        }
        let settings = self.lanes[&lane];
        let holder = format!("{}/{}", self.holder, lane.as_str());
        let started = tokio::time::Instant::now();
        let now = self.services.clock.now();
        let claim = Duration::try_from(settings.claim).unwrap_or(Duration::seconds(30));
        let rows = self
            .services
            .store
            .claim_outbox(&topics, &holder, now, claim, settings.batch)
            .await?;
        // Deliveries must be recorded before the claim ends, or another relay
        // delivers the same row again: each one gets at most the claim's time left.
        let margin = CLAIM_MARGIN.min(settings.claim / 4);
        let claim_end = started + settings.claim.saturating_sub(margin);
        let mut delivered = 0;
        for (i, row) in rows.iter().enumerate() {
            let left = claim_end.saturating_duration_since(tokio::time::Instant::now());
            // Short claims (tests, a fast internal lane) scale the floor down with them.
            let floor = settings
                .timeout
                .min(MIN_DELIVERY_TIME)
                .min(settings.claim / 4);
            if left < floor {
                let rest: Vec<i64> = rows[i..].iter().map(|r| r.seq).collect();
                self.services
                    .store
                    .release_outbox_claims(&rest, &holder)
                    .await?;
                break;
            }
            let timeout = settings.timeout.min(left);
            let sink = &self.sinks[&row.topic];
            let outcome = match tokio::time::timeout(timeout, sink.deliver(row)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(anyhow::anyhow!(
                    "no answer within {:.1} s ({} lane delivery timeout)",
                    timeout.as_secs_f64(),
                    lane.as_str()
                )),
            };
            match outcome {
                Ok(()) => {
                    if self.failpoints.fires(FailPoint::RelayPublished) {
                        return Err(Crashed(FailPoint::RelayPublished).into());
                    }
                    let at = self.services.clock.now();
                    if self
                        .services
                        .store
                        .mark_outbox_published(row.seq, &holder, at)
                        .await?
                    {
                        self.services.metrics.outbox_published(&row.topic);
                        delivered += 1;
                    } else {
                        self.claim_lost(row);
                    }
                }
                Err(err) => self.failed(row, &holder, &err).await?,
            }
        }
        Ok(delivered)
    }

    fn claim_lost(&self, row: &OutboxRow) {
        tracing::warn!(topic = %row.topic, seq = row.seq,
            "outbox row delivered after its claim passed to another relay; left to that relay");
        self.services.metrics.outbox_claim_lost(&row.topic);
    }

    /// Records a failed delivery: retried later, or dead-lettered when permanent or
    /// out of attempts.
    async fn failed(
        &self,
        row: &OutboxRow,
        holder: &str,
        err: &anyhow::Error,
    ) -> anyhow::Result<()> {
        let message = format!("{err:#}");
        let permanent = err.chain().any(|e| e.is::<PermanentFailure>());
        let at = self.services.clock.now();
        self.services.metrics.outbox_failed(&row.topic);
        if permanent || row.attempts + 1 >= self.max_attempts {
            tracing::error!(topic = %row.topic, subject = %row.subject, seq = row.seq,
                attempts = row.attempts + 1, error = %message,
                "outbox row given up: moved to the dead letters (cardpipe ops dead-letters)");
            if self
                .services
                .store
                .dead_letter_outbox(row.seq, holder, &message, at)
                .await?
            {
                self.services.metrics.outbox_dead_lettered(&row.topic);
            } else {
                self.claim_lost(row);
            }
            return Ok(());
        }
        let backoff = Duration::seconds(1i64 << (row.attempts + 1).clamp(1, 9));
        tracing::warn!(topic = %row.topic, subject = %row.subject, error = %message, "outbox delivery failed; will retry");
        if !self
            .services
            .store
            .mark_outbox_failed(row.seq, holder, &message, at + backoff)
            .await?
        {
            self.claim_lost(row);
        }
        Ok(())
    }

    /// Delivers until `shutdown` (one loop per lane), then flushes what is due (for
    /// at most `flush_for`) and returns.
    pub async fn run(
        self,
        shutdown: CancellationToken,
        flush_for: StdDuration,
    ) -> anyhow::Result<()> {
        let relay = Arc::new(self);
        // A lane that stops on its own (a simulated crash) stops the other one too: the
        // relay is one task to its owner.
        let lanes = shutdown.child_token();
        let external = tokio::spawn({
            let (relay, lanes) = (relay.clone(), lanes.clone());
            async move {
                let result = relay
                    .run_lane(Lane::External, lanes.clone(), flush_for)
                    .await;
                lanes.cancel();
                result
            }
        });
        let internal = relay
            .run_lane(Lane::Internal, lanes.clone(), flush_for)
            .await;
        lanes.cancel();
        let external = external
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("external relay lane panicked: {e}")));
        internal.and(external)
    }

    async fn run_lane(
        self: Arc<Self>,
        lane: Lane,
        shutdown: CancellationToken,
        flush_for: StdDuration,
    ) -> anyhow::Result<()> {
        let batch = self.lanes[&lane].batch;
        let wakeup = match lane {
            Lane::Internal => self.wakeup.clone(),
            Lane::External => self.external_wakeup.clone(),
        };
        let mut last_purge = tokio::time::Instant::now();
        loop {
            // Shutdown does not wait for a hung delivery: the round is dropped, and its
            // rows come back when their claim ends (fenced: a late answer changes nothing).
            let round = tokio::select! {
                round = self.drain_lane(lane) => round,
                _ = shutdown.cancelled() => break,
            };
            let delivered = match round {
                Ok(n) => n,
                Err(err) if err.is::<Crashed>() => return Err(err),
                Err(err) => {
                    tracing::warn!(lane = lane.as_str(), error = %err, "outbox relay round failed");
                    0
                }
            };
            if lane == Lane::Internal && last_purge.elapsed() > StdDuration::from_secs(600) {
                let before = self.services.clock.now() - Duration::days(1);
                if let Err(err) = self.services.store.purge_published_outbox(before).await {
                    tracing::warn!(error = %err, "outbox purge failed");
                }
                last_purge = tokio::time::Instant::now();
            }
            if delivered as i64 >= batch {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = wakeup.notified() => {
                    // A commit woke the relay: it may have written callbacks too.
                    if lane == Lane::Internal {
                        self.external_wakeup.notify_one();
                    }
                }
                _ = tokio::time::sleep(self.poll) => {}
            }
        }
        let deadline = tokio::time::Instant::now() + flush_for;
        while tokio::time::Instant::now() < deadline {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.drain_lane(lane)).await {
                Err(_) | Ok(Ok(0)) => break,
                Ok(Ok(_)) => {}
                Ok(Err(err)) => {
                    tracing::warn!(lane = lane.as_str(), error = %err, "outbox flush failed");
                    tokio::time::sleep(StdDuration::from_millis(200)).await;
                }
            }
        }
        Ok(())
    }
}
