//! Erasure (crypto-shredding) and sealing a log written before encryption at rest.
//!
//! [`erase`] destroys an account's key through `erase_account()` (V16), the only path that may,
//! which appends the erasure to the log in the same transaction. [`seal_log`] is the single
//! sanctioned change to the log's rows: plaintext bodies written before encryption at rest are
//! replaced by their sealed bytes, by the schema's owner, and recorded as a run.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::keys::{NO_ACCOUNT, Vault};
use crate::{Error, Result};

/// Blocks every append until the caller's transaction ends and waits for the appends in flight
/// (`hold_appends()`, V18), so that what the caller reads next of an account's events, under READ
/// COMMITTED, is all of them when it erases the account.
pub async fn hold_appends(tx: &mut PgConnection) -> Result<()> {
    sqlx::query("SELECT hold_appends()").execute(tx).await?;
    Ok(())
}

/// Where an erasure landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Erased {
    /// The erasure event's position.
    pub position: i64,
    /// The account was already erased: `position` is that erasure's.
    pub already: bool,
}

/// Appends the erasure event `body` (plaintext, no personal data) and destroys `account`'s key,
/// in the caller's transaction.
pub async fn erase(
    conn: &mut PgConnection,
    account: Uuid,
    user: Uuid,
    body: &[u8],
) -> Result<Erased> {
    let (position, already): (i64, bool) =
        sqlx::query_as("SELECT erasure_position, already_erased FROM erase_account($1, $2, $3)")
            .bind(account)
            .bind(user)
            .bind(body)
            .fetch_one(conn)
            .await?;
    Ok(Erased { position, already })
}

/// The accounts the log holds events of for `user`, in account order.
pub async fn accounts_of_user(conn: &mut PgConnection, user: Uuid) -> Result<Vec<Uuid>> {
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT account_id FROM events
          WHERE user_id = $1 AND account_id IS NOT NULL ORDER BY account_id",
    )
    .bind(user)
    .fetch_all(conn)
    .await?)
}

