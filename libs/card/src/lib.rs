//! `cardpipe-card` — the card, the channel to it, the encoders and the script. A library:
//! the `personalize` stage and QC's line station use it; it knows nothing of applications.
//!
//! A tour, bottom-up:
//! - [`apdu`]: ISO/IEC 7816-4 command/response APDUs (short and extended) and status words.
//! - [`cplc`]: the chip serial and the GlobalPlatform CPLC that carries it.
//! - [`scp03`]: GlobalPlatform SCP03, both sides: AES-CMAC, the SP 800-108 KDF, per-card key
//!   diversification from master keys, handshake, C-MAC / C-DEC / R-MAC wrapping.
//! - [`card_os`]: the project's own card operating system implementing the cardpipe eID
//!   profile (LDS + eID applications, PINs, keys, match-on-card, lifecycle lock) with fault
//!   knobs (dead chip, write failures, tearing, slow EEPROM).
//! - [`reader`]: [`reader::CardChannel`] / [`reader::Encoder`] with an in-process
//!   implementation (embedded mode) and a PC/SC one (pcsc-lite → pcscd), typed errors.
//! - [`pcsc`]: the PC/SC client binding, pcsc-lite loaded at run time (so building needs no
//!   PC/SC development package); the crate's only `unsafe` code.
//! - [`vpcd`]: the card side of vsmartcard's vpcd protocol, so the card OS sits behind a
//!   real pcscd; [`simulate`]: pcscd + N virtual readers (`cardpipe encoders simulate`).
//! - [`script`]: [`script::CardImage`] → [`script::personalize`] over any channel, and the
//!   plain read-back / INTERNAL AUTHENTICATE check QC uses.
//! - [`mod@bench`]: encoder-farm throughput against the physical limit N × 3600 / t.
//! - [`farm`]: the encoder farm (async pool over blocking encoders, hot plug, health,
//!   yield, metrics).
//! - [`pcsc_harness`]: runs a test against its own private pcscd (integration tests only).
//! - [`config`]: the `[encoders]` section and the farm it builds; [`cards`]: the `cards`
//!   table accounting for every blank.
//! - [`tray`]: the output tray personalized cards wait in for QC, and the blank-card source
//!   (stock) the feed takes blanks from.
//!
//! Secrets (private keys, PINs, fingerprint references, SCP03 keys) are zeroized on drop and
//! never appear in `Debug` output or error messages.

pub mod apdu;
pub mod bench;
pub mod card_os;
pub mod cards;
pub mod config;
pub mod cplc;
pub mod farm;
pub mod line;
pub mod pcsc;
pub mod pcsc_harness;
pub mod reader;
pub mod scp03;
pub mod script;
pub mod simulate;
pub mod tray;
pub mod vpcd;
