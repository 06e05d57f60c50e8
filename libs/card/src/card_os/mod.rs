//! The cardpipe card operating system: a simulated smart card implementing the cardpipe eID
//! profile over ISO/IEC 7816-4 and GlobalPlatform SCP03.
//!
//! Tour:
//! - [`profile`]: AIDs, file identifiers and key/PIN references.
//! - [`Card`]: one chip. [`Card::blank`] makes a blank chip (a serial, per-card SCP03 keys
//!   diversified from the master keys, every EF empty, no keys, no PINs) in the
//!   [`Lifecycle::PrePersonalization`] state. [`Card::transmit`] takes a command APDU and
//!   returns the response APDU, or a [`CardFault`] when the chip gives no answer at all.
//! - [`pin`]: PIN objects with retry counters; [`bio`]: the match-on-card comparison;
//!   [`Faults`]: dead chip, write failures, tearing, slow EEPROM.
//!
//! Command set (CLA `00`/`80`, `04`/`84` with SCP03 secure messaging):
//!
//! | INS | command | notes |
//! |---|---|---|
//! | A4 | SELECT | P1 04 by AID, 00/02 by file id; P2 00/04 FCP, 0C none |
//! | B0/B1 | READ BINARY | 15-bit offset in P1-P2, or (B1) offset DO `54`; DG3 needs ID PIN |
//! | D6/D7 | UPDATE BINARY | SCP03 session required, only before the lock; D7 takes `54`+`53` |
//! | CA | GET DATA | `9F7F`: CPLC with the chip serial |
//! | 50, 82 | INITIALIZE UPDATE, EXTERNAL AUTHENTICATE | SCP03, before the lock only |
//! | 46 | GENERATE ASYMMETRIC KEY PAIR | ISO/IEC 7816-8, `P1 80`, P2 01/02: a fresh P-256 key pair born on the chip, under SCP03 before the lock only; answers the public key `7F49 { 86 04‖X‖Y }` (the private key never leaves) |
//! | DA | PUT DATA | P2 01/02: P-256 private key (C-DEC required); P2 91: fingerprint reference |
//! | 20 | VERIFY | P2 81/82/83; empty data asks for the retry counter |
//! | 21 | VERIFY (biometric) | P2 91, ISO/IEC 19794-2 probe |
//! | (CLA bit 10) | command chaining | for D6/D7/DA; each link wrapped on its own under SCP03 |
//! | 24 | CHANGE REFERENCE DATA | P1 00: old ‖ new (split at the stored length); P1 01: initial value under SCP03 before the lock |
//! | 2C | RESET RETRY COUNTER | P1 00: PUK ‖ new PIN; P1 01: PUK only |
//! | 88 | INTERNAL AUTHENTICATE | key 01, ECDSA P-256 / SHA-256 over the challenge, r ‖ s |
//! | 2A | PSO COMPUTE DIGITAL SIGNATURE | P1-P2 9E9A, 32-byte hash, key 02 after signature PIN |
//! | F0 | SET STATUS | `80 F0 80 0F` under SCP03: lock into the operational state |
//!
//! The secure channel is card-global (one security domain) and survives SELECT; a plain
//! command while a session is open closes the session, as does any secure messaging error.
//! PIN verification status is card-global and cleared on reset; a PSO signature consumes the
//! signature PIN verification.

pub mod bio;
mod faults;
pub mod pin;
pub mod profile;

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use p256::ecdsa::signature::Signer;
use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::ecdsa::{Signature, SigningKey};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use zeroize::Zeroizing;

pub use faults::{CardFault, FaultPlan, Faults};

use crate::apdu::{Command, Response, sw};
use crate::cplc::{self, ChipSerial};
use crate::scp03::{CardHandshake, CardSession, KeySet, MasterKeys};
use pin::{Check, PIN_LEN, Pin};
use profile::*;

/// Where the chip is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Blank: accepts SCP03 personalization.
    PrePersonalization,
    /// Locked: read, PIN management and signing only.
    Operational,
}

/// The ATR every simulated chip sends: T=1, historical bytes announcing extended Lc/Le
/// (compact-TLV card capabilities `73 00 00 40`) and "cardpipe" as card issuer's data.
pub const ATR: [u8; 19] = {
    let mut atr = [
        0x3B, 0x8E, 0x80, 0x01, 0x80, 0x73, 0x00, 0x00, 0x40, 0x58, b'c', b'a', b'r', b'd', b'p',
        b'i', b'p', b'e', 0,
    ];
    let mut tck = 0u8;
    let mut i = 1;
    while i < 18 {
        tck ^= atr[i];
        i += 1;
    }
    atr[18] = tck;
    atr
};

/// A private key slot's content: the signing key, never printed.
struct KeySlot(SigningKey);

impl fmt::Debug for KeySlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeySlot(P-256, redacted)")
    }
}

/// Security state that lasts until reset or power-off.
#[derive(Debug, Default)]
struct Volatile {
    powered: bool,
    chain: Option<Chain>,
    app: Option<App>,
    ef: Option<u16>,
    handshake: Option<CardHandshake>,
    session: Option<CardSession>,
    id_pin_ok: bool,
    sign_pin_ok: bool,
    finger_ok: bool,
}

