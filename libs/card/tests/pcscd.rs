//! Tests through a REAL pcscd with vpcd virtual readers and the card OS behind them.
//!
//! pcsc-lite's client library reads `PCSCLITE_CSOCK_NAME` once per process, and only before
//! the process starts can we set it (no `unsafe` `set_var`). So each test re-runs this test
//! binary as a child process (`<exe> <name> --exact`) with the variable pointing into a fresh
//! temporary directory; the child starts its own pcscd there (private mount namespace), runs
//! the body, and stops everything. The parent serializes children, enforces a timeout, kills
//! any pcscd the child left behind and fails loudly when pcscd/vpcd are not installed.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cardpipe_card::apdu::sw;
use cardpipe_card::card_os::profile::*;
use cardpipe_card::card_os::{Faults, Lifecycle};
use cardpipe_card::cplc::ChipSerial;
use cardpipe_card::pcsc_harness::{PYTHON, PcscTest, Tool, with_private_pcscd};
use cardpipe_card::reader::{self, BlankStock, CardChannel, Encoder, ReaderError};
use cardpipe_card::scp03::MasterKeys;
use cardpipe_card::script::{self, PersoError, ScriptOptions, sample_image};
use cardpipe_card::simulate::{SimConfig, Simulation};

/// This file's private-pcscd test settings.
fn pcsc(name: &str) -> PcscTest<'_> {
    PcscTest {
        name,
        dir_prefix: "cardpipe-pcscd-",
        timeout: Duration::from_secs(60),
        needs: &[Tool::Pyscard, Tool::OpenscTool],
    }
}

fn start_sim(dir: &Path, encoders: usize) -> Simulation {
    let sim =
        Simulation::start(SimConfig::new(encoders, dir)).expect("pcscd with vpcd readers starts");
    sim.check_client_env()
        .expect("this child talks to its own pcscd");
    sim
}

fn stock(batch: u16, faults: Faults) -> Arc<BlankStock> {
    Arc::new(BlankStock::new(MasterKeys::test_keys(), batch, move |_| {
        faults.clone()
    }))
}

/// pyscard: raw SELECT / READ BINARY of one EF, printed as hex.
const PYSCARD_READ: &str = r#"
import sys
from smartcard.System import readers
name, aid, fid = sys.argv[1], bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3])
r = [x for x in readers() if str(x) == name][0]
c = r.createConnection(); c.connect()
def tx(apdu):
    data, sw1, sw2 = c.transmit(list(apdu))
    return bytes(data), (sw1 << 8) | sw2
_, s = tx(b"\x00\xa4\x04\x0c" + bytes([len(aid)]) + aid); assert s == 0x9000, hex(s)
fcp, s = tx(b"\x00\xa4\x02\x04\x02" + fid + b"\x00"); assert s == 0x9000, hex(s)
size = int.from_bytes(fcp[4:6], "big")
out = b""
while len(out) < size:
    n = min(256, size - len(out))
    off = len(out)
    if off <= 0x7FFF:
        d, s = tx(bytes([0, 0xB0, off >> 8, off & 0xFF, n & 0xFF]))
    else:
        d, s = tx(bytes([0, 0xB1, 0, 0, 5, 0x54, 3, off >> 16, (off >> 8) & 0xFF, off & 0xFF, 0]))
        d = d[2 + {0x81: 1, 0x82: 2}.get(d[1], 0):]
    assert s in (0x9000, 0x6282), hex(s)
    out += d
print(out.hex())
"#;

/// Byte comparison that reports the first difference instead of dumping kilobytes.
fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if got != want {
        let first = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: {} bytes read, {} written, first difference at offset {first}",
            got.len(),
            want.len()
        );
    }
}

fn pyscard_read(reader: &str, aid: &[u8], fid: u16) -> Vec<u8> {
    let out = Command::new(PYTHON)
        .args([
            "-c",
            PYSCARD_READ,
            reader,
            &hex::encode(aid),
            &format!("{fid:04x}"),
        ])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "pyscard read failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    hex::decode(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
}

