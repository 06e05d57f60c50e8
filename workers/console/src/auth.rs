//! Operators, roles, passwords, sessions and the login rate limit.
//!
//! * Passwords are stored as argon2id PHC strings (`$argon2id$v=19$...`), never in clear.
//! * A session is a random 256-bit token in an `HttpOnly; SameSite=Strict` cookie; the
//!   database keeps only its SHA-256, the login, a per-session CSRF token and the expiry.
//! * The first supervisor, `admin`, is created at start when no operator exists, with a random
//!   password written to `<data_dir>/console-admin-password` (mode 0600). It is never logged.
//! * Failed logins count per login in a sliding window; past the limit the login is refused
//!   (even with the right password) until the window passes. Every failure increments
//!   `cardpipe_console_login_failures_total{reason}`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use cardpipe_common::audit::{self, AuditEvent};
use cardpipe_common::clock::{from_rfc3339, to_rfc3339};
use cardpipe_common::runtime::Services;
use cardpipe_common::store::{Store, StoreError};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rand::{Rng, RngCore};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;
use time::OffsetDateTime;

/// The first supervisor's login.
pub const ADMIN_LOGIN: &str = "admin";
/// The file beside the data holding the first supervisor's password.
pub const ADMIN_PASSWORD_FILE: &str = "console-admin-password";

/// What an operator may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Watches, retries parked work, clears possible duplicates, takes encoders out of service.
    Operator,
    /// Everything an operator does, plus the sensitive actions (confirm a duplicate, drop or
    /// force-fail parked work) and the audit log.
    Supervisor,
    /// Reads everything, including the audit log; changes nothing.
    Auditor,
}

impl Role {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Supervisor => "supervisor",
            Role::Auditor => "auditor",
        }
    }

    /// Parses a stored or typed role name.
    pub fn parse(text: &str) -> Result<Self, AuthError> {
        match text {
            "operator" => Ok(Role::Operator),
            "supervisor" => Ok(Role::Supervisor),
            "auditor" => Ok(Role::Auditor),
            other => Err(AuthError::BadInput(format!(
                "role must be operator, supervisor or auditor, got {other:?}"
            ))),
        }
    }

    /// May take operator actions (retry, clear, take encoders out of service).
    pub fn can_act(self) -> bool {
        matches!(self, Role::Operator | Role::Supervisor)
    }

    /// May take sensitive actions.
    pub fn is_supervisor(self) -> bool {
        self == Role::Supervisor
    }

    /// May read the audit log.
    pub fn can_audit(self) -> bool {
        matches!(self, Role::Supervisor | Role::Auditor)
    }
}

/// An authenticated operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    /// Login.
    pub login: String,
    /// Role.
    pub role: Role,
}

impl Operator {
    /// Fails with [`AuthError::Forbidden`] unless the operator may act.
    pub fn require_act(&self, what: &str) -> Result<(), AuthError> {
        if self.role.can_act() {
            Ok(())
        } else {
            Err(AuthError::Forbidden(format!(
                "{what} needs an operator or supervisor; {} is an {}",
                self.login,
                self.role.as_str()
            )))
        }
    }

    /// Fails with [`AuthError::Forbidden`] unless the operator is a supervisor.
    pub fn require_supervisor(&self, what: &str) -> Result<(), AuthError> {
        if self.role.is_supervisor() {
            Ok(())
        } else {
            Err(AuthError::Forbidden(format!(
                "{what} needs a supervisor; {} is an {}",
                self.login,
                self.role.as_str()
            )))
        }
    }
}

/// Authentication and authorisation failures.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Input that cannot be accepted (named).
    #[error("{0}")]
    BadInput(String),
    /// Wrong login or password (deliberately not saying which).
    #[error("wrong login or password")]
    BadCredentials,
    /// Too many failures for this login.
    #[error("too many failed logins for this account; try again in {0} seconds")]
    RateLimited(u64),
    /// The role does not allow the action.
    #[error("{0}")]
    Forbidden(String),
    /// The operator already exists.
    #[error("operator {0} already exists")]
    Exists(String),
    /// No such operator.
    #[error("no operator {0}")]
    Unknown(String),
    /// Store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Hashing failure.
    #[error("password hashing: {0}")]
    Hash(String),
}

