//! The personalization script and the outside read-back.
//!
//! [`personalize`] turns a blank chip into an issued card over any [`CardChannel`]:
//! 1. GET DATA `9F7F` (plain) for the chip serial,
//! 2. SCP03 with the card's static keys diversified from the master keys and that serial
//!    (C-MAC + C-DEC + R-MAC; the card must echo the same serial as its KDD),
//! 3. every LDS file (EF.COM, DG1, DG2, DG3, DG11, EF.SOD), then the certificates C001/C002,
//! 4. both private keys (PUT DATA under C-DEC; the card's answer, the public key, must match
//!    the one derived from the scalar, which the image has already checked against the
//!    certificate),
//! 5. transport PINs (ID PIN, signature PIN, PUK) and the fingerprint reference,
//! 6. SET STATUS: lock into the operational state.
//!
//! [`personalize_generating_keys`] is the same card with its keys born on the chip
//! (`[keys] generation = "on_card"`): inside the secure channel the chip generates both key
//! pairs (GENERATE ASYMMETRIC KEY PAIR), the transport PINs are set, and the chip proves
//! possession of each new key by signing the [`Certifier`]'s challenge (INTERNAL
//! AUTHENTICATE with key 01; VERIFY signature PIN + PSO COMPUTE DIGITAL SIGNATURE with key
//! 02). The certification request then runs beside the card — on its own thread, while the
//! LDS files and the fingerprint reference are written — so a slow CA costs the encoder
//! only what exceeds that writing time; the certificates are written last, then the lock.
//!
//! [`read_back`] is what any outside PC/SC client can do afterwards: plain SELECT / READ
//! BINARY of EF.COM, DG1, DG2, DG11 and EF.SOD, plus the chip serial. [`internal_authenticate`]
//! asks the chip to sign a challenge with key 01 so QC can verify it against the certificate
//! ([`verify_internal_authenticate`]).

use std::fmt;
use std::time::{Duration, Instant};

use cardpipe_pki::citizen::CardKeyRole;
use cardpipe_pki::issue::ChipKeyProof;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use sha2::Digest;
use zeroize::Zeroizing;

use crate::apdu::{Command, Response, sw};
use crate::card_os::profile::*;
use crate::cplc::{self, ChipSerial};
use crate::reader::{CardChannel, ReaderError};
use crate::scp03::{HostHandshake, HostSession, MasterKeys, Scp03Error, SecurityLevel};

/// Everything written to one card. Produced by the keys stage's personalization package.
#[derive(Clone)]
pub struct CardImage {
    /// EF.COM.
    pub ef_com: Vec<u8>,
    /// DG1 (demographics TLV).
    pub dg1: Vec<u8>,
    /// DG2 (face JPEG).
    pub dg2: Vec<u8>,
    /// DG3 (fingerprint templates).
    pub dg3: Vec<u8>,
    /// DG11 (postal code, address).
    pub dg11: Vec<u8>,
    /// EF.SOD (CMS SignedData).
    pub sod: Vec<u8>,
    /// Off-card key generation: the two private keys to import and their certificates.
    /// `None`: the chip generates both key pairs ([`personalize_generating_keys`]).
    pub imported: Option<ImportedKeys>,
    /// Transport ID PIN (81).
    pub id_pin: Zeroizing<Vec<u8>>,
    /// Transport signature PIN (82).
    pub sign_pin: Zeroizing<Vec<u8>>,
    /// PUK (83).
    pub puk: Zeroizing<Vec<u8>>,
    /// Fingerprint reference for match-on-card (ISO/IEC 19794-2 record).
    pub fingerprint_reference: Zeroizing<Vec<u8>>,
}

/// Keys generated off the card, imported into it with their certificates.
#[derive(Clone)]
pub struct ImportedKeys {
    /// Authentication key (01): P-256 private scalar, big-endian.
    pub auth_key: Zeroizing<[u8; 32]>,
    /// Signature key (02): P-256 private scalar, big-endian.
    pub sign_key: Zeroizing<[u8; 32]>,
    /// DER X.509 certificate of the authentication key (EF C001).
    pub auth_cert: Vec<u8>,
    /// DER X.509 certificate of the signature key (EF C002).
    pub sign_cert: Vec<u8>,
}

impl fmt::Debug for ImportedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ImportedKeys(certs {}+{} B, keys redacted)",
            self.auth_cert.len(),
            self.sign_cert.len()
        )
    }
}

