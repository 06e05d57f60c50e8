//! Logical Data Structure of the LDS application (AID `A0 00 00 02 47 10 01`): EF.COM and
//! data groups DG1, DG2, DG3, DG11, encoded as BER-TLV after ICAO Doc 9303 part 10, with
//! the cardpipe eID profile's own DG1 and DG11 contents.
//!
//! Tag layout (all strings UTF-8; every element is mandatory unless noted):
//!
//! ```text
//! EF.COM (file 011E)      60 { 5F01 "0108"        LDS version (ICAO)
//!                              5F36 "040000"      Unicode version (ICAO)
//!                              5C   61 75 63 6B   tags of the data groups present }
//! DG1 (file 0101)         61 { 5F10  national code, 10 ASCII digits
//!                              5F40  first (given) name
//!                              5F41  last name (surname)
//!                              5F43  father's name
//!                              5F2B  birth date, 8 ASCII digits YYYYMMDD (Gregorian, as ICAO DG11)
//!                              5F44  birth-certificate number
//!                              5F35  gender, 'M' or 'F' (ICAO "sex") }
//! DG2 (file 0102)         75 { 7F61 { 02 01 01                       number of faces
//!                                     7F60 { A1 { 80 01 01 01        ICAO header version
//!                                                 81 01 02           biometric type: face
//!                                                 87 02 01 01        format owner: ISO/IEC JTC 1/SC 37
//!                                                 88 02 00 08 }      format type: ISO/IEC 19794-5 face
//!                                            5F2E ISO/IEC 19794-5:2005 face record holding the JPEG } } }
//! DG3 (file 0103)         63 { 7F61 { 02 01 n                        number of fingers (1..=10)
//!                                     n × 7F60 { A1 { 80 02 01 01
//!                                                     81 01 08       biometric type: finger
//!                                                     82 01 ss       subtype: finger position (below)
//!                                                     87 02 01 01
//!                                                     88 02 00 01 }  ISO/IEC 19794-2 minutiae record
//!                                                5F2E the ISO/IEC 19794-2 template as enrolled } } }
//! DG11 (file 010B)        6B { 5C   5F42 5F50     tag list (ICAO)
//!                              5F42 address (ICAO "permanent address")
//!                              5F50 postal code, 10 ASCII digits }
//! ```
//!
//! Finger subtype (ISO/IEC 19785-3 / ICAO): bits 0–1 side (01 right, 10 left), bits 2–4
//! finger (1 thumb … 5 little), so positions 1–10 of ISO/IEC 19794-2 map to
//! 05 09 0D 11 15 06 0A 0E 12 16; the decoder maps back.
//!
//! All structs holding personal data have redacted `Debug` output.

use serde::{Deserialize, Serialize};
use time::Date;

use cardpipe_common::domain::applicant::{ApplicantRecord, Biometrics, Gender as ApplicantGender};

use crate::tlv::{Tlv, children, expect, nest, put};
use crate::{KeysError, Result};

/// Data groups of the cardpipe eID profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DataGroup {
    /// Demographics.
    Dg1,
    /// Face.
    Dg2,
    /// Fingerprint templates (PIN / terminal authentication protected on the chip).
    Dg3,
    /// Postal code and address.
    Dg11,
}

impl DataGroup {
    /// Every data group, in number order.
    pub const ALL: [DataGroup; 4] = [
        DataGroup::Dg1,
        DataGroup::Dg2,
        DataGroup::Dg3,
        DataGroup::Dg11,
    ];

    /// Data-group number, as in the LDSSecurityObject.
    pub fn number(self) -> u8 {
        match self {
            DataGroup::Dg1 => 1,
            DataGroup::Dg2 => 2,
            DataGroup::Dg3 => 3,
            DataGroup::Dg11 => 11,
        }
    }

    /// From a data-group number.
    pub fn from_number(n: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.number() == n)
    }

    /// Outer template tag (ICAO).
    pub fn tag(self) -> u8 {
        match self {
            DataGroup::Dg1 => 0x61,
            DataGroup::Dg2 => 0x75,
            DataGroup::Dg3 => 0x63,
            DataGroup::Dg11 => 0x6B,
        }
    }

    /// Elementary file identifier in the LDS application.
    pub fn file_id(self) -> u16 {
        0x0100 | u16::from(self.number())
    }
}

