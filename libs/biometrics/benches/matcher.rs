//! Criterion benches of the hot paths. `cargo bench -p cardpipe-biometrics`; the end-to-end
//! figures (accuracy, latency, recall, memory) come from `cardpipe_biometrics::bench::run`.
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

use cardpipe_biometrics::bench::{build_gallery, default_shared_data, load_fvc};
use cardpipe_biometrics::matcher::{FingerTemplate, IdentifyOptions, Probe, TenPrint, compare};

fn comparator(c: &mut Criterion) {
    let fvc = load_fvc(&default_shared_data().join("fvc2002-iso"))
        .expect("FVC templates under shared/data");
    let a = FingerTemplate::new(&fvc[0].data);
    let genuine = FingerTemplate::new(&fvc[1].data);
    let impostor = FingerTemplate::new(&fvc[8].data);
    c.bench_function("compare/genuine", |b| {
        b.iter(|| compare(black_box(&a), black_box(&genuine)))
    });
    c.bench_function("compare/impostor", |b| {
        b.iter(|| compare(black_box(&a), black_box(&impostor)))
    });
    c.bench_function("template/expand", |b| {
        b.iter(|| FingerTemplate::new(black_box(&fvc[2].data)))
    });
}

fn search(c: &mut Criterion) {
    let (gallery, spec) = build_gallery(7, 5_000);
    let probes: Vec<Probe> = (0..16)
        .map(|k| Probe::new(&TenPrint::from_iso(&spec.impressions(k, 99)).expect("parse")))
        .collect();
    let refs: Vec<&Probe> = probes.iter().collect();
    let mut g = c.benchmark_group("gallery-5k");
    g.sample_size(10);
    g.bench_function("candidate-scan/16-probes/1-core", |b| {
        b.iter(|| gallery.shortlist(black_box(&refs), 200, false))
    });
    g.bench_function("identify/1-probe", |b| {
        b.iter(|| gallery.identify(black_box(&probes[0]), &IdentifyOptions::default(), None))
    });
    g.finish();
}

criterion_group!(benches, comparator, search);
criterion_main!(benches);
