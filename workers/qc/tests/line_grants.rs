//! QC replicas sharing one line (issue 16, item 1): stations are granted by the line
//! controller, never picked by a replica, so replicas do not collide; a replica that is
//! killed or hangs gives its station (and the card in it) back; a waiter gets a released
//! station at once.
//!
//! Real components throughout: the simulated machine's line controller over TCP, a real
//! pcscd with vpcd station readers (so each test body runs in a re-executed child with its
//! own `PCSCLITE_CSOCK_NAME`, see `cardpipe_card::pcsc_harness`), cards read over PC/SC. The
//! "killed" and "hung" replicas are separate processes (python3) speaking the controller's
//! wire protocol. No timing assertions beyond "long before the wait would have run out".

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cardpipe_card::line::{CardLine, LineClient, LineStatus};
use cardpipe_card::pcsc_harness::{PYTHON, PcscTest, with_private_pcscd};
use cardpipe_card::reader::BlankStock;
use cardpipe_card::scp03::MasterKeys;
use cardpipe_card::script;
use cardpipe_card::simulate::{SimConfig, Simulation};
use cardpipe_qc::check::{CheckResult, Inspection, Reason};
use cardpipe_qc::station::{Inspect, LineStations, Stations, Ticket};

fn pcsc(name: &str) -> PcscTest<'_> {
    PcscTest {
        name,
        dir_prefix: "cardpipe-qc-grants-",
        timeout: Duration::from_secs(180),
        needs: &[],
    }
}

/// A simulated machine with `stations` QC stations, its controller served on a free port.
fn machine(dir: &Path, stations: usize) -> (Simulation, Arc<CardLine>, String) {
    let mut cfg = SimConfig::new(1, dir);
    cfg.qc_stations = stations;
    let sim = Simulation::start(cfg).expect("pcscd with vpcd starts");
    sim.check_client_env()
        .expect("the child talks to its own pcscd");
    let line = sim.line().expect("a line").clone();
    let addr = line
        .serve(SocketAddr::from(([127, 0, 0, 1], 0)))
        .unwrap()
        .to_string();
    (sim, line, addr)
}

/// Puts `n` blank cards on the transport; their chip serials.
fn deposit(line: &CardLine, seed: u16, n: usize) -> Vec<String> {
    let stock = BlankStock::healthy(MasterKeys::test_keys(), seed);
    (0..n)
        .map(|_| {
            let card = stock.take();
            let chip = card.serial().to_hex();
            line.deposit(card);
            chip
        })
        .collect()
}

fn ticket(chip: &str) -> Ticket {
    Ticket {
        application_id: format!("app-{chip}"),
        blank_serial: format!("B-{chip}"),
        chip_serial: Some(chip.to_string()),
    }
}

/// What the station reads: the chip serial over PC/SC (GET DATA CPLC), against the ticket.
fn read_serial(expected: String, seen: Arc<Mutex<Vec<String>>>) -> Inspect<'static> {
    Box::new(move |ch| {
        let read = script::read_chip_serial(ch).map(|s| s.to_hex());
        let ok = read.as_ref().is_ok_and(|s| *s == expected);
        if let Ok(s) = &read {
            seen.lock().unwrap().push(s.clone());
        }
        Inspection {
            chip_serial: read.as_ref().ok().cloned(),
            checks: vec![CheckResult {
                name: "chip_serial".into(),
                passed: ok,
                reason: (!ok).then_some(Reason::ChipSerialMismatch),
                detail: format!("{read:?}"),
                micros: 0,
            }],
        }
    })
}

/// The line's counters once every station was handed back: a replica releases a station on
/// a thread of its own after pcscd saw its card leave, shortly after the inspection returned.
fn settled(line: &CardLine) -> LineStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = line.status();
        if s.leased == 0 || Instant::now() >= deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (bounded) until `n` callers queue at the controller for a station.
