//! Kill a worker process (SIGKILL) in the middle of a few thousand jobs on
//! RabbitMQ + PostgreSQL + S3, start it again, and check every job was done
//! exactly once.

use std::process::{Child, Command};
use std::time::Duration;

use cardpipe_common::broker::Job;
use cardpipe_common::domain::ApplicationState;
use cardpipe_common::testing;
use cardpipe_tests::{SoakTarget, count_in, seed};
use sqlx::Row;

const JOBS: usize = 2000;

fn spawn_worker(target: &SoakTarget) -> Child {
    Command::new(env!("CARGO_BIN_EXE_runtime-soak"))
        .arg("work")
        .envs(target.to_env())
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("spawning the soak worker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_restarts_and_every_job_is_done_exactly_once() {
    let target = SoakTarget {
        store_url: testing::fresh_postgres_url().await,
        rabbit_prefix: Some(testing::unique("cardpipe-soak-")),
        bucket: Some(testing::unique("cardpipe-soak-")),
        objects_dir: None,
    };
    let services = target.connect().await.expect("services");
    let ids = seed(&services, JOBS).await.expect("seed");

    let mut worker = spawn_worker(&target);
    // Let it get a good way in, then kill it without warning.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let done = count_in(&services, ApplicationState::KeysIssued)
            .await
            .expect("count");
        if done >= (JOBS / 4) as i64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker made no progress ({done} done)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.kill().expect("SIGKILL");
    worker.wait().expect("reaped");
    let at_kill = count_in(&services, ApplicationState::KeysIssued)
        .await
        .expect("count");
    assert!(
        at_kill < JOBS as i64,
        "the kill came before the end ({at_kill} of {JOBS} done)"
    );

    let mut worker = spawn_worker(&target);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let done = count_in(&services, ApplicationState::KeysIssued)
            .await
            .expect("count");
        if done == JOBS as i64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {done} of {JOBS} done after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Graceful stop of the second process.
    let pid = worker.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    let exit = worker.wait().expect("exit");
    assert!(exit.success(), "graceful shutdown exits 0, got {exit}");

    // Exactly once: one history row per transition, one hand-over per stage.
    let rows = sqlx::query(
        "SELECT application_id, COUNT(*) AS n FROM application_history GROUP BY application_id HAVING COUNT(*) <> 3",
    )
    .fetch_all(services.store.pool())
    .await
    .expect("history");
    assert!(
        rows.is_empty(),
        "{} applications have a history other than 3 rows",
        rows.len()
    );
    let jobs = sqlx::query("SELECT payload FROM outbox WHERE topic = 'job'")
        .fetch_all(services.store.pool())
        .await
        .expect("outbox");
    assert_eq!(
        jobs.len(),
        JOBS * 2,
        "one alpha and one beta hand-over per application"
    );
    let beta = jobs
        .iter()
        .filter(|r| {
            serde_json::from_str::<Job>(&r.get::<String, _>("payload"))
                .unwrap()
                .stage
                == "beta"
        })
        .count();
    assert_eq!(beta, JOBS);
    for id in ids.iter().step_by(97) {
        let key = services
            .store
            .artifact(id, "beta-output")
            .await
            .expect("artifact")
            .expect("recorded");
        assert!(
            services.objects.get(&key).await.expect("get").is_some(),
            "artifact object of {id} exists"
        );
    }
}
