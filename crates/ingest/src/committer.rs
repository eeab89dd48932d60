//! Group commit: deliveries that arrive while a commit is in flight share the next transaction.
//!
//! A [`Batcher`] takes every delivery queued at that moment (up to `max_batch`), appends
//! them in one statement and one commit, and only then answers each request. Nothing waits on a
//! timer: a lone delivery is committed at once, and under load the batch grows by itself to what
//! arrived during the previous commit. Several such lanes commit side by side, each on its own
//! connection: appends overlap (the store crate's docs say why readers stay safe), so their
//! commits share the server's WAL flushes as well.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use store::PgPool;
use store::kept::KeptConnections;
use store::keys::Vault;
use store::log::{Appended, Delivery};
use tokio::sync::Notify;
use web::batch::{Abandoned, Batcher, Handler};

/// Why an append did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// The database is unreachable or timed out; retrying later may succeed.
    #[error("the database is unavailable")]
    Unavailable,
    /// The database refused the delivery.
    #[error("the database refused the append")]
    Failed,
}

type Answer = Result<Appended, AppendError>;

/// Handle to the committing lanes; cheap to clone.
#[derive(Clone, Debug)]
pub struct Committer {
    lanes: Arc<[Batcher<Delivery, Answer>]>,
    next: Arc<AtomicUsize>,
}

impl Committer {
    /// A handle and the committing loops of `lanes` lanes (at least one), as one future for the
    /// caller to run as a supervised task; it ends when the last handle is dropped, after each
    /// lane's last batch. A delivery whose request went away while queued is still appended: its
    /// redelivery will find it.
    pub fn new(
        pool: PgPool,
        vault: Vault,
        dedup_window: Duration,
        max_batch: usize,
        lanes: usize,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let appended = Arc::new(Notify::new());
        let (handles, loops): (Vec<_>, Vec<_>) = (0..lanes.max(1))
            .map(|_| {
                // Each lane's connection is kept between batches: one handed back to the pool
                // and taken again costs two extra round trips (sqlx pings it both ways).
                let group = GroupCommit {
                    connections: KeptConnections::new(pool.clone(), 1),
                    vault: vault.clone(),
                    dedup_window,
                    appended: appended.clone(),
                };
                Batcher::new(max_batch, Abandoned::Handle, group)
            })
            .unzip();
        let committer = Self {
            lanes: handles.into(),
            next: Arc::new(AtomicUsize::new(0)),
        };
        (committer, async move {
            tokio::select! {
                _ = join_all(loops) => {}
                () = announce(pool, appended) => {}
            }
        })
    }

    /// Appends one delivery; returns once it is committed (or failed). It joins the lane with the
    /// fewest deliveries waiting (taking turns among equals).
    pub async fn append(&self, delivery: Delivery) -> Answer {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let lane = (0..self.lanes.len())
            .map(|i| &self.lanes[(start + i) % self.lanes.len()])
            .min_by_key(|lane| lane.pending())
            .expect("at least one lane");
        lane.call(delivery)
            .await
            .map_err(|_| AppendError::Unavailable)?
    }
}

/// Wakes the log's readers after commits ([`store::log::announce`]), off the lanes' path: the
/// commits of a burst share one notification. Not hearing one only delays a reader to its next
/// poll, so a failure is logged and never fails an append.
async fn announce(pool: PgPool, appended: Arc<Notify>) {
    loop {
        appended.notified().await;
        let outcome = async {
            let mut conn = store::acquire(&pool).await?;
            store::log::announce(&mut conn).await
        };
        if let Err(error) = outcome.await {
            tracing::warn!(%error, "could not announce appends; readers see them at their next poll");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One transaction per batch of deliveries.
struct GroupCommit {
    connections: KeptConnections,
    vault: Vault,
    dedup_window: Duration,
    /// Told after each commit.
    appended: Arc<Notify>,
}

impl Handler for GroupCommit {
    type Request = Delivery;
    type Reply = Answer;

    async fn handle(&mut self, deliveries: Vec<Delivery>) -> Vec<Answer> {
        let (connections, vault, dedup_window) =
            (&self.connections, &self.vault, self.dedup_window);
        tracing::trace!(deliveries = deliveries.len(), "committing a batch");
        metrics::histogram!("append_batch_size").record(deliveries.len() as f64);
        let started = std::time::Instant::now();
        let outcome = append(connections, vault, &deliveries, dedup_window).await;
        if outcome.is_ok() {
            self.appended.notify_one();
        }
        metrics::histogram!("append_duration_seconds").record(started.elapsed().as_secs_f64());
        if let Ok(appended) = &outcome
            && let Some(head) = appended.iter().map(|a| a.position).max()
        {
            metrics::gauge!("log_head_position").set(head as f64);
        }
        match outcome {
            Ok(appended) => appended.into_iter().map(Ok).collect(),
            Err(AppendError::Failed) if deliveries.len() > 1 => {
                // One delivery the database refuses must not fail the others: retry them alone.
                let mut answers = Vec::with_capacity(deliveries.len());
                for delivery in &deliveries {
                    let single = append(
                        connections,
                        vault,
                        std::slice::from_ref(delivery),
                        dedup_window,
                    )
                    .await;
                    answers.push(single.map(|appended| appended[0]));
                }
                if answers.iter().any(Result::is_ok) {
                    self.appended.notify_one();
                }
                answers
            }
            Err(error) => deliveries.iter().map(|_| Err(error)).collect(),
        }
    }
}

async fn append(
    connections: &KeptConnections,
    vault: &Vault,
    deliveries: &[Delivery],
    dedup_window: Duration,
) -> Result<Vec<Appended>, AppendError> {
    let attempt = async {
        let mut conn = connections.acquire().await?;
        let appended = store::log::append_in(&mut conn, vault, deliveries, dedup_window).await?;
        conn.release();
        Ok(appended)
    };
    attempt.await.map_err(|error: store::Error| {
        if error.is_unavailable() {
            tracing::warn!(%error, deliveries = deliveries.len(), "append failed: database unavailable");
            AppendError::Unavailable
        } else {
            tracing::error!(%error, deliveries = deliveries.len(), "append failed");
            AppendError::Failed
        }
    })
}
