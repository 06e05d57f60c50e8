//! The application state machine of DESIGN.md.
//!
//! Every state change in cardpipe goes through [`ApplicationState::transition`]:
//! an illegal move is an error, never a silent overwrite. The store applies the
//! result with a compare-and-set on the previous state, so two workers racing on
//! one application cannot both win.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where an application is in the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum ApplicationState {
    /// Accepted by intake, waiting for its batch to be released.
    Received,
    /// Refused (by intake, or after a confirmed duplicate); final.
    Rejected,
    /// Released to biometric deduplication.
    DedupPending,
    /// No duplicate found.
    DedupClear,
    /// The 1:N search found a candidate; an operator must adjudicate.
    PossibleDuplicate,
    /// An operator confirmed the duplicate; final.
    ConfirmedDuplicate,
    /// An operator cleared the candidate; the application continues.
    Cleared,
    /// Card keys, certificates and signed chip data exist.
    KeysIssued,
    /// A chip was personalized for the application.
    Personalized,
    /// The personalized card passed quality control.
    QcPassed,
    /// The card failed quality control; a fresh blank will be personalized.
    QcFailed,
    /// A reprint was requested; new keys and a new card will be made.
    ReprintRequested,
    /// Packed in a box for its pickup office.
    Packed,
    /// The box left the centre.
    Shipped,
    /// The pickup office acknowledged the box.
    AtOffice,
    /// On its way to another pickup office (a transfer the citizen asked for), until that
    /// office acknowledges it; not available for pickup meanwhile.
    InTransit,
    /// Handed over to the holder.
    Collected,
    /// Not collected in time; certificates revoked; final.
    Voided,
    /// Withdrawn by the registry; final.
    Cancelled,
}

use ApplicationState::*;

/// Every state, in pipeline order (for reports and metrics).
pub const ALL_STATES: [ApplicationState; 19] = [
    Received,
    Rejected,
    DedupPending,
    DedupClear,
    PossibleDuplicate,
    ConfirmedDuplicate,
    Cleared,
    KeysIssued,
    Personalized,
    QcPassed,
    QcFailed,
    ReprintRequested,
    Packed,
    Shipped,
    AtOffice,
    InTransit,
    Collected,
    Voided,
    Cancelled,
];

/// A move the state machine does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal application state transition {from} -> {to}")]
pub struct IllegalTransition {
    /// The state the application was in.
    pub from: ApplicationState,
    /// The state that was asked for.
    pub to: ApplicationState,
}

