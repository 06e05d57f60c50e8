//! `GET /console/dashboard`: four charts drawn here as inline SVG (no script, no CDN), in
//! the page's language (Persian digits and right-to-left axes in Persian):
//!
//! * state changes per hour over the last 24 hours, from `application_history` (every
//!   transition is recorded there with its time), stacked by the state entered;
//! * queue depth per stage now, from the broker (a broker that cannot tell is "unknown",
//!   never 0);
//! * encoder yield: cards personalised against blanks spoiled, per encoder, from `cards`;
//! * applications overdue against the service level: received more than 15 days / more
//!   than a month (30 days) ago, card not yet at a pickup office ([`Store::count_overdue`]).
//!
//! Everything shown is read from the store and the broker at request time; an empty store
//! shows empty charts that say so.
//!
//! [`Store::count_overdue`]: cardpipe_common::store::Store::count_overdue

use std::collections::BTreeMap;
use std::fmt::Write;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use cardpipe_common::broker::QueueDepth;
use cardpipe_common::clock::{from_rfc3339, to_rfc3339};
use cardpipe_common::domain::state::ALL_STATES;
use cardpipe_common::runtime::Services;
use maud::{Markup, html};
use sqlx::Row;
use time::{Duration, OffsetDateTime};

use crate::data;
use crate::i18n::{Lang, Msg};
use crate::web::{ConsoleState, Ui, frame, internal, session};

/// The 15-day service level.
pub const SLA_SHORT: Duration = Duration::days(15);
/// The one-month service level (30 days, as the `cardpipe_applications_overdue` gauge).
pub const SLA_MONTH: Duration = Duration::days(30);

/// What the dashboard shows, read at one moment.
#[derive(Debug, Clone)]
pub struct Dashboard {
    /// When it was read.
    pub now: OffsetDateTime,
    /// The start of each of the 24 hours (the last one is the current hour).
    pub hours: Vec<OffsetDateTime>,
    /// State changes per state entered, one count per hour of `hours`.
    pub changes: BTreeMap<String, Vec<i64>>,
    /// Queue depth per stage (`None`: the broker cannot tell).
    pub queues: Vec<(String, Option<QueueDepth>)>,
    /// Per encoder: (name, personalised, spoiled).
    pub encoders: Vec<(String, i64, i64)>,
    /// Applications overdue against 15 days and against a month.
    pub overdue: (i64, i64),
}

/// The start of the hour `at` is in (UTC hours; Tehran's offset is a half hour, so the
/// buckets are labelled with the Tehran hour they start in).
fn hour_floor(at: OffsetDateTime) -> OffsetDateTime {
    let at = at.to_offset(time::UtcOffset::UTC);
    at.replace_minute(0)
        .and_then(|t| t.replace_second(0))
        .and_then(|t| t.replace_nanosecond(0))
        .unwrap_or(at)
}

/// Reads the dashboard's figures.
pub async fn read(
    services: &Services,
    stages: &[String],
    farm: Option<&cardpipe_card::farm::Farm>,
) -> anyhow::Result<Dashboard> {
    let now = services.clock.now();
    let first = hour_floor(now) - Duration::hours(23);
    let hours: Vec<OffsetDateTime> = (0..24).map(|i| first + Duration::hours(i)).collect();
    // Timestamps are stored as RFC 3339 UTC text (`2026-01-01T00:00:00.000000Z`): the first
    // 13 characters are the hour, on both backends.
    let rows = sqlx::query(
        "SELECT substr(at, 1, 13) AS hour, to_state, COUNT(*) AS n FROM application_history
         WHERE at >= $1 GROUP BY substr(at, 1, 13), to_state",
    )
    .bind(to_rfc3339(first))
    .fetch_all(services.store.pool())
    .await?;
    let mut changes: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in rows {
        let hour: String = r.try_get("hour")?;
        let state: String = r.try_get("to_state")?;
        let n: i64 = r.try_get("n")?;
        let Ok(start) = from_rfc3339(&format!("{hour}:00:00Z")) else {
            continue;
        };
        let i = (start - first).whole_hours();
        if (0..24).contains(&i) {
            changes.entry(state).or_insert_with(|| vec![0; 24])[i as usize] += n;
        }
    }
    let mut queues = Vec::new();
    for stage in stages {
        queues.push((stage.clone(), services.broker.depth(stage).await.ok()));
    }
    let encoders = data::encoders(services, farm)
        .await?
        .into_iter()
        .filter(|e| e.personalized + e.spoiled > 0)
        .map(|e| (e.name, e.personalized, e.spoiled))
        .collect();
    let overdue = (
        services.store.count_overdue(now - SLA_SHORT).await?,
        services.store.count_overdue(now - SLA_MONTH).await?,
    );
    Ok(Dashboard {
        now,
        hours,
        changes,
        queues,
        encoders,
        overdue,
    })
}

