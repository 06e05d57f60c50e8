//! The keys stage in a running pipeline, on both backend families (embedded: SQLite,
//! in-process broker, local files; distributed: PostgreSQL, RabbitMQ, S3), checked with
//! the `openssl` command line: certificates against the chain, EF.SOD with `cms -verify`,
//! a revoked card against the published CRL. Also: Document Signer rotation exactly once
//! with concurrent rotators, revocation through the outbox sink, crypto-shredding, and
//! SoftHSM2 holding the CA keys in a distributed run. These runs issue the keys off the card
//! (`[keys] generation = "off_card"`: the package carries certificates and wrapped keys);
//! on-card packages (no key material) are checked in tests/on_card_keys.rs of
//! `cardpipe-tests` with the personalize and QC stages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration as StdDuration;

use cardpipe_common::broker::{Job, RetryPolicy};
use cardpipe_common::clock::{Clock, TestClock};
use cardpipe_common::contract::RevocationCause;
use cardpipe_common::domain::applicant::{ApplicantRecord, Biometrics};
use cardpipe_common::domain::{ApplicationId, ApplicationState, Priority};
use cardpipe_common::records;
use cardpipe_common::runtime::pipeline::{self, RunningPipeline};
use cardpipe_common::runtime::relay::{OutboxSink, Relay};
use cardpipe_common::runtime::{Services, Stage, StageSettings};
use cardpipe_common::store::{NewApplication, OutboxRow, Store};
use cardpipe_common::testing::stages::StepStage;
use cardpipe_common::testing::{self, Mode};
use cardpipe_keys::ops::{
    self, LATEST_CRL_KEY, RevocationSink, RotationOutcome, destroy_wrapped_keys, revoke_application,
};
use cardpipe_keys::stage::{CREDENTIALS_ARTIFACT, KeysStage};
use cardpipe_pki::ca::CaHierarchy;
use cardpipe_pki::citizen::CardKeyRole;
use cardpipe_pki::crl::parse_crl;
use cardpipe_pki::custody::{CardCredentials, KeyOrigin, TransportKey, unwrap};
use cardpipe_pki::keystore::softhsm::SOFTHSM2_MODULE;
use cardpipe_pki::keystore::{Backend, CaKeyStore, Pkcs11Config, Pkcs11KeyStore};
use cardpipe_pki::pkix::to_pem;
use cardpipe_pki::settings::{Pki, PkiConfig};
use cardpipe_pki::sod::unwrap_ef_sod;
use cardpipe_pki::store as pki_store;
use sqlx::Row;
use time::{Duration, OffsetDateTime};

const PERSONALIZED: &[ApplicationState] = &[ApplicationState::KeysIssued];

fn openssl(args: &[&str], dir: &Path) -> Output {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("the `openssl` command-line tool is required (apt-get install openssl): {e}")
        })
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Test configuration: cheap scrypt, a small document budget.
fn test_config() -> PkiConfig {
    PkiConfig {
        kdf_log_n: 10,
        ..PkiConfig::default()
    }
}

/// A clock two minutes in the past, so openssl sees certificates and CRLs as valid.
fn clock() -> Arc<TestClock> {
    Arc::new(TestClock::at(
        OffsetDateTime::now_utc().replace_nanosecond(0).unwrap() - Duration::minutes(2),
    ))
}

fn record(i: usize) -> (ApplicantRecord, Biometrics) {
    cardpipe_pki::lds::sample_applicant(1000 + i as u32, &format!("REG-{i}"))
}

/// `n` applications in `dedup_clear` with sealed records and biometrics and a keys job.
async fn seed(services: &Services, n: usize) -> Vec<ApplicationId> {
    let now = services.clock.now();
    let mut ids = Vec::new();
    for i in 0..n {
        let id = ApplicationId::generate();
        let (rec, bio) = record(i);
        let artifacts = records::put_biometrics(services, &id, &bio)
            .await
            .expect("biometrics");
        let mut tx = services.store.begin().await.expect("begin");
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
        .expect("insert");
        records::insert_record(&mut tx, services, &id, &rec, &artifacts)
            .await
            .expect("record");
        Store::enqueue_job(&mut tx, &Job::new("keys", id.as_str()), now)
            .await
            .expect("job");
        tx.commit().await.expect("commit");
        ids.push(id);
    }
    ids
}

