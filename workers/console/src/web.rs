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
use crate::html::{bar, bidi, flash, ltr, page, role_name, table, ttable, url};
use crate::i18n::{self, LANG_COOKIE, Lang, Msg};

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
        .route("/console/lang", get(switch_language))
        .route("/console/assets/{file}", get(asset))
        .route("/console/dashboard", get(crate::dashboard::page))
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
        .fallback(page_not_found)
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

async fn security_headers(req: axum::extract::Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; img-src 'self'; font-src 'self'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
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

/// The request's language (the `cardpipe_lang` cookie, Persian without one) and path (where
/// the language switch comes back to).
#[derive(Debug, Clone)]
pub struct Ui {
    /// The page language.
    pub lang: Lang,
    /// This page's path and query.
    pub here: String,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Ui {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        let lang = Lang::from_code(cookie(&parts.headers, LANG_COOKIE).as_deref());
        let here = parts
            .uri
            .path_and_query()
            .map_or("/console/", |p| p.as_str());
        Ok(Ui {
            lang,
            here: i18n::safe_back(Some(here)),
        })
    }
}

impl Ui {
    /// A fixed text in the request's language.
    pub fn t(&self, m: Msg) -> &'static str {
        self.lang.t(m)
    }
}

#[derive(Deserialize)]
struct LangQuery {
    to: Option<String>,
    back: Option<String>,
}

/// `GET /console/lang?to=en&back=/console/…`: sets the language cookie (a year) and goes
/// back to the page, which must be a console path (anything else goes to the overview).
async fn switch_language(State(st): State<ConsoleState>, Query(q): Query<LangQuery>) -> Response {
    let lang = Lang::from_code(q.to.as_deref());
    let mut res = Redirect::to(&i18n::safe_back(q.back.as_deref())).into_response();
    if let Ok(v) = HeaderValue::from_str(&set_cookie(
        LANG_COOKIE,
        lang.code(),
        365 * 24 * 3600,
        st.secure_cookies,
    )) {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    res
}

/// The console's own files: the Vazirmatn font (SIL Open Font License 1.1, its text served
/// beside it), compiled into the binary.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "Vazirmatn-Regular.woff2",
        "font/woff2",
        include_bytes!("../assets/Vazirmatn-Regular.woff2"),
    ),
    (
        "Vazirmatn-Bold.woff2",
        "font/woff2",
        include_bytes!("../assets/Vazirmatn-Bold.woff2"),
    ),
    (
        "Vazirmatn-OFL.txt",
        "text/plain; charset=utf-8",
        include_bytes!("../assets/Vazirmatn-OFL.txt"),
    ),
];

/// `GET /console/assets/{file}`: no session needed (the login page uses the font); cached
/// for a year (the files change only with the binary).
async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, bytes)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
            ],
            *bytes,
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Any other path: a 404 page in the request's language.
async fn page_not_found(ui: Ui) -> Response {
    let mut res = html(page(
        ui.lang,
        "/console/",
        ui.t(Msg::NotFound),
        None,
        html! {
            h1 { (ui.t(Msg::NotFound)) }
            p { (ui.t(Msg::NotFoundText)) }
            p { a href="/console/" { (ui.t(Msg::Overview)) } }
        },
    ));
    *res.status_mut() = StatusCode::NOT_FOUND;
    res
}

fn html(page: Markup) -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page.into_string(),
    )
        .into_response()
}

pub(crate) fn internal(ui: &Ui, e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "console");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page(
            ui.lang,
            &ui.here,
            ui.t(Msg::Error),
            None,
            html! { h1 { (ui.t(Msg::InternalError)) } p { (ui.t(Msg::ErrorLogged)) } },
        )
        .into_string(),
    )
        .into_response()
}

/// The session of the request, or a redirect to the login page.
pub(crate) async fn session(
    st: &ConsoleState,
    ui: &Ui,
    headers: &HeaderMap,
) -> Result<Session, Response> {
    let Some(token) = cookie(headers, SESSION_COOKIE) else {
        return Err(Redirect::to("/console/login").into_response());
    };
    match auth::session(&st.services.store, &token, st.services.clock.now()).await {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(Redirect::to("/console/login").into_response()),
        Err(e) => Err(internal(ui, e)),
    }
}

pub(crate) fn frame(ui: &Ui, s: &Session, title: &str, body: Markup) -> Response {
    html(page(
        ui.lang,
        &ui.here,
        title,
        Some((&s.operator.login, s.operator.role.as_str(), &s.csrf)),
        body,
    ))
}

fn forbidden(ui: &Ui, s: &Session, message: &str) -> Response {
    let mut res = frame(
        ui,
        s,
        ui.t(Msg::NotAllowed),
        html! {
            h1 { (ui.t(Msg::NotAllowed)) }
            p class="msg err" {
                (ui.t(Msg::ErrForbidden)) "."
                @if ui.lang == Lang::Fa {
                    br; span class="muted" { (ui.t(Msg::ErrDetails)) ": " bdi dir="ltr" lang="en" { (message) } }
                } @else {
                    " " (message)
                }
            }
        },
    );
    *res.status_mut() = StatusCode::FORBIDDEN;
    res
}

/// Constant-time comparison of CSRF tokens.
fn same_token(a: &str, b: &str) -> bool {
    !a.is_empty() && bool::from(subtle::ConstantTimeEq::ct_eq(a.as_bytes(), b.as_bytes()))
}

#[allow(clippy::result_large_err)] // the error is the page to answer with
fn check_csrf(ui: &Ui, s: &Session, token: &str) -> Result<(), Response> {
    if same_token(&s.csrf, token) {
        Ok(())
    } else {
        let mut res = frame(
            ui,
            s,
            ui.t(Msg::FormExpired),
            html! {
                h1 { (ui.t(Msg::FormExpired)) }
                p class="msg err" { (ui.t(Msg::FormExpiredText)) }
            },
        );
        *res.status_mut() = StatusCode::FORBIDDEN;
        Err(res)
    }
}

