//! `cardpipe-delivery` — from quality control to the holder's hands.
//!
//! Tour, in the order a card travels:
//!
//! * [`offices`] — the register of pickup offices (compiled-in CSV or `[delivery]
//!   offices_file`), upserted into `delivery_offices` at start.
//! * [`shipping`] — the `shipping` stage: takes `qc_passed` applications, puts each card in
//!   the open box of its pickup office (capacity configurable) → `packed`.
//! * [`dispatch`] — the daily cut-off (Tehran time): seals the boxes, writes box and shipment
//!   manifests ([`manifest`]: JSON, CSV, printable RTL HTML) to the object store, records the
//!   shipment with its carrier reference → `shipped`. Exactly once per day across replicas.
//! * [`office`] — what offices do through the API ([`api`]): acknowledge a box by scanning
//!   its id (missing or extra cards raise discrepancies) → `at_office`; a change of pickup
//!   office (re-route before packing, transfer after dispatch); the handover with a 1:1
//!   fingerprint check against the enrolled template, the previous card, the PINs and the
//!   fee (double after a voided card) → `collected`, with a registry callback and an audit entry.
//! * [`reminders`] — Persian SMS with Solar Hijri dates (`cardpipe_common::solar_hijri`): on arrival, after
//!   configured days, a month before voiding and a final notice; never in quiet hours; one
//!   row per (application, kind) and an outbox row, delivered by [`reminders::SmsSink`]
//!   through an HTTP gateway, rate-limited, retried, failures reported.
//! * [`voiding`] — daily: cards not collected six calendar months after issuance are voided,
//!   revocation of their certificates and a fresh CRL asked of the keys stage, the card
//!   recalled, the citizen told.
//! * [`clients`] — who may call the API: `[registry]` clients, and office or centre-wide
//!   delivery API clients created at run time (`cardpipe offices clients add`, hashed tokens).
//! * Discrepancies (missing and extra cards in a received box) are raised here and resolved
//!   by supervisors through `cardpipe_common::discrepancies` (found, lost in transit →
//!   a reprint asked of QC, returned).
//! * [`background`] — the loop `cardpipe run` starts: dispatch, reminders and voiding under
//!   the `delivery-scheduler` lease.

pub mod api;
pub mod background;
pub mod clients;
pub mod config;
pub mod dispatch;

pub mod manifest;
pub mod metrics;
pub mod office;
pub mod offices;
pub mod reminders;
pub mod shipping;
pub mod voiding;

use std::sync::Arc;

use cardpipe_common::runtime::Services;
use time::{Date, OffsetDateTime, Time, UtcOffset};

pub use config::DeliveryConfig;

/// Tehran's offset from UTC (Iran keeps standard time all year since 2022).
pub const TEHRAN: UtcOffset = match UtcOffset::from_hms(3, 30, 0) {
    Ok(o) => o,
    Err(_) => UtcOffset::UTC,
};

/// The date in Tehran at `at`.
pub fn tehran_date(at: OffsetDateTime) -> Date {
    at.to_offset(TEHRAN).date()
}

/// The instant of `time` on `date`, Tehran time.
pub fn tehran_instant(date: Date, time: Time) -> OffsetDateTime {
    date.with_time(time).assume_offset(TEHRAN)
}

/// The Tehran day whose daily run `run_name` (`scheduled_runs`) is due at `now`: today once
/// `at` (Tehran time) has passed and no replica has recorded today's run yet; else `None`.
pub async fn daily_run_due(
    services: &Services,
    run_name: &str,
    at: Time,
    now: OffsetDateTime,
) -> anyhow::Result<Option<Date>> {
    let today = tehran_date(now);
    if now < tehran_instant(today, at) {
        return Ok(None);
    }
    let done = sqlx::query("SELECT 1 AS x FROM scheduled_runs WHERE name = $1 AND period = $2")
        .bind(run_name)
        .bind(today.to_string())
        .fetch_optional(services.store.pool())
        .await?;
    Ok(done.is_none().then_some(today))
}

/// `date` plus `months` calendar months (the day clamped to the month's length).
pub fn add_months(date: Date, months: i32) -> Date {
    let total = date.year() * 12 + i32::from(u8::from(date.month())) - 1 + months;
    let (year, month0) = (total.div_euclid(12), total.rem_euclid(12));
    let month = time::Month::try_from(month0 as u8 + 1).unwrap_or(time::Month::January);
    let day = date.day().min(month.length(year));
    Date::from_calendar_date(year, month, day).unwrap_or(date)
}

/// The delivery engine: configuration, metrics, the office register.
pub struct Delivery {
    /// `[delivery]`.
    pub cfg: DeliveryConfig,
    /// Metrics registered in the services' registry.
    pub metrics: metrics::DeliveryMetrics,
    /// The register as loaded.
    pub register: Vec<offices::Office>,
    offices_loaded: tokio::sync::OnceCell<()>,
    /// The times of day the scheduler follows; [`Delivery::reload_times`] changes them in a
    /// running process (SIGHUP), so a new cut-off needs no restart.
    times: std::sync::RwLock<Times>,
}

/// The times of day of `[delivery]` (Tehran).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Times {
    dispatch_cutoff: Time,
    voiding_time: Time,
    quiet: (Time, Time),
}