/// Data collected from command chaining links so far (may hold key material).
struct Chain {
    key: (u8, u8, u8, u8, bool),
    data: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Chain(INS {:02X}, {} bytes)",
            self.key.1,
            self.data.len()
        )
    }
}

/// What an undetected encoder or EEPROM failure can leave on a personalized chip (fault
/// injection for QC: [`Card::inject_defect`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Defect {
    /// One byte of an EF flipped (a weak EEPROM cell).
    FlipByte {
        /// Application.
        app: App,
        /// File.
        fid: u16,
        /// Byte offset (modulo the file length).
        offset: usize,
    },
    /// An EF left empty (the write never happened).
    EraseFile {
        /// Application.
        app: App,
        /// File.
        fid: u16,
    },
    /// An EF holds other content (e.g. an EF.SOD signed by the wrong Document Signer).
    ReplaceFile {
        /// Application.
        app: App,
        /// File.
        fid: u16,
        /// The new content.
        data: Vec<u8>,
    },
    /// A private key slot holds another key than the one certified.
    ReplaceKey {
        /// `KEY_AUTH` or `KEY_SIGN`.
        key_ref: u8,
    },
    /// The lock (SET STATUS) never happened: the chip is still in pre-personalization.
    Unlocked,
}

/// One simulated chip.
pub struct Card {
    serial: ChipSerial,
    static_keys: KeySet,
    lifecycle: Lifecycle,
    files: BTreeMap<(App, u16), Vec<u8>>,
    keys: [Option<KeySlot>; 2],
    pins: [Pin; 3],
    finger: Option<Vec<bio::Minutia>>,
    finger_tries: Pin,
    v: Volatile,
    faults: Faults,
    rng: ChaCha8Rng,
    writes: u32,
    apdus: u64,
    removed: bool,
    /// Slow-EEPROM pacing: start of the current stretch, APDUs in it, last arrival.
    pacing: Option<(Instant, u32, Instant)>,
}

impl fmt::Debug for Card {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Card")
            .field("serial", &self.serial)
            .field("lifecycle", &self.lifecycle)
            .field("apdus", &self.apdus)
            .field("removed", &self.removed)
            .finish_non_exhaustive()
    }
}

/// The result of one command inside the OS: a response, or no answer at all.
type Outcome = Result<Response, CardFault>;

fn sw_only(s: u16) -> Outcome {
    Ok(Response::sw(s))
}

impl Card {
    /// A blank chip with this serial; its SCP03 static keys are diversified from `master`.
    pub fn blank(serial: ChipSerial, master: &MasterKeys, faults: Faults) -> Self {
        let mut files = BTreeMap::new();
        for app in [App::Lds, App::Eid] {
            for &fid in app.files() {
                files.insert((app, fid), Vec::new());
            }
        }
        let seed = faults.seed ^ u64::from_be_bytes(serial.0[2..10].try_into().expect("8 bytes"));
        Self {
            serial,
            static_keys: master.diversify(&serial),
            lifecycle: Lifecycle::PrePersonalization,
            files,
            keys: [None, None],
            pins: [Pin::new(3), Pin::new(3), Pin::new(10)],
            finger: None,
            finger_tries: Pin::new(5),
            v: Volatile::default(),
            faults,
            rng: ChaCha8Rng::seed_from_u64(seed),
            writes: 0,
            apdus: 0,
            removed: false,
            pacing: None,
        }
    }

    /// The chip serial.
    pub fn serial(&self) -> ChipSerial {
        self.serial
    }

    /// The private scalar in slot `key_ref` — what a real chip never answers to any command.
    /// Only for tests that prove a key born on the chip exists nowhere else: they look for
    /// it in every store and log. The personalization and QC code never call it.
    #[doc(hidden)]
    pub fn simulator_private_key(&self, key_ref: u8) -> Option<Zeroizing<[u8; 32]>> {
        let slot = match key_ref {
            KEY_AUTH => &self.keys[0],
            KEY_SIGN => &self.keys[1],
            _ => return None,
        };
        slot.as_ref()
            .map(|KeySlot(k)| Zeroizing::new(<[u8; 32]>::from(k.to_bytes())))
    }

    /// The lifecycle state.
    pub fn lifecycle(&self) -> Lifecycle {
        self.lifecycle
    }

    /// The fault knobs this chip was made with.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Whether the card was pulled (tearing) and can no longer be talked to.
    pub fn is_removed(&self) -> bool {
        self.removed
    }

    /// Whether personalization has changed this chip: a file written, a key made or imported,
    /// a fingerprint reference stored, or the lock. A chip that is still a blank is not.
    pub fn personalization_started(&self) -> bool {
        self.writes > 0
            || self.keys.iter().any(Option::is_some)
            || self.finger.is_some()
            || self.lifecycle != Lifecycle::PrePersonalization
    }

    /// Command APDUs processed so far.
    pub fn apdu_count(&self) -> u64 {
        self.apdus
    }

    /// Raw content of an EF, for tests and inspection tools.
    pub fn file(&self, app: App, fid: u16) -> Option<&[u8]> {
        self.files.get(&(app, fid)).map(Vec::as_slice)
    }

