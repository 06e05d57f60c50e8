//! Envelope encryption of personal data at rest (photos, templates, the
//! personal record).
//!
//! Each sealed item gets its own random data key; the data is encrypted with
//! AES-256-GCM under that key, and the data key is itself encrypted
//! ("wrapped") under the master key named by its key id. The associated data
//! binds a blob to its purpose (e.g. `photo:<application id>`), so a blob
//! copied to another application or kind fails to open. Rotating the master
//! key means adding a key id; old blobs keep naming theirs.
//!
//! Lookup digests (the keyed digest of a national code that finds an applicant's
//! applications without storing the code) have keys of their own, versioned by id: a
//! dedicated `[envelope] lookup_key`, or else one derived from each master key (id
//! `derived:<master key id>`). Lookups try every known lookup key, current first, so a
//! rotation of either key never makes a stored digest unfindable; the re-digester
//! ([`crate::records::redigest`]) moves stored digests to the current key in the background.
//!
//! Blob layout: `CPE1` | key id length (u8) | key id | wrapped-key nonce (12)
//! | wrapped key + tag (48) | data nonce (12) | ciphertext + tag.

use std::collections::HashMap;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use zeroize::Zeroizing;

const MAGIC: &[u8; 4] = b"CPE1";

/// Sealing failures. They never include the plaintext or keys.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// The master key is not 64 hex digits.
    #[error("master key {0:?} must be 64 hex digits (32 bytes)")]
    BadMasterKey(String),
    /// The blob names a key id this process does not have.
    #[error("sealed data names unknown master key {0:?}")]
    UnknownKey(String),
    /// The blob is truncated, altered, or bound to another purpose.
    #[error("sealed data is corrupt or does not belong to {0}")]
    Corrupt(String),
}

/// Seals and opens personal data; holds the master keys.
#[derive(Clone)]
pub struct Sealer {
    current: String,
    keys: HashMap<String, Zeroizing<[u8; 32]>>,
    /// Lookup-digest keys by id, the current one first.
    lookup_keys: Vec<(String, Zeroizing<[u8; 32]>)>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

fn parse_key(id: &str, hex_key: &SecretString) -> Result<Zeroizing<[u8; 32]>, EnvelopeError> {
    let mut key = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(hex_key.expose_secret().trim(), key.as_mut())
        .map_err(|_| EnvelopeError::BadMasterKey(id.to_owned()))?;
    Ok(key)
}

impl Sealer {
    /// A sealer whose current master key is `id` = `hex_key`.
    pub fn new(id: &str, hex_key: &SecretString) -> Result<Self, EnvelopeError> {
        let key = parse_key(id, hex_key)?;
        let lookup_keys = vec![(format!("derived:{id}"), derive_lookup_key(&key))];
        let mut keys = HashMap::new();
        keys.insert(id.to_owned(), key);
        Ok(Self {
            current: id.to_owned(),
            keys,
            lookup_keys,
        })
    }

    /// Adds an older master key that can still open blobs naming it (and find the lookup
    /// digests made with the lookup key derived from it).
    pub fn with_previous(
        mut self,
        id: &str,
        hex_key: &SecretString,
    ) -> Result<Self, EnvelopeError> {
        let key = parse_key(id, hex_key)?;
        self.lookup_keys
            .push((format!("derived:{id}"), derive_lookup_key(&key)));
        self.keys.insert(id.to_owned(), key);
        Ok(self)
    }

    /// Makes `hex_key` (id `id`) the current lookup-digest key; the keys known so far still
    /// find the digests made with them.
    pub fn with_lookup_key(
        mut self,
        id: &str,
        hex_key: &SecretString,
    ) -> Result<Self, EnvelopeError> {
        let key = parse_key(id, hex_key)?;
        self.lookup_keys.retain(|(known, _)| known != id);
        self.lookup_keys.insert(0, (id.to_owned(), key));
        Ok(self)
    }

    /// Adds an older lookup-digest key whose digests are still found.
    pub fn with_previous_lookup_key(
        mut self,
        id: &str,
        hex_key: &SecretString,
    ) -> Result<Self, EnvelopeError> {
        let key = parse_key(id, hex_key)?;
        if !self.lookup_keys.iter().any(|(known, _)| known == id) {
            self.lookup_keys.push((id.to_owned(), key));
        }
        Ok(self)
    }

    /// Id of the current lookup-digest key (stored beside each digest).
    pub fn lookup_key_id(&self) -> &str {
        &self.lookup_keys[0].0
    }

