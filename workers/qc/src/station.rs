//! Where QC reads a card: the QC station.
//!
//! - [`Stations::Tray`]: the in-process encoder farm's output tray (embedded mode, where
//!   personalize and QC share one process). The card OS chip is inserted into an in-process
//!   reader.
//! - [`Stations::Line`]: the QC station readers of the production machine's line. The line
//!   controller ([`cardpipe_card::line`]) grants this process a station (coordinated with
//!   every other QC replica on the line) and brings the card — found on the transport by
//!   its recorded chip serial — into it; QC talks to it through pcscd like any
//!   reader, then sends it to the stacker (passed) or the reject bin. Nothing is shared in
//!   memory with the personalize worker, so QC can run in its own process.
//!
//! Both give [`crate::check::inspect`] a plain [`CardChannel`]; the card body serial is only
//! known on the tray path (the job ticket travels with the card). At a line station the card
//! is located by its chip serial and the body serial is reported as not machine-readable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cardpipe_card::line::{LineClient, LineError, LineSession};
use cardpipe_card::reader::{self, BlankStock, CardChannel, Encoder, InProcessEncoder};
use cardpipe_card::scp03::MasterKeys;
use cardpipe_card::tray::{OutputTray, TrayCard};
use serde::Deserialize;

use crate::check::{CheckResult, Inspection, Reason};

/// `[qc] station`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StationKind {
    /// The in-process farm's output tray.
    #[default]
    Tray,
    /// QC station readers of the machine's line, through pcscd and the line controller.
    Line,
}

/// What a QC station needs to know about the card it must inspect.
#[derive(Debug, Clone)]
pub struct Ticket {
    /// Application id.
    pub application_id: String,
    /// Blank-card body serial recorded at personalization.
    pub blank_serial: String,
    /// Chip serial recorded at personalization.
    pub chip_serial: Option<String>,
}

/// The QC stations of this process.
#[derive(Debug, Clone)]
pub enum Stations {
    /// The in-process output tray.
    Tray(Arc<OutputTray>),
    /// The machine's line.
    Line(Arc<LineStations>),
}

/// What a station runs over the card's channel.
pub type Inspect<'a> = Box<dyn FnOnce(&mut dyn CardChannel) -> Inspection + Send + 'a>;

impl Stations {
    /// Brings the card of `ticket` into a station, runs `inspect` over its channel, sends the
    /// card on (stacker when the inspection passed, else reject bin) and returns the
    /// inspection (its first check: how the card was identified) and the station's name.
    /// Blocking: run it on a blocking thread.
    ///
    /// No station granted in time (every one busy with this or another QC process's cards),
    /// a lease lost, or a line controller that does not answer is [`StationUnavailable`]: the card was not read,
    /// so it is no reason to spoil it — the job is retried later.
    pub fn inspect(
        &self,
        ticket: &Ticket,
        inspect: Inspect<'_>,
    ) -> Result<(Inspection, String), StationUnavailable> {
        match self {
            Stations::Tray(tray) => Ok(tray_inspect(tray, ticket, inspect)),
            Stations::Line(line) => line.inspect(ticket, inspect),
        }
    }
}

/// No QC station could take the card now; nothing happened to it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no QC station available: {0}")]
pub struct StationUnavailable(pub String);

fn single(name: &str, reason: Reason, detail: String) -> Inspection {
    Inspection {
        chip_serial: None,
        checks: vec![CheckResult {
            name: name.into(),
            passed: false,
            reason: Some(reason),
            detail,
            micros: 0,
        }],
    }
}

const TRAY_STATION: &str = "qc-station-01";

