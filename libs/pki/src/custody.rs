//! Key custody: citizen private keys leave the keys stage only wrapped, and
//! [`CardCredentials`] — the personalization package — carries everything else.
//!
//! A citizen key is wrapped with AES-256-GCM under the transport key of the encoder site
//! that will personalize the card. The wrapped blob records the transport key id in clear,
//! and its whole header (format, key id, card reference, key reference) is the GCM
//! additional data: a blob moved to another card, swapped between the authentication and
//! signature slots, or relabelled to another site's key fails to unwrap.
//!
//! Binary blob (what goes to the object store when stored as raw bytes):
//!
//! ```text
//! "CPWK" | 01 | len(key_id) u8 | key_id | len(card_ref) u16 BE | card_ref | key_ref u8 |
//! nonce (12) | ciphertext (32) | tag (16)
//! ```
//!
//! Crypto-shredding after QC is the caller's part: delete the stored blob (and the encoder
//! holds the only other copy of the transport key); nothing in this crate keeps a copy.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use openssl::symm::{Cipher, decrypt_aead, encrypt_aead};

use crate::citizen::{CardKeyRole, IssuedCertificate};
use crate::lds::EncodedLds;
use crate::pkix::{b64_bytes, hex_bytes};
use crate::{KeysError, Result};

const MAGIC: &[u8; 4] = b"CPWK";
const VERSION: u8 = 1;

/// An encoder site's AES-256 transport key. `Debug` shows the id only.
pub struct TransportKey {
    key_id: String,
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for TransportKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl TransportKey {
    /// Wraps existing key material under an id (e.g. "encoder-site-tehran-01/2025-03").
    pub fn new(key_id: impl Into<String>, key: Zeroizing<[u8; 32]>) -> Result<Self> {
        let key_id = key_id.into();
        if key_id.is_empty() || key_id.len() > 255 {
            return Err(KeysError::Invalid(
                "transport key id must be 1..=255 bytes".into(),
            ));
        }
        Ok(Self { key_id, key })
    }

    /// A fresh random transport key (tests, simulated encoders, key ceremonies).
    pub fn generate(key_id: impl Into<String>) -> Result<Self> {
        let mut key = Zeroizing::new([0u8; 32]);
        openssl::rand::rand_bytes(&mut key[..])?;
        Self::new(key_id, key)
    }

    /// Parses a hex-encoded key held in a secret (configuration / secret store).
    pub fn from_hex(key_id: impl Into<String>, hex_key: &secrecy::SecretString) -> Result<Self> {
        use secrecy::ExposeSecret;
        let mut key = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(hex_key.expose_secret().trim(), &mut key[..])
            .map_err(|_| KeysError::Invalid("transport key must be 64 hex digits".into()))?;
        Self::new(key_id, key)
    }

    /// The key id recorded in wrapped blobs.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }
}

/// A citizen private key wrapped for one card slot. Safe to store and log (as Debug).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    /// Transport key id.
    pub key_id: String,
    /// Card / application reference the key is bound to.
    pub card_ref: String,
    /// Key reference on the card (01 authentication, 02 signature).
    pub key_ref: u8,
    /// GCM nonce.
    #[serde(with = "hex_bytes")]
    pub nonce: Vec<u8>,
    /// Ciphertext followed by the 16-byte tag.
    #[serde(with = "b64_bytes")]
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrappedKey")
            .field("key_id", &self.key_id)
            .field("card_ref", &self.card_ref)
            .field("key_ref", &self.key_ref)
            .finish_non_exhaustive()
    }
}

