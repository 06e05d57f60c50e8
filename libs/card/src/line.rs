//! The card line of a (simulated) production machine: the transport that carries finished
//! cards from the encoders to the QC stations, and the line controller that QC drives.
//!
//! A real card production system moves each card from its encoding module along a transport
//! to a verification (QC) module — a contact reader of its own — and then to the output
//! stacker or the reject bin. The machine's controller, not PC/SC, moves cards: PC/SC only
//! talks to the card once it sits in a reader. [`CardLine`] models exactly that for
//! `cardpipe encoders simulate --qc-stations M`:
//!
//! - every card leaving an encoder slot (see [`crate::vpcd::SlotHandle::set_output`]) lands
//!   on the transport, identified by its chip serial (what the station's own CPLC read would
//!   tell);
//! - [`CardLine::load`] moves the card with a given chip serial into a QC station's reader
//!   (a vpcd slot pcscd serves like any other reader), [`CardLine::unload`] sends it on to
//!   the output stacker (passed) or the reject bin;
//! - [`CardLine::serve`] exposes those moves to other processes over a one-line-per-request
//!   TCP protocol, and [`LineClient`] speaks it, so a QC worker in another process (or on
//!   another host of the same production line) drives the stations it reads through pcscd.
//!
//! Protocol (UTF-8, one request line, one reply line; fields separated by TAB because reader
//! names contain spaces):
//! - `STATIONS` → `OK\t<reader>\t<reader>...`
//! - `LOAD\t<station reader>\t<chip serial hex>` → `OK` or `ERR\t<code>\t<text>`
//! - `UNLOAD\t<station reader>\t<pass|reject>` → `OK` or `ERR\t<code>\t<text>`
//! - `STATUS` → `OK\t<on transport>\t<passed>\t<rejected>\t<dropped>`
//!
//! Error codes: `not_found` (no such card on the transport), `busy` (the station holds a
//! card), `empty` (nothing to unload), `unknown_station`, `bad_request`.
//!
//! The transport holds at most [`CardLine::CAPACITY`] cards; beyond that the oldest falls off
//! (counted as dropped, as a jammed or hand-removed card would be), so cards that QC never
//! asks for (their application was cancelled) cannot pile up without bound.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::card_os::{Card, Defect};
use crate::vpcd::SlotHandle;

/// Why a line move was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// No card with that chip serial is on the transport.
    #[error("no card with chip serial {0} on the transport")]
    NotFound(String),
    /// The station already holds a card.
    #[error("QC station {0} is busy")]
    Busy(String),
    /// The station holds no card.
    #[error("QC station {0} holds no card")]
    Empty(String),
    /// No such station.
    #[error("no QC station named {0:?}")]
    UnknownStation(String),
    /// A malformed request or reply.
    #[error("line protocol: {0}")]
    Protocol(String),
    /// The controller could not be reached.
    #[error("line controller {addr}: {reason}")]
    Unreachable {
        /// Controller address.
        addr: String,
        /// What failed.
        reason: String,
    },
}

impl LineError {
    fn code(&self) -> &'static str {
        match self {
            LineError::NotFound(_) => "not_found",
            LineError::Busy(_) => "busy",
            LineError::Empty(_) => "empty",
            LineError::UnknownStation(_) => "unknown_station",
            LineError::Protocol(_) | LineError::Unreachable { .. } => "bad_request",
        }
    }

    fn from_code(code: &str, text: &str) -> Self {
        let subject = text.to_string();
        match code {
            "not_found" => LineError::NotFound(subject),
            "busy" => LineError::Busy(subject),
            "empty" => LineError::Empty(subject),
            "unknown_station" => LineError::UnknownStation(subject),
            _ => LineError::Protocol(subject),
        }
    }

    fn subject(&self) -> String {
        match self {
            LineError::NotFound(s)
            | LineError::Busy(s)
            | LineError::Empty(s)
            | LineError::UnknownStation(s)
            | LineError::Protocol(s) => s.clone(),
            LineError::Unreachable { reason, .. } => reason.clone(),
        }
    }
}

/// Line counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LineStatus {
    /// Cards on the transport, waiting for QC.
    pub on_transport: usize,
    /// Cards sent to the output stacker.
    pub passed: u64,
    /// Cards sent to the reject bin.
    pub rejected: u64,
    /// Cards that fell off a full transport.
    pub dropped: u64,
}