fn tray_inspect(tray: &OutputTray, ticket: &Ticket, inspect: Inspect<'_>) -> (Inspection, String) {
    let Some(tc) = tray.take(&ticket.application_id) else {
        return (
            single(
                "card_in_tray",
                Reason::CardNotFound,
                format!(
                    "no card for the application in the output tray (blank {})",
                    ticket.blank_serial
                ),
            ),
            TRAY_STATION.into(),
        );
    };
    let body_ok = tc.blank_serial == ticket.blank_serial;
    let body = CheckResult {
        name: "blank_serial".into(),
        passed: body_ok,
        reason: (!body_ok).then_some(Reason::BlankSerialMismatch),
        detail: format!(
            "card body {} , recorded {}",
            tc.blank_serial, ticket.blank_serial
        ),
        micros: 0,
    };
    // The station never feeds blanks; the stock only satisfies the reader type.
    let stock = Arc::new(BlankStock::healthy(MasterKeys::test_keys(), 0));
    let TrayCard { card, .. } = tc;
    let mut reader = InProcessEncoder::new(TRAY_STATION.to_string(), stock);
    let mut inspection = match reader.insert_card(card) {
        Ok(()) => inspect(&mut reader),
        Err(e) => single("power_on", Reason::CardUnreadable, e.to_string()),
    };
    let _ = reader.eject();
    inspection.checks.insert(0, body);
    (inspection, TRAY_STATION.into())
}

/// The QC station readers of a line, shared by this process's QC jobs.
///
/// No station is this process's own: every inspection asks the line controller for a grant
/// ([`cardpipe_card::line`]), so any number of QC replicas share one line without ever
/// loading a card into a station another replica is using. A line whose stations are all in
/// use is waited for (up to six station timeouts, FIFO with the other replicas' jobs), then
/// the job is [`StationUnavailable`] and retried — the card stays on the transport.
#[derive(Debug)]
pub struct LineStations {
    client: LineClient,
    stations: Vec<String>,
    owner: String,
    timeout: Duration,
    inspected: AtomicU64,
    unavailable: AtomicU64,
}

impl LineStations {
    /// Asks the controller at `addr` for its stations. `timeout` bounds how long pcscd may
    /// take to see a card come or go at a station; a station grant is waited for up to six
    /// times that.
    pub fn connect(addr: &str, timeout: Duration) -> Result<Arc<Self>, LineError> {
        let client = LineClient::new(addr);
        let stations = client.stations()?;
        if stations.is_empty() {
            return Err(LineError::Protocol(format!(
                "line controller {addr} has no QC stations"
            )));
        }
        Ok(Arc::new(Self {
            client,
            stations,
            owner: default_owner(),
            timeout,
            inspected: AtomicU64::new(0),
            unavailable: AtomicU64::new(0),
        }))
    }

    /// The controller client.
    pub fn client(&self) -> &LineClient {
        &self.client
    }

    /// The line's station readers, as the controller listed them at connect.
    pub fn stations(&self) -> &[String] {
        &self.stations
    }

    /// The owner name this process gives the controller with its grants (in its logs).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// How long a job waits for a station grant.
    pub fn grant_wait(&self) -> Duration {
        self.timeout * 6
    }

    /// Cards this process brought into a station and read (whatever the verdict).
    pub fn inspected(&self) -> u64 {
        self.inspected.load(Ordering::Relaxed)
    }

    /// Inspections that ended [`StationUnavailable`] (no grant in time, lease lost,
    /// controller unreachable).
    pub fn unavailable(&self) -> u64 {
        self.unavailable.load(Ordering::Relaxed)
    }

