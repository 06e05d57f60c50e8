//! What one batch submission may cost (`[registry.intake]`), on both backend families: a
//! body or a record count past its bound is refused with 413 naming the bound, the whole lines
//! received before it are kept (nothing accepted is lost) and the batch is closed with them;
//! submissions past the concurrency bound get 429 with `Retry-After`; an artifact referenced
//! by object key is read only up to its bound.

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use bytes::Bytes;
use cardpipe_common::runtime::Services;
use cardpipe_common::testing::{self, Mode};
use cardpipe_intake::api::router;
use cardpipe_intake::intake::{BatchReport, tehran_today};
use cardpipe_registry::config::{ClientConfig, IntakeLimits, RegistryConfig, hash_token};
use cardpipe_registry::synth;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sqlx::Row;
use tower::ServiceExt;

const TOKEN: &str = "registry-test-token";

fn config(limits: IntakeLimits) -> RegistryConfig {
    RegistryConfig {
        clients: vec![ClientConfig {
            name: "civil-registry".into(),
            token_sha256: hash_token(TOKEN),
        }],
        chunk_size: 2,
        intake: limits,
        ..RegistryConfig::default()
    }
}

/// `records` valid records, one NDJSON line each.
fn lines(services: &Services, seed: u64, records: usize) -> Vec<String> {
    let spec = synth::spec(seed, records, false, tehran_today(services.clock.now()));
    let mut out = Vec::new();
    synth::write_batch(&spec, &mut out).unwrap();
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

struct Answer {
    status: StatusCode,
    retry_after: Option<String>,
    json: Value,
}

async fn post(app: &axum::Router, key: &str, body: Body, length: Option<usize>) -> Answer {
    let mut req = Request::builder()
        .method("POST")
        .uri("/api/v1/batches")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("idempotency-key", key)
        .header("content-type", "application/x-ndjson");
    if let Some(n) = length {
        req = req.header(header::CONTENT_LENGTH, n);
    }
    let res = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let status = res.status();
    let retry_after = res
        .headers()
        .get(header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        retry_after,
        json: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

/// A body sent in pieces with no declared length (chunked transfer).
fn streamed(pieces: Vec<String>) -> Body {
    Body::from_stream(futures::stream::iter(
        pieces
            .into_iter()
            .map(|p| Ok::<_, std::io::Error>(Bytes::from(p))),
    ))
}

async fn get_report(app: &axum::Router, batch_id: &str) -> BatchReport {
    let req = Request::builder()
        .uri(format!("/api/v1/batches/{batch_id}"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::empty())
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

async fn count(services: &Services, sql: &'static str) -> i64 {
    sqlx::query(sql)
        .fetch_one(services.store.pool())
        .await
        .unwrap()
        .try_get::<i64, _>(0)
        .unwrap()
}

fn refused(services: &Services, reason: &str) -> bool {
    services.metrics.encode().lines().any(|l| {
        l.starts_with("cardpipe_intake_submissions_refused_total")
            && l.contains(&format!("reason=\"{reason}\""))
            && !l.ends_with(" 0")
    })
}

/// The batch id a 413 names ("... received as batch <id>; ...").
fn batch_named(error: &str) -> String {
    error
        .split("as batch ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("no batch named in {error:?}"))
        .to_owned()
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
    a_declared_body_over_the_bound_is_refused_before_anything_is_read,
    a_streamed_body_over_the_bound_keeps_the_lines_before_it,
    a_batch_over_the_record_bound_keeps_the_first_records,
    submissions_over_the_concurrency_bound_get_429_with_retry_after,
    artifacts_by_object_key_are_read_only_up_to_their_bound,
);

async fn a_declared_body_over_the_bound_is_refused_before_anything_is_read(mode: Mode) {
    let (services, _g) = testing::services(mode, None).await;
    let app = router(
        services.clone(),
        config(IntakeLimits {
            max_body_bytes: 10_000,
            ..IntakeLimits::default()
        }),
    );
    let body = lines(&services, 3, 4).join("\n").into_bytes();
    assert!(body.len() > 10_000);
    let len = body.len();
    let answer = post(&app, "too-big", Body::from(body), Some(len)).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    let error = answer.json["error"].as_str().unwrap();
    assert!(
        error.contains("larger than 10000 bytes") && error.contains("max_body_bytes"),
        "{error}"
    );
    assert_eq!(count(&services, "SELECT COUNT(*) FROM batches").await, 0);
    assert_eq!(
        count(&services, "SELECT COUNT(*) FROM applications").await,
        0
    );
    assert!(refused(&services, "body_too_large"));
}

async fn a_streamed_body_over_the_bound_keeps_the_lines_before_it(mode: Mode) {
    let (services, _g) = testing::services(mode, None).await;
    let records = lines(&services, 5, 6);
    // Room for the first three lines and part of the fourth.
    let first_three: usize = records[..3].iter().map(|l| l.len() + 1).sum();
    let max = (first_three + records[3].len() / 2) as u64;
    let app = router(
        services.clone(),
        config(IntakeLimits {
            max_body_bytes: max,
            ..IntakeLimits::default()
        }),
    );
    let pieces: Vec<String> = records.iter().map(|l| format!("{l}\n")).collect();
    let answer = post(&app, "streamed", streamed(pieces.clone()), None).await;
    assert_eq!(
        answer.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        answer.json
    );
    let error = answer.json["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("larger than {max} bytes")) && error.contains("lines 1 to 3"),
        "{error}"
    );
    let batch_id = batch_named(error);
    let report = get_report(&app, &batch_id).await;
    assert_eq!(report.state, "received");
    assert_eq!(
        (report.records, report.accepted, report.rejected),
        (3, 3, 0)
    );
    assert_eq!(
        count(&services, "SELECT COUNT(*) FROM applications").await,
        3
    );
    // Every accepted application got its callback.
    assert_eq!(
        count(
            &services,
            "SELECT COUNT(*) FROM outbox WHERE topic = 'callback'"
        )
        .await,
        3
    );
    assert!(refused(&services, "body_too_large"));
    // The same key again replays the closed batch; the rest goes as a new batch.
    let again = post(&app, "streamed", streamed(pieces.clone()), None).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.json);
    assert_eq!(again.json["accepted"], 3);
    let rest = post(&app, "streamed-rest", streamed(pieces[3..].to_vec()), None).await;
    assert_eq!(rest.status, StatusCode::CREATED, "{}", rest.json);
    assert_eq!(rest.json["accepted"], 3);
    assert_eq!(
        count(&services, "SELECT COUNT(*) FROM applications").await,
        6
    );
    let audited = count(
        &services,
        "SELECT COUNT(*) FROM audit_log WHERE action = 'registry.batch_truncated'",
    )
    .await;
    assert_eq!(audited, 1);
}

async fn a_batch_over_the_record_bound_keeps_the_first_records(mode: Mode) {
    let (services, _g) = testing::services(mode, None).await;
    let app = router(
        services.clone(),
        config(IntakeLimits {
            max_records: 3,
            ..IntakeLimits::default()
        }),
    );
    let body = lines(&services, 7, 5).join("\n");
    let answer = post(&app, "many", Body::from(body), None).await;
    assert_eq!(
        answer.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        answer.json
    );
    let error = answer.json["error"].as_str().unwrap();
    assert!(
        error.contains("more than 3 lines")
            && error.contains("max_records")
            && error.contains("lines 1 to 3"),
        "{error}"
    );
    let report = get_report(&app, &batch_named(error)).await;
    assert_eq!((report.records, report.accepted), (3, 3));
    assert!(refused(&services, "too_many_records"));
}

async fn submissions_over_the_concurrency_bound_get_429_with_retry_after(mode: Mode) {
    let (services, _g) = testing::services(mode, None).await;
    let app = router(
        services.clone(),
        config(IntakeLimits {
            max_concurrent_submissions: 1,
            retry_after_secs: 17,
            ..IntakeLimits::default()
        }),
    );
    let records = lines(&services, 9, 3);
    // The first submission's body stays open until the test sends the rest.
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Bytes, std::io::Error>>();
    tx.unbounded_send(Ok(Bytes::from(format!("{}\n", records[0]))))
        .unwrap();
    let first = {
        let app = app.clone();
        tokio::spawn(async move { post(&app, "slow", Body::from_stream(rx), None).await })
    };
    // Wait until the first submission holds its permit (its batch row exists).
    for _ in 0..500 {
        if count(&services, "SELECT COUNT(*) FROM batch_records").await > 0
            || count(&services, "SELECT COUNT(*) FROM batches").await > 0
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let second = post(&app, "eager", Body::from(records[2].clone()), None).await;
    assert_eq!(
        second.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        second.json
    );
    assert_eq!(second.retry_after.as_deref(), Some("17"));
    assert!(
        second.json["error"]
            .as_str()
            .unwrap()
            .contains("max_concurrent_submissions")
    );
    assert!(refused(&services, "too_many_submissions"));
    tx.unbounded_send(Ok(Bytes::from(format!("{}\n", records[1]))))
        .unwrap();
    drop(tx);
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.json);
    assert_eq!(first.json["accepted"], 2);
    // The permit is back: the refused batch goes through now.
    let retried = post(&app, "eager", Body::from(records[2].clone()), None).await;
    assert_eq!(retried.status, StatusCode::CREATED, "{}", retried.json);
}

async fn artifacts_by_object_key_are_read_only_up_to_their_bound(mode: Mode) {
    let (services, _g) = testing::services(mode, None).await;
    let app = router(
        services.clone(),
        config(IntakeLimits {
            template_max_bytes: 4096,
            ..IntakeLimits::default()
        }),
    );
    let mut records: Vec<Value> = lines(&services, 11, 2)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    services
        .objects
        .put("registry/uploads/huge.iso", Bytes::from(vec![0u8; 100_000]))
        .await
        .unwrap();
    services
        .objects
        .put(
            "registry/uploads/huge.jpg",
            Bytes::from(vec![0xffu8; 2 * 1024 * 1024]),
        )
        .await
        .unwrap();
    records[0]["fingerprints"][3]["template"] = json!({"object_key": "registry/uploads/huge.iso"});
    records[1]["photo"] = json!({"object_key": "registry/uploads/huge.jpg"});
    let body = records
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    let answer = post(&app, "artifacts", Body::from(body), None).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.json);
    let report: BatchReport = serde_json::from_value(answer.json).unwrap();
    assert_eq!(report.rejected, 2);
    let mut errors: Vec<(i64, String, String)> = report
        .errors
        .iter()
        .map(|e| (e.line, e.field.clone(), e.reason.clone()))
        .collect();
    errors.sort();
    assert_eq!(errors[0].0, 1);
    assert_eq!(errors[0].1, "fingerprints.position_4.template");
    assert!(errors[0].2.contains("larger than 4096 bytes"), "{errors:?}");
    assert_eq!(errors[1].0, 2);
    assert_eq!(errors[1].1, "photo");
    assert!(errors[1].2.contains("larger than"), "{errors:?}");
}
