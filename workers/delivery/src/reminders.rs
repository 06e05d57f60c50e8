//! Citizen SMS: the arrival notice, reminders at configured offsets, a month before voiding,
//! a final notice, and the voiding notice — Persian text from templates, Solar Hijri dates in
//! Persian digits.
//!
//! Exactly once per (application, kind), whatever the replicas and restarts: a reminder is
//! created by inserting its unique `delivery_reminders` row, and only the transaction whose
//! insert took effect also writes the outbox row (topic [`SMS_TOPIC`]) that sends it. The
//! relay delivers outbox rows through [`SmsSink`]: it sends a `pending` row at most once per
//! claim (the row id travels as the gateway's message id, so a gateway de-duplicates a
//! resend after a crash), records the result, retries failures with the relay's backoff and
//! gives up after `max_attempts`, reporting the failure (row `failed`, metric, error log).
//!
//! Quiet hours (Tehran time) are kept twice: reminders are only created outside them, and a
//! send that falls inside them (a voiding notice, a retry) is deferred to their end.

use std::sync::Arc;
use std::time::Duration as StdDuration;

use async_trait::async_trait;
use cardpipe_common::clock::to_rfc3339;
use cardpipe_common::domain::applicant::ApplicantGroup;
use cardpipe_common::domain::fees;
use cardpipe_common::domain::{ApplicationId, ApplicationState};
use cardpipe_common::records;
use cardpipe_common::runtime::Services;
use cardpipe_common::runtime::relay::{Lane, OutboxSink, PermanentFailure};
use cardpipe_common::store::{OutboxRow, StoreError, StoreTx};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use time::{Date, OffsetDateTime};

use crate::config::SmsConfig;
use crate::{Delivery, add_months, offices, tehran_date};
use cardpipe_common::solar_hijri::{SolarHijri, persian_digits};

/// Outbox topic of citizen SMS.
pub const SMS_TOPIC: &str = "sms";

/// The kind of the voiding notice.
pub const VOIDED: &str = "voided";

/// The outbox payload of an SMS.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SmsPayload {
    /// `delivery_reminders.id`.
    pub reminder_id: String,
}

/// Appends one message to the no-gateway log file (NDJSON, created 0600).
fn append_to_log(
    path: &str,
    id: &str,
    kind: &str,
    to: &str,
    text: &str,
    at: OffsetDateTime,
) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let line = serde_json::json!({
        "id": id, "kind": kind, "to": to, "text": text, "at": to_rfc3339(at),
    });
    let mut file = options
        .open(path)
        .map_err(|e| anyhow::anyhow!("[delivery.sms] log_file {path}: {e}"))?;
    writeln!(file, "{line}").map_err(|e| anyhow::anyhow!("[delivery.sms] log_file {path}: {e}"))
}

/// Once a gateway is configured, every message recorded `unsent` (no gateway then) goes back
/// to the outbox, at most `limit` per call; returns how many. Messages whose card is no longer
/// waiting are cancelled when their turn comes, as any other.
pub async fn requeue_unsent(
    delivery: &Delivery,
    services: &Services,
    now: OffsetDateTime,
    limit: i64,
) -> anyhow::Result<usize> {
    if delivery.cfg.sms.url.is_empty() {
        return Ok(0);
    }
    let rows = sqlx::query(
        "SELECT id, application_id FROM delivery_reminders WHERE state = 'unsent' ORDER BY created_at, id LIMIT $1",
    )
    .bind(limit)
    .fetch_all(services.store.pool())
    .await?;
    let mut requeued = 0;
    for row in rows {
        let id: String = row.try_get("id")?;
        let app: String = row.try_get("application_id")?;
        let mut tx = services.store.begin().await?;
        let moved = sqlx::query(
            "UPDATE delivery_reminders SET state = 'pending', attempts = 0, last_error = NULL
             WHERE id = $1 AND state = 'unsent'",
        )
        .bind(&id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if moved == 1 {
            outbox_sms(&mut tx, &app, &id, now, delivery.next_sendable(now)).await?;
            requeued += 1;
        }
        tx.commit().await?;
    }
    Ok(requeued)
}

/// One citizen message as operators see it (no recipient, no text: those are personal).
#[derive(Debug, Clone, Serialize)]
pub struct MessageRow {
    /// `delivery_reminders.id`.
    pub id: String,
    /// The application.
    pub application_id: String,
    /// `arrival:<office>`, `after_7d`, `final_notice`, `voided`...
    pub kind: String,
    /// `pending`, `sent`, `unsent`, `failed`, `cancelled`.
    pub state: String,
    /// Send attempts so far.
    pub attempts: i64,
    /// Due date (Tehran).
    pub due_on: String,
    /// When the gateway took it.
    pub sent_at: Option<String>,
    /// Why it is not sent.
    pub last_error: Option<String>,
}

/// The newest messages, optionally in one state.
pub async fn messages(
    services: &Services,
    state: Option<&str>,
    limit: i64,
) -> anyhow::Result<Vec<MessageRow>> {
    let rows = sqlx::query(
        "SELECT id, application_id, kind, state, attempts, due_on, sent_at, last_error
         FROM delivery_reminders WHERE ($1 = '' OR state = $1) ORDER BY created_at DESC, id LIMIT $2",
    )
    .bind(state.unwrap_or(""))
    .bind(limit)
    .fetch_all(services.store.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(MessageRow {
                id: r.try_get("id")?,
                application_id: r.try_get("application_id")?,
                kind: r.try_get("kind")?,
                state: r.try_get("state")?,
                attempts: r.try_get("attempts")?,
                due_on: r.try_get("due_on")?,
                sent_at: r.try_get("sent_at")?,
                last_error: r.try_get("last_error")?,
            })
        })
        .collect()
}

