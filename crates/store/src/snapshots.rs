//! Account snapshots: the live table the API serves and the rebuild's shadow.

use chrono::{DateTime, Utc};
use domain::{AccountSnapshot, AccountStatus, Resource};
use futures_util::stream::{BoxStream, StreamExt};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Result;
use crate::keys::{Opened, RowKey, Vault};

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
    resource: Option<Vec<u8>>,
    version: i64,
    last_position: i64,
    last_event: String,
    first_seen_at: DateTime<Utc>,
    last_event_at: DateTime<Utc>,
    removed_at: Option<DateTime<Utc>>,
    #[sqlx(flatten)]
    key: RowKey,
}

/// How a read shows an erased account whose snapshot the projector has not refolded yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Erased {
    /// As every answer about it must ([`AccountSnapshot::erased`]): the query API and the feed.
    Shown,
    /// As stored, with no resource (it cannot be opened): what the folds read and compare.
    AsStored,
}

impl SnapshotRow {
    fn open(self, vault: &Vault, erased: Erased) -> Result<AccountSnapshot> {
        let resource = match self.resource {
            None => None,
            Some(stored) => match vault.open(
                self.account_id,
                &self.key,
                sealing::Aad::Snapshot {
                    account: self.account_id,
                },
                stored,
                None,
            )? {
                // Written from a fold's resource, which is always valid JSON text.
                Opened::Plain(text) => String::from_utf8(text)
                    .ok()
                    .as_deref()
                    .and_then(Resource::from_json),
                Opened::Erased => None,
                Opened::Unreadable(reason) => {
                    tracing::error!(account = %self.account_id, %reason,
                        "a snapshot's resource cannot be read; it is served without one until refolded");
                    None
                }
            },
        };
        let snapshot = AccountSnapshot {
            account_id: self.account_id,
            user_id: self.user_id,
            // The CHECK constraint admits only the values AccountStatus knows.
            status: AccountStatus::parse(&self.status).unwrap_or(AccountStatus::Active),
            connection_status: self.connection_status,
            resource,
            version: self.version,
            last_position: self.last_position,
            last_event: self.last_event,
            first_seen_at: self.first_seen_at,
            last_event_at: self.last_event_at,
            removed_at: self.removed_at,
        };
        Ok(if erased == Erased::Shown && self.key.is_erased() {
            snapshot.erased()
        } else {
            snapshot
        })
    }
}

fn open_all(rows: Vec<SnapshotRow>, vault: &Vault, erased: Erased) -> Result<Vec<AccountSnapshot>> {
    rows.into_iter()
        .map(|row| row.open(vault, erased))
        .collect()
}

const SNAPSHOT_COLUMNS: &str = "s.account_id, s.user_id, s.status, s.connection_status, s.resource, s.version, \
     s.last_position, s.last_event, s.first_seen_at, s.last_event_at, s.removed_at, \
     k.kek_id, k.wrapped_key, (k.erased_at IS NOT NULL) AS erased";

/// `table s` with its account's key, one index probe per row (see `log`'s `KEYED`).
fn keyed(table: &str) -> String {
    format!(
        "{table} s LEFT JOIN LATERAL (
             SELECT k.kek_id, k.wrapped_key, k.erased_at FROM account_keys k
              WHERE k.account_id = s.account_id LIMIT 1) k ON true"
    )
}

/// `table s` with its account's key, joined as the planner likes: for reads of every snapshot.
fn keyed_all(table: &str) -> String {
    format!("{table} s LEFT JOIN account_keys k ON k.account_id = s.account_id")
}

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
    vault: &Vault,
    account_ids: &[Uuid],
) -> Result<Vec<AccountSnapshot>> {
    let rows: Vec<SnapshotRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {SNAPSHOT_COLUMNS} FROM {} WHERE s.account_id = ANY($1)",
        keyed("account_snapshots")
    )))
    .bind(account_ids)
    .fetch_all(conn)
    .await?;
    open_all(rows, vault, Erased::Shown)
}

/// The snapshots of several accounts (missing ones are simply absent).
#[tracing::instrument(skip_all, fields(accounts = account_ids.len()))]
pub async fn get_many(
    conn: &mut PgConnection,
    vault: &Vault,
    table: Table,
    account_ids: &[Uuid],
) -> Result<Vec<AccountSnapshot>> {
    // Planned at every call, never from a cached generic plan: a plan cached while the table was
    // one page (a seq scan) would otherwise stay for good where autovacuum never analyzes it,
    // scanning the whole table every projector batch as it grows.
    let rows: Vec<SnapshotRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {SNAPSHOT_COLUMNS} FROM {} WHERE s.account_id = ANY($1)",
        keyed(table.name())
    )))
    .bind(account_ids)
    .persistent(false)
    .fetch_all(conn)
    .await?;
    open_all(rows, vault, Erased::AsStored)
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
    vault: &Vault,
    after: i64,
    limit: i64,
) -> Result<(Vec<AccountSnapshot>, i64)> {
    let mut tx = crate::begin_consistent_read(conn).await?;
    let checkpoint = crate::checkpoints::get(&mut tx, crate::checkpoints::PROJECTION).await?;
    let rows: Vec<SnapshotRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {SNAPSHOT_COLUMNS} FROM {}
         WHERE s.last_position > $1 AND s.last_position <= $2 ORDER BY s.last_position LIMIT $3",
        keyed("account_snapshots")
    )))
    .bind(after)
    .bind(checkpoint)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    crate::commit(tx).await?;
    Ok((open_all(rows, vault, Erased::Shown)?, checkpoint))
}

