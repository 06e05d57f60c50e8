//! The personalize stage and its encoder farm through a REAL pcscd with vpcd virtual readers:
//! the farm discovers the readers, a blank is torn mid-write and another is dead (recorded
//! spoiled), the application ends on a good card, and pyscard — a tool we did not write —
//! reads back what the pipeline wrote.
//!
//! The second test makes a card whose keys the chip generates (`[keys] generation =
//! "on_card"`) and then, with tools we did not write, checks it as any relying party could:
//! pyscard reads both certificates and asks the chip for an INTERNAL AUTHENTICATE (key 01)
//! and, after VERIFY of the signature PIN, a PSO COMPUTE DIGITAL SIGNATURE (key 02) over a
//! fresh challenge; `openssl dgst -verify` checks each signature under its certificate's key
//! and `openssl verify` accepts both certificates under the CA hierarchy.
//!
//! Like tests/pcscd.rs, the body runs in a re-executed child with `PCSCLITE_CSOCK_NAME` set
//! (pcsc-lite reads it once per process), which starts its own private pcscd.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cardpipe_card::card_os::Faults;
use cardpipe_card::card_os::profile::*;
use cardpipe_card::farm::{EncoderSource, Farm, FarmSettings};
use cardpipe_card::pcsc_harness::{PYTHON, PcscTest, Tool, with_private_pcscd};
use cardpipe_card::reader::{self, BlankStock, CardChannel, Encoder, PcscEncoder, ReaderError};
use cardpipe_card::scp03::MasterKeys;
use cardpipe_card::simulate::{SimConfig, Simulation};
use cardpipe_card::vpcd::SlotHandle;
use cardpipe_common::testing::{self, Mode};

/// This file's private-pcscd test settings.
fn pcsc(name: &str) -> PcscTest<'_> {
    PcscTest {
        name,
        dir_prefix: "cardpipe-farm-pcscd-",
        timeout: Duration::from_secs(80),
        needs: &[Tool::Pyscard],
    }
}

/// A reader whose hopper leaves the finished card in the slot until the next insert (so an
/// outside tool can read it afterwards); insert swaps in the next blank from `stock`.
struct HopperEncoder {
    inner: PcscEncoder,
    slot: SlotHandle,
    stock: Arc<BlankStock>,
}

impl CardChannel for HopperEncoder {
    fn reader_name(&self) -> &str {
        self.inner.reader_name()
    }
    fn transmit(&mut self, apdu: &[u8]) -> Result<Vec<u8>, ReaderError> {
        self.inner.transmit(apdu)
    }
}

impl Encoder for HopperEncoder {
    fn insert(&mut self) -> Result<(), ReaderError> {
        self.slot.eject();
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.inner.card_present()? && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.slot.insert(self.stock.take());
        match self.inner.connect() {
            Err(ReaderError::NoSmartcard(r)) => Err(ReaderError::Unresponsive(r)),
            other => other,
        }
    }
    fn eject(&mut self) -> Result<(), ReaderError> {
        self.inner.eject()
    }
}

struct HopperSource {
    readers: Vec<(String, SlotHandle)>,
    stock: Arc<BlankStock>,
}

impl EncoderSource for HopperSource {
    fn kind(&self) -> &'static str {
        "pcsc"
    }
    fn scan(&self) -> Result<Vec<String>, ReaderError> {
        let names = reader::list_readers(&reader::establish()?)?;
        Ok(self
            .readers
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| names.contains(n))
            .collect())
    }
    fn open(&self, name: &str) -> Result<Box<dyn Encoder>, ReaderError> {
        let (_, slot) = self
            .readers
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| ReaderError::ReaderUnavailable(name.into()))?;
        let mut inner = PcscEncoder::new(reader::establish()?, name, None)?;
        inner.set_insert_timeout(Duration::from_millis(1500));
        Ok(Box::new(HopperEncoder {
            inner,
            slot: slot.clone(),
            stock: self.stock.clone(),
        }))
    }
}

/// Rescans until the farm has found the simulation's reader (pcscd lists a vpcd reader a
/// moment after it starts, later on a loaded machine), for at most 10 s.
fn discover(farm: &Farm) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while farm.in_service() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let _ = farm.rescan();
    }
}

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
cplc, s = tx(b"\x80\xca\x9f\x7f\x00")
print(out.hex())
"#;

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