fn until_waiting(client: &LineClient, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.status().unwrap().waiting < n {
        assert!(Instant::now() < deadline, "{n} waiters never queued");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn two_replicas_share_a_line_without_collisions() {
    with_private_pcscd(
        &pcsc("two_replicas_share_a_line_without_collisions"),
        |dir| {
            const CARDS: usize = 16;
            let (_sim, line, addr) = machine(dir, 2);
            let chips = deposit(&line, 0x61, CARDS);
            // Two replicas, each its own connection to the controller and two job threads: four
            // jobs at once contend for two stations.
            let replicas: Vec<Arc<LineStations>> = (0..2)
                .map(|_| LineStations::connect(&addr, Duration::from_secs(10)).unwrap())
                .collect();
            assert_ne!(replicas[0].owner(), replicas[1].owner());
            let queue = Arc::new(Mutex::new(chips.clone()));
            let seen = Arc::new(Mutex::new(Vec::new()));
            let verdicts = Arc::new(Mutex::new(BTreeMap::<String, (usize, bool, String)>::new()));
            let mut threads = Vec::new();
            for (r, replica) in replicas.iter().enumerate() {
                for _ in 0..2 {
                    let (replica, queue, seen, verdicts) = (
                        replica.clone(),
                        queue.clone(),
                        seen.clone(),
                        verdicts.clone(),
                    );
                    threads.push(std::thread::spawn(move || {
                        loop {
                            let Some(chip) = queue.lock().unwrap().pop() else {
                                return;
                            };
                            let (inspection, station) = Stations::Line(replica.clone())
                                .inspect(&ticket(&chip), read_serial(chip.clone(), seen.clone()))
                                .unwrap_or_else(|e| {
                                    panic!("replica {r}: card {chip} not inspected: {e}")
                                });
                            let passed = inspection.verdict().is_none();
                            let before = verdicts
                                .lock()
                                .unwrap()
                                .insert(chip.clone(), (r, passed, station));
                            assert!(before.is_none(), "card {chip} inspected twice");
                        }
                    }));
                }
            }
            for t in threads {
                t.join().expect("a job thread panicked");
            }
            let verdicts = verdicts.lock().unwrap();
            // Every card read exactly once, at a station, and it was the card asked for.
            assert_eq!(verdicts.len(), CARDS);
            let failed: Vec<_> = verdicts.iter().filter(|(_, v)| !v.1).collect();
            assert!(failed.is_empty(), "cards read as another chip: {failed:?}");
            let mut seen = seen.lock().unwrap().clone();
            seen.sort();
            let mut expected = chips.clone();
            expected.sort();
            assert_eq!(seen, expected, "each chip read once, no other");
            let stations: BTreeSet<&str> = verdicts.values().map(|v| v.2.as_str()).collect();
            assert_eq!(stations.len(), 2, "both stations used: {stations:?}");
            // No collision: no job ever found no station, both replicas did work.
            for (r, replica) in replicas.iter().enumerate() {
                assert_eq!(
                    replica.unavailable(),
                    0,
                    "replica {r} was refused a station"
                );
                assert!(replica.inspected() > 0, "replica {r} inspected nothing");
            }
            assert_eq!(
                replicas.iter().map(|r| r.inspected()).sum::<u64>(),
                CARDS as u64
            );
            let s = settled(&line);
            assert_eq!(
                (s.passed, s.rejected, s.on_transport, s.leased, s.reclaimed),
                (CARDS as u64, 0, 0, 0, 0),
                "every card to the stacker, none spoiled: {s:?}"
            );
        },
    );
}

/// Another QC process, in python: takes a station and loads `chip` through the controller's
/// wire protocol, says so on stdout, then never speaks again (until it is killed).
fn holder_process(addr: &str, chip: &str) -> (Child, String) {
    let script = r#"
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)))
f = s.makefile("rw")
def ask(line):
    f.write(line + "\n"); f.flush()
    return f.readline().rstrip("\n")
grant = ask("ACQUIRE\tqc-doomed\t0").split("\t")
assert grant[0] == "OK", grant
load = ask("LOAD\t" + grant[1] + "\t" + sys.argv[2])
assert load == "OK", load
print(grant[1], flush=True)
time.sleep(3600)
"#;
    let mut child = Command::new(PYTHON)
        .args(["-c", script, addr, chip])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 runs");
    let mut station = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut station)
        .unwrap();
    assert!(!station.trim().is_empty(), "the holder got no station");
    (child, station.trim().to_string())
}

