//! The encrypted file keystore (embedded mode).
//!
//! Layout on disk (JSON, written atomically with mode 0600):
//!
//! ```text
//! { "format": "cardpipe-keystore-v1",
//!   "kdf":   { "algorithm": "scrypt", "log_n": 15, "r": 8, "p": 1, "salt": hex },
//!   "check": { "nonce": hex, "ciphertext": hex },          // proves the passphrase
//!   "keys":  [ { "label", "created_at", "public_key": hex, "nonce": hex, "ciphertext": hex } ] }
//! ```
//!
//! The 32-byte private scalar of each key is sealed with AES-256-GCM under the
//! scrypt-derived key; the AAD binds the format, the label and the public key, so an entry
//! cannot be moved to another label or paired with another public key without detection.
//! Keys are decrypted once at open and kept as OpenSSL key objects for fast signing.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use openssl::bn::BigNum;
use openssl::ec::EcKey;
use openssl::ecdsa::EcdsaSig;
use openssl::pkey::Private;
use openssl::symm::{Cipher, decrypt_aead, encrypt_aead};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{Backend, CaKeyStore, KeyInfo};
use crate::pkix::{P256, PublicKey, hex_bytes, openssl_public_point};
use crate::{KeysError, Result};

const FORMAT: &str = "cardpipe-keystore-v1";
const CHECK_PLAINTEXT: &[u8] = b"cardpipe keystore passphrase check";

/// scrypt cost parameters. The defaults (N = 2^15, r = 8, p = 1: 32 MiB, ~0.1 s) follow
/// the scrypt paper's interactive-login setting; opening the keystore is rare, so the
/// memory-hardness is cheap for us and expensive for an attacker with a stolen file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// log2 of the scrypt N parameter.
    pub log_n: u8,
    /// Block size.
    pub r: u32,
    /// Parallelism.
    pub p: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        Self {
            log_n: 15,
            r: 8,
            p: 1,
        }
    }
}

