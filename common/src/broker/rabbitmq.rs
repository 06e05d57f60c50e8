//! RabbitMQ through lapin.
//!
//! * Work and parking queues are durable quorum queues; messages persistent.
//! * Every publish waits for the publisher confirm, and is `mandatory`, so a
//!   publish to a queue nobody declared is an error rather than a silent drop.
//! * Retries: one wait queue per delay step with a message TTL, dead-lettering
//!   (at-least-once) back to the work queue. Debian's RabbitMQ 3.10 has no
//!   native delayed delivery, and this needs no plugin.
//! * Consumers use manual ack and a per-consumer prefetch (quorum queues reject
//!   global QoS), each on its own channel.
//! * Priority: quorum queues on RabbitMQ 3.10 ignore message priorities, so each stage has
//!   a second work queue, `<stage>.priority`, and a stage's consumer takes from it first
//!   (urgent batches, reprints). Retries of priority jobs wait in the normal wait queues and
//!   return in the normal lane.
//! * The connection is opened with lapin's auto-recovery: after a broker
//!   restart or a dropped connection, channels and consumers come back and
//!   publishes wait for the recovery; unacknowledged deliveries are redelivered
//!   by the broker.
//! * When lapin's recovery itself fails (the connection ends in its error or
//!   closed state: seen in a chaos run when a cut came in the middle of the
//!   recovery's own handshake, "unexpected connection open-ok"), nothing would
//!   ever bring that connection back. The broker then opens a new connection
//!   ([`Link`]) and the consumers subscribe again on it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::OnceCell;

use super::{
    Acker, Broker, BrokerError, Delivery, Job, JobStream, QueueDepth, QueueNames, RetryPolicy,
};

/// How long a publish waits for the connection to recover before failing.
const RECOVERY_WAIT: Duration = Duration::from_secs(30);

/// Retry queues read at most per stage by a process that did not declare them.
const MAX_DISCOVERED_RETRY_STEPS: usize = 32;

/// The RabbitMQ broker.
pub struct RabbitBroker {
    links: Arc<Links>,
    names: QueueNames,
    retry_steps: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    queue_expiry: Option<Duration>,
}

/// One connection to the broker with its confirming publisher channel.
struct Link {
    connection: Connection,
    publisher: Channel,
    ops_channel: OnceCell<Channel>,
}

impl Link {
    async fn open(url: &str) -> Result<Self, BrokerError> {
        let connection =
            Connection::connect(url, ConnectionProperties::default().enable_auto_recover())
                .await
                .map_err(conn_err)?;
        let publisher = connection.create_channel().await.map_err(conn_err)?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(conn_err)?;
        Ok(Link {
            connection,
            publisher,
            ops_channel: OnceCell::new(),
        })
    }

    /// lapin will not bring this connection back: it ended in error (its recovery failed)
    /// or was closed.
    fn is_dead(&self) -> bool {
        let status = self.connection.status();
        status.errored() || status.closed()
    }
}

/// The broker's current [`Link`], shared with its consumers so that they can subscribe
/// again on a new one.
struct Links {
    /// Never logged: it holds the credentials.
    url: String,
    current: std::sync::RwLock<Arc<Link>>,
    /// One replacement at a time.
    replacing: tokio::sync::Mutex<()>,
    /// Set by [`RabbitBroker::close`]: a connection closed on purpose is not replaced.
    closed: AtomicBool,
}

impl Links {
    fn current(&self) -> Arc<Link> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The current link, after replacing it if lapin will not recover it.
    async fn usable(&self) -> Result<Arc<Link>, BrokerError> {
        let link = self.current();
        if link.is_dead() {
            self.replace(&link).await
        } else {
            Ok(link)
        }
    }

    /// A new channel on a usable connection.
    async fn channel(&self) -> Result<Channel, BrokerError> {
        let link = self.usable().await?;
        link.connection.create_channel().await.map_err(conn_err)
    }

