//! Events the fold refused: they stay in the log; `quarantine` records why they were not folded.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Result;

/// An event the fold refused, about to be recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub position: i64,
    pub account_id: Option<Uuid>,
    pub event: String,
    pub error: String,
}

/// A recorded refusal.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Quarantined {
    pub position: i64,
    pub account_id: Option<Uuid>,
    pub event: String,
    pub error: String,
    pub quarantined_at: DateTime<Utc>,
}

/// Records refusals; one already recorded (a rebuild meets the same event again) is kept as it was.
pub async fn record(conn: &mut PgConnection, refusals: &[Refusal]) -> Result<()> {
    if refusals.is_empty() {
        return Ok(());
    }
    let positions: Vec<i64> = refusals.iter().map(|r| r.position).collect();
    let accounts: Vec<Option<Uuid>> = refusals.iter().map(|r| r.account_id).collect();
    let events: Vec<&str> = refusals.iter().map(|r| r.event.as_str()).collect();
    let errors: Vec<&str> = refusals.iter().map(|r| r.error.as_str()).collect();
    sqlx::query(
        "INSERT INTO quarantine (position, account_id, event, error)
         SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::text[])
         ON CONFLICT (position) DO NOTHING",
    )
    .bind(positions)
    .bind(accounts)
    .bind(events)
    .bind(errors)
    .execute(conn)
    .await?;
    Ok(())
}

/// Up to `limit` quarantined events after position `after`, in log order.
pub async fn page(conn: &mut PgConnection, after: i64, limit: i64) -> Result<Vec<Quarantined>> {
    Ok(sqlx::query_as(
        "SELECT position, account_id, event, error, quarantined_at FROM quarantine
         WHERE position > $1 ORDER BY position LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// How many events are quarantined.
pub async fn count(conn: &mut PgConnection) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM quarantine")
        .fetch_one(conn)
        .await?)
}
