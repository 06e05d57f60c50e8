//! The keys stage's tables (migrations `0004_pki.sql`): CA hierarchy versions, citizen
//! certificates, CRL numbers, Document Signer usage and wrapped-key custody. One SQL text
//! for PostgreSQL and SQLite, like the rest of the store.

use cardpipe_common::clock::to_rfc3339;
use cardpipe_common::domain::ApplicationId;
use cardpipe_common::store::{Store, StoreError, StoreTx};
use sqlx::Row;
use time::OffsetDateTime;

use crate::ca::{CaHierarchy, UsageCounts};
use crate::citizen::IssuedCertificate;
use crate::crl::RevokedCertificate;
use cardpipe_common::contract::RevocationCause;

fn corrupt(table: &'static str, column: &'static str, message: impl ToString) -> StoreError {
    StoreError::Corrupt {
        table,
        column,
        message: message.to_string(),
    }
}

fn parse_time(
    table: &'static str,
    column: &'static str,
    s: &str,
) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| corrupt(table, column, e))
}

/// The newest hierarchy version, if any.
pub async fn current_hierarchy_version(store: &Store) -> Result<Option<i64>, StoreError> {
    let row = sqlx::query("SELECT MAX(version) AS v FROM ca_hierarchy")
        .fetch_one(store.pool())
        .await?;
    Ok(row.try_get::<Option<i64>, _>("v")?)
}

/// The newest hierarchy and its version.
pub async fn current_hierarchy(store: &Store) -> Result<Option<(i64, CaHierarchy)>, StoreError> {
    let row =
        sqlx::query("SELECT version, hierarchy FROM ca_hierarchy ORDER BY version DESC LIMIT 1")
            .fetch_optional(store.pool())
            .await?;
    row.map(|r| {
        let version: i64 = r.try_get("version")?;
        let text: String = r.try_get("hierarchy")?;
        let h = serde_json::from_str(&text).map_err(|e| corrupt("ca_hierarchy", "hierarchy", e))?;
        Ok((version, h))
    })
    .transpose()
}

/// Every hierarchy version: (version, reason, created_at).
pub async fn hierarchy_versions(store: &Store) -> Result<Vec<(i64, String, String)>, StoreError> {
    let rows = sqlx::query("SELECT version, reason, created_at FROM ca_hierarchy ORDER BY version")
        .fetch_all(store.pool())
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("version")?,
                r.try_get("reason")?,
                r.try_get("created_at")?,
            ))
        })
        .collect()
}

