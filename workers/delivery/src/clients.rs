//! Who may call the office-facing delivery API ([`crate::api`]), and as whom.
//!
//! Three kinds of callers, all with bearer tokens compared by SHA-256 digest (the hashing is
//! the registry API's, [`cardpipe_registry::config::hash_token`]; tokens are never stored):
//!
//! * **registry clients** — the `[registry] clients` of pipeline.toml (the same tokens as the
//!   registry API): may change a pickup office, nothing else of the office side;
//! * **office clients** — rows of `delivery_api_clients` bound to one pickup office: may
//!   acknowledge boxes and transfers addressed to that office and hand over its cards, and
//!   nothing of another office (403);
//! * **centre clients** — rows of `delivery_api_clients` without an office: every office
//!   action, and pickup-office changes.
//!
//! Office and centre clients are created at run time (`cardpipe offices clients add`), the
//! token printed once; adding and revoking are audited.

use base64::Engine;
use cardpipe_common::audit::{self, AuditEvent};
use cardpipe_common::clock::to_rfc3339;
use cardpipe_common::runtime::Services;
use cardpipe_registry::config::{RegistryConfig, hash_token};
use rand::RngCore;
use serde::Serialize;
use serde_json::json;
use sqlx::Row;

use crate::office::OfficeError;
use crate::{Delivery, offices};

/// The authenticated caller of a delivery API request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A `[registry]` client (name).
    Registry(String),
    /// A centre-wide delivery API client (name).
    Centre(String),
    /// A delivery API client bound to one pickup office.
    Office {
        /// Client name.
        client: String,
        /// The office it acts for.
        office: String,
    },
}

impl Caller {
    /// The identity recorded in the audit log: `registry:<name>`, `centre:<name>` or
    /// `office-client:<name>`.
    pub fn label(&self) -> String {
        match self {
            Caller::Registry(n) => format!("registry:{n}"),
            Caller::Centre(n) => format!("centre:{n}"),
            Caller::Office { client, .. } => format!("office-client:{client}"),
        }
    }

    /// The audit role.
    pub fn role(&self) -> &'static str {
        match self {
            Caller::Registry(_) => "registry",
            Caller::Centre(_) => "centre",
            Caller::Office { .. } => "office",
        }
    }

    /// The office an office client is bound to.
    pub fn office(&self) -> Option<&str> {
        match self {
            Caller::Office { office, .. } => Some(office),
            _ => None,
        }
    }

    /// Refuses (403) unless the caller may act at pickup office `office`: an office client of
    /// that office, or a centre client. Registry clients never act at offices.
    pub fn require_office(&self, office: &str) -> Result<(), OfficeError> {
        match self {
            Caller::Centre(_) => Ok(()),
            Caller::Office { office: own, .. } if own == office => Ok(()),
            Caller::Office { office: own, .. } => Err(OfficeError::Forbidden(format!(
                "this client acts for office {own}, not {office}"
            ))),
            Caller::Registry(_) => Err(OfficeError::Forbidden(
                "registry clients cannot act at pickup offices".into(),
            )),
        }
    }

    /// Refuses (403) office clients: pickup-office changes are for the registry and the centre.
    pub fn require_registry_or_centre(&self) -> Result<(), OfficeError> {
        match self {
            Caller::Office { .. } => Err(OfficeError::Forbidden(
                "office clients cannot change a pickup office; the registry or the centre does"
                    .into(),
            )),
            _ => Ok(()),
        }
    }
}

/// A delivery API client as listed (never its token).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ApiClient {
    /// Name.
    pub name: String,
    /// Bound office; `None`: centre-wide.
    pub office_code: Option<String>,
    /// Who created it.
    pub created_by: String,
    /// When.
    pub created_at: String,
    /// When it was revoked.
    pub revoked_at: Option<String>,
}

/// A newly created client and its token (shown once).
#[derive(Clone)]
pub struct NewClient {
    /// Name.
    pub name: String,
    /// Bound office; `None`: centre-wide.
    pub office_code: Option<String>,
    /// The bearer token. Not stored anywhere; print it once.
    pub token: String,
}

impl std::fmt::Debug for NewClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewClient")
            .field("name", &self.name)
            .field("office_code", &self.office_code)
            .finish_non_exhaustive()
    }
}

fn check_name(name: &str) -> Result<(), OfficeError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
    {
        return Err(OfficeError::BadRequest(
            "name: must be 1–64 of a-z, 0-9, '-', '_' or '.'".into(),
        ));
    }
    Ok(())
}

