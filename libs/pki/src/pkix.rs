//! Shared X.509 plumbing: P-256 public keys, distinguished names, times, serial numbers,
//! extensions, and "sign a TBS structure through the keystore".
//!
//! Certificates, CRLs and EF.SOD are all built the same way: encode the to-be-signed DER,
//! hash it with SHA-256, hand the 32-byte digest to [`CaKeyStore::sign_digest`] and wrap the
//! returned DER ECDSA signature. That is why the same code works with a file keystore and an
//! HSM: only the digest ever crosses into the keystore.

use std::sync::LazyLock;

use const_oid::AssociatedOid;
use der::asn1::{
    Any, BitString, ObjectIdentifier, OctetString, PrintableStringRef, SetOfVec, Utf8StringRef,
};
use der::{Decode, Encode};
use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroup, EcKey, EcPoint, PointConversionForm};
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use time::OffsetDateTime;
use x509_cert::Certificate;
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::ext::Extension;
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::Time;

use crate::keystore::CaKeyStore;
use crate::{KeysError, Result};

/// ecdsa-with-SHA256 (RFC 5758).
pub const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
/// id-ecPublicKey (RFC 5480).
pub const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// prime256v1 / secp256r1.
pub const PRIME256V1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
/// id-sha256.
pub const ID_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
/// serialNumber attribute (X.520), where the national code goes.
pub const AT_SERIAL_NUMBER: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.5");
/// commonName.
pub const AT_COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
/// surname.
pub const AT_SURNAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.4");
/// givenName.
pub const AT_GIVEN_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.42");
/// countryName.
pub const AT_COUNTRY: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.6");
/// organizationName.
pub const AT_ORGANIZATION: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.10");
/// organizationalUnitName.
pub const AT_ORGANIZATIONAL_UNIT: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.11");

/// The DER `ECParameters` naming P-256, as PKCS#11 `CKA_EC_PARAMS` wants it.
pub const P256_EC_PARAMS_DER: [u8; 10] =
    [0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];

pub(crate) static P256: LazyLock<EcGroup> = LazyLock::new(|| {
    EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("OpenSSL always knows P-256")
});

/// A P-256 public key as its uncompressed SEC1 point (`04 || X || Y`, 65 bytes).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKey(#[serde(with = "crate::pkix::hex_bytes")] Vec<u8>);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", hex::encode(&self.key_identifier()[..8]))
    }
}

impl PublicKey {
    /// Accepts an uncompressed SEC1 point; checks it is on the curve.
    pub fn from_sec1(point: &[u8]) -> Result<Self> {
        if point.len() != 65 || point[0] != 0x04 {
            return Err(KeysError::Invalid(
                "public key is not an uncompressed P-256 point".into(),
            ));
        }
        let mut ctx = BigNumContext::new()?;
        EcPoint::from_bytes(&P256, point, &mut ctx)?;
        Ok(Self(point.to_vec()))
    }

    pub(crate) fn from_sec1_unchecked(point: Vec<u8>) -> Self {
        Self(point)
    }

    /// The uncompressed point.
    pub fn as_sec1(&self) -> &[u8] {
        &self.0
    }

    /// Reads the key out of a DER SubjectPublicKeyInfo (e.g. of a certificate).
    pub fn from_spki(spki: &SubjectPublicKeyInfoOwned) -> Result<Self> {
        if spki.algorithm.oid != ID_EC_PUBLIC_KEY {
            return Err(KeysError::Invalid(
                "public key algorithm is not id-ecPublicKey".into(),
            ));
        }
        let params =
            spki.algorithm.parameters.as_ref().ok_or_else(|| {
                KeysError::Invalid("EC public key without curve parameters".into())
            })?;
        if params.decode_as::<ObjectIdentifier>()? != PRIME256V1 {
            return Err(KeysError::Invalid("EC public key is not on P-256".into()));
        }
        let bits = spki
            .subject_public_key
            .as_bytes()
            .ok_or_else(|| KeysError::Invalid("public key bit string has unused bits".into()))?;
        Self::from_sec1(bits)
    }

