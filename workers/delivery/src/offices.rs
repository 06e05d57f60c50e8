//! The register of pickup offices: government service offices (دفاتر پیشخوان خدمات دولت)
//! and post offices where holders collect their cards.
//!
//! The register is a CSV (`code,name,kind,province,city,address,phone`, UTF-8, RFC 4180
//! quoting). The default register is compiled into the binary (`data/offices.csv`: every
//! province, including every office code the registry's generator uses); `[delivery]
//! offices_file` replaces it. At start the register is upserted into `delivery_offices`, the
//! store every stage and API reads.

use std::collections::BTreeMap;

use cardpipe_common::clock::to_rfc3339;
use cardpipe_common::store::{Store, StoreError};
use serde::Serialize;
use sqlx::Row;
use time::OffsetDateTime;

/// The register compiled into the binary.
pub const DEFAULT_REGISTER: &str = include_str!("../data/offices.csv");

/// The columns of the register, in order.
pub const COLUMNS: [&str; 7] = [
    "code", "name", "kind", "province", "city", "address", "phone",
];

/// What kind of office hands cards over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OfficeKind {
    /// A government service office (دفتر پیشخوان خدمات دولت).
    GovernmentServiceOffice,
    /// A post office (اداره پست).
    PostOffice,
}

impl OfficeKind {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GovernmentServiceOffice => "government_service_office",
            Self::PostOffice => "post_office",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "government_service_office" => Some(Self::GovernmentServiceOffice),
            "post_office" => Some(Self::PostOffice),
            _ => None,
        }
    }
}

/// One pickup office.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Office {
    /// Office code (as in the registry's `pickup_office`).
    pub code: String,
    /// Name (Persian).
    pub name: String,
    /// Kind.
    pub kind: OfficeKind,
    /// Province (Persian).
    pub province: String,
    /// City (Persian).
    pub city: String,
    /// Street address (Persian).
    pub address: String,
    /// Telephone.
    pub phone: String,
}

/// A register that does not parse: the line and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("offices register line {line}: {message}")]
pub struct RegisterError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Splits CSV text into records (RFC 4180: quoted fields may hold commas, quotes as `""`
/// and line breaks). Returns (first line of the record, fields).
pub fn parse_csv(text: &str) -> Result<Vec<(usize, Vec<String>)>, RegisterError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut records = Vec::new();
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let (mut line, mut start_line) = (1usize, 1usize);
    let mut quoted = false;
    let mut at_field_start = true;
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => {
                    quoted = false;
                    if !matches!(chars.peek(), None | Some(',') | Some('\n') | Some('\r')) {
                        return Err(RegisterError {
                            line,
                            message: "text after a closing quote".into(),
                        });
                    }
                }
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if at_field_start => {
                quoted = true;
                at_field_start = false;
            }
            '"' => {
                return Err(RegisterError {
                    line,
                    message: "a quote inside an unquoted field".into(),
                });
            }
            ',' => {
                fields.push(std::mem::take(&mut field));
                at_field_start = true;
            }
            '\r' => {}
            '\n' => {
                fields.push(std::mem::take(&mut field));
                if !(fields.len() == 1 && fields[0].is_empty()) {
                    records.push((start_line, std::mem::take(&mut fields)));
                }
                fields.clear();
                line += 1;
                start_line = line;
                at_field_start = true;
            }
            _ => {
                field.push(c);
                at_field_start = false;
            }
        }
    }
    if quoted {
        return Err(RegisterError {
            line: start_line,
            message: "unterminated quoted field".into(),
        });
    }
    if !field.is_empty() || !fields.is_empty() {
        fields.push(field);
        records.push((start_line, fields));
    }
    Ok(records)
}

/// Parses and checks a register: the header row, seven fields per row, a known kind,
/// well-formed unique codes, no empty names or addresses, a phone of digits.
pub fn parse_register(text: &str) -> Result<Vec<Office>, RegisterError> {
    let records = parse_csv(text)?;
    let Some((_, header)) = records.first() else {
        return Err(RegisterError {
            line: 1,
            message: "empty register".into(),
        });
    };
    let header: Vec<&str> = header.iter().map(|h| h.trim()).collect();
    if header != COLUMNS {
        return Err(RegisterError {
            line: 1,
            message: format!(
                "header must be {:?}, got {:?}",
                COLUMNS.join(","),
                header.join(",")
            ),
        });
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(records.len());
    for (line, fields) in &records[1..] {
        let err = |message: String| RegisterError {
            line: *line,
            message,
        };
        if fields.len() != COLUMNS.len() {
            return Err(err(format!(
                "expected {} fields, got {}",
                COLUMNS.len(),
                fields.len()
            )));
        }
        let f: Vec<String> = fields.iter().map(|s| s.trim().to_owned()).collect();
        let code = f[0].clone();
        if code.is_empty()
            || code.len() > 32
            || !code
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(err(format!(
                "code {code:?}: must be 1–32 letters, digits, '-', '_' or '.'"
            )));
        }
        if !seen.insert(code.clone()) {
            return Err(err(format!("code {code:?} appears twice")));
        }
        let kind = OfficeKind::parse(&f[2]).ok_or_else(|| {
            err(format!(
                "kind {:?}: must be government_service_office or post_office",
                f[2]
            ))
        })?;
        for (i, column) in COLUMNS.iter().enumerate().skip(1) {
            if f[i].is_empty() {
                return Err(err(format!("{column} is empty")));
            }
        }
        if !f[6].bytes().all(|b| b.is_ascii_digit()) || !(8..=12).contains(&f[6].len()) {
            return Err(err(format!("phone {:?}: must be 8–12 digits", f[6])));
        }
        out.push(Office {
            code,
            name: f[1].clone(),
            kind,
            province: f[3].clone(),
            city: f[4].clone(),
            address: f[5].clone(),
            phone: f[6].clone(),
        });
    }
    Ok(out)
}