    /// Public key of an imported private key (`KEY_AUTH` / `KEY_SIGN`), SEC1 uncompressed.
    pub fn public_key(&self, key_ref: u8) -> Option<Vec<u8>> {
        let slot = self
            .keys
            .get(usize::from(key_ref).checked_sub(1)?)?
            .as_ref()?;
        Some(
            slot.0
                .verifying_key()
                .to_encoded_point(false)
                .as_bytes()
                .to_vec(),
        )
    }

    /// Retries left for a PIN reference (81/82/83) or the fingerprint reference (91).
    pub fn tries_left(&self, reference: u8) -> Option<u8> {
        match reference {
            BIO_FINGER => Some(self.finger_tries.tries_left()),
            _ => self.pin(reference).map(Pin::tries_left),
        }
    }

    /// Plants a defect (fault injection; see [`Defect`]).
    pub fn inject_defect(&mut self, defect: &Defect) {
        match defect {
            Defect::FlipByte { app, fid, offset } => {
                if let Some(f) = self.files.get_mut(&(*app, *fid))
                    && !f.is_empty()
                {
                    let i = offset % f.len();
                    f[i] ^= 0x01;
                }
            }
            Defect::EraseFile { app, fid } => {
                if let Some(f) = self.files.get_mut(&(*app, *fid)) {
                    f.clear();
                }
            }
            Defect::ReplaceFile { app, fid, data } => {
                self.files.insert((*app, *fid), data.clone());
            }
            Defect::ReplaceKey { key_ref } => {
                if let Some(slot) = self.keys.get_mut(usize::from(*key_ref).saturating_sub(1)) {
                    let key = loop {
                        let bytes: [u8; 32] = self.rng.random();
                        if let Ok(k) = SigningKey::from_slice(&bytes) {
                            break k;
                        }
                    };
                    *slot = Some(KeySlot(key));
                }
            }
            Defect::Unlocked => self.lifecycle = Lifecycle::PrePersonalization,
        }
    }

    /// Powers the chip up (or warm-resets it) and returns the ATR; `None` for a dead chip.
    /// All volatile security state (selection, secure channel, verified PINs) is cleared.
    pub fn power_on(&mut self) -> Option<Vec<u8>> {
        if self.faults.dead || self.removed {
            return None;
        }
        self.v = Volatile {
            powered: true,
            ..Volatile::default()
        };
        Some(ATR.to_vec())
    }

    /// The ATR without touching the chip's state (what a reader's presence poll sees);
    /// `None` for a dead or removed chip.
    pub fn atr(&self) -> Option<Vec<u8>> {
        (!self.faults.dead && !self.removed).then(|| ATR.to_vec())
    }

    /// Powers the chip down, clearing volatile state.
    pub fn power_off(&mut self) {
        self.v = Volatile::default();
    }

    /// Processes one command APDU and returns the response APDU bytes.
    pub fn transmit(&mut self, apdu: &[u8]) -> Result<Vec<u8>, CardFault> {
        if self.faults.dead {
            return Err(CardFault::Dead);
        }
        if self.faults.pulled_before_first_command && self.apdus == 0 {
            self.removed = true;
        }
        if self.removed {
            return Err(CardFault::Removed);
        }
        if !self.v.powered {
            return Err(CardFault::Unpowered);
        }
        self.apdus += 1;
        self.eeprom_delay();
        let Ok(cmd) = Command::parse(apdu) else {
            return Ok(Response::sw(sw::WRONG_LENGTH).to_bytes());
        };
        self.process(cmd).map(|r| r.to_bytes())
    }

    /// Slow EEPROM: APDU k after power-on completes `k × apdu_latency` after the first one
    /// arrived, so the card's own processing time is absorbed in the budget, sleep overshoot
    /// does not accumulate and a host delayed by the scheduler catches up: n APDUs take
    /// n × latency unless the host itself is slower. A host idle for more than a second (say,
    /// a later QC read) starts a new stretch.
    fn eeprom_delay(&mut self) {
        let lat = self.faults.apdu_latency;
        if lat.is_zero() {
            return;
        }
        let now = Instant::now();
        let (mut epoch, mut k, last) = self.pacing.unwrap_or((now, 0, now));
        if now.duration_since(last) > Duration::from_secs(1) {
            (epoch, k) = (now, 0);
        }
        k += 1;
        self.pacing = Some((epoch, k, now));
        if let Some(wait) = (epoch + lat * k).checked_duration_since(now) {
            std::thread::sleep(wait);
        }
    }

    fn process(&mut self, cmd: Command) -> Outcome {
        let secure = match cmd.cla & !0x10 {
            0x00 | 0x80 => false,
            0x04 | 0x84 => true,
            _ => return sw_only(sw::CLA_NOT_SUPPORTED),
        };
        if !secure {
            // A plain command ends any secure channel session (GP: the session is closed
            // when a command arrives without the expected secure messaging).
            self.v.session = None;
            if cmd.ins != 0x50 {
                self.v.handshake = None;
            }
            return self.chain_then_dispatch(cmd, false);
        }
        if cmd.ins == 0x82 && cmd.cla == 0x84 {
            return self.external_authenticate(&cmd);
        }
        let Some(session) = self.v.session.as_mut() else {
            return sw_only(sw::SECURITY_STATUS);
        };
        let plain = match session.unwrap_command(&cmd) {
            Ok(p) => p,
            Err(s) => {
                self.v.session = None;
                return sw_only(s);
            }
        };
        let resp = self.chain_then_dispatch(plain, true)?;
        Ok(match &self.v.session {
            Some(s) => s.wrap_response(resp),
            None => resp,
        })
    }

