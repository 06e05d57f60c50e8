//! Issue 13, "one rule for templates, from intake to dedup": every real ISO/IEC 19794-2
//! template under ../shared/data/fvc2002-iso (finger position 0 "unknown" in the record
//! header, as a capture station writes it; the position given by the contract) is fed through
//! the registry API of a running `cardpipe run` on embedded backends, and every application
//! reaches `packed` or `possible_duplicate` — nothing intake accepts is parked at dedup.
//!
//! 4 databases × 8 impressions = 32 applicants: applicant (DB d, impression k) carries FVC
//! finger 10p (p = 1..10) of DB d at impression k as finger position p. The applicants of one
//! database are one person enrolled 8 times, so per database at most one reaches `packed` and
//! the others are `possible_duplicate` (dedup works on real data). Two more lines, a truncated
//! record (iso-invalid/) and a record whose header names another finger, are rejected by
//! intake with a reason naming the field.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use cardpipe_common::store::Store;
use serde_json::{Value, json};
use sqlx::Row;

mod common;

use common::{Running, free_port, fvc, shared_data};

const TOKEN: &str = "fvc-e2e-registry-token-0123456789";
const DATABASES: u8 = 4;
const IMPRESSIONS: u8 = 8;
/// Generous: 34 applicants through every stage on 2 shared cores.
const SETTLE: Duration = Duration::from_secs(900);

/// Applicant `i` of the generator with its fingerprints replaced.
fn applicant(
    generator: &cardpipe_registry::synth::Generator,
    i: usize,
    prints: &[(u8, Vec<u8>)],
) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut v = generator.valid(i);
    v["priority"] = json!("normal");
    v["fingerprints"] = Value::Array(
        prints
            .iter()
            .map(|(position, t)| json!({ "position": position, "template": b64.encode(t) }))
            .collect(),
    );
    v
}