impl KdfParams {
    /// Cheap parameters (N = 2^10) so test suites stay fast. Never for real keystores.
    pub fn for_tests() -> Self {
        Self {
            log_n: 10,
            r: 8,
            p: 1,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct KdfRecord {
    algorithm: String,
    #[serde(flatten)]
    params: KdfParams,
    #[serde(with = "hex_bytes")]
    salt: Vec<u8>,
}

#[derive(Serialize, Deserialize, Clone)]
struct Sealed {
    #[serde(with = "hex_bytes")]
    nonce: Vec<u8>,
    #[serde(with = "hex_bytes")]
    ciphertext: Vec<u8>,
}

#[derive(Serialize, Deserialize, Clone)]
struct KeyEntry {
    label: String,
    #[serde(with = "time::serde::rfc3339")]
    created_at: time::OffsetDateTime,
    public_key: PublicKey,
    #[serde(flatten)]
    sealed: Sealed,
}

#[derive(Serialize, Deserialize)]
struct KeystoreFile {
    format: String,
    kdf: KdfRecord,
    check: Sealed,
    keys: Vec<KeyEntry>,
}

struct Inner {
    entries: Vec<KeyEntry>,
    keys: HashMap<String, EcKey<Private>>,
}

/// P-256 CA keys in one passphrase-encrypted file.
pub struct FileKeyStore {
    path: PathBuf,
    kdf: KdfRecord,
    check: Sealed,
    key: Zeroizing<[u8; 32]>,
    inner: RwLock<Inner>,
}

impl std::fmt::Debug for FileKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileKeyStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Holds an exclusive lock on `<keystore>.lock` (a sibling file, so the atomic rename of the
/// keystore itself never drops it) for a read-modify-write of the file: processes sharing one
/// data_dir — `serve` and `cardpipe worker`s on one machine — add keys to the same file
/// without losing each other's. Released when the returned file is dropped.
fn lock(keystore: &Path) -> Result<fs::File> {
    let path = keystore.with_extension("lock");
    let io = |source| KeysError::Io {
        path: path.clone(),
        source,
    };
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?
    };
    file.lock().map_err(io)?;
    Ok(file)
}

fn derive_key(passphrase: &SecretString, salt: &[u8], p: KdfParams) -> Result<Zeroizing<[u8; 32]>> {
    if !(10..=22).contains(&p.log_n) || p.r == 0 || p.p == 0 {
        return Err(KeysError::Format("scrypt parameters out of range".into()));
    }
    let n = 1u64 << p.log_n;
    let maxmem = 128 * u64::from(p.r) * (n + u64::from(p.p) + 2) + (1 << 20);
    let mut key = Zeroizing::new([0u8; 32]);
    openssl::pkcs5::scrypt(
        passphrase.expose_secret().as_bytes(),
        salt,
        n,
        u64::from(p.r),
        u64::from(p.p),
        maxmem,
        &mut key[..],
    )?;
    Ok(key)
}

fn seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Result<Sealed> {
    let mut nonce = [0u8; 12];
    openssl::rand::rand_bytes(&mut nonce)?;
    let mut tag = [0u8; 16];
    let mut ciphertext = encrypt_aead(
        Cipher::aes_256_gcm(),
        key,
        Some(&nonce),
        aad,
        plaintext,
        &mut tag,
    )?;
    ciphertext.extend_from_slice(&tag);
    Ok(Sealed {
        nonce: nonce.to_vec(),
        ciphertext,
    })
}

fn open_sealed(key: &[u8; 32], aad: &[u8], sealed: &Sealed) -> Result<Zeroizing<Vec<u8>>> {
    if sealed.nonce.len() != 12 || sealed.ciphertext.len() < 16 {
        return Err(KeysError::Format(
            "sealed value has a bad nonce or length".into(),
        ));
    }
    let (ct, tag) = sealed.ciphertext.split_at(sealed.ciphertext.len() - 16);
    decrypt_aead(
        Cipher::aes_256_gcm(),
        key,
        Some(&sealed.nonce),
        aad,
        ct,
        tag,
    )
    .map(Zeroizing::new)
    .map_err(|_| KeysError::BadPassphrase)
}

fn entry_aad(label: &str, public_key: &PublicKey) -> Vec<u8> {
    let mut aad = Vec::with_capacity(FORMAT.len() + label.len() + 70);
    aad.extend_from_slice(FORMAT.as_bytes());
    aad.push(0);
    aad.extend_from_slice(label.as_bytes());
    aad.push(0);
    aad.extend_from_slice(public_key.as_sec1());
    aad
}

fn key_from_scalar(scalar: &[u8], public_key: &PublicKey) -> Result<EcKey<Private>> {
    let d = BigNum::from_slice(scalar)?;
    let mut ctx = openssl::bn::BigNumContext::new()?;
    let point = openssl::ec::EcPoint::from_bytes(&P256, public_key.as_sec1(), &mut ctx)?;
    let key = EcKey::from_private_components(&P256, &d, &point)?;
    key.check_key()?;
    Ok(key)
}

impl FileKeyStore {
    /// Creates a new, empty keystore file. Fails if the file exists: an operator must never
    /// overwrite a CA keystore by accident.
    pub fn create(
        path: impl Into<PathBuf>,
        passphrase: &SecretString,
        params: KdfParams,
    ) -> Result<Self> {
        let path = path.into();
        if path.exists() {
            return Err(KeysError::Io {
                path,
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "keystore already exists",
                ),
            });
        }
        let mut salt = vec![0u8; 16];
        openssl::rand::rand_bytes(&mut salt)?;
        let key = derive_key(passphrase, &salt, params)?;
        let check = seal(&key, FORMAT.as_bytes(), CHECK_PLAINTEXT)?;
        let store = Self {
            path,
            kdf: KdfRecord {
                algorithm: "scrypt".into(),
                params,
                salt,
            },
            check,
            key,
            inner: RwLock::new(Inner {
                entries: Vec::new(),
                keys: HashMap::new(),
            }),
        };
        store.persist(&[])?;
        Ok(store)
    }

    /// Opens an existing keystore, checking the passphrase and decrypting every key.
    pub fn open(path: impl Into<PathBuf>, passphrase: &SecretString) -> Result<Self> {
        let path = path.into();
        let text = fs::read_to_string(&path).map_err(|source| KeysError::Io {
            path: path.clone(),
            source,
        })?;
        let file: KeystoreFile = serde_json::from_str(&text)
            .map_err(|e| KeysError::Format(format!("{}: {e}", path.display())))?;
        if file.format != FORMAT || file.kdf.algorithm != "scrypt" {
            return Err(KeysError::Format(format!(
                "{}: unknown keystore format",
                path.display()
            )));
        }
        let key = derive_key(passphrase, &file.kdf.salt, file.kdf.params)?;
        let check = open_sealed(&key, FORMAT.as_bytes(), &file.check)?;
        if check.as_slice() != CHECK_PLAINTEXT {
            return Err(KeysError::BadPassphrase);
        }
        let mut keys = HashMap::new();
        for entry in &file.keys {
            let scalar = open_sealed(
                &key,
                &entry_aad(&entry.label, &entry.public_key),
                &entry.sealed,
            )?;
            let ec = key_from_scalar(&scalar, &entry.public_key)?;
            keys.insert(entry.label.clone(), ec);
        }
        Ok(Self {
            path,
            kdf: file.kdf,
            check: file.check,
            key,
            inner: RwLock::new(Inner {
                entries: file.keys,
                keys,
            }),
        })
    }

    /// Opens the keystore at `path`, creating it if it does not exist yet.
    pub fn open_or_create(
        path: impl Into<PathBuf>,
        passphrase: &SecretString,
        params: KdfParams,
    ) -> Result<Self> {
        let path = path.into();
        // Under the keystore's lock: processes starting together in one data_dir must not
        // each create (and rename over one another) a keystore of their own.
        let _locked = lock(&path)?;
        if path.exists() {
            Self::open(path, passphrase)
        } else {
            Self::create(path, passphrase, params)
        }
    }

    /// The file this keystore lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock_file(&self) -> Result<fs::File> {
        lock(&self.path)
    }

    /// Re-reads the file and takes in the keys another process added since this one read it
    /// (the file only grows: keys are never removed from it).
    fn reload(&self, inner: &mut Inner) -> Result<()> {
        let text = fs::read_to_string(&self.path).map_err(|source| KeysError::Io {
            path: self.path.clone(),
            source,
        })?;
        let file: KeystoreFile = serde_json::from_str(&text)
            .map_err(|e| KeysError::Format(format!("{}: {e}", self.path.display())))?;
        if file.kdf.salt != self.kdf.salt {
            return Err(KeysError::Format(format!(
                "{}: replaced by another keystore while open",
                self.path.display()
            )));
        }
        for entry in &file.keys {
            if inner.keys.contains_key(&entry.label) {
                continue;
            }
            let scalar = open_sealed(
                &self.key,
                &entry_aad(&entry.label, &entry.public_key),
                &entry.sealed,
            )?;
            let ec = key_from_scalar(&scalar, &entry.public_key)?;
            inner.keys.insert(entry.label.clone(), ec);
            inner.entries.push(entry.clone());
        }
        Ok(())
    }

    /// Runs `f` on the in-memory keys, re-reading the file once if `f` misses a key another
    /// process may have added.
    fn with_reload<T>(&self, f: impl Fn(&Inner) -> Result<T>) -> Result<T> {
        {
            let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
            match f(&inner) {
                Err(KeysError::KeyNotFound(_)) => {}
                other => return other,
            }
        }
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        self.reload(&mut inner)?;
        f(&inner)
    }

    /// Writes the whole file to a sibling temp file, fsyncs it and renames it over the
    /// original, so a crash leaves either the old or the new keystore, never half of one.
    fn persist(&self, entries: &[KeyEntry]) -> Result<()> {
        let file = KeystoreFile {
            format: FORMAT.into(),
            kdf: KdfRecord {
                algorithm: self.kdf.algorithm.clone(),
                params: self.kdf.params,
                salt: self.kdf.salt.clone(),
            },
            check: self.check.clone(),
            keys: entries.to_vec(),
        };
        let json =
            serde_json::to_vec_pretty(&file).map_err(|e| KeysError::Format(e.to_string()))?;
        let tmp = self.path.with_extension("tmp");
        let io = |source| KeysError::Io {
            path: tmp.clone(),
            source,
        };
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            f.write_all(&json).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        fs::rename(&tmp, &self.path).map_err(|source| KeysError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

impl CaKeyStore for FileKeyStore {
    fn backend(&self) -> Backend {
        Backend::File
    }

    fn generate(&self, label: &str) -> Result<PublicKey> {
        if label.is_empty() {
            return Err(KeysError::Invalid("empty key label".into()));
        }
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let _locked = self.lock_file()?;
        self.reload(&mut inner)?;
        if inner.keys.contains_key(label) {
            return Err(KeysError::KeyExists(label.to_owned()));
        }
        let ec = EcKey::generate(&P256)?;
        let public_key = PublicKey::from_sec1_unchecked(openssl_public_point(&ec)?);
        let scalar = Zeroizing::new(ec.private_key().to_vec_padded(32)?);
        let sealed = seal(&self.key, &entry_aad(label, &public_key), &scalar)?;
        let mut entries = inner.entries.clone();
        entries.push(KeyEntry {
            label: label.to_owned(),
            created_at: time::OffsetDateTime::now_utc(),
            public_key: public_key.clone(),
            sealed,
        });
        self.persist(&entries)?;
        inner.entries = entries;
        inner.keys.insert(label.to_owned(), ec);
        Ok(public_key)
    }

    fn public_key(&self, label: &str) -> Result<PublicKey> {
        self.with_reload(|inner| {
            inner
                .entries
                .iter()
                .find(|e| e.label == label)
                .map(|e| e.public_key.clone())
                .ok_or_else(|| KeysError::KeyNotFound(label.to_owned()))
        })
    }

    fn sign_digest(&self, label: &str, digest: &[u8; 32]) -> Result<Vec<u8>> {
        self.with_reload(|inner| {
            let key = inner
                .keys
                .get(label)
                .ok_or_else(|| KeysError::KeyNotFound(label.to_owned()))?;
            Ok(EcdsaSig::sign(digest, key)?.to_der()?)
        })
    }

    fn list(&self) -> Result<Vec<KeyInfo>> {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        self.reload(&mut inner)?;
        let mut out: Vec<KeyInfo> = inner
            .entries
            .iter()
            .map(|e| KeyInfo {
                label: e.label.clone(),
                public_key: e.public_key.clone(),
                backend: Backend::File,
                extractable: true,
            })
            .collect();
        out.sort_by(|a, b| a.label.cmp(&b.label));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pkix::sha256;

    /// `serve` and the workers of one machine share a data_dir: a key one process adds is
    /// usable at once by another that opened the file earlier, and keys added by two
    /// processes at once are both kept.
    #[test]
    fn processes_sharing_the_file_see_and_keep_each_others_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ks.json");
        let pass = SecretString::from("shared passphrase");
        FileKeyStore::create(&path, &pass, KdfParams::for_tests()).unwrap();
        let a = FileKeyStore::open(&path, &pass).unwrap();
        let b = FileKeyStore::open(&path, &pass).unwrap();
        let pk = a.generate("ds-from-a").unwrap();
        let digest = sha256(b"EF.SOD");
        let sig = b.sign_digest("ds-from-a", &digest).unwrap();
        assert!(pk.verify_digest(&digest, &sig).unwrap());
        assert_eq!(b.public_key("ds-from-a").unwrap(), pk);
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..5 {
                    a.generate(&format!("a-{i}")).unwrap();
                }
            });
            s.spawn(|| {
                for i in 0..5 {
                    b.generate(&format!("b-{i}")).unwrap();
                }
            });
        });
        assert!(matches!(b.generate("a-0"), Err(KeysError::KeyExists(_))));
        let reopened = FileKeyStore::open(&path, &pass).unwrap();
        assert_eq!(reopened.list().unwrap().len(), 11, "no key lost");
    }

