//! `cargo run --release -p cardpipe-dedup --example bench_dedup [-- --million]`: the same
//! report `cardpipe bench dedup` prints. `-- --help` lists the options.

const HELP: &str = "\
bench_dedup: FVC2002 accuracy, comparator and candidate-stage throughput, synthetic 1:N.

Options:
  --million             add the 1,000,000-subject gallery to the default 10k and 100k
  --sizes N[,N...]      gallery sizes instead (e.g. --sizes 1000000)
  --mated N             mated searches per gallery size (default 300)
  --nonmated N          non-mated searches per gallery size (default 1000)
  --singles N           single-probe searches timed for latency p50/p95 (default 50)
  --seed N              population seed (default 2026)
  --fvc-only            only the FVC2002 accuracy report
  --help                this text

Memory: the report gives the gallery's own byte count and the process RSS growth while each
gallery is built; the peak RSS of the whole run is printed at the end (VmHWM).";

fn arg<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .and_then(|v| v.parse().ok())
}

fn main() {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!("{HELP}");
        return;
    }
    let million = std::env::args().any(|a| a == "--million");
    let mut opts = cardpipe_dedup::bench::BenchOptions::new(million);
    if let Some(sizes) = arg::<String>("--sizes") {
        opts.gallery_sizes = sizes.split(',').filter_map(|s| s.parse().ok()).collect();
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
    if std::env::args().any(|a| a == "--fvc-only") {
        match cardpipe_dedup::bench::fvc_report(&opts.fvc_dir) {
            Ok(r) => println!("{r:?}"),
            Err(e) => eprintln!("{e}"),
        }
        return;
    }
    let started = std::time::Instant::now();
    match cardpipe_dedup::bench::run(&opts) {
        Ok(report) => {
            println!("{report}");
            println!(
                "Whole run: {:.1} s wall, peak RSS {:.2} GiB.",
                started.elapsed().as_secs_f64(),
                cardpipe_dedup::bench::peak_rss_bytes().unwrap_or(0) as f64 / (1u64 << 30) as f64
            );
        }
        Err(e) => {
            eprintln!("bench failed: {e}");
            std::process::exit(1);
        }
    }
}
