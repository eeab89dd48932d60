//! The projection's layout in `PROJECTOR_PARTITIONS` partitions, stored in the database so that
//! every projector folds the same partitions (`store::partitions`).
//!
//! A projector whose number is not the stored one neither folds nor refuses to start: it waits.
//! When it can take every lock of the stored layout (no projector of that layout runs), it folds
//! each lagging partition up to the highest checkpoint, so that every account stands at one
//! position, and lays the projection out again from there in one transaction. Nothing is folded
//! twice, and nothing is skipped: the new partitions all start where every old one had got to.

use store::keys::Vault;
use store::locks::{self, Lock};
use store::partitions::{self, Layout, Part};
use store::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::ProjectorConfig;

/// Returns once the stored layout has `config.partitions` partitions, laying it out again when it
/// can; false if `shutdown` fired first.
pub(crate) async fn settle(
    pool: &PgPool,
    vault: &Vault,
    config: &ProjectorConfig,
    shutdown: &CancellationToken,
) -> store::Result<bool> {
    let wanted = config.partitions.max(1);
    let mut told = false;
    loop {
        if shutdown.is_cancelled() {
            return Ok(false);
        }
        let mut conn = pool.acquire().await?.detach();
        let stored = partitions::layout(&mut conn).await?;
        if stored.partitions() == wanted {
            return Ok(true);
        }
        if let Some(at) = lay_out_again(&mut conn, vault, config, &stored, wanted).await? {
            tracing::info!(
                from = stored.partitions(),
                to = wanted,
                at,
                "laid the projection out in new partitions"
            );
            return Ok(true);
        }
        if !told {
            tracing::warn!(
                stored = stored.partitions(),
                wanted,
                "the projection is laid out in {} partition(s) and a projector of that layout is \
                 running; this one (PROJECTOR_PARTITIONS={wanted}) waits until every such \
                 projector has stopped, then lays it out again",
                stored.partitions()
            );
            told = true;
        }
        drop(conn);
        tokio::select! {
            () = shutdown.cancelled() => return Ok(false),
            () = tokio::time::sleep(config.retry_interval) => {}
        }
    }
}

/// With every lock of `stored` taken on `conn`, folds its lagging parts up to the highest
/// checkpoint and lays the projection out in `wanted` partitions there. `None` when a lock is held
/// elsewhere (or the layout changed meanwhile).
async fn lay_out_again(
    conn: &mut PgConnection,
    vault: &Vault,
    config: &ProjectorConfig,
    stored: &Layout,
    wanted: u16,
) -> store::Result<Option<i64>> {
    let mut taken: Vec<Lock> = vec![];
    let outcome: store::Result<Option<i64>> = async {
        for part in Part::all(stored.partitions()) {
            if !locks::try_lock(conn, part.lock()).await? {
                return Ok(None);
            }
            taken.push(part.lock());
        }
        // Read again now that no projector of it runs: the layout seen before may be gone.
        let layout = partitions::layout(conn).await?;
        if layout.partitions() != stored.partitions() {
            return Ok(None);
        }
        let at = layout.common();
        for (part, checkpoint) in layout.parts() {
            if checkpoint < at {
                tracing::info!(%part, checkpoint, to = at, "folding a lagging partition up to the others");
                crate::fold_up_to(conn, vault, part, config.batch_size, at).await?;
            }
        }
        let mut tx = store::begin(conn).await?;
        let locked = partitions::lock_layout(&mut tx).await?;
        if locked.checkpoints.iter().any(|&c| c != at) {
            // Only a rebuild moves checkpoints without these locks, and only forward: go again.
            return Ok(None);
        }
        partitions::lay_out(&mut tx, wanted, at).await?;
        store::commit(tx).await?;
        Ok(Some(at))
    }
    .await;
    for lock in taken {
        locks::unlock(conn, lock).await?;
    }
    outcome
}
