//! `synth batch`: realistic registry batches for demos, tests and benchmarks.
//!
//! Valid records have Persian names, valid national codes (some written in
//! Persian or Arabic-Indic digits), postal codes, mobile and landline numbers,
//! lawful fees, all four applicant groups with previous-card dates in the
//! right Solar Hijri years, pickup offices, ten ISO/IEC 19794-2 templates from
//! `cardpipe_biometrics::synth` (now and then an amputated finger) and a small
//! portrait JPEG. `bad` mode interleaves one record of every bad kind
//! ([`BAD_KINDS`]) with the valid ones and says which field each must fail on.
//!
//! Records are produced one at a time ([`Generator::line`]), so a batch of
//! any size streams in constant memory. Templates and photos come from a pool
//! of synthetic persons (intake does not deduplicate; `distinct_persons`
//! sizes the pool).

use std::io::Write;

use base64::Engine;
use cardpipe_biometrics::synth::{PopulationSpec, face_jpeg};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use time::{Date, Duration};

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    /// Seed (also makes ids unique between batches of different seeds).
    pub seed: u64,
    /// Valid records.
    pub records: usize,
    /// Also emit one record of every bad kind, spread through the batch.
    pub bad: bool,
    /// Enrolment date of every record.
    pub applied_on: Date,
    /// Size of the pool of synthetic persons for templates and photos.
    pub distinct_persons: usize,
}

/// A bad record kind: name, the field its error names, and whether the record
/// is still accepted (flagged) rather than rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadKind {
    /// Kind name.
    pub kind: &'static str,
    /// The field of the expected error (or flag).
    pub field: &'static str,
    /// Accepted with a flag (overcharge) instead of rejected.
    pub accepted_flagged: bool,
}

const fn bad(kind: &'static str, field: &'static str) -> BadKind {
    BadKind {
        kind,
        field,
        accepted_flagged: false,
    }
}

/// Every kind of bad record `bad` mode emits.
pub const BAD_KINDS: &[BadKind] = &[
    bad("invalid_json", "(record)"),
    bad("national_code_check_digit", "national_code"),
    bad("national_code_repeated_digit", "national_code"),
    bad("national_code_length", "national_code"),
    bad("under_15", "birth_date"),
    bad("residence_abroad", "residence"),
    bad("group3_previous_card_wrong_year", "previous_card_issued_on"),
    bad("group4_previous_card_missing", "previous_card_issued_on"),
    bad("first_card_with_previous_card", "previous_card_issued_on"),
    bad("missing_first_name", "first_name"),
    bad("bad_gender", "gender"),
    bad("bad_applied_on", "applied_on"),
    bad("postal_code_format", "postal_code"),
    bad("mobile_format", "mobile"),
    bad("landline_format", "landline"),
    bad("missing_finger_position", "fingerprints"),
    bad("bad_missing_code", "fingerprints[6].missing"),
    bad("invalid_template", "fingerprints.position_3.template"),
    bad("photo_not_jpeg", "photo"),
    bad("photo_truncated", "photo"),
    bad("unpaid_no_payment_code", "payment_tracking_code"),
    bad("issuance_underpaid", "fees.issuance_rial"),
    bad("duplicate_national_code_in_batch", "national_code"),
    bad("duplicate_application_id_in_batch", "application_id"),
    BadKind {
        kind: "office_fee_overcharge",
        field: "fees.office_fee_rial",
        accepted_flagged: true,
    },
];

/// One line the generator wrote that is not a plain valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectation {
    /// NDJSON line (1-based).
    pub line: i64,
    /// The bad kind.
    pub kind: BadKind,
}

