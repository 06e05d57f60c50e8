//! # cardpipe-registry — the contract with the civil registry
//!
//! What every component that faces the registry shares, so that intake, reprints and
//! delivery speak one protocol without depending on each other:
//!
//! * [`config`]: the `[registry]` section — client tokens (stored as SHA-256 digests),
//!   callback endpoint, limits.
//! * [`auth`]: the bearer-token middleware every registry route layers, and the ownership
//!   rule (a client sees only the applications it submitted).
//! * [`callbacks`]: the status events citizens care about, enqueued in the caller's
//!   transaction through the outbox and delivered as HMAC-signed webhooks.
//! * [`OPENAPI`]: the OpenAPI 3 document of the whole registry API.
//! * [`synth`]: realistic valid and deliberately bad registry batches for tests, demos and
//!   benchmarks.

pub mod auth;
pub mod callbacks;
pub mod config;
pub mod synth;

pub use config::RegistryConfig;

/// The OpenAPI 3 document of the registry API (intake, reprints, delivery routes).
pub const OPENAPI: &str = include_str!("openapi.json");
