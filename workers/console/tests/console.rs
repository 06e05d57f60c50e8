//! The console over HTTP on both backends (SQLite + in-process broker + files, and
//! PostgreSQL + RabbitMQ + S3): the first supervisor, roles, CSRF, the login rate limit,
//! parked work retry / drop / force-fail, encoder service, "not available" pages, office
//! discrepancies resolved by supervisors only, and an audit entry for every action; the
//! console in Persian and English, the language switch, the font and the dashboard.

use cardpipe_common::audit;
use cardpipe_common::broker::{Job, RetryPolicy};
use cardpipe_common::domain::{ApplicationId, ApplicationState, Priority};
use cardpipe_common::runtime::{Services, parked};
use cardpipe_common::store::{NewApplication, Store, Transition};
use cardpipe_common::testing::{self, Mode};
use cardpipe_console::auth::{self, Role};
use cardpipe_console::{ConsoleConfig, router};
use sqlx::Row;

async fn application(services: &Services, id: &str, to: ApplicationState) -> ApplicationId {
    let app = ApplicationId(id.to_owned());
    let now = services.clock.now();
    let mut tx = services.store.begin().await.unwrap();
    Store::insert_application(
        &mut tx,
        &NewApplication {
            id: app.clone(),
            registry_id: format!("REG-{id}"),
            batch_id: None,
            state: ApplicationState::Received,
            priority: Priority::Normal,
        },
        "test",
        now,
    )
    .await
    .unwrap();
    let path = [
        ApplicationState::Received,
        ApplicationState::DedupPending,
        ApplicationState::DedupClear,
        ApplicationState::KeysIssued,
    ];
    for pair in path.windows(2) {
        if pair[0] == to {
            break;
        }
        assert!(
            Store::transition(
                &mut tx,
                &Transition {
                    id: &app,
                    from: pair[0],
                    to: pair[1],
                    stage: "test",
                    attempt: 1,
                    actor: "test",
                    reason: None,
                    at: now,
                },
            )
            .await
            .unwrap()
        );
    }
    tx.commit().await.unwrap();
    app
}

/// Parks a job the way the runner does: on the broker's parking queue and in parked_jobs.
async fn park(services: &Services, stage: &str, subject: &str) -> String {
    services
        .broker
        .declare_stage(stage, &RetryPolicy::default())
        .await
        .unwrap();
    let mut job = Job::new(stage, subject);
    job.attempt = 5;
    job.last_error = Some("encoder fault: card removed".into());
    services.broker.publish_parked(&job).await.unwrap();
    parked::record(services, &job, services.clock.now())
        .await
        .unwrap();
    job.id
}

struct Console {
    base: String,
    stop: tokio_util::sync::CancellationToken,
}

impl Drop for Console {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(services: &Services, data_dir: &std::path::Path) -> Console {
    let config = ConsoleConfig {
        login_max_failures: 3,
        ..ConsoleConfig::default()
    };
    cardpipe_console::prepare(services, &config, data_dir)
        .await
        .expect("first supervisor");
    let app = router(services.clone(), &config, vec!["keys".into()], None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { s.cancelled().await })
            .await
    });
    Console { base, stop }
}

/// A browser-like client that has chosen English (the console's default is Persian).
fn client(base: &str) -> reqwest::Client {
    let jar = std::sync::Arc::new(reqwest::cookie::Jar::default());
    jar.add_cookie_str(
        "cardpipe_lang=en; Path=/console",
        &base.parse::<reqwest::Url>().unwrap(),
    );
    reqwest::Client::builder()
        .cookie_provider(jar)
        .build()
        .unwrap()
}

/// A client without a language cookie (Persian).
fn persian_client() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap()
}

fn csrf_of(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .expect("a form with a csrf token")
        + "name=\"csrf\" value=\"".len();
    page[at..].split('"').next().unwrap().to_owned()
}

