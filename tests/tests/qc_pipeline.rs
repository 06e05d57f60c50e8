//! QC, stock and reprints in a running pipeline on both backend families (embedded: SQLite,
//! in-process broker, local files; distributed: PostgreSQL, RabbitMQ, S3): the real keys
//! stage, the real personalize stage on in-process encoders with faulty blanks (dead chips,
//! tearing) and undetected encoder faults planted on cards as they land in the output tray
//! (tampered DG, SOD signed by a rogue Document Signer, a key that is not the certified one,
//! an unlocked card, a missing file), and the QC stage.
//!
//! The embedded batch runs with the keys generated on the chips (`[keys] generation =
//! "on_card"`, certified during personalization), the distributed one with keys generated
//! off the card and imported.
//!
//! A batch ends with every good card passed, every bad one spoiled and re-made, the wrapped
//! keys destroyed, and the stock reconciliation balanced to the card; a reprint revokes the
//! old certificates, recalls the card and makes a new one; destruction needs two operators.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cardpipe_card::card_os::profile::*;
use cardpipe_card::card_os::{Card, Defect, Faults};
use cardpipe_card::cards;
use cardpipe_card::config::{EncodersConfig, SiteSecrets};
use cardpipe_card::farm::{Farm, FarmSettings, InProcessSource};
use cardpipe_card::reader::BlankStock;
use cardpipe_card::scp03::MasterKeys;
use cardpipe_card::script::ScriptOptions;
use cardpipe_common::broker::RetryPolicy;
use cardpipe_common::domain::{ApplicationId, ApplicationState, Priority};
use cardpipe_common::runtime::pipeline::{self, RunningPipeline};
use cardpipe_common::runtime::relay::Relay;
use cardpipe_common::runtime::{Services, Stage, StageSettings};
use cardpipe_common::testing::{self, Mode};
use cardpipe_keys::stage::KeysStage;
use cardpipe_personalize::stage::PersonalizeStage;
use cardpipe_pki::custody::KeyOrigin;
use cardpipe_pki::keystore::{FileKeyStore, KdfParams};
use cardpipe_pki::lds::DataGroup;
use cardpipe_pki::settings::{Pki, PkiConfig};
use cardpipe_pki::sod::SodSigner;
use cardpipe_qc::check::Reason;
use cardpipe_qc::reprint::{self, ReprintReason, Requester};
use cardpipe_qc::stage::{ParkSink, QcConfig, QcStage};
use cardpipe_qc::stock::{self, AutoLot, NewLot, StockConfig, StockError, StockSource};
use secrecy::SecretString;
use sqlx::Row;

mod common;
use common::seed;

fn settings() -> StageSettings {
    StageSettings {
        concurrency: 4,
        prefetch: 8,
        retry: RetryPolicy {
            delays: vec![Duration::from_millis(100)],
            max_attempts: 3,
        },
    }
}

struct Rig {
    services: Services,
    _guard: Option<tempfile::TempDir>,
    _data: tempfile::TempDir,
    pki: Arc<Pki>,
    farm: Arc<Farm>,
    personalize: Option<PersonalizeStage>,
    qc: Option<QcStage>,
    origin: KeyOrigin,
}

/// Blank n: every 7th a dead chip, every 11th torn mid-write, else healthy.
fn faulty(n: u32) -> Faults {
    Faults {
        dead: (n + 1).is_multiple_of(7),
        tear_at_write: (n + 1).is_multiple_of(11).then_some(4),
        ..Faults::none()
    }
}

async fn rig(mode: Mode, max_attempts: u32) -> Rig {
    let origin = match mode {
        Mode::Embedded => KeyOrigin::OnCard,
        Mode::Distributed => KeyOrigin::OffCard,
    };
    let (services, guard) = testing::services(mode, None).await;
    let data = tempfile::tempdir().unwrap();
    let config = PkiConfig {
        kdf_log_n: 10,
        ..PkiConfig::default()
    };
    let pki = Arc::new(Pki::open(config, data.path()).unwrap());
    let encoders = EncodersConfig::default();
    let stock_blanks = Arc::new(BlankStock::new(
        MasterKeys::test_keys(),
        rand::random(),
        faulty,
    ));
    let farm = Farm::new(
        Box::new(InProcessSource::new(3, stock_blanks)),
        FarmSettings {
            max_consecutive_failures: 100,
            acquire_timeout: Duration::from_secs(20),
        },
    );
    let secrets = SiteSecrets {
        master: Arc::new(MasterKeys::test_keys()),
        transport: encoders.transport_key(data.path()).unwrap(),
        pins: encoders.pins(),
    };
    let personalize = PersonalizeStage::new(farm.clone(), secrets, ScriptOptions::extended(), 6)
        .with_blank_source(StockSource::new(StockConfig {
            auto_lot: AutoLot::Never,
            ..StockConfig::default()
        }))
        .with_ca(pki.clone());
    let qc = QcStage::new(
        farm.tray().clone(),
        pki.clone(),
        encoders.pins(),
        QcConfig {
            max_attempts,
            next_stage: "shipping".into(),
            ..QcConfig::default()
        },
        &services,
    );
    Rig {
        services,
        _guard: guard,
        _data: data,
        pki,
        farm,
        personalize: Some(personalize),
        qc: Some(qc),
        origin,
    }
}