/// Every snapshot of one user, oldest account first.
#[tracing::instrument(skip(conn))]
pub async fn of_user(
    conn: &mut PgConnection,
    vault: &Vault,
    user_id: Uuid,
) -> Result<Vec<AccountSnapshot>> {
    let rows: Vec<SnapshotRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {SNAPSHOT_COLUMNS} FROM {} WHERE s.user_id = $1 ORDER BY s.first_seen_at, s.account_id",
        keyed("account_snapshots")
    )))
    .bind(user_id)
    .fetch_all(conn)
    .await?;
    open_all(rows, vault, Erased::Shown)
}

/// Every live snapshot as stored, in account order.
pub async fn all(conn: &mut PgConnection, vault: &Vault) -> Result<Vec<AccountSnapshot>> {
    let rows: Vec<SnapshotRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {SNAPSHOT_COLUMNS} FROM {} ORDER BY s.account_id",
        keyed_all("account_snapshots")
    )))
    .fetch_all(conn)
    .await?;
    open_all(rows, vault, Erased::AsStored)
}

/// Every live snapshot (or only `account`'s) as stored, streamed in account order.
pub fn stream_live<'c>(
    conn: &'c mut PgConnection,
    vault: &'c Vault,
    account: Option<Uuid>,
) -> BoxStream<'c, Result<AccountSnapshot>> {
    let table = keyed_all("account_snapshots");
    let sql = match account {
        Some(_) => format!("SELECT {SNAPSHOT_COLUMNS} FROM {table} WHERE s.account_id = $1"),
        None => format!("SELECT {SNAPSHOT_COLUMNS} FROM {table} ORDER BY s.account_id"),
    };
    let mut query = sqlx::query_as::<_, SnapshotRow>(sqlx::AssertSqlSafe(sql));
    if let Some(account) = account {
        query = query.bind(account);
    }
    query
        .fetch(conn)
        .map(move |row| row?.open(vault, Erased::AsStored))
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
pub async fn replace_live_with_rebuild(
    conn: &mut PgConnection,
    part: crate::partitions::Part,
) -> Result<u64> {
    sqlx::query(
        "DELETE FROM account_snapshots
          WHERE $2::integer <= 1 OR projection_partition(account_id, $2) = $1",
    )
    .bind(i32::from(part.index))
    .bind(i32::from(part.of))
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
    vault: &Vault,
    table: Table,
    snapshots: &[AccountSnapshot],
) -> Result<()> {
    if snapshots.is_empty() {
        return Ok(());
    }
    // The store's own columns, one array each: the row format is this function's, not the API's.
    // The resource goes as its exact JSON text, sealed with the account's key.
    let with_resource: Vec<Uuid> = snapshots
        .iter()
        .filter(|s| s.resource.is_some())
        .map(|s| s.account_id)
        .collect();
    let sealers = vault.sealers(conn, &with_resource).await?;
    let account_ids: Vec<Uuid> = snapshots.iter().map(|s| s.account_id).collect();
    let user_ids: Vec<Uuid> = snapshots.iter().map(|s| s.user_id).collect();
    let statuses: Vec<&str> = snapshots.iter().map(|s| s.status.as_str()).collect();
    let connection_statuses: Vec<Option<&str>> = snapshots
        .iter()
        .map(|s| s.connection_status.as_deref())
        .collect();
    let resources: Vec<Option<Vec<u8>>> = snapshots
        .iter()
        .map(|s| {
            s.resource.as_ref().map(|resource| {
                sealers[&s.account_id].seal(
                    sealing::Aad::Snapshot {
                        account: s.account_id,
                    },
                    resource.raw().as_bytes(),
                )
            })
        })
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
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bytea[],
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

/// Up to `n` account ids with a snapshot, picked at random (for load tests).
pub async fn sample_ids(conn: &mut PgConnection, n: i64) -> Result<Vec<Uuid>> {
    Ok(
        sqlx::query_scalar("SELECT account_id FROM account_snapshots ORDER BY random() LIMIT $1")
            .bind(n)
            .fetch_all(conn)
            .await?,
    )
}

/// One line per table of the log and the projection, and per index: live and dead rows, updates
/// and how many were HOT, sizes. What bloat and index growth look like under sustained load.
pub async fn table_health(conn: &mut PgConnection) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT format('%s: %s rows, %s dead, %s updates (%s HOT), %s with indexes and TOAST',
                       t.relname, t.n_live_tup, t.n_dead_tup, t.n_tup_upd, t.n_tup_hot_upd,
                       pg_size_pretty(pg_total_relation_size(t.relid)))
           FROM pg_stat_user_tables t
          WHERE t.relname IN ('events', 'redeliveries', 'account_snapshots', 'account_keys')
         UNION ALL
         SELECT format('index %s: %s', i.indexrelname, pg_size_pretty(pg_relation_size(i.indexrelid)))
           FROM pg_stat_user_indexes i
          WHERE i.relname IN ('events', 'account_snapshots')",
    )
    .fetch_all(conn)
    .await?)
}