/// The session of a form post, its CSRF token checked (every state-changing form).
async fn form_session(
    st: &ConsoleState,
    ui: &Ui,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<Session, Response> {
    let s = session(st, ui, headers).await?;
    check_csrf(ui, &s, csrf)?;
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

/// An action's failure for the flash message: in English the error as is; in Persian the
/// kind of failure, then the error's own (English, shared with `cardpipe ops`) text as detail.
fn action_error(lang: Lang, e: ActionError) -> String {
    let kind = match &e {
        ActionError::Internal(e) => {
            tracing::error!(error = %e, "console action failed");
            return lang.t(Msg::ActionInternal).into();
        }
        ActionError::BadInput(_) => Msg::ErrBadInput,
        ActionError::NotFound(_) => Msg::ErrNotFound,
        ActionError::Conflict(_) => Msg::ErrConflict,
        ActionError::Auth(AuthError::Forbidden(_)) => Msg::ErrForbidden,
        ActionError::Auth(_) => Msg::ErrBadInput,
    };
    match lang {
        Lang::En => e.to_string(),
        Lang::Fa => format!("{} ({}: {e})", lang.t(kind), lang.t(Msg::ErrDetails)),
    }
}

/// A sign-in failure in `lang`.
fn auth_error(lang: Lang, e: &AuthError) -> String {
    match e {
        AuthError::BadCredentials => lang.t(Msg::BadCredentials).into(),
        AuthError::RateLimited(seconds) => i18n::rate_limited(lang, *seconds),
        AuthError::Busy => lang.t(Msg::LoginBusy).into(),
        other => other.to_string(),
    }
}

#[derive(Debug, Deserialize, Default)]
struct Flash {
    ok: Option<String>,
    error: Option<String>,
}

// ---------------------------------------------------------------------------
// Login

async fn login_form(State(st): State<ConsoleState>, ui: Ui, Query(f): Query<Flash>) -> Response {
    let token = hex::encode(rand::random::<[u8; 16]>());
    let body = html! {
        h1 { (ui.t(Msg::SignInTitle)) }
        (flash(f.ok.as_deref(), f.error.as_deref()))
        form method="post" action="/console/login" id="login" {
            input type="hidden" name="csrf" value=(token);
            p {
                label {
                    (ui.t(Msg::Login)) br;
                    input type="text" name="login" id="login-name" autocomplete="username" required;
                }
            }
            p {
                label {
                    (ui.t(Msg::Password)) br;
                    input type="password" name="password" id="login-password"
                        autocomplete="current-password" required;
                }
            }
            p { button type="submit" id="login-submit" { (ui.t(Msg::SignIn)) } }
        }
    };
    let mut res = html(page(ui.lang, &ui.here, ui.t(Msg::SignIn), None, body));
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
    ui: Ui,
    ClientAddress(client): ClientAddress,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let expected = cookie(&headers, LOGIN_CSRF_COOKIE).unwrap_or_default();
    if !same_token(&expected, &f.csrf) {
        return back("/console/login", Err(ui.t(Msg::LoginExpired).into()));
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
            return back("/console/login", Err(auth_error(ui.lang, &e)));
        }
        Err(e) => return internal(&ui, e),
    };
    let (token, session) = match auth::start_session(&st.services.store, &operator.login, now).await
    {
        Ok(s) => s,
        Err(e) => return internal(&ui, e),
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
        return internal(&ui, e);
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
    ui: Ui,
    headers: HeaderMap,
    Form(f): Form<CsrfOnly>,
) -> Response {
    let s = match form_session(&st, &ui, &headers, &f.csrf).await {
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
    let mut res = back("/console/login", Ok(ui.t(Msg::SignedOut).into()));
    if let Ok(v) = HeaderValue::from_str(&set_cookie(SESSION_COOKIE, "", 0, st.secure_cookies)) {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    res
}

// ---------------------------------------------------------------------------
// Overview, batches, search, applications

async fn overview(State(st): State<ConsoleState>, ui: Ui, headers: HeaderMap) -> Response {
    let s = match session(&st, &ui, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let o = match data::overview(&st.services, &st.stages).await {
        Ok(o) => o,
        Err(e) => return internal(&ui, e),
    };
    let lang = ui.lang;
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
        .map(|(s, n)| vec![state(lang, s.as_str()), lang.num(n).render()])
        .collect();
    let queue_rows: Vec<Vec<Markup>> = o
        .queues
        .iter()
        .map(|(stage, d)| match d {
            Some(d) => vec![
                ltr(stage),
                lang.num(d.ready).render(),
                lang.num(d.retrying).render(),
                lang.num(d.parked).render(),
            ],
            None => vec![ltr(stage), "—".render(), "—".render(), "—".render()],
        })
        .collect();
    let throughput_rows: Vec<Vec<Markup>> = o
        .throughput_last_hour
        .iter()
        .map(|(s, n)| vec![state(lang, s), lang.num(n).render()])
        .collect();
    let body = html! {
        h1 { (ui.t(Msg::PipelineOverview)) }
        div class="cards" {
            div class="card" {
                div class="n" id="total-applications" data-n=(total) { (lang.num(total)) }
                (ui.t(Msg::Applications))
            }
            div class="card" { div class="n" { (lang.num(possible_duplicates)) } (ui.t(Msg::PossibleDuplicates)) }
            div class="card" { div class="n" id="parked-count" { (lang.num(o.parked)) } (ui.t(Msg::ParkedJobs)) }
            div class="card" {
                div class="n" { (lang.num(changes_last_hour)) } (ui.t(Msg::StateChangesLastHour))
            }
        }
        h2 { (ui.t(Msg::ApplicationsPerState)) }
        (ttable(lang, &[Msg::State, Msg::Applications], &state_rows))
        h2 { (ui.t(Msg::Queues)) }
        @if queue_rows.is_empty() {
            p class="muted" { (ui.t(Msg::NoStageHere)) }
        } @else {
            (ttable(lang, &[Msg::Stage, Msg::Ready, Msg::Retrying, Msg::Parked], &queue_rows))
        }
        h2 { (ui.t(Msg::Throughput)) }
        (ttable(lang, &[Msg::EnteredState, Msg::Changes], &throughput_rows))
        h2 { (ui.t(Msg::Batches)) }
        (batch_table(lang, &o.batches))
    };
    frame(&ui, &s, ui.t(Msg::Overview), body)
}

/// A state, stage or other code of the pipeline: Latin, left to right (the same words as
/// the logs, the metrics and `cardpipe ops`).
fn state_code(code: &str) -> Markup {
    html! { code dir="ltr" { (code) } }
}

/// An application state: in English its stored name (as everywhere else), in Persian its
/// Persian name with the stored name after it.
pub(crate) fn state(lang: Lang, code: &str) -> Markup {
    match (lang, i18n::state_name(code)) {
        (Lang::Fa, Some(m)) => html! {
            span class="state" { (m.text(lang)) } " " code dir="ltr" class="muted" { (code) }
        },
        _ => state_code(code),
    }
}

fn batch_table(lang: Lang, batches: &[data::BatchProgress]) -> Markup {
    let rows: Vec<Vec<Markup>> = batches
        .iter()
        .map(|b| {
            vec![
                html! {
                    a href=(format!("/console/batches/{}", url(&b.id))) class="batch-link" dir="ltr" { (b.id) }
                },
                ltr(&b.client),
                state(lang, &b.state),
                state_code(&b.priority),
                lang.num(b.records).render(),
                lang.num(b.accepted).render(),
                lang.num(b.rejected).render(),
                bar(lang, b.fraction()),
                lang.stored_time(&b.created_at).render(),
            ]
        })
        .collect();
    ttable(
        lang,
        &[
            Msg::BatchCol,
            Msg::Client,
            Msg::State,
            Msg::Priority,
            Msg::Records,
            Msg::Accepted,
            Msg::Rejected,
            Msg::Progress,
            Msg::Received,
        ],
        &rows,
    )
}

async fn batch(
    State(st): State<ConsoleState>,
    ui: Ui,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let s = match session(&st, &ui, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let b = match data::batch(&st.services, &id).await {
        Ok(Some(b)) => b,
        Ok(None) => return not_found(&ui, &s, ui.t(Msg::NoSuchBatch)),
        Err(e) => return internal(&ui, e),
    };
    let lang = ui.lang;
    let apps = match data::batch_applications(&st.services, &id, 500).await {
        Ok(a) => a,
        Err(e) => return internal(&ui, e),
    };
    let state_rows: Vec<Vec<Markup>> = b
        .states
        .iter()
        .map(|(s, n)| vec![state(lang, s), lang.num(n).render()])
        .collect();
    let app_rows: Vec<Vec<Markup>> = apps
        .iter()
        .map(|(id, reg, st, at)| {
            vec![
                html! { a href=(format!("/console/applications/{}", url(id))) dir="ltr" { (id) } },
                ltr(reg),
                state(lang, st),
                lang.stored_time(at).render(),
            ]
        })
        .collect();
    let body = html! {
        h1 { (ui.t(Msg::Batch)) " " code dir="ltr" { (b.id) } }
        (batch_table(lang, std::slice::from_ref(&b)))
        h2 { (ui.t(Msg::ApplicationsPerState)) }
        (ttable(lang, &[Msg::State, Msg::Applications], &state_rows))
        h2 { (ui.t(Msg::Applications)) " (" (ui.t(Msg::First)) " " (lang.num(apps.len())) ")" }
        (ttable(lang, &[Msg::ApplicationCol, Msg::RegistryId, Msg::State, Msg::Updated], &app_rows))
    };
    frame(&ui, &s, ui.t(Msg::Batch), body)
}

fn not_found(ui: &Ui, s: &Session, what: &str) -> Response {
    let mut res = frame(ui, s, what, html! { h1 { (what) } });
    *res.status_mut() = StatusCode::NOT_FOUND;
    res
}

#[derive(Deserialize)]
struct SearchQuery {
    q: Option<String>,
}

async fn search(
    State(st): State<ConsoleState>,
    ui: Ui,
    headers: HeaderMap,
    Query(q): Query<SearchQuery>,
) -> Response {
    let s = match session(&st, &ui, &headers).await {
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
            Err(e) => return internal(&ui, e),
        }
    }
    let body = html! {
        h1 { (ui.t(Msg::FindApplication)) }
        form method="get" action="/console/search" class="inline" {
            input type="text" name="q" id="search-q" size="40" value=(query) dir="ltr"
                placeholder=(ui.t(Msg::SearchPlaceholder));
            button type="submit" id="search-submit" { (ui.t(Msg::Search)) }
        }
        @if not_found {
            p class="msg err" {
                (ui.t(Msg::NoApplicationWith)) " " (ltr(query.trim())) "."
            }
        }
    };
    frame(&ui, &s, ui.t(Msg::Search), body)
}

async fn application(
    State(st): State<ConsoleState>,
    ui: Ui,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(f): Query<Flash>,
) -> Response {
    let s = match session(&st, &ui, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let v = match data::application(&st.services, &ApplicationId(id.clone())).await {
        Ok(Some(v)) => v,
        Ok(None) => return not_found(&ui, &s, ui.t(Msg::NoSuchApplication)),
        Err(e) => return internal(&ui, e),
    };
    let lang = ui.lang;
    let t = |m| lang.t(m);
    // Quality-control reports (formerly GET /api/qc/{id}, now only here).
    let reports = match data::qc_reports(&st.services, &v.app.id).await {
        Ok(r) => r,
        Err(e) => return internal(&ui, e),
    };
    let certificates = match data::certificates(&st.services, &v.app.id).await {
        Ok(c) => c,
        Err(e) => return internal(&ui, e),
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
        vec![t(Msg::RegistryId).render(), ltr(&v.app.registry_id)],
        vec![
            t(Msg::State).render(),
            html! { strong id="app-state" { (state(lang, v.app.state.as_str())) } },
        ],
        vec![
            t(Msg::Name).render(),
            html! { span id="app-name" { (bidi(&format!("{first} {last}"))) } },
        ],
        vec![t(Msg::FathersName).render(), bidi(&father)],
        vec![
            t(Msg::NationalCode).render(),
            html! { code id="national-code" dir="ltr" { (v.national_code.as_deref().unwrap_or("—")) } },
        ],
        vec![
            t(Msg::TrackingCode).render(),
            ltr(v.tracking_code.as_deref().unwrap_or("—")),
        ],
        vec![
            t(Msg::PickupOffice).render(),
            ltr(v.pickup_office.as_deref().unwrap_or("—")),
        ],
        vec![
            t(Msg::BatchCol).render(),
            v.app.batch_id.as_deref().map_or("—".render(), |b| {
                html! { a href=(format!("/console/batches/{}", url(b))) dir="ltr" { (b) } }
            }),
        ],
        vec![
            t(Msg::Priority).render(),
            state_code(v.app.priority.as_str()),
        ],
    ];
    let history: Vec<Vec<Markup>> = v
        .history
        .iter()
        .map(|h| {
            vec![
                lang.datetime(h.at).render(),
                h.from_state
                    .map_or("—".render(), |s| state(lang, s.as_str())),
                state(lang, h.to_state.as_str()),
                state_code(&h.stage),
                lang.num(h.attempt).render(),
                ltr(&h.actor),
                ltr(h.reason.as_deref().unwrap_or("")),
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
        .map(|(k, key)| vec![state_code(k), html! { code dir="ltr" { (key) } }])
        .collect();
    let body = html! {
        h1 { (t(Msg::Application)) " " code dir="ltr" { (v.app.id.as_str()) } }
        (flash(f.ok.as_deref(), f.error.as_deref()))
        (table(&["", ""], &rows))
        @if v.app.state == ApplicationState::PossibleDuplicate {
            p {
                a href=(format!("/console/adjudications/{}", url(v.app.id.as_str()))) {
                    (t(Msg::AdjudicateThis))
                }
            }
        }
        h2 { (t(Msg::History)) }
        div id="history" {
            (ttable(
                lang,
                &[Msg::At, Msg::From, Msg::To, Msg::Stage, Msg::Attempt, Msg::Actor, Msg::Reason],
                &history,
            ))
        }
        @if !v.parked.is_empty() {
            h2 { (t(Msg::ParkedWork)) }
            (parked_rows(lang, &s, &v.parked))
        }
        @if !report_rows.is_empty() {
            h2 { (t(Msg::QualityControl)) }
            div id="qc-reports" {
                (ttable(
                    lang,
                    &[
                        Msg::CheckedAt,
                        Msg::Outcome,
                        Msg::Reason,
                        Msg::BlankSerial,
                        Msg::ChipSerial,
                        Msg::Ms,
                        Msg::Report,
                    ],
                    &report_rows,
                ))
            }
        }
        @if !certificate_rows.is_empty() {
            h2 { (t(Msg::Certificates)) }
            div id="certificates" {
                (ttable(
                    lang,
                    &[
                        Msg::Serial,
                        Msg::Key,
                        Msg::IssuedAt,
                        Msg::Status,
                        Msg::RevocationCause,
                        Msg::RevokedAt,
                    ],
                    &certificate_rows,
                ))
            }
        }
        h2 { (t(Msg::Artifacts)) }
        (ttable(lang, &[Msg::Kind, Msg::ObjectKey], &artifacts))
    };
    frame(&ui, &s, t(Msg::Application), body)
}

// ---------------------------------------------------------------------------
// Adjudication

async fn adjudications(
    State(st): State<ConsoleState>,
    ui: Ui,
    headers: HeaderMap,
    Query(f): Query<Flash>,
) -> Response {
    let s = match session(&st, &ui, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let list = match data::adjudications(&st.services).await {
        Ok(l) => l,
        Err(e) => return internal(&ui, e),
    };
    let lang = ui.lang;
    let rows: Vec<Vec<Markup>> = list
        .iter()
        .map(|a| {
            vec![
                html! {
                    a class="adjudicate-link" dir="ltr"
                        href=(format!("/console/adjudications/{}", url(&a.application_id))) {
                        (a.application_id)
                    }
                },
                ltr(&a.registry_id),
                lang.stored_time(&a.flagged_at).render(),
                lang.num(a.candidates).render(),
                lang.num(format_args!("{:.1}", a.best_score)).render(),
            ]
        })
        .collect();
    let body = html! {
        h1 { (ui.t(Msg::PossibleDuplicatesTitle)) }
        (flash(f.ok.as_deref(), f.error.as_deref()))
        @if rows.is_empty() {
            p id="no-adjudications" { (ui.t(Msg::NoAdjudications)) }
        } @else {
            (ttable(
                lang,
                &[Msg::ApplicationCol, Msg::RegistryId, Msg::Flagged, Msg::Candidates, Msg::BestScore],
                &rows,
            ))
        }
    };
    frame(&ui, &s, ui.t(Msg::Adjudication), body)
}

async fn adjudication(
    State(st): State<ConsoleState>,
    ui: Ui,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(f): Query<Flash>,
) -> Response {
    let s = match session(&st, &ui, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let app_id = ApplicationId(id.clone());
    let app = match st.services.store.application(&app_id).await {
        Ok(Some(a)) => a,
        Ok(None) => return not_found(&ui, &s, ui.t(Msg::NoSuchApplication)),
        Err(e) => return internal(&ui, e),
    };
    let lang = ui.lang;
    let t = |m| lang.t(m);
    let cands = match cardpipe_common::contract::candidates(&st.services.store, &app_id).await {
        Ok(c) => c,
        Err(e) => return internal(&ui, e),
    };
    if cands.is_empty() {
        return not_found(&ui, &s, ui.t(Msg::NeverFlagged));
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
        h1 { (t(Msg::PossibleDuplicate)) " " code dir="ltr" { (id) } }
        (flash(f.ok.as_deref(), f.error.as_deref()))
        p {
            (t(Msg::State)) ": " strong id="adj-state" { (state(lang, app.state.as_str())) } " · "
            a href=(format!("/console/applications/{here}")) { (t(Msg::ApplicationDetail)) }
        }
        @for (c, applicant_name, candidate_name) in &shown {
            h2 {
                (t(Msg::Candidate)) " " (lang.num(c.rank)) " — " (t(Msg::FusedScore)) " "
                (lang.num(format_args!("{:.1}", c.score)))
                ", FMR " bdi dir="ltr" { (format_args!("{:.2e}", c.fmr)) }
            }
            div class="photos" {
                figure {
                    img alt=(t(Msg::ApplicantPhoto))
                        src=(format!("/console/adjudications/{here}/photo/applicant"));
                    figcaption { (t(Msg::ThisApplication)) ": " (applicant_name) }
                }
                figure {
                    img alt=(t(Msg::CandidatePhoto))
                        src=(format!("/console/adjudications/{here}/photo/{}", url(&c.candidate_id)));
                    figcaption {
                        (t(Msg::Candidate)) " "
                        a href=(format!("/console/applications/{}", url(&c.candidate_id))) dir="ltr" {
                            (c.candidate_id)
                        }
                        ": " (candidate_name)
                    }
                }
            }
            (ttable(lang, &[Msg::Position, Msg::Finger, Msg::Score], &finger_rows(lang, &c.finger_scores)))
        }
        @if app.state == ApplicationState::PossibleDuplicate {
            h2 { (t(Msg::Decision)) }
            form method="post" action=(format!("/console/adjudications/{here}/decide")) id="decide" {
                (csrf_field(&s))
                p {
                    label {
                        input type="radio" name="decision" value="cleared" id="decision-cleared"
                            required;
                        " " (t(Msg::DecisionClear))
                    }
                    br;
                    label {
                        input type="radio" name="decision" value="confirmed_duplicate"
                            id="decision-confirm";
                        " " (t(Msg::DecisionConfirm))
                    }
                }
                p {
                    label {
                        (t(Msg::ReasonLabel)) br;
                        input type="text" name="reason" id="decision-reason" size="60" required
                            maxlength="500";
                    }
                }
                p { button type="submit" id="decision-submit" { (t(Msg::RecordDecision)) } }
            }
        }
    };
    frame(&ui, &s, t(Msg::Adjudication), body)
}

/// The per-finger scores of a candidate: position, finger, score.
fn finger_rows(lang: Lang, scores: &[Option<f64>]) -> Vec<Vec<Markup>> {
    scores
        .iter()
        .enumerate()
        .map(|(i, score)| {
            vec![
                lang.num(i + 1).render(),
                FINGERS.get(i).map_or("", |m| lang.t(*m)).render(),
                score.map_or("—".render(), |v| {
                    lang.num(format_args!("{v:.1}")).render()
                }),
            ]
        })
        .collect()
}

/// ISO/IEC 19794-2 finger positions 1..=10.
const FINGERS: [Msg; 10] = [
    Msg::FingerRightThumb,
    Msg::FingerRightIndex,
    Msg::FingerRightMiddle,
    Msg::FingerRightRing,
    Msg::FingerRightLittle,
    Msg::FingerLeftThumb,
    Msg::FingerLeftIndex,
    Msg::FingerLeftMiddle,
    Msg::FingerLeftRing,
    Msg::FingerLeftLittle,
];

async fn photo(
    State(st): State<ConsoleState>,
    ui: Ui,
    headers: HeaderMap,
    Path((id, which)): Path<(String, String)>,
) -> Response {
    if let Err(r) = session(&st, &ui, &headers).await {
        return r;
    }
    let app_id = ApplicationId(id);
    let cands = match cardpipe_common::contract::candidates(&st.services.store, &app_id).await {
        Ok(c) => c,
        Err(e) => return internal(&ui, e),
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
        Err(e) => internal(&ui, e),
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
    ui: Ui,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<DecideForm>,
) -> Response {
    let s = match form_session(&st, &ui, &headers, &f.csrf).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let here = format!("/console/adjudications/{}", url(&id));
    match actions::adjudicate(&st.services, &s.operator, &id, &f.decision, &f.reason).await {
        Ok(to) => back(&here, Ok(i18n::decided(ui.lang, to.as_str()))),
        Err(ActionError::Auth(AuthError::Forbidden(m))) => forbidden(&ui, &s, &m),
        Err(e) => back(&here, Err(action_error(ui.lang, e))),
    }
}

// ---------------------------------------------------------------------------
// Parked work

fn parked_rows(lang: Lang, s: &Session, jobs: &[parked::ParkedJob]) -> Markup {
    let t = |m| lang.t(m);
    let csrf = csrf_field(s);
    let rows: Vec<Vec<Markup>> = jobs
        .iter()
        .map(|p| {
            let job = url(&p.job_id);
            vec![
                html! { code { (p.job_id) } },
                state_code(&p.stage),
                html! { a href=(format!("/console/applications/{}", url(&p.subject))) dir="ltr" { (p.subject) } },
                lang.num(p.attempt).render(),
                html! { code dir="ltr" { (p.error) } },
                lang.stored_time(&p.parked_at).render(),
                html! {
                    form method="post" class="inline" action=(format!("/console/parked/{job}/retry")) {
                        (csrf)
                        button type="submit" class="retry" { (t(Msg::Retry)) }
                    }
                    form method="post" class="inline" action=(format!("/console/parked/{job}/drop")) {
                        (csrf)
                        input type="text" name="reason" placeholder=(t(Msg::ReasonPlaceholder)) required maxlength="500";
                        button type="submit" class="danger" { (t(Msg::Drop)) }
                    }
                    form method="post" class="inline" action=(format!("/console/parked/{job}/fail")) {
                        (csrf)
                        input type="text" name="reason" placeholder=(t(Msg::ReasonPlaceholder)) required maxlength="500";
                        button type="submit" class="danger" { (t(Msg::ForceFail)) }
                    }
                },
            ]
        })
        .collect();
    ttable(
        lang,
        &[
            Msg::Job,
            Msg::Stage,
            Msg::ApplicationCol,
            Msg::Attempts,
            Msg::LastError,
            Msg::ParkedAt,
            Msg::Actions,
        ],
        &rows,
    )
}

async fn parked_page(
    State(st): State<ConsoleState>,
    ui: Ui,
    headers: HeaderMap,
    Query(f): Query<Flash>,
) -> Response {
    let s = match session(&st, &ui, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let jobs = match parked::list(&st.services, None).await {
        Ok(j) => j,
        Err(e) => return internal(&ui, e),
    };
    let letters = match st.services.store.dead_letters(500).await {
        Ok(l) => l,
        Err(e) => return internal(&ui, e),
    };
    let lang = ui.lang;
    let t = |m| lang.t(m);
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
                        button type="submit" { (t(Msg::Requeue)) }
                    }
                    form method="post" class="inline"
                        action=(format!("/console/dead-letters/{}/discard", d.seq)) {
                        (csrf)
                        input type="text" name="reason" placeholder=(t(Msg::ReasonPlaceholder)) required maxlength="500";
                        button type="submit" { (t(Msg::Discard)) }
                    }
                }
            } else {
                html! { span class="muted" { (t(Msg::SupervisorRequeues)) } }
            };
            vec![
                lang.num(d.seq).render(),
                state_code(&d.topic),
                ltr(&d.subject),
                lang.stored_time(&d.created_at).render(),
                lang.stored_time(&d.dead_at).render(),
                lang.num(d.attempts).render(),
                ltr(&d.last_error),
                action,
            ]
        })
        .collect();
    let body = html! {
        h1 { (t(Msg::ParkedWork)) }
        (flash(f.ok.as_deref(), f.error.as_deref()))
        p class="muted" { (t(Msg::ParkedHelp)) }
        @if jobs.is_empty() {
            p id="no-parked" { (t(Msg::NothingParked)) }
        } @else {
            div id="parked" { (parked_rows(lang, &s, &jobs)) }
        }
        h2 id="dead-letters" { (i18n::dead_letters_heading(lang, letters.len())) }
        p class="muted" { (t(Msg::DeadLettersHelp)) }
        @if letter_rows.is_empty() {
            p id="no-dead-letters" { (t(Msg::NoDeadLetters)) }
        } @else {
            div id="dead-letter-list" {
                (table(
                    &[
                        t(Msg::Number),
                        t(Msg::Topic),
                        t(Msg::Subject),
                        t(Msg::Written),
                        t(Msg::GivenUp),
                        t(Msg::Attempts),
                        t(Msg::LastError),
                        "",
                    ],
                    &letter_rows,
                ))
            }
        }
    };
    frame(&ui, &s, t(Msg::ParkedWork), body)
}

#[derive(Deserialize)]
struct ReasonForm {
    csrf: String,
    #[serde(default)]
    reason: String,
}

async fn parked_action(
    State(st): State<ConsoleState>,
    ui: Ui,
    headers: HeaderMap,
    Path((job, action)): Path<(String, String)>,
    Form(f): Form<ReasonForm>,
) -> Response {
    let s = match form_session(&st, &ui, &headers, &f.csrf).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let outcome = match action.as_str() {
        "retry" => actions::parked_retry(&st.services, &s.operator, &job)
            .await
            .map(|j| i18n::job_retried(ui.lang, &job, &j.stage, &j.id)),
        "drop" => actions::parked_drop(&st.services, &s.operator, &job, &f.reason)
            .await
            .map(|p| i18n::job_dropped(ui.lang, &job, &p.subject)),
        "fail" => actions::parked_fail(&st.services, &s.operator, &job, &f.reason)
            .await
            .map(|to| i18n::job_failed(ui.lang, &job, to.as_str())),
        _ => return page_not_found(ui).await,
    };
    match outcome {
        Ok(m) => back("/console/parked", Ok(m)),
        Err(ActionError::Auth(AuthError::Forbidden(m))) => forbidden(&ui, &s, &m),
        Err(e) => back("/console/parked", Err(action_error(ui.lang, e))),
    }
}

async fn dead_letter_action(
    State(st): State<ConsoleState>,
    ui: Ui,
    headers: HeaderMap,
    Path((seq, action)): Path<(i64, String)>,
    Form(f): Form<ReasonForm>,
) -> Response {
    let s = match form_session(&st, &ui, &headers, &f.csrf).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let outcome = match action.as_str() {
        "requeue" => actions::dead_letter_requeue(&st.services, &s.operator, seq)
            .await
            .map(|d| i18n::dead_letter_done(ui.lang, seq, &d.topic, &d.subject, true)),
        "discard" => actions::dead_letter_discard(&st.services, &s.operator, seq, &f.reason)
            .await
            .map(|d| i18n::dead_letter_done(ui.lang, seq, &d.topic, &d.subject, false)),
        _ => return page_not_found(ui).await,
    };
    match outcome {
        Ok(m) => back("/console/parked", Ok(m)),
        Err(ActionError::Auth(AuthError::Forbidden(m))) => forbidden(&ui, &s, &m),
        Err(e) => back("/console/parked", Err(action_error(ui.lang, e))),
    }
}

// ---------------------------------------------------------------------------
// Encoders

async fn encoders(
    State(st): State<ConsoleState>,
    ui: Ui,
    headers: HeaderMap,
    Query(f): Query<Flash>,
) -> Response {
    let s = match session(&st, &ui, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let farm = st.farm();
    let list = match data::encoders(&st.services, farm.as_deref()).await {
        Ok(l) => l,
        Err(e) => return internal(&ui, e),
    };
    let lang = ui.lang;
    let t = |m| lang.t(m);
    let csrf = csrf_field(&s);
    let rows: Vec<Vec<Markup>> = list
        .iter()
        .map(|e| {
            let state = match (e.present, e.in_service) {
                (Some(false), _) => html! { (t(Msg::Absent)) },
                (_, true) => html! { (t(Msg::InService)) },
                (_, false) => html! {
                    (t(Msg::OutOfService)) ": " (ltr(e.reason.as_deref().unwrap_or("")))
                },
            };
            let (in_service, label, class) = if e.in_service {
                ("0", t(Msg::TakeOut), "danger")
            } else {
                ("1", t(Msg::ReturnToService), "light")
            };
            vec![
                ltr(&e.name),
                state,
                e.busy
                    .map_or("—", |b| if b { t(Msg::Busy) } else { t(Msg::Idle) })
                    .render(),
                lang.num(e.personalized).render(),
                lang.num(e.spoiled).render(),
                e.yield_ratio()
                    .map_or("—".render(), |y| lang.percent(y).render()),
                lang.num(e.last_hour).render(),
                html! {
                    form method="post" class="inline" action="/console/encoders/service" {
                        (csrf)
                        input type="hidden" name="encoder" value=(e.name);
                        input type="hidden" name="in_service" value=(in_service);
                        input type="text" name="reason" placeholder=(t(Msg::ReasonPlaceholder)) required maxlength="500";
                        button type="submit" class=(class) { (label) }
                    }
                },
            ]
        })
        .collect();
    let body = html! {
        h1 { (t(Msg::Encoders)) }
        (flash(f.ok.as_deref(), f.error.as_deref()))
        p class="muted" {
            @if farm.is_some() { (t(Msg::FarmLive)) } @else { (t(Msg::FarmNone)) }
        }
        @if rows.is_empty() {
            p id="no-encoders" { (t(Msg::NoEncoder)) }
        } @else {
            (ttable(
                lang,
                &[
                    Msg::Encoder,
                    Msg::State,
                    Msg::Now,
                    Msg::Personalized,
                    Msg::Spoiled,
                    Msg::Yield,
                    Msg::CardsLastHour,
                    Msg::Service,
                ],
                &rows,
            ))
        }
    };
    frame(&ui, &s, t(Msg::Encoders), body)
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
    ui: Ui,
    headers: HeaderMap,
    Form(f): Form<EncoderForm>,
) -> Response {
    let s = match form_session(&st, &ui, &headers, &f.csrf).await {
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
            Ok(i18n::encoder_done(ui.lang, &f.encoder, in_service)),
        ),
        Err(ActionError::Auth(AuthError::Forbidden(m))) => forbidden(&ui, &s, &m),
        Err(e) => back("/console/encoders", Err(action_error(ui.lang, e))),
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
    ui: Ui,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Response {
    let s = match session(&st, &ui, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if !s.operator.role.can_audit() {
        return forbidden(&ui, &s, "the audit log is for supervisors and auditors");
    }
    let subject = q.subject.filter(|x| !x.trim().is_empty());
    let entries = match audit::recent(&st.services.store, subject.as_deref(), 300).await {
        Ok(e) => e,
        Err(e) => return internal(&ui, e),
    };
    let verified = if q.verify.is_some() {
        match audit::verify(&st.services.store).await {
            Ok(r) => Some(r),
            Err(e) => return internal(&ui, e),
        }
    } else {
        None
    };
    let lang = ui.lang;
    let t = |m| lang.t(m);
    let rows: Vec<Vec<Markup>> = entries
        .iter()
        .map(|e| {
            vec![
                lang.num(e.seq).render(),
                lang.stored_time(&e.at).render(),
                ltr(&e.actor),
                role_name(lang, &e.role).render(),
                state_code(&e.action),
                ltr(&e.subject),
                html! { code dir="ltr" { (e.details) } },
                html! { code title=(e.hash) dir="ltr" { (e.hash[..12.min(e.hash.len())]) "…" } },
            ]
        })
        .collect();
    let body = html! {
        h1 { (t(Msg::AuditLog)) }
        form method="get" class="inline" action="/console/audit" {
            input type="text" name="subject" value=(subject.as_deref().unwrap_or(""))
                placeholder=(t(Msg::SubjectPlaceholder));
            button type="submit" { (t(Msg::Filter)) }
        }
        " "
        form method="get" class="inline" action="/console/audit" {
            input type="hidden" name="verify" value="1";
            button type="submit" id="audit-verify" { (t(Msg::VerifyChain)) }
        }
        @if let Some(r) = &verified {
            @if r.intact() {
                p class="msg ok" id="verify-result" data-intact="true" {
                    (t(Msg::ChainIntact)) " " (lang.num(r.entries)) " " (t(Msg::ChainEntries)) " "
                    (t(Msg::ChainCheckpoints)) " "
                    code dir="ltr" { "cardpipe audit verify" } "."
                }
            } @else {
                div class="msg err" id="verify-result" data-intact="false" {
                    strong { (t(Msg::ChainBroken)) }
                    ul { @for p in &r.problems { li dir="ltr" { (p) } } }
                }
            }
        }
        (table(
            &[
                "#",
                t(Msg::At),
                t(Msg::Actor),
                t(Msg::Role),
                t(Msg::Action),
                t(Msg::Subject),
                t(Msg::Details),
                t(Msg::Hash),
            ],
            &rows,
        ))
    };
    frame(&ui, &s, t(Msg::AuditLog), body)
}

async fn area(
    st: &ConsoleState,
    ui: &Ui,
    s: &Session,
    area: &str,
    title: &str,
    what: &str,
) -> Response {
    match area_tables(st, ui, area, what).await {
        Ok(tables) => frame(ui, s, title, html! { h1 { (title) } (tables) }),
        Err(r) => r,
    }
}

/// The area's tables, read generically (or a "not available" note when it has none).
async fn area_tables(
    st: &ConsoleState,
    ui: &Ui,
    area: &str,
    what: &str,
) -> Result<Markup, Response> {
    let tables = match data::area_tables(&st.services, area).await {
        Ok(t) => t,
        Err(e) => return Err(internal(ui, e)),
    };
    let lang = ui.lang;
    let comma = if lang.rtl() { "، " } else { ", " };
    Ok(html! {
        @if tables.is_empty() {
            div class="na" id="not-available" {
                strong { (ui.t(Msg::NotAvailable)) }
                " (" (what) ") " (ui.t(Msg::NotAvailableText))
            }
        }
        @for t in &tables {
            h2 class="area-table" {
                code dir="ltr" { (t.name) }
                " (" (lang.num(t.total)) " " (ui.t(Msg::Rows))
                @if t.total > t.rows.len() as i64 { (comma) (ui.t(Msg::First)) " " (lang.num(t.rows.len())) }
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

async fn stock(State(st): State<ConsoleState>, ui: Ui, headers: HeaderMap) -> Response {
    let s = match session(&st, &ui, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    area(
        &st,
        &ui,
        &s,
        "stock",
        ui.t(Msg::StockTitle),
        ui.t(Msg::StockWhat),
    )
    .await
}

async fn shipments(
    State(st): State<ConsoleState>,
    ui: Ui,
    headers: HeaderMap,
    Query(f): Query<Flash>,
) -> Response {
    let s = match session(&st, &ui, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let list = match cardpipe_common::discrepancies::list(&st.services, false).await {
        Ok(l) => l,
        Err(e) => return internal(&ui, e),
    };
    let lang = ui.lang;
    let t = |m| lang.t(m);
    let supervisor = s.operator.role.is_supervisor();
    let csrf = csrf_field(&s);
    let rows: Vec<Vec<Markup>> = list
        .iter()
        .map(|d| {
            let action = if !d.is_open() {
                html! {
                    strong dir="ltr" { (d.resolution.as_deref().unwrap_or("")) }
                    " " (t(Msg::By)) " " (ltr(d.resolved_by.as_deref().unwrap_or("")))
                    " " (t(Msg::At)) " " (lang.stored_time(d.resolved_at.as_deref().unwrap_or("")))
                    @if let Some(r) = d.reprint_id.as_deref() { " (" (t(Msg::Reprint)) " " code dir="ltr" { (r) } ")" }
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
                        input type="text" name="note" placeholder=(t(Msg::Note)) required maxlength="500";
                        button type="submit" { (t(Msg::Resolve)) }
                    }
                }
            } else {
                html! { span class="muted" { (t(Msg::SupervisorResolves)) } }
            };
            vec![
                html! { code dir="ltr" { (d.id) } },
                state_code(&d.kind),
                html! { code dir="ltr" { (d.box_id) } },
                ltr(&d.office_code),
                html! {
                    a href=(format!("/console/applications/{}", url(&d.application_id))) dir="ltr" {
                        (d.application_id)
                    }
                },
                ltr(&d.reported_by),
                lang.stored_time(&d.reported_at).render(),
                action,
            ]
        })
        .collect();
    let open = list.iter().filter(|d| d.is_open()).count();
    let title = t(Msg::ShipmentsTitle);
    let tables = match area_tables(&st, &ui, "shipments", t(Msg::ShipmentsWhat)).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let body = html! {
        h1 { (title) }
        (flash(f.ok.as_deref(), f.error.as_deref()))
        h2 id="discrepancies" data-open=(open) { (i18n::discrepancies_heading(lang, open)) }
        p class="muted" { (t(Msg::DiscrepancyHelp)) }
        @if rows.is_empty() {
            p id="no-discrepancies" { (t(Msg::NoDiscrepancies)) }
        } @else {
            div id="discrepancy-list" {
                (ttable(
                    lang,
                    &[
                        Msg::Id,
                        Msg::Kind,
                        Msg::BoxCol,
                        Msg::Office,
                        Msg::Card,
                        Msg::ReportedBy,
                        Msg::ReportedAt,
                        Msg::Resolution,
                    ],
                    &rows,
                ))
            }
        }
        (tables)
    };
    frame(&ui, &s, title, body)
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
    ui: Ui,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<ResolveForm>,
) -> Response {
    let s = match form_session(&st, &ui, &headers, &f.csrf).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    match actions::resolve_discrepancy(&st.services, &s.operator, &id, &f.outcome, &f.note).await {
        Ok(r) => back(
            "/console/shipments",
            Ok(i18n::discrepancy_resolved(
                ui.lang,
                &id,
                r.discrepancy.resolution.as_deref().unwrap_or(""),
                r.reprint_id.as_deref(),
            )),
        ),
        Err(ActionError::Auth(AuthError::Forbidden(m))) => forbidden(&ui, &s, &m),
        Err(e) => back("/console/shipments", Err(action_error(ui.lang, e))),
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
            Lang::En,
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
        let batches = batch_table(
            Lang::En,
            &[data::BatchProgress {
                id: QUOTED.into(),
                client: HOSTILE.into(),
                state: "received".into(),
                priority: "normal".into(),
                records: 2,
                accepted: 1,
                rejected: 1,
                created_at: HOSTILE.into(),
                states: Default::default(),
            }],
        )
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
            parked.contains(
                "<td><code dir=\"ltr\">&lt;script&gt;alert(1)&lt;/script&gt;</code></td>"
            ),
            "{parked}"
        );
        assert!(
            batches.contains(
                "<a href=\"/console/batches/j%22%20onclick%3D%22alert%282%29\" class=\"batch-link\" dir=\"ltr\">\
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
