//! Test harness for tests that run through a real pcscd (used by this crate's and the QC
//! crate's integration tests; not used by the pipeline).
//!
//! pcscd has one socket per machine by default, and a test that starts vpcd readers must not
//! see another test's readers nor leave its own behind. [`with_private_pcscd`] therefore runs
//! the test body in a child process (the same test binary, re-invoked for that one test) whose
//! `PCSCLITE_CSOCK_NAME` points into a fresh directory, where the body starts its own pcscd;
//! the parent waits with a deadline, kills anything left that mentions the directory, and
//! fails with the child's output and the tail of the pcscd log.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Debian's interpreter: python3-pyscard installs into its dist-packages (a pyenv or venv
/// python3 earlier on PATH would not see it).
pub const PYTHON: &str = "/usr/bin/python3";

/// One private pcscd at a time per test process (`cargo test` runs tests on threads).
static SERIAL: Mutex<()> = Mutex::new(());

/// Outside tools a test needs besides pcscd and the vpcd driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// pyscard under [`PYTHON`] (independent read-back).
    Pyscard,
    /// `opensc-tool` (independent raw APDUs).
    OpenscTool,
}

/// A private-pcscd test: its name (for the child's `--exact` filter), the temp-dir prefix,
/// how long the child may run, and the outside tools it needs.
#[derive(Debug, Clone)]
pub struct PcscTest<'a> {
    /// The test function's name as the test binary lists it.
    pub name: &'a str,
    /// Prefix of the private directory (pcscd socket, log, reader configs).
    pub dir_prefix: &'a str,
    /// Deadline for the child process.
    pub timeout: Duration,
    /// Tools to check for before starting.
    pub needs: &'a [Tool],
}

/// Fails (never skips) when a prerequisite of a PC/SC test is missing, naming the package.
pub fn preflight(needs: &[Tool]) {
    let mut missing = Vec::new();
    if !["/usr/sbin/pcscd", "/usr/bin/pcscd", "/sbin/pcscd"]
        .iter()
        .any(|p| Path::new(p).exists())
    {
        missing.push("pcscd (apt-get install pcscd)");
    }
    if crate::pcsc::library().is_err() {
        missing.push("the PC/SC client library (apt-get install libpcsclite1)");
    }
    if !Path::new(crate::simulate::DEFAULT_DRIVER).exists() {
        missing.push("vpcd driver (apt-get install vsmartcard-vpcd)");
    }
    if needs.contains(&Tool::Pyscard)
        && Command::new(PYTHON)
            .args(["-c", "import smartcard"])
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
    {
        missing.push("pyscard (apt-get install python3-pyscard)");
    }
    if needs.contains(&Tool::OpenscTool)
        && Command::new("opensc-tool")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
    {
        missing.push("opensc-tool (apt-get install opensc)");
    }
    assert!(
        missing.is_empty(),
        "PC/SC test prerequisites missing: {}. These tests need real pcscd + vpcd; they do not skip.",
        missing.join(", ")
    );
}

/// Kills processes whose command line mentions `dir` (a pcscd a crashed child left behind).
pub fn kill_leftovers(dir: &Path) {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline"))
            && String::from_utf8_lossy(&cmd).contains(&needle)
        {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
    }
}

/// Runs `body` with a private pcscd directory: in the parent, re-runs this one test in a
/// child process with its own pcscd socket and checks it passed; in that child, runs `body`.
pub fn with_private_pcscd(test: &PcscTest<'_>, body: impl FnOnce(&Path)) {
    if std::env::var_os("CARDPIPE_PCSC_CHILD").is_some() {
        body(Path::new(
            &std::env::var("CARDPIPE_PCSC_DIR").expect("dir set by the parent"),
        ));
        return;
    }
    let _guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    preflight(test.needs);
    let dir = tempfile::Builder::new()
        .prefix(test.dir_prefix)
        .tempdir()
        .expect("temp dir");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([test.name, "--exact", "--nocapture", "--test-threads=1"])
        .env("CARDPIPE_PCSC_CHILD", "1")
        .env("CARDPIPE_PCSC_DIR", dir.path())
        .env("PCSCLITE_CSOCK_NAME", dir.path().join("run/pcscd.comm"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("re-running the test binary");
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break Some(s);
        }
        if started.elapsed() > test.timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    kill_leftovers(dir.path());
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    let log = std::fs::read_to_string(dir.path().join("pcscd.log")).unwrap_or_default();
    println!("{stdout}");
    eprintln!("{stderr}");
    if std::env::var_os("CARDPIPE_PCSCD_DEBUG").is_some() {
        let _ = std::fs::write("/tmp/cardpipe-last-pcscd.log", &log);
    }
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        status.is_some_and(|s| s.success()) && stdout.contains("1 passed"),
        "child test {} failed (status {status:?}, limit {:?})\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- pcscd log (tail)\n{}",
        test.name,
        test.timeout,
        lines[lines.len().saturating_sub(30)..].join("\n")
    );
}