impl fmt::Debug for CardImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CardImage(EF.COM {} B, DG1 {} B, DG2 {} B, DG3 {} B, DG11 {} B, SOD {} B, {}, PINs/fingerprint redacted)",
            self.ef_com.len(),
            self.dg1.len(),
            self.dg2.len(),
            self.dg3.len(),
            self.dg11.len(),
            self.sod.len(),
            match &self.imported {
                Some(k) => format!("{k:?}"),
                None => "keys generated on the card".to_owned(),
            }
        )
    }
}

/// Public key (SEC1 uncompressed) of a private scalar, or `None` if it is not a valid key.
pub fn public_key_of(scalar: &[u8; 32]) -> Option<Vec<u8>> {
    let key = SigningKey::from_slice(scalar).ok()?;
    Some(
        key.verifying_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec(),
    )
}

impl CardImage {
    /// The LDS files in writing order.
    pub fn lds_files(&self) -> [(u16, &[u8]); 6] {
        [
            (EF_COM, &self.ef_com),
            (EF_DG1, &self.dg1),
            (EF_DG2, &self.dg2),
            (EF_DG3, &self.dg3),
            (EF_DG11, &self.dg11),
            (EF_SOD, &self.sod),
        ]
    }

    /// Checks the image before a blank is spent on it: sizes, PIN lengths, the fingerprint
    /// reference and, for imported keys, valid key scalars with each certificate carrying its
    /// key's public point. Returns the imported keys' public keys (authentication,
    /// signature), SEC1 uncompressed.
    pub fn validate(&self) -> Result<Option<[Vec<u8>; 2]>, PersoError> {
        for (fid, data) in self.lds_files() {
            if data.is_empty() || data.len() > MAX_EF_SIZE {
                return Err(PersoError::Image(format!(
                    "EF {fid:04X} has {} bytes",
                    data.len()
                )));
            }
        }
        for (name, pin) in [
            ("ID PIN", &self.id_pin),
            ("signature PIN", &self.sign_pin),
            ("PUK", &self.puk),
        ] {
            if !crate::card_os::pin::PIN_LEN.contains(&pin.len()) {
                return Err(PersoError::Image(format!("{name} length out of range")));
            }
        }
        if crate::card_os::bio::parse_iso19794_2(&self.fingerprint_reference).is_none() {
            return Err(PersoError::Image(
                "fingerprint reference is not an ISO/IEC 19794-2 record".into(),
            ));
        }
        let Some(keys) = &self.imported else {
            return Ok(None);
        };
        let mut publics = [Vec::new(), Vec::new()];
        for (i, (name, key, cert)) in [
            ("authentication", &keys.auth_key, &keys.auth_cert),
            ("signature", &keys.sign_key, &keys.sign_cert),
        ]
        .into_iter()
        .enumerate()
        {
            let public = public_key_of(key)
                .ok_or_else(|| PersoError::Image(format!("{name} key is not a P-256 scalar")))?;
            if !carries(cert, &public) {
                return Err(PersoError::Image(format!(
                    "{name} certificate does not carry the {name} key"
                )));
            }
            publics[i] = public;
        }
        Ok(Some(publics))
    }
}

/// Whether a DER certificate contains this public point (its subjectPublicKeyInfo does).
fn carries(cert: &[u8], public: &[u8]) -> bool {
    !public.is_empty() && cert.windows(public.len()).any(|w| w == public)
}

