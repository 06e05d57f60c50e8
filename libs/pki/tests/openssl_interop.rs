//! Interoperability with a tool we did not write: the `openssl` command line verifies our
//! certificate chains, EF.SOD (as CMS) and CRLs. Fails loudly if openssl is missing.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use cardpipe_common::contract::RevocationCause;
use cardpipe_pki::ca::{CaConfig, CaHierarchy, init};
use cardpipe_pki::citizen::CitizenProfiles;
use cardpipe_pki::crl::{CrlRequest, RevokedCertificate, generate_crl};
use cardpipe_pki::custody::{CardCredentials, TransportKey};
use cardpipe_pki::issue::CardIssuer;
use cardpipe_pki::keystore::{FileKeyStore, KdfParams};
use cardpipe_pki::lds::sample_input;
use cardpipe_pki::pkix::to_pem;
use cardpipe_pki::sod::{unwrap_ef_sod, verify_sod};
use secrecy::SecretString;
use time::{Duration, OffsetDateTime};

fn openssl(args: &[&str], dir: &Path) -> Output {
    match Command::new("openssl").args(args).current_dir(dir).output() {
        Ok(out) => out,
        Err(e) => panic!(
            "the `openssl` command-line tool is required for these tests (apt-get install openssl): {e}"
        ),
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

struct Fixture {
    dir: tempfile::TempDir,
    store: Arc<FileKeyStore>,
    hierarchy: CaHierarchy,
    issuer: CardIssuer,
    now: OffsetDateTime,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        FileKeyStore::create(
            dir.path().join("ca.keystore"),
            &SecretString::from("pw"),
            KdfParams::for_tests(),
        )
        .unwrap(),
    );
    // A minute in the past so openssl sees every certificate and CRL as already valid.
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap() - Duration::minutes(1);
    let hierarchy = init(store.as_ref(), &CaConfig::default(), now).unwrap();
    let issuer = CardIssuer::new(store.clone(), &hierarchy, &CitizenProfiles::default()).unwrap();
    std::fs::write(dir.path().join("root.pem"), hierarchy.root.pem().unwrap()).unwrap();
    std::fs::write(
        dir.path().join("issuing.pem"),
        hierarchy.issuing.pem().unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("ds.pem"),
        hierarchy.document_signer.pem().unwrap(),
    )
    .unwrap();
    Fixture {
        dir,
        store,
        hierarchy,
        issuer,
        now,
    }
}

fn issue(f: &Fixture, card_ref: &str, seed: u32) -> CardCredentials {
    let site = TransportKey::generate("site-01").unwrap();
    f.issuer
        .issue(card_ref, &sample_input(seed), &site, f.now)
        .unwrap()
}

fn write_cert(f: &Fixture, name: &str, der: &[u8]) {
    std::fs::write(f.dir.path().join(name), to_pem("CERTIFICATE", der).unwrap()).unwrap();
}

#[test]
fn openssl_verifies_every_citizen_certificate_against_the_chain() {
    let f = fixture();
    let creds = issue(&f, "APP-1", 11);
    write_cert(
        &f,
        "auth.pem",
        &creds
            .off_card
            .as_ref()
            .unwrap()
            .authentication_certificate
            .der,
    );
    write_cert(
        &f,
        "sign.pem",
        &creds.off_card.as_ref().unwrap().signature_certificate.der,
    );

    let out = openssl(
        &[
            "verify",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "issuing.pem",
            "auth.pem",
            "sign.pem",
        ],
        f.dir.path(),
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("auth.pem: OK") && t.contains("sign.pem: OK"),
        "{t}"
    );

    // The authentication certificate is fit for TLS client authentication (KU + EKU checked).
    let out = openssl(
        &[
            "verify",
            "-purpose",
            "sslclient",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "issuing.pem",
            "auth.pem",
        ],
        f.dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out));
    // The Document Signer chains to the root too.
    let out = openssl(&["verify", "-CAfile", "root.pem", "ds.pem"], f.dir.path());
    assert!(out.status.success(), "{}", text(&out));
    // Without the issuing CA there is no chain: the check is real.
    let out = openssl(&["verify", "-CAfile", "root.pem", "auth.pem"], f.dir.path());
    assert!(!out.status.success(), "{}", text(&out));

    // openssl reads the national code and the Persian names back out of the subject.
    let out = openssl(
        &[
            "x509",
            "-in",
            "sign.pem",
            "-noout",
            "-subject",
            "-nameopt",
            "oneline,-esc_msb,utf8",
        ],
        f.dir.path(),
    );
    let subject = text(&out);
    let chip = sample_input(11);
    assert!(subject.contains(&chip.personal.national_code), "{subject}");
    assert!(
        subject.contains("زهرا") && subject.contains("احمدی"),
        "{subject}"
    );
    let out = openssl(
        &["x509", "-in", "sign.pem", "-noout", "-text"],
        f.dir.path(),
    );
    let dump = text(&out);
    assert!(dump.contains("Non Repudiation"), "{dump}");
    assert!(dump.contains("E-mail Protection"), "{dump}");
    assert!(
        dump.contains("URI:http://pki.cardpipe.invalid/crl/issuing.crl"),
        "{dump}"
    );
    assert!(dump.contains("Policy: 1.3.6.1.4.1.32473.1.1"), "{dump}");
}

