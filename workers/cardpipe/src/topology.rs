//! A whole cardpipe deployment started from this binary, for benchmarks and proving runs.
//!
//! [`Topology::embedded`] is one `cardpipe run` on a fresh data dir (SQLite, in-process
//! broker and encoders). [`Topology::distributed`] is what README "Running distributed"
//! describes, on this machine's services: a fresh PostgreSQL database, its own RabbitMQ queue
//! prefix and S3 bucket (the `CARDPIPE_TEST_*` settings, as the tests use), fresh secrets,
//! `cardpipe migrate`, `cardpipe pki init`, the simulated production line (`cardpipe encoders simulate`: pcscd,
//! vpcd encoders and QC stations), `cardpipe worker <stage>` per stage and replica, and
//! `cardpipe serve`. Services already running are used, never started: a missing one is an
//! error saying which and how to start it.
//!
//! Every process is a child of this one (`std::env::current_exe`), its output in
//! `<work dir>/logs/<name>.log`; each serves `/readyz` on a port of its own. Dropping the
//! topology stops them all: SIGTERM, then SIGKILL after a grace period — so an error, a
//! panic or ctrl-c in the caller leaves nothing running. [`Topology::kill`] and
//! [`Topology::restart`] exist for runs that crash workers on purpose.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use cardpipe_common::broker::rabbitmq::RabbitBroker;
use cardpipe_common::store::Store;
use cardpipe_common::testing;

/// How long a process gets after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// What to start.
#[derive(Debug, Clone)]
pub struct TopologySpec {
    /// Encoders: in-process (embedded) or virtual PC/SC readers (distributed).
    pub encoders: usize,
    /// QC station readers on the simulated line (distributed).
    pub qc_stations: usize,
    /// Worker processes per stage (distributed); stages not named get one.
    pub replicas: BTreeMap<String, usize>,
    /// Blank cards in the lot received at start.
    pub blanks: u64,
    /// Jobs one process handles at once, per stage (`[stages.<name>] concurrency`; the
    /// broker's prefetch is twice that). A personalize process can use only as many encoders,
    /// a QC process as many stations, as it runs jobs at once.
    pub concurrency: BTreeMap<String, usize>,
    /// Extra arguments of `cardpipe encoders simulate` (fault rates: `--tear-rate 0.02`...).
    pub line_args: Vec<String>,
    /// Distributed: the processes reach the services through these `host:port`s instead of
    /// directly (the chaos run's fault proxies); the caller's [`Topology::store_url`] stays
    /// direct.
    pub via: Option<ServiceAddrs>,
    /// `[registry] release_per_minute` of every process (`None`: the configuration's, 2,000
    /// by default). The benchmarks lift it: the release throttle spreads a night over time,
    /// it is no stage's capacity, and at 2,000 a minute it capped a run at 33 applications/s.
    pub release_per_minute: Option<u32>,
}

/// Where the processes of a distributed topology reach PostgreSQL, RabbitMQ and S3.
#[derive(Debug, Clone)]
pub struct ServiceAddrs {
    /// PostgreSQL `host:port`.
    pub postgres: String,
    /// RabbitMQ (AMQP) `host:port`.
    pub rabbitmq: String,
    /// The S3 server's `host:port`.
    pub s3: String,
}

impl TopologySpec {
    /// `CARDPIPE__STAGES__<STAGE>__CONCURRENCY` / `__PREFETCH` for [`TopologySpec::concurrency`],
    /// and the release throttle.
    fn stage_env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        for (stage, n) in &self.concurrency {
            let key = format!(
                "CARDPIPE__STAGES__{}",
                stage.to_uppercase().replace('-', "_")
            );
            env.push((format!("{key}__CONCURRENCY"), n.to_string()));
            env.push((format!("{key}__PREFETCH"), (2 * n).min(1000).to_string()));
        }
        if let Some(per_minute) = self.release_per_minute {
            env.push((
                "CARDPIPE__REGISTRY__RELEASE_PER_MINUTE".to_owned(),
                per_minute.to_string(),
            ));
        }
        env
    }
}

