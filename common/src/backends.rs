//! Builds the configured backends. The only place that knows which
//! implementation stands behind each trait.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;

use crate::broker::Broker;
use crate::broker::memory::MemoryBroker;
use crate::broker::rabbitmq::RabbitBroker;
use crate::clock::Clock;
use crate::config::{BrokerKind, ObjectsKind, PipelineConfig};
use crate::envelope::Sealer;
use crate::objects::ObjectStore;
use crate::objects::fs::FsObjectStore;
use crate::objects::s3::{S3ObjectStore, S3Settings};
use crate::runtime::Services;
use crate::store::Store;
use crate::telemetry::metrics::Metrics;

/// Connects the store (applying migrations), the broker and the object store; the first
/// failure to reach one of them is the error (one-shot commands: an operator wants the
/// answer now).
pub async fn connect(config: &PipelineConfig, clock: Arc<dyn Clock>) -> anyhow::Result<Services> {
    connect_within(config, clock, Duration::ZERO).await
}

/// [`connect`] for a long-running process: a server not reachable yet (PostgreSQL, RabbitMQ,
/// S3; never the embedded backends) is waited for, up to `[runtime] startup_wait_seconds`,
/// retrying with growing pauses ([`retry_until`]). A worker
/// started while the object store restarts then comes up when it is back, instead of
/// exiting and relying on a supervisor to start it again.
pub async fn connect_waiting(
    config: &PipelineConfig,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Services> {
    let wait = Duration::from_secs(config.runtime.startup_wait_seconds);
    connect_within(config, clock, wait).await
}

/// Calls `attempt` until it succeeds or `wait` has passed since the first call, pausing
/// 0.5 s after the first failure and doubling up to 5 s; each failure is logged as a warning
/// naming `what` is awaited. The error is the last attempt's.
pub async fn retry_until<T, F, Fut>(what: &str, wait: Duration, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + wait;
    let mut pause = Duration::from_millis(500);
    let mut attempts = 1u32;
    loop {
        match attempt().await {
            Ok(value) => {
                if attempts > 1 {
                    tracing::info!(dependency = what, attempts, "reached at start-up");
                }
                return Ok(value);
            }
            Err(e) => {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return Err(e);
                }
                tracing::warn!(
                    dependency = what,
                    attempt = attempts,
                    error = format!("{e:#}"),
                    "not reachable yet; waiting for it at start-up"
                );
                tokio::time::sleep(pause.min(deadline - now)).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                attempts += 1;
            }
        }
    }
}

/// How long to wait for the store at `url`: an embedded store is a file, and failing to open
/// it will not pass by waiting.
fn store_wait(url: &str, wait: Duration) -> Duration {
    if url.starts_with("sqlite:") {
        Duration::ZERO
    } else {
        wait
    }
}

async fn connect_within(
    config: &PipelineConfig,
    clock: Arc<dyn Clock>,
    wait: Duration,
) -> anyhow::Result<Services> {
    use anyhow::Context;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
    let store_url = config.store.url.expose_secret();
    let store = retry_until("store", store_wait(store_url, wait), || async {
        Store::connect(store_url, config.store.max_connections)
            .await
            .with_context(|| {
                format!(
                    "connecting to the store at {}",
                    crate::store::redact_url(store_url)
                )
            })
    })
    .await?;
    if config.store.migrate_at_start {
        store.migrate().await.context("applying migrations")?;
    } else {
        store.check_migrated().await?;
    }
    let broker: Arc<dyn Broker> = match config.broker.kind {
        BrokerKind::Memory => Arc::new(MemoryBroker::new()),
        BrokerKind::Rabbitmq => Arc::new(
            retry_until("broker", wait, || async {
                RabbitBroker::connect(
                    config.broker.url.expose_secret(),
                    &config.broker.queue_prefix,
                )
                .await
                .with_context(|| {
                    format!(
                        "connecting to RabbitMQ at {}",
                        crate::store::redact_url(config.broker.url.expose_secret())
                    )
                })
            })
            .await?,
        ),
    };
    let objects: Arc<dyn ObjectStore> = match config.objects.kind {
        ObjectsKind::Fs => {
            Arc::new(FsObjectStore::open(config.data_path(&config.objects.root)).await?)
        }
        ObjectsKind::S3 => Arc::new(
            retry_until("object store", wait, || async {
                S3ObjectStore::connect(&S3Settings {
                    endpoint: config.objects.endpoint.clone(),
                    region: config.objects.region.clone(),
                    bucket: config.objects.bucket.clone(),
                    access_key: config.objects.access_key.clone(),
                    secret_key: config.objects.secret_key.clone(),
                })
                .await
                .with_context(|| format!("connecting to S3 at {}", config.objects.endpoint))
            })
            .await?,
        ),
    };
    let sealer = Arc::new(sealer(config)?);
    Ok(Services {
        store,
        broker,
        objects,
        clock,
        metrics: Metrics::new(),
        sealer,
    })
}

