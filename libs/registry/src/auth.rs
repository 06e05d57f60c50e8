//! Registry client authentication: the bearer-token middleware every registry route
//! (intake, reprints, delivery) layers, and the ownership rule (a client sees only the
//! applications it submitted).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use cardpipe_common::domain::Application;
use cardpipe_common::runtime::Services;
use cardpipe_common::store::StoreError;
use serde_json::json;
use sqlx::Row;

use crate::config::RegistryConfig;

/// The authenticated registry client.
#[derive(Debug, Clone)]
pub struct Client(pub String);

/// Middleware for every registry route: refuses a request without a valid bearer
/// token before its body is read, and hands the handler the [`Client`] it belongs to.
/// Other crates' registry routes (reprints) layer it with their own copy of the config.
pub async fn require_registry_client(
    State(cfg): State<Arc<RegistryConfig>>,
    mut req: Request,
    next: Next,
) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match token.and_then(|t| cfg.client_for_token(t)) {
        Some(name) => {
            let client = Client(name.to_owned());
            req.extensions_mut().insert(client);
            next.run(req).await
        }
        None => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(json!({ "error": "a valid bearer token is required" })),
        )
            .into_response(),
    }
}

/// The application with this registry id (or cardpipe's id, or its tracking code: see
/// `Store::application_by_reference`) if the registry client `client` submitted it;
/// `None` both when it does not exist and when another client owns it (a client cannot
/// learn which of another client's ids exist).
pub async fn application_of_client(
    services: &Services,
    client: &str,
    registry_id: &str,
) -> Result<Option<Application>, StoreError> {
    let Some(app) = services.store.application_by_reference(registry_id).await? else {
        return Ok(None);
    };
    Ok((batch_owner(services, &app).await?.as_deref() == Some(client)).then_some(app))
}

/// The registry client that submitted `app` (through its batch), if any.
pub async fn batch_owner(
    services: &Services,
    app: &Application,
) -> Result<Option<String>, StoreError> {
    match &app.batch_id {
        Some(b) => sqlx::query("SELECT client FROM batches WHERE id = $1")
            .bind(b)
            .fetch_optional(services.store.pool())
            .await?
            .map(|r| r.try_get("client"))
            .transpose()
            .map_err(StoreError::from),
        None => Ok(None),
    }
}