#[test]
fn pcscd_stage_on_the_farm_with_faults_then_pyscard_readback() {
    with_private_pcscd(
        &pcsc("pcscd_stage_on_the_farm_with_faults_then_pyscard_readback"),
        |dir| {
            let sim = Simulation::start(SimConfig::new(1, dir)).expect("pcscd with vpcd starts");
            sim.check_client_env()
                .expect("child talks to its own pcscd");
            // Blank 0 is torn mid-write, blank 1 is dead, then good blanks.
            let stock = Arc::new(BlankStock::new(MasterKeys::test_keys(), 61, |n| match n {
                0 => Faults {
                    tear_at_write: Some(5),
                    ..Faults::none()
                },
                1 => Faults {
                    dead: true,
                    ..Faults::none()
                },
                _ => Faults::none(),
            }));
            let source = HopperSource {
                readers: sim
                    .encoders()
                    .iter()
                    .map(|e| (e.reader.clone(), e.slot().clone()))
                    .collect(),
                stock,
            };
            let farm = Farm::new(Box::new(source), FarmSettings::default());
            discover(&farm);
            assert_eq!(farm.in_service(), 1, "the farm discovered the reader");
            let reader_name = sim.readers()[0].clone();

            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let (creds, rows) = rt.block_on(async {
                let (services, _guard) = testing::services(Mode::Embedded, None).await;
                let pki = common::pki();
                let apps = common::seed(&services, &pki, 1).await;
                let id = apps[0].0.clone();
                let running = common::start(&services, common::stage(farm.clone(), &pki, 4)).await;
                common::wait_personalized(&services, std::slice::from_ref(&id)).await;
                running.shutdown().await.unwrap();
                let rows = common::one_good_card(&services, &id).await;
                (apps[0].1.clone(), rows)
            });
            println!("{rows:#?}");
            assert_eq!(rows.len(), 3, "{rows:?}");
            assert!(
                rows[0].spoil_reason.as_deref().unwrap().contains("removed"),
                "{rows:?}"
            );
            assert!(rows[1].chip_serial.is_none(), "dead chip: {rows:?}");
            assert_eq!(rows[2].encoder, reader_name);

            // pyscard reads the finished card still in the reader.
            for (fid, want) in [
                (EF_COM, &creds.ef_com),
                (EF_DG1, &creds.dg1),
                (EF_DG2, &creds.dg2),
                (EF_DG11, &creds.dg11),
                (EF_SOD, &creds.ef_sod),
            ] {
                assert!(
                    pyscard_read(&reader_name, &LDS_AID, fid) == *want,
                    "pyscard read of {fid:04X} differs from the credentials package"
                );
            }
            assert!(
                pyscard_read(&reader_name, &EID_AID, EF_CERT_AUTH)
                    == creds
                        .off_card
                        .as_ref()
                        .unwrap()
                        .authentication_certificate
                        .der,
                "pyscard read of C001"
            );
            println!("pyscard read back EF.COM, DG1, DG2, DG11, EF.SOD, C001: match");
        },
    );
}

/// Reads C001/C002 and has the chip sign `challenge` with both keys; prints JSON.
const PYSCARD_PROVE: &str = r#"
import sys, json, hashlib
from smartcard.System import readers
name, eid, pin, chal = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3].encode(), bytes.fromhex(sys.argv[4])
r = [x for x in readers() if str(x) == name][0]
c = r.createConnection(); c.connect()
def tx(apdu):
    data, sw1, sw2 = c.transmit(list(apdu))
    return bytes(data), (sw1 << 8) | sw2
_, s = tx(b"\x00\xa4\x04\x0c" + bytes([len(eid)]) + eid); assert s == 0x9000, hex(s)
def read(fid):
    fcp, s = tx(b"\x00\xa4\x02\x04\x02" + fid + b"\x00"); assert s == 0x9000, hex(s)
    size = int.from_bytes(fcp[4:6], "big")
    out = b""
    while len(out) < size:
        off = len(out)
        d, s = tx(bytes([0, 0xB0, off >> 8, off & 0xFF, min(256, size - off) & 0xFF]))
        assert s in (0x9000, 0x6282), hex(s)
        out += d
    return out
c001, c002 = read(b"\xc0\x01"), read(b"\xc0\x02")
ia, s = tx(b"\x00\x88\x00\x01" + bytes([len(chal)]) + chal + b"\x00"); assert s == 0x9000, hex(s)
_, s = tx(b"\x00\x20\x00\x82" + bytes([len(pin)]) + pin); assert s == 0x9000, hex(s)
h = hashlib.sha256(chal).digest()
pso, s = tx(b"\x00\x2a\x9e\x9a\x20" + h + b"\x00"); assert s == 0x9000, hex(s)
print(json.dumps({"c001": c001.hex(), "c002": c002.hex(), "ia": ia.hex(), "pso": pso.hex()}))
"#;

fn openssl(dir: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openssl {args:?}: {text}");
    text
}

