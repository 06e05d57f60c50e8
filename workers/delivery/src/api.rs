//! The delivery HTTP API (offices and operators):
//!
//! * `GET  /api/v1/delivery/offices` — the register; `GET /api/v1/delivery/offices/{code}`.
//! * `POST /api/v1/delivery/boxes/{box_id}/receipt` — the office scanned the box
//!   (`{"office_code", "clerk", "scanned": [application ids]?}`); missing/extra → discrepancies.
//! * `PUT  /api/v1/delivery/applications/{application_id}/pickup-office` —
//!   `{"pickup_office", "actor"}`: re-route before packing, transfer after dispatch.
//! * `POST /api/v1/delivery/transfers/{transfer_id}/receipt` — `{"office_code", "clerk"}`.
//! * `POST /api/v1/delivery/handovers` — the pickup (see [`crate::office::Handover`]).
//!
//! Errors are JSON `{"error": "..."}` naming the field or rule, never personal values.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use cardpipe_common::runtime::Services;
use serde::Deserialize;
use serde_json::json;

use crate::office::{self, BoxReceipt, Handover, OfficeError};
use crate::{Delivery, offices};

#[derive(Debug, Clone)]
struct AppState {
    delivery: Arc<Delivery>,
    services: Services,
}

impl IntoResponse for OfficeError {
    fn into_response(self) -> Response {
        let status = match &self {
            OfficeError::BadRequest(_) => StatusCode::BAD_REQUEST,
            OfficeError::NotFound(_) => StatusCode::NOT_FOUND,
            OfficeError::Conflict(_) => StatusCode::CONFLICT,
            OfficeError::Forbidden(_) => StatusCode::FORBIDDEN,
            OfficeError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            OfficeError::Internal(e) => {
                tracing::error!(error = %format!("{e:#}"), "delivery API failure");
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Json(json!({ "error": "internal error" })),
                )
                    .into_response();
            }
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

/// The delivery routes.
pub fn router(delivery: Arc<Delivery>, services: Services) -> Router {
    Router::new()
        .route("/api/v1/delivery/offices", get(list_offices))
        .route("/api/v1/delivery/offices/{code}", get(one_office))
        .route("/api/v1/delivery/boxes/{box_id}/receipt", post(receipt))
        .route(
            "/api/v1/delivery/applications/{application_id}/pickup-office",
            put(change_office),
        )
        .route(
            "/api/v1/delivery/transfers/{transfer_id}/receipt",
            post(transfer_receipt),
        )
        .route("/api/v1/delivery/handovers", post(handover))
        .with_state(AppState { delivery, services })
}

async fn list_offices(State(s): State<AppState>) -> Result<Response, OfficeError> {
    s.delivery.ensure_offices(&s.services).await?;
    let all = offices::all(&s.services.store).await?;
    Ok(Json(json!({ "offices": all.values().collect::<Vec<_>>() })).into_response())
}

async fn one_office(
    State(s): State<AppState>,
    Path(code): Path<String>,
) -> Result<Response, OfficeError> {
    s.delivery.ensure_offices(&s.services).await?;
    let office = offices::get(&s.services.store, &code)
        .await?
        .ok_or_else(|| OfficeError::NotFound(format!("office {code}")))?;
    Ok(Json(office).into_response())
}

async fn receipt(
    State(s): State<AppState>,
    Path(box_id): Path<String>,
    Json(body): Json<BoxReceipt>,
) -> Result<Response, OfficeError> {
    let outcome = office::receive_box(&s.delivery, &s.services, &box_id, &body).await?;
    Ok(Json(outcome).into_response())
}

#[derive(Debug, Deserialize)]
struct OfficeBody {
    pickup_office: String,
    actor: String,
}

async fn change_office(
    State(s): State<AppState>,
    Path(application_id): Path<String>,
    Json(body): Json<OfficeBody>,
) -> Result<Response, OfficeError> {
    if body.actor.is_empty() || body.actor.len() > 100 {
        return Err(OfficeError::BadRequest(
            "actor: required (who asks for the change)".into(),
        ));
    }
    let outcome = office::change_office(
        &s.delivery,
        &s.services,
        &application_id,
        body.pickup_office.trim(),
        &body.actor,
    )
    .await?;
    Ok(Json(outcome).into_response())
}

#[derive(Debug, Deserialize)]
struct TransferReceipt {
    office_code: String,
    clerk: String,
}

async fn transfer_receipt(
    State(s): State<AppState>,
    Path(transfer_id): Path<String>,
    Json(body): Json<TransferReceipt>,
) -> Result<Response, OfficeError> {
    let app =
        office::receive_transfer(&s.services, &transfer_id, &body.office_code, &body.clerk).await?;
    Ok(
        Json(json!({ "transfer_id": transfer_id, "application_id": app, "state": "received" }))
            .into_response(),
    )
}

async fn handover(
    State(s): State<AppState>,
    Json(body): Json<Handover>,
) -> Result<Response, OfficeError> {
    let outcome = office::handover(&s.delivery, &s.services, &body).await?;
    Ok(Json(outcome).into_response())
}
