//! The encoder farm: an async pool over blocking card encoders.
//!
//! - Encoders come from an [`EncoderSource`]: PC/SC readers discovered through pcscd
//!   ([`PcscSource`]) or N in-process card OS encoders ([`InProcessSource`], embedded mode).
//! - [`Farm::acquire`] binds one job to one free, present, in-service encoder (round robin)
//!   and returns a [`Lease`]; [`Lease::run`] runs blocking encoder work on the blocking pool
//!   and hands the encoder back. The card feed is the encoder's own insert / eject, one card
//!   per job.
//! - Hot plug: [`Farm::rescan`] (periodically from [`Farm::spawn_rescan`]) adds readers that
//!   appeared, marks vanished ones unavailable and reopens those that came back. A job whose
//!   reader vanishes under it reports [`Outcome::Vanished`]: the caller retries it on another
//!   encoder.
//! - Health: [`FarmSettings::max_consecutive_failures`] failures in a row (spoiled cards or
//!   encoder faults) take an encoder out of service automatically; operators use
//!   [`Farm::set_in_service`] to take one out and put it back.
//! - Yield and throughput: [`Farm::status`], and the Prometheus metrics
//!   `cardpipe_encoder_cards_total{encoder,outcome}`, `cardpipe_encoders_in_service`,
//!   `cardpipe_encoder_busy_seconds_total{encoder}`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::reader::{self, BlankStock, CardChannel, Encoder, InProcessEncoder, ReaderError};

/// Where a farm's encoders come from.
pub trait EncoderSource: Send + Sync {
    /// What kind of source (for logs): "in_process" or "pcsc".
    fn kind(&self) -> &'static str;
    /// Names of the encoders present now.
    fn scan(&self) -> Result<Vec<String>, ReaderError>;
    /// Opens the named encoder.
    fn open(&self, name: &str) -> Result<Box<dyn Encoder>, ReaderError>;
}

/// PC/SC readers through pcscd. Blanks are fed by the reader's own hopper (or the
/// simulator's auto feed, `cardpipe encoders simulate`): insert waits for a card, eject
/// powers it down.
#[derive(Debug, Clone)]
pub struct PcscSource {
    /// How long an insert waits for a card.
    pub insert_timeout: Duration,
    /// Readers whose names start with one of these are not encoders (QC stations of the
    /// line, a desk reader) and are never fed blanks.
    pub skip_readers: Vec<String>,
}

impl EncoderSource for PcscSource {
    fn kind(&self) -> &'static str {
        "pcsc"
    }

    fn scan(&self) -> Result<Vec<String>, ReaderError> {
        let ctx = reader::establish()?;
        Ok(reader::list_readers(&ctx)?
            .into_iter()
            .filter(|name| {
                !self
                    .skip_readers
                    .iter()
                    .any(|p| name.starts_with(p.as_str()))
            })
            .collect())
    }

    fn open(&self, name: &str) -> Result<Box<dyn Encoder>, ReaderError> {
        let mut enc = reader::PcscEncoder::new(reader::establish()?, name, None)?;
        enc.set_insert_timeout(self.insert_timeout);
        Ok(Box::new(enc))
    }
}

/// N in-process card OS encoders sharing one [`BlankStock`]. [`InProcessSource::unplug`] /
/// [`InProcessSource::plug`] simulate a reader vanishing and coming back.
pub struct InProcessSource {
    names: Vec<String>,
    stock: Arc<BlankStock>,
    unplugged: Arc<Mutex<HashSet<String>>>,
}

impl std::fmt::Debug for InProcessSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InProcessSource({} encoders)", self.names.len())
    }
}

impl InProcessSource {
    /// `count` encoders named `encoder-01`, `encoder-02`, ...
    pub fn new(count: usize, stock: Arc<BlankStock>) -> Self {
        Self {
            names: (1..=count).map(|i| format!("encoder-{i:02}")).collect(),
            stock,
            unplugged: Arc::default(),
        }
    }

    /// The blank stock.
    pub fn stock(&self) -> &Arc<BlankStock> {
        &self.stock
    }

    /// A handle that unplugs / plugs these encoders (hot-plug simulation).
    pub fn hot_plug(&self) -> HotPlug {
        HotPlug(self.unplugged.clone())
    }
}

/// Unplugs and plugs in-process encoders: an unplugged reader fails every exchange with
/// [`ReaderError::ReaderUnavailable`] and scans miss it.
#[derive(Clone, Debug)]
pub struct HotPlug(Arc<Mutex<HashSet<String>>>);