type Injector = Box<dyn Fn(u64, &Card) -> Option<Defect> + Send + Sync>;

#[derive(Default)]
struct LineState {
    order: VecDeque<String>,
    cards: HashMap<String, Card>,
    at_station: HashMap<String, String>,
    status: LineStatus,
    deposited: u64,
}

/// The transport and QC stations of one machine.
pub struct CardLine {
    state: Mutex<LineState>,
    stations: Vec<(String, SlotHandle)>,
    injector: Mutex<Option<Injector>>,
}

impl std::fmt::Debug for CardLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.status();
        write!(
            f,
            "CardLine({} stations, {} on transport)",
            self.stations.len(),
            s.on_transport
        )
    }
}

impl CardLine {
    /// Cards the transport holds before the oldest falls off.
    pub const CAPACITY: usize = 4096;

    /// A line whose QC stations are the given readers (name, vpcd slot).
    pub fn new(stations: Vec<(String, SlotHandle)>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(LineState::default()),
            stations,
            injector: Mutex::new(None),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LineState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The QC station reader names.
    pub fn stations(&self) -> Vec<String> {
        self.stations.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Simulates faults the encoder did not notice: `f(n, card)` (n = 0-based count of cards
    /// that reached the transport) may name a defect to plant as the card lands.
    pub fn set_defect_injector(
        &self,
        f: impl Fn(u64, &Card) -> Option<Defect> + Send + Sync + 'static,
    ) {
        *self.injector.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    /// A card leaves an encoder onto the transport.
    pub fn deposit(&self, mut card: Card) {
        let serial = card.serial().to_hex();
        let mut st = self.lock();
        let n = st.deposited;
        st.deposited += 1;
        if let Some(f) = self
            .injector
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            && let Some(defect) = f(n, &card)
        {
            card.inject_defect(&defect);
        }
        if st.cards.insert(serial.clone(), card).is_none() {
            st.order.push_back(serial);
        }
        while st.cards.len() > Self::CAPACITY {
            let Some(oldest) = st.order.pop_front() else {
                break;
            };
            if st.cards.remove(&oldest).is_some() {
                st.status.dropped += 1;
                tracing::warn!(chip = %oldest, "card fell off a full QC transport");
            }
        }
    }

    /// The output callback to give an encoder slot ([`SlotHandle::set_output`]).
    pub fn output(self: &Arc<Self>) -> crate::vpcd::CardOutput {
        let line = self.clone();
        Arc::new(move |card| line.deposit(card))
    }

    fn station(&self, name: &str) -> Result<&SlotHandle, LineError> {
        self.stations
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s)
            .ok_or_else(|| LineError::UnknownStation(name.to_string()))
    }

    /// Moves the card with `chip_serial` (hex, any case) from the transport into `station`.
    pub fn load(&self, station: &str, chip_serial: &str) -> Result<(), LineError> {
        let slot = self.station(station)?;
        let serial = chip_serial.to_ascii_uppercase();
        let card = {
            let mut st = self.lock();
            if st.at_station.contains_key(station) || slot.has_card() {
                return Err(LineError::Busy(station.to_string()));
            }
            let card = st
                .cards
                .remove(&serial)
                .ok_or_else(|| LineError::NotFound(serial.clone()))?;
            st.order.retain(|s| s != &serial);
            st.at_station.insert(station.to_string(), serial);
            card
        };
        slot.insert(card);
        Ok(())
    }

    /// Takes the card out of `station`: to the output stacker when `passed`, else the reject
    /// bin. Returns its chip serial.
    pub fn unload(&self, station: &str, passed: bool) -> Result<String, LineError> {
        let slot = self.station(station)?;
        let serial = self
            .lock()
            .at_station
            .remove(station)
            .ok_or_else(|| LineError::Empty(station.to_string()))?;
        slot.eject();
        // The card leaves the machine: the stacker and the bin are outside the simulation.
        let _ = slot.take_ejected();
        let mut st = self.lock();
        if passed {
            st.status.passed += 1;
        } else {
            st.status.rejected += 1;
        }
        Ok(serial)
    }

    /// The counters.
    pub fn status(&self) -> LineStatus {
        let st = self.lock();
        LineStatus {
            on_transport: st.cards.len(),
            ..st.status
        }
    }

    /// Serves the controller protocol on `addr` (port 0 picks one) from a background thread;
    /// returns the bound address.
    pub fn serve(self: &Arc<Self>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr)?;
        let bound = listener.local_addr()?;
        let line = self.clone();
        std::thread::Builder::new()
            .name("line-controller".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    let line = line.clone();
                    let _ = std::thread::Builder::new()
                        .name("line-conn".into())
                        .spawn(move || line.session(conn));
                }
            })?;
        Ok(bound)
    }

