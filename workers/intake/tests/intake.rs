//! Intake, API, scheduler and callbacks on both backend families.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use cardpipe_common::clock::{Clock, TestClock};
use cardpipe_common::domain::{ApplicationId, ApplicationState};
use cardpipe_common::runtime::Services;
use cardpipe_common::runtime::relay::Relay;
use cardpipe_common::store::{Store, Transition};
use cardpipe_common::testing::{self, Mode};
use cardpipe_intake::api::{ROUTES, ROUTES_SERVED_ELSEWHERE, router};
use cardpipe_intake::intake::{BatchReport, tehran_today};
use cardpipe_intake::scheduler::Scheduler;
use cardpipe_registry::OPENAPI;
use cardpipe_registry::callbacks::{CALLBACK_TOPIC, CallbackPayload, WebhookSink, verify};
use cardpipe_registry::config::{CallbackConfig, ClientConfig, RegistryConfig, hash_token};
use cardpipe_registry::synth::{self, BAD_KINDS};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sqlx::Row;
use time::macros::datetime;
use tower::ServiceExt;

const TOKEN: &str = "registry-test-token";

fn config() -> RegistryConfig {
    RegistryConfig {
        clients: vec![ClientConfig {
            name: "civil-registry".into(),
            token_sha256: hash_token(TOKEN),
        }],
        chunk_size: 7,
        ..RegistryConfig::default()
    }
}

async fn call(
    app: &axum::Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Body,
) -> (StatusCode, Value, String) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    )
}

async fn json_call(
    app: &axum::Router,
    method: &str,
    path: &str,
    body: Value,
) -> (StatusCode, Value) {
    let (s, v, _) = call(
        app,
        method,
        path,
        Some(TOKEN),
        &[("content-type", "application/json")],
        Body::from(body.to_string()),
    )
    .await;
    (s, v)
}

async fn submit(
    app: &axum::Router,
    key: &str,
    ndjson: Vec<u8>,
) -> (StatusCode, BatchReport, String) {
    let (s, v, text) = call(
        app,
        "POST",
        "/api/v1/batches",
        Some(TOKEN),
        &[
            ("idempotency-key", key),
            ("content-type", "application/x-ndjson"),
        ],
        Body::from(ndjson),
    )
    .await;
    assert!(s.is_success(), "submit failed: {s} {text}");
    (s, serde_json::from_value(v).unwrap(), text)
}

fn batch(
    seed: u64,
    records: usize,
    bad: bool,
    services: &Services,
) -> (Vec<u8>, Vec<synth::Expectation>) {
    let spec = synth::spec(seed, records, bad, tehran_today(services.clock.now()));
    let mut out = Vec::new();
    let exp = synth::write_batch(&spec, &mut out).unwrap();
    (out, exp)
}

async fn count(services: &Services, sql: &str) -> i64 {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(services.store.pool())
        .await
        .unwrap()
        .try_get::<i64, _>(0)
        .unwrap()
}

macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(cardpipe_common::testing::Mode::Embedded).await } )*
        }
        mod distributed {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(cardpipe_common::testing::Mode::Distributed).await } )*
        }
    };
}

both_modes!(
    each_bad_record_gets_its_own_error_and_the_rest_proceeds,
    resubmitting_creates_nothing_new,
    batch_scheduled_for_0100_tehran_is_released_at_0100_and_not_before,
    throttle_and_urgent_first,
    status_recovery_office_change_and_withdrawal,
    callbacks_are_signed_and_delivered_in_order,
    artifacts_by_object_key,
    requests_without_a_valid_token_are_refused,
);

