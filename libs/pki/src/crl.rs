//! Revocation reasons and CRLs.
//!
//! Pipeline events map to RFC 5280 reason codes:
//!
//! | cause       | reasonCode           | why                                                     |
//! |-------------|----------------------|---------------------------------------------------------|
//! | `lost`      | keyCompromise (1)    | someone else may hold the card and its keys             |
//! | `cancelled` | affiliationChanged (3)| the registry withdrew the application                  |
//! | `reprinted` | superseded (4)       | a new card replaces this one                            |
//! | `voided`    | cessationOfOperation (5) | not collected within six months; the card is destroyed |
//!
//! A CRL is issued by the issuing CA (the issuer of every citizen certificate), carries
//! thisUpdate/nextUpdate, the AKI and a CRL number that must strictly increase — the
//! caller keeps the last number in the database and passes it in, and [`generate_crl`]
//! refuses a number that does not increase. The TBSCertList is signed through
//! [`CaKeyStore`], like everything else.

use der::asn1::{BitString, OctetString};
use der::{Decode, Encode};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use x509_cert::certificate::Version;
use x509_cert::crl::{CertificateList, RevokedCert, TbsCertList};
use x509_cert::ext::pkix::{AuthorityKeyIdentifier, CrlNumber, CrlReason};
use x509_cert::serial_number::SerialNumber;

use crate::ca::CaCertificate;
use crate::keystore::CaKeyStore;
use crate::pkix::{
    ecdsa_sha256, extension, from_x509_time, serial_hex, sign_der, to_pem, x509_time,
};
use crate::{KeysError, Result};

use cardpipe_common::contract::RevocationCause;

/// The RFC 5280 reason code of a pipeline revocation cause.
pub fn reason_code(cause: RevocationCause) -> CrlReason {
    match cause {
        RevocationCause::Lost => CrlReason::KeyCompromise,
        RevocationCause::Cancelled => CrlReason::AffiliationChanged,
        RevocationCause::Reprinted => CrlReason::Superseded,
        // The remake supersedes the card in the reject bin.
        RevocationCause::Spoiled => CrlReason::Superseded,
        RevocationCause::Voided => CrlReason::CessationOfOperation,
    }
}

/// One revoked certificate, as the revocation table stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedCertificate {
    /// Serial, hex (as in [`crate::citizen::IssuedCertificate::serial`]).
    pub serial: String,
    /// When it was revoked.
    #[serde(with = "time::serde::rfc3339")]
    pub revoked_at: OffsetDateTime,
    /// Why.
    pub cause: RevocationCause,
}

/// Parameters of one CRL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrlRequest {
    /// This CRL's number.
    pub number: u64,
    /// The last number published (None for the first CRL).
    pub previous_number: Option<u64>,
    /// thisUpdate.
    pub this_update: OffsetDateTime,
    /// nextUpdate (publication schedule + margin).
    pub next_update: OffsetDateTime,
}

/// A signed CRL.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Crl {
    /// CRL number.
    pub number: u64,
    /// DER.
    #[serde(with = "crate::pkix::b64_bytes")]
    pub der: Vec<u8>,
}

impl std::fmt::Debug for Crl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Crl(number {}, {} bytes)", self.number, self.der.len())
    }
}

impl Crl {
    /// PEM (`X509 CRL`).
    pub fn pem(&self) -> Result<String> {
        to_pem("X509 CRL", &self.der)
    }
}

/// Builds and signs a CRL issued by `issuing` — normally the issuing CA (citizen
/// certificates); pass the root to produce the root's CRL of CA certificates.
pub fn generate_crl(
    store: &dyn CaKeyStore,
    issuing: &CaCertificate,
    revoked: &[RevokedCertificate],
    request: CrlRequest,
) -> Result<Crl> {
    if let Some(previous) = request.previous_number
        && request.number <= previous
    {
        return Err(KeysError::CrlNumberNotIncreasing {
            previous,
            next: request.number,
        });
    }
    if request.next_update <= request.this_update {
        return Err(KeysError::Invalid(
            "nextUpdate must be after thisUpdate".into(),
        ));
    }
    let cert = issuing.parsed()?;
    let issuer_key = issuing.public_key()?;
    let mut entries = Vec::with_capacity(revoked.len());
    for r in revoked {
        let bytes = hex::decode(&r.serial)
            .map_err(|_| KeysError::Invalid("revoked serial is not hex".into()))?;
        entries.push(RevokedCert {
            serial_number: SerialNumber::new(&bytes)?,
            revocation_date: x509_time(r.revoked_at)?,
            crl_entry_extensions: Some(vec![extension(&reason_code(r.cause), false)?]),
        });
    }
    let number_bytes = request.number.to_be_bytes();
    let tbs = TbsCertList {
        version: Version::V2,
        signature: ecdsa_sha256(),
        issuer: cert.tbs_certificate.subject.clone(),
        this_update: x509_time(request.this_update)?,
        next_update: Some(x509_time(request.next_update)?),
        revoked_certificates: if entries.is_empty() {
            None
        } else {
            Some(entries)
        },
        crl_extensions: Some(vec![
            extension(
                &AuthorityKeyIdentifier {
                    key_identifier: Some(OctetString::new(issuer_key.key_identifier().to_vec())?),
                    authority_cert_issuer: None,
                    authority_cert_serial_number: None,
                },
                false,
            )?,
            extension(&CrlNumber(der::asn1::Uint::new(&number_bytes)?), false)?,
        ]),
    };
    let signature = sign_der(store, &issuing.key_label, &tbs.to_der()?)?;
    let list = CertificateList {
        tbs_cert_list: tbs,
        signature_algorithm: ecdsa_sha256(),
        signature: BitString::from_bytes(&signature)?,
    };
    Ok(Crl {
        number: request.number,
        der: list.to_der()?,
    })
}

