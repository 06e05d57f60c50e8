//! Issue 19 through the one-command run: `cardpipe run --demo N` on its defaults (keys
//! generated on the chip). While the demo runs, every card package that appears in the object
//! store is copied as it appears (QC destroys it once the card passes) and opened with the
//! run's envelope key: none carries a certificate or a wrapped private key, only the LDS and
//! EF.SOD. Afterwards no custody row names a transport key (the keys stage wraps nothing),
//! every QC report says `"key_origin": "on_card"` and every personalized application's
//! history records `key_origin=on_card`. (That the chips' private keys appear nowhere — not
//! in the database, any object or the logs — is `cardpipe-tests --test on_card_keys`, which can
//! read the simulated chips' keys.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cardpipe_common::envelope::Sealer;
use cardpipe_common::store::Store;
use sqlx::Row;

mod common;

use common::{Running, free_port};

const APPLICANTS: usize = 8;

fn files(root: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.map_while(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_makes_cards_whose_keys_no_package_ever_carried() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut run = Running::start(
        d,
        free_port(),
        &["run", "--demo", &APPLICANTS.to_string()],
        &[],
    );
    // Copy every package the moment it appears, until the demo is done.
    let var = d.join("var");
    let mut seen: BTreeMap<PathBuf, Vec<u8>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    let (tx, rx) = std::sync::mpsc::channel();
    let watcher = {
        let var = var.clone();
        std::thread::spawn(move || {
            let mut seen: BTreeMap<PathBuf, Vec<u8>> = BTreeMap::new();
            while rx.try_recv().is_err() && Instant::now() < deadline {
                let mut all = Vec::new();
                files(&var, &mut all);
                for path in all {
                    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    if name.starts_with("credentials-")
                        && name.ends_with(".sealed")
                        && !seen.contains_key(&path)
                        && let Ok(bytes) = std::fs::read(&path)
                    {
                        seen.insert(path, bytes);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            seen
        })
    };
    run.wait_for("demo: done", Duration::from_secs(300));
    tx.send(()).unwrap();
    seen.extend(watcher.join().unwrap());
    assert!(run.terminate().success());
    assert!(!seen.is_empty(), "no card package was seen during the demo");

    // The run's envelope key (embedded mode generates one into var/).
    let mut all = Vec::new();
    files(&var, &mut all);
    let key_file = all
        .iter()
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("envelope-") && n.ends_with(".key"))
        })
        .expect("the embedded envelope key");
    let key_id = key_file
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .trim_start_matches("envelope-")
        .trim_end_matches(".key")
        .to_owned();
    let sealer = Sealer::new(
        &key_id,
        &std::fs::read_to_string(key_file)
            .unwrap()
            .trim()
            .to_owned()
            .into(),
    )
    .unwrap();
    for (path, bytes) in &seen {
        // applications/<id>/credentials-....sealed
        let app = path
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .unwrap();
        let opened = sealer
            .open(&format!("credentials:{app}"), bytes)
            .expect("a package sealed under the run's key");
        let package: serde_json::Value = serde_json::from_slice(&opened).unwrap();
        let fields: Vec<&str> = package
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for field in [
            "authentication_key",
            "signature_key",
            "authentication_certificate",
            "signature_certificate",
        ] {
            assert!(
                !fields.contains(&field),
                "{}: the package carries {field}",
                path.display()
            );
        }
        assert!(
            fields.contains(&"ef_sod") && fields.contains(&"dg1"),
            "{fields:?}"
        );
    }

    let store = Store::connect(&format!("sqlite:{}", var.join("cardpipe.db").display()), 1)
        .await
        .unwrap();
    let transport_ids: Vec<String> =
        sqlx::query_scalar("SELECT transport_key_id FROM wrapped_key_custody")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert!(!transport_ids.is_empty());
    assert!(
        transport_ids.iter().all(String::is_empty),
        "a package wrapped keys under a transport key: {transport_ids:?}"
    );
    let personalized: Vec<Option<String>> =
        sqlx::query("SELECT reason FROM application_history WHERE to_state = 'personalized'")
            .fetch_all(store.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| r.get("reason"))
            .collect();
    assert!(!personalized.is_empty(), "the demo personalized no card");
    assert!(
        personalized.iter().all(|r| r
            .as_deref()
            .is_some_and(|r| r.contains("key_origin=on_card"))),
        "{personalized:?}"
    );
    store.close().await;
    let reports: Vec<&PathBuf> = all
        .iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("qc-") && n.ends_with(".json"))
        })
        .collect();
    assert!(!reports.is_empty());
    for report in reports {
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap();
        assert_eq!(json["key_origin"], "on_card", "{}", report.display());
    }
}
