//! What each stage crate plugs into the binary: stages by name, extra
//! configuration sections, HTTP routes, background loops (time-driven work)
//! and outbox sinks. Each crate adds its entries here as it lands.

use std::sync::Arc;

use axum::Router;
use cardpipe_common::config::LoadedConfig;
use cardpipe_common::runtime::relay::OutboxSink;
use cardpipe_common::runtime::{Services, Stage};
use secrecy::ExposeSecret;

use crate::context::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Names accepted by `cardpipe worker <stage>` and `[stages.<name>]`.
pub const NAMES: &[&str] = &["keys", "dedup", "personalize", "qc", "shipping"];

/// Every stage name of this configuration: [`NAMES`] plus the dynamic ones
/// (`dedup-shard-0..N-1` when `[dedup] scatter = "broker"`).
pub fn names(config: &LoadedConfig) -> Vec<String> {
    let mut names: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
    // Dedup broker scatter: one stage per gallery shard (an invalid [dedup] is reported by
    // the configuration check and when the dedup stage is built).
    if let Ok(dedup) = cardpipe_dedup::stage::DedupConfig::from_loaded(config) {
        names.extend(dedup.shard_stage_names());
    }
    names
}

/// Extra top-level configuration sections read by stage crates.
pub const SECTIONS: &[&str] = &[
    "pki", "keys", "dedup", "encoders", "registry", "console", "delivery", "qc", "stock", "abis",
];

/// Builds the named stages.
pub fn build(names: &[String], ctx: &Context) -> anyhow::Result<Vec<Arc<dyn Stage>>> {
    let (_services, _config) = (&ctx.services, &*ctx.config);
    let mut stages: Vec<Arc<dyn Stage>> = Vec::new();
    let mut tray = None;
    let known = self::names(_config);
    if let Some(unknown) = names.iter().find(|n| !known.contains(n)) {
        anyhow::bail!("unknown stage {unknown:?}");
    }
    if names.iter().any(|n| n == cardpipe_keys::stage::STAGE_NAME) {
        let keys = cardpipe_keys::config::load(_config)?;
        stages.push(Arc::new(
            cardpipe_keys::stage::KeysStage::new(ctx.pki()?).with_generation(keys.generation),
        ));
    }
    {
        // Dedup: the searching stage and, with the broker scatter, one stage per shard; the
        // process's engine holds the shards of the shard stages it runs (none for a `dedup`
        // worker whose searches all go over the broker).
        use cardpipe_dedup::distributed::{ShardStage, parse_shard_stage};
        let dedup = names.iter().any(|n| n == cardpipe_dedup::stage::STAGE_NAME);
        let shard_ks: Vec<u32> = names.iter().filter_map(|n| parse_shard_stage(n)).collect();
        if dedup || !shard_ks.is_empty() {
            let engine = ctx.dedup()?;
            if dedup {
                stages.push(Arc::new(cardpipe_dedup::stage::DedupStage::new(
                    engine.clone(),
                )));
            }
            for k in shard_ks {
                stages.push(Arc::new(ShardStage::new(engine.clone(), k)?));
            }
        }
    }
    if names
        .iter()
        .any(|n| n == cardpipe_personalize::stage::STAGE_NAME)
    {
        // [encoders]: in-process card OS encoders (embedded) or PC/SC readers; the farm
        // re-scans readers in the background.
        let cfg = encoders_config(_config)?;
        if ctx.provisioning() == cardpipe_pki::settings::Provisioning::OpenOnly
            && cfg.transport_key_hex.expose_secret().is_empty()
        {
            // The encoders read the transport key file [pki] generates: as a distributed
            // service, open it only (never make one of this replica's own).
            cardpipe_pki::settings::PkiConfig {
                transport_key_id: cfg.transport_key_id.clone(),
                provisioning: cardpipe_pki::settings::Provisioning::OpenOnly,
                ..Default::default()
            }
            .transport_key(&_config.config.data_dir)
            .map_err(|e| {
                anyhow::anyhow!(
                    "[encoders] transport_key_hex is empty (CARDPIPE__ENCODERS__TRANSPORT_KEY_HEX): {e:#}"
                )
            })?;
        }
        let mut stage = cardpipe_personalize::stage::PersonalizeStage::from_config(
            &cfg,
            &_config.config.data_dir,
            _services,
        )?
        // [stock]: blanks are issued from the vault (whitelist; default lot in embedded mode).
        .with_blank_source(cardpipe_qc::stock::StockSource::new(
            cardpipe_qc::stock::load(_config)?,
        ));
        // [keys] generation = "on_card": the chips' public keys are certified here, while
        // each card is in its encoder (the same keystore / HSM as the keys stage).
        if cardpipe_keys::config::load(_config)?.generation
            == cardpipe_pki::custody::KeyOrigin::OnCard
        {
            stage = stage.with_ca(ctx.pki()?);
        }
        tray = Some(stage.farm().tray().clone());
        // Console: show this farm's live state, apply operators' service decisions to it.
        ctx.set_farm(stage.farm().clone());
        tokio::spawn(cardpipe_console::actions::follow_encoder_decisions(
            _services.clone(),
            stage.farm().clone(),
            std::time::Duration::from_secs(5),
            CancellationToken::new(),
        ));
        stages.push(Arc::new(stage));
    }
    if names.iter().any(|n| n == cardpipe_qc::stage::STAGE_NAME) {
        // [qc]: reads cards back from the personalize farm's output tray in this process
        // (station = "tray") or at the QC stations of a PC/SC machine's line ("line").
        let cfg = encoders_config(_config)?;
        let qc_cfg = cardpipe_qc::stage::load(_config)?;
        let stations = match qc_cfg.station {
            cardpipe_qc::station::StationKind::Line => {
                // One short blocking exchange at start-up: the worker refuses to start
                // without its stations (or without pcsc-lite, loaded at run time) rather
                // than failing every card later.
                cardpipe_card::pcsc::library()
                    .map_err(|e| anyhow::anyhow!("[qc] station = \"line\": {e}"))?;
                let line = cardpipe_qc::station::LineStations::connect(
                    &qc_cfg.line_controller,
                    std::time::Duration::from_millis(qc_cfg.station_timeout_ms),
                )
                .map_err(|e| anyhow::anyhow!("[qc] station = \"line\": {e}"))?;
                tracing::info!(controller = %qc_cfg.line_controller, "QC reads cards at the line's QC stations");
                cardpipe_qc::station::Stations::Line(line)
            }
            cardpipe_qc::station::StationKind::Tray => {
                cardpipe_qc::station::Stations::Tray(tray.unwrap_or_else(|| {
                    tracing::warn!("qc (station = \"tray\") runs without the personalize stage in this process: in-process cards are not reachable, every card will fail with card_not_found; use [qc] station = \"line\" with PC/SC encoders");
                    cardpipe_card::tray::OutputTray::new()
                }))
            }
        };
        stages.push(Arc::new(
            cardpipe_qc::stage::QcStage::new(
                cardpipe_card::tray::OutputTray::new(),
                ctx.pki()?,
                cfg.pins(),
                qc_cfg,
                _services,
            )
            .with_stations(stations),
        ));
    }
    if names
        .iter()
        .any(|n| n == cardpipe_delivery::shipping::STAGE_NAME)
    {
        // [delivery]: boxes per pickup office (the offices register is upserted on first use).
        let delivery = ctx.delivery()?;
        stages.push(Arc::new(cardpipe_delivery::shipping::ShippingStage::new(
            delivery,
        )));
    }
    Ok(stages)
}

