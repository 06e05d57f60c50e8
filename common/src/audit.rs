//! The audit log: every operator and registry action, append-only and hash-chained.
//!
//! Each entry's hash is SHA-256 over its own fields and the previous entry's hash; a single
//! head row (`audit_head`) holds the last sequence number and hash. So an edited entry no longer
//! matches its hash, a removed entry leaves a gap in the sequence or a broken link, and a removed
//! tail no longer matches the head. [`verify`] walks the chain and reports the first of each;
//! `cardpipe audit verify` prints that report. The tables also refuse UPDATE and DELETE
//! (triggers), so tampering needs someone who can drop triggers — which is what the chain is
//! there to expose.
//!
//! An entry names who (actor, role), what (action, e.g. `dedup.decide`), on what (subject, an
//! application id, batch id, serial range...) and details as JSON. Details must never carry a
//! national code, biometric, PIN or key: callers pass ids and reason codes only.
//!
//! Appending serialises on the head row: the first statement of [`record_in`] bumps the head's
//! sequence number, which takes the row lock on PostgreSQL and the write lock on SQLite, so two
//! concurrent writers can never both link to the same predecessor.

use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;
use time::OffsetDateTime;

use crate::clock::{Clock, to_rfc3339};
use crate::store::{Store, StoreError, StoreTx};

/// The previous-hash of the first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One action to record.
#[derive(Debug, Clone)]
pub struct AuditEvent<'a> {
    /// Who: an operator's login, a registry client id, or `system:<loop>`.
    pub actor: &'a str,
    /// Their role (`operator`, `supervisor`, `auditor`, `registry`, `system`).
    pub role: &'a str,
    /// What, as `<area>.<verb>` (for example `parked.retry`, `stock.destroy`).
    pub action: &'a str,
    /// On what: an application id, batch id, lot id, box id...
    pub subject: &'a str,
    /// Reason codes, counts, ids. Never personal data.
    pub details: serde_json::Value,
}

/// A stored entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    /// Position in the chain, from 1 without gaps.
    pub seq: i64,
    /// When (RFC 3339 UTC).
    pub at: String,
    /// Who.
    pub actor: String,
    /// Their role.
    pub role: String,
    /// What.
    pub action: String,
    /// On what.
    pub subject: String,
    /// Details (JSON text).
    pub details: String,
    /// Hash of the previous entry.
    pub prev_hash: String,
    /// Hash of this entry.
    pub hash: String,
}

