//! The broker scatter-gather (`[dedup] scatter = "broker"`) on both backend families.
//!
//! * Embedded (SQLite, in-process broker, local files): the dedup stage and every
//!   `dedup-shard-<k>` stage run in one process, sharing one engine.
//! * Distributed (PostgreSQL, RabbitMQ, S3): the searching `dedup` worker holds no shard;
//!   each `dedup-shard-<k>` worker is a separate stage runner with its own connections
//!   (store, broker, object store, relay) and an engine holding only shard k — as separate
//!   processes would.
//!
//! Covered: planted duplicates caught across shards and the rest cleared, a shard job
//! delivered again (idempotent answer), a missing shard (retried then parked with the shard
//! named), two enrolments of one person handled at once by two dedup workers (one clear,
//! one possible duplicate, for both scatter modes), and end-to-end latency figures of a
//! tiny gallery, broker vs local (printed: run with `--success-output immediate` or
//! `--nocapture`; no timing is asserted).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cardpipe_biometrics::matcher::Shard;
use cardpipe_biometrics::synth::Population;
use cardpipe_common::broker::{Job, RetryPolicy};
use cardpipe_common::clock::SystemClock;
use cardpipe_common::domain::applicant::{
    ApplicantGroup, ApplicantRecord, Biometrics, Fees, FingerprintEntry, Gender,
};
use cardpipe_common::domain::{ApplicationId, ApplicationState, Priority};
use cardpipe_common::envelope::Sealer;
use cardpipe_common::objects::ObjectStore;
use cardpipe_common::objects::s3::S3ObjectStore;
use cardpipe_common::records;
use cardpipe_common::runtime::pipeline::{self, RunningPipeline};
use cardpipe_common::runtime::relay::Relay;
use cardpipe_common::runtime::{Services, Stage, StageSettings, parked};
use cardpipe_common::store::{NewApplication, Store};
use cardpipe_common::telemetry::metrics::Metrics;
use cardpipe_common::testing::stages::StepStage;
use cardpipe_common::testing::{self, Mode};
use cardpipe_dedup::distributed::{self, ShardStage, shard_stage_name};
use cardpipe_dedup::stage::{self, DedupConfig, DedupEngine, DedupStage, ScatterMode};
use sqlx::Row;

const SHARDS: u32 = 3;
static PHOTO: std::sync::LazyLock<Vec<u8>> =
    std::sync::LazyLock::new(|| Population::generate(1, 1, 0.0).subjects[0].face_jpeg());
const KEYS_FROM: &[ApplicationState] = &[ApplicationState::DedupClear, ApplicationState::Cleared];

fn settings(max_attempts: u32) -> StageSettings {
    StageSettings {
        concurrency: 2,
        prefetch: 4,
        retry: RetryPolicy {
            delays: vec![Duration::from_millis(100)],
            max_attempts,
        },
    }
}

fn config(scatter: ScatterMode) -> DedupConfig {
    DedupConfig {
        shards: SHARDS,
        scatter,
        // Generous: a scatter must not time out while a late shard worker connects on a busy
        // CI machine (the timeout path has its own test with 300 ms).
        shard_timeout_ms: 120_000,
        ..DedupConfig::default()
    }
}

/// Connections of one test "deployment": a function giving each simulated process its own
/// services over the same database, broker vhost/prefix, bucket and envelope key.
struct Deployment {
    mode: Mode,
    first: Option<Services>,
    postgres_url: Option<String>,
    prefix: String,
    s3: Option<cardpipe_common::objects::s3::S3Settings>,
    sealer: Arc<Sealer>,
    _guard: Option<tempfile::TempDir>,
}

impl Deployment {
    async fn new(mode: Mode) -> Self {
        match mode {
            Mode::Embedded => {
                let (first, guard) = testing::services(mode, None).await;
                let sealer = first.sealer.clone();
                Deployment {
                    mode,
                    first: Some(first),
                    postgres_url: None,
                    prefix: String::new(),
                    s3: None,
                    sealer,
                    _guard: guard,
                }
            }
            Mode::Distributed => {
                let mut d = Deployment {
                    mode,
                    first: None,
                    postgres_url: Some(testing::fresh_postgres_url().await),
                    prefix: testing::unique("cardpipe-test-"),
                    s3: Some(testing::s3_settings()),
                    sealer: Arc::new(testing::test_sealer()),
                    _guard: None,
                };
                let first = d.process().await;
                first.store.migrate().await.expect("migrating");
                d.first = Some(first);
                d
            }
        }
    }

