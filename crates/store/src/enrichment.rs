//! The enricher's durable state: which accounts need fetching from Argyle's API, and how far the
//! log has been scanned for resource-less events.

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{PgConnection, Result};

/// A fetch asked for: the account, its user, and the newest event asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct Request {
    pub account_id: Uuid,
    pub user_id: Uuid,
    pub requested_position: i64,
    pub attempts: i32,
}

/// Records that each `(account, user, position)` event asks for a fetch. An account already
/// waiting keeps its due time, so a burst coalesces into the fetch already scheduled.
pub async fn request(conn: &mut PgConnection, asks: &[(Uuid, Uuid, i64)]) -> Result<()> {
    // One row per account per statement: ON CONFLICT cannot touch a row twice.
    let mut newest = std::collections::BTreeMap::new();
    for &(account, user, position) in asks {
        let entry = newest.entry(account).or_insert((user, position));
        if position >= entry.1 {
            *entry = (user, position);
        }
    }
    let accounts: Vec<Uuid> = newest.keys().copied().collect();
    let users: Vec<Uuid> = newest.values().map(|v| v.0).collect();
    let positions: Vec<i64> = newest.values().map(|v| v.1).collect();
    sqlx::query(
        "INSERT INTO enrichment_requests (account_id, user_id, requested_position)
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[])
         ON CONFLICT (account_id) DO UPDATE SET
             requested_position = greatest(enrichment_requests.requested_position,
                                           excluded.requested_position),
             user_id = excluded.user_id",
    )
    .bind(&accounts)
    .bind(&users)
    .bind(&positions)
    .execute(conn)
    .await?;
    Ok(())
}

/// Up to `limit` pending fetches that are due now, oldest due first.
pub async fn due(conn: &mut PgConnection, limit: i64) -> Result<Vec<Request>> {
    Ok(sqlx::query_as(
        "SELECT account_id, user_id, requested_position, attempts FROM enrichment_requests
         WHERE requested_position > fetched_position AND next_attempt_at <= now()
         ORDER BY next_attempt_at LIMIT $1",
    )
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// Marks the fetch of `request` done (call in the transaction that appends its answer). Events
/// asking after it started stay pending, due no sooner than `window` from now.
pub async fn complete(conn: &mut PgConnection, request: &Request, window: Duration) -> Result<()> {
    sqlx::query(
        "UPDATE enrichment_requests SET
             fetched_position = greatest(fetched_position, $2), fetched_at = now(), attempts = 0,
             last_error = NULL, next_attempt_at = now() + $3
         WHERE account_id = $1",
    )
    .bind(request.account_id)
    .bind(request.requested_position)
    .bind(window)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records a failed attempt; the fetch is retried after `retry_in`.
pub async fn failed(
    conn: &mut PgConnection,
    request: &Request,
    error: &str,
    retry_in: Duration,
) -> Result<()> {
    sqlx::query(
        "UPDATE enrichment_requests SET attempts = attempts + 1, last_error = $2,
             next_attempt_at = now() + $3
         WHERE account_id = $1",
    )
    .bind(request.account_id)
    .bind(error)
    .bind(retry_in)
    .execute(conn)
    .await?;
    Ok(())
}

/// Fetches pending (asked for, not yet answered).
pub async fn pending(conn: &mut PgConnection) -> Result<i64> {
    Ok(backlog(conn).await?.0)
}

/// Fetches pending, and when the next of them falls due (`None` if none is pending), in one query.
pub async fn backlog(conn: &mut PgConnection) -> Result<(i64, Option<DateTime<Utc>>)> {
    Ok(sqlx::query_as(
        "SELECT count(*), min(next_attempt_at) FROM enrichment_requests
         WHERE requested_position > fetched_position",
    )
    .fetch_one(conn)
    .await?)
}

/// Drops the pending fetches of accounts Argyle removed: their data is gone, a fetch would 404.
pub async fn cancel(conn: &mut PgConnection, accounts: &[Uuid]) -> Result<()> {
    if accounts.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE enrichment_requests SET fetched_position = requested_position, attempts = 0,
             last_error = NULL
         WHERE account_id = ANY($1) AND requested_position > fetched_position",
    )
    .bind(accounts)
    .execute(conn)
    .await?;
    Ok(())
}