/// The handler.
pub async fn page(State(st): State<ConsoleState>, ui: Ui, headers: HeaderMap) -> Response {
    let s = match session(&st, &ui, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let d = match read(&st.services, &st.stages, st.farm.as_deref()).await {
        Ok(d) => d,
        Err(e) => return internal(&ui, e),
    };
    frame(&ui, &s, ui.t(Msg::DashboardTitle), render(ui.lang, &d))
}

/// The page body.
pub fn render(lang: Lang, d: &Dashboard) -> Markup {
    let t = |m| lang.t(m);
    html! {
        h1 { (t(Msg::DashboardTitle)) }
        p class="muted" { (t(Msg::AsOf)) " " (lang.datetime(d.now)) }
        div class="charts" {
            section class="chart" id="chart-stages" {
                h2 { (t(Msg::PerStage24h)) }
                p class="muted" { (t(Msg::PerStage24hHelp)) }
                @if d.changes.is_empty() {
                    p id="no-changes" { (t(Msg::NoChanges24h)) }
                }
                (stage_chart(lang, d))
            }
            section class="chart" id="chart-queues" {
                h2 { (t(Msg::QueueDepth)) }
                p class="muted" { (t(Msg::QueueDepthHelp)) }
                @if d.queues.is_empty() {
                    p id="no-queues" { (t(Msg::NoStageHere)) }
                } @else {
                    (queue_chart(lang, &d.queues))
                }
            }
            section class="chart" id="chart-yield" {
                h2 { (t(Msg::EncoderYield)) }
                p class="muted" { (t(Msg::EncoderYieldHelp)) }
                @if d.encoders.is_empty() {
                    p id="no-cards" { (t(Msg::NoCards)) }
                } @else {
                    (yield_chart(lang, &d.encoders))
                }
            }
            section class="chart" id="chart-overdue" {
                h2 { (t(Msg::Overdue)) }
                p class="muted" { (t(Msg::OverdueHelp)) }
                (overdue_chart(lang, d.overdue))
            }
        }
    }
}

/// Colours for the states, one each, in pipeline order (and grey for anything else).
const PALETTE: [&str; 19] = [
    "#4e79a7", "#9c9c9c", "#f28e2b", "#59a14f", "#e15759", "#7b1e1e", "#76b7b2", "#edc948",
    "#b07aa1", "#2f4b7c", "#d4a6c8", "#ff9da7", "#9c755f", "#86bcb6", "#1b7837", "#f1ce63",
    "#3a3a98", "#bab0ac", "#555555",
];

fn state_colour(state: &str) -> &'static str {
    ALL_STATES
        .iter()
        .position(|s| s.as_str() == state)
        .and_then(|i| PALETTE.get(i).copied())
        .unwrap_or("#8c8c8c")
}

