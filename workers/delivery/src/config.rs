//! The `[delivery]` configuration section.

use serde::Deserialize;

/// Section name in `pipeline.toml`.
pub const SECTION: &str = "delivery";

/// `[delivery]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// CSV of pickup offices (code,name,kind,province,city,address,phone); empty: the
    /// register compiled into the binary.
    pub offices_file: String,
    /// Cards per box.
    pub box_capacity: u32,
    /// Daily dispatch cut-off, Tehran time (HH:MM): boxes packed before it leave that day.
    pub dispatch_cutoff: String,
    /// Carrier name printed on manifests.
    pub carrier: String,
    /// Prefix of the carrier reference (`<prefix><YYYYMMDD>-<n>`).
    pub carrier_reference_prefix: String,
    /// Calendar months after issuance before an uncollected card is voided.
    pub void_after_months: u8,
    /// Daily voiding run, Tehran time (HH:MM).
    pub voiding_time: String,
    /// How often the background loop looks for due work (milliseconds).
    pub tick_ms: u64,
    /// Largest false-match rate accepted for the 1:1 fingerprint check at handover.
    pub handover_fmr: f64,
    /// Fingerprint attempts per card and (Tehran) day at handover; then a centre supervisor
    /// must unlock the card (`cardpipe ops handover-unlock`).
    pub handover_attempts_per_day: u32,
    /// Reminders.
    pub reminders: ReminderConfig,
    /// The SMS gateway.
    pub sms: SmsConfig,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            offices_file: String::new(),
            box_capacity: 50,
            dispatch_cutoff: "16:00".into(),
            carrier: "Post Express (EMS)".into(),
            carrier_reference_prefix: "EMS".into(),
            void_after_months: 6,
            voiding_time: "01:00".into(),
            tick_ms: 1000,
            handover_fmr: 1e-4,
            handover_attempts_per_day: 3,
            reminders: ReminderConfig::default(),
            sms: SmsConfig::default(),
        }
    }
}

/// `[delivery.reminders]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReminderConfig {
    /// Reminders this many days after the card reached the office.
    pub after_days: Vec<u32>,
    /// Send a reminder one calendar month before the voiding date.
    pub month_before_voiding: bool,
    /// Final notice this many days before the voiding date (0: none).
    pub final_notice_days_before: u32,
    /// Quiet hours, Tehran time: no SMS from `quiet_start` to `quiet_end` (HH:MM).
    pub quiet_start: String,
    /// End of quiet hours (HH:MM).
    pub quiet_end: String,
    /// Template of the arrival SMS. Placeholders: {name}, {office_name}, {office_address},
    /// {office_phone}, {tracking_code}, {date}, {void_date}, {days}; {bring} (what the holder
    /// must bring: the previous card too for groups 3 and 4), {fee} (the delivery fee due at
    /// handover, or that it was prepaid), {double_issuance} (the issuance fee after a voided
    /// card) — all from the fee model and the handover rules, so the text never disagrees with
    /// what the office asks.
    pub arrival_text: String,
    /// Template of the reminders (same placeholders).
    pub reminder_text: String,
    /// Template of the final notice (same placeholders).
    pub final_text: String,
    /// Template of the voiding notice (same placeholders).
    pub voided_text: String,
}

impl Default for ReminderConfig {
    fn default() -> Self {
        Self {
            after_days: vec![7, 30, 90],
            month_before_voiding: true,
            final_notice_days_before: 7,
            quiet_start: "22:00".into(),
            quiet_end: "08:00".into(),
            arrival_text: "{name} گرامی، کارت هوشمند ملی شما از {date} در {office_name} به نشانی {office_address} آماده تحویل است. لطفاً تا {void_date} با {bring} مراجعه فرمایید. {fee} کد پیگیری: {tracking_code}".into(),
            reminder_text: "{name} گرامی، کارت هوشمند ملی شما {days} روز است در {office_name} به نشانی {office_address} در انتظار تحویل است. مهلت تحویل تا {void_date}؛ همراه داشتن {bring} الزامی است. کد پیگیری: {tracking_code}".into(),
            final_text: "{name} گرامی، آخرین اخطار: کارت هوشمند ملی شما در {office_name} به نشانی {office_address} تا {void_date} تحویل گرفته نشود باطل می‌شود.".into(),
            voided_text: "{name} گرامی، کارت هوشمند ملی شما چون تا {void_date} تحویل گرفته نشد باطل شد. برای دریافت کارت باید درخواست جدید ثبت کنید و هزینه صدور دو برابر ({double_issuance}) است. کد پیگیری: {tracking_code}".into(),
        }
    }
}