    /// Command chaining (ISO/IEC 7816-4 §5.3.3, CLA bit `10`) for the data-heavy commands
    /// (UPDATE BINARY, PUT DATA): links are acknowledged with 9000 and their data collected;
    /// the last link (bit clear) runs the command on everything. Under SCP03 every link is
    /// wrapped on its own. A link for another command breaks the chain with 6883.
    fn chain_then_dispatch(&mut self, mut cmd: Command, secure: bool) -> Outcome {
        let more = cmd.cla & 0x10 != 0;
        cmd.cla &= !0x10;
        let key = (cmd.cla, cmd.ins, cmd.p1, cmd.p2, secure);
        if more {
            if !matches!(cmd.ins, 0xD6 | 0xD7 | 0xDA) {
                self.v.chain = None;
                return sw_only(sw::CHAINING_NOT_SUPPORTED);
            }
            match &mut self.v.chain {
                Some(c) if c.key != key => {
                    self.v.chain = None;
                    return sw_only(sw::LAST_COMMAND_EXPECTED);
                }
                Some(c) => c.data.extend_from_slice(&cmd.data),
                None => {
                    self.v.chain = Some(Chain {
                        key,
                        data: Zeroizing::new(cmd.data.clone()),
                    })
                }
            }
            if self
                .v
                .chain
                .as_ref()
                .is_some_and(|c| c.data.len() > MAX_EF_SIZE)
            {
                self.v.chain = None;
                return sw_only(sw::WRONG_LENGTH);
            }
            return sw_only(sw::OK);
        }
        if let Some(chain) = self.v.chain.take() {
            if chain.key != key {
                return sw_only(sw::LAST_COMMAND_EXPECTED);
            }
            let mut data = chain.data.to_vec();
            data.extend_from_slice(&cmd.data);
            cmd.data = data;
        }
        self.dispatch(&cmd, secure)
    }

    fn dispatch(&mut self, cmd: &Command, secure: bool) -> Outcome {
        let proprietary = cmd.cla & 0x80 != 0;
        match (proprietary, cmd.ins) {
            (false, 0xA4) => self.select(cmd),
            (false, 0xB0 | 0xB1) => self.read_binary(cmd),
            (false, 0xD6 | 0xD7) => self.update_binary(cmd, secure),
            (_, 0xCA) => self.get_data(cmd),
            (true, 0x50) => self.initialize_update(cmd),
            (true, 0xDA) => self.put_data(cmd, secure),
            (false, 0x46) => self.generate_key_pair(cmd, secure),
            (true, 0xF0) => self.set_status(cmd, secure),
            (false, 0x20) => self.verify(cmd),
            (false, 0x21) => self.verify_biometric(cmd),
            (false, 0x24) => self.change_reference_data(cmd, secure),
            (false, 0x2C) => self.reset_retry_counter(cmd),
            (false, 0x88) => self.internal_authenticate(cmd),
            (false, 0x2A) => self.pso(cmd),
            (true, 0x82) => sw_only(sw::SECURITY_STATUS),
            _ => sw_only(sw::INS_NOT_SUPPORTED),
        }
    }

    fn pin(&self, reference: u8) -> Option<&Pin> {
        match reference {
            PIN_ID => Some(&self.pins[0]),
            PIN_SIGN => Some(&self.pins[1]),
            PUK => Some(&self.pins[2]),
            _ => None,
        }
    }

    fn pin_mut(&mut self, reference: u8) -> Option<&mut Pin> {
        match reference {
            PIN_ID => Some(&mut self.pins[0]),
            PIN_SIGN => Some(&mut self.pins[1]),
            PUK => Some(&mut self.pins[2]),
            _ => None,
        }
    }

    /// Personalization rights: before the lock, inside an authenticated secure channel
    /// (with C-DEC when `need_dec`).
    fn perso_allowed(&self, secure: bool, need_dec: bool) -> Result<(), u16> {
        if self.lifecycle != Lifecycle::PrePersonalization {
            return Err(sw::CONDITIONS_NOT_SATISFIED);
        }
        match (&self.v.session, secure) {
            (Some(s), true) if !need_dec || s.level().c_dec() => Ok(()),
            _ => Err(sw::SECURITY_STATUS),
        }
    }

    /// Draws the write-failure knob.
    fn write_fails(&mut self) -> bool {
        self.faults.write_failure_rate > 0.0
            && self
                .rng
                .random_bool(self.faults.write_failure_rate.min(1.0))
    }

    // ---- file system ----

