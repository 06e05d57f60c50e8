//! BER-TLV and the LDS decoders (what QC and the verifier read back from a chip, untrusted).
//!
//! Byte 0 picks the decoder: TLV (`take`, `children`), EF.COM, DG1, DG2, DG3, DG11, or a
//! whole LDS (the rest split at four 16-bit lengths). Any input: no panic. Round trips: a
//! TLV re-encoded with `put` reads back to the same tag and value; a data group the decoder
//! accepts and the encoder can write (the encoders are stricter, e.g. no empty names)
//! decodes back to the same content.
#![no_main]

use cardpipe_pki::lds::{self, EncodedLds};
use cardpipe_pki::tlv::{children, put, take};
use libfuzzer_sys::fuzz_target;

fn tlv(data: &[u8]) {
    if let Ok((t, rest)) = take(data) {
        assert!(
            t.value.len() + rest.len() < data.len(),
            "a TLV consumes its header"
        );
        let mut out = Vec::new();
        put(&mut out, t.tag, t.value);
        let (again, tail) = take(&out).expect("re-encoded TLV parses");
        assert!(tail.is_empty());
        assert_eq!((again.tag, again.value), (t.tag, t.value));
    }
    if let Ok(kids) = children(data) {
        let mut out = Vec::new();
        for k in &kids {
            put(&mut out, k.tag, k.value);
        }
        let again = children(&out).expect("re-encoded TLVs parse");
        assert_eq!(again.len(), kids.len());
        for (a, b) in again.iter().zip(&kids) {
            assert_eq!((a.tag, a.value), (b.tag, b.value));
        }
    }
}

fn ef_com(data: &[u8]) {
    if let Ok(com) = lds::decode_ef_com(data) {
        let again = lds::decode_ef_com(&lds::encode_ef_com(&com.data_groups)).expect("EF.COM");
        assert_eq!(again.data_groups, com.data_groups);
    }
}

fn dg1(data: &[u8]) {
    if let Ok(p) = lds::decode_dg1(data)
        && let Ok(bytes) = lds::encode_dg1(&p)
    {
        assert!(lds::decode_dg1(&bytes).expect("DG1") == p);
    }
}

fn dg2(data: &[u8]) {
    if let Ok(face) = lds::decode_dg2(data)
        && let Ok(bytes) = lds::encode_dg2(&face.jpeg)
    {
        assert_eq!(lds::decode_dg2(&bytes).expect("DG2").jpeg, face.jpeg);
    }
}

fn dg3(data: &[u8]) {
    if let Ok(t) = lds::decode_dg3(data)
        && let Ok(bytes) = lds::encode_dg3(&t)
    {
        assert!(lds::decode_dg3(&bytes).expect("DG3") == t);
    }
}

fn dg11(data: &[u8]) {
    if let Ok(a) = lds::decode_dg11(data)
        && let Ok(bytes) = lds::encode_dg11(&a)
    {
        assert!(lds::decode_dg11(&bytes).expect("DG11") == a);
    }
}

/// Splits `data` into four length-prefixed (16-bit) parts and the remainder.
fn whole(mut data: &[u8]) {
    let mut parts = Vec::new();
    for _ in 0..4 {
        let [a, b, rest @ ..] = data else { return };
        let n = usize::from(u16::from_be_bytes([*a, *b])).min(rest.len());
        parts.push(rest[..n].to_vec());
        data = &rest[n..];
    }
    let [ef_com, dg1, dg2, dg3]: [Vec<u8>; 4] = parts.try_into().expect("four parts");
    let set = EncodedLds {
        ef_com,
        dg1,
        dg2,
        dg3,
        dg11: data.to_vec(),
    };
    if let Ok(input) = lds::decode(&set)
        && let Ok(encoded) = lds::encode(&input)
    {
        assert!(lds::decode(&encoded).expect("LDS") == input);
    }
}

fuzz_target!(|data: &[u8]| {
    let [which, rest @ ..] = data else { return };
    match which % 7 {
        0 => tlv(rest),
        1 => ef_com(rest),
        2 => dg1(rest),
        3 => dg2(rest),
        4 => dg3(rest),
        5 => dg11(rest),
        _ => whole(rest),
    }
});