impl From<sqlx::Error> for AuthError {
    fn from(e: sqlx::Error) -> Self {
        AuthError::Store(StoreError::Database(e))
    }
}

/// Checks a login name: 1..=64 of `[a-z0-9._-]` (lower case).
pub fn check_login(login: &str) -> Result<(), AuthError> {
    if login.is_empty()
        || login.len() > 64
        || !login
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Err(AuthError::BadInput(
            "login must be 1..=64 characters of a-z, 0-9, '.', '_' or '-'".into(),
        ));
    }
    Ok(())
}

/// Checks a new password: at least 12 characters.
pub fn check_password(password: &str) -> Result<(), AuthError> {
    if password.chars().count() < 12 {
        return Err(AuthError::BadInput(
            "password must be at least 12 characters".into(),
        ));
    }
    if password.len() > 1024 {
        return Err(AuthError::BadInput(
            "password must be at most 1024 bytes".into(),
        ));
    }
    Ok(())
}

/// Hashes a password with argon2id (default parameters: 19 MiB, 2 passes).
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| AuthError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// True when `password` matches the PHC `hash`.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A random password of `len` letters and digits.
pub fn random_password(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Adds an operator (hashing off the async threads) and audits it as done by `by`.
pub async fn add_operator(
    services: &Services,
    login: &str,
    role: Role,
    password: &str,
    by: (&str, &str),
) -> Result<(), AuthError> {
    check_login(login)?;
    check_password(password)?;
    let password = password.to_owned();
    let hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| AuthError::Hash(e.to_string()))??;
    let now = services.clock.now();
    let mut tx = services.store.begin().await?;
    let exists = sqlx::query("SELECT login FROM operators WHERE login = $1")
        .bind(login)
        .fetch_optional(&mut *tx)
        .await?;
    if exists.is_some() {
        return Err(AuthError::Exists(login.to_owned()));
    }
    sqlx::query(
        "INSERT INTO operators (login, role, password_hash, disabled, created_at, password_changed_at)
         VALUES ($1, $2, $3, 0, $4, $4)",
    )
    .bind(login)
    .bind(role.as_str())
    .bind(&hash)
    .bind(to_rfc3339(now))
    .execute(&mut *tx)
    .await?;
    audit::record_in(
        &mut tx,
        now,
        &AuditEvent {
            actor: by.0,
            role: by.1,
            action: "operator.add",
            subject: login,
            details: serde_json::json!({ "role": role.as_str() }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The operator with this login, when enabled.
pub async fn operator(store: &Store, login: &str) -> Result<Option<Operator>, AuthError> {
    let row = sqlx::query("SELECT login, role FROM operators WHERE login = $1 AND disabled = 0")
        .bind(login)
        .fetch_optional(store.pool())
        .await?;
    match row {
        Some(r) => Ok(Some(Operator {
            login: r.try_get("login")?,
            role: Role::parse(&r.try_get::<String, _>("role")?)?,
        })),
        None => Ok(None),
    }
}

/// Every operator (login, role, disabled).
pub async fn operators(store: &Store) -> Result<Vec<(String, Role, bool)>, AuthError> {
    let rows = sqlx::query("SELECT login, role, disabled FROM operators ORDER BY login")
        .fetch_all(store.pool())
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("login")?,
                Role::parse(&r.try_get::<String, _>("role")?)?,
                r.try_get::<i64, _>("disabled")? != 0,
            ))
        })
        .collect()
}