impl HotPlug {
    /// Pulls the reader's cable.
    pub fn unplug(&self, name: &str) {
        lock(&self.0).insert(name.to_string());
    }

    /// Plugs it back in.
    pub fn plug(&self, name: &str) {
        lock(&self.0).remove(name);
    }
}

impl EncoderSource for InProcessSource {
    fn kind(&self) -> &'static str {
        "in_process"
    }

    fn scan(&self) -> Result<Vec<String>, ReaderError> {
        let gone = lock(&self.unplugged);
        Ok(self
            .names
            .iter()
            .filter(|n| !gone.contains(*n))
            .cloned()
            .collect())
    }

    fn open(&self, name: &str) -> Result<Box<dyn Encoder>, ReaderError> {
        if lock(&self.unplugged).contains(name) || !self.names.iter().any(|n| n == name) {
            return Err(ReaderError::ReaderUnavailable(name.to_string()));
        }
        Ok(Box::new(Pluggable {
            inner: InProcessEncoder::new(name, self.stock.clone()),
            unplugged: self.unplugged.clone(),
        }))
    }
}

/// An in-process encoder that can be "unplugged".
struct Pluggable {
    inner: InProcessEncoder,
    unplugged: Arc<Mutex<HashSet<String>>>,
}

impl Pluggable {
    fn check(&self) -> Result<(), ReaderError> {
        if lock(&self.unplugged).contains(self.inner.reader_name()) {
            Err(ReaderError::ReaderUnavailable(
                self.inner.reader_name().to_string(),
            ))
        } else {
            Ok(())
        }
    }
}

impl CardChannel for Pluggable {
    fn reader_name(&self) -> &str {
        self.inner.reader_name()
    }
    fn transmit(&mut self, apdu: &[u8]) -> Result<Vec<u8>, ReaderError> {
        self.check()?;
        self.inner.transmit(apdu)
    }
}

impl Encoder for Pluggable {
    fn insert(&mut self) -> Result<(), ReaderError> {
        self.check()?;
        self.inner.insert()
    }
    fn eject(&mut self) -> Result<(), ReaderError> {
        self.inner.eject()
    }
    fn take_ejected(&mut self) -> Option<crate::card_os::Card> {
        self.inner.take_ejected()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Farm tunables.
#[derive(Debug, Clone)]
pub struct FarmSettings {
    /// Failures in a row (spoiled cards or encoder faults) that take an encoder out of
    /// service.
    pub max_consecutive_failures: u32,
    /// How long [`Farm::acquire`] waits for a free encoder.
    pub acquire_timeout: Duration,
}

impl Default for FarmSettings {
    fn default() -> Self {
        Self {
            max_consecutive_failures: 5,
            acquire_timeout: Duration::from_secs(30),
        }
    }
}

/// How one job ended on its encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A card was personalized.
    Personalized,
    /// The blank was spoiled (a card fault).
    Spoiled,
    /// The encoder failed (not the card's fault); counts against its health.
    EncoderFault,
    /// The reader disappeared; it is marked unavailable until a scan finds it again.
    Vanished,
}

/// Why no encoder could be had or used.
#[derive(Debug, thiserror::Error)]
pub enum FarmError {
    /// Nothing free, present and in service within the timeout.
    #[error("no encoder available within {0:?} ({1} in service)")]
    NoEncoder(Duration, usize),
    /// The blocking task running encoder work panicked; the encoder is out of service.
    #[error("encoder {0} work panicked")]
    Panicked(String),
}

/// The state of one encoder, as the console shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderStatus {
    /// Reader name.
    pub name: String,
    /// Present (the last scan saw it).
    pub present: bool,
    /// In service (operator or health decision).
    pub in_service: bool,
    /// Why it is out of service.
    pub out_of_service_reason: Option<String>,
    /// Running a job now.
    pub busy: bool,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// Cards personalized.
    pub personalized: u64,
    /// Blanks spoiled.
    pub spoiled: u64,
    /// Encoder faults and vanishings.
    pub faults: u64,
    /// Time spent on jobs.
    pub busy_time: Duration,
}

impl EncoderStatus {
    /// Personalized / (personalized + spoiled); 1 when nothing was done yet.
    pub fn yield_ratio(&self) -> f64 {
        let total = self.personalized + self.spoiled;
        if total == 0 {
            1.0
        } else {
            self.personalized as f64 / total as f64
        }
    }
}

