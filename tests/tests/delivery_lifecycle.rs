//! Delivery from QC to the holder's hands, on both backend families (embedded: SQLite,
//! in-process broker, local files; distributed: PostgreSQL, RabbitMQ, S3), with a TestClock
//! moved through more than six months:
//!
//! real keys stage (certificates to revoke) → `personalized` → `qc_passed` (checked
//! transitions through the store API) → the shipping stage packs boxes per office → the
//! daily dispatch at the cut-off writes manifests → offices acknowledge boxes (a missing and
//! an extra card raise discrepancies) → a handover with a 1:1 fingerprint check → a transfer
//! that is followed → reminders on their days, never twice, never in quiet hours, through a
//! local HTTP SMS gateway (one transient failure retried, one permanent failure reported) →
//! voiding on the right day, certificates revoked and listed in the republished CRL, card
//! recalled — while a collected card is never voided. Two schedulers and two relays run
//! side by side throughout (replicas), and one scheduler is replaced mid-way (restart).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use cardpipe_biometrics::synth::PopulationSpec;
use cardpipe_common::audit;
use cardpipe_common::broker::{Job, RetryPolicy};
use cardpipe_common::clock::{Clock, TestClock, from_rfc3339};
use cardpipe_common::domain::applicant::{
    ApplicantGroup, ApplicantRecord, Biometrics, Fees, FingerprintEntry, Gender,
};
use cardpipe_common::domain::{ApplicationId, ApplicationState, Priority};
use cardpipe_common::records;
use cardpipe_common::runtime::pipeline::{self, RunningPipeline};
use cardpipe_common::runtime::relay::Relay;
use cardpipe_common::runtime::{Services, Stage, StageSettings};
use cardpipe_common::solar_hijri::SolarHijri;
use cardpipe_common::store::{NewApplication, Store, Transition};
use cardpipe_common::testing::stages::StepStage;
use cardpipe_common::testing::{self, Mode};
use cardpipe_delivery::background::Scheduler;
use cardpipe_delivery::clients::Caller;
use cardpipe_delivery::config::DeliveryConfig;
use cardpipe_delivery::dispatch;
use cardpipe_delivery::office::{self, BoxReceipt, Handover, OfficeChange, OfficeError};
use cardpipe_delivery::reminders::{self, SMS_TOPIC, SmsSink};
use cardpipe_delivery::shipping::ShippingStage;
use cardpipe_delivery::{Delivery, TEHRAN, offices, tehran_date};
use cardpipe_keys::stage::KeysStage;
use cardpipe_pki::settings::{Pki, PkiConfig};
use sqlx::Row;
use time::macros::{date, datetime};
use time::{Date, Duration, OffsetDateTime, Time};

const POPULATION: PopulationSpec = PopulationSpec {
    seed: 0xDE11,
    subjects: 8,
    duplicate_rate: 0.0,
};

/// A rejected mobile number: the gateway answers 400 for it (permanent failure).
const BAD_MOBILE: &str = "09990000000";

#[derive(Debug, Clone)]
struct Received {
    at: OffsetDateTime,
    to: String,
    text: String,
    message_id: String,
}

#[derive(Clone)]
struct Gateway {
    clock: Arc<TestClock>,
    received: Arc<Mutex<Vec<Received>>>,
    /// Message ids answered 503 once already.
    failed_once: Arc<Mutex<Vec<String>>>,
    /// Fail the first attempt of the message to this number.
    flaky_to: Arc<Mutex<Option<String>>>,
}

async fn gateway_handler(
    State(g): State<Gateway>,
    headers: HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> (StatusCode, Json<serde_json::Value>) {
    assert_eq!(
        headers.get("authorization").and_then(|v| v.to_str().ok()),
        Some("Bearer sms-test-token")
    );
    let to = body["to"].as_str().unwrap_or_default().to_owned();
    let id = body["message_id"].as_str().unwrap_or_default().to_owned();
    if to == BAD_MOBILE {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": "invalid number" })),
        );
    }
    let flaky = g.flaky_to.lock().unwrap().clone();
    if flaky.as_deref() == Some(to.as_str()) {
        let mut failed = g.failed_once.lock().unwrap();
        if !failed.contains(&id) {
            failed.push(id);
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({ "error": "busy" })),
            );
        }
    }
    g.received.lock().unwrap().push(Received {
        at: g.clock.now(),
        to,
        text: body["text"].as_str().unwrap_or_default().to_owned(),
        message_id: id.clone(),
    });
    (
        StatusCode::OK,
        Json(serde_json::json!({ "message_id": format!("gw-{id}") })),
    )
}

async fn start_gateway(clock: Arc<TestClock>) -> (String, Gateway) {
    let g = Gateway {
        clock,
        received: Arc::default(),
        failed_once: Arc::default(),
        flaky_to: Arc::default(),
    };
    let app = Router::new()
        .route("/sms", post(gateway_handler))
        .with_state(g.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/sms"), g)
}

fn tehran(date: Date, h: u8, m: u8) -> OffsetDateTime {
    date.with_time(Time::from_hms(h, m, 0).unwrap())
        .assume_offset(TEHRAN)
        .to_offset(time::UtcOffset::UTC)
}

struct Person {
    office: &'static str,
    group: ApplicantGroup,
    mobile: &'static str,
}

fn record(i: usize, p: &Person) -> (ApplicantRecord, Biometrics) {
    let sample = cardpipe_pki::lds::sample_input(2000 + i as u32);
    let templates = POPULATION.impressions(i as u64, 0);
    let record = ApplicantRecord {
        registry_id: format!("REG-D-{i}"),
        applied_on: date!(2025 - 12 - 20),
        tracking_code: format!("TC{i:08}"),
        payment_tracking_code: format!("PAY-{i}"),
        national_code: sample.personal.national_code.clone(),
        first_name: "مریم".into(),
        last_name: format!("احمدی{i}"),
        father_name: "حسن".into(),
        birth_date: date!(1990 - 03 - 21),
        birth_certificate_number: format!("{}", 5000 + i),
        gender: Gender::Female,
        postal_code: "1234567890".into(),
        address: "تهران، خیابان آزادی".into(),
        mobile: p.mobile.into(),
        landline: "02100000000".into(),
        applicant_group: p.group,
        previous_card_issued_on: None,
        pickup_office: p.office.into(),
        // The delivery fee is not prepaid: the office collects it at handover.
        fees: Fees {
            issuance_rial: 200_000,
            office_fee_rial: 90_000,
            delivery_fee_rial: 0,
        },
    };
    let biometrics = Biometrics {
        photo_jpeg: sample.photo_jpeg.clone(),
        fingerprints: templates
            .into_iter()
            .enumerate()
            .map(|(k, t)| FingerprintEntry {
                position: k as u8 + 1,
                template: Some(t),
                missing_reason: None,
            })
            .collect(),
    };
    (record, biometrics)
}

fn fast() -> StageSettings {
    StageSettings {
        concurrency: 2,
        prefetch: 4,
        retry: RetryPolicy {
            delays: vec![StdDuration::from_millis(100)],
            max_attempts: 5,
        },
    }
}

async fn wait_state(services: &Services, ids: &[ApplicationId], state: ApplicationState) {
    let deadline = tokio::time::Instant::now() + StdDuration::from_secs(120);
    for id in ids {
        loop {
            let app = services.store.application(id).await.unwrap().unwrap();
            if app.state == state {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} stuck in {} (waiting for {state})",
                app.state
            );
            tokio::time::sleep(StdDuration::from_millis(50)).await;
        }
    }
}