const MALE: &[&str] = &[
    "محمد",
    "علی",
    "حسین",
    "رضا",
    "مهدی",
    "امیر",
    "حسن",
    "مصطفی",
    "سعید",
    "جواد",
    "مجید",
    "احمد",
    "پویا",
    "آرش",
    "کیان",
];
const FEMALE: &[&str] = &[
    "فاطمه",
    "زهرا",
    "مریم",
    "سارا",
    "نرگس",
    "مهسا",
    "الهام",
    "زینب",
    "نازنین",
    "پریسا",
    "لیلا",
    "آزاده",
    "شیوا",
    "یاسمن",
];
const SURNAMES: &[&str] = &[
    "محمدی",
    "حسینی",
    "احمدی",
    "رضایی",
    "کریمی",
    "موسوی",
    "جعفری",
    "صادقی",
    "رحیمی",
    "نوری",
    "قاسمی",
    "هاشمی",
    "کاظمی",
    "اکبری",
    "تهرانی",
    "اصفهانی",
    "شیرازی",
];
const STREETS: &[&str] = &[
    "خیابان ولیعصر",
    "خیابان انقلاب",
    "بلوار کشاورز",
    "خیابان آزادی",
    "خیابان شریعتی",
    "کوچه بهار",
    "خیابان چهارباغ",
    "بلوار وکیل‌آباد",
];
const CITIES: &[(&str, &str, &str)] = &[
    ("تهران", "021", "TEH"),
    ("اصفهان", "031", "ISF"),
    ("مشهد", "051", "MHD"),
    ("شیراز", "071", "SYZ"),
    ("تبریز", "041", "TBZ"),
    ("کرج", "026", "KRJ"),
];
const MOBILE_PREFIXES: &[&str] = &[
    "0912", "0935", "0919", "0901", "0936", "0913", "0938", "0921",
];

/// The check digit of nine digits.
pub fn check_digit(d: &[u8; 9]) -> u8 {
    let s: u32 = (0..9)
        .map(|i| u32::from(d[i]) * (10 - i as u32))
        .sum::<u32>()
        % 11;
    (if s < 2 { s } else { 11 - s }) as u8
}

/// The national code of record `i` of batch `seed` (valid, unique per (seed, i)
/// for i < 10^9, never one repeated digit).
pub fn national_code(seed: u64, i: usize) -> String {
    let base = (seed
        .wrapping_mul(104_729)
        .wrapping_add(i as u64 * 7_919 + 13))
        % 1_000_000_000;
    let mut d = [0u8; 9];
    let mut n = base;
    for k in (0..9).rev() {
        d[k] = (n % 10) as u8;
        n /= 10;
    }
    let c = check_digit(&d);
    let mut s: String = d.iter().map(|x| char::from(b'0' + x)).collect();
    s.push(char::from(b'0' + c));
    if s.bytes().all(|b| b == s.as_bytes()[0]) {
        // One repeated digit passes the check-digit formula; never emit it.
        return national_code(seed, i + 1_000_000_000);
    }
    s
}

fn to_persian_digits(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '0'..='9' => char::from_u32(0x06F0 + (c as u32 - '0' as u32)).unwrap_or(c),
            c => c,
        })
        .collect()
}

fn to_arabic_digits(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '0'..='9' => char::from_u32(0x0660 + (c as u32 - '0' as u32)).unwrap_or(c),
            c => c,
        })
        .collect()
}

struct Person {
    photo_b64: String,
    templates_b64: Vec<String>,
}

