//! Issue 16 item 4: deploy/compose.yaml runs as written.
//!
//! There is no Docker engine here, so the test plays compose: it reads deploy/.env.example
//! and gives every placeholder secret a fresh value (as an operator filling `.env` would),
//! sets the site's values (the S3 user, the registry client, the line controller and pcscd
//! socket of the production line), interpolates compose.yaml with compose's rules (a missing
//! `${VAR:?message}` fails with the message), resolves its `<<` merge keys, and then runs every
//! cardpipe service's command with exactly its environment (plus the image's, from
//! deploy/Dockerfile) as local processes:
//!
//! * each replica is a "container": a directory of its own holding the image's working
//!   directory (so its own `data_dir`), with each of its volumes linked in at the mount
//!   target (named volumes shared between replicas, `./` paths from deploy/, host paths as
//!   they are); an absolute path in its environment is read inside that directory;
//! * compose's host names are this machine's services: `postgres` is the test PostgreSQL (the
//!   roles and database of the postgres service's environment, created as its init script
//!   deploy/postgres/10-cardpipe-app-role.sh does, suffixed so runs do not collide),
//!   `rabbitmq` the test broker (queues under a prefix of this run), `minio` the S3 server,
//!   `host.docker.internal` (extra_hosts: host-gateway) this machine, and a container's
//!   `0.0.0.0:8080` a free port;
//! * the production line is `cardpipe encoders simulate --count 8 --qc-stations 2` (pcscd +
//!   vpcd, with a line controller): its socket directory is `.env`'s PCSCD_SOCKET_DIR and its
//!   controller QC_LINE_CONTROLLER.
//!
//! The one-shot services (migrate, pki-init) run to completion in their dependency order; a
//! worker started before pki-init refuses to start, naming `cardpipe pki init`. Then every
//! long-running cardpipe service starts with its replicas (2 dedup, 2 keys, 2 QC...), blank
//! stock is received through `serve` (`docker compose exec serve ...`), and four people plus
//! one again (real FVC2002 prints) go through the registry API on `serve`: four cards made
//! on the line and passed at its QC stations, the fifth a possible duplicate. No replica holds
//! PKI material of its own (no generated passphrase, transport key or keystore in any
//! data_dir); the CA keystore is the one on the `pki` volume. Every process stops cleanly.
//!
//! The services compose runs from other images (PostgreSQL, RabbitMQ, MinIO and its init
//! job, Prometheus, blackbox exporter, Grafana) are played by the test services; their
//! configuration files must exist.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cardpipe_common::store::Store;
use cardpipe_common::testing;

mod common;

use common::compose::{ComposeFile, Image, Service, Vars, parse_env_file, runtime_image};
use common::{
    Running, Started, cli_env, free_port, random_digits, random_hex, settle_people,
    simulator_started, stop_all, submit_people, wait_ready,
};

const TOKEN: &str = "compose-file-registry-token-16";
/// Generous: eleven cardpipe processes and a pcscd line on 2 shared cores.
const SETTLE: Duration = Duration::from_secs(600);

/// The services compose runs from images other than cardpipe's, played here by the test
/// services.
const PLAYED: &[&str] = &[
    "postgres",
    "rabbitmq",
    "minio",
    "minio-init",
    "prometheus",
    "blackbox",
    "grafana",
];

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// deploy/.env.example with every placeholder secret given a fresh value of its shape, and
/// the site values this machine sets (`site`: name → value; a name must be in the file, or
/// mentioned in a comment for an optional one).
fn filled_env(site: &[(&str, String)]) -> Vars {
    let text = read(&deploy().join(".env.example"));
    let mut vars = Vars::new();
    for (key, value) in parse_env_file(&text).expect(".env.example parses") {
        let mut v = value
            .replace("change-me-64-hex-digits", &random_hex(32))
            .replace("change-me-96-hex-digits", &random_hex(48))
            .replace("change-me-6-digits", &random_digits(6))
            .replace("change-me-8-digits", &random_digits(8));
        if v.contains("change-me") {
            // Passwords and user names: URL-safe, as the file asks.
            v = format!("x{}", random_hex(12));
        }
        vars.insert(key, v);
    }
    for (key, value) in site {
        assert!(
            vars.contains_key(*key) || text.contains(&format!("# {key}=")),
            ".env.example does not mention {key}"
        );
        vars.insert((*key).to_owned(), value.clone());
    }
    vars
}

