//! The card life the demo plays once its batch is packed, on an accelerated calendar.
//!
//! The demo moves the process clock ([`ShiftedClock`]) forward a day at a time, at
//! `--days-per-second`, while the running process does the real work: the delivery
//! scheduler dispatches the day's boxes after the cut-off, creates the reminders due and
//! voids the cards left six months (revoking their certificates and publishing a CRL). The
//! demo plays the people around it through the same library calls as the delivery API:
//! each pickup office acknowledges its boxes the day after dispatch (the first box with one
//! card reported missing: an open discrepancy for the console), and about seven holders in
//! ten come for their card within a few weeks, giving a fresh live fingerprint at the
//! counter (the first holder presents the wrong finger once and is refused). The others
//! never come: reminded at 7, 30 and 90 days and a month before, they are voided.
//!
//! Every step reads the states first, so a demo restarted mid-life continues where it was.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use base64::Engine;
use cardpipe_common::clock::{Clock, ShiftedClock};
use cardpipe_common::domain::ApplicationId;
use cardpipe_common::runtime::Services;
use cardpipe_delivery::clients::Caller;
use cardpipe_delivery::office::{self, BoxReceipt, Handover, OfficeError};
use cardpipe_delivery::{Delivery, tehran_date, tehran_instant};
use cardpipe_registry::synth::Generator;
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::Row;
use time::{Date, Duration, Time};
use tokio_util::sync::CancellationToken;

/// What the demo needs to play the card life: the clock it moves and the delivery engine.
#[derive(Debug, Clone)]
pub struct CardLife {
    /// The process clock, moved forward by the demo.
    pub clock: ShiftedClock,
    /// The delivery engine the process runs.
    pub delivery: Arc<Delivery>,
}

/// The delivery API caller the demo's offices act as (audited under this name).
const OFFICES: &str = "demo-offices";
/// How long the demo waits for the process to do a step before it says so and goes on.
const STEP_TIMEOUT: StdDuration = StdDuration::from_secs(90);

/// What the card life did, for the closing summary.
#[derive(Debug, Default)]
pub struct LifeReport {
    /// Boxes acknowledged by offices.
    pub boxes_received: usize,
    /// Cards an office reported missing at receipt.
    pub reported_missing: usize,
    /// Handovers done.
    pub handovers: usize,
    /// Handover attempts refused (wrong finger).
    pub refused_attempts: usize,
    /// Simulated days played.
    pub days: i64,
}

/// The generator's index of an application: the demo's registry ids end in it.
fn record_index(registry_id: &str) -> Option<usize> {
    registry_id.rsplit('-').next()?.parse().ok()
}

/// Whether (and how many days after its arrival) the holder of record `i` comes: seven in
/// ten do, most within two weeks, some only after the 30-day reminder.
fn pickup_after_days(i: usize) -> Option<i64> {
    let roll = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54; // 0..1024
    match roll {
        0..=614 => Some(1 + (roll % 14) as i64),
        615..=716 => Some(31 + (roll % 40) as i64),
        _ => None,
    }
}

async fn rows(
    services: &Services,
    sql: &'static str,
    batch_id: &str,
) -> anyhow::Result<Vec<sqlx::any::AnyRow>> {
    Ok(sqlx::query(sql)
        .bind(batch_id)
        .fetch_all(services.store.pool())
        .await?)
}

async fn count_in(services: &Services, batch_id: &str, state: &str) -> anyhow::Result<i64> {
    let row =
        sqlx::query("SELECT COUNT(*) AS n FROM applications WHERE batch_id = $1 AND state = $2")
            .bind(batch_id)
            .bind(state)
            .fetch_one(services.store.pool())
            .await?;
    Ok(row.try_get("n")?)
}

/// Waits (real time) until no application of the batch is in `state`.
async fn wait_none_in(
    services: &Services,
    batch_id: &str,
    state: &str,
    what: &str,
    stop: &CancellationToken,
) -> anyhow::Result<bool> {
    let start = tokio::time::Instant::now();
    while count_in(services, batch_id, state).await? > 0 {
        if start.elapsed() > STEP_TIMEOUT {
            eprintln!(
                "demo: {what} did not happen within {}s; going on",
                STEP_TIMEOUT.as_secs()
            );
            return Ok(false);
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(false),
            _ = tokio::time::sleep(StdDuration::from_millis(200)) => {}
        }
    }
    Ok(true)
}

