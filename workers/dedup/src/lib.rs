//! `cardpipe-dedup` — the biometric engine of the deduplication stage.
//!
//! Tour of the crate, in the order data flows through it:
//!
//! * [`iso19794_2`] — strict parser (2005 and 2011) and writer (2005) for ISO/IEC 19794-2
//!   finger minutiae records. Every enrolment template enters the engine through it, placed
//!   at its contract finger position by [`matcher::place_finger`] — the one rule intake
//!   validation applies too.
//! * [`synth`] — seeded synthetic populations: ten-print subjects with planted duplicates and
//!   portrait JPEGs, for tests, demos and benchmarks.
//! * [`matcher`] — the precise comparator, score calibration and ten-print fusion, compact
//!   candidate codes, and the in-memory [`matcher::Gallery`] with its two-stage 1:N search,
//!   sharding and 1:1 verification.
//! * [`abis`] — the [`abis::Abis`] trait, shaped like the MOSIP ABIS API, and
//!   [`abis::BuiltinAbis`] over the gallery. An external ABIS can replace it.
//! * [`stage`], [`scatter`], [`distributed`] — the `dedup` pipeline stage, shard
//!   ownership with the scatter-gather merge, and its broker form (`dedup-shard-<k>` stages
//!   and the gallery lock serialising enrolment across processes).
//! * [`evaluation`] — statistics on real templates: per-database score matrices, held-out
//!   split accuracy and the tuning procedure of the score normalisation, leave-one-database-out
//!   calibration and fusion checks (Clopper–Pearson intervals), synthetic vs real.
//! * [`bench`](mod@bench) — the figures printed by `cardpipe bench dedup` and the `bench_dedup`
//!   example (and recorded in
//!   `BENCH_DEDUP.md`): FVC2002 accuracy, comparator and candidate-scan throughput, synthetic
//!   1:N build time, memory, latency, FNIR and recall.
//!
//! Privacy rule applied throughout: biometric data (minutiae, codes, templates) never appears
//! in error messages or `Debug` output; types holding it implement `Debug` by hand.

pub mod abis;
pub mod adjudication;
pub mod bench;
pub mod distributed;
pub mod evaluation;
pub mod iso19794_2;
pub mod matcher;
pub mod scatter;
pub mod stage;
pub mod synth;
