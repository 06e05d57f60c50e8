//! # cardpipe-qc — quality control, blank-card stock and reprints
//!
//! A tour:
//! - [`check`]: the inspection of one personalized card over plain APDUs — chip serial, files,
//!   lock, transport PINs, DG3 behind the ID PIN, every data-group hash against EF.SOD, the SOD
//!   signature and Document Signer chain, both citizen certificate chains, and fresh-challenge
//!   signatures with both chip keys — with a reason code per failure.
//! - [`stage`]: the `qc` pipeline stage (`personalized → qc_passed | qc_failed`), the QC report
//!   artifact, the outbox sinks that destroy wrapped private keys and park an application after
//!   `[qc] max_attempts` refused cards.
//! - [`station`]: where a card is read — the in-process farm's output tray, or a QC station
//!   reader of the machine's line (pcscd + line controller), so QC can run in its own process.
//! - [`stock`]: blank-card lots, the serial whitelist, moves between vault, encoders,
//!   consumption, spoilage, two-operator destruction and returns, and the reconciliation report
//!   behind `cardpipe_stock_imbalance_cards`.
//! - [`reprint`]: reprint requests (operator or registry) — revocation, recall, new card.
//! - [`api`]: `/api/v1/reprints` (registry bearer token); operators use the CLI and console.
//! - [`mod@bench`]: `cardpipe bench qc` — cards/s checked and share rejected by reason.

pub mod api;
pub mod bench;
pub mod check;
pub mod reprint;
pub mod stage;
pub mod station;
pub mod stock;
