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
//! ## Station grants (several QC replicas on one line)
//!
//! QC replicas on one line never pick a station themselves: each asks the controller to
//! grant one ([`CardLine::acquire`], `ACQUIRE` on the wire). The controller hands out a free
//! station — one that is neither leased nor holding a card — to the waiters in the order they
//! asked (FIFO), blocks a waiter up to the wait it gave, and answers `timeout` when none
//! became free by then. The grant is a lease owned by the asking connection: it ends at the
//! explicit `RELEASE` (after the `UNLOAD` of the station's card, once the holder's reader
//! reports the station empty), and is reclaimed by the controller
//! when its owner vanishes — the owner's TCP connection closes (a killed QC process), or the
//! lease deadline ([`CardLine::lease_ttl`], default [`CardLine::DEFAULT_LEASE_TTL`], a few
//! times a normal inspection) passes without the owner using or renewing it (a hung one). A
//! reclaimed station's card goes back onto the transport, so the QC job that is retried finds
//! it there: a vanished QC process never leaves a station busy forever, nor spoils a card.
//!
//! ## Protocol
//!
//! UTF-8, one request line, one reply line; fields separated by TAB because reader names
//! contain spaces. A connection may carry any number of requests; leases belong to the
//! connection that acquired them.
//! - `STATIONS` → `OK\t<reader>\t<reader>...`
//! - `ACQUIRE\t<owner>\t<wait ms>` → `OK\t<station reader>\t<lease ms>`: a free station,
//!   leased to this connection (`owner` names the QC process in logs); waits up to `wait ms`
//!   (at most [`MAX_WAIT`]) behind earlier waiters, else `ERR\ttimeout\t<text>`.
//! - `LOAD\t<station reader>\t<chip serial hex>` → `OK`: moves the card from the transport
//!   into the station. The station must be leased to this connection, or — the form of
//!   callers that predate grants — leased to nobody; a station leased to another connection
//!   is `busy`; one whose lease this connection lost is `lease_lost`. Renews the lease.
//! - `UNLOAD\t<station reader>\t<pass|reject>` → `OK`: the card to the output stacker
//!   (pass) or the reject bin. A lease on the station goes on (the holder `RELEASE`s it once
//!   pcscd reports the station empty, so the next grantee never sees this card).
//! - `RENEW\t<station reader>` → `OK\t<lease ms>`: pushes the lease deadline back.
//! - `RELEASE\t<station reader>` → `OK`: ends the lease; a card still in the station goes
//!   back onto the transport (the QC process gave up without a verdict).
//! - `STATUS` → `OK\t<on transport>\t<passed>\t<rejected>\t<dropped>\t<leased>\t<waiting>\t<reclaimed>`
//!
//! Closing the connection releases every lease it holds, as `RELEASE` would.
//!
//! Error replies are `ERR\t<code>\t<text>`, codes: `not_found` (no such card on the
//! transport), `busy` (the station holds a card or is leased to another connection), `empty`
//! (nothing to unload), `unknown_station`, `timeout` (no station granted within the wait),
//! `lease_lost` (this connection's lease on the station expired or was released),
//! `bad_request`.
//!
//! The transport holds at most [`CardLine::CAPACITY`] cards; beyond that the oldest falls off
//! (counted as dropped, as a jammed or hand-removed card would be), so cards that QC never
//! asks for (their application was cancelled) cannot pile up without bound.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::card_os::{Card, Defect};
use crate::vpcd::SlotHandle;

/// The longest wait an `ACQUIRE` may ask for (longer ones are cut to it).
pub const MAX_WAIT: Duration = Duration::from_secs(120);

