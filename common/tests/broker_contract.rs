//! One broker contract, run against the in-process broker and RabbitMQ.

use std::sync::Arc;
use std::time::Duration;

use cardpipe_common::broker::memory::MemoryBroker;
use cardpipe_common::broker::{Broker, Job, RetryPolicy};
use cardpipe_common::testing;

const STAGE: &str = "contract";

fn policy() -> RetryPolicy {
    RetryPolicy {
        delays: vec![Duration::from_millis(300), Duration::from_millis(600)],
        max_attempts: 3,
    }
}

async fn declared(broker: Arc<dyn Broker>) -> Arc<dyn Broker> {
    broker
        .declare_stage(STAGE, &policy())
        .await
        .expect("declare");
    broker
}

async fn next(
    stream: &mut Box<dyn cardpipe_common::broker::JobStream>,
) -> cardpipe_common::broker::Delivery {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a delivery within 10 s")
        .expect("stream open")
        .expect("delivery ok")
}

async fn nothing_within(stream: &mut Box<dyn cardpipe_common::broker::JobStream>, ms: u64) {
    let got = tokio::time::timeout(Duration::from_millis(ms), stream.next()).await;
    assert!(
        got.is_err(),
        "expected no delivery, got {:?}",
        got.map(|d| d.map(|d| d.map(|d| d.job)))
    );
}

