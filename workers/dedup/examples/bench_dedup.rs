//! `cargo run --release -p cardpipe-dedup --example bench_dedup [-- --million]`: the same
//! report `cardpipe bench dedup` prints.
fn main() {
    let million = std::env::args().any(|a| a == "--million");
    let mut opts = cardpipe_dedup::bench::BenchOptions::new(million);
    if let Some(sizes) = std::env::args().skip_while(|a| a != "--sizes").nth(1) {
        opts.gallery_sizes = sizes.split(',').filter_map(|s| s.parse().ok()).collect();
    }
    if std::env::args().any(|a| a == "--fvc-only") {
        match cardpipe_dedup::bench::fvc_report(&opts.fvc_dir) {
            Ok(r) => println!("{r:?}"),
            Err(e) => eprintln!("{e}"),
        }
        return;
    }
    match cardpipe_dedup::bench::run(&opts) {
        Ok(report) => println!("{report}"),
        Err(e) => {
            eprintln!("bench failed: {e}");
            std::process::exit(1);
        }
    }
}
