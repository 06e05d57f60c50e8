//! `cardpipe encoders simulate`: a private pcscd with N vpcd virtual readers and the card OS
//! behind each, so the path pcsc-lite → pcscd → vpcd → card OS is the real one.
//!
//! What [`Simulation::start`] does:
//! 1. writes a reader configuration directory: one entry per pair of encoders (a vpcd entry
//!    gives two slots on ports p and p+1), each with its OWN copy of `libifdvpcd.so` (the
//!    driver keeps per-reader state in a static array, so a shared path sees no card);
//! 2. starts `pcscd -f -c <conf>`; in [`SocketMode::Private`] inside a private mount
//!    namespace (`unshare --mount`) with a directory of ours bind-mounted on `/run/pcscd`, so
//!    its socket lands at `<work>/run/pcscd.comm` and never collides with a system pcscd;
//! 3. waits for the socket and every vpcd port, then starts one [`VpcdSlot`] per encoder.
//!
//! Clients: pcsc-lite 1.9.9's DAEMON ignores `PCSCLITE_CSOCK_NAME` (checked on Debian 12:
//! it always binds `/run/pcscd/pcscd.comm`, hence the mount namespace), but its CLIENT library
//! honours it, reading it once per process at the first `SCardEstablishContext`. A client of
//! a private simulation must therefore be started with `PCSCLITE_CSOCK_NAME` set to
//! [`Simulation::socket_path`] (opensc-tool, pyscard and our own test processes alike);
//! [`Simulation::check_client_env`] tells whether this process is such a client. Setting the
//! variable from inside the process is not an option: it is read before we could, and the
//! workspace forbids the `unsafe` that `set_var` needs. [`SocketMode::System`] serves on the
//! default socket instead (only when no other pcscd runs there), for unmodified clients.
//!
//! pcsc-lite caps a daemon at 16 readers (each slot of an entry is one), so one simulation
//! serves at most 16 encoders and QC stations together ([`MAX_READERS`]); more are refused
//! with that reason instead of a pcscd that never comes up.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::line::CardLine;
use crate::reader::{BlankStock, PcscEncoder, ReaderError};
use crate::vpcd::{SlotHandle, VpcdSlot};

/// The Debian vpcd driver.
pub const DEFAULT_DRIVER: &str = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so.0.8";
/// pcsc-lite's compiled-in socket.
pub const SYSTEM_SOCKET: &str = "/run/pcscd/pcscd.comm";
/// Readers per pcscd (pcsc-lite's PCSCLITE_MAX_READERS_CONTEXTS): each slot of a vpcd entry
/// counts as one reader. Measured on Debian 12 (pcsc-lite 1.9.9), 7 December: 16 readers
/// start, a 17th leaves pcscd never serving the rest.
pub const MAX_READERS: usize = 16;
/// Reader entries per pcscd (two slots each).
pub const MAX_ENTRIES: usize = MAX_READERS / 2;
/// Encoders and QC stations per simulation.
pub const MAX_ENCODERS: usize = MAX_READERS;

/// Where the simulated pcscd listens for clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketMode {
    /// `<work_dir>/run/pcscd.comm`, through a private mount namespace (needs root).
    Private,
    /// pcsc-lite's default socket; refused if a daemon already serves it.
    System,
}

/// Simulation parameters.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Number of virtual encoders (1..=32).
    pub encoders: usize,
    /// Number of QC station readers on the machine's line (0 = no line: cards leave the
    /// encoders into their slots' trays). Encoders + stations ≤ [`MAX_READERS`].
    pub qc_stations: usize,
    /// Directory for the reader config, driver copies, socket and pcscd log.
    pub work_dir: PathBuf,
    /// Socket placement.
    pub socket: SocketMode,
    /// The vpcd driver to copy.
    pub driver: PathBuf,
    /// First vpcd port; `None` picks a free range.
    pub base_port: Option<u16>,
    /// How long to wait for pcscd to come up.
    pub start_timeout: Duration,
    /// Start pcscd with `-d` (debug messages in the log); also set by the environment
    /// variable `CARDPIPE_PCSCD_DEBUG`.
    pub pcscd_debug: bool,
}

impl SimConfig {
    /// Private socket, Debian driver, free ports.
    pub fn new(encoders: usize, work_dir: impl Into<PathBuf>) -> Self {
        Self {
            encoders,
            qc_stations: 0,
            work_dir: work_dir.into(),
            socket: SocketMode::Private,
            driver: PathBuf::from(DEFAULT_DRIVER),
            base_port: None,
            start_timeout: Duration::from_secs(10),
            pcscd_debug: std::env::var_os("CARDPIPE_PCSCD_DEBUG").is_some(),
        }
    }
}

