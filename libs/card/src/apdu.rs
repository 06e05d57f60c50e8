//! ISO/IEC 7816-4 command and response APDUs, short and extended length.
//!
//! Both the card OS and the host side build on these two types, so the byte-level rules
//! (cases 1–4, short vs. extended Lc/Le, Le = 0 meaning "maximum") live in exactly one place.
//! Command data may carry PINs or key material: [`Command`] zeroizes on drop and its `Debug`
//! shows only the data length.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// Status words used by the cardpipe eID profile (ISO/IEC 7816-4 §5.6 and GlobalPlatform).
pub mod sw {
    /// Normal processing.
    pub const OK: u16 = 0x9000;
    /// End of file reached before reading Le bytes.
    pub const END_OF_FILE: u16 = 0x6282;
    /// Verification failed; the low nibble of the second byte (`63Cx`) holds the retries left.
    pub const VERIFY_FAILED_BASE: u16 = 0x63C0;
    /// Memory failure: the EEPROM write did not verify.
    pub const MEMORY_FAILURE: u16 = 0x6581;
    /// Wrong length (Lc or Le).
    pub const WRONG_LENGTH: u16 = 0x6700;
    /// Secure messaging not supported / expected secure messaging missing on a plain CLA.
    pub const SM_NOT_SUPPORTED: u16 = 0x6882;
    /// Last command of the chain expected (a chain was broken).
    pub const LAST_COMMAND_EXPECTED: u16 = 0x6883;
    /// Command chaining not supported (for this instruction).
    pub const CHAINING_NOT_SUPPORTED: u16 = 0x6884;
    /// Security status not satisfied.
    pub const SECURITY_STATUS: u16 = 0x6982;
    /// Authentication method blocked.
    pub const BLOCKED: u16 = 0x6983;
    /// Conditions of use not satisfied (e.g. personalization after the lock).
    pub const CONDITIONS_NOT_SATISFIED: u16 = 0x6985;
    /// Command not allowed: no current EF.
    pub const NO_CURRENT_EF: u16 = 0x6986;
    /// Incorrect secure messaging data objects (bad MAC, bad padding).
    pub const SM_INCORRECT: u16 = 0x6988;
    /// Incorrect parameters in the command data field.
    pub const WRONG_DATA: u16 = 0x6A80;
    /// File or application not found.
    pub const FILE_NOT_FOUND: u16 = 0x6A82;
    /// Not enough memory space in the file.
    pub const NOT_ENOUGH_MEMORY: u16 = 0x6A84;
    /// Incorrect parameters P1-P2.
    pub const WRONG_P1P2: u16 = 0x6A86;
    /// Referenced data or reference data not found.
    pub const REF_NOT_FOUND: u16 = 0x6A88;
    /// Wrong parameters P1-P2: offset outside the EF.
    pub const OFFSET_OUTSIDE: u16 = 0x6B00;
    /// Instruction code not supported.
    pub const INS_NOT_SUPPORTED: u16 = 0x6D00;
    /// Class not supported.
    pub const CLA_NOT_SUPPORTED: u16 = 0x6E00;
    /// No precise diagnosis.
    pub const UNKNOWN: u16 = 0x6F00;

    /// `63Cx` with `tries` retries left (capped at 15).
    pub fn verify_failed(tries: u8) -> u16 {
        VERIFY_FAILED_BASE | u16::from(tries.min(15))
    }

    /// Whether `sw` counts as success or warning (GlobalPlatform: R-MAC only on these).
    pub fn is_success_or_warning(sw: u16) -> bool {
        sw == OK || (sw >> 8) == 0x62 || (sw >> 8) == 0x63
    }
}

/// A malformed APDU (its length fields disagree with its size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed APDU of {len} bytes")]
pub struct MalformedApdu {
    /// Total number of bytes received.
    pub len: usize,
}

