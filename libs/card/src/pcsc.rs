//! A small PC/SC client binding that loads pcsc-lite at RUN time.
//!
//! cardpipe used the `pcsc` crate, whose `pcsc-sys` links `libpcsclite` at build time: every
//! build of the `cardpipe` binary then needed `libpcsclite-dev`, even for the embedded demo
//! that never talks to a reader. This module instead opens the client library with
//! `dlopen` the first time a PC/SC function is needed:
//!
//! - `$CARDPIPE_PCSC_LIB` if set (a path or a soname; nothing else is tried then),
//! - else `libpcsclite.so.1` (the runtime package, `libpcsclite1`), then `libpcsclite.so`.
//!
//! When none loads, every PC/SC call fails with [`Error::Library`], whose message names what
//! is missing and how to install it; nothing else in the process is affected.
//!
//! Only what [`crate::reader`] uses is bound: `SCardEstablishContext`, `SCardReleaseContext`,
//! `SCardListReaders`, `SCardConnect`, `SCardDisconnect`, `SCardTransmit` and
//! `SCardGetStatusChange`. The types follow pcsc-lite's `wintypes.h` / `pcsclite.h` for
//! every platform but Apple's (there `DWORD`/`LONG` are 32-bit and the structs packed, and
//! the library is a framework): `DWORD` = `unsigned long`, `LONG` = `long`, handles are
//! `LONG`, and the error codes are positive `LONG`s (`(LONG)0x8010000C`). Windows and macOS
//! get [`Error::Library`] ("not supported") instead of a wrong ABI.
//!
//! The `pcsc` crate's safe wrapper (`pcsc` 2.9, `pcsc-sys` 1.3) served as the reference for
//! the calling conventions; the behaviour the encoders relied on is kept: a [`Card`]
//! dropped without [`Card::disconnect`] is disconnected with `SCARD_RESET_CARD`, a
//! [`Context`] is released when its last clone (and last [`Card`]) goes.
//!
//! This is the ONLY module of the workspace allowed to use `unsafe` (see the `[lints]` of
//! this crate's Cargo.toml); every `unsafe` block says why it is sound.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_void};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The environment variable naming the PC/SC client library to load instead of pcsc-lite's
/// default sonames.
pub const LIBRARY_ENV: &str = "CARDPIPE_PCSC_LIB";
/// The sonames tried, in order, when [`LIBRARY_ENV`] is not set.
pub const DEFAULT_LIBRARIES: [&str; 2] = ["libpcsclite.so.1", "libpcsclite.so"];
/// What to install when the library is missing (Debian / Ubuntu).
pub const INSTALL_HINT: &str = "apt-get install libpcsclite1 pcscd";

/// Largest response of an extended-length APDU exchange (pcsc-lite's
/// `MAX_BUFFER_SIZE_EXTENDED`: 64 KiB + APDU header + Lc + Le + SW).
pub const MAX_BUFFER_SIZE_EXTENDED: usize = 4 + 3 + (1 << 16) + 3 + 2;

// ---- pcsc-lite ABI (wintypes.h, pcsclite.h, winscard.h; non-Apple) ----------------------

#[allow(clippy::upper_case_acronyms)]
type DWORD = std::ffi::c_ulong;
#[allow(clippy::upper_case_acronyms)]
type LONG = std::ffi::c_long;
type ScardContext = LONG;
type ScardHandle = LONG;

const MAX_ATR_SIZE: usize = 33;
const SCARD_S_SUCCESS: LONG = 0;
const SCARD_SCOPE_USER: DWORD = 0;
const SCARD_SHARE_SHARED: DWORD = 2;
const SCARD_PROTOCOL_T0: DWORD = 1;
const SCARD_PROTOCOL_T1: DWORD = 2;
const SCARD_LEAVE_CARD: DWORD = 0;
const SCARD_RESET_CARD: DWORD = 1;
const SCARD_UNPOWER_CARD: DWORD = 2;
const SCARD_EJECT_CARD: DWORD = 3;
const INFINITE: DWORD = 0xFFFF_FFFF;

