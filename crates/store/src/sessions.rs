//! Sessions of the web pages (`/ui/`): a sign-in exchanges an API token for a session whose id
//! only the browser holds (in an `HttpOnly` cookie). Only sha256 digests are stored: of the id (a
//! dump of the table opens no session) and of the token it was opened with (so a token taken out
//! of `API_TOKENS` ends its sessions, which the caller checks).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgConnection;

use crate::Result;

/// A live session, as [`find`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The sha256 of the token the session was opened with.
    pub token_sha256: [u8; 32],
    pub expires_at: DateTime<Utc>,
}

fn digest(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// Opens a session for `id` (a random secret the caller made) that lasts `ttl`, and forgets
/// sessions that have expired. Returns when it expires.
pub async fn open(
    conn: &mut PgConnection,
    id: &[u8],
    token: &[u8],
    ttl: Duration,
) -> Result<DateTime<Utc>> {
    sqlx::query("DELETE FROM ui_sessions WHERE expires_at <= now()")
        .execute(&mut *conn)
        .await?;
    let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::days(1));
    Ok(sqlx::query_scalar(
        "INSERT INTO ui_sessions (id_sha256, token_sha256, expires_at)
         VALUES ($1, $2, now() + make_interval(secs => $3)) RETURNING expires_at",
    )
    .bind(digest(id).as_slice())
    .bind(digest(token).as_slice())
    .bind(ttl.num_milliseconds() as f64 / 1000.0)
    .fetch_one(conn)
    .await?)
}

/// The session `id` opens, unless it is unknown, closed or expired.
pub async fn find(conn: &mut PgConnection, id: &[u8]) -> Result<Option<Session>> {
    let row: Option<(Vec<u8>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT token_sha256, expires_at FROM ui_sessions
          WHERE id_sha256 = $1 AND expires_at > now()",
    )
    .bind(digest(id).as_slice())
    .fetch_optional(conn)
    .await?;
    Ok(row.and_then(|(token, expires_at)| {
        Some(Session {
            token_sha256: token.try_into().ok()?,
            expires_at,
        })
    }))
}

/// Closes the session `id` (sign-out); closing an unknown one is a no-op.
pub async fn close(conn: &mut PgConnection, id: &[u8]) -> Result<()> {
    sqlx::query("DELETE FROM ui_sessions WHERE id_sha256 = $1")
        .bind(digest(id).as_slice())
        .execute(conn)
        .await?;
    Ok(())
}

/// The digest [`Session::token_sha256`] holds for `token`.
pub fn token_digest(token: &[u8]) -> [u8; 32] {
    digest(token)
}
