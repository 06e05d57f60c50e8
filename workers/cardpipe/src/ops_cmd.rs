//! `cardpipe audit`, `cardpipe operators` and `cardpipe ops`: the console's operations on the
//! command line, with readable tables and a progress bar while watching batches.
//!
//! Reading needs only database access. Actions name the operator with `--as LOGIN` (an
//! operator in the `operators` table): the role is checked and the action audited exactly
//! as in the console.

use std::io::Read;
use std::time::Duration;

use cardpipe_common::audit;
use cardpipe_common::backends;
use cardpipe_common::clock;
use cardpipe_common::config::LoadedConfig;
use cardpipe_common::runtime::Services;
use cardpipe_common::runtime::parked;
use cardpipe_console::auth::{self, Operator, Role};
use cardpipe_console::{actions, data};
use cardpipe_pki::checkpoint;

use crate::identity;
use clap::Subcommand;
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{Cell, CellAlignment, ContentArrangement, Table};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// `cardpipe audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Walk the whole hash chain and check it against the newest signed checkpoint; exit
    /// status 1 and every problem listed when an entry was edited or removed, the log ends
    /// before the checkpoint (truncated, tail cut), was rewritten, or a checkpoint is forged.
    Verify {
        /// Verify checkpoints with the public keys in this directory (written by
        /// `cardpipe audit export-keys`) instead of opening the keystore / HSM.
        #[arg(long, value_name = "DIR")]
        keys: Option<std::path::PathBuf>,
    },
    /// Write the public half of every checkpoint signing key to DIR
    /// (`audit-checkpoint-<n>.pem`), for auditors who verify without the HSM.
    ExportKeys {
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Sign a checkpoint of the chain's head now (the API process does it on a schedule and at
    /// shutdown).
    Checkpoint,
    /// Add the next checkpoint signing key (`audit-checkpoint-<n+1>`) to the keystore; later
    /// checkpoints use it, earlier ones still verify under theirs. Supervisor only; audited.
    RotateKey {
        /// The supervisor rotating (authenticated: `cardpipe login` or a password prompt).
        #[arg(long = "as", value_name = "LOGIN")]
        by: String,
    },
    /// The newest entries, optionally about one subject.
    List {
        /// Only entries about this subject (application id, job id, login...).
        #[arg(long)]
        subject: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
}

/// `cardpipe operators ...`
#[derive(Debug, Subcommand)]
pub enum OperatorsCommand {
    /// Add an operator (a supervisor, `--as`; only the very first operator may be added
    /// without one). The password is read from standard input (one line) or, with
    /// --generate, generated and printed once.
    Add {
        /// Login (a-z, 0-9, '.', '_', '-').
        login: String,
        /// operator, supervisor or auditor.
        #[arg(long)]
        role: String,
        /// Generate a random password and print it once.
        #[arg(long)]
        generate: bool,
        /// The supervisor adding it (authenticated: `cardpipe login` or a password prompt).
        #[arg(long = "as", env = "CARDPIPE_OPERATOR")]
        by: Option<String>,
    },
    /// List operators and roles.
    List,
    /// Disable an operator: sign-in refused and every session ended at once (supervisor).
    Disable {
        /// Login.
        login: String,
        /// Why (audited).
        #[arg(long)]
        reason: String,
        /// The supervisor doing it.
        #[arg(long = "as", env = "CARDPIPE_OPERATOR")]
        by: String,
    },
    /// Enable a disabled operator again (supervisor).
    Enable {
        /// Login.
        login: String,
        /// Why (audited).
        #[arg(long)]
        reason: String,
        /// The supervisor doing it.
        #[arg(long = "as", env = "CARDPIPE_OPERATOR")]
        by: String,
    },
    /// Set a new password (standard input, one line, or --generate) and end the operator's
    /// sessions (supervisor).
    ResetPassword {
        /// Login.
        login: String,
        /// Generate a random password and print it once.
        #[arg(long)]
        generate: bool,
        /// The supervisor doing it.
        #[arg(long = "as", env = "CARDPIPE_OPERATOR")]
        by: String,
    },
}

/// `cardpipe ops ...` (`discrepancies`, `discrepancy-resolve`: office discrepancies)
#[derive(Debug, clap::Args)]
pub struct OpsArgs {
    /// The operator doing it (needed for actions; checked against the operators table).
    #[arg(long = "as", global = true, env = "CARDPIPE_OPERATOR")]
    pub operator: Option<String>,
    #[command(subcommand)]
    pub command: OpsCommand,
}

/// What `cardpipe ops` does.
#[derive(Debug, Subcommand)]
pub enum OpsCommand {
    /// Applications per state, queue depths, throughput, parked work.
    Status,
    /// Batches and their progress.
    Batches {
        /// How many (newest first).
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// Progress bars of batches until their applications rest (or ctrl-c).
    Watch {
        /// One batch (default: the five newest).
        batch: Option<String>,
        /// Refresh interval, milliseconds.
        #[arg(long, default_value_t = 1000)]
        every_ms: u64,
        /// Stop after this many refreshes (default: until everything rests).
        #[arg(long)]
        rounds: Option<u64>,
    },
    /// Parked work: list, or retry / drop / fail one job.
    Parked {
        #[command(subcommand)]
        action: Option<ParkedAction>,
    },
    /// Encoders: status, yield and throughput; take one out of service or back.
    Encoders {
        #[command(subcommand)]
        action: Option<EncoderAction>,
    },
    /// Possible duplicates waiting for an operator.
    Adjudications,
    /// Stock and quality control tables (when the QC stage's tables exist).
    Stock,
    /// Shipments and office discrepancy tables (when the delivery stage's tables exist).
    Shipments,
    /// Office discrepancies (missing or extra cards at box receipt), open ones first.
    Discrepancies {
        /// Only open (unresolved) discrepancies.
        #[arg(long)]
        open: bool,
    },
    /// Resolve an office discrepancy (supervisor): a missing card `found` or `lost` (revoked,
    /// reprint requested: lost in transit), an extra card `returned`.
    DiscrepancyResolve {
        /// Discrepancy id (see `cardpipe ops discrepancies`).
        id: String,
        /// found, lost or returned.
        #[arg(long)]
        outcome: String,
        /// What happened (recorded with the resolution and in the audit log).
        #[arg(long)]
        note: String,
    },
    /// Give a card whose fingerprint attempts of today at handover are used up
    /// ([delivery] handover_attempts_per_day) new attempts (supervisor; audited).
    HandoverUnlock {
        /// The application id of the card.
        application_id: String,
    },
    /// Dispatch every packed card now, in a shipment of its own, without waiting for the
    /// cut-off ([delivery] dispatch_cutoff); the day's run still ships what is packed later
    /// (supervisor; audited as delivery.dispatch_now).
    Dispatch {
        /// Required: say that the dispatch happens now.
        #[arg(long)]
        now: bool,
    },
    /// Citizen messages (SMS): list them, or send a failed or unsent one again (supervisor;
    /// audited). Unsent ones (no gateway then) go out by themselves once a gateway is set.
    Sms {
        #[command(subcommand)]
        action: Option<SmsAction>,
    },
    /// Outbox dead letters (deliveries the relay gave up on): list, or re-queue / discard
    /// one (supervisor; audited).
    DeadLetters {
        #[command(subcommand)]
        action: Option<DeadLetterAction>,
    },
}

/// Actions on citizen messages (SMS).
#[derive(Debug, Subcommand)]
pub enum SmsAction {
    /// List messages, newest first (the default): kind, state, attempts, why not sent.
    List {
        /// Only messages in this state (pending, sent, unsent, failed, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Send a failed or unsent message again (supervisor; audited as sms.resend).
    Resend {
        /// Message id (first column of the list).
        id: String,
    },
}

/// Actions on outbox dead letters.
#[derive(Debug, Subcommand)]
pub enum DeadLetterAction {
    /// List dead letters, newest first (the default).
    List {
        /// How many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Put a dead letter back into the outbox, to be delivered again (supervisor).
    Requeue {
        /// Dead letter number (first column of the list).
        seq: i64,
    },
    /// Delete a dead letter for good (supervisor).
    Discard {
        /// Dead letter number (first column of the list).
        seq: i64,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
    },
}

/// Actions on parked work.
#[derive(Debug, Subcommand)]
pub enum ParkedAction {
    /// List parked jobs (the default).
    List,
    /// Send a parked job back to its stage.
    Retry {
        /// Job id.
        job: String,
    },
    /// Drop a parked job (supervisor).
    Drop {
        /// Job id.
        job: String,
        /// Why.
        #[arg(long)]
        reason: String,
    },
    /// Force-fail: drop the job and end the application (supervisor).
    Fail {
        /// Job id.
        job: String,
        /// Why.
        #[arg(long)]
        reason: String,
    },
}

/// Actions on encoders.
#[derive(Debug, Subcommand)]
pub enum EncoderAction {
    /// List encoders (the default).
    List,
    /// Take an encoder out of service.
    Out {
        /// Encoder (reader) name.
        name: String,
        /// Why.
        #[arg(long)]
        reason: String,
    },
    /// Return an encoder to service.
    In {
        /// Encoder (reader) name.
        name: String,
        /// Why.
        #[arg(long)]
        reason: String,
    },
}

async fn connect(loaded: &LoadedConfig) -> anyhow::Result<Services> {
    // Quiet logs: the tables are the output.
    backends::connect(
        &loaded.config,
        clock::for_data_dir(&loaded.config.data_dir)?,
    )
    .await
}

fn new_table(headers: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(headers.iter().map(Cell::new));
    t
}

fn num(n: impl ToString) -> Cell {
    Cell::new(n.to_string()).set_alignment(CellAlignment::Right)
}

/// `cardpipe audit`.
pub async fn audit_cmd(loaded: LoadedConfig, command: AuditCommand) -> anyhow::Result<()> {
    let services = connect(&loaded).await?;
    match command {
        AuditCommand::Verify { keys } => {
            let found = match keys {
                Some(dir) => {
                    let verifier = checkpoint::Verifier::from_dir(&dir)?;
                    checkpoint::newest_with(&services, &verifier).await?
                }
                None => {
                    let pki = cardpipe_pki::settings::open_loaded(&loaded)?;
                    checkpoint::newest(&services, pki.keystore().as_ref()).await?
                }
            };
            let anchor = found
                .newest
                .as_ref()
                .map(checkpoint::SignedCheckpoint::anchor);
            let report = audit::verify_against(&services.store, anchor.as_ref()).await?;
            let problems: Vec<String> = found
                .bad
                .iter()
                .map(ToString::to_string)
                .chain(report.problems.iter().map(ToString::to_string))
                .collect();
            let anchored = match &found.newest {
                Some(c) => format!(
                    "checked against the signed checkpoint of entry {} ({}, key {}; {} stored)",
                    c.seq, c.at, c.key_label, found.stored
                ),
                None => "no signed checkpoint yet: a cut tail would not show (the API process signs one every runtime.audit_checkpoint_seconds and at shutdown; `cardpipe audit checkpoint` signs one now)".to_owned(),
            };
            if problems.is_empty() {
                println!(
                    "audit log intact: {} entries, every hash and link checks; {anchored}",
                    report.entries
                );
                Ok(())
            } else {
                println!(
                    "audit log BROKEN ({} entries read, {} problems; {anchored}):",
                    report.entries,
                    problems.len()
                );
                for p in &problems {
                    println!("  - {p}");
                }
                Err(anyhow::anyhow!(
                    "the audit chain does not verify ({} problems)",
                    problems.len()
                ))
            }
        }
        AuditCommand::ExportKeys { out } => {
            let pki = cardpipe_pki::settings::open_loaded(&loaded)?;
            let written = checkpoint::export_public_keys(pki.keystore().as_ref(), &out)?;
            if written.is_empty() {
                println!("no checkpoint key yet (the first checkpoint creates it)");
            }
            for path in written {
                println!("  {}", path.display());
            }
            Ok(())
        }
        AuditCommand::Checkpoint => {
            let pki = cardpipe_pki::settings::open_loaded(&loaded)?;
            match checkpoint::write(&services, pki.keystore()).await? {
                Some(c) => println!(
                    "signed the checkpoint of entry {} with {} ({})",
                    c.seq,
                    c.key_label,
                    c.object_key()
                ),
                None => println!(
                    "nothing to sign: the chain's head already has a checkpoint (or the log is empty)"
                ),
            }
            Ok(())
        }
        AuditCommand::RotateKey { by } => {
            let op = identity::authenticate(&services, &loaded, &by, "--as").await?;
            op.require_supervisor("rotating the audit checkpoint key")?;
            let pki = cardpipe_pki::settings::open_loaded(&loaded)?;
            let previous = checkpoint::current_key(pki.keystore().as_ref())?;
            let label = checkpoint::rotate_key(pki.keystore().as_ref())?;
            audit::record(
                &services.store,
                services.clock.as_ref(),
                &audit::AuditEvent {
                    actor: &op.login,
                    role: op.role.as_str(),
                    action: "audit.rotate_checkpoint_key",
                    subject: &label,
                    details: serde_json::json!({ "previous": previous }),
                },
            )
            .await?;
            // The rotation is itself vouched for at once, under the new key.
            if let Err(err) = checkpoint::write(&services, pki.keystore()).await {
                println!("warning: no checkpoint signed under the new key yet: {err}");
            }
            println!(
                "new checkpoint key {label}; earlier checkpoints still verify under {}",
                previous.as_deref().unwrap_or("(none)")
            );
            Ok(())
        }
        AuditCommand::List { subject, limit } => {
            let entries =
                audit::recent(&services.store, subject.as_deref(), limit.clamp(1, 10_000)).await?;
            let mut t = new_table(&["#", "at", "actor", "role", "action", "subject", "details"]);
            for e in entries {
                t.add_row(vec![
                    num(e.seq),
                    Cell::new(e.at),
                    Cell::new(e.actor),
                    Cell::new(e.role),
                    Cell::new(e.action),
                    Cell::new(e.subject),
                    Cell::new(e.details),
                ]);
            }
            println!("{t}");
            Ok(())
        }
    }
}

/// A new password: generated, or the first line of standard input.
fn new_password(generate: bool) -> anyhow::Result<String> {
    if generate {
        return Ok(auth::random_password(20));
    }
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| anyhow::anyhow!("reading the password from standard input: {e}"))?;
    Ok(text.lines().next().unwrap_or("").to_owned())
}

/// `cardpipe login`.
pub async fn login_cmd(loaded: LoadedConfig, login: &str) -> anyhow::Result<()> {
    let services = connect(&loaded).await?;
    let console = cardpipe_console::ConsoleConfig::load(&loaded)?;
    identity::login(&services, &console, login).await
}

/// `cardpipe logout`.
pub async fn logout_cmd(loaded: LoadedConfig, login: Option<&str>) -> anyhow::Result<()> {
    let services = connect(&loaded).await?;
    identity::logout(&services, login).await
}

/// `cardpipe operators`.
pub async fn operators_cmd(loaded: LoadedConfig, command: OperatorsCommand) -> anyhow::Result<()> {
    let services = connect(&loaded).await?;
    let supervisor = |by: String, what: &'static str| {
        let services = services.clone();
        let loaded = &loaded;
        async move {
            let op = identity::authenticate(&services, loaded, &by, "--as").await?;
            op.require_supervisor(what)?;
            anyhow::Ok(op)
        }
    };
    match command {
        OperatorsCommand::Add {
            login,
            role,
            generate,
            by,
        } => {
            let role = Role::parse(&role)?;
            let first = auth::operators(&services.store).await?.is_empty();
            let (by, by_role) = match by {
                Some(by) => {
                    let op = supervisor(by, "adding operators").await?;
                    (op.login, op.role.as_str())
                }
                // Bootstrap only: nobody could authenticate yet.
                None if first => (
                    format!(
                        "system:{}",
                        std::env::var("USER").unwrap_or_else(|_| "cli".into())
                    ),
                    "system",
                ),
                None => anyhow::bail!(
                    "adding an operator needs --as LOGIN of a supervisor (only the first operator may be added without one)"
                ),
            };
            let password = new_password(generate)?;
            auth::add_operator(&services, &login, role, &password, (&by, by_role)).await?;
            println!("operator {login} added as {}", role.as_str());
            if generate {
                println!("password (shown once): {password}");
            }
            Ok(())
        }
        OperatorsCommand::List => {
            let mut t = new_table(&["login", "role", "enabled"]);
            for (login, role, disabled) in auth::operators(&services.store).await? {
                t.add_row(vec![
                    Cell::new(login),
                    Cell::new(role.as_str()),
                    Cell::new(if disabled { "no" } else { "yes" }),
                ]);
            }
            println!("{t}");
            Ok(())
        }
        command @ (OperatorsCommand::Disable { .. } | OperatorsCommand::Enable { .. }) => {
            let (disable, login, reason, by) = match command {
                OperatorsCommand::Disable { login, reason, by } => (true, login, reason, by),
                OperatorsCommand::Enable { login, reason, by } => (false, login, reason, by),
                _ => unreachable!("matched above"),
            };
            let op = supervisor(by, "disabling or enabling operators").await?;
            if reason.trim().is_empty() {
                anyhow::bail!("--reason must not be empty");
            }
            auth::set_operator_disabled(
                &services,
                &login,
                disable,
                reason.trim(),
                (&op.login, op.role.as_str()),
            )
            .await?;
            println!(
                "operator {login} {}",
                if disable { "disabled" } else { "enabled" }
            );
            Ok(())
        }
        OperatorsCommand::ResetPassword {
            login,
            generate,
            by,
        } => {
            let op = supervisor(by, "resetting passwords").await?;
            let password = new_password(generate)?;
            auth::reset_password(&services, &login, &password, (&op.login, op.role.as_str()))
                .await?;
            println!("operator {login}: password reset; their sessions ended");
            if generate {
                println!("password (shown once): {password}");
            }
            Ok(())
        }
    }
}

async fn acting(
    services: &Services,
    loaded: &LoadedConfig,
    login: Option<&str>,
) -> anyhow::Result<Operator> {
    let login = login.ok_or_else(|| {
        anyhow::anyhow!("this action needs --as LOGIN (an operator; see `cardpipe operators list`)")
    })?;
    identity::authenticate(services, loaded, login, "--as").await
}

fn batch_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:<38} {bar:40} {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// `cardpipe ops`.
pub async fn ops_cmd(loaded: LoadedConfig, args: OpsArgs, stages: &[&str]) -> anyhow::Result<()> {
    let services = connect(&loaded).await?;
    let who = args.operator.as_deref();
    match args.command {
        OpsCommand::Status => {
            let stages: Vec<String> = stages.iter().map(|s| s.to_string()).collect();
            let o = data::overview(&services, &stages).await?;
            let mut t = new_table(&["state", "applications"]);
            for (s, n) in o.states.iter().filter(|(_, n)| *n > 0) {
                t.add_row(vec![Cell::new(s.as_str()), num(n)]);
            }
            println!("Applications per state\n{t}");
            if services.broker.kind() != "memory" {
                let mut t = new_table(&["stage", "ready", "retrying", "parked"]);
                for (stage, d) in &o.queues {
                    match d {
                        Some(d) => t.add_row(vec![
                            Cell::new(stage),
                            num(d.ready),
                            num(d.retrying),
                            num(d.parked),
                        ]),
                        None => t.add_row(vec![
                            Cell::new(stage),
                            Cell::new("?"),
                            Cell::new("?"),
                            Cell::new("?"),
                        ]),
                    };
                }
                println!("Queues\n{t}");
            }
            let mut t = new_table(&["entered state", "changes (last hour)"]);
            for (s, n) in &o.throughput_last_hour {
                t.add_row(vec![Cell::new(s), num(n)]);
            }
            println!("Throughput\n{t}");
            println!("Parked jobs: {}", o.parked);
            let (pending, oldest) = services.store.outbox_backlog().await?;
            println!(
                "Outbox: {pending} undelivered{}; dead letters: {} (cardpipe ops dead-letters)",
                oldest
                    .map(|at| format!(", oldest written {at}"))
                    .unwrap_or_default(),
                services.store.dead_letter_count().await?
            );
            Ok(())
        }
        OpsCommand::Batches { limit } => {
            let list = data::batches(&services, limit.clamp(1, 1000)).await?;
            let mut t = new_table(&[
                "batch", "client", "state", "records", "accepted", "rejected", "progress", "states",
            ]);
            for b in list {
                let states = b
                    .states
                    .iter()
                    .map(|(s, n)| format!("{s} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                t.add_row(vec![
                    Cell::new(&b.id),
                    Cell::new(&b.client),
                    Cell::new(&b.state),
                    num(b.records),
                    num(b.accepted),
                    num(b.rejected),
                    num(format!("{:.0}%", b.fraction() * 100.0)),
                    Cell::new(states),
                ]);
            }
            println!("{t}");
            Ok(())
        }
        OpsCommand::Watch {
            batch,
            every_ms,
            rounds,
        } => {
            let ids: Vec<String> = match batch {
                Some(b) => vec![b],
                None => data::batches(&services, 5)
                    .await?
                    .into_iter()
                    .map(|b| b.id)
                    .collect(),
            };
            if ids.is_empty() {
                println!("no batch to watch");
                return Ok(());
            }
            let multi = MultiProgress::new();
            let bars: Vec<ProgressBar> = ids
                .iter()
                .map(|id| {
                    let bar = multi.add(ProgressBar::new(1));
                    bar.set_style(batch_style());
                    bar.set_prefix(id.clone());
                    bar
                })
                .collect();
            let mut round = 0u64;
            loop {
                let mut all_done = true;
                for (id, bar) in ids.iter().zip(&bars) {
                    let Some(b) = data::batch(&services, id).await? else {
                        bar.abandon_with_message("no such batch");
                        continue;
                    };
                    bar.set_length(b.applications().max(1) as u64);
                    bar.set_position(b.done().max(0) as u64);
                    bar.set_message(
                        b.states
                            .iter()
                            .map(|(s, n)| format!("{s} {n}"))
                            .collect::<Vec<_>>()
                            .join(" · "),
                    );
                    if b.done() < b.applications() || b.applications() == 0 {
                        all_done = false;
                    }
                }
                round += 1;
                if all_done || rounds.is_some_and(|r| round >= r) {
                    break;
                }
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    _ = tokio::time::sleep(Duration::from_millis(every_ms.max(100))) => {}
                }
            }
            for bar in bars {
                bar.finish();
            }
            Ok(())
        }
        OpsCommand::Parked { action } => match action.unwrap_or(ParkedAction::List) {
            ParkedAction::List => {
                let jobs = parked::list(&services, None).await?;
                let mut t = new_table(&[
                    "job",
                    "stage",
                    "application",
                    "attempts",
                    "parked at",
                    "last error",
                ]);
                for p in &jobs {
                    t.add_row(vec![
                        Cell::new(&p.job_id),
                        Cell::new(&p.stage),
                        Cell::new(&p.subject),
                        num(p.attempt),
                        Cell::new(&p.parked_at),
                        Cell::new(&p.error),
                    ]);
                }
                println!("{t}\n{} parked", jobs.len());
                Ok(())
            }
            ParkedAction::Retry { job } => {
                let op = acting(&services, &loaded, who).await?;
                let new = actions::parked_retry(&services, &op, &job).await?;
                println!(
                    "job {job} sent back to {} as job {} (audited as {})",
                    new.stage, new.id, op.login
                );
                Ok(())
            }
            ParkedAction::Drop { job, reason } => {
                let op = acting(&services, &loaded, who).await?;
                let p = actions::parked_drop(&services, &op, &job, &reason).await?;
                println!(
                    "job {job} of application {} dropped (audited as {})",
                    p.subject, op.login
                );
                Ok(())
            }
            ParkedAction::Fail { job, reason } => {
                let op = acting(&services, &loaded, who).await?;
                let to = actions::parked_fail(&services, &op, &job, &reason).await?;
                println!(
                    "job {job} force-failed; the application is now {} (audited as {})",
                    to.as_str(),
                    op.login
                );
                Ok(())
            }
        },
        OpsCommand::Encoders { action } => match action.unwrap_or(EncoderAction::List) {
            EncoderAction::List => {
                let list = data::encoders(&services, None).await?;
                let mut t = new_table(&[
                    "encoder",
                    "service",
                    "personalized",
                    "spoiled",
                    "yield",
                    "cards last hour",
                ]);
                for e in &list {
                    t.add_row(vec![
                        Cell::new(&e.name),
                        Cell::new(if e.in_service {
                            "in service".to_owned()
                        } else {
                            format!("out: {}", e.reason.as_deref().unwrap_or(""))
                        }),
                        num(e.personalized),
                        num(e.spoiled),
                        num(e
                            .yield_ratio()
                            .map_or("—".into(), |y| format!("{:.1}%", y * 100.0))),
                        num(e.last_hour),
                    ]);
                }
                println!("{t}");
                Ok(())
            }
            EncoderAction::Out { name, reason } => {
                encoder_service(&services, &loaded, who, &name, false, &reason).await
            }
            EncoderAction::In { name, reason } => {
                encoder_service(&services, &loaded, who, &name, true, &reason).await
            }
        },
        OpsCommand::Adjudications => {
            let list = data::adjudications(&services).await?;
            let mut t = new_table(&[
                "application",
                "registry id",
                "flagged",
                "candidates",
                "best score",
            ]);
            for a in &list {
                t.add_row(vec![
                    Cell::new(&a.application_id),
                    Cell::new(&a.registry_id),
                    Cell::new(&a.flagged_at),
                    num(a.candidates),
                    num(format!("{:.1}", a.best_score)),
                ]);
            }
            println!(
                "{t}\n{} waiting (decide in the console: /console/adjudications)",
                list.len()
            );
            Ok(())
        }
        OpsCommand::Sms { action } => match action.unwrap_or(SmsAction::List {
            state: None,
            limit: 100,
        }) {
            SmsAction::List { state, limit } => {
                let rows = cardpipe_delivery::reminders::messages(
                    &services,
                    state.as_deref(),
                    limit.clamp(1, 10_000),
                )
                .await?;
                let mut t = new_table(&[
                    "id",
                    "application",
                    "kind",
                    "state",
                    "attempts",
                    "due",
                    "sent",
                    "why not sent",
                ]);
                for r in &rows {
                    t.add_row(vec![
                        Cell::new(&r.id),
                        Cell::new(&r.application_id),
                        Cell::new(&r.kind),
                        Cell::new(&r.state),
                        num(r.attempts),
                        Cell::new(&r.due_on),
                        Cell::new(r.sent_at.as_deref().unwrap_or("")),
                        Cell::new(r.last_error.as_deref().unwrap_or("")),
                    ]);
                }
                println!("{t}\n{} messages", rows.len());
                Ok(())
            }
            SmsAction::Resend { id } => {
                let op = acting(&services, &loaded, who).await?;
                op.require_supervisor("sending a message again")?;
                let delivery = cardpipe_delivery::Delivery::new(
                    &services,
                    cardpipe_delivery::config::load(&loaded)?,
                )?;
                cardpipe_delivery::reminders::resend(
                    &delivery,
                    &services,
                    &id,
                    (&op.login, op.role.as_str()),
                )
                .await?;
                println!(
                    "message {id} queued to be sent again (audited as {})",
                    op.login
                );
                Ok(())
            }
        },
        OpsCommand::DeadLetters { action } => {
            match action.unwrap_or(DeadLetterAction::List { limit: 100 }) {
                DeadLetterAction::List { limit } => {
                    let letters = services.store.dead_letters(limit.clamp(1, 10_000)).await?;
                    let mut t = new_table(&[
                        "number",
                        "topic",
                        "subject",
                        "written",
                        "given up",
                        "attempts",
                        "last error",
                    ]);
                    for d in &letters {
                        t.add_row(vec![
                            num(d.seq),
                            Cell::new(&d.topic),
                            Cell::new(&d.subject),
                            Cell::new(&d.created_at),
                            Cell::new(&d.dead_at),
                            num(d.attempts),
                            Cell::new(&d.last_error),
                        ]);
                    }
                    let total = services.store.dead_letter_count().await?;
                    println!(
                        "{t}\n{total} dead letter(s); a supervisor re-queues one with `cardpipe ops dead-letters requeue NUMBER` once its cause is fixed"
                    );
                }
                DeadLetterAction::Requeue { seq } => {
                    let op = acting(&services, &loaded, who).await?;
                    op.require_supervisor("re-queueing a dead letter")?;
                    let letter = cardpipe_common::dead_letters::requeue(
                        &services,
                        seq,
                        (&op.login, op.role.as_str()),
                    )
                    .await?;
                    println!(
                        "dead letter {seq} ({} for {}) re-queued; the relay delivers it again (audited as {})",
                        letter.topic, letter.subject, op.login
                    );
                }
                DeadLetterAction::Discard { seq, reason } => {
                    let op = acting(&services, &loaded, who).await?;
                    op.require_supervisor("discarding a dead letter")?;
                    let letter = cardpipe_common::dead_letters::discard(
                        &services,
                        seq,
                        (&op.login, op.role.as_str()),
                        &reason,
                    )
                    .await?;
                    println!(
                        "dead letter {seq} ({} for {}) discarded (audited as {})",
                        letter.topic, letter.subject, op.login
                    );
                }
            }
            Ok(())
        }
        OpsCommand::Discrepancies { open } => {
            let list = cardpipe_common::discrepancies::list(&services, open)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut t = new_table(&[
                "id",
                "kind",
                "box",
                "office",
                "card",
                "reported",
                "resolution",
                "resolved by",
                "note",
                "reprint",
            ]);
            for d in &list {
                t.add_row(vec![
                    Cell::new(&d.id),
                    Cell::new(&d.kind),
                    Cell::new(&d.box_id),
                    Cell::new(&d.office_code),
                    Cell::new(&d.application_id),
                    Cell::new(&d.reported_at),
                    Cell::new(d.resolution.as_deref().unwrap_or("OPEN")),
                    Cell::new(d.resolved_by.as_deref().unwrap_or("")),
                    Cell::new(d.resolution_note.as_deref().unwrap_or("")),
                    Cell::new(d.reprint_id.as_deref().unwrap_or("")),
                ]);
            }
            let n_open = list.iter().filter(|d| d.is_open()).count();
            println!("{t}\n{n_open} open");
            Ok(())
        }
        OpsCommand::DiscrepancyResolve { id, outcome, note } => {
            let op = acting(&services, &loaded, who).await?;
            let r = actions::resolve_discrepancy(&services, &op, &id, &outcome, &note).await?;
            println!(
                "discrepancy {id} resolved: {}{} (audited as {})",
                r.discrepancy.resolution.as_deref().unwrap_or(""),
                r.reprint_id
                    .map(|id| format!("; reprint {id} requested (QC revokes the lost card's certificates and makes a new card)"))
                    .unwrap_or_default(),
                op.login
            );
            Ok(())
        }
        OpsCommand::HandoverUnlock { application_id } => {
            let op = acting(&services, &loaded, who).await?;
            op.require_supervisor("unlocking fingerprint attempts at handover")?;
            cardpipe_delivery::office::unlock_handover(
                &services,
                &application_id,
                (&op.login, op.role.as_str()),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!(
                "application {application_id}: fingerprint attempts at handover unlocked for today (audited as {})",
                op.login
            );
            Ok(())
        }
        OpsCommand::Dispatch { now } => {
            anyhow::ensure!(
                now,
                "`cardpipe ops dispatch` ships at once: say so with --now (the daily dispatch runs at [delivery] dispatch_cutoff)"
            );
            let op = acting(&services, &loaded, who).await?;
            op.require_supervisor("dispatching now")?;
            let delivery = cardpipe_delivery::Delivery::new(
                &services,
                cardpipe_delivery::config::load(&loaded)?,
            )?;
            let d = cardpipe_delivery::dispatch::dispatch_now(
                &delivery,
                &services,
                (&op.login, op.role.as_str()),
            )
            .await?;
            match (&d.shipment_id, &d.carrier_reference) {
                (Some(id), Some(reference)) => println!(
                    "shipment {id} dispatched: {} cards in {} boxes, carrier reference {reference} (audited as {})",
                    d.cards, d.boxes, op.login
                ),
                _ => println!("nothing packed: no shipment"),
            }
            Ok(())
        }
        OpsCommand::Stock | OpsCommand::Shipments => {
            let (area, what) = if matches!(args.command, OpsCommand::Stock) {
                ("stock", "blank-card stock or quality-control")
            } else {
                ("shipments", "shipping or delivery")
            };
            let tables = data::area_tables(&services, area).await?;
            if tables.is_empty() {
                println!("not available: this installation has no {what} tables yet");
            }
            for gt in tables {
                let headers: Vec<&str> = gt.columns.iter().map(String::as_str).collect();
                let mut t = new_table(&headers);
                for r in &gt.rows {
                    t.add_row(r.iter().map(Cell::new));
                }
                println!("{} ({} rows)\n{t}", gt.name, gt.total);
            }
            Ok(())
        }
    }
}

async fn encoder_service(
    services: &Services,
    loaded: &LoadedConfig,
    who: Option<&str>,
    name: &str,
    in_service: bool,
    reason: &str,
) -> anyhow::Result<()> {
    let op = acting(services, loaded, who).await?;
    actions::encoder_service(services, None, &op, name, in_service, reason).await?;
    println!(
        "encoder {name} {} (applied by every process driving it within seconds; audited as {})",
        if in_service {
            "returned to service"
        } else {
            "taken out of service"
        },
        op.login
    );
    Ok(())
}
