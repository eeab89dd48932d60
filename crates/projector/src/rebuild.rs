//! Rebuild and verify: the snapshots are a pure function of the log, and these prove it.
//!
//! Both stream the log ordered by account and position, folding one account at a time with
//! [`domain::apply`] (through the same [`fold_stored`] the projector uses), so memory stays constant
//! however long the log is.
//!
//! - [`rebuild_all`] folds everything up to the head (or one partition's accounts) into the shadow
//!   table `account_snapshots_rebuild` without disturbing anyone, then, in one transaction holding
//!   the checkpoint rows it covers (which pauses the live projector between two of its batches),
//!   catches each account up to its own partition's live checkpoint and copies the shadow over the
//!   live table. Readers see the old snapshots until that commit and the new ones after; the live
//!   projector then resumes from the checkpoints the rebuild left. Ingest is never blocked.
//! - [`rebuild_account`] does the same for one account, directly in the live table.
//! - [`verify`] writes nothing: inside one consistent snapshot of the database (shared by two sessions
//!   through `pg_export_snapshot`), it merges the fresh fold (each account up to its own partition's
//!   checkpoint) with the live snapshots, both in account order, and reports every account whose
//!   snapshot differs, is missing, or should not exist.

use futures_util::TryStreamExt;
use store::PgPool;
use store::keys::Vault;
use store::log::StoredEvent;
use store::partitions::{self, Part};
use store::quarantine::Refusal;
use store::snapshots::Table;
use uuid::Uuid;

use crate::{fold_into, fold_stored};
use domain::AccountSnapshot;

/// Receives progress of a long rebuild or verify.
pub trait Progress {
    /// The work is about to start; `total` events will be folded.
    fn start(&self, total: u64);
    /// `events` more events were folded.
    fn advance(&self, events: u64);
    /// The work is done.
    fn finish(&self);
}

/// Progress that goes nowhere.
pub struct Silent;

impl Progress for Silent {
    fn start(&self, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

/// Why a rebuild did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("another rebuild is running")]
    Busy,
    #[error("no partition {index}: the projection is laid out in {partitions} partition(s) (0 to {})", partitions - 1)]
    NoSuchPartition { index: u16, partitions: u16 },
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// What a rebuild did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebuildReport {
    /// `accounts.*` events folded from the log.
    pub events: u64,
    /// Snapshots now in the live table (for one account: 1, or 0 if it has no events).
    pub accounts: u64,
    /// The projector checkpoint after the swap.
    pub checkpoint: i64,
}

/// One account whose live snapshot is not what the log says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub account_id: Uuid,
    /// The differing fields, or `missing` (the log has the account, the table does not) or
    /// `unexpected` (the table has a snapshot the log does not explain).
    pub fields: Vec<&'static str>,
}

/// Folds a stream of events ordered by account, handing out each account's snapshot when done.
#[derive(Default)]
struct AccountFolder {
    current: Option<(Uuid, Option<AccountSnapshot>)>,
    /// Events the fold refused since the caller last took them.
    refusals: Vec<Refusal>,
}

impl AccountFolder {
    /// Folds `stored`; returns the previous account's snapshot when `stored` starts a new account.
    fn push(&mut self, stored: &StoredEvent) -> Option<AccountSnapshot> {
        let account = stored.account_id?;
        let mut finished = None;
        let state = match self.current.take() {
            Some((id, state)) if id == account => state,
            Some((_, state)) => {
                finished = state;
                None
            }
            None => None,
        };
        let next = match fold_stored(state.clone(), stored) {
            Ok(next) => next,
            Err(refusal) => {
                self.refusals.push(refusal);
                state
            }
        };
        self.current = Some((account, next));
        finished
    }

    fn finish(self) -> Option<AccountSnapshot> {
        self.current.and_then(|(_, state)| state)
    }
}

const WRITE_BATCH: usize = 1000;