fn header(key_id: &str, card_ref: &str, key_ref: u8) -> Result<Vec<u8>> {
    let id_len = u8::try_from(key_id.len())
        .map_err(|_| KeysError::Invalid("transport key id too long".into()))?;
    let ref_len = u16::try_from(card_ref.len())
        .map_err(|_| KeysError::Invalid("card reference too long".into()))?;
    let mut h = Vec::with_capacity(8 + key_id.len() + card_ref.len());
    h.extend_from_slice(MAGIC);
    h.push(VERSION);
    h.push(id_len);
    h.extend_from_slice(key_id.as_bytes());
    h.extend_from_slice(&ref_len.to_be_bytes());
    h.extend_from_slice(card_ref.as_bytes());
    h.push(key_ref);
    Ok(h)
}

/// Wraps a 32-byte private scalar for `card_ref`'s `role` slot.
pub fn wrap(
    transport: &TransportKey,
    card_ref: &str,
    role: CardKeyRole,
    scalar: &Zeroizing<[u8; 32]>,
) -> Result<WrappedKey> {
    if card_ref.is_empty() {
        return Err(KeysError::Invalid("empty card reference".into()));
    }
    let key_ref = role.key_reference();
    let aad = header(&transport.key_id, card_ref, key_ref)?;
    let mut nonce = [0u8; 12];
    openssl::rand::rand_bytes(&mut nonce)?;
    let mut tag = [0u8; 16];
    let mut ciphertext = encrypt_aead(
        Cipher::aes_256_gcm(),
        &transport.key[..],
        Some(&nonce),
        &aad,
        &scalar[..],
        &mut tag,
    )?;
    ciphertext.extend_from_slice(&tag);
    Ok(WrappedKey {
        key_id: transport.key_id.clone(),
        card_ref: card_ref.to_owned(),
        key_ref,
        nonce: nonce.to_vec(),
        ciphertext,
    })
}

/// Unwraps, checking the blob is for this transport key, card and slot.
pub fn unwrap(
    transport: &TransportKey,
    wrapped: &WrappedKey,
    card_ref: &str,
    role: CardKeyRole,
) -> Result<Zeroizing<[u8; 32]>> {
    if wrapped.key_id != transport.key_id {
        return Err(KeysError::Unwrap("wrapped under a different transport key"));
    }
    if wrapped.card_ref != card_ref || wrapped.key_ref != role.key_reference() {
        return Err(KeysError::Unwrap(
            "wrapped for a different card or key slot",
        ));
    }
    if wrapped.nonce.len() != 12 || wrapped.ciphertext.len() != 48 {
        return Err(KeysError::Unwrap("malformed wrapped key"));
    }
    let aad = header(&wrapped.key_id, &wrapped.card_ref, wrapped.key_ref)?;
    let (ct, tag) = wrapped.ciphertext.split_at(32);
    let plain = decrypt_aead(
        Cipher::aes_256_gcm(),
        &transport.key[..],
        Some(&wrapped.nonce),
        &aad,
        ct,
        tag,
    )
    .map(Zeroizing::new)
    .map_err(|_| KeysError::Unwrap("authentication failed"))?;
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&plain);
    Ok(out)
}

impl WrappedKey {
    /// The binary blob form (header, nonce, ciphertext+tag).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = header(&self.key_id, &self.card_ref, self.key_ref)?;
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.ciphertext);
        Ok(out)
    }

    /// Parses the binary blob form.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bad = || KeysError::Unwrap("malformed wrapped key blob");
        if bytes.len() < 6 || &bytes[..4] != MAGIC || bytes[4] != VERSION {
            return Err(bad());
        }
        let id_len = usize::from(bytes[5]);
        let mut at = 6;
        let key_id = bytes.get(at..at + id_len).ok_or_else(bad)?;
        at += id_len;
        let ref_len = usize::from(u16::from_be_bytes(
            bytes
                .get(at..at + 2)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        ));
        at += 2;
        let card_ref = bytes.get(at..at + ref_len).ok_or_else(bad)?;
        at += ref_len;
        let key_ref = *bytes.get(at).ok_or_else(bad)?;
        at += 1;
        let nonce = bytes.get(at..at + 12).ok_or_else(bad)?.to_vec();
        at += 12;
        let ciphertext = bytes.get(at..).ok_or_else(bad)?.to_vec();
        Ok(Self {
            key_id: String::from_utf8(key_id.to_vec()).map_err(|_| bad())?,
            card_ref: String::from_utf8(card_ref.to_vec()).map_err(|_| bad())?,
            key_ref,
            nonce,
            ciphertext,
        })
    }
}