/// Up to `limit` accounts removed at or before `cutoff` and not erased: `(account, user, removed_at)`.
pub async fn removed_before(
    conn: &mut PgConnection,
    cutoff: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<(Uuid, Uuid, DateTime<Utc>)>> {
    Ok(sqlx::query_as(
        "SELECT s.account_id, s.user_id, s.removed_at FROM account_snapshots s
          WHERE s.status = 'removed' AND s.removed_at <= $1
            AND NOT EXISTS (SELECT 1 FROM account_keys k
                             WHERE k.account_id = s.account_id AND k.erased_at IS NOT NULL)
          ORDER BY s.removed_at, s.account_id LIMIT $2",
    )
    .bind(cutoff)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// How many removed accounts await erasure, and when the first falls due (`removed_at`).
pub async fn removed_pending(conn: &mut PgConnection) -> Result<(i64, Option<DateTime<Utc>>)> {
    Ok(sqlx::query_as(
        "SELECT count(*), min(s.removed_at) FROM account_snapshots s
          WHERE s.status = 'removed'
            AND NOT EXISTS (SELECT 1 FROM account_keys k
                             WHERE k.account_id = s.account_id AND k.erased_at IS NOT NULL)",
    )
    .fetch_one(conn)
    .await?)
}

/// Progress of [`seal_log`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sealed {
    /// Log bodies sealed by this run.
    pub events: u64,
    /// Snapshot resources, quarantine reasons and outbound messages sealed by this run.
    pub rows: u64,
    /// Plaintext log bodies left to seal when the run started.
    pub events_total: u64,
    /// The last position sealed.
    pub sealed_to: i64,
}

/// Seals, `batch` rows per transaction, every plaintext body of the log (but erasure events,
/// which hold no personal data) and every plaintext copy in the derived tables; each sealed body
/// is opened again and checked against its sha256 before it replaces the plaintext. Resumable:
/// sealed rows are skipped, so a stopped run is finished by the next. Recorded in
/// `log_seal_runs`. Needs the schema's owner. Afterwards runs a plain `VACUUM` of the tables, so
/// the replaced plaintext tuples are freed (see docs/erasure.md on what stays in WAL and backups).
pub async fn seal_log(
    conn: &mut PgConnection,
    vault: &Vault,
    batch: i64,
    mut progress: impl FnMut(Sealed),
) -> Result<Sealed> {
    if !vault.encrypts() {
        return Err(Error::Keys(
            "sealing the log needs DATA_KEYS (ALLOW_PLAINTEXT_LOG is set)".into(),
        ));
    }
    let run: i64 = sqlx::query_scalar("INSERT INTO log_seal_runs DEFAULT VALUES RETURNING id")
        .fetch_one(&mut *conn)
        .await?;
    let total: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events e
          WHERE substring(e.body FROM 1 FOR 1) IS DISTINCT FROM '\\xae'::bytea
            AND e.origin IS DISTINCT FROM 'erasure'",
    )
    .fetch_one(&mut *conn)
    .await?;
    let mut done = Sealed {
        events_total: total as u64,
        ..Sealed::default()
    };
    progress(done);
    let mut after = 0i64;
    loop {
        let mut tx = crate::begin(conn).await?;
        sqlx::query("SET LOCAL account_projector.sealing_log = 'on'")
            .execute(&mut *tx)
            .await?;
        let rows: Vec<PlainEvent> = sqlx::query_as(
            "SELECT e.position, e.account_id, e.body, e.body_sha256 FROM events e
              WHERE e.position > $1
                AND substring(e.body FROM 1 FOR 1) IS DISTINCT FROM '\\xae'::bytea
                AND e.origin IS DISTINCT FROM 'erasure'
              ORDER BY e.position LIMIT $2 FOR UPDATE",
        )
        .bind(after)
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last().map(|r| r.0) else {
            crate::rollback(tx).await?;
            break;
        };
        let subjects: Vec<Uuid> = rows.iter().map(|r| r.1.unwrap_or(NO_ACCOUNT)).collect();
        let sealers = vault.sealers(&mut tx, &subjects).await?;
        let mut positions = Vec::with_capacity(rows.len());
        let mut bodies = Vec::with_capacity(rows.len());
        for ((position, _, body, sha256), subject) in rows.iter().zip(&subjects) {
            if crate::keys::sha256(body) != *sha256 {
                return Err(Error::Keys(format!(
                    "the body at position {position} does not match its sha256; nothing after it was sealed"
                )));
            }
            let sealed = sealers[subject].seal(
                sealing::Aad::Event {
                    account: *subject,
                    sha256,
                },
                body,
            );
            positions.push(*position);
            bodies.push(sealed);
        }
        sqlx::query(
            "UPDATE events e SET body = n.body
               FROM unnest($1::bigint[], $2::bytea[]) AS n(position, body)
              WHERE e.position = n.position",
        )
        .bind(&positions)
        .bind(&bodies)
        .execute(&mut *tx)
        .await?;
        // Opened again as every reader will, before the transaction lets the plaintext go.
        let reread = crate::log::read_positions(&mut tx, vault, &positions).await?;
        if let Some(bad) = reread.iter().find(|(_, ok)| !ok) {
            return Err(Error::Keys(format!(
                "the sealed body at position {} does not open to its sha256; nothing was changed",
                bad.0
            )));
        }
        done.events += rows.len() as u64;
        done.sealed_to = last;
        sqlx::query("UPDATE log_seal_runs SET sealed_to = $2, events_sealed = $3 WHERE id = $1")
            .bind(run)
            .bind(last)
            .bind(done.events as i64)
            .execute(&mut *tx)
            .await?;
        crate::commit(tx).await?;
        after = last;
        progress(done);
    }
    done.rows += seal_derived(conn, vault, batch).await?;
    sqlx::query(
        "UPDATE log_seal_runs SET finished_at = now(), rows_sealed = $2, sealed_to = $3 WHERE id = $1",
    )
    .bind(run)
    .bind(done.rows as i64)
    .bind(done.sealed_to)
    .execute(&mut *conn)
    .await?;
    progress(done);
    sqlx::query("VACUUM events, account_snapshots, account_snapshots_rebuild, quarantine, subscriber_messages")
        .execute(&mut *conn)
        .await?;
    Ok(done)
}

/// A plaintext body: position, account, body, sha256.
type PlainEvent = (i64, Option<Uuid>, Vec<u8>, Vec<u8>);

/// Seals the plaintext copies left in the derived tables by a version before encryption at rest.
async fn seal_derived(conn: &mut PgConnection, vault: &Vault, batch: i64) -> Result<u64> {
    let mut sealed = 0u64;
    for table in ["account_snapshots", "account_snapshots_rebuild"] {
        loop {
            let mut tx = crate::begin(conn).await?;
            let rows: Vec<(Uuid, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT account_id, resource FROM {table}
                  WHERE resource IS NOT NULL
                    AND substring(resource FROM 1 FOR 1) IS DISTINCT FROM '\\xae'::bytea
                  LIMIT $1 FOR UPDATE"
            )))
            .bind(batch)
            .fetch_all(&mut *tx)
            .await?;
            if rows.is_empty() {
                crate::rollback(tx).await?;
                break;
            }
            let accounts: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
            let sealers = vault.sealers(&mut tx, &accounts).await?;
            let values: Vec<Vec<u8>> = rows
                .iter()
                .map(|(account, plain)| {
                    sealers[account].seal(sealing::Aad::Snapshot { account: *account }, plain)
                })
                .collect();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE {table} s SET resource = n.resource
                   FROM unnest($1::uuid[], $2::bytea[]) AS n(account_id, resource)
                  WHERE s.account_id = n.account_id"
            )))
            .bind(&accounts)
            .bind(&values)
            .execute(&mut *tx)
            .await?;
            crate::commit(tx).await?;
            sealed += rows.len() as u64;
        }
    }
    loop {
        let mut tx = crate::begin(conn).await?;
        let rows: Vec<(i64, Option<Uuid>, Vec<u8>)> = sqlx::query_as(
            "SELECT position, account_id, error FROM quarantine
              WHERE substring(error FROM 1 FOR 1) IS DISTINCT FROM '\\xae'::bytea
              LIMIT $1 FOR UPDATE",
        )
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            crate::rollback(tx).await?;
            break;
        }
        let subjects: Vec<Uuid> = rows.iter().map(|r| r.1.unwrap_or(NO_ACCOUNT)).collect();
        let sealers = vault.sealers(&mut tx, &subjects).await?;
        let positions: Vec<i64> = rows.iter().map(|r| r.0).collect();
        let values: Vec<Vec<u8>> = rows
            .iter()
            .zip(&subjects)
            .map(|((position, _, plain), subject)| {
                sealers[subject].seal(
                    sealing::Aad::Quarantine {
                        account: *subject,
                        position: *position,
                    },
                    plain,
                )
            })
            .collect();
        sqlx::query(
            "UPDATE quarantine q SET error = n.error
               FROM unnest($1::bigint[], $2::bytea[]) AS n(position, error)
              WHERE q.position = n.position",
        )
        .bind(&positions)
        .bind(&values)
        .execute(&mut *tx)
        .await?;
        crate::commit(tx).await?;
        sealed += rows.len() as u64;
    }
    // Outbound messages of a version before this one are few and short-lived: sealed in one go.
    let mut tx = crate::begin(conn).await?;
    let rows: Vec<(Uuid, Uuid, Uuid, Vec<u8>)> = sqlx::query_as(
        "SELECT subscriber_id, account_id, message_id, body FROM subscriber_messages
          WHERE substring(body FROM 1 FOR 1) IS DISTINCT FROM '\\xae'::bytea FOR UPDATE",
    )
    .fetch_all(&mut *tx)
    .await?;
    let accounts: Vec<Uuid> = rows.iter().map(|r| r.1).collect();
    let sealers = vault.sealers(&mut tx, &accounts).await?;
    for (subscriber, account, message, plain) in &rows {
        let sealer = &sealers[account];
        if matches!(sealer, crate::keys::Sealer::Erased) {
            continue;
        }
        let sealed_body = sealer.seal(
            sealing::Aad::Message {
                account: *account,
                message: *message,
            },
            plain,
        );
        sqlx::query(
            "UPDATE subscriber_messages SET body = $4
              WHERE subscriber_id = $1 AND account_id = $2 AND message_id = $3",
        )
        .bind(subscriber)
        .bind(account)
        .bind(message)
        .bind(sealed_body)
        .execute(&mut *tx)
        .await?;
        sealed += 1;
    }
    crate::commit(tx).await?;
    Ok(sealed)
}