async fn eventually_depth(broker: &Arc<dyn Broker>, ready: u64, retrying: u64, parked: u64) {
    let mut last = None;
    for _ in 0..50 {
        let d = broker.depth(STAGE).await.expect("depth");
        if (d.ready, d.retrying, d.parked) == (ready, retrying, parked) {
            return;
        }
        last = Some(d);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("depth never reached ready={ready} retrying={retrying} parked={parked}: {last:?}");
}

async fn publish_consume_ack(broker: Arc<dyn Broker>) {
    let broker = declared(broker).await;
    let job = Job::new(STAGE, "app-1");
    broker.publish(&job).await.expect("publish");
    let mut stream = broker.consume(STAGE, 4).await.expect("consume");
    let delivery = next(&mut stream).await;
    assert_eq!(delivery.job, job);
    assert!(!delivery.redelivered);
    assert!(delivery.ack().await.expect("ack"));
    nothing_within(&mut stream, 300).await;
    eventually_depth(&broker, 0, 0, 0).await;
}

async fn unacked_work_returns_when_consumer_goes(broker: Arc<dyn Broker>) {
    let broker = declared(broker).await;
    broker
        .publish(&Job::new(STAGE, "app-2"))
        .await
        .expect("publish");
    {
        let mut stream = broker.consume(STAGE, 4).await.expect("consume");
        let delivery = next(&mut stream).await;
        assert_eq!(delivery.job.subject, "app-2");
        // Dropped without ack: the consumer "crashes".
        drop(delivery);
    }
    let mut stream = broker.consume(STAGE, 4).await.expect("consume again");
    let again = next(&mut stream).await;
    assert_eq!(again.job.subject, "app-2");
    assert!(again.redelivered, "a redelivery is flagged");
    assert!(again.ack().await.expect("ack"));
}

async fn requeue_redelivers(broker: Arc<dyn Broker>) {
    let broker = declared(broker).await;
    broker
        .publish(&Job::new(STAGE, "app-3"))
        .await
        .expect("publish");
    let mut stream = broker.consume(STAGE, 4).await.expect("consume");
    let first = next(&mut stream).await;
    assert!(first.requeue().await.expect("requeue"));
    let again = next(&mut stream).await;
    assert_eq!(again.job.subject, "app-3");
    assert!(again.redelivered);
    again.ack().await.expect("ack");
}

async fn prefetch_bounds_unacked(broker: Arc<dyn Broker>) {
    let broker = declared(broker).await;
    for i in 0..5 {
        broker
            .publish(&Job::new(STAGE, format!("p-{i}")))
            .await
            .expect("publish");
    }
    let mut stream = broker.consume(STAGE, 2).await.expect("consume");
    let a = next(&mut stream).await;
    let b = next(&mut stream).await;
    nothing_within(&mut stream, 400).await;
    a.ack().await.expect("ack");
    let c = next(&mut stream).await;
    for d in [b, c] {
        d.ack().await.expect("ack");
    }
    for _ in 0..2 {
        next(&mut stream).await.ack().await.expect("ack");
    }
}

async fn retry_waits_its_delay(broker: Arc<dyn Broker>) {
    let broker = declared(broker).await;
    let mut job = Job::new(STAGE, "r-1");
    job.attempt = 2;
    broker.publish_retry(&job, 1).await.expect("publish retry");
    let mut stream = broker.consume(STAGE, 4).await.expect("consume");
    let started = std::time::Instant::now();
    nothing_within(&mut stream, 250).await;
    let delivery = next(&mut stream).await;
    assert!(
        started.elapsed() >= Duration::from_millis(550),
        "retry step 1 waits its 600 ms delay"
    );
    assert_eq!(delivery.job.attempt, 2);
    delivery.ack().await.expect("ack");
}

async fn parking_keeps_jobs_for_operators(broker: Arc<dyn Broker>) {
    let broker = declared(broker).await;
    let mut a = Job::new(STAGE, "park-a");
    a.last_error = Some("boom".into());
    let b = Job::new(STAGE, "park-b");
    broker.publish_parked(&a).await.expect("park a");
    broker.publish_parked(&b).await.expect("park b");
    eventually_depth(&broker, 0, 0, 2).await;
    let mut parked = broker.parked(STAGE).await.expect("list");
    parked.sort_by(|x, y| x.subject.cmp(&y.subject));
    assert_eq!(parked, vec![a.clone(), b.clone()]);
    // Listing leaves them parked.
    eventually_depth(&broker, 0, 0, 2).await;
    assert_eq!(
        broker.take_parked(STAGE, &a.id).await.expect("take"),
        Some(a.clone())
    );
    assert_eq!(
        broker.take_parked(STAGE, &a.id).await.expect("take again"),
        None
    );
    assert_eq!(broker.parked(STAGE).await.expect("list"), vec![b]);
}

async fn priority_jobs_overtake_waiting_work(broker: Arc<dyn Broker>) {
    let broker = declared(broker).await;
    for i in 0..4 {
        broker
            .publish(&Job::new(STAGE, format!("n-{i}")))
            .await
            .expect("publish");
    }
    let mut stream = broker.consume(STAGE, 1).await.expect("consume");
    let first = next(&mut stream).await;
    assert_eq!(first.job.subject, "n-0");
    // A reprint arrives behind three waiting jobs, then more normal work behind it.
    let urgent = Job::new(STAGE, "reprint").with_priority(true);
    broker.publish(&urgent).await.expect("publish priority");
    broker
        .publish(&Job::new(STAGE, "n-4"))
        .await
        .expect("publish");
    // (RabbitMQ pushes it to the lane's consumer ahead of time; give it the moment.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.ack().await.expect("ack");
    let d = next(&mut stream).await;
    assert_eq!(
        d.job, urgent,
        "the priority job goes before the waiting ones"
    );
    assert!(d.job.priority, "priority survives the wire");
    // A retried priority job waits in the normal wait queues.
    let mut again = d.job.clone();
    again.attempt = 2;
    d.ack().await.expect("ack");
    broker.publish_retry(&again, 0).await.expect("retry");
    let mut rest = Vec::new();
    for _ in 0..5 {
        let d = next(&mut stream).await;
        rest.push(d.job.subject.clone());
        d.ack().await.expect("ack");
    }
    // Retries come back in the normal lane, behind the waiting work.
    assert_eq!(rest, ["n-1", "n-2", "n-3", "n-4", "reprint"]);
    eventually_depth(&broker, 0, 0, 0).await;
}

async fn unknown_stage_is_an_error(broker: Arc<dyn Broker>) {
    let err = broker.publish(&Job::new("never-declared", "x")).await;
    assert!(
        err.is_err(),
        "publishing to an undeclared stage must fail, not vanish"
    );
}

macro_rules! contract {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;
            #[tokio::test]
            async fn publish_consume_ack() {
                super::publish_consume_ack($make).await
            }
            #[tokio::test]
            async fn unacked_work_returns_when_consumer_goes() {
                super::unacked_work_returns_when_consumer_goes($make).await
            }
            #[tokio::test]
            async fn requeue_redelivers() {
                super::requeue_redelivers($make).await
            }
            #[tokio::test]
            async fn prefetch_bounds_unacked() {
                super::prefetch_bounds_unacked($make).await
            }
            #[tokio::test]
            async fn retry_waits_its_delay() {
                super::retry_waits_its_delay($make).await
            }
            #[tokio::test]
            async fn parking_keeps_jobs_for_operators() {
                super::parking_keeps_jobs_for_operators($make).await
            }
            #[tokio::test]
            async fn priority_jobs_overtake_waiting_work() {
                super::priority_jobs_overtake_waiting_work($make).await
            }
            #[tokio::test]
            async fn unknown_stage_is_an_error() {
                super::unknown_stage_is_an_error($make).await
            }
        }
    };
}

