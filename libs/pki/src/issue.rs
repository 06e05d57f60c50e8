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
//! With on-card key generation (`[keys] generation = "on_card"`) the work splits in two:
//! [`CardIssuer::prepare_on_card`] (keys stage: the LDS and EF.SOD, no key material) and
//! [`CardIssuer::certify_on_card`] (personalization, while the card is in the encoder: the
//! public keys the chip generated, each with its proof of possession — the chip's signature
//! over a [`possession_challenge`] — become the two certificates).
//!
//! [`verify_card`] is the matching check QC runs on the files read back from the chip.

use std::sync::Arc;

use time::OffsetDateTime;

use crate::ca::CaHierarchy;
use crate::citizen::{
    CardKeyPair, CardKeyRole, CitizenIssuer, CitizenProfiles, CitizenSubject, IssuedCertificate,
};
use crate::custody::{CardCredentials, OffCardKeys, TransportKey, wrap};
use crate::keystore::CaKeyStore;
use crate::lds::{self, ChipDataInput};
use crate::pkix::{
    AT_SERIAL_NUMBER, PublicKey, ecdsa_raw_to_der, serial_hex, sha256, verify_certificate_signature,
};
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
            document_signer_label: self.sod.key_label().to_owned(),
            off_card: Some(OffCardKeys {
                authentication_certificate,
                signature_certificate,
                authentication_key,
                signature_key,
            }),
        })
    }

    /// The package of a card whose keys the chip generates: the LDS and EF.SOD (which covers
    /// DG1, DG2, DG3 and DG11 only, so it is signed before the keys exist), no key material.
    pub fn prepare_on_card(&self, card_ref: &str, chip: &ChipDataInput) -> Result<CardCredentials> {
        let encoded = lds::encode(chip)?;
        let ef_sod = self.sod.sign(&encoded.data_groups())?;
        Ok(CardCredentials {
            card_ref: card_ref.to_owned(),
            ef_com: encoded.ef_com,
            dg1: encoded.dg1,
            dg2: encoded.dg2,
            dg3: encoded.dg3,
            dg11: encoded.dg11,
            ef_sod,
            document_signer_label: self.sod.key_label().to_owned(),
            off_card: None,
        })
    }

    /// Certifies the two key pairs a chip generated, after checking each proof of
    /// possession: the chip's signature (ECDSA P-256 / SHA-256, raw r ‖ s) over a challenge
    /// from [`possession_challenge`] for this card, this key and this public key. The
    /// subject comes from the card's own DG1 (`dg1`). Returns (authentication, signature).
    pub fn certify_on_card(
        &self,
        card_ref: &str,
        dg1: &[u8],
        keys: &[ChipKeyProof; 2],
        now: OffsetDateTime,
    ) -> Result<[IssuedCertificate; 2]> {
        let personal = lds::decode_dg1(dg1)?;
        let subject = CitizenSubject {
            national_code: personal.national_code.clone(),
            given_name: personal.first_name.clone(),
            surname: personal.last_name.clone(),
        };
        // Both proofs first: nothing is issued for a card that fails either.
        let roles = [CardKeyRole::Authentication, CardKeyRole::Signature];
        let mut publics = Vec::with_capacity(2);
        for (proof, role) in keys.iter().zip(roles) {
            let bad = |reason| KeysError::Possession { role, reason };
            let public = PublicKey::from_sec1(&proof.public_key)
                .map_err(|_| bad("the chip answered no valid P-256 public key"))?;
            let binding = challenge_binding(card_ref, role, &proof.public_key);
            if !proof.challenge.starts_with(&binding)
                || proof.challenge.len() != binding.len() + CHALLENGE_NONCE
            {
                return Err(bad(
                    "the proof of possession answers another card's or key's challenge",
                ));
            }
            let signature = ecdsa_raw_to_der(&proof.signature)
                .map_err(|_| bad("the proof of possession is not a P-256 signature"))?;
            if !public.verify_digest(&sha256(&proof.challenge), &signature)? {
                return Err(bad("the chip's proof of possession does not verify"));
            }
            publics.push(public);
        }
        let authentication =
            self.citizen
                .issue(&subject, CardKeyRole::Authentication, &publics[0], now)?;
        let signature = self
            .citizen
            .issue(&subject, CardKeyRole::Signature, &publics[1], now)?;
        Ok([authentication, signature])
    }
}

