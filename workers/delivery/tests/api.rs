//! The delivery HTTP API on both backend families: the offices register as loaded into the
//! store, and clear JSON errors for every refusal (unknown box, wrong office, bad clerk,
//! unknown application, malformed handover).

use std::sync::Arc;

use cardpipe_common::clock::{Clock, TestClock};
use cardpipe_common::testing::{self, Mode};
use cardpipe_delivery::config::DeliveryConfig;
use cardpipe_delivery::{Delivery, api};
use time::macros::datetime;

async fn api_contract(mode: Mode) {
    let clock = Arc::new(TestClock::at(datetime!(2026-02-01 08:00 UTC)));
    let (services, _guard) = testing::services(mode, Some(clock as Arc<dyn Clock>)).await;
    let delivery = Delivery::new(&services, DeliveryConfig::default(), None).unwrap();
    let app = api::router(delivery, services.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::new();

    let all: serde_json::Value = http
        .get(format!("{base}/api/v1/delivery/offices"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let offices = all["offices"].as_array().unwrap();
    assert_eq!(offices.len(), 390);
    let one = http
        .get(format!("{base}/api/v1/delivery/offices/TBZ-001"))
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 200);
    let one: serde_json::Value = one.json().await.unwrap();
    assert_eq!(one["city"], "تبریز");
    assert!(one["kind"] == "government_service_office" || one["kind"] == "post_office");

    let check = |status: u16, needle: &'static str| {
        move |r: (reqwest::StatusCode, serde_json::Value)| {
            assert_eq!(r.0.as_u16(), status, "{}", r.1);
            let error = r.1["error"].as_str().unwrap_or_default().to_owned();
            assert!(
                error.contains(needle),
                "{error:?} should mention {needle:?}"
            );
        }
    };
    async fn send(req: reqwest::RequestBuilder) -> (reqwest::StatusCode, serde_json::Value) {
        let r = req.send().await.unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or_default())
    }
    check(404, "office NOPE")(send(http.get(format!("{base}/api/v1/delivery/offices/NOPE"))).await);
    check(404, "box BOX-X")(
        send(
            http.post(format!("{base}/api/v1/delivery/boxes/BOX-X/receipt"))
                .json(&serde_json::json!({"office_code": "TEH-001", "clerk": "c1"})),
        )
        .await,
    );
    check(400, "clerk")(
        send(
            http.post(format!("{base}/api/v1/delivery/boxes/BOX-X/receipt"))
                .json(&serde_json::json!({"office_code": "TEH-001", "clerk": "bad clerk!"})),
        )
        .await,
    );
    check(400, "not in the offices register")(
        send(
            http.put(format!(
                "{base}/api/v1/delivery/applications/nope/pickup-office"
            ))
            .json(&serde_json::json!({"pickup_office": "ZZZ-9", "actor": "operator:x"})),
        )
        .await,
    );
    check(404, "application nope")(
        send(
            http.put(format!(
                "{base}/api/v1/delivery/applications/nope/pickup-office"
            ))
            .json(&serde_json::json!({"pickup_office": "TEH-001", "actor": "operator:x"})),
        )
        .await,
    );
    check(400, "actor")(
        send(
            http.put(format!(
                "{base}/api/v1/delivery/applications/nope/pickup-office"
            ))
            .json(&serde_json::json!({"pickup_office": "TEH-001", "actor": ""})),
        )
        .await,
    );
    check(404, "transfer TRF-1")(
        send(
            http.post(format!("{base}/api/v1/delivery/transfers/TRF-1/receipt"))
                .json(&serde_json::json!({"office_code": "TEH-001", "clerk": "c1"})),
        )
        .await,
    );
    check(404, "application nope")(
        send(http.post(format!("{base}/api/v1/delivery/handovers")).json(&serde_json::json!({
            "application_id": "nope", "office_code": "TEH-001", "clerk": "c1", "fingerprint": "AAAA",
            "previous_card_presented": true, "pins_set": true, "fee_rial": 20000
        })))
        .await,
    );
    // A handover without the fingerprint is refused by the JSON contract.
    let r = http
        .post(format!("{base}/api/v1/delivery/handovers"))
        .json(
            &serde_json::json!({"application_id": "nope", "office_code": "TEH-001", "clerk": "c1"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert!(r.text().await.unwrap().contains("fingerprint"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_embedded() {
    api_contract(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_distributed() {
    api_contract(Mode::Distributed).await;
}