/// `SCARD_READERSTATE` (pcsclite.h).
#[repr(C)]
struct ScardReaderState {
    sz_reader: *const c_char,
    pv_user_data: *mut c_void,
    dw_current_state: DWORD,
    dw_event_state: DWORD,
    cb_atr: DWORD,
    rgb_atr: [u8; MAX_ATR_SIZE],
}

/// `SCARD_IO_REQUEST` (pcsclite.h): both fields are `unsigned long`.
#[repr(C)]
struct ScardIoRequest {
    dw_protocol: DWORD,
    cb_pci_length: DWORD,
}

// The layouts on the platform the project runs on (Linux x86-64 / aarch64, LP64), as the C
// compiler lays them out: 5 × 8 bytes + 33 bytes of ATR, padded to 8.
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
const _: () = {
    assert!(size_of::<DWORD>() == 8 && size_of::<LONG>() == 8);
    assert!(size_of::<ScardReaderState>() == 80);
    assert!(std::mem::offset_of!(ScardReaderState, rgb_atr) == 40);
    assert!(size_of::<ScardIoRequest>() == 16);
};

type EstablishContextFn =
    unsafe extern "C" fn(DWORD, *const c_void, *const c_void, *mut ScardContext) -> LONG;
type ReleaseContextFn = unsafe extern "C" fn(ScardContext) -> LONG;
type ListReadersFn =
    unsafe extern "C" fn(ScardContext, *const c_char, *mut c_char, *mut DWORD) -> LONG;
type ConnectFn = unsafe extern "C" fn(
    ScardContext,
    *const c_char,
    DWORD,
    DWORD,
    *mut ScardHandle,
    *mut DWORD,
) -> LONG;
type DisconnectFn = unsafe extern "C" fn(ScardHandle, DWORD) -> LONG;
type TransmitFn = unsafe extern "C" fn(
    ScardHandle,
    *const ScardIoRequest,
    *const u8,
    DWORD,
    *mut ScardIoRequest,
    *mut u8,
    *mut DWORD,
) -> LONG;
type GetStatusChangeFn =
    unsafe extern "C" fn(ScardContext, DWORD, *mut ScardReaderState, DWORD) -> LONG;

/// The loaded library and the functions taken from it.
struct Api {
    /// Where the functions come from (for messages).
    path: String,
    establish_context: EstablishContextFn,
    release_context: ReleaseContextFn,
    list_readers: ListReadersFn,
    connect: ConnectFn,
    disconnect: DisconnectFn,
    transmit: TransmitFn,
    get_status_change: GetStatusChangeFn,
    /// Kept so the function pointers above stay valid; the `Api` lives in a `static` and
    /// is never dropped, so the library is never unloaded.
    _library: libloading::Library,
}

static API: OnceLock<Result<Api, String>> = OnceLock::new();

/// The PC/SC client library, loaded on first use (the outcome is remembered for the life of
/// the process).
fn api() -> Result<&'static Api, Error> {
    API.get_or_init(load)
        .as_ref()
        .map_err(|msg| Error::Library(msg.clone()))
}

/// Loads the library, or says which PC/SC library is missing and how to get it.
///
/// Returns the path (or soname) that was loaded.
pub fn library() -> Result<&'static str, Error> {
    api().map(|a| a.path.as_str())
}

#[cfg(any(windows, target_vendor = "apple"))]
fn load() -> Result<Api, String> {
    Err("cardpipe's PC/SC binding supports pcsc-lite (Linux and other Unix systems) only".into())
}

#[cfg(not(any(windows, target_vendor = "apple")))]
fn load() -> Result<Api, String> {
    let candidates: Vec<String> = match std::env::var(LIBRARY_ENV) {
        Ok(v) if !v.trim().is_empty() => vec![v],
        _ => DEFAULT_LIBRARIES.iter().map(|s| s.to_string()).collect(),
    };
    load_from(&candidates)
}

