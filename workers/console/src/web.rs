//! The console's HTTP side: server-rendered pages under `/console/`.
//!
//! Every page needs a signed-in operator (session cookie `cardpipe_session`, `HttpOnly;
//! SameSite=Strict`); every form carries the session's CSRF token (the login form a
//! double-submit token); every action goes through [`crate::actions`], which checks the role
//! and audits. Responses carry a strict Content-Security-Policy (no scripts at all, images and
//! forms from this origin only, inline styles).
//!
//! Pages are [`maud`] templates ([`html!`] to [`Markup`], the frame and tables in
//! [`crate::html`]): every value from data is escaped by construction, and no HTML is built
//! by hand as a string.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use cardpipe_card::farm::Farm;
use cardpipe_common::audit;
use cardpipe_common::domain::{ApplicationId, ApplicationState};
use cardpipe_common::records;
use cardpipe_common::runtime::Services;
use cardpipe_common::runtime::parked;
use maud::{Markup, Render, html};
use serde::Deserialize;

use crate::actions::{self, ActionError};
use crate::auth::{self, AuthError, LoginGuard, Session};
use crate::data;
use crate::html::{bar, bidi, flash, page, table, url};

/// The session cookie.
pub const SESSION_COOKIE: &str = "cardpipe_session";
const LOGIN_CSRF_COOKIE: &str = "cardpipe_login_csrf";

/// What the console needs.
#[derive(Clone)]
pub struct ConsoleState {
    /// Shared services.
    pub services: Services,
    /// Stages whose queues the overview shows.
    pub stages: Vec<String>,
    /// The encoder farm this process drives, if it runs the personalize stage.
    pub farm: Option<Arc<Farm>>,
    /// The login guard (rate limit and failure metric).
    pub guard: LoginGuard,
    /// Add `Secure` to cookies (behind TLS).
    pub secure_cookies: bool,
}

impl std::fmt::Debug for ConsoleState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleState")
            .field("stages", &self.stages)
            .finish()
    }
}

impl ConsoleState {
    fn farm(&self) -> Option<Arc<Farm>> {
        self.farm.clone()
    }
}

/// The console routes.
pub fn router(state: ConsoleState) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console/") }))
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route("/console/", get(overview))
        .route("/console/login", get(login_form).post(login))
        .route("/console/logout", post(logout))
        .route("/console/batches/{id}", get(batch))
        .route("/console/search", get(search))
        .route("/console/applications/{id}", get(application))
        .route("/console/adjudications", get(adjudications))
        .route("/console/adjudications/{id}", get(adjudication))
        .route("/console/adjudications/{id}/photo/{which}", get(photo))
        .route("/console/adjudications/{id}/decide", post(decide))
        .route("/console/parked", get(parked_page))
        .route("/console/parked/{job}/{action}", post(parked_action))
        .route(
            "/console/dead-letters/{seq}/{action}",
            post(dead_letter_action),
        )
        .route("/console/encoders", get(encoders))
        .route("/console/encoders/service", post(encoder_service))
        .route("/console/audit", get(audit_page))
        .route("/console/stock", get(stock))
        .route("/console/shipments", get(shipments))
        .route(
            "/console/shipments/discrepancies/{id}/resolve",
            post(resolve_discrepancy),
        )
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

async fn security_headers(req: axum::extract::Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    CookieJar::from_headers(headers)
        .get(name)
        .map(|c| c.value().to_owned())
}

/// A console cookie: `HttpOnly; SameSite=Strict`, path `/console`, `Secure` behind TLS.
fn set_cookie(name: &str, value: &str, max_age: i64, secure: bool) -> String {
    Cookie::build((name.to_owned(), value.to_owned()))
        .path("/console")
        .http_only(true)
        .same_site(SameSite::Strict)
        .max_age(time::Duration::seconds(max_age))
        .secure(secure)
        .build()
        .to_string()
}

fn html(page: Markup) -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page.into_string(),
    )
        .into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "console");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page(
            "Error",
            None,
            html! { h1 { "Internal error" } p { "The error was logged." } },
        )
        .into_string(),
    )
        .into_response()
}

/// The session of the request, or a redirect to the login page.
async fn session(st: &ConsoleState, headers: &HeaderMap) -> Result<Session, Response> {
    let Some(token) = cookie(headers, SESSION_COOKIE) else {
        return Err(Redirect::to("/console/login").into_response());
    };
    match auth::session(&st.services.store, &token, st.services.clock.now()).await {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(Redirect::to("/console/login").into_response()),
        Err(e) => Err(internal(e)),
    }
}

fn frame(s: &Session, title: &str, body: Markup) -> Response {
    html(page(
        title,
        Some((&s.operator.login, s.operator.role.as_str(), &s.csrf)),
        body,
    ))
}

fn forbidden(s: &Session, message: &str) -> Response {
    let mut res = frame(
        s,
        "Not allowed",
        html! { h1 { "Not allowed" } p class="msg err" { (message) } },
    );
    *res.status_mut() = StatusCode::FORBIDDEN;
    res
}

/// Constant-time comparison of CSRF tokens.
fn same_token(a: &str, b: &str) -> bool {
    !a.is_empty() && bool::from(subtle::ConstantTimeEq::ct_eq(a.as_bytes(), b.as_bytes()))
}

#[allow(clippy::result_large_err)] // the error is the page to answer with
fn check_csrf(s: &Session, token: &str) -> Result<(), Response> {
    if same_token(&s.csrf, token) {
        Ok(())
    } else {
        let mut res = frame(
            s,
            "Form expired",
            html! {
                h1 { "Form expired" }
                p class="msg err" {
                    "The form's security token does not match this session (an old page, or a \
                     request from another site). Reload the page and try again."
                }
            },
        );
        *res.status_mut() = StatusCode::FORBIDDEN;
        Err(res)
    }
}

/// The session of a form post, its CSRF token checked (every state-changing form).
async fn form_session(
    st: &ConsoleState,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<Session, Response> {
    let s = session(st, headers).await?;
    check_csrf(&s, csrf)?;
    Ok(s)
}

fn csrf_field(s: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(s.csrf); }
}

