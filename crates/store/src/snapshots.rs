//! Account snapshots: the live table the API serves and the rebuild's shadow.

use chrono::{DateTime, Utc};
use domain::{AccountSnapshot, AccountStatus, Resource};
use futures_util::stream::{BoxStream, StreamExt};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Result;

/// Where snapshots are read and written: the live table the API serves, or the rebuild's shadow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Live,
    Rebuild,
}

impl Table {
    fn name(self) -> &'static str {
        match self {
            Self::Live => "account_snapshots",
            Self::Rebuild => "account_snapshots_rebuild",
        }
    }
}

#[derive(sqlx::FromRow)]
struct SnapshotRow {
    account_id: Uuid,
    user_id: Uuid,
    status: String,
    connection_status: Option<String>,
    resource: Option<String>,
    version: i64,
    last_position: i64,
    last_event: String,
    first_seen_at: DateTime<Utc>,
    last_event_at: DateTime<Utc>,
    removed_at: Option<DateTime<Utc>>,
}

impl From<SnapshotRow> for AccountSnapshot {
    fn from(row: SnapshotRow) -> Self {
        AccountSnapshot {
            account_id: row.account_id,
            user_id: row.user_id,
            // The CHECK constraint admits only the two values AccountStatus knows.
            status: AccountStatus::parse(&row.status).unwrap_or(AccountStatus::Active),
            connection_status: row.connection_status,
            // The column is `json`, which holds only valid JSON.
            resource: row.resource.as_deref().and_then(Resource::from_json),
            version: row.version,
            last_position: row.last_position,
            last_event: row.last_event,
            first_seen_at: row.first_seen_at,
            last_event_at: row.last_event_at,
            removed_at: row.removed_at,
        }
    }
}

const SNAPSHOT_COLUMNS: &str = "account_id, user_id, status, connection_status, resource::text AS resource, version, \
     last_position, last_event, first_seen_at, last_event_at, removed_at";

/// The live snapshots of the given accounts, for the query API (missing ones are simply absent).
///
/// A prepared statement, like every other query of the API: the query API runs it for each group
/// of concurrent lookups, so planning it every time would cost more than the lookup itself. (The
/// projector's [`get_many`] plans every time for the reason given there; a plan cached here is
/// replanned whenever the table's statistics change, as after each autovacuum ANALYZE, and dies
/// with its connection, which the pool retires after its maximum lifetime: see [`crate::kept`].)
#[tracing::instrument(skip_all, fields(accounts = account_ids.len()))]
pub async fn current(
    conn: &mut PgConnection,
    account_ids: &[Uuid],
) -> Result<Vec<AccountSnapshot>> {
    let rows: Vec<SnapshotRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {SNAPSHOT_COLUMNS} FROM account_snapshots WHERE account_id = ANY($1)"
    )))
    .bind(account_ids)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

/// The snapshots of several accounts (missing ones are simply absent).
#[tracing::instrument(skip_all, fields(accounts = account_ids.len()))]
pub async fn get_many(
    conn: &mut PgConnection,
    table: Table,
    account_ids: &[Uuid],
) -> Result<Vec<AccountSnapshot>> {
    // Planned at every call, never from a cached generic plan: a plan cached while the table was
    // one page (a seq scan) would otherwise stay for good where autovacuum never analyzes it,
    // scanning the whole table every projector batch as it grows.
    let rows: Vec<SnapshotRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {SNAPSHOT_COLUMNS} FROM {} WHERE account_id = ANY($1)",
        table.name()
    )))
    .bind(account_ids)
    .persistent(false)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

/// One page of the compacted change feed: up to `limit` snapshots whose `last_position` is after
/// `after` and at or before the projection's checkpoint, in `last_position` order, read with the
/// checkpoint in one consistent read. Returns them and that checkpoint.
///
/// The projector writes a batch's snapshots and moves the checkpoint in one transaction, and a
/// later batch only folds later positions: so a change committed after this read has a
/// `last_position` above the checkpoint read here, and a follower resuming from a cursor this
/// page gives never misses it.
pub async fn changed_after(
    conn: &mut PgConnection,
    after: i64,
    limit: i64,
) -> Result<(Vec<AccountSnapshot>, i64)> {
    let mut tx = crate::begin_consistent_read(conn).await?;
    let checkpoint = crate::checkpoints::get(&mut tx, crate::checkpoints::PROJECTION).await?;
    let rows: Vec<SnapshotRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {SNAPSHOT_COLUMNS} FROM account_snapshots
         WHERE last_position > $1 AND last_position <= $2 ORDER BY last_position LIMIT $3"
    )))
    .bind(after)
    .bind(checkpoint)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    crate::commit(tx).await?;
    Ok((rows.into_iter().map(Into::into).collect(), checkpoint))
}

/// Every snapshot of one user, oldest account first.
#[tracing::instrument(skip(conn))]
pub async fn of_user(conn: &mut PgConnection, user_id: Uuid) -> Result<Vec<AccountSnapshot>> {
    let rows: Vec<SnapshotRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {SNAPSHOT_COLUMNS} FROM account_snapshots WHERE user_id = $1 ORDER BY first_seen_at, account_id"
    )))
    .bind(user_id)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

/// Every live snapshot, in account order.
pub async fn all(conn: &mut PgConnection) -> Result<Vec<AccountSnapshot>> {
    let rows: Vec<SnapshotRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {SNAPSHOT_COLUMNS} FROM account_snapshots ORDER BY account_id"
    )))
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

