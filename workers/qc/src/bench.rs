//! `cardpipe bench qc`: QC throughput and detection, on real cards.
//!
//! A [`Fixture`] holds a CA hierarchy in a temporary file keystore (plus a rogue one, for
//! EF.SOD signed by the wrong Document Signer). For each card it issues a real credentials
//! package (`cardpipe_pki`: LDS, EF.SOD, two certificates, wrapped keys), personalizes an
//! in-process card OS chip over SCP03 with the personalization script, plants a [`Planted`]
//! defect on a share of them, and inspects every card with [`crate::check::inspect`]. The
//! report gives cards/s checked (wall and per CPU second) and the share rejected per reason,
//! and counts any card whose verdict differs from the defect planted (must be 0).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cardpipe_card::card_os::profile::*;
use cardpipe_card::card_os::{Card, Defect};
use cardpipe_card::reader::{BlankStock, Encoder, InProcessEncoder};
use cardpipe_card::scp03::MasterKeys;
use cardpipe_card::script::{self, CardImage, ImportedKeys, ScriptOptions};
use cardpipe_pki::ca::{CaConfig, CaHierarchy, init};
use cardpipe_pki::citizen::{CardKeyRole, CitizenProfiles};
use cardpipe_pki::custody::{self, CardCredentials, TransportKey};
use cardpipe_pki::issue::CardIssuer;
use cardpipe_pki::keystore::{FileKeyStore, KdfParams};
use cardpipe_pki::sod::SodSigner;
use secrecy::SecretString;
use serde::Serialize;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::check::{self, Expectations, Reason};

/// Transport PINs the fixture writes.
pub const ID_PIN: &[u8] = b"111111";
/// Transport signature PIN.
pub const SIGN_PIN: &[u8] = b"222222";
/// Transport PUK.
pub const PUK_VALUE: &[u8] = b"33333333";

/// A defect QC must catch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Planted {
    /// One byte of DG1 flipped after signing.
    TamperedDg,
    /// EF.SOD signed by a Document Signer of another hierarchy.
    WrongSodSigner,
    /// The authentication key slot holds another key than the certified one.
    KeyNotOnChip,
    /// The card is not the chip recorded for the application.
    ChipSerialMismatch,
    /// The lock never happened.
    Unlocked,
    /// DG11 never written.
    MissingFile,
}

impl Planted {
    /// Every defect.
    pub const ALL: [Planted; 6] = [
        Planted::TamperedDg,
        Planted::WrongSodSigner,
        Planted::KeyNotOnChip,
        Planted::ChipSerialMismatch,
        Planted::Unlocked,
        Planted::MissingFile,
    ];

    /// The reason QC must give.
    pub fn expected(self) -> Reason {
        match self {
            Planted::TamperedDg => Reason::DgHashMismatch,
            Planted::WrongSodSigner => Reason::SodSignatureInvalid,
            Planted::KeyNotOnChip => Reason::KeyNotOnChip,
            Planted::ChipSerialMismatch => Reason::ChipSerialMismatch,
            Planted::Unlocked => Reason::CardUnlocked,
            Planted::MissingFile => Reason::MissingFile,
        }
    }

    /// The card-level defect (the chip serial mismatch is a record fault, not a card one).
    pub fn defect(self, rogue_sod: impl FnOnce() -> Vec<u8>) -> Option<Defect> {
        Some(match self {
            Planted::TamperedDg => Defect::FlipByte {
                app: App::Lds,
                fid: EF_DG1,
                offset: 17,
            },
            Planted::WrongSodSigner => Defect::ReplaceFile {
                app: App::Lds,
                fid: EF_SOD,
                data: rogue_sod(),
            },
            Planted::KeyNotOnChip => Defect::ReplaceKey { key_ref: KEY_AUTH },
            Planted::ChipSerialMismatch => return None,
            Planted::Unlocked => Defect::Unlocked,
            Planted::MissingFile => Defect::EraseFile {
                app: App::Lds,
                fid: EF_DG11,
            },
        })
    }
}