/// Creates the first supervisor `admin` when there is no operator at all, with a random
/// password written to `<data_dir>/console-admin-password` (mode 0600). Returns the file's
/// path when it created the account. The password is never logged.
pub async fn ensure_admin(
    services: &Services,
    data_dir: &Path,
) -> Result<Option<std::path::PathBuf>, AuthError> {
    let any = sqlx::query("SELECT COUNT(*) AS n FROM operators")
        .fetch_one(services.store.pool())
        .await?
        .try_get::<i64, _>("n")?;
    if any > 0 {
        return Ok(None);
    }
    let password = random_password(24);
    let path = data_dir.join(ADMIN_PASSWORD_FILE);
    // The file is written before the account exists and renamed into place after: a crash
    // in between never leaves an `admin` whose password nobody has.
    let pending = data_dir.join(format!("{ADMIN_PASSWORD_FILE}.{}", std::process::id()));
    write_private(&pending, &format!("{password}\n"))
        .map_err(|e| AuthError::BadInput(format!("cannot write {}: {e}", pending.display())))?;
    let created = add_operator(
        services,
        ADMIN_LOGIN,
        Role::Supervisor,
        &password,
        ("system:console", "system"),
    )
    .await;
    match created {
        Ok(()) => {}
        // Another replica created it first: its password file is the one that counts.
        Err(AuthError::Exists(_)) => {
            let _ = std::fs::remove_file(&pending);
            return Ok(None);
        }
        Err(e) => {
            let _ = std::fs::remove_file(&pending);
            return Err(e);
        }
    }
    std::fs::rename(&pending, &path)
        .map_err(|e| AuthError::BadInput(format!("cannot write {}: {e}", path.display())))?;
    tracing::info!(path = %path.display(), "created the first console supervisor `admin`; its password is in this file");
    Ok(Some(path))
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(contents.as_bytes())
}

/// A signed-in session.
#[derive(Debug, Clone)]
pub struct Session {
    /// Who.
    pub operator: Operator,
    /// The form token of this session.
    pub csrf: String,
}

/// Session lifetime.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);

/// Starts a session; returns the cookie token (only the browser keeps it).
pub async fn start_session(
    store: &Store,
    login: &str,
    now: OffsetDateTime,
) -> Result<(String, Session), AuthError> {
    let token = random_token();
    let csrf = random_token();
    let expires = now + SESSION_TTL;
    sqlx::query("DELETE FROM console_sessions WHERE expires_at < $1")
        .bind(to_rfc3339(now))
        .execute(store.pool())
        .await?;
    sqlx::query(
        "INSERT INTO console_sessions (token_hash, login, csrf, created_at, expires_at)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(token_hash(&token))
    .bind(login)
    .bind(&csrf)
    .bind(to_rfc3339(now))
    .bind(to_rfc3339(expires))
    .execute(store.pool())
    .await?;
    let operator = operator(store, login)
        .await?
        .ok_or_else(|| AuthError::Unknown(login.to_owned()))?;
    Ok((token, Session { operator, csrf }))
}

/// The live session of a cookie token, if any.
pub async fn session(
    store: &Store,
    token: &str,
    now: OffsetDateTime,
) -> Result<Option<Session>, AuthError> {
    if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let row = sqlx::query(
        "SELECT s.login, s.csrf, s.expires_at, o.role FROM console_sessions s
         JOIN operators o ON o.login = s.login
         WHERE s.token_hash = $1 AND o.disabled = 0",
    )
    .bind(token_hash(token))
    .fetch_optional(store.pool())
    .await?;
    let Some(row) = row else { return Ok(None) };
    let expires: String = row.try_get("expires_at")?;
    if from_rfc3339(&expires).map(|e| e <= now).unwrap_or(true) {
        return Ok(None);
    }
    Ok(Some(Session {
        operator: Operator {
            login: row.try_get("login")?,
            role: Role::parse(&row.try_get::<String, _>("role")?)?,
        },
        csrf: row.try_get("csrf")?,
    }))
}

/// Ends a session.
pub async fn end_session(store: &Store, token: &str) -> Result<(), AuthError> {
    sqlx::query("DELETE FROM console_sessions WHERE token_hash = $1")
        .bind(token_hash(token))
        .execute(store.pool())
        .await?;
    Ok(())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The login rate limit and its failure counter.
#[derive(Clone)]
pub struct LoginGuard {
    failures: Arc<Mutex<HashMap<String, Vec<OffsetDateTime>>>>,
    /// Failures allowed in the window.
    pub max_failures: usize,
    /// The window.
    pub window: Duration,
    counter: Family<ReasonLabel, Counter>,
}

impl std::fmt::Debug for LoginGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginGuard")
            .field("max_failures", &self.max_failures)
            .field("window", &self.window)
            .finish()
    }
}

