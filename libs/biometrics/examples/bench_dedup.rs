//! `cargo run --release -p cardpipe-biometrics --example bench_dedup [-- --help]`: prints the
//! report of `cardpipe_biometrics::bench::run` (FVC2002 accuracy, per-core throughput, synthetic
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
  --shortlist N         candidate-stage shortlist at 1M subjects (default: IdentifyOptions::default());
                        smaller galleries use it scaled to their size, at least --min-shortlist
  --min-shortlist N     shortest shortlist of a small gallery (default: IdentifyOptions::default())
  --lead N              fingers compared per shortlisted subject in the first precise pass
  --full N              subjects compared on all fingers in the second precise pass
  --shard K/N           build only shard K of N of a --population subjects population, answer
                        the mated/non-mated probes of that population, write --out FILE (JSON)
  --population N        population size for --shard (default 2000000)
  --out FILE            where --shard writes its answers
  --barrier DIR         --shard: wait until every shard is built before searching
  --merge F1,F2,...     merge shard answer files (scatter-gather) and print the report
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
    let mut opts = cardpipe_biometrics::bench::BenchOptions::new(million);
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
    if let Some(n) = arg("--shortlist") {
        opts.search.shortlist = n;
    }
    if let Some(n) = arg("--min-shortlist") {
        opts.search.min_shortlist = n;
    }
    if let Some(n) = arg("--lead") {
        opts.search.lead_fingers = n;
    }
    if let Some(n) = arg("--full") {
        opts.search.full_compare = n;
    }
    if let Some(n) = arg("--seed") {
        opts.seed = n;
    }
    if let Some(dir) = arg::<std::path::PathBuf>("--fvc-dir") {
        opts.fvc_dir = dir;
    }
    if let Some(out) = arg::<std::path::PathBuf>("--fit-calibration") {
        match cardpipe_biometrics::bench::fit_calibration_text(&opts.fvc_dir) {
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
    if let Some(files) = arg::<String>("--merge") {
        let runs: Vec<cardpipe_biometrics::bench::ShardRun> = files
            .split(',')
            .map(|f| {
                let text = std::fs::read_to_string(f).unwrap_or_else(|e| {
                    eprintln!("bench_dedup: cannot read {f}: {e}");
                    std::process::exit(1)
                });
                serde_json::from_str(&text).unwrap_or_else(|e| {
                    eprintln!("bench_dedup: {f} is not a shard run: {e}");
                    std::process::exit(1)
                })
            })
            .collect();
        print!(
            "{}",
            cardpipe_biometrics::bench::merge_shard_runs(&runs, opts.search.max_results)
        );
        return;
    }
    if let Some(shard) = arg::<String>("--shard") {
        let Some((k, n)) = shard
            .split_once('/')
            .and_then(|(k, n)| Some((k.parse::<u32>().ok()?, n.parse::<u32>().ok()?)))
            .filter(|&(k, n)| k < n)
        else {
            eprintln!("bench_dedup: --shard takes K/N with K < N");
            std::process::exit(2);
        };
        let population = arg("--population").unwrap_or(2_000_000usize);
        let Some(out) = arg::<String>("--out") else {
            eprintln!("bench_dedup: --shard needs --out FILE");
            std::process::exit(2);
        };
        let barrier = arg::<String>("--barrier").map(std::path::PathBuf::from);
        let run =
            cardpipe_biometrics::bench::shard_run(&opts, population, k, n, barrier.as_deref());
        std::fs::write(&out, serde_json::to_string(&run).expect("serialisable")).unwrap_or_else(
            |e| {
                eprintln!("bench_dedup: cannot write {out}: {e}");
                std::process::exit(1)
            },
        );
        print!(
            "{}",
            cardpipe_biometrics::bench::merge_shard_runs(&[run], opts.search.max_results)
        );
        return;
    }
    if std::env::args().any(|a| a == "--fvc-only") {
        match cardpipe_biometrics::bench::fvc_report(&opts.fvc_dir) {
            Ok(r) => println!("{r}"),
            Err(e) => {
                eprintln!("bench failed: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    let started = std::time::Instant::now();
    match cardpipe_biometrics::bench::run(&opts) {
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
