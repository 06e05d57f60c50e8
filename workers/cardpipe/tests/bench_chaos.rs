//! Issue 16 item 6: the chaos proving ground's short version, as CI runs it.
//!
//! `cardpipe bench chaos` starts the distributed topology (PostgreSQL, RabbitMQ and S3 behind
//! its fault proxies, a worker per stage, serve, the simulated line with dead and torn
//! blanks), submits a small batch through the registry API and, while it runs, SIGKILLs a
//! random worker or serve every few seconds, takes RabbitMQ and PostgreSQL away once each and
//! the object store for 30 s. The command itself checks the invariants and exits non-zero on
//! any violation; this test checks that it did every fault it promises and that every
//! invariant held. It asserts no speed.

use std::process::Command;

#[test]
fn chaos_short_run_keeps_every_invariant() {
    let out = Command::new(env!("CARGO_BIN_EXE_cardpipe"))
        .args([
            "bench",
            "chaos",
            "--records",
            "24",
            "--kill-every",
            "4",
            "--max-kills",
            "4",
            "--restart-seconds",
            "4",
            "--outage-seconds",
            "30",
            "--fault-rate",
            "0.05",
            "--stall-seconds",
            "240",
        ])
        .env_remove("CARDPIPE_CONFIG")
        .output()
        .expect("run cardpipe bench chaos");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench chaos found violations or failed:\n{stderr}\n{stdout}"
    );
    assert!(
        stdout.contains("24 applications, 4 crashes, 3 service faults: every invariant holds"),
        "{stdout}\n{stderr}"
    );
    for fault in ["rabbitmq away 4 s", "postgresql away 4 s", "s3 away 30 s"] {
        assert!(stderr.contains(fault), "no {fault:?} in:\n{stderr}");
    }
}
