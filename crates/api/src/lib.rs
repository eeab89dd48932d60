//! The query API: account snapshots over HTTP, health endpoints, and the problem+json error type.
//!
//! # Layout
//! - [`problem`]: [`Problem`], the RFC 9457 error every route (ingest included) answers with.
//! - [`router`]: `/v1` routes behind bearer tokens; [`health_router`]: `/healthz`, `/readyz`.
//! - `history`: the audit routes: an account's events, the global log, field-level changes, and
//!   time travel (`?as_of=` / `?at_position=`), all replayed with the same [`domain::apply`].

#![forbid(unsafe_code)]

mod history;
pub mod problem;

use std::sync::Arc;

use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use domain::AccountView;
use serde::Serialize;
use store::PgPool;
use subtle::ConstantTimeEq;
use uuid::Uuid;

pub use problem::Problem;

/// What the query routes need.
#[derive(Clone)]
pub struct ApiState {
    pub pool: PgPool,
    /// Accepted bearer tokens; empty means `/v1` is open.
    pub tokens: Arc<Vec<String>>,
    /// A query that takes longer is answered 503: the database is unreachable or stuck.
    pub database_timeout: std::time::Duration,
}

/// `/v1` query routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/accounts/{account_id}", get(get_account))
        .route(
            "/v1/accounts/{account_id}/events",
            get(history::account_events),
        )
        .route(
            "/v1/accounts/{account_id}/changes",
            get(history::account_changes),
        )
        .route("/v1/events", get(history::all_events))
        .route("/v1/quarantine", get(history::quarantine))
        .route("/v1/users/{user_id}/accounts", get(get_user_accounts))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            database_deadline,
        ))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

/// `/healthz` (the process answers) and `/readyz` (database reachable, migrations applied).
pub fn health_router(pool: PgPool) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(pool)
}

async fn require_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    if state.tokens.is_empty() {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        // The scheme is case-insensitive (RFC 9110 §11.1); the token is compared exactly.
        .and_then(|(scheme, token)| scheme.eq_ignore_ascii_case("bearer").then_some(token))
        .unwrap_or("");
    // Compare against every token without stopping early, so timing tells nothing about which matched.
    let matched = state
        .tokens
        .iter()
        .fold(subtle::Choice::from(0), |acc, token| {
            acc | token.as_bytes().ct_eq(presented.as_bytes())
        });
    if bool::from(matched) && !presented.is_empty() {
        next.run(request).await
    } else {
        Problem::unauthorized().into_response()
    }
}

/// Query routes read no body, so their time is database time: past the deadline, answer 503.
async fn database_deadline(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(state.database_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(timeout = ?state.database_timeout, "query timed out");
            Problem::unavailable().into_response()
        }
    }
}

pub(crate) fn parse_id(raw: &str, what: &str) -> Result<Uuid, Problem> {
    Uuid::try_parse(raw).map_err(|_| Problem::invalid_id(format!("{what} is not a UUID")))
}

async fn get_account(
    State(state): State<ApiState>,
    Path(raw): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<AccountView>, Problem> {
    let account_id = parse_id(&raw, "account_id")?;
    let until = history::Params::parse(query.as_deref())?.until()?;
    let mut conn = state.pool.acquire().await.map_err(store::Error::from)?;
    let snapshot = match until {
        None => store::snapshots::get(&mut conn, account_id).await?,
        Some(until) => history::replay(&mut conn, account_id, until).await?,
    };
    snapshot
        .map(|s| Json(s.view()))
        .ok_or_else(|| Problem::not_found(format!("no account {account_id}")))
}

#[derive(Serialize)]
struct UserAccounts {
    user_id: Uuid,
    accounts: Vec<AccountView>,
}

async fn get_user_accounts(
    State(state): State<ApiState>,
    Path(raw): Path<String>,
) -> Result<Json<UserAccounts>, Problem> {
    let user_id = parse_id(&raw, "user_id")?;
    let mut conn = state.pool.acquire().await.map_err(store::Error::from)?;
    let accounts = store::snapshots::of_user(&mut conn, user_id)
        .await?
        .iter()
        .map(|s| s.view())
        .collect();
    Ok(Json(UserAccounts { user_id, accounts }))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(pool): State<PgPool>) -> Result<Json<serde_json::Value>, Problem> {
    match store::check_ready(&pool).await {
        Ok(()) => Ok(Json(serde_json::json!({"status": "ready"}))),
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