/// Redirect after an action, with its outcome as a flash message.
fn back(to: &str, outcome: Result<String, String>) -> Response {
    let sep = if to.contains('?') { '&' } else { '?' };
    let target = match outcome {
        Ok(m) => format!("{to}{sep}ok={}", url(&m)),
        Err(m) => format!("{to}{sep}error={}", url(&m)),
    };
    Redirect::to(&target).into_response()
}

fn action_error(e: ActionError) -> String {
    if let ActionError::Internal(e) = &e {
        tracing::error!(error = %e, "console action failed");
        return "internal error (logged); nothing was changed".into();
    }
    e.to_string()
}

#[derive(Debug, Deserialize, Default)]
struct Flash {
    ok: Option<String>,
    error: Option<String>,
}

// ---------------------------------------------------------------------------
// Login

async fn login_form(State(st): State<ConsoleState>, Query(f): Query<Flash>) -> Response {
    let token = hex::encode(rand::random::<[u8; 16]>());
    let body = html! {
        h1 { "cardpipe console — sign in" }
        (flash(f.ok.as_deref(), f.error.as_deref()))
        form method="post" action="/console/login" id="login" {
            input type="hidden" name="csrf" value=(token);
            p {
                label {
                    "Login" br;
                    input type="text" name="login" id="login-name" autocomplete="username" required;
                }
            }
            p {
                label {
                    "Password" br;
                    input type="password" name="password" id="login-password"
                        autocomplete="current-password" required;
                }
            }
            p { button type="submit" id="login-submit" { "Sign in" } }
        }
    };
    let mut res = html(page("Sign in", None, body));
    if let Ok(v) = HeaderValue::from_str(&set_cookie(
        LOGIN_CSRF_COOKIE,
        &token,
        3600,
        st.secure_cookies,
    )) {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    res
}

#[derive(Deserialize)]
struct LoginForm {
    login: String,
    password: String,
    csrf: String,
}

/// The peer address of a request, when the server was started with connect info (the
/// per-address sign-in limit); `None` under a bare router (tests).
#[derive(Debug)]
struct ClientAddress(Option<String>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ClientAddress {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(ClientAddress(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|info| info.0.ip().to_string()),
        ))
    }
}

