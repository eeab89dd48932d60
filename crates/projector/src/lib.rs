//! The projector: folds the event log into account snapshots, one batch at a time.
//!
//! # Layout
//! - [`run`]: the long-running loop. It waits until the projection's stored layout is
//!   `PROJECTOR_PARTITIONS` ([`layout`]), then stands by for every part at once
//!   ([`store::leader::run_as_leader`]), and leads each part whose lock it holds: catches up from
//!   that part's checkpoint, and waits for an append notification (or the poll interval) to go
//!   again. With one partition the part is the whole projection, and that is one leader.
//! - [`run_batch`]: one step of one part: read up to `batch_size` of its events after its
//!   checkpoint, fold them with [`domain::step`], write each changed snapshot once and the new
//!   checkpoint in one transaction (`store::partitions` keeps the projection's checkpoint at the
//!   lowest part's).
//! - [`rebuild`]: refolding every snapshot (or one partition's) from position 0 into a shadow table
//!   and swapping it in, and verifying the live snapshots against a fresh fold, both in constant
//!   memory.
//!
//! # Why at most one writer per part, and why a crash loses nothing
//! Leadership is a session advisory lock, and every batch runs on the very connection that holds it:
//! if that session dies, the lock and any uncommitted batch die with it, and a standby takes over
//! from the last committed checkpoint. The checkpoint is also moved with compare-and-set, so a
//! writer that somehow lost the lock still cannot commit over another's progress. An account
//! belongs to one part, so its events are folded in log order by one writer.

#![forbid(unsafe_code)]

pub mod erase;
pub mod layout;
pub mod rebuild;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use domain::{AccountSnapshot, EventKind};
use store::keys::Vault;
use store::leader::run_as_leader;
use store::log::{AppendNotifications, StoredEvent};
use store::partitions::{self, Part};
use store::quarantine::{Refusal, RefusedBy};
use store::snapshots::Table;
use store::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How the projector paces itself.
#[derive(Debug, Clone)]
pub struct ProjectorConfig {
    /// Events read and folded per transaction.
    pub batch_size: i64,
    /// Catch up at least this often even if no notification arrives.
    pub poll_interval: Duration,
    /// How often a standby retries the leader lock, and the pause after a database error.
    pub retry_interval: Duration,
    /// `ERASE_REMOVED_AFTER`: the leader erases accounts this long after their removal.
    pub erase_removed_after: Option<Duration>,
    /// `PROJECTOR_PARTITIONS`: hash partitions of the projection, each with its own checkpoint
    /// and leader (1: the whole projection, one leader).
    pub partitions: u16,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            poll_interval: Duration::from_secs(1),
            retry_interval: Duration::from_millis(500),
            erase_removed_after: None,
            partitions: 1,
        }
    }
}

/// What one batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchOutcome {
    /// Events read from the log (all families).
    pub events: usize,
    /// Snapshot rows written: one per account touched, however many of its events were in the batch.
    pub snapshots_written: usize,
    /// Events the fold refused and quarantined; they stay in the log, the snapshot is left as it was.
    pub refused: usize,
    /// The checkpoint after the batch.
    pub checkpoint: i64,
    /// The log's horizon the batch read up to (`i64::MAX` when not read: go on at once).
    pub horizon: i64,
}

/// Runs the projector until `shutdown` fires, surviving database outages.
pub async fn run(pool: PgPool, vault: Vault, config: ProjectorConfig, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        match lead_every_part(&pool, &vault, &config, &shutdown).await {
            Ok(()) => break,
            Err(error) => {
                if error.is_unavailable() {
                    tracing::warn!(%error, "projector lost its database connection; retrying");
                } else {
                    tracing::error!(error = %error.reason(), "projector batch failed; retrying");
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(config.retry_interval) => {}
                }
            }
        }
    }
    tracing::info!("projector stopped");
}

/// Waits until the stored layout is this projector's ([`layout::settle`]), then stands by for
/// every part at once, leading each it can lock. The first error ends them all (their sessions,
/// and so their locks, close with them), and [`run`] starts again.
async fn lead_every_part(
    pool: &PgPool,
    vault: &Vault,
    config: &ProjectorConfig,
    shutdown: &CancellationToken,
) -> store::Result<()> {
    if !layout::settle(pool, vault, config, shutdown).await? {
        return Ok(());
    }
    let leaders =
        Part::all(config.partitions).map(|part| lead(pool, vault, config, part, shutdown));
    futures_util::future::try_join_all(leaders).await?;
    Ok(())
}

