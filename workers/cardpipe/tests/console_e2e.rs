//! The operator console in a real browser: headless Chromium driven over WebDriver
//! (chromedriver, raw W3C WebDriver JSON), against `cardpipe run --demo` after it has carried
//! a generated nightly batch through every stage on embedded backends.
//!
//! Signs in as the first supervisor (password from `var/console-admin-password`) on the
//! Persian sign-in page, visits every page in Persian and in English (right to left, Persian
//! digits and Solar Hijri dates in Persian; the dashboard's SVG charts drawn with the demo's
//! figures), then in English adjudicates the planted duplicate with both photos shown,
//! retries parked work, verifies the audit chain. Screenshots go to
//! `<target>/console-screenshots/<page>-fa.png` and `<page>-en.png`. Then `cardpipe audit
//! verify` passes, and catches an entry edited behind the triggers' back.
//!
//! Needs Debian's `chromium` and `chromium-driver` (tests/services.sh installs them): without
//! them the test fails and says so.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use cardpipe_common::store::Store;
use serde_json::{Value, json};
use sqlx::Row;

mod common;

use common::{Running, cli_with_input, free_port};

const APPLICANTS: usize = 12;
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn target_dir() -> PathBuf {
    // <target>/debug/cardpipe → <target>
    Path::new(env!("CARGO_BIN_EXE_cardpipe"))
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// chromedriver, stopped on drop.
struct Driver {
    child: Child,
    base: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn require(binary: &str, package: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/lib/chromium"] {
        let p = Path::new(dir).join(binary);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{binary} is not installed, so the console cannot be tested in a browser. Install it with \
         `apt-get install -y --no-install-recommends {package}` (tests/services.sh does), then rerun."
    );
}

async fn start_driver() -> Driver {
    let chromedriver = require("chromedriver", "chromium-driver");
    require("chromium", "chromium");
    let port = free_port();
    let child = Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let base = format!("http://127.0.0.1:{port}");
    let driver = Driver { child, base };
    for _ in 0..100 {
        if let Ok(r) = reqwest::get(format!("{}/status", driver.base)).await
            && r.status().is_success()
        {
            return driver;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("chromedriver did not answer on {}", driver.base);
}

/// One browser session.
struct Browser {
    http: reqwest::Client,
    session: String,
    shots: PathBuf,
}

impl Browser {
    async fn open(driver: &Driver, shots: PathBuf) -> Self {
        let http = reqwest::Client::new();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1400,1100", "--lang=en-US"]
            }
        }}});
        let r: Value = http
            .post(format!("{}/session", driver.base))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("chromium did not start a WebDriver session: {r}"))
            .to_owned();
        std::fs::create_dir_all(&shots).unwrap();
        Self {
            http,
            session: format!("{}/session/{session}", driver.base),
            shots,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.session));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        if v["value"].get("error").is_some() {
            panic!("WebDriver {path}: {}", v["value"]);
        }
        v["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .call(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("finding {css}: {v}"))
            .to_owned()
    }

    async fn text(&self, css: &str) -> String {
        let e = self.find(css).await;
        self.call(reqwest::Method::GET, &format!("/element/{e}/text"), None)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{e}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// Clicks something that navigates (a link, a form's submit button) and waits until the
    /// page it was on is gone, so the next lookup sees the new page (WebDriver's click does
    /// not always wait for a form submission's navigation).
    async fn click_and_wait(&self, css: &str) {
        let e = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{e}/click"),
            Some(json!({})),
        )
        .await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let r: Value = self
                .http
                .get(format!("{}/element/{e}/name", self.session))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let gone = r["value"].get("error").is_some();
            let ready = self
                .call(
                    reqwest::Method::POST,
                    "/execute/sync",
                    Some(json!({"script": "return document.readyState", "args": []})),
                )
                .await;
            if gone && ready == "complete" {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "clicking {css} did not lead to a new page"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    async fn source(&self) -> String {
        self.call(reqwest::Method::GET, "/source", None)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn script(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
        .await
    }

    async fn screenshot(&self, name: &str) {
        let b64 = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap())
            .unwrap();
        assert!(
            png.starts_with(b"\x89PNG"),
            "screenshot {name} is not a PNG"
        );
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    async fn close(self) {
        let _ = self.http.delete(&self.session).send().await;
    }
}

async fn store(dir: &Path) -> Store {
    let url = format!("sqlite:{}", dir.join("var/cardpipe.db").display());
    Store::connect(&url, 2).await.unwrap()
}

async fn one(store: &Store, sql: &str) -> Option<String> {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_optional(store.pool())
        .await
        .unwrap()
        .map(|r| r.get::<String, _>(0))
}

async fn count(store: &Store, sql: &str) -> i64 {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(store.pool())
        .await
        .unwrap()
        .get::<i64, _>(0)
}

/// Does `text` hold a numeric Solar Hijri date in Persian digits (`۱۴۰۵/۰۹/۱۵`)?
fn has_persian_date(text: &str) -> bool {
    let digit = |c: char| ('۰'..='۹').contains(&c);
    let chars: Vec<char> = text.chars().collect();
    chars.windows(10).any(|w| {
        w[0] == '۱'
            && w[1] == '۴'
            && w[..4].iter().all(|c| digit(*c))
            && w[4] == '/'
            && w[5..7].iter().all(|c| digit(*c))
            && w[7] == '/'
            && w[8..].iter().all(|c| digit(*c))
    })
}

fn has_persian_digits(text: &str) -> bool {
    text.chars().any(|c| ('۰'..='۹').contains(&c))
}

fn cli(dir: &Path, args: &[&str]) -> std::process::Output {
    cli_with_input(dir, args, "")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_in_headless_chromium_after_a_generated_batch() {
    let driver = start_driver().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut run = Running::start(
        dir.path(),
        port,
        &["run", "--demo", &APPLICANTS.to_string()],
        &[],
    );
    run.wait_for("demo: done", Duration::from_secs(300));

    // The first supervisor's password: in a 0600 file, never in the log.
    let password_file = dir.path().join("var/console-admin-password");
    let password = std::fs::read_to_string(&password_file)
        .expect("var/console-admin-password written at start")
        .trim()
        .to_owned();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&password_file)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "password file mode {mode:o}");
    }
    let log = std::fs::read_to_string(dir.path().join("var/cardpipe.log")).unwrap_or_default();
    assert!(
        !log.contains(&password),
        "the admin password appears in the log"
    );

    let db = store(dir.path()).await;
    let duplicate = one(
        &db,
        "SELECT id FROM applications WHERE state = 'possible_duplicate' ORDER BY id LIMIT 1",
    )
    .await
    .expect("the demo plants a re-enrolment that dedup flags");
    let duplicate_registry = one(
        &db,
        &format!("SELECT registry_id FROM applications WHERE id = '{duplicate}'"),
    )
    .await
    .unwrap();
    // Parked work to retry: an application at rest, parked at personalization as the runner
    // records it after the last failed attempt.
    let resting = one(
        &db,
        "SELECT id FROM applications WHERE state NOT IN ('possible_duplicate', 'rejected') ORDER BY id LIMIT 1",
    )
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO parked_jobs (job_id, stage, subject, attempt, error, parked_at)
         VALUES ('job-e2e-1', 'personalize', $1, 5, 'encoder fault: card removed during write', '2026-01-01T00:00:00.000000Z')",
    )
    .bind(&resting)
    .execute(db.pool())
    .await
    .unwrap();

    let shots = target_dir().join("console-screenshots");
    let b = Browser::open(&driver, shots.clone()).await;

    // Unauthenticated: redirected to sign in, in Persian (the default), with the switch.
    b.go(&format!("{base}/console/")).await;
    assert!(
        b.url().await.ends_with("/console/login"),
        "{}",
        b.url().await
    );
    let src = b.source().await;
    assert!(src.contains("lang=\"fa\" dir=\"rtl\""), "{src}");
    assert!(b.text("h1").await.contains("ورود"), "{src}");
    // The Vazirmatn font is loaded from the console itself (the CSP allows only that).
    let fonts = b
        .script(
            "return document.fonts.ready.then(() => Array.from(document.fonts)\
             .filter(f => f.family.includes('Vazirmatn') && f.status === 'loaded').length)",
        )
        .await;
    assert!(
        fonts.as_i64().unwrap_or(0) >= 1,
        "Vazirmatn not loaded: {fonts}"
    );
    b.screenshot("login-fa").await;
    b.click_and_wait("#lang-switch").await;
    assert!(
        b.url().await.ends_with("/console/login"),
        "{}",
        b.url().await
    );
    assert!(b.source().await.contains("lang=\"en\" dir=\"ltr\""));
    b.screenshot("login-en").await;

    // A wrong password is refused (and counted).
    b.type_into("#login-name", "admin").await;
    b.type_into("#login-password", "not-the-password").await;
    b.click_and_wait("#login-submit").await;
    assert!(b.text("#flash").await.contains("wrong login or password"));

    b.type_into("#login-name", "admin").await;
    b.type_into("#login-password", &password).await;
    b.click_and_wait("#login-submit").await;
    assert!(b.url().await.ends_with("/console/"), "{}", b.url().await);
    let total: i64 = b.text("#total-applications").await.parse().unwrap();
    assert!(
        total > APPLICANTS as i64,
        "overview counts {total} applications"
    );
    assert!(b.source().await.contains("possible_duplicate"));

    // Batch detail with its progress.
    b.click_and_wait("a.batch-link").await;
    let batch_url = b.url().await;
    assert!(batch_url.contains("/console/batches/"));
    assert!(b.source().await.contains("class=\"bar\""));

    // Every page in both languages, before anything is changed (the duplicate waits, the
    // parked job is there).
    let pages: Vec<(&str, String)> = vec![
        ("overview", "/console/".into()),
        ("dashboard", "/console/dashboard".into()),
        (
            "batch",
            batch_url[batch_url.find("/console/").unwrap()..].to_owned(),
        ),
        ("search", "/console/search".into()),
        ("application", format!("/console/applications/{duplicate}")),
        ("adjudications", "/console/adjudications".into()),
        (
            "adjudication",
            format!("/console/adjudications/{duplicate}"),
        ),
        ("parked", "/console/parked".into()),
        ("encoders", "/console/encoders".into()),
        ("stock", "/console/stock".into()),
        ("shipments", "/console/shipments".into()),
        ("audit", "/console/audit?verify=1".into()),
        ("not-found", "/console/no-such-page".into()),
    ];
    for lang in ["fa", "en"] {
        for (name, path) in &pages {
            // The switch sets the cookie and comes back to the page.
            b.go(&format!(
                "{base}/console/lang?to={lang}&back={}",
                path.replace('?', "%3F")
                    .replace('=', "%3D")
                    .replace('&', "%26")
            ))
            .await;
            let at = b.url().await;
            assert!(at.ends_with(path.as_str()), "{name}: at {at}, not {path}");
            let src = b.source().await;
            if lang == "fa" {
                assert!(
                    src.contains("lang=\"fa\" dir=\"rtl\""),
                    "{name} is not Persian RTL"
                );
                assert!(
                    *name == "not-found" || src.contains("<bdi dir=\"ltr\">admin</bdi> (سرپرست)"),
                    "{name}: no Persian header"
                );
                let h1 = b.text("h1").await;
                assert!(
                    h1.chars().any(|c| ('\u{0600}'..='\u{06FF}').contains(&c)),
                    "{name}: heading {h1:?} is not Persian"
                );
            } else {
                assert!(
                    src.contains("lang=\"en\" dir=\"ltr\""),
                    "{name} is not English"
                );
                assert!(
                    *name == "not-found" || src.contains("Sign out"),
                    "{name}: no English header"
                );
            }
            match (*name, lang) {
                ("overview", "fa") => {
                    assert!(src.contains("نمای کلی خط تولید"));
                    assert!(has_persian_digits(&b.text("#total-applications").await));
                    assert!(has_persian_date(&src), "overview: no Solar Hijri date");
                }
                ("dashboard", _) => {
                    for id in ["svg-stages", "svg-queues", "svg-yield", "svg-overdue"] {
                        assert!(src.contains(&format!("id=\"{id}\"")), "dashboard: no {id}");
                    }
                    // The demo's state changes are drawn as bars, its cards as yield.
                    assert!(!src.contains("id=\"no-changes\""), "dashboard: no history");
                    assert!(!src.contains("id=\"no-cards\""), "dashboard: no cards");
                    let bars = b
                        .script("return document.querySelectorAll('#svg-stages rect').length")
                        .await;
                    assert!(bars.as_i64().unwrap() > 0, "dashboard: {bars} bars");
                    assert!(src.contains("encoder-01"));
                    if lang == "fa" {
                        assert!(src.contains("درخواست‌ها بر حسب مرحله"));
                        assert!(has_persian_date(&src), "dashboard: no Solar Hijri date");
                    } else {
                        assert!(src.contains("Applications per stage, last 24 hours"));
                        assert!(src.contains(" Tehran"));
                    }
                }
                ("application", "fa") => {
                    assert!(src.contains("تاریخچه") && has_persian_date(&src));
                    assert!(src.contains(&format!("<code dir=\"ltr\">{duplicate}</code>")));
                    assert!(
                        src.contains("dir=\"rtl\" lang=\"fa\""),
                        "names not marked RTL"
                    );
                }
                ("adjudication", "fa") => assert!(src.contains("شست راست")),
                ("adjudication", "en") => assert!(src.contains("right thumb")),
                ("parked", _) => assert!(src.contains("job-e2e-1")),
                ("audit", "fa") => {
                    assert!(b.text("#verify-result").await.contains("زنجیره سالم است"));
                    assert!(has_persian_date(&src), "audit: no Solar Hijri date");
                }
                ("audit", "en") => assert!(b.text("#verify-result").await.contains("intact")),
                ("not-found", "fa") => assert!(src.contains("پیدا نشد")),
                ("not-found", "en") => assert!(src.contains("Not found")),
                _ => {}
            }
            b.screenshot(&format!("{name}-{lang}")).await;
        }
    }
    // English from here on.

    // Search by registry id → application detail: history, Persian names RTL, national code masked.
    b.go(&format!("{base}/console/search")).await;
    b.type_into("#search-q", &duplicate_registry).await;
    b.click_and_wait("#search-submit").await;
    assert!(
        b.url()
            .await
            .ends_with(&format!("/console/applications/{duplicate}"))
    );
    let masked = b.text("#national-code").await;
    assert!(
        masked.len() == 10
            && masked.starts_with("******")
            && masked[6..].bytes().all(|c| c.is_ascii_digit()),
        "national code shown as {masked:?}"
    );
    let page = b.source().await;
    assert!(
        page.contains("dir=\"rtl\" lang=\"fa\""),
        "names not marked RTL"
    );
    assert!(b.text("#history").await.contains("possible_duplicate"));

    // Adjudication: both photos side by side (loaded from the object store), per-finger scores.
    b.go(&format!("{base}/console/adjudications")).await;
    b.click_and_wait(&format!("a.adjudicate-link[href$=\"{duplicate}\"]"))
        .await;
    let widths = b
        .script("return Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
        .await;
    let widths: Vec<i64> = widths
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_i64().unwrap())
        .collect();
    assert!(
        widths.len() >= 2 && widths.iter().all(|w| *w > 0),
        "photos not shown: {widths:?}"
    );
    assert!(b.source().await.contains("right thumb"));
    b.click("#decision-cleared").await;
    b.type_into(
        "#decision-reason",
        "different person: faces and fingers differ",
    )
    .await;
    b.click_and_wait("#decision-submit").await;
    assert!(b.text("#flash").await.contains("decided: cleared"));
    b.screenshot("adjudicated-en").await;
    // The console records the decision; dedup applies it through the outbox (topic
    // dedup.adjudication) within a relay round or two.
    let sql = format!(
        "SELECT actor FROM application_history WHERE application_id = '{duplicate}' AND to_state = 'cleared'"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let actor = loop {
        let actor = one(&db, &sql).await;
        if actor.is_some() || std::time::Instant::now() > deadline {
            break actor;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(actor.as_deref(), Some("operator:admin"));

    // Parked work: retry.
    b.go(&format!("{base}/console/parked")).await;
    assert!(b.source().await.contains("job-e2e-1"));
    b.click_and_wait("form[action$=\"/job-e2e-1/retry\"] button")
        .await;
    assert!(
        b.text("#flash")
            .await
            .contains("job job-e2e-1 sent back to personalize")
    );
    assert!(!b.source().await.contains("job-e2e-1/retry"));
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM parked_jobs WHERE job_id = 'job-e2e-1'"
        )
        .await,
        0
    );

    // Encoders, stock, shipments.
    b.go(&format!("{base}/console/encoders")).await;
    assert!(b.source().await.contains("personalized"));
    for page in ["stock", "shipments"] {
        b.go(&format!("{base}/console/{page}")).await;
        let src = b.source().await;
        assert!(
            src.contains("id=\"not-available\"") || src.contains("rows"),
            "{page} page shows neither tables nor 'not available'"
        );
    }

    // The audit log: every action above, and an intact chain.
    b.go(&format!("{base}/console/audit?verify=1")).await;
    assert!(b.text("#verify-result").await.contains("intact"));
    let src = b.source().await;
    for action in [
        "console.login_failed",
        "console.login",
        "dedup.decide",
        "parked.retry",
        "operator.add",
    ] {
        assert!(src.contains(action), "audit log shows no {action}");
    }
    b.screenshot("audit-after-actions-en").await;

    // Forms without the session's CSRF token are refused.
    let cookie_less = reqwest::Client::new()
        .post(format!("{base}/console/parked/job-x/retry"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("csrf=forged")
        .send()
        .await
        .unwrap();
    assert!(cookie_less.url().path().ends_with("/console/login"));

    b.click_and_wait("header form button").await;
    assert!(b.url().await.contains("/console/login"));
    b.close().await;

    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("cardpipe_console_login_failures_total{reason=\"bad_credentials\"} 1"),
        "login failure not counted"
    );
    run.terminate();

    // The same operations on the command line, each operator signed in with `cardpipe login`.
    let signed_in = cli_with_input(dir.path(), &["login", "admin"], &format!("{password}\n"));
    assert!(
        signed_in.status.success(),
        "{}",
        String::from_utf8_lossy(&signed_in.stderr)
    );
    let add = cli(
        dir.path(),
        &[
            "operators",
            "add",
            "sara",
            "--role",
            "operator",
            "--generate",
            "--as",
            "admin",
        ],
    );
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
    let added = String::from_utf8_lossy(&add.stdout).into_owned();
    let sara_password = added
        .lines()
        .find_map(|l| l.strip_prefix("password (shown once): "))
        .expect("the generated password is printed once")
        .trim()
        .to_owned();
    let sara_in = cli_with_input(
        dir.path(),
        &["login", "sara"],
        &format!("{sara_password}\n"),
    );
    assert!(
        sara_in.status.success(),
        "{}",
        String::from_utf8_lossy(&sara_in.stderr)
    );
    let status = cli(dir.path(), &["ops", "status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success() && text.contains("Applications per state"),
        "{text}"
    );
    let encoders = cli(dir.path(), &["ops", "encoders"]);
    assert!(String::from_utf8_lossy(&encoders.stdout).contains("encoder-01"));
    let batches = cli(dir.path(), &["ops", "batches"]);
    assert!(String::from_utf8_lossy(&batches.stdout).contains("demo-registry"));
    sqlx::query(
        "INSERT INTO parked_jobs (job_id, stage, subject, attempt, error, parked_at)
         VALUES ('job-e2e-2', 'personalize', $1, 5, 'encoder fault', '2026-01-01T00:00:00.000000Z')",
    )
    .bind(&resting)
    .execute(db.pool())
    .await
    .unwrap();
    let listed = cli(dir.path(), &["ops", "parked"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("job-e2e-2"));
    let refused = cli(
        dir.path(),
        &[
            "ops",
            "--as",
            "sara",
            "parked",
            "drop",
            "job-e2e-2",
            "--reason",
            "stale",
        ],
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("needs a supervisor"));
    let retried = cli(
        dir.path(),
        &["ops", "--as", "sara", "parked", "retry", "job-e2e-2"],
    );
    assert!(
        retried.status.success(),
        "{}",
        String::from_utf8_lossy(&retried.stderr)
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM parked_jobs WHERE job_id = 'job-e2e-2'"
        )
        .await,
        0
    );
    let listed = cli(dir.path(), &["audit", "list", "--subject", &resting]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("sara"));

    // `cardpipe audit verify` passes, then catches an entry edited behind the triggers.
    let ok = cli(dir.path(), &["audit", "verify"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("intact"));
    let seq = count(
        &db,
        "SELECT MIN(seq) FROM audit_log WHERE action = 'dedup.decide'",
    )
    .await;
    sqlx::query("DROP TRIGGER audit_log_no_update")
        .execute(db.pool())
        .await
        .unwrap();
    sqlx::query(
        "UPDATE audit_log SET details = '{\"decision\":\"confirmed_duplicate\"}' WHERE seq = $1",
    )
    .bind(seq)
    .execute(db.pool())
    .await
    .unwrap();
    let bad = cli(dir.path(), &["audit", "verify"]);
    let out = String::from_utf8_lossy(&bad.stdout);
    assert!(!bad.status.success(), "tampered chain verified: {out}");
    assert!(out.contains(&format!("entry {seq} was edited")), "{out}");
    db.close().await;

    for lang in ["fa", "en"] {
        for name in [
            "login",
            "overview",
            "dashboard",
            "batch",
            "search",
            "application",
            "adjudications",
            "adjudication",
            "parked",
            "encoders",
            "stock",
            "shipments",
            "audit",
            "not-found",
        ] {
            let png = shots.join(format!("{name}-{lang}.png"));
            assert!(png.exists(), "no screenshot {}", png.display());
        }
    }
    println!("screenshots in {}", shots.display());
}