    /// Replaces `seen` by a new connection, unless another caller already did.
    async fn replace(&self, seen: &Arc<Link>) -> Result<Arc<Link>, BrokerError> {
        let _one_at_a_time = self.replacing.lock().await;
        let now = self.current();
        if !Arc::ptr_eq(&now, seen) {
            return Ok(now);
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err(BrokerError::Connection(
                "the broker connection was closed".into(),
            ));
        }
        // A broker that accepts the socket but never answers must not hold every caller.
        let fresh = match tokio::time::timeout(RECOVERY_WAIT, Link::open(&self.url)).await {
            Ok(link) => Arc::new(link?),
            Err(_) => {
                return Err(BrokerError::Connection(format!(
                    "no new broker connection within {} s",
                    RECOVERY_WAIT.as_secs()
                )));
            }
        };
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh.clone();
        tracing::warn!("broker connection not recoverable; opened a new one");
        let old = now;
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let close = old.connection.close(200, "replaced".into());
                let _ = tokio::time::timeout(Duration::from_secs(5), close).await;
            });
        }
        Ok(fresh)
    }
}

impl std::fmt::Debug for RabbitBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitBroker")
            .field("names", &self.names)
            .finish()
    }
}

fn conn_err(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Connection(e.to_string())
}

impl RabbitBroker {
    /// Connects (with auto-recovery) and opens a confirming publisher channel.
    /// The URL's credentials are never logged.
    pub async fn connect(url: &str, queue_prefix: &str) -> Result<Self, BrokerError> {
        let link = Link::open(url).await?;
        Ok(Self {
            links: Arc::new(Links {
                url: url.to_owned(),
                current: std::sync::RwLock::new(Arc::new(link)),
                replacing: tokio::sync::Mutex::new(()),
                closed: AtomicBool::new(false),
            }),
            names: QueueNames::new(queue_prefix),
            retry_steps: Default::default(),
            queue_expiry: None,
        })
    }

    /// Closes the current connection without [`Self::close`], as when lapin's recovery
    /// gives up on it: the fault the broker must get over by itself (tests).
    #[doc(hidden)]
    pub async fn break_connection(&self) {
        let link = self.links.current();
        let _ = link
            .connection
            .close(320, "connection forced (test)".into())
            .await;
    }

    async fn channel(&self) -> Result<Channel, BrokerError> {
        self.links.channel().await
    }

    /// Declares queues with `x-expires`: RabbitMQ deletes a queue unused for
    /// this long. For throw-away prefixes (tests), never for production.
    pub fn with_queue_expiry(mut self, expiry: Duration) -> Self {
        self.queue_expiry = Some(expiry);
        self
    }

    /// Closes the connection (consumers stop; unacked work is redelivered).
    pub async fn close(&self) {
        // A broker that stopped answering must not hold a shutdown forever.
        self.links.closed.store(true, Ordering::SeqCst);
        let link = self.links.current();
        let close = link.connection.close(200, "cardpipe shutdown".into());
        let _ = tokio::time::timeout(Duration::from_secs(5), close).await;
    }

    /// Deletes every queue of `stage` under this broker's prefix: the work queue, the
    /// priority lane, the parking queue and the retry waits. For a throw-away prefix only
    /// (a benchmark's topology, once its processes stopped): the messages in them are gone.
    /// Returns how many of those queues existed.
    pub async fn delete_stage_queues(&self, stage: &str) -> Result<usize, BrokerError> {
        let mut names = vec![
            self.names.work(stage),
            self.names.priority(stage),
            self.names.parked(stage),
        ];
        names.extend((0..MAX_DISCOVERED_RETRY_STEPS).map(|step| self.names.retry(stage, step)));
        let mut deleted = 0;
        for name in names {
            // A missing queue is skipped (deleting it would close the channel on older
            // brokers); a broker that went away ends the clean-up below.
            if self.message_count(&name).await.is_err() {
                continue;
            }
            let channel = self.channel().await?;
            channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(conn_err)?;
            let _ = channel.close(200, "".into()).await;
            deleted += 1;
        }
        Ok(deleted)
    }

