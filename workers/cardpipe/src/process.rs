//! One cardpipe process: backends, stage runners, relay, HTTP, signals.

use std::sync::Arc;
use std::time::Duration;

use cardpipe_common::backends;
use cardpipe_common::clock::{self, Clock, ShiftedClock};
use cardpipe_common::config::{LoadedConfig, PipelineConfig};
use cardpipe_common::domain::ApplicationState;
use cardpipe_common::domain::state::ALL_STATES;
use cardpipe_common::runtime::pipeline;
use cardpipe_common::runtime::relay::{Lane, LaneSettings, Relay};
use cardpipe_common::store::{Store, redact_url};
use cardpipe_common::telemetry;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::stages;

/// The store URL without its password.
pub fn describe_store(config: &PipelineConfig) -> String {
    redact_url(config.store.url.expose_secret())
}

/// Applies migrations; with `[store] owner_url`, as the schema owner, then grants the
/// services' role (`[store] url`) its rights (INSERT and SELECT only on the audit log).
pub async fn migrate(loaded: LoadedConfig) -> anyhow::Result<()> {
    let config = &loaded.config;
    telemetry::init(config.telemetry.log_format, &config.telemetry.log_filter);
    let owner_url = config.store.owner_url.expose_secret();
    if owner_url.is_empty() {
        let store = Store::connect(config.store.url.expose_secret(), 1).await?;
        store.migrate().await?;
        println!("migrations applied to {}", describe_store(config));
        return Ok(());
    }
    let app = Store::connect(config.store.url.expose_secret(), 1)
        .await
        .map_err(|e| anyhow::anyhow!("connecting as the services' role (store.url): {e}"))?;
    let app_role = app.current_role().await?;
    app.close().await;
    let owner = Store::connect(owner_url, 1)
        .await
        .map_err(|e| anyhow::anyhow!("connecting as the schema owner (store.owner_url): {e}"))?;
    let owner_role = owner.current_role().await?;
    anyhow::ensure!(
        owner_role != app_role,
        "store.owner_url and store.url log in as the same role {owner_role:?}: the services would own the audit log; give them a role of their own"
    );
    owner.migrate_and_grant(&app_role).await?;
    owner.close().await;
    println!(
        "migrations applied to {} as {owner_role}; {app_role} may only insert into and read the audit log",
        redact_url(owner_url)
    );
    Ok(())
}

