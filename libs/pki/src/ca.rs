//! The CA hierarchy: `cardpipe pki init` and `cardpipe pki status`.
//!
//! ```text
//!   Root CA (self-signed, keyCertSign + cRLSign)
//!    ├── Issuing CA (pathLen 0) ── citizen authentication and signature certificates, CRLs
//!    └── Document Signer ────────── EF.SOD of every card (rolled by [`crate::rotation`])
//! ```
//!
//! The Document Signer hangs directly off the root, as ICAO's DS hangs off the country's
//! CSCA, so a verifier of chip data needs only the root. Every certificate here is built as
//! a TBSCertificate and signed through [`CaKeyStore`], so `init` works the same with the file
//! keystore and with an HSM. [`CaHierarchy`] is plain serde data (labels + certificate DER):
//! the caller persists it; the private keys stay in the keystore.

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};
use x509_cert::Certificate;
use x509_cert::certificate::Version;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, KeyUsage, KeyUsages, SubjectKeyIdentifier,
};
use x509_cert::time::Validity;

use der::Decode;
use der::asn1::OctetString;

use crate::keystore::{Backend, CaKeyStore};
use crate::pkix::{
    DistinguishedName, PublicKey, b64_bytes, ecdsa_sha256, extension, from_x509_time,
    random_serial, serial_hex, sign_certificate, x509_time,
};
use crate::{KeysError, Result};

/// Configuration of `pki init` (a section of pipeline.toml).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CaConfig {
    /// Root CA subject.
    pub root: DistinguishedName,
    /// Issuing CA subject (issues citizen certificates and CRLs).
    pub issuing: DistinguishedName,
    /// Document Signer subject (signs EF.SOD).
    pub document_signer: DistinguishedName,
    /// Root validity in days (default 20 years).
    pub root_validity_days: u32,
    /// Issuing CA validity in days (default 10 years: longer than any card it certifies).
    pub issuing_validity_days: u32,
    /// Document Signer certificate validity in days. ICAO: key usage period (≤ 3 months)
    /// plus the validity of the documents signed; default 7 years + 100 days.
    pub document_signer_validity_days: u32,
    /// CRL distribution point (the root's CRL of CA certificates) written into the issuing
    /// CA and Document Signer certificates; `None` leaves the extension out. Citizen
    /// certificates carry their own URL ([`crate::citizen::CitizenProfiles`]).
    pub crl_distribution_point: Option<String>,
    /// Prefix of keystore labels; `init` appends role and creation time so a re-run after
    /// a crash never collides with keys of an abandoned attempt.
    pub label_prefix: String,
}

impl Default for CaConfig {
    fn default() -> Self {
        let dn = |cn: &str| DistinguishedName {
            common_name: cn.into(),
            organization: Some("cardpipe National ID".into()),
            organizational_unit: None,
            country: Some("IR".into()),
        };
        Self {
            root: dn("cardpipe Root CA"),
            issuing: dn("cardpipe Citizen Issuing CA"),
            document_signer: dn("cardpipe Document Signer"),
            root_validity_days: 20 * 365 + 5,
            issuing_validity_days: 10 * 365 + 3,
            document_signer_validity_days: 7 * 365 + 2 + 100,
            crl_distribution_point: Some("http://pki.cardpipe.invalid/crl/root.crl".into()),
            label_prefix: "cardpipe".into(),
        }
    }
}

/// The role of a CA key in the hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaRole {
    /// Self-signed trust anchor.
    Root,
    /// Issues citizen certificates and CRLs.
    Issuing,
    /// Signs EF.SOD.
    DocumentSigner,
}

impl std::fmt::Display for CaRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CaRole::Root => "root CA",
            CaRole::Issuing => "issuing CA",
            CaRole::DocumentSigner => "document signer",
        })
    }
}

/// One CA certificate and the keystore label of its private key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaCertificate {
    /// Its role.
    pub role: CaRole,
    /// Keystore label of the private key.
    pub key_label: String,
    /// The certificate, DER.
    #[serde(with = "b64_bytes")]
    pub certificate: Vec<u8>,
}