/// One started process and how to start it again.
struct Proc {
    name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    port: Option<u16>,
    child: Child,
}

/// A running deployment; everything in it stops when it is dropped.
pub struct Topology {
    /// The registry API, console and `/metrics` of the HTTP process.
    pub base_url: String,
    /// The bearer token of the registry client configured in this topology.
    pub registry_token: String,
    /// The store every process uses (for the caller's own queries; direct, not through
    /// [`TopologySpec::via`]).
    pub store_url: String,
    /// Whether to drop the PostgreSQL database when the topology stops.
    drop_database: Option<(String, String)>,
    /// Distributed: the RabbitMQ URL and queue prefix whose stage queues are deleted when the
    /// topology is dropped (quorum queues left behind would pile up run after run).
    delete_queues: Option<(String, String)>,
    /// `None` once [`Topology::keep_work_dir`] kept it.
    work: Option<tempfile::TempDir>,
    work_path: PathBuf,
    env: Vec<(String, String)>,
    procs: Vec<Proc>,
}

/// A TCP port free on loopback right now.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `n` random bytes as hex (v4 UUIDs come from the OS's generator).
fn random_hex(n: usize) -> String {
    let mut out = String::new();
    while out.len() < 2 * n {
        out.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    out.truncate(2 * n);
    out
}

/// `n` random decimal digits (transport PINs).
fn random_digits(n: usize) -> String {
    (0..n)
        .map(|_| char::from(b'0' + uuid::Uuid::new_v4().as_bytes()[0] % 10))
        .collect()
}

/// A URL without its user info, for error messages (no password in a message).
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            format!("{scheme}://{host}")
        }
        None => url.to_owned(),
    }
}

/// The host:port of an `http://host:port/...` endpoint.
fn host_port(endpoint: &str) -> String {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    let hostport = rest.split('/').next().unwrap_or(rest);
    if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:80")
    }
}

/// Checks that PostgreSQL, RabbitMQ and the S3 server answer; the error names the one missing
/// and how to start it.
pub async fn check_services() -> anyhow::Result<()> {
    let pg = testing::postgres_admin_url();
    let store = Store::connect(&pg, 1).await.map_err(|e| {
        anyhow::anyhow!(
            "PostgreSQL is not reachable at {} ({e}): start it (tests/services.sh, or \
             `pg_ctlcluster ... main start`) or set CARDPIPE_TEST_POSTGRES_URL",
            redact(&pg)
        )
    })?;
    store.close().await;
    let amqp = testing::amqp_url();
    let broker = cardpipe_common::broker::rabbitmq::RabbitBroker::connect(
        &amqp,
        &testing::unique("cardpipe-check-"),
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "RabbitMQ is not reachable at {} ({e}): start it (tests/services.sh, or \
             `rabbitmq-server -detached`) or set CARDPIPE_TEST_AMQP_URL",
            redact(&amqp)
        )
    })?;
    drop(broker);
    let s3 = testing::s3_endpoint();
    tokio::net::TcpStream::connect(host_port(&s3))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "the S3 server is not reachable at {s3} ({e}): start s3s-fs (tests/services.sh) \
                 or set CARDPIPE_TEST_S3_ENDPOINT"
            )
        })?;
    Ok(())
}

/// A fresh PostgreSQL database on the test server: (its URL, the admin URL, its name).
async fn fresh_database() -> anyhow::Result<(String, String, String)> {
    let admin = testing::postgres_admin_url();
    let store = Store::connect(&admin, 1)
        .await
        .with_context(|| format!("PostgreSQL at {}", redact(&admin)))?;
    let name = testing::unique("cardpipe_bench_");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(store.pool())
        .await
        .context("creating the topology's database")?;
    store.close().await;
    let base = admin
        .rsplit_once('/')
        .map_or(admin.as_str(), |(base, _)| base)
        .to_owned();
    Ok((format!("{base}/{name}"), admin, name))
}