/// A key pair generated on a chip, with its proof of possession.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChipKeyProof {
    /// The public key as the chip answered it (SEC1 uncompressed).
    pub public_key: Vec<u8>,
    /// The challenge the chip signed ([`possession_challenge`]).
    pub challenge: Vec<u8>,
    /// The chip's signature over it: ECDSA P-256 over SHA-256(challenge), raw r ‖ s.
    pub signature: Vec<u8>,
}

const CHALLENGE_NONCE: usize = 16;

fn challenge_binding(card_ref: &str, role: CardKeyRole, public_key: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let mut out = b"cardpipe proof of possession v1\0".to_vec();
    out.extend_from_slice(card_ref.as_bytes());
    out.push(0);
    out.push(role.key_reference());
    out.extend_from_slice(&sha2::Sha256::digest(public_key));
    out
}

/// The challenge a chip signs with a key it just generated, before the CA certifies that
/// key (like a PKCS#10 request's self-signature): bound to the card, the key slot and the
/// public key, plus 16 fresh random bytes, so a proof made for one key or card cannot be
/// presented for another.
pub fn possession_challenge(card_ref: &str, role: CardKeyRole, public_key: &[u8]) -> Vec<u8> {
    let mut out = challenge_binding(card_ref, role, public_key);
    let mut nonce = [0u8; CHALLENGE_NONCE];
    openssl::rand::rand_bytes(&mut nonce).expect("the OS random generator");
    out.extend_from_slice(&nonce);
    out
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
        assert_eq!(creds.key_origin(), crate::custody::KeyOrigin::OffCard);
        let keys = creds.off_card.as_ref().unwrap();

        assert_eq!(lds::decode(&creds.lds()).unwrap(), chip);
        verify_sod(
            &creds.ef_sod,
            &creds.lds().data_groups(),
            Some(&h.root.certificate),
        )
        .unwrap();
        verify_certificate_signature(&keys.authentication_certificate.der, &h.issuing.certificate)
            .unwrap();
        verify_certificate_signature(&keys.signature_certificate.der, &h.issuing.certificate)
            .unwrap();

        // The wrapped private keys match the certified public keys.
        for (cert, wrapped, role) in [
            (
                &keys.authentication_certificate,
                &keys.authentication_key,
                CardKeyRole::Authentication,
            ),
            (
                &keys.signature_certificate,
                &keys.signature_key,
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
            &keys.authentication_certificate.der,
            &keys.signature_certificate.der,
        )
        .unwrap();
        assert_eq!(verified.personal, chip.personal);
        assert_eq!(verified.signature_serial, keys.signature_certificate.serial);
        assert_eq!(
            verified.authentication_serial,
            keys.authentication_certificate.serial
        );
        let other = issuer
            .issue("APP-000999", &lds::sample_input(999), &site, now)
            .unwrap();
        let other_keys = other.off_card.as_ref().unwrap();
        assert!(matches!(
            verify_card(
                &h,
                &creds.lds(),
                &creds.ef_sod,
                &other_keys.authentication_certificate.der,
                &keys.signature_certificate.der
            ),
            Err(KeysError::Certificate(_))
        ));
        assert!(
            verify_card(
                &h,
                &other.lds(),
                &creds.ef_sod,
                &keys.authentication_certificate.der,
                &keys.signature_certificate.der
            )
            .is_err()
        );
    }

    /// Signs like the chip: ECDSA P-256 over SHA-256(message), raw r ‖ s.
    fn chip_sign(key: &CardKeyPair, message: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        let group = &*crate::pkix::P256;
        let d = openssl::bn::BigNum::from_slice(&key.private_scalar()[..]).unwrap();
        let mut ctx = openssl::bn::BigNumContext::new().unwrap();
        let point =
            openssl::ec::EcPoint::from_bytes(group, key.public_key.as_sec1(), &mut ctx).unwrap();
        let ec = openssl::ec::EcKey::from_private_components(group, &d, &point).unwrap();
        let sig = openssl::ecdsa::EcdsaSig::sign(&sha2::Sha256::digest(message), &ec).unwrap();
        let mut raw = sig.r().to_vec_padded(32).unwrap();
        raw.extend(sig.s().to_vec_padded(32).unwrap());
        raw
    }

    #[test]
    fn on_card_packages_carry_no_key_and_certification_needs_each_proof_of_possession() {
        let (_dir, store) = file_store();
        let now = time::macros::datetime!(2025-03-01 08:00:00 UTC);
        let h = init(store.as_ref(), &CaConfig::default(), now).unwrap();
        let issuer = CardIssuer::new(store.clone(), &h, &CitizenProfiles::default()).unwrap();
        let chip = lds::sample_input(555_000_111);
        let creds = issuer.prepare_on_card("APP-1", &chip).unwrap();
        assert_eq!(creds.key_origin(), crate::custody::KeyOrigin::OnCard);
        assert!(creds.certificate_serials().is_empty());
        let json = serde_json::to_string(&creds).unwrap();
        for field in ["authentication_key", "signature_key", "certificate"] {
            assert!(!json.contains(field), "{field} in an on-card package");
        }
        let back: CardCredentials = serde_json::from_str(&json).unwrap();
        assert_eq!(back, creds);
        verify_sod(
            &creds.ef_sod,
            &creds.lds().data_groups(),
            Some(&h.root.certificate),
        )
        .unwrap();

        // The chip's two keys (stand-ins generated here) and their proofs.
        let (auth, sign) = (
            CardKeyPair::generate().unwrap(),
            CardKeyPair::generate().unwrap(),
        );
        let proof = |key: &CardKeyPair, role| {
            let challenge = possession_challenge("APP-1", role, key.public_key.as_sec1());
            ChipKeyProof {
                public_key: key.public_key.as_sec1().to_vec(),
                signature: chip_sign(key, &challenge),
                challenge,
            }
        };
        let proofs = [
            proof(&auth, CardKeyRole::Authentication),
            proof(&sign, CardKeyRole::Signature),
        ];
        let [a, s] = issuer
            .certify_on_card("APP-1", &creds.dg1, &proofs, now)
            .unwrap();
        let verified = verify_card(&h, &creds.lds(), &creds.ef_sod, &a.der, &s.der).unwrap();
        assert_eq!(verified.authentication_serial, a.serial);
        assert!(a.der.windows(65).any(|w| w == auth.public_key.as_sec1()));
        assert!(s.der.windows(65).any(|w| w == sign.public_key.as_sec1()));

        // A signature by another key, the proofs swapped between slots, another card's
        // challenge: refused, nothing issued.
        let mut forged = proofs.clone();
        forged[0].signature = chip_sign(&sign, &forged[0].challenge);
        let swapped = [proofs[1].clone(), proofs[0].clone()];
        let other_card = [proof(&auth, CardKeyRole::Authentication), proofs[1].clone()];
        for (what, bad, card) in [
            ("forged", &forged, "APP-1"),
            ("swapped", &swapped, "APP-1"),
            ("other card", &other_card, "APP-2"),
        ] {
            let err = issuer
                .certify_on_card(card, &creds.dg1, bad, now)
                .unwrap_err();
            assert!(
                err.to_string().contains("proof of possession"),
                "{what}: {err}"
            );
        }
    }
}
