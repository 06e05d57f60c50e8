//! Named points where a test can make the runner crash.
//!
//! A "crash" stops the runner at once, as if the process died there: the
//! delivery is neither acknowledged nor settled, the consumer goes away and the
//! broker redelivers, exactly as after a real process kill. Production code
//! never arms a point; an unarmed check is a map lookup on an empty map.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The steps of a job between which a crash can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailPoint {
    /// The delivery arrived; nothing read yet.
    Received,
    /// The application was loaded; the handler has not run.
    Loaded,
    /// The handler ran (its side effects exist); nothing committed.
    Handled,
    /// The transaction committed; the delivery is not acknowledged.
    Committed,
    /// The relay published an outbox row; it is not marked published.
    RelayPublished,
}

/// Armed fail points: each fires a set number of times.
#[derive(Debug, Clone, Default)]
pub struct FailPoints {
    armed: Arc<Mutex<HashMap<FailPoint, u32>>>,
}

impl FailPoints {
    /// No armed points.
    pub fn none() -> Self {
        Self::default()
    }

    /// Arms `point` to fire `times` times.
    pub fn arm(&self, point: FailPoint, times: u32) {
        self.armed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(point, times);
    }

    /// True when `point` fires now (and counts it down).
    pub fn fires(&self, point: FailPoint) -> bool {
        let mut armed = self.armed.lock().unwrap_or_else(|e| e.into_inner());
        match armed.get_mut(&point) {
            Some(left) if *left > 0 => {
                *left -= 1;
                true
            }
            _ => false,
        }
    }
}

/// The runner stopped at an armed fail point.
#[derive(Debug, thiserror::Error)]
#[error("simulated crash at {0:?}")]
pub struct Crashed(pub FailPoint);
