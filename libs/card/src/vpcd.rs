//! The card side of the vpcd protocol (vsmartcard's virtual PC/SC reader driver).
//!
//! vpcd listens on a TCP port per reader slot; the virtual card connects to it. Every frame
//! in both directions is a 2-byte big-endian length followed by the payload. A 1-byte payload
//! from vpcd is a control byte: `00` power off, `01` power on, `02` reset (no reply to
//! these three), `04` get ATR (reply: one frame with the ATR). Any longer payload is a command
//! APDU and gets exactly one response frame. Closing the socket removes the card; connecting
//! inserts it.
//!
//! [`VpcdSlot`] owns a thread that serves whatever [`Card`] is in the slot. Because pcscd
//! polls the ATR about every 400 ms, the thread never holds up an ATR request: the socket is
//! read with a short timeout and the card lock is only taken per frame.
//!
//! Fault mapping: a dead chip answers every frame with an empty frame, which vpcd treats as a
//! failed exchange and ejects (pcscd then sees no working card); tearing closes the socket
//! mid-command without an answer and the slot stays empty; slow EEPROM is the card OS's own
//! per-APDU latency.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::card_os::{Card, CardFault, Lifecycle};
use crate::reader::{BlankStock, CardFeed};

const CTRL_OFF: u8 = 0x00;
const CTRL_ON: u8 = 0x01;
const CTRL_RESET: u8 = 0x02;
const CTRL_ATR: u8 = 0x04;

/// How often the serving thread looks at the slot state between frames.
const POLL: Duration = Duration::from_millis(20);

/// After a card vanished mid-command (tearing) the slot stays empty this long before the next
/// card connects. pcscd's transmit error path marks the reader empty without its presence
/// thread ever polling an empty slot; a new card connected before that poll (every 400 ms)
/// would be taken for the old one and never powered up. Physically, a swap takes longer.
const ABSENCE_AFTER_TEAR: Duration = Duration::from_millis(600);

#[derive(Default)]
struct SlotState {
    card: Option<Card>,
    ejected: Option<Card>,
    generation: u64,
    connected: bool,
    stop: bool,
    auto_feed: Option<Arc<BlankStock>>,
    output: Option<CardOutput>,
    frames: u64,
}

/// Where a finished card goes when it leaves an encoder slot (the machine's transport to its
/// QC stations, see [`crate::line::CardLine`]).
pub type CardOutput = Arc<dyn Fn(Card) + Send + Sync>;

struct Shared {
    addr: SocketAddr,
    state: Mutex<SlotState>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A cloneable handle on a virtual card slot: insert, eject, inspect.
#[derive(Clone)]
pub struct SlotHandle(Arc<Shared>);

impl std::fmt::Debug for SlotHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.0.lock();
        write!(
            f,
            "SlotHandle({}, card: {}, connected: {})",
            self.0.addr,
            st.card.is_some(),
            st.connected
        )
    }
}

impl SlotHandle {
    /// The vpcd address this slot connects to.
    pub fn addr(&self) -> SocketAddr {
        self.0.addr
    }

    /// Puts a card in the slot (the previous one, if any, goes to the ejected tray).
    pub fn insert(&self, card: Card) {
        let mut st = self.0.lock();
        if let Some(old) = st.card.take() {
            st.ejected = Some(old);
        }
        st.card = Some(card);
        st.generation += 1;
        self.0.changed.notify_all();
    }

    /// Takes the card out of the slot (it stays inspectable via [`Self::with_ejected`]).
    pub fn eject(&self) {
        let mut st = self.0.lock();
        let mut out = None;
        if let Some(mut card) = st.card.take() {
            card.power_off();
            match &st.output {
                Some(output) => out = Some((output.clone(), card)),
                None => st.ejected = Some(card),
            }
        }
        st.generation += 1;
        self.0.changed.notify_all();
        drop(st);
        // Outside the slot lock: the line takes its own.
        if let Some((output, card)) = out {
            output(card);
        }
    }

    /// Takes the most recently ejected card out of the slot's tray.
    pub fn take_ejected(&self) -> Option<Card> {
        self.0.lock().ejected.take()
    }

