//! `cardpipe bench pipeline`: one night's batch through the whole pipeline, embedded and
//! distributed, on a topology this command starts itself (topology.rs).
//!
//! Per mode: start the topology, submit `--records` generated applicants through the
//! registry API (the real entry point: `POST /api/v1/batches`, then release now), wait until
//! every application of the batch is in an end state (packed or later, rejected, a possible
//! duplicate waiting for an operator) or parked, then read the figures from the store:
//!
//! * per stage, from `application_history`: an application enters a stage when the previous
//!   transition lands it in that stage's input state and leaves it at the stage's own
//!   transition; the stage's rate is the applications it moved over the window from the first
//!   entry to the last exit, with the median and 95th percentile of entry → exit (queue wait
//!   plus work) — where time goes;
//! * the peak count of applications waiting in each state (sampled every second): the queue
//!   in front of the stage that takes that state;
//! * end to end: applications at rest over the release asked for → last end state.
//!
//! A table goes to stderr, the report as JSON to stdout (both modes and the ratio). No
//! figure is asserted: speed is measured here, tests only check that the report adds up.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use cardpipe_common::store::Store;
use serde::Serialize;
use serde_json::json;
use sqlx::Row;

use crate::topology::{Topology, TopologySpec};

/// `cardpipe bench pipeline`.
#[derive(Debug, clap::Args)]
pub struct BenchPipelineArgs {
    /// Valid applicants in the batch (about 2 % of them enrolled twice, for dedup to find).
    #[arg(long, default_value_t = 2000)]
    pub records: usize,
    /// Modes to run, in this order: `embedded`, `distributed` or both (comma-separated).
    #[arg(long, default_value = "embedded,distributed", value_delimiter = ',')]
    pub mode: Vec<Mode>,
    /// Distributed: worker processes per stage, e.g. `dedup=2,qc=2` (others get one).
    #[arg(long, value_delimiter = ',', value_parser = parse_replica)]
    pub replicas: Vec<(String, usize)>,
    /// Encoders: in-process (embedded) or virtual PC/SC readers on the simulated line.
    #[arg(long, default_value_t = 8)]
    pub encoders: usize,
    /// Distributed: QC station readers on the simulated line (at least 1).
    #[arg(long, default_value_t = 4)]
    pub qc_stations: usize,
    /// Jobs one process handles at once per stage, e.g. `personalize=8,qc=8` (default:
    /// personalize as many as --encoders, QC as many as --qc-stations, at least 4; other
    /// stages `[stage_defaults]`). Applied in both modes.
    #[arg(long, value_delimiter = ',', value_parser = parse_concurrency)]
    pub concurrency: Vec<(String, usize)>,
    /// Generator seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Applications released per minute (`[registry] release_per_minute`); default: no
    /// throttle, so the stages set the pace (at the configured 2,000 a minute the release
    /// alone caps a run at 33 applications/s).
    #[arg(long)]
    pub release_per_minute: Option<u32>,
    /// Give up when no application changed state for this many seconds.
    #[arg(long, default_value_t = 300)]
    pub stall_seconds: u64,
}

/// A topology to run the batch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One `cardpipe run` (SQLite, in-process broker and encoders).
    Embedded,
    /// PostgreSQL, RabbitMQ, S3, a worker per stage and replica, the simulated line.
    Distributed,
}

fn parse_replica(text: &str) -> Result<(String, usize), String> {
    parse_stage_count("--replicas", text, 16)
}

fn parse_concurrency(text: &str) -> Result<(String, usize), String> {
    parse_stage_count("--concurrency", text, 64)
}

/// `stage=count` with a known stage and 1 ≤ count ≤ `max`.
fn parse_stage_count(flag: &str, text: &str, max: usize) -> Result<(String, usize), String> {
    let (stage, n) = text
        .split_once('=')
        .ok_or_else(|| format!("{flag} takes stage=count, got {text:?}"))?;
    if !crate::stages::NAMES.contains(&stage) {
        return Err(format!(
            "{flag}: unknown stage {stage:?}; stages: {}",
            crate::stages::NAMES.join(", ")
        ));
    }
    let n: usize = n
        .parse()
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| format!("{flag} {stage}: the count must be 1 to {max}, got {n:?}"))?;
    Ok((stage.to_owned(), n))
}