/// This machine playing compose's world: the backing services, the volumes and the
/// replicas' directories.
struct World {
    deploy: PathBuf,
    image: Image,
    /// Named volumes (one directory each) and the replicas' "containers".
    dir: tempfile::TempDir,
    tag: String,
    admin: reqwest::Url,
    queue_prefix: String,
    declared_volumes: BTreeSet<String>,
    /// compose's PostgreSQL role and database names → this run's.
    pg_names: BTreeMap<String, String>,
}

/// One replica of a cardpipe service, ready to run.
struct Replica {
    name: String,
    workdir: PathBuf,
    port: u16,
    env: Vec<(String, String)>,
    args: Vec<String>,
}

impl World {
    fn pg_name(&self, compose_name: &str) -> String {
        self.pg_names.get(compose_name).cloned().unwrap_or_else(|| {
            panic!("PostgreSQL name {compose_name:?} is not the postgres service's")
        })
    }

    /// `value` of `service`'s environment as seen from replica root `root` on port `port`.
    fn translate(
        &self,
        service: &Service,
        root: &Path,
        port: u16,
        key: &str,
        value: &str,
    ) -> String {
        if let Some(inside) = value.strip_prefix('/') {
            return root.join(inside).to_string_lossy().into_owned();
        }
        if let Some(p) = value.strip_prefix("0.0.0.0:") {
            assert_eq!(p, "8080", "{}: {key} listens on {value}", service.name);
            return format!("127.0.0.1:{port}");
        }
        if let Some(p) = value.strip_prefix("host.docker.internal:") {
            assert!(
                service
                    .extra_hosts
                    .iter()
                    .any(|h| h == "host.docker.internal:host-gateway"),
                "{}: {key} names host.docker.internal without extra_hosts host-gateway",
                service.name
            );
            return format!("127.0.0.1:{p}");
        }
        if value.contains("://")
            && let Ok(url) = reqwest::Url::parse(value)
        {
            match url.host_str() {
                Some("postgres") => {
                    let mut mapped = url.clone();
                    mapped.set_host(self.admin.host_str()).unwrap();
                    mapped.set_port(self.admin.port()).unwrap();
                    mapped.set_username(&self.pg_name(url.username())).unwrap();
                    mapped.set_path(&format!("/{}", self.pg_name(&url.path()[1..])));
                    return mapped.to_string();
                }
                Some("rabbitmq") => {
                    self.check_rabbitmq_user(url.username(), &url.path()[1..]);
                    return testing::amqp_url();
                }
                Some("minio") => return testing::s3_endpoint(),
                Some(host) if PLAYED.contains(&host) => {
                    panic!(
                        "{}: {key} names {host}, which this test does not map",
                        service.name
                    )
                }
                _ => {}
            }
        }
        value.to_owned()
    }

    /// The broker user and vhost the services use are the ones rabbitmq/definitions.json
    /// creates, with rights on that vhost.
    fn check_rabbitmq_user(&self, user: &str, vhost: &str) {
        let defs: serde_json::Value =
            serde_json::from_str(&read(&self.deploy.join("rabbitmq/definitions.json"))).unwrap();
        let has = |list: &str, pred: &dyn Fn(&serde_json::Value) -> bool| {
            defs[list].as_array().is_some_and(|a| a.iter().any(pred))
        };
        assert!(
            has("users", &|u| u["name"] == user),
            "definitions.json: no user {user}"
        );
        assert!(
            has("vhosts", &|v| v["name"] == vhost),
            "definitions.json: no vhost {vhost}"
        );
        assert!(
            has("permissions", &|p| p["user"] == user && p["vhost"] == vhost),
            "definitions.json: {user} has no rights on {vhost}"
        );
    }

