//! End-to-end personalization and read-back with the card OS in process (embedded mode),
//! through the public API only.

use std::sync::Arc;

use cardpipe_card::apdu::{Command, sw};
use cardpipe_card::card_os::Lifecycle;
use cardpipe_card::card_os::profile::*;
use cardpipe_card::cplc::ChipSerial;
use cardpipe_card::reader::{BlankStock, CardChannel, Encoder, InProcessEncoder};
use cardpipe_card::scp03::MasterKeys;
use cardpipe_card::script::{self, PersoError, ScriptOptions, sample_image};
use cardpipe_pki::citizen::CardKeyRole;
use cardpipe_pki::issue::ChipKeyProof;

fn encoder(batch: u16) -> InProcessEncoder {
    InProcessEncoder::new(
        "embedded-01",
        Arc::new(BlankStock::healthy(MasterKeys::test_keys(), batch)),
    )
}

#[test]
fn personalize_and_read_back_40kb_image() {
    for (opts, batch) in [
        (ScriptOptions::default(), 1),
        (ScriptOptions::extended(), 2),
    ] {
        let mut enc = encoder(batch);
        enc.insert().unwrap();
        let image = sample_image(40_000, 3);
        let rec = script::personalize(&mut enc, &image, &MasterKeys::test_keys(), &opts).unwrap();
        assert_eq!(rec.chip_serial, ChipSerial::simulated(batch, 1));
        assert_eq!(rec.reader, "embedded-01");
        assert!(rec.bytes_written > 40_000);
        assert_eq!(
            rec.auth_public_key,
            script::public_key_of(&image.imported.as_ref().unwrap().auth_key).unwrap()
        );
        let card = enc.card().unwrap();
        assert_eq!(card.lifecycle(), Lifecycle::Operational);
        assert_eq!(card.file(App::Lds, EF_DG2).unwrap(), image.dg2.as_slice());
        assert_eq!(
            card.file(App::Eid, EF_CERT_SIGN).unwrap(),
            image.imported.as_ref().unwrap().sign_cert.as_slice()
        );

        let rb = script::read_back(&mut enc).unwrap();
        assert_eq!(rb.chip_serial, rec.chip_serial);
        assert!(
            rb.mismatches(&image).is_empty(),
            "{:?}",
            rb.mismatches(&image)
        );

        let sig = script::internal_authenticate(&mut enc, b"nonce-1234").unwrap();
        assert!(script::verify_internal_authenticate(
            &rec.auth_public_key,
            b"nonce-1234",
            &sig
        ));
        assert!(!script::verify_internal_authenticate(
            &rec.sign_public_key,
            b"nonce-1234",
            &sig
        ));
    }
}

#[test]
fn dg3_is_read_with_the_transport_id_pin() {
    let mut enc = encoder(3);
    enc.insert().unwrap();
    let image = sample_image(2000, 4);
    script::personalize(
        &mut enc,
        &image,
        &MasterKeys::test_keys(),
        &ScriptOptions::default(),
    )
    .unwrap();
    assert!(matches!(
        script::read_file(&mut enc, &LDS_AID, EF_DG3),
        Err(PersoError::Status {
            sw: sw::SECURITY_STATUS,
            ..
        })
    ));
    let verify = Command::new(0x00, 0x20, 0x00, PIN_ID).with_data(image.id_pin.to_vec());
    assert_eq!(enc.send(&verify).unwrap().sw, sw::OK);
    assert_eq!(
        script::read_file(&mut enc, &LDS_AID, EF_DG3).unwrap(),
        image.dg3
    );
}

#[test]
fn a_locked_card_cannot_be_personalized_again() {
    let mut enc = encoder(4);
    enc.insert().unwrap();
    let image = sample_image(1000, 5);
    script::personalize(
        &mut enc,
        &image,
        &MasterKeys::test_keys(),
        &ScriptOptions::default(),
    )
    .unwrap();
    let err = script::personalize(
        &mut enc,
        &image,
        &MasterKeys::test_keys(),
        &ScriptOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            PersoError::Status {
                step: "INITIALIZE UPDATE",
                sw: sw::CONDITIONS_NOT_SATISFIED
            }
        ),
        "{err}"
    );
}

#[test]
fn a_bad_image_is_refused_before_touching_the_blank() {
    let mut enc = encoder(5);
    enc.insert().unwrap();
    let mut image = sample_image(1000, 6);
    let keys = image.imported.as_mut().unwrap();
    keys.auth_cert = keys.sign_cert.clone();
    let err = script::personalize(
        &mut enc,
        &image,
        &MasterKeys::test_keys(),
        &ScriptOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, PersoError::Image(_)), "{err}");
    assert!(!err.spoils_blank());
    assert_eq!(enc.card().unwrap().apdu_count(), 0);

    let mut image = sample_image(1000, 6);
    image.id_pin = zeroize::Zeroizing::new(b"12".to_vec());
    assert!(matches!(image.validate(), Err(PersoError::Image(_))));
    // Errors never carry the PIN or key values.
    let shown = format!("{:?}", image.validate().unwrap_err());
    assert!(
        !shown.contains("12\"") && !shown.contains("[49, 50]"),
        "{shown}"
    );
}

