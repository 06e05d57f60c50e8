//! The audit log: every operator and registry action, append-only and hash-chained.
//!
//! Each entry's hash is SHA-256 over its own fields and the previous entry's hash. So an edited
//! entry no longer matches its hash and a removed entry leaves a gap in the sequence or a broken
//! link. [`verify`] walks the chain and reports each break; `cardpipe audit verify` prints that
//! report. The tables also refuse UPDATE, DELETE and TRUNCATE (triggers), and on PostgreSQL the
//! application role may only INSERT and SELECT them (`cardpipe migrate` with
//! `[store] owner_url`): tampering needs the database owner.
//!
//! The chain alone cannot stop the owner: an unkeyed chain can be cut at the end or recomputed
//! from an edited entry on. That is what signed checkpoints are for: the chain's last
//! sequence number and hash, signed with a key in the CA keystore / HSM (never in the database)
//! and written to the object store on a schedule and at shutdown (`cardpipe_pki::checkpoint`).
//! [`verify_against`] checks the chain against the newest one ([`Anchor`]): a chain that ends
//! before it (truncation, tail cut) or holds another hash at its position (rewrite) fails.
//!
//! An entry names who (actor, role), what (action, e.g. `dedup.decide`), on what (subject, an
//! application id, batch id, serial range...) and details as JSON. Details must never carry a
//! national code, biometric, PIN or key: callers pass ids and reason codes only.
//!
//! Appending serialises, so two concurrent writers can never both link to the same
//! predecessor: on PostgreSQL through a transaction-scoped advisory lock (no UPDATE right
//! needed), on SQLite by first bumping the `audit_head` row, which takes the write lock.

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
    // Lock first: this serialises appenders (see the module doc).
    let postgres = tx.backend_name() == "PostgreSQL";
    let (seq, prev_hash) = if postgres {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(APPEND_LOCK)
            .execute(&mut **tx)
            .await?;
        let (last_seq, last_hash) = last_entry(&mut **tx).await?;
        (last_seq + 1, last_hash)
    } else {
        sqlx::query("UPDATE audit_head SET seq = seq + 1 WHERE id = 1")
            .execute(&mut **tx)
            .await?;
        let head = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_one(&mut **tx)
            .await?;
        (head.try_get("seq")?, head.try_get("hash")?)
    };
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
    if !postgres {
        sqlx::query("UPDATE audit_head SET hash = $1 WHERE id = 1")
            .bind(&hash)
            .execute(&mut **tx)
            .await?;
    }
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

/// The advisory-lock key appenders take on PostgreSQL ("cardpipe.audit" in ASCII, truncated).
const APPEND_LOCK: i64 = 0x6361_7264_6175_6474;

/// Sequence number and hash of the last entry (0 and [`GENESIS_HASH`] for an empty log).
async fn last_entry<'c, E>(executor: E) -> Result<(i64, String), StoreError>
where
    E: sqlx::Executor<'c, Database = sqlx::Any>,
{
    let row = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        .fetch_optional(executor)
        .await?;
    Ok(match row {
        Some(row) => (row.try_get("seq")?, row.try_get("hash")?),
        None => (0, GENESIS_HASH.to_owned()),
    })
}

/// Where the chain ends now: what a checkpoint signs.
pub async fn head(store: &Store) -> Result<Anchor, StoreError> {
    let (seq, hash) = last_entry(store.pool()).await?;
    Ok(Anchor { seq, hash })
}

/// A point of the chain vouched for from outside the database: entry `seq` had hash `hash`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Anchor {
    /// Sequence number of the entry (0: the empty log).
    pub seq: i64,
    /// Its hash.
    pub hash: String,
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
    /// A signed checkpoint vouches for entry `checkpoint_seq` but the log ends before it
    /// (truncated, or its tail cut).
    EndsBeforeCheckpoint {
        /// The checkpoint's sequence number.
        checkpoint_seq: i64,
        /// Last entry found (0: none).
        last_seq: i64,
    },
    /// The entry a signed checkpoint vouches for carries another hash (the chain was rewritten
    /// up to there).
    CheckpointMismatch {
        /// Sequence number.
        seq: i64,
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
            Self::EndsBeforeCheckpoint {
                checkpoint_seq,
                last_seq,
            } => write!(
                f,
                "the log ends at entry {last_seq} but a signed checkpoint vouches for entry {checkpoint_seq} (entries removed from the end, or the log truncated)"
            ),
            Self::CheckpointMismatch { seq } => write!(
                f,
                "entry {seq} does not carry the hash its signed checkpoint vouches for (the chain was rewritten)"
            ),
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
    /// The last entry read (`None`: the walk stopped before reading).
    pub end: Option<Anchor>,
}