async fn each_bad_record_gets_its_own_error_and_the_rest_proceeds(mode: Mode) {
    let (services, _g) = testing::services(mode, None).await;
    let app = router(services.clone(), config());
    let (body, expectations) = batch(11, 30, true, &services);
    let text_body = String::from_utf8(body.clone()).unwrap();
    let (status, report, raw) = submit(&app, "night-1", body).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(expectations.len(), BAD_KINDS.len());
    let flagged_kinds = BAD_KINDS.iter().filter(|k| k.accepted_flagged).count() as i64;
    assert_eq!(report.records, 30 + BAD_KINDS.len() as i64);
    assert_eq!(report.accepted, 30 + flagged_kinds, "{raw}");
    assert_eq!(report.rejected, BAD_KINDS.len() as i64 - flagged_kinds);
    assert_eq!(report.flagged, flagged_kinds);
    for e in &expectations {
        if e.kind.accepted_flagged {
            assert!(
                report
                    .flags
                    .iter()
                    .any(|f| f.line == e.line && f.field == e.kind.field && f.flag == "overcharge"),
                "{} not flagged: {raw}",
                e.kind.kind
            );
            continue;
        }
        let errors: Vec<_> = report.errors.iter().filter(|x| x.line == e.line).collect();
        assert!(!errors.is_empty(), "{} produced no error", e.kind.kind);
        assert!(
            errors.iter().all(|x| x.field == e.kind.field),
            "{}: expected only {} errors, got {errors:?}",
            e.kind.kind,
            e.kind.field
        );
        if e.kind.kind == "residence_abroad" {
            assert!(errors[0].reason.contains("legacy"));
        }
        if e.kind.kind != "invalid_json" {
            assert!(errors[0].application_id.is_some());
        }
    }
    // Only bad lines were rejected.
    let bad_lines: BTreeSet<i64> = expectations.iter().map(|e| e.line).collect();
    assert!(report.errors.iter().all(|e| bad_lines.contains(&e.line)));
    // Accepted applications exist, received, with sealed records and flags.
    assert_eq!(
        count(
            &services,
            "SELECT COUNT(*) FROM applications WHERE state = 'received'"
        )
        .await,
        report.accepted
    );
    assert_eq!(
        count(&services, "SELECT COUNT(*) FROM applicant_records").await,
        report.accepted
    );
    assert!(
        count(
            &services,
            "SELECT COUNT(*) FROM intake_flags WHERE flag = 'overcharge'"
        )
        .await
            >= 1
    );
    assert_eq!(
        count(
            &services,
            "SELECT COUNT(*) FROM outbox WHERE topic = 'callback' AND payload LIKE '%\"accepted\"%'"
        )
        .await,
        report.accepted
    );
    // No personal data in the report: no national code, no name of the batch.
    for line in text_body.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        for f in [
            "national_code",
            "first_name",
            "last_name",
            "mobile",
            "postal_code",
        ] {
            if let Some(s) = v[f].as_str() {
                assert!(!raw.contains(s), "report leaks {f}");
            }
        }
    }
    // Per-record report pages.
    let (s, rows, _) = call(
        &app,
        "GET",
        &format!(
            "/api/v1/batches/{}/records?outcome=rejected&limit=5",
            report.batch_id
        ),
        Some(TOKEN),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(rows.as_array().unwrap().len(), 5);
    assert!(rows[0]["errors"][0]["reason"].is_string());
}

