//! Applications, their history, batches and cards as the store keeps them.
//!
//! Only what every stage needs lives here; the personal record (names,
//! national code, biometrics) is owned by intake and read by the stages that
//! need it, never carried in messages.

use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::state::ApplicationState;

/// cardpipe's own id for an application (a UUIDv7, so ids sort by creation).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ApplicationId(pub String);

impl ApplicationId {
    /// A fresh, time-ordered id.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ApplicationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for ApplicationId {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// Urgent work goes first everywhere a queue can be ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Ordinary nightly work.
    #[default]
    Normal,
    /// Urgent batches and reprints.
    Urgent,
}

impl Priority {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Normal => "normal",
            Priority::Urgent => "urgent",
        }
    }

    /// Parses a stored name; anything unknown is normal priority.
    pub fn parse(s: &str) -> Self {
        if s == "urgent" {
            Priority::Urgent
        } else {
            Priority::Normal
        }
    }
}

/// The pipeline's view of one application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Application {
    /// cardpipe's id.
    pub id: ApplicationId,
    /// The registry's id for the application (unique per registry).
    pub registry_id: String,
    /// The batch it arrived in, if any.
    pub batch_id: Option<String>,
    /// Where it is now.
    pub state: ApplicationState,
    /// Urgent work first.
    pub priority: Priority,
    /// Bumped on every transition; lets readers detect concurrent change.
    pub version: i64,
    /// When the pipeline first stored it.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it last changed state.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// One row of an application's history: every state change leaves one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The application.
    pub application_id: ApplicationId,
    /// The state it left (`None` when it was created).
    pub from_state: Option<ApplicationState>,
    /// The state it entered.
    pub to_state: ApplicationState,
    /// The stage (or API / console action) that made the change.
    pub stage: String,
    /// The delivery attempt of the job that made the change (0 for actions).
    pub attempt: u32,
    /// Who: `stage:<name>`, `registry:<client>` or `operator:<login>`.
    pub actor: String,
    /// Why, when a person or a rule gave a reason (never personal data).
    pub reason: Option<String>,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