/// A CA hierarchy, a rogue Document Signer, a transport key and SCP03 keys.
pub struct Fixture {
    _dir: tempfile::TempDir,
    /// The hierarchy QC trusts.
    pub hierarchy: CaHierarchy,
    /// Issues credentials under it.
    pub issuer: CardIssuer,
    rogue: SodSigner,
    /// The encoder site's transport key.
    pub transport: TransportKey,
    /// SCP03 master keys.
    pub master: Arc<MasterKeys>,
    stock: Arc<BlankStock>,
}

impl std::fmt::Debug for Fixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fixture")
    }
}

impl Fixture {
    /// A fresh fixture (two hierarchies in temporary file keystores).
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let now = OffsetDateTime::now_utc() - time::Duration::minutes(5);
        let open = |name: &str| -> anyhow::Result<Arc<FileKeyStore>> {
            Ok(Arc::new(FileKeyStore::create(
                dir.path().join(name),
                &SecretString::from("bench"),
                KdfParams::for_tests(),
            )?))
        };
        let store = open("ca.keystore")?;
        let hierarchy = init(store.as_ref(), &CaConfig::default(), now)?;
        let issuer = CardIssuer::new(store, &hierarchy, &CitizenProfiles::default())?;
        let rogue_store = open("rogue.keystore")?;
        let rogue_h = init(rogue_store.as_ref(), &CaConfig::default(), now)?;
        let rogue = SodSigner::new(rogue_store, &rogue_h.document_signer)?;
        let transport = TransportKey::generate("bench-site")?;
        let master = Arc::new(MasterKeys::test_keys());
        let stock = Arc::new(BlankStock::healthy(MasterKeys::test_keys(), rand::random()));
        Ok(Self {
            _dir: dir,
            hierarchy,
            issuer,
            rogue,
            transport,
            master,
            stock,
        })
    }

    /// Issues a credentials package for card `card_ref` (sample chip data `seed`).
    pub fn credentials(&self, card_ref: &str, seed: u32) -> anyhow::Result<CardCredentials> {
        let input = cardpipe_pki::lds::sample_input(seed);
        Ok(self.issuer.issue(
            card_ref,
            &input,
            &self.transport,
            OffsetDateTime::now_utc() - time::Duration::minutes(1),
        )?)
    }

    /// The card image of a package (keys unwrapped with the transport key).
    pub fn image(&self, creds: &CardCredentials) -> anyhow::Result<CardImage> {
        let unwrap = |w, role| custody::unwrap(&self.transport, w, &creds.card_ref, role);
        let keys = creds
            .off_card
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the bench issues packages with off-card keys"))?;
        Ok(CardImage {
            ef_com: creds.ef_com.clone(),
            dg1: creds.dg1.clone(),
            dg2: creds.dg2.clone(),
            dg3: creds.dg3.clone(),
            dg11: creds.dg11.clone(),
            sod: creds.ef_sod.clone(),
            imported: Some(ImportedKeys {
                auth_key: unwrap(&keys.authentication_key, CardKeyRole::Authentication)?,
                sign_key: unwrap(&keys.signature_key, CardKeyRole::Signature)?,
                auth_cert: keys.authentication_certificate.der.clone(),
                sign_cert: keys.signature_certificate.der.clone(),
            }),
            id_pin: Zeroizing::new(ID_PIN.to_vec()),
            sign_pin: Zeroizing::new(SIGN_PIN.to_vec()),
            puk: Zeroizing::new(PUK_VALUE.to_vec()),
            fingerprint_reference: Zeroizing::new(cardpipe_card::card_os::bio::example_record()),
        })
    }

    /// Personalizes a fresh blank with `creds` on an in-process encoder; returns the chip.
    pub fn personalize(&self, creds: &CardCredentials) -> anyhow::Result<Card> {
        let image = self.image(creds)?;
        let mut enc = InProcessEncoder::new("bench-encoder", self.stock.clone());
        enc.insert()?;
        script::personalize(&mut enc, &image, &self.master, &ScriptOptions::extended())?;
        enc.eject()?;
        enc.take_ejected()
            .ok_or_else(|| anyhow::anyhow!("the encoder kept no card"))
    }

    /// EF.SOD over `creds`' data groups, signed by the rogue Document Signer.
    pub fn rogue_sod(&self, creds: &CardCredentials) -> Vec<u8> {
        let lds = creds.lds();
        self.rogue
            .sign(&lds.data_groups())
            .expect("the rogue signer signs")
    }

    /// Inspects `card` against `creds` (and the recorded chip serial `chip`).
    pub fn inspect(&self, card: Card, creds: &CardCredentials, chip: &str) -> check::Inspection {
        let mut reader = InProcessEncoder::new("qc-station", self.stock.clone());
        if reader.insert_card(card).is_err() {
            return check::Inspection {
                chip_serial: None,
                checks: Vec::new(),
            };
        }
        let Some(keys) = creds.off_card.as_ref() else {
            return check::Inspection {
                chip_serial: None,
                checks: Vec::new(),
            };
        };
        check::inspect(
            &mut reader,
            &Expectations {
                chip_serial: Some(chip),
                auth_cert: &keys.authentication_certificate.der,
                sign_cert: &keys.signature_certificate.der,
                hierarchy: &self.hierarchy,
                id_pin: ID_PIN,
                sign_pin: SIGN_PIN,
            },
        )
    }
}

