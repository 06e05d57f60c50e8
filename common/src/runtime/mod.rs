//! The stage runtime: how one job flows through a stage.
//!
//! ```text
//! consume ──> load application ──> handler (idempotent) ──> ONE transaction:
//!   compare-and-set state + history + artifact keys + outbox rows ──> ack
//!                                  relay (relay.rs): outbox rows ──> broker, with confirms
//! ```
//!
//! * A stage implements [`Stage`]: which states it takes applications from, and
//!   what it decides for one application ([`Completion`]). It never sees the
//!   broker or which backends are configured.
//! * The runner ([`runner::StageRunner`]) applies the decision with a
//!   compare-and-set on the state the handler saw, so a redelivered or
//!   duplicated job finds nothing to do: a crash at any point loses nothing
//!   (unacked work is redelivered; committed work is announced by the relay)
//!   and repeats nothing visible (the second commit is refused).
//! * Failures retry with growing delay through the broker's wait queues, then
//!   park for an operator ([`parked`]).
//! * [`failpoints`] lets tests crash the runner between any two steps.

pub mod failpoints;
pub mod parked;
pub mod pipeline;
pub mod recover;
pub mod relay;
pub mod runner;

use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;

use crate::broker::{Broker, Job};
use crate::clock::Clock;
use crate::domain::{Application, ApplicationState};
use crate::objects::ObjectStore;
use crate::store::{Store, StoreError, StoreTx};
use crate::telemetry::metrics::Metrics;

pub use failpoints::{FailPoint, FailPoints};
pub use runner::{StageRunner, StageSettings};

/// Everything a stage may use, whatever the backends are.
#[derive(Clone)]
pub struct Services {
    /// The database.
    pub store: Store,
    /// The broker (stages do not publish directly: they write outbox rows).
    pub broker: Arc<dyn Broker>,
    /// Artifact storage.
    pub objects: Arc<dyn ObjectStore>,
    /// The clock every time rule reads.
    pub clock: Arc<dyn Clock>,
    /// Metrics registry.
    pub metrics: Metrics,
    /// Seals and opens personal data at rest.
    pub sealer: Arc<crate::envelope::Sealer>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services")
            .field("store", &self.store.dialect())
            .field("broker", &self.broker.kind())
            .field("objects", &self.objects.kind())
            .finish()
    }
}

/// Extra writes a stage makes in the completion transaction.
pub type ExtraWrites =
    Box<dyn for<'t> FnOnce(&'t mut StoreTx) -> BoxFuture<'t, Result<(), StoreError>> + Send>;

/// What a stage decided for one application; applied atomically by the runner.
pub struct Completion {
    /// The new state (checked by the state machine against the state the
    /// handler saw).
    pub to: ApplicationState,
    /// Stage to hand the application to next, if any.
    pub next_stage: Option<String>,
    /// Artifacts written to the object store: (kind, object key).
    pub artifacts: Vec<(String, String)>,
    /// Outbox rows besides the next job: (topic, payload). The subject is the
    /// application id.
    pub outbox: Vec<(String, String)>,
    /// Why (shown in history), when there is something to say.
    pub reason: Option<String>,
    /// Stage-specific rows written in the same transaction.
    pub extra: Option<ExtraWrites>,
    /// Commit the side effects (artifacts, outbox, next job, extra writes) while the
    /// application stays in the state the handler saw (see [`Completion::stay`]).
    pub stays: bool,
    /// Kept alive until the commit has settled, then dropped: a stage's guard against a
    /// second delivery of the same application (see [`Completion::holding`]).
    pub hold: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completion")
            .field("to", &self.to)
            .field("next_stage", &self.next_stage)
            .field("artifacts", &self.artifacts)
            .field("reason", &self.reason)
            .field("stays", &self.stays)
            .finish()
    }
}

impl Completion {
    /// Move to `to`.
    pub fn to(to: ApplicationState) -> Self {
        Self {
            to,
            next_stage: None,
            artifacts: Vec::new(),
            outbox: Vec::new(),
            reason: None,
            extra: None,
            stays: false,
            hold: None,
        }
    }

    /// Stay in the current state, committing only the side effects (extra writes,
    /// artifacts, outbox rows, a next job) in one transaction. The runner still
    /// compares-and-sets: if the application left the state the handler saw, nothing is
    /// committed (a duplicate delivery). No history row is written. Used by helper stages
    /// that contribute to an application without moving it (e.g. dedup shard answers).
    pub fn stay() -> Self {
        Self {
            stays: true,
            // Never applied: `stays` skips the transition.
            ..Self::to(ApplicationState::Received)
        }
    }

    /// ... and hand over to `stage`.
    pub fn then(mut self, stage: impl Into<String>) -> Self {
        self.next_stage = Some(stage.into());
        self
    }

    /// ... recording an artifact.
    pub fn artifact(mut self, kind: impl Into<String>, key: impl Into<String>) -> Self {
        self.artifacts.push((kind.into(), key.into()));
        self
    }

    /// ... with an outbox row of `topic`.
    pub fn announce(mut self, topic: impl Into<String>, payload: impl Into<String>) -> Self {
        self.outbox.push((topic.into(), payload.into()));
        self
    }

    /// ... giving a reason.
    pub fn because(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// ... keeping `guard` alive until the commit has settled (committed, refused or
    /// failed). A stage that keeps its own in-process "being handled" mark drops it only
    /// once the state change is visible, so a duplicate delivery never sees the
    /// application half-way between its work and its commit.
    pub fn holding(mut self, guard: impl std::any::Any + Send + Sync) -> Self {
        self.hold = Some(Box::new(guard));
        self
    }

    /// ... and writing stage rows in the same transaction.
    pub fn with_writes(mut self, extra: ExtraWrites) -> Self {
        self.extra = Some(extra);
        self
    }
}

/// A failure that retrying cannot fix (bad data, a rule): the job is parked
/// for an operator at once. Any other error is retried with backoff.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Permanent(pub String);

/// The job being handled, with the services.
#[derive(Debug)]
pub struct JobContext {
    /// The job (subject, attempt).
    pub job: Job,
    /// Shared services.
    pub services: Services,
}

/// One pipeline stage.
#[async_trait]
pub trait Stage: Send + Sync + 'static {
    /// The stage's name: its queue, its metrics label, `cardpipe worker <name>`.
    fn name(&self) -> &'static str;

    /// The states this stage takes applications from. A job whose application
    /// is in any other state is a duplicate or late delivery: acknowledged,
    /// nothing done.
    fn accepts(&self) -> &'static [ApplicationState];

    /// Does the stage's work for one application and says what to commit.
    ///
    /// Must be idempotent: it may run again for the same application after a
    /// crash, and its side effects must be invisible until the runner commits
    /// the [`Completion`] (write artifacts under fresh keys; record them in the
    /// completion).
    async fn handle(&self, ctx: &JobContext, app: &Application) -> anyhow::Result<Completion>;
}