/// A command APDU. `le` is the expected response length: `Some(256)` / `Some(65536)` are the
/// "maximum" encodings `00` / `00 00`.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Command {
    /// Class byte.
    pub cla: u8,
    /// Instruction byte.
    pub ins: u8,
    /// Parameter 1.
    pub p1: u8,
    /// Parameter 2.
    pub p2: u8,
    /// Command data (may hold secrets; zeroized on drop).
    pub data: Vec<u8>,
    /// Expected response length, if any.
    pub le: Option<usize>,
    /// Whether the command was (or must be) encoded with extended length fields.
    pub extended: bool,
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Command({:02X} {:02X} {:02X} {:02X}, {} data bytes, le {:?})",
            self.cla,
            self.ins,
            self.p1,
            self.p2,
            self.data.len(),
            self.le
        )
    }
}

impl Command {
    /// A case-1 command (header only).
    pub fn new(cla: u8, ins: u8, p1: u8, p2: u8) -> Self {
        Self {
            cla,
            ins,
            p1,
            p2,
            data: Vec::new(),
            le: None,
            extended: false,
        }
    }

    /// Sets the command data.
    #[must_use]
    pub fn with_data(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.data = data.into();
        self
    }

    /// Sets the expected response length.
    #[must_use]
    pub fn with_le(mut self, le: usize) -> Self {
        self.le = Some(le);
        self
    }

    /// Forces extended length encoding even when short would fit.
    #[must_use]
    pub fn extended(mut self) -> Self {
        self.extended = true;
        self
    }

    /// Whether this command needs extended length fields.
    pub fn needs_extended(&self) -> bool {
        self.extended || self.data.len() > 255 || self.le.is_some_and(|le| le > 256)
    }

    /// Encodes the command (short when possible, extended otherwise).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + self.data.len());
        out.extend_from_slice(&[self.cla, self.ins, self.p1, self.p2]);
        if self.needs_extended() {
            let mut first = true;
            if !self.data.is_empty() {
                out.push(0);
                first = false;
                out.extend_from_slice(&(self.data.len() as u16).to_be_bytes());
                out.extend_from_slice(&self.data);
            }
            if let Some(le) = self.le {
                if first {
                    out.push(0);
                }
                out.extend_from_slice(&((le % 65536) as u16).to_be_bytes());
            }
        } else {
            if !self.data.is_empty() {
                out.push(self.data.len() as u8);
                out.extend_from_slice(&self.data);
            }
            if let Some(le) = self.le {
                out.push((le % 256) as u8);
            }
        }
        out
    }

    /// Parses a command APDU (ISO/IEC 7816-3 cases 1, 2S/E, 3S/E, 4S/E).
    pub fn parse(b: &[u8]) -> Result<Self, MalformedApdu> {
        let bad = MalformedApdu { len: b.len() };
        if b.len() < 4 {
            return Err(bad);
        }
        let mut cmd = Self::new(b[0], b[1], b[2], b[3]);
        let body = &b[4..];
        match body.len() {
            0 => {}
            1 => {
                cmd.le = Some(if body[0] == 0 {
                    256
                } else {
                    usize::from(body[0])
                })
            }
            _ if body[0] != 0 => {
                let lc = usize::from(body[0]);
                if body.len() == 1 + lc {
                    cmd.data = body[1..].to_vec();
                } else if body.len() == 2 + lc {
                    cmd.data = body[1..1 + lc].to_vec();
                    let le = body[1 + lc];
                    cmd.le = Some(if le == 0 { 256 } else { usize::from(le) });
                } else {
                    return Err(bad);
                }
            }
            3 => {
                cmd.extended = true;
                let le = usize::from(u16::from_be_bytes([body[1], body[2]]));
                cmd.le = Some(if le == 0 { 65536 } else { le });
            }
            n if n > 3 => {
                cmd.extended = true;
                let lc = usize::from(u16::from_be_bytes([body[1], body[2]]));
                if lc == 0 {
                    return Err(bad);
                }
                if n == 3 + lc {
                    cmd.data = body[3..].to_vec();
                } else if n == 5 + lc {
                    cmd.data = body[3..3 + lc].to_vec();
                    let le = usize::from(u16::from_be_bytes([body[3 + lc], body[4 + lc]]));
                    cmd.le = Some(if le == 0 { 65536 } else { le });
                } else {
                    return Err(bad);
                }
            }
            _ => return Err(bad),
        }
        Ok(cmd)
    }

    /// Whether Le asks for "as much as there is" (short `00` or extended `00 00`).
    pub fn le_is_max(&self) -> bool {
        matches!(self.le, Some(256) | Some(65536))
    }
}

