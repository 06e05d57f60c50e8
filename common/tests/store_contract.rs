//! One store contract, run against SQLite and PostgreSQL.

use cardpipe_common::broker::Job;
use cardpipe_common::domain::{ApplicationId, ApplicationState, Priority};
use cardpipe_common::store::{NewApplication, Store, StoreError, Transition};
use cardpipe_common::testing;
use time::{Duration, OffsetDateTime};

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

async fn new_app(store: &Store, registry_id: &str) -> ApplicationId {
    let id = ApplicationId::generate();
    let mut tx = store.begin().await.expect("begin");
    Store::insert_application(
        &mut tx,
        &NewApplication {
            id: id.clone(),
            registry_id: registry_id.to_owned(),
            batch_id: None,
            state: ApplicationState::Received,
            priority: Priority::Normal,
        },
        "registry:test",
        now(),
    )
    .await
    .expect("insert");
    tx.commit().await.expect("commit");
    id
}

fn step<'a>(id: &'a ApplicationId, from: ApplicationState, to: ApplicationState) -> Transition<'a> {
    Transition {
        id,
        from,
        to,
        stage: "test",
        attempt: 1,
        actor: "stage:test",
        reason: None,
        at: now(),
    }
}

async fn transitions_are_checked_and_recorded(store: Store) {
    let id = new_app(&store, "R-1").await;
    let mut tx = store.begin().await.expect("begin");
    assert!(
        Store::transition(
            &mut tx,
            &step(
                &id,
                ApplicationState::Received,
                ApplicationState::DedupPending
            )
        )
        .await
        .expect("ok")
    );
    tx.commit().await.expect("commit");

    // Compare-and-set: the same move again finds the application moved on.
    let mut tx = store.begin().await.expect("begin");
    assert!(
        !Store::transition(
            &mut tx,
            &step(
                &id,
                ApplicationState::Received,
                ApplicationState::DedupPending
            )
        )
        .await
        .expect("no-op")
    );
    tx.rollback().await.expect("rollback");

    // Illegal moves are errors, and change nothing.
    let mut tx = store.begin().await.expect("begin");
    let err = Store::transition(
        &mut tx,
        &step(
            &id,
            ApplicationState::DedupPending,
            ApplicationState::Collected,
        ),
    )
    .await;
    assert!(
        matches!(err, Err(StoreError::IllegalTransition(_))),
        "{err:?}"
    );
    tx.rollback().await.expect("rollback");

    let app = store.application(&id).await.expect("load").expect("exists");
    assert_eq!(app.state, ApplicationState::DedupPending);
    assert_eq!(app.version, 1);
    let history = store.history(&id).await.expect("history");
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].from_state, None);
    assert_eq!(history[0].to_state, ApplicationState::Received);
    assert_eq!(history[1].from_state, Some(ApplicationState::Received));
    assert_eq!(history[1].to_state, ApplicationState::DedupPending);
    assert_eq!(history[1].actor, "stage:test");
    assert_eq!(history[1].attempt, 1);
    assert_eq!(
        store
            .application_by_registry_id("R-1")
            .await
            .expect("by registry id")
            .map(|a| a.id),
        Some(id.clone())
    );
    let counts = store.count_by_state().await.expect("counts");
    assert_eq!(counts, vec![(ApplicationState::DedupPending, 1)]);
}

async fn racing_transitions_have_one_winner(store: Store) {
    let id = new_app(&store, "R-race").await;
    let mut handles = Vec::new();
    for _ in 0..4 {
        let store = store.clone();
        let id = id.clone();
        handles.push(tokio::spawn(async move {
            let mut tx = store.begin().await.expect("begin");
            let won = Store::transition(
                &mut tx,
                &step(
                    &id,
                    ApplicationState::Received,
                    ApplicationState::DedupPending,
                ),
            )
            .await
            .expect("transition");
            tx.commit().await.expect("commit");
            won
        }));
    }
    let mut winners = 0;
    for h in handles {
        winners += usize::from(h.await.expect("task"));
    }
    assert_eq!(winners, 1);
    assert_eq!(store.history(&id).await.expect("history").len(), 2);
}