/// Signs in; returns the landing page.
async fn login(c: &reqwest::Client, base: &str, login: &str, password: &str) -> (String, String) {
    let form = c
        .get(format!("{base}/console/login"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let res = c
        .post(format!("{base}/console/login"))
        .form(&[
            ("login", login),
            ("password", password),
            ("csrf", &csrf_of(&form)),
        ])
        .send()
        .await
        .unwrap();
    let url = res.url().path().to_owned();
    (url, res.text().await.unwrap())
}

async fn post(c: &reqwest::Client, url: &str, form: &[(&str, &str)]) -> (u16, String, String) {
    let res = c.post(url).form(form).send().await.unwrap();
    let status = res.status().as_u16();
    let at = res.url().as_str().to_owned();
    (status, at, res.text().await.unwrap())
}

async fn page(c: &reqwest::Client, url: &str) -> (u16, String) {
    let res = c.get(url).send().await.unwrap();
    (res.status().as_u16(), res.text().await.unwrap())
}

/// The first supervisor's password: `prepare` has written it before the console serves.
async fn wait_for_admin(dir: &std::path::Path) -> String {
    let path = dir.join(auth::ADMIN_PASSWORD_FILE);
    let p = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{} not written before serving: {e}", path.display()));
    assert!(!p.trim().is_empty());
    p.trim().to_owned()
}

async fn actions_of(services: &Services) -> Vec<(String, String, String)> {
    audit::recent(&services.store, None, 1000)
        .await
        .unwrap()
        .into_iter()
        .rev()
        .map(|e| (e.actor, e.role, e.action))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn console_roles_csrf_rate_limit_and_audited_actions_on_both_backends() {
    for mode in [Mode::Embedded, Mode::Distributed] {
        let (services, _guard) = testing::services(mode, None).await;
        let data = tempfile::tempdir().unwrap();
        let console = serve(&services, data.path()).await;
        let base = console.base.clone();

        // The first supervisor: a random password in a 0600 file; only once.
        let admin_password = wait_for_admin(data.path()).await;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(data.path().join(auth::ADMIN_PASSWORD_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(
            auth::ensure_admin(&services, data.path())
                .await
                .unwrap()
                .is_none()
        );
        let hash: String = sqlx::query("SELECT password_hash FROM operators WHERE login = 'admin'")
            .fetch_one(services.store.pool())
            .await
            .unwrap()
            .get(0);
        assert!(hash.starts_with("$argon2id$"), "{mode:?}");
        assert!(!hash.contains(&admin_password));

        let admin = ("admin", "supervisor");
        auth::add_operator(
            &services,
            "omid",
            Role::Operator,
            "operator-password-1",
            admin,
        )
        .await
        .unwrap();
        auth::add_operator(
            &services,
            "aida",
            Role::Auditor,
            "auditor-password-1",
            admin,
        )
        .await
        .unwrap();
        let dup = auth::add_operator(
            &services,
            "omid",
            Role::Auditor,
            "operator-password-1",
            admin,
        )
        .await;
        assert!(dup.unwrap_err().to_string().contains("already exists"));

        // Unauthenticated pages redirect to the sign-in form.
        let anon = client(&base);
        let res = anon
            .get(format!("{base}/console/parked"))
            .send()
            .await
            .unwrap();
        assert!(res.url().path().ends_with("/console/login"), "{mode:?}");
        let headers = res.headers().clone();
        assert!(
            headers[reqwest::header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .contains("default-src 'none'")
        );

        // The rate limit: after 3 failures, even the right password is refused.
        let omid = client(&base);
        for _ in 0..3 {
            let (at, body) = login(&omid, &base, "omid", "wrong-password-x").await;
            assert!(at.ends_with("/console/login"));
            assert!(body.contains("wrong login or password"), "{body}");
        }
        let (_, body) = login(&omid, &base, "omid", "operator-password-1").await;
        assert!(body.contains("too many failed logins"), "{mode:?}: {body}");
        let metrics = services.metrics.encode();
        assert!(
            metrics.contains("cardpipe_console_login_failures_total{reason=\"bad_credentials\"} 3"),
            "{metrics}"
        );
        assert!(
            metrics.contains("cardpipe_console_login_failures_total{reason=\"rate_limited\"} 1")
        );

        // Set-Cookie: HttpOnly, SameSite=Strict.
        let raw = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let form_res = raw
            .get(format!("{base}/console/login"))
            .send()
            .await
            .unwrap();
        let login_cookie = form_res.headers()[reqwest::header::SET_COOKIE]
            .to_str()
            .unwrap()
            .to_owned();
        let token = login_cookie.split(';').next().unwrap().to_owned();
        let form = form_res.text().await.unwrap();
        let signed = raw
            .post(format!("{base}/console/login"))
            .header(reqwest::header::COOKIE, &token)
            .form(&[
                ("login", "aida"),
                ("password", "auditor-password-1"),
                ("csrf", &csrf_of(&form)),
            ])
            .send()
            .await
            .unwrap();
        let cookies: Vec<String> = signed
            .headers()
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        let session = cookies
            .iter()
            .find(|c| c.starts_with("cardpipe_session=") && !c.starts_with("cardpipe_session=;"))
            .unwrap_or_else(|| panic!("no session cookie: {cookies:?}"));
        assert!(
            session.contains("HttpOnly") && session.contains("SameSite=Strict"),
            "{session}"
        );

        // Parked work to act on.
        let a1 = application(
            &services,
            &format!("app-{}-1", testing::unique("c")),
            ApplicationState::KeysIssued,
        )
        .await;
        let a2 = application(
            &services,
            &format!("app-{}-2", testing::unique("c")),
            ApplicationState::KeysIssued,
        )
        .await;
        let a3 = application(
            &services,
            &format!("app-{}-3", testing::unique("c")),
            ApplicationState::Received,
        )
        .await;
        let j1 = park(&services, "personalize", a1.as_str()).await;
        let j2 = park(&services, "personalize", a2.as_str()).await;
        let j3 = park(&services, "keys", a3.as_str()).await;

        // An auditor reads (audit log included) and changes nothing.
        let aida = client(&base);
        let (at, _) = login(&aida, &base, "aida", "auditor-password-1").await;
        assert!(at.ends_with("/console/"), "{at}");
        let (status, body) = page(&aida, &format!("{base}/console/audit")).await;
        assert_eq!(status, 200, "{body}");
        let (_, parked_page) = page(&aida, &format!("{base}/console/parked")).await;
        let csrf = csrf_of(&parked_page);
        let (status, _, body) = post(
            &aida,
            &format!("{base}/console/parked/{j1}/retry"),
            &[("csrf", &csrf)],
        )
        .await;
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("needs an operator or supervisor"));

        // An operator retries, but may not drop, nor read the audit log; forged forms fail.
        let omid = client(&base);
        auth::add_operator(
            &services,
            "olga",
            Role::Operator,
            "operator-password-2",
            admin,
        )
        .await
        .unwrap();
        let (at, _) = login(&omid, &base, "olga", "operator-password-2").await;
        assert!(at.ends_with("/console/"));
        let (status, _) = page(&omid, &format!("{base}/console/audit")).await;
        assert_eq!(status, 403);
        let (_, parked_page) = page(&omid, &format!("{base}/console/parked")).await;
        assert!(parked_page.contains(&j1) && parked_page.contains(&j2));
        let csrf = csrf_of(&parked_page);
        let (status, _, body) = post(
            &omid,
            &format!("{base}/console/parked/{j1}/retry"),
            &[("csrf", "forged")],
        )
        .await;
        assert_eq!(status, 403);
        assert!(body.contains("security token"));
        let (status, _, body) = post(
            &omid,
            &format!("{base}/console/parked/{j2}/drop"),
            &[("csrf", &csrf), ("reason", "duplicate job")],
        )
        .await;
        assert_eq!(status, 403);
        assert!(body.contains("needs a supervisor"), "{body}");
        let (status, at, body) = post(
            &omid,
            &format!("{base}/console/parked/{j1}/retry"),
            &[("csrf", &csrf)],
        )
        .await;
        assert_eq!(status, 200);
        assert!(at.contains("ok="), "{at}");
        assert!(body.contains("sent back to personalize"), "{body}");
        let outbox: i64 =
            sqlx::query("SELECT COUNT(*) FROM outbox WHERE subject = $1 AND topic = 'job'")
                .bind(a1.as_str())
                .fetch_one(services.store.pool())
                .await
                .unwrap()
                .get(0);
        assert_eq!(
            outbox, 1,
            "{mode:?}: the retried job goes through the outbox"
        );

        // A supervisor drops one (reason required) and force-fails another.
        let adm = client(&base);
        let (at, _) = login(&adm, &base, "admin", &admin_password).await;
        assert!(at.ends_with("/console/"));
        let (_, parked_page) = page(&adm, &format!("{base}/console/parked")).await;
        let csrf = csrf_of(&parked_page);
        let (_, at, _) = post(
            &adm,
            &format!("{base}/console/parked/{j2}/drop"),
            &[("csrf", &csrf), ("reason", " ")],
        )
        .await;
        assert!(at.contains("error="), "{at}");
        let (_, _, body) = post(
            &adm,
            &format!("{base}/console/parked/{j2}/drop"),
            &[("csrf", &csrf), ("reason", "stale duplicate job")],
        )
        .await;
        assert!(body.contains("dropped"), "{body}");
        let (_, _, body) = post(
            &adm,
            &format!("{base}/console/parked/{j3}/fail"),
            &[("csrf", &csrf), ("reason", "registry asked to stop")],
        )
        .await;
        assert!(body.contains("application is now rejected"), "{body}");
        let app3 = services.store.application(&a3).await.unwrap().unwrap();
        assert_eq!(app3.state, ApplicationState::Rejected);
        let history = services.store.history(&a3).await.unwrap();
        let last = history.last().unwrap();
        assert_eq!(last.actor, "operator:admin");
        assert!(
            last.reason
                .as_deref()
                .unwrap()
                .contains("registry asked to stop")
        );
        assert!(
            parked::list(&services, None).await.unwrap().is_empty(),
            "{mode:?}"
        );
        for stage in ["personalize", "keys"] {
            assert_eq!(
                services.broker.depth(stage).await.unwrap().parked,
                0,
                "{mode:?} {stage}"
            );
        }

        // Encoders: one known from the cards table, taken out of service with a reason.
        sqlx::query(
            "INSERT INTO cards (blank_serial, chip_serial, application_id, encoder, state, attempt, created_at, updated_at)
             VALUES ($1, 'chip', $2, 'reader-7', 'personalized', 1, '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z')",
        )
        .bind(testing::unique("blank"))
        .bind(a1.as_str())
        .execute(services.store.pool())
        .await
        .unwrap();
        let (_, enc_page) = page(&omid, &format!("{base}/console/encoders")).await;
        assert!(
            enc_page.contains("reader-7") && enc_page.contains("100.0%"),
            "{enc_page}"
        );
        let csrf_o = csrf_of(&enc_page);
        let (_, _, body) = post(
            &omid,
            &format!("{base}/console/encoders/service"),
            &[
                ("csrf", &csrf_o),
                ("encoder", "reader-7"),
                ("in_service", "0"),
                ("reason", "misfeeds blanks"),
            ],
        )
        .await;
        assert!(
            body.contains("taken out of service")
                && body.contains("out of service: <bdi dir=\"ltr\">misfeeds blanks</bdi>"),
            "{body}"
        );
        let (_, _, body) = post(
            &omid,
            &format!("{base}/console/encoders/service"),
            &[
                ("csrf", &csrf_o),
                ("encoder", "no-such-reader"),
                ("in_service", "0"),
                ("reason", "x"),
            ],
        )
        .await;
        assert!(body.contains("no encoder"), "{body}");

        // Stock and shipments tolerate missing tables.
        for p in ["stock", "shipments"] {
            let (status, body) = page(&omid, &format!("{base}/console/{p}")).await;
            assert_eq!(status, 200);
            assert!(
                body.contains("Not available") || body.contains("rows"),
                "{p}: {body}"
            );
        }

        // Office discrepancies on the shipments page: operators see them, supervisors resolve.
        let lost_card = ApplicationId(format!("app-{}-s", testing::unique("c")));
        let mut tx = services.store.begin().await.unwrap();
        Store::insert_application(
            &mut tx,
            &NewApplication {
                id: lost_card.clone(),
                registry_id: format!("REG-{lost_card}"),
                batch_id: None,
                state: ApplicationState::Shipped,
                priority: Priority::Normal,
            },
            "test",
            services.clock.now(),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        let (d_missing, d_extra) = (testing::unique("dm-"), testing::unique("dx-"));
        for (id, kind, app) in [
            (&d_missing, "missing", lost_card.as_str()),
            (&d_extra, "extra", "STRAY-1"),
        ] {
            sqlx::query(
                "INSERT INTO delivery_discrepancies (id, box_id, office_code, kind, application_id, reported_by, reported_at)
                 VALUES ($1, 'BOX-1', 'TEH-001', $2, $3, 'office:TEH-001:clerk1', '2026-01-02T00:00:00.000000Z')",
            )
            .bind(id)
            .bind(kind)
            .bind(app)
            .execute(services.store.pool())
            .await
            .unwrap();
        }
        let (status, body) = page(&omid, &format!("{base}/console/shipments")).await;
        assert_eq!(status, 200);
        assert!(
            body.contains("Office discrepancies (2 open)") && body.contains(&d_missing),
            "{body}"
        );
        assert!(body.contains("a supervisor resolves it"), "{body}");
        assert!(
            !body.contains("/resolve\""),
            "no form for operators: {body}"
        );
        assert!(
            !body.contains("token_sha256"),
            "token digests are not shown"
        );
        let csrf_o = csrf_of(&body);
        let (status, _, body) = post(
            &omid,
            &format!("{base}/console/shipments/discrepancies/{d_missing}/resolve"),
            &[("csrf", &csrf_o), ("outcome", "found"), ("note", "x")],
        )
        .await;
        assert_eq!(status, 403);
        assert!(body.contains("needs a supervisor"), "{body}");
        let (_, body) = page(&adm, &format!("{base}/console/shipments")).await;
        assert!(
            body.contains(&format!(
                "/console/shipments/discrepancies/{d_missing}/resolve"
            )) && body.contains("<option value=\"lost\">"),
            "{body}"
        );
        let csrf_a = csrf_of(&body);
        let (status, _, _) = post(
            &adm,
            &format!("{base}/console/shipments/discrepancies/{d_missing}/resolve"),
            &[("csrf", "forged"), ("outcome", "found"), ("note", "x")],
        )
        .await;
        assert_eq!(status, 403);
        let (_, at, _) = post(
            &adm,
            &format!("{base}/console/shipments/discrepancies/{d_missing}/resolve"),
            &[("csrf", &csrf_a), ("outcome", "returned"), ("note", "x")],
        )
        .await;
        assert!(at.contains("error="), "{at}");
        let (_, at, body) = post(
            &adm,
            &format!("{base}/console/shipments/discrepancies/{d_missing}/resolve"),
            &[
                ("csrf", &csrf_a),
                ("outcome", "found"),
                ("note", "under the tray"),
            ],
        )
        .await;
        assert!(at.contains("ok="), "{at}");
        assert!(body.contains("resolved: found"), "{body}");
        let (_, _, body) = post(
            &adm,
            &format!("{base}/console/shipments/discrepancies/{d_extra}/resolve"),
            &[
                ("csrf", &csrf_a),
                ("outcome", "returned"),
                ("note", "back to the centre"),
            ],
        )
        .await;
        assert!(
            body.contains("Office discrepancies (0 open)") && body.contains("back to the centre"),
            "{body}"
        );
        let resolved_by: String =
            sqlx::query("SELECT resolved_by FROM delivery_discrepancies WHERE id = $1")
                .bind(&d_missing)
                .fetch_one(services.store.pool())
                .await
                .unwrap()
                .get(0);
        assert_eq!(resolved_by, "admin");

        // Search and application detail.
        let (_, body) = page(
            &omid,
            &format!("{base}/console/search?q=REG-{}", a3.as_str()),
        )
        .await;
        assert!(body.contains("force-failed by an operator"), "{body}");
        let (_, body) = page(&omid, &format!("{base}/console/search?q=nothing-like-this")).await;
        assert!(body.contains("No application with id"));

        // Every action is in the audit log under the operator who took it, and the chain holds.
        let actions = actions_of(&services).await;
        for expected in [
            ("admin", "supervisor", "operator.add"),
            ("omid", "anonymous", "console.login_failed"),
            ("aida", "auditor", "console.login"),
            ("olga", "operator", "parked.retry"),
            ("admin", "supervisor", "parked.drop"),
            ("admin", "supervisor", "parked.fail"),
            ("olga", "operator", "encoder.out_of_service"),
            ("admin", "supervisor", "delivery.discrepancy_resolve"),
        ] {
            assert!(
                actions
                    .iter()
                    .any(|(a, r, x)| (a.as_str(), r.as_str(), x.as_str()) == expected),
                "{mode:?}: no audit entry {expected:?} in {actions:?}"
            );
        }
        assert!(audit::verify(&services.store).await.unwrap().intact());
        drop(console);
    }
}

/// Persian by default (right to left, Persian digits, Solar Hijri dates), English after the
/// switch (which goes back only to console pages), the font served from the console itself,
/// 404 pages in both languages, and the dashboard's SVG charts with the store's figures.
#[tokio::test(flavor = "multi_thread")]
async fn console_in_persian_and_english_with_the_dashboard() {
    let (services, _guard) = testing::services(Mode::Embedded, None).await;
    let data = tempfile::tempdir().unwrap();
    let console = serve(&services, data.path()).await;
    let base = console.base.clone();
    let admin_password = wait_for_admin(data.path()).await;
    let a1 = application(
        &services,
        &format!("app-{}-1", testing::unique("d")),
        ApplicationState::KeysIssued,
    )
    .await;
    application(
        &services,
        &format!("app-{}-2", testing::unique("d")),
        ApplicationState::Received,
    )
    .await;

    // The sign-in page in Persian, with the switch to English.
    let fa = persian_client();
    let (status, body) = page(&fa, &format!("{base}/console/login")).await;
    assert_eq!(status, 200);
    assert!(body.contains("<html lang=\"fa\" dir=\"rtl\">"), "{body}");
    assert!(body.contains("ورود") && body.contains("گذرواژه"), "{body}");
    assert!(
        body.contains("/console/lang?to=en&amp;back=%2Fconsole%2Flogin"),
        "{body}"
    );
    let (_, body) = login(&fa, &base, "admin", "wrong-password-x").await;
    assert!(body.contains("نام کاربری یا گذرواژه نادرست است"), "{body}");
    let (at, body) = login(&fa, &base, "admin", &admin_password).await;
    assert!(at.ends_with("/console/"), "{at}");
    assert!(body.contains("نمای کلی خط تولید"), "{body}");
    // Three applications (admin is no application): the count in Persian digits.
    assert!(body.contains("data-n=\"2\">۲</div>"), "{body}");

    // The dashboard: four SVG charts; the history's state changes of this hour are drawn.
    let (status, dash) = page(&fa, &format!("{base}/console/dashboard")).await;
    assert_eq!(status, 200);
    for id in ["svg-stages", "svg-queues", "svg-overdue"] {
        assert!(
            dash.contains(&format!(
                "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"{id}\""
            )),
            "{id}: {dash}"
        );
    }
    assert!(
        dash.contains("<rect") && dash.contains("received"),
        "{dash}"
    );
    assert!(dash.contains("keys_issued"), "{dash}");
    assert!(!dash.contains("id=\"no-changes\""), "{dash}");
    // No card yet: said, not drawn as zero.
    assert!(dash.contains("id=\"no-cards\""), "{dash}");
    // Solar Hijri "as of" date (14xx/..), and the in-process broker's queue depth.
    assert!(dash.contains("تا ۱۴"), "{dash}");
    assert!(dash.contains("data-15d=\"0\" data-1m=\"0\""), "{dash}");

    // The application page: identifiers stay Latin, left to right.
    let (_, body) = page(&fa, &format!("{base}/console/applications/{}", a1.as_str())).await;
    assert!(
        body.contains(&format!("<code dir=\"ltr\">{}</code>", a1.as_str())),
        "{body}"
    );
    assert!(body.contains("تاریخچه") && body.contains("۱۴"), "{body}");

    // Unknown pages: 404 in Persian.
    let (status, body) = page(&fa, &format!("{base}/console/no-such-page")).await;
    assert_eq!(status, 404);
    assert!(body.contains("پیدا نشد"), "{body}");

    // The switch: a cookie, then back to the page; never off the console.
    let res = fa
        .get(format!("{base}/console/lang?to=en&back=/console/dashboard"))
        .send()
        .await
        .unwrap();
    assert!(
        res.url().path().ends_with("/console/dashboard"),
        "{}",
        res.url()
    );
    let dash = res.text().await.unwrap();
    assert!(dash.contains("<html lang=\"en\" dir=\"ltr\">"), "{dash}");
    assert!(
        dash.contains("Applications per stage, last 24 hours"),
        "{dash}"
    );
    assert!(dash.contains(" Tehran"), "{dash}");
    let (status, body) = page(&fa, &format!("{base}/console/no-such-page")).await;
    assert_eq!(status, 404);
    assert!(body.contains("Not found"), "{body}");
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for evil in [
        "//evil.example/",
        "https://evil.example/console/",
        "/console/..%2F..%2Fmetrics",
    ] {
        let res = no_follow
            .get(format!(
                "{base}/console/lang?to=en&back={}",
                evil.replace('/', "%2F").replace(':', "%3A")
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 303, "{evil}");
        assert_eq!(
            res.headers()[reqwest::header::LOCATION],
            "/console/",
            "{evil}"
        );
        let cookie = res.headers()[reqwest::header::SET_COOKIE]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            cookie.starts_with("cardpipe_lang=en;") && cookie.contains("Path=/console"),
            "{cookie}"
        );
    }

    // The font: from the console itself, cached, allowed by the CSP.
    let res = no_follow
        .get(format!("{base}/console/assets/Vazirmatn-Regular.woff2"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(res.headers()[reqwest::header::CONTENT_TYPE], "font/woff2");
    assert!(
        res.headers()[reqwest::header::CACHE_CONTROL]
            .to_str()
            .unwrap()
            .contains("max-age=31536000")
    );
    assert!(
        res.headers()[reqwest::header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("font-src 'self'")
    );
    assert_eq!(&res.bytes().await.unwrap()[..4], b"wOF2");
    let licence = page(
        &no_follow,
        &format!("{base}/console/assets/Vazirmatn-OFL.txt"),
    )
    .await;
    assert!(licence.0 == 200 && licence.1.contains("SIL Open Font License"));
    assert_eq!(
        page(
            &no_follow,
            &format!("{base}/console/assets/..%2Fsrc%2Fweb.rs")
        )
        .await
        .0,
        404
    );

    // A refusal (403) and an action's error in Persian: an operator may not read the audit
    // log; a CSRF-less form is refused with the Persian "form expired" page.
    auth::add_operator(
        &services,
        "parisa",
        Role::Operator,
        "operator-password-2",
        ("admin", "supervisor"),
    )
    .await
    .unwrap();
    let op = persian_client();
    let (at, _) = login(&op, &base, "parisa", "operator-password-2").await;
    assert!(at.ends_with("/console/"), "{at}");
    let (status, body) = page(&op, &format!("{base}/console/audit")).await;
    assert_eq!(status, 403);
    assert!(
        body.contains("مجاز نیست") && body.contains("نقش شما اجازهٔ این کار را ندارد"),
        "{body}"
    );
    let (status, _, body) = post(
        &op,
        &format!("{base}/console/parked/no-such-job/retry"),
        &[("csrf", "forged")],
    )
    .await;
    assert_eq!(status, 403);
    assert!(body.contains("فرم منقضی شده است"), "{body}");
    let (_, parked) = page(&op, &format!("{base}/console/parked")).await;
    let (_, at, body) = post(
        &op,
        &format!("{base}/console/parked/no-such-job/retry"),
        &[("csrf", &csrf_of(&parked))],
    )
    .await;
    assert!(at.contains("error="), "{at}");
    assert!(
        body.contains("پیدا نشد (جزئیات: no parked job no-such-job)"),
        "{body}"
    );

    // The dashboard needs a session.
    let res = persian_client()
        .get(format!("{base}/console/dashboard"))
        .send()
        .await
        .unwrap();
    assert!(res.url().path().ends_with("/console/login"));
    drop(console);
}
