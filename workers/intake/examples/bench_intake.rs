//! `cargo run --release -p cardpipe-intake --example bench_intake -- [records] [embedded|distributed]`
//! `cargo run --release -p cardpipe-intake --example bench_intake -- parallel SUBMISSIONS RECORDS [embedded|distributed]`

use cardpipe_common::testing::Mode;

fn mode(arg: Option<String>) -> Mode {
    match arg.as_deref() {
        Some("distributed") => Mode::Distributed,
        _ => Mode::Embedded,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("parallel") {
        args.next();
        let submissions: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(3);
        let records: usize = args
            .next()
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(100_000);
        let report =
            cardpipe_intake::bench::bench_intake_parallel(mode(args.next()), submissions, records)
                .await?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let records: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(100_000);
    let report = cardpipe_intake::bench::bench_intake_on(mode(args.next()), records).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