    async fn declare(
        &self,
        channel: &Channel,
        queue: &str,
        args: FieldTable,
    ) -> Result<(), BrokerError> {
        let mut args = args;
        if let Some(expiry) = self.queue_expiry {
            let ms = i64::try_from(expiry.as_millis()).unwrap_or(i64::MAX);
            args.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
        }
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .queue_declare(queue.into(), options, args)
            .await
            .map_err(conn_err)?;
        Ok(())
    }

    async fn publish_to(&self, queue: &str, job: &Job) -> Result<(), BrokerError> {
        let payload = job.to_bytes();
        let deadline = tokio::time::Instant::now() + RECOVERY_WAIT;
        loop {
            match self.try_publish(queue, &payload, &job.id).await {
                Ok(result) => return result,
                Err(err) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(conn_err(err));
                    }
                    tracing::warn!(queue, error = %err, "publish failed; waiting for broker recovery");
                    let link = self.links.current();
                    if link.is_dead() {
                        if let Err(err) = self.links.replace(&link).await {
                            tracing::warn!(error = %err, "broker connection not reopened yet");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        continue;
                    }
                    let recovered =
                        tokio::time::timeout(RECOVERY_WAIT, link.publisher.wait_for_recovery(err))
                            .await;
                    if !matches!(recovered, Ok(Ok(()))) {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }
    }

    /// One publish attempt. The outer `Err` is a connection problem worth
    /// retrying after recovery; the inner result is the broker's verdict.
    async fn try_publish(
        &self,
        queue: &str,
        payload: &[u8],
        id: &str,
    ) -> Result<Result<(), BrokerError>, lapin::Error> {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(id.into());
        let link = self.links.current();
        let confirm = link
            .publisher
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                payload,
                properties,
            )
            .await?
            .await?;
        Ok(match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => Err(BrokerError::UnknownQueue(queue.to_owned())),
            Confirmation::Nack(_) => Err(BrokerError::Nacked {
                queue: queue.to_owned(),
            }),
        })
    }

    async fn ops(&self) -> Result<Channel, BrokerError> {
        let link = self.links.usable().await?;
        let channel = link
            .ops_channel
            .get_or_try_init(|| async { link.connection.create_channel().await.map_err(conn_err) })
            .await?;
        Ok(channel.clone())
    }

    async fn message_count(&self, queue: &str) -> Result<u64, BrokerError> {
        // A passive declare of a missing queue closes the channel: use a
        // short-lived one.
        let channel = self.channel().await?;
        let options = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let result = channel
            .queue_declare(queue.into(), options, FieldTable::default())
            .await;
        let _ = channel.close(200, "".into()).await;
        Ok(u64::from(result.map_err(conn_err)?.message_count()))
    }

    /// Drains a queue on a throw-away channel without acknowledging; closing
    /// the channel puts every message back. `keep` picks at most one message
    /// to acknowledge (remove).
    async fn browse(
        &self,
        queue: &str,
        keep: Option<&str>,
    ) -> Result<(Vec<Job>, Option<Job>), BrokerError> {
        let channel = self.channel().await?;
        let mut seen = Vec::new();
        let mut taken = None;
        loop {
            let got = channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(conn_err)?;
            let Some(message) = got else { break };
            let job = Job::from_bytes(&message.delivery.data)?;
            if taken.is_none() && keep == Some(job.id.as_str()) {
                message
                    .delivery
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(conn_err)?;
                taken = Some(job);
            } else {
                seen.push(job);
            }
        }
        channel.close(200, "".into()).await.map_err(conn_err)?;
        Ok((seen, taken))
    }
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args
}