impl LoginGuard {
    /// A guard allowing `max_failures` per login per `window`, registering
    /// `cardpipe_console_login_failures_total` in the services' metrics.
    pub fn new(services: &Services, max_failures: usize, window: Duration) -> Self {
        let counter = Family::<ReasonLabel, Counter>::default();
        services.metrics.register(|r| {
            r.register(
                "console_login_failures",
                "Failed console logins (reason = bad_credentials | rate_limited)",
                counter.clone(),
            )
        });
        Self {
            failures: Arc::default(),
            max_failures: max_failures.max(1),
            window,
            counter,
        }
    }

    /// Failures counted so far with `reason`.
    pub fn failures_total(&self, reason: &'static str) -> u64 {
        self.counter.get_or_create(&ReasonLabel { reason }).get()
    }

    /// Checks `login`/`password`; counts failures and enforces the limit.
    pub async fn login(
        &self,
        store: &Store,
        login: &str,
        password: &str,
        now: OffsetDateTime,
    ) -> Result<Operator, AuthError> {
        let key = login.trim().to_ascii_lowercase();
        {
            let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            let list = map.entry(key.clone()).or_default();
            list.retain(|t| *t + self.window > now);
            if list.len() >= self.max_failures {
                let wait = (list[0] + self.window - now).whole_seconds().max(1) as u64;
                self.counter
                    .get_or_create(&ReasonLabel {
                        reason: "rate_limited",
                    })
                    .inc();
                return Err(AuthError::RateLimited(wait));
            }
        }
        let row = sqlx::query(
            "SELECT login, role, password_hash FROM operators WHERE login = $1 AND disabled = 0",
        )
        .bind(&key)
        .fetch_optional(store.pool())
        .await?;
        let (hash, found) = match &row {
            Some(r) => (r.try_get::<String, _>("password_hash")?, true),
            // Verify against a fixed hash anyway so timing does not reveal unknown logins.
            None => (DUMMY_HASH.to_owned(), false),
        };
        let candidate = password.to_owned();
        let ok = tokio::task::spawn_blocking(move || verify_password(&candidate, &hash))
            .await
            .unwrap_or(false);
        if ok && found {
            let row = row.expect("found");
            self.failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            return Ok(Operator {
                login: row.try_get("login")?,
                role: Role::parse(&row.try_get::<String, _>("role")?)?,
            });
        }
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .push(now);
        self.counter
            .get_or_create(&ReasonLabel {
                reason: "bad_credentials",
            })
            .inc();
        Err(AuthError::BadCredentials)
    }
}

/// argon2id hash of a random string nobody knows (for constant-time unknown-login checks).
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0n6bQ5cQ0w0Yh5s1v8nXq3i4r0pN7N2b3W9eJj6s9mE";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_with_argon2id_and_verify() {
        let h = hash_password("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$v=19$"), "{h}");
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("correct horse batterY", &h));
        assert!(!verify_password("anything", DUMMY_HASH));
        assert!(!verify_password("anything", "not a hash"));
    }

    #[test]
    fn logins_and_roles_are_checked() {
        assert!(check_login("ops.sara-1").is_ok());
        assert!(check_login("Admin").is_err());
        assert!(check_login("").is_err());
        assert!(check_password("short").is_err());
        assert_eq!(Role::parse("auditor").unwrap(), Role::Auditor);
        let err = Role::parse("root").unwrap_err().to_string();
        assert!(err.contains("\"root\""), "{err}");
        assert!(!Role::Auditor.can_act());
        assert!(Role::Auditor.can_audit());
        assert!(!Role::Operator.can_audit());
        assert!(Role::Supervisor.is_supervisor());
        assert_eq!(random_password(24).len(), 24);
    }
}