    fn select(&mut self, cmd: &Command) -> Outcome {
        if !matches!(cmd.p2, 0x00 | 0x04 | 0x0C) {
            return sw_only(sw::WRONG_P1P2);
        }
        match cmd.p1 {
            0x04 => {
                let Some(app) = App::from_aid(&cmd.data) else {
                    return sw_only(sw::FILE_NOT_FOUND);
                };
                self.v.app = Some(app);
                self.v.ef = None;
                if cmd.p2 == 0x0C {
                    return sw_only(sw::OK);
                }
                let aid = app.aid();
                let mut fci = vec![0x6F, (aid.len() + 2) as u8, 0x84, aid.len() as u8];
                fci.extend_from_slice(aid);
                Ok(Response::ok(fci))
            }
            0x00 | 0x02 => {
                if cmd.data.len() != 2 {
                    return sw_only(sw::WRONG_LENGTH);
                }
                let fid = u16::from_be_bytes([cmd.data[0], cmd.data[1]]);
                if cmd.p1 == 0x00 && fid == 0x3F00 {
                    self.v.app = None;
                    self.v.ef = None;
                    return sw_only(sw::OK);
                }
                let Some(app) = self.v.app else {
                    return sw_only(sw::FILE_NOT_FOUND);
                };
                let Some(content) = self.files.get(&(app, fid)) else {
                    return sw_only(sw::FILE_NOT_FOUND);
                };
                let size = content.len() as u16;
                self.v.ef = Some(fid);
                if cmd.p2 == 0x0C {
                    return sw_only(sw::OK);
                }
                let [s1, s2] = size.to_be_bytes();
                let [f1, f2] = fid.to_be_bytes();
                Ok(Response::ok(vec![
                    0x62, 0x0B, 0x80, 0x02, s1, s2, 0x82, 0x01, 0x01, 0x83, 0x02, f1, f2,
                ]))
            }
            _ => sw_only(sw::WRONG_P1P2),
        }
    }

