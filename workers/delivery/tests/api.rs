//! The delivery HTTP API on both backend families: the offices register as loaded into the
//! store, and clear JSON errors for every refusal (unknown box, wrong office, bad clerk,
//! unknown application, malformed handover); authentication (401 without a valid, unrevoked
//! token on every route), authorisation (an office client acts only for its own office:
//! 403 for a box, transfer or handover of another office; pickup-office changes are for
//! registry and centre clients), the audit log naming the client; and the resolution of
//! office discrepancies (found → late receipt, lost → revocation and reprint, returned).

use std::sync::Arc;

use cardpipe_common::clock::{Clock, TestClock, to_rfc3339};
use cardpipe_common::discrepancies::{self, DiscrepancyError};
use cardpipe_common::domain::{ApplicationId, ApplicationState, Priority};
use cardpipe_common::runtime::Services;
use cardpipe_common::store::{NewApplication, Store};
use cardpipe_common::testing::{self, Mode};
use cardpipe_delivery::config::DeliveryConfig;
use cardpipe_delivery::office::OfficeError;
use cardpipe_delivery::{Delivery, api, clients};
use cardpipe_registry::config::{ClientConfig, RegistryConfig, hash_token};
use serde_json::{Value, json};
use sqlx::Row;
use time::macros::datetime;

const REGISTRY_TOKEN: &str = "registry-token-for-delivery-tests";

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or_default())
    }
    async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, token, None).await
    }
    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, token, Some(body))
            .await
    }
    async fn put(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::PUT, path, token, Some(body))
            .await
    }
}

fn check(r: (u16, Value), status: u16, needle: &str) {
    assert_eq!(r.0, status, "{}", r.1);
    let error = r.1["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains(needle),
        "{error:?} should mention {needle:?}"
    );
}

async fn serve(services: &Services, delivery: Arc<Delivery>) -> Api {
    let registry = RegistryConfig {
        clients: vec![ClientConfig {
            name: "nocr".into(),
            token_sha256: hash_token(REGISTRY_TOKEN),
        }],
        ..RegistryConfig::default()
    };
    let app = api::router(delivery, services.clone(), registry);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Api {
        base,
        http: reqwest::Client::new(),
    }
}

async fn audit_actors(services: &Services, action: &str) -> Vec<(String, String)> {
    sqlx::query("SELECT actor, role FROM audit_log WHERE action = $1 ORDER BY seq")
        .bind(action)
        .fetch_all(services.store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get("actor"), r.get("role")))
        .collect()
}