struct Slot {
    status: EncoderStatus,
    encoder: Option<Box<dyn Encoder>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CardLabels {
    encoder: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EncoderLabel {
    encoder: String,
}

#[derive(Clone, Default)]
struct FarmMetrics {
    cards: Family<CardLabels, Counter>,
    in_service: Gauge,
    busy: Family<EncoderLabel, Counter<f64, AtomicU64>>,
}

/// The encoder farm.
pub struct Farm {
    source: Box<dyn EncoderSource>,
    settings: FarmSettings,
    slots: Mutex<Vec<Slot>>,
    cursor: AtomicU64,
    blanks: AtomicU64,
    id: String,
    released: Notify,
    metrics: FarmMetrics,
    tray: Arc<crate::tray::OutputTray>,
}

impl std::fmt::Debug for Farm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Farm({}, {} encoders)",
            self.source.kind(),
            lock(&self.slots).len()
        )
    }
}

impl Farm {
    /// A farm over `source`, scanned once.
    pub fn new(source: Box<dyn EncoderSource>, settings: FarmSettings) -> Arc<Self> {
        let farm = Arc::new(Self {
            source,
            settings,
            slots: Mutex::new(Vec::new()),
            cursor: AtomicU64::new(0),
            blanks: AtomicU64::new(0),
            id: format!("{:08X}", rand::random::<u32>()),
            released: Notify::new(),
            metrics: FarmMetrics::default(),
            tray: crate::tray::OutputTray::new(),
        });
        if let Err(e) = farm.rescan() {
            tracing::warn!(error = %e, "encoder scan failed");
        }
        farm
    }

    /// Registers the farm's metrics (names get the registry's `cardpipe_` prefix).
    pub fn register_metrics(&self, metrics: &cardpipe_common::telemetry::metrics::Metrics) {
        let m = self.metrics.clone();
        metrics.register(move |r| {
            r.register(
                "encoder_cards",
                "Cards finished per encoder: personalized or spoiled",
                m.cards,
            );
            r.register(
                "encoders_in_service",
                "Encoders present and in service",
                m.in_service,
            );
            r.register(
                "encoder_busy_seconds",
                "Seconds each encoder spent on jobs",
                m.busy,
            );
        });
    }

    /// The output tray personalized in-process cards wait in for QC.
    pub fn tray(&self) -> &Arc<crate::tray::OutputTray> {
        &self.tray
    }

