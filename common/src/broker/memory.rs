//! The in-process broker of the embedded mode.
//!
//! Same contract as RabbitMQ where it matters to the runtime: a delivery stays
//! owned by its consumer until acknowledged; a consumer that goes away (its
//! stream is dropped, as when a channel closes) gives its unacknowledged
//! deliveries back, flagged as redelivered; prefetch bounds what one consumer
//! holds; retries wait their delay before reaching the work queue again.
//! Nothing survives the process: the runtime re-enqueues stranded work from the
//! store at start (see `runtime::recover`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use tokio::sync::Notify;

use super::{Acker, Broker, BrokerError, Delivery, Job, JobStream, QueueDepth, RetryPolicy};

/// The in-process broker. Clones share the same queues.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryBroker")
    }
}

#[derive(Default)]
struct Inner {
    stages: Mutex<HashMap<String, StageQueues>>,
    next_tag: AtomicU64,
    next_consumer: AtomicU64,
}

struct StageQueues {
    policy: RetryPolicy,
    ready: Ready,
    /// tag -> (consumer id, job)
    unacked: HashMap<u64, (u64, Job)>,
    retrying: u64,
    parked: VecDeque<Job>,
    notify: Arc<Notify>,
}

/// A stage's ready jobs in three lanes, taken in this order: redeliveries (at the very
/// front, as they were taken first; the last given back first), priority jobs, normal jobs
/// (each FIFO). Lanes rather than one queue with priority jobs inserted before the first
/// normal one: that insertion looked through the whole queue, and a night released as
/// urgent made every publish cost the length of the queue (issue 16).
#[derive(Default)]
struct Ready {
    redelivered: VecDeque<Job>,
    priority: VecDeque<Job>,
    normal: VecDeque<Job>,
}

impl Ready {
    fn len(&self) -> usize {
        self.redelivered.len() + self.priority.len() + self.normal.len()
    }

    /// The next job to deliver and whether it is a redelivery.
    fn pop_front(&mut self) -> Option<(Job, bool)> {
        if let Some(job) = self.redelivered.pop_front() {
            return Some((job, true));
        }
        self.priority
            .pop_front()
            .or_else(|| self.normal.pop_front())
            .map(|job| (job, false))
    }
}

impl StageQueues {
    /// Appends a job to its lane: priority jobs queue behind earlier priority jobs but ahead
    /// of every normal one (redeliveries stay at the very front, as they were taken first).
    fn enqueue(&mut self, job: Job) {
        if job.priority {
            self.ready.priority.push_back(job);
        } else {
            self.ready.normal.push_back(job);
        }
    }
}

impl MemoryBroker {
    /// An empty broker.
    pub fn new() -> Self {
        Self::default()
    }

    fn with_stage<T>(
        &self,
        stage: &str,
        f: impl FnOnce(&mut StageQueues) -> T,
    ) -> Result<T, BrokerError> {
        with_stage(&self.inner, stage, f)
    }
}

fn with_stage<T>(
    inner: &Inner,
    stage: &str,
    f: impl FnOnce(&mut StageQueues) -> T,
) -> Result<T, BrokerError> {
    let mut stages = inner.stages.lock().unwrap_or_else(|e| e.into_inner());
    let queues = stages
        .get_mut(stage)
        .ok_or_else(|| BrokerError::UnknownQueue(stage.to_owned()))?;
    Ok(f(queues))
}

#[async_trait]
impl Broker for MemoryBroker {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn declare_stage(&self, stage: &str, policy: &RetryPolicy) -> Result<(), BrokerError> {
        let mut stages = self.inner.stages.lock().unwrap_or_else(|e| e.into_inner());
        stages
            .entry(stage.to_owned())
            .and_modify(|q| q.policy = policy.clone())
            .or_insert_with(|| StageQueues {
                policy: policy.clone(),
                ready: Ready::default(),
                unacked: HashMap::new(),
                retrying: 0,
                parked: VecDeque::new(),
                notify: Arc::new(Notify::new()),
            });
        Ok(())
    }

    async fn publish(&self, job: &Job) -> Result<(), BrokerError> {
        let job = job.clone();
        self.with_stage(&job.stage.clone(), |q| {
            q.enqueue(job);
            q.notify.notify_waiters();
        })
    }

