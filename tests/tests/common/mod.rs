//! Fixtures shared by the card-making end-to-end tests (QC pipeline, line QC through pcscd,
//! on-card keys): sample applicants whose match-on-card reference the card OS accepts, seeded
//! as cleared by dedup with a keys job each.
#![allow(dead_code)] // each test binary uses a different part

use cardpipe_common::broker::Job;
use cardpipe_common::domain::applicant::{ApplicantRecord, Biometrics, FingerprintEntry};
use cardpipe_common::domain::{ApplicationId, ApplicationState, Priority};
use cardpipe_common::records;
use cardpipe_common::runtime::Services;
use cardpipe_common::store::{NewApplication, Store};

/// A sample application whose DG3 fingers (1 and 6) carry the card OS's example record,
/// the template match-on-card is personalized with.
pub fn record(i: usize) -> (ApplicantRecord, Biometrics) {
    let (record, mut biometrics) =
        cardpipe_pki::lds::sample_applicant(4000 + i as u32, &format!("REG-{i}"));
    biometrics.fingerprints = [1u8, 6]
        .iter()
        .map(|&p| FingerprintEntry {
            position: p,
            template: Some(cardpipe_card::card_os::bio::example_record()),
            missing_reason: None,
        })
        .collect();
    (record, biometrics)
}

/// `n` applications cleared by dedup, with a keys job each.
pub async fn seed(services: &Services, n: usize) -> Vec<ApplicationId> {
    let now = services.clock.now();
    let mut ids = Vec::new();
    for i in 0..n {
        let id = ApplicationId::generate();
        let (rec, bio) = record(i);
        let artifacts = records::put_biometrics(services, &id, &bio).await.unwrap();
        let mut tx = services.store.begin().await.unwrap();
        Store::insert_application(
            &mut tx,
            &NewApplication {
                id: id.clone(),
                registry_id: format!("R-{i}-{id}"),
                batch_id: None,
                state: ApplicationState::DedupClear,
                priority: Priority::Normal,
            },
            "registry:test",
            now,
        )
        .await
        .unwrap();
        records::insert_record(&mut tx, services, &id, &rec, &artifacts)
            .await
            .unwrap();
        Store::enqueue_job(&mut tx, &Job::new("keys", id.as_str()), now)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        ids.push(id);
    }
    ids
}
