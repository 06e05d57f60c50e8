//! `cardpipe run --demo N`: one night of the production centre, on any machine.
//!
//! The demo plays the civil registry: it generates a nightly batch of `N` applicants
//! (`cardpipe_registry::synth`: Persian names, valid national codes, ten ISO/IEC 19794-2
//! templates and a portrait each; a few applicants enrolled twice so deduplication has
//! something to find, and one record of every kind the registry contract rejects), submits it
//! through the same intake path as the registry API (streamed, validated, idempotent), and
//! schedules it for release now. From there nothing is special: the release scheduler, every
//! stage and every background loop of the running process move the applications as they
//! would move a real batch.
//!
//! While they move, a progress bar counts applications that have come to rest — in a state
//! no running stage takes work from (waiting at an office, waiting for an operator's
//! adjudication, rejected...) or parked for an operator — and a line shows the count per
//! state. When everything rests (or nothing has moved for a while), the demo prints the
//! final counts and leaves the process serving the console and API until ctrl-c.
//!
//! Then, unless `--days-per-second 0`, the demo plays the cards' life on an accelerated
//! calendar ([`life`]): dispatch at the cut-off, office receipt with one planted
//! discrepancy, handovers with live fingerprints (one refused attempt), reminders, and the
//! six-month voiding of the uncollected cards with revocation and CRL; it closes with the
//! count per state.
//!
//! The idempotency key is derived from the seed, so restarting `cardpipe run --demo` after a
//! crash or ctrl-c resumes the same batch instead of submitting a second one.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use cardpipe_common::domain::ApplicationState;
use cardpipe_common::runtime::Services;
use cardpipe_intake::intake;
use cardpipe_registry::config::RegistryConfig;
use cardpipe_registry::synth::{Generator, SynthSpec};
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::Row;
use tokio_util::sync::CancellationToken;

mod life;

pub use life::CardLife;

/// The file in the data dir the demo's citizen messages are written to without an SMS
/// gateway (`[delivery.sms] log_file`, names and mobile numbers masked).
pub const SMS_OUTBOX: &str = "sms-outbox.ndjson";

/// The registry client name the demo submits as.
pub const DEMO_CLIENT: &str = "demo-registry";

/// What the demo generates.
#[derive(Debug, Clone)]
pub struct DemoSpec {
    /// Valid applicants in the batch.
    pub records: usize,
    /// Generator seed; the same seed resumes the same batch.
    pub seed: u64,
    /// Simulated days per real second of the card life (0: stop at packing).
    pub days_per_second: f64,
    /// End the process when the demo is done instead of serving until ctrl-c.
    pub exit_when_done: bool,
    /// Where the console is, for the closing message.
    pub console_url: String,
}

/// Applicants enrolled twice in a batch of `records` (about 2 %, at least one).
fn planted_duplicates(records: usize) -> usize {
    if records < 10 {
        0
    } else {
        (records / 50).max(1)
    }
}

