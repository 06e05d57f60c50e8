//! The store: PostgreSQL or SQLite through sqlx's Any driver, one SQL code path.
//!
//! The database is the source of truth. Everything a stage decides lands in ONE
//! transaction: the compare-and-set of the application's state, its history
//! row, its artifact keys and the outbox rows that announce the next step
//! (see [`StoreTx`]). Migrations for each backend live in `migrations/` at the
//! workspace root and are applied at start.
//!
//! SQL is written once for both backends (`$n` placeholders, RFC 3339 text
//! timestamps, `ON CONFLICT`); the few places that differ ask [`Dialect`].
//! On SQLite every write transaction begins with a write, so it takes the
//! write lock up front and waits (busy timeout) instead of failing on upgrade.

mod applications;
mod leases;
mod outbox;

pub use applications::{NewApplication, Transition};
pub use outbox::{DeadLetter, JOB_TOPIC, OutboxRow, claim_outbox_sql};

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{Any, AnyPool, Executor};

/// Which SQL database the store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// PostgreSQL (distributed mode).
    Postgres,
    /// SQLite (embedded mode).
    Sqlite,
}

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed or refused a statement.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// The URL names no supported database.
    #[error("unsupported database URL scheme in {0:?} (expected postgres:// or sqlite:)")]
    UnsupportedUrl(String),
    /// A stored value could not be read back.
    #[error("corrupt stored value in {table}.{column}: {message}")]
    Corrupt {
        /// Table.
        table: &'static str,
        /// Column.
        column: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The requested state change is not allowed by the state machine.
    #[error(transparent)]
    IllegalTransition(#[from] crate::domain::IllegalTransition),
    /// The row does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The schema is older than this build and this process may not migrate it.
    #[error(
        "the database schema is at migration {applied} but this cardpipe needs {needed}: run `cardpipe migrate` as the schema owner ([store] owner_url), or set [store] migrate_at_start = true"
    )]
    NotMigrated {
        /// Latest applied migration (0: none).
        applied: i64,
        /// Latest migration of this build.
        needed: i64,
    },
}

/// A transaction on the store.
pub type StoreTx = sqlx::Transaction<'static, Any>;

/// Handle to the database (cheap to clone).
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
}

/// The audit tables the services may only append to and read (PostgreSQL grants).
pub const AUDIT_TABLES: &str = "audit_log";

/// The PostgreSQL migrations, embedded at build time.
pub static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");
/// The SQLite migrations, embedded at build time.
pub static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

impl Store {
    /// Connects to `url` (`postgres://...` or `sqlite:path` / `sqlite://path`);
    /// a SQLite file is created if missing and put in WAL mode.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let dialect = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Dialect::Postgres
        } else if url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else {
            return Err(StoreError::UnsupportedUrl(redact_url(url)));
        };
        if dialect == Dialect::Sqlite {
            let path = url
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:");
            let path = path.split('?').next().unwrap_or("");
            if let Some(parent) = std::path::Path::new(path).parent()
                && !parent.as_os_str().is_empty()
                && !path.starts_with(':')
            {
                std::fs::create_dir_all(parent)
                    .map_err(|e| sqlx::Error::Configuration(Box::new(e)))?;
            }
        }
        let url = match dialect {
            Dialect::Sqlite if !url.contains('?') => format!("{url}?mode=rwc"),
            _ => url.to_owned(),
        };
        let options = AnyConnectOptions::from_str(&url)?;
        let mut pool = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(30));
        if dialect == Dialect::Sqlite {
            pool = pool.after_connect(|conn, _meta| {
                Box::pin(async move {
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    conn.execute("PRAGMA busy_timeout = 30000").await?;
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    Ok(())
                })
            });
        }
        let pool = pool.connect_with(options).await?;
        Ok(Self { pool, dialect })
    }

    /// Applies the migrations of this backend.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self.dialect {
            Dialect::Postgres => POSTGRES_MIGRATOR.run(&self.pool).await?,
            Dialect::Sqlite => SQLITE_MIGRATOR.run(&self.pool).await?,
        }
        Ok(())
    }

    fn migrator(&self) -> &'static sqlx::migrate::Migrator {
        match self.dialect {
            Dialect::Postgres => &POSTGRES_MIGRATOR,
            Dialect::Sqlite => &SQLITE_MIGRATOR,
        }
    }

    /// Checks, without changing anything, that every migration of this build is applied (for
    /// a process whose role may not change the schema: `[store] migrate_at_start = false`).
    pub async fn check_migrated(&self) -> Result<(), StoreError> {
        let latest = self.migrator().iter().map(|m| m.version).max().unwrap_or(0);
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success = TRUE")
                .fetch_one(&self.pool)
                .await
                .unwrap_or(None);
        match applied {
            Some(v) if v >= latest => Ok(()),
            v => Err(StoreError::NotMigrated {
                applied: v.unwrap_or(0),
                needed: latest,
            }),
        }
    }

    /// PostgreSQL: applies the migrations as the schema owner (this store's role) and grants
    /// `app_role` what the services need: every right on the tables, except on the audit log
    /// only INSERT and SELECT (no UPDATE, DELETE, TRUNCATE; not owning it, it cannot drop the
    /// triggers either), and SELECT only on the migration history.
    pub async fn migrate_and_grant(&self, app_role: &str) -> Result<(), StoreError> {
        self.migrate().await?;
        if self.dialect != Dialect::Postgres {
            return Ok(());
        }
        let role: String = sqlx::query_scalar("SELECT CAST(quote_ident($1) AS TEXT)")
            .bind(app_role)
            .fetch_one(&self.pool)
            .await?;
        let mut tx = self.pool.begin().await?;
        for statement in [
            format!("GRANT USAGE ON SCHEMA public TO {role}"),
            format!(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"
            ),
            format!("GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {role}"),
            format!("REVOKE ALL ON {AUDIT_TABLES} FROM {role}"),
            format!("GRANT SELECT, INSERT ON {AUDIT_TABLES} TO {role}"),
            format!("REVOKE ALL ON _sqlx_migrations FROM {role}"),
            format!("GRANT SELECT ON _sqlx_migrations TO {role}"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The login role this store connects as.
    pub async fn current_role(&self) -> Result<String, StoreError> {
        Ok(sqlx::query_scalar("SELECT CAST(current_user AS TEXT)")
            .fetch_one(&self.pool)
            .await?)
    }

    /// The backend.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The connection pool, for stage-specific queries.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Starts a transaction.
    pub async fn begin(&self) -> Result<StoreTx, StoreError> {
        Ok(self.pool.begin().await?)
    }

    /// Answers when the database is reachable.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// A database URL with any password replaced, for error messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}://{user}:***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact_url("postgres://cardpipe:s3cret@db:5432/cardpipe"),
            "postgres://cardpipe:***@db:5432/cardpipe"
        );
        assert_eq!(
            redact_url("sqlite:var/cardpipe.db"),
            "sqlite:var/cardpipe.db"
        );
    }
}
