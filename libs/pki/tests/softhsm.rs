//! CA keys in a real PKCS#11 token: SoftHSM2 with a private token directory.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` when the module initialises, and this workspace forbids
//! the `unsafe` needed to set environment variables at run time, so each test creates its
//! sandbox token and then re-runs itself (`--exact <name>`) as a child process with the
//! variable set. The child writes a marker file when its body completed, so a filter that
//! matched nothing cannot pass silently. Without SoftHSM2 the tests fail with a message
//! naming the package.

use std::path::Path;
use std::sync::Arc;

use cardpipe_pki::KeysError;
use cardpipe_pki::ca::{CaConfig, UsageCounts, init, status};
use cardpipe_pki::citizen::CitizenProfiles;
use cardpipe_pki::custody::TransportKey;
use cardpipe_pki::issue::CardIssuer;
use cardpipe_pki::keystore::softhsm::SOFTHSM2_MODULE;
use cardpipe_pki::keystore::{Backend, CaKeyStore, Pkcs11Config, Pkcs11KeyStore};
use cardpipe_pki::lds::sample_input;
use cardpipe_pki::pkix::{sha256, verify_certificate_signature};
use cardpipe_pki::sod::verify_sod;
use secrecy::SecretString;

const TOKEN: &str = "cardpipe-test";
const USER_PIN: &str = "1234";

fn config() -> Pkcs11Config {
    Pkcs11Config {
        module: SOFTHSM2_MODULE.into(),
        token_label: TOKEN.into(),
        pin: SecretString::from(USER_PIN),
    }
}

/// Runs `body` in a child process that sees a fresh SoftHSM2 token.
fn in_softhsm(test_name: &str, body: impl FnOnce(&Path)) {
    cardpipe_pki::keystore::softhsm::run_in_sandbox(test_name, TOKEN, USER_PIN, body);
}

#[test]
fn hsm_generates_non_extractable_ca_keys_and_issues_cards() {
    in_softhsm(
        "hsm_generates_non_extractable_ca_keys_and_issues_cards",
        |_| {
            let store = Arc::new(Pkcs11KeyStore::open(&config()).unwrap());
            let now = time::macros::datetime!(2025-03-01 08:00:00 UTC);
            let h = init(store.as_ref(), &CaConfig::default(), now).unwrap();
            assert_eq!(h.backend, Backend::Pkcs11);

            // Every CA key was generated in the token, sensitive and non-extractable.
            for ca in [&h.root, &h.issuing, &h.document_signer] {
                assert_eq!(
                    store.protection(&ca.key_label).unwrap(),
                    (true, false),
                    "{}",
                    ca.key_label
                );
                assert!(!store.private_value_readable(&ca.key_label).unwrap());
            }
            let keys = store.list().unwrap();
            assert_eq!(keys.len(), 3);
            assert!(
                keys.iter()
                    .all(|k| !k.extractable && k.backend == Backend::Pkcs11)
            );
            assert!(matches!(
                store.generate(&h.root.key_label),
                Err(KeysError::KeyExists(_))
            ));

            verify_certificate_signature(&h.issuing.certificate, &h.root.certificate).unwrap();
            verify_certificate_signature(&h.document_signer.certificate, &h.root.certificate)
                .unwrap();

            let issuer = CardIssuer::new(store.clone(), &h, &CitizenProfiles::default()).unwrap();
            let site = TransportKey::generate("site-01").unwrap();
            let creds = issuer
                .issue("APP-HSM-1", &sample_input(5), &site, now)
                .unwrap();
            verify_sod(
                &creds.ef_sod,
                &creds.lds().data_groups(),
                Some(&h.root.certificate),
            )
            .unwrap();
            verify_certificate_signature(
                &creds.off_card.as_ref().unwrap().signature_certificate.der,
                &h.issuing.certificate,
            )
            .unwrap();

            let report = status(store.as_ref(), &h, UsageCounts::default(), now).unwrap();
            assert!(report.entries.iter().all(|e| e.key_ok));
            assert!(report.to_string().contains("PKCS#11 token"));

            // Concurrent signing from several threads (the session pool) gives valid signatures.
            let issuing_key = h.issuing.public_key().unwrap();
            std::thread::scope(|scope| {
                for t in 0..4u8 {
                    let store = store.clone();
                    let label = h.issuing.key_label.clone();
                    let key = issuing_key.clone();
                    scope.spawn(move || {
                        for i in 0..25u8 {
                            let digest = sha256(&[t, i]);
                            let sig = store.sign_digest(&label, &digest).unwrap();
                            assert!(key.verify_digest(&digest, &sig).unwrap());
                        }
                    });
                }
            });

            // A second store in the same process (module already initialised) sees the keys.
            drop(issuer);
            let again = Pkcs11KeyStore::open(&config()).unwrap();
            let digest = sha256(b"reopened");
            let sig = again.sign_digest(&h.issuing.key_label, &digest).unwrap();
            assert!(
                h.issuing
                    .public_key()
                    .unwrap()
                    .verify_digest(&digest, &sig)
                    .unwrap()
            );
        },
    );
}

#[test]
fn hsm_rejects_a_wrong_pin_and_an_unknown_token() {
    in_softhsm("hsm_rejects_a_wrong_pin_and_an_unknown_token", |_| {
        let wrong_pin = Pkcs11Config {
            pin: SecretString::from("9999"),
            ..config()
        };
        let err = Pkcs11KeyStore::open(&wrong_pin).unwrap_err();
        assert!(matches!(err, KeysError::Pkcs11 { .. }), "{err}");
        assert!(!err.to_string().contains("9999"));
        let unknown = Pkcs11Config {
            token_label: "no-such-token".into(),
            ..config()
        };
        assert!(matches!(
            Pkcs11KeyStore::open(&unknown),
            Err(KeysError::TokenNotFound(_))
        ));
        assert!(!format!("{:?}", config()).contains(USER_PIN));
    });
}

#[test]
fn hsm_bench_runs() {
    in_softhsm("hsm_bench_runs", |_| {
        let store = Arc::new(Pkcs11KeyStore::open(&config()).unwrap());
        let report = cardpipe_pki::bench::run(store, 10).unwrap();
        assert_eq!(report.backend, Backend::Pkcs11);
        assert_eq!(report.sets, 10);
    });
}