    /// Resolves the target EF and offset of READ/UPDATE BINARY (even INS: 15-bit offset in
    /// P1-P2; odd INS: P1-P2 = 0000 or a file id, offset in DO `54`). Returns the EF, the
    /// offset and the rest of the odd-INS data.
    fn binary_target<'a>(&mut self, cmd: &'a Command) -> Result<(u16, usize, &'a [u8]), u16> {
        let app = self.v.app.ok_or(sw::NO_CURRENT_EF)?;
        if cmd.ins & 1 == 0 {
            if cmd.p1 & 0x80 != 0 {
                return Err(sw::WRONG_P1P2);
            }
            let ef = self.v.ef.ok_or(sw::NO_CURRENT_EF)?;
            return Ok((
                ef,
                usize::from(u16::from_be_bytes([cmd.p1, cmd.p2])),
                &cmd.data,
            ));
        }
        let fid = u16::from_be_bytes([cmd.p1, cmd.p2]);
        let ef = if fid == 0 {
            self.v.ef.ok_or(sw::NO_CURRENT_EF)?
        } else if self.files.contains_key(&(app, fid)) {
            self.v.ef = Some(fid);
            fid
        } else {
            return Err(sw::FILE_NOT_FOUND);
        };
        match cmd.data.as_slice() {
            [0x54, n @ 1..=3, rest @ ..] if rest.len() >= usize::from(*n) => {
                let n = usize::from(*n);
                let offset = rest[..n]
                    .iter()
                    .fold(0usize, |acc, b| acc << 8 | usize::from(*b));
                Ok((ef, offset, &rest[n..]))
            }
            _ => Err(sw::WRONG_DATA),
        }
    }

    fn read_binary(&mut self, cmd: &Command) -> Outcome {
        let (ef, offset, _) = match self.binary_target(cmd) {
            Ok(t) => t,
            Err(s) => return sw_only(s),
        };
        let app = self.v.app.expect("binary_target checked");
        if app == App::Lds && ef == EF_DG3 && !self.v.id_pin_ok {
            return sw_only(sw::SECURITY_STATUS);
        }
        let Some(le) = cmd.le else {
            return sw_only(sw::WRONG_LENGTH);
        };
        let content = &self.files[&(app, ef)];
        if offset >= content.len() {
            return sw_only(sw::OFFSET_OUTSIDE);
        }
        // Room for the odd-INS `53` wrapper and an R-MAC inside a 65536-byte response.
        let room = if cmd.ins & 1 == 1 {
            le.saturating_sub(4)
        } else {
            le
        };
        let room = room.min(65536 - 16);
        let end = (offset + room).min(content.len());
        let mut data = content[offset..end].to_vec();
        let short = end - offset < room && !cmd.le_is_max();
        if cmd.ins & 1 == 1 {
            data = wrap_tlv(0x53, &data);
        }
        Ok(Response {
            data,
            sw: if short { sw::END_OF_FILE } else { sw::OK },
        })
    }

    fn update_binary(&mut self, cmd: &Command, secure: bool) -> Outcome {
        if let Err(s) = self.perso_allowed(secure, false) {
            return sw_only(s);
        }
        let (ef, offset, rest) = match self.binary_target(cmd) {
            Ok(t) => t,
            Err(s) => return sw_only(s),
        };
        let data: Vec<u8> = if cmd.ins & 1 == 1 {
            match parse_tlv(0x53, rest) {
                Some(d) => d.to_vec(),
                None => return sw_only(sw::WRONG_DATA),
            }
        } else {
            cmd.data.clone()
        };
        if data.is_empty() {
            return sw_only(sw::WRONG_LENGTH);
        }
        if offset + data.len() > MAX_EF_SIZE {
            return sw_only(sw::NOT_ENOUGH_MEMORY);
        }
        self.writes += 1;
        let app = self.v.app.expect("binary_target checked");
        if self.faults.tear_at_write == Some(self.writes) {
            let half = &data[..data.len() / 2];
            write_at(
                self.files.get_mut(&(app, ef)).expect("exists"),
                offset,
                half,
            );
            self.removed = true;
            self.v = Volatile::default();
            return Err(CardFault::Removed);
        }
        if self.write_fails() {
            return sw_only(sw::MEMORY_FAILURE);
        }
        write_at(
            self.files.get_mut(&(app, ef)).expect("exists"),
            offset,
            &data,
        );
        sw_only(sw::OK)
    }

    fn get_data(&mut self, cmd: &Command) -> Outcome {
        if (cmd.p1, cmd.p2) != (0x9F, 0x7F) {
            return sw_only(sw::REF_NOT_FOUND);
        }
        Ok(Response::ok(cplc::encode(&self.serial)))
    }

    // ---- SCP03 and lifecycle ----

    fn initialize_update(&mut self, cmd: &Command) -> Outcome {
        self.v.session = None;
        self.v.handshake = None;
        if self.lifecycle != Lifecycle::PrePersonalization {
            return sw_only(sw::CONDITIONS_NOT_SATISFIED);
        }
        if cmd.p2 != 0 {
            return sw_only(sw::WRONG_P1P2);
        }
        if !matches!(cmd.p1, 0x00 | 0x30) {
            return sw_only(sw::REF_NOT_FOUND);
        }
        if cmd.data.len() != 8 {
            return sw_only(sw::WRONG_LENGTH);
        }
        let card_challenge: [u8; 8] = rand::random();
        let (hs, resp) = CardHandshake::initialize_update(
            &self.static_keys,
            &self.serial,
            0x30,
            &cmd.data,
            card_challenge,
        );
        self.v.handshake = Some(hs);
        Ok(Response::ok(resp))
    }

    fn external_authenticate(&mut self, cmd: &Command) -> Outcome {
        let Some(hs) = self.v.handshake.take() else {
            self.v.session = None;
            return sw_only(sw::CONDITIONS_NOT_SATISFIED);
        };
        match hs.external_authenticate(cmd) {
            Ok(session) => {
                self.v.session = Some(session);
                sw_only(sw::OK)
            }
            Err(s) => sw_only(s),
        }
    }

    fn set_status(&mut self, cmd: &Command, secure: bool) -> Outcome {
        if let Err(s) = self.perso_allowed(secure, false) {
            return sw_only(s);
        }
        if (cmd.p1, cmd.p2) != (0x80, 0x0F) {
            return sw_only(sw::WRONG_P1P2);
        }
        self.lifecycle = Lifecycle::Operational;
        sw_only(sw::OK)
    }

    fn put_data(&mut self, cmd: &Command, secure: bool) -> Outcome {
        if cmd.p1 != 0 {
            return sw_only(sw::WRONG_P1P2);
        }
        match cmd.p2 {
            KEY_AUTH | KEY_SIGN => {
                if let Err(s) = self.perso_allowed(secure, true) {
                    return sw_only(s);
                }
                if cmd.data.len() != 32 {
                    return sw_only(sw::WRONG_LENGTH);
                }
                let Ok(key) = SigningKey::from_slice(&cmd.data) else {
                    return sw_only(sw::WRONG_DATA);
                };
                if self.write_fails() {
                    return sw_only(sw::MEMORY_FAILURE);
                }
                let public = key
                    .verifying_key()
                    .to_encoded_point(false)
                    .as_bytes()
                    .to_vec();
                self.keys[usize::from(cmd.p2 - 1)] = Some(KeySlot(key));
                Ok(Response::ok(public))
            }
            BIO_FINGER => {
                if let Err(s) = self.perso_allowed(secure, true) {
                    return sw_only(s);
                }
                let Some(minutiae) = bio::parse_iso19794_2(&cmd.data) else {
                    return sw_only(sw::WRONG_DATA);
                };
                if self.write_fails() {
                    return sw_only(sw::MEMORY_FAILURE);
                }
                self.finger = Some(minutiae);
                self.finger_tries.unblock();
                sw_only(sw::OK)
            }
            _ => sw_only(sw::REF_NOT_FOUND),
        }
    }

    /// GENERATE ASYMMETRIC KEY PAIR: the private key is drawn from the OS's generator (not
    /// the card's fault-plan generator, which is seeded from the serial) and stays in the
    /// slot; only the public key is answered. Regenerating replaces the slot's key before the
    /// lock; after the lock, and outside the secure channel, the command is refused.
    fn generate_key_pair(&mut self, cmd: &Command, secure: bool) -> Outcome {
        if let Err(s) = self.perso_allowed(secure, false) {
            return sw_only(s);
        }
        if cmd.p1 != 0x80 {
            return sw_only(sw::WRONG_P1P2);
        }
        if !matches!(cmd.p2, KEY_AUTH | KEY_SIGN) {
            return sw_only(sw::REF_NOT_FOUND);
        }
        if !cmd.data.is_empty() {
            return sw_only(sw::WRONG_LENGTH);
        }
        if self.write_fails() {
            return sw_only(sw::MEMORY_FAILURE);
        }
        if !self.faults.keygen_latency.is_zero() {
            std::thread::sleep(self.faults.keygen_latency);
        }
        let key = loop {
            let candidate = Zeroizing::new(rand::random::<[u8; 32]>());
            if let Ok(key) = SigningKey::from_slice(&candidate[..]) {
                break key;
            }
        };
        let point = key.verifying_key().to_encoded_point(false);
        self.keys[usize::from(cmd.p2 - 1)] = Some(KeySlot(key));
        Ok(Response::ok(public_key_do(point.as_bytes())))
    }

    // ---- PINs and biometrics ----

    fn verified_flag(&mut self, reference: u8) -> Option<&mut bool> {
        match reference {
            PIN_ID => Some(&mut self.v.id_pin_ok),
            PIN_SIGN => Some(&mut self.v.sign_pin_ok),
            _ => None,
        }
    }

    fn check_status(check: Check) -> u16 {
        match check {
            Check::Ok => sw::OK,
            Check::Wrong(0) | Check::Blocked => sw::BLOCKED,
            Check::Wrong(n) => sw::verify_failed(n),
            Check::NotSet => sw::REF_NOT_FOUND,
        }
    }

    fn verify(&mut self, cmd: &Command) -> Outcome {
        let reference = cmd.p2;
        if cmd.p1 == 0xFF {
            if self.pin(reference).is_none() {
                return sw_only(sw::REF_NOT_FOUND);
            }
            if let Some(flag) = self.verified_flag(reference) {
                *flag = false;
            }
            return sw_only(sw::OK);
        }
        if cmd.p1 != 0 {
            return sw_only(sw::WRONG_P1P2);
        }
        let Some(pin) = self.pin(reference) else {
            return sw_only(sw::REF_NOT_FOUND);
        };
        if !pin.is_set() {
            return sw_only(sw::REF_NOT_FOUND);
        }
        if cmd.data.is_empty() {
            let tries = pin.tries_left();
            let verified = self.verified_flag(reference).is_some_and(|f| *f);
            return sw_only(match tries {
                0 => sw::BLOCKED,
                _ if verified => sw::OK,
                n => sw::verify_failed(n),
            });
        }
        if !PIN_LEN.contains(&cmd.data.len()) {
            return sw_only(sw::WRONG_LENGTH);
        }
        let check = self.pin_mut(reference).expect("checked").check(&cmd.data);
        let ok = check == Check::Ok;
        if let Some(flag) = self.verified_flag(reference) {
            *flag = ok;
        }
        sw_only(Self::check_status(check))
    }

    fn verify_biometric(&mut self, cmd: &Command) -> Outcome {
        if cmd.p1 != 0 {
            return sw_only(sw::WRONG_P1P2);
        }
        if cmd.p2 != BIO_FINGER {
            return sw_only(sw::REF_NOT_FOUND);
        }
        let Some(reference) = &self.finger else {
            return sw_only(sw::REF_NOT_FOUND);
        };
        if self.finger_tries.tries_left() == 0 {
            return sw_only(sw::BLOCKED);
        }
        let Some(probe) = bio::parse_iso19794_2(&cmd.data) else {
            return sw_only(sw::WRONG_DATA);
        };
        if bio::matches(reference, &probe) {
            self.finger_tries.unblock();
            self.v.finger_ok = true;
            sw_only(sw::OK)
        } else {
            self.v.finger_ok = false;
            let check = self.finger_tries.fail();
            sw_only(Self::check_status(check))
        }
    }

    fn change_reference_data(&mut self, cmd: &Command, secure: bool) -> Outcome {
        let reference = cmd.p2;
        if self.pin(reference).is_none() {
            return sw_only(sw::REF_NOT_FOUND);
        }
        match cmd.p1 {
            0x01 => {
                if let Err(s) = self.perso_allowed(secure, true) {
                    return sw_only(s);
                }
                if !PIN_LEN.contains(&cmd.data.len()) {
                    return sw_only(sw::WRONG_DATA);
                }
                if self.write_fails() {
                    return sw_only(sw::MEMORY_FAILURE);
                }
                self.pin_mut(reference).expect("checked").set(&cmd.data);
                sw_only(sw::OK)
            }
            0x00 => {
                let pin = self.pin(reference).expect("checked");
                let Some(old_len) = pin.value_len() else {
                    return sw_only(sw::REF_NOT_FOUND);
                };
                if cmd.data.len() <= old_len || !PIN_LEN.contains(&(cmd.data.len() - old_len)) {
                    return sw_only(sw::WRONG_DATA);
                }
                let (old, new) = cmd.data.split_at(old_len);
                let pin = self.pin_mut(reference).expect("checked");
                let check = pin.check(old);
                if check == Check::Ok {
                    pin.set(new);
                    if let Some(flag) = self.verified_flag(reference) {
                        *flag = true;
                    }
                }
                sw_only(Self::check_status(check))
            }
            _ => sw_only(sw::WRONG_P1P2),
        }
    }

    fn reset_retry_counter(&mut self, cmd: &Command) -> Outcome {
        let reference = cmd.p2;
        if !matches!(reference, PIN_ID | PIN_SIGN) {
            return sw_only(sw::REF_NOT_FOUND);
        }
        if !self.pins[0].is_set() && reference == PIN_ID
            || !self.pins[1].is_set() && reference == PIN_SIGN
        {
            return sw_only(sw::REF_NOT_FOUND);
        }
        let Some(puk_len) = self.pins[2].value_len() else {
            return sw_only(sw::REF_NOT_FOUND);
        };
        let (puk, new) = match cmd.p1 {
            0x00 if cmd.data.len() > puk_len && PIN_LEN.contains(&(cmd.data.len() - puk_len)) => {
                cmd.data.split_at(puk_len)
            }
            0x01 if cmd.data.len() == puk_len => (cmd.data.as_slice(), &[][..]),
            0x00 | 0x01 => return sw_only(sw::WRONG_DATA),
            _ => return sw_only(sw::WRONG_P1P2),
        };
        let check = self.pins[2].check(puk);
        if check == Check::Ok {
            let pin = self.pin_mut(reference).expect("checked");
            if new.is_empty() {
                pin.unblock();
            } else {
                pin.set(new);
            }
        }
        sw_only(Self::check_status(check))
    }

    // ---- private key operations ----

    fn internal_authenticate(&mut self, cmd: &Command) -> Outcome {
        if cmd.p1 != 0 {
            return sw_only(sw::WRONG_P1P2);
        }
        if self.v.app != Some(App::Eid) {
            return sw_only(sw::CONDITIONS_NOT_SATISFIED);
        }
        match cmd.p2 {
            KEY_AUTH => {}
            KEY_SIGN => return sw_only(sw::CONDITIONS_NOT_SATISFIED),
            _ => return sw_only(sw::REF_NOT_FOUND),
        }
        if cmd.data.is_empty() || cmd.data.len() > 255 {
            return sw_only(sw::WRONG_LENGTH);
        }
        let Some(KeySlot(key)) = &self.keys[0] else {
            return sw_only(sw::REF_NOT_FOUND);
        };
        let sig: Signature = key.sign(&cmd.data);
        Ok(Response::ok(sig.to_bytes().to_vec()))
    }

    fn pso(&mut self, cmd: &Command) -> Outcome {
        if (cmd.p1, cmd.p2) != (0x9E, 0x9A) {
            return sw_only(sw::WRONG_P1P2);
        }
        if self.v.app != Some(App::Eid) {
            return sw_only(sw::CONDITIONS_NOT_SATISFIED);
        }
        if cmd.data.len() != 32 {
            return sw_only(sw::WRONG_LENGTH);
        }
        let Some(KeySlot(key)) = &self.keys[1] else {
            return sw_only(sw::REF_NOT_FOUND);
        };
        if !self.v.sign_pin_ok {
            return sw_only(sw::SECURITY_STATUS);
        }
        let sig: Signature = match key.sign_prehash(&cmd.data) {
            Ok(s) => s,
            Err(_) => return sw_only(sw::UNKNOWN),
        };
        self.v.sign_pin_ok = false;
        Ok(Response::ok(sig.to_bytes().to_vec()))
    }
}

