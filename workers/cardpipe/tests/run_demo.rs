//! The README's run command, as a newcomer runs it: `cardpipe run --demo N` on embedded
//! defaults in an empty directory carries a generated batch through every stage, serves
//! /healthz and /metrics, stops cleanly on SIGTERM, and a second start resumes the same batch
//! instead of submitting it again.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cardpipe_common::store::Store;
use sqlx::Row;

const APPLICANTS: usize = 12;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

/// A test that fails part-way must not leave the server running after it.
impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Running {
    fn start(dir: &std::path::Path, port: u16) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cardpipe"))
            .args(["run", "--demo", &APPLICANTS.to_string()])
            .current_dir(dir)
            .env("CARDPIPE__HTTP__LISTEN", format!("127.0.0.1:{port}"))
            // As on a fresh machine without pcsc-lite: the demo never loads PC/SC.
            .env("CARDPIPE_PCSC_LIB", "/nonexistent/libpcsclite.so.1")
            .env_remove("CARDPIPE_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cardpipe");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a stderr line containing `needle`.
    fn wait_for(&mut self, needle: &str, within: Duration) -> String {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line containing {needle:?} within {within:?}; stderr so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success());
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "cardpipe did not stop within 60 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

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
    let mut run = Running::start(dir.path(), port);
    let received = run.wait_for("demo: batch", Duration::from_secs(120));
    assert!(received.contains("received:"), "{received}");
    run.wait_for("demo: done", Duration::from_secs(240));

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
    // The planted re-enrolment is caught by deduplication.
    assert!(
        states
            .iter()
            .any(|(s, _)| s == "possible_duplicate" || s == "confirmed_duplicate"),
        "{states:?}"
    );

    // A second start resumes the same batch: nothing new is created.
    let mut again = Running::start(dir.path(), port);
    let line = again.wait_for("demo: batch", Duration::from_secs(120));
    assert!(line.contains("already received"), "{line}");
    again.wait_for("demo: done", Duration::from_secs(240));
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