/// Refolds every snapshot from position 0 and swaps the result in; see the module docs.
#[tracing::instrument(skip_all)]
pub async fn rebuild_all(
    pool: &PgPool,
    vault: &Vault,
    partition: Option<u16>,
    progress: &dyn Progress,
) -> Result<RebuildReport, RebuildError> {
    // Held for the whole rebuild: a second rebuild would share the shadow table.
    let mut guard = pool.acquire().await.map_err(store::Error::from)?.detach();
    if !store::locks::try_lock(&mut guard, store::locks::Lock::Rebuild).await? {
        return Err(RebuildError::Busy);
    }
    let mut writer = store::acquire(pool).await?;
    store::snapshots::clear(&mut writer, Table::Rebuild).await?;
    let scope = scope(&mut writer, partition).await?;

    let mut reader = store::acquire(pool).await?;
    // The horizon before the snapshot: every event up to it is in the snapshot (store crate docs).
    let head = store::log::horizon(&mut reader).await?;
    let mut read = store::begin_consistent_read(&mut reader).await?;
    let total = store::log::count_account_events(&mut read, head, None, scope).await?;
    progress.start(total as u64);
    let mut events = 0u64;
    {
        let mut stream = store::log::account_events_by_account(&mut read, vault, head, None, scope);
        let mut folder = AccountFolder::default();
        let mut buffer = Vec::with_capacity(WRITE_BATCH);
        while let Some(stored) = stream.try_next().await? {
            if let Some(done) = folder.push(&stored) {
                buffer.push(done);
                if buffer.len() >= WRITE_BATCH {
                    save_rebuilt(&mut writer, vault, &mut buffer, head).await?;
                    store::quarantine::record(&mut writer, vault, &folder.refusals).await?;
                    buffer.clear();
                    folder.refusals.clear();
                }
            }
            events += 1;
            if events % 256 == 0 {
                progress.advance(256);
            }
        }
        progress.advance(events % 256);
        store::quarantine::record(&mut writer, vault, &folder.refusals).await?;
        buffer.extend(folder.finish());
        save_rebuilt(&mut writer, vault, &mut buffer, head).await?;
    }
    store::commit(read).await?;
    progress.finish();

    // The swap: holding the checkpoint rows pauses the live projector between batches.
    let mut swap = store::begin(&mut writer).await?;
    let parts = lock_parts(&mut swap, scope).await?;
    let mut folded_to = head;
    let live_to = parts.iter().map(|&(_, c)| c).max().unwrap_or(head);
    while folded_to < live_to {
        // The live projector folded only settled positions, so everything up to its checkpoints
        // is visible here: each part's accounts up to that part's checkpoint.
        let batch =
            store::log::read_after(&mut swap, vault, folded_to, live_to, WRITE_BATCH as i64)
                .await?;
        let Some(last) = batch.last().map(|e| e.position) else {
            break;
        };
        let theirs: Vec<StoredEvent> = batch
            .into_iter()
            .filter(|e| {
                e.account_id.is_some_and(|account| {
                    parts.iter().any(|&(part, checkpoint)| {
                        part.contains(account) && e.position <= checkpoint
                    })
                })
            })
            .collect();
        fold_into(&mut swap, vault, Table::Rebuild, &theirs).await?;
        folded_to = last;
    }
    let accounts = store::snapshots::replace_live_with_rebuild(&mut swap, scope).await?;
    for &(part, checkpoint) in &parts {
        if checkpoint < head {
            partitions::advance(&mut swap, part, checkpoint, head).await?;
        }
    }
    store::commit(swap).await?;
    let _ = store::locks::unlock(&mut guard, store::locks::Lock::Rebuild).await;
    let new_checkpoint = parts
        .iter()
        .map(|&(_, c)| c.max(head))
        .min()
        .unwrap_or(head);
    tracing::info!(
        events,
        accounts,
        checkpoint = new_checkpoint,
        partition = %scope,
        "rebuild swapped in"
    );
    Ok(RebuildReport {
        events,
        accounts,
        checkpoint: new_checkpoint,
    })
}

/// What `--partition` names: that partition of the stored layout, or every account.
async fn scope(
    conn: &mut store::PgConnection,
    partition: Option<u16>,
) -> Result<Part, RebuildError> {
    let Some(index) = partition else {
        return Ok(Part::WHOLE);
    };
    let partitions = partitions::layout(conn).await?.partitions();
    if index >= partitions {
        return Err(RebuildError::NoSuchPartition { index, partitions });
    }
    Ok(Part {
        index,
        of: partitions,
    })
}

