//! Issue 18 item 4: the README's distributed examples, run exactly as written.
//!
//! The test reads README.md and takes its commands from there, not from a copy:
//!
//! * "Running distributed": the `export` lines (placeholders such as `...`, `<64 hex digits>`
//!   and the compose host names `db`, `mq`, `minio` filled with this machine's PostgreSQL,
//!   RabbitMQ and S3 server and fresh secrets; every other value kept as written), then
//!   `cardpipe migrate`, `cardpipe pki init` (the PKI material every process opens; the
//!   workers and `serve` refuse to generate it), `cardpipe worker <stage>` for the stages the
//!   other examples do not start (keys, shipping) and `cardpipe serve`;
//! * "Quality control": `cardpipe encoders simulate --count 8 --qc-stations 2` and the two
//!   worker lines with `PCSCLITE_CSOCK_NAME=...` set to the socket the simulator printed (the
//!   line controller address kept as written, checked against what the simulator printed);
//!   the `cardpipe stock receive` line, by the operator it names;
//! * "Sharded dedup": the `[dedup]` settings and the three `cardpipe worker dedup*` lines.
//!
//! Real fingerprints enter through the registry API: four people (FVC2002 DB1–DB4, impression
//! 1, ten fingers each) and DB1's person again (impression 2). Four cards are made on the
//! simulated line through pcscd and pass QC at its stations; the fifth application is
//! `possible_duplicate` (found across processes, over the broker's shard scatter). Then the
//! stock books balance and every process stops cleanly on SIGTERM, the simulator with its pcscd.
//!
//! A README edit that adds an environment variable with a placeholder, renames a command or
//! drops one of these examples fails here with what to change.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cardpipe_common::store::Store;
use cardpipe_common::testing;

mod common;

use common::{
    Running, Started, cli_env as cli, free_port, random_digits, random_hex, settle_people,
    simulator_started, stop_all, submit_people, wait_ready,
};

const TOKEN: &str = "readme-distributed-registry-token-42";
/// Generous: eleven processes and a pcscd line on 2 shared cores.
const SETTLE: Duration = Duration::from_secs(600);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn readme() -> String {
    std::fs::read_to_string(workspace().join("README.md")).expect("README.md")
}

/// Splits a command line as a POSIX shell would for these examples: whitespace separates,
/// double quotes group, and a `<placeholder with spaces>` is one word.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_quotes = false;
    let mut in_angle = false;
    let mut started = false;
    for c in line.chars() {
        match c {
            '"' if !in_angle => {
                in_quotes = !in_quotes;
                started = true;
            }
            '<' if !in_quotes => {
                in_angle = true;
                word.push(c);
                started = true;
            }
            '>' if in_angle => {
                in_angle = false;
                word.push(c);
            }
            c if c.is_whitespace() && !in_quotes && !in_angle => {
                if started {
                    out.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            c => {
                word.push(c);
                started = true;
            }
        }
    }
    if started {
        out.push(word);
    }
    out
}

/// Drops a trailing `# comment` (outside quotes and placeholders) and the indentation.
fn without_comment(line: &str) -> &str {
    let (mut in_quotes, mut in_angle) = (false, false);
    for (i, c) in line.char_indices() {
        match c {
            '"' => in_quotes = !in_quotes,
            '<' => in_angle = true,
            '>' => in_angle = false,
            '#' if !in_quotes && !in_angle => return line[..i].trim(),
            _ => {}
        }
    }
    line.trim()
}

/// Logical lines (a trailing `\` continues the line) of `text`, comments dropped.
fn logical_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for raw in text.lines() {
        let line = without_comment(raw);
        if let Some(head) = line.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(line);
            if !current.trim().is_empty() {
                out.push(current.trim().to_owned());
            }
            current.clear();
        }
    }
    out
}

/// The README section that starts at the heading `title` (up to the next `## `).
fn section<'a>(readme: &'a str, title: &str) -> &'a str {
    let start = readme
        .find(&format!("\n## {title}"))
        .unwrap_or_else(|| panic!("README has no section \"## {title}\""));
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    &rest[..end]
}

/// The first fenced ```sh block of `text`.
fn sh_block(text: &str) -> &str {
    let start = text.find("```sh\n").expect("a ```sh block") + "```sh\n".len();
    let end = text[start..].find("```").expect("the block's end") + start;
    &text[start..end]
}

/// The indented (4-space) lines of `text` from the one containing `first` to the end of that
/// indented block.
fn indented_block(text: &str, first: &str) -> String {
    let mut lines = text.lines().skip_while(|l| !l.contains(first));
    let mut out = Vec::new();
    for line in lines.by_ref() {
        if !line.starts_with("    ") {
            break;
        }
        out.push(line);
    }
    assert!(!out.is_empty(), "README: no indented block with {first:?}");
    out.join("\n")
}

