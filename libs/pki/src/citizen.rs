//! Citizen key pairs and certificates.
//!
//! Each card gets two P-256 key pairs generated in software (OpenSSL's constant-time P-256;
//! tens of microseconds each) — an authentication key (card key reference 01) and a
//! signature key (02) — and one certificate for each from the issuing CA.
//!
//! Subject (most significant first): `C`, `SN` (surname), `GN` (given name),
//! `serialNumber` (2.5.4.5, the 10-digit national code, PrintableString as X.520 requires)
//! and `CN` ("given surname"). Names are UTF8String so Persian script survives unchanged.
//! Extensions per profile: keyUsage (critical), extendedKeyUsage, CRL distribution point,
//! certificate policies, SKI/AKI, and basicConstraints CA:FALSE.
//!
//! [`CitizenIssuer`] pre-encodes everything that is the same for every card (issuer name,
//! AKI, CRL DP, policies, per-role key usage) once, so per-card work is two key generations,
//! two small DER encodings and two signatures.

use std::sync::Arc;

use const_oid::db::rfc5280::{ID_KP_CLIENT_AUTH, ID_KP_EMAIL_PROTECTION};
use der::Encode;
use der::asn1::{ObjectIdentifier, OctetString};
use der::flagset::FlagSet;
use openssl::ec::EcKey;
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::certpolicy::PolicyInformation;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, CertificatePolicies, ExtendedKeyUsage, KeyUsage,
    KeyUsages, SubjectKeyIdentifier,
};
use zeroize::Zeroizing;

use crate::ca::CaCertificate;
use crate::keystore::CaKeyStore;
use crate::pkix::{
    AT_COMMON_NAME, AT_COUNTRY, AT_GIVEN_NAME, AT_SERIAL_NUMBER, AT_SURNAME, P256, PublicKey, derw,
    ecdsa_sha256, extension, from_x509_time, openssl_public_point, random_serial, serial_hex,
    sign_der, x509_time,
};
use crate::{KeysError, Result};

/// id-kp-documentSigning (RFC 9336).
pub const ID_KP_DOCUMENT_SIGNING: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.36");

/// The two keys on a card, with their key references in the eID application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CardKeyRole {
    /// Authentication key, reference 01, certificate in EF C001.
    Authentication,
    /// Qualified-style signature key, reference 02, certificate in EF C002.
    Signature,
}

impl CardKeyRole {
    /// Key reference on the card (DESIGN: eID application).
    pub fn key_reference(self) -> u8 {
        match self {
            CardKeyRole::Authentication => 0x01,
            CardKeyRole::Signature => 0x02,
        }
    }
}

/// A keyUsage bit a profile may set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyUsageBit {
    /// digitalSignature.
    DigitalSignature,
    /// nonRepudiation / contentCommitment.
    NonRepudiation,
    /// keyAgreement (ECDH).
    KeyAgreement,
}

/// Key usage and extended key usage for one card key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyProfile {
    /// keyUsage bits (critical).
    pub key_usage: Vec<KeyUsageBit>,
    /// extendedKeyUsage OIDs, dotted; empty = no EKU extension.
    pub extended_key_usage: Vec<String>,
}

/// Citizen certificate profiles (a section of pipeline.toml).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CitizenProfiles {
    /// Authentication certificate (default: digitalSignature + clientAuth).
    pub authentication: KeyProfile,
    /// Signature certificate (default: nonRepudiation + emailProtection + documentSigning).
    pub signature: KeyProfile,
    /// Certificate validity = card validity, in days (default 7 years).
    pub validity_days: u32,
    /// CRL distribution point URL written into every citizen certificate.
    pub crl_distribution_point: String,
    /// Certificate policy OIDs (dotted); empty = no policies extension.
    pub policy_oids: Vec<String>,
    /// Country code for the subject `C`; `None` leaves it out.
    pub country: Option<String>,
}