impl CaCertificate {
    /// Parses the certificate.
    pub fn parsed(&self) -> Result<Certificate> {
        Ok(Certificate::from_der(&self.certificate)?)
    }

    /// Its public key.
    pub fn public_key(&self) -> Result<PublicKey> {
        PublicKey::from_spki(&self.parsed()?.tbs_certificate.subject_public_key_info)
    }

    /// Start of validity.
    pub fn not_before(&self) -> Result<OffsetDateTime> {
        Ok(from_x509_time(
            &self.parsed()?.tbs_certificate.validity.not_before,
        ))
    }

    /// End of validity.
    pub fn not_after(&self) -> Result<OffsetDateTime> {
        Ok(from_x509_time(
            &self.parsed()?.tbs_certificate.validity.not_after,
        ))
    }

    /// PEM form, for files handed to other tools.
    pub fn pem(&self) -> Result<String> {
        crate::pkix::to_pem("CERTIFICATE", &self.certificate)
    }
}

/// The output of `pki init`, persisted by the caller (database row or object).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaHierarchy {
    /// Trust anchor.
    pub root: CaCertificate,
    /// Citizen certificate issuer.
    pub issuing: CaCertificate,
    /// The Document Signer currently in use.
    pub document_signer: CaCertificate,
    /// Document Signers rotated out (their certificates stay valid for the cards they signed).
    #[serde(default)]
    pub retired_document_signers: Vec<CaCertificate>,
    /// Which backend holds the keys.
    pub backend: Backend,
    /// The configuration used, kept so rotation can mint consistent DS certificates.
    pub config: CaConfig,
}

impl CaHierarchy {
    /// Root + issuing CA, PEM, concatenated: what a relying party needs for citizen certs.
    pub fn chain_pem(&self) -> Result<String> {
        Ok(format!("{}{}", self.issuing.pem()?, self.root.pem()?))
    }
}

/// Compact label suffix from the creation time (UTC, second resolution).
pub(crate) fn label_stamp(now: OffsetDateTime) -> String {
    let t = now.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Parameters of one CA certificate to mint.
pub(crate) struct CaCertSpec<'a> {
    pub subject: &'a DistinguishedName,
    pub subject_key: &'a PublicKey,
    /// `None` = self-signed.
    pub issuer: Option<(&'a CaCertificate, &'a Certificate)>,
    pub issuer_key_label: &'a str,
    pub not_before: OffsetDateTime,
    pub validity_days: u32,
    pub ca: Option<Option<u8>>,
    pub key_usage: der::flagset::FlagSet<KeyUsages>,
    pub crl_distribution_point: Option<&'a str>,
}

pub(crate) fn mint_ca_certificate(store: &dyn CaKeyStore, spec: CaCertSpec<'_>) -> Result<Vec<u8>> {
    let subject = spec.subject.to_name()?;
    let ski = spec.subject_key.key_identifier();
    let (issuer_name, aki) = match spec.issuer {
        Some((_, issuer_cert)) => {
            let issuer_key =
                PublicKey::from_spki(&issuer_cert.tbs_certificate.subject_public_key_info)?;
            (
                issuer_cert.tbs_certificate.subject.clone(),
                issuer_key.key_identifier(),
            )
        }
        None => (subject.clone(), ski),
    };
    let mut not_after = spec.not_before + Duration::days(i64::from(spec.validity_days));
    if let Some((_, issuer_cert)) = spec.issuer {
        // A certificate must not outlive its issuer (RFC 5280 path validation would
        // reject it from that day on anyway); clamp rather than fail.
        not_after = not_after.min(from_x509_time(
            &issuer_cert.tbs_certificate.validity.not_after,
        ));
    }
    let mut exts = Vec::with_capacity(4);
    if let Some(path_len) = spec.ca {
        exts.push(extension(
            &BasicConstraints {
                ca: true,
                path_len_constraint: path_len,
            },
            true,
        )?);
    }
    exts.push(extension(&KeyUsage(spec.key_usage), true)?);
    exts.push(extension(
        &SubjectKeyIdentifier(OctetString::new(ski.to_vec())?),
        false,
    )?);
    if let Some(url) = spec.crl_distribution_point {
        exts.push(crate::pkix::crl_distribution_points(url)?);
    }
    exts.push(extension(
        &AuthorityKeyIdentifier {
            key_identifier: Some(OctetString::new(aki.to_vec())?),
            authority_cert_issuer: None,
            authority_cert_serial_number: None,
        },
        false,
    )?);
    let tbs = x509_cert::TbsCertificate {
        version: Version::V3,
        serial_number: random_serial()?,
        signature: ecdsa_sha256(),
        issuer: issuer_name,
        validity: Validity {
            not_before: x509_time(spec.not_before)?,
            not_after: x509_time(not_after)?,
        },
        subject,
        subject_public_key_info: spec.subject_key.to_spki()?,
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: Some(exts),
    };
    sign_certificate(store, spec.issuer_key_label, tbs)
}