    /// The services of the first process.
    fn first(&self) -> Services {
        self.first.clone().expect("connected")
    }

    /// Services of another process (embedded: the same, there is one process).
    async fn process(&self) -> Services {
        match self.mode {
            Mode::Embedded => self.first(),
            Mode::Distributed => Services {
                store: Store::connect(self.postgres_url.as_deref().unwrap(), 3)
                    .await
                    .expect("store"),
                broker: Arc::new(
                    testing::rabbit_broker_with_prefix(&testing::amqp_url(), &self.prefix).await,
                ),
                objects: Arc::new(
                    S3ObjectStore::connect(self.s3.as_ref().unwrap())
                        .await
                        .expect("s3"),
                ) as Arc<dyn ObjectStore>,
                clock: Arc::new(SystemClock),
                metrics: Metrics::new(),
                sealer: self.sealer.clone(),
            },
        }
    }
}

/// Running processes of a deployment.
struct Cluster {
    searchers: Vec<(Services, Arc<DedupEngine>)>,
    shard_engines: Vec<Arc<DedupEngine>>,
    running: Vec<RunningPipeline>,
}

impl Cluster {
    /// `searchers` dedup workers; shard workers for `shards` (embedded: in the first
    /// searcher's process, sharing its engine).
    async fn start(
        d: &Deployment,
        config: &DedupConfig,
        searchers: usize,
        shards: &[u32],
        max_attempts: u32,
    ) -> Self {
        let mut cluster = Cluster {
            searchers: Vec::new(),
            shard_engines: Vec::new(),
            running: Vec::new(),
        };
        let broker = config.scatter == ScatterMode::Broker;
        // Shard workers first: they declare their queues.
        if d.mode == Mode::Distributed && broker {
            for &k in shards {
                let services = d.process().await;
                let engine = DedupEngine::with_shards(config.clone(), &[k]).expect("engine");
                let stage: Arc<dyn Stage> =
                    Arc::new(ShardStage::new(engine.clone(), k).expect("shard stage"));
                cluster
                    .running
                    .push(run(&services, vec![(stage, settings(max_attempts))]).await);
                cluster.shard_engines.push(engine);
            }
        }
        for i in 0..searchers {
            let services = if i == 0 { d.first() } else { d.process().await };
            let owned: Vec<u32> = match (d.mode, broker) {
                (_, false) => (0..config.shards).collect(),
                (Mode::Embedded, true) if i == 0 => (0..config.shards).collect(),
                _ => Vec::new(),
            };
            let engine = DedupEngine::with_shards(config.clone(), &owned).expect("engine");
            let mut stages: Vec<(Arc<dyn Stage>, StageSettings)> = vec![
                (
                    Arc::new(DedupStage::new(engine.clone())),
                    settings(max_attempts),
                ),
                (
                    Arc::new(StepStage::new(
                        "keys",
                        KEYS_FROM,
                        ApplicationState::KeysIssued,
                        None,
                    )),
                    settings(max_attempts),
                ),
            ];
            if d.mode == Mode::Embedded && broker && i == 0 {
                for &k in shards {
                    stages.push((
                        Arc::new(ShardStage::new(engine.clone(), k).expect("shard stage")),
                        settings(max_attempts),
                    ));
                }
                cluster.shard_engines.push(engine.clone());
            }
            cluster.running.push(run(&services, stages).await);
            cluster.searchers.push((services, engine));
        }
        cluster
    }

    async fn stop(self) {
        for r in self.running {
            r.shutdown().await.expect("shutdown");
        }
    }
}

async fn run(services: &Services, stages: Vec<(Arc<dyn Stage>, StageSettings)>) -> RunningPipeline {
    let relay = Relay::new(services.clone()).with_poll_interval(Duration::from_millis(50));
    pipeline::start(services, stages, relay, Duration::from_secs(10))
        .await
        .expect("pipeline")
}

