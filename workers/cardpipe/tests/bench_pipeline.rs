//! Issue 16 item 3: `cardpipe bench pipeline` at a tiny size, both modes in one run.
//!
//! The command starts its own topologies (an embedded `cardpipe run`; then PostgreSQL,
//! RabbitMQ and S3 from the `CARDPIPE_TEST_*` settings with a worker per stage — dedup twice —
//! `cardpipe serve` and the simulated line through pcscd), submits 20 generated applicants
//! through the registry API and waits for every one to come to rest. This test checks that
//! the report adds up — every application in an end state, none parked, every stage's counts
//! within the batch, the figures present — and that the command left no process running.
//! It asserts no speed: a loaded machine makes any figure meaningless here.

use std::process::Command;

use cardpipe_common::broker::Broker;
use cardpipe_common::testing;
use serde_json::Value;

const RECORDS: i64 = 20;

/// Processes whose command line names this work-dir prefix (a topology left behind).
fn leftover_processes(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmd).contains(marker) {
            found.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    found
}

#[test]
fn bench_pipeline_reports_every_application_at_rest_in_both_modes() {
    // A marker in the environment the topology's processes inherit, to find any left running.
    let marker = format!("bench-pipeline-test-{}", std::process::id());
    let out = Command::new(env!("CARGO_BIN_EXE_cardpipe"))
        .args([
            "bench",
            "pipeline",
            "--records",
            &RECORDS.to_string(),
            "--mode",
            "embedded,distributed",
            "--replicas",
            "dedup=2",
            "--encoders",
            "4",
            "--qc-stations",
            "2",
            "--stall-seconds",
            "600",
        ])
        .env_remove("CARDPIPE_CONFIG")
        .env("CARDPIPE_BENCH_TEST_MARKER", &marker)
        .output()
        .expect("run cardpipe bench pipeline");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench pipeline failed:\n{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not the JSON report ({e}):\n{stderr}"));

    let modes = report["modes"].as_array().expect("modes");
    let names: Vec<&str> = modes.iter().map(|m| m["mode"].as_str().unwrap()).collect();
    assert_eq!(names, ["embedded", "distributed"], "{report:#}");
    for m in modes {
        let mode = m["mode"].as_str().unwrap();
        assert_eq!(m["accepted"], RECORDS, "{mode}: {m:#}");
        assert_eq!(m["parked"], 0, "{mode}: nothing parked: {m:#}");
        let states = m["states"].as_object().unwrap();
        let total: i64 = states.values().map(|n| n.as_i64().unwrap()).sum();
        assert_eq!(total, RECORDS, "{mode}: every application counted: {m:#}");
        for (state, n) in states {
            assert!(
                [
                    "packed",
                    "shipped",
                    "at_office",
                    "rejected",
                    "possible_duplicate"
                ]
                .contains(&state.as_str()),
                "{mode}: {n} applications in {state}, not an end state: {m:#}"
            );
        }
        let carded: i64 = ["packed", "shipped", "at_office"]
            .iter()
            .filter_map(|s| states.get(*s).and_then(Value::as_i64))
            .sum();
        assert!(carded >= RECORDS - 2, "{mode}: cards made: {m:#}");

        let stages = m["stages"].as_array().unwrap();
        let stage = |name: &str| {
            stages
                .iter()
                .find(|s| s["stage"] == name)
                .unwrap_or_else(|| panic!("{mode}: no figures for stage {name}: {m:#}"))
        };
        // Every application was released and searched; every card went through each stage.
        assert_eq!(stage("release")["applications"], RECORDS, "{m:#}");
        assert_eq!(stage("dedup")["applications"], RECORDS, "{m:#}");
        for name in ["keys", "personalize", "qc", "shipping"] {
            let s = stage(name);
            assert!(
                s["applications"].as_i64().unwrap() >= carded,
                "{mode}: {name} moved fewer applications than were packed: {m:#}"
            );
            assert!(s["applications"].as_i64().unwrap() <= RECORDS, "{m:#}");
            assert!(s["transitions"].as_i64().unwrap() >= s["applications"].as_i64().unwrap());
            let (first, last) = (
                s["first_entry_s"].as_f64().unwrap(),
                s["last_exit_s"].as_f64().unwrap(),
            );
            assert!(first >= 0.0 && last >= first, "{mode} {name}: window {m:#}");
            assert!(
                last <= m["release_to_end_s"].as_f64().unwrap() + 1e-6,
                "{mode}"
            );
            assert!(s["p50_s"].as_f64().unwrap() <= s["p95_s"].as_f64().unwrap());
        }
        assert!(m["end_to_end_apps_per_s"].as_f64().unwrap() > 0.0, "{m:#}");
        // The machine's CPU over the run, per application (Linux: /proc/stat).
        assert!(m["machine_cpu_s"].as_f64().unwrap() > 0.0, "{m:#}");
        assert!(
            m["machine_cpu_ms_per_application"].as_f64().unwrap() > 0.0,
            "{m:#}"
        );
    }
    let distributed = &modes[1];
    let processes: Vec<&str> = distributed["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for p in [
        "line",
        "keys-0",
        "dedup-0",
        "dedup-1",
        "personalize-0",
        "qc-0",
        "shipping-0",
        "serve",
    ] {
        assert!(processes.contains(&p), "{p} not started: {processes:?}");
    }
    assert!(report["distributed_over_embedded"].as_f64().unwrap() > 0.0);
    assert!(
        stderr.contains("apps/s"),
        "the table goes to stderr:\n{stderr}"
    );

    // Nothing the bench started outlives it: no process, no queue.
    let left = leftover_processes(&marker);
    assert!(left.is_empty(), "processes left running: {left:?}");
    let prefix = distributed["queue_prefix"].as_str().expect("queue prefix");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let broker = testing::rabbit_broker_with_prefix(&testing::amqp_url(), prefix).await;
        for stage in ["keys", "dedup", "personalize", "qc", "shipping"] {
            assert!(
                broker.depth(stage).await.is_err(),
                "the {stage} queues of {prefix} are left in RabbitMQ"
            );
        }
    });
}