async fn lead(
    pool: &PgPool,
    vault: &Vault,
    config: &ProjectorConfig,
    part: Part,
    shutdown: &CancellationToken,
) -> store::Result<()> {
    let standing_by = || {
        leader_gauge(part, false);
        tracing::info!(%part, "another projector is leading; standing by");
    };
    let lead = |conn| follow_the_log(conn, pool, vault, config, part, shutdown);
    run_as_leader(
        pool,
        part.lock(),
        config.retry_interval,
        shutdown,
        standing_by,
        lead,
    )
    .await
}

/// `projector_leader`, per partition when there are several.
fn leader_gauge(part: Part, leads: bool) {
    let value = if leads { 1.0 } else { 0.0 };
    if part.is_whole() {
        metrics::gauge!("projector_leader").set(value);
    } else {
        metrics::gauge!("projector_leader", "partition" => part.index.to_string()).set(value);
    }
}

/// Folds the log as the leader of `part`, on the session that holds its lock, until `shutdown`.
async fn follow_the_log(
    conn: PgConnection,
    pool: &PgPool,
    vault: &Vault,
    config: &ProjectorConfig,
    part: Part,
    shutdown: &CancellationToken,
) -> store::Result<()> {
    tracing::info!(%part, "projector is the leader");
    leader_gauge(part, true);
    let _not_leader = NotLeaderOnDrop(part);
    let folding = fold_the_log(conn, pool, vault, config, part, shutdown);
    // Scheduled erasure runs beside the fold of the first part while this process leads it.
    let after = config.erase_removed_after.filter(|_| part.index == 0);
    let Some(after) = after else {
        return folding.await;
    };
    // Its error ends the leadership like the fold's, and the standby loop takes over.
    tokio::select! {
        outcome = folding => outcome,
        Err(error) = erase::on_schedule(pool, vault, after, shutdown) => Err(error),
    }
}