/// `[encoders]` (read by the personalize and QC stages).
fn encoders_config(config: &LoadedConfig) -> anyhow::Result<cardpipe_card::config::EncodersConfig> {
    config
        .section(cardpipe_card::config::SECTION)
        .map_err(|e| anyhow::anyhow!("{}", cardpipe_common::config::describe(&e)))
}

/// Parses every section the stages and the HTTP side read (`[registry]`, `[dedup]`, `[pki]`, `[keys]`,
/// `[encoders]`, `[qc]`, `[stock]`, `[console]`, `[delivery]`) without building anything, so a
/// bad value anywhere is reported, all at once, before a process starts work (and by
/// `cardpipe config check`) rather than when the stage that reads it is built.
pub fn check_sections(config: &LoadedConfig) -> anyhow::Result<()> {
    let mut problems: Vec<String> = Vec::new();
    let mut note = |r: anyhow::Result<()>| {
        if let Err(e) = r {
            problems.push(format!("{e:#}"));
        }
    };
    note(cardpipe_registry::config::load(config).map(drop));
    note(cardpipe_dedup::stage::DedupConfig::from_loaded(config).map(drop));
    note(cardpipe_dedup::mosip::config::AbisConfig::from_loaded(config).map(drop));
    note(cardpipe_pki::settings::PkiConfig::from_loaded(config).map(drop));
    note(cardpipe_keys::config::load(config).map(drop));
    note(encoders_config(config).map(drop));
    note(cardpipe_qc::stage::load(config).map(drop));
    note(cardpipe_qc::stock::load(config).map(drop));
    note(cardpipe_console::ConsoleConfig::load(config).map(drop));
    note(cardpipe_delivery::config::load(config).map(drop));
    note(refuse_test_secrets(config));
    if problems.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("configuration is invalid:\n  - {}", problems.join("\n  - "))
    }
}

