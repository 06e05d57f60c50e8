//! The one rule for enrolment templates (`place_finger`), shared by intake validation and the
//! dedup stage: the contract's position is authoritative, header position 0 takes it, another
//! header position is refused, 2005 and 2011 records, the best-quality view of several, and
//! the stored form of enrolled templates (positioned, and the older position-less rows).

mod common;

use cardpipe_biometrics::iso19794_2::{
    self, FingerView, FingerprintRecord, IsoVersion, Minutia, MinutiaKind,
};
use cardpipe_biometrics::matcher::{
    PlacementError, PositionedTemplate, TenPrint, TenPrintError, place_finger,
};
use cardpipe_dedup::stage::{StoredTemplates, decode_templates, encode_templates};

fn minutiae(n: u16, shift: u16) -> Vec<Minutia> {
    (0..n)
        .map(|i| Minutia {
            kind: if i % 2 == 0 {
                MinutiaKind::RidgeEnding
            } else {
                MinutiaKind::Bifurcation
            },
            x: 10 + i * 11 + shift,
            y: 15 + i * 13,
            angle: (i * 17) as u8,
            quality: 40,
        })
        .collect()
}

fn view(position: u8, view_number: u8, quality: u8, n: u16) -> FingerView {
    FingerView {
        position,
        view_number,
        impression_type: 0,
        quality,
        minutiae: minutiae(n, u16::from(view_number)),
        extended_data: Vec::new(),
        geometry: None,
    }
}

fn record_2005(views: Vec<FingerView>) -> Vec<u8> {
    FingerprintRecord {
        version: IsoVersion::V2005,
        capture_equipment: 0,
        width: 600,
        height: 600,
        x_resolution: 197,
        y_resolution: 197,
        views,
    }
    .to_bytes()
    .unwrap()
}

/// One 2011 finger representation, written field by field as ISO/IEC 19794-2:2011 lays it out.
struct Rep2011 {
    position: u8,
    number: u8,
    impression: u8,
    /// Quality blocks (score per block; 255 = "could not be computed").
    qualities: Vec<u8>,
    size: (u16, u16),
    ppcm: u16,
    /// Minutia quality written in every 6-byte minutia (254 = "not reported").
    minutia_quality: u8,
    count: u16,
    extended: Vec<u8>,
}

fn record_2011(reps: &[Rep2011], certification: bool) -> Vec<u8> {
    let mut body = Vec::new();
    for r in reps {
        let mut rep = vec![0; 4];
        rep.extend_from_slice(&[0x07, 0xEA, 12, 4, 9, 30, 0, 0xFF, 0xFF]); // capture date-time
        rep.push(14); // capacitive
        rep.extend_from_slice(&[0x12, 0x34, 0x00, 0x07]); // vendor, device type
        rep.push(r.qualities.len() as u8);
        for q in &r.qualities {
            rep.extend_from_slice(&[*q, 0x00, 0x0F, 0x00, 0x01]);
        }
        if certification {
            rep.extend_from_slice(&[1, 0x00, 0x0F, 0x01]);
        }
        rep.extend_from_slice(&[r.position, r.number]);
        rep.extend_from_slice(&r.ppcm.to_be_bytes());
        rep.extend_from_slice(&r.ppcm.to_be_bytes());
        rep.push(r.impression);
        rep.extend_from_slice(&r.size.0.to_be_bytes());
        rep.extend_from_slice(&r.size.1.to_be_bytes());
        rep.push(0x61); // 6-byte minutiae, ridge ending type 1
        rep.push(r.count as u8);
        for m in minutiae(r.count, u16::from(r.number)) {
            rep.extend_from_slice(&((1u16 << 14) | m.x).to_be_bytes());
            rep.extend_from_slice(&m.y.to_be_bytes());
            rep.extend_from_slice(&[m.angle, r.minutia_quality]);
        }
        rep.extend_from_slice(&(r.extended.len() as u16).to_be_bytes());
        rep.extend_from_slice(&r.extended);
        let len = rep.len() as u32;
        rep[..4].copy_from_slice(&len.to_be_bytes());
        body.extend_from_slice(&rep);
    }
    let mut out = b"FMR\x00030\x00".to_vec();
    out.extend_from_slice(&((15 + body.len()) as u32).to_be_bytes());
    out.extend_from_slice(&(reps.len() as u16).to_be_bytes());
    out.push(u8::from(certification));
    out.extend_from_slice(&body);
    out
}

