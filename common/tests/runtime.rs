//! The stage runtime on both backend families: every job done exactly once,
//! through crashes at every step, retries, parking and graceful shutdown.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cardpipe_common::broker::memory::MemoryBroker;
use cardpipe_common::broker::{Job, RetryPolicy};
use cardpipe_common::domain::{ApplicationId, ApplicationState, Priority};
use cardpipe_common::runtime::pipeline::{self, RunningPipeline};
use cardpipe_common::runtime::relay::Relay;
use cardpipe_common::runtime::{
    FailPoint, FailPoints, Services, Stage, StageRunner, StageSettings, parked,
};
use cardpipe_common::store::{NewApplication, Store};
use cardpipe_common::telemetry::metrics::JobOutcome;
use cardpipe_common::testing::stages::StepStage;
use cardpipe_common::testing::{self, Mode};
use sqlx::Row;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const ALPHA_FROM: &[ApplicationState] = &[ApplicationState::DedupPending];
const BETA_FROM: &[ApplicationState] = &[ApplicationState::DedupClear];

struct Env {
    services: Services,
    mode: Mode,
    rabbit: Option<(testing::AmqpProxy, String)>,
    _guard: Option<tempfile::TempDir>,
}

async fn env(mode: Mode) -> Env {
    let (mut services, guard) = testing::services(mode, None).await;
    let rabbit = if mode == Mode::Distributed {
        let prefix = testing::unique("cardpipe-rt-");
        let proxy = testing::AmqpProxy::start().await;
        services.broker = Arc::new(testing::rabbit_broker_with_prefix(&proxy.url, &prefix).await);
        Some((proxy, prefix))
    } else {
        None
    };
    Env {
        services,
        mode,
        rabbit,
        _guard: guard,
    }
}

impl Env {
    /// The process died: its broker connection (or in-process broker) is gone.
    async fn restart_broker(&mut self) {
        match self.mode {
            Mode::Embedded => self.services.broker = Arc::new(MemoryBroker::new()),
            Mode::Distributed => {
                // The dead process's connections drop at once (as after a
                // SIGKILL); the new process connects afresh.
                let (old, prefix) = self.rabbit.take().expect("rabbit");
                old.kill();
                let proxy = testing::AmqpProxy::start().await;
                self.services.broker =
                    Arc::new(testing::rabbit_broker_with_prefix(&proxy.url, &prefix).await);
                self.rabbit = Some((proxy, prefix));
            }
        }
    }
}

fn settings(max_attempts: u32) -> StageSettings {
    StageSettings {
        concurrency: 4,
        prefetch: 8,
        retry: RetryPolicy {
            delays: vec![Duration::from_millis(100), Duration::from_millis(200)],
            max_attempts,
        },
    }
}

fn alpha() -> StepStage {
    StepStage::new(
        "alpha",
        ALPHA_FROM,
        ApplicationState::DedupClear,
        Some("beta"),
    )
}

fn beta() -> StepStage {
    let mut beta = StepStage::new("beta", BETA_FROM, ApplicationState::KeysIssued, None);
    beta.write_artifact = true;
    beta
}

