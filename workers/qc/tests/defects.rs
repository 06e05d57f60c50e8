//! QC catches each planted defect with its own reason code, and passes a good card: real
//! credentials (cardpipe-pki), a real chip (the card OS) personalized over SCP03, defects
//! planted the way an unnoticed encoder or EEPROM fault would leave them.

use cardpipe_card::card_os::profile::*;
use cardpipe_qc::bench::{Fixture, Planted};
use cardpipe_qc::check::Reason;

fn card_with(
    fx: &Fixture,
    planted: Option<Planted>,
    n: u32,
) -> (cardpipe_qc::check::Inspection, String) {
    let creds = fx.credentials(&format!("APP-{n}"), 100 + n).unwrap();
    let mut card = fx.personalize(&creds).unwrap();
    let mut recorded = card.serial().to_hex();
    if let Some(p) = planted {
        match p.defect(|| fx.rogue_sod(&creds)) {
            Some(d) => card.inject_defect(&d),
            None => recorded = "47500E1D00000000FFFF".into(),
        }
    }
    (fx.inspect(card, &creds, &recorded), recorded)
}

#[test]
fn a_good_card_passes_every_check() {
    let fx = Fixture::new().unwrap();
    let (inspection, recorded) = card_with(&fx, None, 1);
    assert_eq!(inspection.verdict(), None, "{inspection:#?}");
    assert_eq!(inspection.chip_serial.as_deref(), Some(recorded.as_str()));
    let names: Vec<&str> = inspection.checks.iter().map(|c| c.name.as_str()).collect();
    for expected in [
        "chip_serial",
        "files_present",
        "locked",
        "pins_transport",
        "dg3_readable",
        "dg_hashes",
        "sod_signature",
        "ef_com",
        "certificate_chains",
        "auth_key_on_chip",
        "sign_key_on_chip",
    ] {
        assert!(names.contains(&expected), "{expected} not run: {names:?}");
    }
    assert!(inspection.checks.iter().all(|c| c.passed));
}

#[test]
fn each_planted_defect_is_caught_with_its_reason() {
    let fx = Fixture::new().unwrap();
    for (i, planted) in Planted::ALL.into_iter().enumerate() {
        let (inspection, _) = card_with(&fx, Some(planted), 10 + i as u32);
        assert_eq!(
            inspection.verdict(),
            Some(planted.expected()),
            "{planted:?}: {:#?}",
            inspection.checks
        );
        let failed = inspection.first_failure().unwrap();
        assert!(
            !failed.detail.is_empty(),
            "{planted:?}: a failure says what was found"
        );
    }
}

#[test]
fn a_signature_key_not_on_chip_and_pins_out_of_transport_state_are_caught() {
    let fx = Fixture::new().unwrap();
    // Key 02 replaced: INTERNAL AUTHENTICATE (key 01) still verifies, the PSO must not.
    let creds = fx.credentials("APP-SIGN", 7).unwrap();
    let mut card = fx.personalize(&creds).unwrap();
    let chip = card.serial().to_hex();
    card.inject_defect(&cardpipe_card::card_os::Defect::ReplaceKey { key_ref: KEY_SIGN });
    let inspection = fx.inspect(card, &creds, &chip);
    assert_eq!(inspection.verdict(), Some(Reason::KeyNotOnChip));
    assert_eq!(inspection.first_failure().unwrap().name, "sign_key_on_chip");

    // A card personalized with other PINs than the site's transport PINs.
    let mut image = fx.image(&creds).unwrap();
    image.id_pin = zeroize::Zeroizing::new(b"999999".to_vec());
    let mut enc = cardpipe_card::reader::InProcessEncoder::new(
        "enc",
        std::sync::Arc::new(cardpipe_card::reader::BlankStock::healthy(
            cardpipe_card::scp03::MasterKeys::test_keys(),
            9,
        )),
    );
    use cardpipe_card::reader::Encoder;
    enc.insert().unwrap();
    cardpipe_card::script::personalize(
        &mut enc,
        &image,
        &fx.master,
        &cardpipe_card::script::ScriptOptions::extended(),
    )
    .unwrap();
    enc.eject().unwrap();
    let card = enc.take_ejected().unwrap();
    let chip = card.serial().to_hex();
    let inspection = fx.inspect(card, &creds, &chip);
    assert_eq!(
        inspection.verdict(),
        Some(Reason::PinsNotInTransportState),
        "{inspection:#?}"
    );
}

#[test]
fn a_certificate_of_another_card_is_refused() {
    let fx = Fixture::new().unwrap();
    let creds = fx.credentials("APP-A", 21).unwrap();
    let other = fx.credentials("APP-B", 22).unwrap();
    let mut card = fx.personalize(&creds).unwrap();
    let chip = card.serial().to_hex();
    // C001 holds another citizen's (validly issued) certificate.
    card.inject_defect(&cardpipe_card::card_os::Defect::ReplaceFile {
        app: App::Eid,
        fid: EF_CERT_AUTH,
        data: other
            .off_card
            .as_ref()
            .unwrap()
            .authentication_certificate
            .der
            .clone(),
    });
    let inspection = fx.inspect(card, &creds, &chip);
    assert_eq!(
        inspection.verdict(),
        Some(Reason::CertificateChainInvalid),
        "{inspection:#?}"
    );
}
