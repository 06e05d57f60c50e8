//! One call per card: what the keys stage handler runs.
//!
//! [`CardIssuer::issue`] generates both card key pairs, issues their certificates, encodes
//! the LDS, signs EF.SOD with the current Document Signer, wraps both private keys for the
//! encoder site, and returns the [`CardCredentials`] package. The private keys exist in
//! clear only inside this call (in zeroizing buffers).
//!
//! The stage around it stays thin: read the application, call `issue`, store the package,
//! record the certificate serials and the DS usage (+1 for
//! [`CardCredentials::document_signer_label`]) in one transaction. Build a new `CardIssuer`
//! after a Document Signer rotation.
//!
//! [`verify_card`] is the matching check QC runs on the files read back from the chip.

use std::sync::Arc;

use time::OffsetDateTime;

use crate::ca::CaHierarchy;
use crate::citizen::{CardKeyPair, CardKeyRole, CitizenIssuer, CitizenProfiles, CitizenSubject};
use crate::custody::{CardCredentials, TransportKey, wrap};
use crate::keystore::CaKeyStore;
use crate::lds::{self, ChipDataInput};
use crate::pkix::{AT_SERIAL_NUMBER, serial_hex, verify_certificate_signature};
use crate::sod::SodSigner;
use crate::sod::verify_sod;
use crate::{KeysError, Result};

/// Issues complete credential sets under one hierarchy (issuing CA + current DS).
#[derive(Debug)]
pub struct CardIssuer {
    citizen: CitizenIssuer,
    sod: SodSigner,
}

impl CardIssuer {
    /// Prepares the issuer (parses and pre-encodes the CA data once).
    pub fn new(
        store: Arc<dyn CaKeyStore>,
        hierarchy: &CaHierarchy,
        profiles: &CitizenProfiles,
    ) -> Result<Self> {
        Ok(Self {
            citizen: CitizenIssuer::new(store.clone(), &hierarchy.issuing, profiles)?,
            sod: SodSigner::new(store, &hierarchy.document_signer)?,
        })
    }

    /// Keystore label of the Document Signer this issuer signs with.
    pub fn document_signer_label(&self) -> &str {
        self.sod.key_label()
    }

    /// Produces the personalization package for one card.
    ///
    /// `card_ref` identifies the card/application (it is bound into the wrapped keys);
    /// `now` (from the caller's clock) starts the certificates' validity.
    pub fn issue(
        &self,
        card_ref: &str,
        chip: &ChipDataInput,
        transport: &TransportKey,
        now: OffsetDateTime,
    ) -> Result<CardCredentials> {
        let encoded = lds::encode(chip)?;
        let subject = CitizenSubject {
            national_code: chip.personal.national_code.clone(),
            given_name: chip.personal.first_name.clone(),
            surname: chip.personal.last_name.clone(),
        };
        let auth_key = CardKeyPair::generate()?;
        let sign_key = CardKeyPair::generate()?;
        let authentication_certificate = self.citizen.issue(
            &subject,
            CardKeyRole::Authentication,
            &auth_key.public_key,
            now,
        )?;
        let signature_certificate =
            self.citizen
                .issue(&subject, CardKeyRole::Signature, &sign_key.public_key, now)?;
        let ef_sod = self.sod.sign(&encoded.data_groups())?;
        let authentication_key = wrap(
            transport,
            card_ref,
            CardKeyRole::Authentication,
            auth_key.private_scalar(),
        )?;
        let signature_key = wrap(
            transport,
            card_ref,
            CardKeyRole::Signature,
            sign_key.private_scalar(),
        )?;
        Ok(CardCredentials {
            card_ref: card_ref.to_owned(),
            ef_com: encoded.ef_com,
            dg1: encoded.dg1,
            dg2: encoded.dg2,
            dg3: encoded.dg3,
            dg11: encoded.dg11,
            ef_sod,
            authentication_certificate,
            signature_certificate,
            authentication_key,
            signature_key,
            document_signer_label: self.sod.key_label().to_owned(),
        })
    }
}

/// What [`verify_card`] established about a card read back from the chip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCard {
    /// DG1 as decoded (redacted in `Debug`).
    pub personal: lds::PersonalData,
    /// Document Signer certificate embedded in EF.SOD, DER.
    pub document_signer_certificate: Vec<u8>,
    /// Serial of the authentication certificate (hex).
    pub authentication_serial: String,
    /// Serial of the signature certificate (hex).
    pub signature_serial: String,
}

