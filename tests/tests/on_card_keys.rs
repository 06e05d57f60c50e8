//! Issue 19, "no private key of a citizen exists outside the chip": a batch runs through the
//! real keys, personalize and QC stages with `[keys] generation = "on_card"` (in-process
//! encoders, SQLite, local object store). As each card leaves its encoder the test reads the
//! two private keys the chip generated (a simulator-only accessor: a real chip never answers
//! them) and afterwards searches for every one of them — raw, hex, base64 — in every byte of
//! the database, every object ever written during the batch (recorded as it was put, so the
//! packages QC destroys are searched too; sealed ones opened with the envelope key) and every
//! log line the stages wrote at debug level. None may appear; no package carries a wrapped key.
//! (The keys read are the certified ones: each certificate written to a card carries the
//! public key of one of them.) The same batch with off-card generation still passes QC, its
//! custody rows name the transport key, and its QC reports say `off_card`.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use cardpipe_card::card_os::profile::{KEY_AUTH, KEY_SIGN};
use cardpipe_card::config::{EncodersConfig, SiteSecrets};
use cardpipe_card::farm::{Farm, FarmSettings, InProcessSource};
use cardpipe_card::reader::BlankStock;
use cardpipe_card::scp03::MasterKeys;
use cardpipe_card::script::ScriptOptions;
use cardpipe_common::broker::RetryPolicy;
use cardpipe_common::domain::ApplicationState;
use cardpipe_common::objects::{ObjectError, ObjectStore};
use cardpipe_common::runtime::pipeline;
use cardpipe_common::runtime::relay::Relay;
use cardpipe_common::runtime::{Services, Stage, StageSettings};
use cardpipe_common::testing::{self, Mode};
use cardpipe_keys::stage::KeysStage;
use cardpipe_personalize::stage::PersonalizeStage;
use cardpipe_pki::custody::{CardCredentials, KeyOrigin};
use cardpipe_pki::settings::{Pki, PkiConfig};
use cardpipe_qc::stage::{QcConfig, QcStage};
use cardpipe_qc::stock::{AutoLot, StockConfig, StockSource};
use sqlx::Row;
use zeroize::Zeroizing;

mod common;
use common::seed;

const APPS: usize = 6;

/// The object store the stages write to, keeping a copy of every object put, so what a stage
/// wrote and another later deleted is searched too.
struct Recording {
    inner: Arc<dyn ObjectStore>,
    puts: Mutex<Vec<(String, bytes::Bytes)>>,
}

#[async_trait::async_trait]
impl ObjectStore for Recording {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    async fn put(&self, key: &str, bytes: bytes::Bytes) -> Result<(), ObjectError> {
        self.puts
            .lock()
            .unwrap()
            .push((key.to_owned(), bytes.clone()));
        self.inner.put(key, bytes).await
    }
    async fn get(&self, key: &str) -> Result<Option<bytes::Bytes>, ObjectError> {
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

/// Log lines of every stage, at debug level.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of this test binary (both tests), from a global debug-level subscriber:
/// the stages log on runtime workers and on the script's certification threads.
fn logs() -> &'static Logs {
    static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let writer = logs.clone();
        tracing::subscriber::set_global_default(
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish(),
        )
        .expect("the only subscriber of this test binary");
        logs
    })
}

fn settings() -> StageSettings {
    StageSettings {
        concurrency: 3,
        prefetch: 6,
        retry: RetryPolicy {
            delays: vec![Duration::from_millis(100)],
            max_attempts: 3,
        },
    }
}