#[test]
fn openssl_cms_verifies_ef_sod_and_returns_the_lds_security_object() {
    let f = fixture();
    let creds = issue(&f, "APP-2", 22);
    let ours = verify_sod(
        &creds.ef_sod,
        &creds.lds().data_groups(),
        Some(&f.hierarchy.root.certificate),
    )
    .unwrap();
    std::fs::write(
        f.dir.path().join("sod.der"),
        unwrap_ef_sod(&creds.ef_sod).unwrap(),
    )
    .unwrap();

    let out = openssl(
        &[
            "cms",
            "-verify",
            "-inform",
            "DER",
            "-in",
            "sod.der",
            "-binary",
            "-CAfile",
            "root.pem",
            "-purpose",
            "any",
            "-out",
            "content.bin",
        ],
        f.dir.path(),
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("Verification successful"), "{t}");
    let content = std::fs::read(f.dir.path().join("content.bin")).unwrap();
    assert_eq!(content, ours.lds_security_object);

    // openssl also shows the eContentType and the DS as signer.
    let out = openssl(
        &[
            "cms", "-cmsout", "-print", "-inform", "DER", "-in", "sod.der",
        ],
        f.dir.path(),
    );
    let dump = text(&out);
    assert!(dump.contains("2.23.136.1.1.1"), "{dump}");

    // A tampered signature is rejected by openssl as well.
    let mut der = unwrap_ef_sod(&creds.ef_sod).unwrap().to_vec();
    let n = der.len();
    der[n - 5] ^= 0x01;
    std::fs::write(f.dir.path().join("bad.der"), &der).unwrap();
    let out = openssl(
        &[
            "cms", "-verify", "-inform", "DER", "-in", "bad.der", "-binary", "-CAfile", "root.pem",
            "-purpose", "any", "-out", "bad.bin",
        ],
        f.dir.path(),
    );
    assert!(!out.status.success(), "{}", text(&out));
}

#[test]
fn openssl_shows_a_revoked_certificate_as_revoked_and_a_good_one_as_ok() {
    let f = fixture();
    let lost = issue(&f, "APP-3", 33);
    let good = issue(&f, "APP-4", 44);
    write_cert(
        &f,
        "lost.pem",
        &lost
            .off_card
            .as_ref()
            .unwrap()
            .authentication_certificate
            .der,
    );
    write_cert(
        &f,
        "good.pem",
        &good
            .off_card
            .as_ref()
            .unwrap()
            .authentication_certificate
            .der,
    );
    let revoked = vec![
        RevokedCertificate {
            serial: lost
                .off_card
                .as_ref()
                .unwrap()
                .authentication_certificate
                .serial
                .clone(),
            revoked_at: f.now,
            cause: RevocationCause::Lost,
        },
        RevokedCertificate {
            serial: lost
                .off_card
                .as_ref()
                .unwrap()
                .signature_certificate
                .serial
                .clone(),
            revoked_at: f.now,
            cause: RevocationCause::Lost,
        },
    ];
    let crl = generate_crl(
        f.store.as_ref(),
        &f.hierarchy.issuing,
        &revoked,
        CrlRequest {
            number: 7,
            previous_number: Some(6),
            this_update: f.now,
            next_update: f.now + Duration::days(1),
        },
    )
    .unwrap();
    std::fs::write(f.dir.path().join("crl.pem"), crl.pem().unwrap()).unwrap();

    let args = |cert: &'static str| {
        [
            "verify",
            "-crl_check",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "issuing.pem",
            "-CRLfile",
            "crl.pem",
            cert,
        ]
    };
    let out = openssl(&args("lost.pem"), f.dir.path());
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("certificate revoked"), "{t}");
    let out = openssl(&args("good.pem"), f.dir.path());
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("good.pem: OK"), "{t}");

    let out = openssl(&["crl", "-in", "crl.pem", "-noout", "-text"], f.dir.path());
    let dump = text(&out);
    assert!(dump.contains("Key Compromise"), "{dump}");
    assert!(
        dump.contains("X509v3 CRL Number") && dump.contains(" 7"),
        "{dump}"
    );
    assert!(
        dump.contains(
            &lost
                .off_card
                .as_ref()
                .unwrap()
                .authentication_certificate
                .serial
        ),
        "{dump}"
    );
}