impl Default for CitizenProfiles {
    fn default() -> Self {
        Self {
            authentication: KeyProfile {
                key_usage: vec![KeyUsageBit::DigitalSignature],
                extended_key_usage: vec![ID_KP_CLIENT_AUTH.to_string()],
            },
            signature: KeyProfile {
                key_usage: vec![KeyUsageBit::NonRepudiation],
                extended_key_usage: vec![
                    ID_KP_EMAIL_PROTECTION.to_string(),
                    ID_KP_DOCUMENT_SIGNING.to_string(),
                ],
            },
            validity_days: 7 * 365 + 2,
            crl_distribution_point: "http://pki.cardpipe.invalid/crl/issuing.crl".into(),
            // An arc under the example-private-enterprise OID; configure the real one.
            policy_oids: vec!["1.3.6.1.4.1.32473.1.1".into()],
            country: Some("IR".into()),
        }
    }
}

/// Who a certificate is for. `Debug` is redacted: this is personal data.
#[derive(Clone, PartialEq, Eq)]
pub struct CitizenSubject {
    /// 10-digit national code (already normalised and checked by intake).
    pub national_code: String,
    /// Given name, Persian script.
    pub given_name: String,
    /// Surname, Persian script.
    pub surname: String,
}

impl std::fmt::Debug for CitizenSubject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CitizenSubject(<redacted>)")
    }
}

/// A freshly generated card key pair. The private scalar is zeroized on drop and never
/// printed.
pub struct CardKeyPair {
    /// Public half, goes into the certificate.
    pub public_key: PublicKey,
    scalar: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for CardKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CardKeyPair")
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

impl CardKeyPair {
    /// Generates a P-256 key pair with OpenSSL's CSPRNG.
    pub fn generate() -> Result<Self> {
        let key = EcKey::generate(&P256)?;
        let public_key = PublicKey::from_sec1_unchecked(openssl_public_point(&key)?);
        let mut scalar = Zeroizing::new([0u8; 32]);
        let bytes = Zeroizing::new(key.private_key().to_vec_padded(32)?);
        scalar.copy_from_slice(&bytes);
        Ok(Self { public_key, scalar })
    }

    /// The 32-byte private scalar, for wrapping (see [`crate::custody`]) only.
    pub fn private_scalar(&self) -> &Zeroizing<[u8; 32]> {
        &self.scalar
    }
}

/// An issued citizen certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCertificate {
    /// Which card key it certifies.
    pub role: CardKeyRole,
    /// Serial, upper-case hex (what revocation records).
    pub serial: String,
    /// Validity end (for the card record).
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// The certificate, DER.
    #[serde(with = "crate::pkix::b64_bytes")]
    pub der: Vec<u8>,
}

fn oids(dotted: &[String], what: &str) -> Result<Vec<ObjectIdentifier>> {
    dotted
        .iter()
        .map(|s| {
            ObjectIdentifier::new(s)
                .map_err(|_| KeysError::Invalid(format!("{what}: `{s}` is not an OID")))
        })
        .collect()
}

fn key_usage_extension(profile: &KeyProfile) -> Result<Vec<Extension>> {
    let mut flags = FlagSet::<KeyUsages>::default();
    for bit in &profile.key_usage {
        flags |= match bit {
            KeyUsageBit::DigitalSignature => KeyUsages::DigitalSignature,
            KeyUsageBit::NonRepudiation => KeyUsages::NonRepudiation,
            KeyUsageBit::KeyAgreement => KeyUsages::KeyAgreement,
        };
    }
    if flags.is_empty() {
        return Err(KeysError::Invalid(
            "a citizen key profile needs at least one keyUsage bit".into(),
        ));
    }
    let mut exts = vec![extension(&KeyUsage(flags), true)?];
    let eku = oids(&profile.extended_key_usage, "extended_key_usage")?;
    if !eku.is_empty() {
        exts.push(extension(&ExtendedKeyUsage(eku), false)?);
    }
    Ok(exts)
}