/// opensc-tool: SELECT the LDS, SELECT DG1, READ BINARY; returns the data of the last
/// response parsed from opensc-tool's hex dump.
fn opensc_read_dg1(reader: &str) -> Vec<u8> {
    let list = Command::new("opensc-tool")
        .arg("-l")
        .output()
        .expect("opensc-tool runs");
    let listing = String::from_utf8_lossy(&list.stdout);
    let index = listing
        .lines()
        .find(|l| l.trim_end().ends_with(reader))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("opensc-tool does not list {reader}:\n{listing}"));
    let out = Command::new("opensc-tool")
        .args([
            "-r",
            index,
            "-s",
            "00 A4 04 0C 07 A0 00 00 02 47 10 01",
            "-s",
            "00 A4 02 0C 02 01 01",
            "-s",
            "00 B0 00 00 00",
        ])
        .output()
        .expect("opensc-tool runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.rsplit("Received (SW1=").next().expect("a response");
    assert!(last.starts_with("0x90, SW2=0x00)"), "opensc-tool:\n{text}");
    let mut data = Vec::new();
    for line in last.lines().skip(1) {
        // "00 11 22 ... 77 ..text.." : hex bytes until the ASCII column.
        for tok in line.split_whitespace() {
            if tok.len() == 2
                && let Ok(b) = u8::from_str_radix(tok, 16)
            {
                data.push(b);
            } else {
                break;
            }
        }
    }
    data
}

#[test]
fn pcscd_personalize_then_independent_readback() {
    with_private_pcscd(
        &pcsc("pcscd_personalize_then_independent_readback"),
        |dir| {
            let sim = start_sim(dir, 2);
            let ctx = reader::establish().unwrap();
            let mut names = reader::list_readers(&ctx).unwrap();
            names.sort();
            assert_eq!(names, sim.readers());

            let stock = stock(21, Faults::none());
            let mut enc = sim.pcsc_encoder(ctx, 0, stock.clone()).unwrap();
            enc.insert().unwrap();
            // 40 KB face image: offsets beyond 32767 use the odd-INS (D7/B1) forms.
            let image = sample_image(40_000, 7);
            let rec = script::personalize(
                &mut enc,
                &image,
                &MasterKeys::test_keys(),
                &ScriptOptions::default(),
            )
            .unwrap();
            println!(
                "personalized {} through pcscd: {} APDUs, {:?}",
                rec.chip_serial, rec.apdus, rec.elapsed
            );
            assert_eq!(rec.chip_serial, ChipSerial::simulated(21, 1));
            assert_eq!(
                sim.encoders()[0].slot().with_card(|c| c.lifecycle()),
                Some(Lifecycle::Operational)
            );

            // Our own read-back over PC/SC, and the challenge-response for QC.
            let rb = script::read_back(&mut enc).unwrap();
            assert!(
                rb.mismatches(&image).is_empty(),
                "{:?}",
                rb.mismatches(&image)
            );
            let challenge = b"qc-challenge";
            let sig = script::internal_authenticate(&mut enc, challenge).unwrap();
            assert!(script::verify_internal_authenticate(
                &rec.auth_public_key,
                challenge,
                &sig
            ));

            // Tools we did not write (sharing the reader): pyscard for every public file,
            // opensc-tool for DG1.
            let reader = &sim.readers()[0];
            for (fid, want) in [
                (EF_COM, &image.ef_com),
                (EF_DG1, &image.dg1),
                (EF_DG2, &image.dg2),
                (EF_DG11, &image.dg11),
                (EF_SOD, &image.sod),
            ] {
                assert_eq!(
                    &pyscard_read(reader, &LDS_AID, fid),
                    want,
                    "pyscard read of {fid:04X}"
                );
            }
            assert_same(
                "opensc-tool read of DG1",
                &opensc_read_dg1(reader),
                &image.dg1,
            );
            enc.eject().unwrap();

            // Extended-length APDUs (4 KiB chunks) through pcscd and vpcd on the second encoder.
            let mut enc2 = sim
                .pcsc_encoder(reader::establish().unwrap(), 1, stock)
                .unwrap();
            enc2.insert().unwrap();
            let ext = script::personalize(
                &mut enc2,
                &image,
                &MasterKeys::test_keys(),
                &ScriptOptions::extended(),
            )
            .unwrap();
            println!(
                "extended length through pcscd: {} APDUs, {:?}",
                ext.apdus, ext.elapsed
            );
            assert!(ext.apdus < rec.apdus / 3, "{} vs {}", ext.apdus, rec.apdus);
            assert_same(
                "pyscard read of DG2 (extended)",
                &pyscard_read(&sim.readers()[1], &LDS_AID, EF_DG2),
                &image.dg2,
            );
        },
    );
}

/// A personalization worker in another process than the simulation: its own PC/SC
/// context, no feed of its own (the simulation's feeder refills the slot).
fn outside_worker(reader: &str) -> cardpipe_card::reader::PcscEncoder {
    cardpipe_card::reader::PcscEncoder::new(reader::establish().unwrap(), reader, None).unwrap()
}

/// Personalizes the card in `ch` with the test keys and default options.
fn personalize_test_card(
    ch: &mut dyn CardChannel,
    image: &script::CardImage,
) -> Result<script::PersoRecord, PersoError> {
    script::personalize(
        ch,
        image,
        &MasterKeys::test_keys(),
        &ScriptOptions::default(),
    )
}

/// Standalone mode (`cardpipe encoders simulate` in its own process): the slots refill
/// themselves, the client only connects, personalizes and releases the card.
#[test]
fn pcscd_auto_feed_for_an_outside_worker() {
    with_private_pcscd(&pcsc("pcscd_auto_feed_for_an_outside_worker"), |dir| {
        let sim = start_sim(dir, 1);
        sim.auto_feed(stock(28, Faults::none()));
        let reader = sim.readers()[0].clone();
        let mut serials = Vec::new();
        for _ in 0..2 {
            let mut enc = outside_worker(&reader);
            enc.connect().unwrap();
            let rec = personalize_test_card(&mut enc, &sample_image(3000, 4)).unwrap();
            serials.push(rec.chip_serial);
            enc.eject().unwrap();
            // The locked card is swapped for a blank once the worker powers it down.
            let deadline = Instant::now() + Duration::from_secs(3);
            while sim.encoders()[0].slot().with_card(|c| c.serial()) == Some(rec.chip_serial)
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        assert_eq!(
            serials,
            vec![ChipSerial::simulated(28, 1), ChipSerial::simulated(28, 2)]
        );
    });
}

/// A channel that stops talking after `left` commands: the worker process dies mid-card.
struct DiesAfter<'a> {
    enc: &'a mut cardpipe_card::reader::PcscEncoder,
    left: u32,
}

impl CardChannel for DiesAfter<'_> {
    fn reader_name(&self) -> &str {
        self.enc.reader_name()
    }

    fn transmit(&mut self, apdu: &[u8]) -> Result<Vec<u8>, ReaderError> {
        if self.left == 0 {
            return Err(ReaderError::Unresponsive("worker killed".into()));
        }
        self.left -= 1;
        self.enc.transmit(apdu)
    }
}

