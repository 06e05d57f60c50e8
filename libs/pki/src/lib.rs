//! # cardpipe-pki — the PKI library
//!
//! Everything cryptographic that happens between "dedup cleared" and "card personalized"
//! lives here, as a library with no stage logic. The keys stage, `cardpipe pki ...` and QC's
//! read-back verification are callers of these modules; revocation and CRL publication are
//! the keys stage's work, which other stages request through its topic.
//!
//! A tour, in the order the pipeline uses it:
//!
//! - [`keystore`] — where CA private keys live. [`keystore::CaKeyStore`] is the one
//!   interface every signature goes through, with two implementations: an encrypted file
//!   keystore for embedded mode ([`keystore::FileKeyStore`], scrypt + AES-256-GCM) and a
//!   PKCS#11 token ([`keystore::Pkcs11KeyStore`], SoftHSM2 in tests) in which CA keys are
//!   generated inside the token and never leave it.
//! - [`ca`] — `pki init`: root CA, issuing CA (citizen certificates) and Document Signer
//!   (EF.SOD), plus the `pki status` report.
//! - [`citizen`] — per card an authentication and a signature key pair (P-256, generated in
//!   software) and their X.509 certificates from configurable profiles.
//! - [`lds`] — EF.COM, DG1, DG2, DG3 and DG11 encoders and decoders (BER-TLV, ICAO Doc
//!   9303-like; the tag layout is documented in that module).
//! - [`sod`] — EF.SOD: CMS SignedData over the data-group hashes, signed by the Document
//!   Signer through the keystore, and the verifier QC uses.
//! - [`custody`] — citizen private keys wrapped under an encoder site's transport key, and
//!   [`custody::CardCredentials`], the personalization package.
//! - [`issue`] — [`issue::CardIssuer`] ties the above into one call per card: what the keys
//!   stage handler calls.
//! - [`rotation`] — when to roll the Document Signer, and the roll itself.
//! - [`crl`] — revocation reasons and CRL generation.
//! - [`checkpoint`] — signed checkpoints of the audit chain (key in the keystore / HSM).
//! - [`bench`] — the `cardpipe bench pki` measurement.
//!
//! Where it meets the database:
//!
//! - [`settings`] — the `[pki]` configuration section and [`settings::Pki`]: keystore,
//!   transport key, the current hierarchy (stored in `ca_hierarchy`, auto-initialised in
//!   embedded mode).
//! - [`store`] — the tables of migrations `0004_pki.sql`.
//!
//! Secrets discipline: private keys are held in [`zeroize::Zeroizing`] buffers, passphrases
//! and PINs in [`secrecy::SecretString`]; no `Debug` impl, log line or error message in this
//! crate carries a private key, PIN, national code or biometric.

pub mod bench;
pub mod ca;
pub mod checkpoint;
pub mod citizen;
pub mod crl;
pub mod custody;
mod error;
pub mod issue;
pub mod keystore;
pub mod lds;
pub mod pkix;
pub mod rotation;
pub mod settings;
pub mod sod;
pub mod store;
pub mod tlv;

pub use error::{KeysError, Result};