/// EF.COM file identifier.
pub const EF_COM_FID: u16 = 0x011E;
/// EF.SOD file identifier.
pub const EF_SOD_FID: u16 = 0x011D;
/// AID of the LDS application.
pub const LDS_AID: [u8; 7] = [0xA0, 0x00, 0x00, 0x02, 0x47, 0x10, 0x01];

/// Gender as recorded by the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gender {
    /// 'M'.
    Male,
    /// 'F'.
    Female,
}

/// DG1 content: birth-certificate data.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonalData {
    /// 10-digit national code.
    pub national_code: String,
    /// Given name.
    pub first_name: String,
    /// Surname.
    pub last_name: String,
    /// Father's name.
    pub father_name: String,
    /// Birth date (Gregorian).
    pub birth_date: Date,
    /// Birth-certificate number.
    pub birth_certificate_number: String,
    /// Gender.
    pub gender: Gender,
}

impl std::fmt::Debug for PersonalData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PersonalData(<redacted>)")
    }
}

/// DG11 content.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressData {
    /// 10-digit postal code.
    pub postal_code: String,
    /// Address, Persian.
    pub address: String,
}

impl std::fmt::Debug for AddressData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AddressData(<redacted>)")
    }
}

/// One enrolled fingerprint template.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FingerprintTemplate {
    /// Finger position 1–10 (ISO/IEC 19794-2: 1 right thumb … 5 right little, 6 left thumb … 10 left little).
    pub position: u8,
    /// ISO/IEC 19794-2 minutiae record, as enrolled.
    pub template: Vec<u8>,
}

impl std::fmt::Debug for FingerprintTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FingerprintTemplate(position {}, {} bytes)",
            self.position,
            self.template.len()
        )
    }
}

/// Everything the chip's LDS application carries, as the keys stage receives it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChipDataInput {
    /// DG1.
    pub personal: PersonalData,
    /// DG11.
    pub address: AddressData,
    /// DG2: the face photo, JPEG.
    pub photo_jpeg: Vec<u8>,
    /// DG3: up to ten templates.
    pub fingerprints: Vec<FingerprintTemplate>,
}

impl std::fmt::Debug for ChipDataInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ChipDataInput(<redacted>, photo {} bytes, {} fingerprints)",
            self.photo_jpeg.len(),
            self.fingerprints.len()
        )
    }
}

/// Encoded files of the LDS application (EF.SOD is added by [`crate::sod`]).
#[derive(Clone, PartialEq, Eq)]
pub struct EncodedLds {
    /// EF.COM.
    pub ef_com: Vec<u8>,
    /// DG1.
    pub dg1: Vec<u8>,
    /// DG2.
    pub dg2: Vec<u8>,
    /// DG3.
    pub dg3: Vec<u8>,
    /// DG11.
    pub dg11: Vec<u8>,
}

impl std::fmt::Debug for EncodedLds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EncodedLds(<redacted>)")
    }
}

impl EncodedLds {
    /// The data groups with their bytes, in number order (what EF.SOD hashes).
    pub fn data_groups(&self) -> [(DataGroup, &[u8]); 4] {
        [
            (DataGroup::Dg1, &self.dg1),
            (DataGroup::Dg2, &self.dg2),
            (DataGroup::Dg3, &self.dg3),
            (DataGroup::Dg11, &self.dg11),
        ]
    }
}

/// Encodes EF.COM and every data group.
pub fn encode(input: &ChipDataInput) -> Result<EncodedLds> {
    Ok(EncodedLds {
        ef_com: encode_ef_com(&DataGroup::ALL),
        dg1: encode_dg1(&input.personal)?,
        dg2: encode_dg2(&input.photo_jpeg)?,
        dg3: encode_dg3(&input.fingerprints)?,
        dg11: encode_dg11(&input.address)?,
    })
}

fn invalid(what: &str) -> KeysError {
    KeysError::Invalid(what.to_owned())
}

fn lds_err(what: &str) -> KeysError {
    KeysError::Lds(what.to_owned())
}

fn ten_digits(s: &str) -> bool {
    s.len() == 10 && s.bytes().all(|b| b.is_ascii_digit())
}

/// EF.COM listing the given data groups.
pub fn encode_ef_com(groups: &[DataGroup]) -> Vec<u8> {
    let mut out = Vec::new();
    nest(&mut out, 0x60, |v| {
        put(v, 0x5F01, b"0108");
        put(v, 0x5F36, b"040000");
        let tags: Vec<u8> = groups.iter().map(|g| g.tag()).collect();
        put(v, 0x5C, &tags);
    });
    out
}