fn fvc(db: u8, finger: u16, impression: u8) -> Vec<u8> {
    let path = common::shared_data()
        .join("fvc2002-iso")
        .join(format!("DB{db}_B"))
        .join(format!("{finger}_{impression}.iso"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn header_position_0_takes_the_contract_position_for_every_fvc_record() {
    let dir = common::shared_data().join("fvc2002-iso");
    let mut seen = 0;
    for db in 1..=4u8 {
        for finger in 101..=110u16 {
            for k in 1..=8u8 {
                let bytes = fvc(db, finger, k);
                let rec = iso19794_2::parse(&bytes).unwrap();
                assert_eq!(rec.views[0].position, 0, "FVC headers say 'unknown'");
                let position = (finger - 100) as u8;
                let placed = place_finger(position, &bytes)
                    .unwrap_or_else(|e| panic!("DB{db} {finger}_{k}: {e}"));
                assert_eq!(placed.choice.position, position);
                assert_eq!(placed.choice.header_position, 0);
                assert_eq!(placed.choice.views, 1);
                assert_eq!(placed.finger.minutiae.len(), rec.views[0].minutiae.len());
                seen += 1;
            }
        }
    }
    assert_eq!(seen, 320, "{}", dir.display());
    // A ten-print of one FVC impression per finger, every finger in its contract slot.
    let ten: Vec<(u8, Vec<u8>)> = (1..=10u8)
        .map(|p| (p, fvc(2, 100 + u16::from(p), 3)))
        .collect();
    let (tp, choices) = TenPrint::from_placed(&ten).unwrap();
    assert!(tp.fingers.iter().all(Option::is_some));
    assert_eq!(
        choices.iter().map(|c| c.position).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    // The header-positioned constructor still refuses them (it has no contract position).
    assert!(matches!(
        TenPrint::from_iso(&[fvc(2, 101, 1)]),
        Err(TenPrintError::UnknownPosition { index: 0 })
    ));
}

#[test]
fn a_disagreeing_header_position_is_refused_naming_both_positions() {
    let bytes = record_2005(vec![view(2, 0, 60, 20)]);
    assert!(place_finger(2, &bytes).is_ok());
    let err = place_finger(3, &bytes).unwrap_err();
    assert_eq!(
        err,
        PlacementError::PositionMismatch {
            position: 3,
            found: vec![2]
        }
    );
    let text = err.to_string();
    assert!(text.contains("finger position 2, not position 3"), "{text}");
    // In a ten-print the refusal names the contract position.
    let e = TenPrint::from_placed(&[(3u8, bytes)]).unwrap_err();
    assert!(
        matches!(e, TenPrintError::Placement { position: 3, .. }),
        "{e}"
    );
    // Contract positions outside 1–10 are refused before the record is read.
    assert_eq!(
        place_finger(0, b"x").unwrap_err(),
        PlacementError::BadPosition { position: 0 }
    );
    assert_eq!(
        place_finger(11, b"x").unwrap_err(),
        PlacementError::BadPosition { position: 11 }
    );
}

#[test]
fn the_best_quality_view_is_used_and_other_positions_are_ignored() {
    // Position 4 twice (quality 40, then 80 with fewer minutiae), an "unknown" view of quality
    // 80 with more minutiae, and a view of position 7.
    let bytes = record_2005(vec![
        view(4, 0, 40, 30),
        view(4, 1, 80, 12),
        view(0, 0, 80, 18),
        view(7, 0, 100, 40),
    ]);
    let placed = place_finger(4, &bytes).unwrap();
    assert_eq!(placed.choice.index, 2, "quality 80, then more minutiae");
    assert_eq!(placed.choice.header_position, 0);
    assert_eq!(placed.choice.candidates, 3);
    assert_eq!(placed.choice.views, 4);
    assert_eq!((placed.choice.quality, placed.choice.minutiae), (80, 18));
    assert_eq!(placed.finger.minutiae.len(), 18);
    let shown = placed.choice.to_string();
    assert!(shown.contains("position 4: view 3 of 4"), "{shown}");
    // Full tie: the first.
    let tie = record_2005(vec![view(5, 0, 60, 20), view(5, 1, 60, 20)]);
    assert_eq!(place_finger(5, &tie).unwrap().choice.index, 0);
    // A view without minutiae is never chosen while another has some.
    let empty_best = record_2005(vec![view(6, 0, 90, 0), view(6, 1, 20, 15)]);
    assert_eq!(place_finger(6, &empty_best).unwrap().choice.index, 1);
    // The "unknown" view is the only candidate for a position no view names.
    assert_eq!(place_finger(1, &bytes).unwrap().choice.index, 2);
    // A view for another position never is one, whatever its quality.
    assert_eq!(place_finger(7, &bytes).unwrap().choice.index, 3);
}

#[test]
fn views_for_other_positions_only_are_refused() {
    let bytes = record_2005(vec![view(4, 0, 40, 30), view(7, 0, 90, 30)]);
    let err = place_finger(1, &bytes).unwrap_err();
    assert_eq!(
        err,
        PlacementError::PositionMismatch {
            position: 1,
            found: vec![4, 7]
        }
    );
    assert!(
        err.to_string()
            .contains("finger position 4, 7, not position 1")
    );
}

#[test]
fn a_record_without_minutiae_for_its_position_is_refused() {
    let bytes = record_2005(vec![view(0, 0, 70, 0), view(3, 0, 70, 25)]);
    assert_eq!(
        place_finger(2, &bytes).unwrap_err(),
        PlacementError::NoMinutiae {
            position: 2,
            views: 1
        }
    );
    // The position-3 view does not rescue position 2, but is fine for 3.
    assert_eq!(place_finger(3, &bytes).unwrap().choice.index, 1);
}

#[test]
fn iso_2011_records_with_several_representations_are_placed() {
    let reps = [
        // Live-scan plain, one failed quality block then 55; quality 254 minutiae.
        Rep2011 {
            position: 0,
            number: 0,
            impression: 0,
            qualities: vec![255, 55],
            size: (400, 500),
            ppcm: 197,
            minutia_quality: 254,
            count: 22,
            extended: Vec::new(),
        },
        // Live-scan rolled, quality 85, at 1000 dpi and another image size, with a core and
        // delta extended data area (2011: the area length counts its header).
        Rep2011 {
            position: 8,
            number: 1,
            impression: 1,
            qualities: vec![85],
            size: (800, 1000),
            ppcm: 394,
            minutia_quality: 60,
            count: 30,
            extended: vec![0x00, 0x02, 0x00, 0x06, 0x00, 0x00],
        },
        // Contactless (24) view of another finger: ignored for position 8.
        Rep2011 {
            position: 9,
            number: 0,
            impression: 24,
            qualities: vec![100],
            size: (600, 600),
            ppcm: 197,
            minutia_quality: 255,
            count: 40,
            extended: Vec::new(),
        },
    ];
    for certification in [false, true] {
        let bytes = record_2011(&reps, certification);
        let rec = iso19794_2::parse(&bytes).unwrap();
        assert_eq!(rec.version, IsoVersion::V2011);
        assert_eq!(
            rec.views.iter().map(|v| v.quality).collect::<Vec<_>>(),
            vec![55, 85, 100]
        );
        assert!(rec.views[0].minutiae.iter().all(|m| m.quality == 0));
        let placed = place_finger(8, &bytes).unwrap();
        assert_eq!(placed.choice.version, IsoVersion::V2011);
        assert_eq!(
            placed.choice.index, 1,
            "the rolled view has the best quality"
        );
        assert_eq!(placed.choice.impression_type, 1);
        // Rescaled from its own 1000 dpi geometry to 500 dpi.
        let m = &placed.finger.minutiae[2];
        assert_eq!((m.x, m.y), (17, 21), "(33, 41) at 1000 dpi");
        let nine = place_finger(9, &bytes).unwrap();
        assert_eq!(nine.choice.index, 2, "position 9's own view, quality 100");
        assert_eq!(place_finger(3, &bytes).unwrap().choice.index, 0);
        // Every truncation is refused.
        for cut in 0..bytes.len() {
            assert!(place_finger(8, &bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
    // Latent (4), vertical roll (9), other (28) and unknown (29) impressions are read as sent.
    for impression in [2u8, 3, 4, 8, 9, 28, 29] {
        let bytes = record_2011(
            &[Rep2011 {
                position: 2,
                number: 0,
                impression,
                qualities: vec![],
                size: (300, 300),
                ppcm: 197,
                minutia_quality: 50,
                count: 15,
                extended: Vec::new(),
            }],
            false,
        );
        let placed = place_finger(2, &bytes).unwrap_or_else(|e| panic!("{impression}: {e}"));
        assert_eq!(placed.choice.impression_type, impression);
    }
}

#[test]
fn iso_2005_extended_data_is_read_under_both_length_conventions() {
    let mut v = view(1, 0, 60, 20);
    // Ridge-count area whose length counts its header (8 bytes in all) ...
    v.extended_data = vec![0x00, 0x01, 0x00, 0x08, 1, 2, 3, 4];
    let with_header = record_2005(vec![v.clone()]);
    assert!(place_finger(1, &with_header).is_ok());
    // ... and one whose length counts its data only (as several extractors write 2005).
    v.extended_data = vec![0x00, 0x02, 0x00, 0x05, 0x41, 0, 10, 0, 20];
    let data_only = record_2005(vec![v.clone()]);
    assert!(place_finger(1, &data_only).is_ok());
    // Areas that tile the block under neither reading are refused.
    v.extended_data = vec![0x00, 0x02, 0x00, 0x07, 0x41, 0, 10, 0, 20];
    assert!(matches!(
        place_finger(1, &record_2005(vec![v])),
        Err(PlacementError::Iso(_))
    ));
}

#[test]
fn invalid_and_truncated_records_are_refused() {
    let dir = common::shared_data().join("iso-invalid");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let err = place_finger(1, &bytes).unwrap_err();
        assert!(
            matches!(err, PlacementError::Iso(_)),
            "{}: {err}",
            path.display()
        );
        assert!(err.to_string().starts_with("not a valid ISO/IEC 19794-2"));
        n += 1;
    }
    assert!(n >= 3, "no invalid records under {}", dir.display());
    let good = fvc(1, 101, 1);
    for cut in 0..good.len() {
        assert!(place_finger(1, &good[..cut]).is_err());
    }
    assert!(place_finger(1, b"").is_err());
}

#[test]
fn stored_templates_keep_their_positions_and_old_rows_still_read() {
    let templates: Vec<PositionedTemplate> = (1..=10u8)
        .map(|p| PositionedTemplate {
            position: p,
            record: fvc(3, 100 + u16::from(p), 1),
        })
        .collect();
    let stored = decode_templates(&encode_templates(&templates)).unwrap();
    assert_eq!(stored, StoredTemplates::Positioned(templates.clone()));
    let (expected, _) = TenPrint::from_templates(&templates).unwrap();
    assert_eq!(stored.tenprint().unwrap(), expected);
    // A row written before positions were stored: bare length-prefixed records whose
    // headers carry the positions.
    let legacy_records: Vec<Vec<u8>> = (1..=10u8)
        .map(|p| record_2005(vec![view(p, 0, 50, 12 + u16::from(p))]))
        .collect();
    let mut legacy = Vec::new();
    for r in &legacy_records {
        legacy.extend_from_slice(&(r.len() as u32).to_le_bytes());
        legacy.extend_from_slice(r);
    }
    let old = decode_templates(&legacy).unwrap();
    assert_eq!(old, StoredTemplates::Legacy(legacy_records.clone()));
    assert_eq!(
        old.tenprint().unwrap(),
        TenPrint::from_iso(&legacy_records).unwrap()
    );
    // Damaged rows do not decode.
    let enc = encode_templates(&templates);
    assert!(decode_templates(&enc[..enc.len() - 1]).is_none());
    assert!(decode_templates(&legacy[..legacy.len() - 1]).is_none());
}
