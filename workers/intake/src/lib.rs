//! # cardpipe-intake — the registry interface
//!
//! * [`validate`]: every programme rule, one [`validate::FieldError`] per problem.
//! * [`intake`]: streamed NDJSON batch intake with idempotency keys, chunked commits.
//! * [`api`]: the registry HTTP API (axum) and its OpenAPI document.
//! * [`scheduler`]: the release scheduler (exactly once across replicas, throttled, urgent first).
//! * [`bench`](mod@bench): the 100,000-record intake benchmark.
//!
//! The registry contract itself (configuration, authentication, callbacks, the OpenAPI
//! document, synthetic batches) lives in the `cardpipe-registry` library.

pub mod api;
pub mod bench;
pub mod intake;
pub mod scheduler;
pub mod validate;