/// Why a simulation could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// Zero encoders, or more readers in all than one pcscd serves.
    #[error(
        "{0} readers requested (encoders + QC stations); one pcscd serves 1 to {MAX_READERS} \
         (pcsc-lite's PCSCLITE_MAX_READERS_CONTEXTS): run another simulation for more"
    )]
    EncoderCount(usize),
    /// A required program or file is missing (package not installed).
    #[error("{what} not found ({hint})")]
    Missing {
        /// The program or file.
        what: String,
        /// How to get it.
        hint: &'static str,
    },
    /// File system error while preparing the config.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// No free port range for the vpcd slots.
    #[error("no free TCP port range for {0} vpcd slots")]
    NoPorts(usize),
    /// A pcscd already serves the system socket.
    #[error("a pcscd already serves {SYSTEM_SOCKET}")]
    SystemSocketBusy,
    /// pcscd did not come up; the tail of its log.
    #[error("pcscd did not start: {0}")]
    Start(String),
    /// This process's PC/SC client library would talk to another daemon.
    #[error("PCSCLITE_CSOCK_NAME is {actual:?}, the simulation serves {expected}")]
    ClientSocket {
        /// The simulation's socket.
        expected: String,
        /// What the environment says.
        actual: Option<String>,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SimError {
    let context = context.into();
    move |source| SimError::Io { context, source }
}

/// One virtual encoder: its PC/SC reader name, its vpcd port and its card slot.
#[derive(Debug)]
pub struct VirtualEncoder {
    /// Reader name as pcscd reports it.
    pub reader: String,
    /// vpcd port of the slot.
    pub port: u16,
    slot: VpcdSlot,
}

impl VirtualEncoder {
    /// The card slot.
    pub fn slot(&self) -> &SlotHandle {
        self.slot.handle()
    }
}

/// A running simulation; stops pcscd and the slots on drop.
#[derive(Debug)]
pub struct Simulation {
    child: Option<Child>,
    encoders: Vec<VirtualEncoder>,
    stations: Vec<VirtualEncoder>,
    line: Option<Arc<CardLine>>,
    socket: PathBuf,
    mode: SocketMode,
    log: PathBuf,
}

/// Finds `program` in PATH (or /usr/sbin, where Debian puts pcscd).
fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// TCP ports in LISTEN state (from /proc/net/tcp and tcp6).
fn listening_ports() -> Vec<u16> {
    let mut out = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 3
                && cols[3] == "0A"
                && let Some(port) = cols[1]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            {
                out.push(port);
            }
        }
    }
    out
}

fn free_range(count: usize) -> Option<u16> {
    let start = 36000 + (std::process::id() % 200) as u16 * 64;
    (0..400u16)
        .map(|i| 36000 + (start - 36000 + i * 64) % 25000)
        .find(|&base| (0..count as u16).all(|k| TcpListener::bind(("0.0.0.0", base + k)).is_ok()))
}

/// Whether a live daemon answers on the system socket.
fn system_socket_busy() -> bool {
    Path::new(SYSTEM_SOCKET).exists()
        && std::os::unix::net::UnixStream::connect(SYSTEM_SOCKET).is_ok()
}

