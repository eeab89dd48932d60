//! The notifier's durable state (`subscribers`, `subscriber_messages`; see
//! `migrations/V15__notifier.sql`): who receives outbound webhooks, and per subscriber the latest
//! undelivered view of each account.

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::keys::{KEY_COLUMNS, Opened, RowKey, Sealer, Vault};
use crate::{PgConnection, Result};

/// A subscriber as `subscribers list` shows it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Subscriber {
    pub id: Uuid,
    pub url: String,
    pub secret: String,
    pub created_at: DateTime<Utc>,
    pub scanned_to: i64,
    /// `active` or `failing`.
    pub state: String,
    pub failing_since: Option<DateTime<Utc>>,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// Messages not yet delivered.
    pub pending: i64,
    /// Every change up to here is delivered: the oldest pending message's position, less one, or
    /// `scanned_to` when none is pending. Moves only after a 2xx.
    pub delivered_to: i64,
}

const COLUMNS: &str = "s.id, s.url, s.secret, s.created_at, s.scanned_to, s.state, s.failing_since, \
     s.last_success_at, s.last_error, \
     (SELECT count(*) FROM subscriber_messages m WHERE m.subscriber_id = s.id) AS pending, \
     coalesce((SELECT min(m.last_position) - 1 FROM subscriber_messages m WHERE m.subscriber_id = s.id), \
              s.scanned_to) AS delivered_to";

/// Registers a subscriber that starts at `from` (0: every account's current view).
pub async fn add(
    conn: &mut PgConnection,
    id: Uuid,
    url: &str,
    secret: &str,
    from: i64,
) -> Result<()> {
    sqlx::query("INSERT INTO subscribers (id, url, secret, scanned_to) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(url)
        .bind(secret)
        .bind(from)
        .execute(conn)
        .await?;
    Ok(())
}

/// Every subscriber, oldest first.
pub async fn list(conn: &mut PgConnection) -> Result<Vec<Subscriber>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM subscribers s ORDER BY s.created_at, s.id"
    )))
    .fetch_all(conn)
    .await?)
}

/// Removes a subscriber and its messages; false if there was none.
pub async fn remove(conn: &mut PgConnection, id: Uuid) -> Result<bool> {
    let done = sqlx::query("DELETE FROM subscribers WHERE id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Delivers again every change after `from`: the feed is read anew from there (messages already
/// pending stay, replaced by newer views as usual). False if there is no such subscriber.
pub async fn replay(conn: &mut PgConnection, id: Uuid, from: i64) -> Result<bool> {
    let done = sqlx::query("UPDATE subscribers SET scanned_to = $2 WHERE id = $1")
        .bind(id)
        .bind(from)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Records the views of one feed page as messages (a newer view replaces an undelivered older
/// one, with a new id) and moves the subscriber's `scanned_to` from `from` to `to`, in one
/// transaction. False if `scanned_to` was no longer `from` (a replay came in between): nothing
/// is recorded.
///
/// Each body is sealed with its account's key; that of an erased account holds only the erased
/// view (no personal data) and is kept as it is, so it can still be delivered.
pub async fn enqueue(
    conn: &mut PgConnection,
    vault: &Vault,
    subscriber: Uuid,
    from: i64,
    to: i64,
    messages: &[(Uuid, Uuid, i64, String)],
) -> Result<bool> {
    let mut tx = crate::begin(conn).await?;
    let moved =
        sqlx::query("UPDATE subscribers SET scanned_to = $3 WHERE id = $1 AND scanned_to = $2")
            .bind(subscriber)
            .bind(from)
            .bind(to)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    if moved != 1 {
        crate::rollback(tx).await?;
        return Ok(false);
    }
    if !messages.is_empty() {
        let accounts: Vec<Uuid> = messages.iter().map(|m| m.0).collect();
        let ids: Vec<Uuid> = messages.iter().map(|m| m.1).collect();
        let positions: Vec<i64> = messages.iter().map(|m| m.2).collect();
        let sealers = vault.sealers(&mut tx, &accounts).await?;
        let bodies: Vec<Vec<u8>> = messages
            .iter()
            .map(|(account, id, _, body)| match &sealers[account] {
                Sealer::Erased => body.as_bytes().to_vec(),
                sealer => sealer.seal(
                    sealing::Aad::Message {
                        account: *account,
                        message: *id,
                    },
                    body.as_bytes(),
                ),
            })
            .collect();
        sqlx::query(
            "INSERT INTO subscriber_messages (subscriber_id, account_id, message_id, last_position, body)
             SELECT $1, * FROM unnest($2::uuid[], $3::uuid[], $4::bigint[], $5::bytea[])
             ON CONFLICT (subscriber_id, account_id) DO UPDATE SET
                 message_id = excluded.message_id, last_position = excluded.last_position,
                 body = excluded.body, created_at = now(), attempts = 0, next_attempt_at = now(),
                 last_error = NULL
             WHERE subscriber_messages.last_position < excluded.last_position",
        )
        .bind(subscriber)
        .bind(&accounts)
        .bind(&ids)
        .bind(&positions)
        .bind(&bodies)
        .execute(&mut *tx)
        .await?;
    }
    crate::commit(tx).await?;
    Ok(true)
}

/// A message due for delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub subscriber_id: Uuid,
    pub account_id: Uuid,
    pub message_id: Uuid,
    pub last_position: i64,
    /// The view to deliver; `None` when it can no longer be read (its account was erased since:
    /// the erased view follows as a message of its own) and the message is to be dropped.
    pub body: Option<String>,
    pub attempts: i32,
    pub url: String,
    pub secret: String,
}

#[derive(sqlx::FromRow)]
struct MessageRow {
    subscriber_id: Uuid,
    account_id: Uuid,
    message_id: Uuid,
    last_position: i64,
    body: Vec<u8>,
    attempts: i32,
    url: String,
    secret: String,
    #[sqlx(flatten)]
    key: RowKey,
}

/// Up to `limit` messages due now, oldest due first.
pub async fn due(conn: &mut PgConnection, vault: &Vault, limit: i64) -> Result<Vec<Message>> {
    let rows: Vec<MessageRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT m.subscriber_id, m.account_id, m.message_id, m.last_position, m.body, m.attempts,
                s.url, s.secret, {KEY_COLUMNS}
         FROM subscriber_messages m JOIN subscribers s ON s.id = m.subscriber_id
         LEFT JOIN account_keys k ON k.account_id = m.account_id
         WHERE m.next_attempt_at <= now() ORDER BY m.next_attempt_at LIMIT $1"
    )))
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|row| {
            let body = match vault.open(
                row.account_id,
                &row.key,
                sealing::Aad::Message {
                    account: row.account_id,
                    message: row.message_id,
                },
                row.body,
                None,
            )? {
                Opened::Plain(body) => String::from_utf8(body).ok(),
                Opened::Erased => None,
                Opened::Unreadable(reason) => {
                    tracing::error!(account = %row.account_id, message = %row.message_id, %reason,
                        "an outbound message cannot be read; it is dropped");
                    None
                }
            };
            Ok(Message {
                subscriber_id: row.subscriber_id,
                account_id: row.account_id,
                message_id: row.message_id,
                last_position: row.last_position,
                body,
                attempts: row.attempts,
                url: row.url,
                secret: row.secret,
            })
        })
        .collect()
}

