//! Small HTML building blocks on [`maud`]: the page frame (inline CSS, no CDN), tables,
//! progress bars, flash messages, Persian text.
//!
//! Everything is a [`Markup`] built with [`html!`], so text and attribute values are escaped
//! by construction; [`PreEscaped`] is used only for the fixed stylesheet below.

use std::fmt::Write;

use maud::{DOCTYPE, Markup, PreEscaped, html};

use crate::i18n::{Lang, Msg};

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
pub fn bidi(text: &str) -> Markup {
    html! { bdi dir="rtl" lang="fa" class="persian" { (text) } }
}

/// An identifier (application, batch, job, tracking code): Latin, left to right even inside
/// a right-to-left page.
pub fn ltr(text: &str) -> Markup {
    html! { bdi dir="ltr" { (text) } }
}

const CSS: &str = r#"
@font-face{font-family:"Vazirmatn";src:url("/console/assets/Vazirmatn-Regular.woff2") format("woff2");font-weight:400;font-style:normal;font-display:swap}
@font-face{font-family:"Vazirmatn";src:url("/console/assets/Vazirmatn-Bold.woff2") format("woff2");font-weight:700;font-style:normal;font-display:swap}
*{box-sizing:border-box}
body{margin:0;font:14px/1.6 "Vazirmatn","Noto Sans","DejaVu Sans",system-ui,sans-serif;color:#1d2733;background:#f4f6f9}
header{background:#17324d;color:#fff;display:flex;align-items:center;gap:18px;padding:8px 18px;flex-wrap:wrap}
header a{color:#d7e6f5;text-decoration:none}header a:hover{color:#fff}
header .brand{font-weight:700;color:#fff;margin-inline-end:10px}
header form{margin:0}
header .who{margin-inline-start:auto;color:#b9cde0}
header .lang{border:1px solid #7f9bb8;border-radius:3px;padding:0 6px}
main{padding:18px;max-width:1280px}
h1{font-size:20px;margin:4px 0 14px}h2{font-size:16px;margin:22px 0 8px}
table{border-collapse:collapse;background:#fff;margin:6px 0 14px;min-width:40%}
th,td{border:1px solid #d5dce4;padding:4px 8px;text-align:start;vertical-align:top}
th{background:#e9eef4;font-weight:600}
td.num,th.num{text-align:end;font-variant-numeric:tabular-nums}
.charts{display:flex;flex-wrap:wrap;gap:16px}
.chart{background:#fff;border:1px solid #d5dce4;border-radius:6px;padding:10px 14px;max-width:100%}
.chart svg{display:block;max-width:100%;height:auto}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;margin:6px 0 0;padding:0;list-style:none}
.legend i{display:inline-block;width:12px;height:12px;border-radius:2px;vertical-align:middle;margin-inline-end:4px}
.footer{margin-top:24px}
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

/// The link that switches to the other language and comes back to `here` (this page).
pub fn lang_switch(lang: Lang, here: &str) -> Markup {
    let other = lang.other();
    html! {
        a class="lang" id="lang-switch" lang=(other.code()) hreflang=(other.code())
            title=(lang.t(Msg::SwitchLanguage))
            href=(format!("/console/lang?to={}&back={}", other.code(), url(here))) {
            (other.name())
        }
    }
}

/// The page frame in `lang` (`here` is this page's path, for the language switch): `who` is
/// the signed-in operator's (login, role, CSRF token), `None` on the login and error pages
/// (no navigation).
pub fn page(
    lang: Lang,
    here: &str,
    title: &str,
    who: Option<(&str, &str, &str)>,
    body: Markup,
) -> Markup {
    let t = |m| lang.t(m);
    html! {
        (DOCTYPE)
        html lang=(lang.code()) dir=(lang.dir()) {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width,initial-scale=1";
                title { (title) " — " (t(Msg::Console)) }
                // The one pre-escaped piece: a fixed constant, nothing from data.
                style { (PreEscaped(CSS)) }
            }
            body {
                header {
                    span class="brand" { "cardpipe" }
                    @if let Some((login, role, csrf)) = who {
                        a href="/console/" { (t(Msg::Overview)) }
                        a href="/console/dashboard" id="nav-dashboard" { (t(Msg::Dashboard)) }
                        a href="/console/search" { (t(Msg::Search)) }
                        a href="/console/adjudications" { (t(Msg::Adjudication)) }
                        a href="/console/parked" { (t(Msg::ParkedWork)) }
                        a href="/console/encoders" { (t(Msg::Encoders)) }
                        a href="/console/stock" { (t(Msg::Stock)) }
                        a href="/console/shipments" { (t(Msg::Shipments)) }
                        a href="/console/audit" { (t(Msg::AuditLog)) }
                        span class="who" { (ltr(login)) " (" (role_name(lang, role)) ")" }
                        (lang_switch(lang, here))
                        form method="post" action="/console/logout" {
                            input type="hidden" name="csrf" value=(csrf);
                            button class="light" type="submit" { (t(Msg::SignOut)) }
                        }
                    } @else {
                        span class="who" {}
                        (lang_switch(lang, here))
                    }
                }
                main {
                    (body)
                    p class="muted footer" { (t(Msg::TimesNote)) }
                }
            }
        }
    }
}

/// A role's name in `lang` (`operator`, `supervisor`, `auditor`).
pub fn role_name(lang: Lang, role: &str) -> &str {
    match role {
        "operator" => lang.t(Msg::RoleOperator),
        "supervisor" => lang.t(Msg::RoleSupervisor),
        "auditor" => lang.t(Msg::RoleAuditor),
        other => other,
    }
}

/// A table with translated header cells.
pub fn ttable(lang: Lang, headers: &[Msg], rows: &[Vec<Markup>]) -> Markup {
    let headers: Vec<&str> = headers.iter().map(|m| lang.t(*m)).collect();
    table(&headers, rows)
}

/// A table: header cells (text) and rows of cells (markup).
pub fn table(headers: &[&str], rows: &[Vec<Markup>]) -> Markup {
    html! {
        table {
            thead { tr { @for h in headers { th { (h) } } } }
            tbody {
                @for row in rows {
                    tr { @for cell in row { td { (cell) } } }
                }
            }
        }
    }
}

/// A progress bar (0..=1), its percentage in `lang`'s digits.
pub fn bar(lang: Lang, fraction: f64) -> Markup {
    let percent = fraction * 100.0;
    let label = match lang {
        Lang::En => format!("{percent:.0}%"),
        Lang::Fa => format!("٪{}", lang.num(format!("{percent:.0}"))),
    };
    html! {
        span class="bar" title=(label) {
            span style=(format_args!("width:{:.1}%", percent.clamp(0.0, 100.0))) {}
        }
        " " (label)
    }
}

/// A flash message from `?ok=` / `?error=`.
pub fn flash(ok: Option<&str>, error: Option<&str>) -> Markup {
    html! {
        @if let Some(m) = ok { p class="msg ok" id="flash" { (m) } }
        @if let Some(m) = error { p class="msg err" id="flash" { (m) } }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTILE: &str = "<script>alert(1)</script>";

    #[test]
    fn encodes_urls_and_marks_persian_text() {
        assert_eq!(url("a b/ج"), "a%20b%2F%D8%AC");
        assert_eq!(
            bidi("علی <b>").into_string(),
            "<bdi dir=\"rtl\" lang=\"fa\" class=\"persian\">علی &lt;b&gt;</bdi>"
        );
    }

    #[test]
    fn hostile_values_come_out_escaped_in_pages_tables_and_flashes() {
        let quoted = "x\" onmouseover=\"alert(2)";
        let cells = vec![vec![
            html! { (HOSTILE) },
            html! { a href=(format!("/console/applications/{}", url(quoted))) title=(quoted) { (quoted) } },
        ]];
        let body = html! {
            (flash(Some(HOSTILE), Some(quoted)))
            (table(&[HOSTILE, "ok"], &cells))
            (bidi(HOSTILE))
        };
        let out = page(
            Lang::En,
            "/console/",
            HOSTILE,
            Some((HOSTILE, "supervisor", quoted)),
            body,
        )
        .into_string();
        // The only script-looking text is escaped, everywhere it appears.
        assert!(!out.contains("<script"), "{out}");
        assert_eq!(
            out.matches("&lt;script&gt;alert(1)&lt;/script&gt;").count(),
            6,
            "{out}"
        );
        // A quote cannot end an attribute value early.
        assert!(!out.contains("\" onmouseover="), "{out}");
        assert!(
            out.contains("name=\"csrf\" value=\"x&quot; onmouseover=&quot;alert(2)\""),
            "{out}"
        );
        assert!(
            out.contains("title=\"x&quot; onmouseover=&quot;alert(2)\""),
            "{out}"
        );
        assert!(
            out.contains("href=\"/console/applications/x%22%20onmouseover%3D%22alert%282%29\"")
        );
        assert!(
            out.contains(
                "<p class=\"msg err\" id=\"flash\">x&quot; onmouseover=&quot;alert(2)</p>"
            )
        );
        assert!(
            out.starts_with("<!DOCTYPE html><html lang=\"en\" dir=\"ltr\"><head>"),
            "{out}"
        );
        assert!(
            out.contains("<title>&lt;script&gt;alert(1)&lt;/script&gt; — cardpipe console</title>"),
            "{out}"
        );
        assert!(out.contains("<th>&lt;script&gt;alert(1)&lt;/script&gt;</th><th>ok</th>"));
        assert!(out.ends_with("</p></main></body></html>"), "{out}");
        // Persian: right to left, Persian navigation, the switch back to English.
        let fa = page(
            Lang::Fa,
            "/console/audit?subject=a b",
            "t",
            Some(("ali", "operator", "c")),
            html! {},
        )
        .into_string();
        assert!(
            fa.starts_with("<!DOCTYPE html><html lang=\"fa\" dir=\"rtl\">"),
            "{fa}"
        );
        assert!(fa.contains("داشبورد") && fa.contains("(اپراتور)"), "{fa}");
        assert!(
            fa.contains(
                "href=\"/console/lang?to=en&amp;back=%2Fconsole%2Faudit%3Fsubject%3Da%20b\""
            ),
            "{fa}"
        );
    }

    #[test]
    fn bars_and_empty_flashes() {
        assert_eq!(
            bar(Lang::En, 0.5).into_string(),
            "<span class=\"bar\" title=\"50%\"><span style=\"width:50.0%\"></span></span> 50%"
        );
        assert!(bar(Lang::Fa, 0.5).into_string().ends_with(" ٪۵۰"));
        assert_eq!(
            bar(Lang::En, 1.5)
                .into_string()
                .matches("width:100.0%")
                .count(),
            1
        );
        assert!(flash(None, None).into_string().is_empty());
    }
}
