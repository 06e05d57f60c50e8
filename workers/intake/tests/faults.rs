//! Intake under faults: the object store or the database fails at a point of a batch, the
//! registry is told to resubmit (503), and the resubmission's report accounts for every line
//! of the batch exactly once — on both backend families. Once, a failed chunk lost the valid
//! lines that came before an over-long line in it: the rejection was committed on its own
//! and the resubmission skipped everything up to the highest recorded line.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use bytes::Bytes;
use cardpipe_common::objects::{ObjectError, ObjectStore};
use cardpipe_common::runtime::Services;
use cardpipe_common::testing::{self, Mode};
use cardpipe_intake::api::router;
use cardpipe_intake::intake::{BatchReport, tehran_today};
use cardpipe_registry::config::{ClientConfig, RegistryConfig, hash_token};
use cardpipe_registry::synth;
use http_body_util::BodyExt;
use sqlx::Row;
use tower::ServiceExt;

const TOKEN: &str = "registry-test-token";
const RECORDS: usize = 20;
/// Lines of the batch that are longer than the limit (1-based).
const OVERLONG: [usize; 2] = [2, 9];
const LINES: usize = RECORDS + OVERLONG.len();

fn config() -> RegistryConfig {
    RegistryConfig {
        clients: vec![ClientConfig {
            name: "civil-registry".into(),
            token_sha256: hash_token(TOKEN),
        }],
        chunk_size: 5,
        max_line_bytes: 64 * 1024,
        ..RegistryConfig::default()
    }
}

/// An object store whose `put` number `fail_at` (1-based; 0: none) fails.
struct FlakyObjects {
    inner: Arc<dyn ObjectStore>,
    puts: AtomicU64,
    fail_at: AtomicU64,
}

#[async_trait]
impl ObjectStore for FlakyObjects {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), ObjectError> {
        let n = self.puts.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.fail_at.load(Ordering::SeqCst) {
            return Err(ObjectError::Backend {
                op: "put",
                key: key.to_owned(),
                message: "injected failure".into(),
            });
        }
        self.inner.put(key, bytes).await
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>, ObjectError> {
        self.inner.get(key).await
    }
    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        self.inner.delete(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, ObjectError> {
        self.inner.list(prefix).await
    }
    async fn ping(&self) -> Result<(), ObjectError> {
        self.inner.ping().await
    }
}

/// 20 valid records with over-long lines at [`OVERLONG`].
fn batch(services: &Services) -> Vec<u8> {
    let spec = synth::spec(91, RECORDS, false, tehran_today(services.clock.now()));
    let mut out = Vec::new();
    synth::write_batch(&spec, &mut out).unwrap();
    let mut lines: Vec<String> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    for at in OVERLONG {
        lines.insert(at - 1, "x".repeat(100_000));
    }
    assert_eq!(lines.len(), LINES);
    (lines.join("\n") + "\n").into_bytes()
}

async fn post(app: &axum::Router, body: Vec<u8>) -> (StatusCode, String) {
    let req = Request::builder()
        .method("POST")
        .uri("/api/v1/batches")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("idempotency-key", "faulty-batch")
        .header("content-type", "application/x-ndjson")
        .body(Body::from(body))
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

async fn count(services: &Services, sql: &'static str) -> i64 {
    sqlx::query(sql)
        .fetch_one(services.store.pool())
        .await
        .unwrap()
        .try_get::<i64, _>(0)
        .unwrap()
}

/// The resubmission's report accounts for every line exactly once.
async fn every_line_accounted_for(services: &Services, app: &axum::Router, body: Vec<u8>) {
    let (status, text) = post(app, body).await;
    assert!(status.is_success(), "resubmission: {status} {text}");
    let report: BatchReport = serde_json::from_str(&text).unwrap();
    assert_eq!(report.accepted, RECORDS as i64, "{text}");
    assert_eq!(report.rejected, OVERLONG.len() as i64, "{text}");
    let mut lines: Vec<i64> = report.errors.iter().map(|e| e.line).collect();
    lines.sort();
    assert_eq!(lines, OVERLONG.map(|l| l as i64).to_vec(), "{text}");
    assert!(
        report
            .errors
            .iter()
            .all(|e| e.reason.contains("longer than")),
        "{text}"
    );
    assert_eq!(
        count(
            services,
            "SELECT COUNT(DISTINCT line) FROM batch_records WHERE batch_id IS NOT NULL"
        )
        .await,
        LINES as i64
    );
    assert_eq!(
        count(services, "SELECT COUNT(*) FROM batch_records").await,
        LINES as i64,
        "no line recorded twice"
    );
    assert_eq!(
        count(services, "SELECT COUNT(*) FROM applications").await,
        RECORDS as i64
    );
}

async fn object_store_failure_at_each_point(mode: Mode) {
    for fail_at in [1, 3, 7, 12] {
        let (services, _g) = testing::services(mode, None).await;
        let flaky = Arc::new(FlakyObjects {
            inner: services.objects.clone(),
            puts: AtomicU64::new(0),
            fail_at: AtomicU64::new(fail_at),
        });
        let mut faulty = services.clone();
        faulty.objects = flaky.clone();
        let app = router(faulty, config());
        let body = batch(&services);
        let (status, text) = post(&app, body.clone()).await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "put #{fail_at} failed: {text}"
        );
        assert!(text.contains("resubmitting a batch is safe"), "{text}");
        flaky.fail_at.store(0, Ordering::SeqCst);
        every_line_accounted_for(&services, &app, body).await;
    }
}

/// A database failure inside a chunk's transaction: the insert of `line`'s row is refused by
/// a trigger, as a failed commit would be.
async fn database_failure_at_each_point(mode: Mode) {
    for line in [1, 3, 10, LINES] {
        let (services, _g) = testing::services(mode, None).await;
        let pool = services.store.pool();
        match mode {
            Mode::Embedded => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "CREATE TRIGGER injected_failure BEFORE INSERT ON batch_records
                     WHEN NEW.line = {line} BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
                )))
                .execute(pool)
                .await
                .unwrap();
            }
            Mode::Distributed => {
                sqlx::query(
                    "CREATE FUNCTION injected_failure() RETURNS trigger AS $$
                     BEGIN RAISE EXCEPTION 'injected failure'; END $$ LANGUAGE plpgsql",
                )
                .execute(pool)
                .await
                .unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "CREATE TRIGGER injected_failure BEFORE INSERT ON batch_records FOR EACH ROW
                     WHEN (NEW.line = {line}) EXECUTE FUNCTION injected_failure()"
                )))
                .execute(pool)
                .await
                .unwrap();
            }
        }
        let app = router(services.clone(), config());
        let body = batch(&services);
        let (status, text) = post(&app, body.clone()).await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "line {line} refused: {text}"
        );
        let drop = match mode {
            Mode::Embedded => "DROP TRIGGER injected_failure",
            Mode::Distributed => "DROP TRIGGER injected_failure ON batch_records",
        };
        sqlx::query(drop).execute(pool).await.unwrap();
        every_line_accounted_for(&services, &app, body).await;
    }
}

mod embedded {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn object_store_failure_at_each_point() {
        super::object_store_failure_at_each_point(super::Mode::Embedded).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn database_failure_at_each_point() {
        super::database_failure_at_each_point(super::Mode::Embedded).await
    }
}

mod distributed {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn object_store_failure_at_each_point() {
        super::object_store_failure_at_each_point(super::Mode::Distributed).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn database_failure_at_each_point() {
        super::database_failure_at_each_point(super::Mode::Distributed).await
    }
}
