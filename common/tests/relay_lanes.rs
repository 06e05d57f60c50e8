//! The outbox relay's lanes, timeouts, fencing and dead letters, on both backend families
//! (SQLite + in-process broker, PostgreSQL + RabbitMQ): a hung webhook does not hold back
//! job hand-off, a slow delivery is cut off by its lane's timeout, two relays sharing the
//! table never deliver a row twice, and a row that can never be delivered goes to the dead
//! letters, from where a supervisor re-queues it (audited).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cardpipe_common::audit;
use cardpipe_common::broker::{Job, RetryPolicy};
use cardpipe_common::runtime::Services;
use cardpipe_common::runtime::relay::{Lane, LaneSettings, OutboxSink, PermanentFailure, Relay};
use cardpipe_common::store::{OutboxRow, Store};
use cardpipe_common::testing::{self, Mode};
use sqlx::Row;
use tokio_util::sync::CancellationToken;

const CALLBACK: &str = "test.callback";

/// How a test sink behaves.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Never answers (a hung webhook).
    Hang,
    /// Answers after this long.
    Slow(Duration),
    /// Fails every time, transiently.
    Fail,
    /// Refuses as malformed (permanent).
    Refuse,
}

/// An external sink recording completed deliveries by message id.
struct TestSink {
    behaviour: Behaviour,
    started: AtomicUsize,
    delivered: Mutex<HashMap<String, usize>>,
}

impl TestSink {
    fn new(behaviour: Behaviour) -> Arc<Self> {
        Arc::new(Self {
            behaviour,
            started: AtomicUsize::new(0),
            delivered: Mutex::new(HashMap::new()),
        })
    }

    fn delivered(&self) -> HashMap<String, usize> {
        self.delivered.lock().unwrap().clone()
    }
}

#[async_trait]
impl OutboxSink for TestSink {
    async fn deliver(&self, row: &OutboxRow) -> anyhow::Result<()> {
        self.started.fetch_add(1, Ordering::SeqCst);
        match self.behaviour {
            Behaviour::Hang => std::future::pending::<()>().await,
            Behaviour::Slow(d) => tokio::time::sleep(d).await,
            Behaviour::Fail => anyhow::bail!("webhook answered 503 Service Unavailable"),
            Behaviour::Refuse => {
                return Err(PermanentFailure("webhook answered 422".into()).into());
            }
        }
        *self
            .delivered
            .lock()
            .unwrap()
            .entry(row.id.clone())
            .or_default() += 1;
        Ok(())
    }

    fn lane(&self) -> Lane {
        Lane::External
    }
}

async fn services(mode: Mode) -> (Services, Option<tempfile::TempDir>) {
    let (mut services, guard) = testing::services(mode, None).await;
    if mode == Mode::Distributed {
        let prefix = testing::unique("cardpipe-relay-");
        services.broker =
            Arc::new(testing::rabbit_broker_with_prefix(&testing::amqp_url(), &prefix).await);
    }
    // The stage the job rows are for (the in-process broker refuses undeclared queues).
    services
        .broker
        .declare_stage("alpha", &RetryPolicy::default())
        .await
        .expect("declare the test stage");
    (services, guard)
}

/// Writes `n` callback rows and `n` job rows (each on its own subject).
async fn enqueue(services: &Services, n: usize) {
    let now = services.clock.now();
    let mut tx = services.store.begin().await.expect("begin");
    for i in 0..n {
        let subject = format!("app-{i}");
        Store::enqueue_outbox(
            &mut tx,
            &testing::unique("cb-"),
            CALLBACK,
            &subject,
            r#"{"event":"test"}"#,
            now,
        )
        .await
        .expect("callback row");
        Store::enqueue_job(&mut tx, &Job::new("alpha", &subject), now)
            .await
            .expect("job row");
    }
    tx.commit().await.expect("commit");
}

