//! Small HTML building helpers: escaping, the page frame (inline CSS, no CDN), tables.

use std::fmt::Write;

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(text: &str) -> String {
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

/// Percent-encodes a query or path component.
pub fn url(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Persian text (names): isolated, right to left, language `fa`, inside the left-to-right
/// console.
pub fn bidi(text: &str) -> String {
    format!(
        "<bdi dir=\"rtl\" lang=\"fa\" class=\"persian\">{}</bdi>",
        esc(text)
    )
}

const CSS: &str = r#"
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 "Noto Sans","Noto Sans Arabic","DejaVu Sans",system-ui,sans-serif;color:#1d2733;background:#f4f6f9}
header{background:#17324d;color:#fff;display:flex;align-items:center;gap:18px;padding:8px 18px;flex-wrap:wrap}
header a{color:#d7e6f5;text-decoration:none}header a:hover{color:#fff}
header .brand{font-weight:700;color:#fff;margin-right:10px}
header form{margin:0 0 0 auto}
header .who{margin-left:auto;color:#b9cde0}
main{padding:18px;max-width:1280px}
h1{font-size:20px;margin:4px 0 14px}h2{font-size:16px;margin:22px 0 8px}
table{border-collapse:collapse;background:#fff;margin:6px 0 14px;min-width:40%}
th,td{border:1px solid #d5dce4;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#e9eef4;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #d5dce4;border-radius:6px;padding:10px 14px;min-width:150px}
.card .n{font-size:22px;font-weight:700}
.bar{background:#e3e8ee;border-radius:4px;width:220px;height:14px;overflow:hidden;display:inline-block;vertical-align:middle}
.bar span{display:block;height:100%;background:#2f8f5b}
.msg{padding:8px 12px;border-radius:4px;margin:0 0 12px}
.ok{background:#e3f4e8;border:1px solid #9fd3b1}.err{background:#fbe7e7;border:1px solid #e5a3a3}
.na{background:#fff8e1;border:1px solid #f0d58a;padding:10px 14px;border-radius:4px}
form.inline{display:inline-flex;gap:6px;align-items:center;margin:2px 0}
input[type=text],input[type=password],select{padding:4px 6px;border:1px solid #aab6c3;border-radius:3px}
button{padding:4px 10px;border:1px solid #17324d;background:#17324d;color:#fff;border-radius:3px;cursor:pointer}
button.danger{background:#a12b2b;border-color:#a12b2b}button.light{background:#fff;color:#17324d}
.photos{display:flex;gap:18px;flex-wrap:wrap}
.photos figure{margin:0;background:#fff;border:1px solid #d5dce4;padding:8px}
.photos img{width:220px;height:auto;display:block;background:#eee}
.persian{font-size:16px}
code{font-size:12px;background:#eef1f5;padding:1px 3px;border-radius:3px}
.muted{color:#6b7785}
"#;

/// The page frame. `nav` is false on the login page.
pub fn page(title: &str, who: Option<(&str, &str, &str)>, body: &str) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\" dir=\"ltr\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{} — cardpipe console</title><style>{CSS}</style></head><body>",
        esc(title)
    );
    if let Some((login, role, csrf)) = who {
        let _ = write!(
            out,
            "<header><span class=\"brand\">cardpipe</span>\
             <a href=\"/console/\">Overview</a>\
             <a href=\"/console/search\">Search</a>\
             <a href=\"/console/adjudications\">Adjudication</a>\
             <a href=\"/console/parked\">Parked work</a>\
             <a href=\"/console/encoders\">Encoders</a>\
             <a href=\"/console/stock\">Stock</a>\
             <a href=\"/console/shipments\">Shipments</a>\
             <a href=\"/console/audit\">Audit log</a>\
             <span class=\"who\">{} ({})</span>\
             <form method=\"post\" action=\"/console/logout\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <button class=\"light\" type=\"submit\">Sign out</button></form></header>",
            esc(login),
            esc(role),
            esc(csrf)
        );
    }
    let _ = write!(out, "<main>{body}</main></body></html>");
    out
}

/// A table: header cells and rows of already-rendered HTML cells.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = String::from("<table><thead><tr>");
    for h in headers {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr></thead><tbody>");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            let _ = write!(out, "<td>{cell}</td>");
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    out
}

/// A progress bar (0..=1).
pub fn bar(fraction: f64) -> String {
    format!(
        "<span class=\"bar\" title=\"{:.0}%\"><span style=\"width:{:.1}%\"></span></span> {:.0}%",
        fraction * 100.0,
        (fraction * 100.0).clamp(0.0, 100.0),
        fraction * 100.0
    )
}

/// A flash message from `?ok=` / `?error=`.
pub fn flash(ok: Option<&str>, error: Option<&str>) -> String {
    let mut out = String::new();
    if let Some(m) = ok {
        let _ = write!(out, "<p class=\"msg ok\" id=\"flash\">{}</p>", esc(m));
    }
    if let Some(m) = error {
        let _ = write!(out, "<p class=\"msg err\" id=\"flash\">{}</p>", esc(m));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_encodes_urls() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(url("a b/ج"), "a%20b%2F%D8%AC");
        assert!(bidi("علی").contains("dir=\"rtl\" lang=\"fa\""));
    }
}