/// `VAR=value` words at the front of a command line, and the rest (which must start with
/// `cardpipe`).
fn split_command(line: &str) -> (Vec<(String, String)>, Vec<String>) {
    let ws = words(line);
    let mut env = Vec::new();
    let mut rest = ws.into_iter().peekable();
    while let Some(w) = rest.peek() {
        match w.split_once('=') {
            Some((k, v)) if k.chars().all(|c| c.is_ascii_uppercase() || c == '_') => {
                env.push((k.to_owned(), v.to_owned()));
                rest.next();
            }
            _ => break,
        }
    }
    let args: Vec<String> = rest.collect();
    assert_eq!(
        args.first().map(String::as_str),
        Some("cardpipe"),
        "README: not a cardpipe command: {line}"
    );
    (env, args[1..].to_vec())
}

fn is_placeholder(value: &str) -> bool {
    value == "..." || value.starts_with('<')
}

/// The values this machine gives to the README's placeholders.
struct Machine {
    store_url: String,
    values: BTreeMap<&'static str, String>,
}

impl Machine {
    async fn new() -> Self {
        let (hex, digits) = (random_hex, random_digits);
        let store_url = testing::fresh_postgres_url().await;
        let s3 = testing::s3_settings();
        let values = BTreeMap::from([
            ("CARDPIPE__STORE__URL", store_url.clone()),
            ("CARDPIPE__BROKER__URL", testing::amqp_url()),
            ("CARDPIPE__OBJECTS__ENDPOINT", s3.endpoint.clone()),
            ("CARDPIPE__OBJECTS__ACCESS_KEY", s3.access_key.clone()),
            (
                "CARDPIPE__OBJECTS__SECRET_KEY",
                secrecy::ExposeSecret::expose_secret(&s3.secret_key).to_owned(),
            ),
            ("CARDPIPE__ENVELOPE__MASTER_KEY", hex(32)),
            ("CARDPIPE__ENCODERS__MASTER_KEYS_HEX", hex(48)),
            ("CARDPIPE__ENCODERS__TRANSPORT_ID_PIN", digits(6)),
            ("CARDPIPE__ENCODERS__TRANSPORT_SIGN_PIN", digits(6)),
            ("CARDPIPE__ENCODERS__TRANSPORT_PUK", digits(8)),
        ]);
        Self { store_url, values }
    }

