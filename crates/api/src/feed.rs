//! Following the projection: the compacted change feed (`GET /v1/feed`, a long poll with
//! `?wait=`), the same feed as Server-Sent Events (`GET /v1/feed/stream`), and read-your-writes
//! (`GET /v1/accounts/{id}?min_position=`).
//!
//! Waiting is woken by the projector's commits: [`Checkpoint`] holds the projection's checkpoint
//! as this process last heard it (LISTEN `checkpoint_advanced`, one session per process), and a
//! waiter sleeps until it moves; nothing polls the tables in a loop.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde::Serialize;
use store::PgPool;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::history::{Params, invalid_query};
use crate::{AccountView, ApiState, Problem};

/// The projection's checkpoint as this process last heard it.
#[derive(Clone)]
pub struct Checkpoint(watch::Receiver<i64>);

impl Checkpoint {
    /// The checkpoint and the loop that keeps it current, to run supervised.
    pub fn watch(pool: PgPool) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (sender, receiver) = watch::channel(0);
        (Self(receiver), keep_current(pool, sender))
    }

    /// The checkpoint as a streaming replica sees it, read every `interval` (a standby cannot
    /// LISTEN), and the loop that reads it, to run supervised.
    pub fn poll(
        pool: PgPool,
        interval: Duration,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (sender, receiver) = watch::channel(0);
        (Self(receiver), poll_current(pool, interval, sender))
    }

    /// Waits until the checkpoint is above `position`, or `until`; true if it got there.
    async fn passes(&self, position: i64, until: Instant) -> bool {
        let mut receiver = self.0.clone();
        matches!(
            tokio::time::timeout_at(until, receiver.wait_for(|c| *c > position)).await,
            Ok(Ok(_))
        )
    }
}

