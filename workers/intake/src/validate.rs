//! Validation of one batch record against every rule of the programme.
//!
//! Two phases: [`check_fields`] reads the JSON object (no I/O) and collects
//! every problem as a [`FieldError`]; [`check_artifacts`] validates the photo
//! and fingerprint bytes once they are fetched. Errors name the field and the
//! rule, never the value: no national code, name or biometric ever appears in
//! an error text or a log line.

use base64::Engine;
use cardpipe_common::domain::Priority;
use cardpipe_common::domain::applicant::{
    ApplicantGroup, ApplicantRecord, Biometrics, Fees, FingerprintEntry, Gender,
};
use cardpipe_common::solar_hijri::SolarHijri;
use serde::Serialize;
use serde_json::{Map, Value};
use time::Date;

use cardpipe_registry::config::RegistryConfig;

use cardpipe_common::domain::fees::{self, ISSUANCE_RIAL};

/// Reason given to applicants residing abroad.
pub const ABROAD_REASON: &str = "applicants residing abroad receive the legacy national card for now; this pipeline does not issue it";

/// One problem with one field of a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FieldError {
    /// The field (dotted path, e.g. `fees.office_fee_rial`, `fingerprints[3].template`).
    pub field: String,
    /// What rule it breaks (never the value).
    pub reason: String,
}

impl FieldError {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// An accepted record's flag (accepted for processing, reported to operators
/// and to the registry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Flag {
    /// Kind (`overcharge`, `double_fee_unpaid`).
    pub flag: String,
    /// The field.
    pub field: String,
    /// Why.
    pub reason: String,
}

/// The fee model's flags ([`cardpipe_common::domain::fees`]) as intake records them.
pub fn fee_flags(f: &Fees, after_voided_card: bool) -> Vec<Flag> {
    fees::flags(f, after_voided_card)
        .into_iter()
        .map(|f| Flag {
            flag: f.flag.into(),
            field: f.field.into(),
            reason: f.reason,
        })
        .collect()
}

/// Where an artifact's bytes are.
#[derive(Clone, PartialEq, Eq)]
pub enum ArtifactRef {
    /// Sent inline (base64, already decoded).
    Inline(Vec<u8>),
    /// An object key in the object store.
    Key(String),
}

impl std::fmt::Debug for ArtifactRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArtifactRef::Inline(b) => write!(f, "Inline(<{} bytes>)", b.len()),
            ArtifactRef::Key(k) => write!(f, "Key({k:?})"),
        }
    }
}

/// One finger position as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrintRef {
    /// A template.
    Template(ArtifactRef),
    /// `unavailable` or `amputated`.
    Missing(String),
}

/// What the field phase found: the record when every field is valid, and the
/// artifact references (checked whatever the other fields' fate, so every
/// problem is reported at once).
#[derive(Debug, Default)]
pub struct Checked {
    /// The registry's application id, when readable.
    pub registry_id: Option<String>,
    /// The record, when every field was valid.
    pub record: Option<ApplicantRecord>,
    /// Priority of the record.
    pub priority: Priority,
    /// The photo reference.
    pub photo: Option<ArtifactRef>,
    /// Finger positions 1–10 (index = position − 1), when the list was well formed.
    pub prints: Option<Vec<PrintRef>>,
    /// Problems.
    pub errors: Vec<FieldError>,
    /// Flags.
    pub flags: Vec<Flag>,
}

/// Maps Persian (۰–۹) and Arabic-Indic (٠–٩) digits to ASCII.
pub fn normalise_digits(s: &str) -> String {
    s.trim()
        .chars()
        .map(|c| match c {
            '\u{06F0}'..='\u{06F9}' => char::from(b'0' + (c as u32 - 0x06F0) as u8),
            '\u{0660}'..='\u{0669}' => char::from(b'0' + (c as u32 - 0x0660) as u8),
            c => c,
        })
        .collect()
}

/// Checks an Iranian national code (after digit normalisation); returns the
/// ASCII form or the reason it is invalid.
pub fn check_national_code(raw: &str) -> Result<String, &'static str> {
    let code = normalise_digits(raw);
    if code.len() != 10 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err("must be 10 digits");
    }
    let d: Vec<u32> = code.bytes().map(|b| u32::from(b - b'0')).collect();
    if d.iter().all(|&x| x == d[0]) {
        return Err("a code of one repeated digit is not a valid national code");
    }
    let s: u32 = (0..9).map(|i| d[i] * (10 - i as u32)).sum::<u32>() % 11;
    let check = if s < 2 { s } else { 11 - s };
    if d[9] != check {
        return Err("check digit does not match");
    }
    Ok(code)
}