fn write_at(file: &mut Vec<u8>, offset: usize, data: &[u8]) {
    if file.len() < offset + data.len() {
        // Unwritten EEPROM reads as erased (FF).
        file.resize(offset + data.len(), 0xFF);
    }
    file[offset..offset + data.len()].copy_from_slice(data);
}

/// The public key data object of GENERATE ASYMMETRIC KEY PAIR (ISO/IEC 7816-8):
/// `7F49 L { 86 L point }`, the point SEC1 uncompressed.
pub fn public_key_do(point: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(point.len() + 6);
    cardpipe_pki::tlv::put(&mut out, 0x7F49, &wrap_tlv(0x86, point));
    out
}

/// The point inside a `7F49` public key data object, if that is what `data` is.
pub fn parse_public_key_do(data: &[u8]) -> Option<&[u8]> {
    let inner = cardpipe_pki::tlv::expect(data, 0x7F49, "public key").ok()?;
    parse_tlv(0x86, inner)
}

/// BER-TLV with a one-byte tag and definite length (the workspace's one codec,
/// [`cardpipe_pki::tlv`]).
pub(crate) fn wrap_tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(value.len() + 4);
    cardpipe_pki::tlv::put(&mut v, u32::from(tag), value);
    v
}

/// Parses exactly one BER-TLV with the given one-byte tag covering all of `data`.
pub(crate) fn parse_tlv(tag: u8, data: &[u8]) -> Option<&[u8]> {
    cardpipe_pki::tlv::expect(data, u32::from(tag), "data object").ok()
}

#[cfg(test)]
mod tests;
