//! Who is at the keyboard: command-line actions that need a role authenticate the operator
//! they name with `--as LOGIN` (or `--operator LOGIN`), instead of taking the login on trust.
//!
//! * `cardpipe login LOGIN` checks the password (asked at the terminal, or one line on
//!   standard input when it is not a terminal) under the console's sign-in limits, starts a
//!   session in the store (the same sessions as the console: 8 hours, ended by `logout`, by
//!   disabling the operator or by a password reset) and keeps its token in the token file.
//! * The token file (`$CARDPIPE_TOKEN_FILE`, else `$XDG_CONFIG_HOME/cardpipe/sessions.json`,
//!   else `~/.config/cardpipe/sessions.json`) is created with mode 0600 and refused when
//!   anyone else may read it. It holds one session per login, so two people at one terminal
//!   can each sign in for a two-person action — each with their own password.
//! * An action naming a login without a live session asks for the password at the terminal;
//!   without a terminal it fails, saying to run `cardpipe login` first.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;

use cardpipe_common::audit::{self, AuditEvent};
use cardpipe_common::clock::{from_rfc3339, to_rfc3339};
use cardpipe_common::config::LoadedConfig;
use cardpipe_common::runtime::Services;
use cardpipe_console::ConsoleConfig;
use cardpipe_console::auth::{self, LoginGuard, Operator};
use serde::{Deserialize, Serialize};

/// One stored session.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSession {
    token: String,
    expires_at: String,
}

/// The token file's contents: sessions by login.
#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    sessions: BTreeMap<String, StoredSession>,
}

/// Where the token file is.
pub fn token_file_path() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("CARDPIPE_TOKEN_FILE").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|p| !p.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").ok_or_else(|| {
            anyhow::anyhow!(
                "neither CARDPIPE_TOKEN_FILE nor HOME is set: no place for the token file"
            )
        })?)
        .join(".config"),
    };
    Ok(base.join("cardpipe").join("sessions.json"))
}

fn read_tokens() -> anyhow::Result<TokenFile> {
    let path = token_file_path()?;
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TokenFile::default()),
        Err(e) => anyhow::bail!("reading the token file {}: {e}", path.display()),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)?.permissions().mode();
        if mode & 0o077 != 0 {
            anyhow::bail!(
                "the token file {} may be read by others (mode {:o}); remove it and run `cardpipe login` again",
                path.display(),
                mode & 0o777
            );
        }
    }
    serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "the token file {} is not a cardpipe token file ({e}); remove it",
            path.display()
        )
    })
}

fn write_tokens(tokens: &TokenFile) -> anyhow::Result<()> {
    let path = token_file_path()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options
            .open(&tmp)
            .map_err(|e| anyhow::anyhow!("writing the token file {}: {e}", tmp.display()))?;
        std::io::Write::write_all(&mut file, serde_json::to_string_pretty(tokens)?.as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// Reads a password: at the terminal without echo, else one line of standard input.
fn read_password(login: &str) -> anyhow::Result<String> {
    if std::io::stdin().is_terminal() {
        return rpassword::prompt_password(format!("password for {login}: "))
            .map_err(|e| anyhow::anyhow!("reading the password: {e}"));
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| anyhow::anyhow!("reading the password from standard input: {e}"))?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

/// Checks `login`'s password under the console's sign-in limits.
async fn check_password(
    services: &Services,
    console: &ConsoleConfig,
    login: &str,
    password: &str,
) -> anyhow::Result<Operator> {
    let guard = LoginGuard::new(services, console.login_limits());
    let now = services.clock.now();
    match guard
        .login(&services.store, login, password, None, now)
        .await
    {
        Ok(op) => Ok(op),
        Err(e) => {
            let subject = if auth::check_login(login).is_ok() {
                login
            } else {
                "(invalid login)"
            };
            audit::record(
                &services.store,
                services.clock.as_ref(),
                &AuditEvent {
                    actor: subject,
                    role: "anonymous",
                    action: "cli.login_failed",
                    subject,
                    details: serde_json::json!({ "reason": e.to_string() }),
                },
            )
            .await?;
            anyhow::bail!("{login}: {e}")
        }
    }
}

/// `cardpipe login LOGIN`: checks the password and keeps a session token in the token file.
pub async fn login(
    services: &Services,
    console: &ConsoleConfig,
    login: &str,
) -> anyhow::Result<()> {
    let login = login.trim().to_ascii_lowercase();
    let password = read_password(&login)?;
    let op = check_password(services, console, &login, &password).await?;
    let now = services.clock.now();
    let (token, _session) = auth::start_session(&services.store, &op.login, now).await?;
    let expires = now + auth::SESSION_TTL;
    let mut tokens = read_tokens()?;
    tokens.sessions.insert(
        op.login.clone(),
        StoredSession {
            token,
            expires_at: to_rfc3339(expires),
        },
    );
    write_tokens(&tokens)?;
    audit::record(
        &services.store,
        services.clock.as_ref(),
        &AuditEvent {
            actor: &op.login,
            role: op.role.as_str(),
            action: "cli.login",
            subject: &op.login,
            details: serde_json::json!({ "expires_at": to_rfc3339(expires) }),
        },
    )
    .await?;
    println!(
        "signed in as {} ({}) until {} UTC; token in {}",
        op.login,
        op.role.as_str(),
        to_rfc3339(expires),
        token_file_path()?.display()
    );
    Ok(())
}

/// `cardpipe logout [LOGIN]`: ends the session(s) in the store and removes them from the
/// token file (every login in it when none is named).
pub async fn logout(services: &Services, login: Option<&str>) -> anyhow::Result<()> {
    let mut tokens = read_tokens()?;
    let logins: Vec<String> = match login {
        Some(l) => vec![l.trim().to_ascii_lowercase()],
        None => tokens.sessions.keys().cloned().collect(),
    };
    for login in logins {
        let Some(stored) = tokens.sessions.remove(&login) else {
            println!("{login}: not signed in here");
            continue;
        };
        auth::end_session(&services.store, &stored.token).await?;
        let role = auth::operator(&services.store, &login)
            .await?
            .map_or("operator", |o| o.role.as_str());
        audit::record(
            &services.store,
            services.clock.as_ref(),
            &AuditEvent {
                actor: &login,
                role,
                action: "cli.logout",
                subject: &login,
                details: serde_json::json!({}),
            },
        )
        .await?;
        println!("{login}: signed out");
    }
    write_tokens(&tokens)?;
    Ok(())
}

/// The operator `login`, authenticated: by a live session in the token file, else by the
/// password asked at the terminal. `flag` names the option in errors (`--as`, `--operator`).
pub async fn authenticate(
    services: &Services,
    loaded: &LoadedConfig,
    login: &str,
    flag: &str,
) -> anyhow::Result<Operator> {
    let login = login.trim().to_ascii_lowercase();
    let now = services.clock.now();
    let tokens = read_tokens()?;
    if let Some(stored) = tokens.sessions.get(&login) {
        let live = from_rfc3339(&stored.expires_at).is_ok_and(|e| e > now);
        if live
            && let Some(session) = auth::session(&services.store, &stored.token, now).await?
            && session.operator.login == login
        {
            return Ok(session.operator);
        }
    }
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "{flag} {login}: not signed in (or the session ended); run `cardpipe login {login}` first"
        );
    }
    let password = read_password(&login)?;
    check_password(services, &ConsoleConfig::load(loaded)?, &login, &password).await
}