    /// SubjectPublicKeyInfo for certificates.
    pub fn to_spki(&self) -> Result<SubjectPublicKeyInfoOwned> {
        Ok(SubjectPublicKeyInfoOwned {
            algorithm: AlgorithmIdentifierOwned {
                oid: ID_EC_PUBLIC_KEY,
                parameters: Some(Any::encode_from(&PRIME256V1)?),
            },
            subject_public_key: BitString::from_bytes(&self.0)?,
        })
    }

    /// RFC 5280 §4.2.1.2 method 1: SHA-1 of the public key bits. Used for SKI/AKI so that
    /// chain builders (OpenSSL included) can match issuer and subject.
    pub fn key_identifier(&self) -> [u8; 20] {
        openssl::sha::sha1(&self.0)
    }

    /// Verifies a DER ECDSA signature over a SHA-256 digest.
    pub fn verify_digest(&self, digest: &[u8; 32], der_signature: &[u8]) -> Result<bool> {
        let mut ctx = BigNumContext::new()?;
        let point = EcPoint::from_bytes(&P256, &self.0, &mut ctx)?;
        let key = EcKey::from_public_key(&P256, &point)?;
        let Ok(sig) = EcdsaSig::from_der(der_signature) else {
            return Ok(false);
        };
        Ok(sig.verify(digest, &key)?)
    }
}

/// The uncompressed public point of an OpenSSL key.
pub(crate) fn openssl_public_point<T: openssl::pkey::HasPublic>(key: &EcKey<T>) -> Result<Vec<u8>> {
    let mut ctx = BigNumContext::new()?;
    Ok(key
        .public_key()
        .to_bytes(&P256, PointConversionForm::UNCOMPRESSED, &mut ctx)?)
}

/// Converts PKCS#11's raw `r || s` (64 bytes for P-256) into a DER `Ecdsa-Sig-Value`.
pub fn ecdsa_raw_to_der(raw: &[u8]) -> Result<Vec<u8>> {
    if raw.len() != 64 {
        return Err(KeysError::Format(format!(
            "ECDSA signature of {} bytes, expected 64",
            raw.len()
        )));
    }
    let r = BigNum::from_slice(&raw[..32])?;
    let s = BigNum::from_slice(&raw[32..])?;
    Ok(EcdsaSig::from_private_components(r, s)?.to_der()?)
}

/// ecdsa-with-SHA256 with absent parameters, as RFC 5758 requires.
pub fn ecdsa_sha256() -> AlgorithmIdentifierOwned {
    AlgorithmIdentifierOwned {
        oid: ECDSA_WITH_SHA256,
        parameters: None,
    }
}

/// SHA-256 of a byte string.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Signs `tbs_der` through the keystore: hash here, sign the digest there.
pub fn sign_der(store: &dyn CaKeyStore, label: &str, tbs_der: &[u8]) -> Result<Vec<u8>> {
    store.sign_digest(label, &sha256(tbs_der))
}

/// Builds the TBSCertificate's DER, signs it through the keystore and returns the
/// certificate DER.
pub fn sign_certificate(
    store: &dyn CaKeyStore,
    label: &str,
    tbs: x509_cert::TbsCertificate,
) -> Result<Vec<u8>> {
    let tbs_der = tbs.to_der()?;
    let signature = sign_der(store, label, &tbs_der)?;
    let cert = Certificate {
        tbs_certificate: tbs,
        signature_algorithm: ecdsa_sha256(),
        signature: BitString::from_bytes(&signature)?,
    };
    Ok(cert.to_der()?)
}

/// Checks that `cert_der` was signed by the key of `issuer_der` (signature only; validity
/// and extensions are the caller's policy).
pub fn verify_certificate_signature(cert_der: &[u8], issuer_der: &[u8]) -> Result<()> {
    let cert = Certificate::from_der(cert_der)?;
    let issuer = Certificate::from_der(issuer_der)?;
    if cert.signature_algorithm.oid != ECDSA_WITH_SHA256 {
        return Err(KeysError::Certificate(
            "signature algorithm is not ecdsa-with-SHA256".into(),
        ));
    }
    if cert.tbs_certificate.issuer != issuer.tbs_certificate.subject {
        return Err(KeysError::Certificate(
            "issuer name does not match the issuer certificate".into(),
        ));
    }
    let key = PublicKey::from_spki(&issuer.tbs_certificate.subject_public_key_info)?;
    let tbs = cert.tbs_certificate.to_der()?;
    let sig = cert
        .signature
        .as_bytes()
        .ok_or_else(|| KeysError::Certificate("signature bit string has unused bits".into()))?;
    if key.verify_digest(&sha256(&tbs), sig)? {
        Ok(())
    } else {
        Err(KeysError::Certificate(
            "signature does not verify under the issuer key".into(),
        ))
    }
}

