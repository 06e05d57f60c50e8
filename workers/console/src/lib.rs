//! # cardpipe-console
//!
//! The operator console and the operations behind `cardpipe ops`:
//!
//! * [`auth`]: operators and roles (operator, supervisor, auditor), argon2id passwords,
//!   database sessions, the login rate limit, the first supervisor `admin`;
//! * [`data`]: what operators look at (overview, batches, applications, adjudications,
//!   encoders, stock and shipments when those tables exist);
//! * [`actions`]: what operators do (retry / drop / force-fail parked work, adjudicate a
//!   possible duplicate, take an encoder out of service) — role-checked and audited;
//! * [`web`]: the server-rendered console under `/console/` (no scripts, no CDN, inline CSS);
//! * [`html`]: the page frame, tables, flash messages and Persian text;
//! * [`i18n`]: the two languages (Persian, the default, and English), digits and dates;
//! * [`dashboard`]: the dashboard's charts, drawn server-side as SVG.
//!
//! The HTML is built with the [`maud`] template engine (`html!` to `Markup`), so every value
//! from data is escaped by construction; only the fixed inline stylesheet is pre-escaped.
//!
//! `cardpipe serve` and `cardpipe run` serve it (workers/cardpipe/src/stages.rs `routes`).

pub mod actions;
pub mod auth;
pub mod dashboard;
pub mod data;
pub mod html;
pub mod i18n;
pub mod web;

use std::sync::Arc;
use std::time::Duration;

use cardpipe_card::farm::Farm;
use cardpipe_common::config::LoadedConfig;
use cardpipe_common::runtime::Services;
use serde::Deserialize;

/// The configuration section.
pub const SECTION: &str = "console";

/// `[console]` in pipeline.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Sign-in attempts allowed per login within the window; past it the login is locked for
    /// the rest of the window (a successful sign-in resets the count).
    pub login_max_failures: usize,
    /// Sign-in attempts allowed per client address within the window.
    pub login_max_attempts_per_address: usize,
    /// The window, seconds.
    pub login_window_seconds: u64,
    /// Password checks (argon2id, 19 MiB each) run at once per process; a sign-in that waits
    /// more than 5 s for one is refused as busy.
    pub login_concurrent_checks: usize,
    /// Mark cookies `Secure` (set when the console is served over HTTPS).
    pub secure_cookies: bool,
    /// Create the first supervisor `admin` when no operator exists.
    pub create_admin: bool,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            login_max_failures: 5,
            login_max_attempts_per_address: 50,
            login_window_seconds: 900,
            login_concurrent_checks: 4,
            secure_cookies: false,
            create_admin: true,
        }
    }
}

impl ConsoleConfig {
    /// The sign-in limits of this configuration.
    pub fn login_limits(&self) -> auth::LoginLimits {
        auth::LoginLimits {
            per_login: self.login_max_failures,
            per_address: self.login_max_attempts_per_address,
            window: Duration::from_secs(self.login_window_seconds),
            concurrent_checks: self.login_concurrent_checks,
        }
    }

    /// Reads `[console]` (defaults when the section is absent).
    pub fn load(config: &LoadedConfig) -> anyhow::Result<Self> {
        match config.section::<Self>(SECTION) {
            Ok(c) => Ok(c),
            Err(errors)
                if errors
                    .iter()
                    .all(|e| e.key == SECTION && e.message.contains("missing")) =>
            {
                Ok(Self::default())
            }
            Err(errors) => anyhow::bail!("{}", cardpipe_common::config::describe(&errors)),
        }
    }
}

/// Creates the first supervisor if the store has no operator yet (see
/// [`auth::ensure_admin`]; the password goes to `<data_dir>/console-admin-password`). A
/// process serving the console awaits this before it listens, so the password file exists
/// by the time anyone can reach the login page.
pub async fn prepare(
    services: &Services,
    config: &ConsoleConfig,
    data_dir: &std::path::Path,
) -> Result<(), auth::AuthError> {
    if !config.create_admin {
        return Ok(());
    }
    // A store busy with another writer (SQLite, another replica starting) is worth a few
    // short retries; a real failure is reported after the last.
    let mut attempt = 0u32;
    loop {
        match auth::ensure_admin(services, data_dir).await {
            Ok(_) => return Ok(()),
            Err(auth::AuthError::Store(e)) if attempt < 5 => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "store busy creating the first supervisor; retrying");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The console router for a process (call [`prepare`] first).
pub fn router(
    services: Services,
    config: &ConsoleConfig,
    stages: Vec<String>,
    farm: Option<Arc<Farm>>,
) -> axum::Router {
    let guard = auth::LoginGuard::new(&services, config.login_limits());
    web::router(web::ConsoleState {
        services,
        stages,
        farm,
        guard,
        secure_cookies: config.secure_cookies,
    })
}
