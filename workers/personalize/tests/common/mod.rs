//! Shared fixtures: a CA hierarchy, credentials packages issued with `cardpipe_pki`, seeded
//! applications in `keys_issued`, and a pipeline running the personalize stage.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cardpipe_card::cards;
use cardpipe_card::config::{SiteSecrets, TransportPins};
use cardpipe_card::farm::Farm;
use cardpipe_card::scp03::MasterKeys;
use cardpipe_card::script::ScriptOptions;
use cardpipe_common::broker::{Job, RetryPolicy};
use cardpipe_common::domain::applicant::{ApplicantRecord, Biometrics, FingerprintEntry};
use cardpipe_common::domain::{ApplicationId, ApplicationState, Priority};
use cardpipe_common::records;
use cardpipe_common::runtime::pipeline::{self, RunningPipeline};
use cardpipe_common::runtime::relay::Relay;
use cardpipe_common::runtime::{Services, Stage, StageSettings};
use cardpipe_common::store::{NewApplication, Store};
use cardpipe_common::testing::stages::StepStage;
use cardpipe_personalize::stage::PersonalizeStage;
use cardpipe_pki::ca::{CaConfig, init};
use cardpipe_pki::citizen::CitizenProfiles;
use cardpipe_pki::custody::{CardCredentials, TransportKey};
use cardpipe_pki::issue::CardIssuer;
use cardpipe_pki::keystore::{FileKeyStore, KdfParams};
use secrecy::SecretString;
use time::OffsetDateTime;
use zeroize::Zeroizing;

pub struct Pki {
    _dir: tempfile::TempDir,
    pub issuer: CardIssuer,
    pub transport_hex: String,
}

pub const TRANSPORT_ID: &str = "encoder-site-test";

pub fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        FileKeyStore::create(
            dir.path().join("ca.keystore"),
            &SecretString::from("pw"),
            KdfParams::for_tests(),
        )
        .unwrap(),
    );
    let now = OffsetDateTime::now_utc() - time::Duration::minutes(1);
    let hierarchy = init(store.as_ref(), &CaConfig::default(), now).unwrap();
    let issuer = CardIssuer::new(store, &hierarchy, &CitizenProfiles::default()).unwrap();
    let transport_hex = hex::encode(rand::random::<[u8; 32]>());
    Pki {
        _dir: dir,
        issuer,
        transport_hex,
    }
}

impl Pki {
    pub fn transport(&self) -> TransportKey {
        TransportKey::from_hex(
            TRANSPORT_ID,
            &SecretString::from(self.transport_hex.clone()),
        )
        .unwrap()
    }

    pub fn secrets(&self) -> SiteSecrets {
        SiteSecrets {
            master: Arc::new(MasterKeys::test_keys()),
            transport: self.transport(),
            pins: TransportPins {
                id_pin: Zeroizing::new(b"111111".to_vec()),
                sign_pin: Zeroizing::new(b"222222".to_vec()),
                puk: Zeroizing::new(b"33333333".to_vec()),
            },
        }
    }
}

fn fingerprint(position: u8) -> Vec<u8> {
    // A valid ISO/IEC 19794-2 record (the card OS's example) for the match-on-card
    // reference; the finger position is only in DG3's header.
    let _ = position;
    cardpipe_card::card_os::bio::example_record()
}

pub fn record(i: usize) -> (ApplicantRecord, Biometrics) {
    let (record, mut biometrics) =
        cardpipe_pki::lds::sample_applicant(2000 + i as u32, &format!("REG-{i}"));
    biometrics.fingerprints = [1u8, 6]
        .iter()
        .map(|&p| FingerprintEntry {
            position: p,
            template: Some(fingerprint(p)),
            missing_reason: None,
        })
        .collect();
    (record, biometrics)
}

/// `n` applications in `keys_issued` with a record, biometrics, a credentials package
/// (artifact "credentials") and a personalize job.
pub async fn seed(
    services: &Services,
    pki: &Pki,
    n: usize,
) -> Vec<(ApplicationId, CardCredentials)> {
    seed_with(services, &pki.issuer, Some(&pki.transport()), n).await
}