/// A distinguished name for CA certificates, from configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DistinguishedName {
    /// CN.
    pub common_name: String,
    /// O.
    #[serde(default)]
    pub organization: Option<String>,
    /// OU.
    #[serde(default)]
    pub organizational_unit: Option<String>,
    /// C (two letters, PrintableString).
    #[serde(default)]
    pub country: Option<String>,
}

impl DistinguishedName {
    /// Encodes as an X.501 Name: C, O, OU, CN in that (big-endian) order.
    pub fn to_name(&self) -> Result<Name> {
        let mut rdns = NameBuilder::default();
        if let Some(c) = &self.country {
            rdns.printable(AT_COUNTRY, c)?;
        }
        if let Some(o) = &self.organization {
            rdns.utf8(AT_ORGANIZATION, o)?;
        }
        if let Some(ou) = &self.organizational_unit {
            rdns.utf8(AT_ORGANIZATIONAL_UNIT, ou)?;
        }
        rdns.utf8(AT_COMMON_NAME, &self.common_name)?;
        Ok(rdns.finish())
    }
}

/// Builds an RDNSequence one single-valued RDN at a time.
#[derive(Default)]
pub(crate) struct NameBuilder(Vec<RelativeDistinguishedName>);

impl NameBuilder {
    pub(crate) fn utf8(&mut self, oid: ObjectIdentifier, value: &str) -> Result<()> {
        let any = Any::encode_from(&Utf8StringRef::new(value)?)?;
        self.push(oid, any)
    }

    pub(crate) fn printable(&mut self, oid: ObjectIdentifier, value: &str) -> Result<()> {
        let any = Any::encode_from(&PrintableStringRef::new(value)?)?;
        self.push(oid, any)
    }

    fn push(&mut self, oid: ObjectIdentifier, value: Any) -> Result<()> {
        let atv = AttributeTypeAndValue { oid, value };
        self.0
            .push(RelativeDistinguishedName::from(SetOfVec::try_from(vec![
                atv,
            ])?));
        Ok(())
    }

    pub(crate) fn finish(self) -> Name {
        RdnSequence(self.0)
    }
}

/// X.509 time: UTCTime through 2049, GeneralizedTime from 2050 (RFC 5280 §4.1.2.5).
pub fn x509_time(t: OffsetDateTime) -> Result<Time> {
    let secs = u64::try_from(t.unix_timestamp())
        .map_err(|_| KeysError::Invalid("time before 1970".into()))?;
    let dt = der::DateTime::from_unix_duration(std::time::Duration::from_secs(secs))?;
    if dt.year() < 2050 {
        Ok(Time::UtcTime(der::asn1::UtcTime::from_date_time(dt)?))
    } else {
        Ok(Time::GeneralTime(
            der::asn1::GeneralizedTime::from_date_time(dt),
        ))
    }
}

/// Converts an X.509 time back for reports and rotation decisions.
pub fn from_x509_time(t: &Time) -> OffsetDateTime {
    let secs = t.to_unix_duration().as_secs();
    OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(i64::MAX))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// A fresh serial number: 16 random bytes, top bits forced to `01` so that the integer is
/// positive and its DER encoding is exactly 16 bytes (126 bits of entropy, well above the
/// CA/B Forum's 64).
pub fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    openssl::rand::rand_bytes(&mut bytes)?;
    bytes[0] = (bytes[0] & 0x3F) | 0x40;
    Ok(SerialNumber::new(&bytes)?)
}

/// Wraps an extension value with its OID.
pub fn extension<T: Encode + AssociatedOid>(value: &T, critical: bool) -> Result<Extension> {
    Ok(Extension {
        extn_id: T::OID,
        critical,
        extn_value: OctetString::new(value.to_der()?)?,
    })
}

