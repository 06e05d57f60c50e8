//! The matcher: precise one-finger comparison, calibration and fusion, candidate codes and
//! the gallery with its two-stage 1:N search.
//!
//! Tour:
//! * [`template`] — [`Finger`] (compact, storable minutiae at 500 dpi) and [`FingerTemplate`]
//!   (expanded: one bit-packed MCC-style cylinder per minutia).
//! * [`compare`](mod@compare) — the precise comparator: cylinder similarities, then a rigid
//!   transform consensus over the best local pairs; [`compare()`] returns a score in [0, 1].
//! * [`calibration`] — maps scores to false match rates ([`Calibration`]) and fuses the ten
//!   fingers ([`fuse`]).
//! * [`code`] — 768-bit per-finger LSH codes of the cylinders for the candidate stage
//!   ([`FingerCode`]).
//! * [`gallery`] — [`Gallery`] (insert / delete / identify / verify; enrolment work can be
//!   done beforehand, off the gallery, with [`PreparedSubject`]), [`Shard`] and
//!   [`merge_candidates`] for scatter-gather across dedup workers.
//!
//! A typical flow: build a [`TenPrint`] from enrolment templates ([`TenPrint::from_placed`],
//! each record placed at its contract position by [`place_finger`], the one rule intake
//! validation applies too), wrap the probe in a [`Probe`] (codes
//! and cylinders are computed once), call [`Gallery::identify`] and read each
//! [`Candidate`]'s fused score and per-finger scores.

pub mod calibration;
pub mod code;
pub mod compare;
pub mod gallery;
pub mod template;

pub use calibration::{Calibration, FusedScore, fuse, min_score_for};
pub use code::{CODE_BITS, FingerCode};
pub use compare::{MatchDetail, NORMALISATION, Normalisation, compare, compare_detail};
pub use gallery::{
    COHORT, Candidate, CodeNorm, Gallery, IdentifyOptions, PlacedFinger, PlacementError,
    PositionedTemplate, PreparedSubject, Probe, Shard, ShardError, TenPrint, TenPrintError,
    Verification, ViewChoice, merge_candidates, place_finger, reference_hash, verify,
};
pub use template::{CanonMinutia, Finger, FingerTemplate};
