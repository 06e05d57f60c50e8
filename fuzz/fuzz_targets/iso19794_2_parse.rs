//! ISO/IEC 19794-2 finger minutiae records (enrolment templates, untrusted).
//!
//! Any byte string: the parser must not panic. Whatever it accepts is consistent (minutiae
//! inside their view's image, qualities 0–100); a 2005 record re-encodes to exactly the
//! bytes read; a 2011 record re-encodes as 2005 to the same views unless the 2005 format
//! cannot hold it (more than 255 views, 2011-only codes, per-view geometry), which is a typed
//! `Unencodable` error, never a panic (the old target took that refusal for a crash). The
//! placement rule intake and dedup share and the matcher accept every parsed record.
#![no_main]

use cardpipe_biometrics::iso19794_2::{FingerprintRecord, IsoError, IsoVersion, parse};
use cardpipe_biometrics::matcher::{Finger, FingerTemplate, compare, place_finger};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let placed: Vec<_> = (1..=10).map(|pos| place_finger(pos, data)).collect();
    let Ok(record) = parse(data) else {
        assert!(
            placed.iter().all(Result::is_err),
            "placed an unparsable record"
        );
        return;
    };
    assert!(!record.views.is_empty());
    for v in &record.views {
        let g = record.view_geometry(v);
        assert!(v.quality <= 100);
        for m in &v.minutiae {
            assert!(m.x < g.width && m.y < g.height && m.quality <= 100);
        }
    }
    match record.to_bytes() {
        Ok(bytes) => {
            let again = parse(&bytes).expect("the 2005 encoding of an accepted record parses");
            let expected = FingerprintRecord {
                version: IsoVersion::V2005,
                ..record.clone()
            };
            assert_eq!(again, expected);
            if record.version == IsoVersion::V2005 {
                assert_eq!(bytes, data, "a 2005 record re-encodes to its own bytes");
            }
        }
        Err(IsoError::Unencodable { .. }) => {
            assert_eq!(
                record.version,
                IsoVersion::V2011,
                "a 2005 record is encodable"
            );
        }
        Err(e) => panic!("to_bytes failed with a parse error: {e}"),
    }
    // The matcher on a few views (it is the expensive part).
    for view in record.views.iter().take(3) {
        let t = FingerTemplate::new(&Finger::from_view(&record, view));
        let s = compare(&t, &t);
        assert!(s.is_finite() && s >= 0.0, "score {s}");
    }
});