/// Whether this process may create a private mount namespace with a bind mount (root with
/// CAP_SYS_ADMIN); probed once with `unshare`. `CARDPIPE_SIM_NO_NAMESPACE` forces the
/// fallback (to test it, or where the probe misleads).
fn private_mounts_allowed() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED.get_or_init(|| {
        std::env::var_os("CARDPIPE_SIM_NO_NAMESPACE").is_none()
            && Command::new("unshare")
                .args([
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    "mount -t tmpfs none /mnt",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
    })
}

fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

impl Simulation {
    /// Prepares the reader config, starts pcscd and the virtual card slots (empty; insert
    /// cards with [`VirtualEncoder::slot`], a [`crate::vpcd::SlotFeed`] or
    /// [`Self::auto_feed`]).
    pub fn start(cfg: SimConfig) -> Result<Self, SimError> {
        if cfg.encoders == 0 || cfg.encoders + cfg.qc_stations > MAX_ENCODERS {
            return Err(SimError::EncoderCount(cfg.encoders + cfg.qc_stations));
        }
        let hint = "apt-get install pcscd vsmartcard-vpcd";
        let pcscd = find_program("pcscd").ok_or(SimError::Missing {
            what: "pcscd".into(),
            hint,
        })?;
        if !cfg.driver.is_file() {
            return Err(SimError::Missing {
                what: cfg.driver.display().to_string(),
                hint,
            });
        }
        // Encoders first, then the QC stations, each kind on entries of its own (a vpcd
        // entry serves two slots) so every reader's name says what it is.
        let kinds = [
            ("Encoder", "encoder", cfg.encoders),
            ("QC Station", "qc-station", cfg.qc_stations),
        ];
        let entries: usize = kinds.iter().map(|(_, _, n)| n.div_ceil(2)).sum();
        let conf = cfg.work_dir.join("reader.conf.d");
        let drivers = cfg.work_dir.join("drivers");
        let run = cfg.work_dir.join("run");
        for d in [&conf, &drivers, &run] {
            let _ = fs::remove_dir_all(d);
            fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
        }
        let base = match cfg.base_port {
            Some(b) => b,
            None => free_range(entries * 2).ok_or(SimError::NoPorts(entries * 2))?,
        };
        let mut readers = Vec::new();
        let mut entry_no = 0usize;
        for (friendly, file, count) in kinds {
            let mut made = 0;
            for e in 0..count.div_ceil(2) {
                let lib = drivers.join(format!("libifdvpcd-{:02}.so", entry_no + 1));
                fs::copy(&cfg.driver, &lib)
                    .map_err(io(format!("copying the driver to {}", lib.display())))?;
                let port = base + 2 * entry_no as u16;
                let entry = format!(
                    "FRIENDLYNAME \"{friendly} {n:02}\"\nDEVICENAME   /dev/null:{port}\nLIBPATH      {lib}\nCHANNELID    {port}\n",
                    n = e + 1,
                    lib = lib.display()
                );
                let path = conf.join(format!("{file}-{:02}", e + 1));
                fs::write(&path, entry).map_err(io(format!("writing {}", path.display())))?;
                for slot in 0..2 {
                    if made < count {
                        readers.push((
                            format!("{friendly} {:02} 00 {:02}", e + 1, slot),
                            port + slot as u16,
                        ));
                        made += 1;
                    }
                }
                entry_no += 1;
            }
        }
        let log = cfg.work_dir.join("pcscd.log");
        let log_file = fs::File::create(&log).map_err(io("creating the pcscd log"))?;
        let log_err = log_file.try_clone().map_err(io("cloning the log handle"))?;
        let (mut cmd, socket) = match cfg.socket {
            SocketMode::Private if private_mounts_allowed() => {
                let unshare = find_program("unshare").ok_or(SimError::Missing {
                    what: "unshare".into(),
                    hint: "util-linux",
                })?;
                let mut c = Command::new(unshare);
                c.args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg("mkdir -p /run/pcscd && mount --bind \"$0\" /run/pcscd && exec \"$1\" -f -c \"$2\" $3")
                    .arg(&run)
                    .arg(&pcscd)
                    .arg(&conf)
                    .arg(if cfg.pcscd_debug { "-d" } else { "" });
                (c, run.join("pcscd.comm"))
            }
            SocketMode::Private => {
                // No mount namespace here (a container without CAP_SYS_ADMIN): serve on the
                // system socket, refused if another daemon owns it, and point the private
                // path at it, so clients configured for the private path still connect.
                if system_socket_busy() {
                    return Err(SimError::SystemSocketBusy);
                }
                let link = run.join("pcscd.comm");
                std::os::unix::fs::symlink(SYSTEM_SOCKET, &link)
                    .map_err(io(format!("linking {}", link.display())))?;
                tracing::warn!(
                    "mount namespaces not permitted: simulated pcscd uses {SYSTEM_SOCKET}"
                );
                let mut c = Command::new(&pcscd);
                c.arg("-f").arg("-c").arg(&conf);
                if cfg.pcscd_debug {
                    c.arg("-d");
                }
                (c, link)
            }
            SocketMode::System => {
                if system_socket_busy() {
                    return Err(SimError::SystemSocketBusy);
                }
                let mut c = Command::new(&pcscd);
                c.arg("-f").arg("-c").arg(&conf);
                if cfg.pcscd_debug {
                    c.arg("-d");
                }
                (c, PathBuf::from(SYSTEM_SOCKET))
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .map_err(io("starting pcscd"))?;
        let mut sim = Simulation {
            child: Some(child),
            encoders: Vec::new(),
            stations: Vec::new(),
            line: None,
            socket,
            mode: cfg.socket.clone(),
            log,
        };
        sim.wait_ready(&readers, cfg.start_timeout)?;
        for (i, (reader, port)) in readers.into_iter().enumerate() {
            let slot = VpcdSlot::start(SocketAddr::from(([127, 0, 0, 1], port)));
            let encoder = VirtualEncoder { reader, port, slot };
            if i < cfg.encoders {
                sim.encoders.push(encoder);
            } else {
                sim.stations.push(encoder);
            }
        }
        if cfg.qc_stations > 0 {
            let line = CardLine::new(
                sim.stations
                    .iter()
                    .map(|s| (s.reader.clone(), s.slot().clone()))
                    .collect(),
            );
            for e in &sim.encoders {
                e.slot().set_output(Some(line.output()));
            }
            sim.line = Some(line);
        }
        tracing::info!(encoders = sim.encoders.len(), socket = %sim.socket.display(), "simulated encoders up");
        Ok(sim)
    }

    fn wait_ready(&mut self, readers: &[(String, u16)], timeout: Duration) -> Result<(), SimError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(SimError::Start(format!(
                    "pcscd exited with {status}\n{}",
                    log_tail(&self.log)
                )));
            }
            let ports = listening_ports();
            if self.socket.exists() && readers.iter().all(|(_, p)| ports.contains(p)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(SimError::Start(format!(
                    "not ready after {timeout:?}\n{}",
                    log_tail(&self.log)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The socket clients must use (`PCSCLITE_CSOCK_NAME`).
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The pcscd log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// pcscd's process id.
    pub fn pcscd_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The virtual encoders.
    pub fn encoders(&self) -> &[VirtualEncoder] {
        &self.encoders
    }

    /// Reader names in encoder order.
    pub fn readers(&self) -> Vec<String> {
        self.encoders.iter().map(|e| e.reader.clone()).collect()
    }

    /// Whether this process's PC/SC client library talks to this simulation's pcscd.
    pub fn check_client_env(&self) -> Result<(), SimError> {
        let actual = std::env::var("PCSCLITE_CSOCK_NAME").ok();
        let ok = match (&self.mode, &actual) {
            (SocketMode::System, None) => true,
            (_, Some(a)) => Path::new(a) == self.socket,
            (SocketMode::Private, None) => false,
        };
        if ok {
            Ok(())
        } else {
            Err(SimError::ClientSocket {
                expected: self.socket.display().to_string(),
                actual,
            })
        }
    }

    /// A PC/SC encoder on virtual encoder `i` whose feed takes blanks from `stock`.
    pub fn pcsc_encoder(
        &self,
        ctx: crate::pcsc::Context,
        i: usize,
        stock: Arc<BlankStock>,
    ) -> Result<PcscEncoder, ReaderError> {
        let enc = &self.encoders[i];
        PcscEncoder::new(ctx, &enc.reader, Some(Box::new(enc.slot().feed(stock))))
    }

    /// Standalone mode: every slot refills itself from `stock` (see
    /// [`SlotHandle::set_auto_feed`]).
    pub fn auto_feed(&self, stock: Arc<BlankStock>) {
        for e in &self.encoders {
            e.slot().set_auto_feed(Some(stock.clone()));
        }
    }

    /// The QC station readers (empty without `qc_stations`).
    pub fn stations(&self) -> &[VirtualEncoder] {
        &self.stations
    }

    /// The machine's line (transport + QC stations), when it has QC stations.
    pub fn line(&self) -> Option<&Arc<CardLine>> {
        self.line.as_ref()
    }

    /// Stops the slots (cards removed), then pcscd (SIGTERM, SIGKILL after 3 s).
    pub fn stop(&mut self) {
        self.encoders.clear();
        self.stations.clear();
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Simulation {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More readers than one pcscd serves are refused at once, with the reason, instead of a
    /// pcscd that never comes up ("not ready after 10s").
    #[test]
    fn more_readers_than_pcscd_serves_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = SimConfig::new(8, dir.path());
        cfg.qc_stations = MAX_READERS - 8 + 1;
        let Err(err) = Simulation::start(cfg) else {
            panic!("17 readers accepted");
        };
        assert!(matches!(err, SimError::EncoderCount(17)), "{err:?}");
        assert!(err.to_string().contains("1 to 16"), "{err}");
        let Err(err) = Simulation::start(SimConfig::new(0, dir.path())) else {
            panic!("0 encoders accepted");
        };
        assert!(matches!(err, SimError::EncoderCount(0)), "{err:?}");
    }
}
