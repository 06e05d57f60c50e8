//! Delivery figures: cards packed per second (the `shipping` stage through the real runtime),
//! the daily dispatch (manifests for every box), and reminders per second (creation by the
//! scheduler + delivery through the SMS outbox sink to a local HTTP gateway).
//!
//!     cargo run --release -p cardpipe-delivery --example bench -- embedded 2000
//!     cargo run --release -p cardpipe-delivery --example bench -- distributed 2000
//!
//! `distributed` needs the test services (PostgreSQL, RabbitMQ, S3) that tests/services.sh starts.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration as StdDuration, Instant};

use axum::routing::post;
use cardpipe_common::broker::{Job, RetryPolicy};
use cardpipe_common::clock::{Clock, TestClock};
use cardpipe_common::domain::applicant::{ApplicantGroup, ApplicantRecord, Fees, Gender};
use cardpipe_common::domain::{ApplicationId, ApplicationState, Priority};
use cardpipe_common::records;
use cardpipe_common::runtime::pipeline;
use cardpipe_common::runtime::relay::Relay;
use cardpipe_common::runtime::{Stage, StageSettings};
use cardpipe_common::store::{NewApplication, Store};
use cardpipe_common::testing::{self, Mode};
use cardpipe_delivery::config::DeliveryConfig;
use cardpipe_delivery::office::{self, BoxReceipt};
use cardpipe_delivery::reminders::{self, SMS_TOPIC, SmsSink};
use cardpipe_delivery::shipping::ShippingStage;
use cardpipe_delivery::{Delivery, dispatch, tehran_date};
use sqlx::Row;
use time::macros::datetime;