/// Waits (real time, bounded) until every card at its office has its arrival notice.
async fn wait_for_arrival_notices(
    services: &Services,
    batch_id: &str,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let start = tokio::time::Instant::now();
    loop {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM applications a
             WHERE a.batch_id = $1 AND a.state = 'at_office' AND NOT EXISTS (
               SELECT 1 FROM delivery_reminders r
               WHERE r.application_id = a.id AND r.kind LIKE 'arrival%')",
        )
        .bind(batch_id)
        .fetch_one(services.store.pool())
        .await?;
        if row.try_get::<i64, _>("n")? == 0 || stop.is_cancelled() {
            return Ok(());
        }
        if start.elapsed() > STEP_TIMEOUT {
            eprintln!(
                "demo: arrival notices not all queued within {}s; going on",
                STEP_TIMEOUT.as_secs()
            );
            return Ok(());
        }
        tokio::time::sleep(StdDuration::from_millis(200)).await;
    }
}

/// Plays the card life of `batch_id`'s packed cards; returns what it did.
pub async fn play(
    services: &Services,
    life: &CardLife,
    generator: &Generator,
    batch_id: &str,
    days_per_second: f64,
    stop: &CancellationToken,
) -> anyhow::Result<LifeReport> {
    let mut report = LifeReport::default();
    let clock = &life.clock;
    let delivery = &life.delivery;
    let by = Caller::Centre(OFFICES.into());
    let step = StdDuration::from_secs_f64(1.0 / days_per_second.max(0.001));
    let start_day = tehran_date(clock.now());

    // Dispatch: the scheduler sends the packed cards at the day's cut-off.
    if count_in(services, batch_id, "packed").await? > 0 {
        let mut cutoff = tehran_instant(tehran_date(clock.now()), delivery.dispatch_cutoff())
            + Duration::minutes(5);
        if cutoff <= clock.now() {
            cutoff += Duration::days(1);
        }
        clock.advance_to(cutoff)?;
        let at = delivery.dispatch_cutoff();
        eprintln!(
            "demo: the calendar now runs at {days_per_second} days per second; dispatch after the {:02}:{:02} cut-off",
            at.hour(),
            at.minute()
        );
        wait_none_in(services, batch_id, "packed", "dispatch", stop).await?;
    }

    // Office receipt the next morning, box by box; the first box misses one card.
    let shipped = rows(
        services,
        "SELECT c.box_id, c.office_code, c.application_id FROM delivery_cards c
         JOIN applications a ON a.id = c.application_id
         WHERE a.batch_id = $1 AND a.state = 'shipped' ORDER BY c.box_id, c.application_id",
        batch_id,
    )
    .await?;
    let mut boxes: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for row in &shipped {
        boxes
            .entry((row.try_get("box_id")?, row.try_get("office_code")?))
            .or_default()
            .push(row.try_get("application_id")?);
    }
    if !boxes.is_empty() {
        let morning = tehran_instant(
            tehran_date(clock.now()) + Duration::days(1),
            Time::from_hms(10, 0, 0)?,
        );
        clock.advance_to(morning)?;
        // The planted discrepancy: one card missing from the first box holding several, or
        // (a small demo, one card per box) the last box arriving without its card.
        let planted_in = boxes
            .iter()
            .find(|(_, cards)| cards.len() > 1)
            .or_else(|| boxes.iter().next_back())
            .map(|(key, _)| key.clone());
        for ((box_id, office_code), cards) in &boxes {
            let mut scanned = cards.clone();
            if planted_in.as_ref() == Some(&(box_id.clone(), office_code.clone())) {
                scanned.pop();
            }
            let receipt = BoxReceipt {
                office_code: office_code.clone(),
                clerk: "demo-clerk".into(),
                scanned: Some(scanned),
            };
            match office::receive_box(delivery, services, box_id, &receipt, &by).await {
                Ok(outcome) => {
                    report.boxes_received += 1;
                    report.reported_missing += outcome.missing.len();
                }
                Err(OfficeError::Conflict(m)) if m.contains("already received") => {}
                Err(e) => {
                    eprintln!("demo: office {office_code} could not acknowledge box {box_id}: {e}")
                }
            }
        }
    }

    // The arrival notices go out before anyone comes (the scheduler finds the cards on its
    // next tick; at a hundred days a second that could be after the first pickups).
    wait_for_arrival_notices(services, batch_id, stop).await?;

    // The calendar: day by day until every uncollected card's voiding day has passed.
    let arrivals = rows(
        services,
        "SELECT c.application_id, c.office_code, c.void_on, c.available_at, a.registry_id
         FROM delivery_cards c JOIN applications a ON a.id = c.application_id
         WHERE a.batch_id = $1 AND a.state = 'at_office'",
        batch_id,
    )
    .await?;
    let mut last_void_on = start_day;
    let mut pickups: BTreeMap<Date, Vec<(String, String, usize)>> = BTreeMap::new();
    for row in &arrivals {
        let void_on: Date = Date::parse(
            &row.try_get::<String, _>("void_on")?,
            time::macros::format_description!("[year]-[month]-[day]"),
        )?;
        last_void_on = last_void_on.max(void_on);
        let available = row
            .try_get::<Option<String>, _>("available_at")?
            .and_then(|t| cardpipe_common::clock::from_rfc3339(&t).ok())
            .map_or_else(|| tehran_date(clock.now()), tehran_date);
        let registry_id: String = row.try_get("registry_id")?;
        if let Some(i) = record_index(&registry_id)
            && let Some(after) = pickup_after_days(i)
        {
            pickups
                .entry(available + Duration::days(after))
                .or_default()
                .push((
                    row.try_get("application_id")?,
                    row.try_get("office_code")?,
                    i,
                ));
        }
    }
    let end = last_void_on + Duration::days(1);
    let today = tehran_date(clock.now());
    let total_days = (end - today).whole_days().max(0);
    let bar = ProgressBar::new(total_days as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} card life {bar:40} day {pos}/{len}  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut day = today;
    let mut first_handover = true;
    let b64 = base64::engine::general_purpose::STANDARD;
    while day <= end {
        let began = tokio::time::Instant::now();
        clock.advance_to(tehran_instant(day, Time::from_hms(11, 0, 0)?))?;
        for (id, office_code, i) in pickups.remove(&day).unwrap_or_default() {
            let app = ApplicationId(id.clone());
            let Ok((fee_rial, _)) = office::fee_due(services, &app).await else {
                continue;
            };
            let good = Handover {
                application_id: id.clone(),
                office_code,
                clerk: "demo-clerk".into(),
                fingerprint: b64.encode(generator.live_impression(i, 2, 1)),
                finger_position: Some(2),
                previous_card_presented: true,
                pins_set: true,
                fee_rial,
            };
            if first_handover {
                first_handover = false;
                // Someone else's finger on the scanner first (the holder's companion tries):
                // the 1:1 check refuses it.
                let wrong = Handover {
                    fingerprint: b64.encode(generator.live_impression(i + 1, 2, 1)),
                    ..good.clone()
                };
                if let Err(OfficeError::Forbidden(_)) =
                    office::handover(delivery, services, &wrong, &by).await
                {
                    report.refused_attempts += 1;
                }
            }
            // A live capture can fail to match (a poor impression): the clerk asks for
            // another, within the day's attempts.
            for session in 1..=3u64 {
                let attempt = Handover {
                    fingerprint: b64.encode(generator.live_impression(i, 2, session)),
                    ..good.clone()
                };
                match office::handover(delivery, services, &attempt, &by).await {
                    Ok(_) => {
                        report.handovers += 1;
                        break;
                    }
                    Err(OfficeError::Forbidden(m)) if m.contains("does not match") => {
                        report.refused_attempts += 1;
                    }
                    Err(OfficeError::Conflict(_)) => break,
                    Err(e) => {
                        eprintln!("demo: handover of {id} refused: {e}");
                        break;
                    }
                }
            }
        }
        let states = super::counts(services, batch_id).await?;
        bar.set_position((day - today).whole_days().max(0) as u64);
        bar.set_message(format!(
            "{} · collected {} · at office {} · voided {}",
            day,
            states.get("collected").unwrap_or(&0),
            states.get("at_office").unwrap_or(&0),
            states.get("voided").unwrap_or(&0)
        ));
        day = day.next_day().unwrap_or(day);
        let left = step.saturating_sub(began.elapsed());
        tokio::select! {
            _ = stop.cancelled() => { bar.abandon(); return Ok(report); }
            _ = tokio::time::sleep(left) => {}
        }
    }
    // The voiding run after the last voiding day (01:00): the scheduler voids the rest.
    clock.advance_to(tehran_instant(end, Time::from_hms(2, 0, 0)?))?;
    wait_none_in(services, batch_id, "at_office", "voiding", stop).await?;
    bar.finish();
    report.days = (tehran_date(clock.now()) - start_day).whole_days();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_holders_come_some_late_some_never() {
        let n = 10_000;
        let plans: Vec<Option<i64>> = (0..n).map(pickup_after_days).collect();
        let never = plans.iter().filter(|p| p.is_none()).count();
        let late = plans.iter().filter(|p| p.is_some_and(|d| d > 30)).count();
        assert!((2_000..4_000).contains(&never), "{never}");
        assert!((500..1_500).contains(&late), "{late}");
        assert_eq!(record_index("REG-1-00000042"), Some(42));
        assert_eq!(record_index("REG-x"), None);
    }
}
