//! The shipped calibration and the shipped comparator constants are what the documented
//! procedures give on the shared FVC2002 templates. Both tests fail (never skip) when the
//! data is missing.
mod common;

use cardpipe_biometrics::bench::{fit_calibration_text, load_fvc};
use cardpipe_biometrics::evaluation::{
    halves, score_databases, split_accuracy, tune_normalisation,
};
use cardpipe_biometrics::matcher::NORMALISATION;
use cardpipe_biometrics::matcher::calibration::{Calibration, FVC2002_CALIBRATION};

#[test]
fn shipped_calibration_file_is_up_to_date() {
    let dir = common::shared_data().join("fvc2002-iso");
    let fresh = fit_calibration_text(&dir).expect("FVC2002 templates load");
    if fresh != FVC2002_CALIBRATION {
        panic!(
            "libs/biometrics/src/matcher/calibration_fvc2002.txt is stale (the comparator or the \
             fitting procedure changed). Regenerate it from the repository root with\n  \
             cargo run --release -p cardpipe -- bench dedup --fit-calibration \
             libs/biometrics/src/matcher/calibration_fvc2002.txt --fvc-dir ../shared/data/fvc2002-iso\n\
             --- committed\n{FVC2002_CALIBRATION}\n--- fitted now\n{fresh}"
        );
    }
    // And it is what the gallery uses.
    let parsed = Calibration::from_text(&fresh).unwrap();
    assert_eq!(&parsed, Calibration::fvc2002());
}

#[test]
fn shipped_normalisation_is_the_one_tuned_on_db1_and_db2_only() {
    let templates = load_fvc(&common::shared_data().join("fvc2002-iso")).unwrap();
    let dbs = score_databases(&templates);
    let names: Vec<&str> = dbs.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["DB1_B", "DB2_B", "DB3_B", "DB4_B"]);
    let (tune, test) = halves(dbs.len());
    assert_eq!(
        (tune.as_slice(), test.as_slice()),
        (&[0, 1][..], &[2, 3][..])
    );
    // The procedure sees only DB1 and DB2: the held-out scores do not influence it.
    let only_tuning: Vec<_> = dbs[..2].to_vec();
    let (picked, _) = tune_normalisation(&only_tuning, &[0, 1]);
    assert_eq!(picked, NORMALISATION);
    assert_eq!(tune_normalisation(&dbs, &tune).0, NORMALISATION);
    // Held-out targets of issue 13 (EER ≤ 7.5 %, FNMR ≤ 20 % at FMR 0.1 %) on DB3+DB4.
    let held_out = split_accuracy(&dbs, &test);
    assert!(held_out.eer <= 0.075, "{held_out:?}");
    assert!(held_out.fnmr_at_fmr_1e3 <= 0.20, "{held_out:?}");
}