/// Loads the first of `candidates` that opens and has every function.
#[cfg(not(any(windows, target_vendor = "apple")))]
fn load_from(candidates: &[String]) -> Result<Api, String> {
    let mut tried = Vec::new();
    for name in candidates {
        match open(name) {
            Ok(api) => return Ok(api),
            Err(e) => tried.push(format!("{name}: {e}")),
        }
    }
    Err(format!(
        "the PC/SC client library (pcsc-lite) could not be loaded ({}). PC/SC encoders and QC \
         line stations need it and a running pcscd: install them with `{INSTALL_HINT}`, or set \
         {LIBRARY_ENV} to the library's path. The embedded defaults (in-process encoders, QC \
         tray) do not use PC/SC",
        tried.join("; ")
    ))
}

#[cfg(not(any(windows, target_vendor = "apple")))]
fn open(name: &str) -> Result<Api, String> {
    // SAFETY: loading a shared library runs its initialisers. The candidates are pcsc-lite's
    // client library (or the one an operator named explicitly in CARDPIPE_PCSC_LIB); its
    // initialisers only set up its own state and are safe to run from any thread.
    let library = unsafe { libloading::Library::new(name) }.map_err(|e| e.to_string())?;
    /// Copies a function pointer out of the library.
    ///
    /// # Safety
    /// `T` must be the function's exact C signature, and the pointer must not be used after
    /// `library` is unloaded.
    unsafe fn sym<T: Copy>(library: &libloading::Library, name: &[u8]) -> Result<T, String> {
        // SAFETY: forwarded from the caller (type = the C prototype); the `Symbol` borrow is
        // dropped right away, the copied pointer lives as long as `Api` keeps the library.
        unsafe { library.get::<T>(name) }
            .map(|s| *s)
            .map_err(|e| format!("{}: {e}", String::from_utf8_lossy(name)))
    }
    // SAFETY: each type alias above is the prototype from pcsc-lite's winscard.h with
    // pcsc-lite's non-Apple types (DWORD = unsigned long, LONG = long, SCARDCONTEXT /
    // SCARDHANDLE = LONG), and the pointers are stored next to the library in `Api`, which
    // is never dropped (it lives in `API`).
    unsafe {
        Ok(Api {
            establish_context: sym(&library, b"SCardEstablishContext\0")?,
            release_context: sym(&library, b"SCardReleaseContext\0")?,
            list_readers: sym(&library, b"SCardListReaders\0")?,
            connect: sym(&library, b"SCardConnect\0")?,
            disconnect: sym(&library, b"SCardDisconnect\0")?,
            transmit: sym(&library, b"SCardTransmit\0")?,
            get_status_change: sym(&library, b"SCardGetStatusChange\0")?,
            path: name.to_string(),
            _library: library,
        })
    }
}

// ---- errors -----------------------------------------------------------------------------

