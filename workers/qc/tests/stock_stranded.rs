//! Stock reconciliation finds a blank issued to an encoder whose card was never recorded (the
//! encoder's process was killed between taking the blank and writing the card row), on both
//! store families.

use std::sync::Arc;

use cardpipe_common::clock::TestClock;
use cardpipe_common::testing::{self, Mode};
use cardpipe_qc::stock::{self, NewLot, STRANDED_AFTER};

async fn a_blank_at_an_encoder_without_a_card_unbalances_the_stock(mode: Mode) {
    let clock = TestClock::at(time::OffsetDateTime::now_utc());
    let (services, _guard) = testing::services(mode, Some(Arc::new(clock.clone()))).await;
    stock::receive(
        &services,
        &NewLot {
            lot_id: None,
            supplier: "Supplier".into(),
            chip_type: "test-chip".into(),
            serial_prefix: "BLK-".into(),
            first: 1,
            last: 3,
        },
        "vault.alice",
    )
    .await
    .expect("receive");
    let serial = stock::issue_to_encoder(&services, "encoder-01")
        .await
        .expect("issue")
        .expect("a blank");
    // Just issued: the encoder is writing the card row; nothing is wrong yet.
    let r = stock::reconcile(&services, None).await.expect("reconcile");
    assert_eq!(r.stranded_at_encoder, 0);
    assert!(r.balanced, "{r:#?}");
    // The process died: no card row ever comes.
    clock.advance(STRANDED_AFTER + time::Duration::minutes(1));
    let r = stock::reconcile(&services, None).await.expect("reconcile");
    assert_eq!(r.stranded_at_encoder, 1, "{serial} is stranded: {r:#?}");
    assert!(!r.balanced, "a stranded blank unbalances the stock: {r:#?}");
}

#[tokio::test]
async fn embedded() {
    a_blank_at_an_encoder_without_a_card_unbalances_the_stock(Mode::Embedded).await
}

#[tokio::test]
async fn distributed() {
    a_blank_at_an_encoder_without_a_card_unbalances_the_stock(Mode::Distributed).await
}