/// Where a card's two key pairs are generated (`[keys] generation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KeyOrigin {
    /// On the chip (GENERATE ASYMMETRIC KEY PAIR during personalization): the private keys
    /// never exist anywhere else; the certificates are issued for the public keys the chip
    /// answers, after it proved possession.
    #[default]
    OnCard,
    /// In the keys stage, in software; the private keys travel to the encoder wrapped under
    /// the site's transport key and are imported into the chip (for chips that cannot
    /// generate keys).
    OffCard,
}

impl KeyOrigin {
    /// The configuration / report spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyOrigin::OnCard => "on_card",
            KeyOrigin::OffCard => "off_card",
        }
    }
}

impl std::fmt::Display for KeyOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Artifact kind of the certificates written to the card of an application whose keys the
/// chip generated (personalization records it; QC checks the card against it).
pub const CARD_CERTIFICATES_ARTIFACT: &str = "card_certificates";

/// What was written to the card of an application whose keys the chip generated
/// (`applications/<id>/card-certificates-<serial>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardCertificates {
    /// Where the keys were generated (`on_card`).
    pub key_origin: KeyOrigin,
    /// The chip's serial.
    pub chip_serial: String,
    /// The blank's serial.
    pub blank_serial: String,
    /// C001.
    pub authentication: IssuedCertificate,
    /// C002.
    pub signature: IssuedCertificate,
}

/// The personalization package: everything the personalization stage writes to one chip.
/// Serialises to JSON (binary fields base64) for the object store. `Debug` is redacted.
///
/// With off-card key generation it also carries both certificates and both private keys
/// (wrapped) in [`CardCredentials::off_card`]; with on-card generation it carries no key
/// material at all, and the certificates are issued while the card is in the encoder.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardCredentials {
    /// Card / application reference everything is bound to.
    pub card_ref: String,
    /// EF.COM (011E).
    #[serde(with = "b64_bytes")]
    pub ef_com: Vec<u8>,
    /// DG1 (0101).
    #[serde(with = "b64_bytes")]
    pub dg1: Vec<u8>,
    /// DG2 (0102).
    #[serde(with = "b64_bytes")]
    pub dg2: Vec<u8>,
    /// DG3 (0103).
    #[serde(with = "b64_bytes")]
    pub dg3: Vec<u8>,
    /// DG11 (010B).
    #[serde(with = "b64_bytes")]
    pub dg11: Vec<u8>,
    /// EF.SOD (011D), with the 77 wrapper.
    #[serde(with = "b64_bytes")]
    pub ef_sod: Vec<u8>,
    /// Keystore label of the Document Signer that signed EF.SOD (for usage counting).
    pub document_signer_label: String,
    /// Off-card generation only: the keys and their certificates (the package's JSON keeps
    /// the field names of packages written before on-card generation existed).
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub off_card: Option<OffCardKeys>,
}

/// The key material of an off-card package.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffCardKeys {
    /// Authentication certificate (EF C001).
    pub authentication_certificate: IssuedCertificate,
    /// Signature certificate (EF C002).
    pub signature_certificate: IssuedCertificate,
    /// Authentication private key (key reference 01), wrapped.
    pub authentication_key: WrappedKey,
    /// Signature private key (key reference 02), wrapped.
    pub signature_key: WrappedKey,
}

impl std::fmt::Debug for OffCardKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OffCardKeys")
            .field(
                "authentication_serial",
                &self.authentication_certificate.serial,
            )
            .field("signature_serial", &self.signature_certificate.serial)
            .field("authentication_key", &self.authentication_key)
            .field("signature_key", &self.signature_key)
            .finish()
    }
}

