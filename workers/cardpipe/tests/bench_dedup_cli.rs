//! `cardpipe bench dedup`, the documented command for the dedup figures, runs end to end on a
//! small gallery and reports every figure the issue asks for; bad options are refused.

use std::process::Command;

fn cardpipe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cardpipe"))
        .args(args)
        .env_remove("CARDPIPE_CONFIG")
        .output()
        .expect("run cardpipe")
}

#[test]
fn bench_dedup_reports_accuracy_throughput_and_1_to_n_figures() {
    let out = cardpipe(&[
        "bench",
        "dedup",
        "--sizes",
        "1500",
        "--mated",
        "20",
        "--nonmated",
        "50",
        "--singles",
        "5",
    ]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // FVC2002 accuracy over the shared templates, and per-core throughput.
    let fvc = report
        .lines()
        .find(|l| l.starts_with("| cardpipe-dedup |"))
        .expect("FVC2002 row");
    assert!(fvc.contains('%'), "{fvc}");
    assert!(report.contains("codes scanned/s/core"), "{report}");
    // The 1:N row: memory per subject, latency, recall, FNIR at FPIR 0.1 %.
    let row = report
        .lines()
        .find(|l| l.starts_with("| 1500 |"))
        .expect("a row for the 1500-subject gallery");
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    let bytes_per_subject: f64 = cells[3].parse().expect("bytes per subject");
    assert!(
        (1_000.0..10_000.0).contains(&bytes_per_subject),
        "{bytes_per_subject} B/subject"
    );
    assert!(row.contains("20/50"), "{row}");
    assert!(report.contains("top 2000"), "recall by depth: {report}");

    let bad = cardpipe(&["bench", "dedup", "--sizes", "0"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--sizes"));
}
