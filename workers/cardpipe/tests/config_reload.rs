//! A new dispatch cut-off without a restart: `cardpipe run` reads its configuration files again
//! on SIGHUP and the delivery scheduler follows the new times at once (logged and audited as
//! `config.reload`); an invalid file changes nothing and says why.

use std::time::Duration;

mod common;

use common::{Running, cli_with_input, free_port};

fn write_config(dir: &std::path::Path, cutoff: &str) {
    std::fs::write(
        dir.join("pipeline.toml"),
        format!("[delivery]\ndispatch_cutoff = \"{cutoff}\"\n"),
    )
    .unwrap();
}

#[test]
fn sighup_takes_a_new_dispatch_cutoff_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "16:00");
    let mut run = Running::start(
        dir.path(),
        free_port(),
        &["run"],
        &[("CARDPIPE_PCSC_LIB", "/nonexistent/libpcsclite.so.1")],
    );
    run.wait_for("cardpipe running", Duration::from_secs(120));

    write_config(dir.path(), "17:30");
    run.signal("HUP");
    let line = run.wait_for("configuration reloaded on SIGHUP", Duration::from_secs(30));
    assert!(line.contains("dispatch_cutoff 16:00 -> 17:30"), "{line}");

    write_config(dir.path(), "25:00");
    run.signal("HUP");
    let line = run.wait_for("configuration not reloaded", Duration::from_secs(30));
    assert!(line.contains("dispatch_cutoff"), "{line}");

    // Back to a valid file: the change is measured from the values in force (17:30).
    write_config(dir.path(), "18:00");
    run.signal("HUP");
    let line = run.wait_for("configuration reloaded on SIGHUP", Duration::from_secs(30));
    assert!(line.contains("dispatch_cutoff 17:30 -> 18:00"), "{line}");
    assert!(run.terminate().success());

    let audit = cli_with_input(dir.path(), &["audit", "list", "--subject", "delivery"], "");
    let listed = String::from_utf8_lossy(&audit.stdout);
    assert_eq!(listed.matches("config.reload").count(), 2, "{listed}");
}