/// Sends a `failed` or `unsent` message again (a supervisor's action, audited as
/// `sms.resend`): back to `pending` with its attempts reset, and into the outbox.
pub async fn resend(
    delivery: &Delivery,
    services: &Services,
    id: &str,
    (actor, role): (&str, &str),
) -> anyhow::Result<()> {
    let now = services.clock.now();
    let row = sqlx::query("SELECT application_id, state FROM delivery_reminders WHERE id = $1")
        .bind(id)
        .fetch_optional(services.store.pool())
        .await?
        .ok_or_else(|| anyhow::anyhow!("message {id} not found (see `cardpipe ops sms`)"))?;
    let app: String = row.try_get("application_id")?;
    let state: String = row.try_get("state")?;
    anyhow::ensure!(
        state == "failed" || state == "unsent",
        "message {id} is {state}: only failed or unsent messages are sent again"
    );
    let mut tx = services.store.begin().await?;
    let moved = sqlx::query(
        "UPDATE delivery_reminders SET state = 'pending', attempts = 0, last_error = NULL
         WHERE id = $1 AND state = $2",
    )
    .bind(id)
    .bind(&state)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    anyhow::ensure!(moved == 1, "message {id} changed meanwhile; look again");
    outbox_sms(&mut tx, &app, id, now, delivery.next_sendable(now)).await?;
    cardpipe_common::audit::record_in(
        &mut tx,
        now,
        &cardpipe_common::audit::AuditEvent {
            actor,
            role,
            action: "sms.resend",
            subject: &app,
            details: serde_json::json!({ "message": id, "was": state }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// What the holder must bring to the office: the handover asks groups 3 and 4 (cards issued
/// 1380–1396) for the previous national card.
pub fn what_to_bring(group: ApplicantGroup) -> &'static str {
    match group {
        ApplicantGroup::Replace13801389 | ApplicantGroup::Voluntary13901396 => {
            "کارت ملی قبلی و شناسنامه"
        }
        ApplicantGroup::FirstCard | ApplicantGroup::LostOrChanged => "شناسنامه",
    }
}

/// An amount in rial, Persian digits with the Persian thousands separator.
pub fn rial(amount: i64) -> String {
    let digits = amount.to_string();
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push('٬');
        }
        grouped.push(c);
    }
    format!("{} ریال", persian_digits(&grouped))
}

/// The sentence about the delivery fee: due at handover, or prepaid.
pub fn fee_note(due_at_handover: i64) -> String {
    if due_at_handover > 0 {
        format!(
            "هزینه تحویل ({}) هنگام تحویل دریافت می‌شود.",
            rial(due_at_handover)
        )
    } else {
        "هزینه تحویل پرداخت شده است.".to_owned()
    }
}

/// The metric label of a reminder kind (low cardinality).
pub fn label(kind: &str) -> &'static str {
    if kind.starts_with("arrival") {
        "ready_for_pickup"
    } else if kind.starts_with("after_") || kind == "month_before_voiding" {
        "reminder"
    } else if kind == "final_notice" {
        "final_notice"
    } else if kind == VOIDED {
        "voided"
    } else {
        "other"
    }
}

