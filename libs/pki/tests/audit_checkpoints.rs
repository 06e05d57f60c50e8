//! Signed audit checkpoints against someone who owns the database: a cut tail, a truncated
//! log, a chain recomputed from an edited entry on and a forged checkpoint are each found,
//! and the writer refuses to sign a head that no longer extends its newest checkpoint. On
//! both backend sets (SQLite + fs, PostgreSQL + the S3 server), with a file keystore and with
//! the key in a SoftHSM2 token.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use cardpipe_common::audit::{self, AuditEntry, AuditProblem};
use cardpipe_common::runtime::Services;
use cardpipe_common::store::{Dialect, Store};
use cardpipe_common::testing::{self, Mode};
use cardpipe_pki::checkpoint::{self, SignedCheckpoint, WriteError};
use cardpipe_pki::keystore::softhsm::{self, SOFTHSM2_MODULE};
use cardpipe_pki::keystore::{CaKeyStore, FileKeyStore, KdfParams, Pkcs11Config, Pkcs11KeyStore};
use secrecy::SecretString;
use serde_json::json;
use sqlx::Row;

fn file_keystore(dir: &Path, name: &str) -> Arc<dyn CaKeyStore> {
    Arc::new(
        FileKeyStore::create(
            dir.join(name),
            &SecretString::from("test passphrase"),
            KdfParams::for_tests(),
        )
        .unwrap(),
    )
}

async fn append(services: &Services, n: usize) {
    testing::audit_append(&services.store, n).await;
}

/// What the owner of the database does first: remove the triggers in the way.
async fn drop_guards(store: &Store) {
    testing::audit_drop_guards(store).await;
}

/// ... and last, on SQLite, makes the head row agree with what is left.
async fn fix_head(store: &Store) {
    if store.dialect() == Dialect::Sqlite {
        let head = audit::head(store).await.unwrap();
        sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
            .bind(head.seq)
            .bind(&head.hash)
            .execute(store.pool())
            .await
            .unwrap();
    }
}

async fn entries(store: &Store) -> Vec<AuditEntry> {
    audit::recent(store, None, 1000)
        .await
        .unwrap()
        .into_iter()
        .rev()
        .collect()
}

/// Five entries, a checkpoint of entry 5, three more entries (not yet checkpointed).
async fn checkpointed_log(
    mode: Mode,
    dir: &Path,
) -> (
    Services,
    Option<tempfile::TempDir>,
    Arc<dyn CaKeyStore>,
    SignedCheckpoint,
) {
    let (services, guard) = testing::services(mode, None).await;
    let keystore = file_keystore(dir, &format!("{mode:?}.keystore"));
    append(&services, 5).await;
    let written = checkpoint::write(&services, &keystore)
        .await
        .unwrap()
        .expect("a checkpoint of the first five entries");
    assert_eq!(written.seq, 5);
    assert_eq!(written.key_label, "audit-checkpoint-1");
    assert!(
        checkpoint::write(&services, &keystore)
            .await
            .unwrap()
            .is_none(),
        "a second pass over the same head writes nothing"
    );
    append(&services, 3).await;
    let found = checkpoint::newest(&services, keystore.as_ref())
        .await
        .unwrap();
    assert_eq!(found.newest.as_ref(), Some(&written));
    assert!(found.bad.is_empty());
    let report = audit::verify_against(&services.store, Some(&written.anchor()))
        .await
        .unwrap();
    assert!(report.intact(), "{mode:?}: {:?}", report.problems);
    assert_eq!(report.entries, 8);
    (services, guard, keystore, written)
}

async fn verify_newest(services: &Services, keystore: &Arc<dyn CaKeyStore>) -> Vec<AuditProblem> {
    let found = checkpoint::newest(services, keystore.as_ref())
        .await
        .unwrap();
    let anchor = found.newest.map(|c| c.anchor());
    audit::verify_against(&services.store, anchor.as_ref())
        .await
        .unwrap()
        .problems
}

#[tokio::test]
async fn a_cut_tail_is_found_and_never_signed() {
    for mode in [Mode::Embedded, Mode::Distributed] {
        let dir = tempfile::tempdir().unwrap();
        let (services, _guard, keystore, _) = checkpointed_log(mode, dir.path()).await;
        drop_guards(&services.store).await;
        sqlx::query("DELETE FROM audit_log WHERE seq >= 4")
            .execute(services.store.pool())
            .await
            .unwrap();
        fix_head(&services.store).await;
        // The chain alone is self-consistent now: only the checkpoint shows the cut.
        assert!(audit::verify(&services.store).await.unwrap().intact());
        assert_eq!(
            verify_newest(&services, &keystore).await,
            vec![AuditProblem::EndsBeforeCheckpoint {
                checkpoint_seq: 5,
                last_seq: 3
            }],
            "{mode:?}"
        );
        // New entries after the cut do not hide it, and the writer will not vouch for them.
        append(&services, 4).await;
        let err = checkpoint::write(&services, &keystore).await.unwrap_err();
        assert!(matches!(err, WriteError::Tampered { .. }), "{err}");
        assert!(err.to_string().contains("checkpoint of entry 5"), "{err}");
        assert_eq!(
            verify_newest(&services, &keystore).await,
            vec![AuditProblem::CheckpointMismatch { seq: 5 }],
            "{mode:?}: entry 5 exists again, with another hash"
        );
    }
}