    /// Sends every card leaving the slot (ejected, or released finished by the standalone
    /// feeder) to `output` instead of the slot's own tray. Torn-out and dead cards never
    /// reach it: they fall into the machine's reject bin.
    pub fn set_output(&self, output: Option<CardOutput>) {
        self.0.lock().output = output;
    }

    /// Whether the slot's socket is connected to vpcd (card "inserted" as pcscd sees it).
    pub fn is_connected(&self) -> bool {
        self.0.lock().connected
    }

    /// Whether a card is in the slot.
    pub fn has_card(&self) -> bool {
        self.0.lock().card.is_some()
    }

    /// Frames served so far.
    pub fn frames(&self) -> u64 {
        self.0.lock().frames
    }

    /// Runs `f` on the card in the slot.
    pub fn with_card<R>(&self, f: impl FnOnce(&Card) -> R) -> Option<R> {
        self.0.lock().card.as_ref().map(f)
    }

    /// Runs `f` on the most recently ejected (or torn-out) card.
    pub fn with_ejected<R>(&self, f: impl FnOnce(&Card) -> R) -> Option<R> {
        self.0.lock().ejected.as_ref().map(f)
    }

    /// Standalone feeder: whenever the card in the slot is finished (locked and powered off),
    /// torn out or dead, a fresh blank from `stock` replaces it. Used when the personalization
    /// worker runs in another process and cannot drive the feed itself.
    pub fn set_auto_feed(&self, stock: Option<Arc<BlankStock>>) {
        let mut st = self.0.lock();
        st.auto_feed = stock;
        self.0.changed.notify_all();
    }

    /// A [`CardFeed`] for a [`crate::reader::PcscEncoder`] on this slot: blanks come from
    /// `stock`.
    pub fn feed(&self, stock: Arc<BlankStock>) -> SlotFeed {
        SlotFeed {
            slot: self.clone(),
            stock,
        }
    }
}

/// The feed of a virtual encoder.
#[derive(Debug)]
pub struct SlotFeed {
    slot: SlotHandle,
    stock: Arc<BlankStock>,
}

impl CardFeed for SlotFeed {
    fn insert_blank(&mut self) -> Result<(), String> {
        self.slot.insert(self.stock.take());
        Ok(())
    }

    fn eject(&mut self) -> Result<(), String> {
        self.slot.eject();
        Ok(())
    }
}

/// A virtual card slot: a thread connecting the slot's card to vpcd.
pub struct VpcdSlot {
    handle: SlotHandle,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for VpcdSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.handle.fmt(f)
    }
}

