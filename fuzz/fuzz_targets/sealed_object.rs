//! Sealed objects (`envelope::Sealer`): photos, fingerprint sets and personal records read
//! back from the object store and the database, untrusted; and the decoders applied to what
//! they open to (`records`: the applicant record and the fingerprint list, JSON).
//!
//! Byte 0 picks the check. Open: any blob; no panic, under the right and a wrong purpose.
//! Decode: any bytes as the opened record or fingerprint list; no panic; what decodes
//! survives the JSON round trip. Round trip: data sealed for a purpose (both from the input)
//! opens to itself, and is refused under another purpose, under another master key, or with
//! any one bit flipped.
#![no_main]

use std::sync::OnceLock;

use cardpipe_common::domain::applicant::{ApplicantRecord, FingerprintEntry};
use cardpipe_common::envelope::Sealer;
use libfuzzer_sys::fuzz_target;
use secrecy::SecretString;

fn sealer() -> &'static Sealer {
    static S: OnceLock<Sealer> = OnceLock::new();
    S.get_or_init(|| Sealer::new("k1", &SecretString::from("11".repeat(32))).expect("sealer"))
}

fn other_key() -> &'static Sealer {
    static S: OnceLock<Sealer> = OnceLock::new();
    S.get_or_init(|| Sealer::new("k1", &SecretString::from("22".repeat(32))).expect("sealer"))
}

fn open(blob: &[u8]) {
    let _ = sealer().open("photo:APP-1", blob);
    let _ = sealer().open("", blob);
}

fn decode(data: &[u8]) {
    if let Ok(r) = serde_json::from_slice::<ApplicantRecord>(data) {
        let back: ApplicantRecord =
            serde_json::from_slice(&serde_json::to_vec(&r).expect("json")).expect("parses");
        assert!(back == r);
    }
    if let Ok(f) = serde_json::from_slice::<Vec<FingerprintEntry>>(data) {
        let back: Vec<FingerprintEntry> =
            serde_json::from_slice(&serde_json::to_vec(&f).expect("json")).expect("parses");
        assert!(back == f);
    }
}

fn round_trip(data: &[u8]) {
    let [split, flip_hi, flip_lo, rest @ ..] = data else {
        return;
    };
    let (purpose, plain) = rest.split_at(usize::from(*split).min(rest.len()));
    let purpose = String::from_utf8_lossy(purpose);
    let blob = sealer().seal(&purpose, plain);
    let opened = sealer().open(&purpose, &blob).expect("opens");
    assert!(opened.as_slice() == plain, "opened to other data");
    assert!(sealer().open(&format!("{purpose}x"), &blob).is_err());
    assert!(other_key().open(&purpose, &blob).is_err());
    let bit = usize::from(u16::from_be_bytes([*flip_hi, *flip_lo])) % (blob.len() * 8);
    let mut bad = blob.clone();
    bad[bit / 8] ^= 1 << (bit % 8);
    assert!(
        sealer().open(&purpose, &bad).is_err(),
        "a tampered blob opened"
    );
    // Truncated by one byte.
    assert!(sealer().open(&purpose, &blob[..blob.len() - 1]).is_err());
}

fuzz_target!(|data: &[u8]| {
    let [which, rest @ ..] = data else { return };
    match which % 3 {
        0 => open(rest),
        1 => decode(rest),
        _ => round_trip(rest),
    }
});
