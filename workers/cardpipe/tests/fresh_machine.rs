//! The README's run command builds and runs on a fresh machine (Rust and a C compiler, no
//! `-dev` package): no crate of the lock file links a system library at build time, the
//! `cardpipe` binary needs nothing beyond the C library at load time (pcsc-lite is opened at
//! run time by `cardpipe_card::pcsc`), and that binding is the only `unsafe` code.
//!
//! Found by `cargo tree -p cardpipe -e normal,build | grep -- -sys` when pcsc-lite moved to
//! run time: pcsc-sys (linked libpcsclite: needed libpcsclite-dev), openssl-sys (links
//! libssl: needs libssl-dev + pkg-config unless built `vendored`), libsqlite3-sys (bundled
//! SQLite, C compiler only), aws-lc-sys (AWS-LC from its bundled sources, C compiler only),
//! cryptoki-sys (PKCS#11 modules opened at run time), linux-raw-sys (no C at all).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `-sys` packages reviewed for the fresh-machine build: why each needs no system package.
/// Anything not listed fails the test until someone checks it the same way.
const REVIEWED_SYS: &[(&str, &str)] = &[
    (
        "libsqlite3-sys",
        "sqlx's `sqlite` feature builds the bundled SQLite (C compiler only)",
    ),
    (
        "aws-lc-sys",
        "rustls' crypto; builds AWS-LC from the crate's own sources (C compiler only)",
    ),
    (
        "cryptoki-sys",
        "PKCS#11 bindings; the token module is opened at run time (libloading)",
    ),
    (
        "linux-raw-sys",
        "Linux syscall numbers and types, pure Rust",
    ),
    // Other targets only (never built on Linux).
    ("core-foundation-sys", "macOS/iOS only"),
    ("security-framework-sys", "macOS/iOS only"),
    ("system-configuration-sys", "macOS only"),
    ("jni-sys", "Android only"),
    ("js-sys", "wasm only"),
    ("web-sys", "wasm only"),
    ("windows-sys", "Windows only"),
];

/// `-sys` packages that link a system library and must not come back.
const FORBIDDEN_SYS: &[(&str, &str)] = &[(
    "pcsc-sys",
    "links libpcsclite at build time (libpcsclite-dev); use cardpipe_card::pcsc, which \
     loads pcsc-lite at run time",
)];

/// Each package of Cargo.lock with its dependency names.
fn lock_packages() -> BTreeMap<String, Vec<String>> {
    let path = workspace().join("Cargo.lock");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut packages: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for block in text.split("[[package]]").skip(1) {
        let mut name = None;
        let mut deps = Vec::new();
        let mut in_deps = false;
        for line in block.lines().map(str::trim) {
            if let Some(v) = line.strip_prefix("name = ") {
                name = Some(v.trim_matches('"').to_string());
            } else if line.starts_with("dependencies = [") {
                in_deps = true;
            } else if in_deps && line.starts_with(']') {
                in_deps = false;
            } else if in_deps {
                // `"name"` or `"name version"` (when several versions are locked).
                let dep = line.trim_end_matches(',').trim_matches('"');
                deps.push(dep.split(' ').next().unwrap_or(dep).to_string());
            }
        }
        let name = name.expect("every [[package]] of Cargo.lock has a name");
        packages.entry(name).or_default().extend(deps);
    }
    packages
}

