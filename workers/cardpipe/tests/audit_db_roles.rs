//! The audit log under two PostgreSQL roles, as deploy/ runs it: `cardpipe migrate` applies the
//! schema as the owner (`[store] owner_url`) and grants the services' role (`[store] url`)
//! INSERT and SELECT only on the audit log. The services' role then appends and reads but can
//! neither update, delete nor truncate entries nor drop the triggers; a process that may not
//! migrate refuses an old schema; and what the owner can still do — cut the tail — is caught
//! by `cardpipe audit verify` against the signed checkpoint.

use std::path::Path;

use cardpipe_common::audit::{self, AuditEvent};
use cardpipe_common::clock::SystemClock;
use cardpipe_common::store::Store;
use cardpipe_common::testing;

mod common;

fn cli(dir: &Path, args: &[&str]) -> std::process::Output {
    common::cli_with_input(dir, args, "")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `postgres://<role>:<password>@<host of the admin URL>/<db>`.
fn url_as(admin: &str, role: &str, db: &str) -> String {
    let after_scheme = admin.split_once("://").map_or(admin, |(_, rest)| rest);
    let host = after_scheme
        .rsplit_once('@')
        .map_or(after_scheme, |(_, h)| h);
    let host = host.split('/').next().unwrap_or(host);
    format!("postgres://{role}:role-password@{host}/{db}")
}

fn write_config(dir: &Path, url: &str, owner_url: &str) {
    std::fs::write(
        dir.join("pipeline.toml"),
        format!(
            "[store]\nurl = \"{url}\"\nowner_url = \"{owner_url}\"\nmigrate_at_start = false\n"
        ),
    )
    .unwrap();
}

async fn assert_refused(store: &Store, statement: &str, expected: &str) {
    let err = sqlx::query(sqlx::AssertSqlSafe(statement.to_owned()))
        .execute(store.pool())
        .await
        .expect_err(statement)
        .to_string();
    assert!(err.contains(expected), "{statement}: {err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_services_role_appends_to_the_audit_log_and_cannot_rewrite_it() {
    let admin_url = testing::postgres_admin_url();
    let admin = Store::connect(&admin_url, 1)
        .await
        .expect("PostgreSQL is required for this test (tests/run starts it)");
    let tag = testing::unique("").to_lowercase();
    let (owner, app, db) = (
        format!("cp_owner_{tag}"),
        format!("cp_app_{tag}"),
        format!("cp_roles_{tag}"),
    );
    for statement in [
        format!("CREATE ROLE {owner} LOGIN PASSWORD 'role-password'"),
        format!("CREATE ROLE {app} LOGIN PASSWORD 'role-password'"),
        format!("CREATE DATABASE {db} OWNER {owner}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(admin.pool())
            .await
            .unwrap();
    }
    let owner_url = url_as(&admin_url, &owner, &db);
    let app_url = url_as(&admin_url, &app, &db);
    let dir = tempfile::tempdir().unwrap();

    // The same role twice is refused: the services would own the audit log.
    write_config(dir.path(), &app_url, &app_url);
    let same = cli(dir.path(), &["migrate"]);
    assert!(!same.status.success());
    assert!(text(&same).contains("same role"), "{}", text(&same));

    write_config(dir.path(), &app_url, &owner_url);
    // Before the migration, a process that may not migrate names what to do.
    let early = cli(dir.path(), &["audit", "verify"]);
    assert!(!early.status.success());
    assert!(
        text(&early).contains("run `cardpipe migrate`"),
        "{}",
        text(&early)
    );
    let migrated = cli(dir.path(), &["migrate"]);
    assert!(migrated.status.success(), "{}", text(&migrated));
    assert!(
        text(&migrated).contains("may only insert into and read the audit log"),
        "{}",
        text(&migrated)
    );
    assert!(
        !text(&migrated).contains("role-password"),
        "a password in the output: {}",
        text(&migrated)
    );

    // The services' role: appends and reads the log, works the other tables...
    let services = Store::connect(&app_url, 2).await.unwrap();
    services.check_migrated().await.unwrap();
    audit::record(
        &services,
        &SystemClock,
        &AuditEvent {
            actor: "system:test",
            role: "system",
            action: "test.append",
            subject: "roles",
            details: serde_json::json!({}),
        },
    )
    .await
    .unwrap();
    assert_eq!(audit::recent(&services, None, 10).await.unwrap().len(), 1);
    sqlx::query("UPDATE applications SET state = state WHERE FALSE")
        .execute(services.pool())
        .await
        .unwrap();
    sqlx::query("DELETE FROM sign_in_limits WHERE FALSE")
        .execute(services.pool())
        .await
        .unwrap();
    // ... but cannot change, remove or hide an entry.
    for (statement, expected) in [
        ("UPDATE audit_log SET actor = 'x'", "permission denied"),
        ("DELETE FROM audit_log", "permission denied"),
        ("TRUNCATE audit_log", "permission denied"),
        (
            "DROP TRIGGER audit_log_no_update ON audit_log",
            "must be owner",
        ),
        ("ALTER TABLE audit_log DISABLE TRIGGER ALL", "must be owner"),
        ("DROP TABLE audit_log", "must be owner"),
        ("DELETE FROM _sqlx_migrations", "permission denied"),
    ] {
        assert_refused(&services, statement, expected).await;
    }
    services.close().await;

    // The whole CLI runs as the services' role: the first operator (audited), a checkpoint.
    let added = common::cli_with_input(
        dir.path(),
        &["operators", "add", "chief", "--role", "supervisor"],
        "a long enough password\n",
    );
    assert!(added.status.success(), "{}", text(&added));
    let signed = cli(dir.path(), &["audit", "checkpoint"]);
    assert!(signed.status.success(), "{}", text(&signed));
    assert!(
        text(&signed).contains("signed the checkpoint of entry 2"),
        "{}",
        text(&signed)
    );
    let ok = cli(dir.path(), &["audit", "verify"]);
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(
        text(&ok).contains("checked against the signed checkpoint of entry 2"),
        "{}",
        text(&ok)
    );
    // An auditor verifies with the exported public keys, without the keystore.
    let keys = dir.path().join("auditor-keys");
    let exported = cli(
        dir.path(),
        &["audit", "export-keys", "--out", keys.to_str().unwrap()],
    );
    assert!(exported.status.success(), "{}", text(&exported));
    assert!(keys.join("audit-checkpoint-1.pem").exists());
    let by_auditor = cli(
        dir.path(),
        &["audit", "verify", "--keys", keys.to_str().unwrap()],
    );
    assert!(by_auditor.status.success(), "{}", text(&by_auditor));
    assert!(
        text(&by_auditor).contains("checked against the signed checkpoint of entry 2"),
        "{}",
        text(&by_auditor)
    );

    // The owner can drop the triggers and cut the tail; the checkpoint shows it.
    let owner_store = Store::connect(&owner_url, 1).await.unwrap();
    for statement in [
        "DROP TRIGGER audit_log_no_update ON audit_log",
        "DELETE FROM audit_log WHERE seq = 2",
    ] {
        sqlx::query(statement)
            .execute(owner_store.pool())
            .await
            .unwrap();
    }
    owner_store.close().await;
    for args in [
        vec!["audit", "verify"],
        vec!["audit", "verify", "--keys", keys.to_str().unwrap()],
    ] {
        let broken = cli(dir.path(), &args);
        assert!(!broken.status.success(), "{}", text(&broken));
        assert!(
            text(&broken)
                .contains("the log ends at entry 1 but a signed checkpoint vouches for entry 2"),
            "{}",
            text(&broken)
        );
    }

    // Leave the server as it was.
    for statement in [
        format!("DROP DATABASE {db} WITH (FORCE)"),
        format!("DROP ROLE {owner}"),
        format!("DROP ROLE {app}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(admin.pool())
            .await
            .unwrap();
    }
}