#[async_trait]
impl Broker for RabbitBroker {
    fn kind(&self) -> &'static str {
        "rabbitmq"
    }

    async fn declare_stage(&self, stage: &str, policy: &RetryPolicy) -> Result<(), BrokerError> {
        let channel = self.ops().await?;
        self.declare(&channel, &self.names.parked(stage), quorum_args())
            .await?;
        self.declare(&channel, &self.names.work(stage), quorum_args())
            .await?;
        // The priority lane: one more work queue. Its retries wait in the normal wait queues
        // and come back in the normal lane (every quorum queue costs the broker a Raft group,
        // so the lane does not double the wait queues); the next stage's job is a priority
        // job again, as the runner takes the lane from the application.
        self.declare(&channel, &self.names.priority(stage), quorum_args())
            .await?;
        let work = self.names.work(stage);
        for (step, delay) in policy.delays.iter().enumerate() {
            let mut args = quorum_args();
            let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString("".into()),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(work.as_str().into()),
            );
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
            self.declare(&channel, &self.names.retry(stage, step), args)
                .await?;
        }
        self.retry_steps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(stage.to_owned(), policy.delays.len());
        Ok(())
    }

    async fn publish(&self, job: &Job) -> Result<(), BrokerError> {
        let queue = if job.priority {
            self.names.priority(&job.stage)
        } else {
            self.names.work(&job.stage)
        };
        self.publish_to(&queue, job).await
    }

    async fn publish_retry(&self, job: &Job, step: usize) -> Result<(), BrokerError> {
        let steps = self
            .retry_steps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&job.stage)
            .copied()
            .ok_or_else(|| BrokerError::UnknownQueue(job.stage.clone()))?;
        let step = step.min(steps.saturating_sub(1));
        self.publish_to(&self.names.retry(&job.stage, step), job)
            .await
    }

    async fn publish_parked(&self, job: &Job) -> Result<(), BrokerError> {
        self.publish_to(&self.names.parked(&job.stage), job).await
    }

    async fn consume(&self, stage: &str, prefetch: u16) -> Result<Box<dyn JobStream>, BrokerError> {
        let subscription = Subscription {
            links: self.links.clone(),
            names: self.names.clone(),
            stage: stage.to_owned(),
            prefetch,
        };
        let lanes = subscription.open().await?;
        Ok(Box::new(RabbitStream {
            subscription,
            lanes: Some(lanes),
        }))
    }

    async fn depth(&self, stage: &str) -> Result<QueueDepth, BrokerError> {
        let known_steps = self
            .retry_steps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(stage)
            .copied();
        // A process that does not consume the stage (serve, `cardpipe ops`) has not
        // declared its queues: it reads them passively, and a missing work queue means
        // nobody ever declared the stage.
        let ready = match (
            self.message_count(&self.names.work(stage)).await,
            self.message_count(&self.names.priority(stage)).await,
        ) {
            (Ok(work), Ok(priority)) => work + priority,
            (Err(e), _) | (_, Err(e)) if known_steps.is_some() => return Err(e),
            _ => return Err(BrokerError::UnknownQueue(stage.to_owned())),
        };
        let mut retrying = 0;
        match known_steps {
            Some(steps) => {
                for step in 0..steps {
                    retrying += self.message_count(&self.names.retry(stage, step)).await?;
                }
            }
            // The retry queues are numbered from 0 without gaps: read until one is missing.
            None => {
                for step in 0..MAX_DISCOVERED_RETRY_STEPS {
                    match self.message_count(&self.names.retry(stage, step)).await {
                        Ok(n) => retrying += n,
                        Err(_) => break,
                    }
                }
            }
        }
        Ok(QueueDepth {
            ready,
            retrying,
            parked: self.message_count(&self.names.parked(stage)).await?,
        })
    }

    async fn parked(&self, stage: &str) -> Result<Vec<Job>, BrokerError> {
        Ok(self.browse(&self.names.parked(stage), None).await?.0)
    }

    async fn take_parked(&self, stage: &str, job_id: &str) -> Result<Option<Job>, BrokerError> {
        Ok(self
            .browse(&self.names.parked(stage), Some(job_id))
            .await?
            .1)
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        if self.links.current().connection.status().connected() {
            Ok(())
        } else {
            Err(BrokerError::Connection("not connected".into()))
        }
    }
}

/// What a consumer needs to subscribe again on a new connection.
struct Subscription {
    links: Arc<Links>,
    names: QueueNames,
    stage: String,
    prefetch: u16,
}

