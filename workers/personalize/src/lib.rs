//! `cardpipe-personalize` — the personalize stage: `keys_issued → personalized`.
//!
//! The card itself (APDUs, SCP03, the card OS, PC/SC and in-process encoders, the farm and
//! the personalization script) lives in the `cardpipe-card` library. This crate is the
//! pipeline stage on top: [`stage`] takes an application's card package, writes it to a
//! blank on an encoder of the farm and accounts for every blank in the `cards` table;
//! [`certify`] is the CA's side of keys generated on the chip (proofs of possession checked,
//! certificates issued and recorded while the card is in the encoder).
//!
//! Secrets (private keys, PINs, fingerprint references) are zeroized on drop and never
//! appear in `Debug` output or error messages.

pub mod certify;
pub mod stage;
