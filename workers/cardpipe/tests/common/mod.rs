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
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_cardpipe"))
        .args(args)
        .current_dir(dir)
        .env_remove("CARDPIPE_CONFIG")
        .env_remove("CARDPIPE_OPERATOR")
        .env("CARDPIPE_TOKEN_FILE", dir.join("sessions.json"))
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
