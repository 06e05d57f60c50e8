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
    // The three checks run side by side: one backend that hangs until the timeout must not
    // make the answer later than a caller's own timeout (a compose health check, a load
    // balancer, `bench chaos`), which would read as "not ready" although two are up.
    let timeout = std::time::Duration::from_secs(3);
    let up = |r: Result<bool, tokio::time::error::Elapsed>| matches!(r, Ok(true));
    let (broker, store, objects) = tokio::join!(
        tokio::time::timeout(timeout, async { s.broker.ping().await.is_ok() }),
        tokio::time::timeout(timeout, async { s.store.ping().await.is_ok() }),
        tokio::time::timeout(timeout, async { s.objects.ping().await.is_ok() }),
    );
    let (broker, store, objects) = (up(broker), up(store), up(objects));
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