/// Why a line move was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// No card with that chip serial is on the transport.
    #[error("no card with chip serial {0} on the transport")]
    NotFound(String),
    /// The station already holds a card, or is leased to another QC process.
    #[error("QC station {0} is busy")]
    Busy(String),
    /// The station holds no card.
    #[error("QC station {0} holds no card")]
    Empty(String),
    /// No such station.
    #[error("no QC station named {0:?}")]
    UnknownStation(String),
    /// No station was granted within the wait (the text says how long and how busy).
    #[error("{0}")]
    Timeout(String),
    /// The caller's lease on the station expired or was released; any card it held went
    /// back onto the transport.
    #[error(
        "the lease on QC station {0} expired or was released (its card, if any, went back onto the transport)"
    )]
    LeaseLost(String),
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
            LineError::Timeout(_) => "timeout",
            LineError::LeaseLost(_) => "lease_lost",
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
            "timeout" => LineError::Timeout(subject),
            "lease_lost" => LineError::LeaseLost(subject),
            _ => LineError::Protocol(subject),
        }
    }

    fn subject(&self) -> String {
        match self {
            LineError::NotFound(s)
            | LineError::Busy(s)
            | LineError::Empty(s)
            | LineError::UnknownStation(s)
            | LineError::Timeout(s)
            | LineError::LeaseLost(s)
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
    /// Stations leased right now.
    pub leased: usize,
    /// Callers waiting for a station grant right now.
    pub waiting: usize,
    /// Leases the controller took back from an owner that vanished (connection closed or
    /// deadline passed).
    pub reclaimed: u64,
}

/// A station granted to a [`LineSession`] (the wire form of [`Grant`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StationGrant {
    /// The station's reader name.
    pub station: String,
    /// How long the lease lasts without being used or renewed.
    pub ttl: Duration,
    /// See [`Grant::settled`].
    pub settled: bool,
}

/// A station granted by [`CardLine::acquire`], leased to the caller until
/// [`CardLine::release`] (or until it expires).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The station's reader name.
    pub station: String,
    /// The lease's id (what [`CardLine::load_leased`] and friends are given).
    pub lease: u64,
    /// How long the lease lasts without being used or renewed.
    pub ttl: Duration,
    /// False when the controller itself last took a card out of the station (a lease
    /// reclaimed or released with its card inside): pcscd may still see that card there, so
    /// the grantee waits until its reader reports the station empty before the `LOAD`.
    pub settled: bool,
}

type Injector = Box<dyn Fn(u64, &Card) -> Option<Defect> + Send + Sync>;

#[derive(Debug)]
struct Lease {
    id: u64,
    owner: String,
    expires: Instant,
}

#[derive(Default)]
struct LineState {
    order: VecDeque<String>,
    cards: HashMap<String, Card>,
    at_station: HashMap<String, String>,
    leases: HashMap<String, Lease>,
    waiters: VecDeque<u64>,
    /// Per station, the sequence number of its last grant.
    granted_at: HashMap<String, u64>,
    /// Stations the controller itself emptied (see [`Grant::settled`]), until their next LOAD.
    unsettled: std::collections::HashSet<String>,
    next_id: u64,
    status: LineStatus,
    deposited: u64,
}

/// The transport and QC stations of one machine.
pub struct CardLine {
    state: Mutex<LineState>,
    /// Signalled whenever a station may have become free (or the head of the waiters left).
    changed: Condvar,
    stations: Vec<(String, SlotHandle)>,
    injector: Mutex<Option<Injector>>,
    lease_ttl: Mutex<Duration>,
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

/// Who asks for a line move: a caller that predates grants (no lease), or the holder of a
/// lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    Unleased,
    Lease(u64),
}

impl CardLine {
    /// Cards the transport holds before the oldest falls off.
    pub const CAPACITY: usize = 4096;

    /// How long a station lease lasts without its owner using or renewing it: a few times a
    /// normal inspection at a pcscd station (about a second), so a hung QC process frees the
    /// station soon, while a live one (which renews while it reads) never loses it.
    pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(15);

