//! Workers reconnect on their own after the broker connection drops (as on a
//! broker restart): a TCP proxy between the worker and RabbitMQ severs every
//! connection mid-run; all work still finishes exactly once.

use std::sync::Arc;
use std::time::Duration;

use cardpipe_common::broker::Job;
use cardpipe_common::domain::{ApplicationId, ApplicationState, Priority};
use cardpipe_common::runtime::pipeline;
use cardpipe_common::runtime::relay::Relay;
use cardpipe_common::runtime::{Stage, StageSettings};
use cardpipe_common::store::{NewApplication, Store};
use cardpipe_common::testing::stages::StepStage;
use cardpipe_common::testing::{self, Mode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_resume_after_the_broker_connection_drops() {
    let (mut services, _guard) = testing::services(Mode::Distributed, None).await;
    let proxy = testing::AmqpProxy::start().await;
    let url = proxy.url.clone();
    services.broker =
        Arc::new(testing::rabbit_broker_with_prefix(&url, &testing::unique("cardpipe-rc-")).await);

    let n = 300;
    let now = time::OffsetDateTime::now_utc();
    let mut tx = services.store.begin().await.expect("begin");
    let mut ids = Vec::new();
    for i in 0..n {
        let id = ApplicationId::generate();
        let app = NewApplication {
            id: id.clone(),
            registry_id: format!("RC-{i}"),
            batch_id: None,
            state: ApplicationState::DedupPending,
            priority: Priority::Normal,
        };
        Store::insert_application(&mut tx, &app, "registry:test", now)
            .await
            .expect("insert");
        Store::enqueue_job(&mut tx, &Job::new("alpha", id.as_str()), now)
            .await
            .expect("job");
        ids.push(id);
    }
    tx.commit().await.expect("commit");

    let mut slow = StepStage::new(
        "alpha",
        &[ApplicationState::DedupPending],
        ApplicationState::DedupClear,
        None,
    );
    slow.work = Duration::from_millis(10);
    let stages: Vec<(Arc<dyn Stage>, StageSettings)> =
        vec![(Arc::new(slow), StageSettings::default())];
    let relay = Relay::new(services.clone())
        .with_poll_interval(Duration::from_millis(50))
        .with_claim(Duration::from_secs(1));
    let running = pipeline::start(&services, stages, relay, Duration::from_secs(10))
        .await
        .expect("start");

    let count = |services: cardpipe_common::runtime::Services| async move {
        services
            .store
            .count_by_state()
            .await
            .unwrap()
            .into_iter()
            .find(|(s, _)| *s == ApplicationState::DedupClear)
            .map_or(0, |(_, n)| n)
    };
    while count(services.clone()).await < 50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.cut_all(); // the broker "restarts": every connection drops
    let at_cut = count(services.clone()).await;
    assert!(at_cut < n as i64, "the cut came mid-run");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while count(services.clone()).await < n as i64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stuck at {} of {n} after the connection dropped",
            count(services.clone()).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.shutdown().await.expect("shutdown");
    for id in &ids {
        assert_eq!(
            services.store.history(id).await.expect("history").len(),
            2,
            "exactly one transition for {id}"
        );
    }
}

/// lapin's own recovery can give up: its backoff runs out, or a cut lands in the middle of
/// its re-handshake ("unexpected connection open-ok", seen in a chaos run), and the
/// connection ends closed or in error with nothing to bring it back. The broker opens a new
/// connection: a publish goes through, a consumer subscribed before the fault receives the
/// job published after it, and ping (readiness) is healthy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lapin_gave_up_on_is_replaced() {
    use cardpipe_common::broker::{Broker, RetryPolicy};

    let broker = testing::rabbit_broker().await;
    broker
        .declare_stage("alpha", &RetryPolicy::default())
        .await
        .expect("declare");
    let mut stream = broker.consume("alpha", 4).await.expect("consume");
    let mut receive = async || loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
            Ok(Some(Ok(delivery))) => return delivery,
            Ok(Some(Err(_))) => continue, // not subscribed again yet
            Ok(None) => panic!("the consumer ended"),
            Err(_) => panic!("nothing received within 30 s"),
        }
    };
    broker
        .publish(&Job::new("alpha", "before"))
        .await
        .expect("publish");
    let delivery = receive().await;
    assert_eq!(delivery.job.subject, "before");
    delivery.ack().await.expect("ack");

    broker.break_connection().await;
    assert!(
        broker.ping().await.is_err(),
        "the dead connection is not ready"
    );

    broker
        .publish(&Job::new("alpha", "after"))
        .await
        .expect("a publish after the fault goes out on a new connection");
    broker.ping().await.expect("ready again");
    let delivery = receive().await;
    assert_eq!(delivery.job.subject, "after");
    assert!(!delivery.redelivered);
    delivery.ack().await.expect("ack on the new connection");
    broker.close().await;
}
