//! Operators, roles, passwords, sessions and the login rate limit.
//!
//! * Passwords are stored as argon2id PHC strings (`$argon2id$v=19$...`), never in clear.
//! * A session is a random 256-bit token in an `HttpOnly; SameSite=Strict` cookie; the
//!   database keeps only its SHA-256, the login, a per-session CSRF token and the expiry.
//! * The first supervisor, `admin`, is created at start when no operator exists, with a random
//!   password written to `<data_dir>/console-admin-password` (mode 0600). It is never logged.
//! * Sign-in attempts are limited per login and per client address within a window, in the
//!   store (table `sign_in_limits`), so every replica shares the count. An attempt is
//!   reserved atomically BEFORE its password is checked: parallel guesses never get more
//!   checks than the limit. Past it the login is refused (even with the right password)
//!   until the window passes; a successful sign-in gives its reservations back. At most
//!   `login_concurrent_checks` argon2id checks (19 MiB each) run at once per process; a
//!   sign-in that cannot get one within a few seconds is refused as busy. Every refusal
//!   increments `cardpipe_console_login_failures_total{reason}`.

use std::path::Path;
use std::sync::Arc;
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
    /// Too many attempts for this login or from this address.
    #[error("too many failed logins for this account; try again in {0} seconds")]
    RateLimited(u64),
    /// Too many sign-ins are being checked at once.
    #[error("too many sign-ins are being checked at once; try again in a few seconds")]
    Busy,
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

/// [`verify_password`] in a password-check thread's kept working memory (`memory`, owned by
/// the thread): a 19 MiB block allocated and freed per check raised glibc's mmap threshold
/// and then fragmented the heap (a flood of sign-ins grew the process by hundreds of MiB);
/// reused, the memory stays one block per password-check thread. Constant-time comparison
/// of the derived output.
fn verify_password_reusing_memory(
    password: &str,
    hash: &str,
    memory: &mut Vec<argon2::Block>,
) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let (Ok(algorithm), Ok(params)) = (
        argon2::Algorithm::try_from(parsed.algorithm),
        argon2::Params::try_from(&parsed),
    ) else {
        return false;
    };
    let version = match parsed.version.map(argon2::Version::try_from) {
        None => argon2::Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let mut out = vec![0u8; expected.len()];
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, argon2::Block::default());
    }
    let hashed = Argon2::new(algorithm, version, params).hash_password_into_with_memory(
        password.as_bytes(),
        salt,
        &mut out,
        &mut memory[..blocks],
    );
    hashed.is_ok()
        && bool::from(subtle::ConstantTimeEq::ct_eq(
            out.as_slice(),
            expected.as_bytes(),
        ))
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