/// A replica waits for the line's only station, held by another QC process with a card in
/// it; `vanish` makes that process go away. The waiter must get the station and — the
/// other process's card being back on the transport — read that very card.
fn station_comes_back(dir: &Path, lease_ttl: Option<Duration>, vanish: impl FnOnce(&mut Child)) {
    let (_sim, line, addr) = machine(dir, 1);
    if let Some(ttl) = lease_ttl {
        line.set_lease_ttl(ttl);
    }
    let chips = deposit(&line, 0x62, 1);
    let (mut holder, station) = holder_process(&addr, &chips[0]);
    assert_eq!(
        line.status().on_transport,
        0,
        "the card is in the holder's station"
    );
    let client = LineClient::new(addr.clone());
    let replica = LineStations::connect(&addr, Duration::from_secs(10)).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let waiter = {
        let (replica, chip, seen) = (replica.clone(), chips[0].clone(), seen.clone());
        std::thread::spawn(move || {
            Stations::Line(replica).inspect(&ticket(&chip), read_serial(chip.clone(), seen))
        })
    };
    until_waiting(&client, 1);
    vanish(&mut holder);
    let (inspection, at) = waiter
        .join()
        .unwrap()
        .expect("the waiting replica got the station back");
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(at, station);
    assert_eq!(inspection.verdict(), None, "{inspection:?}");
    assert_eq!(*seen.lock().unwrap(), chips, "the held card was read");
    let s = settled(&line);
    assert_eq!(
        (s.reclaimed, s.passed, s.rejected, s.on_transport, s.leased),
        (1, 1, 0, 0, 0),
        "{s:?}"
    );
    assert_eq!(replica.unavailable(), 0);
}

#[test]
fn a_killed_replica_gives_its_station_and_card_back() {
    with_private_pcscd(
        &pcsc("a_killed_replica_gives_its_station_and_card_back"),
        |dir| {
            // The default lease (15 s) is not what frees the station: the closed connection is.
            station_comes_back(dir, None, |holder| {
                holder.kill().expect("SIGKILL");
                holder.wait().unwrap();
            });
        },
    );
}

#[test]
fn a_hung_replica_loses_its_lease() {
    with_private_pcscd(&pcsc("a_hung_replica_loses_its_lease"), |dir| {
        // The holder stays connected but neither uses nor renews its lease.
        station_comes_back(dir, Some(Duration::from_millis(1500)), |_| {});
    });
}

#[test]
fn a_waiter_gets_the_station_as_soon_as_it_is_released() {
    with_private_pcscd(
        &pcsc("a_waiter_gets_the_station_as_soon_as_it_is_released"),
        |dir| {
            let (_sim, line, addr) = machine(dir, 1);
            let chips = deposit(&line, 0x63, 1);
            let client = LineClient::new(addr.clone());
            let mut other = client.session().unwrap();
            let held = other.acquire("qc-other", Duration::ZERO).unwrap().station;
            // Grants are waited for up to 6 × 20 s.
            let replica = LineStations::connect(&addr, Duration::from_secs(20)).unwrap();
            assert_eq!(replica.grant_wait(), Duration::from_secs(120));
            let seen = Arc::new(Mutex::new(Vec::new()));
            let waiter = {
                let (replica, chip, seen) = (replica.clone(), chips[0].clone(), seen.clone());
                std::thread::spawn(move || {
                    Stations::Line(replica).inspect(&ticket(&chip), read_serial(chip.clone(), seen))
                })
            };
            until_waiting(&client, 1);
            let released = Instant::now();
            other.release(&held).unwrap();
            let (inspection, at) = waiter.join().unwrap().expect("granted after the release");
            let took = released.elapsed();
            assert_eq!(at, held);
            assert_eq!(inspection.verdict(), None);
            // Woken by the release, not by the end of its wait (nor a poll of it).
            assert!(
                took < replica.grant_wait() / 4,
                "the waiter took {took:?} after the release"
            );
            // The other process's connection is still open but it holds nothing any more.
            let s = settled(&line);
            assert_eq!((s.passed, s.leased, s.reclaimed), (1, 0, 0));
            drop(other);
        },
    );
}
