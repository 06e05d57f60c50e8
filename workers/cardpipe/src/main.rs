//! The `cardpipe` command line.
//!
//! * `cardpipe run` — every stage, the registry API, the console and
//!   `/metrics` in one process (embedded backends unless configured otherwise);
//!   `--demo N` also plays the registry with a generated nightly batch (demo.rs);
//! * `cardpipe worker <stage>` — one stage, for distributed deployment;
//! * `cardpipe serve` — the HTTP side only (API, console, metrics);
//! * `cardpipe migrate` — apply database migrations;
//! * `cardpipe config check` — validate the configuration;
//! * `cardpipe pki init|status|crl|rotate` — the CA hierarchy (pki_cmd.rs);
//! * `cardpipe synth batch` — a generated registry batch (NDJSON) for demos and tests;
//! * `cardpipe bench pki|qc|dedup` — PKI credential sets, QC cards and dedup figures
//!   (accuracy, comparisons/s/core, 1:N latency and recall) (dedup_cmd.rs for dedup);
//!   `cardpipe bench night` — embedded nights of several sizes, apps/s each (bench_night.rs);
//! * `cardpipe bench pipeline` — a batch through the whole pipeline, embedded and distributed,
//!   on processes it starts itself (bench_pipeline.rs on topology.rs); `cardpipe bench chaos`
//!   crashes its workers while a batch runs and checks the invariants (bench_chaos.rs);
//! * `cardpipe audit verify|list`, `cardpipe operators add|list`, `cardpipe ops ...` — the
//!   console's operations on the command line (ops_cmd.rs);
//! * `cardpipe offices clients add|list|revoke` — delivery API clients (offices_cmd.rs);
//! * `cardpipe abis serve` — the MOSIP ABIS API for a MOSIP deployment (abis_cmd.rs).
//!
//! Every process runs an outbox relay (claims make that safe) and serves
//! `/metrics`, `/healthz` and `/readyz`.

mod abis_cmd;
mod bench_chaos;
mod bench_cmd;
mod bench_night;
mod bench_pipeline;
mod context;
mod dedup_cmd;
mod demo;
mod encoders_cmd;
mod fault_proxy;
mod identity;
mod offices_cmd;
mod ops_cmd;
mod pki_cmd;
mod process;
mod qc_cmd;
mod stages;
mod topology;

use std::path::PathBuf;
use std::process::ExitCode;

