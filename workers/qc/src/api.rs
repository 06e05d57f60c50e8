//! HTTP: reprints requested by the registry.
//!
//! Registry endpoint (bearer token of a `[registry]` client):
//! - `POST /api/v1/reprints` `{application_id (the registry's), reason}`
//!
//! The operator side has no HTTP API: the unauthenticated JSON routes that took the operator's
//! name from the body (`/api/stock/*`, `/api/reprints`, `/api/qc/{id}`) were removed. Operators
//! use `cardpipe stock receive|report|return|destroy` and `cardpipe reprint` (the operator
//! checked against the console's operators table; destruction witness and reprints need a
//! supervisor), and the console (`/console/stock` shows the stock and QC report tables).

use std::sync::Arc;

use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use cardpipe_common::runtime::Services;
use cardpipe_registry::auth::{Client, application_of_client, require_registry_client};
use cardpipe_registry::config::RegistryConfig;
use serde::Deserialize;
use serde_json::json;

use crate::reprint::{self, ReprintError, ReprintReason, Requester};
use crate::stock::StockError;

#[derive(Clone)]
struct AppState {
    services: Services,
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

/// The router (registry reprints only). The registry's bearer-token check runs before the
/// body is read; a client can reprint only applications it submitted.
pub fn router(services: Services, registry: RegistryConfig) -> Router {
    Router::new()
        .route("/api/v1/reprints", post(registry_reprint))
        .route_layer(middleware::from_fn_with_state(
            Arc::new(registry),
            require_registry_client,
        ))
        .with_state(AppState { services })
}

#[derive(Deserialize)]
struct ReprintBody {
    application_id: String,
    reason: String,
}

fn reason(text: &str) -> Result<ReprintReason, ApiError> {
    ReprintReason::parse(text).ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "reason must be damaged, lost_in_transit or data_error".into(),
        )
    })
}

async fn registry_reprint(
    State(s): State<AppState>,
    Extension(Client(client)): Extension<Client>,
    Json(b): Json<ReprintBody>,
) -> Result<Response, ApiError> {
    let reason = reason(&b.reason)?;
    let app = application_of_client(&s.services, &client, &b.application_id)
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