async fn fold_the_log(
    mut conn: PgConnection,
    pool: &PgPool,
    vault: &Vault,
    config: &ProjectorConfig,
    part: Part,
    shutdown: &CancellationToken,
) -> store::Result<()> {
    let mut notifications = AppendNotifications::subscribe(pool).await?;
    loop {
        loop {
            if shutdown.is_cancelled() {
                store::locks::unlock(&mut conn, part.lock()).await?;
                return Ok(());
            }
            let outcome = run_batch(&mut conn, vault, part, config.batch_size).await?;
            if outcome.events > 0 {
                tracing::debug!(%part, ?outcome, "batch folded");
            }
            let head = store::log::head(&mut conn).await?;
            let lag = (head - outcome.checkpoint).max(0) as f64;
            metrics::gauge!("log_head_position").set(head as f64);
            if part.is_whole() {
                metrics::gauge!("projector_checkpoint_position").set(outcome.checkpoint as f64);
                metrics::gauge!("projector_lag_events").set(lag);
            } else {
                let partition = part.index.to_string();
                metrics::gauge!("projector_checkpoint_position", "partition" => partition.clone())
                    .set(outcome.checkpoint as f64);
                metrics::gauge!("projector_lag_events", "partition" => partition).set(lag);
            }
            // Caught up with what is settled, not merely a short batch: a batch cut short by a
            // refusal goes on at once. Events past the horizon wait for the appends before them
            // (their commit announces itself; an abort is seen at the next poll).
            if outcome.checkpoint >= outcome.horizon {
                break;
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => {}
            woke = notifications.wait() => woke?,
            () = tokio::time::sleep(config.poll_interval) => {}
        }
    }
}

/// Resets `projector_leader` when leadership of a part ends, however it ends.
struct NotLeaderOnDrop(Part);

impl Drop for NotLeaderOnDrop {
    fn drop(&mut self) {
        leader_gauge(self.0, false);
    }
}

/// Folds `part`'s next batch after its checkpoint and commits the changed snapshots with the new
/// checkpoint. `conn` must be the connection holding `part`'s lock.
///
/// # No single event stops the projector
/// When the database refuses the batch's writes ([`store::Error::is_refusal`]: a value it cannot
/// hold, a statement timeout on an oversized batch, a trigger), the batch is retried at half its
/// size, and again, until the one event whose snapshot cannot be written is alone; that event is
/// quarantined with the database's reason ([`RefusedBy::Store`]) and the checkpoint moves past it.
/// Any other error (connection lost, serialization) is returned, and the same batch is retried.
#[tracing::instrument(skip(conn, vault))]
pub async fn run_batch(
    conn: &mut PgConnection,
    vault: &Vault,
    part: Part,
    batch_size: i64,
) -> store::Result<BatchOutcome> {
    let mut size = batch_size.max(1);
    loop {
        match try_batch(conn, vault, part, size, i64::MAX).await {
            Ok(outcome) => return Ok(outcome),
            Err(Attempt::Refused { events, error, .. }) if events > 1 => {
                size = (events as i64 / 2).max(1);
                tracing::warn!(events, retry_with = size, error = %error.reason(),
                    "the database refused a batch's snapshots; retrying it in smaller parts");
            }
            Err(Attempt::Refused { first, error, .. }) => {
                return quarantine_alone(conn, vault, part, &first, &error).await;
            }
            Err(Attempt::Failed(error)) => return Err(error),
        }
    }
}

/// How one attempt at a batch failed.
enum Attempt {
    /// The database refused the batch's writes: a smaller batch may pass.
    Refused {
        events: usize,
        first: StoredEvent,
        error: store::Error,
    },
    Failed(store::Error),
}

impl From<store::Error> for Attempt {
    fn from(error: store::Error) -> Self {
        Self::Failed(error)
    }
}

/// One batch of `part` up to the horizon, and never past `up_to` (laying out again folds the
/// lagging parts up to a common position, no further).
async fn try_batch(
    conn: &mut PgConnection,
    vault: &Vault,
    part: Part,
    batch_size: i64,
    up_to: i64,
) -> Result<BatchOutcome, Attempt> {
    let mut tx = store::begin(conn).await?;
    // The horizon first, in a statement before the reads (READ COMMITTED: each statement sees
    // every commit before it; see the store crate's docs). Settling it here shares the batch's
    // commit (one WAL flush, not two). One part settles: the others would queue on `log_settled`.
    let horizon = if part.index == 0 {
        store::log::settle(&mut tx).await?
    } else {
        store::log::horizon(&mut tx).await?
    }
    .min(up_to);
    let checkpoint = partitions::lock(&mut tx, part).await?;
    let events =
        store::log::read_part_after(&mut tx, vault, part, checkpoint, horizon, batch_size).await?;
    // A short batch is everything of the part up to the horizon: the checkpoint moves there (a
    // partition's events are sparse, and an abandoned position is nobody's).
    let last = if (events.len() as i64) < batch_size {
        horizon.max(checkpoint)
    } else {
        events.last().map_or(checkpoint, |e| e.position)
    };
    let folded = if events.is_empty() {
        Ok((0, 0))
    } else {
        fold_into(&mut tx, vault, Table::Live, &events).await
    };
    let (snapshots_written, refused) = match folded {
        Ok(written) => written,
        Err(error) if error.is_refusal() => {
            return Err(Attempt::Refused {
                events: events.len(),
                first: events[0].clone(),
                error,
            });
        }
        Err(error) => return Err(error.into()),
    };
    if last > checkpoint {
        partitions::advance(&mut tx, part, checkpoint, last).await?;
    }
    // Committed even when nothing was read: what settling recorded (abandoned positions) stays.
    store::commit(tx).await?;
    if let Some(newest) = events.last().map(|e| e.received_at) {
        let lag = (chrono::Utc::now() - newest).to_std().unwrap_or_default();
        metrics::gauge!("projector_lag_seconds").set(lag.as_secs_f64());
        metrics::histogram!("projector_batch_events").record(events.len() as f64);
        metrics::counter!("snapshot_writes_total").increment(snapshots_written as u64);
        metrics::counter!("quarantined_events_total").increment(refused as u64);
    }
    Ok(BatchOutcome {
        events: events.len(),
        snapshots_written,
        refused,
        checkpoint: last,
        horizon,
    })
}

/// Folds `part` up to `up_to` (at most its horizon): what laying out again needs of a lagging part.
pub(crate) async fn fold_up_to(
    conn: &mut PgConnection,
    vault: &Vault,
    part: Part,
    batch_size: i64,
    up_to: i64,
) -> store::Result<i64> {
    loop {
        let outcome = match try_batch(conn, vault, part, batch_size, up_to).await {
            Ok(outcome) => outcome,
            // A refused batch is quarantined through the running projector's path.
            Err(Attempt::Refused { .. }) => run_batch(conn, vault, part, 1).await?,
            Err(Attempt::Failed(error)) => return Err(error),
        };
        if outcome.checkpoint >= up_to || outcome.checkpoint >= outcome.horizon {
            return Ok(outcome.checkpoint);
        }
    }
}

/// Quarantines `event`, the first after the checkpoint, whose snapshot the database refused to
/// write even alone, and moves the checkpoint past it.
async fn quarantine_alone(
    conn: &mut PgConnection,
    vault: &Vault,
    part: Part,
    event: &StoredEvent,
    error: &store::Error,
) -> store::Result<BatchOutcome> {
    let reason = error.reason();
    tracing::warn!(position = event.position, account = ?event.account_id, event = %event.event,
        %reason, "event quarantined: the database refused its snapshot");
    let mut tx = store::begin(conn).await?;
    let checkpoint = partitions::lock(&mut tx, part).await?;
    let refusal = Refusal::by_store(event, error);
    store::quarantine::record(&mut tx, vault, std::slice::from_ref(&refusal)).await?;
    partitions::advance(&mut tx, part, checkpoint, event.position).await?;
    store::commit(tx).await?;
    metrics::counter!("quarantined_events_total").increment(1);
    Ok(BatchOutcome {
        events: 1,
        snapshots_written: 0,
        refused: 1,
        checkpoint: event.position,
        horizon: i64::MAX,
    })
}

/// Folds `events` (in log order) into the snapshots of `table`, writing each touched account once
/// and quarantining the events the fold refuses (the account's other events still apply).
/// Returns the number of snapshots written and of events refused.
pub(crate) async fn fold_into(
    conn: &mut PgConnection,
    vault: &Vault,
    table: Table,
    events: &[StoredEvent],
) -> store::Result<(usize, usize)> {
    let folded = events
        .iter()
        .filter(|e| EventKind::of(&e.event).is_folded());
    let accounts: Vec<Uuid> = folded
        .clone()
        .filter_map(|e| e.account_id)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let mut snapshots: HashMap<Uuid, AccountSnapshot> =
        store::snapshots::get_many(conn, vault, table, &accounts)
            .await?
            .into_iter()
            .map(|s| (s.account_id, s))
            .collect();
    let mut touched = HashSet::new();
    let mut refusals = vec![];
    for stored in folded {
        let Some(account) = stored.account_id else {
            continue;
        };
        let current = snapshots.get(&account).cloned();
        match fold_stored(current, stored) {
            Ok(Some(next)) => {
                snapshots.insert(account, next);
                touched.insert(account);
            }
            Ok(None) => {}
            Err(refusal) => refusals.push(refusal),
        }
    }
    let changed: Vec<AccountSnapshot> = touched
        .iter()
        .filter_map(|id| snapshots.remove(id))
        .collect();
    store::snapshots::save(conn, vault, table, &changed).await?;
    store::quarantine::record(conn, vault, &refusals).await?;
    Ok((changed.len(), refusals.len()))
}

/// Applies one stored event with the fold step every fold of the log takes ([`domain::step`]). An
/// event it refuses becomes a [`Refusal`] (logged here), and the snapshot stays as it was.
pub(crate) fn fold_stored(
    current: Option<AccountSnapshot>,
    stored: &StoredEvent,
) -> Result<Option<AccountSnapshot>, Refusal> {
    domain::step(current, stored.raw()).map_err(|error| {
        let error = error.to_string();
        tracing::warn!(position = stored.position, account = ?stored.account_id, %error, "event quarantined");
        Refusal {
            position: stored.position,
            account_id: stored.account_id,
            event: stored.event.clone(),
            error,
            refused_by: RefusedBy::Fold,
        }
    })
}
