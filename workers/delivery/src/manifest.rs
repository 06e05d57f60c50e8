//! Box and shipment manifests: JSON (for systems), CSV (for spreadsheets) and a printable
//! right-to-left HTML page in Persian (one page per box, for the carrier and the office).
//!
//! A manifest lists, per card: cardpipe's application id (what the office scans), the
//! registry's id, the follow-up tracking code, the holder's name and a masked national code
//! (last four digits only).

use serde::Serialize;

use crate::offices::Office;
use cardpipe_common::solar_hijri::{SolarHijri, persian_digits};

/// One card line.
#[derive(Debug, Clone, Serialize)]
pub struct CardLine {
    /// cardpipe's application id (scanned on receipt and at handover).
    pub application_id: String,
    /// The registry's application id.
    pub registry_id: String,
    /// Follow-up tracking code.
    pub tracking_code: String,
    /// Holder's name (first and last).
    pub holder: String,
    /// National code with all but the last four digits masked.
    pub national_code_masked: String,
}

/// One box.
#[derive(Debug, Clone, Serialize)]
pub struct BoxManifest {
    /// Box id (printed as the box label).
    pub box_id: String,
    /// Destination office.
    pub office: Office,
    /// Cards in the box.
    pub cards: Vec<CardLine>,
}

/// One day's shipment.
#[derive(Debug, Clone, Serialize)]
pub struct ShipmentManifest {
    /// Shipment id.
    pub shipment_id: String,
    /// Dispatch day (Tehran, YYYY-MM-DD).
    pub period: String,
    /// Carrier.
    pub carrier: String,
    /// Carrier reference.
    pub carrier_reference: String,
    /// When (RFC 3339 UTC).
    pub dispatched_at: String,
    /// Boxes.
    pub boxes: Vec<BoxManifest>,
}

/// Masks a national code to its last four digits.
pub fn mask_national_code(code: &str) -> String {
    let n = code.chars().count();
    code.chars()
        .enumerate()
        .map(|(i, c)| if i + 4 < n { '*' } else { c })
        .collect()
}

fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One CSV field, quoted when needed (RFC 4180).
pub fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

const CSV_HEADER: &str = "shipment_id,carrier_reference,box_id,office_code,office_name,application_id,registry_id,tracking_code,holder,national_code_masked";

fn csv_rows(out: &mut String, shipment: Option<&ShipmentManifest>, b: &BoxManifest) {
    for c in &b.cards {
        let fields = [
            shipment.map_or("", |s| s.shipment_id.as_str()),
            shipment.map_or("", |s| s.carrier_reference.as_str()),
            &b.box_id,
            &b.office.code,
            &b.office.name,
            &c.application_id,
            &c.registry_id,
            &c.tracking_code,
            &c.holder,
            &c.national_code_masked,
        ];
        out.push_str(
            &fields
                .iter()
                .map(|f| csv_field(f))
                .collect::<Vec<_>>()
                .join(","),
        );
        out.push('\n');
    }
}

/// The CSV of one box.
pub fn box_csv(shipment: &ShipmentManifest, b: &BoxManifest) -> String {
    let mut out = format!("{CSV_HEADER}\n");
    csv_rows(&mut out, Some(shipment), b);
    out
}

/// The CSV of a shipment (every card of every box).
pub fn shipment_csv(s: &ShipmentManifest) -> String {
    let mut out = format!("{CSV_HEADER}\n");
    for b in &s.boxes {
        csv_rows(&mut out, Some(s), b);
    }
    out
}

fn solar(period: &str) -> String {
    time::Date::parse(
        period,
        time::macros::format_description!("[year]-[month]-[day]"),
    )
    .ok()
    .and_then(|d| SolarHijri::from_gregorian(d).ok())
    .map(|d| d.long())
    .unwrap_or_else(|| period.to_owned())
}

fn box_section(s: &ShipmentManifest, b: &BoxManifest) -> String {
    let mut rows = String::new();
    for (i, c) in b.cards.iter().enumerate() {
        rows.push_str(&format!(
            "<tr><td>{}</td><td class=\"ltr\">{}</td><td class=\"ltr\">{}</td><td>{}</td><td class=\"ltr\">{}</td><td>&#9744;</td></tr>\n",
            persian_digits(&(i + 1).to_string()),
            html_escape(&c.application_id),
            html_escape(&c.tracking_code),
            html_escape(&c.holder),
            html_escape(&c.national_code_masked),
        ));
    }
    format!(
        "<section class=\"box\">\n<h1>صورت‌حساب جعبه <span class=\"ltr\">{box_id}</span></h1>\n\
<table class=\"meta\"><tr><th>مقصد</th><td>{office} (<span class=\"ltr\">{code}</span>)</td></tr>\
<tr><th>نشانی</th><td>{address}</td></tr><tr><th>تلفن</th><td class=\"ltr\">{phone}</td></tr>\
<tr><th>استان / شهر</th><td>{province} / {city}</td></tr>\
<tr><th>تاریخ ارسال</th><td>{date}</td></tr><tr><th>حمل‌کننده</th><td>{carrier} — <span class=\"ltr\">{reference}</span></td></tr>\
<tr><th>تعداد کارت</th><td>{count}</td></tr></table>\n\
<table class=\"cards\"><thead><tr><th>ردیف</th><th>شناسه درخواست</th><th>کد پیگیری</th><th>نام دارنده</th><th>کد ملی</th><th>دریافت</th></tr></thead>\n<tbody>\n{rows}</tbody></table>\n\
<p class=\"sign\">تحویل‌دهنده: ........................ &nbsp;&nbsp; تحویل‌گیرنده (مهر و امضای دفتر): ........................</p>\n</section>\n",
        box_id = html_escape(&b.box_id),
        office = html_escape(&b.office.name),
        code = html_escape(&b.office.code),
        address = html_escape(&b.office.address),
        phone = html_escape(&b.office.phone),
        province = html_escape(&b.office.province),
        city = html_escape(&b.office.city),
        date = solar(&s.period),
        carrier = html_escape(&s.carrier),
        reference = html_escape(&s.carrier_reference),
        count = persian_digits(&b.cards.len().to_string()),
    )
}

