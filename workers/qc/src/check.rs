//! The QC inspection of one personalized card, over any [`CardChannel`] (the in-process QC
//! station, or a PC/SC reader): what an outside terminal can establish about the chip.
//!
//! In order (every check runs; the verdict is the first failure):
//! 1. `chip_serial`: CPLC (GET DATA `9F7F`) equals the chip serial recorded at personalization;
//! 2. `files_present`: EF.COM, DG1, DG2, DG11, EF.SOD (plain) and both certificates are there;
//! 3. `locked`: INITIALIZE UPDATE is refused (`6985`): the chip left pre-personalization;
//! 4. `pins_transport`: ID PIN, signature PIN and PUK retry counters are full and both PINs
//!    verify with their transport values (so the holder can set them at pickup);
//! 5. `dg3_readable`: DG3 (fingerprints) reads after the ID PIN;
//! 6. `dg_hashes`: every data group hashes to its EF.SOD entry, and EF.SOD covers every group;
//! 7. `sod_signature`: the CMS signature verifies under the embedded Document Signer, and the
//!    Document Signer certificate under the root CA;
//! 8. `certificate_chains`: both citizen certificates are signed by the issuing CA, name DG1's
//!    national code, and are the very certificates issued for this application;
//! 9. `auth_key_on_chip` / `sign_key_on_chip`: a fresh random challenge signed by key 01
//!    (INTERNAL AUTHENTICATE) and key 02 (PSO COMPUTE DIGITAL SIGNATURE after the signature
//!    PIN) verifies under the public key of the certificate in C001 / C002.
//!
//! Nothing here logs or returns card content: checks carry codes and short technical details.

use std::time::Instant;

use cardpipe_card::apdu::{Command, sw};
use cardpipe_card::card_os::profile::*;
use cardpipe_card::reader::CardChannel;
use cardpipe_card::script::{self, PersoError};
use cardpipe_pki::ca::CaHierarchy;
use cardpipe_pki::lds::{self, DataGroup};
use cardpipe_pki::pkix::{AT_SERIAL_NUMBER, PublicKey, verify_certificate_signature};
use cardpipe_pki::sod::verify_sod;
use der::Decode;
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Why a card failed QC (the reason code stored and exported as a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// No card for the application in the output tray (lost, or the process restarted).
    CardNotFound,
    /// The card stopped answering or answered garbage.
    CardUnreadable,
    /// The chip serial read differs from the one recorded.
    ChipSerialMismatch,
    /// The card body serial differs from the one recorded.
    BlankSerialMismatch,
    /// A file is missing or empty.
    MissingFile,
    /// The chip still accepts personalization.
    CardUnlocked,
    /// A PIN is not in its transport state.
    PinsNotInTransportState,
    /// A data group does not hash to its EF.SOD entry.
    DgHashMismatch,
    /// EF.SOD's signature or its Document Signer is not trusted.
    SodSignatureInvalid,
    /// A citizen certificate is not issued by the issuing CA for this application.
    CertificateChainInvalid,
    /// A certificate's key is not the key on the chip.
    KeyNotOnChip,
}

impl Reason {
    /// Every reason, for metrics and reports.
    pub const ALL: [Reason; 11] = [
        Reason::CardNotFound,
        Reason::CardUnreadable,
        Reason::ChipSerialMismatch,
        Reason::BlankSerialMismatch,
        Reason::MissingFile,
        Reason::CardUnlocked,
        Reason::PinsNotInTransportState,
        Reason::DgHashMismatch,
        Reason::SodSignatureInvalid,
        Reason::CertificateChainInvalid,
        Reason::KeyNotOnChip,
    ];

    /// The stored code.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::CardNotFound => "card_not_found",
            Reason::CardUnreadable => "card_unreadable",
            Reason::ChipSerialMismatch => "chip_serial_mismatch",
            Reason::BlankSerialMismatch => "blank_serial_mismatch",
            Reason::MissingFile => "missing_file",
            Reason::CardUnlocked => "card_unlocked",
            Reason::PinsNotInTransportState => "pins_not_in_transport_state",
            Reason::DgHashMismatch => "dg_hash_mismatch",
            Reason::SodSignatureInvalid => "sod_signature_invalid",
            Reason::CertificateChainInvalid => "certificate_chain_invalid",
            Reason::KeyNotOnChip => "key_not_on_chip",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// Check name (`dg_hashes`, ...).
    pub name: String,
    /// Passed?
    pub passed: bool,
    /// The failure's reason code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// What was found (technical; no card content).
    pub detail: String,
    /// Time the check took, µs.
    pub micros: u64,
}

