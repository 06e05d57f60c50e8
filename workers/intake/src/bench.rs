//! The intake benchmark: a synthetic batch streamed through
//! [`crate::intake::submit_batch`] (generated line by line, never held whole),
//! reporting records/s and the process's peak RSS.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use cardpipe_common::clock::{Clock, SystemClock};
use cardpipe_common::runtime::Services;
use cardpipe_common::testing::{self, Mode};
use futures::StreamExt;
use serde::Serialize;

use crate::intake;
use cardpipe_registry::config::RegistryConfig;
use cardpipe_registry::synth::{Generator, spec};

/// Figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Backend family.
    pub mode: String,
    /// Records submitted.
    pub records: usize,
    /// Accepted.
    pub accepted: i64,
    /// Rejected.
    pub rejected: i64,
    /// Wall time of the submission (s).
    pub seconds: f64,
    /// Accepted records per second.
    pub records_per_second: f64,
    /// Peak resident set size of the process (KiB, VmHWM), before and after.
    pub peak_rss_kib_before: u64,
    /// Peak resident set size of the process (KiB, VmHWM) after the run.
    pub peak_rss_kib_after: u64,
    /// Bytes of NDJSON streamed.
    pub body_bytes: u64,
}

/// VmHWM of this process in KiB (0 where /proc is unavailable).
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// Streams `records` synthetic records into fresh backends of `mode`.
pub async fn bench_intake_on(mode: Mode, records: usize) -> anyhow::Result<BenchReport> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let (services, _guard) = testing::services(mode, Some(clock)).await;
    run(&services, mode, records).await
}

/// Streams `records` synthetic records into fresh embedded backends.
pub async fn bench_intake(records: usize) -> anyhow::Result<BenchReport> {
    bench_intake_on(Mode::Embedded, records).await
}

/// Figures of `submissions` batches received at once by one process.
#[derive(Debug, Clone, Serialize)]
pub struct ParallelReport {
    /// Backend family.
    pub mode: String,
    /// Batches submitted at once.
    pub submissions: usize,
    /// Records per batch.
    pub records_per_batch: usize,
    /// Accepted, all batches.
    pub accepted: i64,
    /// Wall time until the last batch was received (s).
    pub seconds: f64,
    /// Accepted records per second, all batches.
    pub records_per_second: f64,
    /// Peak RSS of the process before the run (KiB, VmHWM): backends open, nothing received.
    pub peak_rss_kib_before: u64,
    /// Peak RSS of the process after the run (KiB, VmHWM).
    pub peak_rss_kib_after: u64,
    /// NDJSON bytes streamed, all batches.
    pub body_bytes: u64,
}

/// Streams `submissions` synthetic batches of `records` each at once into fresh backends of
/// `mode`, with the shipped `[registry.intake]` bounds: the process's peak RSS says what
/// parallel submissions cost.
pub async fn bench_intake_parallel(
    mode: Mode,
    submissions: usize,
    records: usize,
) -> anyhow::Result<ParallelReport> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let (services, _guard) = testing::services(mode, Some(clock)).await;
    let before = peak_rss_kib();
    let started = Instant::now();
    let runs = futures::future::try_join_all((0..submissions).map(|n| {
        let services = services.clone();
        async move { submit(&services, 7 + n as u64, &format!("bench-{n}"), records).await }
    }))
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    let accepted: i64 = runs.iter().map(|(s, _)| s.report.accepted).sum();
    Ok(ParallelReport {
        mode: format!("{mode:?}"),
        submissions,
        records_per_batch: records,
        accepted,
        seconds,
        records_per_second: accepted as f64 / seconds,
        peak_rss_kib_before: before,
        peak_rss_kib_after: peak_rss_kib(),
        body_bytes: runs.iter().map(|(_, bytes)| bytes).sum(),
    })
}

async fn run(services: &Services, mode: Mode, records: usize) -> anyhow::Result<BenchReport> {
    let before = peak_rss_kib();
    let started = Instant::now();
    let (submission, body_bytes) = submit(services, 7, "bench-1", records).await?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(BenchReport {
        mode: format!("{mode:?}"),
        records,
        accepted: submission.report.accepted,
        rejected: submission.report.rejected,
        seconds,
        records_per_second: submission.report.accepted as f64 / seconds,
        peak_rss_kib_before: before,
        peak_rss_kib_after: peak_rss_kib(),
        body_bytes,
    })
}

/// One synthetic batch (seed `seed`) generated line by line as it is sent; returns the
/// submission and the bytes streamed.
async fn submit(
    services: &Services,
    seed: u64,
    key: &str,
    records: usize,
) -> anyhow::Result<(intake::Submission, u64)> {
    let cfg = RegistryConfig::default();
    let today = intake::tehran_today(services.clock.now());
    let generator = Arc::new(Generator::new(spec(seed, records, false, today)));
    let total = generator.total_lines();
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = sent.clone();
    // 64 lines per body chunk, produced on demand.
    let body = futures::stream::iter((0..total).step_by(64))
        .map(move |start| {
            let mut buf = String::new();
            for n in start..(start + 64).min(total) {
                buf.push_str(&generator.line(n).0);
                buf.push('\n');
            }
            counter.fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
            Ok::<_, std::io::Error>(Bytes::from(buf))
        })
        .boxed();
    let submission = intake::submit_batch(services, &cfg, "bench", key, body).await?;
    Ok((submission, sent.load(std::sync::atomic::Ordering::Relaxed)))
}