/// A PC/SC failure: the library could not be loaded, or a function returned an error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The client library is missing (or lacks a function); the message says what to install.
    #[error("{0}")]
    Library(String),
    /// `SCARD_E_CANCELLED`.
    #[error("the action was cancelled")]
    Cancelled,
    /// `SCARD_E_INVALID_HANDLE`.
    #[error("invalid handle")]
    InvalidHandle,
    /// `SCARD_E_INVALID_PARAMETER`.
    #[error("invalid parameter")]
    InvalidParameter,
    /// `SCARD_E_NO_MEMORY`.
    #[error("not enough memory")]
    NoMemory,
    /// `SCARD_E_INSUFFICIENT_BUFFER`.
    #[error("the receive buffer is too small")]
    InsufficientBuffer,
    /// `SCARD_E_UNKNOWN_READER`.
    #[error("unknown reader")]
    UnknownReader,
    /// `SCARD_E_TIMEOUT`.
    #[error("timed out")]
    Timeout,
    /// `SCARD_E_SHARING_VIOLATION`.
    #[error("the card is in use by another connection")]
    SharingViolation,
    /// `SCARD_E_NO_SMARTCARD`.
    #[error("no smart card in the reader")]
    NoSmartcard,
    /// `SCARD_E_PROTO_MISMATCH`.
    #[error("the requested protocols are not supported by the card")]
    ProtoMismatch,
    /// `SCARD_E_NOT_READY`.
    #[error("the reader or card is not ready")]
    NotReady,
    /// `SCARD_F_COMM_ERROR`.
    #[error("internal communication error")]
    CommError,
    /// `SCARD_E_READER_UNAVAILABLE`.
    #[error("the reader is unavailable")]
    ReaderUnavailable,
    /// `SCARD_E_NO_SERVICE`.
    #[error("the PC/SC service (pcscd) is not running")]
    NoService,
    /// `SCARD_E_SERVICE_STOPPED`.
    #[error("the PC/SC service (pcscd) stopped")]
    ServiceStopped,
    /// `SCARD_E_NO_READERS_AVAILABLE`.
    #[error("no smart card reader is available")]
    NoReadersAvailable,
    /// `SCARD_W_UNSUPPORTED_CARD`.
    #[error("the card's ATR does not match a supported card")]
    UnsupportedCard,
    /// `SCARD_W_UNRESPONSIVE_CARD`.
    #[error("the card does not respond to reset")]
    UnresponsiveCard,
    /// `SCARD_W_UNPOWERED_CARD`.
    #[error("the card is not powered")]
    UnpoweredCard,
    /// `SCARD_W_RESET_CARD`.
    #[error("the card was reset")]
    ResetCard,
    /// `SCARD_W_REMOVED_CARD`.
    #[error("the card was removed")]
    RemovedCard,
    /// Any other code, with pcsc-lite's name for it when known.
    #[error("PC/SC error {name} (0x{code:08X})")]
    Other {
        /// The raw return code.
        code: i64,
        /// pcsc-lite's symbolic name, or "unknown".
        name: &'static str,
    },
}

impl Error {
    /// The error for a non-success return code.
    fn from_code(code: LONG) -> Self {
        // The codes are `(LONG)0x801000xx`: positive on LP64, so they compare as written.
        // (`LONG` is already i64 on LP64; the conversion is for 32-bit targets.)
        #[allow(clippy::useless_conversion)]
        let code = i64::from(code);
        match code {
            0x8010_0002 => Error::Cancelled,
            0x8010_0003 => Error::InvalidHandle,
            0x8010_0004 => Error::InvalidParameter,
            0x8010_0006 => Error::NoMemory,
            0x8010_0008 => Error::InsufficientBuffer,
            0x8010_0009 => Error::UnknownReader,
            0x8010_000A => Error::Timeout,
            0x8010_000B => Error::SharingViolation,
            0x8010_000C => Error::NoSmartcard,
            0x8010_000F => Error::ProtoMismatch,
            0x8010_0010 => Error::NotReady,
            0x8010_0013 => Error::CommError,
            0x8010_0017 => Error::ReaderUnavailable,
            0x8010_001D => Error::NoService,
            0x8010_001E => Error::ServiceStopped,
            0x8010_002E => Error::NoReadersAvailable,
            0x8010_0065 => Error::UnsupportedCard,
            0x8010_0066 => Error::UnresponsiveCard,
            0x8010_0067 => Error::UnpoweredCard,
            0x8010_0068 => Error::ResetCard,
            0x8010_0069 => Error::RemovedCard,
            code => Error::Other {
                code,
                name: code_name(code),
            },
        }
    }
}