    fn session(&self, conn: TcpStream) {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(300)));
        let Ok(write_half) = conn.try_clone() else {
            return;
        };
        let mut out = write_half;
        let mut reader = BufReader::new(conn);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let reply = self.answer(line.trim_end_matches(['\r', '\n']));
            if out.write_all(reply.as_bytes()).is_err() || out.write_all(b"\n").is_err() {
                return;
            }
        }
    }

    fn answer(&self, request: &str) -> String {
        let fields: Vec<&str> = request.split('\t').collect();
        let result = match fields.as_slice() {
            ["STATIONS"] => Ok(std::iter::once("OK".to_string())
                .chain(self.stations())
                .collect::<Vec<_>>()
                .join("\t")),
            ["STATUS"] => {
                let s = self.status();
                Ok(format!(
                    "OK\t{}\t{}\t{}\t{}",
                    s.on_transport, s.passed, s.rejected, s.dropped
                ))
            }
            ["LOAD", station, serial] => self.load(station, serial).map(|()| "OK".to_string()),
            ["UNLOAD", station, verdict @ ("pass" | "reject")] => self
                .unload(station, *verdict == "pass")
                .map(|_| "OK".to_string()),
            _ => Err(LineError::Protocol(format!(
                "unknown request {:?}",
                fields.first().copied().unwrap_or("")
            ))),
        };
        match result {
            Ok(reply) => reply,
            Err(e) => format!("ERR\t{}\t{}", e.code(), e.subject()),
        }
    }
}

/// A client of a line controller ([`CardLine::serve`]). Blocking; one connection per request,
/// so it is cheap to share and survives a controller restart.
#[derive(Debug, Clone)]
pub struct LineClient {
    addr: String,
    timeout: Duration,
}

impl LineClient {
    /// A client of the controller at `addr` (`host:port`).
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            timeout: Duration::from_secs(10),
        }
    }

    /// The controller address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn unreachable(&self, reason: impl std::fmt::Display) -> LineError {
        LineError::Unreachable {
            addr: self.addr.clone(),
            reason: reason.to_string(),
        }
    }

    fn request(&self, request: &str) -> Result<Vec<String>, LineError> {
        use std::net::ToSocketAddrs;
        let addr = self
            .addr
            .to_socket_addrs()
            .map_err(|e| self.unreachable(e))?
            .next()
            .ok_or_else(|| self.unreachable("address resolves to nothing"))?;
        let mut conn =
            TcpStream::connect_timeout(&addr, self.timeout).map_err(|e| self.unreachable(e))?;
        conn.set_read_timeout(Some(self.timeout))
            .map_err(|e| self.unreachable(e))?;
        conn.write_all(format!("{request}\n").as_bytes())
            .map_err(|e| self.unreachable(e))?;
        let mut reply = String::new();
        BufReader::new(conn)
            .read_line(&mut reply)
            .map_err(|e| self.unreachable(e))?;
        let fields: Vec<String> = reply
            .trim_end_matches(['\r', '\n'])
            .split('\t')
            .map(str::to_string)
            .collect();
        match fields.first().map(String::as_str) {
            Some("OK") => Ok(fields[1..].to_vec()),
            Some("ERR") if fields.len() >= 3 => Err(LineError::from_code(&fields[1], &fields[2])),
            _ => Err(LineError::Protocol(format!("unexpected reply {reply:?}"))),
        }
    }

    /// The QC station readers of the line.
    pub fn stations(&self) -> Result<Vec<String>, LineError> {
        self.request("STATIONS")
    }

    /// Moves the card with `chip_serial` into `station`.
    pub fn load(&self, station: &str, chip_serial: &str) -> Result<(), LineError> {
        check_field(station)?;
        check_field(chip_serial)?;
        self.request(&format!("LOAD\t{station}\t{chip_serial}"))
            .map(|_| ())
    }

    /// Takes the card out of `station` (to the stacker when `passed`, else the reject bin).
    pub fn unload(&self, station: &str, passed: bool) -> Result<(), LineError> {
        check_field(station)?;
        let verdict = if passed { "pass" } else { "reject" };
        self.request(&format!("UNLOAD\t{station}\t{verdict}"))
            .map(|_| ())
    }

    /// The line's counters.
    pub fn status(&self) -> Result<LineStatus, LineError> {
        let f = self.request("STATUS")?;
        let num = |i: usize| -> Result<u64, LineError> {
            f.get(i)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| LineError::Protocol("malformed STATUS reply".into()))
        };
        Ok(LineStatus {
            on_transport: num(0)? as usize,
            passed: num(1)?,
            rejected: num(2)?,
            dropped: num(3)?,
        })
    }
}