impl std::fmt::Debug for CardCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CardCredentials")
            .field("card_ref", &self.card_ref)
            .field("key_origin", &self.key_origin())
            .field("off_card", &self.off_card)
            .field("document_signer_label", &self.document_signer_label)
            .finish_non_exhaustive()
    }
}

impl CardCredentials {
    /// Where this package's card keys are generated.
    pub fn key_origin(&self) -> KeyOrigin {
        if self.off_card.is_some() {
            KeyOrigin::OffCard
        } else {
            KeyOrigin::OnCard
        }
    }

    /// Serials of the certificates issued with the package (none for on-card generation:
    /// those are issued during personalization).
    pub fn certificate_serials(&self) -> Vec<String> {
        self.off_card
            .iter()
            .flat_map(|k| {
                [
                    k.authentication_certificate.serial.clone(),
                    k.signature_certificate.serial.clone(),
                ]
            })
            .collect()
    }

    /// The LDS files as one value (for [`crate::sod::verify_sod`] and [`crate::lds::decode`]).
    pub fn lds(&self) -> EncodedLds {
        EncodedLds {
            ef_com: self.ef_com.clone(),
            dg1: self.dg1.clone(),
            dg2: self.dg2.clone(),
            dg3: self.dg3.clone(),
            dg11: self.dg11.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar() -> Zeroizing<[u8; 32]> {
        Zeroizing::new([7u8; 32])
    }

    #[test]
    fn wrap_unwrap_and_every_binding_is_enforced() {
        let site = TransportKey::generate("site-01/2025").unwrap();
        let w = wrap(&site, "APP-1", CardKeyRole::Signature, &scalar()).unwrap();
        assert_eq!(w.key_id, "site-01/2025");
        assert_eq!(w.key_ref, 2);
        assert_eq!(
            *unwrap(&site, &w, "APP-1", CardKeyRole::Signature).unwrap(),
            [7u8; 32]
        );

        // Blob round trip, and the key id is in the clear header.
        let blob = w.to_bytes().unwrap();
        assert!(blob.windows(12).any(|x| x == b"site-01/2025"));
        assert_eq!(WrappedKey::from_bytes(&blob).unwrap(), w);
        assert!(!blob.windows(32).any(|x| x == [7u8; 32]));

        assert!(unwrap(&site, &w, "APP-2", CardKeyRole::Signature).is_err());
        assert!(unwrap(&site, &w, "APP-1", CardKeyRole::Authentication).is_err());
        let other = TransportKey::generate("site-01/2025").unwrap();
        assert!(matches!(
            unwrap(&other, &w, "APP-1", CardKeyRole::Signature),
            Err(KeysError::Unwrap(_))
        ));
        // Editing the header (rebinding to another card) breaks the GCM tag.
        let mut moved = w.clone();
        moved.card_ref = "APP-2".into();
        assert!(unwrap(&site, &moved, "APP-2", CardKeyRole::Signature).is_err());
        let mut flipped = w.clone();
        flipped.ciphertext[0] ^= 1;
        assert!(unwrap(&site, &flipped, "APP-1", CardKeyRole::Signature).is_err());

        let json = serde_json::to_string(&w).unwrap();
        assert_eq!(serde_json::from_str::<WrappedKey>(&json).unwrap(), w);
        assert!(!format!("{site:?}").contains(&hex::encode(&site.key[..4])));
        assert!(!format!("{w:?}").contains(&hex::encode(&w.ciphertext[..4])));
    }

    #[test]
    fn transport_key_from_hex() {
        let hexkey = secrecy::SecretString::from("11".repeat(32));
        let k = TransportKey::from_hex("k1", &hexkey).unwrap();
        assert_eq!(*k.key, [0x11; 32]);
        assert!(!format!("{k:?}").contains("11111111"));
        assert!(TransportKey::from_hex("k1", &secrecy::SecretString::from("zz")).is_err());
    }
}