/// A CRL read back (for QC, status and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCrl {
    /// CRL number extension.
    pub number: Option<u64>,
    /// thisUpdate.
    pub this_update: OffsetDateTime,
    /// nextUpdate.
    pub next_update: Option<OffsetDateTime>,
    /// (serial hex, reason) per entry.
    pub revoked: Vec<(String, Option<CrlReason>)>,
}

/// Parses a DER CRL and checks its signature against the issuing CA.
pub fn parse_crl(der_bytes: &[u8], issuing: &CaCertificate) -> Result<ParsedCrl> {
    let list = CertificateList::from_der(der_bytes)?;
    let key = issuing.public_key()?;
    let sig = list
        .signature
        .as_bytes()
        .ok_or_else(|| KeysError::Certificate("CRL signature has unused bits".into()))?;
    if !key.verify_digest(&crate::pkix::sha256(&list.tbs_cert_list.to_der()?), sig)? {
        return Err(KeysError::Certificate(
            "CRL signature does not verify under the issuing CA".into(),
        ));
    }
    let tbs = &list.tbs_cert_list;
    let number = tbs
        .crl_extensions
        .iter()
        .flatten()
        .find(|e| e.extn_id == const_oid::db::rfc5280::ID_CE_CRL_NUMBER)
        .map(|e| -> Result<u64> {
            let n = CrlNumber::from_der(e.extn_value.as_bytes())?;
            Ok(n.0
                .as_bytes()
                .iter()
                .fold(0u64, |a, &b| (a << 8) | u64::from(b)))
        })
        .transpose()?;
    let revoked = tbs
        .revoked_certificates
        .iter()
        .flatten()
        .map(|r| -> Result<_> {
            let reason = r
                .crl_entry_extensions
                .iter()
                .flatten()
                .find(|e| e.extn_id == const_oid::db::rfc5280::ID_CE_CRL_REASONS)
                .map(|e| CrlReason::from_der(e.extn_value.as_bytes()))
                .transpose()?;
            Ok((serial_hex(&r.serial_number), reason))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ParsedCrl {
        number,
        this_update: from_x509_time(&tbs.this_update),
        next_update: tbs.next_update.as_ref().map(from_x509_time),
        revoked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{CaConfig, init};
    use crate::keystore::test_support::file_store;
    use time::Duration;

    #[test]
    fn crl_lists_revocations_with_reasons_and_numbers_increase() {
        let (_dir, store) = file_store();
        let now = time::macros::datetime!(2025-03-01 08:00:00 UTC);
        let h = init(store.as_ref(), &CaConfig::default(), now).unwrap();
        let revoked = vec![
            RevokedCertificate {
                serial: "4A01".into(),
                revoked_at: now,
                cause: RevocationCause::Lost,
            },
            RevokedCertificate {
                serial: "4A02".into(),
                revoked_at: now,
                cause: RevocationCause::Voided,
            },
        ];
        let req = CrlRequest {
            number: 1,
            previous_number: None,
            this_update: now,
            next_update: now + Duration::days(1),
        };
        let crl = generate_crl(store.as_ref(), &h.issuing, &revoked, req).unwrap();
        let parsed = parse_crl(&crl.der, &h.issuing).unwrap();
        assert_eq!(parsed.number, Some(1));
        assert_eq!(parsed.this_update, now);
        assert_eq!(
            parsed.revoked,
            vec![
                ("4A01".into(), Some(CrlReason::KeyCompromise)),
                ("4A02".into(), Some(CrlReason::CessationOfOperation))
            ]
        );
        assert!(crl.pem().unwrap().starts_with("-----BEGIN X509 CRL-----"));
        assert!(parse_crl(&crl.der, &h.root).is_err());

        let again = CrlRequest {
            number: 1,
            previous_number: Some(1),
            ..req
        };
        assert!(matches!(
            generate_crl(store.as_ref(), &h.issuing, &revoked, again),
            Err(KeysError::CrlNumberNotIncreasing {
                previous: 1,
                next: 1
            })
        ));
        let next = CrlRequest {
            number: 2,
            previous_number: Some(1),
            ..req
        };
        let empty = generate_crl(store.as_ref(), &h.issuing, &[], next).unwrap();
        assert_eq!(parse_crl(&empty.der, &h.issuing).unwrap().revoked, vec![]);
        assert_eq!(
            reason_code(RevocationCause::Reprinted),
            CrlReason::Superseded
        );
        assert_eq!(
            reason_code(RevocationCause::Cancelled),
            CrlReason::AffiliationChanged
        );
    }
}