/// Mints a Document Signer certificate for a key already in the store.
pub(crate) fn mint_document_signer(
    store: &dyn CaKeyStore,
    config: &CaConfig,
    root: &CaCertificate,
    key_label: &str,
    now: OffsetDateTime,
) -> Result<CaCertificate> {
    let key = store.public_key(key_label)?;
    let root_cert = root.parsed()?;
    let der = mint_ca_certificate(
        store,
        CaCertSpec {
            subject: &config.document_signer,
            subject_key: &key,
            issuer: Some((root, &root_cert)),
            issuer_key_label: &root.key_label,
            not_before: now,
            validity_days: config.document_signer_validity_days,
            ca: None,
            key_usage: KeyUsages::DigitalSignature.into(),
            crl_distribution_point: config.crl_distribution_point.as_deref(),
        },
    )?;
    Ok(CaCertificate {
        role: CaRole::DocumentSigner,
        key_label: key_label.to_owned(),
        certificate: der,
    })
}

/// `pki init`: generates the three CA keys in `store` and mints their certificates.
///
/// `now` comes from the caller's clock so tests can fix it.
pub fn init(store: &dyn CaKeyStore, config: &CaConfig, now: OffsetDateTime) -> Result<CaHierarchy> {
    if config.root_validity_days == 0
        || config.issuing_validity_days == 0
        || config.document_signer_validity_days == 0
    {
        return Err(KeysError::Invalid(
            "CA validity periods must be positive".into(),
        ));
    }
    let stamp = label_stamp(now);
    let root_label = format!("{}-root-{stamp}", config.label_prefix);
    let issuing_label = format!("{}-issuing-{stamp}", config.label_prefix);
    let ds_label = format!("{}-ds-{stamp}", config.label_prefix);

    let root_key = store.generate(&root_label)?;
    let root_der = mint_ca_certificate(
        store,
        CaCertSpec {
            subject: &config.root,
            subject_key: &root_key,
            issuer: None,
            issuer_key_label: &root_label,
            not_before: now,
            validity_days: config.root_validity_days,
            ca: Some(None),
            key_usage: KeyUsages::KeyCertSign | KeyUsages::CRLSign,
            crl_distribution_point: None,
        },
    )?;
    let root = CaCertificate {
        role: CaRole::Root,
        key_label: root_label.clone(),
        certificate: root_der,
    };
    let root_cert = root.parsed()?;

    let issuing_key = store.generate(&issuing_label)?;
    let issuing_der = mint_ca_certificate(
        store,
        CaCertSpec {
            subject: &config.issuing,
            subject_key: &issuing_key,
            issuer: Some((&root, &root_cert)),
            issuer_key_label: &root_label,
            not_before: now,
            validity_days: config.issuing_validity_days,
            ca: Some(Some(0)),
            key_usage: KeyUsages::KeyCertSign | KeyUsages::CRLSign | KeyUsages::DigitalSignature,
            crl_distribution_point: config.crl_distribution_point.as_deref(),
        },
    )?;
    let issuing = CaCertificate {
        role: CaRole::Issuing,
        key_label: issuing_label,
        certificate: issuing_der,
    };

    store.generate(&ds_label)?;
    let document_signer = mint_document_signer(store, config, &root, &ds_label, now)?;

    Ok(CaHierarchy {
        root,
        issuing,
        document_signer,
        retired_document_signers: Vec::new(),
        backend: store.backend(),
        config: config.clone(),
    })
}