/// The register named by `offices_file` (empty: the compiled-in default).
pub fn load_register(offices_file: &str) -> anyhow::Result<Vec<Office>> {
    if offices_file.is_empty() {
        return Ok(parse_register(DEFAULT_REGISTER)?);
    }
    let text = std::fs::read_to_string(offices_file)
        .map_err(|e| anyhow::anyhow!("delivery.offices_file: cannot read {offices_file}: {e}"))?;
    parse_register(&text).map_err(|e| anyhow::anyhow!("delivery.offices_file {offices_file}: {e}"))
}

/// Inserts or updates every office of the register (offices missing from the register stay:
/// cards may still be on their way to them).
pub async fn upsert(
    store: &Store,
    offices: &[Office],
    at: OffsetDateTime,
) -> Result<usize, StoreError> {
    let now = to_rfc3339(at);
    let mut tx = store.begin().await?;
    for o in offices {
        sqlx::query(
            "INSERT INTO delivery_offices (code, name, kind, province, city, address, phone, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (code) DO UPDATE SET name = excluded.name, kind = excluded.kind,
                 province = excluded.province, city = excluded.city, address = excluded.address,
                 phone = excluded.phone, updated_at = excluded.updated_at",
        )
        .bind(&o.code)
        .bind(&o.name)
        .bind(o.kind.as_str())
        .bind(&o.province)
        .bind(&o.city)
        .bind(&o.address)
        .bind(&o.phone)
        .bind(&now)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(offices.len())
}

fn read_office(row: &sqlx::any::AnyRow) -> Result<Office, StoreError> {
    let kind: String = row.try_get("kind")?;
    Ok(Office {
        code: row.try_get("code")?,
        name: row.try_get("name")?,
        kind: OfficeKind::parse(&kind).ok_or_else(|| StoreError::Corrupt {
            table: "delivery_offices",
            column: "kind",
            message: kind.clone(),
        })?,
        province: row.try_get("province")?,
        city: row.try_get("city")?,
        address: row.try_get("address")?,
        phone: row.try_get("phone")?,
    })
}

/// One office from the store.
pub async fn get(store: &Store, code: &str) -> Result<Option<Office>, StoreError> {
    let row = sqlx::query(
        "SELECT code, name, kind, province, city, address, phone FROM delivery_offices WHERE code = $1",
    )
    .bind(code)
    .fetch_optional(store.pool())
    .await?;
    row.as_ref().map(read_office).transpose()
}

/// Every office in the store, by code.
pub async fn all(store: &Store) -> Result<BTreeMap<String, Office>, StoreError> {
    let rows = sqlx::query(
        "SELECT code, name, kind, province, city, address, phone FROM delivery_offices ORDER BY code",
    )
    .fetch_all(store.pool())
    .await?;
    rows.iter()
        .map(|r| read_office(r).map(|o| (o.code.clone(), o)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_register_parses_and_covers_every_province() {
        let offices = parse_register(DEFAULT_REGISTER).unwrap();
        assert!(offices.len() >= 300, "{}", offices.len());
        let provinces: std::collections::BTreeSet<_> =
            offices.iter().map(|o| &o.province).collect();
        assert_eq!(provinces.len(), 31, "{provinces:?}");
        assert!(offices.iter().any(|o| o.kind == OfficeKind::PostOffice));
        assert!(
            offices
                .iter()
                .any(|o| o.kind == OfficeKind::GovernmentServiceOffice)
        );
    }

    #[test]
    fn every_office_code_the_registry_generator_uses_is_registered() {
        // cardpipe_registry::synth draws `<city prefix>-<001..040>` for its six cities.
        let codes: std::collections::HashSet<_> = parse_register(DEFAULT_REGISTER)
            .unwrap()
            .into_iter()
            .map(|o| o.code)
            .collect();
        let spec =
            cardpipe_registry::synth::spec(7, 300, false, time::macros::date!(2026 - 01 - 10));
        let generator = cardpipe_registry::synth::Generator::new(spec);
        for i in 0..300 {
            let record = generator.valid(i);
            let office = record["pickup_office"].as_str().unwrap();
            assert!(codes.contains(office), "{office} missing from the register");
        }
    }

    #[test]
    fn quoted_fields_and_clear_errors() {
        let text = "code,name,kind,province,city,address,phone\n\
                    X-1,\"Office, \"\"A\"\"\",post_office,P,C,\"line1\nline2\",02112345678\n";
        let offices = parse_register(text).unwrap();
        assert_eq!(offices[0].name, "Office, \"A\"");
        assert_eq!(offices[0].address, "line1\nline2");

        let bad_kind =
            "code,name,kind,province,city,address,phone\nX-1,n,kiosk,p,c,a,02112345678\n";
        let e = parse_register(bad_kind).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("kind \"kiosk\""), "{e}");
        let dup = "code,name,kind,province,city,address,phone\nX-1,n,post_office,p,c,a,02112345678\nX-1,n,post_office,p,c,a,02112345678\n";
        assert!(parse_register(dup).unwrap_err().message.contains("twice"));
        let short = "code,name,kind,province,city,address,phone\nX-1,n,post_office\n";
        assert!(
            parse_register(short)
                .unwrap_err()
                .message
                .contains("expected 7 fields")
        );
        let header = "code,name\n";
        assert!(
            parse_register(header)
                .unwrap_err()
                .message
                .contains("header")
        );
        let phone = "code,name,kind,province,city,address,phone\nX-1,n,post_office,p,c,a,+98-21\n";
        assert!(parse_register(phone).unwrap_err().message.contains("phone"));
    }
}
