//! The query API: account snapshots over HTTP.
//!
//! # Layout
//! - [`router`]: `/v1` routes behind bearer tokens (errors are [`web::Problem`]s).
//! - [`view`]: [`AccountView`], what `/v1` says about an account (in `web`: the notifier sends it too).
//! - [`reader`]: current-snapshot lookups that arrive together share one read.
//! - [`feed`]: following the projection: the compacted change feed (long poll and SSE), and
//!   read-your-writes (`?min_position=`), woken by the projector's commits.
//! - [`ui`]: `/ui/`, pages a person reads (search, an account's timeline with field-level diffs,
//!   the view as of any event, health), behind the same tokens through a session cookie.
//! - `history`: the audit routes: an account's events, the global log, field-level changes, and
//!   time travel (`?as_of=` / `?at_position=`), all replayed with the same [`domain::step`].

#![forbid(unsafe_code)]

pub mod feed;
mod history;
pub mod openapi;
pub mod reader;
pub mod ui;
/// The account view, shared with the notifier's deliveries ([`web::view`]).
pub use web::view;

use std::sync::Arc;

use axum::extract::{Path, RawQuery, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use subtle::ConstantTimeEq;
use uuid::Uuid;

pub use view::AccountView;
pub use web::Problem;

/// What the query routes need.
pub struct ApiState {
    /// Connections for the queries, to the replica when `READ_DATABASE_URL` names one; kept
    /// between requests (see [`store::kept`]).
    pub db: store::kept::KeptConnections,
    /// Connections to the primary for what the pages write and must read back at once: their
    /// sessions (the same as `db` without a replica).
    pub sessions: store::kept::KeptConnections,
    /// Current-snapshot lookups, shared between concurrent requests (see [`reader`]).
    pub snapshots: reader::SnapshotReader,
    /// Opens what the store keeps sealed.
    pub vault: store::keys::Vault,
    /// Accepted bearer tokens; empty means `/v1` is open.
    pub tokens: Vec<String>,
    /// A query that takes longer is answered 503: the database is unreachable or stuck.
    pub database_timeout: std::time::Duration,
    /// The projection's checkpoint as this process last heard it (see [`feed::Checkpoint`]).
    pub checkpoint: feed::Checkpoint,
    pub feed: feed::FeedConfig,
    /// Fires at shutdown: open feed streams end.
    pub streams: tokio_util::sync::CancellationToken,
    /// The pages' sessions.
    pub ui: ui::UiConfig,
}

/// `/v1` query routes, and the pages under `/ui/` ([`ui`]).
pub fn router(state: ApiState) -> Router {
    // Shared behind one pointer: every extractor and middleware takes its own copy per request.
    let state = Arc::new(state);
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
        .route("/v1/feed", get(feed::feed))
        .route("/v1/feed/stream", get(feed::feed_stream))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            database_deadline,
        ))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_token,
        ))
        .with_state(Arc::clone(&state))
        .merge(ui::router(state))
}

async fn require_token(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
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

/// Query routes read no body, so their time is database time: past the deadline (plus what the
/// request asks to wait, `?wait=`), answer 503.
async fn database_deadline(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
    let deadline = state.database_timeout + web::wait::requested(request.uri().query());
    match tokio::time::timeout(deadline, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(timeout = ?state.database_timeout, "query timed out");
            Problem::unavailable().into_response()
        }
    }
}

/// The longest `?wait=` of a read-your-writes lookup.
const MIN_POSITION_MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

pub(crate) fn parse_id(raw: &str, what: &str) -> Result<Uuid, Problem> {
    Uuid::try_parse(raw).map_err(|_| Problem::invalid_id(format!("{what} is not a UUID")))
}

/// The account's current view, or the view as it was at a past time or log position.
#[utoipa::path(
    get,
    path = "/v1/accounts/{account_id}",
    tag = "accounts",
    params(
        ("account_id" = Uuid, Path, description = "Argyle account id", example = "0187c66e-e7e5-811c-b006-2232f00f426a"),
        ("as_of" = Option<chrono::DateTime<chrono::Utc>>, Query,
            description = "RFC 3339 instant: the view folded from events received at or before it"),
        ("at_position" = Option<i64>, Query, minimum = 0,
            description = "The view folded from events at log positions up to and including this one; with `as_of` too, both bounds apply"),
        ("min_position" = Option<i64>, Query, minimum = 0,
            description = "Read-your-writes: answer once the projection has folded this position (the `position` ingest answered)"),
        ("wait" = Option<String>, Query, pattern = r"^[0-9]+(\.[0-9]+)?(s|ms)?$",
            description = "With `min_position`: how long to wait for it (default 0s: answer at once); a longer wait than 30s waits 30s"),
    ),
    responses(
        (status = 200, description = "The account view", body = AccountView),
        (status = 400, description = "`invalid_id`: not a UUID; `invalid_query`: bad `as_of` / `at_position`",
            body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no such account (at that time)",
            body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`not_yet_projected`: the projection has not folded `min_position` within `wait` (with `Retry-After`); `unavailable`: the database is unreachable",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn get_account(
    State(state): State<Arc<ApiState>>,
    Path(raw): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<AccountView>, Problem> {
    let account_id = parse_id(&raw, "account_id")?;
    let params = history::Params::parse(query.as_deref())?;
    let until = params.until()?;
    let wait = params.wait(MIN_POSITION_MAX_WAIT)?;
    if params.has("min_position") {
        let position = params.integer("min_position", 0, 0..=i64::MAX)?;
        feed::wait_for_position(&state, position, wait).await?;
    }
    let snapshot = match until {
        None => state.snapshots.get(account_id).await?,
        Some(until) => {
            let mut conn = state.db.acquire().await?;
            let snapshot = history::replay(&mut conn, &state.vault, account_id, until).await?;
            conn.release();
            snapshot
        }
    };
    snapshot
        .map(|s| Json(AccountView::from(&s)))
        .ok_or_else(|| Problem::not_found(format!("no account {account_id}")))
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct UserAccounts {
    user_id: Uuid,
    accounts: Vec<AccountView>,
}

/// Every account of one user, ordered by account id.
#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/accounts",
    tag = "accounts",
    params(("user_id" = Uuid, Path, description = "Argyle user id", example = "018051aa-f7a9-a0db-2f38-6cfa325e9d69")),
    responses(
        (status = 200, description = "The user's accounts; an empty list if none", body = UserAccounts),
        (status = 400, description = "`invalid_id`: not a UUID",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn get_user_accounts(
    State(state): State<Arc<ApiState>>,
    Path(raw): Path<String>,
) -> Result<Json<UserAccounts>, Problem> {
    let user_id = parse_id(&raw, "user_id")?;
    let mut conn = state.db.acquire().await?;
    let accounts = store::snapshots::of_user(&mut conn, &state.vault, user_id)
        .await?
        .iter()
        .map(AccountView::from)
        .collect();
    conn.release();
    Ok(Json(UserAccounts { user_id, accounts }))
}