    async fn publish_retry(&self, job: &Job, step: usize) -> Result<(), BrokerError> {
        let delay = self.with_stage(&job.stage, |q| {
            q.retrying += 1;
            q.policy
                .delays
                .get(step)
                .or(q.policy.delays.last())
                .copied()
                .unwrap_or_default()
        })?;
        let inner = Arc::downgrade(&self.inner);
        let job = job.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Some(inner) = inner.upgrade() {
                let _ = with_stage(&inner, &job.stage.clone(), |q| {
                    q.retrying = q.retrying.saturating_sub(1);
                    // As on RabbitMQ, a retry comes back in the normal lane.
                    q.ready.normal.push_back(job);
                    q.notify.notify_waiters();
                });
            }
        });
        Ok(())
    }

    async fn publish_parked(&self, job: &Job) -> Result<(), BrokerError> {
        let job = job.clone();
        self.with_stage(&job.stage.clone(), |q| q.parked.push_back(job))
    }

    async fn consume(&self, stage: &str, prefetch: u16) -> Result<Box<dyn JobStream>, BrokerError> {
        let notify = self.with_stage(stage, |q| q.notify.clone())?;
        Ok(Box::new(MemoryStream {
            inner: self.inner.clone(),
            stage: stage.to_owned(),
            consumer: self.inner.next_consumer.fetch_add(1, Ordering::Relaxed),
            prefetch: prefetch.max(1) as usize,
            notify,
        }))
    }

    async fn depth(&self, stage: &str) -> Result<QueueDepth, BrokerError> {
        self.with_stage(stage, |q| QueueDepth {
            ready: q.ready.len() as u64,
            retrying: q.retrying,
            parked: q.parked.len() as u64,
        })
    }

    async fn parked(&self, stage: &str) -> Result<Vec<Job>, BrokerError> {
        self.with_stage(stage, |q| q.parked.iter().cloned().collect())
    }

    async fn take_parked(&self, stage: &str, job_id: &str) -> Result<Option<Job>, BrokerError> {
        self.with_stage(stage, |q| {
            let pos = q.parked.iter().position(|j| j.id == job_id)?;
            q.parked.remove(pos)
        })
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        Ok(())
    }
}

struct MemoryStream {
    inner: Arc<Inner>,
    stage: String,
    consumer: u64,
    prefetch: usize,
    notify: Arc<Notify>,
}

impl MemoryStream {
    fn try_take(&self) -> Option<Delivery> {
        with_stage(&self.inner, &self.stage, |q| {
            let held = q
                .unacked
                .values()
                .filter(|(c, _)| *c == self.consumer)
                .count();
            if held >= self.prefetch {
                return None;
            }
            let (job, redelivered) = q.ready.pop_front()?;
            let tag = self.inner.next_tag.fetch_add(1, Ordering::Relaxed);
            q.unacked.insert(tag, (self.consumer, job.clone()));
            let acker = MemoryAcker {
                inner: Arc::downgrade(&self.inner),
                stage: self.stage.clone(),
                tag,
            };
            Some(Delivery::new(job, redelivered, Box::new(acker)))
        })
        .ok()
        .flatten()
    }
}

#[async_trait]
impl JobStream for MemoryStream {
    async fn next(&mut self) -> Option<Result<Delivery, BrokerError>> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(delivery) = self.try_take() {
                return Some(Ok(delivery));
            }
            notified.await;
        }
    }
}

impl Drop for MemoryStream {
    /// A consumer that goes away gives back what it did not acknowledge, as an
    /// AMQP channel close does.
    fn drop(&mut self) {
        let consumer = self.consumer;
        let _ = with_stage(&self.inner, &self.stage, |q| {
            let mut tags: Vec<u64> = q
                .unacked
                .iter()
                .filter(|(_, (c, _))| *c == consumer)
                .map(|(t, _)| *t)
                .collect();
            tags.sort_unstable_by(|a, b| b.cmp(a));
            for tag in tags {
                if let Some((_, job)) = q.unacked.remove(&tag) {
                    q.ready.redelivered.push_front(job);
                }
            }
            q.notify.notify_waiters();
        });
    }
}

struct MemoryAcker {
    inner: Weak<Inner>,
    stage: String,
    tag: u64,
}

impl MemoryAcker {
    fn settle(&self, requeue: bool) -> Result<bool, BrokerError> {
        let Some(inner) = self.inner.upgrade() else {
            return Ok(false);
        };
        with_stage(&inner, &self.stage, |q| match q.unacked.remove(&self.tag) {
            Some((_, job)) => {
                if requeue {
                    q.ready.redelivered.push_front(job);
                }
                q.notify.notify_waiters();
                true
            }
            // Already given back when its consumer went away.
            None => false,
        })
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<bool, BrokerError> {
        self.settle(false)
    }

    async fn requeue(&self) -> Result<bool, BrokerError> {
        self.settle(true)
    }
}
