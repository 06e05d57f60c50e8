//! `cardpipe abis serve`: the MOSIP ABIS API (cardpipe_dedup::mosip) as a process of its own.
//!
//! It connects the configured store (the gallery of MOSIP reference ids lives in
//! `abis_references`), takes the gallery lease (one serving process per gallery; a
//! restarted process waits for the lease of a killed one to expire), loads the gallery,
//! then serves `POST /abis/v1/request`, `/metrics`, `/healthz` and `/readyz` on
//! `[abis] listen` and, with `[abis.queue] enabled`, consumes the inbound queue. SIGTERM or
//! ctrl-c stops it: the queue consumer closes its channel (an unanswered request goes back
//! to the queue), HTTP requests in flight finish.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use cardpipe_common::backends;
use cardpipe_common::clock::{self, Clock};
use cardpipe_common::config::LoadedConfig;
use cardpipe_common::telemetry;
use cardpipe_dedup::mosip::{self, MosipAbis, config::AbisConfig};
use clap::Subcommand;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Subcommand)]
pub enum AbisCommand {
    /// Serve the MOSIP ABIS API until ctrl-c / SIGTERM.
    Serve,
}

/// Lease time; renewed every third of it.
const LEASE_TTL: Duration = Duration::from_secs(30);

pub async fn run(loaded: LoadedConfig, command: AbisCommand) -> anyhow::Result<()> {
    match command {
        AbisCommand::Serve => serve(loaded).await,
    }
}

async fn serve(loaded: LoadedConfig) -> anyhow::Result<()> {
    let config = AbisConfig::from_loaded(&loaded)?;
    let pipeline = &loaded.config;
    telemetry::init(
        pipeline.telemetry.log_format,
        &pipeline.telemetry.log_filter,
    );
    let clock: Arc<dyn Clock> = clock::for_data_dir(&pipeline.data_dir)?;
    let services = backends::connect(pipeline, clock.clone()).await?;
    let holder = format!("abis-serve:{}:{}", std::process::id(), uuid::Uuid::new_v4());
    take_lease(&services, &holder).await?;
    let listen = config.listen;
    let queue_enabled = config.queue.enabled;
    if config.clients.is_empty() {
        tracing::warn!(
            "[abis] clients is empty: every HTTP request is refused (the queue form still works)"
        );
    }
    let abis = MosipAbis::start(services.clone(), config).await?;

    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    if queue_enabled {
        tasks.spawn(mosip::queue::run(abis.clone(), stop.clone()));
    }
    {
        let (services, holder, stop) = (services.clone(), holder.clone(), stop.clone());
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(LEASE_TTL / 3) => {}
                }
                let ttl = time::Duration::try_from(LEASE_TTL).expect("a short duration");
                match services
                    .store
                    .try_lease(mosip::LEASE, &holder, services.clock.now(), ttl)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => anyhow::bail!(
                        "the MOSIP ABIS gallery lease was taken by another process: stopping"
                    ),
                    Err(err) => tracing::warn!(error = %err, "renewing the MOSIP ABIS gallery lease failed; retrying"),
                }
            }
        });
    }
    let app = telemetry::http::router(services.clone(), Vec::new())
        .merge(mosip::http::router(abis.clone()));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen} ([abis] listen): {e}"))?;
    let http = {
        let stop = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        })
    };
    tracing::info!(
        listen = %listen,
        queue = queue_enabled,
        references = abis.reference_count(),
        "MOSIP ABIS API serving on {listen}{}",
        mosip::http::PATH
    );
    let failed = tokio::select! {
        _ = crate::process::wait_for_signal() => None,
        Some(done) = tasks.join_next() => match done {
            Ok(Err(err)) => Some(err),
            Ok(Ok(())) => None,
            Err(join) => Some(anyhow::anyhow!("a task of abis serve panicked: {join}")),
        },
    };
    tracing::info!("MOSIP ABIS API stopping");
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    let _ = http.await;
    let _ = services.store.release_lease(mosip::LEASE, &holder).await;
    services.store.close().await;
    match failed {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

/// Takes the gallery lease, waiting up to two lease times for a killed holder's to expire.
async fn take_lease(
    services: &cardpipe_common::runtime::Services,
    holder: &str,
) -> anyhow::Result<()> {
    let ttl = time::Duration::try_from(LEASE_TTL).expect("a short duration");
    let deadline = tokio::time::Instant::now() + 2 * LEASE_TTL;
    let mut said = false;
    loop {
        if services
            .store
            .try_lease(mosip::LEASE, holder, services.clock.now(), ttl)
            .await
            .context("taking the MOSIP ABIS gallery lease")?
        {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "another `cardpipe abis serve` holds the MOSIP ABIS gallery (lease {}); one process \
             serves a gallery",
            mosip::LEASE
        );
        if !said {
            tracing::warn!("the MOSIP ABIS gallery lease is held; waiting for it to expire");
            said = true;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