    /// The source kind ("in_process" or "pcsc").
    pub fn kind(&self) -> &'static str {
        self.source.kind()
    }

    /// A fresh blank-card serial: what the feed reads off the card body. Unique per farm
    /// instance (random prefix) and job.
    pub fn next_blank_serial(&self) -> String {
        format!(
            "BLK-{}-{:06}",
            self.id,
            self.blanks.fetch_add(1, Ordering::Relaxed) + 1
        )
    }

    /// Looks for readers that appeared, vanished or came back. Blocking (PC/SC calls).
    pub fn rescan(&self) -> Result<(), ReaderError> {
        let names = self.source.scan()?;
        let mut slots = lock(&self.slots);
        for slot in slots.iter_mut() {
            let here = names.contains(&slot.status.name);
            if !here && slot.status.present {
                tracing::warn!(encoder = %slot.status.name, "encoder vanished");
                slot.status.present = false;
                if !slot.status.busy {
                    slot.encoder = None;
                }
            } else if here && !slot.status.present && !slot.status.busy {
                match self.source.open(&slot.status.name) {
                    Ok(enc) => {
                        tracing::info!(encoder = %slot.status.name, "encoder is back");
                        slot.encoder = Some(enc);
                        slot.status.present = true;
                        slot.status.consecutive_failures = 0;
                    }
                    Err(e) => {
                        tracing::warn!(encoder = %slot.status.name, error = %e, "cannot open encoder")
                    }
                }
            }
        }
        for name in names {
            if slots.iter().any(|s| s.status.name == name) {
                continue;
            }
            let encoder = match self.source.open(&name) {
                Ok(e) => Some(e),
                Err(e) => {
                    tracing::warn!(encoder = %name, error = %e, "cannot open encoder");
                    None
                }
            };
            tracing::info!(encoder = %name, "encoder found");
            slots.push(Slot {
                status: EncoderStatus {
                    name,
                    present: encoder.is_some(),
                    in_service: true,
                    out_of_service_reason: None,
                    busy: false,
                    consecutive_failures: 0,
                    personalized: 0,
                    spoiled: 0,
                    faults: 0,
                    busy_time: Duration::ZERO,
                },
                encoder,
            });
        }
        self.update_gauge(&slots);
        drop(slots);
        self.released.notify_waiters();
        Ok(())
    }

    /// Rescans every `interval` until `shutdown`.
    pub fn spawn_rescan(
        self: &Arc<Self>,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let farm = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                let f = farm.clone();
                match tokio::task::spawn_blocking(move || f.rescan()).await {
                    Ok(Err(e)) => tracing::warn!(error = %e, "encoder scan failed"),
                    Err(e) => tracing::warn!(error = %e, "encoder scan panicked"),
                    Ok(Ok(())) => {}
                }
            }
        })
    }

    fn update_gauge(&self, slots: &[Slot]) {
        let n = slots
            .iter()
            .filter(|s| s.status.present && s.status.in_service)
            .count();
        self.metrics.in_service.set(n as i64);
    }

    /// Every encoder's state.
    pub fn status(&self) -> Vec<EncoderStatus> {
        lock(&self.slots).iter().map(|s| s.status.clone()).collect()
    }

    /// Encoders present and in service.
    pub fn in_service(&self) -> usize {
        lock(&self.slots)
            .iter()
            .filter(|s| s.status.present && s.status.in_service)
            .count()
    }

    /// Takes an encoder out of service (`false`, with a reason) or puts it back (`true`;
    /// clears its failure count). A busy encoder finishes its job first. Returns false for
    /// an unknown name.
    pub fn set_in_service(&self, name: &str, in_service: bool, reason: &str) -> bool {
        let mut slots = lock(&self.slots);
        let Some(slot) = slots.iter_mut().find(|s| s.status.name == name) else {
            return false;
        };
        slot.status.in_service = in_service;
        if in_service {
            slot.status.out_of_service_reason = None;
            slot.status.consecutive_failures = 0;
        } else {
            slot.status.out_of_service_reason = Some(reason.to_string());
        }
        tracing::info!(
            encoder = name,
            in_service,
            reason,
            "encoder service state changed"
        );
        self.update_gauge(&slots);
        drop(slots);
        self.released.notify_waiters();
        true
    }

    /// Binds the caller to one free encoder, waiting up to the acquire timeout.
    pub async fn acquire(self: &Arc<Self>) -> Result<Lease, FarmError> {
        let deadline = tokio::time::Instant::now() + self.settings.acquire_timeout;
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(lease) = self.try_acquire() {
                return Ok(lease);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(FarmError::NoEncoder(
                    self.settings.acquire_timeout,
                    self.in_service(),
                ));
            }
            let wait = (deadline - now).min(Duration::from_millis(200));
            let _ = tokio::time::timeout(wait, notified).await;
        }
    }

    fn try_acquire(self: &Arc<Self>) -> Option<Lease> {
        let mut slots = lock(&self.slots);
        let n = slots.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) as usize;
        for k in 0..n {
            let i = (start + k) % n;
            let s = &mut slots[i];
            if s.status.present && s.status.in_service && !s.status.busy && s.encoder.is_some() {
                s.status.busy = true;
                return Some(Lease {
                    farm: self.clone(),
                    index: i,
                    name: s.status.name.clone(),
                    encoder: s.encoder.take(),
                    started: Instant::now(),
                    outcome: None,
                });
            }
        }
        None
    }

    fn release(&self, lease: &mut Lease) {
        let busy = lease.started.elapsed();
        let mut slots = lock(&self.slots);
        let max = self.settings.max_consecutive_failures;
        let slot = &mut slots[lease.index];
        slot.status.busy = false;
        slot.status.busy_time += busy;
        self.metrics
            .busy
            .get_or_create(&EncoderLabel {
                encoder: lease.name.clone(),
            })
            .inc_by(busy.as_secs_f64());
        let card = |outcome: &'static str| CardLabels {
            encoder: lease.name.clone(),
            outcome,
        };
        let failed = match lease.outcome {
            Some(Outcome::Personalized) => {
                slot.status.personalized += 1;
                slot.status.consecutive_failures = 0;
                self.metrics
                    .cards
                    .get_or_create(&card("personalized"))
                    .inc();
                false
            }
            Some(Outcome::Spoiled) => {
                slot.status.spoiled += 1;
                self.metrics.cards.get_or_create(&card("spoiled")).inc();
                true
            }
            Some(Outcome::EncoderFault) => {
                slot.status.faults += 1;
                true
            }
            Some(Outcome::Vanished) => {
                slot.status.faults += 1;
                slot.status.present = false;
                lease.encoder = None;
                false
            }
            None => false,
        };
        if failed {
            slot.status.consecutive_failures += 1;
            if slot.status.consecutive_failures >= max && slot.status.in_service {
                slot.status.in_service = false;
                let reason = format!("{} failures in a row", slot.status.consecutive_failures);
                tracing::warn!(encoder = %lease.name, %reason, "encoder taken out of service");
                slot.status.out_of_service_reason = Some(reason);
            }
        }
        if lease.encoder.is_some() && slot.status.present {
            slot.encoder = lease.encoder.take();
        }
        self.update_gauge(&slots);
        drop(slots);
        self.released.notify_one();
    }
}

