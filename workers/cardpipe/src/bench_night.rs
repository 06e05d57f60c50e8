//! `cardpipe bench night`: does the cost of an application grow with the size of the night?
//! (issue 16 item 7).
//!
//! For each size (default 2,000 then 20,000 applicants) the bench starts this same binary as
//! `cardpipe run --demo N --days-per-second 0 --demo-exit` in a fresh data dir: every stage in
//! one process on the embedded backends (SQLite, in-process broker, fs objects), fed a
//! generated nightly batch through the intake path, stopped at packing. Each night runs in a
//! child process of its own so nothing (gallery, caches, pools, metrics) carries over from one
//! size to the next. When the child has exited, the bench reads its database:
//!
//! * **rate**: applications packed / (last packing − first release), the release scheduler's
//!   first move out of `received` (so generating and receiving the batch, which `cardpipe
//!   bench intake` measures, is not counted);
//! * **per stage**: transitions each stage recorded and their rate between that stage's first
//!   and last transition — in a pipeline every stage downstream of the slowest one runs at
//!   the slowest one's pace, so the stage whose rate drops with the size is the one to look at;
//! * **steady rate**: applications packed per second between the 10th and the 90th
//!   percentile of the packings, so neither the pipeline filling up at the start nor a
//!   night stopped early by `--max-minutes` (whose count leaves out every application still
//!   in the pipeline) weighs on it;
//! * **ratio**: the largest night's steady rate over the smallest's (the issue asks ≥ 0.8).
//!
//! The embedded default lot of blanks is sized to the night (`[stock] auto_lot_size` =
//! applicants + 10 % + 1,000): one lot received before the night instead of one every 10,000
//! cards in the middle of it.
//!
//! The release scheduler's throttle (`[registry] release_per_minute`, 2,000 by default) would
//! cap both nights at the same rate and hide the stages' cost; the bench lifts it unless
//! `--release-per-minute` is given. Compare sizes within one run only: the machine's load
//! moves absolute figures between runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use cardpipe_common::store::Store;
use serde::Serialize;
use sqlx::Row;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// `cardpipe bench night`.
#[derive(Debug, clap::Args)]
pub struct BenchNightArgs {
    /// Night sizes (valid applicants), comma-separated; each runs on a fresh data dir.
    #[arg(long, value_delimiter = ',', default_values_t = [2000usize, 20000])]
    pub records: Vec<usize>,
    /// Seed of the generated batches.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Applications released per minute (`[registry] release_per_minute`); default: no
    /// throttle, so the stages set the pace.
    #[arg(long)]
    pub release_per_minute: Option<u32>,
    /// Where the nights' data dirs are created (default: the system temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the data dirs (their paths are printed) for inspection or profiling.
    #[arg(long)]
    pub keep: bool,
    /// Stop a night that has not come to rest after this many minutes (the process is
    /// killed, which loses nothing) and report the figures of what it packed so far, marked
    /// incomplete: on a loaded machine a large night can take hours.
    #[arg(long, value_name = "MINUTES")]
    pub max_minutes: Option<f64>,
}

/// One stage's share of a night.
#[derive(Debug, Serialize)]
struct StageFigures {
    stage: String,
    transitions: i64,
    seconds: f64,
    per_second: f64,
}

/// One night.
#[derive(Debug, Serialize)]
struct NightFigures {
    records: usize,
    packed: i64,
    /// From the first release to the last packing.
    seconds: f64,
    apps_per_second: f64,
    /// Packed per second between the 10th and 90th percentile of the packings.
    steady_apps_per_second: f64,
    /// The child process from start to exit (generation and intake included).
    wall_seconds: f64,
    /// False when the night was stopped by `--max-minutes` before it came to rest: the
    /// figures are those of the applications packed until then.
    complete: bool,
    states: BTreeMap<String, i64>,
    stages: Vec<StageFigures>,
}