fn check_field(v: &str) -> Result<(), LineError> {
    if v.is_empty() || v.contains(['\t', '\n', '\r']) {
        return Err(LineError::Protocol(format!("invalid field {v:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reader::BlankStock;
    use crate::scp03::MasterKeys;
    use crate::vpcd::VpcdSlot;

    fn line_with_station() -> (Arc<CardLine>, VpcdSlot) {
        // A slot whose vpcd never listens: the card sits in it, nobody talks to it.
        let slot = VpcdSlot::start(SocketAddr::from(([127, 0, 0, 1], 9)));
        let line = CardLine::new(vec![("QC Station 01 00 00".into(), slot.handle().clone())]);
        (line, slot)
    }

    #[test]
    fn cards_travel_from_the_transport_through_a_station() {
        let (line, slot) = line_with_station();
        let stock = BlankStock::healthy(MasterKeys::test_keys(), 7);
        let (a, b) = (stock.take(), stock.take());
        let (sa, sb) = (a.serial().to_hex(), b.serial().to_hex());
        line.output()(a);
        line.deposit(b);
        assert_eq!(line.status().on_transport, 2);

        let st = "QC Station 01 00 00";
        assert_eq!(line.load(st, "00"), Err(LineError::NotFound("00".into())));
        line.load(st, &sb.to_lowercase()).unwrap();
        assert!(slot.handle().has_card());
        assert_eq!(
            slot.handle().with_card(|c| c.serial().to_hex()),
            Some(sb.clone())
        );
        assert_eq!(line.load(st, &sa), Err(LineError::Busy(st.into())));
        assert_eq!(line.unload(st, false).unwrap(), sb);
        assert!(!slot.handle().has_card());
        assert_eq!(line.unload(st, true), Err(LineError::Empty(st.into())));
        line.load(st, &sa).unwrap();
        line.unload(st, true).unwrap();
        assert_eq!(
            line.status(),
            LineStatus {
                on_transport: 0,
                passed: 1,
                rejected: 1,
                dropped: 0
            }
        );
        assert_eq!(
            line.load("nope", &sa),
            Err(LineError::UnknownStation("nope".into()))
        );
    }

    #[test]
    fn the_controller_protocol_round_trips() {
        let (line, _slot) = line_with_station();
        let stock = BlankStock::healthy(MasterKeys::test_keys(), 8);
        let card = stock.take();
        let serial = card.serial().to_hex();
        line.deposit(card);
        let addr = line.serve(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let client = LineClient::new(addr.to_string());
        let st = "QC Station 01 00 00";
        assert_eq!(client.stations().unwrap(), vec![st.to_string()]);
        assert!(matches!(
            client.load(st, "FFFF"),
            Err(LineError::NotFound(_))
        ));
        client.load(st, &serial).unwrap();
        assert!(matches!(client.load(st, &serial), Err(LineError::Busy(_))));
        client.unload(st, true).unwrap();
        assert_eq!(client.status().unwrap().passed, 1);
        assert!(matches!(
            client.load("bad\tname", &serial),
            Err(LineError::Protocol(_))
        ));
        let down = LineClient::new("127.0.0.1:9");
        assert!(matches!(
            down.stations(),
            Err(LineError::Unreachable { .. })
        ));
    }

    #[test]
    fn a_full_transport_drops_the_oldest_card() {
        let (line, _slot) = line_with_station();
        let stock = BlankStock::healthy(MasterKeys::test_keys(), 9);
        let first = stock.take();
        let first_serial = first.serial().to_hex();
        line.deposit(first);
        for _ in 0..CardLine::CAPACITY {
            line.deposit(stock.take());
        }
        let s = line.status();
        assert_eq!((s.on_transport, s.dropped), (CardLine::CAPACITY, 1));
        assert!(matches!(
            line.load("QC Station 01 00 00", &first_serial),
            Err(LineError::NotFound(_))
        ));
    }
}