/// Every file under `root`.
fn files(root: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(root).unwrap().map_while(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// The spellings a leaked scalar could take.
fn spellings(key: &[u8; 32]) -> Vec<Vec<u8>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    vec![
        key.to_vec(),
        hex::encode(key).into_bytes(),
        hex::encode_upper(key).into_bytes(),
        b64.encode(key).trim_end_matches('=').as_bytes().to_vec(),
        url.encode(key).into_bytes(),
    ]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Runs a batch with `origin`; returns the chips' private keys, the services' files (the
/// temp dir), the opened packages and the logs.
struct Run {
    keys: Vec<Zeroizing<[u8; 32]>>,
    files: Vec<(String, Vec<u8>)>,
    packages: Vec<(String, Vec<u8>)>,
    custody_transport_ids: Vec<String>,
    services: Services,
    _dir: Option<tempfile::TempDir>,
    _data: tempfile::TempDir,
}

async fn batch(origin: KeyOrigin) -> Run {
    logs();
    let (mut services, dir) = testing::services(Mode::Embedded, None).await;
    let recording = Arc::new(Recording {
        inner: services.objects.clone(),
        puts: Mutex::default(),
    });
    services.objects = recording.clone();
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
    let farm = Farm::new(
        Box::new(InProcessSource::new(
            3,
            Arc::new(BlankStock::healthy(MasterKeys::test_keys(), 31)),
        )),
        FarmSettings::default(),
    );
    // Each card's two private keys, read from the chip as it leaves the encoder.
    let chip_keys: Arc<Mutex<Vec<Zeroizing<[u8; 32]>>>> = Arc::default();
    {
        let chip_keys = chip_keys.clone();
        farm.tray().set_defect_injector(move |_, _, card| {
            let mut keys = chip_keys.lock().unwrap();
            for key_ref in [KEY_AUTH, KEY_SIGN] {
                keys.push(
                    card.simulator_private_key(key_ref)
                        .expect("a key on the chip"),
                );
            }
            None
        });
    }
    let secrets = SiteSecrets {
        master: Arc::new(MasterKeys::test_keys()),
        transport: encoders.transport_key(data.path()).unwrap(),
        pins: encoders.pins(),
    };
    let personalize = PersonalizeStage::new(farm.clone(), secrets, ScriptOptions::extended(), 4)
        .with_blank_source(StockSource::new(StockConfig {
            auto_lot: AutoLot::Always,
            ..StockConfig::default()
        }))
        .with_ca(pki.clone());
    let qc = QcStage::new(
        farm.tray().clone(),
        pki.clone(),
        encoders.pins(),
        QcConfig {
            next_stage: "shipping".into(),
            ..QcConfig::default()
        },
        &services,
    );
    let ids = seed(&services, APPS).await;
    let stages: Vec<(Arc<dyn Stage>, StageSettings)> = vec![
        (
            Arc::new(KeysStage::new(pki.clone()).with_generation(origin)),
            settings(),
        ),
        (Arc::new(personalize), settings()),
        (Arc::new(qc), settings()),
    ];
    let relay = Relay::new(services.clone())
        .with_poll_interval(Duration::from_millis(50))
        .with_sinks(cardpipe_keys::ops::sinks(&services, Some(pki.clone())));
    let running = pipeline::start(&services, stages, relay, Duration::from_secs(10))
        .await
        .expect("pipeline");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    for id in &ids {
        loop {
            let app = services.store.application(id).await.unwrap().unwrap();
            if app.state == ApplicationState::QcPassed {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} stuck in {} ({origin}): {:#?}",
                app.state,
                services.store.history(id).await.unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    running.shutdown().await.unwrap();
    let keys = std::mem::take(&mut *chip_keys.lock().unwrap());
    assert_eq!(keys.len(), 2 * APPS, "two keys per card ({origin})");

    let mut all = Vec::new();
    files(dir.as_ref().unwrap().path(), &mut all);
    let files: Vec<(String, Vec<u8>)> = all
        .iter()
        .map(|p| (p.display().to_string(), std::fs::read(p).unwrap()))
        .collect();
    // Every object written, packages opened (sealed under the envelope key): those QC
    // destroyed after the card passed included.
    let mut packages = Vec::new();
    let written = recording.puts.lock().unwrap().clone();
    for (key, bytes) in &written {
        if key.contains("/credentials-") {
            let id = key.split('/').nth(1).unwrap();
            let opened = services
                .sealer
                .open(&format!("credentials:{id}"), bytes)
                .expect("a sealed package");
            packages.push((key.clone(), opened.to_vec()));
        }
    }
    // At least one per application (a retried or duplicated keys job writes another).
    let packaged: std::collections::BTreeSet<&str> = packages
        .iter()
        .filter_map(|(k, _): &(String, Vec<u8>)| k.split('/').nth(1))
        .collect();
    assert_eq!(packaged.len(), APPS, "a package per application ({origin})");
    let files: Vec<(String, Vec<u8>)> = files
        .into_iter()
        .chain(
            written
                .iter()
                .map(|(k, b)| (format!("object {k}"), b.to_vec())),
        )
        .collect();
    let custody_transport_ids = sqlx::query("SELECT transport_key_id FROM wrapped_key_custody")
        .fetch_all(services.store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<String, _>("transport_key_id"))
        .collect();
    Run {
        keys,
        files,
        packages,
        custody_transport_ids,
        services,
        _dir: dir,
        _data: data,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_born_on_the_chip_are_nowhere_else_in_the_store_the_objects_or_the_logs() {
    let run = batch(KeyOrigin::OnCard).await;
    let logged = logs().0.lock().unwrap().clone();
    assert!(
        contains(&logged, b"keys generated on the chip certified"),
        "the stages logged at debug level into the capture"
    );
    let mut sources: Vec<(String, Vec<u8>)> = run.files.clone();
    sources.extend(run.packages.iter().cloned());
    sources.push(("logs".into(), logged));
    for (i, key) in run.keys.iter().enumerate() {
        for spelling in spellings(key) {
            for (name, bytes) in &sources {
                assert!(!contains(bytes, &spelling), "chip key {i} found in {name}");
            }
        }
    }
    for (key, json) in &run.packages {
        let package: CardCredentials = serde_json::from_slice(json).unwrap();
        assert_eq!(package.key_origin(), KeyOrigin::OnCard, "{key}");
        assert!(
            !contains(json, b"authentication_key") && !contains(json, b"ciphertext"),
            "{key} carries a wrapped key"
        );
    }
    assert!(
        run.custody_transport_ids.iter().all(String::is_empty),
        "a package wrapped something under a transport key: {:?}",
        run.custody_transport_ids
    );
    let blobs = run
        .files
        .iter()
        .filter(|(_, bytes)| contains(bytes, b"CPWK"))
        .count();
    assert_eq!(blobs, 0, "a wrapped-key blob on disk");
    // The keys read from the chips are the certified ones.
    let publics: Vec<Vec<u8>> = run
        .keys
        .iter()
        .map(|k| cardpipe_card::script::public_key_of(k).expect("a P-256 scalar"))
        .collect();
    let mut certified = 0;
    for (name, bytes) in &run.files {
        if name.starts_with("object ") && name.contains("card-certificates-") {
            let written: cardpipe_pki::custody::CardCertificates =
                serde_json::from_slice(bytes).unwrap();
            for cert in [&written.authentication, &written.signature] {
                assert!(
                    publics.iter().any(|p| contains(&cert.der, p)),
                    "{name}: a certificate for a key the test did not read from a chip"
                );
                certified += 1;
            }
        }
    }
    assert_eq!(certified, 2 * APPS, "card certificates recorded per card");
    // Every certificate recorded is one of the cards' (two per card, all valid).
    let certs: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM certificates WHERE status = 'valid'")
        .fetch_one(run.services.store.pool())
        .await
        .unwrap();
    assert_eq!(certs, 2 * APPS as i64);
}

/// Off-card generation still works end to end: every card passes QC, the packages were
/// custodied under the transport key, and the QC reports say `off_card`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn off_card_generation_still_passes_qc_with_packages_under_the_transport_key() {
    logs();
    let run = batch(KeyOrigin::OffCard).await;
    assert!(
        run.custody_transport_ids.iter().all(|t| !t.is_empty()),
        "{:?}",
        run.custody_transport_ids
    );
    let reports: Vec<String> = sqlx::query_scalar("SELECT object_key FROM qc_reports")
        .fetch_all(run.services.store.pool())
        .await
        .unwrap();
    assert_eq!(reports.len(), APPS);
    for key in reports {
        let report: cardpipe_qc::stage::QcReport =
            serde_json::from_slice(&run.services.objects.get(&key).await.unwrap().unwrap())
                .unwrap();
        assert_eq!(report.key_origin, KeyOrigin::OffCard);
        assert_eq!(report.outcome, "passed");
    }
}
