//! Builds the configured backends. The only place that knows which
//! implementation stands behind each trait.

use std::sync::Arc;

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

/// Connects the store (applying migrations), the broker and the object store.
pub async fn connect(config: &PipelineConfig, clock: Arc<dyn Clock>) -> anyhow::Result<Services> {
    use anyhow::Context;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
    let store_url = config.store.url.expose_secret();
    let store = Store::connect(store_url, config.store.max_connections)
        .await
        .with_context(|| {
            format!(
                "connecting to the store at {}",
                crate::store::redact_url(store_url)
            )
        })?;
    if config.store.migrate_at_start {
        store.migrate().await.context("applying migrations")?;
    } else {
        store.check_migrated().await?;
    }
    let broker: Arc<dyn Broker> = match config.broker.kind {
        BrokerKind::Memory => Arc::new(MemoryBroker::new()),
        BrokerKind::Rabbitmq => Arc::new(
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
            })?,
        ),
    };
    let objects: Arc<dyn ObjectStore> = match config.objects.kind {
        ObjectsKind::Fs => {
            Arc::new(FsObjectStore::open(config.data_path(&config.objects.root)).await?)
        }
        ObjectsKind::S3 => Arc::new(
            S3ObjectStore::connect(&S3Settings {
                endpoint: config.objects.endpoint.clone(),
                region: config.objects.region.clone(),
                bucket: config.objects.bucket.clone(),
                access_key: config.objects.access_key.clone(),
                secret_key: config.objects.secret_key.clone(),
            })
            .await
            .with_context(|| format!("connecting to S3 at {}", config.objects.endpoint))?,
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
