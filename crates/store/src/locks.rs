//! Every advisory lock of the service, by name. Keys are fixed: another version of the service
//! on the same database takes the same locks.

use sqlx::PgConnection;

use crate::Result;

/// The advisory lock every append holds while it takes its positions (inside `append_to_log`,
/// which names its key as a number), that `log_horizon()` takes shared and that erasure holds
/// ([`crate::erasure::hold_appends`]); see the crate docs for why readers never skip an event.
pub const APPEND_LOCK: i64 = 0x4150_4c4f_4721; // "APLOG!"

/// Session lock `migrate` holds while it applies migrations, so concurrent runs take turns.
pub(crate) const MIGRATION_LOCK: i64 = 0x4150_4d49_4752; // "APMIGR"

/// A session-level lock that makes one process the only one doing something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    /// The one projector allowed to write snapshots.
    Leader,
    /// A running rebuild, so two cannot share the shadow table.
    Rebuild,
    /// The one enricher that fetches from Argyle (others stand by).
    Enricher,
    /// A running reconcile with Argyle, so two never compare and append at once.
    Reconcile,
    /// The one notifier that delivers outbound webhooks (others stand by).
    Notifier,
    /// The one projector allowed to write one partition's snapshots (`PROJECTOR_PARTITIONS` > 1;
    /// with one partition the projector takes [`Lock::Leader`]).
    Partition(u16),
}

impl Lock {
    /// The advisory lock key.
    pub const fn key(self) -> i64 {
        match self {
            Self::Leader => 0x4150_4c45_4144,    // "APLEAD"
            Self::Rebuild => 0x4150_5245_4244,   // "APREBD"
            Self::Enricher => 0x4150_454e_5243,  // "APENRC"
            Self::Reconcile => 0x4150_5243_4e43, // "APRCNC"
            Self::Notifier => 0x4150_4e4f_5446,  // "APNOTF"
            Self::Partition(index) => 0x4150_5054_0000 | index as i64, // "APPT" and the index
        }
    }
}

/// Tries to take `lock` on this session: true if this session now holds it. It lives as long as
/// the session, or until [`unlock`].
pub async fn try_lock(conn: &mut PgConnection, lock: Lock) -> Result<bool> {
    Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(lock.key())
        .fetch_one(conn)
        .await?)
}

/// Releases `lock` held by this session.
pub async fn unlock(conn: &mut PgConnection, lock: Lock) -> Result<()> {
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(lock.key())
        .execute(conn)
        .await?;
    Ok(())
}

/// The session holding `lock` in this database, if any: its `application_name`, client address
/// and backend pid.
pub async fn holder(
    conn: &mut PgConnection,
    lock: Lock,
) -> Result<Option<(String, Option<String>, i32)>> {
    Ok(sqlx::query_as(
        "SELECT a.application_name, host(a.client_addr), a.pid
           FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
          WHERE l.locktype = 'advisory' AND l.granted
            AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
            AND ((l.classid::bigint << 32) | l.objid::bigint) = $1",
    )
    .bind(lock.key())
    .fetch_optional(conn)
    .await?)
}