    /// A fresh random 32-byte key as hex (for `cardpipe` to create a key file).
    pub fn generate_key_hex() -> SecretString {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(key.as_mut());
        hex::encode(key.as_ref()).into()
    }

    /// Encrypts `plaintext` for `purpose`.
    pub fn seal(&self, purpose: &str, plaintext: &[u8]) -> Vec<u8> {
        let master = &self.keys[&self.current];
        let mut data_key = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(data_key.as_mut());
        let mut key_nonce = [0u8; 12];
        let mut data_nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut key_nonce);
        rand::rng().fill_bytes(&mut data_nonce);
        let wrap = Aes256Gcm::new(&Key::<Aes256Gcm>::from(**master));
        let wrapped = wrap
            .encrypt(
                &Nonce::from(key_nonce),
                Payload {
                    msg: data_key.as_ref(),
                    aad: purpose.as_bytes(),
                },
            )
            .expect("AES-GCM encryption cannot fail on valid sizes");
        let data = Aes256Gcm::new(&Key::<Aes256Gcm>::from(*data_key));
        let ciphertext = data
            .encrypt(
                &Nonce::from(data_nonce),
                Payload {
                    msg: plaintext,
                    aad: purpose.as_bytes(),
                },
            )
            .expect("AES-GCM encryption cannot fail on valid sizes");
        let id = self.current.as_bytes();
        let mut out =
            Vec::with_capacity(4 + 1 + id.len() + 12 + wrapped.len() + 12 + ciphertext.len());
        out.extend_from_slice(MAGIC);
        out.push(u8::try_from(id.len()).expect("key ids are short"));
        out.extend_from_slice(id);
        out.extend_from_slice(&key_nonce);
        out.extend_from_slice(&wrapped);
        out.extend_from_slice(&data_nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    /// Decrypts a blob sealed for `purpose`.
    pub fn open(&self, purpose: &str, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
        let corrupt = || EnvelopeError::Corrupt(purpose.to_owned());
        let rest = blob.strip_prefix(MAGIC.as_slice()).ok_or_else(corrupt)?;
        let (&id_len, rest) = rest.split_first().ok_or_else(corrupt)?;
        let id_len = usize::from(id_len);
        if rest.len() < id_len + 12 + 48 + 12 + 16 {
            return Err(corrupt());
        }
        let (id, rest) = rest.split_at(id_len);
        let id = std::str::from_utf8(id).map_err(|_| corrupt())?;
        let master = self
            .keys
            .get(id)
            .ok_or_else(|| EnvelopeError::UnknownKey(id.to_owned()))?;
        let (key_nonce, rest) = rest.split_at(12);
        let (wrapped, rest) = rest.split_at(48);
        let (data_nonce, ciphertext) = rest.split_at(12);
        let wrap = Aes256Gcm::new(&Key::<Aes256Gcm>::from(**master));
        let data_key = Zeroizing::new(
            wrap.decrypt(
                &Nonce::from(<[u8; 12]>::try_from(key_nonce).map_err(|_| corrupt())?),
                Payload {
                    msg: wrapped,
                    aad: purpose.as_bytes(),
                },
            )
            .map_err(|_| corrupt())?,
        );
        let data_key: [u8; 32] = data_key.as_slice().try_into().map_err(|_| corrupt())?;
        let data = Aes256Gcm::new(&Key::<Aes256Gcm>::from(data_key));
        let plaintext = data
            .decrypt(
                &Nonce::from(<[u8; 12]>::try_from(data_nonce).map_err(|_| corrupt())?),
                Payload {
                    msg: ciphertext,
                    aad: purpose.as_bytes(),
                },
            )
            .map_err(|_| corrupt())?;
        Ok(Zeroizing::new(plaintext))
    }

    /// A keyed digest for looking personal data up without storing it in
    /// clear (national code, ...): HMAC-SHA256 as hex, under the current lookup key.
    pub fn lookup_digest(&self, kind: &str, value: &str) -> String {
        digest_with(&self.lookup_keys[0].1, kind, value)
    }

    /// The digests of `value` under every known lookup key, current first: what a lookup
    /// must search for while stored digests are being moved to the current key.
    pub fn lookup_digests(&self, kind: &str, value: &str) -> Vec<String> {
        self.lookup_keys
            .iter()
            .map(|(_, key)| digest_with(key, kind, value))
            .collect()
    }
}

/// The lookup key derived from a master key, so it differs from the encryption key.
fn derive_lookup_key(master: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(master).expect("any key length");
    mac.update(b"cardpipe lookup digest v1");
    Zeroizing::new(<[u8; 32]>::from(mac.finalize().into_bytes()))
}

fn digest_with(key: &[u8; 32], kind: &str, value: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
    mac.update(kind.as_bytes());
    mac.update(b"\0");
    mac.update(value.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(id: &str) -> Sealer {
        Sealer::new(id, &Sealer::generate_key_hex()).unwrap()
    }

    #[test]
    fn round_trips_and_binds_purpose() {
        let s = sealer("k1");
        let blob = s.seal("photo:app-1", b"jpeg bytes");
        assert_eq!(
            s.open("photo:app-1", &blob).unwrap().as_slice(),
            b"jpeg bytes"
        );
        assert!(matches!(
            s.open("photo:app-2", &blob),
            Err(EnvelopeError::Corrupt(_))
        ));
        let mut tampered = blob.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(s.open("photo:app-1", &tampered).is_err());
        assert!(s.open("photo:app-1", &blob[..20]).is_err());
        assert!(
            !blob.windows(10).any(|w| w == b"jpeg bytes"),
            "no plaintext in the blob"
        );
    }

    #[test]
    fn old_keys_still_open_and_unknown_keys_are_named() {
        let old_hex = Sealer::generate_key_hex();
        let old = Sealer::new("2025", &old_hex).unwrap();
        let blob = old.seal("record:a", b"x");
        let new = Sealer::new("2026", &Sealer::generate_key_hex())
            .unwrap()
            .with_previous("2025", &old_hex)
            .unwrap();
        assert_eq!(new.open("record:a", &blob).unwrap().as_slice(), b"x");
        let other = sealer("2027");
        assert!(
            matches!(other.open("record:a", &blob), Err(EnvelopeError::UnknownKey(id)) if id == "2025")
        );
        assert!(Sealer::new("bad", &"zz".to_owned().into()).is_err());
    }

    #[test]
    fn lookup_digests_survive_master_and_lookup_key_rotation() {
        let old_hex = Sealer::generate_key_hex();
        let old = Sealer::new("2025", &old_hex).unwrap();
        let stored = old.lookup_digest("national_code", "0012345679");
        assert_eq!(old.lookup_key_id(), "derived:2025");
        // A new master key: the old derived lookup key still finds the stored digest.
        let rotated = Sealer::new("2026", &Sealer::generate_key_hex())
            .unwrap()
            .with_previous("2025", &old_hex)
            .unwrap();
        assert_eq!(rotated.lookup_key_id(), "derived:2026");
        let digests = rotated.lookup_digests("national_code", "0012345679");
        assert_eq!(digests.len(), 2);
        assert_eq!(
            digests[0],
            rotated.lookup_digest("national_code", "0012345679")
        );
        assert!(digests.contains(&stored));
        // A dedicated lookup key becomes current; the derived ones still find old digests.
        let lookup_hex = Sealer::generate_key_hex();
        let dedicated = rotated.with_lookup_key("l1", &lookup_hex).unwrap();
        assert_eq!(dedicated.lookup_key_id(), "l1");
        let digests = dedicated.lookup_digests("national_code", "0012345679");
        assert_eq!(digests.len(), 3);
        assert!(digests.contains(&stored));
        assert_ne!(digests[0], stored);
        // Rotating the dedicated key: the previous one is still searched.
        let next = Sealer::new("2026", &Sealer::generate_key_hex())
            .unwrap()
            .with_lookup_key("l2", &Sealer::generate_key_hex())
            .unwrap()
            .with_previous_lookup_key("l1", &lookup_hex)
            .unwrap();
        assert!(
            next.lookup_digests("national_code", "0012345679")
                .contains(&dedicated.lookup_digest("national_code", "0012345679"))
        );
    }

    #[test]
    fn lookup_digests_are_keyed_and_stable() {
        let s = sealer("k");
        assert_eq!(
            s.lookup_digest("national_code", "0012345679"),
            s.lookup_digest("national_code", "0012345679")
        );
        assert_ne!(
            s.lookup_digest("national_code", "0012345679"),
            sealer("k").lookup_digest("national_code", "0012345679")
        );
        assert!(
            !s.lookup_digest("national_code", "0012345679")
                .contains("0012345679")
        );
    }
}
