//! A set of stage runners plus the outbox relay, started and stopped together:
//! what `cardpipe run` (every stage) and `cardpipe worker <stage>` (one) run,
//! and what tests spawn.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::recover::requeue_stranded;
use super::relay::Relay;
use super::runner::{StageRunner, StageSettings};
use super::{Services, Stage};

/// Running stages and relay.
pub struct RunningPipeline {
    runners_stop: CancellationToken,
    relay_stop: CancellationToken,
    runners: JoinSet<anyhow::Result<()>>,
    relay: JoinHandle<anyhow::Result<()>>,
    grace: Duration,
}

impl std::fmt::Debug for RunningPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningPipeline")
            .field("runners", &self.runners.len())
            .finish()
    }
}

/// Starts `stages` (with their settings) and `relay` on `services`.
///
/// With a non-durable broker (the in-process one), work the previous process
/// left in the store is re-enqueued first.
pub async fn start(
    services: &Services,
    stages: Vec<(Arc<dyn Stage>, StageSettings)>,
    relay: Relay,
    grace: Duration,
) -> anyhow::Result<RunningPipeline> {
    for (stage, settings) in &stages {
        services
            .broker
            .declare_stage(stage.name(), &settings.retry)
            .await?;
    }
    if services.broker.kind() == "memory" {
        for (stage, _) in &stages {
            requeue_stranded(services, stage.as_ref()).await?;
        }
    }
    let runners_stop = CancellationToken::new();
    let relay_stop = CancellationToken::new();
    let wakeup = relay.wakeup();
    let mut runners = JoinSet::new();
    for (stage, settings) in stages {
        let runner =
            StageRunner::new(services.clone(), stage, settings).with_relay_wakeup(wakeup.clone());
        runners.spawn(runner.run(runners_stop.clone()));
    }
    let relay = tokio::spawn(relay.run(relay_stop.clone(), grace));
    Ok(RunningPipeline {
        runners_stop,
        relay_stop,
        runners,
        relay,
        grace,
    })
}

impl RunningPipeline {
    /// Stops consuming, lets in-flight jobs finish, then flushes the outbox
    /// (each within the grace period); returns the first error any task had.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.runners_stop.cancel();
        let mut first_error = None;
        let drained = tokio::time::timeout(self.grace, async {
            while let Some(result) = self.runners.join_next().await {
                if let Err(err) = result.map_err(anyhow::Error::from).and_then(|r| r) {
                    first_error.get_or_insert(err);
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "shutdown grace period over; abandoning in-flight work (it will be redelivered)"
            );
            self.runners.abort_all();
        }
        // The relay outlives the runners so their last commits get out.
        self.relay_stop.cancel();
        match tokio::time::timeout(self.grace + Duration::from_secs(5), &mut self.relay).await {
            Ok(result) => {
                if let Err(err) = result.map_err(anyhow::Error::from).and_then(|r| r) {
                    first_error.get_or_insert(err);
                }
            }
            Err(_) => self.relay.abort(),
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Waits until a runner stops on its own (a simulated crash, or a fatal
    /// error), returning its result; `None` when there are no runners.
    pub async fn wait_runner(&mut self) -> Option<anyhow::Result<()>> {
        let result = self.runners.join_next().await?;
        Some(result.map_err(anyhow::Error::from).and_then(|r| r))
    }
}
