//! How far each reader of the log has got: one row per name in `projector_checkpoints`, moved
//! only forward and only with compare-and-set, in the transaction that did the work.

use sqlx::PgConnection;

use crate::{Error, Result};

/// The account-snapshot projection's checkpoint.
pub const PROJECTION: &str = "account_snapshots";

/// How far the enricher has scanned the log for resource-less events.
pub const ENRICHER: &str = "enricher";

/// The checkpoint of a projection, locked until the end of the caller's transaction.
pub async fn lock(conn: &mut PgConnection, name: &str) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT position FROM projector_checkpoints WHERE name = $1 FOR UPDATE")
            .bind(name)
            .fetch_one(conn)
            .await?,
    )
}

/// The checkpoint of a projection.
pub async fn get(conn: &mut PgConnection, name: &str) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT position FROM projector_checkpoints WHERE name = $1")
            .bind(name)
            .fetch_one(conn)
            .await?,
    )
}

/// Moves a checkpoint from `from` to `to`; fails with [`Error::Fenced`] if it was not at `from`.
pub async fn advance(conn: &mut PgConnection, name: &str, from: i64, to: i64) -> Result<()> {
    let moved = sqlx::query(
        "UPDATE projector_checkpoints SET position = $3 WHERE name = $1 AND position = $2",
    )
    .bind(name)
    .bind(from)
    .bind(to)
    .execute(conn)
    .await?
    .rows_affected();
    if moved == 1 {
        Ok(())
    } else {
        Err(Error::Fenced {
            name: name.to_owned(),
            expected: from,
        })
    }
}

/// Tells when a projection's checkpoint advances (LISTEN `checkpoint_advanced`, sent by a trigger
/// when the batch commits).
pub struct CheckpointNotifications(sqlx::postgres::PgListener);

impl CheckpointNotifications {
    pub async fn subscribe(pool: &sqlx::PgPool) -> Result<Self> {
        let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
        listener.listen("checkpoint_advanced").await?;
        Ok(Self(listener))
    }

    /// Waits for the next advance; returns the projection's name and its new checkpoint.
    pub async fn next(&mut self) -> Result<(String, i64)> {
        loop {
            let notification = self.0.recv().await?;
            if let Some((name, position)) = notification.payload().rsplit_once(' ')
                && let Ok(position) = position.parse()
            {
                return Ok((name.to_owned(), position));
            }
        }
    }
}
