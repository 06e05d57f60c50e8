//! `cardpipe bench chaos`: a batch through the distributed topology while workers crash, then
//! the invariants (issue 16 item 6, first part).
//!
//! The topology is the benchmark's (topology.rs): PostgreSQL, RabbitMQ, S3, a worker per stage
//! and replica, `cardpipe serve` and the simulated line with encoder faults (dead chips,
//! tearing). A generated batch goes in through the registry API and is released; every
//! `--kill-every` seconds a random process other than the line (any worker, or serve) is
//! SIGKILLed — no shutdown, its in-flight jobs lost to redelivery — and started again a
//! moment later, until the batch rests. Then:
//!
//! * every application of the batch is in an end state (packed, rejected, a possible
//!   duplicate) and no job of any application is parked;
//! * no card was personalized twice: per application, personalizations = QC failures + 1 for
//!   a card that exists (a crash mid-card must be redone on a fresh blank only through the
//!   spoiled path, never silently);
//! * `cardpipe stock report` balances (exit 0) and `cardpipe audit verify` passes (exit 0).
//!
//! Any violation is listed, the processes' logs are kept, and the command exits non-zero.
//! Service faults: the processes reach PostgreSQL, RabbitMQ and the S3 server through a
//! [`FaultProxy`] each (fault_proxy.rs). When a fifth of the batch is at rest RabbitMQ goes
//! away for `--restart-seconds` (every connection cut, reconnects refused: what a restart
//! looks like to a client), at two fifths PostgreSQL does, and at three fifths the object
//! store is out for `--outage-seconds` (30 s). By default the servers themselves, shared with
//! everything else on the machine, are never stopped; `--restart-rabbitmq CMD` and
//! `--restart-postgresql CMD` replace those two cuts with a real restart of the server by a
//! shell command (e.g. `rabbitmqctl stop_app && rabbitmqctl start_app`, `pg_ctlcluster 15 main
//! restart`): the server's own shutdown and recovery, for a run on a machine where nothing
//! else uses it (the CI test keeps the proxies). A command that fails is a violation. A
//! process that exits on its own (a fault it did not ride out) is started again like a
//! supervisor would, and named in the report.
//!
//! A personalize worker SIGKILLed mid-card leaves a half-written card in its encoder; the
//! simulated feeder rejects it once its worker is gone (vpcd.rs), so no encoder starves.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use cardpipe_common::store::Store;
use sqlx::Row;

use crate::bench_pipeline::{END_STATES, parked_count, state_counts, submit};
use crate::fault_proxy::FaultProxy;
use crate::topology::{ServiceAddrs, Topology, TopologySpec};

/// `cardpipe bench chaos`.
#[derive(Debug, clap::Args)]
pub struct BenchChaosArgs {
    /// Applicants in the batch.
    #[arg(long, default_value_t = 200)]
    pub records: usize,
    /// Seconds between two crashes.
    #[arg(long, default_value_t = 5)]
    pub kill_every: u64,
    /// Crashes exactly this many processes (0: one every `--kill-every` seconds until the
    /// batch is at rest): the batch then finishes undisturbed, which bounds a short run's
    /// time on a loaded machine.
    #[arg(long, default_value_t = 0)]
    pub max_kills: usize,
    /// Seconds a crashed process stays down before it is started again.
    #[arg(long, default_value_t = 1)]
    pub down_for: u64,
    /// Encoders on the simulated line.
    #[arg(long, default_value_t = 4)]
    pub encoders: usize,
    /// QC stations on the simulated line.
    #[arg(long, default_value_t = 2)]
    pub qc_stations: usize,
    /// Share of blanks with a dead chip, and share pulled out mid-write (encoder faults).
    #[arg(long, default_value_t = 0.02)]
    pub fault_rate: f64,
    /// Give up (a violation) when no application changed state for this many seconds.
    #[arg(long, default_value_t = 300)]
    pub stall_seconds: u64,
    /// Generator seed.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Stages whose workers are never crashed (comma-separated), e.g. `personalize`.
    #[arg(long, value_delimiter = ',')]
    pub spare: Vec<String>,
    /// How long RabbitMQ and PostgreSQL are each away (their "restart"), in seconds.
    #[arg(long, default_value_t = 5)]
    pub restart_seconds: u64,
    /// How long the object store is out, in seconds.
    #[arg(long, default_value_t = 30)]
    pub outage_seconds: u64,
    /// No service faults: only process crashes and encoder faults.
    #[arg(long)]
    pub no_service_faults: bool,
    /// Restart RabbitMQ for real with this shell command instead of cutting its proxy.
    #[arg(long, value_name = "CMD")]
    pub restart_rabbitmq: Option<String>,
    /// Restart PostgreSQL for real with this shell command instead of cutting its proxy.
    #[arg(long, value_name = "CMD")]
    pub restart_postgresql: Option<String>,
}