/// Why personalization or read-back failed.
#[derive(Debug, thiserror::Error)]
pub enum PersoError {
    /// The encoder or the card in it failed (removed, unresponsive, reader gone).
    #[error(transparent)]
    Reader(#[from] ReaderError),
    /// The card refused a step.
    #[error("{step}: card returned {sw:04X}")]
    Status {
        /// The script step.
        step: &'static str,
        /// The status word.
        sw: u16,
    },
    /// The secure channel could not be opened or a response MAC failed.
    #[error("secure channel: {0}")]
    Scp03(#[from] Scp03Error),
    /// GET DATA returned no valid CPLC.
    #[error("GET DATA 9F7F returned no valid CPLC")]
    BadCplc,
    /// The card answered an imported key with a different public key.
    #[error("key {0:02X} on the card does not match the image")]
    KeyMismatch(u8),
    /// The card image is unusable (no blank was touched).
    #[error("card image: {0}")]
    Image(String),
    /// The certification of keys generated on the chip failed at the CA (not the card's
    /// fault: the job is retried; the half-written blank is spoiled).
    #[error("certification: {0}")]
    Certification(String),
    /// The chip's proof of possession of a key it generated did not verify, or the CA's
    /// certificate does not carry that key (the card is at fault).
    #[error("key {0:02X}: {1}")]
    Possession(u8, String),
}

impl PersoError {
    /// Whether the blank in the encoder is spoiled by this failure (so the application goes
    /// to a fresh blank), as opposed to a reader or image problem.
    pub fn spoils_blank(&self) -> bool {
        match self {
            PersoError::Reader(e) => e.is_card_fault(),
            PersoError::Image(_) | PersoError::Certification(_) => false,
            _ => true,
        }
    }
}

/// Tunables of the script.
#[derive(Debug, Clone)]
pub struct ScriptOptions {
    /// Security level of the personalization session.
    pub level: SecurityLevel,
    /// Bytes of file data per UPDATE BINARY.
    pub chunk: usize,
    /// Use extended length APDUs (bigger chunks, fewer round trips).
    pub extended: bool,
    /// Send each chunk as a command chain of links of at most this many bytes (for readers
    /// without extended length); `None` sends each chunk in one APDU.
    pub chain_link: Option<usize>,
}

impl Default for ScriptOptions {
    fn default() -> Self {
        Self {
            level: SecurityLevel::C_DEC_C_MAC_R_MAC,
            chunk: 224,
            extended: false,
            chain_link: None,
        }
    }
}

impl ScriptOptions {
    /// Command chaining: 1 KiB chunks sent as chains of 224-byte links (short APDUs only).
    pub fn chained() -> Self {
        Self {
            chunk: 1024,
            chain_link: Some(224),
            ..Self::default()
        }
    }

    /// Extended length with 4 KiB chunks (pcscd + vpcd and the in-process card handle it).
    pub fn extended() -> Self {
        Self {
            chunk: 4096,
            extended: true,
            ..Self::default()
        }
    }
}

/// What the personalization of one card produced.
#[derive(Debug, Clone)]
pub struct PersoRecord {
    /// The chip serial (from CPLC, confirmed by the SCP03 KDD).
    pub chip_serial: ChipSerial,
    /// The encoder that wrote it.
    pub reader: String,
    /// Wall time of the whole script.
    pub elapsed: Duration,
    /// Time until the secure channel was open.
    pub channel_open: Duration,
    /// Command APDUs sent.
    pub apdus: u32,
    /// File bytes written.
    pub bytes_written: usize,
    /// Public key of key 01 as the card reported it (SEC1 uncompressed).
    pub auth_public_key: Vec<u8>,
    /// Public key of key 02 as the card reported it.
    pub sign_public_key: Vec<u8>,
    /// Keys generated on the chip: the certificates written to it (DER: C001, C002).
    pub certificates: Option<[Vec<u8>; 2]>,
}

fn expect_ok(step: &'static str, r: Response) -> Result<Response, PersoError> {
    if r.sw == sw::OK {
        Ok(r)
    } else {
        Err(PersoError::Status { step, sw: r.sw })
    }
}

/// Reads the chip serial with a plain GET DATA `80 CA 9F 7F 00`.
pub fn read_chip_serial(ch: &mut dyn CardChannel) -> Result<ChipSerial, PersoError> {
    let r = expect_ok(
        "GET DATA CPLC",
        ch.send(&Command::new(0x80, 0xCA, 0x9F, 0x7F).with_le(256))?,
    )?;
    cplc::parse(&r.data).ok_or(PersoError::BadCplc)
}

/// An open SCP03 session over a channel, counting APDUs.
#[derive(Debug)]
pub struct SecureChannel {
    session: HostSession,
    serial: ChipSerial,
    apdus: u32,
}

impl SecureChannel {
    /// Reads the serial, diversifies the card keys from `master` and authenticates.
    pub fn open(
        ch: &mut dyn CardChannel,
        master: &MasterKeys,
        level: SecurityLevel,
    ) -> Result<Self, PersoError> {
        let serial = read_chip_serial(ch)?;
        let keys = master.diversify(&serial);
        let hs = HostHandshake::new(keys, rand::random(), level);
        let resp = ch.send(&hs.initialize_update())?;
        let (session, ext) = hs.complete(&resp, Some(&serial)).map_err(|e| match e {
            Scp03Error::Status(sw) => PersoError::Status {
                step: "INITIALIZE UPDATE",
                sw,
            },
            other => PersoError::Scp03(other),
        })?;
        expect_ok("EXTERNAL AUTHENTICATE", ch.send(&ext)?)?;
        Ok(Self {
            session,
            serial,
            apdus: 3,
        })
    }

    /// The chip serial the channel was opened with.
    pub fn serial(&self) -> ChipSerial {
        self.serial
    }

    /// APDUs sent including the handshake.
    pub fn apdus(&self) -> u32 {
        self.apdus
    }

    /// Wraps, sends and unwraps one command; a non-9000 status is returned, not an error.
    pub fn send(
        &mut self,
        ch: &mut dyn CardChannel,
        cmd: &Command,
    ) -> Result<Response, PersoError> {
        let wrapped = self.session.wrap(cmd)?;
        self.apdus += 1;
        let resp = ch.send(&wrapped)?;
        Ok(self.session.unwrap(resp)?)
    }

    /// Sends and requires 9000.
    pub fn send_ok(
        &mut self,
        ch: &mut dyn CardChannel,
        step: &'static str,
        cmd: &Command,
    ) -> Result<Response, PersoError> {
        let r = self.send(ch, cmd)?;
        expect_ok(step, r)
    }

    /// Writes a whole EF in chunks (UPDATE BINARY D6, or D7 with offset DO `54` beyond
    /// offset 32767).
    pub fn write_file(
        &mut self,
        ch: &mut dyn CardChannel,
        fid: u16,
        data: &[u8],
        opts: &ScriptOptions,
    ) -> Result<(), PersoError> {
        self.send_ok(
            ch,
            "SELECT EF",
            &Command::new(0x00, 0xA4, 0x02, 0x0C).with_data(fid.to_be_bytes().to_vec()),
        )?;
        let mut offset = 0usize;
        while offset < data.len() {
            let end = (offset + opts.chunk.max(1)).min(data.len());
            let part = &data[offset..end];
            let mut cmd = if offset <= 0x7FFF {
                let [p1, p2] = (offset as u16).to_be_bytes();
                Command::new(0x00, 0xD6, p1, p2).with_data(part.to_vec())
            } else {
                let mut d = vec![
                    0x54,
                    0x03,
                    (offset >> 16) as u8,
                    (offset >> 8) as u8,
                    offset as u8,
                ];
                d.extend_from_slice(&crate::card_os::wrap_tlv(0x53, part));
                Command::new(0x00, 0xD7, 0x00, 0x00).with_data(d)
            };
            cmd.extended = opts.extended && part.len() > 200;
            match opts.chain_link {
                Some(link) if cmd.data.len() > link => {
                    let data = std::mem::take(&mut cmd.data);
                    let links: Vec<&[u8]> = data.chunks(link.max(1)).collect();
                    for (i, piece) in links.iter().enumerate() {
                        let mut l = Command::new(cmd.cla, cmd.ins, cmd.p1, cmd.p2)
                            .with_data(piece.to_vec());
                        if i + 1 < links.len() {
                            l.cla |= 0x10;
                        }
                        self.send_ok(ch, "UPDATE BINARY (chained)", &l)?;
                    }
                }
                _ => {
                    self.send_ok(ch, "UPDATE BINARY", &cmd)?;
                }
            }
            offset = end;
        }
        Ok(())
    }
}

/// Personalizes the blank in `ch` with `image` (whose keys were generated off the card and
/// are imported) and locks it.
pub fn personalize(
    ch: &mut dyn CardChannel,
    image: &CardImage,
    master: &MasterKeys,
    opts: &ScriptOptions,
) -> Result<PersoRecord, PersoError> {
    let expected = image.validate()?.ok_or_else(|| {
        PersoError::Image("no keys to import (the chip generates them: use a Certifier)".into())
    })?;
    let keys = image.imported.as_ref().expect("validated");
    let started = Instant::now();
    let mut sc = SecureChannel::open(ch, master, opts.level)?;
    let channel_open = started.elapsed();
    let mut bytes_written = write_lds(&mut sc, ch, image, opts)?;
    select_eid(&mut sc, ch)?;
    for (fid, data) in [
        (EF_CERT_AUTH, &keys.auth_cert),
        (EF_CERT_SIGN, &keys.sign_cert),
    ] {
        sc.write_file(ch, fid, data, opts)?;
        bytes_written += data.len();
    }
    let imports = [(KEY_AUTH, &keys.auth_key), (KEY_SIGN, &keys.sign_key)];
    for ((key_ref, scalar), public) in imports.into_iter().zip(&expected) {
        let cmd = Command::new(0x80, 0xDA, 0x00, key_ref)
            .with_data(scalar.to_vec())
            .with_le(256);
        let r = sc.send_ok(ch, "PUT DATA private key", &cmd)?;
        if &r.data != public {
            return Err(PersoError::KeyMismatch(key_ref));
        }
    }
    set_transport_pins(&mut sc, ch, image)?;
    put_fingerprint(&mut sc, ch, image)?;
    lock(&mut sc, ch)?;

    let [auth_public_key, sign_public_key] = expected;
    Ok(PersoRecord {
        chip_serial: sc.serial(),
        reader: ch.reader_name().to_string(),
        elapsed: started.elapsed(),
        channel_open,
        apdus: sc.apdus(),
        bytes_written,
        auth_public_key,
        sign_public_key,
        certificates: None,
    })
}

/// The CA as the personalization script sees it when the chip generates its keys.
pub trait Certifier: Sync {
    /// The challenge the chip must sign with the key it just generated for `role` (public
    /// key `public_key`, SEC1 uncompressed) to prove it holds the private key.
    fn challenge(&self, role: CardKeyRole, public_key: &[u8]) -> Vec<u8>;

    /// Checks both proofs (authentication, signature) and issues the two certificates (DER,
    /// same order). Runs on its own thread while the script goes on writing the card; an
    /// error is the CA's ([`PersoError::Certification`]) unless a proof failed
    /// ([`CertifyError::Possession`]).
    fn certify(
        &self,
        chip_serial: ChipSerial,
        proofs: [ChipKeyProof; 2],
    ) -> Result<[Vec<u8>; 2], CertifyError>;
}

/// Why a [`Certifier`] issued nothing.
#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    /// A proof of possession did not verify: the chip is at fault (key reference, why).
    #[error("key {0:02X}: {1}")]
    Possession(u8, String),
    /// The CA (keystore, HSM, database) failed.
    #[error("{0}")]
    Ca(String),
}

impl From<cardpipe_pki::KeysError> for CertifyError {
    fn from(e: cardpipe_pki::KeysError) -> Self {
        match e {
            cardpipe_pki::KeysError::Possession { role, reason } => {
                CertifyError::Possession(role.key_reference(), reason.to_owned())
            }
            other => CertifyError::Ca(other.to_string()),
        }
    }
}

/// Personalizes the blank in `ch` with the keys born on the chip: GENERATE both key pairs,
/// set the transport PINs, prove possession of each key to `certifier`, write the LDS and
/// the fingerprint reference while the certification runs, then the certificates, then
/// lock. `image.imported` must be `None`. No private key crosses the card's interface.
pub fn personalize_generating_keys(
    ch: &mut dyn CardChannel,
    image: &CardImage,
    certifier: &dyn Certifier,
    master: &MasterKeys,
    opts: &ScriptOptions,
) -> Result<PersoRecord, PersoError> {
    if image.validate()?.is_some() {
        return Err(PersoError::Image(
            "the image carries imported keys: the chip generates them in this mode".into(),
        ));
    }
    let started = Instant::now();
    let mut sc = SecureChannel::open(ch, master, opts.level)?;
    let channel_open = started.elapsed();
    select_eid(&mut sc, ch)?;
    let mut publics = [Vec::new(), Vec::new()];
    for (slot, key_ref) in [KEY_AUTH, KEY_SIGN].into_iter().enumerate() {
        let r = sc.send_ok(
            ch,
            "GENERATE ASYMMETRIC KEY PAIR",
            &Command::new(0x00, 0x46, 0x80, key_ref).with_le(256),
        )?;
        let point = crate::card_os::parse_public_key_do(&r.data)
            .filter(|p| VerifyingKey::from_sec1_bytes(p).is_ok())
            .ok_or(PersoError::Possession(
                key_ref,
                "the chip answered no valid P-256 public key".into(),
            ))?;
        publics[slot] = point.to_vec();
    }
    set_transport_pins(&mut sc, ch, image)?;

    // Proofs of possession, before anything is certified.
    let auth_challenge = certifier.challenge(CardKeyRole::Authentication, &publics[0]);
    let auth_signature = sc
        .send_ok(
            ch,
            "INTERNAL AUTHENTICATE (proof of possession)",
            &Command::new(0x00, 0x88, 0x00, KEY_AUTH)
                .with_data(auth_challenge.clone())
                .with_le(256),
        )?
        .data;
    let sign_challenge = certifier.challenge(CardKeyRole::Signature, &publics[1]);
    sc.send_ok(
        ch,
        "VERIFY signature PIN",
        &Command::new(0x00, 0x20, 0x00, PIN_SIGN).with_data(image.sign_pin.to_vec()),
    )?;
    let digest: [u8; 32] = sha2::Sha256::digest(&sign_challenge).into();
    let sign_signature = sc
        .send_ok(
            ch,
            "PSO COMPUTE DIGITAL SIGNATURE (proof of possession)",
            &Command::new(0x00, 0x2A, 0x9E, 0x9A)
                .with_data(digest.to_vec())
                .with_le(256),
        )?
        .data;
    let proofs = [
        ChipKeyProof {
            public_key: publics[0].clone(),
            challenge: auth_challenge,
            signature: auth_signature,
        },
        ChipKeyProof {
            public_key: publics[1].clone(),
            challenge: sign_challenge,
            signature: sign_signature,
        },
    ];
    let serial = sc.serial();

    // The CA works while the card is written.
    let (written, certified) = std::thread::scope(|scope| {
        let request = scope.spawn(move || certifier.certify(serial, proofs));
        let written = write_lds(&mut sc, ch, image, opts)
            .and_then(|n| put_fingerprint(&mut sc, ch, image).map(|()| n));
        let certified = request
            .join()
            .unwrap_or_else(|_| Err(CertifyError::Ca("the certification thread panicked".into())));
        (written, certified)
    });
    let mut bytes_written = written?;
    let certificates = certified.map_err(|e| match e {
        CertifyError::Possession(key_ref, why) => PersoError::Possession(key_ref, why),
        CertifyError::Ca(why) => PersoError::Certification(why),
    })?;
    for (cert, (key_ref, public)) in certificates
        .iter()
        .zip([KEY_AUTH, KEY_SIGN].iter().zip(&publics))
    {
        if !carries(cert, public) {
            return Err(PersoError::Possession(
                *key_ref,
                "the CA's certificate does not carry the key the chip generated".into(),
            ));
        }
    }
    select_eid(&mut sc, ch)?;
    for (fid, data) in [
        (EF_CERT_AUTH, &certificates[0]),
        (EF_CERT_SIGN, &certificates[1]),
    ] {
        sc.write_file(ch, fid, data, opts)?;
        bytes_written += data.len();
    }
    lock(&mut sc, ch)?;

    let [auth_public_key, sign_public_key] = publics;
    Ok(PersoRecord {
        chip_serial: sc.serial(),
        reader: ch.reader_name().to_string(),
        elapsed: started.elapsed(),
        channel_open,
        apdus: sc.apdus(),
        bytes_written,
        auth_public_key,
        sign_public_key,
        certificates: Some(certificates),
    })
}

fn select_eid(sc: &mut SecureChannel, ch: &mut dyn CardChannel) -> Result<(), PersoError> {
    sc.send_ok(
        ch,
        "SELECT eID",
        &Command::new(0x00, 0xA4, 0x04, 0x0C).with_data(EID_AID.to_vec()),
    )
    .map(drop)
}

/// SELECT LDS and every LDS file; returns the bytes written.
fn write_lds(
    sc: &mut SecureChannel,
    ch: &mut dyn CardChannel,
    image: &CardImage,
    opts: &ScriptOptions,
) -> Result<usize, PersoError> {
    sc.send_ok(
        ch,
        "SELECT LDS",
        &Command::new(0x00, 0xA4, 0x04, 0x0C).with_data(LDS_AID.to_vec()),
    )?;
    let mut bytes_written = 0;
    for (fid, data) in image.lds_files() {
        sc.write_file(ch, fid, data, opts)?;
        bytes_written += data.len();
    }
    Ok(bytes_written)
}

fn set_transport_pins(
    sc: &mut SecureChannel,
    ch: &mut dyn CardChannel,
    image: &CardImage,
) -> Result<(), PersoError> {
    for (pin_ref, value) in [
        (PIN_ID, &image.id_pin),
        (PIN_SIGN, &image.sign_pin),
        (PUK, &image.puk),
    ] {
        sc.send_ok(
            ch,
            "CHANGE REFERENCE DATA",
            &Command::new(0x00, 0x24, 0x01, pin_ref).with_data(value.to_vec()),
        )?;
    }
    Ok(())
}

fn put_fingerprint(
    sc: &mut SecureChannel,
    ch: &mut dyn CardChannel,
    image: &CardImage,
) -> Result<(), PersoError> {
    let fp =
        Command::new(0x80, 0xDA, 0x00, BIO_FINGER).with_data(image.fingerprint_reference.to_vec());
    sc.send_ok(ch, "PUT DATA fingerprint reference", &fp)
        .map(drop)
}

fn lock(sc: &mut SecureChannel, ch: &mut dyn CardChannel) -> Result<(), PersoError> {
    sc.send_ok(
        ch,
        "SET STATUS (lock)",
        &Command::new(0x80, 0xF0, 0x80, 0x0F),
    )
    .map(drop)
}

/// Reads one EF with plain SELECT / READ BINARY, as any PC/SC client can (256-byte short
/// reads; B1 with an offset DO beyond offset 32767).
pub fn read_file(ch: &mut dyn CardChannel, aid: &[u8], fid: u16) -> Result<Vec<u8>, PersoError> {
    expect_ok(
        "SELECT application",
        ch.send(&Command::new(0x00, 0xA4, 0x04, 0x0C).with_data(aid.to_vec()))?,
    )?;
    let fcp = expect_ok(
        "SELECT EF",
        ch.send(
            &Command::new(0x00, 0xA4, 0x02, 0x04)
                .with_data(fid.to_be_bytes().to_vec())
                .with_le(256),
        )?,
    )?;
    let size = match fcp.data.as_slice() {
        [0x62, _, 0x80, 0x02, a, b, ..] => usize::from(u16::from_be_bytes([*a, *b])),
        _ => {
            return Err(PersoError::Status {
                step: "SELECT EF (FCP)",
                sw: sw::UNKNOWN,
            });
        }
    };
    let mut out = Vec::with_capacity(size);
    while out.len() < size {
        let offset = out.len();
        let want = (size - offset).min(256);
        if offset <= 0x7FFF {
            let [p1, p2] = (offset as u16).to_be_bytes();
            let r = ch.send(&Command::new(0x00, 0xB0, p1, p2).with_le(want))?;
            if r.sw != sw::OK && r.sw != sw::END_OF_FILE {
                return Err(PersoError::Status {
                    step: "READ BINARY",
                    sw: r.sw,
                });
            }
            if r.data.is_empty() {
                break;
            }
            out.extend_from_slice(&r.data);
        } else {
            let d = vec![
                0x54,
                0x03,
                (offset >> 16) as u8,
                (offset >> 8) as u8,
                offset as u8,
            ];
            let r = expect_ok(
                "READ BINARY (odd)",
                ch.send(
                    &Command::new(0x00, 0xB1, 0, 0)
                        .with_data(d)
                        .with_le(want.min(252) + 4),
                )?,
            )?;
            let part = crate::card_os::parse_tlv(0x53, &r.data).ok_or(PersoError::Status {
                step: "READ BINARY (odd) TLV",
                sw: sw::UNKNOWN,
            })?;
            if part.is_empty() {
                break;
            }
            out.extend_from_slice(part);
        }
    }
    Ok(out)
}

/// The publicly readable content of an issued card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadBack {
    /// Chip serial from CPLC.
    pub chip_serial: ChipSerial,
    /// EF.COM.
    pub ef_com: Vec<u8>,
    /// DG1.
    pub dg1: Vec<u8>,
    /// DG2.
    pub dg2: Vec<u8>,
    /// DG11.
    pub dg11: Vec<u8>,
    /// EF.SOD.
    pub sod: Vec<u8>,
    /// Certificate C001.
    pub auth_cert: Vec<u8>,
}