/// Issues citizen certificates under the issuing CA. Cheap to clone via `Arc`; build once
/// per process (or per hierarchy change).
pub struct CitizenIssuer {
    store: Arc<dyn CaKeyStore>,
    key_label: String,
    /// DER of the issuer Name.
    issuer: Vec<u8>,
    issuer_not_after: OffsetDateTime,
    /// DER of ecdsa-with-SHA256.
    signature_algorithm: Vec<u8>,
    /// DER of a P-256 SubjectPublicKeyInfo up to (excluding) the 65-byte point.
    spki_prefix: Vec<u8>,
    /// basicConstraints, AKI, CRL DP, policies (DER, concatenated): the same for every card.
    common_extensions: Vec<u8>,
    auth_extensions: Vec<u8>,
    sign_extensions: Vec<u8>,
    oids: SubjectOids,
    validity: Duration,
    country: Option<String>,
}

impl std::fmt::Debug for CitizenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CitizenIssuer")
            .field("key_label", &self.key_label)
            .finish_non_exhaustive()
    }
}

impl CitizenIssuer {
    /// Prepares an issuer from the issuing CA certificate and the profiles.
    pub fn new(
        store: Arc<dyn CaKeyStore>,
        issuing: &CaCertificate,
        profiles: &CitizenProfiles,
    ) -> Result<Self> {
        let cert = issuing.parsed()?;
        let issuer_key = issuing.public_key()?;
        if profiles.validity_days == 0 {
            return Err(KeysError::Invalid(
                "citizen certificate validity must be positive".into(),
            ));
        }
        let mut common = vec![
            extension(
                &BasicConstraints {
                    ca: false,
                    path_len_constraint: None,
                },
                true,
            )?,
            extension(
                &AuthorityKeyIdentifier {
                    key_identifier: Some(OctetString::new(issuer_key.key_identifier().to_vec())?),
                    authority_cert_issuer: None,
                    authority_cert_serial_number: None,
                },
                false,
            )?,
        ];
        if !profiles.crl_distribution_point.is_empty() {
            common.push(crate::pkix::crl_distribution_points(
                &profiles.crl_distribution_point,
            )?);
        }
        let policies = oids(&profiles.policy_oids, "policy_oids")?;
        if !policies.is_empty() {
            common.push(extension(
                &CertificatePolicies(
                    policies
                        .into_iter()
                        .map(|oid| PolicyInformation {
                            policy_identifier: oid,
                            policy_qualifiers: None,
                        })
                        .collect(),
                ),
                false,
            )?);
        }
        if let Some(c) = &profiles.country {
            der::asn1::PrintableStringRef::new(c)
                .map_err(|_| KeysError::Invalid("country must be a PrintableString".into()))?;
        }
        let concat = |exts: Vec<Extension>| -> Result<Vec<u8>> {
            let mut out = Vec::new();
            for e in exts {
                out.extend_from_slice(&e.to_der()?);
            }
            Ok(out)
        };
        let issuer_spki = issuer_key.to_spki()?.to_der()?;
        Ok(Self {
            store,
            key_label: issuing.key_label.clone(),
            issuer: cert.tbs_certificate.subject.to_der()?,
            issuer_not_after: from_x509_time(&cert.tbs_certificate.validity.not_after),
            signature_algorithm: ecdsa_sha256().to_der()?,
            spki_prefix: issuer_spki[..issuer_spki.len() - 65].to_vec(),
            common_extensions: concat(common)?,
            auth_extensions: concat(key_usage_extension(&profiles.authentication)?)?,
            sign_extensions: concat(key_usage_extension(&profiles.signature)?)?,
            oids: SubjectOids {
                country: AT_COUNTRY.to_der()?,
                surname: AT_SURNAME.to_der()?,
                given_name: AT_GIVEN_NAME.to_der()?,
                serial_number: AT_SERIAL_NUMBER.to_der()?,
                common_name: AT_COMMON_NAME.to_der()?,
            },
            validity: Duration::days(i64::from(profiles.validity_days)),
            country: profiles.country.clone(),
        })
    }