async fn login(
    State(st): State<ConsoleState>,
    ClientAddress(client): ClientAddress,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let expected = cookie(&headers, LOGIN_CSRF_COOKIE).unwrap_or_default();
    if !same_token(&expected, &f.csrf) {
        return back(
            "/console/login",
            Err("the sign-in form expired; please try again".into()),
        );
    }
    let now = st.services.clock.now();
    let operator = match st
        .guard
        .login(
            &st.services.store,
            &f.login,
            &f.password,
            client.as_deref(),
            now,
        )
        .await
    {
        Ok(o) => o,
        Err(e @ (AuthError::BadCredentials | AuthError::RateLimited(_) | AuthError::Busy)) => {
            let login = f.login.trim().to_ascii_lowercase();
            let subject = if auth::check_login(&login).is_ok() {
                login
            } else {
                "(invalid login)".into()
            };
            let _ = audit::record(
                &st.services.store,
                st.services.clock.as_ref(),
                &audit::AuditEvent {
                    actor: &subject,
                    role: "anonymous",
                    action: "console.login_failed",
                    subject: &subject,
                    details: serde_json::json!({
                        "reason": match e {
                            AuthError::RateLimited(_) => "rate_limited",
                            AuthError::Busy => "busy",
                            _ => "bad_credentials",
                        }
                    }),
                },
            )
            .await;
            return back("/console/login", Err(e.to_string()));
        }
        Err(e) => return internal(e),
    };
    let (token, session) = match auth::start_session(&st.services.store, &operator.login, now).await
    {
        Ok(s) => s,
        Err(e) => return internal(e),
    };
    if let Err(e) = audit::record(
        &st.services.store,
        st.services.clock.as_ref(),
        &audit::AuditEvent {
            actor: &session.operator.login,
            role: session.operator.role.as_str(),
            action: "console.login",
            subject: &session.operator.login,
            details: serde_json::json!({}),
        },
    )
    .await
    {
        return internal(e);
    }
    let mut res = Redirect::to("/console/").into_response();
    let max_age = auth::SESSION_TTL.as_secs() as i64;
    for c in [
        set_cookie(SESSION_COOKIE, &token, max_age, st.secure_cookies),
        set_cookie(LOGIN_CSRF_COOKIE, "", 0, st.secure_cookies),
    ] {
        if let Ok(v) = HeaderValue::from_str(&c) {
            res.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    res
}

#[derive(Deserialize)]
struct CsrfOnly {
    csrf: String,
}

async fn logout(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    Form(f): Form<CsrfOnly>,
) -> Response {
    let s = match form_session(&st, &headers, &f.csrf).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Some(token) = cookie(&headers, SESSION_COOKIE) {
        let _ = auth::end_session(&st.services.store, &token).await;
    }
    let _ = audit::record(
        &st.services.store,
        st.services.clock.as_ref(),
        &audit::AuditEvent {
            actor: &s.operator.login,
            role: s.operator.role.as_str(),
            action: "console.logout",
            subject: &s.operator.login,
            details: serde_json::json!({}),
        },
    )
    .await;
    let mut res = back("/console/login", Ok("signed out".into()));
    if let Ok(v) = HeaderValue::from_str(&set_cookie(SESSION_COOKIE, "", 0, st.secure_cookies)) {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    res
}

// ---------------------------------------------------------------------------
// Overview, batches, search, applications

async fn overview(State(st): State<ConsoleState>, headers: HeaderMap) -> Response {
    let s = match session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let o = match data::overview(&st.services, &st.stages).await {
        Ok(o) => o,
        Err(e) => return internal(e),
    };
    let total: i64 = o.states.iter().map(|(_, n)| n).sum();
    let possible_duplicates = o
        .states
        .iter()
        .find(|(s, _)| *s == ApplicationState::PossibleDuplicate)
        .map_or(0, |(_, n)| *n);
    let changes_last_hour: i64 = o.throughput_last_hour.iter().map(|(_, n)| n).sum();
    let state_rows: Vec<Vec<Markup>> = o
        .states
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| vec![s.as_str().render(), n.render()])
        .collect();
    let queue_rows: Vec<Vec<Markup>> = o
        .queues
        .iter()
        .map(|(stage, d)| match d {
            Some(d) => vec![
                stage.render(),
                d.ready.render(),
                d.retrying.render(),
                d.parked.render(),
            ],
            None => vec![stage.render(), "—".render(), "—".render(), "—".render()],
        })
        .collect();
    let throughput_rows: Vec<Vec<Markup>> = o
        .throughput_last_hour
        .iter()
        .map(|(s, n)| vec![s.render(), n.render()])
        .collect();
    let body = html! {
        h1 { "Pipeline overview" }
        div class="cards" {
            div class="card" { div class="n" id="total-applications" { (total) } "applications" }
            div class="card" { div class="n" { (possible_duplicates) } "possible duplicates" }
            div class="card" { div class="n" id="parked-count" { (o.parked) } "parked jobs" }
            div class="card" {
                div class="n" { (changes_last_hour) } "state changes in the last hour"
            }
        }
        h2 { "Applications per state" }
        (table(&["state", "applications"], &state_rows))
        h2 { "Queues" }
        @if queue_rows.is_empty() {
            p class="muted" {
                "This process runs no stage; queue depths are on the workers' /metrics."
            }
        } @else {
            (table(&["stage", "ready", "retrying", "parked"], &queue_rows))
        }
        h2 { "Throughput (state changes, last hour)" }
        (table(&["entered state", "changes"], &throughput_rows))
        h2 { "Batches" }
        (batch_table(&o.batches))
    };
    frame(&s, "Overview", body)
}

fn batch_table(batches: &[data::BatchProgress]) -> Markup {
    let rows: Vec<Vec<Markup>> = batches
        .iter()
        .map(|b| {
            vec![
                html! {
                    a href=(format!("/console/batches/{}", url(&b.id))) class="batch-link" { (b.id) }
                },
                b.client.render(),
                b.state.render(),
                b.priority.render(),
                b.records.render(),
                b.accepted.render(),
                b.rejected.render(),
                bar(b.fraction()),
                b.created_at.render(),
            ]
        })
        .collect();
    table(
        &[
            "batch", "client", "state", "priority", "records", "accepted", "rejected", "progress",
            "received",
        ],
        &rows,
    )
}

async fn batch(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let s = match session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let b = match data::batch(&st.services, &id).await {
        Ok(Some(b)) => b,
        Ok(None) => return not_found(&s, "No such batch"),
        Err(e) => return internal(e),
    };
    let apps = match data::batch_applications(&st.services, &id, 500).await {
        Ok(a) => a,
        Err(e) => return internal(e),
    };
    let state_rows: Vec<Vec<Markup>> = b
        .states
        .iter()
        .map(|(s, n)| vec![s.render(), n.render()])
        .collect();
    let app_rows: Vec<Vec<Markup>> = apps
        .iter()
        .map(|(id, reg, state, at)| {
            vec![
                html! { a href=(format!("/console/applications/{}", url(id))) { (id) } },
                reg.render(),
                state.render(),
                at.render(),
            ]
        })
        .collect();
    let body = html! {
        h1 { "Batch " code { (b.id) } }
        (batch_table(std::slice::from_ref(&b)))
        h2 { "Applications per state" }
        (table(&["state", "applications"], &state_rows))
        h2 { "Applications (first " (apps.len()) ")" }
        (table(&["application", "registry id", "state", "updated"], &app_rows))
    };
    frame(&s, "Batch", body)
}

fn not_found(s: &Session, what: &str) -> Response {
    let mut res = frame(s, what, html! { h1 { (what) } });
    *res.status_mut() = StatusCode::NOT_FOUND;
    res
}

#[derive(Deserialize)]
struct SearchQuery {
    q: Option<String>,
}

async fn search(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    Query(q): Query<SearchQuery>,
) -> Response {
    let s = match session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let query = q.q.unwrap_or_default();
    let mut not_found = false;
    if !query.trim().is_empty() {
        match data::find(&st.services, &query).await {
            Ok(Some(id)) => {
                return Redirect::to(&format!("/console/applications/{}", url(id.as_str())))
                    .into_response();
            }
            Ok(None) => not_found = true,
            Err(e) => return internal(e),
        }
    }
    let body = html! {
        h1 { "Find an application" }
        form method="get" action="/console/search" class="inline" {
            input type="text" name="q" id="search-q" size="40" value=(query)
                placeholder="application id, registry id or tracking code";
            button type="submit" id="search-submit" { "Search" }
        }
        @if not_found {
            p class="msg err" {
                "No application with id, registry id or tracking code " (query.trim()) "."
            }
        }
    };
    frame(&s, "Search", body)
}

async fn application(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(f): Query<Flash>,
) -> Response {
    let s = match session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let v = match data::application(&st.services, &ApplicationId(id.clone())).await {
        Ok(Some(v)) => v,
        Ok(None) => return not_found(&s, "No such application"),
        Err(e) => return internal(e),
    };
    // Quality-control reports (formerly GET /api/qc/{id}, now only here).
    let reports = match data::qc_reports(&st.services, &v.app.id).await {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    let certificates = match data::certificates(&st.services, &v.app.id).await {
        Ok(c) => c,
        Err(e) => return internal(e),
    };
    let certificate_rows: Vec<Vec<Markup>> = certificates
        .iter()
        .map(|r| r.iter().map(|c| c.render()).collect())
        .collect();
    let (first, last, father) = v
        .names
        .clone()
        .unwrap_or_else(|| ("—".into(), "—".into(), "—".into()));
    let rows = vec![
        vec!["registry id".render(), v.app.registry_id.render()],
        vec![
            "state".render(),
            html! { strong id="app-state" { (v.app.state.as_str()) } },
        ],
        vec![
            "name".render(),
            html! { span id="app-name" { (bidi(&format!("{first} {last}"))) } },
        ],
        vec!["father's name".render(), bidi(&father)],
        vec![
            "national code".render(),
            html! { code id="national-code" { (v.national_code.as_deref().unwrap_or("—")) } },
        ],
        vec![
            "tracking code".render(),
            v.tracking_code.as_deref().unwrap_or("—").render(),
        ],
        vec![
            "pickup office".render(),
            v.pickup_office.as_deref().unwrap_or("—").render(),
        ],
        vec![
            "batch".render(),
            v.app.batch_id.as_deref().map_or("—".render(), |b| {
                html! { a href=(format!("/console/batches/{}", url(b))) { (b) } }
            }),
        ],
        vec!["priority".render(), v.app.priority.as_str().render()],
    ];
    let history: Vec<Vec<Markup>> = v
        .history
        .iter()
        .map(|h| {
            vec![
                cardpipe_common::clock::to_rfc3339(h.at).render(),
                h.from_state.map_or("—", |s| s.as_str()).render(),
                h.to_state.as_str().render(),
                h.stage.render(),
                h.attempt.render(),
                h.actor.render(),
                h.reason.as_deref().unwrap_or("").render(),
            ]
        })
        .collect();
    let report_rows: Vec<Vec<Markup>> = reports
        .iter()
        .map(|r| r.iter().map(|c| c.render()).collect())
        .collect();
    let artifacts: Vec<Vec<Markup>> = v
        .artifacts
        .iter()
        .map(|(k, key)| vec![k.render(), html! { code { (key) } }])
        .collect();
    let body = html! {
        h1 { "Application " code { (v.app.id.as_str()) } }
        (flash(f.ok.as_deref(), f.error.as_deref()))
        (table(&["", ""], &rows))
        @if v.app.state == ApplicationState::PossibleDuplicate {
            p {
                a href=(format!("/console/adjudications/{}", url(v.app.id.as_str()))) {
                    "Adjudicate this possible duplicate"
                }
            }
        }
        h2 { "History" }
        div id="history" {
            (table(&["at", "from", "to", "stage", "attempt", "actor", "reason"], &history))
        }
        @if !v.parked.is_empty() {
            h2 { "Parked work" }
            (parked_rows(&s, &v.parked))
        }
        @if !report_rows.is_empty() {
            h2 { "Quality control" }
            div id="qc-reports" {
                (table(
                    &[
                        "checked at",
                        "outcome",
                        "reason",
                        "blank serial",
                        "chip serial",
                        "ms",
                        "report",
                    ],
                    &report_rows,
                ))
            }
        }
        @if !certificate_rows.is_empty() {
            h2 { "Certificates" }
            div id="certificates" {
                (table(
                    &["serial", "key", "issued at", "status", "revocation cause", "revoked at"],
                    &certificate_rows,
                ))
            }
        }
        h2 { "Artifacts" }
        (table(&["kind", "object key"], &artifacts))
    };
    frame(&s, "Application", body)
}

// ---------------------------------------------------------------------------
// Adjudication

async fn adjudications(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    Query(f): Query<Flash>,
) -> Response {
    let s = match session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let list = match data::adjudications(&st.services).await {
        Ok(l) => l,
        Err(e) => return internal(e),
    };
    let rows: Vec<Vec<Markup>> = list
        .iter()
        .map(|a| {
            vec![
                html! {
                    a class="adjudicate-link"
                        href=(format!("/console/adjudications/{}", url(&a.application_id))) {
                        (a.application_id)
                    }
                },
                a.registry_id.render(),
                a.flagged_at.render(),
                a.candidates.render(),
                format_args!("{:.1}", a.best_score).render(),
            ]
        })
        .collect();
    let body = html! {
        h1 { "Possible duplicates" }
        (flash(f.ok.as_deref(), f.error.as_deref()))
        @if rows.is_empty() {
            p id="no-adjudications" { "No possible duplicate is waiting." }
        } @else {
            (table(
                &["application", "registry id", "flagged", "candidates", "best score"],
                &rows,
            ))
        }
    };
    frame(&s, "Adjudication", body)
}

async fn adjudication(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(f): Query<Flash>,
) -> Response {
    let s = match session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let app_id = ApplicationId(id.clone());
    let app = match st.services.store.application(&app_id).await {
        Ok(Some(a)) => a,
        Ok(None) => return not_found(&s, "No such application"),
        Err(e) => return internal(e),
    };
    let cands = match cardpipe_common::contract::candidates(&st.services.store, &app_id).await {
        Ok(c) => c,
        Err(e) => return internal(e),
    };
    if cands.is_empty() {
        return not_found(
            &s,
            "This application was never flagged as a possible duplicate",
        );
    }
    let names = |id: &ApplicationId| {
        let services = st.services.clone();
        let id = id.clone();
        async move {
            records::load_record(&services, &id)
                .await
                .map(|r| bidi(&format!("{} {}", r.first_name, r.last_name)))
                .unwrap_or_else(|_| "—".render())
        }
    };
    // The names are read before rendering: (candidate, applicant's name, candidate's name).
    let mut shown = Vec::with_capacity(cands.len());
    for c in &cands {
        let other = ApplicationId(c.candidate_id.clone());
        shown.push((c, names(&app_id).await, names(&other).await));
    }
    let here = url(&id);
    let body = html! {
        h1 { "Possible duplicate " code { (id) } }
        (flash(f.ok.as_deref(), f.error.as_deref()))
        p {
            "State: " strong id="adj-state" { (app.state.as_str()) } " · "
            a href=(format!("/console/applications/{here}")) { "application detail" }
        }
        @for (c, applicant_name, candidate_name) in &shown {
            h2 {
                "Candidate " (c.rank) " — fused score " (format_args!("{:.1}", c.score))
                ", FMR " (format_args!("{:.2e}", c.fmr))
            }
            div class="photos" {
                figure {
                    img alt="applicant photo"
                        src=(format!("/console/adjudications/{here}/photo/applicant"));
                    figcaption { "This application: " (applicant_name) }
                }
                figure {
                    img alt="candidate photo"
                        src=(format!("/console/adjudications/{here}/photo/{}", url(&c.candidate_id)));
                    figcaption {
                        "Candidate "
                        a href=(format!("/console/applications/{}", url(&c.candidate_id))) {
                            (c.candidate_id)
                        }
                        ": " (candidate_name)
                    }
                }
            }
            (table(&["position", "finger", "score"], &finger_rows(&c.finger_scores)))
        }
        @if app.state == ApplicationState::PossibleDuplicate {
            h2 { "Decision" }
            form method="post" action=(format!("/console/adjudications/{here}/decide")) id="decide" {
                (csrf_field(&s))
                p {
                    label {
                        input type="radio" name="decision" value="cleared" id="decision-cleared"
                            required;
                        " Not the same person: clear (continues to keys)"
                    }
                    br;
                    label {
                        input type="radio" name="decision" value="confirmed_duplicate"
                            id="decision-confirm";
                        " Same person: confirm the duplicate (supervisor; final)"
                    }
                }
                p {
                    label {
                        "Reason" br;
                        input type="text" name="reason" id="decision-reason" size="60" required
                            maxlength="500";
                    }
                }
                p { button type="submit" id="decision-submit" { "Record decision" } }
            }
        }
    };
    frame(&s, "Adjudication", body)
}

/// The per-finger scores of a candidate: position, finger, score.
fn finger_rows(scores: &[Option<f64>]) -> Vec<Vec<Markup>> {
    scores
        .iter()
        .enumerate()
        .map(|(i, score)| {
            vec![
                (i + 1).render(),
                FINGERS.get(i).copied().unwrap_or("").render(),
                score.map_or("—".render(), |v| format_args!("{v:.1}").render()),
            ]
        })
        .collect()
}

/// ISO/IEC 19794-2 finger positions 1..=10.
const FINGERS: [&str; 10] = [
    "right thumb",
    "right index",
    "right middle",
    "right ring",
    "right little",
    "left thumb",
    "left index",
    "left middle",
    "left ring",
    "left little",
];

async fn photo(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    Path((id, which)): Path<(String, String)>,
) -> Response {
    if let Err(r) = session(&st, &headers).await {
        return r;
    }
    let app_id = ApplicationId(id);
    let cands = match cardpipe_common::contract::candidates(&st.services.store, &app_id).await {
        Ok(c) => c,
        Err(e) => return internal(e),
    };
    // Only the photos of an adjudication: the applicant and its candidates.
    let target = if which == "applicant" && !cands.is_empty() {
        app_id
    } else if cands.iter().any(|c| c.candidate_id == which) {
        ApplicationId(which)
    } else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match records::load_biometrics(&st.services, &target).await {
        Ok(b) => (
            [
                (header::CONTENT_TYPE, "image/jpeg"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            b.photo_jpeg,
        )
            .into_response(),
        Err(records::RecordError::Missing { .. }) => StatusCode::NOT_FOUND.into_response(),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
struct DecideForm {
    csrf: String,
    decision: String,
    reason: String,
}

async fn decide(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<DecideForm>,
) -> Response {
    let s = match form_session(&st, &headers, &f.csrf).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let here = format!("/console/adjudications/{}", url(&id));
    match actions::adjudicate(&st.services, &s.operator, &id, &f.decision, &f.reason).await {
        Ok(to) => back(
            &here,
            Ok(format!("decided: {} (dedup applies it)", to.as_str())),
        ),
        Err(ActionError::Auth(AuthError::Forbidden(m))) => forbidden(&s, &m),
        Err(e) => back(&here, Err(action_error(e))),
    }
}

// ---------------------------------------------------------------------------
// Parked work

fn parked_rows(s: &Session, jobs: &[parked::ParkedJob]) -> Markup {
    let csrf = csrf_field(s);
    let rows: Vec<Vec<Markup>> = jobs
        .iter()
        .map(|p| {
            let job = url(&p.job_id);
            vec![
                html! { code { (p.job_id) } },
                p.stage.render(),
                html! { a href=(format!("/console/applications/{}", url(&p.subject))) { (p.subject) } },
                p.attempt.render(),
                html! { code { (p.error) } },
                p.parked_at.render(),
                html! {
                    form method="post" class="inline" action=(format!("/console/parked/{job}/retry")) {
                        (csrf)
                        button type="submit" class="retry" { "Retry" }
                    }
                    form method="post" class="inline" action=(format!("/console/parked/{job}/drop")) {
                        (csrf)
                        input type="text" name="reason" placeholder="reason" required maxlength="500";
                        button type="submit" class="danger" { "Drop" }
                    }
                    form method="post" class="inline" action=(format!("/console/parked/{job}/fail")) {
                        (csrf)
                        input type="text" name="reason" placeholder="reason" required maxlength="500";
                        button type="submit" class="danger" { "Force-fail" }
                    }
                },
            ]
        })
        .collect();
    table(
        &[
            "job",
            "stage",
            "application",
            "attempts",
            "last error",
            "parked at",
            "actions",
        ],
        &rows,
    )
}

async fn parked_page(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    Query(f): Query<Flash>,
) -> Response {
    let s = match session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let jobs = match parked::list(&st.services, None).await {
        Ok(j) => j,
        Err(e) => return internal(e),
    };
    let letters = match st.services.store.dead_letters(500).await {
        Ok(l) => l,
        Err(e) => return internal(e),
    };
    let supervisor = s.operator.role.is_supervisor();
    let csrf = csrf_field(&s);
    let letter_rows: Vec<Vec<Markup>> = letters
        .iter()
        .map(|d| {
            let action = if supervisor {
                html! {
                    form method="post" class="inline"
                        action=(format!("/console/dead-letters/{}/requeue", d.seq)) {
                        (csrf)
                        button type="submit" { "Re-queue" }
                    }
                    form method="post" class="inline"
                        action=(format!("/console/dead-letters/{}/discard", d.seq)) {
                        (csrf)
                        input type="text" name="reason" placeholder="reason" required maxlength="500";
                        button type="submit" { "Discard" }
                    }
                }
            } else {
                html! { span class="muted" { "a supervisor re-queues or discards it" } }
            };
            vec![
                d.seq.render(),
                d.topic.render(),
                d.subject.render(),
                d.created_at.render(),
                d.dead_at.render(),
                d.attempts.render(),
                d.last_error.render(),
                action,
            ]
        })
        .collect();
    let body = html! {
        h1 { "Parked work" }
        (flash(f.ok.as_deref(), f.error.as_deref()))
        p class="muted" {
            "Retry sends the job back to its stage as a fresh attempt. Drop (supervisor) forgets \
             the job and leaves the application where it is. Force-fail (supervisor) ends the \
             application: rejected if never released, otherwise cancelled (certificates revoked)."
        }
        @if jobs.is_empty() {
            p id="no-parked" { "Nothing is parked." }
        } @else {
            div id="parked" { (parked_rows(&s, &jobs)) }
        }
        h2 id="dead-letters" { "Undelivered messages (" (letters.len()) " dead letters)" }
        p class="muted" {
            "Registry callbacks, citizen messages and job hand-offs the outbox relay gave up on: \
             refused as malformed by the receiver, or failed too many times. Re-queue \
             (supervisor) once the cause is fixed; discard (supervisor) what must not be sent."
        }
        @if letter_rows.is_empty() {
            p id="no-dead-letters" { "No dead letters." }
        } @else {
            div id="dead-letter-list" {
                (table(
                    &["number", "topic", "subject", "written", "given up", "attempts", "last error", ""],
                    &letter_rows,
                ))
            }
        }
    };
    frame(&s, "Parked work", body)
}

#[derive(Deserialize)]
struct ReasonForm {
    csrf: String,
    #[serde(default)]
    reason: String,
}

async fn parked_action(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    Path((job, action)): Path<(String, String)>,
    Form(f): Form<ReasonForm>,
) -> Response {
    let s = match form_session(&st, &headers, &f.csrf).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let outcome = match action.as_str() {
        "retry" => actions::parked_retry(&st.services, &s.operator, &job)
            .await
            .map(|j| format!("job {job} sent back to {} as job {}", j.stage, j.id)),
        "drop" => actions::parked_drop(&st.services, &s.operator, &job, &f.reason)
            .await
            .map(|p| format!("job {job} of {} dropped", p.subject)),
        "fail" => actions::parked_fail(&st.services, &s.operator, &job, &f.reason)
            .await
            .map(|to| format!("job {job} force-failed: application is now {}", to.as_str())),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    match outcome {
        Ok(m) => back("/console/parked", Ok(m)),
        Err(ActionError::Auth(AuthError::Forbidden(m))) => forbidden(&s, &m),
        Err(e) => back("/console/parked", Err(action_error(e))),
    }
}

async fn dead_letter_action(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    Path((seq, action)): Path<(i64, String)>,
    Form(f): Form<ReasonForm>,
) -> Response {
    let s = match form_session(&st, &headers, &f.csrf).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let outcome = match action.as_str() {
        "requeue" => actions::dead_letter_requeue(&st.services, &s.operator, seq)
            .await
            .map(|d| {
                format!(
                    "dead letter {seq} ({} for {}) re-queued",
                    d.topic, d.subject
                )
            }),
        "discard" => actions::dead_letter_discard(&st.services, &s.operator, seq, &f.reason)
            .await
            .map(|d| {
                format!(
                    "dead letter {seq} ({} for {}) discarded",
                    d.topic, d.subject
                )
            }),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    match outcome {
        Ok(m) => back("/console/parked", Ok(m)),
        Err(ActionError::Auth(AuthError::Forbidden(m))) => forbidden(&s, &m),
        Err(e) => back("/console/parked", Err(action_error(e))),
    }
}

// ---------------------------------------------------------------------------
// Encoders

async fn encoders(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    Query(f): Query<Flash>,
) -> Response {
    let s = match session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let farm = st.farm();
    let list = match data::encoders(&st.services, farm.as_deref()).await {
        Ok(l) => l,
        Err(e) => return internal(e),
    };
    let csrf = csrf_field(&s);
    let rows: Vec<Vec<Markup>> = list
        .iter()
        .map(|e| {
            let state = match (e.present, e.in_service) {
                (Some(false), _) => "absent".to_owned(),
                (_, true) => "in service".to_owned(),
                (_, false) => format!("out of service: {}", e.reason.as_deref().unwrap_or("")),
            };
            let (in_service, label, class) = if e.in_service {
                ("0", "Take out of service", "danger")
            } else {
                ("1", "Return to service", "light")
            };
            vec![
                e.name.render(),
                state.render(),
                e.busy.map_or("—", |b| if b { "busy" } else { "idle" }).render(),
                e.personalized.render(),
                e.spoiled.render(),
                e.yield_ratio()
                    .map_or("—".render(), |y| format_args!("{:.1}%", y * 100.0).render()),
                e.last_hour.render(),
                html! {
                    form method="post" class="inline" action="/console/encoders/service" {
                        (csrf)
                        input type="hidden" name="encoder" value=(e.name);
                        input type="hidden" name="in_service" value=(in_service);
                        input type="text" name="reason" placeholder="reason" required maxlength="500";
                        button type="submit" class=(class) { (label) }
                    }
                },
            ]
        })
        .collect();
    let body = html! {
        h1 { "Encoders" }
        (flash(f.ok.as_deref(), f.error.as_deref()))
        p class="muted" {
            @if farm.is_some() {
                "Live state from this process's encoder farm; counts from the cards table."
            } @else {
                "This process drives no encoder: counts from the cards table, service state from \
                 operators' decisions."
            }
        }
        @if rows.is_empty() {
            p { "No encoder has been seen yet." }
        } @else {
            (table(
                &[
                    "encoder",
                    "state",
                    "now",
                    "personalized",
                    "spoiled",
                    "yield",
                    "cards last hour",
                    "service",
                ],
                &rows,
            ))
        }
    };
    frame(&s, "Encoders", body)
}

#[derive(Deserialize)]
struct EncoderForm {
    csrf: String,
    encoder: String,
    in_service: String,
    reason: String,
}

async fn encoder_service(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    Form(f): Form<EncoderForm>,
) -> Response {
    let s = match form_session(&st, &headers, &f.csrf).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let in_service = f.in_service == "1";
    let farm = st.farm();
    match actions::encoder_service(
        &st.services,
        farm.as_deref(),
        &s.operator,
        &f.encoder,
        in_service,
        &f.reason,
    )
    .await
    {
        Ok(()) => back(
            "/console/encoders",
            Ok(format!(
                "encoder {} {}",
                f.encoder,
                if in_service {
                    "returned to service"
                } else {
                    "taken out of service"
                }
            )),
        ),
        Err(ActionError::Auth(AuthError::Forbidden(m))) => forbidden(&s, &m),
        Err(e) => back("/console/encoders", Err(action_error(e))),
    }
}

// ---------------------------------------------------------------------------
// Audit log, stock, shipments

#[derive(Deserialize)]
struct AuditQuery {
    subject: Option<String>,
    verify: Option<String>,
}

async fn audit_page(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Response {
    let s = match session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if !s.operator.role.can_audit() {
        return forbidden(&s, "the audit log is for supervisors and auditors");
    }
    let subject = q.subject.filter(|x| !x.trim().is_empty());
    let entries = match audit::recent(&st.services.store, subject.as_deref(), 300).await {
        Ok(e) => e,
        Err(e) => return internal(e),
    };
    let verified = if q.verify.is_some() {
        match audit::verify(&st.services.store).await {
            Ok(r) => Some(r),
            Err(e) => return internal(e),
        }
    } else {
        None
    };
    let rows: Vec<Vec<Markup>> = entries
        .iter()
        .map(|e| {
            vec![
                e.seq.render(),
                e.at.render(),
                e.actor.render(),
                e.role.render(),
                e.action.render(),
                e.subject.render(),
                html! { code { (e.details) } },
                html! { code title=(e.hash) { (e.hash[..12.min(e.hash.len())]) "…" } },
            ]
        })
        .collect();
    let body = html! {
        h1 { "Audit log" }
        form method="get" class="inline" action="/console/audit" {
            input type="text" name="subject" value=(subject.as_deref().unwrap_or(""))
                placeholder="subject (application, job, operator…)";
            button type="submit" { "Filter" }
        }
        " "
        form method="get" class="inline" action="/console/audit" {
            input type="hidden" name="verify" value="1";
            button type="submit" id="audit-verify" { "Verify the whole chain" }
        }
        @if let Some(r) = &verified {
            @if r.intact() {
                p class="msg ok" id="verify-result" {
                    "The chain is intact: " (r.entries) " entries, every hash and link checks. "
                    "Whether entries were cut from its end is checked against the signed checkpoints by "
                    code { "cardpipe audit verify" } "."
                }
            } @else {
                div class="msg err" id="verify-result" {
                    strong { "The chain is broken:" }
                    ul { @for p in &r.problems { li { (p) } } }
                }
            }
        }
        (table(
            &["#", "at", "actor", "role", "action", "subject", "details", "hash"],
            &rows,
        ))
    };
    frame(&s, "Audit log", body)
}

async fn area(st: &ConsoleState, s: &Session, area: &str, title: &str, what: &str) -> Response {
    match area_tables(st, area, what).await {
        Ok(tables) => frame(s, title, html! { h1 { (title) } (tables) }),
        Err(r) => r,
    }
}

/// The area's tables, read generically (or a "not available" note when it has none).
async fn area_tables(st: &ConsoleState, area: &str, what: &str) -> Result<Markup, Response> {
    let tables = match data::area_tables(&st.services, area).await {
        Ok(t) => t,
        Err(e) => return Err(internal(e)),
    };
    Ok(html! {
        @if tables.is_empty() {
            div class="na" id="not-available" {
                strong { "Not available." }
                " This installation has no " (what) " tables yet (the stage that keeps them is \
                 not part of this build, or its migrations have not run). Nothing to show."
            }
        }
        @for t in &tables {
            h2 {
                code { (t.name) }
                " (" (t.total) " rows"
                @if t.total > t.rows.len() as i64 { ", first " (t.rows.len()) }
                ")"
            }
            (generic_table(t))
        }
    })
}

fn generic_table(t: &data::GenericTable) -> Markup {
    let headers: Vec<&str> = t.columns.iter().map(String::as_str).collect();
    let rows: Vec<Vec<Markup>> = t
        .rows
        .iter()
        .map(|r| r.iter().map(|c| c.render()).collect())
        .collect();
    table(&headers, &rows)
}

async fn stock(State(st): State<ConsoleState>, headers: HeaderMap) -> Response {
    let s = match session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    area(
        &st,
        &s,
        "stock",
        "Blank-card stock and quality control",
        "blank-card stock or quality-control",
    )
    .await
}

async fn shipments(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    Query(f): Query<Flash>,
) -> Response {
    let s = match session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let list = match cardpipe_common::discrepancies::list(&st.services, false).await {
        Ok(l) => l,
        Err(e) => return internal(e),
    };
    let supervisor = s.operator.role.is_supervisor();
    let csrf = csrf_field(&s);
    let rows: Vec<Vec<Markup>> = list
        .iter()
        .map(|d| {
            let action = if !d.is_open() {
                html! {
                    strong { (d.resolution.as_deref().unwrap_or("")) }
                    " by " (d.resolved_by.as_deref().unwrap_or(""))
                    " at " (d.resolved_at.as_deref().unwrap_or(""))
                    @if let Some(r) = d.reprint_id.as_deref() { " (reprint " code { (r) } ")" }
                    br;
                    span class="muted" { (d.resolution_note.as_deref().unwrap_or("")) }
                }
            } else if supervisor {
                let options = cardpipe_common::discrepancies::Resolution::for_kind(&d.kind);
                html! {
                    form method="post" class="inline"
                        action=(format!("/console/shipments/discrepancies/{}/resolve", url(&d.id))) {
                        (csrf)
                        select name="outcome" {
                            @for o in options { option value=(o.as_str()) { (o.as_str()) } }
                        }
                        input type="text" name="note" placeholder="note" required maxlength="500";
                        button type="submit" { "Resolve" }
                    }
                }
            } else {
                html! { span class="muted" { "open (a supervisor resolves it)" } }
            };
            vec![
                html! { code { (d.id) } },
                d.kind.render(),
                html! { code { (d.box_id) } },
                d.office_code.render(),
                html! {
                    a href=(format!("/console/applications/{}", url(&d.application_id))) {
                        (d.application_id)
                    }
                },
                d.reported_by.render(),
                d.reported_at.render(),
                action,
            ]
        })
        .collect();
    let open = list.iter().filter(|d| d.is_open()).count();
    let title = "Shipments and office discrepancies";
    let tables = match area_tables(&st, "shipments", "shipping or delivery").await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let body = html! {
        h1 { (title) }
        (flash(f.ok.as_deref(), f.error.as_deref()))
        h2 id="discrepancies" { "Office discrepancies (" (open) " open)" }
        p class="muted" {
            "A missing card is " em { "found" } " (the office can then receive it) or "
            em { "lost" } " in transit (its certificates are revoked and a reprint is requested); \
             an extra card is " em { "returned" } " to the centre or its own office. Supervisors \
             resolve."
        }
        @if rows.is_empty() {
            p id="no-discrepancies" { "No discrepancy has been reported." }
        } @else {
            div id="discrepancy-list" {
                (table(
                    &[
                        "id",
                        "kind",
                        "box",
                        "office",
                        "card",
                        "reported by",
                        "reported at",
                        "resolution",
                    ],
                    &rows,
                ))
            }
        }
        (tables)
    };
    frame(&s, title, body)
}

#[derive(Deserialize)]
struct ResolveForm {
    csrf: String,
    outcome: String,
    #[serde(default)]
    note: String,
}

async fn resolve_discrepancy(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<ResolveForm>,
) -> Response {
    let s = match form_session(&st, &headers, &f.csrf).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    match actions::resolve_discrepancy(&st.services, &s.operator, &id, &f.outcome, &f.note).await {
        Ok(r) => back(
            "/console/shipments",
            Ok(format!(
                "discrepancy {id} resolved: {}{}",
                r.discrepancy.resolution.as_deref().unwrap_or(""),
                r.reprint_id
                    .map(|id| format!(" (reprint {id} requested)"))
                    .unwrap_or_default()
            )),
        ),
        Err(ActionError::Auth(AuthError::Forbidden(m))) => forbidden(&s, &m),
        Err(e) => back("/console/shipments", Err(action_error(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrf_tokens_compare_whole() {
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abc", "abd"));
        assert!(!same_token("abc", "ab"));
        assert!(!same_token("", ""));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; cardpipe_session=xyz"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE).as_deref(), Some("xyz"));
        let set = set_cookie("n", "v", 5, false);
        for part in [
            "n=v",
            "HttpOnly",
            "SameSite=Strict",
            "Path=/console",
            "Max-Age=5",
        ] {
            assert!(set.contains(part), "{set}");
        }
        assert!(!set.contains("Secure"), "{set}");
        assert!(set_cookie("n", "", 0, true).contains("Secure"));
    }

    /// Values from data (ids, errors, table cells, the CSRF token) cannot inject markup: text
    /// is escaped, attribute values keep their quotes, path components are percent-encoded.
    #[test]
    fn hostile_values_are_escaped_in_console_tables() {
        const HOSTILE: &str = "<script>alert(1)</script>";
        const QUOTED: &str = "j\" onclick=\"alert(2)";
        let session = Session {
            operator: crate::auth::Operator {
                login: "olga".into(),
                role: crate::auth::Role::Operator,
            },
            csrf: QUOTED.into(),
        };
        let parked = parked_rows(
            &session,
            &[parked::ParkedJob {
                job_id: QUOTED.into(),
                stage: HOSTILE.into(),
                subject: HOSTILE.into(),
                attempt: 3,
                error: HOSTILE.into(),
                parked_at: "2026-01-01T00:00:00Z".into(),
            }],
        )
        .into_string();
        let batches = batch_table(&[data::BatchProgress {
            id: QUOTED.into(),
            client: HOSTILE.into(),
            state: "received".into(),
            priority: "normal".into(),
            records: 2,
            accepted: 1,
            rejected: 1,
            created_at: HOSTILE.into(),
            states: Default::default(),
        }])
        .into_string();
        let generic = generic_table(&data::GenericTable {
            name: "t".into(),
            columns: vec![HOSTILE.into()],
            rows: vec![vec![QUOTED.into()]],
            total: 1,
        })
        .into_string();
        for out in [&parked, &batches, &generic] {
            assert!(!out.contains("<script"), "{out}");
            assert!(!out.contains("\" onclick="), "{out}");
            assert!(
                out.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
                "{out}"
            );
        }
        // Each of the three forms carries the token, its quotes escaped inside the value.
        assert_eq!(
            parked
                .matches("name=\"csrf\" value=\"j&quot; onclick=&quot;alert(2)\"")
                .count(),
            3,
            "{parked}"
        );
        assert!(
            parked.contains("action=\"/console/parked/j%22%20onclick%3D%22alert%282%29/retry\""),
            "{parked}"
        );
        assert!(
            parked.contains("<td><code>&lt;script&gt;alert(1)&lt;/script&gt;</code></td>"),
            "{parked}"
        );
        assert!(
            batches.contains(
                "<a href=\"/console/batches/j%22%20onclick%3D%22alert%282%29\" class=\"batch-link\">\
                 j&quot; onclick=&quot;alert(2)</a>"
            ),
            "{batches}"
        );
        assert!(
            generic.contains("<td>j&quot; onclick=&quot;alert(2)</td>"),
            "{generic}"
        );
    }
}