/// States where an application of the batch rests when no operator acts: its card is packed
/// (or further on), or it is refused, or it waits for a duplicate adjudication.
pub(crate) const END_STATES: &[&str] = &[
    "packed",
    "shipped",
    "at_office",
    "in_transit",
    "collected",
    "voided",
    "rejected",
    "possible_duplicate",
    "confirmed_duplicate",
    "cancelled",
];

/// One stage's figures.
#[derive(Debug, Serialize)]
pub struct StageFigures {
    /// The stage name as recorded in the history (`release`, `dedup`, `keys`, ...).
    pub stage: String,
    /// Transitions the stage made (a card remade after QC counts again).
    pub transitions: u64,
    /// Distinct applications it moved.
    pub applications: u64,
    /// Seconds from the release asked for to the first entry into the stage.
    pub first_entry_s: f64,
    /// Seconds from the release to the stage's last exit.
    pub last_exit_s: f64,
    /// Transitions per second over first entry → last exit.
    pub apps_per_s: f64,
    /// Median entry → exit (queue wait plus work), seconds.
    pub p50_s: f64,
    /// 95th percentile entry → exit, seconds.
    pub p95_s: f64,
}

/// One mode's report.
#[derive(Debug, Serialize)]
pub struct ModeReport {
    pub mode: Mode,
    pub records: usize,
    /// What intake accepted (the batch's applications).
    pub accepted: i64,
    /// Seconds to submit the batch through the registry API.
    pub submit_s: f64,
    /// Applications per end state, and `parked` (applications with a parked job).
    pub states: BTreeMap<String, i64>,
    pub parked: i64,
    /// The release asked for (`PUT .../schedule`) → last end state, seconds.
    pub release_to_end_s: f64,
    /// Applications at rest per second over that window.
    pub end_to_end_apps_per_s: f64,
    /// Per stage, in order of first entry.
    pub stages: Vec<StageFigures>,
    /// Most applications seen waiting in each non-final state at once (sampled each second).
    pub peak_waiting: BTreeMap<String, i64>,
    /// The processes the topology ran.
    pub processes: Vec<String>,
    /// Busy CPU time of the whole machine (every process: the topology, PostgreSQL,
    /// RabbitMQ, the S3 server, pcscd) from the release to the last end state, in
    /// core-seconds, from `/proc/stat` (absent where there is none). Meaningful only on a
    /// machine that runs nothing else.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine_cpu_s: Option<f64>,
    /// `machine_cpu_s` per application at rest, in milliseconds: what one application costs
    /// the machine in this mode, whatever the number of cores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine_cpu_ms_per_application: Option<f64>,
    /// Distributed: the RabbitMQ queue prefix of the run (its queues are deleted at the end).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_prefix: Option<String>,
}

/// Runs the benchmark; ctrl-c or SIGTERM stops it and every process it started.
pub async fn run(args: BenchPipelineArgs) -> anyhow::Result<()> {
    tokio::select! {
        result = bench(&args) => result,
        () = crate::process::wait_for_signal() => bail!("interrupted: every process started was stopped"),
    }
}