/// Undelivered rows of `topic`.
async fn pending(services: &Services, topic: &str) -> i64 {
    sqlx::query("SELECT COUNT(*) AS n FROM outbox WHERE topic = $1 AND published_at IS NULL")
        .bind(topic)
        .fetch_one(services.store.pool())
        .await
        .expect("count")
        .try_get("n")
        .expect("n")
}

/// Waits (up to a generous bound that only catches a hang) until `done` holds.
async fn eventually<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A webhook that never answers holds only its own lane: every job row is handed to the
/// broker while the callback delivery is still hanging.
async fn a_hung_webhook_does_not_hold_back_job_hand_off(mode: Mode) {
    let (services, _guard) = services(mode).await;
    enqueue(&services, 20).await;
    let sink = TestSink::new(Behaviour::Hang);
    let relay = Relay::new(services.clone())
        .with_poll_interval(Duration::from_millis(20))
        .with_lane(
            Lane::External,
            LaneSettings::EXTERNAL.with_timeout(Duration::from_secs(600)),
        )
        .with_sink(CALLBACK, sink.clone());
    let stop = CancellationToken::new();
    let running = tokio::spawn(relay.run(stop.clone(), Duration::from_millis(100)));
    eventually("every job row delivered", || async {
        pending(&services, "job").await == 0
    })
    .await;
    assert!(
        sink.started.load(Ordering::SeqCst) >= 1,
        "the callback lane is busy with the hung webhook"
    );
    assert!(
        sink.delivered().is_empty(),
        "the hung webhook never answered"
    );
    assert_eq!(pending(&services, CALLBACK).await, 20);
    stop.cancel();
    running.await.expect("join").expect("relay");
}

/// A delivery slower than the lane's timeout counts as a failure, retried later.
async fn a_slow_delivery_is_cut_off_by_the_lane_timeout(mode: Mode) {
    let (services, _guard) = services(mode).await;
    enqueue(&services, 1).await;
    let sink = TestSink::new(Behaviour::Hang);
    let relay = Relay::new(services.clone())
        .with_lane(
            Lane::External,
            LaneSettings::EXTERNAL.with_timeout(Duration::from_millis(200)),
        )
        .with_sink(CALLBACK, sink.clone());
    relay.drain_lane(Lane::External).await.expect("round");
    let row = sqlx::query(
        "SELECT attempts, last_error, claimed_by, published_at FROM outbox WHERE topic = $1",
    )
    .bind(CALLBACK)
    .fetch_one(services.store.pool())
    .await
    .expect("row");
    assert_eq!(row.try_get::<i64, _>("attempts").unwrap(), 1);
    let error: String = row.try_get("last_error").unwrap();
    assert!(
        error.contains("no answer within") && error.contains("external"),
        "{error}"
    );
    assert!(
        row.try_get::<Option<String>, _>("claimed_by")
            .unwrap()
            .is_none()
    );
    assert!(
        row.try_get::<Option<String>, _>("published_at")
            .unwrap()
            .is_none()
    );
}

/// Two relays share the table with slow deliveries and short claims: every row is
/// delivered exactly once (a relay never starts a delivery it cannot record before its
/// claim ends, gives the rest back, and its updates are fenced).
async fn two_relays_deliver_each_callback_once(mode: Mode) {
    let (services, _guard) = services(mode).await;
    enqueue(&services, 12).await;
    let sink = TestSink::new(Behaviour::Slow(Duration::from_millis(300)));
    let stop = CancellationToken::new();
    let mut running = Vec::new();
    for _ in 0..2 {
        let relay = Relay::new(services.clone())
            .with_poll_interval(Duration::from_millis(20))
            .with_lane(
                Lane::External,
                LaneSettings {
                    claim: Duration::from_millis(1500),
                    batch: 12,
                    timeout: Duration::from_secs(1),
                },
            )
            .with_sink(CALLBACK, sink.clone());
        running.push(tokio::spawn(
            relay.run(stop.clone(), Duration::from_millis(100)),
        ));
    }
    eventually("every callback delivered", || async {
        pending(&services, CALLBACK).await == 0
    })
    .await;
    stop.cancel();
    for r in running {
        r.await.expect("join").expect("relay");
    }
    let delivered = sink.delivered();
    assert_eq!(delivered.len(), 12, "every callback delivered");
    assert!(
        delivered.values().all(|n| *n == 1),
        "no callback delivered twice: {delivered:?}"
    );
}