async fn duplicate_registry_ids_are_refused(store: Store) {
    new_app(&store, "R-dup").await;
    let mut tx = store.begin().await.expect("begin");
    let again = Store::insert_application(
        &mut tx,
        &NewApplication {
            id: ApplicationId::generate(),
            registry_id: "R-dup".into(),
            batch_id: None,
            state: ApplicationState::Received,
            priority: Priority::Normal,
        },
        "registry:test",
        now(),
    )
    .await;
    assert!(
        again.is_err(),
        "a second application with the same registry id must be refused"
    );
}

async fn outbox_delivers_in_order_per_subject(store: Store) {
    let t0 = now();
    let mut tx = store.begin().await.expect("begin");
    for (subject, n) in [("a", 1), ("b", 1), ("a", 2), ("a", 3)] {
        let job = Job::new(format!("s{n}"), subject);
        Store::enqueue_job(&mut tx, &job, t0)
            .await
            .expect("enqueue");
    }
    tx.commit().await.expect("commit");
    let (pending, oldest) = store.outbox_backlog().await.expect("backlog");
    assert_eq!(pending, 4);
    assert!(oldest.is_some());

    // Only the first row of each subject is claimable.
    let first = store
        .claim_outbox(&["job"], "relay-1", t0, Duration::seconds(30), 10)
        .await
        .expect("claim");
    let got: Vec<(String, String)> = first
        .iter()
        .map(|r| {
            (
                r.subject.clone(),
                serde_json::from_str::<Job>(&r.payload).unwrap().stage,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("a".to_owned(), "s1".to_owned()),
            ("b".to_owned(), "s1".to_owned())
        ]
    );
    // A second relay gets nothing while the claims last.
    assert!(
        store
            .claim_outbox(&["job"], "relay-2", t0, Duration::seconds(30), 10)
            .await
            .expect("claim")
            .is_empty()
    );
    for row in &first {
        assert!(
            store
                .mark_outbox_published(row.seq, "relay-1", t0)
                .await
                .expect("mark")
        );
    }
    let second = store
        .claim_outbox(&["job"], "relay-2", t0, Duration::seconds(30), 10)
        .await
        .expect("claim");
    assert_eq!(second.len(), 1);
    // A failed delivery comes back after its backoff, not before.
    assert!(
        store
            .mark_outbox_failed(
                second[0].seq,
                "relay-2",
                "broker down",
                t0 + Duration::seconds(5)
            )
            .await
            .expect("fail")
    );
    assert!(
        store
            .claim_outbox(
                &["job"],
                "relay-2",
                t0 + Duration::seconds(1),
                Duration::seconds(30),
                10
            )
            .await
            .expect("claim")
            .is_empty()
    );
    let retried = store
        .claim_outbox(
            &["job"],
            "relay-2",
            t0 + Duration::seconds(6),
            Duration::seconds(30),
            10,
        )
        .await
        .expect("claim");
    assert_eq!(retried.len(), 1);
    assert_eq!(retried[0].attempts, 1);
    // An expired claim can be taken over.
    let taken_over = store
        .claim_outbox(
            &["job"],
            "relay-3",
            t0 + Duration::seconds(60),
            Duration::seconds(30),
            10,
        )
        .await
        .expect("claim");
    assert_eq!(taken_over.len(), 1);
    assert_eq!(
        store
            .purge_published_outbox(t0 + Duration::seconds(1))
            .await
            .expect("purge"),
        2
    );
}

/// Updates after a claim are fenced by the holder: a relay whose claim passed to another
/// changes nothing; a given-up row moves to the dead letters, stops blocking its subject,
/// and comes back (same message id) when re-queued.
async fn outbox_updates_are_fenced_and_dead_letters_kept(store: Store) {
    let t0 = now();
    let mut tx = store.begin().await.expect("begin");
    for n in 1..=2 {
        Store::enqueue_job(&mut tx, &Job::new(format!("s{n}"), "fenced"), t0)
            .await
            .expect("enqueue");
    }
    tx.commit().await.expect("commit");
    let lease = Duration::seconds(30);
    let slow = store
        .claim_outbox(&["job"], "relay-slow", t0, lease, 10)
        .await
        .expect("claim");
    assert_eq!(slow.len(), 1);
    // The slow relay's claim expires and another relay takes the row over.
    let later = t0 + Duration::seconds(31);
    let fast = store
        .claim_outbox(&["job"], "relay-fast", later, lease, 10)
        .await
        .expect("claim");
    assert_eq!(fast.len(), 1);
    assert_eq!(fast[0].seq, slow[0].seq);
    // The slow relay can neither mark it published, reschedule it nor dead-letter it.
    assert!(
        !store
            .mark_outbox_published(slow[0].seq, "relay-slow", later)
            .await
            .expect("mark")
    );
    assert!(
        !store
            .mark_outbox_failed(slow[0].seq, "relay-slow", "late", later)
            .await
            .expect("fail")
    );
    assert!(
        !store
            .dead_letter_outbox(slow[0].seq, "relay-slow", "late", later)
            .await
            .expect("dead")
    );
    assert!(store.dead_letters(10).await.expect("list").is_empty());
    // Released claims are claimable at once (not only after the lease).
    store
        .release_outbox_claims(&[fast[0].seq], "relay-fast")
        .await
        .expect("release");
    let again = store
        .claim_outbox(&["job"], "relay-fast", later, lease, 10)
        .await
        .expect("claim");
    assert_eq!(again.len(), 1);
    // The holder gives it up: it leaves the outbox for the dead letters, and the next row
    // of the subject becomes claimable.
    assert!(
        store
            .dead_letter_outbox(again[0].seq, "relay-fast", "refused: 422", later)
            .await
            .expect("dead")
    );
    let letters = store.dead_letters(10).await.expect("list");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].seq, again[0].seq);
    assert_eq!(letters[0].id, again[0].id);
    assert_eq!(letters[0].attempts, 1);
    assert_eq!(letters[0].last_error, "refused: 422");
    assert_eq!(store.dead_letter_count().await.expect("count"), 1);
    let next = store
        .claim_outbox(&["job"], "relay-fast", later, lease, 10)
        .await
        .expect("claim");
    assert_eq!(next.len(), 1);
    assert_ne!(next[0].seq, again[0].seq);
    assert!(
        store
            .mark_outbox_published(next[0].seq, "relay-fast", later)
            .await
            .expect("mark")
    );
    // Re-queued: the same message is claimable again, with no attempts counted.
    let mut tx = store.begin().await.expect("begin");
    let requeued = Store::requeue_dead_letter(&mut tx, letters[0].seq, later)
        .await
        .expect("requeue")
        .expect("found");
    tx.commit().await.expect("commit");
    assert_eq!(requeued.id, again[0].id);
    assert_eq!(store.dead_letter_count().await.expect("count"), 0);
    let back = store
        .claim_outbox(&["job"], "relay-fast", later, lease, 10)
        .await
        .expect("claim");
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].id, again[0].id);
    assert_eq!(back[0].attempts, 0);
    assert_eq!(back[0].payload, slow[0].payload);
    // Unknown numbers are reported as such.
    let mut tx = store.begin().await.expect("begin");
    assert!(
        Store::discard_dead_letter(&mut tx, 999_999)
            .await
            .expect("discard")
            .is_none()
    );
}