/// pcsc-lite's names for the codes without their own [`Error`] variant.
fn code_name(code: i64) -> &'static str {
    match code {
        0x8010_0001 => "SCARD_F_INTERNAL_ERROR",
        0x8010_0005 => "SCARD_E_INVALID_TARGET",
        0x8010_0007 => "SCARD_F_WAITED_TOO_LONG",
        0x8010_000D => "SCARD_E_UNKNOWN_CARD",
        0x8010_000E => "SCARD_E_CANT_DISPOSE",
        0x8010_0011 => "SCARD_E_INVALID_VALUE",
        0x8010_0012 => "SCARD_E_SYSTEM_CANCELLED",
        0x8010_0014 => "SCARD_F_UNKNOWN_ERROR",
        0x8010_0015 => "SCARD_E_INVALID_ATR",
        0x8010_0016 => "SCARD_E_NOT_TRANSACTED",
        0x8010_0018 => "SCARD_P_SHUTDOWN",
        0x8010_0019 => "SCARD_E_PCI_TOO_SMALL",
        0x8010_001A => "SCARD_E_READER_UNSUPPORTED",
        0x8010_001B => "SCARD_E_DUPLICATE_READER",
        0x8010_001C => "SCARD_E_CARD_UNSUPPORTED",
        0x8010_001F => "SCARD_E_UNSUPPORTED_FEATURE",
        0x8010_002F => "SCARD_E_COMM_DATA_LOST",
        0x8010_0031 => "SCARD_E_SERVER_TOO_BUSY",
        0x8010_006A => "SCARD_W_SECURITY_VIOLATION",
        0x8010_006B => "SCARD_W_WRONG_CHV",
        0x8010_006C => "SCARD_W_CHV_BLOCKED",
        0x8010_006D => "SCARD_W_EOF",
        0x8010_006E => "SCARD_W_CANCELLED_BY_USER",
        0x8010_006F => "SCARD_W_CARD_NOT_AUTHENTICATED",
        _ => "unknown",
    }
}

fn check(code: LONG) -> Result<(), Error> {
    if code == SCARD_S_SUCCESS {
        Ok(())
    } else {
        Err(Error::from_code(code))
    }
}

/// A length for a `DWORD` parameter (buffers here are far below 4 GiB).
fn dword(len: usize) -> DWORD {
    DWORD::try_from(len).unwrap_or(DWORD::MAX)
}

// ---- context ----------------------------------------------------------------------------

/// A connection to the PC/SC resource manager (pcscd). Clones share it; it is released when
/// the last clone and the last [`Card`] opened through it are gone.
#[derive(Clone)]
pub struct Context {
    inner: Arc<ContextInner>,
}

struct ContextInner {
    api: &'static Api,
    handle: ScardContext,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pcsc::Context({:#x})", self.inner.handle)
    }
}

impl Drop for ContextInner {
    fn drop(&mut self) {
        // SAFETY: `handle` came from a successful SCardEstablishContext and is released
        // exactly once, here (the inner value is shared behind an `Arc`).
        let _ = unsafe { (self.api.release_context)(self.handle) };
    }
}

impl Context {
    /// Establishes a user-scope context. pcsc-lite connects to the socket named by
    /// `PCSCLITE_CSOCK_NAME` (read once per process) or its compiled-in default.
    pub fn establish() -> Result<Self, Error> {
        let api = api()?;
        let mut handle: ScardContext = 0;
        // SAFETY: the reserved pointers may be null (pcsc-lite ignores them); `handle` is a
        // valid place for the out-parameter for the duration of the call.
        check(unsafe {
            (api.establish_context)(
                SCARD_SCOPE_USER,
                std::ptr::null(),
                std::ptr::null(),
                &mut handle,
            )
        })?;
        Ok(Self {
            inner: Arc::new(ContextInner { api, handle }),
        })
    }