/// Decoded EF.COM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EfCom {
    /// LDS version string, e.g. "0108".
    pub lds_version: String,
    /// Unicode version string.
    pub unicode_version: String,
    /// Data groups listed.
    pub data_groups: Vec<DataGroup>,
}

/// Decodes EF.COM.
pub fn decode_ef_com(bytes: &[u8]) -> Result<EfCom> {
    let body = expect(bytes, 0x60, "EF.COM")?;
    let mut com = EfCom {
        lds_version: String::new(),
        unicode_version: String::new(),
        data_groups: Vec::new(),
    };
    for t in children(body)? {
        match t.tag {
            0x5F01 => com.lds_version = text(t, "LDS version")?,
            0x5F36 => com.unicode_version = text(t, "Unicode version")?,
            0x5C => {
                for &tag in t.value {
                    let g = DataGroup::ALL
                        .into_iter()
                        .find(|g| g.tag() == tag)
                        .ok_or_else(|| {
                            KeysError::Lds(format!("EF.COM lists unknown data-group tag {tag:02X}"))
                        })?;
                    com.data_groups.push(g);
                }
            }
            _ => {}
        }
    }
    Ok(com)
}

fn text(t: Tlv<'_>, what: &str) -> Result<String> {
    String::from_utf8(t.value.to_vec()).map_err(|_| KeysError::Lds(format!("{what} is not UTF-8")))
}

/// Encodes DG1.
pub fn encode_dg1(p: &PersonalData) -> Result<Vec<u8>> {
    if !ten_digits(&p.national_code) {
        return Err(invalid("national code must be 10 ASCII digits"));
    }
    for (v, what) in [
        (&p.first_name, "first name"),
        (&p.last_name, "last name"),
        (&p.birth_certificate_number, "birth-certificate number"),
    ] {
        if v.trim().is_empty() {
            return Err(KeysError::Invalid(format!("{what} is empty")));
        }
    }
    let date = format!(
        "{:04}{:02}{:02}",
        p.birth_date.year(),
        u8::from(p.birth_date.month()),
        p.birth_date.day()
    );
    let mut out = Vec::new();
    nest(&mut out, 0x61, |v| {
        put(v, 0x5F10, p.national_code.as_bytes());
        put(v, 0x5F40, p.first_name.as_bytes());
        put(v, 0x5F41, p.last_name.as_bytes());
        put(v, 0x5F43, p.father_name.as_bytes());
        put(v, 0x5F2B, date.as_bytes());
        put(v, 0x5F44, p.birth_certificate_number.as_bytes());
        put(
            v,
            0x5F35,
            match p.gender {
                Gender::Male => b"M",
                Gender::Female => b"F",
            },
        );
    });
    Ok(out)
}

/// Decodes DG1.
pub fn decode_dg1(bytes: &[u8]) -> Result<PersonalData> {
    let body = expect(bytes, 0x61, "DG1")?;
    let (mut code, mut first, mut last, mut father, mut birth, mut bcn, mut gender) =
        (None, None, None, None, None, None, None);
    for t in children(body)? {
        match t.tag {
            0x5F10 => code = Some(text(t, "national code")?),
            0x5F40 => first = Some(text(t, "first name")?),
            0x5F41 => last = Some(text(t, "last name")?),
            0x5F43 => father = Some(text(t, "father's name")?),
            0x5F2B => birth = Some(parse_yyyymmdd(t.value)?),
            0x5F44 => bcn = Some(text(t, "birth-certificate number")?),
            0x5F35 => {
                gender = Some(match t.value {
                    b"M" => Gender::Male,
                    b"F" => Gender::Female,
                    _ => return Err(lds_err("DG1 gender is neither M nor F")),
                })
            }
            _ => {}
        }
    }
    let missing = |what: &str| KeysError::Lds(format!("DG1 lacks the {what}"));
    let national_code = code.ok_or_else(|| missing("national code"))?;
    if !ten_digits(&national_code) {
        return Err(lds_err("DG1 national code is not 10 digits"));
    }
    Ok(PersonalData {
        national_code,
        first_name: first.ok_or_else(|| missing("first name"))?,
        last_name: last.ok_or_else(|| missing("last name"))?,
        father_name: father.ok_or_else(|| missing("father's name"))?,
        birth_date: birth.ok_or_else(|| missing("birth date"))?,
        birth_certificate_number: bcn.ok_or_else(|| missing("birth-certificate number"))?,
        gender: gender.ok_or_else(|| missing("gender"))?,
    })
}