/// Locks the checkpoints `scope` covers until the caller's transaction ends: one partition's, or
/// every part's (the projection's too). Each part and its checkpoint.
async fn lock_parts(
    tx: &mut store::PgConnection,
    scope: Part,
) -> Result<Vec<(Part, i64)>, RebuildError> {
    if scope.is_whole() {
        Ok(partitions::lock_layout(tx).await?.parts().collect())
    } else {
        Ok(vec![(scope, partitions::lock(tx, scope).await?)])
    }
}

/// Writes rebuilt snapshots to the shadow table. When the database refuses the whole write (see
/// [`store::Error::is_refusal`]), each snapshot is written alone, and an account whose snapshot is
/// refused even alone is folded again event by event, writing after each, so the event whose
/// snapshot cannot be written is found, quarantined as [`store::quarantine::RefusedBy::Store`] exactly as the live
/// projector does, and left out; the account's other events still apply.
async fn save_rebuilt(
    writer: &mut store::PgConnection,
    vault: &Vault,
    buffer: &mut Vec<AccountSnapshot>,
    head: i64,
) -> Result<(), RebuildError> {
    let snapshots = std::mem::take(buffer);
    match store::snapshots::save(writer, vault, Table::Rebuild, &snapshots).await {
        Err(error) if error.is_refusal() && snapshots.len() > 1 => {}
        Err(error) if error.is_refusal() => {
            return refold_alone(writer, vault, snapshots[0].account_id, head).await;
        }
        other => return Ok(other?),
    }
    for snapshot in snapshots {
        match store::snapshots::save(
            writer,
            vault,
            Table::Rebuild,
            std::slice::from_ref(&snapshot),
        )
        .await
        {
            Err(error) if error.is_refusal() => {
                refold_alone(writer, vault, snapshot.account_id, head).await?;
            }
            other => other?,
        }
    }
    Ok(())
}

/// Folds one account's events up to `head` again, writing the shadow snapshot after each event and
/// quarantining every event whose snapshot the database refuses.
async fn refold_alone(
    writer: &mut store::PgConnection,
    vault: &Vault,
    account: Uuid,
    head: i64,
) -> Result<(), RebuildError> {
    let events: Vec<StoredEvent> =
        store::log::account_events_by_account(writer, vault, head, Some(account), Part::WHOLE)
            .try_collect()
            .await?;
    let mut state: Option<AccountSnapshot> = None;
    for stored in &events {
        let Ok(Some(next)) = fold_stored(state.clone(), stored) else {
            continue;
        };
        match store::snapshots::save(writer, vault, Table::Rebuild, std::slice::from_ref(&next))
            .await
        {
            Ok(()) => state = Some(next),
            Err(error) if error.is_refusal() => {
                tracing::warn!(position = stored.position, %account, reason = %error.reason(),
                    "event quarantined: the database refused its snapshot");
                let refusal = Refusal::by_store(stored, &error);
                store::quarantine::record(writer, vault, std::slice::from_ref(&refusal)).await?;
            }
            Err(error) => return Err(error.into()),
        }
    }
    if state.is_none() {
        store::snapshots::delete_from(writer, Table::Rebuild, account).await?;
    }
    Ok(())
}