/// Like [`seed`] with packages of `issuer`: keys generated off the card and wrapped under
/// `transport`, or (`None`) on-card packages without key material.
pub async fn seed_with(
    services: &Services,
    issuer: &CardIssuer,
    transport: Option<&TransportKey>,
    n: usize,
) -> Vec<(ApplicationId, CardCredentials)> {
    let now = services.clock.now();
    let mut out = Vec::new();
    for i in 0..n {
        let id = ApplicationId::generate();
        let (rec, bio) = record(i);
        let chip = cardpipe_pki::lds::chip_input(&rec, &bio);
        let creds = match transport {
            Some(transport) => issuer
                .issue(
                    id.as_str(),
                    &chip,
                    transport,
                    OffsetDateTime::now_utc() - time::Duration::minutes(1),
                )
                .unwrap(),
            None => issuer.prepare_on_card(id.as_str(), &chip).unwrap(),
        };
        let key = format!("applications/{id}/credentials-test.json");
        services
            .objects
            .put(&key, Bytes::from(serde_json::to_vec(&creds).unwrap()))
            .await
            .unwrap();
        let artifacts = records::put_biometrics(services, &id, &bio).await.unwrap();
        let mut tx = services.store.begin().await.unwrap();
        Store::insert_application(
            &mut tx,
            &NewApplication {
                id: id.clone(),
                registry_id: format!("R-{i}-{id}"),
                batch_id: None,
                state: ApplicationState::KeysIssued,
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
        Store::put_artifact(&mut tx, &id, "credentials", &key, now)
            .await
            .unwrap();
        // As the keys stage records them: personalization checks the package against them.
        if let Some(keys) = &creds.off_card {
            for cert in [
                &keys.authentication_certificate,
                &keys.signature_certificate,
            ] {
                cardpipe_pki::store::insert_certificate(&mut tx, &id, cert, &key, now)
                    .await
                    .unwrap();
            }
        }
        Store::enqueue_job(&mut tx, &Job::new("personalize", id.as_str()), now)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        out.push((id, creds));
    }
    out
}

pub fn stage(farm: Arc<Farm>, pki: &Pki, max_blanks: u32) -> PersonalizeStage {
    PersonalizeStage::new(farm, pki.secrets(), ScriptOptions::extended(), max_blanks)
}

pub fn settings() -> StageSettings {
    StageSettings {
        concurrency: 4,
        prefetch: 8,
        retry: RetryPolicy {
            delays: vec![Duration::from_millis(100)],
            max_attempts: 2,
        },
    }
}

pub async fn start(services: &Services, stage: PersonalizeStage) -> RunningPipeline {
    const FROM: &[ApplicationState] = &[ApplicationState::Personalized];
    let qc = StepStage::new("qc", FROM, ApplicationState::QcPassed, None);
    let stages: Vec<(Arc<dyn Stage>, StageSettings)> =
        vec![(Arc::new(stage), settings()), (Arc::new(qc), settings())];
    let relay = Relay::new(services.clone()).with_poll_interval(Duration::from_millis(50));
    pipeline::start(services, stages, relay, Duration::from_secs(10))
        .await
        .expect("pipeline")
}

/// Waits until every application passed personalization (qc stand-in moves it on).
pub async fn wait_personalized(services: &Services, ids: &[ApplicationId]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for id in ids {
        loop {
            let app = services.store.application(id).await.unwrap().unwrap();
            if matches!(
                app.state,
                ApplicationState::Personalized | ApplicationState::QcPassed
            ) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} stuck in {}",
                app.state
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Exactly one personalized card per application, with a chip serial; returns the rows.
pub async fn one_good_card(services: &Services, id: &ApplicationId) -> Vec<cards::CardRow> {
    let rows = cards::for_application(&services.store, id).await.unwrap();
    let good: Vec<_> = rows.iter().filter(|r| r.state == "personalized").collect();
    assert_eq!(good.len(), 1, "{rows:?}");
    assert!(good[0].chip_serial.is_some());
    assert!(
        rows.iter()
            .all(|r| r.state == "personalized" || r.state == "spoiled"),
        "{rows:?}"
    );
    rows
}