#[test]
fn pcscd_on_card_keys_verified_by_pyscard_and_openssl() {
    with_private_pcscd(
        &pcsc("pcscd_on_card_keys_verified_by_pyscard_and_openssl"),
        |dir| {
            let sim = Simulation::start(SimConfig::new(1, dir)).expect("pcscd with vpcd starts");
            sim.check_client_env()
                .expect("child talks to its own pcscd");
            let stock = Arc::new(BlankStock::new(MasterKeys::test_keys(), 62, |_| {
                Faults::none()
            }));
            let source = HopperSource {
                readers: sim
                    .encoders()
                    .iter()
                    .map(|e| (e.reader.clone(), e.slot().clone()))
                    .collect(),
                stock,
            };
            let farm = Farm::new(Box::new(source), FarmSettings::default());
            discover(&farm);
            assert_eq!(farm.in_service(), 1, "the farm discovered the reader");
            let reader_name = sim.readers()[0].clone();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let pki_dir = tempfile::tempdir().unwrap();
            let (hierarchy, history) = rt.block_on(async {
                let (services, _guard) = testing::services(Mode::Embedded, None).await;
                let pki = Arc::new(
                    cardpipe_pki::settings::Pki::open(
                        cardpipe_pki::settings::PkiConfig {
                            kdf_log_n: 10,
                            ..Default::default()
                        },
                        pki_dir.path(),
                    )
                    .unwrap(),
                );
                let ca = pki.current(&services).await.unwrap();
                let apps = common::seed_with(&services, &ca.issuer, None, 1).await;
                let id = apps[0].0.clone();
                let test_pki = common::pki();
                let stage = common::stage(farm.clone(), &test_pki, 4).with_ca(pki.clone());
                let running = common::start(&services, stage).await;
                common::wait_personalized(&services, std::slice::from_ref(&id)).await;
                running.shutdown().await.unwrap();
                common::one_good_card(&services, &id).await;
                let history: Vec<String> = services
                    .store
                    .history(&id)
                    .await
                    .unwrap()
                    .iter()
                    .filter_map(|h| h.reason.clone())
                    .collect();
                (ca.hierarchy.clone(), history)
            });
            assert!(
                history.iter().any(|r| r.contains("key_origin=on_card")),
                "{history:?}"
            );

            // Outside tools only from here.
            let challenge: [u8; 32] = rand::random();
            let out = Command::new(PYTHON)
                .args([
                    "-c",
                    PYSCARD_PROVE,
                    &reader_name,
                    &hex::encode(EID_AID),
                    // common::pki()'s transport signature PIN
                    "222222",
                    &hex::encode(challenge),
                ])
                .output()
                .expect("python3 runs");
            assert!(
                out.status.success(),
                "pyscard: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let field = |k: &str| hex::decode(answer[k].as_str().unwrap()).unwrap();
            let work = tempfile::tempdir().unwrap();
            let w = work.path();
            let write = |name: &str, bytes: &[u8]| std::fs::write(w.join(name), bytes).unwrap();
            write("c001.der", &field("c001"));
            write("c002.der", &field("c002"));
            write("root.der", &hierarchy.root.certificate);
            write("issuing.der", &hierarchy.issuing.certificate);
            write("challenge.bin", &challenge);
            for (raw, der) in [("ia", "ia.sig"), ("pso", "pso.sig")] {
                write(
                    der,
                    &cardpipe_pki::pkix::ecdsa_raw_to_der(&field(raw)).unwrap(),
                );
            }
            for name in ["c001", "c002", "root", "issuing"] {
                openssl(
                    w,
                    &[
                        "x509",
                        "-inform",
                        "DER",
                        "-in",
                        &format!("{name}.der"),
                        "-out",
                        &format!("{name}.pem"),
                    ],
                );
            }
            let verified = openssl(
                w,
                &[
                    "verify",
                    "-CAfile",
                    "root.pem",
                    "-untrusted",
                    "issuing.pem",
                    "c001.pem",
                    "c002.pem",
                ],
            );
            assert!(
                verified.contains("c001.pem: OK") && verified.contains("c002.pem: OK"),
                "{verified}"
            );
            for (cert, sig) in [("c001", "ia.sig"), ("c002", "pso.sig")] {
                let public = openssl(
                    w,
                    &["x509", "-in", &format!("{cert}.pem"), "-pubkey", "-noout"],
                );
                write(&format!("{cert}.pub"), public.as_bytes());
                let ok = openssl(
                    w,
                    &[
                        "dgst",
                        "-sha256",
                        "-verify",
                        &format!("{cert}.pub"),
                        "-signature",
                        sig,
                        "challenge.bin",
                    ],
                );
                assert!(ok.contains("Verified OK"), "{cert}: {ok}");
            }
            println!("pyscard + openssl: both chip keys answer under their certificates; chain OK");
        },
    );
}