/// Standalone mode, a worker killed mid-card: the half-written card is left powered in the
/// encoder with nobody to eject it. The feeder must reject it once its worker is gone, so the
/// next worker gets a blank, not a card it cannot personalize (chaos run, 7 December: the
/// encoder kept that card and every later job on it failed).
#[test]
fn pcscd_auto_feed_rejects_a_card_its_worker_abandoned() {
    with_private_pcscd(
        &pcsc("pcscd_auto_feed_rejects_a_card_its_worker_abandoned"),
        |dir| {
            let sim = start_sim(dir, 1);
            sim.auto_feed(stock(29, Faults::none()));
            let reader = sim.readers()[0].clone();
            let image = sample_image(3000, 4);
            {
                // The first worker writes part of the card, then its process dies: its
                // context and card handle go away without an eject.
                let mut enc = outside_worker(&reader);
                enc.connect().unwrap();
                let err = personalize_test_card(
                    &mut DiesAfter {
                        enc: &mut enc,
                        left: 30,
                    },
                    &image,
                )
                .unwrap_err();
                println!("first worker stopped: {err}");
                assert!(
                    sim.encoders()[0]
                        .slot()
                        .with_card(|c| c.lifecycle() == Lifecycle::PrePersonalization)
                        .unwrap(),
                    "the card is half written"
                );
            }
            // The next worker gets a fresh blank and makes a card of it.
            let mut enc = outside_worker(&reader);
            enc.connect().unwrap();
            let rec = personalize_test_card(&mut enc, &image).unwrap();
            assert_eq!(rec.chip_serial, ChipSerial::simulated(29, 2));
            let rejected = sim.encoders()[0]
                .slot()
                .with_ejected(|c| (c.serial(), c.lifecycle()))
                .expect("the abandoned card in the reject tray");
            assert_eq!(
                rejected,
                (ChipSerial::simulated(29, 1), Lifecycle::PrePersonalization)
            );
        },
    );
}