fn parse_yyyymmdd(v: &[u8]) -> Result<Date> {
    let bad = || lds_err("DG1 birth date is not YYYYMMDD");
    if v.len() != 8 || !v.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let n =
        |r: std::ops::Range<usize>| v[r].iter().fold(0u32, |a, &b| a * 10 + u32::from(b - b'0'));
    let month = time::Month::try_from(n(4..6) as u8).map_err(|_| bad())?;
    Date::from_calendar_date(n(0..4) as i32, month, n(6..8) as u8).map_err(|_| bad())
}

/// ISO/IEC 19794-5:2005 face record wrapping one JPEG: 14-byte general header, 20-byte
/// facial information block (no feature points, unspecified attributes), 12-byte image
/// information block (full-frontal, JPEG), then the image. Width and height come from the
/// JPEG's SOF marker when present.
fn face_record(jpeg: &[u8]) -> Result<Vec<u8>> {
    let (width, height) = jpeg_dimensions(jpeg).unwrap_or((0, 0));
    let block_len = u32::try_from(20 + 12 + jpeg.len()).map_err(|_| invalid("photo too large"))?;
    let record_len = 14 + block_len;
    let mut r = Vec::with_capacity(record_len as usize);
    r.extend_from_slice(FACE_RECORD_MAGIC);
    r.extend_from_slice(&record_len.to_be_bytes());
    r.extend_from_slice(&1u16.to_be_bytes()); // number of facial images
    // Facial information block.
    r.extend_from_slice(&block_len.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes()); // feature points
    r.extend_from_slice(&[0, 0, 0]); // gender, eye colour, hair colour: unspecified
    r.extend_from_slice(&[0, 0, 0]); // feature mask
    r.extend_from_slice(&0u16.to_be_bytes()); // expression unspecified
    r.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // pose angles and uncertainties
    // Image information block.
    r.push(1); // face image type: full frontal
    r.push(0); // image data type: JPEG
    r.extend_from_slice(&width.to_be_bytes());
    r.extend_from_slice(&height.to_be_bytes());
    r.push(1); // colour space: sRGB
    r.push(2); // source type: digital still camera
    r.extend_from_slice(&0u16.to_be_bytes()); // device type
    r.extend_from_slice(&0u16.to_be_bytes()); // quality
    r.extend_from_slice(jpeg);
    Ok(r)
}

/// Width and height from the JPEG's frame header (SOF), walking the marker segments as intake's
/// structural check does: fill bytes (any number of `FF` before a marker, ITU-T T.81
/// B.1.1.2) and the markers without a length (TEM, RSTn) are skipped. `None` when there is no
/// frame header before the scan.
fn jpeg_dimensions(jpeg: &[u8]) -> Option<(u16, u16)> {
    if jpeg.get(..2)? != [0xFF, 0xD8] {
        return None;
    }
    let mut i = 2;
    loop {
        if *jpeg.get(i)? != 0xFF {
            return None;
        }
        while *jpeg.get(i + 1)? == 0xFF {
            i += 1;
        }
        let marker = jpeg[i + 1];
        i += 2;
        match marker {
            0x01 | 0xD0..=0xD7 => continue,
            // SOI, EOI or the scan: no frame header before it.
            0xD8..=0xDA => return None,
            _ => {}
        }
        let len = usize::from(u16::from_be_bytes([*jpeg.get(i)?, *jpeg.get(i + 1)?]));
        if matches!(marker, 0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF) {
            let h = u16::from_be_bytes([*jpeg.get(i + 3)?, *jpeg.get(i + 4)?]);
            let w = u16::from_be_bytes([*jpeg.get(i + 5)?, *jpeg.get(i + 6)?]);
            return Some((w, h));
        }
        i += len;
    }
}

fn biometric_header(v: &mut Vec<u8>, bio_type: u8, subtype: Option<u8>, format_type: u16) {
    nest(v, 0xA1, |h| {
        put(h, 0x80, &[0x01, 0x01]);
        put(h, 0x81, &[bio_type]);
        if let Some(s) = subtype {
            put(h, 0x82, &[s]);
        }
        put(h, 0x87, &[0x01, 0x01]);
        put(h, 0x88, &format_type.to_be_bytes());
    });
}

/// "FAC\0" format identifier and "010\0" version of an ISO/IEC 19794-5:2005 record.
const FACE_RECORD_MAGIC: &[u8; 8] = &[b'F', b'A', b'C', 0, b'0', b'1', b'0', 0];