impl VpcdSlot {
    /// Starts an (empty) slot that will connect to vpcd at `addr` whenever it holds a card.
    pub fn start(addr: SocketAddr) -> Self {
        let shared = Arc::new(Shared {
            addr,
            state: Mutex::new(SlotState::default()),
            changed: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vpcd-{}", addr.port()))
            .spawn(move || run(&s))
            .expect("spawn vpcd slot thread");
        Self {
            handle: SlotHandle(shared),
            thread: Some(thread),
        }
    }

    /// The slot's handle.
    pub fn handle(&self) -> &SlotHandle {
        &self.handle
    }

    /// Stops the thread (closing the socket: card removed).
    pub fn stop(&mut self) {
        {
            let mut st = self.handle.0.lock();
            st.stop = true;
            self.handle.0.changed.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VpcdSlot {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Why a connection ended.
enum End {
    Stop,
    Changed,
    PeerClosed,
    Torn,
    /// The feeder took an abandoned card out; it is in `ejected` already.
    Rejected,
}

fn run(shared: &Shared) {
    let mut absent_until: Option<std::time::Instant> = None;
    loop {
        let generation = {
            let mut st = shared.lock();
            loop {
                if st.stop {
                    return;
                }
                refill(&mut st);
                if st.card.is_some() {
                    break;
                }
                st = shared
                    .changed
                    .wait_timeout(st, Duration::from_millis(200))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            st.generation
        };
        if let Some(wait) = absent_until
            .take()
            .and_then(|t| t.checked_duration_since(std::time::Instant::now()))
        {
            std::thread::sleep(wait);
        }
        let stream = match TcpStream::connect_timeout(&shared.addr, Duration::from_secs(1)) {
            Ok(s) => s,
            Err(_) => {
                // vpcd not listening yet (pcscd starting): retry shortly.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let _ = socket2::SockRef::from(&stream).set_tcp_quickack(true);
        let _ = stream.set_read_timeout(Some(POLL));
        shared.lock().connected = true;
        let end = serve(shared, &stream, generation);
        let _ = stream.shutdown(Shutdown::Both);
        drop(stream);
        let mut st = shared.lock();
        st.connected = false;
        match end {
            End::Stop => return,
            End::Changed => {}
            End::Torn => {
                st.ejected = st.card.take();
                absent_until = Some(std::time::Instant::now() + ABSENCE_AFTER_TEAR);
            }
            End::Rejected => {
                // Taken out during pcscd's reset or power-down: like a tear, pcscd must see
                // the slot empty before the next card, or it keeps the old card's state and
                // every later power-up fails ("SCARD_W_REMOVED_CARD", chaos run).
                absent_until = Some(std::time::Instant::now() + ABSENCE_AFTER_TEAR);
            }
            End::PeerClosed => {
                // vpcd dropped us: a dead chip's empty answer, or pcscd going away. Give
                // pcscd a moment before presenting the card again.
                drop(st);
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }
}

/// The standalone feeder's rule (see [`SlotHandle::set_auto_feed`]).
fn refill(st: &mut SlotState) {
    let Some(stock) = st.auto_feed.clone() else {
        return;
    };
    let finished = match &st.card {
        None => true,
        Some(c) => c.is_removed() || c.faults().dead,
    };
    if finished {
        if let Some(old) = st.card.take() {
            st.ejected = Some(old);
        }
        st.card = Some(stock.take());
        st.generation += 1;
    }
}

fn serve(shared: &Shared, stream: &TcpStream, generation: u64) -> End {
    let mut reader = stream;
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = vec![0u8; 65536 + 2];
    loop {
        {
            let st = shared.lock();
            if st.stop {
                return End::Stop;
            }
            if st.generation != generation {
                return End::Changed;
            }
        }
        match reader.read(&mut chunk) {
            Ok(0) => return End::PeerClosed,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                // vpcd writes the length and the payload of a frame with two send() calls
                // and leaves Nagle on, so the payload waits for our ACK of the length; a
                // delayed ACK would cost ~40 ms per APDU. Quick-ACK is not sticky on Linux:
                // re-arm it after every read.
                let _ = socket2::SockRef::from(stream).set_tcp_quickack(true);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(_) => return End::PeerClosed,
        }
        while buf.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
            if buf.len() < 2 + len {
                break;
            }
            let payload: Vec<u8> = buf.drain(..2 + len).skip(2).collect();
            match handle_frame(shared, &payload) {
                Reply::None => {}
                Reply::Frame(data) => {
                    let mut out = Vec::with_capacity(2 + data.len());
                    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
                    out.extend_from_slice(&data);
                    if (&*stream).write_all(&out).is_err() {
                        return End::PeerClosed;
                    }
                }
                Reply::Tear => return End::Torn,
                Reply::Gone => return End::Changed,
                Reply::Rejected => return End::Rejected,
            }
        }
    }
}

enum Reply {
    None,
    Frame(Vec<u8>),
    Tear,
    Gone,
    /// The card was taken out in the middle of pcscd's command (see `handle_frame`).
    Rejected,
}

fn handle_frame(shared: &Shared, payload: &[u8]) -> Reply {
    let mut st = shared.lock();
    st.frames += 1;
    let auto_feed = st.auto_feed.is_some();
    let Some(card) = st.card.as_mut() else {
        return Reply::Gone;
    };
    if let [ctrl] = payload {
        // Standalone feeder: a card personalization started on and did not finish, reset or
        // powered down, was abandoned - its worker failed it, or died and pcscd reset the card
        // on cleaning up after it. No one will eject it (the worker has no feed): the feeder
        // moves it to the reject tray, and `refill` puts a blank in.
        let abandoned = matches!(*ctrl, CTRL_OFF | CTRL_RESET)
            && card.lifecycle() == Lifecycle::PrePersonalization
            && card.personalization_started();
        // Likewise a dead chip, as soon as pcscd tries to power it: it gives no ATR, and pcscd
        // would show the slot as holding a card it cannot power, forever.
        let dead = matches!(*ctrl, CTRL_ON | CTRL_RESET | CTRL_ATR) && card.faults().dead;
        if auto_feed && (abandoned || dead) {
            card.power_off();
            st.ejected = st.card.take();
            st.generation += 1;
            return Reply::Rejected;
        }
        return match *ctrl {
            CTRL_OFF => {
                card.power_off();
                // Standalone feeder: a locked card that the worker released is done.
                if auto_feed && card.lifecycle() == Lifecycle::Operational {
                    let done = st.card.take();
                    st.generation += 1;
                    match (st.output.clone(), done) {
                        (Some(output), Some(card)) => {
                            drop(st);
                            output(card);
                        }
                        (_, done) => st.ejected = done,
                    }
                    return Reply::Gone;
                }
                Reply::None
            }
            CTRL_ON | CTRL_RESET => {
                let _ = card.power_on();
                Reply::None
            }
            CTRL_ATR => Reply::Frame(card.atr().unwrap_or_default()),
            _ => Reply::None,
        };
    }
    match card.transmit(payload) {
        Ok(resp) => Reply::Frame(resp),
        Err(CardFault::Removed) => Reply::Tear,
        // A dead or unpowered chip gives nothing back; an empty frame makes vpcd eject it.
        Err(CardFault::Dead | CardFault::Unpowered) => Reply::Frame(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::card_os::Faults;
    use crate::cplc::ChipSerial;
    use crate::scp03::MasterKeys;
    use std::net::TcpListener;

    fn frame(s: &mut TcpStream, payload: &[u8]) {
        let mut v = (payload.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(payload);
        s.write_all(&v).unwrap();
    }

    fn recv(s: &mut TcpStream) -> Vec<u8> {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).unwrap();
        let mut v = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut v).unwrap();
        v
    }

    /// Plays vpcd's part against a slot over a real TCP socket.
    #[test]
    fn wire_protocol_against_a_fake_vpcd() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut slot = VpcdSlot::start(listener.local_addr().unwrap());
        let h = slot.handle().clone();
        h.insert(Card::blank(
            ChipSerial::simulated(4, 4),
            &MasterKeys::test_keys(),
            Faults::none(),
        ));
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        frame(&mut s, &[CTRL_ON]);
        frame(&mut s, &[CTRL_ATR]);
        assert_eq!(recv(&mut s), crate::card_os::ATR.to_vec());
        frame(&mut s, &[0x80, 0xCA, 0x9F, 0x7F, 0x00]);
        let r = recv(&mut s);
        assert_eq!(
            crate::cplc::parse(&r[..r.len() - 2]),
            Some(ChipSerial::simulated(4, 4))
        );
        // Ejecting closes the socket: vpcd reads end-of-stream.
        h.eject();
        let mut rest = Vec::new();
        assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
        assert!(h.with_ejected(|c| c.serial()) == Some(ChipSerial::simulated(4, 4)));
        slot.stop();
    }

    #[test]
    fn dead_chip_answers_empty_frames() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let slot = VpcdSlot::start(listener.local_addr().unwrap());
        slot.handle().insert(Card::blank(
            ChipSerial::simulated(4, 5),
            &MasterKeys::test_keys(),
            Faults {
                dead: true,
                ..Faults::none()
            },
        ));
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        frame(&mut s, &[CTRL_ATR]);
        assert!(recv(&mut s).is_empty());
        frame(&mut s, &[0x80, 0xCA, 0x9F, 0x7F, 0x00]);
        assert!(recv(&mut s).is_empty());
    }
}