    /// The names of the readers pcscd knows. No reader at all is
    /// [`Error::NoReadersAvailable`], as in PC/SC.
    pub fn list_readers(&self) -> Result<Vec<String>, Error> {
        let api = self.inner.api;
        // Readers can come and go between the size query and the read: retry a few times.
        for _ in 0..4 {
            let mut len: DWORD = 0;
            // SAFETY: a null group list means all readers; a null buffer asks only for the
            // needed length, written to `len`.
            check(unsafe {
                (api.list_readers)(
                    self.inner.handle,
                    std::ptr::null(),
                    std::ptr::null_mut(),
                    &mut len,
                )
            })?;
            let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0).max(1)];
            let mut len = dword(buf.len());
            // SAFETY: `buf` is writable for `len` bytes and outlives the call; pcsc-lite
            // writes at most `len` bytes (else SCARD_E_INSUFFICIENT_BUFFER) and stores the
            // used length in `len`.
            let r = unsafe {
                (api.list_readers)(
                    self.inner.handle,
                    std::ptr::null(),
                    buf.as_mut_ptr().cast::<c_char>(),
                    &mut len,
                )
            };
            match check(r) {
                Ok(()) => {
                    buf.truncate(usize::try_from(len).unwrap_or(0).min(buf.len()));
                    return Ok(parse_multi_string(&buf));
                }
                Err(Error::InsufficientBuffer) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::InsufficientBuffer)
    }

    /// Connects to the card in `reader` in shared mode, T=0 or T=1.
    pub fn connect(&self, reader: &CStr) -> Result<Card, Error> {
        let api = self.inner.api;
        let mut handle: ScardHandle = 0;
        let mut protocol: DWORD = 0;
        // SAFETY: `reader` is a NUL-terminated string valid for the call; `handle` and
        // `protocol` are valid out-parameters.
        check(unsafe {
            (api.connect)(
                self.inner.handle,
                reader.as_ptr(),
                SCARD_SHARE_SHARED,
                SCARD_PROTOCOL_T0 | SCARD_PROTOCOL_T1,
                &mut handle,
                &mut protocol,
            )
        })?;
        Ok(Card {
            ctx: self.clone(),
            handle,
            protocol,
            connected: true,
        })
    }

    /// Waits up to `timeout` until the state of one of `readers` differs from its current
    /// state (a zero timeout just reads the states). Times out with [`Error::Timeout`].
    pub fn get_status_change(
        &self,
        timeout: Duration,
        readers: &mut [ReaderState],
    ) -> Result<(), Error> {
        let api = self.inner.api;
        let ms = DWORD::try_from(timeout.as_millis())
            .unwrap_or(INFINITE)
            .min(INFINITE);
        let mut raw: Vec<ScardReaderState> = readers
            .iter()
            .map(|r| ScardReaderState {
                sz_reader: r.name.as_ptr(),
                pv_user_data: std::ptr::null_mut(),
                dw_current_state: r.current,
                dw_event_state: r.event,
                cb_atr: dword(r.atr_len),
                rgb_atr: r.atr,
            })
            .collect();
        // SAFETY: `raw` is an array of `raw.len()` SCARD_READERSTATE structs laid out as in
        // pcsclite.h; each `sz_reader` points into a CString of `readers`, which is borrowed
        // (so alive and unmoved) for the whole call. pcsc-lite writes only the event state
        // and ATR fields of those structs.
        let r = unsafe {
            (api.get_status_change)(self.inner.handle, ms, raw.as_mut_ptr(), dword(raw.len()))
        };
        for (state, raw) in readers.iter_mut().zip(&raw) {
            state.event = raw.dw_event_state;
            state.atr = raw.rgb_atr;
            state.atr_len = usize::try_from(raw.cb_atr).unwrap_or(0).min(MAX_ATR_SIZE);
        }
        check(r)
    }
}