/// QC's check of a personalized card, from the files read back from it:
///
/// - EF.COM lists DG1, DG2, DG3 and DG11, and every one of them decodes;
/// - EF.SOD verifies (every data-group hash, the DS signature, the DS certificate under the
///   root of `hierarchy`, or under a retired DS's root — the root is the same);
/// - both citizen certificates are signed by the issuing CA and name the national code of
///   DG1 as their subject serialNumber.
pub fn verify_card(
    hierarchy: &CaHierarchy,
    files: &lds::EncodedLds,
    ef_sod: &[u8],
    authentication_certificate: &[u8],
    signature_certificate: &[u8],
) -> Result<VerifiedCard> {
    use der::Decode;

    let com = lds::decode_ef_com(&files.ef_com)?;
    if com.data_groups != lds::DataGroup::ALL {
        return Err(KeysError::Lds(
            "EF.COM does not list DG1, DG2, DG3 and DG11".into(),
        ));
    }
    let personal = lds::decode_dg1(&files.dg1)?;
    lds::decode_dg2(&files.dg2)?;
    lds::decode_dg3(&files.dg3)?;
    lds::decode_dg11(&files.dg11)?;
    let sod = verify_sod(
        ef_sod,
        &files.data_groups(),
        Some(&hierarchy.root.certificate),
    )?;

    let mut serials = Vec::with_capacity(2);
    for der in [authentication_certificate, signature_certificate] {
        verify_certificate_signature(der, &hierarchy.issuing.certificate)?;
        let cert = x509_cert::Certificate::from_der(der)?;
        let code = cert
            .tbs_certificate
            .subject
            .0
            .iter()
            .flat_map(|rdn| rdn.0.iter())
            .find(|atv| atv.oid == AT_SERIAL_NUMBER)
            .map(|atv| atv.value.value().to_vec());
        if code.as_deref() != Some(personal.national_code.as_bytes()) {
            return Err(KeysError::Certificate(
                "certificate subject serialNumber does not match DG1".into(),
            ));
        }
        serials.push(serial_hex(&cert.tbs_certificate.serial_number));
    }
    let signature_serial = serials.pop().unwrap_or_default();
    let authentication_serial = serials.pop().unwrap_or_default();
    Ok(VerifiedCard {
        personal,
        document_signer_certificate: sod.ds_certificate,
        authentication_serial,
        signature_serial,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{CaConfig, init};
    use crate::custody::unwrap;
    use crate::keystore::test_support::file_store;
    use crate::pkix::PublicKey;
    use der::Decode;

    #[test]
    fn a_credential_set_is_complete_consistent_and_keeps_no_clear_key() {
        let (_dir, store) = file_store();
        let now = time::macros::datetime!(2025-03-01 08:00:00 UTC);
        let h = init(store.as_ref(), &CaConfig::default(), now).unwrap();
        let issuer = CardIssuer::new(store.clone(), &h, &CitizenProfiles::default()).unwrap();
        let site = TransportKey::generate("site-07").unwrap();
        let chip = lds::sample_input(123_456_789);
        let creds = issuer.issue("APP-000123", &chip, &site, now).unwrap();

        assert_eq!(lds::decode(&creds.lds()).unwrap(), chip);
        verify_sod(
            &creds.ef_sod,
            &creds.lds().data_groups(),
            Some(&h.root.certificate),
        )
        .unwrap();
        verify_certificate_signature(
            &creds.authentication_certificate.der,
            &h.issuing.certificate,
        )
        .unwrap();
        verify_certificate_signature(&creds.signature_certificate.der, &h.issuing.certificate)
            .unwrap();

        // The wrapped private keys match the certified public keys.
        for (cert, wrapped, role) in [
            (
                &creds.authentication_certificate,
                &creds.authentication_key,
                CardKeyRole::Authentication,
            ),
            (
                &creds.signature_certificate,
                &creds.signature_key,
                CardKeyRole::Signature,
            ),
        ] {
            let scalar = unwrap(&site, wrapped, "APP-000123", role).unwrap();
            let parsed = x509_cert::Certificate::from_der(&cert.der).unwrap();
            let public =
                PublicKey::from_spki(&parsed.tbs_certificate.subject_public_key_info).unwrap();
            let d = openssl::bn::BigNum::from_slice(&scalar[..]).unwrap();
            let group = &*crate::pkix::P256;
            let mut ctx = openssl::bn::BigNumContext::new().unwrap();
            let mut point = openssl::ec::EcPoint::new(group).unwrap();
            point.mul_generator2(group, &d, &mut ctx).unwrap();
            let key = openssl::ec::EcKey::from_public_key(group, &point).unwrap();
            assert_eq!(
                crate::pkix::openssl_public_point(&key).unwrap(),
                public.as_sec1()
            );

            // No clear private key anywhere in the serialised package or its Debug form.
            let json = serde_json::to_string(&creds).unwrap();
            let b64 = {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.encode(&scalar[..])
            };
            assert!(!json.contains(&hex::encode(&scalar[..])) && !json.contains(&b64));
            assert!(!format!("{creds:?}").contains(&hex::encode(&scalar[..8])));
        }
        assert!(!format!("{creds:?}").contains(&chip.personal.national_code));

        let json = serde_json::to_vec(&creds).unwrap();
        let back: CardCredentials = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, creds);

        // QC's check passes on the package, and fails when the certificates belong to
        // another card.
        let verified = verify_card(
            &h,
            &creds.lds(),
            &creds.ef_sod,
            &creds.authentication_certificate.der,
            &creds.signature_certificate.der,
        )
        .unwrap();
        assert_eq!(verified.personal, chip.personal);
        assert_eq!(
            verified.signature_serial,
            creds.signature_certificate.serial
        );
        assert_eq!(
            verified.authentication_serial,
            creds.authentication_certificate.serial
        );
        let other = issuer
            .issue("APP-000999", &lds::sample_input(999), &site, now)
            .unwrap();
        assert!(matches!(
            verify_card(
                &h,
                &creds.lds(),
                &creds.ef_sod,
                &other.authentication_certificate.der,
                &creds.signature_certificate.der
            ),
            Err(KeysError::Certificate(_))
        ));
        assert!(
            verify_card(
                &h,
                &other.lds(),
                &creds.ef_sod,
                &creds.authentication_certificate.der,
                &creds.signature_certificate.der
            )
            .is_err()
        );
    }
}
