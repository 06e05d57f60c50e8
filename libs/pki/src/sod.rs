//! EF.SOD: the Document Security Object (ICAO Doc 9303 part 10 §4.6.2).
//!
//! ```text
//! 77 {                                  application tag, as on ICAO chips
//!   ContentInfo { id-signedData,
//!     SignedData v3 {
//!       digestAlgorithms { sha256 }
//!       encapContentInfo { id-icao-mrtd-security-ldsSecurityObject (2.23.136.1.1.1),
//!         OCTET STRING LDSSecurityObject { version 0, sha256,
//!                                          { DataGroupHash { n, SHA-256(DGn) } … } } }
//!       certificates { Document Signer certificate }
//!       signerInfos { v1, issuerAndSerialNumber(DS), sha256,
//!                     signedAttrs { contentType, messageDigest }, ecdsa-with-SHA256, sig } } } }
//! ```
//!
//! Signing goes through [`CaKeyStore`] (the DS key may be in the HSM): we DER-encode the
//! signed attributes as a SET OF, hash, and let the keystore sign the digest.
//! [`verify_sod`] is what QC runs on data read back from the chip; `openssl cms -verify`
//! accepts the same bytes once the 77 wrapper is removed (see the interop tests).

use std::sync::Arc;

use cms::cert::{CertificateChoices, IssuerAndSerialNumber};
use cms::content_info::ContentInfo;
use cms::signed_data::{SignedData, SignerIdentifier, SignerInfo};
use const_oid::db::rfc5911::{ID_CONTENT_TYPE, ID_MESSAGE_DIGEST, ID_SIGNED_DATA};
use der::asn1::{ObjectIdentifier, OctetString};
use der::{Decode, Encode, Sequence};
use spki::AlgorithmIdentifierOwned;

use crate::ca::CaCertificate;
use crate::keystore::CaKeyStore;
use crate::lds::DataGroup;
use crate::pkix::{
    ECDSA_WITH_SHA256, ID_SHA256, PublicKey, derw, ecdsa_sha256, sha256, sign_der,
    verify_certificate_signature,
};
use crate::tlv;
use crate::{KeysError, Result};

/// id-icao-mrtd-security-ldsSecurityObject.
pub const ID_LDS_SECURITY_OBJECT: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.23.136.1.1.1");

/// `DataGroupHash ::= SEQUENCE { dataGroupNumber INTEGER, dataGroupHashValue OCTET STRING }`
#[derive(Debug, Clone, PartialEq, Eq, Sequence)]
pub struct DataGroupHash {
    /// Data-group number.
    pub data_group_number: u8,
    /// Hash of the whole data-group file.
    pub data_group_hash_value: OctetString,
}

/// `LDSSecurityObject` version 0 (no LDS version info).
#[derive(Debug, Clone, PartialEq, Eq, Sequence)]
pub struct LdsSecurityObject {
    /// 0.
    pub version: u8,
    /// id-sha256, parameters absent.
    pub hash_algorithm: AlgorithmIdentifierOwned,
    /// One entry per data group present.
    pub data_group_hash_values: Vec<DataGroupHash>,
}

fn sha256_alg() -> AlgorithmIdentifierOwned {
    AlgorithmIdentifierOwned {
        oid: ID_SHA256,
        parameters: None,
    }
}

/// Builds the LDSSecurityObject DER over the given data groups.
pub fn lds_security_object(data_groups: &[(DataGroup, &[u8])]) -> Result<Vec<u8>> {
    let mut hashes = Vec::with_capacity(data_groups.len());
    for (g, bytes) in data_groups {
        hashes.push(DataGroupHash {
            data_group_number: g.number(),
            data_group_hash_value: OctetString::new(sha256(bytes).to_vec())?,
        });
    }
    hashes.sort_by_key(|h| h.data_group_number);
    if hashes
        .windows(2)
        .any(|w| w[0].data_group_number == w[1].data_group_number)
    {
        return Err(KeysError::Invalid("a data group is listed twice".into()));
    }
    Ok(LdsSecurityObject {
        version: 0,
        hash_algorithm: sha256_alg(),
        data_group_hash_values: hashes,
    }
    .to_der()?)
}

