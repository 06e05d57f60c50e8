//! `cardpipe stock receive | report | return | destroy ...`, `cardpipe reprint` and
//! `cardpipe bench qc`.
//!
//! These are the operators' only way to the stock and reprint operations (there is no
//! operator HTTP API): `--operator` must be an enabled console operator (`cardpipe operators
//! list`) who may act; the destruction witness and reprints need a supervisor.

use cardpipe_common::backends;
use cardpipe_common::clock;
use cardpipe_common::config::LoadedConfig;
use cardpipe_common::domain::ApplicationId;
use cardpipe_common::runtime::Services;
use cardpipe_qc::reprint::{self, ReprintReason, Requester};
use cardpipe_qc::stock::{self, NewLot};
use clap::{Args, Subcommand};

/// `cardpipe stock ...`.
#[derive(Debug, Subcommand)]
pub enum StockCommand {
    /// Receive a lot of blank cards into the vault (every serial of the range, audited).
    Receive {
        /// Supplier.
        #[arg(long)]
        supplier: String,
        /// Chip type.
        #[arg(long)]
        chip_type: String,
        /// Serial prefix printed before the 8-digit number.
        #[arg(long, default_value = "BLK-")]
        prefix: String,
        /// First serial number.
        #[arg(long)]
        first: u64,
        /// Last serial number (inclusive).
        #[arg(long)]
        last: u64,
        /// Lot id (generated when absent).
        #[arg(long)]
        lot: Option<String>,
        /// The receiving operator.
        #[arg(long)]
        operator: String,
    },
    /// The reconciliation report (per lot, the day from the journal, cross-checks), as JSON;
    /// exits non-zero when it does not balance.
    Report {
        /// Day (YYYY-MM-DD, UTC); default today.
        #[arg(long)]
        day: Option<String>,
    },
    /// A recalled card came back: consumed → returned.
    Return {
        /// The card body serial.
        serial: String,
        /// Why it came back.
        #[arg(long)]
        reason: String,
        /// The operator.
        #[arg(long)]
        operator: String,
    },
    /// Destruction of spoiled and returned cards: `prepare` (first operator), then `witness`
    /// (a second, different operator).
    Destroy {
        #[command(subcommand)]
        step: DestroyStep,
    },
}

/// Destruction sign-offs.
#[derive(Debug, Subcommand)]
pub enum DestroyStep {
    /// First sign-off: every spoiled and returned card (or the serials given) goes into a
    /// destruction batch.
    Prepare {
        /// The first operator.
        #[arg(long)]
        operator: String,
        /// Only these serials.
        serials: Vec<String>,
    },
    /// Second sign-off: the batch is destroyed.
    Witness {
        /// The destruction batch id.
        id: String,
        /// The second operator (must differ from the first).
        #[arg(long)]
        operator: String,
    },
}

/// `cardpipe reprint`.
#[derive(Debug, Args)]
pub struct ReprintArgs {
    /// The application (cardpipe id).
    pub application_id: String,
    /// damaged, lost_in_transit or data_error.
    #[arg(long)]
    pub reason: String,
    /// The requesting operator.
    #[arg(long)]
    pub operator: String,
}

/// `cardpipe bench qc`.
#[derive(Debug, Args)]
pub struct BenchQcArgs {
    /// Cards to personalize and inspect.
    #[arg(long, default_value_t = 300)]
    pub cards: usize,
    /// Plant a defect (the six kinds in turn) on every n-th card; 0 = none.
    #[arg(long, default_value_t = 5)]
    pub defect_every: usize,
    /// Instead: QC replicas sharing one simulated line (pcscd + vpcd station readers, the
    /// line controller granting stations), cards/s for each replica count and the ratio to
    /// N × one replica. Needs pcscd and vsmartcard-vpcd.
    #[arg(long)]
    pub line: bool,
    /// --line: QC stations on the line.
    #[arg(long, default_value_t = 4)]
    pub stations: usize,
    /// --line: replica counts to run, in order.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 2, 4])]
    pub replicas: Vec<usize>,
    /// --line: job threads per replica.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// --line: cards per replica in each run.
    #[arg(long, default_value_t = 12)]
    pub cards_per_replica: usize,
}

async fn connect(loaded: &LoadedConfig) -> anyhow::Result<Services> {
    let services = backends::connect(
        &loaded.config,
        clock::for_data_dir(&loaded.config.data_dir)?,
    )
    .await?;
    Ok(services)
}

/// Authenticates `login` (`--operator`: a session from `cardpipe login` or the password at
/// the terminal) as an enabled console operator who may act (`supervisor`: and is a
/// supervisor, for `what`).
async fn require_operator(
    services: &Services,
    loaded: &LoadedConfig,
    login: &str,
    supervisor: Option<&str>,
) -> anyhow::Result<()> {
    let op = crate::identity::authenticate(services, loaded, login, "--operator").await?;
    match supervisor {
        Some(what) => op.require_supervisor(what)?,
        None => op.require_act("stock operations")?,
    }
    Ok(())
}

