//! The registry HTTP API (axum). Every route, the OpenAPI document included,
//! requires a bearer token of a configured client; tokens are compared by
//! SHA-256 digest. Routes are listed in [`ROUTES`] and documented in
//! `openapi.json` (served at `/api/openapi.json`); a test checks both against
//! the real router.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use cardpipe_common::audit::{self, AuditEvent};
use cardpipe_common::clock::{from_rfc3339, to_rfc3339};
use cardpipe_common::domain::{Application, ApplicationId, ApplicationState};
use cardpipe_common::records;
use cardpipe_common::runtime::Services;
use cardpipe_common::store::{Store, StoreError, Transition};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::Row;

use crate::intake::{self, IntakeError};
use crate::validate;
use cardpipe_common::contract::{self, RevocationCause};
use cardpipe_registry::OPENAPI;
use cardpipe_registry::auth::{
    Client, application_of_client, batch_owner, require_registry_client,
};
use cardpipe_registry::callbacks::{CallbackEvent, enqueue_callback};
use cardpipe_registry::config::RegistryConfig;

/// Every (method, path) the router serves, in axum's `{param}` syntax.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/openapi.json"),
    ("POST", "/api/v1/batches"),
    ("GET", "/api/v1/batches"),
    ("GET", "/api/v1/batches/{batch_id}"),
    ("GET", "/api/v1/batches/{batch_id}/records"),
    ("PUT", "/api/v1/batches/{batch_id}/schedule"),
    ("POST", "/api/v1/batches/{batch_id}/cancel"),
    ("POST", "/api/v1/applications/{application_id}/withdraw"),
    ("PUT", "/api/v1/applications/{application_id}/pickup-office"),
    ("GET", "/api/v1/status/{tracking_code}"),
    ("POST", "/api/v1/tracking-code/recovery"),
];

/// Routes of the registry API documented in [`OPENAPI`] but served by another component's
/// router (merged into the same server by the `cardpipe` binary).
pub const ROUTES_SERVED_ELSEWHERE: &[(&str, &str)] = &[("POST", "/api/v1/reprints")];

/// States in which the pickup office may still change (before packing).
const OFFICE_CHANGEABLE: &[ApplicationState] = &[
    ApplicationState::Received,
    ApplicationState::DedupPending,
    ApplicationState::DedupClear,
    ApplicationState::PossibleDuplicate,
    ApplicationState::Cleared,
    ApplicationState::KeysIssued,
    ApplicationState::Personalized,
    ApplicationState::QcPassed,
    ApplicationState::QcFailed,
];

#[derive(Debug, Clone)]
struct AppState {
    services: Services,
    cfg: Arc<RegistryConfig>,
    /// One permit per batch submission being received (`max_concurrent_submissions`).
    submissions: Arc<tokio::sync::Semaphore>,
}

/// An API error: status and a message naming fields, never values.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<IntakeError> for ApiError {
    fn from(e: IntakeError) -> Self {
        let status = match &e {
            IntakeError::BadRequest(_) => StatusCode::BAD_REQUEST,
            IntakeError::NotFound(_) => StatusCode::NOT_FOUND,
            IntakeError::Busy | IntakeError::Conflict(_) => StatusCode::CONFLICT,
            IntakeError::Body(_) => StatusCode::BAD_REQUEST,
            IntakeError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            IntakeError::KeyReused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            IntakeError::Store(_) | IntakeError::Records(_) => {
                tracing::error!(error = %e, "registry API request failed");
                return ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage unavailable; retry (resubmitting a batch is safe)".into(),
                );
            }
        };
        ApiError(status, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: cardpipe_common::store::StoreError) -> Self {
        IntakeError::Store(e).into()
    }
}

impl From<records::RecordError> for ApiError {
    fn from(e: records::RecordError) -> Self {
        IntakeError::Records(e).into()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        IntakeError::from(e).into()
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}
fn not_found(what: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("{what} not found"))
}
fn conflict(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::CONFLICT, msg.into())
}

/// Appends a registry action to the audit log (actor: the registry client, role `registry`).
/// Details carry ids and counts only, never personal data.
async fn audit_registry(
    state: &AppState,
    client: &str,
    action: &str,
    subject: &str,
    details: Value,
) -> Result<(), ApiError> {
    audit::record(
        &state.services.store,
        state.services.clock.as_ref(),
        &AuditEvent {
            actor: client,
            role: "registry",
            action,
            subject,
            details,
        },
    )
    .await?;
    Ok(())
}