/// Signs EF.SOD with one Document Signer. Build one per DS (after each rotation) and reuse
/// it: everything constant (DS certificate, signer id, algorithm identifiers) is DER-encoded
/// once, and each EF.SOD is assembled around the per-card LDSSecurityObject and signature.
pub struct SodSigner {
    store: Arc<dyn CaKeyStore>,
    key_label: String,
    certificate_der: Vec<u8>,
    sid_der: Vec<u8>,
    sha256_der: Vec<u8>,
    ecdsa_der: Vec<u8>,
    lds_oid_der: Vec<u8>,
    content_type_oid_der: Vec<u8>,
    message_digest_oid_der: Vec<u8>,
    signed_data_oid_der: Vec<u8>,
}

impl std::fmt::Debug for SodSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SodSigner")
            .field("key_label", &self.key_label)
            .finish_non_exhaustive()
    }
}

impl SodSigner {
    /// Prepares a signer for the Document Signer `ds`.
    pub fn new(store: Arc<dyn CaKeyStore>, ds: &CaCertificate) -> Result<Self> {
        let certificate = ds.parsed()?;
        let sid = IssuerAndSerialNumber {
            issuer: certificate.tbs_certificate.issuer.clone(),
            serial_number: certificate.tbs_certificate.serial_number.clone(),
        };
        Ok(Self {
            store,
            key_label: ds.key_label.clone(),
            certificate_der: certificate.to_der()?,
            sid_der: sid.to_der()?,
            sha256_der: sha256_alg().to_der()?,
            ecdsa_der: ecdsa_sha256().to_der()?,
            lds_oid_der: ID_LDS_SECURITY_OBJECT.to_der()?,
            content_type_oid_der: ID_CONTENT_TYPE.to_der()?,
            message_digest_oid_der: ID_MESSAGE_DIGEST.to_der()?,
            signed_data_oid_der: ID_SIGNED_DATA.to_der()?,
        })
    }

    /// The keystore label of the DS key (for usage counting).
    pub fn key_label(&self) -> &str {
        &self.key_label
    }

    /// Builds and signs EF.SOD (with the 77 wrapper) over `data_groups`.
    pub fn sign(&self, data_groups: &[(DataGroup, &[u8])]) -> Result<Vec<u8>> {
        let econtent = lds_security_object(data_groups)?;
        // Signed attributes, in DER SET OF order (contentType's encoding is shorter, so it
        // sorts first): contentType = ldsSecurityObject, messageDigest = SHA-256(eContent).
        let mut content_type = self.content_type_oid_der.clone();
        derw::put(&mut content_type, 0x31, &self.lds_oid_der);
        let mut message_digest = self.message_digest_oid_der.clone();
        derw::put(
            &mut message_digest,
            0x31,
            &derw::wrap(0x04, &sha256(&econtent)),
        );
        let mut attrs = derw::wrap(0x30, &content_type);
        derw::put(&mut attrs, 0x30, &message_digest);
        // RFC 5652 §5.4: the signature covers the attributes with an explicit SET OF tag.
        let signature = sign_der(
            self.store.as_ref(),
            &self.key_label,
            &derw::wrap(0x31, &attrs),
        )?;

        let mut signer = vec![0x02, 0x01, 0x01]; // version 1: issuerAndSerialNumber
        signer.extend_from_slice(&self.sid_der);
        signer.extend_from_slice(&self.sha256_der);
        derw::put(&mut signer, 0xA0, &attrs); // [0] IMPLICIT signedAttrs
        signer.extend_from_slice(&self.ecdsa_der);
        derw::put(&mut signer, 0x04, &signature);

        let mut encap = self.lds_oid_der.clone();
        derw::put(&mut encap, 0xA0, &derw::wrap(0x04, &econtent));

        let mut sd = vec![0x02, 0x01, 0x03]; // version 3: eContentType is not id-data
        derw::put(&mut sd, 0x31, &self.sha256_der);
        derw::put(&mut sd, 0x30, &encap);
        derw::put(&mut sd, 0xA0, &self.certificate_der); // [0] IMPLICIT certificates
        derw::put(&mut sd, 0x31, &derw::wrap(0x30, &signer));

        let mut ci = self.signed_data_oid_der.clone();
        derw::put(&mut ci, 0xA0, &derw::wrap(0x30, &sd));
        let content_info = derw::wrap(0x30, &ci);
        let mut out = Vec::with_capacity(content_info.len() + 4);
        tlv::put(&mut out, 0x77, &content_info);
        Ok(out)
    }
}

