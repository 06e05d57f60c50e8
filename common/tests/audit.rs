//! The audit chain on both store backends: appends link, concurrent appends never fork, and
//! `verify` names an edited entry, a removed entry and a removed tail.

use cardpipe_common::audit::{self, AuditProblem};
use cardpipe_common::store::{Dialect, Store};
use cardpipe_common::testing;

async fn backends() -> Vec<(Store, Option<tempfile::TempDir>)> {
    let (sqlite, dir) = testing::sqlite_store().await;
    vec![(sqlite, Some(dir)), (testing::postgres_store().await, None)]
}

async fn append(store: &Store, n: usize) {
    testing::audit_append(store, n).await;
}

async fn drop_guards(store: &Store) {
    testing::audit_drop_guards(store).await;
}

#[tokio::test]
async fn an_untouched_chain_verifies_and_concurrent_appends_never_fork() {
    for (store, _dir) in backends().await {
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move { append(&store, 10).await }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let report = audit::verify(&store).await.unwrap();
        assert_eq!(report.entries, 40, "{:?}", store.dialect());
        assert!(
            report.intact(),
            "{:?}: {:?}",
            store.dialect(),
            report.problems
        );
        let recent = audit::recent(&store, Some("app-3"), 10).await.unwrap();
        assert_eq!(recent.len(), 4);
        assert!(recent.windows(2).all(|w| w[0].seq > w[1].seq));
    }
}

#[tokio::test]
async fn the_log_refuses_update_and_delete() {
    for (store, _dir) in backends().await {
        append(&store, 2).await;
        let update = sqlx::query("UPDATE audit_log SET actor = 'someone' WHERE seq = 1")
            .execute(store.pool())
            .await;
        assert!(update.is_err(), "{:?}: update allowed", store.dialect());
        let delete = sqlx::query("DELETE FROM audit_log WHERE seq = 1")
            .execute(store.pool())
            .await;
        assert!(delete.is_err(), "{:?}: delete allowed", store.dialect());
        if store.dialect() == Dialect::Postgres {
            let truncate = sqlx::query("TRUNCATE audit_log")
                .execute(store.pool())
                .await;
            assert!(truncate.is_err(), "truncate allowed");
        }
    }
}

#[tokio::test]
async fn verify_names_edited_removed_and_truncated_entries() {
    for (store, _dir) in backends().await {
        append(&store, 6).await;
        drop_guards(&store).await;

        sqlx::query(
            "UPDATE audit_log SET details = '{\"reason\":\"nothing to see\"}' WHERE seq = 2",
        )
        .execute(store.pool())
        .await
        .unwrap();
        sqlx::query("DELETE FROM audit_log WHERE seq = 4")
            .execute(store.pool())
            .await
            .unwrap();
        sqlx::query("DELETE FROM audit_log WHERE seq = 6")
            .execute(store.pool())
            .await
            .unwrap();
        let report = audit::verify(&store).await.unwrap();
        let mut expected = vec![
            AuditProblem::Edited { seq: 2 },
            AuditProblem::Missing { from: 4, to: 4 },
            AuditProblem::BrokenLink { seq: 5 },
        ];
        // SQLite's head row (its append lock) also shows the cut tail; on PostgreSQL that is
        // the signed checkpoints' work (libs/pki/tests/audit_checkpoints.rs).
        if store.dialect() == Dialect::Sqlite {
            expected.push(AuditProblem::HeadMismatch {
                head_seq: 6,
                last_seq: 5,
            });
        }
        assert_eq!(report.problems, expected, "{:?}", store.dialect());
        assert!(
            report.problems[0]
                .to_string()
                .contains("entry 2 was edited")
        );
    }
}
