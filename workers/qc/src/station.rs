//! Where QC reads a card: the QC station.
//!
//! - [`Stations::Tray`]: the in-process encoder farm's output tray (embedded mode, where
//!   personalize and QC share one process). The card OS chip is inserted into an in-process
//!   reader.
//! - [`Stations::Line`]: the QC station readers of the production machine's line. The line
//!   controller ([`cardpipe_card::line`]) brings the card — found on the transport by
//!   its recorded chip serial — into a free station; QC talks to it through pcscd like any
//!   reader, then sends it to the stacker (passed) or the reject bin. Nothing is shared in
//!   memory with the personalize worker, so QC can run in its own process.
//!
//! Both give [`crate::check::inspect`] a plain [`CardChannel`]; the card body serial is only
//! known on the tray path (the job ticket travels with the card). At a line station the card
//! is located by its chip serial and the body serial is reported as not machine-readable.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cardpipe_card::line::{LineClient, LineError};
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

type Inspect = Box<dyn FnOnce(&mut dyn CardChannel) -> Inspection + Send>;

impl Stations {
    /// Brings the card of `ticket` into a station, runs `inspect` over its channel, sends the
    /// card on (stacker when the inspection passed, else reject bin) and returns the
    /// inspection (its first check: how the card was identified) and the station's name.
    /// Blocking: run it on a blocking thread.
    ///
    /// A station that is busy (another QC process's card is in it), none becoming free, or a
    /// line controller that does not answer is [`StationUnavailable`]: the card was not read,
    /// so it is no reason to spoil it — the job is retried later.
    pub fn inspect(
        &self,
        ticket: &Ticket,
        inspect: Inspect,
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

fn tray_inspect(tray: &OutputTray, ticket: &Ticket, inspect: Inspect) -> (Inspection, String) {
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
#[derive(Debug)]
pub struct LineStations {
    client: LineClient,
    free: Mutex<Vec<String>>,
    available: std::sync::Condvar,
    timeout: Duration,
}

impl LineStations {
    /// Asks the controller at `addr` for its stations.
    pub fn connect(addr: &str, timeout: Duration) -> Result<Arc<Self>, LineError> {
        let client = LineClient::new(addr);
        let mut stations = client.stations()?;
        if stations.is_empty() {
            return Err(LineError::Protocol(format!(
                "line controller {addr} has no QC stations"
            )));
        }
        stations.reverse();
        Ok(Arc::new(Self {
            client,
            free: Mutex::new(stations),
            available: std::sync::Condvar::new(),
            timeout,
        }))
    }

    /// The controller client.
    pub fn client(&self) -> &LineClient {
        &self.client
    }

    fn take_station(&self) -> Option<String> {
        let deadline = Instant::now() + self.timeout * 6;
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(s) = free.pop() {
                return Some(s);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            free = self
                .available
                .wait_timeout(free, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn give_back(&self, station: String) {
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(station);
        self.available.notify_one();
    }

    fn inspect(
        &self,
        ticket: &Ticket,
        inspect: Inspect,
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
        let Some(station) = self.take_station() else {
            return Err(StationUnavailable(format!(
                "none of this process's QC stations became free within {:?}",
                self.timeout * 6
            )));
        };
        let inspection = self.at_station(&station, &chip, ticket, inspect);
        self.give_back(station.clone());
        Ok((inspection?, station))
    }

    fn at_station(
        &self,
        station: &str,
        chip: &str,
        ticket: &Ticket,
        inspect: Inspect,
    ) -> Result<Inspection, StationUnavailable> {
        match self.client.load(station, chip) {
            Ok(()) => {}
            Err(LineError::NotFound(_)) => {
                return Ok(single(
                    "card_on_line",
                    Reason::CardNotFound,
                    format!(
                        "no card with chip {chip} on the line's transport (blank {})",
                        ticket.blank_serial
                    ),
                ));
            }
            // Another QC process's card is in the station (replicas share the line), or the
            // controller did not answer: the card stays on the transport; try again later.
            Err(e @ LineError::Busy(_)) => {
                tracing::warn!(%station, "QC station busy; the job will be retried");
                return Err(StationUnavailable(e.to_string()));
            }
            Err(e) => {
                tracing::warn!(%station, error = %e, "line controller failed; the job will be retried");
                return Err(StationUnavailable(format!("line controller: {e}")));
            }
        }
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
        let mut inspection = match reader::establish()
            .and_then(|ctx| reader::PcscEncoder::new(ctx, station, None))
        {
            Ok(mut enc) => {
                enc.set_insert_timeout(self.timeout);
                let result = match enc.insert() {
                    Ok(()) => inspect(&mut enc),
                    Err(e) => single("power_on", Reason::CardUnreadable, e.to_string()),
                };
                let _ = enc.eject();
                let passed = result.verdict().is_none();
                if let Err(e) = self.client.unload(station, passed) {
                    tracing::warn!(%station, error = %e, "unloading the QC station failed");
                }
                // Like the stacker's sensor: wait until pcscd sees the station empty, so the
                // next card loaded here is not taken for this one.
                let deadline = Instant::now() + self.timeout;
                while matches!(enc.card_present(), Ok(true)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                result
            }
            Err(e) => {
                let _ = self.client.unload(station, false);
                single("power_on", Reason::CardUnreadable, e.to_string())
            }
        };
        inspection.checks.insert(0, located);
        Ok(inspection)
    }
}
