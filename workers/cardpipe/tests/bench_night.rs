//! Issue 16 item 7: `cardpipe bench night` at tiny sizes.
//!
//! Two nights (10 and 30 applicants) each run embedded in a child `cardpipe run --demo N
//! --demo-exit` on a fresh data dir; the bench reads each night's database. This test checks
//! that the JSON report adds up: every night packed cards, its steady rate lies within what
//! was packed, the stage figures are there and the ratio is the two steady rates' quotient.
//! It asserts no speed.

use std::process::Command;

use serde_json::Value;

#[test]
fn bench_night_reports_both_nights_and_their_ratio() {
    let out = Command::new(env!("CARGO_BIN_EXE_cardpipe"))
        .args(["bench", "night", "--records", "10,30"])
        .env_remove("CARDPIPE_CONFIG")
        .output()
        .expect("run cardpipe bench night");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench night failed:\n{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not the JSON report ({e}):\n{stderr}"));
    let nights = report["nights"].as_array().expect("nights");
    assert_eq!(nights.len(), 2, "{report:#}");
    for (night, records) in nights.iter().zip([10, 30]) {
        assert_eq!(night["records"], records, "{night:#}");
        assert_eq!(night["complete"], true, "{night:#}");
        let packed = night["packed"].as_i64().unwrap();
        assert!(
            packed > 0 && packed <= records,
            "packed {packed} of {records}"
        );
        let rate = night["apps_per_second"].as_f64().unwrap();
        let steady = night["steady_apps_per_second"].as_f64().unwrap();
        assert!(rate > 0.0 && steady >= 0.0, "{night:#}");
        let stages: Vec<&str> = night["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["stage"].as_str().unwrap())
            .collect();
        for stage in ["dedup", "keys", "personalize", "qc"] {
            assert!(stages.contains(&stage), "no {stage} in {stages:?}");
        }
    }
    let (small, large) = (
        nights[0]["steady_apps_per_second"].as_f64().unwrap(),
        nights[1]["steady_apps_per_second"].as_f64().unwrap(),
    );
    if small > 0.0 {
        let ratio = report["ratio"].as_f64().expect("a ratio");
        assert!((ratio - large / small).abs() < 1e-9, "{report:#}");
    }
    assert!(stderr.contains("steady"), "{stderr}");
}
