//! The crate graph the architecture rests on (issue 17), checked from `cargo metadata` and
//! the sources, so a shortcut between stages fails the suite instead of growing back:
//!
//! * a stage crate (`workers/*`, except the `cardpipe` binary) depends — normal, dev or
//!   build — on `cardpipe-common` and libraries only, never on another stage crate: work
//!   that belongs to another stage is asked for through `cardpipe_common::contract`;
//! * a library (`libs/*`) depends on no stage crate; `cardpipe-common` on no library or
//!   stage;
//! * no process-global mutable state: a `static` with interior mutability (lazy cells,
//!   locks, atomics) appears in no stage crate, and in the libraries and common only where
//!   listed below — values computed once from constants, or facts about the host.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// Workspace member name → (folder relative to the workspace, cardpipe-* dependencies).
fn members() -> BTreeMap<String, (String, Vec<String>)> {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(workspace())
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    let root = workspace();
    let mut members = BTreeMap::new();
    for p in meta["packages"].as_array().expect("packages") {
        let name = p["name"].as_str().unwrap().to_owned();
        let manifest = PathBuf::from(p["manifest_path"].as_str().unwrap());
        let dir = manifest
            .parent()
            .unwrap()
            .strip_prefix(&root)
            .unwrap_or(manifest.parent().unwrap())
            .display()
            .to_string();
        let deps = p["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_owned())
            .filter(|d| d.starts_with("cardpipe-"))
            .collect();
        members.insert(name, (dir, deps));
    }
    members
}

#[test]
fn no_stage_crate_depends_on_another_stage_crate() {
    let members = members();
    let stages: Vec<&String> = members
        .iter()
        .filter(|(_, (dir, _))| dir.starts_with("workers/") && dir != "workers/cardpipe")
        .map(|(name, _)| name)
        .collect();
    assert!(
        stages.len() >= 7,
        "expected the seven stage crates under workers/, found {stages:?}"
    );
    let mut offences = Vec::new();
    for stage in &stages {
        for dep in &members[*stage].1 {
            if stages.contains(&dep) {
                offences.push(format!("{stage} -> {dep}"));
            }
        }
    }
    assert!(
        offences.is_empty(),
        "stage crates must meet through cardpipe_common::contract, not depend on each other: {offences:?}"
    );
}

#[test]
fn libraries_and_common_depend_on_no_stage() {
    let members = members();
    let stage_or_bin = |name: &str| {
        members
            .get(name)
            .is_some_and(|(dir, _)| dir.starts_with("workers/"))
    };
    let libs: Vec<&String> = members
        .iter()
        .filter(|(_, (dir, _))| dir.starts_with("libs/"))
        .map(|(n, _)| n)
        .collect();
    assert!(
        libs.len() >= 4,
        "expected the libraries under libs/, found {libs:?}"
    );
    for lib in libs {
        let bad: Vec<&String> = members[lib].1.iter().filter(|d| stage_or_bin(d)).collect();
        assert!(bad.is_empty(), "library {lib} depends on {bad:?}");
    }
    let common = &members["cardpipe-common"].1;
    assert!(
        common.is_empty(),
        "cardpipe-common depends on nothing of the workspace: {common:?}"
    );
}

/// (file, static) pairs allowed to hold interior mutability, with why.
const ALLOWED_STATICS: &[(&str, &str, &str)] = &[
    (
        "libs/biometrics/src/matcher/compare.rs",
        "LUT",
        "lookup table computed once from constants",
    ),
    (
        "libs/biometrics/src/matcher/template.rs",
        "TABLES",
        "trigonometric tables computed once",
    ),
    (
        "libs/biometrics/src/matcher/code.rs",
        "F",
        "hash functions drawn once from a fixed seed",
    ),
    (
        "libs/biometrics/src/matcher/code.rs",
        "T",
        "score table computed once from constants",
    ),
    (
        "libs/biometrics/src/matcher/calibration.rs",
        "CAL",
        "shipped calibration parsed once from embedded text",
    ),
    (
        "libs/pki/src/pkix.rs",
        "P256",
        "the P-256 curve group (a constant)",
    ),
    (
        "libs/card/src/pcsc.rs",
        "API",
        "pcsc-lite, loaded once per process (a host library)",
    ),
    (
        "libs/card/src/simulate.rs",
        "ALLOWED",
        "whether the host allows private mounts (probed once)",
    ),
    (
        "libs/card/src/pcsc_harness.rs",
        "SERIAL",
        "serialises PC/SC integration tests on one host",
    ),
];

const INTERIOR: &[&str] = &[
    "OnceLock", "LazyLock", "OnceCell", "Lazy<", "Mutex", "RwLock", "Atomic", "RefCell", "Cell<",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_process_global_mutable_state() {
    let root = workspace();
    let mut files = Vec::new();
    rust_files(&root.join("common/src"), &mut files);
    for group in ["libs", "workers"] {
        for krate in std::fs::read_dir(root.join(group)).unwrap().flatten() {
            let src = krate.path().join("src");
            if src.is_dir() {
                rust_files(&src, &mut files);
            }
        }
    }
    assert!(files.len() > 100, "found only {} source files", files.len());
    let mut found = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&root).unwrap().display().to_string();
        let text = std::fs::read_to_string(file).unwrap();
        for line in text.lines() {
            let t = line.trim_start();
            let t = t
                .strip_prefix("pub(crate) ")
                .or_else(|| t.strip_prefix("pub "))
                .unwrap_or(t);
            let Some(rest) = t.strip_prefix("static ") else {
                continue;
            };
            let Some((name, ty)) = rest.split_once(':') else {
                continue;
            };
            if INTERIOR.iter().any(|i| ty.contains(i)) {
                found.push((rel.clone(), name.trim().to_owned()));
            }
        }
    }
    let unexpected: Vec<&(String, String)> = found
        .iter()
        .filter(|(f, n)| !ALLOWED_STATICS.iter().any(|(af, an, _)| af == f && an == n))
        .collect();
    assert!(
        unexpected.is_empty(),
        "process-global mutable state (pass it in a context object instead): {unexpected:?}"
    );
    for (file, name, _) in ALLOWED_STATICS {
        assert!(
            found.iter().any(|(f, n)| f == file && n == name),
            "{file}: {name} is allowed but no longer there; drop it from the list"
        );
    }
}