/// What `cardpipe bench qc` reports.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Cards inspected.
    pub cards: usize,
    /// Cards with a planted defect.
    pub planted: usize,
    /// Wall time of the inspections only.
    pub inspect_seconds: f64,
    /// CPU time of the inspecting thread.
    pub inspect_cpu_seconds: f64,
    /// Cards checked per wall second.
    pub cards_per_second: f64,
    /// Cards checked per CPU second.
    pub cards_per_cpu_second: f64,
    /// Mean / p95 inspection time, ms.
    pub mean_ms: f64,
    /// 95th percentile, ms.
    pub p95_ms: f64,
    /// Passed cards.
    pub passed: usize,
    /// Rejected cards per reason code.
    pub rejected: BTreeMap<String, usize>,
    /// Share of all cards rejected, per reason.
    pub rejected_share: BTreeMap<String, f64>,
    /// Cards whose verdict differs from what was planted (must be 0).
    pub misjudged: usize,
}

/// Runs the benchmark: `cards` cards, every `defect_every`-th one (when > 0) with the next
/// defect of [`Planted::ALL`] in turn.
pub fn run(cards: usize, defect_every: usize) -> anyhow::Result<BenchReport> {
    let fx = Fixture::new()?;
    let mut prepared = Vec::with_capacity(cards);
    let mut next_defect = 0usize;
    for i in 0..cards {
        let creds = fx.credentials(&format!("BENCH-{i:06}"), 3000 + i as u32)?;
        let mut card = fx.personalize(&creds)?;
        let mut chip = card.serial().to_hex();
        let planted = (defect_every > 0 && (i + 1) % defect_every == 0).then(|| {
            let p = Planted::ALL[next_defect % Planted::ALL.len()];
            next_defect += 1;
            p
        });
        if let Some(p) = planted {
            match p.defect(|| fx.rogue_sod(&creds)) {
                Some(d) => card.inject_defect(&d),
                None => chip = "47500E1DFFFFFFFF0000".into(),
            }
        }
        prepared.push((card, creds, chip, planted));
    }
    let mut times = Vec::with_capacity(cards);
    let mut rejected: BTreeMap<String, usize> = BTreeMap::new();
    let (mut passed, mut misjudged, mut planted_n) = (0, 0, 0);
    let cpu0 = cardpipe_common::cpu::thread_cpu_seconds();
    let wall0 = Instant::now();
    for (card, creds, chip, planted) in prepared {
        let t = Instant::now();
        let inspection = fx.inspect(card, &creds, &chip);
        times.push(t.elapsed());
        let verdict = inspection.verdict();
        match verdict {
            None => passed += 1,
            Some(r) => *rejected.entry(r.as_str().to_owned()).or_default() += 1,
        }
        if planted.is_some() {
            planted_n += 1;
        }
        if verdict != planted.map(Planted::expected) {
            misjudged += 1;
        }
    }
    let wall = wall0.elapsed();
    let cpu = (cardpipe_common::cpu::thread_cpu_seconds() - cpu0).max(0.0);
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mean = times.iter().map(|d| ms(*d)).sum::<f64>() / times.len().max(1) as f64;
    let p95 = times
        .get((times.len() * 95 / 100).min(times.len().saturating_sub(1)))
        .map(|d| ms(*d))
        .unwrap_or(0.0);
    let rejected_share = rejected
        .iter()
        .map(|(k, v)| (k.clone(), *v as f64 / cards.max(1) as f64))
        .collect();
    Ok(BenchReport {
        cards,
        planted: planted_n,
        inspect_seconds: wall.as_secs_f64(),
        inspect_cpu_seconds: cpu,
        cards_per_second: cards as f64 / wall.as_secs_f64().max(1e-9),
        cards_per_cpu_second: cards as f64 / cpu.max(1e-9),
        mean_ms: mean,
        p95_ms: p95,
        passed,
        rejected,
        rejected_share,
        misjudged,
    })
}