async fn move_to(
    services: &Services,
    id: &ApplicationId,
    from: ApplicationState,
    to: ApplicationState,
    next: Option<&str>,
) {
    let now = services.clock.now();
    let mut tx = services.store.begin().await.unwrap();
    assert!(
        Store::transition(
            &mut tx,
            &Transition {
                id,
                from,
                to,
                stage: "qc",
                attempt: 0,
                actor: "stage:qc",
                reason: None,
                at: now
            },
        )
        .await
        .unwrap()
    );
    if let Some(next) = next {
        Store::enqueue_job(&mut tx, &Job::new(next, id.as_str()), now)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

struct Env {
    services: Services,
    clock: Arc<TestClock>,
    delivery: Arc<Delivery>,
    pki: Arc<Pki>,
    gateway: Gateway,
    pipeline: Option<RunningPipeline>,
    relays: Vec<Relay>,
    _dirs: (Option<tempfile::TempDir>, tempfile::TempDir),
}

async fn env(mode: Mode) -> Env {
    // Saturday 10 January 2026, 09:00 in Tehran.
    let clock = Arc::new(TestClock::at(datetime!(2026-01-10 05:30 UTC)));
    let (services, guard) = testing::services(mode, Some(clock.clone() as Arc<dyn Clock>)).await;
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = Arc::new(
        Pki::open(
            PkiConfig {
                kdf_log_n: 10,
                ..PkiConfig::default()
            },
            pki_dir.path(),
        )
        .unwrap(),
    );
    let (url, gateway) = start_gateway(clock.clone()).await;
    let mut cfg = DeliveryConfig {
        box_capacity: 2,
        ..DeliveryConfig::default()
    };
    cfg.sms.url = url;
    cfg.sms.authorization = "Bearer sms-test-token".into();
    cfg.sms.rate_per_second = 500.0;
    cfg.sms.max_attempts = 4;
    let delivery = Delivery::new(&services, cfg).unwrap();
    let stages: Vec<(Arc<dyn Stage>, StageSettings)> = vec![
        // A stand-in personalizes below, so the keys stage issues the certificates itself
        // (off-card generation): voiding has certificates to revoke.
        (
            Arc::new(
                KeysStage::new(pki.clone())
                    .with_generation(cardpipe_pki::custody::KeyOrigin::OffCard),
            ),
            fast(),
        ),
        (
            Arc::new(StepStage::new(
                "personalize",
                &[ApplicationState::KeysIssued],
                ApplicationState::Personalized,
                None,
            )),
            fast(),
        ),
        (Arc::new(ShippingStage::new(delivery.clone())), fast()),
    ];
    // The pipeline's relay publishes jobs; the test drains SMS and callbacks itself (two
    // relays: replicas), so each step happens at a known clock time.
    let relay = Relay::new(services.clone()).with_poll_interval(StdDuration::from_millis(20));
    let running = pipeline::start(&services, stages, relay, StdDuration::from_secs(10))
        .await
        .unwrap();
    let relays = (0..2)
        .map(|_| {
            Relay::new(services.clone())
                .with_sink(
                    SMS_TOPIC,
                    Arc::new(SmsSink::new(delivery.clone(), services.clone()).unwrap()),
                )
                .with_sinks(cardpipe_keys::ops::sinks(&services, Some(pki.clone())))
        })
        .collect();
    Env {
        services,
        clock,
        delivery,
        pki,
        gateway,
        pipeline: Some(running),
        relays,
        _dirs: (guard, pki_dir),
    }
}

impl Env {
    async fn drain(&self) {
        for _ in 0..3 {
            for relay in &self.relays {
                relay.drain_once().await.unwrap();
            }
        }
    }

    async fn state(&self, id: &ApplicationId) -> ApplicationState {
        self.services
            .store
            .application(id)
            .await
            .unwrap()
            .unwrap()
            .state
    }

    async fn reminders(&self) -> Vec<(String, String, String, String, Option<String>, String)> {
        sqlx::query("SELECT application_id, kind, state, due_on, sent_at, office_code FROM delivery_reminders ORDER BY application_id, kind")
            .fetch_all(self.services.store.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.get::<String, _>("application_id"),
                    r.get::<String, _>("kind"),
                    r.get::<String, _>("state"),
                    r.get::<String, _>("due_on"),
                    r.get::<Option<String>, _>("sent_at"),
                    r.get::<String, _>("office_code"),
                )
            })
            .collect()
    }
}

async fn seed(env: &Env, people: &[Person]) -> Vec<ApplicationId> {
    let services = &env.services;
    let now = services.clock.now();
    let mut ids = Vec::new();
    for (i, p) in people.iter().enumerate() {
        let id = ApplicationId::generate();
        let (rec, bio) = record(i, p);
        let artifacts = records::put_biometrics(services, &id, &bio).await.unwrap();
        let mut tx = services.store.begin().await.unwrap();
        Store::insert_application(
            &mut tx,
            &NewApplication {
                id: id.clone(),
                registry_id: rec.registry_id.clone(),
                batch_id: None,
                state: ApplicationState::DedupClear,
                priority: Priority::Normal,
            },
            "registry:test",
            now,
        )
        .await
        .unwrap();
        records::insert_record(&mut tx, services, &id, &rec, &artifacts)
            .await
            .unwrap();
        Store::enqueue_job(&mut tx, &Job::new("keys", id.as_str()), now)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        ids.push(id);
    }
    ids
}