/// Usage counters kept by the caller (database), fed into [`status`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageCounts {
    /// Citizen certificates issued by the issuing CA.
    pub citizen_certificates: u64,
    /// Revoked citizen certificates.
    pub revoked_certificates: u64,
    /// EF.SOD documents signed by the current Document Signer.
    pub documents_signed_current_ds: u64,
    /// EF.SOD documents signed in total.
    pub documents_signed_total: u64,
    /// Last CRL number published, if any.
    pub last_crl_number: Option<u64>,
}

/// Validity state of one certificate at the time of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValidityState {
    /// notBefore ≤ now ≤ notAfter.
    Valid,
    /// now < notBefore.
    NotYetValid,
    /// now > notAfter.
    Expired,
}

/// One line of `pki status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaStatusEntry {
    /// Role.
    pub role: CaRole,
    /// Whether this is a retired Document Signer.
    pub retired: bool,
    /// Keystore label.
    pub key_label: String,
    /// Subject CN.
    pub subject: String,
    /// Serial, upper-case hex.
    pub serial: String,
    /// Validity start.
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    /// Validity end.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// Whole days until notAfter (negative once expired).
    pub days_left: i64,
    /// Valid / expired / not yet valid.
    pub state: ValidityState,
    /// The keystore holds a key under the label whose public key matches the certificate.
    pub key_ok: bool,
}

/// The `pki status` report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaStatus {
    /// Keystore backend.
    pub backend: Backend,
    /// Root, issuing, current DS, then retired DSs.
    pub entries: Vec<CaStatusEntry>,
    /// Counters, as passed in.
    pub usage: UsageCounts,
}

fn common_name(cert: &Certificate) -> String {
    for rdn in cert.tbs_certificate.subject.0.iter() {
        for atv in rdn.0.iter() {
            if atv.oid == crate::pkix::AT_COMMON_NAME {
                if let Ok(s) = atv.value.decode_as::<der::asn1::Utf8StringRef<'_>>() {
                    return s.as_str().to_owned();
                }
                if let Ok(s) = atv.value.decode_as::<der::asn1::PrintableStringRef<'_>>() {
                    return s.as_str().to_owned();
                }
            }
        }
    }
    String::new()
}

/// Builds the `pki status` report: every CA certificate's validity, and whether the keystore
/// really holds the matching key.
pub fn status(
    store: &dyn CaKeyStore,
    hierarchy: &CaHierarchy,
    usage: UsageCounts,
    now: OffsetDateTime,
) -> Result<CaStatus> {
    let mut entries = Vec::new();
    let all = [
        (&hierarchy.root, false),
        (&hierarchy.issuing, false),
        (&hierarchy.document_signer, false),
    ]
    .into_iter()
    .chain(hierarchy.retired_document_signers.iter().map(|c| (c, true)));
    for (ca, retired) in all {
        let cert = ca.parsed()?;
        let not_before = from_x509_time(&cert.tbs_certificate.validity.not_before);
        let not_after = from_x509_time(&cert.tbs_certificate.validity.not_after);
        let state = if now < not_before {
            ValidityState::NotYetValid
        } else if now > not_after {
            ValidityState::Expired
        } else {
            ValidityState::Valid
        };
        let key_ok = match store.public_key(&ca.key_label) {
            Ok(k) => k == ca.public_key()?,
            Err(KeysError::KeyNotFound(_)) => false,
            Err(e) => return Err(e),
        };
        entries.push(CaStatusEntry {
            role: ca.role,
            retired,
            key_label: ca.key_label.clone(),
            subject: common_name(&cert),
            serial: serial_hex(&cert.tbs_certificate.serial_number),
            not_before,
            not_after,
            days_left: (not_after - now).whole_days(),
            state,
            key_ok,
        });
    }
    Ok(CaStatus {
        backend: store.backend(),
        entries,
        usage,
    })
}

