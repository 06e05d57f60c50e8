//! Adjudication of possible duplicates: the operator decision API (the console comes later).
//!
//! * `GET  /api/adjudications` — applications in `possible_duplicate`, oldest first.
//! * `GET  /api/adjudications/{id}` — both sides: the application and each candidate
//!   (application ids, fused score, FMR, per-finger scores, photo endpoints).
//! * `GET  /api/adjudications/{id}/photo/{which}` — decrypted JPEG; `which` is `applicant`
//!   or the application id of one of its candidates (nothing else is served).
//! * `POST /api/adjudications/{id}/decision` — `{"decision": "confirmed_duplicate" |
//!   "cleared", "reason": "...", "operator": "..."}`: compare-and-set transition from
//!   `possible_duplicate` with history actor `operator:<name>`; a registry callback
//!   (topic `callback`); `cleared` also enrols the application in the gallery and enqueues
//!   the keys job. Any other state answers 409.
//!
//! This JSON API does not authenticate operators (it takes the operator's name from the body
//! and audits it with role `operator-unauthenticated`): serve it only on the operators'
//! network. The console (workers/console) authenticates operators, enforces roles and sends
//! the decision through the outbox (topic
//! [`ADJUDICATION_TOPIC`](cardpipe_common::contract::ADJUDICATION_TOPIC)); [`AdjudicationSink`]
//! applies it here with [`decide_as`].

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cardpipe_common::broker::Job;
use cardpipe_common::domain::{ApplicationId, ApplicationState};
use cardpipe_common::records;
use cardpipe_common::runtime::Services;
use cardpipe_common::store::{Store, Transition};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::Row;

use cardpipe_registry::callbacks::{CallbackEvent, enqueue_callback};

use crate::stage::{self, DedupEngine, NEXT_STAGE};
use cardpipe_biometrics::matcher::TenPrint;

#[derive(Clone)]
struct AppState {
    services: Services,
    engine: Option<Arc<DedupEngine>>,
}

/// The adjudication routes (no in-process gallery: a cleared application is enrolled
/// through `dedup_enrolled`, which dedup workers follow).
pub fn router(services: Services) -> Router {
    router_with_engine(services, None)
}

/// The adjudication routes; a cleared application is also enrolled into `engine` at once.
pub fn router_with_engine(services: Services, engine: Option<Arc<DedupEngine>>) -> Router {
    Router::new()
        .route("/api/adjudications", get(list))
        .route("/api/adjudications/{application_id}", get(detail))
        .route(
            "/api/adjudications/{application_id}/photo/{which}",
            get(photo),
        )
        .route("/api/adjudications/{application_id}/decision", post(decide))
        .with_state(AppState { services, engine })
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "adjudication API");
    error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
}

async fn list(State(st): State<AppState>) -> Response {
    let rows = sqlx::query(
        "SELECT a.id, a.registry_id, a.updated_at, COUNT(c.rank) AS candidates, MAX(c.score) AS best
         FROM applications a JOIN dedup_candidates c ON c.application_id = a.id
         WHERE a.state = $1 GROUP BY a.id, a.registry_id, a.updated_at
         ORDER BY a.updated_at, a.id LIMIT 1000",
    )
    .bind(ApplicationState::PossibleDuplicate.as_str())
    .fetch_all(st.services.store.pool())
    .await;
    let rows = match rows {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    let mut out = Vec::new();
    for r in rows {
        let item = (|| -> Result<Value, sqlx::Error> {
            let id: String = r.try_get("id")?;
            Ok(json!({
                "application_id": id,
                "registry_id": r.try_get::<String, _>("registry_id")?,
                "flagged_at": r.try_get::<String, _>("updated_at")?,
                "candidates": r.try_get::<i64, _>("candidates")?,
                "best_score": r.try_get::<f64, _>("best")?,
                "detail": format!("/api/adjudications/{id}"),
            }))
        })();
        match item {
            Ok(v) => out.push(v),
            Err(e) => return internal(e),
        }
    }
    Json(json!({ "pending": out })).into_response()
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic())
}