const OFFICES: [&str; 8] = [
    "TEH-001", "TEH-002", "ISF-003", "MHD-004", "SYZ-005", "TBZ-006", "KRJ-007", "QOM-001",
];

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = match args.get(1).map(String::as_str) {
        Some("distributed") => Mode::Distributed,
        Some("embedded") | None => Mode::Embedded,
        Some(other) => anyhow::bail!("mode must be embedded or distributed, got {other:?}"),
    };
    let n: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(2000);
    // Tuesday 13 January 2026, 10:00 Tehran.
    let clock = Arc::new(TestClock::at(datetime!(2026-01-13 06:30 UTC)));
    let (services, _guard) = testing::services(mode, Some(clock.clone() as Arc<dyn Clock>)).await;

    let hits = Arc::new(AtomicU64::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().route(
        "/sms",
        post(move || {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::Relaxed);
                axum::Json(serde_json::json!({ "message_id": "ok" }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut cfg = DeliveryConfig::default();
    cfg.sms.url = format!("http://{addr}/sms");
    cfg.sms.rate_per_second = 100_000.0;
    let delivery = Delivery::new(&services, cfg)?;
    delivery.ensure_offices(&services).await?;

    // Seed n applications in qc_passed with a sealed record and a shipping job.
    let now = services.clock.now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(200) {
        let mut tx = services.store.begin().await?;
        for &i in chunk {
            let id = ApplicationId::generate();
            Store::insert_application(
                &mut tx,
                &NewApplication {
                    id: id.clone(),
                    registry_id: format!("BENCH-{i}"),
                    batch_id: None,
                    state: ApplicationState::QcPassed,
                    priority: Priority::Normal,
                },
                "registry:bench",
                now,
            )
            .await?;
            let record = ApplicantRecord {
                registry_id: format!("BENCH-{i}"),
                applied_on: tehran_date(now),
                tracking_code: format!("B{i:010}"),
                payment_tracking_code: format!("P{i}"),
                national_code: "0012345679".into(),
                first_name: "زهرا".into(),
                last_name: "کریمی".into(),
                father_name: "علی".into(),
                birth_date: time::macros::date!(1995 - 05 - 05),
                birth_certificate_number: "123".into(),
                gender: Gender::Female,
                postal_code: "1234567890".into(),
                address: "تهران".into(),
                mobile: format!("0912{i:07}"),
                landline: "02100000000".into(),
                applicant_group: ApplicantGroup::FirstCard,
                previous_card_issued_on: None,
                pickup_office: OFFICES[i % OFFICES.len()].into(),
                fees: Fees {
                    issuance_rial: 200_000,
                    office_fee_rial: 0,
                    delivery_fee_rial: 20_000,
                },
            };
            records::insert_record(&mut tx, &services, &id, &record, &[]).await?;
            Store::enqueue_job(&mut tx, &Job::new("shipping", id.as_str()), now).await?;
        }
        tx.commit().await?;
    }

    // 1. Packing through the runtime.
    let settings = StageSettings {
        concurrency: 8,
        prefetch: 32,
        retry: RetryPolicy {
            delays: vec![StdDuration::from_millis(50)],
            max_attempts: 10,
        },
    };
    let stages: Vec<(Arc<dyn Stage>, StageSettings)> =
        vec![(Arc::new(ShippingStage::new(delivery.clone())), settings)];
    let started = Instant::now();
    let running = pipeline::start(
        &services,
        stages,
        Relay::new(services.clone()).with_poll_interval(StdDuration::from_millis(10)),
        StdDuration::from_secs(10),
    )
    .await?;
    loop {
        let packed: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM applications WHERE state = 'packed'")
                .fetch_one(services.store.pool())
                .await?
                .try_get("n")?;
        if packed as usize >= n {
            break;
        }
        tokio::time::sleep(StdDuration::from_millis(20)).await;
    }
    let pack_secs = started.elapsed().as_secs_f64();
    running.shutdown().await?;

    // 2. Dispatch (manifests for every box) and office receipts.
    clock.set(datetime!(2026-01-13 13:00 UTC));
    let started = Instant::now();
    let day = tehran_date(clock.now());
    let shipped = dispatch::dispatch(&delivery, &services, day, "bench")
        .await?
        .expect("dispatched");
    let dispatch_secs = started.elapsed().as_secs_f64();
    let boxes: Vec<(String, String)> = sqlx::query("SELECT id, office_code FROM delivery_boxes")
        .fetch_all(services.store.pool())
        .await?
        .iter()
        .map(|r| (r.get("id"), r.get("office_code")))
        .collect();
    clock.set(datetime!(2026-01-14 06:30 UTC));
    let started = Instant::now();
    for (id, office) in &boxes {
        office::receive_box(
            &delivery,
            &services,
            id,
            &BoxReceipt {
                office_code: office.clone(),
                clerk: "bench".into(),
                scanned: None,
            },
            &cardpipe_delivery::clients::Caller::Centre("bench".into()),
        )
        .await?;
    }
    let receipt_secs = started.elapsed().as_secs_f64();

    // 3. Reminders: creation (arrival SMS for every card) and delivery through two relays.
    let started = Instant::now();
    let created = reminders::schedule(&delivery, &services, clock.now()).await?;
    let create_secs = started.elapsed().as_secs_f64();
    let relays: Vec<Relay> = (0..2)
        .map(|_| {
            Relay::new(services.clone()).with_sink(
                SMS_TOPIC,
                Arc::new(SmsSink::new(delivery.clone(), services.clone()).unwrap()),
            )
        })
        .collect();
    let started = Instant::now();
    let mut sent = 0;
    while sent < created {
        let (a, b) = tokio::join!(relays[0].drain_once(), relays[1].drain_once());
        sent += a? + b?;
    }
    let send_secs = started.elapsed().as_secs_f64();

    println!(
        "delivery bench ({mode:?}, {n} cards, box capacity {}):",
        delivery.cfg.box_capacity
    );
    println!(
        "  packing (shipping stage, runtime, 8 concurrent): {:.0} cards/s ({pack_secs:.2} s)",
        n as f64 / pack_secs
    );
    println!(
        "  dispatch ({} boxes, JSON+CSV+HTML manifests): {:.0} cards/s ({dispatch_secs:.2} s)",
        shipped.boxes,
        shipped.cards as f64 / dispatch_secs
    );
    println!(
        "  office receipts ({} boxes): {:.0} cards/s ({receipt_secs:.2} s)",
        boxes.len(),
        n as f64 / receipt_secs
    );
    println!(
        "  reminders created: {:.0}/s ({created} in {create_secs:.2} s)",
        created as f64 / create_secs
    );
    println!(
        "  reminders sent (2 relays, HTTP gateway): {:.0}/s ({sent} in {send_secs:.2} s; gateway got {})",
        sent as f64 / send_secs,
        hits.load(Ordering::Relaxed)
    );
    Ok(())
}