async fn bench(args: &BenchPipelineArgs) -> anyhow::Result<()> {
    if args.records == 0 {
        bail!("--records must be at least 1");
    }
    if args.mode.is_empty() {
        bail!("--mode names no mode (embedded, distributed)");
    }
    if !(1..=32).contains(&args.encoders) {
        bail!("--encoders must be 1 to 32, got {}", args.encoders);
    }
    if args.mode.contains(&Mode::Distributed) && args.qc_stations == 0 {
        // A QC worker reads cards from a station of the line: without stations it would wait
        // for a tray that only an in-process personalize stage fills.
        bail!(
            "--qc-stations must be at least 1 in distributed mode (QC workers read cards at the line's stations)"
        );
    }
    let spec = TopologySpec {
        encoders: args.encoders,
        qc_stations: args.qc_stations,
        replicas: args.replicas.iter().cloned().collect(),
        // Room for every card twice (QC remakes) and a margin.
        blanks: (2 * args.records as u64 + 100).max(10_000),
        line_args: Vec::new(),
        via: None,
        release_per_minute: Some(args.release_per_minute.unwrap_or(1_000_000)),
        concurrency: {
            let mut c = BTreeMap::from([
                ("personalize".to_owned(), args.encoders.max(4)),
                ("qc".to_owned(), args.qc_stations.max(4)),
            ]);
            c.extend(args.concurrency.iter().cloned());
            c
        },
    };
    let mut reports = Vec::new();
    for mode in &args.mode {
        eprintln!(
            "bench pipeline: {} records, {mode:?}: starting the topology",
            args.records
        );
        let topology = match mode {
            Mode::Embedded => Topology::embedded(&spec).await?,
            Mode::Distributed => Topology::distributed(&spec).await?,
        };
        let report = one_mode(*mode, topology, args).await?;
        print_table(&report);
        reports.push(report);
    }
    let ratio = match (
        reports.iter().find(|r| r.mode == Mode::Embedded),
        reports.iter().find(|r| r.mode == Mode::Distributed),
    ) {
        (Some(e), Some(d)) if e.end_to_end_apps_per_s > 0.0 => {
            let r = d.end_to_end_apps_per_s / e.end_to_end_apps_per_s;
            eprintln!(
                "distributed / embedded end to end: {:.2} / {:.2} apps/s = {r:.2}",
                d.end_to_end_apps_per_s, e.end_to_end_apps_per_s
            );
            if let (Some(dc), Some(ec)) = (
                d.machine_cpu_ms_per_application,
                e.machine_cpu_ms_per_application,
            ) {
                eprintln!(
                    "machine CPU per application: distributed {dc:.1} / embedded {ec:.1} core-ms = {:.2}",
                    dc / ec
                );
            }
            Some(r)
        }
        _ => None,
    };
    let out = json!({
        "records": args.records,
        "encoders": args.encoders,
        "qc_stations": args.qc_stations,
        "replicas": spec.replicas,
        "concurrency": spec.concurrency,
        "modes": reports,
        "distributed_over_embedded": ratio,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// Submits, releases and waits for the batch on `topology`, then measures it.
async fn one_mode(
    mode: Mode,
    mut topology: Topology,
    args: &BenchPipelineArgs,
) -> anyhow::Result<ModeReport> {
    let http = reqwest::Client::new();
    let (batch_id, accepted, submit_s, released_at) =
        submit(&topology, &http, args.records, args.seed).await?;
    eprintln!("bench pipeline: batch of {accepted} accepted in {submit_s:.1} s; released now");
    let cpu_at_release = machine_busy_seconds();
    let store = Store::connect(&topology.store_url, 2)
        .await
        .context("connecting to the topology's store")?;
    let bar = indicatif::ProgressBar::new(accepted.max(0) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} at rest  {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut peak_waiting: BTreeMap<String, i64> = BTreeMap::new();
    let mut last = BTreeMap::new();
    let mut last_change = Instant::now();
    let (states, parked) = loop {
        topology.check_alive()?;
        let counts = state_counts(&store, &batch_id).await?;
        let parked = parked_count(&store, &batch_id).await?;
        for (state, n) in &counts {
            if !END_STATES.contains(&state.as_str()) {
                let peak = peak_waiting.entry(state.clone()).or_default();
                *peak = (*peak).max(*n);
            }
        }
        let resting: i64 = counts
            .iter()
            .filter(|(s, _)| END_STATES.contains(&s.as_str()))
            .map(|(_, n)| n)
            .sum();
        bar.set_position((resting + parked).max(0) as u64);
        bar.set_message(
            counts
                .iter()
                .map(|(s, n)| format!("{s} {n}"))
                .collect::<Vec<_>>()
                .join(" · "),
        );
        if counts != last {
            last = counts.clone();
            last_change = Instant::now();
        }
        if resting + parked >= accepted {
            bar.finish();
            break (counts, parked);
        }
        if last_change.elapsed() > Duration::from_secs(args.stall_seconds) {
            bar.abandon();
            bail!(
                "{mode:?}: nothing moved for {} s; states {last:?}, {parked} parked (process logs kept in {})",
                args.stall_seconds,
                topology.keep_work_dir().join("logs").display()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let machine_cpu_s = match (cpu_at_release, machine_busy_seconds()) {
        (Some(start), Some(end)) => Some(end - start),
        _ => None,
    };
    let (stages, release_to_end_s) = stage_figures(&store, &batch_id, released_at).await?;
    store.close().await;
    let at_rest: i64 = states
        .iter()
        .filter(|(s, _)| END_STATES.contains(&s.as_str()))
        .map(|(_, n)| n)
        .sum();
    let processes = topology.process_names();
    let queue_prefix = topology.queue_prefix().map(str::to_owned);
    let unclean = topology.stop();
    if !unclean.is_empty() {
        eprintln!(
            "bench pipeline: processes that did not stop cleanly: {}",
            unclean.join(", ")
        );
    }
    Ok(ModeReport {
        mode,
        records: args.records,
        accepted,
        submit_s,
        states,
        parked,
        release_to_end_s,
        end_to_end_apps_per_s: if release_to_end_s > 0.0 {
            at_rest as f64 / release_to_end_s
        } else {
            0.0
        },
        stages,
        peak_waiting,
        processes,
        machine_cpu_s,
        machine_cpu_ms_per_application: machine_cpu_s
            .filter(|_| at_rest > 0)
            .map(|s| s * 1000.0 / at_rest as f64),
        queue_prefix,
    })
}

/// The generated batch through `POST /api/v1/batches`, then released now; (batch id,
/// accepted, seconds to submit, when the release was asked for).
pub(crate) async fn submit(
    topology: &Topology,
    http: &reqwest::Client,
    records: usize,
    seed: u64,
) -> anyhow::Result<(String, i64, f64, time::OffsetDateTime)> {
    let today = cardpipe_intake::intake::tehran_today(time::OffsetDateTime::now_utc());
    // As `cardpipe run --demo`: about 2 % of the applicants re-enrol earlier ones.
    let duplicates = if records < 10 {
        0
    } else {
        (records / 50).max(1)
    };
    let generator = cardpipe_registry::synth::Generator::new(cardpipe_registry::synth::SynthSpec {
        seed,
        records,
        bad: false,
        applied_on: today,
        distinct_persons: (records - duplicates).max(1),
    });
    let mut body = Vec::new();
    for n in 0..generator.total_lines() {
        body.extend_from_slice(generator.line(n).0.as_bytes());
        body.push(b'\n');
    }
    let started = Instant::now();
    // The same idempotency key on every try: a retried submission is the same batch.
    let key = format!("bench-{}", uuid::Uuid::new_v4());
    let body = bytes::Bytes::from(body);
    let mut tries = 0;
    let report: serde_json::Value = loop {
        tries += 1;
        let response = http
            .post(format!("{}/api/v1/batches", topology.base_url))
            .bearer_auth(&topology.registry_token)
            .header("idempotency-key", &key)
            .header("content-type", "application/x-ndjson")
            .body(body.clone())
            .send()
            .await
            .context("submitting the batch")?;
        let status = response.status();
        let text = response.text().await.context("the batch report")?;
        if status.is_success() {
            break serde_json::from_str(&text)
                .with_context(|| format!("the batch report is not JSON: {text:?}"))?;
        }
        // Busy (429) or not ready (503), e.g. just after a restart: the same key again.
        let transient = status.as_u16() == 429 || status.is_server_error();
        if !transient || tries >= 10 {
            bail!("the registry API refused the batch ({status}): {text}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let submit_s = started.elapsed().as_secs_f64();
    let released_at = time::OffsetDateTime::now_utc();
    let batch_id = report["batch_id"]
        .as_str()
        .context("the batch report has no batch_id")?
        .to_owned();
    let accepted = report["accepted"].as_i64().unwrap_or(0);
    let scheduled = http
        .put(format!(
            "{}/api/v1/batches/{batch_id}/schedule",
            topology.base_url
        ))
        .bearer_auth(&topology.registry_token)
        .json(&json!({ "release_at": "now" }))
        .send()
        .await
        .context("releasing the batch")?;
    if !scheduled.status().is_success() {
        bail!(
            "the registry API refused to release the batch ({}): {}",
            scheduled.status(),
            scheduled.text().await.unwrap_or_default()
        );
    }
    Ok((batch_id, accepted, submit_s, released_at))
}

pub(crate) async fn state_counts(
    store: &Store,
    batch_id: &str,
) -> anyhow::Result<BTreeMap<String, i64>> {
    let rows = sqlx::query(
        "SELECT state, COUNT(*) AS n FROM applications WHERE batch_id = $1 GROUP BY state",
    )
    .bind(batch_id)
    .fetch_all(store.pool())
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("state")?, r.try_get("n")?)))
        .collect()
}

/// Applications of the batch with a parked job (not in an end state).
pub(crate) async fn parked_count(store: &Store, batch_id: &str) -> anyhow::Result<i64> {
    let row = sqlx::query(
        "SELECT COUNT(DISTINCT p.subject) AS n FROM parked_jobs p
         JOIN applications a ON a.id = p.subject WHERE a.batch_id = $1",
    )
    .bind(batch_id)
    .fetch_one(store.pool())
    .await?;
    Ok(row.try_get("n")?)
}

/// Per-stage figures and release → last end state, from the batch's history.
///
/// Times count from `released_at`, when the bench asked for the release (the processes are
/// on this machine: one clock); the release stage's entry is that moment, not the
/// application's creation at intake.
async fn stage_figures(
    store: &Store,
    batch_id: &str,
    released_at: time::OffsetDateTime,
) -> anyhow::Result<(Vec<StageFigures>, f64)> {
    let rows = sqlx::query(
        "SELECT h.application_id, h.stage, h.from_state, h.to_state, h.at
         FROM application_history h JOIN applications a ON a.id = h.application_id
         WHERE a.batch_id = $1 ORDER BY h.application_id, h.id",
    )
    .bind(batch_id)
    .fetch_all(store.pool())
    .await?;
    struct Hist {
        app: String,
        stage: String,
        from: Option<String>,
        to: String,
        at: f64,
    }
    let rows: Vec<Hist> = rows
        .iter()
        .map(|r| {
            let at: String = r.try_get("at")?;
            let at = cardpipe_common::clock::from_rfc3339(&at)
                .map_err(|e| anyhow::anyhow!("history timestamp {at:?}: {e}"))?;
            Ok(Hist {
                app: r.try_get("application_id")?,
                stage: r.try_get("stage")?,
                from: r.try_get("from_state")?,
                to: r.try_get("to_state")?,
                at: at.unix_timestamp_nanos() as f64 / 1e9,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let release = released_at.unix_timestamp_nanos() as f64 / 1e9;
    let end = rows
        .iter()
        .filter(|r| END_STATES.contains(&r.to.as_str()) && r.from.is_some())
        .map(|r| r.at)
        .fold(release, f64::max);
    struct Acc {
        first: f64,
        last: f64,
        spans: Vec<f64>,
        apps: std::collections::BTreeSet<String>,
    }
    let mut per_stage: BTreeMap<String, Acc> = BTreeMap::new();
    for pair in rows.windows(2) {
        let (prev, row) = (&pair[0], &pair[1]);
        if prev.app != row.app || row.from.is_none() {
            continue;
        }
        let entered = if row.from.as_deref() == Some("received") {
            prev.at.max(release)
        } else {
            prev.at
        };
        let acc = per_stage.entry(row.stage.clone()).or_insert_with(|| Acc {
            first: f64::INFINITY,
            last: f64::NEG_INFINITY,
            spans: Vec::new(),
            apps: Default::default(),
        });
        acc.first = acc.first.min(entered);
        acc.last = acc.last.max(row.at);
        acc.spans.push((row.at - entered).max(0.0));
        acc.apps.insert(row.app.clone());
    }
    let mut stages: Vec<StageFigures> = per_stage
        .into_iter()
        .map(|(stage, mut acc)| {
            acc.spans.sort_by(f64::total_cmp);
            let pct = |p: f64| {
                let i = ((acc.spans.len() as f64 - 1.0) * p).round() as usize;
                acc.spans.get(i).copied().unwrap_or(0.0)
            };
            let window = acc.last - acc.first;
            let n = acc.spans.len() as u64;
            StageFigures {
                stage,
                transitions: n,
                applications: acc.apps.len() as u64,
                first_entry_s: acc.first - release,
                last_exit_s: acc.last - release,
                apps_per_s: if window > 0.0 { n as f64 / window } else { 0.0 },
                p50_s: pct(0.5),
                p95_s: pct(0.95),
            }
        })
        .collect();
    stages.sort_by(|a, b| a.first_entry_s.total_cmp(&b.first_entry_s));
    Ok((stages, end - release))
}

fn print_table(report: &ModeReport) {
    let mut table = comfy_table::Table::new();
    table.set_header([
        "stage",
        "transitions",
        "apps",
        "first in (s)",
        "last out (s)",
        "apps/s",
        "p50 (s)",
        "p95 (s)",
    ]);
    for s in &report.stages {
        table.add_row([
            s.stage.clone(),
            s.transitions.to_string(),
            s.applications.to_string(),
            format!("{:.1}", s.first_entry_s),
            format!("{:.1}", s.last_exit_s),
            format!("{:.2}", s.apps_per_s),
            format!("{:.2}", s.p50_s),
            format!("{:.2}", s.p95_s),
        ]);
    }
    eprintln!(
        "\n{:?}: {} accepted (submitted in {:.1} s); end to end {:.2} apps/s over {:.1} s; states {:?}; parked {}",
        report.mode,
        report.accepted,
        report.submit_s,
        report.end_to_end_apps_per_s,
        report.release_to_end_s,
        report.states,
        report.parked
    );
    if let (Some(cpu), Some(per_app)) =
        (report.machine_cpu_s, report.machine_cpu_ms_per_application)
    {
        eprintln!(
            "machine CPU: {cpu:.1} core-s busy ({:.2} cores on average), {per_app:.1} core-ms per application",
            if report.release_to_end_s > 0.0 {
                cpu / report.release_to_end_s
            } else {
                0.0
            }
        );
    }
    eprintln!("{table}");
    eprintln!("peak waiting per state: {:?}\n", report.peak_waiting);
}

/// Busy core-seconds of the whole machine since boot: `/proc/stat`'s first line, user, nice,
/// system, irq and softirq (not idle, iowait, or steal — time a hypervisor gave to another
/// guest; guest time is already inside user). `None` off Linux.
fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    busy_seconds(stat.lines().next()?)
}

fn busy_seconds(cpu_line: &str) -> Option<f64> {
    let mut fields = cpu_line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<u64> = fields
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if ticks.len() < 5 {
        return None;
    }
    let busy: u64 = ticks
        .iter()
        .enumerate()
        .filter(|(i, _)| ![3, 4, 7].contains(i))
        .map(|(_, t)| t)
        .sum();
    // USER_HZ: 100 on every Linux architecture cardpipe builds for.
    Some(busy as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    use super::busy_seconds;

    #[test]
    fn busy_time_leaves_out_idle_and_iowait() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let line = "cpu  1000 50 300 90000 700 10 20 5 0 0";
        assert_eq!(busy_seconds(line), Some(13.8));
        assert_eq!(busy_seconds("cpu0 1 2 3 4 5"), None, "a per-core line");
        assert_eq!(busy_seconds("cpu  1 x 3 4 5"), None, "not a number");
        assert_eq!(busy_seconds("cpu  1 2"), None, "too short");
    }
}