/// Produces records one by one.
pub struct Generator {
    spec: SynthSpec,
    population: PopulationSpec,
    pool: Vec<Person>,
    /// (position among emitted lines, bad kind) planned for bad mode.
    plan: Vec<(usize, BadKind)>,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

fn date(y: i32, m: u8, d: u8) -> Date {
    Date::from_calendar_date(
        y,
        time::Month::try_from(m).unwrap_or(time::Month::January),
        d,
    )
    .unwrap_or(Date::MIN)
}

impl Generator {
    /// A generator for `spec` (builds the person pool).
    pub fn new(spec: SynthSpec) -> Self {
        let population = PopulationSpec {
            seed: spec.seed,
            subjects: spec.distinct_persons.max(1),
            duplicate_rate: 0.0,
        };
        let b64 = base64::engine::general_purpose::STANDARD;
        let pool = (0..spec.distinct_persons.max(1) as u64)
            .map(|p| Person {
                photo_b64: b64.encode(face_jpeg(spec.seed, p)),
                templates_b64: population
                    .impressions(p, 0)
                    .iter()
                    .map(|t| b64.encode(t))
                    .collect(),
            })
            .collect();
        let total = spec.records + if spec.bad { BAD_KINDS.len() } else { 0 };
        let plan = if spec.bad {
            // Bad records spread evenly, never first (duplicates need an earlier original).
            BAD_KINDS
                .iter()
                .enumerate()
                .map(|(k, kind)| {
                    (
                        1 + (k * total.saturating_sub(1)) / BAD_KINDS.len().max(1),
                        *kind,
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        Self {
            spec,
            population,
            pool,
            plan,
        }
    }

    /// A fresh impression of finger `position` (1–10) of valid record `i`'s person, as a
    /// live scanner at a pickup office would capture it (another session than the enrolled
    /// templates; `session` > 0 picks which). ISO/IEC 19794-2 bytes.
    pub fn live_impression(&self, i: usize, position: u8, session: u64) -> Vec<u8> {
        let person = (i % self.pool.len()) as u64;
        let mut prints = self.population.impressions(person, 1_000_000_007 + session);
        let index = usize::from(position.clamp(1, 10)) - 1;
        prints.swap_remove(index)
    }

    /// Lines this generator emits.
    pub fn total_lines(&self) -> usize {
        self.spec.records + self.plan.len()
    }

    /// A valid record for valid-record index `i`.
    pub fn valid(&self, i: usize) -> Value {
        let seed = self.spec.seed;
        let mut rng =
            ChaCha8Rng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let applied_on = self.spec.applied_on;
        let female = rng.random_bool(0.5);
        let first = if female {
            FEMALE[rng.random_range(0..FEMALE.len())]
        } else {
            MALE[rng.random_range(0..MALE.len())]
        };
        let father = MALE[rng.random_range(0..MALE.len())];
        let last = SURNAMES[rng.random_range(0..SURNAMES.len())];
        let (city, area, office_prefix) = CITIES[rng.random_range(0..CITIES.len())];
        let age_days = rng.random_range(15 * 366..80 * 365);
        let birth = applied_on - Duration::days(age_days);
        let group_roll: f64 = rng.random();
        let (group, previous) = if group_roll < 0.35 {
            ("first_card", None)
        } else if group_roll < 0.5 {
            ("lost_or_changed", None)
        } else if group_roll < 0.8 {
            // Solar Hijri 1380–1389 ≈ 2001-03-21 .. 2011-03-20.
            (
                "replace_1380_1389",
                Some(date(
                    rng.random_range(2002..=2010),
                    rng.random_range(1..=12),
                    rng.random_range(1..=28),
                )),
            )
        } else {
            // Solar Hijri 1390–1396 ≈ 2011-03-21 .. 2018-03-20.
            (
                "voluntary_1390_1396",
                Some(date(
                    rng.random_range(2012..=2017),
                    rng.random_range(1..=12),
                    rng.random_range(1..=28),
                )),
            )
        };
        // A previous card issued before the applicant was 15 is not plausible:
        // such an applicant is in group 2 instead.
        let (group, previous) = match previous {
            Some(p) if p < birth + Duration::days(15 * 366) || p > applied_on => {
                ("lost_or_changed", None)
            }
            other => (group, other),
        };
        let mut code = national_code(seed, i);
        if i % 7 == 3 {
            code = to_persian_digits(&code);
        } else if i % 11 == 5 {
            code = to_arabic_digits(&code);
        }
        let postal: String = format!(
            "{}{:09}",
            rng.random_range(1..=9),
            rng.random_range(0..1_000_000_000u64)
        );
        let mobile = format!(
            "{}{:07}",
            MOBILE_PREFIXES[rng.random_range(0..MOBILE_PREFIXES.len())],
            rng.random_range(0..10_000_000u32)
        );
        let landline = format!(
            "{area}{}{:07}",
            rng.random_range(2..=9),
            rng.random_range(0..10_000_000u32)
        );
        let office = format!("{office_prefix}-{:03}", rng.random_range(1..=40));
        let person = &self.pool[i % self.pool.len()];
        let amputated = i % 50 == 49;
        let fingerprints: Vec<Value> = (1..=10u8)
            .map(|pos| {
                if amputated && pos == 4 {
                    json!({ "position": pos, "missing": "amputated" })
                } else {
                    json!({ "position": pos, "template": person.templates_b64[usize::from(pos) - 1] })
                }
            })
            .collect();
        let office_fee = [0, 50_000, 70_000, 90_000][rng.random_range(0..4)];
        let mut v = json!({
            "application_id": format!("REG-{seed:x}-{i:08}"),
            "applied_on": applied_on.to_string(),
            "tracking_code": format!("{:04}{:010}", seed % 10_000, i),
            "payment_tracking_code": format!("PAY{:012}", rng.random_range(0..1_000_000_000_000u64)),
            "national_code": code,
            "first_name": first,
            "last_name": last,
            "father_name": father,
            "birth_date": birth.to_string(),
            "birth_certificate_number": format!("{}", rng.random_range(1..9_999_999u32)),
            "gender": if female { "female" } else { "male" },
            "postal_code": postal,
            "address": format!("{city}، {}، پلاک {}", STREETS[rng.random_range(0..STREETS.len())], to_persian_digits(&rng.random_range(1..300u32).to_string())),
            "mobile": mobile,
            "landline": landline,
            "applicant_group": group,
            "residence": "domestic",
            "pickup_office": office,
            // Half prepay the delivery fee at enrolment; the others pay it at handover.
            "fees": { "issuance_rial": 200_000, "office_fee_rial": office_fee, "delivery_fee_rial": if i.is_multiple_of(2) { 20_000 } else { 0 } },
            "photo": person.photo_b64,
            "fingerprints": fingerprints,
            "priority": if i.is_multiple_of(97) { "urgent" } else { "normal" },
        });
        if let Some(p) = previous {
            v["previous_card_issued_on"] = json!(p.to_string());
        }
        v
    }

    /// A record of bad kind `kind`, built from valid record `i` (`prior` is an
    /// earlier valid record's index, for duplicates).
    pub fn bad(&self, kind: &BadKind, i: usize, prior: usize) -> String {
        let mut v = self.valid(i);
        let applied = self.spec.applied_on;
        match kind.kind {
            "invalid_json" => return "{\"application_id\": \"broken".into(),
            "national_code_check_digit" => {
                let code = national_code(self.spec.seed, i);
                let last = code.as_bytes()[9] - b'0';
                v["national_code"] = json!(format!("{}{}", &code[..9], (last + 1) % 10));
            }
            "national_code_repeated_digit" => v["national_code"] = json!("1111111111"),
            "national_code_length" => v["national_code"] = json!("12345"),
            "under_15" => v["birth_date"] = json!((applied - Duration::days(14 * 365)).to_string()),
            "residence_abroad" => v["residence"] = json!("abroad"),
            "group3_previous_card_wrong_year" => {
                v["applicant_group"] = json!("replace_1380_1389");
                v["previous_card_issued_on"] = json!("2015-06-01");
                v["birth_date"] = json!("1980-01-01");
            }
            "group4_previous_card_missing" => {
                v["applicant_group"] = json!("voluntary_1390_1396");
                v.as_object_mut()
                    .map(|o| o.remove("previous_card_issued_on"));
            }
            "first_card_with_previous_card" => {
                v["applicant_group"] = json!("first_card");
                v["birth_date"] = json!("1980-01-01");
                v["previous_card_issued_on"] = json!("2005-06-01");
            }
            "missing_first_name" => {
                v.as_object_mut().map(|o| o.remove("first_name"));
            }
            "bad_gender" => v["gender"] = json!("unknown"),
            "bad_applied_on" => v["applied_on"] = json!("2026-02-30"),
            "postal_code_format" => v["postal_code"] = json!("12345"),
            "mobile_format" => v["mobile"] = json!("0212345678"),
            "landline_format" => v["landline"] = json!("09121234567"),
            "missing_finger_position" => {
                if let Some(list) = v["fingerprints"].as_array_mut() {
                    list.retain(|f| f["position"] != json!(7));
                }
            }
            "bad_missing_code" => {
                v["fingerprints"][6] = json!({ "position": 7, "missing": "sore" });
            }
            "invalid_template" => {
                v["fingerprints"][2]["template"] = json!(
                    base64::engine::general_purpose::STANDARD
                        .encode(b"FMR\0 20\0 not really a minutiae record at all")
                );
            }
            "photo_not_jpeg" => {
                let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
                png.resize(4096, 0);
                v["photo"] = json!(base64::engine::general_purpose::STANDARD.encode(png));
            }
            "photo_truncated" => {
                let photo = base64::engine::general_purpose::STANDARD
                    .decode(v["photo"].as_str().unwrap_or_default())
                    .unwrap_or_default();
                let cut = &photo[..photo.len() * 2 / 3];
                v["photo"] = json!(base64::engine::general_purpose::STANDARD.encode(cut));
            }
            "unpaid_no_payment_code" => {
                v.as_object_mut().map(|o| o.remove("payment_tracking_code"));
            }
            "issuance_underpaid" => v["fees"]["issuance_rial"] = json!(100_000),
            "duplicate_national_code_in_batch" => {
                v["national_code"] = json!(national_code(self.spec.seed, prior));
            }
            "duplicate_application_id_in_batch" => {
                v["application_id"] = json!(format!("REG-{:x}-{prior:08}", self.spec.seed));
            }
            "office_fee_overcharge" => v["fees"]["office_fee_rial"] = json!(120_000),
            _ => {}
        }
        v.to_string()
    }

    /// The NDJSON text of line `n` (0-based) and its expectation when bad.
    pub fn line(&self, n: usize) -> (String, Option<BadKind>) {
        let before = self.plan.iter().filter(|(at, _)| *at < n).count();
        if let Some((_, kind)) = self.plan.iter().find(|(at, _)| *at == n) {
            // Built from a fresh valid index beyond the valid range (unique
            // ids and codes), except the planned duplicates.
            let i = self.spec.records + before;
            let prior = n.saturating_sub(before).saturating_sub(1);
            return (self.bad(kind, i, prior), Some(*kind));
        }
        (self.valid(n - before).to_string(), None)
    }
}

/// Writes a whole batch to `out`; returns the expectations of its bad lines.
pub fn write_batch(spec: &SynthSpec, out: &mut impl Write) -> std::io::Result<Vec<Expectation>> {
    let generator = Generator::new(spec.clone());
    let mut expectations = Vec::new();
    for n in 0..generator.total_lines() {
        let (line, kind) = generator.line(n);
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
        if let Some(kind) = kind {
            expectations.push(Expectation {
                line: n as i64 + 1,
                kind,
            });
        }
    }
    Ok(expectations)
}

/// Convenience: a default spec for `records` valid records dated `applied_on`.
pub fn spec(seed: u64, records: usize, bad: bool, applied_on: Date) -> SynthSpec {
    SynthSpec {
        seed,
        records,
        bad,
        applied_on,
        distinct_persons: 16,
    }
}