/// A refused row goes to the dead letters at once; a transiently failing one after the
/// configured attempts; a supervisor re-queues one (audited) and it is delivered.
async fn undeliverable_rows_become_dead_letters_and_come_back(mode: Mode) {
    let (services, _guard) = services(mode).await;
    enqueue(&services, 2).await;
    let refuse = TestSink::new(Behaviour::Refuse);
    Relay::new(services.clone())
        .with_sink(CALLBACK, refuse.clone())
        .drain_lane(Lane::External)
        .await
        .expect("round");
    let letters = services.store.dead_letters(10).await.expect("list");
    assert_eq!(letters.len(), 2, "both refused rows given up at once");
    assert!(letters.iter().all(|d| d.attempts == 1));
    assert!(
        letters[0].last_error.contains("422"),
        "{}",
        letters[0].last_error
    );
    assert_eq!(pending(&services, CALLBACK).await, 0);

    // Transient failures: given up after max_attempts (1 here).
    let fail = TestSink::new(Behaviour::Fail);
    let mut tx = services.store.begin().await.expect("begin");
    Store::enqueue_outbox(
        &mut tx,
        "cb-transient",
        CALLBACK,
        "app-x",
        "{}",
        services.clock.now(),
    )
    .await
    .expect("row");
    tx.commit().await.expect("commit");
    Relay::new(services.clone())
        .with_sink(CALLBACK, fail.clone())
        .with_max_attempts(1)
        .drain_lane(Lane::External)
        .await
        .expect("round");
    assert_eq!(services.store.dead_letter_count().await.expect("count"), 3);

    // Re-queued by a supervisor: delivered by a working sink, and audited.
    let seq = letters[0].seq;
    let requeued = cardpipe_common::dead_letters::requeue(&services, seq, ("sup", "supervisor"))
        .await
        .expect("requeue");
    assert_eq!(requeued.seq, seq);
    assert!(matches!(
        cardpipe_common::dead_letters::requeue(&services, seq, ("sup", "supervisor")).await,
        Err(cardpipe_common::dead_letters::DeadLetterError::NotFound(_))
    ));
    let ok = TestSink::new(Behaviour::Slow(Duration::ZERO));
    Relay::new(services.clone())
        .with_sink(CALLBACK, ok.clone())
        .drain_lane(Lane::External)
        .await
        .expect("round");
    assert_eq!(ok.delivered().get(&requeued.id), Some(&1));
    let discarded = cardpipe_common::dead_letters::discard(
        &services,
        letters[1].seq,
        ("sup", "supervisor"),
        "registry withdrew the application",
    )
    .await
    .expect("discard");
    assert_eq!(discarded.seq, letters[1].seq);
    assert_eq!(services.store.dead_letter_count().await.expect("count"), 1);
    let entries = audit::recent(&services.store, None, 10)
        .await
        .expect("audit");
    let actions: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
    assert!(
        actions.contains(&"outbox.dead_letter.requeue"),
        "{actions:?}"
    );
    assert!(
        actions.contains(&"outbox.dead_letter.discard"),
        "{actions:?}"
    );
    assert!(
        audit::verify(&services.store)
            .await
            .expect("verify")
            .intact()
    );
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Mode::Embedded).await
            })*
        }
        mod distributed {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Mode::Distributed).await
            })*
        }
    };
}

both!(
    a_hung_webhook_does_not_hold_back_job_hand_off,
    a_slow_delivery_is_cut_off_by_the_lane_timeout,
    two_relays_deliver_each_callback_once,
    undeliverable_rows_become_dead_letters_and_come_back,
);