/// Standalone mode, a dead blank: the feeder swaps it for the next blank, and pcscd must see
/// the slot empty in between, or it keeps the dead card's state and every later connect fails
/// "no card" (chaos run: an encoder out of service from its first card on).
#[test]
fn pcscd_auto_feed_replaces_a_dead_blank() {
    with_private_pcscd(&pcsc("pcscd_auto_feed_replaces_a_dead_blank"), |dir| {
        let sim = start_sim(dir, 1);
        // Blanks 1 and 2 are dead, then good ones (`n` counts from 0).
        sim.auto_feed(Arc::new(BlankStock::new(
            MasterKeys::test_keys(),
            30,
            |n| Faults {
                dead: n < 2,
                ..Faults::none()
            },
        )));
        let reader = sim.readers()[0].clone();
        let mut enc = outside_worker(&reader);
        enc.set_insert_timeout(Duration::from_millis(1500));
        // A worker without a feed retries the connect as its jobs come; the dead blanks go.
        let deadline = Instant::now() + Duration::from_secs(20);
        let rec = loop {
            match enc.connect() {
                Ok(()) => break personalize_test_card(&mut enc, &sample_image(3000, 4)).unwrap(),
                Err(e) => {
                    println!("connect: {e}");
                    assert!(
                        Instant::now() < deadline,
                        "no usable blank within 20 s: {e}"
                    );
                }
            }
        };
        assert_eq!(rec.chip_serial, ChipSerial::simulated(30, 3));
    });
}

/// The farm benchmark through real pcscd with 8 encoders (t = 8 s scaled to 800 ms).
#[test]
fn pcscd_bench_eight_encoders() {
    with_private_pcscd(&pcsc("pcscd_bench_eight_encoders"), |dir| {
        let sim = start_sim(dir, 8);
        // CARDPIPE_PCSCD_BENCH_SCALE=1 measures in real time (about 20 s) for the figures.
        let time_scale = std::env::var("CARDPIPE_PCSCD_BENCH_SCALE")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.1);
        let cfg = cardpipe_card::bench::BenchConfig {
            encoders: 8,
            encode_time: Duration::from_secs(8),
            time_scale,
            cards: 16,
            dg2_len: 20_000,
            script: ScriptOptions::default(),
        };
        let r = cardpipe_card::bench::run_pcscd(&cfg, &sim).unwrap();
        println!("{r}");
        assert_eq!((r.cards_ok, r.cards_failed), (16, 0), "{r}");
        assert!(r.mean_encode >= cfg.encode_time, "{r}");
        assert!(r.ratio() > 0.3, "{r}");
    });
}

/// Regression guard for the delayed-ACK stall (vpcd sends each frame in two writes): an APDU
/// round trip through pcscd must take well under the 40 ms delayed-ACK timer.
#[test]
fn pcscd_round_trip_is_fast() {
    with_private_pcscd(&pcsc("pcscd_round_trip_is_fast"), |dir| {
        let sim = start_sim(dir, 1);
        let ctx = reader::establish().unwrap();
        let mut enc = sim.pcsc_encoder(ctx, 0, stock(22, Faults::none())).unwrap();
        enc.insert().unwrap();
        let t = Instant::now();
        for _ in 0..50 {
            let r = enc.transmit(&[0x80, 0xCA, 0x9F, 0x7F, 0x00]).unwrap();
            assert_eq!(&r[r.len() - 2..], &[0x90, 0x00]);
        }
        let per_apdu = t.elapsed() / 50;
        println!("GET DATA round trip through pcscd: {per_apdu:?}");
        assert!(
            per_apdu < Duration::from_millis(10),
            "{per_apdu:?} per APDU"
        );
    });
}

#[test]
fn pcscd_fault_write_failure() {
    with_private_pcscd(&pcsc("pcscd_fault_write_failure"), |dir| {
        let sim = start_sim(dir, 1);
        let ctx = reader::establish().unwrap();
        let mut enc = sim
            .pcsc_encoder(
                ctx,
                0,
                stock(
                    23,
                    Faults {
                        write_failure_rate: 1.0,
                        ..Faults::none()
                    },
                ),
            )
            .unwrap();
        enc.insert().unwrap();
        let err = script::personalize(
            &mut enc,
            &sample_image(2000, 1),
            &MasterKeys::test_keys(),
            &ScriptOptions::default(),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                PersoError::Status {
                    step: "UPDATE BINARY",
                    sw: sw::MEMORY_FAILURE
                }
            ),
            "{err}"
        );
        assert!(err.spoils_blank());
        // The reader is fine: the next blank personalizes.
        enc.eject().unwrap();
        let mut healthy = sim
            .pcsc_encoder(reader::establish().unwrap(), 0, stock(24, Faults::none()))
            .unwrap();
        healthy.insert().unwrap();
        let rec = script::personalize(
            &mut healthy,
            &sample_image(2000, 1),
            &MasterKeys::test_keys(),
            &ScriptOptions::default(),
        )
        .unwrap();
        assert_eq!(rec.chip_serial, ChipSerial::simulated(24, 1));
    });
}

