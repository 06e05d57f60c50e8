//! Test support: fresh, isolated instances of every backend, real and
//! embedded, so one contract suite runs against both.
//!
//! Real services are found through environment variables with local
//! defaults (what `tests/run` starts):
//! `CARDPIPE_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`),
//! `CARDPIPE_TEST_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`),
//! `CARDPIPE_TEST_S3_ENDPOINT` (default `http://127.0.0.1:8014`, credentials
//! `AKIATEST` / `secrettest`). A missing service makes the test fail with a
//! message saying which one and how to start it — never a silent pass.

use std::sync::Arc;

use crate::broker::Broker;
use crate::broker::memory::MemoryBroker;
use crate::broker::rabbitmq::RabbitBroker;
use crate::clock::{Clock, SystemClock};
use crate::objects::ObjectStore;
use crate::objects::fs::FsObjectStore;
use crate::objects::s3::{S3ObjectStore, S3Settings};
use crate::runtime::Services;
use crate::store::Store;
use crate::telemetry::metrics::Metrics;

/// A short unique suffix for databases, queues and buckets.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// URL of the PostgreSQL server used by tests.
pub fn postgres_admin_url() -> String {
    env_or(
        "CARDPIPE_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    )
}

/// URL of the RabbitMQ server used by tests.
pub fn amqp_url() -> String {
    env_or(
        "CARDPIPE_TEST_AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    )
}

/// Endpoint of the S3 server used by tests.
pub fn s3_endpoint() -> String {
    env_or("CARDPIPE_TEST_S3_ENDPOINT", "http://127.0.0.1:8014")
}

/// S3 settings for a fresh bucket on the test server.
pub fn s3_settings() -> S3Settings {
    S3Settings {
        endpoint: s3_endpoint(),
        region: "us-east-1".into(),
        bucket: unique("cardpipe-test-"),
        access_key: env_or("CARDPIPE_TEST_S3_ACCESS_KEY", "AKIATEST"),
        secret_key: env_or("CARDPIPE_TEST_S3_SECRET_KEY", "secrettest").into(),
    }
}

/// Creates a fresh PostgreSQL database and returns its URL.
pub async fn fresh_postgres_url() -> String {
    let admin = postgres_admin_url();
    let store = Store::connect(&admin, 1).await.unwrap_or_else(|e| {
        panic!("PostgreSQL is required for this test ({e}); start it with tests/run or set CARDPIPE_TEST_POSTGRES_URL")
    });
    let name = unique("cardpipe_test_");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(store.pool())
        .await
        .expect("creating a test database");
    store.close().await;
    let base = admin
        .rsplit_once('/')
        .map_or(admin.as_str(), |(base, _)| base)
        .to_owned();
    format!("{base}/{name}")
}

/// A migrated store on a fresh PostgreSQL database.
pub async fn postgres_store() -> Store {
    let store = Store::connect(&fresh_postgres_url().await, 8)
        .await
        .expect("connecting to the test database");
    store.migrate().await.expect("migrating the test database");
    store
}

/// A migrated store on a fresh SQLite file (kept alive by the returned dir).
pub async fn sqlite_store() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite:{}", dir.path().join("cardpipe.db").display());
    let store = Store::connect(&url, 4).await.expect("opening SQLite");
    store.migrate().await.expect("migrating SQLite");
    (store, dir)
}

/// A RabbitMQ broker with a fresh queue prefix.
pub async fn rabbit_broker() -> RabbitBroker {
    rabbit_broker_with_prefix(&amqp_url(), &unique("cardpipe-test-")).await
}

/// A RabbitMQ broker on `url` with queues under `prefix`; the queues expire
/// ten minutes after their last use so test runs do not pile them up.
pub async fn rabbit_broker_with_prefix(url: &str, prefix: &str) -> RabbitBroker {
    RabbitBroker::connect(url, prefix)
        .await
        .unwrap_or_else(|e| {
            panic!("RabbitMQ is required for this test ({e}); start it with tests/run or set CARDPIPE_TEST_AMQP_URL")
        })
        .with_queue_expiry(std::time::Duration::from_secs(600))
}

/// An S3 object store on a fresh bucket.
pub async fn s3_store() -> S3ObjectStore {
    S3ObjectStore::connect(&s3_settings()).await.unwrap_or_else(|e| {
        panic!("the S3 server is required for this test ({e}); start it with tests/run or set CARDPIPE_TEST_S3_ENDPOINT")
    })
}

/// A sealer with a fresh random master key.
pub fn test_sealer() -> crate::envelope::Sealer {
    crate::envelope::Sealer::new("test", &crate::envelope::Sealer::generate_key_hex())
        .expect("valid key")
}

/// Which family of backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// SQLite, in-process broker, local files.
    Embedded,
    /// PostgreSQL, RabbitMQ, S3.
    Distributed,
}

/// Fresh services of one mode; the guard keeps temp dirs alive.
pub async fn services(
    mode: Mode,
    clock: Option<Arc<dyn Clock>>,
) -> (Services, Option<tempfile::TempDir>) {
    let clock = clock.unwrap_or_else(|| Arc::new(SystemClock));
    match mode {
        Mode::Embedded => {
            let (store, dir) = sqlite_store().await;
            let objects = FsObjectStore::open(dir.path().join("objects"))
                .await
                .expect("objects dir");
            let services = Services {
                store,
                broker: Arc::new(MemoryBroker::new()) as Arc<dyn Broker>,
                objects: Arc::new(objects) as Arc<dyn ObjectStore>,
                clock,
                metrics: Metrics::new(),
                sealer: Arc::new(test_sealer()),
            };
            (services, Some(dir))
        }
        Mode::Distributed => {
            let services = Services {
                store: postgres_store().await,
                broker: Arc::new(rabbit_broker().await),
                objects: Arc::new(s3_store().await),
                clock,
                metrics: Metrics::new(),
                sealer: Arc::new(test_sealer()),
            };
            (services, None)
        }
    }
}