/// How a service fault is made.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FaultKind {
    /// The service's proxy cuts every connection and refuses new ones for this long.
    Outage(Duration),
    /// This shell command restarts the server itself.
    Restart(String),
}

impl FaultKind {
    fn describe(&self, service: &str) -> String {
        match self {
            FaultKind::Outage(length) => format!("{service} away {} s", length.as_secs()),
            FaultKind::Restart(command) => format!("{service} restarted (`{command}`)"),
        }
    }
}

/// The service faults of a run, in order: (share of the batch at rest that triggers it, the
/// service, how the fault is made).
fn service_fault_plan(args: &BenchChaosArgs) -> Vec<(f64, &'static str, FaultKind)> {
    if args.no_service_faults {
        return Vec::new();
    }
    let restart = |command: &Option<String>| match command {
        Some(command) => FaultKind::Restart(command.clone()),
        None => FaultKind::Outage(Duration::from_secs(args.restart_seconds)),
    };
    vec![
        (0.2, "rabbitmq", restart(&args.restart_rabbitmq)),
        (0.4, "postgresql", restart(&args.restart_postgresql)),
        (
            0.6,
            "s3",
            FaultKind::Outage(Duration::from_secs(args.outage_seconds)),
        ),
    ]
}

/// Runs a restart command to its end; its failure, or output on standard error, described.
async fn run_restart(service: &'static str, command: String) -> Result<(), String> {
    let started = Instant::now();
    let output = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&command)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("restarting {service}: cannot run `{command}`: {e}"))?;
    if output.status.success() {
        eprintln!(
            "bench chaos: {service} restarted by `{command}` in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    } else {
        Err(format!(
            "restarting {service}: `{command}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// A random index below `n` (v4 UUIDs come from the OS's generator).
fn random_below(n: usize) -> usize {
    let b = uuid::Uuid::new_v4().as_u128();
    (b % n.max(1) as u128) as usize
}

/// Runs the chaos proving ground; an error (non-zero exit) on any violated invariant.
pub async fn run(args: BenchChaosArgs) -> anyhow::Result<()> {
    tokio::select! {
        result = chaos(&args) => result,
        () = crate::process::wait_for_signal() => bail!("interrupted: every process started was stopped"),
    }
}

async fn chaos(args: &BenchChaosArgs) -> anyhow::Result<()> {
    if let Some(unknown) = args
        .spare
        .iter()
        .find(|s| !crate::stages::NAMES.contains(&s.as_str()) && *s != "serve")
    {
        bail!(
            "--spare: unknown stage {unknown:?}; stages: {}, serve",
            crate::stages::NAMES.join(", ")
        );
    }
    if args.records == 0 || args.kill_every == 0 {
        bail!("--records and --kill-every must be at least 1");
    }
    if !(0.0..=0.2).contains(&args.fault_rate) {
        bail!(
            "--fault-rate must be between 0 and 0.2, got {}",
            args.fault_rate
        );
    }
    let rate = args.fault_rate.to_string();
    let proxies = [
        FaultProxy::start(
            "postgresql",
            host_port(&cardpipe_common::testing::postgres_admin_url()),
        )
        .await?,
        FaultProxy::start("rabbitmq", host_port(&cardpipe_common::testing::amqp_url())).await?,
        FaultProxy::start("s3", host_port(&cardpipe_common::testing::s3_endpoint())).await?,
    ];
    let proxies: Vec<std::sync::Arc<FaultProxy>> =
        proxies.into_iter().map(std::sync::Arc::new).collect();
    let proxy = |name: &str| {
        proxies
            .iter()
            .find(|p| p.name() == name)
            .expect("a proxy per service")
            .clone()
    };
    let spec = TopologySpec {
        encoders: args.encoders,
        qc_stations: args.qc_stations.max(1),
        replicas: [("dedup".to_owned(), 2), ("personalize".to_owned(), 1)].into(),
        blanks: (3 * args.records as u64 + 100).max(10_000),
        concurrency: [
            ("personalize".to_owned(), args.encoders.max(4)),
            ("qc".to_owned(), args.qc_stations.max(4)),
        ]
        .into(),
        line_args: vec![
            "--dead-rate".into(),
            rate.clone(),
            "--tear-rate".into(),
            rate,
        ],
        via: Some(ServiceAddrs {
            postgres: proxy("postgresql").addr(),
            rabbitmq: proxy("rabbitmq").addr(),
            s3: proxy("s3").addr(),
        }),
        // The configured throttle: the chaos run checks what survives, not how fast.
        release_per_minute: None,
    };
    eprintln!("bench chaos: starting the distributed topology");
    let mut topology = Topology::distributed(&spec).await?;
    let victims: Vec<String> = topology
        .process_names()
        .into_iter()
        .filter(|n| n != "line")
        .filter(|n| {
            !args.spare.iter().any(|stage| {
                n.strip_prefix(stage.as_str())
                    .is_some_and(|r| r.starts_with('-'))
            })
        })
        .collect();
    if victims.is_empty() {
        bail!("--spare leaves no process to crash");
    }
    let http = reqwest::Client::new();
    let (batch_id, accepted, _, _) = submit(&topology, &http, args.records, args.seed).await?;
    eprintln!(
        "bench chaos: {accepted} applications released; a crash every {} s among {}",
        args.kill_every,
        victims.join(", ")
    );
    let store = Store::connect(&topology.store_url, 2)
        .await
        .context("connecting to the topology's store")?;
    let mut violations = Vec::new();
    let mut plan = service_fault_plan(args).into_iter().peekable();
    let mut outages: Vec<tokio::task::JoinHandle<Result<(), String>>> = Vec::new();
    let mut faults_done: Vec<String> = Vec::new();
    let mut exited: Vec<String> = Vec::new();
    let mut kills = 0usize;
    let mut next_kill = Instant::now() + Duration::from_secs(args.kill_every);
    let mut last = Default::default();
    let mut last_change = Instant::now();
    loop {
        for name in topology.exited() {
            if name == "line" {
                topology.check_alive()?;
            }
            eprintln!("bench chaos: {name} exited on its own; starting it again");
            exited.push(name.clone());
            topology.restart(&name)?;
        }
        let counts = state_counts(&store, &batch_id).await?;
        let parked = parked_count(&store, &batch_id).await?;
        let resting: i64 = counts
            .iter()
            .filter(|(s, _)| END_STATES.contains(&s.as_str()))
            .map(|(_, n)| n)
            .sum();
        // A short run (`--max-kills`) does every crash and every service fault it promises,
        // even when the batch is at rest before them: they then hit idle processes.
        let crashes_done = args.max_kills == 0 || kills >= args.max_kills;
        if resting + parked >= accepted && plan.peek().is_none() && crashes_done {
            break;
        }
        while let Some((share, _, _)) = plan.peek() {
            if (resting + parked) as f64 / accepted as f64 + 1e-9 < *share {
                break;
            }
            let Some((_, service, kind)) = plan.next() else {
                break;
            };
            let what = kind.describe(service);
            eprintln!("bench chaos: {what} ({resting} of {accepted} at rest)");
            faults_done.push(what);
            outages.push(match kind {
                FaultKind::Outage(length) => {
                    let p = proxy(service);
                    tokio::spawn(async move {
                        p.outage(length).await;
                        Ok(())
                    })
                }
                FaultKind::Restart(command) => tokio::spawn(run_restart(service, command)),
            });
        }
        if counts != last {
            last = counts;
            last_change = Instant::now();
        }
        if last_change.elapsed() > Duration::from_secs(args.stall_seconds) {
            violations.push(format!(
                "nothing moved for {} s: states {last:?}, {parked} parked",
                args.stall_seconds
            ));
            break;
        }
        if Instant::now() >= next_kill && (args.max_kills == 0 || kills < args.max_kills) {
            let victim = &victims[random_below(victims.len())];
            topology.kill(victim)?;
            kills += 1;
            eprintln!("bench chaos: SIGKILL {victim} (crash {kills})");
            tokio::time::sleep(Duration::from_secs(args.down_for)).await;
            topology.restart(victim)?;
            next_kill = Instant::now() + Duration::from_secs(args.kill_every);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for outage in outages {
        if let Err(failed) = outage.await? {
            violations.push(failed);
        }
    }
    // Restarted processes must be up again before the checks (their outbox rows flushed).
    for name in topology.exited() {
        exited.push(name.clone());
        topology.restart(&name)?;
    }
    // A process that does not come back after the faults is a violation: its log is kept.
    if let Err(e) = topology.wait_ready(Duration::from_secs(120)).await {
        violations.push(format!("{e:#}"));
    }
    violations.extend(check_invariants(&store, &batch_id, accepted).await?);
    for (name, args) in [
        ("stock-report", ["stock", "report"]),
        ("audit-verify", ["audit", "verify"]),
    ] {
        let (ok, output) = topology.run_command(name, &args).await?;
        if !ok {
            violations.push(format!("cardpipe {} failed:\n{output}", args.join(" ")));
        }
    }
    store.close().await;
    let unclean = topology.stop();
    let cut: Vec<String> = proxies
        .iter()
        .map(|p| format!("{} {}", p.name(), p.connections_cut()))
        .collect();
    eprintln!(
        "bench chaos: service faults: {}; connections cut: {}; processes that exited on their own: {}",
        if faults_done.is_empty() {
            "none".to_owned()
        } else {
            faults_done.join(", ")
        },
        cut.join(", "),
        if exited.is_empty() {
            "none".to_owned()
        } else {
            exited.join(", ")
        },
    );
    eprintln!(
        "bench chaos: {kills} crashes; {} processes did not stop cleanly at the end{}",
        unclean.len(),
        if unclean.is_empty() {
            String::new()
        } else {
            format!(": {}", unclean.join(", "))
        }
    );
    if violations.is_empty() {
        println!(
            "bench chaos: {accepted} applications, {kills} crashes, {} service faults: every \
             invariant holds (all at rest, none parked, no card made twice, stock balanced, \
             audit verified)",
            faults_done.len()
        );
        Ok(())
    } else {
        let kept = topology.keep_work_dir().join("logs");
        bail!(
            "{} invariant violation(s) after {kills} crashes (process logs kept in {}):\n- {}",
            violations.len(),
            kept.display(),
            violations.join("\n- ")
        )
    }
}

/// The `host:port` of a service URL (`postgres://u@h:p/db`, `amqp://...`, `http://h:p`).
fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    rest[..end].to_owned()
}

/// The store-side invariants of the batch; each violation as a sentence.
async fn check_invariants(
    store: &Store,
    batch_id: &str,
    accepted: i64,
) -> anyhow::Result<Vec<String>> {
    let mut violations = Vec::new();
    let counts = state_counts(store, batch_id).await?;
    let total: i64 = counts.values().sum();
    if total != accepted {
        violations.push(format!(
            "{total} applications in the batch, {accepted} accepted"
        ));
    }
    for (state, n) in &counts {
        if !END_STATES.contains(&state.as_str()) {
            violations.push(format!("{n} applications still {state}"));
        }
    }
    let parked: i64 = sqlx::query("SELECT COUNT(*) AS n FROM parked_jobs")
        .fetch_one(store.pool())
        .await?
        .try_get("n")?;
    if parked > 0 {
        violations.push(format!("{parked} jobs parked"));
    }
    let twice = sqlx::query(
        "SELECT a.id AS id,
                SUM(CASE WHEN h.to_state = 'personalized' THEN 1 ELSE 0 END) AS made,
                SUM(CASE WHEN h.to_state = 'qc_failed' THEN 1 ELSE 0 END) AS failed
         FROM applications a JOIN application_history h ON h.application_id = a.id
         WHERE a.batch_id = $1 GROUP BY a.id",
    )
    .bind(batch_id)
    .fetch_all(store.pool())
    .await?;
    let mut made_twice = 0;
    for row in &twice {
        let made: i64 = row.try_get("made")?;
        let failed: i64 = row.try_get("failed")?;
        if made > failed + 1 {
            made_twice += 1;
        }
    }
    if made_twice > 0 {
        violations.push(format!(
            "{made_twice} applications personalized more often than QC failures + 1"
        ));
    }
    Ok(violations)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        chaos: BenchChaosArgs,
    }

    fn args(extra: &[&str]) -> BenchChaosArgs {
        Cli::parse_from(std::iter::once("chaos").chain(extra.iter().copied())).chaos
    }

    #[test]
    fn service_faults_are_proxy_cuts_unless_a_restart_command_is_given() {
        let plan = service_fault_plan(&args(&[]));
        assert_eq!(
            plan,
            vec![
                (0.2, "rabbitmq", FaultKind::Outage(Duration::from_secs(5))),
                (0.4, "postgresql", FaultKind::Outage(Duration::from_secs(5))),
                (0.6, "s3", FaultKind::Outage(Duration::from_secs(30))),
            ]
        );
        let plan = service_fault_plan(&args(&[
            "--restart-rabbitmq",
            "rabbitmqctl stop_app && rabbitmqctl start_app",
            "--restart-postgresql",
            "pg_ctlcluster 15 main restart",
        ]));
        assert_eq!(
            plan[0].2,
            FaultKind::Restart("rabbitmqctl stop_app && rabbitmqctl start_app".into())
        );
        assert_eq!(
            plan[1].2.describe("postgresql"),
            "postgresql restarted (`pg_ctlcluster 15 main restart`)"
        );
        assert_eq!(plan[2].2, FaultKind::Outage(Duration::from_secs(30)));
        assert!(service_fault_plan(&args(&["--no-service-faults"])).is_empty());
    }

    #[tokio::test]
    async fn a_failed_restart_command_is_reported_with_its_error() {
        assert_eq!(run_restart("rabbitmq", "true".into()).await, Ok(()));
        let failed = run_restart("postgresql", "echo no such cluster >&2; exit 3".into())
            .await
            .expect_err("exit 3 is a failure");
        assert!(failed.contains("restarting postgresql"), "{failed}");
        assert!(failed.contains("no such cluster"), "{failed}");
    }
}