#[test]
fn wrong_master_keys_fail_without_writing() {
    let mut enc = encoder(6);
    enc.insert().unwrap();
    let other = MasterKeys::new(&[9; 16], &[9; 16], &[9; 16]).unwrap();
    let err = script::personalize(
        &mut enc,
        &sample_image(1000, 7),
        &other,
        &ScriptOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, PersoError::Scp03(_)), "{err}");
    let card = enc.card().unwrap();
    assert_eq!(card.lifecycle(), Lifecycle::PrePersonalization);
    assert!(card.file(App::Lds, EF_DG1).unwrap().is_empty());
}

/// A CA stand-in for the script tests: checks each proof of possession the way a CA does
/// and answers certificate-shaped blobs carrying the public keys.
struct TestCa {
    fail: Option<&'static str>,
}

impl script::Certifier for TestCa {
    fn challenge(&self, role: CardKeyRole, public_key: &[u8]) -> Vec<u8> {
        let mut c = vec![role.key_reference()];
        c.extend_from_slice(&public_key[..8]);
        c.extend_from_slice(&rand::random::<[u8; 16]>());
        c
    }

    fn certify(
        &self,
        _chip: ChipSerial,
        proofs: [ChipKeyProof; 2],
    ) -> Result<[Vec<u8>; 2], script::CertifyError> {
        match self.fail {
            Some("ca") => return Err(script::CertifyError::Ca("HSM unreachable".into())),
            Some("wrong key") => return Ok([vec![0x30; 300], vec![0x30; 300]]),
            _ => {}
        }
        let mut out = Vec::new();
        for (p, key_ref) in proofs.iter().zip([KEY_AUTH, KEY_SIGN]) {
            if !script::verify_internal_authenticate(&p.public_key, &p.challenge, &p.signature) {
                return Err(script::CertifyError::Possession(
                    key_ref,
                    "does not verify".into(),
                ));
            }
            let mut cert = vec![0x30, 0x82, 0x01, 0x00, key_ref];
            cert.extend_from_slice(&p.public_key);
            cert.resize(500, 0x5A);
            out.push(cert);
        }
        Ok([out[0].clone(), out[1].clone()])
    }
}

#[test]
fn keys_generated_on_the_chip_are_proven_certified_and_never_leave_it() {
    let mut enc = encoder(7);
    enc.insert().unwrap();
    let image = script::sample_image_without_keys(20_000, 4);
    let rec = script::personalize_generating_keys(
        &mut enc,
        &image,
        &TestCa { fail: None },
        &MasterKeys::test_keys(),
        &ScriptOptions::extended(),
    )
    .unwrap();
    let card = enc.card().unwrap();
    assert_eq!(card.lifecycle(), Lifecycle::Operational);
    assert_eq!(card.public_key(KEY_AUTH), Some(rec.auth_public_key.clone()));
    assert_eq!(card.public_key(KEY_SIGN), Some(rec.sign_public_key.clone()));
    let [c1, c2] = rec.certificates.clone().expect("certificates written");
    assert_eq!(card.file(App::Eid, EF_CERT_AUTH).unwrap(), c1.as_slice());
    assert_eq!(card.file(App::Eid, EF_CERT_SIGN).unwrap(), c2.as_slice());
    assert_eq!(card.file(App::Lds, EF_DG2).unwrap(), image.dg2.as_slice());
    assert!(
        script::read_back(&mut enc)
            .unwrap()
            .mismatches(&image)
            .is_empty()
    );
    // QC's challenge: the chip's key 01 answers under the certified key.
    let challenge = rand::random::<[u8; 32]>();
    let sig = script::internal_authenticate(&mut enc, &challenge).unwrap();
    assert!(script::verify_internal_authenticate(
        &rec.auth_public_key,
        &challenge,
        &sig
    ));
    // The image had no key to import, and off-card personalization refuses it.
    enc.insert().unwrap();
    let err = script::personalize(
        &mut enc,
        &image,
        &MasterKeys::test_keys(),
        &ScriptOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, PersoError::Image(_)), "{err}");
    // An image with keys is refused in on-card mode.
    let err = script::personalize_generating_keys(
        &mut enc,
        &sample_image(1000, 1),
        &TestCa { fail: None },
        &MasterKeys::test_keys(),
        &ScriptOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, PersoError::Image(_)), "{err}");
}

#[test]
fn a_failed_certification_leaves_the_card_unlocked_and_says_whose_fault() {
    for (fail, card_fault) in [("ca", false), ("wrong key", true)] {
        let mut enc = encoder(8);
        enc.insert().unwrap();
        let err = script::personalize_generating_keys(
            &mut enc,
            &script::sample_image_without_keys(2000, 2),
            &TestCa { fail: Some(fail) },
            &MasterKeys::test_keys(),
            &ScriptOptions::default(),
        )
        .unwrap_err();
        assert_eq!(err.spoils_blank(), card_fault, "{fail}: {err}");
        match fail {
            "ca" => assert!(matches!(err, PersoError::Certification(_)), "{err}"),
            _ => assert!(matches!(err, PersoError::Possession(KEY_AUTH, _)), "{err}"),
        }
        let card = enc.card().unwrap();
        assert_eq!(card.lifecycle(), Lifecycle::PrePersonalization, "{fail}");
        assert!(card.file(App::Eid, EF_CERT_AUTH).unwrap().is_empty());
    }
}
