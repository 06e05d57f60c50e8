//! Prometheus metrics, emitted through typed calls (one method per event) so
//! names and labels are defined once. Names follow `cardpipe_<name>_<unit>`,
//! counters end in `_total`; labels are low-cardinality (stage, outcome,
//! state, topic, queue). The README's metrics catalogue lists them all.
//!
//! Gauges that describe the store and the broker (applications per state,
//! overdue applications, queue depths, outbox lag, the newest CRL's times) are
//! computed at scrape time by [`Metrics::refresh`], so every replica reports the
//! same value (dashboards and alerts aggregate them with `max`).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::broker::Broker;
use crate::clock::{Clock, from_rfc3339};
use crate::domain::state::ALL_STATES;
use crate::store::Store;

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    /// The stage's decision was committed.
    Done,
    /// Nothing to do (duplicate or late delivery).
    Skipped,
    /// Failed; sent to a retry queue.
    Retried,
    /// Failed for good; parked for an operator.
    Parked,
}

impl JobOutcome {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            JobOutcome::Done => "done",
            JobOutcome::Skipped => "skipped",
            JobOutcome::Retried => "retried",
            JobOutcome::Parked => "parked",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageOutcome {
    stage: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicLabel {
    topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

/// A card is due at its pickup office within this long of the application being received.
const OVERDUE_AFTER: time::Duration = time::Duration::days(30);

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    stage: String,
    queue: String,
}

/// Job duration buckets (seconds): sub-millisecond store work up to encoder
/// runs of tens of seconds.
const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The process's metrics (cheap to clone).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<std::sync::Mutex<Registry>>,
    jobs: Family<StageOutcome, Counter>,
    job_duration: Family<StageLabel, Histogram>,
    in_flight: Family<StageLabel, Gauge>,
    outbox_published: Family<TopicLabel, Counter>,
    outbox_failed: Family<TopicLabel, Counter>,
    outbox_dead_lettered: Family<TopicLabel, Counter>,
    outbox_claims_lost: Family<TopicLabel, Counter>,
    outbox_dead_letters: Gauge,
    outbox_pending: Gauge,
    outbox_oldest_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    applications: Family<StateLabel, Gauge>,
    queue_depth: Family<QueueLabel, Gauge>,
    applications_overdue: Gauge,
    /// The newest CRL's publication and nextUpdate times; registered when a CRL first
    /// exists, so a centre without a CRL yet exports nothing rather than 0 (which would
    /// read as "stale since 1970").
    crl_times: Arc<OnceLock<(FloatGauge, FloatGauge)>>,
    intake_records: Family<OutcomeLabel, Counter>,
    intake_submissions_refused: Family<ReasonLabel, Counter>,
    batches_released: Counter,
    audit_checkpoints: Family<OutcomeLabel, Counter>,
    audit_checkpoint_seq: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Decrements the in-flight gauge when the job ends, however it ends.
#[derive(Debug)]
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// A fresh registry with the runtime metrics.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cardpipe");
        let jobs = Family::<StageOutcome, Counter>::default();
        registry.register("jobs", "Jobs handled, by stage and outcome", jobs.clone());
        let job_duration = Family::<StageLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(DURATION_BUCKETS)
        });
        registry.register_with_unit(
            "job_duration",
            "Time from delivery to acknowledgement, by stage",
            prometheus_client::registry::Unit::Seconds,
            job_duration.clone(),
        );
        let in_flight = Family::<StageLabel, Gauge>::default();
        registry.register(
            "jobs_in_flight",
            "Jobs being handled now, by stage",
            in_flight.clone(),
        );
        let outbox_published = Family::<TopicLabel, Counter>::default();
        registry.register(
            "outbox_published",
            "Outbox rows delivered, by topic",
            outbox_published.clone(),
        );
        let outbox_failed = Family::<TopicLabel, Counter>::default();
        registry.register(
            "outbox_delivery_failures",
            "Failed outbox deliveries (retried later), by topic",
            outbox_failed.clone(),
        );
        let outbox_dead_lettered = Family::<TopicLabel, Counter>::default();
        registry.register(
            "outbox_dead_lettered",
            "Outbox rows given up and moved to the dead letters (permanent error or too many attempts), by topic",
            outbox_dead_lettered.clone(),
        );
        let outbox_claims_lost = Family::<TopicLabel, Counter>::default();
        registry.register(
            "outbox_claims_lost",
            "Outbox rows delivered by a relay whose claim had meanwhile passed to another relay (the fenced update changed nothing), by topic",
            outbox_claims_lost.clone(),
        );
        let outbox_dead_letters = Gauge::default();
        registry.register(
            "outbox_dead_letters",
            "Outbox dead letters waiting for an operator (re-queue or discard)",
            outbox_dead_letters.clone(),
        );
        let outbox_pending = Gauge::default();
        registry.register(
            "outbox_pending",
            "Outbox rows not yet delivered",
            outbox_pending.clone(),
        );
        let outbox_oldest_age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register_with_unit(
            "outbox_oldest_age",
            "Age of the oldest undelivered outbox row (outbox lag)",
            prometheus_client::registry::Unit::Seconds,
            outbox_oldest_age.clone(),
        );
        let applications = Family::<StateLabel, Gauge>::default();
        registry.register(
            "applications",
            "Applications in each state",
            applications.clone(),
        );
        let queue_depth = Family::<QueueLabel, Gauge>::default();
        registry.register(
            "queue_depth",
            "Messages in a stage's queues (queue = ready | retrying | parked)",
            queue_depth.clone(),
        );
        let applications_overdue = Gauge::default();
        registry.register(
            "applications_overdue",
            "Applications received more than 30 days ago whose card is not yet at a pickup office",
            applications_overdue.clone(),
        );
        let intake_records = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "intake_records",
            "Registry batch records accepted or rejected at intake",
            intake_records.clone(),
        );
        let intake_submissions_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "intake_submissions_refused",
            "Registry batch submissions refused at a bound of [registry.intake]",
            intake_submissions_refused.clone(),
        );
        let batches_released = Counter::default();
        registry.register(
            "batches_released",
            "Scheduled batches released into the pipeline",
            batches_released.clone(),
        );
        let audit_checkpoints = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "audit_checkpoints",
            "Signed audit checkpoint passes: written, unchanged (the chain had not moved), refused (the chain no longer extends the newest checkpoint) or failed",
            audit_checkpoints.clone(),
        );
        let audit_checkpoint_seq = Gauge::default();
        registry.register(
            "audit_checkpoint_seq",
            "Audit entry the newest checkpoint this process wrote vouches for",
            audit_checkpoint_seq.clone(),
        );
        Self {
            registry: Arc::new(std::sync::Mutex::new(registry)),
            audit_checkpoints,
            audit_checkpoint_seq,
            applications_overdue,
            crl_times: Arc::new(OnceLock::new()),
            intake_records,
            intake_submissions_refused,
            batches_released,
            jobs,
            job_duration,
            in_flight,
            outbox_published,
            outbox_failed,
            outbox_dead_lettered,
            outbox_claims_lost,
            outbox_dead_letters,
            outbox_pending,
            outbox_oldest_age,
            applications,
            queue_depth,
        }
    }

    /// Lets a stage register its own metrics in the same registry.
    pub fn register(&self, f: impl FnOnce(&mut Registry)) {
        f(&mut self.registry.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// A job started; the guard counts it in flight until dropped.
    pub fn job_started(&self, stage: &str) -> InFlight {
        let gauge = self
            .in_flight
            .get_or_create(&StageLabel {
                stage: stage.to_owned(),
            })
            .clone();
        gauge.inc();
        InFlight(gauge)
    }

    /// A job ended.
    pub fn job_finished(&self, stage: &str, outcome: JobOutcome, took: Duration) {
        self.jobs
            .get_or_create(&StageOutcome {
                stage: stage.to_owned(),
                outcome: outcome.as_str().to_owned(),
            })
            .inc();
        self.job_duration
            .get_or_create(&StageLabel {
                stage: stage.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// Jobs of `stage` that ended with `outcome` so far.
    pub fn jobs_total(&self, stage: &str, outcome: JobOutcome) -> u64 {
        self.jobs
            .get_or_create(&StageOutcome {
                stage: stage.to_owned(),
                outcome: outcome.as_str().to_owned(),
            })
            .get()
    }

    /// An outbox row was delivered.
    pub fn outbox_published(&self, topic: &str) {
        self.outbox_published
            .get_or_create(&TopicLabel {
                topic: topic.to_owned(),
            })
            .inc();
    }

    /// An outbox row of `topic` was moved to the dead letters.
    pub fn outbox_dead_lettered(&self, topic: &str) {
        self.outbox_dead_lettered
            .get_or_create(&TopicLabel {
                topic: topic.to_owned(),
            })
            .inc();
    }

    /// A relay's fenced update found its claim taken over by another relay.
    pub fn outbox_claim_lost(&self, topic: &str) {
        self.outbox_claims_lost
            .get_or_create(&TopicLabel {
                topic: topic.to_owned(),
            })
            .inc();
    }

    /// A delivery of an outbox row of `topic` failed (it is retried later).
    pub fn outbox_failed(&self, topic: &str) {
        self.outbox_failed
            .get_or_create(&TopicLabel {
                topic: topic.to_owned(),
            })
            .inc();
    }

    /// Intake decided `n` records of a submitted batch (`accepted` or `rejected`).
    pub fn intake_records(&self, outcome: &str, n: u64) {
        self.intake_records
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc_by(n);
    }

    /// A batch submission was refused at a bound: `body_too_large`, `too_many_records` or
    /// `too_many_submissions`; or `idempotency_key_reused` with a different body (a fixed set:
    /// low cardinality).
    pub fn intake_submission_refused(&self, reason: &'static str) {
        self.intake_submissions_refused
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A signed audit checkpoint pass ended: `written` (vouching for entry `seq`),
    /// `unchanged` or `failed`.
    pub fn audit_checkpoint(&self, outcome: &'static str, seq: Option<i64>) {
        self.audit_checkpoints
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
        if let Some(seq) = seq {
            self.audit_checkpoint_seq.set(seq);
        }
    }

    /// `n` scheduled batches were released into the pipeline.
    pub fn batches_released(&self, n: u64) {
        self.batches_released.inc_by(n);
    }

    /// Recomputes the gauges that describe the store and the broker.
    pub async fn refresh(
        &self,
        store: &Store,
        broker: &dyn Broker,
        stages: &[String],
        clock: &dyn Clock,
    ) {
        if let Ok(counts) = store.count_by_state().await {
            for state in ALL_STATES {
                let n = counts
                    .iter()
                    .find(|(s, _)| *s == state)
                    .map_or(0, |(_, n)| *n);
                self.applications
                    .get_or_create(&StateLabel {
                        state: state.as_str().to_owned(),
                    })
                    .set(n);
            }
        }
        if let Ok(n) = store.count_overdue(clock.now() - OVERDUE_AFTER).await {
            self.applications_overdue.set(n);
        }
        if let Ok(Some((published, next_update))) = store.latest_crl_times().await {
            let (last, next) = self.crl_times.get_or_init(|| {
                let gauges = (FloatGauge::default(), FloatGauge::default());
                let mut registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
                registry.register_with_unit(
                    "crl_last_published_timestamp",
                    "Unix time the newest CRL was published (thisUpdate)",
                    prometheus_client::registry::Unit::Seconds,
                    gauges.0.clone(),
                );
                registry.register_with_unit(
                    "crl_next_update_timestamp",
                    "Unix time of the newest CRL's nextUpdate",
                    prometheus_client::registry::Unit::Seconds,
                    gauges.1.clone(),
                );
                gauges
            });
            last.set(published.unix_timestamp() as f64);
            next.set(next_update.unix_timestamp() as f64);
        }
        if let Ok(dead) = store.dead_letter_count().await {
            self.outbox_dead_letters.set(dead);
        }
        if let Ok((pending, oldest)) = store.outbox_backlog().await {
            self.outbox_pending.set(pending);
            let age = oldest
                .and_then(|t| from_rfc3339(&t).ok())
                .map_or(0.0, |t| (clock.now() - t).as_seconds_f64().max(0.0));
            self.outbox_oldest_age.set(age);
        }
        for stage in stages {
            if let Ok(depth) = broker.depth(stage).await {
                for (queue, n) in [
                    ("ready", depth.ready),
                    ("retrying", depth.retrying),
                    ("parked", depth.parked),
                ] {
                    self.queue_depth
                        .get_or_create(&QueueLabel {
                            stage: stage.clone(),
                            queue: queue.to_owned(),
                        })
                        .set(i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }
}
