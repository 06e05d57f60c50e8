//! Rules a later stage depends on are checked at intake, so nothing intake accepts is parked
//! later for a reason it could have seen (issue 15, item 2): a portrait the chip cannot hold
//! (its DG2 over the card's 65,535-byte data-group limit) and a pickup office that is not in
//! the offices register are refused per record, naming the field; the rest of the batch goes
//! on.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine;
use cardpipe_common::clock::to_rfc3339;
use cardpipe_common::runtime::Services;
use cardpipe_common::testing::{self, Mode};
use cardpipe_intake::api::router;
use cardpipe_intake::intake::{BatchReport, tehran_today};
use cardpipe_registry::config::{ClientConfig, RegistryConfig, hash_token};
use cardpipe_registry::synth;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

const TOKEN: &str = "registry-test-token";

fn config() -> RegistryConfig {
    RegistryConfig {
        clients: vec![ClientConfig {
            name: "civil-registry".into(),
            token_sha256: hash_token(TOKEN),
        }],
        ..RegistryConfig::default()
    }
}

fn records(services: &Services, n: usize, seed: u64) -> Vec<Value> {
    let spec = synth::spec(seed, n, false, tehran_today(services.clock.now()));
    let mut out = Vec::new();
    synth::write_batch(&spec, &mut out).unwrap();
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn submit(services: &Services, key: &str, records: &[Value]) -> BatchReport {
    let body: String = records.iter().map(|r| format!("{r}\n")).collect();
    let req = Request::builder()
        .method("POST")
        .uri("/api/v1/batches")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("idempotency-key", key)
        .header("content-type", "application/x-ndjson")
        .body(Body::from(body))
        .unwrap();
    let res = router(services.clone(), config())
        .oneshot(req)
        .await
        .unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    assert!(
        status == StatusCode::CREATED || status == StatusCode::OK,
        "{status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    serde_json::from_slice(&bytes).unwrap()
}

/// A valid JPEG grown past what the chip holds: comment segments after SOI.
fn oversized(jpeg: &[u8], extra: usize) -> Vec<u8> {
    let mut out = vec![0xFF, 0xD8];
    let mut left = extra;
    while left > 0 {
        let n = left.min(60_000);
        out.extend_from_slice(&[0xFF, 0xFE]);
        out.extend_from_slice(&((n + 2) as u16).to_be_bytes());
        out.extend(std::iter::repeat_n(b'c', n));
        left -= n;
    }
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[tokio::test]
async fn a_photo_the_chip_cannot_hold_is_refused_at_intake() {
    let (services, _g) = testing::services(Mode::Embedded, None).await;
    let mut batch = records(&services, 3, 5);
    let b64 = base64::engine::general_purpose::STANDARD;
    let photo = b64
        .decode(batch[1]["photo"].as_str().expect("inline photo"))
        .unwrap();
    let big = oversized(&photo, 100_000);
    assert!(
        big.len() < config().photo_max_bytes,
        "within the configured bound"
    );
    batch[1]["photo"] = Value::from(b64.encode(&big));
    let report = submit(&services, "big-photo", &batch).await;
    assert_eq!(report.accepted, 2);
    assert_eq!(report.rejected, 1);
    let e = &report.errors[0];
    assert_eq!(e.line, 2);
    assert_eq!(e.field, "photo");
    assert!(e.reason.contains("does not fit the chip"), "{}", e.reason);
    // Just under the limit still fits: the bound is the chip's, not a guess.
    let fits = oversized(&photo, 60_000 - photo.len().min(50_000));
    assert!(cardpipe_pki::lds::check_portrait(&fits).is_ok());
}

#[tokio::test]
async fn an_office_missing_from_the_register_is_refused_at_intake() {
    let (services, _g) = testing::services(Mode::Embedded, None).await;
    let batch = records(&services, 3, 6);
    // The register delivery loads at start: the offices of records 1 and 3 only.
    let now = to_rfc3339(services.clock.now());
    for r in [&batch[0], &batch[2]] {
        let code = r["pickup_office"].as_str().unwrap();
        sqlx::query(
            "INSERT INTO delivery_offices (code, name, kind, province, city, address, phone, updated_at)
             VALUES ($1, 'x', 'post_office', 'p', 'c', 'a', '021', $2) ON CONFLICT (code) DO NOTHING",
        )
        .bind(code)
        .bind(&now)
        .execute(services.store.pool())
        .await
        .unwrap();
    }
    let mut batch = batch;
    batch[1]["pickup_office"] = Value::from("ZZZ-999");
    let report = submit(&services, "offices", &batch).await;
    assert_eq!(report.accepted, 2, "{report:?}");
    assert_eq!(report.rejected, 1);
    assert_eq!(report.errors[0].line, 2);
    assert_eq!(report.errors[0].field, "pickup_office");
    assert!(report.errors[0].reason.contains("unknown office"));
}