#[tokio::test]
async fn a_truncated_log_is_found() {
    for mode in [Mode::Embedded, Mode::Distributed] {
        let dir = tempfile::tempdir().unwrap();
        let (services, _guard, keystore, _) = checkpointed_log(mode, dir.path()).await;
        drop_guards(&services.store).await;
        let truncate = match services.store.dialect() {
            Dialect::Postgres => "TRUNCATE audit_log",
            Dialect::Sqlite => "DELETE FROM audit_log",
        };
        sqlx::query(truncate)
            .execute(services.store.pool())
            .await
            .unwrap();
        fix_head(&services.store).await;
        let problems = verify_newest(&services, &keystore).await;
        assert_eq!(
            problems,
            vec![AuditProblem::EndsBeforeCheckpoint {
                checkpoint_seq: 5,
                last_seq: 0
            }],
            "{mode:?}"
        );
        assert!(problems[0].to_string().contains("truncated"));
    }
}

#[tokio::test]
async fn a_chain_recomputed_from_an_edited_entry_is_found() {
    for mode in [Mode::Embedded, Mode::Distributed] {
        let dir = tempfile::tempdir().unwrap();
        let (services, _guard, keystore, _) = checkpointed_log(mode, dir.path()).await;
        drop_guards(&services.store).await;
        // Edit entry 2 and recompute every hash and link after it, as the owner could.
        let mut prev_hash = audit::GENESIS_HASH.to_owned();
        for mut entry in entries(&services.store).await {
            if entry.seq == 2 {
                entry.details = json!({ "n": 99 }).to_string();
            }
            entry.prev_hash = prev_hash;
            entry.hash = entry.expected_hash();
            sqlx::query(
                "UPDATE audit_log SET details = $1, prev_hash = $2, hash = $3 WHERE seq = $4",
            )
            .bind(&entry.details)
            .bind(&entry.prev_hash)
            .bind(&entry.hash)
            .bind(entry.seq)
            .execute(services.store.pool())
            .await
            .unwrap();
            prev_hash = entry.hash;
        }
        fix_head(&services.store).await;
        assert!(
            audit::verify(&services.store).await.unwrap().intact(),
            "{mode:?}: the rewritten chain is self-consistent"
        );
        let problems = verify_newest(&services, &keystore).await;
        assert_eq!(
            problems,
            vec![AuditProblem::CheckpointMismatch { seq: 5 }],
            "{mode:?}"
        );
        assert!(problems[0].to_string().contains("rewritten"));
        let err = checkpoint::write(&services, &keystore).await.unwrap_err();
        assert!(matches!(err, WriteError::Tampered { .. }), "{err}");
    }
}