/// Largest elementary file of the cardpipe chip profile (its FCP carries a 16-bit size):
/// every data group must fit, DG2 with the portrait first among them.
pub const MAX_DATA_GROUP_BYTES: usize = 0xFFFF;

/// Whether `jpeg` can be the card's portrait: it encodes as DG2 (a JPEG whose header the
/// face record needs) and the DG2 fits [`MAX_DATA_GROUP_BYTES`]. Intake applies this, so no
/// application is refused for its photo after its keys were issued. The error names sizes,
/// never content.
pub fn check_portrait(jpeg: &[u8]) -> std::result::Result<(), String> {
    let dg2 = encode_dg2(jpeg).map_err(|e| match e {
        KeysError::Lds(m) => m,
        other => other.to_string(),
    })?;
    if dg2.len() > MAX_DATA_GROUP_BYTES {
        return Err(format!(
            "photo of {} bytes does not fit the chip: its DG2 would be {} bytes, the card holds at most {MAX_DATA_GROUP_BYTES} (send at most {} bytes)",
            jpeg.len(),
            dg2.len(),
            MAX_DATA_GROUP_BYTES.saturating_sub(dg2.len() - jpeg.len())
        ));
    }
    Ok(())
}

/// Encodes DG2 from the JPEG photo.
pub fn encode_dg2(jpeg: &[u8]) -> Result<Vec<u8>> {
    if jpeg.get(..2) != Some(&[0xFF, 0xD8][..]) {
        return Err(invalid("photo is not a JPEG (no SOI marker)"));
    }
    let record = face_record(jpeg)?;
    let mut out = Vec::new();
    nest(&mut out, 0x75, |v| {
        nest(v, 0x7F61, |g| {
            put(g, 0x02, &[1]);
            nest(g, 0x7F60, |b| {
                biometric_header(b, 0x02, None, 0x0008);
                put(b, 0x5F2E, &record);
            });
        });
    });
    Ok(out)
}

/// Decoded DG2.
#[derive(Clone, PartialEq, Eq)]
pub struct FaceImage {
    /// Width from the face record (0 if unknown).
    pub width: u16,
    /// Height from the face record (0 if unknown).
    pub height: u16,
    /// The JPEG.
    pub jpeg: Vec<u8>,
}

impl std::fmt::Debug for FaceImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FaceImage({}x{}, {} bytes)",
            self.width,
            self.height,
            self.jpeg.len()
        )
    }
}

/// Biometric data blocks (5F2E) of a DG2/DG3 biometric information group, with their
/// headers' subtype.
fn biometric_blocks(bytes: &[u8], outer: u32, what: &str) -> Result<Vec<(Option<u8>, Vec<u8>)>> {
    let body = expect(bytes, outer, what)?;
    let group = expect(body, 0x7F61, what)?;
    let kids = children(group)?;
    let count = kids
        .iter()
        .find(|t| t.tag == 0x02)
        .and_then(|t| t.value.first().copied())
        .ok_or_else(|| KeysError::Lds(format!("{what}: no instance count")))?;
    let mut out = Vec::new();
    for t in kids.iter().filter(|t| t.tag == 0x7F60) {
        let mut subtype = None;
        let mut data = None;
        for e in children(t.value)? {
            match e.tag {
                0xA1 => {
                    for h in children(e.value)? {
                        if h.tag == 0x82 {
                            subtype = h.value.first().copied();
                        }
                    }
                }
                0x5F2E => data = Some(e.value.to_vec()),
                _ => {}
            }
        }
        out.push((
            subtype,
            data.ok_or_else(|| KeysError::Lds(format!("{what}: template without data")))?,
        ));
    }
    if out.len() != usize::from(count) {
        return Err(KeysError::Lds(format!(
            "{what}: count {count} but {} templates",
            out.len()
        )));
    }
    Ok(out)
}

/// Decodes DG2 back to the photo.
pub fn decode_dg2(bytes: &[u8]) -> Result<FaceImage> {
    let blocks = biometric_blocks(bytes, 0x75, "DG2")?;
    let [(_, record)] = blocks.as_slice() else {
        return Err(lds_err("DG2 must hold exactly one face"));
    };
    if record.len() < 46 || &record[..8] != FACE_RECORD_MAGIC {
        return Err(lds_err("DG2 face record header is not ISO/IEC 19794-5"));
    }
    let width = u16::from_be_bytes([record[36], record[37]]);
    let height = u16::from_be_bytes([record[38], record[39]]);
    Ok(FaceImage {
        width,
        height,
        jpeg: record[46..].to_vec(),
    })
}