/// A centre-wide delivery API client (acts at every office).
fn centre() -> Caller {
    Caller::Centre("test-centre".into())
}

fn live_finger(person: usize, position: u8) -> String {
    let fresh = POPULATION.impressions(person as u64, 1_000_000_007);
    base64::engine::general_purpose::STANDARD.encode(&fresh[usize::from(position) - 1])
}

async fn lifecycle(mode: Mode) {
    let mut env = env(mode).await;
    let services = env.services.clone();
    let people = [
        // 0 A: collects nothing, reminded, voided (flaky gateway on its first SMS).
        Person {
            office: "TEH-001",
            group: ApplicantGroup::FirstCard,
            mobile: "09120000001",
        },
        // 1 B: same box as A, reported missing by the office.
        Person {
            office: "TEH-001",
            group: ApplicantGroup::FirstCard,
            mobile: "09120000002",
        },
        // 2 C: collects (group 3: must present the previous card).
        Person {
            office: "TEH-002",
            group: ApplicantGroup::Replace13801389,
            mobile: "09120000003",
        },
        // 3 D: transferred from Isfahan to Tabriz after arrival; followed, then voided.
        Person {
            office: "ISF-001",
            group: ApplicantGroup::FirstCard,
            mobile: "09120000004",
        },
        // 4 E: re-routed before packing (TEH-001 → SYZ-001); its number is refused by the gateway.
        Person {
            office: "TEH-001",
            group: ApplicantGroup::LostOrChanged,
            mobile: BAD_MOBILE,
        },
    ];
    *env.gateway.flaky_to.lock().unwrap() = Some("09120000001".into());
    let ids = seed(&env, &people).await;
    let (a, b, c, d, e) = (&ids[0], &ids[1], &ids[2], &ids[3], &ids[4]);
    wait_state(&services, &ids, ApplicationState::Personalized).await;

    // A change of office before packing re-routes the card.
    let change = office::change_office(&env.delivery, &services, e.as_str(), "SYZ-001", &centre())
        .await
        .unwrap();
    assert_eq!(
        change,
        OfficeChange::Rerouted {
            office_code: "SYZ-001".into()
        }
    );
    let unknown = office::change_office(&env.delivery, &services, e.as_str(), "NOPE-1", &centre())
        .await
        .unwrap_err();
    assert!(
        matches!(unknown, OfficeError::BadRequest(ref m) if m.contains("not in the offices register")),
        "{unknown}"
    );

    // QC passes every card (checked transitions through the store API) and hands it to shipping.
    for id in &ids {
        move_to(
            &services,
            id,
            ApplicationState::Personalized,
            ApplicationState::QcPassed,
            Some("shipping"),
        )
        .await;
    }
    wait_state(&services, &ids, ApplicationState::Packed).await;
    let issued_on = tehran_date(env.clock.now());
    let void_on = cardpipe_delivery::add_months(issued_on, 6);
    assert_eq!(void_on, date!(2026 - 07 - 10));

    // Boxes: TEH-001 holds A and B (capacity 2: sealed), TEH-002 C, ISF-001 D, SYZ-001 E.
    let boxes: BTreeMap<String, (String, i64)> =
        sqlx::query("SELECT id, office_code, state, card_count FROM delivery_boxes")
            .fetch_all(services.store.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.get::<String, _>("office_code"),
                    (r.get::<String, _>("state"), r.get::<i64, _>("card_count")),
                )
            })
            .collect();
    assert_eq!(boxes.len(), 4, "{boxes:?}");
    assert_eq!(boxes["TEH-001"], ("sealed".to_owned(), 2));
    assert_eq!(boxes["SYZ-001"], ("open".to_owned(), 1));
    let box_of = |id: &ApplicationId| {
        let services = services.clone();
        let id = id.clone();
        async move { office::card(&services, &id).await.unwrap().unwrap().box_id }
    };
    let box_a = box_of(a).await;
    assert_eq!(box_a, box_of(b).await);
    assert_eq!(
        office::card(&services, e)
            .await
            .unwrap()
            .unwrap()
            .office_code,
        "SYZ-001"
    );

    // Packed: the office can no longer change until dispatch.
    assert!(matches!(
        office::change_office(&env.delivery, &services, d.as_str(), "TBZ-001", &centre()).await,
        Err(OfficeError::Conflict(_))
    ));

    // Two schedulers (replicas). Before the cut-off nothing leaves.
    let mut schedulers = vec![
        Scheduler::new(env.delivery.clone(), services.clone()),
        Scheduler::new(env.delivery.clone(), services.clone()),
    ];
    for s in &schedulers {
        assert_eq!(s.tick().await.unwrap().dispatched, 0);
    }
    assert_eq!(env.state(a).await, ApplicationState::Packed);

    // 16:05: the cut-off passed — one dispatch, whichever replica holds the lease.
    env.clock.set(tehran(issued_on, 16, 5));
    let mut dispatched = 0;
    for _ in 0..2 {
        for s in &schedulers {
            dispatched += s.tick().await.unwrap().dispatched;
        }
    }
    assert_eq!(dispatched, 5);
    for id in &ids {
        assert_eq!(env.state(id).await, ApplicationState::Shipped);
    }
    let shipments = sqlx::query("SELECT id, carrier_reference, boxes, cards, manifest_json_key, manifest_csv_key, manifest_html_key FROM delivery_shipments")
        .fetch_all(services.store.pool())
        .await
        .unwrap();
    assert_eq!(shipments.len(), 1);
    let shipment = &shipments[0];
    assert_eq!(shipment.get::<i64, _>("boxes"), 4);
    assert_eq!(shipment.get::<i64, _>("cards"), 5);
    assert!(
        shipment
            .get::<String, _>("carrier_reference")
            .starts_with("EMS20260110-")
    );
    let json_key: String = shipment.get("manifest_json_key");
    // Sealed at rest (holders' names): not readable without the envelope key.
    let stored = services.objects.get(&json_key).await.unwrap().unwrap();
    assert!(serde_json::from_slice::<serde_json::Value>(&stored).is_err());
    let manifest: serde_json::Value = serde_json::from_slice(
        &cardpipe_delivery::dispatch::load_manifest(&services, &json_key)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["boxes"].as_array().unwrap().len(), 4);
    let csv = String::from_utf8(
        cardpipe_delivery::dispatch::load_manifest(
            &services,
            &shipment.get::<String, _>("manifest_csv_key"),
        )
        .await
        .unwrap()
        .to_vec(),
    )
    .unwrap();
    assert_eq!(csv.lines().count(), 6, "{csv}");
    assert!(csv.contains(&box_a) && csv.contains(a.as_str()));
    let html = String::from_utf8(
        cardpipe_delivery::dispatch::load_manifest(
            &services,
            &shipment.get::<String, _>("manifest_html_key"),
        )
        .await
        .unwrap()
        .to_vec(),
    )
    .unwrap();
    assert!(
        html.contains("dir=\"rtl\"") && html.contains("۲۰ دی ۱۴۰۴"),
        "dispatch date in Solar Hijri"
    );
    let national = records::load_record(&services, a)
        .await
        .unwrap()
        .national_code;
    assert!(
        !csv.contains(&national) && !html.contains(&national),
        "national codes are masked"
    );
    let box_html_key: String =
        sqlx::query("SELECT manifest_html_key FROM delivery_boxes WHERE id = $1")
            .bind(&box_a)
            .fetch_one(services.store.pool())
            .await
            .unwrap()
            .get("manifest_html_key");
    assert!(services.objects.get(&box_html_key).await.unwrap().is_some());

    // After dispatch a change of office is a transfer (D, once its box reaches Isfahan).
    // Day 2, 10:00: offices acknowledge their boxes. TEH-001 finds A but not B, and a stray card.
    let day2 = issued_on.next_day().unwrap();
    env.clock.set(tehran(day2, 10, 0));
    let receipt = office::receive_box(
        &env.delivery,
        &services,
        &box_a,
        &BoxReceipt {
            office_code: "TEH-001".into(),
            clerk: "clerk1".into(),
            scanned: Some(vec![a.to_string(), "STRAY-CARD".into()]),
        },
        &centre(),
    )
    .await
    .unwrap();
    assert_eq!(receipt.received, vec![a.to_string()]);
    assert_eq!(receipt.missing, vec![b.to_string()]);
    assert_eq!(receipt.extra, vec!["STRAY-CARD".to_owned()]);
    assert_eq!(env.delivery.metrics.discrepancy_count("missing"), 1);
    assert_eq!(env.delivery.metrics.discrepancy_count("extra"), 1);
    let discrepancies: i64 =
        sqlx::query("SELECT COUNT(*) AS n FROM delivery_discrepancies WHERE box_id = $1")
            .bind(&box_a)
            .fetch_one(services.store.pool())
            .await
            .unwrap()
            .get("n");
    assert_eq!(discrepancies, 2);
    let again = office::receive_box(
        &env.delivery,
        &services,
        &box_a,
        &BoxReceipt {
            office_code: "TEH-001".into(),
            clerk: "clerk1".into(),
            scanned: None,
        },
        &centre(),
    )
    .await;
    assert!(matches!(again, Err(OfficeError::Conflict(ref m)) if m.contains("already received")));
    let wrong_office = office::receive_box(
        &env.delivery,
        &services,
        &box_of(c).await,
        &BoxReceipt {
            office_code: "TEH-001".into(),
            clerk: "clerk1".into(),
            scanned: None,
        },
        &centre(),
    )
    .await;
    assert!(
        matches!(wrong_office, Err(OfficeError::Conflict(ref m)) if m.contains("addressed to office TEH-002"))
    );
    for (id, office_code) in [(c, "TEH-002"), (d, "ISF-001"), (e, "SYZ-001")] {
        office::receive_box(
            &env.delivery,
            &services,
            &box_of(id).await,
            &BoxReceipt {
                office_code: office_code.into(),
                clerk: "clerk2".into(),
                scanned: None,
            },
            &centre(),
        )
        .await
        .unwrap();
        assert_eq!(env.state(id).await, ApplicationState::AtOffice);
    }
    assert_eq!(env.state(b).await, ApplicationState::Shipped);

    // Now the calendar: every day to 20 July 2026, three times a day (03:00 and 23:00 are
    // quiet hours, 09:00 is not), schedulers and relays alternating like replicas; one
    // scheduler is replaced by a fresh one (a restart) in April.
    let mut transfer_id = None;
    let day3 = day2.next_day().unwrap();
    let mut day = day2;
    while day <= date!(2026 - 07 - 20) {
        if day == date!(2026 - 04 - 01) {
            schedulers[0] = Scheduler::new(env.delivery.clone(), services.clone());
        }
        // The voiding day: nothing happens before the voiding time (01:00).
        if day == void_on {
            env.clock.set(tehran(day, 0, 30));
            for s in &schedulers {
                s.tick().await.unwrap();
            }
            assert_eq!(
                env.state(a).await,
                ApplicationState::AtOffice,
                "not voided before the voiding time"
            );
        }
        for (h, m) in [(3, 0), (9, 0), (9, 20), (12, 0), (12, 20), (23, 0)] {
            if tehran(day, h, m) < env.clock.now() {
                continue;
            }
            env.clock.set(tehran(day, h, m));
            for s in &schedulers {
                s.tick().await.unwrap();
            }
            env.drain().await;
            if (h, m) != (12, 20) {
                continue;
            }
            // Day 3: C collects its card (checks first, then the real thing).
            if day == day3 {
                // Handover of C on day 3: checks first, then the real thing.
                let good = Handover {
                    application_id: c.to_string(),
                    office_code: "TEH-002".into(),
                    clerk: "clerk3".into(),
                    fingerprint: live_finger(2, 2),
                    finger_position: None,
                    previous_card_presented: true,
                    pins_set: true,
                    fee_rial: 20_000,
                };
                let wrong_person = Handover {
                    fingerprint: live_finger(5, 2),
                    ..good.clone()
                };
                assert!(matches!(
                    office::handover(&env.delivery, &services, &wrong_person, &centre()).await,
                    Err(OfficeError::Forbidden(_))
                ));
                // Fingerprint attempts are limited per card and day ([delivery]
                // handover_attempts_per_day = 3): two more wrong fingers use them up, and then
                // even the right one is refused until a supervisor unlocks the card.
                for _ in 0..2 {
                    assert!(matches!(
                        office::handover(&env.delivery, &services, &wrong_person, &centre()).await,
                        Err(OfficeError::Forbidden(ref m)) if m.contains("does not match")
                    ));
                }
                assert!(matches!(
                    office::handover(&env.delivery, &services, &good, &centre()).await,
                    Err(OfficeError::Forbidden(ref m)) if m.contains("used up")
                ));
                assert_eq!(env.state(c).await, ApplicationState::AtOffice);
                office::unlock_handover(&services, c.as_str(), ("sara", "supervisor"))
                    .await
                    .unwrap();
                let attempts: Vec<(String, String)> = sqlx::query(
                    "SELECT action, details FROM audit_log WHERE subject = $1 AND action LIKE 'delivery.handover%' ORDER BY seq",
                )
                .bind(c.as_str())
                .fetch_all(services.store.pool())
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get("action"), r.get("details")))
                .collect();
                assert_eq!(
                    attempts.len(),
                    5,
                    "three refused with their score, one exhausted, one unlock: {attempts:?}"
                );
                assert!(
                    attempts[..3]
                        .iter()
                        .all(|(a, d)| a == "delivery.handover_refused" && d.contains("\"score\"")),
                    "{attempts:?}"
                );
                assert!(attempts[3].1.contains("attempts_exhausted"), "{attempts:?}");
                assert_eq!(attempts[4].0, "delivery.handover_unlock");
                let no_card = Handover {
                    previous_card_presented: false,
                    ..good.clone()
                };
                assert!(
                    matches!(office::handover(&env.delivery, &services, &no_card, &centre()).await, Err(OfficeError::Unprocessable(ref m)) if m.contains("previous"))
                );
                let no_pins = Handover {
                    pins_set: false,
                    ..good.clone()
                };
                assert!(
                    matches!(office::handover(&env.delivery, &services, &no_pins, &centre()).await, Err(OfficeError::Unprocessable(ref m)) if m.contains("PIN"))
                );
                let elsewhere = Handover {
                    office_code: "TEH-001".into(),
                    ..good.clone()
                };
                assert!(matches!(
                    office::handover(&env.delivery, &services, &elsewhere, &centre()).await,
                    Err(OfficeError::Conflict(_))
                ));
                let garbage = Handover {
                    fingerprint: "bm90IGEgdGVtcGxhdGU=".into(),
                    ..good.clone()
                };
                assert!(
                    matches!(office::handover(&env.delivery, &services, &garbage, &centre()).await, Err(OfficeError::BadRequest(ref m)) if m.starts_with("fingerprint"))
                );
                let overcharge = Handover {
                    fee_rial: 40_000,
                    ..good.clone()
                };
                assert!(
                    matches!(office::handover(&env.delivery, &services, &overcharge, &centre()).await, Err(OfficeError::Unprocessable(ref m)) if m.contains("20000"))
                );
                // A live record whose header says position 0 (unknown) needs finger_position;
                // a finger_position the header contradicts is refused, naming the field.
                let unknown_position = {
                    let b64 = base64::engine::general_purpose::STANDARD;
                    let mut rec = cardpipe_biometrics::iso19794_2::parse(
                        &b64.decode(live_finger(2, 2)).unwrap(),
                    )
                    .unwrap();
                    rec.views.iter_mut().for_each(|v| v.position = 0);
                    b64.encode(rec.to_bytes().unwrap())
                };
                let no_position = Handover {
                    fingerprint: unknown_position,
                    ..good.clone()
                };
                assert!(
                    matches!(office::handover(&env.delivery, &services, &no_position, &centre()).await, Err(OfficeError::BadRequest(ref m)) if m.starts_with("finger_position"))
                );
                let contradicted = Handover {
                    finger_position: Some(3),
                    ..good.clone()
                };
                assert!(
                    matches!(office::handover(&env.delivery, &services, &contradicted, &centre()).await, Err(OfficeError::BadRequest(ref m)) if m.starts_with("fingerprint") && m.contains('3'))
                );
                assert_eq!(env.state(c).await, ApplicationState::AtOffice);
                let done = office::handover(&env.delivery, &services, &good, &centre())
                    .await
                    .unwrap();
                assert!(!done.double_fee);
                assert_eq!(env.state(c).await, ApplicationState::Collected);
                let audit_actions: Vec<String> =
                    sqlx::query("SELECT action FROM audit_log WHERE subject = $1 ORDER BY seq")
                        .bind(c.as_str())
                        .fetch_all(services.store.pool())
                        .await
                        .unwrap()
                        .iter()
                        .map(|r| r.get("action"))
                        .collect();
                assert!(
                    audit_actions.contains(&"delivery.handover".to_owned()),
                    "{audit_actions:?}"
                );
                assert!(
                    audit_actions.contains(&"delivery.handover_refused".to_owned()),
                    "{audit_actions:?}"
                );
                let callbacks: Vec<String> = sqlx::query(
                    "SELECT payload FROM outbox WHERE topic = 'callback' AND subject = $1",
                )
                .bind(c.as_str())
                .fetch_all(services.store.pool())
                .await
                .unwrap()
                .iter()
                .map(|r| r.get("payload"))
                .collect();
                assert!(
                    callbacks.iter().any(|p| p.contains("\"collected\"")),
                    "{callbacks:?}"
                );
            }
            // D moves to Tabriz (a transfer); three days later the Tabriz office receives it.
            if day == date!(2026 - 01 - 14) {
                match office::change_office(
                    &env.delivery,
                    &services,
                    d.as_str(),
                    "TBZ-001",
                    &centre(),
                )
                .await
                .unwrap()
                {
                    OfficeChange::Transfer {
                        transfer_id: t,
                        from_office,
                        to_office,
                    } => {
                        assert_eq!(
                            (from_office.as_str(), to_office.as_str()),
                            ("ISF-001", "TBZ-001")
                        );
                        transfer_id = Some(t);
                    }
                    other => panic!("expected a transfer, got {other:?}"),
                }
                let in_transit = Handover {
                    application_id: d.to_string(),
                    office_code: "TBZ-001".into(),
                    clerk: "clerk5".into(),
                    fingerprint: live_finger(3, 1),
                    finger_position: None,
                    previous_card_presented: false,
                    pins_set: true,
                    fee_rial: 20_000,
                };
                assert!(
                    matches!(office::handover(&env.delivery, &services, &in_transit, &centre()).await, Err(OfficeError::Conflict(ref m)) if m.contains("transferred"))
                );
                // The registry sees it on its way, not at the new office.
                assert_eq!(env.state(d).await, ApplicationState::InTransit);
            }
            if day == date!(2026 - 01 - 17) {
                let t = transfer_id.clone().unwrap();
                assert!(matches!(
                    office::receive_transfer(&services, &t, "ISF-001", "clerk4", &centre()).await,
                    Err(OfficeError::Conflict(_))
                ));
                office::receive_transfer(&services, &t, "TBZ-001", "clerk4", &centre())
                    .await
                    .unwrap();
                assert_eq!(env.state(d).await, ApplicationState::AtOffice);
            }
        }
        day = day.next_day().unwrap();
    }

    // B's and the stray card's discrepancies were never resolved: the scheduler's gauge shows them.
    assert_eq!(env.delivery.metrics.discrepancies_open(), 2);
    assert!(
        services
            .metrics
            .encode()
            .contains("cardpipe_delivery_discrepancies_open 2")
    );

    // States at the end.
    assert_eq!(env.state(a).await, ApplicationState::Voided);
    assert_eq!(env.state(b).await, ApplicationState::Shipped);
    assert_eq!(env.state(c).await, ApplicationState::Collected);
    assert_eq!(env.state(d).await, ApplicationState::Voided);
    assert_eq!(env.state(e).await, ApplicationState::Voided);
    for id in [a, d, e] {
        let history = services.store.history(id).await.unwrap();
        let voided = history
            .iter()
            .find(|h| h.to_state == ApplicationState::Voided)
            .unwrap();
        assert_eq!(tehran_date(voided.at), void_on, "voided on the right day");
        assert!(voided.at.to_offset(TEHRAN).time() >= Time::from_hms(1, 0, 0).unwrap());
    }

    // Revocation: A's certificates revoked as voided and listed in the republished CRL; C's valid.
    let certs_a = cardpipe_pki::store::certificates_of(&services.store, a)
        .await
        .unwrap();
    assert_eq!(certs_a.len(), 2);
    assert!(
        certs_a
            .iter()
            .all(|c| c.status == "revoked" && c.revocation_cause.as_deref() == Some("voided"))
    );
    let certs_c = cardpipe_pki::store::certificates_of(&services.store, c)
        .await
        .unwrap();
    assert!(certs_c.iter().all(|c| c.status == "valid"));
    let latest = services
        .objects
        .get(cardpipe_keys::ops::LATEST_CRL_KEY)
        .await
        .unwrap()
        .expect("CRL republished");
    let issuing = env
        .pki
        .current(&services)
        .await
        .unwrap()
        .hierarchy
        .issuing
        .clone();
    let crl = cardpipe_pki::crl::parse_crl(&latest, &issuing).unwrap();
    let listed: Vec<String> = crl
        .revoked
        .iter()
        .map(|(s, _)| s.to_ascii_lowercase())
        .collect();
    for cert in &certs_a {
        assert!(
            listed.contains(&cert.serial.to_ascii_lowercase()),
            "{} not in the CRL",
            cert.serial
        );
    }
    for cert in &certs_c {
        assert!(!listed.contains(&cert.serial.to_ascii_lowercase()));
    }
    // Recalls: A at TEH-001, D at its new office.
    let recalls: BTreeMap<String, String> =
        sqlx::query("SELECT application_id, office_code FROM card_recalls")
            .fetch_all(services.store.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get("application_id"), r.get("office_code")))
            .collect();
    assert_eq!(recalls.len(), 3);
    assert_eq!(recalls[a.as_str()], "TEH-001");
    assert_eq!(recalls[d.as_str()], "TBZ-001");
    // The daily runs happened once per day.
    let runs: i64 = sqlx::query(
        "SELECT COUNT(*) AS n FROM scheduled_runs WHERE name = 'delivery-voiding' AND period = $1",
    )
    .bind(void_on.to_string())
    .fetch_one(services.store.pool())
    .await
    .unwrap()
    .get("n");
    assert_eq!(runs, 1);

    // Reminders: each on its day, each exactly once, none in quiet hours.
    let reminders = env.reminders().await;
    let kinds_of = |id: &ApplicationId| -> Vec<String> {
        reminders
            .iter()
            .filter(|r| r.0 == id.as_str())
            .map(|r| r.1.clone())
            .collect()
    };
    assert_eq!(
        kinds_of(a),
        vec![
            "after_30d",
            "after_7d",
            "after_90d",
            "arrival:TEH-001",
            "final_notice",
            "month_before_voiding",
            "voided"
        ]
    );
    assert!(
        kinds_of(b).is_empty(),
        "a card that never reached an office gets no SMS"
    );
    assert_eq!(
        kinds_of(c),
        vec!["arrival:TEH-002"],
        "nothing after collection"
    );
    assert!(
        kinds_of(d).contains(&"arrival:ISF-001".to_owned())
            && kinds_of(d).contains(&"arrival:TBZ-001".to_owned())
    );
    let expected_a: HashMap<&str, Date> = [
        ("arrival:TEH-001", day2),
        ("after_7d", day2 + Duration::days(7)),
        ("after_30d", day2 + Duration::days(30)),
        ("after_90d", day2 + Duration::days(90)),
        ("month_before_voiding", date!(2026 - 06 - 10)),
        ("final_notice", date!(2026 - 07 - 03)),
        ("voided", void_on),
    ]
    .into_iter()
    .collect();
    for r in reminders.iter().filter(|r| r.0 == a.as_str()) {
        assert_eq!(r.2, "sent", "{r:?}");
        let sent = from_rfc3339(r.4.as_deref().unwrap()).unwrap();
        assert_eq!(
            tehran_date(sent),
            expected_a[r.1.as_str()],
            "{} sent on its day",
            r.1
        );
    }
    // E's number is refused by the gateway: reported, never retried forever.
    let e_rows: Vec<_> = reminders.iter().filter(|r| r.0 == e.as_str()).collect();
    assert!(!e_rows.is_empty());
    assert!(e_rows.iter().all(|r| r.2 == "failed"), "{e_rows:?}");
    assert!(
        env.delivery
            .metrics
            .sms_count("ready_for_pickup", "permanent_failure")
            >= 1
    );
    assert!(
        env.delivery.metrics.sms_count("ready_for_pickup", "failed") >= 1,
        "A's first arrival SMS failed once and was retried"
    );

    let received = env.gateway.received.lock().unwrap().clone();
    let mut per_id: HashMap<&str, usize> = HashMap::new();
    for r in &received {
        *per_id.entry(r.message_id.as_str()).or_default() += 1;
        let local = r.at.to_offset(TEHRAN).time();
        assert!(
            local >= Time::from_hms(8, 0, 0).unwrap() && local < Time::from_hms(22, 0, 0).unwrap(),
            "SMS at {local} (quiet hours)"
        );
        assert_ne!(r.to, BAD_MOBILE);
    }
    assert!(
        per_id.values().all(|n| *n == 1),
        "an SMS was delivered twice: {per_id:?}"
    );
    let sent_rows = reminders.iter().filter(|r| r.2 == "sent").count();
    assert_eq!(received.len(), sent_rows);

    // The texts: Persian, office name and address, Solar Hijri dates in Persian digits.
    let teh = offices::get(&services.store, "TEH-001")
        .await
        .unwrap()
        .unwrap();
    let tbz = offices::get(&services.store, "TBZ-001")
        .await
        .unwrap()
        .unwrap();
    let isf = offices::get(&services.store, "ISF-001")
        .await
        .unwrap()
        .unwrap();
    let texts_to = |to: &str| -> Vec<String> {
        received
            .iter()
            .filter(|r| r.to == to)
            .map(|r| r.text.clone())
            .collect()
    };
    let a_texts = texts_to("09120000001");
    assert_eq!(a_texts.len(), 7);
    assert!(a_texts[0].contains(&teh.name) && a_texts[0].contains(&teh.address));
    // Arrival on 11 January 2026 = 21 Dey 1404; the last day to collect 9 July 2026 = 18 Tir 1405.
    assert!(a_texts[0].contains("۲۱ دی ۱۴۰۴"), "{}", a_texts[0]);
    // A first card: the birth certificate, not a previous card; the fee the office will ask.
    assert!(
        a_texts[0].contains("با شناسنامه مراجعه") && !a_texts[0].contains("کارت ملی قبلی"),
        "{}",
        a_texts[0]
    );
    assert!(a_texts[0].contains("۲۰٬۰۰۰ ریال"), "{}", a_texts[0]);
    let c_texts = texts_to("09120000003");
    assert!(
        c_texts[0].contains("کارت ملی قبلی"),
        "group 3 brings the previous card: {}",
        c_texts[0]
    );
    assert!(a_texts[1].contains("۱۸ تیر ۱۴۰۵"), "{}", a_texts[1]);
    assert!(
        a_texts.last().unwrap().contains("دو برابر (۴۰۰٬۰۰۰ ریال)"),
        "the voiding notice tells of the double fee"
    );
    let d_texts = texts_to("09120000004");
    assert!(d_texts[0].contains(&isf.name));
    assert!(
        d_texts[1].contains(&tbz.name) && d_texts[1].contains(&tbz.address),
        "{}",
        d_texts[1]
    );
    // Arrival at Isfahan, arrival at Tabriz, 7/30/90 days, a month before, final, voided.
    assert_eq!(d_texts.len(), 8, "{d_texts:#?}");
    // Reminders after the transfer name the new office (the voiding notice names none).
    assert!(
        d_texts[1..7]
            .iter()
            .all(|t| t.contains(&tbz.name) && !t.contains(&isf.name)),
        "{d_texts:#?}"
    );
    assert!(!d_texts[7].contains(&isf.name) && d_texts[7].contains("دو برابر"));

    // Solar Hijri sanity on the texts' calendar.
    assert_eq!(
        SolarHijri::from_gregorian(date!(2026 - 01 - 11))
            .unwrap()
            .long(),
        "۲۱ دی ۱۴۰۴"
    );

    // A holder whose earlier card was voided pays double: a new application of A's person.
    let (mut rec, bio) = record(0, &people[0]);
    rec.registry_id = "REG-D-0-again".into();
    rec.tracking_code = "TC-AGAIN".into();
    let again_id = ApplicationId::generate();
    let artifacts = records::put_biometrics(&services, &again_id, &bio)
        .await
        .unwrap();
    let mut tx = services.store.begin().await.unwrap();
    Store::insert_application(
        &mut tx,
        &NewApplication {
            id: again_id.clone(),
            registry_id: rec.registry_id.clone(),
            batch_id: None,
            state: ApplicationState::AtOffice,
            priority: Priority::Normal,
        },
        "registry:test",
        env.clock.now(),
    )
    .await
    .unwrap();
    records::insert_record(&mut tx, &services, &again_id, &rec, &artifacts)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        office::fee_due(&services, &again_id).await.unwrap(),
        (20_000, true),
        "after a voided card the issuance fee doubled (paid before enrolment); the delivery fee does not"
    );

    env.pipeline.take().unwrap().shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lifecycle_embedded() {
    lifecycle(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lifecycle_distributed() {
    lifecycle(Mode::Distributed).await;
}

/// Seeds `people` and walks their cards to `packed` (keys and personalization by the stages,
/// QC passed through the store API, packing by the shipping stage).
async fn packed(env: &Env, people: &[Person]) -> Vec<ApplicationId> {
    let ids = seed(env, people).await;
    wait_state(&env.services, &ids, ApplicationState::Personalized).await;
    for id in &ids {
        move_to(
            &env.services,
            id,
            ApplicationState::Personalized,
            ApplicationState::QcPassed,
            Some("shipping"),
        )
        .await;
    }
    wait_state(&env.services, &ids, ApplicationState::Packed).await;
    ids
}

/// `cardpipe ops dispatch --now`: a supervisor ships every packed card before the cut-off, in
/// a shipment of its own, audited; the day's run at the cut-off then ships only what was
/// packed later, and a second dispatch with nothing packed ships nothing.
async fn dispatch_now(mode: Mode) {
    let mut env = env(mode).await;
    let services = env.services.clone();
    let people = [
        Person {
            office: "TEH-001",
            group: ApplicantGroup::FirstCard,
            mobile: "09120000011",
        },
        Person {
            office: "ISF-001",
            group: ApplicantGroup::FirstCard,
            mobile: "09120000012",
        },
    ];
    let ids = packed(&env, &people).await;
    let scheduler = Scheduler::new(env.delivery.clone(), services.clone());
    assert_eq!(
        scheduler.tick().await.unwrap().dispatched,
        0,
        "09:00: before the cut-off"
    );

    let shipped = dispatch::dispatch_now(&env.delivery, &services, ("chief", "supervisor"))
        .await
        .unwrap();
    assert_eq!((shipped.cards, shipped.boxes), (2, 2));
    for id in &ids {
        assert_eq!(env.state(id).await, ApplicationState::Shipped);
    }
    let audited = audit::recent(&services.store, shipped.shipment_id.as_deref(), 10)
        .await
        .unwrap();
    assert_eq!(audited.len(), 1);
    assert_eq!(
        (audited[0].actor.as_str(), audited[0].action.as_str()),
        ("chief", "delivery.dispatch_now")
    );
    // Nothing left: a second one ships nothing; the cut-off's run still happens, empty.
    let again = dispatch::dispatch_now(&env.delivery, &services, ("chief", "supervisor"))
        .await
        .unwrap();
    assert_eq!((again.shipment_id, again.cards), (None, 0));
    env.clock.set(tehran(tehran_date(env.clock.now()), 16, 5));
    assert_eq!(scheduler.tick().await.unwrap().dispatched, 0);
    let runs: i64 = sqlx::query("SELECT COUNT(*) AS n FROM scheduled_runs WHERE name = $1")
        .bind(dispatch::RUN_NAME)
        .fetch_one(services.store.pool())
        .await
        .unwrap()
        .get("n");
    assert_eq!(runs, 3, "two extra dispatches and the day's run");
    env.pipeline.take().unwrap().shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dispatch_now_embedded() {
    dispatch_now(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dispatch_now_distributed() {
    dispatch_now(Mode::Distributed).await;
}

/// Without a gateway a message is recorded `unsent` and written to the log file (its text in
/// Persian: what to bring, where, until when in Solar Hijri, the fee due); once a gateway is
/// configured the scheduler re-queues it and it is sent. A failed one is sent again by a
/// supervisor (audited).
async fn unsent_messages_go_out_when_a_gateway_comes(mode: Mode) {
    let mut env = env(mode).await;
    let services = env.services.clone();
    let people = [Person {
        office: "TEH-002",
        group: ApplicantGroup::Replace13801389,
        mobile: "09120000021",
    }];
    let ids = packed(&env, &people).await;
    dispatch::dispatch_now(&env.delivery, &services, ("chief", "supervisor"))
        .await
        .unwrap();
    let box_id = office::card(&services, &ids[0])
        .await
        .unwrap()
        .unwrap()
        .box_id;
    office::receive_box(
        &env.delivery,
        &services,
        &box_id,
        &BoxReceipt {
            office_code: "TEH-002".into(),
            clerk: "clerk1".into(),
            scanned: None,
        },
        &centre(),
    )
    .await
    .unwrap();
    assert_eq!(env.state(&ids[0]).await, ApplicationState::AtOffice);

    // No gateway: the arrival notice is unsent, and its text is in the log file.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("sms.ndjson");
    let mut cfg = env.delivery.cfg.clone();
    cfg.sms.url = String::new();
    cfg.sms.log_file = log.display().to_string();
    let offline = Delivery::new(&services, cfg).unwrap();
    let relay = Relay::new(services.clone()).with_sink(
        SMS_TOPIC,
        Arc::new(SmsSink::new(offline.clone(), services.clone()).unwrap()),
    );
    assert_eq!(
        Scheduler::new(offline.clone(), services.clone())
            .tick()
            .await
            .unwrap()
            .reminders,
        1
    );
    relay.drain_once().await.unwrap();
    let listed = reminders::messages(&services, Some("unsent"), 10)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(listed[0].kind.starts_with("arrival"));
    let line: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let text = line["text"].as_str().unwrap();
    // Masked: the operator prefix and the last two digits, the name by its initials.
    assert_eq!(line["to"], "0912•••••21");
    assert!(
        text.contains("م. ا.") && !text.contains("مریم"),
        "the name by its initials: {text}"
    );
    assert!(
        text.contains("کارت ملی قبلی"),
        "group 3 brings the previous card: {text}"
    );
    assert!(text.contains("۲۰٬۰۰۰ ریال"), "the delivery fee due: {text}");
    assert!(text.contains("۱۴۰۵"), "until when, Solar Hijri: {text}");
    assert!(env.gateway.received.lock().unwrap().is_empty());

    // A gateway is configured: the scheduler re-queues it and it is sent (a minute later:
    // the offline scheduler's lease has run out).
    env.clock.advance(Duration::minutes(1));
    let with_gateway = Scheduler::new(env.delivery.clone(), services.clone());
    with_gateway.tick().await.unwrap();
    env.drain().await;
    let sent = reminders::messages(&services, Some("sent"), 10)
        .await
        .unwrap();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(env.gateway.received.lock().unwrap().len(), 1);

    // A failed one goes out again at a supervisor's word, audited; a sent one does not.
    sqlx::query("UPDATE delivery_reminders SET state = 'failed' WHERE id = $1")
        .bind(&sent[0].id)
        .execute(services.store.pool())
        .await
        .unwrap();
    reminders::resend(
        &env.delivery,
        &services,
        &sent[0].id,
        ("chief", "supervisor"),
    )
    .await
    .unwrap();
    env.drain().await;
    assert_eq!(
        reminders::messages(&services, Some("sent"), 10)
            .await
            .unwrap()
            .len(),
        1
    );
    let err = reminders::resend(
        &env.delivery,
        &services,
        &sent[0].id,
        ("chief", "supervisor"),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("only failed or unsent"), "{err}");
    let audited = audit::recent(&services.store, Some(ids[0].as_str()), 50)
        .await
        .unwrap();
    assert!(
        audited
            .iter()
            .any(|e| e.action == "sms.resend" && e.actor == "chief")
    );
    env.pipeline.take().unwrap().shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unsent_messages_go_out_when_a_gateway_comes_embedded() {
    unsent_messages_go_out_when_a_gateway_comes(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unsent_messages_go_out_when_a_gateway_comes_distributed() {
    unsent_messages_go_out_when_a_gateway_comes(Mode::Distributed).await;
}