/// Stores `version` unless it exists; `false` when another writer stored it first.
pub async fn insert_hierarchy_tx(
    tx: &mut StoreTx,
    version: i64,
    hierarchy: &CaHierarchy,
    reason: &str,
    at: OffsetDateTime,
) -> Result<bool, StoreError> {
    let text = serde_json::to_string(hierarchy).expect("a hierarchy serialises");
    let done = sqlx::query(
        "INSERT INTO ca_hierarchy (version, hierarchy, reason, created_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (version) DO NOTHING",
    )
    .bind(version)
    .bind(text)
    .bind(reason)
    .bind(to_rfc3339(at))
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// [`insert_hierarchy_tx`] in its own transaction.
pub async fn insert_hierarchy(
    store: &Store,
    version: i64,
    hierarchy: &CaHierarchy,
    reason: &str,
    at: OffsetDateTime,
) -> Result<bool, StoreError> {
    let mut tx = store.begin().await?;
    let created = insert_hierarchy_tx(&mut tx, version, hierarchy, reason, at).await?;
    tx.commit().await?;
    Ok(created)
}

/// Records an issued certificate.
pub async fn insert_certificate(
    tx: &mut StoreTx,
    app: &ApplicationId,
    cert: &IssuedCertificate,
    credentials_key: &str,
    at: OffsetDateTime,
) -> Result<(), StoreError> {
    let role = match cert.role {
        crate::citizen::CardKeyRole::Authentication => "authentication",
        crate::citizen::CardKeyRole::Signature => "signature",
    };
    sqlx::query(
        "INSERT INTO certificates (serial, application_id, key_role, not_after, issued_at, status, credentials_key)
         VALUES ($1, $2, $3, $4, $5, 'valid', $6)",
    )
    .bind(&cert.serial)
    .bind(app.as_str())
    .bind(role)
    .bind(to_rfc3339(cert.not_after))
    .bind(to_rfc3339(at))
    .bind(credentials_key)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// +1 document for Document Signer `label`.
pub async fn count_ds_usage(
    tx: &mut StoreTx,
    label: &str,
    at: OffsetDateTime,
) -> Result<(), StoreError> {
    let now = to_rfc3339(at);
    sqlx::query(
        "INSERT INTO ds_usage (ds_label, documents, first_used_at, last_used_at) VALUES ($1, 1, $2, $2)
         ON CONFLICT (ds_label) DO UPDATE SET documents = ds_usage.documents + 1, last_used_at = excluded.last_used_at",
    )
    .bind(label)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Documents signed by Document Signer `label`.
pub async fn ds_usage(store: &Store, label: &str) -> Result<u64, StoreError> {
    let row = sqlx::query("SELECT documents FROM ds_usage WHERE ds_label = $1")
        .bind(label)
        .fetch_optional(store.pool())
        .await?;
    Ok(row
        .map(|r| r.try_get::<i64, _>("documents"))
        .transpose()?
        .unwrap_or(0)
        .max(0) as u64)
}

/// Records a personalization package object.
pub async fn insert_custody(
    tx: &mut StoreTx,
    app: &ApplicationId,
    object_key: &str,
    transport_key_id: &str,
    at: OffsetDateTime,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO wrapped_key_custody (object_key, application_id, transport_key_id, created_at)
         VALUES ($1, $2, $3, $4) ON CONFLICT (object_key) DO NOTHING",
    )
    .bind(object_key)
    .bind(app.as_str())
    .bind(transport_key_id)
    .bind(to_rfc3339(at))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Packages of `app` recorded so far (committed keys-stage completions): the next one is
/// number `committed_packages + 1`.
pub async fn committed_packages(store: &Store, app: &ApplicationId) -> Result<i64, StoreError> {
    Ok(
        sqlx::query("SELECT COUNT(*) FROM wrapped_key_custody WHERE application_id = $1")
            .bind(app.as_str())
            .fetch_one(store.pool())
            .await?
            .try_get(0)?,
    )
}

/// Serials of the certificates issued with the package at `credentials_key`, sorted.
pub async fn package_serials(
    store: &Store,
    credentials_key: &str,
) -> Result<Vec<String>, StoreError> {
    let mut serials: Vec<String> =
        sqlx::query("SELECT serial FROM certificates WHERE credentials_key = $1")
            .bind(credentials_key)
            .fetch_all(store.pool())
            .await?
            .iter()
            .map(|r| r.try_get("serial"))
            .collect::<Result<_, _>>()?;
    serials.sort();
    Ok(serials)
}

/// Marks one package of `app` destroyed (a spoiled card's); returns the rows changed.
pub async fn mark_package_destroyed(
    store: &Store,
    app: &ApplicationId,
    object_key: &str,
    at: OffsetDateTime,
) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "UPDATE wrapped_key_custody SET destroyed_at = $1
         WHERE application_id = $2 AND object_key = $3 AND destroyed_at IS NULL",
    )
    .bind(to_rfc3339(at))
    .bind(app.as_str())
    .bind(object_key)
    .execute(store.pool())
    .await?;
    Ok(done.rows_affected())
}

/// Marks every package of `app` destroyed; returns the rows changed.
pub async fn mark_destroyed(
    store: &Store,
    app: &ApplicationId,
    at: OffsetDateTime,
) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "UPDATE wrapped_key_custody SET destroyed_at = $1 WHERE application_id = $2 AND destroyed_at IS NULL",
    )
    .bind(to_rfc3339(at))
    .bind(app.as_str())
    .execute(store.pool())
    .await?;
    Ok(done.rows_affected())
}

/// Marks the valid certificates of `app` revoked, in the caller's transaction.
pub async fn revoke_tx(
    tx: &mut StoreTx,
    app: &ApplicationId,
    cause: RevocationCause,
    at: OffsetDateTime,
) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "UPDATE certificates SET status = 'revoked', revoked_at = $1, revocation_cause = $2
         WHERE application_id = $3 AND status = 'valid'",
    )
    .bind(to_rfc3339(at))
    .bind(cause_name(cause))
    .bind(app.as_str())
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected())
}

/// Marks the listed certificates of `app` revoked (those still valid), in the caller's
/// transaction. A revocation requested for one card must not reach the certificates of the
/// card that replaces it, so requests name the serials they mean.
pub async fn revoke_serials_tx(
    tx: &mut StoreTx,
    app: &ApplicationId,
    serials: &[String],
    cause: RevocationCause,
    at: OffsetDateTime,
) -> Result<u64, StoreError> {
    let mut n = 0;
    for serial in serials {
        let done = sqlx::query(
            "UPDATE certificates SET status = 'revoked', revoked_at = $1, revocation_cause = $2
             WHERE application_id = $3 AND serial = $4 AND status = 'valid'",
        )
        .bind(to_rfc3339(at))
        .bind(cause_name(cause))
        .bind(app.as_str())
        .bind(serial)
        .execute(&mut **tx)
        .await?;
        n += done.rows_affected();
    }
    Ok(n)
}

/// Serials of the valid certificates of `app`, read in the caller's transaction.
pub async fn valid_serials_tx(
    tx: &mut StoreTx,
    app: &ApplicationId,
) -> Result<Vec<String>, StoreError> {
    let rows = sqlx::query(
        "SELECT serial FROM certificates WHERE application_id = $1 AND status = 'valid' ORDER BY serial",
    )
    .bind(app.as_str())
    .fetch_all(&mut **tx)
    .await?;
    rows.iter()
        .map(|r| r.try_get::<String, _>("serial").map_err(StoreError::from))
        .collect()
}

/// Stable text of a cause (as stored).
pub fn cause_name(cause: RevocationCause) -> &'static str {
    cause.as_str()
}

