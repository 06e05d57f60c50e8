//! `cardpipe encoders simulate | bench`: virtual card encoders behind a real pcscd, and the
//! encoder-farm benchmark.
//!
//! `simulate` starts pcscd with N vpcd virtual readers (card OS behind each, blanks fed
//! automatically with the configured fault rates and encode time) and keeps them up until
//! ctrl-c. pcscd serves a private socket; workers must be started with the printed
//! `PCSCLITE_CSOCK_NAME` (pcsc-lite reads it once, at process start) and
//! `[encoders] kind = "pcsc"`. With `--qc-stations M` the machine also has a line: finished
//! cards travel to M QC station readers, moved by a line controller that QC workers drive
//! (`[qc] station = "line"`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cardpipe_card::config::{EncodersConfig, SECTION};
use cardpipe_card::farm::{self, Farm, FarmSettings, InProcessSource, PcscSource};
use cardpipe_card::simulate::{SimConfig, Simulation, SocketMode};
use cardpipe_common::config::LoadedConfig;
use clap::{Args, Subcommand};

/// `cardpipe encoders ...`.
#[derive(Debug, Subcommand)]
pub enum EncodersCommand {
    /// Start N virtual encoders (pcscd + vpcd + the card OS) until ctrl-c.
    Simulate(SimulateArgs),
    /// Farm throughput: cards/hour against N × 3600 / t, and utilisation.
    Bench(BenchArgs),
}

/// Fault knobs (default: `[encoders]`).
#[derive(Debug, Args)]
pub struct FaultArgs {
    /// Simulated encode time per card, ms (slow EEPROM).
    #[arg(long)]
    pub encode_time_ms: Option<u64>,
    /// Share of blanks with a dead chip.
    #[arg(long)]
    pub dead_rate: Option<f64>,
    /// Share of blanks pulled out mid-write.
    #[arg(long)]
    pub tear_rate: Option<f64>,
    /// Per-write failure probability.
    #[arg(long)]
    pub write_failure_rate: Option<f64>,
}

/// `cardpipe encoders simulate`.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Number of virtual encoders; with --qc-stations at most 16 readers in all (pcsc-lite).
    #[arg(long, default_value_t = 4)]
    pub count: usize,
    /// Working directory (reader config, driver copies, socket, pcscd.log); default: a
    /// fresh temporary directory.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Serve pcsc-lite's default socket instead of a private one (no other pcscd may run).
    #[arg(long)]
    pub system_socket: bool,
    /// QC station readers on the machine's line: finished cards travel from the encoders to
    /// them, moved by the line controller that `[qc] station = "line"` drives.
    #[arg(long, default_value_t = 0)]
    pub qc_stations: usize,
    /// Where the line controller listens (with --qc-stations).
    #[arg(long, default_value = "127.0.0.1:7431")]
    pub line_listen: std::net::SocketAddr,
    #[command(flatten)]
    pub faults: FaultArgs,
}

/// `cardpipe encoders bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Encoders.
    #[arg(long, default_value_t = 32)]
    pub count: usize,
    /// Encode time per card, ms (the physical t).
    #[arg(long, default_value_t = 8000)]
    pub encode_time_ms: u64,
    /// Time scale (0.01 runs a 8 s card in 80 ms; figures are scaled back).
    #[arg(long, default_value_t = 0.01)]
    pub time_scale: f64,
    /// Cards per encoder.
    #[arg(long, default_value_t = 10)]
    pub cards_per_encoder: usize,
    /// Through real pcscd + vpcd (re-runs cardpipe with PCSCLITE_CSOCK_NAME set).
    #[arg(long)]
    pub pcscd: bool,
    /// Where card keys are generated: "on_card", "off_card", or "both" (one run after the
    /// other on the same farm and timings, so the figures compare).
    #[arg(long, default_value = "both", value_parser = ["on_card", "off_card", "both"])]
    pub generation: String,
    /// On-card runs: chip time to generate one P-256 key pair, ms (scaled like the encode
    /// time; real chips take about 100-200 ms).
    #[arg(long, default_value_t = 150)]
    pub keygen_ms: u64,
    /// On-card runs: CA time per certification request on top of its signing work, ms
    /// (a network hop to an HSM; scaled like the encode time).
    #[arg(long, default_value_t = 50)]
    pub ca_latency_ms: u64,
    /// Internal: the simulation work directory of a re-run.
    #[arg(long, hide = true)]
    pub sim_dir: Option<PathBuf>,
}

