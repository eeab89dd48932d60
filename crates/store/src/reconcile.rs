//! Reconcile's bookkeeping (`reconcile_runs`, `reconcile_listed`; see
//! `migrations/V13__reconcile.sql`): each run's cursor and counts, and the accounts it has listed.
//! The log itself is appended to through [`crate::log::append_fetched_in`].

use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::AccountSnapshot;
use uuid::Uuid;

use crate::log::StoredEvent;
use crate::{PgConnection, Result};

/// What a run compared, so far or in all. Every listed account lands in exactly one of `new`,
/// `newer_at_argyle`, `unchanged`, `newer_here`, `removed_here` and `unreadable`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct Counts {
    /// Accounts Argyle listed (each once per run, however many pages repeat it).
    pub listed: i64,
    /// Listed, and unknown here: appended.
    pub new: i64,
    /// Listed with a newer `updated_at` than ours: appended.
    pub newer_at_argyle: i64,
    /// Listed as we hold it: nothing to do.
    pub unchanged: i64,
    /// Ours is newer than the listing (a webhook came after Argyle's list was read): nothing to do.
    pub newer_here: i64,
    /// Listed, but removed here (removal is terminal): nothing to do.
    pub removed_here: i64,
    /// Listed entries that cannot be compared or folded (no UUID ids, an `updated_at` that is not
    /// an instant): reported, not appended.
    pub unreadable: i64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, other: Self) {
        self.listed += other.listed;
        self.new += other.new;
        self.newer_at_argyle += other.newer_at_argyle;
        self.unchanged += other.unchanged;
        self.newer_here += other.newer_here;
        self.removed_here += other.removed_here;
        self.unreadable += other.unreadable;
    }
}

/// One run, as `reconcile_runs` holds it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Run {
    pub id: i64,
    pub api_url: String,
    pub scope_user: Option<Uuid>,
    pub scope_account: Option<Uuid>,
    pub dry_run: bool,
    pub started_by: String,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// `running`, `finished`, `refused`, `failed` or `abandoned`.
    pub state: String,
    pub next_url: Option<String>,
    pub listing_done: bool,
    pub pages: i32,
    #[sqlx(flatten)]
    pub counts: Counts,
    /// Accounts held as active when the run started that Argyle did not list (once listed to the end).
    pub missing: Option<i64>,
    /// Accounts held as active in the run's scope when it started (once listed to the end).
    pub held_active: Option<i64>,
    /// Removals confirmed and appended.
    pub removals: i64,
    pub error: Option<String>,
}

const RUN_COLUMNS: &str = "id, api_url, scope_user, scope_account, dry_run, started_by, started_at, \
     updated_at, finished_at, state, next_url, listing_done, pages, listed, new, newer_at_argyle, \
     unchanged, newer_here, removed_here, unreadable, missing, held_active, removals, error";

/// What a run covers: every account, one user's, or one account.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scope {
    pub user: Option<Uuid>,
    pub account: Option<Uuid>,
}

/// The newest run still marked `running` for the same API and scope, not a dry run, that made
/// progress within `within`: the one to resume. (Call while holding
/// [`crate::locks::Lock::Reconcile`]: a run marked `running` is then one that was stopped.)
pub async fn resumable(
    conn: &mut PgConnection,
    api_url: &str,
    scope: Scope,
    within: Duration,
) -> Result<Option<Run>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {RUN_COLUMNS} FROM reconcile_runs
         WHERE state = 'running' AND NOT dry_run AND api_url = $1
           AND scope_user IS NOT DISTINCT FROM $2 AND scope_account IS NOT DISTINCT FROM $3
           AND updated_at > now() - $4
         ORDER BY id DESC LIMIT 1"
    )))
    .bind(api_url)
    .bind(scope.user)
    .bind(scope.account)
    .bind(within)
    .fetch_optional(conn)
    .await?)
}