/// `[delivery.sms]`: the HTTP SMS gateway.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmsConfig {
    /// Gateway URL (POST); empty: messages are recorded `unsent` (and written to `log_file`
    /// if set), and sent once a gateway is configured.
    pub url: String,
    /// Value of the `Authorization` header (e.g. `Bearer <token>`); empty: none.
    pub authorization: String,
    /// JSON body template; {to}, {text} and {id} are replaced by JSON-escaped values.
    pub body_template: String,
    /// Messages per second at most (all kinds together, per process).
    pub rate_per_second: f64,
    /// Failed sends before a message is given up and reported.
    pub max_attempts: u32,
    /// Per-request timeout (seconds).
    pub timeout_secs: u64,
    /// Without a gateway (`url` empty): append each message to this file (NDJSON), so its
    /// text can be read and sent by other means; the message stays `unsent` and goes out
    /// when a gateway is configured. Names and mobile numbers are masked in it unless
    /// `log_personal_data`. Empty: no file.
    pub log_file: String,
    /// Write names and mobile numbers to `log_file` in clear (to send them by other means):
    /// for development only, never on a production machine.
    pub log_personal_data: bool,
}

impl std::fmt::Debug for SmsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmsConfig")
            .field("url", &self.url)
            .field("rate_per_second", &self.rate_per_second)
            .finish_non_exhaustive()
    }
}

impl Default for SmsConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            authorization: String::new(),
            body_template: r#"{"to": "{to}", "text": "{text}", "message_id": "{id}"}"#.into(),
            rate_per_second: 20.0,
            max_attempts: 8,
            timeout_secs: 10,
            log_file: String::new(),
            log_personal_data: false,
        }
    }
}

/// A wall-clock time of day as HH:MM.
pub fn parse_hhmm(key: &str, text: &str) -> anyhow::Result<time::Time> {
    let bad = || anyhow::anyhow!("delivery.{key}: expected a time as HH:MM, got {text:?}");
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    let (h, m): (u8, u8) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    time::Time::from_hms(h, m, 0).map_err(|_| bad())
}

impl DeliveryConfig {
    /// Rules beyond the types, each naming its key.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.box_capacity == 0 || self.box_capacity > 10_000 {
            anyhow::bail!(
                "delivery.box_capacity: must be 1–10000, got {}",
                self.box_capacity
            );
        }
        if self.void_after_months == 0 || self.void_after_months > 60 {
            anyhow::bail!(
                "delivery.void_after_months: must be 1–60, got {}",
                self.void_after_months
            );
        }
        parse_hhmm("dispatch_cutoff", &self.dispatch_cutoff)?;
        parse_hhmm("voiding_time", &self.voiding_time)?;
        parse_hhmm("reminders.quiet_start", &self.reminders.quiet_start)?;
        parse_hhmm("reminders.quiet_end", &self.reminders.quiet_end)?;
        if !(self.handover_fmr > 0.0 && self.handover_fmr < 1.0) {
            anyhow::bail!(
                "delivery.handover_fmr: must be in (0, 1), got {}",
                self.handover_fmr
            );
        }
        if self.handover_attempts_per_day == 0 {
            anyhow::bail!("delivery.handover_attempts_per_day: must be at least 1");
        }
        if self.sms.rate_per_second.is_nan() || self.sms.rate_per_second <= 0.0 {
            anyhow::bail!("delivery.sms.rate_per_second: must be positive");
        }
        if self.sms.max_attempts == 0 {
            anyhow::bail!("delivery.sms.max_attempts: must be at least 1");
        }
        if !self.sms.url.is_empty() && !self.sms.url.starts_with("http") {
            anyhow::bail!("delivery.sms.url: must be an http(s) URL");
        }
        Ok(())
    }
}

/// Reads `[delivery]` (defaults when absent) and checks it.
pub fn load(config: &cardpipe_common::config::LoadedConfig) -> anyhow::Result<DeliveryConfig> {
    let cfg = match config.section::<DeliveryConfig>(SECTION) {
        Ok(c) => c,
        Err(errors)
            if errors
                .iter()
                .all(|e| e.key == SECTION && e.message.contains("missing")) =>
        {
            DeliveryConfig::default()
        }
        Err(errors) => anyhow::bail!("{}", cardpipe_common::config::describe(&errors)),
    };
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Change = Box<dyn Fn(&mut DeliveryConfig)>;

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_key() {
        DeliveryConfig::default().validate().unwrap();
        let cases: [(&str, Change); 5] = [
            ("delivery.box_capacity", Box::new(|c| c.box_capacity = 0)),
            (
                "delivery.dispatch_cutoff",
                Box::new(|c| c.dispatch_cutoff = "25:00".into()),
            ),
            (
                "delivery.reminders.quiet_start",
                Box::new(|c| c.reminders.quiet_start = "ten".into()),
            ),
            ("delivery.handover_fmr", Box::new(|c| c.handover_fmr = 1.5)),
            (
                "delivery.sms.url",
                Box::new(|c| c.sms.url = "ftp://x".into()),
            ),
        ];
        for (key, change) in cases {
            let mut cfg = DeliveryConfig::default();
            change(&mut cfg);
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.starts_with(key), "{err}");
        }
        assert_eq!(
            parse_hhmm("x", "08:30").unwrap(),
            time::Time::from_hms(8, 30, 0).unwrap()
        );
    }
}