/// Every live snapshot (or only `account`'s), streamed in account order.
pub fn stream_live(
    conn: &mut PgConnection,
    account: Option<Uuid>,
) -> BoxStream<'_, Result<AccountSnapshot>> {
    let sql = match account {
        Some(_) => {
            format!("SELECT {SNAPSHOT_COLUMNS} FROM account_snapshots WHERE account_id = $1")
        }
        None => format!("SELECT {SNAPSHOT_COLUMNS} FROM account_snapshots ORDER BY account_id"),
    };
    let mut query = sqlx::query_as::<_, SnapshotRow>(sqlx::AssertSqlSafe(sql));
    if let Some(account) = account {
        query = query.bind(account);
    }
    query
        .fetch(conn)
        .map(|row| row.map(Into::into).map_err(Into::into))
        .boxed()
}

/// Removes every row of `table`.
pub async fn clear(conn: &mut PgConnection, table: Table) -> Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {}", table.name())))
        .execute(conn)
        .await?;
    Ok(())
}

/// Removes one account's live snapshot.
pub async fn delete(conn: &mut PgConnection, account_id: Uuid) -> Result<()> {
    delete_from(conn, Table::Live, account_id).await
}

/// Removes one account's snapshot from `table`.
pub async fn delete_from(conn: &mut PgConnection, table: Table, account_id: Uuid) -> Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM {} WHERE account_id = $1",
        table.name()
    )))
    .bind(account_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Replaces every live snapshot with the rebuild's, inside the caller's transaction: readers see
/// the old set until it commits, then the new one.
pub async fn replace_live_with_rebuild(conn: &mut PgConnection) -> Result<u64> {
    sqlx::query("DELETE FROM account_snapshots")
        .execute(&mut *conn)
        .await?;
    let copied =
        sqlx::query("INSERT INTO account_snapshots SELECT * FROM account_snapshots_rebuild")
            .execute(&mut *conn)
            .await?
            .rows_affected();
    sqlx::query("DELETE FROM account_snapshots_rebuild")
        .execute(&mut *conn)
        .await?;
    Ok(copied)
}

/// Inserts or replaces snapshots, all in one statement.
#[tracing::instrument(skip_all, fields(snapshots = snapshots.len()))]
pub async fn save(
    conn: &mut PgConnection,
    table: Table,
    snapshots: &[AccountSnapshot],
) -> Result<()> {
    if snapshots.is_empty() {
        return Ok(());
    }
    // The store's own columns, one array each: the row format is this function's, not the API's.
    // The resource goes as its exact JSON text to a `json` column, which keeps it byte for byte.
    let account_ids: Vec<Uuid> = snapshots.iter().map(|s| s.account_id).collect();
    let user_ids: Vec<Uuid> = snapshots.iter().map(|s| s.user_id).collect();
    let statuses: Vec<&str> = snapshots.iter().map(|s| s.status.as_str()).collect();
    let connection_statuses: Vec<Option<&str>> = snapshots
        .iter()
        .map(|s| s.connection_status.as_deref())
        .collect();
    let resources: Vec<Option<&str>> = snapshots
        .iter()
        .map(|s| s.resource.as_ref().map(Resource::raw))
        .collect();
    let resource_updated_ats: Vec<Option<DateTime<Utc>>> = snapshots
        .iter()
        .map(AccountSnapshot::resource_updated_at)
        .collect();
    let versions: Vec<i64> = snapshots.iter().map(|s| s.version).collect();
    let last_positions: Vec<i64> = snapshots.iter().map(|s| s.last_position).collect();
    let last_events: Vec<&str> = snapshots.iter().map(|s| s.last_event.as_str()).collect();
    let first_seen_ats: Vec<DateTime<Utc>> = snapshots.iter().map(|s| s.first_seen_at).collect();
    let last_event_ats: Vec<DateTime<Utc>> = snapshots.iter().map(|s| s.last_event_at).collect();
    let removed_ats: Vec<Option<DateTime<Utc>>> = snapshots.iter().map(|s| s.removed_at).collect();
    let sql = format!(
        "INSERT INTO {} (account_id, user_id, status, connection_status, resource,
             resource_updated_at, version, last_position, last_event, first_seen_at, last_event_at, removed_at)
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[]::json[],
             $6::timestamptz[], $7::bigint[], $8::bigint[], $9::text[], $10::timestamptz[],
             $11::timestamptz[], $12::timestamptz[])
         ON CONFLICT (account_id) DO UPDATE SET
             user_id = excluded.user_id, status = excluded.status,
             connection_status = excluded.connection_status, resource = excluded.resource,
             resource_updated_at = excluded.resource_updated_at, version = excluded.version,
             last_position = excluded.last_position, last_event = excluded.last_event,
             first_seen_at = excluded.first_seen_at, last_event_at = excluded.last_event_at,
             removed_at = excluded.removed_at",
        table.name()
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(account_ids)
        .bind(user_ids)
        .bind(statuses)
        .bind(connection_statuses)
        .bind(resources)
        .bind(resource_updated_ats)
        .bind(versions)
        .bind(last_positions)
        .bind(last_events)
        .bind(first_seen_ats)
        .bind(last_event_ats)
        .bind(removed_ats)
        .execute(conn)
        .await?;
    Ok(())
}

/// How many live snapshots there are.
pub async fn count(conn: &mut PgConnection) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM account_snapshots")
        .fetch_one(conn)
        .await?)
}