/// Submits the demo batch, releases it now and shows progress until it rests or `stop`.
pub async fn run(
    services: Services,
    registry: RegistryConfig,
    spec: DemoSpec,
    resting: Vec<ApplicationState>,
    life: Option<CardLife>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let today = intake::tehran_today(services.clock.now());
    let duplicates = planted_duplicates(spec.records);
    let synth = SynthSpec {
        seed: spec.seed,
        records: spec.records,
        bad: true,
        applied_on: today,
        // Applicant i uses person i % pool: the last `duplicates` applicants re-enrol the
        // first ones under new names and national codes.
        distinct_persons: spec.records.saturating_sub(duplicates).max(1),
    };
    let key = format!("demo-{}-{}", spec.seed, spec.records);
    eprintln!(
        "demo: generating a nightly batch of {} applicants ({} enrolled twice) plus one record of each rejected kind",
        spec.records, duplicates
    );
    let generator = std::sync::Arc::new(Generator::new(synth));
    let lines = generator.total_lines();
    let live = generator.clone();
    let body = futures::stream::iter((0..lines).map(move |n| {
        let (mut line, _) = generator.line(n);
        line.push('\n');
        Ok::<Bytes, std::io::Error>(Bytes::from(line))
    }));
    // A batch received on an earlier start is resumed as it is: regenerated today, its
    // application dates would differ, and the same key with another body is refused.
    let submission = match intake::received_batch(&services, DEMO_CLIENT, &key).await? {
        Some(report) => intake::Submission {
            report,
            replayed: true,
        },
        None => intake::submit_batch(&services, &registry, DEMO_CLIENT, &key, body)
            .await
            .map_err(|e| anyhow::anyhow!("demo batch submission failed: {e}"))?,
    };
    let report = submission.report;
    eprintln!(
        "demo: batch {} {}: {} records, {} accepted, {} rejected, {} flagged",
        report.batch_id,
        if submission.replayed {
            "already received (resuming)"
        } else {
            "received"
        },
        report.records,
        report.accepted,
        report.rejected,
        report.flagged
    );
    // The demo plays the registry: its actions are audited like the registry API's.
    let audit_registry = |action: &'static str, details: serde_json::Value| {
        let (services, batch_id) = (services.clone(), report.batch_id.clone());
        async move {
            cardpipe_common::audit::record(
                &services.store,
                services.clock.as_ref(),
                &cardpipe_common::audit::AuditEvent {
                    actor: DEMO_CLIENT,
                    role: "registry",
                    action,
                    subject: &batch_id,
                    details,
                },
            )
            .await
        }
    };
    audit_registry(
        "registry.batch_submit",
        serde_json::json!({
            "idempotency_key": key,
            "replayed": submission.replayed,
            "records": report.records,
            "accepted": report.accepted,
            "rejected": report.rejected,
            "flagged": report.flagged,
        }),
    )
    .await?;
    if matches!(report.state.as_str(), "received" | "scheduled") {
        let now = services.clock.now();
        intake::schedule_batch(&services, DEMO_CLIENT, &report.batch_id, now, "urgent").await?;
        audit_registry(
            "registry.batch_schedule",
            serde_json::json!({ "release_at": cardpipe_common::clock::to_rfc3339(now), "priority": "urgent" }),
        )
        .await?;
    }
    watch(
        &services,
        &report.batch_id,
        report.accepted.max(0) as u64,
        &resting,
        &stop,
    )
    .await?;
    if let Some(life) = life.filter(|_| spec.days_per_second > 0.0)
        && !stop.is_cancelled()
    {
        let played = life::play(
            &services,
            &life,
            &live,
            &report.batch_id,
            spec.days_per_second,
            &stop,
        )
        .await?;
        eprintln!(
            "demo: card life: {} days played; {} boxes received ({} card reported missing by its office: an open discrepancy in the console), {} cards handed over after a live fingerprint check ({} attempts refused: a wrong finger or a poor capture)",
            played.days,
            played.boxes_received,
            played.reported_missing,
            played.handovers,
            played.refused_attempts
        );
        closing_summary(&services, &life, &report.batch_id, &stop).await?;
    }
    if stop.is_cancelled() {
        // Shut down (ctrl-c, SIGTERM) before the batch came to rest: not "done".
        eprintln!(
            "demo: stopped before the batch came to rest; `cardpipe run` on the same data dir carries on where it left off"
        );
        return Ok(());
    }
    eprintln!(
        "demo: done. The console is at {} ; the process keeps serving until ctrl-c.",
        spec.console_url
    );
    Ok(())
}

/// Counts of the batch's applications per state.
pub async fn counts(services: &Services, batch_id: &str) -> anyhow::Result<BTreeMap<String, i64>> {
    let rows = sqlx::query(
        "SELECT state, COUNT(*) AS n FROM applications WHERE batch_id = $1 GROUP BY state",
    )
    .bind(batch_id)
    .fetch_all(services.store.pool())
    .await?;
    let mut out = BTreeMap::new();
    for row in rows {
        out.insert(
            row.try_get::<String, _>("state")?,
            row.try_get::<i64, _>("n")?,
        );
    }
    Ok(out)
}

async fn parked(services: &Services, batch_id: &str) -> anyhow::Result<i64> {
    let row = sqlx::query(
        "SELECT COUNT(DISTINCT p.subject) AS n FROM parked_jobs p
         JOIN applications a ON a.id = p.subject WHERE a.batch_id = $1",
    )
    .bind(batch_id)
    .fetch_one(services.store.pool())
    .await?;
    Ok(row.try_get("n")?)
}