#[test]
fn pcscd_fault_tearing() {
    with_private_pcscd(&pcsc("pcscd_fault_tearing"), |dir| {
        let sim = start_sim(dir, 1);
        let ctx = reader::establish().unwrap();
        let mut enc = sim
            .pcsc_encoder(
                ctx,
                0,
                stock(
                    25,
                    Faults {
                        tear_at_write: Some(5),
                        ..Faults::none()
                    },
                ),
            )
            .unwrap();
        enc.set_insert_timeout(Duration::from_millis(1500));
        enc.insert().unwrap();
        let image = sample_image(6000, 2);
        let err = script::personalize(
            &mut enc,
            &image,
            &MasterKeys::test_keys(),
            &ScriptOptions::default(),
        )
        .unwrap_err();
        println!("tearing through pcscd: {err}");
        assert!(
            matches!(
                err,
                PersoError::Reader(ReaderError::RemovedCard(_) | ReaderError::Unresponsive(_))
            ),
            "{err:?}"
        );
        assert!(err.spoils_blank());
        let slot = sim.encoders()[0].slot();
        // The torn card left the slot with DG2 half written.
        let dg2 = slot
            .with_ejected(|c| c.file(App::Lds, EF_DG2).unwrap().to_vec())
            .expect("torn card in the tray");
        assert!(!slot.has_card());
        assert_eq!(
            dg2.len(),
            2 * 224 + 112,
            "EF.COM, DG1, two whole DG2 chunks, half of the third"
        );
        assert_same("torn DG2 prefix", &dg2, &image.dg2[..dg2.len()]);
        // The encoder ejects the torn card (pcscd sees the reader empty) and carries on with
        // the next blank right away.
        enc.eject().unwrap();
        assert!(!enc.card_present().unwrap());
        let fresh = cardpipe_card::card_os::Card::blank(
            ChipSerial::simulated(25, 99),
            &MasterKeys::test_keys(),
            Faults::none(),
        );
        sim.encoders()[0].slot().insert(fresh);
        enc.connect().unwrap();
        let rec = script::personalize(
            &mut enc,
            &image,
            &MasterKeys::test_keys(),
            &ScriptOptions::default(),
        )
        .unwrap();
        assert_eq!(rec.chip_serial, ChipSerial::simulated(25, 99));
    });
}

#[test]
fn pcscd_fault_dead_chip() {
    with_private_pcscd(&pcsc("pcscd_fault_dead_chip"), |dir| {
        let sim = start_sim(dir, 1);
        let ctx = reader::establish().unwrap();
        let mut enc = sim
            .pcsc_encoder(
                ctx,
                0,
                stock(
                    26,
                    Faults {
                        dead: true,
                        ..Faults::none()
                    },
                ),
            )
            .unwrap();
        enc.set_insert_timeout(Duration::from_millis(1500));
        let err = enc.insert().unwrap_err();
        println!("dead chip through pcscd: {err}");
        assert!(
            matches!(
                err,
                ReaderError::Unresponsive(_) | ReaderError::NoSmartcard(_)
            ),
            "{err:?}"
        );
        assert!(
            sim.encoders()[0].slot().has_card(),
            "the dead card is physically in the slot"
        );
    });
}