impl ApplicationState {
    /// The stored and exchanged name (`dedup_pending`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Received => "received",
            Rejected => "rejected",
            DedupPending => "dedup_pending",
            DedupClear => "dedup_clear",
            PossibleDuplicate => "possible_duplicate",
            ConfirmedDuplicate => "confirmed_duplicate",
            Cleared => "cleared",
            KeysIssued => "keys_issued",
            Personalized => "personalized",
            QcPassed => "qc_passed",
            QcFailed => "qc_failed",
            ReprintRequested => "reprint_requested",
            Packed => "packed",
            Shipped => "shipped",
            AtOffice => "at_office",
            InTransit => "in_transit",
            Collected => "collected",
            Voided => "voided",
            Cancelled => "cancelled",
        }
    }

    /// Final states: nothing moves an application out of them.
    pub fn is_final(self) -> bool {
        matches!(self, Rejected | ConfirmedDuplicate | Voided | Cancelled)
    }

    /// States from which the registry may still withdraw the application.
    /// A collected card is in the holder's hands: it is revoked as lost or
    /// reprinted, not cancelled.
    pub fn is_cancellable(self) -> bool {
        !self.is_final() && self != Collected
    }

    /// The one checked transition function.
    ///
    /// Returns the new state when `self -> to` is a legal move, otherwise an
    /// [`IllegalTransition`]. A self-transition is illegal too: a stage that
    /// finds an application already in its output state has nothing to do.
    pub fn transition(self, to: ApplicationState) -> Result<ApplicationState, IllegalTransition> {
        let legal = match (self, to) {
            (from, Cancelled) => from.is_cancellable(),
            (Received, Rejected | DedupPending) => true,
            (DedupPending, DedupClear | PossibleDuplicate) => true,
            (PossibleDuplicate, ConfirmedDuplicate | Cleared) => true,
            // A card that failed QC is remade with fresh keys and certificates on a fresh
            // blank (one chip per private key): back through the keys stage.
            (DedupClear | Cleared | ReprintRequested | QcFailed, KeysIssued) => true,
            (KeysIssued, Personalized) => true,
            (Personalized, QcPassed | QcFailed) => true,
            (QcPassed, Packed) => true,
            (Packed, Shipped) => true,
            (Shipped, AtOffice) => true,
            // A transfer to another office: from the first office, or straight from the box
            // when the transfer was asked for before the box arrived; the receipt at the new
            // office (or a change back to where the card is) makes it available again.
            (AtOffice | Shipped, InTransit) => true,
            (InTransit, AtOffice) => true,
            (AtOffice, Collected | Voided) => true,
            // Voiding is final: the holder needs a new application (at double fee).
            (QcPassed | Packed | Shipped | AtOffice | InTransit | Collected, ReprintRequested) => {
                true
            }
            _ => false,
        };
        if legal {
            Ok(to)
        } else {
            Err(IllegalTransition { from: self, to })
        }
    }
}

impl fmt::Display for ApplicationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown state name read from the store or an API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown application state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for ApplicationState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ALL_STATES
            .iter()
            .copied()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn happy_path_is_legal_end_to_end() {
        let path = [
            Received,
            DedupPending,
            DedupClear,
            KeysIssued,
            Personalized,
            QcPassed,
            Packed,
            Shipped,
            AtOffice,
            Collected,
        ];
        for pair in path.windows(2) {
            assert_eq!(
                pair[0].transition(pair[1]),
                Ok(pair[1]),
                "{} -> {}",
                pair[0],
                pair[1]
            );
        }
    }

    #[test]
    fn qc_failure_loops_back_to_fresh_keys_and_duplicates_are_adjudicated() {
        assert!(Personalized.transition(QcFailed).is_ok());
        assert!(QcFailed.transition(KeysIssued).is_ok());
        // Never the spoiled card's keys again.
        assert!(QcFailed.transition(Personalized).is_err());
        assert!(DedupPending.transition(PossibleDuplicate).is_ok());
        assert!(PossibleDuplicate.transition(Cleared).is_ok());
        assert!(Cleared.transition(KeysIssued).is_ok());
        assert!(PossibleDuplicate.transition(ConfirmedDuplicate).is_ok());
    }

    #[test]
    fn skipping_a_stage_or_leaving_a_final_state_is_an_error() {
        assert_eq!(
            Received.transition(KeysIssued),
            Err(IllegalTransition {
                from: Received,
                to: KeysIssued
            })
        );
        assert!(DedupPending.transition(DedupPending).is_err());
        for state in ALL_STATES.iter().copied().filter(|s| s.is_final()) {
            for to in ALL_STATES {
                assert!(
                    state.transition(to).is_err(),
                    "{state} -> {to} must be illegal"
                );
            }
        }
    }

    #[test]
    fn cancelled_is_reachable_from_every_non_final_state_except_collected() {
        for state in ALL_STATES {
            let expected = !state.is_final() && state != Collected;
            assert_eq!(
                state.transition(Cancelled).is_ok(),
                expected,
                "{state} -> cancelled"
            );
        }
    }

    #[test]
    fn names_round_trip() {
        for state in ALL_STATES {
            assert_eq!(state.as_str().parse::<ApplicationState>().unwrap(), state);
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{}\"", state.as_str())
            );
        }
        assert!("dedup-pending".parse::<ApplicationState>().is_err());
    }
}
