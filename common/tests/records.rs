//! Personal records and biometrics are sealed at rest and load back, on both
//! backend families.

use cardpipe_common::domain::applicant::{
    ApplicantGroup, ApplicantRecord, Biometrics, Fees, FingerprintEntry, Gender,
};
use cardpipe_common::domain::{ApplicationId, ApplicationState, Priority};
use cardpipe_common::records;
use cardpipe_common::store::{NewApplication, Store};
use cardpipe_common::testing::{self, Mode};
use time::macros::date;

fn record() -> ApplicantRecord {
    ApplicantRecord {
        registry_id: "REG-1".into(),
        applied_on: date!(2026 - 11 - 01),
        tracking_code: "TRK-0001".into(),
        payment_tracking_code: "PAY-1".into(),
        national_code: "0499370899".into(),
        first_name: "زهرا".into(),
        last_name: "احمدی".into(),
        father_name: "علی".into(),
        birth_date: date!(1990 - 03 - 21),
        birth_certificate_number: "1234".into(),
        gender: Gender::Female,
        postal_code: "1234567890".into(),
        address: "تهران، خیابان آزادی".into(),
        mobile: "09121234567".into(),
        landline: "02112345678".into(),
        applicant_group: ApplicantGroup::FirstCard,
        previous_card_issued_on: None,
        pickup_office: "TEH-001".into(),
        fees: Fees {
            issuance_rial: 200_000,
            office_fee_rial: 90_000,
            delivery_fee_rial: 20_000,
        },
    }
}

async fn sealed_round_trip(mode: Mode) {
    let (services, _guard) = testing::services(mode, None).await;
    let id = ApplicationId::generate();
    let bio = Biometrics {
        photo_jpeg: vec![0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3],
        fingerprints: (1..=10)
            .map(|p| FingerprintEntry {
                position: p,
                template: Some(vec![p; 40]),
                missing_reason: None,
            })
            .collect(),
    };
    let artifacts = records::put_biometrics(&services, &id, &bio)
        .await
        .expect("put biometrics");
    let mut tx = services.store.begin().await.expect("begin");
    let app = NewApplication {
        id: id.clone(),
        registry_id: "REG-1".into(),
        batch_id: None,
        state: ApplicationState::Received,
        priority: Priority::Normal,
    };
    Store::insert_application(&mut tx, &app, "registry:test", services.clock.now())
        .await
        .expect("insert");
    records::insert_record(&mut tx, &services, &id, &record(), &artifacts)
        .await
        .expect("record");
    tx.commit().await.expect("commit");

    assert_eq!(
        records::load_record(&services, &id).await.expect("load"),
        record()
    );
    assert_eq!(
        records::load_biometrics(&services, &id)
            .await
            .expect("load"),
        bio
    );
    assert_eq!(
        records::find_by_tracking_code(&services, "TRK-0001")
            .await
            .expect("find"),
        Some(id.clone())
    );
    assert_eq!(
        records::find_by_national_code(&services, "0499370899", Some(date!(1990 - 03 - 21)))
            .await
            .expect("find"),
        vec![id.clone()]
    );
    assert!(
        records::find_by_national_code(&services, "0499370899", Some(date!(1990 - 03 - 22)))
            .await
            .expect("find")
            .is_empty()
    );

    // Nothing personal is stored in clear: not in the database row, not in the objects.
    let row: Vec<u8> = sqlx::query_scalar("SELECT sealed_record FROM applicant_records")
        .fetch_one(services.store.pool())
        .await
        .expect("row");
    assert!(!row.windows(10).any(|w| w == b"0499370899"));
    for (_, key) in &artifacts {
        let blob = services
            .objects
            .get(key)
            .await
            .expect("get")
            .expect("exists");
        assert!(
            !blob.windows(4).any(|w| w == [0xFF, 0xD8, 0xFF, 0xE0]),
            "photo is sealed"
        );
    }
    // The record's Debug output is redacted.
    let shown = format!("{:?}", record());
    assert!(
        !shown.contains("0499370899") && !shown.contains("زهرا"),
        "{shown}"
    );
}

#[tokio::test]
async fn embedded_sealed_round_trip() {
    sealed_round_trip(Mode::Embedded).await
}

#[tokio::test]
async fn distributed_sealed_round_trip() {
    sealed_round_trip(Mode::Distributed).await
}