/// Refuses the built-in test secrets (the simulator's SCP03 keys, the default transport
/// PINs) where real cards or a real deployment are involved: PC/SC encoders, a line of QC
/// stations, CA keys in an HSM, or a distributed broker, store or object store. The embedded
/// demo keeps them (it needs no setup); `[encoders] allow_test_secrets` lets a lab opt in.
fn refuse_test_secrets(config: &LoadedConfig) -> anyhow::Result<()> {
    use cardpipe_common::config::{BrokerKind, ObjectsKind};
    let Ok(encoders) = encoders_config(config) else {
        return Ok(()); // reported by its own check
    };
    if encoders.allow_test_secrets {
        return Ok(());
    }
    let c = &config.config;
    let mut why: Vec<&str> = Vec::new();
    if encoders.kind == cardpipe_card::config::EncoderKind::Pcsc {
        why.push("encoders.kind = \"pcsc\"");
    }
    if cardpipe_qc::stage::load(config)
        .is_ok_and(|qc| qc.station == cardpipe_qc::station::StationKind::Line)
    {
        why.push("qc.station = \"line\"");
    }
    if cardpipe_pki::settings::PkiConfig::from_loaded(config)
        .is_ok_and(|pki| pki.keystore == cardpipe_pki::settings::KeystoreKind::Pkcs11)
    {
        why.push("pki.keystore = \"pkcs11\"");
    }
    if c.broker.kind == BrokerKind::Rabbitmq {
        why.push("broker.kind = \"rabbitmq\"");
    }
    if c.store.url.expose_secret().starts_with("postgres") {
        why.push("a PostgreSQL store");
    }
    if c.objects.kind == ObjectsKind::S3 {
        why.push("objects.kind = \"s3\"");
    }
    let in_use = encoders.test_secrets_in_use();
    if why.is_empty() || in_use.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "{} hold built-in test secrets (public: anyone could open a secure channel to the \
         cards or use their transport PINs), refused with {}; set the card issuer's SCP03 \
         master keys and your own transport PINs (CARDPIPE__ENCODERS__MASTER_KEYS_HEX, ...), \
         or encoders.allow_test_secrets = true in a lab",
        in_use.join(", "),
        why.join(", ")
    )
}

/// What the HTTP routes need before the process listens: the console's first supervisor.
pub async fn prepare_routes(services: &Services, config: &LoadedConfig) -> anyhow::Result<()> {
    cardpipe_console::prepare(
        services,
        &cardpipe_console::ConsoleConfig::load(config)?,
        &config.config.data_dir,
    )
    .await
    .map_err(|e| anyhow::anyhow!("could not create the first console supervisor: {e}"))
}

/// HTTP routes served by `cardpipe run` and `cardpipe serve` (registry API,
/// console), merged with /metrics, /healthz and /readyz.
pub fn routes(ctx: &Context) -> anyhow::Result<Router> {
    let (_services, _config) = (&ctx.services, &*ctx.config);
    let mut router = Router::new();
    // Operator console at /console/ (logins, roles, CSRF; adjudication, parked work, encoders,
    // audit log...). It decides possible duplicates through cardpipe_dedup::adjudication; the
    // unauthenticated JSON adjudication API is not served.
    router = router.merge(cardpipe_console::router(
        _services.clone(),
        &cardpipe_console::ConsoleConfig::load(_config)?,
        NAMES.iter().map(|s| s.to_string()).collect(),
        ctx.farm(),
    ));
    // Registry API (bearer tokens from [registry] clients; OpenAPI at /api/openapi.json).
    router = router.merge(cardpipe_intake::api::router(
        _services.clone(),
        cardpipe_registry::config::load(_config)?,
    ));
    // Delivery: offices register, box receipt, office change / transfers, handover.
    // Every route needs a bearer token: [registry] clients, or delivery API clients
    // (`cardpipe offices clients add`) bound to one office or centre-wide.
    router = router.merge(cardpipe_delivery::api::router(
        ctx.delivery()?,
        _services.clone(),
        cardpipe_registry::config::load(_config)?,
    ));
    // Registry reprints (/api/v1/reprints, bearer token). Operators use `cardpipe stock`,
    // `cardpipe reprint` and the console: the unauthenticated operator JSON routes are gone.
    router = router.merge(cardpipe_qc::api::router(
        _services.clone(),
        cardpipe_registry::config::load(_config)?,
    ));
    Ok(router)
}

