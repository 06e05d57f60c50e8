//! The HTTP form of the MOSIP ABIS API: `POST /abis/v1/request` with the request message,
//! the response message in the body. Functional failures are HTTP 200 with
//! `returnValue` `"2"` (as MOSIP's own services answer); HTTP errors are kept for a missing
//! or unknown bearer token (401) and a body over 1 MiB (413).

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::json;

use super::MosipAbis;

/// The route.
pub const PATH: &str = "/abis/v1/request";
/// Largest request body (messages carry ids and URLs, never biometrics).
pub const MAX_BODY: usize = 1024 * 1024;

#[derive(Clone)]
struct AppState {
    abis: Arc<MosipAbis>,
}

/// The router.
pub fn router(abis: Arc<MosipAbis>) -> Router {
    Router::new()
        .route(PATH, post(request))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(AppState { abis })
}

async fn request(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(client) = token.and_then(|t| state.abis.config.client_for_token(t)) else {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(
                json!({ "error": "a valid bearer token of an [[abis.clients]] entry is required" }),
            ),
        )
            .into_response();
    };
    tracing::debug!(client, "MOSIP ABIS request over HTTP");
    Json(state.abis.handle(&body).await).into_response()
}