impl VerifyReport {
    /// True when the chain is intact.
    pub fn intact(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Walks the whole chain (in pages, so memory stays flat) and reports every break.
pub async fn verify(store: &Store) -> Result<VerifyReport, StoreError> {
    verify_against(store, None).await
}

/// Checks the entries after `from` (their hashes, links, no gaps) up to the end of the log,
/// `from` itself included: the first entry must carry `from`'s hash. Returns the entries read,
/// the problems and the last entry. What a checkpoint writer runs before signing a new head,
/// so it never vouches for a chain rewritten since its previous checkpoint.
pub async fn verify_extends(store: &Store, from: &Anchor) -> Result<VerifyReport, StoreError> {
    let mut report = VerifyReport::default();
    if from.seq > 0 {
        let hash: Option<String> = sqlx::query_scalar("SELECT hash FROM audit_log WHERE seq = $1")
            .bind(from.seq)
            .fetch_optional(store.pool())
            .await?;
        match hash {
            None => {
                let (last_seq, _) = last_entry(store.pool()).await?;
                report.problems.push(AuditProblem::EndsBeforeCheckpoint {
                    checkpoint_seq: from.seq,
                    last_seq,
                });
                return Ok(report);
            }
            Some(hash) if hash != from.hash => {
                report
                    .problems
                    .push(AuditProblem::CheckpointMismatch { seq: from.seq });
                return Ok(report);
            }
            Some(_) => {}
        }
    }
    let (seq, hash) = walk(store, from, None, &mut report).await?;
    report.end = Some(Anchor { seq, hash });
    Ok(report)
}

/// Walks the entries after `after` in pages (memory stays flat), recording every break in
/// `report`; returns the last entry's sequence number and hash.
async fn walk(
    store: &Store,
    after: &Anchor,
    anchor: Option<&Anchor>,
    report: &mut VerifyReport,
) -> Result<(i64, String), StoreError> {
    const PAGE: i64 = 1000;
    let mut expected_seq = after.seq + 1;
    let mut prev_hash = after.hash.clone();
    let mut last_seq = after.seq;
    let mut last_hash = after.hash.clone();
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
            if let Some(anchor) = anchor
                && anchor.seq == entry.seq
                && anchor.hash != entry.hash
            {
                report
                    .problems
                    .push(AuditProblem::CheckpointMismatch { seq: entry.seq });
            }
            expected_seq = entry.seq + 1;
            prev_hash = entry.hash.clone();
            last_seq = entry.seq;
            last_hash = entry.hash;
        }
    }
    Ok((last_seq, last_hash))
}

/// [`verify`], and the chain must reach `anchor` with the hash it vouches for.
pub async fn verify_against(
    store: &Store,
    anchor: Option<&Anchor>,
) -> Result<VerifyReport, StoreError> {
    let mut report = VerifyReport::default();
    let genesis = Anchor {
        seq: 0,
        hash: GENESIS_HASH.to_owned(),
    };
    let (last_seq, last_hash) = walk(store, &genesis, anchor, &mut report).await?;
    report.end = Some(Anchor {
        seq: last_seq,
        hash: last_hash.clone(),
    });
    if let Some(anchor) = anchor
        && anchor.seq > last_seq
    {
        report.problems.push(AuditProblem::EndsBeforeCheckpoint {
            checkpoint_seq: anchor.seq,
            last_seq,
        });
    }
    // SQLite keeps a head row (its append lock); PostgreSQL relies on the checkpoints.
    if store.dialect() == crate::store::Dialect::Sqlite {
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
    }
    Ok(report)
}
