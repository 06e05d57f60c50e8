//! A bad configuration value anywhere (a stage's own section included) is reported with its
//! key and file, all problems at once, before any process does work.

use std::process::Command;

fn cardpipe(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cardpipe"))
        .args(args)
        .current_dir(dir)
        .env_remove("CARDPIPE_CONFIG")
        .output()
        .expect("run cardpipe")
}

#[test]
fn bad_values_in_stage_sections_are_named_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pipeline.toml"), "").unwrap();
    let ok = cardpipe(dir.path(), &["config", "check"]);
    assert!(ok.status.success(), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("configuration OK"));

    std::fs::write(
        dir.path().join("pipeline.toml"),
        "[dedup]\nshards = \"two\"\n\n[delivery]\nbox_capacity = -3\n\n[keys]\ngeneration = \"in_software\"\n",
    )
    .unwrap();
    for args in [&["config", "check"][..], &["run"][..]] {
        let out = cardpipe(dir.path(), args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{args:?} accepted a bad configuration"
        );
        assert!(
            err.contains("dedup.shards (from pipeline.toml)"),
            "{args:?}: {err}"
        );
        assert!(
            err.contains("delivery.box_capacity (from pipeline.toml)"),
            "{args:?}: {err}"
        );
        assert!(
            err.contains("keys.generation (from pipeline.toml)"),
            "{args:?}: {err}"
        );
    }
    // `run` refused before creating its data directory, keys or database.
    assert!(!dir.path().join("var").exists());
}