async fn leases_and_runs_are_exclusive(store: Store) {
    let t0 = now();
    assert!(
        store
            .try_lease("scheduler", "a", t0, Duration::seconds(30))
            .await
            .expect("lease")
    );
    assert!(
        !store
            .try_lease(
                "scheduler",
                "b",
                t0 + Duration::seconds(10),
                Duration::seconds(30)
            )
            .await
            .expect("lease")
    );
    assert!(
        store
            .try_lease(
                "scheduler",
                "a",
                t0 + Duration::seconds(10),
                Duration::seconds(30)
            )
            .await
            .expect("renew")
    );
    assert!(
        store
            .try_lease(
                "scheduler",
                "b",
                t0 + Duration::seconds(41),
                Duration::seconds(30)
            )
            .await
            .expect("expired")
    );
    store
        .release_lease("scheduler", "b")
        .await
        .expect("release");
    assert!(
        store
            .try_lease(
                "scheduler",
                "c",
                t0 + Duration::seconds(42),
                Duration::seconds(30)
            )
            .await
            .expect("free")
    );

    let mut tx = store.begin().await.expect("begin");
    assert!(
        Store::record_run(&mut tx, "voiding", "2026-11-22", "a", t0)
            .await
            .expect("run")
    );
    tx.commit().await.expect("commit");
    let mut tx = store.begin().await.expect("begin");
    assert!(
        !Store::record_run(&mut tx, "voiding", "2026-11-22", "b", t0)
            .await
            .expect("run")
    );
    assert!(
        Store::record_run(&mut tx, "voiding", "2026-11-23", "b", t0)
            .await
            .expect("run")
    );
    tx.commit().await.expect("commit");
}

