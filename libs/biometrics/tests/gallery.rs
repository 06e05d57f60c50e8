//! Gallery, shards and verification on a small synthetic population.
use cardpipe_biometrics::matcher::{
    Gallery, IdentifyOptions, Probe, Shard, TenPrint, merge_candidates,
};
use cardpipe_biometrics::synth::Population;

fn tenprint(records: &[Vec<u8>]) -> TenPrint {
    TenPrint::from_iso(records).expect("generated records parse")
}

#[test]
fn planted_duplicates_are_found_and_others_cleared() {
    let pop = Population::generate(42, 60, 0.1);
    assert!(
        pop.duplicates.len() >= 2,
        "population should plant duplicates"
    );
    let mut gallery = Gallery::new();
    for s in &pop.subjects {
        assert!(gallery.insert(&s.reference_id, &tenprint(&s.templates)));
    }
    // Idempotent by reference id.
    assert!(!gallery.insert(
        &pop.subjects[0].reference_id,
        &tenprint(&pop.subjects[0].templates)
    ));
    assert_eq!(gallery.len(), 60);
    let opts = IdentifyOptions {
        min_score: -(0.001f64 / 60.0).log10(),
        ..IdentifyOptions::default()
    };
    for s in &pop.subjects {
        let probe = Probe::new(&tenprint(&s.templates));
        let hits = gallery.identify(&probe, &opts, Some(&s.reference_id));
        let mut got: Vec<&str> = hits.iter().map(|c| c.reference_id.as_str()).collect();
        got.sort();
        let mut want: Vec<&str> = pop
            .subjects
            .iter()
            .filter(|o| o.person == s.person && o.index != s.index)
            .map(|o| o.reference_id.as_str())
            .collect();
        want.sort();
        assert_eq!(got, want, "subject {}", s.index);
        for c in &hits {
            assert!(c.fused.fingers.iter().flatten().count() == 10);
        }
    }
}

#[test]
fn delete_and_verify() {
    let pop = Population::generate(9, 12, 0.0);
    let mut gallery = Gallery::new();
    for s in &pop.subjects {
        gallery.insert(&s.reference_id, &tenprint(&s.templates));
    }
    let fresh = Probe::new(&tenprint(&pop.fresh_impressions(3, 1)));
    let same = gallery
        .verify(&fresh, &pop.subjects[3].reference_id, 1e-6)
        .unwrap();
    let other = gallery
        .verify(&fresh, &pop.subjects[4].reference_id, 1e-6)
        .unwrap();
    assert!(same.is_match && !other.is_match, "{same:?} {other:?}");
    assert!(same.fused.score > other.fused.score + 6.0);
    assert!(gallery.delete(&pop.subjects[3].reference_id));
    assert!(!gallery.delete(&pop.subjects[3].reference_id));
    assert_eq!(gallery.len(), 11);
    assert!(
        gallery
            .verify(&fresh, &pop.subjects[3].reference_id, 1e-6)
            .is_none()
    );
    // The subject that moved into the freed slot is still found.
    let last = &pop.subjects[11];
    let probe = Probe::new(&tenprint(&pop.fresh_impressions(11, 2)));
    let top = gallery.identify(&probe, &IdentifyOptions::default(), None);
    assert_eq!(top[0].reference_id, last.reference_id);
    // The stored ten-print decodes to the enrolled minutiae.
    let stored = gallery.get(&pop.subjects[0].reference_id).unwrap();
    assert_eq!(stored, tenprint(&pop.subjects[0].templates));
    // Debug output never shows minutiae.
    let dbg = format!("{stored:?} {probe:?} {gallery:?}");
    assert!(dbg.contains("redacted") && !dbg.contains("x:"), "{dbg}");
}

#[test]
fn shards_merge_to_the_single_gallery_answer() {
    let pop = Population::generate(5, 36, 0.15);
    let mut whole = Gallery::new();
    let mut shards: Vec<Shard> = (0..3).map(|i| Shard::new(i, 3)).collect();
    for s in &pop.subjects {
        let tp = tenprint(&s.templates);
        whole.insert(&s.reference_id, &tp);
        let owner = Shard::owner_of(&s.reference_id, 3) as usize;
        assert!(shards[owner].insert(&s.reference_id, &tp).unwrap());
        assert!(
            shards[(owner + 1) % 3]
                .insert(&s.reference_id, &tp)
                .is_err()
        );
    }
    assert_eq!(shards.iter().map(|s| s.gallery.len()).sum::<usize>(), 36);
    assert!(shards.iter().all(|s| !s.gallery.is_empty()));
    // Above the decision threshold the answers must agree exactly. (Below it they may differ:
    // each shard fully compares its own best few, so the merged tail holds more fully
    // compared weak candidates than a single gallery would.)
    let opts = IdentifyOptions {
        min_score: -(0.001f64 / 36.0).log10(),
        ..IdentifyOptions::default()
    };
    for &(dup, _) in &pop.duplicates {
        let probe = Probe::new(&tenprint(&pop.subjects[dup].templates));
        let id = pop.subjects[dup].reference_id.as_str();
        let single = whole.identify(&probe, &opts, Some(id));
        let merged = merge_candidates(
            shards.iter().map(|s| s.identify(&probe, &opts, Some(id))),
            opts.max_results,
        );
        let a: Vec<(&str, f64)> = single
            .iter()
            .map(|c| (c.reference_id.as_str(), c.fused.score))
            .collect();
        let b: Vec<(&str, f64)> = merged
            .iter()
            .map(|c| (c.reference_id.as_str(), c.fused.score))
            .collect();
        assert!(!a.is_empty());
        assert_eq!(a, b);
    }
}
