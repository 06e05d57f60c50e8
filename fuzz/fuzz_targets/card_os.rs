//! The simulated chip's command processing (`card_os::Card::transmit`): the card OS reads
//! command APDUs from whatever reader it sits in, untrusted.
//!
//! Input: byte 0 picks the chip — blank (plain commands), blank with an SCP03 session opened
//! by the host (the commands are wrapped, so the personalization commands behind the secure
//! channel are reached), or personalized and locked — and the rest is a sequence of APDUs,
//! each prefixed by its length (one byte; 255: two more bytes of length follow).
//!
//! Properties: no panic; a powered chip without faults always answers, with at least a
//! status word; a locked chip stays locked, and no command sequence changes its data groups,
//! certificates or private keys.
#![no_main]

use std::sync::{Arc, OnceLock};

use cardpipe_card::apdu::{Command, Response};
use cardpipe_card::card_os::profile::{App, KEY_AUTH, KEY_SIGN};
use cardpipe_card::card_os::{Card, Faults, Lifecycle};
use cardpipe_card::cplc::ChipSerial;
use cardpipe_card::reader::{BlankStock, CardChannel, InProcessEncoder};
use cardpipe_card::scp03::{MasterKeys, SecurityLevel};
use cardpipe_card::script::{self, CardImage, ScriptOptions, SecureChannel};
use libfuzzer_sys::fuzz_target;

fn image() -> &'static CardImage {
    static IMAGE: OnceLock<CardImage> = OnceLock::new();
    IMAGE.get_or_init(|| script::sample_image(600, 1))
}

fn encoder() -> InProcessEncoder {
    let mut enc = InProcessEncoder::new(
        "fuzz",
        Arc::new(BlankStock::healthy(MasterKeys::test_keys(), 9)),
    );
    let card = Card::blank(
        ChipSerial::simulated(9, 1),
        &MasterKeys::test_keys(),
        Faults::none(),
    );
    enc.insert_card(card).expect("a healthy blank answers");
    enc
}

/// Splits the input into APDUs.
fn apdus(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let [n, rest @ ..] = data {
        let (n, rest) = match (*n, rest) {
            (255, [a, b, rest @ ..]) => (usize::from(u16::from_be_bytes([*a, *b])), rest),
            (255, _) => return out,
            (n, rest) => (usize::from(n), rest),
        };
        let n = n.min(rest.len());
        out.push(&rest[..n]);
        data = &rest[n..];
    }
    out
}

/// Everything a locked card must never change: file contents and public keys.
fn snapshot(card: &Card) -> Vec<Option<Vec<u8>>> {
    let mut s: Vec<Option<Vec<u8>>> = [App::Lds, App::Eid]
        .into_iter()
        .flat_map(|app| {
            app.files()
                .iter()
                .map(move |&fid| card.file(app, fid).map(<[u8]>::to_vec))
        })
        .collect();
    s.push(card.public_key(KEY_AUTH));
    s.push(card.public_key(KEY_SIGN));
    s
}

fn card_of(enc: &mut InProcessEncoder) -> &mut Card {
    enc.card_mut()
        .expect("no faults: the card stays in the reader")
}

fuzz_target!(|data: &[u8]| {
    let [mode, rest @ ..] = data else { return };
    let mut enc = encoder();
    match mode % 3 {
        0 => {
            for apdu in apdus(rest) {
                let raw = card_of(&mut enc)
                    .transmit(apdu)
                    .expect("a healthy chip answers");
                assert!(
                    Response::parse(&raw).is_ok(),
                    "answer without a status word"
                );
            }
        }
        1 => {
            let level = [
                SecurityLevel::C_MAC,
                SecurityLevel::C_DEC_C_MAC,
                SecurityLevel::C_MAC_R_MAC,
                SecurityLevel::C_DEC_C_MAC_R_MAC,
            ][usize::from(mode / 3 % 4)];
            let mut sc = SecureChannel::open(&mut enc, &MasterKeys::test_keys(), level)
                .expect("the test keys open a session");
            for apdu in apdus(rest) {
                match Command::parse(apdu) {
                    // Wrapped by the host; a refusal (too long, or R-MAC missing after the
                    // card dropped the session on an error) is a status, not a bug.
                    Ok(cmd) => {
                        let _ = sc.send(&mut enc, &cmd);
                    }
                    Err(_) => {
                        let raw = enc.transmit(apdu).expect("a healthy chip answers");
                        assert!(
                            Response::parse(&raw).is_ok(),
                            "answer without a status word"
                        );
                    }
                }
            }
        }
        _ => {
            script::personalize(
                &mut enc,
                image(),
                &MasterKeys::test_keys(),
                &ScriptOptions::default(),
            )
            .expect("a blank personalizes");
            let card = card_of(&mut enc);
            assert_eq!(card.lifecycle(), Lifecycle::Operational);
            let before = snapshot(card);
            for apdu in apdus(rest) {
                let raw = card.transmit(apdu).expect("a healthy chip answers");
                assert!(
                    Response::parse(&raw).is_ok(),
                    "answer without a status word"
                );
            }
            assert_eq!(
                card.lifecycle(),
                Lifecycle::Operational,
                "a locked card unlocked"
            );
            assert!(
                snapshot(card) == before,
                "a locked card's data or keys changed"
            );
        }
    }
});
