//! The store's per-application queries find their rows through an index (issue 16: the cost
//! of an application must not grow with the night or the store).
//!
//! Each query below runs once (or a few times) per application on a stage's path. SQLite's
//! `EXPLAIN QUERY PLAN` says how it would read the tables: `SEARCH ... USING INDEX` (or the
//! primary key) is a lookup; `SCAN <table>` reads the whole table, which is what made a night
//! of 20,000 applications cost more per application than a night of 2,000. PostgreSQL chooses
//! its plan from table statistics (it scans small tables on purpose), so the property is
//! checked on SQLite, and the migrations create the same indexes on both.

use cardpipe_common::testing;
use sqlx::Row;

/// Per-application queries as the stages issue them (the `$n` parameters are bound to text).
const PER_APPLICATION: &[(&str, &str)] = &[
    (
        "personalize: certificates of the package written (cardpipe_pki::store::package_serials)",
        "SELECT serial FROM certificates WHERE credentials_key = $1",
    ),
    (
        "personalize: still-valid certificates of an unwritten blank (certify::revoke_unwritten)",
        "SELECT serial FROM certificates WHERE credentials_key = $1 AND status = 'valid'",
    ),
    (
        "keys: packages recorded so far (cardpipe_pki::store::committed_packages)",
        "SELECT COUNT(*) FROM wrapped_key_custody WHERE application_id = $1",
    ),
    (
        "keys: crypto-shredding after QC (cardpipe_pki::store::mark_destroyed)",
        "UPDATE wrapped_key_custody SET destroyed_at = $1 WHERE application_id = $2 AND destroyed_at IS NULL",
    ),
    (
        "recovery and parked counts: an application's parked jobs",
        "SELECT 1 FROM parked_jobs p WHERE p.subject = $1 AND p.stage = $2",
    ),
    (
        "every stage: the application",
        "SELECT id, state, version FROM applications WHERE id = $1",
    ),
    (
        "history of an application",
        "SELECT to_state FROM application_history WHERE application_id = $1 ORDER BY id",
    ),
    (
        "qc: the pass recorded",
        "SELECT at FROM application_history WHERE application_id = $1 AND to_state = 'qc_passed'",
    ),
    (
        "personalize and qc: the application's cards",
        "SELECT blank_serial FROM cards WHERE application_id = $1 ORDER BY attempt",
    ),
    (
        "qc: the reports of an application",
        "SELECT outcome FROM qc_reports WHERE application_id = $1 ORDER BY checked_at, id",
    ),
    (
        "keys and personalize: the certificates of an application",
        "SELECT serial FROM certificates WHERE application_id = $1 AND status = 'valid' ORDER BY serial",
    ),
    (
        "artifacts of an application",
        "SELECT object_key FROM artifacts WHERE application_id = $1 AND kind = $2",
    ),
    (
        "applicant record",
        "SELECT sealed_record FROM applicant_records WHERE application_id = $1",
    ),
    (
        "dedup: enrolments made since the last search",
        "SELECT seq, application_id, sealed_templates FROM dedup_enrolled WHERE seq > $1 ORDER BY seq",
    ),
    (
        "packing: the office's open box",
        "SELECT id FROM delivery_boxes WHERE office_code = $1 AND state = 'open'",
    ),
    (
        "packing: the cards of a box",
        "SELECT COUNT(*) FROM delivery_cards WHERE box_id = $1",
    ),
    (
        "personalize: the next blank from stock",
        "SELECT serial FROM stock_serials WHERE state = 'in_vault' ORDER BY serial LIMIT 1",
    ),
    (
        "audit: entries about an application",
        "SELECT seq FROM audit_log WHERE subject = $1 ORDER BY seq DESC LIMIT 10",
    ),
];

/// The plan's lines for `sql`.
async fn plan(store: &cardpipe_common::store::Store, sql: &str) -> Vec<String> {
    let params = (1..=9).filter(|n| sql.contains(&format!("${n}"))).count();
    let explain = format!("EXPLAIN QUERY PLAN {sql}");
    let mut query = sqlx::query(sqlx::AssertSqlSafe(explain));
    for _ in 0..params {
        query = query.bind("x");
    }
    query
        .fetch_all(store.pool())
        .await
        .unwrap_or_else(|e| panic!("EXPLAIN QUERY PLAN {sql}: {e}"))
        .iter()
        .map(|row| row.try_get::<String, _>("detail").expect("detail column"))
        .collect()
}

#[tokio::test]
async fn per_application_queries_use_an_index() {
    let (store, _dir) = testing::sqlite_store().await;
    let mut scans = Vec::new();
    for (what, sql) in PER_APPLICATION {
        let lines = plan(&store, sql).await;
        assert!(!lines.is_empty(), "{what}: no plan for {sql}");
        let searches = lines.iter().any(|l| l.starts_with("SEARCH "));
        let scanned: Vec<&String> = lines.iter().filter(|l| l.starts_with("SCAN ")).collect();
        if !searches || !scanned.is_empty() {
            scans.push(format!("{what}: {sql}\n    plan: {lines:?}"));
        }
    }
    assert!(
        scans.is_empty(),
        "per-application queries reading a whole table:\n{}",
        scans.join("\n")
    );
}

/// The two indexes of migration 0021 are what turn the certificate and parked-job lookups
/// from scans into searches (the test above would catch their loss; this one names them).
#[tokio::test]
async fn credentials_key_and_parked_subject_lookups_use_their_indexes() {
    let (store, _dir) = testing::sqlite_store().await;
    let certificates = plan(
        &store,
        "SELECT serial FROM certificates WHERE credentials_key = $1",
    )
    .await;
    assert!(
        certificates
            .iter()
            .any(|l| l.contains("INDEX certificates_by_credentials_key")),
        "{certificates:?}"
    );
    let parked = plan(
        &store,
        "SELECT 1 FROM parked_jobs WHERE subject = $1 AND stage = $2",
    )
    .await;
    assert!(
        parked
            .iter()
            .any(|l| l.contains("INDEX parked_jobs_by_subject")),
        "{parked:?}"
    );
}

/// The relay's claim walks the undelivered rows in `seq` order through the partial index of
/// migration 0023; before it, SQLite read the whole outbox (every row delivered that day) on
/// every claim to satisfy `ORDER BY seq`, and a 100,000-applicant night slowed down as the
/// table grew.
#[tokio::test]
async fn the_outbox_claim_reads_only_undelivered_rows() {
    let (store, _dir) = testing::sqlite_store().await;
    let sql = cardpipe_common::store::claim_outbox_sql(store.dialect(), &["job", "revocation"]);
    let lines = plan(&store, &sql).await;
    assert!(
        lines
            .iter()
            .any(|l| l.contains("INDEX outbox_unpublished_by_seq")),
        "{lines:?}"
    );
    let whole: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("SCAN ") && !l.contains(" USING "))
        .collect();
    assert!(
        whole.is_empty(),
        "whole-table scans in the claim: {lines:?}"
    );
}

/// A batch's per-state counts (registry batch status, console batch view, the demo's progress
/// twice a second) are answered from the `(batch_id, state)` index of migration 0024, not by
/// reading every row of the batch from the table.
#[tokio::test]
async fn batch_state_counts_read_only_the_index() {
    let (store, _dir) = testing::sqlite_store().await;
    let lines = plan(
        &store,
        "SELECT state, COUNT(*) AS n FROM applications WHERE batch_id = $1 GROUP BY state",
    )
    .await;
    assert!(
        lines
            .iter()
            .any(|l| l.contains("COVERING INDEX applications_by_batch_and_state")),
        "{lines:?}"
    );
}