/// The Solar Hijri year of a Gregorian date.
pub fn solar_hijri_year(date: Date) -> Option<i32> {
    SolarHijri::from_gregorian(date).ok().map(|d| d.year)
}

/// Full years between `birth` and `on`.
pub fn full_years(birth: Date, on: Date) -> i32 {
    let mut years = on.year() - birth.year();
    if (u8::from(on.month()), on.day()) < (u8::from(birth.month()), birth.day()) {
        years -= 1;
    }
    years
}

/// Structural JPEG check: SOI, well-formed segments, quantisation and Huffman
/// tables, a frame header with sane dimensions, at least one scan, EOI last.
/// Returns (width, height).
pub fn check_jpeg(b: &[u8], min_side: u16, max_side: u16) -> Result<(u16, u16), String> {
    let n = b.len();
    if n < 4 || b[0] != 0xFF || b[1] != 0xD8 {
        return Err("not a JPEG (no start-of-image marker)".into());
    }
    if b[n - 2] != 0xFF || b[n - 1] != 0xD9 {
        return Err("truncated JPEG (no end-of-image marker)".into());
    }
    let (mut dqt, mut dht, mut sos) = (false, false, false);
    let mut frame: Option<(u16, u16)> = None;
    let mut i = 2;
    loop {
        if i + 1 >= n || b[i] != 0xFF {
            return Err("corrupt JPEG segment structure".into());
        }
        while i + 1 < n && b[i + 1] == 0xFF {
            i += 1;
        }
        let m = b[i + 1];
        i += 2;
        match m {
            0xD9 => {
                if i != n {
                    return Err("data after the end-of-image marker".into());
                }
                break;
            }
            0x01 | 0xD0..=0xD7 => continue,
            0xD8 => return Err("nested start-of-image marker".into()),
            _ => {}
        }
        if i + 2 > n {
            return Err("truncated JPEG segment".into());
        }
        let len = usize::from(u16::from_be_bytes([b[i], b[i + 1]]));
        if len < 2 || i + len > n {
            return Err("JPEG segment length out of bounds".into());
        }
        let seg = &b[i + 2..i + len];
        match m {
            0xDB => dqt = true,
            0xC4 => dht = true,
            0xC0..=0xCF if m != 0xC4 && m != 0xC8 && m != 0xCC => {
                if frame.is_some() {
                    return Err("more than one JPEG frame header".into());
                }
                if seg.len() < 6 {
                    return Err("short JPEG frame header".into());
                }
                let h = u16::from_be_bytes([seg[1], seg[2]]);
                let w = u16::from_be_bytes([seg[3], seg[4]]);
                let comps = seg[5];
                if seg[0] != 8 && seg[0] != 12 {
                    return Err("unsupported JPEG sample precision".into());
                }
                if comps != 1 && comps != 3 {
                    return Err("JPEG must be greyscale or colour (1 or 3 components)".into());
                }
                if seg.len() != 6 + 3 * usize::from(comps) {
                    return Err("malformed JPEG frame header".into());
                }
                frame = Some((w, h));
            }
            0xDA => {
                if frame.is_none() {
                    return Err("JPEG scan before its frame header".into());
                }
                sos = true;
                // Skip the entropy-coded data up to the next real marker.
                let mut j = i + len;
                loop {
                    if j + 1 >= n {
                        return Err("truncated JPEG scan data".into());
                    }
                    if b[j] == 0xFF && b[j + 1] != 0x00 && !(0xD0..=0xD7).contains(&b[j + 1]) {
                        break;
                    }
                    j += 1;
                }
                i = j;
                continue;
            }
            _ => {}
        }
        i += len;
    }
    let (w, h) = frame.ok_or("JPEG has no frame header")?;
    if !dqt {
        return Err("JPEG lacks quantisation tables".into());
    }
    if !sos {
        return Err("JPEG has no image scan".into());
    }
    if !dht {
        return Err("JPEG lacks Huffman tables".into());
    }
    for side in [w, h] {
        if side < min_side || side > max_side {
            return Err(format!(
                "photo dimensions must be between {min_side} and {max_side} pixels per side"
            ));
        }
    }
    Ok((w, h))
}

