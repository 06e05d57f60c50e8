//! The crate's one error type.
//!
//! Messages name labels, file paths, tags and reasons — never key material, PINs,
//! passphrases, national codes or biometric bytes, because callers log them as they are.

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T, E = KeysError> = std::result::Result<T, E>;

/// Everything that can go wrong in the PKI engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeysError {
    /// No key under this label in the keystore.
    #[error("no key labelled `{0}` in the keystore")]
    KeyNotFound(String),
    /// `generate` refuses to replace an existing CA key: that would orphan its certificates.
    #[error("a key labelled `{0}` already exists in the keystore")]
    KeyExists(String),
    /// The AES-GCM check failed: wrong passphrase, or the file was tampered with.
    #[error("keystore passphrase is wrong or the keystore file was altered")]
    BadPassphrase,
    /// Reading or writing a keystore file.
    #[error("keystore file {path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A keystore file or token object that does not have the expected shape.
    #[error("keystore format: {0}")]
    Format(String),
    /// A PKCS#11 call failed.
    #[error("PKCS#11 {context}: {source}")]
    Pkcs11 {
        /// What we were doing.
        context: &'static str,
        /// cryptoki's error (return value and function; never the PIN).
        source: cryptoki::error::Error,
    },
    /// No initialised token with this label in any slot of the module.
    #[error("no PKCS#11 token labelled `{0}`")]
    TokenNotFound(String),
    /// An OpenSSL primitive failed.
    #[error("crypto: {0}")]
    Crypto(#[from] openssl::error::ErrorStack),
    /// DER encoding or decoding failed.
    #[error("DER: {0}")]
    Der(#[from] der::Error),
    /// A caller-supplied value is out of range (the message names the field, not its value).
    #[error("invalid input: {0}")]
    Invalid(String),
    /// A data group or EF.COM could not be decoded.
    #[error("LDS decoding: {0}")]
    Lds(String),
    /// EF.SOD did not verify.
    #[error("EF.SOD verification failed: {0}")]
    Sod(String),
    /// A chip's proof of possession of a key it generated did not verify (or answers another
    /// card's or key's challenge): nothing was certified.
    #[error("{role:?} key: {reason}")]
    Possession {
        /// The key whose proof failed.
        role: crate::citizen::CardKeyRole,
        /// What was wrong.
        reason: &'static str,
    },
    /// A certificate did not verify against its issuer.
    #[error("certificate verification failed: {0}")]
    Certificate(String),
    /// A wrapped key could not be unwrapped (wrong transport key, wrong card/key reference,
    /// or tampering — deliberately not distinguished further).
    #[error("wrapped key rejected: {0}")]
    Unwrap(&'static str),
    /// CRL numbers must strictly increase (RFC 5280 §5.2.3).
    #[error("CRL number {next} is not greater than the previous {previous}")]
    CrlNumberNotIncreasing {
        /// The last number published.
        previous: u64,
        /// The number requested.
        next: u64,
    },
}

impl KeysError {
    pub(crate) fn pkcs11(context: &'static str) -> impl FnOnce(cryptoki::error::Error) -> Self {
        move |source| KeysError::Pkcs11 { context, source }
    }
}

impl From<crate::tlv::TlvError> for KeysError {
    fn from(e: crate::tlv::TlvError) -> Self {
        KeysError::Lds(e.0)
    }
}