async fn resubmitting_creates_nothing_new(mode: Mode) {
    let (services, _g) = testing::services(mode, None).await;
    let app = router(services.clone(), config());
    let (body, _) = batch(12, 20, true, &services);
    let (s1, first, _) = submit(&app, "night-2", body.clone()).await;
    assert_eq!(s1, StatusCode::CREATED);
    let apps = count(&services, "SELECT COUNT(*) FROM applications").await;
    let outbox = count(&services, "SELECT COUNT(*) FROM outbox").await;
    let counted = |outcome: &str| {
        let text = services.metrics.encode();
        let name = format!("cardpipe_intake_records_total{{outcome=\"{outcome}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(name.as_str()))
            .map_or(0, |v| v.trim().parse::<i64>().unwrap())
    };
    assert_eq!(counted("accepted"), first.accepted);
    assert_eq!(counted("rejected"), first.rejected);
    let (s2, second, _) = submit(&app, "night-2", body.clone()).await;
    assert_eq!(s2, StatusCode::OK);
    assert_eq!(first, second);
    // The resubmission decided nothing new: the counters stay.
    assert_eq!(counted("accepted"), first.accepted);
    assert_eq!(
        count(&services, "SELECT COUNT(*) FROM applications").await,
        apps
    );
    assert_eq!(
        count(&services, "SELECT COUNT(*) FROM outbox").await,
        outbox
    );
    // The same key with another body is refused, naming the batch it stands for; nothing of
    // that body is recorded.
    let (other, _) = batch(13, 20, true, &services);
    let fewer: Vec<u8> = {
        let text = String::from_utf8(body.clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        (lines[..lines.len() - 1].join("\n") + "\n").into_bytes()
    };
    for (changed, why) in [(other, "differs"), (fewer, "lines")] {
        let (s, v, text) = call(
            &app,
            "POST",
            "/api/v1/batches",
            Some(TOKEN),
            &[
                ("idempotency-key", "night-2"),
                ("content-type", "application/x-ndjson"),
            ],
            Body::from(changed),
        )
        .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{text}");
        let error = v["error"].as_str().unwrap();
        assert!(error.contains(&first.batch_id), "{error}");
        assert!(error.contains(why), "{error}");
    }
    assert_eq!(
        count(&services, "SELECT COUNT(*) FROM applications").await,
        apps
    );
    let text = services.metrics.encode();
    assert!(
        text.contains(
            "cardpipe_intake_submissions_refused_total{reason=\"idempotency_key_reused\"} 2"
        ),
        "{text}"
    );
    // The same records under another key are refused as already in flight.
    let (_, third, _) = submit(&app, "night-2-again", body).await;
    assert_eq!(third.accepted, 0);
    assert!(
        third
            .errors
            .iter()
            .any(|e| e.field == "application_id" && e.reason.contains("in flight"))
    );
    assert!(
        third
            .errors
            .iter()
            .any(|e| e.field == "national_code" && e.reason.contains("in flight"))
    );
    assert_eq!(
        count(&services, "SELECT COUNT(*) FROM applications").await,
        apps
    );
    // Listing shows both batches.
    let (s, list, _) = call(
        &app,
        "GET",
        "/api/v1/batches",
        Some(TOKEN),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 2);
}

async fn batch_scheduled_for_0100_tehran_is_released_at_0100_and_not_before(mode: Mode) {
    let clock = TestClock::at(datetime!(2026-11-22 23:10 +03:30));
    let (services, _g) =
        testing::services(mode, Some(Arc::new(clock.clone()) as Arc<dyn Clock>)).await;
    let cfg = config();
    let app = router(services.clone(), cfg.clone());
    let (body, _) = batch(13, 9, false, &services);
    let (_, report, _) = submit(&app, "night-3", body).await;
    assert_eq!(report.accepted, 9);
    let (s, v) = json_call(
        &app,
        "PUT",
        &format!("/api/v1/batches/{}/schedule", report.batch_id),
        json!({ "release_at": "2026-11-23T01:00:00+03:30" }),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "scheduled");
    let cfg = Arc::new(cfg);
    let mut scheduler = Scheduler::new(services.clone(), cfg.clone());
    let mut replica = Scheduler::new(services.clone(), cfg.clone());
    clock.set(datetime!(2026-11-23 00:59:59 +03:30));
    assert_eq!(scheduler.tick().await.unwrap(), 0);
    assert_eq!(replica.tick().await.unwrap(), 0);
    assert_eq!(
        count(
            &services,
            "SELECT COUNT(*) FROM applications WHERE state = 'received'"
        )
        .await,
        9
    );
    clock.set(datetime!(2026-11-23 01:00 +03:30));
    // The replica does not hold the lease: nothing; the holder releases all.
    assert_eq!(replica.tick().await.unwrap(), 0);
    assert_eq!(scheduler.tick().await.unwrap(), 9);
    assert_eq!(scheduler.tick().await.unwrap(), 0);
    assert_eq!(
        count(
            &services,
            "SELECT COUNT(*) FROM applications WHERE state = 'dedup_pending'"
        )
        .await,
        9
    );
    assert_eq!(
        count(&services, "SELECT COUNT(*) FROM outbox WHERE topic = 'job' AND payload LIKE '%\"stage\":\"dedup\"%'").await,
        9
    );
    let (_, v, _) = call(
        &app,
        "GET",
        &format!("/api/v1/batches/{}", report.batch_id),
        Some(TOKEN),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(v["state"], "released");
    assert!(
        services
            .metrics
            .encode()
            .lines()
            .any(|l| l == "cardpipe_batches_released_total 1"),
        "one batch released, counted once"
    );
    // A released batch cannot be rescheduled or cancelled.
    let (s, _) = json_call(
        &app,
        "PUT",
        &format!("/api/v1/batches/{}/schedule", report.batch_id),
        json!({"release_at": "now"}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = json_call(
        &app,
        "POST",
        &format!("/api/v1/batches/{}/cancel", report.batch_id),
        json!({}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
}

async fn throttle_and_urgent_first(mode: Mode) {
    let clock = TestClock::at(datetime!(2026-11-22 12:00 UTC));
    let (services, _g) =
        testing::services(mode, Some(Arc::new(clock.clone()) as Arc<dyn Clock>)).await;
    let cfg = RegistryConfig {
        release_per_minute: 5,
        ..config()
    };
    let app = router(services.clone(), cfg.clone());
    let (normal, _) = batch(21, 6, false, &services);
    let (urgent, _) = batch(22, 3, false, &services);
    let (cancelled, _) = batch(23, 4, false, &services);
    let (_, n, _) = submit(&app, "normal", normal).await;
    let (_, u, _) = submit(&app, "urgent", urgent).await;
    let (_, c, _) = submit(&app, "to-cancel", cancelled).await;
    json_call(
        &app,
        "PUT",
        &format!("/api/v1/batches/{}/schedule", n.batch_id),
        json!({"release_at": "2026-11-22T11:00:00Z"}),
    )
    .await;
    json_call(
        &app,
        "PUT",
        &format!("/api/v1/batches/{}/schedule", c.batch_id),
        json!({"release_at": "2026-11-22T11:00:00Z"}),
    )
    .await;
    let (s, v) = json_call(
        &app,
        "PUT",
        &format!("/api/v1/batches/{}/schedule", u.batch_id),
        json!({"release_at": "now"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["priority"], "urgent");
    let (s, v) = json_call(
        &app,
        "POST",
        &format!("/api/v1/batches/{}/cancel", c.batch_id),
        json!({}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["cancelled"], 4);
    let mut scheduler = Scheduler::new(services.clone(), Arc::new(cfg));
    // Paced: 5 a minute is one every 12 s, never a minute's worth at once.
    let mut released = Vec::new();
    for _ in 0..36 {
        released.push(scheduler.tick().await.unwrap());
        clock.advance(time::Duration::seconds(1));
    }
    assert!(released.iter().all(|n| *n <= 1), "{released:?}");
    assert_eq!(released.iter().sum::<usize>(), 3, "{released:?}");
    // The three urgent ones went first.
    let q = format!(
        "SELECT COUNT(*) FROM applications WHERE batch_id = '{}' AND state = 'dedup_pending'",
        u.batch_id
    );
    assert_eq!(count(&services, &q).await, 3);
    // Two more within the first minute (one every 12 s).
    for _ in 36..60 {
        released.push(scheduler.tick().await.unwrap());
        clock.advance(time::Duration::seconds(1));
    }
    assert_eq!(released.iter().sum::<usize>(), 5, "{released:?}");
    // The urgent batch's applications are urgent from here on, and their dedup jobs take
    // the priority lane; the normal batch's do not.
    let urgent_apps = format!(
        "SELECT COUNT(*) FROM applications WHERE batch_id = '{}' AND priority = 'urgent'",
        u.batch_id
    );
    assert_eq!(count(&services, &urgent_apps).await, 3);
    // (A record may also be urgent on its own, in the normal batch.)
    let released_urgent = count(
        &services,
        "SELECT COUNT(*) FROM applications WHERE state = 'dedup_pending' AND priority = 'urgent'",
    )
    .await;
    assert!(released_urgent >= 3);
    assert_eq!(
        count(
            &services,
            "SELECT COUNT(*) FROM outbox WHERE topic = 'job' AND payload LIKE '%\"priority\":true%'"
        )
        .await,
        released_urgent
    );
    // The four left over the next minute: at most one per tick, never a burst.
    let mut later = 0;
    for _ in 0..60 {
        let n = scheduler.tick().await.unwrap();
        clock.advance(time::Duration::seconds(1));
        assert!(n <= 1);
        later += n;
    }
    assert_eq!(later, 4);
    assert_eq!(
        count(
            &services,
            "SELECT COUNT(*) FROM applications WHERE state = 'dedup_pending'"
        )
        .await,
        9
    );
    assert_eq!(
        count(
            &services,
            "SELECT COUNT(*) FROM applications WHERE state = 'cancelled'"
        )
        .await,
        4
    );
}

async fn status_recovery_office_change_and_withdrawal(mode: Mode) {
    let (services, _g) = testing::services(mode, None).await;
    let app = router(services.clone(), config());
    let (body, _) = batch(31, 3, false, &services);
    let first: Value = serde_json::from_slice(body.split(|b| *b == b'\n').next().unwrap()).unwrap();
    let (_, report, _) = submit(&app, "night-4", body).await;
    assert_eq!(report.accepted, 3);
    let tracking = first["tracking_code"].as_str().unwrap();
    let rid = first["application_id"].as_str().unwrap();
    let (s, v, _) = call(
        &app,
        "GET",
        &format!("/api/v1/status/{tracking}"),
        Some(TOKEN),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["state"], "received");
    assert_eq!(v["application_id"], rid);
    // The registry's id and cardpipe's id name it too.
    let internal = services
        .store
        .application_by_registry_id(rid)
        .await
        .unwrap()
        .unwrap()
        .id;
    for reference in [rid.to_owned(), internal.0.clone()] {
        let (s, by_id, _) = call(
            &app,
            "GET",
            &format!("/api/v1/status/{reference}"),
            Some(TOKEN),
            &[],
            Body::empty(),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{reference}");
        assert_eq!(by_id, v, "{reference}");
    }
    let (s, v) = json_call(
        &app,
        "POST",
        "/api/v1/tracking-code/recovery",
        json!({
            "national_code": first["national_code"], "birth_date": first["birth_date"]
        }),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["applications"][0]["tracking_code"], tracking);
    let (s, _) = json_call(
        &app,
        "POST",
        "/api/v1/tracking-code/recovery",
        json!({
            "national_code": first["national_code"], "birth_date": "1900-01-01"
        }),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // The offices register (as delivery loads it at start): a code outside it is refused.
    for code in ["POST-10234", "TEH-001"] {
        sqlx::query(
            "INSERT INTO delivery_offices (code, name, kind, province, city, address, phone, updated_at)
             VALUES ($1, $1, 'post_office', 'Tehran', 'Tehran', '-', '-', '2026-01-01T00:00:00Z')",
        )
        .bind(code)
        .execute(services.store.pool())
        .await
        .unwrap();
    }
    let (s, v) = json_call(
        &app,
        "PUT",
        &format!("/api/v1/applications/{rid}/pickup-office"),
        json!({"pickup_office": "POST-99999"}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("\"POST-99999\" is not in the offices register"),
        "{v}"
    );
    let (s, v) = json_call(
        &app,
        "PUT",
        &format!("/api/v1/applications/{rid}/pickup-office"),
        json!({"pickup_office": "POST-10234"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["pickup_office"], "POST-10234");
    // Walk the application to packed: the office can no longer change.
    let id = ApplicationId(
        services
            .store
            .application_by_registry_id(rid)
            .await
            .unwrap()
            .unwrap()
            .id
            .0,
    );
    use ApplicationState::*;
    let path = [
        Received,
        DedupPending,
        DedupClear,
        KeysIssued,
        Personalized,
        QcPassed,
        Packed,
    ];
    for w in path.windows(2) {
        let mut tx = services.store.begin().await.unwrap();
        assert!(
            Store::transition(
                &mut tx,
                &Transition {
                    id: &id,
                    from: w[0],
                    to: w[1],
                    stage: "test",
                    attempt: 0,
                    actor: "test",
                    reason: None,
                    at: services.clock.now(),
                }
            )
            .await
            .unwrap()
        );
        tx.commit().await.unwrap();
    }
    let (s, _) = json_call(
        &app,
        "PUT",
        &format!("/api/v1/applications/{rid}/pickup-office"),
        json!({"pickup_office": "TEH-001"}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, v) = json_call(
        &app,
        "POST",
        &format!("/api/v1/applications/{rid}/withdraw"),
        json!({"reason": "citizen request"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "cancelled");
    let q = format!(
        "SELECT COUNT(*) FROM outbox WHERE topic = 'revocation' AND subject = '{}'",
        id.0
    );
    assert_eq!(count(&services, &q).await, 1);
    let q = format!(
        "SELECT COUNT(*) FROM outbox WHERE topic = 'callback' AND subject = '{}' AND payload LIKE '%\"cancelled\"%'",
        id.0
    );
    assert_eq!(count(&services, &q).await, 1);
    let (s, _) = json_call(
        &app,
        "POST",
        &format!("/api/v1/applications/{rid}/withdraw"),
        json!({}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = json_call(
        &app,
        "POST",
        "/api/v1/applications/NOPE/withdraw",
        json!({}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Every registry action is in the hash-chained audit log, as the registry client.
    let entries = cardpipe_common::audit::recent(&services.store, None, 1000)
        .await
        .unwrap();
    for action in [
        "registry.batch_submit",
        "registry.tracking_code_recovery",
        "registry.change_office",
        "registry.withdraw",
    ] {
        assert!(
            entries
                .iter()
                .any(|e| e.action == action && e.role == "registry"),
            "no audit entry {action}: {:?}",
            entries.iter().map(|e| &e.action).collect::<Vec<_>>()
        );
    }
    let withdrawn = entries
        .iter()
        .find(|e| e.action == "registry.withdraw")
        .unwrap();
    assert_eq!(withdrawn.subject, id.0);
    assert!(withdrawn.details.contains("citizen request"));
    assert!(
        cardpipe_common::audit::verify(&services.store)
            .await
            .unwrap()
            .intact()
    );
}

async fn callbacks_are_signed_and_delivered_in_order(mode: Mode) {
    /// Each callback the receiver got: its headers and body.
    type Received = Vec<(HashMap<String, String>, Vec<u8>)>;
    let received: Arc<Mutex<Received>> = Arc::default();
    let sink_state = received.clone();
    let hook = axum::Router::new().route(
        "/hook",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let sink_state = sink_state.clone();
                async move {
                    let h = headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                        .collect();
                    sink_state.lock().unwrap().push((h, body.to_vec()));
                    StatusCode::NO_CONTENT
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, hook).await.unwrap() });
    let (services, _g) = testing::services(mode, None).await;
    let app = router(services.clone(), config());
    let (body, _) = batch(41, 2, false, &services);
    let first: Value = serde_json::from_slice(body.split(|b| *b == b'\n').next().unwrap()).unwrap();
    submit(&app, "night-5", body).await;
    let rid = first["application_id"].as_str().unwrap();
    json_call(
        &app,
        "POST",
        &format!("/api/v1/applications/{rid}/withdraw"),
        json!({}),
    )
    .await;
    let secret = "callback-secret";
    let sink = WebhookSink::new(
        CallbackConfig {
            url: format!("http://{addr}/hook"),
            secret: secret.into(),
            timeout_secs: 5,
        },
        services.clock.clone(),
    )
    .unwrap();
    let relay = Relay::new(services.clone()).with_sink(CALLBACK_TOPIC, Arc::new(sink));
    for _ in 0..5 {
        relay.drain_once().await.unwrap();
    }
    let got = received.lock().unwrap().clone();
    assert_eq!(got.len(), 3, "two accepted + one cancelled");
    let mut events_for_rid = Vec::new();
    for (h, body) in &got {
        let ts: i64 = h["x-cardpipe-timestamp"].parse().unwrap();
        assert!(verify(secret, ts, body, &h["x-cardpipe-signature"]));
        assert!(!verify("wrong", ts, body, &h["x-cardpipe-signature"]));
        let p: CallbackPayload = serde_json::from_slice(body).unwrap();
        if p.registry_application_id == rid {
            events_for_rid.push(p.event);
        }
    }
    assert_eq!(events_for_rid, ["accepted", "cancelled"]);
    assert_eq!(
        count(
            &services,
            "SELECT COUNT(*) FROM outbox WHERE topic = 'callback' AND published_at IS NULL"
        )
        .await,
        0
    );
}

async fn artifacts_by_object_key(mode: Mode) {
    let (services, _g) = testing::services(mode, None).await;
    let app = router(services.clone(), config());
    let (body, _) = batch(51, 2, false, &services);
    let mut lines: Vec<Value> = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let photo = b64.decode(lines[0]["photo"].as_str().unwrap()).unwrap();
    services
        .objects
        .put("registry/uploads/p1.jpg", photo.into())
        .await
        .unwrap();
    let t = b64
        .decode(lines[0]["fingerprints"][0]["template"].as_str().unwrap())
        .unwrap();
    services
        .objects
        .put("registry/uploads/f1.iso", t.into())
        .await
        .unwrap();
    lines[0]["photo"] = json!({"object_key": "registry/uploads/p1.jpg"});
    lines[0]["fingerprints"][0]["template"] = json!({"object_key": "registry/uploads/f1.iso"});
    lines[1]["photo"] = json!({"object_key": "applications/someone/photo.sealed"});
    let ndjson = lines
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    let (_, report, raw) = submit(&app, "night-6", ndjson.into_bytes()).await;
    assert_eq!(report.accepted, 1, "{raw}");
    assert_eq!(report.errors.len(), 1);
    assert_eq!(report.errors[0].field, "photo");
    assert_eq!(report.errors[0].line, 2);
    // The stored biometrics are the referenced bytes, sealed.
    let id = services
        .store
        .application_by_registry_id(lines[0]["application_id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap()
        .id;
    let bio = cardpipe_common::records::load_biometrics(&services, &id)
        .await
        .unwrap();
    assert_eq!(bio.fingerprints.len(), 10);
}

async fn requests_without_a_valid_token_are_refused(mode: Mode) {
    let (services, _g) = testing::services(mode, None).await;
    let app = router(services.clone(), config());
    for (method, path) in ROUTES {
        let path = path
            .replace("{batch_id}", "b1")
            .replace("{application_id}", "a1")
            .replace("{tracking_code}", "t1");
        for token in [None, Some("wrong-token"), Some("")] {
            let (s, _, _) = call(
                &app,
                method,
                &path,
                token,
                &[("idempotency-key", "k")],
                Body::from("{}"),
            )
            .await;
            assert_eq!(
                s,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {token:?}"
            );
        }
    }
    assert_eq!(count(&services, "SELECT COUNT(*) FROM batches").await, 0);
}

#[tokio::test]
async fn openapi_document_matches_the_router() {
    let (services, _g) = testing::services(Mode::Embedded, None).await;
    let app = router(services.clone(), config());
    let doc: Value = serde_json::from_str(OPENAPI).unwrap();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let listed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .chain(ROUTES_SERVED_ELSEWHERE)
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, listed, "openapi.json and ROUTES differ");
    let elsewhere: BTreeSet<(String, String)> = ROUTES_SERVED_ELSEWHERE
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let documented: BTreeSet<(String, String)> =
        documented.difference(&elsewhere).cloned().collect();
    let paths: BTreeSet<&String> = documented.iter().map(|(_, p)| p).collect();
    for path in paths {
        let concrete = path
            .replace("{batch_id}", "b1")
            .replace("{application_id}", "a1")
            .replace("{tracking_code}", "t1");
        for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            let (s, v, _) = call(
                &app,
                method,
                &concrete,
                Some(TOKEN),
                &[("content-type", "application/json"), ("idempotency-key", "probe")],
                Body::from("{\"release_at\":\"now\",\"pickup_office\":\"X1\",\"national_code\":\"0000000000\",\"birth_date\":\"2000-01-01\"}"),
            )
            .await;
            let routed =
                s != StatusCode::METHOD_NOT_ALLOWED && !(s == StatusCode::NOT_FOUND && v.is_null());
            let is_documented = documented.contains(&(method.to_owned(), path.clone()));
            assert_eq!(routed, is_documented, "{method} {path}: router says {s}");
        }
    }
    // An undocumented path is not served.
    let (s, _, _) = call(
        &app,
        "GET",
        "/api/v1/secret",
        Some(TOKEN),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn overlong_lines_and_blank_lines() {
    let (services, _g) = testing::services(Mode::Embedded, None).await;
    let cfg = RegistryConfig {
        max_line_bytes: 64 * 1024,
        ..config()
    };
    let app = router(services.clone(), cfg);
    let (body, _) = batch(61, 2, false, &services);
    let mut text = String::from_utf8(body).unwrap();
    text.insert_str(0, &format!("\n{}\n", "x".repeat(200_000)));
    let (_, report, raw) = submit(&app, "long", text.into_bytes()).await;
    assert_eq!(report.accepted, 2, "{raw}");
    assert_eq!(report.rejected, 1);
    assert_eq!(report.errors[0].line, 2);
    assert!(report.errors[0].reason.contains("longer than"));
}

#[tokio::test]
async fn interrupted_submission_resumes_on_resubmission() {
    let (services, _g) = testing::services(Mode::Embedded, None).await;
    let cfg = config();
    let (body, _) = batch(71, 20, false, &services);
    let cut = body.len() / 2;
    let first_half = bytes::Bytes::from(body[..cut].to_vec());
    let failing = futures::stream::iter(vec![
        Ok(first_half),
        Err(std::io::Error::other("connection reset")),
    ]);
    let err =
        cardpipe_intake::intake::submit_batch(&services, &cfg, "civil-registry", "resume", failing)
            .await;
    assert!(err.is_err());
    let partial = count(&services, "SELECT COUNT(*) FROM applications").await;
    assert!(
        partial > 0 && partial < 20,
        "committed chunks stay: {partial}"
    );
    let app = router(services.clone(), cfg);
    // Resumed with other lines under the same key: refused, nothing added.
    let (other, _) = batch(72, 20, false, &services);
    let (s, v, text) = call(
        &app,
        "POST",
        "/api/v1/batches",
        Some(TOKEN),
        &[
            ("idempotency-key", "resume"),
            ("content-type", "application/x-ndjson"),
        ],
        Body::from(other),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{text}");
    assert!(
        v["error"].as_str().unwrap().contains("different body"),
        "{v}"
    );
    assert_eq!(
        count(&services, "SELECT COUNT(*) FROM applications").await,
        partial
    );
    let (s, report, _) = submit(&app, "resume", body).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(report.accepted, 20);
    assert_eq!(report.rejected, 0);
    assert_eq!(
        count(&services, "SELECT COUNT(*) FROM applications").await,
        20
    );
}