/// Validates one fingerprint template for the contract's `position` (1–10) by the rule the
/// dedup stage places it with ([`cardpipe_biometrics::matcher::place_finger`]): a record intake
/// accepts is never refused by dedup. The reason names positions and byte offsets only.
pub fn check_template(bytes: &[u8], position: u8) -> Result<(), String> {
    cardpipe_biometrics::matcher::place_finger(position, bytes)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

struct Reader<'a> {
    obj: &'a Map<String, Value>,
    errors: Vec<FieldError>,
}

impl Reader<'_> {
    fn err(&mut self, field: &str, reason: impl Into<String>) {
        self.errors.push(FieldError::new(field, reason));
    }

    fn raw_str(&mut self, field: &str) -> Option<String> {
        match self.obj.get(field) {
            None | Some(Value::Null) => {
                self.err(field, "required");
                None
            }
            Some(Value::String(s)) if s.trim().is_empty() => {
                self.err(field, "required (empty)");
                None
            }
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                self.err(field, "must be a string");
                None
            }
        }
    }

    /// Required text: trimmed, at most `max` characters, no control characters.
    fn text(&mut self, field: &str, max: usize) -> Option<String> {
        let s = self.raw_str(field)?.trim().to_owned();
        if s.chars().count() > max {
            self.err(field, format!("longer than {max} characters"));
            return None;
        }
        if s.chars().any(char::is_control) {
            self.err(field, "contains control characters");
            return None;
        }
        Some(s)
    }

    fn code(&mut self, field: &str, max: usize) -> Option<String> {
        let s = normalise_digits(&self.raw_str(field)?);
        if s.len() > max
            || !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            self.err(
                field,
                format!("must be 1–{max} letters, digits, '-', '_' or '.'"),
            );
            return None;
        }
        Some(s)
    }

    fn name(&mut self, field: &str) -> Option<String> {
        let s = self.text(field, 100)?;
        if !s
            .chars()
            .all(|c| c.is_alphabetic() || matches!(c, ' ' | '\u{200C}' | '-' | '\'' | '.'))
        {
            self.err(
                field,
                "may hold letters, spaces and the zero-width non-joiner only",
            );
            return None;
        }
        Some(s)
    }

    fn date(&mut self, field: &str) -> Option<Date> {
        let s = self.raw_str(field)?;
        parse_date(&s).or_else(|| {
            self.err(field, "must be a valid date YYYY-MM-DD");
            None
        })
    }

    fn opt_date(&mut self, field: &str) -> Option<Option<Date>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Some(None),
            Some(Value::String(s)) if s.trim().is_empty() => Some(None),
            Some(_) => self.date(field).map(Some),
        }
    }

    fn choice<T: Copy>(&mut self, field: &str, options: &[(&str, T)]) -> Option<T> {
        let s = self.raw_str(field)?;
        if let Some((_, v)) = options.iter().find(|(name, _)| *name == s.trim()) {
            return Some(*v);
        }
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        self.err(field, format!("must be one of {}", names.join(", ")));
        None
    }
}

fn parse_date(s: &str) -> Option<Date> {
    let s = normalise_digits(s);
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    Date::parse(&s, &fmt).ok()
}

/// Normalises a phone number: Persian digits, spaces and dashes, `+98` / `0098`.
fn normalise_phone(raw: &str) -> String {
    let s: String = normalise_digits(raw)
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '(' | ')'))
        .collect();
    if let Some(rest) = s.strip_prefix("+98") {
        format!("0{rest}")
    } else if let Some(rest) = s.strip_prefix("0098") {
        format!("0{rest}")
    } else {
        s
    }
}

fn artifact(value: &Value, field: &str, errors: &mut Vec<FieldError>) -> Option<ArtifactRef> {
    match value {
        Value::String(s) if !s.is_empty() => {
            match base64::engine::general_purpose::STANDARD.decode(s.as_bytes()) {
                Ok(b) => Some(ArtifactRef::Inline(b)),
                Err(_) => {
                    errors.push(FieldError::new(
                        field,
                        "inline artifact is not valid base64",
                    ));
                    None
                }
            }
        }
        Value::Object(o) => match o.get("object_key") {
            Some(Value::String(k)) if !k.is_empty() => Some(ArtifactRef::Key(k.clone())),
            _ => {
                errors.push(FieldError::new(
                    field,
                    "must be base64 text or {\"object_key\": \"...\"}",
                ));
                None
            }
        },
        Value::Null => {
            errors.push(FieldError::new(field, "required"));
            None
        }
        _ => {
            errors.push(FieldError::new(
                field,
                "must be base64 text or {\"object_key\": \"...\"}",
            ));
            None
        }
    }
}