/// Refolds one account's snapshot from its events up to the live checkpoint, in the live table.
#[tracing::instrument(skip(pool))]
pub async fn rebuild_account(
    pool: &PgPool,
    vault: &Vault,
    account: Uuid,
) -> Result<RebuildReport, RebuildError> {
    let mut conn = store::acquire(pool).await?;
    let mut tx = store::begin(&mut conn).await?;
    // The account's own partition's checkpoint, locked: its leader pauses between batches.
    let partitions = partitions::layout(&mut tx).await?.partitions();
    let part = Part {
        index: partitions::partition_of(account, partitions),
        of: partitions,
    };
    let checkpoint = partitions::lock(&mut tx, part).await?;
    let mut events = 0u64;
    let snapshot = {
        let mut stream = store::log::account_events_by_account(
            &mut tx,
            vault,
            checkpoint,
            Some(account),
            Part::WHOLE,
        );
        let mut folder = AccountFolder::default();
        while let Some(stored) = stream.try_next().await? {
            folder.push(&stored);
            events += 1;
        }
        let refusals = std::mem::take(&mut folder.refusals);
        drop(stream);
        store::quarantine::record(&mut tx, vault, &refusals).await?;
        folder.finish()
    };
    let accounts = match snapshot {
        Some(snapshot) => {
            store::snapshots::save(&mut tx, vault, Table::Live, &[snapshot]).await?;
            1
        }
        None => {
            store::snapshots::delete(&mut tx, account).await?;
            0
        }
    };
    store::commit(tx).await?;
    Ok(RebuildReport {
        events,
        accounts,
        checkpoint,
    })
}

/// Compares the live snapshots (all, or one account's) with a fresh fold of the log up to the live
/// checkpoint, in one consistent snapshot of the database. Writes nothing.
#[tracing::instrument(skip(pool, progress))]
pub async fn verify(
    pool: &PgPool,
    vault: &Vault,
    account: Option<Uuid>,
    partition: Option<u16>,
    progress: &dyn Progress,
) -> Result<Vec<Difference>, RebuildError> {
    let mut events_conn = store::acquire(pool).await?;
    let mut snapshots_conn = store::acquire(pool).await?;
    let mut events_tx = store::begin_consistent_read(&mut events_conn).await?;
    let snapshot_id = store::export_snapshot(&mut events_tx).await?;
    let mut snapshots_tx = store::begin_shared_read(&mut snapshots_conn, &snapshot_id).await?;
    let scope = scope(&mut events_tx, partition).await?;
    // Each account up to its own partition's checkpoint, as the live projection has it.
    let layout = partitions::layout(&mut events_tx).await?;
    let up_to = layout.common();
    let total = store::log::count_account_events(&mut events_tx, up_to, account, scope).await?;
    progress.start(total as u64);

    let mut differences = vec![];
    {
        let mut folded =
            store::log::account_events_by_account(&mut events_tx, vault, up_to, account, scope);
        let mut live = store::snapshots::stream_live(&mut snapshots_tx, vault, account)
            .try_filter(move |s| std::future::ready(scope.contains(s.account_id)));
        let mut next_live = live.try_next().await?;
        let mut folder = AccountFolder::default();
        let mut pending: Vec<AccountSnapshot> = vec![];
        let mut events = 0u64;
        loop {
            let stored = folded.try_next().await?;
            if let Some(e) = &stored
                && e.account_id
                    .is_some_and(|a| e.position > layout.checkpoint_of(a))
            {
                continue;
            }
            let done = match &stored {
                Some(stored) => {
                    events += 1;
                    if events % 256 == 0 {
                        progress.advance(256);
                    }
                    folder.push(stored)
                }
                None => std::mem::take(&mut folder).finish(),
            };
            pending.extend(done);
            for expected in pending.drain(..) {
                while let Some(extra) = next_live.take_if(|l| l.account_id < expected.account_id) {
                    differences.push(Difference {
                        account_id: extra.account_id,
                        fields: vec!["unexpected"],
                    });
                    next_live = live.try_next().await?;
                }
                match next_live.take_if(|l| l.account_id == expected.account_id) {
                    Some(actual) => {
                        let fields = expected.differing_fields(&actual);
                        if !fields.is_empty() {
                            differences.push(Difference {
                                account_id: expected.account_id,
                                fields,
                            });
                        }
                        next_live = live.try_next().await?;
                    }
                    None => differences.push(Difference {
                        account_id: expected.account_id,
                        fields: vec!["missing"],
                    }),
                }
            }
            if stored.is_none() {
                break;
            }
        }
        while let Some(extra) = next_live {
            differences.push(Difference {
                account_id: extra.account_id,
                fields: vec!["unexpected"],
            });
            next_live = live.try_next().await?;
        }
        progress.advance(events % 256);
    }
    progress.finish();
    Ok(differences)
}
