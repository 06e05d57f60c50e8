//! No personal data in clear at rest (issue 14): `cardpipe run --demo N` carries a generated
//! night (duplicates, rejected records) while the registry withdraws two applications through
//! the API; then every byte the process left under `var/` — the SQLite database and its
//! journal, the object store (records, biometrics, card packages, QC reports, manifests,
//! CRLs), key files and the log — is scanned for each applicant's national code, full name,
//! mobile number and fingerprint templates and photo. None may appear.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use serde_json::Value;

mod common;

use common::{Running, free_port};

const APPLICANTS: usize = 12;
const TOKEN: &str = "registry-scan-token";

fn cli(dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cardpipe"))
        .args(args)
        .current_dir(dir)
        .env_remove("CARDPIPE_CONFIG")
        .output()
        .expect("run cardpipe")
}

/// Every file under `root`, recursively.
fn files(root: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(root).unwrap().map_while(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// A byte window distinctive enough to mean "this artifact" when found (a rejected record's
/// "photo" of zeros would match any file).
fn distinctive(window: &[u8]) -> bool {
    window
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        >= 16
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_demo_night_leaves_no_personal_data_in_clear() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The demo's batch, regenerated with the same generator settings (seed 1, one planted
    // re-enrolment in 12, every rejected kind, applied today in Tehran).
    let today = (time::OffsetDateTime::now_utc() + time::Duration::minutes(210)).date();
    let batch = d.join("batch.ndjson");
    let out = cli(
        d,
        &[
            "synth",
            "batch",
            "--records",
            &APPLICANTS.to_string(),
            "--seed",
            "1",
            "--bad",
            "--persons",
            &(APPLICANTS - 1).to_string(),
            "--applied-on",
            &today.to_string(),
            "--out",
            batch.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = std::fs::read_to_string(&batch)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    std::fs::remove_file(&batch).unwrap();
    std::fs::remove_file(d.join("batch.ndjson.expected.json")).ok();

    // The registry (the demo's client) can call the API with a token of its own.
    let digest = cardpipe_registry::config::hash_token(TOKEN);
    std::fs::write(
        d.join("pipeline.toml"),
        format!("[[registry.clients]]\nname = \"demo-registry\"\ntoken_sha256 = \"{digest}\"\n"),
    )
    .unwrap();
    let port = free_port();
    let mut run = Running::start(
        d,
        port,
        &["run", "--demo", &APPLICANTS.to_string()],
        &[("CARDPIPE_PCSC_LIB", "/nonexistent/libpcsclite.so.1")],
    );
    run.wait_for("demo: batch", Duration::from_secs(120));
    let client = reqwest::Client::new();
    let mut withdrawn = 0;
    for line in lines.iter().take(2) {
        let id = line["application_id"].as_str().unwrap();
        let res = client
            .post(format!(
                "http://127.0.0.1:{port}/api/v1/applications/{id}/withdraw"
            ))
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({ "reason": "applicant withdrew" }))
            .send()
            .await
            .unwrap();
        if res.status().is_success() {
            withdrawn += 1;
        }
    }
    assert!(withdrawn >= 1, "the registry could not withdraw anything");
    run.wait_for("demo: done", Duration::from_secs(240));
    // Let the relay deliver the destruction requests of the withdrawals.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(run.terminate().success());

    // What must not be found: per valid applicant, the national code, the full name, the
    // mobile number, 48 bytes from the middle of each template and of the photo.
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut needles: Vec<(String, Vec<u8>)> = Vec::new();
    for line in &lines {
        let (Some(code), Some(first), Some(last)) = (
            line["national_code"].as_str(),
            line["first_name"].as_str(),
            line["last_name"].as_str(),
        ) else {
            continue;
        };
        if code.len() == 10 && code.bytes().all(|b| b.is_ascii_digit()) {
            needles.push(("national code".into(), code.as_bytes().to_vec()));
        }
        needles.push(("full name".into(), format!("{first} {last}").into_bytes()));
        if let Some(mobile) = line["mobile"].as_str().filter(|m| m.len() >= 10) {
            needles.push(("mobile".into(), mobile.as_bytes().to_vec()));
        }
        for print in line["fingerprints"].as_array().into_iter().flatten() {
            if let Some(t) = print["template"].as_str().and_then(|t| b64.decode(t).ok())
                && t.len() > 96
            {
                let mid = t.len() / 2;
                let window = &t[mid - 24..mid + 24];
                if distinctive(window) {
                    needles.push(("template".into(), window.to_vec()));
                }
            }
        }
        if let Some(p) = line["photo"].as_str().and_then(|p| b64.decode(p).ok())
            && p.len() > 96
        {
            let mid = p.len() / 2;
            let window = &p[mid - 24..mid + 24];
            if distinctive(window) {
                needles.push(("photo".into(), window.to_vec()));
            }
        }
    }
    assert!(needles.len() > APPLICANTS * 10, "{} needles", needles.len());

    let mut all = Vec::new();
    files(&d.join("var"), &mut all);
    assert!(all.len() > 20, "{} files", all.len());
    let mut found = Vec::new();
    for path in &all {
        let bytes = std::fs::read(path).unwrap();
        for (what, needle) in &needles {
            if contains(&bytes, needle) {
                found.push(format!(
                    "{what} in {}",
                    path.strip_prefix(d).unwrap().display()
                ));
            }
        }
    }
    found.sort();
    found.dedup();
    assert!(found.is_empty(), "personal data in clear: {found:#?}");
}