fn fee(fees: &Map<String, Value>, key: &str, errors: &mut Vec<FieldError>) -> Option<i64> {
    let field = format!("fees.{key}");
    match fees.get(key) {
        Some(Value::Number(n)) => match n.as_i64() {
            Some(v) if v >= 0 => Some(v),
            _ => {
                errors.push(FieldError::new(
                    field,
                    "must be a whole, non-negative amount in rial",
                ));
                None
            }
        },
        None | Some(Value::Null) => {
            errors.push(FieldError::new(field, "required"));
            None
        }
        Some(_) => {
            errors.push(FieldError::new(field, "must be a number (rial)"));
            None
        }
    }
}

/// Checks every field of one record. `today` is the application's reference
/// date (Tehran) for "not in the future" rules.
pub fn check_fields(value: &Value, cfg: &RegistryConfig, today: Date) -> Checked {
    let mut out = Checked::default();
    let Some(obj) = value.as_object() else {
        out.errors
            .push(FieldError::new("(record)", "must be a JSON object"));
        return out;
    };
    let mut r = Reader {
        obj,
        errors: Vec::new(),
    };
    let registry_id = r.code("application_id", 64);
    out.registry_id = registry_id.clone();
    let applied_on = r.date("applied_on");
    if let Some(d) = applied_on
        && d > today
    {
        r.err("applied_on", "is in the future");
    }
    let tracking_code = r.code("tracking_code", 64);
    let payment_tracking_code = match obj.get("payment_tracking_code") {
        None | Some(Value::Null) => {
            r.err(
                "payment_tracking_code",
                "required: the issuance fee must be paid online before enrolment",
            );
            None
        }
        _ => r.code("payment_tracking_code", 64),
    };
    let national_code = r.raw_str("national_code").and_then(|s| {
        check_national_code(&s).map_or_else(
            |reason| {
                r.err("national_code", reason);
                None
            },
            Some,
        )
    });
    let first_name = r.name("first_name");
    let last_name = r.name("last_name");
    let father_name = r.name("father_name");
    let birth_date = r.date("birth_date");
    if let (Some(b), Some(a)) = (birth_date, applied_on) {
        if b > a {
            r.err("birth_date", "is after the application date");
        } else if full_years(b, a) < cfg.minimum_age {
            r.err(
                "birth_date",
                format!(
                    "applicant must be at least {} full years old on the application date",
                    cfg.minimum_age
                ),
            );
        }
    }
    if let Some(b) = birth_date
        && b.year() < 1900
    {
        r.err("birth_date", "is before 1900");
    }
    let birth_certificate_number = r.raw_str("birth_certificate_number").and_then(|s| {
        let s = normalise_digits(&s);
        if !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit()) {
            Some(s)
        } else {
            r.err("birth_certificate_number", "must be 1–10 digits");
            None
        }
    });
    let gender = r.choice(
        "gender",
        &[("male", Gender::Male), ("female", Gender::Female)],
    );
    let postal_code = r.raw_str("postal_code").and_then(|s| {
        let s = normalise_digits(&s).replace('-', "");
        if s.len() == 10 && s.bytes().all(|b| b.is_ascii_digit()) {
            Some(s)
        } else {
            r.err("postal_code", "must be 10 digits");
            None
        }
    });
    let address = r.text("address", 500);
    let mobile = r.raw_str("mobile").and_then(|s| {
        let s = normalise_phone(&s);
        if s.len() == 11 && s.starts_with("09") && s.bytes().all(|b| b.is_ascii_digit()) {
            Some(s)
        } else {
            r.err("mobile", "must be an Iranian mobile number 09xxxxxxxxx");
            None
        }
    });
    let landline = r.raw_str("landline").and_then(|s| {
        let s = normalise_phone(&s);
        let ok = s.len() == 11
            && s.as_bytes()[0] == b'0'
            && (b'1'..=b'8').contains(&s.as_bytes()[1])
            && s.bytes().all(|b| b.is_ascii_digit());
        if ok {
            Some(s)
        } else {
            r.err(
                "landline",
                "must be a landline with its area code, 0 + 10 digits (e.g. 021xxxxxxxx)",
            );
            None
        }
    });
    let group = r.choice(
        "applicant_group",
        &[
            ("first_card", ApplicantGroup::FirstCard),
            ("lost_or_changed", ApplicantGroup::LostOrChanged),
            ("replace_1380_1389", ApplicantGroup::Replace13801389),
            ("voluntary_1390_1396", ApplicantGroup::Voluntary13901396),
        ],
    );
    let previous = r.opt_date("previous_card_issued_on");
    if let (Some(group), Some(previous)) = (group, previous) {
        let field = "previous_card_issued_on";
        let range = match group {
            ApplicantGroup::Replace13801389 => Some((1380, 1389)),
            ApplicantGroup::Voluntary13901396 => Some((1390, 1396)),
            _ => None,
        };
        match (range, previous) {
            (Some(_), None) => r.err(field, "required for applicant groups 3 and 4"),
            (Some((lo, hi)), Some(d)) => match solar_hijri_year(d) {
                Some(y) if (lo..=hi).contains(&y) => {}
                _ => r.err(
                    field,
                    format!(
                        "for this applicant group the previous card must have been issued in Solar Hijri {lo}–{hi}"
                    ),
                ),
            },
            (None, Some(_)) if group == ApplicantGroup::FirstCard => {
                r.err(field, "a first-card applicant has no previous card")
            }
            _ => {}
        }
        if let (Some(d), Some(a)) = (previous, applied_on)
            && d > a
        {
            r.err(field, "is after the application date");
        }
    }
    if let Some(false) = r.choice("residence", &[("domestic", true), ("abroad", false)]) {
        r.err("residence", ABROAD_REASON);
    }
    let pickup_office = r.code("pickup_office", 32);
    if let Some(office) = &pickup_office
        && !cfg.offices.is_empty()
        && !cfg.offices.contains(office)
    {
        r.err("pickup_office", "unknown office code");
    }
    out.priority = match obj.get("priority") {
        None | Some(Value::Null) => Priority::Normal,
        _ => r
            .choice(
                "priority",
                &[("normal", Priority::Normal), ("urgent", Priority::Urgent)],
            )
            .unwrap_or_default(),
    };
    // Fees.
    let mut fee_errors = Vec::new();
    let fees = match obj.get("fees") {
        Some(Value::Object(f)) => {
            let issuance = fee(f, "issuance_rial", &mut fee_errors);
            let office = fee(f, "office_fee_rial", &mut fee_errors);
            let delivery = fee(f, "delivery_fee_rial", &mut fee_errors);
            match (issuance, office, delivery) {
                (Some(i), Some(o), Some(d)) => Some(Fees {
                    issuance_rial: i,
                    office_fee_rial: o,
                    delivery_fee_rial: d,
                }),
                _ => None,
            }
        }
        None | Some(Value::Null) => {
            fee_errors.push(FieldError::new("fees", "required"));
            None
        }
        Some(_) => {
            fee_errors.push(FieldError::new("fees", "must be an object"));
            None
        }
    };
    r.errors.append(&mut fee_errors);
    if let Some(f) = fees {
        if f.issuance_rial < ISSUANCE_RIAL {
            r.err(
                "fees.issuance_rial",
                format!("issuance fee of {ISSUANCE_RIAL} rial not fully paid"),
            );
        }
        // As for a first application; intake re-checks against a voided earlier card of the
        // same national code (the issuance fee then doubles).
        out.flags.extend(fee_flags(&f, false));
    }
    // Photo.
    let mut art_errors = Vec::new();
    out.photo = match obj.get("photo") {
        None => {
            art_errors.push(FieldError::new("photo", "required"));
            None
        }
        Some(v) => artifact(v, "photo", &mut art_errors),
    };
    // Fingerprints: all ten positions, each a template or an explicit code.
    out.prints = match obj.get("fingerprints") {
        Some(Value::Array(list)) => {
            let mut slots: Vec<Option<PrintRef>> = vec![None; 10];
            let mut ok = true;
            for (i, item) in list.iter().enumerate() {
                let field = format!("fingerprints[{i}]");
                let Some(o) = item.as_object() else {
                    art_errors.push(FieldError::new(field, "must be an object"));
                    ok = false;
                    continue;
                };
                let pos = match o.get("position").and_then(Value::as_u64) {
                    Some(p @ 1..=10) => p as usize,
                    _ => {
                        art_errors.push(FieldError::new(
                            format!("{field}.position"),
                            "must be a finger position 1–10",
                        ));
                        ok = false;
                        continue;
                    }
                };
                if slots[pos - 1].is_some() {
                    art_errors.push(FieldError::new(
                        format!("{field}.position"),
                        format!("position {pos} given twice"),
                    ));
                    ok = false;
                    continue;
                }
                let entry = match (o.get("template"), o.get("missing")) {
                    (Some(t), None) if !t.is_null() => {
                        artifact(t, &format!("{field}.template"), &mut art_errors)
                            .map(PrintRef::Template)
                    }
                    (None | Some(Value::Null), Some(Value::String(m)))
                        if m == "unavailable" || m == "amputated" =>
                    {
                        Some(PrintRef::Missing(m.clone()))
                    }
                    (None | Some(Value::Null), Some(_)) => {
                        art_errors.push(FieldError::new(
                            format!("{field}.missing"),
                            "must be \"unavailable\" or \"amputated\"",
                        ));
                        None
                    }
                    (Some(t), Some(_)) if !t.is_null() => {
                        art_errors.push(FieldError::new(
                            field.clone(),
                            "give either a template or a missing code, not both",
                        ));
                        None
                    }
                    _ => {
                        art_errors.push(FieldError::new(
                            format!("{field}.template"),
                            "required (or an explicit \"missing\": \"unavailable\" | \"amputated\")",
                        ));
                        None
                    }
                };
                match entry {
                    Some(e) => slots[pos - 1] = Some(e),
                    None => ok = false,
                }
            }
            let absent: Vec<String> = slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.is_none())
                .map(|(i, _)| (i + 1).to_string())
                .collect();
            if ok && !absent.is_empty() {
                art_errors.push(FieldError::new(
                    "fingerprints",
                    format!(
                        "all ten finger positions are required; missing position(s) {}",
                        absent.join(", ")
                    ),
                ));
            }
            if ok && absent.is_empty() {
                Some(slots.into_iter().flatten().collect())
            } else {
                None
            }
        }
        None | Some(Value::Null) => {
            art_errors.push(FieldError::new("fingerprints", "required"));
            None
        }
        Some(_) => {
            art_errors.push(FieldError::new("fingerprints", "must be a list"));
            None
        }
    };
    r.errors.append(&mut art_errors);
    out.errors = r.errors;
    if out.errors.is_empty() {
        out.record = Some(ApplicantRecord {
            registry_id: registry_id.unwrap_or_default(),
            applied_on: applied_on.expect("checked"),
            tracking_code: tracking_code.expect("checked"),
            payment_tracking_code: payment_tracking_code.expect("checked"),
            national_code: national_code.expect("checked"),
            first_name: first_name.expect("checked"),
            last_name: last_name.expect("checked"),
            father_name: father_name.expect("checked"),
            birth_date: birth_date.expect("checked"),
            birth_certificate_number: birth_certificate_number.expect("checked"),
            gender: gender.expect("checked"),
            postal_code: postal_code.expect("checked"),
            address: address.expect("checked"),
            mobile: mobile.expect("checked"),
            landline: landline.expect("checked"),
            applicant_group: group.expect("checked"),
            previous_card_issued_on: previous.flatten(),
            pickup_office: pickup_office.expect("checked"),
            fees: fees.expect("checked"),
        });
    }
    out
}

