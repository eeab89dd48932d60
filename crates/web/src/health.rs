//! `/healthz` and `/readyz`, and the [`Readiness`] state `/readyz` answers from.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use store::{PgConnectOptions, PgConnection};

use crate::Problem;

/// `/healthz` (the process answers) and `/readyz` (answered from [`Readiness`], never by a query).
pub fn router(readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(readiness)
}

/// Whether this process is ready, as last seen: the database check refreshed by
/// [`Readiness::refresh`] at most once a second, and whether every task of its roles still runs.
/// `/readyz` reads it and so costs no query, however often it is asked.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<std::sync::Mutex<ReadinessState>>);

#[derive(Debug, Default)]
struct ReadinessState {
    /// The last database check; `None` before the first.
    database: Option<Result<(), store::NotReady>>,
    /// A task of this process's roles that stopped.
    dead_task: Option<&'static str>,
}

/// How often [`Readiness::refresh`] checks the database, and how long one check may take.
pub const READINESS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl Readiness {
    /// Why the process is not ready, if it is not.
    pub fn check(&self) -> Result<(), String> {
        let state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(task) = state.dead_task {
            return Err(format!("the {task} task has stopped"));
        }
        match state.database {
            None => Err("starting".into()),
            Some(Err(reason)) => Err(reason.to_string()),
            Some(Ok(())) => Ok(()),
        }
    }

    /// Marks a task of this process's roles as stopped: not ready from now on.
    pub fn task_stopped(&self, task: &'static str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).dead_task = Some(task);
    }

    /// Checks the database once (at most [`READINESS_INTERVAL`]) and keeps the answer. `conn` is
    /// the check's own session, opened when missing and dropped after an error: never one of the
    /// pool's, so the check neither competes with requests nor leaves a pooled connection that a
    /// restarted server has dropped looking freshly used.
    pub async fn check_database(
        &self,
        options: &PgConnectOptions,
        conn: &mut Option<PgConnection>,
    ) {
        let check = async {
            if conn.is_none() {
                *conn = Some(
                    store::connect(options)
                        .await
                        .map_err(|_| store::NotReady::Unavailable)?,
                );
            }
            match conn.as_mut() {
                Some(c) => store::check_ready_on(c).await,
                None => Err(store::NotReady::Unavailable),
            }
        };
        let checked = tokio::time::timeout(READINESS_INTERVAL, check)
            .await
            .unwrap_or(Err(store::NotReady::Unavailable));
        if checked.is_err() {
            *conn = None;
        }
        self.0.lock().unwrap_or_else(|e| e.into_inner()).database = Some(checked);
    }

    /// Checks the database every [`READINESS_INTERVAL`] until `shutdown` fires.
    pub async fn refresh(
        self,
        options: PgConnectOptions,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut conn = None;
        loop {
            self.check_database(&options, &mut conn).await;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(READINESS_INTERVAL) => {}
            }
        }
    }
}

/// A health answer.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Health {
    #[schema(value_type = String, example = "ok")]
    status: &'static str,
}

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The process is alive", body = Health,
        example = json!({"status": "ok"})))
)]
pub(crate) async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Readiness: the database answers, every migration is applied, and every task of this process's
/// roles runs (as last checked, at most a second ago).
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready to serve", body = Health, example = json!({"status": "ready"})),
        (status = 503, description = "`not_ready`: the database is unreachable, migrations are pending, or a task of this process has stopped",
            body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn readyz(State(readiness): State<Readiness>) -> Result<Json<Health>, Problem> {
    match readiness.check() {
        Ok(()) => Ok(Json(Health { status: "ready" })),
        Err(reason) => Err(Problem {
            retry_after: Some(5),
            ..Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                reason.to_string(),
            )
        }),
    }
}

/// The OpenAPI description of `/healthz` and `/readyz`, and the `operations` tag.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(healthz, readyz),
    components(schemas(Problem)),
    tags((name = "operations", description = "Health, readiness, metrics and this document"))
)]
pub struct HealthDoc;
