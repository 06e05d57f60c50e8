//! `cargo run --release -p cardpipe-dedup --example bench_dedup [-- --help]`: prints the
//! report of `cardpipe_dedup::bench::run` (FVC2002 accuracy, per-core throughput, synthetic
//! 1:N galleries).

const HELP: &str = "\
bench_dedup: FVC2002 accuracy, comparator and candidate-stage throughput, synthetic 1:N.

Options:
  --million             add the 1,000,000-subject gallery to the default 10k and 100k
  --sizes N[,N...]      gallery sizes instead (e.g. --sizes 1000000)
  --mated N             mated searches per gallery size (default 300)
  --nonmated N          non-mated searches per gallery size (default 1000)
  --singles N           single-probe searches timed for latency mean/p50/p95 (default 50,
                        at most --mated)
  --seed N              population seed (default 2026)
  --fvc-dir DIR         directory of DB*/NNN_K.iso records (default ../shared/data/fvc2002-iso)
  --fvc-only            only the real-template report (accuracy, held-out split,
                        calibration cross-validation, synthetic vs real)
  --fit-calibration OUT fit the shipped calibration on --fvc-dir and write it to OUT
  --help                this text

Memory: per gallery, the gallery's own byte count, the process RSS growth while it is built
(VmRSS) and the peak RSS so far (VmHWM); RSS figures are n/a where /proc is missing. Run one
size per process for clean RSS figures (a later gallery reuses memory freed by an earlier one).";

/// The value following `name`; exits with a message if it is present but does not parse.
fn arg<T: std::str::FromStr>(name: &str) -> Option<T> {
    let value = std::env::args().skip_while(|a| a != name).nth(1)?;
    match value.parse() {
        Ok(v) => Some(v),
        Err(_) => {
            eprintln!("bench_dedup: invalid value {value:?} for {name} (see --help)");
            std::process::exit(2);
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!("{HELP}");
        return;
    }
    let million = std::env::args().any(|a| a == "--million");
    let mut opts = cardpipe_dedup::bench::BenchOptions::new(million);
    if let Some(sizes) = arg::<String>("--sizes") {
        let parsed: Result<Vec<usize>, _> = sizes.split(',').map(str::parse).collect();
        match parsed {
            Ok(v) if !v.is_empty() && v.iter().all(|&n| n > 0) => opts.gallery_sizes = v,
            _ => {
                eprintln!("bench_dedup: --sizes takes positive integers separated by commas");
                std::process::exit(2);
            }
        }
    }
    if let Some(n) = arg("--mated") {
        opts.mated_searches = n;
    }
    if let Some(n) = arg("--nonmated") {
        opts.nonmated_searches = n;
    }
    if let Some(n) = arg("--singles") {
        opts.single_searches = n;
    }
    if let Some(n) = arg("--seed") {
        opts.seed = n;
    }
    if let Some(dir) = arg::<std::path::PathBuf>("--fvc-dir") {
        opts.fvc_dir = dir;
    }
    if let Some(out) = arg::<std::path::PathBuf>("--fit-calibration") {
        match cardpipe_dedup::bench::fit_calibration_text(&opts.fvc_dir) {
            Ok(text) => {
                if let Err(e) = std::fs::write(&out, text) {
                    eprintln!("bench_dedup: cannot write {}: {e}", out.display());
                    std::process::exit(1);
                }
                println!("calibration written to {}", out.display());
            }
            Err(e) => {
                eprintln!("bench failed: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    if std::env::args().any(|a| a == "--fvc-only") {
        match cardpipe_dedup::bench::fvc_report(&opts.fvc_dir) {
            Ok(r) => println!("{r}"),
            Err(e) => {
                eprintln!("bench failed: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    let started = std::time::Instant::now();
    match cardpipe_dedup::bench::run(&opts) {
        Ok(report) => {
            println!("{report}");
            println!("Whole run: {:.1} s wall.", started.elapsed().as_secs_f64());
        }
        Err(e) => {
            eprintln!("bench failed: {e}");
            std::process::exit(1);
        }
    }
}
