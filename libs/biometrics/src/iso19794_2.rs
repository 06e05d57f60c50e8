//! ISO/IEC 19794-2 finger minutiae records: a strict parser (2005 and 2011 formats) and a
//! 2005-format writer.
//!
//! Templates come from enrolment stations we do not control, so the parser assumes nothing:
//! every header field is range checked, every length is checked against the bytes actually
//! present, and a record is accepted only if it is consumed exactly. Errors are typed
//! ([`IsoError`]) and name the field and its byte offset so an operator can tell *what* is
//! wrong with a record — but they never carry field *values* (a coordinate or an angle is
//! biometric data and must not reach logs). For the same reason [`Minutia`], [`FingerView`]
//! and [`FingerprintRecord`] implement `Debug` by hand and redact the minutiae.
//!
//! Layout (2005, all integers big-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 4 | format identifier `"FMR\0"` |
//! | 4 | version `" 20\0"` |
//! | 4 | total record length |
//! | 2 | capture equipment certification (4 bits) + capture device type (12 bits) |
//! | 2+2 | image size x, y (pixels) |
//! | 2+2 | resolution x, y (pixels per centimetre) |
//! | 1 | number of finger views |
//! | 1 | reserved (0) |
//! | per view: 4 | finger position, view number (4 bits) + impression type (4 bits), finger quality, minutiae count |
//! | per minutia: 6 | type (2 bits) + x (14 bits), reserved (2 bits) + y (14 bits), angle (360/256 degree units, counter-clockwise), quality |
//! | per view: 2 + n | extended data block length, then extended data areas (type 2, length 2, data) |
//!
//! The 2011 format (`"030\0"`) has a 15-byte record header and a longer per-representation
//! header (capture time, device ids, quality blocks, optional certification blocks) and 5- or
//! 6-byte minutiae; [`parse`] reads it into the same model, and [`FingerprintRecord::to_bytes`]
//! always writes 2005. In the model a 2011 representation's quality is its first quality block
//! with a score, a minutia quality of 254/255 ("not reported"/"failed") reads as 0, and a
//! representation captured at another image size or resolution than the first keeps its own
//! ([`FingerView::geometry`]). Every impression type and finger position code the edition
//! defines is accepted as sent; which view becomes which finger is decided by
//! [`crate::matcher::place_finger`], not here.

use std::fmt;

/// Why a record was refused. Offsets are byte offsets from the start of the record.
///
/// Messages name the field and the offset only, never a value read from the record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IsoError {
    /// The record ends before a field could be read.
    #[error(
        "record truncated: field `{field}` at byte offset {offset} needs {needed} bytes, only {available} remain"
    )]
    Truncated {
        field: &'static str,
        offset: usize,
        needed: usize,
        available: usize,
    },
    /// A field holds a value the standard does not allow, or one inconsistent with other fields.
    #[error("invalid field `{field}` at byte offset {offset}: {reason}")]
    Invalid {
        field: &'static str,
        offset: usize,
        reason: &'static str,
    },
    /// The header's record length disagrees with the number of bytes supplied.
    #[error(
        "record length field at byte offset 8 declares {declared} bytes but the record has {actual}"
    )]
    LengthMismatch { declared: u64, actual: usize },
    /// Bytes left over after the last finger view.
    #[error("{extra} unexpected bytes after the last finger view at byte offset {offset}")]
    TrailingBytes { offset: usize, extra: usize },
    /// A record could not be written because a count or value does not fit the format.
    #[error("cannot encode field `{field}`: {reason}")]
    Unencodable {
        field: &'static str,
        reason: &'static str,
    },
}

/// Which edition of the standard a record was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IsoVersion {
    /// ISO/IEC 19794-2:2005, version `" 20\0"`.
    V2005,
    /// ISO/IEC 19794-2:2011, version `"030\0"`.
    V2011,
}

/// Minutia type as coded in the top two bits of the x coordinate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MinutiaKind {
    Other,
    RidgeEnding,
    Bifurcation,
}

impl MinutiaKind {
    fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            0 => Some(Self::Other),
            1 => Some(Self::RidgeEnding),
            2 => Some(Self::Bifurcation),
            _ => None,
        }
    }
    fn bits(self) -> u16 {
        match self {
            Self::Other => 0,
            Self::RidgeEnding => 1,
            Self::Bifurcation => 2,
        }
    }
}