async fn api_contract(mode: Mode) {
    let clock = Arc::new(TestClock::at(datetime!(2026-02-01 08:00 UTC)));
    let (services, _guard) = testing::services(mode, Some(clock as Arc<dyn Clock>)).await;
    let delivery = Delivery::new(&services, DeliveryConfig::default()).unwrap();
    let api = serve(&services, delivery.clone()).await;
    let hq = clients::add(&delivery, &services, "hq", None, ("sara", "supervisor"))
        .await
        .unwrap()
        .token;
    let centre = Some(hq.as_str());

    // Without a valid token: 401 with a JSON error, on every route.
    for (method, path) in [
        (reqwest::Method::GET, "/api/v1/delivery/offices"),
        (reqwest::Method::GET, "/api/v1/delivery/offices/TBZ-001"),
        (
            reqwest::Method::POST,
            "/api/v1/delivery/boxes/BOX-X/receipt",
        ),
        (
            reqwest::Method::PUT,
            "/api/v1/delivery/applications/nope/pickup-office",
        ),
        (
            reqwest::Method::POST,
            "/api/v1/delivery/transfers/TRF-1/receipt",
        ),
        (reqwest::Method::POST, "/api/v1/delivery/handovers"),
    ] {
        for token in [None, Some("not-a-token"), Some("")] {
            let r = api.send(method.clone(), path, token, Some(json!({}))).await;
            check(r, 401, "bearer token");
        }
    }

    let all = api.get("/api/v1/delivery/offices", centre).await;
    assert_eq!(all.0, 200);
    let offices = all.1["offices"].as_array().unwrap();
    assert_eq!(offices.len(), 390);
    let one = api.get("/api/v1/delivery/offices/TBZ-001", centre).await;
    assert_eq!(one.0, 200);
    assert_eq!(one.1["city"], "تبریز");
    assert!(one.1["kind"] == "government_service_office" || one.1["kind"] == "post_office");
    // The registry's tokens read the register too.
    assert_eq!(
        api.get("/api/v1/delivery/offices/TBZ-001", Some(REGISTRY_TOKEN))
            .await
            .0,
        200
    );

    check(
        api.get("/api/v1/delivery/offices/NOPE", centre).await,
        404,
        "office NOPE",
    );
    check(
        api.post(
            "/api/v1/delivery/boxes/BOX-X/receipt",
            centre,
            json!({"office_code": "TEH-001", "clerk": "c1"}),
        )
        .await,
        404,
        "box BOX-X",
    );
    check(
        api.post(
            "/api/v1/delivery/boxes/BOX-X/receipt",
            centre,
            json!({"office_code": "TEH-001", "clerk": "bad clerk!"}),
        )
        .await,
        400,
        "clerk",
    );
    check(
        api.post(
            "/api/v1/delivery/boxes/BOX-X/receipt",
            centre,
            json!({"clerk": "c1"}),
        )
        .await,
        400,
        "office_code",
    );
    check(
        api.put(
            "/api/v1/delivery/applications/nope/pickup-office",
            centre,
            json!({"pickup_office": "ZZZ-9"}),
        )
        .await,
        400,
        "not in the offices register",
    );
    check(
        api.put(
            "/api/v1/delivery/applications/nope/pickup-office",
            centre,
            json!({"pickup_office": "TEH-001"}),
        )
        .await,
        404,
        "application nope",
    );
    check(
        api.post(
            "/api/v1/delivery/transfers/TRF-1/receipt",
            centre,
            json!({"office_code": "TEH-001", "clerk": "c1"}),
        )
        .await,
        404,
        "transfer TRF-1",
    );
    check(
        api.post("/api/v1/delivery/handovers", centre, json!({
            "application_id": "nope", "office_code": "TEH-001", "clerk": "c1", "fingerprint": "AAAA",
            "previous_card_presented": true, "pins_set": true, "fee_rial": 20000
        }))
        .await,
        404,
        "application nope",
    );
    // A handover without the fingerprint is refused by the JSON contract.
    let r = api
        .http
        .post(format!("{}/api/v1/delivery/handovers", api.base))
        .bearer_auth(&hq)
        .json(&json!({"application_id": "nope", "office_code": "TEH-001", "clerk": "c1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert!(r.text().await.unwrap().contains("fingerprint"));

    offices_and_discrepancies(&services, &delivery, &api, &hq).await;
}

/// An application in `state` (no personal data needed by these paths).
async fn application(services: &Services, state: ApplicationState) -> ApplicationId {
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

/// A shipped box for `office` holding `cards` (all `shipped`).
async fn shipped_box(services: &Services, office: &str, cards: &[&ApplicationId]) -> String {
    let box_id = format!("BOX-{}", uuid::Uuid::now_v7().simple());
    let now = to_rfc3339(services.clock.now());
    sqlx::query(
        "INSERT INTO delivery_boxes (id, office_code, state, capacity, card_count, created_at, shipped_at)
         VALUES ($1, $2, 'shipped', 50, $3, $4, $4)",
    )
    .bind(&box_id)
    .bind(office)
    .bind(cards.len() as i64)
    .bind(&now)
    .execute(services.store.pool())
    .await
    .unwrap();
    for id in cards {
        sqlx::query(
            "INSERT INTO delivery_cards (application_id, box_id, packed_office, office_code, issued_at, void_on, packed_at, shipped_at)
             VALUES ($1, $2, $3, $3, $4, '2026-08-01', $4, $4)",
        )
        .bind(id.as_str())
        .bind(&box_id)
        .bind(office)
        .bind(&now)
        .execute(services.store.pool())
        .await
        .unwrap();
    }
    box_id
}

async fn state(services: &Services, id: &ApplicationId) -> ApplicationState {
    services.store.application(id).await.unwrap().unwrap().state
}

async fn offices_and_discrepancies(
    services: &Services,
    delivery: &Arc<Delivery>,
    api: &Api,
    hq: &str,
) {
    let by = ("sara", "supervisor");
    let teh1 = clients::add(delivery, services, "teh-001-desk", Some("TEH-001"), by)
        .await
        .unwrap()
        .token;
    let teh2 = clients::add(delivery, services, "teh-002-desk", Some("TEH-002"), by)
        .await
        .unwrap()
        .token;
    assert!(matches!(
        clients::add(delivery, services, "teh-001-desk", Some("TEH-001"), by).await,
        Err(OfficeError::Conflict(_))
    ));
    assert!(matches!(
        clients::add(delivery, services, "nowhere", Some("ZZZ-9"), by).await,
        Err(OfficeError::BadRequest(_))
    ));
    // Tokens are stored only as digests.
    let stored: Vec<String> = sqlx::query("SELECT token_sha256 FROM delivery_api_clients")
        .fetch_all(services.store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| r.get("token_sha256"))
        .collect();
    assert!(stored.contains(&hash_token(&teh1)) && !stored.contains(&teh1));

    let a = application(services, ApplicationState::Shipped).await;
    let b = application(services, ApplicationState::Shipped).await;
    let c = application(services, ApplicationState::Shipped).await;
    let box1 = shipped_box(services, "TEH-001", &[&a, &b, &c]).await;
    let receipt = format!("/api/v1/delivery/boxes/{box1}/receipt");

    // Another office's clerk, or the registry, may not acknowledge TEH-001's box.
    check(
        api.post(&receipt, Some(&teh2), json!({"clerk": "z1"}))
            .await,
        403,
        "TEH-002",
    );
    check(
        api.post(
            &receipt,
            Some(&teh2),
            json!({"office_code": "TEH-001", "clerk": "z1"}),
        )
        .await,
        403,
        "TEH-002",
    );
    check(
        api.post(
            &receipt,
            Some(REGISTRY_TOKEN),
            json!({"office_code": "TEH-001", "clerk": "z1"}),
        )
        .await,
        403,
        "registry",
    );
    assert_eq!(state(services, &a).await, ApplicationState::Shipped);

    // TEH-001's own clerk: A found, B and C missing, a stray card.
    let (status, out) = api
        .post(
            &receipt,
            Some(&teh1),
            json!({"clerk": "clerk1", "scanned": [a.as_str(), "STRAY-CARD"]}),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["received"], json!([a.as_str()]));
    assert_eq!(out["extra"], json!(["STRAY-CARD"]));
    assert_eq!(out["missing"].as_array().unwrap().len(), 2);
    assert_eq!(state(services, &a).await, ApplicationState::AtOffice);
    assert_eq!(
        audit_actors(services, "delivery.box_receipt").await,
        vec![("office-client:teh-001-desk".to_owned(), "office".to_owned())]
    );

    // Handover of TEH-001's card by TEH-002: 403 before any check of the holder.
    check(
        api.post(
            "/api/v1/delivery/handovers",
            Some(&teh2),
            json!({
                "application_id": a.as_str(), "clerk": "z1", "fingerprint": "AAAA",
                "previous_card_presented": true, "pins_set": true, "fee_rial": 20000
            }),
        )
        .await,
        403,
        "TEH-002",
    );
    // The registry's id names the same card (and meets the same office check, not a 404).
    check(
        api.post(
            "/api/v1/delivery/handovers",
            Some(&teh2),
            json!({
                "application_id": format!("REG-{a}"), "clerk": "z1", "fingerprint": "AAAA",
                "previous_card_presented": true, "pins_set": true, "fee_rial": 20000
            }),
        )
        .await,
        403,
        "TEH-002",
    );
    // Pickup-office changes: not for office clients; the registry only for its own batches.
    check(
        api.put(
            &format!("/api/v1/delivery/applications/{a}/pickup-office"),
            Some(&teh1),
            json!({"pickup_office": "TEH-002"}),
        )
        .await,
        403,
        "office clients",
    );
    check(
        api.put(
            &format!("/api/v1/delivery/applications/{a}/pickup-office"),
            Some(REGISTRY_TOKEN),
            json!({"pickup_office": "TEH-002"}),
        )
        .await,
        404,
        "application",
    );
    // A transfer to TEH-001 is TEH-001's to acknowledge.
    let now = to_rfc3339(services.clock.now());
    sqlx::query(
        "INSERT INTO delivery_transfers (id, application_id, from_office, to_office, state, requested_by, requested_at)
         VALUES ('TRF-T1', $1, 'ISF-001', 'TEH-001', 'in_transit', 'centre:hq', $2)",
    )
    .bind(a.as_str())
    .bind(&now)
    .execute(services.store.pool())
    .await
    .unwrap();
    // (As a transfer leaves it: in transit until the new office acknowledges it.)
    sqlx::query("UPDATE applications SET state = 'in_transit' WHERE id = $1")
        .bind(a.as_str())
        .execute(services.store.pool())
        .await
        .unwrap();
    check(
        api.post(
            "/api/v1/delivery/transfers/TRF-T1/receipt",
            Some(&teh2),
            json!({"clerk": "z1"}),
        )
        .await,
        403,
        "TEH-002",
    );
    let (status, out) = api
        .post(
            "/api/v1/delivery/transfers/TRF-T1/receipt",
            Some(&teh1),
            json!({"clerk": "clerk1"}),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(
        audit_actors(services, "delivery.transfer_receipt").await,
        vec![("office-client:teh-001-desk".to_owned(), "office".to_owned())]
    );

    // Discrepancies: three open.
    let open = discrepancies::list(services, true).await.unwrap();
    assert_eq!(open.len(), 3);
    assert_eq!(discrepancies::open_count(services).await.unwrap(), 3);
    let of = |app: &str| {
        open.iter()
            .find(|d| d.application_id == app)
            .unwrap()
            .id
            .clone()
    };
    let (d_b, d_c, d_x) = (of(b.as_str()), of(c.as_str()), of("STRAY-CARD"));

    // B cannot be received late before it is found.
    check(
        api.post(
            &receipt,
            Some(&teh1),
            json!({"clerk": "clerk1", "scanned": [b.as_str()]}),
        )
        .await,
        409,
        "already received",
    );
    // Outcomes must fit the kind; a note is required.
    assert!(matches!(
        discrepancies::resolve(services, &d_b, "returned", "x", by).await,
        Err(DiscrepancyError::BadRequest(ref m)) if m.contains("found or lost")
    ));
    assert!(matches!(
        discrepancies::resolve(services, &d_x, "lost", "x", by).await,
        Err(DiscrepancyError::BadRequest(ref m)) if m.contains("returned")
    ));
    assert!(matches!(
        discrepancies::resolve(services, &d_b, "found", "  ", by).await,
        Err(DiscrepancyError::BadRequest(ref m)) if m.contains("note")
    ));
    // B turned up: found, then TEH-001 receives it on the same box.
    let found = discrepancies::resolve(services, &d_b, "found", "under the tray liner", by)
        .await
        .unwrap();
    assert_eq!(found.discrepancy.resolution.as_deref(), Some("found"));
    assert_eq!(found.discrepancy.resolved_by.as_deref(), Some("sara"));
    assert!(found.reprint_id.is_none());
    assert!(matches!(
        discrepancies::resolve(services, &d_b, "lost", "again", by).await,
        Err(DiscrepancyError::Conflict(_))
    ));
    // Only found cards may be received late; another office still may not.
    check(
        api.post(
            &receipt,
            Some(&teh1),
            json!({"clerk": "clerk1", "scanned": [b.as_str(), c.as_str()]}),
        )
        .await,
        409,
        "found",
    );
    check(
        api.post(
            &receipt,
            Some(&teh2),
            json!({"clerk": "z1", "scanned": [b.as_str()]}),
        )
        .await,
        403,
        "TEH-002",
    );
    let (status, out) = api
        .post(
            &receipt,
            Some(&teh1),
            json!({"clerk": "clerk1", "scanned": [b.as_str()]}),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["received"], json!([b.as_str()]));
    assert_eq!(state(services, &b).await, ApplicationState::AtOffice);
    assert_eq!(
        audit_actors(services, "delivery.late_receipt").await.len(),
        1
    );

    // C was lost in transit: in the same transaction as the resolution, QC's reprint
    // workflow is asked (outbox topic qc.reprint) for a new card under the id the
    // discrepancy records; QC revokes and remakes it (workers/qc/tests/reprint_contract.rs).
    let lost = discrepancies::resolve(services, &d_c, "lost", "carrier lost the parcel", by)
        .await
        .unwrap();
    let reprint_id = lost.reprint_id.clone().expect("a reprint for a lost card");
    assert_eq!(
        lost.discrepancy.reprint_id.as_deref(),
        Some(reprint_id.as_str())
    );
    let row = sqlx::query("SELECT payload FROM outbox WHERE topic = $1 AND subject = $2")
        .bind(cardpipe_common::contract::REPRINT_TOPIC)
        .bind(c.as_str())
        .fetch_one(services.store.pool())
        .await
        .unwrap();
    let request: cardpipe_common::contract::ReprintRequest =
        serde_json::from_str(&row.get::<String, _>("payload")).unwrap();
    assert_eq!(request.id, reprint_id);
    assert_eq!(request.reason, "lost_in_transit");
    assert_eq!(request.operator, "sara");

    // The stray card went back to the centre.
    let returned =
        discrepancies::resolve(services, &d_x, "returned", "sent back to the centre", by)
            .await
            .unwrap();
    assert_eq!(returned.discrepancy.resolution.as_deref(), Some("returned"));
    assert_eq!(discrepancies::open_count(services).await.unwrap(), 0);
    assert!(
        discrepancies::list(services, true)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(discrepancies::list(services, false).await.unwrap().len(), 3);
    let resolutions = audit_actors(services, "delivery.discrepancy_resolve").await;
    assert_eq!(resolutions.len(), 3);
    assert!(
        resolutions
            .iter()
            .all(|(a, r)| a == "sara" && r == "supervisor")
    );
    // The reprint itself is QC's (its sink applies the request; not running here).
    assert_eq!(audit_actors(services, "reprint.request").await.len(), 0);

    // A revoked client's token stops working at once; revoking is audited.
    clients::revoke(services, "teh-001-desk", by).await.unwrap();
    check(
        api.get("/api/v1/delivery/offices", Some(&teh1)).await,
        401,
        "bearer token",
    );
    assert!(matches!(
        clients::revoke(services, "teh-001-desk", by).await,
        Err(OfficeError::NotFound(_))
    ));
    let listed = clients::list(services).await.unwrap();
    assert_eq!(listed.len(), 3);
    assert!(
        listed
            .iter()
            .any(|c| c.name == "teh-001-desk" && c.revoked_at.is_some())
    );
    assert_eq!(
        audit_actors(services, "delivery.api_client_add")
            .await
            .len(),
        3
    );
    assert_eq!(
        audit_actors(services, "delivery.api_client_revoke")
            .await
            .len(),
        1
    );
    assert_eq!(api.get("/api/v1/delivery/offices", Some(hq)).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_embedded() {
    api_contract(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_distributed() {
    api_contract(Mode::Distributed).await;
}