/// Runs every size and prints the figures (a table on stderr, JSON on stdout).
pub async fn run(config: Option<&Path>, args: BenchNightArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.records.is_empty() && args.records.iter().all(|&n| n > 0),
        "--records needs at least one night size above 0, e.g. --records 2000,20000"
    );
    let exe = std::env::current_exe().context("finding the cardpipe binary to run the nights")?;
    let mut nights = Vec::new();
    for &records in &args.records {
        let dir = match &args.dir {
            Some(parent) => tempfile::Builder::new()
                .prefix("night-")
                .tempdir_in(parent)
                .with_context(|| format!("creating a data dir in {}", parent.display()))?,
            None => tempfile::Builder::new()
                .prefix("cardpipe-night-")
                .tempdir()?,
        };
        eprintln!(
            "bench night: {records} applicants in {} (embedded, stopped at packing)",
            dir.path().display()
        );
        let night = run_night(&exe, config, &args, records, dir.path()).await?;
        print_night(&night);
        nights.push(night);
        if args.keep {
            eprintln!("bench night: kept {}", dir.keep().display());
        }
    }
    let ratio = match (nights.first(), nights.last()) {
        (Some(small), Some(large)) if nights.len() > 1 && small.steady_apps_per_second > 0.0 => {
            let ratio = large.steady_apps_per_second / small.steady_apps_per_second;
            eprintln!(
                "bench night: steady rates: {} applicants at {:.2}/s, {} at {:.2}/s: ratio {ratio:.2} (the issue asks >= 0.8)",
                small.records,
                small.steady_apps_per_second,
                large.records,
                large.steady_apps_per_second
            );
            Some(ratio)
        }
        _ => None,
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({ "nights": nights, "ratio": ratio }))?
    );
    Ok(())
}

async fn run_night(
    exe: &Path,
    config: Option<&Path>,
    args: &BenchNightArgs,
    records: usize,
    dir: &Path,
) -> anyhow::Result<NightFigures> {
    let data = dir.join("var");
    let url = format!("sqlite:{}", data.join("cardpipe.db").display());
    let mut command = tokio::process::Command::new(exe);
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    let release = args.release_per_minute.unwrap_or(1_000_000);
    command
        .args(["run", "--demo", &records.to_string()])
        .args(["--demo-seed", &args.seed.to_string()])
        .args(["--days-per-second", "0", "--demo-exit"])
        .current_dir(dir)
        .env("CARDPIPE__DATA_DIR", &data)
        .env("CARDPIPE__STORE__URL", &url)
        // Any free port: the bench must not collide with a cardpipe already serving.
        .env("CARDPIPE__HTTP__LISTEN", "127.0.0.1:0")
        .env(
            "CARDPIPE__REGISTRY__RELEASE_PER_MINUTE",
            release.to_string(),
        )
        // One automatic blank lot that covers the night (`[stock] auto_lot_size`, 10,000 by
        // default, would receive a lot every 10,000 cards).
        .env(
            "CARDPIPE__STOCK__AUTO_LOT_SIZE",
            (records + records / 10 + 1_000).to_string(),
        )
        .kill_on_drop(true);
    let started = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let budget = args
        .max_minutes
        .filter(|m| m.is_finite() && *m > 0.0)
        .map(|m| std::time::Duration::from_secs_f64(m * 60.0));
    let status = match budget {
        Some(budget) => match tokio::time::timeout(budget, child.wait()).await {
            Ok(status) => Some(status?),
            Err(_) => {
                eprintln!(
                    "bench night: {records} applicants: stopped after {:.0} minutes (--max-minutes); figures of what was packed until then",
                    budget.as_secs_f64() / 60.0
                );
                child.kill().await.context("stopping the night")?;
                None
            }
        },
        None => Some(child.wait().await?),
    };
    let wall_seconds = started.elapsed().as_secs_f64();
    if let Some(status) = status {
        anyhow::ensure!(
            status.success(),
            "the night of {records} applicants failed ({status}); its log is {}",
            data.join("cardpipe.log").display()
        );
    }
    let store = Store::connect(&url, 1)
        .await
        .with_context(|| format!("opening the night's database {url}"))?;
    let figures = read_figures(&store, records, wall_seconds, status.is_some()).await;
    store.close().await;
    figures
}

