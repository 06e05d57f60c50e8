//! Card encoders: a channel to the chip in the encoder ([`CardChannel`]) plus the card feed
//! ([`Encoder::insert`] / [`Encoder::eject`]).
//!
//! Two implementations share the trait so the personalization stage never knows which one it
//! drives:
//! - [`InProcessEncoder`]: the card OS in the same process (embedded mode, benchmarks). Its
//!   feed takes blanks from a [`BlankStock`].
//! - [`PcscEncoder`]: a PC/SC reader through pcscd (pcsc-lite loaded at run time by
//!   [`crate::pcsc`]), real hardware or a vpcd virtual reader. Its feed is a [`CardFeed`] (a
//!   hardware hopper, or the simulator's slot).
//!
//! PC/SC conditions that mean "this blank is gone" or "there is no blank" come out as typed
//! [`ReaderError`] variants, so the caller can tell a spoiled card from a broken reader.

use std::ffi::CString;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::apdu::{Command, Response};
use crate::card_os::{Card, CardFault, FaultPlan, Faults};
use crate::cplc::ChipSerial;
use crate::pcsc;
use crate::scp03::MasterKeys;

/// What went wrong talking to an encoder.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReaderError {
    /// The card was pulled or lost contact in the middle of an exchange.
    #[error("card removed from {0}")]
    RemovedCard(String),
    /// There is no card in the reader.
    #[error("no card in {0}")]
    NoSmartcard(String),
    /// A card is present but does not answer (no ATR, or no response).
    #[error("card in {0} does not respond")]
    Unresponsive(String),
    /// The reader disappeared or is unknown to the resource manager.
    #[error("reader {0} unavailable")]
    ReaderUnavailable(String),
    /// The PC/SC resource manager (pcscd) is not running or not reachable.
    #[error("PC/SC service unavailable: {0}")]
    NoService(String),
    /// The PC/SC client library (pcsc-lite) is not installed; the message says what to
    /// install.
    #[error("PC/SC unavailable: {0}")]
    NoLibrary(String),
    /// The card feed could not deliver or take a card.
    #[error("card feed of {reader} failed: {reason}")]
    Feed {
        /// Reader name.
        reader: String,
        /// What the feed reported.
        reason: String,
    },
    /// The response was shorter than a status word.
    #[error("malformed response from {0}")]
    Malformed(String),
    /// Any other PC/SC error.
    #[error("PC/SC error on {reader}: {error}")]
    Pcsc {
        /// Reader name.
        reader: String,
        /// The PC/SC error.
        error: pcsc::Error,
    },
}

impl ReaderError {
    /// Whether the error condemns the card in the reader (spoiled blank) rather than the
    /// reader itself.
    pub fn is_card_fault(&self) -> bool {
        matches!(
            self,
            ReaderError::RemovedCard(_) | ReaderError::Unresponsive(_) | ReaderError::Malformed(_)
        )
    }

    fn from_pcsc(reader: &str, error: pcsc::Error) -> Self {
        let r = reader.to_string();
        match error {
            pcsc::Error::RemovedCard | pcsc::Error::ResetCard => ReaderError::RemovedCard(r),
            pcsc::Error::NoSmartcard => ReaderError::NoSmartcard(r),
            pcsc::Error::UnresponsiveCard
            | pcsc::Error::UnpoweredCard
            | pcsc::Error::UnsupportedCard => ReaderError::Unresponsive(r),
            pcsc::Error::UnknownReader | pcsc::Error::ReaderUnavailable => {
                ReaderError::ReaderUnavailable(r)
            }
            pcsc::Error::NoService
            | pcsc::Error::ServiceStopped
            | pcsc::Error::NoReadersAvailable => ReaderError::NoService(error.to_string()),
            pcsc::Error::Library(msg) => ReaderError::NoLibrary(msg),
            error => ReaderError::Pcsc { reader: r, error },
        }
    }
}

/// A channel to the card currently in a reader.
pub trait CardChannel: Send {
    /// The reader's name (PC/SC reader name, or the in-process encoder's name).
    fn reader_name(&self) -> &str;