/// A CRL distribution points extension with one URI.
pub fn crl_distribution_points(url: &str) -> Result<Extension> {
    use x509_cert::ext::pkix::CrlDistributionPoints;
    use x509_cert::ext::pkix::crl::dp::DistributionPoint;
    use x509_cert::ext::pkix::name::{DistributionPointName, GeneralName};
    let uri = der::asn1::Ia5String::new(url)
        .map_err(|_| KeysError::Invalid("CRL distribution point is not an ASCII URL".into()))?;
    extension(
        &CrlDistributionPoints(vec![DistributionPoint {
            distribution_point: Some(DistributionPointName::FullName(vec![
                GeneralName::UniformResourceIdentifier(uri),
            ])),
            reasons: None,
            crl_issuer: None,
        }]),
        false,
    )
}

/// Finds and decodes an extension of a certificate.
pub fn find_extension<'a, T: Decode<'a> + AssociatedOid>(
    cert: &'a Certificate,
) -> Result<Option<T>> {
    let Some(exts) = &cert.tbs_certificate.extensions else {
        return Ok(None);
    };
    match exts.iter().find(|e| e.extn_id == T::OID) {
        Some(e) => Ok(Some(T::from_der(e.extn_value.as_bytes())?)),
        None => Ok(None),
    }
}

/// Upper-case hex of a serial number, the form operators and `openssl x509 -serial` use.
pub fn serial_hex(serial: &SerialNumber) -> String {
    hex::encode_upper(serial.as_bytes())
}

/// Tiny DER writer for the hot paths (citizen TBSCertificate, EF.SOD). Those structures are
/// assembled from pre-encoded constant parts plus a few per-card fields, which is several
/// times cheaper than re-encoding the whole structure tree per card; the tests parse the
/// results back with the `x509-cert`/`cms` decoders and check the encoding is canonical.
pub(crate) mod derw {
    /// Appends `tag || len || content` (DER's minimal definite length: the BER-TLV codec,
    /// [`crate::tlv`], writes exactly that).
    pub(crate) fn put(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
        crate::tlv::put(out, u32::from(tag), content);
    }

    /// `tag || len || content` as a new vector.
    pub(crate) fn wrap(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(content.len() + 4);
        put(&mut out, tag, content);
        out
    }
}

/// serde helper: bytes as lower-case hex.
pub mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialize as hex.
    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    /// Deserialize from hex.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

/// serde helper: bytes as standard base64 (compact for certificates and data groups).
pub mod b64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialize as base64.
    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    /// Deserialize from base64.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

/// PEM-encodes DER under a label such as `CERTIFICATE` or `X509 CRL`.
pub fn to_pem(label: &'static str, der: &[u8]) -> Result<String> {
    der::pem::encode_string(label, der::pem::LineEnding::LF, der)
        .map_err(|e| KeysError::Der(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_positive_sixteen_bytes_and_distinct() {
        let a = random_serial().unwrap();
        let b = random_serial().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.as_bytes().len(), 16);
        assert!(a.as_bytes()[0] & 0x80 == 0 && a.as_bytes()[0] != 0);
    }

    #[test]
    fn times_switch_to_generalized_in_2050() {
        let t = time::macros::datetime!(2049-12-31 23:59:59 UTC);
        assert!(matches!(x509_time(t).unwrap(), Time::UtcTime(_)));
        let t2 = time::macros::datetime!(2050-01-01 00:00:00 UTC);
        assert!(matches!(x509_time(t2).unwrap(), Time::GeneralTime(_)));
        assert_eq!(from_x509_time(&x509_time(t).unwrap()), t);
    }

    #[test]
    fn raw_signature_converts_to_verifiable_der() {
        let key = EcKey::generate(&P256).unwrap();
        let digest = sha256(b"tbs");
        let sig = EcdsaSig::sign(&digest, &key).unwrap();
        let mut raw = sig.r().to_vec_padded(32).unwrap();
        raw.extend(sig.s().to_vec_padded(32).unwrap());
        let der = ecdsa_raw_to_der(&raw).unwrap();
        let public = PublicKey::from_sec1(&openssl_public_point(&key).unwrap()).unwrap();
        assert!(public.verify_digest(&digest, &der).unwrap());
        assert!(!public.verify_digest(&sha256(b"other"), &der).unwrap());
        assert!(ecdsa_raw_to_der(&raw[..63]).is_err());
    }
}
