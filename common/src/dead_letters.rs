//! Outbox dead letters as an operator work list.
//!
//! The relay moves a row it can never deliver to `outbox_dead_letters`
//! ([`crate::store::DeadLetter`]); the console and `cardpipe ops dead-letters` list them,
//! and a supervisor re-queues one (after fixing what made it fail, e.g. the registry's
//! webhook) or discards it. Both actions are audited in the transaction that does them.
//! The payload is never shown: a callback or a citizen message may carry personal data.

use serde_json::json;

use crate::audit::{self, AuditEvent};
use crate::runtime::Services;
use crate::store::{DeadLetter, Store, StoreError};

/// What went wrong with a dead-letter action.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// No dead letter with this number.
    #[error("no dead letter number {0} (see `cardpipe ops dead-letters`)")]
    NotFound(i64),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for DeadLetterError {
    fn from(e: sqlx::Error) -> Self {
        DeadLetterError::Store(e.into())
    }
}

/// Puts dead letter `seq` back into the outbox, due now; audited as `by` (login, role).
pub async fn requeue(
    services: &Services,
    seq: i64,
    by: (&str, &str),
) -> Result<DeadLetter, DeadLetterError> {
    act(services, seq, by, Action::Requeue).await
}

/// Deletes dead letter `seq` for good; audited as `by` (login, role) with `reason`.
pub async fn discard(
    services: &Services,
    seq: i64,
    by: (&str, &str),
    reason: &str,
) -> Result<DeadLetter, DeadLetterError> {
    act(services, seq, by, Action::Discard(reason)).await
}

enum Action<'a> {
    Requeue,
    Discard(&'a str),
}

async fn act(
    services: &Services,
    seq: i64,
    by: (&str, &str),
    action: Action<'_>,
) -> Result<DeadLetter, DeadLetterError> {
    let now = services.clock.now();
    let mut tx = services.store.begin().await?;
    let (letter, name, reason) = match action {
        Action::Requeue => (
            Store::requeue_dead_letter(&mut tx, seq, now).await?,
            "outbox.dead_letter.requeue",
            None,
        ),
        Action::Discard(reason) => (
            Store::discard_dead_letter(&mut tx, seq).await?,
            "outbox.dead_letter.discard",
            Some(reason),
        ),
    };
    let Some(letter) = letter else {
        return Err(DeadLetterError::NotFound(seq));
    };
    audit::record_in(
        &mut tx,
        now,
        &AuditEvent {
            actor: by.0,
            role: by.1,
            action: name,
            subject: &letter.subject,
            details: json!({
                "dead_letter": letter.seq,
                "message_id": letter.id,
                "topic": letter.topic,
                "attempts": letter.attempts,
                "reason": reason,
            }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(letter)
}