fn settings() -> StageSettings {
    StageSettings {
        concurrency: 2,
        prefetch: 4,
        retry: RetryPolicy {
            delays: vec![StdDuration::from_millis(100)],
            max_attempts: 3,
        },
    }
}

async fn start(services: &Services, pki: Arc<Pki>) -> RunningPipeline {
    // A stand-in for the personalize stage, so the hand-over has a consumer.
    let personalize = StepStage::new(
        "personalize",
        PERSONALIZED,
        ApplicationState::Personalized,
        None,
    );
    let stages: Vec<(Arc<dyn Stage>, StageSettings)> = vec![
        (
            Arc::new(KeysStage::new(pki).with_generation(KeyOrigin::OffCard)),
            settings(),
        ),
        (Arc::new(personalize), settings()),
    ];
    let relay = Relay::new(services.clone())
        .with_poll_interval(StdDuration::from_millis(50))
        .with_sink(
            cardpipe_common::contract::REVOCATION_TOPIC,
            Arc::new(RevocationSink::new(services.clone())),
        );
    pipeline::start(services, stages, relay, StdDuration::from_secs(10))
        .await
        .expect("pipeline")
}

async fn wait_personalized(services: &Services, ids: &[ApplicationId]) {
    let deadline = tokio::time::Instant::now() + StdDuration::from_secs(60);
    for id in ids {
        loop {
            let app = services.store.application(id).await.unwrap().unwrap();
            if app.state == ApplicationState::Personalized {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} stuck in {}",
                app.state
            );
            tokio::time::sleep(StdDuration::from_millis(50)).await;
        }
    }
}

async fn credentials(services: &Services, id: &ApplicationId) -> (String, CardCredentials) {
    let key = services
        .store
        .artifact(id, CREDENTIALS_ARTIFACT)
        .await
        .unwrap()
        .expect("credentials artifact recorded");
    assert!(key.starts_with(&format!("applications/{id}/credentials-")));
    let stored = services
        .objects
        .get(&key)
        .await
        .unwrap()
        .expect("package stored");
    assert!(
        serde_json::from_slice::<serde_json::Value>(&stored).is_err(),
        "the package is sealed, not JSON in clear"
    );
    let bytes = cardpipe_common::contract::load_credentials(services, id, &key)
        .await
        .unwrap()
        .expect("package stored");
    (key, serde_json::from_slice(&bytes).expect("package JSON"))
}

fn write_chain(dir: &Path, h: &CaHierarchy) {
    std::fs::write(dir.join("root.pem"), h.root.pem().unwrap()).unwrap();
    std::fs::write(dir.join("issuing.pem"), h.issuing.pem().unwrap()).unwrap();
}

/// openssl verifies both certificates against the chain and EF.SOD as CMS.
fn openssl_verifies(dir: &Path, tag: &str, creds: &CardCredentials) {
    let auth = format!("{tag}-auth.pem");
    let sign = format!("{tag}-sign.pem");
    std::fs::write(
        dir.join(&auth),
        to_pem(
            "CERTIFICATE",
            &creds
                .off_card
                .as_ref()
                .unwrap()
                .authentication_certificate
                .der,
        )
        .unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join(&sign),
        to_pem(
            "CERTIFICATE",
            &creds.off_card.as_ref().unwrap().signature_certificate.der,
        )
        .unwrap(),
    )
    .unwrap();
    let out = openssl(
        &[
            "verify",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "issuing.pem",
            &auth,
            &sign,
        ],
        dir,
    );
    assert!(out.status.success(), "{}", text(&out));
    let sod = format!("{tag}-sod.der");
    std::fs::write(dir.join(&sod), unwrap_ef_sod(&creds.ef_sod).unwrap()).unwrap();
    let out = openssl(
        &[
            "cms",
            "-verify",
            "-inform",
            "DER",
            "-in",
            &sod,
            "-binary",
            "-CAfile",
            "root.pem",
            "-purpose",
            "any",
            "-out",
            &format!("{tag}-content.bin"),
        ],
        dir,
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("Verification successful"), "{t}");
}