async fn start(rig: &mut Rig) -> RunningPipeline {
    let services = &rig.services;
    if services.broker.kind() != "memory" {
        // The distributed deployment declares the shipping queue (its worker, or the broker
        // definitions); embedded QC declares it itself when nothing consumes it yet.
        services
            .broker
            .declare_stage("shipping", &RetryPolicy::default())
            .await
            .unwrap();
    }
    let stages: Vec<(Arc<dyn Stage>, StageSettings)> = vec![
        (
            Arc::new(KeysStage::new(rig.pki.clone()).with_generation(rig.origin)),
            settings(),
        ),
        (Arc::new(rig.personalize.take().unwrap()), settings()),
        (Arc::new(rig.qc.take().unwrap()), settings()),
    ];
    let relay = Relay::new(services.clone())
        .with_poll_interval(Duration::from_millis(50))
        .with_sinks(cardpipe_keys::ops::sinks(services, Some(rig.pki.clone())))
        .with_sink(
            cardpipe_qc::stage::PARK_TOPIC,
            Arc::new(ParkSink::new(services.clone())),
        );
    pipeline::start(services, stages, relay, Duration::from_secs(10))
        .await
        .expect("pipeline")
}

async fn wait_for(services: &Services, ids: &[ApplicationId], state: ApplicationState) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    for id in ids {
        loop {
            let app = services.store.application(id).await.unwrap().unwrap();
            if app.state == state {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                let history = services.store.history(id).await.unwrap();
                let parked = cardpipe_common::runtime::parked::list(services, None)
                    .await
                    .unwrap();
                let rows = cards::for_application(&services.store, id).await.unwrap();
                panic!(
                    "{id} stuck in {} (waiting for {state})\nhistory: {history:#?}\nparked: {parked:#?}\ncards: {rows:#?}",
                    app.state
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A rogue Document Signer (another hierarchy) signing EF.SOD over the card's own groups.
fn rogue_signer() -> (tempfile::TempDir, Arc<SodSigner>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        FileKeyStore::create(
            dir.path().join("rogue.keystore"),
            &SecretString::from("rogue"),
            KdfParams::for_tests(),
        )
        .unwrap(),
    );
    let now = time::OffsetDateTime::now_utc() - time::Duration::minutes(5);
    let h = cardpipe_pki::ca::init(store.as_ref(), &cardpipe_pki::ca::CaConfig::default(), now)
        .unwrap();
    let signer = SodSigner::new(store, &h.document_signer).unwrap();
    (dir, Arc::new(signer))
}

fn rogue_sod(signer: &SodSigner, card: &Card) -> Vec<u8> {
    let f = |fid| card.file(App::Lds, fid).unwrap_or_default().to_vec();
    let (dg1, dg2, dg3, dg11) = (f(EF_DG1), f(EF_DG2), f(EF_DG3), f(EF_DG11));
    signer
        .sign(&[
            (DataGroup::Dg1, &dg1),
            (DataGroup::Dg2, &dg2),
            (DataGroup::Dg3, &dg3),
            (DataGroup::Dg11, &dg11),
        ])
        .unwrap()
}

async fn count(services: &Services, sql: &'static str, bind: &str) -> i64 {
    sqlx::query(sql)
        .bind(bind)
        .fetch_one(services.store.pool())
        .await
        .unwrap()
        .get::<i64, _>("n")
}

async fn batch_with_faults_then_reprint(mode: Mode) {
    const APPS: usize = 12;
    let mut rig = rig(mode, 3).await;
    let rig_origin = rig.origin;
    let services = rig.services.clone();
    let lot = stock::receive(
        &services,
        &NewLot {
            lot_id: Some(testing::unique("LOT")),
            supplier: "Test Cards Co".into(),
            chip_type: "cardpipe-sim P-256".into(),
            serial_prefix: testing::unique("S").replace('_', "-") + "-",
            first: 1,
            last: 120,
        },
        "vault.alice",
    )
    .await
    .unwrap();
    assert_eq!(lot.quantity, 120);

    // Undetected encoder faults: deposits 1, 4, 7, ... carry a defect (the kinds in turn).
    let (_rogue_dir, rogue) = rogue_signer();
    let planted: Arc<std::sync::Mutex<Vec<Reason>>> = Arc::default();
    {
        let planted = planted.clone();
        let rogue = rogue.clone();
        let turn = AtomicUsize::new(0);
        let hit: std::sync::Mutex<std::collections::HashSet<String>> = Default::default();
        rig.farm.tray().set_defect_injector(move |n, app, card| {
            // At most one bad card per application (the QC budget is tested on its own).
            if n % 3 != 1 || !hit.lock().unwrap().insert(app.to_owned()) {
                return None;
            }
            let kind = turn.fetch_add(1, Ordering::Relaxed) % 5;
            let (defect, reason) = match kind {
                0 => (
                    Defect::FlipByte {
                        app: App::Lds,
                        fid: EF_DG2,
                        offset: 40,
                    },
                    Reason::DgHashMismatch,
                ),
                1 => (
                    Defect::ReplaceFile {
                        app: App::Lds,
                        fid: EF_SOD,
                        data: rogue_sod(&rogue, card),
                    },
                    Reason::SodSignatureInvalid,
                ),
                2 => (
                    Defect::ReplaceKey { key_ref: KEY_AUTH },
                    Reason::KeyNotOnChip,
                ),
                3 => (Defect::Unlocked, Reason::CardUnlocked),
                _ => (
                    Defect::EraseFile {
                        app: App::Lds,
                        fid: EF_DG11,
                    },
                    Reason::MissingFile,
                ),
            };
            planted.lock().unwrap().push(reason);
            Some(defect)
        });
    }

    let ids = seed(&services, APPS).await;
    let running = start(&mut rig).await;
    wait_for(&services, &ids, ApplicationState::QcPassed).await;

    // Every bad card was refused with the reason planted, spoiled, and re-made.
    let mut want: BTreeMap<String, i64> = BTreeMap::new();
    for r in planted.lock().unwrap().iter() {
        *want.entry(r.as_str().to_owned()).or_default() += 1;
    }
    let rows = sqlx::query(
        "SELECT reason, COUNT(*) AS n FROM qc_reports WHERE outcome = 'failed' GROUP BY reason",
    )
    .fetch_all(services.store.pool())
    .await
    .unwrap();
    let got: BTreeMap<String, i64> = rows
        .iter()
        .map(|r| (r.get::<String, _>("reason"), r.get::<i64, _>("n")))
        .collect();
    assert!(!want.is_empty(), "faults were injected");
    assert_eq!(got, want, "QC verdicts vs defects planted");
    let mut spoiled_total = 0;
    for id in &ids {
        let rows = cards::for_application(&services.store, id).await.unwrap();
        let good: Vec<_> = rows.iter().filter(|r| r.state == "personalized").collect();
        assert_eq!(good.len(), 1, "one good card per application: {rows:?}");
        let qc_spoiled = rows
            .iter()
            .filter(|r| {
                r.spoil_reason
                    .as_deref()
                    .is_some_and(|s| s.starts_with("qc_failed:"))
            })
            .count() as i64;
        assert_eq!(
            qc_spoiled,
            count(&services, "SELECT COUNT(*) AS n FROM qc_reports WHERE application_id = $1 AND outcome = 'failed'", id.as_str()).await,
            "each refused card is spoiled: {rows:?}"
        );
        spoiled_total += rows.iter().filter(|r| r.state == "spoiled").count() as i64;
        // The report of the passing card is an artifact and says what was checked.
        let key = services
            .store
            .artifact(id, "qc_report")
            .await
            .unwrap()
            .unwrap();
        let report: cardpipe_qc::stage::QcReport =
            serde_json::from_slice(&services.objects.get(&key).await.unwrap().unwrap()).unwrap();
        assert_eq!(report.outcome, "passed");
        assert!(report.checks.len() >= 10 && report.checks.iter().all(|c| c.passed));
        assert_eq!(report.blank_serial, good[0].blank_serial);
        assert!(report.revoked_certificates.is_empty());
        assert_eq!(
            report.key_origin, rig_origin,
            "the QC report says where the keys were born"
        );
        let history: Vec<String> = sqlx::query(
            "SELECT reason FROM application_history WHERE application_id = $1 \
             AND to_state IN ('keys_issued', 'personalized') ORDER BY id",
        )
        .bind(id.as_str())
        .fetch_all(services.store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<Option<String>, _>("reason").unwrap_or_default())
        .collect();
        assert!(
            !history.is_empty()
                && history
                    .iter()
                    .all(|r| r.contains(&format!("key_origin={rig_origin}"))),
            "the history records where the keys were born: {history:?}"
        );

        // One chip per private key (issue 14 item 2): every refused card's two certificates
        // are revoked as `spoiled` and named in its QC report; the remake holds fresh ones.
        let failed_reports: Vec<String> = sqlx::query(
            "SELECT object_key FROM qc_reports WHERE application_id = $1 AND outcome = 'failed'",
        )
        .bind(id.as_str())
        .fetch_all(services.store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<String, _>("object_key"))
        .collect();
        let certs = cardpipe_pki::store::certificates_of(&services.store, id)
            .await
            .unwrap();
        // On-card: a blank that failed during personalization after its keys were certified
        // has its two certificates too (revoked before the next blank); QC names only the
        // certificates of the cards it refused.
        let at_personalization = match rig_origin {
            KeyOrigin::OffCard => 0,
            KeyOrigin::OnCard => certs.len().saturating_sub(2 * (failed_reports.len() + 1)),
        };
        assert_eq!(
            certs.len(),
            2 * (failed_reports.len() + 1) + at_personalization,
            "fresh certificates per card: {certs:?}"
        );
        let valid: Vec<_> = certs.iter().filter(|c| c.status == "valid").collect();
        assert_eq!(valid.len(), 2, "{certs:?}");
        let mut named = std::collections::BTreeSet::new();
        for key in &failed_reports {
            let failed: cardpipe_qc::stage::QcReport =
                serde_json::from_slice(&services.objects.get(key).await.unwrap().unwrap()).unwrap();
            assert_eq!(failed.revoked_certificates.len(), 2, "{key}");
            named.extend(failed.revoked_certificates);
        }
        let spoiled: std::collections::BTreeSet<String> = certs
            .iter()
            .filter(|c| c.status == "revoked" && c.revocation_cause.as_deref() == Some("spoiled"))
            .map(|c| c.serial.clone())
            .collect();
        assert!(
            named.is_subset(&spoiled),
            "the refused cards' certificates are revoked"
        );
        assert_eq!(
            spoiled.len(),
            named.len() + at_personalization,
            "revoked = the refused cards' certificates and those of blanks spoiled in the encoder"
        );

        assert!(valid.iter().all(|c| !named.contains(&c.serial)));
    }
    assert!(spoiled_total > 0);
    // The revocations went out on a CRL published after the failures.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let refused_certs = 2 * count(
        &services,
        "SELECT COUNT(*) AS n FROM qc_reports WHERE outcome = $1",
        "failed",
    )
    .await;
    loop {
        let listed: Option<i64> = sqlx::query("SELECT MAX(revoked_count) AS n FROM crl_state")
            .fetch_one(services.store.pool())
            .await
            .unwrap()
            .get("n");
        if listed.unwrap_or(0) >= refused_certs {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no CRL lists the {refused_certs} spoiled certificates (largest: {listed:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Wrapped private keys of passed cards are destroyed (the outbox sink ran).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for id in &ids {
        loop {
            let keys = services
                .objects
                .list(&format!("applications/{id}/"))
                .await
                .unwrap();
            if !keys.iter().any(|k| k.contains("/credentials-")) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "credentials of {id} not destroyed: {keys:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // The stock balances to the card.
    let r = stock::reconcile(&services, None).await.unwrap();
    assert!(r.balanced, "{r:#?}");
    assert_eq!(r.imbalance, 0);
    let lotb = r.lots.iter().find(|l| l.lot_id == lot.lot_id).unwrap();
    assert_eq!(lotb.balance.received, 120);
    assert_eq!(lotb.balance.states["consumed"], APPS as i64);
    assert_eq!(lotb.balance.states["spoiled"], spoiled_total);
    assert_eq!(lotb.balance.states["at_encoder"], 0);
    assert_eq!(
        lotb.balance.states["in_vault"],
        120 - APPS as i64 - spoiled_total
    );
    assert_eq!(r.day_balance.difference, 0);
    let text = services.metrics.encode();
    assert!(text.contains("cardpipe_qc_cards_total{"), "{text}");
    assert!(text.contains("reason=\"dg_hash_mismatch\""), "{text}");

    // A reprint (lost in transit): revoked, recalled to the vault, made again with priority.
    let target = ids[0].clone();
    let old_card = cards::for_application(&services.store, &target)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.state == "personalized")
        .unwrap();
    let before = cardpipe_pki::store::certificates_of(&services.store, &target)
        .await
        .unwrap();
    let certs_before = before.len();
    let spoiled_before = before
        .iter()
        .filter(|c| c.revocation_cause.as_deref() == Some("spoiled"))
        .count();
    let out = reprint::request(
        &services,
        &target,
        ReprintReason::LostInTransit,
        Requester::Operator("desk.bob"),
    )
    .await
    .unwrap();
    assert_eq!(out.revoked, 2, "both certificates revoked");
    assert!(out.returned_to_stock);
    assert_eq!(
        out.old_blank_serial.as_deref(),
        Some(old_card.blank_serial.as_str())
    );
    // A second request while the first is in flight is refused.
    assert!(matches!(
        reprint::request(
            &services,
            &target,
            ReprintReason::Damaged,
            Requester::Operator("desk.bob")
        )
        .await,
        Err(reprint::ReprintError::NotReprintable { .. })
    ));
    // The keys stage revokes them: the request went through the outbox (topic revocation,
    // naming the two serials) to its sink on the running relay.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let certs = loop {
        let certs = cardpipe_pki::store::certificates_of(&services.store, &target)
            .await
            .unwrap();
        // The reprint's revocations (cause `lost`); a spoiled earlier card's are `spoiled`.
        let revoked = certs
            .iter()
            .filter(|c| c.status == "revoked" && c.revocation_cause.as_deref() == Some("lost"))
            .count();
        if revoked >= 2 || tokio::time::Instant::now() > deadline {
            break certs;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        certs
            .iter()
            .filter(|c| c.status == "revoked" && c.revocation_cause.as_deref() == Some("lost"))
            .count(),
        2,
        "{certs:?}"
    );
    wait_for(
        &services,
        std::slice::from_ref(&target),
        ApplicationState::QcPassed,
    )
    .await;
    let rows = cards::for_application(&services.store, &target)
        .await
        .unwrap();
    let new_card = rows.iter().find(|r| r.state == "personalized").unwrap();
    assert_ne!(new_card.blank_serial, old_card.blank_serial);
    assert!(
        rows.iter()
            .any(|r| r.blank_serial == old_card.blank_serial && r.state == "recalled")
    );
    let certs = cardpipe_pki::store::certificates_of(&services.store, &target)
        .await
        .unwrap();
    // The reprint's certificates, plus two more for each remake of it QC spoiled (a remake
    // gets fresh keys and certificates; planted defects can hit the reprint too).
    let spoiled_since = certs
        .iter()
        .filter(|c| c.revocation_cause.as_deref() == Some("spoiled"))
        .count()
        - spoiled_before;
    assert_eq!(certs.len(), certs_before + 2 + spoiled_since, "{certs:?}");
    assert_eq!(
        certs.iter().filter(|c| c.status == "valid").count(),
        2,
        "{certs:?}"
    );
    let app = services.store.application(&target).await.unwrap().unwrap();
    assert_eq!(app.priority, Priority::Urgent);
    // Every job of the new card travelled in the stages' priority lanes.
    let lanes: Vec<(String, bool)> =
        sqlx::query("SELECT payload FROM outbox WHERE subject = $1 AND topic = 'job' ORDER BY seq")
            .bind(target.as_str())
            .fetch_all(services.store.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| {
                let job = cardpipe_common::broker::Job::from_bytes(
                    r.get::<String, _>("payload").as_bytes(),
                )
                .unwrap();
                (job.stage, job.priority)
            })
            .collect();
    let after_reprint: Vec<_> = lanes.iter().rev().take(4).collect();
    assert!(
        after_reprint.iter().all(|(_, p)| *p),
        "keys, personalize, qc and shipping jobs of the reprint are priority jobs: {lanes:?}"
    );
    // The last QC pass's announcements (shipping job, key destruction) are delivered before
    // the relay stops.
    let drained = tokio::time::Instant::now() + Duration::from_secs(30);
    while services.store.outbox_backlog().await.unwrap().0 > 0
        && tokio::time::Instant::now() < drained
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.shutdown().await.unwrap();

    // Destruction: two different operators sign off.
    let r = stock::reconcile(&services, None).await.unwrap();
    assert!(r.balanced, "{r:#?}");
    assert_eq!(r.total.states["returned"], 1);
    let to_destroy = r.total.states["spoiled"] + r.total.states["returned"];
    let d = stock::prepare_destruction(&services, "vault.alice", None)
        .await
        .unwrap();
    assert_eq!(d.cards, to_destroy);
    assert!(matches!(
        stock::witness_destruction(&services, &d.id, "vault.alice").await,
        Err(StockError::SameOperator(_))
    ));
    let done = stock::witness_destruction(&services, &d.id, "vault.carol")
        .await
        .unwrap();
    assert_eq!(done.cards, to_destroy);
    let r = stock::reconcile(&services, None).await.unwrap();
    assert!(r.balanced, "{r:#?}");
    assert_eq!(r.total.states["destroyed"], to_destroy);
    assert_eq!(
        r.total.states["spoiled"]
            + r.total.states["returned"]
            + r.total.states["awaiting_destruction"],
        0
    );
    // Every operator action is in the audit log, and the chain is intact.
    let audit = cardpipe_common::audit::verify(&services.store)
        .await
        .unwrap();
    assert!(audit.intact());
    for action in [
        "stock.receive",
        "reprint.request",
        "stock.destruction.prepare",
        "stock.destruction.witness",
    ] {
        assert_eq!(
            count(
                &services,
                "SELECT COUNT(*) AS n FROM audit_log WHERE action = $1",
                action
            )
            .await,
            1,
            "{action}"
        );
    }
    // Revocations, CRL publications and key destructions are each their own audit entry.
    for action in [
        "pki.revoke",
        "pki.crl_publish",
        "keys.destroy_wrapped_keys",
        "keys.destroy_package",
    ] {
        let n = count(
            &services,
            "SELECT COUNT(*) AS n FROM audit_log WHERE action = $1",
            action,
        )
        .await;
        assert!(n >= 1, "no {action} audit entry");
    }
    // Nothing is stuck in the outbox (the shipping jobs went to its queue).
    let (backlog, _) = services.store.outbox_backlog().await.unwrap();
    if backlog != 0 {
        let rows = sqlx::query(
            "SELECT topic, attempts, last_error FROM outbox WHERE published_at IS NULL",
        )
        .fetch_all(services.store.pool())
        .await
        .unwrap();
        let rows: Vec<(String, i64, Option<String>)> = rows
            .iter()
            .map(|r| (r.get("topic"), r.get("attempts"), r.get("last_error")))
            .collect();
        panic!("{backlog} outbox rows left: {rows:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_faulty_batch_passes_good_cards_remakes_bad_ones_and_balances_stock() {
    batch_with_faults_then_reprint(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distributed_faulty_batch_passes_good_cards_remakes_bad_ones_and_balances_stock() {
    batch_with_faults_then_reprint(Mode::Distributed).await;
}

async fn budget_parks(mode: Mode) {
    let mut rig = rig(mode, 2).await;
    let services = rig.services.clone();
    stock::receive(
        &services,
        &NewLot {
            lot_id: None,
            supplier: "Test Cards Co".into(),
            chip_type: "sim".into(),
            serial_prefix: testing::unique("P").replace('_', "-") + "-",
            first: 1,
            last: 30,
        },
        "vault.alice",
    )
    .await
    .unwrap();
    rig.farm
        .tray()
        .set_defect_injector(|_, _, _| Some(Defect::Unlocked));
    let ids = seed(&services, 1).await;
    let running = start(&mut rig).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let parked = cardpipe_common::runtime::parked::list(&services, Some("keys"))
            .await
            .unwrap();
        if parked.iter().any(|p| p.subject == ids[0].as_str()) {
            assert!(parked[0].error.contains("refused by QC"), "{parked:?}");
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let app = services.store.application(&ids[0]).await.unwrap().unwrap();
            let history = services.store.history(&ids[0]).await.unwrap();
            let all = cardpipe_common::runtime::parked::list(&services, None)
                .await
                .unwrap();
            panic!("never parked: {} {history:#?} {all:#?}", app.state);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.shutdown().await.unwrap();
    let app = services.store.application(&ids[0]).await.unwrap().unwrap();
    assert_eq!(app.state, ApplicationState::QcFailed);
    let rows = cards::for_application(&services.store, &ids[0])
        .await
        .unwrap();
    let refused: Vec<_> = rows
        .iter()
        .filter(|r| r.spoil_reason.as_deref() == Some("qc_failed:card_unlocked"))
        .collect();
    assert_eq!(refused.len(), 2, "exactly the QC budget of cards: {rows:?}");
    assert!(rows.iter().all(|r| r.state == "spoiled"));
    let r = stock::reconcile(&services, None).await.unwrap();
    assert!(r.balanced, "{r:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_qc_budget_parks_the_application_for_an_operator() {
    budget_parks(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distributed_qc_budget_parks_the_application_for_an_operator() {
    budget_parks(Mode::Distributed).await;
}

async fn whitelist(mode: Mode) {
    let (services, _guard) = testing::services(mode, None).await;
    let ids = seed(&services, 1).await;
    let prefix = testing::unique("W").replace('_', "-") + "-";
    let lot = |first, last| NewLot {
        lot_id: None,
        supplier: "Test Cards Co".into(),
        chip_type: "sim".into(),
        serial_prefix: prefix.clone(),
        first,
        last,
    };
    stock::receive(&services, &lot(1, 10), "vault.alice")
        .await
        .unwrap();
    // Overlapping range, bad input: clear errors naming what is wrong.
    assert!(matches!(
        stock::receive(&services, &lot(5, 20), "vault.alice").await,
        Err(StockError::Overlap(_))
    ));
    match stock::receive(&services, &lot(9, 3), "vault.alice").await {
        Err(StockError::Invalid { field, .. }) => assert_eq!(field, "last"),
        other => panic!("{other:?}"),
    }
    match stock::receive(&services, &lot(30, 31), "").await {
        Err(StockError::Invalid { field, .. }) => assert_eq!(field, "operator"),
        other => panic!("{other:?}"),
    }
    // A blank not in stock (or still in the vault) cannot be personalized.
    let err = cards::insert_in_progress(
        &services.store,
        "NOT-IN-STOCK-1",
        "CHIP",
        &ids[0],
        "enc-1",
        services.clock.now(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("not in stock"), "{err}");
    let in_vault = stock::serial(&prefix, 1);
    assert!(
        cards::insert_in_progress(
            &services.store,
            &in_vault,
            "CHIP",
            &ids[0],
            "enc-1",
            services.clock.now()
        )
        .await
        .is_err()
    );
    // Issued to an encoder, it can.
    let issued = stock::issue_to_encoder(&services, "enc-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(issued, in_vault);
    cards::insert_in_progress(
        &services.store,
        &issued,
        "CHIP",
        &ids[0],
        "enc-1",
        services.clock.now(),
    )
    .await
    .unwrap();
    // Spoiling the card spoils the serial (trigger), journaled: the books balance.
    cards::spoil(&services.store, &issued, "test", services.clock.now())
        .await
        .unwrap();
    let r = stock::reconcile(&services, None).await.unwrap();
    assert!(r.balanced, "{r:#?}");
    assert_eq!(r.total.states["spoiled"], 1);
    assert_eq!(r.total.states["in_vault"], 9);
    assert_eq!(r.day_moves["spoiled"], 1);

    // An edit behind the books' back is an imbalance.
    sqlx::query("UPDATE stock_serials SET state = 'in_vault' WHERE serial = $1")
        .bind(&issued)
        .execute(services.store.pool())
        .await
        .unwrap();
    let r = stock::reconcile(&services, None).await.unwrap();
    assert!(!r.balanced);
    assert_eq!(r.journal_mismatches, 1);
    assert_eq!(r.card_mismatches, 1);
    let metrics = stock::StockMetrics::register(&services.metrics);
    metrics.publish(&r);
    assert!(
        services
            .metrics
            .encode()
            .contains("cardpipe_stock_imbalance_cards 2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_stock_whitelist_moves_and_reconciliation() {
    whitelist(Mode::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_stock_whitelist_moves_and_reconciliation() {
    whitelist(Mode::Distributed).await;
}
