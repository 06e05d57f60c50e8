//! What searching concurrent dedup jobs' probes together buys: searches per second over a
//! gallery of `--gallery` synthetic subjects, one probe at a time (each job's search alone,
//! as before the batcher) against `--jobs` probes submitted at once through the stage's
//! [`SearchBatcher`](cardpipe_dedup::batcher::SearchBatcher) (`batch_max` per pass), in one
//! run so the ratio is measured under the same load.
//!
//! ```sh
//! cargo run --release -p cardpipe-dedup --example bench_batching -- --gallery 100000 --probes 256
//! ```
//!
//! Prints JSON. Half the probes are mates of enrolled subjects; every mate must be found in
//! both modes (the bench fails otherwise), so the figure is of a search that works.

use std::sync::Arc;
use std::time::Instant;

use cardpipe_biometrics::matcher::{IdentifyOptions, Probe, TenPrint};
use cardpipe_biometrics::synth::PopulationSpec;
use cardpipe_dedup::batcher::SearchBatcher;
use cardpipe_dedup::scatter::{ShardSet, gather};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use rayon::prelude::*;

struct Args {
    gallery: usize,
    probes: usize,
    batch_max: usize,
    shortlist: usize,
}

fn args() -> Args {
    let mut a = Args {
        gallery: 20_000,
        probes: 128,
        batch_max: 64,
        shortlist: IdentifyOptions::default().shortlist,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || -> usize {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{flag} needs a number"))
        };
        match flag.as_str() {
            "--gallery" => a.gallery = value(),
            "--probes" => a.probes = value(),
            "--batch-max" => a.batch_max = value(),
            "--shortlist" => a.shortlist = value(),
            other => panic!(
                "unknown argument {other:?} (--gallery N --probes N --batch-max N --shortlist N)"
            ),
        }
    }
    a
}

fn main() -> anyhow::Result<()> {
    let a = args();
    let spec = PopulationSpec {
        seed: 2027,
        subjects: a.gallery,
        duplicate_rate: 0.0,
    };
    let options = IdentifyOptions {
        shortlist: a.shortlist,
        ..IdentifyOptions::default()
    };
    let shards = Arc::new(ShardSet::new(1, &[0], options));
    let started = Instant::now();
    for chunk in (0..a.gallery).collect::<Vec<_>>().chunks(20_000) {
        let subjects: Vec<(String, TenPrint)> = chunk
            .par_iter()
            .map(|&i| {
                let s = spec.subject(i);
                (
                    s.reference_id,
                    TenPrint::from_iso(&s.templates).expect("synthetic prints"),
                )
            })
            .collect();
        shards.insert_many(&subjects);
    }
    let build_s = started.elapsed().as_secs_f64();
    eprintln!("gallery of {} built in {build_s:.0} s", a.gallery);
    // Even probes: a fresh capture of an enrolled subject; odd ones: someone not enrolled.
    let probes: Vec<(Option<String>, Probe)> = (0..a.probes)
        .into_par_iter()
        .map(|k| {
            let (mate, person) = if k % 2 == 0 {
                let i = (k * 7919) % a.gallery;
                (Some(spec.subject_reference_id(i)), spec.person_of(i))
            } else {
                (None, (a.gallery + k) as u64)
            };
            let prints = spec.impressions(person, 5_000_000 + k as u64);
            (
                mate,
                Probe::new(&TenPrint::from_iso(&prints).expect("synthetic prints")),
            )
        })
        .collect();
    let found = |k: usize, candidates: &[cardpipe_biometrics::matcher::Candidate]| {
        probes[k]
            .0
            .as_ref()
            .is_none_or(|mate| candidates.first().is_some_and(|c| &c.reference_id == mate))
    };

    // One at a time: each job's search alone.
    let started = Instant::now();
    let mut missed_single = 0;
    for (k, (_, probe)) in probes.iter().enumerate() {
        let c = shards.scatter_gather(probe, 1e-3, 10, None);
        missed_single += usize::from(!found(k, &c));
    }
    let single_s = started.elapsed().as_secs_f64();

    // Every probe submitted at once, as concurrent jobs do, through the stage's batcher.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let sizes = Histogram::new(exponential_buckets(1.0, 2.0, 11));
    let (batched_s, missed_batched) = runtime.block_on(async {
        let batcher = Arc::new(SearchBatcher::start(
            shards.clone(),
            a.batch_max,
            10,
            sizes.clone(),
        ));
        let started = Instant::now();
        let tasks: Vec<_> = probes
            .iter()
            .map(|(_, p)| {
                let (batcher, p) = (batcher.clone(), Arc::new(p.clone()));
                tokio::spawn(async move { batcher.search(p, None).await })
            })
            .collect();
        let mut missed = 0;
        for (k, t) in tasks.into_iter().enumerate() {
            let answers = t.await??;
            missed += usize::from(!found(k, &gather(answers, 1e-3, 10)));
        }
        anyhow::Ok((started.elapsed().as_secs_f64(), missed))
    })?;
    anyhow::ensure!(
        missed_single == 0 && missed_batched == 0,
        "mates missed: {missed_single} one at a time, {missed_batched} batched"
    );
    let report = serde_json::json!({
        "gallery": a.gallery,
        "probes": a.probes,
        "shortlist": a.shortlist,
        "batch_max": a.batch_max,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "one_at_a_time_searches_per_s": a.probes as f64 / single_s,
        "batched_searches_per_s": a.probes as f64 / batched_s,
        "speed_up": single_s / batched_s,
        "gallery_build_s": build_s,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