    /// Sends a raw command APDU and returns the raw response APDU (data ‖ SW1 SW2).
    fn transmit(&mut self, apdu: &[u8]) -> Result<Vec<u8>, ReaderError>;

    /// Sends a command and parses the response.
    fn send(&mut self, cmd: &Command) -> Result<Response, ReaderError> {
        let raw = self.transmit(&cmd.to_bytes())?;
        Response::parse(&raw).map_err(|_| ReaderError::Malformed(self.reader_name().to_string()))
    }
}

/// A card encoder: a channel plus a card feed, one card per job.
pub trait Encoder: CardChannel {
    /// Feeds a blank card and connects to it (power-on, ATR).
    fn insert(&mut self) -> Result<(), ReaderError>;
    /// Disconnects and ejects the card in the encoder.
    fn eject(&mut self) -> Result<(), ReaderError>;
    /// Hands over the card last ejected, when the encoder holds it in process (in-process
    /// encoders); a PC/SC encoder's card leaves physically (`None`).
    fn take_ejected(&mut self) -> Option<Card> {
        None
    }
}

/// Where in-process encoders take their blanks from: serial numbering, the SCP03 master keys
/// and the fault plan. Shared by every encoder of a farm.
pub struct BlankStock {
    master: MasterKeys,
    batch: u16,
    next: AtomicU32,
    faults: Box<dyn Fn(u32) -> Faults + Send + Sync>,
}

impl std::fmt::Debug for BlankStock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BlankStock(batch {}, next {})",
            self.batch,
            self.next.load(Ordering::Relaxed)
        )
    }
}

impl BlankStock {
    /// Blanks of one batch; `faults(n)` decides the knobs of the n-th blank (0-based).
    pub fn new(
        master: MasterKeys,
        batch: u16,
        faults: impl Fn(u32) -> Faults + Send + Sync + 'static,
    ) -> Self {
        Self {
            master,
            batch,
            next: AtomicU32::new(0),
            faults: Box::new(faults),
        }
    }

    /// Blanks following a [`FaultPlan`].
    pub fn with_plan(master: MasterKeys, batch: u16, plan: FaultPlan) -> Self {
        Self::new(master, batch, move |n| plan.faults_for(n))
    }

    /// Fault-free blanks.
    pub fn healthy(master: MasterKeys, batch: u16) -> Self {
        Self::new(master, batch, |_| Faults::none())
    }

    /// Takes the next blank from the stock.
    pub fn take(&self) -> Card {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Card::blank(
            ChipSerial::simulated(self.batch, n + 1),
            &self.master,
            (self.faults)(n),
        )
    }

    /// Blanks handed out so far.
    pub fn taken(&self) -> u32 {
        self.next.load(Ordering::Relaxed)
    }
}

/// An encoder driving the card OS in process.
#[derive(Debug)]
pub struct InProcessEncoder {
    name: String,
    stock: Arc<BlankStock>,
    card: Option<Card>,
    last_ejected: Option<Card>,
}

impl InProcessEncoder {
    /// An empty encoder fed from `stock`.
    pub fn new(name: impl Into<String>, stock: Arc<BlankStock>) -> Self {
        Self {
            name: name.into(),
            stock,
            card: None,
            last_ejected: None,
        }
    }

    /// The card in the encoder, if any.
    pub fn card(&self) -> Option<&Card> {
        self.card.as_ref()
    }

    /// The card in the encoder, mutably (tests drive the card OS directly).
    pub fn card_mut(&mut self) -> Option<&mut Card> {
        self.card.as_mut()
    }

    /// The card most recently ejected (or pulled by tearing), for inspection.
    pub fn last_ejected(&self) -> Option<&Card> {
        self.last_ejected.as_ref()
    }

    /// Puts a specific card in the encoder (tests, re-inserting a card).
    pub fn insert_card(&mut self, mut card: Card) -> Result<(), ReaderError> {
        let atr = card.power_on();
        self.card = Some(card);
        match atr {
            Some(_) => Ok(()),
            None => Err(ReaderError::Unresponsive(self.name.clone())),
        }
    }
}

impl CardChannel for InProcessEncoder {
    fn reader_name(&self) -> &str {
        &self.name
    }

