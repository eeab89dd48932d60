//! Shared reads: current-snapshot lookups that arrive while a read is in flight share the next one.
//!
//! A [`Batcher`] takes every lookup queued at that moment (up to [`MAX_READ_BATCH`]), reads those
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
use store::keys::Vault;
use uuid::Uuid;
use web::batch::{Abandoned, Batcher, Handler};

use crate::Problem;

/// Most lookups one read carries.
pub const MAX_READ_BATCH: usize = 128;

type Answer = Result<Option<AccountSnapshot>, Problem>;

/// Handle to the reading task; cheap to clone. The task ends when the last handle is dropped.
#[derive(Clone, Debug)]
pub struct SnapshotReader {
    lookups: Batcher<Uuid, Answer>,
}

impl SnapshotReader {
    /// Starts the reading task, which reads through `db`. A read not done within `timeout`
    /// (connection included) is abandoned and its lookups are answered 503, so one stuck
    /// connection cannot hold up every later lookup.
    pub fn start(db: KeptConnections, vault: Vault, timeout: Duration) -> Self {
        let (reader, read_loop) = Self::new(db, vault, timeout);
        tokio::spawn(read_loop);
        reader
    }

    /// [`SnapshotReader::start`] without the spawn: a handle and the reading loop, for the caller
    /// to run as a supervised task. A lookup whose request was cancelled while queued (its client
    /// went away) needs no read.
    pub fn new(
        db: KeptConnections,
        vault: Vault,
        timeout: Duration,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (lookups, read_loop) = Batcher::new(
            MAX_READ_BATCH,
            Abandoned::Skip,
            SharedRead { db, vault, timeout },
        );
        (Self { lookups }, read_loop)
    }

    /// The account's current snapshot, read by a query that started after this call.
    pub async fn get(&self, account_id: Uuid) -> Answer {
        self.lookups
            .call(account_id)
            .await
            .map_err(|_| Problem::unavailable())?
    }

    /// Lookups waiting for the next read.
    pub fn pending(&self) -> usize {
        self.lookups.pending()
    }
}

/// One read per batch of lookups.
struct SharedRead {
    db: KeptConnections,
    vault: Vault,
    timeout: Duration,
}

impl Handler for SharedRead {
    type Request = Uuid;
    type Reply = Answer;

    async fn handle(&mut self, ids: Vec<Uuid>) -> Vec<Answer> {
        metrics::histogram!("snapshot_read_batch_size").record(ids.len() as f64);
        let timeout = self.timeout;
        // On timeout the read's connection is dropped mid-query, never kept for the next read.
        let outcome = tokio::time::timeout(timeout, read(&self.db, &self.vault, &ids))
            .await
            .unwrap_or_else(|_| {
                tracing::warn!(?timeout, lookups = ids.len(), "reading snapshots timed out");
                Err(Problem::unavailable())
            });
        match outcome {
            Ok(found) => ids.iter().map(|id| Ok(found.get(id).cloned())).collect(),
            Err(problem) => ids.iter().map(|_| Err(problem.clone())).collect(),
        }
    }
}

/// Reads the accounts of one batch. An error is logged once here, by its conversion to a problem,
/// rather than once per lookup.
async fn read(
    db: &KeptConnections,
    vault: &Vault,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, AccountSnapshot>, Problem> {
    let mut conn = db.acquire().await?;
    let snapshots = store::snapshots::current(&mut conn, vault, ids).await?;
    conn.release();
    Ok(snapshots
        .into_iter()
        .map(|snapshot| (snapshot.account_id, snapshot))
        .collect())
}