fn finger_subtype(position: u8) -> Option<u8> {
    let (side, finger) = match position {
        1..=5 => (0b01, position),
        6..=10 => (0b10, position - 5),
        _ => return None,
    };
    Some((finger << 2) | side)
}

fn finger_position(subtype: u8) -> Option<u8> {
    let finger = subtype >> 2;
    if !(1..=5).contains(&finger) {
        return None;
    }
    match subtype & 0b11 {
        0b01 => Some(finger),
        0b10 => Some(finger + 5),
        _ => None,
    }
}

/// Encodes DG3 from up to ten templates with distinct positions.
pub fn encode_dg3(templates: &[FingerprintTemplate]) -> Result<Vec<u8>> {
    if templates.is_empty() || templates.len() > 10 {
        return Err(invalid("DG3 needs between 1 and 10 fingerprint templates"));
    }
    let mut seen = [false; 11];
    for t in templates {
        let Some(_) = finger_subtype(t.position) else {
            return Err(invalid("finger position must be 1..=10"));
        };
        if std::mem::replace(&mut seen[usize::from(t.position)], true) {
            return Err(invalid("two templates for the same finger position"));
        }
        if t.template.get(..4) != Some(&b"FMR\0"[..]) {
            return Err(invalid(
                "fingerprint template is not an ISO/IEC 19794-2 record (no FMR header)",
            ));
        }
    }
    let mut out = Vec::new();
    nest(&mut out, 0x63, |v| {
        nest(v, 0x7F61, |g| {
            put(g, 0x02, &[templates.len() as u8]);
            for t in templates {
                nest(g, 0x7F60, |b| {
                    biometric_header(b, 0x08, finger_subtype(t.position), 0x0001);
                    put(b, 0x5F2E, &t.template);
                });
            }
        });
    });
    Ok(out)
}

/// Decodes DG3.
pub fn decode_dg3(bytes: &[u8]) -> Result<Vec<FingerprintTemplate>> {
    biometric_blocks(bytes, 0x63, "DG3")?
        .into_iter()
        .map(|(subtype, template)| {
            let position = subtype
                .and_then(finger_position)
                .ok_or_else(|| lds_err("DG3 template has no valid finger subtype"))?;
            Ok(FingerprintTemplate { position, template })
        })
        .collect()
}

/// Encodes DG11.
pub fn encode_dg11(a: &AddressData) -> Result<Vec<u8>> {
    if !ten_digits(&a.postal_code) {
        return Err(invalid("postal code must be 10 ASCII digits"));
    }
    let mut out = Vec::new();
    nest(&mut out, 0x6B, |v| {
        put(v, 0x5C, &[0x5F, 0x42, 0x5F, 0x50]);
        put(v, 0x5F42, a.address.as_bytes());
        put(v, 0x5F50, a.postal_code.as_bytes());
    });
    Ok(out)
}

/// Decodes DG11.
pub fn decode_dg11(bytes: &[u8]) -> Result<AddressData> {
    let body = expect(bytes, 0x6B, "DG11")?;
    let (mut address, mut postal) = (None, None);
    for t in children(body)? {
        match t.tag {
            0x5F42 => address = Some(text(t, "address")?),
            0x5F50 => postal = Some(text(t, "postal code")?),
            _ => {}
        }
    }
    Ok(AddressData {
        postal_code: postal.ok_or_else(|| lds_err("DG11 lacks the postal code"))?,
        address: address.ok_or_else(|| lds_err("DG11 lacks the address"))?,
    })
}

/// Decodes a whole set back into the input form (what QC compares against the registry).
pub fn decode(lds: &EncodedLds) -> Result<ChipDataInput> {
    let com = decode_ef_com(&lds.ef_com)?;
    if com.data_groups != DataGroup::ALL {
        return Err(lds_err("EF.COM does not list DG1, DG2, DG3 and DG11"));
    }
    Ok(ChipDataInput {
        personal: decode_dg1(&lds.dg1)?,
        address: decode_dg11(&lds.dg11)?,
        photo_jpeg: decode_dg2(&lds.dg2)?.jpeg,
        fingerprints: decode_dg3(&lds.dg3)?,
    })
}