    #[test]
    fn keys_survive_reopen_and_sign_verifiably() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ks.json");
        let pass = SecretString::from("s3cret passphrase");
        let store = FileKeyStore::create(&path, &pass, KdfParams::for_tests()).unwrap();
        let pk = store.generate("root").unwrap();
        store.generate("ds-0001").unwrap();
        assert!(matches!(
            store.generate("root"),
            Err(KeysError::KeyExists(_))
        ));
        drop(store);

        let reopened = FileKeyStore::open(&path, &pass).unwrap();
        assert_eq!(reopened.public_key("root").unwrap(), pk);
        let labels: Vec<_> = reopened
            .list()
            .unwrap()
            .into_iter()
            .map(|k| k.label)
            .collect();
        assert_eq!(labels, ["ds-0001", "root"]);
        let digest = sha256(b"to be signed");
        let sig = reopened.sign_digest("root", &digest).unwrap();
        assert!(pk.verify_digest(&digest, &sig).unwrap());
        assert!(matches!(
            reopened.sign_digest("nope", &digest),
            Err(KeysError::KeyNotFound(_))
        ));
    }

    #[test]
    fn private_keys_are_not_in_the_file_in_clear_and_wrong_passphrase_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ks.json");
        let pass = SecretString::from("right");
        let store = FileKeyStore::create(&path, &pass, KdfParams::for_tests()).unwrap();
        store.generate("root").unwrap();
        let scalar = {
            let inner = store.inner.read().unwrap();
            inner.keys["root"].private_key().to_vec_padded(32).unwrap()
        };
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&hex::encode(&scalar)));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(matches!(
            FileKeyStore::open(&path, &SecretString::from("wrong")),
            Err(KeysError::BadPassphrase)
        ));
        assert!(FileKeyStore::create(&path, &pass, KdfParams::for_tests()).is_err());
    }

    #[test]
    fn swapping_entries_between_labels_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ks.json");
        let pass = SecretString::from("pw");
        let store = FileKeyStore::create(&path, &pass, KdfParams::for_tests()).unwrap();
        store.generate("a").unwrap();
        store.generate("b").unwrap();
        drop(store);
        let mut file: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        let keys = file["keys"].as_array_mut().unwrap();
        let a_label = keys[0]["label"].clone();
        keys[0]["label"] = keys[1]["label"].clone();
        keys[1]["label"] = a_label;
        fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
        assert!(FileKeyStore::open(&path, &pass).is_err());
    }
}
