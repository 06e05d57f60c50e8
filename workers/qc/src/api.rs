//! HTTP: blank-card stock, QC reports and reprints.
//!
//! Operator endpoints (body field `operator`; like dedup adjudication, operator authentication
//! comes with the console — until then reachable from the operators' network only):
//! - `POST /api/stock/lots` `{supplier, chip_type, serial_prefix, first, last, lot_id?, operator}`
//! - `GET  /api/stock/report[?day=YYYY-MM-DD]` — the reconciliation report
//! - `POST /api/stock/returns` `{serial, reason, operator}`
//! - `POST /api/stock/destructions` `{operator, serials?}` — first sign-off
//! - `POST /api/stock/destructions/{id}/witness` `{operator}` — second, different operator
//! - `POST /api/reprints` `{application_id, reason, operator}`
//! - `GET  /api/qc/{application_id}` — QC reports of an application
//!
//! Registry endpoint (bearer token of a `[registry]` client):
//! - `POST /api/v1/reprints` `{application_id (the registry's), reason}`

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cardpipe_common::domain::ApplicationId;
use cardpipe_common::runtime::Services;
use cardpipe_intake::config::RegistryConfig;
use serde::Deserialize;
use serde_json::json;
use sqlx::Row;

use crate::reprint::{self, ReprintError, ReprintReason, Requester};
use crate::stock::{self, NewLot, StockError};

#[derive(Clone)]
struct AppState {
    services: Services,
    registry: Arc<RegistryConfig>,
    metrics: Option<stock::StockMetrics>,
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<StockError> for ApiError {
    fn from(e: StockError) -> Self {
        let code = match &e {
            StockError::Invalid { .. } => StatusCode::BAD_REQUEST,
            StockError::Overlap(_) => StatusCode::CONFLICT,
            StockError::NotFound(_) => StatusCode::NOT_FOUND,
            StockError::SameOperator(_) => StatusCode::FORBIDDEN,
            StockError::Exhausted | StockError::NoStock => StatusCode::CONFLICT,
            StockError::Store(_) => {
                tracing::error!(error = %e, "stock API store failure");
                return ApiError(StatusCode::INTERNAL_SERVER_ERROR, "database failure".into());
            }
        };
        ApiError(code, e.to_string())
    }
}

impl From<ReprintError> for ApiError {
    fn from(e: ReprintError) -> Self {
        match e {
            ReprintError::Invalid(s) => s.into(),
            ReprintError::NotFound(_) => ApiError(StatusCode::NOT_FOUND, e.to_string()),
            ReprintError::NotReprintable { .. } | ReprintError::Conflict(_) => {
                ApiError(StatusCode::CONFLICT, e.to_string())
            }
            ReprintError::Store(_) => {
                tracing::error!(error = %e, "reprint API store failure");
                ApiError(StatusCode::INTERNAL_SERVER_ERROR, "database failure".into())
            }
        }
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "QC API failure");
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal failure".into())
}

/// The router. `metrics`, when given, is refreshed by every report request.
pub fn router(
    services: Services,
    registry: RegistryConfig,
    metrics: Option<stock::StockMetrics>,
) -> Router {
    Router::new()
        .route("/api/stock/lots", post(receive))
        .route("/api/stock/report", get(report))
        .route("/api/stock/returns", post(return_card))
        .route("/api/stock/destructions", post(prepare))
        .route("/api/stock/destructions/{id}/witness", post(witness))
        .route("/api/reprints", post(operator_reprint))
        .route("/api/v1/reprints", post(registry_reprint))
        .route("/api/qc/{application_id}", get(qc_reports))
        .with_state(AppState {
            services,
            registry: Arc::new(registry),
            metrics,
        })
}

#[derive(Deserialize)]
struct ReceiveBody {
    #[serde(flatten)]
    lot: NewLot,
    operator: String,
}

async fn receive(
    State(s): State<AppState>,
    Json(b): Json<ReceiveBody>,
) -> Result<Response, ApiError> {
    let summary = stock::receive(&s.services, &b.lot, &b.operator).await?;
    Ok((StatusCode::CREATED, Json(summary)).into_response())
}

#[derive(Deserialize)]
struct ReportQuery {
    day: Option<String>,
}

async fn report(
    State(s): State<AppState>,
    Query(q): Query<ReportQuery>,
) -> Result<Response, ApiError> {
    let day = match q.day.as_deref() {
        None | Some("") => None,
        Some(d) => Some(
            time::Date::parse(d, time::macros::format_description!("[year]-[month]-[day]"))
                .map_err(|_| ApiError(StatusCode::BAD_REQUEST, "day must be YYYY-MM-DD".into()))?,
        ),
    };
    let r = stock::reconcile(&s.services, day).await.map_err(internal)?;
    if let Some(m) = &s.metrics {
        m.publish(&r);
    }
    Ok(Json(r).into_response())
}

#[derive(Deserialize)]
struct ReturnBody {
    serial: String,
    reason: String,
    operator: String,
}

async fn return_card(
    State(s): State<AppState>,
    Json(b): Json<ReturnBody>,
) -> Result<Response, ApiError> {
    stock::return_card(&s.services, &b.serial, &b.operator, &b.reason).await?;
    Ok(Json(json!({ "serial": b.serial, "state": "returned" })).into_response())
}

#[derive(Deserialize)]
struct PrepareBody {
    operator: String,
    #[serde(default)]
    serials: Option<Vec<String>>,
}

async fn prepare(
    State(s): State<AppState>,
    Json(b): Json<PrepareBody>,
) -> Result<Response, ApiError> {
    let d = stock::prepare_destruction(&s.services, &b.operator, b.serials.as_deref()).await?;
    Ok((StatusCode::CREATED, Json(d)).into_response())
}

#[derive(Deserialize)]
struct WitnessBody {
    operator: String,
}

async fn witness(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Json(b): Json<WitnessBody>,
) -> Result<Response, ApiError> {
    let d = stock::witness_destruction(&s.services, &id, &b.operator).await?;
    Ok(Json(d).into_response())
}

#[derive(Deserialize)]
struct ReprintBody {
    application_id: String,
    reason: String,
    #[serde(default)]
    operator: Option<String>,
}

fn reason(text: &str) -> Result<ReprintReason, ApiError> {
    ReprintReason::parse(text).ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "reason must be damaged, lost_in_transit or data_error".into(),
        )
    })
}