    /// The value of `key` as the README exports it, or this machine's for a placeholder or a
    /// compose host name.
    fn fill(&self, key: &str, written: &str) -> String {
        let compose_host = ["@db:", "@mq:", "//minio:"]
            .iter()
            .any(|h| written.contains(h));
        if is_placeholder(written) || compose_host {
            self.values.get(key).cloned().unwrap_or_else(|| {
                panic!(
                    "README exports {key}={written}: a placeholder this test has no value for \
                     (add one in Machine::new)"
                )
            })
        } else {
            written.to_owned()
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_distributed_line_qc_and_sharded_dedup_examples_run_as_written() {
    let readme = readme();
    let machine = Machine::new().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pipeline.toml"),
        format!(
            "[[registry.clients]]\nname = \"readme-registry\"\ntoken_sha256 = \"{}\"\n",
            cardpipe_registry::config::hash_token(TOKEN)
        ),
    )
    .unwrap();

    // "Running distributed": the environment and the commands.
    let distributed = logical_lines(sh_block(section(&readme, "Running distributed")));
    let mut env: Vec<(String, String)> = Vec::new();
    let mut commands = Vec::new();
    for line in &distributed {
        if let Some(exports) = line.strip_prefix("export ") {
            for word in words(exports) {
                let (k, v) = word
                    .split_once('=')
                    .unwrap_or_else(|| panic!("README: export without '=': {word}"));
                env.push((k.to_owned(), machine.fill(k, v)));
            }
        } else {
            commands.push(split_command(line).1);
        }
    }
    let exported: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    for key in [
        "CARDPIPE__STORE__URL",
        "CARDPIPE__BROKER__KIND",
        "CARDPIPE__OBJECTS__KIND",
        "CARDPIPE__ENVELOPE__MASTER_KEY",
        "CARDPIPE__ENCODERS__MASTER_KEYS_HEX",
    ] {
        assert!(exported.contains(&key), "README no longer exports {key}");
    }
    assert_eq!(
        commands,
        [
            vec!["migrate".to_owned()],
            vec!["pki".to_owned(), "init".to_owned()],
            vec!["worker".to_owned(), "<stage>".to_owned()],
            vec!["serve".to_owned()],
        ],
        "README's \"Running distributed\" commands changed: update this test"
    );
    // What a second deployment on the same servers would set anyway: its own queues and
    // bucket (the test servers are shared with other tests).
    env.push((
        "CARDPIPE__BROKER__QUEUE_PREFIX".into(),
        testing::unique("readme-"),
    ));
    env.push((
        "CARDPIPE__OBJECTS__BUCKET".into(),
        testing::unique("cardpipe-readme-"),
    ));

    // "Sharded dedup": [dedup] settings and the workers.
    let sharded = section(&readme, "Sharded dedup");
    let dedup_settings = indented_block(sharded, "[dedup]");
    for line in logical_lines(&dedup_settings).iter().skip(1) {
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("README [dedup] line: {line}"));
        env.push((
            format!("CARDPIPE__DEDUP__{}", key.trim().to_uppercase()),
            value.trim().trim_matches('"').to_owned(),
        ));
    }
    let dedup_workers: Vec<Vec<String>> =
        logical_lines(&indented_block(sharded, "cardpipe worker dedup"))
            .iter()
            .map(|l| split_command(l).1)
            .collect();
    assert_eq!(dedup_workers.len(), 3, "{dedup_workers:?}");

    // "Quality control": the simulated line, the two workers, receiving blank stock.
    let qc_section = section(&readme, "Quality control");
    let line_qc = logical_lines(&indented_block(qc_section, "cardpipe encoders simulate"));
    assert_eq!(line_qc.len(), 3, "{line_qc:?}");
    let stock_receive = logical_lines(&indented_block(qc_section, "cardpipe stock receive"))
        .into_iter()
        .next()
        .expect("README: a `cardpipe stock receive` line");
    let (_, stock_args) = split_command(&stock_receive);
    let operator = stock_args
        .iter()
        .skip_while(|a| *a != "--operator")
        .nth(1)
        .expect("the stock receive line names its --operator")
        .clone();

    let env_refs = |extra: &[(String, String)]| -> Vec<(String, String)> {
        env.iter().chain(extra).cloned().collect()
    };

    // cardpipe migrate; the first operator; blank stock received as the README writes it.
    let (ok, out) = cli(dir.path(), &env, &commands[0], "");
    assert!(ok, "cardpipe migrate: {out}");
    // cardpipe pki init: the PKI material every process opens (none of them generates it).
    let (ok, out) = cli(dir.path(), &env, &commands[1], "");
    assert!(ok, "cardpipe pki init: {out}");
    let password = "a long enough vault password\n";
    let add = ["operators", "add", &operator, "--role", "supervisor"].map(String::from);
    let (ok, out) = cli(dir.path(), &env, &add, password);
    assert!(ok, "operators add {operator}: {out}");
    // "that operator must be signed in on this terminal" (README, operations).
    let login = ["login", &operator].map(String::from);
    let (ok, out) = cli(dir.path(), &env, &login, password);
    assert!(ok, "cardpipe login {operator}: {out}");
    let (ok, out) = cli(dir.path(), &env, &stock_args, "");
    assert!(ok, "{stock_receive}: {out}");

    let start = |line: &str, extra: &[(String, String)], args: &[String]| -> Started {
        let env = env_refs(extra);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Started {
            line: line.to_owned(),
            process: Running::start_reading_stdout(dir.path(), free_port(), &args, &env),
        }
    };

    // The simulator, as written; its socket and line controller from what it prints.
    let (sim_env, sim_args) = split_command(&line_qc[0]);
    assert!(sim_env.is_empty(), "{}", line_qc[0]);
    let mut simulator = start(&line_qc[0], &[], &sim_args);
    let (socket, pcscd_pid, printed) = simulator_started(&mut simulator.process);
    assert!(
        printed.contains("2 QC stations on the line"),
        "{}: {printed}",
        line_qc[0]
    );

    let mut processes = vec![simulator];
    for line in &line_qc[1..] {
        let (mut line_env, args) = split_command(line);
        for (k, v) in &mut line_env {
            if k == "PCSCLITE_CSOCK_NAME" {
                assert!(is_placeholder(v), "{line}");
                *v = socket.clone();
            } else if k == "CARDPIPE__QC__LINE_CONTROLLER" {
                assert!(
                    printed.contains(&format!("line controller: {v}")),
                    "{line}: the simulator's controller is elsewhere: {printed}"
                );
            }
        }
        processes.push(start(line, &line_env, &args));
    }
    for args in &dedup_workers {
        processes.push(start(&format!("cardpipe {}", args.join(" ")), &[], args));
    }
    // `cardpipe worker <stage>` for the stages no other example starts.
    for stage in ["keys", "shipping"] {
        let args = vec!["worker".to_owned(), stage.to_owned()];
        processes.push(start(&format!("cardpipe worker {stage}"), &[], &args));
    }
    let serve_port = free_port();
    let serve = {
        let env = env_refs(&[]);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Started {
            line: "cardpipe serve".into(),
            process: Running::start_reading_stdout(dir.path(), serve_port, &["serve"], &env),
        }
    };
    processes.push(serve);

    let base = format!("http://127.0.0.1:{serve_port}");
    wait_ready(&base, &mut processes, Duration::from_secs(180)).await;

    // Four people and one of them again, real fingerprints, through the registry API; four
    // cards made on the line and passed at its QC stations, the fifth a possible duplicate.
    submit_people(&base, TOKEN, "readme-distributed-1").await;
    let store = Store::connect(&machine.store_url, 2).await.unwrap();
    settle_people(&store, &mut processes, SETTLE).await;
    store.close().await;

    // The stock books balance: every blank issued is a card or spoiled.
    let (ok, out) = cli(dir.path(), &env, &["stock".into(), "report".into()], "");
    assert!(ok, "cardpipe stock report: {out}");

    // Every process stops cleanly; the simulator takes its pcscd with it.
    stop_all(processes, pcscd_pid);
}
