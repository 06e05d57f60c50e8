//! `cardpipe-dedup` — the deduplication stage: one person, one card.
//!
//! The fingerprint work itself (ISO/IEC 19794-2 records, the matcher, the gallery) lives in
//! the `cardpipe-biometrics` library; this crate puts it in the pipeline.
//!
//! Tour of the crate:
//!
//! * [`stage`] — the `dedup` pipeline stage: enrolled templates stored per application,
//!   1:N search against everyone enrolled, the decision (`deduplicated` or
//!   `possible_duplicate`) and the gallery it keeps in memory.
//! * [`abis`] — the [`abis::Abis`] trait, shaped like the MOSIP ABIS API, and
//!   [`abis::BuiltinAbis`] over a gallery of its own.
//! * [`mosip`] — the MOSIP ABIS API on the wire (`cardpipe abis serve`): JSON messages over
//!   a RabbitMQ queue pair and HTTP, biometrics fetched by `referenceURL` (CBEFF XML),
//!   answers persisted.
//! * [`scatter`], [`distributed`] — shard ownership with the scatter-gather merge, and its
//!   broker form (`dedup-shard-<k>` stages and the gallery lock serialising enrolment across
//!   processes).
//! * [`batcher`] — the probes of a process's concurrent dedup jobs searched together, in one
//!   pass over the gallery.
//! * [`adjudication`] — an adjudicator's decision on a possible duplicate, applied by this
//!   stage.
//!
//! Privacy rule applied throughout: biometric data (minutiae, codes, templates) never appears
//! in error messages or `Debug` output; types holding it implement `Debug` by hand.

pub mod abis;
pub mod adjudication;
pub mod batcher;
pub mod distributed;
pub mod mosip;
pub mod scatter;
pub mod stage;
