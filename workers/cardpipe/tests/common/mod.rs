//! A `cardpipe run` process for the end-to-end tests (README run command, console, registry
//! API): started in a directory of its own on a free port, its stderr collected, stopped with
//! SIGTERM like an operator's ctrl-c, and killed if a test fails part-way.
#![allow(dead_code)] // each test binary uses a different part

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A TCP port free on loopback right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Running {
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
    /// `cardpipe <args>` in `dir` on embedded defaults, serving on `port`, with `env` set.
    pub fn start(dir: &Path, port: u16, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_reading(dir, port, args, env, false)
    }

    /// Like [`Running::start`], with standard output read too (interleaved with stderr in
    /// [`Running::wait_for`]): for commands that print what the user needs on stdout.
    pub fn start_reading_stdout(
        dir: &Path,
        port: u16,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_reading(dir, port, args, env, true)
    }

    fn start_reading(
        dir: &Path,
        port: u16,
        args: &[&str],
        env: &[(&str, &str)],
        stdout: bool,
    ) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cardpipe"));
        command
            .args(args)
            .current_dir(dir)
            .env("CARDPIPE__HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .env_remove("CARDPIPE_CONFIG")
            .stdout(if stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start cardpipe");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
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

    /// Waits for a stderr line containing `needle` and returns it.
    pub fn wait_for(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
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

    /// Everything the process wrote to stderr so far (for failure messages).
    pub fn stderr_so_far(&mut self) -> String {
        self.seen.extend(self.lines.try_iter());
        self.seen.join("\n")
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends a signal by name (`HUP`, `TERM`...).
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .unwrap();
        assert!(sent.success(), "could not signal cardpipe");
    }

    /// SIGTERM, then waits up to 60 s for a clean stop (a test failure if it does not stop).
    pub fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success(), "could not signal cardpipe");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "cardpipe did not stop within 60 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Runs the `cardpipe` binary in `dir` with `input` on standard input (a password) and the
/// token file `dir/sessions.json`, as an operator at a terminal of their own would.
pub fn cli_with_input(dir: &Path, args: &[&str], input: &str) -> std::process::Output {
    run_cardpipe(dir, &[], args, input)
}

/// `cardpipe args` in `dir` with `env` added, `input` on stdin, the token file
/// `dir/sessions.json` and no configuration or operator inherited from the test's environment.
fn run_cardpipe<A: AsRef<std::ffi::OsStr>>(
    dir: &Path,
    env: &[(String, String)],
    args: &[A],
    input: &str,
) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_cardpipe"))
        .args(args)
        .current_dir(dir)
        .env_remove("CARDPIPE_CONFIG")
        .env_remove("CARDPIPE_OPERATOR")
        .env("CARDPIPE_TOKEN_FILE", dir.join("sessions.json"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cardpipe");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input.as_bytes()).expect("write stdin");
    drop(stdin);
    child.wait_with_output().expect("cardpipe output")
}

/// ../shared/data relative to the workspace root; a missing directory fails, never skips.
pub fn shared_data() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join("../shared/data");
    assert!(
        dir.join("fvc2002-iso").is_dir() && dir.join("iso-invalid").is_dir(),
        "shared test data not found at {} (expected fvc2002-iso/ and iso-invalid/ beside the \
         workspace root {}); this test needs the real FVC2002 ISO templates and is never skipped",
        dir.display(),
        root.display()
    );
    dir
}

/// FVC2002 set B record of finger `finger` (1..=10) of database `db`, impression
/// `impression`, as a capture station writes it.
pub fn fvc(db: u8, finger: u8, impression: u8) -> Vec<u8> {
    let path = shared_data()
        .join("fvc2002-iso")
        .join(format!("DB{db}_B"))
        .join(format!("{}_{impression}.iso", 100 + u16::from(finger)));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ------------------------------------------------------------------------------------------
// Distributed runs (README "Running distributed", deploy/compose.yaml): processes started
// from documented commands, a batch of real fingerprints through the registry API, and the
// applications followed in the store until they come to rest.

pub mod compose;

use std::collections::BTreeMap;

use base64::Engine;
use cardpipe_common::store::Store;
use serde_json::{Value, json};
use sqlx::Row;

/// A random byte (v4 UUIDs come from the OS's generator).
pub fn rand_byte() -> u8 {
    uuid::Uuid::new_v4().as_bytes()[0]
}

/// `bytes` fresh random bytes as hex.
pub fn random_hex(bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", rand_byte())).collect()
}

/// `n` fresh random decimal digits.
pub fn random_digits(n: usize) -> String {
    (0..n)
        .map(|_| char::from(b'0' + rand_byte() % 10))
        .collect()
}

/// A one-shot `cardpipe` command in `dir` with `env`, `input` on stdin; (success, stdout +
/// stderr).
pub fn cli_env(
    dir: &Path,
    env: &[(String, String)],
    args: &[String],
    input: &str,
) -> (bool, String) {
    let out = run_cardpipe(dir, env, args, input);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Every application's registry id and state.
pub async fn states(store: &Store) -> BTreeMap<String, String> {
    sqlx::query("SELECT registry_id, state FROM applications")
        .fetch_all(store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get("registry_id"), r.get("state")))
        .collect()
}

/// Parked jobs: (stage, subject, error).
pub async fn parked(store: &Store) -> Vec<(String, String, String)> {
    sqlx::query("SELECT stage, subject, error FROM parked_jobs")
        .fetch_all(store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get("stage"), r.get("subject"), r.get("error")))
        .collect()
}

/// A process started from a documented command, with the name failure messages use.
pub struct Started {
    pub line: String,
    pub process: Running,
}

/// Every process's stderr so far, headed by its name (for failure messages).
pub fn logs(processes: &mut [Started]) -> String {
    processes
        .iter_mut()
        .map(|p| format!("== {}\n{}", p.line, p.process.stderr_so_far()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until `base`/readyz answers 200; fails with every process's log after `within`.
pub async fn wait_ready(base: &str, processes: &mut [Started], within: Duration) {
    let http = reqwest::Client::new();
    let ready_by = Instant::now() + within;
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            return;
        }
        let exited: Vec<String> = processes
            .iter_mut()
            .filter_map(|p| p.process.exited().map(|s| format!("{} ({s})", p.line)))
            .collect();
        if Instant::now() > ready_by || !exited.is_empty() {
            panic!(
                "{base} not ready within {within:?}; exited: {exited:?}\n{}",
                logs(processes)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The people of [`submit_people`]: (FVC2002 database, impression). DB1's person comes
/// twice (impressions 1 and 2): four cards, one possible duplicate.
pub const PEOPLE: [(u8, u8); 5] = [(1, 1), (2, 1), (3, 1), (4, 1), (1, 2)];

/// Submits [`PEOPLE`] (ten real fingerprints each) as one batch through the registry API at
/// `base` with bearer `token`, released now; returns the batch id.
pub async fn submit_people(base: &str, token: &str, idempotency_key: &str) -> String {
    let http = reqwest::Client::new();
    let today = cardpipe_intake::intake::tehran_today(time::OffsetDateTime::now_utc());
    let generator = cardpipe_registry::synth::Generator::new(cardpipe_registry::synth::spec(
        0x5EAD, 8, false, today,
    ));
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut lines = Vec::new();
    for (i, (db, impression)) in PEOPLE.iter().enumerate() {
        let mut v = generator.valid(i);
        v["priority"] = json!("normal");
        v["fingerprints"] = Value::Array(
            (1..=10u8)
                .map(|p| json!({ "position": p, "template": b64.encode(fvc(*db, p, *impression)) }))
                .collect(),
        );
        lines.push(v.to_string());
    }
    let submitted = http
        .post(format!("{base}/api/v1/batches"))
        .bearer_auth(token)
        .header("idempotency-key", idempotency_key)
        .header("content-type", "application/x-ndjson")
        .body(lines.join("\n") + "\n")
        .send()
        .await
        .unwrap();
    let status = submitted.status();
    let report: Value = submitted.json().await.unwrap();
    assert!(status.is_success(), "{status}: {report}");
    assert_eq!(report["accepted"], PEOPLE.len(), "{report:#}");
    let batch_id = report["batch_id"].as_str().unwrap().to_owned();
    let scheduled = http
        .put(format!("{base}/api/v1/batches/{batch_id}/schedule"))
        .bearer_auth(token)
        .json(&json!({ "release_at": "now" }))
        .send()
        .await
        .unwrap();
    assert!(scheduled.status().is_success());
    batch_id
}

/// Follows the applications until all [`PEOPLE`] rest (packed or later, or possible
/// duplicate); fails at once on a parked job or an exited process, or after `settle`, with
/// every process's log. Then checks four cards, each passed at QC, and returns the states.
pub async fn settle_people(
    store: &Store,
    processes: &mut [Started],
    settle: Duration,
) -> BTreeMap<String, String> {
    let past_packed = |s: &str| matches!(s, "packed" | "shipped" | "at_office");
    let deadline = Instant::now() + settle;
    let final_states = loop {
        let now = states(store).await;
        let parked_jobs = parked(store).await;
        let exited: Vec<String> = processes
            .iter_mut()
            .filter_map(|p| p.process.exited().map(|s| format!("{} ({s})", p.line)))
            .collect();
        if !parked_jobs.is_empty() || !exited.is_empty() || Instant::now() > deadline {
            panic!(
                "parked: {parked_jobs:#?}\nexited: {exited:?}\nstates: {now:#?}\n{}",
                logs(processes)
            );
        }
        let resting = now
            .values()
            .filter(|s| past_packed(s) || *s == "possible_duplicate")
            .count();
        if now.len() == PEOPLE.len() && resting == PEOPLE.len() {
            break now;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let packed = final_states.values().filter(|s| past_packed(s)).count();
    assert_eq!(
        packed, 4,
        "four people, four cards (DB1's person once): {final_states:#?}"
    );
    // The cards were read at the line's QC stations and passed.
    let passed: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM application_history WHERE to_state = 'qc_passed'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(passed, 4, "QC passes");
    final_states
}

/// What `cardpipe encoders simulate` printed: its pcscd socket, its pcscd's process id and
/// everything it wrote (waits up to 120 s for the socket line).
pub fn simulator_started(simulator: &mut Running) -> (String, u32, String) {
    let socket_line = simulator.wait_for("export PCSCLITE_CSOCK_NAME=", Duration::from_secs(120));
    let socket = socket_line
        .split_once("PCSCLITE_CSOCK_NAME=")
        .unwrap()
        .1
        .trim()
        .to_owned();
    let printed = simulator.stderr_so_far();
    let pcscd_pid: u32 = printed
        .split_once("(pcscd process ")
        .and_then(|(_, rest)| rest.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("simulator did not print its pcscd process: {printed}"));
    (socket, pcscd_pid, printed)
}

/// Stops every process with SIGTERM (last started first), each must exit 0; then the
/// simulator's pcscd `pcscd_pid` must be gone.
pub fn stop_all(processes: Vec<Started>, pcscd_pid: u32) {
    for Started { line, process } in processes.into_iter().rev() {
        let status = process.terminate();
        assert!(status.success(), "{line}: exited with {status}");
    }
    let pcscd = PathBuf::from(format!("/proc/{pcscd_pid}"));
    let gone_by = Instant::now() + Duration::from_secs(10);
    while pcscd.exists() && Instant::now() < gone_by {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !pcscd.exists(),
        "the simulator's pcscd (process {pcscd_pid}) still runs after SIGTERM"
    );
}
