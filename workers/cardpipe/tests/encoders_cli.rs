//! `cardpipe encoders simulate` under a service manager: SIGTERM stops it and the pcscd it
//! started (real pcscd + vpcd; tests/services.sh installs them).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn alive(pid: u32) -> bool {
    // A zombie is dead for our purpose; /proc/<pid>/stat's third field is the state.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z")
        })
        .unwrap_or(false)
}

#[test]
fn sigterm_stops_the_simulator_and_its_pcscd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path().join("sim");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cardpipe"))
        .args(["encoders", "simulate", "--count", "1", "--work-dir"])
        .arg(&work)
        .current_dir(dir.path())
        .env_remove("CARDPIPE_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the simulator");
    let stdout = child.stdout.take().expect("stdout");
    // Read on a thread to the end, so the simulator never writes to a closed pipe.
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut pcscd = None;
    let mut seen = Vec::new();
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(120)) {
        seen.push(line.clone());
        if let Some(rest) = line.split("(pcscd process ").nth(1) {
            pcscd = rest
                .split(')')
                .next()
                .and_then(|p| p.trim().parse::<u32>().ok());
        }
        if line.contains("stops the encoders") {
            break;
        }
    }
    let pcscd = pcscd.unwrap_or_else(|| panic!("no pcscd pid printed: {seen:#?}"));
    assert!(
        alive(pcscd),
        "pcscd {pcscd} is running while the simulator is"
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exited = child.wait().expect("wait");
    assert!(exited.success(), "a clean stop on SIGTERM: {exited:?}");
    // pcscd is a child of pcscd's own double fork: give it the moment to go.
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(pcscd) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alive(pcscd), "pcscd {pcscd} was left running");
    assert!(
        seen.iter().any(|l| l.contains("SIGTERM")),
        "the banner says how to stop it: {seen:#?}"
    );
}