    fn transmit(&mut self, apdu: &[u8]) -> Result<Vec<u8>, ReaderError> {
        let Some(card) = self.card.as_mut() else {
            return Err(ReaderError::NoSmartcard(self.name.clone()));
        };
        match card.transmit(apdu) {
            Ok(r) => Ok(r),
            Err(CardFault::Removed) => {
                self.last_ejected = self.card.take();
                Err(ReaderError::RemovedCard(self.name.clone()))
            }
            Err(CardFault::Dead | CardFault::Unpowered) => {
                Err(ReaderError::Unresponsive(self.name.clone()))
            }
        }
    }
}

impl Encoder for InProcessEncoder {
    fn insert(&mut self) -> Result<(), ReaderError> {
        if let Some(old) = self.card.take() {
            self.last_ejected = Some(old);
        }
        let card = self.stock.take();
        self.insert_card(card)
    }

    fn eject(&mut self) -> Result<(), ReaderError> {
        if let Some(mut card) = self.card.take() {
            card.power_off();
            self.last_ejected = Some(card);
        }
        Ok(())
    }

    fn take_ejected(&mut self) -> Option<Card> {
        self.last_ejected.take()
    }
}

/// The mechanical card feed of a PC/SC encoder.
pub trait CardFeed: Send {
    /// Moves a blank card into the reader.
    fn insert_blank(&mut self) -> Result<(), String>;
    /// Moves the card out of the reader.
    fn eject(&mut self) -> Result<(), String>;
}

/// Names of the readers pcscd knows (empty when there are none).
pub fn list_readers(ctx: &pcsc::Context) -> Result<Vec<String>, ReaderError> {
    match ctx.list_readers() {
        Ok(names) => Ok(names),
        Err(pcsc::Error::NoReadersAvailable) => Ok(Vec::new()),
        Err(e) => Err(ReaderError::from_pcsc("", e)),
    }
}

/// Establishes a PC/SC context (the socket is the process's `PCSCLITE_CSOCK_NAME` or
/// pcsc-lite's default).
pub fn establish() -> Result<pcsc::Context, ReaderError> {
    pcsc::Context::establish().map_err(|e| ReaderError::from_pcsc("", e))
}

/// An encoder reached through PC/SC.
pub struct PcscEncoder {
    ctx: pcsc::Context,
    name: String,
    reader: CString,
    card: Option<pcsc::Card>,
    feed: Option<Box<dyn CardFeed>>,
    insert_timeout: Duration,
    buf: Vec<u8>,
}

impl std::fmt::Debug for PcscEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PcscEncoder({}, connected: {})",
            self.name,
            self.card.is_some()
        )
    }
}

impl PcscEncoder {
    /// An encoder on the named reader, with an optional card feed (without one, insert
    /// waits for a card someone else puts in).
    pub fn new(
        ctx: pcsc::Context,
        reader: &str,
        feed: Option<Box<dyn CardFeed>>,
    ) -> Result<Self, ReaderError> {
        let c =
            CString::new(reader).map_err(|_| ReaderError::ReaderUnavailable(reader.to_string()))?;
        Ok(Self {
            ctx,
            name: reader.to_string(),
            reader: c,
            card: None,
            feed,
            insert_timeout: Duration::from_secs(5),
            buf: vec![0; pcsc::MAX_BUFFER_SIZE_EXTENDED],
        })
    }

    /// How long `insert` waits for the card to be seen by pcscd.
    pub fn set_insert_timeout(&mut self, t: Duration) {
        self.insert_timeout = t;
    }

    /// Connects to the card already in the reader, waiting up to the insert timeout.
    pub fn connect(&mut self) -> Result<(), ReaderError> {
        let deadline = Instant::now() + self.insert_timeout;
        loop {
            match self.ctx.connect(&self.reader) {
                Ok(card) => {
                    self.card = Some(card);
                    return Ok(());
                }
                // Not (yet) a usable card: pcscd notices insertions on its next presence
                // poll, and a card swapped in right after an eject can meet a stale driver
                // socket once. Keep trying until the deadline.
                Err(
                    pcsc::Error::NoSmartcard
                    | pcsc::Error::RemovedCard
                    | pcsc::Error::ResetCard
                    | pcsc::Error::UnresponsiveCard
                    | pcsc::Error::UnpoweredCard
                    | pcsc::Error::UnsupportedCard,
                ) if Instant::now() < deadline => self.wait_for_change(deadline),
                Err(e) => return Err(ReaderError::from_pcsc(&self.name, e)),
            }
        }
    }

