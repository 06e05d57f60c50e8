//! # cardpipe-keys — the keys stage
//!
//! The cryptography lives in the `cardpipe-pki` library; this crate is the pipeline stage
//! that uses it and the one place PKI operations with effects on issued cards run:
//!
//! - [`stage`] — the keys [`Stage`](cardpipe_common::runtime::Stage):
//!   `dedup_clear | cleared | reprint_requested → keys_issued`.
//! - [`config`] — `[keys] generation`: key pairs born on the chip (default) or in software.
//! - [`ops`] — revocation, CRL publication, Document Signer rotation exactly once,
//!   crypto-shredding, and the background loop.
//!
//! Secrets discipline: private keys are held in `zeroize::Zeroizing` buffers, passphrases
//! and PINs in [`secrecy::SecretString`]; no `Debug` impl, log line or error message in this
//! crate carries a private key, PIN, national code or biometric.

pub mod config;
pub mod ops;
pub mod stage;