/// The envelope sealer from `[envelope]`; in embedded mode with no key
/// configured, a key generated once into `data_dir` (mode 0600).
pub fn sealer(config: &PipelineConfig) -> anyhow::Result<Sealer> {
    use anyhow::Context;
    let env = &config.envelope;
    let key: secrecy::SecretString = if env.master_key.expose_secret().is_empty() {
        let path = config.data_dir.join(format!("envelope-{}.key", env.key_id));
        if !path.exists() {
            write_private(&path, Sealer::generate_key_hex().expose_secret())
                .with_context(|| format!("creating {}", path.display()))?;
            tracing::info!(path = %path.display(), "generated the embedded-mode envelope master key");
        }
        std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_owned()
            .into()
    } else {
        env.master_key.clone()
    };
    let mut sealer = Sealer::new(&env.key_id, &key).context("envelope.master_key")?;
    for (id, key) in &env.previous_keys {
        sealer = sealer
            .with_previous(id, key)
            .with_context(|| format!("envelope.previous_keys.{id}"))?;
    }
    if !env.lookup_key.expose_secret().is_empty() {
        sealer = sealer
            .with_lookup_key(&env.lookup_key_id, &env.lookup_key)
            .context("envelope.lookup_key")?;
    }
    for (id, key) in &env.previous_lookup_keys {
        sealer = sealer
            .with_previous_lookup_key(id, key)
            .with_context(|| format!("envelope.previous_lookup_keys.{id}"))?;
    }
    Ok(sealer)
}

fn write_private(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(contents.as_bytes())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_backend_that_comes_up_within_the_wait_is_waited_for() {
        let calls = AtomicU32::new(0);
        let started = std::time::Instant::now();
        let value = retry_until("object store", Duration::from_secs(60), || async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0..=1 => anyhow::bail!("connection refused"),
                _ => Ok(7),
            }
        })
        .await
        .expect("up on the third attempt");
        assert_eq!(value, 7);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // Pauses of 0.5 and 1 s between the three attempts.
        assert!(started.elapsed() >= Duration::from_millis(1500));
    }

    #[tokio::test]
    async fn a_backend_still_down_at_the_deadline_fails_with_its_last_error() {
        let calls = AtomicU32::new(0);
        let err = retry_until("broker", Duration::from_millis(1200), || async {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(anyhow::anyhow!("connection refused (attempt {n})"))
        })
        .await
        .expect_err("never up");
        // Attempts at 0, 0.5 and 1.2 s (the second pause cut at the deadline).
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(err.to_string(), "connection refused (attempt 2)");
    }

    #[test]
    fn only_a_database_server_is_waited_for() {
        let wait = Duration::from_secs(120);
        assert_eq!(store_wait("postgres://cardpipe@db/cardpipe", wait), wait);
        assert_eq!(store_wait("sqlite:var/cardpipe.db", wait), Duration::ZERO);
        assert_eq!(
            store_wait("sqlite:///srv/cardpipe.db", wait),
            Duration::ZERO
        );
    }

    #[tokio::test]
    async fn no_wait_means_one_attempt() {
        let calls = AtomicU32::new(0);
        let result = retry_until("store", Duration::ZERO, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(anyhow::anyhow!("refused"))
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