/// Escapes text for SVG: the chart is assembled as text, so every piece of text from data or
/// from the message table goes through here.
fn esc(text: &str) -> String {
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

/// An SVG canvas in page coordinates: `x` runs left to right in English and right to left in
/// Persian (the chart is mirrored, its text is not).
struct Canvas {
    lang: Lang,
    width: f64,
    height: f64,
    body: String,
}

impl Canvas {
    fn new(lang: Lang, width: f64, height: f64) -> Self {
        Self {
            lang,
            width,
            height,
            body: String::new(),
        }
    }

    /// `x` in reading order (from the start edge) to SVG's left-to-right.
    fn x(&self, x: f64, w: f64) -> f64 {
        if self.lang.rtl() {
            self.width - x - w
        } else {
            x
        }
    }

    fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str, title: &str) {
        let sx = self.x(x, w);
        let _ = write!(
            self.body,
            r#"<rect x="{sx:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="{fill}"><title>{}</title></rect>"#,
            esc(title)
        );
    }

    fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64, stroke: &str) {
        let (a, b) = (self.x(x1, 0.0), self.x(x2, 0.0));
        let _ = write!(
            self.body,
            r##"<line x1="{a:.1}" y1="{y1:.1}" x2="{b:.1}" y2="{y2:.1}" stroke="{stroke}" stroke-width="1"/>"##
        );
    }

    /// Text anchored at its start (reading order), its middle or its end.
    fn text(&mut self, x: f64, y: f64, anchor: Anchor, size: u32, text: &str, class: &str) {
        let sx = self.x(x, 0.0);
        let anchor = match (anchor, self.lang.rtl()) {
            (Anchor::Middle, _) => "middle",
            (Anchor::Start, false) | (Anchor::End, true) => "start",
            (Anchor::Start, true) | (Anchor::End, false) => "end",
        };
        let _ = write!(
            self.body,
            r##"<text x="{sx:.1}" y="{y:.1}" text-anchor="{anchor}" font-size="{size}" fill="#33404d" class="{class}">{}</text>"##,
            esc(text)
        );
    }

    fn finish(self, id: &str, label: &str) -> Markup {
        let svg = format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" id="{id}" role="img" aria-label="{label}" viewBox="0 0 {w} {h}" width="{w}" height="{h}" direction="ltr" font-family="Vazirmatn, 'Noto Sans', 'DejaVu Sans', sans-serif"><title>{label}</title>{body}</svg>"#,
            id = esc(id),
            label = esc(label),
            w = self.width,
            h = self.height,
            body = self.body
        );
        // Every value in `svg` went through `esc` or is a number formatted here.
        maud::PreEscaped(svg)
    }
}

#[derive(Clone, Copy)]
enum Anchor {
    Start,
    Middle,
    End,
}

/// A round axis maximum at or above `max` (1, 2, 5 × 10ⁿ).
fn nice_max(max: i64) -> i64 {
    if max <= 0 {
        return 1;
    }
    let mut step = 1i64;
    loop {
        for m in [1, 2, 5] {
            if m * step >= max {
                return m * step;
            }
        }
        step = step.saturating_mul(10);
    }
}

/// (a) stacked bars, one per hour.
fn stage_chart(lang: Lang, d: &Dashboard) -> Markup {
    let (w, h) = (760.0, 296.0);
    let (left, right, top, bottom) = (52.0, 12.0, 30.0, 46.0);
    let mut c = Canvas::new(lang, w, h);
    let totals: Vec<i64> = (0..24)
        .map(|i| d.changes.values().map(|v| v[i]).sum())
        .collect();
    let max = nice_max(totals.iter().copied().max().unwrap_or(0));
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let slot = plot_w / 24.0;
    // Grid and the count axis.
    for k in 0..=4 {
        let v = max * k / 4;
        let y = top + plot_h - plot_h * (v as f64) / (max as f64);
        c.line(left, y, w - right, y, "#e3e8ee");
        c.text(left - 6.0, y + 4.0, Anchor::End, 11, &lang.num(v), "axis");
    }
    for (i, hour) in d.hours.iter().enumerate() {
        let x = left + slot * i as f64;
        let mut y = top + plot_h;
        for (state, counts) in &d.changes {
            let n = counts[i];
            if n == 0 {
                continue;
            }
            let bh = plot_h * n as f64 / max as f64;
            y -= bh;
            let title = format!(
                "{} {}: {} — {}",
                lang.t(Msg::HourAxis),
                lang.hour(*hour),
                crate::i18n::state_name(state).map_or(state.as_str(), |m| m.text(lang)),
                lang.num(n)
            );
            c.rect(x + 2.0, y, slot - 4.0, bh, state_colour(state), &title);
        }
        if i % 3 == 0 || i == 23 {
            c.text(
                x + slot / 2.0,
                top + plot_h + 16.0,
                Anchor::Middle,
                11,
                &lang.hour(*hour),
                "axis",
            );
        }
    }
    c.line(left, top + plot_h, w - right, top + plot_h, "#8a96a3");
    c.text(
        left + plot_w / 2.0,
        h - 8.0,
        Anchor::Middle,
        12,
        lang.t(Msg::HourAxis),
        "axis-title",
    );
    c.text(
        4.0,
        12.0,
        Anchor::Start,
        11,
        lang.t(Msg::ChangesAxis),
        "axis-title",
    );
    let label = lang.t(Msg::PerStage24h);
    html! {
        (c.finish("svg-stages", label))
        @if !d.changes.is_empty() {
            ul class="legend" id="legend-stages" {
                @for (state, counts) in &d.changes {
                    li {
                        i style=(format!("background:{}", state_colour(state))) {}
                        (crate::web::state(lang, state)) " " (lang.num(counts.iter().sum::<i64>()))
                    }
                }
            }
        }
    }
}