/// The registry API router.
pub fn router(services: Services, config: RegistryConfig) -> Router {
    let submissions = Arc::new(tokio::sync::Semaphore::new(
        config.intake.max_concurrent_submissions.max(1),
    ));
    let state = AppState {
        services,
        cfg: Arc::new(config),
        submissions,
    };
    Router::new()
        .route("/api/openapi.json", get(openapi))
        .route(
            "/api/v1/batches",
            post(submit).layer(DefaultBodyLimit::disable()).get(list),
        )
        .route("/api/v1/batches/{batch_id}", get(inspect))
        .route("/api/v1/batches/{batch_id}/records", get(records_page))
        .route("/api/v1/batches/{batch_id}/schedule", put(schedule))
        .route("/api/v1/batches/{batch_id}/cancel", post(cancel))
        .route(
            "/api/v1/applications/{application_id}/withdraw",
            post(withdraw),
        )
        .route(
            "/api/v1/applications/{application_id}/pickup-office",
            put(change_office),
        )
        .route("/api/v1/status/{tracking_code}", get(status))
        .route("/api/v1/tracking-code/recovery", post(recover))
        .route_layer(middleware::from_fn_with_state(
            state.cfg.clone(),
            require_registry_client,
        ))
        .with_state(state)
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn submit(
    State(state): State<AppState>,
    Extension(Client(client)): Extension<Client>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| bad("the Idempotency-Key header is required"))?
        .to_owned();
    let limits = &state.cfg.intake;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes) {
        state
            .services
            .metrics
            .intake_submission_refused("body_too_large");
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the batch body is larger than {} bytes (registry.intake.max_body_bytes); split the batch",
                limits.max_body_bytes
            ),
        ));
    }
    // Refused at once rather than queued: a queued submission would hold its connection and
    // body buffers while it waits.
    let Ok(_permit) = state.submissions.clone().try_acquire_owned() else {
        state
            .services
            .metrics
            .intake_submission_refused("too_many_submissions");
        let retry_after = limits.retry_after_secs.max(1);
        return Ok((
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, retry_after.to_string())],
            Json(json!({ "error": format!(
                "{} batch submissions are being received (registry.intake.max_concurrent_submissions); retry after {retry_after} s",
                limits.max_concurrent_submissions
            ) })),
        )
            .into_response());
    };
    let submission = match intake::submit_batch(
        &state.services,
        &state.cfg,
        &client,
        &key,
        body.into_data_stream(),
    )
    .await
    {
        Ok(s) => s,
        Err(IntakeError::TooLarge {
            reason,
            batch_id,
            message,
        }) => {
            state.services.metrics.intake_submission_refused(reason);
            audit_registry(
                &state,
                &client,
                "registry.batch_truncated",
                &batch_id,
                json!({ "idempotency_key": key, "reason": reason }),
            )
            .await?;
            return Err(ApiError(StatusCode::PAYLOAD_TOO_LARGE, message));
        }
        Err(e @ IntakeError::KeyReused { .. }) => {
            state
                .services
                .metrics
                .intake_submission_refused("idempotency_key_reused");
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    audit_registry(
        &state,
        &client,
        "registry.batch_submit",
        &submission.report.batch_id,
        json!({
            "idempotency_key": key,
            "replayed": submission.replayed,
            "records": submission.report.records,
            "accepted": submission.report.accepted,
            "rejected": submission.report.rejected,
            "flagged": submission.report.flagged,
        }),
    )
    .await?;
    let status = if submission.replayed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        [(
            "idempotent-replayed",
            if submission.replayed { "true" } else { "false" },
        )],
        Json(submission.report),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<i64>,
}

async fn list(
    State(state): State<AppState>,
    Extension(Client(client)): Extension<Client>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    Ok(Json(intake::list_batches(&state.services, &client, limit).await?).into_response())
}

async fn inspect(
    State(state): State<AppState>,
    Extension(Client(client)): Extension<Client>,
    Path(batch_id): Path<String>,
) -> Result<Response, ApiError> {
    let report = intake::batch_report(&state.services, &client, &batch_id)
        .await?
        .ok_or_else(|| not_found("batch"))?;
    Ok(Json(report).into_response())
}

#[derive(Debug, Deserialize)]
struct RecordsQuery {
    outcome: Option<String>,
    after_line: Option<i64>,
    limit: Option<i64>,
}

async fn records_page(
    State(state): State<AppState>,
    Extension(Client(client)): Extension<Client>,
    Path(batch_id): Path<String>,
    Query(q): Query<RecordsQuery>,
) -> Result<Response, ApiError> {
    owned_batch(&state, &client, &batch_id).await?;
    let outcome = match q.outcome.as_deref() {
        None | Some("") => None,
        Some(o @ ("accepted" | "rejected")) => Some(o),
        Some(_) => return Err(bad("outcome must be accepted or rejected")),
    };
    let rows = intake::batch_records(
        &state.services,
        &batch_id,
        outcome,
        q.after_line.unwrap_or(0),
        q.limit.unwrap_or(1000).clamp(1, 10_000),
    )
    .await?;
    Ok(Json(rows).into_response())
}

async fn owned_batch(state: &AppState, client: &str, batch_id: &str) -> Result<String, ApiError> {
    let row = sqlx::query("SELECT state FROM batches WHERE id = $1 AND client = $2")
        .bind(batch_id)
        .bind(client)
        .fetch_optional(state.services.store.pool())
        .await?
        .ok_or_else(|| not_found("batch"))?;
    Ok(row.try_get("state")?)
}

#[derive(Debug, Deserialize)]
struct ScheduleBody {
    release_at: String,
    priority: Option<String>,
}

async fn schedule(
    State(state): State<AppState>,
    Extension(Client(client)): Extension<Client>,
    Path(batch_id): Path<String>,
    Json(body): Json<ScheduleBody>,
) -> Result<Response, ApiError> {
    let now = state.services.clock.now();
    let (at, mut priority) = if body.release_at.trim().eq_ignore_ascii_case("now") {
        (now, "urgent")
    } else {
        let at = from_rfc3339(body.release_at.trim())
            .map_err(|_| bad("release_at must be RFC 3339 with an offset, or \"now\""))?;
        (at, "normal")
    };
    match body.priority.as_deref() {
        None => {}
        Some("urgent") => priority = "urgent",
        Some("normal") => priority = "normal",
        Some(_) => return Err(bad("priority must be normal or urgent")),
    }
    let current = owned_batch(&state, &client, &batch_id).await?;
    if !intake::schedule_batch(&state.services, &client, &batch_id, at, priority).await? {
        return Err(conflict(format!(
            "a batch in state {current} cannot be scheduled"
        )));
    }
    audit_registry(
        &state,
        &client,
        "registry.batch_schedule",
        &batch_id,
        json!({ "release_at": to_rfc3339(at), "priority": priority }),
    )
    .await?;
    let report = intake::batch_report(&state.services, &client, &batch_id)
        .await?
        .ok_or_else(|| not_found("batch"))?;
    Ok(Json(report).into_response())
}

async fn cancel(
    State(state): State<AppState>,
    Extension(Client(client)): Extension<Client>,
    Path(batch_id): Path<String>,
) -> Result<Response, ApiError> {
    let services = &state.services;
    let current = owned_batch(&state, &client, &batch_id).await?;
    let now = services.clock.now();
    let done = sqlx::query(
        "UPDATE batches SET state = 'cancelled', updated_at = $1
         WHERE id = $2 AND client = $3 AND state IN ('received', 'scheduled')",
    )
    .bind(to_rfc3339(now))
    .bind(&batch_id)
    .bind(&client)
    .execute(services.store.pool())
    .await?;
    if done.rows_affected() == 0 {
        return Err(conflict(format!(
            "a batch in state {current} cannot be cancelled"
        )));
    }
    let actor = format!("registry:{client}");
    let mut cancelled = 0i64;
    loop {
        let rows = sqlx::query(
            "SELECT id, registry_id FROM applications WHERE batch_id = $1 AND state = 'received' ORDER BY id LIMIT 500",
        )
        .bind(&batch_id)
        .fetch_all(services.store.pool())
        .await?;
        if rows.is_empty() {
            break;
        }
        let mut tx = services.store.begin().await?;
        for r in &rows {
            let id = ApplicationId(r.try_get("id")?);
            let registry_id: String = r.try_get("registry_id")?;
            if Store::transition(
                &mut tx,
                &Transition {
                    id: &id,
                    from: ApplicationState::Received,
                    to: ApplicationState::Cancelled,
                    stage: "registry-api",
                    attempt: 0,
                    actor: &actor,
                    reason: Some("batch cancelled by the registry"),
                    at: now,
                },
            )
            .await?
            {
                cancelled += 1;
                enqueue_callback(
                    &mut tx,
                    id.as_str(),
                    CallbackEvent::Cancelled,
                    &registry_id,
                    Some(ApplicationState::Cancelled),
                    Some("batch cancelled by the registry"),
                    Value::Null,
                    now,
                )
                .await?;
            }
        }
        tx.commit().await?;
    }
    let released: i64 = sqlx::query(
        "SELECT COUNT(*) AS n FROM applications WHERE batch_id = $1 AND state <> 'cancelled'",
    )
    .bind(&batch_id)
    .fetch_one(services.store.pool())
    .await?
    .try_get("n")?;
    audit_registry(
        &state,
        &client,
        "registry.batch_cancel",
        &batch_id,
        json!({ "cancelled": cancelled, "already_released": released }),
    )
    .await?;
    Ok(
        Json(json!({ "batch_id": batch_id, "cancelled": cancelled, "already_released": released }))
            .into_response(),
    )
}

/// The application with this registry id, if it belongs to `client`.
async fn owned_application(
    state: &AppState,
    client: &str,
    registry_id: &str,
) -> Result<Application, ApiError> {
    application_of_client(&state.services, client, registry_id)
        .await?
        .ok_or_else(|| not_found("application"))
}

async fn check_owner(state: &AppState, client: &str, app: &Application) -> Result<(), ApiError> {
    if batch_owner(&state.services, app).await?.as_deref() == Some(client) {
        Ok(())
    } else {
        Err(not_found("application"))
    }
}

async fn status_of(state: &AppState, app: &Application) -> Result<Value, ApiError> {
    let record = records::load_record(&state.services, &app.id).await?;
    let history: Vec<Value> = state
        .services
        .store
        .history(&app.id)
        .await?
        .into_iter()
        .map(|h| json!({ "state": h.to_state.as_str(), "at": to_rfc3339(h.at) }))
        .collect();
    Ok(json!({
        "application_id": app.registry_id,
        "state": app.state.as_str(),
        "updated_at": to_rfc3339(app.updated_at),
        "pickup_office": record.pickup_office,
        "history": history,
    }))
}

#[derive(Debug, Deserialize, Default)]
struct WithdrawBody {
    reason: Option<String>,
}

async fn withdraw(
    State(state): State<AppState>,
    Extension(Client(client)): Extension<Client>,
    Path(registry_id): Path<String>,
    body: Option<Json<WithdrawBody>>,
) -> Result<Response, ApiError> {
    let services = &state.services;
    let reason = body
        .and_then(|Json(b)| b.reason)
        .map(|r| r.chars().take(200).collect::<String>())
        .unwrap_or_else(|| "withdrawn by the registry".into());
    let actor = format!("registry:{client}");
    for _ in 0..5 {
        let app = owned_application(&state, &client, &registry_id).await?;
        if !app.state.is_cancellable() {
            return Err(conflict(format!(
                "an application in state {} cannot be withdrawn",
                app.state.as_str()
            )));
        }
        let now = services.clock.now();
        let mut tx = services.store.begin().await?;
        let moved = Store::transition(
            &mut tx,
            &Transition {
                id: &app.id,
                from: app.state,
                to: ApplicationState::Cancelled,
                stage: "registry-api",
                attempt: 0,
                actor: &actor,
                reason: Some(&reason),
                at: now,
            },
        )
        .await?;
        if !moved {
            // It moved meanwhile: look again.
            continue;
        }
        enqueue_callback(
            &mut tx,
            app.id.as_str(),
            CallbackEvent::Cancelled,
            &app.registry_id,
            Some(ApplicationState::Cancelled),
            Some(&reason),
            Value::Null,
            now,
        )
        .await?;
        // Its wrapped keys are destroyed (a no-op when none were issued).
        contract::request_key_destruction(&mut tx, &app.id, now).await?;
        // The keys stage revokes every certificate issued for this application (outbox
        // topic `revocation`). Written whatever the state (a no-op when none was issued) so
        // a key issuance racing this withdrawal is still revoked; rows wait in the outbox
        // until a relay with that sink runs.
        contract::request_revocation(
            &mut tx,
            &app.id,
            RevocationCause::Cancelled,
            Vec::new(),
            now,
        )
        .await?;
        audit::record_in(
            &mut tx,
            now,
            &AuditEvent {
                actor: &client,
                role: "registry",
                action: "registry.withdraw",
                subject: app.id.as_str(),
                details: json!({ "from_state": app.state.as_str(), "reason": reason }),
            },
        )
        .await?;
        tx.commit().await?;
        let app = services
            .store
            .application(&app.id)
            .await?
            .ok_or_else(|| not_found("application"))?;
        return Ok(Json(status_of(&state, &app).await?).into_response());
    }
    Err(conflict("the application keeps changing state; retry"))
}

#[derive(Debug, Deserialize)]
struct OfficeBody {
    pickup_office: String,
}

async fn change_office(
    State(state): State<AppState>,
    Extension(Client(client)): Extension<Client>,
    Path(registry_id): Path<String>,
    Json(body): Json<OfficeBody>,
) -> Result<Response, ApiError> {
    let services = &state.services;
    let office = validate::normalise_digits(&body.pickup_office);
    if office.is_empty()
        || office.len() > 32
        || !office
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(bad(
            "pickup_office: must be 1–32 letters, digits, '-', '_' or '.'",
        ));
    }
    // The configured list, else the offices register (as for a batch record): no card is
    // re-routed to an office that does not exist.
    let known = if state.cfg.offices.is_empty() {
        cardpipe_common::contract::pickup_office_codes(&services.store).await?
    } else {
        state.cfg.offices.clone()
    };
    if !known.is_empty() && !known.contains(&office) {
        return Err(bad(format!(
            "pickup_office: {office:?} is not in the offices register"
        )));
    }
    let app = owned_application(&state, &client, &registry_id).await?;
    if !OFFICE_CHANGEABLE.contains(&app.state) {
        return Err(conflict(format!(
            "the pickup office cannot change once the card is packed (state {})",
            app.state.as_str()
        )));
    }
    let mut record = records::load_record(services, &app.id).await?;
    record.pickup_office = office;
    let mut tx = services.store.begin().await?;
    // Holds the application row (and re-checks its state) for the transaction.
    let still =
        sqlx::query("UPDATE applications SET updated_at = updated_at WHERE id = $1 AND state = $2")
            .bind(app.id.as_str())
            .bind(app.state.as_str())
            .execute(&mut *tx)
            .await?;
    if still.rows_affected() == 0 {
        return Err(conflict("the application changed state meanwhile; retry"));
    }
    records::update_record(&mut tx, services, &app.id, &record).await?;
    audit::record_in(
        &mut tx,
        services.clock.now(),
        &AuditEvent {
            actor: &client,
            role: "registry",
            action: "registry.change_office",
            subject: app.id.as_str(),
            details: json!({ "pickup_office": record.pickup_office }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(Json(status_of(&state, &app).await?).into_response())
}

async fn status(
    State(state): State<AppState>,
    Extension(Client(client)): Extension<Client>,
    Path(tracking_code): Path<String>,
) -> Result<Response, ApiError> {
    // The tracking code, or the registry's or cardpipe's id.
    let app = state
        .services
        .store
        .application_by_reference(&tracking_code)
        .await?
        .ok_or_else(|| not_found("application"))?;
    check_owner(&state, &client, &app).await?;
    Ok(Json(status_of(&state, &app).await?).into_response())
}

#[derive(Deserialize)]
struct RecoverBody {
    national_code: String,
    birth_date: String,
}

async fn recover(
    State(state): State<AppState>,
    Extension(Client(client)): Extension<Client>,
    Json(body): Json<RecoverBody>,
) -> Result<Response, ApiError> {
    let code = validate::check_national_code(&body.national_code)
        .map_err(|reason| bad(format!("national_code: {reason}")))?;
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    let birth = time::Date::parse(&validate::normalise_digits(&body.birth_date), &fmt)
        .map_err(|_| bad("birth_date: must be a valid date YYYY-MM-DD"))?;
    let ids = records::find_by_national_code(&state.services, &code, Some(birth)).await?;
    let mut out = Vec::new();
    for id in ids {
        let Some(app) = state.services.store.application(&id).await? else {
            continue;
        };
        if check_owner(&state, &client, &app).await.is_err() {
            continue;
        }
        let record = records::load_record(&state.services, &id).await?;
        out.push(json!({
            "application_id": app.registry_id,
            "tracking_code": record.tracking_code,
            "state": app.state.as_str(),
        }));
    }
    // A look-up by national code: audited with its outcome only (never the code itself).
    audit_registry(
        &state,
        &client,
        "registry.tracking_code_recovery",
        "tracking-code-recovery",
        json!({ "found": out.len() }),
    )
    .await?;
    if out.is_empty() {
        return Err(not_found("application"));
    }
    Ok(Json(json!({ "applications": out })).into_response())
}