/// What QC expects of the card.
#[derive(Debug, Clone, Copy)]
pub struct Expectations<'a> {
    /// Chip serial recorded at personalization (hex).
    pub chip_serial: Option<&'a str>,
    /// The authentication certificate issued for the application (DER).
    pub auth_cert: &'a [u8],
    /// The signature certificate issued for the application (DER).
    pub sign_cert: &'a [u8],
    /// The CA hierarchy (root for the Document Signer, issuing CA for citizen certificates).
    pub hierarchy: &'a CaHierarchy,
    /// Transport ID PIN.
    pub id_pin: &'a [u8],
    /// Transport signature PIN.
    pub sign_pin: &'a [u8],
}

/// Retry counters of a card in its transport state (the cardpipe eID profile: ID PIN 3,
/// signature PIN 3, PUK 10).
pub const TRANSPORT_TRIES: [(u8, &str, u8); 3] = [
    (PIN_ID, "ID PIN", 3),
    (PIN_SIGN, "signature PIN", 3),
    (PUK, "PUK", 10),
];

/// The result of one inspection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inspection {
    /// The chip serial read (hex), if the chip answered.
    pub chip_serial: Option<String>,
    /// Every check, in order.
    pub checks: Vec<CheckResult>,
}

impl Inspection {
    /// The first failure's reason, `None` when the card passed.
    pub fn verdict(&self) -> Option<Reason> {
        self.checks
            .iter()
            .find(|c| !c.passed)
            .and_then(|c| c.reason)
    }

    /// The first failed check.
    pub fn first_failure(&self) -> Option<&CheckResult> {
        self.checks.iter().find(|c| !c.passed)
    }
}

struct Recorder {
    checks: Vec<CheckResult>,
}

impl Recorder {
    fn run(
        &mut self,
        name: &str,
        reason: Reason,
        f: impl FnOnce() -> Result<String, String>,
    ) -> bool {
        let started = Instant::now();
        let outcome = f();
        let micros = started.elapsed().as_micros() as u64;
        let passed = outcome.is_ok();
        self.checks.push(CheckResult {
            name: name.to_owned(),
            passed,
            reason: (!passed).then_some(reason),
            detail: match outcome {
                Ok(d) | Err(d) => d,
            },
            micros,
        });
        passed
    }
}

fn status(
    r: &Result<cardpipe_card::apdu::Response, cardpipe_card::reader::ReaderError>,
) -> Result<u16, String> {
    match r {
        Ok(resp) => Ok(resp.sw),
        Err(e) => Err(format!("reader: {e}")),
    }
}

fn select(ch: &mut dyn CardChannel, aid: &[u8]) -> Result<(), String> {
    let r = ch.send(&Command::new(0x00, 0xA4, 0x04, 0x0C).with_data(aid.to_vec()));
    match status(&r)? {
        sw::OK => Ok(()),
        other => Err(format!("SELECT application returned {other:04X}")),
    }
}

fn read(ch: &mut dyn CardChannel, aid: &[u8], fid: u16) -> Result<Vec<u8>, String> {
    script::read_file(ch, aid, fid).map_err(|e| match e {
        PersoError::Status { step, sw } => format!("{step} returned {sw:04X}"),
        other => other.to_string(),
    })
}

/// Files read back.
#[derive(Default)]
struct Files {
    ef_com: Vec<u8>,
    dg1: Vec<u8>,
    dg2: Vec<u8>,
    dg3: Vec<u8>,
    dg11: Vec<u8>,
    sod: Vec<u8>,
    auth_cert: Vec<u8>,
    sign_cert: Vec<u8>,
}

fn subject_public_key(cert_der: &[u8]) -> Result<PublicKey, String> {
    let cert = x509_cert::Certificate::from_der(cert_der)
        .map_err(|e| format!("certificate does not parse: {e}"))?;
    PublicKey::from_spki(&cert.tbs_certificate.subject_public_key_info)
        .map_err(|e| format!("certificate key: {e}"))
}

fn subject_serial_number(cert_der: &[u8]) -> Result<Vec<u8>, String> {
    let cert = x509_cert::Certificate::from_der(cert_der)
        .map_err(|e| format!("certificate does not parse: {e}"))?;
    cert.tbs_certificate
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|atv| atv.oid == AT_SERIAL_NUMBER)
        .map(|atv| atv.value.value().to_vec())
        .ok_or_else(|| "certificate subject has no serialNumber".to_owned())
}

