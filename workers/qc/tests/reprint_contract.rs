//! Reprints asked of QC through the contract (outbox topic `qc.reprint`, written by delivery
//! when a supervisor resolves a card as lost in transit): the sink makes exactly one reprint
//! under the id the asking side chose, however often the row is delivered, and drops a
//! request the application no longer admits instead of retrying it forever.

use cardpipe_common::contract::{self, REPRINT_TOPIC, REVOCATION_TOPIC, ReprintRequest};
use cardpipe_common::domain::{ApplicationId, ApplicationState, Priority};
use cardpipe_common::runtime::Services;
use cardpipe_common::runtime::relay::OutboxSink;
use cardpipe_common::store::{NewApplication, OutboxRow, Store};
use cardpipe_common::testing::{self, Mode};
use cardpipe_qc::reprint::ReprintSink;
use sqlx::Row;

async fn seed(services: &Services, state: ApplicationState) -> ApplicationId {
    let id = ApplicationId::generate();
    let mut tx = services.store.begin().await.unwrap();
    Store::insert_application(
        &mut tx,
        &NewApplication {
            id: id.clone(),
            registry_id: format!("REG-{id}"),
            batch_id: None,
            state,
            priority: Priority::Normal,
        },
        "registry:test",
        services.clock.now(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    id
}

/// Writes the request as delivery does and returns the outbox row the relay would hand over.
async fn ask(services: &Services, request: &ReprintRequest) -> OutboxRow {
    let mut tx = services.store.begin().await.unwrap();
    contract::request_reprint(&mut tx, request, services.clock.now())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let row = sqlx::query(
        "SELECT seq, id, topic, subject, payload, attempts, created_at FROM outbox
         WHERE topic = $1 AND subject = $2",
    )
    .bind(REPRINT_TOPIC)
    .bind(&request.application_id)
    .fetch_one(services.store.pool())
    .await
    .unwrap();
    OutboxRow {
        seq: row.get("seq"),
        id: row.get("id"),
        topic: row.get("topic"),
        subject: row.get("subject"),
        payload: row.get("payload"),
        attempts: row.get("attempts"),
        created_at: row.get("created_at"),
    }
}

async fn count(services: &Services, sql: &'static str, bind: &str) -> i64 {
    sqlx::query(sql)
        .bind(bind)
        .fetch_one(services.store.pool())
        .await
        .unwrap()
        .get::<i64, _>("n")
}

#[tokio::test]
async fn a_lost_card_is_reprinted_once_under_the_requested_id() {
    let (services, _g) = testing::services(Mode::Embedded, None).await;
    let id = seed(&services, ApplicationState::Shipped).await;
    let request = ReprintRequest::new(&id, "lost_in_transit", "sara");
    let row = ask(&services, &request).await;
    let sink = ReprintSink::new(services.clone());
    sink.deliver(&row).await.unwrap();
    sink.deliver(&row).await.unwrap(); // the relay may deliver a row twice
    let app = services.store.application(&id).await.unwrap().unwrap();
    assert_eq!(app.state, ApplicationState::ReprintRequested);
    assert_eq!(app.priority, Priority::Urgent);
    let reprints =
        sqlx::query("SELECT id, reason, requested_by FROM reprints WHERE application_id = $1")
            .bind(id.as_str())
            .fetch_all(services.store.pool())
            .await
            .unwrap();
    assert_eq!(reprints.len(), 1, "one reprint for one request");
    assert_eq!(reprints[0].get::<String, _>("id"), request.id);
    assert_eq!(reprints[0].get::<String, _>("reason"), "lost_in_transit");
    assert_eq!(
        reprints[0].get::<String, _>("requested_by"),
        "operator:sara"
    );
    // The keys stage is asked to revoke the lost card (cause lost) and to make new keys.
    let revocations = sqlx::query("SELECT payload FROM outbox WHERE topic = $1 AND subject = $2")
        .bind(REVOCATION_TOPIC)
        .bind(id.as_str())
        .fetch_all(services.store.pool())
        .await
        .unwrap();
    assert_eq!(revocations.len(), 1);
    let revocation: contract::RevocationRequest =
        serde_json::from_str(&revocations[0].get::<String, _>("payload")).unwrap();
    assert_eq!(revocation.cause, contract::RevocationCause::Lost);
    assert_eq!(
        count(
            &services,
            "SELECT COUNT(*) AS n FROM outbox WHERE topic = 'job' AND subject = $1",
            id.as_str()
        )
        .await,
        1,
        "one keys job"
    );
}

#[tokio::test]
async fn a_request_the_application_no_longer_admits_is_dropped_not_retried() {
    let (services, _g) = testing::services(Mode::Embedded, None).await;
    let id = seed(&services, ApplicationState::Received).await;
    let row = ask(
        &services,
        &ReprintRequest::new(&id, "lost_in_transit", "sara"),
    )
    .await;
    ReprintSink::new(services.clone())
        .deliver(&row)
        .await
        .expect("a refusal is final: the relay must not retry it");
    assert_eq!(
        services
            .store
            .application(&id)
            .await
            .unwrap()
            .unwrap()
            .state,
        ApplicationState::Received
    );
    assert_eq!(
        count(
            &services,
            "SELECT COUNT(*) AS n FROM reprints WHERE application_id = $1",
            id.as_str()
        )
        .await,
        0
    );
    let mut bad = row.clone();
    bad.payload = "{\"id\": 1}".into();
    let err = ReprintSink::new(services.clone())
        .deliver(&bad)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a reprint request"), "{err}");
}
