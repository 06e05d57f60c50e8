//! Helpers for cardpipe end-to-end tests and the runtime soak/benchmark
//! binary (`runtime-soak`): a two-stage test pipeline over real backends.

use std::sync::Arc;
use std::time::Duration;

use cardpipe_common::broker::memory::MemoryBroker;
use cardpipe_common::broker::{Broker, Job, RetryPolicy};
use cardpipe_common::clock::SystemClock;
use cardpipe_common::domain::{ApplicationId, ApplicationState, Priority};
use cardpipe_common::objects::ObjectStore;
use cardpipe_common::objects::fs::FsObjectStore;
use cardpipe_common::objects::s3::S3ObjectStore;
use cardpipe_common::runtime::{Services, Stage, StageSettings};
use cardpipe_common::store::{NewApplication, Store};
use cardpipe_common::telemetry::metrics::Metrics;
use cardpipe_common::testing::{self, stages::StepStage};

/// Input states of the test stages.
pub const ALPHA_FROM: &[ApplicationState] = &[ApplicationState::DedupPending];
/// Input states of the second test stage.
pub const BETA_FROM: &[ApplicationState] = &[ApplicationState::DedupClear];

/// Where a soak run keeps its state, so a restarted process finds it.
#[derive(Debug, Clone)]
pub struct SoakTarget {
    /// Store URL (postgres:// or sqlite:).
    pub store_url: String,
    /// RabbitMQ queue prefix, or `None` for the in-process broker.
    pub rabbit_prefix: Option<String>,
    /// S3 bucket, or `None` for a local directory.
    pub bucket: Option<String>,
    /// Local objects directory (embedded).
    pub objects_dir: Option<std::path::PathBuf>,
}

impl SoakTarget {
    /// Reads the target from `CARDPIPE_SOAK_*` variables.
    pub fn from_env() -> anyhow::Result<Self> {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        Ok(Self {
            store_url: var("CARDPIPE_SOAK_STORE_URL")
                .ok_or_else(|| anyhow::anyhow!("CARDPIPE_SOAK_STORE_URL is required"))?,
            rabbit_prefix: var("CARDPIPE_SOAK_RABBIT_PREFIX"),
            bucket: var("CARDPIPE_SOAK_BUCKET"),
            objects_dir: var("CARDPIPE_SOAK_OBJECTS_DIR").map(Into::into),
        })
    }

    /// Environment variables describing the target, for a child process.
    pub fn to_env(&self) -> Vec<(String, String)> {
        let mut env = vec![("CARDPIPE_SOAK_STORE_URL".to_owned(), self.store_url.clone())];
        if let Some(p) = &self.rabbit_prefix {
            env.push(("CARDPIPE_SOAK_RABBIT_PREFIX".into(), p.clone()));
        }
        if let Some(b) = &self.bucket {
            env.push(("CARDPIPE_SOAK_BUCKET".into(), b.clone()));
        }
        if let Some(d) = &self.objects_dir {
            env.push(("CARDPIPE_SOAK_OBJECTS_DIR".into(), d.display().to_string()));
        }
        env
    }

    /// Connects the services the target names.
    pub async fn connect(&self) -> anyhow::Result<Services> {
        let store = Store::connect(&self.store_url, 8).await?;
        store.migrate().await?;
        let broker: Arc<dyn Broker> = match &self.rabbit_prefix {
            Some(prefix) => {
                Arc::new(testing::rabbit_broker_with_prefix(&testing::amqp_url(), prefix).await)
            }
            None => Arc::new(MemoryBroker::new()),
        };
        let objects: Arc<dyn ObjectStore> = match (&self.bucket, &self.objects_dir) {
            (Some(bucket), _) => {
                let mut settings = testing::s3_settings();
                settings.bucket = bucket.clone();
                Arc::new(S3ObjectStore::connect(&settings).await?)
            }
            (None, Some(dir)) => Arc::new(FsObjectStore::open(dir).await?),
            (None, None) => anyhow::bail!("a bucket or an objects directory is required"),
        };
        Ok(Services {
            store,
            broker,
            objects,
            clock: Arc::new(SystemClock),
            metrics: Metrics::new(),
            sealer: Arc::new(testing::test_sealer()),
        })
    }
}

/// The two test stages: alpha (dedup_pending → dedup_clear, then beta) and
/// beta (dedup_clear → keys_issued, writing an artifact object).
pub fn test_stages(concurrency: usize) -> Vec<(Arc<dyn Stage>, StageSettings)> {
    let settings = StageSettings {
        concurrency,
        prefetch: u16::try_from(concurrency * 2).unwrap_or(u16::MAX),
        retry: RetryPolicy {
            delays: vec![Duration::from_millis(200), Duration::from_secs(1)],
            max_attempts: 5,
        },
    };
    let alpha = StepStage::new(
        "alpha",
        ALPHA_FROM,
        ApplicationState::DedupClear,
        Some("beta"),
    );
    let mut beta = StepStage::new("beta", BETA_FROM, ApplicationState::KeysIssued, None);
    beta.write_artifact = true;
    vec![
        (Arc::new(alpha), settings.clone()),
        (Arc::new(beta), settings),
    ]
}

/// Inserts `n` applications ready for alpha, with their jobs in the outbox.
pub async fn seed(services: &Services, n: usize) -> anyhow::Result<Vec<ApplicationId>> {
    let now = time::OffsetDateTime::now_utc();
    let mut ids = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let mut tx = services.store.begin().await?;
        for _ in chunk {
            let id = ApplicationId::generate();
            let app = NewApplication {
                id: id.clone(),
                registry_id: format!("SOAK-{id}"),
                batch_id: None,
                state: ApplicationState::DedupPending,
                priority: Priority::Normal,
            };
            Store::insert_application(&mut tx, &app, "registry:soak", now).await?;
            Store::enqueue_job(&mut tx, &Job::new("alpha", id.as_str()), now).await?;
            ids.push(id);
        }
        tx.commit().await?;
    }
    Ok(ids)
}

/// Applications in `state` now.
pub async fn count_in(services: &Services, state: ApplicationState) -> anyhow::Result<i64> {
    Ok(services
        .store
        .count_by_state()
        .await?
        .into_iter()
        .find(|(s, _)| *s == state)
        .map_or(0, |(_, n)| n))
}