/// The benchmark's CA for keys generated on the chip: a throw-away hierarchy in a temporary
/// file keystore, the same proof-of-possession checks and certificate issuance as the
/// personalize stage's, plus a configurable latency.
struct BenchCertifier {
    _dir: tempfile::TempDir,
    issuer: cardpipe_pki::issue::CardIssuer,
    dg1: Vec<u8>,
    latency: Duration,
}

impl BenchCertifier {
    fn new(latency: Duration) -> anyhow::Result<Self> {
        use cardpipe_pki::keystore::{FileKeyStore, KdfParams};
        let dir = tempfile::Builder::new()
            .prefix("cardpipe-bench-ca-")
            .tempdir()?;
        let store = Arc::new(FileKeyStore::create(
            dir.path().join("ca.keystore"),
            &secrecy::SecretString::from(uuid::Uuid::new_v4().simple().to_string()),
            KdfParams::for_tests(),
        )?);
        let now = time::OffsetDateTime::now_utc();
        let hierarchy =
            cardpipe_pki::ca::init(store.as_ref(), &cardpipe_pki::ca::CaConfig::default(), now)?;
        let issuer = cardpipe_pki::issue::CardIssuer::new(
            store,
            &hierarchy,
            &cardpipe_pki::citizen::CitizenProfiles::default(),
        )?;
        let dg1 = cardpipe_pki::lds::encode(&cardpipe_pki::lds::sample_input(1))?.dg1;
        Ok(Self {
            _dir: dir,
            issuer,
            dg1,
            latency,
        })
    }
}

impl cardpipe_card::script::Certifier for BenchCertifier {
    fn challenge(&self, role: cardpipe_pki::citizen::CardKeyRole, public_key: &[u8]) -> Vec<u8> {
        cardpipe_pki::issue::possession_challenge("bench", role, public_key)
    }

    fn certify(
        &self,
        _chip: cardpipe_card::cplc::ChipSerial,
        proofs: [cardpipe_pki::issue::ChipKeyProof; 2],
    ) -> Result<[Vec<u8>; 2], cardpipe_card::script::CertifyError> {
        // The remote CA's round trip (the signing itself is real, below).
        std::thread::sleep(self.latency);
        let [a, s] = self.issuer.certify_on_card(
            "bench",
            &self.dg1,
            &proofs,
            time::OffsetDateTime::now_utc(),
        )?;
        Ok([a.der, s.der])
    }
}

fn section(loaded: &LoadedConfig) -> anyhow::Result<EncodersConfig> {
    loaded
        .section(SECTION)
        .map_err(|errors| anyhow::anyhow!("{}", cardpipe_common::config::describe(&errors)))
}

fn config(loaded: &LoadedConfig, faults: &FaultArgs) -> anyhow::Result<EncodersConfig> {
    let mut cfg = section(loaded)?;
    if let Some(v) = faults.encode_time_ms {
        cfg.encode_time_ms = v;
    }
    if let Some(v) = faults.dead_rate {
        cfg.dead_rate = v;
    }
    if let Some(v) = faults.tear_rate {
        cfg.tear_rate = v;
    }
    if let Some(v) = faults.write_failure_rate {
        cfg.write_failure_rate = v;
    }
    Ok(cfg)
}

/// Runs `cardpipe encoders ...`.
pub async fn run(loaded: LoadedConfig, command: EncodersCommand) -> anyhow::Result<()> {
    match command {
        EncodersCommand::Simulate(args) => simulate(&loaded, args).await,
        EncodersCommand::Bench(args) => bench(&loaded, args).await,
    }
}