/// Sample chip data for tests, examples and the benchmark (synthetic person, tiny JPEG,
/// minimal but well-formed ISO/IEC 19794-2 headers).
pub fn sample_input(seed: u32) -> ChipDataInput {
    // A national code with a valid check digit, derived from the seed.
    let mut digits: Vec<u32> = format!("{:09}", (seed % 1_000_000_000))
        .bytes()
        .map(|b| u32::from(b - b'0'))
        .collect();
    let s: u32 = digits
        .iter()
        .enumerate()
        .map(|(i, d)| d * (10 - i as u32))
        .sum::<u32>()
        % 11;
    digits.push(if s < 2 { s } else { 11 - s });
    let national_code: String = digits.iter().map(|d| char::from(b'0' + *d as u8)).collect();
    let mut jpeg = vec![
        0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x11, 0x08, 0x01, 0xE0, 0x01, 0x68, 0x03,
    ];
    jpeg.extend_from_slice(&[0x01, 0x22, 0x00, 0x02, 0x11, 0x01, 0x03, 0x11, 0x01]);
    jpeg.extend(std::iter::repeat_n(0x5A, 12_000));
    jpeg.extend_from_slice(&[0xFF, 0xD9]);
    let fingerprints = (1..=10)
        .map(|position| {
            let mut template = b"FMR\0 20\0".to_vec();
            template.extend(std::iter::repeat_n(position, 400));
            FingerprintTemplate { position, template }
        })
        .collect();
    ChipDataInput {
        personal: PersonalData {
            national_code,
            first_name: "زهرا".into(),
            last_name: "احمدی".into(),
            father_name: "علی".into(),
            birth_date: time::macros::date!(1990 - 03 - 21),
            birth_certificate_number: "12345".into(),
            gender: Gender::Female,
        },
        address: AddressData {
            postal_code: "1234567890".into(),
            address: "تهران، خیابان آزادی، پلاک ۱۲".into(),
        },
        photo_jpeg: jpeg,
        fingerprints,
    }
}

/// A whole sample application (the registry's record and its biometrics) built from
/// [`sample_input`]`(seed)`: for tests that seed the store with applications ready for the
/// keys stage. `registry_id` must be unique per store; the tracking code is random.
pub fn sample_applicant(
    seed: u32,
    registry_id: &str,
) -> (
    cardpipe_common::domain::applicant::ApplicantRecord,
    cardpipe_common::domain::applicant::Biometrics,
) {
    use cardpipe_common::domain::applicant::{
        ApplicantGroup, ApplicantRecord, Biometrics, Fees, FingerprintEntry,
    };
    let sample = sample_input(seed);
    let record = ApplicantRecord {
        registry_id: registry_id.to_owned(),
        applied_on: time::macros::date!(2026 - 10 - 01),
        tracking_code: format!("TC{}", uuid::Uuid::new_v4().simple()),
        payment_tracking_code: format!("PAY-{registry_id}"),
        national_code: sample.personal.national_code,
        first_name: sample.personal.first_name,
        last_name: sample.personal.last_name,
        father_name: sample.personal.father_name,
        birth_date: sample.personal.birth_date,
        birth_certificate_number: format!("{}", 4000 + seed % 100_000),
        gender: match sample.personal.gender {
            Gender::Male => cardpipe_common::domain::applicant::Gender::Male,
            Gender::Female => cardpipe_common::domain::applicant::Gender::Female,
        },
        postal_code: sample.address.postal_code,
        address: sample.address.address,
        mobile: "09120000000".into(),
        landline: "02100000000".into(),
        applicant_group: ApplicantGroup::FirstCard,
        previous_card_issued_on: None,
        pickup_office: "THR-001".into(),
        fees: Fees {
            issuance_rial: 200_000,
            office_fee_rial: 90_000,
            delivery_fee_rial: 20_000,
        },
    };
    let biometrics = Biometrics {
        photo_jpeg: sample.photo_jpeg,
        fingerprints: sample
            .fingerprints
            .into_iter()
            .map(|f| FingerprintEntry {
                position: f.position,
                template: Some(f.template),
                missing_reason: None,
            })
            .collect(),
    };
    (record, biometrics)
}

