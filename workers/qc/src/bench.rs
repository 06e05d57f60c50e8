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
