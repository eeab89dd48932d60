//! One process at a time: the standby loop every single-writer role runs (the projector, the
//! enricher, and the roles after them).

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::locks::{self, Lock};
use crate::{PgConnection, PgPool, Result};

/// Stands by until a session of its own holds `lock`, then runs `work` on that session, which
/// must do all its reads and writes there: if the session dies, the lock and any uncommitted work
/// die with it, and a standby takes over. `standing_by` is called once, when another process
/// holds the lock. Returns `Ok(())` without working if `shutdown` fires while standing by.
pub async fn run_as_leader<W, F>(
    pool: &PgPool,
    lock: Lock,
    retry_interval: Duration,
    shutdown: &CancellationToken,
    standing_by: impl FnOnce(),
    work: W,
) -> Result<()>
where
    W: FnOnce(PgConnection) -> F,
    F: Future<Output = Result<()>>,
{
    // A connection of its own: the lock lives exactly as long as this session.
    let mut conn = pool.acquire().await?.detach();
    let mut standing_by = Some(standing_by);
    while !locks::try_lock(&mut conn, lock).await? {
        if let Some(announce) = standing_by.take() {
            announce();
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(retry_interval) => {}
        }
    }
    work(conn).await
}