    fn subject_name(&self, subject: &CitizenSubject) -> Result<Vec<u8>> {
        let code = &subject.national_code;
        if code.len() != 10 || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(KeysError::Invalid(
                "national code must be 10 ASCII digits".into(),
            ));
        }
        let cn = format!("{} {}", subject.given_name, subject.surname);
        let mut rdns = Vec::with_capacity(160 + 2 * cn.len());
        if let Some(c) = &self.country {
            rdn(
                &mut rdns,
                &self.oids.country,
                PRINTABLE_STRING,
                c.as_bytes(),
            );
        }
        rdn(
            &mut rdns,
            &self.oids.surname,
            UTF8_STRING,
            subject.surname.as_bytes(),
        );
        rdn(
            &mut rdns,
            &self.oids.given_name,
            UTF8_STRING,
            subject.given_name.as_bytes(),
        );
        rdn(
            &mut rdns,
            &self.oids.serial_number,
            PRINTABLE_STRING,
            code.as_bytes(),
        );
        rdn(
            &mut rdns,
            &self.oids.common_name,
            UTF8_STRING,
            cn.as_bytes(),
        );
        Ok(derw::wrap(0x30, &rdns))
    }

    /// Issues one certificate for `public_key`, valid from `not_before` for the configured
    /// card validity (clamped to the issuing CA's own expiry).
    pub fn issue(
        &self,
        subject: &CitizenSubject,
        role: CardKeyRole,
        public_key: &PublicKey,
        not_before: OffsetDateTime,
    ) -> Result<IssuedCertificate> {
        let not_after = (not_before + self.validity).min(self.issuer_not_after);
        let serial = random_serial()?;
        let role_exts = match role {
            CardKeyRole::Authentication => &self.auth_extensions,
            CardKeyRole::Signature => &self.sign_extensions,
        };
        let ski = extension(
            &SubjectKeyIdentifier(OctetString::new(public_key.key_identifier().to_vec())?),
            false,
        )?
        .to_der()?;

        let mut body = Vec::with_capacity(1024);
        body.extend_from_slice(&[0xA0, 0x03, 0x02, 0x01, 0x02]); // [0] version v3
        body.extend_from_slice(&serial.to_der()?);
        body.extend_from_slice(&self.signature_algorithm);
        body.extend_from_slice(&self.issuer);
        let mut validity = x509_time(not_before)?.to_der()?;
        validity.extend_from_slice(&x509_time(not_after)?.to_der()?);
        derw::put(&mut body, 0x30, &validity);
        body.extend_from_slice(&self.subject_name(subject)?);
        body.extend_from_slice(&self.spki_prefix);
        body.extend_from_slice(public_key.as_sec1());
        let mut exts =
            Vec::with_capacity(self.common_extensions.len() + role_exts.len() + ski.len());
        exts.extend_from_slice(&self.common_extensions);
        exts.extend_from_slice(role_exts);
        exts.extend_from_slice(&ski);
        derw::put(&mut body, 0xA3, &derw::wrap(0x30, &exts));
        let tbs = derw::wrap(0x30, &body);

        let signature = sign_der(self.store.as_ref(), &self.key_label, &tbs)?;
        let mut cert = tbs;
        cert.extend_from_slice(&self.signature_algorithm);
        let mut bits = Vec::with_capacity(signature.len() + 1);
        bits.push(0);
        bits.extend_from_slice(&signature);
        derw::put(&mut cert, 0x03, &bits);
        Ok(IssuedCertificate {
            role,
            serial: serial_hex(&serial),
            not_after,
            der: derw::wrap(0x30, &cert),
        })
    }
}

const UTF8_STRING: u8 = 0x0C;
const PRINTABLE_STRING: u8 = 0x13;

/// Pre-encoded attribute-type OIDs of the subject.
struct SubjectOids {
    country: Vec<u8>,
    surname: Vec<u8>,
    given_name: Vec<u8>,
    serial_number: Vec<u8>,
    common_name: Vec<u8>,
}