/// The configuration file of every process: one registry client (its token's hash).
fn write_config(dir: &Path, token: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join("pipeline.toml");
    std::fs::write(
        &path,
        format!(
            "[[registry.clients]]\nname = \"bench-registry\"\ntoken_sha256 = \"{}\"\n",
            cardpipe_registry::config::hash_token(token)
        ),
    )?;
    Ok(path)
}

impl Topology {
    fn new(mode: &'static str) -> anyhow::Result<Self> {
        let work = tempfile::Builder::new()
            .prefix(&format!("cardpipe-{mode}-"))
            .tempdir()?;
        std::fs::create_dir_all(work.path().join("logs"))?;
        std::fs::create_dir_all(work.path().join("var"))?;
        let registry_token = random_hex(24);
        let config = write_config(work.path(), &registry_token)?;
        let env = vec![
            (
                "CARDPIPE_CONFIG".to_owned(),
                config.to_string_lossy().into_owned(),
            ),
            (
                "CARDPIPE__DATA_DIR".to_owned(),
                work.path().join("var").to_string_lossy().into_owned(),
            ),
        ];
        let work_path = work.path().to_path_buf();
        Ok(Self {
            base_url: String::new(),
            registry_token,
            store_url: String::new(),
            drop_database: None,
            delete_queues: None,
            work: Some(work),
            work_path,
            env,
            procs: Vec::new(),
        })
    }

    /// Keeps the working directory (logs, configuration, data dir) after the topology stops,
    /// for a run that failed; returns where it is.
    pub fn keep_work_dir(&mut self) -> &Path {
        if let Some(dir) = self.work.take() {
            let _ = dir.keep();
        }
        &self.work_path
    }

    /// One `cardpipe run` on a fresh data dir: every stage in one process.
    pub async fn embedded(spec: &TopologySpec) -> anyhow::Result<Self> {
        let mut t = Self::new("embedded")?;
        let db = t.work_path.join("var").join("cardpipe.db");
        t.store_url = format!("sqlite:{}", db.display());
        t.env.extend([
            ("CARDPIPE__STORE__URL".to_owned(), t.store_url.clone()),
            (
                "CARDPIPE__ENCODERS__COUNT".to_owned(),
                spec.encoders.to_string(),
            ),
            ("CARDPIPE__STOCK__AUTO_LOT".to_owned(), "always".to_owned()),
            (
                "CARDPIPE__STOCK__AUTO_LOT_SIZE".to_owned(),
                spec.blanks.to_string(),
            ),
        ]);
        t.env.extend(spec.stage_env());
        let port = t.spawn("run", &["run"], &[], true)?;
        t.base_url = format!("http://127.0.0.1:{port}");
        t.wait_ready(Duration::from_secs(180)).await?;
        Ok(t)
    }

