//! # cardpipe-common
//!
//! Everything the stages of the card production pipeline share. A tour:
//!
//! * [`contract`]: how one stage asks another for work it owns (outbox topics,
//!   queue names, payloads) — stage crates never call each other.
//! * [`domain`]: applications, batches, cards, and the application state
//!   machine — one checked transition function.
//! * [`clock`]: the `Clock` every time rule reads; a test clock moves on demand.
//! * [`broker`]: the message broker trait, with RabbitMQ and in-process
//!   implementations that share one contract.
//! * [`store`]: PostgreSQL or SQLite (sqlx), migrations, the transactional
//!   outbox, leases for exactly-once scheduled work.
//! * [`objects`]: artifact storage on S3 or the local filesystem, atomic writes.
//! * [`envelope`] and [`records`]: personal data sealed at rest (envelope
//!   encryption), the applicant record and biometrics every stage loads.
//! * [`runtime`]: the stage runtime — consume, handle, commit once, relay, ack —
//!   with retries, parking, crash recovery and graceful shutdown.
//! * [`config`]: `pipeline.toml` layered with environment overrides, checked
//!   apart from building; [`backends`] builds what it names.
//! * [`solar_hijri`]: Solar Hijri dates and Persian digits for citizen-facing text
//!   (ICU4X's Persian calendar).
//! * [`cpu`]: the calling thread's CPU clock, so benchmarks report per-core rates.
//! * [`telemetry`]: logs, Prometheus metrics, `/metrics` `/healthz` `/readyz`.
//! * [`discrepancies`]: office discrepancies, raised by delivery and resolved by
//!   supervisors in the console.
//! * [`dead_letters`]: outbox rows the relay gave up on, re-queued or discarded by a
//!   supervisor.
//! * [`audit`]: the append-only, hash-chained log of operator and registry actions.
//!
//! A stage never learns which backend it runs on: it gets [`runtime::Services`].

pub mod audit;
pub mod backends;
pub mod broker;
pub mod clock;
pub mod config;
pub mod contract;
pub mod cpu;
pub mod dead_letters;
pub mod discrepancies;
pub mod domain;
pub mod envelope;
pub mod objects;
pub mod records;
pub mod runtime;
pub mod solar_hijri;
pub mod store;
pub mod telemetry;
pub mod testing;