#[test]
fn pcscd_fault_slow_eeprom_and_hot_plug() {
    with_private_pcscd(&pcsc("pcscd_fault_slow_eeprom_and_hot_plug"), |dir| {
        let sim = start_sim(dir, 2);
        let ctx = reader::establish().unwrap();
        let latency = Duration::from_millis(5);
        let mut enc = sim
            .pcsc_encoder(
                ctx,
                1,
                stock(
                    27,
                    Faults {
                        apdu_latency: latency,
                        ..Faults::none()
                    },
                ),
            )
            .unwrap();
        enc.insert().unwrap();
        let rec = script::personalize(
            &mut enc,
            &sample_image(4000, 3),
            &MasterKeys::test_keys(),
            &ScriptOptions::default(),
        )
        .unwrap();
        println!(
            "slow EEPROM through pcscd: {} APDUs in {:?}",
            rec.apdus, rec.elapsed
        );
        assert!(
            rec.elapsed >= latency * rec.apdus,
            "{:?} for {} APDUs",
            rec.elapsed,
            rec.apdus
        );
        assert!(
            rec.elapsed < latency * rec.apdus * 3,
            "{:?} for {} APDUs",
            rec.elapsed,
            rec.apdus
        );
        // Hot plug: card out → typed error; a new blank in → a different chip.
        sim.encoders()[1].slot().eject();
        std::thread::sleep(Duration::from_millis(100));
        let err = enc.transmit(&[0x80, 0xCA, 0x9F, 0x7F, 0x00]).unwrap_err();
        assert!(
            matches!(
                err,
                ReaderError::RemovedCard(_) | ReaderError::NoSmartcard(_)
            ),
            "{err:?}"
        );
        enc.insert().unwrap();
        assert_eq!(
            script::read_chip_serial(&mut enc).unwrap(),
            ChipSerial::simulated(27, 2)
        );
    });
}

/// A small batch through pcscd with a fault plan (dead chips, tearing, write failures): every
/// application ends on a good card, every spoiled blank is recorded with its reason, and an
/// outside tool reads back what was written.
#[test]
fn pcscd_batch_with_faults_requeues_on_fresh_blanks() {
    with_private_pcscd(
        &pcsc("pcscd_batch_with_faults_requeues_on_fresh_blanks"),
        |dir| {
            let sim = start_sim(dir, 1);
            let plan = cardpipe_card::card_os::FaultPlan {
                dead_every: Some(4),
                tear_every: Some(3),
                tear_at_write: 4,
                write_failure_rate: 0.004,
                seed: 11,
                ..Default::default()
            };
            let stock = Arc::new(BlankStock::with_plan(MasterKeys::test_keys(), 30, plan));
            let mut enc = sim
                .pcsc_encoder(reader::establish().unwrap(), 0, stock.clone())
                .unwrap();
            enc.set_insert_timeout(Duration::from_millis(1500));
            let slot = sim.encoders()[0].slot().clone();
            let mut spoiled: Vec<(ChipSerial, String)> = Vec::new();
            let mut issued = Vec::new();
            for app in 0..5u8 {
                let image = sample_image(5000, app);
                let mut done = false;
                for _attempt in 0..6 {
                    let blank = slot.with_card(|c| c.serial());
                    let result = enc.insert().map_err(PersoError::from).and_then(|()| {
                        script::personalize(
                            &mut enc,
                            &image,
                            &MasterKeys::test_keys(),
                            &ScriptOptions::default(),
                        )
                    });
                    let serial = slot
                        .with_card(|c| c.serial())
                        .or_else(|| slot.with_ejected(|c| c.serial()))
                        .or(blank)
                        .unwrap();
                    match result {
                        Ok(rec) => {
                            assert_same(
                                "outside read of DG1",
                                &pyscard_read(&sim.readers()[0], &LDS_AID, EF_DG1),
                                &image.dg1,
                            );
                            issued.push(rec.chip_serial);
                            enc.eject().unwrap();
                            done = true;
                            break;
                        }
                        Err(e) => {
                            assert!(e.spoils_blank(), "{e}");
                            spoiled.push((serial, e.to_string()));
                            enc.eject().unwrap();
                        }
                    }
                }
                assert!(
                    done,
                    "application {app} not issued; spoiled so far: {spoiled:?}"
                );
            }
            println!("issued {issued:?}\nspoiled {spoiled:?}");
            assert_eq!(issued.len(), 5);
            assert_eq!(stock.taken() as usize, issued.len() + spoiled.len());
            assert!(
                spoiled
                    .iter()
                    .any(|(_, r)| r.contains("no card") || r.contains("does not respond")),
                "a dead chip: {spoiled:?}"
            );
            assert!(
                spoiled.iter().any(|(_, r)| r.contains("removed")),
                "a torn card: {spoiled:?}"
            );
            let mut all: Vec<_> = issued
                .iter()
                .chain(spoiled.iter().map(|(s, _)| s))
                .collect();
            all.sort();
            all.dedup();
            assert_eq!(
                all.len(),
                issued.len() + spoiled.len(),
                "one blank per attempt"
            );
        },
    );
}