/// Inserts `n` applications ready for `alpha`, with their jobs in the outbox.
async fn seed(services: &Services, n: usize) -> Vec<ApplicationId> {
    let mut ids = Vec::new();
    let now = time::OffsetDateTime::now_utc();
    let mut tx = services.store.begin().await.expect("begin");
    for i in 0..n {
        let id = ApplicationId::generate();
        let app = NewApplication {
            id: id.clone(),
            registry_id: format!("R-{i}-{id}"),
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
    ids
}

fn relay(services: &Services) -> Relay {
    Relay::new(services.clone())
        .with_poll_interval(Duration::from_millis(50))
        .with_claim(Duration::from_secs(1))
}

async fn start(
    services: &Services,
    stages: Vec<Arc<dyn Stage>>,
    max_attempts: u32,
) -> RunningPipeline {
    let with = stages
        .into_iter()
        .map(|s| (s, settings(max_attempts)))
        .collect();
    pipeline::start(services, with, relay(services), Duration::from_secs(10))
        .await
        .expect("start")
}

async fn count_in(services: &Services, state: ApplicationState) -> i64 {
    services
        .store
        .count_by_state()
        .await
        .expect("counts")
        .into_iter()
        .find(|(s, _)| *s == state)
        .map_or(0, |(_, n)| n)
}

async fn wait_for(services: &Services, state: ApplicationState, n: usize, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let got = count_in(services, state).await;
        if got == n as i64 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {got} of {n} applications reached {state}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Exactly once: three history rows per application, one job per hand-over,
/// one recorded artifact whose object exists.
async fn assert_exactly_once(services: &Services, ids: &[ApplicationId]) {
    for id in ids {
        let history = services.store.history(id).await.expect("history");
        let path: Vec<_> = history.iter().map(|h| h.to_state).collect();
        assert_eq!(
            path,
            vec![
                ApplicationState::DedupPending,
                ApplicationState::DedupClear,
                ApplicationState::KeysIssued
            ],
            "history of {id}"
        );
        let jobs = sqlx::query(
            "SELECT payload FROM outbox WHERE subject = $1 AND topic = 'job' ORDER BY seq",
        )
        .bind(id.as_str())
        .fetch_all(services.store.pool())
        .await
        .expect("outbox");
        let stages: Vec<String> = jobs
            .iter()
            .map(|r| {
                serde_json::from_str::<Job>(&r.try_get::<String, _>("payload").unwrap())
                    .unwrap()
                    .stage
            })
            .collect();
        assert_eq!(
            stages,
            vec!["alpha".to_owned(), "beta".to_owned()],
            "hand-overs of {id}"
        );
        let key = services
            .store
            .artifact(id, "beta-output")
            .await
            .expect("artifact")
            .expect("recorded");
        let object = services
            .objects
            .get(&key)
            .await
            .expect("get")
            .expect("object exists");
        assert_eq!(object.as_ref(), id.as_str().as_bytes());
    }
}

async fn all_jobs_done_exactly_once(mode: Mode) {
    let env = env(mode).await;
    let ids = seed(&env.services, 200).await;
    let running = start(&env.services, vec![Arc::new(alpha()), Arc::new(beta())], 5).await;
    wait_for(
        &env.services,
        ApplicationState::KeysIssued,
        ids.len(),
        Duration::from_secs(60),
    )
    .await;
    running.shutdown().await.expect("shutdown");
    assert_exactly_once(&env.services, &ids).await;
    assert_eq!(
        env.services.metrics.jobs_total("alpha", JobOutcome::Done),
        200
    );
    assert_eq!(
        env.services.metrics.jobs_total("beta", JobOutcome::Done),
        200
    );
    let (pending, _) = env.services.store.outbox_backlog().await.expect("backlog");
    assert_eq!(pending, 0, "the outbox is flushed");
}

/// Crash at `point` (the process dies there), restart, and check that nothing
/// was lost and nothing visible happened twice.
async fn crash_and_restart(mode: Mode, point: FailPoint) {
    let mut env = env(mode).await;
    let ids = seed(&env.services, 30).await;
    let failpoints = FailPoints::none();
    failpoints.arm(point, 1);
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let relay = relay(&env.services).with_failpoints(failpoints.clone());
    let wakeup = relay.wakeup();
    for stage in [Arc::new(alpha()) as Arc<dyn Stage>, Arc::new(beta())] {
        env.services
            .broker
            .declare_stage(stage.name(), &settings(5).retry)
            .await
            .expect("declare");
        let runner = StageRunner::new(env.services.clone(), stage, settings(5))
            .with_failpoints(failpoints.clone())
            .with_relay_wakeup(wakeup.clone());
        tasks.spawn(runner.run(stop.clone()));
    }
    tasks.spawn(relay.run(stop.clone(), Duration::ZERO));
    let first = tokio::time::timeout(Duration::from_secs(30), tasks.join_next())
        .await
        .expect("the armed fail point fires")
        .expect("a task");
    assert!(
        first.expect("task ran").is_err(),
        "a task stopped at the fail point"
    );
    // The process dies: everything stops where it is.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    env.restart_broker().await;

    let running = start(&env.services, vec![Arc::new(alpha()), Arc::new(beta())], 5).await;
    wait_for(
        &env.services,
        ApplicationState::KeysIssued,
        ids.len(),
        Duration::from_secs(60),
    )
    .await;
    running.shutdown().await.expect("shutdown");
    assert_exactly_once(&env.services, &ids).await;
}

async fn retries_with_growing_delay_then_succeeds(mode: Mode) {
    let env = env(mode).await;
    let ids = seed(&env.services, 10).await;
    let mut flaky = beta();
    flaky.fail_first = 2;
    let running = start(&env.services, vec![Arc::new(alpha()), Arc::new(flaky)], 5).await;
    wait_for(
        &env.services,
        ApplicationState::KeysIssued,
        ids.len(),
        Duration::from_secs(60),
    )
    .await;
    running.shutdown().await.expect("shutdown");
    assert_eq!(
        env.services.metrics.jobs_total("beta", JobOutcome::Retried),
        20
    );
    assert_eq!(
        env.services.metrics.jobs_total("beta", JobOutcome::Done),
        10
    );
    assert_exactly_once(&env.services, &ids).await;
}

async fn parks_after_last_attempt_and_operator_retry_finishes(mode: Mode) {
    let env = env(mode).await;
    let ids = seed(&env.services, 4).await;
    let mut broken = beta();
    broken.fail_first = 100;
    let running = start(&env.services, vec![Arc::new(alpha()), Arc::new(broken)], 3).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while parked::list(&env.services, Some("beta"))
        .await
        .expect("parked")
        .len()
        < ids.len()
    {
        assert!(tokio::time::Instant::now() < deadline, "jobs never parked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.shutdown().await.expect("shutdown");
    let parked_jobs = parked::list(&env.services, Some("beta"))
        .await
        .expect("parked");
    assert!(
        parked_jobs
            .iter()
            .all(|p| p.attempt == 3 && p.error.contains("fails attempt 3")),
        "{parked_jobs:?}"
    );
    assert_eq!(
        env.services
            .broker
            .parked("beta")
            .await
            .expect("broker parked")
            .len(),
        ids.len()
    );
    assert_eq!(
        count_in(&env.services, ApplicationState::DedupClear).await,
        ids.len() as i64
    );

    // An operator fixes the cause and retries the parked work.
    let running = start(&env.services, vec![Arc::new(alpha()), Arc::new(beta())], 3).await;
    for p in &parked_jobs {
        parked::retry(&env.services, &p.job_id)
            .await
            .expect("retry parked");
    }
    assert!(matches!(
        parked::retry(&env.services, &parked_jobs[0].job_id).await,
        Err(parked::ParkedError::NotFound(_))
    ));
    wait_for(
        &env.services,
        ApplicationState::KeysIssued,
        ids.len(),
        Duration::from_secs(30),
    )
    .await;
    running.shutdown().await.expect("shutdown");
    assert!(
        parked::list(&env.services, None)
            .await
            .expect("parked")
            .is_empty()
    );
    assert_exactly_once(&env.services, &ids).await;
}

async fn permanent_failures_park_at_once(mode: Mode) {
    let env = env(mode).await;
    let ids = seed(&env.services, 3).await;
    let mut refusing = beta();
    refusing.always_permanent = true;
    let calls = refusing.calls.clone();
    let running = start(
        &env.services,
        vec![Arc::new(alpha()), Arc::new(refusing)],
        5,
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while parked::list(&env.services, Some("beta"))
        .await
        .expect("parked")
        .len()
        < ids.len()
    {
        assert!(tokio::time::Instant::now() < deadline, "jobs never parked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.shutdown().await.expect("shutdown");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "no retry of a permanent failure"
    );
}

async fn graceful_shutdown_finishes_in_flight_work(mode: Mode) {
    let env = env(mode).await;
    let ids = seed(&env.services, 12).await;
    let mut slow = beta();
    slow.work = Duration::from_millis(400);
    let calls = slow.calls.clone();
    let running = start(&env.services, vec![Arc::new(alpha()), Arc::new(slow)], 5).await;
    while calls.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.shutdown().await.expect("shutdown");
    let started = calls.load(Ordering::SeqCst) as i64;
    let finished = count_in(&env.services, ApplicationState::KeysIssued).await;
    assert!(started >= 1);
    assert_eq!(
        finished, started,
        "every job that had started was finished before exit"
    );
    let (pending, _) = env.services.store.outbox_backlog().await.expect("backlog");
    assert_eq!(pending, 0, "the outbox was flushed before exit");

    // The rest is picked up by the next process.
    let mut env = env;
    env.restart_broker().await;
    let running = start(&env.services, vec![Arc::new(alpha()), Arc::new(beta())], 5).await;
    wait_for(
        &env.services,
        ApplicationState::KeysIssued,
        ids.len(),
        Duration::from_secs(60),
    )
    .await;
    running.shutdown().await.expect("shutdown");
    assert_exactly_once(&env.services, &ids).await;
}

macro_rules! suite {
    ($mode_mod:ident, $mode:expr) => {
        mod $mode_mod {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn all_jobs_done_exactly_once() {
                super::all_jobs_done_exactly_once($mode).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn crash_after_delivery_received() {
                crash_and_restart($mode, FailPoint::Received).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn crash_after_application_loaded() {
                crash_and_restart($mode, FailPoint::Loaded).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn crash_after_handler_before_commit() {
                crash_and_restart($mode, FailPoint::Handled).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn crash_after_commit_before_ack() {
                crash_and_restart($mode, FailPoint::Committed).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn crash_after_relay_publish_before_mark() {
                crash_and_restart($mode, FailPoint::RelayPublished).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn retries_with_growing_delay_then_succeeds() {
                super::retries_with_growing_delay_then_succeeds($mode).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn parks_after_last_attempt_and_operator_retry_finishes() {
                super::parks_after_last_attempt_and_operator_retry_finishes($mode).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn permanent_failures_park_at_once() {
                super::permanent_failures_park_at_once($mode).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn graceful_shutdown_finishes_in_flight_work() {
                super::graceful_shutdown_finishes_in_flight_work($mode).await
            }
        }
    };
}

suite!(embedded, Mode::Embedded);
suite!(distributed, Mode::Distributed);