/// Splits a PC/SC multi-string ("a\0b\0\0") into its strings.
fn parse_multi_string(buf: &[u8]) -> Vec<String> {
    buf.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

// ---- reader states ----------------------------------------------------------------------

/// Reader/card state bits (`SCARD_STATE_*`); the upper 16 bits carry pcsc-lite's event
/// counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State(u64);

impl State {
    /// `SCARD_STATE_UNAWARE`: the caller knows nothing yet (answer at once).
    pub const UNAWARE: State = State(0x0000);
    /// `SCARD_STATE_IGNORE`.
    pub const IGNORE: State = State(0x0001);
    /// `SCARD_STATE_CHANGED`.
    pub const CHANGED: State = State(0x0002);
    /// `SCARD_STATE_UNKNOWN`: no such reader.
    pub const UNKNOWN: State = State(0x0004);
    /// `SCARD_STATE_UNAVAILABLE`.
    pub const UNAVAILABLE: State = State(0x0008);
    /// `SCARD_STATE_EMPTY`: no card in the reader.
    pub const EMPTY: State = State(0x0010);
    /// `SCARD_STATE_PRESENT`: a card is in the reader.
    pub const PRESENT: State = State(0x0020);
    /// `SCARD_STATE_EXCLUSIVE`.
    pub const EXCLUSIVE: State = State(0x0080);
    /// `SCARD_STATE_INUSE`.
    pub const INUSE: State = State(0x0100);
    /// `SCARD_STATE_MUTE`: the card gives no ATR.
    pub const MUTE: State = State(0x0200);

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: State) -> bool {
        self.0 & other.0 == other.0
    }

    /// The raw bits.
    pub fn bits(self) -> u64 {
        self.0
    }
}

/// One reader's entry for [`Context::get_status_change`]: its name, the state the caller
/// knows, and the state (and ATR) pcscd reported.
#[derive(Debug, Clone)]
pub struct ReaderState {
    name: CString,
    current: DWORD,
    event: DWORD,
    atr: [u8; MAX_ATR_SIZE],
    atr_len: usize,
}

impl ReaderState {
    /// An entry for `name`, with `current` as the state the caller believes.
    pub fn new(name: CString, current: State) -> Self {
        Self {
            name,
            current: current.0 as DWORD,
            event: 0,
            atr: [0; MAX_ATR_SIZE],
            atr_len: 0,
        }
    }

    /// The state pcscd reported last.
    pub fn event_state(&self) -> State {
        // `DWORD` is already u64 on LP64; the conversion is for 32-bit targets.
        #[allow(clippy::useless_conversion)]
        let bits = u64::from(self.event);
        State(bits)
    }

    /// The ATR pcscd reported last (empty without a card).
    pub fn atr(&self) -> &[u8] {
        &self.atr[..self.atr_len]
    }

    /// Takes the reported state as the known one (the next call then waits for a change).
    pub fn sync_current_state(&mut self) {
        self.current = self.event;
    }
}

// ---- card -------------------------------------------------------------------------------

/// What to do with the card on [`Card::disconnect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// `SCARD_LEAVE_CARD`.
    LeaveCard,
    /// `SCARD_RESET_CARD`.
    ResetCard,
    /// `SCARD_UNPOWER_CARD`.
    UnpowerCard,
    /// `SCARD_EJECT_CARD`.
    EjectCard,
}

impl Disposition {
    fn raw(self) -> DWORD {
        match self {
            Disposition::LeaveCard => SCARD_LEAVE_CARD,
            Disposition::ResetCard => SCARD_RESET_CARD,
            Disposition::UnpowerCard => SCARD_UNPOWER_CARD,
            Disposition::EjectCard => SCARD_EJECT_CARD,
        }
    }
}

/// A connection to the card in a reader. Dropping it disconnects with
/// [`Disposition::ResetCard`] (like the `pcsc` crate).
pub struct Card {
    ctx: Context,
    handle: ScardHandle,
    protocol: DWORD,
    connected: bool,
}

impl std::fmt::Debug for Card {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pcsc::Card({:#x}, protocol {})",
            self.handle, self.protocol
        )
    }
}

impl Card {
    /// The protocol negotiated at connect (1 = T=0, 2 = T=1).
    pub fn protocol(&self) -> u32 {
        u32::try_from(self.protocol).unwrap_or(0)
    }