/// One minutia. Coordinates are pixels in the record's image, `angle` is in units of
/// 360/256 degrees measured counter-clockwise from the x axis (the ISO convention).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Minutia {
    pub kind: MinutiaKind,
    pub x: u16,
    pub y: u16,
    pub angle: u8,
    /// 0–100, 0 meaning "not reported".
    pub quality: u8,
}

impl fmt::Debug for Minutia {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Minutia { <redacted> }")
    }
}

/// Image size and resolution of one finger representation (2011 records carry them per
/// representation; 2005 records once, in the record header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ViewGeometry {
    pub width: u16,
    pub height: u16,
    /// Pixels per centimetre.
    pub x_resolution: u16,
    pub y_resolution: u16,
}

/// One finger view (2005) or finger representation (2011).
#[derive(Clone, PartialEq, Eq)]
pub struct FingerView {
    /// 0 = unknown, 1–5 right thumb..little, 6–10 left thumb..little; a 2011 record may also
    /// carry the multi-finger codes 13–15 and 40–50 (never placed on one finger).
    pub position: u8,
    pub view_number: u8,
    /// As sent: 0 live-scan plain, 1 live-scan rolled, 2 non-live-scan plain, 3 non-live-scan
    /// rolled, 8 swipe; 2011 records also 4–7 (latent), 9 (vertical roll), 24 (contactless),
    /// 28 (other), 29 (unknown).
    pub impression_type: u8,
    /// 0–100 (2005: the finger quality field; 2011: the first quality block with a score,
    /// 0 when none reports one).
    pub quality: u8,
    pub minutiae: Vec<Minutia>,
    /// Raw extended data block (already validated as a sequence of areas).
    pub extended_data: Vec<u8>,
    /// This representation's own geometry when it differs from the record's (2011 records
    /// whose representations were captured at different sizes); `None`: the record's.
    pub geometry: Option<ViewGeometry>,
}

impl fmt::Debug for FingerView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FingerView")
            .field("position", &self.position)
            .field("view_number", &self.view_number)
            .field("impression_type", &self.impression_type)
            .field("quality", &self.quality)
            .field(
                "minutiae",
                &format_args!("<{} redacted>", self.minutiae.len()),
            )
            .field(
                "extended_data",
                &format_args!("<{} bytes redacted>", self.extended_data.len()),
            )
            .field("geometry", &self.geometry)
            .finish()
    }
}

/// A whole finger minutiae record.
#[derive(Clone, PartialEq, Eq)]
pub struct FingerprintRecord {
    pub version: IsoVersion,
    /// Capture equipment certification (top 4 bits) and device type id (low 12 bits).
    pub capture_equipment: u16,
    pub width: u16,
    pub height: u16,
    /// Pixels per centimetre (197 ≈ 500 dpi).
    pub x_resolution: u16,
    pub y_resolution: u16,
    pub views: Vec<FingerView>,
}

impl fmt::Debug for FingerprintRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FingerprintRecord")
            .field("version", &self.version)
            .field("width", &self.width)
            .field("height", &self.height)
            .field("x_resolution", &self.x_resolution)
            .field("y_resolution", &self.y_resolution)
            .field("views", &self.views)
            .finish()
    }
}

/// Largest coordinate / image dimension representable in 14 bits.
const MAX_DIM: u16 = 0x3FFF;
const HEADER_2005: usize = 24;