/// `cardpipe bench qc --line`: QC replicas sharing one simulated line.
#[derive(Debug, Clone)]
pub struct LineBench {
    /// Directory for the simulated machine's pcscd (its socket must be this process's
    /// `PCSCLITE_CSOCK_NAME`: `<work_dir>/run/pcscd.comm`).
    pub work_dir: std::path::PathBuf,
    /// QC stations on the line.
    pub stations: usize,
    /// Replica counts to run, one after the other (e.g. 1, 2, 4).
    pub replicas: Vec<usize>,
    /// Job threads per replica (cards one replica reads at once).
    pub concurrency: usize,
    /// Cards per replica in each run (a run with N replicas reads N times as many).
    pub cards_per_replica: usize,
    /// pcscd / station timeout (a grant is waited for six times as long).
    pub station_timeout: Duration,
}

/// One run of [`run_line`]: N replicas on the line.
#[derive(Debug, Clone, Serialize)]
pub struct LineBenchRun {
    /// QC replicas (each its own [`crate::station::LineStations`], controller connections
    /// and job threads).
    pub replicas: usize,
    /// Job threads per replica.
    pub concurrency: usize,
    /// Stations on the line.
    pub stations: usize,
    /// Cards read.
    pub cards: usize,
    /// Wall time from the first job to the last verdict.
    pub seconds: f64,
    /// Cards read per second, all replicas together.
    pub cards_per_second: f64,
    /// `cards_per_second / (replicas × the single-replica run's cards_per_second)` (1.0 for
    /// the single-replica run; absent when no single-replica run was made).
    pub ratio_to_linear: Option<f64>,
    /// Cards each replica read.
    pub per_replica: Vec<u64>,
    /// Jobs that got no station in time and were retried (collisions; should be 0).
    pub unavailable: u64,
    /// Cards whose inspection failed (all are good cards: must be 0).
    pub failed: usize,
    /// Leases the controller had to take back (must be 0: no replica vanished).
    pub reclaimed: u64,
}

/// What `cardpipe bench qc --line` reports.
#[derive(Debug, Clone, Serialize)]
pub struct LineBenchReport {
    /// One entry per replica count.
    pub runs: Vec<LineBenchRun>,
}