    /// README "Running distributed" on this machine's services, with the simulated line.
    pub async fn distributed(spec: &TopologySpec) -> anyhow::Result<Self> {
        check_services().await?;
        let mut t = Self::new("distributed")?;
        let (url, admin, name) = fresh_database().await?;
        t.store_url = url.clone();
        t.drop_database = Some((admin, name));
        let mut s3 = testing::s3_settings();
        let (mut url, mut amqp) = (url, testing::amqp_url());
        let queue_prefix = testing::unique("bench-");
        t.delete_queues = Some((amqp.clone(), queue_prefix.clone()));
        if let Some(via) = &spec.via {
            url = crate::fault_proxy::rewrite_host(&url, &via.postgres);
            amqp = crate::fault_proxy::rewrite_host(&amqp, &via.rabbitmq);
            s3.endpoint = crate::fault_proxy::rewrite_host(&s3.endpoint, &via.s3);
        }
        t.env.extend([
            ("CARDPIPE__STORE__URL".to_owned(), url),
            ("CARDPIPE__BROKER__KIND".to_owned(), "rabbitmq".to_owned()),
            ("CARDPIPE__BROKER__URL".to_owned(), amqp),
            ("CARDPIPE__BROKER__QUEUE_PREFIX".to_owned(), queue_prefix),
            ("CARDPIPE__OBJECTS__KIND".to_owned(), "s3".to_owned()),
            (
                "CARDPIPE__OBJECTS__ENDPOINT".to_owned(),
                s3.endpoint.clone(),
            ),
            ("CARDPIPE__OBJECTS__BUCKET".to_owned(), s3.bucket.clone()),
            (
                "CARDPIPE__OBJECTS__ACCESS_KEY".to_owned(),
                s3.access_key.clone(),
            ),
            (
                "CARDPIPE__OBJECTS__SECRET_KEY".to_owned(),
                secrecy::ExposeSecret::expose_secret(&s3.secret_key).to_owned(),
            ),
            ("CARDPIPE__ENVELOPE__MASTER_KEY".to_owned(), random_hex(32)),
            (
                "CARDPIPE__ENCODERS__MASTER_KEYS_HEX".to_owned(),
                random_hex(48),
            ),
            (
                "CARDPIPE__ENCODERS__TRANSPORT_ID_PIN".to_owned(),
                random_digits(6),
            ),
            (
                "CARDPIPE__ENCODERS__TRANSPORT_SIGN_PIN".to_owned(),
                random_digits(6),
            ),
            (
                "CARDPIPE__ENCODERS__TRANSPORT_PUK".to_owned(),
                random_digits(8),
            ),
            ("CARDPIPE__STOCK__AUTO_LOT".to_owned(), "always".to_owned()),
            (
                "CARDPIPE__STOCK__AUTO_LOT_SIZE".to_owned(),
                spec.blanks.to_string(),
            ),
        ]);
        t.env.extend(spec.stage_env());
        t.run_once("migrate", &["migrate"]).await?;
        // PKI material once, shared by every process (workers refuse to generate their own).
        t.run_once("pki-init", &["pki", "init"]).await?;

        // The simulated line: its pcscd socket and line controller from what it prints.
        let listen = format!("127.0.0.1:{}", free_port()?);
        let count = spec.encoders.to_string();
        let stations = spec.qc_stations.to_string();
        let mut sim_args = vec![
            "encoders",
            "simulate",
            "--count",
            &count,
            "--line-listen",
            &listen,
        ];
        if spec.qc_stations > 0 {
            sim_args.extend(["--qc-stations", &stations]);
        }
        sim_args.extend(spec.line_args.iter().map(String::as_str));
        t.spawn("line", &sim_args, &[], false)?;
        let socket = t
            .wait_for_output(
                "line",
                "export PCSCLITE_CSOCK_NAME=",
                Duration::from_secs(120),
            )
            .await?;
        let socket = socket
            .split_once("PCSCLITE_CSOCK_NAME=")
            .map(|(_, s)| s.trim().to_owned())
            .unwrap_or_default();
        let pcsc = ("PCSCLITE_CSOCK_NAME".to_owned(), socket);

        for stage in crate::stages::NAMES {
            let n = spec.replicas.get(*stage).copied().unwrap_or(1);
            let extra: Vec<(String, String)> = match *stage {
                "personalize" => vec![
                    pcsc.clone(),
                    ("CARDPIPE__ENCODERS__KIND".into(), "pcsc".into()),
                ],
                "qc" if spec.qc_stations > 0 => vec![
                    pcsc.clone(),
                    ("CARDPIPE__QC__STATION".into(), "line".into()),
                    ("CARDPIPE__QC__LINE_CONTROLLER".into(), listen.clone()),
                ],
                _ => Vec::new(),
            };
            for k in 0..n {
                t.spawn(&format!("{stage}-{k}"), &["worker", *stage], &extra, true)?;
            }
        }
        let port = t.spawn("serve", &["serve"], &[], true)?;
        t.base_url = format!("http://127.0.0.1:{port}");
        t.wait_ready(Duration::from_secs(240)).await?;
        Ok(t)
    }

