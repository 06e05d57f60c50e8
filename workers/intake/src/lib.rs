//! # cardpipe-intake — the registry interface
//!
//! * [`validate`]: every programme rule, one [`validate::FieldError`] per problem.
//! * [`intake`]: streamed NDJSON batch intake with idempotency keys, chunked commits.
//! * [`api`]: the registry HTTP API (axum) and its OpenAPI document.
//! * [`scheduler`]: the release scheduler (exactly once across replicas, throttled, urgent first).
//! * [`callbacks`]: HMAC-signed registry webhooks through the outbox.
//! * [`synth`]: realistic valid and deliberately bad batches.
//! * [`bench`](mod@bench): the 100,000-record intake benchmark.
//! * [`config`]: the `[registry]` section.

pub mod api;
pub mod bench;
pub mod callbacks;
pub mod config;
pub mod intake;
pub mod scheduler;
pub mod synth;
pub mod validate;

pub use config::RegistryConfig;
