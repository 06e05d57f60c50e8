//! The message broker, behind a small trait.
//!
//! A message only says "subject X is ready for stage S (attempt n)": the
//! database is the source of truth and no personal data travels in messages.
//! Two implementations share one contract (see `tests/broker_contract.rs`):
//!
//! * [`rabbitmq::RabbitBroker`]: durable quorum queues, persistent messages,
//!   publisher confirms, manual ack, per-consumer prefetch, retry through
//!   dead-letter + TTL wait queues, a parking queue per stage, automatic
//!   reconnection (lapin auto-recovery);
//! * [`memory::MemoryBroker`]: the same semantics in process for the embedded
//!   mode (unacked work is redelivered when its consumer goes away).
//!
//! Queue layout for stage `s` with prefix `p`: work queue `p.s`, wait queues
//! `p.s.retry.<n>` (one per delay step, dead-lettering back to `p.s`), and the
//! parking queue `p.s.parked`.

pub mod memory;
pub mod rabbitmq;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// A unit of work: "subject is ready for stage (attempt n)".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Unique message id (the outbox row id for relayed messages).
    pub id: String,
    /// The stage that should handle it.
    pub stage: String,
    /// What to work on: an application id (or a batch id for batch stages).
    pub subject: String,
    /// 1 for the first delivery to this stage, +1 for every retry.
    pub attempt: u32,
    /// Why the previous attempt failed (our own error text, no personal data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Priority work (urgent batches, reprints): travels in the stage's priority lane and is
    /// delivered before any waiting normal job.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub priority: bool,
}

impl Job {
    /// A first attempt at `stage` for `subject`, with a fresh id.
    pub fn new(stage: impl Into<String>, subject: impl Into<String>) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            stage: stage.into(),
            subject: subject.into(),
            attempt: 1,
            last_error: None,
            priority: false,
        }
    }

    /// The same job in the priority lane (`true`) or the normal one.
    pub fn with_priority(mut self, priority: bool) -> Self {
        self.priority = priority;
        self
    }

    /// Encodes the job for the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a job always serialises")
    }

    /// Decodes a job from the wire.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, BrokerError> {
        serde_json::from_slice(bytes).map_err(|e| BrokerError::Malformed(e.to_string()))
    }
}

/// How a stage's failed jobs are retried, then parked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay before retry n (the last one repeats for further attempts).
    pub delays: Vec<Duration>,
    /// After this many failed attempts the job is parked for an operator.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            delays: vec![
                Duration::from_secs(5),
                Duration::from_secs(30),
                Duration::from_secs(300),
            ],
            max_attempts: 5,
        }
    }
}

impl RetryPolicy {
    /// Which wait-queue step a retry of `job` (which just failed) goes to.
    pub fn step_for(&self, failed_attempt: u32) -> usize {
        let idx = failed_attempt.saturating_sub(1) as usize;
        idx.min(self.delays.len().saturating_sub(1))
    }
}

/// Queue depths of one stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueDepth {
    /// Ready to be delivered.
    pub ready: u64,
    /// Waiting in the retry queues.
    pub retrying: u64,
    /// Parked for an operator.
    pub parked: u64,
}

/// Broker failures.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker could not be reached or the connection broke.
    #[error("broker connection: {0}")]
    Connection(String),
    /// The broker refused to take a message (negative publisher confirm).
    #[error("broker refused message for queue {queue}")]
    Nacked {
        /// The target queue.
        queue: String,
    },
    /// A message on a queue was not a cardpipe job.
    #[error("malformed job message: {0}")]
    Malformed(String),
    /// A stage's queues were used before being declared.
    #[error("unknown stage queue {0}")]
    UnknownQueue(String),
    /// The broker is shutting down.
    #[error("broker closed")]
    Closed,
}

/// Names of a stage's queues.
#[derive(Debug, Clone)]
pub struct QueueNames {
    prefix: String,
}

impl QueueNames {
    /// Queue names under `prefix` (e.g. `cardpipe`).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The work queue of `stage`.
    pub fn work(&self, stage: &str) -> String {
        format!("{}.{stage}", self.prefix)
    }