impl Subscription {
    /// Subscribes to both lanes of the stage on a channel of its own.
    async fn open(&self) -> Result<Lanes, BrokerError> {
        let channel = self.links.channel().await?;
        channel
            .basic_qos(self.prefetch.max(1), BasicQosOptions { global: false })
            .await
            .map_err(conn_err)?;
        // One consumer per lane on the same channel, each with its own prefetch.
        let stage = &self.stage;
        let mut lanes = Vec::with_capacity(2);
        for (queue, lane) in [
            (self.names.priority(stage), "priority"),
            (self.names.work(stage), "normal"),
        ] {
            lanes.push(
                channel
                    .basic_consume(
                        queue.into(),
                        format!("cardpipe-{stage}-{lane}-{}", uuid::Uuid::new_v4()).into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(conn_err)?,
            );
        }
        let normal = lanes.pop().expect("two lanes");
        let priority = lanes.pop().expect("two lanes");
        Ok(Lanes {
            channel,
            priority,
            normal,
        })
    }
}

struct Lanes {
    channel: Channel,
    priority: lapin::Consumer,
    normal: lapin::Consumer,
}

impl Drop for Lanes {
    fn drop(&mut self) {
        // Closing the channel hands unacknowledged deliveries back to the queue.
        let channel = self.channel.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = channel.close(200, "consumer dropped".into()).await;
            });
        }
    }
}

struct RabbitStream {
    subscription: Subscription,
    /// `None` after the connection under them died, until subscribed again.
    lanes: Option<Lanes>,
}

#[async_trait]
impl JobStream for RabbitStream {
    async fn next(&mut self) -> Option<Result<Delivery, BrokerError>> {
        loop {
            let lanes = match &mut self.lanes {
                Some(lanes) => lanes,
                None => {
                    if self.subscription.links.closed.load(Ordering::SeqCst) {
                        return None;
                    }
                    match self.subscription.open().await {
                        Ok(lanes) => {
                            tracing::warn!(
                                stage = %self.subscription.stage,
                                "consumer subscribed again on a new broker connection"
                            );
                            self.lanes.insert(lanes)
                        }
                        Err(err) => return Some(Err(err)),
                    }
                }
            };
            // Biased: whenever the priority lane has a delivery, it goes first. Polling a
            // lapin consumer stream is cancel-safe (a delivery is only taken when returned).
            let next = tokio::select! {
                biased;
                d = lanes.priority.next() => d,
                d = lanes.normal.next() => d,
            };
            let Some(next) = next else {
                // The consumer ended: its channel or connection closed for good. Unless the
                // broker was closed on purpose, subscribe again.
                self.lanes = None;
                continue;
            };
            match next {
                Ok(delivery) => {
                    let job = match Job::from_bytes(&delivery.data) {
                        Ok(job) => job,
                        Err(err) => {
                            // Not ours: drop it rather than loop on it forever.
                            tracing::error!(error = %err, "dropping malformed message");
                            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                            continue;
                        }
                    };
                    let redelivered = delivery.redelivered;
                    return Some(Ok(Delivery::new(
                        job,
                        redelivered,
                        Box::new(RabbitAcker(delivery.acker)),
                    )));
                }
                Err(err) => {
                    tracing::warn!(error = %err, "consumer interrupted; waiting for broker recovery");
                    if lanes.channel.wait_for_recovery(err).await.is_err() {
                        // lapin will not recover this channel: a new subscription, on a new
                        // connection if the old one is dead.
                        self.lanes = None;
                        if !self.subscription.links.current().is_dead()
                            && !self.subscription.links.closed.load(Ordering::SeqCst)
                        {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            }
        }
    }
}

struct RabbitAcker(lapin::Acker);

#[async_trait]
impl Acker for RabbitAcker {
    async fn ack(&self) -> Result<bool, BrokerError> {
        self.0
            .ack(BasicAckOptions::default())
            .await
            .map_err(conn_err)
    }

    async fn requeue(&self) -> Result<bool, BrokerError> {
        self.0
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
            .map_err(conn_err)
    }
}
