//! `cargo run --release -p cardpipe-intake --example bench_intake -- [records] [embedded|distributed]`

use cardpipe_common::testing::Mode;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let records: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(100_000);
    let mode = match args.next().as_deref() {
        Some("distributed") => Mode::Distributed,
        _ => Mode::Embedded,
    };
    let report = cardpipe_intake::bench::bench_intake_on(mode, records).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