/// Stores an application in dedup_pending with its biometrics; the dedup job goes to the
/// outbox when `enqueue`.
async fn apply(
    services: &Services,
    n: usize,
    templates: &[Vec<u8>],
    enqueue: bool,
) -> ApplicationId {
    let id = ApplicationId::generate();
    let record = ApplicantRecord {
        registry_id: format!("REG-{n}-{id}"),
        applied_on: time::macros::date!(2026 - 10 - 01),
        tracking_code: testing::unique("TC"),
        payment_tracking_code: format!("PAY-{n}"),
        national_code: format!("{:010}", 2_000_000 + n),
        first_name: "مریم".into(),
        last_name: "احمدی".into(),
        father_name: "رضا".into(),
        birth_date: time::macros::date!(1991 - 05 - 02),
        birth_certificate_number: format!("{}", 5000 + n),
        gender: Gender::Female,
        postal_code: "1234567890".into(),
        address: "اصفهان".into(),
        mobile: "09120000000".into(),
        landline: "03100000000".into(),
        applicant_group: ApplicantGroup::FirstCard,
        previous_card_issued_on: None,
        pickup_office: "ISF-001".into(),
        fees: Fees::default(),
    };
    let biometrics = Biometrics {
        photo_jpeg: PHOTO.clone(),
        fingerprints: templates
            .iter()
            .enumerate()
            .map(|(i, t)| FingerprintEntry {
                position: i as u8 + 1,
                template: Some(t.clone()),
                missing_reason: None,
            })
            .collect(),
    };
    let artifacts = records::put_biometrics(services, &id, &biometrics)
        .await
        .expect("biometrics");
    let now = services.clock.now();
    let mut tx = services.store.begin().await.expect("begin");
    Store::insert_application(
        &mut tx,
        &NewApplication {
            id: id.clone(),
            registry_id: record.registry_id.clone(),
            batch_id: None,
            state: ApplicationState::DedupPending,
            priority: Priority::Normal,
        },
        "registry:test",
        now,
    )
    .await
    .expect("insert");
    records::insert_record(&mut tx, services, &id, &record, &artifacts)
        .await
        .expect("record");
    if enqueue {
        Store::enqueue_job(&mut tx, &Job::new(stage::STAGE_NAME, id.as_str()), now)
            .await
            .expect("job");
    }
    tx.commit().await.expect("commit");
    id
}

async fn enqueue(services: &Services, ids: &[ApplicationId]) {
    let mut tx = services.store.begin().await.expect("begin");
    for id in ids {
        Store::enqueue_job(
            &mut tx,
            &Job::new(stage::STAGE_NAME, id.as_str()),
            services.clock.now(),
        )
        .await
        .expect("job");
    }
    tx.commit().await.expect("commit");
}

async fn state(services: &Services, id: &ApplicationId) -> ApplicationState {
    services
        .store
        .application(id)
        .await
        .expect("load")
        .expect("exists")
        .state
}

/// Waits until every one of `ids` has left dedup_pending and the keys hand-over.
async fn settle(services: &Services, ids: &[ApplicationId]) {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let mut busy = 0;
        for id in ids {
            if matches!(
                state(services, id).await,
                ApplicationState::DedupPending | ApplicationState::DedupClear
            ) {
                busy += 1;
            }
        }
        if busy == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{busy} applications still in flight"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn scalar(services: &Services, sql: &'static str, bind: &str) -> i64 {
    sqlx::query(sql)
        .bind(bind.to_owned())
        .fetch_one(services.store.pool())
        .await
        .expect("query")
        .try_get::<i64, _>(0)
        .expect("int")
}

async fn scatter_of(services: &Services, id: &ApplicationId) -> String {
    sqlx::query("SELECT scatter_id FROM dedup_scatters WHERE application_id = $1")
        .bind(id.as_str().to_owned())
        .fetch_one(services.store.pool())
        .await
        .expect("scatter row")
        .try_get("scatter_id")
        .expect("text")
}