async fn operator_reprint(
    State(s): State<AppState>,
    Json(b): Json<ReprintBody>,
) -> Result<Response, ApiError> {
    let reason = reason(&b.reason)?;
    let operator = b
        .operator
        .ok_or_else(|| ApiError(StatusCode::BAD_REQUEST, "operator is required".into()))?;
    let out = reprint::request(
        &s.services,
        &ApplicationId(b.application_id),
        reason,
        Requester::Operator(&operator),
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(out)).into_response())
}

async fn registry_reprint(
    State(s): State<AppState>,
    headers: HeaderMap,
    Json(b): Json<ReprintBody>,
) -> Result<Response, ApiError> {
    let client = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|t| s.registry.client_for_token(t.trim()))
        .map(str::to_owned)
        .ok_or_else(|| {
            ApiError(
                StatusCode::UNAUTHORIZED,
                "a valid bearer token is required".into(),
            )
        })?;
    let reason = reason(&b.reason)?;
    let app = s
        .services
        .store
        .application_by_registry_id(&b.application_id)
        .await
        .map_err(internal)?
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("application {} not found", b.application_id),
            )
        })?;
    let out = reprint::request(&s.services, &app.id, reason, Requester::Registry(&client)).await?;
    Ok((StatusCode::ACCEPTED, Json(out)).into_response())
}

async fn qc_reports(
    State(s): State<AppState>,
    Path(application_id): Path<String>,
) -> Result<Response, ApiError> {
    let rows = sqlx::query(
        "SELECT id, blank_serial, chip_serial, outcome, reason, object_key, elapsed_ms, checked_at
         FROM qc_reports WHERE application_id = $1 ORDER BY checked_at, id",
    )
    .bind(&application_id)
    .fetch_all(s.services.store.pool())
    .await
    .map_err(internal)?;
    let out: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            Ok::<_, sqlx::Error>(json!({
                "id": r.try_get::<String, _>("id")?,
                "blank_serial": r.try_get::<String, _>("blank_serial")?,
                "chip_serial": r.try_get::<Option<String>, _>("chip_serial")?,
                "outcome": r.try_get::<String, _>("outcome")?,
                "reason": r.try_get::<Option<String>, _>("reason")?,
                "report": r.try_get::<String, _>("object_key")?,
                "elapsed_ms": r.try_get::<i64, _>("elapsed_ms")?,
                "checked_at": r.try_get::<String, _>("checked_at")?,
            }))
        })
        .collect::<Result<_, _>>()
        .map_err(internal)?;
    Ok(Json(json!({ "application_id": application_id, "reports": out })).into_response())
}