/// Strips the 77 application tag, returning the CMS ContentInfo DER (what generic CMS tools
/// such as `openssl cms` read).
pub fn unwrap_ef_sod(ef_sod: &[u8]) -> Result<&[u8]> {
    tlv::expect(ef_sod, 0x77, "EF.SOD")
        .map_err(|_| KeysError::Sod("not wrapped in the 77 application tag".into()))
}

/// What a successful verification established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SodVerification {
    /// The embedded Document Signer certificate, DER.
    pub ds_certificate: Vec<u8>,
    /// Data groups covered, in number order.
    pub data_groups: Vec<DataGroup>,
    /// The LDSSecurityObject DER (the signed content).
    pub lds_security_object: Vec<u8>,
}

fn sod_err(msg: &str) -> KeysError {
    KeysError::Sod(msg.to_owned())
}

/// Verifies EF.SOD against the data groups read from the chip:
///
/// 1. structure: 77 → ContentInfo(signedData) → eContentType ldsSecurityObject, SHA-256;
/// 2. every data group given hashes to its entry, and the SOD lists no group not given;
/// 3. signed attributes: contentType matches, messageDigest = SHA-256(eContent);
/// 4. the signature verifies under the embedded DS certificate named by the signer id;
/// 5. if `trust_root` (root CA DER) is given, the DS certificate is signed by it.
pub fn verify_sod(
    ef_sod: &[u8],
    data_groups: &[(DataGroup, &[u8])],
    trust_root: Option<&[u8]>,
) -> Result<SodVerification> {
    let ci = ContentInfo::from_der(unwrap_ef_sod(ef_sod)?)?;
    if ci.content_type != ID_SIGNED_DATA {
        return Err(sod_err("content is not signedData"));
    }
    let sd: SignedData = ci.content.decode_as()?;
    if sd.encap_content_info.econtent_type != ID_LDS_SECURITY_OBJECT {
        return Err(sod_err("eContentType is not ldsSecurityObject"));
    }
    let econtent = sd
        .encap_content_info
        .econtent
        .as_ref()
        .ok_or_else(|| sod_err("no encapsulated content"))?;
    let econtent = econtent.decode_as::<OctetString>()?.into_bytes();
    let so = LdsSecurityObject::from_der(&econtent)?;
    if so.hash_algorithm.oid != ID_SHA256 {
        return Err(sod_err("hash algorithm is not SHA-256"));
    }
    let mut covered = Vec::new();
    for entry in &so.data_group_hash_values {
        let group = DataGroup::from_number(entry.data_group_number).ok_or_else(|| {
            KeysError::Sod(format!("unknown data group {}", entry.data_group_number))
        })?;
        let (_, bytes) = data_groups
            .iter()
            .find(|(g, _)| *g == group)
            .ok_or_else(|| {
                KeysError::Sod(format!(
                    "DG{} is in EF.SOD but was not supplied",
                    group.number()
                ))
            })?;
        if sha256(bytes).as_slice() != entry.data_group_hash_value.as_bytes() {
            return Err(KeysError::Sod(format!(
                "DG{} hash mismatch",
                group.number()
            )));
        }
        covered.push(group);
    }
    if let Some((g, _)) = data_groups.iter().find(|(g, _)| !covered.contains(g)) {
        return Err(KeysError::Sod(format!(
            "DG{} is not covered by EF.SOD",
            g.number()
        )));
    }

    let signers: Vec<&SignerInfo> = sd.signer_infos.0.iter().collect();
    let [signer] = signers.as_slice() else {
        return Err(sod_err("expected exactly one signer"));
    };
    if signer.digest_alg.oid != ID_SHA256 || signer.signature_algorithm.oid != ECDSA_WITH_SHA256 {
        return Err(sod_err("signer does not use SHA-256 with ECDSA"));
    }
    let attrs = signer
        .signed_attrs
        .as_ref()
        .ok_or_else(|| sod_err("no signed attributes"))?;
    let attr = |oid: ObjectIdentifier| {
        attrs
            .iter()
            .find(|a| a.oid == oid)
            .and_then(|a| a.values.iter().next())
            .ok_or_else(|| sod_err("missing signed attribute"))
    };
    if attr(ID_CONTENT_TYPE)?.decode_as::<ObjectIdentifier>()? != ID_LDS_SECURITY_OBJECT {
        return Err(sod_err("contentType attribute does not match"));
    }
    if attr(ID_MESSAGE_DIGEST)?
        .decode_as::<OctetString>()?
        .as_bytes()
        != sha256(&econtent)
    {
        return Err(sod_err("messageDigest does not match the content"));
    }
    let SignerIdentifier::IssuerAndSerialNumber(sid) = &signer.sid else {
        return Err(sod_err("signer not identified by issuer and serial number"));
    };
    let cert = sd
        .certificates
        .as_ref()
        .into_iter()
        .flat_map(|set| set.0.iter())
        .find_map(|c| match c {
            CertificateChoices::Certificate(c)
                if c.tbs_certificate.issuer == sid.issuer
                    && c.tbs_certificate.serial_number == sid.serial_number =>
            {
                Some(c)
            }
            _ => None,
        })
        .ok_or_else(|| sod_err("Document Signer certificate not embedded"))?;
    let key = PublicKey::from_spki(&cert.tbs_certificate.subject_public_key_info)?;
    if !key.verify_digest(&sha256(&attrs.to_der()?), signer.signature.as_bytes())? {
        return Err(sod_err(
            "signature does not verify under the Document Signer key",
        ));
    }
    let ds_certificate = cert.to_der()?;
    if let Some(root) = trust_root {
        verify_certificate_signature(&ds_certificate, root).map_err(|_| {
            sod_err("Document Signer certificate is not signed by the trusted root")
        })?;
    }
    Ok(SodVerification {
        ds_certificate,
        data_groups: covered,
        lds_security_object: econtent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{CaConfig, init};
    use crate::keystore::test_support::file_store;
    use crate::lds::{encode, sample_input};
    use cms::content_info::CmsVersion;

    #[test]
    fn sign_and_verify_and_detect_tampering() {
        let (_dir, store) = file_store();
        let now = time::macros::datetime!(2025-03-01 08:00:00 UTC);
        let h = init(store.as_ref(), &CaConfig::default(), now).unwrap();
        let signer = SodSigner::new(store.clone(), &h.document_signer).unwrap();
        let lds = encode(&sample_input(7)).unwrap();
        let sod = signer.sign(&lds.data_groups()).unwrap();
        assert_eq!(sod[0], 0x77);
        // The hand-assembled DER is canonical: decoding and re-encoding gives the same bytes.
        let inner = unwrap_ef_sod(&sod).unwrap();
        let ci = ContentInfo::from_der(inner).unwrap();
        assert_eq!(ci.to_der().unwrap(), inner);
        let sd: SignedData = ci.content.decode_as().unwrap();
        assert_eq!(sd.version, CmsVersion::V3);
        let signer = sd.signer_infos.0.iter().next().unwrap();
        assert_eq!(
            signer.signed_attrs.as_ref().unwrap().to_der().unwrap()[0],
            0x31
        );
        let ok = verify_sod(&sod, &lds.data_groups(), Some(&h.root.certificate)).unwrap();
        assert_eq!(ok.ds_certificate, h.document_signer.certificate);
        assert_eq!(ok.data_groups, DataGroup::ALL);

        // A changed data group fails.
        let mut dg1 = lds.dg1.clone();
        let last = dg1.len() - 1;
        dg1[last] ^= 1;
        let mut groups = lds.data_groups();
        groups[0].1 = &dg1;
        assert!(
            matches!(verify_sod(&sod, &groups, None), Err(KeysError::Sod(m)) if m.contains("DG1"))
        );
        // A missing data group fails.
        assert!(verify_sod(&sod, &lds.data_groups()[..3], None).is_err());
        // Wrong trust root fails.
        assert!(verify_sod(&sod, &lds.data_groups(), Some(&h.issuing.certificate)).is_err());
        // A flipped signature byte fails.
        let mut bad = sod.clone();
        let n = bad.len();
        bad[n - 3] ^= 0x01;
        assert!(verify_sod(&bad, &lds.data_groups(), None).is_err());
    }
}
