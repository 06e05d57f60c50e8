//! Outbox relays of many processes claiming one large backlog at once, on PostgreSQL.
//!
//! A distributed `bench pipeline` of 2,000 applications released at once stalled with 173
//! applications short: claim statements ran for up to 507 s, holding the rows they had
//! locked, while the publishers of other relays queued behind them. The claim then chose
//! its rows with `UPDATE ... WHERE seq IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)`,
//! whose subquery PostgreSQL may run again for rows it rechecks after a concurrent update.
//! Here several relays claim and publish one backlog until it is empty; every row must be
//! delivered exactly once, no claim may return more rows than its limit, and the rows of
//! one subject and topic must be delivered in order.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cardpipe_common::store::{Dialect, Store, claim_outbox_sql};
use cardpipe_common::testing;
use time::OffsetDateTime;

const SUBJECTS: usize = 600;
const TOPICS: [&str; 3] = ["job", "sms", "callback"];
const PER_SUBJECT_TOPIC: usize = 2;
const RELAYS: usize = 6;
const LIMIT: i64 = 32;

async fn fill(store: &Store) -> usize {
    let now = OffsetDateTime::now_utc();
    let mut n = 0;
    let mut tx = store.begin().await.unwrap();
    for round in 0..PER_SUBJECT_TOPIC {
        for s in 0..SUBJECTS {
            for topic in TOPICS {
                Store::enqueue_outbox(
                    &mut tx,
                    &format!("{topic}-{s}-{round}"),
                    topic,
                    &format!("app-{s}"),
                    &format!("{{\"round\":{round}}}"),
                    now,
                )
                .await
                .unwrap();
                n += 1;
            }
        }
    }
    tx.commit().await.unwrap();
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_relays_deliver_a_large_backlog_once_each_and_in_order() {
    let store = Arc::new(testing::postgres_store().await);
    let total = fill(&store).await;
    // Relays split by topic sets as the processes do: some take every topic, some one lane.
    let lanes: [&[&str]; 3] = [&["job", "sms", "callback"], &["sms", "callback"], &["job"]];
    let delivered: Arc<Mutex<Vec<(String, String, i64)>>> = Arc::default();
    let mut relays = Vec::new();
    for r in 0..RELAYS {
        let (store, delivered) = (store.clone(), delivered.clone());
        let topics = lanes[r % lanes.len()];
        relays.push(tokio::spawn(async move {
            let holder = format!("relay-{r}");
            let mut idle_rounds = 0;
            while idle_rounds < 20 {
                let claimed = store
                    .claim_outbox(
                        topics,
                        &holder,
                        OffsetDateTime::now_utc(),
                        time::Duration::seconds(600),
                        LIMIT,
                    )
                    .await
                    .expect("claim");
                assert!(
                    claimed.len() as i64 <= LIMIT,
                    "{holder} claimed {} rows with a limit of {LIMIT}",
                    claimed.len()
                );
                if claimed.is_empty() {
                    idle_rounds += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                idle_rounds = 0;
                for row in claimed {
                    assert!(topics.contains(&row.topic.as_str()), "{holder}: {row:?}");
                    let marked = store
                        .mark_outbox_published(row.seq, &holder, OffsetDateTime::now_utc())
                        .await
                        .expect("mark published");
                    assert!(marked, "{holder} lost its claim on row {}", row.seq);
                    delivered
                        .lock()
                        .unwrap()
                        .push((row.subject, row.topic, row.seq));
                }
            }
        }));
    }
    for relay in relays {
        relay.await.expect("a relay failed");
    }
    let delivered = delivered.lock().unwrap().clone();
    let seqs: HashSet<i64> = delivered.iter().map(|d| d.2).collect();
    assert_eq!(seqs.len(), delivered.len(), "a row was delivered twice");
    assert_eq!(delivered.len(), total, "every row delivered");
    let (backlog, _) = store.outbox_backlog().await.unwrap();
    assert_eq!(backlog, 0);
    // Per subject and topic, delivery order is seq order (each relay records a row only
    // after marking it; a row is due only once the previous one is marked).
    let mut per_key: BTreeMap<(String, String), Vec<i64>> = BTreeMap::new();
    for (subject, topic, seq) in delivered {
        per_key.entry((subject, topic)).or_default().push(seq);
    }
    for (key, seqs) in per_key {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{key:?} out of order: {seqs:?}"
        );
    }
}

/// The claim's rows are chosen once per statement: on PostgreSQL the locking subquery is a
/// materialized CTE scanned by the update, not a subplan the update may run again.
#[tokio::test]
async fn the_postgres_claim_chooses_its_rows_once() {
    let store = testing::postgres_store().await;
    let sql = claim_outbox_sql(Dialect::Postgres, &["job", "sms"]);
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN {}",
        sql.replace("$1", "'h'")
            .replace("$2", "'u'")
            .replace("$3", "'n'")
            .replace("$4", "8")
    )))
    .fetch_all(store.pool())
    .await
    .expect("explain");
    assert!(
        plan.iter().any(|l| l.contains("CTE Scan")),
        "no materialized CTE in the plan:\n{}",
        plan.join("\n")
    );
}