/// The store-wide gauges computed at scrape time: overdue applications (received over 30
/// days ago, card not at an office, still in progress) and the newest CRL's times, which
/// are absent until a CRL exists.
async fn scrape_time_gauges_read_the_store(store: Store) {
    use cardpipe_common::broker::memory::MemoryBroker;
    use cardpipe_common::clock::{Clock, TestClock, to_rfc3339};
    use cardpipe_common::telemetry::metrics::Metrics;

    let start = now();
    // Received now: one stays in progress, one reaches its office, one is rejected.
    let in_progress = new_app(&store, "OV-1").await;
    let at_office = new_app(&store, "OV-2").await;
    let rejected = new_app(&store, "OV-3").await;
    for (id, state) in [
        (&at_office, "at_office"),
        (&rejected, "rejected"),
        (&in_progress, "keys_issued"),
    ] {
        sqlx::query("UPDATE applications SET state = $1 WHERE id = $2")
            .bind(state)
            .bind(id.as_str())
            .execute(store.pool())
            .await
            .unwrap();
    }
    let metrics = Metrics::new();
    let broker = MemoryBroker::new();
    let clock = TestClock::at(start);
    let value = |text: &str, name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .map(|v| v.trim().parse().unwrap())
    };

    metrics.refresh(&store, &broker, &[], &clock).await;
    let text = metrics.encode();
    assert_eq!(value(&text, "cardpipe_applications_overdue"), Some(0.0));
    assert!(
        !text.contains("cardpipe_crl_"),
        "no CRL yet: no CRL gauges\n{text}"
    );

    // 31 days on, only the one still in progress is overdue.
    clock.advance(Duration::days(31));
    let published = clock.now();
    sqlx::query(
        "INSERT INTO crl_state (number, published_at, next_update, object_key, revoked_count)
         VALUES (1, $1, $2, 'crl/1.crl', 0)",
    )
    .bind(to_rfc3339(published))
    .bind(to_rfc3339(published + Duration::days(1)))
    .execute(store.pool())
    .await
    .unwrap();
    metrics.refresh(&store, &broker, &[], &clock).await;
    let text = metrics.encode();
    assert_eq!(value(&text, "cardpipe_applications_overdue"), Some(1.0));
    assert_eq!(
        value(&text, "cardpipe_crl_last_published_timestamp_seconds"),
        Some(published.unix_timestamp() as f64)
    );
    assert_eq!(
        value(&text, "cardpipe_crl_next_update_timestamp_seconds"),
        Some((published + Duration::days(1)).unix_timestamp() as f64)
    );
}

macro_rules! contract {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;
            #[tokio::test]
            async fn transitions_are_checked_and_recorded() {
                let (store, _guard) = $make;
                super::transitions_are_checked_and_recorded(store).await
            }
            #[tokio::test]
            async fn racing_transitions_have_one_winner() {
                let (store, _guard) = $make;
                super::racing_transitions_have_one_winner(store).await
            }
            #[tokio::test]
            async fn duplicate_registry_ids_are_refused() {
                let (store, _guard) = $make;
                super::duplicate_registry_ids_are_refused(store).await
            }
            #[tokio::test]
            async fn outbox_delivers_in_order_per_subject() {
                let (store, _guard) = $make;
                super::outbox_delivers_in_order_per_subject(store).await
            }
            #[tokio::test]
            async fn outbox_updates_are_fenced_and_dead_letters_kept() {
                let (store, _guard) = $make;
                super::outbox_updates_are_fenced_and_dead_letters_kept(store).await
            }
            #[tokio::test]
            async fn leases_and_runs_are_exclusive() {
                let (store, _guard) = $make;
                super::leases_and_runs_are_exclusive(store).await
            }
            #[tokio::test]
            async fn scrape_time_gauges_read_the_store() {
                let (store, _guard) = $make;
                super::scrape_time_gauges_read_the_store(store).await
            }
        }
    };
}

contract!(sqlite, testing::sqlite_store().await);
contract!(postgres, (testing::postgres_store().await, ()));
