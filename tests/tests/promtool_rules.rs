//! Checks the monitoring and deployment files shipped in `deploy/`:
//!
//! * `promtool check config`, `promtool check rules` and `promtool test rules`
//!   on the Prometheus configuration, the alert rules and their unit tests;
//! * every alert has a unit test where it fires and one where it stays quiet;
//! * every Grafana dashboard is a valid dashboard JSON model, the compose file,
//!   the Grafana provisioning files and the RabbitMQ definitions parse;
//! * every metric a dashboard or a rule uses is in `deploy/METRICS.md`.
//!
//! promtool comes from Debian's `prometheus` package. Without it these tests
//! fail (they never pass silently).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value as Json;
use serde_norway::Value as Yaml;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Files in `dir` whose name ends with one of `suffixes`, sorted.
fn files(dir: &Path, suffixes: &[&str]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            suffixes.iter().any(|s| name.ends_with(s))
        })
        .collect();
    out.sort();
    out
}

fn rule_files() -> Vec<PathBuf> {
    let found = files(&deploy().join("prometheus/rules"), &[".yml", ".yaml"]);
    assert!(
        !found.is_empty(),
        "no rule files in deploy/prometheus/rules"
    );
    found
}

fn rule_test_files() -> Vec<PathBuf> {
    let found = files(&deploy().join("prometheus/tests"), &[".yml", ".yaml"]);
    assert!(
        !found.is_empty(),
        "no promtool tests in deploy/prometheus/tests"
    );
    found
}

fn dashboards() -> Vec<PathBuf> {
    let found = files(&deploy().join("grafana/dashboards"), &[".json"]);
    assert!(
        !found.is_empty(),
        "no dashboards in deploy/grafana/dashboards"
    );
    found
}

fn yaml(path: &Path) -> Yaml {
    serde_norway::from_str(&read(path))
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
}

fn json(path: &Path) -> Json {
    serde_json::from_str(&read(path))
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// promtool

/// Runs promtool with `args`; panics with its output unless it succeeds.
fn promtool(args: &[&str], dir: &Path) -> String {
    let output = match Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool is not installed, so the Prometheus rules cannot be checked. \
             Install it with `apt-get install -y --no-install-recommends prometheus` \
             (Debian/Ubuntu; the package ships promtool), then rerun the tests."
        ),
        Err(e) => panic!("running promtool: {e}"),
    };
    let text = format!(
        "$ promtool {}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "promtool failed ({}):\n{text}",
        output.status
    );
    text
}

fn path_args(paths: &[PathBuf]) -> Vec<String> {
    paths.iter().map(|p| p.display().to_string()).collect()
}

#[test]
fn promtool_check_rules() {
    let paths = path_args(&rule_files());
    let mut args = vec!["check", "rules"];
    args.extend(paths.iter().map(String::as_str));
    let out = promtool(&args, &deploy());
    println!("{out}");
}

#[test]
fn promtool_test_rules() {
    let paths = path_args(&rule_test_files());
    let mut args = vec!["test", "rules"];
    args.extend(paths.iter().map(String::as_str));
    let out = promtool(&args, &deploy());
    println!("{out}");
}

#[test]
fn promtool_check_config() {
    // rule_files in prometheus.yml is the in-container path; a glob that
    // matches nothing here is fine for promtool, the rules are checked above.
    let out = promtool(
        &[
            "check",
            "config",
            "--syntax-only",
            "prometheus/prometheus.yml",
        ],
        &deploy(),
    );
    println!("{out}");
}

// ---------------------------------------------------------------------------
// Alert coverage

fn str_of<'a>(v: &'a Yaml, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Yaml::as_str)
}

fn seq_of<'a>(v: &'a Yaml, key: &str) -> &'a [Yaml] {
    v.get(key)
        .and_then(Yaml::as_sequence)
        .map_or(&[], Vec::as_slice)
}