/// A fresh random token (256 bits, URL-safe).
fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!(
        "cpo_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Creates a client bound to `office` (`None`: centre-wide); `by` = (actor, role) for the
/// audit log. Returns the token, which exists nowhere else.
pub async fn add(
    delivery: &Delivery,
    services: &Services,
    name: &str,
    office: Option<&str>,
    by: (&str, &str),
) -> Result<NewClient, OfficeError> {
    check_name(name)?;
    if let Some(code) = office {
        delivery.ensure_offices(services).await?;
        if offices::get(&services.store, code).await?.is_none() {
            return Err(OfficeError::BadRequest(format!(
                "office: {code:?} is not in the offices register"
            )));
        }
    }
    let token = new_token();
    let now = services.clock.now();
    let mut tx = services.store.begin().await?;
    let taken = sqlx::query("SELECT 1 AS x FROM delivery_api_clients WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
    if taken.is_some() {
        return Err(OfficeError::Conflict(format!(
            "a delivery API client named {name} exists (revoked clients keep their name)"
        )));
    }
    sqlx::query(
        "INSERT INTO delivery_api_clients (name, office_code, token_sha256, created_by, created_at)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(name)
    .bind(office)
    .bind(hash_token(&token))
    .bind(by.0)
    .bind(to_rfc3339(now))
    .execute(&mut *tx)
    .await?;
    audit::record_in(
        &mut tx,
        now,
        &AuditEvent {
            actor: by.0,
            role: by.1,
            action: "delivery.api_client_add",
            subject: name,
            details: json!({ "office": office, "centre_wide": office.is_none() }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(NewClient {
        name: name.to_owned(),
        office_code: office.map(str::to_owned),
        token,
    })
}

/// Every client (revoked ones too), by name.
pub async fn list(services: &Services) -> Result<Vec<ApiClient>, OfficeError> {
    let rows = sqlx::query(
        "SELECT name, office_code, created_by, created_at, revoked_at
         FROM delivery_api_clients ORDER BY name",
    )
    .fetch_all(services.store.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ApiClient {
                name: r.try_get("name")?,
                office_code: r.try_get("office_code")?,
                created_by: r.try_get("created_by")?,
                created_at: r.try_get("created_at")?,
                revoked_at: r.try_get("revoked_at")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Into::into)
}

/// Revokes client `name` (its token stops working at once); audited.
pub async fn revoke(services: &Services, name: &str, by: (&str, &str)) -> Result<(), OfficeError> {
    let now = services.clock.now();
    let mut tx = services.store.begin().await?;
    let done = sqlx::query(
        "UPDATE delivery_api_clients SET revoked_at = $1, revoked_by = $2
         WHERE name = $3 AND revoked_at IS NULL",
    )
    .bind(to_rfc3339(now))
    .bind(by.0)
    .bind(name)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        return Err(OfficeError::NotFound(format!(
            "active delivery API client {name}"
        )));
    }
    audit::record_in(
        &mut tx,
        now,
        &AuditEvent {
            actor: by.0,
            role: by.1,
            action: "delivery.api_client_revoke",
            subject: name,
            details: json!({}),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The caller a bearer token belongs to: a `[registry]` client (constant-time digest
/// comparison, the registry API's code), else an active delivery API client (looked up by
/// the token's SHA-256; the digest of a 256-bit random token leaks nothing by timing).
pub async fn authenticate(
    services: &Services,
    registry: &RegistryConfig,
    token: &str,
) -> Result<Option<Caller>, OfficeError> {
    if token.is_empty() {
        return Ok(None);
    }
    if let Some(name) = registry.client_for_token(token) {
        return Ok(Some(Caller::Registry(name.to_owned())));
    }
    let row = sqlx::query(
        "SELECT name, office_code FROM delivery_api_clients
         WHERE token_sha256 = $1 AND revoked_at IS NULL",
    )
    .bind(hash_token(token))
    .fetch_optional(services.store.pool())
    .await?;
    Ok(match row {
        None => None,
        Some(r) => {
            let client: String = r.try_get("name")?;
            match r.try_get::<Option<String>, _>("office_code")? {
                Some(office) => Some(Caller::Office { client, office }),
                None => Some(Caller::Centre(client)),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn office_clients_act_only_for_their_office() {
        let a = Caller::Office {
            client: "teh1".into(),
            office: "TEH-001".into(),
        };
        assert!(a.require_office("TEH-001").is_ok());
        assert!(matches!(
            a.require_office("TEH-002"),
            Err(OfficeError::Forbidden(_))
        ));
        assert!(a.require_registry_or_centre().is_err());
        let centre = Caller::Centre("hq".into());
        assert!(centre.require_office("TEH-002").is_ok());
        assert!(centre.require_registry_or_centre().is_ok());
        let registry = Caller::Registry("nocr".into());
        assert!(registry.require_office("TEH-001").is_err());
        assert!(registry.require_registry_or_centre().is_ok());
        assert_eq!(a.label(), "office-client:teh1");
        assert!(check_name("Bad Name").is_err());
        assert!(check_name("teh-001.desk").is_ok());
        let t = new_token();
        assert!(t.starts_with("cpo_") && t.len() > 40);
        assert_ne!(t, new_token());
    }
}