impl ReadBack {
    /// Names of the files that differ from the image (empty when everything matches); C001
    /// only when the image carried it (keys imported).
    pub fn mismatches(&self, image: &CardImage) -> Vec<&'static str> {
        let mut out = Vec::new();
        for (name, got, want) in [
            ("EF.COM", &self.ef_com, &image.ef_com),
            ("DG1", &self.dg1, &image.dg1),
            ("DG2", &self.dg2, &image.dg2),
            ("DG11", &self.dg11, &image.dg11),
            ("EF.SOD", &self.sod, &image.sod),
        ] {
            if got != want {
                out.push(name);
            }
        }
        if let Some(keys) = &image.imported
            && self.auth_cert != keys.auth_cert
        {
            out.push("C001");
        }
        out
    }
}

/// Reads EF.COM, DG1, DG2, DG11, EF.SOD and C001 without a secure channel.
pub fn read_back(ch: &mut dyn CardChannel) -> Result<ReadBack, PersoError> {
    Ok(ReadBack {
        chip_serial: read_chip_serial(ch)?,
        ef_com: read_file(ch, &LDS_AID, EF_COM)?,
        dg1: read_file(ch, &LDS_AID, EF_DG1)?,
        dg2: read_file(ch, &LDS_AID, EF_DG2)?,
        dg11: read_file(ch, &LDS_AID, EF_DG11)?,
        sod: read_file(ch, &LDS_AID, EF_SOD)?,
        auth_cert: read_file(ch, &EID_AID, EF_CERT_AUTH)?,
    })
}

