//! Events that were not folded: they stay in the log; `quarantine` records why, and who refused
//! them (the fold, or the database writing the fold's snapshot).

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Result;
use crate::keys::{KEY_COLUMNS, NO_ACCOUNT, Opened, RowKey, Vault};

/// Who refused an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedBy {
    /// The fold cannot apply it; every fold of the log decides so again by itself.
    Fold,
    /// The database would not write the snapshot the fold made of it; every later fold of the log
    /// skips it, reading this record (see [`crate::log`]).
    Store,
}

impl RefusedBy {
    fn as_str(self) -> &'static str {
        match self {
            Self::Fold => "fold",
            Self::Store => "store",
        }
    }
}

/// An event that was refused, about to be recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub position: i64,
    pub account_id: Option<Uuid>,
    pub event: String,
    pub error: String,
    pub refused_by: RefusedBy,
}

impl Refusal {
    /// `stored`, whose snapshot the database refused to write even alone ([`RefusedBy::Store`]),
    /// with the database's reason.
    pub fn by_store(stored: &crate::log::StoredEvent, error: &crate::Error) -> Self {
        Self {
            position: stored.position,
            account_id: stored.account_id,
            event: stored.event.clone(),
            error: format!("the database refused the snapshot: {}", error.reason()),
            refused_by: RefusedBy::Store,
        }
    }
}

/// A recorded refusal.
#[derive(Debug, Clone, PartialEq)]
pub struct Quarantined {
    pub position: i64,
    pub account_id: Option<Uuid>,
    pub event: String,
    /// Why; `None` once the account is erased (the reason was sealed with its key).
    pub error: Option<String>,
    /// `fold` or `store` (see [`RefusedBy`]).
    pub refused_by: String,
    pub quarantined_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct QuarantineRow {
    position: i64,
    account_id: Option<Uuid>,
    event: String,
    error: Vec<u8>,
    refused_by: String,
    quarantined_at: DateTime<Utc>,
    #[sqlx(flatten)]
    key: RowKey,
}

/// Records refusals; one already recorded (a rebuild meets the same event again) is kept as it was.
/// Each reason is sealed with its account's key: a database's message may quote what it refused.
pub async fn record(conn: &mut PgConnection, vault: &Vault, refusals: &[Refusal]) -> Result<()> {
    if refusals.is_empty() {
        return Ok(());
    }
    let subjects: Vec<Uuid> = refusals
        .iter()
        .map(|r| r.account_id.unwrap_or(NO_ACCOUNT))
        .collect();
    let sealers = vault.sealers(conn, &subjects).await?;
    let positions: Vec<i64> = refusals.iter().map(|r| r.position).collect();
    let accounts: Vec<Option<Uuid>> = refusals.iter().map(|r| r.account_id).collect();
    let events: Vec<&str> = refusals.iter().map(|r| r.event.as_str()).collect();
    let errors: Vec<Vec<u8>> = refusals
        .iter()
        .zip(&subjects)
        .map(|(r, subject)| {
            sealers[subject].seal(
                sealing::Aad::Quarantine {
                    account: *subject,
                    position: r.position,
                },
                r.error.as_bytes(),
            )
        })
        .collect();
    let refused_by: Vec<&str> = refusals.iter().map(|r| r.refused_by.as_str()).collect();
    sqlx::query(
        "INSERT INTO quarantine (position, account_id, event, error, refused_by)
         SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::bytea[], $5::text[])
         ON CONFLICT (position) DO NOTHING",
    )
    .bind(positions)
    .bind(accounts)
    .bind(events)
    .bind(errors)
    .bind(refused_by)
    .execute(conn)
    .await?;
    Ok(())
}

/// Up to `limit` quarantined events after position `after`, in log order.
pub async fn page(
    conn: &mut PgConnection,
    vault: &Vault,
    after: i64,
    limit: i64,
) -> Result<Vec<Quarantined>> {
    select(conn, vault, None, after, limit).await
}

/// Every quarantined event of one account, in log order.
pub async fn of_account(
    conn: &mut PgConnection,
    vault: &Vault,
    account: Uuid,
) -> Result<Vec<Quarantined>> {
    select(conn, vault, Some(account), 0, i64::MAX).await
}

async fn select(
    conn: &mut PgConnection,
    vault: &Vault,
    account: Option<Uuid>,
    after: i64,
    limit: i64,
) -> Result<Vec<Quarantined>> {
    let rows: Vec<QuarantineRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT q.position, q.account_id, q.event, q.error, q.refused_by, q.quarantined_at, {KEY_COLUMNS}
           FROM quarantine q LEFT JOIN account_keys k
             ON k.account_id = coalesce(q.account_id, '00000000-0000-0000-0000-000000000000'::uuid)
          WHERE q.position > $1 AND ($3::uuid IS NULL OR q.account_id = $3)
          ORDER BY q.position LIMIT $2"
    )))
    .bind(after)
    .bind(limit)
    .bind(account)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|row| {
            let subject = row.account_id.unwrap_or(NO_ACCOUNT);
            let error = match vault.open(
                subject,
                &row.key,
                sealing::Aad::Quarantine {
                    account: subject,
                    position: row.position,
                },
                row.error,
                None,
            )? {
                Opened::Plain(text) => Some(String::from_utf8_lossy(&text).into_owned()),
                Opened::Erased => None,
                Opened::Unreadable(reason) => {
                    Some(format!("(the recorded reason cannot be read: {reason})"))
                }
            };
            Ok(Quarantined {
                position: row.position,
                account_id: row.account_id,
                event: row.event,
                error,
                refused_by: row.refused_by,
                quarantined_at: row.quarantined_at,
            })
        })
        .collect()
}

/// How many events are quarantined.
pub async fn count(conn: &mut PgConnection) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM quarantine")
        .fetch_one(conn)
        .await?)
}

/// Every recorded refusal, in log order (for checks and tests; the table is small).
pub async fn all(conn: &mut PgConnection, vault: &Vault) -> Result<Vec<Quarantined>> {
    page(conn, vault, 0, i64::MAX).await
}