    /// Starts `cardpipe <args>` as process `name`; returns its HTTP port.
    fn spawn(
        &mut self,
        name: &str,
        args: &[&str],
        extra: &[(String, String)],
        http: bool,
    ) -> anyhow::Result<u16> {
        let port = if http { Some(free_port()?) } else { None };
        let mut env = extra.to_vec();
        if let Some(port) = port {
            env.push((
                "CARDPIPE__HTTP__LISTEN".to_owned(),
                format!("127.0.0.1:{port}"),
            ));
        }
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let child = self.start(name, &args, &env)?;
        self.procs.push(Proc {
            name: name.to_owned(),
            args,
            env,
            port,
            child,
        });
        Ok(port.unwrap_or(0))
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.work_path.join("logs").join(format!("{name}.log"))
    }

    fn start(
        &self,
        name: &str,
        args: &[String],
        env: &[(String, String)],
    ) -> anyhow::Result<Child> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))?;
        let exe = std::env::current_exe().context("finding the cardpipe executable")?;
        let mut command = Command::new(exe);
        command
            .args(args)
            .current_dir(&self.work_path)
            .env_remove("CARDPIPE_OPERATOR")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in self.env.iter().chain(env) {
            command.env(k, v);
        }
        command
            .spawn()
            .with_context(|| format!("starting cardpipe {}", args.join(" ")))
    }

    /// Runs `cardpipe <args>` to completion; an error carries the end of its output.
    async fn run_once(&self, name: &str, args: &[&str]) -> anyhow::Result<()> {
        let (ok, output) = self.run_command(name, args).await?;
        if !ok {
            bail!("cardpipe {} failed:\n{output}", args.join(" "));
        }
        Ok(())
    }

    /// Runs `cardpipe <args>` on this topology's configuration to completion: (exit status
    /// success, the end of its output).
    pub async fn run_command(&self, name: &str, args: &[&str]) -> anyhow::Result<(bool, String)> {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let mut child = self.start(name, &args, &[])?;
        let status = tokio::task::spawn_blocking(move || child.wait()).await??;
        Ok((status.success(), self.log_tail(name, 20)))
    }

    /// The last `lines` lines of a process's log.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// An error naming every process that has exited (with the end of its log).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        let mut dead = Vec::new();
        for p in &mut self.procs {
            if let Ok(Some(status)) = p.child.try_wait() {
                dead.push((p.name.clone(), status));
            }
        }
        if dead.is_empty() {
            return Ok(());
        }
        let text: Vec<String> = dead
            .iter()
            .map(|(name, status)| {
                format!(
                    "{name} exited ({status}); its log ends:\n{}",
                    self.log_tail(name, 15)
                )
            })
            .collect();
        bail!("{}", text.join("\n"))
    }

    /// Names of the processes that have exited (a crash, or an exit on an error), for a
    /// caller that restarts them like a supervisor.
    pub fn exited(&mut self) -> Vec<String> {
        let mut exited = Vec::new();
        for p in &mut self.procs {
            if matches!(p.child.try_wait(), Ok(Some(_))) {
                exited.push(p.name.clone());
            }
        }
        exited
    }

    /// Waits for a line containing `needle` in a process's output and returns it.
    async fn wait_for_output(
        &mut self,
        name: &str,
        needle: &str,
        within: Duration,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let text = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_owned());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "{name} printed no {needle:?} within {within:?}; its log ends:\n{}",
                    self.log_tail(name, 15)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until every process with an HTTP port answers `/readyz`.
    pub async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let deadline = Instant::now() + within;
        let ports: Vec<(String, u16)> = self
            .procs
            .iter()
            .filter_map(|p| p.port.map(|port| (p.name.clone(), port)))
            .collect();
        for (name, port) in ports {
            loop {
                // What /readyz said last (which backend is down), for the error.
                let answer = match http
                    .get(format!("http://127.0.0.1:{port}/readyz"))
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => break,
                    Ok(r) => {
                        let status = r.status();
                        let body = r.text().await.unwrap_or_default();
                        format!("{status}: {}", body.trim().replace('\n', ", "))
                    }
                    Err(e) => format!("no answer: {e}"),
                };
                self.check_alive()?;
                if Instant::now() > deadline {
                    bail!(
                        "{name} not ready within {within:?} (/readyz: {answer}); its log ends:\n{}",
                        self.log_tail(&name, 15)
                    );
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        Ok(())
    }

    /// Distributed: the RabbitMQ queue prefix its processes use.
    pub fn queue_prefix(&self) -> Option<&str> {
        self.delete_queues
            .as_ref()
            .map(|(_, prefix)| prefix.as_str())
    }

    /// Names of the started processes (`line`, `serve`, `dedup-0`, ... or `run`).
    pub fn process_names(&self) -> Vec<String> {
        self.procs.iter().map(|p| p.name.clone()).collect()
    }

    /// SIGKILLs process `name` (a crash: no shutdown, in-flight work lost to redelivery).
    pub fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let p = self
            .procs
            .iter_mut()
            .find(|p| p.name == name)
            .with_context(|| format!("no process {name}"))?;
        p.child.kill()?;
        p.child.wait()?;
        Ok(())
    }

    /// Starts process `name` again as it was first started (after [`Topology::kill`] or a
    /// crash).
    pub fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self
            .procs
            .iter()
            .position(|p| p.name == name)
            .with_context(|| format!("no process {name}"))?;
        if matches!(self.procs[i].child.try_wait(), Ok(None)) {
            bail!("{name} is still running");
        }
        let (args, env) = (self.procs[i].args.clone(), self.procs[i].env.clone());
        self.procs[i].child = self.start(name, &args, &env)?;
        Ok(())
    }

    /// Stops every process: SIGTERM to all, then SIGKILL to those still running after the
    /// grace period. Returns the processes that did not stop cleanly.
    pub fn stop(&mut self) -> Vec<String> {
        for p in self.procs.iter_mut().rev() {
            if matches!(p.child.try_wait(), Ok(None)) {
                let _ = Command::new("kill")
                    .args(["-TERM", &p.child.id().to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        let mut unclean = Vec::new();
        for p in self.procs.iter_mut().rev() {
            loop {
                match p.child.try_wait() {
                    Ok(Some(status)) => {
                        if !status.success() {
                            unclean.push(format!("{} ({status})", p.name));
                        }
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    _ => {
                        let _ = p.child.kill();
                        let _ = p.child.wait();
                        unclean.push(format!("{} (killed after {STOP_GRACE:?})", p.name));
                        break;
                    }
                }
            }
        }
        self.procs.clear();
        unclean
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.stop();
        let database = self.drop_database.take();
        let queues = self.delete_queues.take();
        if database.is_some() || queues.is_some() {
            // Best effort, on a runtime of its own (Drop may run outside any runtime).
            let clean_up = async move {
                if let Some((admin, name)) = database
                    && let Ok(store) = Store::connect(&admin, 1).await
                {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(store.pool())
                    .await;
                    store.close().await;
                }
                if let Some((url, prefix)) = queues
                    && let Ok(broker) = RabbitBroker::connect(&url, &prefix).await
                {
                    for stage in crate::stages::NAMES {
                        let _ = broker.delete_stage_queues(stage).await;
                    }
                    broker.close().await;
                }
            };
            let _ = std::thread::spawn(move || {
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    rt.block_on(clean_up);
                }
            })
            .join();
        }
    }
}