impl Times {
    fn of(cfg: &DeliveryConfig) -> anyhow::Result<Self> {
        Ok(Self {
            dispatch_cutoff: config::parse_hhmm("dispatch_cutoff", &cfg.dispatch_cutoff)?,
            voiding_time: config::parse_hhmm("voiding_time", &cfg.voiding_time)?,
            quiet: (
                config::parse_hhmm("reminders.quiet_start", &cfg.reminders.quiet_start)?,
                config::parse_hhmm("reminders.quiet_end", &cfg.reminders.quiet_end)?,
            ),
        })
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("cfg", &self.cfg)
            .field("offices", &self.register.len())
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// An engine for `cfg`, registering its metrics in `services`.
    pub fn new(services: &Services, cfg: DeliveryConfig) -> anyhow::Result<Arc<Self>> {
        cfg.validate()?;
        let register = offices::load_register(&cfg.offices_file)?;
        let metrics = metrics::DeliveryMetrics::new();
        metrics.register(&services.metrics);
        Ok(Arc::new(Self {
            times: std::sync::RwLock::new(Times::of(&cfg)?),
            cfg,
            metrics,
            register,
            offices_loaded: tokio::sync::OnceCell::new(),
        }))
    }

    /// Upserts the register into the store once per process.
    pub async fn ensure_offices(&self, services: &Services) -> anyhow::Result<()> {
        self.offices_loaded
            .get_or_try_init(|| async {
                let n =
                    offices::upsert(&services.store, &self.register, services.clock.now()).await?;
                tracing::info!(offices = n, "pickup offices register loaded");
                Ok::<(), anyhow::Error>(())
            })
            .await?;
        Ok(())
    }

    fn times(&self) -> Times {
        *self.times.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The daily dispatch cut-off in force (Tehran).
    pub fn dispatch_cutoff(&self) -> Time {
        self.times().dispatch_cutoff
    }

    /// The daily voiding run time in force (Tehran).
    pub fn voiding_time(&self) -> Time {
        self.times().voiding_time
    }

    /// Takes the times of day of `cfg` (dispatch cut-off, voiding time, quiet hours) into
    /// this running engine: the scheduler follows them from its next tick. Returns what
    /// changed (`"dispatch_cutoff 16:00 -> 17:30"`); nothing changes when `cfg` is invalid.
    pub fn reload_times(&self, cfg: &DeliveryConfig) -> anyhow::Result<Vec<String>> {
        cfg.validate()?;
        let new = Times::of(cfg)?;
        let mut times = self.times.write().unwrap_or_else(|e| e.into_inner());
        let hhmm = |t: Time| format!("{:02}:{:02}", t.hour(), t.minute());
        let mut changed = Vec::new();
        for (name, old, new) in [
            (
                "dispatch_cutoff",
                times.dispatch_cutoff,
                new.dispatch_cutoff,
            ),
            ("voiding_time", times.voiding_time, new.voiding_time),
            ("reminders.quiet_start", times.quiet.0, new.quiet.0),
            ("reminders.quiet_end", times.quiet.1, new.quiet.1),
        ] {
            if old != new {
                changed.push(format!("{name} {} -> {}", hhmm(old), hhmm(new)));
            }
        }
        *times = new;
        Ok(changed)
    }

    /// Whether `at` falls in the quiet hours (Tehran time).
    pub fn is_quiet(&self, at: OffsetDateTime) -> bool {
        let t = at.to_offset(TEHRAN).time();
        let (start, end) = self.times().quiet;
        if start == end {
            false
        } else if start < end {
            t >= start && t < end
        } else {
            t >= start || t < end
        }
    }

    /// The first instant at or after `at` outside the quiet hours.
    pub fn next_sendable(&self, at: OffsetDateTime) -> OffsetDateTime {
        if !self.is_quiet(at) {
            return at;
        }
        let local = at.to_offset(TEHRAN);
        let quiet_end = self.times().quiet.1;
        let end_today = tehran_instant(local.date(), quiet_end);
        if end_today > at {
            end_today
        } else {
            tehran_instant(local.date().next_day().unwrap_or(local.date()), quiet_end)
        }
    }

    /// The Tehran date from which a card issued at `issued_at` is voided.
    pub fn void_on(&self, issued_at: OffsetDateTime) -> Date {
        add_months(
            tehran_date(issued_at),
            i32::from(self.cfg.void_after_months),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::{date, datetime};

    #[test]
    fn calendar_months_clamp_to_the_month_end() {
        assert_eq!(add_months(date!(2026 - 01 - 15), 6), date!(2026 - 07 - 15));
        assert_eq!(add_months(date!(2026 - 08 - 31), 6), date!(2027 - 02 - 28));
        assert_eq!(add_months(date!(2027 - 08 - 31), 6), date!(2028 - 02 - 29));
        assert_eq!(add_months(date!(2026 - 03 - 31), -1), date!(2026 - 02 - 28));
    }

    #[test]
    fn tehran_dates_and_instants() {
        // 21:00 UTC is 00:30 the next day in Tehran.
        assert_eq!(
            tehran_date(datetime!(2026-03-20 21:00 UTC)),
            date!(2026 - 03 - 21)
        );
        assert_eq!(
            tehran_instant(date!(2026 - 03 - 21), Time::from_hms(8, 0, 0).unwrap()),
            datetime!(2026-03-21 04:30 UTC)
        );
    }
}
