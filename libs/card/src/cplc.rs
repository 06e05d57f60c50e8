//! The chip serial and the GlobalPlatform Card Production Life Cycle data (CPLC, tag `9F7F`).
//!
//! The chip serial is the 10-byte string IC fabricator ‖ IC type ‖ IC serial number ‖ IC batch
//! identifier taken from the CPLC. The same 10 bytes are the SCP03 key diversification data
//! (KDD) that INITIALIZE UPDATE returns, so the host can check that the card it read the serial
//! from is the card it opens the secure channel with.

use std::fmt;

/// The 10-byte chip serial (also the SCP03 key diversification data).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChipSerial(pub [u8; 10]);

impl ChipSerial {
    /// A serial for a simulated chip: fabricator `4750` ("GP"), IC type `0E1D`, then the
    /// 32-bit running number and a 16-bit batch identifier.
    pub fn simulated(batch: u16, number: u32) -> Self {
        let mut s = [0u8; 10];
        s[0..2].copy_from_slice(&[0x47, 0x50]);
        s[2..4].copy_from_slice(&[0x0E, 0x1D]);
        s[4..8].copy_from_slice(&number.to_be_bytes());
        s[8..10].copy_from_slice(&batch.to_be_bytes());
        Self(s)
    }

    /// Upper-case hex, the form stored in the database.
    pub fn to_hex(&self) -> String {
        hex::encode_upper(self.0)
    }

    /// Parses the 20-hex-digit form.
    pub fn from_hex(s: &str) -> Option<Self> {
        let v = hex::decode(s).ok()?;
        Some(Self(v.try_into().ok()?))
    }
}

impl fmt::Debug for ChipSerial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChipSerial({})", self.to_hex())
    }
}

impl fmt::Display for ChipSerial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Length of the CPLC value (GP Card Specification, Table H-1... 42 bytes).
pub const CPLC_LEN: usize = 42;

/// Builds the GET DATA `9F7F` response: `9F 7F 2A` followed by the 42-byte CPLC.
///
/// Layout: IC fabricator (2), IC type (2), OS id (2), OS release date (2), OS release level
/// (2), IC fabrication date (2), IC serial number (4), IC batch identifier (2), then module
/// fabricator, packaging date, ICC manufacturer, embedding date, pre-perso and perso data.
pub fn encode(serial: &ChipSerial) -> Vec<u8> {
    let s = serial.0;
    let mut v = vec![0x9F, 0x7F, CPLC_LEN as u8];
    v.extend_from_slice(&s[0..4]); // fabricator, IC type
    v.extend_from_slice(&[0xCA, 0x7D]); // OS identifier ("cardpipe OS")
    v.extend_from_slice(&[0x61, 0x20]); // OS release date (YDDD)
    v.extend_from_slice(&[0x01, 0x00]); // OS release level
    v.extend_from_slice(&[0x61, 0x01]); // IC fabrication date
    v.extend_from_slice(&s[4..8]); // IC serial number
    v.extend_from_slice(&s[8..10]); // IC batch identifier
    v.resize(3 + CPLC_LEN, 0);
    v
}

/// Extracts the chip serial from a GET DATA `9F7F` response (with or without the tag).
pub fn parse(data: &[u8]) -> Option<ChipSerial> {
    let cplc = match data {
        [0x9F, 0x7F, len, rest @ ..] if usize::from(*len) == rest.len() => rest,
        _ => data,
    };
    if cplc.len() != CPLC_LEN {
        return None;
    }
    let mut s = [0u8; 10];
    s[0..4].copy_from_slice(&cplc[0..4]);
    s[4..8].copy_from_slice(&cplc[12..16]);
    s[8..10].copy_from_slice(&cplc[16..18]);
    Some(ChipSerial(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cplc_round_trip() {
        let serial = ChipSerial::simulated(7, 0xDEADBEEF);
        let cplc = encode(&serial);
        assert_eq!(cplc.len(), 45);
        assert_eq!(parse(&cplc), Some(serial));
        assert_eq!(parse(&cplc[3..]), Some(serial));
        assert_eq!(ChipSerial::from_hex(&serial.to_hex()), Some(serial));
        assert_eq!(parse(&cplc[..20]), None);
    }
}
