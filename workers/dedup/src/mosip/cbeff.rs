//! Finger minutiae from a MOSIP CBEFF document (ISO/IEC 19785-3 XML, the body behind a
//! `referenceURL`).
//!
//! The document is a `BIR` holding one `BIR` per biometric: `BDBInfo` says what it is
//! (`Type` Finger / Face / Iris, `Subtype` such as `Left IndexFinger` or `Right Thumb`), `BDB`
//! carries the data, base64. This ABIS matches ISO/IEC 19794-2 finger minutiae records
//! (`FMR\0`): those are taken, each at the position its `Subtype` names (the record
//! header's own position must then agree or be 0, the rule intake applies). Face and iris
//! BIRs are other modalities and are skipped; a finger BIR whose BDB is an ISO/IEC 19794-4
//! image (`FIR\0`) cannot be matched without a minutiae extractor and is skipped, and a
//! document with only such images is refused naming that format. Empty BDBs (MOSIP's
//! exception fingers) are skipped.
//!
//! Errors name elements and counts, never data.

use base64::Engine;
use cardpipe_biometrics::matcher::PositionedTemplate;

/// Why a CBEFF document gave no usable fingers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CbeffError {
    /// Not XML, or not shaped like a CBEFF BIR.
    #[error("invalid CBEFF document: {0}")]
    Invalid(String),
    /// Well formed, but no finger BIR carries data.
    #[error("the CBEFF document holds no finger data")]
    NoFingerData,
    /// Finger BIRs hold only images.
    #[error(
        "the CBEFF document holds {0} finger image(s) (ISO/IEC 19794-4) and no minutiae \
         record; this ABIS matches ISO/IEC 19794-2 minutiae records"
    )]
    ImagesOnly(usize),
}

/// What a document held besides the templates taken.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Skipped {
    /// Finger BIRs with an image BDB.
    pub finger_images: usize,
    /// Face, iris and other non-finger BIRs.
    pub other_modalities: usize,
    /// Finger BIRs with no BDB data (exceptions).
    pub empty: usize,
}

/// Finger position (ISO/IEC 19794-2 / ANSI 378 codes 1..=10) of a MOSIP `Subtype`, 0 when
/// it names no single finger (`UNKNOWN`, absent).
pub fn position_of_subtype(subtype: &str) -> u8 {
    let s = subtype.to_ascii_lowercase();
    let side = if s.contains("right") {
        0
    } else if s.contains("left") {
        5
    } else {
        return 0;
    };
    let finger = if s.contains("thumb") {
        1
    } else if s.contains("index") {
        2
    } else if s.contains("middle") {
        3
    } else if s.contains("ring") {
        4
    } else if s.contains("little") {
        5
    } else {
        return 0;
    };
    side + finger
}

/// The finger minutiae records of a CBEFF document with their positions, and what was
/// skipped.
pub fn finger_templates(xml: &str) -> Result<(Vec<PositionedTemplate>, Skipped), CbeffError> {
    let doc = roxmltree::Document::parse(xml)
        .map_err(|e| CbeffError::Invalid(format!("not well-formed XML ({e})")))?;
    let root = doc.root_element();
    if root.tag_name().name() != "BIR" {
        return Err(CbeffError::Invalid(format!(
            "the root element is <{}>, not <BIR>",
            root.tag_name().name()
        )));
    }
    let mut templates = Vec::new();
    let mut skipped = Skipped::default();
    let mut leaves = 0usize;
    for (index, bir) in root
        .descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == "BIR")
        .filter(|n| child(*n, "BDBInfo").is_some())
        .enumerate()
    {
        leaves += 1;
        let info = child(bir, "BDBInfo").expect("filtered on BDBInfo");
        let kind = child(info, "Type").and_then(|t| t.text()).unwrap_or("");
        if !kind
            .split_whitespace()
            .any(|t| t.eq_ignore_ascii_case("finger"))
        {
            skipped.other_modalities += 1;
            continue;
        }
        let subtype = child(info, "Subtype").and_then(|t| t.text()).unwrap_or("");
        let data: String = child(bir, "BDB")
            .and_then(|b| b.text())
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        if data.is_empty() {
            skipped.empty += 1;
            continue;
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&data)
            .or_else(|_| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(data.trim_end_matches('='))
            })
            .map_err(|_| {
                CbeffError::Invalid(format!(
                    "finger BIR {} ({subtype}): BDB is not base64",
                    index + 1
                ))
            })?;
        match bytes.get(..4) {
            Some(b"FMR\0") => templates.push(PositionedTemplate {
                position: position_of_subtype(subtype),
                record: bytes,
            }),
            Some(b"FIR\0") => skipped.finger_images += 1,
            _ => {
                return Err(CbeffError::Invalid(format!(
                    "finger BIR {} ({subtype}): BDB is neither an ISO/IEC 19794-2 minutiae \
                     record nor an ISO/IEC 19794-4 image",
                    index + 1
                )));
            }
        }
    }
    if leaves == 0 {
        return Err(CbeffError::Invalid(
            "no BIR with a BDBInfo element".to_owned(),
        ));
    }
    if templates.is_empty() {
        return Err(if skipped.finger_images > 0 {
            CbeffError::ImagesOnly(skipped.finger_images)
        } else {
            CbeffError::NoFingerData
        });
    }
    Ok((templates, skipped))
}

fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children()
        .find(|n| n.is_element() && n.tag_name().name() == name)
}

/// A CBEFF document as MOSIP's data share serves it, holding `templates` as finger BIRs
/// (the subtype named from each position). For tests and for playing MOSIP's side.
pub fn document(templates: &[PositionedTemplate]) -> String {
    const SUBTYPES: [&str; 10] = [
        "Right Thumb",
        "Right IndexFinger",
        "Right MiddleFinger",
        "Right RingFinger",
        "Right LittleFinger",
        "Left Thumb",
        "Left IndexFinger",
        "Left MiddleFinger",
        "Left RingFinger",
        "Left LittleFinger",
    ];
    let mut xml = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<BIR xmlns=\"http://standards.iso.org/iso-iec/19785/-3/ed-2/\">\n    <BIRInfo><Integrity>false</Integrity></BIRInfo>\n",
    );
    for t in templates {
        let subtype = match t.position {
            1..=10 => SUBTYPES[usize::from(t.position) - 1],
            _ => "UNKNOWN",
        };
        xml.push_str(&format!(
            "    <BIR>\n        <Version><Major>1</Major><Minor>1</Minor></Version>\n        <CBEFFVersion><Major>1</Major><Minor>1</Minor></CBEFFVersion>\n        <BIRInfo><Integrity>false</Integrity></BIRInfo>\n        <BDBInfo>\n            <Format><Organization>Mosip</Organization><Type>2</Type></Format>\n            <Type>Finger</Type>\n            <Subtype>{subtype}</Subtype>\n            <Level>Processed</Level>\n            <Purpose>Enroll</Purpose>\n        </BDBInfo>\n        <BDB>{}</BDB>\n    </BIR>\n",
            base64::engine::general_purpose::STANDARD.encode(&t.record)
        ));
    }
    xml.push_str("</BIR>\n");
    xml
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmr(position: u8) -> Vec<u8> {
        let mut r = b"FMR\0 20\0".to_vec();
        r.push(position);
        r
    }

    #[test]
    fn subtypes_map_to_iso_positions() {
        assert_eq!(position_of_subtype("Right Thumb"), 1);
        assert_eq!(position_of_subtype("Right IndexFinger"), 2);
        assert_eq!(position_of_subtype("Right LittleFinger"), 5);
        assert_eq!(position_of_subtype("Left Thumb"), 6);
        assert_eq!(position_of_subtype("Left MiddleFinger"), 8);
        assert_eq!(position_of_subtype("Left LittleFinger"), 10);
        assert_eq!(position_of_subtype("UNKNOWN"), 0);
        assert_eq!(position_of_subtype(""), 0);
    }

    #[test]
    fn finger_minutiae_are_taken_at_their_subtype_and_the_rest_is_counted() {
        let templates = vec![
            PositionedTemplate {
                position: 2,
                record: fmr(0),
            },
            PositionedTemplate {
                position: 7,
                record: fmr(7),
            },
        ];
        let mut xml = document(&templates);
        // A face, an image finger and an exception finger, as MOSIP sends them.
        xml = xml.replace(
            "</BIR>\n</BIR>",
            "</BIR>\n<BIR><BDBInfo><Type>Face</Type></BDBInfo><BDB>RklSAA==</BDB></BIR>\n\
             <BIR><BDBInfo><Type>Finger</Type><Subtype>Left Thumb</Subtype></BDBInfo><BDB>RklSAAAA</BDB></BIR>\n\
             <BIR><BDBInfo><Type>Finger</Type><Subtype>Right Thumb</Subtype></BDBInfo><BDB></BDB></BIR>\n</BIR>",
        );
        let (got, skipped) = finger_templates(&xml).unwrap();
        assert_eq!(got, templates);
        assert_eq!(
            skipped,
            Skipped {
                finger_images: 1,
                other_modalities: 1,
                empty: 1
            }
        );
    }

    #[test]
    fn documents_without_minutiae_are_refused_with_the_reason() {
        assert!(matches!(
            finger_templates("not xml"),
            Err(CbeffError::Invalid(_))
        ));
        assert!(matches!(
            finger_templates("<Other/>"),
            Err(CbeffError::Invalid(m)) if m.contains("<Other>")
        ));
        assert_eq!(
            finger_templates(
                "<BIR><BIR><BDBInfo><Type>Finger</Type><Subtype>Left Thumb</Subtype></BDBInfo><BDB>RklSAAAA</BDB></BIR></BIR>"
            ),
            Err(CbeffError::ImagesOnly(1))
        );
        assert_eq!(
            finger_templates(
                "<BIR><BIR><BDBInfo><Type>Iris</Type></BDBInfo><BDB>SUlSAA==</BDB></BIR></BIR>"
            ),
            Err(CbeffError::NoFingerData)
        );
        let bad = finger_templates(
            "<BIR><BIR><BDBInfo><Type>Finger</Type><Subtype>Left Thumb</Subtype></BDBInfo><BDB>@@@</BDB></BIR></BIR>",
        )
        .unwrap_err();
        assert!(bad.to_string().contains("not base64"), "{bad}");
    }
}
