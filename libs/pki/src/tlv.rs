//! BER-TLV (ISO/IEC 7816-4 / ICAO Doc 9303-10): tags up to three bytes, definite lengths up
//! to four length bytes. The one codec of the workspace: the LDS data groups and EF.SOD here,
//! and the card OS's and the personalization script's data objects (`cardpipe-card`).

/// A malformed TLV (what was wrong, never the bytes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("BER-TLV: {0}")]
pub struct TlvError(pub String);

type Result<T> = std::result::Result<T, TlvError>;

/// Appends one TLV.
pub fn put(out: &mut Vec<u8>, tag: u32, value: &[u8]) {
    if tag > 0xFFFF {
        out.extend_from_slice(&[(tag >> 16) as u8, (tag >> 8) as u8, tag as u8]);
    } else if tag > 0xFF {
        out.extend_from_slice(&[(tag >> 8) as u8, tag as u8]);
    } else {
        out.push(tag as u8);
    }
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len <= 0xFF {
        out.extend_from_slice(&[0x81, len as u8]);
    } else if len <= 0xFFFF {
        out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
    } else if len <= 0xFF_FFFF {
        out.extend_from_slice(&[0x83, (len >> 16) as u8, (len >> 8) as u8, len as u8]);
    } else {
        out.extend_from_slice(&[
            0x84,
            (len >> 24) as u8,
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
        ]);
    }
    out.extend_from_slice(value);
}

/// A TLV with a constructed value built by `f`.
pub fn nest(out: &mut Vec<u8>, tag: u32, f: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    f(&mut inner);
    put(out, tag, &inner);
}

/// One parsed TLV.
#[derive(Clone, Copy)]
pub struct Tlv<'a> {
    /// The tag (up to three bytes, big-endian).
    pub tag: u32,
    /// The value.
    pub value: &'a [u8],
}

impl std::fmt::Debug for Tlv<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The value may be personal data: only its length.
        f.debug_struct("Tlv")
            .field("tag", &format_args!("{:X}", self.tag))
            .field("len", &self.value.len())
            .finish()
    }
}

fn err(msg: &str) -> TlvError {
    TlvError(msg.to_owned())
}

/// Parses one TLV from the front of `input`, returning it and the rest.
pub fn take(input: &[u8]) -> Result<(Tlv<'_>, &[u8])> {
    let (&first, mut rest) = input.split_first().ok_or_else(|| err("truncated tag"))?;
    let mut tag = u32::from(first);
    if first & 0x1F == 0x1F {
        loop {
            let (&b, r) = rest.split_first().ok_or_else(|| err("truncated tag"))?;
            rest = r;
            if tag > 0xFFFF {
                return Err(err("tag longer than three bytes"));
            }
            tag = (tag << 8) | u32::from(b);
            if b & 0x80 == 0 {
                break;
            }
        }
    }
    let (&l0, r) = rest.split_first().ok_or_else(|| err("truncated length"))?;
    rest = r;
    let len = if l0 < 0x80 {
        usize::from(l0)
    } else {
        let n = usize::from(l0 & 0x7F);
        if n == 0 || n > 4 || rest.len() < n {
            return Err(err("unsupported or truncated length"));
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return Err(err("value runs past the end of the data"));
    }
    let (value, rest) = rest.split_at(len);
    Ok((Tlv { tag, value }, rest))
}

/// Parses exactly one TLV that must fill `input` and carry `tag`.
pub fn expect<'a>(input: &'a [u8], tag: u32, what: &str) -> Result<&'a [u8]> {
    let (tlv, rest) = take(input)?;
    if tlv.tag != tag || !rest.is_empty() {
        return Err(TlvError(format!(
            "{what}: expected a single {tag:X} template"
        )));
    }
    Ok(tlv.value)
}

/// Splits a constructed value into its TLVs.
pub fn children(mut input: &[u8]) -> Result<Vec<Tlv<'_>>> {
    let mut out = Vec::new();
    while !input.is_empty() {
        let (tlv, rest) = take(input)?;
        out.push(tlv);
        input = rest;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_multi_byte_tags_and_long_lengths() {
        for len in [0usize, 5, 127, 128, 255, 256, 70_000] {
            let value = vec![0xAB; len];
            let mut out = Vec::new();
            put(&mut out, 0x5F2E, &value);
            put(&mut out, 0x7F61, b"x");
            let kids = children(&out).unwrap();
            assert_eq!(kids.len(), 2);
            assert_eq!(kids[0].tag, 0x5F2E);
            assert_eq!(kids[0].value.len(), len);
            assert_eq!(kids[1].tag, 0x7F61);
        }
        assert!(take(&[0x5F]).is_err());
        assert!(take(&[0x04, 0x05, 1, 2]).is_err());
        assert!(take(&[0x04, 0x85, 0, 0, 0, 0, 1]).is_err());
    }
}