/// Runs `stage_names` until ctrl-c or SIGTERM, then shuts down gracefully.
/// Every process serves /metrics, /healthz and /readyz; with `full_http` it
/// also serves the API and console and runs the time-driven loops. `provisioning` says
/// whether the process may create missing PKI material (not as a distributed service).
pub async fn run(
    loaded: LoadedConfig,
    stage_names: Vec<String>,
    full_http: bool,
    demo: Option<crate::demo::DemoSpec>,
    provisioning: cardpipe_pki::settings::Provisioning,
) -> anyhow::Result<()> {
    let loaded = Arc::new(loaded);
    let config = &loaded.config;
    crate::stages::check_sections(&loaded)?;
    if demo.is_some() {
        // The terminal shows the demo's progress; the log goes to a file beside the data.
        let path = config.data_dir.join("cardpipe.log");
        telemetry::init_to_file(
            config.telemetry.log_format,
            &config.telemetry.log_filter,
            &path,
        )
        .map_err(|e| anyhow::anyhow!("cannot open the log file {}: {e}", path.display()))?;
        eprintln!("cardpipe: logging to {}", path.display());
    } else {
        telemetry::init(config.telemetry.log_format, &config.telemetry.log_filter);
    }
    // The demo plays months of card life on an accelerated calendar: a clock it moves ahead,
    // saved in the data dir so every later process there reads the same calendar.
    let demo_clock = match &demo {
        Some(_) => Some(ShiftedClock::in_data_dir(&config.data_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot read the demo clock in {}: {e}",
                config.data_dir.display()
            )
        })?),
        None => None,
    };
    let clock: Arc<dyn Clock> = match &demo_clock {
        Some(shifted) => Arc::new(shifted.clone()),
        None => clock::for_data_dir(&config.data_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot read the demo clock in {}: {e}",
                config.data_dir.display()
            )
        })?,
    };
    let services = backends::connect_waiting(config, clock).await?;
    tracing::info!(
        store = %describe_store(config),
        broker = services.broker.kind(),
        objects = services.objects.kind(),
        "backends ready"
    );
    if full_http {
        // Before any stage or relay writes to the store (SQLite allows one writer).
        stages::prepare_routes(&services, &loaded).await?;
    }
    let ctx = Context::new(services.clone(), loaded.clone(), &stage_names)
        .with_provisioning(provisioning);
    if full_http {
        // The pickup offices register, before the registry API takes batches: intake refuses
        // records naming an office that is not in it.
        ctx.delivery()?.ensure_offices(&services).await?;
    }
    let built = stages::build(&stage_names, &ctx)?;
    // States no stage of this process takes work from: where applications come to rest.
    let resting: Vec<ApplicationState> = ALL_STATES
        .into_iter()
        .filter(|s| *s != ApplicationState::Received)
        .filter(|s| !built.iter().any(|stage| stage.accepts().contains(s)))
        .collect();
    let with_settings = built.into_iter().map(|s| {
        let settings = config.stage_settings(s.name());
        (s, settings)
    });
    let grace = Duration::from_secs(config.runtime.shutdown_grace_seconds);
    let mut relay = Relay::new(services.clone())
        .with_poll_interval(Duration::from_millis(config.runtime.relay_poll_ms))
        .with_lane(
            Lane::Internal,
            LaneSettings::INTERNAL.with_timeout(Duration::from_secs(
                config.runtime.relay_internal_timeout_seconds,
            )),
        )
        .with_lane(
            Lane::External,
            LaneSettings::EXTERNAL.with_timeout(Duration::from_secs(
                config.runtime.relay_external_timeout_seconds,
            )),
        )
        .with_max_attempts(i64::from(config.runtime.relay_max_attempts));
    let with_ca = full_http
        || stage_names
            .iter()
            .any(|n| n == cardpipe_keys::stage::STAGE_NAME);
    for (topic, sink) in stages::outbox_sinks(&ctx, with_ca)? {
        relay = relay.with_sink(topic, sink);
    }
    let running = pipeline::start(&services, with_settings.collect(), relay, grace).await?;

    let background_stop = CancellationToken::new();
    let mut background = tokio::task::JoinSet::new();
    if full_http {
        stages::background(&ctx, background_stop.clone(), &mut background)?;
        #[cfg(unix)]
        background.spawn(reload_on_hangup(
            ctx.delivery()?,
            services.clone(),
            loaded.clone(),
            background_stop.clone(),
        ));
    }
    let mut app = cardpipe_common::telemetry::http::router(services.clone(), stage_names.clone());
    if full_http {
        app = app.merge(stages::routes(&ctx)?);
    }
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!("cannot listen on {} (http.listen): {e}", config.http.listen)
        })?;
    let http_stop = CancellationToken::new();
    let http = {
        let stop = http_stop.clone();
        tokio::spawn(async move {
            // With the peer address in each request (the console's per-address sign-in limit).
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
        })
    };
    tracing::info!(listen = %config.http.listen, stages = ?stage_names, "cardpipe running; /metrics /healthz /readyz served");

    let demo_stop = CancellationToken::new();
    let exit_when_done = demo.as_ref().is_some_and(|d| d.exit_when_done);
    let demo_task = demo.map(|spec| {
        let (services, stop) = (services.clone(), demo_stop.clone());
        let registry = cardpipe_registry::config::load(&loaded);
        let life = match (&demo_clock, ctx.delivery()) {
            (Some(clock), Ok(delivery)) => Some(crate::demo::CardLife {
                clock: clock.clone(),
                delivery,
            }),
            _ => None,
        };
        tokio::spawn(async move {
            if let Err(err) =
                async { crate::demo::run(services, registry?, spec, resting, life, stop).await }
                    .await
            {
                eprintln!("demo: {err:#}");
            }
        })
    });

    match demo_task {
        // `--demo-exit`: the process ends when the demo does (or on a signal before).
        Some(mut task) if exit_when_done => {
            tokio::select! {
                _ = wait_for_signal() => {
                    demo_stop.cancel();
                    let _ = task.await;
                }
                _ = &mut task => {}
            }
        }
        task => {
            wait_for_signal().await;
            demo_stop.cancel();
            if let Some(task) = task {
                let _ = task.await;
            }
        }
    }
    tracing::info!("shutting down: no new work; finishing in-flight jobs and flushing the outbox");
    background_stop.cancel();
    while let Some(done) = background.join_next().await {
        if let Ok(Err(err)) = done {
            tracing::warn!(error = %err, "background loop ended with an error");
        }
    }
    let result = running.shutdown().await;
    if full_http {
        // The last audit entries of this run (shutdown included) get a signed checkpoint.
        match ctx.pki() {
            Ok(pki) => cardpipe_pki::checkpoint::write_logged(&services, pki.keystore()).await,
            Err(err) => {
                tracing::error!(error = %format!("{err:#}"), "audit checkpoint not written: no keystore")
            }
        }
    }
    http_stop.cancel();
    let _ = http.await;
    services.store.close().await;
    tracing::info!("stopped");
    result
}

/// On SIGHUP, reads the configuration files again and takes the delivery times of day
/// (dispatch cut-off, voiding time, quiet hours) into the running scheduler: a new cut-off
/// needs no restart. Logged and audited (`config.reload`); an invalid file changes nothing.
#[cfg(unix)]
async fn reload_on_hangup(
    delivery: Arc<cardpipe_delivery::Delivery>,
    services: cardpipe_common::runtime::Services,
    loaded: Arc<LoadedConfig>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            got = hangup.recv() => if got.is_none() { return Ok(()) },
        }
        let reloaded = loaded
            .reload()
            .map_err(|errors| {
                anyhow::anyhow!(
                    "{}",
                    errors
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            })
            .and_then(|new| cardpipe_delivery::config::load(&new))
            .and_then(|cfg| delivery.reload_times(&cfg));
        match reloaded {
            Ok(changed) => {
                tracing::info!(changed = ?changed, "configuration reloaded on SIGHUP");
                cardpipe_common::audit::record(
                    &services.store,
                    services.clock.as_ref(),
                    &cardpipe_common::audit::AuditEvent {
                        actor: "system:sighup",
                        role: "system",
                        action: "config.reload",
                        subject: "delivery",
                        details: serde_json::json!({ "changed": changed }),
                    },
                )
                .await?;
            }
            Err(err) => tracing::error!(
                error = %format!("{err:#}"),
                "configuration not reloaded on SIGHUP: the running values stay"
            ),
        }
    }
}

/// Waits for ctrl-c or SIGTERM (how a service manager stops a process).
pub(crate) async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