/// Every rule of every rule file: (alert or record name, expr, the rule).
fn rules() -> Vec<(String, String, Yaml)> {
    let mut out = Vec::new();
    for path in rule_files() {
        let doc = yaml(&path);
        for group in seq_of(&doc, "groups") {
            for rule in seq_of(group, "rules") {
                let name = str_of(rule, "alert")
                    .or_else(|| str_of(rule, "record"))
                    .unwrap_or_else(|| {
                        panic!("{}: a rule without alert or record", path.display())
                    });
                let expr = str_of(rule, "expr")
                    .unwrap_or_else(|| panic!("{}: rule {name} has no expr", path.display()));
                out.push((name.to_owned(), expr.to_owned(), rule.clone()));
            }
        }
    }
    out
}

#[test]
fn every_alert_is_labelled_annotated_and_tested_firing_and_quiet() {
    let alerts: Vec<(String, Yaml)> = rules()
        .into_iter()
        .filter(|(_, _, rule)| str_of(rule, "alert").is_some())
        .map(|(name, _, rule)| (name, rule))
        .collect();
    assert!(
        alerts.len() >= 10,
        "expected the full alert set, found {}",
        alerts.len()
    );

    // GitHub-style heading anchors of deploy/README.md.
    let anchors: BTreeSet<String> = read(&deploy().join("README.md"))
        .lines()
        .filter_map(|line| line.strip_prefix('#'))
        .map(|heading| {
            heading
                .trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect();

    let mut problems = Vec::new();
    for (name, rule) in &alerts {
        let labels = rule.get("labels");
        match labels.and_then(|l| str_of(l, "severity")) {
            Some("critical" | "warning" | "info") => {}
            other => problems.push(format!("{name}: severity label is {other:?}")),
        }
        for key in ["summary", "description", "runbook"] {
            if rule
                .get("annotations")
                .and_then(|a| str_of(a, key))
                .is_none()
            {
                problems.push(format!("{name}: no {key} annotation"));
            }
        }
        if let Some(runbook) = rule.get("annotations").and_then(|a| str_of(a, "runbook")) {
            match runbook.strip_prefix("deploy/README.md#") {
                Some(anchor) if anchors.contains(anchor) => {}
                Some(anchor) => problems.push(format!(
                    "{name}: runbook anchor #{anchor} is no heading of deploy/README.md"
                )),
                None => problems.push(format!(
                    "{name}: runbook {runbook} is not a deploy/README.md section"
                )),
            }
        }
    }

    // alertname -> (tested firing, tested quiet)
    let mut seen: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for path in rule_test_files() {
        let doc = yaml(&path);
        for test in seq_of(&doc, "tests") {
            for case in seq_of(test, "alert_rule_test") {
                let name = str_of(case, "alertname").unwrap_or_else(|| {
                    panic!("{}: alert_rule_test without alertname", path.display())
                });
                let fires = !seq_of(case, "exp_alerts").is_empty();
                let entry = seen.entry(name.to_owned()).or_default();
                if fires {
                    entry.0 = true;
                } else {
                    entry.1 = true;
                }
            }
        }
    }
    for (name, _) in &alerts {
        match seen.get(name) {
            None => problems.push(format!("{name}: no promtool test")),
            Some((firing, quiet)) => {
                if !firing {
                    problems.push(format!("{name}: no test where it fires"));
                }
                if !quiet {
                    problems.push(format!("{name}: no test where it stays quiet"));
                }
            }
        }
    }
    for name in seen.keys() {
        if !alerts.iter().any(|(a, _)| a == name) {
            problems.push(format!("tests name alert {name}, which no rule defines"));
        }
    }
    assert!(
        problems.is_empty(),
        "alert rule problems:\n  {}",
        problems.join("\n  ")
    );
}

// ---------------------------------------------------------------------------
// Grafana, compose, RabbitMQ

/// Collects every PromQL expression in a dashboard: panel targets and
/// query-variable definitions.
fn dashboard_exprs(v: &Json, out: &mut Vec<String>) {
    match v {
        Json::Object(map) => {
            if let Some(Json::String(expr)) = map.get("expr") {
                out.push(expr.clone());
            }
            if map.get("type").and_then(Json::as_str) == Some("query") {
                match map.get("query") {
                    Some(Json::String(q)) => out.push(q.clone()),
                    Some(Json::Object(q)) => {
                        if let Some(Json::String(q)) = q.get("query") {
                            out.push(q.clone());
                        }
                    }
                    _ => {}
                }
            }
            for value in map.values() {
                dashboard_exprs(value, out);
            }
        }
        Json::Array(items) => items.iter().for_each(|i| dashboard_exprs(i, out)),
        _ => {}
    }
}

fn panels(dashboard: &Json) -> Vec<&Json> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(panel);
        for inner in panel["panels"].as_array().into_iter().flatten() {
            out.push(inner);
        }
    }
    out
}