async fn simulate(loaded: &LoadedConfig, args: SimulateArgs) -> anyhow::Result<()> {
    let cfg = config(loaded, &args.faults)?;
    let (dir, _guard) = match args.work_dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            (d, None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("cardpipe-encoders-")
                .tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let mut sim_cfg = SimConfig::new(args.count, &dir);
    sim_cfg.qc_stations = args.qc_stations;
    if args.system_socket {
        sim_cfg.socket = SocketMode::System;
    }
    let stock = cfg.blank_stock(&cfg.master_keys()?);
    let sim = tokio::task::spawn_blocking(move || Simulation::start(sim_cfg)).await??;
    sim.auto_feed(stock);
    match sim.pcscd_pid() {
        Some(pid) => println!(
            "{} virtual encoder{} up (pcscd process {pid}):",
            args.count,
            if args.count == 1 { "" } else { "s" }
        ),
        None => println!(
            "{} virtual encoder{} up (the system's pcscd):",
            args.count,
            if args.count == 1 { "" } else { "s" }
        ),
    }
    for r in sim.readers() {
        println!("  {r}");
    }
    if let Some(line) = sim.line() {
        let addr = line.serve(args.line_listen)?;
        let n = sim.stations().len();
        println!(
            "{n} QC station{} on the line:",
            if n == 1 { "" } else { "s" }
        );
        for s in sim.stations() {
            println!("  {}", s.reader);
        }
        if sim.stations().len() % 2 == 1 {
            // vpcd serves readers in pairs: pcscd also lists the pair's second reader.
            println!("  (pcscd also lists this station's twin reader; it never holds a card)");
        }
        println!("line controller: {addr}");
        println!("QC workers: [qc] station = \"line\", line_controller = \"{addr}\"");
        println!("  (CARDPIPE__QC__STATION=line CARDPIPE__QC__LINE_CONTROLLER={addr})");
    }
    println!("pcscd log: {}", sim.log_path().display());
    println!("Start workers with [encoders] kind = \"pcsc\" and:");
    println!(
        "  export PCSCLITE_CSOCK_NAME={}",
        sim.socket_path().display()
    );
    println!("ctrl-c or SIGTERM stops the encoders (and their pcscd).");
    crate::process::wait_for_signal().await;
    println!("stopping");
    tokio::task::spawn_blocking(move || drop(sim)).await?;
    Ok(())
}

async fn bench(loaded: &LoadedConfig, args: BenchArgs) -> anyhow::Result<()> {
    let mut cfg = section(loaded)?;
    let master = Arc::new(cfg.master_keys()?);
    let scale = |ms: u64| Duration::from_secs_f64(ms as f64 / 1000.0 * args.time_scale);
    let scaled = scale(args.encode_time_ms);
    cfg.encode_time_ms = 0;
    cfg.dead_rate = 0.0;
    cfg.tear_rate = 0.0;
    cfg.write_failure_rate = 0.0;
    let image = Arc::new(cardpipe_card::script::sample_image(20_000, 1));
    let opts = cfg.script();
    // The EEPROM's time per APDU comes from the off-card script (t spread over its APDUs);
    // the on-card script sends a few more APDUs and the chip spends keygen_ms per key pair.
    let (apdus, _) = cardpipe_card::bench::apdus_per_card(&image, &master, &opts)?;
    let latency = scaled / apdus.max(1) as u32;
    let keygen = scale(args.keygen_ms);
    let stock = Arc::new(cardpipe_card::reader::BlankStock::new(
        (*master).clone(),
        0xB0,
        move |_| cardpipe_card::card_os::Faults {
            apdu_latency: latency,
            keygen_latency: keygen,
            ..cardpipe_card::card_os::Faults::none()
        },
    ));
    let settings = FarmSettings {
        max_consecutive_failures: 1000,
        acquire_timeout: Duration::from_secs(60),
    };
    let mut _sim = None;
    let farm = if args.pcscd {
        let Some(dir) = args.sim_dir.clone() else {
            // pcsc-lite reads PCSCLITE_CSOCK_NAME at process start: re-run with it set.
            let t = tempfile::Builder::new()
                .prefix("cardpipe-bench-")
                .tempdir()?;
            let status = std::process::Command::new(std::env::current_exe()?)
                .args(std::env::args_os().skip(1))
                .arg("--sim-dir")
                .arg(t.path())
                .env("PCSCLITE_CSOCK_NAME", t.path().join("run/pcscd.comm"))
                .status()?;
            anyhow::ensure!(status.success(), "benchmark run failed: {status}");
            return Ok(());
        };
        let count = args.count;
        let sim =
            tokio::task::spawn_blocking(move || Simulation::start(SimConfig::new(count, dir)))
                .await??;
        sim.check_client_env()?;
        sim.auto_feed(stock);
        _sim = Some(sim);
        Farm::new(
            Box::new(PcscSource {
                insert_timeout: Duration::from_secs(5),
                skip_readers: Vec::new(),
            }),
            settings,
        )
    } else {
        Farm::new(Box::new(InProcessSource::new(args.count, stock)), settings)
    };
    let n = farm.in_service();
    anyhow::ensure!(n == args.count, "{n} encoders found, {} wanted", args.count);
    let cards = args.count * args.cards_per_encoder;
    let limit = n as f64 * 3600.0 / (args.encode_time_ms as f64 / 1000.0);
    println!(
        "encoder farm ({}): {n} encoders, t = {} ms (scale {}), {apdus} APDUs/card off-card, {cards} cards per run",
        if args.pcscd {
            "pcscd + vpcd"
        } else {
            "in-process"
        },
        args.encode_time_ms,
        args.time_scale
    );
    let runs: &[&str] = match args.generation.as_str() {
        "both" => &["off_card", "on_card"],
        "on_card" => &["on_card"],
        _ => &["off_card"],
    };
    let mut figures = Vec::new();
    for &generation in runs {
        let (run_image, certifier): (
            _,
            Option<Arc<dyn cardpipe_card::script::Certifier + Send + Sync>>,
        ) = if generation == "on_card" {
            let certifier = tokio::task::spawn_blocking({
                let latency = scale(args.ca_latency_ms);
                move || BenchCertifier::new(latency)
            })
            .await??;
            let mut without = cardpipe_card::script::sample_image_without_keys(20_000, 1);
            without.dg1 = certifier.dg1.clone();
            (Arc::new(without), Some(Arc::new(certifier) as _))
        } else {
            (image.clone(), None)
        };
        let busy_before: f64 = farm
            .status()
            .iter()
            .map(|s| s.busy_time.as_secs_f64())
            .sum();
        let (ok, wall) = farm::drive(
            &farm,
            cards,
            run_image,
            master.clone(),
            opts.clone(),
            args.count * 2,
            certifier,
        )
        .await;
        let busy: f64 = farm
            .status()
            .iter()
            .map(|s| s.busy_time.as_secs_f64())
            .sum::<f64>()
            - busy_before;
        let utilisation = busy / (n as f64 * wall.as_secs_f64());
        let per_hour = ok as f64 * 3600.0 / (wall.as_secs_f64() / args.time_scale);
        println!(
            "  {generation:<8} {ok}/{cards} cards: {per_hour:.0} cards/hour vs physical limit {limit:.0} ({:.1} %), encoder utilisation {:.1} % (busy incl. insert/eject{})",
            100.0 * per_hour / limit,
            100.0 * utilisation,
            if generation == "on_card" {
                format!(
                    "; keygen {} ms/pair, CA {} ms + signing, overlapped with writing",
                    args.keygen_ms, args.ca_latency_ms
                )
            } else {
                String::new()
            }
        );
        figures.push((generation, per_hour, utilisation));
    }
    if let [(_, off_rate, off_util), (_, on_rate, on_util)] = figures[..] {
        println!(
            "  on-card / off-card: {:.1} % of the cards per hour, {:.1} % of the utilisation",
            100.0 * on_rate / off_rate,
            100.0 * on_util / off_util
        );
    }
    Ok(())
}