use cardpipe_common::config::LoadedConfig;
use cardpipe_pki::settings::Provisioning;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cardpipe",
    version,
    about = "National smart ID card production pipeline",
    long_about = "cardpipe moves civil-registry applications through biometric deduplication, \
                  keys and certificates, chip personalization, quality control, shipping, pickup \
                  and voiding. With no configuration it runs on embedded backends under ./var."
)]
struct Cli {
    /// Configuration file (default: ./pipeline.toml when present, else built-in defaults).
    /// Environment variables CARDPIPE__<SECTION>__<KEY> override it.
    #[arg(long, global = true, env = "CARDPIPE_CONFIG")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every stage, the API and the console in one process until ctrl-c / SIGTERM.
    Run {
        /// Also play the registry: submit a generated nightly batch of this many applicants,
        /// release it now and show its progress through every stage.
        #[arg(long, value_name = "APPLICANTS")]
        demo: Option<usize>,
        /// Seed of the generated batch; the same seed resumes the same batch after a restart.
        #[arg(long, default_value_t = 1, requires = "demo")]
        demo_seed: u64,
        /// Speed of the demo's calendar once the batch is packed: simulated days per real
        /// second while it plays the cards' life (dispatch at the cut-off, office receipt,
        /// handovers, reminders, the six-month voiding). 0 stops the demo at packing.
        #[arg(long, default_value_t = 10.0, requires = "demo", value_name = "DAYS")]
        days_per_second: f64,
        /// Exit once the demo has finished (its batch at rest, and its card life if played)
        /// instead of serving until ctrl-c: for benchmarks and scripts (`cardpipe bench night`).
        #[arg(long, requires = "demo")]
        demo_exit: bool,
    },
    /// Run one stage (for distributed deployment; run any number of replicas).
    Worker {
        /// The stage to run.
        stage: String,
    },
    /// Serve the HTTP side only: registry API, operator console, /metrics, /healthz, /readyz.
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// The CA hierarchy: init, status, CRL publication, Document Signer rotation.
    Pki {
        #[command(subcommand)]
        command: pki_cmd::PkiCommand,
    },
    /// Card encoders: `simulate` N virtual encoders behind real pcscd, `bench` the farm.
    Encoders {
        #[command(subcommand)]
        command: encoders_cmd::EncodersCommand,
    },
    /// Synthetic data: `synth batch` writes a registry batch (NDJSON) for demos and tests.
    Synth {
        #[command(subcommand)]
        command: SynthCommand,
    },
    /// The audit log: `verify` the hash chain (exit 1 when broken), `list` entries.
    Audit {
        #[command(subcommand)]
        command: ops_cmd::AuditCommand,
    },
    /// Sign in on this terminal: the password is checked (console sign-in limits) and a
    /// session token (8 h) is kept in the token file (mode 0600) for actions that name
    /// `--as LOGIN`.
    Login {
        /// The operator's login.
        login: String,
    },
    /// Sign out: end the session (all sessions in the token file when no login is named).
    Logout {
        /// The operator's login.
        login: Option<String>,
    },
    /// Console operators: `add`, `list`, `disable`, `enable`, `reset-password` (supervisor,
    /// audited).
    Operators {
        #[command(subcommand)]
        command: ops_cmd::OperatorsCommand,
    },
    /// Operations: status, batches, watch, parked [retry|drop|fail], encoders, adjudications,
    /// stock, shipments. Actions need `--as LOGIN` and are audited.
    Ops(ops_cmd::OpsArgs),
    /// Blank-card stock: receive lots, reconcile, return recalled cards, destroy (two operators).
    Stock {
        #[command(subcommand)]
        command: qc_cmd::StockCommand,
    },
    /// Request a reprint: revoke the old card's certificates, recall it, make a new card.
    Reprint(qc_cmd::ReprintArgs),
    /// Pickup offices: `clients add|list|revoke` — delivery API clients and their tokens.
    Offices {
        #[command(subcommand)]
        command: offices_cmd::OfficesCommand,
    },
    /// The MOSIP ABIS API: `serve` answers MOSIP's insert / identify / delete / ping /
    /// pendingJobs / referenceCount over a RabbitMQ queue pair and HTTP (`[abis]`).
    Abis {
        #[command(subcommand)]
        command: abis_cmd::AbisCommand,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Card credential sets per second per core (software keys; --hsm for PKCS#11).
    Pki(pki_cmd::BenchPkiArgs),
    /// QC: cards per second checked and the share rejected per reason (planted defects).
    Qc(qc_cmd::BenchQcArgs),
    /// Dedup: FVC2002 accuracy, comparisons and codes per second per core, 1:N galleries
    /// (memory per subject, latency, recall, FNIR at FPIR 0.1 %); build with --release.
    Dedup(dedup_cmd::BenchDedupArgs),
    /// Intake: batches received at once (default 3 x 100k records), records/s and peak RSS.
    Intake(bench_cmd::BenchIntakeArgs),
    /// Sign-in: a flood of parallel wrong guesses; password checks run and peak RSS.
    SignIn(bench_cmd::BenchSignInArgs),
    /// Nights of several sizes run embedded, each on a fresh data dir: applications/s to
    /// packing per size and per stage, and the ratio of the largest night's rate to the
    /// smallest's (cost per application flat in the size of the night).
    Night(bench_night::BenchNightArgs),
    /// The whole pipeline: one generated batch through the registry API on a topology this
    /// command starts (embedded `cardpipe run`, and distributed workers on PostgreSQL,
    /// RabbitMQ, S3 and a simulated line); apps/s per stage and end to end.
    Pipeline(bench_pipeline::BenchPipelineArgs),
    /// Chaos: a batch through the distributed topology while random workers are SIGKILLed and
    /// restarted, on a line with encoder faults; exits non-zero on any violated invariant.
    Chaos(bench_chaos::BenchChaosArgs),
}

#[derive(Debug, Subcommand)]
enum SynthCommand {
    /// Write a registry batch: valid applicants (Persian names, valid national codes, ten
    /// ISO/IEC 19794-2 templates, a portrait), optionally one record of every bad kind.
    Batch {
        /// Valid applicants.
        #[arg(long, default_value_t = 100)]
        records: usize,
        /// Seed (the same seed writes the same batch).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Also write one record of every kind the registry contract rejects, and list what
        /// each must be rejected for in `<out>.expected.json`.
        #[arg(long)]
        bad: bool,
        /// Distinct persons behind the applicants (fewer than --records enrols some twice,
        /// for deduplication); default: one per applicant.
        #[arg(long)]
        persons: Option<usize>,
        /// Enrolment date (YYYY-MM-DD); default: today in Tehran.
        #[arg(long)]
        applied_on: Option<String>,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the configuration; every problem names the key and the file or
    /// environment variable it came from.
    Check,
}

fn load(config: Option<&std::path::Path>) -> Result<LoadedConfig, ExitCode> {
    let loaded = LoadedConfig::load(config).map_err(|errors| report(&errors))?;
    let names = stages::names(&loaded);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let errors = loaded.check(&names, stages::SECTIONS);
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(report(&errors))
    }
}

/// `cardpipe synth batch`.
fn synth_batch(
    records: usize,
    seed: u64,
    bad: bool,
    persons: Option<usize>,
    applied_on: Option<&str>,
    out: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use std::io::Write;
    let applied_on = match applied_on {
        Some(text) => time::Date::parse(
            text,
            time::macros::format_description!("[year]-[month]-[day]"),
        )
        .map_err(|_| anyhow::anyhow!("--applied-on must be a date as YYYY-MM-DD, got {text:?}"))?,
        None => cardpipe_intake::intake::tehran_today(time::OffsetDateTime::now_utc()),
    };
    let spec = cardpipe_registry::synth::SynthSpec {
        seed,
        records,
        bad,
        applied_on,
        distinct_persons: persons.unwrap_or(records).max(1),
    };
    let expectations = match out {
        Some(path) => {
            let file = std::fs::File::create(path)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
            let mut writer = std::io::BufWriter::new(file);
            let expectations = cardpipe_registry::synth::write_batch(&spec, &mut writer)?;
            writer.flush()?;
            expectations
        }
        None => {
            let stdout = std::io::stdout();
            let mut writer = std::io::BufWriter::new(stdout.lock());
            let expectations = cardpipe_registry::synth::write_batch(&spec, &mut writer)?;
            writer.flush()?;
            expectations
        }
    };
    if let (Some(path), true) = (out, bad) {
        let listed: Vec<_> = expectations
            .iter()
            .map(|e| {
                serde_json::json!({
                    "line": e.line,
                    "kind": e.kind.kind,
                    "field": e.kind.field,
                    "accepted_flagged": e.kind.accepted_flagged,
                })
            })
            .collect();
        let expected = path.with_extension("expected.json");
        std::fs::write(&expected, serde_json::to_vec_pretty(&listed)?)?;
        eprintln!("wrote {} and {}", path.display(), expected.display());
    }
    Ok(())
}

fn report(errors: &[cardpipe_common::config::ConfigError]) -> ExitCode {
    eprintln!("configuration is invalid:");
    for e in errors {
        eprintln!("  - {e}");
    }
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut loaded = match load(cli.config.as_deref()) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    if let Command::Config {
        command: ConfigCommand::Check,
    } = cli.command
    {
        if let Err(e) = stages::check_sections(&loaded) {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
        println!("configuration OK");
        println!("  store:   {}", process::describe_store(&loaded.config));
        println!("  broker:  {:?}", loaded.config.broker.kind);
        println!("  objects: {:?}", loaded.config.objects.kind);
        println!("  http:    {}", loaded.config.http.listen);
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run {
                demo,
                demo_seed,
                days_per_second,
                demo_exit,
            } => {
                if !(days_per_second.is_finite() && (0.0..=1000.0).contains(&days_per_second)) {
                    anyhow::bail!(
                        "--days-per-second must be between 0 (no card life) and 1000, not {days_per_second}"
                    );
                }
                if demo.is_some() {
                    // The citizens' messages of the demo's card life, readable without a
                    // gateway (names and mobile numbers masked).
                    let outbox = loaded.config.data_dir.join(demo::SMS_OUTBOX);
                    loaded.default_if_empty("delivery.sms.log_file", &outbox.to_string_lossy());
                }
                let demo = demo.map(|records| demo::DemoSpec {
                    records,
                    seed: demo_seed,
                    days_per_second,
                    exit_when_done: demo_exit,
                    console_url: format!("http://{}/", loaded.config.http.listen),
                });
                let names = stages::names(&loaded);
                process::run(loaded, names, true, demo, Provisioning::Create).await
            }
            Command::Worker { stage } => {
                let known = stages::names(&loaded);
                if !known.contains(&stage) {
                    anyhow::bail!(
                        "unknown stage {stage:?}; known stages: {}",
                        if known.is_empty() {
                            "(none yet)".to_owned()
                        } else {
                            known.join(", ")
                        }
                    );
                }
                if loaded.config.broker.kind == cardpipe_common::config::BrokerKind::Memory {
                    // An in-process broker is private to this process: a worker on it would
                    // never receive another process's work nor hand its own on.
                    anyhow::bail!(
                        "`cardpipe worker {stage}` needs a broker shared with the other processes, \
                         but [broker] kind is \"memory\" (in-process). Set \
                         CARDPIPE__BROKER__KIND=rabbitmq and CARDPIPE__BROKER__URL=amqp://..., \
                         and a shared store (CARDPIPE__STORE__URL=postgres://...) — see \
                         README \"Running distributed\" — or run every stage in one process \
                         with `cardpipe run`."
                    );
                }
                // A worker is always one of several processes: it opens the PKI material
                // `cardpipe pki init` made and never generates its own.
                process::run(loaded, vec![stage], false, None, Provisioning::OpenOnly).await
            }
            Command::Serve => {
                // Beside workers on a shared broker, `serve` is one service of a distributed
                // deployment and likewise only opens the PKI material.
                let provisioning =
                    if loaded.config.broker.kind == cardpipe_common::config::BrokerKind::Memory {
                        Provisioning::Create
                    } else {
                        Provisioning::OpenOnly
                    };
                process::run(loaded, Vec::new(), true, None, provisioning).await
            }
            Command::Migrate => process::migrate(loaded).await,
            Command::Abis { command } => abis_cmd::run(loaded, command).await,
            Command::Pki { command } => pki_cmd::run(loaded, command).await,
            Command::Bench {
                command: BenchCommand::Pki(args),
            } => pki_cmd::bench(&loaded, args),
            Command::Encoders { command } => encoders_cmd::run(loaded, command).await,
            Command::Audit { command } => ops_cmd::audit_cmd(loaded, command).await,
            Command::Operators { command } => ops_cmd::operators_cmd(loaded, command).await,
            Command::Login { login } => ops_cmd::login_cmd(loaded, &login).await,
            Command::Logout { login } => ops_cmd::logout_cmd(loaded, login.as_deref()).await,
            Command::Ops(args) => ops_cmd::ops_cmd(loaded, args, stages::NAMES).await,
            Command::Stock { command } => qc_cmd::stock(loaded, command).await,
            Command::Reprint(args) => qc_cmd::reprint(loaded, args).await,
            Command::Offices { command } => offices_cmd::run(loaded, command).await,
            Command::Bench {
                command: BenchCommand::Qc(args),
            } => qc_cmd::bench(args),
            Command::Bench {
                command: BenchCommand::Dedup(args),
            } => dedup_cmd::bench(args),
            Command::Bench {
                command: BenchCommand::Intake(args),
            } => bench_cmd::intake(args).await,
            Command::Bench {
                command: BenchCommand::SignIn(args),
            } => bench_cmd::sign_in(args).await,
            Command::Bench {
                command: BenchCommand::Night(args),
            } => bench_night::run(cli.config.as_deref(), args).await,
            Command::Bench {
                command: BenchCommand::Pipeline(args),
            } => bench_pipeline::run(args).await,
            Command::Bench {
                command: BenchCommand::Chaos(args),
            } => bench_chaos::run(args).await,
            Command::Synth {
                command:
                    SynthCommand::Batch {
                        records,
                        seed,
                        bad,
                        persons,
                        applied_on,
                        out,
                    },
            } => synth_batch(
                records,
                seed,
                bad,
                persons,
                applied_on.as_deref(),
                out.as_deref(),
            ),
            Command::Config { .. } => unreachable!("handled above"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
