//! Runtime soak worker and throughput benchmark over the test stages.
//!
//! * `runtime-soak work` — runs the two test stages against the target named
//!   by `CARDPIPE_SOAK_*` until SIGTERM (the crash test kills it with SIGKILL);
//! * `runtime-soak bench <embedded|distributed> <jobs> [concurrency]` — pushes
//!   `jobs` applications through both stages and prints jobs/s.

use std::time::{Duration, Instant};

use cardpipe_common::domain::ApplicationState;
use cardpipe_common::runtime::pipeline;
use cardpipe_common::runtime::relay::Relay;
use cardpipe_common::testing::{self, Mode};
use cardpipe_tests::{SoakTarget, count_in, seed, test_stages};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("work") => work().await,
        Some("bench") => {
            let mode = match args.get(2).map(String::as_str) {
                Some("embedded") => Mode::Embedded,
                Some("distributed") => Mode::Distributed,
                _ => anyhow::bail!(
                    "usage: runtime-soak bench <embedded|distributed> <jobs> [concurrency]"
                ),
            };
            let jobs: usize = args.get(3).map_or(Ok(5000), |s| s.parse())?;
            let concurrency: usize = args.get(4).map_or(Ok(8), |s| s.parse())?;
            bench(mode, jobs, concurrency).await
        }
        _ => anyhow::bail!(
            "usage: runtime-soak work | runtime-soak bench <embedded|distributed> <jobs> [concurrency]"
        ),
    }
}

async fn work() -> anyhow::Result<()> {
    let target = SoakTarget::from_env()?;
    let services = target.connect().await?;
    let relay = Relay::new(services.clone())
        .with_poll_interval(Duration::from_millis(50))
        .with_claim(Duration::from_secs(2));
    let running =
        pipeline::start(&services, test_stages(8), relay, Duration::from_secs(10)).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    term.recv().await;
    running.shutdown().await
}

async fn bench(mode: Mode, jobs: usize, concurrency: usize) -> anyhow::Result<()> {
    let (services, _guard) = testing::services(mode, None).await;
    seed(&services, jobs).await?;
    let relay = Relay::new(services.clone()).with_poll_interval(Duration::from_millis(20));
    let started = Instant::now();
    let running = pipeline::start(
        &services,
        test_stages(concurrency),
        relay,
        Duration::from_secs(10),
    )
    .await?;
    while count_in(&services, ApplicationState::KeysIssued).await? < jobs as i64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    running.shutdown().await?;
    let handoffs = jobs * 2;
    println!(
        "mode={mode:?} applications={jobs} stage_jobs={handoffs} concurrency={concurrency} elapsed={:.2}s \
         throughput={:.0} stage-jobs/s ({:.0} applications/s through both stages)",
        took.as_secs_f64(),
        handoffs as f64 / took.as_secs_f64(),
        jobs as f64 / took.as_secs_f64(),
    );
    Ok(())
}