/// A horizontal bar chart: per row a label, stacked segments (value, colour, title) and the
/// text after the bar. `None` segments: the value is unknown, the bar says so.
type Bar = (String, Option<Vec<(i64, &'static str, String)>>, String);

fn hbars(lang: Lang, id: &str, label: &str, rows: &[Bar]) -> Markup {
    let row_h = 30.0;
    let (w, top) = (560.0, 8.0);
    let h = top * 2.0 + row_h * rows.len() as f64;
    let (label_w, value_w) = (150.0, 110.0);
    let bar_w = w - label_w - value_w - 16.0;
    let max = nice_max(
        rows.iter()
            .filter_map(|(_, s, _)| s.as_ref().map(|s| s.iter().map(|(v, _, _)| *v).sum()))
            .max()
            .unwrap_or(0),
    );
    let mut c = Canvas::new(lang, w, h);
    for (i, (name, segments, after)) in rows.iter().enumerate() {
        let y = top + row_h * i as f64;
        c.text(label_w - 8.0, y + 19.0, Anchor::End, 12, name, "label");
        let x0 = label_w;
        c.rect(x0, y + 6.0, bar_w, row_h - 12.0, "#eef1f5", "");
        let mut x = x0;
        if let Some(segments) = segments {
            for (v, colour, title) in segments {
                let bw = bar_w * (*v as f64) / (max as f64);
                if bw > 0.0 {
                    c.rect(x, y + 6.0, bw, row_h - 12.0, colour, title);
                }
                x += bw;
            }
        }
        c.text(
            x0 + bar_w + 8.0,
            y + 19.0,
            Anchor::Start,
            12,
            after,
            "value",
        );
    }
    c.finish(id, label)
}

/// (b) queue depth per stage.
fn queue_chart(lang: Lang, queues: &[(String, Option<QueueDepth>)]) -> Markup {
    let t = |m| lang.t(m);
    let rows: Vec<Bar> = queues
        .iter()
        .map(|(stage, d)| match d {
            Some(d) => {
                let segments = vec![
                    (
                        d.ready as i64,
                        "#4e79a7",
                        format!("{}: {}", t(Msg::Ready), lang.num(d.ready)),
                    ),
                    (
                        d.retrying as i64,
                        "#f28e2b",
                        format!("{}: {}", t(Msg::Retrying), lang.num(d.retrying)),
                    ),
                    (
                        d.parked as i64,
                        "#e15759",
                        format!("{}: {}", t(Msg::Parked), lang.num(d.parked)),
                    ),
                ];
                let total = d.ready + d.retrying + d.parked;
                (stage.clone(), Some(segments), lang.num(total))
            }
            None => (stage.clone(), None, format!("— {}", t(Msg::Unknown))),
        })
        .collect();
    html! {
        (hbars(lang, "svg-queues", t(Msg::QueueDepth), &rows))
        ul class="legend" {
            li { i style="background:#4e79a7" {} (t(Msg::Ready)) }
            li { i style="background:#f28e2b" {} (t(Msg::Retrying)) }
            li { i style="background:#e15759" {} (t(Msg::Parked)) }
        }
    }
}

/// (c) encoder yield.
fn yield_chart(lang: Lang, encoders: &[(String, i64, i64)]) -> Markup {
    let t = |m| lang.t(m);
    let ratio = |good: i64, bad: i64| {
        if good + bad > 0 {
            lang.percent(good as f64 / (good + bad) as f64)
        } else {
            "—".into()
        }
    };
    let mut rows: Vec<Bar> = encoders
        .iter()
        .map(|(name, good, bad)| {
            (
                name.clone(),
                Some(vec![
                    (
                        *good,
                        "#59a14f",
                        format!("{}: {}", t(Msg::Personalized), lang.num(good)),
                    ),
                    (
                        *bad,
                        "#e15759",
                        format!("{}: {}", t(Msg::Spoiled), lang.num(bad)),
                    ),
                ]),
                ratio(*good, *bad),
            )
        })
        .collect();
    let good: i64 = encoders.iter().map(|e| e.1).sum();
    let bad: i64 = encoders.iter().map(|e| e.2).sum();
    rows.push((
        t(Msg::Overall).to_owned(),
        Some(vec![
            (
                good,
                "#59a14f",
                format!("{}: {}", t(Msg::Personalized), lang.num(good)),
            ),
            (
                bad,
                "#e15759",
                format!("{}: {}", t(Msg::Spoiled), lang.num(bad)),
            ),
        ]),
        ratio(good, bad),
    ));
    html! {
        (hbars(lang, "svg-yield", t(Msg::EncoderYield), &rows))
        ul class="legend" {
            li { i style="background:#59a14f" {} (t(Msg::Personalized)) " " (lang.num(good)) }
            li { i style="background:#e15759" {} (t(Msg::Spoiled)) " " (lang.num(bad)) }
        }
    }
}

/// (d) overdue applications.
fn overdue_chart(lang: Lang, (short, month): (i64, i64)) -> Markup {
    let t = |m| lang.t(m);
    let rows: Vec<Bar> = vec![
        (
            t(Msg::Over15Days).to_owned(),
            Some(vec![(short, "#edc948", lang.num(short))]),
            lang.num(short),
        ),
        (
            t(Msg::Over1Month).to_owned(),
            Some(vec![(month, "#e15759", lang.num(month))]),
            lang.num(month),
        ),
    ];
    html! {
        (hbars(lang, "svg-overdue", t(Msg::Overdue), &rows))
        p class="muted" id="overdue-counts" data-15d=(short) data-1m=(month) {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn sample() -> Dashboard {
        let now = datetime!(2026-12-06 12:10 UTC);
        let first = hour_floor(now) - Duration::hours(23);
        let mut changes = BTreeMap::new();
        let mut received = vec![0; 24];
        received[23] = 7;
        changes.insert("received".to_owned(), received);
        Dashboard {
            now,
            hours: (0..24).map(|i| first + Duration::hours(i)).collect(),
            changes,
            queues: vec![
                (
                    "dedup".into(),
                    Some(QueueDepth {
                        ready: 3,
                        retrying: 1,
                        parked: 0,
                    }),
                ),
                ("keys".into(), None),
            ],
            encoders: vec![("enc-<1>".into(), 9, 1)],
            overdue: (2, 1),
        }
    }

    #[test]
    fn charts_in_both_languages() {
        let fa = render(Lang::Fa, &sample()).into_string();
        let en = render(Lang::En, &sample()).into_string();
        for out in [&fa, &en] {
            for id in ["svg-stages", "svg-queues", "svg-yield", "svg-overdue"] {
                assert!(out.contains(&format!("id=\"{id}\"")), "{id}: {out}");
            }
            // A name from data is escaped inside the SVG.
            assert!(out.contains("enc-&lt;1&gt;") && !out.contains("enc-<1>"));
            assert!(!out.contains("<script"));
        }
        // Persian: Persian digits, the unknown queue said so, yield 90%.
        assert!(fa.contains("۱۴۰۵/۰۹/۱۵ ۱۵:۴۰"), "{fa}");
        assert!(fa.contains("— نامعلوم") && fa.contains("٪۹۰٫۰"), "{fa}");
        assert!(fa.contains(">۷<"), "{fa}");
        assert!(en.contains("— unknown") && en.contains("90.0%"), "{en}");
        assert!(en.contains("2026-12-06 15:40 Tehran"), "{en}");
        // The last hour's bar (Tehran 15:30–16:30, labelled 15) is the rightmost in English
        // and the leftmost in Persian.
        assert!(en.contains(">15<") && fa.contains(">۱۵<"));
    }

    #[test]
    fn empty_data_says_so() {
        let mut d = sample();
        d.changes.clear();
        d.encoders.clear();
        d.queues.clear();
        let out = render(Lang::En, &d).into_string();
        assert!(out.contains("id=\"no-changes\""));
        assert!(out.contains("id=\"no-cards\""));
        assert!(out.contains("id=\"no-queues\""));
    }

    #[test]
    fn every_state_has_its_own_colour() {
        let colours: std::collections::BTreeSet<&str> = ALL_STATES
            .iter()
            .map(|s| state_colour(s.as_str()))
            .collect();
        assert_eq!(colours.len(), ALL_STATES.len());
        assert_eq!(state_colour("not_a_state"), "#8c8c8c");
    }

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice_max(0), 1);
        assert_eq!(nice_max(7), 10);
        assert_eq!(nice_max(11), 20);
        assert_eq!(nice_max(230), 500);
    }
}
