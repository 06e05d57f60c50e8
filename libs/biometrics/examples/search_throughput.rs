//! Whole 1:N searches per second on one synthetic gallery, and where their time goes
//! (issue 16: dedup decisions per second at a million subjects).
//!
//! `cargo run --release -p cardpipe-biometrics --example search_throughput -- --n 1000000 --probes 256 --shortlists 2000,500`
//!
//! Builds a gallery of `--n` subjects (seed `--seed`, default 2026), prepares `--probes`
//! probes, half fresh impressions of enrolled subjects (mates) and half subjects never
//! enrolled, and searches them in batches of 64 (`Gallery::identify_batch`, as the dedup
//! stage's batcher does, all cores) once per shortlist depth at 1M (`--shortlists`; the
//! depth used is scaled to the gallery as in production, `IdentifyOptions::shortlist_for`).
//! For each: searches/s, the candidate stage's share of the time (the same batches through
//! `Gallery::shortlist` alone) and rank-1 of the mates. Every variant searches the same
//! probes in the same process, so their ratios compare.
//!
//! Each depth runs without the expanded-template cache, then with `--cache-mib` (default
//! 4096, the shipped `[dedup] expanded_cache_mib`; 0 skips these rows) twice: the first pass
//! fills the cache with the subjects it shortlists, the second finds them there (a gallery
//! that has served a while). The cache is emptied between depths.

use std::time::Instant;

use cardpipe_biometrics::bench::build_gallery;
use cardpipe_biometrics::matcher::{IdentifyOptions, Probe, TenPrint};
use rayon::prelude::*;

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::args().skip_while(|a| a != name).nth(1) {
        None => default,
        Some(v) => v.parse().unwrap_or_else(|_| {
            eprintln!("search_throughput: invalid value {v:?} for {name}");
            std::process::exit(2)
        }),
    }
}

fn main() {
    let n: usize = arg("--n", 100_000);
    let count: usize = arg("--probes", 256);
    let seed: u64 = arg("--seed", 2026);
    let cache_mib: usize = arg("--cache-mib", 4096);
    let shortlists: Vec<usize> = arg("--shortlists", "2000,500".to_owned())
        .split(',')
        .map(|s| {
            s.parse().unwrap_or_else(|_| {
                eprintln!("search_throughput: --shortlists takes integers separated by commas");
                std::process::exit(2)
            })
        })
        .collect();
    let t0 = Instant::now();
    let (mut gallery, spec) = build_gallery(seed, n);
    eprintln!(
        "gallery of {n} built in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let mates = count / 2;
    let idx: Vec<usize> = (0..mates).map(|k| k * n / mates.max(1)).collect();
    let prepare = |records: Vec<Vec<u8>>| {
        Probe::new(&TenPrint::from_iso(&records).expect("generated records parse"))
    };
    let mut probes: Vec<Probe> = idx
        .par_iter()
        .map(|&i| prepare(spec.impressions(spec.person_of(i), 9_000_000 + i as u64)))
        .collect();
    probes.extend(
        (0..count - mates)
            .into_par_iter()
            .map(|k| prepare(spec.impressions((n + k) as u64, 1)))
            .collect::<Vec<_>>(),
    );
    let want: Vec<String> = idx.iter().map(|&i| spec.subject_reference_id(i)).collect();
    println!(
        "gallery {n} (seed {seed}), {count} probes ({mates} mated), batches of 64, {} threads",
        rayon::current_num_threads()
    );
    println!(
        "| shortlist at 1M (here) | expanded-template cache | searches/s | candidate stage share | rank-1 of mates | cache MiB after |"
    );
    println!("|---|---|---|---|---|---|");
    let mut variants = Vec::new();
    for depth in shortlists {
        variants.push((depth, 0, "none"));
        if cache_mib > 0 {
            variants.push((depth, cache_mib << 20, "filling"));
            variants.push((depth, cache_mib << 20, "filled"));
        }
    }
    for (depth, cache_bytes, cache) in variants {
        if cache == "none" {
            // Every depth starts from an empty cache.
            gallery.clear_expanded_cache();
        }
        let opts = IdentifyOptions {
            shortlist: depth,
            min_shortlist: IdentifyOptions::default().min_shortlist.min(depth),
            expanded_cache_bytes: cache_bytes,
            ..IdentifyOptions::default()
        };
        let here = opts.shortlist_for(n);
        let start = Instant::now();
        let mut first = 0;
        for (b, chunk) in probes.chunks(64).enumerate() {
            let refs: Vec<&Probe> = chunk.iter().collect();
            for (k, found) in gallery.identify_batch(&refs, &opts).iter().enumerate() {
                let at = b * 64 + k;
                if at < mates
                    && found.first().map(|c| c.reference_id.as_str()) == Some(want[at].as_str())
                {
                    first += 1;
                }
            }
        }
        let whole = start.elapsed().as_secs_f64();
        let start = Instant::now();
        for chunk in probes.chunks(64) {
            let refs: Vec<&Probe> = chunk.iter().collect();
            std::hint::black_box(gallery.shortlist(&refs, here, true));
        }
        let candidates = start.elapsed().as_secs_f64();
        println!(
            "| {depth} ({here}) | {cache} | {:.1} | {:.0} % | {:.2} % | {:.0} |",
            count as f64 / whole,
            candidates / whole * 100.0,
            first as f64 * 100.0 / mates.max(1) as f64,
            gallery.expanded_cache_bytes() as f64 / f64::from(1 << 20)
        );
    }
}