/// Appends one single-valued RDN: SET { SEQUENCE { type, value } }.
fn rdn(out: &mut Vec<u8>, oid_der: &[u8], string_tag: u8, value: &[u8]) {
    let mut atv = Vec::with_capacity(oid_der.len() + value.len() + 4);
    atv.extend_from_slice(oid_der);
    derw::put(&mut atv, string_tag, value);
    derw::put(out, 0x31, &derw::wrap(0x30, &atv));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{CaConfig, init};
    use crate::keystore::test_support::file_store;
    use crate::pkix::{find_extension, verify_certificate_signature};
    use der::Decode;
    use x509_cert::Certificate;
    use x509_cert::ext::pkix::CrlDistributionPoints;

    #[test]
    fn citizen_certificates_carry_the_profile() {
        let (_dir, store) = file_store();
        let now = time::macros::datetime!(2025-03-01 08:00:00 UTC);
        let h = init(store.as_ref(), &CaConfig::default(), now).unwrap();
        let issuer =
            CitizenIssuer::new(store.clone(), &h.issuing, &CitizenProfiles::default()).unwrap();
        let subject = CitizenSubject {
            national_code: "0499370899".into(),
            given_name: "زهرا".into(),
            surname: "احمدی".into(),
        };
        assert_eq!(format!("{subject:?}"), "CitizenSubject(<redacted>)");
        let auth_key = CardKeyPair::generate().unwrap();
        let sign_key = CardKeyPair::generate().unwrap();
        assert!(
            !format!("{auth_key:?}").contains(&hex::encode(auth_key.private_scalar().as_slice()))
        );
        let auth = issuer
            .issue(
                &subject,
                CardKeyRole::Authentication,
                &auth_key.public_key,
                now,
            )
            .unwrap();
        let sign = issuer
            .issue(&subject, CardKeyRole::Signature, &sign_key.public_key, now)
            .unwrap();
        assert_ne!(auth.serial, sign.serial);
        verify_certificate_signature(&auth.der, &h.issuing.certificate).unwrap();
        verify_certificate_signature(&sign.der, &h.issuing.certificate).unwrap();
        assert_eq!((auth.not_after - now).whole_days(), 7 * 365 + 2);

        let cert = Certificate::from_der(&auth.der).unwrap();
        // The hand-assembled DER is canonical.
        assert_eq!(der::Encode::to_der(&cert).unwrap(), auth.der);
        assert_eq!(serial_hex(&cert.tbs_certificate.serial_number), auth.serial);
        let subject_text = cert.tbs_certificate.subject.to_string();
        assert!(subject_text.contains("0499370899"), "{subject_text}");
        let ku: KeyUsage = find_extension(&cert).unwrap().unwrap();
        assert!(ku.digital_signature() && !ku.non_repudiation());
        let eku: ExtendedKeyUsage = find_extension(&cert).unwrap().unwrap();
        assert_eq!(eku.0, vec![ID_KP_CLIENT_AUTH]);
        let sign_cert = Certificate::from_der(&sign.der).unwrap();
        let ku: KeyUsage = find_extension(&sign_cert).unwrap().unwrap();
        assert!(ku.non_repudiation() && !ku.digital_signature());
        let dp: CrlDistributionPoints = find_extension(&sign_cert).unwrap().unwrap();
        assert_eq!(dp.0.len(), 1);
        let pk = PublicKey::from_spki(&sign_cert.tbs_certificate.subject_public_key_info).unwrap();
        assert_eq!(pk, sign_key.public_key);

        // The Persian names are UTF8String, byte for byte.
        let given = cert
            .tbs_certificate
            .subject
            .0
            .iter()
            .flat_map(|rdn| rdn.0.iter())
            .find(|atv| atv.oid == AT_GIVEN_NAME)
            .unwrap();
        assert_eq!(der::Tagged::tag(&given.value), der::Tag::Utf8String);
        assert_eq!(given.value.value(), "زهرا".as_bytes());

        let bad = CitizenSubject {
            national_code: "12345".into(),
            ..subject.clone()
        };
        assert!(
            issuer
                .issue(&bad, CardKeyRole::Signature, &sign_key.public_key, now)
                .is_err()
        );
    }
}