impl std::fmt::Display for CaStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let date = |t: OffsetDateTime| {
            format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
        };
        writeln!(f, "CA keys in: {}", self.backend)?;
        for e in &self.entries {
            let role = if e.retired {
                format!("{} (retired)", e.role)
            } else {
                e.role.to_string()
            };
            writeln!(
                f,
                "  {role:<26} {:<32} serial {}  {} .. {}  {:?}, {} days left  key {}",
                e.subject,
                e.serial,
                date(e.not_before),
                date(e.not_after),
                e.state,
                e.days_left,
                if e.key_ok { "present" } else { "MISSING" },
            )?;
            writeln!(f, "  {:<26} label {}", "", e.key_label)?;
        }
        writeln!(
            f,
            "  citizen certificates issued: {}, revoked: {}; documents signed: {} (current DS {}); last CRL number: {}",
            self.usage.citizen_certificates,
            self.usage.revoked_certificates,
            self.usage.documents_signed_total,
            self.usage.documents_signed_current_ds,
            self.usage
                .last_crl_number
                .map_or_else(|| "none".to_owned(), |n| n.to_string()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keystore::test_support::file_store;
    use crate::pkix::{find_extension, verify_certificate_signature};

    #[test]
    fn init_builds_a_verifiable_hierarchy_and_status_reports_it() {
        let (_dir, store) = file_store();
        let now = time::macros::datetime!(2025-03-01 08:00:00 UTC);
        let h = init(store.as_ref(), &CaConfig::default(), now).unwrap();
        verify_certificate_signature(&h.root.certificate, &h.root.certificate).unwrap();
        verify_certificate_signature(&h.issuing.certificate, &h.root.certificate).unwrap();
        verify_certificate_signature(&h.document_signer.certificate, &h.root.certificate).unwrap();
        assert!(
            verify_certificate_signature(&h.issuing.certificate, &h.issuing.certificate).is_err()
        );

        let issuing = h.issuing.parsed().unwrap();
        let bc: BasicConstraints = find_extension(&issuing).unwrap().unwrap();
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        let ds = h.document_signer.parsed().unwrap();
        assert!(find_extension::<BasicConstraints>(&ds).unwrap().is_none());
        let ku: KeyUsage = find_extension(&ds).unwrap().unwrap();
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        let dp: x509_cert::ext::pkix::CrlDistributionPoints = find_extension(&ds).unwrap().unwrap();
        assert_eq!(dp.0.len(), 1);
        let root = h.root.parsed().unwrap();
        assert!(
            find_extension::<x509_cert::ext::pkix::CrlDistributionPoints>(&root)
                .unwrap()
                .is_none()
        );

        let usage = UsageCounts {
            citizen_certificates: 42,
            documents_signed_current_ds: 21,
            ..Default::default()
        };
        let report = status(store.as_ref(), &h, usage, now + Duration::days(1)).unwrap();
        assert_eq!(report.entries.len(), 3);
        assert!(
            report
                .entries
                .iter()
                .all(|e| e.key_ok && e.state == ValidityState::Valid)
        );
        assert_eq!(report.entries[0].subject, "cardpipe Root CA");
        let text = report.to_string();
        assert!(text.contains("citizen certificates issued: 42"), "{text}");

        let later = status(store.as_ref(), &h, usage, now + Duration::days(365 * 21)).unwrap();
        assert!(
            later
                .entries
                .iter()
                .all(|e| e.state == ValidityState::Expired)
        );

        // A hierarchy whose keys are not in this store shows them as missing.
        let (_dir2, other) = file_store();
        let foreign = status(other.as_ref(), &h, usage, now).unwrap();
        assert!(foreign.entries.iter().all(|e| !e.key_ok));

        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(serde_json::from_str::<CaHierarchy>(&json).unwrap(), h);
    }
}