/// Planted duplicates caught across shards, the rest cleared, every shard answered once.
async fn batch(mode: Mode) {
    let d = Deployment::new(mode).await;
    let services = d.first();
    let config = config(ScatterMode::Broker);
    let pop = Population::generate(9191, 24, 0.25);
    assert!(pop.duplicates.len() >= 3, "the seed plants duplicates");
    let mut ids = Vec::new();
    for s in &pop.subjects {
        ids.push(apply(&services, s.index, &s.templates, true).await);
    }
    let cluster = Cluster::start(&d, &config, 1, &[0, 1, 2], 3).await;
    settle(&services, &ids).await;

    let person_of_id: HashMap<String, u64> = pop
        .subjects
        .iter()
        .map(|s| (ids[s.index].0.clone(), s.person))
        .collect();
    let mut clear_per_person: HashMap<u64, usize> = HashMap::new();
    let mut across = 0;
    let mut flagged = 0;
    for s in &pop.subjects {
        let id = &ids[s.index];
        match state(&services, id).await {
            ApplicationState::KeysIssued => *clear_per_person.entry(s.person).or_default() += 1,
            ApplicationState::PossibleDuplicate => {
                flagged += 1;
                let c = cardpipe_common::contract::candidates(&services.store, id)
                    .await
                    .expect("candidates");
                assert_eq!(
                    person_of_id.get(&c[0].candidate_id),
                    Some(&s.person),
                    "top candidate of subject {} is the same person",
                    s.index
                );
                if Shard::owner_of(&c[0].candidate_id, SHARDS)
                    != Shard::owner_of(id.as_str(), SHARDS)
                {
                    across += 1;
                }
            }
            other => panic!("subject {} ended in {other}", s.index),
        }
        // One scatter, closed, with exactly one answer per shard.
        let scatter = scatter_of(&services, id).await;
        assert_eq!(
            scalar(
                &services,
                "SELECT COUNT(*) FROM dedup_shard_answers WHERE scatter_id = $1",
                &scatter
            )
            .await,
            i64::from(SHARDS)
        );
        assert_eq!(
            scalar(&services, "SELECT COUNT(*) FROM dedup_scatters WHERE application_id = $1 AND finished_at IS NOT NULL", id.as_str()).await,
            1
        );
    }
    let persons: std::collections::HashSet<u64> = pop.subjects.iter().map(|s| s.person).collect();
    assert_eq!(
        flagged,
        pop.duplicates.len(),
        "every planted duplicate caught"
    );
    assert!(
        persons.iter().all(|p| clear_per_person.get(p) == Some(&1)),
        "one clear enrolment per person"
    );
    assert!(
        across >= 1,
        "at least one duplicate caught in another shard than its own"
    );
    // Each shard engine holds only its own subjects; together the whole gallery (after
    // following the enrolments made since its last answer).
    for e in &cluster.shard_engines {
        e.refresh(&services).await.expect("refresh");
    }
    let held: usize = cluster.shard_engines.iter().map(|e| e.shards().len()).sum();
    assert_eq!(held, persons.len());
    if mode == Mode::Distributed {
        for (k, e) in cluster.shard_engines.iter().enumerate() {
            assert_eq!(e.shards().owned(), vec![k as u32]);
        }
        assert!(
            cluster.searchers[0].1.shards().is_empty(),
            "the searcher holds no shard"
        );
    }
    // The lock is free again.
    assert_eq!(
        scalar(
            &services,
            "SELECT COUNT(*) FROM dedup_gallery_lock WHERE holder IS NULL AND $1 = 'free'",
            "free"
        )
        .await,
        1
    );
    // Non-duplicates of a fresh population clear.
    let fresh = Population::generate(5150, 5, 0.0);
    let mut fresh_ids = Vec::new();
    for s in &fresh.subjects {
        fresh_ids.push(apply(&services, 100 + s.index, &s.templates, true).await);
    }
    settle(&services, &fresh_ids).await;
    for id in &fresh_ids {
        assert_eq!(state(&services, id).await, ApplicationState::KeysIssued);
    }
    cluster.stop().await;
}