#[tokio::test]
async fn forged_checkpoints_are_refused_and_rotated_keys_keep_verifying() {
    for mode in [Mode::Embedded, Mode::Distributed] {
        let dir = tempfile::tempdir().unwrap();
        let (services, _guard, keystore, first) = checkpointed_log(mode, dir.path()).await;
        let log = entries(&services.store).await;

        // 1. The owner moves the signed checkpoint forward by editing it (to entry 7).
        let mut moved = first.clone();
        moved.seq = 7;
        moved.hash = log[6].hash.clone();
        services
            .objects
            .put(
                &moved.object_key(),
                Bytes::from(serde_json::to_vec(&moved).unwrap()),
            )
            .await
            .unwrap();
        // 2. ... or copies it under a later name (entry 6).
        let original = services
            .objects
            .get(&first.object_key())
            .await
            .unwrap()
            .unwrap();
        services
            .objects
            .put(&checkpoint::object_key(6), original)
            .await
            .unwrap();
        // 3. ... or signs the head (entry 8) with a key of their own under the same label.
        let own = file_keystore(dir.path(), "attacker.keystore");
        let attacker = Services {
            objects: Arc::new(
                cardpipe_common::objects::fs::FsObjectStore::open(
                    dir.path().join("attacker-objects"),
                )
                .await
                .unwrap(),
            ),
            ..services.clone()
        };
        let forged = checkpoint::write(&attacker, &own).await.unwrap().unwrap();
        assert_eq!(
            (forged.seq, forged.key_label.as_str()),
            (8, "audit-checkpoint-1")
        );
        let bytes = attacker
            .objects
            .get(&forged.object_key())
            .await
            .unwrap()
            .unwrap();
        services
            .objects
            .put(&forged.object_key(), bytes)
            .await
            .unwrap();

        let found = checkpoint::newest(&services, keystore.as_ref())
            .await
            .unwrap();
        assert_eq!(found.newest.as_ref(), Some(&first), "{mode:?}");
        let reasons: Vec<String> = found.bad.iter().map(ToString::to_string).collect();
        assert_eq!(found.bad.len(), 3, "{reasons:?}");
        assert!(reasons[0].contains("does not verify"), "{reasons:?}");
        assert!(reasons[1].contains("does not verify"), "{reasons:?}");
        assert!(
            reasons[2].contains("stored under another name"),
            "{reasons:?}"
        );

        // Rotation: the next checkpoint is signed with the new key; the old one still verifies.
        for key in [
            checkpoint::object_key(6),
            checkpoint::object_key(7),
            checkpoint::object_key(8),
        ] {
            services.objects.delete(&key).await.unwrap();
        }
        assert_eq!(
            checkpoint::rotate_key(keystore.as_ref()).unwrap(),
            "audit-checkpoint-2"
        );
        append(&services, 1).await;
        let second = checkpoint::write(&services, &keystore)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (second.seq, second.key_label.as_str()),
            (9, "audit-checkpoint-2")
        );
        services.objects.delete(&second.object_key()).await.unwrap();
        let found = checkpoint::newest(&services, keystore.as_ref())
            .await
            .unwrap();
        assert_eq!(found.newest.as_ref(), Some(&first));
        assert!(found.bad.is_empty());
    }
}

#[tokio::test]
async fn exported_public_keys_verify_like_the_keystore() {
    let dir = tempfile::tempdir().unwrap();
    let (services, _guard, keystore, first) = checkpointed_log(Mode::Embedded, dir.path()).await;
    let keys = dir.path().join("keys");
    let written = checkpoint::export_public_keys(keystore.as_ref(), &keys).unwrap();
    assert_eq!(written, vec![keys.join("audit-checkpoint-1.pem")]);
    let verifier = checkpoint::Verifier::from_dir(&keys).unwrap();
    let found = checkpoint::newest_with(&services, &verifier).await.unwrap();
    assert_eq!(found.newest, Some(first));

    // Someone else's key under the same name verifies nothing.
    let other = file_keystore(dir.path(), "other.keystore");
    checkpoint::rotate_key(other.as_ref()).unwrap();
    let wrong = dir.path().join("wrong-keys");
    checkpoint::export_public_keys(other.as_ref(), &wrong).unwrap();
    let found =
        checkpoint::newest_with(&services, &checkpoint::Verifier::from_dir(&wrong).unwrap())
            .await
            .unwrap();
    assert_eq!(found.newest, None);
    assert!(
        found.bad[0].reason.contains("does not verify"),
        "{:?}",
        found.bad
    );

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = checkpoint::Verifier::from_dir(&empty).unwrap_err();
    assert!(err.to_string().contains("export-keys"), "{err}");
}

const TOKEN: &str = "cardpipe-audit";

fn in_softhsm(test_name: &str, body: impl FnOnce(&Path)) {
    softhsm::run_in_sandbox(test_name, TOKEN, "1234", body);
}

#[test]
fn checkpoints_are_signed_by_a_key_that_never_leaves_the_hsm() {
    in_softhsm(
        "checkpoints_are_signed_by_a_key_that_never_leaves_the_hsm",
        |_| {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                let token = Arc::new(
                    Pkcs11KeyStore::open(&Pkcs11Config {
                        module: SOFTHSM2_MODULE.into(),
                        token_label: TOKEN.into(),
                        pin: SecretString::from("1234"),
                    })
                    .unwrap(),
                );
                let keystore: Arc<dyn CaKeyStore> = token.clone();
                let (services, _guard) = testing::services(Mode::Distributed, None).await;
                append(&services, 3).await;
                let written = checkpoint::write(&services, &keystore)
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(
                    token.protection(&written.key_label).unwrap(),
                    (true, false),
                    "sensitive and not extractable"
                );
                let found = checkpoint::newest(&services, keystore.as_ref())
                    .await
                    .unwrap();
                assert_eq!(found.newest, Some(written));
                // Its public key is all a verifier needs: the stored row holds nothing else.
                let row = sqlx::query("SELECT COUNT(*) AS n FROM audit_log")
                    .fetch_one(services.store.pool())
                    .await
                    .unwrap();
                assert_eq!(row.get::<i64, _>("n"), 3);
            });
        },
    );
}
