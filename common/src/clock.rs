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

/// The wall clock moved ahead by an offset that only grows: the demo's accelerated calendar.
///
/// `cardpipe run --demo` plays a card's whole life (dispatch, office receipt, reminders,
/// six-month voiding) in seconds by moving this clock forward a day at a time while real
/// time keeps flowing underneath, so retries and leases still work. The offset is kept in
/// `<data_dir>/demo-clock`: every later process on that data dir reads it
/// ([`for_data_dir`]), so stored times never lie in the clock's future after a restart.
#[derive(Debug, Clone)]
pub struct ShiftedClock {
    offset: Arc<Mutex<Duration>>,
    file: Option<std::path::PathBuf>,
}

/// The file, in a data dir, that holds the demo clock's offset (whole seconds).
pub const SHIFT_FILE: &str = "demo-clock";

impl ShiftedClock {
    /// A clock `offset` ahead of the wall clock, not persisted.
    pub fn ahead_by(offset: Duration) -> Self {
        Self {
            offset: Arc::new(Mutex::new(offset)),
            file: None,
        }
    }

    /// The clock of `data_dir`: its saved offset, or none yet. Advances are saved there.
    pub fn in_data_dir(data_dir: &std::path::Path) -> std::io::Result<Self> {
        let file = data_dir.join(SHIFT_FILE);
        let offset = read_shift(&file)?.unwrap_or(Duration::ZERO);
        Ok(Self {
            offset: Arc::new(Mutex::new(offset)),
            file: Some(file),
        })
    }

    /// How far ahead of the wall clock this clock is.
    pub fn offset(&self) -> Duration {
        *self.offset.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the clock forward by `by` (a negative or zero `by` changes nothing: time never
    /// runs backwards for the pipeline) and saves the new offset.
    pub fn advance(&self, by: Duration) -> std::io::Result<()> {
        if by <= Duration::ZERO {
            return Ok(());
        }
        let offset = {
            let mut offset = self.offset.lock().unwrap_or_else(|e| e.into_inner());
            *offset += by;
            *offset
        };
        if let Some(file) = &self.file {
            let tmp = file.with_extension("tmp");
            std::fs::write(
                &tmp,
                format!(
                    "# cardpipe run --demo: this data dir's clock runs {:.1} days ahead of the wall clock (seconds below)\n{}\n",
                    offset.as_seconds_f64() / 86_400.0,
                    offset.whole_seconds()
                ),
            )?;
            std::fs::rename(&tmp, file)?;
        }
        Ok(())
    }

    /// Moves the clock forward to `at` if it is behind it.
    pub fn advance_to(&self, at: OffsetDateTime) -> std::io::Result<()> {
        self.advance(at - self.now())
    }
}

impl Clock for ShiftedClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc() + self.offset()
    }
}

fn read_shift(file: &std::path::Path) -> std::io::Result<Option<Duration>> {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let seconds = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .and_then(|l| l.parse::<i64>().ok())
        .filter(|s| *s >= 0)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{}: expected a whole number of seconds (the demo clock's offset)",
                    file.display()
                ),
            )
        })?;
    Ok(Some(Duration::seconds(seconds)))
}

/// The clock every process on `data_dir` reads: the wall clock, or the demo's shifted clock
/// when a demo moved this data dir's calendar ahead (see [`ShiftedClock`]).
pub fn for_data_dir(data_dir: &std::path::Path) -> std::io::Result<Arc<dyn Clock>> {
    Ok(match read_shift(&data_dir.join(SHIFT_FILE))? {
        Some(_) => Arc::new(ShiftedClock::in_data_dir(data_dir)?),
        None => Arc::new(SystemClock),
    })
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

    #[test]
    fn shifted_clock_only_moves_forward_and_is_read_back_from_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            for_data_dir(dir.path()).unwrap().now().year(),
            OffsetDateTime::now_utc().year()
        );
        let clock = ShiftedClock::in_data_dir(dir.path()).unwrap();
        clock.advance(Duration::days(10)).unwrap();
        clock.advance(Duration::days(-3)).unwrap();
        assert_eq!(clock.offset(), Duration::days(10));
        let again = for_data_dir(dir.path()).unwrap();
        let ahead = again.now() - OffsetDateTime::now_utc();
        assert!(ahead > Duration::days(10) - Duration::minutes(1), "{ahead}");
        std::fs::write(dir.path().join(SHIFT_FILE), "ten days\n").unwrap();
        let err = for_data_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("demo-clock") && err.contains("seconds"),
            "{err}"
        );
    }
}