/// INTERNAL AUTHENTICATE with key 01: returns the 64-byte r ‖ s ECDSA signature of
/// SHA-256(challenge).
pub fn internal_authenticate(
    ch: &mut dyn CardChannel,
    challenge: &[u8],
) -> Result<Vec<u8>, PersoError> {
    expect_ok(
        "SELECT eID",
        ch.send(&Command::new(0x00, 0xA4, 0x04, 0x0C).with_data(EID_AID.to_vec()))?,
    )?;
    let r = ch.send(
        &Command::new(0x00, 0x88, 0x00, KEY_AUTH)
            .with_data(challenge.to_vec())
            .with_le(256),
    )?;
    Ok(expect_ok("INTERNAL AUTHENTICATE", r)?.data)
}

/// Verifies an INTERNAL AUTHENTICATE signature against a SEC1 public key (from the
/// certificate).
pub fn verify_internal_authenticate(public_key: &[u8], challenge: &[u8], signature: &[u8]) -> bool {
    let (Ok(vk), Ok(sig)) = (
        VerifyingKey::from_sec1_bytes(public_key),
        Signature::from_slice(signature),
    ) else {
        return false;
    };
    vk.verify(challenge, &sig).is_ok()
}

/// [`sample_image`] for a chip that generates its own keys (no keys, no certificates).
pub fn sample_image_without_keys(dg2_len: usize, seed: u8) -> CardImage {
    CardImage {
        imported: None,
        ..sample_image(dg2_len, seed)
    }
}

