//! `POST /api/v1/reprints`: the registry's bearer token is checked before the body is read,
//! a client can reprint only the applications it submitted, and the route is the one the
//! registry API's OpenAPI document describes.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use cardpipe_common::domain::{ApplicationId, ApplicationState, Priority};
use cardpipe_common::runtime::Services;
use cardpipe_common::store::{NewApplication, Store};
use cardpipe_common::testing::{self, Mode};
use cardpipe_registry::OPENAPI;
use cardpipe_registry::config::{ClientConfig, RegistryConfig, hash_token};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sqlx::Row;
use tower::ServiceExt;

const OWNER_TOKEN: &str = "owner-token";
const OTHER_TOKEN: &str = "other-token";

fn config() -> RegistryConfig {
    RegistryConfig {
        clients: vec![
            ClientConfig {
                name: "civil-registry".into(),
                token_sha256: hash_token(OWNER_TOKEN),
            },
            ClientConfig {
                name: "consular-registry".into(),
                token_sha256: hash_token(OTHER_TOKEN),
            },
        ],
        ..RegistryConfig::default()
    }
}

/// One application of `civil-registry`'s batch, in `qc_passed`.
async fn seed(services: &Services) -> ApplicationId {
    let now = services.clock.now();
    sqlx::query(
        "INSERT INTO batches (id, client, idempotency_key, state, created_at)
         VALUES ('B-1', 'civil-registry', 'k-1', 'released', $1)",
    )
    .bind(cardpipe_common::clock::to_rfc3339(now))
    .execute(services.store.pool())
    .await
    .unwrap();
    let id = ApplicationId::generate();
    let mut tx = services.store.begin().await.unwrap();
    Store::insert_application(
        &mut tx,
        &NewApplication {
            id: id.clone(),
            registry_id: "REG-1".into(),
            batch_id: Some("B-1".into()),
            state: ApplicationState::QcPassed,
            priority: Priority::Normal,
        },
        "registry:civil-registry",
        now,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    id
}

async fn post(app: &axum::Router, token: Option<&str>, body: &str) -> (StatusCode, Value) {
    let mut req = Request::builder()
        .method("POST")
        .uri("/api/v1/reprints")
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn state(services: &Services, id: &ApplicationId) -> ApplicationState {
    services.store.application(id).await.unwrap().unwrap().state
}

async fn reprints_requested_by_the_owning_client_only(mode: Mode) {
    let (services, _g) = testing::services(mode, None).await;
    let id = seed(&services).await;
    let app = cardpipe_qc::api::router(services.clone(), config());
    let body = json!({ "application_id": "REG-1", "reason": "damaged" }).to_string();

    // No token, a wrong one, an empty one: refused before the body is looked at (even a
    // body that is not JSON gets 401, not 400).
    for token in [None, Some("wrong"), Some("")] {
        assert_eq!(post(&app, token, &body).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(
            post(&app, token, "not json").await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    // Another registry client cannot reprint (nor learn of) this client's application.
    let (s, v) = post(&app, Some(OTHER_TOKEN), &body).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    // A bad reason names the field.
    let (s, v) = post(
        &app,
        Some(OWNER_TOKEN),
        &json!({ "application_id": "REG-1", "reason": "bored" }).to_string(),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["error"].as_str().unwrap().contains("reason"), "{v}");
    assert_eq!(state(&services, &id).await, ApplicationState::QcPassed);

    // The owner can.
    let (s, v) = post(&app, Some(OWNER_TOKEN), &body).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["reason"], "damaged");
    assert_eq!(
        state(&services, &id).await,
        ApplicationState::ReprintRequested
    );
    // Asked again: the card is no longer one that passed QC.
    assert_eq!(
        post(&app, Some(OWNER_TOKEN), &body).await.0,
        StatusCode::CONFLICT
    );

    // Audited as the registry client.
    let actor: String = sqlx::query("SELECT actor FROM audit_log WHERE action = 'reprint.request'")
        .fetch_one(services.store.pool())
        .await
        .unwrap()
        .try_get("actor")
        .unwrap();
    assert_eq!(actor, "civil-registry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_reprints_requested_by_the_owning_client_only() {
    reprints_requested_by_the_owning_client_only(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_reprints_requested_by_the_owning_client_only() {
    reprints_requested_by_the_owning_client_only(Mode::Distributed).await;
}

/// The registry API's OpenAPI document lists this route as served elsewhere, and this is
/// where: the QC router serves it (with a token, an empty body is a 4xx other than 404/405).
#[tokio::test]
async fn the_openapi_document_describes_this_route() {
    let doc: Value = serde_json::from_str(OPENAPI).unwrap();
    assert!(doc["paths"]["/api/v1/reprints"]["post"].is_object());
    let (services, _g) = testing::services(Mode::Embedded, None).await;
    let app = cardpipe_qc::api::router(services, config());
    let (s, _) = post(&app, Some(OWNER_TOKEN), "{}").await;
    assert!(
        s.is_client_error() && s != StatusCode::NOT_FOUND && s != StatusCode::METHOD_NOT_ALLOWED,
        "{s}"
    );
}