async fn detail(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    if !valid_id(&id) {
        return error(StatusCode::BAD_REQUEST, "invalid application id");
    }
    let app_id = ApplicationId(id.clone());
    let app = match st.services.store.application(&app_id).await {
        Ok(Some(a)) => a,
        Ok(None) => return error(StatusCode::NOT_FOUND, "no such application"),
        Err(e) => return internal(e),
    };
    let cands = match cardpipe_common::contract::candidates(&st.services.store, &app_id).await {
        Ok(c) => c,
        Err(e) => return internal(e),
    };
    if cands.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            "this application was never flagged as a possible duplicate",
        );
    }
    let mut list = Vec::new();
    for c in &cands {
        let other = match st
            .services
            .store
            .application(&ApplicationId(c.candidate_id.clone()))
            .await
        {
            Ok(o) => o,
            Err(e) => return internal(e),
        };
        let fingers: Vec<Value> = c
            .finger_scores
            .iter()
            .enumerate()
            .map(|(i, s)| json!({ "position": i + 1, "score": s }))
            .collect();
        list.push(json!({
            "rank": c.rank,
            "application_id": c.candidate_id,
            "registry_id": other.as_ref().map(|o| o.registry_id.clone()),
            "state": other.as_ref().map(|o| o.state.as_str()),
            "score": c.score,
            "fmr": c.fmr,
            "fingers": fingers,
            "photo": format!("/api/adjudications/{id}/photo/{}", c.candidate_id),
        }));
    }
    Json(json!({
        "application_id": id,
        "registry_id": app.registry_id,
        "state": app.state.as_str(),
        "pending": app.state == ApplicationState::PossibleDuplicate,
        "photo": format!("/api/adjudications/{id}/photo/applicant"),
        "candidates": list,
    }))
    .into_response()
}

async fn photo(State(st): State<AppState>, Path((id, which)): Path<(String, String)>) -> Response {
    if !valid_id(&id) || !valid_id(&which) {
        return error(StatusCode::BAD_REQUEST, "invalid id");
    }
    let app_id = ApplicationId(id);
    let cands = match cardpipe_common::contract::candidates(&st.services.store, &app_id).await {
        Ok(c) => c,
        Err(e) => return internal(e),
    };
    if cands.is_empty() {
        return error(StatusCode::NOT_FOUND, "not an adjudication");
    }
    let target = if which == "applicant" {
        app_id
    } else if cands.iter().any(|c| c.candidate_id == which) {
        ApplicationId(which)
    } else {
        return error(
            StatusCode::NOT_FOUND,
            "photo must be `applicant` or one of the candidates' application ids",
        );
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
        Err(records::RecordError::Missing { .. }) => {
            error(StatusCode::NOT_FOUND, "no photo stored")
        }
        Err(e) => internal(e),
    }
}

/// The decision body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// `confirmed_duplicate` or `cleared`.
    pub decision: String,
    /// Why (recorded in history).
    pub reason: String,
    /// The operator's login.
    pub operator: String,
}

async fn decide(
    State(st): State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<Decision>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(d) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    // This API names the operator in the body (no authentication of its own): the audit
    // entry says so. The console authenticates operators and calls [`decide_as`] directly.
    match decide_as(
        &st.services,
        st.engine.as_ref(),
        &id,
        &d.decision,
        &d.reason,
        &d.operator,
        "operator-unauthenticated",
    )
    .await
    {
        Ok(to) => Json(json!({ "application_id": id, "state": to.as_str() })).into_response(),
        Err(DecideError::BadInput(m)) => error(StatusCode::BAD_REQUEST, m),
        Err(DecideError::NotFound) => error(StatusCode::NOT_FOUND, "no such application"),
        Err(e @ DecideError::Conflict { .. }) => error(StatusCode::CONFLICT, e.to_string()),
        Err(DecideError::Internal(e)) => internal(e),
    }
}

/// Why a decision was not taken.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// The request names something invalid (the message says what).
    #[error("{0}")]
    BadInput(String),
    /// No such application.
    #[error("no such application")]
    NotFound,
    /// Not (or no longer) a possible duplicate.
    #[error(
        "application {id} is in state {state}, not possible_duplicate: it was already decided or never flagged; nothing changed"
    )]
    Conflict {
        /// The application.
        id: String,
        /// Its state.
        state: ApplicationState,
    },
    /// Store or engine failure.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// Decides a possible duplicate: `decision` is `confirmed_duplicate` or `cleared`. Moves the
