//! QC at the QC station of a PC/SC production line, through a REAL pcscd with vpcd readers:
//! two encoders and one QC station reader in one simulated machine. The personalize stage
//! writes cards through pcscd; each finished card travels on the machine's transport; the QC
//! stage — which shares NOTHING in memory with the personalize farm, only the line
//! controller's TCP address and pcscd — has the controller load the card into the station by
//! its recorded chip serial and inspects it over PC/SC. Defects planted on the transport are
//! refused with their reason, the card goes to the reject bin and is re-made; good cards go to
//! the stacker and on to shipping. A card that never reached the line (the machine lost it)
//! fails with card_not_found and is re-made too.
//!
//! Like workers/personalize/tests/pcscd.rs, the body runs in a re-executed child with
//! `PCSCLITE_CSOCK_NAME` set (pcsc-lite reads it once per process).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cardpipe_card::card_os::profile::*;
use cardpipe_card::card_os::{Defect, Faults};
use cardpipe_card::cards;
use cardpipe_card::config::{EncodersConfig, SiteSecrets};
use cardpipe_card::farm::{EncoderSource, Farm, FarmSettings};
use cardpipe_card::pcsc_harness::{PcscTest, with_private_pcscd};
use cardpipe_card::reader::{self, BlankStock, Encoder, PcscEncoder, ReaderError};
use cardpipe_card::scp03::MasterKeys;
use cardpipe_card::script::ScriptOptions;
use cardpipe_card::simulate::{SimConfig, Simulation};
use cardpipe_card::vpcd::SlotHandle;
use cardpipe_common::broker::RetryPolicy;
use cardpipe_common::domain::ApplicationState;
use cardpipe_common::runtime::pipeline;
use cardpipe_common::runtime::relay::Relay;
use cardpipe_common::runtime::{Stage, StageSettings};
use cardpipe_common::testing::{self, Mode};
use cardpipe_keys::stage::KeysStage;
use cardpipe_personalize::stage::PersonalizeStage;
use cardpipe_pki::settings::{Pki, PkiConfig};
use cardpipe_qc::check::Reason;
use cardpipe_qc::stage::{ParkSink, QcConfig, QcStage};
use cardpipe_qc::station::{LineStations, StationKind, Stations};
use sqlx::Row;

mod common;
use common::seed;

/// This file's private-pcscd test settings.
fn pcsc(name: &str) -> PcscTest<'_> {
    PcscTest {
        name,
        dir_prefix: "cardpipe-qc-line-",
        timeout: Duration::from_secs(150),
        needs: &[],
    }
}

/// The machine's encoders through pcscd, their feeds driving the simulator's slots (so a
/// finished card leaves onto the line's transport).
struct MachineEncoders {
    readers: Vec<(String, SlotHandle)>,
    stock: Arc<BlankStock>,
}

impl EncoderSource for MachineEncoders {
    fn kind(&self) -> &'static str {
        "pcsc"
    }
    fn scan(&self) -> Result<Vec<String>, ReaderError> {
        let names = reader::list_readers(&reader::establish()?)?;
        Ok(self
            .readers
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| names.contains(n))
            .collect())
    }
    fn open(&self, name: &str) -> Result<Box<dyn Encoder>, ReaderError> {
        let (_, slot) = self
            .readers
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| ReaderError::ReaderUnavailable(name.into()))?;
        let mut enc = PcscEncoder::new(
            reader::establish()?,
            name,
            Some(Box::new(slot.feed(self.stock.clone()))),
        )?;
        enc.set_insert_timeout(Duration::from_secs(3));
        Ok(Box::new(enc))
    }
}

fn settings() -> StageSettings {
    StageSettings {
        concurrency: 2,
        prefetch: 4,
        retry: RetryPolicy {
            delays: vec![Duration::from_millis(100)],
            max_attempts: 3,
        },
    }
}