/// One job's hold on one encoder; the encoder goes back to the farm on drop.
pub struct Lease {
    farm: Arc<Farm>,
    index: usize,
    name: String,
    encoder: Option<Box<dyn Encoder>>,
    started: Instant,
    outcome: Option<Outcome>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({})", self.name)
    }
}

impl Lease {
    /// The encoder's name.
    pub fn encoder(&self) -> &str {
        &self.name
    }

    /// Runs blocking work on the encoder (on the blocking thread pool).
    pub async fn run<R, F>(&mut self, f: F) -> Result<R, FarmError>
    where
        R: Send + 'static,
        F: FnOnce(&mut dyn Encoder) -> R + Send + 'static,
    {
        let Some(mut enc) = self.encoder.take() else {
            return Err(FarmError::Panicked(self.name.clone()));
        };
        match tokio::task::spawn_blocking(move || {
            let r = f(enc.as_mut());
            (enc, r)
        })
        .await
        {
            Ok((enc, r)) => {
                self.encoder = Some(enc);
                Ok(r)
            }
            Err(_) => {
                self.farm
                    .set_in_service(&self.name, false, "encoder work panicked");
                Err(FarmError::Panicked(self.name.clone()))
            }
        }
    }

    /// Records how the job ended (the last call wins).
    pub fn report(&mut self, outcome: Outcome) {
        self.outcome = Some(outcome);
    }

    /// Classifies a reader error of this job: the reader vanished, or the encoder failed.
    pub fn report_reader_error(&mut self, e: &ReaderError) {
        self.report(match e {
            ReaderError::ReaderUnavailable(_)
            | ReaderError::NoService(_)
            | ReaderError::NoLibrary(_) => Outcome::Vanished,
            _ => Outcome::EncoderFault,
        });
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let farm = self.farm.clone();
        farm.release(self);
    }
}

/// A farm benchmark: `cards` jobs over the farm's encoders, each one insert +
/// personalize + eject of `image`; returns (cards personalized, wall time, busy fraction).
pub async fn drive(
    farm: &Arc<Farm>,
    cards: usize,
    image: Arc<crate::script::CardImage>,
    master: Arc<crate::scp03::MasterKeys>,
    opts: crate::script::ScriptOptions,
    concurrency: usize,
    certifier: Option<Arc<dyn crate::script::Certifier + Send + Sync>>,
) -> (usize, Duration) {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (farm, image, master, opts, next, certifier) = (
            farm.clone(),
            image.clone(),
            master.clone(),
            opts.clone(),
            next.clone(),
            certifier.clone(),
        );
        tasks.spawn(async move {
            let mut ok = 0usize;
            while (next.fetch_add(1, Ordering::Relaxed) as usize) < cards {
                let Ok(mut lease) = farm.acquire().await else {
                    continue;
                };
                let (image, master, opts) = (image.clone(), master.clone(), opts.clone());
                let certifier = certifier.clone();
                let r = lease
                    .run(move |enc| {
                        enc.insert()?;
                        let r = match &certifier {
                            None => crate::script::personalize(&mut *enc, &image, &master, &opts),
                            Some(ca) => crate::script::personalize_generating_keys(
                                &mut *enc,
                                &image,
                                ca.as_ref(),
                                &master,
                                &opts,
                            ),
                        };
                        let _ = enc.eject();
                        r
                    })
                    .await;
                match r {
                    Ok(Ok(_)) => {
                        lease.report(Outcome::Personalized);
                        ok += 1;
                    }
                    Ok(Err(e)) if e.spoils_blank() => lease.report(Outcome::Spoiled),
                    _ => lease.report(Outcome::EncoderFault),
                }
            }
            ok
        });
    }
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        ok += r.unwrap_or(0);
    }
    (ok, started.elapsed())
}