    /// A line whose QC stations are the given readers (name, vpcd slot).
    pub fn new(stations: Vec<(String, SlotHandle)>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(LineState::default()),
            changed: Condvar::new(),
            stations,
            injector: Mutex::new(None),
            lease_ttl: Mutex::new(Self::DEFAULT_LEASE_TTL),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LineState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The QC station reader names.
    pub fn stations(&self) -> Vec<String> {
        self.stations.iter().map(|(n, _)| n.clone()).collect()
    }

    /// How long a station lease lasts without being used or renewed.
    pub fn lease_ttl(&self) -> Duration {
        *self.lease_ttl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the lease time of grants made from now on (not zero).
    pub fn set_lease_ttl(&self, ttl: Duration) {
        *self.lease_ttl.lock().unwrap_or_else(|e| e.into_inner()) =
            ttl.max(Duration::from_millis(1));
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
        Self::put_on_transport(&mut st, serial, card);
    }

    fn put_on_transport(st: &mut LineState, serial: String, card: Card) {
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

    /// Takes the card out of `station`'s reader back onto the transport (lock held).
    fn return_to_transport(&self, st: &mut LineState, station: &str) {
        let Some(serial) = st.at_station.remove(station) else {
            return;
        };
        if let Ok(slot) = self.station(station) {
            slot.eject();
            st.unsettled.insert(station.to_string());
            if let Some(card) = slot.take_ejected() {
                Self::put_on_transport(st, serial.clone(), card);
                tracing::info!(%station, chip = %serial, "card taken back onto the transport");
            }
        }
    }

    /// Takes back leases whose deadline passed (lock held).
    fn reclaim_expired(&self, st: &mut LineState) {
        let now = Instant::now();
        let expired: Vec<String> = st
            .leases
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(s, _)| s.clone())
            .collect();
        for station in expired {
            if let Some(lease) = st.leases.remove(&station) {
                tracing::warn!(%station, owner = %lease.owner, "QC station lease expired (its owner neither used nor renewed it): station taken back");
                st.status.reclaimed += 1;
                self.return_to_transport(st, &station);
                self.changed.notify_all();
            }
        }
    }

    /// Checks that `holder` may act on `station` and refreshes its lease (lock held).
    fn check_holder(
        &self,
        st: &mut LineState,
        station: &str,
        holder: Holder,
    ) -> Result<(), LineError> {
        self.reclaim_expired(st);
        let ttl = self.lease_ttl();
        match (st.leases.get_mut(station), holder) {
            (Some(l), Holder::Lease(id)) if l.id == id => {
                l.expires = Instant::now() + ttl;
                Ok(())
            }
            (_, Holder::Lease(_)) => Err(LineError::LeaseLost(station.to_string())),
            (Some(_), Holder::Unleased) => Err(LineError::Busy(station.to_string())),
            (None, Holder::Unleased) => Ok(()),
        }
    }

    /// A free station: a settled one first (no wait for pcscd), then the one granted
    /// longest ago, so the stations wear evenly.
    fn free_station(&self, st: &LineState) -> Option<&str> {
        self.stations
            .iter()
            .filter(|(n, slot)| {
                !st.leases.contains_key(n) && !st.at_station.contains_key(n) && !slot.has_card()
            })
            .min_by_key(|(n, _)| {
                (
                    st.unsettled.contains(n),
                    st.granted_at.get(n).copied().unwrap_or(0),
                )
            })
            .map(|(n, _)| n.as_str())
    }

    /// Grants a free station to `owner` (a name for logs), waiting up to `wait` (at most
    /// [`MAX_WAIT`]) behind earlier callers; [`LineError::Timeout`] when none became free.
    /// The lease lasts [`Self::lease_ttl`] past its last use; end it with [`Self::release`].
    pub fn acquire(&self, owner: &str, wait: Duration) -> Result<Grant, LineError> {
        let wait = wait.min(MAX_WAIT);
        let deadline = Instant::now() + wait;
        let mut st = self.lock();
        let ticket = st.next_id;
        st.next_id += 1;
        st.waiters.push_back(ticket);
        let ahead = st.waiters.len() - 1;
        loop {
            self.reclaim_expired(&mut st);
            if st.waiters.front() == Some(&ticket)
                && let Some(station) = self.free_station(&st).map(str::to_string)
            {
                st.waiters.pop_front();
                let id = st.next_id;
                st.next_id += 1;
                st.granted_at.insert(station.clone(), id);
                let ttl = self.lease_ttl();
                st.leases.insert(
                    station.clone(),
                    Lease {
                        id,
                        owner: owner.to_string(),
                        expires: Instant::now() + ttl,
                    },
                );
                // The next waiter may find another free station.
                self.changed.notify_all();
                let settled = !st.unsettled.contains(&station);
                return Ok(Grant {
                    station,
                    lease: id,
                    ttl,
                    settled,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                st.waiters.retain(|t| *t != ticket);
                self.changed.notify_all();
                return Err(LineError::Timeout(format!(
                    "no QC station became free within {} ms: all {} stations busy ({} callers were waiting ahead)",
                    wait.as_millis(),
                    self.stations.len(),
                    ahead
                )));
            }
            // Wake at the deadline, or when the next lease may expire.
            let until = st
                .leases
                .values()
                .map(|l| l.expires)
                .min()
                .map_or(deadline, |e| e.min(deadline));
            st = self
                .changed
                .wait_timeout(st, until.saturating_duration_since(now))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Pushes the deadline of lease `lease` on `station` back; returns the lease time.
    pub fn renew(&self, station: &str, lease: u64) -> Result<Duration, LineError> {
        self.station(station)?;
        let mut st = self.lock();
        self.check_holder(&mut st, station, Holder::Lease(lease))?;
        Ok(self.lease_ttl())
    }

    /// Ends lease `lease` on `station`; a card still in it goes back onto the transport.
    pub fn release(&self, station: &str, lease: u64) -> Result<(), LineError> {
        self.station(station)?;
        let mut st = self.lock();
        self.check_holder(&mut st, station, Holder::Lease(lease))?;
        st.leases.remove(station);
        self.return_to_transport(&mut st, station);
        self.changed.notify_all();
        Ok(())
    }

    /// A connection that held leases closed (its owner vanished): their stations are taken
    /// back, all at once.
    fn reclaim(&self, held: HashMap<String, u64>) {
        if held.is_empty() {
            return;
        }
        let mut st = self.lock();
        for (station, lease) in held {
            if st.leases.get(&station).is_some_and(|l| l.id == lease) {
                let owner = st
                    .leases
                    .remove(&station)
                    .map(|l| l.owner)
                    .unwrap_or_default();
                tracing::warn!(%station, %owner, "QC station lease owner's connection closed: station taken back");
                st.status.reclaimed += 1;
                self.return_to_transport(&mut st, &station);
            }
        }
        self.changed.notify_all();
    }

    /// Moves the card with `chip_serial` (hex, any case) from the transport into `station`,
    /// which must be leased to nobody (callers that predate grants; see
    /// [`Self::load_leased`]).
    pub fn load(&self, station: &str, chip_serial: &str) -> Result<(), LineError> {
        self.load_as(station, chip_serial, Holder::Unleased)
    }

    /// Moves the card with `chip_serial` into `station`, held under lease `lease`.
    pub fn load_leased(
        &self,
        station: &str,
        chip_serial: &str,
        lease: u64,
    ) -> Result<(), LineError> {
        self.load_as(station, chip_serial, Holder::Lease(lease))
    }

    fn load_as(&self, station: &str, chip_serial: &str, holder: Holder) -> Result<(), LineError> {
        let slot = self.station(station)?;
        let serial = chip_serial.to_ascii_uppercase();
        let mut st = self.lock();
        self.check_holder(&mut st, station, holder)?;
        if st.at_station.contains_key(station) || slot.has_card() {
            return Err(LineError::Busy(station.to_string()));
        }
        let card = st
            .cards
            .remove(&serial)
            .ok_or_else(|| LineError::NotFound(serial.clone()))?;
        st.order.retain(|s| s != &serial);
        st.unsettled.remove(station);
        st.at_station.insert(station.to_string(), serial);
        // Under the line lock, so a reclaim cannot run between the two.
        slot.insert(card);
        Ok(())
    }

    /// Takes the card out of `station` (leased to nobody): to the output stacker when
    /// `passed`, else the reject bin. Returns its chip serial.
    pub fn unload(&self, station: &str, passed: bool) -> Result<String, LineError> {
        self.unload_as(station, passed, Holder::Unleased)
    }

    /// Takes the card out of `station`, held under lease `lease`. The lease goes on until
    /// [`Self::release`] (or its deadline): the holder first waits until pcscd reports the
    /// station empty, so the card loaded next is never taken for this one.
    pub fn unload_leased(
        &self,
        station: &str,
        passed: bool,
        lease: u64,
    ) -> Result<String, LineError> {
        self.unload_as(station, passed, Holder::Lease(lease))
    }

    fn unload_as(&self, station: &str, passed: bool, holder: Holder) -> Result<String, LineError> {
        let slot = self.station(station)?;
        let mut st = self.lock();
        self.check_holder(&mut st, station, holder)?;
        let serial = st
            .at_station
            .remove(station)
            .ok_or_else(|| LineError::Empty(station.to_string()))?;
        slot.eject();
        // The card leaves the machine: the stacker and the bin are outside the simulation.
        let _ = slot.take_ejected();
        if passed {
            st.status.passed += 1;
        } else {
            st.status.rejected += 1;
        }
        // A leased station stays leased: its holder releases it once its own reader reports
        // the station empty, so the next grantee never has to wait for pcscd to notice.
        self.changed.notify_all();
        Ok(serial)
    }

    /// The counters.
    pub fn status(&self) -> LineStatus {
        let mut st = self.lock();
        self.reclaim_expired(&mut st);
        LineStatus {
            on_transport: st.cards.len(),
            leased: st.leases.len(),
            waiting: st.waiters.len(),
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
        // The leases this connection holds, by station; taken back when it ends.
        let mut held: HashMap<String, u64> = HashMap::new();
        let _ = conn.set_read_timeout(Some(Duration::from_secs(300)));
        if let Ok(write_half) = conn.try_clone() {
            let mut out = write_half;
            let mut reader = BufReader::new(conn);
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let reply = self.answer(line.trim_end_matches(['\r', '\n']), &mut held);
                if out.write_all(reply.as_bytes()).is_err() || out.write_all(b"\n").is_err() {
                    break;
                }
            }
        }
        self.reclaim(held);
    }

    fn answer(&self, request: &str, held: &mut HashMap<String, u64>) -> String {
        let fields: Vec<&str> = request.split('\t').collect();
        let holder = |held: &HashMap<String, u64>, station: &str| match held.get(station) {
            Some(id) => Holder::Lease(*id),
            None => Holder::Unleased,
        };
        let result = match fields.as_slice() {
            ["STATIONS"] => Ok(std::iter::once("OK".to_string())
                .chain(self.stations())
                .collect::<Vec<_>>()
                .join("\t")),
            ["STATUS"] => {
                let s = self.status();
                Ok(format!(
                    "OK\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    s.on_transport,
                    s.passed,
                    s.rejected,
                    s.dropped,
                    s.leased,
                    s.waiting,
                    s.reclaimed
                ))
            }
            ["ACQUIRE", owner, wait_ms] if !owner.is_empty() => match wait_ms.parse::<u64>() {
                Ok(ms) => self.acquire(owner, Duration::from_millis(ms)).map(|g| {
                    held.insert(g.station.clone(), g.lease);
                    let settled = if g.settled { "settled" } else { "unsettled" };
                    format!("OK\t{}\t{}\t{settled}", g.station, g.ttl.as_millis())
                }),
                Err(_) => Err(LineError::Protocol(format!("bad wait {wait_ms:?}"))),
            },
            ["LOAD", station, serial] => self
                .load_as(station, serial, holder(held, station))
                .map(|()| "OK".to_string()),
            ["UNLOAD", station, verdict @ ("pass" | "reject")] => {
                let r = self.unload_as(station, *verdict == "pass", holder(held, station));
                if matches!(r, Err(LineError::LeaseLost(_))) {
                    held.remove(*station);
                }
                r.map(|_| "OK".to_string())
            }
            ["RENEW", station] => match held.get(*station) {
                Some(id) => self
                    .renew(station, *id)
                    .map(|ttl| format!("OK\t{}", ttl.as_millis()))
                    .inspect_err(|_| {
                        held.remove(*station);
                    }),
                None => Err(LineError::LeaseLost(station.to_string())),
            },
            ["RELEASE", station] => match held.remove(*station) {
                Some(id) => self.release(station, id).map(|()| "OK".to_string()),
                None => Err(LineError::LeaseLost(station.to_string())),
            },
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

fn read_reply(
    reader: &mut impl BufRead,
    unreachable: impl Fn(String) -> LineError,
) -> Result<Vec<String>, LineError> {
    let mut reply = String::new();
    match reader.read_line(&mut reply) {
        Ok(0) => return Err(unreachable("connection closed".into())),
        Ok(_) => {}
        Err(e) => return Err(unreachable(e.to_string())),
    }
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

/// A client of a line controller ([`CardLine::serve`]). Blocking; one connection per request,
/// so it is cheap to share and survives a controller restart. Station grants need a
/// connection that lives as long as the lease: [`Self::session`].
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

    fn connect(&self) -> Result<TcpStream, LineError> {
        use std::net::ToSocketAddrs;
        let addr = self
            .addr
            .to_socket_addrs()
            .map_err(|e| self.unreachable(e))?
            .next()
            .ok_or_else(|| self.unreachable("address resolves to nothing"))?;
        let conn =
            TcpStream::connect_timeout(&addr, self.timeout).map_err(|e| self.unreachable(e))?;
        conn.set_read_timeout(Some(self.timeout))
            .map_err(|e| self.unreachable(e))?;
        let _ = conn.set_nodelay(true);
        Ok(conn)
    }

    fn request(&self, request: &str) -> Result<Vec<String>, LineError> {
        let mut conn = self.connect()?;
        conn.write_all(format!("{request}\n").as_bytes())
            .map_err(|e| self.unreachable(e))?;
        read_reply(&mut BufReader::new(conn), |r| self.unreachable(r))
    }

    /// A connection for station grants: the leases it acquires end when it is dropped.
    pub fn session(&self) -> Result<LineSession, LineError> {
        let conn = self.connect()?;
        let write = conn.try_clone().map_err(|e| self.unreachable(e))?;
        Ok(LineSession {
            client: self.clone(),
            write,
            read: BufReader::new(conn),
        })
    }

    /// The QC station readers of the line.
    pub fn stations(&self) -> Result<Vec<String>, LineError> {
        self.request("STATIONS")
    }

    /// Moves the card with `chip_serial` into `station` (one leased to nobody).
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
            leased: num(4)? as usize,
            waiting: num(5)? as usize,
            reclaimed: num(6)?,
        })
    }
}

/// One connection to a line controller, holding the station leases it acquires; dropping it
/// (or the process dying) closes the connection, and the controller takes those stations
/// back.
#[derive(Debug)]
pub struct LineSession {
    client: LineClient,
    write: TcpStream,
    read: BufReader<TcpStream>,
}

impl LineSession {
    fn request(&mut self, request: &str, wait: Duration) -> Result<Vec<String>, LineError> {
        let client = &self.client;
        self.read
            .get_ref()
            .set_read_timeout(Some(client.timeout + wait))
            .map_err(|e| client.unreachable(e))?;
        self.write
            .write_all(format!("{request}\n").as_bytes())
            .map_err(|e| client.unreachable(e))?;
        read_reply(&mut self.read, |r| client.unreachable(r))
    }

    /// Asks for a station for `owner` (a name for the controller's logs), waiting up to
    /// `wait` behind earlier callers.
    pub fn acquire(&mut self, owner: &str, wait: Duration) -> Result<StationGrant, LineError> {
        check_field(owner)?;
        let wait = wait.min(MAX_WAIT);
        let f = self.request(&format!("ACQUIRE\t{owner}\t{}", wait.as_millis()), wait)?;
        let (station, ttl, settled) = match f.as_slice() {
            [station, ttl] => (station, ttl, true),
            [station, ttl, settled] if settled == "settled" || settled == "unsettled" => {
                (station, ttl, settled == "settled")
            }
            _ => return Err(LineError::Protocol("malformed ACQUIRE reply".into())),
        };
        let ttl = ttl
            .parse()
            .map_err(|_| LineError::Protocol(format!("malformed ACQUIRE reply: lease {ttl:?}")))?;
        Ok(StationGrant {
            station: station.clone(),
            ttl: Duration::from_millis(ttl),
            settled,
        })
    }

    /// Moves the card with `chip_serial` into `station` (leased to this session).
    pub fn load(&mut self, station: &str, chip_serial: &str) -> Result<(), LineError> {
        check_field(station)?;
        check_field(chip_serial)?;
        self.request(&format!("LOAD\t{station}\t{chip_serial}"), Duration::ZERO)
            .map(|_| ())
    }

    /// Takes the card out of `station` (stacker when `passed`, else reject bin); the lease
    /// goes on until [`Self::release`].
    pub fn unload(&mut self, station: &str, passed: bool) -> Result<(), LineError> {
        check_field(station)?;
        let verdict = if passed { "pass" } else { "reject" };
        self.request(&format!("UNLOAD\t{station}\t{verdict}"), Duration::ZERO)
            .map(|_| ())
    }

    /// Pushes the lease deadline on `station` back.
    pub fn renew(&mut self, station: &str) -> Result<(), LineError> {
        check_field(station)?;
        self.request(&format!("RENEW\t{station}"), Duration::ZERO)
            .map(|_| ())
    }

    /// Ends the lease on `station` (a card still in it goes back onto the transport).
    pub fn release(&mut self, station: &str) -> Result<(), LineError> {
        check_field(station)?;
        self.request(&format!("RELEASE\t{station}"), Duration::ZERO)
            .map(|_| ())
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
                ..LineStatus::default()
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

    fn line_with_stations(n: usize) -> (Arc<CardLine>, Vec<VpcdSlot>) {
        let slots: Vec<VpcdSlot> = (0..n)
            .map(|_| VpcdSlot::start(SocketAddr::from(([127, 0, 0, 1], 9))))
            .collect();
        let line = CardLine::new(
            slots
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("QC Station 01 00 {i:02}"), s.handle().clone()))
                .collect(),
        );
        (line, slots)
    }

    /// Waits (bounded) until `n` callers queue for a station.
    fn until_waiting(line: &CardLine, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while line.status().waiting < n {
            assert!(Instant::now() < deadline, "{n} waiters never queued");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn stations_are_granted_to_waiters_in_order() {
        let (line, _slots) = line_with_stations(1);
        let stock = BlankStock::healthy(MasterKeys::test_keys(), 11);
        let card = stock.take();
        let chip = card.serial().to_hex();
        line.deposit(card);
        let a = line.acquire("qc-a", Duration::ZERO).unwrap();
        assert_eq!(a.station, "QC Station 01 00 00");
        // The station is leased: neither a second grant nor a caller without a lease gets it.
        assert!(matches!(
            line.acquire("qc-x", Duration::from_millis(10)),
            Err(LineError::Timeout(t)) if t.contains("busy")
        ));
        assert_eq!(
            line.load(&a.station, &chip),
            Err(LineError::Busy(a.station.clone()))
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let mut waiters = Vec::new();
        for (i, name) in ["qc-b", "qc-c"].into_iter().enumerate() {
            let (shared, tx) = (line.clone(), tx.clone());
            waiters.push(std::thread::spawn(move || {
                let g = shared.acquire(name, Duration::from_secs(60)).unwrap();
                tx.send((name, g.clone())).unwrap();
                g
            }));
            until_waiting(&line, i + 1);
        }
        line.load_leased(&a.station, &chip, a.lease).unwrap();
        // Releasing with the card still in: it goes back onto the transport.
        line.release(&a.station, a.lease).unwrap();
        assert_eq!(line.status().on_transport, 1);
        let (first, b) = rx.recv().unwrap();
        assert_eq!(first, "qc-b", "the first waiter gets the station");
        assert!(
            !b.settled,
            "the controller emptied it: the grantee must let pcscd see that"
        );
        assert!(rx.try_recv().is_err(), "the second still waits");
        assert_eq!(
            line.load_leased(&b.station, &chip, a.lease),
            Err(LineError::LeaseLost(b.station.clone())),
            "a released lease is gone"
        );
        line.load_leased(&b.station, &chip, b.lease).unwrap();
        assert_eq!(line.unload_leased(&b.station, true, b.lease).unwrap(), chip);
        assert!(rx.try_recv().is_err(), "an unloaded station stays leased");
        line.release(&b.station, b.lease).unwrap();
        let (second, c) = rx.recv().unwrap();
        assert_eq!(second, "qc-c");
        line.release(&c.station, c.lease).unwrap();
        for w in waiters {
            w.join().unwrap();
        }
        let s = line.status();
        assert_eq!((s.passed, s.leased, s.waiting, s.reclaimed), (1, 0, 0, 0));
    }

    #[test]
    fn an_unrenewed_lease_expires_and_its_card_returns_to_the_transport() {
        let (line, slots) = line_with_stations(1);
        line.set_lease_ttl(Duration::from_millis(300));
        let stock = BlankStock::healthy(MasterKeys::test_keys(), 12);
        let card = stock.take();
        let chip = card.serial().to_hex();
        line.deposit(card);
        let hung = line.acquire("qc-hung", Duration::ZERO).unwrap();
        line.load_leased(&hung.station, &chip, hung.lease).unwrap();
        line.renew(&hung.station, hung.lease).unwrap();
        assert_eq!(line.status().on_transport, 0);
        // The owner never comes back: the next caller gets the station once the lease ran out.
        let next = line.acquire("qc-next", Duration::from_secs(60)).unwrap();
        assert_eq!(next.station, hung.station);
        assert!(!slots[0].handle().has_card());
        let s = line.status();
        assert_eq!((s.on_transport, s.reclaimed, s.rejected), (1, 1, 0));
        assert_eq!(
            line.unload_leased(&hung.station, true, hung.lease),
            Err(LineError::LeaseLost(hung.station.clone()))
        );
        line.load_leased(&next.station, &chip, next.lease).unwrap();
        line.unload_leased(&next.station, true, next.lease).unwrap();
        line.release(&next.station, next.lease).unwrap();
        let s = line.status();
        assert_eq!((s.passed, s.leased), (1, 0));
    }

    #[test]
    fn a_closed_connection_gives_its_stations_back() {
        let (line, _slots) = line_with_stations(2);
        let stock = BlankStock::healthy(MasterKeys::test_keys(), 13);
        let card = stock.take();
        let chip = card.serial().to_hex();
        line.deposit(card);
        let addr = line.serve(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let client = LineClient::new(addr.to_string());
        let mut gone = client.session().unwrap();
        let first = gone.acquire("qc-gone", Duration::ZERO).unwrap();
        let (s1, ttl) = (first.station, first.ttl);
        assert!(first.settled, "a station never used is settled");
        assert_eq!(ttl, CardLine::DEFAULT_LEASE_TTL);
        let s2 = gone.acquire("qc-gone", Duration::ZERO).unwrap().station;
        assert_ne!(s1, s2);
        gone.load(&s1, &chip).unwrap();
        gone.renew(&s1).unwrap();
        // Another connection can neither use nor unload those stations.
        let mut other = client.session().unwrap();
        assert!(matches!(other.load(&s2, &chip), Err(LineError::Busy(_))));
        assert!(matches!(client.unload(&s1, true), Err(LineError::Busy(_))));
        assert!(matches!(other.release(&s1), Err(LineError::LeaseLost(_))));
        let s = client.status().unwrap();
        assert_eq!((s.on_transport, s.leased), (0, 2));
        drop(gone);
        let grant = other.acquire("qc-other", Duration::from_secs(60)).unwrap();
        let granted = grant.station;
        // The station that held the gone connection's card was emptied by the controller
        // (pcscd may still see that card): the one that never held a card goes first.
        assert_eq!((granted.as_str(), grant.settled), (s2.as_str(), true));
        assert!(granted == s1 || granted == s2);
        other.load(&granted, &chip).unwrap();
        other.unload(&granted, true).unwrap();
        // Unloaded, the station stays leased until released.
        other.renew(&granted).unwrap();
        other.release(&granted).unwrap();
        assert!(matches!(
            other.renew(&granted),
            Err(LineError::LeaseLost(_))
        ));
        let s = client.status().unwrap();
        assert_eq!((s.passed, s.leased, s.reclaimed), (1, 0, 2));
        assert!(matches!(
            other.acquire("bad\towner", Duration::ZERO),
            Err(LineError::Protocol(_))
        ));
    }
}
