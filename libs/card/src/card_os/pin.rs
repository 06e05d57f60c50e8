//! PIN objects with retry counters (ID PIN 81, signature PIN 82, PUK 83) and the fingerprint
//! reference's try counter.
//!
//! Values are compared in constant time and zeroized on drop; `Debug` shows only the counter.

use std::fmt;

use zeroize::Zeroizing;

/// Shortest and longest PIN value accepted (bytes, normally ASCII digits).
pub const PIN_LEN: std::ops::RangeInclusive<usize> = 4..=12;

/// Outcome of presenting a value to a PIN object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Correct: the counter is reset.
    Ok,
    /// Wrong: this many tries remain (0 means it is now blocked).
    Wrong(u8),
    /// Already blocked before this attempt.
    Blocked,
    /// No value was ever set (blank card).
    NotSet,
}

/// A PIN (or PUK) object.
pub struct Pin {
    value: Option<Zeroizing<Vec<u8>>>,
    max_tries: u8,
    tries_left: u8,
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Pin(set: {}, tries {}/{})",
            self.value.is_some(),
            self.tries_left,
            self.max_tries
        )
    }
}

impl Pin {
    /// An unset PIN with the given retry limit.
    pub fn new(max_tries: u8) -> Self {
        Self {
            value: None,
            max_tries,
            tries_left: max_tries,
        }
    }

    /// Tries remaining.
    pub fn tries_left(&self) -> u8 {
        self.tries_left
    }

    /// Whether a value has been set.
    pub fn is_set(&self) -> bool {
        self.value.is_some()
    }

    /// Length of the stored value (used to split `old ‖ new` in CHANGE REFERENCE DATA).
    pub fn value_len(&self) -> Option<usize> {
        self.value.as_ref().map(|v| v.len())
    }

    /// Sets a new value and resets the counter.
    pub fn set(&mut self, value: &[u8]) {
        self.value = Some(Zeroizing::new(value.to_vec()));
        self.tries_left = self.max_tries;
    }

    /// Resets the counter without changing the value (RESET RETRY COUNTER with PUK only).
    pub fn unblock(&mut self) {
        self.tries_left = self.max_tries;
    }

    /// Presents a candidate value, updating the counter.
    pub fn check(&mut self, candidate: &[u8]) -> Check {
        let Some(value) = &self.value else {
            return Check::NotSet;
        };
        if self.tries_left == 0 {
            return Check::Blocked;
        }
        let equal = bool::from(subtle::ConstantTimeEq::ct_eq(&value[..], candidate));
        if equal {
            self.tries_left = self.max_tries;
            Check::Ok
        } else {
            self.tries_left -= 1;
            Check::Wrong(self.tries_left)
        }
    }

    /// Counts a failed attempt that carried no value to compare (biometric mismatch).
    pub fn fail(&mut self) -> Check {
        if self.tries_left == 0 {
            return Check::Blocked;
        }
        self.tries_left -= 1;
        Check::Wrong(self.tries_left)
    }
}