/// The chip data of an applicant (DG1, DG2, DG3, DG11).
pub fn chip_input(record: &ApplicantRecord, biometrics: &Biometrics) -> ChipDataInput {
    ChipDataInput {
        personal: PersonalData {
            national_code: record.national_code.clone(),
            first_name: record.first_name.clone(),
            last_name: record.last_name.clone(),
            father_name: record.father_name.clone(),
            birth_date: record.birth_date,
            birth_certificate_number: record.birth_certificate_number.clone(),
            gender: match record.gender {
                ApplicantGender::Male => Gender::Male,
                ApplicantGender::Female => Gender::Female,
            },
        },
        address: AddressData {
            postal_code: record.postal_code.clone(),
            address: record.address.clone(),
        },
        photo_jpeg: biometrics.photo_jpeg.clone(),
        fingerprints: biometrics
            .fingerprints
            .iter()
            .filter_map(|f| {
                f.template.as_ref().map(|t| FingerprintTemplate {
                    position: f.position,
                    template: t.clone(),
                })
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing (`jpeg_check`): a JPEG with fill bytes before a marker, which intake's
    /// structural check accepts, got a 0×0 face record in DG2.
    #[test]
    fn face_record_dimensions_skip_fill_bytes_and_standalone_markers() {
        let sof = [0xFF, 0xC0, 0, 11, 8, 0x01, 0x40, 0x00, 0xF0, 1, 1, 0x11, 0];
        let app0 = [0xFF, 0xE0, 0, 4, 0, 0];
        for prefix in [
            &[][..],
            &[0xFF, 0xFF][..],       // fill bytes before APP0
            &[0xFF, 0xD0, 0xFF][..], // a restart marker, then a fill byte
            &[0xFF, 0x01][..],       // TEM
        ] {
            let mut jpeg = vec![0xFF, 0xD8];
            jpeg.extend_from_slice(prefix);
            jpeg.extend_from_slice(&app0);
            jpeg.extend_from_slice(&[0xFF]); // a fill byte before the frame header
            jpeg.extend_from_slice(&sof);
            jpeg.extend_from_slice(&[0xFF, 0xD9]);
            let face = decode_dg2(&encode_dg2(&jpeg).unwrap()).unwrap();
            assert_eq!(
                (face.width, face.height),
                (240, 320),
                "prefix {prefix:02X?}"
            );
            assert_eq!(face.jpeg, jpeg);
        }
        // No frame header before the scan: unknown (0×0).
        let jpeg = [0xFF, 0xD8, 0xFF, 0xDA, 0, 2, 0xFF, 0xD9];
        let face = decode_dg2(&encode_dg2(&jpeg).unwrap()).unwrap();
        assert_eq!((face.width, face.height), (0, 0));
    }

    #[test]
    fn everything_roundtrips() {
        let input = sample_input(49_937_089);
        let lds = encode(&input).unwrap();
        assert_eq!(decode(&lds).unwrap(), input);
        assert_eq!(lds.dg1[0], 0x61);
        assert_eq!(lds.dg2[0], 0x75);
        assert_eq!(lds.dg3[0], 0x63);
        assert_eq!(lds.dg11[0], 0x6B);
        let face = decode_dg2(&lds.dg2).unwrap();
        assert_eq!((face.width, face.height), (360, 480));
        let com = decode_ef_com(&lds.ef_com).unwrap();
        assert_eq!(com.lds_version, "0108");
        let fingers = decode_dg3(&lds.dg3).unwrap();
        assert_eq!(
            fingers.iter().map(|f| f.position).collect::<Vec<_>>(),
            (1..=10).collect::<Vec<_>>()
        );
        assert_eq!(DataGroup::Dg11.file_id(), 0x010B);
    }

    #[test]
    fn finger_subtypes_follow_the_icao_bit_layout() {
        let expected = [0x05, 0x09, 0x0D, 0x11, 0x15, 0x06, 0x0A, 0x0E, 0x12, 0x16];
        for (i, e) in expected.into_iter().enumerate() {
            let pos = i as u8 + 1;
            assert_eq!(finger_subtype(pos), Some(e));
            assert_eq!(finger_position(e), Some(pos));
        }
        assert_eq!(finger_subtype(0), None);
        assert_eq!(finger_position(0x03), None);
    }

    #[test]
    fn bad_input_is_rejected_without_echoing_it() {
        let mut input = sample_input(1);
        input.personal.national_code = "98765".into();
        let err = encode_dg1(&input.personal).unwrap_err().to_string();
        assert!(!err.contains("98765"), "{err}");
        let mut dup = sample_input(2).fingerprints;
        dup[1].position = 1;
        assert!(encode_dg3(&dup).is_err());
        assert!(encode_dg2(b"GIF89a").is_err());
        assert!(decode_dg1(&[0x61, 0x03, 0x5F, 0x10, 0x00]).is_err());
        assert!(format!("{input:?}").contains("redacted"));
        let mut truncated = encode(&sample_input(3)).unwrap().dg2;
        truncated.truncate(truncated.len() - 10);
        assert!(decode_dg2(&truncated).is_err());
    }
}
