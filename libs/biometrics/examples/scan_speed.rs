//! The candidate scan alone: milliseconds per probe of `Gallery::shortlist` against the
//! bounded-heap scan it replaced (`Gallery::shortlist_heap_reference`), in one run, on one
//! synthetic gallery.
//!
//! `cargo run --release -p cardpipe-biometrics --example scan_speed -- --n 20000 --rounds 5`
//!
//! Builds a gallery of `--n` subjects (seed `--seed`, default 2026) and 64 probes (half fresh
//! impressions of enrolled subjects, half never enrolled: one batch of the dedup stage's
//! batcher), then times both scans `--rounds` times each, alternating, at the shortlist depth
//! production uses for that gallery (`IdentifyOptions::shortlist_for`, or `--depth`), on all
//! cores (`--threads 1` for one). Prints the best and median round of each and their ratio,
//! and checks that both keep the same scores.

use std::time::Instant;

use cardpipe_biometrics::bench::build_gallery;
use cardpipe_biometrics::matcher::{IdentifyOptions, Probe, TenPrint};
use rayon::prelude::*;

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::args().skip_while(|a| a != name).nth(1) {
        None => default,
        Some(v) => v.parse().unwrap_or_else(|_| {
            eprintln!("scan_speed: invalid value {v:?} for {name}");
            std::process::exit(2)
        }),
    }
}

fn main() {
    let n: usize = arg("--n", 20_000);
    let seed: u64 = arg("--seed", 2026);
    let rounds: usize = arg("--rounds", 5).max(1);
    let depth: usize = arg("--depth", IdentifyOptions::default().shortlist_for(n));
    let threads: usize = arg("--threads", 0);
    if threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .expect("the global thread pool is set once");
    }
    let t0 = Instant::now();
    let (gallery, spec) = build_gallery(seed, n);
    eprintln!(
        "gallery of {n} built in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let prepare = |records: Vec<Vec<u8>>| {
        Probe::new(&TenPrint::from_iso(&records).expect("generated records parse"))
    };
    let mut probes: Vec<Probe> = (0..32)
        .into_par_iter()
        .map(|k| {
            let i = k * n / 32;
            prepare(spec.impressions(spec.person_of(i), 9_000_000 + i as u64))
        })
        .collect();
    probes.extend(
        (0..32)
            .into_par_iter()
            .map(|k| prepare(spec.impressions((n + k) as u64, 1)))
            .collect::<Vec<_>>(),
    );
    let refs: Vec<&Probe> = probes.iter().collect();
    let (mut new, mut old) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let start = Instant::now();
        let kept_new = std::hint::black_box(gallery.shortlist(&refs, depth, true));
        new.push(start.elapsed().as_secs_f64() * 1e3 / refs.len() as f64);
        let start = Instant::now();
        let kept_old = std::hint::black_box(gallery.shortlist_heap_reference(&refs, depth, true));
        old.push(start.elapsed().as_secs_f64() * 1e3 / refs.len() as f64);
        for (a, b) in kept_new.iter().zip(&kept_old) {
            let scores = |v: &Vec<(i64, u32)>| v.iter().map(|e| e.0).collect::<Vec<_>>();
            assert_eq!(scores(a), scores(b), "the two scans kept different scores");
        }
    }
    let summary = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[0], v[v.len() / 2])
    };
    let (new_best, new_median) = summary(&mut new);
    let (old_best, old_median) = summary(&mut old);
    println!(
        "gallery {n} (seed {seed}), 64 probes, shortlist {depth}, {} threads, {rounds} rounds",
        rayon::current_num_threads()
    );
    println!("| scan | best ms/probe | median ms/probe |");
    println!("|---|---|---|");
    println!("| bounded heap (before) | {old_best:.3} | {old_median:.3} |");
    println!("| top-k with floor (now) | {new_best:.3} | {new_median:.3} |");
    println!(
        "ratio before/now: {:.2} × (best), {:.2} × (median)",
        old_best / new_best,
        old_median / new_median
    );
}