/// A shard job delivered again while the scatter is open (and once more after the
/// decision) adds nothing; a missing shard makes the job retry, then park, naming it.
async fn redelivery_and_missing_shard(mode: Mode) {
    let d = Deployment::new(mode).await;
    let services = d.first();
    let pop = Population::generate(4711, 8, 0.0);
    let mut ids = Vec::new();
    for s in &pop.subjects {
        ids.push(apply(&services, s.index, &s.templates, true).await);
    }
    // Shard 1's worker is down (its queue exists from an earlier run): scatters wait for it.
    let config = config(ScatterMode::Broker);
    services
        .broker
        .declare_stage(&shard_stage_name(1), &settings(3).retry)
        .await
        .expect("declare");
    let cluster = Cluster::start(&d, &config, 1, &[0, 2], 3).await;
    // Every application scatters (the search takes no lock) and waits for shard 1; take
    // one whose scatter shards 0 and 2 have answered.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (probe, scatter) = 'found: loop {
        let open = sqlx::query(
            "SELECT application_id, scatter_id FROM dedup_scatters WHERE finished_at IS NULL",
        )
        .fetch_all(services.store.pool())
        .await
        .expect("scatters");
        for row in &open {
            let id: String = row.try_get("application_id").expect("id");
            let s: String = row.try_get("scatter_id").expect("scatter");
            if scalar(
                &services,
                "SELECT COUNT(*) FROM dedup_shard_answers WHERE scatter_id = $1",
                &s,
            )
            .await
                == 2
            {
                break 'found (ApplicationId(id), s);
            }
        }
        assert!(Instant::now() < deadline, "shards 0 and 2 answer a scatter");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let probe = &probe;
    assert!(ids.contains(probe));
    // Deliver shard 0's and 2's jobs again, through the broker and directly.
    for k in [0, 2] {
        services
            .broker
            .publish(&Job::new(shard_stage_name(k), probe.as_str()))
            .await
            .expect("publish");
    }
    for (i, k) in [0, 2].into_iter().enumerate() {
        // Embedded: one engine holds every shard; distributed: one engine per shard worker.
        let engine = cluster.shard_engines[i.min(cluster.shard_engines.len() - 1)].clone();
        let again = ShardStage::new(engine, k).expect("stage");
        assert!(
            again
                .answer(&services, probe)
                .await
                .expect("answer")
                .is_none(),
            "already answered"
        );
    }
    assert_eq!(
        state(&services, probe).await,
        ApplicationState::DedupPending
    );
    // Shard 1 comes up: the scatter completes and everything is decided.
    let late_services = d.process().await;
    let late_engine = DedupEngine::with_shards(config.clone(), &[1]).expect("engine");
    let late: Arc<dyn Stage> = Arc::new(ShardStage::new(late_engine.clone(), 1).expect("stage"));
    let late_run = run(&late_services, vec![(late, settings(3))]).await;
    settle(&services, &ids).await;
    for id in &ids {
        assert_eq!(state(&services, id).await, ApplicationState::KeysIssued);
    }
    assert_eq!(
        scatter_of(&services, probe).await,
        scatter,
        "the same scatter was gathered"
    );
    assert_eq!(
        scalar(
            &services,
            "SELECT COUNT(*) FROM dedup_shard_answers WHERE scatter_id = $1",
            &scatter
        )
        .await,
        i64::from(SHARDS),
        "one answer per shard despite the repeated jobs"
    );
    // After the decision a repeated shard job is skipped (the application left dedup_pending).
    services
        .broker
        .publish(&Job::new(shard_stage_name(1), probe.as_str()))
        .await
        .expect("publish");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        scalar(
            &services,
            "SELECT COUNT(*) FROM dedup_shard_answers WHERE scatter_id = $1",
            &scatter
        )
        .await,
        i64::from(SHARDS)
    );
    late_run.shutdown().await.expect("shutdown");
    cluster.stop().await;

    // Missing shard: short timeout, two attempts, then parked with the shard named.
    let short = DedupConfig {
        shard_timeout_ms: 300,
        ..config
    };
    let cluster = Cluster::start(&d, &short, 1, &[0, 2], 2).await;
    let lonely = apply(
        &services,
        50,
        &Population::generate(31, 1, 0.0).subjects[0].templates,
        true,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let parked = loop {
        let jobs = parked::list(&services, Some(stage::STAGE_NAME))
            .await
            .expect("parked");
        if let Some(j) = jobs.into_iter().find(|j| j.subject == lonely.as_str()) {
            break j;
        }
        assert!(Instant::now() < deadline, "the job is parked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        parked.error.contains("shard(s) [1] of 3 did not answer"),
        "{}",
        parked.error
    );
    assert_eq!(parked.attempt, 2);
    assert_eq!(
        state(&services, &lonely).await,
        ApplicationState::DedupPending
    );
    assert!(
        distributed::open_scatter(&services, lonely.as_str())
            .await
            .expect("scatter")
            .is_none()
    );
    assert_eq!(
        scalar(
            &services,
            "SELECT COUNT(*) FROM dedup_gallery_lock WHERE holder IS NULL AND $1 = 'free'",
            "free"
        )
        .await,
        1,
        "the lock is released after a timeout"
    );
    cluster.stop().await;
}

/// Two enrolments of each of several persons, handled at once by two dedup workers:
/// exactly one per person comes out clear.
async fn concurrent_twins(mode: Mode, scatter: ScatterMode) {
    let d = Deployment::new(mode).await;
    let services = d.first();
    let pop = Population::generate(2024, 6, 0.0);
    let cluster = Cluster::start(&d, &config(scatter), 2, &[0, 1, 2], 3).await;
    let mut ids = Vec::new();
    for s in &pop.subjects {
        let a = apply(&services, 2 * s.index, &s.templates, false).await;
        let b = apply(
            &services,
            2 * s.index + 1,
            &pop.fresh_impressions(s.index, 77),
            false,
        )
        .await;
        ids.push((a, b));
    }
    // Both workers consume the dedup queue; the twins' jobs are committed at the same time
    // from the two processes, so the twins are in flight together.
    let (s0, s1) = (&cluster.searchers[0].0, &cluster.searchers[1].0);
    let firsts: Vec<ApplicationId> = ids.iter().map(|(a, _)| a.clone()).collect();
    let seconds: Vec<ApplicationId> = ids.iter().map(|(_, b)| b.clone()).collect();
    tokio::join!(enqueue(s0, &firsts), enqueue(s1, &seconds));
    let all: Vec<ApplicationId> = firsts.iter().chain(&seconds).cloned().collect();
    settle(&services, &all).await;
    for (a, b) in &ids {
        let states = [state(&services, a).await, state(&services, b).await];
        assert!(
            states.contains(&ApplicationState::KeysIssued)
                && states.contains(&ApplicationState::PossibleDuplicate),
            "one twin clear, the other flagged: {states:?}"
        );
        let flagged = if states[0] == ApplicationState::PossibleDuplicate {
            a
        } else {
            b
        };
        let other = if flagged == a { b } else { a };
        let c = cardpipe_common::contract::candidates(&services.store, flagged)
            .await
            .expect("candidates");
        assert_eq!(c[0].candidate_id, other.0);
    }
    cluster.stop().await;
}

/// End-to-end latency of one application at a time (job enqueued → decided), tiny gallery.
async fn latency(mode: Mode) {
    for scatter in [ScatterMode::Local, ScatterMode::Broker] {
        let d = Deployment::new(mode).await;
        let services = d.first();
        let pop = Population::generate(8080, 40, 0.0);
        let mut gallery = Vec::new();
        for s in pop.subjects.iter().take(30) {
            gallery.push(apply(&services, s.index, &s.templates, true).await);
        }
        let cluster = Cluster::start(&d, &config(scatter), 1, &[0, 1, 2], 3).await;
        settle(&services, &gallery).await;
        let mut probes = Vec::new();
        for s in pop.subjects.iter().skip(30) {
            probes.push(apply(&services, s.index, &s.templates, false).await);
        }
        let mut times = Vec::new();
        for id in &probes {
            let started = Instant::now();
            // Straight to the broker: the figure is the stage's, not the outbox relay's poll.
            services
                .broker
                .publish(&Job::new(stage::STAGE_NAME, id.as_str()))
                .await
                .expect("publish");
            while state(&services, id).await == ApplicationState::DedupPending {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            times.push(started.elapsed().as_secs_f64() * 1e3);
            assert_ne!(
                state(&services, id).await,
                ApplicationState::PossibleDuplicate
            );
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        eprintln!(
            "dedup latency {mode:?} scatter={scatter:?} gallery=30 shards={SHARDS}: \
             median {median:.1} ms, min {:.1} ms, max {:.1} ms over {} probes (job published → decided, debug build)",
            times[0],
            times[times.len() - 1],
            times.len()
        );
        assert_eq!(times.len(), probes.len());
        cluster.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_embedded() {
    batch(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_distributed() {
    batch(Mode::Distributed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_and_missing_shard_embedded() {
    redelivery_and_missing_shard(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_and_missing_shard_distributed() {
    redelivery_and_missing_shard(Mode::Distributed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_twins_embedded_broker() {
    concurrent_twins(Mode::Embedded, ScatterMode::Broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_twins_distributed_broker() {
    concurrent_twins(Mode::Distributed, ScatterMode::Broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_twins_distributed_local() {
    concurrent_twins(Mode::Distributed, ScatterMode::Local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_figures_embedded() {
    latency(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_figures_distributed() {
    latency(Mode::Distributed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_twins_embedded_local() {
    concurrent_twins(Mode::Embedded, ScatterMode::Local).await;
}