    fn wait_for_change(&self, deadline: Instant) {
        let mut states = [pcsc::ReaderState::new(
            self.reader.clone(),
            pcsc::State::UNAWARE,
        )];
        if self
            .ctx
            .get_status_change(Duration::ZERO, &mut states)
            .is_ok()
        {
            states[0].sync_current_state();
        }
        let left = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(250));
        let _ = self.ctx.get_status_change(left, &mut states);
    }

    /// Whether pcscd currently reports a card in the reader.
    pub fn card_present(&self) -> Result<bool, ReaderError> {
        let mut states = [pcsc::ReaderState::new(
            self.reader.clone(),
            pcsc::State::UNAWARE,
        )];
        self.ctx
            .get_status_change(Duration::ZERO, &mut states)
            .map_err(|e| ReaderError::from_pcsc(&self.name, e))?;
        Ok(states[0].event_state().contains(pcsc::State::PRESENT))
    }
}

impl CardChannel for PcscEncoder {
    fn reader_name(&self) -> &str {
        &self.name
    }

    fn transmit(&mut self, apdu: &[u8]) -> Result<Vec<u8>, ReaderError> {
        let Some(card) = self.card.as_ref() else {
            return Err(ReaderError::NoSmartcard(self.name.clone()));
        };
        match card.transmit(apdu, &mut self.buf) {
            Ok(r) if r.len() >= 2 => Ok(r.to_vec()),
            Ok(_) => {
                // The driver got no answer (vpcd: the card's socket closed mid-command) and
                // pcscd passed an empty response up. If the card is gone within the next
                // presence poll it was pulled; otherwise it stopped answering.
                self.card = None;
                let deadline = Instant::now() + Duration::from_millis(900);
                while Instant::now() < deadline {
                    if !self.card_present().unwrap_or(true) {
                        return Err(ReaderError::RemovedCard(self.name.clone()));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(ReaderError::Unresponsive(self.name.clone()))
            }
            Err(e) => {
                let err = ReaderError::from_pcsc(&self.name, e);
                if matches!(
                    err,
                    ReaderError::RemovedCard(_) | ReaderError::NoSmartcard(_)
                ) {
                    self.card = None;
                }
                // pcscd reports a card that stopped answering mid-exchange as a
                // communication error: to the caller that blank is unresponsive.
                Err(match err {
                    ReaderError::Pcsc {
                        error: pcsc::Error::CommError,
                        ..
                    } => ReaderError::Unresponsive(self.name.clone()),
                    other => other,
                })
            }
        }
    }
}

impl Encoder for PcscEncoder {
    fn insert(&mut self) -> Result<(), ReaderError> {
        if let Some(feed) = self.feed.as_mut() {
            feed.insert_blank().map_err(|reason| ReaderError::Feed {
                reader: self.name.clone(),
                reason,
            })?;
            // The feed put a card in; if pcscd still sees none, the chip gives no ATR (a
            // reader shows a dead chip as an empty slot): that blank is unusable.
            return match self.connect() {
                Err(ReaderError::NoSmartcard(r)) => Err(ReaderError::Unresponsive(r)),
                other => other,
            };
        }
        self.connect()
    }

    fn eject(&mut self) -> Result<(), ReaderError> {
        if let Some(card) = self.card.take() {
            let _ = card.disconnect(pcsc::Disposition::UnpowerCard);
        }
        if let Some(feed) = self.feed.as_mut() {
            feed.eject().map_err(|reason| ReaderError::Feed {
                reader: self.name.clone(),
                reason,
            })?;
        }
        // Like a feeder's "card out" sensor: return once pcscd sees the reader empty, so the
        // next insert is not mistaken for the old card.
        if self.feed.is_some() {
            let deadline = Instant::now() + self.insert_timeout;
            while self.card_present()? && Instant::now() < deadline {
                self.wait_for_change(deadline);
            }
        }
        Ok(())
    }
}
