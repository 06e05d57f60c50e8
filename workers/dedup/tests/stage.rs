//! The dedup stage in a running pipeline on both backend families (embedded: SQLite,
//! in-process broker, local files; distributed: PostgreSQL, RabbitMQ, S3): a synthetic
//! batch with planted duplicates, redelivery idempotency, the adjudication decision API and
//! a gallery reload after a restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use cardpipe_biometrics::synth::Population;
use cardpipe_common::broker::{Job, RetryPolicy};
use cardpipe_common::domain::applicant::{
    ApplicantGroup, ApplicantRecord, Biometrics, Fees, FingerprintEntry, Gender,
};
use cardpipe_common::domain::{ApplicationId, ApplicationState, Priority};
use cardpipe_common::records;
use cardpipe_common::runtime::pipeline::{self, RunningPipeline};
use cardpipe_common::runtime::relay::Relay;
use cardpipe_common::runtime::{JobContext, Services, Stage, StageSettings};
use cardpipe_common::store::{NewApplication, Store};
use cardpipe_common::testing::stages::StepStage;
use cardpipe_common::testing::{self, Mode};
use cardpipe_dedup::adjudication;
use cardpipe_dedup::stage::{self, DedupConfig, DedupEngine, DedupStage};
use serde_json::{Value, json};
use sqlx::Row;
use tower::ServiceExt;

const KEYS_FROM: &[ApplicationState] = &[ApplicationState::DedupClear, ApplicationState::Cleared];

fn settings() -> StageSettings {
    StageSettings {
        concurrency: 2,
        prefetch: 4,
        retry: RetryPolicy {
            delays: vec![Duration::from_millis(100)],
            max_attempts: 3,
        },
    }
}