/// Bounds-checked big-endian reader that reports the field being read on failure.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], IsoError> {
        let available = self.data.len() - self.pos;
        if available < n {
            return Err(IsoError::Truncated {
                field,
                offset: self.pos,
                needed: n,
                available,
            });
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, IsoError> {
        Ok(self.take(1, field)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, IsoError> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, IsoError> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }
}

fn invalid(field: &'static str, offset: usize, reason: &'static str) -> IsoError {
    IsoError::Invalid {
        field,
        offset,
        reason,
    }
}

/// Parses a 2005 or 2011 finger minutiae record, refusing anything inconsistent.
pub fn parse(data: &[u8]) -> Result<FingerprintRecord, IsoError> {
    let mut r = Reader { data, pos: 0 };
    if r.take(4, "format identifier")? != b"FMR\0" {
        return Err(invalid("format identifier", 0, "expected \"FMR\\0\""));
    }
    let version = match r.take(4, "version")? {
        b" 20\0" => IsoVersion::V2005,
        b"030\0" => IsoVersion::V2011,
        _ => {
            return Err(invalid(
                "version",
                4,
                "expected \" 20\\0\" (2005) or \"030\\0\" (2011)",
            ));
        }
    };
    let declared = r.u32("record length")?;
    if declared as usize != data.len() {
        return Err(IsoError::LengthMismatch {
            declared: u64::from(declared),
            actual: data.len(),
        });
    }
    match version {
        IsoVersion::V2005 => parse_2005(r),
        IsoVersion::V2011 => parse_2011(r),
    }
}

fn check_dims(width: u16, height: u16, wpos: usize) -> Result<(), IsoError> {
    if width == 0 || width > MAX_DIM {
        return Err(invalid("image size x", wpos, "must be 1..=16383"));
    }
    if height == 0 || height > MAX_DIM {
        return Err(invalid("image size y", wpos + 2, "must be 1..=16383"));
    }
    Ok(())
}

fn check_resolution(x: u16, y: u16, xpos: usize, ypos: usize) -> Result<(), IsoError> {
    if x == 0 {
        return Err(invalid("x resolution", xpos, "must be non-zero"));
    }
    if y == 0 {
        return Err(invalid("y resolution", ypos, "must be non-zero"));
    }
    Ok(())
}

fn check_position(position: u8, version: IsoVersion, offset: usize) -> Result<(), IsoError> {
    match version {
        IsoVersion::V2005 if position > 10 => {
            Err(invalid("finger position", offset, "must be 0..=10"))
        }
        IsoVersion::V2011 if !matches!(position, 0..=10 | 13..=15 | 40..=50) => Err(invalid(
            "finger position",
            offset,
            "must be 0..=10, 13..=15 or 40..=50",
        )),
        _ => Ok(()),
    }
}

/// Impression types as the two editions define them (every valid code is accepted as sent;
/// none is refused for being rolled, plain, live-scan or not).
fn check_impression(imp: u8, version: IsoVersion, offset: usize) -> Result<(), IsoError> {
    match version {
        IsoVersion::V2005 if !matches!(imp, 0..=3 | 8) => Err(invalid(
            "impression type",
            offset,
            "must be 0-3 (plain/rolled, live/non-live) or 8 (swipe)",
        )),
        IsoVersion::V2011 if !matches!(imp, 0..=9 | 24 | 28 | 29) => Err(invalid(
            "impression type",
            offset,
            "must be 0-9, 24, 28 or 29",
        )),
        _ => Ok(()),
    }
}

fn check_quality(q: u8, field: &'static str, offset: usize) -> Result<(), IsoError> {
    if q > 100 {
        return Err(invalid(field, offset, "must be 0..=100"));
    }
    Ok(())
}

/// Reads `count` minutiae of `size` (5 or 6) bytes. In 2011 records a minutia quality of
/// 254 ("not reported") or 255 ("could not be computed") is valid and read as 0.
fn read_minutiae(
    r: &mut Reader<'_>,
    count: usize,
    size: usize,
    width: u16,
    height: u16,
    version: IsoVersion,
) -> Result<Vec<Minutia>, IsoError> {
    let needed = count * size + 2;
    if r.remaining() < needed {
        return Err(IsoError::Invalid {
            field: "number of minutiae",
            offset: r.pos - 1,
            reason: "more minutiae than the remaining record length can hold",
        });
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let off = r.pos;
        let xw = r.u16("minutia x")?;
        let yw = r.u16("minutia y")?;
        let angle = r.u8("minutia angle")?;
        let quality = if size == 6 {
            r.u8("minutia quality")?
        } else {
            0
        };
        let kind = MinutiaKind::from_bits((xw >> 14) as u8)
            .ok_or_else(|| invalid("minutia type", off, "type bits 11 are reserved"))?;
        if yw >> 14 != 0 {
            return Err(invalid("minutia reserved bits", off + 2, "must be zero"));
        }
        let x = xw & MAX_DIM;
        let y = yw & MAX_DIM;
        if x >= width {
            return Err(invalid("minutia x", off, "outside the image width"));
        }
        if y >= height {
            return Err(invalid("minutia y", off + 2, "outside the image height"));
        }
        let quality = match (version, quality) {
            (IsoVersion::V2011, 254 | 255) => 0,
            _ => {
                check_quality(quality, "minutia quality", off + 5)?;
                quality
            }
        };
        out.push(Minutia {
            kind,
            x,
            y,
            angle,
            quality,
        });
    }
    Ok(out)
}

/// Reads an extended data block and checks that its areas tile it exactly.
///
/// 2011 defines an area's length as covering its 4-byte header. For 2005 the text is read
/// both ways by extractors in the field (some write the length of the area's data only), so a
/// 2005 block is accepted when its areas tile it under either reading.
fn read_extended(r: &mut Reader<'_>, version: IsoVersion) -> Result<Vec<u8>, IsoError> {
    let len_off = r.pos;
    let len = r.u16("extended data block length")? as usize;
    if r.remaining() < len {
        return Err(invalid(
            "extended data block length",
            len_off,
            "longer than the remaining record",
        ));
    }
    let start = r.pos;
    let block = r.take(len, "extended data")?;
    match tile_areas(block, start, true) {
        Err(_) if version == IsoVersion::V2005 && tile_areas(block, start, false).is_ok() => {}
        other => other?,
    }
    Ok(block.to_vec())
}

/// Checks that extended data areas (type 2 bytes, length 2 bytes, data) tile `block`
/// exactly; `length_includes_header`: whether an area's length counts its 4-byte header.
fn tile_areas(block: &[u8], start: usize, length_includes_header: bool) -> Result<(), IsoError> {
    let mut i = 0;
    while i < block.len() {
        if block.len() - i < 4 {
            return Err(IsoError::Truncated {
                field: "extended data area header",
                offset: start + i,
                needed: 4,
                available: block.len() - i,
            });
        }
        let declared = u16::from_be_bytes([block[i + 2], block[i + 3]]) as usize;
        let area_len = if length_includes_header {
            declared
        } else {
            declared + 4
        };
        if area_len < 4 || area_len > block.len() - i {
            return Err(invalid(
                "extended data area length",
                start + i + 2,
                "must cover its 4-byte header and stay inside the block",
            ));
        }
        i += area_len;
    }
    Ok(())
}

/// Refuses a (finger position, view number) pair that appears twice (position 0, "unknown",
/// may repeat). Linear in the number of views: a 2011 record may hold 65,535.
fn check_unique_views(views: &[FingerView], offset: usize) -> Result<(), IsoError> {
    let mut seen = vec![false; 256 * 16];
    for v in views.iter().filter(|v| v.position != 0) {
        let slot = &mut seen[usize::from(v.position) * 16 + usize::from(v.view_number & 0x0F)];
        if std::mem::replace(slot, true) {
            return Err(invalid(
                "view number",
                offset,
                "the same finger position and view number appear twice",
            ));
        }
    }
    Ok(())
}

fn parse_2005(mut r: Reader<'_>) -> Result<FingerprintRecord, IsoError> {
    let capture_equipment = r.u16("capture equipment")?;
    let width = r.u16("image size x")?;
    let height = r.u16("image size y")?;
    check_dims(width, height, 14)?;
    let x_resolution = r.u16("x resolution")?;
    let y_resolution = r.u16("y resolution")?;
    check_resolution(x_resolution, y_resolution, 18, 20)?;
    let nviews = r.u8("number of finger views")?;
    if nviews == 0 {
        return Err(invalid("number of finger views", 22, "must be at least 1"));
    }
    if r.u8("reserved")? != 0 {
        return Err(invalid("reserved", 23, "must be zero"));
    }
    debug_assert_eq!(r.pos, HEADER_2005);
    let mut views = Vec::with_capacity(nviews as usize);
    for _ in 0..nviews {
        let off = r.pos;
        let position = r.u8("finger position")?;
        check_position(position, IsoVersion::V2005, off)?;
        let vi = r.u8("view number / impression type")?;
        let impression_type = vi & 0x0F;
        check_impression(impression_type, IsoVersion::V2005, off + 1)?;
        let quality = r.u8("finger quality")?;
        check_quality(quality, "finger quality", off + 2)?;
        let count = r.u8("number of minutiae")? as usize;
        let minutiae = read_minutiae(&mut r, count, 6, width, height, IsoVersion::V2005)?;
        let extended_data = read_extended(&mut r, IsoVersion::V2005)?;
        views.push(FingerView {
            position,
            view_number: vi >> 4,
            impression_type,
            quality,
            minutiae,
            extended_data,
            geometry: None,
        });
    }
    check_unique_views(&views, HEADER_2005)?;
    if r.remaining() != 0 {
        return Err(IsoError::TrailingBytes {
            offset: r.pos,
            extra: r.remaining(),
        });
    }
    Ok(FingerprintRecord {
        version: IsoVersion::V2005,
        capture_equipment,
        width,
        height,
        x_resolution,
        y_resolution,
        views,
    })
}

fn parse_2011(mut r: Reader<'_>) -> Result<FingerprintRecord, IsoError> {
    let nreps = r.u16("number of finger representations")?;
    if nreps == 0 {
        return Err(invalid(
            "number of finger representations",
            12,
            "must be at least 1",
        ));
    }
    let cert_flag = r.u8("device certification flag")?;
    if cert_flag > 1 {
        return Err(invalid("device certification flag", 14, "must be 0 or 1"));
    }
    let mut views = Vec::with_capacity(nreps as usize);
    let (mut width, mut height, mut xres, mut yres, mut device) = (0u16, 0u16, 0u16, 0u16, 0u16);
    for _ in 0..nreps {
        let rep_start = r.pos;
        let rep_len = r.u32("representation length")? as usize;
        if rep_len > r.remaining() + 4 || rep_len < 4 {
            return Err(invalid(
                "representation length",
                rep_start,
                "inconsistent with the remaining record length",
            ));
        }
        let _datetime = r.take(9, "capture date and time")?;
        let tech_off = r.pos;
        let tech = r.u8("capture device technology")?;
        if tech > 20 {
            return Err(invalid(
                "capture device technology",
                tech_off,
                "unknown technology code",
            ));
        }
        let _vendor = r.u16("capture device vendor")?;
        device = r.u16("capture device type")?;
        let nq = r.u8("number of quality blocks")?;
        let mut quality = None;
        for _ in 0..nq {
            let qoff = r.pos;
            let q = r.u8("quality score")?;
            if q > 100 && q != 255 {
                return Err(invalid("quality score", qoff, "must be 0..=100 or 255"));
            }
            if q <= 100 {
                quality.get_or_insert(q);
            }
            r.take(4, "quality algorithm identifiers")?;
        }
        if cert_flag == 1 {
            let nc = r.u8("number of certification blocks")?;
            r.take(3 * nc as usize, "certification blocks")?;
        }
        let off = r.pos;
        let position = r.u8("finger position")?;
        check_position(position, IsoVersion::V2011, off)?;
        let rep_number = r.u8("representation number")?;
        let xr = r.u16("x resolution")?;
        let yr = r.u16("y resolution")?;
        check_resolution(xr, yr, off + 2, off + 4)?;
        let imp = r.u8("impression type")?;
        check_impression(imp, IsoVersion::V2011, off + 6)?;
        let w = r.u16("image size x")?;
        let h = r.u16("image size y")?;
        check_dims(w, h, off + 7)?;
        let flen_off = r.pos;
        let flen = r.u8("minutia field length / ridge ending type")?;
        let size = (flen >> 4) as usize;
        if size != 5 && size != 6 {
            return Err(invalid("minutia field length", flen_off, "must be 5 or 6"));
        }
        if flen & 0x0F > 2 {
            return Err(invalid("ridge ending type", flen_off, "must be 0..=2"));
        }
        let count = r.u8("number of minutiae")? as usize;
        let minutiae = read_minutiae(&mut r, count, size, w, h, IsoVersion::V2011)?;
        let extended_data = read_extended(&mut r, IsoVersion::V2011)?;
        if r.pos - rep_start != rep_len {
            return Err(invalid(
                "representation length",
                rep_start,
                "does not match the representation's content",
            ));
        }
        // The record's geometry is the first representation's; a representation captured
        // at another size or resolution keeps its own.
        if views.is_empty() {
            (width, height, xres, yres) = (w, h, xr, yr);
        }
        let geometry = ((w, h, xr, yr) != (width, height, xres, yres)).then_some(ViewGeometry {
            width: w,
            height: h,
            x_resolution: xr,
            y_resolution: yr,
        });
        views.push(FingerView {
            position,
            view_number: rep_number & 0x0F,
            impression_type: imp,
            quality: quality.unwrap_or(0),
            minutiae,
            extended_data,
            geometry,
        });
    }
    check_unique_views(&views, 15)?;
    if r.remaining() != 0 {
        return Err(IsoError::TrailingBytes {
            offset: r.pos,
            extra: r.remaining(),
        });
    }
    Ok(FingerprintRecord {
        version: IsoVersion::V2011,
        capture_equipment: device & 0x0FFF,
        width,
        height,
        x_resolution: xres,
        y_resolution: yres,
        views,
    })
}

impl FingerprintRecord {
    /// The geometry `view` was captured at (its own, or the record's).
    pub fn view_geometry(&self, view: &FingerView) -> ViewGeometry {
        view.geometry.unwrap_or_else(|| self.record_geometry())
    }

    fn record_geometry(&self) -> ViewGeometry {
        ViewGeometry {
            width: self.width,
            height: self.height,
            x_resolution: self.x_resolution,
            y_resolution: self.y_resolution,
        }
    }

    /// Encodes the record in the 2005 format (whatever version it was read from).
    pub fn to_bytes(&self) -> Result<Vec<u8>, IsoError> {
        if self.views.is_empty() || self.views.len() > 255 {
            return Err(IsoError::Unencodable {
                field: "number of finger views",
                reason: "must be 1..=255",
            });
        }
        if self.width == 0 || self.width > MAX_DIM || self.height == 0 || self.height > MAX_DIM {
            return Err(IsoError::Unencodable {
                field: "image size",
                reason: "must be 1..=16383",
            });
        }
        if self.x_resolution == 0 || self.y_resolution == 0 {
            return Err(IsoError::Unencodable {
                field: "resolution",
                reason: "must be non-zero",
            });
        }
        let mut out = Vec::with_capacity(HEADER_2005 + 64 * self.views.len());
        out.extend_from_slice(b"FMR\0 20\0");
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.capture_equipment.to_be_bytes());
        out.extend_from_slice(&self.width.to_be_bytes());
        out.extend_from_slice(&self.height.to_be_bytes());
        out.extend_from_slice(&self.x_resolution.to_be_bytes());
        out.extend_from_slice(&self.y_resolution.to_be_bytes());
        out.push(self.views.len() as u8);
        out.push(0);
        for v in &self.views {
            if v.geometry.is_some_and(|g| g != self.record_geometry()) {
                return Err(IsoError::Unencodable {
                    field: "finger view geometry",
                    reason: "2005 records have one image size and resolution for every view",
                });
            }
            if v.position > 10 || v.view_number > 15 || !matches!(v.impression_type, 0..=3 | 8) {
                return Err(IsoError::Unencodable {
                    field: "finger view header",
                    reason: "position, view number or impression type out of range",
                });
            }
            if v.quality > 100 || v.minutiae.len() > 255 {
                return Err(IsoError::Unencodable {
                    field: "finger view header",
                    reason: "quality above 100 or more than 255 minutiae",
                });
            }
            out.extend_from_slice(&[
                v.position,
                (v.view_number << 4) | v.impression_type,
                v.quality,
                v.minutiae.len() as u8,
            ]);
            for m in &v.minutiae {
                if m.x >= self.width || m.y >= self.height || m.quality > 100 {
                    return Err(IsoError::Unencodable {
                        field: "minutia",
                        reason: "coordinate outside the image or quality above 100",
                    });
                }
                out.extend_from_slice(&((m.kind.bits() << 14) | m.x).to_be_bytes());
                out.extend_from_slice(&m.y.to_be_bytes());
                out.push(m.angle);
                out.push(m.quality);
            }
            if v.extended_data.len() > u16::MAX as usize {
                return Err(IsoError::Unencodable {
                    field: "extended data block length",
                    reason: "longer than 65535 bytes",
                });
            }
            out.extend_from_slice(&(v.extended_data.len() as u16).to_be_bytes());
            out.extend_from_slice(&v.extended_data);
        }
        let len = out.len() as u32;
        out[8..12].copy_from_slice(&len.to_be_bytes());
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FingerprintRecord {
        FingerprintRecord {
            version: IsoVersion::V2005,
            capture_equipment: 0,
            width: 300,
            height: 400,
            x_resolution: 197,
            y_resolution: 197,
            views: vec![FingerView {
                position: 2,
                view_number: 0,
                impression_type: 0,
                quality: 60,
                minutiae: (0..20)
                    .map(|i| Minutia {
                        kind: if i % 2 == 0 {
                            MinutiaKind::RidgeEnding
                        } else {
                            MinutiaKind::Bifurcation
                        },
                        x: 10 + i * 13,
                        y: 20 + i * 17,
                        angle: (i * 11) as u8,
                        quality: 50,
                    })
                    .collect(),
                extended_data: vec![0, 2, 0, 6, 1, 2],
                geometry: None,
            }],
        }
    }

    #[test]
    fn round_trip() {
        let rec = sample();
        let bytes = rec.to_bytes().unwrap();
        assert_eq!(bytes.len(), 24 + 4 + 20 * 6 + 2 + 6);
        assert_eq!(parse(&bytes).unwrap(), rec);
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = sample().to_bytes().unwrap();
        for cut in 0..bytes.len() {
            assert!(
                parse(&bytes[..cut]).is_err(),
                "prefix of {cut} bytes accepted"
            );
        }
    }

    #[test]
    fn field_errors_name_field_and_offset() {
        let good = sample().to_bytes().unwrap();
        let mut b = good.clone();
        b[28] |= 0xC0; // first minutia type bits = 11
        assert_eq!(
            parse(&b).unwrap_err(),
            IsoError::Invalid {
                field: "minutia type",
                offset: 28,
                reason: "type bits 11 are reserved"
            }
        );
        let mut b = good.clone();
        b[24] = 11;
        assert!(matches!(
            parse(&b),
            Err(IsoError::Invalid {
                field: "finger position",
                offset: 24,
                ..
            })
        ));
        let mut b = good.clone();
        b[27] = 200; // minutiae count larger than the data
        assert!(matches!(
            parse(&b),
            Err(IsoError::Invalid {
                field: "number of minutiae",
                ..
            })
        ));
        let mut b = good.clone();
        b[28..30].copy_from_slice(&(0x4000u16 | 300).to_be_bytes()); // x == width
        assert!(matches!(
            parse(&b),
            Err(IsoError::Invalid {
                field: "minutia x",
                offset: 28,
                ..
            })
        ));
        let mut b = good.clone();
        b[4..8].copy_from_slice(b"021\0");
        assert!(matches!(
            parse(&b),
            Err(IsoError::Invalid {
                field: "version",
                ..
            })
        ));
        let mut b = good.clone();
        b.push(0);
        assert!(matches!(parse(&b), Err(IsoError::LengthMismatch { .. })));
        let mut b = good.clone();
        let n = b.len();
        b[n - 3] = 9; // extended area length overruns the block
        assert!(matches!(
            parse(&b),
            Err(IsoError::Invalid {
                field: "extended data area length",
                ..
            })
        ));
        let mut b = good;
        b[25] = 0x05; // impression type 5
        assert!(matches!(
            parse(&b),
            Err(IsoError::Invalid {
                field: "impression type",
                ..
            })
        ));
    }

    #[test]
    fn errors_and_debug_never_show_coordinates() {
        let rec = sample();
        let dbg = format!("{rec:?}");
        assert!(!dbg.contains("x:") && dbg.contains("redacted"));
        let mut b = rec.to_bytes().unwrap();
        b[28..30].copy_from_slice(&(0x4000u16 | 12345).to_be_bytes());
        let msg = parse(&b).unwrap_err().to_string();
        assert!(!msg.contains("12345"), "{msg}");
    }

    /// One 2011 finger representation (no quality block, 6-byte minutiae, no extended data)
    /// at 300×400 pixels, 197 ppcm.
    fn rep_2011(position: u8, rep_number: u8, minutiae: &[Minutia]) -> Vec<u8> {
        let mut rep = vec![0; 4]; // representation length, patched below
        rep.extend_from_slice(&[0x07, 0xE6, 1, 1, 0, 0, 0, 0xFF, 0xFF]); // date-time
        rep.push(0); // technology
        rep.extend_from_slice(&[0, 0, 0, 0]); // vendor + device type
        rep.push(0); // no quality block
        rep.extend_from_slice(&[position, rep_number]);
        rep.extend_from_slice(&197u16.to_be_bytes());
        rep.extend_from_slice(&197u16.to_be_bytes());
        rep.push(0);
        rep.extend_from_slice(&300u16.to_be_bytes());
        rep.extend_from_slice(&400u16.to_be_bytes());
        rep.push(0x60);
        rep.push(minutiae.len() as u8);
        for m in minutiae {
            rep.extend_from_slice(&((m.kind.bits() << 14) | m.x).to_be_bytes());
            rep.extend_from_slice(&m.y.to_be_bytes());
            rep.extend_from_slice(&[m.angle, m.quality]);
        }
        rep.extend_from_slice(&[0, 0]); // no extended data
        let len = rep.len() as u32;
        rep[..4].copy_from_slice(&len.to_be_bytes());
        rep
    }

    /// A whole 2011 record of these representations.
    fn record_2011(reps: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = reps.concat();
        let mut b = b"FMR\x00030\x00".to_vec();
        b.extend_from_slice(&((15 + body.len()) as u32).to_be_bytes());
        b.extend_from_slice(&(reps.len() as u16).to_be_bytes());
        b.push(0);
        b.extend_from_slice(&body);
        b
    }

    /// Regression (fuzzing): a 2011 record may hold more than 255 representations. It parses,
    /// and the 2005 writer refuses it with a typed error instead of wrapping the view count
    /// (the old fuzz target treated that refusal as a crash).
    #[test]
    fn more_than_255_representations() {
        let minutiae = &sample().views[0].minutiae[..3];
        let reps: Vec<Vec<u8>> = (0..300).map(|_| rep_2011(0, 0, minutiae)).collect();
        let rec = parse(&record_2011(&reps)).unwrap();
        assert_eq!(rec.views.len(), 300);
        assert!(rec.views.iter().all(|v| v.minutiae == minutiae));
        assert_eq!(
            rec.to_bytes().unwrap_err(),
            IsoError::Unencodable {
                field: "number of finger views",
                reason: "must be 1..=255"
            }
        );
        // 255 of them still encode as 2005 and read back to the same views.
        let rec = parse(&record_2011(&reps[..255])).unwrap();
        let again = parse(&rec.to_bytes().unwrap()).unwrap();
        assert_eq!(again.views, rec.views);
        // Distinct (position, view number) pairs are checked across all of them.
        let mut reps: Vec<Vec<u8>> = (0..16).map(|n| rep_2011(2, n, minutiae)).collect();
        reps.extend((0..300).map(|_| rep_2011(0, 0, minutiae)));
        assert_eq!(parse(&record_2011(&reps)).unwrap().views.len(), 316);
        reps.push(rep_2011(2, 0x15, minutiae)); // view number 5 again (high nibble ignored)
        assert!(matches!(
            parse(&record_2011(&reps)),
            Err(IsoError::Invalid {
                field: "view number",
                ..
            })
        ));
    }

    /// Builds a 2011 record by hand for the same minutiae and checks it reads identically.
    #[test]
    fn reads_2011_format() {
        let rec = sample();
        let v = &rec.views[0];
        let mut rep = Vec::new();
        rep.extend_from_slice(&[0; 4]); // representation length, patched below
        rep.extend_from_slice(&[0x07, 0xE6, 1, 1, 0, 0, 0, 0xFF, 0xFF]); // date-time
        rep.push(0); // technology
        rep.extend_from_slice(&[0, 0, 0, 0]); // vendor + device type
        rep.push(1); // one quality block
        rep.extend_from_slice(&[60, 0, 0, 0, 0]);
        rep.extend_from_slice(&[v.position, 0]);
        rep.extend_from_slice(&197u16.to_be_bytes());
        rep.extend_from_slice(&197u16.to_be_bytes());
        rep.push(0);
        rep.extend_from_slice(&300u16.to_be_bytes());
        rep.extend_from_slice(&400u16.to_be_bytes());
        rep.push(0x60);
        rep.push(v.minutiae.len() as u8);
        for m in &v.minutiae {
            rep.extend_from_slice(&((m.kind.bits() << 14) | m.x).to_be_bytes());
            rep.extend_from_slice(&m.y.to_be_bytes());
            rep.extend_from_slice(&[m.angle, m.quality]);
        }
        rep.extend_from_slice(&(v.extended_data.len() as u16).to_be_bytes());
        rep.extend_from_slice(&v.extended_data);
        let rl = rep.len() as u32;
        rep[..4].copy_from_slice(&rl.to_be_bytes());
        let mut b = b"FMR\x00030\x00".to_vec();
        b.extend_from_slice(&((15 + rep.len()) as u32).to_be_bytes());
        b.extend_from_slice(&1u16.to_be_bytes());
        b.push(0);
        b.extend_from_slice(&rep);
        let got = parse(&b).unwrap();
        assert_eq!(got.version, IsoVersion::V2011);
        assert_eq!(got.views[0].minutiae, v.minutiae);
        assert_eq!((got.width, got.height, got.x_resolution), (300, 400, 197));
        for cut in 0..b.len() {
            assert!(parse(&b[..cut]).is_err());
        }
        // Re-encoded as 2005 it parses to the same minutiae.
        let again = parse(&got.to_bytes().unwrap()).unwrap();
        assert_eq!(again.views[0].minutiae, v.minutiae);
    }
}
