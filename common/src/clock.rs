//! Time, read through a trait so every time rule (release schedules, reminders,
//! voiding, retry delays recorded in the store) can be tested by moving a clock
//! forward instead of waiting.

use std::sync::{Arc, Mutex};

use time::{Duration, OffsetDateTime};

/// The source of "now" for every time rule in cardpipe.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current instant, in UTC.
    fn now(&self) -> OffsetDateTime;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// A clock that stands still until a test moves it.
///
/// Clones share the same instant, so a test can hand one clone to the pipeline
/// and keep another to advance it.
#[derive(Debug, Clone)]
pub struct TestClock {
    now: Arc<Mutex<OffsetDateTime>>,
}

impl TestClock {
    /// A clock stopped at `start`.
    pub fn at(start: OffsetDateTime) -> Self {
        Self {
            now: Arc::new(Mutex::new(start)),
        }
    }

    /// Moves the clock forward (or backward, for a negative duration).
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }

    /// Sets the clock to an instant.
    pub fn set(&self, to: OffsetDateTime) {
        *self.now.lock().unwrap_or_else(|e| e.into_inner()) = to;
    }
}

impl Clock for TestClock {
    fn now(&self) -> OffsetDateTime {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Formats an instant the way cardpipe stores and exchanges it: RFC 3339 in UTC
/// with microseconds and a `Z`, fixed width, so text order is time order in both
/// PostgreSQL and SQLite.
pub fn to_rfc3339(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.microsecond()
    )
}

/// Parses an instant written by [`to_rfc3339`] (or any RFC 3339 text).
pub fn from_rfc3339(text: &str) -> Result<OffsetDateTime, time::error::Parse> {
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn test_clock_moves_only_when_told_and_clones_share_it() {
        let clock = TestClock::at(datetime!(2026-01-01 00:00 UTC));
        let other = clock.clone();
        assert_eq!(clock.now(), datetime!(2026-01-01 00:00 UTC));
        other.advance(Duration::days(200));
        assert_eq!(clock.now(), datetime!(2026-07-20 00:00 UTC));
    }

    #[test]
    fn stored_timestamps_are_fixed_width_and_round_trip() {
        let at = datetime!(2026-03-20 06:36:01.5 +03:30);
        let text = to_rfc3339(at);
        assert_eq!(text, "2026-03-20T03:06:01.500000Z");
        assert_eq!(from_rfc3339(&text).unwrap(), at);
    }
}