/// Outbox sinks besides broker jobs (topic, sink), used by every relay.
///
/// `with_ca`: this process holds the CA (it runs the keys stage or the time-driven loops),
/// so it also publishes CRLs on request.
pub fn outbox_sinks(
    ctx: &Context,
    with_ca: bool,
) -> anyhow::Result<Vec<(&'static str, Arc<dyn OutboxSink>)>> {
    let (_services, _config) = (&ctx.services, &*ctx.config);
    // Keys: revocations (registry withdrawals, reprints), destruction of wrapped keys after
    // QC, and CRL publication on request (voiding) where the CA is.
    let pki = if with_ca { Some(ctx.pki()?) } else { None };
    let mut sinks = cardpipe_keys::ops::sinks(_services, pki);
    sinks.extend::<Vec<(&'static str, Arc<dyn OutboxSink>)>>(vec![
        // Registry status callbacks (HMAC-signed webhook, [registry.callbacks]).
        (
            cardpipe_registry::callbacks::CALLBACK_TOPIC,
            Arc::new(cardpipe_registry::callbacks::WebhookSink::new(
                cardpipe_registry::config::load(_config)?.callbacks,
                _services.clock.clone(),
            )?),
        ),
        // Citizen SMS (reminders, voiding notices) through the [delivery.sms] gateway.
        (
            cardpipe_delivery::reminders::SMS_TOPIC,
            Arc::new(cardpipe_delivery::reminders::SmsSink::new(
                ctx.delivery()?,
                _services.clone(),
            )?),
        ),
        // Adjudicators' decisions taken in the console, applied by dedup.
        (
            cardpipe_common::contract::ADJUDICATION_TOPIC,
            Arc::new(cardpipe_dedup::adjudication::AdjudicationSink::new(
                _services.clone(),
            )),
        ),
        // Reprints other components ask for (a card lost in transit), made by QC's workflow.
        (
            cardpipe_common::contract::REPRINT_TOPIC,
            Arc::new(cardpipe_qc::reprint::ReprintSink::new(_services.clone())),
        ),
        // QC budget spent: park the application's personalize job for an operator.
        (
            cardpipe_qc::stage::PARK_TOPIC,
            Arc::new(cardpipe_qc::stage::ParkSink::new(_services.clone())),
        ),
    ]);
    Ok(sinks)
}

/// Time-driven loops (release scheduler, reminders, voiding, CRLs...) started
/// by `cardpipe run` and `cardpipe serve`; each runs exactly once across
/// replicas through a database lease, and stops when `shutdown` is cancelled.
pub fn background(
    ctx: &Context,
    _shutdown: CancellationToken,
    _tasks: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let (_services, _config) = (&ctx.services, &*ctx.config);
    // Keys: scheduled CRL publication and age-based Document Signer rotation (leases).
    {
        let pki = ctx.pki()?;
        let tick = std::time::Duration::from_secs(pki.config.crl_interval_seconds.clamp(1, 60));
        _tasks.spawn(cardpipe_keys::ops::background(
            _services.clone(),
            pki,
            tick,
            _shutdown.clone(),
        ));
    }
    // Audit: a signed checkpoint of the chain's head every runtime.audit_checkpoint_seconds
    // (one more is signed at shutdown, in process::run).
    _tasks.spawn(cardpipe_pki::checkpoint::run_schedule(
        _services.clone(),
        ctx.pki()?.keystore().clone(),
        std::time::Duration::from_secs(_config.config.runtime.audit_checkpoint_seconds),
        _shutdown.clone(),
    ));
    // Intake: release scheduler (lease `intake-release-scheduler`, throttled, urgent first).
    _tasks.spawn(
        cardpipe_intake::scheduler::Scheduler::new(
            _services.clone(),
            Arc::new(cardpipe_registry::config::load(_config)?),
        )
        .run(_shutdown.clone()),
    );
    // Delivery: daily dispatch at the cut-off, reminders, daily voiding (lease `delivery-scheduler`).
    _tasks.spawn(
        cardpipe_delivery::background::Scheduler::new(ctx.delivery()?, _services.clone())
            .run(_shutdown.clone()),
    );
    // Envelope: national-code digests moved to the current lookup key after a rotation.
    _tasks.spawn(cardpipe_common::records::redigest_background(
        _services.clone(),
        std::time::Duration::from_secs(60),
        _shutdown.clone(),
    ));
    // Stock: periodic reconciliation behind cardpipe_stock_imbalance_cards.
    {
        let cfg = cardpipe_qc::stock::load(_config)?;
        let metrics = cardpipe_qc::stock::StockMetrics::register(&_services.metrics);
        _tasks.spawn(cardpipe_qc::stock::background(
            _services.clone(),
            metrics,
            std::time::Duration::from_secs(cfg.reconcile_interval_seconds.max(1)),
            _shutdown.clone(),
        ));
    }
    Ok(())
}
