//! Any byte string: the parser must not panic; whatever it accepts must re-encode and parse
//! back to the same minutiae, and must be usable by the matcher.
#![no_main]

use cardpipe_biometrics::iso19794_2::parse;
use cardpipe_biometrics::matcher::{Finger, FingerTemplate, compare};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = parse(data) {
        let bytes = record.to_bytes().expect("an accepted record re-encodes");
        let again = parse(&bytes).expect("a re-encoded record parses");
        assert_eq!(record.views.len(), again.views.len());
        for (a, b) in record.views.iter().zip(&again.views) {
            assert_eq!(a.minutiae, b.minutiae);
        }
        let view = &record.views[0];
        let t = FingerTemplate::new(&Finger::from_view(&record, view));
        let s = compare(&t, &t);
        assert!((0.0..=1.0).contains(&s));
    }
});