/// One fingerprint position as fetched: (position 1–10, the template bytes if present, the
/// unavailable/amputated code if the registry sent one instead).
pub type FingerprintSlot = (u8, Option<Vec<u8>>, Option<String>);

/// Checks the fetched artifact bytes; returns the biometrics or the problems.
pub fn check_artifacts(
    photo: Option<Vec<u8>>,
    prints: Option<Vec<FingerprintSlot>>,
    cfg: &RegistryConfig,
) -> (Option<Biometrics>, Vec<FieldError>) {
    let mut errors = Vec::new();
    if let Some(p) = &photo {
        if p.len() < cfg.photo_min_bytes || p.len() > cfg.photo_max_bytes {
            errors.push(FieldError::new(
                "photo",
                format!(
                    "photo size must be between {} and {} bytes",
                    cfg.photo_min_bytes, cfg.photo_max_bytes
                ),
            ));
        } else if let Err(reason) = check_jpeg(p, cfg.photo_min_side, cfg.photo_max_side) {
            errors.push(FieldError::new("photo", reason));
        } else if let Err(reason) = cardpipe_pki::lds::check_portrait(p) {
            // What the chip can hold, checked here rather than after keys are issued.
            errors.push(FieldError::new("photo", reason));
        }
    }
    if let Some(list) = &prints {
        for (pos, template, _) in list {
            if let Some(t) = template
                && let Err(reason) = check_template(t, *pos)
            {
                errors.push(FieldError::new(
                    format!("fingerprints.position_{pos}.template"),
                    reason,
                ));
            }
        }
        // Deduplication compares fingerprints: ten missing codes leave it nothing to search.
        if list.iter().all(|(_, template, _)| template.is_none()) {
            errors.push(FieldError::new(
                "fingerprints",
                "at least one finger template is required (every position is marked missing)",
            ));
        }
    }
    match (photo, prints) {
        (Some(photo_jpeg), Some(list)) if errors.is_empty() => (
            Some(Biometrics {
                photo_jpeg,
                fingerprints: list
                    .into_iter()
                    .map(|(position, template, missing_reason)| FingerprintEntry {
                        position,
                        template,
                        missing_reason,
                    })
                    .collect(),
            }),
            errors,
        ),
        _ => (None, errors),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    #[test]
    fn national_codes() {
        assert_eq!(check_national_code("0499370899"), Ok("0499370899".into()));
        assert_eq!(check_national_code("۰۴۹۹۳۷۰۸۹۹"), Ok("0499370899".into()));
        assert_eq!(check_national_code("٠٤٩٩٣٧٠٨٩٩"), Ok("0499370899".into()));
        assert_eq!(
            check_national_code("0499370898"),
            Err("check digit does not match")
        );
        assert!(
            check_national_code("1111111111")
                .unwrap_err()
                .contains("repeated")
        );
        assert!(
            check_national_code("0000000000")
                .unwrap_err()
                .contains("repeated")
        );
        assert_eq!(check_national_code("12345"), Err("must be 10 digits"));
        for i in 0..1000 {
            let c = cardpipe_registry::synth::national_code(3, i);
            assert!(check_national_code(&c).is_ok(), "synthetic code {i}");
        }
    }

    #[test]
    fn solar_hijri_years_and_age() {
        assert_eq!(solar_hijri_year(date!(2001 - 03 - 21)), Some(1380));
        assert_eq!(solar_hijri_year(date!(2001 - 03 - 20)), Some(1379));
        assert_eq!(solar_hijri_year(date!(2011 - 03 - 20)), Some(1389));
        assert_eq!(solar_hijri_year(date!(2011 - 03 - 21)), Some(1390));
        assert_eq!(solar_hijri_year(date!(2018 - 03 - 20)), Some(1396));
        assert_eq!(solar_hijri_year(date!(2018 - 03 - 21)), Some(1397));
        assert_eq!(full_years(date!(2010 - 11 - 22), date!(2025 - 11 - 22)), 15);
        assert_eq!(full_years(date!(2010 - 11 - 23), date!(2025 - 11 - 22)), 14);
        assert_eq!(full_years(date!(2008 - 02 - 29), date!(2023 - 02 - 28)), 14);
    }

    #[test]
    fn jpeg_structure() {
        let jpeg = cardpipe_biometrics::synth::face_jpeg(1, 1);
        assert_eq!(check_jpeg(&jpeg, 100, 2000), Ok((240, 320)));
        assert!(check_jpeg(&jpeg, 400, 2000).is_err());
        assert!(check_jpeg(&jpeg[..jpeg.len() - 10], 100, 2000).is_err());
        let mut no_sof = jpeg.clone();
        no_sof[2..4].copy_from_slice(&[0xFF, 0xD8]);
        assert!(check_jpeg(&no_sof, 100, 2000).is_err());
        assert!(check_jpeg(b"\x89PNG\r\n\x1a\n", 1, 10).is_err());
    }

    /// Intake applies the dedup stage's placement rule (`place_finger`): header position 0
    /// takes the contract's, another is refused on the template's field, and a ten-print
    /// without any template is refused (dedup would have nothing to compare).
    #[test]
    fn templates_follow_the_dedup_placement_rule() {
        use cardpipe_biometrics::iso19794_2::{
            FingerView, FingerprintRecord, IsoVersion, Minutia, MinutiaKind,
        };
        let rec = |position: u8, minutiae: u16| {
            FingerprintRecord {
                version: IsoVersion::V2005,
                capture_equipment: 0,
                width: 300,
                height: 300,
                x_resolution: 197,
                y_resolution: 197,
                views: vec![FingerView {
                    position,
                    view_number: 0,
                    impression_type: 1,
                    quality: 50,
                    minutiae: (0..minutiae)
                        .map(|i| Minutia {
                            kind: MinutiaKind::RidgeEnding,
                            x: 10 + i * 20,
                            y: 10 + i * 15,
                            angle: (i * 9) as u8,
                            quality: 0,
                        })
                        .collect(),
                    extended_data: Vec::new(),
                    geometry: None,
                }],
            }
            .to_bytes()
            .unwrap()
        };
        let slots = |f: &dyn Fn(u8) -> Option<Vec<u8>>| -> Vec<FingerprintSlot> {
            (1..=10u8)
                .map(|p| match f(p) {
                    Some(t) => (p, Some(t), None),
                    None => (p, None, Some("unavailable".to_owned())),
                })
                .collect()
        };
        let cfg = RegistryConfig::default();
        let fields = |prints: Vec<FingerprintSlot>| -> Vec<FieldError> {
            check_artifacts(None, Some(prints), &cfg).1
        };
        assert_eq!(fields(slots(&|_| Some(rec(0, 12)))), vec![]);
        assert_eq!(fields(slots(&|p| Some(rec(p, 12)))), vec![]);
        let errors = fields(slots(&|p| Some(rec(if p == 4 { 6 } else { 0 }, 12))));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "fingerprints.position_4.template");
        assert!(
            errors[0]
                .reason
                .contains("finger position 6, not position 4"),
            "{}",
            errors[0].reason
        );
        let errors = fields(slots(&|p| Some(rec(0, if p == 9 { 0 } else { 12 }))));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "fingerprints.position_9.template");
        assert!(
            errors[0].reason.contains("none with minutiae"),
            "{}",
            errors[0].reason
        );
        let mut truncated = rec(0, 12);
        truncated.pop();
        let errors = fields(slots(&|p| {
            Some(if p == 2 {
                truncated.clone()
            } else {
                rec(0, 12)
            })
        }));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "fingerprints.position_2.template");
        // Some positions missing is fine; all ten is not.
        assert_eq!(fields(slots(&|p| (p != 3).then(|| rec(0, 12)))), vec![]);
        let errors = fields(slots(&|_| None));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "fingerprints");
    }

    /// Amounts as large as JSON integers allow are flagged as overcharges per field and in
    /// the total, which must not overflow.
    #[test]
    fn huge_fees_are_refused_without_overflow() {
        let v = serde_json::json!({
            "fees": {"issuance_rial": i64::MAX, "office_fee_rial": i64::MAX,
                     "delivery_fee_rial": i64::MAX}
        });
        let checked = check_fields(&v, &RegistryConfig::default(), date!(2026 - 01 - 01));
        for field in [
            "fees.issuance_rial",
            "fees.office_fee_rial",
            "fees.delivery_fee_rial",
            "fees",
        ] {
            assert!(
                checked
                    .flags
                    .iter()
                    .any(|f| f.field == field && f.flag == "overcharge"),
                "{field}"
            );
        }
    }

    #[test]
    fn errors_never_carry_values() {
        let v = serde_json::json!({
            "application_id": "A1", "national_code": "0499370898", "first_name": "علی123",
            "mobile": "0212345678", "postal_code": "98765"
        });
        let checked = check_fields(&v, &RegistryConfig::default(), date!(2026 - 01 - 01));
        let text = serde_json::to_string(&checked.errors).unwrap();
        for secret in ["0499370898", "علی123", "0212345678", "98765"] {
            assert!(!text.contains(secret));
        }
        assert!(checked.errors.iter().any(|e| e.field == "national_code"));
        assert!(checked.errors.iter().any(|e| e.field == "first_name"));
    }
}