fn parse_at(text: &str) -> anyhow::Result<OffsetDateTime> {
    OffsetDateTime::parse(text, &Rfc3339)
        .with_context(|| format!("history timestamp {text:?} is not RFC 3339"))
}

fn seconds_between(first: &str, last: &str) -> anyhow::Result<f64> {
    Ok((parse_at(last)? - parse_at(first)?).as_seconds_f64())
}

async fn read_figures(
    store: &Store,
    records: usize,
    wall_seconds: f64,
    complete: bool,
) -> anyhow::Result<NightFigures> {
    let pool = store.pool();
    let mut states = BTreeMap::new();
    for row in sqlx::query("SELECT state, COUNT(*) AS n FROM applications GROUP BY state")
        .fetch_all(pool)
        .await?
    {
        states.insert(row.try_get::<String, _>("state")?, row.try_get("n")?);
    }
    let released: Option<String> =
        sqlx::query_scalar("SELECT MIN(at) FROM application_history WHERE from_state = 'received'")
            .fetch_one(pool)
            .await?;
    let packing = sqlx::query(
        "SELECT COUNT(*) AS n, MAX(at) AS last FROM application_history WHERE to_state = 'packed'",
    )
    .fetch_one(pool)
    .await?;
    let packed: i64 = packing.try_get("n")?;
    let last_packed: Option<String> = packing.try_get("last")?;
    let seconds = match (&released, &last_packed) {
        (Some(first), Some(last)) => seconds_between(first, last)?,
        _ => 0.0,
    };
    anyhow::ensure!(
        packed > 0 && seconds > 0.0,
        "the night of {records} applicants packed no card (states: {states:?})"
    );
    let packings: Vec<String> = sqlx::query_scalar(
        "SELECT at FROM application_history WHERE to_state = 'packed' ORDER BY at",
    )
    .fetch_all(pool)
    .await?;
    let (low, high) = (packings.len() / 10, packings.len() * 9 / 10);
    let steady_apps_per_second = match (packings.get(low), packings.get(high)) {
        (Some(first), Some(last)) if high > low => {
            let span = seconds_between(first, last)?;
            if span > 0.0 {
                (high - low) as f64 / span
            } else {
                0.0
            }
        }
        _ => 0.0,
    };
    let mut stages = Vec::new();
    for row in sqlx::query(
        "SELECT stage, COUNT(*) AS n, MIN(at) AS first, MAX(at) AS last
         FROM application_history WHERE from_state IS NOT NULL
         GROUP BY stage ORDER BY MIN(at)",
    )
    .fetch_all(pool)
    .await?
    {
        let transitions: i64 = row.try_get("n")?;
        let span = seconds_between(
            &row.try_get::<String, _>("first")?,
            &row.try_get::<String, _>("last")?,
        )?;
        stages.push(StageFigures {
            stage: row.try_get("stage")?,
            transitions,
            seconds: span,
            per_second: if span > 0.0 {
                transitions as f64 / span
            } else {
                0.0
            },
        });
    }
    Ok(NightFigures {
        records,
        packed,
        seconds,
        apps_per_second: packed as f64 / seconds,
        steady_apps_per_second,
        wall_seconds,
        complete,
        states,
        stages,
    })
}

fn print_night(night: &NightFigures) {
    eprintln!(
        "bench night: {} applicants{}: {} packed in {:.1} s from the first release: {:.2} applications/s, steady {:.2}/s (child process {:.1} s in all)",
        night.records,
        if night.complete {
            ""
        } else {
            " (stopped early)"
        },
        night.packed,
        night.seconds,
        night.apps_per_second,
        night.steady_apps_per_second,
        night.wall_seconds
    );
    for s in &night.stages {
        eprintln!(
            "  {:<28} {:>7} transitions in {:>8.1} s  {:>8.2}/s",
            s.stage, s.transitions, s.seconds, s.per_second
        );
    }
}