/// application (compare-and-set from `possible_duplicate`, history actor
/// `operator:<operator>`), writes the registry callback, enrols a cleared application and
/// hands it to keys, and appends the audit entry (`dedup.decide`, actor `operator`, role
/// `role`) — all in one transaction. Role checks are the caller's.
pub async fn decide_as(
    services: &Services,
    engine: Option<&Arc<DedupEngine>>,
    id: &str,
    decision: &str,
    reason: &str,
    operator: &str,
    role: &str,
) -> Result<ApplicationState, DecideError> {
    if !valid_id(id) {
        return Err(DecideError::BadInput("invalid application id".into()));
    }
    let to = match decision {
        "confirmed_duplicate" => ApplicationState::ConfirmedDuplicate,
        "cleared" => ApplicationState::Cleared,
        _ => {
            return Err(DecideError::BadInput(
                "decision must be \"confirmed_duplicate\" or \"cleared\"".into(),
            ));
        }
    };
    let operator = operator.trim();
    if operator.is_empty()
        || operator.len() > 64
        || !operator
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b))
    {
        return Err(DecideError::BadInput(
            "operator must be 1..=64 characters of [A-Za-z0-9._-@]".into(),
        ));
    }
    let reason = reason.trim();
    if reason.is_empty() || reason.len() > 2000 {
        return Err(DecideError::BadInput(
            "reason must be 1..=2000 characters".into(),
        ));
    }
    let app_id = ApplicationId(id.to_owned());
    let app = services
        .store
        .application(&app_id)
        .await
        .map_err(anyhow::Error::from)?
        .ok_or(DecideError::NotFound)?;
    if app.state != ApplicationState::PossibleDuplicate {
        return Err(DecideError::Conflict {
            id: id.to_owned(),
            state: app.state,
        });
    }
    // A cleared application joins the gallery: its templates, loaded before the transaction.
    let templates = if to == ApplicationState::Cleared {
        Some(
            stage::load_templates(services, &app_id)
                .await
                .map_err(anyhow::Error::from)?,
        )
    } else {
        None
    };
    let now = services.clock.now();
    let actor = format!("operator:{operator}");
    let moved = async {
        let mut tx = services.store.begin().await?;
        let moved = Store::transition(
            &mut tx,
            &Transition {
                id: &app_id,
                from: ApplicationState::PossibleDuplicate,
                to,
                stage: "adjudication",
                attempt: 0,
                actor: &actor,
                reason: Some(reason),
                at: now,
            },
        )
        .await?;
        if !moved {
            tx.rollback().await?;
            return Ok::<bool, anyhow::Error>(false);
        }
        if let Some(t) = &templates {
            stage::insert_enrolled(&mut tx, services, &app_id, t, now).await?;
            let job = Job::new(NEXT_STAGE, app_id.as_str())
                .with_priority(app.priority == cardpipe_common::domain::Priority::Urgent);
            Store::enqueue_job(&mut tx, &job, now).await?;
        }
        enqueue_callback(
            &mut tx,
            app_id.as_str(),
            CallbackEvent::DuplicateDecided,
            &app.registry_id,
            Some(to),
            Some(reason),
            json!({ "decision": to.as_str(), "operator": operator }),
            now,
        )
        .await?;
        cardpipe_common::audit::record_in(
            &mut tx,
            now,
            &cardpipe_common::audit::AuditEvent {
                actor: operator,
                role,
                action: "dedup.decide",
                subject: app_id.as_str(),
                details: json!({ "decision": to.as_str(), "reason": reason }),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }
    .await?;
    if !moved {
        let state = match services.store.application(&app_id).await {
            Ok(Some(a)) => a.state,
            _ => app.state,
        };
        return Err(DecideError::Conflict {
            id: id.to_owned(),
            state,
        });
    }
    if let (Some(engine), Some(t)) = (engine, &templates)
        && let Ok((tp, _)) = TenPrint::from_templates(t)
    {
        engine.enrol_local(app_id.as_str(), &tp, None);
    }
    tracing::info!(application = %app_id, decision = to.as_str(), %operator, "possible duplicate decided");
    Ok(to)
}

/// Outbox sink for [`ADJUDICATION_TOPIC`](cardpipe_common::contract::ADJUDICATION_TOPIC):
/// applies decisions operators took in the console. A decision the application no longer
/// admits (decided meanwhile by someone else, bad input) is logged and dropped — retrying
/// cannot change it; a store failure is retried.
#[derive(Debug)]
pub struct AdjudicationSink {
    services: Services,
}

impl AdjudicationSink {
    /// A sink on `services`.
    pub fn new(services: Services) -> Self {
        Self { services }
    }
}

#[async_trait::async_trait]
impl cardpipe_common::runtime::relay::OutboxSink for AdjudicationSink {
    async fn deliver(&self, row: &cardpipe_common::store::OutboxRow) -> anyhow::Result<()> {
        let d: cardpipe_common::contract::AdjudicationDecision = serde_json::from_str(&row.payload)
            .map_err(|e| {
                anyhow::anyhow!("outbox row {} is not an adjudication decision: {e}", row.id)
            })?;
        match decide_as(
            &self.services,
            None,
            &d.application_id,
            &d.decision,
            &d.reason,
            &d.operator,
            &d.role,
        )
        .await
        {
            Ok(_) => Ok(()),
            Err(DecideError::Internal(e)) => Err(e),
            Err(refused) => {
                tracing::warn!(application = %d.application_id, operator = %d.operator, error = %refused, "adjudication decision not applied");
                Ok(())
            }
        }
    }
}
