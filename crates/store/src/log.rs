//! The append-only event log (`events`, `redeliveries`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::{Envelope, EnvelopeError, LoggedEvent};
use sha2::{Digest, Sha256};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::Result;

/// Transaction-level advisory lock every append takes first; see the crate docs for why it makes
/// the log gap-safe.
pub const APPEND_LOCK: i64 = 0x4150_4c4f_4721; // "APLOG!"

/// A delivery about to be appended: the raw body, its signature header, and the parsed envelope.
#[derive(Debug, Clone, Copy)]
pub struct NewDelivery<'a> {
    pub body: &'a [u8],
    pub signature: Option<&'a str>,
    pub envelope: &'a Envelope,
}

/// Where a delivery landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The event's position: new, or the original's for a redelivery.
    pub position: i64,
    /// The body was identical to an event received within the dedup window.
    pub duplicate: bool,
}

/// Appends one delivery in its own transaction and commits it: when this returns `Ok`, the delivery
/// is durable.
pub async fn append(
    pool: &PgPool,
    delivery: NewDelivery<'_>,
    dedup_window: Duration,
) -> Result<Appended> {
    let mut tx = pool.begin().await?;
    let appended = append_in(&mut tx, delivery, dedup_window).await?;
    tx.commit().await?;
    Ok(appended)
}

/// Appends one delivery inside the caller's transaction; durable only once the caller commits.
///
/// Takes [`APPEND_LOCK`] until the transaction ends. A body identical (sha256) to an event received
/// less than `dedup_window` ago is recorded as another delivery of that event, not as a new one.
#[tracing::instrument(skip_all, fields(event = %delivery.envelope.event))]
pub async fn append_in(
    conn: &mut PgConnection,
    delivery: NewDelivery<'_>,
    dedup_window: Duration,
) -> Result<Appended> {
    let sha256 = Sha256::digest(delivery.body).to_vec();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(APPEND_LOCK)
        .execute(&mut *conn)
        .await?;
    let original: Option<i64> = sqlx::query_scalar(
        "SELECT position FROM events
         WHERE body_sha256 = $1 AND received_at > clock_timestamp() - make_interval(secs => $2)
         ORDER BY position DESC LIMIT 1",
    )
    .bind(&sha256)
    .bind(dedup_window.as_secs_f64())
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(position) = original {
        sqlx::query("INSERT INTO redeliveries (position, received_at, signature) VALUES ($1, clock_timestamp(), $2)")
            .bind(position)
            .bind(delivery.signature)
            .execute(&mut *conn)
            .await?;
        return Ok(Appended {
            position,
            duplicate: true,
        });
    }
    // Under the lock, head + 1 is free and every lower position is already visible. received_at
    // never goes back along the log, so "received at or before T" is always a prefix of it.
    let position: i64 = sqlx::query_scalar(
        "WITH head AS (SELECT position, received_at FROM events ORDER BY position DESC LIMIT 1)
         INSERT INTO events (position, received_at, event, account_id, user_id, body, body_sha256, payload, signature)
         SELECT coalesce((SELECT position FROM head), 0) + 1,
                greatest(clock_timestamp(), (SELECT received_at FROM head)),
                $1, $2, $3, $4, $5, $6, $7
         RETURNING position",
    )
    .bind(&delivery.envelope.event)
    .bind(delivery.envelope.account)
    .bind(delivery.envelope.user)
    .bind(delivery.body)
    .bind(&sha256)
    .bind(Json(&delivery.envelope.payload))
    .bind(delivery.signature)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Appended {
        position,
        duplicate: false,
    })
}

/// One event as stored, with the raw body the fold parses.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StoredEvent {
    pub position: i64,
    pub received_at: DateTime<Utc>,
    pub event: String,
    pub account_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    pub body: Vec<u8>,
}

impl StoredEvent {
    /// Parses the stored body into the fold's input.
    pub fn to_logged(&self) -> Result<LoggedEvent, EnvelopeError> {
        Ok(LoggedEvent {
            position: self.position,
            received_at: self.received_at,
            envelope: Envelope::parse(&self.body)?,
        })
    }
}

/// Up to `limit` events with `position > after`, in log order.
#[tracing::instrument(skip(conn))]
pub async fn read_after(
    conn: &mut PgConnection,
    after: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>> {
    Ok(sqlx::query_as(
        "SELECT position, received_at, event, account_id, user_id, body
         FROM events WHERE position > $1 ORDER BY position LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// Every event of one account, in log order.
#[tracing::instrument(skip(conn))]
pub async fn read_account(conn: &mut PgConnection, account_id: Uuid) -> Result<Vec<StoredEvent>> {
    Ok(sqlx::query_as(
        "SELECT position, received_at, event, account_id, user_id, body
         FROM events WHERE account_id = $1 ORDER BY position",
    )
    .bind(account_id)
    .fetch_all(conn)
    .await?)
}

/// The highest position in the log (0 when empty).
pub async fn head(conn: &mut PgConnection) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT coalesce(max(position), 0)::bigint FROM events")
            .fetch_one(conn)
            .await?,
    )
}

/// Counts of what the log holds: distinct events and all deliveries (events plus redeliveries).
pub async fn counts(conn: &mut PgConnection) -> Result<LogCounts> {
    let (events, redeliveries): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM redeliveries)")
            .fetch_one(conn)
            .await?;
    Ok(LogCounts {
        events,
        deliveries: events + redeliveries,
    })
}

/// See [`counts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogCounts {
    pub events: i64,
    pub deliveries: i64,
}

/// Wakes a waiter whenever an append commits (LISTEN `events_appended`, sent by a trigger).
pub struct AppendNotifications(sqlx::postgres::PgListener);

impl AppendNotifications {
    /// Opens a listening connection from the pool's settings.
    pub async fn subscribe(pool: &PgPool) -> Result<Self> {
        let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
        listener.listen("events_appended").await?;
        Ok(Self(listener))
    }

    /// Waits for the next notification. Errors mean the connection was lost.
    pub async fn wait(&mut self) -> Result<()> {
        self.0.recv().await?;
        Ok(())
    }
}