/// Marks as `abandoned` the stopped runs that will not be resumed: those of the same API and
/// scope but `keep`, dry runs, and any that made no progress within `within`; drops what they
/// listed. (A stopped run of another scope stays resumable.)
pub async fn abandon_others(
    conn: &mut PgConnection,
    keep: Option<i64>,
    api_url: &str,
    scope: Scope,
    within: Duration,
) -> Result<u64> {
    let done = sqlx::query(
        "UPDATE reconcile_runs SET state = 'abandoned', finished_at = now(), updated_at = now()
         WHERE state = 'running' AND id IS DISTINCT FROM $1
           AND (dry_run OR updated_at <= now() - $5
                OR (api_url = $2 AND scope_user IS NOT DISTINCT FROM $3
                    AND scope_account IS NOT DISTINCT FROM $4))",
    )
    .bind(keep)
    .bind(api_url)
    .bind(scope.user)
    .bind(scope.account)
    .bind(within)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "DELETE FROM reconcile_listed l USING reconcile_runs r
         WHERE l.run_id = r.id AND r.state <> 'running'",
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Records a new run.
pub async fn start(
    conn: &mut PgConnection,
    api_url: &str,
    scope: Scope,
    dry_run: bool,
    started_by: &str,
) -> Result<Run> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO reconcile_runs (api_url, scope_user, scope_account, dry_run, started_by)
         VALUES ($1, $2, $3, $4, $5) RETURNING {RUN_COLUMNS}"
    )))
    .bind(api_url)
    .bind(scope.user)
    .bind(scope.account)
    .bind(dry_run)
    .bind(started_by)
    .fetch_one(conn)
    .await?)
}

/// Marks `accounts` as listed by the run; returns those listed for the first time in this run
/// (a page may repeat an account an earlier page listed).
pub async fn mark_listed(
    conn: &mut PgConnection,
    run_id: i64,
    accounts: &[Uuid],
) -> Result<Vec<Uuid>> {
    Ok(sqlx::query_scalar(
        "INSERT INTO reconcile_listed (run_id, account_id) SELECT $1, unnest($2::uuid[])
         ON CONFLICT DO NOTHING RETURNING account_id",
    )
    .bind(run_id)
    .bind(accounts)
    .fetch_all(conn)
    .await?)
}

/// Adds to a run's counts, in the transaction that appends what they count. With `page`, that is
/// a page of the listing: the page count moves and the cursor goes to where the listing goes on
/// (`None`: it is complete); without, an account fetched alone, and the cursor stays.
pub async fn record(
    conn: &mut PgConnection,
    run_id: i64,
    counts: Counts,
    page: Option<Option<&str>>,
) -> Result<()> {
    sqlx::query(
        "UPDATE reconcile_runs SET listed = listed + $2, new = new + $3,
             newer_at_argyle = newer_at_argyle + $4, unchanged = unchanged + $5,
             newer_here = newer_here + $6, removed_here = removed_here + $7,
             unreadable = unreadable + $8,
             pages = pages + CASE WHEN $9 THEN 1 ELSE 0 END,
             next_url = CASE WHEN $9 THEN $10 ELSE next_url END,
             listing_done = CASE WHEN $9 THEN $10 IS NULL ELSE listing_done END,
             updated_at = now()
         WHERE id = $1",
    )
    .bind(run_id)
    .bind(counts.listed)
    .bind(counts.new)
    .bind(counts.newer_at_argyle)
    .bind(counts.unchanged)
    .bind(counts.newer_here)
    .bind(counts.removed_here)
    .bind(counts.unreadable)
    .bind(page.is_some())
    .bind(page.flatten())
    .execute(conn)
    .await?;
    Ok(())
}

/// One item of what the log knows of an account, as [`known`] streams it.
pub enum Known<'a> {
    /// A snapshot; every snapshot comes before every event.
    Snapshot(AccountSnapshot),
    /// An event after the projection's checkpoint that the projector will fold, in log order.
    Event(&'a StoredEvent),
}