impl AuditEntry {
    /// The hash this entry should carry.
    pub fn expected_hash(&self) -> String {
        entry_hash(
            self.seq,
            &self.at,
            &self.actor,
            &self.role,
            &self.action,
            &self.subject,
            &self.details,
            &self.prev_hash,
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn entry_hash(
    seq: i64,
    at: &str,
    actor: &str,
    role: &str,
    action: &str,
    subject: &str,
    details: &str,
    prev_hash: &str,
) -> String {
    // A JSON array is an unambiguous encoding of the fields (no delimiter games).
    let canonical =
        serde_json::to_string(&(seq, at, actor, role, action, subject, details, prev_hash))
            .expect("strings and integers always serialise");
    hex::encode(Sha256::digest(canonical.as_bytes()))
}

/// Appends `event` inside the caller's transaction, so the action and its audit entry commit
/// or roll back together.
pub async fn record_in(
    tx: &mut StoreTx,
    at: OffsetDateTime,
    event: &AuditEvent<'_>,
) -> Result<AuditEntry, StoreError> {
    // Bump first: this takes the lock that serialises appenders (see the module doc).
    sqlx::query("UPDATE audit_head SET seq = seq + 1 WHERE id = 1")
        .execute(&mut **tx)
        .await?;
    let head = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
        .fetch_one(&mut **tx)
        .await?;
    let seq: i64 = head.try_get("seq")?;
    let prev_hash: String = head.try_get("hash")?;
    let details = event.details.to_string();
    let at = to_rfc3339(at);
    let hash = entry_hash(
        seq,
        &at,
        event.actor,
        event.role,
        event.action,
        event.subject,
        &details,
        &prev_hash,
    );
    sqlx::query(
        "INSERT INTO audit_log (seq, at, actor, role, action, subject, details, prev_hash, hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(seq)
    .bind(&at)
    .bind(event.actor)
    .bind(event.role)
    .bind(event.action)
    .bind(event.subject)
    .bind(&details)
    .bind(&prev_hash)
    .bind(&hash)
    .execute(&mut **tx)
    .await?;
    sqlx::query("UPDATE audit_head SET hash = $1 WHERE id = 1")
        .bind(&hash)
        .execute(&mut **tx)
        .await?;
    Ok(AuditEntry {
        seq,
        at,
        actor: event.actor.to_owned(),
        role: event.role.to_owned(),
        action: event.action.to_owned(),
        subject: event.subject.to_owned(),
        details,
        prev_hash,
        hash,
    })
}

/// Appends `event` in its own transaction.
pub async fn record(
    store: &Store,
    clock: &dyn Clock,
    event: &AuditEvent<'_>,
) -> Result<AuditEntry, StoreError> {
    let mut tx = store.begin().await?;
    let entry = record_in(&mut tx, clock.now(), event).await?;
    tx.commit().await?;
    Ok(entry)
}

fn entry_from_row(row: &sqlx::any::AnyRow) -> Result<AuditEntry, StoreError> {
    Ok(AuditEntry {
        seq: row.try_get("seq")?,
        at: row.try_get("at")?,
        actor: row.try_get("actor")?,
        role: row.try_get("role")?,
        action: row.try_get("action")?,
        subject: row.try_get("subject")?,
        details: row.try_get("details")?,
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
    })
}

/// The newest entries first, optionally only those about `subject`.
pub async fn recent(
    store: &Store,
    subject: Option<&str>,
    limit: i64,
) -> Result<Vec<AuditEntry>, StoreError> {
    let rows = match subject {
        Some(subject) => {
            sqlx::query("SELECT * FROM audit_log WHERE subject = $1 ORDER BY seq DESC LIMIT $2")
                .bind(subject)
                .bind(limit)
                .fetch_all(store.pool())
                .await?
        }
        None => {
            sqlx::query("SELECT * FROM audit_log ORDER BY seq DESC LIMIT $1")
                .bind(limit)
                .fetch_all(store.pool())
                .await?
        }
    };
    rows.iter().map(entry_from_row).collect()
}

/// One thing wrong with the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum AuditProblem {
    /// The entry's fields no longer match its hash (edited).
    Edited {
        /// Sequence number.
        seq: i64,
    },
    /// The entry does not link to the one before it (one was removed or replaced).
    BrokenLink {
        /// Sequence number.
        seq: i64,
    },
    /// Sequence numbers jump (entries removed).
    Missing {
        /// First missing sequence number.
        from: i64,
        /// Last missing sequence number.
        to: i64,
    },
    /// The head says the chain is longer or ends elsewhere (the tail was removed or replaced).
    HeadMismatch {
        /// Head sequence number.
        head_seq: i64,
        /// Last entry found.
        last_seq: i64,
    },
}

impl std::fmt::Display for AuditProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Edited { seq } => write!(f, "entry {seq} was edited (its hash does not match)"),
            Self::BrokenLink { seq } => write!(
                f,
                "entry {seq} does not link to the entry before it (an entry was removed or replaced)"
            ),
            Self::Missing { from, to } if from == to => write!(f, "entry {from} is missing"),
            Self::Missing { from, to } => write!(f, "entries {from}..={to} are missing"),
            Self::HeadMismatch { head_seq, last_seq } => write!(
                f,
                "the chain head is at entry {head_seq} but the log ends at entry {last_seq} (entries removed from the end, or the head was altered)"
            ),
        }
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Entries read.
    pub entries: u64,
    /// Everything wrong, in chain order.
    pub problems: Vec<AuditProblem>,
}

impl VerifyReport {
    /// True when the chain is intact.
    pub fn intact(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Walks the whole chain (in pages, so memory stays flat) and reports every break.
pub async fn verify(store: &Store) -> Result<VerifyReport, StoreError> {
    const PAGE: i64 = 1000;
    let mut report = VerifyReport::default();
    let mut expected_seq = 1i64;
    let mut prev_hash = GENESIS_HASH.to_owned();
    let mut last_seq = 0i64;
    let mut last_hash = GENESIS_HASH.to_owned();
    loop {
        let rows = sqlx::query("SELECT * FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2")
            .bind(last_seq)
            .bind(PAGE)
            .fetch_all(store.pool())
            .await?;
        if rows.is_empty() {
            break;
        }
        for row in &rows {
            let entry = entry_from_row(row)?;
            report.entries += 1;
            if entry.seq != expected_seq {
                report.problems.push(AuditProblem::Missing {
                    from: expected_seq,
                    to: entry.seq - 1,
                });
            }
            if entry.expected_hash() != entry.hash {
                report
                    .problems
                    .push(AuditProblem::Edited { seq: entry.seq });
            } else if entry.prev_hash != prev_hash {
                report
                    .problems
                    .push(AuditProblem::BrokenLink { seq: entry.seq });
            }
            expected_seq = entry.seq + 1;
            prev_hash = entry.hash.clone();
            last_seq = entry.seq;
            last_hash = entry.hash;
        }
    }
    let head = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
        .fetch_one(store.pool())
        .await?;
    let head_seq: i64 = head.try_get("seq")?;
    let head_hash: String = head.try_get("hash")?;
    if head_seq != last_seq || head_hash != last_hash {
        report
            .problems
            .push(AuditProblem::HeadMismatch { head_seq, last_seq });
    }
    Ok(report)
}
