//! Registry batches and physical cards: the states they move through.
//!
//! Like applications, their changes are checked moves, so an illegal one is an
//! error rather than a silent overwrite. The names are the stored values.

use serde::{Deserialize, Serialize};

/// Where a registry batch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchState {
    /// The body is being streamed in and validated.
    Receiving,
    /// Every record was validated; waiting to be scheduled.
    Received,
    /// A release time is set.
    Scheduled,
    /// Its applications went to deduplication.
    Released,
    /// Withdrawn before release.
    Cancelled,
}

impl BatchState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            BatchState::Receiving => "receiving",
            BatchState::Received => "received",
            BatchState::Scheduled => "scheduled",
            BatchState::Released => "released",
            BatchState::Cancelled => "cancelled",
        }
    }

    /// Whether `self -> to` is allowed (rescheduling keeps `scheduled`).
    pub fn can_move_to(self, to: BatchState) -> bool {
        use BatchState::*;
        matches!(
            (self, to),
            (Receiving, Received)
                | (Received | Scheduled, Scheduled)
                | (Scheduled, Released)
                | (Received | Scheduled, Cancelled)
        )
    }
}

/// Where a physical card (a blank from stock, then a personalized card) is.
/// Every serial is in exactly one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CardState {
    /// Received from the supplier, in the vault.
    InVault,
    /// Issued from the vault to an encoder's hopper.
    AtEncoder,
    /// Being personalized for an application.
    InProgress,
    /// Personalized (and possibly passed QC, packed, shipped).
    Personalized,
    /// Spoiled on the encoder or at QC (with a reason).
    Spoiled,
    /// Spoiled or recalled, waiting for witnessed destruction.
    AwaitingDestruction,
    /// Destroyed (two operators signed off).
    Destroyed,
    /// Handed over to its holder.
    Issued,
    /// Came back to the centre (voided or replaced by a reprint).
    Returned,
}

impl CardState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            CardState::InVault => "in_vault",
            CardState::AtEncoder => "at_encoder",
            CardState::InProgress => "in_progress",
            CardState::Personalized => "personalized",
            CardState::Spoiled => "spoiled",
            CardState::AwaitingDestruction => "awaiting_destruction",
            CardState::Destroyed => "destroyed",
            CardState::Issued => "issued",
            CardState::Returned => "returned",
        }
    }

    /// Whether `self -> to` is allowed.
    pub fn can_move_to(self, to: CardState) -> bool {
        use CardState::*;
        matches!(
            (self, to),
            (InVault, AtEncoder)
                | (AtEncoder, InVault | InProgress)
                | (InProgress, Personalized | Spoiled)
                | (Personalized, Spoiled | Issued | Returned)
                | (Issued, Returned)
                | (Spoiled | Returned, AwaitingDestruction)
                | (AwaitingDestruction, Destroyed)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_release_once_and_cancel_only_before_release() {
        assert!(BatchState::Receiving.can_move_to(BatchState::Received));
        assert!(BatchState::Scheduled.can_move_to(BatchState::Scheduled));
        assert!(BatchState::Scheduled.can_move_to(BatchState::Released));
        assert!(!BatchState::Released.can_move_to(BatchState::Cancelled));
        assert!(!BatchState::Released.can_move_to(BatchState::Released));
        assert!(!BatchState::Receiving.can_move_to(BatchState::Released));
    }

    #[test]
    fn a_card_is_destroyed_only_after_awaiting_destruction() {
        assert!(CardState::InProgress.can_move_to(CardState::Spoiled));
        assert!(CardState::Spoiled.can_move_to(CardState::AwaitingDestruction));
        assert!(CardState::AwaitingDestruction.can_move_to(CardState::Destroyed));
        assert!(!CardState::Spoiled.can_move_to(CardState::Destroyed));
        assert!(!CardState::Destroyed.can_move_to(CardState::InVault));
        assert!(!CardState::InVault.can_move_to(CardState::Personalized));
        assert_eq!(
            serde_json::to_string(&CardState::AwaitingDestruction).unwrap(),
            "\"awaiting_destruction\""
        );
    }
}