fn parse_cause(s: &str) -> Result<RevocationCause, StoreError> {
    Ok(match s {
        "voided" => RevocationCause::Voided,
        "cancelled" => RevocationCause::Cancelled,
        "lost" => RevocationCause::Lost,
        "reprinted" => RevocationCause::Reprinted,
        "spoiled" => RevocationCause::Spoiled,
        other => return Err(corrupt("certificates", "revocation_cause", other)),
    })
}

/// Every revoked certificate (what a CRL lists).
pub async fn revoked(tx: &mut StoreTx) -> Result<Vec<RevokedCertificate>, StoreError> {
    let rows = sqlx::query(
        "SELECT serial, revoked_at, revocation_cause FROM certificates WHERE status = 'revoked' ORDER BY serial",
    )
    .fetch_all(&mut **tx)
    .await?;
    rows.iter()
        .map(|r| {
            let at: String = r.try_get("revoked_at")?;
            let cause: String = r.try_get("revocation_cause")?;
            Ok(RevokedCertificate {
                serial: r.try_get("serial")?,
                revoked_at: parse_time("certificates", "revoked_at", &at)?,
                cause: parse_cause(&cause)?,
            })
        })
        .collect()
}

/// One certificate row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRow {
    /// Serial (hex).
    pub serial: String,
    /// `authentication` or `signature`.
    pub key_role: String,
    /// `valid` or `revoked`.
    pub status: String,
    /// Revocation cause, when revoked.
    pub revocation_cause: Option<String>,
    /// notAfter (RFC 3339).
    pub not_after: String,
}

/// The certificates of an application.
pub async fn certificates_of(
    store: &Store,
    app: &ApplicationId,
) -> Result<Vec<CertificateRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT serial, key_role, status, revocation_cause, not_after FROM certificates
         WHERE application_id = $1 ORDER BY issued_at, key_role",
    )
    .bind(app.as_str())
    .fetch_all(store.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(CertificateRow {
                serial: r.try_get("serial")?,
                key_role: r.try_get("key_role")?,
                status: r.try_get("status")?,
                revocation_cause: r.try_get("revocation_cause")?,
                not_after: r.try_get("not_after")?,
            })
        })
        .collect()
}

/// The last CRL number and when it was published.
pub async fn last_crl(store: &Store) -> Result<Option<(u64, OffsetDateTime)>, StoreError> {
    let row =
        sqlx::query("SELECT number, published_at FROM crl_state ORDER BY number DESC LIMIT 1")
            .fetch_optional(store.pool())
            .await?;
    row.map(|r| {
        let n: i64 = r.try_get("number")?;
        let at: String = r.try_get("published_at")?;
        Ok((
            n.max(0) as u64,
            parse_time("crl_state", "published_at", &at)?,
        ))
    })
    .transpose()
}

/// Reserves the next CRL number in the caller's transaction: MAX + 1, written as a row
/// whose primary key makes it unique. Returns (number, previous).
pub async fn reserve_crl_number(
    tx: &mut StoreTx,
    at: OffsetDateTime,
    next_update: OffsetDateTime,
    revoked_count: usize,
) -> Result<(u64, Option<u64>), StoreError> {
    let row = sqlx::query("SELECT MAX(number) AS n FROM crl_state")
        .fetch_one(&mut **tx)
        .await?;
    let previous: Option<i64> = row.try_get("n")?;
    let number = previous.unwrap_or(0) + 1;
    sqlx::query(
        "INSERT INTO crl_state (number, published_at, next_update, object_key, revoked_count)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(number)
    .bind(to_rfc3339(at))
    .bind(to_rfc3339(next_update))
    .bind(format!("crl/issuing-{number}.crl"))
    .bind(revoked_count as i64)
    .execute(&mut **tx)
    .await?;
    Ok((number as u64, previous.map(|p| p.max(0) as u64)))
}

/// Counters for `pki status`.
pub async fn usage_counts(store: &Store, current_ds: &str) -> Result<UsageCounts, StoreError> {
    let row = sqlx::query(
        "SELECT COUNT(*) AS total,
                CAST(COALESCE(SUM(CASE WHEN status = 'revoked' THEN 1 ELSE 0 END), 0) AS BIGINT) AS revoked
         FROM certificates",
    )
    .fetch_one(store.pool())
    .await?;
    let total: i64 = row.try_get("total")?;
    let revoked: i64 = row.try_get("revoked")?;
    let docs = sqlx::query("SELECT CAST(COALESCE(SUM(documents), 0) AS BIGINT) AS d FROM ds_usage")
        .fetch_one(store.pool())
        .await?;
    let documents_total: i64 = docs.try_get("d")?;
    Ok(UsageCounts {
        citizen_certificates: total.max(0) as u64,
        revoked_certificates: revoked.max(0) as u64,
        documents_signed_current_ds: ds_usage(store, current_ds).await?,
        documents_signed_total: documents_total.max(0) as u64,
        last_crl_number: last_crl(store).await?.map(|(n, _)| n),
    })
}