/// Appends `n` operator actions (`parked.retry` on `app-<i>`) to the audit log.
pub async fn audit_append(store: &Store, n: usize) {
    for i in 0..n {
        crate::audit::record(
            store,
            &SystemClock,
            &crate::audit::AuditEvent {
                actor: "op1",
                role: "operator",
                action: "parked.retry",
                subject: &format!("app-{i}"),
                details: serde_json::json!({ "reason": "operator retry", "n": i }),
            },
        )
        .await
        .expect("appending to the audit log");
    }
}

/// Drops the triggers guarding the audit log, as the database owner covering tracks would
/// (tamper tests).
pub async fn audit_drop_guards(store: &Store) {
    let statements: &[&str] = match store.dialect() {
        crate::store::Dialect::Postgres => &[
            "DROP TRIGGER audit_log_no_update ON audit_log",
            "DROP TRIGGER audit_log_no_truncate ON audit_log",
        ],
        crate::store::Dialect::Sqlite => &[
            "DROP TRIGGER audit_log_no_update",
            "DROP TRIGGER audit_log_no_delete",
        ],
    };
    for s in statements {
        sqlx::query(*s)
            .execute(store.pool())
            .await
            .expect("dropping an audit trigger");
    }
}

/// Test-only stages for exercising the runtime (never registered in the
/// `cardpipe` binary).
pub mod stages {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use async_trait::async_trait;
    use bytes::Bytes;

    use crate::domain::{Application, ApplicationState};
    use crate::runtime::{Completion, JobContext, Permanent, Stage};

    /// Moves applications from one state to the next, optionally writing an
    /// artifact object (a visible side effect), failing the first attempts,
    /// or failing permanently.
    pub struct StepStage {
        /// Stage name.
        pub name: &'static str,
        /// Input states.
        pub from: &'static [ApplicationState],
        /// Output state.
        pub to: ApplicationState,
        /// Next stage.
        pub next: Option<&'static str>,
        /// Write an artifact object and record it.
        pub write_artifact: bool,
        /// Fail this many attempts per application before succeeding.
        pub fail_first: u32,
        /// Fail every attempt with a permanent error.
        pub always_permanent: bool,
        /// Pretend work takes this long (tests of graceful shutdown).
        pub work: std::time::Duration,
        /// Handler calls so far.
        pub calls: Arc<AtomicU64>,
        attempts: Mutex<HashMap<String, u32>>,
    }

    impl StepStage {
        /// A plain step `from -> to`, then `next`.
        pub fn new(
            name: &'static str,
            from: &'static [ApplicationState],
            to: ApplicationState,
            next: Option<&'static str>,
        ) -> Self {
            Self {
                name,
                from,
                to,
                next,
                write_artifact: false,
                fail_first: 0,
                always_permanent: false,
                work: std::time::Duration::ZERO,
                calls: Arc::new(AtomicU64::new(0)),
                attempts: Mutex::new(HashMap::new()),
            }
        }
    }

    #[async_trait]
    impl Stage for StepStage {
        fn name(&self) -> &'static str {
            self.name
        }

        fn accepts(&self) -> &'static [ApplicationState] {
            self.from
        }

        async fn handle(&self, ctx: &JobContext, app: &Application) -> anyhow::Result<Completion> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if !self.work.is_zero() {
                tokio::time::sleep(self.work).await;
            }
            if self.always_permanent {
                return Err(Permanent("test stage refuses this application".into()).into());
            }
            let seen = {
                let mut attempts = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
                let n = attempts.entry(app.id.0.clone()).or_insert(0);
                *n += 1;
                *n
            };
            if seen <= self.fail_first {
                anyhow::bail!("test stage fails attempt {seen}");
            }
            let mut completion = Completion::to(self.to);
            if let Some(next) = self.next {
                completion = completion.then(next);
            }
            if self.write_artifact {
                // A fresh key per attempt: an uncommitted attempt leaves an
                // orphan, never overwrites what a committed one recorded.
                let key = format!("test/{}/{}-{}", app.id, self.name, uuid::Uuid::new_v4());
                ctx.services
                    .objects
                    .put(&key, Bytes::from(app.id.0.clone()))
                    .await?;
                completion = completion.artifact(format!("{}-output", self.name), key);
            }
            Ok(completion)
        }
    }
}

/// A TCP proxy in front of RabbitMQ, so a test can make connections die the
/// way they do when a process is killed or the broker restarts (the server
/// sees the socket close at once and requeues unacknowledged deliveries).
#[derive(Debug)]
pub struct AmqpProxy {
    /// AMQP URL that goes through the proxy.
    pub url: String,
    cut: tokio::sync::watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl AmqpProxy {
    /// Starts a proxy to the test RabbitMQ on a free local port.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let upstream_url = amqp_url();
        let upstream = upstream_url
            .split('@')
            .nth(1)
            .and_then(|h| h.split('/').next())
            .unwrap_or("127.0.0.1:5672")
            .to_owned();
        let credentials = upstream_url
            .split("://")
            .nth(1)
            .and_then(|r| r.split('@').next())
            .unwrap_or("guest:guest")
            .to_owned();
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let cut_tx = cut.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let upstream = upstream.clone();
                let mut cut_rx = cut_tx.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Self {
            url: format!("amqp://{credentials}@127.0.0.1:{port}/%2f"),
            cut,
            accept,
        }
    }

    /// Severs every open connection (clients may reconnect).
    pub fn cut_all(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// Severs every connection and refuses new ones: the process is gone.
    pub fn kill(self) {
        self.accept.abort();
        self.cut_all();
    }
}
