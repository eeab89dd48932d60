//! Shared reads: current-snapshot lookups that arrive while a read is in flight share the next one.
//!
//! One task per process takes every lookup queued at that moment (up to `max_batch`), reads those
//! accounts in one statement and answers each. As with the ingest's group commit nothing waits on a
//! timer: a lone lookup is read at once, and under load a read carries what arrived during the
//! previous one. Postgres then parses, plans and answers one statement for many requests, and the
//! process sends one message to it instead of one each.
//!
//! Sharing never serves an older view: every lookup is answered by a read that starts after it was
//! queued, so it sees every snapshot committed before its request arrived, as a query of its own
//! would.

use std::collections::HashMap;
use std::time::Duration;

use domain::AccountSnapshot;
use store::kept::KeptConnections;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::Problem;

/// Most lookups one read carries.
pub const MAX_READ_BATCH: usize = 128;

struct Lookup {
    account_id: Uuid,
    reply: oneshot::Sender<Result<Option<AccountSnapshot>, Problem>>,
}

/// Handle to the reading task; cheap to clone. The task ends when the last handle is dropped.
#[derive(Clone, Debug)]
pub struct SnapshotReader {
    lookups: mpsc::Sender<Lookup>,
}

impl SnapshotReader {
    /// Starts the reading task, which reads through `db`. A read not done within `timeout`
    /// (connection included) is abandoned and its lookups are answered 503, so one stuck
    /// connection cannot hold up every later lookup.
    pub fn start(db: KeptConnections, timeout: Duration) -> Self {
        let (reader, read_loop) = Self::new(db, timeout);
        tokio::spawn(read_loop);
        reader
    }

    /// [`SnapshotReader::start`] without the spawn: a handle and the reading loop, for the caller
    /// to run as a supervised task.
    pub fn new(
        db: KeptConnections,
        timeout: Duration,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (lookups, queue) = mpsc::channel(MAX_READ_BATCH * 8);
        (Self { lookups }, read_loop(db, timeout, queue))
    }

    /// The account's current snapshot, read by a query that started after this call.
    pub async fn get(&self, account_id: Uuid) -> Result<Option<AccountSnapshot>, Problem> {
        let (reply, answer) = oneshot::channel();
        self.lookups
            .send(Lookup { account_id, reply })
            .await
            .map_err(|_| Problem::unavailable())?;
        answer.await.map_err(|_| Problem::unavailable())?
    }

    /// Lookups waiting for the next read.
    pub fn pending(&self) -> usize {
        self.lookups.max_capacity() - self.lookups.capacity()
    }
}

async fn read_loop(db: KeptConnections, timeout: Duration, mut queue: mpsc::Receiver<Lookup>) {
    let mut batch = Vec::with_capacity(MAX_READ_BATCH);
    while queue.recv_many(&mut batch, MAX_READ_BATCH).await > 0 {
        // A request cancelled while queued (its client went away) needs no read.
        batch.retain(|lookup| !lookup.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        metrics::histogram!("snapshot_read_batch_size").record(batch.len() as f64);
        let ids: Vec<Uuid> = batch.iter().map(|lookup| lookup.account_id).collect();
        // On timeout the read's connection is dropped mid-query, never kept for the next read.
        let outcome = tokio::time::timeout(timeout, read(&db, &ids))
            .await
            .unwrap_or_else(|_| {
                tracing::warn!(?timeout, lookups = ids.len(), "reading snapshots timed out");
                Err(Problem::unavailable())
            });
        match outcome {
            Ok(found) => {
                for lookup in batch.drain(..) {
                    let snapshot = found.get(&lookup.account_id).cloned();
                    let _ = lookup.reply.send(Ok(snapshot));
                }
            }
            Err(problem) => {
                for lookup in batch.drain(..) {
                    let _ = lookup.reply.send(Err(problem.clone()));
                }
            }
        }
    }
}

/// Reads the accounts of one batch. An error is logged once here, by its conversion to a problem,
/// rather than once per lookup.
async fn read(
    db: &KeptConnections,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, AccountSnapshot>, Problem> {
    let mut conn = db.acquire().await?;
    let snapshots = store::snapshots::current(&mut conn, ids).await?;
    conn.release();
    Ok(snapshots
        .into_iter()
        .map(|snapshot| (snapshot.account_id, snapshot))
        .collect())
}