    /// The wait queue for retry step `step` of `stage`.
    pub fn retry(&self, stage: &str, step: usize) -> String {
        format!("{}.{stage}.retry.{step}", self.prefix)
    }

    /// The parking queue of `stage`.
    pub fn parked(&self, stage: &str) -> String {
        format!("{}.{stage}.parked", self.prefix)
    }

    /// The priority lane of `stage`: consumed before the work queue.
    pub fn priority(&self, stage: &str) -> String {
        format!("{}.{stage}.priority", self.prefix)
    }
}

/// A message taken from a work queue, to be acknowledged exactly once.
pub struct Delivery {
    /// The job.
    pub job: Job,
    /// The broker delivered it before (the previous consumer did not ack).
    pub redelivered: bool,
    acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("job", &self.job)
            .field("redelivered", &self.redelivered)
            .finish()
    }
}

impl Delivery {
    /// Wraps a job and its acknowledgement handle (for broker implementations).
    pub fn new(job: Job, redelivered: bool, acker: Box<dyn Acker>) -> Self {
        Self {
            job,
            redelivered,
            acker,
        }
    }

    /// Confirms the job is done; the broker forgets it.
    ///
    /// `Ok(false)` means the channel was lost first: the broker will redeliver
    /// the job, which idempotent handlers absorb.
    pub async fn ack(self) -> Result<bool, BrokerError> {
        self.acker.ack().await
    }

    /// Gives the job back to the queue for immediate redelivery.
    pub async fn requeue(self) -> Result<bool, BrokerError> {
        self.acker.requeue().await
    }
}

/// Acknowledgement of one delivery (implemented by each broker).
#[async_trait]
pub trait Acker: Send + Sync {
    /// Positive acknowledgement.
    async fn ack(&self) -> Result<bool, BrokerError>;
    /// Negative acknowledgement with requeue.
    async fn requeue(&self) -> Result<bool, BrokerError>;
}

/// A consumer's stream of deliveries. Dropping it gives every unacknowledged
/// delivery back to the queue.
#[async_trait]
pub trait JobStream: Send {
    /// The next delivery; `None` once the consumer is cancelled.
    async fn next(&mut self) -> Option<Result<Delivery, BrokerError>>;
}

/// The broker contract every backend meets.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Backend name for logs and `/readyz` (`rabbitmq`, `memory`).
    fn kind(&self) -> &'static str;

    /// Declares a stage's work, wait and parking queues (idempotent).
    async fn declare_stage(&self, stage: &str, policy: &RetryPolicy) -> Result<(), BrokerError>;

    /// Publishes a job to its stage's work queue (its priority lane when `job.priority`);
    /// returns once the broker has confirmed it durably. A consumer of the stage takes
    /// priority jobs before any waiting normal job.
    async fn publish(&self, job: &Job) -> Result<(), BrokerError>;

    /// Publishes a job to wait queue `step` of its stage; it reaches the work
    /// queue again after that step's delay.
    async fn publish_retry(&self, job: &Job, step: usize) -> Result<(), BrokerError>;

    /// Publishes a job to its stage's parking queue.
    async fn publish_parked(&self, job: &Job) -> Result<(), BrokerError>;

    /// Starts consuming a stage's work queue with at most `prefetch`
    /// unacknowledged deliveries outstanding.
    async fn consume(&self, stage: &str, prefetch: u16) -> Result<Box<dyn JobStream>, BrokerError>;

    /// Queue depths of a stage.
    async fn depth(&self, stage: &str) -> Result<QueueDepth, BrokerError>;

    /// The parked jobs of a stage, oldest first (left parked).
    async fn parked(&self, stage: &str) -> Result<Vec<Job>, BrokerError>;

    /// Removes one parked job (by job id) and returns it.
    async fn take_parked(&self, stage: &str, job_id: &str) -> Result<Option<Job>, BrokerError>;

    /// Answers when the broker is reachable.
    async fn ping(&self) -> Result<(), BrokerError>;
}