/// The closing lines: the count per state and what the calendar produced.
async fn closing_summary(
    services: &Services,
    life: &CardLife,
    batch_id: &str,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    eprintln!("demo: after the card life, applications per state:");
    for (state, n) in counts(services, batch_id).await? {
        eprintln!("  {state:<20} {n:>7}");
    }
    // The last messages (the voiding notices) leave through the outbox relay: let them go.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline && !stop.is_cancelled() {
        let pending: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM delivery_reminders r
             JOIN applications a ON a.id = r.application_id
             WHERE a.batch_id = $1 AND r.state = 'pending'",
        )
        .bind(batch_id)
        .fetch_one(services.store.pool())
        .await?
        .try_get("n")?;
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let reminders = sqlx::query(
        "SELECT r.kind, COUNT(*) AS n FROM delivery_reminders r
         JOIN applications a ON a.id = r.application_id
         WHERE a.batch_id = $1 GROUP BY r.kind ORDER BY r.kind",
    )
    .bind(batch_id)
    .fetch_all(services.store.pool())
    .await?;
    // Arrival messages are kinded per office ("arrival:TEH-001"): counted together.
    let mut by_kind: BTreeMap<String, i64> = BTreeMap::new();
    for r in &reminders {
        let kind: String = r.try_get("kind")?;
        let kind = kind.split(':').next().unwrap_or_default().to_owned();
        *by_kind.entry(kind).or_default() += r.try_get::<i64, _>("n")?;
    }
    let said: Vec<String> = by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
    eprintln!(
        "demo: citizen messages: {}",
        if said.is_empty() {
            "none".into()
        } else {
            said.join(" · ")
        }
    );
    let sms = &life.delivery.cfg.sms;
    if sms.url.is_empty() && !sms.log_file.is_empty() {
        eprintln!(
            "demo: no SMS gateway: their Persian texts are in {} (names and mobile numbers masked)",
            sms.log_file
        );
    }
    revocations_summary(services, batch_id, stop).await
}

/// The voided cards' certificates revoked, and the CRL that lists them: the CA revokes and
/// publishes on its own (through the outbox and its CRL loop), so this waits for it a little.
async fn revocations_summary(
    services: &Services,
    batch_id: &str,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let row = sqlx::query(
            "SELECT
               SUM(CASE WHEN c.status = 'revoked' THEN 1 ELSE 0 END) AS revoked,
               SUM(CASE WHEN c.status <> 'revoked' THEN 1 ELSE 0 END) AS pending
             FROM certificates c JOIN applications a ON a.id = c.application_id
             WHERE a.batch_id = $1 AND a.state = 'voided'",
        )
        .bind(batch_id)
        .fetch_one(services.store.pool())
        .await?;
        let revoked = row.try_get::<Option<i64>, _>("revoked")?.unwrap_or(0);
        let pending = row.try_get::<Option<i64>, _>("pending")?.unwrap_or(0);
        let latest = sqlx::query(
            "SELECT number, revoked_count, object_key FROM crl_state ORDER BY number DESC LIMIT 1",
        )
        .fetch_optional(services.store.pool())
        .await?;
        let listed = match &latest {
            Some(row) => row.try_get::<i64, _>("revoked_count")? >= revoked,
            None => false,
        };
        let settled = revoked + pending == 0 || (pending == 0 && listed);
        if settled || tokio::time::Instant::now() >= deadline || stop.is_cancelled() {
            if revoked + pending == 0 {
                return Ok(());
            }
            let crl = match latest {
                Some(row) => format!(
                    "CRL number {} lists {} revoked certificates ({})",
                    row.try_get::<i64, _>("number")?,
                    row.try_get::<i64, _>("revoked_count")?,
                    row.try_get::<String, _>("object_key")?
                ),
                None => "no CRL published yet".into(),
            };
            let waiting = if pending > 0 {
                format!(" ({pending} still waiting for the CA)")
            } else {
                String::new()
            };
            eprintln!("demo: {revoked} certificates of the voided cards revoked{waiting}; {crl}");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn summary(counts: &BTreeMap<String, i64>) -> String {
    counts
        .iter()
        .map(|(s, n)| format!("{s} {n}"))
        .collect::<Vec<_>>()
        .join(" · ")
}

/// Shows progress until every application rests, nothing moved for a long while, or `stop`.
async fn watch(
    services: &Services,
    batch_id: &str,
    total: u64,
    resting: &[ApplicationState],
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    const STALL: Duration = Duration::from_secs(120);
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} at rest  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut last_change = tokio::time::Instant::now();
    let mut last = BTreeMap::new();
    loop {
        let now_counts = counts(services, batch_id).await?;
        let at_rest: i64 = now_counts
            .iter()
            .filter(|(s, _)| {
                s.parse::<ApplicationState>()
                    .is_ok_and(|s| resting.contains(&s))
            })
            .map(|(_, n)| n)
            .sum::<i64>()
            + parked(services, batch_id).await?;
        bar.set_position((at_rest.max(0) as u64).min(total));
        bar.set_message(summary(&now_counts));
        if now_counts != last {
            last = now_counts;
            last_change = tokio::time::Instant::now();
        }
        if at_rest as u64 >= total && total > 0 {
            bar.finish();
            break;
        }
        if last_change.elapsed() > STALL {
            bar.abandon_with_message(format!(
                "nothing moved for {}s: {}",
                STALL.as_secs(),
                summary(&last)
            ));
            break;
        }
        tokio::select! {
            _ = stop.cancelled() => { bar.abandon(); return Ok(()); }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    eprintln!("demo: applications per state:");
    for (state, n) in &last {
        eprintln!("  {state:<20} {n:>7}");
    }
    Ok(())
}