/// The reminders of a card available at `office` since `available_on`, voided on `void_on`:
/// (kind, due date), in due order.
pub fn plan(
    delivery: &Delivery,
    office: &str,
    available_on: Date,
    void_on: Date,
) -> Vec<(String, Date)> {
    let r = &delivery.cfg.reminders;
    let mut out = vec![(format!("arrival:{office}"), available_on)];
    for days in &r.after_days {
        out.push((
            format!("after_{days}d"),
            available_on + time::Duration::days(i64::from(*days)),
        ));
    }
    if r.month_before_voiding {
        out.push(("month_before_voiding".into(), add_months(void_on, -1)));
    }
    if r.final_notice_days_before > 0 {
        out.push((
            "final_notice".into(),
            void_on - time::Duration::days(i64::from(r.final_notice_days_before)),
        ));
    }
    out.retain(|(kind, due)| {
        *due < void_on && (*due >= available_on || kind.starts_with("arrival"))
    });
    out.sort_by_key(|(_, due)| *due);
    out
}

/// Writes a reminder row and, when it is new, its outbox row (sent from `send_at`).
/// Returns whether it was new.
pub async fn enqueue(
    tx: &mut StoreTx,
    application_id: &str,
    kind: &str,
    office: &str,
    due_on: Date,
    now: OffsetDateTime,
    send_at: OffsetDateTime,
) -> Result<bool, StoreError> {
    let id = uuid::Uuid::now_v7().to_string();
    let done = sqlx::query(
        "INSERT INTO delivery_reminders (id, application_id, kind, office_code, state, attempts, due_on, created_at)
         VALUES ($1, $2, $3, $4, 'pending', 0, $5, $6)
         ON CONFLICT (application_id, kind) DO NOTHING",
    )
    .bind(&id)
    .bind(application_id)
    .bind(kind)
    .bind(office)
    .bind(due_on.to_string())
    .bind(to_rfc3339(now))
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    outbox_sms(tx, application_id, &id, now, send_at).await?;
    Ok(true)
}

