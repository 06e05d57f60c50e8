//! The cardpipe eID profile: applications, their elementary files and object references.
//!
//! Kept apart from the command processing so the personalization script and the QC read-back
//! use the very same identifiers the card OS implements.

/// AID of the LDS application (ICAO Doc 9303).
pub const LDS_AID: [u8; 7] = [0xA0, 0x00, 0x00, 0x02, 0x47, 0x10, 0x01];
/// AID of the proprietary eID application ("\xF0cardpipe\x01").
pub const EID_AID: [u8; 10] = [0xF0, 0x63, 0x61, 0x72, 0x64, 0x70, 0x69, 0x70, 0x65, 0x01];
/// AID of the GlobalPlatform issuer security domain (selectable, holds no files).
pub const ISD_AID: [u8; 8] = [0xA0, 0x00, 0x00, 0x01, 0x51, 0x00, 0x00, 0x00];

/// EF.COM.
pub const EF_COM: u16 = 0x011E;
/// DG1: demographics.
pub const EF_DG1: u16 = 0x0101;
/// DG2: face image.
pub const EF_DG2: u16 = 0x0102;
/// DG3: fingerprint templates (ID PIN required to read).
pub const EF_DG3: u16 = 0x0103;
/// DG11: postal code and address.
pub const EF_DG11: u16 = 0x010B;
/// EF.SOD: the document security object.
pub const EF_SOD: u16 = 0x011D;
/// Authentication certificate (key 01).
pub const EF_CERT_AUTH: u16 = 0xC001;
/// Signature certificate (key 02).
pub const EF_CERT_SIGN: u16 = 0xC002;

/// Authentication key reference (INTERNAL AUTHENTICATE).
pub const KEY_AUTH: u8 = 0x01;
/// Signature key reference (PSO COMPUTE DIGITAL SIGNATURE).
pub const KEY_SIGN: u8 = 0x02;
/// ID PIN reference.
pub const PIN_ID: u8 = 0x81;
/// Signature PIN reference.
pub const PIN_SIGN: u8 = 0x82;
/// PUK reference.
pub const PUK: u8 = 0x83;
/// Fingerprint reference data for match-on-card.
pub const BIO_FINGER: u8 = 0x91;

/// Largest EF this card OS stores (the 16-bit size of the FCP): the LDS's bound, one value.
pub const MAX_EF_SIZE: usize = cardpipe_pki::lds::MAX_DATA_GROUP_BYTES;

/// An application on the chip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum App {
    /// The ICAO-style LDS application.
    Lds,
    /// The eID application (keys, certificates, PINs, fingerprint reference).
    Eid,
    /// The GlobalPlatform issuer security domain.
    Isd,
}

impl App {
    /// The application's AID.
    pub fn aid(self) -> &'static [u8] {
        match self {
            App::Lds => &LDS_AID,
            App::Eid => &EID_AID,
            App::Isd => &ISD_AID,
        }
    }

    /// Looks an application up by its full AID.
    pub fn from_aid(aid: &[u8]) -> Option<Self> {
        [App::Lds, App::Eid, App::Isd]
            .into_iter()
            .find(|a| a.aid() == aid)
    }

    /// The elementary files the application holds.
    pub fn files(self) -> &'static [u16] {
        match self {
            App::Lds => &[EF_COM, EF_DG1, EF_DG2, EF_DG3, EF_DG11, EF_SOD],
            App::Eid => &[EF_CERT_AUTH, EF_CERT_SIGN],
            App::Isd => &[],
        }
    }
}