const STYLE: &str = "body{font-family:Vazirmatn,Tahoma,sans-serif;margin:1.5cm}\
table{border-collapse:collapse;width:100%;margin:0.5em 0}th,td{border:1px solid #444;padding:4px 6px;text-align:right}\
.ltr{direction:ltr;unicode-bidi:embed;font-family:monospace}.box{page-break-after:always}.sign{margin-top:2em}\
@media print{body{margin:0}}";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"fa\" dir=\"rtl\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n",
        html_escape(title)
    )
}

/// The printable page of one box.
pub fn box_html(s: &ShipmentManifest, b: &BoxManifest) -> String {
    page(&format!("جعبه {}", b.box_id), &box_section(s, b))
}

/// The printable shipment: a summary page, then one page per box.
pub fn shipment_html(s: &ShipmentManifest) -> String {
    let mut rows = String::new();
    let mut total = 0;
    for (i, b) in s.boxes.iter().enumerate() {
        total += b.cards.len();
        rows.push_str(&format!(
            "<tr><td>{}</td><td class=\"ltr\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            persian_digits(&(i + 1).to_string()),
            html_escape(&b.box_id),
            html_escape(&b.office.name),
            html_escape(&b.office.city),
            persian_digits(&b.cards.len().to_string()),
        ));
    }
    let mut body = format!(
        "<section class=\"box\">\n<h1>صورت‌حساب محموله ارسالی {date}</h1>\n\
<table class=\"meta\"><tr><th>شناسه محموله</th><td class=\"ltr\">{id}</td></tr>\
<tr><th>حمل‌کننده</th><td>{carrier} — <span class=\"ltr\">{reference}</span></td></tr>\
<tr><th>تعداد جعبه</th><td>{boxes}</td></tr><tr><th>تعداد کارت</th><td>{cards}</td></tr></table>\n\
<table class=\"cards\"><thead><tr><th>ردیف</th><th>جعبه</th><th>دفتر مقصد</th><th>شهر</th><th>تعداد کارت</th></tr></thead>\n<tbody>\n{rows}</tbody></table>\n</section>\n",
        date = solar(&s.period),
        id = html_escape(&s.shipment_id),
        carrier = html_escape(&s.carrier),
        reference = html_escape(&s.carrier_reference),
        boxes = persian_digits(&s.boxes.len().to_string()),
        cards = persian_digits(&total.to_string()),
    );
    for b in &s.boxes {
        body.push_str(&box_section(s, b));
    }
    page(&format!("محموله {}", s.shipment_id), &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offices::OfficeKind;

    fn sample() -> ShipmentManifest {
        ShipmentManifest {
            shipment_id: "SHP-1".into(),
            period: "2024-03-20".into(),
            carrier: "Post".into(),
            carrier_reference: "EMS20240320-1".into(),
            dispatched_at: "2024-03-20T12:30:00.000000Z".into(),
            boxes: vec![BoxManifest {
                box_id: "BOX-TEH-001-a".into(),
                office: Office {
                    code: "TEH-001".into(),
                    name: "دفتر <پیشخوان>".into(),
                    kind: OfficeKind::PostOffice,
                    province: "تهران".into(),
                    city: "تهران".into(),
                    address: "تهران، خیابان آزادی, پلاک ۱".into(),
                    phone: "02100000000".into(),
                },
                cards: vec![CardLine {
                    application_id: "app-1".into(),
                    registry_id: "REG-1".into(),
                    tracking_code: "TC1".into(),
                    holder: "علی \"رضایی\"".into(),
                    national_code_masked: mask_national_code("0012345678"),
                }],
            }],
        }
    }

    #[test]
    fn html_is_rtl_persian_escaped_and_dated_in_solar_hijri() {
        let s = sample();
        let html = shipment_html(&s);
        assert!(html.contains("<html lang=\"fa\" dir=\"rtl\">"));
        assert!(
            html.contains("۱ فروردین ۱۴۰۳"),
            "the dispatch date in Solar Hijri"
        );
        assert!(html.contains("دفتر &lt;پیشخوان&gt;"));
        assert!(!html.contains("0012345678"));
        assert!(html.contains("******5678"));
    }

    #[test]
    fn csv_quotes_fields_with_commas_and_quotes() {
        let s = sample();
        let csv = shipment_csv(&s);
        let mut lines = csv.lines();
        assert_eq!(lines.next().unwrap(), CSV_HEADER);
        let row = lines.next().unwrap();
        assert!(row.contains("\"علی \"\"رضایی\"\"\""), "{row}");
        let parsed = crate::offices::parse_csv(&csv).unwrap();
        assert_eq!(parsed[1].1[8], "علی \"رضایی\"");
        assert_eq!(box_csv(&s, &s.boxes[0]), csv);
    }
}
