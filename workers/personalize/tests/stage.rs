//! The personalize stage in a running pipeline, on both backend families (embedded: SQLite,
//! in-process broker, local files; distributed: PostgreSQL, RabbitMQ, S3), with in-process
//! encoders: the happy path, every fault knob spoiling blanks that are recorded with their
//! reason, the blank budget parking a job, a crash between writing a card and committing,
//! hot plug, health and the operator's out-of-service switch.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cardpipe_card::card_os::Faults;
use cardpipe_card::cards;
use cardpipe_card::farm::{Farm, FarmSettings, InProcessSource};
use cardpipe_card::reader::BlankStock;
use cardpipe_card::scp03::MasterKeys;
use cardpipe_common::broker::Job;
use cardpipe_common::domain::ApplicationState;
use cardpipe_common::runtime::{JobContext, Stage};
use cardpipe_common::telemetry::metrics::JobOutcome;
use cardpipe_common::testing::{self, Mode};

use common::*;

fn farm_with(
    n: usize,
    faults: impl Fn(u32) -> Faults + Send + Sync + 'static,
) -> (Arc<Farm>, InProcessSource) {
    let stock = Arc::new(BlankStock::new(
        MasterKeys::test_keys(),
        rand::random(),
        faults,
    ));
    let source = InProcessSource::new(n, stock.clone());
    let handle = InProcessSource::new(n, stock);
    let farm = Farm::new(
        Box::new(source),
        FarmSettings {
            max_consecutive_failures: 50,
            acquire_timeout: Duration::from_secs(20),
        },
    );
    (farm, handle)
}

