//! The domain model: what an application, a batch and a card are, and the one
//! checked function that moves an application from state to state.

pub mod applicant;
pub mod application;
pub mod batch;
pub mod fees;
pub mod state;

pub use application::{Application, ApplicationId, HistoryEntry, Priority};
pub use batch::{BatchState, CardState};
pub use state::{ApplicationState, IllegalTransition};