/// Every text column of every row of the keys tables and the shared ones, as strings.
async fn database_text(services: &Services) -> Vec<String> {
    let mut all = Vec::new();
    for table in [
        "certificates",
        "wrapped_key_custody",
        "ds_usage",
        "crl_state",
        "ca_hierarchy",
        "artifacts",
        "outbox",
        "application_history",
        "parked_jobs",
        "scheduled_runs",
    ] {
        let rows = match sqlx::query(sqlx::AssertSqlSafe(format!("SELECT * FROM {table}")))
            .fetch_all(services.store.pool())
            .await
        {
            Ok(rows) => rows,
            Err(_) => continue, // a table another crate names differently
        };
        for row in rows {
            for (i, _) in row.columns().iter().enumerate() {
                if let Ok(Some(s)) = row.try_get::<Option<String>, _>(i) {
                    all.push(s);
                }
            }
        }
    }
    all
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn keys_stage_end_to_end(mode: Mode) {
    let clock = clock();
    let (services, _guard) = testing::services(mode, Some(clock.clone() as Arc<dyn Clock>)).await;
    let data_dir = tempfile::tempdir().unwrap();
    // Embedded defaults: file keystore with a generated passphrase, auto-init on first use.
    let pki = Arc::new(Pki::open(test_config(), data_dir.path()).unwrap());
    assert!(data_dir.path().join("pki-keystore.passphrase").exists());

    let ids = seed(&services, 3).await;
    let running = start(&services, pki.clone()).await;
    wait_personalized(&services, &ids).await;

    let (version, hierarchy) = pki_store::current_hierarchy(&services.store)
        .await
        .unwrap()
        .expect("hierarchy auto-initialised");
    assert_eq!(version, 1);
    let dir = tempfile::tempdir().unwrap();
    write_chain(dir.path(), &hierarchy);

    let mut packages = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let history: Vec<_> = services
            .store
            .history(id)
            .await
            .unwrap()
            .iter()
            .map(|h| h.to_state)
            .collect();
        assert!(
            history.contains(&ApplicationState::KeysIssued),
            "{history:?}"
        );
        let (key, creds) = credentials(&services, id).await;
        openssl_verifies(dir.path(), &format!("app{i}"), &creds);
        let certs = pki_store::certificates_of(&services.store, id)
            .await
            .unwrap();
        assert_eq!(certs.len(), 2);
        assert!(certs.iter().all(|c| c.status == "valid"));
        let serials: Vec<_> = certs.iter().map(|c| c.serial.clone()).collect();
        assert!(
            serials.contains(
                &creds
                    .off_card
                    .as_ref()
                    .unwrap()
                    .authentication_certificate
                    .serial
            )
        );
        assert!(
            serials.contains(
                &creds
                    .off_card
                    .as_ref()
                    .unwrap()
                    .signature_certificate
                    .serial
            )
        );
        // The package holds the keys wrapped (usable by the encoder site), never clear.
        unwrap(
            pki.transport_key(),
            &creds.off_card.as_ref().unwrap().authentication_key,
            id.as_str(),
            CardKeyRole::Authentication,
        )
        .expect("the encoder site can unwrap");
        packages.push((key, creds));
    }
    assert_eq!(
        pki_store::ds_usage(&services.store, &hierarchy.document_signer.key_label)
            .await
            .unwrap(),
        3
    );

    // Revocation: directly (cancelled) and through the outbox sink (lost).
    assert_eq!(
        revoke_application(&services, None, &ids[0], RevocationCause::Cancelled)
            .await
            .unwrap(),
        2
    );
    let mut tx = services.store.begin().await.unwrap();
    Store::enqueue_outbox(
        &mut tx,
        &uuid::Uuid::now_v7().to_string(),
        cardpipe_common::contract::REVOCATION_TOPIC,
        ids[1].as_str(),
        &format!(r#"{{"application_id":"{}","cause":"lost"}}"#, ids[1]),
        services.clock.now(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let deadline = tokio::time::Instant::now() + StdDuration::from_secs(20);
    loop {
        let certs = pki_store::certificates_of(&services.store, &ids[1])
            .await
            .unwrap();
        if certs.iter().all(|c| c.status == "revoked") {
            assert!(
                certs
                    .iter()
                    .all(|c| c.revocation_cause.as_deref() == Some("lost"))
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "outbox revocation not applied"
        );
        tokio::time::sleep(StdDuration::from_millis(50)).await;
    }
    running.shutdown().await.expect("shutdown");

    // CRLs: numbers strictly increase; openssl sees the revoked card as revoked.
    let first = ops::publish_crl(&services, &pki).await.unwrap();
    let second = ops::publish_crl(&services, &pki).await.unwrap();
    assert!(second.number > first.number);
    assert_eq!(second.revoked, 4);
    let latest = services.objects.get(LATEST_CRL_KEY).await.unwrap().unwrap();
    let numbered = services
        .objects
        .get(&format!("crl/issuing-{}.crl", second.number))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(latest, numbered);
    let parsed = parse_crl(&latest, &hierarchy.issuing).unwrap();
    assert_eq!(parsed.number, Some(second.number));
    std::fs::write(
        dir.path().join("crl.pem"),
        to_pem("X509 CRL", &latest).unwrap(),
    )
    .unwrap();
    let check = |pem: &str| {
        openssl(
            &[
                "verify",
                "-crl_check",
                "-CAfile",
                "root.pem",
                "-untrusted",
                "issuing.pem",
                "-CRLfile",
                "crl.pem",
                pem,
            ],
            dir.path(),
        )
    };
    let revoked = check("app0-auth.pem");
    assert!(!revoked.status.success(), "{}", text(&revoked));
    assert!(
        text(&revoked).contains("certificate revoked"),
        "{}",
        text(&revoked)
    );
    let good = check("app2-sign.pem");
    assert!(good.status.success(), "{}", text(&good));
    // Scheduled publication: not due right after one, due after the interval, once.
    assert!(
        ops::publish_crl_if_due(&services, &pki)
            .await
            .unwrap()
            .is_none()
    );
    clock.advance(Duration::seconds(
        pki.config.crl_interval_seconds as i64 + 1,
    ));
    let scheduled = ops::publish_crl_if_due(&services, &pki).await.unwrap();
    assert_eq!(scheduled.map(|c| c.number), Some(second.number + 1));
    assert!(
        ops::publish_crl_if_due(&services, &pki)
            .await
            .unwrap()
            .is_none()
    );

    // Crypto-shredding: after destruction no object and no row holds a usable key.
    let (_, creds0) = &packages[0];
    let scalars = [
        unwrap(
            pki.transport_key(),
            &creds0.off_card.as_ref().unwrap().authentication_key,
            ids[0].as_str(),
            CardKeyRole::Authentication,
        )
        .unwrap(),
        unwrap(
            pki.transport_key(),
            &creds0.off_card.as_ref().unwrap().signature_key,
            ids[0].as_str(),
            CardKeyRole::Signature,
        )
        .unwrap(),
    ];
    assert!(destroy_wrapped_keys(&services, &ids[0]).await.unwrap() >= 1);
    let prefix = format!("applications/{}/", ids[0]);
    let left = services.objects.list(&prefix).await.unwrap();
    assert!(!left.is_empty(), "photo and fingerprints stay");
    let needles: Vec<String> = scalars
        .iter()
        .flat_map(|s| [hex::encode(&s[..]), hex::encode_upper(&s[..]), b64(&s[..])])
        .chain([
            b64(&creds0
                .off_card
                .as_ref()
                .unwrap()
                .authentication_key
                .ciphertext),
            b64(&creds0.off_card.as_ref().unwrap().signature_key.ciphertext),
        ])
        .collect();
    for key in services.objects.list("").await.unwrap() {
        let bytes = services.objects.get(&key).await.unwrap().unwrap();
        if key.starts_with(&prefix) {
            assert!(!key.contains("credentials-"), "{key} survived shredding");
            if let Ok(pkg) = serde_json::from_slice::<CardCredentials>(&bytes) {
                for (w, role) in [
                    (
                        &pkg.off_card.as_ref().unwrap().authentication_key,
                        CardKeyRole::Authentication,
                    ),
                    (
                        &pkg.off_card.as_ref().unwrap().signature_key,
                        CardKeyRole::Signature,
                    ),
                ] {
                    assert!(unwrap(pki.transport_key(), w, ids[0].as_str(), role).is_err());
                }
            }
        }
        for s in &scalars {
            assert!(
                !bytes.windows(32).any(|w| w == &s[..]),
                "{key} holds a clear card key"
            );
        }
        let as_text = String::from_utf8_lossy(&bytes);
        for n in &needles {
            assert!(
                !as_text.contains(n.as_str()),
                "{key} holds the card's key material"
            );
        }
    }
    for value in database_text(&services).await {
        for n in &needles {
            assert!(
                !value.contains(n.as_str()),
                "a database row holds the card's key material"
            );
        }
    }
    let destroyed: Option<String> =
        sqlx::query("SELECT destroyed_at FROM wrapped_key_custody WHERE application_id = $1")
            .bind(ids[0].as_str())
            .fetch_one(services.store.pool())
            .await
            .unwrap()
            .try_get("destroyed_at")
            .unwrap();
    assert!(destroyed.is_some());
    // The other cards' packages are untouched.
    assert!(
        services
            .objects
            .get(&packages[2].0)
            .await
            .unwrap()
            .is_some()
    );

    // pki status from the database.
    let usage = pki_store::usage_counts(&services.store, &hierarchy.document_signer.key_label)
        .await
        .unwrap();
    assert_eq!(usage.citizen_certificates, 6);
    assert_eq!(usage.revoked_certificates, 4);
    assert_eq!(usage.documents_signed_current_ds, 3);
    assert_eq!(usage.last_crl_number, Some(second.number + 1));
    let report = cardpipe_pki::ca::status(
        pki.keystore().as_ref(),
        &hierarchy,
        usage,
        services.clock.now(),
    )
    .unwrap();
    assert!(report.entries.iter().all(|e| e.key_ok));

    // A second process on the same data_dir reuses the generated passphrase and hierarchy.
    let again = Pki::open(test_config(), data_dir.path()).unwrap();
    let (current, created) = again.init(&services).await.unwrap();
    assert!(!created);
    assert_eq!(current.hierarchy, hierarchy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_stage_issues_revokes_and_shreds_embedded() {
    keys_stage_end_to_end(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_stage_issues_revokes_and_shreds_distributed() {
    keys_stage_end_to_end(Mode::Distributed).await;
}

async fn rotation_once(mode: Mode) {
    let (services, _guard) = testing::services(mode, None).await;
    let data_dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.rotation.max_documents = 5;
    let first = Pki::open(config.clone(), data_dir.path()).unwrap();
    let keystore = first.keystore().clone();
    let (current, _) = first.init(&services).await.unwrap();
    let old_label = current.hierarchy.document_signer.key_label.clone();
    let mut tx = services.store.begin().await.unwrap();
    for _ in 0..5 {
        pki_store::count_ds_usage(&mut tx, &old_label, services.clock.now())
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();

    // Four replicas see the budget used up at once.
    let rotators: Vec<Arc<Pki>> = (0..4)
        .map(|_| {
            Arc::new(Pki::with_keystore(
                config.clone(),
                keystore.clone(),
                TransportKey::generate("site").unwrap(),
            ))
        })
        .collect();
    let mut handles = Vec::new();
    for pki in &rotators {
        let pki = pki.clone();
        let services = services.clone();
        handles.push(tokio::spawn(async move {
            ops::rotate_document_signer(&services, &pki, false)
                .await
                .unwrap()
        }));
    }
    let mut outcomes = Vec::new();
    for h in handles {
        outcomes.push(h.await.unwrap());
    }
    let rotated = outcomes
        .iter()
        .filter(|o| matches!(o, RotationOutcome::Rotated { .. }))
        .count();
    assert_eq!(rotated, 1, "{outcomes:?}");
    assert_eq!(
        ops::rotate_document_signer(&services, &rotators[0], false)
            .await
            .unwrap(),
        RotationOutcome::NotDue
    );
    let versions = pki_store::hierarchy_versions(&services.store)
        .await
        .unwrap();
    assert_eq!(versions.len(), 2, "{versions:?}");
    // 3 CA keys + exactly one new Document Signer.
    assert_eq!(keystore.list().unwrap().len(), 4);
    let (_, h2) = pki_store::current_hierarchy(&services.store)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(h2.document_signer.key_label, old_label);
    assert_eq!(h2.retired_document_signers.len(), 1);
    // The version row is the last line of defence: a stale writer is refused.
    assert!(
        !pki_store::insert_hierarchy(&services.store, 2, &h2, "stale", services.clock.now())
            .await
            .unwrap()
    );
    // Every replica's stage now signs with the new DS.
    for pki in &rotators {
        let c = pki.current(&services).await.unwrap();
        assert_eq!(
            c.hierarchy.document_signer.key_label,
            h2.document_signer.key_label
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_signer_rotates_exactly_once_embedded() {
    rotation_once(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_signer_rotates_exactly_once_distributed() {
    rotation_once(Mode::Distributed).await;
}

#[tokio::test]
async fn revocation_sink_rejects_garbage_and_is_idempotent() {
    let (services, _guard) = testing::services(Mode::Embedded, None).await;
    let sink = RevocationSink::new(services.clone());
    let row = |payload: &str| OutboxRow {
        seq: 1,
        id: "x".into(),
        topic: cardpipe_common::contract::REVOCATION_TOPIC.into(),
        subject: "s".into(),
        payload: payload.into(),
        attempts: 0,
        created_at: String::new(),
    };
    assert!(sink.deliver(&row("not json")).await.is_err());
    // No certificates for an unknown application: nothing to do, not an error.
    sink.deliver(&row(r#"{"application_id":"nope","cause":"cancelled"}"#))
        .await
        .unwrap();
}

#[test]
fn pipeline_toml_documents_the_pki_section_with_the_defaults() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../pipeline.toml");
    let loaded = cardpipe_common::config::LoadedConfig::load(Some(&path)).unwrap();
    let config = PkiConfig::from_loaded(&loaded).unwrap();
    let default = PkiConfig::default();
    assert_eq!(config.ca, default.ca);
    assert_eq!(config.citizen, default.citizen);
    assert_eq!(config.rotation, default.rotation);
    assert_eq!(config.keystore, default.keystore);
    assert_eq!(config.keystore_path, default.keystore_path);
    assert_eq!(config.kdf_log_n, default.kdf_log_n);
    assert_eq!(config.crl_interval_seconds, default.crl_interval_seconds);
    assert_eq!(config.crl_validity_hours, default.crl_validity_hours);
    assert_eq!(config.transport_key_id, default.transport_key_id);
    assert!(config.auto_init);
}

// ---- SoftHSM2 holds the CA keys in a distributed run (child-process pattern) ----

const TOKEN: &str = "cardpipe-keys-it";
const USER_PIN: &str = "4321";

fn in_softhsm(test_name: &str, body: impl FnOnce()) {
    cardpipe_pki::keystore::softhsm::run_in_sandbox(test_name, TOKEN, USER_PIN, |_| body());
}

#[test]
fn softhsm_holds_the_ca_keys_in_a_distributed_pipeline() {
    in_softhsm(
        "softhsm_holds_the_ca_keys_in_a_distributed_pipeline",
        || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let clock = clock();
                let (services, _guard) =
                    testing::services(Mode::Distributed, Some(clock.clone() as Arc<dyn Clock>))
                        .await;
                let keystore = Arc::new(
                    Pkcs11KeyStore::open(&Pkcs11Config {
                        module: SOFTHSM2_MODULE.into(),
                        token_label: TOKEN.into(),
                        pin: secrecy::SecretString::from(USER_PIN),
                    })
                    .unwrap(),
                );
                let pki = Arc::new(Pki::with_keystore(
                    test_config(),
                    keystore.clone(),
                    TransportKey::generate("site-hsm").unwrap(),
                ));
                let ids = seed(&services, 2).await;
                let running = start(&services, pki.clone()).await;
                wait_personalized(&services, &ids).await;
                running.shutdown().await.expect("shutdown");

                let (_, hierarchy) = pki_store::current_hierarchy(&services.store)
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(hierarchy.backend, Backend::Pkcs11);
                for ca in [
                    &hierarchy.root,
                    &hierarchy.issuing,
                    &hierarchy.document_signer,
                ] {
                    assert_eq!(keystore.protection(&ca.key_label).unwrap(), (true, false));
                    assert!(!keystore.private_value_readable(&ca.key_label).unwrap());
                }
                assert!(keystore.list().unwrap().iter().all(|k| !k.extractable));
                let dir = tempfile::tempdir().unwrap();
                write_chain(dir.path(), &hierarchy);
                for (i, id) in ids.iter().enumerate() {
                    let (_, creds) = credentials(&services, id).await;
                    openssl_verifies(dir.path(), &format!("hsm{i}"), &creds);
                }
                revoke_application(&services, None, &ids[0], RevocationCause::Voided)
                    .await
                    .unwrap();
                let crl = ops::publish_crl(&services, &pki).await.unwrap();
                let der = services.objects.get(LATEST_CRL_KEY).await.unwrap().unwrap();
                assert_eq!(
                    parse_crl(&der, &hierarchy.issuing).unwrap().number,
                    Some(crl.number)
                );
                assert_eq!(crl.revoked, 2);
            });
        },
    );
}