/// Stores an application in dedup_pending with its sealed record and biometrics; the dedup
/// job goes to the outbox when `enqueue`.
async fn apply(
    services: &Services,
    n: usize,
    templates: &[Vec<u8>],
    photo: Vec<u8>,
    enqueue: bool,
) -> ApplicationId {
    let id = ApplicationId::generate();
    let record = ApplicantRecord {
        registry_id: format!("REG-{n}-{id}"),
        applied_on: time::macros::date!(2026 - 10 - 01),
        tracking_code: testing::unique("TC"),
        payment_tracking_code: format!("PAY-{n}"),
        national_code: format!("{:010}", 1_000_000 + n),
        first_name: "علی".into(),
        last_name: "رضایی".into(),
        father_name: "حسن".into(),
        birth_date: time::macros::date!(1990 - 03 - 21),
        birth_certificate_number: format!("{}", 4000 + n),
        gender: Gender::Male,
        postal_code: "1234567890".into(),
        address: "تهران".into(),
        mobile: "09120000000".into(),
        landline: "02100000000".into(),
        applicant_group: ApplicantGroup::FirstCard,
        previous_card_issued_on: None,
        pickup_office: "THR-001".into(),
        fees: Fees::default(),
    };
    let biometrics = Biometrics {
        photo_jpeg: photo,
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

async fn start(services: &Services, engine: &Arc<DedupEngine>) -> RunningPipeline {
    let dedup: Arc<dyn Stage> = Arc::new(DedupStage::new(engine.clone()));
    let keys: Arc<dyn Stage> = Arc::new(StepStage::new(
        "keys",
        KEYS_FROM,
        ApplicationState::KeysIssued,
        None,
    ));
    let relay = Relay::new(services.clone()).with_poll_interval(Duration::from_millis(50));
    pipeline::start(
        services,
        vec![(dedup, settings()), (keys, settings())],
        relay,
        Duration::from_secs(10),
    )
    .await
    .expect("pipeline")
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

/// Waits until none of `ids` is in dedup_pending / a keys-bound state.
async fn settle(services: &Services, ids: &[ApplicationId]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    loop {
        let mut busy = 0;
        for id in ids {
            let s = state(services, id).await;
            if matches!(
                s,
                ApplicationState::DedupPending
                    | ApplicationState::DedupClear
                    | ApplicationState::Cleared
            ) {
                busy += 1;
            }
        }
        if busy == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{busy} applications still in flight"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn count(services: &Services, sql: &'static str, id: Option<&ApplicationId>) -> i64 {
    let q = sqlx::query(sql);
    let q = match id {
        Some(id) => q.bind(id.as_str().to_owned()),
        None => q,
    };
    q.fetch_one(services.store.pool())
        .await
        .expect("count")
        .try_get::<i64, _>(0)
        .expect("int")
}

async fn call(
    router: &axum::Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, Vec<u8>) {
    let req = Request::builder().method(method).uri(uri);
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .expect("request");
    let resp = router.clone().oneshot(req).await.expect("response");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24)
        .await
        .expect("body");
    (status, bytes.to_vec())
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("json")
}

async fn scenario(mode: Mode) {
    let (services, _guard) = testing::services(mode, None).await;
    let config = DedupConfig {
        shards: 3,
        ..DedupConfig::default()
    };
    let engine = DedupEngine::new(config.clone()).expect("engine");

    // A batch with planted duplicates, enrolled through the running stage.
    let pop = Population::generate(4242, 24, 0.2);
    assert!(pop.duplicates.len() >= 2, "the seed plants duplicates");
    let mut ids = Vec::new();
    for s in &pop.subjects {
        ids.push(apply(&services, s.index, &s.templates, s.face_jpeg(), true).await);
    }
    let running = start(&services, &engine).await;
    settle(&services, &ids).await;

    // Per person: exactly one enrolment is clear, every other one is a possible duplicate
    // whose top candidate is another enrolment of the same person.
    let mut by_person: HashMap<u64, Vec<usize>> = HashMap::new();
    for s in &pop.subjects {
        by_person.entry(s.person).or_default().push(s.index);
    }
    let person_of_id: HashMap<String, u64> = pop
        .subjects
        .iter()
        .map(|s| (ids[s.index].0.clone(), s.person))
        .collect();
    let mut flagged = Vec::new();
    for members in by_person.values() {
        let mut clear = 0;
        for &i in members {
            match state(&services, &ids[i]).await {
                ApplicationState::KeysIssued => clear += 1,
                ApplicationState::PossibleDuplicate => {
                    let c = cardpipe_common::contract::candidates(&services.store, &ids[i])
                        .await
                        .expect("cands");
                    assert!(!c.is_empty());
                    assert_eq!(
                        person_of_id.get(&c[0].candidate_id),
                        Some(&pop.subjects[i].person),
                        "top candidate of subject {i} is the same person"
                    );
                    assert!(c[0].finger_scores.iter().flatten().count() >= 8);
                    flagged.push(i);
                }
                other => panic!("subject {i} ended in {other}"),
            }
        }
        assert_eq!(clear, 1, "one clear enrolment per person {members:?}");
    }
    assert_eq!(flagged.len(), pop.duplicates.len());
    let enrolled = count(&services, "SELECT COUNT(*) FROM dedup_enrolled", None).await;
    assert_eq!(enrolled as usize, by_person.len());
    assert_eq!(engine.shards().len(), by_person.len());

    // Redelivery: the handler runs twice before the commit (a crash after handling), then
    // the job is delivered — one enrolment, one candidate set.
    let newcomer = Population::generate(777, 1, 0.0);
    let fresh = apply(
        &services,
        100,
        &newcomer.subjects[0].templates,
        newcomer.subjects[0].face_jpeg(),
        false,
    )
    .await;
    let dup_of = 3;
    let dup = apply(
        &services,
        101,
        &pop.fresh_impressions(dup_of, 5),
        pop.subjects[dup_of].face_jpeg(),
        false,
    )
    .await;
    let stage_handle = DedupStage::new(engine.clone());
    for id in [&fresh, &dup] {
        let app = services.store.application(id).await.unwrap().unwrap();
        for _ in 0..2 {
            let ctx = JobContext {
                job: Job::new(stage::STAGE_NAME, id.as_str()),
                services: services.clone(),
            };
            let _ = stage_handle.handle(&ctx, &app).await.expect("handled");
        }
        let mut tx = services.store.begin().await.unwrap();
        for _ in 0..2 {
            Store::enqueue_job(
                &mut tx,
                &Job::new(stage::STAGE_NAME, id.as_str()),
                services.clock.now(),
            )
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
    }
    settle(&services, &[fresh.clone(), dup.clone()]).await;
    assert_eq!(state(&services, &fresh).await, ApplicationState::KeysIssued);
    assert_eq!(
        state(&services, &dup).await,
        ApplicationState::PossibleDuplicate
    );
    assert_eq!(
        count(
            &services,
            "SELECT COUNT(*) FROM dedup_enrolled WHERE application_id = $1",
            Some(&fresh)
        )
        .await,
        1
    );
    assert_eq!(engine.shards().len(), by_person.len() + 1, "enrolled once");
    let dup_cands = cardpipe_common::contract::candidates(&services.store, &dup)
        .await
        .unwrap();
    assert_eq!(dup_cands[0].candidate_id, {
        // The clear enrolment of that person.
        let p = pop.subjects[dup_of].person;
        let clear = by_person[&p]
            .iter()
            .find(|&&i| !flagged.contains(&i))
            .copied()
            .unwrap();
        ids[clear].0.clone()
    });
    let rows = count(
        &services,
        "SELECT COUNT(*) FROM dedup_candidates WHERE application_id = $1",
        Some(&dup),
    )
    .await;
    assert_eq!(rows as usize, dup_cands.len(), "one candidate set");

    // Adjudication API.
    let router = adjudication::router_with_engine(services.clone(), Some(engine.clone()));
    let (st, body) = call(&router, "GET", "/api/adjudications", None).await;
    assert_eq!(st, StatusCode::OK);
    let pending = json_of(&body)["pending"].as_array().unwrap().len();
    assert_eq!(pending, flagged.len() + 1);
    let (st, body) = call(&router, "GET", &format!("/api/adjudications/{dup}"), None).await;
    assert_eq!(st, StatusCode::OK);
    let d = json_of(&body);
    assert_eq!(
        d["candidates"][0]["application_id"],
        json!(dup_cands[0].candidate_id)
    );
    assert_eq!(d["candidates"][0]["fingers"].as_array().unwrap().len(), 10);
    for which in ["applicant".to_owned(), dup_cands[0].candidate_id.clone()] {
        let (st, body) = call(
            &router,
            "GET",
            &format!("/api/adjudications/{dup}/photo/{which}"),
            None,
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(&body[..2], &[0xFF, 0xD8], "a JPEG");
    }
    let (st, _) = call(
        &router,
        "GET",
        &format!("/api/adjudications/{dup}/photo/{fresh}"),
        None,
    )
    .await;
    assert_eq!(
        st,
        StatusCode::NOT_FOUND,
        "only the applicant and its candidates"
    );

    // Confirmed duplicate: final, callback queued, history names the operator.
    let (st, body) = call(
        &router,
        "POST",
        &format!("/api/adjudications/{dup}/decision"),
        Some(json!({"decision": "confirmed_duplicate", "reason": "same person, photos match", "operator": "alice"})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        state(&services, &dup).await,
        ApplicationState::ConfirmedDuplicate
    );
    let history = services.store.history(&dup).await.unwrap();
    let last = history.last().unwrap();
    assert_eq!(last.actor, "operator:alice");
    assert_eq!(last.reason.as_deref(), Some("same person, photos match"));
    let callbacks = count(
        &services,
        "SELECT COUNT(*) FROM outbox WHERE topic = 'callback' AND subject = $1",
        Some(&dup),
    )
    .await;
    assert_eq!(callbacks, 1);
    // Deciding again: 409 with a clear message.
    let (st, body) = call(
        &router,
        "POST",
        &format!("/api/adjudications/{dup}/decision"),
        Some(json!({"decision": "cleared", "reason": "oops", "operator": "bob"})),
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert!(
        json_of(&body)["error"]
            .as_str()
            .unwrap()
            .contains("confirmed_duplicate")
    );
    let (st, _) = call(
        &router,
        "POST",
        &format!("/api/adjudications/{}/decision", ids[flagged[0]]),
        Some(json!({"decision": "maybe", "reason": "x", "operator": "bob"})),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);

    // Cleared: continues to keys and joins the gallery.
    let cleared = ids[flagged[0]].clone();
    let (st, _) = call(
        &router,
        "POST",
        &format!("/api/adjudications/{cleared}/decision"),
        Some(
            json!({"decision": "cleared", "reason": "twins, different people", "operator": "bob"}),
        ),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    settle(&services, std::slice::from_ref(&cleared)).await;
    assert_eq!(
        state(&services, &cleared).await,
        ApplicationState::KeysIssued
    );
    assert!(engine.shards().contains(cleared.as_str()));
    running.shutdown().await.expect("shutdown");
    let gallery = engine.shards().len();

    // Restart: a new engine loads the gallery from the store and still catches an earlier
    // enrolment.
    let reloaded = DedupEngine::new(config).expect("engine");
    let late = apply(
        &services,
        102,
        &pop.fresh_impressions(0, 6),
        pop.subjects[0].face_jpeg(),
        true,
    )
    .await;
    let running = start(&services, &reloaded).await;
    settle(&services, std::slice::from_ref(&late)).await;
    assert_eq!(reloaded.shards().len(), gallery);
    assert_eq!(
        state(&services, &late).await,
        ApplicationState::PossibleDuplicate
    );
    let c = cardpipe_common::contract::candidates(&services.store, &late)
        .await
        .unwrap();
    assert_eq!(
        person_of_id.get(&c[0].candidate_id),
        Some(&pop.subjects[0].person)
    );
    running.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_stage_embedded() {
    scenario(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_stage_distributed() {
    scenario(Mode::Distributed).await;
}

/// The unlocked search of a twin misses its sibling when the sibling is enrolled while the
/// search runs; the 1:1 comparison under the lock with everything enrolled since the search's
/// snapshot finds it, and only it.
async fn late_enrolment_is_caught(mode: Mode) {
    let (services, _guard) = testing::services(mode, None).await;
    let engine = DedupEngine::new(DedupConfig::default()).expect("engine");
    let pop = Population::generate(5151, 3, 0.0);
    let first = apply(&services, 0, &pop.subjects[0].templates, Vec::new(), false).await;
    let twin_prints = pop.fresh_impressions(0, 99);
    let twin = apply(&services, 1, &twin_prints, Vec::new(), false).await;
    let other = apply(&services, 2, &pop.subjects[1].templates, Vec::new(), false).await;
    engine.ready(&services).await.expect("ready");
    let twin_tp = cardpipe_biometrics::matcher::TenPrint::from_iso(&twin_prints).expect("prints");

    // The twin's search runs over an empty gallery: nothing.
    engine.refresh(&services).await.expect("refresh");
    let seen = engine.seen_seq();
    let (answers, probe) = engine
        .search_batched(&twin_tp, twin.as_str())
        .await
        .expect("search");
    let config = engine.config().clone();
    assert!(
        cardpipe_dedup::scatter::gather(answers.clone(), config.target_fpir, config.max_candidates)
            .is_empty()
    );

    // Meanwhile the first enrolment and an unrelated one are committed.
    for id in [&first, &other] {
        let templates = stage::load_templates(&services, id)
            .await
            .expect("templates");
        let mut tx = services.store.begin().await.expect("begin");
        stage::insert_enrolled(&mut tx, &services, id, &templates, services.clock.now())
            .await
            .expect("enrol");
        tx.commit().await.expect("commit");
    }
    let late = engine
        .late_enrolments(&services, seen, twin.as_str(), &twin_tp, Some(probe))
        .await
        .expect("late enrolments");
    assert_eq!(
        late.size, 2,
        "both enrolments made during the search are compared"
    );
    let score_of = |a: &cardpipe_dedup::scatter::ShardAnswer| {
        a.candidates
            .iter()
            .find(|c| c.reference_id == first.0)
            .map(|c| c.fused.score)
    };
    let from_row = score_of(&late);
    let mut all = answers;
    all.push(late);
    let found = cardpipe_dedup::scatter::gather(all, config.target_fpir, config.max_candidates);
    let ids: Vec<&str> = found.iter().map(|c| c.reference_id.as_str()).collect();
    assert_eq!(ids, vec![first.as_str()], "the twin's sibling, and only it");

    // Once in this process's gallery (as its own decisions enrol), a late subject is compared
    // there, from its kept expansion: the same answer as from its row.
    let first_tp =
        cardpipe_biometrics::matcher::TenPrint::from_iso(&pop.subjects[0].templates).unwrap();
    engine.enrol_local(first.as_str(), &first_tp, None);
    let from_gallery = engine
        .late_enrolments(&services, seen, twin.as_str(), &twin_tp, None)
        .await
        .expect("late enrolments from the gallery");
    assert_eq!(from_gallery.size, 2);
    assert!(from_row.is_some(), "the sibling is compared");
    assert_eq!(score_of(&from_gallery), from_row);

    // An application's own enrolment is never compared with itself (a redelivered job).
    let own = engine
        .late_enrolments(&services, seen, first.as_str(), &twin_tp, None)
        .await
        .expect("own");
    assert_eq!(own.size, 1);
    assert!(own.candidates.iter().all(|c| c.reference_id != first.0));
    // Nothing enrolled after the latest snapshot: nothing to compare.
    engine.refresh(&services).await.expect("refresh");
    let none = engine
        .late_enrolments(&services, engine.seen_seq(), twin.as_str(), &twin_tp, None)
        .await
        .expect("none");
    assert_eq!((none.size, none.candidates.len()), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_enrolment_is_caught_embedded() {
    late_enrolment_is_caught(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_enrolment_is_caught_distributed() {
    late_enrolment_is_caught(Mode::Distributed).await;
}
