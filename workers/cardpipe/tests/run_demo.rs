//! The README's run command, as a newcomer runs it: `cardpipe run --demo N` on embedded
//! defaults in an empty directory carries a generated batch through every stage, serves
//! /healthz and /metrics, plays the card life on its accelerated calendar (cards collected,
//! cards voided and their certificates revoked, Persian messages in the SMS outbox file),
//! stops cleanly on SIGTERM, and a second start resumes the same batch instead of submitting
//! it again.

use std::time::Duration;

use cardpipe_common::store::Store;
use sqlx::Row;

const APPLICANTS: usize = 12;

mod common;

use common::{Running, free_port};

async fn per_state(dir: &std::path::Path) -> Vec<(String, i64)> {
    let url = format!("sqlite:{}", dir.join("var/cardpipe.db").display());
    let store = Store::connect(&url, 1).await.unwrap();
    let rows =
        sqlx::query("SELECT state, COUNT(*) AS n FROM applications GROUP BY state ORDER BY state")
            .fetch_all(store.pool())
            .await
            .unwrap();
    let out = rows
        .iter()
        .map(|r| (r.get::<String, _>("state"), r.get::<i64, _>("n")))
        .collect();
    store.close().await;
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_run_command_carries_a_generated_batch_through_every_stage() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut run = Running::start(
        dir.path(),
        port,
        &["run", "--demo", &APPLICANTS.to_string()],
        // As on a fresh machine without pcsc-lite: the demo never loads PC/SC.
        &[("CARDPIPE_PCSC_LIB", "/nonexistent/libpcsclite.so.1")],
    );
    let received = run.wait_for("demo: batch", Duration::from_secs(120));
    assert!(received.contains("received:"), "{received}");
    run.wait_for("demo: done", Duration::from_secs(420));
    // The whole card life on the accelerated calendar: dispatch, office receipt with the one
    // planted discrepancy, handovers with a refused attempt, messages, six-month voiding.
    let said = run.stderr_so_far();
    for needle in [
        "(1 card reported missing by its office",
        "attempts refused",
        "demo: after the card life",
        "certificates of the voided cards revoked; CRL number",
        "sms-outbox.ndjson",
    ] {
        assert!(said.contains(needle), "{needle:?} not in:\n{said}");
    }
    let outbox = std::fs::read_to_string(dir.path().join("var/sms-outbox.ndjson")).unwrap();
    let messages: Vec<serde_json::Value> = outbox
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m["text"].as_str().unwrap().contains("باطل شد")),
        "a voiding notice in Persian: {outbox}"
    );
    assert!(
        messages
            .iter()
            .all(|m| m["to"].as_str().unwrap().contains('•')),
        "mobile numbers masked: {outbox}"
    );

    let health = reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
        .await
        .unwrap();
    assert!(health.status().is_success());
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("cardpipe_jobs_total{"),
        "stage metrics missing from /metrics"
    );
    exported_metrics_are_catalogued(&metrics);
    let status = run.terminate();
    assert!(status.success(), "cardpipe exited with {status}");
    // The run's audit entries are vouched for by the checkpoint signed at shutdown.
    let verified = common::cli_with_input(dir.path(), &["audit", "verify"], "");
    let said = String::from_utf8_lossy(&verified.stdout).into_owned();
    assert!(verified.status.success(), "{said}");
    assert!(
        said.contains("checked against the signed checkpoint of entry"),
        "{said}"
    );

    let states = per_state(dir.path()).await;
    let total: i64 = states.iter().map(|(_, n)| n).sum();
    // Every applicant accepted (the demo's one flagged overcharge record is accepted too);
    // none is left where a stage would still take it.
    assert!(total > APPLICANTS as i64, "{states:?}");
    for (state, _) in &states {
        assert!(
            !matches!(
                state.as_str(),
                "received"
                    | "dedup_pending"
                    | "dedup_clear"
                    | "cleared"
                    | "keys_issued"
                    | "qc_failed"
            ),
            "applications left in flight in {state}: {states:?}"
        );
    }
    // The summary's two ends of the card life: cards collected and cards voided.
    for end in ["collected", "voided"] {
        assert!(states.iter().any(|(s, n)| s == end && *n > 0), "{states:?}");
    }
    // The planted re-enrolment is caught by deduplication.
    assert!(
        states
            .iter()
            .any(|(s, _)| s == "possible_duplicate" || s == "confirmed_duplicate"),
        "{states:?}"
    );

    // A second start resumes the same batch: nothing new is created.
    let mut again = Running::start(
        dir.path(),
        port,
        &["run", "--demo", &APPLICANTS.to_string()],
        // As on a fresh machine without pcsc-lite: the demo never loads PC/SC.
        &[("CARDPIPE_PCSC_LIB", "/nonexistent/libpcsclite.so.1")],
    );
    let line = again.wait_for("demo: batch", Duration::from_secs(120));
    assert!(line.contains("already received"), "{line}");
    again.wait_for("demo: done", Duration::from_secs(420));
    assert!(again.terminate().success());
    assert_eq!(per_state(dir.path()).await, states);
}

/// Every metric family the process exports is in deploy/METRICS.md with status `exists`
/// (names exactly as scraped, so a doubled prefix or a renamed metric fails here).
fn exported_metrics_are_catalogued(scraped: &str) {
    let catalogue = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/METRICS.md"),
    )
    .unwrap();
    let rows: Vec<(String, String)> = catalogue
        .lines()
        .filter(|l| l.starts_with("| `cardpipe_"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (
                cells[1].trim_matches('`').to_owned(),
                cells[cells.len() - 2].to_owned(),
            )
        })
        .collect();
    let exported: std::collections::BTreeSet<String> = scraped
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    assert!(exported.len() > 10, "{exported:?}");
    for name in &exported {
        // OpenMetrics declares a counter's family without its `_total` suffix.
        let status = rows
            .iter()
            .find(|(n, _)| n == name || n.strip_suffix("_total") == Some(name))
            .map(|(_, s)| s.as_str());
        assert_eq!(
            status,
            Some("exists"),
            "/metrics exports {name}; deploy/METRICS.md must list it with status `exists`"
        );
    }
}