    /// Replica `index` of `service`: its own root with the volumes linked in.
    fn replica(&self, service: &Service, index: usize) -> Replica {
        let name = format!("{}-{index}", service.name);
        let root = self.dir.path().join("containers").join(&name);
        for (source, target) in &service.volumes {
            let host = if let Some(rel) = source.strip_prefix("./") {
                self.deploy.join(rel)
            } else if source.starts_with('/') {
                PathBuf::from(source)
            } else {
                assert!(
                    self.declared_volumes.contains(source),
                    "{}: volume {source} is not declared under volumes:",
                    service.name
                );
                let dir = self.dir.path().join("volumes").join(source);
                std::fs::create_dir_all(&dir).unwrap();
                dir
            };
            assert!(
                host.exists(),
                "{}: volume source {} missing",
                service.name,
                host.display()
            );
            let at = root.join(target.trim_start_matches('/'));
            std::fs::create_dir_all(at.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(&host, &at).unwrap();
        }
        let workdir = root.join(self.image.workdir.trim_start_matches('/'));
        std::fs::create_dir_all(&workdir).unwrap();
        let port = free_port();
        // The image's environment, then the service's (which wins), as Docker does.
        let mut merged: Vec<(String, String)> = Vec::new();
        for (k, v) in self.image.env.iter().chain(&service.environment) {
            merged.retain(|(key, _)| key != k);
            merged.push((k.clone(), v.clone()));
        }
        let mut env: Vec<(String, String)> = merged
            .iter()
            .map(|(k, v)| (k.clone(), self.translate(service, &root, port, k, v)))
            .collect();
        // What a second deployment on the same broker would set anyway: its own queues (the
        // test broker is shared with other tests).
        env.push((
            "CARDPIPE__BROKER__QUEUE_PREFIX".into(),
            self.queue_prefix.clone(),
        ));
        Replica {
            name,
            workdir,
            port,
            env,
            args: service.command.clone(),
        }
    }

    /// Plays the postgres service's first start: its owner role and database (from its
    /// environment) and deploy/postgres/10-cardpipe-app-role.sh's SQL, as the superuser.
    async fn init_postgres(&mut self, postgres: &Service) {
        let env: BTreeMap<&str, &str> = postgres
            .environment
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let (user, db) = (env["POSTGRES_USER"], env["POSTGRES_DB"]);
        let script = read(&self.deploy.join("postgres/10-cardpipe-app-role.sh"));
        let sql = script
            .split_once("<<'SQL'\n")
            .and_then(|(_, rest)| rest.split_once("\nSQL"))
            .expect("the init script's SQL heredoc")
            .0;
        for name in [user, db, "cardpipe_app"] {
            self.pg_names
                .insert(name.to_owned(), format!("{name}_{}", self.tag));
        }
        let admin = Store::connect(self.admin.as_str(), 1).await.unwrap();
        let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
        for statement in [
            format!(
                "CREATE ROLE {} LOGIN PASSWORD {}",
                self.pg_name(user),
                quote(env["POSTGRES_PASSWORD"])
            ),
            format!(
                "CREATE DATABASE {} OWNER {}",
                self.pg_name(db),
                self.pg_name(user)
            ),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(admin.pool())
                .await
                .unwrap();
        }
        admin.close().await;
        let mut on_db = self.admin.clone();
        on_db.set_path(&format!("/{}", self.pg_name(db)));
        let store = Store::connect(on_db.as_str(), 1).await.unwrap();
        let sql = sql
            .replace(":'app_password'", &quote(env["POSTGRES_APP_PASSWORD"]))
            .replace("cardpipe_app", &self.pg_name("cardpipe_app"))
            .replace(
                &format!("DATABASE {db}"),
                &format!("DATABASE {}", self.pg_name(db)),
            );
        for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            sqlx::query(sqlx::AssertSqlSafe(statement.to_owned()))
                .execute(store.pool())
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e}"));
        }
        store.close().await;
    }

    /// Drops this run's database and roles.
    async fn drop_postgres(&self, postgres: &Service) {
        let env: BTreeMap<&str, &str> = postgres
            .environment
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let admin = Store::connect(self.admin.as_str(), 1).await.unwrap();
        for statement in [
            format!(
                "DROP DATABASE {} WITH (FORCE)",
                self.pg_name(env["POSTGRES_DB"])
            ),
            format!("DROP ROLE {}", self.pg_name("cardpipe_app")),
            format!("DROP ROLE {}", self.pg_name(env["POSTGRES_USER"])),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(admin.pool())
                .await
                .unwrap();
        }
        admin.close().await;
    }
}

