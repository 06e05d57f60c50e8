//! `cardpipe-biometrics` — the fingerprint library behind deduplication, intake validation
//! and the 1:1 check at pickup. It knows templates, scores and galleries; it knows nothing
//! of applications, queues or stores (the `dedup` stage crate wires it into the pipeline).
//!
//! Tour of the crate, in the order data flows through it:
//!
//! * [`iso19794_2`] — strict parser (2005 and 2011) and writer (2005) for ISO/IEC 19794-2
//!   finger minutiae records. Every enrolment template enters through it, placed at its
//!   contract finger position by [`matcher::place_finger`] — the one rule intake validation,
//!   dedup and the pickup check all apply.
//! * [`synth`] — seeded synthetic populations: ten-print subjects with planted duplicates and
//!   portrait JPEGs, for tests, demos and benchmarks.
//! * [`matcher`] — the precise comparator, score calibration and ten-print fusion, compact
//!   candidate codes, and the in-memory [`matcher::Gallery`] with its two-stage 1:N search,
//!   sharding and 1:1 verification.
//! * [`evaluation`] — statistics on real templates: per-database score matrices, held-out
//!   split accuracy and the tuning procedure of the score normalisation, leave-one-database-out
//!   calibration and fusion checks (Clopper–Pearson intervals), synthetic vs real.
//! * [`bench`](mod@bench) — the figures printed by `cardpipe bench dedup` and the `bench_dedup`
//!   example (and recorded in `BENCH_DEDUP.md`): FVC2002 accuracy, comparator and
//!   candidate-scan throughput, synthetic 1:N build time, memory, latency, FNIR and recall.
//!
//! Privacy rule applied throughout: biometric data (minutiae, codes, templates) never appears
//! in error messages or `Debug` output; types holding it implement `Debug` by hand.

pub mod bench;
pub mod evaluation;
pub mod iso19794_2;
pub mod matcher;
pub mod synth;