async fn outbox_sms(
    tx: &mut StoreTx,
    application_id: &str,
    reminder_id: &str,
    now: OffsetDateTime,
    send_at: OffsetDateTime,
) -> Result<(), StoreError> {
    let payload = serde_json::to_string(&SmsPayload {
        reminder_id: reminder_id.to_owned(),
    })
    .expect("payload serialises");
    sqlx::query(
        "INSERT INTO outbox (id, topic, subject, payload, created_at, available_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(SMS_TOPIC)
    .bind(application_id)
    .bind(payload)
    .bind(to_rfc3339(now))
    .bind(to_rfc3339(send_at))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Creates every reminder due today (Tehran) that does not exist yet, unless `now` is in
/// the quiet hours. Returns how many were created.
pub async fn schedule(
    delivery: &Delivery,
    services: &Services,
    now: OffsetDateTime,
) -> anyhow::Result<usize> {
    if delivery.is_quiet(now) {
        return Ok(0);
    }
    let today = tehran_date(now);
    let cards = sqlx::query(
        "SELECT c.application_id, c.office_code, c.available_at, c.void_on
         FROM delivery_cards c JOIN applications a ON a.id = c.application_id
         WHERE a.state = 'at_office' AND c.available_at IS NOT NULL
         ORDER BY c.application_id",
    )
    .fetch_all(services.store.pool())
    .await?;
    let existing: std::collections::HashSet<(String, String)> = sqlx::query(
        "SELECT r.application_id, r.kind FROM delivery_reminders r
         JOIN applications a ON a.id = r.application_id WHERE a.state = 'at_office'",
    )
    .fetch_all(services.store.pool())
    .await?
    .iter()
    .map(|r| Ok((r.try_get("application_id")?, r.try_get("kind")?)))
    .collect::<Result<_, sqlx::Error>>()?;
    let mut todo = Vec::new();
    for row in &cards {
        let app: String = row.try_get("application_id")?;
        let office: String = row.try_get("office_code")?;
        let available: String = row.try_get("available_at")?;
        let void_on: String = row.try_get("void_on")?;
        let available_on = tehran_date(crate::office::parse_time(&available)?);
        let void_on = parse_date(&void_on)?;
        for (kind, due) in plan(delivery, &office, available_on, void_on) {
            if due <= today && !existing.contains(&(app.clone(), kind.clone())) {
                todo.push((app.clone(), kind, office.clone(), due));
            }
        }
    }
    let mut created = 0;
    for chunk in todo.chunks(200) {
        let mut tx = services.store.begin().await?;
        let mut labels = Vec::new();
        for (app, kind, office, due) in chunk {
            if enqueue(&mut tx, app, kind, office, *due, now, now).await? {
                created += 1;
                labels.push(label(kind));
            }
        }
        tx.commit().await?;
        for l in labels {
            delivery.metrics.sms_scheduled(l);
        }
    }
    Ok(created)
}

/// Parses a stored `YYYY-MM-DD`.
pub fn parse_date(text: &str) -> anyhow::Result<Date> {
    Date::parse(
        text,
        time::macros::format_description!("[year]-[month]-[day]"),
    )
    .map_err(|_| anyhow::anyhow!("stored date {text:?} does not parse"))
}

/// Fills a template's placeholders.
pub fn render(template: &str, values: &[(&str, String)]) -> String {
    let mut out = template.to_owned();
    for (key, value) in values {
        out = out.replace(&format!("{{{key}}}"), value);
    }
    out
}

fn json_escaped(text: &str) -> String {
    let quoted = serde_json::to_string(text).expect("strings serialise");
    quoted[1..quoted.len() - 1].to_owned()
}

/// Spaces requests `1 / rate` seconds apart (per process).
#[derive(Debug)]
struct RateLimiter {
    interval: StdDuration,
    next: tokio::sync::Mutex<tokio::time::Instant>,
}

impl RateLimiter {
    fn new(rate_per_second: f64) -> Self {
        Self {
            interval: StdDuration::from_secs_f64(1.0 / rate_per_second.max(0.001)),
            next: tokio::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    async fn acquire(&self) {
        let wait = {
            let mut next = self.next.lock().await;
            let now = tokio::time::Instant::now();
            let slot = (*next).max(now);
            *next = slot + self.interval;
            slot - now
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Delivers `sms` outbox rows through the HTTP gateway.
pub struct SmsSink {
    delivery: Arc<Delivery>,
    services: Services,
    client: reqwest::Client,
    limiter: RateLimiter,
}

impl std::fmt::Debug for SmsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmsSink")
            .field("sms", &self.delivery.cfg.sms)
            .finish_non_exhaustive()
    }
}

impl SmsSink {
    /// A sink sending through `delivery.cfg.sms`.
    pub fn new(delivery: Arc<Delivery>, services: Services) -> anyhow::Result<Self> {
        let sms: &SmsConfig = &delivery.cfg.sms;
        let client = reqwest::Client::builder()
            .timeout(StdDuration::from_secs(sms.timeout_secs.max(1)))
            .build()?;
        let limiter = RateLimiter::new(sms.rate_per_second);
        Ok(Self {
            delivery,
            services,
            client,
            limiter,
        })
    }

    async fn finish(
        &self,
        id: &str,
        state: &str,
        status: Option<i64>,
        message: Option<&str>,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let now = self.services.clock.now();
        sqlx::query(
            "UPDATE delivery_reminders SET state = $1, gateway_status = $2, gateway_message = $3, last_error = $4,
                 sent_at = CASE WHEN $1 = 'sent' THEN $5 ELSE sent_at END
             WHERE id = $6 AND state = 'pending'",
        )
        .bind(state)
        .bind(status)
        .bind(message)
        .bind(error)
        .bind(to_rfc3339(now))
        .bind(id)
        .execute(self.services.store.pool())
        .await?;
        Ok(())
    }

    /// The message's recipient and text. `masked` (the no-gateway log file, unless
    /// `log_personal_data`): the name by its initials and the mobile number by its operator
    /// prefix and last two digits, so the file holds no personal data in clear.
    async fn text(
        &self,
        app: &ApplicationId,
        kind: &str,
        office_code: &str,
        masked: bool,
    ) -> anyhow::Result<(String, String)> {
        let record = records::load_record(&self.services, app).await?;
        let office = offices::get(&self.services.store, office_code)
            .await?
            .ok_or_else(|| anyhow::anyhow!("office {office_code} is not in the register"))?;
        let row = sqlx::query(
            "SELECT available_at, void_on FROM delivery_cards WHERE application_id = $1",
        )
        .bind(app.as_str())
        .fetch_one(self.services.store.pool())
        .await?;
        let available: Option<String> = row.try_get("available_at")?;
        let void_on = parse_date(&row.try_get::<String, _>("void_on")?)?;
        let available_on = match available {
            Some(t) => tehran_date(crate::office::parse_time(&t)?),
            None => tehran_date(self.services.clock.now()),
        };
        let today = tehran_date(self.services.clock.now());
        let last_day = void_on.previous_day().unwrap_or(void_on);
        let solar = |d: Date| {
            SolarHijri::from_gregorian(d)
                .map(|s| s.long())
                .unwrap_or_else(|_| d.to_string())
        };
        let r = &self.delivery.cfg.reminders;
        let template = match label(kind) {
            "ready_for_pickup" => &r.arrival_text,
            "final_notice" => &r.final_text,
            "voided" => &r.voided_text,
            _ => &r.reminder_text,
        };
        let text = render(
            template,
            &[
                (
                    "name",
                    if masked {
                        format!(
                            "{} {}",
                            initial(&record.first_name),
                            initial(&record.last_name)
                        )
                    } else {
                        format!("{} {}", record.first_name, record.last_name)
                    },
                ),
                ("office_name", office.name.clone()),
                ("office_address", office.address.clone()),
                ("office_phone", persian_digits(&office.phone)),
                ("tracking_code", persian_digits(&record.tracking_code)),
                ("date", solar(available_on)),
                ("void_date", solar(last_day)),
                (
                    "days",
                    persian_digits(&(today - available_on).whole_days().to_string()),
                ),
                ("bring", what_to_bring(record.applicant_group).to_owned()),
                ("fee", fee_note(fees::due_at_handover(&record.fees))),
                ("double_issuance", rial(fees::issuance_due(true))),
            ],
        );
        let to = if masked {
            masked_mobile(&record.mobile)
        } else {
            record.mobile
        };
        Ok((to, text))
    }
}

/// A name by its first letter: `علی` → `ع.`.
fn initial(name: &str) -> String {
    name.chars()
        .find(|c| c.is_alphabetic())
        .map(|c| format!("{c}."))
        .unwrap_or_default()
}

/// A mobile number by its operator prefix and last two digits: `09121234567` → `0912•••••67`.
fn masked_mobile(mobile: &str) -> String {
    let chars: Vec<char> = mobile.chars().collect();
    if chars.len() < 8 {
        return "•".repeat(chars.len());
    }
    chars
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if i < 4 || i + 2 >= chars.len() {
                *c
            } else {
                '•'
            }
        })
        .collect()
}

#[async_trait]
impl OutboxSink for SmsSink {
    /// The SMS gateway is another party: the external lane.
    fn lane(&self) -> Lane {
        Lane::External
    }

    async fn deliver(&self, row: &OutboxRow) -> anyhow::Result<()> {
        let payload: SmsPayload = serde_json::from_str(&row.payload).map_err(|e| {
            PermanentFailure(format!(
                "sms outbox row {} is not an SMS payload: {e}",
                row.id
            ))
        })?;
        let Some(r) = sqlx::query(
            "SELECT r.application_id, r.kind, r.office_code, r.state, r.attempts, a.state AS app_state
             FROM delivery_reminders r JOIN applications a ON a.id = r.application_id WHERE r.id = $1",
        )
        .bind(&payload.reminder_id)
        .fetch_optional(self.services.store.pool())
        .await?
        else {
            anyhow::bail!("reminder {} not found", payload.reminder_id);
        };
        let state: String = r.try_get("state")?;
        if state != "pending" {
            return Ok(());
        }
        let app = ApplicationId(r.try_get("application_id")?);
        let kind: String = r.try_get("kind")?;
        let office: String = r.try_get("office_code")?;
        let attempts: i64 = r.try_get("attempts")?;
        let app_state: String = r.try_get("app_state")?;
        let metric = label(&kind);
        let still_relevant = if kind == VOIDED {
            app_state == ApplicationState::Voided.as_str()
        } else {
            app_state == ApplicationState::AtOffice.as_str()
        };
        if !still_relevant {
            self.finish(
                &payload.reminder_id,
                "cancelled",
                None,
                None,
                Some(&format!("application is {app_state}")),
            )
            .await?;
            self.delivery.metrics.sms_held(metric, "cancelled");
            return Ok(());
        }
        let now = self.services.clock.now();
        if self.delivery.is_quiet(now) {
            let mut tx = self.services.store.begin().await?;
            outbox_sms(
                &mut tx,
                app.as_str(),
                &payload.reminder_id,
                now,
                self.delivery.next_sendable(now),
            )
            .await?;
            tx.commit().await?;
            self.delivery.metrics.sms_held(metric, "deferred");
            return Ok(());
        }
        let sms = &self.delivery.cfg.sms;
        if sms.url.is_empty() {
            let mut why = "no SMS gateway configured ([delivery.sms] url)".to_owned();
            if !sms.log_file.is_empty() {
                let masked = !sms.log_personal_data;
                let (mobile, text) = self.text(&app, &kind, &office, masked).await?;
                append_to_log(
                    &sms.log_file,
                    &payload.reminder_id,
                    &kind,
                    &mobile,
                    &text,
                    now,
                )?;
                why.push_str("; written to [delivery.sms] log_file");
            }
            self.finish(&payload.reminder_id, "unsent", None, None, Some(&why))
                .await?;
            self.delivery.metrics.sms_held(metric, "unconfigured");
            return Ok(());
        }
        let (mobile, text) = self.text(&app, &kind, &office, false).await?;
        let body = render(
            &sms.body_template,
            &[
                ("to", json_escaped(&mobile)),
                ("text", json_escaped(&text)),
                ("id", json_escaped(&payload.reminder_id)),
            ],
        );
        self.limiter.acquire().await;
        let mut request = self
            .client
            .post(&sms.url)
            .header("content-type", "application/json")
            .header("idempotency-key", &payload.reminder_id)
            .body(body);
        if !sms.authorization.is_empty() {
            request = request.header("authorization", &sms.authorization);
        }
        let failure = match request.send().await {
            Ok(response) => {
                let status = response.status();
                if status.is_success() {
                    let body: serde_json::Value = response.json().await.unwrap_or_default();
                    let message_id = body
                        .get("message_id")
                        .or_else(|| body.get("id"))
                        .map(|v| {
                            v.as_str()
                                .map(str::to_owned)
                                .unwrap_or_else(|| v.to_string())
                        })
                        .map(|s| s.chars().take(64).collect::<String>());
                    self.finish(
                        &payload.reminder_id,
                        "sent",
                        Some(i64::from(status.as_u16())),
                        message_id.as_deref(),
                        None,
                    )
                    .await?;
                    self.delivery.metrics.sms(metric, "delivered");
                    return Ok(());
                }
                let permanent = status.is_client_error()
                    && status != reqwest::StatusCode::TOO_MANY_REQUESTS
                    && status != reqwest::StatusCode::REQUEST_TIMEOUT;
                (
                    format!("gateway answered {status}"),
                    permanent,
                    Some(i64::from(status.as_u16())),
                )
            }
            Err(e) => (format!("gateway unreachable: {e}"), false, None),
        };
        let (error, permanent, status) = failure;
        let attempts = attempts + 1;
        sqlx::query("UPDATE delivery_reminders SET attempts = $1, last_error = $2, gateway_status = $3 WHERE id = $4")
            .bind(attempts)
            .bind(&error)
            .bind(status)
            .bind(&payload.reminder_id)
            .execute(self.services.store.pool())
            .await?;
        if permanent || attempts >= i64::from(sms.max_attempts) {
            self.finish(&payload.reminder_id, "failed", status, None, Some(&error))
                .await?;
            self.delivery.metrics.sms(metric, "permanent_failure");
            tracing::error!(reminder = %payload.reminder_id, kind = metric, attempts, error = %error, "SMS permanently failed; reported to operators");
            return Ok(());
        }
        self.delivery.metrics.sms(metric, "failed");
        anyhow::bail!("SMS {} attempt {attempts}: {error}", payload.reminder_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_every_placeholder() {
        let t = render(
            "{name} — {office_name} {date}",
            &[
                ("name", "علی".into()),
                ("office_name", "دفتر".into()),
                ("date", "۱ فروردین ۱۴۰۳".into()),
            ],
        );
        assert_eq!(t, "علی — دفتر ۱ فروردین ۱۴۰۳");
        assert_eq!(json_escaped("a\"b\n"), "a\\\"b\\n");
        assert_eq!(label("arrival:TEH-001"), "ready_for_pickup");
        assert_eq!(label("after_30d"), "reminder");
    }

    #[test]
    fn the_log_file_masks_names_and_mobile_numbers() {
        assert_eq!(initial("علی"), "ع.");
        assert_eq!(initial(""), "");
        assert_eq!(masked_mobile("09121234567"), "0912•••••67");
        assert_eq!(masked_mobile("12345"), "•••••");
    }
}