/// Starts `replica` as a long-running process.
fn start(replica: &Replica) -> Started {
    let env: Vec<(&str, &str)> = replica
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let args: Vec<&str> = replica.args.iter().map(String::as_str).collect();
    Started {
        line: format!("{}: cardpipe {}", replica.name, replica.args.join(" ")),
        process: Running::start_reading_stdout(&replica.workdir, replica.port, &args, &env),
    }
}

/// Files under `dir` (not following links: the volumes are looked at on their own).
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            files(&path, out);
        } else if kind.is_file() {
            out.push(path);
        }
    }
}

/// Whether a process listening on `port` answers `GET /readyz` with 200 (plain HTTP/1.0 over
/// a socket: the test's runtime is busy with blocking waits here).
fn answers_readyz(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if stream
        .write_all(b"GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200")
}

/// Every `${NAME:?...}` of compose.yaml is set in .env.example, and without one the file
/// does not interpolate: compose's message is the error.
#[test]
fn every_required_variable_is_in_the_env_example_and_a_missing_one_fails_with_its_message() {
    let compose = read(&deploy().join("compose.yaml"));
    let vars = filled_env(&[]);
    let required: BTreeSet<&str> = compose
        .split("${")
        .skip(1)
        .filter_map(|rest| rest.split_once(":?").map(|(name, _)| name))
        .filter(|name| name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .collect();
    assert!(required.contains("PKI_KEYSTORE_PASSPHRASE"), "{required:?}");
    for name in &required {
        assert!(vars.contains_key(*name), ".env.example does not set {name}");
    }
    ComposeFile::parse(&compose, &vars).expect("compose.yaml with the filled .env");
    let mut missing = vars.clone();
    missing.remove("PKI_KEYSTORE_PASSPHRASE");
    let err = ComposeFile::parse(&compose, &missing)
        .err()
        .expect("refused");
    assert!(
        err.contains("PKI_KEYSTORE_PASSPHRASE")
            && err.contains("set PKI_KEYSTORE_PASSPHRASE in deploy/.env"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_compose_file_runs_as_written() {
    let deploy = deploy();
    let image = runtime_image(&read(&deploy.join("Dockerfile")));
    assert!(
        image
            .entrypoint
            .last()
            .is_some_and(|e| e.ends_with("/cardpipe")),
        "the image's entry point is not cardpipe: {:?}",
        image.entrypoint
    );
    let host = tempfile::tempdir().unwrap();

    // .env as this site fills it: fresh secrets, and the site's own values (the S3 user,
    // the registry client, the production line's controller and pcscd socket directory).
    let example = parse_env_file(&read(&deploy.join(".env.example"))).unwrap();
    let s3 = testing::s3_settings();
    let registry_clients = example
        .iter()
        .find(|(k, _)| k == "REGISTRY_CLIENTS")
        .expect(".env.example sets REGISTRY_CLIENTS")
        .1
        .replace(
            "change-me-64-hex-digits",
            &cardpipe_registry::config::hash_token(TOKEN),
        );
    let line_port = free_port();
    let line_dir = host.path().join("line");
    let vars = filled_env(&[
        ("S3_ACCESS_KEY", s3.access_key.clone()),
        (
            "S3_SECRET_KEY",
            secrecy::ExposeSecret::expose_secret(&s3.secret_key).to_owned(),
        ),
        // The test S3 server is shared with other tests: a bucket of this run.
        ("S3_BUCKET", testing::unique("cardpipe-compose-")),
        ("REGISTRY_CLIENTS", registry_clients),
        (
            "QC_LINE_CONTROLLER",
            format!("host.docker.internal:{line_port}"),
        ),
        (
            "PCSCD_SOCKET_DIR",
            line_dir.join("run").to_string_lossy().into_owned(),
        ),
    ]);
    assert!(
        vars.values().all(|v| !v.contains("change-me")),
        "a placeholder is left: {vars:?}"
    );

    // The production line: encoders and QC stations behind pcscd, and its controller. Its
    // blanks carry the card issuer's keys of .env.
    let line_env: Vec<(String, String)> = [
        (
            "ENCODERS_MASTER_KEYS_HEX",
            "CARDPIPE__ENCODERS__MASTER_KEYS_HEX",
        ),
        ("TRANSPORT_ID_PIN", "CARDPIPE__ENCODERS__TRANSPORT_ID_PIN"),
        (
            "TRANSPORT_SIGN_PIN",
            "CARDPIPE__ENCODERS__TRANSPORT_SIGN_PIN",
        ),
        ("TRANSPORT_PUK", "CARDPIPE__ENCODERS__TRANSPORT_PUK"),
    ]
    .iter()
    .map(|(from, to)| ((*to).to_owned(), vars[*from].clone()))
    .collect();
    let line_listen = format!("127.0.0.1:{line_port}");
    let line_work = line_dir.to_string_lossy().into_owned();
    let sim_args = [
        "encoders",
        "simulate",
        "--count",
        "8",
        "--qc-stations",
        "2",
        "--line-listen",
        &line_listen,
        "--work-dir",
        &line_work,
    ];
    let mut simulator = {
        let env: Vec<(&str, &str)> = line_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Started {
            line: format!("the line: cardpipe {}", sim_args.join(" ")),
            process: Running::start_reading_stdout(host.path(), free_port(), &sim_args, &env),
        }
    };
    let (socket, pcscd_pid, printed) = simulator_started(&mut simulator.process);
    assert!(printed.contains("2 QC stations on the line"), "{printed}");
    assert_eq!(
        PathBuf::from(&socket),
        line_dir.join("run/pcscd.comm"),
        "{printed}"
    );

    let compose = ComposeFile::parse(&read(&deploy.join("compose.yaml")), &vars)
        .unwrap_or_else(|e| panic!("compose.yaml: {e}"));
    let services = compose.services().unwrap_or_else(|e| panic!("{e}"));
    let declared_volumes: BTreeSet<String> = compose
        .root
        .get("volumes")
        .and_then(|v| v.as_mapping())
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let (cardpipe, played): (Vec<&Service>, Vec<&Service>) = services
        .iter()
        .partition(|s| s.image.as_deref() == Some("cardpipe:local"));
    // The services other images run: known here, and their configuration files exist.
    for s in &played {
        assert!(
            PLAYED.contains(&s.name.as_str()),
            "compose service {} (image {:?}) is new: teach this test to play it",
            s.name,
            s.image
        );
        for (source, _) in &s.volumes {
            if let Some(rel) = source.strip_prefix("./") {
                assert!(
                    deploy.join(rel).exists(),
                    "{}: {source} does not exist",
                    s.name
                );
            }
        }
    }
    for s in &cardpipe {
        assert!(!s.command.is_empty(), "{} has no command", s.name);
    }

    let mut world = World {
        deploy: deploy.clone(),
        image,
        dir: tempfile::tempdir().unwrap(),
        tag: testing::unique("").to_lowercase(),
        admin: reqwest::Url::parse(&testing::postgres_admin_url()).unwrap(),
        queue_prefix: testing::unique("compose-"),
        declared_volumes,
        pg_names: BTreeMap::new(),
    };
    let postgres = played
        .iter()
        .find(|s| s.name == "postgres")
        .expect("a postgres service");
    world.init_postgres(postgres).await;

    // The one-shot jobs, each after the one-shots it depends on.
    let mut one_shots: Vec<&Service> = cardpipe.iter().copied().filter(|s| s.one_shot).collect();
    let names: Vec<&str> = one_shots.iter().map(|s| s.name.as_str()).collect();
    assert!(
        names.contains(&"migrate") && names.contains(&"pki-init"),
        "one-shot services: {names:?}"
    );
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut ran_keys_early = false;
    while !one_shots.is_empty() {
        let next = one_shots
            .iter()
            .position(|s| {
                s.depends_on.iter().all(|(d, condition)| {
                    done.contains(d)
                        || !cardpipe.iter().any(|c| c.one_shot && c.name == *d)
                        || condition != "service_completed_successfully"
                })
            })
            .expect("the one-shot services depend on one another in a cycle");
        let job = one_shots.remove(next);
        if job.name == "pki-init" {
            // Before it: a worker refuses to start rather than make PKI material of its own.
            let keys = cardpipe
                .iter()
                .find(|s| s.name == "keys")
                .expect("a keys service");
            let replica = world.replica(keys, 99);
            let mut early = start(&replica);
            // It must exit; one that comes up instead (answers /readyz) made or found PKI
            // material without pki-init. A hang is ended by nextest's slow-timeout.
            let status = loop {
                if let Some(status) = early.process.exited() {
                    break status;
                }
                assert!(
                    !answers_readyz(replica.port),
                    "keys started without pki-init"
                );
                std::thread::sleep(Duration::from_millis(200));
            };
            let err = early.process.stderr_so_far();
            assert!(!status.success(), "{err}");
            assert!(err.contains("cardpipe pki init"), "{err}");
            ran_keys_early = true;
        }
        // Every `docker compose up` runs the one-shots again (in a new container): the second
        // run must succeed and change nothing.
        for run in 0..2 {
            let replica = world.replica(job, run);
            let (ok, out) = cli_env(&replica.workdir, &replica.env, &replica.args, "");
            assert!(
                ok,
                "{}: cardpipe {}: {out}",
                job.name,
                replica.args.join(" ")
            );
            if job.name == "pki-init" && run == 1 {
                assert!(out.contains("already exists"), "{out}");
            }
        }
        done.insert(job.name.clone());
    }
    assert!(ran_keys_early);

    // Every long-running cardpipe service, each replica with its own directory.
    let mut processes = vec![simulator];
    let mut serve: Option<Replica> = None;
    let mut started: BTreeMap<String, usize> = BTreeMap::new();
    for s in cardpipe.iter().filter(|s| !s.one_shot) {
        for i in 0..s.replicas {
            let replica = world.replica(s, i);
            processes.push(start(&replica));
            *started.entry(s.name.clone()).or_default() += 1;
            if s.name == "serve" {
                serve = Some(replica);
            }
        }
    }
    for (stage, at_least) in [("dedup", 2), ("keys", 2), ("qc", 2)] {
        assert!(
            started.get(stage).copied().unwrap_or(0) >= at_least,
            "{stage}: {started:?}"
        );
    }
    let serve = serve.expect("a serve service");
    let base_url = format!("http://127.0.0.1:{}", serve.port);
    wait_ready(&base_url, &mut processes, Duration::from_secs(180)).await;

    // Blank stock, as deploy/README.md does it (`docker compose exec serve cardpipe ...`).
    let exec = |args: &[&str], input: &str| {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let (ok, out) = cli_env(&serve.workdir, &serve.env, &args, input);
        assert!(
            ok,
            "docker compose exec serve cardpipe {}: {out}",
            args.join(" ")
        );
    };
    // serve made the first supervisor, `admin`, with its password in serve's data_dir.
    let admin_password = std::fs::read_to_string(serve.workdir.join("var/console-admin-password"))
        .expect("serve wrote var/console-admin-password");
    exec(&["login", "admin"], &format!("{}\n", admin_password.trim()));
    exec(
        &[
            "stock",
            "receive",
            "--supplier",
            "Acme Cards",
            "--chip-type",
            "P-256 eID",
            "--prefix",
            "BLK-",
            "--first",
            "1",
            "--last",
            "500",
            "--operator",
            "admin",
        ],
        "",
    );

    submit_people(&base_url, TOKEN, "compose-file-1").await;
    let store_url = serve
        .env
        .iter()
        .find(|(k, _)| k == "CARDPIPE__STORE__URL")
        .expect("serve's store")
        .1
        .clone();
    let store = Store::connect(&store_url, 2).await.unwrap();
    let submitted = Instant::now();
    let states = settle_people(&store, &mut processes, SETTLE).await;
    eprintln!(
        "replicas started: {started:?}; batch at rest after {:.1} s: {states:?}",
        submitted.elapsed().as_secs_f64()
    );
    assert_eq!(
        states
            .values()
            .filter(|s| *s == "possible_duplicate")
            .count(),
        1,
        "{states:#?}"
    );
    store.close().await;

    // No replica made PKI material (or an envelope key) of its own: the keystore is the pki
    // volume's alone.
    let mut in_containers = Vec::new();
    files(&world.dir.path().join("containers"), &mut in_containers);
    let generated: Vec<&PathBuf> = in_containers
        .iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.contains("passphrase")
                || name.starts_with("pki-transport")
                || name.ends_with(".keystore")
                || name.starts_with("envelope-")
        })
        .collect();
    assert!(
        generated.is_empty(),
        "PKI material in a replica's own files: {generated:?}"
    );
    assert!(
        world.dir.path().join("volumes/pki/ca.keystore").is_file(),
        "the CA keystore is not on the pki volume"
    );

    stop_all(processes, pcscd_pid);
    world.drop_postgres(postgres).await;
}

/// The interpolation rules the test relies on, as compose documents them.
#[test]
fn interpolation_follows_compose() {
    use common::compose::interpolate;
    let vars: Vars = [("SET", "v"), ("EMPTY", "")]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .into();
    let ok = |t: &str| interpolate(t, &vars).unwrap();
    assert_eq!(ok("a ${SET} $SET b"), "a v v b");
    assert_eq!(
        ok("${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d}"),
        "d d  d"
    );
    assert_eq!(ok("${UNSET:-${SET}}"), "v");
    assert_eq!(ok("${SET:+alt} ${EMPTY:+alt} ${EMPTY+alt}"), "alt  alt");
    assert_eq!(ok("$$HOME $${SET}"), "$HOME ${SET}");
    assert_eq!(ok("${EMPTY?m}"), "");
    let err = interpolate("${EMPTY:?set EMPTY please}", &vars).unwrap_err();
    assert!(err.contains("set EMPTY please"), "{err}");
    let err = interpolate("${UNSET?gone}", &vars).unwrap_err();
    assert!(err.contains("gone"), "{err}");
    assert!(interpolate("${UNSET}", &vars).is_err());
    let env = parse_env_file("A=1 # note\nB='x # y'\nexport C=\"q\\\"r\"\n# D=4\n").unwrap();
    assert_eq!(
        env,
        [("A", "1"), ("B", "x # y"), ("C", "q\"r")].map(|(k, v)| (k.to_owned(), v.to_owned()))
    );
}