/// When the next message falls due, if any is pending.
pub async fn next_due(conn: &mut PgConnection) -> Result<Option<DateTime<Utc>>> {
    Ok(
        sqlx::query_scalar("SELECT min(next_attempt_at) FROM subscriber_messages")
            .fetch_one(conn)
            .await?,
    )
}

/// Drops `message` (unless a newer view replaced it meanwhile): one that can no longer be read
/// (its account was erased since), or one delivered.
pub async fn drop_unreadable(conn: &mut PgConnection, message: &Message) -> Result<()> {
    sqlx::query(
        "DELETE FROM subscriber_messages
         WHERE subscriber_id = $1 AND account_id = $2 AND message_id = $3",
    )
    .bind(message.subscriber_id)
    .bind(message.account_id)
    .bind(message.message_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// A 2xx: the message is done (unless a newer view replaced it meanwhile, which stays pending),
/// and the subscriber is active.
pub async fn delivered(conn: &mut PgConnection, message: &Message) -> Result<()> {
    let mut tx = crate::begin(conn).await?;
    drop_unreadable(&mut tx, message).await?;
    sqlx::query(
        "UPDATE subscribers SET state = 'active', failing_since = NULL, last_success_at = now(),
             last_error = NULL
         WHERE id = $1",
    )
    .bind(message.subscriber_id)
    .execute(&mut *tx)
    .await?;
    crate::commit(tx).await
}

/// A failed attempt: retried after `retry_in`; with `exhausted` (the schedule is used up) the
/// subscriber is marked failing.
pub async fn failed(
    conn: &mut PgConnection,
    message: &Message,
    error: &str,
    retry_in: Duration,
    exhausted: bool,
) -> Result<()> {
    let mut tx = crate::begin(conn).await?;
    sqlx::query(
        "UPDATE subscriber_messages SET attempts = attempts + 1, last_error = $4,
             next_attempt_at = now() + $5
         WHERE subscriber_id = $1 AND account_id = $2 AND message_id = $3",
    )
    .bind(message.subscriber_id)
    .bind(message.account_id)
    .bind(message.message_id)
    .bind(error)
    .bind(retry_in)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE subscribers SET last_error = $2,
             state = CASE WHEN $3 THEN 'failing' ELSE state END,
             failing_since = CASE WHEN $3 THEN coalesce(failing_since, now()) ELSE failing_since END
         WHERE id = $1",
    )
    .bind(message.subscriber_id)
    .bind(error)
    .bind(exhausted)
    .execute(&mut *tx)
    .await?;
    crate::commit(tx).await
}