fn print(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Runs a stock command.
pub async fn stock(loaded: LoadedConfig, command: StockCommand) -> anyhow::Result<()> {
    let services = connect(&loaded).await?;
    match command {
        StockCommand::Receive {
            supplier,
            chip_type,
            prefix,
            first,
            last,
            lot,
            operator,
        } => {
            require_operator(&services, &loaded, &operator, None).await?;
            let lot = NewLot {
                lot_id: lot,
                supplier,
                chip_type,
                serial_prefix: prefix,
                first,
                last,
            };
            print(&stock::receive(&services, &lot, &operator).await?)?;
        }
        StockCommand::Report { day } => {
            let day = day
                .map(|d| {
                    time::Date::parse(
                        &d,
                        time::macros::format_description!("[year]-[month]-[day]"),
                    )
                    .map_err(|_| anyhow::anyhow!("--day must be YYYY-MM-DD, got {d:?}"))
                })
                .transpose()?;
            let r = stock::reconcile(&services, day).await?;
            print(&r)?;
            if !r.balanced {
                anyhow::bail!("blank-card stock does not balance: {} cards", r.imbalance);
            }
        }
        StockCommand::Return {
            serial,
            reason,
            operator,
        } => {
            require_operator(&services, &loaded, &operator, None).await?;
            stock::return_card(&services, &serial, &operator, &reason).await?;
            println!("{serial}: returned");
        }
        StockCommand::Destroy { step } => match step {
            DestroyStep::Prepare {
                operator: op,
                serials,
            } => {
                require_operator(&services, &loaded, &op, None).await?;
                let operator = op;
                let list = (!serials.is_empty()).then_some(serials);
                print(&stock::prepare_destruction(&services, &operator, list.as_deref()).await?)?;
            }
            DestroyStep::Witness { id, operator: op } => {
                require_operator(&services, &loaded, &op, Some("witnessing a destruction")).await?;
                let operator = op;
                print(&stock::witness_destruction(&services, &id, &operator).await?)?;
            }
        },
    }
    services.store.close().await;
    Ok(())
}

/// `cardpipe reprint`.
pub async fn reprint(loaded: LoadedConfig, args: ReprintArgs) -> anyhow::Result<()> {
    let reason = ReprintReason::parse(&args.reason).ok_or_else(|| {
        anyhow::anyhow!("--reason must be damaged, lost_in_transit or data_error")
    })?;
    let services = connect(&loaded).await?;
    require_operator(
        &services,
        &loaded,
        &args.operator,
        Some("requesting a reprint"),
    )
    .await?;
    let out = reprint::request(
        &services,
        &ApplicationId(args.application_id),
        reason,
        Requester::Operator(&args.operator),
    )
    .await?;
    print(&out)?;
    services.store.close().await;
    Ok(())
}

/// Set in the re-executed `bench qc --line` process: its simulated machine's directory.
const LINE_DIR_ENV: &str = "CARDPIPE_BENCH_LINE_DIR";

/// `cardpipe bench qc`.
pub fn bench(args: BenchQcArgs) -> anyhow::Result<()> {
    if args.line {
        return bench_line(args);
    }
    eprintln!(
        "bench qc: issuing and personalizing {} cards (a defect on every {}th), then inspecting them",
        args.cards, args.defect_every
    );
    let report = cardpipe_qc::bench::run(args.cards, args.defect_every)?;
    print(&report)?;
    if report.misjudged > 0 {
        anyhow::bail!(
            "{} cards got a verdict other than the defect planted",
            report.misjudged
        );
    }
    Ok(())
}

/// `cardpipe bench qc --line`. pcsc-lite reads `PCSCLITE_CSOCK_NAME` once per process, before
/// the simulated machine's pcscd exists, so the bench re-runs itself with it pointing at the
/// machine's socket (as the PC/SC tests do).
fn bench_line(args: BenchQcArgs) -> anyhow::Result<()> {
    let Some(dir) = std::env::var_os(LINE_DIR_ENV) else {
        cardpipe_card::pcsc::library().map_err(|e| anyhow::anyhow!("bench qc --line: {e}"))?;
        let dir = tempfile::Builder::new()
            .prefix("cardpipe-bench-line-")
            .tempdir()?;
        let status = std::process::Command::new(std::env::current_exe()?)
            .args(std::env::args_os().skip(1))
            .env(LINE_DIR_ENV, dir.path())
            .env("PCSCLITE_CSOCK_NAME", dir.path().join("run/pcscd.comm"))
            .status()?;
        anyhow::ensure!(status.success(), "bench qc --line failed ({status})");
        return Ok(());
    };
    eprintln!(
        "bench qc --line: {} QC stations, replicas {:?} ({} job thread(s) each), {} cards per replica per run (personalized before each run)",
        args.stations, args.replicas, args.concurrency, args.cards_per_replica
    );
    let report = cardpipe_qc::bench::run_line(&cardpipe_qc::bench::LineBench {
        work_dir: dir.into(),
        stations: args.stations,
        replicas: args.replicas,
        concurrency: args.concurrency,
        cards_per_replica: args.cards_per_replica,
        station_timeout: std::time::Duration::from_secs(5),
    })?;
    print(&report)?;
    for r in &report.runs {
        eprintln!(
            "  {} replica(s) x {} thread(s), {} stations: {} cards in {:.1} s = {:.2} cards/s{}",
            r.replicas,
            r.concurrency,
            r.stations,
            r.cards,
            r.seconds,
            r.cards_per_second,
            r.ratio_to_linear
                .map(|x| format!(", {x:.2} x (N x single replica)"))
                .unwrap_or_default()
        );
    }
    let bad: usize = report.runs.iter().map(|r| r.failed).sum();
    if bad > 0 {
        anyhow::bail!("{bad} good cards failed QC at the line");
    }
    Ok(())
}
