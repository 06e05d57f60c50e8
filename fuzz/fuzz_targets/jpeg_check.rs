//! The intake photo checks (untrusted registry uploads): the structural JPEG check and the
//! chip-capacity check (`lds::check_portrait`, which wraps the photo in DG2).
//!
//! Any byte string: no panic. A photo both accept must encode as DG2 and decode back to the
//! same bytes, with the width and height the JPEG check read.
#![no_main]

use cardpipe_intake::validate::check_jpeg;
use cardpipe_pki::lds::{check_portrait, decode_dg2, encode_dg2};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // No size bounds: the structural verdict alone.
    let Ok((w, h)) = check_jpeg(data, 0, u16::MAX) else {
        return;
    };
    // The bounds are inclusive and apply to both sides.
    let (small, large) = (w.min(h), w.max(h));
    assert_eq!(check_jpeg(data, small, large), Ok((w, h)));
    if let Some(above) = small.checked_add(1) {
        assert!(check_jpeg(data, above, u16::MAX).is_err());
    }
    if let Some(below) = large.checked_sub(1) {
        assert!(check_jpeg(data, 0, below).is_err());
    }
    if check_portrait(data).is_ok() {
        let dg2 = encode_dg2(data).expect("check_portrait accepted it");
        let face = decode_dg2(&dg2).expect("our own DG2 decodes");
        assert_eq!(face.jpeg, data);
        assert_eq!((face.width, face.height), (w, h));
    }
});