    /// Sends `apdu` and returns the response (a prefix of `receive`).
    pub fn transmit<'b>(&self, apdu: &[u8], receive: &'b mut [u8]) -> Result<&'b [u8], Error> {
        // pcsc-lite's own SCARD_PCI_T0 / SCARD_PCI_T1 are exactly { protocol, sizeof }.
        let pci = ScardIoRequest {
            dw_protocol: self.protocol,
            cb_pci_length: dword(size_of::<ScardIoRequest>()),
        };
        let mut len = dword(receive.len());
        // SAFETY: `handle` is a connected card handle (a `Card` is only built by a
        // successful SCardConnect and `connected` is cleared once disconnected); `pci` and
        // `apdu` are readable, and `receive` writable for the lengths passed, for the whole
        // call; the receive PCI may be null. pcsc-lite writes at most `len` bytes and stores
        // the response length in `len`.
        let r = unsafe {
            (self.ctx.inner.api.transmit)(
                self.handle,
                &pci,
                apdu.as_ptr(),
                dword(apdu.len()),
                std::ptr::null_mut(),
                receive.as_mut_ptr(),
                &mut len,
            )
        };
        check(r)?;
        let n = usize::try_from(len).unwrap_or(0).min(receive.len());
        Ok(&receive[..n])
    }

    /// Disconnects, doing `disposition` with the card. On failure the handle is still
    /// disconnected with a reset when the `Card` is dropped.
    pub fn disconnect(mut self, disposition: Disposition) -> Result<(), Error> {
        // SAFETY: `handle` is connected (see `transmit`); on success it is marked
        // disconnected so `Drop` does not use it again.
        let r = unsafe { (self.ctx.inner.api.disconnect)(self.handle, disposition.raw()) };
        check(r)?;
        self.connected = false;
        Ok(())
    }
}

impl Drop for Card {
    fn drop(&mut self) {
        if self.connected {
            // SAFETY: `handle` is still connected (never disconnected successfully); the
            // context it belongs to is kept alive by `self.ctx` until after this call.
            let _ = unsafe { (self.ctx.inner.api.disconnect)(self.handle, SCARD_RESET_CARD) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_strings_split_into_reader_names() {
        assert_eq!(
            parse_multi_string(b"Virtual PCD 00 00\0Virtual PCD 00 01\0\0"),
            vec!["Virtual PCD 00 00", "Virtual PCD 00 01"]
        );
        assert!(parse_multi_string(b"\0").is_empty());
        assert!(parse_multi_string(b"").is_empty());
    }

    #[test]
    fn codes_map_to_the_typed_errors() {
        assert_eq!(Error::from_code(0x8010_0069), Error::RemovedCard);
        assert_eq!(Error::from_code(0x8010_000C), Error::NoSmartcard);
        assert_eq!(Error::from_code(0x8010_001D), Error::NoService);
        assert_eq!(Error::from_code(0x8010_002E), Error::NoReadersAvailable);
        assert_eq!(Error::from_code(0x8010_0013), Error::CommError);
        assert_eq!(
            Error::from_code(0x8010_0015).to_string(),
            "PC/SC error SCARD_E_INVALID_ATR (0x80100015)"
        );
        assert!(check(SCARD_S_SUCCESS).is_ok());
    }

    #[test]
    #[cfg(not(any(windows, target_vendor = "apple")))]
    fn a_missing_library_says_what_to_install() {
        let Err(msg) = load_from(&["/nonexistent/libpcsclite.so.1".to_string()]) else {
            panic!("a library that does not exist loaded");
        };
        assert!(msg.contains("/nonexistent/libpcsclite.so.1"), "{msg}");
        assert!(msg.contains(INSTALL_HINT), "{msg}");
        assert!(msg.contains(LIBRARY_ENV), "{msg}");
    }

    #[test]
    fn state_bits() {
        let s = State(0x0003_0022);
        assert!(s.contains(State::PRESENT));
        assert!(s.contains(State::CHANGED));
        assert!(!s.contains(State::EMPTY));
        assert!(s.contains(State::UNAWARE));
    }
}
