//! Rotating the envelope master key, then the lookup-digest key, mid-run, on both backend
//! families: national-code lookups keep working at every step — the "already in flight"
//! rule at intake, tracking-code recovery through the registry API and the double delivery
//! fee after a voided card — and the re-digester moves every stored digest to the current
//! key. Once, a master-key rotation silently broke all three (the lookup key was derived
//! from the current master key only).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use cardpipe_common::domain::ApplicationId;
use cardpipe_common::envelope::Sealer;
use cardpipe_common::records;
use cardpipe_common::runtime::Services;
use cardpipe_common::testing::{self, Mode};
use cardpipe_intake::api::router;
use cardpipe_intake::intake::{BatchReport, tehran_today};
use cardpipe_registry::config::{ClientConfig, RegistryConfig, hash_token};
use cardpipe_registry::synth;
use http_body_util::BodyExt;
use secrecy::SecretString;
use serde_json::{Value, json};
use tower::ServiceExt;

const TOKEN: &str = "registry-rotation-token";

fn registry() -> RegistryConfig {
    RegistryConfig {
        clients: vec![ClientConfig {
            name: "civil-registry".into(),
            token_sha256: hash_token(TOKEN),
        }],
        ..RegistryConfig::default()
    }
}

fn with_sealer(services: &Services, sealer: Sealer) -> Services {
    Services {
        sealer: Arc::new(sealer),
        ..services.clone()
    }
}

async fn call(
    services: &Services,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: String,
) -> (StatusCode, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {TOKEN}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = router(services.clone(), registry())
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn submit(services: &Services, key: &str, lines: &[Value]) -> BatchReport {
    let body = lines
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    let (status, v) = call(
        services,
        "POST",
        "/api/v1/batches",
        &[
            ("idempotency-key", key),
            ("content-type", "application/x-ndjson"),
        ],
        body,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    serde_json::from_value(v).unwrap()
}

async fn recovered(services: &Services, record: &Value) -> Vec<String> {
    let (status, v) = call(
        services,
        "POST",
        "/api/v1/tracking-code/recovery",
        &[("content-type", "application/json")],
        json!({
            "national_code": record["national_code"],
            "birth_date": record["birth_date"],
        })
        .to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "recovery found nothing: {v}");
    v["applications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["tracking_code"].as_str().unwrap().to_owned())
        .collect()
}

async fn application(services: &Services, registry_id: &str) -> ApplicationId {
    services
        .store
        .application_by_registry_id(registry_id)
        .await
        .unwrap()
        .expect("accepted")
        .id
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

both_modes!(lookups_survive_master_and_lookup_key_rotation);

async fn lookups_survive_master_and_lookup_key_rotation(mode: Mode) {
    let (base, _guard) = testing::services(mode, None).await;
    let k1: SecretString = Sealer::generate_key_hex();
    let k2: SecretString = Sealer::generate_key_hex();
    let l1: SecretString = Sealer::generate_key_hex();
    let l2: SecretString = Sealer::generate_key_hex();
    let before = with_sealer(&base, Sealer::new("k1", &k1).unwrap());

    // Two applicants under master key k1.
    let spec = synth::spec(77, 3, false, tehran_today(base.clock.now()));
    let mut out = Vec::new();
    synth::write_batch(&spec, &mut out).unwrap();
    let lines: Vec<Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let report = submit(&before, "before-rotation", &lines[..2]).await;
    assert_eq!(report.accepted, 2, "{report:?}");
    let voided = application(&before, lines[0]["application_id"].as_str().unwrap()).await;
    let in_flight_code = lines[1]["tracking_code"].as_str().unwrap().to_owned();
    // The first applicant's card was voided (left uncollected).
    sqlx::query("UPDATE applications SET state = 'voided' WHERE id = $1")
        .bind(voided.as_str())
        .execute(base.store.pool())
        .await
        .unwrap();

    // Master key rotated to k2 (k1 kept to open old data): nothing is re-digested yet.
    let rotated = with_sealer(
        &base,
        Sealer::new("k2", &k2)
            .unwrap()
            .with_previous("k1", &k1)
            .unwrap(),
    );
    assert_eq!(records::stale_digests(&rotated).await.unwrap(), 2);
    assert_eq!(
        recovered(&rotated, &lines[1]).await,
        vec![in_flight_code.clone()]
    );
    // In flight: a second application for the second applicant is refused.
    let mut again = lines[1].clone();
    again["application_id"] = json!("REG-ROTATION-AGAIN-1");
    again["tracking_code"] = lines[2]["tracking_code"].clone();
    let report = submit(&rotated, "after-rotation-1", &[again]).await;
    assert_eq!(report.accepted, 0, "{report:?}");
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.field == "national_code" && e.reason.contains("already in flight")),
        "{report:?}"
    );
    // Double fee: a new application of the voided applicant pays twice.
    let mut renewed = lines[0].clone();
    renewed["application_id"] = json!("REG-ROTATION-RENEWED-1");
    renewed["tracking_code"] = lines[2]["tracking_code"].clone();
    let report = submit(&rotated, "after-rotation-2", &[renewed]).await;
    assert_eq!(report.accepted, 1, "{report:?}");
    // Paid the normal issuance fee: intake flags the unpaid double (found through the old
    // digest), and the handover knows of the voided card too.
    assert!(
        report
            .flags
            .iter()
            .any(|f| f.flag == "double_fee_unpaid" && f.field == "fees.issuance_rial"),
        "{report:?}"
    );
    let renewed_id = application(&rotated, "REG-ROTATION-RENEWED-1").await;
    let (_, double) = cardpipe_delivery::office::fee_due(&rotated, &renewed_id)
        .await
        .unwrap();
    assert!(double, "the voided card's fee rule needs the old digest");

    // The re-digester moves the two old digests to the current key, then nothing is stale.
    assert_eq!(records::redigest(&rotated, 1000).await.unwrap(), 2);
    assert_eq!(records::stale_digests(&rotated).await.unwrap(), 0);
    assert_eq!(records::redigest(&rotated, 1000).await.unwrap(), 0);

    // A dedicated lookup key l1 becomes current: found through the derived key meanwhile,
    // then moved.
    let dedicated = with_sealer(
        &base,
        Sealer::new("k2", &k2)
            .unwrap()
            .with_previous("k1", &k1)
            .unwrap()
            .with_lookup_key("l1", &l1)
            .unwrap(),
    );
    assert_eq!(records::stale_digests(&dedicated).await.unwrap(), 3);
    assert_eq!(
        recovered(&dedicated, &lines[1]).await,
        vec![in_flight_code.clone()]
    );
    assert_eq!(records::redigest(&dedicated, 2).await.unwrap(), 2);
    assert_eq!(records::redigest(&dedicated, 2).await.unwrap(), 1);
    assert_eq!(records::stale_digests(&dedicated).await.unwrap(), 0);

    // l1 rotated to l2, l1 kept as a previous lookup key: still found, and the fee rule holds.
    let next = with_sealer(
        &base,
        Sealer::new("k2", &k2)
            .unwrap()
            .with_previous("k1", &k1)
            .unwrap()
            .with_lookup_key("l2", &l2)
            .unwrap()
            .with_previous_lookup_key("l1", &l1)
            .unwrap(),
    );
    assert_eq!(recovered(&next, &lines[1]).await, vec![in_flight_code]);
    assert!(
        cardpipe_delivery::office::fee_due(&next, &renewed_id)
            .await
            .unwrap()
            .1
    );
    assert_eq!(records::redigest(&next, 1000).await.unwrap(), 3);
    assert_eq!(records::stale_digests(&next).await.unwrap(), 0);
}