/// Follows `checkpoint_advanced`, reconnecting after a lost session, until nobody can ask any
/// more (the routes holding the receivers are gone: the server stopped).
async fn keep_current(pool: PgPool, sender: watch::Sender<i64>) {
    loop {
        tokio::select! {
            () = sender.closed() => return,
            listened = listen(&pool, &sender) => {
                if let Err(error) = listened {
                    tracing::warn!(%error, "lost the checkpoint notifications; listening again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

/// Moves the checkpoint the receivers see up to `position` (never down), waking them if it moved.
fn raise(sender: &watch::Sender<i64>, position: i64) {
    sender.send_if_modified(|c| {
        let moved = position > *c;
        *c = (*c).max(position);
        moved
    });
}

/// Reads the replica's checkpoint every `interval` until nobody can ask any more.
async fn poll_current(pool: PgPool, interval: Duration, sender: watch::Sender<i64>) {
    let read = async || -> store::Result<i64> {
        let mut conn = store::acquire(&pool).await?;
        store::checkpoints::get(&mut conn, store::checkpoints::PROJECTION).await
    };
    let mut failing = false;
    loop {
        match read().await {
            Ok(position) => {
                failing = false;
                raise(&sender, position);
            }
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(%error, "cannot read the replica's checkpoint; trying again");
            }
            Err(_) => {}
        }
        tokio::select! {
            () = sender.closed() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

async fn listen(pool: &PgPool, sender: &watch::Sender<i64>) -> store::Result<()> {
    use store::checkpoints::{self, CheckpointNotifications, PROJECTION};
    let mut notifications = CheckpointNotifications::subscribe(pool).await?;
    // Read after subscribing: an advance in between is then heard, not lost.
    let current = {
        let mut conn = store::acquire(pool).await?;
        checkpoints::get(&mut conn, PROJECTION).await?
    };
    let advance = |position: i64| raise(sender, position);
    advance(current);
    loop {
        let (name, position) = notifications.next().await?;
        if name == PROJECTION {
            advance(position);
        }
    }
}

/// How the feed's waits and streams behave.
#[derive(Debug, Clone, Copy)]
pub struct FeedConfig {
    /// The longest `?wait=` honoured (shorter in tests of other things).
    pub max_wait: Duration,
    /// An idle stream gets a comment line this often.
    pub heartbeat: Duration,
    /// A stream whose reader takes longer than this to accept the next event is ended; the
    /// reader resumes with `Last-Event-ID`.
    pub send_timeout: Duration,
}

impl Default for FeedConfig {
    fn default() -> Self {
        Self {
            max_wait: web::wait::MAX,
            heartbeat: Duration::from_secs(10),
            send_timeout: Duration::from_secs(30),
        }
    }
}

/// One page of the feed.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct FeedPage {
    /// Accounts whose snapshot changed after the cursor, once each, at their current view, in
    /// `last_position` order.
    accounts: Vec<AccountView>,
    /// Where to resume: never null.
    next_after: i64,
}

/// Events per page of the stream.
const STREAM_PAGE: i64 = 100;

/// A page of changes after `after`, and where the next one starts.
async fn page(
    state: &ApiState,
    after: i64,
    limit: i64,
) -> Result<(Vec<AccountView>, i64, i64), Problem> {
    let read = async {
        let mut conn = state.db.acquire().await?;
        let page = store::snapshots::changed_after(&mut conn, &state.vault, after, limit).await?;
        conn.release();
        Ok::<_, store::Error>(page)
    };
    let (snapshots, checkpoint) = tokio::time::timeout(state.database_timeout, read)
        .await
        .map_err(|_| Problem::unavailable())??;
    // A full page resumes after its last account; a short one has seen everything up to the
    // checkpoint it was read with.
    let next_after = match snapshots.last() {
        Some(last) if snapshots.len() as i64 == limit => last.last_position,
        _ => after.max(checkpoint),
    };
    Ok((
        snapshots.iter().map(AccountView::from).collect(),
        next_after,
        checkpoint,
    ))
}

/// The compacted change feed: every account whose snapshot changed after `after`, once, at its
/// current view.
#[utoipa::path(
    get,
    path = "/v1/feed",
    tag = "feed",
    params(
        ("after" = Option<i64>, Query, minimum = 0, description = "The cursor: `next_after` of the previous page (default 0, the beginning)"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 1000, description = "Accounts per page (default 100)"),
        ("wait" = Option<String>, Query, pattern = r"^[0-9]+(\.[0-9]+)?(s|ms)?$",
            description = "e.g. `30s` or `500ms`; a longer wait than 60s waits 60s: an empty page is held open until a change is projected or the wait ends"),
    ),
    responses(
        (status = 200, description = "A page of the feed; resume from `next_after`", body = FeedPage),
        (status = 400, description = "`invalid_query`: a parameter out of range",
            body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn feed(
    State(state): State<Arc<ApiState>>,
    RawQuery(query): RawQuery,
) -> Result<Json<FeedPage>, Problem> {
    let params = Params::parse(query.as_deref())?;
    let after = params.integer("after", 0, 0..=i64::MAX)?;
    let limit = params.integer("limit", 100, 1..=1000)?;
    let wait = params.wait(web::wait::MAX)?.min(state.feed.max_wait);
    let until = Instant::now() + wait;
    loop {
        let (accounts, next_after, checkpoint) = page(&state, after, limit).await?;
        // Nothing yet: sleep until the projector commits past what this page saw, or the wait ends.
        if accounts.is_empty()
            && Instant::now() < until
            && state.checkpoint.passes(checkpoint, until).await
        {
            continue;
        }
        return Ok(Json(FeedPage {
            accounts,
            next_after,
        }));
    }
}

/// The feed as Server-Sent Events: `id:` the view's `last_position`, `event: account`, `data:` the
/// view; resumes after `Last-Event-ID` (or `?after=`); a comment line on an idle stream at least
/// every 15 s. A reader too slow to take the next event within the send timeout is cut off (the
/// stream ends) and resumes with `Last-Event-ID`, so nothing is buffered without bound.
#[utoipa::path(
    get,
    path = "/v1/feed/stream",
    tag = "feed",
    params(
        ("after" = Option<i64>, Query, minimum = 0, description = "Start after this cursor (default 0); `Last-Event-ID` takes precedence"),
        ("Last-Event-ID" = Option<i64>, Header, description = "The `id:` of the last event received"),
    ),
    responses(
        (status = 200, description = "`text/event-stream` of `account` events", content_type = "text/event-stream", body = String),
        (status = 400, description = "`invalid_query`: a cursor that is not a position",
            body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn feed_stream(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Problem> {
    let params = Params::parse(query.as_deref())?;
    let after = match headers.get("last-event-id") {
        Some(id) => id
            .to_str()
            .ok()
            .and_then(|id| id.trim().parse::<i64>().ok())
            .filter(|id| *id >= 0)
            .ok_or_else(|| invalid_query("Last-Event-ID must be a log position"))?,
        None => params.integer("after", 0, 0..=i64::MAX)?,
    };
    // A small queue between the reader of the database and the socket: back-pressure, not a buffer.
    let (sender, receiver) = mpsc::channel(16);
    tokio::spawn(produce(Arc::clone(&state), after, sender));
    let events = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|event| (Ok(event), receiver))
    });
    Ok(Sse::new(events).keep_alive(
        KeepAlive::new()
            .interval(state.feed.heartbeat)
            .text("heartbeat"),
    ))
}

/// Reads the feed after `after` into `sender` until the reader goes, is too slow, the database
/// fails (the stream ends; the reader resumes), or the service stops.
async fn produce(state: Arc<ApiState>, mut after: i64, sender: mpsc::Sender<Event>) {
    loop {
        let (accounts, next_after, checkpoint) = match page(&state, after, STREAM_PAGE).await {
            Ok(page) => page,
            Err(problem) => {
                tracing::warn!(
                    code = problem.code,
                    "feed stream ended: the database failed"
                );
                return;
            }
        };
        let full = accounts.len() as i64 == STREAM_PAGE;
        for view in accounts {
            let id = view.last_position;
            let event = Event::default()
                .id(id.to_string())
                .event("account")
                .json_data(&view)
                .unwrap_or_else(|_| Event::default().comment("unserialisable view"));
            match sender.send_timeout(event, state.feed.send_timeout).await {
                Ok(()) => {}
                Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                    tracing::info!(
                        after = id,
                        "feed stream reader too slow; cut off (it resumes with Last-Event-ID)"
                    );
                    return;
                }
                Err(mpsc::error::SendTimeoutError::Closed(_)) => return,
            }
        }
        after = next_after;
        if full {
            continue;
        }
        tokio::select! {
            () = sender.closed() => return,
            () = state.streams.cancelled() => return,
            _ = state.checkpoint.passes(checkpoint, Instant::now() + Duration::from_secs(3600)) => {}
        }
    }
}

/// Read-your-writes: waits (up to `wait`) until the projection has folded `position`; else 503
/// `not_yet_projected` with `Retry-After`.
pub(crate) async fn wait_for_position(
    state: &ApiState,
    position: i64,
    wait: Duration,
) -> Result<(), Problem> {
    let until = Instant::now() + wait.min(state.feed.max_wait);
    let checkpoint = async {
        let mut conn = state.db.acquire().await?;
        let checkpoint = store::checkpoints::get(&mut conn, store::checkpoints::PROJECTION).await?;
        conn.release();
        Ok::<_, store::Error>(checkpoint)
    };
    let checkpoint = tokio::time::timeout(state.database_timeout, checkpoint)
        .await
        .map_err(|_| Problem::unavailable())??;
    if checkpoint >= position || state.checkpoint.passes(position - 1, until).await {
        return Ok(());
    }
    Err(Problem {
        retry_after: Some(1),
        ..Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_yet_projected",
            format!("the projection has not folded position {position} yet; retry later"),
        )
    })
}