/// A response APDU: data followed by the status word.
#[derive(Clone, PartialEq, Eq)]
pub struct Response {
    /// Response data (may be empty).
    pub data: Vec<u8>,
    /// Status word SW1-SW2.
    pub sw: u16,
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Response({} data bytes, SW {:04X})",
            self.data.len(),
            self.sw
        )
    }
}

impl Response {
    /// A status-word-only response.
    pub fn sw(sw: u16) -> Self {
        Self {
            data: Vec::new(),
            sw,
        }
    }

    /// Data with 9000.
    pub fn ok(data: impl Into<Vec<u8>>) -> Self {
        Self {
            data: data.into(),
            sw: sw::OK,
        }
    }

    /// Parses raw response bytes (at least the two status bytes).
    pub fn parse(raw: &[u8]) -> Result<Self, MalformedApdu> {
        if raw.len() < 2 {
            return Err(MalformedApdu { len: raw.len() });
        }
        let (data, s) = raw.split_at(raw.len() - 2);
        Ok(Self {
            data: data.to_vec(),
            sw: u16::from_be_bytes([s[0], s[1]]),
        })
    }

    /// Encodes data followed by SW1-SW2.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.data.len() + 2);
        out.extend_from_slice(&self.data);
        out.extend_from_slice(&self.sw.to_be_bytes());
        out
    }

    /// Whether the status word is 9000.
    pub fn is_ok(&self) -> bool {
        self.sw == sw::OK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_cases_round_trip() {
        for cmd in [
            Command::new(0, 0xA4, 4, 0),
            Command::new(0, 0xB0, 0, 0).with_le(256),
            Command::new(0, 0xD6, 0, 0).with_data(vec![1, 2, 3]),
            Command::new(0, 0x88, 0, 1)
                .with_data(vec![9; 8])
                .with_le(256),
        ] {
            let bytes = cmd.to_bytes();
            assert_eq!(Command::parse(&bytes).unwrap(), cmd);
        }
        assert_eq!(
            Command::new(0, 0xB0, 0, 0).with_le(256).to_bytes(),
            vec![0, 0xB0, 0, 0, 0]
        );
    }

    #[test]
    fn extended_cases_round_trip() {
        let big = Command::new(0, 0xD6, 0, 0).with_data(vec![7; 1000]);
        let bytes = big.to_bytes();
        assert_eq!(&bytes[4..7], &[0, 0x03, 0xE8]);
        let parsed = Command::parse(&bytes).unwrap();
        assert_eq!(parsed.data.len(), 1000);
        let read = Command::new(0, 0xB0, 0, 0).with_le(65536);
        assert_eq!(read.to_bytes(), vec![0, 0xB0, 0, 0, 0, 0, 0]);
        assert_eq!(Command::parse(&read.to_bytes()).unwrap().le, Some(65536));
        let case4 = Command::new(0, 0xB1, 0, 0)
            .with_data(vec![0x54, 1, 0])
            .with_le(4000)
            .extended();
        assert_eq!(Command::parse(&case4.to_bytes()).unwrap(), case4);
    }

    #[test]
    fn malformed_lengths_are_rejected() {
        assert!(Command::parse(&[0, 0xA4, 4]).is_err());
        assert!(Command::parse(&[0, 0xA4, 4, 0, 5, 1, 2]).is_err());
        assert!(Command::parse(&[0, 0xA4, 4, 0, 0, 0]).is_err());
        assert!(Response::parse(&[0x90]).is_err());
    }

    #[test]
    fn debug_hides_command_data() {
        let pin = Command::new(0, 0x20, 0, 0x81).with_data(b"123456".to_vec());
        let shown = format!("{pin:?}");
        assert!(
            !shown.contains("31") && !shown.contains("123456"),
            "{shown}"
        );
    }
}
