//! Parser and comparator on the real FVC2002 ISO templates.
mod common;

use cardpipe_biometrics::bench::load_fvc;
use cardpipe_biometrics::iso19794_2::{IsoError, parse};
use cardpipe_biometrics::matcher::{FingerTemplate, compare};

#[test]
fn every_fvc_template_parses_and_round_trips() {
    let root = common::shared_data().join("fvc2002-iso");
    let mut count = 0;
    for db in std::fs::read_dir(&root).unwrap() {
        for f in std::fs::read_dir(db.unwrap().path()).unwrap() {
            let path = f.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let rec = parse(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(rec.views.len(), 1);
            assert!(rec.views[0].minutiae.len() >= 5, "{}", path.display());
            assert_eq!(
                rec.to_bytes().unwrap(),
                bytes,
                "{} does not round-trip",
                path.display()
            );
            count += 1;
        }
    }
    assert_eq!(count, 320);
}

#[test]
fn truncated_templates_are_refused_with_field_and_offset() {
    let dir = common::shared_data().join("iso-invalid");
    let mut count = 0;
    for f in std::fs::read_dir(&dir).unwrap() {
        let path = f.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let err = parse(&bytes).expect_err("truncated template accepted");
        match &err {
            IsoError::LengthMismatch { declared, actual } => assert!(*declared as usize > *actual),
            IsoError::Truncated { .. } => {}
            other => panic!("{}: unexpected error {other}", path.display()),
        }
        let msg = err.to_string();
        assert!(msg.contains("byte offset"), "{msg}");
        // The declared length stays honest even if the length field is patched to match.
        let mut patched = bytes.clone();
        let n = patched.len() as u32;
        patched[8..12].copy_from_slice(&n.to_be_bytes());
        let err = parse(&patched).expect_err("patched truncated template accepted");
        assert!(err.to_string().contains("byte offset"), "{err}");
        count += 1;
    }
    assert!(count >= 3);
}

/// A small slice of the FVC protocol: genuine pairs must clearly outscore impostor pairs.
#[test]
fn genuine_pairs_outscore_impostor_pairs_on_fvc_sample() {
    let all = load_fvc(&common::shared_data().join("fvc2002-iso")).unwrap();
    assert_eq!(all.len(), 320);
    // Four fingers × four impressions from every database.
    let sample: Vec<_> = all
        .iter()
        .filter(|t| t.finger % 100 <= 4 && t.impression <= 4)
        .collect();
    let prepared: Vec<FingerTemplate> = sample
        .iter()
        .map(|t| FingerTemplate::new(&t.data))
        .collect();
    let (mut genuine, mut impostor) = (Vec::new(), Vec::new());
    for (i, a) in sample.iter().enumerate() {
        for (j, b) in sample.iter().enumerate() {
            if i != j && a.database == b.database {
                let s = compare(&prepared[i], &prepared[j]);
                if a.finger == b.finger {
                    genuine.push(s)
                } else {
                    impostor.push(s)
                }
            }
        }
    }
    assert_eq!(genuine.len(), 4 * 4 * 12);
    impostor.sort_by(f32::total_cmp);
    let max_impostor = *impostor.last().unwrap();
    let p99 = impostor[impostor.len() * 99 / 100];
    let above = genuine.iter().filter(|&&g| g > p99).count();
    let mean_g: f32 = genuine.iter().sum::<f32>() / genuine.len() as f32;
    let mean_i: f32 = impostor.iter().sum::<f32>() / impostor.len() as f32;
    eprintln!(
        "genuine mean {mean_g:.4}, impostor mean {mean_i:.4}, max {max_impostor:.4}, above p99 {above}/{}",
        genuine.len()
    );
    assert!(mean_g > 5.0 * mean_i);
    assert!(
        above * 100 >= genuine.len() * 85,
        "only {above} of {} genuine pairs above the impostor 99th percentile",
        genuine.len()
    );
}