/// What the log knows of `accounts`, in one consistent read, streamed to `each`: their snapshots,
/// then every event of theirs after the projection's checkpoint that the projector will fold, in
/// log order (memory stays flat however far the projector is behind). A fold of those events onto
/// the snapshots is the projection the log already holds, whether or not the projector has caught
/// up.
pub async fn known(
    conn: &mut PgConnection,
    vault: &crate::keys::Vault,
    accounts: &[Uuid],
    mut each: impl FnMut(Known<'_>),
) -> Result<()> {
    use futures_util::TryStreamExt;
    let mut tx = crate::begin_consistent_read(conn).await?;
    // Each account's own partition's checkpoint: a faster partition's snapshots hold more.
    let layout = crate::partitions::layout(&mut tx).await?;
    for snapshot in crate::snapshots::current(&mut tx, vault, accounts).await? {
        each(Known::Snapshot(snapshot));
    }
    {
        let mut events =
            crate::log::stream_accounts_after(&mut tx, vault, accounts, layout.lowest());
        while let Some(event) = events.try_next().await? {
            let folded = event
                .account_id
                .is_some_and(|account| event.position <= layout.checkpoint_of(account));
            if !folded {
                each(Known::Event(&event));
            }
        }
    }
    crate::commit(tx).await
}

/// Up to `limit` accounts held as active in `scope`, first seen at or before `seen_by`, that the
/// run did not list, after `after` in account order: `(account, user)`.
pub async fn missing(
    conn: &mut PgConnection,
    run_id: i64,
    scope: Scope,
    seen_by: DateTime<Utc>,
    after: Uuid,
    limit: i64,
) -> Result<Vec<(Uuid, Uuid)>> {
    Ok(sqlx::query_as(
        "SELECT s.account_id, s.user_id FROM account_snapshots s
         WHERE s.status = 'active'
           AND NOT EXISTS (SELECT 1 FROM account_keys k
                           WHERE k.account_id = s.account_id AND k.erased_at IS NOT NULL) AND s.first_seen_at <= $2 AND s.account_id > $5
           AND ($3::uuid IS NULL OR s.user_id = $3) AND ($4::uuid IS NULL OR s.account_id = $4)
           AND NOT EXISTS (SELECT 1 FROM reconcile_listed l
                           WHERE l.run_id = $1 AND l.account_id = s.account_id)
         ORDER BY s.account_id LIMIT $6",
    )
    .bind(run_id)
    .bind(seen_by)
    .bind(scope.user)
    .bind(scope.account)
    .bind(after)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// Accounts held as active in `scope`, first seen at or before `seen_by`.
pub async fn held_active(
    conn: &mut PgConnection,
    scope: Scope,
    seen_by: DateTime<Utc>,
) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM account_snapshots s
         WHERE s.status = 'active'
           AND NOT EXISTS (SELECT 1 FROM account_keys k
                           WHERE k.account_id = s.account_id AND k.erased_at IS NOT NULL) AND s.first_seen_at <= $1
           AND ($2::uuid IS NULL OR s.user_id = $2) AND ($3::uuid IS NULL OR s.account_id = $3)",
    )
    .bind(seen_by)
    .bind(scope.user)
    .bind(scope.account)
    .fetch_one(conn)
    .await?)
}

/// How a run ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// `finished`, `refused` or `failed`.
    pub state: &'static str,
    pub missing: Option<i64>,
    pub held_active: Option<i64>,
    pub removals: i64,
    pub error: Option<String>,
}

/// Records how the run ended and drops what it listed.
pub async fn finish(conn: &mut PgConnection, run_id: i64, outcome: &Outcome) -> Result<()> {
    let mut tx = crate::begin(conn).await?;
    sqlx::query(
        "UPDATE reconcile_runs SET state = $2, missing = $3, held_active = $4, removals = $5,
             error = $6, finished_at = now(), updated_at = now()
         WHERE id = $1",
    )
    .bind(run_id)
    .bind(outcome.state)
    .bind(outcome.missing)
    .bind(outcome.held_active)
    .bind(outcome.removals)
    .bind(outcome.error.as_deref())
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM reconcile_listed WHERE run_id = $1")
        .bind(run_id)
        .execute(&mut *tx)
        .await?;
    crate::commit(tx).await
}

/// Counts one confirmed removal (call in the transaction that appends it).
pub async fn add_removal(conn: &mut PgConnection, run_id: i64) -> Result<()> {
    sqlx::query(
        "UPDATE reconcile_runs SET removals = removals + 1, updated_at = now() WHERE id = $1",
    )
    .bind(run_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// The API URL of the newest run that finished a listing of every account, if any.
pub async fn last_finished_api_url(conn: &mut PgConnection) -> Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT api_url FROM reconcile_runs
         WHERE state IN ('finished', 'refused') AND listing_done AND NOT dry_run
           AND scope_user IS NULL AND scope_account IS NULL
         ORDER BY id DESC LIMIT 1",
    )
    .fetch_optional(conn)
    .await?)
}

/// Records a failed attempt of a run that stays resumable (Argyle unreachable, say).
pub async fn note_error(conn: &mut PgConnection, run_id: i64, error: &str) -> Result<()> {
    sqlx::query("UPDATE reconcile_runs SET error = $2, updated_at = now() WHERE id = $1")
        .bind(run_id)
        .bind(error)
        .execute(conn)
        .await?;
    Ok(())
}

/// The newest run that is not a dry run (running or ended), of any scope (`status`), or only of
/// every account (`whole`: the schedule's).
pub async fn latest(conn: &mut PgConnection, whole: bool) -> Result<Option<Run>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {RUN_COLUMNS} FROM reconcile_runs
         WHERE NOT dry_run AND (NOT $1 OR (scope_user IS NULL AND scope_account IS NULL))
         ORDER BY id DESC LIMIT 1"
    )))
    .bind(whole)
    .fetch_optional(conn)
    .await?)
}
