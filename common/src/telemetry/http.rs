//! `/metrics`, `/healthz` and `/readyz`, served by every process.
//!
//! `/healthz` answers while the process runs; `/readyz` only when the broker,
//! the store and the object store all answer (a load balancer or compose
//! health check should route on it).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::runtime::Services;

#[derive(Clone)]
struct Probe {
    services: Services,
    stages: Arc<Vec<String>>,
}

/// The telemetry routes, to merge into the process's HTTP router.
pub fn router(services: Services, stages: Vec<String>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Probe {
            services,
            stages: Arc::new(stages),
        })
}

async fn metrics(State(p): State<Probe>) -> impl IntoResponse {
    let s = &p.services;
    s.metrics
        .refresh(&s.store, s.broker.as_ref(), &p.stages, s.clock.as_ref())
        .await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn readyz(State(p): State<Probe>) -> impl IntoResponse {
    let s = &p.services;
    let timeout = std::time::Duration::from_secs(3);
    let check = |ok: Result<bool, _>| matches!(ok, Ok(true));
    let broker = check(
        tokio::time::timeout(timeout, s.broker.ping())
            .await
            .map(|r| r.is_ok()),
    );
    let store = check(
        tokio::time::timeout(timeout, s.store.ping())
            .await
            .map(|r| r.is_ok()),
    );
    let objects = check(
        tokio::time::timeout(timeout, s.objects.ping())
            .await
            .map(|r| r.is_ok()),
    );
    let body = format!(
        "broker {}\nstore {}\nobjects {}\n",
        if broker { "ok" } else { "down" },
        if store { "ok" } else { "down" },
        if objects { "ok" } else { "down" },
    );
    let status = if broker && store && objects {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}