async fn happy_path(mode: Mode) {
    let (services, _guard) = testing::services(mode, None).await;
    let pki = pki();
    let (farm, _) = farm_with(2, |_| Faults::none());
    farm.register_metrics(&services.metrics);
    let apps = seed(&services, &pki, 4).await;
    let ids: Vec<_> = apps.iter().map(|(id, _)| id.clone()).collect();
    let running = start(&services, stage(farm.clone(), &pki, 3)).await;
    wait_personalized(&services, &ids).await;
    running.shutdown().await.unwrap();
    let mut chips = std::collections::HashSet::new();
    for id in &ids {
        let rows = one_good_card(&services, id).await;
        assert_eq!(rows.len(), 1, "no spoils on healthy blanks: {rows:?}");
        assert_eq!(rows[0].attempt, 1);
        assert!(rows[0].blank_serial.starts_with("BLK-"));
        assert!(rows[0].encoder.starts_with("encoder-0"));
        assert!(chips.insert(rows[0].chip_serial.clone().unwrap()));
        let history = services.store.history(id).await.unwrap();
        assert!(
            history
                .iter()
                .any(|h| h.to_state == ApplicationState::Personalized),
            "{history:?}"
        );
    }
    let personalized: u64 = farm.status().iter().map(|s| s.personalized).sum();
    assert_eq!(personalized, 4);
    let text = services.metrics.encode();
    assert!(text.contains("cardpipe_encoder_cards_total{"), "{text}");
    assert!(text.contains("outcome=\"personalized\""), "{text}");
    assert!(text.contains("cardpipe_encoders_in_service 2"), "{text}");
    assert!(
        text.contains("cardpipe_encoder_busy_seconds_total{"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_keys_issued_to_personalized_with_card_rows() {
    happy_path(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distributed_keys_issued_to_personalized_with_card_rows() {
    happy_path(Mode::Distributed).await;
}

/// Blank 0: dead chip; 1: torn mid-write; 2: every write fails; then healthy blanks.
fn faulty(n: u32) -> Faults {
    match n {
        0 => Faults {
            dead: true,
            ..Faults::none()
        },
        1 => Faults {
            tear_at_write: Some(4),
            ..Faults::none()
        },
        2 => Faults {
            write_failure_rate: 1.0,
            seed: 7,
            ..Faults::none()
        },
        _ => Faults::none(),
    }
}

async fn faults_spoil_blanks(mode: Mode) {
    let (services, _guard) = testing::services(mode, None).await;
    let pki = pki();
    let (farm, _) = farm_with(1, faulty);
    let apps = seed(&services, &pki, 1).await;
    let id = apps[0].0.clone();
    let running = start(&services, stage(farm.clone(), &pki, 4)).await;
    wait_personalized(&services, std::slice::from_ref(&id)).await;
    running.shutdown().await.unwrap();
    let rows = one_good_card(&services, &id).await;
    let reasons: Vec<_> = rows
        .iter()
        .filter(|r| r.state == "spoiled")
        .map(|r| r.spoil_reason.clone().unwrap_or_default())
        .collect();
    println!("{rows:#?}");
    assert_eq!(reasons.len(), 3, "{rows:?}");
    assert!(
        reasons[0].contains("does not respond"),
        "dead chip: {reasons:?}"
    );
    assert!(rows[0].chip_serial.is_none(), "a dead chip has no serial");
    assert!(reasons[1].contains("removed"), "tearing: {reasons:?}");
    assert!(
        reasons[2].contains("UPDATE BINARY"),
        "write failure: {reasons:?}"
    );
    assert_eq!(rows.last().unwrap().state, "personalized");
    assert_eq!(rows.last().unwrap().attempt, 4);
    let st = &farm.status()[0];
    assert_eq!((st.personalized, st.spoiled), (1, 3));
    assert!((st.yield_ratio() - 0.25).abs() < 1e-9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_faults_spoil_blanks_and_requeue_on_fresh_ones() {
    faults_spoil_blanks(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distributed_faults_spoil_blanks_and_requeue_on_fresh_ones() {
    faults_spoil_blanks(Mode::Distributed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exhausting_the_blank_budget_parks_the_job() {
    let (services, _guard) = testing::services(Mode::Embedded, None).await;
    let pki = pki();
    let (farm, _) = farm_with(2, |_| Faults {
        dead: true,
        ..Faults::none()
    });
    let apps = seed(&services, &pki, 1).await;
    let id = apps[0].0.clone();
    let running = start(&services, stage(farm.clone(), &pki, 3)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while services
        .metrics
        .jobs_total("personalize", JobOutcome::Parked)
        == 0
    {
        assert!(tokio::time::Instant::now() < deadline, "never parked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.shutdown().await.unwrap();
    let app = services.store.application(&id).await.unwrap().unwrap();
    assert_eq!(app.state, ApplicationState::KeysIssued);
    let rows = cards::for_application(&services.store, &id).await.unwrap();
    assert_eq!(
        rows.len(),
        3,
        "exactly the budget of blanks spent: {rows:?}"
    );
    assert!(rows.iter().all(|r| r.state == "spoiled"));
}

/// Blanks that leave the encoder before anything is written to them (a feed jam) are spoiled
/// for the stock count but are encoder faults, not the application's: they do not use up its
/// budget, and the application gets its card on the next good blank.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blanks_pulled_before_writing_do_not_use_up_the_budget() {
    let (services, _guard) = testing::services(Mode::Embedded, None).await;
    let pki = pki();
    // Blanks 0..3 jam (more than the budget of 3), then good ones.
    let (farm, _) = farm_with(1, |n| Faults {
        pulled_before_first_command: n < 4,
        ..Faults::none()
    });
    let apps = seed(&services, &pki, 1).await;
    let id = apps[0].0.clone();
    let running = start(&services, stage(farm.clone(), &pki, 3)).await;
    wait_personalized(&services, std::slice::from_ref(&id)).await;
    running.shutdown().await.unwrap();
    let rows = cards::for_application(&services.store, &id).await.unwrap();
    let spoiled: Vec<_> = rows.iter().filter(|r| r.state == "spoiled").collect();
    assert_eq!(spoiled.len(), 4, "{rows:?}");
    assert!(
        spoiled.iter().all(|r| r
            .spoil_reason
            .as_deref()
            .is_some_and(|s| s.starts_with("encoder: ") && s.contains("before writing"))),
        "{rows:?}"
    );
    assert_eq!(
        cards::counted_spoils(&services.store, &id).await.unwrap(),
        0
    );
    assert_eq!(rows.iter().filter(|r| r.state == "personalized").count(), 1);
}

/// The runner crashes after the handler wrote a card but before the commit: the redelivery
/// records that card spoiled ("interrupted") before it writes a new one, so there is never
/// more than one good card for the application.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_after_writing_before_commit_leaves_one_good_card() {
    let (services, _guard) = testing::services(Mode::Embedded, None).await;
    let pki = pki();
    let (farm, _) = farm_with(1, |_| Faults::none());
    let apps = seed(&services, &pki, 1).await;
    let id = apps[0].0.clone();
    let st = stage(farm.clone(), &pki, 3);
    let app = services.store.application(&id).await.unwrap().unwrap();
    let ctx = JobContext {
        job: Job::new("personalize", id.as_str()),
        services: services.clone(),
    };
    let completion = st.handle(&ctx, &app).await.unwrap();
    drop(completion); // the crash: the card exists, nothing committed
    let rows = cards::for_application(&services.store, &id).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].state, "in_progress");

    // The job is redelivered to a restarted worker.
    let running = start(&services, st).await;
    wait_personalized(&services, std::slice::from_ref(&id)).await;
    running.shutdown().await.unwrap();
    let rows = one_good_card(&services, &id).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0].state, "spoiled");
    assert_eq!(rows[0].spoil_reason.as_deref(), Some("interrupted"));
    assert_eq!(rows[1].state, "personalized");
}

/// The race that once spoiled a good card: a second delivery of the same application (the
/// outbox job and the re-queued stranded one, both live after an embedded start) arrives
/// after the first delivery's handler returned but before its commit. It must wait for the
/// commit to settle and never record the card being committed as "interrupted".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicate_delivery_waits_for_the_first_commit_to_settle() {
    let (services, _guard) = testing::services(Mode::Embedded, None).await;
    let pki = pki();
    let (farm, _) = farm_with(2, |_| Faults::none());
    let apps = seed(&services, &pki, 1).await;
    let id = apps[0].0.clone();
    let st = Arc::new(stage(farm.clone(), &pki, 3));
    let app = services.store.application(&id).await.unwrap().unwrap();
    let ctx = JobContext {
        job: Job::new("personalize", id.as_str()),
        services: services.clone(),
    };
    let first = st.handle(&ctx, &app).await.unwrap(); // written, not yet committed
    let second = {
        let (st, app) = (st.clone(), app.clone());
        let ctx = JobContext {
            job: Job::new("personalize", id.as_str()),
            services: services.clone(),
        };
        tokio::spawn(async move { st.handle(&ctx, &app).await.map(|_| ()) })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "the duplicate must wait for the commit"
    );
    let rows = cards::for_application(&services.store, &id).await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].state, "in_progress", "{rows:?}");
    drop(first); // the commit settles (here: it is abandoned)
    let err = second.await.unwrap().unwrap_err();
    assert!(
        err.to_string().contains("handled by another delivery"),
        "{err:#}"
    );
    let rows = cards::for_application(&services.store, &id).await.unwrap();
    assert_eq!(rows.len(), 1, "the duplicate wrote no card: {rows:?}");
    assert_eq!(rows[0].state, "in_progress", "{rows:?}");
}

/// A reader vanishes: jobs go to the other encoder; it comes back after a re-scan.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vanished_reader_jobs_move_to_another_encoder_and_it_comes_back() {
    let (services, _guard) = testing::services(Mode::Embedded, None).await;
    let pki = pki();
    let stock = Arc::new(BlankStock::healthy(MasterKeys::test_keys(), 77));
    let source = InProcessSource::new(2, stock);
    let plug = source.hot_plug();
    let farm = Farm::new(Box::new(source), FarmSettings::default());
    farm.register_metrics(&services.metrics);
    assert_eq!(farm.in_service(), 2);
    plug.unplug("encoder-01"); // the farm has not noticed yet
    let apps = seed(&services, &pki, 4).await;
    let ids: Vec<_> = apps.iter().map(|(id, _)| id.clone()).collect();
    let running = start(&services, stage(farm.clone(), &pki, 3)).await;
    wait_personalized(&services, &ids).await;
    running.shutdown().await.unwrap();
    for id in &ids {
        let rows = one_good_card(&services, id).await;
        assert!(rows.iter().all(|r| r.encoder == "encoder-02"), "{rows:?}");
    }
    let st = farm.status();
    assert!(!st[0].present, "{st:?}");
    assert_eq!(farm.in_service(), 1);
    assert!(
        services
            .metrics
            .encode()
            .contains("cardpipe_encoders_in_service 1")
    );
    plug.plug("encoder-01");
    farm.rescan().unwrap();
    assert!(farm.status()[0].present);
    assert_eq!(farm.in_service(), 2);
}

/// Consecutive failures take an encoder out of service; an operator puts it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_takes_a_failing_encoder_out_and_operators_put_it_back() {
    let stock = Arc::new(BlankStock::new(MasterKeys::test_keys(), 5, |_| Faults {
        dead: true,
        ..Faults::none()
    }));
    let farm = Farm::new(
        Box::new(InProcessSource::new(1, stock)),
        FarmSettings {
            max_consecutive_failures: 3,
            acquire_timeout: Duration::from_millis(300),
        },
    );
    let image = Arc::new(cardpipe_card::script::sample_image(2000, 1));
    let opts = cardpipe_card::script::ScriptOptions::default();
    let (ok, _) = cardpipe_card::farm::drive(
        &farm,
        5,
        image.clone(),
        Arc::new(MasterKeys::test_keys()),
        opts.clone(),
        1,
        None,
    )
    .await;
    assert_eq!(ok, 0);
    let st = &farm.status()[0];
    assert_eq!(st.spoiled, 3, "{st:?}");
    assert!(!st.in_service);
    assert!(
        st.out_of_service_reason
            .as_deref()
            .unwrap()
            .contains("3 failures")
    );
    assert!(farm.acquire().await.is_err(), "nothing in service");
    assert!(farm.set_in_service("encoder-01", true, "operator: feeder cleaned"));
    assert_eq!(farm.in_service(), 1);
    let lease = farm.acquire().await.unwrap();
    assert_eq!(lease.encoder(), "encoder-01");
    drop(lease);
    assert!(farm.set_in_service("encoder-01", false, "operator: maintenance"));
    assert_eq!(farm.in_service(), 0);
    assert!(!farm.set_in_service("encoder-99", true, ""));
}

/// 32 in-process encoders at 8 s per card (time-scaled) against the physical limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farm_throughput_against_the_physical_limit() {
    let (n, t, scale, per) = if cfg!(debug_assertions) {
        (8usize, 8.0f64, 0.02, 3usize)
    } else {
        (32, 8.0, 0.01, 10)
    };
    let master = MasterKeys::test_keys();
    let image = Arc::new(cardpipe_card::script::sample_image(20_000, 1));
    let opts = cardpipe_card::script::ScriptOptions::extended();
    let (apdus, _) = cardpipe_card::bench::apdus_per_card(&image, &master, &opts).unwrap();
    let latency = Duration::from_secs_f64(t * scale) / apdus as u32;
    let stock = Arc::new(BlankStock::new(master.clone(), 0xB1, move |_| Faults {
        apdu_latency: latency,
        ..Faults::none()
    }));
    let farm = Farm::new(
        Box::new(InProcessSource::new(n, stock)),
        FarmSettings::default(),
    );
    let (ok, wall) =
        cardpipe_card::farm::drive(&farm, n * per, image, Arc::new(master), opts, 2 * n, None)
            .await;
    let real = wall.as_secs_f64() / scale;
    let per_hour = ok as f64 * 3600.0 / real;
    let limit = n as f64 * 3600.0 / t;
    let busy: f64 = farm
        .status()
        .iter()
        .map(|s| s.busy_time.as_secs_f64())
        .sum();
    let util = busy / (n as f64 * wall.as_secs_f64());
    println!(
        "{n} encoders, t = {t} s: {per_hour:.0} cards/h vs limit {limit:.0} ({:.1} %), utilisation {:.1} %",
        100.0 * per_hour / limit,
        100.0 * util
    );
    assert_eq!(ok, n * per);
    assert!(per_hour / limit > 0.6, "{per_hour} vs {limit}");
}
