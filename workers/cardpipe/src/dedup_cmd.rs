//! `cardpipe bench dedup`: the dedup benchmark (`cardpipe_biometrics::bench::run`) from the binary
//! operators already have — FVC2002 single-finger accuracy, precise comparisons and
//! candidate-stage codes per second per core, and synthetic 1:N galleries (memory per
//! subject, latency, recall, FNIR at FPIR 0.1 %). Build with `--release` for real figures.

use std::path::PathBuf;

use clap::Args;

/// `cardpipe bench dedup`.
#[derive(Debug, Args)]
pub struct BenchDedupArgs {
    /// Gallery sizes in subjects, comma-separated (default 10000,100000; a 1,000,000
    /// gallery takes ≈ 2.5 GiB and tens of minutes to build on 2 cores).
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..))]
    pub sizes: Option<Vec<u64>>,
    /// Mated searches per gallery (fresh impressions of enrolled subjects).
    #[arg(long, default_value_t = 300)]
    pub mated: usize,
    /// Non-mated searches per gallery (subjects never enrolled).
    #[arg(long, default_value_t = 1000)]
    pub nonmated: usize,
    /// Single-probe searches timed for latency mean/p50/p95 (at most --mated).
    #[arg(long, default_value_t = 50)]
    pub singles: usize,
    /// Population seed (the same seed generates the same galleries).
    #[arg(long, default_value_t = 2026)]
    pub seed: u64,
    /// Directory with the FVC2002 ISO templates (DB1_B … DB4_B).
    #[arg(long)]
    pub fvc_dir: Option<PathBuf>,
    /// Only the real-template report: accuracy, held-out split, calibration
    /// cross-validation and fusion check, synthetic vs real distributions.
    #[arg(long)]
    pub fvc_only: bool,
    /// Fit the shipped score calibration on the templates of --fvc-dir (all ordered
    /// impostor pairs within each database) and write it to this file, e.g.
    /// libs/biometrics/src/matcher/calibration_fvc2002.txt; nothing else runs.
    #[arg(long, value_name = "OUT")]
    pub fit_calibration: Option<PathBuf>,
}

/// Runs the benchmark and prints its report.
pub fn bench(args: BenchDedupArgs) -> anyhow::Result<()> {
    let mut opts = cardpipe_biometrics::bench::BenchOptions::new(false);
    if let Some(sizes) = args.sizes {
        opts.gallery_sizes = sizes.into_iter().map(|n| n as usize).collect();
    }
    opts.mated_searches = args.mated;
    opts.nonmated_searches = args.nonmated;
    opts.single_searches = args.singles.min(args.mated);
    opts.seed = args.seed;
    if let Some(dir) = args.fvc_dir {
        opts.fvc_dir = dir;
    }
    if let Some(out) = args.fit_calibration {
        let text = cardpipe_biometrics::bench::fit_calibration_text(&opts.fvc_dir)?;
        std::fs::write(&out, text)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
        println!("calibration written to {}", out.display());
        return Ok(());
    }
    if args.fvc_only {
        let report = cardpipe_biometrics::bench::fvc_report(&opts.fvc_dir)?;
        println!("{report}");
        return Ok(());
    }
    let started = std::time::Instant::now();
    let report = cardpipe_biometrics::bench::run(&opts)?;
    println!("{report}");
    println!("Whole run: {:.1} s wall.", started.elapsed().as_secs_f64());
    Ok(())
}