/// A complete synthetic card image for tests and benchmarks: realistic sizes (DG2 `dg2_len`
/// bytes of "JPEG", DG3 ten templates), fresh random keys and fake certificates that embed
/// the public keys.
pub fn sample_image(dg2_len: usize, seed: u8) -> CardImage {
    let key = || loop {
        let k: [u8; 32] = rand::random();
        if public_key_of(&k).is_some() {
            return Zeroizing::new(k);
        }
    };
    let (auth_key, sign_key) = (key(), key());
    let cert = |k: &[u8; 32], cn: &[u8]| {
        let mut c = vec![0x30, 0x82, 0x01, 0x00];
        c.extend_from_slice(cn);
        c.extend_from_slice(&public_key_of(k).expect("valid"));
        c.resize(600, 0xA5);
        c
    };
    let pattern = |len: usize, salt: u8| {
        (0..len)
            .map(|i| {
                (i as u8)
                    .wrapping_mul(31)
                    .wrapping_add(salt)
                    .wrapping_add(seed)
            })
            .collect::<Vec<u8>>()
    };
    let mut dg2 = vec![0x75, 0x82];
    dg2.extend_from_slice(&((dg2_len.max(8) - 4) as u16).to_be_bytes());
    dg2.extend_from_slice(&pattern(dg2_len.max(8) - 4, 2));
    CardImage {
        ef_com: vec![
            0x60, 0x0D, 0x5F, 0x01, 0x04, b'0', b'1', b'0', b'7', 0x5C, 0x04, 0x61, 0x75, 0x63,
            0x6B,
        ],
        dg1: pattern(180, 1),
        dg2,
        dg3: pattern(10 * 300, 3),
        dg11: pattern(220, 11),
        sod: pattern(1800, 29),
        imported: Some(ImportedKeys {
            auth_cert: cert(&auth_key, b"auth"),
            sign_cert: cert(&sign_key, b"sign"),
            auth_key,
            sign_key,
        }),
        id_pin: Zeroizing::new(b"123456".to_vec()),
        sign_pin: Zeroizing::new(b"654321".to_vec()),
        puk: Zeroizing::new(b"12345678".to_vec()),
        fingerprint_reference: Zeroizing::new(crate::card_os::bio::example_record()),
    }
}