    fn inspect(
        &self,
        ticket: &Ticket,
        inspect: Inspect<'_>,
    ) -> Result<(Inspection, String), StationUnavailable> {
        let Some(chip) = ticket.chip_serial.clone() else {
            return Ok((
                single(
                    "card_on_line",
                    Reason::CardNotFound,
                    "no chip serial recorded: the line cannot locate the card".into(),
                ),
                "line".into(),
            ));
        };
        let result = self.granted(&chip, ticket, inspect);
        match &result {
            Ok(_) => self.inspected.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.unavailable.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    /// Gets a station granted, keeps the lease alive while the card is read there, and lets
    /// the session go (ending any lease left) whatever happens.
    fn granted(
        &self,
        chip: &str,
        ticket: &Ticket,
        inspect: Inspect<'_>,
    ) -> Result<(Inspection, String), StationUnavailable> {
        let controller_failed = |e: LineError| {
            tracing::warn!(error = %e, "line controller failed; the job will be retried");
            StationUnavailable(format!("line controller: {e}"))
        };
        let mut session = self.client.session().map_err(controller_failed)?;
        let grant = match session.acquire(&self.owner, self.grant_wait()) {
            Ok(g) => g,
            // Every station is in use (by this or another replica): the card stays on the
            // transport; try again later.
            Err(e @ LineError::Timeout(_)) => {
                tracing::warn!(error = %e, "no QC station granted; the job will be retried");
                return Err(StationUnavailable(e.to_string()));
            }
            Err(e) => return Err(controller_failed(e)),
        };
        let (station, ttl) = (grant.station, grant.ttl);
        let session = Mutex::new(session);
        let done = (Mutex::new(false), Condvar::new());
        std::thread::scope(|scope| {
            // Renews the lease while the card is read, so only a vanished or hung process
            // loses its station.
            scope.spawn(|| {
                let (lock, cv) = &done;
                let mut finished = lock.lock().unwrap_or_else(|e| e.into_inner());
                while !*finished {
                    finished = cv
                        .wait_timeout(finished, ttl / 3)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    if !*finished
                        && let Err(e) = lock_session(&session).renew(&station)
                    {
                        tracing::warn!(%station, error = %e, "renewing the QC station lease failed");
                        return;
                    }
                }
            });
            let result =
                self.at_station(&session, &station, grant.settled, chip, ticket, inspect);
            *done.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
            done.1.notify_all();
            result
        })
        .map(|(inspection, settling)| {
            let session = session.into_inner().unwrap_or_else(|e| e.into_inner());
            match settling {
                // The card went to the stacker or the bin: the station is handed back once
                // pcscd sees it empty — on a thread of its own, so this job's verdict (and
                // its thread's next card, at another station) need not wait for that.
                Some(enc) => {
                    let (station, timeout) = (station.clone(), self.timeout);
                    let spawned = std::thread::Builder::new()
                        .name("qc-station-settle".into())
                        .spawn(move || settle_then_release(session, enc, &station, timeout));
                    if let Err(e) = spawned {
                        // The session went with the closure: its connection closed, which
                        // releases the lease all the same.
                        tracing::warn!(error = %e, "no thread to hand the QC station back; the controller takes it back");
                    }
                }
                None => release(session, &station),
            }
            (inspection, station.clone())
        })
    }

    /// Runs the inspection at the granted `station`: the card is loaded (a card the line
    /// lost is a verdict without touching PC/SC), read through pcscd, then unloaded; the
    /// encoder is returned so that the station is released once pcscd sees it empty.
    /// A station the controller emptied itself (not `settled`: its last holder vanished) is
    /// first waited for until pcscd sees it empty, so its old card is not taken for this one.
    fn at_station(
        &self,
        session: &Mutex<LineSession>,
        station: &str,
        settled: bool,
        chip: &str,
        ticket: &Ticket,
        inspect: Inspect<'_>,
    ) -> Result<(Inspection, Option<reader::PcscEncoder>), StationUnavailable> {
        let give_up = |why: String| {
            // The card (if loaded) goes back onto the transport for the retry.
            if let Err(e) = lock_session(session).release(station) {
                tracing::warn!(%station, error = %e, "releasing the QC station failed (the controller takes it back when this connection closes)");
            }
            tracing::warn!(%station, "{why}; the job will be retried");
            StationUnavailable(why)
        };
        let mut prepared = None;
        if !settled {
            let enc = reader::establish()
                .and_then(|ctx| reader::PcscEncoder::new(ctx, station, None))
                .map_err(|e| give_up(format!("PC/SC at QC station {station}: {e}")))?;
            let deadline = Instant::now() + self.timeout;
            while matches!(enc.card_present(), Ok(true)) {
                if Instant::now() >= deadline {
                    return Err(give_up(format!(
                        "pcscd still sees a card at QC station {station} after {:?}",
                        self.timeout
                    )));
                }
                // Keeps the lease (its deadline is renewed while we wait).
                std::thread::sleep(Duration::from_millis(20));
            }
            prepared = Some(enc);
        }
        match lock_session(session).load(station, chip) {
            Ok(()) => {}
            Err(LineError::NotFound(_)) => {
                // The machine lost the card: a verdict (it is re-made), not a retry. The
                // station never held a card: it is free at once.
                return Ok((
                    single(
                        "card_on_line",
                        Reason::CardNotFound,
                        format!(
                            "no card with chip {chip} on the line's transport (blank {})",
                            ticket.blank_serial
                        ),
                    ),
                    None,
                ));
            }
            Err(e) => return Err(give_up(format!("loading QC station {station}: {e}"))),
        }
        // From here the card is in the station: any failure before the verdict releases the
        // station, which puts the card back onto the transport for the retry.
        let mut enc = match prepared {
            Some(enc) => enc,
            None => reader::establish()
                .and_then(|ctx| reader::PcscEncoder::new(ctx, station, None))
                .map_err(|e| give_up(format!("PC/SC at QC station {station}: {e}")))?,
        };
        enc.set_insert_timeout(self.timeout);
        let located = CheckResult {
            name: "blank_serial".into(),
            passed: true,
            reason: None,
            detail: format!(
                "card located on the line by chip {chip} (recorded with blank {}); the body serial is not machine-readable at {station}",
                ticket.blank_serial
            ),
            micros: 0,
        };
        let mut inspection = match enc.insert() {
            Ok(()) => inspect(&mut enc),
            Err(e) => single("power_on", Reason::CardUnreadable, e.to_string()),
        };
        let _ = enc.eject();
        let passed = inspection.verdict().is_none();
        // The verdict counts only if the card was still ours when it went to the stacker or
        // the bin; a lease lost meanwhile (the controller took the station back and the card
        // onto the transport) or a controller that cannot confirm voids the reading.
        if let Err(e) = lock_session(session).unload(station, passed) {
            tracing::warn!(%station, error = %e, "unloading the QC station failed; the reading is void");
            return Err(give_up(format!("unloading QC station {station}: {e}")));
        }
        inspection.checks.insert(0, located);
        Ok((inspection, Some(enc)))
    }
}

/// Ends the lease on `station` (a card still in it goes back onto the transport). A lease
/// already lost needs no release; a controller that does not answer takes the station back
/// when the session's connection closes.
fn release(mut session: LineSession, station: &str) {
    match session.release(station) {
        Ok(()) | Err(LineError::LeaseLost(_)) => {}
        Err(e) => {
            tracing::warn!(%station, error = %e, "releasing the QC station failed (the controller takes it back when this connection closes)")
        }
    }
}

/// Like the stacker's sensor: a station whose card just left is handed back only once pcscd
/// sees it empty, so the card the next grantee loads there is never taken for this one.
/// The verdict already stands (the card left the station at the `UNLOAD`).
fn settle_then_release(
    session: LineSession,
    enc: reader::PcscEncoder,
    station: &str,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    while matches!(enc.card_present(), Ok(true)) {
        if Instant::now() >= deadline {
            tracing::warn!(%station, "pcscd still sees a card at the QC station after the unload");
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(enc);
    release(session, station);
}

fn lock_session(session: &Mutex<LineSession>) -> std::sync::MutexGuard<'_, LineSession> {
    session.lock().unwrap_or_else(|e| e.into_inner())
}

/// `qc-<host>-<pid>-<random>`: unique per [`LineStations`], readable in the controller's log.
fn default_owner() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && !h.contains(['\t', '\n', '\r']))
        .unwrap_or_else(|| "host".into());
    format!(
        "qc-{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}