#[test]
fn dashboards_are_grafana_dashboard_models() {
    let mut uids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    for path in dashboards() {
        let name = path.display().to_string();
        let d = json(&path);
        let uid = d["uid"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no uid"));
        assert!(
            uid.len() <= 40,
            "{name}: uid longer than Grafana's 40 characters"
        );
        assert!(uids.insert(uid.to_owned()), "{name}: uid {uid} used twice");
        let title = d["title"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no title"));
        assert!(
            titles.insert(title.to_owned()),
            "{name}: title {title} used twice"
        );
        let schema = d["schemaVersion"]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: no schemaVersion"));
        assert!(
            (36..=41).contains(&schema),
            "{name}: schemaVersion {schema}"
        );
        assert!(
            d["id"].is_null(),
            "{name}: id must be null in a provisioned dashboard"
        );

        let panels = panels(&d);
        assert!(!panels.is_empty(), "{name}: no panels");
        let mut ids = BTreeSet::new();
        for panel in panels {
            let id = panel["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{name}: panel without id"));
            assert!(ids.insert(id), "{name}: panel id {id} used twice");
            let kind = panel["type"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: panel {id} without type"));
            // Grafana's built-in panels only: no plugin to install.
            assert!(
                [
                    "row",
                    "timeseries",
                    "stat",
                    "gauge",
                    "bargauge",
                    "table",
                    "text",
                    "state-timeline",
                    "heatmap",
                    "piechart"
                ]
                .contains(&kind),
                "{name}: panel {id} has type {kind}, not a built-in panel"
            );
            let pos = &panel["gridPos"];
            for key in ["h", "w", "x", "y"] {
                assert!(
                    pos[key].is_u64(),
                    "{name}: panel {id} gridPos.{key} missing"
                );
            }
            assert!(
                pos["w"].as_u64().unwrap_or(0) + pos["x"].as_u64().unwrap_or(0) <= 24,
                "{name}: panel {id} is wider than the 24-column grid"
            );
            if kind == "row" || kind == "text" {
                continue;
            }
            let targets = panel["targets"]
                .as_array()
                .unwrap_or_else(|| panic!("{name}: panel {id} has no targets"));
            assert!(!targets.is_empty(), "{name}: panel {id} has no targets");
            for t in targets {
                assert!(
                    t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                    "{name}: panel {id} has a target without expr"
                );
                assert!(
                    t["refId"].is_string(),
                    "{name}: panel {id} has a target without refId"
                );
            }
            assert_eq!(
                panel["datasource"]["uid"].as_str(),
                Some("${datasource}"),
                "{name}: panel {id} must use the $datasource variable"
            );
        }
    }
}

/// Every dashboard query parses as PromQL: promtool checks them as recording
/// rules, with Grafana's variables replaced by ordinary values.
#[test]
fn dashboard_queries_are_valid_promql() {
    let mut rules = Vec::new();
    for path in dashboards() {
        let mut exprs = Vec::new();
        dashboard_exprs(&json(&path), &mut exprs);
        for expr in exprs {
            if expr.starts_with("label_values(") {
                continue;
            }
            let expr = expr
                .replace("$__rate_interval", "5m")
                .replace("$stage", ".*")
                .replace("$encoder", ".*");
            rules.push(serde_json::json!({
                "record": format!("dashboard:query:{}", rules.len()),
                "expr": expr,
            }));
        }
    }
    assert!(
        rules.len() > 40,
        "only {} dashboard queries found",
        rules.len()
    );
    // YAML is a superset of JSON: promtool reads this as a rule file.
    let doc = serde_json::json!({ "groups": [{ "name": "dashboards", "rules": rules }] });
    let file = std::env::temp_dir().join(format!(
        "cardpipe-dashboard-queries-{}.yml",
        std::process::id()
    ));
    std::fs::write(&file, serde_json::to_string_pretty(&doc).expect("json"))
        .expect("write temp rule file");
    let file_arg = file.display().to_string();
    let result = std::panic::catch_unwind(|| promtool(&["check", "rules", &file_arg], &deploy()));
    let _ = std::fs::remove_file(&file);
    match result {
        Ok(out) => println!("{out}"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

#[test]
fn compose_and_provisioning_files_parse() {
    let mut compose = yaml(&deploy().join("compose.yaml"));
    // The services share their shape through a YAML anchor and `<<` merge keys.
    compose.apply_merge().expect("compose.yaml merge keys");
    let services = compose
        .get("services")
        .and_then(Yaml::as_mapping)
        .expect("compose.yaml has services");
    let service = |name: &str| {
        services
            .get(name)
            .unwrap_or_else(|| panic!("compose.yaml has no service {name}"))
    };
    for infra in [
        "rabbitmq",
        "postgres",
        "minio",
        "minio-init",
        "prometheus",
        "grafana",
        "migrate",
        "pki-init",
        "serve",
    ] {
        service(infra);
    }
    // (Intake and delivery run in serve; compose_file in the cardpipe crate runs them all.)
    for stage in [
        "dedup",
        "dedup-shard-0",
        "dedup-shard-1",
        "keys",
        "personalize",
        "qc",
        "shipping",
    ] {
        let s = service(stage);
        let command: Vec<&str> = seq_of(s, "command")
            .iter()
            .filter_map(Yaml::as_str)
            .collect();
        assert_eq!(command, ["worker", stage], "service {stage}: command");
        assert!(
            s.get("deploy").and_then(|d| d.get("replicas")).is_some(),
            "service {stage}: no deploy.replicas"
        );
        let check = s
            .get("healthcheck")
            .map(|h| format!("{h:?}"))
            .unwrap_or_default();
        assert!(
            check.contains("/readyz"),
            "service {stage}: health check does not probe /readyz"
        );
    }
    // The scrape config discovers exactly the compose services that run cardpipe.
    let prometheus = read(&deploy().join("prometheus/prometheus.yml"));
    for name in [
        "dedup",
        "dedup-shard-0",
        "dedup-shard-1",
        "keys",
        "personalize",
        "qc",
        "shipping",
        "serve",
    ] {
        assert!(
            prometheus.contains(&format!("- {name}\n")),
            "prometheus.yml does not discover {name}"
        );
    }

    for path in files(
        &deploy().join("grafana/provisioning/datasources"),
        &[".yml", ".yaml"],
    )
    .into_iter()
    .chain(files(
        &deploy().join("grafana/provisioning/dashboards"),
        &[".yml", ".yaml"],
    ))
    .chain([deploy().join("blackbox/blackbox.yml")])
    {
        yaml(&path);
    }
    let definitions = json(&deploy().join("rabbitmq/definitions.json"));
    assert!(
        definitions["vhosts"]
            .as_array()
            .is_some_and(|v| !v.is_empty()),
        "definitions.json has no vhosts"
    );
}

// ---------------------------------------------------------------------------
// Metric names against the catalogue

/// PromQL functions, aggregations and keywords (plus Grafana's label_values).
const PROMQL_WORDS: &[&str] = &[
    "abs",
    "absent",
    "absent_over_time",
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atanh",
    "avg_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "cos",
    "cosh",
    "count_over_time",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "deg",
    "delta",
    "deriv",
    "exp",
    "floor",
    "histogram_quantile",
    "histogram_count",
    "histogram_sum",
    "histogram_fraction",
    "holt_winters",
    "hour",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "max_over_time",
    "min_over_time",
    "minute",
    "month",
    "pi",
    "predict_linear",
    "present_over_time",
    "quantile_over_time",
    "rad",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sin",
    "sinh",
    "sort",
    "sort_desc",
    "sqrt",
    "stddev_over_time",
    "stdvar_over_time",
    "sum_over_time",
    "tan",
    "tanh",
    "time",
    "timestamp",
    "vector",
    "year",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "atan2",
    "inf",
    "nan",
    "Inf",
    "NaN",
    "label_values",
];

/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric (and recording rule) names an expression reads.
fn metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_string = |i: &mut usize, quote: char| {
        *i += 1;
        while *i < chars.len() && chars[*i] != quote {
            if chars[*i] == '\\' {
                *i += 1;
            }
            *i += 1;
        }
        *i += 1;
    };
    let skip_to = |i: &mut usize, close: char| {
        while *i < chars.len() && chars[*i] != close {
            if matches!(chars[*i], '"' | '\'' | '`') {
                let q = chars[*i];
                *i += 1;
                while *i < chars.len() && chars[*i] != q {
                    if chars[*i] == '\\' {
                        *i += 1;
                    }
                    *i += 1;
                }
            }
            *i += 1;
        }
        *i += 1;
    };
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            skip_string(&mut i, c);
        } else if c == '{' {
            skip_to(&mut i, '}');
        } else if c == '[' {
            skip_to(&mut i, ']');
        } else if c == '#' {
            skip_to(&mut i, '\n');
        } else if c == '$' {
            // Grafana variable: $name, ${name}, $__rate_interval.
            i += 1;
            if i < chars.len() && chars[i] == '{' {
                skip_to(&mut i, '}');
            } else {
                while i < chars.len() && is_ident(chars[i]) {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let paren = j < chars.len() && chars[j] == '(';
            if LABEL_LISTS.contains(&word.as_str()) {
                if paren {
                    i = j;
                    skip_to(&mut i, ')');
                }
            } else if word == "label_values" && paren {
                // Grafana: label_values(metric_or_selector, label) — keep the
                // selector, drop the label name.
                let inner_start = j + 1;
                let mut k = inner_start;
                let mut depth = 1;
                while k < chars.len() && depth > 0 {
                    match chars[k] {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    k += 1;
                }
                let inner: String = chars[inner_start..k.saturating_sub(1)].iter().collect();
                let selector = inner.rsplit_once(',').map_or(inner.as_str(), |(s, _)| s);
                out.extend(metric_names(selector));
                i = k;
            } else if !PROMQL_WORDS.contains(&word.as_str()) {
                out.push(word);
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Metric names and types from the catalogue's tables: the first cell of
/// every table row, when it is a name in backticks.
fn catalogue() -> BTreeMap<String, String> {
    let text = read(&deploy().join("METRICS.md"));
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 3 || !cells[0].is_empty() {
            continue;
        }
        let first = cells[1];
        if let Some(name) = first.strip_prefix('`').and_then(|s| s.strip_suffix('`'))
            && !name.contains(' ')
            && !name.contains(',')
        {
            out.insert(name.to_owned(), cells[2].to_owned());
        }
    }
    out
}

fn check_names(
    names: &[String],
    catalogue: &BTreeMap<String, String>,
    recorded: &BTreeSet<String>,
) -> Vec<String> {
    let mut unknown = Vec::new();
    for name in names {
        let known = if name.contains(':') {
            recorded.contains(name)
        } else {
            catalogue.contains_key(name)
                || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                    name.strip_suffix(suffix)
                        .and_then(|base| catalogue.get(base))
                        .is_some_and(|kind| kind == "histogram")
                })
        };
        if !known {
            unknown.push(name.clone());
        }
    }
    unknown
}

#[test]
fn metric_name_extraction() {
    let names = metric_names(
        r#"histogram_quantile(0.95, sum by (le, stage) (rate(cardpipe_job_duration_seconds_bucket{stage=~"$stage", x="a}b"}[$__rate_interval])))
           / on (stage) group_left (state) max without (instance) (stage:rec:rate5m offset 1h) > 0.5
           and time() - 1e3 > label_values(up{job="cardpipe"}, service)"#,
    );
    assert_eq!(
        names,
        [
            "cardpipe_job_duration_seconds_bucket",
            "stage:rec:rate5m",
            "up"
        ],
    );

    let catalogue = catalogue();
    assert_eq!(
        catalogue
            .get("cardpipe_job_duration_seconds")
            .map(String::as_str),
        Some("histogram")
    );
    assert_eq!(
        catalogue.get("cardpipe_jobs_total").map(String::as_str),
        Some("counter")
    );
    let recorded = BTreeSet::from(["stage:rec:rate5m".to_owned()]);
    // The check is not vacuous: an unknown metric, a histogram suffix on a
    // gauge and an undefined recording rule are all caught.
    assert_eq!(
        check_names(
            &[
                "cardpipe_jobs_total".into(),
                "cardpipe_job_duration_seconds_bucket".into(),
                "cardpipe_no_such_metric".into(),
                "cardpipe_outbox_pending_bucket".into(),
                "stage:rec:rate5m".into(),
                "level:undefined:rule".into(),
            ],
            &catalogue,
            &recorded,
        ),
        [
            "cardpipe_no_such_metric",
            "cardpipe_outbox_pending_bucket",
            "level:undefined:rule"
        ],
    );
}

#[test]
fn every_metric_used_is_in_the_catalogue() {
    let catalogue = catalogue();
    assert!(
        catalogue.len() >= 27,
        "METRICS.md lists only {} metrics",
        catalogue.len()
    );
    let rules = rules();
    let recorded: BTreeSet<String> = rules
        .iter()
        .filter(|(_, _, rule)| str_of(rule, "record").is_some())
        .map(|(name, _, _)| name.clone())
        .collect();
    for name in &recorded {
        assert!(
            name.contains(':'),
            "recording rule {name} should be named level:metric:operation"
        );
    }

    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for (name, expr, _) in &rules {
        let names = metric_names(expr);
        used.extend(names.iter().cloned());
        for bad in check_names(&names, &catalogue, &recorded) {
            problems.push(format!("rule {name}: {bad}"));
        }
    }
    for path in dashboards() {
        let mut exprs = Vec::new();
        dashboard_exprs(&json(&path), &mut exprs);
        for expr in exprs {
            let names = metric_names(&expr);
            used.extend(names.iter().cloned());
            for bad in check_names(&names, &catalogue, &recorded) {
                problems.push(format!("{}: {bad} in `{expr}`", path.display()));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "metrics used but not in deploy/METRICS.md (add a row there, or fix the name):\n  {}",
        problems.join("\n  ")
    );
    // Every cardpipe metric in the catalogue is shown or alerted on somewhere.
    let unused: Vec<&String> = catalogue
        .keys()
        .filter(|m| m.starts_with("cardpipe_"))
        .filter(|m| {
            !used.iter().any(|u| {
                u == *m
                    || ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| u.strip_suffix(s) == Some(m.as_str()))
            })
        })
        .collect();
    assert!(
        unused.is_empty(),
        "catalogued metrics no dashboard or rule uses: {unused:?}"
    );
}
