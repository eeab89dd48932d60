//! Group commit: deliveries that arrive while a commit is in flight share the next transaction.
//!
//! A [`Batcher`] takes every delivery queued at that moment (up to `max_batch`), appends
//! them in one statement and one commit, and only then answers each request. Nothing waits on a
//! timer: a lone delivery is committed at once, and under load the batch grows by itself to what
//! arrived during the previous commit. Appends are serialised by the log's lock anyway, so sharing
//! a commit is how throughput rises above one WAL flush per delivery.

use std::time::Duration;

use store::PgPool;
use store::kept::KeptConnections;
use store::keys::Vault;
use store::log::{Appended, Delivery};
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

/// Handle to the committing task; cheap to clone.
#[derive(Clone, Debug)]
pub struct Committer {
    jobs: Batcher<Delivery, Answer>,
}

impl Committer {
    /// A handle and the committing loop, for the caller to run as a supervised task; the loop
    /// ends when the last handle is dropped, after its last batch. A delivery whose request went
    /// away while queued is still appended: its redelivery will find it.
    pub fn new(
        pool: PgPool,
        vault: Vault,
        dedup_window: Duration,
        max_batch: usize,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        // The one connection the loop appends on is kept between batches: one handed back to the
        // pool and taken again costs two extra round trips (sqlx pings it both ways).
        let group = GroupCommit {
            connections: KeptConnections::new(pool, 1),
            vault,
            dedup_window,
        };
        let (jobs, commit_loop) = Batcher::new(max_batch, Abandoned::Handle, group);
        (Self { jobs }, commit_loop)
    }

    /// Appends one delivery; returns once it is committed (or failed).
    pub async fn append(&self, delivery: Delivery) -> Answer {
        self.jobs
            .call(delivery)
            .await
            .map_err(|_| AppendError::Unavailable)?
    }
}

/// One transaction per batch of deliveries.
struct GroupCommit {
    connections: KeptConnections,
    vault: Vault,
    dedup_window: Duration,
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