contract!(memory, Arc::new(MemoryBroker::new()) as Arc<dyn Broker>);
contract!(
    rabbitmq,
    Arc::new(testing::rabbit_broker().await) as Arc<dyn Broker>
);

/// A process that does not consume a stage (serve, `cardpipe ops`) still reads its queue
/// depths from RabbitMQ: the work, retry and parking queues declared by a worker.
#[tokio::test]
async fn rabbitmq_depths_are_readable_by_a_process_that_did_not_declare_the_stage() {
    let prefix = testing::unique("cardpipe-depth-");
    let url = testing::amqp_url();
    let worker: Arc<dyn Broker> = Arc::new(testing::rabbit_broker_with_prefix(&url, &prefix).await);
    // Long retry delays: the retried job stays in its wait queue while we look.
    let slow = RetryPolicy {
        delays: vec![Duration::from_secs(600), Duration::from_secs(600)],
        max_attempts: 3,
    };
    worker.declare_stage(STAGE, &slow).await.expect("declare");
    for i in 0..2 {
        worker
            .publish(&Job::new(STAGE, format!("ready-{i}")))
            .await
            .expect("publish");
    }
    let mut parked = Job::new(STAGE, "parked");
    parked.last_error = Some("boom".into());
    worker.publish_parked(&parked).await.expect("park");
    let mut retried = Job::new(STAGE, "retried");
    retried.attempt = 2;
    worker.publish_retry(&retried, 1).await.expect("retry");

    let observer: Arc<dyn Broker> =
        Arc::new(testing::rabbit_broker_with_prefix(&url, &prefix).await);
    let d = observer
        .depth(STAGE)
        .await
        .expect("depth without declaring");
    assert_eq!((d.ready, d.parked), (2, 1), "{d:?}");
    assert_eq!(d.retrying, 1, "the retry queue is found: {d:?}");
    assert!(
        observer.depth("never-declared").await.is_err(),
        "a stage nobody declared is an error, not zeros"
    );
}

/// A benchmark's topology deletes its queues when it stops: every queue of a stage (work,
/// priority lane, parked, retry waits) goes, another prefix's stay.
#[tokio::test]
async fn rabbitmq_stage_queues_are_deleted_under_their_prefix_only() {
    let url = testing::amqp_url();
    let ours = testing::rabbit_broker_with_prefix(&url, &testing::unique("cardpipe-del-")).await;
    let theirs = testing::rabbit_broker_with_prefix(&url, &testing::unique("cardpipe-keep-")).await;
    let policy = RetryPolicy {
        delays: vec![Duration::from_secs(600), Duration::from_secs(600)],
        max_attempts: 3,
    };
    ours.declare_stage(STAGE, &policy).await.expect("declare");
    theirs.declare_stage(STAGE, &policy).await.expect("declare");
    ours.publish(&Job::new(STAGE, "left-over"))
        .await
        .expect("publish");

    // work, priority, parked and two retry waits
    assert_eq!(ours.delete_stage_queues(STAGE).await.expect("delete"), 5);
    assert!(
        ours.depth(STAGE).await.is_err(),
        "the stage's queues are gone"
    );
    assert_eq!(
        ours.delete_stage_queues(STAGE).await.expect("delete again"),
        0,
        "deleting again finds nothing"
    );
    theirs
        .depth(STAGE)
        .await
        .expect("another prefix's queues stay");
}