/// Inspects the card in `ch` against `exp`. Reader failures become failed checks
/// (`card_unreadable`), never errors: a card QC cannot read is a card QC refuses.
pub fn inspect(ch: &mut dyn CardChannel, exp: &Expectations<'_>) -> Inspection {
    let mut rec = Recorder { checks: Vec::new() };
    let mut chip_serial = None;

    // 1. Chip serial.
    rec.run("chip_serial", Reason::ChipSerialMismatch, || {
        let serial = script::read_chip_serial(ch).map_err(|e| format!("GET DATA CPLC: {e}"))?;
        let hex = serial.to_hex();
        chip_serial = Some(hex.clone());
        match exp.chip_serial {
            Some(want) if want.eq_ignore_ascii_case(&hex) => Ok(format!("chip {hex} as recorded")),
            Some(want) => Err(format!("chip {hex} but {want} recorded")),
            None => Err(format!("chip {hex} but no chip serial recorded")),
        }
    });
    if chip_serial.is_none() {
        // Not even CPLC answered: the card is unreadable; nothing else can be checked.
        if let Some(last) = rec.checks.last_mut() {
            last.reason = Some(Reason::CardUnreadable);
        }
        return Inspection {
            chip_serial,
            checks: rec.checks,
        };
    }

    // 2. Files present.
    let mut files = Files::default();
    rec.run("files_present", Reason::MissingFile, || {
        let mut missing = Vec::new();
        for (name, aid, fid, slot) in [
            ("EF.COM", &LDS_AID[..], EF_COM, &mut files.ef_com),
            ("DG1", &LDS_AID[..], EF_DG1, &mut files.dg1),
            ("DG2", &LDS_AID[..], EF_DG2, &mut files.dg2),
            ("DG11", &LDS_AID[..], EF_DG11, &mut files.dg11),
            ("EF.SOD", &LDS_AID[..], EF_SOD, &mut files.sod),
            ("C001", &EID_AID[..], EF_CERT_AUTH, &mut files.auth_cert),
            ("C002", &EID_AID[..], EF_CERT_SIGN, &mut files.sign_cert),
        ] {
            match read(ch, aid, fid) {
                Ok(data) if !data.is_empty() => *slot = data,
                Ok(_) => missing.push(format!("{name} empty")),
                Err(e) => missing.push(format!("{name}: {e}")),
            }
        }
        if missing.is_empty() {
            Ok("EF.COM, DG1, DG2, DG11, EF.SOD, C001, C002 read".into())
        } else {
            Err(missing.join("; "))
        }
    });

    // 3. Locked.
    rec.run("locked", Reason::CardUnlocked, || {
        let challenge: [u8; 8] = rand::random();
        let r = ch.send(
            &Command::new(0x80, 0x50, 0x00, 0x00)
                .with_data(challenge.to_vec())
                .with_le(256),
        );
        match status(&r)? {
            sw::CONDITIONS_NOT_SATISFIED => {
                Ok("INITIALIZE UPDATE refused (6985): operational".into())
            }
            other => Err(format!(
                "INITIALIZE UPDATE answered {other:04X}: chip still accepts personalization"
            )),
        }
    });

    // 4. PINs in transport state.
    rec.run("pins_transport", Reason::PinsNotInTransportState, || {
        select(ch, &EID_AID)?;
        let mut problems = Vec::new();
        for (reference, name, full) in TRANSPORT_TRIES {
            let s = status(&ch.send(&Command::new(0x00, 0x20, 0x00, reference)))?;
            if s != sw::verify_failed(full) {
                problems.push(format!(
                    "{name} counter answered {s:04X}, want {:04X}",
                    sw::verify_failed(full)
                ));
            }
        }
        if problems.is_empty() {
            for (reference, name, pin) in [
                (PIN_ID, "ID PIN", exp.id_pin),
                (PIN_SIGN, "signature PIN", exp.sign_pin),
            ] {
                let s = status(
                    &ch.send(&Command::new(0x00, 0x20, 0x00, reference).with_data(pin.to_vec())),
                )?;
                if s != sw::OK {
                    problems.push(format!(
                        "{name} does not verify with its transport value ({s:04X})"
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok("counters full; transport PINs verify".into())
        } else {
            Err(problems.join("; "))
        }
    });

    // 5. DG3 after the ID PIN.
    rec.run("dg3_readable", Reason::MissingFile, || {
        match read(ch, &LDS_AID, EF_DG3) {
            Ok(d) if !d.is_empty() => {
                files.dg3 = d;
                Ok("DG3 read after ID PIN".into())
            }
            Ok(_) => Err("DG3 empty".into()),
            Err(e) => Err(format!("DG3: {e}")),
        }
    });

    // 6 + 7. EF.SOD: hashes, then signature and Document Signer chain.
    let groups: [(DataGroup, &[u8]); 4] = [
        (DataGroup::Dg1, &files.dg1),
        (DataGroup::Dg2, &files.dg2),
        (DataGroup::Dg3, &files.dg3),
        (DataGroup::Dg11, &files.dg11),
    ];
    let sod_result = verify_sod(&files.sod, &groups, Some(&exp.hierarchy.root.certificate));
    let (hash_ok, sig_result): (Result<String, String>, Result<String, String>) = match &sod_result
    {
        Ok(v) => (
            Ok(format!("{} data groups match EF.SOD", v.data_groups.len())),
            Ok("CMS signature and Document Signer chain verify".into()),
        ),
        Err(e) => {
            let text = e.to_string();
            if text.contains("hash mismatch")
                || text.contains("not covered")
                || text.contains("not supplied")
            {
                (
                    Err(text),
                    Err("not checked: data groups do not match".into()),
                )
            } else {
                // The hashes themselves: recompute against the LDSSecurityObject is what
                // verify_sod does first, so reaching any other error means they matched.
                (Ok("data groups match EF.SOD".into()), Err(text))
            }
        }
    };
    let hashes_passed = rec.run("dg_hashes", Reason::DgHashMismatch, || hash_ok);
    if hashes_passed {
        rec.run("sod_signature", Reason::SodSignatureInvalid, || sig_result);
    }

    // EF.COM must list the four data groups (an altered EF.COM is a data fault too).
    rec.run("ef_com", Reason::DgHashMismatch, || {
        let com = lds::decode_ef_com(&files.ef_com).map_err(|e| format!("EF.COM: {e}"))?;
        if com.data_groups == DataGroup::ALL {
            Ok("EF.COM lists DG1, DG2, DG3, DG11".into())
        } else {
            Err("EF.COM does not list DG1, DG2, DG3 and DG11".into())
        }
    });

    // 8. Citizen certificate chains.
    rec.run(
        "certificate_chains",
        Reason::CertificateChainInvalid,
        || {
            let national_code = lds::decode_dg1(&files.dg1)
                .map(|p| p.national_code)
                .map_err(|e| format!("DG1 does not decode: {e}"))?;
            for (name, on_chip, issued) in [
                ("C001", &files.auth_cert, exp.auth_cert),
                ("C002", &files.sign_cert, exp.sign_cert),
            ] {
                verify_certificate_signature(on_chip, &exp.hierarchy.issuing.certificate)
                    .map_err(|e| format!("{name}: {e}"))?;
                if subject_serial_number(on_chip)? != national_code.as_bytes() {
                    return Err(format!("{name}: subject serialNumber does not match DG1"));
                }
                if on_chip.as_slice() != issued {
                    return Err(format!(
                        "{name}: not the certificate issued for this application"
                    ));
                }
            }
            Ok("C001 and C002 issued by the issuing CA for this application".into())
        },
    );

    // 9. Keys on chip: fresh challenges.
    rec.run("auth_key_on_chip", Reason::KeyNotOnChip, || {
        let key = subject_public_key(&files.auth_cert)?;
        let challenge: [u8; 32] = rand::random();
        let sig = script::internal_authenticate(ch, &challenge)
            .map_err(|e| format!("INTERNAL AUTHENTICATE: {e}"))?;
        if script::verify_internal_authenticate(key.as_sec1(), &challenge, &sig) {
            Ok("INTERNAL AUTHENTICATE over a fresh challenge verifies under C001".into())
        } else {
            Err("key 01 signature does not verify under the C001 key".into())
        }
    });
    rec.run("sign_key_on_chip", Reason::KeyNotOnChip, || {
        let key = subject_public_key(&files.sign_cert)?;
        select(ch, &EID_AID)?;
        let s = status(
            &ch.send(&Command::new(0x00, 0x20, 0x00, PIN_SIGN).with_data(exp.sign_pin.to_vec())),
        )?;
        if s != sw::OK {
            return Err(format!("signature PIN refused ({s:04X})"));
        }
        let nonce: [u8; 32] = rand::random();
        let digest: [u8; 32] = Sha256::digest(nonce).into();
        let r = ch
            .send(
                &Command::new(0x00, 0x2A, 0x9E, 0x9A)
                    .with_data(digest.to_vec())
                    .with_le(256),
            )
            .map_err(|e| format!("reader: {e}"))?;
        if r.sw != sw::OK {
            return Err(format!(
                "PSO COMPUTE DIGITAL SIGNATURE returned {:04X}",
                r.sw
            ));
        }
        let vk = VerifyingKey::from_sec1_bytes(key.as_sec1())
            .map_err(|_| "C002 key is not P-256".to_owned())?;
        let sig =
            Signature::from_slice(&r.data).map_err(|_| "signature is not r ‖ s".to_owned())?;
        vk.verify_prehash(&digest, &sig)
            .map(|_| "PSO signature over a fresh challenge verifies under C002".to_owned())
            .map_err(|_| "key 02 signature does not verify under the C002 key".to_owned())
    });
    Inspection {
        chip_serial,
        checks: rec.checks,
    }
}