/// Disables (`true`) or enables an operator, audited as done by `by` (login, role; the
/// caller has checked that it is a supervisor). Disabling ends the operator's sessions at
/// once (console and command line) and refuses to disable the last enabled supervisor, so
/// the centre can never lock itself out.
pub async fn set_operator_disabled(
    services: &Services,
    login: &str,
    disabled: bool,
    reason: &str,
    by: (&str, &str),
) -> Result<(), AuthError> {
    let now = services.clock.now();
    let mut tx = services.store.begin().await?;
    let row = sqlx::query("SELECT role, disabled FROM operators WHERE login = $1")
        .bind(login)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| AuthError::Unknown(login.to_owned()))?;
    let role = Role::parse(&row.try_get::<String, _>("role")?)?;
    if (row.try_get::<i64, _>("disabled")? != 0) == disabled {
        return Err(AuthError::BadInput(format!(
            "operator {login} is already {}",
            if disabled { "disabled" } else { "enabled" }
        )));
    }
    if disabled && role.is_supervisor() {
        let others: i64 = sqlx::query(
            "SELECT COUNT(*) FROM operators WHERE role = 'supervisor' AND disabled = 0 AND login <> $1",
        )
        .bind(login)
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
        if others == 0 {
            return Err(AuthError::Forbidden(format!(
                "{login} is the last enabled supervisor; enable or add another first"
            )));
        }
    }
    sqlx::query("UPDATE operators SET disabled = $1 WHERE login = $2")
        .bind(i64::from(disabled))
        .bind(login)
        .execute(&mut *tx)
        .await?;
    if disabled {
        sqlx::query("DELETE FROM console_sessions WHERE login = $1")
            .bind(login)
            .execute(&mut *tx)
            .await?;
    }
    audit::record_in(
        &mut tx,
        now,
        &AuditEvent {
            actor: by.0,
            role: by.1,
            action: if disabled {
                "operator.disable"
            } else {
                "operator.enable"
            },
            subject: login,
            details: serde_json::json!({ "reason": reason }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Sets a new password for an operator (hashing off the async threads), ends the operator's
/// sessions and audits it as done by `by` (the caller has checked that it is a supervisor).
pub async fn reset_password(
    services: &Services,
    login: &str,
    password: &str,
    by: (&str, &str),
) -> Result<(), AuthError> {
    check_password(password)?;
    let password = password.to_owned();
    let hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| AuthError::Hash(e.to_string()))??;
    let now = services.clock.now();
    let mut tx = services.store.begin().await?;
    let done = sqlx::query(
        "UPDATE operators SET password_hash = $1, password_changed_at = $2 WHERE login = $3",
    )
    .bind(&hash)
    .bind(to_rfc3339(now))
    .bind(login)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        return Err(AuthError::Unknown(login.to_owned()));
    }
    sqlx::query("DELETE FROM console_sessions WHERE login = $1")
        .bind(login)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM sign_in_limits WHERE limit_key = $1")
        .bind(format!("login:{login}"))
        .execute(&mut *tx)
        .await?;
    audit::record_in(
        &mut tx,
        now,
        &AuditEvent {
            actor: by.0,
            role: by.1,
            action: "operator.reset_password",
            subject: login,
            details: serde_json::json!({}),
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

/// The sign-in limits and their refusal counter (see the module docs).
#[derive(Clone)]
pub struct LoginGuard {
    /// Attempts allowed per login within the window.
    pub max_failures: usize,
    /// Attempts allowed per client address within the window.
    pub max_per_address: usize,
    /// The window.
    pub window: Duration,
    /// Password checks allowed at once in this process.
    checks: Arc<tokio::sync::Semaphore>,
    /// The threads that run them (as many as the permits).
    checkers: CheckerPool,
    /// How long a sign-in waits for a password check slot before it is refused as busy.
    check_wait: Duration,
    /// Password checks run (argon2id evaluations, the dummy one for unknown logins included).
    evaluated: Counter,
    counter: Family<ReasonLabel, Counter>,
}

impl std::fmt::Debug for LoginGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginGuard")
            .field("max_failures", &self.max_failures)
            .field("max_per_address", &self.max_per_address)
            .field("window", &self.window)
            .finish()
    }
}

type CheckJob = Box<dyn FnOnce(&mut Vec<argon2::Block>) + Send>;

/// A few long-lived threads for password checks. argon2id allocates 19 MiB per check; on
/// tokio's blocking pool every new thread kept its own malloc arena with such a block in
/// it, so a flood left the process at hundreds of MiB. With as many threads as permits the
/// memory is bounded by `login_concurrent_checks` x 19 MiB.
#[derive(Clone)]
struct CheckerPool {
    jobs: std::sync::mpsc::Sender<CheckJob>,
}

impl CheckerPool {
    fn new(threads: usize) -> Self {
        let (jobs, queue) = std::sync::mpsc::channel::<CheckJob>();
        let queue = Arc::new(std::sync::Mutex::new(queue));
        for n in 0..threads {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("password-check-{n}"))
                .spawn(move || {
                    // This thread's argon2 working memory, reused by every check it runs.
                    let mut memory = Vec::new();
                    loop {
                        // The lock is held only while taking a job; the pool ends when
                        // every guard holding the sender is gone.
                        let job = match queue.lock() {
                            Ok(q) => q.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(&mut memory),
                            Err(_) => return,
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password-check thread");
            }
        }
        Self { jobs }
    }

    /// Queues `job`; if every thread is gone it runs here (never silently dropped).
    fn run(&self, job: CheckJob) {
        if let Err(std::sync::mpsc::SendError(job)) = self.jobs.send(job) {
            job(&mut Vec::new());
        }
    }
}

/// What [`LoginGuard::new`] takes.
#[derive(Debug, Clone, Copy)]
pub struct LoginLimits {
    /// Attempts allowed per login within the window.
    pub per_login: usize,
    /// Attempts allowed per client address within the window.
    pub per_address: usize,
    /// The window.
    pub window: Duration,
    /// Password checks at once in this process.
    pub concurrent_checks: usize,
}

impl LoginGuard {
    /// A guard with `limits`, registering `cardpipe_console_login_failures_total` and
    /// `cardpipe_console_password_checks_total` in the services' metrics.
    pub fn new(services: &Services, limits: LoginLimits) -> Self {
        let counter = Family::<ReasonLabel, Counter>::default();
        let evaluated = Counter::default();
        services.metrics.register(|r| {
            r.register(
                "console_login_failures",
                "Refused sign-ins (reason = bad_credentials | rate_limited | busy)",
                counter.clone(),
            );
            r.register(
                "console_password_checks",
                "Password checks (argon2id) run for sign-ins",
                evaluated.clone(),
            );
        });
        Self {
            max_failures: limits.per_login.max(1),
            max_per_address: limits.per_address.max(1),
            window: limits.window,
            checks: Arc::new(tokio::sync::Semaphore::new(limits.concurrent_checks.max(1))),
            checkers: CheckerPool::new(limits.concurrent_checks.max(1)),
            check_wait: Duration::from_secs(5),
            evaluated,
            counter,
        }
    }

    /// Refusals counted so far with `reason`.
    pub fn failures_total(&self, reason: &'static str) -> u64 {
        self.counter.get_or_create(&ReasonLabel { reason }).get()
    }

    /// Password checks run so far by this guard.
    pub fn checks_evaluated(&self) -> u64 {
        self.evaluated.get()
    }

    fn refuse(&self, reason: &'static str, error: AuthError) -> AuthError {
        self.counter.get_or_create(&ReasonLabel { reason }).inc();
        error
    }

    /// Checks `login`/`password` from `client` (the peer address, when known): reserves an
    /// attempt for the address and for the login, then checks the password.
    pub async fn login(
        &self,
        store: &Store,
        login: &str,
        password: &str,
        client: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<Operator, AuthError> {
        let key = login.trim().to_ascii_lowercase();
        let address_key =
            client.map(|c| format!("addr:{}", c.chars().take(64).collect::<String>()));
        if let Some(address_key) = &address_key
            && let Some(wait) = self
                .reserve(store, address_key, self.max_per_address, now)
                .await?
        {
            return Err(self.refuse("rate_limited", AuthError::RateLimited(wait)));
        }
        // A login that cannot exist is refused without a password check (the format rules
        // are public) and without a row of its own: the key space stays that of real logins.
        if check_login(&key).is_err() {
            return Err(self.refuse("bad_credentials", AuthError::BadCredentials));
        }
        let login_key = format!("login:{key}");
        if let Some(wait) = self
            .reserve(store, &login_key, self.max_failures, now)
            .await?
        {
            return Err(self.refuse("rate_limited", AuthError::RateLimited(wait)));
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
        let Ok(permit) =
            tokio::time::timeout(self.check_wait, self.checks.clone().acquire_owned()).await
        else {
            return Err(self.refuse("busy", AuthError::Busy));
        };
        let permit = permit.map_err(|_| self.refuse("busy", AuthError::Busy))?;
        self.evaluated.inc();
        let candidate = password.to_owned();
        let (done, verdict) = tokio::sync::oneshot::channel();
        self.checkers.run(Box::new(move |memory| {
            let ok = verify_password_reusing_memory(&candidate, &hash, memory);
            drop(permit);
            let _ = done.send(ok);
        }));
        let ok = verdict.await.unwrap_or(false);
        if ok && found {
            let row = row.expect("found");
            // The reservations of a successful sign-in are given back.
            sqlx::query("DELETE FROM sign_in_limits WHERE limit_key = $1")
                .bind(&login_key)
                .execute(store.pool())
                .await?;
            if let Some(address_key) = &address_key {
                sqlx::query(
                    "UPDATE sign_in_limits SET attempts = attempts - 1
                     WHERE limit_key = $1 AND attempts > 0",
                )
                .bind(address_key)
                .execute(store.pool())
                .await?;
            }
            return Ok(Operator {
                login: row.try_get("login")?,
                role: Role::parse(&row.try_get::<String, _>("role")?)?,
            });
        }
        Err(self.refuse("bad_credentials", AuthError::BadCredentials))
    }

    /// Counts one attempt for `key` (atomic in the store: an upsert that restarts the
    /// window once it has passed); `Some(seconds to wait)` when the attempt is past `max`.
    async fn reserve(
        &self,
        store: &Store,
        key: &str,
        max: usize,
        now: OffsetDateTime,
    ) -> Result<Option<u64>, AuthError> {
        let window = time::Duration::try_from(self.window).unwrap_or(time::Duration::HOUR);
        let cutoff = to_rfc3339(now - window);
        sqlx::query("DELETE FROM sign_in_limits WHERE window_start <= $1")
            .bind(&cutoff)
            .execute(store.pool())
            .await?;
        let row = sqlx::query(
            "INSERT INTO sign_in_limits (limit_key, window_start, attempts) VALUES ($1, $2, 1)
             ON CONFLICT (limit_key) DO UPDATE SET
               attempts = CASE WHEN sign_in_limits.window_start <= $3 THEN 1
                               ELSE sign_in_limits.attempts + 1 END,
               window_start = CASE WHEN sign_in_limits.window_start <= $3 THEN $2
                                   ELSE sign_in_limits.window_start END
             RETURNING attempts, window_start",
        )
        .bind(key)
        .bind(to_rfc3339(now))
        .bind(&cutoff)
        .fetch_one(store.pool())
        .await?;
        let attempts: i64 = row.try_get("attempts")?;
        if attempts <= i64::try_from(max).unwrap_or(i64::MAX) {
            return Ok(None);
        }
        let started: String = row.try_get("window_start")?;
        let wait = from_rfc3339(&started)
            .map(|s| (s + window - now).whole_seconds().max(1) as u64)
            .unwrap_or(self.window.as_secs());
        Ok(Some(wait))
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
        // The kept-memory check agrees with the library's, twice in one thread.
        let mut memory = Vec::new();
        for _ in 0..2 {
            assert!(verify_password_reusing_memory(
                "correct horse battery",
                &h,
                &mut memory
            ));
            assert!(!verify_password_reusing_memory(
                "correct horse batterY",
                &h,
                &mut memory
            ));
        }
        assert!(!verify_password_reusing_memory(
            "anything",
            DUMMY_HASH,
            &mut memory
        ));
        assert!(!verify_password_reusing_memory(
            "anything",
            "not a hash",
            &mut memory
        ));
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