#[test]
fn no_locked_crate_needs_a_system_library_to_build() {
    let packages = lock_packages();
    assert!(
        packages.contains_key("cardpipe"),
        "Cargo.lock parsed wrongly"
    );
    let mut problems = Vec::new();
    for (name, deps) in &packages {
        if let Some((_, why)) = FORBIDDEN_SYS.iter().find(|(n, _)| n == name) {
            problems.push(format!("{name}: {why}"));
        } else if name == "openssl-sys" {
            // Links libssl found by pkg-config (libssl-dev) unless the `vendored` feature
            // builds OpenSSL from source, which shows as a dependency on openssl-src.
            if !deps.iter().any(|d| d == "openssl-src") {
                problems.push(
                    "openssl-sys without openssl-src: links the system libssl (libssl-dev + \
                     pkg-config); enable the openssl crate's `vendored` feature"
                        .to_string(),
                );
            }
        } else if name.ends_with("-sys") && !REVIEWED_SYS.iter().any(|(n, _)| n == name) {
            problems.push(format!(
                "{name}: a new -sys crate; check that it builds without a system -dev package \
                 (bundled sources or run-time loading) and add it to REVIEWED_SYS, or remove it"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "crates in Cargo.lock that break `cargo run -p cardpipe` on a fresh machine:\n  {}",
        problems.join("\n  ")
    );
}

/// The shared libraries an ELF file asks the dynamic loader for (`readelf -d`).
fn needed_libraries(binary: &Path) -> Vec<String> {
    let out = match Command::new("readelf").arg("-d").arg(binary).output() {
        Ok(out) => out,
        Err(e) => panic!(
            "readelf (binutils) is needed to check the binary's DT_NEEDED entries and could \
             not run: {e}; install binutils (it comes with the C compiler: apt-get install \
             binutils)"
        ),
    };
    assert!(
        out.status.success(),
        "readelf -d {}: {}",
        binary.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    // "0x0000000000000001 (NEEDED)             Shared library: [libc.so.6]"
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| {
            let start = l.find('[')? + 1;
            let end = l[start..].find(']')? + start;
            Some(l[start..end].to_string())
        })
        .collect()
}

#[test]
#[cfg(target_os = "linux")]
fn the_cardpipe_binary_loads_with_only_the_c_library() {
    let binary = Path::new(env!("CARGO_BIN_EXE_cardpipe"));
    let needed = needed_libraries(binary);
    assert!(
        needed.iter().any(|l| l.starts_with("libc.so")),
        "readelf output not understood: NEEDED = {needed:?}"
    );
    // glibc's own libraries (and the loader) are on every Linux machine.
    let glibc = [
        "libc.so",
        "libm.so",
        "libgcc_s.so",
        "libpthread.so",
        "libdl.so",
        "librt.so",
        "libutil.so",
        "ld-linux",
    ];
    let foreign: Vec<&String> = needed
        .iter()
        .filter(|l| !glibc.iter().any(|g| l.starts_with(g)))
        .collect();
    assert!(
        foreign.is_empty(),
        "{} needs shared libraries a fresh machine does not have: {foreign:?} (all: {needed:?}); \
         pcsc-lite must be loaded at run time (cardpipe_card::pcsc), OpenSSL vendored",
        binary.display()
    );
}

/// Every `.rs` file of the workspace (sources, tests, examples, benches), skipping `target`
/// and hidden directories.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if !name.starts_with('.') && name != "target" {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[test]
fn the_pcsc_binding_is_the_only_unsafe_code() {
    let root = workspace();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(files.len() > 50, "found only {} .rs files", files.len());
    let allowed = root.join("libs/card/src/pcsc.rs");
    // Spelled in two pieces so this file does not match itself.
    let needle = ["allow(", "unsafe_code)"].concat();
    let offenders: Vec<String> = files
        .iter()
        .filter(|f| **f != allowed)
        .filter(|f| {
            std::fs::read_to_string(f)
                .map(|t| t.contains(&needle))
                .unwrap_or(false)
        })
        .map(|f| f.strip_prefix(&root).unwrap_or(f).display().to_string())
        .collect();
    assert!(
        offenders.is_empty(),
        "only libs/card/src/pcsc.rs may allow unsafe code; also: {offenders:?}"
    );
    // The workspace forbids it; only the card library relaxes that to deny (so its
    // pcsc module can allow it).
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains("unsafe_code = \"forbid\""),
        "the workspace lints must forbid unsafe code"
    );
}

/// A worker on the in-process broker would never share work with another process: it
/// refuses to start and says what to set.
#[test]
fn a_worker_refuses_the_in_process_broker() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cardpipe"))
        .args(["worker", "qc"])
        .current_dir(dir.path())
        .env_remove("CARDPIPE_CONFIG")
        .env_remove("CARDPIPE__BROKER__KIND")
        .output()
        .expect("run cardpipe");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs a broker shared"), "{err}");
    assert!(err.contains("CARDPIPE__BROKER__KIND=rabbitmq"), "{err}");
    assert!(err.contains("cardpipe run"), "{err}");
}

/// PC/SC features fail with what to install when pcsc-lite is missing (here: a library path
/// that does not exist), instead of starting a worker that never finds a reader.
#[test]
fn pcsc_encoders_without_pcsc_lite_name_what_to_install() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cardpipe"))
        .args(["worker", "personalize"])
        .current_dir(dir.path())
        .env_remove("CARDPIPE_CONFIG")
        .env("CARDPIPE__ENCODERS__KIND", "pcsc")
        // A worker needs a shared broker (it refuses the in-process one).
        .env("CARDPIPE__BROKER__KIND", "rabbitmq")
        .env(
            "CARDPIPE__BROKER__URL",
            std::env::var("CARDPIPE_TEST_AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
        )
        .env("CARDPIPE__ENVELOPE__MASTER_KEY", "11".repeat(32))
        // Real encoders refuse the built-in test secrets (config_check_refuses_test_secrets).
        .env("CARDPIPE__ENCODERS__MASTER_KEYS_HEX", "a1".repeat(48))
        .env("CARDPIPE__ENCODERS__TRANSPORT_ID_PIN", "271828")
        .env("CARDPIPE__ENCODERS__TRANSPORT_SIGN_PIN", "314159")
        .env("CARDPIPE__ENCODERS__TRANSPORT_PUK", "16180339")
        // A worker opens the transport key, never generates one (`cardpipe pki init` would).
        .env("CARDPIPE__ENCODERS__TRANSPORT_KEY_HEX", "5a".repeat(32))
        .env("CARDPIPE_PCSC_LIB", "/nonexistent/libpcsclite.so.1")
        .env("CARDPIPE__HTTP__LISTEN", "127.0.0.1:0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("run cardpipe");
    // A worker that did start would run until stopped: give it a bounded time.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the worker kept running without pcsc-lite: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let status = child.wait().unwrap();
    let err = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "the worker started: {err}");
    assert!(
        err.contains("[encoders] kind = \"pcsc\"")
            && err.contains("/nonexistent/libpcsclite.so.1")
            && err.contains("apt-get install libpcsclite1 pcscd"),
        "{err}"
    );
}

/// `cardpipe config check` (and every process start) refuses the built-in test secrets —
/// the simulator's public SCP03 keys and the default transport PINs — once real encoders, an
/// HSM or a distributed backend is configured, naming the keys and never their values; the
/// embedded defaults and an explicit lab opt-in keep them (issue 14 item 5).
#[test]
fn config_check_refuses_test_secrets_with_real_encoders_hsm_or_distributed_backends() {
    let dir = tempfile::tempdir().unwrap();
    let check = |envs: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cardpipe"));
        cmd.args(["config", "check"])
            .current_dir(dir.path())
            .env_remove("CARDPIPE_CONFIG");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run cardpipe");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = check(&[]);
    assert!(ok, "embedded defaults: {text}");
    let own_secrets = [
        ("CARDPIPE__ENCODERS__MASTER_KEYS_HEX", "a1a2a3a4".repeat(12)),
        // Digits only, with a leading zero: read as text, not as a number.
        ("CARDPIPE__ENCODERS__TRANSPORT_ID_PIN", "012345".into()),
        ("CARDPIPE__ENCODERS__TRANSPORT_SIGN_PIN", "314159".into()),
        ("CARDPIPE__ENCODERS__TRANSPORT_PUK", "16180339".into()),
    ];
    let test_keys_hex = "404142434445464748494a4b4c4d4e4f".repeat(3);
    for (trigger, value) in [
        ("CARDPIPE__ENCODERS__KIND", "pcsc"),
        ("CARDPIPE__PKI__KEYSTORE", "pkcs11"),
        ("CARDPIPE__OBJECTS__KIND", "s3"),
    ] {
        let mut envs = vec![(trigger, value)];
        if trigger == "CARDPIPE__PKI__KEYSTORE" {
            envs.push(("CARDPIPE__PKI__PKCS11_PIN", "9999"));
        }
        if trigger == "CARDPIPE__OBJECTS__KIND" {
            envs.extend([
                ("CARDPIPE__OBJECTS__ENDPOINT", "http://127.0.0.1:9"),
                ("CARDPIPE__OBJECTS__ACCESS_KEY", "a"),
                ("CARDPIPE__OBJECTS__SECRET_KEY", "b"),
            ]);
        }
        let (ok, text) = check(&envs);
        assert!(!ok, "{trigger}: test secrets accepted: {text}");
        for key in [
            "encoders.master_keys_hex",
            "encoders.transport_id_pin",
            "encoders.transport_sign_pin",
            "encoders.transport_puk",
        ] {
            assert!(text.contains(key), "{trigger}: {key} not named: {text}");
        }
        for value in ["123456", "654321", "12345678", "404142"] {
            assert!(
                !text.contains(value),
                "{trigger}: a secret value shown: {text}"
            );
        }
        // The simulator's keys spelt out are refused like the empty default.
        let mut spelt: Vec<(&str, &str)> = envs.clone();
        spelt.extend(own_secrets.iter().skip(1).map(|(k, v)| (*k, v.as_str())));
        spelt.push(("CARDPIPE__ENCODERS__MASTER_KEYS_HEX", &test_keys_hex));
        let (ok, text) = check(&spelt);
        assert!(!ok, "{trigger}: spelt-out test keys accepted: {text}");
        assert!(text.contains("encoders.master_keys_hex"), "{text}");
        assert!(!text.contains("encoders.transport_puk"), "{text}");
        // The operator's own secrets pass; so does a lab's explicit opt-in.
        let mut own: Vec<(&str, &str)> = envs.clone();
        own.extend(own_secrets.iter().map(|(k, v)| (*k, v.as_str())));
        let (ok, text) = check(&own);
        assert!(ok, "{trigger}: own secrets refused: {text}");
        let mut lab = envs.clone();
        lab.push(("CARDPIPE__ENCODERS__ALLOW_TEST_SECRETS", "true"));
        let (ok, text) = check(&lab);
        assert!(ok, "{trigger}: lab opt-in refused: {text}");
    }
}