async fn states(db: &Path) -> BTreeMap<String, (String, Option<String>)> {
    let store = Store::connect(&format!("sqlite:{}", db.display()), 1)
        .await
        .unwrap();
    let rows = sqlx::query(
        "SELECT a.registry_id, a.state,
                (SELECT h.reason FROM application_history h WHERE h.application_id = a.id
                 ORDER BY h.id DESC LIMIT 1) AS reason
         FROM applications a",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    let out = rows
        .iter()
        .map(|r| {
            (
                r.get::<String, _>("registry_id"),
                (
                    r.get::<String, _>("state"),
                    r.get::<Option<String>, _>("reason"),
                ),
            )
        })
        .collect();
    store.close().await;
    out
}

async fn parked(db: &Path) -> Vec<(String, String, String)> {
    let store = Store::connect(&format!("sqlite:{}", db.display()), 1)
        .await
        .unwrap();
    let rows = sqlx::query("SELECT stage, subject, error FROM parked_jobs")
        .fetch_all(store.pool())
        .await
        .unwrap();
    store.close().await;
    rows.iter()
        .map(|r| (r.get("stage"), r.get("subject"), r.get("error")))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_fvc_template_flows_from_the_registry_api_to_packed_or_possible_duplicate() {
    let data = shared_data();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pipeline.toml"),
        format!(
            "[[registry.clients]]\nname = \"fvc-registry\"\ntoken_sha256 = \"{}\"\n",
            cardpipe_registry::config::hash_token(TOKEN)
        ),
    )
    .unwrap();
    let port = free_port();
    let mut run = Running::start(dir.path(), port, &["run"], &[]);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let ready_by = Instant::now() + Duration::from_secs(180);
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            break;
        }
        assert!(
            Instant::now() < ready_by,
            "cardpipe run not ready within 180 s; stderr:\n{}",
            run.stderr_so_far()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The batch: 32 applicants built from every FVC template, then the two bad lines.
    let today = cardpipe_intake::intake::tehran_today(time::OffsetDateTime::now_utc());
    let generator = cardpipe_registry::synth::Generator::new(cardpipe_registry::synth::spec(
        0xF7C2, 40, false, today,
    ));
    let mut lines = Vec::new();
    let mut person_of: BTreeMap<String, u8> = BTreeMap::new();
    let mut templates = 0;
    for db in 1..=DATABASES {
        for k in 1..=IMPRESSIONS {
            let i = lines.len();
            let prints: Vec<(u8, Vec<u8>)> = (1..=10u8).map(|p| (p, fvc(db, p, k))).collect();
            templates += prints.len();
            let v = applicant(&generator, i, &prints);
            person_of.insert(v["application_id"].as_str().unwrap().to_owned(), db);
            lines.push(v.to_string());
        }
    }
    assert_eq!(templates, 320, "every FVC template is used once");
    let on_disk = ["DB1_B", "DB2_B", "DB3_B", "DB4_B"]
        .iter()
        .map(|d| {
            std::fs::read_dir(data.join("fvc2002-iso").join(d))
                .unwrap()
                .count()
        })
        .sum::<usize>();
    assert_eq!(on_disk, 320, "the shared FVC set changed: update this test");
    // A truncated record at position 5.
    let truncated = std::fs::read(data.join("iso-invalid/101_1_truncate_1_byte.iso")).unwrap();
    let mut prints: Vec<(u8, Vec<u8>)> = (1..=10u8).map(|p| (p, fvc(1, p, 1))).collect();
    prints[4].1 = truncated;
    let bad_truncated = applicant(&generator, 32, &prints);
    lines.push(bad_truncated.to_string());
    // A record whose header says finger 7, sent as position 2.
    let mut prints: Vec<(u8, Vec<u8>)> = (1..=10u8).map(|p| (p, fvc(2, p, 1))).collect();
    assert_eq!(prints[1].1[24], 0, "FVC header position is 0");
    prints[1].1[24] = 7;
    let bad_position = applicant(&generator, 33, &prints);
    lines.push(bad_position.to_string());
    let body = lines.join("\n") + "\n";

    let submitted = http
        .post(format!("{base}/api/v1/batches"))
        .bearer_auth(TOKEN)
        .header("idempotency-key", "fvc-e2e-1")
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = submitted.status();
    let report: Value = submitted.json().await.unwrap();
    assert!(status.is_success(), "{status}: {report}");
    assert_eq!(report["records"], 34, "{report}");
    assert_eq!(report["accepted"], 32, "{report:#}");
    assert_eq!(report["rejected"], 2, "{report:#}");
    let errors = report["errors"].as_array().unwrap();
    let reason_for = |id: &Value, field: &str| -> String {
        errors
            .iter()
            .find(|e| e["application_id"] == *id && e["field"] == field)
            .unwrap_or_else(|| panic!("no error on {field} for {id}: {report:#}"))["reason"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let why = reason_for(
        &bad_truncated["application_id"],
        "fingerprints.position_5.template",
    );
    assert!(why.contains("not a valid ISO/IEC 19794-2"), "{why}");
    let why = reason_for(
        &bad_position["application_id"],
        "fingerprints.position_2.template",
    );
    assert!(why.contains("finger position 7, not position 2"), "{why}");
    assert_eq!(
        errors.len(),
        2,
        "exactly one error per bad line: {report:#}"
    );

    let batch_id = report["batch_id"].as_str().unwrap();
    let scheduled = http
        .put(format!("{base}/api/v1/batches/{batch_id}/schedule"))
        .bearer_auth(TOKEN)
        .json(&json!({ "release_at": "now" }))
        .send()
        .await
        .unwrap();
    assert!(
        scheduled.status().is_success(),
        "{}",
        scheduled.text().await.unwrap()
    );

    // Wait until every application rests. `packed` may already have moved on to `shipped`
    // if the daily dispatch cut-off falls inside the run: that is past `packed` too.
    let db = dir.path().join("var/cardpipe.db");
    let reached_packed = |s: &str| matches!(s, "packed" | "shipped" | "at_office");
    let deadline = Instant::now() + SETTLE;
    let final_states = loop {
        let now = states(&db).await;
        let parked_jobs = parked(&db).await;
        assert!(
            parked_jobs.is_empty(),
            "jobs parked (stage, application, error): {parked_jobs:#?}\nstates: {now:#?}"
        );
        let resting = now
            .values()
            .filter(|(s, _)| reached_packed(s) || s == "possible_duplicate")
            .count();
        if now.len() == 32 && resting == 32 {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "not every application reached packed or possible_duplicate within {SETTLE:?}: {now:#?}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    assert!(run.terminate().success(), "cardpipe run exited uncleanly");

    // Per database (one person enrolled 8 times): at most one packed, the rest flagged.
    let mut per_db: BTreeMap<u8, (usize, usize)> = BTreeMap::new();
    for (registry_id, (state, _)) in &final_states {
        let db = person_of[registry_id];
        let e = per_db.entry(db).or_default();
        if reached_packed(state) {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }
    eprintln!("per database (packed, possible_duplicate): {per_db:?}");
    for (db, (packed, duplicates)) in &per_db {
        assert!(
            *packed <= 1,
            "DB{db}: {packed} of 8 enrolments of one person reached packed \
             (dedup missed {}): {final_states:#?}",
            packed - 1
        );
        assert_eq!(packed + duplicates, usize::from(IMPRESSIONS));
    }
}