#[test]
fn qc_reads_cards_at_the_line_station_through_pcscd() {
    with_private_pcscd(
        &pcsc("qc_reads_cards_at_the_line_station_through_pcscd"),
        |dir| {
            const APPS: usize = 5;
            let mut cfg = SimConfig::new(2, dir);
            cfg.qc_stations = 1;
            let sim = Simulation::start(cfg).expect("pcscd with vpcd starts");
            sim.check_client_env()
                .expect("child talks to its own pcscd");
            assert_eq!(sim.stations().len(), 1);
            assert!(sim.stations()[0].reader.starts_with("QC Station"));
            let line = sim.line().expect("a line with QC stations").clone();
            let controller = line
                .serve(SocketAddr::from(([127, 0, 0, 1], 0)))
                .unwrap()
                .to_string();

            // pcscd serves the station reader next to the encoders (a vpcd entry has two slots).
            let names = reader::list_readers(&reader::establish().unwrap()).unwrap();
            assert!(
                names.iter().any(|n| n == &sim.stations()[0].reader),
                "{names:?}"
            );
            // ... but a PC/SC farm configured as pipeline.toml ships never feeds blanks to it.
            let farm_sees = cardpipe_card::farm::PcscSource {
                insert_timeout: Duration::from_secs(1),
                skip_readers: EncodersConfig::default().skip_readers,
            }
            .scan()
            .unwrap();
            assert!(
                !farm_sees.is_empty() && farm_sees.iter().all(|n| n.starts_with("Encoder")),
                "{farm_sees:?}"
            );

            // Undetected encoder faults, planted as cards land on the transport: the 2nd card
            // has a flipped DG2 byte, the 4th was never locked.
            let planted = Arc::new(AtomicUsize::new(0));
            {
                let planted = planted.clone();
                line.set_defect_injector(move |n, _card| {
                    let d = match n {
                        1 => Defect::FlipByte {
                            app: App::Lds,
                            fid: EF_DG2,
                            offset: 40,
                        },
                        3 => Defect::Unlocked,
                        _ => return None,
                    };
                    planted.fetch_add(1, Ordering::Relaxed);
                    Some(d)
                });
            }
            let stock = Arc::new(BlankStock::new(MasterKeys::test_keys(), 0x51, |_| {
                Faults::none()
            }));
            let farm = Farm::new(
                Box::new(MachineEncoders {
                    readers: sim
                        .encoders()
                        .iter()
                        .map(|e| (e.reader.clone(), e.slot().clone()))
                        .collect(),
                    stock,
                }),
                FarmSettings {
                    max_consecutive_failures: 100,
                    acquire_timeout: Duration::from_secs(20),
                },
            );
            assert_eq!(farm.in_service(), 2);

            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let (services, _guard) = testing::services(Mode::Embedded, None).await;
                let data = tempfile::tempdir().unwrap();
                let pki = Arc::new(
                    Pki::open(
                        PkiConfig {
                            kdf_log_n: 10,
                            ..PkiConfig::default()
                        },
                        data.path(),
                    )
                    .unwrap(),
                );
                let encoders = EncodersConfig::default();
                let secrets = SiteSecrets {
                    master: Arc::new(MasterKeys::test_keys()),
                    transport: encoders.transport_key(data.path()).unwrap(),
                    pins: encoders.pins(),
                };
                let personalize =
                    PersonalizeStage::new(farm.clone(), secrets, ScriptOptions::extended(), 6)
                        .with_ca(pki.clone());
                // QC knows only the controller's address (and pcscd, through the environment).
                let qc_config = QcConfig {
                    max_attempts: 3,
                    station: StationKind::Line,
                    line_controller: controller.clone(),
                    ..QcConfig::default()
                };
                let stations = LineStations::connect(&controller, Duration::from_secs(5)).unwrap();
                let spare = stations.clone();
                let qc = QcStage::new(
                    cardpipe_card::tray::OutputTray::new(),
                    pki.clone(),
                    encoders.pins(),
                    qc_config,
                    &services,
                )
                .with_stations(Stations::Line(stations));

                let ids = seed(&services, APPS).await;
                let stages: Vec<(Arc<dyn Stage>, StageSettings)> = vec![
                    (Arc::new(KeysStage::new(pki.clone())), settings()),
                    (Arc::new(personalize), settings()),
                    (Arc::new(qc), settings()),
                ];
                let relay = Relay::new(services.clone())
                    .with_poll_interval(Duration::from_millis(50))
                    .with_sinks(cardpipe_keys::ops::sinks(&services, Some(pki.clone())))
                    .with_sink(
                        cardpipe_qc::stage::PARK_TOPIC,
                        Arc::new(ParkSink::new(services.clone())),
                    );
                let running = pipeline::start(&services, stages, relay, Duration::from_secs(10))
                    .await
                    .expect("pipeline");

                let deadline = tokio::time::Instant::now() + Duration::from_secs(100);
                for id in &ids {
                    loop {
                        let app = services.store.application(id).await.unwrap().unwrap();
                        if app.state == ApplicationState::QcPassed {
                            break;
                        }
                        if tokio::time::Instant::now() >= deadline {
                            let rows = cards::for_application(&services.store, id).await.unwrap();
                            let history = services.store.history(id).await.unwrap();
                            panic!("{id} stuck in {}\n{history:#?}\n{rows:#?}", app.state);
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                running.shutdown().await.unwrap();

                assert_eq!(planted.load(Ordering::Relaxed), 2, "both defects planted");
                let reasons: Vec<String> = sqlx::query(
                    "SELECT reason FROM qc_reports WHERE outcome = 'failed' ORDER BY reason",
                )
                .fetch_all(services.store.pool())
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<String, _>("reason"))
                .collect();
                assert_eq!(
                    reasons,
                    vec![
                        Reason::CardUnlocked.as_str(),
                        Reason::DgHashMismatch.as_str()
                    ],
                    "QC at the line station refused exactly the planted defects"
                );
                for id in &ids {
                    let rows = cards::for_application(&services.store, id).await.unwrap();
                    let good: Vec<_> = rows.iter().filter(|r| r.state == "personalized").collect();
                    assert_eq!(good.len(), 1, "one good card per application: {rows:?}");
                    let key = services
                        .store
                        .artifact(id, "qc_report")
                        .await
                        .unwrap()
                        .unwrap();
                    let report: cardpipe_qc::stage::QcReport =
                        serde_json::from_slice(&services.objects.get(&key).await.unwrap().unwrap())
                            .unwrap();
                    assert_eq!(report.outcome, "passed");
                    assert!(
                        report.station.starts_with("QC Station"),
                        "read at the line's station: {}",
                        report.station
                    );
                    assert_eq!(report.chip_serial, good[0].chip_serial);
                    assert!(report.checks.len() >= 10 && report.checks.iter().all(|c| c.passed));
                }
                let status = line.status();
                assert_eq!(status.passed, APPS as u64, "{status:?}");
                assert_eq!(status.rejected, 2, "{status:?}");
                assert_eq!(status.on_transport, 0, "{status:?}");

                // A card the machine lost (not on the transport) is reported, never passed.
                let lost = cardpipe_qc::station::Ticket {
                    application_id: "lost".into(),
                    blank_serial: "B-LOST".into(),
                    chip_serial: Some("0000000000000000FFFF".into()),
                };
                let (inspection, station) = tokio::task::spawn_blocking(move || {
                    Stations::Line(spare).inspect(&lost, Box::new(|_| panic!("nothing to inspect")))
                })
                .await
                .unwrap()
                .expect("a free station: a verdict on the card");
                assert_eq!(
                    inspection.verdict(),
                    Some(Reason::CardNotFound),
                    "{station}"
                );
            });
        },
    );
}