/// Personalizes `cards` real cards (credentials from the fixture's CA), puts them on a
/// simulated line with `stations` QC stations read through pcscd, and for each replica
/// count N has N [`crate::station::LineStations`] — each with its own controller
/// connections and `concurrency` job threads, competing for jobs from one queue as QC
/// consumers of one broker queue do — inspect them with the full [`check::inspect`].
pub fn run_line(cfg: &LineBench) -> anyhow::Result<LineBenchReport> {
    use crate::station::{LineStations, Stations, Ticket};
    use std::collections::VecDeque;
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    anyhow::ensure!(
        cfg.stations > 0 && cfg.concurrency > 0 && cfg.cards_per_replica > 0,
        "stations, concurrency and cards per replica must be positive"
    );
    let mut sim_cfg = cardpipe_card::simulate::SimConfig::new(1, &cfg.work_dir);
    sim_cfg.qc_stations = cfg.stations;
    let sim = cardpipe_card::simulate::Simulation::start(sim_cfg)?;
    sim.check_client_env()?;
    let line = sim
        .line()
        .ok_or_else(|| anyhow::anyhow!("the simulated machine has no line"))?
        .clone();
    let addr = line
        .serve(SocketAddr::from(([127, 0, 0, 1], 0)))?
        .to_string();

    let fx = Fixture::new()?;
    let hierarchy = &fx.hierarchy;
    let mut runs: Vec<LineBenchRun> = Vec::new();
    let mut serial = 0u32;
    for &n in &cfg.replicas {
        anyhow::ensure!(n > 0, "a run needs at least one replica");
        // Cards for this run, personalized before the clock starts.
        let total = n * cfg.cards_per_replica;
        let mut jobs = VecDeque::with_capacity(total);
        for _ in 0..total {
            let creds = fx.credentials(&format!("LINE-{serial:06}"), 5000 + serial)?;
            serial += 1;
            let card = fx.personalize(&creds)?;
            let chip = card.serial().to_hex();
            let keys = creds
                .off_card
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("the bench issues packages with off-card keys"))?;
            jobs.push_back((
                chip,
                keys.authentication_certificate.der.clone(),
                keys.signature_certificate.der.clone(),
            ));
            line.deposit(card);
        }
        let reclaimed0 = line.status().reclaimed;
        let replicas: Vec<Arc<LineStations>> = (0..n)
            .map(|_| LineStations::connect(&addr, cfg.station_timeout))
            .collect::<Result<_, _>>()?;
        let queue = Mutex::new(jobs);
        let failed = AtomicUsize::new(0);
        let start = Instant::now();
        std::thread::scope(|scope| {
            for replica in &replicas {
                for _ in 0..cfg.concurrency {
                    let (queue, failed) = (&queue, &failed);
                    scope.spawn(move || {
                        loop {
                            let Some((chip, auth, sign)) =
                                queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
                            else {
                                return;
                            };
                            let ticket = Ticket {
                                application_id: format!("bench-{chip}"),
                                blank_serial: format!("bench-{chip}"),
                                chip_serial: Some(chip.clone()),
                            };
                            let expect_chip = chip.clone();
                            let (a, s) = (auth.clone(), sign.clone());
                            let result = Stations::Line(replica.clone()).inspect(
                                &ticket,
                                Box::new(move |channel| {
                                    check::inspect(
                                        channel,
                                        &Expectations {
                                            chip_serial: Some(&expect_chip),
                                            auth_cert: &a,
                                            sign_cert: &s,
                                            hierarchy,
                                            id_pin: ID_PIN,
                                            sign_pin: SIGN_PIN,
                                        },
                                    )
                                }),
                            );
                            match result {
                                Ok((inspection, _)) => {
                                    if let Some(reason) = inspection.verdict() {
                                        tracing::warn!(%chip, reason = reason.as_str(), "bench card failed QC");
                                        failed.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                                // No station in time: the job goes back in the queue, as a
                                // retried QC job would.
                                Err(_) => queue
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push_back((chip, auth, sign)),
                            }
                        }
                    });
                }
            }
        });
        let seconds = start.elapsed().as_secs_f64();
        let cards_per_second = total as f64 / seconds.max(1e-9);
        let single = runs
            .iter()
            .find(|r| r.replicas == 1)
            .map(|r| r.cards_per_second)
            .or((n == 1).then_some(cards_per_second));
        runs.push(LineBenchRun {
            replicas: n,
            concurrency: cfg.concurrency,
            stations: cfg.stations,
            cards: total,
            seconds,
            cards_per_second,
            ratio_to_linear: single.map(|s| cards_per_second / (n as f64 * s)),
            per_replica: replicas.iter().map(|r| r.inspected()).collect(),
            unavailable: replicas.iter().map(|r| r.unavailable()).sum(),
            failed: failed.load(Ordering::Relaxed),
            reclaimed: line.status().reclaimed - reclaimed0,
        });
    }
    Ok(LineBenchReport { runs })
}
