//! The delivery HTTP API (offices, the registry and the centre):
//!
//! * `GET  /api/v1/delivery/offices` — the register; `GET /api/v1/delivery/offices/{code}`.
//! * `POST /api/v1/delivery/boxes/{box_id}/receipt` — the office scanned the box
//!   (`{"office_code"?, "clerk", "scanned": [application ids]?}`); missing/extra → discrepancies.
//!   On a box already received, only cards an operator resolved as `found` may be scanned.
//! * `PUT  /api/v1/delivery/applications/{application_id}/pickup-office` —
//!   `{"pickup_office"}`: re-route before packing, transfer after dispatch (registry and
//!   centre clients only).
//! * `POST /api/v1/delivery/transfers/{transfer_id}/receipt` — `{"office_code"?, "clerk"}`.
//! * `POST /api/v1/delivery/handovers` — the pickup (see [`crate::office::Handover`]).
//!
//! Every route needs `Authorization: Bearer <token>` of a `[registry]` client or of a
//! delivery API client ([`crate::clients`]); without one: 401. An office client acts only
//! for its own office (403 for a box, transfer or handover of another office; `office_code`
//! may be left out); the identity goes to the audit log with every accepted action.
//!
//! An application is named by cardpipe's id, the registry's id or the tracking code, whichever
//! the caller knows (path parameters and `application_id` in a handover).
//!
//! Errors are JSON `{"error": "..."}` naming the field or rule, never personal values.

use std::sync::Arc;

use axum::extract::{Extension, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use cardpipe_common::runtime::Services;
use cardpipe_registry::config::RegistryConfig;
use serde::Deserialize;
use serde_json::json;

use crate::clients::{self, Caller};
use crate::office::{self, BoxReceipt, Handover, OfficeError};
use crate::{Delivery, offices};

#[derive(Debug, Clone)]
struct AppState {
    delivery: Arc<Delivery>,
    services: Services,
    registry: Arc<RegistryConfig>,
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

/// Resolves the bearer token to a [`Caller`]; 401 with a JSON error otherwise.
async fn auth(State(s): State<AppState>, mut req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default();
    match clients::authenticate(&s.services, &s.registry, token).await {
        Ok(Some(caller)) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Ok(None) => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(json!({ "error": "a valid bearer token is required" })),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// The delivery routes; `registry` holds the `[registry]` clients whose tokens are accepted
/// besides the delivery API clients of the store.
pub fn router(delivery: Arc<Delivery>, services: Services, registry: RegistryConfig) -> Router {
    let state = AppState {
        delivery,
        services,
        registry: Arc::new(registry),
    };
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
        .route_layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
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
    Extension(by): Extension<Caller>,
    Path(box_id): Path<String>,
    Json(body): Json<BoxReceipt>,
) -> Result<Response, OfficeError> {
    let outcome = office::receive_box(&s.delivery, &s.services, &box_id, &body, &by).await?;
    Ok(Json(outcome).into_response())
}

#[derive(Debug, Deserialize)]
struct OfficeBody {
    pickup_office: String,
}

async fn change_office(
    State(s): State<AppState>,
    Extension(by): Extension<Caller>,
    Path(application_id): Path<String>,
    Json(body): Json<OfficeBody>,
) -> Result<Response, OfficeError> {
    let outcome = office::change_office(
        &s.delivery,
        &s.services,
        &application_id,
        body.pickup_office.trim(),
        &by,
    )
    .await?;
    Ok(Json(outcome).into_response())
}

#[derive(Debug, Deserialize)]
struct TransferReceipt {
    #[serde(default)]
    office_code: String,
    clerk: String,
}

async fn transfer_receipt(
    State(s): State<AppState>,
    Extension(by): Extension<Caller>,
    Path(transfer_id): Path<String>,
    Json(body): Json<TransferReceipt>,
) -> Result<Response, OfficeError> {
    let app = office::receive_transfer(
        &s.services,
        &transfer_id,
        &body.office_code,
        &body.clerk,
        &by,
    )
    .await?;
    Ok(
        Json(json!({ "transfer_id": transfer_id, "application_id": app, "state": "received" }))
            .into_response(),
    )
}

async fn handover(
    State(s): State<AppState>,
    Extension(by): Extension<Caller>,
    Json(body): Json<Handover>,
) -> Result<Response, OfficeError> {
    let outcome = office::handover(&s.delivery, &s.services, &body, &by).await?;
    Ok(Json(outcome).into_response())
}
