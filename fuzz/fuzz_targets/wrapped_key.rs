//! Wrapped citizen keys (`custody::WrappedKey`): the binary blob and the JSON form inside the
//! personalization package (`CardCredentials`), read back from the object store, untrusted.
//!
//! Byte 0 picks the check. Blob: any bytes; no panic; a blob that parses re-encodes to
//! exactly its bytes, and unwrapping it (right or wrong card/slot) does not panic. JSON: no
//! panic; what parses survives a JSON round trip. Round trip: a scalar wrapped for a card
//! reference and slot (both from the input) unwraps to itself, and is refused for another
//! card reference, the other slot, or with any one bit of nonce or ciphertext flipped.
#![no_main]

use std::sync::OnceLock;

use cardpipe_pki::citizen::CardKeyRole;
use cardpipe_pki::custody::{self, CardCredentials, TransportKey, WrappedKey};
use libfuzzer_sys::fuzz_target;
use zeroize::Zeroizing;

fn transport() -> &'static TransportKey {
    static KEY: OnceLock<TransportKey> = OnceLock::new();
    KEY.get_or_init(|| TransportKey::new("fuzz-tk", Zeroizing::new([7; 32])).expect("key"))
}

const ROLES: [CardKeyRole; 2] = [CardKeyRole::Authentication, CardKeyRole::Signature];

fn blob(data: &[u8]) {
    let Ok(w) = WrappedKey::from_bytes(data) else {
        return;
    };
    assert_eq!(w.to_bytes().expect("a parsed blob re-encodes"), data);
    for role in ROLES {
        let _ = custody::unwrap(transport(), &w, &w.card_ref, role);
    }
}

fn json(data: &[u8]) {
    if let Ok(w) = serde_json::from_slice::<WrappedKey>(data) {
        let back: WrappedKey = serde_json::from_slice(&serde_json::to_vec(&w).expect("json"))
            .expect("our own JSON parses");
        assert!(back == w);
    }
    if let Ok(c) = serde_json::from_slice::<CardCredentials>(data) {
        let back: CardCredentials =
            serde_json::from_slice(&serde_json::to_vec(&c).expect("json")).expect("parses");
        assert!(back == c);
    }
}

fn round_trip(data: &[u8]) {
    let [role, flip_hi, flip_lo, rest @ ..] = data else {
        return;
    };
    if rest.len() < 32 {
        return;
    }
    let (scalar, card_ref) = rest.split_at(32);
    let scalar = Zeroizing::new(<[u8; 32]>::try_from(scalar).expect("32 bytes"));
    let card_ref = String::from_utf8_lossy(card_ref);
    let role = ROLES[usize::from(role & 1)];
    let Ok(w) = custody::wrap(transport(), &card_ref, role, &scalar) else {
        assert!(card_ref.is_empty() || card_ref.len() > usize::from(u16::MAX));
        return;
    };
    let got = custody::unwrap(transport(), &w, &card_ref, role).expect("unwraps");
    assert!(*got == *scalar, "unwrapped another scalar");
    let parsed = WrappedKey::from_bytes(&w.to_bytes().expect("blob")).expect("blob parses");
    assert!(parsed == w);
    let other = ROLES[usize::from(!role_bit(role))];
    assert!(custody::unwrap(transport(), &w, &card_ref, other).is_err());
    assert!(custody::unwrap(transport(), &w, &format!("{card_ref}x"), role).is_err());
    let bit = usize::from(u16::from_be_bytes([*flip_hi, *flip_lo])) % ((12 + 48) * 8);
    let mut bad = w.clone();
    if bit < 96 {
        bad.nonce[bit / 8] ^= 1 << (bit % 8);
    } else {
        bad.ciphertext[(bit - 96) / 8] ^= 1 << (bit % 8);
    }
    assert!(
        custody::unwrap(transport(), &bad, &card_ref, role).is_err(),
        "tampered blob opened"
    );
}

fn role_bit(role: CardKeyRole) -> bool {
    matches!(role, CardKeyRole::Signature)
}

fuzz_target!(|data: &[u8]| {
    let [which, rest @ ..] = data else { return };
    match which % 3 {
        0 => blob(rest),
        1 => json(rest),
        _ => round_trip(rest),
    }
});
